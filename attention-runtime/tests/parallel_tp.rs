//! Tensor parallelism on the CPU reference with the in-process communicator: every rank's
//! [`TpLayer`] (its shard of the layer, then the all-reduce or, with sequence parallelism,
//! all-gather / reduce-scatter) must give the single-rank layer's output, within f32
//! rounding, at TP = 2, 3 and 4 where the heads and groups allow, for padded and packed
//! forwards, cross-attention, static- and paged-cache prefill and decode; and the backward's
//! gradients must be the single-rank gradients' shards. Sharding, shard files and their
//! errors are in `parallel_tp_load.rs`.

mod parallel_common;

use attention_runtime::backend::{Backend, BackendLayer, CpuBackend, CpuLayer, TrainLayer};
use attention_runtime::kv_cache::{BlockTable, PagedBatch, PagedKvCache, StaticKvCache};
use attention_runtime::modules::SplitMix64;
use attention_runtime::parallel::tp_load::shard_layer;
use attention_runtime::parallel::{run_ranks, Communicator, InProcessComm, TpLayer, TpPlan};
use attention_runtime::train::{BackwardOptions, TrainOptions};
use attention_runtime::{
    AttentionLayer, AttnError, ForwardArgs, LayerConfig, PackedSeqParams, Result, Tensor,
};
use parallel_common::{assert_close, layer, rand_t, ranks};

/// GQA with q/k norm, rope, qkv bias; learnable sinks with an output gate; MQA with an L2
/// norm, off-by-one sinks and a window; a gated layer whose groups are replicated.
const SPECS: [(&str, &[usize]); 4] = [
    (
        "self, heads=4, gqa=2, head_dim=8, hidden=16, qk_layernorm=rms, rope, qkv_bias, mask=causal",
        &[2, 4],
    ),
    (
        "self, heads=6, gqa=3, head_dim=4, hidden=12, qk_layernorm=layer, output_gate, sinks=learnable, mask=causal",
        &[3],
    ),
    (
        "self, heads=4, gqa=1, head_dim=4, hidden=8, qk_layernorm=l2, rope, sinks=off_by_one, window=(2, 0), mask=causal_bottom_right",
        &[2, 4],
    ),
    (
        "self, heads=4, gqa=2, head_dim=8, hidden=8, output_gate, rope=interleaved, mask=no_mask",
        &[4],
    ),
];

/// Rank `comm.rank()`'s TpLayer over its shard of `full`.
fn tp_rank(
    full: &dyn AttentionLayer,
    comm: InProcessComm,
    sp: bool,
) -> Result<TpLayer<CpuLayer<attention_runtime::spec_layer::SpecLayer>, InProcessComm>> {
    let shard = shard_layer(full, comm.rank(), comm.world_size())?;
    TpLayer::new(CpuLayer::new(shard), comm, full.config(), sp)
}

/// Rows `r * n / tp ..` of `t` along dim 0 (sequence parallelism's slice).
fn seq_slice(t: &Tensor, r: usize, tp: usize) -> Tensor {
    let n = t.shape()[0] / tp;
    let w = t.numel() / t.shape()[0];
    let mut shape = t.shape().to_vec();
    shape[0] = n;
    Tensor::new(&shape, t.data()[r * n * w..(r + 1) * n * w].to_vec()).unwrap()
}

#[test]
fn forward_equals_the_single_rank_layer_padded_packed_and_sequence_parallel() {
    for (i, (spec, tps)) in SPECS.iter().enumerate() {
        let full = layer(spec, 100 + i as u64);
        let h = full.config().hidden;
        let mut rng = SplitMix64::new(7 + i as u64);
        let x = rand_t(&mut rng, &[4, 2, h], 1.0);
        let xp = rand_t(&mut rng, &[8, h], 1.0);
        let cu = [0, 3, 8];
        let packed = ForwardArgs {
            packed: Some(PackedSeqParams {
                cu_seqlens_q: &cu,
                cu_seqlens_kv: &[],
                max_seqlen_q: 0,
                max_seqlen_kv: 0,
            }),
            ..Default::default()
        };
        let want = full.forward(&x, &ForwardArgs::default()).unwrap();
        let want_p = full.forward(&xp, &packed).unwrap().output;
        for &tp in *tps {
            let what = format!("{spec} tp={tp}");
            let out = ranks(tp, |c| {
                let l = tp_rank(&full, c, false)?;
                assert_eq!(l.output_bias(), want.bias.as_ref());
                Ok((
                    l.forward(&x, &ForwardArgs::default())?,
                    l.forward(&xp, &packed)?,
                ))
            });
            for (r, (y, yp)) in out.iter().enumerate() {
                assert_close(&format!("{what} rank {r} padded"), y, &want.output);
                assert_close(&format!("{what} rank {r} packed"), yp, &want_p);
            }
            // Sequence parallel: each rank holds s / tp (t / tp) rows in and out.
            let sp_tp = if 4 % tp == 0 { tp } else { continue };
            let out = ranks(sp_tp, |c| {
                let r = c.rank();
                let l = tp_rank(&full, c, true)?;
                let y = l.forward(&seq_slice(&x, r, sp_tp), &ForwardArgs::default())?;
                let yp = l.forward(&seq_slice(&xp, r, sp_tp), &packed)?;
                Ok((y, yp))
            });
            for (r, (y, yp)) in out.iter().enumerate() {
                assert_close(
                    &format!("{what} SP rank {r}"),
                    y,
                    &seq_slice(&want.output, r, sp_tp),
                );
                assert_close(
                    &format!("{what} SP rank {r} packed"),
                    yp,
                    &seq_slice(&want_p, r, sp_tp),
                );
            }
        }
    }
}

