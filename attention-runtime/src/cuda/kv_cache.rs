//! Device-side KV caches mirroring [`crate::kv_cache`]: the same layouts, the same length
//! bookkeeping and the same validate-before-write guarantees, with storage in GPU memory in
//! the layer's dtype.
//!
//! - [`DeviceStaticKvCache`]: per layer K and V `[max_seq, max_batch, ng, hn]`.
//! - [`DevicePagedKvCache`]: per layer pools `[num_blocks, block_size, ng, hn]` for K and V,
//!   a reference-counted [`BlockAllocator`]; offsets are 64-bit in the kernels.
//!
//! Writes happen in kernels (`decode_splitkv`, `append_kv`); every host-side check (capacity, block
//! ids, shared blocks, lengths) runs before the launch, so a failing call writes nothing.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::CudaStream;

use super::tensor::{alloc_err, cuda_err, DeviceElem, DeviceTensor, ElemType};
use crate::error::{AttnError, Result};
use crate::kv_cache::paged::check_row_covers;
use crate::kv_cache::static_cache::CacheLengths;
use crate::kv_cache::{BlockAllocator, PagedBatch, PagedRequest, MIN_BLOCK_SIZE};
use crate::tensor::Tensor;

pub(crate) fn zeros(
    stream: &Arc<CudaStream>,
    elem: ElemType,
    shape: &[usize],
) -> Result<DeviceTensor> {
    fn z<T: DeviceElem>(stream: &Arc<CudaStream>, shape: &[usize]) -> Result<DeviceTensor> {
        let n: usize = shape.iter().product();
        let s = stream
            .alloc_zeros::<T>(n)
            .map_err(alloc_err("kv cache", n * std::mem::size_of::<T>()))?;
        DeviceTensor::from_slice(s, shape)
    }
    match elem {
        ElemType::Bf16 => z::<half::bf16>(stream, shape),
        ElemType::F16 => z::<half::f16>(stream, shape),
        ElemType::F32 => z::<f32>(stream, shape),
    }
}

fn check_dims(dims: &[(&str, usize)]) -> Result<()> {
    crate::kv_cache::checked_product(dims).map(|_| ())
}

/// A contiguous KV cache on the device for a stack of `num_layers` layers.
///
/// Layout per layer: K and V each `[max_seq, max_batch, ng, hn]` row-major in the layer's
/// dtype (position `p` of batch slot `s` at row `p * max_batch + s`). Lengths follow
/// [`StaticKvCache`](crate::kv_cache::StaticKvCache): a layer's append is *pending* until
/// [`advance`](Self::advance) commits the step for every layer.
#[derive(Debug)]
pub struct DeviceStaticKvCache {
    max_seq: usize,
    max_batch: usize,
    groups: usize,
    head_dim: usize,
    k: Vec<DeviceTensor>,
    v: Vec<DeviceTensor>,
    lengths: CacheLengths,
}

impl DeviceStaticKvCache {
    /// A zeroed cache. Errors (`InvalidArgument`) on a zero dimension or overflow,
    /// `DeviceAlloc` when the device lacks memory.
    pub fn new(
        stream: &Arc<CudaStream>,
        elem: ElemType,
        num_layers: usize,
        max_seq: usize,
        max_batch: usize,
        groups: usize,
        head_dim: usize,
    ) -> Result<Self> {
        check_dims(&[
            ("num_layers", num_layers),
            ("max_seq", max_seq),
            ("max_batch", max_batch),
            ("groups", groups),
            ("head_dim", head_dim),
        ])?;
        let shape = [max_seq, max_batch, groups, head_dim];
        let mut k = Vec::with_capacity(num_layers);
        let mut v = Vec::with_capacity(num_layers);
        for _ in 0..num_layers {
            k.push(zeros(stream, elem, &shape)?);
            v.push(zeros(stream, elem, &shape)?);
        }
        Ok(DeviceStaticKvCache {
            max_seq,
            max_batch,
            groups,
            head_dim,
            k,
            v,
            lengths: CacheLengths::new(num_layers, max_batch),
        })
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.k.len()
    }
    /// Positions per sequence.
    pub fn max_seq(&self) -> usize {
        self.max_seq
    }
    /// Batch slots.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }
    /// Key/value groups.
    pub fn groups(&self) -> usize {
        self.groups
    }
    /// Head dim.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// Committed length per batch slot.
    pub fn seqlens(&self) -> &[usize] {
        self.lengths.seqlens()
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        crate::kv_cache::check_layer(layer, self.num_layers())
    }

