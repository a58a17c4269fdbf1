//! The spec grammar, shared by the macro (from tokens) and by strings (CLI, config files).
//!
//! ```text
//! spec := kind ("," item)*          kind := self | cross
//! item := key | key "=" value
//! value := int | float | bool | ident | path | "[" value ("," value)* "]" | "(" value "," value ")"
//! ```
//!
//! Parsing produces a [`RawSpec`]: keys and values with their [`Span`]s, not yet checked.
//! [`crate::validate::validate`] turns it into an [`crate::AttentionSpec`]. The macro builds
//! the same [`RawSpec`] from its token stream, so both front ends share every rule.

/// A location in the source of a spec. For strings it is a byte range; the macro uses token
/// indices into its own span table. Validation errors carry the span of the offending part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Span {
    /// Start (inclusive).
    pub start: usize,
    /// End (exclusive).
    pub end: usize,
}

impl Span {
    /// A span from `start` to `end`.
    pub fn new(start: usize, end: usize) -> Self {
        Span { start, end }
    }
    /// The smallest span covering both.
    pub fn join(self, other: Span) -> Span {
        Span { start: self.start.min(other.start), end: self.end.max(other.end) }
    }
}

/// A value with the span it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Spanned<T> {
    /// The value.
    pub value: T,
    /// Where it was written.
    pub span: Span,
}

impl<T> Spanned<T> {
    /// Pair a value with its span.
    pub fn new(value: T, span: Span) -> Self {
        Spanned { value, span }
    }
}

/// An unchecked value.
#[derive(Debug, Clone, PartialEq)]
pub enum RawValue {
    /// An integer literal, possibly negative (`-1`).
    Int(i64),
    /// A float literal (`1e-6`, `0.5`, `500000.0`).
    Float(f64),
    /// `true` / `false`.
    Bool(bool),
    /// A bare identifier (`rms`, `causal`).
    Ident(String),
    /// A path with at least one `::` (`my_crate::MyLinear`).
    Path(String),
    /// `[a, b, ...]`.
    List(Vec<Spanned<RawValue>>),
    /// `(a, b, ...)`.
    Tuple(Vec<Spanned<RawValue>>),
}

/// One `key` or `key = value` item.
#[derive(Debug, Clone, PartialEq)]
pub struct RawItem {
    /// The key as written.
    pub key: Spanned<String>,
    /// The value, absent for a bare key (`rope`, `qkv_bias`).
    pub value: Option<Spanned<RawValue>>,
}

/// A parsed, unvalidated spec.
#[derive(Debug, Clone, PartialEq)]
pub struct RawSpec {
    /// `self` or `cross`, as written.
    pub kind: Spanned<String>,
    /// The items after the kind, in order.
    pub items: Vec<RawItem>,
}
