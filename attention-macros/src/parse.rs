//! From the attribute's tokens to an [`attention_codegen::RawSpec`].
//!
//! The macro and the string parser share one grammar, `attention_codegen::grammar`: this
//! module only flattens the `proc_macro2` token trees into grammar [`Token`]s and hands them
//! to [`grammar::parse_tokens`], which produces the same [`RawSpec`] the string parser
//! would. Spans in the [`RawSpec`] are indices into a table of [`proc_macro2::Span`]s
//! ([`SpanTable`]), one entry per source token (a `::` takes two entries, a group takes one
//! for its opening and one for its closing delimiter), so any error reported by the grammar
//! or by validation maps back to the exact token(s) it is about.

use attention_codegen::grammar::{self, NumberToken, RawSpec, Source, Span, Token};
use attention_codegen::SpecError;
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
        match self.token_range(span) {
            Some((first, last)) => (self.spans[first], self.spans[last]),
            None => {
                let s = proc_macro2::Span::call_site();
                (s, s)
            }
        }
    }

    /// The indices of the first and last token `span` covers, clamped into the table;
    /// `None` for an empty table.
    fn token_range(&self, span: Span) -> Option<(usize, usize)> {
        let max = self.spans.len().checked_sub(1)?;
        let first = span.start.min(max);
        let last = span.end.saturating_sub(1).max(span.start).min(max);
        Some((first, last))
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

/// A `proc_macro2` literal as a grammar token: numbers become [`Token::Number`] (with
/// syn's base-10 digits and any type suffix, which the grammar rejects), other literals
/// [`Token::Literal`] with their description.
fn literal_token(l: &proc_macro2::Literal) -> Token {
    let number = |digits: &str, is_float: bool, suffix: &str| {
        Token::Number(NumberToken {
            written: l.to_string(),
            digits: digits.to_string(),
            is_float,
            suffix: suffix.to_string(),
        })
    };
    match syn::Lit::new(l.clone()) {
        syn::Lit::Int(i) => number(i.base10_digits(), false, i.suffix()),
        syn::Lit::Float(f) => number(f.base10_digits(), true, f.suffix()),
        syn::Lit::Str(_) | syn::Lit::ByteStr(_) | syn::Lit::CStr(_) => {
            Token::Literal(format!("string literal `{l}`"))
        }
        syn::Lit::Char(_) | syn::Lit::Byte(_) => Token::Literal(format!("character literal `{l}`")),
        _ => Token::Literal(format!("`{l}`")),
    }
}

/// Flatten `stream` into tokens, recording one table entry per source token.
fn flatten(stream: TokenStream, table: &mut SpanTable, out: &mut Vec<(Token, Span)>) {
    let mut iter = stream.into_iter().peekable();
    while let Some(tt) = iter.next() {
        match tt {
            TokenTree::Ident(i) => {
                let k = table.push(i.span());
                out.push((Token::Ident(i.to_string()), Span::new(k, k + 1)));
            }
            TokenTree::Literal(l) => {
                let k = table.push(l.span());
                out.push((literal_token(&l), Span::new(k, k + 1)));
            }
            TokenTree::Punct(p) => {
                let k = table.push(p.span());
                let tok = match p.as_char() {
                    '=' => Token::Eq,
                    ',' => Token::Comma,
                    '-' => Token::Minus,
                    ':' if p.spacing() == Spacing::Joint
                        && matches!(iter.peek(), Some(TokenTree::Punct(q)) if q.as_char() == ':') =>
                    {
                        if let Some(TokenTree::Punct(q)) = iter.next() {
                            table.push(q.span());
                        }
                        out.push((Token::PathSep, Span::new(k, k + 2)));
                        continue;
                    }
                    c => Token::Other(format!("`{c}`")),
                };
                out.push((tok, Span::new(k, k + 1)));
            }
            TokenTree::Group(g) => match g.delimiter() {
                Delimiter::None => flatten(g.stream(), table, out),
                Delimiter::Bracket | Delimiter::Parenthesis => {
                    let (open, close) = if g.delimiter() == Delimiter::Bracket {
                        (Token::OpenBracket, Token::CloseBracket)
                    } else {
                        (Token::OpenParen, Token::CloseParen)
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
                    out.push((
                        Token::Other("a `{...}` block".into()),
                        Span::new(k, end + 1),
                    ));
                }
            },
        }
    }
}

/// Parse the attribute's tokens into a [`RawSpec`] and the span table its spans index.
///
/// # Errors
/// A [`attention_codegen::SpecErrorKind::Syntax`] error from
/// [`grammar::parse_tokens`] at the offending token when the tokens do not follow the
/// grammar; its span indexes the returned table.
pub fn parse_tokens(stream: TokenStream) -> (SpanTable, Result<RawSpec, SpecError>) {
    let mut table = SpanTable::default();
    let mut toks = Vec::new();
    flatten(stream, &mut table, &mut toks);
    let n = table.spans.len();
    toks.push((Token::Eof, Span::new(n, n)));
    let result = grammar::parse_tokens(toks, Source::Attribute);
    (table, result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use attention_codegen::grammar::{RawValue, Spanned};
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
        // `self , rope`: three tokens.
        assert_eq!(table.spans.len(), 3);
        assert_eq!(table.token_range(Span::new(0, 1)), Some((0, 0)));
        assert_eq!(table.token_range(Span::new(0, 3)), Some((0, 2)));
        // End of input maps onto the last token.
        assert_eq!(table.token_range(Span::new(3, 3)), Some((2, 2)));
        // Out of range clamps to the last token.
        assert_eq!(table.token_range(Span::new(100, 200)), Some((2, 2)));
        // An empty table falls back to the call site (and does not panic).
        let empty = SpanTable::default();
        assert_eq!(empty.token_range(Span::new(0, 1)), None);
        let _ = empty.resolve(Span::new(0, 1));
        let _ = table.resolve(Span::new(100, 200));
    }
}
