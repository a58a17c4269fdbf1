//! The kernel registry: the one answer to "which kernels does a layer with this spec launch?".
//!
//! [`kernels_for`] lists, for a spec, a head dim and a [`Target`], every [`KernelConfig`] the
//! runtime's CUDA layer can launch. It is built from one function per kernel family
//! ([`qkv_prep`], [`qkv_prep_for_decode_splitkv`], [`prefill_rows`], [`prefill_sm80`],
//! [`prefill_sm90`] (both through [`prefill_tensor_core`]), [`decode_rows`], [`decode_rows_paged`], [`decode_splitkv_paged`], [`decode_splitkv`],
//! [`append_kv`], [`cross_cache_step`]); the runtime builds its launch configs with the same
//! functions, so the two cannot drift. Everything that lists kernels uses it: the macro's `KERNELS`
//! table, `attn render`, `attn aot --spec` and `--catalog`, the catalog (`kernels-generated/`) and
//! the runtime.
//!
//! The families, by key prefix ([`Phase`] in [`crate::render`]; a key's last part is the
//! arch where the kernel needs one, `_sm80` = sm_80 and later, `_sm90` = sm_90a only):
//!
//! | family | what | runs on | where it cannot run |
//! |---|---|---|---|
//! | `prefill_*_sm80` ([`prefill_sm80`]) | FlashAttention-2 style prefill / forward on tensor cores: padded or packed, over a static cache in place ([`cache_prefill`], [`cross_cache_step`]) or a paged pool (`_paged`, [`paged_prefill`]) | sm_80+ and its tile's shared memory | `prefill_rows_*` (forward), `decode_rows_*` (static cache), `decode_rows_*_paged` (paged pool) |
//! | `prefill_*_sm90` ([`prefill_sm90`]) | the same forward (every feature, static cache, paged pool) on Hopper's warpgroup MMA (`wgmma`) | sm_90a (an sm_90 device; [`Target::Device`]'s `wgmma`), head dims 64, 128, 192, 256 ([`SM90_MIN_HEAD_DIM`], multiples of 64) | `prefill_*_sm80` |
//! | `prefill_rows_*` ([`prefill_rows`]) | fallback: one warp per query row, padded or packed | any | — |
//! | `decode_rows_*` ([`decode_rows`]) | fallback: one warp per query row over a static cache (`_full`: cross-attention, no causal mask) | any | — |
//! | `decode_rows_*_paged` ([`decode_rows_paged`]) | fallback: one warp per query row over a paged pool, decode rows and prefill chunks alike | any | — |
//! | `decode_splitkv_*` ([`decode_splitkv`], [`decode_splitkv_rows`], [`decode_splitkv_paged`], [`decode_splitkv_paged_rows`]) | split-KV decode on tensor cores, the same module's `<key>_combine` combining the splits; static: fused rope + append of 1 to 16 new tokens per sequence (`_rb2` / `_rb4`: 32 / 64 query rows per pass for multi-token steps); `_paged`: a paged batch's decode requests of 1 to 16 new tokens | sm_80+ | static: none; `_paged`: the rows join the batch's prefill launch (`prefill_*_paged_sm80` or `decode_rows_*_paged`) |
//! | `append_kv_*` ([`append_kv`]) | new k/v rows into a static cache or a paged pool | any | — |
//! | `qkv_prep_*` ([`qkv_prep`], [`qkv_prep_for_decode_splitkv`]) | q/k norm, rope, output-gate and layout split | any | — |
//!
//! [`kernels_for`] always lists `prefill_rows_*` (the forward also falls back to it when the
//! tensor-core kernel, `_sm80` or `_sm90`, fails to build) and, for self-attention, `decode_rows_*` and
//! `decode_rows_*_paged`; cross-attention's `decode_rows_*_full` only for [`Target::AnyDevice`]
//! and where the device cannot run the tensor-core step. The tests that hold this:
//! `prefill_sm80_needs_sm80_and_the_tile_smem` and `cross_lists_its_context_cache_step` (here);
//! in attention-runtime/tests/kernel_registry.rs
//! `aot_list_per_arch_drops_sm80_kernels_the_device_cannot_run`,
//! `sm80_kernel_build_failure_falls_back_with_a_warning` (a `_sm80` kernel that fails to build
//! falls back to `prefill_rows_*` with a warning) and
//! `jit_off_without_the_sm80_kernel_is_an_error_naming_it` (under `ATTN_JIT=off` a missing
//! `_sm80` kernel is an error, never a quiet fallback).
//!
//! Runtime choices it covers:
//! - forward (prefill / training): every mask type the spec lists, each without and with an
//!   additive attention bias (the bias tensor is a per-call argument), both `prefill_*_sm80`
//!   (launched first when the [`Target`] can run it) and `prefill_rows_*` (its fallback,
//!   always listed);
//! - `qkv_prep` with the spec's rope (forward, prefill, paged prefill) and, for
//!   self-attention with rope, without it (the fused decode step applies rope itself);
//! - static-cache prefill (`append_kv_*` + `prefill_*_sm80` over the cache, or
//!   `decode_rows_*`) and decode steps of 1 to 16 tokens (`decode_splitkv_*`, its `_rb2` / `_rb4`
//!   variants where the target's shared memory holds them, and their `<key>_combine`), paged
//!   mixed batches (`append_kv_*`, the prefill chunks on `prefill_*_paged_sm80`, the decode rows
//!   on `decode_splitkv_*_paged` and its combine step, or all of them on
//!   `decode_rows_*_paged`): self-attention only;
//! - cross-attention over a context cache (encoder-decoder decoding): `qkv_prep` (cross
//!   layout) + `append_kv_*` fill the cache once per request, then every step attends over it
//!   with `prefill_*_no_mask_sm80` ([`cross_cache_step`]) or, where the device cannot run it,
//!   `decode_rows_*_full`.
//!
//! Not covered: a per-call `mask_type` that the spec does not list (such a kernel is compiled
//! on demand, and with `ATTN_JIT=off` its absence is an error naming it) and hand-built
//! configs with other tiles (benchmarks).

