//! Tera rendering of the CUDA templates in `templates/` into kernel sources.
//!
//! Every kernel is described by a [`KernelConfig`]: the phase and every template parameter
//! that changes the source. The kernel's key (also its `extern "C" __global__` entry name)
//! is derived from the same config, so two configs with different sources never share a key.
//! Rendering is deterministic: the same config always gives the same bytes.
//!
//! The rendered sources include no header at all (no CUDA toolkit headers): NVRTC alone
//! compiles them. bf16/f16 are the templates' own 16-bit types with inline-PTX conversions.
//!
//! Kernel argument lists (row-major layouts, `elem_t` = the spec's dtype) are documented at
//! the top of each template and on [`Phase`].

use std::fmt;

use tera::{Context, Tera};
use thiserror::Error;

use crate::registry::{self, Target};
use crate::spec::{AttentionSpec, DType, MaskType, QkNorm, RopeMode, Sinks, SUPPORTED_HEAD_DIMS};

/// The templates, embedded at compile time: `(tera name, text)`.
const TEMPLATES: &[(&str, &str)] = &[
    (
        "partials/types.cu",
        include_str!("../../templates/partials/types.cu"),
    ),
    (
        "partials/mask.cu",
        include_str!("../../templates/partials/mask.cu"),
    ),
    (
        "partials/attend.cu",
        include_str!("../../templates/partials/attend.cu"),
    ),
    (
        "partials/params.cu",
        include_str!("../../templates/partials/params.cu"),
    ),
    (
        "partials/params_bwd.cu",
        include_str!("../../templates/partials/params_bwd.cu"),
    ),
    (
        "partials/rows_kernel.cu",
        include_str!("../../templates/partials/rows_kernel.cu"),
    ),
    (
        "partials/bwd_kv_block.cu",
        include_str!("../../templates/partials/bwd_kv_block.cu"),
    ),
    (
        "partials/backward_common.cu",
        include_str!("../../templates/partials/backward_common.cu"),
    ),
    (
        "params_probe.cu",
        "{% include \"partials/types.cu\" %}\n{% include \"partials/params.cu\" %}\n\
         {% include \"partials/params_bwd.cu\" %}\n",
    ),
    (
        "prefill_rows.cu",
        include_str!("../../templates/prefill_rows.cu"),
    ),
    (
        "prefill_sm80.cu",
        include_str!("../../templates/prefill_sm80.cu"),
    ),
    (
        "prefill_sm90.cu",
        include_str!("../../templates/prefill_sm90.cu"),
    ),
    (
        "decode_rows.cu",
        include_str!("../../templates/decode_rows.cu"),
    ),
    (
        "decode_rows_paged.cu",
        include_str!("../../templates/decode_rows_paged.cu"),
    ),
    ("qkv_prep.cu", include_str!("../../templates/qkv_prep.cu")),
    (
        "decode_splitkv.cu",
        include_str!("../../templates/decode_splitkv.cu"),
    ),
    ("append_kv.cu", include_str!("../../templates/append_kv.cu")),
    (
        "partials/backward_fused.cu",
        include_str!("../../templates/partials/backward_fused.cu"),
    ),
    (
        "partials/wgmma_ops.cu",
        include_str!("../../templates/partials/wgmma_ops.cu"),
    ),
    (
        "partials/wgmma_sm90.cu",
        include_str!("../../templates/partials/wgmma_sm90.cu"),
    ),
    (
        "partials/cp_async.cu",
        include_str!("../../templates/partials/cp_async.cu"),
    ),
    (
        "partials/pack.cu",
        include_str!("../../templates/partials/pack.cu"),
    ),
    (
        "partials/mma_sm80.cu",
        include_str!("../../templates/partials/mma_sm80.cu"),
    ),
    (
        "partials/prefill_common.cu",
        include_str!("../../templates/partials/prefill_common.cu"),
    ),
    (
        "partials/prefill_args.cu",
        include_str!("../../templates/partials/prefill_args.cu"),
    ),
    (
        "partials/q_block_tiles.cu",
        include_str!("../../templates/partials/q_block_tiles.cu"),
    ),
    (
        "partials/prefill_block.cu",
        include_str!("../../templates/partials/prefill_block.cu"),
    ),
    (
        "backward_preprocess.cu",
        include_str!("../../templates/backward_preprocess.cu"),
    ),
    (
        "backward_sm80.cu",
        include_str!("../../templates/backward_sm80.cu"),
    ),
    (
        "backward_dqdkdv_sm80.cu",
        include_str!("../../templates/backward_dqdkdv_sm80.cu"),
    ),
    (
        "backward_dqdkdv_sm90.cu",
        include_str!("../../templates/backward_dqdkdv_sm90.cu"),
    ),
];

/// Head dims the backward kernels ([`Phase::BackwardDkdv`], [`Phase::BackwardDq`]) support:
/// every one of [`SUPPORTED_HEAD_DIMS`]. Each warp keeps its 16 keys' dK and dV in registers
/// (above head dim 128 two warps share the keys and split the head dim), plus a 16 × tile
/// of S and dP, within the 255-register budget without spills (`tests/nvrtc_backward.rs`
/// checks; ptxas, NVRTC 13) except the mask-tensor variants at head dims 224 and 256 (16 to
/// 36 bytes of spill stores).
pub const BACKWARD_HEAD_DIMS: &[usize] = SUPPORTED_HEAD_DIMS;

/// Head dims of the Hopper backward kernel ([`Phase::BackwardDqDkDvSm90`]): its two
/// warpgroups own 64 keys each and split dQ's 64-column panels (head dim 128) or 128 queries
/// (head dim 64); at 256, where one warpgroup's dK and dV for 64 keys x 256 columns would not
/// fit the registers, they share 64 keys, split S^T's queries and dK/dV/dQ's columns, and
/// pass P^T and dS^T through shared memory. Other head dims run the sm80 kernel
/// ([`crate::registry::backward_fused_for`]).
pub const SM90_BACKWARD_HEAD_DIMS: &[usize] = &[64, 128, 256];

/// Warps per block of the fused backward ([`Phase::BackwardDqDkDv`]).
pub const FUSED_BACKWARD_WARPS: usize = 8;

/// Queries per step of the fused backward: 128 up to head dim 64 (its dK/dV accumulators leave
/// the registers for a 64-row S tile per warp), 64 above.
fn fused_block_m(head_dim: usize) -> usize {
    if head_dim <= 64 {
        128
    } else {
        64
    }
}

/// The warp grids of the fused backward ([`Phase::BackwardDqDkDv`], 8 warps, 128 queries per
/// step up to head dim 64 and 64 above, against 128 keys up to head dim 128, 64 keys above) at
/// `head_dim`, as
/// `(wm_s, wn_kv, wm_q)`: S and dP over `wm_s` × `8 / wm_s` warps (queries × keys), dK and
/// dV over `wn_kv` × `8 / wn_kv` (keys × head dim), dQ over `wm_q` × `8 / wm_q` (queries ×
/// head dim), every warp tile a multiple of 16 on both sides (FlashAttention-2's sm80
/// layouts where they divide). `None` where no such grid exists (head dims 80, 160, 224):
/// those run the deterministic pair only.
pub fn fused_backward_layout(head_dim: usize) -> Option<(usize, usize, usize)> {
    let w = FUSED_BACKWARD_WARPS;
    let (block_m, block_n) = (
        fused_block_m(head_dim),
        if head_dim <= 128 { 128 } else { 64 },
    );
    let fits = |tile: usize| tile > 0 && tile.is_multiple_of(16);
    if !SUPPORTED_HEAD_DIMS.contains(&head_dim) {
        return None;
    }
    let wm_s = if block_n == 128 { 2 } else { 4 };
    let wn_kv = if block_n == 128 { 4 } else { 2 };
    if !(fits(block_m / wm_s) && fits(block_n / (w / wm_s))) {
        return None;
    }
    if !(fits(block_n / wn_kv)
        && head_dim.is_multiple_of(w / wn_kv)
        && fits(head_dim / (w / wn_kv)))
    {
        return None;
    }
    let wm_q = [2, 4].into_iter().find(|&m| {
        fits(block_m / m) && head_dim.is_multiple_of(w / m) && fits(head_dim / (w / m))
    })?;
    Some((wm_s, wn_kv, wm_q))
}

