//! Multi-token decode (2 to 16 new tokens per sequence: speculative decoding, multi-token
//! prediction) over a GPU static KV cache: the fused `decode_splitkv` step with the group's
//! heads times the tokens as the rows of its tensor-core tile, against the CPU reference.
//! `#[ignore = "requires a CUDA GPU"]`; run through `scripts/gpu-bundle.sh` (CONTRIBUTING.md).
//! Fresh random inputs (seed printed), NaN-poisoned outputs, relative Frobenius error
//! <= 1e-2 (bf16 / f16).

use attention_runtime::cuda::{DeviceStaticKvCache, DeviceTensor, ElemType};
use attention_runtime::kv_cache::StaticKvCache;
use attention_runtime::modules::SplitMix64;
use attention_runtime::{AttentionLayer, AttnError, ForwardArgs, Tensor};

mod common;
use common::{bitwise, fresh_seed, layer_pair, rel_err};

const TOL: f64 = 1e-2;

/// Prefill `s0` tokens (`s0 > 16`: the forward kernel over the cache; `<= 16`: the decode
/// step itself) for `b` sequences, then one step of each count in `steps`, CPU vs GPU
/// (`CudaLayer::prefill`, which takes the fused decode step up to 16 tokens); checks the
/// kernel each step runs (`want_rb`: the row-block suffix expected for a step, "" for one
/// row block) and finally the cached k/v.
fn steps_match(spec: &str, b: usize, s0: usize, steps: &[(usize, &str)]) {
    let sd = fresh_seed();
    eprintln!("seed {sd} spec {spec}");
    let mut rng = SplitMix64::new(sd);
    let (layer, cuda) = layer_pair(spec, sd);
    cuda.set_poison_outputs(true);
    let config = layer.config().clone();
    let (ng, hn, h) = (config.groups, config.head_dim, config.hidden);
    let total: usize = s0 + steps.iter().map(|s| s.0).sum::<usize>();
    let max_seq = total + 2;
    // Slots 1..=b of b + 1 (slot 0 stays empty: batch_offset is honoured).
    let mut cpu_cache = StaticKvCache::new(1, max_seq, b + 1, ng, hn).unwrap();
    let elem = ElemType::from(config.dtype);
    let mut gpu_cache =
        DeviceStaticKvCache::new(cuda.runtime().stream(), elem, 1, max_seq, b + 1, ng, hn).unwrap();
    let args = ForwardArgs::default();
    let mut run = |s: usize, what: &str| {
        let x = Tensor::from_fn(&[s, b, h], |_| rng.uniform() * 1.7);
        let want = layer.prefill(&x, &mut cpu_cache, 0, 1, &args).unwrap();
        let got = cuda.prefill(&x, &mut gpu_cache, 0, 1, &args).unwrap();
        assert_eq!(got.output.shape(), &[s, b, h]);
        assert!(
            got.output.data().iter().all(|v| v.is_finite()),
            "{what}: NaN/inf"
        );
        let e = rel_err(&got.output, &want.output);
        eprintln!("{what}: {s} tokens, rel err {e:.2e}");
        assert!(e <= TOL, "{what}: {s} tokens, rel err {e}");
        cpu_cache.advance(1, b, s).unwrap();
        gpu_cache.advance(1, b, s).unwrap();
    };
    run(s0, "first step");
    for (i, &(t, rb)) in steps.iter().enumerate() {
        let key = cuda.cache_step_kernel(t).unwrap();
        assert!(key.starts_with("decode_splitkv_"), "{t} tokens run {key}");
        match rb {
            "" => assert!(!key.contains("_rb"), "{t} tokens run {key}"),
            suffix => assert!(key.contains(suffix), "{t} tokens run {key}, want {suffix}"),
        }
        run(t, &format!("step {i} ({key})"));
    }
    for slot in 1..=b {
        let (gk, gv) = gpu_cache.gather_kv_host(0, slot, total).unwrap();
        let (ck, cv) = cpu_cache.gather_kv(0, slot, total).unwrap();
        let ck = Tensor::new(&[total, ng, hn], ck).unwrap();
        let cv = Tensor::new(&[total, ng, hn], cv).unwrap();
        assert!(rel_err(&gk, &ck) <= TOL, "cached k, slot {slot}");
        assert!(rel_err(&gv, &cv) <= TOL, "cached v, slot {slot}");
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn llama_gqa_steps_of_2_to_16_tokens_match_cpu() {
    // 4 heads per group: up to 4 tokens fill one 16-row block, 5-8 two, 9-16 four.
    steps_match(
        "self, heads=32, gqa=8, head_dim=128, qk_layernorm=rms, rope, mask=causal",
        3,
        150,
        &[
            (2, ""),
            (3, ""),
            (4, ""),
            (5, "_rb2"),
            (8, "_rb2"),
            (16, "_rb4"),
            (1, ""),
            (11, "_rb4"),
        ],
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn multi_token_from_an_empty_cache_and_long_contexts_match_cpu() {
    // The first step itself short (the decode step on an empty cache), then a context long
    // enough for many KV splits per sequence.
    steps_match(
        "self, heads=8, gqa=2, head_dim=128, rope, mask=causal",
        2,
        7,
        &[(16, "_rb4"), (6, "_rb2")],
    );
    steps_match(
        "self, heads=8, gqa=2, head_dim=64, rope=interleaved, mask=causal",
        2,
        1500,
        &[(4, ""), (16, "_rb4"), (9, "_rb4")],
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn multi_token_window_sinks_gate_two_passes_match_cpu() {
    // 8 heads per group: 16 tokens are 128 rows, two passes of four row blocks; a window
    // shorter than the step, so the tokens' visible ranges differ at both ends.
    steps_match(
        "self, heads=16, gqa=2, head_dim=64, rope, window=(10, 0), sinks=learnable, \
         output_gate, mask=causal",
        2,
        60,
        &[(16, "_rb4"), (3, "_rb2"), (13, "_rb4"), (2, "")],
    );
    steps_match(
        "self, heads=8, gqa=2, head_dim=128, rope, window=(5, 0), sinks=off_by_one, mask=causal",
        2,
        40,
        &[(12, "_rb4"), (7, "_rb2")],
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn multi_token_hd256_hd80_f16_mha_match_cpu() {
    // Head dim 256 has only the one-row-block kernel: 16 tokens x 4 heads take four passes.
    steps_match(
        "self, heads=8, gqa=2, head_dim=256, rope, rotary_percent=0.5, mask=causal",
        2,
        300,
        &[(16, ""), (5, "")],
    );
    steps_match(
        "self, heads=4, head_dim=80, rope, rotary_percent=0.4, dtype=f16, mask=causal",
        3,
        90,
        &[(3, ""), (16, ""), (8, "")],
    );
    steps_match(
        "self, heads=8, gqa=2, head_dim=80, qk_layernorm=layer, rope, mask=causal",
        2,
        33,
        &[(8, "_rb2"), (16, "_rb4")],
    );
}

/// `decode_device_into` with `hidden` `[T, b, h]` (the allocation-free entry) equals the
/// CPU prefill; a repeated step (after rollback) is bitwise equal.
#[test]
#[ignore = "requires a CUDA GPU"]
fn decode_device_into_takes_t_tokens_and_repeats_bitwise() {
    let sd = fresh_seed();
    eprintln!("seed {sd}");
    let mut rng = SplitMix64::new(sd);
    let spec = "self, heads=32, gqa=8, head_dim=128, rope, mask=causal";
    let (layer, cuda) = layer_pair(spec, sd);
    let config = layer.config().clone();
    let (ng, hn, h, b, t) = (config.groups, config.head_dim, config.hidden, 4, 6);
    let elem = ElemType::from(config.dtype);
    let st = cuda.runtime().stream().clone();
    let mut cpu_cache = StaticKvCache::new(1, 400, b, ng, hn).unwrap();
    let mut gpu_cache = DeviceStaticKvCache::new(&st, elem, 1, 400, b, ng, hn).unwrap();
    let args = ForwardArgs::default();
    let x0 = Tensor::from_fn(&[333, b, h], |_| rng.uniform());
    layer.prefill(&x0, &mut cpu_cache, 0, 0, &args).unwrap();
    cuda.prefill(&x0, &mut gpu_cache, 0, 0, &args).unwrap();
    cpu_cache.advance(0, b, 333).unwrap();
    gpu_cache.advance(0, b, 333).unwrap();
    let x = Tensor::from_fn(&[t, b, h], |_| rng.uniform() * 1.3);
    let want = layer.prefill(&x, &mut cpu_cache, 0, 0, &args).unwrap();
    let xd = DeviceTensor::from_host(&st, &x, elem).unwrap();
    let mut out =
        DeviceTensor::from_host(&st, &Tensor::from_fn(&[t, b, h], |_| f32::NAN), elem).unwrap();
    cuda.decode_device_into(&xd, &mut out, &mut gpu_cache, 0, 0, &args)
        .unwrap();
    let first = out.to_host().unwrap();
    let e = rel_err(&first, &want.output);
    assert!(e <= TOL, "rel err {e}");
    gpu_cache.rollback();
    cuda.decode_device_into(&xd, &mut out, &mut gpu_cache, 0, 0, &args)
        .unwrap();
    assert!(
        bitwise(&out.to_host().unwrap(), &first),
        "a repeated step differs"
    );
}

/// Bad multi-token steps are typed errors and write nothing: more tokens than a slot has
/// room for, more than 16 tokens on the device entry, an `out` of the wrong size.
#[test]
#[ignore = "requires a CUDA GPU"]
fn multi_token_errors_write_nothing() {
    let spec = "self, heads=8, gqa=2, head_dim=64, rope, mask=causal";
    let (layer, cuda) = layer_pair(spec, 11);
    let config = layer.config().clone();
    let (ng, hn, h) = (config.groups, config.head_dim, config.hidden);
    let elem = ElemType::from(config.dtype);
    let st = cuda.runtime().stream().clone();
    let mut cache = DeviceStaticKvCache::new(&st, elem, 1, 20, 2, ng, hn).unwrap();
    let args = ForwardArgs::default();
    let x = Tensor::from_fn(&[15, 2, h], |i| (i % 7) as f32 * 0.1);
    cuda.prefill(&x, &mut cache, 0, 0, &args).unwrap();
    cache.advance(0, 2, 15).unwrap();
    let before = cache.layer_k(0).unwrap().to_host().unwrap();
    // 6 tokens into 5 free rows.
    let x6 = Tensor::from_fn(&[6, 2, h], |i| (i % 5) as f32 * 0.3);
    let e = cuda.prefill(&x6, &mut cache, 0, 0, &args).unwrap_err();
    assert!(matches!(e, AttnError::CacheCapacity { .. }), "{e}");
    let xd = DeviceTensor::from_host(&st, &x6, elem).unwrap();
    let mut out = DeviceTensor::from_host(&st, &Tensor::zeros(&[6, 2, h]), elem).unwrap();
    let e = cuda
        .decode_device_into(&xd, &mut out, &mut cache, 0, 0, &args)
        .unwrap_err();
    assert!(matches!(e, AttnError::CacheCapacity { .. }), "{e}");
    // 17 tokens: beyond the decode step (the device entry refuses; prefill takes them).
    let x17 = DeviceTensor::from_host(&st, &Tensor::zeros(&[17, 1, h]), elem).unwrap();
    let mut out17 = DeviceTensor::from_host(&st, &Tensor::zeros(&[17, 1, h]), elem).unwrap();
    let e = cuda
        .decode_device_into(&x17, &mut out17, &mut cache, 0, 0, &args)
        .unwrap_err();
    assert!(
        matches!(&e, AttnError::Shape { arg, .. } if arg == "hidden"),
        "{e}"
    );
    // `out` sized for one token.
    let x2 = DeviceTensor::from_host(&st, &Tensor::zeros(&[2, 2, h]), elem).unwrap();
    let mut out1 = DeviceTensor::from_host(&st, &Tensor::zeros(&[1, 2, h]), elem).unwrap();
    let e = cuda
        .decode_device_into(&x2, &mut out1, &mut cache, 0, 0, &args)
        .unwrap_err();
    assert!(
        matches!(&e, AttnError::Shape { arg, .. } if arg == "out"),
        "{e}"
    );
    assert!(bitwise(
        &cache.layer_k(0).unwrap().to_host().unwrap(),
        &before
    ));
    assert_eq!(cache.visible_len(0, 0).unwrap(), 15);
}