use crate::render::{
    decode_splitkv_row_blocks, decode_splitkv_runs, decode_splitkv_warps, rot_dim, KernelConfig,
    Phase, PrepLayout, RenderError,
};
use crate::spec::{AttentionKind, AttentionSpec, MaskType, SUPPORTED_HEAD_DIMS};

/// The lowest SM version the tensor-core kernels (`_sm80` keys: `prefill_*_sm80`; and
/// `decode_splitkv_*`, see [`decode_splitkv_paged`]) run on: they use
/// `mma.sync` m16n8k16 on bf16/f16 and `cp.async`, both sm_80 and later.
pub const TENSOR_CORE_MIN_SM: u32 = 80;

/// The device a kernel list is for. It only decides which tensor-core forward kernel can run
/// (`_sm90` needs sm_90a's wgmma, `_sm80` sm_80+, both their tile's shared memory); every other
/// kernel runs anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Any device: the union over devices (the macro's `KERNELS`, the catalog, `attn render`).
    AnyDevice,
    /// One device.
    Device {
        /// SM version, `major * 10 + minor` (`90` for `sm_90a`).
        sm: u32,
        /// Opt-in shared memory per block in bytes
        /// (`CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`).
        smem_optin: usize,
        /// Whether kernels may use Hopper's arch-specific warpgroup MMA (`wgmma`): code built
        /// for `sm_90a` on an sm_90 device. `sm_90` without the `a` (and every other arch)
        /// has none; the runtime sets it on sm_90 devices unless `ATTN_DISABLE_SM90` is set.
        wgmma: bool,
    },
}

/// Opt-in shared memory per block of an SM version (CUDA programming guide, "Technical
/// Specifications per Compute Capability"); `None` for a version this table does not know.
pub fn smem_optin_for_sm(sm: u32) -> Option<usize> {
    let kib = match sm {
        70 | 72 => 96,
        75 => 64,
        80 | 87 => 163,
        86 | 89 | 120 | 121 => 99,
        90 | 100 | 101 | 103 | 110 => 227,
        _ => return None,
    };
    Some(kib * 1024)
}

impl Target {
    /// The target of an NVRTC arch name (`sm_90a`, `sm_80`, `compute_86`); `wgmma` exactly for
    /// `sm_90a` / `compute_90a`. An SM version [`smem_optin_for_sm`] does not know gives
    /// [`Target::AnyDevice`] (list every portable kernel: compiling one too many beats missing
    /// one under `ATTN_JIT=off`).
    pub fn from_arch(arch: &str) -> Result<Target, RenderError> {
        let sm = arch
            .strip_prefix("sm_")
            .or_else(|| arch.strip_prefix("compute_"))
            .map(|rest| rest.trim_end_matches(['a', 'f']))
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<u32>().ok())
            .ok_or_else(|| RenderError::BadArch {
                arch: arch.to_string(),
            })?;
        let wgmma = sm == 90 && arch.ends_with("90a");
        Ok(match smem_optin_for_sm(sm) {
            Some(smem_optin) => Target::Device {
                sm,
                smem_optin,
                wgmma,
            },
            None => Target::AnyDevice,
        })
    }

    /// Whether the prefill config `fast` (phase [`Phase::PrefillSm80`]) runs here: SM
    /// version at least [`TENSOR_CORE_MIN_SM`] and its tile's shared memory within the
    /// opt-in limit.
    pub fn runs_prefill_sm80(&self, fast: &KernelConfig) -> bool {
        match *self {
            Target::AnyDevice => true,
            Target::Device { sm, smem_optin, .. } => {
                sm >= TENSOR_CORE_MIN_SM
                    && fast.prefill_tile().smem_bytes(fast.head_dim) <= smem_optin
            }
        }
    }
}

fn check_head_dim(head_dim: usize) -> Result<(), RenderError> {
    if SUPPORTED_HEAD_DIMS.contains(&head_dim) {
        Ok(())
    } else {
        Err(RenderError::UnsupportedHeadDim {
            head_dim,
            supported: SUPPORTED_HEAD_DIMS,
        })
    }
}

fn is_self(spec: &AttentionSpec) -> bool {
    spec.kind == AttentionKind::SelfAttention
}

