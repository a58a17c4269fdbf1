//! Training on the GPU: [`CudaLayer::forward_train_device`], [`CudaLayer::backward_device`]
//! and [`CudaLayer::backward_dw_device`], behind [`TrainLayer`](crate::backend::TrainLayer)
//! for [`CudaLayer`]. Semantics are the CPU reference's ([`crate::train`]); the CPU
//! [`TrainLayer`](crate::backend::TrainLayer) of the same layer is the oracle of the GPU
//! tests (`tests/gpu_layer_backward.rs`).
//!
//! **Forward** (self-attention; cross-attention runs `linear_q` over the hidden states and
//! `linear_kv` over the context instead, and keeps the context): `linear_qkv` (cuBLASLt) → `qkv_prep` → the tensor-core
//! forward kernel → `linear_proj`, the kernels and GEMMs of
//! [`forward_device`](CudaLayer::forward_device), so the output is bitwise the same. Saved
//! ([`Recompute::None`]): the input `x` (a copy), the `linear_qkv` output (raw q/k before
//! the norms, the gate logits), the post-rope q, k and v, the raw gate `[n, np, hn]`, the
//! ungated core output O and its LSE, and, with an output gate, the gated output that fed
//! `linear_proj`. The forward kernel applies the gate inside and writes only the gated
//! output, so a gated layer's training forward launches it twice: once gated (the output,
//! bitwise `forward_device`'s) and once in its ungated variant (O and the LSE the backward
//! needs); an elementwise gate kernel would have been cheaper but would round O before the
//! gate and change the output. [`Recompute::CoreAttention`] keeps x, the `linear_qkv`
//! output, q, k, v and the gate only, and the backward runs the forward kernel(s) again
//! (deterministic, so the gradients are bitwise those of `Recompute::None`).
//!
//! **QK-Clip**: the forward kernel raises a per-forward f32 `[np]` max-logit buffer (kept in
//! [`CudaSaved`]), and `max_logit_fold_<dtype>` raises the layer's running device record
//! from it (the first forward after a clip copies it): no host round trip per forward. The
//! clip itself is [`CudaLayer::clip_qk_device`] (module `qk_clip`).
//!
//! **Backward**: `linear_proj` dgrad (cuBLASLt, `dX = dY W`), the output gate's backward
//! (`gate_backward_<dtype>`), the attention backward ([`crate::cuda::backward`]: dq, dk, dv
//! and the learnable sinks' gradient), `qkv_prep_backward_...` (rope backward, q/k norm
//! backward with per-token parameter partials, scatter into `linear_qkv`'s GQA-interleaved
//! columns with the gate's; cross-attention: `kv_interleave_backward_<dtype>` into
//! `linear_kv`'s per-head `[k | v]` columns, dq is `linear_q`'s output gradient as is),
//! `linear_qkv` dgrad (cross: `linear_q` and `linear_kv`, `grad_key_value_states`), and the
//! weight gradients
//! (`dW = dYᵀ X`, f32 output) and column sums (`linear_qkv.bias`, the norms' parameters).
//! Kernels and keys: [`crate::cuda::train_ops`].
//!
//! **Dtypes**: `grad_input` has the layer's dtype (it feeds the previous layer's backward,
//! as the activations do); every parameter gradient is **f32** (`params`), as the CPU
//! backend returns them and an optimizer wants them. Intermediate gradients (dO, dq, dk, dv,
//! d linear_qkv output) are in the layer's dtype, as in Megatron's bf16 autograd.
//!
//! **Determinism** (the only mode): no float atomics anywhere in the backward (the attention
//! backward recomputes instead of accumulating dQ atomically; column sums and norm partials
//! reduce in fixed order; cuBLASLt GEMMs are reproducible for a shape on one GPU), so two
//! backwards of the same saved forward give bitwise-equal gradients. It costs the attention
//! backward's recomputation in the dQ kernel (see [`crate::cuda::backward`]) and f32
//! partial buffers for the sums (`rows x 4 x head_dim` for the norms).
//!
//! **Mask tensors and bias**: the forward's mask tensor (mask types `padding`,
//! `padding_causal`, `arbitrary`; uint8, broadcast by strides as in `forward_device`) and
//! additive attention bias (f32) are uploaded once by the training forward, kept with the
//! saved activations and read by the attention backward. With
//! [`BackwardOptions::want_bias_grad`] the attention backward writes the dense dS
//! `[b, np, sq, sk]` (f32) and `bias_grad_reduce_<dtype>` sums it over the bias's broadcast
//! dims in fixed order: [`LayerGrads::grad_attention_bias`] has the bias's own shape, f32.
//!
//! **Not supported** (typed errors before anything is queued): head dims outside
//! [`BACKWARD_HEAD_DIMS`](attention_codegen::render::BACKWARD_HEAD_DIMS)
//! ([`AttnError::InvalidArgument`]; head dim 80 is supported: the layer kernels pad each
//! lane's last 32-channel chunk); GPUs below sm_80; an empty input.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use attention_codegen::registry::backward_configs;
use attention_codegen::render::BACKWARD_HEAD_DIMS;

use super::forward::Geometry;
use super::*;
use crate::cuda::backward::{AttentionBackward, BwdArgs, BwdLayout};
use crate::cuda::prefill_sm80::PrefillStrided;
use crate::cuda::tensor::copy_dtod;
use crate::cuda::train_ops::{
    self, gemm_dgrad, gemm_wgrad_f32, LoadedPrepBackward, PrepBackwardKernels, QkvPrepBwdParams,
};
use crate::train::{BackwardOptions, LayerGrads, Recompute, TrainOptions};

/// Core attention computed outside the layer's own kernels, in place of them (context
/// parallelism: [`crate::parallel::CpCudaLayer`] exchanges keys and values with the other
/// ranks). Tensors are the call's rows: q and the gate `[n, np, hn]`, k and v `[n, ng, hn]`,
/// in the layer's dtype.
pub(crate) trait CudaCoreHook {
    /// Returns `linear_proj`'s input `[n, np, hn]` (gated with an output gate), the ungated
    /// output O with an output gate (`None` without one: it is the first), and an f32 LSE
    /// of `np * n` elements for [`backward`](Self::backward) (the hook's own layout).
    fn forward(
        &self,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        gate: Option<&DeviceTensor>,
    ) -> Result<(DeviceTensor, Option<DeviceTensor>, CudaSlice<f32>)>;
    /// Writes `grads` (dq, dk, dv in the layer's dtype) and, for learnable sinks, `dsinks`
    /// (f32 `[np]`) from the forward's `qkv` (q, k, v), ungated output `o`, `lse` and the
    /// output's gradient `dout`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        qkv: (&DeviceTensor, &DeviceTensor, &DeviceTensor),
        o: &DeviceTensor,
        lse: &CudaSlice<f32>,
        dout: &DeviceTensor,
        grads: (&mut DeviceTensor, &mut DeviceTensor, &mut DeviceTensor),
        dsinks: Option<&mut DeviceTensor>,
        deterministic: bool,
    ) -> Result<()>;
}

