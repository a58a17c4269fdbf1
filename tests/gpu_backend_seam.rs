//! The same generated struct on both backends through the seam (`BackendLayer`): the CPU
//! reference is the oracle for the CUDA run of one engine scenario.

use attention::attention;
use attention::runtime::device::CudaDevice;
use attention::runtime::{AttnError, Device, RuntimeDims, Tensor};

#[path = "support/seam.rs"]
mod seam;

mod custom {
    use attention::codegen::Role;
    use attention::runtime::modules::{Linear, LinearModule, Submodule};
    use attention::runtime::{LayerConfig, Result, Tensor, WeightStore};

    /// A user `linear_proj` with no CUDA implementation.
    pub struct CpuOnlyProj(pub Linear);

    impl LinearModule for CpuOnlyProj {
        fn in_features(&self) -> usize {
            self.0.in_features()
        }
        fn out_features(&self) -> usize {
            self.0.out_features()
        }
        fn forward(&self, x: &Tensor) -> Result<Tensor> {
            self.0.forward(x)
        }
        fn bias(&self) -> Option<&Tensor> {
            self.0.bias()
        }
        fn state_dict(&self) -> Vec<(String, Tensor)> {
            self.0.state_dict()
        }
    }
    impl Submodule for CpuOnlyProj {
        fn init(cfg: &LayerConfig, role: Role, seed: u64) -> Result<Self> {
            Linear::init(cfg, role, seed).map(CpuOnlyProj)
        }
        fn load(cfg: &LayerConfig, role: Role, w: &WeightStore, p: &str) -> Result<Self> {
            Linear::load(cfg, role, w, p).map(CpuOnlyProj)
        }
    }
}

#[attention(self, heads = 8, gqa = 2, head_dim = 128, qk_layernorm = rms, rope, mask = causal)]
pub struct Llama;

#[attention(self, heads = 4, gqa = 4, head_dim = 64, rope, mask = causal, window = (12, 0), sinks = learnable, output_gate)]
pub struct Windowed;

#[attention(self, heads = 4, gqa = 2, head_dim = 64, rope, linear_proj = custom::CpuOnlyProj)]
pub struct CpuOnly;

fn gpu() -> CudaDevice {
    match Device::cuda(0) {
        Ok(Device::Cuda(d)) => d,
        other => panic!("requires a CUDA GPU: {other:?}"),
    }
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.data().iter().zip(b.data()) {
        assert!(x.is_finite(), "non-finite output");
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn compare(cpu: &seam::Outputs, gpu: &seam::Outputs) {
    assert_eq!(cpu.len(), gpu.len());
    for ((name, c), (gname, g)) in cpu.iter().zip(gpu) {
        assert_eq!(name, gname);
        let e = rel_err(g, c);
        assert!(e < 2e-2, "{name}: rel err {e}");
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn one_generated_struct_runs_the_same_scenario_on_both_backends() {
    let dev = gpu();
    let layer = Llama::new(RuntimeDims::default(), 11).unwrap();
    let on_gpu = layer.to_cuda(&dev).unwrap();
    on_gpu.set_poison_outputs(true);
    let want = seam::scenario(&layer.on_cpu(), 500).unwrap();
    let got = seam::scenario(&on_gpu, 500).unwrap();
    compare(&want, &got);
    // Repeated runs are bitwise equal.
    assert_eq!(seam::scenario(&on_gpu, 500).unwrap(), got);

    let layer = Windowed::new(RuntimeDims::default(), 12).unwrap();
    let on_gpu = layer.to_cuda(&dev).unwrap();
    on_gpu.set_poison_outputs(true);
    let want = seam::scenario(&layer.on_cpu(), 600).unwrap();
    let got = seam::scenario(&on_gpu, 600).unwrap();
    compare(&want, &got);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn loading_straight_onto_the_gpu_matches_moving_a_cpu_layer() {
    let dev = gpu();
    let layer = Llama::new(RuntimeDims::default(), 13).unwrap();
    let dir = std::env::temp_dir().join(format!("seam-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("w.safetensors");
    attention::runtime::WeightStore::save(&path, &layer.state_dict("l.")).unwrap();
    let loaded =
        Llama::cuda_from_safetensors(&path, Some("l."), RuntimeDims::default(), &dev).unwrap();
    let moved = layer.to_cuda(&dev).unwrap();
    assert_eq!(
        seam::scenario(&loaded, 700).unwrap(),
        seam::scenario(&moved, 700).unwrap()
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn a_user_submodule_without_a_cuda_implementation_is_a_typed_error_on_the_gpu() {
    let dev = gpu();
    let layer = CpuOnly::new(RuntimeDims::default(), 14).unwrap();
    match layer.to_cuda(&dev) {
        Err(AttnError::NoBackendImpl { role, backend, .. }) => {
            assert_eq!((role.as_str(), backend.as_str()), ("linear_proj", "cuda"));
        }
        Err(e) => panic!("expected NoBackendImpl, got {e}"),
        Ok(_) => panic!("expected NoBackendImpl, got a layer"),
    }
}
