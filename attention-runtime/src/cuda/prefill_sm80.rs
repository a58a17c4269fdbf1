//! Host launcher of the tensor-core prefill kernels (`templates/prefill_sm80.cu`, keys
//! `prefill_*_sm80`, and its Hopper twin `templates/prefill_sm90.cu`, keys `prefill_*_sm90`,
//! sm_90a only: the same parameters and launch shape), straight on cudarc: render → NVRTC CUBIN for the device's arch (or a
//! CUBIN the caller already has, e.g. from the kernel cache) → module → launch.
//!
//! Layouts (row-major, `T` = `half::bf16` or `half::f16`, matching the config's dtype):
//! - padded (no `cu_seqlens`): q, out, gate `[seqlen_q, batch, num_heads, head_dim]`;
//!   k, v `[seqlen_k, batch, num_groups, head_dim]`;
//! - packed (`cu_seqlens_q`, `cu_seqlens_k` int32 `[batch + 1]`): q, out, gate
//!   `[total_q, num_heads, head_dim]`; k, v `[total_k, num_groups, head_dim]`, and
//!   `seqlen_q` is the longest query sequence;
//! - lse: f32 `[num_heads, rows]` (natural log), rows = `seqlen_q * batch` (padded, row
//!   `i * batch + b`) or `total_q` (packed);
//! - max_logit: f32 `[num_heads]`, filled with `-inf` by the caller; the kernel raises it to
//!   each head's largest visible `q·k * softmax_scale` (plus the bias, when there is one);
//! - mask (configs whose mask takes a tensor: padding, padding_causal, arbitrary): uint8,
//!   nonzero = masked out; bias (configs with `has_bias`): f32, added to `q·k * scale`. Both
//!   are indexed `[b, h, i, j]` through four element strides (0 broadcasts), `b` the
//!   sequence, `i`/`j` positions within it (also for packed input); see [`PrefillStrided`].

use std::sync::Arc;

use attention_codegen::render::{KernelConfig, Phase, PrefillTile};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
};
use cudarc::nvrtc::Ptx;

use crate::cuda::params::{FwdParams, FwdTmaParams};
use crate::error::{AttnError, Result};

/// A loaded `prefill_*_sm80` kernel.
pub struct PrefillSm80Kernel {
    key: String,
    config: KernelConfig,
    tile: PrefillTile,
    smem_bytes: usize,
    func: CudaFunction,
}

/// Sequence layout of one launch.
#[derive(Clone, Copy)]
pub enum PrefillLayout<'a> {
    /// `[s, b, heads, hn]` with the same lengths for every sequence.
    Padded {
        /// Query length.
        seqlen_q: usize,
        /// Key length.
        seqlen_k: usize,
    },
    /// Packed varlen: int32 `[batch + 1]` cumulative lengths on the device, and the longest
    /// query sequence and the totals (token counts of q and k).
    Packed {
        /// Query offsets.
        cu_seqlens_q: &'a CudaSlice<i32>,
        /// Key offsets.
        cu_seqlens_k: &'a CudaSlice<i32>,
        /// Longest query sequence (grid size).
        max_seqlen_q: usize,
        /// Query tokens in all (rows of q).
        total_q: usize,
        /// Key tokens in all (rows of k).
        total_k: usize,
    },
}

/// Arguments of one launch (tensors on the launch stream's device).
pub struct PrefillArgs<'a, T> {
    /// Queries (see the module docs for the layout).
    pub q: &'a CudaSlice<T>,
    /// Keys.
    pub k: &'a CudaSlice<T>,
    /// Values.
    pub v: &'a CudaSlice<T>,
    /// Output, same layout as `q`.
    pub out: &'a mut CudaSlice<T>,
    /// LSE, f32 `[num_heads, rows]`.
    pub lse: &'a mut CudaSlice<f32>,
    /// Sequence count.
    pub batch: usize,
    /// Query heads.
    pub num_heads: usize,
    /// K/V groups (divides `num_heads`).
    pub num_groups: usize,
    /// Padded or packed.
    pub layout: PrefillLayout<'a>,
    /// Softmax scale (usually `1 / sqrt(head_dim)`).
    pub softmax_scale: f32,
    /// Sliding window `(left, right)`, `-1` = unbounded; ignored unless the config has one.
    pub window: (i32, i32),
    /// Learnable sink logits f32 `[num_heads]` (learnable sinks only).
    pub sinks: Option<&'a CudaSlice<f32>>,
    /// Output gate (output-gate configs only), layout of `q`.
    pub gate: Option<&'a CudaSlice<T>>,
    /// Per-head max logit f32 `[num_heads]` (pre-filled with `-inf`), or none.
    pub max_logit: Option<&'a mut CudaSlice<f32>>,
}