/// The `qkv_prep` kernel of the forward, prefill and paged prefill: the spec's layout, q/k
/// norm, output gate and rope. Errors: a rotary fraction that gives no valid channel count.
pub fn qkv_prep(spec: &AttentionSpec, head_dim: usize) -> Result<KernelConfig, RenderError> {
    let mut prep = KernelConfig::new(Phase::QkvPrep, spec.dtype, head_dim);
    prep.layout = if is_self(spec) {
        PrepLayout::SelfAttention
    } else {
        PrepLayout::CrossAttention
    };
    prep.qk_norm = spec.qk_norm;
    prep.output_gate = spec.output_gate;
    prep.rope = match spec.rope {
        Some(r) => Some((r.mode, rot_dim(head_dim, r.rotary_percent)?)),
        None => None,
    };
    Ok(prep)
}

/// The `qkv_prep` kernel of a fused decode step ([`decode_splitkv`]): [`qkv_prep`] without
/// rope, which the `decode_splitkv` kernel applies from its cos/sin tables.
pub fn qkv_prep_for_decode_splitkv(
    spec: &AttentionSpec,
    head_dim: usize,
) -> Result<KernelConfig, RenderError> {
    let mut prep = qkv_prep(spec, head_dim)?;
    prep.rope = None;
    Ok(prep)
}

/// An attention-phase config with the spec's window, sinks, gate and causality.
fn attention(spec: &AttentionSpec, head_dim: usize, phase: Phase) -> KernelConfig {
    let mut c = KernelConfig::new(phase, spec.dtype, head_dim);
    c.has_window = spec.window.is_some();
    c.sinks = spec.sinks;
    c.output_gate = spec.output_gate;
    c.causal = is_self(spec);
    c
}

/// The general forward kernel (`prefill_rows_*`) for a call with mask type `mask` and, when
/// `has_bias`, an additive attention bias tensor. It is the fallback of [`prefill_sm80`].
pub fn prefill_rows(
    spec: &AttentionSpec,
    head_dim: usize,
    mask: MaskType,
    has_bias: bool,
) -> KernelConfig {
    let mut c = attention(spec, head_dim, Phase::PrefillRows);
    c.mask = Some(mask);
    c.has_bias = has_bias;
    c
}

/// The tensor-core forward kernel (`prefill_*_sm80`, default tile) the runtime launches instead
/// of the one-warp-per-row kernel `prefill_rows` (a [`prefill_rows`] config) when `target`
/// can run it; `None` when it cannot (then `prefill_rows` runs).
pub fn prefill_sm80(fwd: &KernelConfig, target: Target) -> Option<KernelConfig> {
    let mut c = fwd.clone();
    c.phase = Phase::PrefillSm80;
    c.tile = None;
    target.runs_prefill_sm80(&c).then_some(c)
}

/// The smallest head dim the registry runs `prefill_*_sm90` at (every multiple of 64 from
/// here). The first wgmma kernel measured 0.86-0.93x the sm80 kernel at head dim 64 (H200,
/// 2026-11-30), so it started at 128; the warp-specialized tile with TMA loads measured
/// 1.20-1.38x the sm80 kernel at head dim 64, 2k-16k tokens, causal and not (H200,
/// 2026-12-01, `attn bench prefill --head-dims 64 --tiles 64:sm90:m128n128w12s3`; a paged
/// pool's prefill runs the same tile, not yet measured at head dim 64).
pub const SM90_MIN_HEAD_DIM: usize = 64;

/// The Hopper forward kernel (`prefill_*_sm90`, warpgroup MMA, default tile) for the prefill
/// config `fwd`: `Some` on a device with `wgmma` (sm_90a) when the head dim is a multiple of
/// 64 and at least [`SM90_MIN_HEAD_DIM`] and the tile's shared memory fits, and for
/// [`Target::AnyDevice`] (the union over devices); `None` otherwise.
pub fn prefill_sm90(fwd: &KernelConfig, target: Target) -> Option<KernelConfig> {
    if fwd.head_dim < SM90_MIN_HEAD_DIM {
        return None;
    }
    let mut c = fwd.clone();
    c.phase = Phase::PrefillSm90;
    c.tile = None;
    if c.check_config().is_err() {
        return None;
    }
    let runs = match target {
        Target::AnyDevice => true,
        Target::Device {
            wgmma, smem_optin, ..
        } => wgmma && c.prefill_smem_bytes() <= smem_optin,
    };
    runs.then_some(c)
}

/// The tensor-core forward kernel a device runs for the prefill config `fwd`: `prefill_sm90`
/// on Hopper where it exists, else `prefill_sm80` where that runs, else `None` (then
/// `prefill_rows`). For [`Target::AnyDevice`] the portable `prefill_sm80`.
pub fn prefill_tensor_core(fwd: &KernelConfig, target: Target) -> Option<KernelConfig> {
    match target {
        Target::AnyDevice => prefill_sm80(fwd, target),
        Target::Device { .. } => prefill_sm90(fwd, target).or_else(|| prefill_sm80(fwd, target)),
    }
}

/// Every tensor-core forward kernel `target` may run for `fwd`: the one of
/// [`prefill_tensor_core`], and for [`Target::AnyDevice`] the Hopper one too.
fn tensor_core_variants(fwd: &KernelConfig, target: Target) -> Vec<KernelConfig> {
    let mut out: Vec<KernelConfig> = prefill_tensor_core(fwd, target).into_iter().collect();
    if target == Target::AnyDevice {
        out.extend(prefill_sm90(fwd, target));
    }
    out
}

