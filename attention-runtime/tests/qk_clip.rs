//! QK-Clip with the record on the layer (`TrainLayer` for `CpuLayer`): every training forward
//! raises the layer's running per-head max logit, `max_logit_record` reads it, and `clip_qk`
//! rescales the layer's own `linear_qkv` query and key rows exactly as the standalone
//! `QkClip::clip` formula does and resets the record; errors change nothing.

use attention_runtime::backend::{CpuLayer, TrainLayer};
use attention_runtime::layer::AttentionLayer;
use attention_runtime::modules::{Linear, LinearModule, SplitMix64};
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::train::{BackwardOptions, QkClip, Recompute, TrainOptions};
use attention_runtime::*;

fn layer(spec: &str, seed: u64) -> SpecLayer {
    let cfg = SpecLayer::config_from_str(spec, &RuntimeDims::default()).unwrap();
    SpecLayer::init(cfg, seed).unwrap()
}

/// `layer` with `linear_qkv.weight` times `k` (large logits, so a clip has work).
fn scaled(l: &SpecLayer, k: f32) -> SpecLayer {
    let mut sd = l.state_dict("");
    for (name, t) in sd.iter_mut() {
        if name == "linear_qkv.weight" {
            t.data_mut().iter_mut().for_each(|v| *v *= k);
        }
    }
    SpecLayer::load(l.config().clone(), &WeightStore::from_tensors(sd), "").unwrap()
}

fn rand_t(seed: u64, shape: &[usize]) -> Tensor {
    let mut rng = SplitMix64::new(seed);
    Tensor::from_fn(shape, |_| rng.uniform())
}

fn qkv_weight(l: &CpuLayer<SpecLayer>) -> Tensor {
    l.inner()
        .state_dict("")
        .into_iter()
        .find(|(k, _)| k == "linear_qkv.weight")
        .unwrap()
        .1
}

fn max_of(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x.max(*y)).collect()
}

const GQA_GATE: &str = "self, heads=4, gqa=2, head_dim=32, hidden=64, qkv_bias, output_gate, \
                        rope, mask=causal";

#[test]
fn the_record_is_the_running_max_over_micro_batches() {
    let mut cpu = CpuLayer::new(scaled(&layer(GQA_GATE, 1), 4.0));
    assert_eq!(
        cpu.max_logit_record().unwrap(),
        None,
        "nothing observed yet"
    );
    let args = ForwardArgs::default();
    let (_, s1) = cpu
        .forward_train(&rand_t(2, &[7, 2, 64]), &args, &TrainOptions::default())
        .unwrap();
    assert_eq!(
        cpu.max_logit_record().unwrap().as_deref(),
        Some(s1.max_logit())
    );
    // A second micro-batch (selective recompute: the forward records all the same; packed).
    let cu = [0i32, 5, 12];
    let packed = ForwardArgs {
        packed: Some(PackedSeqParams {
            cu_seqlens_q: &cu,
            cu_seqlens_kv: &cu,
            max_seqlen_q: 0,
            max_seqlen_kv: 0,
        }),
        ..ForwardArgs::default()
    };
    let (_, mut s2) = cpu
        .forward_train(
            &rand_t(3, &[12, 64]),
            &packed,
            &TrainOptions {
                recompute: Recompute::CoreAttention,
            },
        )
        .unwrap();
    let want = max_of(s1.max_logit(), s2.max_logit());
    assert_ne!(
        want,
        s1.max_logit(),
        "the second micro-batch raises some head"
    );
    assert_eq!(cpu.max_logit_record().unwrap(), Some(want.clone()));
    // The backward (and its recompute of core attention) does not record.
    let dy = rand_t(4, &[12, 64]);
    cpu.backward(&mut s2, &dy, &BackwardOptions::default())
        .unwrap();
    assert_eq!(cpu.max_logit_record().unwrap(), Some(want.clone()));
    // Neither does the inference forward.
    attention_runtime::backend::BackendLayer::forward(&cpu, &rand_t(5, &[7, 2, 64]), &args)
        .unwrap();
    assert_eq!(cpu.max_logit_record().unwrap(), Some(want.clone()));
    // A clone carries the record; clipping one leaves the other's alone.
    let copy = cpu.clone();
    cpu.clip_qk(1e6, 0.5).unwrap();
    assert_eq!(cpu.max_logit_record().unwrap(), None);
    assert_eq!(copy.max_logit_record().unwrap(), Some(want));
}

