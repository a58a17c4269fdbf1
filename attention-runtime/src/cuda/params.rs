//! Typed kernel parameters: one `#[repr(C)]` struct per kernel family, the host twin of the
//! struct its templates declare (`templates/partials/params.cu`), queued as the kernel's
//! whole parameter buffer by [`launch`].
//!
//! A kernel of a family either takes the struct by value (`const FwdParams p`:
//! `prefill_rows`, `decode_rows`, `decode_rows_paged`, `qkv_prep`, `append_kv`) or takes its fields
//! as positional parameters in the same order (`prefill_sm80`, where the struct parameter costs the
//! hot variants spills: 60 bytes of spill stores at hd128 causal, ptxas sm_90); both have the same
//! parameter buffer, byte for byte, so one launch path serves both. The test
//! `tests/nvrtc_params_layout.rs` checks, with NVRTC and no GPU, that the CUDA declaration has
//! the offsets and sizes of each struct's [`KernelParams::FIELDS`] and that every kernel's
//! compiled parameter list (the CUBIN's parameter table) is that layout.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{sys, CudaFunction, CudaStream, DriverError, LaunchConfig};

/// A kernel parameter struct: plain data whose bytes are a kernel's parameter buffer.
///
/// # Safety
/// The type is `#[repr(C)]`, holds only integers, floats and raw device pointers (`u64`),
/// and its layout is the CUDA declaration of the kernels it is launched with.
pub unsafe trait KernelParams: Copy {
    /// Every field: (name, byte offset, byte size), in declaration order.
    const FIELDS: &'static [(&'static str, usize, usize)];
}

/// Declares a `#[repr(C)]` parameter struct and its [`KernelParams::FIELDS`] table.
macro_rules! kernel_params {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Default, PartialEq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        // SAFETY: #[repr(C)], every field an integer, a float or a raw device pointer (u64);
        // the layout tests hold the CUDA declaration to FIELDS.
        unsafe impl KernelParams for $name {
            const FIELDS: &'static [(&'static str, usize, usize)] = &[
                $( (
                    stringify!($field),
                    std::mem::offset_of!($name, $field),
                    std::mem::size_of::<$ty>(),
                ), )*
            ];
        }
    };
}

kernel_params! {
    /// Parameters of the attention family: `prefill_rows`, `prefill_sm80` (padded, packed,
    /// static-cache and paged modes) and the one-warp-per-row cache kernels `decode_rows` and
    /// `decode_rows_paged`; the CUDA
    /// declaration is `FwdParams` in `templates/partials/params.cu`. Pointers are raw device
    /// addresses (0 = null). Each kernel reads the fields its template lists; leave the others
    /// at their [`Default`] (0 / null). Layouts of the tensors: `templates/prefill_sm80.cu`.
    pub struct FwdParams {
        /// Queries.
        pub q: u64,
        /// Keys: packed / padded k, a static-cache layer or a paged pool.
        pub k: u64,
        /// Values, as `k`.
        pub v: u64,
        /// Output, layout of `q`.
        pub out: u64,
        /// f32 `[num_heads, rows]` log-sum-exp (natural log).
        pub lse: u64,
        /// int32 `[batch + 1]` query offsets (packed and paged), or null (padded).
        pub cu_seqlens_q: u64,
        /// int32 `[batch + 1]` key offsets (packed), or null.
        pub cu_seqlens_k: u64,
        /// Sequences (requests); the grid's z extent.
        pub batch: i32,
        /// Query heads.
        pub num_heads: i32,
        /// K/V groups (divides `num_heads`).
        pub num_groups: i32,
        /// Padded query length; packed and paged: the longest query sequence.
        pub seqlen_q: i32,
        /// Padded key length; packed: the longest key sequence (unused by the kernels).
        pub seqlen_k: i32,
        /// Logit scale.
        pub softmax_scale: f32,
        /// Sliding window, left (-1 = unbounded).
        pub window_left: i32,
        /// Sliding window, right (-1 = unbounded).
        pub window_right: i32,
        /// uint8 mask, nonzero = masked out, `[b, h, i, j]` at `mask_strides`.
        pub mask: u64,
        /// Element strides of the mask's b, h, i, j (0 broadcasts).
        pub mask_strides: [i64; 4],
        /// f32 additive post-scale bias, `[b, h, i, j]` at `bias_strides`.
        pub bias: u64,
        /// Element strides of the bias's b, h, i, j (0 broadcasts).
        pub bias_strides: [i64; 4],
        /// f32 `[num_heads]` learnable sink logits.
        pub sinks: u64,
        /// Output gate, layout of `q`.
        pub gate: u64,
        /// f32 `[num_heads]` per-head max logit record (pre-filled with -inf), or null.
        pub max_logit: u64,
        /// int32 flag raised when some V element is not finite, or null.
        pub v_nonfinite: u64,
        /// int32 `[batch]` keys per sequence of a static cache or a paged pool.
        pub cache_seqlens_k: u64,
        /// Static cache: the first batch slot.
        pub cache_batch_offset: i32,
        /// Static cache: batch slots of the layer.
        pub cache_max_batch: i32,
        /// int32 `[batch, max_blocks_per_seq]` block table of a paged pool.
        pub block_table: u64,
        /// Pool rows per block (a power of two >= 16 for `prefill_sm80`).
        pub block_size: i32,
        /// Row stride of the block table.
        pub max_blocks_per_seq: i32,
    }
}

