//! The CPU reference core-attention backward (`attend_sequence_backward`) against central
//! finite differences of an f64 forward (checked itself against `attend_sequence`), for
//! every mask type, windows, bias (and its gradient), both sink types, GQA/MQA and sq != sk;
//! fully masked rows and junk at masked positions.

use attention_codegen::{MaskType, Window};
use attention_runtime::modules::SplitMix64;
use attention_runtime::reference::{
    attend_sequence, attend_sequence_backward, visible, AttendParams, SeqDims, SinkLogits,
};
use attention_runtime::AttnError;

#[derive(Clone)]
struct Case {
    dims: SeqDims,
    scale: f32,
    mask: MaskType,
    window: Option<Window>,
    /// `[np, sq, sk]`, true = masked out (the caller mask, for the tensor mask types).
    user_mask: Option<Vec<bool>>,
    /// `[np, sq, sk]`.
    bias: Option<Vec<f32>>,
    /// None, Some(None) = off-by-one, Some(Some(logits)) = learnable.
    sinks: Option<Option<Vec<f32>>>,
}

fn rand_vec(rng: &mut SplitMix64, n: usize, amp: f32) -> Vec<f32> {
    (0..n).map(|_| rng.uniform() * amp).collect()
}

impl Case {
    fn idx(&self, h: usize, i: usize, j: usize) -> usize {
        (h * self.dims.sq + i) * self.dims.sk + j
    }

    fn visible(&self, h: usize, i: usize, j: usize) -> bool {
        let d = self.dims;
        visible(self.mask, self.window, d.sq, d.sk, i, j)
            && !self
                .user_mask
                .as_ref()
                .is_some_and(|m| m[self.idx(h, i, j)])
            && !self
                .bias
                .as_ref()
                .is_some_and(|b| b[self.idx(h, i, j)] == f32::NEG_INFINITY)
    }

    /// The f64 forward: `out [sq, np, hn]`.
    fn forward64(&self, q: &[f64], k: &[f64], v: &[f64], bias: &[f64], sinks: &[f64]) -> Vec<f64> {
        let SeqDims {
            sq,
            sk,
            heads,
            groups,
            head_dim: hn,
        } = self.dims;
        let per = heads / groups;
        let mut out = vec![0f64; sq * heads * hn];
        for h in 0..heads {
            let g = h / per;
            for i in 0..sq {
                let mut logits = Vec::new();
                for j in 0..sk {
                    if !self.visible(h, i, j) {
                        continue;
                    }
                    let mut s = 0f64;
                    for c in 0..hn {
                        s += q[(i * heads + h) * hn + c] * k[(j * groups + g) * hn + c];
                    }
                    s *= self.scale as f64;
                    if self.bias.is_some() {
                        s += bias[self.idx(h, i, j)];
                    }
                    logits.push((j, s));
                }
                if logits.is_empty() {
                    continue;
                }
                let sink = match &self.sinks {
                    None => None,
                    Some(None) => Some(0.0),
                    Some(Some(_)) => Some(sinks[h]),
                };
                let m = logits
                    .iter()
                    .map(|x| x.1)
                    .chain(sink)
                    .fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = logits.iter().map(|x| (x.1 - m).exp()).sum::<f64>()
                    + sink.map_or(0.0, |s| (s - m).exp());
                for &(j, s) in &logits {
                    let w = (s - m).exp() / sum;
                    for c in 0..hn {
                        out[(i * heads + h) * hn + c] += w * v[(j * groups + g) * hn + c];
                    }
                }
            }
        }
        out
    }
}

fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Central differences of `L = sum(dout * out)` in f64 over every element of `x`.
fn fd(x: &[f64], f: &dyn Fn(&[f64]) -> f64) -> Vec<f64> {
    let eps = 1e-6;
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|e| {
            if !x[e].is_finite() {
                return 0.0;
            }
            let x0 = xp[e];
            xp[e] = x0 + eps;
            let lp = f(&xp);
            xp[e] = x0 - eps;
            let lm = f(&xp);
            xp[e] = x0;
            (lp - lm) / (2.0 * eps)
        })
        .collect()
}

