//! Static KV cache: storage, length bookkeeping, capacity errors, reorder, reset.

use attention_runtime::kv_cache::StaticKvCache;
use attention_runtime::{AttnError, Tensor};

/// Deterministic pseudo-random values in [-1, 1).
fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    Tensor::from_fn(shape, |_| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    })
}

/// Rows `[ng*hn]` of `t [sq, b, ng, hn]` for batch index `i`, concatenated over `sq`.
fn column(t: &Tensor, i: usize) -> Vec<f32> {
    let (sq, b) = (t.shape()[0], t.shape()[1]);
    let row = t.shape()[2] * t.shape()[3];
    (0..sq)
        .flat_map(|s| t.data()[(s * b + i) * row..(s * b + i + 1) * row].to_vec())
        .collect()
}

fn snapshot(c: &StaticKvCache) -> Vec<Vec<f32>> {
    (0..c.num_layers())
        .flat_map(|l| {
            [
                c.layer_k(l).unwrap().to_vec(),
                c.layer_v(l).unwrap().to_vec(),
            ]
        })
        .collect()
}

/// Append the same step to every layer (distinct data per layer) and commit it.
fn step(
    c: &mut StaticKvCache,
    off: usize,
    sq: usize,
    b: usize,
    seed: u64,
) -> Vec<(Tensor, Tensor)> {
    let (ng, hn) = (c.groups(), c.head_dim());
    let mut written = Vec::new();
    for l in 0..c.num_layers() {
        let k = rand_tensor(&[sq, b, ng, hn], seed * 100 + l as u64 * 2);
        let v = rand_tensor(&[sq, b, ng, hn], seed * 100 + l as u64 * 2 + 1);
        c.append(l, off, &k, &v).unwrap();
        written.push((k, v));
    }
    c.advance(off, b, sq).unwrap();
    written
}

#[test]
fn append_then_gather_round_trips_across_layers_and_steps() {
    let mut c = StaticKvCache::new(3, 16, 4, 2, 8).unwrap();
    // Slots 1..3: a prefill of 5 tokens, then two decode steps.
    let a = step(&mut c, 1, 5, 2, 1);
    let d1 = step(&mut c, 1, 1, 2, 2);
    let d2 = step(&mut c, 1, 1, 2, 3);
    assert_eq!(c.seqlens(), &[0, 7, 7, 0]);
    for l in 0..3 {
        for i in 0..2 {
            let (k, v) = c.gather_kv(l, 1 + i, 7).unwrap();
            let mut ek = column(&a[l].0, i);
            ek.extend(column(&d1[l].0, i));
            ek.extend(column(&d2[l].0, i));
            let mut ev = column(&a[l].1, i);
            ev.extend(column(&d1[l].1, i));
            ev.extend(column(&d2[l].1, i));
            assert_eq!(k, ek, "layer {l} slot {}", 1 + i);
            assert_eq!(v, ev);
        }
    }
    // Untouched slots stay zero.
    let (k0, _) = c.keys(0, 0, 0).unwrap();
    assert!(k0.is_empty());
    assert!(c
        .layer_k(2)
        .unwrap()
        .chunks(4 * 16)
        .all(|line| line[..16].iter().all(|&x| x == 0.0)));
}

#[test]
fn layout_is_seq_batch_group_dim() {
    let mut c = StaticKvCache::new(1, 4, 3, 2, 2).unwrap();
    let k = Tensor::from_fn(&[2, 1, 2, 2], |i| i as f32 + 1.0);
    c.append(0, 2, &k, &k).unwrap();
    let buf = c.layer_k(0).unwrap();
    // position p, slot 2 starts at (p * 3 + 2) * 4.
    assert_eq!(&buf[8..12], &[1.0, 2.0, 3.0, 4.0]);
    assert_eq!(&buf[20..24], &[5.0, 6.0, 7.0, 8.0]);
    assert_eq!(buf.iter().filter(|&&x| x != 0.0).count(), 8);
}

#[test]
fn pending_tokens_are_visible_to_their_layer_only_until_advance() {
    let mut c = StaticKvCache::new(2, 8, 1, 1, 4).unwrap();
    let k = rand_tensor(&[3, 1, 1, 4], 7);
    c.append(0, 0, &k, &k).unwrap();
    assert_eq!(c.visible_len(0, 0).unwrap(), 3);
    assert_eq!(c.visible_len(1, 0).unwrap(), 0);
    assert_eq!(c.seqlens(), &[0]);
    // Layer 1 has not appended: advance is a mismatch and changes nothing.
    let before = c.clone();
    let err = c.advance(0, 1, 3).unwrap_err();
    assert!(
        matches!(&err, AttnError::InvalidArgument { got, .. } if got.contains("layer 1 appended 0")),
        "{err}"
    );
    assert_eq!(c, before);
    // Layer 1 appends a different count: still a mismatch.
    c.append(
        1,
        0,
        &rand_tensor(&[2, 1, 1, 4], 8),
        &rand_tensor(&[2, 1, 1, 4], 9),
    )
    .unwrap();
    assert!(c.advance(0, 1, 3).is_err());
    // Layer 1 catches up with one more token: the step commits.
    c.append(
        1,
        0,
        &rand_tensor(&[1, 1, 1, 4], 10),
        &rand_tensor(&[1, 1, 1, 4], 11),
    )
    .unwrap();
    c.advance(0, 1, 3).unwrap();
    assert_eq!(c.seqlens(), &[3]);
    assert_eq!(c.pending(0, 0).unwrap(), 0);
    assert_eq!(c.gather_kv(0, 0, 3).unwrap().0, k.data());
    // Gathering past the visible length is an error.
    assert!(matches!(
        c.gather_kv(0, 0, 4),
        Err(AttnError::InvalidArgument { .. })
    ));
}

