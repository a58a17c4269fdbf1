//! Attention over the KV caches (`flash_decode_and_prefill`, `attend_static`) against the
//! contiguous reference: decode equals the full causal forward, paged equals static, a mixed
//! batch equals separate calls, block placement in the pool changes nothing.

use attention_codegen::{MaskType, Window};
use attention_runtime::kv_cache::{BlockTable, PagedBatch, PagedKvCache, StaticKvCache};
use attention_runtime::reference::paged::{attend_static, flash_decode_and_prefill};
use attention_runtime::reference::{attend_sequence, AttendParams, SeqDims};
use attention_runtime::{AttnError, Tensor};
use proptest::prelude::*;

const NP: usize = 4;
const NG: usize = 2;
const HN: usize = 8;

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// One sequence: q `[s, np, hn]`, k/v `[s, ng, hn]`.
struct Seq {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    len: usize,
}

fn seq(len: usize, seed: u64) -> Seq {
    Seq {
        q: rand_vec(len * NP * HN, seed * 3),
        k: rand_vec(len * NG * HN, seed * 3 + 1),
        v: rand_vec(len * NG * HN, seed * 3 + 2),
        len,
    }
}

fn scale() -> f32 {
    1.0 / (HN as f32).sqrt()
}

/// Queries `from..to` of a sequence attending to keys `0..to` (bottom-right causal), computed
/// on contiguous k/v.
fn contiguous(s: &Seq, from: usize, to: usize, window: Option<Window>) -> Vec<f32> {
    let p = AttendParams {
        window,
        ..AttendParams::new(scale(), MaskType::CausalBottomRight)
    };
    let dims = SeqDims {
        sq: to - from,
        sk: to,
        heads: NP,
        groups: NG,
        head_dim: HN,
    };
    attend_sequence(
        &s.q[from * NP * HN..to * NP * HN],
        &s.k[..to * NG * HN],
        &s.v[..to * NG * HN],
        dims,
        &p,
    )
    .unwrap()
    .out
}

/// The whole sequence under the top-left `causal` mask in one call.
fn full_causal(s: &Seq, window: Option<Window>) -> Vec<f32> {
    let p = AttendParams {
        window,
        ..AttendParams::new(scale(), MaskType::Causal)
    };
    let dims = SeqDims {
        sq: s.len,
        sk: s.len,
        heads: NP,
        groups: NG,
        head_dim: HN,
    };
    attend_sequence(&s.q, &s.k, &s.v, dims, &p).unwrap().out
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
            "{what}: element {i}: {x} vs {y}"
        );
    }
}

/// A step of a paged run: request `i` adds tokens `from[i]..to[i]` of `seqs[i]`.
/// Appends k/v to `layer` and returns the attention output `[T, np, hn]`.
fn paged_step(
    cache: &mut PagedKvCache,
    table: &BlockTable,
    layer: usize,
    seqs: &[&Seq],
    from: &[usize],
    to: &[usize],
    window: Option<Window>,
) -> Tensor {
    let mut cu = vec![0i32];
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for (i, s) in seqs.iter().enumerate() {
        q.extend_from_slice(&s.q[from[i] * NP * HN..to[i] * NP * HN]);
        k.extend_from_slice(&s.k[from[i] * NG * HN..to[i] * NG * HN]);
        v.extend_from_slice(&s.v[from[i] * NG * HN..to[i] * NG * HN]);
        cu.push(cu.last().unwrap() + (to[i] - from[i]) as i32);
    }
    let t = *cu.last().unwrap() as usize;
    let seqlens: Vec<i32> = to.iter().map(|&x| x as i32).collect();
    let batch = PagedBatch {
        cu_seqlens_q: &cu,
        seqlens_k: &seqlens,
        block_table: table,
    };
    let kt = Tensor::new(&[t, NG, HN], k).unwrap();
    let vt = Tensor::new(&[t, NG, HN], v).unwrap();
    cache.append_paged(layer, &kt, &vt, &batch).unwrap();
    let qt = Tensor::new(&[t, NP, HN], q).unwrap();
    let max_q = from.iter().zip(to).map(|(f, t)| t - f).max().unwrap_or(0);
    let max_k = to.iter().copied().max().unwrap_or(0);
    flash_decode_and_prefill(&qt, cache, layer, &batch, max_q, max_k, scale(), window).unwrap()
}

