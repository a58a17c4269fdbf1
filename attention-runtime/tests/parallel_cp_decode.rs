//! KV-cache steps under context parallelism on the CPU reference with the in-process
//! communicator: a prompt prefilled on every rank's chunks, then decode steps (the same new
//! token on every rank), through two layers sharing each rank's cache, must equal the
//! single-rank layer's prefill and decode within f32 rounding, for CP = 1..4, causal and
//! sliding window, GQA, sinks, every `cp_comm_type`, and TP = 2 x CP = 2; every rank's decode output is the same
//! bits; the tokens are shared out by the owner rule. Then one test per error class: a full
//! cache, a bad prefill, ranks that disagree (a step committed on one rank only, another
//! layer), a cache of another rank, a bad commit, a paged step — typed errors on every rank,
//! and nothing stored changes.

mod parallel_common;

use attention_runtime::backend::{Backend, BackendLayer, CpuLayer, StaticCache};
use attention_runtime::kv_cache::{BlockTable, PagedBatch, StaticKvCache};
use attention_runtime::modules::SplitMix64;
use attention_runtime::parallel::tp_load::shard_layer;
use attention_runtime::parallel::{
    run_ranks, Communicator, CpCommType, CpLayer, CpLayout, CpStaticKvCache, InProcessComm, TpLayer,
};
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{AttentionLayer, AttnError, ForwardArgs, Result, Tensor};
use parallel_common::{assert_close, layer, rand_t, TIMEOUT};

type Cache = CpStaticKvCache<StaticKvCache>;

/// Specs, the CP sizes and comm types to run them at.
const SPECS: [(&str, &[usize], &[CpCommType]); 4] = [
    (
        "self, heads=4, gqa=2, head_dim=8, hidden=16, qk_layernorm=rms, rope, mask=causal",
        &[1, 2, 3, 4],
        &[CpCommType::P2p, CpCommType::AllGather, CpCommType::A2a],
    ),
    (
        "self, heads=4, gqa=2, head_dim=4, hidden=8, rope, sinks=off_by_one, window=(3, 0), mask=causal",
        &[2, 4],
        &[CpCommType::P2p],
    ),
    (
        "self, heads=6, gqa=3, head_dim=4, hidden=12, qk_layernorm=layer, output_gate, sinks=learnable, window=(5, 0), mask=causal",
        &[3],
        &[CpCommType::AllGather],
    ),
    (
        "self, heads=2, gqa=1, head_dim=8, hidden=8, qkv_bias, rope=interleaved, mask=no_mask",
        &[2],
        &[CpCommType::P2p],
    ),
];

/// Batch slots used (from [`SLOT0`]) of [`MAX_BATCH`].
const B: usize = 2;
const SLOT0: usize = 1;
const MAX_BATCH: usize = 3;
/// Decode steps after the prompt.
const STEPS: usize = 7;

/// The inputs: the prompt `[s, B, h]` and each decode step's `[1, B, h]`.
fn inputs(h: usize, s: usize, seed: u64) -> (Tensor, Vec<Tensor>) {
    let mut rng = SplitMix64::new(seed);
    let prompt = rand_t(&mut rng, &[s, B, h], 1.0);
    let steps = (0..STEPS)
        .map(|_| rand_t(&mut rng, &[1, B, h], 1.0))
        .collect();
    (prompt, steps)
}

/// Prefill then decode through `layers` (one cache, a layer each), committing every step:
/// the last layer's prefill output and every decode output. `cp`: the prompt rows times
/// `cp` is the whole prompt.
fn run<L: BackendLayer<Backend = Be>, Be: Backend<Tensor = Tensor>>(
    layers: &[L],
    cache: &mut Be::StaticCache,
    cp: usize,
    prompt: &Tensor,
    steps: &[Tensor],
) -> Result<(Tensor, Vec<Tensor>)> {
    let args = ForwardArgs::default();
    let mut x = prompt.clone();
    for (i, l) in layers.iter().enumerate() {
        x = l.prefill(&x, cache, i, SLOT0, &args)?;
    }
    cache.advance(SLOT0, B, prompt.shape()[0] * cp)?;
    let mut outs = Vec::new();
    for st in steps {
        let mut y = st.clone();
        for (i, l) in layers.iter().enumerate() {
            y = l.decode(&y, cache, i, SLOT0, &args)?;
        }
        cache.advance(SLOT0, B, 1)?;
        outs.push(y);
    }
    Ok((x, outs))
}