/// Query rows (one warp each) per block of the one-warp-per-row attention kernels
/// (`prefill_rows`, `decode_rows`, `decode_rows_paged`).
pub const ATTENTION_BLOCK_ROWS: usize = 4;
/// Warps per block of the `qkv_prep` kernel (one head vector per warp at a time).
pub const PREP_WARPS: usize = 4;
/// Warps per block of the `decode_splitkv` split kernel (each owns 16 keys of every tile and runs
/// its q.k and P.V on tensor cores for up to 16 query heads of the group at once).
pub const DECODE_SPLITKV_WARPS: usize = 4;
/// Keys per shared-memory tile of the `decode_splitkv` kernel: 16 per warp, for every head dim.
pub const fn decode_splitkv_tile(_head_dim: usize) -> usize {
    16 * DECODE_SPLITKV_WARPS
}
/// Depth of the `decode_splitkv` kernel's cp.async ring of K/V tiles.
pub const DECODE_SPLITKV_STAGES: usize = 3;
/// Warps per block of the `decode_splitkv` `<key>_combine` kernel (the one-pass merge).
/// Source: `attn bench decode` on an H200 (2026-12-01): 8 warps loading 8 splits each at once
/// made the batch-1 step 1.05-1.12x faster than a max pass plus strided rounds over 4 warps.
pub const DECODE_SPLITKV_COMBINE_WARPS: usize = 8;
/// Splits one warp of `<key>_combine` loads at once: a merge of up to
/// `DECODE_SPLITKV_COMBINE_WARPS * DECODE_SPLITKV_COMBINE_BATCH` (64) splits is one round of
/// loads.
pub const DECODE_SPLITKV_COMBINE_BATCH: usize = 8;
/// Row-block counts of the `decode_splitkv` split kernel ([`KernelConfig::row_blocks`]): the
/// query rows of a step (the group's heads times the new tokens) are attended 16 x
/// `row_blocks` at a time, every K/V tile loaded once per such pass.
pub const DECODE_SPLITKV_ROW_BLOCKS: [usize; 3] = [1, 2, 4];
/// The most new tokens per sequence a `decode_splitkv` step takes (multi-token decode:
/// speculative decoding, multi-token prediction).
pub const DECODE_SPLITKV_MAX_TOKENS: usize = 16;
/// Dynamic shared memory (bytes) of the `decode_splitkv` split kernel with `row_blocks` row
/// blocks: the ring, `STAGES × {K, V} × tile × (head_dim + 8)` 2-byte elements (rows padded by
/// 8 elements for conflict-free ldmatrix: 54 KiB at hd 64, 102 KiB at 128, 198 KiB at 256),
/// then the pass's query rows, `16 × row_blocks × (head_dim + 8)` elements.
pub const fn decode_splitkv_smem_bytes(head_dim: usize, row_blocks: usize) -> usize {
    (DECODE_SPLITKV_STAGES * 2 * decode_splitkv_tile(head_dim) + 16 * row_blocks)
        * (head_dim + 8)
        * 2
}
/// All shared memory (bytes) of one `decode_splitkv` split block: the dynamic part
/// ([`decode_splitkv_smem_bytes`]) plus the static rope staging rows (f32 `[warps][head_dim]`)
/// and the warps' row statistics (f32 `[warps][16][2]`). The kernel runs on a device whose
/// opt-in per-block limit is at least this.
pub const fn decode_splitkv_block_smem_bytes(head_dim: usize, row_blocks: usize) -> usize {
    let warps = decode_splitkv_warps(row_blocks);
    decode_splitkv_smem_bytes(head_dim, row_blocks) + warps * head_dim * 4 + warps * 16 * 2 * 4
}
/// Warps per block of the `decode_splitkv` split kernel with `row_blocks` row blocks
/// ([`KernelConfig::warps`]): [`DECODE_SPLITKV_WARPS`] (each owning 16 keys of a tile at one
/// row block, 32 at two), 8 at four row blocks (two warps per row block, 32 keys each: with
/// four warps of 64 keys each the 64-row step ran at 46-55% of the read bandwidth, one
/// warp per scheduler, H200 2026-12-01).
pub const fn decode_splitkv_warps(row_blocks: usize) -> usize {
    if row_blocks >= 4 {
        8
    } else {
        DECODE_SPLITKV_WARPS
    }
}
/// Whether the `decode_splitkv` split kernel with `row_blocks` row blocks exists at `head_dim`
/// and fits a device with `smem_optin` bytes of opt-in shared memory per block. Above one row
/// block only head dims up to 128 have it: at 256 a warp's 16 x 256 f32 accumulator plus
/// 32 keys' scores spill at 255 registers (ptxas, sm_90a), so such steps take several
/// one-row-block passes.
pub const fn decode_splitkv_runs(head_dim: usize, row_blocks: usize, smem_optin: usize) -> bool {
    (row_blocks == 1 || head_dim <= 128)
        && decode_splitkv_block_smem_bytes(head_dim, row_blocks) <= smem_optin
}
/// Blocks per SM the `decode_splitkv` split kernel promises ptxas (`__launch_bounds__`'s
/// second argument): as many as the shared memory of a 228 KiB Hopper SM holds (1 KiB
/// reserved per block), at most 3 with one row block up to head dim 64, 2 with one row block
/// above it or with two row blocks, 1 with four. Without it ptxas aimed at more blocks than the shared memory
/// allows and spilled (168 registers and 48 bytes of spills at hd 128, 2026-12-01); with it
/// the register budget matches the occupancy the kernel can reach anyway.
pub const fn decode_splitkv_min_blocks(head_dim: usize, row_blocks: usize) -> usize {
    let n = 233_472 / (decode_splitkv_block_smem_bytes(head_dim, row_blocks) + 1024);
    // At most 3 blocks (168 registers) with one row block up to head dim 64, else 2 (255):
    // head dim 80 and the wider variants' 16 x 16 * row_blocks scores per warp spill under 168.
    // Eight warps (four row blocks): one block, 255 registers.
    let most = if row_blocks >= 4 {
        1
    } else if row_blocks == 1 && head_dim <= 64 {
        3
    } else {
        2
    };
    if n < 1 {
        1
    } else if n > most {
        most
    } else {
        n
    }
}
/// The row-block count of a `decode_splitkv` step of `rows` query rows per group (heads per
/// group × new tokens) on a device whose opt-in shared memory per block is `smem_optin`: the
/// fewest row blocks that cover the rows in one pass, else the most that fit (the rows then
/// take several passes). `None` when not even one row block fits.
pub fn decode_splitkv_row_blocks(head_dim: usize, rows: usize, smem_optin: usize) -> Option<usize> {
    let fits = |rb: usize| decode_splitkv_runs(head_dim, rb, smem_optin);
    let fitting: Vec<usize> = DECODE_SPLITKV_ROW_BLOCKS
        .into_iter()
        .filter(|&rb| fits(rb))
        .collect();
    fitting
        .iter()
        .copied()
        .find(|&rb| 16 * rb >= rows)
        .or_else(|| fitting.last().copied())
}

