//! A whole layer decode step captured in a CUDA graph (`CudaLayer::capture_decode`):
//! replays against eager decode (bitwise: outputs and cache contents) and the CPU reference
//! (relative Frobenius error <= 1e-2, bf16), capacity and binding errors.
//! `#[ignore = "requires a CUDA GPU"]`; run through `scripts/gpu-bundle.sh` (CONTRIBUTING.md).
//! Fresh random inputs (seed printed), NaN-poisoned outputs before each replay.

use attention_runtime::cuda::{CudaLayer, DeviceStaticKvCache, ElemType};
use attention_runtime::kv_cache::StaticKvCache;
use attention_runtime::modules::SplitMix64;
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{AttentionLayer, AttnError, ForwardArgs, RuntimeDims, Tensor};

mod common;
use common::{fresh_seed, gpu, layer_pair, rel_err};

const TOL: f64 = 1e-2;

fn assert_bitwise(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.shape(), b.shape(), "{what}: shapes");
    let diff = a
        .data()
        .iter()
        .zip(b.data())
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    assert_eq!(diff, 0, "{what}: {diff} of {} elements differ", a.numel());
}

/// Prefill `s` tokens into two identical device caches (and a CPU cache), then `steps`
/// decode steps of `t` new tokens each: eager on the first, graph replays on the second, CPU
/// on the third.
fn graph_matches_eager_and_cpu(spec: &str, b: usize, s: usize, steps: usize, pin: bool) {
    graph_steps_match(spec, b, s, steps, pin, 1)
}

