//! Paged KV cache storage: allocator, block table, append, gather, and their errors.

use attention_runtime::kv_cache::{
    paged_offset, BlockAllocator, BlockTable, PagedBatch, PagedKvCache, DEFAULT_BLOCK_SIZE,
};
use attention_runtime::{AttnError, Tensor};

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

// ---------------------------------------------------------------- allocator

#[test]
fn allocator_hands_out_distinct_blocks_and_recycles_them() {
    let mut a = BlockAllocator::new(5).unwrap();
    let x = a.alloc(3).unwrap();
    assert_eq!(x, vec![0, 1, 2]);
    assert_eq!((a.num_free(), a.num_allocated()), (2, 3));
    assert!(x.iter().all(|&id| a.refcount(id).unwrap() == 1));
    assert!(a.release(1).unwrap());
    assert!(!a.is_allocated(1));
    let y = a.alloc(3).unwrap();
    assert_eq!(y.len(), 3);
    assert!(y.contains(&1), "the freed block is reused: {y:?}");
    let mut all: Vec<u32> = x.iter().filter(|&&i| i != 1).copied().chain(y).collect();
    all.sort();
    assert_eq!(all, vec![0, 1, 2, 3, 4]);
    assert_eq!(a.num_free(), 0);
    assert!(a.alloc(0).unwrap().is_empty());
}

#[test]
fn pool_exhaustion_is_an_error_and_changes_nothing() {
    let mut a = BlockAllocator::new(4).unwrap();
    a.alloc(3).unwrap();
    let before = a.clone();
    let err = a.alloc(2).unwrap_err();
    assert!(
        matches!(
            err,
            AttnError::PoolExhausted {
                requested: 2,
                free: 1,
                total: 4
            }
        ),
        "{err}"
    );
    assert_eq!(a, before);
    assert_eq!(a.alloc(1).unwrap(), vec![3]);
}

#[test]
fn pool_exhaustion_through_the_cache_leaves_contents_and_allocator_unchanged() {
    let mut c = PagedKvCache::new(1, 2, 16, 1, 4).unwrap();
    let ids = c.allocator_mut().alloc(2).unwrap();
    let mut table = BlockTable::new(1, 2).unwrap();
    table.set_row(0, &ids).unwrap();
    let k = rand_tensor(&[20, 1, 4], 1);
    let batch = PagedBatch {
        cu_seqlens_q: &[0, 20],
        seqlens_k: &[20],
        block_table: &table,
    };
    c.append_paged(0, &k, &k, &batch).unwrap();
    let before = c.clone();
    assert!(matches!(
        c.allocator_mut().alloc(1),
        Err(AttnError::PoolExhausted { .. })
    ));
    assert_eq!(c, before);
}

#[test]
fn shared_prefix_block_is_freed_only_by_its_last_holder() {
    let mut a = BlockAllocator::new(4).unwrap();
    let prefix = a.alloc(1).unwrap()[0];
    a.retain(prefix).unwrap(); // a second request shares it
    a.retain(prefix).unwrap(); // and a third
    assert_eq!(a.refcount(prefix).unwrap(), 3);
    assert!(!a.release(prefix).unwrap());
    assert!(!a.release(prefix).unwrap());
    assert!(a.is_allocated(prefix));
    assert_eq!(a.num_free(), 3);
    assert!(a.release(prefix).unwrap());
    assert_eq!(a.num_free(), 4);
    // A double release is an error, and so is retaining a free block.
    assert!(matches!(a.release(prefix), Err(AttnError::BlockId { .. })));
    assert!(matches!(a.retain(prefix), Err(AttnError::BlockId { .. })));
}