type Rank<'c> = CpLayer<SpecLayer, &'c InProcessComm>;

fn cp_layers<'c>(
    fulls: &[SpecLayer],
    c: &'c InProcessComm,
    ty: CpCommType,
) -> Result<Vec<Rank<'c>>> {
    fulls
        .iter()
        .map(|f| CpLayer::new(f.clone(), c, ty))
        .collect()
}

#[test]
fn prefill_then_decode_equals_the_single_rank_layer() {
    for (i, (spec, cps, types)) in SPECS.iter().enumerate() {
        let fulls = [layer(spec, 900 + i as u64), layer(spec, 950 + i as u64)];
        let cfg = fulls[0].config().clone();
        let (ng, hn) = (cfg.groups, cfg.head_dim);
        for &cp in *cps {
            let s = 4 * cp;
            let (prompt, steps) = inputs(cfg.hidden, s, 1000 + (i * 10 + cp) as u64);
            let single: Vec<_> = fulls.iter().map(|f| CpuLayer::new(f.clone())).collect();
            let mut sc = StaticKvCache::new(2, s + STEPS, MAX_BATCH, ng, hn).unwrap();
            let (want_p, want_d) = run(&single, &mut sc, 1, &prompt, &steps).unwrap();
            for &ty in *types {
                if ty == CpCommType::A2a
                    && !(cfg.heads.is_multiple_of(cp) && cfg.groups.is_multiple_of(cp))
                {
                    continue;
                }
                let got = run_ranks(cp, TIMEOUT, |c| {
                    let layout = CpLayout::new(c.rank(), cp)?;
                    let ls = cp_layers(&fulls, &c, ty)?;
                    // Each rank's cache holds ceil((s + STEPS) / cp) tokens per slot.
                    let cap = (s + STEPS).div_ceil(cp);
                    let mut cache = ls[0].backend().static_cache(2, cap, MAX_BATCH, ng, hn)?;
                    let r = run(&ls, &mut cache, cp, &layout.split(&prompt, None)?, &steps)?;
                    Ok((r, cache))
                })
                .unwrap();
                let what = format!("{spec} cp={cp} {ty}");
                let mut parts = Vec::new();
                for (r, res) in got.into_iter().enumerate() {
                    let ((p, d), cache) = res.unwrap_or_else(|e| panic!("{what} rank {r}: {e}"));
                    parts.push(p);
                    for (k, (g, w)) in d.iter().zip(&want_d).enumerate() {
                        assert_close(&format!("{what} rank {r} decode {k}"), g, w);
                    }
                    assert_eq!(cache.seqlens()[SLOT0], s + STEPS, "{what}");
                    // The owner rule shares the decode tokens out evenly.
                    let own = cache.inner().seqlens()[SLOT0];
                    let want_own = s / cp + (STEPS / cp) + usize::from(r < STEPS % cp);
                    assert_eq!(own, want_own, "{what} rank {r} stores");
                }
                let y = CpLayout::new(0, cp).unwrap().unsplit(&parts, None).unwrap();
                assert_close(&format!("{what} prefill"), &y, &want_p);
            }
        }
    }
}

const ERR_SPEC: &str =
    "self, heads=4, gqa=2, head_dim=4, hidden=8, rope, window=(6, 0), mask=causal";