/// A paged cache and table with enough blocks for `lens`, row `i` for request `i`.
fn paged_for(num_layers: usize, bs: usize, lens: &[usize]) -> (PagedKvCache, BlockTable) {
    let blocks: Vec<usize> = lens.iter().map(|l| l.div_ceil(bs).max(1)).collect();
    let mut c =
        PagedKvCache::new(num_layers, blocks.iter().sum::<usize>() + 3, bs, NG, HN).unwrap();
    // Burn a block first so request ids do not start at 0.
    let spare = c.allocator_mut().alloc(1).unwrap();
    let mut t = BlockTable::new(lens.len(), *blocks.iter().max().unwrap()).unwrap();
    for (i, &b) in blocks.iter().enumerate() {
        t.set_row(i, &c.allocator_mut().alloc(b).unwrap()).unwrap();
    }
    c.allocator_mut().release(spare[0]).unwrap();
    (c, t)
}

const WINDOWS: [Option<Window>; 3] = [
    None,
    Some(Window { left: 5, right: 0 }),
    Some(Window { left: 0, right: 0 }),
];

#[test]
fn paged_decode_step_by_step_equals_the_full_causal_forward() {
    for window in WINDOWS {
        let s = seq(37, 1);
        let full = full_causal(&s, window);
        let (mut c, t) = paged_for(2, 16, &[37]);
        let prompt = 5;
        let out = paged_step(&mut c, &t, 1, &[&s], &[0], &[prompt], window);
        assert_close(out.data(), &full[..prompt * NP * HN], "prefill");
        for pos in prompt..37 {
            let out = paged_step(&mut c, &t, 1, &[&s], &[pos], &[pos + 1], window);
            assert_eq!(out.shape(), &[1, NP, HN]);
            assert_close(
                out.data(),
                &full[pos * NP * HN..(pos + 1) * NP * HN],
                &format!("decode {pos} {window:?}"),
            );
        }
    }
}

#[test]
fn static_decode_step_by_step_equals_the_full_causal_forward() {
    for window in WINDOWS {
        let seqs = [seq(21, 2), seq(21, 3)];
        let full: Vec<Vec<f32>> = seqs.iter().map(|s| full_causal(s, window)).collect();
        let (layers, b) = (2, 2);
        let mut c = StaticKvCache::new(layers, 24, 3, NG, HN).unwrap();
        // Pack tokens `from..to` of both sequences as `[sq, b, heads, hn]`.
        let pack = |f: &dyn Fn(&Seq) -> &[f32], w: usize, from: usize, to: usize| {
            let mut out = Vec::new();
            for p in from..to {
                for s in &seqs {
                    out.extend_from_slice(&f(s)[p * w * HN..(p + 1) * w * HN]);
                }
            }
            Tensor::new(&[to - from, b, w, HN], out).unwrap()
        };
        let mut bounds = vec![(0, 4)];
        bounds.extend((4..21).map(|p| (p, p + 1)));
        for (from, to) in bounds {
            let k = pack(&|s| &s.k, NG, from, to);
            let v = pack(&|s| &s.v, NG, from, to);
            let q = pack(&|s| &s.q, NP, from, to);
            for layer in 0..layers {
                c.append(layer, 1, &k, &v).unwrap();
                let out = attend_static(&q, &c, layer, 1, scale(), window).unwrap();
                for (i, f) in full.iter().enumerate() {
                    for p in from..to {
                        let o = ((p - from) * b + i) * NP * HN;
                        assert_close(
                            &out.data()[o..o + NP * HN],
                            &f[p * NP * HN..(p + 1) * NP * HN],
                            &format!("layer {layer} seq {i} pos {p}"),
                        );
                    }
                }
            }
            c.advance(1, b, to - from).unwrap();
        }
        assert_eq!(c.seqlens(), &[0, 21, 21]);
    }
}