/// A strided 4-d device tensor `[b, h, i, j]` (mask or bias) over `extent` with element
/// strides `strides` (0 broadcasts a dim). The kernel reads element
/// `b * strides[0] + h * strides[1] + i * strides[2] + j * strides[3]` for every sequence `b`,
/// head `h`, query row `i` and visible key `j` of that sequence; `extent` must be
/// `[batch, num_heads, seqlen_q, seqlen_k]` (packed: the longest query and key sequences).
#[derive(Clone, Copy)]
pub struct PrefillStrided<'a, E> {
    /// Elements (uint8 mask, nonzero = masked out; or f32 bias).
    pub data: &'a CudaSlice<E>,
    /// Element strides of b, h, i, j (non-negative; 0 broadcasts).
    pub strides: [i64; 4],
    /// The logical shape the strides range over.
    pub extent: [usize; 4],
}

/// The optional per-element tensors of a launch ([`PrefillSm80Kernel::launch_with`]).
#[derive(Clone, Copy, Default)]
pub struct PrefillExtras<'a> {
    /// Mask tensor; required exactly when the config's mask takes one.
    pub mask: Option<PrefillStrided<'a, u8>>,
    /// Additive attention bias; required exactly when the config has `has_bias`.
    pub bias: Option<PrefillStrided<'a, f32>>,
    /// int32 flag, nonzero when some element of `v` is NaN or +-Inf (as `qkv_prep` raises
    /// it). When set, kernels whose masks can hide keys inside a tile compute exactly, one
    /// warp per row, so a masked key's V never meets a zero weight (0 * NaN = NaN). `None`:
    /// the caller guarantees V is finite wherever a key can be masked.
    pub v_nonfinite: Option<&'a CudaSlice<i32>>,
}

