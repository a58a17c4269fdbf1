//! Context-parallel training on the CPU reference with the in-process communicator: every
//! rank's [`CpLayer::forward_train`] / [`CpLayer::backward`] on its chunks (`r` and
//! `2 cp - 1 - r`) of every sequence must give, within f32 rounding, the single-rank
//! layer's output, its input gradient's rows (put back in order), and the single-rank
//! parameter gradients (summed over the group, on every rank), for `p2p`, `all_gather` and
//! `a2a`, CP = 2, 3, 4 where the heads allow, causal / no mask / sliding window, learnable
//! and off-by-one sinks, q/k norms, output gate, rope, padded and packed sequences; delayed
//! weight gradients and selective recompute; and one test per error class. Also the dense
//! form of the GPU plan's `Band` masks that the CUDA backward reads
//! ([`attention_runtime::parallel::cp_plan::Launch::dense_band`]).

mod parallel_common;

use std::collections::BTreeMap;

use attention_codegen::MaskType;
use attention_runtime::backend::{CpuLayer, TrainLayer};
use attention_runtime::modules::SplitMix64;
use attention_runtime::parallel::{Communicator, CpCommType, CpLayer, CpLayout, InProcessComm};
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::train::{BackwardOptions, LayerGrads, Recompute, TrainOptions};
use attention_runtime::{AttentionLayer, AttnError, ForwardArgs, PackedSeqParams, Tensor};
use parallel_common::{assert_close, layer, rand_t, ranks, TIMEOUT};

/// Specs and the context-parallel sizes to run them at.
const SPECS: [(&str, &[usize]); 5] = [
    (
        "self, heads=4, gqa=2, head_dim=8, hidden=16, qk_layernorm=rms, rope, qkv_bias, mask=causal",
        &[2, 4],
    ),
    (
        "self, heads=6, gqa=3, head_dim=4, hidden=12, qk_layernorm=layer, output_gate, sinks=learnable, mask=causal",
        &[3],
    ),
    (
        "self, heads=4, gqa=4, head_dim=4, hidden=8, rope, sinks=off_by_one, window=(3, 0), mask=causal",
        &[2, 4],
    ),
    (
        "self, heads=2, gqa=2, head_dim=8, hidden=8, window=(2, 3), sinks=learnable, mask=no_mask",
        &[2],
    ),
    (
        "self, heads=4, gqa=2, head_dim=4, hidden=8, qkv_bias, rope=interleaved, mask=no_mask",
        &[2, 3],
    ),
];

fn a2a_fits(l: &SpecLayer, cp: usize) -> bool {
    let c = l.config();
    c.heads.is_multiple_of(cp) && c.groups.is_multiple_of(cp)
}

/// The single-rank output and gradients.
fn single(
    full: &SpecLayer,
    x: &Tensor,
    dy: &Tensor,
    args: &ForwardArgs<'_>,
) -> (Tensor, LayerGrads<Tensor>, Vec<f32>) {
    let l = CpuLayer::new(full.clone());
    let (y, mut saved) = l.forward_train(x, args, &TrainOptions::default()).unwrap();
    let ml = saved.max_logit().to_vec();
    let g = l
        .backward(&mut saved, dy, &BackwardOptions::default())
        .unwrap();
    (y, g, ml)
}

/// One rank's result: output rows, gradients, max logit.
type RankOut = (Tensor, LayerGrads<Tensor>, Vec<f32>);

