//! Validation: the rules that turn a [`RawSpec`] into an [`AttentionSpec`].
//!
//! Every rule has its own [`SpecErrorKind`] and points at the offending key or value with
//! its [`Span`]. [`validate`] returns the first error, [`validate_all`] every error it can
//! find without cascading (a key whose value is bad is treated as given for the checks that
//! only need its presence, and skipped by the checks that need its value).
//!
//! [`parse_spec`] (and `str::parse::<AttentionSpec>`) is the string front end: it parses
//! with [`crate::grammar::parse_str`] and validates.

use std::collections::HashMap;
use std::str::FromStr;

use crate::error::{SpecError, SpecErrorKind};
use crate::grammar::{parse_str, RawItem, RawSpec, RawValue, Span, Spanned};
use crate::spec::{
    AttentionKind, AttentionSpec, DType, MaskType, QkNorm, Role, Rope, RopeMode, Sinks, Window,
    SUPPORTED_HEAD_DIMS,
};

/// Every key the grammar knows, in canonical order (the last seven are [`Role`] names).
pub const KNOWN_KEYS: &[&str] = &[
    "heads",
    "gqa",
    "head_dim",
    "hidden",
    "qk_layernorm",
    "eps",
    "bias",
    "qkv_bias",
    "rope",
    "rotary_percent",
    "rotary_base",
    "mask",
    "window",
    "softmax_scale",
    "sinks",
    "output_gate",
    "dtype",
    "linear_qkv",
    "linear_q",
    "linear_kv",
    "linear_proj",
    "core_attention",
    "q_layernorm",
    "k_layernorm",
];

/// Names used elsewhere (Megatron-Core config fields, Hugging Face configs) and the spec key
/// they correspond to; used to suggest a key.
const ALIASES: &[(&str, &str)] = &[
    ("num_attention_heads", "heads"),
    ("num_heads", "heads"),
    ("n_heads", "heads"),
    ("n_head", "heads"),
    ("num_query_groups", "gqa"),
    ("num_key_value_heads", "gqa"),
    ("num_kv_heads", "gqa"),
    ("n_kv_heads", "gqa"),
    ("kv_heads", "gqa"),
    ("groups", "gqa"),
    ("kv_channels", "head_dim"),
    ("head_size", "head_dim"),
    ("hidden_size", "hidden"),
    ("hidden_dim", "hidden"),
    ("layernorm_epsilon", "eps"),
    ("qk_norm", "qk_layernorm"),
    ("normalization", "qk_layernorm"),
    ("add_bias_linear", "bias"),
    ("add_qkv_bias", "qkv_bias"),
    ("rotary_interleaved", "rope"),
    ("rotary", "rope"),
    ("rope_theta", "rotary_base"),
    ("attn_mask_type", "mask"),
    ("mask_type", "mask"),
    ("window_size", "window"),
    ("sliding_window", "window"),
    ("scale", "softmax_scale"),
    ("softmax_type", "sinks"),
    ("attention_output_gate", "output_gate"),
    ("gate", "output_gate"),
    ("params_dtype", "dtype"),
];

/// Optimal-string-alignment edit distance (insertions, deletions, substitutions and
/// transpositions of adjacent characters each cost 1).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

/// The known key nearest to an unknown `key`, when one is close enough to be a likely typo
/// (or `key` is a known alias such as `num_query_groups`).
pub fn suggest_key(key: &str) -> Option<&'static str> {
    let lower = key.to_ascii_lowercase();
    if let Some((_, k)) = ALIASES.iter().find(|(a, _)| *a == lower) {
        return Some(k);
    }
    let (best, dist) = KNOWN_KEYS
        .iter()
        .map(|k| (*k, edit_distance(&lower, k)))
        .min_by_key(|(_, d)| *d)?;
    let limit = (key.chars().count() / 3).clamp(1, 3);
    (dist <= limit).then_some(best)
}

