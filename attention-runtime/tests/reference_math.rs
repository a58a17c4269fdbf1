//! The CPU reference math: hand-computed cases and invariants of `attend_sequence`, rope,
//! norms, masks and linear.

use attention_codegen::{MaskType, QkNorm, Rope, RopeMode, Window};
use attention_runtime::modules::SplitMix64;
use attention_runtime::reference::{
    apply_rope, attend_sequence, linear, normalize_rows, visible, AttendParams, SeqDims, SinkLogits,
};
use attention_runtime::AttnError;
use proptest::prelude::*;

fn rand_vec(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.uniform()).collect()
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "lengths differ");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "index {i}: {x} vs {y}"
        );
    }
}

fn dims(sq: usize, sk: usize, heads: usize, groups: usize, head_dim: usize) -> SeqDims {
    SeqDims {
        sq,
        sk,
        heads,
        groups,
        head_dim,
    }
}

#[test]
fn softmax_two_keys_hand_computed() {
    // logits = q.k * 0.5 = [0, 1]; out = (1*1 + 3*e) / (1 + e); lse = ln(1 + e).
    let p = AttendParams::new(0.5, MaskType::NoMask);
    let r = attend_sequence(&[1.0], &[0.0, 2.0], &[1.0, 3.0], dims(1, 2, 1, 1, 1), &p).unwrap();
    let e = std::f64::consts::E;
    assert!(
        (r.out[0] as f64 - (1.0 + 3.0 * e) / (1.0 + e)).abs() < 1e-6,
        "{}",
        r.out[0]
    );
    assert!((r.out[0] - 2.462_117).abs() < 1e-5);
    assert!((r.lse[0] as f64 - (1.0 + e).ln()).abs() < 1e-6);
    assert_eq!(r.max_logit, vec![1.0]);
}

#[test]
fn causal_first_row_sees_only_first_key() {
    let q = [1.0, 0.0, 0.0, 1.0]; // [2 tokens, 1 head, 2]
    let k = [1.0, 0.0, 0.0, 1.0];
    let v = [5.0, 6.0, 7.0, 8.0];
    let p = AttendParams::new(1.0, MaskType::Causal);
    let r = attend_sequence(&q, &k, &v, dims(2, 2, 1, 1, 2), &p).unwrap();
    assert_eq!(&r.out[..2], &[5.0, 6.0]);
    // Row 1: logits [0, 1] -> weights [1/(1+e), e/(1+e)].
    let w1 = (std::f64::consts::E / (1.0 + std::f64::consts::E)) as f32;
    close(
        &r.out[2..],
        &[5.0 * (1.0 - w1) + 7.0 * w1, 6.0 * (1.0 - w1) + 8.0 * w1],
        1e-6,
    );
}

#[test]
fn sinks_hand_computed() {
    // One key with logit 0 and an off-by-one sink (logit 0): weight 1/2.
    let mut p = AttendParams::new(1.0, MaskType::NoMask);
    p.sinks = Some(SinkLogits::OffByOne);
    let r = attend_sequence(&[0.0], &[1.0], &[4.0], dims(1, 1, 1, 1, 1), &p).unwrap();
    assert!((r.out[0] - 2.0).abs() < 1e-6);
    assert!((r.lse[0] - 2f32.ln()).abs() < 1e-6);
    // Learnable sink logit ln 3: weight 1/4.
    let s = [3f32.ln()];
    p.sinks = Some(SinkLogits::PerHead(&s));
    let r = attend_sequence(&[0.0], &[1.0], &[4.0], dims(1, 1, 1, 1, 1), &p).unwrap();
    assert!((r.out[0] - 1.0).abs() < 1e-6);
}

#[test]
fn bias_is_added_after_scale() {
    // scale 0 makes q.k vanish; bias ln(3) on key 1 gives weights [1/4, 3/4].
    let b = |_h: usize, _i: usize, j: usize| if j == 1 { 3f32.ln() } else { 0.0 };
    let mut p = AttendParams::new(0.0, MaskType::NoMask);
    p.bias_fn = Some(&b);
    let r = attend_sequence(&[9.0], &[1.0, 2.0], &[0.0, 4.0], dims(1, 2, 1, 1, 1), &p).unwrap();
    assert!((r.out[0] - 3.0).abs() < 1e-6);
}

