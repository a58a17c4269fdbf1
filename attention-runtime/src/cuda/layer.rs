//! [`CudaLayer`]: any [`AttentionLayer`] on a CUDA GPU.
//!
//! Self-attention: `linear_qkv` (cuBLASLt, bias fused) -> `qkv_prep` kernel (GQA-interleaved
//! split, q/k norm, rope at explicit positions with mscale, output-gate split) -> `fwd` kernel
//! (padded `[s, b]` or packed cu_seqlens, every mask type, window, bias, sinks, gate) ->
//! `linear_proj` (cuBLASLt; its bias returned unadded).
//!
//! Cross-attention: `linear_q(hidden)`, `linear_kv(context)` -> `qkv_prep` (cross layout:
//! per head `[k_h | v_h]`) -> `fwd` -> `linear_proj`.
//!
//! Kernels are rendered from the layer's spec for its config's head dim and compiled by
//! NVRTC for the device's exact arch on first use, then cached per device
//! ([`launch::kernel`](super::launch::kernel)). Activations and weights use the spec's dtype
//! (bf16 or f16); norms, softmax and rope run in f32 inside the kernels.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use attention_codegen::registry::{self, Target};
use attention_codegen::render::{KernelConfig, Phase};
use attention_codegen::{AttentionKind, MaskType, Role, Sinks, SUPPORTED_HEAD_DIMS};
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use half::{bf16, f16};

use super::launch::{kernel, launch_err, select_forward};
use super::linear::{linear_kv, linear_proj_into, linear_q, linear_qkv_into, DeviceLinear};
use super::tensor::{upload, DeviceElem, DeviceTensor, ElemType};
use super::CudaRuntime;
use super::DeviceStaticKvCache;
use crate::config::LayerConfig;
use crate::device::CudaDevice;
use crate::error::{AttnError, Result};
use crate::layer::{AttentionLayer, ForwardArgs, LayerOutput};
use crate::modules::check_cu_seqlens;
use crate::tensor::Tensor;

/// The layer's projections on the device.
#[derive(Debug)]
enum Projections {
    SelfAttention {
        qkv: Box<DeviceLinear>,
    },
    CrossAttention {
        q: Box<DeviceLinear>,
        kv: Box<DeviceLinear>,
    },
}

/// A layer whose forward runs on a CUDA GPU, built from any [`AttentionLayer`] by copying its
/// parameters (its `state_dict`, Megatron names) to the device in the spec's dtype.
///
/// Inputs and outputs of [`forward`](Self::forward) are host tensors with the CPU layer's
/// layouts: hidden `[s, b, h]` (packed `[t, h]`), output the same shape, bias `[h]` unadded.
#[derive(Debug)]
pub struct CudaLayer {
    rt: Arc<CudaRuntime>,
    config: LayerConfig,
    elem: ElemType,
    proj_in: Projections,
    q_norm: (Option<DeviceTensor>, Option<DeviceTensor>),
    k_norm: (Option<DeviceTensor>, Option<DeviceTensor>),
    sinks: Option<CudaSlice<f32>>,
    proj: DeviceLinear,
    proj_bias_host: Option<Tensor>,
    /// The forward / prefill `qkv_prep` kernel ([`registry::qkv_prep`]).
    prep: KernelConfig,
    /// This device, for the registry's choice of forward kernel.
    target: Target,
    poison: AtomicBool,
    /// Pinned `flashdec` split count of eager decode (0: chosen per step).
    decode_splits: AtomicUsize,
    /// Decode-step plans, reused across steps (see [`decode_step`]).
    decode_plans: std::sync::Mutex<Vec<decode_step::DecodePlan>>,
}

mod cross_cache;
mod decode_step;

fn bad(arg: &str, expected: impl Into<String>, got: impl Into<String>) -> AttnError {
    AttnError::InvalidArgument {
        arg: arg.into(),
        expected: expected.into(),
        got: got.into(),
    }
}

fn render_err(e: attention_codegen::render::RenderError) -> AttnError {
    AttnError::Render(e.to_string())
}

/// The registry target of this GPU: its SM version and opt-in shared memory per block.
fn device_target(rt: &CudaRuntime) -> Result<Target> {
    let dev = rt.device();
    let (major, minor) = dev.compute_capability;
    let optin = dev
        .context
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )
        .map_err(|e| AttnError::Cuda {
            call: "cuDeviceGetAttribute MAX_SHARED_MEMORY_PER_BLOCK_OPTIN".into(),
            msg: e.to_string(),
        })?;
    Ok(Target::Device {
        sm: (major * 10 + minor).max(0) as u32,
        smem_optin: optin.max(0) as usize,
    })
}

/// A raw device pointer for a kernel argument (0 = null).
fn dptr<T>(s: &CudaSlice<T>, rt: &CudaRuntime) -> u64 {
    let (p, _sync) = s.device_ptr(rt.stream());
    p
}

fn tptr(t: &DeviceTensor, rt: &CudaRuntime) -> u64 {
    match t.data() {
        super::DeviceData::Bf16(s) => dptr(s, rt),
        super::DeviceData::F16(s) => dptr(s, rt),
        super::DeviceData::F32(s) => dptr(s, rt),
    }
}

fn opt_ptr(t: Option<&DeviceTensor>, rt: &CudaRuntime) -> u64 {
    t.map_or(0, |t| tptr(t, rt))
}

/// [`crate::tensor::broadcast_strides`] as the kernels' i64 strides.
fn bcast_strides(arg: &str, shape: &[usize], target: [usize; 4]) -> Result<[i64; 4]> {
    Ok(crate::tensor::broadcast_strides(arg, shape, target)?.map(|s| s as i64))
}

fn to_i32(arg: &str, v: i64) -> Result<i32> {
    i32::try_from(v).map_err(|_| bad(arg, "a value that fits in int32", v.to_string()))
}

/// Sequence geometry of one forward.
struct Geometry {
    /// Rows (tokens) of the queries and the keys.
    nq: usize,
    nk: usize,
    /// `batch` argument: b (padded) or the number of sequences (packed).
    batch: usize,
    /// `seqlen_q` / `seqlen_k` (padded), longest sequences (packed).
    sq: usize,
    sk: usize,
    /// Device cu_seqlens (packed only).
    cu_q: Option<CudaSlice<i32>>,
    cu_k: Option<CudaSlice<i32>>,
}