#[test]
fn clip_matches_the_standalone_formula_and_resets() {
    for (spec, alpha) in [
        (GQA_GATE, 0.5f32),
        (
            "self, heads=4, gqa=1, head_dim=32, hidden=64, qk_layernorm=rms, mask=causal",
            0.25,
        ),
    ] {
        let base = scaled(&layer(spec, 11), 5.0);
        let mut cpu = CpuLayer::new(base.clone());
        let mut rec = QkClip::new();
        for seed in [12, 13] {
            let (_, s) = cpu
                .forward_train(
                    &rand_t(seed, &[6, 2, 64]),
                    &ForwardArgs::default(),
                    &TrainOptions::default(),
                )
                .unwrap();
            rec.observe(s.max_logit()).unwrap();
        }
        let record = cpu.max_logit_record().unwrap().unwrap();
        assert_eq!(rec.record().unwrap(), record.as_slice());
        // A threshold below the smallest group max clips every group; each group's rows
        // are scaled per the formula.
        let c = cpu.inner().config().clone();
        let per = c.heads / c.groups;
        let gmax: Vec<f32> = record
            .chunks(per)
            .map(|g| g.iter().copied().fold(f32::NEG_INFINITY, f32::max))
            .collect();
        let threshold = gmax.iter().copied().fold(f32::INFINITY, f32::min) * 0.5;
        let before = qkv_weight(&cpu);
        let mut want_w = before.clone();
        let want = rec.clip(&c, &mut want_w, threshold, alpha).unwrap();
        let got = cpu.clip_qk(threshold, alpha).unwrap();
        assert_eq!(got, want);
        assert_eq!(got.clipped, (0..c.groups).collect::<Vec<_>>());
        assert_eq!(got.group_max, gmax);
        let after = qkv_weight(&cpu);
        assert_eq!(after, want_w, "{spec}: the layer's weight is the formula's");
        assert_ne!(after, before);
        assert_eq!(
            cpu.max_logit_record().unwrap(),
            None,
            "reset after the clip"
        );
        // Biases and every other parameter are untouched.
        let (b0, b1) = (base.state_dict(""), cpu.inner().state_dict(""));
        for ((k0, t0), (k1, t1)) in b0.iter().zip(&b1) {
            assert_eq!(k0, k1);
            if k0 != "linear_qkv.weight" {
                assert_eq!(t0, t1, "{k0} changed");
            }
        }
        // Value (and gate) rows are untouched, query rows scaled by eta^alpha.
        let (hn, h) = (c.head_dim, c.hidden);
        let gw = if c.output_gate { per * hn } else { 0 };
        let gcols = per * hn + gw + 2 * hn;
        for (g, &m) in gmax.iter().enumerate() {
            let eta = (threshold as f64) / (m as f64);
            for r in 0..gcols {
                let row = g * gcols + r;
                let f = if r < per * hn {
                    eta.powf(alpha as f64)
                } else if r < per * hn + gw {
                    1.0
                } else if r < per * hn + gw + hn {
                    eta.powf(1.0 - alpha as f64)
                } else {
                    1.0
                };
                for j in 0..h {
                    let (a, b) = (before.data()[row * h + j], after.data()[row * h + j]);
                    assert_eq!(b, (a as f64 * f) as f32, "row {row}");
                }
            }
        }
    }
}