    /// Errors (`CacheCapacity`, `max_batch`) unless `batch_offset + b <= max_batch`.
    fn check_batch_range(&self, batch_offset: usize, b: usize) -> Result<()> {
        if batch_offset + b > self.max_batch {
            return Err(AttnError::CacheCapacity {
                arg: "max_batch".into(),
                capacity: self.max_batch,
                needed: batch_offset + b,
            });
        }
        Ok(())
    }

    /// Length `layer` sees in `slot` (committed plus this layer's pending tokens).
    pub fn visible_len(&self, layer: usize, slot: usize) -> Result<usize> {
        self.check_layer(layer)?;
        if slot >= self.max_batch {
            return Err(AttnError::CacheCapacity {
                arg: "max_batch".into(),
                capacity: self.max_batch,
                needed: slot + 1,
            });
        }
        Ok(self.lengths.visible(layer, slot))
    }

    /// Layer `layer`'s K `[max_seq, max_batch, ng, hn]`.
    pub fn layer_k(&self, layer: usize) -> Result<&DeviceTensor> {
        self.check_layer(layer)?;
        Ok(&self.k[layer])
    }
    /// Layer `layer`'s V `[max_seq, max_batch, ng, hn]`.
    pub fn layer_v(&self, layer: usize) -> Result<&DeviceTensor> {
        self.check_layer(layer)?;
        Ok(&self.v[layer])
    }
    /// Check that `sq` new tokens fit in slots `batch_offset .. batch_offset + b` of `layer`
    /// and return each slot's start position. Nothing changes. Errors: `CacheCapacity`
    /// (`max_batch`, or `max_seq` naming the layer and slot), `InvalidArgument` (`layer`).
    pub fn check_append(
        &self,
        layer: usize,
        batch_offset: usize,
        b: usize,
        sq: usize,
    ) -> Result<Vec<usize>> {
        self.check_layer(layer)?;
        self.check_batch_range(batch_offset, b)?;
        self.lengths
            .starts(layer, batch_offset, b, sq, self.max_seq)
    }

    /// Record `sq` tokens appended by `layer` (after a successful launch).
    pub(crate) fn mark_appended(&mut self, layer: usize, batch_offset: usize, b: usize, sq: usize) {
        self.lengths.add_pending(layer, batch_offset, b, sq);
    }

    /// Commit a step (every layer appended exactly `sq` tokens to each slot of the range).
    /// Errors (nothing changes) as [`StaticKvCache::advance`](crate::kv_cache::StaticKvCache::advance).
    pub fn advance(&mut self, batch_offset: usize, b: usize, sq: usize) -> Result<()> {
        self.check_batch_range(batch_offset, b)?;
        self.lengths.advance(batch_offset, b, sq)
    }

    /// Drop every pending token.
    pub fn rollback(&mut self) {
        self.lengths.rollback();
    }

