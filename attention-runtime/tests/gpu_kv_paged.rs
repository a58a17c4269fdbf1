//! GPU paged KV cache (`CudaLayer::forward_paged`: qkv_prep -> append_kv -> paged ->
//! linear_proj) against the CPU reference, the static cache and itself; and a CUDA-graph
//! decode step replayed against eager runs.
//! `#[ignore = "requires a CUDA GPU"]`; run through `scripts/gpu-bundle.sh` (CONTRIBUTING.md).
//! Fresh random inputs (seed printed), NaN-poisoned outputs, relative Frobenius error
//! <= 1e-2 (bf16); a NaN fails.

use attention_codegen::render::{configs_for_head_dim, Phase};
use attention_runtime::cuda::decode::{
    decode_splitkv_kernels, launch_decode_splitkv, DecodeGraph, DecodeSplitKvArgs, RopeTables,
};
use attention_runtime::cuda::{CudaLayer, DevicePagedKvCache, DeviceStaticKvCache, DeviceTensor};
use attention_runtime::kv_cache::{BlockTable, PagedBatch, PagedKvCache};
use attention_runtime::modules::SplitMix64;
use attention_runtime::reference::RopeTable;
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{AttentionLayer, AttnError, ForwardArgs, Tensor};
use cudarc::driver::DevicePtr;
use half::bf16;

mod common;
use common::{fresh_seed, layer_pair, rel_err};

const TOL: f64 = 1e-2;

fn cu(q_lens: &[usize]) -> Vec<i32> {
    let mut c = vec![0i32];
    for &q in q_lens {
        c.push(c[c.len() - 1] + q as i32);
    }
    c
}

struct Setup {
    layer: SpecLayer,
    cuda: CudaLayer,
    h: usize,
    ng: usize,
    hn: usize,
    elem: attention_runtime::cuda::ElemType,
}

fn setup(spec: &str, sd: u64) -> Setup {
    let (layer, cuda) = layer_pair(spec, sd);
    let config = layer.config().clone();
    Setup {
        layer,
        cuda,
        h: config.hidden,
        ng: config.groups,
        hn: config.head_dim,
        elem: attention_runtime::cuda::ElemType::from(config.dtype),
    }
}

impl Setup {
    fn paged(&self, blocks: usize, bs: usize) -> DevicePagedKvCache {
        DevicePagedKvCache::new(
            self.cuda.runtime().stream(),
            self.elem,
            1,
            blocks,
            bs,
            self.ng,
            self.hn,
        )
        .unwrap()
    }
}

/// Grow row `r` of `table` to cover `len` keys, allocating the same ids from every allocator.
fn grow(
    allocs: &mut [&mut attention_runtime::kv_cache::BlockAllocator],
    table: &mut BlockTable,
    r: usize,
    len: usize,
    bs: usize,
) {
    let need = len.div_ceil(bs).saturating_sub(table.row_len(r).unwrap());
    let mut first: Option<Vec<u32>> = None;
    for a in allocs.iter_mut() {
        let ids = a.alloc(need).unwrap();
        if let Some(f) = &first {
            assert_eq!(f, &ids, "allocators out of step");
        } else {
            first = Some(ids);
        }
    }
    for id in first.unwrap() {
        table.push(r, id).unwrap();
    }
}

/// Steps of a mixed batch: rows 0 and 1 turn into decode requests after their first
/// chunk; rows 2 and 3 are prefilled in chunks (row 3 empty at first).
const STEPS: [[usize; 4]; 3] = [[23, 40, 17, 0], [1, 1, 30, 50], [1, 1, 1, 20]];