kernel_params! {
    /// Parameters of the attention backward family (`backward_preprocess_*` and its
    /// `_dsink` entry, `backward_dkdv_*`, `backward_dq_*`); the CUDA declaration is
    /// `BwdParams` in `templates/partials/params.cu`. Pointers are raw device addresses
    /// (0 = null). Layouts: `templates/backward_sm80.cu`.
    pub struct BwdParams {
        /// Queries, layout of the forward's q.
        pub q: u64,
        /// Keys.
        pub k: u64,
        /// Values.
        pub v: u64,
        /// The forward's output, layout of q.
        pub out: u64,
        /// Gradient of the output, layout of q.
        pub dout: u64,
        /// The forward's f32 `[num_heads, total_q]` LSE (natural log).
        pub lse: u64,
        /// f32 `[num_heads, total_q]` scratch: D = rowsum(dout ∘ out).
        pub dpsum: u64,
        /// Gradient of q, layout of q.
        pub dq: u64,
        /// Gradient of k, layout of k.
        pub dk: u64,
        /// Gradient of v, layout of v.
        pub dv: u64,
        /// int32 `[batch + 1]` query offsets (packed), or null (padded).
        pub cu_seqlens_q: u64,
        /// int32 `[batch + 1]` key offsets (packed), or null.
        pub cu_seqlens_k: u64,
        /// f32 `[num_heads]` learnable sink logits, or null.
        pub sinks: u64,
        /// f32 `[num_heads]` gradient of the sink logits, or null.
        pub dsinks: u64,
        /// Sequences.
        pub batch: i32,
        /// Query heads.
        pub num_heads: i32,
        /// K/V groups (divides `num_heads`).
        pub num_groups: i32,
        /// Padded query length; packed: the longest query sequence.
        pub seqlen_q: i32,
        /// Padded key length; packed: the longest key sequence.
        pub seqlen_k: i32,
        /// Logit scale.
        pub softmax_scale: f32,
        /// Sliding window, left (-1 = unbounded).
        pub window_left: i32,
        /// Sliding window, right (-1 = unbounded).
        pub window_right: i32,
        /// Query rows of all sequences (the lse / dpsum row stride).
        pub total_q: i32,
        /// Key rows of all sequences.
        pub total_k: i32,
        /// uint8 mask, nonzero = masked out, `[b, h, i, j]` at `mask_strides` (the
        /// mask-tensor variants: padding, padding_causal, arbitrary).
        pub mask: u64,
        /// Element strides of the mask's b, h, i, j (0 broadcasts).
        pub mask_strides: [i64; 4],
        /// f32 additive post-scale bias `[b, h, i, j]` at `bias_strides` (bias variants).
        pub bias: u64,
        /// Element strides of the bias's b, h, i, j (0 broadcasts).
        pub bias_strides: [i64; 4],
        /// f32 `[batch, num_heads, seqlen_q, seqlen_k]` dense bias gradient (zero-filled by
        /// the host), or null.
        pub dbias: u64,
        /// f32 dQ accumulator, q's rows x heads x head_dim (the `_sm90` kernel permutes the
        /// columns within each group of 16; its `_dq_convert` undoes it), zeroed by the
        /// preprocess kernel (the fused `backward_dqdkdv` kernel adds `dS K` into it with
        /// atomics), or null.
        pub dq_accum: u64,
    }
}