    /// Reorder batch slots for beam search on the device: new slot `i` takes the contents
    /// and committed length of old slot `src[i]` in every layer, for `i < src.len()`; slots
    /// at or beyond `src.len()` are unchanged; entries may repeat (a beam with several
    /// children). Each layer's K and V are snapshotted first (so repeated sources read old
    /// data), then every moved slot is one strided 2D copy (`max_seq` rows of `ng * hn`
    /// elements, pitch `max_batch * ng * hn`). `stream` is synchronized before returning.
    ///
    /// Errors (nothing changes): `InvalidArgument` (`perm`) when `src` is longer than
    /// `max_batch` or names a slot outside it, or (`reorder`) while a step is pending;
    /// `DeviceAlloc` / `Cuda` from the device.
    pub fn reorder(&mut self, stream: &Arc<CudaStream>, src: &[usize]) -> Result<()> {
        self.lengths.check_reorder(src)?;
        if src.iter().enumerate().all(|(i, &s)| i == s) {
            return Ok(());
        }
        fn permute<T: DeviceElem>(
            stream: &Arc<CudaStream>,
            t: &mut DeviceTensor,
            src: &[usize],
            row_bytes: usize,
            pitch: usize,
            height: usize,
        ) -> Result<()> {
            use cudarc::driver::{sys, DevicePtr, DevicePtrMut};
            let slice = t.typed_mut::<T>("cache")?;
            let old = stream
                .clone_dtod(&*slice)
                .map_err(cuda_err("reorder (snapshot)"))?;
            {
                let (sp, _gs) = old.device_ptr(stream);
                let (dp, _gd) = slice.device_ptr_mut(stream);
                for (i, &s) in src.iter().enumerate().filter(|(i, s)| i != *s) {
                    let p = sys::CUDA_MEMCPY2D_st {
                        srcXInBytes: s * row_bytes,
                        srcY: 0,
                        srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                        srcHost: std::ptr::null(),
                        srcDevice: sp,
                        srcArray: std::ptr::null_mut(),
                        srcPitch: pitch,
                        dstXInBytes: i * row_bytes,
                        dstY: 0,
                        dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                        dstHost: std::ptr::null_mut(),
                        dstDevice: dp,
                        dstArray: std::ptr::null_mut(),
                        dstPitch: pitch,
                        WidthInBytes: row_bytes,
                        Height: height,
                    };
                    // SAFETY: both pointers are live device buffers of `height * pitch`
                    // bytes (the layer's cache and its snapshot); slot columns `s` and `i`
                    // are below `max_batch`, so every row read and written is in bounds.
                    unsafe { sys::cuMemcpy2DAsync_v2(&p, stream.cu_stream()) }
                        .result()
                        .map_err(cuda_err("cuMemcpy2DAsync (reorder)"))?;
                }
            }
            stream
                .synchronize()
                .map_err(cuda_err("reorder synchronize"))
        }
        let (max_seq, max_batch) = (self.max_seq, self.max_batch);
        let width = self.groups * self.head_dim;
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            let row_bytes = width * t.elem().size();
            let pitch = max_batch * row_bytes;
            match t.elem() {
                ElemType::Bf16 => permute::<half::bf16>(stream, t, src, row_bytes, pitch, max_seq)?,
                ElemType::F16 => permute::<half::f16>(stream, t, src, row_bytes, pitch, max_seq)?,
                ElemType::F32 => permute::<f32>(stream, t, src, row_bytes, pitch, max_seq)?,
            }
        }
        self.lengths.reorder(src);
        Ok(())
    }

    /// Forget every sequence (lengths to 0; contents are overwritten by later appends).
    pub fn reset(&mut self) {
        self.lengths.reset();
    }

    /// Keys and values `[len, ng, hn]` (f32, host) of positions `0..len` of `slot` in `layer`.
    pub fn gather_kv_host(
        &self,
        layer: usize,
        slot: usize,
        len: usize,
    ) -> Result<(Tensor, Tensor)> {
        let vis = self.visible_len(layer, slot)?;
        if len > vis {
            return Err(AttnError::InvalidArgument {
                arg: "len".into(),
                expected: format!("at most the slot's visible length {vis}"),
                got: len.to_string(),
            });
        }
        let row = self.groups * self.head_dim;
        let pick = |t: &DeviceTensor| -> Result<Tensor> {
            let h = t.to_host()?;
            let mut out = Vec::with_capacity(len * row);
            for p in 0..len {
                let off = (p * self.max_batch + slot) * row;
                out.extend_from_slice(&h.data()[off..off + row]);
            }
            Tensor::new(&[len, self.groups, self.head_dim], out)
        };
        Ok((pick(&self.k[layer])?, pick(&self.v[layer])?))
    }
}

