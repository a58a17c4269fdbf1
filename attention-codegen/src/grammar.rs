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

use crate::error::{SpecError, SpecErrorKind};

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
        Span {
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
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

/// One token of a spec string. Spans are byte ranges into the source.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// An identifier or keyword (`heads`, `self`, `true`, `bf16`).
    Ident(String),
    /// A number literal without sign, as written (`64`, `1e-6`, `0.5`).
    Number(String),
    Eq,
    Comma,
    LBracket,
    RBracket,
    LParen,
    RParen,
    PathSep,
    Minus,
    Eof,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Ident(s) | Tok::Number(s) => format!("`{s}`"),
            Tok::Eq => "`=`".into(),
            Tok::Comma => "`,`".into(),
            Tok::LBracket => "`[`".into(),
            Tok::RBracket => "`]`".into(),
            Tok::LParen => "`(`".into(),
            Tok::RParen => "`)`".into(),
            Tok::PathSep => "`::`".into(),
            Tok::Minus => "`-`".into(),
            Tok::Eof => "end of input".into(),
        }
    }
}

fn syntax(span: Span, expected: impl Into<String>, found: impl Into<String>) -> SpecError {
    SpecError::new(
        span,
        SpecErrorKind::Syntax {
            expected: expected.into(),
            found: found.into(),
        },
    )
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_continue(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Split `src` into tokens. Whitespace separates tokens and is otherwise ignored.
fn tokenize(src: &str) -> Result<Vec<(Tok, Span)>, SpecError> {
    let bytes = src.as_bytes();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < src.len() {
        let c = src[i..].chars().next().unwrap_or(' ');
        let start = i;
        if c.is_whitespace() {
            i += c.len_utf8();
            continue;
        }
        let single = match c {
            '=' => Some(Tok::Eq),
            ',' => Some(Tok::Comma),
            '[' => Some(Tok::LBracket),
            ']' => Some(Tok::RBracket),
            '(' => Some(Tok::LParen),
            ')' => Some(Tok::RParen),
            '-' => Some(Tok::Minus),
            _ => None,
        };
        if let Some(t) = single {
            i += 1;
            toks.push((t, Span::new(start, i)));
            continue;
        }
        if c == ':' {
            if bytes.get(i + 1) == Some(&b':') {
                i += 2;
                toks.push((Tok::PathSep, Span::new(start, i)));
                continue;
            }
            return Err(syntax(
                Span::new(start, start + 1),
                "`::` in a path",
                "a single `:`",
            ));
        }
        if is_ident_start(c) {
            while i < src.len() && is_ident_continue(bytes[i] as char) {
                i += 1;
            }
            toks.push((Tok::Ident(src[start..i].to_string()), Span::new(start, i)));
            continue;
        }
        if c.is_ascii_digit() {
            let digits = |i: &mut usize| {
                while *i < src.len() && bytes[*i].is_ascii_digit() {
                    *i += 1;
                }
            };
            digits(&mut i);
            if i < src.len() && bytes[i] == b'.' {
                i += 1;
                digits(&mut i);
            }
            if i < src.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
                let save = i;
                i += 1;
                if i < src.len() && (bytes[i] == b'+' || bytes[i] == b'-') {
                    i += 1;
                }
                if i < src.len() && bytes[i].is_ascii_digit() {
                    digits(&mut i);
                } else {
                    // `1e` or `1e-` without exponent digits: let the check below report it.
                    i = save;
                }
            }
            // A number glued to letters (`64k`, `1e`, `0x10`) is not a literal.
            if i < src.len() && is_ident_continue(bytes[i] as char) {
                let mut end = i;
                while end < src.len() && is_ident_continue(bytes[end] as char) {
                    end += 1;
                }
                return Err(syntax(
                    Span::new(start, end),
                    "a number (integer like `64` or float like `0.5`, `1e-6`)",
                    format!("`{}`", &src[start..end]),
                ));
            }
            toks.push((Tok::Number(src[start..i].to_string()), Span::new(start, i)));
            continue;
        }
        let end = start + c.len_utf8();
        return Err(syntax(
            Span::new(start, end),
            "a key, a value, `=`, `,`, `[`, `]`, `(` or `)`",
            format!("character `{c}`"),
        ));
    }
    toks.push((Tok::Eof, Span::new(src.len(), src.len())));
    Ok(toks)
}

struct Parser {
    toks: Vec<(Tok, Span)>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> &(Tok, Span) {
        &self.toks[self.pos.min(self.toks.len() - 1)]
    }

    fn peek_at(&self, ahead: usize) -> &(Tok, Span) {
        &self.toks[(self.pos + ahead).min(self.toks.len() - 1)]
    }

    fn bump(&mut self) -> (Tok, Span) {
        let t = self.peek().clone();
        if self.pos < self.toks.len() - 1 {
            self.pos += 1;
        }
        t
    }

    fn err_here(&self, expected: &str) -> SpecError {
        let (t, s) = self.peek();
        syntax(*s, expected, t.describe())
    }

    fn spec(&mut self) -> Result<RawSpec, SpecError> {
        let kind = match self.peek().clone() {
            (Tok::Ident(name), span) => {
                if self.peek_at(1).0 == Tok::Eq {
                    let end = self.peek_at(1).1.end;
                    return Err(syntax(
                        Span::new(span.start, end),
                        "the attention kind (`self` or `cross`) as the first item",
                        format!("`{name} =`"),
                    ));
                }
                self.bump();
                Spanned::new(name, span)
            }
            _ => return Err(self.err_here("the attention kind `self` or `cross`")),
        };
        let mut items = Vec::new();
        loop {
            match self.peek().0 {
                Tok::Eof => break,
                Tok::Comma => {
                    self.bump();
                }
                _ => return Err(self.err_here("`,` or end of spec")),
            }
            // A trailing comma is allowed.
            if self.peek().0 == Tok::Eof {
                break;
            }
            items.push(self.item()?);
        }
        Ok(RawSpec { kind, items })
    }

    fn item(&mut self) -> Result<RawItem, SpecError> {
        let key = match self.peek().clone() {
            (Tok::Ident(name), span) => {
                self.bump();
                Spanned::new(name, span)
            }
            _ => return Err(self.err_here("a key (like `heads` or `rope`)")),
        };
        let value = if self.peek().0 == Tok::Eq {
            self.bump();
            Some(self.value()?)
        } else {
            None
        };
        Ok(RawItem { key, value })
    }

    fn value(&mut self) -> Result<Spanned<RawValue>, SpecError> {
        let (tok, span) = self.peek().clone();
        match tok {
            Tok::LBracket => {
                self.bump();
                let (elems, end) = self.seq(Tok::RBracket, "`]`")?;
                Ok(Spanned::new(RawValue::List(elems), span.join(end)))
            }
            Tok::LParen => {
                self.bump();
                let (elems, end) = self.seq(Tok::RParen, "`)`")?;
                Ok(Spanned::new(RawValue::Tuple(elems), span.join(end)))
            }
            Tok::Minus => {
                self.bump();
                match self.peek().clone() {
                    (Tok::Number(text), nspan) => {
                        self.bump();
                        number(&format!("-{text}"), span.join(nspan))
                    }
                    _ => Err(self.err_here("a number after `-`")),
                }
            }
            Tok::Number(text) => {
                self.bump();
                number(&text, span)
            }
            Tok::Ident(_) | Tok::PathSep => self.path_or_ident(),
            _ => Err(self.err_here(
                "a value (a number, `true`/`false`, a name, a path, `[...]` or `(...)`)",
            )),
        }
    }

    /// Comma-separated values up to `close`; a trailing comma is allowed, an empty sequence
    /// is not.
    fn seq(
        &mut self,
        close: Tok,
        close_name: &str,
    ) -> Result<(Vec<Spanned<RawValue>>, Span), SpecError> {
        let mut elems = Vec::new();
        loop {
            if self.peek().0 == close {
                if elems.is_empty() {
                    return Err(self.err_here("a value"));
                }
                let (_, end) = self.bump();
                return Ok((elems, end));
            }
            elems.push(self.value()?);
            match self.peek().0 {
                Tok::Comma => {
                    self.bump();
                }
                ref t if *t == close => {}
                _ => return Err(self.err_here(&format!("`,` or {close_name}"))),
            }
        }
    }

    fn path_or_ident(&mut self) -> Result<Spanned<RawValue>, SpecError> {
        let start = self.peek().1;
        let mut text = String::new();
        let mut end;
        let mut segments = 0;
        if self.peek().0 == Tok::PathSep {
            self.bump();
            text.push_str("::");
        }
        loop {
            match self.peek().clone() {
                (Tok::Ident(name), s) => {
                    self.bump();
                    text.push_str(&name);
                    end = s;
                    segments += 1;
                }
                _ => return Err(self.err_here("a name after `::`")),
            }
            if self.peek().0 == Tok::PathSep {
                self.bump();
                text.push_str("::");
            } else {
                break;
            }
        }
        let span = start.join(end);
        let value = if segments == 1 && !text.starts_with("::") {
            match text.as_str() {
                "true" => RawValue::Bool(true),
                "false" => RawValue::Bool(false),
                _ => RawValue::Ident(text),
            }
        } else {
            RawValue::Path(text)
        };
        Ok(Spanned::new(value, span))
    }
}

/// A number literal (sign included) as an int when it has no `.` or exponent, else a float.
fn number(text: &str, span: Span) -> Result<Spanned<RawValue>, SpecError> {
    let is_float = text.contains(['.', 'e', 'E']);
    if is_float {
        match text.parse::<f64>() {
            Ok(x) if x.is_finite() => Ok(Spanned::new(RawValue::Float(x), span)),
            _ => Err(syntax(span, "a finite float literal", format!("`{text}`"))),
        }
    } else {
        match text.parse::<i64>() {
            Ok(n) => Ok(Spanned::new(RawValue::Int(n), span)),
            Err(_) => Err(syntax(
                span,
                "an integer within the 64-bit range",
                format!("`{text}`"),
            )),
        }
    }
}

/// Parse a spec string into a [`RawSpec`] without checking keys or values.
///
/// Spans are byte ranges into `src`. Whitespace is ignored between tokens. Supported
/// literals: integers (`64`, `-1`), floats (`0.5`, `1e-6`, `500000.0`), `true`/`false`,
/// names (`rms`), paths (`my_crate::MyLinear`, `::a::B`), lists `[64, 128]` and tuples
/// `(4095, 0)`. A trailing comma is accepted after the last item and inside lists.
///
/// # Errors
/// [`SpecErrorKind::Syntax`] with the span of the offending token, saying what was expected
/// and what was found.
pub fn parse_str(src: &str) -> Result<RawSpec, SpecError> {
    let toks = tokenize(src)?;
    let mut p = Parser { toks, pos: 0 };
    p.spec()
}
