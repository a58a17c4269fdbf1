//! The spec grammar, shared by the macro (from tokens) and by strings (CLI, config files).
//!
//! ```text
//! spec := kind ("," item)*          kind := self | cross
//! item := key | key "=" value
//! value := int | float | bool | ident | path | "[" value ("," value)* "]" | "(" value "," value ")"
//! ```
//!
//! The grammar is implemented once, over [`Token`]s: [`parse_tokens`]. Each front end only
//! turns its input into `(Token, Span)` pairs: [`parse_str`] tokenizes a string (spans are
//! byte ranges), the `#[attention(...)]` macro converts its `proc_macro2` tokens (spans are
//! indices into its table of token spans). So both share every rule and every message.
//!
//! Parsing produces a [`RawSpec`]: keys and values with their [`Span`]s, not yet checked.
//! [`crate::validate::validate`] turns it into an [`crate::AttentionSpec`].

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

/// An unsigned number literal token, as either front end reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumberToken {
    /// The literal exactly as written, used in error messages (`64`, `1e-6`, `32usize`).
    pub written: String,
    /// The value's digits in base 10, without sign, `_` separators or suffix, in a form
    /// `str::parse::<i64>` (integers) or `str::parse::<f64>` (floats) accepts (`64`, `1e-6`).
    pub digits: String,
    /// `true` for a float literal (it has a `.` or an exponent), `false` for an integer.
    pub is_float: bool,
    /// A Rust type suffix (`usize`, `f32`), empty when there is none. The grammar rejects
    /// suffixed numbers; only the macro front end can produce one.
    pub suffix: String,
}

impl NumberToken {
    /// A number written without suffix in base 10 (`64`, `0.5`, `1e-6`): `written` and
    /// `digits` are both `text`, and it is a float when it contains `.`, `e` or `E`.
    pub fn plain(text: &str) -> Self {
        NumberToken {
            written: text.to_string(),
            digits: text.to_string(),
            is_float: text.contains(['.', 'e', 'E']),
            suffix: String::new(),
        }
    }
}

/// One token of the spec grammar, the common input of both front ends: the string
/// tokenizer behind [`parse_str`] and the macro's conversion of its `proc_macro2` tokens.
/// Each front end pairs a token with the [`Span`] it came from (byte range for strings,
/// token-table indices for the macro) and hands the list to [`parse_tokens`].
#[derive(Debug, Clone, PartialEq)]
pub enum Token {
    /// An identifier or keyword (`heads`, `self`, `true`, `bf16`).
    Ident(String),
    /// A number literal without its sign (a leading `-` is a separate [`Token::Minus`]).
    Number(NumberToken),
    /// `=`.
    Eq,
    /// `,`.
    Comma,
    /// `[`.
    OpenBracket,
    /// `]`.
    CloseBracket,
    /// `(`.
    OpenParen,
    /// `)`.
    CloseParen,
    /// `::` (one token, whose span covers both colons).
    PathSep,
    /// `-`.
    Minus,
    /// A literal that is not a number (string, character, byte string), given as the
    /// description used in errors (``string literal `"x"` ``). No value accepts one.
    Literal(String),
    /// Anything else the grammar has no place for, given as its description in errors
    /// (`` `;` ``, ``a `{...}` block``).
    Other(String),
    /// The end of the input. [`parse_tokens`] appends one when the list lacks it.
    Eof,
}

/// Which front end a token list came from. It changes only how syntax errors name the end
/// of the input, never what parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A spec string ([`parse_str`]): "end of input" / "end of spec".
    Str,
    /// The tokens of an `#[attention(...)]` attribute: "end of the attribute".
    Attribute,
}

impl Source {
    /// How a [`Token::Eof`] is described when it is found where something else was expected.
    fn end_found(self) -> &'static str {
        match self {
            Source::Str => "end of input",
            Source::Attribute => "end of the attribute",
        }
    }

    /// What may follow an item.
    fn after_item(self) -> &'static str {
        match self {
            Source::Str => "`,` or end of spec",
            Source::Attribute => "`,` or the end of the attribute",
        }
    }
}

