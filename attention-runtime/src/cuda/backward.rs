//! Host launcher of the attention backward (training) kernels, FlashAttention-2 style
//! (`templates/backward_preprocess.cu`, `templates/backward_sm80.cu`), straight on cudarc:
//! render → NVRTC CUBIN for the device's arch → modules → three launches per call:
//!
//! 1. `backward_preprocess_<dtype>_hd<D>`: D = rowsum(dO ∘ O) (f32, one value per query row
//!    and head, into a scratch buffer this launcher allocates), then, with learnable sinks,
//!    its `_dsink` entry: `dsinks[h] = -Σ_rows exp(sinks[h] - lse) · D`;
//! 2. `backward_dkdv_…_sm80`: dK, dV, one block per KV tile, group and sequence, looping
//!    over the group's query heads (GQA) in registers;
//! 3. `backward_dq_…_sm80`: dQ, one block per query tile, head and sequence.
//!
//! or, in the fast mode ([`BwdArgs::deterministic`] `false`, the default of the layers), after
//! the same preprocess:
//!
//! 2'. `backward_dqdkdv_…_sm80`: FlashAttention-2's one-pass schedule: dK, dV per KV tile as
//!    above (8 warps, 128 keys up to head dim 128, 64 above) and dQ = dS K added to an f32
//!    buffer (allocated here, zeroed by the preprocess kernel) with f32 atomics;
//! 3'. its `_dq_convert` entry: dq = softmax_scale · that buffer, rounded.
//!
//! On Hopper (an sm_90 device, unless `ATTN_DISABLE_SM90` is set) at head dims 64, 128 and
//! 256 the fast mode runs `backward_dqdkdv_…_sm90` instead
//! (`templates/backward_dqdkdv_sm90.cu`: the same launch, parameters and results on
//! warpgroup MMA, two warpgroups, FlashAttention-3's transposed products so that P and dS
//! feed dV and dK from registers up to head dim 128, in the schedule of
//! `PrefillTile::for_backward_sm90`);
//! the registry's [`backward_fused_for`] makes the choice, and picks no fused kernel where
//! the tile's shared memory exceeds the device's (the deterministic pair runs then).
//!
//! The forward's LSE is read, never recomputed. **Determinism:** the deterministic mode has
//! no atomics and a fixed summation order everywhere, so the gradients are bitwise equal from
//! run to run (the GPU test checks); it recomputes S = QKᵀ and dP = dO Vᵀ in the dQ kernel (7
//! matrix products per tile pair instead of 5). The fast mode's dK, dV are deterministic too
//! (no atomics), its dQ is not (the order of the atomic additions varies), at the cost of
//! one f32 copy of dq in scratch memory. Head dims 80, 160 and 224 have no fused kernel
//! ([`fused_backward_layout`](attention_codegen::render::fused_backward_layout)) and always
//! run the deterministic pair.
//!
//! Layouts are the forward's ([`crate::cuda::prefill_sm80`]); dq, dk, dv have the layouts of q,
//! k, v and the input dtype; lse is the forward's f32 `[num_heads, rows]` natural log.
//!
//! Supported: masks `no_mask`, `causal` (top-left), `causal_bottom_right`, a sliding window
//! on them, GQA / MQA, padded and packed layouts, bf16 and f16, the head dims of
//! [`BACKWARD_HEAD_DIMS`](attention_codegen::render::BACKWARD_HEAD_DIMS) (every supported
//! one, 32 to 256; above 128 the dK/dV kernel pairs warps to split the head dim), off-by-one and learnable sinks (their
//! gradient), mask tensors (`padding`, `padding_causal`, `arbitrary`, as the forward's), an
//! additive bias and its gradient dbias (dense; the caller sums broadcast dims). Not yet:
//! an output gate (its gradient): [`AttentionBackward::compile`] returns
//! [`AttnError::Render`] naming the feature for such configs.

use std::sync::Arc;

use attention_codegen::registry::{backward_configs, backward_fused_for, Target};
use attention_codegen::render::{KernelConfig, Phase, PrefillTile};
use attention_codegen::{DType, MaskType};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
};
use cudarc::nvrtc::Ptx;

use crate::cuda::layer::device_target;
use crate::cuda::params::BwdParams;
use crate::cuda::prefill_sm80::{check_strided, PrefillStrided};
use crate::cuda::tensor::{DeviceElem, ElemType};
use crate::error::{AttnError, Result};

/// Rows (one warp each) per block of the preprocess entry (`PRE_ROWS` in its template).
const PRE_ROWS: usize = 8;
/// Threads of the `_dsink` entry (`DSINK_THREADS`).
const DSINK_THREADS: usize = 256;