/// Core attention's forward results.
struct Core {
    /// Ungated output `[n, np, hn]`.
    o: DeviceTensor,
    /// f32 `[np, n]` natural-log LSE.
    lse: CudaSlice<f32>,
    /// Gated output (`linear_proj`'s input) with an output gate.
    gated: Option<DeviceTensor>,
}

impl Core {
    fn bytes(&self) -> usize {
        self.o.numel() * self.o.elem().size()
            + self.lse.len() * 4
            + self
                .gated
                .as_ref()
                .map_or(0, |g| g.numel() * g.elem().size())
    }
}

/// The activations the backward reads.
struct Acts {
    /// The layer input rows `[n, h]` (a copy).
    x: DeviceTensor,
    /// `linear_qkv` output `[n, W]` (self-attention).
    qkv: Option<DeviceTensor>,
    /// Cross-attention: the context rows `[nk, h]` (a copy, for `linear_kv`'s gradients).
    ctx: Option<DeviceTensor>,
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    /// Raw gate `[n, np, hn]`.
    gate: Option<DeviceTensor>,
    /// int32 `[n]` rope positions.
    positions: Option<CudaSlice<i32>>,
    /// qkv_prep's non-finite-v flag (read by the forward kernel).
    v_flag: CudaSlice<i32>,
    /// [`Recompute::None`] only.
    core: Option<Core>,
    /// The forward's mask tensor and bias, as uploaded.
    extras: Extras,
}

/// The forward's per-element tensors on the device (broadcast by strides over
/// `[batch, heads, sq, sk]`), kept for the backward.
struct Extras {
    /// uint8 mask (nonzero = masked out) with a mask type that takes one (a single zero,
    /// strides 0, when none was given).
    mask: Option<(CudaSlice<u8>, [i64; 4])>,
    /// f32 additive bias, its strides and its own shape (that of its gradient).
    bias: Option<(CudaSlice<f32>, [i64; 4], Vec<usize>)>,
}

impl Extras {
    fn bytes(&self) -> usize {
        self.mask.as_ref().map_or(0, |m| m.0.len())
            + self.bias.as_ref().map_or(0, |b| b.0.len() * 4)
    }
}

impl Acts {
    fn bytes(&self) -> usize {
        let t = |t: &DeviceTensor| t.numel() * t.elem().size();
        t(&self.x)
            + self.qkv.as_ref().map_or(0, t)
            + self.ctx.as_ref().map_or(0, t)
            + t(&self.q)
            + t(&self.k)
            + t(&self.v)
            + self.gate.as_ref().map_or(0, t)
            + self.positions.as_ref().map_or(0, |p| p.len() * 4)
            + self.core.as_ref().map_or(0, Core::bytes)
            + self.extras.bytes()
    }
}

/// A delayed weight gradient: `name.weight = dyᵀ x` (f32), `name.bias = colsum dy`.
struct PendingDw {
    name: &'static str,
    dy: DeviceTensor,
    x: DeviceTensor,
    rows: usize,
    out: usize,
    inp: usize,
    bias: bool,
}

enum Stage {
    Forward,
    PendingDw(Vec<PendingDw>),
    Done { delayed: bool },
}

fn stage_name(s: &Stage) -> &'static str {
    match s {
        Stage::Forward => "a context whose backward has not run",
        Stage::PendingDw(_) => "a context whose weight gradients are pending",
        Stage::Done { delayed: false } => {
            "a context whose backward already ran (without delay_wgrad)"
        }
        Stage::Done { delayed: true } => "a context whose backward_dw already ran",
    }
}

/// What [`CudaLayer::forward_train_device`] saves for the backward: device activations, the
/// call's geometry and kernels, the backward's state. See [`CudaLayer::forward_train_device`] for what
/// is kept in each [`Recompute`] mode.
pub struct CudaSaved {
    config: LayerConfig,
    ordinal: usize,
    /// The dtype of the layer that saved it (a layer of the same config may run another).
    elem: ElemType,
    recompute: Recompute,
    out_shape: Vec<usize>,
    /// Cross-attention: the context's shape (of `grad_key_value_states`).
    ctx_shape: Option<Vec<usize>>,
    n: usize,
    nk: usize,
    geo: Geometry,
    mask: MaskType,
    mscale: f32,
    /// The forward kernel as `forward_device` runs it (gated with an output gate).
    fwd: KernelConfig,
    /// Its ungated variant (O for the backward), with an output gate.
    fwd_ungated: Option<KernelConfig>,
    prep_bwd: PrepBackwardKernels,
    max_logit_dev: CudaSlice<f32>,
    max_logit: OnceLock<Vec<f32>>,
    acts: Option<Acts>,
    stage: Stage,
}

impl std::fmt::Debug for CudaSaved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaSaved")
            .field("recompute", &self.recompute)
            .field("out_shape", &self.out_shape)
            .field("stage", &stage_name(&self.stage))
            .field("saved_bytes", &self.saved_bytes())
            .finish()
    }
}

impl CudaSaved {
    /// Per query head the max pre-softmax logit of this forward `[np]` (`-inf` for a head
    /// that saw nothing). The layer's running QK-Clip record already took it in on the
    /// device ([`CudaLayer::max_logit_record_device`]); this per-micro-batch value is for
    /// logging or a [`crate::train::QkClip`] the caller keeps. Read back from the device on
    /// the first call (synchronizes the stream); NaN if that read fails.
    pub fn max_logit(&self) -> &[f32] {
        self.max_logit.get_or_init(|| {
            let st = self.max_logit_dev.stream();
            match st.clone_dtoh(&self.max_logit_dev) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!("reading the training forward's max logits failed: {e}");
                    vec![f32::NAN; self.config.heads]
                }
            }
        })
    }

    /// Device bytes of activations held for the backward (0 once consumed).
    pub fn saved_bytes(&self) -> usize {
        self.acts.as_ref().map_or(0, Acts::bytes)
    }

    /// The mode the forward ran in.
    pub fn recompute(&self) -> Recompute {
        self.recompute
    }

    /// Whether weight gradients wait for [`CudaLayer::backward_dw_device`].
    pub fn wgrad_pending(&self) -> bool {
        matches!(self.stage, Stage::PendingDw(_))
    }
}

