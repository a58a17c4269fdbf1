//! Context-parallel training over NCCL on two GPUs of one host: [`CpCudaLayer`]'s
//! `forward_train_device` / `backward_device` (CP = 2, each rank its chunks `r` and `3 - r`
//! of every sequence on GPU `r`) with `p2p`, `all_gather` and `a2a`, against one GPU's
//! [`CudaLayer`] training step over the whole input: the output and the input gradient
//! (put back in order), and every parameter gradient (summed over the group, on each rank).
//! Cases: causal (GQA, RMS q/k norm, rope, qkv bias), no mask, a causal sliding window with
//! learnable sinks and the output gate (the window crosses chunk borders: `Band` launches),
//! a two-sided window with off-by-one sinks in f16 at head dim 128; padded (b = 1 and 2) and
//! packed (three sequences) input; delayed weight gradients and the deterministic backward.
//! Every layer poisons its buffers with NaN (an unwritten element is a NaN in the result, and
//! a NaN fails the comparison). Then the error classes. Every test is
//! `#[ignore = "requires a CUDA GPU"]` (2 GPUs and libnccl; always compiled). Run them one
//! at a time (`--test-threads=1`): each makes its own NCCL group on GPUs 0 and 1.
//!
//! Weights, inputs and output gradients are rounded to the layer's dtype on the host so every
//! side sees the same values. Tolerances (relative Frobenius error, floored as in
//! `gpu_layer_backward.rs`): [`TOL_OUT`] on the output (as `gpu_parallel_cp.rs`),
//! [`TOL_GRAD`] on gradients (each launch's dq / dk / dv is rounded to the dtype once before
//! the f32 sums), [`TOL_SINKS`] on the sinks' gradient (a sum over every row).

use std::collections::BTreeMap;
use std::time::Duration;

use attention_runtime::backend::{Backend, BackendLayer, TrainLayer};
use attention_runtime::cuda::{CudaLayer, CudaRuntime, DeviceTensor, ElemType};
use attention_runtime::device::CudaDevice;
use attention_runtime::modules::SplitMix64;
use attention_runtime::parallel::{CpCommType, CpCudaLayer, CpLayout, NcclComm, NcclUniqueId};
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::train::{BackwardOptions, LayerGrads, Recompute, TrainOptions};
use attention_runtime::{
    AttentionLayer, AttnError, Device, ForwardArgs, PackedSeqParams, Result, RuntimeDims, Tensor,
    WeightStore,
};

const TOL_OUT: f64 = 1e-2;
const TOL_GRAD: f64 = 3e-2;
const TOL_SINKS: f64 = 5e-2;
const TIMEOUT: Duration = Duration::from_secs(120);
/// A Llama-like layer, scaled down: GQA, RMS q/k norm, rope, causal.
const SPEC: &str =
    "self, heads=8, gqa=4, head_dim=64, hidden=512, qk_layernorm=rms, rope, qkv_bias, mask=causal";

fn gpu(ordinal: usize) -> CudaDevice {
    match Device::cuda(ordinal) {
        Ok(Device::Cuda(d)) => d,
        other => panic!("CUDA GPU {ordinal} is required: {other:?}"),
    }
}

fn round(t: &Tensor, f16: bool) -> Tensor {
    let r = |x: f32| {
        if f16 {
            half::f16::from_f32(x).to_f32()
        } else {
            half::bf16::from_f32(x).to_f32()
        }
    };
    Tensor::new(t.shape(), t.data().iter().map(|&x| r(x)).collect()).unwrap()
}

fn is_f16(spec: &str) -> bool {
    spec.contains("dtype=f16")
}

/// `spec`'s layer with seeded weights rounded to its dtype.
fn layer(spec: &str, seed: u64) -> SpecLayer {
    let cfg = SpecLayer::config_from_str(spec, &RuntimeDims::default()).unwrap();
    let l = SpecLayer::init(cfg.clone(), seed).unwrap();
    let sd: Vec<_> = l
        .state_dict("")
        .into_iter()
        .map(|(k, t)| (k, round(&t, is_f16(spec))))
        .collect();
    SpecLayer::load(cfg, &WeightStore::from_tensors(sd), "").unwrap()
}

