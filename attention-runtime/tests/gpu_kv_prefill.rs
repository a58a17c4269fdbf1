//! Prefill over a static KV cache on tensor cores: the `prefill_sm80` kernel reading the cache
//! slots in place (its static-cache mode), against the CPU reference, for chunks after
//! cached tokens of different lengths per slot, GQA, windows, sinks and the output gate.
//! `#[ignore = "requires a CUDA GPU"]`; run through `scripts/gpu-bundle.sh` (CONTRIBUTING.md).
//! Fresh random inputs (seed printed), NaN-poisoned outputs, relative Frobenius error
//! <= 1e-2 (bf16); a NaN fails.

use attention_runtime::cuda::{DeviceStaticKvCache, ElemType};
use attention_runtime::kv_cache::StaticKvCache;
use attention_runtime::modules::SplitMix64;
use attention_runtime::{AttentionLayer, ForwardArgs, Tensor};

mod common;
use common::{fresh_seed, layer_pair, rel_err};

const TOL: f64 = 1e-2;

/// Slots get different cached lengths (slot i: `first[i]` tokens), then every slot takes
/// `chunks` prefill chunks of `chunk` tokens and two decode steps; each step is compared
/// with the CPU layer over its own cache.
fn chunked_prefill(spec: &str, first: &[usize], chunk: usize, chunks: usize) {
    let sd = fresh_seed();
    eprintln!("seed {sd} spec {spec}");
    let mut rng = SplitMix64::new(sd);
    let (layer, cuda) = layer_pair(spec, sd);
    let config = layer.config().clone();
    let fast = cuda
        .cache_prefill_config()
        .expect("the tensor-core prefill kernel fits this GPU");
    eprintln!("prefill kernel {}", fast.key());
    let (ng, hn, h) = (config.groups, config.head_dim, config.hidden);
    let b = first.len();
    let max_seq = first.iter().max().unwrap() + chunk * chunks + 4;
    let elem = ElemType::from(config.dtype);
    let mut cpu = StaticKvCache::new(1, max_seq, b, ng, hn).unwrap();
    let mut dev =
        DeviceStaticKvCache::new(cuda.runtime().stream(), elem, 1, max_seq, b, ng, hn).unwrap();
    let args = ForwardArgs::default();
    // Different cached lengths: prefill slot by slot.
    for (slot, &len) in first.iter().enumerate() {
        let x = Tensor::from_fn(&[len, 1, h], |_| rng.uniform() * 1.7);
        let want = layer.prefill(&x, &mut cpu, 0, slot, &args).unwrap();
        let got = cuda.prefill(&x, &mut dev, 0, slot, &args).unwrap();
        let e = rel_err(&got.output, &want.output);
        assert!(
            e <= TOL,
            "first prefill of slot {slot} ({len} tokens): rel err {e}"
        );
        cpu.advance(slot, 1, len).unwrap();
        dev.advance(slot, 1, len).unwrap();
    }
    for c in 0..chunks {
        let x = Tensor::from_fn(&[chunk, b, h], |_| rng.uniform() * 1.7);
        let want = layer.prefill(&x, &mut cpu, 0, 0, &args).unwrap();
        let got = cuda.prefill(&x, &mut dev, 0, 0, &args).unwrap();
        let e = rel_err(&got.output, &want.output);
        assert!(e <= TOL, "chunk {c}: rel err {e}");
        cpu.advance(0, b, chunk).unwrap();
        dev.advance(0, b, chunk).unwrap();
    }
    for step in 0..2 {
        let x = Tensor::from_fn(&[1, b, h], |_| rng.uniform() * 1.7);
        let want = layer.decode(&x, &mut cpu, 0, 0, &args).unwrap();
        let got = cuda.decode(&x, &mut dev, 0, 0, &args).unwrap();
        let e = rel_err(&got.output, &want.output);
        assert!(e <= TOL, "decode {step}: rel err {e}");
        cpu.advance(0, b, 1).unwrap();
        dev.advance(0, b, 1).unwrap();
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cache_prefill_gqa_rope_qknorm() {
    chunked_prefill(
        "self, heads=8, gqa=2, head_dim=128, qk_layernorm=rms, rope, mask=causal",
        &[5, 130, 300],
        97,
        3,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cache_prefill_window_sinks_gate() {
    chunked_prefill(
        "self, heads=4, gqa=1, head_dim=64, rope=interleaved, window=(70, 0), sinks=learnable, output_gate, mask=causal",
        &[200, 1],
        150,
        2,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cache_prefill_hd256_off_by_one() {
    chunked_prefill(
        "self, heads=4, gqa=2, head_dim=256, rope, sinks=off_by_one, mask=causal",
        &[64, 129],
        65,
        2,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cache_prefill_hd80_partial_rope() {
    // Head dim 80 (Phi-2: MHA, biases, partial rope over 32 channels): the tensor-core kernel
    // over the static cache with 5 k16 steps per q.k.
    chunked_prefill(
        "self, heads=4, head_dim=80, rope, rotary_percent=0.4, mask=causal",
        &[7, 130, 200],
        97,
        3,
    );
}
