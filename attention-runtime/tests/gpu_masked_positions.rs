//! Masked positions on the GPU against the CPU reference (`masked_positions.rs` pins the CPU
//! oracle itself): fully masked rows give zeros (never NaN), a finite bias stays finite (even
//! `f32::MIN`), and junk (NaN, +-Inf, huge values) at masked-out keys, stale cache rows and
//! pool blocks of other requests never reaches a valid row.
//! `#[ignore = "requires a CUDA GPU"]`; run through `scripts/gpu-bundle.sh` (CONTRIBUTING.md).
//! Fresh random inputs (seed printed), NaN-poisoned outputs, relative Frobenius error
//! <= 1e-2 (bf16) on the compared rows; a NaN there fails.

use attention_runtime::cuda::{DevicePagedKvCache, DeviceStaticKvCache, ElemType};
use attention_runtime::kv_cache::{BlockTable, PagedBatch, PagedKvCache, StaticKvCache};
use attention_runtime::modules::SplitMix64;
use attention_runtime::{AttentionLayer, ForwardArgs, Tensor};

mod common;
use common::{fresh_seed, layer_pair};

const TOL: f64 = 1e-2;

/// `||got - want|| / ||want||` over the `[s, b, h]` rows `(i, bi)` that `keep` selects; every
/// compared GPU value must be finite.
fn rel_err_rows(got: &Tensor, want: &Tensor, keep: impl Fn(usize, usize) -> bool) -> f64 {
    assert_eq!(got.shape(), want.shape());
    let (s, b, h) = (got.shape()[0], got.shape()[1], got.shape()[2]);
    let (mut num, mut den) = (0f64, 0f64);
    for i in 0..s {
        for bi in 0..b {
            if !keep(i, bi) {
                continue;
            }
            let o = (i * b + bi) * h;
            for (x, y) in got.data()[o..o + h].iter().zip(&want.data()[o..o + h]) {
                assert!(x.is_finite(), "non-finite GPU output at row {i} seq {bi}");
                assert!(y.is_finite(), "non-finite CPU output at row {i} seq {bi}");
                num += ((x - y) as f64).powi(2);
                den += (*y as f64).powi(2);
            }
        }
    }
    (num / den.max(1e-30)).sqrt()
}

fn junk(rng: &mut SplitMix64) -> f32 {
    match rng.next_u64() % 6 {
        0 => f32::NAN,
        1 => f32::INFINITY,
        2 => f32::NEG_INFINITY,
        3 => f32::MAX,
        4 => f32::MIN,
        _ => 1e30,
    }
}