fn rand_t(rng: &mut SplitMix64, shape: &[usize], f16: bool) -> Tensor {
    round(&Tensor::from_fn(shape, |_| rng.uniform()), f16)
}

/// `‖got − want‖ / ‖want‖`, the denominator floored at an RMS of 1e-4 per element.
fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.numel(), want.numel());
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in got.data().iter().zip(want.data()) {
        assert!(x.is_finite(), "NaN/inf in a GPU result");
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-8 * got.numel() as f64)).sqrt()
}

fn check(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let e = rel_err(got, want);
    eprintln!("{what}: relative error {e:.2e}");
    assert!(e <= tol, "{what}: relative error {e} > {tol}");
}

/// Run `f(rank, device, comm)` on GPUs 0 and 1, one thread each, over a fresh NCCL group.
fn two_gpus<T: Send>(f: impl Fn(usize, CudaDevice, NcclComm) -> Result<T> + Sync) -> Vec<T> {
    let id = NcclUniqueId::new().expect("libnccl and a unique id");
    let f = &f;
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|r| {
                s.spawn(move || {
                    let dev = gpu(r);
                    let rt = CudaRuntime::get(&dev)?;
                    let comm = NcclComm::new(rt, r, 2, &id, Some(TIMEOUT))?;
                    f(r, dev, comm)
                })
            })
            .collect();
        hs.into_iter()
            .enumerate()
            .map(|(r, h)| {
                h.join()
                    .unwrap()
                    .unwrap_or_else(|e| panic!("rank {r}: {e}"))
            })
            .collect()
    })
}

/// A CUDA layer of `full` on `dev` with poisoned buffers.
fn poisoned(full: &SpecLayer, dev: &CudaDevice) -> Result<CudaLayer> {
    let l = CudaLayer::new(full, dev)?;
    l.set_poison_outputs(true);
    Ok(l)
}

/// A training step's results on the host: output, input gradient, parameter gradients.
struct Step {
    y: Tensor,
    dx: Tensor,
    params: BTreeMap<String, Tensor>,
}

fn host(
    be: &impl Backend<Tensor = DeviceTensor>,
    y: &DeviceTensor,
    g: &LayerGrads<DeviceTensor>,
) -> Result<Step> {
    Ok(Step {
        y: be.download(y)?,
        dx: be.download(&g.grad_input)?,
        params: g
            .params
            .iter()
            .map(|(k, t)| {
                assert_eq!(t.elem(), ElemType::F32, "{k}: parameter gradients are f32");
                Ok((k.clone(), be.download(t)?))
            })
            .collect::<Result<_>>()?,
    })
}

struct Input<'a> {
    name: &'static str,
    x: Tensor,
    dy: Tensor,
    args: ForwardArgs<'a>,
}

impl Input<'_> {
    fn cu(&self) -> Option<&[i32]> {
        self.args.packed.map(|p| p.cu_seqlens_q)
    }
}

fn packed_args(cu: &[i32]) -> ForwardArgs<'_> {
    ForwardArgs {
        packed: Some(PackedSeqParams {
            cu_seqlens_q: cu,
            cu_seqlens_kv: &[],
            max_seqlen_q: 0,
            max_seqlen_kv: 0,
        }),
        ..Default::default()
    }
}

fn one_gpu(full: &SpecLayer, inp: &Input<'_>, opts: &BackwardOptions) -> Step {
    let l = poisoned(full, &gpu(0)).unwrap();
    let be = l.backend();
    let (x, dy) = (be.upload(&inp.x).unwrap(), be.upload(&inp.dy).unwrap());
    let (y, mut saved) = l
        .forward_train(&x, &inp.args, &TrainOptions::default())
        .unwrap();
    let mut g = l.backward(&mut saved, &dy, opts).unwrap();
    if opts.delay_wgrad {
        g.params.extend(l.backward_dw(&mut saved).unwrap());
    }
    host(&be, &y, &g).unwrap()
}