/// The loaded backward kernels of one dtype, head dim, mask and window flag.
pub struct AttentionBackward {
    configs: [KernelConfig; 3],
    keys: [String; 3],
    preprocess: CudaFunction,
    dsink: CudaFunction,
    dkdv: CudaFunction,
    dq: CudaFunction,
    fused: Option<Fused>,
}

/// The fused kernel of the fast mode and its dq conversion entry.
struct Fused {
    config: KernelConfig,
    key: String,
    main: CudaFunction,
    convert: CudaFunction,
}

/// Threads per block of the `_dq_convert` entry (`__launch_bounds__(256)`).
const CONVERT_THREADS: usize = 256;

/// Sequence layout of one backward launch (as the forward's).
#[derive(Clone, Copy)]
pub enum BwdLayout<'a> {
    /// `[s, b, heads, hn]` with the same lengths for every sequence.
    Padded {
        /// Query length.
        seqlen_q: usize,
        /// Key length.
        seqlen_k: usize,
    },
    /// Packed varlen: int32 `[batch + 1]` cumulative lengths on the device.
    Packed {
        /// Query offsets.
        cu_seqlens_q: &'a CudaSlice<i32>,
        /// Key offsets.
        cu_seqlens_k: &'a CudaSlice<i32>,
        /// Longest query sequence (the dQ grid).
        max_seqlen_q: usize,
        /// Longest key sequence (the dK/dV grid).
        max_seqlen_k: usize,
        /// Query tokens in all (rows of q).
        total_q: usize,
        /// Key tokens in all (rows of k).
        total_k: usize,
    },
}

/// Arguments of one backward call (tensors on the launch stream's device, dtype `T`).
pub struct BwdArgs<'a, T> {
    /// Queries, the forward's layout.
    pub q: &'a CudaSlice<T>,
    /// Keys.
    pub k: &'a CudaSlice<T>,
    /// Values.
    pub v: &'a CudaSlice<T>,
    /// The forward's output (saved), layout of `q`.
    pub out: &'a CudaSlice<T>,
    /// The forward's LSE (saved), f32 `[num_heads, rows]`, natural log.
    pub lse: &'a CudaSlice<f32>,
    /// Run the deterministic kernels (bitwise-reproducible dq, dk, dv) instead of the fused
    /// fast one (dq summed by f32 atomics; dk, dv still reproducible). Head dims without a
    /// fused kernel, and calls that ask for `dbias`, are deterministic either way.
    pub deterministic: bool,
    /// Gradient of the output, layout of `q`.
    pub dout: &'a CudaSlice<T>,
    /// Gradient of `q` (written), layout of `q`.
    pub dq: &'a mut CudaSlice<T>,
    /// Gradient of `k` (written).
    pub dk: &'a mut CudaSlice<T>,
    /// Gradient of `v` (written).
    pub dv: &'a mut CudaSlice<T>,
    /// Sequence count.
    pub batch: usize,
    /// Query heads.
    pub num_heads: usize,
    /// K/V groups (divides `num_heads`).
    pub num_groups: usize,
    /// Padded or packed.
    pub layout: BwdLayout<'a>,
    /// The forward's softmax scale.
    pub softmax_scale: f32,
    /// The forward's sliding window `(left, right)`, `-1` = unbounded; ignored unless the
    /// kernels were built with a window.
    pub window: (i32, i32),
    /// Learnable sink logits f32 `[num_heads]` (with `dsinks`).
    pub sinks: Option<&'a CudaSlice<f32>>,
    /// Their gradient f32 `[num_heads]` (written); needs `sinks`. Off-by-one sinks have no
    /// parameter: pass neither (their effect is in the forward's LSE).
    pub dsinks: Option<&'a mut CudaSlice<f32>>,
    /// The forward's uint8 mask tensor (nonzero = masked out), required exactly when the
    /// kernels' mask takes one (padding, padding_causal, arbitrary); indexed as the
    /// forward's ([`PrefillStrided`]), extent `[batch, num_heads, seqlen_q, seqlen_k]`.
    pub mask: Option<PrefillStrided<'a, u8>>,
    /// The forward's f32 additive post-scale bias, required exactly when the kernels were
    /// built with one (`has_bias`); indexed as the forward's ([`PrefillStrided`]), extent
    /// `[batch, num_heads, seqlen_q, seqlen_k]`.
    pub bias: Option<PrefillStrided<'a, f32>>,
    /// Its gradient dS (written; needs `bias`), dense f32 `[batch, num_heads, seqlen_q,
    /// seqlen_k]` (packed: the longest sequences, positions within each sequence), zero
    /// where masked and outside every sequence. A broadcast bias's gradient is this summed
    /// over the broadcast dims (the caller's reduction).
    pub dbias: Option<&'a mut CudaSlice<f32>>,
}

