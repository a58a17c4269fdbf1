//! The cross-attention context cache (encoder-decoder decoding).

use super::{alloc_zeroed, check_layer, checked_product};
use crate::error::{AttnError, Result};
use crate::tensor::Tensor;

/// The keys and values of each request's encoder context, projected once by a
/// cross-attention layer's `linear_kv` and reused by every decoder step, for a stack of
/// `num_layers` cross-attention layers (each layer projects the same context with its own
/// weights).
///
/// Fill it with [`CrossAttentionParts::set_context`](crate::CrossAttentionParts::set_context)
/// (or the low-level [`store`](Self::store)), then run
/// [`CrossAttentionParts::cross_step`](crate::CrossAttentionParts::cross_step) for prefill
/// and decode steps: they only read it.
///
/// # Layout
/// Per layer, K and V are each `[max_ctx, max_batch, heads, hn]` f32, row-major (the static
/// KV cache's layout, [`StaticKvCache`](super::StaticKvCache), which the CUDA kernels read
/// in place): the `heads * hn` values of context position `p` of batch slot `s` start at
/// element `(p * max_batch + s) * heads * hn` of the layer's buffer. Cross-attention has no
/// grouped-query attention, so there is one key/value head per query head.
///
/// # Lengths
/// Each (layer, slot) has a context length, 0 (no context) until a context is stored.
/// Positions at or past a slot's length (padding of a shorter context, or what a longer
/// earlier context left there) are never read. A failing call changes nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossKvCache {
    num_layers: usize,
    max_ctx: usize,
    max_batch: usize,
    heads: usize,
    head_dim: usize,
    /// Elements of one layer's K (or V) buffer.
    layer_elems: usize,
    /// `[num_layers][max_ctx, max_batch, heads, hn]`.
    k: Vec<f32>,
    /// `[num_layers][max_ctx, max_batch, heads, hn]`.
    v: Vec<f32>,
    /// `[num_layers][max_batch]` context lengths (0 = none).
    lens: Vec<usize>,
}

/// Checks shared by the CPU and device context caches: the slot range `batch_offset .. + b`
/// fits `max_batch`, `sk <= max_ctx`, and `lens` (when given) has `b` entries in `1..=sk`.
/// Returns each slot's length (`sk` for every slot when `lens` is `None`).
///
/// Errors: `CacheCapacity` (`max_batch`, `max_ctx`), `InvalidArgument` (`context_lens`,
/// `context_lens[i]`).
pub(crate) fn check_context(
    max_ctx: usize,
    max_batch: usize,
    batch_offset: usize,
    b: usize,
    sk: usize,
    lens: Option<&[usize]>,
) -> Result<Vec<usize>> {
    check_slots(max_batch, batch_offset, b)?;
    if sk > max_ctx {
        return Err(AttnError::CacheCapacity {
            arg: "max_ctx (context length)".into(),
            capacity: max_ctx,
            needed: sk,
        });
    }
    let Some(lens) = lens else {
        if sk == 0 {
            return Err(AttnError::InvalidArgument {
                arg: "key_value_states".into(),
                expected: "a context of at least one position".into(),
                got: "0 positions".into(),
            });
        }
        return Ok(vec![sk; b]);
    };
    if lens.len() != b {
        return Err(AttnError::InvalidArgument {
            arg: "context_lens".into(),
            expected: format!("{b} entries (one per batch slot)"),
            got: format!("{} entries", lens.len()),
        });
    }
    if let Some((i, &l)) = lens.iter().enumerate().find(|(_, &l)| l == 0 || l > sk) {
        return Err(AttnError::InvalidArgument {
            arg: format!("context_lens[{i}]"),
            expected: format!("a length in 1..={sk} (the padded context length)"),
            got: l.to_string(),
        });
    }
    Ok(lens.to_vec())
}