/// The tensor-core attention of a prefill over a static cache: the forward kernel with the
/// bottom-right causal mask and no bias, which `prefill_sm80` runs in its static-cache mode
/// (reading the cache slots in place). `None` when `target` cannot run it; the
/// [`decode_rows`] kernel runs then.
pub fn cache_prefill(
    spec: &AttentionSpec,
    head_dim: usize,
    target: Target,
) -> Option<KernelConfig> {
    prefill_tensor_core(
        &prefill_rows(spec, head_dim, MaskType::CausalBottomRight, false),
        target,
    )
}

/// The tensor-core attention of a paged mixed batch (decode rows and prefill chunks in one
/// launch): the forward kernel with the bottom-right causal mask reading K/V through the
/// block table (`_paged`). `None` when `target` cannot run it; the [`decode_rows_paged`] kernel
/// runs then.
pub fn paged_prefill(
    spec: &AttentionSpec,
    head_dim: usize,
    target: Target,
) -> Option<KernelConfig> {
    let mut c = cache_prefill(spec, head_dim, target)?;
    c.paged_kv = true;
    Some(c)
}

/// The split-KV decode of a paged mixed batch's decode rows (one new token each): the
/// `decode_splitkv` kernel and its combine step in their paged mode (`_paged`, no rope: `qkv_prep`
/// rotated q and k, `append_kv` wrote the new k/v), reading K/V through the block table. The
/// batch's other requests (prefill chunks) run [`paged_prefill`]. `None` when `target` cannot run
/// it (sm_80+ and [`decode_splitkv_runs`]: its shared memory within the opt-in limit); every request
/// then runs the prefill kernel.
pub fn decode_splitkv_paged(
    spec: &AttentionSpec,
    head_dim: usize,
    target: Target,
) -> Option<KernelConfig> {
    let runs = match target {
        Target::AnyDevice => true,
        Target::Device { sm, smem_optin, .. } => {
            sm >= TENSOR_CORE_MIN_SM && decode_splitkv_runs(head_dim, 1, smem_optin)
        }
    };
    let mut c = attention(spec, head_dim, Phase::DecodeSplitKv);
    c.paged_kv = true;
    runs.then_some(c)
}

/// [`decode_splitkv_paged`] for decode requests of up to `rows` query rows per group (heads
/// per group times their most new tokens, 1 to 16 each): the row-block variant of
/// [`decode_splitkv_row_blocks`] for `target`'s shared memory (the largest known opt-in limit
/// for [`Target::AnyDevice`]). `None` where [`decode_splitkv_paged`] is.
pub fn decode_splitkv_paged_rows(
    spec: &AttentionSpec,
    head_dim: usize,
    rows: usize,
    target: Target,
) -> Option<KernelConfig> {
    let c = decode_splitkv_paged(spec, head_dim, target)?;
    let rb = decode_splitkv_row_blocks(head_dim, rows, smem_optin_of(target))?;
    Some(with_row_blocks(c, rb))
}

/// The static-cache attention kernel (`decode_rows_*`) of a prefill step (any number of new
/// queries); bottom-right causal for self-attention, over the whole cache for cross.
pub fn decode_rows(spec: &AttentionSpec, head_dim: usize) -> KernelConfig {
    attention(spec, head_dim, Phase::DecodeRows)
}

/// The tensor-core attention of a cross-attention step over a context cache: the forward
/// kernel without mask or bias (`no_mask`), which `prefill_sm80` runs in its static-cache mode
/// (each slot's keys `0 .. context length`; keys past it, padding, are never visible) with
/// the spec's window and sinks. `None` when `target` cannot run it; the [`decode_rows`] kernel
/// (`decode_rows_*_full` for cross-attention: no causal mask) runs then.
pub fn cross_cache_step(
    spec: &AttentionSpec,
    head_dim: usize,
    target: Target,
) -> Option<KernelConfig> {
    prefill_tensor_core(
        &prefill_rows(spec, head_dim, MaskType::NoMask, false),
        target,
    )
}

/// The paged-cache attention kernel (`decode_rows_*_paged`) of a paged prefill.
pub fn decode_rows_paged(spec: &AttentionSpec, head_dim: usize) -> KernelConfig {
    attention(spec, head_dim, Phase::DecodeRowsPaged)
}

/// The fused decode-step kernel (`decode_splitkv_*`, plus `<key>_combine` in the same module), with
/// the spec's rope. Errors as [`qkv_prep`].
pub fn decode_splitkv(spec: &AttentionSpec, head_dim: usize) -> Result<KernelConfig, RenderError> {
    let mut c = attention(spec, head_dim, Phase::DecodeSplitKv);
    c.rope = qkv_prep(spec, head_dim)?.rope;
    Ok(c)
}

/// The fused decode-step kernel of a step whose group has `rows` query rows (heads per group
/// times new tokens: multi-token decode) on a device with `smem_optin` bytes of opt-in shared
/// memory per block: [`decode_splitkv`] with the row-block count of
/// [`decode_splitkv_row_blocks`]. `Ok(None)` when not even one row block fits. Errors as
/// [`decode_splitkv`].
pub fn decode_splitkv_rows(
    spec: &AttentionSpec,
    head_dim: usize,
    rows: usize,
    smem_optin: usize,
) -> Result<Option<KernelConfig>, RenderError> {
    let c = decode_splitkv(spec, head_dim)?;
    Ok(decode_splitkv_row_blocks(head_dim, rows, smem_optin).map(|rb| with_row_blocks(c, rb)))
}

