//! Validation rules: one test per rule, checking the error kind, the span (by slicing the
//! source) and that the message names the key, what was expected and what was found.

use attention_codegen::grammar::parse_str;
use attention_codegen::validate::{suggest_key, validate_all};
use attention_codegen::{parse_spec, SpecError, SpecErrorKind, SUPPORTED_HEAD_DIMS};

/// The first error of `src` and the source text its span covers.
fn err(src: &str) -> (SpecErrorKind, String, String) {
    let e: SpecError = parse_spec(src).expect_err(src);
    let text = src[e.span.start..e.span.end].to_string();
    (e.kind.clone(), text, e.to_string())
}

#[test]
fn unknown_kind() {
    let (k, at, msg) = err("selfish, heads = 8");
    assert_eq!(
        k,
        SpecErrorKind::UnknownKind {
            found: "selfish".into()
        }
    );
    assert_eq!(at, "selfish");
    assert_eq!(
        msg,
        "unknown attention kind `selfish`: expected `self` or `cross`"
    );
}

#[test]
fn unknown_key_with_suggestion() {
    for (src, bad, sugg) in [
        ("self, head = 32", "head", "heads"),
        (
            "self, rope, rotary_precent = 0.5",
            "rotary_precent",
            "rotary_percent",
        ),
        ("self, windw = (4, 0)", "windw", "window"),
        ("self, num_query_groups = 8", "num_query_groups", "gqa"),
        ("self, Heads = 8", "Heads", "heads"),
    ] {
        let (k, at, msg) = err(src);
        assert_eq!(
            k,
            SpecErrorKind::UnknownKey {
                key: bad.into(),
                suggestion: Some(sugg.into())
            },
            "{src}"
        );
        assert_eq!(at, bad);
        assert_eq!(msg, format!("unknown key `{bad}`: did you mean `{sugg}`?"));
    }
}

#[test]
fn unknown_key_without_suggestion() {
    let (k, at, msg) = err("self, heads = 8, zzzzzz = 1");
    assert_eq!(
        k,
        SpecErrorKind::UnknownKey {
            key: "zzzzzz".into(),
            suggestion: None
        }
    );
    assert_eq!(at, "zzzzzz");
    assert_eq!(msg, "unknown key `zzzzzz`");
    assert_eq!(suggest_key("q"), None);
}

#[test]
fn duplicate_key_points_at_second() {
    let src = "self, heads = 8, gqa = 2, heads = 16";
    let (k, at, msg) = err(src);
    assert_eq!(
        k,
        SpecErrorKind::DuplicateKey {
            key: "heads".into()
        }
    );
    assert_eq!(at, "heads");
    let e = parse_spec(src).unwrap_err();
    assert_eq!(e.span.start, src.rfind("heads").unwrap());
    assert!(msg.contains("duplicate key `heads`"), "{msg}");
}

#[test]
fn heads_not_divisible() {
    let (k, at, msg) = err("self, heads = 32, gqa = 6");
    assert_eq!(k, SpecErrorKind::HeadsNotDivisible { heads: 32, gqa: 6 });
    assert_eq!(at, "6");
    assert_eq!(msg, "`heads` (32) must be a multiple of `gqa` (6)");
    // gqa > heads is caught by the same rule.
    let (k, at, _) = err("self, heads = 4, gqa = 8");
    assert_eq!(k, SpecErrorKind::HeadsNotDivisible { heads: 4, gqa: 8 });
    assert_eq!(at, "8");
}

#[test]
fn zero_heads_and_groups_are_bad_values() {
    for (src, key, bad) in [
        ("self, heads = 0", "heads", "0"),
        ("self, heads = 8, gqa = 0", "gqa", "0"),
        ("self, gqa = -2", "gqa", "-2"),
        ("self, hidden = 0", "hidden", "0"),
        ("self, hidden = 4096.0", "hidden", "4096.0"),
        ("self, heads = rms", "heads", "rms"),
    ] {
        let (k, at, msg) = err(src);
        let SpecErrorKind::BadValue {
            key: k_key,
            expected,
            found,
        } = k
        else {
            panic!("{src}: {k:?}")
        };
        assert_eq!(k_key, key);
        assert_eq!(expected, "a positive integer");
        assert!(found.starts_with(&format!("`{bad}`")), "{found}");
        assert_eq!(at, bad, "{src}");
        assert!(
            msg.starts_with(&format!(
                "bad value for `{key}`: expected a positive integer, found `{bad}`"
            )),
            "{msg}"
        );
    }
}