/// The TMA tensor maps of a warp-specialized `prefill_*_sm90` launch (the CUDA declaration is
/// `TmaMaps` in `templates/prefill_sm90.cu`, `alignas(64)`, 448 bytes): `CUtensorMap`s
/// (128 bytes each) made by `cuTensorMapEncodeTiled` for q, k and v, and `enabled` (0: no
/// maps, the kernel's producer copies by cp.async). See [`FwdTmaParams`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TmaMaps {
    /// q's map: `[head_dim, num_heads, slots, rows]` (`cuda::tma`: padded, packed or a static
    /// cache's view), boxes of 64 x 1 x 1 x `block_m`.
    pub q: [u64; 16],
    /// k's map: `[head_dim, num_groups, slots, rows]`, boxes of 64 x 1 x 1 x `block_n`.
    pub k: [u64; 16],
    /// v's map, as k's.
    pub v: [u64; 16],
    /// Nonzero: the maps are valid and the kernel loads by TMA.
    pub enabled: i32,
    /// The CUDA struct's tail padding (to a multiple of its 64-byte alignment).
    pub tail: [i32; 15],
}

kernel_params! {
    /// Parameter buffer of the warp-specialized `prefill_*_sm90` tile without a paged pool
    /// (`PrefillTile::producer_sm90`): [`FwdParams`]' fields (positional, as every
    /// `prefill_sm80` / `prefill_sm90` kernel), then one `__grid_constant__ TmaMaps`, which
    /// NVRTC (sm_90a) places at byte 240: 64-byte aligned in the constant bank, where sm_90's
    /// parameters start at 0x210 (a tensor map's address must be 64-byte aligned).
    pub struct FwdTmaParams {
        /// The attention family's fields (232 bytes).
        pub fwd: FwdParams,
        /// Up to byte 240.
        pub pad: u64,
        /// The tensor maps.
        pub maps: TmaMaps,
    }
}

/// (byte offset, byte size) of each parameter of a kernel launched with [`FwdTmaParams`]:
/// [`FwdParams`]' fields, then the maps.
pub fn fwd_tma_param_layout() -> Vec<(usize, usize)> {
    let mut v: Vec<(usize, usize)> = cuda_fields::<FwdParams>()
        .into_iter()
        .map(|(_, off, size)| (off, size))
        .collect();
    v.push((
        std::mem::offset_of!(FwdTmaParams, maps),
        std::mem::size_of::<TmaMaps>(),
    ));
    v
}

/// The fields of `P` as the CUDA declaration names them: (name, byte offset, byte size), a
/// stride array `x_strides: [i64; 4]` as its four scalars `x_stride_b/h/q/k`.
pub fn cuda_fields<P: KernelParams>() -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    for &(name, off, size) in P::FIELDS {
        match name.strip_suffix("_strides") {
            Some(base) => {
                for (i, d) in ["b", "h", "q", "k"].iter().enumerate() {
                    out.push((format!("{base}_stride_{d}"), off + 8 * i, 8));
                }
            }
            None => out.push((name.to_string(), off, size)),
        }
    }
    out
}

