//! TMA tensor maps (the driver's `cuTensorMapEncodeTiled`) for the warp-specialized Hopper
//! prefill tile (`templates/prefill_sm90.cu`, "Loading"), whose producer copies Q and each
//! K/V tile as one box per 64-column panel with `cp.async.bulk.tensor`.
//!
//! Every non-paged layout of the prefill family is a 4-d tensor `[head_dim, heads, slots,
//! rows]` (innermost first; element strides 1, `head_dim`, `heads · head_dim` and
//! `slots · heads · head_dim`), the token of row i in slot s being `i · slots + s`: padded
//! `[seqlen, batch, heads, head_dim]` has `slots = batch`, packed `[total, heads, head_dim]` has `slots = 1`,
//! and a static cache layer `[max_seq, max_batch, groups, head_dim]` has `slots = max_batch`.
//! A box `[64, 1, 1, rows]` with the 128-byte swizzle is one 128-byte-swizzled panel of `rows`
//! rows, the layout the kernels' `load_tile` writes and `wgmma` reads; rows past the tensor
//! read zeros. Source of the encoding rules (16-byte aligned address and strides, box dims <=
//! 256, inner box <= 128 bytes under the 128-byte swizzle, dims < 2^32): CUDA Driver API,
//! `cuTensorMapEncodeTiled`.

use std::ffi::c_void;

use attention_codegen::DType;
use cudarc::driver::sys;

use crate::cuda::params::{FwdParams, TmaMaps};
use crate::error::{AttnError, Result};

/// One tensor's map: `ptr` the device address of `[seqlen, slots, heads, head_dim]` elements
/// of `dtype` (2 bytes), boxes of 64 columns x `rows` rows. `None` when it cannot be mapped
/// as given (an address not 16-byte aligned, 2^31 rows or more: the kernel's coordinates are
/// 32-bit): the caller then leaves TMA off.
///
/// # Errors
/// [`AttnError::Cuda`] when the driver refuses arguments that passed these checks.
fn tensor_map(
    dtype: DType,
    ptr: u64,
    head_dim: usize,
    heads: usize,
    slots: usize,
    seqlen: usize,
    rows: usize,
) -> Result<Option<[u64; 16]>> {
    if !ptr.is_multiple_of(16)
        || seqlen == 0
        || slots == 0
        || seqlen >= 1 << 31
        || slots >= 1 << 31
        || !head_dim.is_multiple_of(64)
        || rows > 256
    {
        return Ok(None);
    }
    let elem = 2u64;
    let data_type = match dtype {
        DType::Bf16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    };
    let dims: [u64; 4] = [head_dim as u64, heads as u64, slots as u64, seqlen as u64];
    // Byte strides of dims 1..3 (dim 0 is contiguous).
    let strides: [u64; 3] = [
        head_dim as u64 * elem,
        (heads * head_dim) as u64 * elem,
        (slots * heads * head_dim) as u64 * elem,
    ];
    let boxes: [u32; 4] = [64, 1, 1, rows as u32];
    let elem_strides: [u32; 4] = [1; 4];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every pointer argument points at a live local array of the rank's length (4,
    // and 3 strides); `map` is writable storage of the struct's size and alignment; the
    // driver only encodes the address, it does not dereference it.
    let rc = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            data_type,
            4,
            ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if rc != sys::CUresult::CUDA_SUCCESS {
        return Err(AttnError::Cuda {
            call: format!(
                "cuTensorMapEncodeTiled (dims {dims:?}, byte strides {strides:?}, box {boxes:?})"
            ),
            msg: format!("{rc:?}"),
        });
    }
    // SAFETY: the driver wrote the whole map on success (and it was zeroed before).
    Ok(Some(unsafe { map.assume_init() }.opaque))
}

/// The `(slots, rows)` views of q and of k / v for the launch described by `p` (module docs:
/// the token of row i in slot s is `i * slots + s`), `rows * slots` never above the given
/// token rows; `None` for an empty batch. Packed (a paged pool too): one slot of all the
/// tokens (the pool's rows); padded: `batch` slots; a static cache's k / v:
/// `cache_max_batch` slots.
pub(crate) fn prefill_views(
    p: &FwdParams,
    (q_tokens, kv_tokens): (usize, usize),
) -> Option<((usize, usize), (usize, usize))> {
    let batch = p.batch.max(0) as usize;
    if batch == 0 {
        return None;
    }
    // (A paged pool's launch is packed: cu_seqlens_q is set; its k / v view is the pool's
    // blocks' rows.)
    Some(if p.cu_seqlens_q != 0 {
        ((1, q_tokens), (1, kv_tokens))
    } else {
        let q = (batch, q_tokens / batch);
        if p.cache_seqlens_k != 0 {
            let slots = p.cache_max_batch.max(0) as usize;
            (q, (slots, kv_tokens.checked_div(slots).unwrap_or(0)))
        } else {
            (q, (batch, kv_tokens / batch))
        }
    })
}