#[test]
fn cross_with_gqa_not_heads() {
    let (k, at, msg) = err("cross, heads = 16, gqa = 4");
    assert!(
        matches!(&k, SpecErrorKind::NotAllowedForKind { key, kind, .. } if key == "gqa" && kind == "cross"),
        "{k:?}"
    );
    assert_eq!(at, "4");
    assert!(msg.contains("must equal `heads` (16), found 4"), "{msg}");
    // gqa == heads is fine.
    assert!(parse_spec("cross, heads = 16, gqa = 16").is_ok());
}

#[test]
fn cross_with_rope() {
    for (src, key) in [
        ("cross, heads = 8, rope", "rope"),
        ("cross, heads = 8, rope = interleaved", "rope"),
        ("cross, heads = 8, rotary_base = 500000.0", "rotary_base"),
        ("cross, heads = 8, rotary_percent = 0.5", "rotary_percent"),
    ] {
        let (k, at, msg) = err(src);
        assert!(
            matches!(&k, SpecErrorKind::NotAllowedForKind { key: k2, kind, .. } if k2 == key && kind == "cross"),
            "{src}: {k:?}"
        );
        assert_eq!(at, key);
        assert!(
            msg.starts_with(&format!("`{key}` is not allowed in cross attention")),
            "{msg}"
        );
    }
}

#[test]
fn cross_with_linear_qkv() {
    let (k, at, msg) = err("cross, heads = 8, linear_qkv = my::Qkv");
    assert!(
        matches!(&k, SpecErrorKind::NotAllowedForKind { key, .. } if key == "linear_qkv"),
        "{k:?}"
    );
    assert_eq!(at, "linear_qkv");
    assert!(
        msg.contains("linear_q") && msg.contains("linear_kv"),
        "{msg}"
    );
}

#[test]
fn cross_with_output_gate() {
    let (k, at, _) = err("cross, heads = 8, output_gate");
    assert!(
        matches!(&k, SpecErrorKind::NotAllowedForKind { key, .. } if key == "output_gate"),
        "{k:?}"
    );
    assert_eq!(at, "output_gate");
}

#[test]
fn self_with_linear_q_or_kv() {
    for key in ["linear_q", "linear_kv"] {
        let src = format!("self, heads = 8, {key} = my::Proj");
        let (k, at, msg) = err(&src);
        assert!(
            matches!(&k, SpecErrorKind::NotAllowedForKind { key: k2, kind, .. } if k2 == key && kind == "self"),
            "{k:?}"
        );
        assert_eq!(at, key);
        assert!(msg.contains("linear_qkv"), "{msg}");
    }
}

#[test]
fn unsupported_head_dim() {
    let (k, at, msg) = err("self, head_dim = 100");
    assert_eq!(
        k,
        SpecErrorKind::UnsupportedHeadDim {
            found: 100,
            supported: SUPPORTED_HEAD_DIMS.to_vec()
        }
    );
    assert_eq!(at, "100");
    assert_eq!(
        msg,
        format!("unsupported head_dim 100: supported head dims are {SUPPORTED_HEAD_DIMS:?}")
    );
    // Inside a list the span is the element.
    let (k, at, _) = err("self, head_dim = [64, 72, 128]");
    assert!(matches!(
        k,
        SpecErrorKind::UnsupportedHeadDim { found: 72, .. }
    ));
    assert_eq!(at, "72");
    // Every supported dim is accepted.
    for d in SUPPORTED_HEAD_DIMS {
        assert_eq!(
            parse_spec(&format!("self, head_dim = {d}"))
                .unwrap()
                .head_dims,
            vec![*d]
        );
    }
}

