//! The backend seam on the CPU: a generated struct through `BackendLayer`, the shared step
//! planning, and the rule that a user submodule moves to a GPU only through its CUDA trait.

use attention::attention;
use attention::runtime::backend::{Backend, BackendLayer, CpuBackend};
use attention::runtime::layer::{AttentionLayer, ForwardArgs};
use attention::runtime::{plan, AttnError, RuntimeDims};

#[path = "support/seam.rs"]
mod seam;

mod custom {
    use attention::codegen::Role;
    use attention::runtime::modules::{CudaSubmodule, Linear, LinearModule, Submodule};
    use attention::runtime::{LayerConfig, Result, Tensor, WeightStore};

    /// A `linear_proj` that scales its output by 3 on the CPU and has no CUDA implementation.
    pub struct Tripled(pub Linear);
    /// The same math with a CUDA implementation: the default kernel with weights times 3.
    pub struct TripledOnCuda(pub Linear);

    macro_rules! scaled_linear {
        ($t:ident) => {
            impl LinearModule for $t {
                fn in_features(&self) -> usize {
                    self.0.in_features()
                }
                fn out_features(&self) -> usize {
                    self.0.out_features()
                }
                fn forward(&self, x: &Tensor) -> Result<Tensor> {
                    let y = self.0.forward(x)?;
                    let shape = y.shape().to_vec();
                    Tensor::new(&shape, y.into_data().into_iter().map(|v| 3.0 * v).collect())
                }
                fn bias(&self) -> Option<&Tensor> {
                    self.0.bias()
                }
                fn state_dict(&self) -> Vec<(String, Tensor)> {
                    self.0.state_dict()
                }
                fn cuda(&self) -> Option<&dyn CudaSubmodule> {
                    scaled_linear!(@cuda $t self)
                }
            }
            impl Submodule for $t {
                fn init(cfg: &LayerConfig, role: Role, seed: u64) -> Result<Self> {
                    Linear::init(cfg, role, seed).map($t)
                }
                fn load(cfg: &LayerConfig, role: Role, w: &WeightStore, p: &str) -> Result<Self> {
                    Linear::load(cfg, role, w, p).map($t)
                }
            }
        };
        (@cuda Tripled $s:ident) => { None };
        (@cuda TripledOnCuda $s:ident) => { Some($s) };
    }
    scaled_linear!(Tripled);
    scaled_linear!(TripledOnCuda);

    impl CudaSubmodule for TripledOnCuda {
        fn cuda_state_dict(&self) -> Result<Vec<(String, Tensor)>> {
            let w = self.0.state_dict();
            Ok(w.into_iter()
                .map(|(k, t)| {
                    if k == "weight" {
                        let s = t.shape().to_vec();
                        let d = t.into_data().into_iter().map(|v| 3.0 * v).collect();
                        (k, Tensor::new(&s, d).unwrap())
                    } else {
                        (k, t)
                    }
                })
                .collect())
        }
    }
}

#[attention(self, heads = 4, gqa = 2, head_dim = 64, qk_layernorm = rms, rope, mask = causal)]
pub struct Llama;

#[attention(self, heads = 4, gqa = 2, head_dim = 64, rope, linear_proj = custom::Tripled)]
pub struct NoCudaProj;

#[attention(self, heads = 4, gqa = 2, head_dim = 64, rope, linear_proj = custom::TripledOnCuda)]
pub struct CudaProj;

#[attention(cross, heads = 4, head_dim = 64, mask = no_mask)]
pub struct Cross;

#[test]
fn the_seam_returns_the_layer_s_own_results() {
    let layer = Llama::new(RuntimeDims::default(), 3).unwrap();
    let x = seam::rand_tensor(&[6, 2, 256], 9);
    let direct = layer.forward(&x, &ForwardArgs::default()).unwrap();
    let cpu = layer.on_cpu();
    let via = BackendLayer::forward(&cpu, &x, &ForwardArgs::default()).unwrap();
    assert_eq!(via, direct.output);
    assert_eq!(cpu.output_bias(), direct.bias.as_ref());
    assert!(cpu.output_bias().is_some());
    assert_eq!(cpu.backend().name(), "cpu");
}

#[test]
fn the_engine_scenario_runs_on_the_cpu_backend() {
    let cpu = Llama::new(RuntimeDims::default(), 4).unwrap().on_cpu();
    let out = seam::scenario(&cpu, 100).unwrap();
    let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "forward",
            "prefill",
            "decode 0",
            "decode 1",
            "decode 2",
            "paged prefill",
            "paged mixed",
            "copy_rows"
        ]
    );
    for (name, t) in &out {
        assert!(t.data().iter().all(|v| v.is_finite()), "{name}");
    }
    assert_eq!(out[0].1.shape(), &[7, 2, 256]);
    assert_eq!(out[4].1.shape(), &[1, 2, 256]);
    assert_eq!(out[6].1.shape(), &[31, 256]);
    // copy_rows put rows 0..2 of the mixed step at rows 1..3, row 0 stays zero.
    let (mixed, copied) = (&out[6].1, &out[7].1);
    assert!(copied.data()[..256].iter().all(|&v| v == 0.0));
    assert_eq!(&copied.data()[256..], &mixed.data()[..512]);
}