/// Every rank's training step on its share of `x` / `dy`.
fn cp_step(
    full: &SpecLayer,
    ty: CpCommType,
    cp: usize,
    (x, dy): (&Tensor, &Tensor),
    args: &ForwardArgs<'_>,
    opts: (TrainOptions, BackwardOptions),
) -> Vec<RankOut> {
    let cu = args.packed.map(|p| p.cu_seqlens_q);
    ranks(cp, |c| {
        let layout = CpLayout::new(c.rank(), cp)?;
        let l = CpLayer::new(full.clone(), c, ty)?;
        let (y, mut saved) = l.forward_train(&layout.split(x, cu)?, args, &opts.0)?;
        assert_eq!(y, l.forward(&layout.split(x, cu)?, args)?.output, "bitwise");
        let ml = saved.max_logit().to_vec();
        let mut g = l.backward(&mut saved, &layout.split(dy, cu)?, &opts.1)?;
        if opts.1.delay_wgrad {
            assert!(saved.wgrad_pending());
            g.params.extend(l.backward_dw(&mut saved)?);
        }
        assert_eq!(saved.saved_bytes(), 0);
        Ok((y, g, ml))
    })
}

fn check(
    what: &str,
    out: Vec<RankOut>,
    cu: Option<&[i32]>,
    want: &(Tensor, LayerGrads<Tensor>, Vec<f32>),
) {
    let cp = out.len();
    let lay = CpLayout::new(0, cp).unwrap();
    let ys: Vec<Tensor> = out.iter().map(|o| o.0.clone()).collect();
    assert_close(
        &format!("{what} output"),
        &lay.unsplit(&ys, cu).unwrap(),
        &want.0,
    );
    let dx: Vec<Tensor> = out.iter().map(|o| o.1.grad_input.clone()).collect();
    assert_close(
        &format!("{what} grad_input"),
        &lay.unsplit(&dx, cu).unwrap(),
        &want.1.grad_input,
    );
    for (r, (_, g, ml)) in out.iter().enumerate() {
        assert_eq!(
            g.params.keys().collect::<Vec<_>>(),
            want.1.params.keys().collect::<Vec<_>>(),
            "{what} rank {r} parameter names"
        );
        for (name, t) in &g.params {
            assert_close(&format!("{what} rank {r} {name}"), t, &want.1.params[name]);
        }
        assert!(g.grad_key_value_states.is_none() && g.grad_attention_bias.is_none());
        assert_eq!(ml, &want.2, "{what} rank {r} max logit");
    }
}

fn packed_args(cu: &[i32]) -> ForwardArgs<'_> {
    ForwardArgs {
        packed: Some(PackedSeqParams {
            cu_seqlens_q: cu,
            cu_seqlens_kv: &[],
            max_seqlen_q: 0,
            max_seqlen_kv: 0,
        }),
        ..Default::default()
    }
}

#[test]
fn every_comm_type_equals_the_single_rank_backward() {
    for (i, (spec, cps)) in SPECS.iter().enumerate() {
        let full = layer(spec, 800 + i as u64);
        let h = full.config().hidden;
        let mut rng = SplitMix64::new(900 + i as u64);
        for &cp in *cps {
            let x = rand_t(&mut rng, &[4 * cp, 2, h], 1.0);
            let dy = rand_t(&mut rng, &[4 * cp, 2, h], 1.0);
            let xp = rand_t(&mut rng, &[6 * cp, h], 1.0);
            let dyp = rand_t(&mut rng, &[6 * cp, h], 1.0);
            let cu = [0, 2 * cp as i32, 6 * cp as i32];
            let packed = packed_args(&cu);
            let want = single(&full, &x, &dy, &ForwardArgs::default());
            let want_p = single(&full, &xp, &dyp, &packed);
            for ty in CpCommType::ALL {
                if ty == CpCommType::A2a && !a2a_fits(&full, cp) {
                    continue;
                }
                let what = format!("{spec} cp={cp} {ty}");
                let d = Default::default();
                let out = cp_step(&full, ty, cp, (&x, &dy), &ForwardArgs::default(), d);
                check(&format!("{what} padded"), out, None, &want);
                let out = cp_step(&full, ty, cp, (&xp, &dyp), &packed, d);
                check(&format!("{what} packed"), out, Some(&cu), &want_p);
            }
        }
    }
}