impl Token {
    fn describe(&self, source: Source) -> String {
        match self {
            Token::Ident(s) => format!("`{s}`"),
            Token::Number(n) => format!("`{}`", n.written),
            Token::Eq => "`=`".into(),
            Token::Comma => "`,`".into(),
            Token::OpenBracket => "`[`".into(),
            Token::CloseBracket => "`]`".into(),
            Token::OpenParen => "`(`".into(),
            Token::CloseParen => "`)`".into(),
            Token::PathSep => "`::`".into(),
            Token::Minus => "`-`".into(),
            Token::Literal(s) | Token::Other(s) => s.clone(),
            Token::Eof => source.end_found().into(),
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
fn tokenize(src: &str) -> Result<Vec<(Token, Span)>, SpecError> {
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
            '=' => Some(Token::Eq),
            ',' => Some(Token::Comma),
            '[' => Some(Token::OpenBracket),
            ']' => Some(Token::CloseBracket),
            '(' => Some(Token::OpenParen),
            ')' => Some(Token::CloseParen),
            '-' => Some(Token::Minus),
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
                toks.push((Token::PathSep, Span::new(start, i)));
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
            toks.push((Token::Ident(src[start..i].to_string()), Span::new(start, i)));
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
            toks.push((
                Token::Number(NumberToken::plain(&src[start..i])),
                Span::new(start, i),
            ));
            continue;
        }
        let end = start + c.len_utf8();
        return Err(syntax(
            Span::new(start, end),
            "a key, a value, `=`, `,`, `[`, `]`, `(` or `)`",
            format!("character `{c}`"),
        ));
    }
    toks.push((Token::Eof, Span::new(src.len(), src.len())));
    Ok(toks)
}

struct Parser {
    toks: Vec<(Token, Span)>,
    pos: usize,
    source: Source,
}

impl Parser {
    fn peek(&self) -> &(Token, Span) {
        &self.toks[self.pos.min(self.toks.len() - 1)]
    }

    fn peek_at(&self, ahead: usize) -> &(Token, Span) {
        &self.toks[(self.pos + ahead).min(self.toks.len() - 1)]
    }

    fn bump(&mut self) -> (Token, Span) {
        let t = self.peek().clone();
        if self.pos < self.toks.len() - 1 {
            self.pos += 1;
        }
        t
    }

    fn err_here(&self, expected: &str) -> SpecError {
        let (t, s) = self.peek();
        syntax(*s, expected, t.describe(self.source))
    }