kernel_params! {
    /// Parameters of the `qkv_prep` kernel (the CUDA declaration is `PrepParams` in
    /// `templates/partials/params.cu`; layouts in `templates/qkv_prep.cu`). Pointers are raw
    /// device addresses (0 = null).
    pub struct PrepParams {
        /// `linear_qkv` output (self-attention) or `linear_q` output (cross).
        pub qkv: u64,
        /// `linear_kv` output (cross-attention), or null.
        pub kv: u64,
        /// q `[num_tokens, num_heads, hn]` out.
        pub q_out: u64,
        /// k `[num_kv_tokens, num_groups, hn]` out.
        pub k_out: u64,
        /// v, as k.
        pub v_out: u64,
        /// Raw gate `[num_tokens, num_heads, hn]` out (output gate), or null.
        pub gate_out: u64,
        /// q norm weight `[hn]`, or null.
        pub q_norm_weight: u64,
        /// q norm bias `[hn]` (layer norm), or null.
        pub q_norm_bias: u64,
        /// k norm weight, or null.
        pub k_norm_weight: u64,
        /// k norm bias, or null.
        pub k_norm_bias: u64,
        /// Norm epsilon.
        pub eps: f32,
        /// int32 `[num_tokens]` rope positions (rope variants), or null.
        pub positions: u64,
        /// Rope base.
        pub rotary_base: f32,
        /// Multiplies cos and sin.
        pub mscale: f32,
        /// Query tokens (grid rows of self-attention).
        pub num_tokens: i32,
        /// Key/value tokens (cross-attention; equal to `num_tokens` for self).
        pub num_kv_tokens: i32,
        /// Query heads.
        pub num_heads: i32,
        /// K/V groups.
        pub num_groups: i32,
        /// int32 flag raised when a written v is not finite, or null.
        pub v_nonfinite: u64,
    }
}

kernel_params! {
    /// Parameters of the `append_kv` kernel (the CUDA declaration is `AppendParams` in
    /// `templates/partials/params.cu`; layouts in `templates/append_kv.cu`).
    pub struct AppendParams {
        /// New (rotated) keys `[total_tokens, num_groups, hn]`.
        pub k: u64,
        /// New values, as `k`.
        pub v: u64,
        /// Destination: a paged pool layer or a static cache layer.
        pub k_dst: u64,
        /// See `k_dst`.
        pub v_dst: u64,
        /// int32 `[batch + 1]` (packed rows), or null (padded `[s, batch]` rows).
        pub cu_seqlens_q: u64,
        /// int32 `[batch]`: keys per request after the append.
        pub seqlens_k: u64,
        /// int32 `[batch, max_blocks_per_seq]` (paged), or null (static cache).
        pub block_table: u64,
        /// Requests.
        pub batch: i32,
        /// K/V groups.
        pub num_groups: i32,
        /// Pool rows per block (paged).
        pub block_size: i32,
        /// Block table row stride (paged).
        pub max_blocks_per_seq: i32,
        /// Static cache: first batch slot.
        pub cache_batch_offset: i32,
        /// Static cache: batch slots.
        pub cache_max_batch: i32,
    }
}