#[test]
fn cross_attention_forward_equals_the_single_rank_layer() {
    let full = layer(
        "cross, heads=4, head_dim=4, hidden=8, qkv_bias, sinks=learnable, mask=no_mask",
        5,
    );
    let mut rng = SplitMix64::new(9);
    let x = rand_t(&mut rng, &[3, 2, 8], 1.0);
    let ctx = rand_t(&mut rng, &[5, 2, 8], 1.0);
    let args = ForwardArgs {
        key_value_states: Some(&ctx),
        ..Default::default()
    };
    let want = full.forward(&x, &args).unwrap().output;
    for tp in [2, 4] {
        let out = ranks(tp, |c| tp_rank(&full, c, false)?.forward(&x, &args));
        for (r, y) in out.iter().enumerate() {
            assert_close(&format!("cross tp={tp} rank {r}"), y, &want);
        }
    }
}

/// Prefill 5 tokens then decode twice over a static cache, and a prefill + decode step over a
/// paged cache; every output, in order. `groups` / `hn`: the layer's own (a rank's).
fn cache_steps<L: BackendLayer<Backend = CpuBackend>>(l: &L, xs: &[Tensor]) -> Result<Vec<Tensor>> {
    let (ng, hn) = (l.layer_config().groups, l.layer_config().head_dim);
    let be = l.backend();
    let mut sc: StaticKvCache = be.static_cache(1, 16, 2, ng, hn)?;
    let mut out = vec![l.prefill(&xs[0], &mut sc, 0, 0, &ForwardArgs::default())?];
    sc.advance(0, 2, 5)?;
    for x in &xs[1..3] {
        out.push(l.decode(x, &mut sc, 0, 0, &ForwardArgs::default())?);
        sc.advance(0, 2, 1)?;
    }
    let mut pc: PagedKvCache = be.paged_cache(1, 8, 16, ng, hn)?;
    let mut table = BlockTable::new(2, 2)?;
    for r in 0..2 {
        let ids = pc.allocator_mut().alloc(1)?;
        table.set_row(r, &ids)?;
    }
    let steps: [(&[i32], &[i32]); 2] = [(&[0, 7, 10], &[7, 3]), (&[0, 1, 2], &[8, 4])];
    for (x, (cu, seqlens)) in xs[3..].iter().zip(steps) {
        let batch = PagedBatch {
            cu_seqlens_q: cu,
            seqlens_k: seqlens,
            block_table: &table,
        };
        out.push(l.forward_paged(x, &mut pc, 0, &batch)?);
    }
    Ok(out)
}

#[test]
fn static_and_paged_cache_steps_equal_the_single_rank_layer() {
    for (i, (spec, tps)) in SPECS.iter().enumerate() {
        let full = layer(spec, 200 + i as u64);
        let h = full.config().hidden;
        let mut rng = SplitMix64::new(300 + i as u64);
        let xs: Vec<Tensor> = [
            vec![5, 2, h],
            vec![1, 2, h],
            vec![1, 2, h],
            vec![10, h],
            vec![2, h],
        ]
        .iter()
        .map(|s| rand_t(&mut rng, s, 1.0))
        .collect();
        let want = cache_steps(&CpuLayer::new(full.clone()), &xs).unwrap();
        for &tp in *tps {
            let out = ranks(tp, |c| cache_steps(&tp_rank(&full, c, false)?, &xs));
            for (r, ys) in out.iter().enumerate() {
                for (s, (y, w)) in ys.iter().zip(&want).enumerate() {
                    assert_close(&format!("{spec} tp={tp} rank {r} step {s}"), y, w);
                }
            }
        }
    }
}