/// `c` (a `decode_splitkv` config) with `rb` row blocks and the block size they take.
fn with_row_blocks(mut c: KernelConfig, rb: usize) -> KernelConfig {
    c.row_blocks = rb;
    c.warps = decode_splitkv_warps(rb);
    c
}

/// The opt-in shared memory per block of `target`: its own, or the largest known one for
/// [`Target::AnyDevice`] (the union over devices).
fn smem_optin_of(target: Target) -> usize {
    match target {
        Target::AnyDevice => max_smem_optin(),
        Target::Device { smem_optin, .. } => smem_optin,
    }
}

/// The query rows per group a decode step of 1 to
/// [`DECODE_SPLITKV_MAX_TOKENS`](crate::render::DECODE_SPLITKV_MAX_TOKENS) tokens has: heads per
/// group times the tokens when the spec fixes its heads (and groups), else every row count up
/// to 64 (the most one pass takes), so that every row-block variant is covered.
pub fn decode_step_rows(spec: &AttentionSpec) -> Vec<usize> {
    let tokens = 1..=crate::render::DECODE_SPLITKV_MAX_TOKENS;
    match spec.heads {
        Some(h) => {
            let per = h / spec.gqa.unwrap_or(h).max(1);
            tokens.map(|t| per.max(1) * t).collect()
        }
        None => (1..=64).collect(),
    }
}

/// The largest opt-in shared memory per block of the SM versions [`smem_optin_for_sm`] knows:
/// the kernels a [`Target::AnyDevice`] list includes are those some device can run.
fn max_smem_optin() -> usize {
    (70..=130).filter_map(smem_optin_for_sm).max().unwrap_or(0)
}

/// The k/v append kernel (`append_kv_*`) of static-cache and paged prefill.
pub fn append_kv(spec: &AttentionSpec, head_dim: usize) -> KernelConfig {
    KernelConfig::new(Phase::AppendKv, spec.dtype, head_dim)
}

/// The attention backward kernels of one training call: the preprocess (D = rowsum(dO ∘ O),
/// and the learnable sinks' gradient), dK/dV and dQ, for mask `mask` with the spec's window,
/// in launch order (mask tensors are per-call arguments of the variants whose mask takes
/// one). Errors ([`RenderError::Unsupported`]): a head dim outside
/// [`BACKWARD_HEAD_DIMS`](crate::render::BACKWARD_HEAD_DIMS), an output gate; and a `target`
/// that cannot run them (below sm_80, or their shared memory over its opt-in limit).
pub fn backward(
    spec: &AttentionSpec,
    head_dim: usize,
    mask: MaskType,
    has_bias: bool,
    target: Target,
) -> Result<[KernelConfig; 3], RenderError> {
    check_head_dim(head_dim)?;
    let mut out = backward_configs(spec.dtype, head_dim, mask, spec.window.is_some(), has_bias);
    for c in &mut out {
        // A gated forward's backward needs the gate's gradient: refused by the check below.
        c.output_gate = spec.output_gate;
    }
    for c in &out {
        // The render checks (head dim, mask, gate, tile) without rendering.
        c.check_config()?;
        if let Target::Device { sm, smem_optin, .. } = target {
            if sm < TENSOR_CORE_MIN_SM || c.backward_smem_bytes() > smem_optin {
                return Err(RenderError::Unsupported {
                    argument: "target",
                    reason: "the backward kernels need sm_80+ (mma.sync, cp.async) and their \
                             tiles' shared memory",
                });
            }
        }
    }
    Ok(out)
}

/// The three backward configs (preprocess, dK/dV, dQ; default tiles) of one dtype, head
/// dim, mask, window flag and bias flag (an additive bias, whose gradient dbias the dQ
/// kernel writes), unchecked ([`KernelConfig::render`] checks them; the
/// runtime's `cuda::backward` launcher compiles them).
pub fn backward_configs(
    dtype: crate::spec::DType,
    head_dim: usize,
    mask: MaskType,
    has_window: bool,
    has_bias: bool,
) -> [KernelConfig; 3] {
    let make = |phase: Phase| {
        let mut c = KernelConfig::new(phase, dtype, head_dim);
        if phase != Phase::BackwardPreprocess {
            c.mask = Some(mask);
            c.has_window = has_window;
            c.has_bias = has_bias;
        }
        c
    };
    [
        make(Phase::BackwardPreprocess),
        make(Phase::BackwardDkdv),
        make(Phase::BackwardDq),
    ]
}

/// The fused, non-deterministic backward config ([`Phase::BackwardDqDkDv`]: dQ, dK, dV in
/// one pass, dQ by f32 atomics) of one dtype, head dim, mask, window flag and bias flag, or
/// `None` at a head dim without its warp grid
/// ([`fused_backward_layout`](crate::render::fused_backward_layout)); unchecked as
/// [`backward_configs`].
pub fn backward_fused_config(
    dtype: crate::spec::DType,
    head_dim: usize,
    mask: MaskType,
    has_window: bool,
    has_bias: bool,
) -> Option<KernelConfig> {
    crate::render::fused_backward_layout(head_dim)?;
    let mut c = KernelConfig::new(Phase::BackwardDqDkDv, dtype, head_dim);
    c.mask = Some(mask);
    c.has_window = has_window;
    c.has_bias = has_bias;
    Some(c)
}

