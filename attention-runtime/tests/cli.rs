//! The `attn` CLI end to end, against golden outputs of the reference system (Megatron-Core
//! 0.16.1 `SelfAttention`, produced by `scripts/megatron_golden.py`; see
//! `tests/fixtures/*/README.txt`).

use std::path::{Path, PathBuf};

use attention_runtime::{Tensor, WeightStore};
use safetensors::Dtype;

mod common;
use common::{bwd_fixture_dir, rel_err, repo_root, run_attn, save_raw, scratch};

fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures")
}

fn load(path: &Path, key: &str, shape: &[usize]) -> Tensor {
    WeightStore::from_file(path)
        .unwrap()
        .get(key, shape)
        .unwrap()
}

fn golden_case(dir: &str, spec: &str, s: usize, b: usize, h: usize, has_bias: bool) {
    let d = fixtures().join(dir);
    let out = scratch(&format!("{dir}.safetensors"));
    let o = run_attn(&[
        "layer",
        "--spec",
        spec,
        "--weights",
        d.join("weights.safetensors").to_str().unwrap(),
        "--prefix",
        "decoder.layers.0.self_attention.",
        "--input",
        d.join("input.safetensors").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "attn failed: {stderr}");
    assert!(
        stderr.contains("CPU reference backend"),
        "must say where it ran: {stderr}"
    );
    let expected = d.join("expected.safetensors");
    let got = load(&out, "output", &[s, b, h]);
    let want = load(&expected, "output", &[s, b, h]);
    let e = rel_err(&got, &want);
    assert!(e < 1e-5, "{dir}: output rel. error {e} vs Megatron-Core");
    let got_store = WeightStore::from_file(&out).unwrap();
    if has_bias {
        let gb = got_store.get("output_bias", &[h]).unwrap();
        let wb = load(&expected, "output_bias", &[h]);
        assert_eq!(gb, wb, "output_bias is linear_proj.bias, returned unadded");
    } else {
        assert!(
            !got_store.contains("output_bias"),
            "bias = false returns no output_bias"
        );
    }
}

#[test]
fn layer_matches_megatron_gqa_rms_rope_causal() {
    golden_case(
        "megatron",
        "self, heads=8, gqa=2, head_dim=64, qk_layernorm=rms, rope, mask=causal",
        16,
        2,
        512,
        true,
    );
}

#[test]
fn layer_matches_megatron_mqa_layernorm_interleaved_partial_rope() {
    golden_case(
        "megatron_case2",
        "self, heads=8, gqa=1, head_dim=64, hidden=256, qk_layernorm=layer, bias=false, \
         rope=interleaved, rotary_percent=0.5, mask=causal",
        13,
        3,
        256,
        false,
    );
}

fn layer_err(extra: &[&str], spec: &str) -> String {
    let d = fixtures().join("megatron");
    let out = scratch("err.safetensors");
    let mut args = vec![
        "layer",
        "--spec",
        spec,
        "--weights",
        d.join("weights.safetensors")
            .to_str()
            .unwrap()
            .to_string()
            .leak(),
        "--input",
        d.join("input.safetensors")
            .to_str()
            .unwrap()
            .to_string()
            .leak(),
        "--output",
        out.to_str().unwrap().to_string().leak(),
    ];
    args.extend_from_slice(extra);
    let o = run_attn(&args);
    assert!(!o.status.success(), "expected failure for {args:?}");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const SPEC: &str = "self, heads=8, gqa=2, head_dim=64, qk_layernorm=rms, rope, mask=causal";

#[test]
fn missing_weight_names_the_key() {
    // Without the prefix no key matches: the error names the first one looked up.
    let e = layer_err(&[], SPEC);
    assert!(e.contains("missing weight `linear_qkv.weight`"), "{e}");
}

#[test]
fn misshaped_weight_names_the_key_and_shapes() {
    let spec = "self, heads=8, gqa=4, head_dim=64, qk_layernorm=rms, rope, mask=causal";
    let e = layer_err(&["--prefix", "decoder.layers.0.self_attention."], spec);
    assert!(
        e.contains("linear_qkv.weight") && e.contains("[1024, 512]") && e.contains("[768, 512]"),
        "{e}"
    );
}

#[test]
fn bad_spec_is_reported() {
    let e = layer_err(&[], "self, heads=8, gqa=2, head_dims=64");
    assert!(e.contains("head_dims") && e.contains("head_dim"), "{e}");
}

#[test]
fn bad_device_and_missing_input_tensor() {
    let e = layer_err(&["--device", "tpu"], SPEC);
    assert!(e.contains("--device") && e.contains("tpu"), "{e}");
    let e = layer_err(
        &[
            "--prefix",
            "decoder.layers.0.self_attention.",
            "--input-name",
            "hidden",
        ],
        SPEC,
    );
    assert!(e.contains("`hidden`") && e.contains("--input"), "{e}");
}

#[test]
fn wrong_input_shape_is_an_error() {
    // The input of case 2 has h = 256; the layer wants 512.
    let d = fixtures().join("megatron_case2");
    let out = scratch("shape.safetensors");
    let o = run_attn(&[
        "layer",
        "--spec",
        SPEC,
        "--weights",
        fixtures()
            .join("megatron/weights.safetensors")
            .to_str()
            .unwrap(),
        "--prefix",
        "decoder.layers.0.self_attention.",
        "--input",
        d.join("input.safetensors").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(e.contains("512") && e.contains("256"), "{e}");
}

#[test]
fn positions_file_changes_rope() {
    // Explicit positions 0..s reproduce the default; a constant shift changes nothing (rope
    // scores depend on i - j only); stretched positions change the output. Positions are
    // read as integers (i64 or i32): a shift past 2^24, where f32 no longer holds every
    // integer, changes nothing either.
    let d = fixtures().join("megatron");
    let run = |positions: Option<(Dtype, Vec<i64>)>| -> Tensor {
        let tag = positions
            .as_ref()
            .map_or("none".into(), |(dt, p)| format!("{dt:?}-{}", p[0]));
        let out = scratch(&format!("pos-{tag}.safetensors"));
        let mut args: Vec<String> = [
            "layer",
            "--spec",
            SPEC,
            "--weights",
            d.join("weights.safetensors").to_str().unwrap(),
            "--prefix",
            "decoder.layers.0.self_attention.",
            "--input",
            d.join("input.safetensors").to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        if let Some((dtype, p)) = positions {
            let pf = scratch(&format!("positions-{tag}.safetensors"));
            let bytes: Vec<u8> = match dtype {
                Dtype::I64 => p.iter().flat_map(|x| x.to_le_bytes()).collect(),
                Dtype::I32 => p.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect(),
                other => panic!("{other:?}"),
            };
            save_raw(&pf, "positions", dtype, &[p.len()], &bytes);
            args.push("--positions".into());
            args.push(pf.to_str().unwrap().into());
        }
        let o = run_attn(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        load(&out, "output", &[16, 2, 512])
    };
    let base = run(None);
    assert_eq!(run(Some((Dtype::I64, (0..16).collect()))), base);
    assert_eq!(run(Some((Dtype::I32, (0..16).collect()))), base);
    assert!(rel_err(&run(Some((Dtype::I64, (5..21).collect()))), &base) < 1e-5);
    let far = (1 << 24) + 1;
    let shifted = run(Some((Dtype::I64, (far..far + 16).collect())));
    assert!(rel_err(&shifted, &base) < 1e-5);
    assert_eq!(run(Some((Dtype::I32, (far..far + 16).collect()))), shifted);
    let stretched = run(Some((Dtype::I64, (0..16).map(|i| 2 * i + 100).collect())));
    assert!(rel_err(&stretched, &base) > 1e-3);
}

#[test]
fn catalog_lists_models_and_kernels() {
    let o = run_attn(&["catalog"]);
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    for model in [
        "llama-3-8b",
        "qwen3-8b",
        "gpt2",
        "mistral-7b",
        "gemma-7b",
        "whisper-small-cross",
        "all-minilm-l6-v2",
        "phi-2",
    ] {
        assert!(s.contains(model), "catalog lacks {model}: {s}");
    }
    assert!(s.contains("prefill_rows_bf16_hd128_causal"), "{s}");
}

#[test]
fn render_prints_sources_with_entry_names() {
    let o = run_attn(&[
        "render",
        "--spec",
        "self, heads=12, head_dim=64, mask=causal",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        s.contains("// ===== prefill_rows_bf16_hd64_causal"),
        "{}",
        &s[..s.len().min(500)]
    );
    assert!(s.contains("__global__") && !s.contains("#include"));
    // Without a head dim in the spec, --head-dim is required.
    let o = run_attn(&["render", "--spec", "self, heads=12"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--head-dim"));
}

#[test]
fn mask_file_drives_padding_masks() {
    // With mask = padding, an all-false mask equals no_mask; masking the last keys of batch 1
    // changes batch 1 only; a mask on a causal layer is refused.
    let d = fixtures().join("megatron");
    let spec_of = |mask: &str| {
        format!("self, heads=8, gqa=2, head_dim=64, qk_layernorm=rms, rope, mask={mask}")
    };
    let run = |mask: &str, file: Option<&Path>, tag: &str| -> std::process::Output {
        let out = scratch(&format!("mask-{tag}.safetensors"));
        let mut args: Vec<String> = [
            "layer",
            "--spec",
            &spec_of(mask),
            "--weights",
            d.join("weights.safetensors").to_str().unwrap(),
            "--prefix",
            "decoder.layers.0.self_attention.",
            "--input",
            d.join("input.safetensors").to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        if let Some(f) = file {
            args.push("--mask-file".into());
            args.push(f.to_str().unwrap().into());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run_attn(&refs)
    };
    let output = |tag: &str| {
        load(
            &scratch(&format!("mask-{tag}.safetensors")),
            "output",
            &[16, 2, 512],
        )
    };

    let none_file = scratch("mask-none-input.safetensors");
    let none = Tensor::zeros(&[2, 1, 1, 16]);
    WeightStore::save(&none_file, &[("attention_mask".to_string(), none)]).unwrap();
    let tail_file = scratch("mask-tail-input.safetensors");
    // Batch 1 masks out its last 4 keys.
    let tail = Tensor::from_fn(&[2, 1, 1, 16], |i| if i >= 16 + 12 { 1.0 } else { 0.0 });
    WeightStore::save(&tail_file, &[("attention_mask".to_string(), tail)]).unwrap();

    assert!(run("no_mask", None, "nomask").status.success());
    let o = run("padding", Some(&none_file), "none");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(rel_err(&output("none"), &output("nomask")) < 1e-6);
    let o = run("padding", Some(&tail_file), "tail");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (tail_out, base) = (output("tail"), output("nomask"));
    let (mut d0, mut d1) = (0f32, 0f32);
    for (idx, (a, b)) in tail_out.data().iter().zip(base.data()).enumerate() {
        let batch = (idx / 512) % 2;
        let diff = (a - b).abs();
        if batch == 0 {
            d0 = d0.max(diff)
        } else {
            d1 = d1.max(diff)
        }
    }
    assert!(d0 < 1e-5, "batch 0 must not change: {d0}");
    assert!(d1 > 1e-3, "batch 1 must change: {d1}");

    let o = run("causal", Some(&tail_file), "refused");
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("attention_mask"), "{e}");
}

#[test]
fn bias_file_masks_a_row_and_is_checked() {
    // The case: heads = 2, head_dim = 64, no mask, hidden [4, 1, 128]; bias row 1 is
    // -inf on every key: row 1 of the output is zeros (not NaN), the other rows unchanged.
    use attention_runtime::spec_layer::SpecLayer;
    use attention_runtime::{AttentionLayer, RuntimeDims};
    let spec = "self, heads = 2, head_dim = 64, mask = no_mask";
    let config = SpecLayer::config_from_str(spec, &RuntimeDims::default()).unwrap();
    let layer = SpecLayer::init(config, 9).unwrap();
    let weights = scratch("bias-weights.safetensors");
    WeightStore::save(&weights, &layer.state_dict("")).unwrap();
    let input = scratch("bias-input.safetensors");
    let x = Tensor::from_fn(&[4, 1, 128], |i| ((i * 37 % 101) as f32 / 50.0) - 1.0);
    WeightStore::save(&input, &[("input".to_string(), x)]).unwrap();
    let bias_file = scratch("bias-bias.safetensors");
    let bias = Tensor::from_fn(&[1, 1, 4, 4], |i| {
        if (4..8).contains(&i) {
            f32::NEG_INFINITY
        } else {
            0.0
        }
    });
    WeightStore::save(&bias_file, &[("attention_bias".to_string(), bias)]).unwrap();
    let run = |bias: Option<&Path>, tag: &str| {
        let out = scratch(&format!("bias-out-{tag}.safetensors"));
        let mut args = vec![
            "layer",
            "--spec",
            spec,
            "--weights",
            weights.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ];
        if let Some(b) = bias {
            args.extend(["--bias-file", b.to_str().unwrap()]);
        }
        (run_attn(&args), out)
    };
    let (o, biased) = run(Some(&bias_file), "biased");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (o, plain) = run(None, "plain");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (got, base) = (
        load(&biased, "output", &[4, 1, 128]),
        load(&plain, "output", &[4, 1, 128]),
    );
    assert!(got.data().iter().all(|v| v.is_finite()));
    assert!(got.data()[128..256].iter().all(|&v| v == 0.0));
    for r in [0, 2, 3] {
        assert_eq!(
            got.data()[r * 128..][..128],
            base.data()[r * 128..][..128],
            "row {r}"
        );
    }
    // A file without `attention_bias` is an error naming the tensor and the flag.
    let (o, _) = run(Some(&input), "missing");
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("attention_bias") && e.contains("--bias-file"),
        "{e}"
    );
}

fn backward_args(case: &str, spec: &str, prefix: &str, out: &Path) -> Vec<String> {
    let d = bwd_fixture_dir(case);
    let input = d.join("input.safetensors").to_str().unwrap().to_string();
    vec![
        "backward".into(),
        "--spec".into(),
        spec.into(),
        "--weights".into(),
        d.join("weights.safetensors").to_str().unwrap().into(),
        "--prefix".into(),
        prefix.into(),
        "--input".into(),
        input.clone(),
        "--grad-output".into(),
        input,
        "--output".into(),
        out.to_str().unwrap().into(),
    ]
}

/// `attn backward` writes `output`, `grad_input` and `grad.<name>` matching the reference
/// system's autograd (tests/fixtures/megatron_bwd) to 1e-4, and nothing for linear_proj.bias.
fn backward_golden(case: &str, spec: &str, prefix: &str, extra: &[&str]) {
    let out = scratch(&format!("bwd-{case}.safetensors"));
    let mut args = backward_args(case, spec, prefix, &out);
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = run_attn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "attn backward failed: {stderr}");
    assert!(stderr.contains("CPU reference backend"), "{stderr}");
    let got = WeightStore::from_file(&out).unwrap();
    let want = WeightStore::from_file(bwd_fixture_dir(case).join("expected.safetensors")).unwrap();
    let mut want_keys: Vec<&str> = want.keys().collect();
    want_keys.sort();
    let mut got_keys: Vec<&str> = got.keys().collect();
    got_keys.sort();
    assert_eq!(got_keys, want_keys, "{case}: the tensors written");
    assert!(!got.contains("grad.linear_proj.bias"));
    let bytes = std::fs::read(bwd_fixture_dir(case).join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for k in want_keys {
        let shape = st.tensor(k).unwrap().shape().to_vec();
        let (g, w) = (got.get(k, &shape).unwrap(), want.get(k, &shape).unwrap());
        let e = rel_err(&g, &w);
        assert!(
            e < 1e-4,
            "{case}: {k} rel. error {e} vs Megatron-Core autograd"
        );
    }
}

#[test]
fn backward_matches_megatron_autograd() {
    backward_golden(
        "megatron",
        "self, heads=8, gqa=2, head_dim=64, qk_layernorm=rms, rope, mask=causal",
        "decoder.layers.0.self_attention.",
        &["--device", "cpu"],
    );
}

#[test]
fn backward_cross_attention_delayed_and_recomputed() {
    let input = bwd_fixture_dir("megatron_cross").join("input.safetensors");
    backward_golden(
        "megatron_cross",
        "cross, heads=4, head_dim=32, hidden=128, mask=no_mask",
        "decoder.layers.0.cross_attention.",
        &[
            "--context",
            input.to_str().unwrap(),
            "--context-name",
            "key_value_states",
            "--delay-wgrad",
            "--recompute",
            "core_attention",
        ],
    );
}

#[test]
fn backward_padding_mask_file() {
    let input = bwd_fixture_dir("megatron_padding").join("input.safetensors");
    backward_golden(
        "megatron_padding",
        "self, heads=4, gqa=2, head_dim=64, hidden=256, bias=false, rope, mask=padding",
        "decoder.layers.0.self_attention.",
        &["--mask-file", input.to_str().unwrap()],
    );
}

fn backward_err(case: &str, extra: &[&str], grad_output: Option<&Path>) -> String {
    let out = scratch(&format!("bwd-err-{}.safetensors", extra.len()));
    let _ = std::fs::remove_file(&out);
    let mut args = backward_args(
        case,
        "self, heads=8, gqa=2, head_dim=64, qk_layernorm=rms, rope, mask=causal",
        "decoder.layers.0.self_attention.",
        &out,
    );
    if let Some(g) = grad_output {
        let i = args.iter().position(|a| a == "--grad-output").unwrap();
        args[i + 1] = g.to_str().unwrap().into();
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = run_attn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success(), "expected failure for {args:?}");
    assert!(!out.exists(), "nothing is written on an error");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn backward_bad_inputs_are_typed_errors() {
    // grad_output of another shape (case 2's is [13, 3, 256]; the output is [16, 2, 512]).
    let other = bwd_fixture_dir("megatron_case2").join("input.safetensors");
    let e = backward_err("megatron", &[], Some(&other));
    assert!(
        e.contains("grad_output") && e.contains("[13, 3, 256]"),
        "{e}"
    );
    // grad_output of an integer dtype.
    let bad = scratch("grad-u8.safetensors");
    let data = vec![0u8; 16 * 2 * 512];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![16, 2, 512], &data)
            .unwrap();
    safetensors::serialize_to_file([("grad_output", view)], &None, &bad).unwrap();
    let e = backward_err("megatron", &[], Some(&bad));
    assert!(
        e.contains("dtype") && e.contains("grad_output") && e.contains("U8"),
        "{e}"
    );
    // Without a GPU, --device cuda is a typed BackendUnavailable (on a GPU machine it runs:
    // gpu_cli.rs checks that).
    if attention_runtime::Device::cuda(0).is_err() {
        let e = backward_err("megatron", &["--device", "cuda"], None);
        assert!(e.contains("backend unavailable"), "{e}");
    }
    // A bad recompute mode.
    let e = backward_err("megatron", &["--recompute", "full"], None);
    assert!(e.contains("--recompute") && e.contains("full"), "{e}");
}