#[test]
fn mask_predicates_hand_checked() {
    // causal (top-left): j <= i.
    assert!(visible(MaskType::Causal, None, 2, 3, 0, 0));
    assert!(!visible(MaskType::Causal, None, 2, 3, 0, 1));
    assert!(visible(MaskType::PaddingCausal, None, 2, 2, 1, 1));
    assert!(!visible(MaskType::PaddingCausal, None, 2, 2, 0, 1));
    // bottom right, sq 2, sk 4: row 0 sees j <= 2, row 1 all.
    assert!(visible(MaskType::CausalBottomRight, None, 2, 4, 0, 2));
    assert!(!visible(MaskType::CausalBottomRight, None, 2, 4, 0, 3));
    assert!(visible(MaskType::CausalBottomRight, None, 2, 4, 1, 3));
    for m in [MaskType::NoMask, MaskType::Padding, MaskType::Arbitrary] {
        assert!(visible(m, None, 2, 4, 0, 3));
    }
    // window (1, 0) on sq = sk = 4: row 3 sees 2..=3.
    let w = Some(Window { left: 1, right: 0 });
    let row3: Vec<bool> = (0..4)
        .map(|j| visible(MaskType::NoMask, w, 4, 4, 3, j))
        .collect();
    assert_eq!(row3, vec![false, false, true, true]);
    // window (0, 1) bottom-right aligned with sq 1, sk 4: diag = 3, sees 3 only (4 out of range).
    let w = Some(Window { left: 0, right: 1 });
    let row: Vec<bool> = (0..4)
        .map(|j| visible(MaskType::NoMask, w, 1, 4, 0, j))
        .collect();
    assert_eq!(row, vec![false, false, false, true]);
}

#[test]
fn rope_half_and_interleaved_on_known_vector() {
    let x = [1.0f32, 2.0, 3.0, 4.0];
    let (c1, s1, c2, s2) = (1f64.cos(), 1f64.sin(), 0.01f64.cos(), 0.01f64.sin());
    let half = Rope {
        mode: RopeMode::Half,
        rotary_percent: 1.0,
        rotary_base: 10000.0,
    };
    let mut y = x;
    apply_rope(&mut y, 1, 4, &[1], &half, 1.0).unwrap();
    let want = [
        1.0 * c1 - 3.0 * s1,
        2.0 * c2 - 4.0 * s2,
        3.0 * c1 + 1.0 * s1,
        4.0 * c2 + 2.0 * s2,
    ];
    close(&y, &want.map(|v| v as f32), 1e-6);

    let inter = Rope {
        mode: RopeMode::Interleaved,
        ..half
    };
    let mut y = x;
    apply_rope(&mut y, 1, 4, &[1], &inter, 1.0).unwrap();
    let want = [
        c1 - 2.0 * s1,
        2.0 * c1 + s1,
        3.0 * c2 - 4.0 * s2,
        4.0 * c2 + 3.0 * s2,
    ];
    close(&y, &want.map(|v| v as f32), 1e-6);

    // Partial (dim 2 of 4) with mscale 2 at position 1: only channels 0, 1 rotate.
    let part = Rope {
        rotary_percent: 0.5,
        ..half
    };
    let mut y = x;
    apply_rope(&mut y, 1, 4, &[1], &part, 2.0).unwrap();
    let want = [2.0 * (c1 - 2.0 * s1), 2.0 * (2.0 * c1 + s1), 3.0, 4.0];
    close(&y, &want.map(|v| v as f32), 1e-6);

    // Position 0 is the identity; base changes inv_freq[1] = 1/base^(2/4).
    let mut y = x;
    apply_rope(&mut y, 1, 4, &[0], &half, 1.0).unwrap();
    assert_eq!(y, x);
    let b100 = Rope {
        rotary_base: 100.0,
        ..half
    };
    let mut y = x;
    apply_rope(&mut y, 1, 4, &[3], &b100, 1.0).unwrap();
    let f = 3.0 / 10.0f64; // 3 * 1/100^(1/2)
    assert!((y[1] as f64 - (2.0 * f.cos() - 4.0 * f.sin())).abs() < 1e-6);
}