/// The value as it would be written in a spec.
fn show(v: &RawValue) -> String {
    let join = |xs: &[Spanned<RawValue>]| {
        xs.iter()
            .map(|x| show(&x.value))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match v {
        RawValue::Int(n) => n.to_string(),
        RawValue::Float(x) => format!("{x:?}"),
        RawValue::Bool(b) => b.to_string(),
        RawValue::Ident(s) | RawValue::Path(s) => s.clone(),
        RawValue::List(xs) => format!("[{}]", join(xs)),
        RawValue::Tuple(xs) => format!("({})", join(xs)),
    }
}

/// `` `v` (an integer) `` and so on: what an error says was found.
fn found(v: &RawValue) -> String {
    let what = match v {
        RawValue::Int(_) => "an integer",
        RawValue::Float(_) => "a float",
        RawValue::Bool(_) => "a bool",
        RawValue::Ident(_) => "a name",
        RawValue::Path(_) => "a path",
        RawValue::List(_) => "a list",
        RawValue::Tuple(_) => "a tuple",
    };
    format!("`{}` ({what})", show(v))
}

fn bad(key: &str, expected: impl Into<String>, v: &Spanned<RawValue>) -> SpecError {
    SpecError::new(
        v.span,
        SpecErrorKind::BadValue {
            key: key.to_string(),
            expected: expected.into(),
            found: found(&v.value),
        },
    )
}

fn pos_int(key: &str, v: &Spanned<RawValue>) -> Result<usize, SpecError> {
    match v.value {
        RawValue::Int(n) if n > 0 => {
            usize::try_from(n).map_err(|_| bad(key, "a positive integer", v))
        }
        _ => Err(bad(key, "a positive integer", v)),
    }
}

fn pos_float(key: &str, expected: &str, v: &Spanned<RawValue>) -> Result<f64, SpecError> {
    let x = match v.value {
        RawValue::Int(n) => n as f64,
        RawValue::Float(x) => x,
        _ => return Err(bad(key, expected, v)),
    };
    if x > 0.0 && x.is_finite() {
        Ok(x)
    } else {
        Err(bad(key, expected, v))
    }
}

fn one_of(options: &[&str]) -> String {
    let names: Vec<String> = options.iter().map(|o| format!("`{o}`")).collect();
    format!("one of {}", names.join(", "))
}

fn choice<T: Copy>(
    key: &str,
    v: &Spanned<RawValue>,
    options: &[(&str, T)],
) -> Result<T, SpecError> {
    if let RawValue::Ident(s) = &v.value {
        if let Some((_, t)) = options.iter().find(|(n, _)| n == s) {
            return Ok(*t);
        }
    }
    let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
    Err(bad(key, one_of(&names), v))
}

/// A checked value with where its key and value were written (the value span is the key's
/// for a bare key).
struct At<T> {
    value: T,
    val: Span,
}

impl<T> At<T> {
    fn new(value: T, val: Span) -> Self {
        At { value, val }
    }
}

/// The checked values of the items given, before the cross-item rules run.
#[derive(Default)]
struct Fields {
    heads: Option<At<usize>>,
    gqa: Option<At<usize>>,
    head_dims: Option<At<Vec<usize>>>,
    hidden: Option<At<usize>>,
    qk_norm: Option<At<QkNorm>>,
    eps: Option<At<f64>>,
    bias: Option<At<bool>>,
    qkv_bias: bool,
    rope: Option<At<RopeMode>>,
    rotary_percent: Option<At<f64>>,
    rotary_base: Option<At<f64>>,
    masks: Option<At<Vec<MaskType>>>,
    /// The window and the span of its right bound.
    window: Option<At<(Window, Span)>>,
    softmax_scale: Option<At<f64>>,
    sinks: Option<At<Sinks>>,
    output_gate: bool,
    dtype: Option<At<DType>>,
    overrides: Vec<(Role, String)>,
}

const MASK_NAMES: [(&str, MaskType); 6] = [
    ("padding", MaskType::Padding),
    ("causal", MaskType::Causal),
    ("no_mask", MaskType::NoMask),
    ("padding_causal", MaskType::PaddingCausal),
    ("arbitrary", MaskType::Arbitrary),
    ("causal_bottom_right", MaskType::CausalBottomRight),
];

/// What a key that needs a value accepts, for arity errors.
fn expected_for(key: &str) -> &'static str {
    match key {
        "heads" | "gqa" | "hidden" => "a positive integer",
        "head_dim" => "a head dim or a list like `[64, 128]`",
        "eps" | "rotary_base" | "softmax_scale" => "a positive number",
        "bias" => "`true` or `false`",
        "rotary_percent" => "a number in (0, 1]",
        "mask" => "a mask type or a list of mask types",
        "window" => "`(left, right)`",
        "sinks" => "`off_by_one` or `learnable`",
        "dtype" => "`bf16` or `f16`",
        _ => "a type path like `my_crate::MyType`",
    }
}