kernel_params! {
    /// Parameters of the paged mode of `decode_splitkv` (split and combine entries, `_paged` keys):
    /// the decode requests (1 to 16 new tokens each) of a paged mixed batch. The CUDA declaration is `PagedDecodeParams` in
    /// `templates/partials/params.cu`; layouts in `templates/decode_splitkv.cu`.
    pub struct PagedDecodeParams {
        /// Packed q `[total_q, num_heads, hn]` of the whole batch, already rotated.
        pub q: u64,
        /// K pool layer `[num_blocks, block_size, num_groups, hn]`.
        pub k_pool: u64,
        /// V pool layer, as `k_pool`.
        pub v_pool: u64,
        /// f32 `[num_splits, merge_rows, num_heads, hn]` partial outputs.
        pub o_part: u64,
        /// f32 `[num_splits, merge_rows, num_heads]` partial LSEs (log2 units).
        pub lse_part: u64,
        /// Packed output, layout of `q` (the decode rows are written).
        pub out: u64,
        /// f32 `[num_heads, total_q]` (natural log).
        pub lse: u64,
        /// f32 `[num_heads]` learnable sink logits, or null.
        pub sinks: u64,
        /// Output gate, layout of `q`, or null.
        pub gate: u64,
        /// int32 `[batch]`: the decode requests' indices in the paged batch.
        pub requests: u64,
        /// int32 `[num_requests + 1]` of the whole batch.
        pub cu_seqlens_q: u64,
        /// int32 `[num_requests]`: keys per request, the new ones included.
        pub seqlens_k: u64,
        /// int32 `[num_requests, max_blocks_per_seq]`.
        pub block_table: u64,
        /// int32 `[batch + 1]`: decode request `b`'s query rows are merge rows
        /// `row_starts[b] .. row_starts[b + 1]` (its `q_len`, 1 to 16).
        pub row_starts: u64,
        /// int32 `[merge_rows]`: each merge row's packed token.
        pub row_tokens: u64,
        /// Decode requests (the split kernel's grid z).
        pub batch: i32,
        /// Their query rows, the sum of their `q_len` (the merge's grid x).
        pub merge_rows: i32,
        /// Query heads.
        pub num_heads: i32,
        /// K/V groups.
        pub num_groups: i32,
        /// KV splits.
        pub num_splits: i32,
        /// Rows of `q` (the `lse` stride).
        pub total_q: i32,
        /// Pool rows per block (a power of two >= 16).
        pub block_size: i32,
        /// Block table row stride.
        pub max_blocks_per_seq: i32,
        /// Logit scale.
        pub softmax_scale: f32,
        /// Sliding window, left (-1 = unbounded).
        pub window_left: i32,
        /// Sliding window, right (-1 = unbounded).
        pub window_right: i32,
    }
}

/// The parameter list the kernels of `phase` (`paged`: the paged-pool variant, see
/// [`KernelConfig::paged_kv`](attention_codegen::render::KernelConfig::paged_kv)) are
/// launched with, as (byte offset, byte size) per parameter: one parameter of the struct's
/// size for a kernel that takes its family's struct by value, the struct's fields for
/// `prefill_sm80` (positional). `None` for the static-cache `decode_splitkv`, whose split and
/// combine entries take positional lists pushed from
/// [`DecodeSplitKvArgs`](crate::cuda::decode::DecodeSplitKvArgs).
pub fn param_layout(
    phase: attention_codegen::render::Phase,
    paged: bool,
) -> Option<Vec<(usize, usize)>> {
    use attention_codegen::render::Phase;
    let by_value = |size: usize| Some(vec![(0, size)]);
    match phase {
        Phase::PrefillRows | Phase::DecodeRows | Phase::DecodeRowsPaged => {
            by_value(std::mem::size_of::<FwdParams>())
        }
        Phase::PrefillSm80 | Phase::PrefillSm90 => Some(
            cuda_fields::<FwdParams>()
                .into_iter()
                .map(|(_, off, size)| (off, size))
                .collect(),
        ),
        Phase::QkvPrep => by_value(std::mem::size_of::<PrepParams>()),
        Phase::AppendKv => by_value(std::mem::size_of::<AppendParams>()),
        Phase::DecodeSplitKv if paged => by_value(std::mem::size_of::<PagedDecodeParams>()),
        Phase::DecodeSplitKv => None,
        Phase::BackwardPreprocess
        | Phase::BackwardDkdv
        | Phase::BackwardDq
        | Phase::BackwardDqDkDv
        | Phase::BackwardDqDkDvSm90 => by_value(std::mem::size_of::<BwdParams>()),
    }
}

