//! From the attribute's tokens to an [`attention_codegen::RawSpec`].
//!
//! The macro and the string parser share one grammar (see `attention_codegen::grammar`):
//! this module walks the `proc_macro2` token trees and produces the same [`RawSpec`] the
//! string parser would. Spans in the [`RawSpec`] are indices into a table of
//! [`proc_macro2::Span`]s ([`SpanTable`]), one entry per source token (a `::` takes two
//! entries, a group takes one for its opening and one for its closing delimiter), so any
//! error reported by validation maps back to the exact token(s) it is about.

use attention_codegen::grammar::{RawItem, RawSpec, RawValue, Span, Spanned};
use attention_codegen::{SpecError, SpecErrorKind};
use proc_macro2::{Delimiter, Spacing, TokenStream, TokenTree};

/// Token spans, indexed by the `start..end` indices stored in a [`RawSpec`]'s [`Span`]s.
#[derive(Debug, Default)]
pub struct SpanTable {
    spans: Vec<proc_macro2::Span>,
}

impl SpanTable {
    fn push(&mut self, span: proc_macro2::Span) -> usize {
        self.spans.push(span);
        self.spans.len() - 1
    }

    /// The first and last source span covered by `span` (`end` exclusive). An empty span
    /// (end of input) maps to the last token; an empty table maps to the call site.
    pub fn resolve(&self, span: Span) -> (proc_macro2::Span, proc_macro2::Span) {
        let n = self.spans.len();
        if n == 0 {
            let s = proc_macro2::Span::call_site();
            return (s, s);
        }
        let first = span.start.min(n - 1);
        let last = span.end.saturating_sub(1).max(span.start).min(n - 1);
        (self.spans[first], self.spans[last])
    }

    /// A `syn::Error` with `msg` covering `span`'s tokens (first through last).
    pub fn error(&self, span: Span, msg: impl std::fmt::Display) -> syn::Error {
        let (first, last) = self.resolve(span);
        let mut tokens = TokenStream::new();
        tokens.extend([
            TokenTree::Ident(proc_macro2::Ident::new("__first", first)),
            TokenTree::Ident(proc_macro2::Ident::new("__last", last)),
        ]);
        syn::Error::new_spanned(tokens, msg)
    }

    /// The first source span covered by `span`.
    pub fn first(&self, span: Span) -> proc_macro2::Span {
        self.resolve(span).0
    }
}

/// A flattened token. Groups become their delimiters; `::` is one token.
#[derive(Debug, Clone)]
enum Tok {
    Ident(String),
    Lit(proc_macro2::Literal),
    Eq,
    Comma,
    LBracket,
    RBracket,
    LParen,
    RParen,
    PathSep,
    Minus,
    /// Anything the grammar has no place for, described for the error message.
    Other(String),
    Eof,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("`{s}`"),
            Tok::Lit(l) => describe_literal(l),
            Tok::Eq => "`=`".into(),
            Tok::Comma => "`,`".into(),
            Tok::LBracket => "`[`".into(),
            Tok::RBracket => "`]`".into(),
            Tok::LParen => "`(`".into(),
            Tok::RParen => "`)`".into(),
            Tok::PathSep => "`::`".into(),
            Tok::Minus => "`-`".into(),
            Tok::Other(s) => s.clone(),
            Tok::Eof => "end of the attribute".into(),
        }
    }

    fn same(&self, other: &Tok) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