#[test]
fn rollback_drops_pending_tokens() {
    let mut c = StaticKvCache::new(2, 8, 2, 1, 4).unwrap();
    step(&mut c, 0, 2, 2, 1);
    let k = rand_tensor(&[1, 2, 1, 4], 3);
    c.append(0, 0, &k, &k).unwrap();
    c.rollback();
    assert_eq!(c.visible_len(0, 0).unwrap(), 2);
    assert_eq!(c.seqlens(), &[2, 2]);
    step(&mut c, 0, 1, 2, 4);
    assert_eq!(c.seqlens(), &[3, 3]);
}

#[test]
fn writing_past_max_seq_is_an_error_and_writes_nothing() {
    let mut c = StaticKvCache::new(2, 6, 3, 2, 4).unwrap();
    step(&mut c, 0, 4, 3, 1);
    let before = snapshot(&c);
    let lens = c.seqlens().to_vec();
    let k = rand_tensor(&[3, 3, 2, 4], 99);
    let err = c.append(1, 0, &k, &k).unwrap_err();
    match err {
        AttnError::CacheCapacity {
            arg,
            capacity,
            needed,
        } => {
            assert!(arg.starts_with("max_seq"), "{arg}");
            assert_eq!((capacity, needed), (6, 7));
        }
        e => panic!("expected CacheCapacity, got {e}"),
    }
    assert_eq!(snapshot(&c), before);
    assert_eq!(c.seqlens(), &lens[..]);
    assert_eq!(c.pending(1, 0).unwrap(), 0);
    // Exactly filling the capacity works.
    let k = rand_tensor(&[2, 3, 2, 4], 98);
    c.append(1, 0, &k, &k).unwrap();
}

#[test]
fn one_full_slot_rejects_the_whole_append() {
    let mut c = StaticKvCache::new(1, 4, 2, 1, 2).unwrap();
    let k = rand_tensor(&[4, 1, 1, 2], 1);
    c.append(0, 1, &k, &k).unwrap();
    c.advance(0, 2, 0).unwrap_err(); // slot 1 has 4 pending, not 0
    c.advance(1, 1, 4).unwrap();
    let before = snapshot(&c);
    let k = rand_tensor(&[1, 2, 1, 2], 2);
    // Slot 0 has room, slot 1 is full: nothing is written to slot 0 either.
    assert!(matches!(
        c.append(0, 0, &k, &k),
        Err(AttnError::CacheCapacity { .. })
    ));
    assert_eq!(snapshot(&c), before);
    assert_eq!(c.visible_len(0, 0).unwrap(), 0);
}

#[test]
fn writing_past_max_batch_is_an_error_and_writes_nothing() {
    let mut c = StaticKvCache::new(1, 8, 4, 1, 4).unwrap();
    let before = snapshot(&c);
    let k = rand_tensor(&[1, 3, 1, 4], 5);
    let err = c.append(0, 2, &k, &k).unwrap_err();
    assert!(
        matches!(&err, AttnError::CacheCapacity { arg, capacity: 4, needed: 5 } if arg.starts_with("max_batch")),
        "{err}"
    );
    assert_eq!(snapshot(&c), before);
    assert!(matches!(
        c.advance(3, 2, 1),
        Err(AttnError::CacheCapacity { .. })
    ));
    assert!(matches!(
        c.append(0, usize::MAX, &k, &k),
        Err(AttnError::CacheCapacity { .. })
    ));
}

