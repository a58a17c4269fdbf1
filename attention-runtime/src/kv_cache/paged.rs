//! The paged KV cache: a block pool per layer stack, addressed through a block table.

use std::collections::HashMap;

use super::allocator::BlockAllocator;
use super::block_table::BlockTable;
use super::{alloc_zeroed, check_layer, checked_product};
use crate::error::{AttnError, Result};
use crate::tensor::Tensor;

/// Default tokens per block: 256.
///
/// This is Megatron-Core's default for its dynamic (paged) inference context. Large blocks
/// amortize the block-table lookup (one int32 read per 256 keys instead of per 16) and keep
/// each block's K and V long contiguous runs (`256 * ng * hn` values) that stream at full
/// memory bandwidth; the cost, up to `block_size - 1` wasted slots per request, is small next
/// to typical contexts of thousands of tokens. Serving many short requests may prefer 16 or 64.
pub const DEFAULT_BLOCK_SIZE: usize = 256;

/// Smallest accepted block size (any power of two from here up is valid).
pub const MIN_BLOCK_SIZE: usize = 16;

/// Element offset of `(block, slot, group 0, channel 0)` in one layer's K (or V) pool
/// `[num_blocks, block_size, ng, hn]`: `(block * block_size + slot) * ng * hn`, computed in
/// 64-bit `usize` (a block id of 65536 times a block's elements exceeds 32 bits).
///
/// Returns `None` on `usize` overflow.
pub fn paged_offset(
    block: u32,
    slot: usize,
    block_size: usize,
    groups: usize,
    head_dim: usize,
) -> Option<usize> {
    (block as usize)
        .checked_mul(block_size)?
        .checked_add(slot)?
        .checked_mul(groups)?
        .checked_mul(head_dim)
}

/// Check that block-table row `row` (`-1` for unused entries) of a pool of `block_size`-token
/// blocks from `allocator` covers `len` keys, and return how many blocks do
/// (`ceil(len / block_size)`).
///
/// Errors: `CacheCapacity` (`row`) when the row has fewer blocks; `BlockId` (named by
/// `name(c)`) for a covering entry outside the pool or free.
pub(crate) fn check_row_covers(
    allocator: &BlockAllocator,
    block_size: usize,
    row: &[i32],
    len: usize,
    name: impl Fn(usize) -> String,
) -> Result<usize> {
    let bs = block_size;
    let needed = len.div_ceil(bs);
    let have = row.iter().take_while(|&&id| id >= 0).count();
    if have < needed {
        return Err(AttnError::CacheCapacity {
            arg: format!("row ({have} blocks of {bs})"),
            capacity: have * bs,
            needed: len,
        });
    }
    for (c, &id) in row.iter().enumerate().take(needed) {
        allocator.check_allocated(&name(c), id as i64)?;
    }
    Ok(needed)
}

/// One request of a validated [`PagedBatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedRequest {
    /// First row of its new tokens in the packed `[T, ...]` tensors (`cu_seqlens_q[i]`).
    pub q_start: usize,
    /// Number of new tokens (`cu_seqlens_q[i + 1] - cu_seqlens_q[i]`; 1 for a decode step).
    pub q_len: usize,
    /// Cached keys after the append, new ones included (`seqlens_k[i]`).
    pub k_len: usize,
}

/// One mixed decode + prefill step over a [`PagedKvCache`].
///
/// Request `i` owns row `i` of `block_table`, has new tokens `cu_seqlens_q[i] ..
/// cu_seqlens_q[i + 1]` of the packed `[T, ...]` tensors, and `seqlens_k[i]` cached keys once
/// they are appended (so its new tokens sit at positions `seqlens_k[i] - new_i ..
/// seqlens_k[i]`). Serving engines put decode requests (one new token) first, then prefill
/// chunks; the CPU reference accepts any order.
#[derive(Debug, Clone, Copy)]
pub struct PagedBatch<'a> {
    /// int32 `[n + 1]`: starts at 0, non-decreasing, ends at `T`.
    pub cu_seqlens_q: &'a [i32],
    /// int32 `[n]`: keys per request after the append.
    pub seqlens_k: &'a [i32],
    /// At least `n` rows; row `i` covers `ceil(seqlens_k[i] / block_size)` blocks.
    pub block_table: &'a BlockTable,
}