/// CP = 2 with every comm type on `inputs` equals one GPU's training step.
fn cp_case(spec: &str, seed: u64, inputs: &[Input<'_>], opts: BackwardOptions) {
    let full = layer(spec, seed);
    let want: Vec<Step> = inputs.iter().map(|i| one_gpu(&full, i, &opts)).collect();
    for ty in CpCommType::ALL {
        let out = two_gpus(|_, dev, c| {
            let l = CpCudaLayer::new(poisoned(&full, &dev)?, c, ty)?;
            let layout = *l.layout();
            let be = l.inner().backend();
            inputs
                .iter()
                .map(|inp| {
                    let x = be.upload(&layout.split(&inp.x, inp.cu())?)?;
                    let dy = be.upload(&layout.split(&inp.dy, inp.cu())?)?;
                    let (y, mut saved) =
                        l.forward_train_device(&x, &inp.args, &TrainOptions::default())?;
                    let mut g = l.backward_device(&mut saved, &dy, &opts)?;
                    if opts.delay_wgrad {
                        assert!(saved.wgrad_pending());
                        g.params.extend(l.backward_dw_device(&mut saved)?);
                    }
                    assert_eq!(saved.saved_bytes(), 0);
                    let s = host(&be, &y, &g)?;
                    let shape = layout.split(&inp.x, inp.cu())?.shape().to_vec();
                    Ok(Step {
                        y: s.y.reshape(&shape)?,
                        dx: s.dx.reshape(&shape)?,
                        params: s.params,
                    })
                })
                .collect::<Result<Vec<_>>>()
        });
        let layout = CpLayout::new(0, 2).unwrap();
        for (i, (inp, w)) in inputs.iter().zip(&want).enumerate() {
            let what = format!("{spec} {} cp=2 {ty}", inp.name);
            let ys: Vec<Tensor> = out.iter().map(|o| o[i].y.clone()).collect();
            let dxs: Vec<Tensor> = out.iter().map(|o| o[i].dx.clone()).collect();
            check(
                &format!("{what} output"),
                &layout.unsplit(&ys, inp.cu()).unwrap(),
                &w.y.clone().reshape(inp.x.shape()).unwrap(),
                TOL_OUT,
            );
            check(
                &format!("{what} grad_input"),
                &layout.unsplit(&dxs, inp.cu()).unwrap(),
                &w.dx.clone().reshape(inp.x.shape()).unwrap(),
                TOL_GRAD,
            );
            for (r, o) in out.iter().enumerate() {
                assert_eq!(
                    o[i].params.keys().collect::<Vec<_>>(),
                    w.params.keys().collect::<Vec<_>>(),
                    "{what} rank {r}: parameter names"
                );
                for (name, t) in &o[i].params {
                    let tol = if name.starts_with("core_attention") {
                        TOL_SINKS
                    } else {
                        TOL_GRAD
                    };
                    check(&format!("{what} rank {r} {name}"), t, &w.params[name], tol);
                }
            }
        }
    }
}

/// Padded b = 2 and b = 1 (several 128-row tiles per chunk) and packed (three sequences).
fn standard_inputs<'a>(h: usize, f16: bool, seed: u64, cu: &'a [i32]) -> Vec<Input<'a>> {
    let mut rng = SplitMix64::new(seed);
    let t = *cu.last().unwrap() as usize;
    let mut pair = |shape: &[usize]| (rand_t(&mut rng, shape, f16), rand_t(&mut rng, shape, f16));
    let (x2, dy2) = pair(&[96, 2, h]);
    let (x1, dy1) = pair(&[512, 1, h]);
    let (xp, dyp) = pair(&[t, h]);
    vec![
        Input {
            name: "padded b=2",
            x: x2,
            dy: dy2,
            args: ForwardArgs::default(),
        },
        Input {
            name: "padded b=1",
            x: x1,
            dy: dy1,
            args: ForwardArgs::default(),
        },
        Input {
            name: "packed",
            x: xp,
            dy: dyp,
            args: packed_args(cu),
        },
    ]
}

