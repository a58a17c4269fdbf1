//! KV caches for inference (CPU storage; the CUDA backend mirrors these layouts).
//!
//! - [`StaticKvCache`]: contiguous per-layer K/V `[max_seq, max_batch, ng, hn]`, appended at
//!   per-sequence offsets, with a two-step (append per layer, then [`StaticKvCache::advance`])
//!   length commit for a stack of layers.
//! - [`PagedKvCache`]: a block pool per layer stack, `[num_layers][num_blocks, block_size, ng,
//!   hn]` for K and for V, with a reference-counted [`BlockAllocator`] and an int32
//!   [`BlockTable`]; [`PagedBatch`] describes one mixed decode + prefill step.
//! - [`CrossKvCache`]: a cross-attention layer's projected encoder context per request slot,
//!   `[max_ctx, max_batch, heads, hn]` per layer with a context length per slot, filled once
//!   per request and read by every decoder step (encoder-decoder decoding).
//!
//! Attention over these caches lives in [`crate::reference::paged`].
//! All offsets are 64-bit (`usize`); a failing call never changes what is stored.

pub mod allocator;
pub mod block_table;
pub mod cross;
pub mod paged;
pub mod static_cache;

pub use allocator::BlockAllocator;
pub use block_table::{BlockTable, UNUSED_BLOCK};
pub use cross::CrossKvCache;
pub use paged::{
    paged_offset, PagedBatch, PagedKvCache, PagedRequest, DEFAULT_BLOCK_SIZE, MIN_BLOCK_SIZE,
};
pub use static_cache::StaticKvCache;

use crate::error::{AttnError, Result};

/// Product of named dimensions; errors (`InvalidArgument`) on a zero or on overflow.
pub(crate) fn checked_product(dims: &[(&str, usize)]) -> Result<usize> {
    let mut n: usize = 1;
    for &(name, d) in dims {
        if d == 0 {
            return Err(AttnError::InvalidArgument {
                arg: name.into(),
                expected: "a positive size".into(),
                got: "0".into(),
            });
        }
        n = n.checked_mul(d).ok_or_else(|| AttnError::InvalidArgument {
            arg: name.into(),
            expected: "a cache size that fits in usize".into(),
            got: format!("{dims:?}"),
        })?;
    }
    Ok(n)
}

/// A zeroed buffer of `n` f32, or an error (instead of an abort) when it cannot be allocated.
pub(crate) fn alloc_zeroed(n: usize) -> Result<Vec<f32>> {
    let mut v: Vec<f32> = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|e| AttnError::InvalidArgument {
            arg: "cache size".into(),
            expected: "an allocation the host can make".into(),
            got: format!("{n} f32 ({e})"),
        })?;
    v.resize(n, 0.0);
    Ok(v)
}

/// Errors (`InvalidArgument`, `layer`) unless `layer < num_layers`.
pub(crate) fn check_layer(layer: usize, num_layers: usize) -> Result<()> {
    if layer >= num_layers {
        return Err(AttnError::InvalidArgument {
            arg: "layer".into(),
            expected: format!("a layer in 0..{num_layers}"),
            got: layer.to_string(),
        });
    }
    Ok(())
}