impl CudaLayer {
    /// Copy `layer`'s parameters to `device` and prepare its kernels' configs.
    ///
    /// Errors: [`AttnError::MissingWeight`] when the layer's `state_dict` lacks a parameter
    /// (a user submodule that does not expose its weights), [`AttnError::WeightShape`],
    /// [`AttnError::InvalidArgument`] for a head dim the kernels do not support,
    /// [`AttnError::Render`], [`AttnError::DeviceAlloc`].
    pub fn new(layer: &dyn AttentionLayer, device: &CudaDevice) -> Result<Self> {
        let config = layer.config().clone();
        let hd = config.head_dim;
        if !SUPPORTED_HEAD_DIMS.contains(&hd) {
            return Err(bad(
                "head_dim",
                format!("one of {SUPPORTED_HEAD_DIMS:?} on CUDA"),
                hd.to_string(),
            ));
        }
        let rt = CudaRuntime::get(device)?;
        let elem = ElemType::from(config.dtype);
        let sd: HashMap<String, Tensor> = layer.state_dict("").into_iter().collect();
        let get = |key: String, shape: &[usize]| -> Result<Tensor> {
            let t = sd.get(&key).ok_or_else(|| AttnError::MissingWeight {
                key: key.clone(),
                source_name: "the layer's state_dict".into(),
            })?;
            if t.shape() != shape {
                return Err(AttnError::WeightShape {
                    key,
                    expected: shape.to_vec(),
                    got: t.shape().to_vec(),
                });
            }
            Ok(t.clone())
        };
        let st = rt.stream().clone();
        let linear = |role: Role, out: usize, inp: usize, has_bias: bool| -> Result<DeviceLinear> {
            let w = get(format!("{}.weight", role.name()), &[out, inp])?;
            let b = has_bias
                .then(|| get(format!("{}.bias", role.name()), &[out]))
                .transpose()?;
            DeviceLinear::from_host(&st, role.name(), &w, b.as_ref(), elem)
        };
        let (np, hn, h) = (config.heads, hd, config.hidden);
        let is_self = config.kind == AttentionKind::SelfAttention;
        let proj_in = if is_self {
            Projections::SelfAttention {
                qkv: Box::new(linear(
                    Role::LinearQkv,
                    config.qkv_out_features(),
                    h,
                    config.qkv_bias,
                )?),
            }
        } else {
            Projections::CrossAttention {
                q: Box::new(linear(Role::LinearQ, np * hn, h, config.qkv_bias)?),
                kv: Box::new(linear(Role::LinearKv, 2 * np * hn, h, config.qkv_bias)?),
            }
        };
        let proj = linear(Role::LinearProj, h, np * hn, config.proj_bias)?;
        let proj_bias_host = config
            .proj_bias
            .then(|| get(format!("{}.bias", Role::LinearProj.name()), &[h]))
            .transpose()?;
        let norm = |role: Role| -> Result<(Option<DeviceTensor>, Option<DeviceTensor>)> {
            use attention_codegen::QkNorm;
            let Some(kind) = config.qk_norm.filter(|_| is_self) else {
                return Ok((None, None));
            };
            let w = (kind != QkNorm::L2)
                .then(|| get(format!("{}.weight", role.name()), &[hn]))
                .transpose()?;
            let b = (kind == QkNorm::Layer)
                .then(|| get(format!("{}.bias", role.name()), &[hn]))
                .transpose()?;
            Ok((
                w.map(|w| DeviceTensor::from_host(&st, &w, elem))
                    .transpose()?,
                b.map(|b| DeviceTensor::from_host(&st, &b, elem))
                    .transpose()?,
            ))
        };
        let q_norm = norm(Role::QLayernorm)?;
        let k_norm = norm(Role::KLayernorm)?;
        let sinks = if config.sinks == Some(Sinks::Learnable) {
            let t = get(
                format!("{}.softmax_offset", Role::CoreAttention.name()),
                &[np],
            )?;
            Some(upload(&st, t.data(), "core_attention.softmax_offset")?)
        } else {
            None
        };
        let target = device_target(&rt)?;
        // Every config the layer builds comes from the registry's per-family functions; asking
        // for the whole list here reports a spec the kernels cannot serve at construction.
        registry::kernels_for(&config.spec, hd, target).map_err(render_err)?;
        let prep = registry::qkv_prep(&config.spec, hd).map_err(render_err)?;
        Ok(CudaLayer {
            rt,
            config,
            elem,
            proj_in,
            q_norm,
            k_norm,
            sinks,
            proj,
            proj_bias_host,
            prep,
            target,
            poison: AtomicBool::new(false),
            decode_splits: AtomicUsize::new(0),
            decode_plans: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// When on, every intermediate and output buffer of a forward is filled with NaN before
    /// the GEMM or kernel that should write it runs, so an element left unwritten shows up
    /// as NaN in the output (tests use this; it costs one extra copy per buffer).
    pub fn set_poison_outputs(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    fn alloc(&self, shape: &[usize], arg: &str) -> Result<DeviceTensor> {
        let mut t = DeviceTensor::uninit(self.rt.stream(), self.elem, shape, arg)?;
        if self.poison.load(Ordering::Relaxed) {
            t.fill_nan()?;
        }
        Ok(t)
    }

    /// The resolved config.
    pub fn config(&self) -> &LayerConfig {
        &self.config
    }

    /// The device runtime (stream, cuBLASLt, kernel cache).
    pub fn runtime(&self) -> &Arc<CudaRuntime> {
        &self.rt
    }

    /// The key of the forward kernel a call with `args` uses.
    pub fn forward_kernel_key(&self, args: &ForwardArgs<'_>) -> String {
        let fcfg = self.fwd_config(args);
        self.fast_config(&fcfg).unwrap_or(fcfg).key()
    }

    /// The FlashAttention-2 style kernel (`fwdfast_*`) for a forward: every mask (padding /
    /// arbitrary mask tensors included), window, sinks, additive bias and output gate, when
    /// this GPU runs it ([`registry::fast_forward`]: sm_80+ and the tile's shared memory
    /// fits; otherwise the general `fwd` kernel runs).
    fn fast_config(&self, fcfg: &KernelConfig) -> Option<KernelConfig> {
        registry::fast_forward(fcfg, self.target)
    }

    /// The tensor-core forward config of attention over a static cache (prefill): the
    /// layer's forward kernel with the bottom-right causal mask, no mask tensor or bias;
    /// `None` when its tile does not fit this GPU (prefill then runs the `decode` kernel).
    pub fn cache_prefill_config(&self) -> Option<KernelConfig> {
        registry::cache_prefill(&self.config.spec, self.config.head_dim, self.target)
    }

    /// The tensor-core config of a paged mixed batch ([`forward_paged`](Self::forward_paged)):
    /// the forward kernel reading K/V through the block table; `None` when this GPU cannot
    /// run it (the one-warp-per-row `paged` kernel runs then).
    pub fn paged_prefill_config(&self) -> Option<KernelConfig> {
        registry::paged_prefill(&self.config.spec, self.config.head_dim, self.target)
    }

    /// Load a `fwdfast` kernel and allow its dynamic shared memory.
    fn load_fast(&self, c: &KernelConfig) -> Result<(String, cudarc::driver::CudaFunction)> {
        let (key, f) = kernel(&self.rt, c)?;
        let smem = c.fast_tile().smem_bytes(c.head_dim);
        if smem > 48 * 1024 {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| AttnError::Cuda {
                call: format!("cuFuncSetAttribute max dynamic shared memory {key}"),
                msg: e.to_string(),
            })?;
        }
        Ok((key, f))
    }

    /// The key of the `qkv_prep` kernel.
    pub fn prep_kernel_key(&self) -> String {
        self.prep.key()
    }

    /// The general forward kernel of a call ([`registry::forward`]).
    fn fwd_config(&self, args: &ForwardArgs<'_>) -> KernelConfig {
        registry::forward(
            &self.config.spec,
            self.config.head_dim,
            args.mask_type.unwrap_or(self.config.mask),
            args.attention_bias.is_some(),
        )
    }

    /// Forward on the GPU with host tensors in and out; same contract and errors as the CPU
    /// layer's `forward` (`hidden` `[s, b, h]`, or `[t, h]` with `args.packed`; returns the
    /// output of the same shape and `linear_proj`'s bias unadded).
    pub fn forward(&self, hidden: &Tensor, args: &ForwardArgs<'_>) -> Result<LayerOutput> {
        let x = DeviceTensor::from_host(self.rt.stream(), hidden, self.elem)?;
        let (y, _) = self.forward_device(&x, args)?;
        let out = y.to_host()?.reshape(hidden.shape())?;
        Ok(LayerOutput {
            output: out,
            bias: self.proj_bias_host.clone(),
        })
    }

    /// Forward over device-resident hidden states (`[s, b, h]` or packed `[t, h]`, in the
    /// spec's dtype). Returns the output `[rows, h]` (rows = `s * b` or `t`) in the spec's
    /// dtype, and `linear_proj`'s device bias `[h]`.
    ///
    /// Asynchronous: the work is queued on the runtime's stream ([`CudaRuntime::stream`]) and
    /// nothing waits for it; read the output (`to_host`) or synchronize to wait. Host-side
    /// checks fail before anything is queued; a fault of a queued kernel surfaces at the next
    /// synchronizing call as [`AttnError::Cuda`]. Mask, bias, positions and context tensors
    /// in `args` are host tensors, uploaded per call (small per-step metadata).
    pub fn forward_device(
        &self,
        hidden: &DeviceTensor,
        args: &ForwardArgs<'_>,
    ) -> Result<(DeviceTensor, Option<&DeviceTensor>)> {
        match self.elem {
            ElemType::Bf16 => self.forward_typed::<bf16>(hidden, args),
            ElemType::F16 => self.forward_typed::<f16>(hidden, args),
            ElemType::F32 => Err(AttnError::DType {
                arg: "spec dtype".into(),
                expected: "bf16 or f16".into(),
                got: "f32".into(),
            }),
        }
    }

    fn geometry(
        &self,
        hidden: &DeviceTensor,
        ctx: Option<&DeviceTensor>,
        args: &ForwardArgs<'_>,
    ) -> Result<Geometry> {
        let h = self.config.hidden;
        let packed = args.packed.is_some();
        let shape_of = |arg: &str, t: &DeviceTensor| -> Result<(usize, usize, usize)> {
            match (t.shape(), packed) {
                ([s, b, hh], false) if *hh == h => Ok((s * b, *s, *b)),
                ([t, hh], true) if *hh == h => Ok((*t, *t, 1)),
                (s, _) => Err(AttnError::Shape {
                    arg: arg.into(),
                    expected: if packed {
                        format!("[t, {h}] (packed)")
                    } else {
                        format!("[s, b, {h}]")
                    },
                    got: s.to_vec(),
                }),
            }
        };
        let (nq, sq, b) = shape_of("hidden", hidden)?;
        let (nk, sk, bk) = match ctx {
            Some(c) => shape_of("key_value_states", c)?,
            None => (nq, sq, b),
        };
        if bk != b {
            return Err(AttnError::Shape {
                arg: "key_value_states".into(),
                expected: format!("[sk, {b}, {h}]"),
                got: ctx.map(|c| c.shape().to_vec()).unwrap_or_default(),
            });
        }
        match &args.packed {
            None => Ok(Geometry {
                nq,
                nk,
                batch: b,
                sq,
                sk,
                cu_q: None,
                cu_k: None,
            }),
            Some(pk) => {
                let cq = check_cu_seqlens("cu_seqlens_q", pk.cu_seqlens_q, nq)?;
                let cu_kv: &[i32] = if ctx.is_none() {
                    if !pk.cu_seqlens_kv.is_empty() && pk.cu_seqlens_kv != pk.cu_seqlens_q {
                        return Err(AttnError::CuSeqlens {
                            arg: "cu_seqlens_kv".into(),
                            expected: "equal to cu_seqlens_q (or empty) for self-attention".into(),
                            got: pk.cu_seqlens_kv.iter().map(|&x| x as i64).collect(),
                        });
                    }
                    pk.cu_seqlens_q
                } else {
                    pk.cu_seqlens_kv
                };
                let ck = check_cu_seqlens("cu_seqlens_kv", cu_kv, nk)?;
                if cq.len() != ck.len() {
                    return Err(AttnError::CuSeqlens {
                        arg: "cu_seqlens_kv".into(),
                        expected: format!("{} entries, as cu_seqlens_q", cq.len()),
                        got: cu_kv.iter().map(|&x| x as i64).collect(),
                    });
                }
                let n = cq.len() - 1;
                let mq = (0..n).map(|s| cq[s + 1] - cq[s]).max().unwrap_or(0);
                let mk = (0..n).map(|s| ck[s + 1] - ck[s]).max().unwrap_or(0);
                Ok(Geometry {
                    nq,
                    nk,
                    batch: n,
                    sq: mq.max(pk.max_seqlen_q),
                    sk: mk.max(pk.max_seqlen_kv),
                    cu_q: Some(upload(self.rt.stream(), pk.cu_seqlens_q, "cu_seqlens_q")?),
                    cu_k: Some(upload(self.rt.stream(), cu_kv, "cu_seqlens_kv")?),
                })
            }
        }
    }

    /// Rope position of every query row, as the CPU layer computes them.
    fn positions(&self, g: &Geometry, args: &ForwardArgs<'_>) -> Result<Vec<i32>> {
        let packed = args.packed.is_some();
        let s = if packed { g.nq } else { g.sq };
        let b = if packed { 1 } else { g.batch };
        let pos: Vec<i64> = match (args.positions, &args.packed) {
            (Some(p), _) if p.len() != s => {
                return Err(AttnError::Shape {
                    arg: "positions".into(),
                    expected: format!(
                        "[{s}] (one per {})",
                        if packed {
                            "packed token"
                        } else {
                            "sequence position"
                        }
                    ),
                    got: vec![p.len()],
                })
            }
            (Some(p), None) => (0..g.nq).map(|r| p[r / b]).collect(),
            (Some(p), Some(_)) => p.to_vec(),
            (None, None) => (0..g.nq).map(|r| (r / b) as i64).collect(),
            (None, Some(pk)) => {
                let mut pos = vec![0i64; g.nq];
                for w in pk.cu_seqlens_q.windows(2) {
                    for (i, t) in (w[0]..w[1]).enumerate() {
                        pos[t as usize] = i as i64;
                    }
                }
                pos
            }
        };
        pos.into_iter().map(|p| to_i32("positions", p)).collect()
    }

    fn forward_typed<T: DeviceElem>(
        &self,
        hidden: &DeviceTensor,
        args: &ForwardArgs<'_>,
    ) -> Result<(DeviceTensor, Option<&DeviceTensor>)>
    where
        cudarc::cublaslt::CudaBlasLT: cudarc::cublaslt::Matmul<T>,
    {
        let rt = &*self.rt;
        let st = rt.stream();
        let c = &self.config;
        let (np, ng, hn) = (c.heads, c.groups, c.head_dim);
        let is_self = c.kind == AttentionKind::SelfAttention;
        if hidden.elem() != self.elem {
            return Err(AttnError::DType {
                arg: "hidden".into(),
                expected: self.elem.name().into(),
                got: hidden.elem().name().into(),
            });
        }
        let ctx = match (is_self, args.key_value_states) {
            (true, Some(_)) => {
                return Err(bad(
                    "key_value_states",
                    "none for self-attention",
                    "a tensor",
                ))
            }
            (false, None) => {
                return Err(bad(
                    "key_value_states",
                    "the context [sk, b, h] for cross-attention",
                    "none",
                ))
            }
            (true, None) => None,
            (false, Some(t)) => Some(DeviceTensor::from_host(st, t, self.elem)?),
        };
        let g = self.geometry(hidden, ctx.as_ref(), args)?;
        let fcfg = self.fwd_config(args);
        let mask_type = fcfg.mask.unwrap_or(MaskType::NoMask);
        if args.attention_mask.is_some() && !mask_type.takes_mask_tensor() {
            return Err(bad(
                "attention_mask",
                "none for this mask type (only padding, padding_causal, arbitrary take a mask)",
                format!("a mask tensor with mask type {}", mask_type.name()),
            ));
        }
        if g.batch > 65535 || np > 65535 {
            return Err(bad(
                "batch / heads",
                "at most 65535 each (grid y/z limits)",
                format!("batch {} heads {np}", g.batch),
            ));
        }
        // Positions are checked (shape, int32 range) before anything is queued.
        let pos_host = if self.prep.rope.is_some() && g.nq > 0 {
            Some(self.positions(&g, args)?)
        } else {
            None
        };
        let target = [g.batch, np, g.sq, g.sk];
        // Mask: uint8 (nonzero = masked out) in the tensor's own layout, broadcast by strides.
        let (mask_buf, mask_strides) = match args.attention_mask {
            Some(m) if mask_type.takes_mask_tensor() => {
                let s = bcast_strides("attention_mask", m.shape(), target)?;
                let v: Vec<u8> = m.data().iter().map(|&x| u8::from(x != 0.0)).collect();
                (Some(upload(st, &v, "attention_mask")?), s)
            }
            _ if mask_type.takes_mask_tensor() => {
                (Some(upload(st, &[0u8], "attention_mask")?), [0; 4])
            }
            _ => (None, [0; 4]),
        };
        let (bias_buf, bias_strides) = match args.attention_bias {
            Some(bt) => {
                let s = bcast_strides("attention_bias", bt.shape(), target)?;
                (Some(upload(st, bt.data(), "attention_bias")?), s)
            }
            None => (None, [0; 4]),
        };
        let mut out = self.alloc(&[g.nq, c.hidden], "output")?;
        if g.nq == 0 {
            return Ok((out, self.proj.bias.as_ref()));
        }

        // 1. Projections.
        let (a, kv_in) = match (&self.proj_in, &ctx) {
            (Projections::SelfAttention { qkv }, _) => {
                let mut a = self.alloc(&[g.nq, qkv.out_features()], "linear_qkv output")?;
                linear_qkv_into(rt, hidden, qkv, &mut a)?;
                (a, None)
            }
            (Projections::CrossAttention { q, kv }, Some(cx)) => {
                (linear_q(rt, hidden, q)?, Some(linear_kv(rt, cx, kv)?))
            }
            (Projections::CrossAttention { .. }, None) => unreachable!("checked above"),
        };

        // 2. qkv_prep.
        let q = self.alloc(&[g.nq, np, hn], "q")?;
        let k = self.alloc(&[g.nk, ng, hn], "k")?;
        let v = self.alloc(&[g.nk, ng, hn], "v")?;
        let gate = if c.output_gate {
            Some(self.alloc(&[g.nq, np, hn], "gate")?)
        } else {
            None
        };
        let positions = match &pos_host {
            Some(p) => Some(upload(st, p, "positions")?),
            None => None,
        };
        // Raised by qkv_prep when a value it writes to v is not finite; the attention kernel
        // then takes its exact path, so junk at masked keys (padding) never reaches a row.
        let v_flag = st
            .alloc_zeros::<i32>(1)
            .map_err(super::tensor::alloc_err("v_nonfinite", 4))?;
        let p_vflag = dptr(&v_flag, rt);
        {
            let (key, f) = kernel(rt, &self.prep)?;
            let grid = if is_self { g.nq } else { g.nq.max(g.nk) };
            let cfg = LaunchConfig {
                grid_dim: (to_i32("rows", grid as i64)? as u32, 1, 1),
                block_dim: ((self.prep.warps * 32) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let p_qkv = tptr(&a, rt);
            let p_kv = opt_ptr(kv_in.as_ref(), rt);
            let (p_q, p_k, p_v) = (tptr(&q, rt), tptr(&k, rt), tptr(&v, rt));
            let p_gate = opt_ptr(gate.as_ref(), rt);
            let p_qw = opt_ptr(self.q_norm.0.as_ref(), rt);
            let p_qb = opt_ptr(self.q_norm.1.as_ref(), rt);
            let p_kw = opt_ptr(self.k_norm.0.as_ref(), rt);
            let p_kb = opt_ptr(self.k_norm.1.as_ref(), rt);
            let eps = c.eps;
            let p_pos = positions.as_ref().map_or(0, |p| dptr(p, rt));
            let base = c.rope.map_or(10000.0, |r| r.rotary_base as f32);
            let mscale = args.rope_mscale;
            let (nt, nkt) = (g.nq as i32, g.nk as i32);
            let (nh, ngr) = (np as i32, ng as i32);
            let mut b = st.launch_builder(&f);
            b.arg(&p_qkv)
                .arg(&p_kv)
                .arg(&p_q)
                .arg(&p_k)
                .arg(&p_v)
                .arg(&p_gate);
            b.arg(&p_qw).arg(&p_qb).arg(&p_kw).arg(&p_kb).arg(&eps);
            b.arg(&p_pos).arg(&base).arg(&mscale);
            b.arg(&nt).arg(&nkt).arg(&nh).arg(&ngr).arg(&p_vflag);
            // SAFETY: the argument list matches the qkv_prep entry point (render.rs docs):
            // every pointer is a live device buffer of the documented shape or null where the
            // variant ignores it; grid covers every token row.
            unsafe { b.launch(cfg) }.map_err(launch_err(&key))?;
        }

        // 3. Attention forward.
        let o = self.alloc(&[g.nq, np, hn], "attention output")?;
        let lse = super::tensor::alloc_uninit::<f32>(st, np * g.nq, "lse")?;
        let fwd_key = {
            // The fast kernel when this GPU runs it; the general one otherwise. A fast kernel
            // that fails to build falls back with a warning, except under ATTN_JIT=off, where
            // its absence from the cache is an error naming it (select_forward).
            let (chosen, kf) =
                select_forward(self.fast_config(&fcfg).as_ref(), &fcfg, |c| kernel(rt, c))?;
            let (is_fast, (key, f)) = match chosen.phase {
                Phase::ForwardFast => {
                    let c = chosen;
                    let smem = c.fast_tile().smem_bytes(hn);
                    if smem > 48 * 1024 {
                        kf.1.set_attribute(
                            cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                            smem as i32,
                        )
                        .map_err(|e| AttnError::Cuda {
                            call: format!("cuFuncSetAttribute max dynamic shared memory {}", kf.0),
                            msg: e.to_string(),
                        })?;
                    }
                    (Some(c.fast_tile()), kf)
                }
                _ => (None, kf),
            };
            let (rows, threads, smem) = match is_fast {
                Some(t) => (t.block_m, t.warps * 32, t.smem_bytes(hn)),
                None => (fcfg.warps, fcfg.warps * 32, 0),
            };
            let cfg = LaunchConfig {
                grid_dim: (
                    g.sq.div_ceil(rows).max(1) as u32,
                    np as u32,
                    g.batch.max(1) as u32,
                ),
                block_dim: (threads as u32, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let (p_q, p_k, p_v, p_o) = (tptr(&q, rt), tptr(&k, rt), tptr(&v, rt), tptr(&o, rt));
            let p_lse = dptr(&lse, rt);
            let p_cq = g.cu_q.as_ref().map_or(0, |s| dptr(s, rt));
            let p_ck = g.cu_k.as_ref().map_or(0, |s| dptr(s, rt));
            let batch = g.batch as i32;
            let (nh, ngr) = (np as i32, ng as i32);
            let (sq, sk) = (
                to_i32("seqlen_q", g.sq as i64)?,
                to_i32("seqlen_k", g.sk as i64)?,
            );
            let scale = c.softmax_scale;
            let (wl, wr) = match c.window {
                Some(w) => (to_i32("window", w.left)?, to_i32("window", w.right)?),
                None => (-1, -1),
            };
            let p_mask = mask_buf.as_ref().map_or(0, |s| dptr(s, rt));
            let p_bias = bias_buf.as_ref().map_or(0, |s| dptr(s, rt));
            let p_sinks = self.sinks.as_ref().map_or(0, |s| dptr(s, rt));
            let p_gate = opt_ptr(gate.as_ref(), rt);
            let [mb, mh, mq, mk] = mask_strides;
            let [bb, bh, bq, bk] = bias_strides;
            let mut b = st.launch_builder(&f);
            b.arg(&p_q).arg(&p_k).arg(&p_v).arg(&p_o).arg(&p_lse);
            b.arg(&p_cq).arg(&p_ck).arg(&batch).arg(&nh).arg(&ngr);
            b.arg(&sq).arg(&sk).arg(&scale).arg(&wl).arg(&wr);
            b.arg(&p_mask).arg(&mb).arg(&mh).arg(&mq).arg(&mk);
            b.arg(&p_bias).arg(&bb).arg(&bh).arg(&bq).arg(&bk);
            b.arg(&p_sinks).arg(&p_gate);
            // fwdfast_* takes the same list plus the per-head max-logit record (null: off)
            // and the v_nonfinite flag.
            let p_max_logit: u64 = 0;
            let (no_cache, zero) = (0u64, 0i32);
            if is_fast.is_some() {
                b.arg(&p_max_logit).arg(&p_vflag);
                b.arg(&no_cache).arg(&zero).arg(&zero);
                b.arg(&no_cache).arg(&zero).arg(&zero);
            }
            // SAFETY: the argument list matches the fwd / fwdfast entry point (render.rs docs); q/o/gate
            // are [nq, np, hn], k/v [nk, ng, hn] (padded rows are s-major, b-minor, as the
            // kernel indexes them), lse [np, nq], cu_seqlens [batch + 1], mask/bias broadcast
            // by the strides computed above; grid covers every (row block, head, sequence).
            unsafe { b.launch(cfg) }.map_err(launch_err(&key))?;
            key
        };

        // 4. Output projection (bias returned, not added).
        let o = o.view(&[g.nq, np * hn])?;
        let bias = linear_proj_into(rt, &o, &self.proj, &mut out)?;
        // No synchronization: the buffers below are freed in stream order (cudarc frees on
        // the stream the work was queued on), so they live until the queued kernels are done.
        tracing::trace!(
            "forward queued: {} -> {} -> linear_proj",
            self.prep.key(),
            fwd_key
        );
        drop((
            a, kv_in, q, k, v, gate, positions, lse, mask_buf, bias_buf, g, v_flag,
        ));
        Ok((out, bias))
    }
}

/// q, k, v, gate and buffers that must outlive the queued kernels.
type Prepped = (
    DeviceTensor,
    DeviceTensor,
    DeviceTensor,
    Option<DeviceTensor>,
    Vec<CudaSlice<i32>>,
);

/// Raw pointers of one `qkv_prep` launch (0 = null): `qkv [n, qkv_out]` in, q `[n, np, hn]`,
/// k/v `[n, ng, hn]`, gate `[n, np, hn]` out, int32 positions `[n]`.
struct PrepPtrs {
    qkv: u64,
    q: u64,
    k: u64,
    v: u64,
    gate: u64,
    positions: u64,
}

/// KV-cache inference on the GPU (static cache): same semantics as the CPU layer's
/// `prefill` / `decode`.
impl CudaLayer {
    /// The KV-cache kernel of `phase`, from the registry's family function.
    fn kv_config(&self, phase: Phase) -> Result<KernelConfig> {
        let (spec, hd) = (&self.config.spec, self.config.head_dim);
        match phase {
            Phase::Decode => Ok(registry::decode(spec, hd)),
            Phase::Paged => Ok(registry::paged(spec, hd)),
            Phase::PagedAppend => Ok(registry::kv_append(spec, hd)),
            Phase::FlashDecode => registry::flash_decode(spec, hd).map_err(render_err),
            p => Err(AttnError::Render(format!("`{p}` is not a KV-cache kernel"))),
        }
    }

    /// The `qkv_prep` kernel of a fused decode step (no rope: `flashdec` applies it).
    fn flash_decode_prep(&self) -> Result<KernelConfig> {
        registry::qkv_prep_for_flash_decode(&self.config.spec, self.config.head_dim)
            .map_err(render_err)
    }

    fn check_kv_step(
        &self,
        cache: &super::DeviceStaticKvCache,
        args: &ForwardArgs<'_>,
    ) -> Result<()> {
        let c = &self.config;
        if c.kind != AttentionKind::SelfAttention {
            return Err(bad(
                "config.kind",
                "self-attention for a KV-cache step",
                "cross-attention",
            ));
        }
        if args.attention_mask.is_some()
            || args.attention_bias.is_some()
            || args.packed.is_some()
            || args.key_value_states.is_some()
        {
            return Err(bad(
                "args",
                "only positions and rope_mscale for a KV-cache step",
                "mask, bias, packed or key_value_states",
            ));
        }
        if cache.groups() != c.groups || cache.head_dim() != c.head_dim {
            return Err(bad(
                "cache",
                format!("groups {} and head_dim {}", c.groups, c.head_dim),
                format!(
                    "groups {} and head_dim {}",
                    cache.groups(),
                    cache.head_dim()
                ),
            ));
        }
        // The cache's element type must be the layer's: the kernels write and read it raw.
        let kc = cache.layer_k(0)?;
        if kc.elem() != self.elem {
            return Err(AttnError::DType {
                arg: "cache".into(),
                expected: self.elem.name().into(),
                got: kc.elem().name().into(),
            });
        }
        Ok(())
    }

    /// linear_qkv + qkv_prep (`prep`, with rope at `positions` when it has rope).
    fn project_and_prep(
        &self,
        x: &DeviceTensor,
        n: usize,
        prep: &KernelConfig,
        positions: Option<&[i32]>,
        mscale: f32,
    ) -> Result<Prepped> {
        let rt = &*self.rt;
        let st = rt.stream();
        let c = &self.config;
        let (np, ng, hn) = (c.heads, c.groups, c.head_dim);
        let Projections::SelfAttention { qkv } = &self.proj_in else {
            return Err(bad("config.kind", "self-attention", "cross-attention"));
        };
        let mut a = self.alloc(&[n, qkv.out_features()], "linear_qkv output")?;
        linear_qkv_into(rt, x, qkv, &mut a)?;
        let q = self.alloc(&[n, np, hn], "q")?;
        let k = self.alloc(&[n, ng, hn], "k")?;
        let v = self.alloc(&[n, ng, hn], "v")?;
        let gate = if c.output_gate {
            Some(self.alloc(&[n, np, hn], "gate")?)
        } else {
            None
        };
        let mut keep = Vec::new();
        let p_pos = match positions {
            Some(p) if prep.rope.is_some() => {
                let buf = upload(st, p, "positions")?;
                let ptr = dptr(&buf, rt);
                keep.push(buf);
                ptr
            }
            _ => 0,
        };
        let p = PrepPtrs {
            qkv: tptr(&a, rt),
            q: tptr(&q, rt),
            k: tptr(&k, rt),
            v: tptr(&v, rt),
            gate: opt_ptr(gate.as_ref(), rt),
            positions: p_pos,
        };
        // Queued only: `a` and the positions are freed in stream order after the kernel.
        self.launch_prep(st, prep, n, &p, mscale)?;
        drop(a);
        Ok((q, k, v, gate, keep))
    }

    /// Queue the `qkv_prep` kernel `prep` over `n` rows on `stream` (raw pointers, so it
    /// can be captured in a graph). Returns the kernel key.
    fn launch_prep(
        &self,
        stream: &Arc<cudarc::driver::CudaStream>,
        prep: &KernelConfig,
        n: usize,
        p: &PrepPtrs,
        mscale: f32,
    ) -> Result<String> {
        let rt = &*self.rt;
        let c = &self.config;
        let (key, f) = kernel(rt, prep)?;
        let cfg = LaunchConfig {
            grid_dim: (to_i32("rows", n as i64)? as u32, 1, 1),
            block_dim: ((prep.warps * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let p_kv = 0u64;
        let p_qw = opt_ptr(self.q_norm.0.as_ref(), rt);
        let p_qb = opt_ptr(self.q_norm.1.as_ref(), rt);
        let p_kw = opt_ptr(self.k_norm.0.as_ref(), rt);
        let p_kb = opt_ptr(self.k_norm.1.as_ref(), rt);
        let eps = c.eps;
        let base = c.rope.map_or(10000.0, |r| r.rotary_base as f32);
        let (nt, nkt) = (n as i32, n as i32);
        let (nh, ngr) = (c.heads as i32, c.groups as i32);
        // Cache paths never read a masked key (exact per-row kernels, range-exact decode):
        // no v_nonfinite flag.
        let p_vflag = 0u64;
        let mut b = stream.launch_builder(&f);
        b.arg(&p.qkv)
            .arg(&p_kv)
            .arg(&p.q)
            .arg(&p.k)
            .arg(&p.v)
            .arg(&p.gate);
        b.arg(&p_qw).arg(&p_qb).arg(&p_kw).arg(&p_kb).arg(&eps);
        b.arg(&p.positions).arg(&base).arg(&mscale);
        b.arg(&nt).arg(&nkt).arg(&nh).arg(&ngr).arg(&p_vflag);
        // SAFETY: matches the qkv_prep entry point; the caller's buffers have the
        // documented shapes for `n` rows; positions has n entries when rope is on.
        unsafe { b.launch(cfg) }.map_err(launch_err(&key))?;
        Ok(key)
    }

    /// Pin the KV split count of eager [`decode`](Self::decode) (`None`: chosen per step
    /// from the batch, the groups and the longest sequence, see
    /// [`num_splits`](super::decode::num_splits)). A [`LayerDecodeGraph`](super::decode::LayerDecodeGraph)
    /// fixes its split count at capture; eager decode pinned to the same count gives
    /// bitwise equal results. Errors: `InvalidArgument` (`decode_splits`) outside 1..=64.
    pub fn set_decode_splits(&self, splits: Option<usize>) -> Result<()> {
        match splits {
            Some(n) if !(1..=64).contains(&n) => Err(bad(
                "decode_splits",
                "a split count in 1..=64",
                n.to_string(),
            )),
            _ => {
                self.decode_splits
                    .store(splits.unwrap_or(0), Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// Capture one decode step of this layer for `b` sequences in slots
    /// `batch_offset .. batch_offset + b` of `cache`'s layer `layer` in a CUDA graph
    /// (`linear_qkv` and `linear_proj` through cuBLASLt with their algorithms chosen before
    /// capture, `qkv_prep`, `flashdec` split + merge with rope from cos/sin tables at each
    /// slot's position, read from a device int32 array). The split count is the pinned
    /// one ([`set_decode_splits`](Self::set_decode_splits)) or the one that covers the
    /// cache's full `max_seq`. `args` takes only `rope_mscale` (no positions, masks, bias,
    /// packing or context). Nothing is written to the cache.
    ///
    /// Errors: `InvalidArgument` (`config.kind` for cross-attention, `args`, `cache` for
    /// other groups or head dim, `b` of 0), `CacheCapacity` (`max_batch`), `DType`
    /// (`cache`), `DeviceAlloc`, `Render`, `BackendUnavailable`, `Cuda`.
    pub fn capture_decode(
        &self,
        cache: &super::DeviceStaticKvCache,
        layer: usize,
        batch_offset: usize,
        b: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<super::decode::LayerDecodeGraph> {
        use super::decode::LayerDecodeGraph;
        self.check_kv_step(cache, args)?;
        if args.positions.is_some() {
            return Err(bad(
                "args.positions",
                "none for a captured decode step (each slot decodes at its own length)",
                "explicit positions",
            ));
        }
        let plan = self.plan_decode(cache, layer, batch_offset, b, args.rope_mscale)?;
        let splits = plan.max_splits;
        let (stream, graph) =
            LayerDecodeGraph::capture_on(&self.rt, |cs| self.enqueue_decode(&plan, cs, splits))?;
        let (bufs, gemms, binding) = plan.into_graph_parts();
        Ok(LayerDecodeGraph {
            rt: self.rt.clone(),
            stream,
            graph,
            bufs,
            _gemms: gemms,
            binding,
            hidden: self.config.hidden,
            splits,
            proj_bias_host: self.proj_bias_host.clone(),
            poison: self.poison.load(Ordering::Relaxed),
        })
    }

    /// Prefill (or any step of `s` tokens) over a device static cache with host tensors in
    /// and out: [`prefill_device`](Self::prefill_device) plus the copies (the read-back
    /// synchronizes). Errors as the CPU layer's `prefill`; on error nothing is written to
    /// the cache.
    pub fn prefill(
        &self,
        hidden: &Tensor,
        cache: &mut super::DeviceStaticKvCache,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<LayerOutput> {
        self.check_kv_step(cache, args)?;
        let h = self.config.hidden;
        let [s, b, hh] = hidden.shape() else {
            return Err(AttnError::Shape {
                arg: "hidden".into(),
                expected: format!("[s, b, {h}]"),
                got: hidden.shape().to_vec(),
            });
        };
        if *hh != h {
            return Err(AttnError::Shape {
                arg: "hidden".into(),
                expected: format!("[s, b, {h}]"),
                got: hidden.shape().to_vec(),
            });
        }
        cache.check_append(layer, batch_offset, *b, *s)?;
        let x = DeviceTensor::from_host(self.rt.stream(), hidden, self.elem)?;
        let out = self.prefill_device(&x, cache, layer, batch_offset, args)?;
        Ok(LayerOutput {
            output: out.to_host()?.reshape(hidden.shape())?,
            bias: self.proj_bias_host.clone(),
        })
    }

    /// Prefill (or any step of `s` tokens) over a device static cache, on device tensors and
    /// asynchronous: `hidden` `[s, b, h]` (the layer's dtype) for slots
    /// `batch_offset .. batch_offset + b`; new k/v are appended at each slot's visible length
    /// (rope positions from there, or `args.positions` `[s]`), then the tokens attend to
    /// `[0, len + s)` bottom-right causal on the tensor-core forward kernel reading the cache
    /// in place. Returns the output `[s, b, h]` (`linear_proj`'s bias unadded); commit the
    /// append with [`DeviceStaticKvCache::advance`]. Queued on the runtime's stream, nothing
    /// synchronizes (see [`forward_device`](Self::forward_device) for when errors surface).
    ///
    /// Errors (before anything is queued, the cache untouched; every kernel is loaded
    /// first): `Shape` (`hidden`, `positions`), `DType` (`hidden`, `cache`),
    /// `InvalidArgument` (cross-attention, masks/bias/packing in `args`, a cache of other
    /// groups or head dim), `CacheCapacity`, `Jit` (a kernel that cannot be loaded, e.g.
    /// `ATTN_JIT=off` and a cache without it), `DeviceAlloc`; `KernelLaunch` / `Cuda` from
    /// the device. `s == 0` or `b == 0` returns an empty `[s, b, h]` tensor.
    pub fn prefill_device(
        &self,
        hidden: &DeviceTensor,
        cache: &mut super::DeviceStaticKvCache,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<DeviceTensor> {
        self.check_kv_step(cache, args)?;
        let c = &self.config;
        let h = c.hidden;
        let [s, b, hh] = hidden.shape() else {
            return Err(AttnError::Shape {
                arg: "hidden".into(),
                expected: format!("[s, b, {h}]"),
                got: hidden.shape().to_vec(),
            });
        };
        let (s, b) = (*s, *b);
        if *hh != h {
            return Err(AttnError::Shape {
                arg: "hidden".into(),
                expected: format!("[s, b, {h}]"),
                got: hidden.shape().to_vec(),
            });
        }
        if hidden.elem() != self.elem {
            return Err(AttnError::DType {
                arg: "hidden".into(),
                expected: self.elem.name().into(),
                got: hidden.elem().name().into(),
            });
        }
        let n = s * b;
        let starts = cache.check_append(layer, batch_offset, b, s)?;
        if n == 0 {
            return self.alloc(&[s, b, h], "output");
        }
        // Resolve every kernel before anything is queued: one that cannot be loaded
        // (ATTN_JIT=off with a cache that lacks it) fails with the cache untouched.
        let append_kernel = kernel(&self.rt, &self.kv_config(Phase::PagedAppend)?)?;
        kernel(&self.rt, &self.prep)?;
        let fast = self.cache_prefill_config();
        let attn_kernel = match &fast {
            Some(fc) => self.load_fast(fc)?,
            None => kernel(&self.rt, &self.kv_config(Phase::Decode)?)?,
        };
        let positions: Vec<i32> = match args.positions {
            Some(p) if p.len() != s => {
                return Err(AttnError::Shape {
                    arg: "positions".into(),
                    expected: format!("[{s}]"),
                    got: vec![p.len()],
                })
            }
            Some(p) => (0..n)
                .map(|r| to_i32("positions", p[r / b]))
                .collect::<Result<_>>()?,
            None => (0..n)
                .map(|r| to_i32("positions", (starts[r % b] + r / b) as i64))
                .collect::<Result<_>>()?,
        };
        let rt = &*self.rt;
        let st = rt.stream();
        let (q, k, v, gate, _keep) =
            self.project_and_prep(hidden, n, &self.prep, Some(&positions), args.rope_mscale)?;
        let lens: Vec<i32> = starts.iter().map(|&l| (l + s) as i32).collect();
        let lens_d = upload(st, &lens, "seqlens_k")?;
        let (kc, vc) = (cache.layer_k(layer)?, cache.layer_v(layer)?);
        // Append (padded [s, b] rows, static layout).
        {
            let (key, f) = append_kernel;
            let (pk, pv, pkc, pvc) = (tptr(&k, rt), tptr(&v, rt), tptr(kc, rt), tptr(vc, rt));
            let (null, pl) = (0u64, dptr(&lens_d, rt));
            let (bi, ngi, one, zero) = (b as i32, c.groups as i32, 1i32, 0i32);
            let (bo, mb) = (batch_offset as i32, cache.max_batch() as i32);
            let cfg = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut lb = st.launch_builder(&f);
            lb.arg(&pk)
                .arg(&pv)
                .arg(&pkc)
                .arg(&pvc)
                .arg(&null)
                .arg(&pl)
                .arg(&null);
            lb.arg(&bi).arg(&ngi).arg(&one).arg(&zero).arg(&bo).arg(&mb);
            // SAFETY: matches the kvappend entry point; capacity validated by check_append.
            unsafe { lb.launch(cfg) }.map_err(launch_err(&key))?;
        }
        // Attention over the cache: the tensor-core forward kernel reading the cache slots
        // in place (bottom-right causal), or, when its tile does not fit this GPU, the
        // one-warp-per-row `decode` kernel (the named fallback).
        let o = self.alloc(&[n, c.heads, c.head_dim], "attention output")?;
        let lse = super::tensor::alloc_uninit::<f32>(st, c.heads * n, "lse")?;
        let (wl, wr) = match c.window {
            Some(w) => (to_i32("window", w.left)?, to_i32("window", w.right)?),
            None => (-1, -1),
        };
        let p_sinks = self.sinks.as_ref().map_or(0, |x| dptr(x, rt));
        let p_gate = opt_ptr(gate.as_ref(), rt);
        let (pq, pkc, pvc, po, plse) = (
            tptr(&q, rt),
            tptr(kc, rt),
            tptr(vc, rt),
            tptr(&o, rt),
            dptr(&lse, rt),
        );
        let pl = dptr(&lens_d, rt);
        let (bi, bo, mb) = (b as i32, batch_offset as i32, cache.max_batch() as i32);
        let (nh, ngr, sq) = (c.heads as i32, c.groups as i32, s as i32);
        let scale = c.softmax_scale;
        let (key, f) = attn_kernel;
        if let Some(fc) = fast {
            let tile = fc.fast_tile();
            let cfg = LaunchConfig {
                grid_dim: (s.div_ceil(tile.block_m) as u32, c.heads as u32, b as u32),
                block_dim: ((tile.warps * 32) as u32, 1, 1),
                shared_mem_bytes: tile.smem_bytes(c.head_dim) as u32,
            };
            let (null, zero_i, zero_l) = (0u64, 0i32, 0i64);
            let mut lb = st.launch_builder(&f);
            lb.arg(&pq).arg(&pkc).arg(&pvc).arg(&po).arg(&plse);
            lb.arg(&null).arg(&null).arg(&bi).arg(&nh).arg(&ngr);
            lb.arg(&sq).arg(&zero_i).arg(&scale).arg(&wl).arg(&wr);
            lb.arg(&null)
                .arg(&zero_l)
                .arg(&zero_l)
                .arg(&zero_l)
                .arg(&zero_l);
            lb.arg(&null)
                .arg(&zero_l)
                .arg(&zero_l)
                .arg(&zero_l)
                .arg(&zero_l);
            lb.arg(&p_sinks).arg(&p_gate).arg(&null).arg(&null);
            lb.arg(&pl).arg(&bo).arg(&mb);
            lb.arg(&null).arg(&zero_i).arg(&zero_i);
            // SAFETY: matches the fwdfast entry point in its static-cache mode (templates/
            // fwd_fast.cu): q/o/gate [s, b, np, hn], cache layer [max_seq, max_batch, ng, hn]
            // with slots batch_offset..+b, cache_seqlens_k [b] <= max_seq (check_append).
            unsafe { lb.launch(cfg) }.map_err(launch_err(&key))?;
        } else {
            let dcfg = self.kv_config(Phase::Decode)?;
            let cfg = LaunchConfig {
                grid_dim: (s.div_ceil(dcfg.warps) as u32, c.heads as u32, b as u32),
                block_dim: ((dcfg.warps * 32) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut lb = st.launch_builder(&f);
            lb.arg(&pq).arg(&pkc).arg(&pvc).arg(&po).arg(&plse).arg(&pl);
            lb.arg(&bi).arg(&bo).arg(&mb).arg(&nh).arg(&ngr).arg(&sq);
            lb.arg(&scale).arg(&wl).arg(&wr).arg(&p_sinks).arg(&p_gate);
            // SAFETY: matches the decode entry point; q/o/gate [s, b, np, hn], cache layer
            // [max_seq, max_batch, ng, hn], seqlens_k [b].
            unsafe { lb.launch(cfg) }.map_err(launch_err(&key))?;
        }
        cache.mark_appended(layer, batch_offset, b, s);
        let o = o.view(&[n, c.heads * c.head_dim])?;
        let mut out = self.alloc(&[n, h], "output")?;
        linear_proj_into(rt, &o, &self.proj, &mut out)?;
        // Freed in stream order after the queued kernels.
        drop((q, k, v, gate, lens_d, lse));
        out.view(&[s, b, h])
    }

    /// One decode step (`hidden` `[1, b, h]`, host tensors in and out) through the fused
    /// `flashdec` kernel: rope of the new q/k from cos/sin tables at each slot's own
    /// position, append, split-KV attention, LSE merge. A convenience over
    /// [`decode_device`](Self::decode_device) (the same plan and kernels, then a copy back
    /// that synchronizes). With `args.positions` it takes the [`prefill`](Self::prefill)
    /// path (explicit positions). Errors as the CPU layer's `decode`; on error nothing is
    /// written to the cache.
    pub fn decode(
        &self,
        hidden: &Tensor,
        cache: &mut super::DeviceStaticKvCache,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<LayerOutput> {
        hidden.expect_shape("hidden", &[Some(1), None, Some(self.config.hidden)])?;
        if args.positions.is_some() {
            return self.prefill(hidden, cache, layer, batch_offset, args);
        }
        self.check_kv_step(cache, args)?;
        let b = hidden.shape()[1];
        cache.check_append(layer, batch_offset, b, 1)?;
        let x = DeviceTensor::from_host(self.rt.stream(), hidden, self.elem)?;
        let out = self.decode_device(&x, cache, layer, batch_offset, args)?;
        Ok(LayerOutput {
            output: out.to_host()?.reshape(hidden.shape())?,
            bias: self.proj_bias_host.clone(),
        })
    }

    /// Mixed decode + prefill over a device paged cache, with the CPU layer's
    /// `forward_paged` semantics: `hidden` is packed `[T, h]`; request `i` owns rows
    /// `cu_seqlens_q[i] .. cu_seqlens_q[i + 1]` (decode requests first, then prefill chunks,
    /// though any order works), attends to its `seqlens_k[i]` cached keys (the new ones
    /// included, at positions `seqlens_k[i] - new_i ..`) bottom-right causal, with the
    /// spec's window, sinks and GQA. Returns `[T, h]` and `linear_proj`'s bias unadded.
    ///
    /// Launches: `linear_qkv` -> `qkv_prep` (rope at each token's own position) ->
    /// `kvappend` (rotated k and v into their pool blocks through `block_table`) -> the
    /// tensor-core forward kernel in its paged mode (every request in one launch, K/V through
    /// the block table; the one-warp-per-row `paged` kernel when its tile does not fit) ->
    /// `linear_proj`.
    ///
    /// Everything (layer, shapes, cu_seqlens, lengths, block ids, capacity, blocks shared or
    /// written by two requests) is validated and every kernel loaded on the host first: on
    /// error nothing is written. Errors: `Shape` (`hidden`), `DType` (`cache`; `hidden` for
    /// the device call), `InvalidArgument` (cross-attention, a pool of other groups or head
    /// dim, `layer`), `CuSeqlens`, `BlockId`, `CacheCapacity`, `DeviceAlloc`, `Jit`,
    /// `KernelLaunch`, `Cuda`.
    pub fn forward_paged(
        &self,
        hidden: &Tensor,
        cache: &mut super::DevicePagedKvCache,
        layer: usize,
        batch: &crate::kv_cache::PagedBatch<'_>,
    ) -> Result<LayerOutput> {
        let h = self.config.hidden;
        if !matches!(hidden.shape(), [_, hh] if *hh == h) {
            return Err(AttnError::Shape {
                arg: "hidden".into(),
                expected: format!("[t, {h}] (packed)"),
                got: hidden.shape().to_vec(),
            });
        }
        let x = DeviceTensor::from_host(self.rt.stream(), hidden, self.elem)?;
        let out = self.forward_paged_device(&x, cache, layer, batch)?;
        let output = if hidden.shape()[0] == 0 {
            Tensor::new(&[0, h], Vec::new())?
        } else {
            out.to_host()?.reshape(hidden.shape())?
        };
        Ok(LayerOutput {
            output,
            bias: self.proj_bias_host.clone(),
        })
    }

    /// [`forward_paged`](Self::forward_paged) on device tensors, asynchronous: `hidden`
    /// packed `[T, h]` in the layer's dtype; returns the output `[T, h]` (`linear_proj`'s bias
    /// unadded). Queued on the runtime's stream, nothing synchronizes (see
    /// [`forward_device`](Self::forward_device) for when errors surface); the small per-step
    /// metadata (positions, cu_seqlens, lengths, block table) is uploaded per call.
    ///
    /// Errors (before anything is queued, the pool untouched): as `forward_paged`, plus
    /// `DType` (`hidden`).
    pub fn forward_paged_device(
        &self,
        hidden: &DeviceTensor,
        cache: &mut super::DevicePagedKvCache,
        layer: usize,
        batch: &crate::kv_cache::PagedBatch<'_>,
    ) -> Result<DeviceTensor> {
        let c = &self.config;
        if hidden.elem() != self.elem {
            return Err(AttnError::DType {
                arg: "hidden".into(),
                expected: self.elem.name().into(),
                got: hidden.elem().name().into(),
            });
        }
        if c.kind != AttentionKind::SelfAttention {
            return Err(bad(
                "config.kind",
                "self-attention for a KV-cache step",
                "cross-attention",
            ));
        }
        let h = c.hidden;
        let [n, hh] = hidden.shape() else {
            return Err(AttnError::Shape {
                arg: "hidden".into(),
                expected: format!("[t, {h}] (packed)"),
                got: hidden.shape().to_vec(),
            });
        };
        let n = *n;
        if *hh != h {
            return Err(AttnError::Shape {
                arg: "hidden".into(),
                expected: format!("[t, {h}] (packed)"),
                got: hidden.shape().to_vec(),
            });
        }
        if cache.groups() != c.groups || cache.head_dim() != c.head_dim {
            return Err(bad(
                "cache",
                format!("groups {} and head_dim {}", c.groups, c.head_dim),
                format!(
                    "groups {} and head_dim {}",
                    cache.groups(),
                    cache.head_dim()
                ),
            ));
        }
        let (kc, vc) = cache.layer_kv(layer)?;
        if kc.elem() != self.elem {
            return Err(AttnError::DType {
                arg: "cache".into(),
                expected: self.elem.name().into(),
                got: kc.elem().name().into(),
            });
        }
        let reqs = cache.validate(batch, n)?;
        let table = batch.block_table;
        let (bs, max_blocks) = (cache.block_size(), table.max_blocks());
        to_i32("block_size", bs as i64)?;
        to_i32("block_table max_blocks", max_blocks as i64)?;
        to_i32("hidden rows", n as i64)?;
        if n == 0 {
            return self.alloc(&[0, h], "output");
        }
        // Resolve every kernel before anything is queued (see prefill_device).
        let append_kernel = kernel(&self.rt, &self.kv_config(Phase::PagedAppend)?)?;
        kernel(&self.rt, &self.prep)?;
        let fast = self.paged_prefill_config();
        let attn_kernel = match &fast {
            Some(fc) => self.load_fast(fc)?,
            None => kernel(&self.rt, &self.kv_config(Phase::Paged)?)?,
        };
        let mut positions = vec![0i32; n];
        for r in &reqs {
            for i in 0..r.q_len {
                positions[r.q_start + i] = (r.k_len - r.q_len + i) as i32;
            }
        }
        let max_q = reqs.iter().map(|r| r.q_len).max().unwrap_or(0);
        let nreq = reqs.len();
        let rt = &*self.rt;
        let st = rt.stream();
        let (q, k, v, gate, _keep) =
            self.project_and_prep(hidden, n, &self.prep, Some(&positions), 1.0)?;
        let cu_d = upload(st, batch.cu_seqlens_q, "cu_seqlens_q")?;
        let lens_d = upload(st, batch.seqlens_k, "seqlens_k")?;
        let table_d = upload(st, table.as_slice(), "block_table")?;
        let (p_cu, p_lens, p_table) = (dptr(&cu_d, rt), dptr(&lens_d, rt), dptr(&table_d, rt));
        let (nr, ngr, bsi, mbi) = (nreq as i32, c.groups as i32, bs as i32, max_blocks as i32);
        let (pkc, pvc) = (tptr(kc, rt), tptr(vc, rt));
        {
            let (key, f) = append_kernel;
            let (pk, pv) = (tptr(&k, rt), tptr(&v, rt));
            let zero = 0i32;
            let cfg = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut lb = st.launch_builder(&f);
            lb.arg(&pk)
                .arg(&pv)
                .arg(&pkc)
                .arg(&pvc)
                .arg(&p_cu)
                .arg(&p_lens)
                .arg(&p_table);
            lb.arg(&nr)
                .arg(&ngr)
                .arg(&bsi)
                .arg(&mbi)
                .arg(&zero)
                .arg(&zero);
            // SAFETY: matches the kvappend entry point; k/v [n, ng, hn]; cu_seqlens_q
            // [nreq + 1], seqlens_k [nreq], block_table [rows, max_blocks] with rows >= nreq;
            // every written block id was validated against the pool by `cache.validate`.
            unsafe { lb.launch(cfg) }.map_err(launch_err(&key))?;
        }
        let o = self.alloc(&[n, c.heads, c.head_dim], "attention output")?;
        let lse = super::tensor::alloc_uninit::<f32>(st, c.heads * n, "lse")?;
        let (pq, po, plse) = (tptr(&q, rt), tptr(&o, rt), dptr(&lse, rt));
        let nh = c.heads as i32;
        let scale = c.softmax_scale;
        let (wl, wr) = match c.window {
            Some(w) => (to_i32("window", w.left)?, to_i32("window", w.right)?),
            None => (-1, -1),
        };
        let p_sinks = self.sinks.as_ref().map_or(0, |x| dptr(x, rt));
        let p_gate = opt_ptr(gate.as_ref(), rt);
        let (key, f) = attn_kernel;
        if let Some(fc) = fast {
            // Every request (decode rows and prefill chunks) on the tensor-core kernel,
            // K/V through the block table.
            let tile = fc.fast_tile();
            let cfg = LaunchConfig {
                grid_dim: (
                    max_q.div_ceil(tile.block_m).max(1) as u32,
                    c.heads as u32,
                    nreq as u32,
                ),
                block_dim: ((tile.warps * 32) as u32, 1, 1),
                shared_mem_bytes: tile.smem_bytes(c.head_dim) as u32,
            };
            let (null, zero_i, zero_l) = (0u64, 0i32, 0i64);
            let mq = to_i32("max_seqlen_q", max_q as i64)?;
            let mut lb = st.launch_builder(&f);
            lb.arg(&pq).arg(&pkc).arg(&pvc).arg(&po).arg(&plse);
            lb.arg(&p_cu).arg(&null).arg(&nr).arg(&nh).arg(&ngr);
            lb.arg(&mq).arg(&zero_i).arg(&scale).arg(&wl).arg(&wr);
            lb.arg(&null)
                .arg(&zero_l)
                .arg(&zero_l)
                .arg(&zero_l)
                .arg(&zero_l);
            lb.arg(&null)
                .arg(&zero_l)
                .arg(&zero_l)
                .arg(&zero_l)
                .arg(&zero_l);
            lb.arg(&p_sinks).arg(&p_gate).arg(&null).arg(&null);
            lb.arg(&p_lens).arg(&zero_i).arg(&zero_i);
            lb.arg(&p_table).arg(&bsi).arg(&mbi);
            // SAFETY: matches the fwdfast entry point in its paged mode (templates/
            // fwd_fast.cu): q/o/gate [n, np, hn] packed by cu_seqlens_q [nreq + 1], lse
            // [np, n], pools [num_blocks, block_size, ng, hn], seqlens_k [nreq] and every
            // block id validated on the host (`cache.validate`).
            unsafe { lb.launch(cfg) }.map_err(launch_err(&key))?;
        } else if nreq > 0 {
            let pcfg = self.kv_config(Phase::Paged)?;
            let cfg = LaunchConfig {
                grid_dim: (
                    max_q.div_ceil(pcfg.warps) as u32,
                    c.heads as u32,
                    nreq as u32,
                ),
                block_dim: ((pcfg.warps * 32) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut lb = st.launch_builder(&f);
            lb.arg(&pq).arg(&pkc).arg(&pvc).arg(&po).arg(&plse);
            lb.arg(&p_cu).arg(&p_lens).arg(&p_table);
            lb.arg(&nr).arg(&nh).arg(&ngr).arg(&bsi).arg(&mbi);
            lb.arg(&scale).arg(&wl).arg(&wr).arg(&p_sinks).arg(&p_gate);
            // SAFETY: matches the paged entry point; q/o/gate [n, np, hn] packed, lse
            // [np, n], pools [num_blocks, block_size, ng, hn], lengths validated on the host.
            unsafe { lb.launch(cfg) }.map_err(launch_err(&key))?;
        }
        let o = o.view(&[n, c.heads * c.head_dim])?;
        let mut out = self.alloc(&[n, h], "output")?;
        linear_proj_into(rt, &o, &self.proj, &mut out)?;
        // Freed in stream order after the queued kernels.
        drop((q, k, v, gate, cu_d, lens_d, table_d, lse));
        Ok(out)
    }
}