#[test]
fn a_step_that_cannot_run_is_refused_by_the_plan_and_changes_nothing() {
    let cpu = Llama::new(RuntimeDims::default(), 5).unwrap().on_cpu();
    let be = CpuBackend;
    let mut cache = be.static_cache(1, 8, 2, 2, 64).unwrap();
    let args = ForwardArgs::default();
    let x = seam::rand_tensor(&[6, 2, 256], 1);
    cpu.prefill(&x, &mut cache, 0, 0, &args).unwrap();
    cache.advance(0, 2, 6).unwrap();
    let before = cache.clone();
    // Too long for max_seq 8.
    let x = seam::rand_tensor(&[3, 2, 256], 2);
    let e = cpu.prefill(&x, &mut cache, 0, 0, &args).unwrap_err();
    assert!(
        matches!(e, AttnError::CacheCapacity { ref arg, .. } if arg.starts_with("max_seq")),
        "{e}"
    );
    // Wrong hidden size.
    let x = seam::rand_tensor(&[1, 2, 128], 3);
    let e = cpu.decode(&x, &mut cache, 0, 0, &args).unwrap_err();
    assert!(
        matches!(e, AttnError::Shape { ref arg, .. } if arg == "hidden"),
        "{e}"
    );
    // Slots past max_batch.
    let x = seam::rand_tensor(&[1, 2, 256], 4);
    let e = cpu.decode(&x, &mut cache, 0, 1, &args).unwrap_err();
    assert!(
        matches!(e, AttnError::CacheCapacity { ref arg, .. } if arg.starts_with("max_batch")),
        "{e}"
    );
    assert_eq!(cache.seqlens(), before.seqlens());
    assert_eq!(cache.layer_k(0).unwrap(), before.layer_k(0).unwrap());
    // Cross-attention has no KV-cache step.
    let cross = Cross::new(RuntimeDims::default(), 1).unwrap().on_cpu();
    let e = cross
        .prefill(&seam::rand_tensor(&[1, 2, 256], 5), &mut cache, 0, 0, &args)
        .unwrap_err();
    assert!(
        matches!(e, AttnError::InvalidArgument { ref arg, .. } if arg == "config.kind"),
        "{e}"
    );
}

#[test]
fn the_plan_gives_positions_and_starts_per_slot() {
    let layer = Llama::new(RuntimeDims::default(), 6).unwrap();
    let mut cache = CpuBackend.static_cache(1, 16, 3, 2, 64).unwrap();
    let x = seam::rand_tensor(&[2, 1, 256], 1);
    layer
        .prefill(&x, &mut cache, 0, 2, &ForwardArgs::default())
        .unwrap();
    cache.advance(2, 1, 2).unwrap();
    let p = plan::static_step(
        layer.config(),
        &[3, 2, 256],
        &cache,
        0,
        1,
        &ForwardArgs::default(),
    )
    .unwrap();
    assert_eq!(p.starts, vec![0, 2]);
    // Row si * b + bi at starts[bi] + si.
    assert_eq!(p.positions, vec![0, 2, 1, 3, 2, 4]);
    assert_eq!(p.key_lens().collect::<Vec<_>>(), vec![3, 5]);
    let pos = [7i64, 9, 11];
    let args = ForwardArgs {
        positions: Some(&pos),
        ..ForwardArgs::default()
    };
    let p = plan::static_step(layer.config(), &[3, 2, 256], &cache, 0, 1, &args).unwrap();
    assert_eq!(p.positions, vec![7, 7, 9, 9, 11, 11]);
    let args = ForwardArgs {
        positions: Some(&pos[..2]),
        ..ForwardArgs::default()
    };
    let e = plan::static_step(layer.config(), &[3, 2, 256], &cache, 0, 1, &args).unwrap_err();
    assert!(
        matches!(e, AttnError::Shape { ref arg, .. } if arg == "positions"),
        "{e}"
    );
}

#[test]
fn a_user_submodule_without_a_cuda_implementation_cannot_move_to_a_gpu() {
    let layer = NoCudaProj::new(RuntimeDims::default(), 7).unwrap();
    // What CudaLayer::new (and so `to_cuda`) checks first, before touching a device.
    let e = layer.parts().cuda_state_dict("").unwrap_err();
    match e {
        AttnError::NoBackendImpl {
            role,
            backend,
            hint,
        } => {
            assert_eq!(role, "linear_proj");
            assert_eq!(backend, "cuda");
            assert!(hint.contains("CudaSubmodule"), "{hint}");
        }
        e => panic!("expected NoBackendImpl, got {e}"),
    }
    // With a CUDA implementation, its parameters are what the device runs with.
    let layer = CudaProj::new(RuntimeDims::default(), 7).unwrap();
    let sd = layer.parts().cuda_state_dict("").unwrap();
    let host: std::collections::HashMap<_, _> = layer.state_dict("").into_iter().collect();
    let w = &sd
        .iter()
        .find(|(k, _)| k == "linear_proj.weight")
        .unwrap()
        .1;
    let scaled: Vec<f32> = host["linear_proj.weight"]
        .data()
        .iter()
        .map(|v| 3.0 * v)
        .collect();
    assert_eq!(w.data(), &scaled[..]);
    let qkv = &sd.iter().find(|(k, _)| k == "linear_qkv.weight").unwrap().1;
    assert_eq!(qkv, &host["linear_qkv.weight"]);
}
