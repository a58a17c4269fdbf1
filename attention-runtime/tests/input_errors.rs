//! Bad input that a review as a new user found reaching a panic, an abort or being ignored:
//! sizes that overflow or cannot be allocated, a cache step's `mask_type`, a diverged QK-Clip
//! record of +inf, and a 0-d tensor given to the context-parallel layout. Each is now a typed
//! error naming the argument, and nothing already stored changes.

use attention_codegen::MaskType;
use attention_runtime::backend::{BackendLayer, CpuLayer, TrainLayer};
use attention_runtime::kv_cache::StaticKvCache;
use attention_runtime::parallel::CpLayout;
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{AttentionLayer, AttnError, ForwardArgs, RuntimeDims, Tensor};

fn arg_of(e: &AttnError) -> &str {
    match e {
        AttnError::InvalidArgument { arg, .. } | AttnError::Shape { arg, .. } => arg,
        other => panic!("expected InvalidArgument or Shape, got {other}"),
    }
}

#[test]
fn tensor_shapes_whose_size_overflows_are_errors() {
    let e = Tensor::new(&[usize::MAX, 2], vec![0.0; 6]).unwrap_err();
    assert_eq!(arg_of(&e), "shape", "{e}");
    // Would wrap to 0 elements without the check.
    let e = Tensor::new(&[1 << 32, 1 << 32, 1], vec![]).unwrap_err();
    assert_eq!(arg_of(&e), "shape", "{e}");
    let e = Tensor::zeros(&[2, 3])
        .reshape(&[usize::MAX, 3])
        .unwrap_err();
    assert_eq!(arg_of(&e), "shape", "{e}");
    let e = Tensor::try_from_fn(&[usize::MAX / 2, 4], |_| 0.0).unwrap_err();
    assert_eq!(arg_of(&e), "shape", "{e}");
    // An element count that fits but that no host can allocate.
    let e = Tensor::try_from_fn(&[1 << 60], |_| 0.0).unwrap_err();
    assert_eq!(arg_of(&e), "shape", "{e}");
    assert_eq!(
        Tensor::try_from_fn(&[2, 2], |i| i as f32).unwrap().data(),
        [0.0, 1.0, 2.0, 3.0]
    );
}

#[test]
fn layer_sizes_that_overflow_or_cannot_be_allocated_are_errors() {
    let e = SpecLayer::config_from_str(
        "self, heads = 288230376151711744, head_dim = 64, mask = causal",
        &RuntimeDims::default(),
    )
    .unwrap_err();
    assert_eq!(arg_of(&e), "heads / head_dim / hidden", "{e}");
    let dims = RuntimeDims {
        heads: Some(usize::MAX),
        head_dim: Some(64),
        ..Default::default()
    };
    let e = SpecLayer::config_from_str("self, mask = causal", &dims).unwrap_err();
    assert_eq!(arg_of(&e), "heads / head_dim / hidden", "{e}");
    // Fits in usize, but its weights (~5.4e16 bytes) cannot be allocated: an error, not an
    // abort of the process.
    let dims = RuntimeDims {
        heads: Some(1 << 20),
        head_dim: Some(64),
        hidden: Some(1 << 26),
        ..Default::default()
    };
    let cfg = SpecLayer::config_from_str("self, mask = causal", &dims).unwrap();
    let e = SpecLayer::init(cfg, 0).unwrap_err();
    assert_eq!(arg_of(&e), "shape", "{e}");
}

fn small_layer() -> SpecLayer {
    let cfg = SpecLayer::config_from_str(
        "self, heads = 2, head_dim = 32, mask = causal",
        &RuntimeDims::default(),
    )
    .unwrap();
    SpecLayer::init(cfg, 1).unwrap()
}

#[test]
fn a_cache_step_refuses_a_mask_type_it_cannot_honour() {
    let l = CpuLayer::new(small_layer());
    let mut cache = StaticKvCache::new(1, 8, 1, 2, 32).unwrap();
    let before = cache.clone();
    let x = Tensor::zeros(&[2, 1, 64]);
    for m in [
        MaskType::Padding,
        MaskType::PaddingCausal,
        MaskType::Arbitrary,
        MaskType::NoMask,
    ] {
        let args = ForwardArgs {
            mask_type: Some(m),
            ..Default::default()
        };
        let e = l.prefill(&x, &mut cache, 0, 0, &args).unwrap_err();
        assert_eq!(arg_of(&e), "args.mask_type", "{m:?}: {e}");
        assert_eq!(cache, before, "{m:?}: the cache changed");
    }
    // The step's own visibility is accepted.
    for m in [MaskType::Causal, MaskType::CausalBottomRight] {
        let mut c = before.clone();
        let args = ForwardArgs {
            mask_type: Some(m),
            ..Default::default()
        };
        l.prefill(&x, &mut c, 0, 0, &args).unwrap();
    }
}

#[test]
fn a_qk_clip_record_of_plus_infinity_is_refused() {
    let mut l = CpuLayer::new(small_layer());
    let w0 = l.inner().state_dict("");
    for bad in [f32::INFINITY, f32::NAN] {
        let e = l
            .clip_qk_with_record(Some(&[1.0, bad]), 10.0, 0.5)
            .unwrap_err();
        assert_eq!(arg_of(&e), "record", "{bad}: {e}");
        assert_eq!(l.inner().state_dict(""), w0, "{bad}: weights changed");
    }
    // -inf is a head that saw no key: accepted, nothing clipped.
    let r = l
        .clip_qk_with_record(Some(&[f32::NEG_INFINITY, 1.0]), 10.0, 0.5)
        .unwrap();
    assert!(r.clipped.is_empty());
}

#[test]
fn cp_layout_split_of_a_0d_tensor_is_an_error() {
    let e = CpLayout::new(0, 2)
        .unwrap()
        .split(&Tensor::zeros(&[]), None)
        .unwrap_err();
    assert_eq!(arg_of(&e), "full", "{e}");
}

#[test]
fn a_rope_scale_that_is_not_finite_is_refused() {
    let cfg = SpecLayer::config_from_str(
        "self, heads = 2, head_dim = 32, rope, mask = causal",
        &RuntimeDims::default(),
    )
    .unwrap();
    let l = CpuLayer::new(SpecLayer::init(cfg, 3).unwrap());
    let x = Tensor::zeros(&[2, 1, 64]);
    let mut cache = StaticKvCache::new(1, 8, 1, 2, 32).unwrap();
    let before = cache.clone();
    for bad in [f32::NAN, f32::INFINITY] {
        let args = ForwardArgs {
            rope_mscale: bad,
            ..Default::default()
        };
        let e = l.forward(&x, &args).unwrap_err();
        assert_eq!(arg_of(&e), "args.rope_mscale", "{bad}: {e}");
        let e = l.prefill(&x, &mut cache, 0, 0, &args).unwrap_err();
        assert_eq!(arg_of(&e), "args.rope_mscale", "{bad}: {e}");
        assert_eq!(cache, before);
    }
}

#[test]
fn a_cache_step_of_zero_sequences_names_hidden() {
    let l = CpuLayer::new(small_layer());
    let mut cache = StaticKvCache::new(1, 8, 1, 2, 32).unwrap();
    let e = l
        .prefill(
            &Tensor::zeros(&[1, 0, 64]),
            &mut cache,
            0,
            0,
            &ForwardArgs::default(),
        )
        .unwrap_err();
    assert_eq!(arg_of(&e), "hidden", "{e}");
}