/// Check one item and store its value; returns the error if the value is bad.
fn check_item(item: &RawItem, f: &mut Fields) -> Result<(), SpecError> {
    let key = item.key.value.as_str();
    let kspan = item.key.span;
    let flag_keys = ["qkv_bias", "output_gate"];
    let optional_keys = ["qk_layernorm", "rope"];
    if flag_keys.contains(&key) {
        if let Some(v) = &item.value {
            return Err(SpecError::new(
                v.span,
                SpecErrorKind::ValueArity {
                    key: key.to_string(),
                    msg: format!(
                        "takes no value: expected a bare `{key}`, found `{key} = {}`",
                        show(&v.value)
                    ),
                },
            ));
        }
        match key {
            "qkv_bias" => f.qkv_bias = true,
            _ => f.output_gate = true,
        }
        return Ok(());
    }
    let Some(v) = &item.value else {
        match key {
            "qk_layernorm" => f.qk_norm = Some(At::new(QkNorm::Layer, kspan)),
            "rope" => f.rope = Some(At::new(RopeMode::Half, kspan)),
            _ => {
                debug_assert!(!optional_keys.contains(&key));
                return Err(SpecError::new(
                    kspan,
                    SpecErrorKind::ValueArity {
                        key: key.to_string(),
                        msg: format!(
                            "needs a value: expected `{key} = {}`, found a bare `{key}`",
                            expected_for(key)
                        ),
                    },
                ));
            }
        }
        return Ok(());
    };
    macro_rules! at {
        ($x:expr) => {
            At::new($x, v.span)
        };
    }
    match key {
        "heads" => f.heads = Some(at!(pos_int(key, v)?)),
        "gqa" => f.gqa = Some(at!(pos_int(key, v)?)),
        "hidden" => f.hidden = Some(at!(pos_int(key, v)?)),
        "head_dim" => {
            let elems: Vec<&Spanned<RawValue>> = match &v.value {
                RawValue::List(xs) if !xs.is_empty() => xs.iter().collect(),
                RawValue::List(_) => return Err(bad(key, expected_for(key), v)),
                _ => vec![v],
            };
            let mut dims = Vec::with_capacity(elems.len());
            for e in elems {
                let d = match e.value {
                    RawValue::Int(n) if n > 0 => n,
                    _ => {
                        let what = if e.span == v.span {
                            expected_for(key)
                        } else {
                            "a positive integer"
                        };
                        return Err(bad(key, what, e));
                    }
                };
                let Some(d) = usize::try_from(d)
                    .ok()
                    .filter(|d| SUPPORTED_HEAD_DIMS.contains(d))
                else {
                    return Err(SpecError::new(
                        e.span,
                        SpecErrorKind::UnsupportedHeadDim {
                            found: d,
                            supported: SUPPORTED_HEAD_DIMS.to_vec(),
                        },
                    ));
                };
                if dims.contains(&d) {
                    return Err(SpecError::new(
                        e.span,
                        SpecErrorKind::DuplicateValue {
                            key: key.to_string(),
                            value: d.to_string(),
                        },
                    ));
                }
                dims.push(d);
            }
            f.head_dims = Some(at!(dims));
        }
        "qk_layernorm" => {
            let opts = [
                ("layer", QkNorm::Layer),
                ("rms", QkNorm::Rms),
                ("l2", QkNorm::L2),
            ];
            f.qk_norm = Some(at!(choice(key, v, &opts)?));
        }
        "eps" => f.eps = Some(at!(pos_float(key, "a positive number like `1e-6`", v)?)),
        "bias" => match v.value {
            RawValue::Bool(b) => f.bias = Some(at!(b)),
            _ => return Err(bad(key, expected_for(key), v)),
        },
        "rope" => {
            let opts = [
                ("half", RopeMode::Half),
                ("interleaved", RopeMode::Interleaved),
            ];
            f.rope = Some(at!(choice(key, v, &opts)?));
        }
        "rotary_percent" => {
            let p = pos_float(key, expected_for(key), v)?;
            if p > 1.0 {
                return Err(bad(key, expected_for(key), v));
            }
            f.rotary_percent = Some(at!(p));
        }
        "rotary_base" => {
            f.rotary_base = Some(at!(pos_float(key, "a positive number like `500000.0`", v)?))
        }
        "softmax_scale" => {
            f.softmax_scale = Some(at!(pos_float(key, "a positive number like `0.125`", v)?))
        }
        "mask" => {
            let elems: Vec<&Spanned<RawValue>> = match &v.value {
                RawValue::List(xs) if !xs.is_empty() => xs.iter().collect(),
                RawValue::List(_) => return Err(bad(key, expected_for(key), v)),
                _ => vec![v],
            };
            let mut masks = Vec::with_capacity(elems.len());
            for e in elems {
                let m = choice(key, e, &MASK_NAMES)?;
                if masks.contains(&m) {
                    return Err(SpecError::new(
                        e.span,
                        SpecErrorKind::DuplicateValue {
                            key: key.to_string(),
                            value: m.name().to_string(),
                        },
                    ));
                }
                masks.push(m);
            }
            f.masks = Some(at!(masks));
        }
        "window" => {
            let expected = "`(left, right)`: two integers >= -1 (-1 = unbounded)";
            let RawValue::Tuple(xs) = &v.value else {
                return Err(bad(key, expected, v));
            };
            if xs.len() != 2 {
                return Err(bad(key, expected, v));
            }
            let bound = |e: &Spanned<RawValue>| match e.value {
                RawValue::Int(n) if n >= -1 => Ok(n),
                _ => Err(bad(key, "an integer >= -1 (-1 = unbounded)", e)),
            };
            let left = bound(&xs[0])?;
            let right = bound(&xs[1])?;
            f.window = Some(at!((Window { left, right }, xs[1].span)));
        }
        "sinks" => {
            let opts = [
                ("off_by_one", Sinks::OffByOne),
                ("learnable", Sinks::Learnable),
            ];
            f.sinks = Some(at!(choice(key, v, &opts)?));
        }
        "dtype" => {
            let opts = [("bf16", DType::Bf16), ("f16", DType::F16)];
            f.dtype = Some(at!(choice(key, v, &opts)?));
        }
        _ => {
            let role = Role::from_name(key).expect("KNOWN_KEYS holds only keys and role names");
            match &v.value {
                RawValue::Path(p) | RawValue::Ident(p) => f.overrides.push((role, p.clone())),
                _ => return Err(bad(key, expected_for(key), v)),
            }
        }
    }
    Ok(())
}

