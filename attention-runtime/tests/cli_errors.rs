//! The `attn` CLI's errors name the flags the user typed (`--input`, `--grad-output`,
//! `--positions`, ...) and the tensor in the file, never the library's argument names
//! (`hidden`, `key_value_states`); a data tensor missing from its file is a missing tensor,
//! not a missing weight; data tensors take floating dtypes only, positions integers only; a
//! flag that only means something with another is refused without it. Every failing call
//! writes nothing.

use std::path::{Path, PathBuf};

use safetensors::Dtype;

mod common;
use common::{bwd_fixture_dir, repo_root, run_attn, save_raw, scratch};

const SPEC: &str = "self, heads=8, gqa=2, head_dim=64, qk_layernorm=rms, rope, mask=causal";
const PREFIX: &str = "decoder.layers.0.self_attention.";

fn path_str(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// `args` with the `--flag value` pairs of `extra` set: a flag `args` has gets the new value,
/// another one is appended.
fn with_flags(mut args: Vec<String>, extra: &[String]) -> Vec<String> {
    for pair in extra.chunks(2) {
        match args.iter().position(|a| *a == pair[0]) {
            Some(i) => args[i + 1] = pair[1].clone(),
            None => args.extend_from_slice(pair),
        }
    }
    args
}

/// Run `attn args`, expected to fail without writing `out`; stderr.
fn fails(args: &[String], out: &Path) -> String {
    let o = run_attn(args);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success(),
        "expected failure for {args:?}: {stderr}"
    );
    assert!(!out.exists(), "nothing is written on an error: {args:?}");
    stderr
}

/// `attn layer` on the Megatron fixture (`[16, 2, 512]`) with the `--flag value` pairs of
/// `extra` set, expected to fail without writing its output; stderr.
fn layer_fails(spec: &str, extra: &[String]) -> String {
    let out = scratch("layer-err-out.safetensors");
    let _ = std::fs::remove_file(&out);
    fails(&with_flags(layer_args(spec, &out), extra), &out)
}

/// `attn layer` of `spec` on the Megatron fixture's weights and input, writing `out`.
fn layer_args(spec: &str, out: &Path) -> Vec<String> {
    let d = repo_root().join("tests/fixtures/megatron");
    vec![
        "layer".into(),
        "--spec".into(),
        spec.into(),
        "--weights".into(),
        path_str(&d.join("weights.safetensors")),
        "--prefix".into(),
        PREFIX.into(),
        "--input".into(),
        path_str(&d.join("input.safetensors")),
        "--output".into(),
        path_str(out),
    ]
}

/// `attn backward` on the Megatron autograd fixture `case` (its input file holds `input` and
/// `grad_output`) with the `--flag value` pairs of `extra` set, expected to fail without
/// writing its output; stderr.
fn backward_fails(case: &str, spec: &str, prefix: &str, extra: &[String]) -> String {
    let d = bwd_fixture_dir(case);
    let out = scratch("bwd-err-out.safetensors");
    let _ = std::fs::remove_file(&out);
    let input = path_str(&d.join("input.safetensors"));
    let args = vec![
        "backward".into(),
        "--spec".into(),
        spec.into(),
        "--weights".into(),
        path_str(&d.join("weights.safetensors")),
        "--prefix".into(),
        prefix.into(),
        "--input".into(),
        input.clone(),
        "--grad-output".into(),
        input,
        "--output".into(),
        path_str(&out),
    ];
    fails(&with_flags(args, extra), &out)
}

fn bwd_fails(extra: &[String]) -> String {
    backward_fails("megatron", SPEC, PREFIX, extra)
}

/// `e` is the typed dtype error of `flag`'s tensor `name`, naming the dtype `got`.
fn assert_dtype_refused(e: &str, flag: &str, name: &str, got: &str) {
    let head = format!("attn: error: `{flag} tensor \"{name}\"` has the wrong dtype");
    assert!(e.contains(&head) && e.contains(got), "{e}");
}

fn flags(f: &[&str]) -> Vec<String> {
    f.iter().map(|s| s.to_string()).collect()
}