/// Errors (`CacheCapacity`, `max_batch`) unless `batch_offset + b <= max_batch`.
pub(crate) fn check_slots(max_batch: usize, batch_offset: usize, b: usize) -> Result<()> {
    let end = batch_offset.saturating_add(b);
    if end > max_batch {
        return Err(AttnError::CacheCapacity {
            arg: format!("max_batch (batch_offset {batch_offset} + b {b})"),
            capacity: max_batch,
            needed: end,
        });
    }
    Ok(())
}

/// Each slot's context length for a step over `batch_offset .. + b` of `layer` (range
/// checked by the caller); errors (`InvalidArgument`, `cache`) for a slot without a context.
pub(crate) fn step_lens(
    lens: &[usize],
    layer: usize,
    batch_offset: usize,
    b: usize,
) -> Result<&[usize]> {
    let l = &lens[batch_offset..batch_offset + b];
    if let Some(i) = l.iter().position(|&x| x == 0) {
        return Err(AttnError::InvalidArgument {
            arg: "cache".into(),
            expected: format!(
                "a context stored for layer {layer}, batch slot {} (set_context first)",
                batch_offset + i
            ),
            got: "an empty slot".into(),
        });
    }
    Ok(l)
}

impl CrossKvCache {
    /// A zeroed cache of `num_layers` layers, each with K and V `[max_ctx, max_batch, heads,
    /// head_dim]`, every slot empty.
    ///
    /// Errors (`InvalidArgument`) on a zero dimension, a size that overflows `usize`, or an
    /// allocation the machine cannot make.
    pub fn new(
        num_layers: usize,
        max_ctx: usize,
        max_batch: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let dims = [
            ("num_layers", num_layers),
            ("max_ctx", max_ctx),
            ("max_batch", max_batch),
            ("heads", heads),
            ("head_dim", head_dim),
        ];
        let layer_elems = checked_product(&dims[1..])?;
        let total = checked_product(&dims)?;
        Ok(CrossKvCache {
            num_layers,
            max_ctx,
            max_batch,
            heads,
            head_dim,
            layer_elems,
            k: alloc_zeroed(total)?,
            v: alloc_zeroed(total)?,
            lens: vec![0; num_layers * max_batch],
        })
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Context positions per slot (the longest context it holds).
    pub fn max_ctx(&self) -> usize {
        self.max_ctx
    }

    /// Batch slots.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Key/value heads (the layer's `heads`: cross-attention has no GQA).
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Head dim (`hn`).
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Context length of every slot of `layer` (`[max_batch]`, 0 = no context).
    ///
    /// Errors (`InvalidArgument`, `layer`) for a layer outside the cache.
    pub fn context_lens(&self, layer: usize) -> Result<&[usize]> {
        check_layer(layer, self.num_layers)?;
        Ok(&self.lens[layer * self.max_batch..(layer + 1) * self.max_batch])
    }

    /// Context length of `slot` in `layer` (0 = no context).
    ///
    /// Errors (`InvalidArgument`): `layer` or `slot` outside the cache.
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

    /// Layer `layer`'s whole K buffer `[max_ctx, max_batch, heads, hn]`.
    pub fn layer_k(&self, layer: usize) -> Result<&[f32]> {
        check_layer(layer, self.num_layers)?;
        Ok(&self.k[layer * self.layer_elems..(layer + 1) * self.layer_elems])
    }

    /// Layer `layer`'s whole V buffer `[max_ctx, max_batch, heads, hn]`.
    pub fn layer_v(&self, layer: usize) -> Result<&[f32]> {
        check_layer(layer, self.num_layers)?;
        Ok(&self.v[layer * self.layer_elems..(layer + 1) * self.layer_elems])
    }

    /// Store projected context keys and values for `layer` in slots `batch_offset ..
    /// batch_offset + b`, replacing what those slots held: `k`, `v` `[sk, b, heads, hn]`
    /// (position-major, as `linear_kv` of a padded `[sk, b, h]` context gives them), slot
    /// `batch_offset + i` keeping positions `0 .. context_lens[i]` (`sk` for every slot when
    /// `context_lens` is `None`; positions past a slot's length are padding and not stored).
    ///
    /// Errors, with nothing changed: `InvalidArgument` (`layer`; `context_lens` of another
    /// length than `b` or an entry outside `1..=sk`; an empty context); `Shape` (`k`, `v`);
    /// `CacheCapacity` (`max_batch` for the slot range, `max_ctx` when `sk > max_ctx`).
    pub fn store(
        &mut self,
        layer: usize,
        batch_offset: usize,
        k: &Tensor,
        v: &Tensor,
        context_lens: Option<&[usize]>,
    ) -> Result<()> {
        check_layer(layer, self.num_layers)?;
        let (nh, hn) = (Some(self.heads), Some(self.head_dim));
        k.expect_shape("k", &[None, None, nh, hn])?;
        let (sk, b) = (k.shape()[0], k.shape()[1]);
        v.expect_shape("v", &[Some(sk), Some(b), nh, hn])?;
        let lens = check_context(
            self.max_ctx,
            self.max_batch,
            batch_offset,
            b,
            sk,
            context_lens,
        )?;
        let row = self.heads * self.head_dim;
        for (i, &len) in lens.iter().enumerate() {
            let slot = batch_offset + i;
            for p in 0..len {
                let dst = self.offset(layer, p, slot);
                let src = (p * b + i) * row;
                self.k[dst..dst + row].copy_from_slice(&k.data()[src..src + row]);
                self.v[dst..dst + row].copy_from_slice(&v.data()[src..src + row]);
            }
            self.lens[layer * self.max_batch + slot] = len;
        }
        Ok(())
    }

    /// Keys and values `[len, heads, hn]` of the context of `slot` in `layer` (`len` its
    /// context length; empty for a slot without context).
    ///
    /// Errors (`InvalidArgument`): `layer` or `slot` outside the cache.
    pub fn gather_kv(&self, layer: usize, slot: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let len = self.context_len(layer, slot)?;
        let row = self.heads * self.head_dim;
        let mut k = Vec::with_capacity(len * row);
        let mut v = Vec::with_capacity(len * row);
        for p in 0..len {
            let o = self.offset(layer, p, slot);
            k.extend_from_slice(&self.k[o..o + row]);
            v.extend_from_slice(&self.v[o..o + row]);
        }
        Ok((k, v))
    }

    /// Each slot's context length for a step over slots `batch_offset .. batch_offset + b` of
    /// `layer`.
    ///
    /// Errors: `InvalidArgument` (`layer`; `cache` naming a slot without context),
    /// `CacheCapacity` (`max_batch`) for the slot range.
    pub fn step_lens(&self, layer: usize, batch_offset: usize, b: usize) -> Result<&[usize]> {
        let lens = self.context_lens(layer)?;
        check_slots(self.max_batch, batch_offset, b)?;
        step_lens(lens, layer, batch_offset, b)
    }

    /// Forget the contexts of slots `batch_offset .. batch_offset + b` in every layer (a
    /// finished request); their stored values are left in place, unreachable.
    ///
    /// Errors (`CacheCapacity`, `max_batch`) for a bad range.
    pub fn reset_slots(&mut self, batch_offset: usize, b: usize) -> Result<()> {
        check_slots(self.max_batch, batch_offset, b)?;
        for layer in 0..self.num_layers {
            let base = layer * self.max_batch + batch_offset;
            self.lens[base..base + b].fill(0);
        }
        Ok(())
    }

    /// Forget every context (every slot of every layer empty).
    pub fn reset(&mut self) {
        self.lens.fill(0);
    }

    /// Element offset of `(layer, pos, slot, head 0, channel 0)` in the stacked buffers.
    fn offset(&self, layer: usize, pos: usize, slot: usize) -> usize {
        layer * self.layer_elems + (pos * self.max_batch + slot) * self.heads * self.head_dim
    }
}