#[test]
fn rope_explicit_positions_per_token_and_head() {
    let rope = Rope::default();
    let mut rng = SplitMix64::new(3);
    let x = rand_vec(&mut rng, 2 * 3 * 8); // [2 tokens, 3 heads, 8]
    let mut y = x.clone();
    apply_rope(&mut y, 3, 8, &[5, 9], &rope, 1.0).unwrap();
    // Token 1 of every head equals rotating that head alone at position 9.
    for h in 0..3 {
        let mut one = x[(3 + h) * 8..][..8].to_vec();
        apply_rope(&mut one, 1, 8, &[9], &rope, 1.0).unwrap();
        assert_eq!(&y[(3 + h) * 8..][..8], &one[..]);
    }
    // Rotation preserves the norm.
    let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
    assert!((n(&x) - n(&y)).abs() < 1e-4);
}

#[test]
fn norms_hand_computed() {
    let eps = 1e-5f32;
    let x = [1.0f32, 2.0, 3.0, 4.0];
    let mut y = x;
    normalize_rows(
        &mut y,
        4,
        QkNorm::Layer,
        eps,
        Some(&[1.0, 2.0, 1.0, 1.0]),
        Some(&[0.0, 0.0, 0.5, 0.0]),
    )
    .unwrap();
    let inv = 1.0 / (1.25f64 + 1e-5).sqrt();
    let want = [-1.5 * inv, 2.0 * -0.5 * inv, 0.5 * inv + 0.5, 1.5 * inv];
    close(&y, &want.map(|v| v as f32), 1e-6);

    let mut y = x;
    normalize_rows(
        &mut y,
        4,
        QkNorm::Rms,
        eps,
        Some(&[2.0, 1.0, 1.0, 1.0]),
        None,
    )
    .unwrap();
    let inv = 1.0 / (7.5f64 + 1e-5).sqrt();
    close(
        &y,
        &[2.0 * inv, 2.0 * inv, 3.0 * inv, 4.0 * inv].map(|v| v as f32),
        1e-6,
    );

    // L2 ignores any weight.
    let mut y = x;
    normalize_rows(&mut y, 4, QkNorm::L2, eps, Some(&[5.0; 4]), None).unwrap();
    close(&y, &x.map(|v| (v as f64 * inv) as f32), 1e-6);
}

#[test]
fn linear_hand_computed() {
    let y = linear(
        &[1.0, 2.0],
        &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
        Some(&[0.5, 0.0, 0.0]),
        1,
        2,
        3,
    )
    .unwrap();
    assert_eq!(y, vec![1.5, 2.0, 3.0]);
    assert!(matches!(
        linear(&[1.0], &[1.0, 2.0], None, 1, 2, 1),
        Err(AttnError::Shape { .. })
    ));
}

fn run(q: &[f32], k: &[f32], v: &[f32], d: SeqDims, p: &AttendParams) -> Vec<f32> {
    attend_sequence(q, k, v, d, p).unwrap().out
}

/// Repeat every group's k/v `per` times: `[s, ng, hn]` -> `[s, np, hn]`.
fn repeat_kv(x: &[f32], s: usize, ng: usize, per: usize, hn: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for t in 0..s {
        for g in 0..ng {
            for _ in 0..per {
                out.extend_from_slice(&x[(t * ng + g) * hn..][..hn]);
            }
        }
    }
    out
}

#[test]
fn gqa_equals_mha_with_repeated_kv() {
    let mut rng = SplitMix64::new(1);
    let (sq, sk, np, ng, hn) = (3, 5, 6, 2, 8);
    let q = rand_vec(&mut rng, sq * np * hn);
    let k = rand_vec(&mut rng, sk * ng * hn);
    let v = rand_vec(&mut rng, sk * ng * hn);
    let p = AttendParams::new(0.3, MaskType::CausalBottomRight);
    let a = run(&q, &k, &v, dims(sq, sk, np, ng, hn), &p);
    let (kr, vr) = (repeat_kv(&k, sk, ng, 3, hn), repeat_kv(&v, sk, ng, 3, hn));
    let b = run(&q, &kr, &vr, dims(sq, sk, np, np, hn), &p);
    close(&a, &b, 1e-6);
    // And a wrong group mapping would differ.
    let kshuf: Vec<f32> = {
        let mut t = k.clone();
        for s in 0..sk {
            let (l, r) = t[s * ng * hn..][..ng * hn].split_at_mut(hn);
            l.swap_with_slice(r);
        }
        t
    };
    let c = run(
        &q,
        &repeat_kv(&kshuf, sk, ng, 3, hn),
        &vr,
        dims(sq, sk, np, np, hn),
        &p,
    );
    assert!(a.iter().zip(&c).any(|(x, y)| (x - y).abs() > 1e-4));
}