fn invalid(arg: &str, expected: impl Into<String>, got: impl ToString) -> AttnError {
    AttnError::InvalidArgument {
        arg: arg.into(),
        expected: expected.into(),
        got: got.to_string(),
    }
}

fn check_len<T>(arg: &str, s: &CudaSlice<T>, want: usize) -> Result<()> {
    if s.len() < want {
        return Err(AttnError::Shape {
            arg: arg.into(),
            expected: format!("at least {want} elements"),
            got: vec![s.len()],
        });
    }
    Ok(())
}

fn cuda_err(call: String) -> impl FnOnce(cudarc::driver::DriverError) -> AttnError {
    move |e| AttnError::Cuda {
        call,
        msg: e.to_string(),
    }
}

fn load(
    ctx: &Arc<CudaContext>,
    config: &KernelConfig,
    entries: &[&str],
) -> Result<Vec<CudaFunction>> {
    let src = config
        .render()
        .map_err(|e| AttnError::Render(e.to_string()))?;
    let cc = ctx
        .compute_capability()
        .map_err(cuda_err("cuDeviceGetAttribute compute capability".into()))?;
    let arch = crate::device::arch_for_capability(cc);
    let cubin =
        crate::jit::compile_cubin(&src.key, &src.source, &arch).map_err(|e| AttnError::Cuda {
            call: format!("nvrtc {}", src.key),
            msg: e.to_string(),
        })?;
    let module = ctx
        .load_module(Ptx::from_binary(cubin))
        .map_err(cuda_err(format!("cuModuleLoadData {}", src.key)))?;
    entries
        .iter()
        .map(|e| {
            module
                .load_function(e)
                .map_err(cuda_err(format!("cuModuleGetFunction {e}")))
        })
        .collect()
}

fn set_smem(ctx: &Arc<CudaContext>, f: &CudaFunction, key: &str, bytes: usize) -> Result<()> {
    let max_optin = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )
        .map_err(cuda_err(
            "cuDeviceGetAttribute max shared memory per block (opt-in)".into(),
        ))? as usize;
    if bytes > max_optin {
        return Err(invalid(
            "head_dim",
            format!("kernels needing at most {max_optin} bytes of shared memory on this GPU"),
            format!("{key} ({bytes} bytes)"),
        ));
    }
    if bytes > 48 * 1024 {
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .map_err(cuda_err(format!(
            "cuFuncSetAttribute max dynamic shared memory {key}"
        )))?;
    }
    Ok(())
}

impl AttentionBackward {
    /// Render the three backward kernels of `dtype`, `head_dim`, `mask` (with a sliding
    /// window when `has_window`, an additive bias and its gradient when `has_bias`;
    /// [`backward_configs`]), compile them with NVRTC for the arch
    /// of `ctx`'s device and load them.
    ///
    /// Errors: [`AttnError::Render`] naming the feature for what the kernels do not support; [`AttnError::InvalidArgument`] when a
    /// tile's shared memory exceeds the device's; [`AttnError::Cuda`] on compile or load
    /// failures (a device below sm_80 fails to compile `mma.sync`).
    pub fn new(
        ctx: &Arc<CudaContext>,
        dtype: DType,
        head_dim: usize,
        mask: MaskType,
        has_window: bool,
        has_bias: bool,
    ) -> Result<AttentionBackward> {
        AttentionBackward::compile(
            ctx,
            &backward_configs(dtype, head_dim, mask, has_window, has_bias),
        )
    }

    /// [`AttentionBackward::new`] from the registry's configs (preprocess, dK/dV, dQ; e.g.
    /// [`attention_codegen::registry::backward`]), with the fast mode's fused kernel that
    /// [`backward_fused_for`] picks for `ctx`'s device (on sm_90 the Hopper one at head dims
    /// 64, 128 and 256, with the schedule of [`PrefillTile::for_backward`] unless
    /// `ATTN_BWD_SM90_SCHEDULE` names another that the head dim has, see
    /// [`AttentionBackward::fast_mode_kernel`]).
    pub fn compile(
        ctx: &Arc<CudaContext>,
        configs: &[KernelConfig; 3],
    ) -> Result<AttentionBackward> {
        let fused = AttentionBackward::fast_mode_kernel(ctx, configs)?;
        AttentionBackward::compile_with_fused(ctx, configs, fused)
    }

