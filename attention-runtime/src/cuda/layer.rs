//! [`CudaLayer`]: any [`AttentionLayer`] on a CUDA GPU.
//!
//! Self-attention: `linear_qkv` (cuBLASLt, bias fused) -> `qkv_prep` kernel (GQA-interleaved
//! split, q/k norm, rope at explicit positions with mscale, output-gate split) -> prefill
//! kernel (`prefill_*_sm80` where the GPU runs it, else `prefill_rows`; padded `[s, b]` or
//! packed cu_seqlens, every mask type, window, bias, sinks, gate) ->
//! `linear_proj` (cuBLASLt; its bias returned unadded).
//!
//! Cross-attention: `linear_q(hidden)`, `linear_kv(context)` -> `qkv_prep` (cross layout:
//! per head `[k_h | v_h]`) -> `prefill_*_sm80` / `prefill_rows` -> `linear_proj`.
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
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig};
use half::{bf16, f16};

use super::launch::{kernel, launch_err, select_forward};
use super::linear::{linear_kv, linear_proj_into, linear_q, linear_qkv_into, DeviceLinear};
use super::params::{
    fwd_launch_config, launch as launch_params, AppendParams, FwdParams, PrepParams,
};
use super::prefill_sm80::launch_prefill;
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
    /// Pinned `decode_splitkv` split count of eager decode (0: chosen per step).
    decode_splits: AtomicUsize,
    /// Decode-step plans, reused across steps (see [`decode_step`]).
    decode_plans: std::sync::Mutex<Vec<decode_step::DecodePlan>>,
    /// QK-Clip's running max-logit record, f32 `[np]` on the device (`None`: no training
    /// forward since the last clip); see [`qk_clip`].
    qk_record: std::sync::Mutex<Option<CudaSlice<f32>>>,
}

mod cp;
mod cp_decode;
mod cross_cache;
mod decode_step;
mod forward;
mod kv_step;
mod paged;
mod prefill;
mod qk_clip;
mod train;

pub(crate) use cp::{f32_zeros, CpAcc, CpAttnKernel, CpBwdIn, CpLaunch, CpQkv};
pub(crate) use train::CudaCoreHook;
pub use train::CudaSaved;

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

/// The registry target of `ctx`'s GPU: its SM version, opt-in shared memory per block, and
/// whether the Hopper kernels may run. Shared by the layer and the backward launcher.
pub(crate) fn device_target(ctx: &Arc<cudarc::driver::CudaContext>) -> Result<Target> {
    let (major, minor) = ctx.compute_capability().map_err(|e| AttnError::Cuda {
        call: "cuDeviceGetAttribute compute capability".into(),
        msg: e.to_string(),
    })?;
    let optin = ctx
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
        // Hopper's wgmma kernels (`prefill_*_sm90`): the runtime compiles for sm_90a on an
        // sm_90 device; ATTN_DISABLE_SM90 (any value but empty or 0) keeps it on sm80.
        wgmma: (major, minor) == (9, 0) && !sm90_disabled(),
    })
}

