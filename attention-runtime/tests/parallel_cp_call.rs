//! The host side of the GPU context-parallel layer ([`CpCall`], [`agree`]), without a GPU:
//! the geometry and rope positions of a rank's call against [`CpLayout`] and the CPU layer's
//! rules, one test per error class, and the check that every rank makes the same call over
//! the in-process communicator (a rank that differs is a typed error on every rank), and that
//! a rank that fails before the call's collectives (its checks, plan, kernels or buffers)
//! still takes part in [`agree_ready`], so its peers get a typed error naming it instead of
//! waiting for it (CP = 3: the failed rank is neither rank 0 nor the last).

mod parallel_common;

use attention_codegen::{MaskType, Window};
use attention_runtime::parallel::cp_call::{agree, agree_ready, CpCall};
use attention_runtime::parallel::{CpCommType, CpLayout};
use attention_runtime::{AttnError, ForwardArgs, PackedSeqParams, Tensor};
use parallel_common::{config, ranks};

const H: usize = 16;

fn packed<'a>(cu: &'a [i32], kv: &'a [i32]) -> ForwardArgs<'a> {
    ForwardArgs {
        packed: Some(PackedSeqParams {
            cu_seqlens_q: cu,
            cu_seqlens_kv: kv,
            max_seqlen_q: 0,
            max_seqlen_kv: 0,
        }),
        ..Default::default()
    }
}

fn call(r: usize, cp: usize, shape: &[usize], args: &ForwardArgs<'_>) -> Result<CpCall, AttnError> {
    CpCall::new(
        CpLayout::new(r, cp).unwrap(),
        shape,
        H,
        args,
        MaskType::Causal,
        None,
    )
}

fn assert_arg(e: &AttnError, want: &str) {
    let arg = match e {
        AttnError::InvalidArgument { arg, .. }
        | AttnError::Shape { arg, .. }
        | AttnError::CuSeqlens { arg, .. } => arg,
        other => panic!("{other}"),
    };
    assert_eq!(arg, want, "{e}");
}

#[test]
fn padded_geometry_and_positions() {
    // s = 8 over cp = 2: rank 1 holds tokens 2, 3 and 4, 5 of each of the b = 3 sequences.
    let c = call(1, 2, &[4, 3, H], &ForwardArgs::default()).unwrap();
    assert_eq!(c.padded, Some((4, 3)));
    assert_eq!(c.global_cu, vec![0, 8, 16, 24]);
    assert_eq!(c.local_cu, vec![0, 4, 8, 12]);
    assert_eq!(c.rows(), 12);
    assert_eq!(c.positions, [2, 3, 4, 5].repeat(3));
    // Given positions are the whole sequence's.
    let p: Vec<i64> = (0..8).map(|i| 10 * i).collect();
    let args = ForwardArgs {
        positions: Some(&p),
        mask_type: Some(MaskType::NoMask),
        ..Default::default()
    };
    let c = call(0, 2, &[4, 1, H], &args).unwrap();
    assert_eq!(c.positions, vec![0, 10, 60, 70]);
    assert_eq!(c.mask, MaskType::NoMask);
}

#[test]
fn packed_geometry_and_positions() {
    let cu = [0, 4, 12];
    let c = call(0, 2, &[6, H], &packed(&cu, &cu)).unwrap();
    assert_eq!(c.padded, None);
    assert_eq!(c.local_cu, vec![0, 2, 6]);
    // Rank 0: chunks 0 and 3 of each sequence (chunk 1 token of 4, 2 tokens of 8).
    assert_eq!(c.positions, vec![0, 3, 0, 1, 6, 7]);
    // The same rows as the layout's split.
    let x = Tensor::from_fn(&[12, 1], |i| i as f32);
    let part = CpLayout::new(0, 2).unwrap().split(&x, Some(&cu)).unwrap();
    assert_eq!(part.data(), &[0.0, 3.0, 4.0, 5.0, 10.0, 11.0]);
}

#[test]
fn a_sequence_that_does_not_split_into_2cp_chunks() {
    // Padded s = 6 over cp = 2 (chunks of 1.5 tokens).
    assert_arg(
        &call(0, 2, &[3, 1, H], &ForwardArgs::default()).unwrap_err(),
        "hidden",
    );
    // Packed: a sequence of 2 tokens over cp = 2.
    let cu = [0, 2, 8];
    assert_arg(
        &call(0, 2, &[4, H], &packed(&cu, &[])).unwrap_err(),
        "cu_seqlens_q",
    );
}

#[test]
fn input_split_for_another_cp_size() {
    // 16 tokens over cp = 2 are 8 rows per rank; 4 rows were split for cp = 4.
    let cu = [0, 16];
    assert_arg(
        &call(0, 2, &[4, H], &packed(&cu, &[])).unwrap_err(),
        "cu_seqlens_q",
    );
}

#[test]
fn hidden_of_another_rank_or_width() {
    assert_arg(
        &call(0, 2, &[4, H], &ForwardArgs::default()).unwrap_err(),
        "hidden",
    );
    assert_arg(
        &call(0, 2, &[4, 1, H + 1], &ForwardArgs::default()).unwrap_err(),
        "hidden",
    );
    let cu = [0, 8];
    assert_arg(
        &call(0, 2, &[4, 1, H], &packed(&cu, &[])).unwrap_err(),
        "hidden",
    );
}

