//! The string parser: tokens, literals, spans and syntax errors.

use attention_codegen::grammar::parse_str;
use attention_codegen::{RawSpec, RawValue, SpecError, SpecErrorKind};

fn parse(src: &str) -> RawSpec {
    parse_str(src).unwrap_or_else(|e| panic!("{src:?} should parse: {}", e.with_source(src)))
}

fn syntax_err(src: &str) -> (SpecError, String, String) {
    let e = parse_str(src).expect_err(src);
    match &e.kind {
        SpecErrorKind::Syntax { expected, found } => {
            let (x, f) = (expected.clone(), found.clone());
            (e, x, f)
        }
        other => panic!("{src:?}: expected a syntax error, got {other:?}"),
    }
}

fn slice(src: &str, e: &SpecError) -> String {
    src[e.span.start..e.span.end].to_string()
}

fn value_of(spec: &RawSpec, key: &str) -> RawValue {
    spec.items
        .iter()
        .find(|i| i.key.value == key)
        .and_then(|i| i.value.clone())
        .unwrap_or_else(|| panic!("no value for {key}"))
        .value
}

#[test]
fn kind_and_items_with_spans() {
    let src = "self, heads = 32, rope";
    let spec = parse(src);
    assert_eq!(spec.kind.value, "self");
    assert_eq!(&src[spec.kind.span.start..spec.kind.span.end], "self");
    assert_eq!(spec.items.len(), 2);
    let heads = &spec.items[0];
    assert_eq!(&src[heads.key.span.start..heads.key.span.end], "heads");
    let v = heads.value.as_ref().unwrap();
    assert_eq!(v.value, RawValue::Int(32));
    assert_eq!(&src[v.span.start..v.span.end], "32");
    assert_eq!(spec.items[1].key.value, "rope");
    assert!(spec.items[1].value.is_none());
}