/// A kernel phase (one template, one kernel family); the family name is [`Phase::name`], the
/// key prefix [`Phase::prefix`].
///
/// Entry points (all `extern "C" __global__`, named by the key; see the templates for the
/// full layout comments). Parameters come as one struct per family
/// (`templates/partials/params.cu`, mirrored by the runtime's `cuda::params`), queued as the
/// kernel's whole parameter buffer:
/// - `PrefillRows` (`prefill_rows_*`): one `FwdParams` (q, k, v, out, lse, cu_seqlens_q,
///   cu_seqlens_k, batch, num_heads, num_groups, seqlen_q, seqlen_k, softmax_scale, window, mask and
///   strides, bias and strides, sinks, gate; then max_logit, v_nonfinite and the cache fields,
///   unused here); padded `[s, b, heads, hn]` when `cu_seqlens_q` is null, packed
///   `[t, heads, hn]` otherwise.
/// - `PrefillSm80` (`prefill_*_sm80`): `FwdParams`'s fields as positional parameters in its order
///   (the same parameter buffer; the struct parameter costs the hot variants spills):
///   `max_logit` (f32 `[num_heads]` or null), `v_nonfinite` (int32 flag or null: set when
///   some V element is not finite; the kernel then computes its rows exactly, never reading a
///   masked key), `cache_seqlens_k` (int32 `[batch]` or null), `cache_batch_offset`,
///   `cache_max_batch` (with `cache_seqlens_k`, k/v are one layer of a static cache
///   `[max_seq, max_batch, ng, hn]`), `block_table`, `block_size`, `max_blocks_per_seq` (paged
///   variants); same layouts as `PrefillRows` otherwise. Launch: grid `(ceil(max_seqlen_q /
///   block_m), num_heads, batch)`, block `warps * 32`, dynamic shared memory
///   [`PrefillTile::smem_bytes`]. Every mask (mask tensors included) and the additive bias.
/// - `DecodeRows` (`decode_rows_*`): one `FwdParams` (q, k / v = the cache layer, out, lse, batch,
///   num_heads, num_groups, seqlen_q, softmax_scale, window, sinks, gate, cache_seqlens_k,
///   cache_batch_offset, cache_max_batch) over a static cache `[max_seq, max_batch, ng, hn]`.
/// - `DecodeRowsPaged` (`decode_rows_*_paged`): one `FwdParams` (q, k / v = the pools, out, lse,
///   cu_seqlens_q, cache_seqlens_k, block_table, batch, num_heads, num_groups, block_size,
///   max_blocks_per_seq, softmax_scale, window, sinks, gate) over a pool `[num_blocks,
///   block_size, ng, hn]`.
/// - `DecodeSplitKv` (`decode_splitkv_*`): `(q, k_new, v_new, k_cache, v_cache, cache_seqlens,
///   rope_cos, rope_sin, o_part, lse_part, batch, batch_offset, max_batch, num_heads,
///   num_groups, num_splits, num_tokens, softmax_scale, window_left, window_right)`, grid
///   `(num_splits, num_groups, batch)`, block [`decode_splitkv_warps`]`(row_blocks) * 32`, dynamic shared
///   memory [`decode_splitkv_smem_bytes`]; then `<key>_combine` `(o_part, lse_part, out, lse,
///   sinks, gate, batch * num_tokens, num_heads, num_splits)`, grid `(batch * num_tokens,
///   num_heads)`, block [`DECODE_SPLITKV_COMBINE_WARPS`]` * 32`.
///   Layouts in templates/decode_splitkv.cu. With [`KernelConfig::paged_kv`] (`_paged`), both
///   entries take one `PagedDecodeParams` struct (templates/partials/params.cu): the decode
///   rows of a paged mixed batch, reading K/V through the block table, same grids with
///   `batch` = the decode requests.
/// - `AppendKv` (`append_kv_*`): one `AppendParams` (k, v, k_dst, v_dst, cu_seqlens_q,
///   seqlens_k, block_table, batch, num_groups, block_size, max_blocks_per_seq,
///   cache_batch_offset, cache_max_batch), grid `(total_tokens)`, block 128; a null block
///   table writes a static cache.
/// - `QkvPrep` (`qkv_prep_*`): one `PrepParams` (qkv, kv, q_out, k_out, v_out, gate_out,
///   q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, eps, positions, rotary_base,
///   mscale, num_tokens, num_kv_tokens, num_heads, num_groups, v_nonfinite); `v_nonfinite`
///   (int32 or null) is set to 1 when a value written to `v_out` is not finite.
/// - `BackwardPreprocess` (`backward_preprocess_*`), `BackwardDkdv` (`backward_dkdv_*_sm80`),
///   `BackwardDq` (`backward_dq_*_sm80`): one `BwdParams` each (templates/backward_*.cu):
///   D = rowsum(dO ∘ O) (and `<key>_dsink`, the learnable sinks' gradient), then dK, dV and
///   dQ from q, k, v, the forward's out and LSE, and dO; grids and shared memory in
///   templates/backward_sm80.cu and [`KernelConfig::backward_smem_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Prefill / training forward over padded or packed q, k, v, one warp per query row:
    /// the fallback of `PrefillSm80`, runs on any arch.
    PrefillRows,
    /// FlashAttention-2 style tiled prefill / forward (tensor cores `mma.sync`, cp.async
    /// pipeline; sm_80+) over the same layouts as `PrefillRows`; tiles in
    /// [`KernelConfig::tile`].
    PrefillSm80,
    /// The same forward on Hopper's warpgroup MMA (`wgmma`, sm_90a only): same parameters,
    /// layouts, grid and features as `PrefillSm80`, tiles of 64 query rows per warpgroup
    /// ([`PrefillTile::for_head_dim_sm90_ws`], [`PrefillTile::for_head_dim_sm90`]); head dims that are multiples of 64.
    PrefillSm90,
    /// New queries over a static KV cache, one warp per query row, bottom-right causal: the
    /// fallback of the static-cache prefill on `PrefillSm80`.
    DecodeRows,
    /// Packed queries over a paged KV cache (block pool + block table), one warp per query
    /// row, bottom-right causal: the fallback of a paged mixed batch (`PrefillSm80` paged
    /// and `DecodeSplitKv` paged).
    DecodeRowsPaged,
    /// Split of the qkv projection, q/k norm and rope.
    QkvPrep,
    /// One fused decode step over a static cache: rope of the new q/k from cos/sin tables,
    /// append, split-KV attention; plus its `<key>_combine` entry that combines the splits.
    DecodeSplitKv,
    /// Append packed new k/v into a paged pool (through the block table) or a static cache.
    AppendKv,
    /// Attention backward, step 1: D = rowsum(dO ∘ O) per query row and head (plus the
    /// learnable sinks' gradient in its `<key>_dsink` entry).
    BackwardPreprocess,
    /// Attention backward, dK and dV: one block per KV tile, group and sequence (tensor
    /// cores, sm_80+).
    BackwardDkdv,
    /// Attention backward, dQ: one block per query tile, head and sequence (tensor cores,
    /// sm_80+).
    BackwardDq,
    /// Attention backward in one pass, FlashAttention-2's schedule (the fast,
    /// non-deterministic mode): dK and dV per KV tile as `BackwardDkdv`, dQ added to an f32
    /// buffer with atomics; its `<key>_dq_convert` entry scales and rounds that buffer into
    /// dq. Head dims of [`fused_backward_layout`] only.
    BackwardDqDkDv,
    /// [`Phase::BackwardDqDkDv`] on Hopper's warpgroup MMA (`wgmma`, sm_90a only): the same
    /// launch, parameters and results, FlashAttention-3's transposed products (S^T = K Q^T,
    /// dP^T = V dO^T, so that P^T and dS^T feed dV and dK from registers). Head dims of
    /// [`SM90_BACKWARD_HEAD_DIMS`] only.
    BackwardDqDkDvSm90,
}

impl Phase {
    /// Every phase.
    pub const ALL: [Phase; 13] = [
        Phase::PrefillRows,
        Phase::PrefillSm80,
        Phase::PrefillSm90,
        Phase::DecodeRows,
        Phase::DecodeRowsPaged,
        Phase::QkvPrep,
        Phase::DecodeSplitKv,
        Phase::AppendKv,
        Phase::BackwardPreprocess,
        Phase::BackwardDkdv,
        Phase::BackwardDq,
        Phase::BackwardDqDkDv,
        Phase::BackwardDqDkDvSm90,
    ];

    /// Whether NVRTC can compile this phase's kernels for `arch` (`sm_80`, `sm_90a`, ...):
    /// `PrefillSm90` and `BackwardDqDkDvSm90` use wgmma, which exists on `sm_90a` only; every
    /// other phase compiles for any arch the crate supports.
    pub fn compiles_for(self, arch: &str) -> bool {
        match self {
            Phase::PrefillSm90 | Phase::BackwardDqDkDvSm90 => {
                arch == "sm_90a" || arch == "compute_90a"
            }
            _ => true,
        }
    }

    /// Whether this is one of the backward (training) phases.
    pub fn is_backward(self) -> bool {
        matches!(
            self,
            Phase::BackwardPreprocess
                | Phase::BackwardDkdv
                | Phase::BackwardDq
                | Phase::BackwardDqDkDv
                | Phase::BackwardDqDkDvSm90
        )
    }

    /// Key prefix: `prefill_rows`, `prefill` (whose keys end in `_sm80`), `decode_rows` (the
    /// paged family's keys carry `_paged`), `qkv_prep`, `decode_splitkv`, `append_kv`,
    /// `backward_preprocess`, `backward_dkdv`, `backward_dq`.
    pub fn prefix(self) -> &'static str {
        match self {
            Phase::PrefillRows => "prefill_rows",
            Phase::PrefillSm80 | Phase::PrefillSm90 => "prefill",
            Phase::DecodeRows | Phase::DecodeRowsPaged => "decode_rows",
            Phase::QkvPrep => "qkv_prep",
            Phase::DecodeSplitKv => "decode_splitkv",
            Phase::AppendKv => "append_kv",
            Phase::BackwardPreprocess => "backward_preprocess",
            Phase::BackwardDkdv => "backward_dkdv",
            Phase::BackwardDq => "backward_dq",
            Phase::BackwardDqDkDv | Phase::BackwardDqDkDvSm90 => "backward_dqdkdv",
        }
    }

    /// Family name, also the template's file stem: `prefill_rows`, `prefill_sm80`,
    /// `decode_rows`, `decode_rows_paged`, `qkv_prep`, `decode_splitkv`, `append_kv`,
    /// `backward_preprocess`, `backward_dkdv` and `backward_dq` (both in `backward_sm80`).
    pub fn name(self) -> &'static str {
        match self {
            Phase::PrefillRows => "prefill_rows",
            Phase::PrefillSm80 => "prefill_sm80",
            Phase::PrefillSm90 => "prefill_sm90",
            Phase::DecodeRows => "decode_rows",
            Phase::DecodeRowsPaged => "decode_rows_paged",
            Phase::QkvPrep => "qkv_prep",
            Phase::DecodeSplitKv => "decode_splitkv",
            Phase::AppendKv => "append_kv",
            Phase::BackwardPreprocess => "backward_preprocess",
            Phase::BackwardDkdv => "backward_dkdv",
            Phase::BackwardDq => "backward_dq",
            Phase::BackwardDqDkDv => "backward_dqdkdv_sm80",
            Phase::BackwardDqDkDvSm90 => "backward_dqdkdv_sm90",
        }
    }

    fn template(self) -> &'static str {
        match self {
            Phase::PrefillRows => "prefill_rows.cu",
            Phase::PrefillSm80 => "prefill_sm80.cu",
            Phase::PrefillSm90 => "prefill_sm90.cu",
            Phase::DecodeRows => "decode_rows.cu",
            Phase::DecodeRowsPaged => "decode_rows_paged.cu",
            Phase::QkvPrep => "qkv_prep.cu",
            Phase::DecodeSplitKv => "decode_splitkv.cu",
            Phase::AppendKv => "append_kv.cu",
            Phase::BackwardPreprocess => "backward_preprocess.cu",
            Phase::BackwardDkdv | Phase::BackwardDq => "backward_sm80.cu",
            Phase::BackwardDqDkDv => "backward_dqdkdv_sm80.cu",
            Phase::BackwardDqDkDvSm90 => "backward_dqdkdv_sm90.cu",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One rendered kernel. The CUDA entry point's name equals `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSource {
    /// Readable unique key, e.g. `prefill_rows_bf16_hd128_causal_win_sinkl_w4`; also the entry
    /// name.
    pub key: String,
    /// Which phase the kernel implements.
    pub phase: Phase,
    /// Head dim the kernel is specialized for.
    pub head_dim: usize,
    /// The mask type (forward kernels only).
    pub mask: Option<MaskType>,
    /// Element type of activations.
    pub dtype: DType,
    /// The paged-pool variant ([`KernelConfig::paged_kv`] of `prefill_sm80` / `decode_splitkv`).
    pub paged_kv: bool,
    /// CUDA C++ source, no `#include`.
    pub source: String,
}

/// A kernel rendered at compile time (the macro emits tables of these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticKernel {
    /// The kernel key and entry name.
    pub key: &'static str,
    /// CUDA C++ source.
    pub source: &'static str,
}