    /// The environment variables that [`AttentionBackward::fast_mode_kernel`] reads:
    /// `ATTN_DISABLE_SM90` (set or not) and `ATTN_BWD_SM90_SCHEDULE` (its value when it is
    /// 2, 3 or 4, else 0). A cache of compiled backwards keys on them, so that they are
    /// honoured per call.
    pub fn fast_mode_flags() -> (bool, usize) {
        let schedule = std::env::var("ATTN_BWD_SM90_SCHEDULE")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|s| (2..=4).contains(s))
            .unwrap_or(0);
        (crate::cuda::layer::sm90_disabled(), schedule)
    }

    /// The fused kernel [`AttentionBackward::compile`] gives the fast mode for `configs` on
    /// `ctx`'s device, or `None` for the deterministic pair: the registry's choice
    /// ([`backward_fused_for`]), with, for the Hopper kernel, the schedule
    /// (`PrefillTile::for_backward_sm90`) that `ATTN_BWD_SM90_SCHEDULE` names (2, 3 or 4; a
    /// tuning aid for benchmarks) where that head dim has it, the default elsewhere.
    ///
    /// Errors: [`AttnError::Cuda`] when the device's attributes cannot be read.
    pub fn fast_mode_kernel(
        ctx: &Arc<CudaContext>,
        configs: &[KernelConfig; 3],
    ) -> Result<Option<KernelConfig>> {
        let c = &configs[1];
        let target = device_target(ctx)?;
        let mask = c.mask.unwrap_or(MaskType::NoMask);
        let mut fused =
            backward_fused_for(c.dtype, c.head_dim, mask, c.has_window, c.has_bias, target);
        let (_, schedule) = AttentionBackward::fast_mode_flags();
        if let Some(f) = fused
            .as_mut()
            .filter(|f| schedule != 0 && f.phase == Phase::BackwardDqDkDvSm90)
        {
            let mut g = f.clone();
            g.tile = Some(PrefillTile::for_backward_sm90(f.head_dim, schedule));
            if g.check_config().is_ok() {
                *f = g;
            }
        }
        Ok(fused)
    }

    /// [`AttentionBackward::compile`] with the fast mode's fused kernel given: `fused` of
    /// phase [`Phase::BackwardDqDkDv`] or [`Phase::BackwardDqDkDvSm90`] for the same dtype,
    /// head dim, mask, window and bias as `configs[1]`, or `None` (the fast mode then runs
    /// the deterministic pair). For tests and benchmarks of a given kernel: it skips the
    /// registry's choice (which, for one, keeps bias configs off the sm90 kernel for now).
    ///
    /// Errors: those of [`AttentionBackward::compile`]; [`AttnError::InvalidArgument`]
    /// (`fused`) for another phase or another kernel's features, or the sm90 kernel on a
    /// device without wgmma (checked before anything compiles).
    pub fn compile_with_fused(
        ctx: &Arc<CudaContext>,
        configs: &[KernelConfig; 3],
        fused: Option<KernelConfig>,
    ) -> Result<AttentionBackward> {
        let want = [
            Phase::BackwardPreprocess,
            Phase::BackwardDkdv,
            Phase::BackwardDq,
        ];
        for (c, p) in configs.iter().zip(want) {
            if c.phase != p {
                return Err(invalid(
                    "configs",
                    format!("phase {}", p.prefix()),
                    c.phase.prefix(),
                ));
            }
            c.check_config()
                .map_err(|e| AttnError::Render(e.to_string()))?;
        }
        if configs[1].dtype != configs[0].dtype
            || configs[2].dtype != configs[0].dtype
            || configs[1].head_dim != configs[0].head_dim
            || configs[2].head_dim != configs[0].head_dim
            || configs[1].mask != configs[2].mask
            || configs[1].has_window != configs[2].has_window
            || configs[1].has_bias != configs[2].has_bias
        {
            return Err(invalid(
                "configs",
                "one dtype and head dim, and one mask and window for dK/dV and dQ",
                format!(
                    "{} / {} / {}",
                    configs[0].key(),
                    configs[1].key(),
                    configs[2].key()
                ),
            ));
        }
        let c = &configs[1];
        if let Some(f) = &fused {
            let same = matches!(f.phase, Phase::BackwardDqDkDv | Phase::BackwardDqDkDvSm90)
                && (f.dtype, f.head_dim, f.mask, f.has_window, f.has_bias)
                    == (c.dtype, c.head_dim, c.mask, c.has_window, c.has_bias);
            if !same {
                return Err(invalid(
                    "fused",
                    format!("a fused backward kernel with the features of {}", c.key()),
                    f.key(),
                ));
            }
            if f.phase == Phase::BackwardDqDkDvSm90 {
                if let Target::Device { wgmma: false, .. } = device_target(ctx)? {
                    return Err(invalid(
                        "fused",
                        "a kernel this GPU runs (the _sm90 one needs an sm_90 device, and \
                         ATTN_DISABLE_SM90 unset)",
                        f.key(),
                    ));
                }
            }
        }
        let keys = configs.clone().map(|c| c.key());
        let pre = load(ctx, &configs[0], &[&keys[0], &format!("{}_dsink", keys[0])])?;
        let dkdv = load(ctx, &configs[1], &[&keys[1]])?.remove(0);
        let dq = load(ctx, &configs[2], &[&keys[2]])?.remove(0);
        set_smem(ctx, &dkdv, &keys[1], configs[1].backward_smem_bytes())?;
        set_smem(ctx, &dq, &keys[2], configs[2].backward_smem_bytes())?;
        let fused = match fused {
            Some(config) => {
                config
                    .check_config()
                    .map_err(|e| AttnError::Render(e.to_string()))?;
                let key = config.key();
                let mut f = load(ctx, &config, &[&key, &format!("{key}_dq_convert")])?.into_iter();
                let main = f.next().expect("two entries");
                set_smem(ctx, &main, &key, config.backward_smem_bytes())?;
                Some(Fused {
                    config,
                    key,
                    main,
                    convert: f.next().expect("two entries"),
                })
            }
            None => None,
        };
        let mut pre = pre.into_iter();
        Ok(AttentionBackward {
            configs: configs.clone(),
            keys,
            preprocess: pre.next().expect("two entries"),
            dsink: pre.next().expect("two entries"),
            dkdv,
            dq,
            fused,
        })
    }

    /// The kernel keys: preprocess, dK/dV, dQ.
    pub fn keys(&self) -> &[String; 3] {
        &self.keys
    }

    /// The fused kernel's key (the fast mode), `None` at head dims without one.
    pub fn fused_key(&self) -> Option<&str> {
        self.fused.as_ref().map(|f| f.key.as_str())
    }

    /// Queue one backward on `stream`: D, then dK/dV, then dQ (and the sinks' gradient).
    /// Checks dims, dtype, devices and buffer sizes first (typed errors naming the
    /// argument); a failed launch names the kernel key. Allocates the f32 D scratch
    /// (`num_heads × rows`) on `stream`.
    pub fn launch<T: DeviceElem>(&self, stream: &Arc<CudaStream>, a: BwdArgs<'_, T>) -> Result<()> {
        let cfg = &self.configs[1];
        let hd = cfg.head_dim;
        let want_elem = match cfg.dtype {
            DType::Bf16 => ElemType::Bf16,
            DType::F16 => ElemType::F16,
        };
        if T::ELEM != want_elem {
            return Err(AttnError::DType {
                arg: "q".into(),
                expected: want_elem.name().into(),
                got: T::ELEM.name().into(),
            });
        }
        if a.batch == 0 || a.num_heads == 0 || a.num_groups == 0 {
            return Err(invalid(
                "batch/num_heads/num_groups",
                "positive values",
                format!("{}/{}/{}", a.batch, a.num_heads, a.num_groups),
            ));
        }
        if !a.num_heads.is_multiple_of(a.num_groups) {
            return Err(invalid(
                "num_groups",
                format!("a divisor of num_heads = {}", a.num_heads),
                a.num_groups,
            ));
        }
        if a.batch > 65535 || a.num_heads > 65535 {
            return Err(invalid(
                "batch/num_heads",
                "at most 65535 each (grid limits)",
                format!("{}/{}", a.batch, a.num_heads),
            ));
        }
        if !(a.softmax_scale.is_finite() && a.softmax_scale > 0.0) {
            return Err(invalid(
                "softmax_scale",
                "a positive finite scale",
                a.softmax_scale,
            ));
        }
        let (rows_q, rows_k, max_q, max_k, seqlen_q, seqlen_k) = match a.layout {
            BwdLayout::Padded { seqlen_q, seqlen_k } => (
                seqlen_q * a.batch,
                seqlen_k * a.batch,
                seqlen_q,
                seqlen_k,
                seqlen_q,
                seqlen_k,
            ),
            BwdLayout::Packed {
                cu_seqlens_q,
                cu_seqlens_k,
                max_seqlen_q,
                max_seqlen_k,
                total_q,
                total_k,
            } => {
                check_len("cu_seqlens_q", cu_seqlens_q, a.batch + 1)?;
                check_len("cu_seqlens_k", cu_seqlens_k, a.batch + 1)?;
                (
                    total_q,
                    total_k,
                    max_seqlen_q,
                    max_seqlen_k,
                    max_seqlen_q,
                    max_seqlen_k,
                )
            }
        };
        if rows_q > i32::MAX as usize || rows_k > i32::MAX as usize {
            return Err(invalid(
                "rows",
                "at most i32::MAX query and key rows",
                rows_q.max(rows_k),
            ));
        }
        check_len("q", a.q, rows_q * a.num_heads * hd)?;
        check_len("out", a.out, rows_q * a.num_heads * hd)?;
        check_len("dout", a.dout, rows_q * a.num_heads * hd)?;
        check_len("dq", a.dq, rows_q * a.num_heads * hd)?;
        check_len("lse", a.lse, rows_q * a.num_heads)?;
        check_len("k", a.k, rows_k * a.num_groups * hd)?;
        check_len("v", a.v, rows_k * a.num_groups * hd)?;
        check_len("dk", a.dk, rows_k * a.num_groups * hd)?;
        check_len("dv", a.dv, rows_k * a.num_groups * hd)?;
        match (a.sinks, a.dsinks.as_deref()) {
            (Some(s), Some(ds)) => {
                check_len("sinks", s, a.num_heads)?;
                check_len("dsinks", ds, a.num_heads)?;
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "sinks",
                    "the learnable sink logits (dsinks was given)",
                    "none",
                ))
            }
            _ => {}
        }
        let takes_mask = cfg.mask.is_some_and(|m| m.takes_mask_tensor());
        match (&a.mask, takes_mask) {
            (Some(m), true) => check_strided(
                "mask",
                m,
                [a.batch, a.num_heads, seqlen_q, seqlen_k],
                matches!(a.layout, BwdLayout::Packed { .. }),
            )?,
            (None, false) => {}
            (Some(_), false) => {
                return Err(invalid(
                    "mask",
                    format!("no mask tensor (kernel {} reads none)", self.keys[1]),
                    "a mask tensor",
                ))
            }
            (None, true) => {
                return Err(invalid(
                    "mask",
                    format!("a uint8 mask tensor (kernel {} reads one)", self.keys[1]),
                    "none",
                ))
            }
        }
        let want4 = [a.batch, a.num_heads, seqlen_q, seqlen_k];
        match (&a.bias, cfg.has_bias) {
            (Some(bi), true) => check_strided(
                "bias",
                bi,
                want4,
                matches!(a.layout, BwdLayout::Packed { .. }),
            )?,
            (None, false) => {}
            (Some(_), false) => {
                return Err(invalid(
                    "bias",
                    format!("no bias tensor (kernel {} reads none)", self.keys[1]),
                    "a bias tensor",
                ))
            }
            (None, true) => {
                return Err(invalid(
                    "bias",
                    format!("an f32 bias tensor (kernel {} reads one)", self.keys[1]),
                    "none",
                ))
            }
        }
        if let Some(db) = a.dbias.as_deref() {
            if a.bias.is_none() {
                return Err(invalid("bias", "the bias tensor (dbias was given)", "none"));
            }
            check_len("dbias", db, want4.iter().product())?;
        }
        // Every buffer on the stream's device.
        let dev = stream.context().ordinal();
        let mut ordinals = vec![
            ("q", a.q.ordinal()),
            ("k", a.k.ordinal()),
            ("v", a.v.ordinal()),
            ("out", a.out.ordinal()),
            ("lse", a.lse.ordinal()),
            ("dout", a.dout.ordinal()),
            ("dq", a.dq.ordinal()),
            ("dk", a.dk.ordinal()),
            ("dv", a.dv.ordinal()),
        ];
        if let Some(s) = a.sinks {
            ordinals.push(("sinks", s.ordinal()));
        }
        if let Some(s) = a.dsinks.as_deref() {
            ordinals.push(("dsinks", s.ordinal()));
        }
        if let Some(m) = &a.mask {
            ordinals.push(("mask", m.data.ordinal()));
        }
        if let Some(bi) = &a.bias {
            ordinals.push(("bias", bi.data.ordinal()));
        }
        if let Some(db) = a.dbias.as_deref() {
            ordinals.push(("dbias", db.ordinal()));
        }
        if let BwdLayout::Packed {
            cu_seqlens_q,
            cu_seqlens_k,
            ..
        } = a.layout
        {
            ordinals.push(("cu_seqlens_q", cu_seqlens_q.ordinal()));
            ordinals.push(("cu_seqlens_k", cu_seqlens_k.ordinal()));
        }
        if let Some((arg, o)) = ordinals.into_iter().find(|&(_, o)| o != dev) {
            return Err(invalid(
                arg,
                format!("a buffer on CUDA device {dev} (the stream's)"),
                format!("a buffer on CUDA device {o}"),
            ));
        }

        // A bias gradient runs the deterministic pair: the fused kernel forms dS from P as
        // rounded to the input dtype (its f32 P would not fit in registers), fine for the bf16
        // dK / dQ products but not for dbias, which is dS itself in f32 (a tiny broadcast
        // bias summed over heads showed 4e-2 relative error).
        let fused = self
            .fused
            .as_ref()
            .filter(|_| !a.deterministic && a.dbias.is_none());
        let n_accum = if fused.is_some() {
            (rows_q * a.num_heads * hd).max(1)
        } else {
            1
        };
        // SAFETY: uninitialized f32 storage; the preprocess kernel zeroes every element
        // (rows_q x num_heads x hd, the layout of q) before the fused kernel adds into it, and
        // nothing else reads it (the deterministic path passes a null pointer and skips it).
        let dq_accum =
            unsafe { stream.alloc::<f32>(n_accum) }.map_err(|e| AttnError::DeviceAlloc {
                arg: "backward dq accumulator".into(),
                bytes: n_accum * 4,
                msg: e.to_string(),
            })?;
        let n_dpsum = (rows_q * a.num_heads).max(1);
        let dpsum = stream
            .alloc_zeros::<f32>(n_dpsum)
            .map_err(|e| AttnError::DeviceAlloc {
                arg: "backward D scratch".into(),
                bytes: n_dpsum * 4,
                msg: e.to_string(),
            })?;

        // Raw device pointers (0 = null); the guards keep cudarc's stream ordering.
        let (q_ptr, _g1) = a.q.device_ptr(stream);
        let (k_ptr, _g2) = a.k.device_ptr(stream);
        let (v_ptr, _g3) = a.v.device_ptr(stream);
        let (out_ptr, _g4) = a.out.device_ptr(stream);
        let (lse_ptr, _g5) = a.lse.device_ptr(stream);
        let (dout_ptr, _g6) = a.dout.device_ptr(stream);
        let (dpsum_ptr, _g7) = dpsum.device_ptr(stream);
        let (accum_ptr, _g18) = dq_accum.device_ptr(stream);
        let (dq_ptr, _g8) = a.dq.device_ptr_mut(stream);
        let (dk_ptr, _g9) = a.dk.device_ptr_mut(stream);
        let (dv_ptr, _g10) = a.dv.device_ptr_mut(stream);
        let (cuq, _g11, cuk, _g12) = match a.layout {
            BwdLayout::Packed {
                cu_seqlens_q,
                cu_seqlens_k,
                ..
            } => {
                let (p, g) = cu_seqlens_q.device_ptr(stream);
                let (p2, g2) = cu_seqlens_k.device_ptr(stream);
                (p, Some(g), p2, Some(g2))
            }
            BwdLayout::Padded { .. } => (0, None, 0, None),
        };
        let (sinks_ptr, _g13) = match a.sinks {
            Some(s) => {
                let (p, g) = s.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (dsinks_ptr, _g14) = match a.dsinks {
            Some(s) => {
                let (p, g) = s.device_ptr_mut(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (mask_ptr, _g15, mask_strides) = match &a.mask {
            Some(m) => {
                let (p, g) = m.data.device_ptr(stream);
                (p, Some(g), m.strides)
            }
            None => (0, None, [0; 4]),
        };
        let (bias_ptr, _g16, bias_strides) = match &a.bias {
            Some(bi) => {
                let (p, g) = bi.data.device_ptr(stream);
                (p, Some(g), bi.strides)
            }
            None => (0, None, [0; 4]),
        };
        let (dbias_ptr, _g17) = match a.dbias {
            Some(db) => {
                // Positions no visited tile covers (masked ranges, other sequences' padding)
                // stay zero.
                stream
                    .memset_zeros(db)
                    .map_err(cuda_err("cuMemsetD8Async dbias".into()))?;
                let (p, g) = db.device_ptr_mut(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (wl, wr) = if cfg.has_window { a.window } else { (-1, -1) };
        let params = BwdParams {
            q: q_ptr,
            k: k_ptr,
            v: v_ptr,
            out: out_ptr,
            dout: dout_ptr,
            lse: lse_ptr,
            dpsum: dpsum_ptr,
            dq: dq_ptr,
            dk: dk_ptr,
            dv: dv_ptr,
            cu_seqlens_q: cuq,
            cu_seqlens_k: cuk,
            sinks: sinks_ptr,
            dsinks: dsinks_ptr,
            batch: a.batch as i32,
            num_heads: a.num_heads as i32,
            num_groups: a.num_groups as i32,
            seqlen_q: seqlen_q as i32,
            seqlen_k: seqlen_k as i32,
            softmax_scale: a.softmax_scale,
            window_left: wl,
            window_right: wr,
            total_q: rows_q as i32,
            total_k: rows_k as i32,
            mask: mask_ptr,
            mask_strides,
            bias: bias_ptr,
            bias_strides,
            dbias: dbias_ptr,
            dq_accum: if fused.is_some() { accum_ptr } else { 0 },
        };
        let launch = |f: &CudaFunction, key: String, lc: LaunchConfig| -> Result<()> {
            // SAFETY: BwdParams is the parameter layout of every backward entry
            // (tests/nvrtc_params_layout.rs, tests/nvrtc_backward.rs); every buffer was checked
            // above to hold the rows the kernels index for these dims (packed: the caller's
            // cu_seqlens must be consistent with total_q / total_k, as for the forward).
            unsafe { crate::cuda::params::launch(stream, f, lc, &params) }.map_err(|e| {
                AttnError::KernelLaunch {
                    key,
                    msg: e.to_string(),
                }
            })
        };
        if rows_q > 0 {
            launch(
                &self.preprocess,
                self.keys[0].clone(),
                LaunchConfig {
                    grid_dim: (rows_q.div_ceil(PRE_ROWS) as u32, a.num_heads as u32, 1),
                    block_dim: ((PRE_ROWS * 32) as u32, 1, 1),
                    shared_mem_bytes: 0,
                },
            )?;
            if sinks_ptr != 0 && dsinks_ptr != 0 {
                launch(
                    &self.dsink,
                    format!("{}_dsink", self.keys[0]),
                    LaunchConfig {
                        grid_dim: (a.num_heads as u32, 1, 1),
                        block_dim: (DSINK_THREADS as u32, 1, 1),
                        shared_mem_bytes: 0,
                    },
                )?;
            }
        }
        if let Some(f) = fused {
            let t = f.config.prefill_tile();
            if max_k > 0 {
                launch(
                    &f.main,
                    f.key.clone(),
                    LaunchConfig {
                        grid_dim: (
                            max_k.div_ceil(t.block_n) as u32,
                            a.num_groups as u32,
                            a.batch as u32,
                        ),
                        block_dim: ((t.warps * 32) as u32, 1, 1),
                        shared_mem_bytes: f.config.backward_smem_bytes() as u32,
                    },
                )?;
            }
            let pairs = rows_q * a.num_heads * hd / 2;
            if pairs > 0 {
                launch(
                    &f.convert,
                    format!("{}_dq_convert", f.key),
                    LaunchConfig {
                        grid_dim: (pairs.div_ceil(CONVERT_THREADS).min(65535 * 8) as u32, 1, 1),
                        block_dim: (CONVERT_THREADS as u32, 1, 1),
                        shared_mem_bytes: 0,
                    },
                )?;
            }
            return Ok(());
        }
        if max_k > 0 {
            let t = cfg.prefill_tile();
            launch(
                &self.dkdv,
                self.keys[1].clone(),
                LaunchConfig {
                    grid_dim: (
                        max_k.div_ceil(t.block_n) as u32,
                        a.num_groups as u32,
                        a.batch as u32,
                    ),
                    block_dim: ((t.warps * 32) as u32, 1, 1),
                    shared_mem_bytes: cfg.backward_smem_bytes() as u32,
                },
            )?;
        }
        if max_q > 0 {
            let c = &self.configs[2];
            let t = c.prefill_tile();
            launch(
                &self.dq,
                self.keys[2].clone(),
                LaunchConfig {
                    grid_dim: (
                        max_q.div_ceil(t.block_m) as u32,
                        a.num_heads as u32,
                        a.batch as u32,
                    ),
                    block_dim: ((t.warps * 32) as u32, 1, 1),
                    shared_mem_bytes: c.backward_smem_bytes() as u32,
                },
            )?;
        }
        Ok(())
    }
}
