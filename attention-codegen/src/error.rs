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
    /// Dimensions that contradict each other (`hidden` vs heads * head_dim is allowed to
    /// differ; this is for e.g. a listed head dim twice or a bad rotary dim).
    #[error("inconsistent spec: {msg}")]
    Inconsistent {
        /// What contradicts what.
        msg: String,
    },
}