/// Issue case 1 and 2 on the GPU: bias row 1 = `fill` on all four keys.
fn bias_row(spec: &str, fill: f32) {
    let sd = fresh_seed();
    eprintln!("seed {sd} spec {spec} fill {fill}");
    let (layer, cuda) = layer_pair(spec, sd);
    let mut rng = SplitMix64::new(sd);
    let x = Tensor::from_fn(&[4, 1, 128], |_| rng.uniform());
    let mut bias = Tensor::zeros(&[1, 1, 4, 4]);
    bias.data_mut()[4..8].fill(fill);
    let args = ForwardArgs {
        attention_bias: Some(&bias),
        ..ForwardArgs::default()
    };
    let want = layer.forward(&x, &args).unwrap().output;
    let got = cuda.forward(&x, &args).unwrap().output;
    let e = rel_err_rows(&got, &want, |_, _| true);
    assert!(e <= TOL, "rel err {e}");
    if fill == f32::NEG_INFINITY {
        assert!(
            got.data()[128..256].iter().all(|&v| v == 0.0),
            "row 1 not zeros"
        );
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn bias_neg_inf_row_gives_zeros() {
    bias_row(
        "self, heads = 2, head_dim = 64, mask = no_mask",
        f32::NEG_INFINITY,
    );
    bias_row(
        "self, heads = 2, head_dim = 64, mask = no_mask, sinks = learnable",
        f32::NEG_INFINITY,
    );
    bias_row(
        "self, heads = 2, head_dim = 64, mask = causal, sinks = off_by_one",
        f32::NEG_INFINITY,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn f32_min_bias_is_finite_logit() {
    bias_row("self, heads = 2, head_dim = 64, mask = no_mask", f32::MIN);
    bias_row("self, heads = 2, head_dim = 64, mask = no_mask", -3.0e38);
    bias_row("self, heads = 2, head_dim = 64, mask = causal", f32::MAX);
}

/// f32::MIN on random keys and 0 on the others equals masking those keys, at a size where
/// the tensor-core kernel walks several tiles.
#[test]
#[ignore = "requires a CUDA GPU"]
fn f32_min_bias_equals_mask() {
    let sd = fresh_seed();
    eprintln!("seed {sd}");
    let spec = "self, heads = 4, gqa = 2, head_dim = 128, mask = padding";
    let (layer, cuda) = layer_pair(spec, sd);
    let mut rng = SplitMix64::new(sd);
    let (s, b, h) = (200, 2, layer.config().hidden);
    let x = Tensor::from_fn(&[s, b, h], |_| rng.uniform());
    let mask = Tensor::from_fn(&[b, 1, 1, s], |n| {
        f32::from(n % s > 20 && rng.next_u64().is_multiple_of(3))
    });
    let bias = Tensor::from_fn(&[b, 1, 1, s], |n| {
        if mask.data()[n] != 0.0 {
            f32::MIN
        } else {
            0.0
        }
    });
    let by_mask = ForwardArgs {
        attention_mask: Some(&mask),
        ..ForwardArgs::default()
    };
    let none = Tensor::zeros(&[b, 1, 1, s]);
    let by_bias = ForwardArgs {
        attention_mask: Some(&none),
        attention_bias: Some(&bias),
        ..ForwardArgs::default()
    };
    let want = layer.forward(&x, &by_mask).unwrap().output;
    let got = cuda.forward(&x, &by_bias).unwrap().output;
    let e = rel_err_rows(&got, &want, |_, _| true);
    assert!(e <= TOL, "rel err {e}");
}

/// Issue case 3: `mask = padding`, s = 6, b = 2, sequence 0 has 4 valid tokens and NaN hidden
/// rows 4 and 5; and larger variants with junk, key padding, causality, windows and GQA.
#[test]
#[ignore = "requires a CUDA GPU"]
fn junk_in_padded_tokens_does_not_leak() {
    for (spec, s, b) in [
        ("self, heads = 2, head_dim = 64, mask = padding", 6, 2),
        ("self, heads = 8, gqa = 2, head_dim = 128, mask = padding, rope", 300, 3),
        (
            "self, heads = 8, gqa = 2, head_dim = 128, mask = padding_causal, qk_layernorm = rms, rope",
            300,
            3,
        ),
        (
            "self, heads = 4, head_dim = 64, mask = padding_causal, window = (50, 0), sinks = learnable",
            200,
            2,
        ),
        ("self, heads = 4, gqa = 1, head_dim = 256, mask = padding", 150, 2),
        // Head dim 80: the exact one-warp-per-row path with a partly empty channel chunk.
        (
            "self, heads = 4, gqa = 2, head_dim = 80, mask = padding_causal, rope, rotary_percent = 0.4",
            170,
            3,
        ),
    ] {
        let sd = fresh_seed();
        eprintln!("seed {sd} spec {spec}");
        let (layer, cuda) = layer_pair(spec, sd);
        let h = layer.config().hidden;
        let mut rng = SplitMix64::new(sd);
        let x = Tensor::from_fn(&[s, b, h], |_| rng.uniform());
        // The case: lengths [4, 6]; else sequence 1 full, the others random.
        let lens: Vec<usize> = (0..b)
            .map(|bi| match (s, bi) {
                (6, 0) => 4,
                (_, 1) => s,
                _ => 1 + (rng.next_u64() as usize) % s,
            })
            .collect();
        let mut mask = Tensor::zeros(&[b, 1, 1, s]);
        let mut dirty = x.clone();
        for (bi, &len) in lens.iter().enumerate() {
            for i in len..s {
                mask.data_mut()[bi * s + i] = 1.0;
                for d in 0..h {
                    dirty.data_mut()[(i * b + bi) * h + d] =
                        if s == 6 { f32::NAN } else { junk(&mut rng) };
                }
            }
        }
        let args = ForwardArgs {
            attention_mask: Some(&mask),
            ..ForwardArgs::default()
        };
        let want = layer.forward(&dirty, &args).unwrap().output;
        let got = cuda.forward(&dirty, &args).unwrap().output;
        let e = rel_err_rows(&got, &want, |i, bi| i < lens[bi]);
        assert!(e <= TOL, "{spec}: rel err {e} (lens {lens:?})");
    }
}

/// Causal masks without a mask tensor: junk tokens at the end of a sequence sit in the
/// diagonal tile of earlier rows, masked by causality (and a window): earlier rows stay exact.
#[test]
#[ignore = "requires a CUDA GPU"]
fn junk_future_tokens_under_causal_mask() {
    for (spec, s, tail) in [
        (
            "self, heads = 8, gqa = 2, head_dim = 128, mask = causal, rope",
            100,
            10,
        ),
        (
            "self, heads = 8, gqa = 2, head_dim = 128, mask = causal, rope",
            257,
            3,
        ),
        (
            "self, heads = 4, head_dim = 64, mask = causal, window = (30, 0)",
            190,
            40,
        ),
        (
            "self, heads = 4, head_dim = 256, mask = causal, sinks = off_by_one",
            70,
            5,
        ),
        (
            "self, heads = 4, head_dim = 80, mask = causal, rope",
            150,
            7,
        ),
    ] {
        let sd = fresh_seed();
        eprintln!("seed {sd} spec {spec}");
        let (layer, cuda) = layer_pair(spec, sd);
        let h = layer.config().hidden;
        let mut rng = SplitMix64::new(sd);
        let b = 2;
        let mut x = Tensor::from_fn(&[s, b, h], |_| rng.uniform());
        for i in s - tail..s {
            for d in 0..h {
                x.data_mut()[i * b * h + d] = junk(&mut rng); // sequence 0 only
            }
        }
        let args = ForwardArgs::default();
        let want = layer.forward(&x, &args).unwrap().output;
        let got = cuda.forward(&x, &args).unwrap().output;
        let e = rel_err_rows(&got, &want, |i, bi| bi == 1 || i < s - tail);
        assert!(e <= TOL, "{spec}: rel err {e}");
        // Rows that do see junk are non-finite on both backends.
        let row = |t: &Tensor, i: usize| t.data()[i * b * h..][..h].iter().any(|v| !v.is_finite());
        assert!(
            row(&want, s - 1) && row(&got, s - 1),
            "{spec}: a junk row came out finite"
        );
    }
}

/// Random masks ([b, 1, 1, sk] key padding or [b, np, sq, sk] arbitrary, fully masked rows
/// included), random -inf biases, and junk at every masked bias entry and at padded tokens.
#[test]
#[ignore = "requires a CUDA GPU"]
fn junk_random_masks_and_bias() {
    for (spec, s, b) in [
        (
            "self, heads = 4, gqa = 2, head_dim = 128, mask = arbitrary",
            160,
            2,
        ),
        (
            "self, heads = 4, gqa = 2, head_dim = 64, mask = padding, sinks = learnable",
            140,
            3,
        ),
        (
            "self, heads = 4, head_dim = 128, mask = padding_causal",
            130,
            2,
        ),
        ("self, heads = 2, head_dim = 64, mask = causal", 90, 2),
    ] {
        let sd = fresh_seed();
        eprintln!("seed {sd} spec {spec}");
        let (layer, cuda) = layer_pair(spec, sd);
        let (np, h) = (layer.config().heads, layer.config().hidden);
        let mut rng = SplitMix64::new(sd);
        let x = Tensor::from_fn(&[s, b, h], |_| rng.uniform());
        let lens: Vec<usize> = (0..b)
            .map(|_| s / 2 + (rng.next_u64() as usize) % (s / 2))
            .collect();
        let has_mask = spec.contains("padding") || spec.contains("arbitrary");
        let mut masked = vec![false; b * np * s * s];
        for bi in 0..b {
            for hh in 0..np {
                for i in 0..s {
                    let full_row = spec.contains("arbitrary") && i % 17 == 3;
                    for j in 0..s {
                        let rand = spec.contains("arbitrary") && rng.next_u64().is_multiple_of(4);
                        masked[((bi * np + hh) * s + i) * s + j] =
                            has_mask && (j >= lens[bi] || rand || full_row);
                    }
                }
            }
        }
        let mask = Tensor::from_fn(&[b, np, s, s], |n| f32::from(masked[n]));
        let mut dirty = x.clone();
        if has_mask {
            for (bi, &len) in lens.iter().enumerate() {
                for i in len..s {
                    for d in 0..h {
                        dirty.data_mut()[(i * b + bi) * h + d] = junk(&mut rng);
                    }
                }
            }
        }
        // Bias: values in [-2, 2], some -inf, junk wherever the mask (or causality) hides it.
        let causal = spec.contains("causal");
        let bias = Tensor::from_fn(&[b, np, s, s], |n| {
            let (i, j) = ((n / s) % s, n % s);
            if masked[n] || (causal && j > i) {
                junk(&mut rng)
            } else if rng.next_u64().is_multiple_of(13) {
                f32::NEG_INFINITY
            } else {
                2.0 * rng.uniform()
            }
        });
        let args = ForwardArgs {
            attention_mask: has_mask.then_some(&mask),
            attention_bias: Some(&bias),
            ..ForwardArgs::default()
        };
        let want = layer.forward(&dirty, &args).unwrap().output;
        let got = cuda.forward(&dirty, &args).unwrap().output;
        let e = rel_err_rows(&got, &want, |i, bi| !has_mask || i < lens[bi]);
        assert!(e <= TOL, "{spec}: rel err {e}");
    }
}

/// Static cache: NaN keys and values left in the cache by an earlier request (reset, not
/// cleared) never reach the next one, in prefill (over the cache) or decode (decode_splitkv).
#[test]
#[ignore = "requires a CUDA GPU"]
fn stale_static_cache_rows_do_not_leak() {
    let sd = fresh_seed();
    let spec = "self, heads = 8, gqa = 2, head_dim = 128, qk_layernorm = rms, rope, mask = causal";
    eprintln!("seed {sd} spec {spec}");
    let (layer, cuda) = layer_pair(spec, sd);
    let c = layer.config().clone();
    let mut rng = SplitMix64::new(sd);
    let (b, max_seq) = (2, 400);
    let elem = ElemType::from(c.dtype);
    let mut cpu = StaticKvCache::new(1, max_seq, b, c.groups, c.head_dim).unwrap();
    let mut dev = DeviceStaticKvCache::new(
        cuda.runtime().stream(),
        elem,
        1,
        max_seq,
        b,
        c.groups,
        c.head_dim,
    )
    .unwrap();
    let args = ForwardArgs::default();
    let nan = Tensor::from_fn(&[350, b, c.hidden], |_| f32::NAN);
    layer.prefill(&nan, &mut cpu, 0, 0, &args).unwrap();
    cuda.prefill(&nan, &mut dev, 0, 0, &args).unwrap();
    cpu.reset();
    dev.reset();
    let x = Tensor::from_fn(&[77, b, c.hidden], |_| rng.uniform());
    let want = layer.prefill(&x, &mut cpu, 0, 0, &args).unwrap().output;
    let got = cuda.prefill(&x, &mut dev, 0, 0, &args).unwrap().output;
    let e = rel_err_rows(&got, &want, |_, _| true);
    assert!(e <= TOL, "prefill rel err {e}");
    cpu.advance(0, b, 77).unwrap();
    dev.advance(0, b, 77).unwrap();
    for step in 0..5 {
        let x = Tensor::from_fn(&[1, b, c.hidden], |_| rng.uniform());
        let want = layer.decode(&x, &mut cpu, 0, 0, &args).unwrap().output;
        let got = cuda.decode(&x, &mut dev, 0, 0, &args).unwrap().output;
        let e = rel_err_rows(&got, &want, |_, _| true);
        assert!(e <= TOL, "decode step {step} rel err {e}");
        cpu.advance(0, b, 1).unwrap();
        dev.advance(0, b, 1).unwrap();
    }
}

/// Paged pool: a request whose tokens are NaN shares the batch and the pool with clean ones;
/// its blocks, released and reused by a shorter request, hold stale NaN past that request's
/// length. Neither reaches a clean request.
#[test]
#[ignore = "requires a CUDA GPU"]
fn paged_pool_junk_does_not_leak() {
    let sd = fresh_seed();
    let spec = "self, heads = 8, gqa = 2, head_dim = 128, rope, mask = causal";
    eprintln!("seed {sd} spec {spec}");
    let (layer, cuda) = layer_pair(spec, sd);
    let c = layer.config().clone();
    let mut rng = SplitMix64::new(sd);
    let (bs, blocks) = (16, 64);
    let mut cpu = PagedKvCache::new(1, blocks, bs, c.groups, c.head_dim).unwrap();
    let mut dev = DevicePagedKvCache::new(
        cuda.runtime().stream(),
        ElemType::from(c.dtype),
        1,
        blocks,
        bs,
        c.groups,
        c.head_dim,
    )
    .unwrap();
    let mut table = BlockTable::new(2, 16).unwrap();
    // Step 1: request 0 = 100 NaN tokens, request 1 = 37 clean tokens.
    for (r, len) in [(0usize, 100usize), (1, 37)] {
        let ids = cpu.allocator_mut().alloc(len.div_ceil(bs)).unwrap();
        assert_eq!(dev.allocator_mut().alloc(len.div_ceil(bs)).unwrap(), ids);
        table.set_row(r, &ids).unwrap();
    }
    let h = c.hidden;
    let mut x: Vec<f32> = vec![f32::NAN; 100 * h];
    x.extend((0..37 * h).map(|_| rng.uniform()));
    let x = Tensor::new(&[137, h], x).unwrap();
    let (cu, sk) = ([0, 100, 137], [100, 37]);
    let batch = PagedBatch {
        cu_seqlens_q: &cu,
        seqlens_k: &sk,
        block_table: &table,
    };
    let want = layer.forward_paged(&x, &mut cpu, 0, &batch).unwrap().output;
    let got = cuda.forward_paged(&x, &mut dev, 0, &batch).unwrap().output;
    let tail = |t: &Tensor| Tensor::new(&[37, 1, h], t.data()[100 * h..].to_vec()).unwrap();
    let e = rel_err_rows(&tail(&got), &tail(&want), |_, _| true);
    assert!(e <= TOL, "step 1 rel err {e}");
    // Step 2: request 0 ends; its blocks go to a new 20-token request in row 0; request 1
    // decodes one token.
    let n_old = table.row_len(0).unwrap();
    let old: Vec<u32> = table.row(0).unwrap()[..n_old]
        .iter()
        .map(|&i| i as u32)
        .collect();
    cpu.allocator_mut().release_all(&old).unwrap();
    dev.allocator_mut().release_all(&old).unwrap();
    table.clear_row(0).unwrap();
    let ids = cpu.allocator_mut().alloc(2).unwrap();
    assert_eq!(dev.allocator_mut().alloc(2).unwrap(), ids);
    table.set_row(0, &ids).unwrap();
    let x = Tensor::from_fn(&[21, h], |_| rng.uniform());
    let (cu, sk) = ([0, 20, 21], [20, 38]);
    let batch = PagedBatch {
        cu_seqlens_q: &cu,
        seqlens_k: &sk,
        block_table: &table,
    };
    let want = layer.forward_paged(&x, &mut cpu, 0, &batch).unwrap().output;
    let got = cuda.forward_paged(&x, &mut dev, 0, &batch).unwrap().output;
    let as3 = |t: &Tensor| Tensor::new(&[21, 1, h], t.data().to_vec()).unwrap();
    let e = rel_err_rows(&as3(&got), &as3(&want), |_, _| true);
    assert!(e <= TOL, "step 2 rel err {e}");
}

/// Packed (THD) input with a key-padding mask per sequence `[n, 1, 1, max_len]`: junk at the
/// masked tokens of each sequence stays out of every other row (and every other sequence).
#[test]
#[ignore = "requires a CUDA GPU"]
fn junk_in_packed_masked_tokens_does_not_leak() {
    let sd = fresh_seed();
    let spec = "self, heads = 8, gqa = 2, head_dim = 128, mask = padding_causal, rope";
    eprintln!("seed {sd} spec {spec}");
    let (layer, cuda) = layer_pair(spec, sd);
    let h = layer.config().hidden;
    let mut rng = SplitMix64::new(sd);
    let lens = [150usize, 37, 260];
    let keep = [120usize, 37, 200]; // valid tokens at the front of each sequence
    let mut cu = vec![0i32];
    for l in lens {
        cu.push(cu.last().unwrap() + l as i32);
    }
    let t = *cu.last().unwrap() as usize;
    let max_len = *lens.iter().max().unwrap();
    let mut x = Tensor::from_fn(&[t, h], |_| rng.uniform());
    let mut mask = Tensor::zeros(&[lens.len(), 1, 1, max_len]);
    let mut valid = vec![false; t];
    for (n, (&l, &k)) in lens.iter().zip(&keep).enumerate() {
        for i in 0..l {
            let tok = cu[n] as usize + i;
            if i < k {
                valid[tok] = true;
            } else {
                mask.data_mut()[n * max_len + i] = 1.0;
                for d in 0..h {
                    x.data_mut()[tok * h + d] = junk(&mut rng);
                }
            }
        }
    }
    let args = ForwardArgs {
        attention_mask: Some(&mask),
        packed: Some(attention_runtime::PackedSeqParams {
            cu_seqlens_q: &cu,
            cu_seqlens_kv: &[],
            max_seqlen_q: 0,
            max_seqlen_kv: 0,
        }),
        ..ForwardArgs::default()
    };
    let want = layer.forward(&x, &args).unwrap().output;
    let got = cuda.forward(&x, &args).unwrap().output;
    let as3 = |o: &Tensor| Tensor::new(&[t, 1, h], o.data().to_vec()).unwrap();
    let e = rel_err_rows(&as3(&got), &as3(&want), |i, _| valid[i]);
    assert!(e <= TOL, "rel err {e}");
}