impl StaticKernel {
    /// Whether NVRTC can compile this kernel for `arch`: the Hopper prefill kernels (keys
    /// ending in `_sm90`, wgmma) only for `sm_90a` / `compute_90a`, every other kernel for
    /// any arch ([`Phase::compiles_for`]). A table built for every device (the macro's
    /// `KERNELS`) holds both; filter it with this before compiling for one GPU.
    pub fn compiles_for(&self, arch: &str) -> bool {
        let phase = if self.key.ends_with("_sm90") {
            Phase::PrefillSm90
        } else {
            Phase::PrefillRows
        };
        phase.compiles_for(arch)
    }
}

/// Layout of the `qkv_prep` input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrepLayout {
    /// `linear_qkv` output, GQA-interleaved per group `[q heads | (gates) | k | v]`.
    SelfAttention,
    /// `linear_q` output plus `linear_kv` output (per head `[k_h | v_h]`).
    CrossAttention,
}

/// Every template parameter of one kernel. The key and the tera context are both derived
/// from it, so the key encodes everything that changes the source.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelConfig {
    /// Phase (template).
    pub phase: Phase,
    /// Element type.
    pub dtype: DType,
    /// Head dim; must be in [`SUPPORTED_HEAD_DIMS`].
    pub head_dim: usize,
    /// Mask type: required for `PrefillRows` / `PrefillSm80`, ignored otherwise.
    pub mask: Option<MaskType>,
    /// `DecodeRows`: whether new queries are bottom-right causal (self-attention) or see the
    /// whole cache (cross-attention). `DecodeRowsPaged` is always causal; ignored elsewhere.
    pub causal: bool,
    /// Attention kernels: a sliding window is applied (bounds are kernel arguments).
    pub has_window: bool,
    /// Attention kernels: sink column.
    pub sinks: Option<Sinks>,
    /// `PrefillRows` / `PrefillSm80`: an additive attention bias tensor is read.
    pub has_bias: bool,
    /// Attention kernels multiply by `sigmoid(gate)`; `QkvPrep` splits the gate out.
    pub output_gate: bool,
    /// `QkvPrep`: input layout.
    pub layout: PrepLayout,
    /// `QkvPrep`: q/k norm.
    pub qk_norm: Option<QkNorm>,
    /// `QkvPrep`: rope mode and rotated channel count.
    pub rope: Option<(RopeMode, usize)>,
    /// Tile size: warps per block (`PrefillSm80` uses [`KernelConfig::tile`] instead).
    pub warps: usize,
    /// `PrefillSm80` / `PrefillSm90` (and the backward phases): the tile; `None` = the
    /// phase's default ([`PrefillTile::for_head_dim`], [`PrefillTile::for_head_dim_sm90_ws`],
    /// [`PrefillTile::for_backward`]).
    pub tile: Option<PrefillTile>,
    /// `PrefillSm80`: K/V are read from a paged pool through a block table (the prefill of
    /// a paged mixed batch; key suffix `_paged`); packed queries only. `DecodeSplitKv`: the
    /// split-KV decode of a paged batch's decode rows (key suffix `_paged`, no rope: q and k
    /// come rotated from `qkv_prep`; parameters `PagedDecodeParams`). Ignored elsewhere.
    pub paged_kv: bool,
    /// `DecodeSplitKv`: query row blocks of 16 attended per pass over the keys (one of
    /// [`DECODE_SPLITKV_ROW_BLOCKS`]; key suffix `_rb<n>` above 1). 1 suits one new token
    /// of up to 16 heads per group; a multi-token step of `tokens × heads per group` rows
    /// takes [`decode_splitkv_row_blocks`]; [`KernelConfig::warps`] must then be
    /// [`decode_splitkv_warps`]. Ignored elsewhere (must be 1).
    pub row_blocks: usize,
}

/// Tile of the `PrefillSm80` kernel: `block_m` query rows (`block_m / warps` per warp, a
/// multiple of 16) against `block_n` keys per step, with `stages` K/V shared-memory buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrefillTile {
    /// Query rows per block.
    pub block_m: usize,
    /// Keys per step (multiple of 16).
    pub block_n: usize,
    /// Warps per block.
    pub warps: usize,
    /// K/V ring depth (at least 2).
    pub stages: usize,
}

impl PrefillTile {
    /// The default tile for a head dim: 128 query rows, two stages; 128 keys per step at
    /// head dim 64 and below (measured 0.3–2.6% faster than 64 there, H200), 64 above;
    /// 4 warps of 32 rows up to head dim 128, 8 warps of 16 rows above (the f32 output
    /// accumulator grows with the head dim).
    pub fn for_head_dim(head_dim: usize) -> PrefillTile {
        PrefillTile {
            block_m: 128,
            block_n: if head_dim <= 64 { 128 } else { 64 },
            warps: if head_dim <= 128 { 4 } else { 8 },
            stages: 2,
        }
    }

    /// The default tile of a backward phase ([`Phase::BackwardDkdv`]: `block_n` keys, 16 per
    /// warp, or per pair of warps that split the head dim when `warps * 16 == 2 * block_n`,
    /// against `block_m` queries per step; [`Phase::BackwardDq`]: `block_m` query rows, 16
    /// per warp, against `block_n` keys per step), two shared-memory buffers. Sized to stay
    /// within 255 registers without spills (ptxas, NVRTC 13, sm_80 and sm_90a): dK/dV steps
    /// over 64 queries up to head dim 64 and 32 above (64 at head dim 128 spills 24-36
    /// bytes), with 8 warps in pairs above head dim 128; dQ over 128 keys at head dim 32, 64
    /// up to 128, 32 above (128 at head dim 64 takes all 255 registers).
    ///
    /// With a mask tensor or a bias (`mask_tensor`: their per-element reads cost registers)
    /// the steps shrink: dK/dV over 32 queries up to head dim 64 and 16 above, dQ over 32 keys.
    pub fn for_backward(phase: Phase, head_dim: usize, mask_tensor: bool) -> PrefillTile {
        match phase {
            Phase::BackwardDqDkDvSm90 => PrefillTile::for_backward_sm90(
                head_dim,
                match head_dim {
                    64 => 4,
                    128 => 3,
                    _ => 2,
                },
            ),
            Phase::BackwardDqDkDv => PrefillTile {
                block_m: fused_block_m(head_dim),
                block_n: if head_dim <= 128 { 128 } else { 64 },
                warps: FUSED_BACKWARD_WARPS,
                stages: 2,
            },
            Phase::BackwardDq => PrefillTile {
                block_m: 64,
                block_n: match head_dim {
                    _ if mask_tensor => 32,
                    0..=32 => 128,
                    33..=128 => 64,
                    _ => 32,
                },
                warps: 4,
                stages: 2,
            },
            _ => PrefillTile {
                block_m: match (head_dim <= 64, mask_tensor) {
                    (true, false) => 64,
                    (false, false) | (true, true) => 32,
                    (false, true) => 16,
                },
                block_n: 64,
                warps: if head_dim <= 128 { 4 } else { 8 },
                stages: 2,
            },
        }
    }

    /// A tile of [`Phase::BackwardDqDkDvSm90`] with the given schedule (`stages`, key suffix
    /// `s<schedule>`; templates/backward_dqdkdv_sm90.cu): 2 = in order (S^T and dP^T, the
    /// exponentials, dS^T, then dV, dK and dQ), 3 = overlapped (dV's product issued right
    /// after P^T, before the wait for dP^T, so that ptxas keeps the exponentials under dP^T's
    /// product; dS^T from the f32 P while dV runs), 4 = anchored (dV issued there too, then
    /// one wait for dP^T and dV, dS^T from the packed P: 3's exponential overlap with 2's
    /// registers). [`KernelConfig::check_config`] takes 2 at every head dim, 3 at 128 only
    /// (at 64 the f32 P of 128 queries kept alive spills 100-228 bytes), 4 at 64 and 128.
    /// The default ([`PrefillTile::for_backward`]) is 4 at head dim 64 (H200, 2026-12-01, 2k
    /// and 8k tokens: +0-4% over 2), 3 at 128 (+1-14% over 2; 4 there: within 2% of 3) and 2
    /// at 256. Tiles: 128 keys x 128 queries per step at head dim 64,
    /// 128 x 64 at 128, 64 x 64 at 256; two warpgroups.
    pub fn for_backward_sm90(head_dim: usize, schedule: usize) -> PrefillTile {
        PrefillTile {
            block_m: if head_dim <= 64 { 128 } else { 64 },
            block_n: if head_dim <= 128 { 128 } else { 64 },
            warps: FUSED_BACKWARD_WARPS,
            stages: schedule,
        }
    }

    /// The `PrefillSm90` (Hopper, wgmma) tile without a producer warpgroup (no longer a default:
    /// that is [`PrefillTile::for_head_dim_sm90_ws`]), and the warp-specialized tile's base.
    /// Head dim 128 without a mask
    /// tensor, bias or window (`heavy` false): three consumer warpgroups (12 warps, 192 query
    /// rows, 64 per warpgroup), 128 keys per step, two K/V stages in order (H200, 2026-11-30,
    /// hd128 at 16k tokens: 417 / 467 TFLOP/s causal / no mask against 365-379 for the
    /// 128-row tile). Otherwise two warpgroups (8 warps, 128 rows): the `heavy` variants
    /// spill at the 168-register cap of 384 threads. 128 keys per step up to head dim 128, 64
    /// above (the f32 output accumulator of head dim 256 takes 128 registers per thread);
    /// three K/V stages (the pipelined schedule: one step's P V under the next step's
    /// softmax) where they fit in 227 KiB, two at head dim 256. H200, 2026-11-30, hd128 at
    /// 2k-16k tokens: three pipelined stages 1.00-1.15x SDPA flash, two stages in order
    /// 0.97-1.10x.
    pub fn for_head_dim_sm90(head_dim: usize, heavy: bool) -> PrefillTile {
        if head_dim == 128 && !heavy {
            return PrefillTile {
                block_m: 192,
                block_n: 128,
                warps: 12,
                stages: 2,
            };
        }
        PrefillTile {
            block_m: 128,
            block_n: if head_dim <= 128 { 128 } else { 64 },
            warps: 8,
            stages: 3,
        }
        .stages_that_fit_sm90(head_dim)
    }