fn paged_matches_cpu(spec: &str, bs: usize) {
    let sd = fresh_seed();
    eprintln!("seed {sd} spec {spec} block_size {bs}");
    let mut rng = SplitMix64::new(sd);
    let s = setup(spec, sd);
    let blocks = 4 * 100usize.div_ceil(bs) + 4;
    let mut cpu = PagedKvCache::new(1, blocks, bs, s.ng, s.hn).unwrap();
    let mut dev = s.paged(blocks, bs);
    let mut table = BlockTable::new(4, 100usize.div_ceil(bs) + 1).unwrap();
    let mut lens = [0usize; 4];
    for (step, q_lens) in STEPS.iter().enumerate() {
        for r in 0..4 {
            lens[r] += q_lens[r];
            grow(
                &mut [cpu.allocator_mut(), dev.allocator_mut()],
                &mut table,
                r,
                lens[r],
                bs,
            );
        }
        let cu_q = cu(q_lens);
        let seqlens: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let batch = PagedBatch {
            cu_seqlens_q: &cu_q,
            seqlens_k: &seqlens,
            block_table: &table,
        };
        let t = cu_q[4] as usize;
        let x = Tensor::from_fn(&[t, s.h], |_| rng.uniform() * 1.7);
        let want = s.layer.forward_paged(&x, &mut cpu, 0, &batch).unwrap();
        let got = s.cuda.forward_paged(&x, &mut dev, 0, &batch).unwrap();
        let e = rel_err(&got.output, &want.output);
        assert!(e <= TOL, "step {step} rel err {e}");
    }
    // The device pool holds what the CPU pool holds (rotated keys, values).
    for (r, &len) in lens.iter().enumerate() {
        let row = table.row(r).unwrap();
        let (gk, gv) = dev.gather_kv_host(0, row, len).unwrap();
        let (ck, cv) = cpu.gather_kv(0, row, len).unwrap();
        let ck = Tensor::new(&[len, s.ng, s.hn], ck).unwrap();
        let cv = Tensor::new(&[len, s.ng, s.hn], cv).unwrap();
        assert!(rel_err(&gk, &ck) <= TOL, "cached k of row {r}");
        assert!(rel_err(&gv, &cv) <= TOL, "cached v of row {r}");
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn paged_mixed_batch_matches_cpu_block_16() {
    paged_matches_cpu(
        "self, heads=8, gqa=2, head_dim=128, qk_layernorm=rms, rope, mask=causal",
        16,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn paged_mixed_batch_matches_cpu_block_256() {
    paged_matches_cpu(
        "self, heads=8, gqa=2, head_dim=128, qk_layernorm=rms, rope, mask=causal",
        256,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn paged_window_sinks_mqa_interleaved_matches_cpu() {
    paged_matches_cpu(
        "self, heads=6, gqa=1, head_dim=64, hidden=320, rope=interleaved, window=(20, 0), sinks=learnable, mask=causal",
        32,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn paged_mixed_batch_hd80_matches_cpu_block_16() {
    // Head dim 80 (Phi-2's shape: MHA, biases, partial rope over 32 channels).
    paged_matches_cpu(
        "self, heads=4, head_dim=80, rope, rotary_percent=0.4, mask=causal",
        16,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn paged_equals_static() {
    let sd = fresh_seed();
    let spec = "self, heads=8, gqa=4, head_dim=64, rope, mask=causal";
    eprintln!("seed {sd} spec {spec}");
    let mut rng = SplitMix64::new(sd);
    let st = setup(spec, sd);
    let (b, s, steps, bs) = (2usize, 33usize, 3usize, 16usize);
    let mut stat = DeviceStaticKvCache::new(
        st.cuda.runtime().stream(),
        st.elem,
        1,
        s + steps,
        b,
        st.ng,
        st.hn,
    )
    .unwrap();
    let mut dev = st.paged(16, bs);
    let mut table = BlockTable::new(b, 8).unwrap();
    let args = ForwardArgs::default();
    let mut lens = vec![0usize; b];
    for step in 0..=steps {
        let q = if step == 0 { s } else { 1 };
        let x = Tensor::from_fn(&[q, b, st.h], |_| rng.uniform() * 1.7);
        let want = if step == 0 {
            st.cuda.prefill(&x, &mut stat, 0, 0, &args).unwrap()
        } else {
            st.cuda.decode(&x, &mut stat, 0, 0, &args).unwrap()
        };
        stat.advance(0, b, q).unwrap();
        // Packed rows: request r's token p is static row p * b + r.
        let packed = Tensor::from_fn(&[q * b, st.h], |i| {
            let (row, c) = (i / st.h, i % st.h);
            let (r, p) = (row / q, row % q);
            x.data()[(p * b + r) * st.h + c]
        });
        for (r, l) in lens.iter_mut().enumerate() {
            *l += q;
            grow(&mut [dev.allocator_mut()], &mut table, r, *l, bs);
        }
        let cu_q = cu(&vec![q; b]);
        let seqlens: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let batch = PagedBatch {
            cu_seqlens_q: &cu_q,
            seqlens_k: &seqlens,
            block_table: &table,
        };
        let got = st.cuda.forward_paged(&packed, &mut dev, 0, &batch).unwrap();
        let unpacked = Tensor::from_fn(&[q, b, st.h], |i| {
            let (row, c) = (i / st.h, i % st.h);
            let (p, r) = (row / b, row % b);
            got.output.data()[(r * q + p) * st.h + c]
        });
        let e = rel_err(&unpacked, &want.output);
        assert!(e <= TOL, "step {step} paged vs static rel err {e}");
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn paged_mixed_batch_equals_separate_calls() {
    let sd = fresh_seed();
    let spec = "self, heads=8, gqa=2, head_dim=128, rope, mask=causal";
    eprintln!("seed {sd} spec {spec}");
    let mut rng = SplitMix64::new(sd);
    let st = setup(spec, sd);
    let bs = 16;
    let mut mixed = st.paged(64, bs);
    let mut single = st.paged(64, bs);
    let mut table = BlockTable::new(4, 16).unwrap();
    let mut lens = [0usize; 4];
    for (step, q_lens) in STEPS.iter().enumerate() {
        for r in 0..4 {
            lens[r] += q_lens[r];
            grow(
                &mut [mixed.allocator_mut(), single.allocator_mut()],
                &mut table,
                r,
                lens[r],
                bs,
            );
        }
        let cu_q = cu(q_lens);
        let seqlens: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let t = cu_q[4] as usize;
        let x = Tensor::from_fn(&[t, st.h], |_| rng.uniform() * 1.7);
        let batch = PagedBatch {
            cu_seqlens_q: &cu_q,
            seqlens_k: &seqlens,
            block_table: &table,
        };
        let got = st.cuda.forward_paged(&x, &mut mixed, 0, &batch).unwrap();
        let mut sep = Vec::new();
        for r in 0..4 {
            let (a, e) = (cu_q[r] as usize, cu_q[r + 1] as usize);
            let one = BlockTable::from_raw(1, 16, table.row(r).unwrap().to_vec()).unwrap();
            let cu1 = [0, (e - a) as i32];
            let sk1 = [seqlens[r]];
            let b1 = PagedBatch {
                cu_seqlens_q: &cu1,
                seqlens_k: &sk1,
                block_table: &one,
            };
            let xr = Tensor::new(&[e - a, st.h], x.data()[a * st.h..e * st.h].to_vec()).unwrap();
            let y = st.cuda.forward_paged(&xr, &mut single, 0, &b1).unwrap();
            sep.extend_from_slice(y.output.data());
        }
        let sep = Tensor::new(&[t, st.h], sep).unwrap();
        let e = rel_err(&got.output, &sep);
        assert!(e <= TOL, "step {step} mixed vs separate rel err {e}");
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn permuting_blocks_in_the_pool_changes_nothing() {
    let sd = fresh_seed();
    let spec = "self, heads=4, gqa=2, head_dim=64, rope, mask=causal";
    eprintln!("seed {sd} spec {spec}");
    let mut rng = SplitMix64::new(sd);
    let st = setup(spec, sd);
    let bs = 16;
    let stream = st.cuda.runtime().stream().clone();
    let mut a = st.paged(64, bs);
    let mut b = st.paged(64, bs);
    let mut ta = BlockTable::new(4, 16).unwrap();
    let mut lens = [0usize; 4];
    let mut xs = Vec::new();
    for q_lens in &STEPS {
        let t: usize = q_lens.iter().sum();
        xs.push(Tensor::from_fn(&[t, st.h], |_| rng.uniform() * 1.7));
    }
    // Step 0 on both caches with the same table.
    for r in 0..4 {
        lens[r] += STEPS[0][r];
        grow(
            &mut [a.allocator_mut(), b.allocator_mut()],
            &mut ta,
            r,
            lens[r],
            bs,
        );
    }
    let run = |cache: &mut DevicePagedKvCache, table: &BlockTable, step: usize, lens: &[usize]| {
        let cu_q = cu(&STEPS[step]);
        let seqlens: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let batch = PagedBatch {
            cu_seqlens_q: &cu_q,
            seqlens_k: &seqlens,
            block_table: table,
        };
        st.cuda
            .forward_paged(&xs[step], cache, 0, &batch)
            .unwrap()
            .output
    };
    let ya = run(&mut a, &ta, 0, &lens);
    let yb = run(&mut b, &ta, 0, &lens);
    assert_eq!(ya.data(), yb.data());
    // Move every used block of `b` to a fresh block (in reverse order), wipe the old ones
    // with a never-written (zero) block, release them and remap the table.
    let zero = b.allocator_mut().alloc(1).unwrap()[0];
    let mut tb = BlockTable::new(4, 16).unwrap();
    let mut old_ids = Vec::new();
    for r in (0..4).rev() {
        let row: Vec<i32> = ta.row(r).unwrap()[..ta.row_len(r).unwrap()].to_vec();
        for &id in row.iter().rev() {
            let new = b.allocator_mut().alloc(1).unwrap()[0];
            b.copy_block(&stream, id as u32, new).unwrap();
            b.copy_block(&stream, zero, id as u32).unwrap();
            old_ids.push((r, id as u32, new));
        }
    }
    for r in 0..4 {
        let mut ids: Vec<u32> = old_ids
            .iter()
            .filter(|(rr, _, _)| *rr == r)
            .map(|&(_, _, n)| n)
            .collect();
        ids.reverse();
        tb.set_row(r, &ids).unwrap();
    }
    for &(_, id, _) in &old_ids {
        b.allocator_mut().release(id).unwrap();
    }
    assert_ne!(ta, tb);
    for (step, q_lens) in STEPS.iter().enumerate().skip(1) {
        for r in 0..4 {
            lens[r] += q_lens[r];
            grow(&mut [a.allocator_mut()], &mut ta, r, lens[r], bs);
            grow(&mut [b.allocator_mut()], &mut tb, r, lens[r], bs);
        }
        let ya = run(&mut a, &ta, step, &lens);
        let yb = run(&mut b, &tb, step, &lens);
        assert!(ya.data().iter().all(|x| x.is_finite()));
        assert_eq!(ya.data(), yb.data(), "step {step}: permuted pool differs");
    }
}

fn snapshot(c: &DevicePagedKvCache) -> (Vec<u32>, Vec<u32>) {
    let (k, v) = c.layer_kv(0).unwrap();
    let bits = |t: &DeviceTensor| {
        t.to_host()
            .unwrap()
            .data()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    (bits(k), bits(v))
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn paged_errors_leave_the_device_pool_unchanged() {
    let sd = fresh_seed();
    let spec = "self, heads=4, gqa=2, head_dim=64, rope, mask=causal";
    eprintln!("seed {sd} spec {spec}");
    let mut rng = SplitMix64::new(sd);
    let st = setup(spec, sd);
    let bs = 16;
    let mut c = st.paged(8, bs);
    let mut table = BlockTable::new(2, 4).unwrap();
    for r in 0..2 {
        grow(&mut [c.allocator_mut()], &mut table, r, 20, bs);
    }
    let cu_q = [0, 20, 40];
    let sk = [20, 20];
    let x = Tensor::from_fn(&[40, st.h], |_| rng.uniform());
    let ok = PagedBatch {
        cu_seqlens_q: &cu_q,
        seqlens_k: &sk,
        block_table: &table,
    };
    st.cuda.forward_paged(&x, &mut c, 0, &ok).unwrap();
    let before = snapshot(&c);
    let free = c.allocator().num_free();
    let x1 = Tensor::from_fn(&[2, st.h], |_| rng.uniform());
    let cu1 = [0, 1, 2];

    // Pool exhaustion.
    let e = c.allocator_mut().alloc(free + 1).unwrap_err();
    assert!(matches!(e, AttnError::PoolExhausted { .. }), "{e}");
    assert_eq!(c.allocator().num_free(), free);

    let check = |c: &mut DevicePagedKvCache,
                 x: &Tensor,
                 cu_q: &[i32],
                 sk: &[i32],
                 table: &BlockTable,
                 layer: usize,
                 want: &dyn Fn(&AttnError) -> bool| {
        let batch = PagedBatch {
            cu_seqlens_q: cu_q,
            seqlens_k: sk,
            block_table: table,
        };
        let e = st.cuda.forward_paged(x, c, layer, &batch).unwrap_err();
        assert!(want(&e), "unexpected error {e}");
        assert!(snapshot(c) == before, "the pool changed after {e}");
    };
    // Past the row's blocks (capacity).
    check(&mut c, &x1, &cu1, &[21, 33], &table, 0, &|e: &AttnError| {
        matches!(e, AttnError::CacheCapacity { .. })
    });
    // Bad block ids: outside the pool, and a free block.
    let mut bad = table.as_slice().to_vec();
    bad[1] = 99;
    let bad_t = BlockTable::from_raw(2, 4, bad).unwrap();
    check(&mut c, &x1, &cu1, &[21, 21], &bad_t, 0, &|e: &AttnError| {
        matches!(e, AttnError::BlockId { .. })
    });
    let mut bad = table.as_slice().to_vec();
    let free_id = (0..8u32).find(|&i| !c.allocator().is_allocated(i)).unwrap();
    bad[5] = free_id as i32;
    let bad_t = BlockTable::from_raw(2, 4, bad).unwrap();
    check(&mut c, &x1, &cu1, &[21, 21], &bad_t, 0, &|e: &AttnError| {
        matches!(e, AttnError::BlockId { .. })
    });
    // Inconsistent lengths.
    check(
        &mut c,
        &x1,
        &[0, 1, 3],
        &[21, 21],
        &table,
        0,
        &|e: &AttnError| matches!(e, AttnError::CuSeqlens { .. }),
    );
    check(
        &mut c,
        &x1,
        &[0, 2, 1],
        &[21, 21],
        &table,
        0,
        &|e: &AttnError| matches!(e, AttnError::CuSeqlens { .. }),
    );
    check(
        &mut c,
        &x1,
        &cu1,
        &[21],
        &table,
        0,
        &|e: &AttnError| matches!(e, AttnError::InvalidArgument { arg, .. } if arg == "seqlens_k"),
    );
    check(
        &mut c,
        &x1,
        &cu1,
        &[21, 0],
        &table,
        0,
        &|e: &AttnError| matches!(e, AttnError::InvalidArgument { arg, .. } if arg == "seqlens_k[1]"),
    );
    // Wrong layer, wrong hidden shape.
    check(
        &mut c,
        &x1,
        &cu1,
        &[21, 21],
        &table,
        1,
        &|e: &AttnError| matches!(e, AttnError::InvalidArgument { arg, .. } if arg == "layer"),
    );
    let x3 = Tensor::from_fn(&[2, st.h + 1], |_| 0.5);
    check(&mut c, &x3, &cu1, &[21, 21], &table, 0, &|e: &AttnError| {
        matches!(e, AttnError::Shape { .. })
    });
    // Both requests writing one block; writing into a shared block.
    let mut dup = table.as_slice().to_vec();
    dup[5] = dup[1];
    let dup_t = BlockTable::from_raw(2, 4, dup).unwrap();
    check(&mut c, &x1, &cu1, &[21, 21], &dup_t, 0, &|e: &AttnError| {
        matches!(e, AttnError::BlockId { .. })
    });
    let shared = table.row(0).unwrap()[1] as u32;
    c.allocator_mut().retain(shared).unwrap();
    check(&mut c, &x1, &cu1, &[21, 21], &table, 0, &|e: &AttnError| {
        matches!(e, AttnError::BlockId { .. })
    });
    c.allocator_mut().release(shared).unwrap();
    // A valid step still works and does write.
    let batch = PagedBatch {
        cu_seqlens_q: &cu1,
        seqlens_k: &[21, 21],
        block_table: &table,
    };
    st.cuda.forward_paged(&x1, &mut c, 0, &batch).unwrap();
    assert!(snapshot(&c) != before);
}

/// A decode step (`decode_splitkv` split + combine) captured in a CUDA graph over fixed buffers:
/// every replay gives the eager run's output bit for bit, and replays see buffer updates.
#[test]
#[ignore = "requires a CUDA GPU"]
fn decode_graph_replay_is_bitwise_equal_to_eager() {
    let sd = fresh_seed();
    let spec = "self, heads=8, gqa=2, head_dim=128, rope, mask=causal";
    eprintln!("seed {sd} spec {spec}");
    let mut rng = SplitMix64::new(sd);
    let st = setup(spec, sd);
    let config = st.layer.config().clone();
    let (b, s, steps) = (3usize, 300usize, 3usize);
    let (np, ng, hn) = (config.heads, config.groups, config.head_dim);
    let max_seq = s + steps + 1;
    let rt = st.cuda.runtime().clone();
    let stream = rt.stream().clone();
    let mut cache = DeviceStaticKvCache::new(&stream, st.elem, 1, max_seq, b, ng, hn).unwrap();
    let x = Tensor::from_fn(&[s, b, st.h], |_| rng.uniform() * 1.7);
    st.cuda
        .prefill(&x, &mut cache, 0, 0, &ForwardArgs::default())
        .unwrap();
    cache.advance(0, b, s).unwrap();
    // Fixed buffers.
    let rand_dev = |rng: &mut SplitMix64, shape: &[usize]| {
        let t = Tensor::from_fn(shape, |_| rng.uniform());
        DeviceTensor::from_host(&stream, &t, st.elem).unwrap()
    };
    let mut q = rand_dev(&mut rng, &[b, np, hn]);
    let mut k = rand_dev(&mut rng, &[b, ng, hn]);
    let mut v = rand_dev(&mut rng, &[b, ng, hn]);
    let mut out = rand_dev(&mut rng, &[b, np, hn]);
    let mut seqlens = stream.clone_htod(&vec![s as i32; b]).unwrap();
    let splits = 4usize;
    let o_part = stream.alloc_zeros::<f32>(splits * b * np * hn).unwrap();
    let lse_part = stream.alloc_zeros::<f32>(splits * b * np).unwrap();
    let lse = stream.alloc_zeros::<f32>(np * b).unwrap();
    let table = RopeTable::new(&config.rope.unwrap(), hn).unwrap();
    let (cs, sn) = table.cos_sin(max_seq, 1.0);
    let rope = RopeTables::new(&stream, &cs, &sn, max_seq, 1.0).unwrap();
    let ptr_t = |t: &DeviceTensor| {
        let (p, _g) = t.typed::<bf16>("t").unwrap().device_ptr(&stream);
        p
    };
    let ptr_f = |t: &cudarc::driver::CudaSlice<f32>| {
        let (p, _g) = t.device_ptr(&stream);
        p
    };
    let a = DecodeSplitKvArgs {
        q: ptr_t(&q),
        k_new: ptr_t(&k),
        v_new: ptr_t(&v),
        k_cache: ptr_t(cache.layer_k(0).unwrap()),
        v_cache: ptr_t(cache.layer_v(0).unwrap()),
        cache_seqlens: {
            let (p, _g) = seqlens.device_ptr(&stream);
            p
        },
        rope_cos: ptr_f(&rope.cos),
        rope_sin: ptr_f(&rope.sin),
        o_part: ptr_f(&o_part),
        lse_part: ptr_f(&lse_part),
        out: ptr_t(&out),
        lse: ptr_f(&lse),
        sinks: 0,
        gate: 0,
        batch: b as i32,
        batch_offset: 0,
        max_batch: b as i32,
        num_heads: np as i32,
        num_groups: ng as i32,
        num_splits: splits as i32,
        num_tokens: 1,
        softmax_scale: config.softmax_scale,
        window_left: -1,
        window_right: -1,
    };
    let fcfg = configs_for_head_dim(&config.spec, hn)
        .unwrap()
        .into_iter()
        .find(|c| c.phase == Phase::DecodeSplitKv && !c.paged_kv && c.row_blocks == 1)
        .unwrap();
    let (key, split_f, combine_f) = decode_splitkv_kernels(&rt, &fcfg).unwrap();
    let graph = DecodeGraph::capture(&rt, &key, &split_f, &combine_f, &a).unwrap();
    let mut prev: Option<Vec<u32>> = None;
    for step in 0..steps {
        // New contents in the same buffers: q, k, v and the positions.
        for t in [&mut q, &mut k, &mut v] {
            let shape = t.shape().to_vec();
            let fresh = rand_dev(&mut rng, &shape);
            stream
                .memcpy_dtod(
                    fresh.typed::<bf16>("fresh").unwrap(),
                    t.typed_mut::<bf16>("t").unwrap(),
                )
                .unwrap();
        }
        stream
            .memcpy_htod(&vec![(s + step) as i32; b], &mut seqlens)
            .unwrap();
        out.fill_nan().unwrap();
        launch_decode_splitkv(&stream, &key, &split_f, &combine_f, &a).unwrap();
        stream.synchronize().unwrap();
        let eager: Vec<u32> = out
            .to_host()
            .unwrap()
            .data()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert!(eager.iter().all(|&x| f32::from_bits(x).is_finite()));
        out.fill_nan().unwrap();
        stream.synchronize().unwrap();
        graph.replay().unwrap();
        let replay: Vec<u32> = out
            .to_host()
            .unwrap()
            .data()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert_eq!(
            eager, replay,
            "step {step}: replay differs from the eager run"
        );
        if let Some(p) = &prev {
            assert_ne!(p, &eager, "step {step}: the output did not change");
        }
        prev = Some(eager);
    }
}

/// Beam-search reorder of the device static cache matches the CPU cache's reorder (contents,
/// lengths, and the next decode step); bad permutations change nothing.
#[test]
#[ignore = "requires a CUDA GPU"]
fn static_device_reorder_matches_cpu() {
    use attention_runtime::kv_cache::StaticKvCache;
    let sd = fresh_seed();
    let spec = "self, heads=4, gqa=2, head_dim=64, rope, mask=causal";
    eprintln!("seed {sd} spec {spec}");
    let mut rng = SplitMix64::new(sd);
    let st = setup(spec, sd);
    let stream = st.cuda.runtime().stream().clone();
    let (b, s, max_seq) = (3usize, 19usize, 32usize);
    let mut cpu = StaticKvCache::new(1, max_seq, b, st.ng, st.hn).unwrap();
    let mut dev = DeviceStaticKvCache::new(&stream, st.elem, 1, max_seq, b, st.ng, st.hn).unwrap();
    let args = ForwardArgs::default();
    let x = Tensor::from_fn(&[s, b, st.h], |_| rng.uniform() * 1.7);
    st.layer.prefill(&x, &mut cpu, 0, 0, &args).unwrap();
    st.cuda.prefill(&x, &mut dev, 0, 0, &args).unwrap();
    cpu.advance(0, b, s).unwrap();
    dev.advance(0, b, s).unwrap();
    // Slot 2 gets 5 more tokens, so lengths differ.
    let x2 = Tensor::from_fn(&[5, 1, st.h], |_| rng.uniform() * 1.7);
    st.layer.prefill(&x2, &mut cpu, 0, 2, &args).unwrap();
    st.cuda.prefill(&x2, &mut dev, 0, 2, &args).unwrap();
    cpu.advance(2, 1, 5).unwrap();
    dev.advance(2, 1, 5).unwrap();
    let bits = |d: &DeviceStaticKvCache| -> Vec<u32> {
        let k = d.layer_k(0).unwrap().to_host().unwrap();
        k.data().iter().map(|x| x.to_bits()).collect()
    };
    let before = bits(&dev);
    for bad in [vec![0, 1, 2, 0], vec![0, 3]] {
        let e = dev.reorder(&stream, &bad).unwrap_err();
        assert!(matches!(e, AttnError::InvalidArgument { .. }), "{e}");
        assert_eq!(bits(&dev), before);
        assert_eq!(dev.seqlens(), &[s, s, s + 5]);
    }
    let perm = [2, 0, 0];
    cpu.reorder(&perm).unwrap();
    dev.reorder(&stream, &perm).unwrap();
    assert_eq!(dev.seqlens(), &[s + 5, s, s]);
    for slot in 0..b {
        let len = dev.seqlens()[slot];
        let (gk, gv) = dev.gather_kv_host(0, slot, len).unwrap();
        let (ck, cv) = cpu.gather_kv(0, slot, len).unwrap();
        let ck = Tensor::new(&[len, st.ng, st.hn], ck).unwrap();
        let cv = Tensor::new(&[len, st.ng, st.hn], cv).unwrap();
        assert!(rel_err(&gk, &ck) <= TOL, "reordered k of slot {slot}");
        assert!(rel_err(&gv, &cv) <= TOL, "reordered v of slot {slot}");
    }
    let x3 = Tensor::from_fn(&[1, b, st.h], |_| rng.uniform() * 1.7);
    let want = st.layer.decode(&x3, &mut cpu, 0, 0, &args).unwrap();
    let got = st.cuda.decode(&x3, &mut dev, 0, 0, &args).unwrap();
    let e = rel_err(&got.output, &want.output);
    assert!(e <= TOL, "decode after reorder rel err {e}");
}

/// Fill every row of every block of `dev`'s pool (layer 0) with NaN: one throwaway request of
/// NaN tokens owns the whole pool, is appended, and gives its blocks back, in `cpu` too so
/// both allocators stay in step. Whatever the later steps leave unwritten (unused blocks, the
/// tail of a request's last block) then holds stale NaN.
fn poison_pool(s: &Setup, cpu: &mut PagedKvCache, dev: &mut DevicePagedKvCache) {
    let (blocks, bs) = (dev.num_blocks(), dev.block_size());
    let ids = cpu.allocator_mut().alloc(blocks).unwrap();
    assert_eq!(dev.allocator_mut().alloc(blocks).unwrap(), ids);
    let mut table = BlockTable::new(1, blocks).unwrap();
    table.set_row(0, &ids).unwrap();
    let t = blocks * bs;
    let (cu, sk) = ([0, t as i32], [t as i32]);
    let batch = PagedBatch {
        cu_seqlens_q: &cu,
        seqlens_k: &sk,
        block_table: &table,
    };
    let x = Tensor::from_fn(&[t, s.h], |_| f32::NAN);
    s.cuda.forward_paged(&x, dev, 0, &batch).unwrap();
    cpu.allocator_mut().release_all(&ids).unwrap();
    dev.allocator_mut().release_all(&ids).unwrap();
}

/// Steps of six requests whose decode requests (1 to 16 new tokens: one-token decode rows,
/// short chunks, speculative steps) have different lengths and sit between prefill chunks
/// (17+ tokens) in every order: interleaved, decode-first, decode-last, all decode, and
/// multi-token requests of up to 16 tokens beside one-token rows.
const SPLIT_STEPS: [[usize; 6]; 6] = [
    [3, 70, 300, 1, 0, 129],
    [1, 37, 1, 1, 129, 1],
    [1, 1, 1, 1, 5, 20],
    [30, 1, 1, 1, 1, 1],
    [16, 2, 9, 1, 17, 4],
    [1, 1, 1, 1, 1, 1],
];

/// A paged mixed batch whose decode rows run on the split-KV decode kernel and whose prefill
/// chunks run on the paged tensor-core kernel, against the CPU reference: NaN-poisoned
/// outputs, a pool full of stale NaN, every step run twice on the device (bitwise equal: the
/// second run rewrites the same k/v and must read the same values).
fn split_decode_matches_cpu(spec: &str, bs: usize) {
    let sd = fresh_seed();
    eprintln!("seed {sd} spec {spec} block_size {bs}");
    let mut rng = SplitMix64::new(sd);
    let s = setup(spec, sd);
    assert!(
        s.cuda.paged_decode_config().is_some(),
        "this GPU should run the paged split-KV decode kernel"
    );
    let total: Vec<usize> = (0..6)
        .map(|r| SPLIT_STEPS.iter().map(|q| q[r]).sum())
        .collect();
    let max_blocks = total.iter().max().unwrap().div_ceil(bs);
    let blocks = total.iter().map(|l| l.div_ceil(bs)).sum::<usize>() + 3;
    let mut cpu = PagedKvCache::new(1, blocks, bs, s.ng, s.hn).unwrap();
    let mut dev = s.paged(blocks, bs);
    poison_pool(&s, &mut cpu, &mut dev);
    let mut table = BlockTable::new(6, max_blocks).unwrap();
    let mut lens = [0usize; 6];
    for (step, q_lens) in SPLIT_STEPS.iter().enumerate() {
        for r in 0..6 {
            lens[r] += q_lens[r];
            grow(
                &mut [cpu.allocator_mut(), dev.allocator_mut()],
                &mut table,
                r,
                lens[r],
                bs,
            );
        }
        let cu_q = cu(q_lens);
        let seqlens: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let batch = PagedBatch {
            cu_seqlens_q: &cu_q,
            seqlens_k: &seqlens,
            block_table: &table,
        };
        let t = cu_q[6] as usize;
        let x = Tensor::from_fn(&[t, s.h], |_| rng.uniform() * 1.7);
        let want = s.layer.forward_paged(&x, &mut cpu, 0, &batch).unwrap();
        let got = s.cuda.forward_paged(&x, &mut dev, 0, &batch).unwrap();
        let e = rel_err(&got.output, &want.output);
        assert!(e <= TOL, "step {step} ({q_lens:?}) rel err {e}");
        let again = s.cuda.forward_paged(&x, &mut dev, 0, &batch).unwrap();
        let bits = |t: &Tensor| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&again.output),
            bits(&got.output),
            "step {step}: a repeated launch differs"
        );
        // Each decode row alone (its own batch of one) gives what it gave in the mix, within
        // bf16 rounding (the split count depends on the batch).
        for r in (0..6).filter(|&r| q_lens[r] == 1) {
            let one = BlockTable::from_raw(1, max_blocks, table.row(r).unwrap().to_vec()).unwrap();
            let (cu1, sk1) = ([0, 1], [seqlens[r]]);
            let b1 = PagedBatch {
                cu_seqlens_q: &cu1,
                seqlens_k: &sk1,
                block_table: &one,
            };
            let a = cu_q[r] as usize;
            let xr = Tensor::new(&[1, s.h], x.data()[a * s.h..(a + 1) * s.h].to_vec()).unwrap();
            let y = s.cuda.forward_paged(&xr, &mut dev, 0, &b1).unwrap();
            let w = Tensor::new(
                &[1, s.h],
                want.output.data()[a * s.h..(a + 1) * s.h].to_vec(),
            )
            .unwrap();
            let e = rel_err(&y.output, &w);
            assert!(e <= TOL, "step {step} request {r} alone: rel err {e}");
        }
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn split_decode_rows_gqa_match_cpu_block_16() {
    // 4 heads per group: a 16-token request is 64 rows, the four-row-block kernel.
    let s = setup("self, heads=8, gqa=2, head_dim=128, rope, mask=causal", 1);
    let key = |t: usize| s.cuda.paged_decode_config_for(t).unwrap().key();
    assert!(key(1).ends_with("_paged_w4"), "{}", key(1));
    assert!(key(5).ends_with("_paged_rb2_w4"), "{}", key(5));
    assert!(key(16).ends_with("_paged_rb4_w8"), "{}", key(16));
    split_decode_matches_cpu(
        "self, heads=8, gqa=2, head_dim=128, qk_layernorm=rms, rope, mask=causal",
        16,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn split_decode_rows_window_sinks_match_cpu_block_64() {
    split_decode_matches_cpu(
        "self, heads=6, gqa=2, head_dim=64, hidden=320, rope=interleaved, window=(40, 0), sinks=learnable, mask=causal",
        64,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn split_decode_rows_off_by_one_gate_match_cpu_block_256() {
    split_decode_matches_cpu(
        "self, heads=16, gqa=4, head_dim=128, rope, sinks=off_by_one, output_gate, mask=causal",
        256,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn split_decode_rows_hd80_match_cpu_block_64() {
    // Head dim 80: the paged split-KV decode kernel's q staging and merge leave the empty
    // lanes out; rope over all 80 channels (qkv_prep), GQA, gate, learnable sink.
    split_decode_matches_cpu(
        "self, heads=8, gqa=2, head_dim=80, qk_layernorm=rms, rope, sinks=learnable, output_gate, mask=causal",
        64,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn split_decode_rows_hd256_mqa_match_cpu_block_16() {
    split_decode_matches_cpu(
        "self, heads=4, gqa=1, head_dim=256, hidden=512, rope, window=(100, 0), mask=causal",
        16,
    );
}