#[test]
fn bad_head_dim_literals() {
    let (k, at, _) = err("self, head_dim = -64");
    assert!(
        matches!(&k, SpecErrorKind::BadValue { key, .. } if key == "head_dim"),
        "{k:?}"
    );
    assert_eq!(at, "-64");
    let (k, at, _) = err("self, head_dim = [64, big]");
    assert!(
        matches!(&k, SpecErrorKind::BadValue { key, expected, .. } if key == "head_dim" && expected == "a positive integer"),
        "{k:?}"
    );
    assert_eq!(at, "big");
    let (k, at, _) = err("self, head_dim = (64, 128)");
    assert!(
        matches!(&k, SpecErrorKind::BadValue { key, .. } if key == "head_dim"),
        "{k:?}"
    );
    assert_eq!(at, "(64, 128)");
}

#[test]
fn duplicate_values_in_lists() {
    let (k, at, msg) = err("self, head_dim = [64, 128, 64]");
    assert_eq!(
        k,
        SpecErrorKind::DuplicateValue {
            key: "head_dim".into(),
            value: "64".into()
        }
    );
    assert_eq!(at, "64");
    assert_eq!(
        parse_spec("self, head_dim = [64, 128, 64]")
            .unwrap_err()
            .span
            .start,
        27
    );
    assert!(msg.contains("duplicate value `64` in `head_dim`"), "{msg}");
    let (k, at, _) = err("self, mask = [causal, padding, causal]");
    assert_eq!(
        k,
        SpecErrorKind::DuplicateValue {
            key: "mask".into(),
            value: "causal".into()
        }
    );
    assert_eq!(at, "causal");
}

#[test]
fn window_on_arbitrary_mask() {
    let (k, at, msg) = err("self, mask = arbitrary, window = (128, 0)");
    assert!(
        matches!(&k, SpecErrorKind::WindowMask { mask, .. } if mask == "arbitrary"),
        "{k:?}"
    );
    assert_eq!(at, "(128, 0)");
    assert!(
        msg.starts_with("`window` cannot be combined with mask `arbitrary`"),
        "{msg}"
    );
    // In a list of masks too.
    let (k, _, _) = err("self, mask = [causal, arbitrary], window = (128, 0)");
    assert!(
        matches!(&k, SpecErrorKind::WindowMask { mask, .. } if mask == "arbitrary"),
        "{k:?}"
    );
}

#[test]
fn window_right_bound_with_causal_mask() {
    // The default mask is causal.
    let (k, at, msg) = err("self, window = (128, 16)");
    assert!(
        matches!(&k, SpecErrorKind::WindowMask { mask, .. } if mask == "causal"),
        "{k:?}"
    );
    assert_eq!(at, "16");
    assert!(
        msg.contains("right bound must be 0 or -1, found 16"),
        "{msg}"
    );
    let (k, at, _) = err("self, mask = [no_mask, causal_bottom_right], window = (4, 2)");
    assert!(
        matches!(&k, SpecErrorKind::WindowMask { mask, .. } if mask == "causal_bottom_right"),
        "{k:?}"
    );
    assert_eq!(at, "2");
    // Right bounds 0 and -1 are fine with causal; any right bound is fine without it.
    assert!(parse_spec("self, window = (128, 0)").is_ok());
    assert!(parse_spec("self, window = (128, -1)").is_ok());
    assert!(parse_spec("self, mask = no_mask, window = (128, 16)").is_ok());
    assert!(parse_spec("self, mask = padding, window = (-1, 16)").is_ok());
}

#[test]
fn bad_window_literals() {
    for (src, at_expect) in [
        ("self, window = (-2, 0)", "-2"),
        ("self, window = (4, 0.5)", "0.5"),
        ("self, window = (1, 2, 3)", "(1, 2, 3)"),
        ("self, window = [4, 0]", "[4, 0]"),
        ("self, window = 4096", "4096"),
    ] {
        let (k, at, msg) = err(src);
        assert!(
            matches!(&k, SpecErrorKind::BadValue { key, .. } if key == "window"),
            "{src}: {k:?}"
        );
        assert_eq!(at, at_expect, "{src}");
        assert!(msg.contains("-1"), "{msg}");
    }
}

