//! trybuild driver for the `#[attention(...)]` macro: every spec rule's compile error, with
//! its `.stderr` snapshot (regenerate with `TRYBUILD=overwrite`).

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/fail/*.rs");
    t.pass("tests/ui/pass/*.rs");
}