/// On `cp` ranks: a one-layer (or `layers`-layer) cache of `cap` tokens per rank and slot
/// with a prompt of `4 cp` tokens prefilled, committed, and `decodes` decode steps committed; then
/// `f` on each rank's layer and cache. Returns each rank's result with its cache before and
/// after `f`.
fn after_prompt<T: Send>(
    cp: usize,
    layers: usize,
    cap: usize,
    decodes: usize,
    f: impl Fn(usize, &[Rank<'_>], &mut Cache) -> Result<T> + Sync,
) -> Vec<(Result<T>, Cache, Cache)> {
    let fulls: Vec<SpecLayer> = (0..layers)
        .map(|i| layer(ERR_SPEC, 70 + i as u64))
        .collect();
    let (ng, hn, h) = (2, 4, 8);
    let (prompt, steps) = inputs(h, 4 * cp, 77);
    run_ranks(cp, TIMEOUT, |c| {
        let r = c.rank();
        let ls = cp_layers(&fulls, &c, CpCommType::P2p)?;
        let mut cache = ls[0]
            .backend()
            .static_cache(layers, cap, MAX_BATCH, ng, hn)?;
        let layout = CpLayout::new(r, cp)?;
        run(
            &ls,
            &mut cache,
            cp,
            &layout.split(&prompt, None)?,
            &steps[..decodes],
        )?;
        let before = cache.clone();
        let res = f(r, &ls, &mut cache);
        Ok((res, before, cache))
    })
    .unwrap()
    .into_iter()
    .map(|x| x.unwrap())
    .collect()
}

fn step(l: &Rank<'_>, cache: &mut Cache, layer: usize) -> Result<Tensor> {
    l.decode(
        &Tensor::from_fn(&[1, B, 8], |i| i as f32 * 0.1),
        cache,
        layer,
        SLOT0,
        &ForwardArgs::default(),
    )
}

fn assert_arg(e: &AttnError, want: &str) {
    assert!(
        matches!(e, AttnError::InvalidArgument { arg, .. } if arg == want),
        "want {want}: {e}"
    );
}

/// Every rank failed as `check` says and its cache did not change.
fn all_failed<T: std::fmt::Debug>(
    got: Vec<(Result<T>, Cache, Cache)>,
    check: impl Fn(usize, &AttnError),
) {
    for (r, (res, before, after)) in got.into_iter().enumerate() {
        check(r, &res.expect_err("an error on every rank"));
        assert_eq!(before, after, "rank {r}'s cache changed");
    }
}

#[test]
fn a_full_cache_on_any_rank_is_an_error_on_every_rank() {
    // 4 prompt tokens each, capacity 5: decode steps 1 and 2 fill ranks 0 and 1; step 3
    // would be rank 0's sixth token.
    let got = after_prompt(2, 1, 5, 2, |_, ls, cache| step(&ls[0], cache, 0));
    all_failed(got, |_, e| {
        assert!(
            matches!(e, AttnError::CacheCapacity { arg, capacity: 5, needed: 6 } if arg.contains("rank 0")),
            "{e}"
        )
    });
    // A prompt that does not fit: 8 tokens on cp = 2 is 4 per rank, over a capacity of 3.
    let got = run_ranks(2, TIMEOUT, |c| {
        let l = CpLayer::new(layer(ERR_SPEC, 70), &c, CpCommType::P2p)?;
        let mut cache = l.backend().static_cache(1, 3, MAX_BATCH, 2, 4)?;
        let before = cache.clone();
        let r = l.prefill(
            &Tensor::zeros(&[4, B, 8]),
            &mut cache,
            0,
            SLOT0,
            &ForwardArgs::default(),
        );
        Ok((r, before, cache))
    })
    .unwrap()
    .into_iter()
    .map(|x| x.unwrap())
    .collect();
    all_failed(got, |_, e| {
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
        )
    });
}

#[test]
fn a_bad_prefill_is_an_error_on_every_rank() {
    // 3 rows per rank of cp = 2 is a prompt of 6, not a multiple of 4.
    let got = run_ranks(2, TIMEOUT, |c| {
        let l = CpLayer::new(layer(ERR_SPEC, 70), &c, CpCommType::P2p)?;
        let mut cache = l.backend().static_cache(1, 8, MAX_BATCH, 2, 4)?;
        let before = cache.clone();
        let r = l.prefill(
            &Tensor::zeros(&[3, B, 8]),
            &mut cache,
            0,
            SLOT0,
            &ForwardArgs::default(),
        );
        Ok((r, before, cache))
    })
    .unwrap()
    .into_iter()
    .map(|x| x.unwrap())
    .collect();
    all_failed(got, |_, e| assert_arg(e, "hidden"));
    // A prefill into slots that hold tokens.
    let got = after_prompt(2, 1, 16, 1, |_, ls, cache| {
        ls[0].prefill(
            &Tensor::zeros(&[2, B, 8]),
            cache,
            0,
            SLOT0,
            &ForwardArgs::default(),
        )
    });
    all_failed(got, |_, e| assert_arg(e, "cache"));
}

#[test]
fn ranks_that_disagree_fail_together() {
    // A step committed on rank 0 and rolled back on rank 1: the sequences' lengths differ.
    let got = after_prompt(2, 1, 16, 1, |r, ls, cache| {
        step(&ls[0], cache, 0)?;
        if r == 0 {
            cache.advance(SLOT0, B, 1)?;
        } else {
            cache.rollback();
        }
        let mid = cache.clone();
        let e = step(&ls[0], cache, 0);
        assert_eq!(&mid, cache, "rank {r}: the failed step changed the cache");
        e
    });
    for (res, _, _) in got {
        assert_arg(&res.expect_err("an error on every rank"), "cache");
    }
    // Another layer on each rank.
    let got = after_prompt(2, 2, 16, 0, |r, ls, cache| step(&ls[r], cache, r));
    all_failed(got, |_, e| assert_arg(e, "cache"));
    // One rank refuses (a layer outside its cache); the other names it.
    let got = after_prompt(3, 1, 16, 2, |r, ls, cache| {
        step(&ls[0], cache, if r == 1 { 5 } else { 0 })
    });
    all_failed(got, |r, e| {
        assert_arg(
            e,
            if r == 1 {
                "layer"
            } else {
                "context parallel step"
            },
        )
    });
    // A cache made for another rank.
    let got = run_ranks(2, TIMEOUT, |c| {
        let r = c.rank();
        let l = CpLayer::new(layer(ERR_SPEC, 70), &c, CpCommType::P2p)?;
        let inner = StaticKvCache::new(1, 8, MAX_BATCH, 2, 4)?;
        let mut cache = CpStaticKvCache::new(CpLayout::new(1 - r, 2)?, inner)?;
        let before = cache.clone();
        let res = l.prefill(
            &Tensor::zeros(&[4, B, 8]),
            &mut cache,
            0,
            SLOT0,
            &ForwardArgs::default(),
        );
        Ok((res, before, cache))
    })
    .unwrap()
    .into_iter()
    .map(|x| x.unwrap())
    .collect();
    all_failed(got, |_, e| assert_arg(e, "cache"));
}

#[test]
fn a_bad_commit_or_a_paged_step_is_refused() {
    let got = after_prompt(2, 2, 16, 1, |_, ls, cache| {
        step(&ls[0], cache, 0)?;
        let mid = cache.clone();
        // Layer 1 did not append: the step cannot be committed.
        let e = cache
            .advance(SLOT0, B, 1)
            .expect_err("layer 1 did not append");
        assert_eq!(&mid, cache);
        step(&ls[1], cache, 1)?;
        let mid = cache.clone();
        let e2 = cache.advance(SLOT0, B, 2).expect_err("one token, not two");
        assert_eq!(&mid, cache);
        cache.advance(SLOT0, B, 1)?;
        assert_eq!(cache.seqlens()[SLOT0], 10);
        Ok((e, e2))
    });
    for (res, _, _) in got {
        let (e, e2) = res.unwrap();
        assert_arg(&e, "advance");
        assert_arg(&e2, "advance");
    }
    let got = after_prompt(2, 1, 16, 0, |_, ls, _| {
        let mut pc = ls[0].backend().paged_cache(1, 4, 16, 2, 4)?;
        let table = BlockTable::new(1, 1)?;
        let batch = PagedBatch {
            cu_seqlens_q: &[0, 1],
            seqlens_k: &[1],
            block_table: &table,
        };
        ls[0].forward_paged(&Tensor::zeros(&[1, 8]), &mut pc, 0, &batch)
    });
    for (res, _, _) in got {
        assert_arg(
            &res.expect_err("paged steps are refused"),
            "context parallel",
        );
    }
}

#[test]
fn tensor_and_context_parallel_cache_steps_equal_the_single_rank_layer() {
    // TP = 2 x CP = 2: each CP rank's TP shard caches its own tokens of its own groups.
    let spec = "self, heads=8, gqa=4, head_dim=4, hidden=16, qk_layernorm=rms, rope, window=(5, 0), mask=causal";
    let full = layer(spec, 43);
    let (tp, cp) = (2, 2);
    let s = 4 * cp;
    let (prompt, steps) = inputs(16, s, 44);
    let single = [CpuLayer::new(full.clone())];
    let mut sc = StaticKvCache::new(1, s + STEPS, MAX_BATCH, 4, 4).unwrap();
    let (want_p, want_d) = run(&single, &mut sc, 1, &prompt, &steps).unwrap();
    let group = |n| -> Vec<Option<InProcessComm>> {
        InProcessComm::group(n, TIMEOUT)
            .unwrap()
            .into_iter()
            .map(Some)
            .collect()
    };
    // tp_groups[c]: the TP group of CP rank c; cp_groups[t]: the CP group of TP rank t.
    let mut tp_groups: Vec<_> = (0..cp).map(|_| group(tp)).collect();
    let mut cp_groups: Vec<_> = (0..tp).map(|_| group(cp)).collect();
    let mut got = vec![Vec::new(); cp];
    std::thread::scope(|sc| {
        let mut hs = Vec::new();
        for c in 0..cp {
            for t in 0..tp {
                let tpc = tp_groups[c][t].take().unwrap();
                let cpc = cp_groups[t][c].take().unwrap();
                let (full, prompt, steps) = (&full, &prompt, &steps);
                hs.push((
                    c,
                    sc.spawn(move || -> Result<(Tensor, Vec<Tensor>)> {
                        let layout = CpLayout::new(cpc.rank(), cp)?;
                        let shard = shard_layer(full, tpc.rank(), tp)?;
                        let l = TpLayer::new(
                            CpLayer::new(shard, cpc, CpCommType::P2p)?,
                            tpc,
                            full.config(),
                            false,
                        )?;
                        let (ng, hn) = (l.layer_config().groups, l.layer_config().head_dim);
                        let cap = (s + STEPS).div_ceil(cp);
                        let mut cache = l.backend().static_cache(1, cap, MAX_BATCH, ng, hn)?;
                        run(&[l], &mut cache, cp, &layout.split(prompt, None)?, steps)
                    }),
                ));
            }
        }
        for (c, h) in hs {
            got[c].push(h.join().unwrap().unwrap());
        }
    });
    let mut parts = Vec::new();
    for (c, g) in got.into_iter().enumerate() {
        for (p, d) in &g {
            for (k, (x, w)) in d.iter().zip(&want_d).enumerate() {
                assert_close(&format!("tp x cp, cp rank {c}, decode {k}"), x, w);
            }
            assert_eq!(
                p, &g[0].0,
                "both TP ranks of cp rank {c} hold the same rows"
            );
        }
        parts.push(g[0].0.clone());
    }
    let y = CpLayout::new(0, cp).unwrap().unsplit(&parts, None).unwrap();
    assert_close("tp x cp prefill", &y, &want_p);
}

/// Slots 1 and 2 prefilled and decoded, then slot 0 prefilled with a shorter prompt, then
/// decode over all three: slots of other lengths store their decode tokens on other ranks
/// (each rank commits a different count per slot). Every output as the single-rank layer's.
fn staggered<L: BackendLayer<Backend = Be>, Be: Backend<Tensor = Tensor>>(
    l: &L,
    cache: &mut Be::StaticCache,
    split: &dyn Fn(&Tensor) -> Result<Tensor>,
    (p12, p0, steps): (&Tensor, &Tensor, &[Tensor]),
) -> Result<Vec<Tensor>> {
    let args = ForwardArgs::default();
    let mut out = vec![l.prefill(&split(p12)?, cache, 0, 1, &args)?];
    cache.advance(1, 2, p12.shape()[0])?;
    for st in &steps[..3] {
        let two = Tensor::new(
            &[1, 2, st.shape()[2]],
            st.data()[st.data().len() / 3..].to_vec(),
        )?;
        out.push(l.decode(&two, cache, 0, 1, &args)?);
        cache.advance(1, 2, 1)?;
    }
    out.push(l.prefill(&split(p0)?, cache, 0, 0, &args)?);
    cache.advance(0, 1, p0.shape()[0])?;
    for st in &steps[3..] {
        out.push(l.decode(st, cache, 0, 0, &args)?);
        cache.advance(0, 3, 1)?;
    }
    Ok(out)
}

#[test]
fn slots_of_different_lengths_share_out_their_tokens_apart() {
    let spec = "self, heads=4, gqa=2, head_dim=4, hidden=8, rope, window=(7, 0), mask=causal";
    let full = layer(spec, 45);
    let cp = 3;
    let mut rng = SplitMix64::new(46);
    let p12 = rand_t(&mut rng, &[4 * cp, 2, 8], 1.0);
    let p0 = rand_t(&mut rng, &[2 * cp, 1, 8], 1.0);
    let steps: Vec<Tensor> = (0..8).map(|_| rand_t(&mut rng, &[1, 3, 8], 1.0)).collect();
    let mut sc = StaticKvCache::new(1, 32, 3, 2, 4).unwrap();
    let want = staggered(
        &CpuLayer::new(full.clone()),
        &mut sc,
        &|x| Ok(x.clone()),
        (&p12, &p0, &steps),
    )
    .unwrap();
    let got = run_ranks(cp, TIMEOUT, |c| {
        let layout = CpLayout::new(c.rank(), cp)?;
        let l = CpLayer::new(full.clone(), &c, CpCommType::AllGather)?;
        let mut cache = l.backend().static_cache(1, 12, 3, 2, 4)?;
        let split = |x: &Tensor| layout.split(x, None);
        let out = staggered(&l, &mut cache, &split, (&p12, &p0, &steps))?;
        Ok((
            out,
            cache.inner().seqlens().to_vec(),
            cache.seqlens().to_vec(),
        ))
    })
    .unwrap();
    let mut prefills: [Vec<Tensor>; 2] = [Vec::new(), Vec::new()];
    let mut stored = vec![0usize; 3];
    for (r, res) in got.into_iter().enumerate() {
        let (out, own, lens) = res.unwrap_or_else(|e| panic!("rank {r}: {e}"));
        assert_eq!(lens, vec![2 * cp + 5, 4 * cp + 8, 4 * cp + 8], "rank {r}");
        for (i, (g, w)) in out.iter().zip(&want).enumerate() {
            match i {
                0 => prefills[0].push(g.clone()),
                4 => prefills[1].push(g.clone()),
                _ => assert_close(&format!("rank {r} step {i}"), g, w),
            }
        }
        stored.iter_mut().zip(&own).for_each(|(s, o)| *s += o);
        // Shares within one token of each other.
        for (slot, &o) in own.iter().enumerate() {
            let l = lens[slot];
            assert!(
                o == l / cp || o == l.div_ceil(cp),
                "rank {r} slot {slot}: {o} of {l}"
            );
        }
    }
    assert_eq!(stored, vec![2 * cp + 5, 4 * cp + 8, 4 * cp + 8]);
    let layout = CpLayout::new(0, cp).unwrap();
    assert_close(
        "prefill 1",
        &layout.unsplit(&prefills[0], None).unwrap(),
        &want[0],
    );
    assert_close(
        "prefill 0",
        &layout.unsplit(&prefills[1], None).unwrap(),
        &want[4],
    );
}