/// The Hopper fused backward config ([`Phase::BackwardDqDkDvSm90`]: the fast mode on wgmma)
/// of one dtype, head dim, mask, window flag and bias flag, or `None` at a head dim outside
/// [`SM90_BACKWARD_HEAD_DIMS`](crate::render::SM90_BACKWARD_HEAD_DIMS); unchecked as
/// [`backward_configs`].
pub fn backward_fused_config_sm90(
    dtype: crate::spec::DType,
    head_dim: usize,
    mask: MaskType,
    has_window: bool,
    has_bias: bool,
) -> Option<KernelConfig> {
    if !crate::render::SM90_BACKWARD_HEAD_DIMS.contains(&head_dim) {
        return None;
    }
    let mut c = KernelConfig::new(Phase::BackwardDqDkDvSm90, dtype, head_dim);
    c.mask = Some(mask);
    c.has_window = has_window;
    c.has_bias = has_bias;
    Some(c)
}

/// The fused backward kernel (the fast mode) a device runs: the Hopper one
/// ([`backward_fused_config_sm90`]) on a device with `wgmma` where it exists and its shared
/// memory fits (head dims 64, 128 and 256), else the sm80 one
/// ([`backward_fused_config`]) where its shared memory fits, else `None` (the deterministic
/// pair runs). For [`Target::AnyDevice`] the portable sm80 kernel.
pub fn backward_fused_for(
    dtype: crate::spec::DType,
    head_dim: usize,
    mask: MaskType,
    has_window: bool,
    has_bias: bool,
    target: Target,
) -> Option<KernelConfig> {
    let fits = |c: &KernelConfig| match target {
        Target::Device { smem_optin, .. } => c.backward_smem_bytes() <= smem_optin,
        Target::AnyDevice => true,
    };
    if let Target::Device { wgmma: true, .. } = target {
        if let Some(c) = backward_fused_config_sm90(dtype, head_dim, mask, has_window, has_bias)
            .filter(|c| fits(c) && c.check_config().is_ok())
        {
            return Some(c);
        }
    }
    backward_fused_config(dtype, head_dim, mask, has_window, has_bias).filter(fits)
}