#[test]
fn unknown_ids_and_over_release_are_block_id_errors_without_changes() {
    let mut a = BlockAllocator::new(3).unwrap();
    let ids = a.alloc(2).unwrap();
    let before = a.clone();
    assert!(matches!(
        a.release(3),
        Err(AttnError::BlockId { got: 3, .. })
    ));
    assert!(matches!(a.retain(u32::MAX), Err(AttnError::BlockId { .. })));
    assert!(matches!(a.refcount(7), Err(AttnError::BlockId { .. })));
    // release_all is all-or-nothing: the second entry of a block held once fails.
    let err = a.release_all(&[ids[0], ids[1], ids[1]]).unwrap_err();
    assert!(
        matches!(&err, AttnError::BlockId { arg, .. } if arg == "ids[2]"),
        "{err}"
    );
    assert!(
        matches!(a.release_all(&[ids[0], 2]), Err(AttnError::BlockId { arg, .. }) if arg == "ids[1]")
    );
    assert_eq!(a, before);
    assert_eq!(a.release_all(&ids).unwrap(), 2);
    assert_eq!(a.num_free(), 3);
    assert!(matches!(
        BlockAllocator::new(0),
        Err(AttnError::InvalidArgument { .. })
    ));
}

// ---------------------------------------------------------------- block table

#[test]
fn block_table_rows_and_errors() {
    let mut t = BlockTable::new(2, 3).unwrap();
    assert_eq!(t.as_slice(), &[-1; 6]);
    t.set_row(1, &[4, 2]).unwrap();
    t.push(1, 7).unwrap();
    assert_eq!(t.row(1).unwrap(), &[4, 2, 7]);
    assert_eq!(t.row_len(1).unwrap(), 3);
    assert!(matches!(
        t.push(1, 0),
        Err(AttnError::CacheCapacity {
            capacity: 3,
            needed: 4,
            ..
        })
    ));
    assert!(matches!(
        t.set_row(0, &[1, 2, 3, 4]),
        Err(AttnError::CacheCapacity { .. })
    ));
    assert!(matches!(
        t.set_row(0, &[u32::MAX]),
        Err(AttnError::BlockId { .. })
    ));
    assert!(matches!(t.row(2), Err(AttnError::InvalidArgument { .. })));
    assert_eq!(t.row(0).unwrap(), &[-1, -1, -1]);
    t.clear_row(1).unwrap();
    assert_eq!(t.row_len(1).unwrap(), 0);

    let err = BlockTable::from_raw(2, 2, vec![0, -1, -1, 3]).unwrap_err();
    assert!(
        matches!(&err, AttnError::BlockId { arg, got: 3, .. } if arg == "block_table[1][1]"),
        "{err}"
    );
    let err = BlockTable::from_raw(1, 2, vec![0, -5]).unwrap_err();
    assert!(
        matches!(&err, AttnError::BlockId { arg, got: -5, .. } if arg == "block_table[0][1]"),
        "{err}"
    );
    assert!(matches!(
        BlockTable::from_raw(1, 2, vec![0]),
        Err(AttnError::InvalidArgument { .. })
    ));
}

#[test]
fn block_table_validation_names_the_entry() {
    let mut a = BlockAllocator::new(4).unwrap();
    let ids = a.alloc(2).unwrap();
    let t = BlockTable::from_raw(2, 2, vec![ids[0] as i32, ids[1] as i32, 3, -1]).unwrap();
    let err = t.validate(&a).unwrap_err();
    assert!(
        matches!(&err, AttnError::BlockId { arg, got: 3, .. } if arg == "block_table[1][0]"),
        "{err}"
    );
    let t = BlockTable::from_raw(1, 2, vec![0, 9]).unwrap();
    let err = t.validate(&a).unwrap_err();
    assert!(
        matches!(&err, AttnError::BlockId { arg, got: 9, .. } if arg == "block_table[0][1]"),
        "{err}"
    );
    BlockTable::from_raw(1, 2, vec![ids[1] as i32, -1])
        .unwrap()
        .validate(&a)
        .unwrap();
}

// ---------------------------------------------------------------- pool geometry

