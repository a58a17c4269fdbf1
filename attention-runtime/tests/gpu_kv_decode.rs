//! GPU static KV cache, fused `decode_splitkv` decode and prefill against the CPU reference.
//! `#[ignore = "requires a CUDA GPU"]`; run through `scripts/gpu-bundle.sh` (CONTRIBUTING.md).
//! Fresh random inputs (seed printed), NaN-poisoned outputs, relative Frobenius error
//! <= 1e-2 (bf16).

use attention_runtime::cuda::{CudaLayer, DeviceStaticKvCache};
use attention_runtime::kv_cache::StaticKvCache;
use attention_runtime::modules::SplitMix64;
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{AttnError, ForwardArgs, RuntimeDims, Tensor};

mod common;
use common::{fresh_seed, gpu, layer_pair, rel_err};

const TOL: f64 = 1e-2;

/// Prefill `s` tokens for `b` sequences, then `steps` fused decode steps, CPU vs GPU.
fn prefill_then_decode(spec: &str, b: usize, s: usize, steps: usize) {
    let sd = fresh_seed();
    eprintln!("seed {sd} spec {spec}");
    let mut rng = SplitMix64::new(sd);
    let (layer, cuda) = layer_pair(spec, sd);
    let config = layer.config().clone();
    let (ng, hn, h) = (config.groups, config.head_dim, config.hidden);
    let max_seq = s + steps + 3;
    let mut cpu_cache = StaticKvCache::new(1, max_seq, b + 1, ng, hn).unwrap();
    let elem = attention_runtime::cuda::ElemType::from(config.dtype);
    let mut gpu_cache =
        DeviceStaticKvCache::new(cuda.runtime().stream(), elem, 1, max_seq, b + 1, ng, hn).unwrap();
    let args = ForwardArgs::default();
    let x = Tensor::from_fn(&[s, b, h], |_| rng.uniform() * 1.7);
    use attention_runtime::AttentionLayer;
    let want = layer.prefill(&x, &mut cpu_cache, 0, 1, &args).unwrap();
    let got = cuda.prefill(&x, &mut gpu_cache, 0, 1, &args).unwrap();
    let e = rel_err(&got.output, &want.output);
    assert!(e <= TOL, "prefill rel err {e}");
    cpu_cache.advance(1, b, s).unwrap();
    gpu_cache.advance(1, b, s).unwrap();
    for step in 0..steps {
        let x = Tensor::from_fn(&[1, b, h], |_| rng.uniform() * 1.7);
        let want = layer.decode(&x, &mut cpu_cache, 0, 1, &args).unwrap();
        let got = cuda.decode(&x, &mut gpu_cache, 0, 1, &args).unwrap();
        let e = rel_err(&got.output, &want.output);
        assert!(e <= TOL, "decode step {step} rel err {e}");
        cpu_cache.advance(1, b, 1).unwrap();
        gpu_cache.advance(1, b, 1).unwrap();
    }
    // The device cache holds what the CPU cache holds (rotated keys, values).
    for slot in 1..=b {
        let len = s + steps;
        let (gk, gv) = gpu_cache.gather_kv_host(0, slot, len).unwrap();
        let (ck, cv) = cpu_cache.gather_kv(0, slot, len).unwrap();
        let ck = Tensor::new(&[len, ng, hn], ck).unwrap();
        let cv = Tensor::new(&[len, ng, hn], cv).unwrap();
        assert!(rel_err(&gk, &ck) <= TOL, "cached k");
        assert!(rel_err(&gv, &cv) <= TOL, "cached v");
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn kv_decode_gqa_rope_matches_cpu() {
    prefill_then_decode(
        "self, heads=8, gqa=2, head_dim=128, qk_layernorm=rms, rope, mask=causal",
        3,
        37,
        4,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn kv_decode_long_split_interleaved_matches_cpu() {
    // Long enough for several KV splits.
    prefill_then_decode(
        "self, heads=4, gqa=4, head_dim=64, rope=interleaved, mask=causal",
        2,
        700,
        3,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn kv_decode_hd256_gate_matches_cpu() {
    // The largest head dim (widest smem rows), GQA 4:1, partial rope, output gate, long
    // enough for several splits.
    prefill_then_decode(
        "self, heads=8, gqa=2, head_dim=256, rope, rotary_percent=0.5, output_gate, mask=causal",
        2,
        300,
        3,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn kv_decode_hd80_matches_cpu() {
    // Head dim 80 (Phi-2; not a multiple of 32): the fused decode step's per-lane rope, q
    // staging and merge leave the empty lanes out. Phi-2's partial rope (32 channels, MHA,
    // biases), long enough for several splits; then rope over all 80 channels with GQA, a
    // layer q/k norm, a window, a learnable sink and the output gate.
    prefill_then_decode(
        "self, heads=4, head_dim=80, rope, rotary_percent=0.4, mask=causal",
        2,
        300,
        3,
    );
    prefill_then_decode(
        "self, heads=8, gqa=2, head_dim=80, qk_layernorm=layer, rope, window=(40, 0), \
         sinks=learnable, output_gate, mask=causal",
        3,
        90,
        3,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn kv_decode_f16_matches_cpu() {
    prefill_then_decode(
        "self, heads=8, gqa=2, head_dim=128, qk_layernorm=rms, rope, dtype=f16, mask=causal",
        3,
        260,
        3,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn kv_decode_window_sinks_mqa_matches_cpu() {
    prefill_then_decode(
        "self, heads=6, gqa=1, head_dim=64, hidden=320, rope, window=(20, 0), sinks=learnable, mask=causal",
        2,
        50,
        3,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn kv_decode_capacity_error_writes_nothing() {
    let config = SpecLayer::config_from_str(
        "self, heads=4, gqa=2, head_dim=64, rope, mask=causal",
        &RuntimeDims::default(),
    )
    .unwrap();
    let layer = SpecLayer::init(config.clone(), 7).unwrap();
    let cuda = CudaLayer::new(&layer, &gpu()).unwrap();
    let elem = attention_runtime::cuda::ElemType::from(config.dtype);
    let mut cache =
        DeviceStaticKvCache::new(cuda.runtime().stream(), elem, 1, 4, 2, 2, 64).unwrap();
    let args = ForwardArgs::default();
    let x = Tensor::from_fn(&[4, 2, config.hidden], |i| (i % 7) as f32 * 0.1);
    cuda.prefill(&x, &mut cache, 0, 0, &args).unwrap();
    cache.advance(0, 2, 4).unwrap();
    let before = cache.layer_k(0).unwrap().to_host().unwrap();
    let x1 = Tensor::from_fn(&[1, 2, config.hidden], |i| (i % 5) as f32 * 0.3);
    let e = cuda.decode(&x1, &mut cache, 0, 0, &args).unwrap_err();
    assert!(matches!(e, AttnError::CacheCapacity { .. }), "{e}");
    assert_eq!(cache.seqlens(), &[4, 4]);
    assert_eq!(
        cache.layer_k(0).unwrap().to_host().unwrap().data(),
        before.data()
    );
    let e = cuda.decode(&x1, &mut cache, 0, 1, &args).unwrap_err();
    assert!(matches!(e, AttnError::CacheCapacity { .. }), "{e}");
}
