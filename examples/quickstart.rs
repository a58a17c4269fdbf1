//! Quickstart: declare a Llama-style attention layer with one line, build it, run a forward.
//!
//!     cargo run --release --example quickstart
//!
//! It runs the layer on the GPU when one is present (checking it against the CPU reference)
//! and otherwise on the CPU reference backend, and says which. When NVRTC is on the machine it also compiles the layer's
//! kernels (rendered at build time by the macro) for the GPU at hand, or for sm_90a.

use std::time::Instant;

use attention::attention;
use attention::runtime::cuda::CudaLayer;
use attention::runtime::{jit, AttentionLayer, Device, ForwardArgs, RuntimeDims, Tensor};

/// 8 query heads in 2 groups of head dim 64, RMS q/k norm, rotary embeddings, causal mask.
#[attention(self, heads = 8, gqa = 2, head_dim = 64, qk_layernorm = rms, rope, mask = causal)]
pub struct TinyLlamaAttention;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("spec:    {}", TinyLlamaAttention::SPEC);
    println!(
        "kernels: {} rendered at build time",
        TinyLlamaAttention::KERNELS.len()
    );
    for k in TinyLlamaAttention::KERNELS {
        println!("         {}", k.key);
    }

    let device = Device::best();
    let arch = match &device {
        Device::Cuda(d) => d.arch(),
        Device::Cpu => "sm_90a".to_string(),
    };
    if jit::nvrtc_available() {
        let t = Instant::now();
        // KERNELS is for every device: the Hopper-only kernels (`_sm90`) compile for sm_90a.
        let mine: Vec<_> = TinyLlamaAttention::KERNELS
            .iter()
            .filter(|k| k.compiles_for(&arch))
            .collect();
        for k in &mine {
            jit::compile_cubin(k.key, k.source, &arch)?;
        }
        println!(
            "nvrtc:   compiled {} kernels for {arch} in {:.0} ms",
            mine.len(),
            t.elapsed().as_secs_f64() * 1e3
        );
    } else {
        println!("nvrtc:   libnvrtc not found, kernels not compiled (scripts/install-nvrtc.sh)");
    }

    // The layer: CPU reference weights, then (with a GPU) the same layer on the device in
    // bf16, checked against the CPU result.
    let layer = TinyLlamaAttention::new(RuntimeDims::default(), 42)?;
    let (s, b, h) = (128, 2, layer.config().hidden);
    let mut state = 0x9e3779b97f4a7c15u64;
    let x = Tensor::from_fn(&[s, b, h], |_| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    });
    let args = ForwardArgs::default();
    let t = Instant::now();
    let reference = layer.forward(&x, &args)?;
    let cpu_ms = t.elapsed().as_secs_f64() * 1e3;
    let (out, where_ran, ms) = match &device {
        Device::Cuda(d) => {
            let gpu = CudaLayer::new(&layer, d)?;
            gpu.forward(&x, &args)?; // compile and warm up
            let t = Instant::now();
            let out = gpu.forward(&x, &args)?;
            (
                out,
                format!("on the GPU ({device})"),
                t.elapsed().as_secs_f64() * 1e3,
            )
        }
        Device::Cpu => (
            reference.clone(),
            "on the CPU reference backend (no usable GPU)".to_string(),
            cpu_ms,
        ),
    };
    println!("device:  ran {where_ran}");
    let norm = |t: &Tensor| {
        t.data()
            .iter()
            .map(|v| (*v as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let diff = Tensor::from_fn(out.output.shape(), |i| {
        out.output.data()[i] - reference.output.data()[i]
    });
    println!(
        "forward: input [s={s}, b={b}, h={h}] -> output {:?}, bias {:?}, {ms:.1} ms; \
         |out - cpu_ref| / |cpu_ref| = {:.2e}",
        out.output.shape(),
        out.bias.as_ref().map(|t| t.shape().to_vec()),
        norm(&diff) / norm(&reference.output),
    );
    Ok(())
}