/// Three sequences: 96, 264 and 128 tokens (multiples of 2 cp = 4).
const CU: [i32; 4] = [0, 96, 360, 488];

#[test]
#[ignore = "requires a CUDA GPU"]
fn cp2_backward_causal_gqa_rope_matches_one_gpu() {
    cp_case(
        SPEC,
        1,
        &standard_inputs(512, false, 2, &CU),
        BackwardOptions::default(),
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cp2_backward_no_mask_delayed_wgrad_deterministic_matches_one_gpu() {
    let spec = "self, heads=8, gqa=2, head_dim=64, hidden=512, qkv_bias, rope, mask=no_mask";
    cp_case(
        spec,
        3,
        &standard_inputs(512, false, 4, &CU),
        BackwardOptions {
            delay_wgrad: true,
            deterministic: true,
            ..Default::default()
        },
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cp2_backward_sliding_window_sinks_and_gate_match_one_gpu() {
    // A window of 100 keys crosses chunk borders: p2p / all_gather need Band launches.
    let spec = "self, heads=8, gqa=4, head_dim=64, hidden=512, qk_layernorm=rms, rope, \
                window=(100, 0), sinks=learnable, output_gate, mask=causal";
    cp_case(
        spec,
        5,
        &standard_inputs(512, false, 6, &CU),
        BackwardOptions::default(),
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cp2_backward_two_sided_window_off_by_one_sinks_f16_hd128_matches_one_gpu() {
    let spec = "self, heads=4, gqa=2, head_dim=128, hidden=512, dtype=f16, \
                window=(40, 24), sinks=off_by_one, mask=no_mask";
    cp_case(
        spec,
        7,
        &standard_inputs(512, true, 8, &CU),
        BackwardOptions::default(),
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cp2_backward_bad_inputs_are_typed_errors() {
    let full = layer(SPEC, 11);
    let mut rng = SplitMix64::new(12);
    let x = rand_t(&mut rng, &[64, 1, 512], false);
    let errs = two_gpus(|_, dev, c| {
        let l = CpCudaLayer::new(CudaLayer::new(&full, &dev)?, c, CpCommType::P2p)?;
        let layout = *l.layout();
        let be = l.inner().backend();
        let xd = be.upload(&layout.split(&x, None)?)?;
        // Selective recompute is refused before anything runs.
        let e1 = l
            .forward_train_device(
                &xd,
                &ForwardArgs::default(),
                &TrainOptions {
                    recompute: Recompute::CoreAttention,
                },
            )
            .unwrap_err();
        let (_, mut saved) =
            l.forward_train_device(&xd, &ForwardArgs::default(), &TrainOptions::default())?;
        // A grad_output of another row count.
        let bad = be.upload(&Tensor::zeros(&[8, 512]))?;
        let e2 = l
            .backward_device(&mut saved, &bad, &BackwardOptions::default())
            .unwrap_err();
        // backward_dw before a delayed backward.
        let e3 = l.backward_dw_device(&mut saved).unwrap_err();
        Ok((e1, e2, e3))
    });
    for (e1, e2, e3) in errs {
        assert!(
            matches!(&e1, AttnError::InvalidArgument { arg, .. } if arg == "recompute"),
            "{e1}"
        );
        assert!(
            matches!(&e2, AttnError::Shape { arg, .. } if arg == "grad_output"),
            "{e2}"
        );
        assert!(matches!(e3, AttnError::TrainState { .. }), "{e3}");
    }
}