/// Whether `ATTN_DISABLE_SM90` asks to keep Hopper on the `prefill_*_sm80` kernels.
pub fn sm90_disabled() -> bool {
    std::env::var("ATTN_DISABLE_SM90").is_ok_and(|v| !v.is_empty() && v != "0")
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
        // Every submodule must have a CUDA implementation (a user override without one is
        // an error here, before the device is touched).
        let sd: HashMap<String, Tensor> = layer.parts().cuda_state_dict("")?.into_iter().collect();
        let rt = CudaRuntime::get(device)?;
        let elem = ElemType::from(config.dtype);
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
        let target = device_target(&rt.device().context)?;
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
            qk_record: std::sync::Mutex::new(None),
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

    /// Queue this layer's work on `rt` from now on: a runtime of the same device, usually on
    /// a caller's stream ([`CudaRuntime::with_stream`]). Weights stay where they are (their
    /// uses are ordered across streams by cudarc's events); decode plans made for the old
    /// runtime are dropped and remade on the next step (captured graphs keep their own).
    ///
    /// Errors: `InvalidArgument` (`rt`) for a runtime of another device.
    pub fn set_runtime(&mut self, rt: Arc<CudaRuntime>) -> Result<()> {
        if rt.device().ordinal != self.rt.device().ordinal {
            return Err(bad(
                "rt",
                format!("a runtime of device {}", self.rt.device().ordinal),
                format!("device {}", rt.device().ordinal),
            ));
        }
        self.rt = rt;
        self.decode_plans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        Ok(())
    }

    /// Errors unless `t` is on this layer's device (`InvalidArgument` naming `arg`, both
    /// devices) and holds the layer's dtype (`DType`).
    pub(crate) fn check_input(&self, arg: &str, t: &DeviceTensor) -> Result<()> {
        let mine = &self.rt.device().context;
        if t.context().ordinal() != mine.ordinal() {
            return Err(bad(
                arg,
                format!("a tensor on CUDA device {}", mine.ordinal()),
                format!("a tensor on CUDA device {}", t.context().ordinal()),
            ));
        }
        if t.elem() != self.elem {
            return Err(AttnError::DType {
                arg: arg.into(),
                expected: self.elem.name().into(),
                got: t.elem().name().into(),
            });
        }
        Ok(())
    }

    /// The element type of its weights and activations (the spec's dtype).
    pub fn elem(&self) -> ElemType {
        self.elem
    }

    /// `linear_proj`'s bias `[h]` (host copy), which every call returns unadded.
    pub fn output_bias(&self) -> Option<&Tensor> {
        self.proj_bias_host.as_ref()
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

    /// The tensor-core kernel for a forward ([`registry::prefill_tensor_core`]: `prefill_*_sm90`
    /// on Hopper where it exists, else the FlashAttention-2 style `prefill_*_sm80` on sm_80+
    /// when its tile's shared memory fits; otherwise the general `prefill_rows` kernel runs):
    /// every mask (padding / arbitrary mask tensors included), window, sinks, additive bias and
    /// output gate.
    fn fast_config(&self, fcfg: &KernelConfig) -> Option<KernelConfig> {
        registry::prefill_tensor_core(fcfg, self.target)
    }

    /// The tensor-core forward config of attention over a static cache (prefill): the
    /// layer's forward kernel with the bottom-right causal mask, no mask tensor or bias;
    /// `None` when its tile does not fit this GPU (prefill then runs the `decode_rows` kernel).
    pub fn cache_prefill_config(&self) -> Option<KernelConfig> {
        registry::cache_prefill(&self.config.spec, self.config.head_dim, self.target)
    }

    /// The tensor-core config of a paged mixed batch ([`forward_paged`](Self::forward_paged)):
    /// the forward kernel reading K/V through the block table; `None` when this GPU cannot
    /// run it (the one-warp-per-row `decode_rows_paged` kernel runs then).
    pub fn paged_prefill_config(&self) -> Option<KernelConfig> {
        registry::paged_prefill(&self.config.spec, self.config.head_dim, self.target)
    }

    /// The split-KV decode config of a paged mixed batch's decode rows
    /// ([`registry::decode_splitkv_paged`]: `decode_splitkv` in its paged mode); `None` when this
    /// GPU cannot run it (the decode rows then run on the prefill kernel).
    pub fn paged_decode_config(&self) -> Option<KernelConfig> {
        registry::decode_splitkv_paged(&self.config.spec, self.config.head_dim, self.target)
    }

    /// [`paged_decode_config`](Self::paged_decode_config) for decode requests of up to
    /// `tokens` new tokens ([`registry::decode_splitkv_paged_rows`]: the row-block variant
    /// for the heads per group times `tokens` rows).
    pub fn paged_decode_config_for(&self, tokens: usize) -> Option<KernelConfig> {
        let c = &self.config;
        let rows = c.heads / c.groups.max(1) * tokens.max(1);
        registry::decode_splitkv_paged_rows(&c.spec, c.head_dim, rows, self.target)
    }

    /// Load an attention kernel: [`load_prefill_sm80`](Self::load_prefill_sm80) for a
    /// `prefill_sm80` config, [`kernel`] otherwise.
    fn load_attention(&self, c: &KernelConfig) -> Result<(String, cudarc::driver::CudaFunction)> {
        if matches!(c.phase, Phase::PrefillSm80 | Phase::PrefillSm90) {
            self.load_prefill_sm80(c)
        } else {
            kernel(&self.rt, c)
        }
    }

    /// The spec's sliding window as kernel arguments (`-1, -1` without one).
    fn window(&self) -> Result<(i32, i32)> {
        match self.config.window {
            Some(w) => Ok((to_i32("window", w.left)?, to_i32("window", w.right)?)),
            None => Ok((-1, -1)),
        }
    }

    /// Load a `prefill_sm80` kernel and allow its dynamic shared memory.
    fn load_prefill_sm80(
        &self,
        c: &KernelConfig,
    ) -> Result<(String, cudarc::driver::CudaFunction)> {
        let (key, f) = kernel(&self.rt, c)?;
        let smem = c.prefill_smem_bytes();
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

    /// The general forward kernel of a call ([`registry::prefill_rows`]).
    fn fwd_config(&self, args: &ForwardArgs<'_>) -> KernelConfig {
        registry::prefill_rows(
            &self.config.spec,
            self.config.head_dim,
            args.mask_type.unwrap_or(self.config.mask),
            args.attention_bias.is_some(),
        )
    }
}