    fn spec(&mut self) -> Result<RawSpec, SpecError> {
        let kind = match self.peek().clone() {
            (Token::Ident(name), span) => {
                if self.peek_at(1).0 == Token::Eq {
                    let eq = self.peek_at(1).1;
                    return Err(syntax(
                        span.join(eq),
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
                Token::Eof => break,
                Token::Comma => {
                    self.bump();
                }
                _ => return Err(self.err_here(self.source.after_item())),
            }
            // A trailing comma is allowed.
            if self.peek().0 == Token::Eof {
                break;
            }
            items.push(self.item()?);
        }
        Ok(RawSpec { kind, items })
    }

    fn item(&mut self) -> Result<RawItem, SpecError> {
        let key = match self.peek().clone() {
            (Token::Ident(name), span) => {
                self.bump();
                Spanned::new(name, span)
            }
            _ => return Err(self.err_here("a key (like `heads` or `rope`)")),
        };
        let value = if self.peek().0 == Token::Eq {
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
            Token::OpenBracket => {
                self.bump();
                let (elems, end) = self.seq(Token::CloseBracket, "`]`")?;
                Ok(Spanned::new(RawValue::List(elems), span.join(end)))
            }
            Token::OpenParen => {
                self.bump();
                let (elems, end) = self.seq(Token::CloseParen, "`)`")?;
                Ok(Spanned::new(RawValue::Tuple(elems), span.join(end)))
            }
            Token::Minus => {
                self.bump();
                match self.peek().clone() {
                    (Token::Number(n), nspan) => {
                        self.bump();
                        number(&n, true, span.join(nspan))
                    }
                    (Token::Literal(desc), lspan) => Err(syntax(
                        span.join(lspan),
                        "a number (an integer like `64` or a float like `0.5`, `1e-6`)",
                        desc,
                    )),
                    _ => Err(self.err_here("a number after `-`")),
                }
            }
            Token::Number(n) => {
                self.bump();
                number(&n, false, span)
            }
            Token::Ident(_) | Token::PathSep => self.path_or_ident(),
            _ => Err(self.err_here(
                "a value (a number, `true`/`false`, a name, a path, `[...]` or `(...)`)",
            )),
        }
    }

    /// Comma-separated values up to `close`; a trailing comma is allowed, an empty sequence
    /// is not.
    fn seq(
        &mut self,
        close: Token,
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
                Token::Comma => {
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
        if self.peek().0 == Token::PathSep {
            self.bump();
            text.push_str("::");
        }
        loop {
            match self.peek().clone() {
                (Token::Ident(name), s) => {
                    self.bump();
                    text.push_str(&name);
                    end = s;
                    segments += 1;
                }
                _ => return Err(self.err_here("a name after `::`")),
            }
            if self.peek().0 == Token::PathSep {
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

/// A number token (with a leading `-` when `negative`) as an int or a float. Errors quote
/// the literal as written, sign included.
fn number(n: &NumberToken, negative: bool, span: Span) -> Result<Spanned<RawValue>, SpecError> {
    let sign = if negative { "-" } else { "" };
    let written = format!("`{sign}{}`", n.written);
    if !n.suffix.is_empty() {
        return Err(syntax(span, "a number without a type suffix", written));
    }
    let text = format!("{sign}{}", n.digits);
    if n.is_float {
        match text.parse::<f64>() {
            Ok(x) if x.is_finite() => Ok(Spanned::new(RawValue::Float(x), span)),
            _ => Err(syntax(span, "a finite float literal", written)),
        }
    } else {
        match text.parse::<i64>() {
            Ok(v) => Ok(Spanned::new(RawValue::Int(v), span)),
            Err(_) => Err(syntax(span, "an integer within the 64-bit range", written)),
        }
    }
}

/// Parse a token list, from either front end, into a [`RawSpec`] without checking keys or
/// values. This is the one implementation of the grammar in the module docs.
///
/// `tokens` are in source order, each with its [`Span`]; the spans reach the [`RawSpec`]
/// and errors unchanged (a list or tuple value spans its brackets, a negative number its
/// `-` and digits, a path all its segments). The list should end with a [`Token::Eof`]
/// whose span marks the end of the input; when it does not, one is appended with an empty
/// span at the end of the last token (`0..0` for an empty list). `source` only picks how
/// errors word the end of the input.
///
/// # Errors
/// [`SpecErrorKind::Syntax`] with the span of the offending token, saying what was expected
/// and what was found.
pub fn parse_tokens(mut tokens: Vec<(Token, Span)>, source: Source) -> Result<RawSpec, SpecError> {
    if tokens.last().map(|(t, _)| t) != Some(&Token::Eof) {
        let end = tokens.last().map_or(0, |(_, s)| s.end);
        tokens.push((Token::Eof, Span::new(end, end)));
    }
    let mut p = Parser {
        toks: tokens,
        pos: 0,
        source,
    };
    p.spec()
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
    parse_tokens(tokenize(src)?, Source::Str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(list: Vec<Token>) -> Vec<(Token, Span)> {
        list.into_iter()
            .enumerate()
            .map(|(i, t)| (t, Span::new(i, i + 1)))
            .collect()
    }

    fn syntax_of(e: &SpecError) -> (String, String) {
        match &e.kind {
            SpecErrorKind::Syntax { expected, found } => (expected.clone(), found.clone()),
            other => panic!("expected a syntax error, got {other:?}"),
        }
    }

    #[test]
    fn parse_str_is_tokenize_then_parse_tokens() {
        let src = "self, window = (-1, 0)";
        let tokens = tokenize(src).expect("tokenizes");
        let kinds: Vec<Token> = tokens.iter().map(|(t, _)| t.clone()).collect();
        assert_eq!(
            kinds,
            vec![
                Token::Ident("self".into()),
                Token::Comma,
                Token::Ident("window".into()),
                Token::Eq,
                Token::OpenParen,
                Token::Minus,
                Token::Number(NumberToken::plain("1")),
                Token::Comma,
                Token::Number(NumberToken::plain("0")),
                Token::CloseParen,
                Token::Eof,
            ]
        );
        let from_tokens = parse_tokens(tokens, Source::Attribute).expect("parses");
        assert_eq!(from_tokens, parse_str(src).expect("parses"));
        let window = from_tokens.items[0].value.as_ref().expect("value");
        assert_eq!(window.span, Span::new(15, 22));
    }

    #[test]
    fn a_missing_eof_is_appended_after_the_last_token() {
        let e = parse_tokens(
            toks(vec![
                Token::Ident("self".into()),
                Token::Comma,
                Token::Ident("k".into()),
                Token::Eq,
            ]),
            Source::Attribute,
        )
        .expect_err("no value");
        assert_eq!(e.span, Span::new(4, 4));
        assert_eq!(syntax_of(&e).1, "end of the attribute");
        let e = parse_tokens(Vec::new(), Source::Str).expect_err("empty");
        assert_eq!(e.span, Span::new(0, 0));
        assert_eq!(syntax_of(&e).1, "end of input");
    }

    #[test]
    fn the_source_only_changes_how_the_end_is_named() {
        let list = vec![Token::Ident("self".into()), Token::Ident("rope".into())];
        let (str_expected, _) =
            syntax_of(&parse_tokens(toks(list.clone()), Source::Str).expect_err("no comma"));
        let (attr_expected, _) =
            syntax_of(&parse_tokens(toks(list), Source::Attribute).expect_err("no comma"));
        assert_eq!(str_expected, "`,` or end of spec");
        assert_eq!(attr_expected, "`,` or the end of the attribute");
    }

    #[test]
    fn suffixed_numbers_and_non_number_literals_are_rejected() {
        let head = || {
            vec![
                Token::Ident("self".into()),
                Token::Comma,
                Token::Ident("k".into()),
                Token::Eq,
            ]
        };
        let suffixed = NumberToken {
            written: "32usize".into(),
            digits: "32".into(),
            is_float: false,
            suffix: "usize".into(),
        };
        let mut list = head();
        list.extend([Token::Minus, Token::Number(suffixed)]);
        let e = parse_tokens(toks(list), Source::Attribute).expect_err("suffix");
        assert_eq!(
            syntax_of(&e),
            ("a number without a type suffix".into(), "`-32usize`".into())
        );
        assert_eq!(e.span, Span::new(4, 6));

        let mut list = head();
        list.extend([
            Token::Minus,
            Token::Literal("string literal `\"x\"`".into()),
        ]);
        let e = parse_tokens(toks(list), Source::Attribute).expect_err("string after -");
        assert!(syntax_of(&e).0.starts_with("a number (an integer"), "{e}");
        assert_eq!(e.span, Span::new(4, 6));

        let mut list = head();
        list.push(Token::Literal("string literal `\"x\"`".into()));
        let e = parse_tokens(toks(list), Source::Attribute).expect_err("string");
        assert!(syntax_of(&e).0.starts_with("a value ("), "{e}");
        assert_eq!(e.span, Span::new(4, 5));
    }
}
