//! Cross-attention over a cached encoder context on the GPU (`CudaLayer::set_context_device`
//! once per request, `cross_step_device` per prefill or decode step) against the CPU
//! reference (`CrossAttentionParts::set_context` / `cross_step`, itself checked against the
//! full cross forward in `kv_cross.rs`): padded contexts of different lengths with junk
//! (NaN, ±Inf, huge values) in their padding and stale longer contexts behind them, a
//! prefill then decode steps all queued before one read-back, two layers, every
//! intermediate NaN-poisoned; the kernel launched is the registry's; typed errors leave the
//! cache untouched.
//! `#[ignore = "requires a CUDA GPU"]`; run through `scripts/gpu-bundle.sh` (CONTRIBUTING.md).

use attention_codegen::registry::{self, Target};
use attention_runtime::cuda::{CudaLayer, DeviceCrossKvCache, DeviceTensor, ElemType};
use attention_runtime::kv_cache::CrossKvCache;
use attention_runtime::modules::SplitMix64;
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{AttentionLayer, AttnError, RuntimeDims, Tensor};

mod common;
use common::{bitwise, fresh_seed, gpu, rel_err};

const TOL: f64 = 1e-2;

struct Layer {
    cpu: SpecLayer,
    cuda: CudaLayer,
}

fn layers(spec: &str, sd: u64, n: usize) -> (Vec<Layer>, ElemType) {
    let config = SpecLayer::config_from_str(spec, &RuntimeDims::default()).unwrap();
    let dev = gpu();
    let ls = (0..n as u64)
        .map(|i| {
            let cpu = SpecLayer::init(config.clone(), sd ^ (0x5eed + i)).unwrap();
            let cuda = CudaLayer::new(&cpu, &dev).unwrap();
            cuda.set_poison_outputs(true);
            Layer { cpu, cuda }
        })
        .collect();
    (ls, ElemType::from(config.dtype))
}

/// Junk values cycled through the padding rows of a context.
const JUNK: [f32; 4] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30];

