//! The canonical form round-trips: `parse_spec(&spec.to_string()) == spec` for any valid
//! spec; and the parser never panics on arbitrary input.

use attention_codegen::{
    parse_spec, AttentionKind, AttentionSpec, DType, MaskType, QkNorm, Role, Rope, RopeMode, Sinks,
    Window, SUPPORTED_HEAD_DIMS,
};
use proptest::prelude::*;
use proptest::sample::{select, subsequence};

fn arb_path() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Z][A-Za-z0-9_]{0,8}",
        "(::)?[a-z_][a-z0-9_]{0,6}(::[a-z_][a-z0-9_]{0,4}){0,2}::[A-Z][A-Za-z0-9]{0,6}",
    ]
}

fn arb_float(lo: f64, hi: f64, common: f64) -> impl Strategy<Value = f64> {
    // Tiny values exercise the exponent form of the canonical float (`1.5e-9`).
    let tiny = (-12i32..-4, 1.0f64..10.0).prop_map(move |(e, m)| {
        let x = m * 10f64.powi(e);
        if x > lo && x < hi {
            x
        } else {
            common
        }
    });
    prop_oneof![Just(common), lo..hi, tiny]
}

/// Valid specs: every generated value satisfies every validation rule.
fn arb_spec() -> impl Strategy<Value = AttentionSpec> {
    let dims = (
        any::<bool>(),
        proptest::option::of(1usize..=128),
        any::<prop::sample::Index>(),
        any::<bool>(),
        subsequence(SUPPORTED_HEAD_DIMS.to_vec(), 0..=3).prop_shuffle(),
        proptest::option::of(1usize..100_000),
    );
    let norm = (
        proptest::option::of(select(vec![QkNorm::Layer, QkNorm::Rms, QkNorm::L2])),
        arb_float(1e-12, 1.0, 1e-5),
        any::<bool>(),
        any::<bool>(),
        proptest::option::of((
            select(vec![RopeMode::Half, RopeMode::Interleaved]),
            select(vec![1.0, 0.5, 0.4, 0.25, 0.125, 0.0625]),
            arb_float(1.0, 1e7, 10000.0),
        )),
    );
    let rest = (
        subsequence(MaskType::ALL.to_vec(), 1..=6).prop_shuffle(),
        proptest::option::of((-1i64..100_000, -1i64..100_000)),
        proptest::option::of(1e-6f64..10.0),
        proptest::option::of(select(vec![Sinks::OffByOne, Sinks::Learnable])),
        any::<bool>(),
        select(vec![DType::Bf16, DType::F16]),
        subsequence(Role::ALL.to_vec(), 0..=7).prop_shuffle(),
        proptest::collection::vec(arb_path(), 7),
    );
    (dims, norm, rest).prop_map(|(dims, norm, rest)| {
        let (cross, heads, gqa_pick, with_gqa, head_dims, hidden) = dims;
        let (qk_norm, eps, bias, qkv_bias, rope) = norm;
        let (masks, window, softmax_scale, sinks, output_gate, dtype, roles, paths) = rest;
        let kind = if cross {
            AttentionKind::CrossAttention
        } else {
            AttentionKind::SelfAttention
        };
        let mut s = AttentionSpec::new(kind);
        s.heads = heads;
        s.gqa = match (with_gqa, heads) {
            (false, _) => None,
            (true, Some(h)) if cross => Some(h),
            (true, Some(h)) => {
                let divisors: Vec<usize> = (1..=h).filter(|g| h % g == 0).collect();
                Some(*gqa_pick.get(&divisors))
            }
            (true, None) => Some(gqa_pick.index(16) + 1),
        };
        s.head_dims = head_dims;
        s.hidden = hidden;
        s.qk_norm = qk_norm;
        s.eps = eps;
        s.bias = bias;
        s.qkv_bias = qkv_bias;
        s.rope = if cross {
            None
        } else {
            // A fraction that rotates an even whole number of channels at every listed head
            // dim (0.0625 of 80 is 5: fall back to 0.5 there, which every dim allows).
            rope.map(|(mode, rotary_percent, rotary_base)| Rope {
                mode,
                rotary_percent: if s.head_dims.iter().all(|&d| {
                    let rot = d as f64 * rotary_percent;
                    rot.fract() == 0.0 && (rot as usize).is_multiple_of(2)
                }) {
                    rotary_percent
                } else {
                    0.5
                },
                rotary_base,
            })
        };
        s.masks = masks;
        s.window = window.and_then(|(left, right)| {
            if s.masks.iter().any(|m| !m.accepts_window()) {
                None
            } else if s.masks.iter().any(|m| m.is_causal()) {
                Some(Window {
                    left,
                    right: right.min(0),
                })
            } else {
                Some(Window { left, right })
            }
        });
        s.softmax_scale = softmax_scale;
        s.sinks = sinks;
        s.output_gate = output_gate && !cross;
        s.dtype = dtype;
        s.overrides = roles
            .into_iter()
            .filter(|r| match r {
                Role::LinearQkv => !cross,
                Role::LinearQ | Role::LinearKv => cross,
                Role::QLayernorm | Role::KLayernorm => s.qk_norm.is_some(),
                Role::LinearProj | Role::CoreAttention => true,
            })
            .zip(paths)
            .collect();
        s
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn canonical_round_trip(spec in arb_spec()) {
        let text = spec.to_string();
        let back = parse_spec(&text).map_err(|e| TestCaseError::fail(e.with_source(&text)))?;
        prop_assert_eq!(&back, &spec, "{}", text);
        // The canonical form is a fixed point.
        prop_assert_eq!(back.to_string(), text);
    }

    #[test]
    fn never_panics_and_spans_are_in_bounds(src in "(self|cross)?[ a-z_0-9=,\\[\\]():.+-]{0,60}") {
        if let Err(e) = parse_spec(&src) {
            prop_assert!(e.span.start <= e.span.end && e.span.end <= src.len(), "{:?} {:?}", src, e);
            let shown = e.with_source(&src);
            prop_assert!(shown.starts_with(&e.to_string()), "{:?}", shown);
            prop_assert!(shown.lines().last().is_some_and(|l| l.trim_start().starts_with('^')), "{:?}", shown);
        }
    }

    #[test]
    fn never_panics_on_any_string(src in "\\PC{0,40}") {
        if let Err(e) = parse_spec(&src) {
            prop_assert!(e.span.end <= src.len());
            prop_assert!(src.is_char_boundary(e.span.start) && src.is_char_boundary(e.span.end));
        }
    }
}