#[test]
fn bad_shapes_layers_and_sizes_are_typed_errors() {
    let mut c = StaticKvCache::new(2, 8, 2, 2, 4).unwrap();
    let good = rand_tensor(&[1, 2, 2, 4], 1);
    let bad_dim = rand_tensor(&[1, 2, 2, 5], 1);
    let bad_groups = rand_tensor(&[1, 2, 1, 4], 1);
    let rank3 = rand_tensor(&[2, 2, 4], 1);
    assert!(
        matches!(c.append(0, 0, &bad_dim, &bad_dim), Err(AttnError::Shape { arg, .. }) if arg == "k")
    );
    assert!(matches!(
        c.append(0, 0, &bad_groups, &bad_groups),
        Err(AttnError::Shape { .. })
    ));
    assert!(matches!(
        c.append(0, 0, &rank3, &rank3),
        Err(AttnError::Shape { .. })
    ));
    assert!(
        matches!(c.append(0, 0, &good, &bad_dim), Err(AttnError::Shape { arg, .. }) if arg == "v")
    );
    assert!(
        matches!(c.append(2, 0, &good, &good), Err(AttnError::InvalidArgument { arg, .. }) if arg == "layer")
    );
    assert!(
        matches!(c.gather_kv(0, 2, 0), Err(AttnError::InvalidArgument { arg, .. }) if arg == "slot")
    );
    assert!(matches!(
        c.layer_v(5),
        Err(AttnError::InvalidArgument { .. })
    ));
    assert_eq!(c.seqlens(), &[0, 0]);
    for dims in [
        [0, 1, 1, 1, 1],
        [1, 0, 1, 1, 1],
        [1, 1, 0, 1, 1],
        [1, 1, 1, 0, 1],
        [1, 1, 1, 1, 0],
    ] {
        assert!(matches!(
            StaticKvCache::new(dims[0], dims[1], dims[2], dims[3], dims[4]),
            Err(AttnError::InvalidArgument { .. })
        ));
    }
    assert!(matches!(
        StaticKvCache::new(usize::MAX / 2, 4, 4, 4, 4),
        Err(AttnError::InvalidArgument { .. })
    ));
}

#[test]
fn reorder_permutes_slots_in_every_layer() {
    let mut c = StaticKvCache::new(2, 8, 3, 1, 2).unwrap();
    step(&mut c, 0, 2, 3, 1);
    // Slot 2 grows one more token so lengths differ.
    let k = rand_tensor(&[1, 1, 1, 2], 50);
    c.append(0, 2, &k, &k).unwrap();
    c.append(1, 2, &k, &k).unwrap();
    c.advance(2, 1, 1).unwrap();
    let old: Vec<Vec<(Vec<f32>, Vec<f32>)>> = (0..2)
        .map(|l| {
            (0..3)
                .map(|s| c.gather_kv(l, s, c.seqlens()[s]).unwrap())
                .collect()
        })
        .collect();
    let old_lens = c.seqlens().to_vec();
    c.reorder(&[2, 0, 1]).unwrap();
    assert_eq!(c.seqlens(), &[old_lens[2], old_lens[0], old_lens[1]]);
    for (l, old_l) in old.iter().enumerate() {
        for (new, src) in [(0, 2), (1, 0), (2, 1)] {
            assert_eq!(c.gather_kv(l, new, c.seqlens()[new]).unwrap(), old_l[src]);
        }
    }
    // Beam search duplicates a beam: slots 0 and 1 both take old slot 1 (now at 1 = old 0).
    c.reorder(&[1, 1]).unwrap();
    assert_eq!(c.gather_kv(1, 0, 2).unwrap(), old[1][0]);
    assert_eq!(c.gather_kv(1, 1, 2).unwrap(), old[1][0]);
    assert_eq!(c.gather_kv(1, 2, 2).unwrap(), old[1][1]);
}

#[test]
fn reorder_rejects_bad_perms_and_pending_steps_without_changes() {
    let mut c = StaticKvCache::new(1, 4, 2, 1, 2).unwrap();
    step(&mut c, 0, 1, 2, 1);
    let before = c.clone();
    assert!(
        matches!(c.reorder(&[0, 2]), Err(AttnError::InvalidArgument { arg, .. }) if arg == "perm[1]")
    );
    assert!(
        matches!(c.reorder(&[0, 1, 0]), Err(AttnError::InvalidArgument { arg, .. }) if arg == "perm")
    );
    assert_eq!(c, before);
    let k = rand_tensor(&[1, 1, 1, 2], 2);
    c.append(0, 0, &k, &k).unwrap();
    let before = c.clone();
    assert!(
        matches!(c.reorder(&[1, 0]), Err(AttnError::InvalidArgument { arg, .. }) if arg == "reorder")
    );
    assert_eq!(c, before);
}

#[test]
fn reset_forgets_lengths_and_reset_slots_only_its_range() {
    let mut c = StaticKvCache::new(2, 4, 3, 1, 2).unwrap();
    step(&mut c, 0, 2, 3, 1);
    c.reset_slots(1, 1).unwrap();
    assert_eq!(c.seqlens(), &[2, 0, 2]);
    assert!(c.reset_slots(2, 2).is_err());
    c.reset();
    assert_eq!(c.seqlens(), &[0, 0, 0]);
    // The full capacity is available again.
    step(&mut c, 0, 4, 3, 2);
    assert_eq!(c.seqlens(), &[4, 4, 4]);
}