/// The attention backward kernels, compiled once per device, config and state of the
/// variables that choose the fast mode's kernel.
type BwdCache = Mutex<HashMap<(usize, [String; 3], (bool, usize)), Arc<AttentionBackward>>>;

pub(crate) fn attention_backward(
    rt: &CudaRuntime,
    configs: &[KernelConfig; 3],
) -> Result<Arc<AttentionBackward>> {
    static CACHE: OnceLock<BwdCache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    // The variables that choose the fast mode's kernel are part of the key, so that they take
    // effect at each call (reading them is cheaper than querying the device).
    let key = (
        rt.device().ordinal,
        configs.clone().map(|c| c.key()),
        AttentionBackward::fast_mode_flags(),
    );
    let mut m = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(b) = m.get(&key) {
        return Ok(b.clone());
    }
    let b = Arc::new(AttentionBackward::compile(&rt.device().context, configs)?);
    m.insert(key, b.clone());
    Ok(b)
}

fn f32_tensor(
    st: &Arc<cudarc::driver::CudaStream>,
    shape: &[usize],
    poison: bool,
) -> Result<DeviceTensor> {
    let mut t = DeviceTensor::uninit(st, ElemType::F32, shape, "gradient")?;
    if poison {
        t.fill_nan()?;
    }
    Ok(t)
}

/// Arguments of one forward-kernel launch.
struct AttnLaunch<'a> {
    f: &'a (String, cudarc::driver::CudaFunction),
    cfg: &'a KernelConfig,
    q: &'a DeviceTensor,
    k: &'a DeviceTensor,
    v: &'a DeviceTensor,
    gate: Option<&'a DeviceTensor>,
    out: &'a DeviceTensor,
    lse: &'a CudaSlice<f32>,
    max_logit: Option<&'a CudaSlice<f32>>,
    v_flag: &'a CudaSlice<i32>,
    extras: &'a Extras,
}

impl CudaLayer {
    /// Queue one launch of the tensor-core forward kernel (with the forward's mask tensor
    /// and bias, if any).
    fn launch_attention_train(&self, g: &Geometry, a: AttnLaunch<'_>) -> Result<()> {
        let rt = &*self.rt;
        let c = &self.config;
        let (wl, wr) = self.window()?;
        let lc = fwd_launch_config(a.cfg, g.sq, c.heads, g.batch);
        let params = FwdParams {
            q: tptr(a.q, rt),
            k: tptr(a.k, rt),
            v: tptr(a.v, rt),
            out: tptr(a.out, rt),
            lse: dptr(a.lse, rt),
            cu_seqlens_q: g.cu_q.as_ref().map_or(0, |s| dptr(s, rt)),
            cu_seqlens_k: g.cu_k.as_ref().map_or(0, |s| dptr(s, rt)),
            batch: g.batch as i32,
            num_heads: c.heads as i32,
            num_groups: c.groups as i32,
            seqlen_q: to_i32("seqlen_q", g.sq as i64)?,
            seqlen_k: to_i32("seqlen_k", g.sk as i64)?,
            softmax_scale: c.softmax_scale,
            window_left: wl,
            window_right: wr,
            sinks: self.sinks.as_ref().map_or(0, |s| dptr(s, rt)),
            gate: opt_ptr(a.gate, rt),
            max_logit: a.max_logit.map_or(0, |m| dptr(m, rt)),
            v_nonfinite: dptr(a.v_flag, rt),
            mask: a.extras.mask.as_ref().map_or(0, |m| dptr(&m.0, rt)),
            mask_strides: a.extras.mask.as_ref().map_or([0; 4], |m| m.1),
            bias: a.extras.bias.as_ref().map_or(0, |b| dptr(&b.0, rt)),
            bias_strides: a.extras.bias.as_ref().map_or([0; 4], |b| b.1),
            ..FwdParams::default()
        };
        // SAFETY: FwdParams is the prefill_sm80 parameter layout (tests/nvrtc_params_layout.rs);
        // q/out/gate are [nq, np, hn], k/v [nk, ng, hn], lse [np, nq], max_logit [np],
        // cu_seqlens [batch + 1] (packed); mask and bias (present exactly when the config
        // reads them: forward_train_typed uploads them from the config's mask type and
        // has_bias) broadcast over [batch, np, sq, sk] by strides from bcast_strides; the
        // grid covers every (row block, head, sequence).
        unsafe {
            launch_prefill(
                rt.stream(),
                &a.f.1,
                &a.f.0,
                a.cfg,
                lc,
                &params,
                (g.nq, g.nk),
            )
        }
    }

    /// Checks of a training forward that need no device work; returns the mask type and
    /// the forward kernel config.
    fn train_checks(&self, args: &ForwardArgs<'_>) -> Result<(MaskType, KernelConfig)> {
        let c = &self.config;
        let is_self = c.kind == AttentionKind::SelfAttention;
        match (is_self, args.key_value_states.is_some()) {
            (true, true) => {
                return Err(bad(
                    "key_value_states",
                    "none for self-attention",
                    "a tensor",
                ))
            }
            (false, false) => {
                return Err(bad(
                    "key_value_states",
                    "the context [sk, b, h] for cross-attention",
                    "none",
                ))
            }
            _ => {}
        }
        // Cross-attention has no q/k norm, rope or gate (LayerConfig::new refuses them, as the
        // reference system's CrossAttention has none); refuse a config assembled past that.
        c.check_cross_extras()?;
        if !is_self && (self.prep.qk_norm.is_some() || self.prep.rope.is_some()) {
            return Err(bad(
                "config.spec",
                "a cross-attention spec without q/k norm or rope",
                "a spec with them",
            ));
        }
        if !BACKWARD_HEAD_DIMS.contains(&c.head_dim) {
            return Err(bad(
                "head_dim",
                format!("one of {BACKWARD_HEAD_DIMS:?} for the CUDA layer backward"),
                c.head_dim.to_string(),
            ));
        }
        let fcfg = self.fwd_config(args);
        let mask = fcfg.mask.unwrap_or(MaskType::NoMask);
        if args.attention_mask.is_some() && !mask.takes_mask_tensor() {
            return Err(bad(
                "attention_mask",
                "none for this mask type (only padding, padding_causal, arbitrary take a mask)",
                format!("a mask tensor with mask type {}", mask.name()),
            ));
        }
        let fast = self.fast_config(&fcfg).ok_or_else(|| {
            AttnError::BackendUnavailable(
                "CUDA training needs the tensor-core forward and backward kernels (sm_80+ and \
                 their shared memory)"
                    .into(),
            )
        })?;
        for b in backward_configs(
            c.spec.dtype,
            c.head_dim,
            mask,
            c.window.is_some(),
            args.attention_bias.is_some(),
        ) {
            b.check_config().map_err(render_err)?;
        }
        Ok((mask, fast))
    }