#[test]
fn paged_equals_static() {
    let lens = [9, 30, 17];
    let seqs: Vec<Seq> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| seq(l, 10 + i as u64))
        .collect();
    let window = Some(Window { left: 6, right: -1 });
    // Static: each request in its own slot; the last 3 (or 1) tokens are "new".
    let new = [1, 3, 1];
    let mut st = StaticKvCache::new(1, 32, 3, NG, HN).unwrap();
    let mut static_out = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        let past = s.len - new[i];
        let kt = |x: &[f32], a: usize, b: usize| {
            Tensor::new(&[b - a, 1, NG, HN], x[a * NG * HN..b * NG * HN].to_vec()).unwrap()
        };
        st.append(0, i, &kt(&s.k, 0, past), &kt(&s.v, 0, past))
            .unwrap();
        st.advance(i, 1, past).unwrap();
        st.append(0, i, &kt(&s.k, past, s.len), &kt(&s.v, past, s.len))
            .unwrap();
        let q = Tensor::new(&[new[i], 1, NP, HN], s.q[past * NP * HN..].to_vec()).unwrap();
        static_out.extend(
            attend_static(&q, &st, 0, i, scale(), window)
                .unwrap()
                .into_data(),
        );
    }
    // Paged: same tokens, prompt then one mixed step.
    let (mut pc, t) = paged_for(1, 16, &lens);
    let refs: Vec<&Seq> = seqs.iter().collect();
    let past: Vec<usize> = (0..3).map(|i| lens[i] - new[i]).collect();
    paged_step(&mut pc, &t, 0, &refs, &[0, 0, 0], &past, window);
    let paged = paged_step(&mut pc, &t, 0, &refs, &past, &lens, window);
    assert_close(paged.data(), &static_out, "paged vs static");
    // And both equal the contiguous reference.
    let direct: Vec<f32> = (0..3)
        .flat_map(|i| contiguous(&seqs[i], past[i], lens[i], window))
        .collect();
    assert_close(&static_out, &direct, "static vs contiguous");
}

#[test]
fn a_mixed_batch_equals_separate_calls() {
    // Decode requests first, then prefill chunks (one with no cached prefix).
    let lens = [20, 33, 12, 40];
    let from = [19, 32, 0, 25];
    let seqs: Vec<Seq> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| seq(l, 20 + i as u64))
        .collect();
    let refs: Vec<&Seq> = seqs.iter().collect();
    let window = Some(Window { left: 10, right: 0 });
    let (mut c, t) = paged_for(1, 16, &lens);
    paged_step(&mut c, &t, 0, &refs, &[0; 4], &from, window);
    let mixed = paged_step(&mut c, &t, 0, &refs, &from, &lens, window);
    let mut offset = 0;
    for i in 0..4 {
        let one = BlockTable::from_raw(1, t.max_blocks(), t.row(i).unwrap().to_vec()).unwrap();
        let n = lens[i] - from[i];
        let q = Tensor::new(
            &[n, NP, HN],
            seqs[i].q[from[i] * NP * HN..lens[i] * NP * HN].to_vec(),
        )
        .unwrap();
        let seqlens = [lens[i] as i32];
        let cu = [0, n as i32];
        let batch = PagedBatch {
            cu_seqlens_q: &cu,
            seqlens_k: &seqlens,
            block_table: &one,
        };
        let alone =
            flash_decode_and_prefill(&q, &c, 0, &batch, n, lens[i], scale(), window).unwrap();
        assert_eq!(
            alone.data(),
            &mixed.data()[offset..offset + n * NP * HN],
            "request {i}"
        );
        assert_close(
            alone.data(),
            &contiguous(&seqs[i], from[i], lens[i], window),
            "vs contiguous",
        );
        offset += n * NP * HN;
    }
}