#[test]
fn backward_gradients_are_the_single_rank_gradients_shards() {
    let specs = [
        (SPECS[0].0, 2, false),
        (SPECS[0].0, 4, true),
        (SPECS[1].0, 3, false),
        (SPECS[2].0, 4, false),
        (SPECS[3].0, 4, true),
        (
            "cross, heads=4, head_dim=4, hidden=8, qkv_bias, sinks=learnable, mask=no_mask",
            2,
            false,
        ),
    ];
    for (i, (spec, tp, sp)) in specs.into_iter().enumerate() {
        let full = layer(spec, 400 + i as u64);
        let cfg: &LayerConfig = full.config();
        let h = cfg.hidden;
        let mut rng = SplitMix64::new(500 + i as u64);
        let x = rand_t(&mut rng, &[4, 2, h], 1.0);
        let ctx = rand_t(&mut rng, &[3, 2, h], 1.0);
        let dy = rand_t(&mut rng, &[4, 2, h], 1.0);
        let args = ForwardArgs {
            key_value_states: spec.starts_with("cross").then_some(&ctx),
            ..Default::default()
        };
        let single = CpuLayer::new(full.clone());
        let (y, mut saved) = single
            .forward_train(&x, &args, &TrainOptions::default())
            .unwrap();
        let want = single
            .backward(&mut saved, &dy, &BackwardOptions::default())
            .unwrap();
        for delay in [false, true] {
            let opts = BackwardOptions {
                delay_wgrad: delay,
                ..Default::default()
            };
            let out = ranks(tp, |c| {
                let r = c.rank();
                let l = tp_rank(&full, c, sp)?;
                let (xr, dyr) = if sp {
                    (seq_slice(&x, r, tp), seq_slice(&dy, r, tp))
                } else {
                    (x.clone(), dy.clone())
                };
                let (yr, mut s) = l.forward_train(&xr, &args, &TrainOptions::default())?;
                let mut g = l.backward(&mut s, &dyr, &opts)?;
                if delay {
                    g.params.extend(l.backward_dw(&mut s)?);
                }
                Ok((yr, g))
            });
            let what = format!("{spec} tp={tp} sp={sp} delay={delay}");
            for (r, (yr, g)) in out.iter().enumerate() {
                let cut = |t: &Tensor| if sp { seq_slice(t, r, tp) } else { t.clone() };
                assert_close(&format!("{what} rank {r} output"), yr, &cut(&y));
                assert_close(
                    &format!("{what} rank {r} grad_input"),
                    &g.grad_input,
                    &cut(&want.grad_input),
                );
                if let Some(kv) = &g.grad_key_value_states {
                    assert_close(
                        &format!("{what} rank {r} grad kv"),
                        kv,
                        want.grad_key_value_states.as_ref().unwrap(),
                    );
                }
                let plan = TpPlan::new(cfg, r, tp).unwrap();
                assert_eq!(
                    g.params.keys().collect::<Vec<_>>(),
                    want.params.keys().collect::<Vec<_>>(),
                    "{what}"
                );
                for (name, gr) in &g.params {
                    let w = plan.shard(cfg, name, name, &want.params[name]).unwrap();
                    assert_close(&format!("{what} rank {r} {name}"), gr, &w);
                }
            }
        }
    }
}

#[test]
fn sequence_parallel_is_refused_for_cache_steps() {
    let full = layer(SPECS[0].0, 1);
    let out = ranks(2, |c| {
        let l = tp_rank(&full, c, true)?;
        let mut cache = StaticKvCache::new(1, 8, 1, 1, 8)?;
        let x = Tensor::zeros(&[1, 1, 16]);
        Ok(l.decode(&x, &mut cache, 0, 0, &ForwardArgs::default())
            .unwrap_err())
    });
    for e in out {
        assert!(
            matches!(&e, AttnError::InvalidArgument { arg, .. } if arg == "sequence_parallel"),
            "{e}"
        );
    }
}

#[test]
fn a_shard_for_another_world_size_is_refused() {
    let full = layer(SPECS[0].0, 2);
    let comms = InProcessComm::group(2, parallel_common::TIMEOUT).unwrap();
    let comm = comms.into_iter().next().unwrap();
    // A shard made for tp_size = 4 given to a rank of a group of 2.
    let shard = shard_layer(&full, 0, 4).unwrap();
    let e = TpLayer::new(CpuLayer::new(shard), comm, full.config(), false).unwrap_err();
    match &e {
        AttnError::InvalidArgument { arg, expected, got } => {
            assert_eq!(arg, "layer");
            assert!(
                expected.contains("tp_size = 2") && expected.contains("heads = 2"),
                "{expected}"
            );
            assert!(got.contains("heads = 1"), "{got}");
        }
        other => panic!("{other}"),
    }
}

/// `linear_qkv.weight` of a CPU layer (a rank's shard or the whole layer).
fn qkv_weight(l: &attention_runtime::spec_layer::SpecLayer) -> Tensor {
    l.state_dict("")
        .into_iter()
        .find(|(k, _)| k == "linear_qkv.weight")
        .unwrap()
        .1
}