    /// Training forward on device tensors (self- or cross-attention; the context is
    /// `args.key_value_states`, a host tensor uploaded per call as in `forward_device`): the output (bitwise
    /// [`forward_device`](Self::forward_device)'s, `[rows, h]` in the layer's dtype) and the
    /// saved context. Asynchronous as `forward_device`. Raises the layer's QK-Clip record on
    /// the device ([`max_logit_record_device`](Self::max_logit_record_device)).
    ///
    /// Errors (nothing queued): those of `forward_device`; [`AttnError::InvalidArgument`] for
    /// a cross-attention config holding a q/k norm, rope or gate (assembled past
    /// [`LayerConfig::new`], which refuses them: the reference system's cross-attention has
    /// none), a mask tensor with a mask type that takes none, a head dim the backward does
    /// not support, an empty input; [`AttnError::Shape`] for a mask or bias that does not
    /// broadcast to `[batch, heads, sq, sk]`; [`AttnError::BackendUnavailable`] below sm_80; [`AttnError::Render`].
    pub fn forward_train_device(
        &self,
        hidden: &DeviceTensor,
        args: &ForwardArgs<'_>,
        opts: &TrainOptions,
    ) -> Result<(DeviceTensor, CudaSaved)> {
        self.forward_train_with(hidden, args, opts, None)
    }

    /// [`forward_train_device`](Self::forward_train_device) with core attention by `hook`
    /// (self-attention, [`Recompute::None`] only: typed errors otherwise).
    pub(crate) fn forward_train_with(
        &self,
        hidden: &DeviceTensor,
        args: &ForwardArgs<'_>,
        opts: &TrainOptions,
        hook: Option<&dyn CudaCoreHook>,
    ) -> Result<(DeviceTensor, CudaSaved)> {
        if hook.is_some() {
            if opts.recompute != Recompute::None {
                return Err(bad(
                    "recompute",
                    "Recompute::None under context parallelism on CUDA",
                    format!("{:?}", opts.recompute),
                ));
            }
            if self.config.kind != AttentionKind::SelfAttention {
                return Err(bad("config.kind", "self-attention", "cross-attention"));
            }
        }
        match self.elem {
            ElemType::Bf16 => self.forward_train_typed::<bf16>(hidden, args, opts, hook),
            ElemType::F16 => self.forward_train_typed::<f16>(hidden, args, opts, hook),
            ElemType::F32 => Err(AttnError::DType {
                arg: "spec dtype".into(),
                expected: "bf16 or f16".into(),
                got: "f32".into(),
            }),
        }
    }