#[test]
fn whitespace_insensitive() {
    let a = parse("self,heads=32,gqa=8,window=(-1,0),head_dim=[64,128],linear_qkv=a::B");
    let b = parse(" self ,\n\theads =  32 , gqa= 8, window = ( - 1 , 0 ) , head_dim = [ 64 , 128 ] , linear_qkv = a :: B ");
    let strip = |s: &RawSpec| {
        (
            s.kind.value.clone(),
            s.items
                .iter()
                .map(|i| {
                    (
                        i.key.value.clone(),
                        i.value.as_ref().map(|v| strip_spans(&v.value)),
                    )
                })
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(strip(&a), strip(&b));
}

fn strip_spans(v: &RawValue) -> String {
    format!(
        "{:?}",
        match v {
            RawValue::List(xs) | RawValue::Tuple(xs) => {
                return xs
                    .iter()
                    .map(|x| strip_spans(&x.value))
                    .collect::<Vec<_>>()
                    .join("|");
            }
            other => other.clone(),
        }
    )
}

#[test]
fn literals() {
    let src = "self, a = -1, b = 1e-6, c = 0.5, d = 500000.0, e = true, f = false, g = rms, \
               h = my_crate::MyLinear, i = ::x::Y, j = 2.5E+3, k = -0.25";
    let spec = parse(src);
    assert_eq!(value_of(&spec, "a"), RawValue::Int(-1));
    assert_eq!(value_of(&spec, "b"), RawValue::Float(1e-6));
    assert_eq!(value_of(&spec, "c"), RawValue::Float(0.5));
    assert_eq!(value_of(&spec, "d"), RawValue::Float(500000.0));
    assert_eq!(value_of(&spec, "e"), RawValue::Bool(true));
    assert_eq!(value_of(&spec, "f"), RawValue::Bool(false));
    assert_eq!(value_of(&spec, "g"), RawValue::Ident("rms".into()));
    assert_eq!(
        value_of(&spec, "h"),
        RawValue::Path("my_crate::MyLinear".into())
    );
    assert_eq!(value_of(&spec, "i"), RawValue::Path("::x::Y".into()));
    assert_eq!(value_of(&spec, "j"), RawValue::Float(2500.0));
    assert_eq!(value_of(&spec, "k"), RawValue::Float(-0.25));
}

#[test]
fn negative_int_span_covers_sign() {
    let src = "self, window = (-1, 0)";
    let spec = parse(src);
    let RawValue::Tuple(xs) = value_of(&spec, "window") else {
        panic!("tuple expected")
    };
    assert_eq!(xs.len(), 2);
    assert_eq!(xs[0].value, RawValue::Int(-1));
    assert_eq!(&src[xs[0].span.start..xs[0].span.end], "-1");
    assert_eq!(&src[xs[1].span.start..xs[1].span.end], "0");
    let w = spec.items[0].value.as_ref().unwrap();
    assert_eq!(&src[w.span.start..w.span.end], "(-1, 0)");
}

#[test]
fn lists_and_trailing_commas() {
    let src = "cross, head_dim = [64, 128,], mask = [padding, causal],";
    let spec = parse(src);
    let RawValue::List(xs) = value_of(&spec, "head_dim") else {
        panic!("list expected")
    };
    assert_eq!(
        xs.iter().map(|x| x.value.clone()).collect::<Vec<_>>(),
        vec![RawValue::Int(64), RawValue::Int(128)]
    );
    let v = spec.items[0].value.as_ref().unwrap();
    assert_eq!(&src[v.span.start..v.span.end], "[64, 128,]");
    assert_eq!(spec.items.len(), 2);
}

#[test]
fn path_span() {
    let src = "self, linear_proj = my_crate :: layers::Proj";
    let spec = parse(src);
    let v = spec.items[0].value.as_ref().unwrap();
    assert_eq!(v.value, RawValue::Path("my_crate::layers::Proj".into()));
    assert_eq!(&src[v.span.start..v.span.end], "my_crate :: layers::Proj");
}

#[test]
fn empty_input() {
    let (e, expected, found) = syntax_err("   ");
    assert!(
        expected.contains("self") && expected.contains("cross"),
        "{expected}"
    );
    assert_eq!(found, "end of input");
    assert_eq!(e.span.start, 3);
}

#[test]
fn missing_kind() {
    let src = "heads = 32, gqa = 8";
    let (e, expected, found) = syntax_err(src);
    assert_eq!(slice(src, &e), "heads =");
    assert!(expected.contains("attention kind"), "{expected}");
    assert!(found.contains("heads"), "{found}");
}

#[test]
fn missing_comma() {
    let src = "self, heads = 32 gqa = 8";
    let (e, expected, found) = syntax_err(src);
    assert_eq!(slice(src, &e), "gqa");
    assert!(expected.contains("`,`"), "{expected}");
    assert_eq!(found, "`gqa`");
}

#[test]
fn missing_value_after_eq() {
    let src = "self, heads = , gqa = 8";
    let (e, expected, found) = syntax_err(src);
    assert_eq!(slice(src, &e), ",");
    assert!(expected.starts_with("a value"), "{expected}");
    assert_eq!(found, "`,`");
}

#[test]
fn key_expected() {
    let src = "self, = 3";
    let (e, expected, _) = syntax_err(src);
    assert_eq!(slice(src, &e), "=");
    assert!(expected.contains("key"), "{expected}");
}

#[test]
fn empty_list() {
    let src = "self, head_dim = []";
    let (e, expected, found) = syntax_err(src);
    assert_eq!(slice(src, &e), "]");
    assert_eq!(expected, "a value");
    assert_eq!(found, "`]`");
}

#[test]
fn unclosed_list_and_tuple() {
    let src = "self, head_dim = [64, 128";
    let (e, expected, found) = syntax_err(src);
    assert_eq!(e.span.start, src.len());
    assert!(expected.contains("`]`"), "{expected}");
    assert_eq!(found, "end of input");

    let src = "self, window = (4095 0)";
    let (e, expected, _) = syntax_err(src);
    assert_eq!(slice(src, &e), "0");
    assert!(expected.contains("`)`"), "{expected}");
}

#[test]
fn bad_number_literals() {
    for (src, bad) in [
        ("self, heads = 64k", "64k"),
        ("self, eps = 1e", "1e"),
        ("self, heads = 0x10", "0x10"),
        ("self, heads = 99999999999999999999", "99999999999999999999"),
        ("self, eps = 1e999", "1e999"),
    ] {
        let (e, _, found) = syntax_err(src);
        assert_eq!(slice(src, &e), bad, "{src}");
        assert!(found.contains(bad), "{found}");
    }
}

#[test]
fn minus_without_number() {
    let src = "self, window = (-x, 0)";
    let (e, expected, _) = syntax_err(src);
    assert_eq!(slice(src, &e), "x");
    assert!(expected.contains("number"), "{expected}");
}

#[test]
fn single_colon_and_bad_character() {
    let src = "self, linear_qkv = a:B";
    let (e, expected, _) = syntax_err(src);
    assert_eq!(slice(src, &e), ":");
    assert!(expected.contains("::"), "{expected}");

    let src = "self, heads = 32; gqa = 8";
    let (e, _, found) = syntax_err(src);
    assert_eq!(slice(src, &e), ";");
    assert!(found.contains(';'), "{found}");

    let src = "self, heads = «32»";
    let (e, _, _) = syntax_err(src);
    assert_eq!(slice(src, &e), "«");
}

#[test]
fn path_needs_name_after_separator() {
    let src = "self, linear_qkv = a::";
    let (e, expected, found) = syntax_err(src);
    assert_eq!(e.span.start, src.len());
    assert!(expected.contains("name"), "{expected}");
    assert_eq!(found, "end of input");
}

#[test]
fn syntax_message_is_readable() {
    let src = "self, heads = 32 gqa = 8";
    let e = parse_str(src).unwrap_err();
    assert_eq!(
        e.to_string(),
        "syntax error: expected `,` or end of spec, found `gqa`"
    );
    let shown = e.with_source(src);
    assert!(shown.ends_with("                   ^^^"), "{shown}");
}