fn graph_steps_match(spec: &str, b: usize, s: usize, steps: usize, pin: bool, t: usize) {
    let sd = fresh_seed();
    eprintln!("seed {sd} spec {spec}");
    let mut rng = SplitMix64::new(sd);
    let (layer, cuda) = layer_pair(spec, sd);
    let config = layer.config().clone();
    let (ng, hn, h) = (config.groups, config.head_dim, config.hidden);
    let (max_seq, max_batch, off) = (s + t * steps + 2, b + 1, 1);
    let elem = ElemType::from(config.dtype);
    let st = cuda.runtime().stream();
    let mut cpu = StaticKvCache::new(1, max_seq, max_batch, ng, hn).unwrap();
    let mut eager = DeviceStaticKvCache::new(st, elem, 1, max_seq, max_batch, ng, hn).unwrap();
    let mut graphed = DeviceStaticKvCache::new(st, elem, 1, max_seq, max_batch, ng, hn).unwrap();
    let args = ForwardArgs::default();
    let x = Tensor::from_fn(&[s, b, h], |_| rng.uniform() * 1.7);
    layer.prefill(&x, &mut cpu, 0, off, &args).unwrap();
    cuda.prefill(&x, &mut eager, 0, off, &args).unwrap();
    cuda.prefill(&x, &mut graphed, 0, off, &args).unwrap();
    cpu.advance(off, b, s).unwrap();
    eager.advance(off, b, s).unwrap();
    graphed.advance(off, b, s).unwrap();
    if pin {
        cuda.set_decode_splits(Some(3)).unwrap();
    }
    let mut graph = cuda
        .capture_decode_tokens(&graphed, 0, off, b, t, &args)
        .unwrap();
    graph.set_poison_outputs(true);
    assert_eq!(graph.batch(), b);
    assert_eq!(graph.tokens(), t);
    // Eager decode with the graph's split count computes the same sums in the same order.
    cuda.set_decode_splits(Some(graph.num_splits())).unwrap();
    for step in 0..steps {
        let x = Tensor::from_fn(&[t, b, h], |_| rng.uniform() * 1.7);
        let want = layer.prefill(&x, &mut cpu, 0, off, &args).unwrap();
        // A step of up to 16 tokens runs the same decode plan eagerly (cuda.prefill routes it).
        let e_out = cuda.prefill(&x, &mut eager, 0, off, &args).unwrap();
        let g_out = graph.replay(&x, &mut graphed).unwrap();
        assert_bitwise(&format!("step {step} output"), &g_out.output, &e_out.output);
        let e = rel_err(&g_out.output, &want.output);
        assert!(e <= TOL, "step {step}: graph vs CPU rel err {e}");
        assert_eq!(g_out.bias.is_some(), want.bias.is_some());
        cpu.advance(off, b, t).unwrap();
        eager.advance(off, b, t).unwrap();
        graphed.advance(off, b, t).unwrap();
    }
    assert_eq!(eager.seqlens(), graphed.seqlens());
    assert_eq!(graphed.seqlens()[off], s + t * steps);
    let kv = |c: &DeviceStaticKvCache| {
        (
            c.layer_k(0).unwrap().to_host().unwrap(),
            c.layer_v(0).unwrap().to_host().unwrap(),
        )
    };
    let ((ek, ev), (gk, gv)) = (kv(&eager), kv(&graphed));
    assert_bitwise("K cache", &gk, &ek);
    assert_bitwise("V cache", &gv, &ev);
    for slot in off..off + b {
        let len = s + t * steps;
        let (gk, gv) = graphed.gather_kv_host(0, slot, len).unwrap();
        let (ck, cv) = cpu.gather_kv(0, slot, len).unwrap();
        assert!(rel_err(&gk, &Tensor::new(&[len, ng, hn], ck).unwrap()) <= TOL);
        assert!(rel_err(&gv, &Tensor::new(&[len, ng, hn], cv).unwrap()) <= TOL);
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn graph_decode_gqa_rope_qknorm_matches_eager_bitwise_and_cpu() {
    graph_matches_eager_and_cpu(
        "self, heads=8, gqa=2, head_dim=128, qk_layernorm=rms, rope, mask=causal",
        3,
        37,
        5,
        false,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn graph_decode_window_sinks_mqa_bias_gate_matches_eager_bitwise_and_cpu() {
    graph_matches_eager_and_cpu(
        "self, heads=6, gqa=1, head_dim=64, hidden=320, qkv_bias, output_gate, rope, window=(20, 0), sinks=learnable, mask=causal",
        2,
        300,
        4,
        true,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn graph_multi_token_steps_match_eager_bitwise_and_cpu() {
    // 4 and 16 new tokens per step (one and four 16-row blocks of the decode tile).
    graph_steps_match(
        "self, heads=8, gqa=2, head_dim=128, qk_layernorm=rms, rope, mask=causal",
        3,
        200,
        3,
        false,
        4,
    );
    graph_steps_match(
        "self, heads=8, gqa=2, head_dim=64, rope, window=(30, 0), sinks=learnable, output_gate, \
         mask=causal",
        2,
        90,
        2,
        true,
        16,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn graph_decode_errors_write_nothing() {
    let config = SpecLayer::config_from_str(
        "self, heads=4, gqa=2, head_dim=64, rope, mask=causal",
        &RuntimeDims::default(),
    )
    .unwrap();
    let layer = SpecLayer::init(config.clone(), 7).unwrap();
    let cuda = CudaLayer::new(&layer, &gpu()).unwrap();
    let elem = ElemType::from(config.dtype);
    let st = cuda.runtime().stream();
    let h = config.hidden;
    let args = ForwardArgs::default();
    assert!(matches!(
        cuda.set_decode_splits(Some(0)).unwrap_err(),
        AttnError::InvalidArgument { .. }
    ));
    assert!(matches!(
        cuda.set_decode_splits(Some(65)).unwrap_err(),
        AttnError::InvalidArgument { .. }
    ));
    let mut cache = DeviceStaticKvCache::new(st, elem, 1, 5, 2, 2, 64).unwrap();
    // Capture errors: slots beyond max_batch, zero sequences, explicit positions.
    let e = cuda.capture_decode(&cache, 0, 1, 2, &args).unwrap_err();
    assert!(matches!(e, AttnError::CacheCapacity { .. }), "{e}");
    let e = cuda.capture_decode(&cache, 0, 0, 0, &args).unwrap_err();
    assert!(matches!(e, AttnError::InvalidArgument { .. }), "{e}");
    let pos = [0i64];
    let pargs = ForwardArgs {
        positions: Some(&pos),
        ..ForwardArgs::default()
    };
    let e = cuda.capture_decode(&cache, 0, 0, 2, &pargs).unwrap_err();
    assert!(matches!(e, AttnError::InvalidArgument { .. }), "{e}");
    // 0 or 17 new tokens per replay.
    for t in [0, 17] {
        let e = cuda
            .capture_decode_tokens(&cache, 0, 0, 2, t, &args)
            .unwrap_err();
        assert!(
            matches!(&e, AttnError::InvalidArgument { arg, .. } if arg == "tokens"),
            "{e}"
        );
    }
    // A two-token graph refuses one token's hidden and a step the cache has no room for
    // (4 + 1 rows used below, 5 in all).
    let mut two = cuda
        .capture_decode_tokens(&cache, 0, 0, 2, 2, &args)
        .unwrap();
    let e = two
        .replay(&Tensor::from_fn(&[1, 2, h], |_| 0.5), &mut cache)
        .unwrap_err();
    assert!(matches!(e, AttnError::Shape { .. }), "{e}");

    let x = Tensor::from_fn(&[4, 2, h], |i| (i % 7) as f32 * 0.1);
    cuda.prefill(&x, &mut cache, 0, 0, &args).unwrap();
    cache.advance(0, 2, 4).unwrap();
    let mut graph = cuda.capture_decode(&cache, 0, 0, 2, &args).unwrap();
    // Wrong hidden shape.
    let bad = Tensor::from_fn(&[1, 3, h], |_| 0.5);
    let e = graph.replay(&bad, &mut cache).unwrap_err();
    assert!(matches!(e, AttnError::Shape { .. }), "{e}");
    // Another cache of the same geometry.
    let mut other = DeviceStaticKvCache::new(st, elem, 1, 5, 2, 2, 64).unwrap();
    let x1 = Tensor::from_fn(&[1, 2, h], |i| (i % 5) as f32 * 0.3);
    let e = graph.replay(&x1, &mut other).unwrap_err();
    assert!(matches!(e, AttnError::InvalidArgument { .. }), "{e}");
    assert_eq!(other.visible_len(0, 0).unwrap(), 0);
    // One step fits, the next overflows max_seq and writes nothing (the two-token graph
    // already with one row left).
    graph.replay(&x1, &mut cache).unwrap();
    cache.advance(0, 2, 1).unwrap();
    let x2 = Tensor::from_fn(&[2, 2, h], |_| 0.5);
    let e = two.replay(&x2, &mut cache).unwrap_err();
    assert!(matches!(e, AttnError::CacheCapacity { .. }), "{e}");
    let before = (
        cache.layer_k(0).unwrap().to_host().unwrap(),
        cache.layer_v(0).unwrap().to_host().unwrap(),
    );
    let e = graph.replay(&x1, &mut cache).unwrap_err();
    assert!(matches!(e, AttnError::CacheCapacity { .. }), "{e}");
    assert_eq!(cache.visible_len(0, 0).unwrap(), 5);
    assert_eq!(cache.visible_len(0, 1).unwrap(), 5);
    assert_bitwise(
        "K after overflow",
        &cache.layer_k(0).unwrap().to_host().unwrap(),
        &before.0,
    );
    assert_bitwise(
        "V after overflow",
        &cache.layer_v(0).unwrap().to_host().unwrap(),
        &before.1,
    );
}