    fn forward_train_typed<T: DeviceElem>(
        &self,
        hidden: &DeviceTensor,
        args: &ForwardArgs<'_>,
        opts: &TrainOptions,
        hook: Option<&dyn CudaCoreHook>,
    ) -> Result<(DeviceTensor, CudaSaved)>
    where
        cudarc::cublaslt::CudaBlasLT: cudarc::cublaslt::Matmul<T>,
    {
        let rt = &*self.rt;
        let st = rt.stream();
        let c = &self.config;
        let (np, ng, hn) = (c.heads, c.groups, c.head_dim);
        self.check_input("hidden", hidden)?;
        let (mask, fast) = self.train_checks(args)?;
        let ctx_dev = match (c.kind, args.key_value_states) {
            (AttentionKind::CrossAttention, Some(t)) => {
                Some(DeviceTensor::from_host(st, t, self.elem)?)
            }
            _ => None,
        };
        let g = self.geometry(hidden, ctx_dev.as_ref(), args)?;
        if g.nq == 0 || g.nk == 0 {
            return Err(bad(
                "hidden / key_value_states",
                "at least one token to train on",
                "0 rows",
            ));
        }
        if g.batch > 65535 || np > 65535 {
            return Err(bad(
                "batch / heads",
                "at most 65535 each (grid y/z limits)",
                format!("batch {} heads {np}", g.batch),
            ));
        }
        let prep_bwd = PrepBackwardKernels::render(&self.prep)?;
        let pos_host = if self.prep.rope.is_some() {
            Some(self.positions(&g, args)?)
        } else {
            None
        };
        self.window()?;
        to_i32("seqlen_q", g.sq as i64)?;
        to_i32("seqlen_k", g.sk as i64)?;
        let (n, nk) = (g.nq, g.nk);
        let is_self = ctx_dev.is_none();
        // Mask tensor and bias as forward_device uploads them (checked before anything else
        // is queued).
        let target = [g.batch, np, g.sq, g.sk];
        let extras = Extras {
            mask: match args.attention_mask {
                Some(m) if mask.takes_mask_tensor() => {
                    let s = bcast_strides("attention_mask", m.shape(), target)?;
                    let v: Vec<u8> = m.data().iter().map(|&x| u8::from(x != 0.0)).collect();
                    Some((upload(st, &v, "attention_mask")?, s))
                }
                _ if mask.takes_mask_tensor() => {
                    Some((upload(st, &[0u8], "attention_mask")?, [0; 4]))
                }
                _ => None,
            },
            bias: match args.attention_bias {
                Some(bt) => {
                    let s = bcast_strides("attention_bias", bt.shape(), target)?;
                    Some((
                        upload(st, bt.data(), "attention_bias")?,
                        s,
                        bt.shape().to_vec(),
                    ))
                }
                None => None,
            },
        };

        // Kernels before the first GEMM (a kernel that cannot load fails with nothing queued).
        let (prep_key, prep_f) = kernel(rt, &self.prep)?;
        let helpers = train_ops::load(rt, &prep_bwd)?;
        let fwd_k = self.load_prefill_sm80(&fast)?;
        let ungated = c.output_gate.then(|| {
            let mut u = fast.clone();
            u.output_gate = false;
            u
        });
        let fwd_u = match (&ungated, opts.recompute) {
            (Some(u), Recompute::None) => Some(self.load_prefill_sm80(u)?),
            _ => None,
        };
        let positions = match &pos_host {
            Some(p) => Some(upload(st, p, "positions")?),
            None => None,
        };
        let max_logit_dev = upload(st, &vec![f32::NEG_INFINITY; np], "max_logit")?;
        let v_flag = st
            .alloc_zeros::<i32>(1)
            .map_err(crate::cuda::tensor::alloc_err("v_nonfinite", 4))?;

        // The input, kept for linear_qkv's weight gradient.
        let mut x = DeviceTensor::uninit(st, self.elem, &[n, c.hidden], "saved input")?;
        copy_dtod(st, hidden, &mut x)?;

        // 1. linear_qkv (cross: linear_q and linear_kv over the context).
        let (a, a_kv) = match (&self.proj_in, &ctx_dev) {
            (Projections::SelfAttention { qkv }, None) => {
                let mut a = self.alloc(&[n, qkv.out_features()], "linear_qkv output")?;
                linear_qkv_into(rt, hidden, qkv, &mut a)?;
                (a, None)
            }
            (Projections::CrossAttention { q, kv }, Some(cx)) => {
                let mut aq = self.alloc(&[n, q.out_features()], "linear_q output")?;
                super::super::linear::linear_q_into(rt, hidden, q, &mut aq)?;
                let mut akv = self.alloc(&[nk, kv.out_features()], "linear_kv output")?;
                super::super::linear::linear_kv_into(rt, cx, kv, &mut akv)?;
                (aq, Some(akv))
            }
            _ => unreachable!("train_checks matched the context to the layer kind"),
        };

        // 2. qkv_prep.
        let q = self.alloc(&[n, np, hn], "q")?;
        let k = self.alloc(&[nk, ng, hn], "k")?;
        let v = self.alloc(&[nk, ng, hn], "v")?;
        let gate = if c.output_gate {
            Some(self.alloc(&[n, np, hn], "gate")?)
        } else {
            None
        };
        {
            let cfg = LaunchConfig {
                grid_dim: (to_i32("rows", n.max(nk) as i64)? as u32, 1, 1),
                block_dim: ((self.prep.warps * 32) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let params = PrepParams {
                qkv: tptr(&a, rt),
                kv: opt_ptr(a_kv.as_ref(), rt),
                q_out: tptr(&q, rt),
                k_out: tptr(&k, rt),
                v_out: tptr(&v, rt),
                gate_out: opt_ptr(gate.as_ref(), rt),
                positions: positions.as_ref().map_or(0, |p| dptr(p, rt)),
                num_tokens: n as i32,
                num_kv_tokens: nk as i32,
                v_nonfinite: dptr(&v_flag, rt),
                ..self.prep_params(args.rope_mscale)
            };
            // SAFETY: as in forward_device: PrepParams layout, live buffers of the documented
            // shapes (cross: q from linear_q, per-head [k | v] from linear_kv), one block per
            // token row (max of both for cross-attention).
            unsafe { launch_params(st, &prep_f, cfg, &params) }.map_err(launch_err(&prep_key))?;
        }

        // 3. Attention: gated output (bitwise forward_device's) and, with a gate, the ungated
        // O the backward needs (by the hook, when given).
        let (first, core) = match hook {
            Some(hk) => {
                let (first, o, lse) = hk.forward(&q, &k, &v, gate.as_ref())?;
                let o = match o {
                    Some(o) => o,
                    None => self.alloc(&[0], "unused")?,
                };
                (
                    first,
                    Some(Core {
                        o,
                        lse,
                        gated: None,
                    }),
                )
            }
            None => {
                let first = self.alloc(&[n, np, hn], "attention output")?;
                let lse = crate::cuda::tensor::alloc_uninit::<f32>(st, np * n, "lse")?;
                self.launch_attention_train(
                    &g,
                    AttnLaunch {
                        f: &fwd_k,
                        cfg: &fast,
                        q: &q,
                        k: &k,
                        v: &v,
                        gate: gate.as_ref(),
                        out: &first,
                        lse: &lse,
                        max_logit: Some(&max_logit_dev),
                        v_flag: &v_flag,
                        extras: &extras,
                    },
                )?;
                let core = match (&fwd_u, &ungated, opts.recompute) {
                    (_, _, Recompute::CoreAttention) => None,
                    (Some(fu), Some(u), Recompute::None) => {
                        let o = self.alloc(&[n, np, hn], "ungated attention output")?;
                        self.launch_attention_train(
                            &g,
                            AttnLaunch {
                                f: fu,
                                cfg: u,
                                q: &q,
                                k: &k,
                                v: &v,
                                gate: None,
                                out: &o,
                                lse: &lse,
                                max_logit: None,
                                v_flag: &v_flag,
                                extras: &extras,
                            },
                        )?;
                        Some(Core {
                            o,
                            lse,
                            gated: None,
                        })
                    }
                    _ => Some(Core {
                        o: self.alloc(&[0], "unused")?,
                        lse,
                        gated: None,
                    }),
                };
                (first, core)
            }
        };

        // 4. linear_proj (bias returned unadded, as forward_device).
        let mut out = self.alloc(&[n, c.hidden], "output")?;
        let first = first.view(&[n, np * hn])?;
        linear_proj_into(rt, &first, &self.proj, &mut out)?;
        let first = first.view(&[n, np, hn])?;
        let core = core.map(|mut cr| {
            if c.output_gate {
                cr.gated = Some(first);
            } else {
                cr.o = first;
            }
            cr
        });
        // 5. QK-Clip: raise the layer's device record by this forward's per-head max logit.
        self.raise_max_logit_record(&helpers, &max_logit_dev)?;
        let fwd_ungated = ungated;
        let saved = CudaSaved {
            config: c.clone(),
            ordinal: rt.device().ordinal,
            elem: self.elem,
            recompute: opts.recompute,
            out_shape: hidden.shape().to_vec(),
            ctx_shape: args
                .key_value_states
                .filter(|_| !is_self)
                .map(|t| t.shape().to_vec()),
            n,
            nk,
            geo: g,
            mask,
            mscale: args.rope_mscale,
            fwd: fast,
            fwd_ungated,
            prep_bwd,
            max_logit_dev,
            max_logit: OnceLock::new(),
            acts: Some(Acts {
                x,
                qkv: is_self.then_some(a),
                ctx: ctx_dev,
                q,
                k,
                v,
                gate,
                positions,
                v_flag,
                core,
                extras,
            }),
            stage: Stage::Forward,
        };
        Ok((out, saved))
    }

    /// Core attention's forward again (selective recompute): O, LSE and the gated output.
    fn recompute_core(&self, s: &CudaSaved, a: &Acts) -> Result<Core> {
        let c = &self.config;
        let (n, np, hn) = (s.n, c.heads, c.head_dim);
        let st = self.rt.stream();
        let lse = crate::cuda::tensor::alloc_uninit::<f32>(st, np * n, "lse")?;
        let o = self.alloc(&[n, np, hn], "recomputed attention output")?;
        let ocfg = s.fwd_ungated.as_ref().unwrap_or(&s.fwd);
        let fo = self.load_prefill_sm80(ocfg)?;
        let fg = match &s.fwd_ungated {
            Some(_) => Some(self.load_prefill_sm80(&s.fwd)?),
            None => None,
        };
        self.launch_attention_train(
            &s.geo,
            AttnLaunch {
                f: &fo,
                cfg: ocfg,
                q: &a.q,
                k: &a.k,
                v: &a.v,
                gate: None,
                out: &o,
                lse: &lse,
                max_logit: None,
                v_flag: &a.v_flag,
                extras: &a.extras,
            },
        )?;
        let gated = match fg {
            Some(fg) => {
                let gt = self.alloc(&[n, np, hn], "recomputed gated output")?;
                let scratch = crate::cuda::tensor::alloc_uninit::<f32>(st, np * n, "lse")?;
                self.launch_attention_train(
                    &s.geo,
                    AttnLaunch {
                        f: &fg,
                        cfg: &s.fwd,
                        q: &a.q,
                        k: &a.k,
                        v: &a.v,
                        gate: a.gate.as_ref(),
                        out: &gt,
                        lse: &scratch,
                        max_logit: None,
                        v_flag: &a.v_flag,
                        extras: &a.extras,
                    },
                )?;
                Some(gt)
            }
            None => None,
        };
        Ok(Core { o, lse, gated })
    }

    fn check_saved(&self, saved: &CudaSaved, call: &str) -> Result<()> {
        if saved.config != self.config
            || saved.ordinal != self.rt.device().ordinal
            || saved.elem != self.elem
        {
            return Err(bad(
                "saved",
                format!(
                    "a context saved by this layer's forward_train (for {call}; {} on CUDA \
                     device {})",
                    self.elem.name(),
                    self.rt.device().ordinal
                ),
                format!(
                    "a context of a layer with another config, dtype or device ({} on CUDA \
                     device {})",
                    saved.elem.name(),
                    saved.ordinal
                ),
            ));
        }
        Ok(())
    }

    /// Backward of [`forward_train_device`](Self::forward_train_device) from `grad_output`
    /// (the output's shape and the layer's dtype, on its device). Returns `grad_input` in the
    /// layer's dtype and the parameter gradients in f32 under Megatron names (the keys of
    /// the CPU backend's [`LayerGrads`]); consumes the saved activations. Asynchronous.
    ///
    /// Errors (nothing queued or consumed): [`AttnError::Shape`] / [`AttnError::DType`] /
    /// [`AttnError::InvalidArgument`] for `grad_output` of another shape, dtype or device,
    /// [`AttnError::TrainState`] for a context whose backward already ran,
    /// [`AttnError::InvalidArgument`] (`saved`) for a context of another layer; kernel
    /// compile / load errors.
    pub fn backward_device(
        &self,
        saved: &mut CudaSaved,
        grad_output: &DeviceTensor,
        opts: &BackwardOptions,
    ) -> Result<LayerGrads<DeviceTensor>> {
        self.backward_with(saved, grad_output, opts, None)
    }

    /// [`backward_device`](Self::backward_device) with core attention by `hook` (the one
    /// the forward ran with).
    pub(crate) fn backward_with(
        &self,
        saved: &mut CudaSaved,
        grad_output: &DeviceTensor,
        opts: &BackwardOptions,
        hook: Option<&dyn CudaCoreHook>,
    ) -> Result<LayerGrads<DeviceTensor>> {
        self.check_saved(saved, "backward")?;
        if !matches!(saved.stage, Stage::Forward) || saved.acts.is_none() {
            return Err(AttnError::TrainState {
                call: "backward".into(),
                expected:
                    "a saved forward (a context from forward_train whose backward has not run)"
                        .into(),
                got: stage_name(&saved.stage).into(),
            });
        }
        if grad_output.shape() != saved.out_shape.as_slice() {
            return Err(AttnError::Shape {
                arg: "grad_output".into(),
                expected: format!("{:?} (the forward output's shape)", saved.out_shape),
                got: grad_output.shape().to_vec(),
            });
        }
        self.check_input("grad_output", grad_output)?;
        match self.elem {
            ElemType::Bf16 => self.backward_typed::<bf16>(saved, grad_output, opts, hook),
            ElemType::F16 => self.backward_typed::<f16>(saved, grad_output, opts, hook),
            ElemType::F32 => Err(bad("layer dtype", "bf16 or f16 (CUDA training)", "f32")),
        }
    }

    /// Queue the weight (and bias) gradient of one linear into `out`.
    fn run_dw(
        &self,
        k: &LoadedPrepBackward,
        name: &str,
        (dy, x): (&DeviceTensor, &DeviceTensor),
        (rows, outf, inp): (usize, usize, usize),
        bias: bool,
        out: &mut BTreeMap<String, DeviceTensor>,
    ) -> Result<()> {
        let rt = &*self.rt;
        let st = rt.stream();
        let poison = self.poison.load(Ordering::Relaxed);
        let mut dw = f32_tensor(st, &[outf, inp], poison)?;
        gemm_wgrad_f32(
            rt,
            name,
            (dy, x),
            (rows, outf, inp),
            dw.typed_mut::<f32>("dw")?,
        )?;
        out.insert(format!("{name}.weight"), dw);
        if bias {
            let mut db = f32_tensor(st, &[outf], poison)?;
            match dy.elem() {
                ElemType::Bf16 => {
                    k.column_sum::<bf16>(st, dy.typed("dy")?, rows, outf, db.typed_mut("db")?)?
                }
                ElemType::F16 => {
                    k.column_sum::<f16>(st, dy.typed("dy")?, rows, outf, db.typed_mut("db")?)?
                }
                ElemType::F32 => {
                    k.column_sum::<f32>(st, dy.typed("dy")?, rows, outf, db.typed_mut("db")?)?
                }
            }
            out.insert(format!("{name}.bias"), db);
        }
        Ok(())
    }

    fn backward_typed<T: DeviceElem>(
        &self,
        saved: &mut CudaSaved,
        dy: &DeviceTensor,
        opts: &BackwardOptions,
        hook: Option<&dyn CudaCoreHook>,
    ) -> Result<LayerGrads<DeviceTensor>>
    where
        cudarc::cublaslt::CudaBlasLT: cudarc::cublaslt::Matmul<T>,
    {
        let rt = &*self.rt;
        let st = rt.stream();
        let c = &self.config;
        let (np, ng, hn, h) = (c.heads, c.groups, c.head_dim, c.hidden);
        let n = saved.n;
        let poison = self.poison.load(Ordering::Relaxed);
        let nk = saved.nk;
        // Kernels first: nothing is queued when one cannot load.
        let kern = train_ops::load(rt, &saved.prep_bwd)?;
        let acts = saved.acts.as_ref().expect("checked by backward_device");
        let bwd = match hook {
            Some(_) => None,
            None => Some(attention_backward(
                rt,
                &backward_configs(
                    c.spec.dtype,
                    hn,
                    saved.mask,
                    c.window.is_some(),
                    acts.extras.bias.is_some(),
                ),
            )?),
        };
        let rec = match &acts.core {
            Some(_) => None,
            None => Some(self.recompute_core(saved, acts)?),
        };
        let core = rec
            .as_ref()
            .or(acts.core.as_ref())
            .expect("saved or recomputed");
        let proj_in = core.gated.as_ref().unwrap_or(&core.o);
        let mut params = BTreeMap::new();

        // 1. linear_proj: dX = dY W (its bias gets no gradient: returned unadded).
        let mut d_pin = self.alloc(&[n, np, hn], "grad linear_proj input")?;
        gemm_dgrad::<T>(rt, "linear_proj", dy, &self.proj.weight, n, &mut d_pin)?;
        if !opts.delay_wgrad {
            self.run_dw(
                &kern,
                "linear_proj",
                (dy, proj_in),
                (n, h, np * hn),
                false,
                &mut params,
            )?;
        }

        // 2. Output gate.
        let (d_o, d_gate) = match &acts.gate {
            Some(gt) => {
                let mut d_o = self.alloc(&[n, np, hn], "grad attention output")?;
                let mut d_g = self.alloc(&[n, np, hn], "grad gate")?;
                kern.gate_backward::<T>(st, &d_pin, &core.o, gt, &mut d_o, &mut d_g)?;
                (d_o, Some(d_g))
            }
            None => (d_pin, None),
        };

        // 3. Core attention.
        let mut dq = self.alloc(&[n, np, hn], "dq")?;
        let mut dk = self.alloc(&[nk, ng, hn], "dk")?;
        let mut dv = self.alloc(&[nk, ng, hn], "dv")?;
        let mut dsinks = match &self.sinks {
            Some(_) => Some(f32_tensor(st, &[np], poison)?),
            None => None,
        };
        let g = &saved.geo;
        let target = [g.batch, np, g.sq, g.sk];
        let want_dbias = opts.want_bias_grad && acts.extras.bias.is_some();
        let mut dbias_dense = if want_dbias {
            Some(crate::cuda::tensor::alloc_uninit::<f32>(
                st,
                target.iter().product::<usize>().max(1),
                "dense attention bias gradient",
            )?)
        } else {
            None
        };
        let layout = match (&g.cu_q, &g.cu_k) {
            (Some(cq), Some(ck)) => BwdLayout::Packed {
                cu_seqlens_q: cq,
                cu_seqlens_k: ck,
                max_seqlen_q: g.sq,
                max_seqlen_k: g.sk,
                total_q: n,
                total_k: nk,
            },
            _ => BwdLayout::Padded {
                seqlen_q: g.sq,
                seqlen_k: g.sk,
            },
        };
        match (hook, &bwd) {
            (Some(hk), _) => hk.backward(
                (&acts.q, &acts.k, &acts.v),
                &core.o,
                &core.lse,
                &d_o,
                (&mut dq, &mut dk, &mut dv),
                dsinks.as_mut(),
                opts.deterministic,
            )?,
            (None, Some(bwd)) => {
                bwd.launch::<T>(
                    st,
                    BwdArgs {
                        q: acts.q.typed::<T>("q")?,
                        k: acts.k.typed::<T>("k")?,
                        v: acts.v.typed::<T>("v")?,
                        out: core.o.typed::<T>("out")?,
                        lse: &core.lse,
                        deterministic: opts.deterministic,
                        dout: d_o.typed::<T>("dout")?,
                        dq: dq.typed_mut::<T>("dq")?,
                        dk: dk.typed_mut::<T>("dk")?,
                        dv: dv.typed_mut::<T>("dv")?,
                        batch: g.batch,
                        num_heads: np,
                        num_groups: ng,
                        layout,
                        softmax_scale: c.softmax_scale,
                        window: self.window()?,
                        sinks: self.sinks.as_ref(),
                        dsinks: match dsinks.as_mut() {
                            Some(t) => Some(t.typed_mut::<f32>("dsinks")?),
                            None => None,
                        },
                        mask: acts.extras.mask.as_ref().map(|m| PrefillStrided {
                            data: &m.0,
                            strides: m.1,
                            extent: target,
                        }),
                        bias: acts.extras.bias.as_ref().map(|b| PrefillStrided {
                            data: &b.0,
                            strides: b.1,
                            extent: target,
                        }),
                        dbias: dbias_dense.as_mut(),
                    },
                )?;
            }
            (None, None) => unreachable!("loaded above without a hook"),
        }
        // The bias's gradient in its own shape: dS summed over its broadcast dims.
        let grad_attention_bias = match (&dbias_dense, &acts.extras.bias) {
            (Some(dense), Some((_, strides, shape))) => {
                let dims = std::array::from_fn(|d| if strides[d] == 0 { 1 } else { target[d] });
                let mut t = f32_tensor(st, shape, poison)?;
                kern.bias_grad_reduce(st, dense, target, dims, t.typed_mut::<f32>("dbias")?)?;
                Some(t)
            }
            _ => None,
        };
        if let Some(ds) = dsinks {
            params.insert("core_attention.softmax_offset".to_string(), ds);
        }

        // 4-5. Self-attention: qkv_prep backward (rope, q/k norm, scatter into linear_qkv's
        // columns), then linear_qkv; cross-attention: linear_q and linear_kv. `ins` lists
        // the input projections' (name, dY, dY's input is the context, rows, out features)
        // whose weight gradients run now or in backward_dw.
        let mut ins: Vec<(&'static str, DeviceTensor, bool, usize, usize)> = Vec::new();
        let (grad_input, grad_kv) = match &self.proj_in {
            Projections::SelfAttention { qkv: lin_qkv } => {
                let wq = lin_qkv.out_features();
                let dqkv = self.alloc(&[n, wq], "grad linear_qkv output")?;
                let mut partials = if c.qk_norm.is_some() {
                    Some(crate::cuda::tensor::alloc_uninit::<f32>(
                        st,
                        n * 4 * hn,
                        "norm partials",
                    )?)
                } else {
                    None
                };
                let pp = self.prep_params(saved.mscale);
                let qkv = acts
                    .qkv
                    .as_ref()
                    .expect("self-attention saves linear_qkv's output");
                let p = QkvPrepBwdParams {
                    qkv: tptr(qkv, rt),
                    dq: tptr(&dq, rt),
                    dk: tptr(&dk, rt),
                    dv: tptr(&dv, rt),
                    dgate: opt_ptr(d_gate.as_ref(), rt),
                    dqkv: tptr(&dqkv, rt),
                    norm_partials: partials.as_ref().map_or(0, |p| dptr(p, rt)),
                    q_norm_weight: pp.q_norm_weight,
                    q_norm_bias: pp.q_norm_bias,
                    k_norm_weight: pp.k_norm_weight,
                    k_norm_bias: pp.k_norm_bias,
                    positions: acts.positions.as_ref().map_or(0, |p| dptr(p, rt)),
                    eps: pp.eps,
                    rotary_base: pp.rotary_base,
                    mscale: saved.mscale,
                    num_tokens: to_i32("rows", n as i64)?,
                    num_heads: np as i32,
                    num_groups: ng as i32,
                };
                // SAFETY: qkv/dqkv [n, W], dq/dgate [n, np, hn], dk/dv [n, ng, hn], partials
                // [n, 4, hn] f32, positions [n] (rope), norm weights [hn] (the layer's); one
                // block per token.
                unsafe { kern.launch_prep(st, n, &p)? };
                if let Some(part) = partials.as_mut() {
                    let mut sums = f32_tensor(st, &[4, hn], poison)?;
                    kern.column_sum::<f32>(st, part, n, 4 * hn, sums.typed_mut("norm sums")?)?;
                    let pick = |j: usize| -> Result<DeviceTensor> {
                        let mut t = f32_tensor(st, &[hn], poison)?;
                        let src = sums.typed::<f32>("norm sums")?;
                        st.memcpy_dtod(
                            &src.slice(j * hn..(j + 1) * hn),
                            &mut t.typed_mut::<f32>("norm grad")?.slice_mut(..hn),
                        )
                        .map_err(crate::cuda::tensor::cuda_err("memcpy_dtod norm grad"))?;
                        Ok(t)
                    };
                    for (role, j, present) in [
                        ("q_layernorm.weight", 0, self.q_norm.0.is_some()),
                        ("q_layernorm.bias", 1, self.q_norm.1.is_some()),
                        ("k_layernorm.weight", 2, self.k_norm.0.is_some()),
                        ("k_layernorm.bias", 3, self.k_norm.1.is_some()),
                    ] {
                        if present {
                            params.insert(role.to_string(), pick(j)?);
                        }
                    }
                }
                // linear_qkv: dX = dQKV W.
                let mut gi = self.alloc(&[n, h], "grad_input")?;
                gemm_dgrad::<T>(rt, "linear_qkv", &dqkv, &lin_qkv.weight, n, &mut gi)?;
                ins.push(("linear_qkv", dqkv, false, n, wq));
                (gi.view(&saved.out_shape)?, None)
            }
            Projections::CrossAttention {
                q: lin_q,
                kv: lin_kv,
            } => {
                // linear_q's output gradient is dq itself ([n, np hn]); linear_kv's is dk and
                // dv interleaved per head.
                let dq = dq.view(&[n, np * hn])?;
                let mut dkv = self.alloc(&[nk, 2 * np * hn], "grad linear_kv output")?;
                kern.kv_interleave::<T>(st, &dk, &dv, &mut dkv)?;
                let mut gi = self.alloc(&[n, h], "grad_input")?;
                gemm_dgrad::<T>(rt, "linear_q", &dq, &lin_q.weight, n, &mut gi)?;
                let mut gkv = self.alloc(&[nk, h], "grad_key_value_states")?;
                gemm_dgrad::<T>(rt, "linear_kv", &dkv, &lin_kv.weight, nk, &mut gkv)?;
                ins.push(("linear_q", dq, false, n, np * hn));
                ins.push(("linear_kv", dkv, true, nk, 2 * np * hn));
                let shape = saved.ctx_shape.clone().expect("cross-attention saves it");
                (gi.view(&saved.out_shape)?, Some(gkv.view(&shape)?))
            }
        };
        if !opts.delay_wgrad {
            for (name, d, is_ctx, rows, outf) in &ins {
                let x = if *is_ctx {
                    acts.ctx
                        .as_ref()
                        .expect("cross-attention saves the context")
                } else {
                    &acts.x
                };
                self.run_dw(
                    &kern,
                    name,
                    (d, x),
                    (*rows, *outf, h),
                    c.qkv_bias,
                    &mut params,
                )?;
            }
        }

        // Consume the activations; keep what the delayed weight gradients read.
        let mut acts = saved.acts.take().expect("checked above");
        saved.stage = if opts.delay_wgrad {
            let core = rec.or(acts.core.take()).expect("saved or recomputed");
            let proj_x = core.gated.unwrap_or(core.o);
            let mut dy_copy = self.alloc(&[n, h], "saved grad_output")?;
            copy_dtod(st, dy, &mut dy_copy)?;
            let mut pending = vec![PendingDw {
                name: "linear_proj",
                dy: dy_copy,
                x: proj_x,
                rows: n,
                out: h,
                inp: np * hn,
                bias: false,
            }];
            let (mut x, mut ctx) = (Some(acts.x), acts.ctx.take());
            for (name, d, is_ctx, rows, outf) in ins {
                let input = if is_ctx { ctx.take() } else { x.take() };
                pending.push(PendingDw {
                    name,
                    dy: d,
                    x: input.expect("each input feeds one projection"),
                    rows,
                    out: outf,
                    inp: h,
                    bias: c.qkv_bias,
                });
            }
            Stage::PendingDw(pending)
        } else {
            Stage::Done { delayed: false }
        };
        Ok(LayerGrads {
            grad_input,
            grad_key_value_states: grad_kv,
            grad_attention_bias,
            params,
        })
    }

    /// The weight gradients a [`backward_device`](Self::backward_device) with
    /// [`BackwardOptions::delay_wgrad`] left pending (`linear_proj.weight`,
    /// `linear_qkv.weight`, `linear_qkv.bias`; f32), bitwise equal to the one-step
    /// backward's (the same GEMMs and sums on the same inputs).
    ///
    /// Errors ([`AttnError::TrainState`], nothing changed): before the backward, after a
    /// backward that did not delay them, or a second time.
    pub fn backward_dw_device(
        &self,
        saved: &mut CudaSaved,
    ) -> Result<BTreeMap<String, DeviceTensor>> {
        self.check_saved(saved, "backward_dw")?;
        let Stage::PendingDw(pending) = &saved.stage else {
            return Err(AttnError::TrainState {
                call: "backward_dw".into(),
                expected: "a context whose backward ran with delay_wgrad and whose weight \
                           gradients are still pending"
                    .into(),
                got: stage_name(&saved.stage).into(),
            });
        };
        let kern = train_ops::load(&self.rt, &saved.prep_bwd)?;
        let mut out = BTreeMap::new();
        for p in pending {
            self.run_dw(
                &kern,
                p.name,
                (&p.dy, &p.x),
                (p.rows, p.out, p.inp),
                p.bias,
                &mut out,
            )?;
        }
        saved.stage = Stage::Done { delayed: true };
        Ok(out)
    }
}