/// Run every rule over `raw`: the spec when there are no errors, else every error found,
/// in source order for per-item errors followed by the cross-item rules.
fn check(raw: &RawSpec) -> (Option<AttentionSpec>, Vec<SpecError>) {
    let mut errs = Vec::new();
    let kind = match raw.kind.value.as_str() {
        "self" => Some(AttentionKind::SelfAttention),
        "cross" => Some(AttentionKind::CrossAttention),
        other => {
            errs.push(SpecError::new(
                raw.kind.span,
                SpecErrorKind::UnknownKind {
                    found: other.to_string(),
                },
            ));
            None
        }
    };

    let mut f = Fields::default();
    // Keys given (with a good or a bad value), with the span of the key.
    let mut seen: HashMap<&str, Span> = HashMap::new();
    for item in &raw.items {
        let key = item.key.value.as_str();
        if !KNOWN_KEYS.contains(&key) {
            errs.push(SpecError::new(
                item.key.span,
                SpecErrorKind::UnknownKey {
                    key: key.to_string(),
                    suggestion: suggest_key(key).map(str::to_string),
                },
            ));
            continue;
        }
        if seen.contains_key(key) {
            errs.push(SpecError::new(
                item.key.span,
                SpecErrorKind::DuplicateKey {
                    key: key.to_string(),
                },
            ));
            continue;
        }
        seen.insert(key, item.key.span);
        if let Err(e) = check_item(item, &mut f) {
            errs.push(e);
        }
    }

    let not_allowed = |key: &str, kind: &str, why: String| {
        SpecError::new(
            seen[key],
            SpecErrorKind::NotAllowedForKind {
                key: key.to_string(),
                kind: kind.to_string(),
                why,
            },
        )
    };
    let requires = |key: &str, needs: &str, why: &str| {
        SpecError::new(
            seen[key],
            SpecErrorKind::Requires {
                key: key.to_string(),
                needs: needs.to_string(),
                why: why.to_string(),
            },
        )
    };

    match kind {
        Some(AttentionKind::SelfAttention) => {
            if let (Some(h), Some(g)) = (&f.heads, &f.gqa) {
                if h.value % g.value != 0 {
                    errs.push(SpecError::new(
                        g.val,
                        SpecErrorKind::HeadsNotDivisible {
                            heads: h.value,
                            gqa: g.value,
                        },
                    ));
                }
            }
            for key in ["linear_q", "linear_kv"] {
                if seen.contains_key(key) {
                    let why = "self-attention projects q, k and v together with `linear_qkv`";
                    errs.push(not_allowed(key, "self", why.into()));
                }
            }
            if !seen.contains_key("rope") {
                for key in ["rotary_percent", "rotary_base"] {
                    if seen.contains_key(key) {
                        errs.push(requires(
                            key,
                            "rope",
                            "it only configures the rotary embedding",
                        ));
                    }
                }
            }
        }
        Some(AttentionKind::CrossAttention) => {
            if let (Some(h), Some(g)) = (&f.heads, &f.gqa) {
                if h.value != g.value {
                    errs.push(SpecError::new(
                        g.val,
                        SpecErrorKind::NotAllowedForKind {
                            key: "gqa".into(),
                            kind: "cross".into(),
                            why: format!(
                                "cross-attention has no grouped-query attention, so `gqa` must \
                                 equal `heads` ({}), found {}",
                                h.value, g.value
                            ),
                        },
                    ));
                }
            }
            for key in ["rope", "rotary_percent", "rotary_base"] {
                if seen.contains_key(key) {
                    errs.push(not_allowed(
                        key,
                        "cross",
                        "cross-attention has no rotary embedding".into(),
                    ));
                }
            }
            if seen.contains_key("linear_qkv") {
                let why = "cross-attention projects q with `linear_q` and k, v with `linear_kv`";
                errs.push(not_allowed("linear_qkv", "cross", why.into()));
            }
            if seen.contains_key("output_gate") {
                let why = "the output gate is only supported in self-attention";
                errs.push(not_allowed("output_gate", "cross", why.into()));
            }
        }
        None => {}
    }

    if !seen.contains_key("qk_layernorm") {
        for key in ["q_layernorm", "k_layernorm"] {
            if seen.contains_key(key) {
                errs.push(requires(
                    key,
                    "qk_layernorm",
                    "without it there is no q/k norm to replace",
                ));
            }
        }
    }

    if let Some(w) = &f.window {
        let default_masks = [MaskType::Causal];
        let masks = f
            .masks
            .as_ref()
            .map_or(&default_masks[..], |m| &m.value[..]);
        let (win, right_span) = w.value;
        for &m in masks {
            let problem = if !m.accepts_window() {
                Some((
                    w.val,
                    "an arbitrary mask already states every visible position".to_string(),
                ))
            } else if m.is_causal() && win.right > 0 {
                Some((
                    right_span,
                    format!(
                        "a causal mask already hides the keys right of the diagonal, so the right \
                         bound must be 0 or -1, found {}",
                        win.right
                    ),
                ))
            } else {
                None
            };
            if let Some((span, why)) = problem {
                errs.push(SpecError::new(
                    span,
                    SpecErrorKind::WindowMask {
                        mask: m.name().to_string(),
                        why,
                    },
                ));
                break;
            }
        }
    }

    if let (Some(p), Some(dims), true) = (&f.rotary_percent, &f.head_dims, f.rope.is_some()) {
        for &d in &dims.value {
            let rot = d as f64 * p.value;
            let r = rot.round();
            let whole = (rot - r).abs() <= 1e-9 * rot.max(1.0);
            if !whole || r < 2.0 || r % 2.0 != 0.0 {
                errs.push(SpecError::new(
                    p.val,
                    SpecErrorKind::RotaryDim {
                        percent: p.value,
                        head_dim: d,
                        rot_dim: rot,
                    },
                ));
                break;
            }
        }
    }

    let Some(kind) = kind.filter(|_| errs.is_empty()) else {
        return (None, errs);
    };
    let mut spec = AttentionSpec::new(kind);
    spec.heads = f.heads.map(|a| a.value);
    spec.gqa = f.gqa.map(|a| a.value);
    spec.head_dims = f.head_dims.map(|a| a.value).unwrap_or_default();
    spec.hidden = f.hidden.map(|a| a.value);
    spec.qk_norm = f.qk_norm.map(|a| a.value);
    if let Some(e) = f.eps {
        spec.eps = e.value;
    }
    if let Some(b) = f.bias {
        spec.bias = b.value;
    }
    spec.qkv_bias = f.qkv_bias;
    spec.rope = f.rope.map(|m| {
        let mut r = Rope {
            mode: m.value,
            ..Rope::default()
        };
        if let Some(p) = &f.rotary_percent {
            r.rotary_percent = p.value;
        }
        if let Some(b) = &f.rotary_base {
            r.rotary_base = b.value;
        }
        r
    });
    if let Some(m) = f.masks {
        spec.masks = m.value;
    }
    spec.window = f.window.map(|w| w.value.0);
    spec.softmax_scale = f.softmax_scale.map(|a| a.value);
    spec.sinks = f.sinks.map(|a| a.value);
    spec.output_gate = f.output_gate;
    if let Some(d) = f.dtype {
        spec.dtype = d.value;
    }
    spec.overrides = f.overrides;
    (Some(spec), errs)
}