#[test]
fn positions_mask_override_delayed_wgrad_and_recompute() {
    let full = layer(SPECS[0].0, 31);
    let mut rng = SplitMix64::new(32);
    let x = rand_t(&mut rng, &[8, 1, 16], 1.0);
    let dy = rand_t(&mut rng, &[8, 1, 16], 1.0);
    let positions: Vec<i64> = (0..8).map(|i| 3 * i + 5).collect();
    for mask in [None, Some(MaskType::NoMask)] {
        let args = ForwardArgs {
            positions: Some(&positions),
            mask_type: mask,
            ..Default::default()
        };
        let want = single(&full, &x, &dy, &args);
        for ty in CpCommType::ALL {
            let plain = cp_step(&full, ty, 2, (&x, &dy), &args, Default::default());
            let other = cp_step(
                &full,
                ty,
                2,
                (&x, &dy),
                &args,
                (
                    TrainOptions {
                        recompute: Recompute::CoreAttention,
                    },
                    BackwardOptions {
                        delay_wgrad: true,
                        ..Default::default()
                    },
                ),
            );
            // Delayed weight gradients and recompute change nothing, bit for bit.
            for (a, b) in plain.iter().zip(&other) {
                assert_eq!(a.1, b.1, "{ty} {mask:?}");
            }
            check(&format!("{ty} {mask:?}"), plain, None, &want);
        }
    }
}

fn assert_arg(e: &AttnError, want: &str) {
    assert!(
        matches!(e, AttnError::InvalidArgument { arg, .. } if arg == want),
        "{e}"
    );
}

#[test]
fn bad_forward_train_inputs_are_typed_errors_on_every_rank() {
    let full = layer(SPECS[0].0, 51);
    let x = Tensor::zeros(&[4, 1, 16]);
    let bias = Tensor::zeros(&[1, 1, 8, 8]);
    let cases: Vec<(ForwardArgs<'_>, Tensor, &str)> = vec![
        (
            ForwardArgs {
                attention_bias: Some(&bias),
                ..Default::default()
            },
            x.clone(),
            "attention_mask/attention_bias",
        ),
        (
            ForwardArgs {
                mask_type: Some(MaskType::Arbitrary),
                ..Default::default()
            },
            x.clone(),
            "mask_type",
        ),
        // s = 6 does not split into 2 cp = 4 chunks.
        (ForwardArgs::default(), Tensor::zeros(&[3, 1, 16]), "hidden"),
    ];
    for (args, x, want) in &cases {
        for ty in CpCommType::ALL {
            for e in ranks(2, |c| {
                let l = CpLayer::new(full.clone(), c, ty)?;
                Ok(l.forward_train(x, args, &TrainOptions::default())
                    .unwrap_err())
            }) {
                assert_arg(&e, want);
            }
        }
    }
    // A packed hidden of the wrong rank.
    let cu = [0, 8];
    for e in ranks(2, |c| {
        let l = CpLayer::new(full.clone(), c, CpCommType::P2p)?;
        Ok(
            l.forward_train(&x, &packed_args(&cu), &TrainOptions::default())
                .unwrap_err(),
        )
    }) {
        assert!(
            matches!(&e, AttnError::Shape { arg, .. } if arg == "hidden"),
            "{e}"
        );
    }
}

