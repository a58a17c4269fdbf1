//! Masked positions on the CPU reference (the oracle of every GPU test): a row masked entirely
//! (by the mask, causality, the window or a `-inf` bias) gives zeros and LSE `-inf` (the sink
//! logit when a sink keeps the row non-empty); a finite bias, even `f32::MIN`, is a finite
//! logit; whatever a masked-out key holds (NaN, Inf, huge values, in K, V or the bias) changes
//! nothing, bitwise. GPU counterparts: `gpu_masked_positions.rs`.

use attention_codegen::{MaskType, Window};
use attention_runtime::modules::SplitMix64;
use attention_runtime::reference::{attend_sequence, AttendParams, SeqDims, SinkLogits};
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{AttentionLayer, ForwardArgs, RuntimeDims, Tensor};
use proptest::prelude::*;

fn layer(spec: &str, seed: u64) -> SpecLayer {
    let config = SpecLayer::config_from_str(spec, &RuntimeDims::default()).unwrap();
    SpecLayer::init(config, seed).unwrap()
}

fn uniform(rng: &mut SplitMix64, shape: &[usize]) -> Tensor {
    Tensor::from_fn(shape, |_| rng.uniform())
}

/// The `[s, b, h]` row `(i, bi)` of a tensor.
fn row(t: &Tensor, i: usize, bi: usize) -> &[f32] {
    let (b, h) = (t.shape()[1], t.shape()[2]);
    &t.data()[(i * b + bi) * h..][..h]
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Issue case 1: spec `self, heads = 2, head_dim = 64, mask = no_mask`, hidden `[4, 1, 128]`,
/// bias `[1, 1, 4, 4]` zeros except row 1 = -inf: row 1 is zeros, the others are untouched.
#[test]
fn bias_neg_inf_row_gives_zeros_not_nan() {
    let l = layer("self, heads = 2, head_dim = 64, mask = no_mask", 7);
    let mut rng = SplitMix64::new(11);
    let x = uniform(&mut rng, &[4, 1, 128]);
    let mut bias = Tensor::zeros(&[1, 1, 4, 4]);
    bias.data_mut()[4..8].fill(f32::NEG_INFINITY);
    let args = ForwardArgs {
        attention_bias: Some(&bias),
        ..ForwardArgs::default()
    };
    let out = l.forward(&x, &args).unwrap().output;
    assert!(
        out.data().iter().all(|v| v.is_finite()),
        "NaN in the output"
    );
    assert!(
        row(&out, 1, 0).iter().all(|&v| v == 0.0),
        "row 1 is not zeros"
    );
    let plain = l.forward(&x, &ForwardArgs::default()).unwrap().output;
    for i in [0, 2, 3] {
        assert_eq!(bits(row(&out, i, 0)), bits(row(&plain, i, 0)), "row {i}");
    }
}

fn attend(q: &[f32], k: &[f32], v: &[f32], dims: SeqDims, p: &AttendParams) -> (Vec<f32>, f32) {
    let r = attend_sequence(q, k, v, dims, p).unwrap();
    (r.out, r.lse[0])
}

const ONE_Q_TWO_K: SeqDims = SeqDims {
    sq: 1,
    sk: 2,
    heads: 1,
    groups: 1,
    head_dim: 2,
};

/// Issue case 1 at the core level: one query, two keys, bias -inf on both: zeros, LSE -inf;
/// with a sink column the LSE is the sink's logit and the output still zeros.
#[test]
fn core_fully_masked_by_bias() {
    let (q, k, v) = ([0.3, -0.2], [0.5, 0.1, -0.4, 0.9], [1.0, 2.0, 3.0, 4.0]);
    let bias = |_: usize, _: usize, _: usize| f32::NEG_INFINITY;
    let mut p = AttendParams::new(0.7, MaskType::NoMask);
    p.bias_fn = Some(&bias);
    let (out, lse) = attend(&q, &k, &v, ONE_Q_TWO_K, &p);
    assert_eq!(out, [0.0, 0.0]);
    assert_eq!(lse, f32::NEG_INFINITY);
    p.sinks = Some(SinkLogits::OffByOne);
    let (out, lse) = attend(&q, &k, &v, ONE_Q_TWO_K, &p);
    assert_eq!((out, lse), (vec![0.0, 0.0], 0.0));
    let s = [1.25f32];
    p.sinks = Some(SinkLogits::PerHead(&s));
    let (out, lse) = attend(&q, &k, &v, ONE_Q_TWO_K, &p);
    assert_eq!((out, lse), (vec![0.0, 0.0], 1.25));
    // The same through the window (every key outside it) and through the mask.
    let mut p = AttendParams::new(0.7, MaskType::CausalBottomRight);
    p.window = Some(Window { left: 0, right: 0 });
    let m = |_: usize, _: usize, j: usize| j == 1;
    p.mask_fn = Some(&m);
    let (out, lse) = attend(&q, &k, &v, ONE_Q_TWO_K, &p);
    assert_eq!((out, lse), (vec![0.0, 0.0], f32::NEG_INFINITY));
}

/// Issue case 2: a row of equal finite biases is a uniform softmax (the mean of V), even at
/// f32::MIN; f32::MIN on some keys and 0 on others equals masking those keys.
#[test]
fn huge_finite_bias_stays_finite() {
    let (q, k, v) = ([0.3, -0.2], [0.5, 0.1, -0.4, 0.9], [1.0, 2.0, 3.0, 4.0]);
    let min = |_: usize, _: usize, _: usize| f32::MIN;
    let mut p = AttendParams::new(0.7, MaskType::NoMask);
    p.bias_fn = Some(&min);
    let (out, lse) = attend(&q, &k, &v, ONE_Q_TWO_K, &p);
    assert_eq!(out, [2.0, 3.0], "uniform softmax = mean of V");
    assert!(lse.is_finite() || lse == f32::NEG_INFINITY, "{lse}");
    assert!(lse < -1e38, "{lse}");
    let first = |_: usize, _: usize, j: usize| if j == 0 { f32::MIN } else { 0.0 };
    p.bias_fn = Some(&first);
    let (out, _) = attend(&q, &k, &v, ONE_Q_TWO_K, &p);
    let masked = |_: usize, _: usize, j: usize| j == 0;
    let mut pm = AttendParams::new(0.7, MaskType::NoMask);
    pm.mask_fn = Some(&masked);
    let (want, _) = attend(&q, &k, &v, ONE_Q_TWO_K, &pm);
    assert_eq!(out, want);
    assert_eq!(out, [3.0, 4.0]);
}

/// Issue case 2 through the layer: bias row 1 = f32::MIN on all four keys gives the uniform
/// average of the values, finite.
#[test]
fn layer_f32_min_bias_row_is_uniform() {
    let l = layer("self, heads = 2, head_dim = 64, mask = no_mask", 7);
    let mut rng = SplitMix64::new(12);
    let x = uniform(&mut rng, &[4, 1, 128]);
    let mut bias = Tensor::zeros(&[1, 1, 4, 4]);
    bias.data_mut()[4..8].fill(f32::MIN);
    let args = ForwardArgs {
        attention_bias: Some(&bias),
        ..ForwardArgs::default()
    };
    let out = l.forward(&x, &args).unwrap().output;
    assert!(out.data().iter().all(|v| v.is_finite()));
    // Every logit of row 1 is absorbed into the same huge constant: a uniform softmax,
    // bitwise the same for any such constant (the mean-of-V value is checked at the core
    // level above).
    let mut bias2 = Tensor::zeros(&[1, 1, 4, 4]);
    bias2.data_mut()[4..8].fill(-3.0e38);
    let args2 = ForwardArgs {
        attention_bias: Some(&bias2),
        ..ForwardArgs::default()
    };
    let out2 = l.forward(&x, &args2).unwrap().output;
    assert_eq!(bits(row(&out, 1, 0)), bits(row(&out2, 1, 0)));
    let plain = l.forward(&x, &ForwardArgs::default()).unwrap().output;
    assert_ne!(bits(row(&out, 1, 0)), bits(row(&plain, 1, 0)));
}

/// Issue case 3: `mask = padding`, s = 6, b = 2; sequence 0 has 4 valid tokens and its hidden
/// rows 4 and 5 are NaN: every valid row is finite and bitwise equal to the run with zeros
/// there.
#[test]
fn nan_padding_rows_do_not_leak() {
    let l = layer("self, heads = 2, head_dim = 64, mask = padding", 3);
    let mut rng = SplitMix64::new(13);
    let clean = uniform(&mut rng, &[6, 2, 128]);
    let mut dirty = clean.clone();
    let mut zeroed = clean.clone();
    for i in [4, 5] {
        dirty.data_mut()[(i * 2) * 128..][..128].fill(f32::NAN);
        zeroed.data_mut()[(i * 2) * 128..][..128].fill(0.0);
    }
    let mut mask = Tensor::zeros(&[2, 1, 1, 6]);
    mask.data_mut()[4] = 1.0;
    mask.data_mut()[5] = 1.0;
    let args = ForwardArgs {
        attention_mask: Some(&mask),
        ..ForwardArgs::default()
    };
    let got = l.forward(&dirty, &args).unwrap().output;
    let want = l.forward(&zeroed, &args).unwrap().output;
    for (i, bi) in (0..4).map(|i| (i, 0)).chain((0..6).map(|i| (i, 1))) {
        assert!(
            row(&got, i, bi).iter().all(|v| v.is_finite()),
            "row {i} seq {bi}"
        );
        assert_eq!(bits(row(&got, i, bi)), bits(row(&want, i, bi)));
    }
}

/// One junk value: NaN, +-Inf, huge or f32::MIN/MAX.
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

/// A random attention problem with a random mask; the junked copy has junk in K and V rows
/// of keys masked for every query of every head, and in the bias at every masked position.
fn junk_case(seed: u64) {
    let mut rng = SplitMix64::new(seed);
    let mut r = |n: u64| (rng.next_u64() % n) as usize;
    let groups = 1 + r(2);
    let heads = groups * (1 + r(3));
    let (sq, sk, hn) = (1 + r(9), 1 + r(12), 2 + 2 * r(4));
    let sq = sq.min(sk);
    let mask = [
        MaskType::NoMask,
        MaskType::Causal,
        MaskType::CausalBottomRight,
        MaskType::Padding,
        MaskType::Arbitrary,
    ][r(5)];
    let mask = if mask == MaskType::Causal && sq != sk {
        MaskType::CausalBottomRight
    } else {
        mask
    };
    let window = (r(3) == 0).then(|| Window {
        left: r(4) as i64,
        right: if r(2) == 0 { -1 } else { r(3) as i64 },
    });
    let dims = SeqDims {
        sq,
        sk,
        heads,
        groups,
        head_dim: hn,
    };
    let mut rng = SplitMix64::new(seed ^ 0xabc);
    let mut gen = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.uniform()).collect() };
    let q = gen(sq * heads * hn);
    let (k, v) = (gen(sk * groups * hn), gen(sk * groups * hn));
    let bias_vals = gen(heads * sq * sk);
    let key_pad: Vec<bool> = (0..sk).map(|j| (seed >> (j % 60)) & 3 == 0).collect();
    let arb: Vec<bool> = (0..heads * sq * sk)
        .map(|n| (seed.wrapping_mul(n as u64 + 1) >> 17).is_multiple_of(5))
        .collect();
    let neg_inf_bias: Vec<bool> = (0..heads * sq * sk)
        .map(|n| (seed.wrapping_mul(n as u64 + 7) >> 23).is_multiple_of(7))
        .collect();
    let masked_fn = |h: usize, i: usize, j: usize| match mask {
        MaskType::Padding => key_pad[j],
        MaskType::Arbitrary => arb[(h * sq + i) * sk + j],
        _ => false,
    };
    let visible = |h: usize, i: usize, j: usize| {
        attention_runtime::reference::visible(mask, window, sq, sk, i, j)
            && !masked_fn(h, i, j)
            && !neg_inf_bias[(h * sq + i) * sk + j]
    };
    let bias_clean = |h: usize, i: usize, j: usize| {
        if neg_inf_bias[(h * sq + i) * sk + j] {
            f32::NEG_INFINITY
        } else {
            bias_vals[(h * sq + i) * sk + j]
        }
    };
    // Junk: every masked bias entry; K/V rows of keys no head of the group and no query sees.
    let mut jr = SplitMix64::new(seed ^ 0x77);
    let bias_junk: Vec<f32> = (0..heads * sq * sk)
        .map(|n| {
            let (h, i, j) = (n / (sq * sk), (n / sk) % sq, n % sk);
            if !visible(h, i, j) && !neg_inf_bias[n] {
                junk(&mut jr)
            } else {
                bias_clean(h, i, j)
            }
        })
        .collect();
    let per = heads / groups;
    let (mut kj, mut vj) = (k.clone(), v.clone());
    for j in 0..sk {
        for g in 0..groups {
            let seen = (g * per..(g + 1) * per).any(|h| (0..sq).any(|i| visible(h, i, j)));
            if !seen {
                for d in 0..hn {
                    kj[(j * groups + g) * hn + d] = junk(&mut jr);
                    vj[(j * groups + g) * hn + d] = junk(&mut jr);
                }
            }
        }
    }
    let sinks = [0.5f32; 8];
    let bj = |h: usize, i: usize, j: usize| bias_junk[(h * sq + i) * sk + j];
    let mut p = AttendParams::new(0.6, mask);
    p.window = window;
    p.mask_fn = Some(&masked_fn);
    p.bias_fn = Some(&bias_clean);
    if seed.is_multiple_of(3) {
        p.sinks = Some(SinkLogits::PerHead(&sinks[..heads]));
    }
    let clean = attend_sequence(&q, &k, &v, dims, &p).unwrap();
    p.bias_fn = Some(&bj);
    let dirty = attend_sequence(&q, &kj, &vj, dims, &p).unwrap();
    assert!(clean.out.iter().all(|x| x.is_finite()), "seed {seed}");
    assert_eq!(bits(&clean.out), bits(&dirty.out), "seed {seed}");
    assert_eq!(bits(&clean.lse), bits(&dirty.lse), "seed {seed}");
    assert_eq!(
        bits(&clean.max_logit),
        bits(&dirty.max_logit),
        "seed {seed}"
    );
    // Fully masked rows: zeros and -inf (or the sink logit).
    for (h, &sink) in sinks.iter().enumerate().take(heads) {
        for i in 0..sq {
            if !(0..sk).any(|j| visible(h, i, j)) {
                assert!(clean.out[(i * heads + h) * hn..][..hn]
                    .iter()
                    .all(|&x| x == 0.0));
                let want = if p.sinks.is_some() {
                    sink
                } else {
                    f32::NEG_INFINITY
                };
                assert_eq!(clean.lse[h * sq + i], want, "seed {seed}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Junk (NaN, +-Inf, huge values) at masked positions gives bitwise the output of clean
    /// values there, for every mask kind, windows, `-inf` biases and sinks.
    #[test]
    fn junk_at_masked_positions_changes_nothing(seed in any::<u64>()) {
        junk_case(seed);
    }
}

/// The layer, padded batch with random key padding (`padding_causal` and `padding`): junk
/// hidden rows at padded tokens leave every valid row bitwise unchanged.
#[test]
fn layer_junk_padding_rows_bitwise() {
    for (spec, seed) in [
        (
            "self, heads = 4, gqa = 2, head_dim = 64, mask = padding, rope",
            1u64,
        ),
        (
            "self, heads = 4, gqa = 2, head_dim = 64, mask = padding_causal, qk_layernorm = rms",
            2,
        ),
        (
            "self, heads = 2, head_dim = 64, mask = padding, sinks = off_by_one",
            3,
        ),
    ] {
        let l = layer(spec, seed);
        let h = l.config().hidden;
        let mut rng = SplitMix64::new(seed * 31);
        let (s, b) = (9, 3);
        let x = uniform(&mut rng, &[s, b, h]);
        // Sequence bi keeps its first len[bi] tokens.
        let lens = [9, 5, 1];
        let mut mask = Tensor::zeros(&[b, 1, 1, s]);
        let (mut dirty, mut zeroed) = (x.clone(), x.clone());
        for (bi, &len) in lens.iter().enumerate() {
            for i in len..s {
                mask.data_mut()[bi * s + i] = 1.0;
                for d in 0..h {
                    dirty.data_mut()[(i * b + bi) * h + d] = junk(&mut rng);
                    zeroed.data_mut()[(i * b + bi) * h + d] = 0.0;
                }
            }
        }
        let args = ForwardArgs {
            attention_mask: Some(&mask),
            ..ForwardArgs::default()
        };
        let got = l.forward(&dirty, &args).unwrap().output;
        let want = l.forward(&zeroed, &args).unwrap().output;
        for (bi, &len) in lens.iter().enumerate() {
            for i in 0..len {
                assert!(row(&got, i, bi).iter().all(|v| v.is_finite()), "{spec}");
                assert_eq!(bits(row(&got, i, bi)), bits(row(&want, i, bi)), "{spec}");
            }
        }
    }
}

/// Packed (THD) input with a key-padding mask per sequence: junk at masked tokens leaves
/// every valid token's output bitwise unchanged (CPU).
#[test]
fn packed_junk_masked_tokens_bitwise() {
    let l = layer(
        "self, heads = 4, gqa = 2, head_dim = 64, mask = padding_causal, rope",
        5,
    );
    let h = l.config().hidden;
    let mut rng = SplitMix64::new(77);
    let (lens, keep) = ([9usize, 4, 12], [6usize, 4, 7]);
    let mut cu = vec![0i32];
    for n in lens {
        cu.push(cu.last().unwrap() + n as i32);
    }
    let t = *cu.last().unwrap() as usize;
    let x = uniform(&mut rng, &[t, h]);
    let (mut dirty, mut zeroed) = (x.clone(), x.clone());
    let mut mask = Tensor::zeros(&[3, 1, 1, 12]);
    let mut valid = vec![false; t];
    for n in 0..3 {
        for i in 0..lens[n] {
            let tok = cu[n] as usize + i;
            if i < keep[n] {
                valid[tok] = true;
                continue;
            }
            mask.data_mut()[n * 12 + i] = 1.0;
            for d in 0..h {
                dirty.data_mut()[tok * h + d] = junk(&mut rng);
                zeroed.data_mut()[tok * h + d] = 0.0;
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
    let got = l.forward(&dirty, &args).unwrap().output;
    let want = l.forward(&zeroed, &args).unwrap().output;
    for tok in (0..t).filter(|&i| valid[i]) {
        let (g, w) = (&got.data()[tok * h..][..h], &want.data()[tok * h..][..h]);
        assert!(g.iter().all(|v| v.is_finite()), "token {tok}");
        assert_eq!(bits(g), bits(w), "token {tok}");
    }
}