/// Validate a parsed spec: every key known and given once, every value well typed and in
/// range, and the cross-item rules (heads divisible by gqa, what self/cross attention may
/// take, supported head dims, window vs mask, rotary dim, overrides that need `qk_layernorm`).
///
/// Keys left out take the defaults of [`AttentionSpec::new`].
///
/// # Errors
/// The first [`SpecError`], with the span of the offending key or value.
pub fn validate(raw: &RawSpec) -> Result<AttentionSpec, SpecError> {
    match check(raw) {
        (Some(spec), errs) if errs.is_empty() => Ok(spec),
        (_, mut errs) => Err(errs.swap_remove(0)),
    }
}

/// Like [`validate`], but reports every error found (never an empty list on `Err`).
///
/// # Errors
/// Every [`SpecError`] found; an item whose value is bad does not cause further errors.
pub fn validate_all(raw: &RawSpec) -> Result<AttentionSpec, Vec<SpecError>> {
    match check(raw) {
        (Some(spec), errs) if errs.is_empty() => Ok(spec),
        (_, errs) => Err(errs),
    }
}

/// Parse and validate a spec string such as
/// `"self, heads = 32, gqa = 8, head_dim = 128, rope, mask = causal"`.
///
/// Error spans are byte ranges into `src`; [`SpecError::with_source`] underlines them.
///
/// # Errors
/// A [`SpecErrorKind::Syntax`] error from [`parse_str`], or the first validation error.
pub fn parse_spec(src: &str) -> Result<AttentionSpec, SpecError> {
    validate(&parse_str(src)?)
}

impl FromStr for AttentionSpec {
    type Err = SpecError;

    /// Same as [`parse_spec`].
    fn from_str(s: &str) -> Result<Self, SpecError> {
        parse_spec(s)
    }
}
