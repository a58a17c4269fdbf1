//! Shared by the integration tests (`mod common;`), the GPU tests `gpu_*.rs` above all: a
//! fresh seed, the GPU, the error measures, rounding to bf16/f16, the fixtures and the `attn`
//! binary. Each test file uses a part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use attention_runtime::cuda::{CudaLayer, ElemType};
use attention_runtime::device::CudaDevice;
use attention_runtime::modules::SplitMix64;
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{Device, RuntimeDims, Tensor};
use cudarc::driver::{CudaContext, CudaStream};
use safetensors::{Dtype, SafeTensors};

// ---------------------------------------------------------------------------------------
// Seeds and devices.

/// A seed that differs from run to run (the time and the process id); tests print it so a
/// failure can be replayed: `ATTN_TEST_SEED` (decimal or `0x` hex) gives that seed instead.
pub fn fresh_seed() -> u64 {
    if let Ok(v) = std::env::var("ATTN_TEST_SEED") {
        let v = v.trim();
        let parsed = match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => v.parse(),
        };
        return parsed.expect("ATTN_TEST_SEED: a decimal or 0x-hex u64");
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    t ^ ((std::process::id() as u64) << 32)
}

/// CUDA device 0; panics when there is none (the tests that call it are `#[ignore]`d).
pub fn gpu() -> CudaDevice {
    match Device::cuda(0) {
        Ok(Device::Cuda(d)) => d,
        other => panic!("a CUDA GPU is required: {other:?}"),
    }
}

/// CUDA device `ordinal` (the multi-GPU tests); panics when there is none.
pub fn gpu_at(ordinal: usize) -> CudaDevice {
    match Device::cuda(ordinal) {
        Ok(Device::Cuda(d)) => d,
        other => panic!("CUDA GPU {ordinal} is required: {other:?}"),
    }
}

/// A cudarc context on GPU 0 and its default stream, for the tests that launch kernels
/// themselves; panics when there is no GPU.
pub fn cuda_stream() -> (Arc<CudaContext>, Arc<CudaStream>) {
    let ctx = CudaContext::new(0).expect("a CUDA GPU is required");
    let stream = ctx.default_stream();
    (ctx, stream)
}

// ---------------------------------------------------------------------------------------
// Error measures.

/// `||got - want|| / ||want||` (Frobenius, f64 sums); the shapes must agree and every value
/// of `got` must be finite (a NaN or Inf is an unwritten element or an overflow: it fails).
pub fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    rel_err_floored(got, want, 1e-30)
}

/// [`rel_err`] with `||want||^2` floored at `den_floor` (a result that is zero in exact
/// arithmetic is rounding noise on both sides, and their ratio measures nothing).
pub fn rel_err_floored(got: &Tensor, want: &Tensor, den_floor: f64) -> f64 {
    assert_eq!(got.shape(), want.shape());
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in got.data().iter().zip(want.data()) {
        assert!(
            x.is_finite(),
            "NaN/inf in the result under test (an unwritten element or an overflow)"
        );
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(den_floor)).sqrt()
}

/// `||a - b|| / ||b||` over slices (the absolute norm when `b` is all zeros); no finiteness
/// check (a NaN gives NaN, which fails every `<=` tolerance).
pub fn rel_frob(a: &[f32], b: &[f32]) -> f64 {
    let mut num = 0f64;
    let mut den = 0f64;
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Same length and the same bits everywhere (NaNs included, `0.0 != -0.0`).
pub fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Same shape and [`bits_equal`] data.
pub fn bitwise(a: &Tensor, b: &Tensor) -> bool {
    a.shape() == b.shape() && bits_equal(a.data(), b.data())
}

// ---------------------------------------------------------------------------------------
// Rounding to the GPU's element types.

/// `x` rounded to `elem` and back to f32.
pub fn round_f(x: f32, elem: ElemType) -> f32 {
    match elem {
        ElemType::Bf16 => half::bf16::from_f32(x).to_f32(),
        ElemType::F16 => half::f16::from_f32(x).to_f32(),
        ElemType::F32 => x,
    }
}

/// Every element of `t` rounded to `elem` (what the GPU will see).
pub fn round(t: &Tensor, elem: ElemType) -> Tensor {
    Tensor::new(
        t.shape(),
        t.data().iter().map(|&x| round_f(x, elem)).collect(),
    )
    .unwrap()
}

/// Uniform values of amplitude `amp`, rounded to `elem`.
pub fn rand_t(rng: &mut SplitMix64, shape: &[usize], amp: f32, elem: ElemType) -> Tensor {
    round(&Tensor::from_fn(shape, |_| rng.uniform() * amp), elem)
}

// ---------------------------------------------------------------------------------------
// Fixtures and the `attn` binary.

/// The repository root: `ATTN_REPO_ROOT` (set by the GPU bundle's run.sh), else the
/// workspace of this crate.
pub fn repo_root() -> PathBuf {
    std::env::var_os("ATTN_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
}

/// The folder of a Megatron-Core autograd fixture (`tests/fixtures/megatron_bwd/<case>`).
pub fn bwd_fixture_dir(case: &str) -> PathBuf {
    repo_root().join("tests/fixtures/megatron_bwd").join(case)
}

/// Every tensor of a safetensors file as f32 (the fixtures hold f32 tensors and u8/bool
/// masks; another dtype panics).
pub fn read_all(path: &Path) -> BTreeMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let d = v.data();
            let data: Vec<f32> = match v.dtype() {
                Dtype::F32 => d
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                Dtype::U8 | Dtype::BOOL => d.iter().map(|&b| f32::from(b)).collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            (name, Tensor::new(v.shape(), data).unwrap())
        })
        .collect()
}

/// The `attn` binary: `ATTN_BIN` (set by the GPU bundle's run.sh), else the one cargo built.
pub fn attn_bin() -> PathBuf {
    std::env::var_os("ATTN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_attn")))
}

/// A length in `lo..lo + span` drawn from `rng` (odd lengths, not multiples of any tile).
pub fn odd(rng: &mut SplitMix64, lo: usize, span: usize) -> usize {
    lo + ((rng.uniform().abs() * span as f32) as usize % span.max(1))
}

/// The layer of `spec` with weights seeded from `sd` (`sd ^ 0x5eed`), on the CPU and on GPU
/// 0; the GPU layer poisons its outputs with NaN before writing them (an unwritten element
/// fails [`rel_err`]).
pub fn layer_pair(spec: &str, sd: u64) -> (SpecLayer, CudaLayer) {
    let config = SpecLayer::config_from_str(spec, &RuntimeDims::default()).unwrap();
    let layer = SpecLayer::init(config, sd ^ 0x5eed).unwrap();
    let cuda = CudaLayer::new(&layer, &gpu()).unwrap();
    cuda.set_poison_outputs(true);
    (layer, cuda)
}

/// Run the `attn` binary ([`attn_bin`]) with `args`, capturing its output.
pub fn run_attn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    std::process::Command::new(attn_bin())
        .args(args)
        .output()
        .expect("attn runs")
}

/// `name` in a scratch folder of this test process (created on first use).
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("attn-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Write one tensor of any dtype (`bytes` little-endian, as safetensors stores them).
pub fn save_raw(path: &Path, name: &str, dtype: Dtype, shape: &[usize], bytes: &[u8]) {
    let view = safetensors::tensor::TensorView::new(dtype, shape.to_vec(), bytes).unwrap();
    safetensors::serialize_to_file([(name, view)], &None, path).unwrap();
}