#[test]
fn permuting_blocks_in_the_pool_changes_nothing() {
    let lens = [50, 7, 33];
    let from = [49, 0, 30];
    let seqs: Vec<Seq> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| seq(l, 40 + i as u64))
        .collect();
    let refs: Vec<&Seq> = seqs.iter().collect();
    let bs = 16;
    let blocks: usize = lens.iter().map(|l| l.div_ceil(bs)).sum();
    let mut c = PagedKvCache::new(2, 2 * blocks + 1, bs, NG, HN).unwrap();
    let mut t = BlockTable::new(3, 4).unwrap();
    for (i, l) in lens.iter().enumerate() {
        t.set_row(i, &c.allocator_mut().alloc(l.div_ceil(bs)).unwrap())
            .unwrap();
    }
    for layer in 0..2 {
        paged_step(&mut c, &t, layer, &refs, &[0; 3], &from, None);
    }
    let q_of = |i: usize| seqs[i].q[from[i] * NP * HN..lens[i] * NP * HN].to_vec();
    let q: Vec<f32> = (0..3).flat_map(q_of).collect();
    let tq = q.len() / (NP * HN);
    let q = Tensor::new(&[tq, NP, HN], q).unwrap();
    let cu = [0, 1, 8, 11];
    let seqlens: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
    let mut new_k = Vec::new();
    for i in 0..3 {
        new_k.extend_from_slice(&seqs[i].k[from[i] * NG * HN..lens[i] * NG * HN]);
    }
    let mut new_v = Vec::new();
    for i in 0..3 {
        new_v.extend_from_slice(&seqs[i].v[from[i] * NG * HN..lens[i] * NG * HN]);
    }
    let (nk, nv) = (
        Tensor::new(&[tq, NG, HN], new_k).unwrap(),
        Tensor::new(&[tq, NG, HN], new_v).unwrap(),
    );
    let batch = PagedBatch {
        cu_seqlens_q: &cu,
        seqlens_k: &seqlens,
        block_table: &t,
    };
    for layer in 0..2 {
        c.append_paged(layer, &nk, &nv, &batch).unwrap();
    }
    let before: Vec<Tensor> = (0..2)
        .map(|l| flash_decode_and_prefill(&q, &c, l, &batch, 7, 50, scale(), None).unwrap())
        .collect();

    // Move every used block to a fresh id, in reverse order, then free the old ones.
    let old: Vec<u32> = (0..3)
        .flat_map(|r| {
            t.row(r)
                .unwrap()
                .iter()
                .filter(|&&id| id >= 0)
                .map(|&id| id as u32)
                .collect::<Vec<_>>()
        })
        .collect();
    let fresh = c.allocator_mut().alloc(old.len()).unwrap();
    let mut map = std::collections::HashMap::new();
    for (o, f) in old.iter().zip(fresh.iter().rev()) {
        c.copy_block(*o, *f).unwrap();
        map.insert(*o as i32, *f as i32);
    }
    c.allocator_mut().release_all(&old).unwrap();
    let remapped: Vec<i32> = t
        .as_slice()
        .iter()
        .map(|id| *map.get(id).unwrap_or(id))
        .collect();
    let t2 = BlockTable::from_raw(3, 4, remapped).unwrap();
    assert!(t2
        .as_slice()
        .iter()
        .zip(t.as_slice())
        .any(|(a, b)| a != b && *a >= 0));
    let batch2 = PagedBatch {
        cu_seqlens_q: &cu,
        seqlens_k: &seqlens,
        block_table: &t2,
    };
    for (l, b) in before.iter().enumerate() {
        let after = flash_decode_and_prefill(&q, &c, l, &batch2, 7, 50, scale(), None).unwrap();
        assert_eq!(after.data(), b.data(), "layer {l}");
    }
    // The old table now points at free blocks: a typed error, not stale data.
    let err = flash_decode_and_prefill(&q, &c, 0, &batch, 7, 50, scale(), None).unwrap_err();
    assert!(
        matches!(&err, AttnError::BlockId { arg, .. } if arg.starts_with("block_table[")),
        "{err}"
    );
}

#[test]
fn a_shared_prefix_attends_like_a_private_copy() {
    let bs = 16;
    let s = seq(40, 60);
    let mut c = PagedKvCache::new(1, 8, bs, NG, HN).unwrap();
    let a = c.allocator_mut().alloc(3).unwrap();
    let mut t = BlockTable::new(2, 3).unwrap();
    t.set_row(0, &a).unwrap();
    paged_step(&mut c, &t, 0, &[&s], &[0], &[32], None);
    // B shares A's two full prefix blocks and continues with the same tokens 32..40.
    c.allocator_mut().retain(a[0]).unwrap();
    c.allocator_mut().retain(a[1]).unwrap();
    let b_own = c.allocator_mut().alloc(1).unwrap()[0];
    t.set_row(1, &[a[0], a[1], b_own]).unwrap();
    let one = BlockTable::from_raw(1, 3, t.row(1).unwrap().to_vec()).unwrap();
    let out = paged_step(&mut c, &one, 0, &[&s], &[32], &[40], None);
    assert_close(out.data(), &contiguous(&s, 32, 40, None), "shared prefix");
    // A releases everything: the shared blocks survive for B.
    c.allocator_mut().release_all(&a).unwrap();
    assert!(c.allocator().is_allocated(a[0]) && !c.allocator().is_allocated(a[2]));
    let (k, _) = c.gather_kv(0, t.row(1).unwrap(), 40).unwrap();
    assert_eq!(k, s.k);
}