/// A paged KV cache on the device for a stack of `num_layers` layers.
///
/// Layout per layer: K and V pools `[num_blocks, block_size, ng, hn]` in the layer's dtype;
/// position `p` of a request with block-table row `row` lives at pool row
/// `row[p / block_size] * block_size + p % block_size` (64-bit in the kernels). Block ids are
/// shared by every layer and handed out by the cache's [`BlockAllocator`].
#[derive(Debug)]
pub struct DevicePagedKvCache {
    block_size: usize,
    groups: usize,
    head_dim: usize,
    k: Vec<DeviceTensor>,
    v: Vec<DeviceTensor>,
    allocator: BlockAllocator,
}

impl DevicePagedKvCache {
    /// A zeroed pool. Errors (`InvalidArgument`) for a block size that is not a power of two
    /// `>= 16`, a zero dimension or overflow; `DeviceAlloc` when the device lacks memory.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stream: &Arc<CudaStream>,
        elem: ElemType,
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        groups: usize,
        head_dim: usize,
    ) -> Result<Self> {
        if block_size < MIN_BLOCK_SIZE || !block_size.is_power_of_two() {
            return Err(AttnError::InvalidArgument {
                arg: "block_size".into(),
                expected: format!("a power of two >= {MIN_BLOCK_SIZE}"),
                got: block_size.to_string(),
            });
        }
        check_dims(&[
            ("num_layers", num_layers),
            ("num_blocks", num_blocks),
            ("block_size", block_size),
            ("groups", groups),
            ("head_dim", head_dim),
        ])?;
        let shape = [num_blocks, block_size, groups, head_dim];
        let mut k = Vec::with_capacity(num_layers);
        let mut v = Vec::with_capacity(num_layers);
        for _ in 0..num_layers {
            k.push(zeros(stream, elem, &shape)?);
            v.push(zeros(stream, elem, &shape)?);
        }
        Ok(DevicePagedKvCache {
            block_size,
            groups,
            head_dim,
            k,
            v,
            allocator: BlockAllocator::new(num_blocks)?,
        })
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.k.len()
    }
    /// Keys per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// Key/value groups.
    pub fn groups(&self) -> usize {
        self.groups
    }
    /// Head dim.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// The block allocator.
    pub fn allocator(&self) -> &BlockAllocator {
        &self.allocator
    }
    /// The block allocator, mutably.
    pub fn allocator_mut(&mut self) -> &mut BlockAllocator {
        &mut self.allocator
    }
    /// Layer `layer`'s K and V pools.
    pub fn layer_kv(&self, layer: usize) -> Result<(&DeviceTensor, &DeviceTensor)> {
        crate::kv_cache::check_layer(layer, self.num_layers())?;
        Ok((&self.k[layer], &self.v[layer]))
    }

    /// Number of blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.allocator.num_blocks()
    }

    /// Copy block `src` to block `dst` in every layer's K and V pools (copy-on-write of a
    /// shared block, or moving blocks around the pool), queued on `stream` (synchronized
    /// before returning). Errors (`BlockId`, nothing copied) unless both are allocated.
    pub fn copy_block(&mut self, stream: &Arc<CudaStream>, src: u32, dst: u32) -> Result<()> {
        self.allocator.check_allocated("src", src as i64)?;
        self.allocator.check_allocated("dst", dst as i64)?;
        if src == dst {
            return Ok(());
        }
        let n = self.block_size * self.groups * self.head_dim;
        let (s, d) = (src as usize * n, dst as usize * n);
        fn copy<T: DeviceElem>(
            stream: &Arc<CudaStream>,
            t: &mut DeviceTensor,
            s: usize,
            d: usize,
            n: usize,
        ) -> Result<()> {
            let slice = t.typed_mut::<T>("pool")?;
            let tmp = stream
                .clone_dtod(&slice.slice(s..s + n))
                .map_err(cuda_err("copy_block (read)"))?;
            stream
                .memcpy_dtod(&tmp, &mut slice.slice_mut(d..d + n))
                .map_err(cuda_err("copy_block (write)"))?;
            stream
                .synchronize()
                .map_err(cuda_err("copy_block synchronize"))
        }
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            match t.elem() {
                ElemType::Bf16 => copy::<half::bf16>(stream, t, s, d, n)?,
                ElemType::F16 => copy::<half::f16>(stream, t, s, d, n)?,
                ElemType::F32 => copy::<f32>(stream, t, s, d, n)?,
            }
        }
        Ok(())
    }

    /// Keys and values `[len, ng, hn]` (f32, host) of positions `0..len` of the request whose
    /// block-table row is `row` (`-1` for unused entries), in `layer`.
    ///
    /// Errors: `InvalidArgument` (`layer`); `CacheCapacity` (`row`) when the row has fewer
    /// than `ceil(len / block_size)` blocks; `BlockId` (`row[c]`) for an entry outside the
    /// pool or free.
    pub fn gather_kv_host(
        &self,
        layer: usize,
        row: &[i32],
        len: usize,
    ) -> Result<(Tensor, Tensor)> {
        crate::kv_cache::check_layer(layer, self.num_layers())?;
        let bs = self.block_size;
        let needed = check_row_covers(&self.allocator, bs, row, len, |c| format!("row[{c}]"))?;
        let width = self.groups * self.head_dim;
        let pick = |t: &DeviceTensor| -> Result<Tensor> {
            let h = t.to_host()?;
            let mut out = Vec::with_capacity(len * width);
            for (c, &id) in row.iter().enumerate().take(needed) {
                let m = (len - c * bs).min(bs) * width;
                let o = id as usize * bs * width;
                out.extend_from_slice(&h.data()[o..o + m]);
            }
            Tensor::new(&[len, self.groups, self.head_dim], out)
        };
        Ok((pick(&self.k[layer])?, pick(&self.v[layer])?))
    }

    /// Validate a step of `num_tokens` new tokens as
    /// [`PagedBatch::validate`] does, plus the write checks of
    /// [`PagedKvCache::append_paged`](crate::kv_cache::PagedKvCache::append_paged): a block
    /// written by this step must be held once and by one request. Nothing changes.
    pub fn validate(&self, batch: &PagedBatch<'_>, num_tokens: usize) -> Result<Vec<PagedRequest>> {
        let bs = self.block_size;
        let mut writer: HashMap<u32, usize> = HashMap::new();
        batch.validate_with(bs, &self.allocator, num_tokens, |i, c, id, r| {
            let written = r.q_len > 0 && c >= (r.k_len - r.q_len) / bs;
            if !written {
                return Ok(());
            }
            let rc = self.allocator.refcount(id)?;
            if rc > 1 {
                return Err(AttnError::BlockId {
                    arg: format!("block_table[{i}][{c}]"),
                    expected: format!("a block held once to write into (it has {rc} holders)"),
                    got: id as i64,
                });
            }
            if let Some(&j) = writer.get(&id) {
                if j != i {
                    return Err(AttnError::BlockId {
                        arg: format!("block_table[{i}][{c}]"),
                        expected: format!(
                            "a block written by one request only (request {j} also writes it)"
                        ),
                        got: id as i64,
                    });
                }
            }
            writer.insert(id, i);
            Ok(())
        })
    }
}