/// Two cross layers over contexts of `lens` (padded to their max) in slots `off .. off + b`
/// of a cache one slot larger: each slot first holds a stale all-junk context of the cache's
/// full length, then the real one (junk in its padding rows); a prefill of `p` tokens and
/// `steps` decode steps are queued for both layers without a synchronization, then read back
/// and compared with the CPU reference; the cached K/V match too, and the host-tensor step
/// equals the device one bitwise.
fn cross_steps_match_cpu(spec: &str, b: usize, off: usize, lens: &[usize], p: usize, steps: usize) {
    let sd = fresh_seed();
    eprintln!("seed {sd} spec {spec} lens {lens:?} prefill {p} steps {steps}");
    let (ls, elem) = layers(spec, sd, 2);
    let c = ls[0].cpu.config().clone();
    let (h, np, hn) = (c.hidden, c.heads, c.head_dim);
    let st = ls[0].cuda.runtime().stream().clone();
    let mut rng = SplitMix64::new(sd);
    let sk = *lens.iter().max().unwrap();
    let max_ctx = sk + 5;
    let max_batch = off + b + 1;
    let mut cpu = CrossKvCache::new(2, max_ctx, max_batch, np, hn).unwrap();
    let mut dev = DeviceCrossKvCache::new(&st, elem, 2, max_ctx, max_batch, np, hn).unwrap();
    let stale = Tensor::from_fn(&[max_ctx, b, h], |i| JUNK[i % JUNK.len()]);
    let mut ctx = Tensor::from_fn(&[sk, b, h], |_| rng.uniform() * 1.7);
    let mut j = 0;
    for si in 0..sk {
        for (bi, &len) in lens.iter().enumerate() {
            if si >= len {
                for x in &mut ctx.data_mut()[(si * b + bi) * h..][..h] {
                    *x = JUNK[j % JUNK.len()];
                    j += 1;
                }
            }
        }
    }
    let ctx_d = DeviceTensor::from_host(&st, &ctx, elem).unwrap();
    for (li, l) in ls.iter().enumerate() {
        l.cuda.set_context(&stale, &mut dev, li, off, None).unwrap();
        l.cuda
            .set_context_device(&ctx_d, &mut dev, li, off, Some(lens))
            .unwrap();
        l.cpu
            .parts()
            .set_context(&ctx, &mut cpu, li, off, Some(lens))
            .unwrap();
        assert_eq!(dev.context_lens(li).unwrap(), cpu.context_lens(li).unwrap());
    }
    // A prefill then decode steps, both layers, all queued before any read-back.
    let xs: Vec<Tensor> = std::iter::once(p)
        .chain(std::iter::repeat_n(1, steps))
        .map(|s| Tensor::from_fn(&[s, b, h], |_| rng.uniform() * 1.7))
        .collect();
    let xd: Vec<DeviceTensor> = xs
        .iter()
        .map(|x| DeviceTensor::from_host(&st, x, elem).unwrap())
        .collect();
    let mut outs = Vec::new();
    for x in &xd {
        for (li, l) in ls.iter().enumerate() {
            let o = l.cuda.cross_step_device(x, &dev, li, off).unwrap();
            assert_eq!(o.shape(), x.shape());
            outs.push(o);
        }
    }
    let mut outs = outs.into_iter();
    for (step, x) in xs.iter().enumerate() {
        for (li, l) in ls.iter().enumerate() {
            let got = outs.next().unwrap().to_host().unwrap();
            let want = l.cpu.parts().cross_step(x, &cpu, li, off).unwrap().output;
            let e = rel_err(&got, &want);
            assert!(e <= TOL, "step {step} layer {li}: rel err {e}");
            if step == 0 {
                let host = l.cuda.cross_step(x, &dev, li, off).unwrap();
                assert!(bitwise(&host.output, &got), "host step != device step");
                assert_eq!(host.bias.is_some(), c.proj_bias);
            }
        }
    }
    for li in 0..2 {
        for (bi, &len) in lens.iter().enumerate() {
            let (gk, gv) = dev.gather_kv_host(li, off + bi).unwrap();
            let (ck, cv) = cpu.gather_kv(li, off + bi).unwrap();
            let shape = [len, np, hn];
            let e = rel_err(&gk, &Tensor::new(&shape, ck).unwrap())
                .max(rel_err(&gv, &Tensor::new(&shape, cv).unwrap()));
            assert!(e <= TOL, "cached K/V of layer {li} slot {bi}: rel err {e}");
        }
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cross_cache_padded_contexts_long_prefill() {
    // Prefill of 150 queries spans two 128-row blocks; contexts straddle key tiles.
    cross_steps_match_cpu(
        "cross, heads=4, head_dim=64, mask=padding",
        3,
        1,
        &[37, 5, 130],
        150,
        4,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cross_cache_f16_hd128_learnable_sinks() {
    cross_steps_match_cpu(
        "cross, heads=2, head_dim=128, sinks=learnable, dtype=f16, mask=no_mask",
        2,
        0,
        &[200, 1],
        3,
        3,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cross_cache_hd256_window_off_by_one_sink() {
    cross_steps_match_cpu(
        "cross, heads=2, head_dim=256, hidden=384, window=(16, 0), sinks=off_by_one, mask=no_mask",
        2,
        2,
        &[70, 9],
        5,
        2,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cross_cache_hd80_padded_contexts() {
    // Head dim 80 (not a multiple of 32): qkv_prep's cross layout, the context append and the
    // tensor-core step with 5 k16 steps per q.k.
    cross_steps_match_cpu(
        "cross, heads=4, head_dim=80, mask=padding",
        3,
        1,
        &[37, 5, 130],
        70,
        3,
    );
}

/// The attention kernel a step launches is the registry's for this GPU (so a cache built by
/// `attn aot` serves it under `ATTN_JIT=off`); a self-attention layer has none.
#[test]
#[ignore = "requires a CUDA GPU"]
fn cross_step_kernel_is_listed_for_the_device() {
    let dev = gpu();
    let target = Target::from_arch(&dev.arch()).unwrap();
    for spec in [
        "cross, heads=4, head_dim=64, mask=padding",
        "cross, heads=2, head_dim=256, sinks=learnable, mask=no_mask",
    ] {
        let (ls, _) = layers(spec, 1, 1);
        let cfg = ls[0].cpu.config();
        let listed: Vec<String> = registry::kernels_for(&cfg.spec, cfg.head_dim, target)
            .unwrap()
            .iter()
            .map(|c| c.key())
            .collect();
        let key = ls[0].cuda.cross_step_kernel_key();
        assert!(listed.contains(&key), "{spec}: {key} not in {listed:?}");
        assert!(
            listed.iter().any(|k| k.starts_with("append_kv_")),
            "{spec}: {listed:?}"
        );
    }
    let (ls, _) = layers("self, heads=4, head_dim=64, mask=causal", 1, 1);
    assert!(ls[0].cuda.cross_cache_step_config().is_none());
}

/// Every bad input is a typed error naming its argument, raised before anything is queued:
/// the cache's lengths and contents stay as they were.
#[test]
#[ignore = "requires a CUDA GPU"]
fn cross_cache_errors_leave_the_cache_untouched() {
    let sd = fresh_seed();
    let spec = "cross, heads=2, head_dim=64, mask=padding";
    let (ls, elem) = layers(spec, sd, 1);
    let l = &ls[0];
    let c = l.cpu.config().clone();
    let h = c.hidden;
    let st = l.cuda.runtime().stream().clone();
    let mut dev = DeviceCrossKvCache::new(&st, elem, 1, 8, 3, c.heads, c.head_dim).unwrap();
    let ctx = Tensor::from_fn(&[6, 2, h], |i| (i % 11) as f32 * 0.1);
    l.cuda
        .set_context(&ctx, &mut dev, 0, 0, Some(&[6, 2]))
        .unwrap();
    let snap = |d: &DeviceCrossKvCache| {
        let (k, v) = (
            d.layer_k(0).unwrap().to_host().unwrap(),
            d.layer_v(0).unwrap().to_host().unwrap(),
        );
        (k, v, d.context_lens(0).unwrap().to_vec())
    };
    let before = snap(&dev);
    let ctx_d = DeviceTensor::from_host(&st, &ctx, elem).unwrap();
    let x = Tensor::from_fn(&[1, 2, h], |i| (i % 5) as f32 * 0.1);
    let xd = DeviceTensor::from_host(&st, &x, elem).unwrap();
    let arg_of = |e: &AttnError| match e {
        AttnError::InvalidArgument { arg, .. }
        | AttnError::Shape { arg, .. }
        | AttnError::DType { arg, .. }
        | AttnError::CacheCapacity { arg, .. } => arg.clone(),
        other => panic!("unexpected error: {other:?}"),
    };
    let cu = &l.cuda;
    let other_dtype = if elem == ElemType::Bf16 {
        ElemType::F16
    } else {
        ElemType::Bf16
    };
    let mut wrong_heads =
        DeviceCrossKvCache::new(&st, elem, 1, 8, 3, c.heads + 1, c.head_dim).unwrap();
    let mut wrong_dtype =
        DeviceCrossKvCache::new(&st, other_dtype, 1, 8, 3, c.heads, c.head_dim).unwrap();
    let long = DeviceTensor::from_host(&st, &Tensor::zeros(&[9, 2, h]), elem).unwrap();
    let ctx_f32 = DeviceTensor::from_host(&st, &ctx, ElemType::F32).unwrap();
    let ctx_bad = DeviceTensor::from_host(&st, &Tensor::zeros(&[6, 2, h + 1]), elem).unwrap();
    let set_cases: Vec<(&str, AttnError)> = vec![
        (
            "key_value_states",
            cu.set_context_device(&ctx_bad, &mut dev, 0, 0, None)
                .unwrap_err(),
        ),
        (
            "key_value_states",
            cu.set_context_device(&ctx_f32, &mut dev, 0, 0, None)
                .unwrap_err(),
        ),
        (
            "key_value_states",
            cu.set_context(&Tensor::zeros(&[12, h]), &mut dev, 0, 0, None)
                .unwrap_err(),
        ),
        (
            "context_lens",
            cu.set_context_device(&ctx_d, &mut dev, 0, 0, Some(&[6]))
                .unwrap_err(),
        ),
        (
            "context_lens[1]",
            cu.set_context_device(&ctx_d, &mut dev, 0, 0, Some(&[6, 0]))
                .unwrap_err(),
        ),
        (
            "context_lens[0]",
            cu.set_context_device(&ctx_d, &mut dev, 0, 0, Some(&[7, 1]))
                .unwrap_err(),
        ),
        (
            "layer",
            cu.set_context_device(&ctx_d, &mut dev, 1, 0, None)
                .unwrap_err(),
        ),
        (
            "cache",
            cu.set_context_device(&ctx_d, &mut wrong_heads, 0, 0, None)
                .unwrap_err(),
        ),
        (
            "cache",
            cu.set_context_device(&ctx_d, &mut wrong_dtype, 0, 0, None)
                .unwrap_err(),
        ),
    ];
    for (want, e) in &set_cases {
        assert_eq!(&arg_of(e), want, "{e}");
    }
    // Slots past max_batch; a context longer than the cache holds.
    let e = cu
        .set_context_device(&ctx_d, &mut dev, 0, 2, None)
        .unwrap_err();
    assert!(
        matches!(
            e,
            AttnError::CacheCapacity {
                capacity: 3,
                needed: 4,
                ..
            }
        ),
        "{e}"
    );
    let e = cu
        .set_context_device(&long, &mut dev, 0, 0, None)
        .unwrap_err();
    assert!(
        matches!(e, AttnError::CacheCapacity { ref arg, capacity: 8, needed: 9 } if arg.starts_with("max_ctx")),
        "{e}"
    );
    // Steps.
    let x_bad = DeviceTensor::from_host(&st, &Tensor::zeros(&[1, 2, h - 1]), elem).unwrap();
    let x_f32 = DeviceTensor::from_host(&st, &x, ElemType::F32).unwrap();
    let step_cases: Vec<(&str, AttnError)> = vec![
        (
            "hidden",
            cu.cross_step_device(&x_bad, &dev, 0, 0).unwrap_err(),
        ),
        (
            "hidden",
            cu.cross_step_device(&x_f32, &dev, 0, 0).unwrap_err(),
        ),
        (
            "hidden",
            cu.cross_step(&Tensor::zeros(&[2, h]), &dev, 0, 0)
                .unwrap_err(),
        ),
        ("layer", cu.cross_step_device(&xd, &dev, 3, 0).unwrap_err()),
        // Slot 2 holds no context.
        ("cache", cu.cross_step_device(&xd, &dev, 0, 1).unwrap_err()),
        (
            "cache",
            cu.cross_step_device(&xd, &wrong_heads, 0, 0).unwrap_err(),
        ),
        (
            "cache",
            cu.cross_step_device(&xd, &wrong_dtype, 0, 0).unwrap_err(),
        ),
    ];
    for (want, e) in &step_cases {
        assert_eq!(&arg_of(e), want, "{e}");
    }
    let e = cu.cross_step_device(&xd, &dev, 0, 2).unwrap_err();
    assert!(
        matches!(
            e,
            AttnError::CacheCapacity {
                capacity: 3,
                needed: 4,
                ..
            }
        ),
        "{e}"
    );
    // A self-attention layer refuses a context cache.
    let (sl, _) = layers("self, heads=2, head_dim=64, mask=causal", sd, 1);
    let e = sl[0]
        .cuda
        .set_context_device(&ctx_d, &mut dev, 0, 0, None)
        .unwrap_err();
    assert_eq!(arg_of(&e), "config.kind", "{e}");
    let e = sl[0].cuda.cross_step_device(&xd, &dev, 0, 0).unwrap_err();
    assert_eq!(arg_of(&e), "config.kind", "{e}");
    let after = snap(&dev);
    assert!(bitwise(&after.0, &before.0) && bitwise(&after.1, &before.1));
    assert_eq!(after.2, before.2);
    // A finished request: its slot is empty again.
    dev.reset_slots(1, 1).unwrap();
    let e = cu.cross_step_device(&xd, &dev, 0, 0).unwrap_err();
    assert!(e.to_string().contains("batch slot 1"), "{e}");
}