    /// The warp-specialized `PrefillSm90` tile ([`PrefillTile::producer_sm90`]), the default
    /// of `PrefillSm90` (a paged pool's too: one TMA box per pool block): 128 query rows in two consumer warpgroups plus
    /// a producer warpgroup (12 warps) that loads by TMA, 128 keys per step up to head dim
    /// 128 and 64 above, three K/V stages where they fit in 227 KiB of shared memory, else
    /// two. H200, 2026-12-01, bf16, 2k-16k tokens (`attn bench prefill`, same run): 450-597
    /// TFLOP/s at hd128 causal against 315-417 for [`PrefillTile::for_head_dim_sm90`]'s
    /// tile, 490-665 against 374-514 at hd256 causal.
    pub fn for_head_dim_sm90_ws(head_dim: usize) -> PrefillTile {
        PrefillTile {
            warps: 12,
            ..PrefillTile::for_head_dim_sm90(head_dim, true)
        }
        .stages_that_fit_sm90(head_dim)
    }

    /// This tile with three stages if a `PrefillSm90` block of them fits in 227 KiB of
    /// shared memory (an H100 / H200 SM's opt-in), else two.
    fn stages_that_fit_sm90(self, head_dim: usize) -> PrefillTile {
        let three = PrefillTile { stages: 3, ..self };
        if three.smem_bytes_sm90(head_dim) <= 227 * 1024 {
            three
        } else {
            PrefillTile { stages: 2, ..self }
        }
    }

    /// Dynamic shared memory of a `PrefillSm90` block: Q tile plus `stages` K and V tiles,
    /// unpadded (128-byte swizzled), plus 1024 bytes to align them to the swizzle period,
    /// plus 128 bytes of mbarriers with a producer warpgroup ([`PrefillTile::producer_sm90`]).
    pub fn smem_bytes_sm90(&self, head_dim: usize) -> usize {
        let barriers = if self.producer_sm90() { 128 } else { 0 };
        (self.block_m + 2 * self.stages * self.block_n) * head_dim * 2 + 1024 + barriers
    }

    /// `PrefillSm90`: the tile has a producer warpgroup (warp specialization): `warps` is
    /// `block_m / 16` consumer warps (one 16-row slice each) plus 4 that only load Q and the
    /// K/V tiles (templates/prefill_sm90.cu, "Loading").
    pub fn producer_sm90(&self) -> bool {
        self.warps * 16 > self.block_m
    }

    fn check_sm90(&self, head_dim: usize) -> Result<(), RenderError> {
        let consumers = self.block_m / 16;
        let ok = head_dim.is_multiple_of(64)
            && self.warps.is_multiple_of(4)
            && (4..=16).contains(&self.warps)
            && self.block_m.is_multiple_of(64)
            && (4..=12).contains(&consumers)
            && (self.warps == consumers || self.warps == consumers + 4)
            && self.block_n.is_multiple_of(16)
            && (16..=256).contains(&self.block_n)
            && (2..=4).contains(&self.stages);
        if ok {
            Ok(())
        } else {
            Err(RenderError::BadPrefillTile { tile: *self })
        }
    }

    /// Dynamic shared memory of one block: Q tile plus `stages` K and V tiles, rows padded
    /// to `head_dim + 8` 16-bit elements.
    pub fn smem_bytes(&self, head_dim: usize) -> usize {
        (self.block_m + 2 * self.stages * self.block_n) * (head_dim + 8) * 2
    }

    /// Key suffix `m<block_m>n<block_n>w<warps>s<stages>`.
    pub fn key(&self) -> String {
        format!(
            "m{}n{}w{}s{}",
            self.block_m, self.block_n, self.warps, self.stages
        )
    }

    fn check(&self) -> Result<(), RenderError> {
        let ok = (1..=16).contains(&self.warps)
            && self.block_m.is_multiple_of(16 * self.warps)
            && self.block_m > 0
            && self.block_n.is_multiple_of(16)
            && self.block_n > 0
            && self.block_n <= 256
            && (2..=4).contains(&self.stages);
        if ok {
            Ok(())
        } else {
            Err(RenderError::BadPrefillTile { tile: *self })
        }
    }
}

/// Rendering failures; each names the offending value.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum RenderError {
    /// A head dim outside [`SUPPORTED_HEAD_DIMS`].
    #[error("argument `head_dim`: expected one of {supported:?}, got {head_dim}")]
    UnsupportedHeadDim {
        /// The head dim given.
        head_dim: usize,
        /// The supported set.
        supported: &'static [usize],
    },
    /// A head dim asked for at run time that the spec does not list.
    #[error("argument `head_dim`: the spec lists head dims {spec:?}, got {head_dim}")]
    HeadDimNotInSpec {
        /// The head dim given.
        head_dim: usize,
        /// The spec's head dims.
        spec: Vec<usize>,
    },
    /// The spec lists no mask type.
    #[error("argument `spec.masks`: expected at least one mask type, got none")]
    NoMasks,
    /// A forward kernel without a mask type.
    #[error("kernel config: phase `prefill_rows` / `prefill_sm80` / `prefill_sm90` expects a mask type, got none")]
    MissingMask,
    /// A window on a mask that cannot take one.
    #[error("argument `window`: mask `{mask}` cannot take a sliding window", mask = .mask.name())]
    WindowOnMask {
        /// The mask type.
        mask: MaskType,
    },
    /// The rotated channel count is odd, zero or larger than the head dim.
    #[error(
        "argument `rotary_percent`: expected head_dim * rotary_percent to be an even number in \
         2..={head_dim}, got {rotary_percent} * {head_dim} = {rot_dim}"
    )]
    RotaryDim {
        /// Head dim.
        head_dim: usize,
        /// `rotary_percent`.
        rotary_percent: f64,
        /// The resulting rotated channel count.
        rot_dim: usize,
    },
    /// A tile size that is zero or too large for one block (at most 32 warps).
    #[error("kernel config `warps`: expected 1..=32, got {warps}")]
    BadTile {
        /// Warps per block given.
        warps: usize,
    },
    /// A prefill or backward tile the kernel cannot run.
    #[error(
        "kernel config `tile`: expected 1..=16 warps, block_m a multiple of 16 * warps, \
         block_n a multiple of 16 in 16..=256 and 2..=4 stages (prefill_sm90: block_m a \
         multiple of 64 in 64..=192 with block_m / 16 warps, or 4 more for a producer \
         warpgroup), got {tile:?}"
    )]
    BadPrefillTile {
        /// The tile given.
        tile: PrefillTile,
    },
    /// A combination the kernels do not implement.
    #[error("argument `{argument}`: {reason}")]
    Unsupported {
        /// The spec field or kernel parameter.
        argument: &'static str,
        /// What is not supported.
        reason: &'static str,
    },
    /// An arch name that is not `sm_<digits>[a|f]` or `compute_<digits>[a|f]`.
    #[error("argument `arch`: expected a GPU architecture like `sm_80` or `sm_90a`, got {arch:?}")]
    BadArch {
        /// The arch given.
        arch: String,
    },
    /// Template parse or render error (a bug in the templates).
    #[error("rendering kernel `{key}` failed: {message}")]
    Template {
        /// Kernel key (or the template name when parsing failed).
        key: String,
        /// Tera's message with its causes.
        message: String,
    },
}

fn tera_message(e: &tera::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// The tera engine with every template loaded.
fn engine() -> Result<Tera, RenderError> {
    let mut tera = Tera::default();
    tera.autoescape_on(vec![]);
    tera.add_raw_templates(TEMPLATES.iter().copied())
        .map_err(|e| RenderError::Template {
            key: "templates/".into(),
            message: tera_message(&e),
        })?;
    Ok(tera)
}

fn sinks_name(s: Option<Sinks>) -> &'static str {
    match s {
        None => "none",
        Some(Sinks::OffByOne) => "off_by_one",
        Some(Sinks::Learnable) => "learnable",
    }
}

fn sinks_key(s: Option<Sinks>) -> &'static str {
    match s {
        None => "",
        Some(Sinks::OffByOne) => "_sink1",
        Some(Sinks::Learnable) => "_sinkl",
    }
}

impl KernelConfig {
    /// A config with no optional feature, for `phase`, `dtype` and `head_dim`.
    pub fn new(phase: Phase, dtype: DType, head_dim: usize) -> Self {
        KernelConfig {
            phase,
            dtype,
            head_dim,
            mask: None,
            causal: true,
            has_window: false,
            sinks: None,
            has_bias: false,
            output_gate: false,
            layout: PrepLayout::SelfAttention,
            qk_norm: None,
            rope: None,
            warps: match phase {
                Phase::QkvPrep => PREP_WARPS,
                Phase::DecodeSplitKv => DECODE_SPLITKV_WARPS,
                _ => ATTENTION_BLOCK_ROWS,
            },
            tile: None,
            paged_kv: false,
            row_blocks: 1,
        }
    }