#[test]
fn clip_without_a_record_or_below_the_threshold_changes_no_weight() {
    let mut cpu = CpuLayer::new(layer(GQA_GATE, 21));
    let w0 = qkv_weight(&cpu);
    let r = cpu.clip_qk(100.0, 0.5).unwrap();
    assert!(r.clipped.is_empty() && r.group_max.iter().all(|m| *m == f32::NEG_INFINITY));
    assert_eq!(r.eta, vec![1.0; 2]);
    cpu.forward_train(
        &rand_t(22, &[5, 1, 64]),
        &ForwardArgs::default(),
        &TrainOptions::default(),
    )
    .unwrap();
    let r = cpu.clip_qk(1e9, 0.5).unwrap();
    assert!(r.clipped.is_empty() && r.group_max.iter().all(|m| m.is_finite()));
    assert_eq!(qkv_weight(&cpu), w0);
    assert_eq!(
        cpu.max_logit_record().unwrap(),
        None,
        "reset also without a clip"
    );
}

#[test]
fn bad_threshold_or_alpha_changes_nothing() {
    let mut cpu = CpuLayer::new(scaled(&layer(GQA_GATE, 31), 4.0));
    cpu.forward_train(
        &rand_t(32, &[6, 2, 64]),
        &ForwardArgs::default(),
        &TrainOptions::default(),
    )
    .unwrap();
    let (w0, r0) = (qkv_weight(&cpu), cpu.max_logit_record().unwrap());
    for (t, a, arg) in [
        (0.0, 0.5, "threshold"),
        (-1.0, 0.5, "threshold"),
        (f32::NAN, 0.5, "threshold"),
        (f32::INFINITY, 0.5, "threshold"),
        (1.0, -0.1, "alpha"),
        (1.0, 1.5, "alpha"),
        (1.0, f32::NAN, "alpha"),
    ] {
        let e = cpu.clip_qk(t, a).unwrap_err();
        assert!(
            matches!(&e, AttnError::InvalidArgument { arg: got, .. } if got == arg),
            "({t}, {a}): {e}"
        );
        assert_eq!(qkv_weight(&cpu), w0);
        assert_eq!(
            cpu.max_logit_record().unwrap(),
            r0,
            "a refused clip keeps the record"
        );
    }
}

#[test]
fn cross_attention_cannot_be_clipped() {
    let mut cpu = CpuLayer::new(layer(
        "cross, heads=2, head_dim=32, hidden=64, mask=no_mask",
        41,
    ));
    let ctx = rand_t(42, &[5, 1, 64]);
    let args = ForwardArgs {
        key_value_states: Some(&ctx),
        ..ForwardArgs::default()
    };
    cpu.forward_train(&rand_t(43, &[3, 1, 64]), &args, &TrainOptions::default())
        .unwrap();
    let r0 = cpu.max_logit_record().unwrap();
    assert!(r0.is_some(), "cross-attention records its logits too");
    let sd0 = cpu.inner().state_dict("");
    let e = cpu.clip_qk(1.0, 0.5).unwrap_err();
    assert!(
        matches!(&e, AttnError::InvalidArgument { arg, .. } if arg == "config.kind"),
        "{e}"
    );
    assert_eq!(cpu.inner().state_dict(""), sd0);
    assert_eq!(cpu.max_logit_record().unwrap(), r0);
}

