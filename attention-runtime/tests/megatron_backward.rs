//! The CPU backward against the reference system's own autograd: golden fixtures from
//! Megatron-Core 0.16.1 (`scripts/megatron_golden_backward.py`, fp32 on an H200 with TF32 off;
//! see `tests/fixtures/megatron_bwd/*/README.txt`). Every gradient (input, key_value_states,
//! every parameter under its Megatron name) must match to 1e-4 relative Frobenius error, in
//! each training mode (one-step, delayed wgrad, selective recompute).

use attention_runtime::backend::{CpuLayer, TrainLayer};
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::train::{BackwardOptions, Recompute, TrainOptions};
use attention_runtime::{AttentionLayer, ForwardArgs, RuntimeDims, Tensor, WeightStore};

mod common;
use common::{bwd_fixture_dir, read_all, rel_err};

fn check(what: &str, got: &Tensor, want: &Tensor) {
    let e = rel_err(got, want);
    eprintln!("{what}: relative Frobenius error {e:.2e}");
    assert!(e < 1e-4, "{what}: relative Frobenius error {e:.3e} >= 1e-4");
}

fn golden(case: &str, spec: &str, prefix: &str) {
    let dir = bwd_fixture_dir(case);
    assert!(
        dir.is_dir(),
        "fixture folder {} is missing (committed on main with the golden backward fixtures)",
        dir.display()
    );
    let readme = std::fs::read_to_string(dir.join("README.txt")).unwrap();
    assert!(
        readme.contains(&format!("spec: `{spec}`")),
        "{case}: the README's spec is not `{spec}`"
    );
    let config = SpecLayer::config_from_str(spec, &RuntimeDims::default()).unwrap();
    let weights = WeightStore::from_file(dir.join("weights.safetensors")).unwrap();
    let layer = SpecLayer::load(config, &weights, prefix).unwrap();
    let input = read_all(&dir.join("input.safetensors"));
    let expected = read_all(&dir.join("expected.safetensors"));
    let args = ForwardArgs {
        attention_mask: input.get("attention_mask"),
        key_value_states: input.get("key_value_states"),
        ..ForwardArgs::default()
    };
    let x = &input["input"];
    let g = &input["grad_output"];
    let want_params: Vec<&str> = expected
        .keys()
        .filter_map(|k| k.strip_prefix("grad."))
        .collect();
    assert!(
        !want_params.contains(&"linear_proj.bias"),
        "{case}: Megatron gave linear_proj.bias a gradient"
    );
    let bias = layer.forward(x, &args).unwrap().bias;
    match (bias, expected.get("output_bias")) {
        (Some(b), Some(e)) => assert_eq!(&b, e, "{case}: output_bias"),
        (None, None) => {}
        (b, e) => panic!("{case}: output_bias {b:?} vs {e:?}"),
    }
    let cpu = CpuLayer::new(layer);
    for (mode, recompute, delay) in [
        ("one-step", Recompute::None, false),
        ("delayed wgrad", Recompute::None, true),
        ("selective recompute", Recompute::CoreAttention, false),
    ] {
        let (y, mut saved) = cpu
            .forward_train(x, &args, &TrainOptions { recompute })
            .unwrap();
        check(&format!("{case} [{mode}] output"), &y, &expected["output"]);
        let opts = BackwardOptions {
            delay_wgrad: delay,
            ..Default::default()
        };
        let mut grads = cpu.backward(&mut saved, g, &opts).unwrap();
        if delay {
            grads.params.extend(cpu.backward_dw(&mut saved).unwrap());
        }
        check(
            &format!("{case} [{mode}] grad_input"),
            &grads.grad_input,
            &expected["grad_input"],
        );
        match (
            &grads.grad_key_value_states,
            expected.get("grad_key_value_states"),
        ) {
            (Some(a), Some(b)) => check(&format!("{case} [{mode}] grad_key_value_states"), a, b),
            (None, None) => {}
            _ => panic!("{case}: grad_key_value_states presence differs"),
        }
        assert_eq!(
            grads.params.keys().map(String::as_str).collect::<Vec<_>>(),
            {
                let mut w = want_params.clone();
                w.sort();
                w
            },
            "{case} [{mode}]: the parameters with a gradient"
        );
        for name in &want_params {
            check(
                &format!("{case} [{mode}] grad.{name}"),
                &grads.params[*name],
                &expected[&format!("grad.{name}")],
            );
        }
    }
}

const SELF_PREFIX: &str = "decoder.layers.0.self_attention.";

#[test]
fn megatron_gqa_rms_rope_causal() {
    golden(
        "megatron",
        "self, heads=8, gqa=2, head_dim=64, qk_layernorm=rms, rope, mask=causal",
        SELF_PREFIX,
    );
}

#[test]
fn megatron_mqa_layernorm_interleaved_partial_rope() {
    golden(
        "megatron_case2",
        "self, heads=8, gqa=1, head_dim=64, hidden=256, qk_layernorm=layer, bias=false, \
         rope=interleaved, rotary_percent=0.5, mask=causal",
        SELF_PREFIX,
    );
}

#[test]
fn megatron_learnable_sinks_window_output_gate() {
    golden(
        "megatron_sinks_gate",
        "self, heads=8, gqa=4, head_dim=32, hidden=128, qk_layernorm=rms, rope, window=(5, 0), \
         sinks=learnable, output_gate, mask=causal",
        SELF_PREFIX,
    );
}

#[test]
fn megatron_padding_mask_tensor() {
    golden(
        "megatron_padding",
        "self, heads=4, gqa=2, head_dim=64, hidden=256, bias=false, rope, mask=padding",
        SELF_PREFIX,
    );
}

#[test]
fn megatron_cross_attention() {
    golden(
        "megatron_cross",
        "cross, heads=4, head_dim=32, hidden=128, mask=no_mask",
        "decoder.layers.0.cross_attention.",
    );
}