pub(crate) fn check_strided<E>(
    arg: &str,
    t: &PrefillStrided<'_, E>,
    want: [usize; 4],
    packed: bool,
) -> Result<()> {
    // Padded: the exact extent; packed: batch and heads exact, i/j at least the longest
    // query sequence (the key extent is the caller's max_seqlen_k, not known here).
    let ok = t.extent[0] == want[0]
        && t.extent[1] == want[1]
        && if packed {
            t.extent[2] >= want[2]
        } else {
            t.extent[2] == want[2] && t.extent[3] == want[3]
        };
    if !ok {
        return Err(AttnError::Shape {
            arg: format!("{arg}.extent"),
            expected: format!("{want:?} (batch, num_heads, seqlen_q, seqlen_k)"),
            got: t.extent.to_vec(),
        });
    }
    if t.strides.iter().any(|&x| x < 0) {
        return Err(invalid(
            &format!("{arg}.strides"),
            "non-negative element strides",
            format!("{:?}", t.strides),
        ));
    }
    let mut last: u128 = 0;
    for (n, st) in t.extent.iter().zip(t.strides) {
        if *n == 0 {
            return Ok(());
        }
        last += (*n as u128 - 1) * st as u128;
    }
    if last >= t.data.len() as u128 {
        return Err(AttnError::Shape {
            arg: arg.into(),
            expected: format!(
                "at least {} elements for extent {:?} and strides {:?}",
                last + 1,
                t.extent,
                t.strides
            ),
            got: vec![t.data.len()],
        });
    }
    Ok(())
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

impl PrefillSm80Kernel {
    /// Render `config` (phase [`Phase::PrefillSm80`], or [`Phase::PrefillSm90`] on an sm_90
    /// device: the same parameters and launch shape), compile it with NVRTC for the arch of
    /// `ctx`'s device and load it.
    pub fn compile(ctx: &Arc<CudaContext>, config: &KernelConfig) -> Result<PrefillSm80Kernel> {
        let src = config
            .render()
            .map_err(|e| AttnError::Render(e.to_string()))?;
        let cc = ctx.compute_capability().map_err(|e| AttnError::Cuda {
            call: "cuDeviceGetAttribute compute capability".into(),
            msg: e.to_string(),
        })?;
        let arch = crate::device::arch_for_capability(cc);
        if !config.phase.compiles_for(&arch) {
            return Err(invalid(
                "config.phase",
                format!("a prefill phase this GPU ({arch}) runs (prefill_sm90 needs sm_90a)"),
                config.phase.name().to_string(),
            ));
        }
        let cubin = crate::jit::compile_cubin(&src.key, &src.source, &arch).map_err(|e| {
            AttnError::Cuda {
                call: format!("nvrtc {}", src.key),
                msg: e.to_string(),
            }
        })?;
        PrefillSm80Kernel::from_cubin(ctx, config, cubin)
    }

    /// Load an already compiled CUBIN of `config` (e.g. from the kernel cache) and raise the
    /// function's dynamic shared-memory limit when the tile needs more than 48 KiB.
    pub fn from_cubin(
        ctx: &Arc<CudaContext>,
        config: &KernelConfig,
        cubin: Vec<u8>,
    ) -> Result<PrefillSm80Kernel> {
        if !matches!(config.phase, Phase::PrefillSm80 | Phase::PrefillSm90) {
            return Err(invalid(
                "config.phase",
                "prefill_sm80 or prefill_sm90",
                config.phase.name().to_string(),
            ));
        }
        let key = config.key();
        let tile = config.prefill_tile();
        let smem_bytes = config.prefill_smem_bytes();
        check_tma_param_table(config, &cubin)?;
        let module = ctx
            .load_module(Ptx::from_binary(cubin))
            .map_err(|e| AttnError::Cuda {
                call: format!("cuModuleLoadData {key}"),
                msg: e.to_string(),
            })?;
        let func = module.load_function(&key).map_err(|e| AttnError::Cuda {
            call: format!("cuModuleGetFunction {key}"),
            msg: e.to_string(),
        })?;
        let max_optin = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(|e| AttnError::Cuda {
                call: "cuDeviceGetAttribute max shared memory per block (opt-in)".into(),
                msg: e.to_string(),
            })? as usize;
        if smem_bytes > max_optin {
            return Err(invalid(
                "config.tile",
                format!("a tile needing at most {max_optin} bytes of shared memory on this GPU"),
                format!("{} ({smem_bytes} bytes)", tile.key()),
            ));
        }
        if smem_bytes > 48 * 1024 {
            func.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_bytes as i32,
            )
            .map_err(|e| AttnError::Cuda {
                call: format!("cuFuncSetAttribute max dynamic shared memory {key}"),
                msg: e.to_string(),
            })?;
        }
        Ok(PrefillSm80Kernel {
            key,
            config: config.clone(),
            tile,
            smem_bytes,
            func,
        })
    }

    /// The kernel key (entry name).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The tile the kernel was rendered with.
    pub fn tile(&self) -> PrefillTile {
        self.tile
    }

    /// Whether the kernel takes TMA tensor maps after its fields ([`FwdTmaParams`]): see
    /// [`takes_tma_maps`].
    pub fn takes_tma_maps(&self) -> bool {
        takes_tma_maps(&self.config)
    }

    /// Dynamic shared memory per block, bytes.
    pub fn smem_bytes(&self) -> usize {
        self.smem_bytes
    }

    /// Queue one forward on `stream` (a config without mask tensor and bias; see
    /// [`PrefillSm80Kernel::launch_with`]). Checks the dims and buffer sizes first (typed errors
    /// naming the argument); a failed launch names the kernel key.
    pub fn launch<T: DeviceRepr>(
        &self,
        stream: &Arc<CudaStream>,
        a: PrefillArgs<'_, T>,
    ) -> Result<()> {
        self.launch_with(stream, a, PrefillExtras::default())
    }

    /// [`PrefillSm80Kernel::launch`] with the mask tensor and / or additive bias the config takes
    /// (each required exactly when the config reads it).
    pub fn launch_with<T: DeviceRepr>(
        &self,
        stream: &Arc<CudaStream>,
        a: PrefillArgs<'_, T>,
        extras: PrefillExtras<'_>,
    ) -> Result<()> {
        let hd = self.config.head_dim;
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
        let (rows_q, rows_k, grid_q, seqlen_q, seqlen_k) = match a.layout {
            PrefillLayout::Padded { seqlen_q, seqlen_k } => (
                seqlen_q * a.batch,
                seqlen_k * a.batch,
                seqlen_q,
                seqlen_q,
                seqlen_k,
            ),
            PrefillLayout::Packed {
                cu_seqlens_q,
                cu_seqlens_k,
                max_seqlen_q,
                total_q,
                total_k,
            } => {
                check_len("cu_seqlens_q", cu_seqlens_q, a.batch + 1)?;
                check_len("cu_seqlens_k", cu_seqlens_k, a.batch + 1)?;
                (total_q, total_k, max_seqlen_q, max_seqlen_q, 0)
            }
        };
        if seqlen_q > i32::MAX as usize || seqlen_k > i32::MAX as usize {
            return Err(invalid(
                "seqlen",
                "at most i32::MAX",
                seqlen_q.max(seqlen_k),
            ));
        }
        check_len("q", a.q, rows_q * a.num_heads * hd)?;
        check_len("out", a.out, rows_q * a.num_heads * hd)?;
        check_len("k", a.k, rows_k * a.num_groups * hd)?;
        check_len("v", a.v, rows_k * a.num_groups * hd)?;
        check_len("lse", a.lse, rows_q * a.num_heads)?;
        if let Some(g) = a.gate {
            check_len("gate", g, rows_q * a.num_heads * hd)?;
        } else if self.config.output_gate {
            return Err(invalid(
                "gate",
                "a gate tensor (the kernel has an output gate)",
                "none",
            ));
        }
        match (a.sinks, self.config.sinks) {
            (Some(s), _) => check_len("sinks", s, a.num_heads)?,
            (None, Some(attention_codegen::Sinks::Learnable)) => {
                return Err(invalid(
                    "sinks",
                    "learnable sink logits [num_heads]",
                    "none",
                ))
            }
            _ => {}
        }
        if let Some(m) = a.max_logit.as_deref() {
            check_len("max_logit", m, a.num_heads)?;
        }
        let packed = matches!(a.layout, PrefillLayout::Packed { .. });
        let want = [a.batch, a.num_heads, seqlen_q, seqlen_k];
        let takes_mask = self.config.mask.is_some_and(|m| m.takes_mask_tensor());
        match (&extras.mask, takes_mask) {
            (Some(m), true) => check_strided("mask", m, want, packed)?,
            (None, false) => {}
            (Some(_), false) => {
                return Err(invalid(
                    "mask",
                    format!("no mask tensor (kernel {} reads none)", self.key),
                    "a mask tensor",
                ))
            }
            (None, true) => {
                return Err(invalid(
                    "mask",
                    format!("a uint8 mask tensor (kernel {} reads one)", self.key),
                    "none",
                ))
            }
        }
        match (&extras.bias, self.config.has_bias) {
            (Some(bi), true) => check_strided("bias", bi, want, packed)?,
            (None, false) => {}
            (Some(_), false) => {
                return Err(invalid(
                    "bias",
                    format!("no bias tensor (kernel {} reads none)", self.key),
                    "a bias tensor",
                ))
            }
            (None, true) => {
                return Err(invalid(
                    "bias",
                    format!("an f32 bias tensor (kernel {} reads one)", self.key),
                    "none",
                ))
            }
        }
        if grid_q == 0 {
            return Ok(());
        }

        // Raw device pointers (0 = null); the guards keep cudarc's stream ordering.
        let (q_ptr, _g1) = a.q.device_ptr(stream);
        let (k_ptr, _g2) = a.k.device_ptr(stream);
        let (v_ptr, _g3) = a.v.device_ptr(stream);
        let (out_ptr, _g4) = a.out.device_ptr_mut(stream);
        let (lse_ptr, _g5) = a.lse.device_ptr_mut(stream);
        let (cuq, _g6, cuk, _g7) = match a.layout {
            PrefillLayout::Packed {
                cu_seqlens_q,
                cu_seqlens_k,
                ..
            } => {
                let (p, g) = cu_seqlens_q.device_ptr(stream);
                let (p2, g2) = cu_seqlens_k.device_ptr(stream);
                (p, Some(g), p2, Some(g2))
            }
            PrefillLayout::Padded { .. } => (0, None, 0, None),
        };
        let (sinks_ptr, _g8) = match a.sinks {
            Some(s) => {
                let (p, g) = s.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (gate_ptr, _g9) = match a.gate {
            Some(s) => {
                let (p, g) = s.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (ml_ptr, _g10) = match a.max_logit {
            Some(s) => {
                let (p, g) = s.device_ptr_mut(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (mask_ptr, _g11, ms) = match &extras.mask {
            Some(m) => {
                let (p, g) = m.data.device_ptr(stream);
                (p, Some(g), m.strides)
            }
            None => (0, None, [0; 4]),
        };
        let (bias_ptr, _g12, bs) = match &extras.bias {
            Some(m) => {
                let (p, g) = m.data.device_ptr(stream);
                (p, Some(g), m.strides)
            }
            None => (0, None, [0; 4]),
        };
        let (vflag_ptr, _g13) = match extras.v_nonfinite {
            Some(f) => {
                check_len("v_nonfinite", f, 1)?;
                let (p, g) = f.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (wl, wr) = a.window;
        let params = FwdParams {
            q: q_ptr,
            k: k_ptr,
            v: v_ptr,
            out: out_ptr,
            lse: lse_ptr,
            cu_seqlens_q: cuq,
            cu_seqlens_k: cuk,
            batch: a.batch as i32,
            num_heads: a.num_heads as i32,
            num_groups: a.num_groups as i32,
            seqlen_q: seqlen_q as i32,
            seqlen_k: seqlen_k as i32,
            softmax_scale: a.softmax_scale,
            window_left: wl,
            window_right: wr,
            mask: mask_ptr,
            mask_strides: ms,
            bias: bias_ptr,
            bias_strides: bs,
            sinks: sinks_ptr,
            gate: gate_ptr,
            max_logit: ml_ptr,
            v_nonfinite: vflag_ptr,
            // Static-cache and paged modes off (the layer's prefill and forward_paged use
            // them through their own launches).
            ..FwdParams::default()
        };
        let cfg =
            crate::cuda::params::fwd_launch_config(&self.config, grid_q, a.num_heads, a.batch);
        // SAFETY: FwdParams is this family's parameter layout (tests/nvrtc_params_layout.rs;
        // the warp-specialized tile's FwdTmaParams: tests/nvrtc_catalog.rs); every buffer was
        // checked above to hold the elements the kernel indexes for these dims (mask / bias:
        // the largest strided offset over their extent), q rows_q and k / v rows_k tokens.
        unsafe {
            launch_prefill(
                stream,
                &self.func,
                &self.key,
                &self.config,
                cfg,
                &params,
                (rows_q, rows_k),
            )
        }
    }
}

/// Whether a kernel compiled for `config` takes TMA tensor maps after [`FwdParams`]' fields
/// ([`FwdTmaParams`]): the warp-specialized `prefill_*_sm90` tile
/// ([`PrefillTile::producer_sm90`]).
pub fn takes_tma_maps(config: &KernelConfig) -> bool {
    config.phase == Phase::PrefillSm90 && config.prefill_tile().producer_sm90()
}

/// Queue one kernel of the forward family (`prefill_*_sm80`, `prefill_*_sm90`,
/// `prefill_rows_*`, `decode_rows_*`: every kernel whose parameters are [`FwdParams`]),
/// `func` compiled for `config`, on `stream`. A kernel that [`takes_tma_maps`] gets
/// [`FwdTmaParams`]: `params` plus the TMA maps of its q, k and v
/// ([`crate::cuda::tma::prefill_maps`]; `tokens` are the token rows of the q tensor and of
/// the k / v tensors, `[tokens, heads, head_dim]`, a static cache layer's `max_seq *
/// max_batch`); every other kernel gets `params` alone. This is the only launch path of the
/// family, so no kernel can be handed a parameter buffer of the other shape.
///
/// # Errors
/// [`AttnError::Cuda`] when the driver refuses a tensor map; [`AttnError::InvalidArgument`]
/// when a paged pool's kernel (which loads only by TMA) cannot have maps (see
/// [`crate::cuda::tma::prefill_maps`]); [`AttnError::KernelLaunch`] (naming `key`) when the
/// launch fails.
///
/// # Safety
/// As [`crate::cuda::params::launch`]: `config` is the kernel's own config, and `params`
/// points at live device buffers holding what the kernel indexes under `cfg`; the q and k / v
/// tensors hold at least `tokens` rows from `params.q` and from `params.k` / `params.v`.
pub unsafe fn launch_prefill(
    stream: &Arc<CudaStream>,
    func: &CudaFunction,
    key: &str,
    config: &KernelConfig,
    cfg: cudarc::driver::LaunchConfig,
    params: &FwdParams,
    tokens: (usize, usize),
) -> Result<()> {
    let launched = if takes_tma_maps(config) {
        let tile = config.prefill_tile();
        let maps = crate::cuda::tma::prefill_maps(
            config.dtype,
            params,
            config.head_dim,
            (tile.block_m, tile.block_n),
            tokens,
        )?;
        if config.paged_kv && maps.enabled == 0 {
            // The paged pool's warp-specialized kernel has no cp.async producer.
            return Err(AttnError::InvalidArgument {
                arg: "paged pool".into(),
                expected: format!(
                    "a block size that is a power of two >= 16 and 16-byte aligned q and pools \
                     below 2^31 rows (the TMA maps of kernel {key})"
                ),
                got: format!(
                    "block size {}, q at {:#x}, k at {:#x}, v at {:#x}, {} q and {} pool rows",
                    params.block_size, params.q, params.k, params.v, tokens.0, tokens.1
                ),
            });
        }
        let p = FwdTmaParams {
            fwd: *params,
            pad: 0,
            maps,
        };
        // SAFETY: FwdTmaParams is this kernel's parameter layout (FwdParams' fields, then the
        // maps: tests/nvrtc_catalog.rs, and check_tma_param_table when the CUBIN is loaded
        // by either loader); the caller
        // vouches for the buffers, and each map covers at most the tokens it was given.
        unsafe { crate::cuda::params::launch(stream, func, cfg, &p) }
    } else {
        // SAFETY: FwdParams is the parameter layout of this family's other kernels
        // (tests/nvrtc_params_layout.rs); the caller vouches for the buffers.
        unsafe { crate::cuda::params::launch(stream, func, cfg, params) }
    };
    launched.map_err(|e| AttnError::KernelLaunch {
        key: key.to_string(),
        msg: e.to_string(),
    })
}

/// For a kernel that [`takes_tma_maps`]: its CUBIN's parameter table must be
/// [`crate::cuda::params::fwd_tma_param_layout`]'s, since [`launch_prefill`] writes the maps at
/// [`FwdTmaParams`]' offset (NVRTC places them; a mismatch would silently read the maps and
/// `enabled` from the wrong bytes). Other kernels pass unchecked. Called wherever such a CUBIN
/// is loaded ([`PrefillSm80Kernel::from_cubin`], the layer's `launch::load_module`).
///
/// # Errors
/// [`AttnError::Cuda`] (`call` "parameter table of KEY") with both layouts.
pub fn check_tma_param_table(config: &KernelConfig, cubin: &[u8]) -> Result<()> {
    if !takes_tma_maps(config) {
        return Ok(());
    }
    let key = config.key();
    let want = crate::cuda::params::fwd_tma_param_layout();
    let got = crate::jit::cubin_param_layout(cubin, &key);
    if got.as_ref() == Some(&want) {
        return Ok(());
    }
    Err(AttnError::Cuda {
        call: format!("parameter table of {key}"),
        msg: format!("the kernel takes (offset, size) {got:?}, the host launches {want:?}"),
    })
}
