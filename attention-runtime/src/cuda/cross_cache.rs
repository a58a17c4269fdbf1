//! [`DeviceCrossKvCache`]: the cross-attention context cache on the device, mirroring
//! [`CrossKvCache`](crate::kv_cache::CrossKvCache) (same layout, same lengths, same checks).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::tensor::{alloc_err, cuda_err, DeviceElem, DeviceTensor, ElemType};
use crate::error::{AttnError, Result};
use crate::kv_cache::cross::{check_context, check_slots, step_lens};
use crate::tensor::Tensor;

/// The projected encoder context of each request, on the device, for a stack of
/// `num_layers` cross-attention layers: filled once per request by
/// [`CudaLayer::set_context_device`](super::CudaLayer::set_context_device) and read by every
/// [`CudaLayer::cross_step_device`](super::CudaLayer::cross_step_device).
///
/// Layout per layer: K and V each `[max_ctx, max_batch, heads, hn]` row-major in the
/// layer's dtype (context position `p` of batch slot `s` at row `p * max_batch + s`, the
/// static KV cache's layout, which the attention kernels read in place). Each (layer, slot)
/// has a context length (0 = none), kept on the host (the checks) and mirrored in a device
/// int32 array `[num_layers, max_batch]` (the kernels' per-slot key counts), updated when a
/// context is stored: a step uploads nothing. Rows at or past a slot's length (the padding
/// of a shorter context, an earlier longer context) are never read by a step.
#[derive(Debug)]
pub struct DeviceCrossKvCache {
    max_ctx: usize,
    max_batch: usize,
    heads: usize,
    head_dim: usize,
    elem: ElemType,
    k: Vec<DeviceTensor>,
    v: Vec<DeviceTensor>,
    /// `[num_layers][max_batch]` context lengths (0 = none), the source of truth.
    lens: Vec<usize>,
    /// Device int32 mirror of `lens`.
    lens_dev: CudaSlice<i32>,
}

fn zeros(stream: &Arc<CudaStream>, elem: ElemType, shape: &[usize]) -> Result<DeviceTensor> {
    fn z<T: DeviceElem>(stream: &Arc<CudaStream>, shape: &[usize]) -> Result<DeviceTensor> {
        let n: usize = shape.iter().product();
        let s = stream
            .alloc_zeros::<T>(n)
            .map_err(alloc_err("cross kv cache", n * std::mem::size_of::<T>()))?;
        DeviceTensor::from_slice(s, shape)
    }
    match elem {
        ElemType::Bf16 => z::<half::bf16>(stream, shape),
        ElemType::F16 => z::<half::f16>(stream, shape),
        ElemType::F32 => z::<f32>(stream, shape),
    }
}

impl DeviceCrossKvCache {
    /// A zeroed cache with every slot empty, K and V `[max_ctx, max_batch, heads, head_dim]`
    /// per layer in `elem` (the layer's dtype).
    ///
    /// Errors: `InvalidArgument` on a zero dimension, a size that overflows, or `max_ctx` /
    /// `max_batch` beyond int32 (the kernels' lengths and slots); `DeviceAlloc` when the
    /// device lacks memory.
    pub fn new(
        stream: &Arc<CudaStream>,
        elem: ElemType,
        num_layers: usize,
        max_ctx: usize,
        max_batch: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        crate::kv_cache::checked_product(&[
            ("num_layers", num_layers),
            ("max_ctx", max_ctx),
            ("max_batch", max_batch),
            ("heads", heads),
            ("head_dim", head_dim),
        ])?;
        for (name, v) in [("max_ctx", max_ctx), ("max_batch", max_batch)] {
            if i32::try_from(v).is_err() {
                return Err(AttnError::InvalidArgument {
                    arg: name.into(),
                    expected: "a value that fits in int32".into(),
                    got: v.to_string(),
                });
            }
        }
        let shape = [max_ctx, max_batch, heads, head_dim];
        let mut k = Vec::with_capacity(num_layers);
        let mut v = Vec::with_capacity(num_layers);
        for _ in 0..num_layers {
            k.push(zeros(stream, elem, &shape)?);
            v.push(zeros(stream, elem, &shape)?);
        }
        let n = num_layers * max_batch;
        let lens_dev = stream
            .alloc_zeros::<i32>(n)
            .map_err(alloc_err("cross kv cache lengths", n * 4))?;
        Ok(DeviceCrossKvCache {
            max_ctx,
            max_batch,
            heads,
            head_dim,
            elem,
            k,
            v,
            lens: vec![0; n],
            lens_dev,
        })
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.k.len()
    }
    /// Context positions per slot.
    pub fn max_ctx(&self) -> usize {
        self.max_ctx
    }
    /// Batch slots.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }
    /// Key/value heads (the layer's `heads`).
    pub fn heads(&self) -> usize {
        self.heads
    }
    /// Head dim.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// Element type of K and V.
    pub fn elem(&self) -> ElemType {
        self.elem
    }

    /// Context length of every slot of `layer` (`[max_batch]`, 0 = none). Errors
    /// (`InvalidArgument`, `layer`) for a layer outside the cache.
    pub fn context_lens(&self, layer: usize) -> Result<&[usize]> {
        crate::kv_cache::check_layer(layer, self.num_layers())?;
        Ok(&self.lens[layer * self.max_batch..(layer + 1) * self.max_batch])
    }

