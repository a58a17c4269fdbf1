//! all-MiniLM-L6-v2's six attention layers on the GPU (`CudaLayer`, bf16), from the package's
//! weights under Hugging Face names, against the transformers golden fixture on the real
//! tokens, and against the CPU backend (see `minilm.rs` for the CPU check at 1e-4).
//!
//! The weights: `$ATTN_MINILM_DIR`, else `gpu-bundle/minilm/` (the attention tensors that
//! `scripts/gpu-bundle.sh` puts there), else `.tools/minilm/...` (`scripts/install-minilm.sh`).

use attention_runtime::cuda::CudaLayer;
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{
    AttentionLayer, Device, ForwardArgs, RuntimeDims, WeightNames, WeightStore,
};

mod minilm_common;
use minilm_common::{golden, model_file, with_bias, LAYERS, SPEC};

/// bf16 activations and weights: the layer tests' tolerance.
const TOL: f64 = 1e-2;

#[test]
#[ignore = "requires a CUDA GPU"]
fn six_attention_layers_match_transformers_on_the_gpu() {
    let Some(model) = model_file() else { return };
    let dev = match Device::cuda(0) {
        Ok(Device::Cuda(d)) => d,
        other => panic!("a CUDA GPU is required: {other:?}"),
    };
    let g = golden();
    let weights = WeightStore::from_file(&model).unwrap();
    let mask = g.key_mask();
    let args = ForwardArgs {
        attention_mask: Some(&mask),
        ..ForwardArgs::default()
    };
    for i in 0..LAYERS {
        let cfg =
            SpecLayer::config_from_str(&format!("{SPEC}, dtype = bf16"), &RuntimeDims::default())
                .unwrap();
        let (layer, _) = SpecLayer::load_named(
            cfg,
            &weights,
            &format!("encoder.layer.{i}."),
            WeightNames::Hf,
        )
        .unwrap();
        let cuda = CudaLayer::new(&layer, &dev).unwrap();
        cuda.set_poison_outputs(true);
        let x = g.input(i);
        let gpu = with_bias(cuda.forward(&x, &args).unwrap());
        let cpu = with_bias(layer.forward(&x, &args).unwrap());
        let vs_golden = g.rel_err_valid(&gpu, &g.expected(i));
        let vs_cpu = g.rel_err_valid(&gpu, &minilm_common::swap01(&cpu));
        println!(
            "layer {i}: gpu vs transformers {vs_golden:.2e}, gpu vs cpu {vs_cpu:.2e} | {}",
            cuda.forward_kernel_key(&args)
        );
        assert!(vs_golden <= TOL, "layer {i}: {vs_golden}");
        assert!(vs_cpu <= TOL, "layer {i}: {vs_cpu}");
    }
}