impl PagedBatch<'_> {
    /// Number of requests (`cu_seqlens_q.len() - 1`, 0 for an empty list).
    pub fn num_requests(&self) -> usize {
        self.cu_seqlens_q.len().saturating_sub(1)
    }

    /// Check the batch against `cache` for `num_tokens` packed tokens and return its
    /// requests.
    ///
    /// Errors: `CuSeqlens` (`cu_seqlens_q`: empty, first not 0, decreasing, last not
    /// `num_tokens`); `InvalidArgument` (`seqlens_k` length, `seqlens_k[i]` negative or below
    /// the request's new tokens; `block_table` with fewer rows than requests);
    /// `CacheCapacity` (`block_table row i`) when a row has too few blocks; `BlockId`
    /// (`block_table[i][c]`) for an entry outside the pool or free.
    pub fn validate(&self, cache: &PagedKvCache, num_tokens: usize) -> Result<Vec<PagedRequest>> {
        self.validate_with(
            cache.block_size(),
            cache.allocator(),
            num_tokens,
            |_, _, _, _| Ok(()),
        )
    }

    /// [`validate`](Self::validate) against any pool of `block_size`-token blocks handed out
    /// by `allocator` (the CPU cache and its device mirror share it).
    ///
    /// `on_block(i, c, id, request)` runs right after entry `block_table[i][c]` (block `id`)
    /// of request `i` is checked, before the next entry, so extra per-block checks (the
    /// device cache's write checks) keep their place in the error order. Nothing changes.
    pub(crate) fn validate_with(
        &self,
        block_size: usize,
        allocator: &BlockAllocator,
        num_tokens: usize,
        mut on_block: impl FnMut(usize, usize, u32, &PagedRequest) -> Result<()>,
    ) -> Result<Vec<PagedRequest>> {
        let cu = self.cu_seqlens_q;
        let cu_err = |expected: &str| AttnError::CuSeqlens {
            arg: "cu_seqlens_q".into(),
            expected: expected.into(),
            got: cu.iter().map(|&x| x as i64).collect(),
        };
        if cu.is_empty() {
            return Err(cu_err("at least one entry (n + 1 for n requests)"));
        }
        if cu[0] != 0 {
            return Err(cu_err("first entry 0"));
        }
        if cu.windows(2).any(|w| w[1] < w[0]) {
            return Err(cu_err("non-decreasing entries"));
        }
        if cu[cu.len() - 1] as i64 != num_tokens as i64 {
            return Err(cu_err(&format!(
                "last entry {num_tokens} (the packed token count)"
            )));
        }
        let n = cu.len() - 1;
        if self.seqlens_k.len() != n {
            return Err(AttnError::InvalidArgument {
                arg: "seqlens_k".into(),
                expected: format!("{n} entries (one per request in cu_seqlens_q)"),
                got: format!("{} entries", self.seqlens_k.len()),
            });
        }
        let table = self.block_table;
        if table.batch() < n {
            return Err(AttnError::InvalidArgument {
                arg: "block_table".into(),
                expected: format!("at least {n} rows (one per request)"),
                got: format!("{} rows", table.batch()),
            });
        }
        let bs = block_size;
        let mut reqs = Vec::with_capacity(n);
        for i in 0..n {
            let q_start = cu[i] as usize;
            let q_len = (cu[i + 1] - cu[i]) as usize;
            let sk = self.seqlens_k[i];
            if sk < 0 || (sk as usize) < q_len {
                return Err(AttnError::InvalidArgument {
                    arg: format!("seqlens_k[{i}]"),
                    expected: format!("at least the request's {q_len} new tokens"),
                    got: sk.to_string(),
                });
            }
            let k_len = sk as usize;
            let needed = k_len.div_ceil(bs);
            let have = table.row_len(i)?;
            if have < needed {
                return Err(AttnError::CacheCapacity {
                    arg: format!("block_table row {i} ({have} blocks of {bs})"),
                    capacity: have * bs,
                    needed: k_len,
                });
            }
            let req = PagedRequest {
                q_start,
                q_len,
                k_len,
            };
            for c in 0..needed {
                let id = table.check_entry(allocator, i, c)?;
                on_block(i, c, id, &req)?;
            }
            reqs.push(req);
        }
        Ok(reqs)
    }
}