/// `[name]` of `dtype` and `shape`, all zeros, in a scratch file `file`.
fn zeros_file(file: &str, name: &str, dtype: Dtype, shape: &[usize]) -> PathBuf {
    let p = scratch(file);
    let n: usize = shape.iter().product();
    save_raw(&p, name, dtype, shape, &vec![0u8; n * dtype.size()]);
    p
}

fn i64_file(file: &str, name: &str, shape: &[usize], v: &[i64]) -> PathBuf {
    let p = scratch(file);
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    save_raw(&p, name, Dtype::I64, shape, &bytes);
    p
}

#[test]
fn input_errors_name_the_flag_not_the_library_argument() {
    // Case 2's input is [13, 3, 256]; the layer wants h = 512.
    let other = path_str(&repo_root().join("tests/fixtures/megatron_case2/input.safetensors"));
    let e = layer_fails(SPEC, &flags(&["--input", &other]));
    assert!(
        e.contains(r#"`--input tensor "input"` has the wrong shape"#) && e.contains("[13, 3, 256]"),
        "{e}"
    );
    assert!(!e.contains("`hidden`"), "the library's name leaks: {e}");
    let e = bwd_fails(&flags(&["--input", &other]));
    assert!(e.contains(r#"`--input tensor "input"`"#), "{e}");
    assert!(!e.contains("`hidden`"), "{e}");
    // grad_output of another shape names --grad-output.
    let other = path_str(&bwd_fixture_dir("megatron_case2").join("input.safetensors"));
    let e = bwd_fails(&flags(&["--grad-output", &other]));
    assert!(
        e.contains(r#"`--grad-output tensor "grad_output"` has the wrong shape"#),
        "{e}"
    );
}

#[test]
fn a_missing_data_tensor_is_not_a_missing_weight() {
    let weights = path_str(&bwd_fixture_dir("megatron").join("weights.safetensors"));
    let e = bwd_fails(&flags(&["--grad-output", &weights]));
    assert!(
        e.contains("missing tensor `grad_output`")
            && e.contains("(given by `--grad-output`)")
            && e.contains("linear_qkv.weight"),
        "names the tensor, the flag and what the file holds: {e}"
    );
    assert!(!e.contains("missing weight"), "{e}");
    let e = layer_fails(SPEC, &flags(&["--input-name", "hidden"]));
    assert!(
        e.contains("missing tensor `hidden`") && e.contains("(given by `--input`)"),
        "{e}"
    );
    let e = layer_fails(SPEC, &flags(&["--mask-file", &weights]));
    assert!(
        e.contains("missing tensor `attention_mask`") && e.contains("`--mask-file`"),
        "{e}"
    );
    assert!(!e.contains("missing weight"), "{e}");
}

#[test]
fn positions_must_be_integers_in_range() {
    let e = layer_fails(
        SPEC,
        &flags(&[
            "--positions",
            &path_str(&zeros_file(
                "pos-f32.safetensors",
                "positions",
                Dtype::F32,
                &[16],
            )),
        ]),
    );
    assert_dtype_refused(&e, "--positions", "positions", "F32");
    let mut p: Vec<i64> = (0..16).collect();
    p[3] = -1;
    let f = i64_file("pos-neg.safetensors", "positions", &[16], &p);
    let e = layer_fails(SPEC, &flags(&["--positions", &path_str(&f)]));
    assert!(
        e.contains(r#"invalid `--positions tensor "positions"[3]`"#) && e.contains("got -1"),
        "{e}"
    );
    p[3] = 1 << 31;
    let f = i64_file("pos-big.safetensors", "positions", &[16], &p);
    let e = layer_fails(SPEC, &flags(&["--positions", &path_str(&f)]));
    assert!(
        e.contains(r#"`--positions tensor "positions"[3]`"#) && e.contains("got 2147483648"),
        "{e}"
    );
    let f = i64_file(
        "pos-2d.safetensors",
        "positions",
        &[1, 16],
        &(0..16).collect::<Vec<_>>(),
    );
    let e = layer_fails(SPEC, &flags(&["--positions", &path_str(&f)]));
    assert!(
        e.contains(r#"`--positions tensor "positions"` has the wrong shape"#)
            && e.contains("[1, 16]"),
        "{e}"
    );
    // One position too few: the layer's own check, named by the flag.
    let f = i64_file(
        "pos-15.safetensors",
        "positions",
        &[15],
        &(0..15).collect::<Vec<_>>(),
    );
    let e = layer_fails(SPEC, &flags(&["--positions", &path_str(&f)]));
    assert!(
        e.contains(r#"`--positions tensor "positions"` has the wrong shape"#) && e.contains("[15]"),
        "{e}"
    );
    let e = bwd_fails(&flags(&["--positions", &path_str(&f)]));
    assert!(e.contains(r#"`--positions tensor "positions"`"#), "{e}");
}

#[test]
fn data_tensors_take_floating_dtypes_only() {
    let x = zeros_file("input-i32.safetensors", "input", Dtype::I32, &[16, 2, 512]);
    let e = layer_fails(SPEC, &flags(&["--input", &path_str(&x)]));
    assert_dtype_refused(&e, "--input", "input", "I32");
    let e = bwd_fails(&flags(&["--input", &path_str(&x)]));
    assert!(
        e.contains(r#"`--input tensor "input"`"#) && e.contains("I32"),
        "{e}"
    );
    let b = zeros_file(
        "bias-u8.safetensors",
        "attention_bias",
        Dtype::U8,
        &[1, 1, 16, 16],
    );
    let e = layer_fails(SPEC, &flags(&["--bias-file", &path_str(&b)]));
    assert_dtype_refused(&e, "--bias-file", "attention_bias", "U8");
    let c = zeros_file(
        "ctx-i64.safetensors",
        "key_value_states",
        Dtype::I64,
        &[10, 2, 128],
    );
    let e = backward_fails(
        "megatron_cross",
        "cross, heads=4, head_dim=32, hidden=128, mask=no_mask",
        "decoder.layers.0.cross_attention.",
        &flags(&[
            "--context",
            &path_str(&c),
            "--context-name",
            "key_value_states",
        ]),
    );
    assert_dtype_refused(&e, "--context", "key_value_states", "I64");
}

#[test]
fn masks_take_bool_integer_and_float_dtypes() {
    // An all-zero mask of each accepted dtype on a padding layer gives the output without a
    // mask.
    let spec = "self, heads=8, gqa=2, head_dim=64, qk_layernorm=rms, rope, mask=padding";
    let run = |mask: Option<Dtype>| {
        let tag = mask.map_or("none".into(), |m| format!("{m:?}"));
        let out = scratch(&format!("mask-{tag}.safetensors"));
        let mut args = layer_args(spec, &out);
        if let Some(dt) = mask {
            let m = zeros_file(
                &format!("mask-in-{tag}.safetensors"),
                "attention_mask",
                dt,
                &[2, 1, 1, 16],
            );
            args.extend(["--mask-file".into(), path_str(&m)]);
        }
        let o = run_attn(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(out).unwrap()
    };
    let base = run(None);
    assert_eq!(run(Some(Dtype::U8)), base);
    for dt in [Dtype::BOOL, Dtype::I32, Dtype::I64, Dtype::F32, Dtype::BF16] {
        assert_eq!(run(Some(dt)), base, "{dt:?}");
    }
    let m = zeros_file(
        "mask-u16.safetensors",
        "attention_mask",
        Dtype::U16,
        &[2, 1, 1, 16],
    );
    let e = layer_fails(spec, &flags(&["--mask-file", &path_str(&m)]));
    assert_dtype_refused(&e, "--mask-file", "attention_mask", "U16");
}

#[test]
fn context_name_needs_context() {
    let e = bwd_fails(&flags(&["--context-name", "key_value_states"]));
    assert!(
        e.contains("attn: error: invalid `--context-name`") && e.contains("without --context"),
        "{e}"
    );
    let e = layer_fails(SPEC, &flags(&["--context-name", "key_value_states"]));
    assert!(e.contains("attn: error: invalid `--context-name`"), "{e}");
}

#[test]
fn the_layers_own_checks_name_the_flags() {
    let input = path_str(&repo_root().join("tests/fixtures/megatron/input.safetensors"));
    // A context given to a self-attention layer.
    let e = layer_fails(
        SPEC,
        &flags(&["--context", &input, "--context-name", "input"]),
    );
    assert!(e.contains(r#"invalid `--context tensor "input"`"#), "{e}");
    assert!(!e.contains("key_value_states"), "{e}");
    // A cross-attention layer without --context.
    let e = backward_fails(
        "megatron_cross",
        "cross, heads=4, head_dim=32, hidden=128, mask=no_mask",
        "decoder.layers.0.cross_attention.",
        &[],
    );
    assert!(e.contains("`--context`"), "{e}");
    assert!(!e.contains("key_value_states"), "{e}");
    // A mask on a causal layer.
    let m = zeros_file(
        "mask-causal.safetensors",
        "attention_mask",
        Dtype::U8,
        &[2, 1, 1, 16],
    );
    let e = layer_fails(SPEC, &flags(&["--mask-file", &path_str(&m)]));
    assert!(
        e.contains(r#"`--mask-file tensor "attention_mask"`"#),
        "{e}"
    );
    // A dimension flag that disagrees with the spec.
    let e = layer_fails(SPEC, &flags(&["--heads", "4"]));
    assert!(
        e.contains("heads (--spec or --heads)") && e.contains("4"),
        "{e}"
    );
}

#[test]
fn file_errors_name_the_flag() {
    let e = layer_fails(SPEC, &flags(&["--weights", "/nonexistent/w.safetensors"]));
    assert!(
        e.contains("/nonexistent/w.safetensors (given by --weights)"),
        "{e}"
    );
    let e = layer_fails(SPEC, &flags(&["--prefix", "nope."]));
    assert!(
        e.contains("missing weight `nope.linear_qkv.weight`") && e.contains("(given by --weights)"),
        "{e}"
    );
    let e = layer_fails(SPEC, &flags(&["--input", "/nonexistent/x.safetensors"]));
    assert!(
        e.contains("/nonexistent/x.safetensors (given by --input)"),
        "{e}"
    );
    let garbage = scratch("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file").unwrap();
    let e = bwd_fails(&flags(&["--grad-output", &path_str(&garbage)]));
    assert!(
        e.contains("safetensors error") && e.contains("(given by --grad-output)"),
        "{e}"
    );
    let e = layer_fails(SPEC, &flags(&["--output", "/nonexistent/o.safetensors"]));
    assert!(
        e.contains("/nonexistent/o.safetensors (given by --output)"),
        "{e}"
    );
}

#[test]
fn head_dim_must_be_one_of_the_specs() {
    // render: a head dim the spec does not list is refused (it was ignored), one it lists is
    // picked.
    let o = run_attn(&[
        "render",
        "--spec",
        "self, heads=12, head_dim=64",
        "--head-dim",
        "128",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && o.stdout.is_empty(), "{e}");
    assert!(
        e.contains("invalid `--head-dim`") && e.contains("[64]") && e.contains("128"),
        "{e}"
    );
    let o = run_attn(&[
        "render",
        "--spec",
        "self, heads=12, head_dim=[64, 128], mask=causal",
        "--head-dim",
        "128",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        s.contains("_hd128_") && !s.contains("_hd64_"),
        "only head dim 128"
    );
    // aot names the flag too.
    let o = run_attn(&[
        "aot",
        "--arch",
        "sm_80",
        "--spec",
        "self, heads=12, head_dim=[64, 128]",
        "--head-dim",
        "96",
        "--list",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("invalid `--head-dim`"),
        "{e}"
    );
}

#[test]
fn bench_flags_that_need_another_are_refused() {
    // The custom preset's dims without `custom` in --presets (they were ignored).
    let o = run_attn(&["bench", "layer", "--hidden", "1024"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && e.contains("invalid `--hidden`")
            && e.contains("custom")
            && e.contains("llama3-8b"),
        "{e}"
    );
    // The layer-step flags without --layer, the kernel flags with it (clap usage errors).
    let o = run_attn(&["bench", "backward", "--presets", "hd64"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("--layer"), "{e}");
    let o = run_attn(&["bench", "backward", "--layer", "--seqlens", "1024"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("--seqlens") && e.contains("--layer"), "{e}");
    // Bench option errors name the flags.
    let o = run_attn(&["bench", "layer", "--reps", "0"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("invalid `--reps`"), "{e}");
    let o = run_attn(&["bench", "parallel", "--tp", "3"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("invalid `--tp`"), "{e}");
    let o = run_attn(&["bench", "decode", "--split-sweep", "4,0"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("invalid `--split-sweep`") && e.contains('0'),
        "{e}"
    );
}
