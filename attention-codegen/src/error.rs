//! Spec errors: one variant per validation rule, each with the span of the offending part.

use crate::grammar::Span;
use thiserror::Error;

/// A spec error at a location.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("{kind}")]
pub struct SpecError {
    /// Where in the spec source the error is.
    pub span: Span,
    /// What is wrong.
    pub kind: SpecErrorKind,
}

impl SpecError {
    /// An error of `kind` at `span`.
    pub fn new(span: Span, kind: SpecErrorKind) -> Self {
        SpecError { span, kind }
    }

    /// The message followed by the source line with the span underlined, for errors from
    /// a spec string (`span` is then a byte range into `src`):
    ///
    /// ```text
    /// unknown key `head`: did you mean `heads`?
    ///   self, head = 32
    ///         ^^^^
    /// ```
    pub fn with_source(&self, src: &str) -> String {
        let start = floor_char_boundary(src, self.span.start);
        let end = floor_char_boundary(src, self.span.end.max(self.span.start));
        let width = src[start..end].chars().count().max(1);
        let pad = src[..start].chars().count();
        let line: String = src
            .chars()
            .map(|c| if c.is_whitespace() { ' ' } else { c })
            .collect();
        format!(
            "{self}\n  {line}\n  {}{}",
            " ".repeat(pad),
            "^".repeat(width)
        )
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// What is wrong with a spec. Every message names the key, what was expected and what was
/// given.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SpecErrorKind {
    /// The token stream or string does not follow the grammar.
    #[error("syntax error: expected {expected}, found {found}")]
    Syntax {
        /// What the grammar wanted here.
        expected: String,
        /// What was there.
        found: String,
    },
    /// The first item is not `self` or `cross`.
    #[error("unknown attention kind `{found}`: expected `self` or `cross`")]
    UnknownKind {
        /// What was written.
        found: String,
    },
    /// A key the grammar does not know.
    #[error("unknown key `{key}`{}", match suggestion { Some(s) => format!(": did you mean `{s}`?"), None => String::new() })]
    UnknownKey {
        /// The key as written.
        key: String,
        /// The nearest known key, if one is close.
        suggestion: Option<String>,
    },
    /// A key given twice.
    #[error("duplicate key `{key}`: each key may appear once")]
    DuplicateKey {
        /// The key.
        key: String,
    },
    /// A literal of the wrong type or out of range.
    #[error("bad value for `{key}`: expected {expected}, found {found}")]
    BadValue {
        /// The key.
        key: String,
        /// What the key accepts.
        expected: String,
        /// What was written.
        found: String,
    },
    /// A key that needs a value was given bare, or one that takes none was given one.
    #[error("`{key}` {msg}")]
    ValueArity {
        /// The key.
        key: String,
        /// "needs a value" / "takes no value".
        msg: String,
    },
    /// `heads % gqa != 0`.
    #[error("`heads` ({heads}) must be a multiple of `gqa` ({gqa})")]
    HeadsNotDivisible {
        /// Query heads.
        heads: usize,
        /// Key/value groups.
        gqa: usize,
    },
    /// A head dim outside [`crate::SUPPORTED_HEAD_DIMS`].
    #[error("unsupported head_dim {found}: supported head dims are {supported:?}")]
    UnsupportedHeadDim {
        /// What was written.
        found: i64,
        /// The supported set.
        supported: Vec<usize>,
    },
    /// An item that this attention kind cannot take (cross + rope, self + linear_q, ...).
    #[error("`{key}` is not allowed in {kind} attention: {why}")]
    NotAllowedForKind {
        /// The key.
        key: String,
        /// `self` or `cross`.
        kind: String,
        /// Why.
        why: String,
    },
    /// A window on a mask type that cannot take one.
    #[error("`window` cannot be combined with mask `{mask}`: {why}")]
    WindowMask {
        /// The mask.
        mask: String,
        /// Why.
        why: String,
    },
    /// A key that only makes sense together with another one (`q_layernorm = T` without
    /// `qk_layernorm`, `rotary_percent` without `rope`).
    #[error("`{key}` requires `{needs}`: {why}")]
    Requires {
        /// The key given.
        key: String,
        /// The key it needs.
        needs: String,
        /// Why.
        why: String,
    },
    /// `rotary_percent` that does not give an even, positive rotary dim for a head dim.
    #[error(
        "bad `rotary_percent` {percent}: head_dim {head_dim} * {percent} = {rot_dim}, expected \
         an even integer > 0 (the rotated channels come in pairs)"
    )]
    RotaryDim {
        /// The rotary percent given.
        percent: f64,
        /// The head dim it was applied to.
        head_dim: usize,
        /// `head_dim * percent`.
        rot_dim: f64,
    },
    /// A value listed twice (`head_dim = [64, 64]`, `mask = [causal, causal]`).
    #[error("duplicate value `{value}` in `{key}`: each value may be listed once")]
    DuplicateValue {
        /// The key.
        key: String,
        /// The repeated value.
        value: String,
    },
    /// Dimensions that contradict each other (`hidden` vs heads * head_dim is allowed to
    /// differ; this is for e.g. a listed head dim twice or a bad rotary dim).
    #[error("inconsistent spec: {msg}")]
    Inconsistent {
        /// What contradicts what.
        msg: String,
    },
}