#[test]
fn block_size_must_be_a_power_of_two_at_least_16() {
    for bs in [0, 1, 8, 15, 24, 48, 100, 257] {
        let err = PagedKvCache::new(1, 2, bs, 1, 4).unwrap_err();
        assert!(
            matches!(&err, AttnError::InvalidArgument { arg, .. } if arg == "block_size"),
            "{bs}: {err}"
        );
    }
    for bs in [16, 32, 64, 128, DEFAULT_BLOCK_SIZE, 512, 1024] {
        let c = PagedKvCache::new(2, 3, bs, 2, 4).unwrap();
        assert_eq!(c.layer_k(1).unwrap().len(), 3 * bs * 2 * 4);
    }
    assert_eq!(DEFAULT_BLOCK_SIZE, 256);
    assert!(matches!(
        PagedKvCache::new(1, 0, 16, 1, 4),
        Err(AttnError::InvalidArgument { .. })
    ));
    assert!(matches!(
        PagedKvCache::new(0, 1, 16, 1, 4),
        Err(AttnError::InvalidArgument { .. })
    ));
    assert!(matches!(
        PagedKvCache::new(1, i32::MAX as usize + 1, 16, 1, 4),
        Err(AttnError::InvalidArgument { .. })
    ));
    assert!(matches!(
        PagedKvCache::new(1 << 20, 1 << 20, 1 << 20, 8, 128),
        Err(AttnError::InvalidArgument { .. })
    ));
}

#[test]
fn offsets_are_64_bit() {
    // Block 65536 of a 256-token block with 8 groups of 128: 2^16 * 2^8 * 2^3 * 2^7 = 2^34
    // elements, past u32 (and 2^35 bytes in bf16).
    let off = paged_offset(65536, 0, 256, 8, 128).unwrap();
    assert_eq!(off as u64, 1u64 << 34);
    assert!(off as u64 > u32::MAX as u64);
    let (block, bs, ng, hn) = (65536u64, 256u64, 8u64, 128u64);
    // 32-bit math would wrap to 0.
    assert_eq!(((block * bs * ng * hn) as u32), 0);
    let last = paged_offset(65536, 255, 256, 8, 128).unwrap();
    assert_eq!(last as u64, (block * bs + 255) * ng * hn);
    let big = paged_offset(i32::MAX as u32, 4095, 4096, 16, 256).unwrap();
    assert_eq!(big as u128, ((i32::MAX as u128) * 4096 + 4095) * 16 * 256);
    assert_eq!(paged_offset(u32::MAX, 1, usize::MAX / 2, 1, 1), None);
}

// ---------------------------------------------------------------- append / gather

/// A cache with `lens.len()` requests, request `i` given `ceil(lens[i]/bs) + extra` blocks.
fn setup(bs: usize, lens: &[usize], extra: usize) -> (PagedKvCache, BlockTable) {
    let max_blocks = lens
        .iter()
        .map(|l| l.div_ceil(bs) + extra)
        .max()
        .unwrap_or(1)
        .max(1);
    let total: usize = lens.iter().map(|l| l.div_ceil(bs) + extra).sum::<usize>() + 2;
    let mut c = PagedKvCache::new(2, total, bs, 2, 4).unwrap();
    let mut t = BlockTable::new(lens.len(), max_blocks).unwrap();
    for (i, l) in lens.iter().enumerate() {
        let ids = c.allocator_mut().alloc(l.div_ceil(bs) + extra).unwrap();
        t.set_row(i, &ids).unwrap();
    }
    (c, t)
}

fn cu(lens: &[usize]) -> Vec<i32> {
    let mut v = vec![0i32];
    for l in lens {
        v.push(v.last().unwrap() + *l as i32);
    }
    v
}