#[test]
fn causal_equals_bottom_right_when_square_and_window_unbounded_is_none() {
    let mut rng = SplitMix64::new(2);
    let (s, np, hn) = (5, 2, 4);
    let q = rand_vec(&mut rng, s * np * hn);
    let k = rand_vec(&mut rng, s * np * hn);
    let v = rand_vec(&mut rng, s * np * hn);
    let d = dims(s, s, np, np, hn);
    let a = run(&q, &k, &v, d, &AttendParams::new(0.5, MaskType::Causal));
    let b = run(
        &q,
        &k,
        &v,
        d,
        &AttendParams::new(0.5, MaskType::CausalBottomRight),
    );
    assert_eq!(a, b);
    let none = run(&q, &k, &v, d, &AttendParams::new(0.5, MaskType::NoMask));
    assert_ne!(a, none);
    let mut p = AttendParams::new(0.5, MaskType::NoMask);
    p.window = Some(Window {
        left: -1,
        right: -1,
    });
    assert_eq!(run(&q, &k, &v, d, &p), none);
    // window (-1, 0) is causal bottom-right.
    p.window = Some(Window { left: -1, right: 0 });
    assert_eq!(run(&q, &k, &v, d, &p), a);
}

#[test]
fn padding_mask_equals_truncated_keys() {
    let mut rng = SplitMix64::new(4);
    let (sq, sk, np, hn, keep) = (3, 6, 2, 4, 4);
    let q = rand_vec(&mut rng, sq * np * hn);
    let k = rand_vec(&mut rng, sk * np * hn);
    let v = rand_vec(&mut rng, sk * np * hn);
    let m = |_h: usize, _i: usize, j: usize| j >= keep;
    let mut p = AttendParams::new(0.5, MaskType::Padding);
    p.mask_fn = Some(&m);
    let a = run(&q, &k, &v, dims(sq, sk, np, np, hn), &p);
    let w = np * hn;
    let b = run(
        &q,
        &k[..keep * w],
        &v[..keep * w],
        dims(sq, keep, np, np, hn),
        &AttendParams::new(0.5, MaskType::NoMask),
    );
    close(&a, &b, 1e-6);
}

#[test]
fn off_by_one_sink_equals_zero_key_column() {
    let mut rng = SplitMix64::new(5);
    let (sq, sk, np, hn) = (2, 3, 2, 4);
    let q = rand_vec(&mut rng, sq * np * hn);
    let k = rand_vec(&mut rng, sk * np * hn);
    let v = rand_vec(&mut rng, sk * np * hn);
    let mut p = AttendParams::new(0.7, MaskType::NoMask);
    p.sinks = Some(SinkLogits::OffByOne);
    let a = attend_sequence(&q, &k, &v, dims(sq, sk, np, np, hn), &p).unwrap();
    let (mut k2, mut v2) = (k.clone(), v.clone());
    k2.extend(vec![0.0; np * hn]);
    v2.extend(vec![0.0; np * hn]);
    let b = attend_sequence(
        &q,
        &k2,
        &v2,
        dims(sq, sk + 1, np, np, hn),
        &AttendParams::new(0.7, MaskType::NoMask),
    )
    .unwrap();
    close(&a.out, &b.out, 1e-6);
    close(&a.lse, &b.lse, 1e-6);
}