#[test]
fn other_cu_seqlens_kv() {
    let (cu, kv) = ([0, 8], [0, 4]);
    assert_arg(
        &call(0, 2, &[4, H], &packed(&cu, &kv)).unwrap_err(),
        "cu_seqlens_kv",
    );
}

#[test]
fn mask_and_bias_tensors_and_a_context() {
    let t = Tensor::zeros(&[1, 1, 8, 8]);
    for args in [
        ForwardArgs {
            attention_mask: Some(&t),
            ..Default::default()
        },
        ForwardArgs {
            attention_bias: Some(&t),
            ..Default::default()
        },
    ] {
        assert_arg(
            &call(0, 2, &[4, 1, H], &args).unwrap_err(),
            "attention_mask/attention_bias",
        );
    }
    let ctx = Tensor::zeros(&[4, 1, H]);
    let args = ForwardArgs {
        key_value_states: Some(&ctx),
        ..Default::default()
    };
    assert_arg(
        &call(0, 2, &[4, 1, H], &args).unwrap_err(),
        "key_value_states",
    );
}

#[test]
fn mask_types_that_take_a_tensor() {
    for m in [
        MaskType::Padding,
        MaskType::PaddingCausal,
        MaskType::Arbitrary,
    ] {
        let args = ForwardArgs {
            mask_type: Some(m),
            ..Default::default()
        };
        assert_arg(&call(0, 2, &[4, 1, H], &args).unwrap_err(), "mask_type");
    }
}

#[test]
fn positions_of_another_length_or_beyond_int32() {
    let short = [0i64; 4];
    let args = ForwardArgs {
        positions: Some(&short),
        ..Default::default()
    };
    assert_arg(&call(0, 2, &[4, 1, H], &args).unwrap_err(), "positions");
    let big = [1i64 << 40; 8];
    let args = ForwardArgs {
        positions: Some(&big),
        ..Default::default()
    };
    assert_arg(&call(0, 2, &[4, 1, H], &args).unwrap_err(), "positions");
}

#[test]
fn the_window_joins_the_visibility() {
    let c = CpCall::new(
        CpLayout::new(0, 2).unwrap(),
        &[4, 1, H],
        H,
        &ForwardArgs::default(),
        MaskType::NoMask,
        Some(Window { left: 3, right: 2 }),
    )
    .unwrap();
    assert_eq!((c.vis.lo, c.vis.hi), (Some(-3), Some(2)));
}

#[test]
fn ranks_that_make_the_same_call_agree() {
    let cfg = config("self, heads=4, gqa=2, head_dim=8, hidden=16, mask=causal");
    let out = ranks(2, |c| {
        let r = attention_runtime::parallel::Communicator::rank(&c);
        let call = call(r, 2, &[4, 2, H], &ForwardArgs::default())?;
        agree(&c, &call.descriptor(2, CpCommType::P2p, &cfg))
    });
    assert_eq!(out.len(), 2);
}

#[test]
fn a_rank_that_calls_differently_is_a_typed_error_on_every_rank() {
    let cfg = config("self, heads=4, gqa=2, head_dim=8, hidden=16, mask=causal");
    // Rank 1 passes another batch (b = 1) and another exchange.
    let out = ranks(2, |c| {
        let r = attention_runtime::parallel::Communicator::rank(&c);
        let (b, ty) = if r == 0 {
            (2, CpCommType::P2p)
        } else {
            (1, CpCommType::A2a)
        };
        let call = call(r, 2, &[4, b, H], &ForwardArgs::default())?;
        Ok(agree(&c, &call.descriptor(2, ty, &cfg)).unwrap_err())
    });
    for e in out {
        match e {
            AttnError::RankMismatch {
                param,
                rank,
                expected,
                got,
            } => {
                assert_eq!((param.as_str(), rank), ("context-parallel call", 1));
                assert!(
                    expected.contains("b = 2") && expected.contains("p2p"),
                    "{expected}"
                );
                assert!(got.contains("b = 1") && got.contains("a2a"), "{got}");
            }
            other => panic!("{other}"),
        }
    }
}

#[test]
fn a_rank_that_failed_locally_is_named_on_every_other_rank() {
    let cfg = config("self, heads=4, gqa=2, head_dim=8, hidden=16, mask=causal");
    let cp = 3;
    let out = ranks(cp, |c| {
        let r = attention_runtime::parallel::Communicator::rank(&c);
        // Rank 1 passes a sequence that does not split into 2 cp chunks (s = 3 cp).
        let s = if r == 1 { 1 } else { 2 };
        let local = call(r, cp, &[s, 2, H], &ForwardArgs::default());
        Ok(agree_ready(&c, local, |c| c.descriptor(cp, CpCommType::P2p, &cfg)).map(|_| ()))
    });
    for (r, res) in out.into_iter().enumerate() {
        let e = res.unwrap_err();
        if r == 1 {
            assert_arg(&e, "hidden");
        } else {
            match &e {
                AttnError::Collective { op, rank, got, .. } => {
                    assert_eq!((op.as_str(), *rank), ("context-parallel call", 1), "{e}");
                    assert!(got.contains("hidden"), "{got}");
                }
                other => panic!("rank {r}: {other}"),
            }
        }
    }
}

#[test]
fn ready_ranks_get_what_they_prepared_back() {
    let out = ranks(3, |c| {
        let r = attention_runtime::parallel::Communicator::rank(&c);
        agree_ready(&c, Ok(10 + r), |_| "same".to_string())
    });
    assert_eq!(out, vec![10, 11, 12]);
}