#[test]
fn append_then_gather_round_trips_across_block_boundaries() {
    let bs = 16;
    // Three requests: a 40-token prefill, then a 1-token decode and a 10-token chunk, over
    // two steps; keys end up spanning 1 to 4 blocks.
    let (mut c, t) = setup(bs, &[41, 5, 50], 0);
    let w = 2 * 4;
    let mut expect_k = vec![Vec::new(); 3];
    let mut expect_v = vec![Vec::new(); 3];
    let steps: [[usize; 3]; 2] = [[40, 4, 40], [1, 1, 10]];
    for (s, new) in steps.iter().enumerate() {
        let seqlens: Vec<i32> = (0..3)
            .map(|i| steps[..=s].iter().map(|st| st[i]).sum::<usize>() as i32)
            .collect();
        let total: usize = new.iter().sum();
        let cuq = cu(new);
        let batch = PagedBatch {
            cu_seqlens_q: &cuq,
            seqlens_k: &seqlens,
            block_table: &t,
        };
        for layer in 0..2 {
            let k = rand_tensor(&[total, 2, 4], (s * 10 + layer) as u64);
            let v = rand_tensor(&[total, 2, 4], (s * 10 + layer + 5) as u64);
            c.append_paged(layer, &k, &v, &batch).unwrap();
            if layer == 1 {
                for i in 0..3 {
                    let r = cuq[i] as usize * w..cuq[i + 1] as usize * w;
                    expect_k[i].extend_from_slice(&k.data()[r.clone()]);
                    expect_v[i].extend_from_slice(&v.data()[r]);
                }
            }
        }
    }
    for i in 0..3 {
        let len = expect_k[i].len() / w;
        let (k, v) = c.gather_kv(1, t.row(i).unwrap(), len).unwrap();
        assert_eq!(k, expect_k[i], "request {i}");
        assert_eq!(v, expect_v[i], "request {i}");
        // A prefix gather is a prefix.
        let (k3, _) = c.gather_kv(1, t.row(i).unwrap(), 3).unwrap();
        assert_eq!(k3, expect_k[i][..3 * w]);
    }
    // Layer 0 holds different data than layer 1.
    assert_ne!(
        c.gather_kv(0, t.row(0).unwrap(), 41).unwrap().0,
        expect_k[0]
    );
}

#[test]
fn gather_errors() {
    let (c, t) = setup(16, &[20], 0);
    let row = t.row(0).unwrap();
    assert!(matches!(
        c.gather_kv(0, row, 33),
        Err(AttnError::CacheCapacity {
            capacity: 32,
            needed: 33,
            ..
        })
    ));
    assert!(
        matches!(c.gather_kv(2, row, 1), Err(AttnError::InvalidArgument { arg, .. }) if arg == "layer")
    );
    let err = c.gather_kv(0, &[0, 17], 20).unwrap_err();
    assert!(
        matches!(&err, AttnError::BlockId { arg, got: 17, .. } if arg == "row[1]"),
        "{err}"
    );
    let free = (0..c.num_blocks() as i32)
        .find(|&i| !c.allocator().is_allocated(i as u32))
        .unwrap();
    assert!(matches!(
        c.gather_kv(0, &[free], 5),
        Err(AttnError::BlockId { .. })
    ));
    assert!(c.gather_kv(0, row, 0).unwrap().0.is_empty());
}

/// Run `append_paged` with a broken batch and check it fails with `check` and writes nothing.
fn rejects(
    c: &mut PagedKvCache,
    t: &BlockTable,
    cuq: &[i32],
    seqlens: &[i32],
    tokens: usize,
    check: impl Fn(&AttnError) -> bool,
) {
    let before = c.clone();
    let k = rand_tensor(&[tokens, 2, 4], 77);
    let batch = PagedBatch {
        cu_seqlens_q: cuq,
        seqlens_k: seqlens,
        block_table: t,
    };
    let err = c.append_paged(0, &k, &k, &batch).unwrap_err();
    assert!(check(&err), "unexpected error: {err}");
    assert_eq!(*c, before, "a failing append changed the cache ({err})");
}