#[test]
fn backward_misuse_is_a_typed_error_and_changes_nothing() {
    let full = layer(SPECS[0].0, 61);
    let mut rng = SplitMix64::new(62);
    let x = rand_t(&mut rng, &[8, 1, 16], 1.0);
    let dy = rand_t(&mut rng, &[8, 1, 16], 1.0);
    let want = single(&full, &x, &dy, &ForwardArgs::default());
    for ty in CpCommType::ALL {
        let out = ranks(2, |c| {
            let layout = CpLayout::new(c.rank(), 2)?;
            let l = CpLayer::new(full.clone(), c, ty)?;
            let xs = layout.split(&x, None)?;
            let (y, mut saved) = l.forward_train(&xs, &Default::default(), &Default::default())?;
            let opts = BackwardOptions::default();
            // grad_output of another shape.
            let e = l
                .backward(&mut saved, &Tensor::zeros(&[4, 2, 16]), &opts)
                .unwrap_err();
            assert!(
                matches!(&e, AttnError::Shape { arg, .. } if arg == "grad_output"),
                "{e}"
            );
            // backward_dw before a delayed backward.
            let e = l.backward_dw(&mut saved).unwrap_err();
            assert!(matches!(e, AttnError::TrainState { .. }), "{e}");
            // A context of another group (cp = 1) is refused by that group's layer.
            let solo = InProcessComm::group(1, TIMEOUT)?.pop().unwrap();
            let other = CpLayer::new(full.clone(), solo, ty)?;
            let e = other.backward(&mut saved, &y, &opts).unwrap_err();
            assert_arg(&e, "saved");
            // Nothing was consumed: the backward still runs, once.
            let g = l.backward(&mut saved, &layout.split(&dy, None)?, &opts)?;
            let e = l
                .backward(&mut saved, &layout.split(&dy, None)?, &opts)
                .unwrap_err();
            assert!(matches!(e, AttnError::TrainState { .. }), "{e}");
            Ok((y, g, saved.max_logit().to_vec()))
        });
        check(&format!("{ty} after errors"), out, None, &want);
    }
}

#[test]
fn parameter_gradients_are_the_same_bits_on_every_rank() {
    let full = layer(SPECS[1].0, 71);
    let mut rng = SplitMix64::new(72);
    let x = rand_t(&mut rng, &[12, 1, 12], 1.0);
    let dy = rand_t(&mut rng, &[12, 1, 12], 1.0);
    for ty in [CpCommType::P2p, CpCommType::AllGather, CpCommType::A2a] {
        let out = cp_step(
            &full,
            ty,
            3,
            (&x, &dy),
            &Default::default(),
            Default::default(),
        );
        let first: &BTreeMap<String, Tensor> = &out[0].1.params;
        for o in &out[1..] {
            assert_eq!(&o.1.params, first, "{ty}");
        }
    }
}

#[test]
fn dense_band_masks_of_the_cuda_backward_match_the_visibility() {
    use attention_codegen::Window;
    use attention_runtime::parallel::cp_plan::Visibility;
    use attention_runtime::parallel::cp_plan::{all_gather_jobs, p2p_jobs, pack, KernelKind};
    let mut bands = 0;
    for (mask, w) in [
        (MaskType::Causal, Window { left: 5, right: 0 }),
        (MaskType::NoMask, Window { left: 4, right: 3 }),
    ] {
        let vis = Visibility::new(mask, Some(w)).unwrap();
        for cp in [2, 3] {
            // Two sequences of 4 cp and 8 cp tokens: local rows 4 and 8 per rank.
            let local_cu = [0, 4, 12];
            for rank in 0..cp {
                let layout = CpLayout::new(rank, cp).unwrap();
                let mut jobs = all_gather_jobs(layout, &local_cu, vis);
                for from in 0..cp {
                    jobs.extend(p2p_jobs(layout, &local_cu, from, vis));
                }
                for l in pack(jobs).unwrap() {
                    if l.kind != KernelKind::Band {
                        continue;
                    }
                    bands += 1;
                    let d = l.dense_band(vis);
                    assert_eq!(d.len(), l.items() * l.max_q * l.max_k);
                    for v in 0..l.items() {
                        let sq = (l.cu_q[v + 1] - l.cu_q[v]) as usize;
                        let sk = (l.cu_k[v + 1] - l.cu_k[v]) as usize;
                        for i in 0..sq {
                            for j in 0..sk {
                                let delta = l.delta0[v] + j as i64 - i as i64;
                                assert_eq!(
                                    d[(v * l.max_q + i) * l.max_k + j] != 0,
                                    !vis.sees(delta),
                                    "{mask:?} cp={cp} rank={rank} item {v} ({i}, {j})"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(bands > 0, "no Band launch was planned");
}