#[test]
fn fully_masked_rows_give_zeros_and_neg_inf_lse() {
    let mut rng = SplitMix64::new(6);
    let (sq, sk, np, hn) = (3, 1, 1, 4);
    let q = rand_vec(&mut rng, sq * np * hn);
    let k = rand_vec(&mut rng, sk * np * hn);
    let v = rand_vec(&mut rng, sk * np * hn);
    // Bottom-right with sq > sk: rows 0, 1 see nothing (j <= i - 2).
    let mut p = AttendParams::new(1.0, MaskType::CausalBottomRight);
    p.sinks = Some(SinkLogits::OffByOne);
    let r = attend_sequence(&q, &k, &v, dims(sq, sk, np, np, hn), &p).unwrap();
    assert!(r.out.iter().all(|x| x.is_finite()));
    assert_eq!(&r.out[..2 * hn], &[0.0; 8]);
    // The off-by-one sink keeps those rows non-empty: their LSE is the sink's logit, 0
    // (semantics.md: zeros and -inf only when nothing, sink included, is left).
    assert_eq!(&r.lse[..2], &[0.0; 2]);
    assert!(r.lse[2].is_finite());
    assert!(r.out[2 * hn..].iter().any(|x| *x != 0.0));
    // A mask hiding everything: all zeros, max_logit -inf.
    let all = |_: usize, _: usize, _: usize| true;
    let mut p = AttendParams::new(1.0, MaskType::Arbitrary);
    p.mask_fn = Some(&all);
    let r = attend_sequence(&q, &k, &v, dims(sq, sk, np, np, hn), &p).unwrap();
    assert!(r.out.iter().all(|x| *x == 0.0));
    assert_eq!(r.max_logit, vec![f32::NEG_INFINITY]);
}

#[test]
fn attend_rejects_bad_lengths() {
    let p = AttendParams::new(1.0, MaskType::NoMask);
    let e = attend_sequence(&[0.0; 3], &[0.0; 4], &[0.0; 4], dims(1, 1, 1, 1, 4), &p).unwrap_err();
    assert!(
        matches!(e, AttnError::Shape { ref arg, .. } if arg == "q"),
        "{e}"
    );
    let e = attend_sequence(&[0.0; 8], &[0.0; 4], &[0.0; 4], dims(1, 1, 2, 3, 4), &p).unwrap_err();
    assert!(
        matches!(e, AttnError::InvalidArgument { ref arg, .. } if arg == "dims.groups"),
        "{e}"
    );
    let s = [0.0f32; 3];
    let mut p = AttendParams::new(1.0, MaskType::NoMask);
    p.sinks = Some(SinkLogits::PerHead(&s));
    let e = attend_sequence(&[0.0; 4], &[0.0; 4], &[0.0; 4], dims(1, 1, 1, 1, 4), &p).unwrap_err();
    assert!(
        matches!(e, AttnError::Shape { ref arg, .. } if arg == "sinks"),
        "{e}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// GQA equals MHA with repeated K/V, and the last `m` rows of a causal forward equal a
    /// bottom-right causal chunk of those `m` queries over all keys (chunked prefill).
    #[test]
    fn gqa_and_chunked_prefill(ng in 1usize..4, per in 1usize..4, hn in 1usize..9, s in 1usize..7,
                               m in 1usize..7, seed in any::<u64>(), left in -1i64..4) {
        let m = m.min(s);
        let np = ng * per;
        let mut rng = SplitMix64::new(seed);
        let q = rand_vec(&mut rng, s * np * hn);
        let k = rand_vec(&mut rng, s * ng * hn);
        let v = rand_vec(&mut rng, s * ng * hn);
        let mut p = AttendParams::new(0.4, MaskType::Causal);
        p.window = Some(Window { left, right: -1 });
        let full = run(&q, &k, &v, dims(s, s, np, ng, hn), &p);
        let mha = run(&q, &repeat_kv(&k, s, ng, per, hn), &repeat_kv(&v, s, ng, per, hn), dims(s, s, np, np, hn), &p);
        prop_assert_eq!(full.len(), s * np * hn);
        prop_assert_eq!(mha.len(), full.len());
        for (a, b) in full.iter().zip(&mha) { prop_assert!((a - b).abs() < 1e-5); }
        let mut pb = p;
        pb.mask = MaskType::CausalBottomRight;
        let w = np * hn;
        let chunk = run(&q[(s - m) * w..], &k, &v, dims(m, s, np, ng, hn), &pb);
        prop_assert_eq!(chunk.len(), m * w);
        for (a, b) in full[(s - m) * w..].iter().zip(&chunk) { prop_assert!((a - b).abs() < 1e-6); }
        prop_assert!(full.iter().all(|x| x.is_finite()));
    }
}