    /// The causal alignment the attention templates apply: `none`, `top_left` or
    /// `bottom_right`.
    fn causal_mode(&self) -> &'static str {
        match self.phase {
            Phase::PrefillRows
            | Phase::PrefillSm80
            | Phase::PrefillSm90
            | Phase::BackwardDkdv
            | Phase::BackwardDq
            | Phase::BackwardDqDkDv
            | Phase::BackwardDqDkDvSm90 => match self.mask {
                Some(MaskType::Causal | MaskType::PaddingCausal) => "top_left",
                Some(MaskType::CausalBottomRight) => "bottom_right",
                _ => "none",
            },
            Phase::DecodeRows if !self.causal => "none",
            Phase::DecodeRows | Phase::DecodeRowsPaged | Phase::DecodeSplitKv => "bottom_right",
            Phase::QkvPrep | Phase::AppendKv | Phase::BackwardPreprocess => "none",
        }
    }

    /// The kernel key (and entry name). Encodes every parameter that changes the source:
    ///
    /// - `prefill_rows_<dtype>_hd<D>_<mask>[_win][_sink1|_sinkl][_bias][_gate]_w<warps>`
    /// - `prefill_<dtype>_hd<D>_<mask>[_win][_sink1|_sinkl][_bias][_paged][_gate]_m<M>n<N>w<W>s<S>_sm80`
    /// - `decode_rows_<dtype>_hd<D>_<causal|full>[_win][_sink1|_sinkl][_gate]_w<warps>`
    /// - `decode_rows_<dtype>_hd<D>_causal[_win][_sink1|_sinkl]_paged[_gate]_w<warps>`
    /// - `decode_splitkv_<dtype>_hd<D>_<norope|ropehalf<R>|ropeinter<R>>[_win][_sink1|_sinkl][_paged][_gate][_rb<row blocks>]_w<warps>`
    ///   (its combine entry is `<key>_combine`; `_paged` is always `_norope`)
    /// - `append_kv_<dtype>_hd<D>_w<warps>`
    /// - `qkv_prep_<dtype>_hd<D>_<self|cross>_<nonorm|layernorm|rmsnorm|l2norm>_<norope|ropehalf<R>|ropeinter<R>>[_gate]_w<warps>`
    /// - `backward_preprocess_<dtype>_hd<D>` (its sinks entry is `<key>_dsink`)
    /// - `backward_dkdv_<dtype>_hd<D>_<mask>[_win][_bias]_m<M>n<N>w<W>_sm80`,
    ///   `backward_dq_<dtype>_hd<D>_<mask>[_win][_bias]_m<M>n<N>w<W>_sm80`,
    ///   `backward_dqdkdv_<dtype>_hd<D>_<mask>[_win][_bias]_m<M>n<N>w<W>_sm80` and its Hopper
    ///   twin `…_sm90` (their conversion entry is `<key>_dq_convert`; sinks change no
    ///   backward source: they enter through the forward's LSE)
    ///
    /// `sink1` = off-by-one sink, `sinkl` = learnable sink, `R` = rotated channels. `_paged`
    /// marks every kernel reading K/V from a paged pool; the arch suffix (`_sm80`: the lowest
    /// SM version the kernel runs on) comes last, on the kernels that need one.
    pub fn key(&self) -> String {
        let mut k = format!(
            "{}_{}_hd{}",
            self.phase.prefix(),
            self.dtype.name(),
            self.head_dim
        );
        match self.phase {
            Phase::BackwardPreprocess => return k,
            Phase::BackwardDkdv
            | Phase::BackwardDq
            | Phase::BackwardDqDkDv
            | Phase::BackwardDqDkDvSm90 => {
                k.push('_');
                k.push_str(self.mask.map(|m| m.name()).unwrap_or("nomask_missing"));
                if self.has_window {
                    k.push_str("_win");
                }
                if self.has_bias {
                    k.push_str("_bias");
                }
                let t = self.prefill_tile();
                k.push_str(&format!(
                    "_m{}n{}w{}{}",
                    t.block_m,
                    t.block_n,
                    t.warps,
                    match (self.phase, t.stages) {
                        (Phase::BackwardDqDkDvSm90, 2) => "_sm90".to_string(),
                        (Phase::BackwardDqDkDvSm90, st) => format!("s{st}_sm90"),
                        _ => "_sm80".to_string(),
                    }
                ));
                return k;
            }
            _ => {}
        }
        match self.phase {
            Phase::PrefillRows | Phase::PrefillSm80 | Phase::PrefillSm90 => {
                k.push('_');
                k.push_str(self.mask.map(|m| m.name()).unwrap_or("nomask_missing"));
            }
            Phase::DecodeRows => k.push_str(if self.causal { "_causal" } else { "_full" }),
            Phase::DecodeRowsPaged => k.push_str("_causal"),
            Phase::AppendKv
            | Phase::BackwardPreprocess
            | Phase::BackwardDkdv
            | Phase::BackwardDq
            | Phase::BackwardDqDkDv
            | Phase::BackwardDqDkDvSm90 => {}
            Phase::DecodeSplitKv => match self.rope {
                None => k.push_str("_norope"),
                Some((RopeMode::Half, r)) => k.push_str(&format!("_ropehalf{r}")),
                Some((RopeMode::Interleaved, r)) => k.push_str(&format!("_ropeinter{r}")),
            },
            Phase::QkvPrep => {
                k.push_str(match self.layout {
                    PrepLayout::SelfAttention => "_self",
                    PrepLayout::CrossAttention => "_cross",
                });
                k.push_str(match self.qk_norm {
                    None => "_nonorm",
                    Some(QkNorm::Layer) => "_layernorm",
                    Some(QkNorm::Rms) => "_rmsnorm",
                    Some(QkNorm::L2) => "_l2norm",
                });
                match self.rope {
                    None => k.push_str("_norope"),
                    Some((RopeMode::Half, r)) => k.push_str(&format!("_ropehalf{r}")),
                    Some((RopeMode::Interleaved, r)) => k.push_str(&format!("_ropeinter{r}")),
                }
            }
        }
        if !matches!(self.phase, Phase::QkvPrep | Phase::AppendKv) {
            if self.has_window {
                k.push_str("_win");
            }
            k.push_str(sinks_key(self.sinks));
        }
        if matches!(
            self.phase,
            Phase::PrefillRows | Phase::PrefillSm80 | Phase::PrefillSm90
        ) && self.has_bias
        {
            k.push_str("_bias");
        }
        if (matches!(
            self.phase,
            Phase::PrefillSm80 | Phase::PrefillSm90 | Phase::DecodeSplitKv
        ) && self.paged_kv)
            || self.phase == Phase::DecodeRowsPaged
        {
            k.push_str("_paged");
        }
        if self.output_gate {
            k.push_str("_gate");
        }
        if self.phase == Phase::DecodeSplitKv && self.row_blocks != 1 {
            k.push_str(&format!("_rb{}", self.row_blocks));
        }
        if matches!(self.phase, Phase::PrefillSm80 | Phase::PrefillSm90) {
            k.push('_');
            k.push_str(&self.prefill_tile().key());
            k.push_str(if self.phase == Phase::PrefillSm90 {
                "_sm90"
            } else {
                "_sm80"
            });
        } else {
            k.push_str(&format!("_w{}", self.warps));
        }
        k
    }

    /// The checks [`KernelConfig::render`] makes before rendering (head dim, mask, tile,
    /// feature combinations).
    pub fn check_config(&self) -> Result<(), RenderError> {
        self.check()
    }

    fn check(&self) -> Result<(), RenderError> {
        if !SUPPORTED_HEAD_DIMS.contains(&self.head_dim) {
            return Err(RenderError::UnsupportedHeadDim {
                head_dim: self.head_dim,
                supported: SUPPORTED_HEAD_DIMS,
            });
        }
        if self.warps == 0 || self.warps > 32 {
            return Err(RenderError::BadTile { warps: self.warps });
        }
        if matches!(
            self.phase,
            Phase::PrefillRows | Phase::PrefillSm80 | Phase::PrefillSm90
        ) {
            let mask = self.mask.ok_or(RenderError::MissingMask)?;
            if self.has_window && !mask.accepts_window() {
                return Err(RenderError::WindowOnMask { mask });
            }
        }
        if self.phase == Phase::PrefillSm80 {
            self.prefill_tile().check()?;
        }
        if self.phase == Phase::PrefillSm90 {
            self.prefill_tile().check_sm90(self.head_dim)?;
        }
        if self.phase.is_backward() {
            self.check_backward()?;
        }
        if self.phase == Phase::QkvPrep && self.layout == PrepLayout::CrossAttention {
            if self.rope.is_some() {
                return Err(RenderError::Unsupported {
                    argument: "rope",
                    reason: "cross-attention takes no rotary embedding",
                });
            }
            if self.output_gate {
                return Err(RenderError::Unsupported {
                    argument: "output_gate",
                    reason: "the output gate comes from linear_qkv, which cross-attention lacks",
                });
            }
        }
        let rb_ok = if self.phase == Phase::DecodeSplitKv {
            DECODE_SPLITKV_ROW_BLOCKS.contains(&self.row_blocks)
        } else {
            self.row_blocks == 1
        };
        if !rb_ok
            || (self.phase == Phase::DecodeSplitKv
                && self.warps != decode_splitkv_warps(self.row_blocks))
        {
            return Err(RenderError::Unsupported {
                argument: "row_blocks",
                reason: "decode_splitkv takes 1, 2 or 4 row blocks with decode_splitkv_warps(row \
                         blocks) warps; other kernels 1 row block",
            });
        }
        if self.phase == Phase::DecodeSplitKv && self.paged_kv && self.rope.is_some() {
            return Err(RenderError::Unsupported {
                argument: "rope",
                reason: "the paged decode kernel reads q and k already rotated by qkv_prep",
            });
        }
        if let (Phase::QkvPrep | Phase::DecodeSplitKv, Some((_, r))) = (self.phase, self.rope) {
            if r == 0 || r & 1 == 1 || r > self.head_dim {
                return Err(RenderError::RotaryDim {
                    head_dim: self.head_dim,
                    rotary_percent: r as f64 / self.head_dim as f64,
                    rot_dim: r,
                });
            }
        }
        Ok(())
    }

    /// The backward kernels' limits: head dims in [`BACKWARD_HEAD_DIMS`]; dK/dV and dQ: any
    /// mask type (mask tensors included), with or without an additive bias, no output gate or
    /// paged K/V, 16 rows (keys for dK/dV, queries for dQ) per warp.
    fn check_backward(&self) -> Result<(), RenderError> {
        if !BACKWARD_HEAD_DIMS.contains(&self.head_dim) {
            return Err(RenderError::Unsupported {
                argument: "head_dim",
                reason: "the backward kernels support the head dims of SUPPORTED_HEAD_DIMS",
            });
        }
        if self.output_gate || self.paged_kv {
            return Err(RenderError::Unsupported {
                argument: "output_gate/paged_kv",
                reason: "the backward kernels take neither an output gate nor a paged pool",
            });
        }
        if self.phase == Phase::BackwardPreprocess {
            return Ok(());
        }
        let mask = self.mask.ok_or(RenderError::MissingMask)?;
        if self.has_window && !mask.accepts_window() {
            return Err(RenderError::WindowOnMask { mask });
        }
        let t = self.prefill_tile();
        if self.phase == Phase::BackwardDqDkDvSm90 {
            // The Hopper kernel: only its own tile, at head dims whose dQ split it has.
            if !SM90_BACKWARD_HEAD_DIMS.contains(&self.head_dim) {
                return Err(RenderError::Unsupported {
                    argument: "head_dim",
                    reason: "the Hopper backward kernel supports head dims 64, 128 and 256",
                });
            }
            let schedule_ok = match t.stages {
                2 => true,
                3 => self.head_dim == 128,
                4 => self.head_dim <= 128,
                _ => false,
            };
            if !schedule_ok || t != PrefillTile::for_backward_sm90(self.head_dim, t.stages) {
                return Err(RenderError::BadPrefillTile { tile: t });
            }
            return Ok(());
        }
        if self.phase == Phase::BackwardDqDkDv {
            // The fused kernel: only its own tile, at head dims with a warp grid.
            if fused_backward_layout(self.head_dim).is_none() {
                return Err(RenderError::Unsupported {
                    argument: "head_dim",
                    reason: "the fused backward has no warp grid at head dims 80, 160 and 224",
                });
            }
            if t != PrefillTile::for_backward(Phase::BackwardDqDkDv, self.head_dim, false) {
                return Err(RenderError::BadPrefillTile { tile: t });
            }
            return Ok(());
        }
        // dK/dV: 16 keys per warp, or per pair of warps (splitting the head dim in two).
        let per_warp = if self.phase == Phase::BackwardDkdv {
            if t.warps * 16 == 2 * t.block_n && self.head_dim.is_multiple_of(32) {
                t.block_n * 2
            } else {
                t.block_n
            }
        } else {
            t.block_m
        };
        let other = if self.phase == Phase::BackwardDkdv {
            t.block_m
        } else {
            t.block_n
        };
        if !(1..=8).contains(&t.warps)
            || per_warp != 16 * t.warps
            || other == 0
            || !other.is_multiple_of(16)
            || other > 128
            || t.stages != 2
        {
            return Err(RenderError::BadPrefillTile { tile: t });
        }
        Ok(())
    }

    /// Dynamic shared memory (bytes) of a backward dK/dV or dQ block (0 for the other
    /// phases): dK/dV holds K, V and two buffers of the Q, dO tiles (rows padded to
    /// `head_dim + 8` 16-bit elements) and of their LSE and D (f32); dQ holds Q, dO and two
    /// buffers of the K, V tiles; the fused kernels hold K, V, two buffers of Q and dO, P and
    /// dS (sm80, padded rows) or dS^T alone (sm90, swizzled rows, plus 1024 bytes of
    /// alignment), and the LSE and D.
    pub fn backward_smem_bytes(&self) -> usize {
        let t = self.prefill_tile();
        let row = (self.head_dim + 8) * 2;
        match self.phase {
            Phase::BackwardDkdv => (2 * t.block_n + 4 * t.block_m) * row + 16 * t.block_m,
            Phase::BackwardDq => (2 * t.block_m + 4 * t.block_n) * row,
            Phase::BackwardDqDkDvSm90 => {
                // dS^T, and at head dim 256 P^T too.
                let p_tiles = if self.head_dim > 128 { 2 } else { 1 };
                (2 * t.block_n + 4 * t.block_m) * self.head_dim * 2
                    + p_tiles * t.block_n * t.block_m * 2
                    + 16 * t.block_m
                    + 1024
            }
            Phase::BackwardDqDkDv => {
                (2 * t.block_n + 4 * t.block_m) * row
                    + 2 * t.block_m * (t.block_n + 8) * 2
                    + 16 * t.block_m
            }
            _ => 0,
        }
    }

    fn context(&self, key: &str) -> Context {
        let mut c = Context::new();
        c.insert("key", key);
        c.insert("dtype", self.dtype.name());
        c.insert(
            "elem",
            match self.dtype {
                DType::Bf16 => "bf16_t",
                DType::F16 => "f16_t",
            },
        );
        c.insert("head_dim", &self.head_dim);
        c.insert("mask", self.mask.map(|m| m.name()).unwrap_or("none"));
        c.insert("causal_mode", self.causal_mode());
        c.insert(
            "mask_tensor",
            &self.mask.is_some_and(|m| m.takes_mask_tensor()),
        );
        c.insert("has_window", &self.has_window);
        c.insert("sinks", sinks_name(self.sinks));
        c.insert("has_bias", &self.has_bias);
        c.insert("paged_kv", &self.paged_kv);
        c.insert("has_gate", &self.output_gate);
        c.insert("block_rows", &self.warps);
        c.insert("prep_warps", &self.warps);
        let tile = self.prefill_tile();
        c.insert("block_m", &tile.block_m);
        c.insert("block_n", &tile.block_n);
        c.insert("warps", &tile.warps);
        c.insert("stages", &tile.stages);
        // PrefillSm90's warp-specialized tile takes TMA tensor maps (templates/prefill_sm90.cu,
        // "Loading").
        c.insert(
            "tma",
            &(self.phase == Phase::PrefillSm90 && tile.producer_sm90()),
        );
        // n8 tiles of the wgmma accumulators (prefill_sm90.cu's operand lists).
        c.insert("s_tiles", &(tile.block_n / 8));
        c.insert("o_tiles", &(self.head_dim / 8));
        c.insert(
            "layout",
            match self.layout {
                PrepLayout::SelfAttention => "self",
                PrepLayout::CrossAttention => "cross",
            },
        );
        c.insert(
            "qk_norm",
            match self.qk_norm {
                None => "none",
                Some(QkNorm::Layer) => "layer",
                Some(QkNorm::Rms) => "rms",
                Some(QkNorm::L2) => "l2",
            },
        );
        let (rope, rot_dim) = match self.rope {
            None => ("none", 0),
            Some((RopeMode::Half, r)) => ("half", r),
            Some((RopeMode::Interleaved, r)) => ("interleaved", r),
        };
        c.insert("rope", rope);
        c.insert("rot_dim", &rot_dim);
        c.insert("decode_tile", &decode_splitkv_tile(self.head_dim));
        c.insert("decode_stages", &DECODE_SPLITKV_STAGES);
        c.insert("decode_warps", &decode_splitkv_warps(self.row_blocks));
        c.insert("decode_row_blocks", &self.row_blocks);
        c.insert(
            "decode_min_blocks",
            &decode_splitkv_min_blocks(self.head_dim, self.row_blocks),
        );
        c.insert("merge_warps", &DECODE_SPLITKV_COMBINE_WARPS);
        c.insert("merge_batch", &DECODE_SPLITKV_COMBINE_BATCH);
        c.insert(
            "bwd_part",
            match self.phase {
                Phase::BackwardDkdv => "dkdv",
                Phase::BackwardDq => "dq",
                Phase::BackwardDqDkDv | Phase::BackwardDqDkDvSm90 => "dqdkdv",
                _ => "none",
            },
        );
        let (wm_s, wn_kv, wm_q) = fused_backward_layout(self.head_dim).unwrap_or((1, 1, 1));
        c.insert("wm_s", &wm_s);
        c.insert("wn_kv", &wn_kv);
        c.insert("wm_q", &wm_q);
        // The Hopper backward's wgmma shapes: S^T over the step's queries, dQ's columns per
        // warpgroup (every one when the warpgroups split 128 queries, else half).
        // Head dim 256 (`p_smem`): the warpgroups split S^T's queries and dK/dV's columns.
        let p_smem = self.phase == Phase::BackwardDqDkDvSm90 && self.head_dim > 128;
        let st_n = if p_smem {
            tile.block_m / 2
        } else {
            tile.block_m
        };
        let kv_n = if p_smem {
            self.head_dim / 2
        } else {
            self.head_dim
        };
        c.insert("p_smem", &p_smem);
        c.insert("st_n", &st_n);
        c.insert("st_tiles", &(st_n / 8));
        c.insert("kv_n", &kv_n);
        c.insert("kv_tiles", &(kv_n / 8));
        let dq_n = if tile.block_m == 128 {
            self.head_dim
        } else {
            self.head_dim / 2
        };
        c.insert("dq_n", &dq_n);
        c.insert("dq_tiles", &(dq_n / 8));
        c
    }

    fn render_with(&self, tera: &Tera) -> Result<KernelSource, RenderError> {
        self.check()?;
        let key = self.key();
        let source = tera
            .render(self.phase.template(), &self.context(&key))
            .map_err(|e| RenderError::Template {
                key: key.clone(),
                message: tera_message(&e),
            })?;
        Ok(KernelSource {
            key,
            phase: self.phase,
            head_dim: self.head_dim,
            mask: if matches!(
                self.phase,
                Phase::PrefillRows
                    | Phase::PrefillSm80
                    | Phase::PrefillSm90
                    | Phase::BackwardDkdv
                    | Phase::BackwardDq
                    | Phase::BackwardDqDkDv
                    | Phase::BackwardDqDkDvSm90
            ) {
                self.mask
            } else {
                None
            },
            dtype: self.dtype,
            paged_kv: self.paged_kv
                && matches!(
                    self.phase,
                    Phase::PrefillSm80 | Phase::PrefillSm90 | Phase::DecodeSplitKv
                ),
            source,
        })
    }

    /// The `PrefillSm80` tile (and the backward phases'): [`KernelConfig::tile`] or the
    /// head dim's default.
    pub fn prefill_tile(&self) -> PrefillTile {
        self.tile.unwrap_or_else(|| {
            if self.phase.is_backward() {
                let mask_tensor = self.mask.is_some_and(|m| m.takes_mask_tensor()) || self.has_bias;
                PrefillTile::for_backward(self.phase, self.head_dim, mask_tensor)
            } else if self.phase == Phase::PrefillSm90 {
                PrefillTile::for_head_dim_sm90_ws(self.head_dim)
            } else {
                PrefillTile::for_head_dim(self.head_dim)
            }
        })
    }

    /// Dynamic shared memory (bytes) of one block of the tensor-core prefill kernels
    /// (`PrefillSm80`: [`PrefillTile::smem_bytes`]; `PrefillSm90`:
    /// [`PrefillTile::smem_bytes_sm90`]); 0 for the other phases.
    pub fn prefill_smem_bytes(&self) -> usize {
        match self.phase {
            Phase::PrefillSm80 => self.prefill_tile().smem_bytes(self.head_dim),
            Phase::PrefillSm90 => self.prefill_tile().smem_bytes_sm90(self.head_dim),
            _ => 0,
        }
    }

    /// Render this kernel.
    pub fn render(&self) -> Result<KernelSource, RenderError> {
        self.render_with(&engine()?)
    }
}