/// A hand-written layer that does not hand out its `linear_qkv` (the trait's default), and a
/// `linear_qkv` type without `weight_mut`: both are `NoBackendImpl` and change nothing.
#[test]
fn a_layer_without_a_mutable_linear_qkv_is_a_typed_error() {
    struct Opaque(Linear);
    impl LinearModule for Opaque {
        fn in_features(&self) -> usize {
            self.0.in_features()
        }
        fn out_features(&self) -> usize {
            self.0.out_features()
        }
        fn forward(&self, x: &Tensor) -> Result<Tensor> {
            self.0.forward(x)
        }
        fn bias(&self) -> Option<&Tensor> {
            self.0.bias()
        }
        fn train(&self) -> Option<&dyn attention_runtime::modules::TrainSubmodule> {
            self.0.train()
        }
        fn state_dict(&self) -> Vec<(String, Tensor)> {
            self.0.state_dict()
        }
    }
    /// `SpecLayer`'s parts with an `Opaque` linear_qkv; `hand_out` says whether
    /// `linear_qkv_mut` hands it out.
    struct Wrapped {
        inner: SpecLayer,
        qkv: Opaque,
        hand_out: bool,
    }
    impl AttentionLayer for Wrapped {
        fn config(&self) -> &LayerConfig {
            self.inner.config()
        }
        fn parts(&self) -> LayerParts<'_> {
            match self.inner.parts() {
                LayerParts::SelfAttention(mut p) => {
                    p.linear_qkv = &self.qkv;
                    LayerParts::SelfAttention(p)
                }
                other => other,
            }
        }
        fn linear_qkv_mut(&mut self) -> Option<&mut dyn LinearModule> {
            if self.hand_out {
                Some(&mut self.qkv)
            } else {
                None
            }
        }
    }
    for hand_out in [false, true] {
        let inner = scaled(&layer(GQA_GATE, 51), 4.0);
        let sd = inner.state_dict("");
        let w = sd.iter().find(|(k, _)| k == "linear_qkv.weight").unwrap();
        let b = sd.iter().find(|(k, _)| k == "linear_qkv.bias").unwrap();
        let qkv = Opaque(Linear::new(w.1.clone(), Some(b.1.clone())).unwrap());
        let mut cpu = CpuLayer::new(Wrapped {
            inner,
            qkv,
            hand_out,
        });
        cpu.forward_train(
            &rand_t(52, &[6, 2, 64]),
            &ForwardArgs::default(),
            &TrainOptions::default(),
        )
        .unwrap();
        let (sd0, r0) = (cpu.inner().state_dict(""), cpu.max_logit_record().unwrap());
        let e = cpu.clip_qk(1.0, 0.5).unwrap_err();
        assert!(
            matches!(&e, AttnError::NoBackendImpl { role, .. } if role == "linear_qkv"),
            "{e}"
        );
        assert_eq!(cpu.inner().state_dict(""), sd0);
        assert_eq!(cpu.max_logit_record().unwrap(), r0);
    }
}

/// A NaN max logit (a diverged forward) sticks in the record and the clip refuses it,
/// changing no weight and keeping the record; an empty slice is refused by `observe`.
#[test]
fn a_nan_record_is_refused_and_an_empty_observation_too() {
    let l = layer(
        "self, heads=4, gqa=2, head_dim=32, hidden=64, mask=causal",
        3,
    );
    let cfg = l.config().clone();
    let mut w = l
        .state_dict("")
        .into_iter()
        .find(|(k, _)| k == "linear_qkv.weight")
        .unwrap()
        .1;
    let before = w.clone();
    let mut rec = QkClip::new();
    assert!(matches!(rec.observe(&[]), Err(AttnError::Shape { arg, .. }) if arg == "max_logit"));
    assert!(
        rec.record().is_none(),
        "a refused observation records nothing"
    );
    rec.observe(&[1e4, f32::NAN, 2.0, 3.0]).unwrap();
    // A later finite value does not wash the NaN out.
    rec.observe(&[1.0, 5e4, 2.0, 3.0]).unwrap();
    assert!(rec.record().unwrap()[1].is_nan());
    let r = rec.clip(&cfg, &mut w, 100.0, 0.5);
    assert!(
        matches!(&r, Err(AttnError::InvalidArgument { arg, got, .. }) if arg == "record" && got.contains("head 1")),
        "{r:?}"
    );
    assert_eq!(w, before, "a refused clip changes no weight");
    assert!(rec.record().is_some(), "a refused clip keeps the record");
    rec.reset();
    rec.observe(&[1e4, 1.0, 2.0, 3.0]).unwrap();
    let rep = rec.clip(&cfg, &mut w, 100.0, 0.5).unwrap();
    assert_eq!(rep.clipped, vec![0]);
}