    /// Context length of `slot` in `layer` (0 = none). Errors (`InvalidArgument`): `layer`
    /// or `slot` outside the cache.
    pub fn context_len(&self, layer: usize, slot: usize) -> Result<usize> {
        let lens = self.context_lens(layer)?;
        lens.get(slot)
            .copied()
            .ok_or_else(|| AttnError::InvalidArgument {
                arg: "slot".into(),
                expected: format!("a batch slot in 0..{}", self.max_batch),
                got: slot.to_string(),
            })
    }

    /// Layer `layer`'s K `[max_ctx, max_batch, heads, hn]`.
    pub fn layer_k(&self, layer: usize) -> Result<&DeviceTensor> {
        crate::kv_cache::check_layer(layer, self.num_layers())?;
        Ok(&self.k[layer])
    }
    /// Layer `layer`'s V `[max_ctx, max_batch, heads, hn]`.
    pub fn layer_v(&self, layer: usize) -> Result<&DeviceTensor> {
        crate::kv_cache::check_layer(layer, self.num_layers())?;
        Ok(&self.v[layer])
    }

    /// Check a context of `sk` positions for slots `batch_offset .. batch_offset + b` of
    /// `layer` (see [`CrossKvCache::store`](crate::kv_cache::CrossKvCache::store)) and
    /// return each slot's length. Nothing changes. Errors: `InvalidArgument` (`layer`,
    /// `context_lens`, an empty context), `CacheCapacity` (`max_batch`, `max_ctx`).
    pub fn check_context(
        &self,
        layer: usize,
        batch_offset: usize,
        b: usize,
        sk: usize,
        context_lens: Option<&[usize]>,
    ) -> Result<Vec<usize>> {
        self.context_lens(layer)?;
        check_context(
            self.max_ctx,
            self.max_batch,
            batch_offset,
            b,
            sk,
            context_lens,
        )
    }

    /// Each slot's context length for a step over slots `batch_offset .. batch_offset + b`
    /// of `layer`. Errors: `InvalidArgument` (`layer`; `cache` naming a slot without
    /// context), `CacheCapacity` (`max_batch`).
    pub fn step_lens(&self, layer: usize, batch_offset: usize, b: usize) -> Result<&[usize]> {
        let lens = self.context_lens(layer)?;
        check_slots(self.max_batch, batch_offset, b)?;
        step_lens(lens, layer, batch_offset, b)
    }

    /// Record checked lengths for slots `batch_offset ..` of `layer` (after the store's
    /// kernels are queued): the host lengths, and the device mirror through a copy queued
    /// on `stream` after them.
    pub(crate) fn commit_lens(
        &mut self,
        stream: &Arc<CudaStream>,
        layer: usize,
        batch_offset: usize,
        lens: &[usize],
    ) -> Result<()> {
        let start = layer * self.max_batch + batch_offset;
        let host: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        if !host.is_empty() {
            let mut dst = self.lens_dev.slice_mut(start..start + lens.len());
            stream
                .memcpy_htod(&host, &mut dst)
                .map_err(cuda_err("memcpy_htod cross context lengths"))?;
        }
        self.lens[start..start + lens.len()].copy_from_slice(lens);
        Ok(())
    }

    /// Device address of the int32 context lengths of `layer` from slot `batch_offset` on
    /// (range checked by the caller), for the kernels' `cache_seqlens_k`.
    pub(crate) fn lens_ptr(
        &self,
        stream: &Arc<CudaStream>,
        layer: usize,
        batch_offset: usize,
    ) -> u64 {
        let (p, _sync) = self.lens_dev.device_ptr(stream);
        p + ((layer * self.max_batch + batch_offset) * std::mem::size_of::<i32>()) as u64
    }

    /// Forget the contexts of slots `batch_offset .. batch_offset + b` in every layer (a
    /// finished request). Errors (`CacheCapacity`, `max_batch`) for a bad range.
    pub fn reset_slots(&mut self, batch_offset: usize, b: usize) -> Result<()> {
        check_slots(self.max_batch, batch_offset, b)?;
        for layer in 0..self.num_layers() {
            let base = layer * self.max_batch + batch_offset;
            self.lens[base..base + b].fill(0);
        }
        Ok(())
    }

    /// Forget every context.
    pub fn reset(&mut self) {
        self.lens.fill(0);
    }

    /// Keys and values `[len, heads, hn]` (f32, host; synchronizes) of the context of `slot`
    /// in `layer`, `len` its context length. Errors (`InvalidArgument`): `layer` or `slot`
    /// outside the cache.
    pub fn gather_kv_host(&self, layer: usize, slot: usize) -> Result<(Tensor, Tensor)> {
        let len = self.context_len(layer, slot)?;
        let row = self.heads * self.head_dim;
        let pick = |t: &DeviceTensor| -> Result<Tensor> {
            let h = t.to_host()?;
            let mut out = Vec::with_capacity(len * row);
            for p in 0..len {
                let off = (p * self.max_batch + slot) * row;
                out.extend_from_slice(&h.data()[off..off + row]);
            }
            Tensor::new(&[len, self.heads, self.head_dim], out)
        };
        Ok((pick(&self.k[layer])?, pick(&self.v[layer])?))
    }
}
