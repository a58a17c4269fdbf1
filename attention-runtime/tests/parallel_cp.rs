//! Context parallelism on the CPU reference with the in-process communicator: each rank's
//! [`CpLayer`] forward on its chunks (`r` and `2 cp - 1 - r`) of every sequence, put back in
//! order, must give the single-rank layer's output within f32 rounding, for `p2p`,
//! `all_gather` and `a2a`, CP = 2, 3, 4 where the heads allow, causal / no mask / sliding
//! window, sinks, rope at given positions, padded and packed sequences; tensor and context
//! parallelism together (TP = 2 x CP = 2); and one test per error class.

mod parallel_common;

use attention_runtime::backend::{BackendLayer, CpuLayer};
use attention_runtime::modules::SplitMix64;
use attention_runtime::parallel::tp_load::shard_layer;
use attention_runtime::parallel::{
    Communicator, CpCommType, CpLayer, CpLayout, InProcessComm, TpLayer,
};
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{AttentionLayer, AttnError, ForwardArgs, PackedSeqParams, Tensor};
use parallel_common::{assert_close, layer, rand_t, ranks, TIMEOUT};

/// Specs and the context-parallel sizes to run them at.
const SPECS: [(&str, &[usize]); 5] = [
    (
        "self, heads=4, gqa=2, head_dim=8, hidden=16, qk_layernorm=rms, rope, mask=causal",
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
        "self, heads=2, gqa=2, head_dim=8, hidden=8, window=(2, 3), mask=no_mask",
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

/// Every rank's forward of its share of `x` (packed by `cu` when given), put back in order.
fn cp_forward(
    full: &SpecLayer,
    ty: CpCommType,
    cp: usize,
    x: &Tensor,
    args: &ForwardArgs<'_>,
) -> Tensor {
    let cu = args.packed.map(|p| p.cu_seqlens_q);
    let parts = ranks(cp, |c| {
        let layout = CpLayout::new(c.rank(), cp)?;
        let l = CpLayer::new(full.clone(), c, ty)?;
        Ok(l.forward(&layout.split(x, cu)?, args)?.output)
    });
    CpLayout::new(0, cp).unwrap().unsplit(&parts, cu).unwrap()
}

#[test]
fn every_comm_type_equals_the_single_rank_layer() {
    for (i, (spec, cps)) in SPECS.iter().enumerate() {
        let full = layer(spec, 600 + i as u64);
        let h = full.config().hidden;
        let mut rng = SplitMix64::new(700 + i as u64);
        for &cp in *cps {
            let x = rand_t(&mut rng, &[4 * cp, 2, h], 1.0);
            let xp = rand_t(&mut rng, &[6 * cp, h], 1.0);
            let cu = [0, 2 * cp as i32, 6 * cp as i32];
            let packed = ForwardArgs {
                packed: Some(PackedSeqParams {
                    cu_seqlens_q: &cu,
                    cu_seqlens_kv: &[],
                    max_seqlen_q: 0,
                    max_seqlen_kv: 0,
                }),
                ..Default::default()
            };
            let want = full.forward(&x, &ForwardArgs::default()).unwrap().output;
            let want_p = full.forward(&xp, &packed).unwrap().output;
            for ty in CpCommType::ALL {
                if ty == CpCommType::A2a && !a2a_fits(&full, cp) {
                    continue;
                }
                let what = format!("{spec} cp={cp} {ty}");
                let y = cp_forward(&full, ty, cp, &x, &ForwardArgs::default());
                assert_close(&format!("{what} padded"), &y, &want);
                let y = cp_forward(&full, ty, cp, &xp, &packed);
                assert_close(&format!("{what} packed"), &y, &want_p);
            }
        }
    }
}

#[test]
fn rope_at_given_positions_and_a_mask_type_override() {
    let full = layer(SPECS[0].0, 31);
    let mut rng = SplitMix64::new(32);
    let x = rand_t(&mut rng, &[8, 1, 16], 1.0);
    let positions: Vec<i64> = (0..8).map(|i| 3 * i + 5).collect();
    for mask in [None, Some(attention_codegen::MaskType::NoMask)] {
        let args = ForwardArgs {
            positions: Some(&positions),
            mask_type: mask,
            ..Default::default()
        };
        let want = full.forward(&x, &args).unwrap().output;
        for ty in CpCommType::ALL {
            assert_close(
                &format!("{ty} {mask:?}"),
                &cp_forward(&full, ty, 2, &x, &args),
                &want,
            );
        }
    }
}

#[test]
fn tensor_and_context_parallel_together() {
    // TP = 2 leaves 4 heads and 2 groups per rank: enough for a2a at CP = 2.
    let full = layer(
        "self, heads=8, gqa=4, head_dim=4, hidden=16, qk_layernorm=rms, rope, mask=causal",
        41,
    );
    let mut rng = SplitMix64::new(42);
    let x = rand_t(&mut rng, &[8, 2, 16], 1.0);
    let want = full.forward(&x, &ForwardArgs::default()).unwrap().output;
    let (tp, cp) = (2, 2);
    for ty in CpCommType::ALL {
        // tp_groups[c]: the TP group of CP rank c; cp_groups[t]: the CP group of TP rank t.
        let mut tp_groups: Vec<Vec<Option<InProcessComm>>> = (0..cp)
            .map(|_| {
                InProcessComm::group(tp, TIMEOUT)
                    .unwrap()
                    .into_iter()
                    .map(Some)
                    .collect()
            })
            .collect();
        let mut cp_groups: Vec<Vec<Option<InProcessComm>>> = (0..tp)
            .map(|_| {
                InProcessComm::group(cp, TIMEOUT)
                    .unwrap()
                    .into_iter()
                    .map(Some)
                    .collect()
            })
            .collect();
        let mut parts = vec![Vec::new(); cp];
        std::thread::scope(|s| {
            let mut handles = Vec::new();
            for c in 0..cp {
                for t in 0..tp {
                    let (tpc, cpc) = (
                        tp_groups[c][t].take().unwrap(),
                        cp_groups[t][c].take().unwrap(),
                    );
                    let (full, x) = (&full, &x);
                    handles.push((
                        c,
                        s.spawn(move || {
                            let layout = CpLayout::new(cpc.rank(), cp)?;
                            let shard = shard_layer(full, tpc.rank(), tp)?;
                            let l = TpLayer::new(
                                CpLayer::new(shard, cpc, ty)?,
                                tpc,
                                full.config(),
                                false,
                            )?;
                            l.forward(&layout.split(x, None)?, &ForwardArgs::default())
                        }),
                    ));
                }
            }
            for (c, h) in handles {
                parts[c].push(h.join().unwrap().unwrap());
            }
        });
        // Both TP ranks of a CP rank hold the same (all-reduced) rows.
        for p in &parts {
            assert_eq!(p[0], p[1], "{ty}");
        }
        let firsts: Vec<Tensor> = parts.into_iter().map(|mut p| p.remove(0)).collect();
        let y = CpLayout::new(0, cp)
            .unwrap()
            .unsplit(&firsts, None)
            .unwrap();
        assert_close(&format!("tp=2 x cp=2 {ty}"), &y, &want);
    }
}

/// Every rank's error (each rank fails before communicating).
fn rank_errors(
    full: &SpecLayer,
    cp: usize,
    ty: CpCommType,
    x: &Tensor,
    args: &ForwardArgs<'_>,
) -> Vec<AttnError> {
    ranks(cp, |c| {
        let l = CpLayer::new(full.clone(), c, ty)?;
        Ok(l.forward(x, args).unwrap_err())
    })
}

fn assert_arg(e: &AttnError, want: &str) {
    assert!(
        matches!(e, AttnError::InvalidArgument { arg, .. } if arg == want),
        "{e}"
    );
}

#[test]
fn bad_inputs_are_typed_errors_on_every_rank() {
    let full = layer(SPECS[0].0, 51);
    // A sequence that does not split into 2 cp chunks: 3 rows per rank of cp = 2 is s = 6.
    for e in rank_errors(
        &full,
        2,
        CpCommType::P2p,
        &Tensor::zeros(&[3, 1, 16]),
        &ForwardArgs::default(),
    ) {
        assert_arg(&e, "hidden");
    }
    let cu = [0, 2, 8];
    let packed = ForwardArgs {
        packed: Some(PackedSeqParams {
            cu_seqlens_q: &cu,
            cu_seqlens_kv: &[],
            max_seqlen_q: 0,
            max_seqlen_kv: 0,
        }),
        ..Default::default()
    };
    for e in rank_errors(&full, 2, CpCommType::A2a, &Tensor::zeros(&[4, 16]), &packed) {
        assert_arg(&e, "cu_seqlens_q");
    }
    let bias = Tensor::zeros(&[1, 1, 8, 8]);
    let with_bias = ForwardArgs {
        attention_bias: Some(&bias),
        ..Default::default()
    };
    let x = Tensor::zeros(&[4, 1, 16]);
    for e in rank_errors(&full, 2, CpCommType::AllGather, &x, &with_bias) {
        assert_arg(&e, "attention_mask/attention_bias");
    }
    let arbitrary = ForwardArgs {
        mask_type: Some(attention_codegen::MaskType::Arbitrary),
        ..Default::default()
    };
    for e in rank_errors(&full, 2, CpCommType::P2p, &x, &arbitrary) {
        assert_arg(&e, "mask_type");
    }
    let short = [0i64; 3];
    let bad_pos = ForwardArgs {
        positions: Some(&short),
        ..Default::default()
    };
    for e in rank_errors(&full, 2, CpCommType::P2p, &x, &bad_pos) {
        assert!(
            matches!(&e, AttnError::Shape { arg, .. } if arg == "positions"),
            "{e}"
        );
    }
}

#[test]
fn unsupported_layers_and_steps_are_refused() {
    // a2a needs cp to divide the heads and the groups.
    let l6 = layer(SPECS[1].0, 61);
    let out = ranks(2, |c| {
        Ok(CpLayer::new(l6.clone(), c, CpCommType::A2a).unwrap_err())
    });
    for e in out {
        assert_arg(&e, "cp_size");
    }
    let cross = layer("cross, heads=2, head_dim=4, hidden=8, mask=no_mask", 62);
    let out = ranks(2, |c| {
        Ok(CpLayer::new(cross.clone(), c, CpCommType::P2p).unwrap_err())
    });
    for e in out {
        assert_arg(&e, "config.kind");
    }
    // KV-cache steps under context parallelism: tests/parallel_cp_decode.rs.
    let full = layer(SPECS[0].0, 63);
    // The CPU layer seam is unchanged by this module.
    assert_eq!(CpuLayer::new(full).layer_config().heads, 4);
}

#[test]
fn layout_split_and_unsplit_are_inverse() {
    let x = Tensor::from_fn(&[12, 2], |i| i as f32);
    let cu = [0, 4, 12];
    for cu in [None, Some(&cu[..])] {
        let parts: Vec<Tensor> = (0..2)
            .map(|r| CpLayout::new(r, 2).unwrap().split(&x, cu).unwrap())
            .collect();
        assert_eq!(CpLayout::new(0, 2).unwrap().unsplit(&parts, cu).unwrap(), x);
    }
    // Padded: rank 0 holds chunks 0 and 3 (of 3 rows each), rank 1 chunks 1 and 2.
    let r0 = CpLayout::new(0, 2).unwrap().split(&x, None).unwrap();
    let rows: Vec<f32> = r0.data().chunks(2).map(|r| r[0] / 2.0).collect();
    assert_eq!(rows, vec![0.0, 1.0, 2.0, 9.0, 10.0, 11.0]);
    let e = CpLayout::new(2, 2).unwrap_err();
    assert_arg(&e, "cp_rank");
}