/// The kernel parameter structs (`templates/partials/params.cu`) after the element types of
/// `dtype`, compilable on their own: what tests append layout `static_assert`s to.
pub fn params_source(dtype: DType) -> Result<String, RenderError> {
    let mut c = KernelConfig::new(Phase::PrefillRows, dtype, 64).context("params_probe");
    c.insert("head_dim", &64);
    engine()?
        .render("params_probe.cu", &c)
        .map_err(|e| RenderError::Template {
            key: "params_probe".into(),
            message: tera_message(&e),
        })
}

/// Rotated channel count for `head_dim` (`int(head_dim * rotary_percent)`, as the reference).
pub(crate) fn rot_dim(head_dim: usize, rotary_percent: f64) -> Result<usize, RenderError> {
    let r = (head_dim as f64 * rotary_percent) as usize;
    if r == 0 || r & 1 == 1 || r > head_dim || !rotary_percent.is_finite() {
        return Err(RenderError::RotaryDim {
            head_dim,
            rotary_percent,
            rot_dim: r,
        });
    }
    Ok(r)
}

/// The kernel configs a spec needs for one head dim on any device:
/// [`registry::kernels_for`] with
/// [`Target::AnyDevice`].
pub fn configs_for_head_dim(
    spec: &AttentionSpec,
    head_dim: usize,
) -> Result<Vec<KernelConfig>, RenderError> {
    registry::kernels_for(spec, head_dim, Target::AnyDevice)
}