/// A paged KV cache for a stack of `num_layers` layers, allocated once.
///
/// # Layout
/// Per layer, K and V are each a pool `[num_blocks, block_size, ng, hn]` f32, row-major; the
/// stack is `[num_layers][num_blocks, block_size, ng, hn]`. Position `p` of a request whose
/// block-table row is `row` lives in block `row[p / block_size]` at slot `p % block_size`, at
/// element [`paged_offset`]`(block, slot, ..)` of the layer's pool. Offsets are `usize`.
///
/// The cache owns its [`BlockAllocator`] (all layers share block ids: one id addresses the same
/// block in every layer's pool). The block table is the caller's.
#[derive(Debug, Clone, PartialEq)]
pub struct PagedKvCache {
    num_layers: usize,
    num_blocks: usize,
    block_size: usize,
    groups: usize,
    head_dim: usize,
    layer_elems: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    allocator: BlockAllocator,
}

impl PagedKvCache {
    /// A zeroed pool of `num_blocks` blocks of `block_size` tokens for `num_layers` layers,
    /// with every block free.
    ///
    /// Errors (`InvalidArgument`): `block_size` not a power of two >= 16 (see
    /// [`DEFAULT_BLOCK_SIZE`]); a zero dimension; `num_blocks` above `i32::MAX`; a size that
    /// overflows `usize` or cannot be allocated.
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        groups: usize,
        head_dim: usize,
    ) -> Result<Self> {
        if block_size < MIN_BLOCK_SIZE || !block_size.is_power_of_two() {
            return Err(AttnError::InvalidArgument {
                arg: "block_size".into(),
                expected: format!(
                    "a power of two >= {MIN_BLOCK_SIZE} (default {DEFAULT_BLOCK_SIZE})"
                ),
                got: block_size.to_string(),
            });
        }
        let allocator = BlockAllocator::new(num_blocks)?;
        let dims = [
            ("num_layers", num_layers),
            ("num_blocks", num_blocks),
            ("block_size", block_size),
            ("groups", groups),
            ("head_dim", head_dim),
        ];
        let layer_elems = checked_product(&dims[1..])?;
        let total = checked_product(&dims)?;
        Ok(PagedKvCache {
            num_layers,
            num_blocks,
            block_size,
            groups,
            head_dim,
            layer_elems,
            k: alloc_zeroed(total)?,
            v: alloc_zeroed(total)?,
            allocator,
        })
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Key/value groups (`ng`).
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// Head dim (`hn`).
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The block allocator.
    pub fn allocator(&self) -> &BlockAllocator {
        &self.allocator
    }

    /// The block allocator, to allocate, share (`retain`) and release blocks.
    pub fn allocator_mut(&mut self) -> &mut BlockAllocator {
        &mut self.allocator
    }

    /// Layer `layer`'s K pool `[num_blocks, block_size, ng, hn]`.
    pub fn layer_k(&self, layer: usize) -> Result<&[f32]> {
        check_layer(layer, self.num_layers)?;
        Ok(&self.k[layer * self.layer_elems..(layer + 1) * self.layer_elems])
    }

    /// Layer `layer`'s V pool `[num_blocks, block_size, ng, hn]`.
    pub fn layer_v(&self, layer: usize) -> Result<&[f32]> {
        check_layer(layer, self.num_layers)?;
        Ok(&self.v[layer * self.layer_elems..(layer + 1) * self.layer_elems])
    }

    /// Element offset of `(layer, block, slot)` in the stacked pools. Sizes were checked at
    /// construction, so this cannot overflow for in-range arguments.
    fn offset(&self, layer: usize, block: u32, slot: usize) -> usize {
        layer * self.layer_elems
            + (block as usize * self.block_size + slot) * self.groups * self.head_dim
    }

    /// Copy block `src` to block `dst` in every layer (copy-on-write of a shared block, or
    /// moving blocks around the pool).
    ///
    /// Errors (`BlockId`, nothing copied) unless both are allocated.
    pub fn copy_block(&mut self, src: u32, dst: u32) -> Result<()> {
        self.allocator.check_allocated("src", src as i64)?;
        self.allocator.check_allocated("dst", dst as i64)?;
        let n = self.block_size * self.groups * self.head_dim;
        for layer in 0..self.num_layers {
            let (s, d) = (self.offset(layer, src, 0), self.offset(layer, dst, 0));
            self.k.copy_within(s..s + n, d);
            self.v.copy_within(s..s + n, d);
        }
        Ok(())
    }

    /// Write the new keys and values of every request of `batch` into `layer`'s pools.
    ///
    /// `k`, `v`: packed `[T, ng, hn]`. Request `i`'s rows `cu_seqlens_q[i] ..
    /// cu_seqlens_q[i + 1]` go to positions `seqlens_k[i] - new_i .. seqlens_k[i]` through
    /// block-table row `i`.
    ///
    /// Everything is validated before anything is written; on error nothing changes. Errors:
    /// `InvalidArgument` (`layer`); `Shape` (`k`, `v`); every error of
    /// [`PagedBatch::validate`]; `BlockId` (`block_table[i][c]`) when a block to be written is
    /// shared (reference count above 1: copy it with [`copy_block`](Self::copy_block) first)
    /// or is written by two requests.
    pub fn append_paged(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        batch: &PagedBatch,
    ) -> Result<()> {
        check_layer(layer, self.num_layers)?;
        let (ng, hn) = (Some(self.groups), Some(self.head_dim));
        k.expect_shape("k", &[None, ng, hn])?;
        let t = k.shape()[0];
        v.expect_shape("v", &[Some(t), ng, hn])?;
        let reqs = batch.validate(self, t)?;
        let bs = self.block_size;
        let table = batch.block_table;
        // Blocks written by this call: each must be held once and belong to one request.
        let mut writer: HashMap<u32, (usize, usize)> = HashMap::new();
        for (i, r) in reqs.iter().enumerate() {
            if r.q_len == 0 {
                continue;
            }
            let first = (r.k_len - r.q_len) / bs;
            let last = (r.k_len - 1) / bs;
            for c in first..=last {
                let id = table.check_entry(&self.allocator, i, c)?;
                let rc = self.allocator.refcount(id)?;
                if rc > 1 {
                    return Err(AttnError::BlockId {
                        arg: format!("block_table[{i}][{c}]"),
                        expected: format!(
                            "a block held once to write into (it has {rc} holders: copy_block it first)"
                        ),
                        got: id as i64,
                    });
                }
                if let Some(&(j, cj)) = writer.get(&id) {
                    if j != i {
                        return Err(AttnError::BlockId {
                            arg: format!("block_table[{i}][{c}]"),
                            expected: format!(
                                "a block written by one request only (block_table[{j}][{cj}] also writes it)"
                            ),
                            got: id as i64,
                        });
                    }
                }
                writer.insert(id, (i, c));
            }
        }
        let row = self.groups * self.head_dim;
        for (i, r) in reqs.iter().enumerate() {
            let ids = table.row(i)?;
            for j in 0..r.q_len {
                let pos = r.k_len - r.q_len + j;
                let dst = self.offset(layer, ids[pos / bs] as u32, pos % bs);
                let src = (r.q_start + j) * row;
                self.k[dst..dst + row].copy_from_slice(&k.data()[src..src + row]);
                self.v[dst..dst + row].copy_from_slice(&v.data()[src..src + row]);
            }
        }
        Ok(())
    }

    /// Keys and values `[len, ng, hn]` of positions `0..len` of the request whose block-table
    /// row is `row` (one row of a [`BlockTable`], `-1` for unused entries).
    ///
    /// Errors: `InvalidArgument` (`layer`); `CacheCapacity` (`row`) when the row has fewer
    /// than `ceil(len / block_size)` blocks; `BlockId` (`row[c]`) for an entry outside the
    /// pool or free.
    pub fn gather_kv(&self, layer: usize, row: &[i32], len: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        self.gather_named(layer, row, len, |c| format!("row[{c}]"))
    }

    /// [`gather_kv`](Self::gather_kv) with errors naming entries through `name(c)`.
    pub(crate) fn gather_named(
        &self,
        layer: usize,
        row: &[i32],
        len: usize,
        name: impl Fn(usize) -> String,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        check_layer(layer, self.num_layers)?;
        let bs = self.block_size;
        let needed = check_row_covers(&self.allocator, bs, row, len, name)?;
        let width = self.groups * self.head_dim;
        let mut k = Vec::with_capacity(len * width);
        let mut v = Vec::with_capacity(len * width);
        for (c, &id) in row.iter().enumerate().take(needed) {
            let n = (len - c * bs).min(bs) * width;
            let o = self.offset(layer, id as u32, 0);
            k.extend_from_slice(&self.k[o..o + n]);
            v.extend_from_slice(&self.v[o..o + n]);
        }
        Ok((k, v))
    }
}