fn describe_literal(l: &proc_macro2::Literal) -> String {
    match syn::Lit::new(l.clone()) {
        syn::Lit::Str(_) | syn::Lit::ByteStr(_) | syn::Lit::CStr(_) => {
            format!("string literal `{l}`")
        }
        syn::Lit::Char(_) | syn::Lit::Byte(_) => format!("character literal `{l}`"),
        _ => format!("`{l}`"),
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

/// Flatten `stream` into tokens, recording one table entry per source token.
fn flatten(stream: TokenStream, table: &mut SpanTable, out: &mut Vec<(Tok, Span)>) {
    let mut iter = stream.into_iter().peekable();
    while let Some(tt) = iter.next() {
        match tt {
            TokenTree::Ident(i) => {
                let k = table.push(i.span());
                out.push((Tok::Ident(i.to_string()), Span::new(k, k + 1)));
            }
            TokenTree::Literal(l) => {
                let k = table.push(l.span());
                out.push((Tok::Lit(l), Span::new(k, k + 1)));
            }
            TokenTree::Punct(p) => {
                let k = table.push(p.span());
                let tok = match p.as_char() {
                    '=' => Tok::Eq,
                    ',' => Tok::Comma,
                    '-' => Tok::Minus,
                    ':' if p.spacing() == Spacing::Joint
                        && matches!(iter.peek(), Some(TokenTree::Punct(q)) if q.as_char() == ':') =>
                    {
                        if let Some(TokenTree::Punct(q)) = iter.next() {
                            table.push(q.span());
                        }
                        out.push((Tok::PathSep, Span::new(k, k + 2)));
                        continue;
                    }
                    c => Tok::Other(format!("`{c}`")),
                };
                out.push((tok, Span::new(k, k + 1)));
            }
            TokenTree::Group(g) => match g.delimiter() {
                Delimiter::None => flatten(g.stream(), table, out),
                Delimiter::Bracket | Delimiter::Parenthesis => {
                    let (open, close) = if g.delimiter() == Delimiter::Bracket {
                        (Tok::LBracket, Tok::RBracket)
                    } else {
                        (Tok::LParen, Tok::RParen)
                    };
                    let k = table.push(g.span_open());
                    out.push((open, Span::new(k, k + 1)));
                    flatten(g.stream(), table, out);
                    let k = table.push(g.span_close());
                    out.push((close, Span::new(k, k + 1)));
                }
                Delimiter::Brace => {
                    let k = table.push(g.span_open());
                    let end = table.push(g.span_close());
                    out.push((Tok::Other("a `{...}` block".into()), Span::new(k, end + 1)));
                }
            },
        }
    }
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
                if matches!(self.peek_at(1).0, Tok::Eq) {
                    let end = self.peek_at(1).1;
                    return Err(syntax(
                        span.join(end),
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
                _ => return Err(self.err_here("`,` or the end of the attribute")),
            }
            // A trailing comma is allowed.
            if matches!(self.peek().0, Tok::Eof) {
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
        let value = if matches!(self.peek().0, Tok::Eq) {
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
                    (Tok::Lit(lit), lspan) => {
                        self.bump();
                        number(&lit, true, span.join(lspan))
                    }
                    _ => Err(self.err_here("a number after `-`")),
                }
            }
            Tok::Lit(lit) => {
                self.bump();
                number(&lit, false, span)
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
            if self.peek().0.same(&close) {
                if elems.is_empty() {
                    return Err(self.err_here("a value"));
                }
                let (_, end) = self.bump();
                return Ok((elems, end));
            }
            elems.push(self.value()?);
            match &self.peek().0 {
                Tok::Comma => {
                    self.bump();
                }
                t if t.same(&close) => {}
                _ => return Err(self.err_here(&format!("`,` or {close_name}"))),
            }
        }
    }

    fn path_or_ident(&mut self) -> Result<Spanned<RawValue>, SpecError> {
        let start = self.peek().1;
        let mut text = String::new();
        let mut end;
        let mut segments = 0;
        if matches!(self.peek().0, Tok::PathSep) {
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
            if matches!(self.peek().0, Tok::PathSep) {
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

/// A numeric literal token (with a leading `-` when `negative`) as an int or a float.
fn number(
    lit: &proc_macro2::Literal,
    negative: bool,
    span: Span,
) -> Result<Spanned<RawValue>, SpecError> {
    let sign = if negative { "-" } else { "" };
    let number_expected = "a number (an integer like `64` or a float like `0.5`, `1e-6`)";
    match syn::Lit::new(lit.clone()) {
        syn::Lit::Int(i) => {
            if !i.suffix().is_empty() {
                return Err(syntax(
                    span,
                    "a number without a type suffix",
                    format!("`{sign}{i}`"),
                ));
            }
            let text = format!("{sign}{}", i.base10_digits());
            text.parse::<i64>()
                .map(|n| Spanned::new(RawValue::Int(n), span))
                .map_err(|_| {
                    syntax(
                        span,
                        "an integer within the 64-bit range",
                        format!("`{sign}{i}`"),
                    )
                })
        }
        syn::Lit::Float(f) => {
            if !f.suffix().is_empty() {
                return Err(syntax(
                    span,
                    "a number without a type suffix",
                    format!("`{sign}{f}`"),
                ));
            }
            let text = format!("{sign}{}", f.base10_digits());
            match text.parse::<f64>() {
                Ok(x) if x.is_finite() => Ok(Spanned::new(RawValue::Float(x), span)),
                _ => Err(syntax(
                    span,
                    "a finite float literal",
                    format!("`{sign}{f}`"),
                )),
            }
        }
        _ => Err(syntax(
            span,
            if negative {
                number_expected
            } else {
                "a value (a number, `true`/`false`, a name, a path, `[...]` or `(...)`)"
            },
            describe_literal(lit),
        )),
    }
}

/// Parse the attribute's tokens into a [`RawSpec`] and the span table its spans index.
///
/// # Errors
/// A [`SpecErrorKind::Syntax`] error at the offending token when the tokens do not follow
/// the grammar; its span indexes the returned table.
pub fn parse_tokens(stream: TokenStream) -> (SpanTable, Result<RawSpec, SpecError>) {
    let mut table = SpanTable::default();
    let mut toks = Vec::new();
    flatten(stream, &mut table, &mut toks);
    let n = table.spans.len();
    toks.push((Tok::Eof, Span::new(n, n)));
    let mut p = Parser { toks, pos: 0 };
    let result = p.spec();
    (table, result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    fn parse(ts: TokenStream) -> RawSpec {
        let (_, r) = parse_tokens(ts);
        r.expect("parses")
    }

    fn value_of(spec: &RawSpec, key: &str) -> RawValue {
        spec.items
            .iter()
            .find(|i| i.key.value == key)
            .and_then(|i| i.value.clone())
            .map(|v| v.value)
            .expect("key with value")
    }

    #[test]
    fn matches_the_string_parser() {
        let src =
            "self, heads = 32, gqa = 8, head_dim = [64, 128], qk_layernorm = rms, eps = 1e-6, \
                   rope = interleaved, rotary_base = 500000.0, mask = [causal, padding], \
                   window = (-1, 0), bias = false, qkv_bias, linear_proj = my::Proj, \
                   core_attention = ::abs::Core, output_gate";
        let ts: TokenStream = src.parse().expect("tokens");
        let from_tokens = parse(ts);
        let from_str = attention_codegen::grammar::parse_str(src).expect("string parses");
        // Same structure; only the spans differ (token indices vs byte ranges).
        assert_eq!(from_tokens.kind.value, from_str.kind.value);
        assert_eq!(from_tokens.items.len(), from_str.items.len());
        for (a, b) in from_tokens.items.iter().zip(&from_str.items) {
            assert_eq!(a.key.value, b.key.value);
            assert_eq!(
                strip(a.value.as_ref()),
                strip(b.value.as_ref()),
                "key {}",
                a.key.value
            );
        }
    }

    /// A value with every span zeroed, for structural comparison.
    fn strip(v: Option<&Spanned<RawValue>>) -> Option<RawValue> {
        fn go(v: &RawValue) -> RawValue {
            match v {
                RawValue::List(xs) => RawValue::List(
                    xs.iter()
                        .map(|x| Spanned::new(go(&x.value), Span::default()))
                        .collect(),
                ),
                RawValue::Tuple(xs) => RawValue::Tuple(
                    xs.iter()
                        .map(|x| Spanned::new(go(&x.value), Span::default()))
                        .collect(),
                ),
                other => other.clone(),
            }
        }
        v.map(|v| go(&v.value))
    }

    #[test]
    fn negative_ints_floats_and_paths() {
        let spec = parse(quote!(
            self,
            window = (-1, 0),
            eps = 1e-6,
            softmax_scale = -0.5,
            linear_proj = a::b::C
        ));
        match value_of(&spec, "window") {
            RawValue::Tuple(xs) => {
                assert_eq!(xs[0].value, RawValue::Int(-1));
                assert_eq!(xs[1].value, RawValue::Int(0));
            }
            other => panic!("expected a tuple, got {other:?}"),
        }
        assert_eq!(value_of(&spec, "eps"), RawValue::Float(1e-6));
        assert_eq!(value_of(&spec, "softmax_scale"), RawValue::Float(-0.5));
        assert_eq!(
            value_of(&spec, "linear_proj"),
            RawValue::Path("a::b::C".into())
        );
        assert_eq!(spec.kind.value, "self");
    }

    #[test]
    fn spans_cover_the_tokens() {
        // tokens: self , window = ( - 1 , 0 ) , linear_proj = a : : B
        //         0    1 2      3 4 5 6 7 8 9 10 11          12 13 14,15 16
        let spec = parse(quote!(self, window = (-1, 0), linear_proj = a::B));
        let w = spec.items[0].value.as_ref().expect("window value");
        assert_eq!(w.span, Span::new(4, 10));
        match &w.value {
            RawValue::Tuple(xs) => assert_eq!(xs[0].span, Span::new(5, 7)),
            other => panic!("expected a tuple, got {other:?}"),
        }
        let p = spec.items[1].value.as_ref().expect("path value");
        assert_eq!(spec.items[1].key.span, Span::new(11, 12));
        assert_eq!(p.span, Span::new(13, 17));
    }

    #[test]
    fn syntax_errors_point_at_the_token() {
        let cases: Vec<(TokenStream, &str, Span)> = vec![
            (quote!(self, heads = "x"), "string literal", Span::new(4, 5)),
            (
                quote!(self, heads = 32usize),
                "type suffix",
                Span::new(4, 5),
            ),
            (quote!(self, heads 32), "`,` or the end", Span::new(3, 4)),
            (quote!(heads = 3), "attention kind", Span::new(0, 2)),
            (quote!(), "attention kind", Span::new(0, 0)),
            (quote!(self, window = ()), "a value", Span::new(5, 6)),
            (quote!(self, eps = -x), "a number after", Span::new(5, 6)),
            (
                quote!(self, linear_proj = a:b),
                "`,` or the end",
                Span::new(5, 6),
            ),
            (quote!(self, mask = { causal }), "a value", Span::new(4, 6)),
        ];
        for (ts, needle, span) in cases {
            let (_, r) = parse_tokens(ts.clone());
            let e = r.expect_err(&ts.to_string());
            assert!(e.to_string().contains(needle), "{ts}: {e}");
            assert_eq!(e.span, span, "{ts}: {e}");
        }
    }

    #[test]
    fn resolve_clamps_to_the_table() {
        let (table, r) = parse_tokens(quote!(self, rope));
        assert!(r.is_ok());
        // End of input maps onto the last token without panicking.
        let _ = table.resolve(Span::new(3, 3));
        let _ = table.resolve(Span::new(100, 200));
        let empty = SpanTable::default();
        let _ = empty.resolve(Span::new(0, 1));
    }
}