/// The maps of one prefill launch described by `p` (its mode from which pointers are set:
/// packed when `cu_seqlens_q` is, over a paged pool when `block_table` is too, a static cache
/// when `cache_seqlens_k` is without `cu_seqlens_q`, else padded): q in boxes of `block_m`
/// rows, k and v in boxes of `block_n` rows (a paged pool: `min(block_size, block_n)` rows,
/// one pool block). `tokens` are the token rows of the q tensor and of the k / v tensors
/// (`[tokens, heads, head_dim]`; a static cache: `max_seq * max_batch`; a paged pool:
/// `num_blocks * block_size`). `enabled` is 0 when some tensor cannot be mapped (see
/// `tensor_map`) or a pool's block size is not a power of two of at least 16: the kernel
/// then copies by cp.async, except a paged pool's, which has no such path (`launch_prefill`
/// refuses that launch with a typed error).
///
/// # Errors
/// [`AttnError::Cuda`] when the driver refuses a map.
pub fn prefill_maps(
    dtype: DType,
    p: &FwdParams,
    head_dim: usize,
    (block_m, block_n): (usize, usize),
    (q_tokens, kv_tokens): (usize, usize),
) -> Result<TmaMaps> {
    let Some((q_view, kv_view)) = prefill_views(p, (q_tokens, kv_tokens)) else {
        return Ok(TmaMaps::default());
    };
    // K/V boxes: a tile, or one pool block of it (a paged pool; the kernel issues one box per
    // block, `block_size` a power of two >= 16).
    let kv_box = if p.block_table != 0 {
        let bs = p.block_size.max(0) as usize;
        if bs < 16 || !bs.is_power_of_two() {
            return Ok(TmaMaps::default());
        }
        bs.min(block_n)
    } else {
        block_n
    };
    let (heads, groups) = (p.num_heads.max(0) as usize, p.num_groups.max(0) as usize);
    let qm = tensor_map(dtype, p.q, head_dim, heads, q_view.0, q_view.1, block_m)?;
    let km = tensor_map(dtype, p.k, head_dim, groups, kv_view.0, kv_view.1, kv_box)?;
    let vm = tensor_map(dtype, p.v, head_dim, groups, kv_view.0, kv_view.1, kv_box)?;
    Ok(match (qm, km, vm) {
        (Some(q), Some(k), Some(v)) => TmaMaps {
            q,
            k,
            v,
            enabled: 1,
            ..TmaMaps::default()
        },
        _ => TmaMaps::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::prefill_views;
    use crate::cuda::params::FwdParams;

    /// The token the kernel's TMA coordinates of (slot, row) name: `row * slots + slot`.
    fn token(view: (usize, usize), slot: usize, row: usize) -> usize {
        assert!(
            slot < view.0 && row < view.1,
            "({slot}, {row}) outside {view:?}"
        );
        row * view.0 + slot
    }

    #[test]
    fn padded_views_name_the_kernels_tokens() {
        // q [s = 5, b = 3], k / v [sk = 7, b = 3]: query i of sequence b is token i * 3 + b
        // (templates/partials/prefill_block.cu: q_tok0 = b, q_step = batch).
        let p = FwdParams {
            batch: 3,
            ..FwdParams::default()
        };
        let (q, kv) = prefill_views(&p, (15, 21)).unwrap();
        assert_eq!((q, kv), ((3, 5), (3, 7)));
        for b in 0..3 {
            for i in 0..5 {
                // The kernel: slot = q_tok0 % q_step, row = q_tok0 / q_step + i.
                assert_eq!(token(q, b % 3, b / 3 + i), i * 3 + b);
            }
        }
    }

    #[test]
    fn packed_views_are_one_slot_of_every_token() {
        let p = FwdParams {
            batch: 2,
            cu_seqlens_q: 0x1000,
            cu_seqlens_k: 0x2000,
            ..FwdParams::default()
        };
        let (q, kv) = prefill_views(&p, (37, 41)).unwrap();
        assert_eq!((q, kv), ((1, 37), (1, 41)));
        // Sequence b starting at token 30: slot 0, rows 30 ..
        assert_eq!(token(q, 0, 30 + 6), 36);
    }

    #[test]
    fn static_cache_views_span_the_cache_slots() {
        // q [s = 4, b = 2]; the cache layer [max_seq = 16, max_batch = 5]; sequence b in slot
        // cache_batch_offset + b (k_tok0), k_step = max_batch.
        let p = FwdParams {
            batch: 2,
            cache_seqlens_k: 0x1000,
            cache_batch_offset: 3,
            cache_max_batch: 5,
            ..FwdParams::default()
        };
        let (q, kv) = prefill_views(&p, (8, 80)).unwrap();
        assert_eq!((q, kv), ((2, 4), (5, 16)));
        for b in 0..2usize {
            let slot = 3 + b;
            for j in [0, 15] {
                assert_eq!(token(kv, slot % 5, slot / 5 + j), j * 5 + slot);
            }
        }
    }

    #[test]
    fn paged_pools_are_one_slot_and_empty_batches_have_no_views() {
        let paged = FwdParams {
            batch: 2,
            cu_seqlens_q: 0x1000,
            cache_seqlens_k: 0x3000,
            block_table: 0x2000,
            block_size: 16,
            ..FwdParams::default()
        };
        assert_eq!(prefill_views(&paged, (10, 64)), Some(((1, 10), (1, 64))));
        assert_eq!(prefill_views(&FwdParams::default(), (10, 10)), None);
        // A cache without slots maps no rows (tensor_map then leaves TMA off).
        let no_slots = FwdParams {
            batch: 1,
            cache_seqlens_k: 0x1000,
            ..FwdParams::default()
        };
        assert_eq!(prefill_views(&no_slots, (4, 16)), Some(((1, 4), (0, 0))));
    }
}