fn to64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Runs forward + backward on random inputs and checks every gradient against finite
/// differences to `1e-4` relative Frobenius error (`1e-3` absolute when the gradient is ~0).
fn check(case: &Case, seed: u64) {
    let d = case.dims;
    let mut rng = SplitMix64::new(seed);
    let q = rand_vec(&mut rng, d.sq * d.heads * d.head_dim, 1.5);
    let k = rand_vec(&mut rng, d.sk * d.groups * d.head_dim, 1.5);
    let v = rand_vec(&mut rng, d.sk * d.groups * d.head_dim, 1.0);
    let dout = rand_vec(&mut rng, d.sq * d.heads * d.head_dim, 1.0);
    let bias = case.bias.clone().unwrap_or_default();
    let sinks_v = match &case.sinks {
        Some(Some(s)) => s.clone(),
        _ => Vec::new(),
    };
    let mask_fn = |h: usize, i: usize, j: usize| {
        case.user_mask
            .as_ref()
            .is_some_and(|m| m[case.idx(h, i, j)])
    };
    let bias_fn = |h: usize, i: usize, j: usize| bias[case.idx(h, i, j)];
    let mut p = AttendParams::new(case.scale, case.mask);
    p.window = case.window;
    if case.user_mask.is_some() {
        p.mask_fn = Some(&mask_fn);
    }
    if case.bias.is_some() {
        p.bias_fn = Some(&bias_fn);
    }
    p.sinks = match &case.sinks {
        None => None,
        Some(None) => Some(SinkLogits::OffByOne),
        Some(Some(_)) => Some(SinkLogits::PerHead(&sinks_v)),
    };
    let fw = attend_sequence(&q, &k, &v, d, &p).unwrap();
    let (q64, k64, v64, b64, s64, do64) = (
        to64(&q),
        to64(&k),
        to64(&v),
        to64(&bias),
        to64(&sinks_v),
        to64(&dout),
    );
    // The f64 forward is the same function as attend_sequence.
    let out64 = case.forward64(&q64, &k64, &v64, &b64, &s64);
    for (a, b) in fw.out.iter().zip(&out64) {
        assert!((*a as f64 - b).abs() < 1e-5, "forward64 {a} vs {b}");
    }
    let g = attend_sequence_backward(&q, &k, &v, &fw.out, &fw.lse, &dout, d, &p, true).unwrap();
    let loss = |o: Vec<f64>| o.iter().zip(&do64).map(|(a, b)| a * b).sum::<f64>();
    let checks: Vec<(&str, &[f32], Vec<f64>)> = vec![
        (
            "dq",
            &g.dq,
            fd(&q64, &|x| loss(case.forward64(x, &k64, &v64, &b64, &s64))),
        ),
        (
            "dk",
            &g.dk,
            fd(&k64, &|x| loss(case.forward64(&q64, x, &v64, &b64, &s64))),
        ),
        (
            "dv",
            &g.dv,
            fd(&v64, &|x| loss(case.forward64(&q64, &k64, x, &b64, &s64))),
        ),
    ];
    let mut checks = checks;
    if case.bias.is_some() {
        // dbias is 0 at masked positions (incl. `-inf` bias entries, where fd returns 0).
        let mut fdb = fd(&b64, &|x| loss(case.forward64(&q64, &k64, &v64, x, &s64)));
        for h in 0..d.heads {
            for i in 0..d.sq {
                for j in 0..d.sk {
                    if !case.visible(h, i, j) {
                        fdb[case.idx(h, i, j)] = 0.0;
                    }
                }
            }
        }
        checks.push(("dbias", g.dbias.as_deref().unwrap(), fdb));
    } else {
        assert_eq!(
            g.dbias.as_ref().map(|b| b.len()),
            Some(d.heads * d.sq * d.sk)
        );
    }
    match &case.sinks {
        Some(Some(_)) => checks.push((
            "dsinks",
            g.dsinks.as_deref().unwrap(),
            fd(&s64, &|x| loss(case.forward64(&q64, &k64, &v64, &b64, x))),
        )),
        _ => assert!(g.dsinks.is_none()),
    }
    for (name, got, want) in checks {
        assert!(got.iter().all(|x| x.is_finite()), "{name}: non-finite");
        let norm: f64 = want.iter().map(|y| y * y).sum::<f64>().sqrt();
        let e = rel_err(got, &want);
        assert!(
            e < 1e-4 || (norm < 1e-3 && e * norm < 1e-6),
            "seed {seed} {name}: relative error {e} (|want| {norm})\n got {got:?}\nwant {want:?}"
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

fn base(d: SeqDims, mask: MaskType) -> Case {
    Case {
        dims: d,
        scale: 1.0 / (d.head_dim as f32).sqrt(),
        mask,
        window: None,
        user_mask: None,
        bias: None,
        sinks: None,
    }
}

fn random_mask(rng: &mut SplitMix64, d: SeqDims, per_head: bool, key_only: bool) -> Vec<bool> {
    let mut m = vec![false; d.heads * d.sq * d.sk];
    let heads = if per_head { d.heads } else { 1 };
    let mut base = vec![false; heads * d.sq * d.sk];
    let keys: Vec<bool> = (0..d.sk).map(|_| rng.uniform() < -0.4).collect();
    for (e, b) in base.iter_mut().enumerate() {
        *b = if key_only {
            keys[e % d.sk]
        } else {
            rng.uniform() < -0.5
        };
    }
    for h in 0..d.heads {
        let hb = if per_head { h } else { 0 };
        m[h * d.sq * d.sk..][..d.sq * d.sk]
            .copy_from_slice(&base[hb * d.sq * d.sk..][..d.sq * d.sk]);
    }
    m
}

const ALL_MASKS: [MaskType; 6] = [
    MaskType::NoMask,
    MaskType::Causal,
    MaskType::CausalBottomRight,
    MaskType::Padding,
    MaskType::PaddingCausal,
    MaskType::Arbitrary,
];

fn with_user_mask(mut c: Case, rng: &mut SplitMix64) -> Case {
    c.user_mask = match c.mask {
        MaskType::Padding | MaskType::PaddingCausal => Some(random_mask(rng, c.dims, false, true)),
        MaskType::Arbitrary => Some(random_mask(rng, c.dims, true, false)),
        _ => None,
    };
    c
}

#[test]
fn every_mask_type_mha_gqa_mqa() {
    let mut rng = SplitMix64::new(7);
    let mut seed = 100;
    for (sq, sk) in [(4, 4), (3, 5)] {
        for (np, ng) in [(2, 2), (4, 2), (3, 1)] {
            for mask in ALL_MASKS {
                let c = with_user_mask(base(dims(sq, sk, np, ng, 3), mask), &mut rng);
                seed += 1;
                check(&c, seed);
            }
        }
    }
}

#[test]
fn windows() {
    let mut seed = 200;
    for (sq, sk) in [(5, 5), (3, 6)] {
        for (l, r) in [(1, 0), (2, 1), (-1, 0), (0, -1), (1, 2)] {
            for mask in [
                MaskType::NoMask,
                MaskType::CausalBottomRight,
                MaskType::Causal,
            ] {
                let mut c = base(dims(sq, sk, 4, 2, 2), mask);
                c.window = Some(Window { left: l, right: r });
                seed += 1;
                check(&c, seed);
            }
        }
    }
}

#[test]
fn bias_and_its_gradient() {
    let mut rng = SplitMix64::new(9);
    let mut seed = 300;
    for mask in ALL_MASKS {
        let mut c = with_user_mask(base(dims(3, 4, 4, 2, 3), mask), &mut rng);
        let mut b = rand_vec(&mut rng, 4 * 3 * 4, 2.0);
        // A `-inf` entry masks its key (no gradient there).
        b[5] = f32::NEG_INFINITY;
        c.bias = Some(b);
        seed += 1;
        check(&c, seed);
    }
}

#[test]
fn sinks_off_by_one_and_learnable() {
    let mut rng = SplitMix64::new(11);
    let mut seed = 400;
    for mask in ALL_MASKS {
        for learnable in [false, true] {
            let mut c = with_user_mask(base(dims(4, 4, 4, 2, 3), mask), &mut rng);
            c.sinks = Some(learnable.then(|| rand_vec(&mut rng, 4, 1.5)));
            if mask == MaskType::Arbitrary {
                c.bias = Some(rand_vec(&mut rng, 4 * 4 * 4, 1.0));
                c.window = Some(Window { left: 2, right: 0 });
            }
            seed += 1;
            check(&c, seed);
        }
    }
}

#[test]
fn fully_masked_rows_give_zero_gradients() {
    for sinks in [None, Some(None), Some(Some(vec![0.3, -0.2]))] {
        let d = dims(3, 3, 2, 1, 2);
        let mut c = base(d, MaskType::Arbitrary);
        let mut m = vec![false; 2 * 3 * 3];
        // Head 0 row 1 and head 1 row 2 see nothing.
        for j in 0..3 {
            m[c.idx(0, 1, j)] = true;
            m[c.idx(1, 2, j)] = true;
        }
        c.user_mask = Some(m);
        c.sinks = sinks;
        check(&c, 500);
        // And the dq rows are exactly zero.
        let mut rng = SplitMix64::new(1);
        let q = rand_vec(&mut rng, 12, 1.0);
        let k = rand_vec(&mut rng, 6, 1.0);
        let v = rand_vec(&mut rng, 6, 1.0);
        let dout = rand_vec(&mut rng, 12, 1.0);
        let um = c.user_mask.clone().unwrap();
        let mf = |h: usize, i: usize, j: usize| um[(h * 3 + i) * 3 + j];
        let mut p = AttendParams::new(0.7, MaskType::Arbitrary);
        p.mask_fn = Some(&mf);
        let sv = vec![0.3f32, -0.2];
        p.sinks = match &c.sinks {
            None => None,
            Some(None) => Some(SinkLogits::OffByOne),
            Some(Some(_)) => Some(SinkLogits::PerHead(&sv)),
        };
        let fw = attend_sequence(&q, &k, &v, d, &p).unwrap();
        let g = attend_sequence_backward(&q, &k, &v, &fw.out, &fw.lse, &dout, d, &p, true).unwrap();
        assert_eq!(&g.dq[4..6], &[0.0, 0.0]); // token 1, head 0
        assert_eq!(&g.dq[10..12], &[0.0, 0.0]); // token 2, head 1
        let db = g.dbias.unwrap();
        assert!(db[3..6].iter().all(|&x| x == 0.0));
        assert!(g.dq.iter().chain(&g.dk).chain(&g.dv).all(|x| x.is_finite()));
    }
}

#[test]
fn everything_masked_gives_all_zeros() {
    // Causal bottom-right with sq > sk leaves the first rows empty; a mask masks the rest.
    let d = dims(2, 2, 2, 2, 2);
    let mf = |_h: usize, _i: usize, _j: usize| true;
    let mut p = AttendParams::new(1.0, MaskType::Padding);
    p.mask_fn = Some(&mf);
    let x = vec![1f32; 8];
    let fw = attend_sequence(&x, &x, &x, d, &p).unwrap();
    let g = attend_sequence_backward(&x, &x, &x, &fw.out, &fw.lse, &x, d, &p, true).unwrap();
    for t in [&g.dq, &g.dk, &g.dv] {
        assert!(t.iter().all(|&v| v == 0.0), "{t:?}");
    }
}

#[test]
fn junk_at_masked_positions_does_not_leak() {
    // Padding mask masks keys 1 and 3 for every query; K, V and the bias hold NaN / Inf
    // there. The gradients equal those with zeros there, and dK/dV at those keys are zero.
    let d = dims(3, 4, 4, 2, 3);
    let mut rng = SplitMix64::new(21);
    let q = rand_vec(&mut rng, 3 * 4 * 3, 1.0);
    let mut k = rand_vec(&mut rng, 4 * 2 * 3, 1.0);
    let mut v = rand_vec(&mut rng, 4 * 2 * 3, 1.0);
    let mut bias = rand_vec(&mut rng, 4 * 3 * 4, 1.0);
    let dout = rand_vec(&mut rng, 3 * 4 * 3, 1.0);
    let masked = |j: usize| j == 1 || j == 3;
    let mf = |_h: usize, _i: usize, j: usize| masked(j);
    let sinks = [0.1f32, 0.2, -0.3, 0.4];
    let run = |k: &[f32], v: &[f32], bias: &[f32]| {
        let bf = |h: usize, i: usize, j: usize| bias[(h * 3 + i) * 4 + j];
        let mut p = AttendParams::new(0.5, MaskType::Padding);
        p.mask_fn = Some(&mf);
        p.bias_fn = Some(&bf);
        p.sinks = Some(SinkLogits::PerHead(&sinks));
        let fw = attend_sequence(&q, k, v, d, &p).unwrap();
        attend_sequence_backward(&q, k, v, &fw.out, &fw.lse, &dout, d, &p, true).unwrap()
    };
    let clean = {
        let (mut k0, mut v0, mut b0) = (k.clone(), v.clone(), bias.clone());
        for j in [1, 3] {
            k0[j * 6..][..6].fill(0.0);
            v0[j * 6..][..6].fill(0.0);
        }
        for (e, b) in b0.iter_mut().enumerate() {
            if masked(e % 4) {
                *b = 0.0;
            }
        }
        run(&k0, &v0, &b0)
    };
    for j in [1, 3] {
        k[j * 6..][..6].fill(f32::NAN);
        v[j * 6..][..6].fill(f32::INFINITY);
    }
    for (e, b) in bias.iter_mut().enumerate() {
        if masked(e % 4) {
            *b = f32::NAN;
        }
    }
    let junk = run(&k, &v, &bias);
    assert_eq!(junk, clean);
    for j in [1, 3] {
        assert!(junk.dk[j * 6..][..6].iter().all(|&x| x == 0.0));
        assert!(junk.dv[j * 6..][..6].iter().all(|&x| x == 0.0));
    }
}

#[test]
fn bad_lengths_are_typed_errors() {
    let d = dims(2, 2, 2, 1, 2);
    let p = AttendParams::new(1.0, MaskType::NoMask);
    let q = vec![0f32; 8];
    let kv = vec![0f32; 4];
    let lse = vec![0f32; 4];
    for (arg, out, lse_, dout) in [("out", 7, 4, 8), ("lse", 8, 3, 8), ("dout", 8, 4, 9)] {
        let err = attend_sequence_backward(
            &q,
            &kv,
            &kv,
            &vec![0.0; out],
            &lse[..lse_.min(4)]
                .iter()
                .copied()
                .chain(std::iter::repeat(0.0))
                .take(lse_)
                .collect::<Vec<_>>(),
            &vec![0.0; dout],
            d,
            &p,
            false,
        )
        .unwrap_err();
        match err {
            AttnError::Shape { arg: a, .. } => assert_eq!(a, arg),
            e => panic!("{e:?}"),
        }
    }
    let err = attend_sequence_backward(&q, &kv, &kv, &q, &lse, &q, dims(2, 2, 2, 3, 2), &p, false)
        .unwrap_err();
    assert!(matches!(err, AttnError::InvalidArgument { ref arg, .. } if arg == "dims.groups"));
    let s = [0f32; 3];
    let mut p2 = p;
    p2.sinks = Some(SinkLogits::PerHead(&s));
    let err = attend_sequence_backward(&q, &kv, &kv, &q, &lse, &q, d, &p2, false).unwrap_err();
    assert!(matches!(err, AttnError::Shape { ref arg, .. } if arg == "sinks"));
}

mod pieces {
    //! The layer pieces' backward: rope (the adjoint of the rotation), norms, linear, gate.

    use attention_codegen::{QkNorm, Rope, RopeMode};
    use attention_runtime::modules::SplitMix64;
    use attention_runtime::reference::grad::{
        gate_backward, linear_backward_input, linear_bias_grad, linear_weight_grad,
        normalize_rows_backward,
    };
    use attention_runtime::reference::{normalize_rows, RopeTable};
    use attention_runtime::AttnError;

    use super::rand_vec;

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    #[test]
    fn rope_backward_is_the_adjoint() {
        // <R x, y> == <x, R^T y> for half, interleaved, partial rope, any positions and mscale.
        let mut rng = SplitMix64::new(1);
        for (mode, pct) in [
            (RopeMode::Half, 1.0),
            (RopeMode::Interleaved, 1.0),
            (RopeMode::Half, 0.5),
            (RopeMode::Interleaved, 0.5),
        ] {
            let rope = Rope {
                mode,
                rotary_percent: pct,
                rotary_base: 10000.0,
            };
            let t = RopeTable::new(&rope, 8).unwrap();
            let pos = [0i64, 3, 17];
            let x = rand_vec(&mut rng, 3 * 2 * 8, 1.0);
            let y = rand_vec(&mut rng, 3 * 2 * 8, 1.0);
            let (mut rx, mut rty) = (x.clone(), y.clone());
            t.apply(&mut rx, 2, &pos, 1.3).unwrap();
            t.apply_backward(&mut rty, 2, &pos, 1.3).unwrap();
            let (a, b) = (dot(&rx, &y), dot(&x, &rty));
            assert!(
                (a - b).abs() < 1e-5 * (1.0 + a.abs()),
                "{mode:?} {pct}: {a} vs {b}"
            );
            // Without mscale the rotation is orthogonal: R^T R = I.
            t.apply_backward(&mut rx, 2, &pos, 1.0 / 1.3).unwrap();
            for (p, q) in rx.iter().zip(&x) {
                assert!((p - q).abs() < 1e-5, "{p} vs {q}");
            }
        }
    }

    #[test]
    fn norm_backward_matches_finite_differences() {
        let mut rng = SplitMix64::new(2);
        let hn = 6;
        for kind in [QkNorm::Layer, QkNorm::Rms, QkNorm::L2] {
            let x = rand_vec(&mut rng, 3 * hn, 1.5);
            let dy = rand_vec(&mut rng, 3 * hn, 1.0);
            let w = rand_vec(&mut rng, hn, 0.5)
                .into_iter()
                .map(|v| v + 1.0)
                .collect::<Vec<_>>();
            let b = rand_vec(&mut rng, hn, 0.2);
            let (wo, bo) = match kind {
                QkNorm::Layer => (Some(&w[..]), Some(&b[..])),
                QkNorm::Rms => (Some(&w[..]), None),
                QkNorm::L2 => (None, None),
            };
            let loss = |x: &[f32], w: Option<&[f32]>, b: Option<&[f32]>| {
                let mut y = x.to_vec();
                normalize_rows(&mut y, hn, kind, 1e-5, w, b).unwrap();
                dot(&y, &dy)
            };
            let g = normalize_rows_backward(&x, &dy, hn, kind, 1e-5, wo, bo).unwrap();
            let eps = 1e-3f32;
            let fd = |f: &dyn Fn(f32) -> f64| (f(eps) - f(-eps)) / (2.0 * eps as f64);
            for e in 0..x.len() {
                let d = fd(&|t| {
                    let mut xp = x.clone();
                    xp[e] += t;
                    loss(&xp, wo, bo)
                });
                assert!(
                    (d - g.dx[e] as f64).abs() < 2e-3,
                    "{kind:?} dx[{e}]: {d} vs {}",
                    g.dx[e]
                );
            }
            if let Some(dw) = &g.dweight {
                for c in 0..hn {
                    let d = fd(&|t| {
                        let mut wp = w.clone();
                        wp[c] += t;
                        loss(&x, Some(&wp), bo)
                    });
                    assert!((d - dw[c] as f64).abs() < 2e-3, "{kind:?} dw[{c}]");
                }
            }
            if let Some(db) = &g.dbias {
                for c in 0..hn {
                    let s: f64 = (0..3).map(|r| dy[r * hn + c] as f64).sum();
                    assert!((s - db[c] as f64).abs() < 1e-6, "{kind:?} db[{c}]");
                }
            }
            assert_eq!(g.dweight.is_some(), kind != QkNorm::L2);
            assert_eq!(g.dbias.is_some(), kind == QkNorm::Layer);
        }
    }

    #[test]
    fn linear_and_gate_backward_hand_checked() {
        // y = x W^T, x [2, 3], W [2, 3].
        let x = [1.0, 2.0, 3.0, -1.0, 0.5, 0.0];
        let w = [0.5, -1.0, 2.0, 1.0, 1.0, 1.0];
        let dy = [1.0, 2.0, -1.0, 0.5];
        let dx = linear_backward_input(&dy, &w, 2, 3, 2).unwrap();
        assert_eq!(dx, vec![2.5, 1.0, 4.0, 0.0, 1.5, -1.5]);
        let dw = linear_weight_grad(&dy, &x, 2, 3, 2).unwrap();
        assert_eq!(dw, vec![2.0, 1.5, 3.0, 1.5, 4.25, 6.0]);
        assert_eq!(linear_bias_grad(&dy, 2, 2).unwrap(), vec![0.0, 2.5]);
        // Gate: y = o sigmoid(g); at g = 0, sigmoid = 1/2, sigmoid' = 1/4.
        let (d_o, d_g) = gate_backward(&[2.0], &[3.0], &[0.0]).unwrap();
        assert_eq!((d_o[0], d_g[0]), (1.0, 1.5));
        // Lengths are checked, naming the argument.
        for (e, arg) in [
            (
                linear_backward_input(&dy, &w[..5], 2, 3, 2).unwrap_err(),
                "weight",
            ),
            (
                linear_weight_grad(&dy[..3], &x, 2, 3, 2).unwrap_err(),
                "grad_output",
            ),
            (gate_backward(&[1.0], &[1.0, 2.0], &[0.0]).unwrap_err(), "o"),
            (
                normalize_rows_backward(&x, &dy, 3, QkNorm::Rms, 1e-5, None, None).unwrap_err(),
                "dy",
            ),
        ] {
            assert!(
                matches!(&e, AttnError::Shape { arg: a, .. } if a == arg),
                "{e}"
            );
        }
    }
}