/// The backward kernels a training run of `spec` at `head_dim` can launch on `target`: the
/// preprocess, then dK/dV and dQ for every mask type the spec lists, each without and with
/// an additive bias (as the forward's list), each followed by the fused kernel of the fast
/// mode [`backward_fused_for`] picks (for [`Target::AnyDevice`] the sm80 one and the Hopper
/// one), deduplicated by key. A separate list from
/// [`kernels_for`], so serving-only specs compile no training kernel. Errors: those of
/// [`backward`].
pub fn backward_kernels_for(
    spec: &AttentionSpec,
    head_dim: usize,
    target: Target,
) -> Result<Vec<KernelConfig>, RenderError> {
    let mut out = Vec::new();
    for &mask in &spec.masks {
        for has_bias in [false, true] {
            out.extend(backward(spec, head_dim, mask, has_bias, target)?);
            let win = spec.window.is_some();
            if let Some(c) = backward_fused_for(spec.dtype, head_dim, mask, win, has_bias, target) {
                c.check_config()?;
                out.push(c);
            }
            if target == Target::AnyDevice {
                // The union over devices: the Hopper kernel too.
                if let Some(c) =
                    backward_fused_config_sm90(spec.dtype, head_dim, mask, win, has_bias)
                {
                    c.check_config()?;
                    out.push(c);
                }
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|c| seen.insert(c.key()));
    Ok(out)
}

/// Every kernel a layer with `spec` at `head_dim` can launch on `target`, deduplicated by
/// key, in a fixed order: `qkv_prep` (then its rope-less decode-step variant), per mask
/// type × (no bias, bias) `prefill_sm80` (when `target` runs it) then `prefill_rows`; then
/// for self-attention `decode_rows`, the static-cache prefill's `prefill_sm80` kernel
/// ([`cache_prefill`]), the paged batch's prefill and decode kernels ([`paged_prefill`],
/// [`decode_splitkv_paged`]), `decode_rows_paged`, `decode_splitkv` and `append_kv`; for
/// cross-attention the context-cache step's kernel ([`cross_cache_step`]; `decode_rows_*_full`
/// where the target cannot run it, both for [`Target::AnyDevice`]) and `append_kv`. See the module
/// docs for the runtime choices covered.
///
/// `head_dim` need not be one the spec lists (the runtime may take it from its config).
/// Errors: a head dim outside [`SUPPORTED_HEAD_DIMS`], a spec without mask types, a rotary
/// fraction without a valid channel count.
pub fn kernels_for(
    spec: &AttentionSpec,
    head_dim: usize,
    target: Target,
) -> Result<Vec<KernelConfig>, RenderError> {
    check_head_dim(head_dim)?;
    if spec.masks.is_empty() {
        return Err(RenderError::NoMasks);
    }
    let mut out = vec![qkv_prep(spec, head_dim)?];
    if is_self(spec) {
        out.push(qkv_prep_for_decode_splitkv(spec, head_dim)?);
    }
    for &mask in &spec.masks {
        for has_bias in [false, true] {
            let fwd = prefill_rows(spec, head_dim, mask, has_bias);
            out.extend(tensor_core_variants(&fwd, target));
            out.push(fwd);
        }
    }
    if is_self(spec) {
        out.push(decode_rows(spec, head_dim));
        let cache = prefill_rows(spec, head_dim, MaskType::CausalBottomRight, false);
        out.extend(tensor_core_variants(&cache, target));
        for mut c in tensor_core_variants(&cache, target) {
            c.paged_kv = true;
            out.push(c);
        }
        out.extend(decode_splitkv_paged(spec, head_dim, target));
        out.push(decode_rows_paged(spec, head_dim));
        out.push(decode_splitkv(spec, head_dim)?);
        // Multi-token decode steps (static and paged): the wider row-block variants a step of
        // 1 to 16 tokens reaches on the target.
        for rows in decode_step_rows(spec) {
            if let Some(c) = decode_splitkv_rows(spec, head_dim, rows, smem_optin_of(target))? {
                if c.row_blocks > 1 {
                    out.push(c);
                }
            }
            out.extend(
                decode_splitkv_paged_rows(spec, head_dim, rows, target)
                    .filter(|c| c.row_blocks > 1),
            );
        }
        out.push(append_kv(spec, head_dim));
    } else {
        // The context-cache step: prefill_sm80, or `decode_rows_*_full` where it cannot run
        // (both for AnyDevice, the union over devices).
        let step = cross_cache_step(spec, head_dim, target);
        if step.is_none() || target == Target::AnyDevice {
            out.push(decode_rows(spec, head_dim));
        }
        let cross = prefill_rows(spec, head_dim, MaskType::NoMask, false);
        out.extend(tensor_core_variants(&cross, target));
        out.push(append_kv(spec, head_dim));
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|c| seen.insert(c.key()));
    Ok(out)
}

/// [`kernels_for`] over every head dim the spec lists, deduplicated by key (empty when the
/// spec lists none: the head dim then comes from the runtime config).
pub fn kernels_for_spec_head_dims(
    spec: &AttentionSpec,
    target: Target,
) -> Result<Vec<KernelConfig>, RenderError> {
    let mut out: Vec<KernelConfig> = Vec::new();
    for &hd in &spec.head_dims {
        for c in kernels_for(spec, hd, target)? {
            if !out.iter().any(|o| o.key() == c.key()) {
                out.push(c);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_targets() {
        assert_eq!(
            Target::from_arch("sm_90a").unwrap(),
            Target::Device {
                sm: 90,
                smem_optin: 227 * 1024,
                wgmma: true
            }
        );
        // sm_90 without the `a`: no wgmma (the Hopper prefill kernel cannot be built for it).
        for arch in ["sm_90", "compute_90"] {
            assert_eq!(
                Target::from_arch(arch).unwrap(),
                Target::Device {
                    sm: 90,
                    smem_optin: 227 * 1024,
                    wgmma: false
                }
            );
        }
        assert_eq!(
            Target::from_arch("compute_86").unwrap(),
            Target::Device {
                sm: 86,
                smem_optin: 99 * 1024,
                wgmma: false
            }
        );
        assert_eq!(Target::from_arch("sm_999").unwrap(), Target::AnyDevice);
        for bad in ["", "sm_", "90", "sm_9x", "gfx90a"] {
            assert!(
                matches!(Target::from_arch(bad), Err(RenderError::BadArch { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn tensor_core_prefill_picks_sm90_on_hopper_at_supported_head_dims() {
        let spec = AttentionSpec::new(AttentionKind::SelfAttention);
        let hopper = Target::from_arch("sm_90a").unwrap();
        for (hd, want) in [
            (64, Phase::PrefillSm90),
            (96, Phase::PrefillSm80),
            (128, Phase::PrefillSm90),
            (160, Phase::PrefillSm80),
            (192, Phase::PrefillSm90),
            (256, Phase::PrefillSm90),
        ] {
            let fwd = prefill_rows(&spec, hd, MaskType::Causal, false);
            let c = prefill_tensor_core(&fwd, hopper).unwrap();
            assert_eq!(c.phase, want, "head dim {hd}");
            assert!(c.prefill_smem_bytes() <= 227 * 1024, "head dim {hd}");
            assert!(c.key().ends_with(if want == Phase::PrefillSm90 {
                "_sm90"
            } else {
                "_sm80"
            }));
        }
        // Other archs run sm80 (wgmma is sm_90a only), the union lists both.
        let fwd = prefill_rows(&spec, 128, MaskType::Causal, false);
        for arch in ["sm_80", "sm_89", "sm_100a", "sm_120"] {
            // (sm_89 / sm_120: the hd128 sm80 tile needs more than their 99 KiB: None.)
            let c = prefill_tensor_core(&fwd, Target::from_arch(arch).unwrap());
            assert!(c.is_none_or(|c| c.phase == Phase::PrefillSm80), "{arch}");
        }
        assert_eq!(
            prefill_tensor_core(&fwd, Target::AnyDevice).unwrap().phase,
            Phase::PrefillSm80
        );
        let phases: Vec<Phase> = tensor_core_variants(&fwd, Target::AnyDevice)
            .iter()
            .map(|c| c.phase)
            .collect();
        assert_eq!(phases, [Phase::PrefillSm80, Phase::PrefillSm90]);
        // The cache and paged prefill follow the same choice.
        let c = cache_prefill(&spec, 128, hopper).unwrap();
        assert_eq!(
            (c.phase, c.mask),
            (Phase::PrefillSm90, Some(MaskType::CausalBottomRight))
        );
        let c = paged_prefill(&spec, 128, hopper).unwrap();
        assert!(
            c.paged_kv
                && c.phase == Phase::PrefillSm90
                && c.key().ends_with("_paged_m128n128w12s3_sm90")
        );
        // A mask tensor, a bias or a window: the same warp-specialized tile.
        for heavy in [
            KernelConfig {
                has_bias: true,
                ..c.clone()
            },
            KernelConfig {
                has_window: true,
                ..c.clone()
            },
            KernelConfig {
                mask: Some(MaskType::Arbitrary),
                ..c.clone()
            },
        ] {
            assert!(
                heavy.key().ends_with("_m128n128w12s3_sm90"),
                "{}",
                heavy.key()
            );
        }
        assert!(
            !Phase::PrefillSm90.compiles_for("sm_80") && Phase::PrefillSm90.compiles_for("sm_90a")
        );
        // `sm_90` (no wgmma) runs sm80.
        let plain = Target::from_arch("sm_90").unwrap();
        assert_eq!(
            prefill_tensor_core(&fwd, plain).unwrap().phase,
            Phase::PrefillSm80
        );
        assert!(!Phase::PrefillSm90.compiles_for("sm_90"));
        assert!(Phase::PrefillSm90.compiles_for("compute_90a"));
    }

    #[test]
    fn prefill_sm80_needs_sm80_and_the_tile_smem() {
        let spec = AttentionSpec {
            head_dims: vec![256],
            ..AttentionSpec::new(AttentionKind::SelfAttention)
        };
        let fwd = prefill_rows(&spec, 256, MaskType::Causal, false);
        // 198 KiB tile at head dim 256: Hopper yes, Ampere consumer parts and Turing no.
        assert!(prefill_sm80(&fwd, Target::from_arch("sm_90a").unwrap()).is_some());
        assert!(prefill_sm80(&fwd, Target::from_arch("sm_86").unwrap()).is_none());
        assert!(prefill_sm80(&fwd, Target::AnyDevice).is_some());
        let fwd64 = prefill_rows(&spec, 64, MaskType::Causal, false);
        assert!(prefill_sm80(&fwd64, Target::from_arch("sm_86").unwrap()).is_some());
        // Volta has the shared memory for head dim 64 but not the instructions.
        assert!(prefill_sm80(&fwd64, Target::from_arch("sm_70").unwrap()).is_none());
        let keys: Vec<String> = kernels_for(&spec, 256, Target::from_arch("sm_86").unwrap())
            .unwrap()
            .iter()
            .map(|c| c.key())
            .collect();
        assert!(!keys.iter().any(|k| k.ends_with("_sm80")), "{keys:?}");
        assert!(
            keys.iter().any(|k| k.starts_with("prefill_rows_")),
            "{keys:?}"
        );
    }

    #[test]
    fn cross_lists_its_context_cache_step() {
        let spec = AttentionSpec {
            heads: Some(4),
            head_dims: vec![64],
            masks: vec![MaskType::Padding],
            ..AttentionSpec::new(AttentionKind::CrossAttention)
        };
        let keys = |target| -> Vec<String> {
            kernels_for(&spec, 64, target)
                .unwrap()
                .iter()
                .map(|c| c.key())
                .collect()
        };
        let step = cross_cache_step(&spec, 64, Target::AnyDevice).unwrap();
        assert_eq!(step.mask, Some(MaskType::NoMask));
        assert!(!step.causal && !step.has_bias && !step.paged_kv);
        let any = keys(Target::AnyDevice);
        // Listed although the spec's only mask is padding: the step masks by lengths.
        for want in [
            step.key(),
            decode_rows(&spec, 64).key(),
            append_kv(&spec, 64).key(),
        ] {
            assert!(any.contains(&want), "{want} not in {any:?}");
        }
        assert!(decode_rows(&spec, 64).key().contains("_full"));
        // No self-attention cache kernels.
        assert!(!any.iter().any(|k| k.contains("_paged")
            || k.starts_with("decode_splitkv_")
            || k.contains("causal")));
        // A device without tensor cores runs decode_rows_*_full instead; one with them never does.
        let volta = keys(Target::from_arch("sm_70").unwrap());
        assert!(!volta.contains(&step.key()), "{volta:?}");
        assert!(volta.contains(&decode_rows(&spec, 64).key()));
        let sm90a = Target::from_arch("sm_90a").unwrap();
        let hopper = keys(sm90a);
        let hopper_step = cross_cache_step(&spec, 64, sm90a).unwrap();
        assert_eq!(hopper_step.phase, Phase::PrefillSm90);
        assert!(hopper.contains(&hopper_step.key()), "{hopper:?}");
        assert!(
            !hopper.contains(&decode_rows(&spec, 64).key()),
            "{hopper:?}"
        );
    }
}