/// Render every kernel the spec needs for one head dim (the runtime uses this when the
/// head dim comes from the config). When the spec lists head dims, `head_dim` must be one
/// of them.
pub fn kernels_for_spec_with_head_dim(
    spec: &AttentionSpec,
    head_dim: usize,
) -> Result<Vec<KernelSource>, RenderError> {
    if !spec.head_dims.is_empty() && !spec.head_dims.contains(&head_dim) {
        return Err(RenderError::HeadDimNotInSpec {
            head_dim,
            spec: spec.head_dims.clone(),
        });
    }
    render_all(&configs_for_head_dim(spec, head_dim)?)
}

/// Render every kernel the spec needs on any device, for every head dim it lists
/// ([`registry::kernels_for_spec_head_dims`]).
/// A spec without head dims gives an empty list (the runtime renders with
/// [`kernels_for_spec_with_head_dim`] once the config supplies the head dim).
pub fn kernels_for_spec(spec: &AttentionSpec) -> Result<Vec<KernelSource>, RenderError> {
    render_all(&registry::kernels_for_spec_head_dims(
        spec,
        Target::AnyDevice,
    )?)
}

/// Render a list of configs (one tera engine for all of them).
pub fn render_all(configs: &[KernelConfig]) -> Result<Vec<KernelSource>, RenderError> {
    let tera = engine()?;
    configs.iter().map(|c| c.render_with(&tera)).collect()
}

/// The `PrefillSm80` configs a spec needs (default tiles): the registry's
/// ([`registry::kernels_for_spec_head_dims`])
/// `prefill_*_sm80` kernels, one per head dim, per mask and without / with the additive
/// attention bias, in spec order. The kernel implements every mask, mask tensors included.
pub fn prefill_sm80_configs_for_spec(
    spec: &AttentionSpec,
) -> Result<Vec<KernelConfig>, RenderError> {
    let mut all = registry::kernels_for_spec_head_dims(spec, Target::AnyDevice)?;
    all.retain(|c| c.phase == Phase::PrefillSm80);
    Ok(all)
}

/// Render [`prefill_sm80_configs_for_spec`].
pub fn prefill_sm80_kernels_for_spec(
    spec: &AttentionSpec,
) -> Result<Vec<KernelSource>, RenderError> {
    render_all(&prefill_sm80_configs_for_spec(spec)?)
}

#[cfg(test)]
mod prefill_sm80_tests {
    use super::*;
    use crate::spec::AttentionKind;

    fn fast(mask: MaskType, has_bias: bool) -> KernelConfig {
        let mut c = KernelConfig::new(Phase::PrefillSm80, DType::Bf16, 128);
        c.mask = Some(mask);
        c.has_bias = has_bias;
        c
    }

    #[test]
    fn mask_tensors_and_bias_render_and_are_read() {
        for mask in [
            MaskType::Padding,
            MaskType::PaddingCausal,
            MaskType::Arbitrary,
        ] {
            let k = fast(mask, false).render().expect("mask tensor renders");
            assert_eq!(
                k.key,
                format!("prefill_bf16_hd128_{}_m128n64w4s2_sm80", mask.name())
            );
            assert!(k.source.contains("mask_stride_k] != 0"), "{}", k.key);
            assert!(!k.source.contains("bias_stride_k]"), "{}", k.key);
        }
        let k = fast(MaskType::Causal, true).render().expect("bias renders");
        assert_eq!(k.key, "prefill_bf16_hd128_causal_bias_m128n64w4s2_sm80");
        assert!(k.source.contains("bias_stride_k]"));
        assert!(!k.source.contains("mask_stride_k] != 0"));
        // Without either, the kernel reads neither tensor.
        let k = fast(MaskType::Causal, false).render().unwrap();
        assert!(!k.source.contains("bias_stride_k]") && !k.source.contains("mask_stride_k] != 0"));
        // padding_causal is top-left causal plus the tensor.
        let k = fast(MaskType::PaddingCausal, true).render().unwrap();
        assert!(k.source.contains("(long long)i + 1"));
    }

    #[test]
    fn fast_configs_cover_every_mask_with_and_without_bias() {
        let spec = AttentionSpec {
            heads: Some(8),
            gqa: Some(2),
            head_dims: vec![64],
            masks: vec![MaskType::Causal, MaskType::Padding],
            ..AttentionSpec::new(AttentionKind::SelfAttention)
        };
        let keys: Vec<String> = prefill_sm80_configs_for_spec(&spec)
            .unwrap()
            .iter()
            .map(|c| c.key())
            .collect();
        let tile = PrefillTile::for_head_dim(64).key();
        assert_eq!(
            keys,
            [
                format!("prefill_bf16_hd64_causal_{tile}_sm80"),
                format!("prefill_bf16_hd64_causal_bias_{tile}_sm80"),
                format!("prefill_bf16_hd64_padding_{tile}_sm80"),
                format!("prefill_bf16_hd64_padding_bias_{tile}_sm80"),
                // Static-cache prefill, then the paged batch (self-attention).
                format!("prefill_bf16_hd64_causal_bottom_right_{tile}_sm80"),
                format!("prefill_bf16_hd64_causal_bottom_right_paged_{tile}_sm80"),
            ]
        );
    }
}