/// Two training forwards, then a threshold between the smallest and largest head record, so
/// that a replica whose own heads stay below it must still clip its copy of the group.
fn clip_setup(spec: &str, seed: u64) -> (attention_runtime::spec_layer::SpecLayer, Vec<Tensor>) {
    let full = layer(spec, seed);
    let h = full.config().hidden;
    let mut rng = SplitMix64::new(seed + 1);
    let xs = (0..2).map(|_| rand_t(&mut rng, &[5, 2, h], 3.0)).collect();
    (full, xs)
}

#[test]
fn qk_clip_is_the_whole_layers_clip_sharded_with_whole_and_replicated_groups() {
    // (spec, tp): whole groups (tp = 2 over 2 groups), replicated groups (1 or 2 groups
    // over 2 or 4 ranks), with q/k norms and without.
    let cases = [
        (SPECS[0].0, 2),
        (SPECS[0].0, 4),
        (SPECS[2].0, 2),
        (SPECS[2].0, 4),
        (SPECS[3].0, 4),
    ];
    for (i, (spec, tp)) in cases.into_iter().enumerate() {
        let (full, xs) = clip_setup(spec, 900 + 10 * i as u64);
        let cfg: &LayerConfig = full.config();
        let args = ForwardArgs::default();
        let mut single = CpuLayer::new(full.clone());
        for x in &xs {
            single
                .forward_train(x, &args, &TrainOptions::default())
                .unwrap();
        }
        let rec = single.max_logit_record().unwrap().unwrap();
        let lo = rec.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = rec.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let threshold = 0.5 * (lo + hi);
        assert!(threshold > 0.0 && lo < hi, "{spec}: record {rec:?}");
        let want = single.clip_qk(threshold, 0.5).unwrap();
        assert!(!want.clipped.is_empty(), "{spec}: nothing clipped");
        let want_w = qkv_weight(single.inner());
        let out = ranks(tp, |c| {
            let mut l = tp_rank(&full, c, false)?;
            for x in &xs {
                l.forward_train(x, &args, &TrainOptions::default())?;
            }
            let report = l.clip_qk(threshold, 0.5)?;
            Ok((report, qkv_weight(l.inner().inner()), l.max_logit_record()?))
        });
        for (r, (report, w, rec)) in out.iter().enumerate() {
            let what = format!("{spec} tp={tp} rank {r}");
            let plan = TpPlan::new(cfg, r, tp).unwrap();
            let g0 = plan.first_group;
            let gs = g0..g0 + plan.groups_per_rank;
            assert_close(
                &format!("{what} linear_qkv.weight"),
                w,
                &plan
                    .shard(cfg, "linear_qkv.weight", "linear_qkv.weight", &want_w)
                    .unwrap(),
            );
            assert_eq!(report.group_max, want.group_max[gs.clone()], "{what}");
            let clipped: Vec<usize> = want
                .clipped
                .iter()
                .filter(|g| gs.contains(g))
                .map(|g| g - g0)
                .collect();
            assert_eq!(report.clipped, clipped, "{what}");
            assert_eq!(rec, &None, "{what}: the record is reset");
        }
    }
}

#[test]
fn qk_clip_is_all_or_nothing_across_ranks() {
    let (full, xs) = clip_setup(SPECS[2].0, 950);
    let args = ForwardArgs::default();
    // Rank 1 passes a bad threshold: it gets its own error, rank 0 a Collective error naming
    // rank 1, and neither changes its weight or its record.
    let out = run_ranks(2, parallel_common::TIMEOUT, |c| {
        let r = c.rank();
        let mut l = tp_rank(&full, c, false)?;
        for x in &xs {
            l.forward_train(x, &args, &TrainOptions::default())?;
        }
        let (w0, rec0) = (qkv_weight(l.inner().inner()), l.max_logit_record()?);
        let e = l.clip_qk(if r == 1 { -1.0 } else { 1.0 }, 0.5).unwrap_err();
        assert_eq!(qkv_weight(l.inner().inner()).data(), w0.data(), "rank {r}");
        assert_eq!(l.max_logit_record()?, rec0, "rank {r}");
        assert!(rec0.is_some());
        Ok(e)
    })
    .unwrap();
    let errs: Vec<AttnError> = out.into_iter().map(|r| r.unwrap()).collect();
    assert!(
        matches!(&errs[1], AttnError::InvalidArgument { arg, .. } if arg == "threshold"),
        "{}",
        errs[1]
    );
    assert!(
        matches!(&errs[0], AttnError::Collective { rank: 1, got, .. } if got.contains("threshold")),
        "{}",
        errs[0]
    );
}