#[test]
fn append_validates_everything_before_writing() {
    let (mut c, t) = setup(16, &[20, 30], 0);
    // Request 0 is valid and would be written first: the failure in request 1 must still
    // leave it unwritten.
    let cuq_err =
        |e: &AttnError| matches!(e, AttnError::CuSeqlens { arg, .. } if arg == "cu_seqlens_q");
    rejects(&mut c, &t, &[1, 4, 8], &[4, 4], 8, cuq_err); // first not 0
    rejects(&mut c, &t, &[0, 5, 4], &[5, 4], 4, cuq_err); // decreasing
    rejects(&mut c, &t, &[0, 4, 8], &[4, 4], 9, cuq_err); // last != T
    rejects(&mut c, &t, &[], &[], 0, cuq_err); // empty
    rejects(
        &mut c,
        &t,
        &[0, 4, 8],
        &[4],
        8,
        |e| matches!(e, AttnError::InvalidArgument { arg, .. } if arg == "seqlens_k"),
    );
    rejects(
        &mut c,
        &t,
        &[0, 4, 8],
        &[4, 3],
        8,
        |e| matches!(e, AttnError::InvalidArgument { arg, .. } if arg == "seqlens_k[1]"),
    );
    rejects(
        &mut c,
        &t,
        &[0, 4, 8],
        &[4, -1],
        8,
        |e| matches!(e, AttnError::InvalidArgument { arg, .. } if arg == "seqlens_k[1]"),
    );
    // Row 1 has 2 blocks of 16: 33 keys do not fit.
    rejects(
        &mut c,
        &t,
        &[0, 4, 8],
        &[4, 33],
        8,
        |e| matches!(e, AttnError::CacheCapacity { arg, capacity: 32, needed: 33 } if arg.starts_with("block_table row 1")),
    );
    // More requests than rows.
    rejects(
        &mut c,
        &t,
        &[0, 1, 2, 3],
        &[1, 1, 1],
        3,
        |e| matches!(e, AttnError::InvalidArgument { arg, .. } if arg == "block_table"),
    );
    // Out-of-range and freed block ids.
    let bad = BlockTable::from_raw(2, 2, vec![0, 1, 2, 99]).unwrap();
    rejects(
        &mut c,
        &bad,
        &[0, 4, 8],
        &[4, 20],
        8,
        |e| matches!(e, AttnError::BlockId { arg, got: 99, .. } if arg == "block_table[1][1]"),
    );
    let free = (0..c.num_blocks() as u32)
        .find(|&i| !c.allocator().is_allocated(i))
        .unwrap();
    let bad = BlockTable::from_raw(2, 2, vec![0, 1, free as i32, -1]).unwrap();
    rejects(
        &mut c,
        &bad,
        &[0, 4, 8],
        &[4, 4],
        8,
        |e| matches!(e, AttnError::BlockId { arg, .. } if arg == "block_table[1][0]"),
    );
    // Shapes and layer.
    let before = c.clone();
    let batch = PagedBatch {
        cu_seqlens_q: &[0, 4, 8],
        seqlens_k: &[4, 4],
        block_table: &t,
    };
    let k = rand_tensor(&[8, 2, 4], 1);
    let bad_k = rand_tensor(&[8, 1, 4], 1);
    let short_v = rand_tensor(&[7, 2, 4], 1);
    assert!(
        matches!(c.append_paged(0, &bad_k, &k, &batch), Err(AttnError::Shape { arg, .. }) if arg == "k")
    );
    assert!(
        matches!(c.append_paged(0, &k, &short_v, &batch), Err(AttnError::Shape { arg, .. }) if arg == "v")
    );
    assert!(
        matches!(c.append_paged(2, &k, &k, &batch), Err(AttnError::InvalidArgument { arg, .. }) if arg == "layer")
    );
    assert_eq!(c, before);
    c.append_paged(0, &k, &k, &batch).unwrap();
    assert_ne!(c, before);
}

