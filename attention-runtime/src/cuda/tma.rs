//! TMA tensor maps (the driver's `cuTensorMapEncodeTiled`) for the warp-specialized Hopper
//! prefill tile (`templates/prefill_sm90.cu`, "Loading"), whose producer copies Q and each
//! K/V tile as one box per 64-column panel with `cp.async.bulk.tensor`.
//!
//! A padded `[seqlen, batch, heads, head_dim]` tensor is viewed as the 4-d tensor
//! `[head_dim, heads, batch, seqlen]` (innermost first; element strides 1, `head_dim`,
//! `heads * head_dim`, `batch * heads * head_dim`), box `[64, 1, 1, rows]` with the 128-byte
//! swizzle: one box is one 128-byte-swizzled panel of `rows` rows, the layout the kernels'
//! `load_tile` writes and `wgmma` reads. Rows past `seqlen` read zeros. Source of the encoding
//! rules (16-byte aligned address and strides, box dims <= 256, inner box <= 128 bytes under
//! the 128-byte swizzle): CUDA Driver API, `cuTensorMapEncodeTiled`.

use std::ffi::c_void;

use attention_codegen::DType;
use cudarc::driver::sys;

use crate::cuda::params::TmaMaps;
use crate::error::{AttnError, Result};

/// One padded tensor's map: `ptr` the device address of `[seqlen, batch, heads, head_dim]`
/// elements of `dtype` (2 bytes), boxes of 64 columns x `rows` rows. `None` when the driver
/// cannot map it as given (an address not 16-byte aligned): the caller then leaves TMA off.
///
/// # Errors
/// [`AttnError::Cuda`] when the driver refuses arguments that passed these checks.
fn padded_map(
    dtype: DType,
    ptr: u64,
    head_dim: usize,
    heads: usize,
    batch: usize,
    seqlen: usize,
    rows: usize,
) -> Result<Option<[u64; 16]>> {
    if !ptr.is_multiple_of(16) || seqlen == 0 || !head_dim.is_multiple_of(64) || rows > 256 {
        return Ok(None);
    }
    let elem = 2u64;
    let data_type = match dtype {
        DType::Bf16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    };
    let dims: [u64; 4] = [head_dim as u64, heads as u64, batch as u64, seqlen as u64];
    // Byte strides of dims 1..3 (dim 0 is contiguous).
    let strides: [u64; 3] = [
        head_dim as u64 * elem,
        (heads * head_dim) as u64 * elem,
        (batch * heads * head_dim) as u64 * elem,
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

/// The maps of one padded prefill launch: q `[seqlen_q, batch, num_heads, head_dim]` in
/// boxes of `block_m` rows, k and v `[seqlen_k, batch, num_groups, head_dim]` in boxes of
/// `block_n` rows. `enabled` is 0 (the kernel copies by cp.async) when some tensor cannot be
/// mapped (see `padded_map`).
///
/// # Errors
/// [`AttnError::Cuda`] when the driver refuses a map.
#[allow(clippy::too_many_arguments)]
pub fn padded_prefill_maps(
    dtype: DType,
    (q, k, v): (u64, u64, u64),
    head_dim: usize,
    num_heads: usize,
    num_groups: usize,
    batch: usize,
    (seqlen_q, seqlen_k): (usize, usize),
    (block_m, block_n): (usize, usize),
) -> Result<TmaMaps> {
    let qm = padded_map(dtype, q, head_dim, num_heads, batch, seqlen_q, block_m)?;
    let km = padded_map(dtype, k, head_dim, num_groups, batch, seqlen_k, block_n)?;
    let vm = padded_map(dtype, v, head_dim, num_groups, batch, seqlen_k, block_n)?;
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