#[test]
fn rotary_percent_must_give_even_rot_dim() {
    let (k, at, msg) = err("self, head_dim = 64, rope, rotary_percent = 0.3");
    let SpecErrorKind::RotaryDim {
        percent,
        head_dim,
        rot_dim,
    } = k
    else {
        panic!("{k:?}")
    };
    assert_eq!((percent, head_dim), (0.3, 64));
    assert!((rot_dim - 19.2).abs() < 1e-9);
    assert_eq!(at, "0.3");
    assert!(
        msg.contains("head_dim 64 * 0.3") && msg.contains("even integer"),
        "{msg}"
    );
    // 96 * 0.5 = 48 is fine, 96 * 0.0625 = 6 too, but 64 * 0.03125 = 2 and 96 * 0.03125 = 3 (odd).
    assert!(parse_spec("self, head_dim = 96, rope, rotary_percent = 0.5").is_ok());
    let (k, at, _) = err("self, head_dim = [64, 96], rope, rotary_percent = 0.03125");
    assert!(
        matches!(k, SpecErrorKind::RotaryDim { head_dim: 96, .. }),
        "{k:?}"
    );
    assert_eq!(at, "0.03125");
}

#[test]
fn rotary_percent_range() {
    for (src, bad) in [
        ("self, rope, rotary_percent = 1.5", "1.5"),
        ("self, rope, rotary_percent = 0", "0"),
        ("self, rope, rotary_percent = -0.5", "-0.5"),
        ("self, rope, rotary_percent = half", "half"),
    ] {
        let (k, at, _) = err(src);
        assert!(
            matches!(&k, SpecErrorKind::BadValue { key, expected, .. } if key == "rotary_percent" && expected == "a number in (0, 1]"),
            "{src}: {k:?}"
        );
        assert_eq!(at, bad);
    }
}

#[test]
fn rotary_keys_need_rope() {
    let (k, at, msg) = err("self, rotary_base = 500000.0");
    assert!(
        matches!(&k, SpecErrorKind::Requires { key, needs, .. } if key == "rotary_base" && needs == "rope"),
        "{k:?}"
    );
    assert_eq!(at, "rotary_base");
    assert!(msg.starts_with("`rotary_base` requires `rope`"), "{msg}");
}

#[test]
fn norm_overrides_need_qk_layernorm() {
    for key in ["q_layernorm", "k_layernorm"] {
        let src = format!("self, heads = 8, {key} = my::Norm");
        let (k, at, msg) = err(&src);
        assert!(
            matches!(&k, SpecErrorKind::Requires { key: k2, needs, .. } if k2 == key && needs == "qk_layernorm"),
            "{k:?}"
        );
        assert_eq!(at, key);
        assert!(msg.contains("qk_layernorm"), "{msg}");
    }
    assert!(
        parse_spec("self, qk_layernorm = rms, q_layernorm = my::Norm, k_layernorm = Norm").is_ok()
    );
}

#[test]
fn bare_key_that_needs_a_value() {
    for key in [
        "heads",
        "gqa",
        "head_dim",
        "hidden",
        "eps",
        "bias",
        "rotary_percent",
        "mask",
        "window",
        "softmax_scale",
        "sinks",
        "dtype",
        "linear_proj",
    ] {
        let src = format!("self, rope, qk_layernorm, {key}");
        let (k, at, msg) = err(&src);
        assert!(
            matches!(&k, SpecErrorKind::ValueArity { key: k2, .. } if k2 == key),
            "{src}: {k:?}"
        );
        assert_eq!(at, key);
        assert!(
            msg.starts_with(&format!("`{key}` needs a value: expected `{key} = ")),
            "{msg}"
        );
        assert!(msg.ends_with(&format!("found a bare `{key}`")), "{msg}");
    }
}

#[test]
fn value_on_a_flag_key() {
    let (k, at, msg) = err("self, qkv_bias = true");
    assert!(
        matches!(&k, SpecErrorKind::ValueArity { key, .. } if key == "qkv_bias"),
        "{k:?}"
    );
    assert_eq!(at, "true");
    assert_eq!(
        msg,
        "`qkv_bias` takes no value: expected a bare `qkv_bias`, found `qkv_bias = true`"
    );
    let (_, at, _) = err("self, output_gate = [1, 2]");
    assert_eq!(at, "[1, 2]");
}