#[test]
fn writing_into_a_shared_block_is_refused_until_copied() {
    let bs = 16;
    let mut c = PagedKvCache::new(1, 6, bs, 2, 4).unwrap();
    // Request A: a 16-token prompt in one block, plus a second block.
    let a_ids = c.allocator_mut().alloc(2).unwrap();
    let mut t = BlockTable::new(2, 2).unwrap();
    t.set_row(0, &a_ids).unwrap();
    let prompt = rand_tensor(&[16, 2, 4], 3);
    let b0 = PagedBatch {
        cu_seqlens_q: &[0, 16],
        seqlens_k: &[16],
        block_table: &t,
    };
    c.append_paged(0, &prompt, &prompt, &b0).unwrap();
    // Request B shares A's full first block (a common prefix) and gets its own second one.
    c.allocator_mut().retain(a_ids[0]).unwrap();
    let b_own = c.allocator_mut().alloc(1).unwrap()[0];
    t.set_row(1, &[a_ids[0], b_own]).unwrap();
    // Both decode one token: each writes its own second block. Fine.
    let new = rand_tensor(&[2, 2, 4], 4);
    let step = PagedBatch {
        cu_seqlens_q: &[0, 1, 2],
        seqlens_k: &[17, 17],
        block_table: &t,
    };
    c.append_paged(0, &new, &new, &step).unwrap();
    assert_eq!(
        c.gather_kv(0, t.row(1).unwrap(), 16).unwrap().0,
        prompt.data()
    );
    // Rewriting position 15 of B would change A's prefix: refused.
    rejects(
        &mut c,
        &t,
        &[0, 0, 3],
        &[17, 18],
        3,
        |e| matches!(e, AttnError::BlockId { arg, .. } if arg == "block_table[1][0]"),
    );
    // Two requests writing the same (unshared) block: refused.
    let dup = BlockTable::from_raw(
        2,
        2,
        vec![
            a_ids[0] as i32,
            a_ids[1] as i32,
            a_ids[0] as i32,
            a_ids[1] as i32,
        ],
    )
    .unwrap();
    rejects(&mut c, &dup, &[0, 1, 2], &[18, 19], 2, |e| {
        matches!(e, AttnError::BlockId { .. })
    });
    // Copy-on-write: B copies the shared block, drops its hold, and may then write.
    let copy = c.allocator_mut().alloc(1).unwrap()[0];
    c.copy_block(a_ids[0], copy).unwrap();
    c.allocator_mut().release(a_ids[0]).unwrap();
    t.set_row(1, &[copy, b_own]).unwrap();
    let fix = rand_tensor(&[3, 2, 4], 5);
    let batch = PagedBatch {
        cu_seqlens_q: &[0, 0, 3],
        seqlens_k: &[17, 18],
        block_table: &t,
    };
    c.append_paged(0, &fix, &fix, &batch).unwrap();
    assert_eq!(
        c.gather_kv(0, t.row(0).unwrap(), 16).unwrap().0,
        prompt.data(),
        "A's prefix is intact"
    );
    let (kb, _) = c.gather_kv(0, t.row(1).unwrap(), 18).unwrap();
    assert_eq!(&kb[15 * 8..18 * 8], fix.data());
    assert!(
        matches!(c.copy_block(a_ids[0], 5), Err(AttnError::BlockId { arg, .. }) if arg == "dst")
    );
}

#[test]
fn empty_requests_and_decode_steps_append_only_their_tokens() {
    let (mut c, t) = setup(16, &[17, 3, 2], 0);
    let k = rand_tensor(&[17 + 2, 2, 4], 9);
    let batch = PagedBatch {
        cu_seqlens_q: &[0, 17, 17, 19],
        seqlens_k: &[17, 0, 2],
        block_table: &t,
    };
    c.append_paged(1, &k, &k, &batch).unwrap();
    assert_eq!(
        c.gather_kv(1, t.row(2).unwrap(), 2).unwrap().0,
        k.data()[17 * 8..]
    );
    assert!(c
        .gather_kv(1, t.row(1).unwrap(), 3)
        .unwrap()
        .0
        .iter()
        .all(|&x| x == 0.0));
    // Decode: one token for request 1 at position 2 (its first two positions stay zero).
    let d = rand_tensor(&[1, 2, 4], 10);
    let batch = PagedBatch {
        cu_seqlens_q: &[0, 0, 1],
        seqlens_k: &[17, 3],
        block_table: &t,
    };
    c.append_paged(1, &d, &d, &batch).unwrap();
    let (k1, _) = c.gather_kv(1, t.row(1).unwrap(), 3).unwrap();
    assert_eq!(&k1[16..], d.data());
    assert!(k1[..16].iter().all(|&x| x == 0.0));
}