/// The launch configuration of an attention-family kernel (`config`'s phase
/// `prefill_rows`, `prefill_sm80`, `decode_rows` or `decode_rows_paged`) over `rows` query rows
/// (the longest sequence's), `heads` heads and `batch` sequences: `prefill_sm80` takes `block_m`
/// rows per block with its tile's warps and dynamic shared memory; the one-warp-per-row kernels
/// `config.warps` rows.
pub fn fwd_launch_config(
    config: &attention_codegen::render::KernelConfig,
    rows: usize,
    heads: usize,
    batch: usize,
) -> LaunchConfig {
    use attention_codegen::render::Phase;
    let (per_block, warps, smem) =
        if matches!(config.phase, Phase::PrefillSm80 | Phase::PrefillSm90) {
            let t = config.prefill_tile();
            (t.block_m, t.warps, config.prefill_smem_bytes())
        } else {
            (config.warps, config.warps, 0)
        };
    LaunchConfig {
        grid_dim: (
            rows.div_ceil(per_block).max(1) as u32,
            heads as u32,
            batch.max(1) as u32,
        ),
        block_dim: ((warps * 32) as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

/// Queue `func` on `stream` with `params` as its whole parameter buffer
/// (`CU_LAUNCH_PARAM_BUFFER_POINTER`): the launch of every kernel of a [`KernelParams`]
/// family, whether it takes the struct by value or its fields positionally.
///
/// # Safety
/// `P` must be the parameter layout of `func` (the layout tests check the crate's kernels),
/// and every pointer in `params` must be live device memory holding what the kernel indexes
/// under `cfg` (the callers' checks and SAFETY comments say how).
pub unsafe fn launch<P: KernelParams>(
    stream: &Arc<CudaStream>,
    func: &CudaFunction,
    cfg: LaunchConfig,
    params: &P,
) -> Result<(), DriverError> {
    stream.context().bind_to_thread()?;
    let mut size = std::mem::size_of::<P>();
    let mut extra: [*mut c_void; 5] = [
        sys::CU_LAUNCH_PARAM_BUFFER_POINTER_AS_INT as usize as *mut c_void,
        params as *const P as *mut c_void,
        sys::CU_LAUNCH_PARAM_BUFFER_SIZE_AS_INT as usize as *mut c_void,
        &mut size as *mut usize as *mut c_void,
        std::ptr::null_mut(), // CU_LAUNCH_PARAM_END
    ];
    // SAFETY: the function and stream are live; `extra` is a CU_LAUNCH_PARAM_END-terminated
    // list whose buffer (`params`, `size` bytes) outlives the call (the driver copies it);
    // the caller guarantees the layout and the pointers.
    unsafe {
        sys::cuLaunchKernel(
            func.cu_function(),
            cfg.grid_dim.0,
            cfg.grid_dim.1,
            cfg.grid_dim.2,
            cfg.block_dim.0,
            cfg.block_dim.1,
            cfg.block_dim.2,
            cfg.shared_mem_bytes,
            stream.cu_stream(),
            std::ptr::null_mut(),
            extra.as_mut_ptr(),
        )
        .result()
    }
}

/// How a launch orders after the kernel queued before it on the same stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchOrder {
    /// After the previous kernel has finished (a plain launch).
    Serial,
    /// A programmatic dependent launch (`CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`,
    /// compute capability 9.0 and later; CUDA Programming Guide, "Programmatic Dependent
    /// Launch"): the kernel may be scheduled once every block of the previous one has executed
    /// `griddepcontrol.launch_dependents` or exited, so its launch overlaps that kernel's tail.
    /// The kernel must execute `griddepcontrol.wait` (which returns once the previous kernel
    /// has completed and its writes are visible) before it reads anything that kernel writes.
    Programmatic,
}

/// [`LaunchOrder::Programmatic`] when `func` was compiled for compute capability 9.0 or later
/// (`CU_FUNC_ATTRIBUTE_BINARY_VERSION`), else [`LaunchOrder::Serial`].
///
/// # Errors
/// The driver's, when it cannot read the attribute.
pub fn dependent_order(func: &CudaFunction) -> Result<LaunchOrder, DriverError> {
    let v = func.get_attribute(sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_BINARY_VERSION)?;
    Ok(if v >= 90 {
        LaunchOrder::Programmatic
    } else {
        LaunchOrder::Serial
    })
}

/// Queue `func` on `stream` with `cuLaunchKernelEx`, ordered by `order`, its parameters either
/// positional (`args`: one pointer per parameter, each to its value) or, with `args` empty, the
/// buffer `buffer` (`CU_LAUNCH_PARAM_BUFFER_POINTER`, as [`launch`]).
///
/// # Safety
/// The parameters must be `func`'s parameter list and every pointer in them live device memory
/// holding what the kernel indexes under `cfg`; with [`LaunchOrder::Programmatic`] the kernel
/// must wait (`griddepcontrol.wait`) before reading what the previous kernel writes.
pub unsafe fn launch_ordered(
    stream: &Arc<CudaStream>,
    func: &CudaFunction,
    cfg: LaunchConfig,
    order: LaunchOrder,
    args: &mut [*mut c_void],
    buffer: Option<(*const c_void, usize)>,
) -> Result<(), DriverError> {
    stream.context().bind_to_thread()?;
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: u32::from(order == LaunchOrder::Programmatic),
    };
    let mut size = buffer.map_or(0, |b| b.1);
    let mut extra: [*mut c_void; 5] = [
        sys::CU_LAUNCH_PARAM_BUFFER_POINTER_AS_INT as usize as *mut c_void,
        buffer.map_or(std::ptr::null_mut(), |b| b.0 as *mut c_void),
        sys::CU_LAUNCH_PARAM_BUFFER_SIZE_AS_INT as usize as *mut c_void,
        &mut size as *mut usize as *mut c_void,
        std::ptr::null_mut(), // CU_LAUNCH_PARAM_END
    ];
    let (kernel_params, extra) = if buffer.is_some() {
        (std::ptr::null_mut(), extra.as_mut_ptr())
    } else {
        (args.as_mut_ptr(), std::ptr::null_mut())
    };
    // SAFETY: the function, stream and `attr` are live for the call; the parameters (array or
    // buffer) outlive it (the driver copies them); the caller guarantees their layout, the
    // pointers and the wait.
    unsafe { sys::cuLaunchKernelEx(&config, func.cu_function(), kernel_params, extra).result() }
}

/// [`launch_ordered`] with `params` as the whole parameter buffer (as [`launch`]).
///
/// # Safety
/// As [`launch`] and [`launch_ordered`].
pub unsafe fn launch_params_ordered<P: KernelParams>(
    stream: &Arc<CudaStream>,
    func: &CudaFunction,
    cfg: LaunchConfig,
    order: LaunchOrder,
    params: &P,
) -> Result<(), DriverError> {
    let buffer = (
        params as *const P as *const c_void,
        std::mem::size_of::<P>(),
    );
    // SAFETY: the caller's guarantees.
    unsafe { launch_ordered(stream, func, cfg, order, &mut [], Some(buffer)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fwd_params_is_the_positional_layout() {
        // Natural alignment and no padding: the fields back to back, as a positional
        // parameter list lays them out (35 scalars, 232 bytes).
        let fields = cuda_fields::<FwdParams>();
        let mut at = 0;
        for (name, off, size) in &fields {
            assert_eq!(*off, at, "{name}");
            assert_eq!(off % size, 0, "{name}");
            at = off + size;
        }
        assert_eq!(fields.len(), 35);
        assert_eq!(at, std::mem::size_of::<FwdParams>());
        assert_eq!(at, 232);
        assert_eq!(fields[24].0, "bias_stride_k");
    }
}