#[test]
fn bad_choices() {
    for (src, key, bad, option) in [
        (
            "self, qk_layernorm = batch",
            "qk_layernorm",
            "batch",
            "`rms`",
        ),
        ("self, rope = neox", "rope", "neox", "`interleaved`"),
        (
            "self, mask = casual",
            "mask",
            "casual",
            "`causal_bottom_right`",
        ),
        ("self, mask = [causal, 3]", "mask", "3", "`no_mask`"),
        ("self, sinks = true", "sinks", "true", "`off_by_one`"),
        ("self, dtype = f32", "dtype", "f32", "`bf16`"),
        ("self, bias = 1", "bias", "1", "`true` or `false`"),
        ("self, bias = yes", "bias", "yes", "`true` or `false`"),
        ("self, linear_proj = 3", "linear_proj", "3", "type path"),
        (
            "self, linear_proj = true",
            "linear_proj",
            "true",
            "type path",
        ),
    ] {
        let (k, at, msg) = err(src);
        let SpecErrorKind::BadValue {
            key: k2,
            expected,
            found,
        } = &k
        else {
            panic!("{src}: {k:?}")
        };
        assert_eq!(k2, key, "{src}");
        assert!(expected.contains(option), "{src}: {expected}");
        assert!(found.contains(bad), "{src}: {found}");
        assert_eq!(at, bad, "{src}");
        assert!(
            msg.starts_with(&format!("bad value for `{key}`: expected ")),
            "{msg}"
        );
    }
}

#[test]
fn bad_floats() {
    for (src, key, bad) in [
        ("self, eps = 0", "eps", "0"),
        ("self, eps = -1e-5", "eps", "-1e-5"),
        ("self, eps = small", "eps", "small"),
        ("self, softmax_scale = 0.0", "softmax_scale", "0.0"),
        ("self, softmax_scale = -0.125", "softmax_scale", "-0.125"),
        ("self, rope, rotary_base = 0", "rotary_base", "0"),
        ("self, rope, rotary_base = [1.0]", "rotary_base", "[1.0]"),
    ] {
        let (k, at, msg) = err(src);
        assert!(
            matches!(&k, SpecErrorKind::BadValue { key: k2, expected, .. } if k2 == key && expected.starts_with("a positive number")),
            "{src}: {k:?}"
        );
        assert_eq!(at, bad, "{src}");
        assert!(msg.contains("found `"), "{msg}");
    }
    // Ints are accepted where a float is expected.
    let s = parse_spec("self, softmax_scale = 1, eps = 1, rope, rotary_base = 500000").unwrap();
    assert_eq!(s.softmax_scale, Some(1.0));
    assert_eq!(s.eps, 1.0);
    assert_eq!(s.rope.unwrap().rotary_base, 500000.0);
}

#[test]
fn validate_all_reports_each_error_once() {
    let src = "self, head = 8, heads = 8, gqa = 3, head_dim = 100, mask = arbitrary, window = (4, 0), heads = 2, linear_q = x::Q";
    let raw = parse_str(src).unwrap();
    let errs = validate_all(&raw).unwrap_err();
    let kinds: Vec<&str> = errs
        .iter()
        .map(|e| match e.kind {
            SpecErrorKind::UnknownKey { .. } => "unknown",
            SpecErrorKind::DuplicateKey { .. } => "duplicate",
            SpecErrorKind::UnsupportedHeadDim { .. } => "head_dim",
            SpecErrorKind::HeadsNotDivisible { .. } => "divisible",
            SpecErrorKind::NotAllowedForKind { .. } => "kind",
            SpecErrorKind::WindowMask { .. } => "window",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "unknown",
            "head_dim",
            "duplicate",
            "divisible",
            "kind",
            "window"
        ]
    );
    // validate returns the first of them.
    assert_eq!(parse_spec(src).unwrap_err(), errs[0]);
}

#[test]
fn bad_value_does_not_cascade() {
    // A bad qk_layernorm value is one error; the q_layernorm override still sees it as given.
    let raw = parse_str("self, qk_layernorm = batch, q_layernorm = my::Norm").unwrap();
    let errs = validate_all(&raw).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
    // An unknown kind does not cause kind-specific errors.
    let raw = parse_str("crosss, heads = 8, linear_qkv = a::B").unwrap();
    let errs = validate_all(&raw).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
}

#[test]
fn with_source_underlines_the_span() {
    let src = "self, head = 32";
    let e = parse_spec(src).unwrap_err();
    assert_eq!(
        e.with_source(src),
        "unknown key `head`: did you mean `heads`?\n  self, head = 32\n        ^^^^"
    );
}