#[test]
fn attention_argument_errors() {
    let s = seq(20, 70);
    let (mut c, t) = paged_for(1, 16, &[20]);
    paged_step(&mut c, &t, 0, &[&s], &[0], &[20], None);
    let q = Tensor::new(&[4, NP, HN], s.q[16 * NP * HN..].to_vec()).unwrap();
    let batch = PagedBatch {
        cu_seqlens_q: &[0, 4],
        seqlens_k: &[20],
        block_table: &t,
    };
    let call = |q: &Tensor, layer, mq, mk, sc, w| {
        flash_decode_and_prefill(q, &c, layer, &batch, mq, mk, sc, w)
    };
    flash_decode_and_prefill(&q, &c, 0, &batch, 4, 20, scale(), None).unwrap();
    let arg_is = |r: Result<Tensor, AttnError>, name: &str| match r {
        Err(AttnError::InvalidArgument { arg, .. }) | Err(AttnError::Shape { arg, .. }) => {
            assert_eq!(arg, name)
        }
        other => panic!("expected an error naming {name}, got {other:?}"),
    };
    arg_is(call(&q, 0, 3, 20, scale(), None), "max_seqlen_q");
    arg_is(call(&q, 0, 4, 19, scale(), None), "max_seqlen_k");
    arg_is(call(&q, 1, 4, 20, scale(), None), "layer");
    arg_is(call(&q, 0, 4, 20, f32::NAN, None), "scale");
    arg_is(
        call(&q, 0, 4, 20, scale(), Some(Window { left: -3, right: 0 })),
        "window",
    );
    arg_is(
        call(&Tensor::zeros(&[4, NP, HN + 1]), 0, 4, 20, scale(), None),
        "q",
    );
    arg_is(
        call(&Tensor::zeros(&[4, 3, HN]), 0, 4, 20, scale(), None),
        "q",
    );
    arg_is(
        call(&Tensor::zeros(&[4, NP * HN]), 0, 4, 20, scale(), None),
        "q",
    );
    assert!(matches!(
        call(&Tensor::zeros(&[5, NP, HN]), 0, 5, 20, scale(), None),
        Err(AttnError::CuSeqlens { .. })
    ));

    let mut st = StaticKvCache::new(1, 8, 2, NG, HN).unwrap();
    let q2 = Tensor::zeros(&[2, 1, NP, HN]);
    // Nothing appended yet: two queries but no keys.
    arg_is(attend_static(&q2, &st, 0, 0, scale(), None), "q");
    st.append(
        0,
        0,
        &Tensor::zeros(&[2, 1, NG, HN]),
        &Tensor::zeros(&[2, 1, NG, HN]),
    )
    .unwrap();
    attend_static(&q2, &st, 0, 0, scale(), None).unwrap();
    assert!(matches!(
        attend_static(&q2, &st, 0, 2, scale(), None),
        Err(AttnError::CacheCapacity { .. })
    ));
    arg_is(attend_static(&q2, &st, 1, 0, scale(), None), "layer");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Any power-of-two block size >= 16 and any lengths: paged attention (after a prompt and
    /// one mixed step) equals contiguous attention.
    #[test]
    fn any_block_size_and_lengths_match_contiguous(
        bs_log in 4u32..9,
        reqs in prop::collection::vec((1usize..300, 0usize..=100, any::<u16>()), 1..4),
        left in -1i64..40,
    ) {
        let bs = 1usize << bs_log;
        let lens: Vec<usize> = reqs.iter().map(|r| r.0).collect();
        // New tokens of the final step: a percentage of the length, at least 1 when possible.
        let from: Vec<usize> = reqs.iter().map(|r| r.0 - (r.0 * r.1 / 100).max(1)).collect();
        let seqs: Vec<Seq> = reqs.iter().map(|r| seq(r.0, r.2 as u64 + 1)).collect();
        let refs: Vec<&Seq> = seqs.iter().collect();
        let window = Some(Window { left, right: 0 });
        let (mut c, t) = paged_for(1, bs, &lens);
        paged_step(&mut c, &t, 0, &refs, &vec![0; lens.len()], &from, window);
        let out = paged_step(&mut c, &t, 0, &refs, &from, &lens, window);
        let expect: Vec<f32> =
            (0..lens.len()).flat_map(|i| contiguous(&seqs[i], from[i], lens[i], window)).collect();
        prop_assert_eq!(out.data().len(), expect.len());
        for (x, y) in out.data().iter().zip(&expect) {
            prop_assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{} vs {}", x, y);
        }
        for (i, s) in seqs.iter().enumerate() {
            let (k, v) = c.gather_kv(0, t.row(i).unwrap(), s.len).unwrap();
            prop_assert_eq!(&k, &s.k);
            prop_assert_eq!(&v, &s.v);
        }
    }
}
