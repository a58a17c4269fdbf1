//! The static (contiguous) KV cache.

use super::{alloc_zeroed, check_layer, checked_product};
use crate::error::{AttnError, Result};
use crate::tensor::Tensor;

/// A contiguous KV cache for a stack of `num_layers` layers, allocated once.
///
/// # Layout
/// Per layer, K and V are each `[max_seq, max_batch, ng, hn]` f32, row-major (the reference
/// system's layout): the `ng * hn` values of position `p` of batch slot `b` start at element
/// `(p * max_batch + b) * ng * hn` of the layer's buffer ([`StaticKvCache::layer_k`]). All
/// offsets are `usize` (64-bit).
///
/// # Length bookkeeping for a stack of layers
/// Every layer appends its own k/v for the same new tokens, so lengths advance in two steps:
/// 1. [`append`](Self::append)`(layer, ...)` writes at each slot's
///    [`visible_len`](Self::visible_len) (the committed length plus what this layer has already
///    appended in the current step) and records the new tokens as *pending* for that layer only;
///    attention for that layer then covers `[0, visible_len)`.
/// 2. [`advance`](Self::advance)`(batch_offset, b, sq)` commits the step once every layer has
///    appended: it requires each of the `num_layers` layers to have exactly `sq` pending tokens
///    in each slot of `batch_offset..batch_offset + b` (anything else is an `InvalidArgument`
///    error naming the layer and slot, and nothing changes), then moves the committed
///    [`seqlens`](Self::seqlens) forward by `sq`.
///
/// [`rollback`](Self::rollback) drops all pending tokens (e.g. after a failed step).
/// A failing call never changes the stored values or the lengths.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticKvCache {
    num_layers: usize,
    max_seq: usize,
    max_batch: usize,
    groups: usize,
    head_dim: usize,
    /// Elements of one layer's K (or V) buffer.
    layer_elems: usize,
    /// `[num_layers][max_seq, max_batch, ng, hn]`.
    k: Vec<f32>,
    /// `[num_layers][max_seq, max_batch, ng, hn]`.
    v: Vec<f32>,
    /// Committed and pending lengths.
    lengths: CacheLengths,
}

/// Length bookkeeping of a static cache, shared by [`StaticKvCache`] and its device mirror
/// (`DeviceStaticKvCache`): the committed length per batch slot (`[max_batch]`) and the
/// appended-but-uncommitted tokens per layer and slot (`[num_layers][max_batch]`).
///
/// Range checks whose errors differ between the two caches (`layer`, `slot`, the batch
/// range) stay with the callers; the methods here take `layer < num_layers` and slots below
/// `max_batch` as given.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CacheLengths {
    num_layers: usize,
    max_batch: usize,
    seqlens: Vec<usize>,
    pending: Vec<usize>,
}

impl CacheLengths {
    /// Every length 0. `num_layers * max_batch` must fit in `usize` (the caches check their
    /// whole size first).
    pub(crate) fn new(num_layers: usize, max_batch: usize) -> Self {
        CacheLengths {
            num_layers,
            max_batch,
            seqlens: vec![0; max_batch],
            pending: vec![0; num_layers * max_batch],
        }
    }

    /// Committed length per batch slot (`[max_batch]`).
    pub(crate) fn seqlens(&self) -> &[usize] {
        &self.seqlens
    }

    /// Tokens `layer` has appended to `slot` in the current step.
    pub(crate) fn pending(&self, layer: usize, slot: usize) -> usize {
        self.pending[layer * self.max_batch + slot]
    }

    /// Committed plus `layer`'s pending tokens in `slot`.
    pub(crate) fn visible(&self, layer: usize, slot: usize) -> usize {
        self.seqlens[slot] + self.pending(layer, slot)
    }

    /// Each slot's start position for `sq` new tokens of `layer` in slots `batch_offset ..
    /// batch_offset + b`. Errors (`CacheCapacity`, `max_seq` naming the layer and slot) when a
    /// slot would grow past `max_seq`.
    pub(crate) fn starts(
        &self,
        layer: usize,
        batch_offset: usize,
        b: usize,
        sq: usize,
        max_seq: usize,
    ) -> Result<Vec<usize>> {
        let mut starts = Vec::with_capacity(b);
        for slot in batch_offset..batch_offset + b {
            let cur = self.visible(layer, slot);
            if cur + sq > max_seq {
                return Err(AttnError::CacheCapacity {
                    arg: format!("max_seq (layer {layer}, batch slot {slot} holds {cur})"),
                    capacity: max_seq,
                    needed: cur + sq,
                });
            }
            starts.push(cur);
        }
        Ok(starts)
    }

    /// Record `sq` tokens appended by `layer` to slots `batch_offset .. batch_offset + b`.
    pub(crate) fn add_pending(&mut self, layer: usize, batch_offset: usize, b: usize, sq: usize) {
        for slot in batch_offset..batch_offset + b {
            self.pending[layer * self.max_batch + slot] += sq;
        }
    }

    /// Commit a step over a checked slot range (see [`StaticKvCache::advance`]). Errors
    /// (`InvalidArgument`, `advance`, nothing changes) naming the first layer and slot whose
    /// pending count is not `sq`.
    pub(crate) fn advance(&mut self, batch_offset: usize, b: usize, sq: usize) -> Result<()> {
        for layer in 0..self.num_layers {
            for slot in batch_offset..batch_offset + b {
                let p = self.pending(layer, slot);
                if p != sq {
                    return Err(AttnError::InvalidArgument {
                        arg: "advance".into(),
                        expected: format!(
                            "every layer to have appended {sq} tokens to batch slot {slot}"
                        ),
                        got: format!("layer {layer} appended {p}"),
                    });
                }
            }
        }
        for slot in batch_offset..batch_offset + b {
            self.seqlens[slot] += sq;
            for layer in 0..self.num_layers {
                self.pending[layer * self.max_batch + slot] = 0;
            }
        }
        Ok(())
    }

    /// Drop every pending token.
    pub(crate) fn rollback(&mut self) {
        self.pending.fill(0);
    }

    /// Every length back to 0.
    pub(crate) fn reset(&mut self) {
        self.seqlens.fill(0);
        self.pending.fill(0);
    }

    /// Lengths of the checked slot range `batch_offset .. batch_offset + b` back to 0.
    pub(crate) fn reset_slots(&mut self, batch_offset: usize, b: usize) {
        for slot in batch_offset..batch_offset + b {
            self.seqlens[slot] = 0;
            for layer in 0..self.num_layers {
                self.pending[layer * self.max_batch + slot] = 0;
            }
        }
    }

    /// Check a beam-search reorder `src` (see [`StaticKvCache::reorder`]). Errors
    /// (`InvalidArgument`): `perm` when `src` is longer than `max_batch`, `perm[i]` for a slot
    /// outside it, `reorder` while a step is pending.
    pub(crate) fn check_reorder(&self, src: &[usize]) -> Result<()> {
        if src.len() > self.max_batch {
            return Err(AttnError::InvalidArgument {
                arg: "perm".into(),
                expected: format!("at most {} entries (max_batch)", self.max_batch),
                got: format!("{} entries", src.len()),
            });
        }
        if let Some((i, &s)) = src.iter().enumerate().find(|(_, &s)| s >= self.max_batch) {
            return Err(AttnError::InvalidArgument {
                arg: format!("perm[{i}]"),
                expected: format!("a batch slot in 0..{}", self.max_batch),
                got: s.to_string(),
            });
        }
        if self.pending.iter().any(|&p| p != 0) {
            return Err(AttnError::InvalidArgument {
                arg: "reorder".into(),
                expected: "no pending appends (call advance or rollback first)".into(),
                got: "a step with pending appends".into(),
            });
        }
        Ok(())
    }

    /// New slot `i` takes the committed length of old slot `src[i]` (`src` checked by
    /// [`check_reorder`](Self::check_reorder)).
    pub(crate) fn reorder(&mut self, src: &[usize]) {
        let old = self.seqlens.clone();
        for (i, &s) in src.iter().enumerate() {
            self.seqlens[i] = old[s];
        }
    }
}

impl StaticKvCache {
    /// A zeroed cache of `num_layers` layers, each with K and V `[max_seq, max_batch, groups,
    /// head_dim]`.
    ///
    /// Errors (`InvalidArgument`) on a zero dimension, a size that overflows `usize`, or an
    /// allocation the machine cannot make.
    pub fn new(
        num_layers: usize,
        max_seq: usize,
        max_batch: usize,
        groups: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let dims = [
            ("num_layers", num_layers),
            ("max_seq", max_seq),
            ("max_batch", max_batch),
            ("groups", groups),
            ("head_dim", head_dim),
        ];
        let layer_elems = checked_product(&dims[1..])?;
        let total = checked_product(&dims)?;
        Ok(StaticKvCache {
            num_layers,
            max_seq,
            max_batch,
            groups,
            head_dim,
            layer_elems,
            k: alloc_zeroed(total)?,
            v: alloc_zeroed(total)?,
            lengths: CacheLengths::new(num_layers, max_batch),
        })
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Positions per sequence.
    pub fn max_seq(&self) -> usize {
        self.max_seq
    }

    /// Batch slots.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Key/value groups (`ng`).
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// Head dim (`hn`).
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Committed length of every batch slot (`[max_batch]`).
    pub fn seqlens(&self) -> &[usize] {
        self.lengths.seqlens()
    }

    /// Tokens `layer` has appended to `slot` in the current (uncommitted) step.
    pub fn pending(&self, layer: usize, slot: usize) -> Result<usize> {
        check_layer(layer, self.num_layers)?;
        self.check_slot(slot)?;
        Ok(self.lengths.pending(layer, slot))
    }

    /// Length `layer` sees in `slot`: committed plus this layer's pending tokens. Attention
    /// after an append covers keys `[0, visible_len)`.
    pub fn visible_len(&self, layer: usize, slot: usize) -> Result<usize> {
        self.pending(layer, slot)?;
        Ok(self.lengths.visible(layer, slot))
    }

    /// Check that `sq` new tokens fit in slots `batch_offset .. batch_offset + b` of `layer`
    /// and return each slot's start (its [`visible_len`](Self::visible_len)). Nothing
    /// changes. Errors: `InvalidArgument` (`layer`), `CacheCapacity` (`max_batch`; `max_seq`
    /// naming the layer and slot).
    pub fn check_append(
        &self,
        layer: usize,
        batch_offset: usize,
        b: usize,
        sq: usize,
    ) -> Result<Vec<usize>> {
        check_layer(layer, self.num_layers)?;
        self.check_batch_range(batch_offset, b)?;
        self.lengths
            .starts(layer, batch_offset, b, sq, self.max_seq)
    }

    /// Layer `layer`'s whole K buffer `[max_seq, max_batch, ng, hn]`.
    pub fn layer_k(&self, layer: usize) -> Result<&[f32]> {
        check_layer(layer, self.num_layers)?;
        Ok(&self.k[layer * self.layer_elems..(layer + 1) * self.layer_elems])
    }

    /// Layer `layer`'s whole V buffer `[max_seq, max_batch, ng, hn]`.
    pub fn layer_v(&self, layer: usize) -> Result<&[f32]> {
        check_layer(layer, self.num_layers)?;
        Ok(&self.v[layer * self.layer_elems..(layer + 1) * self.layer_elems])
    }

    /// Element offset of `(layer, pos, slot, group 0, channel 0)` in the stacked buffers.
    fn offset(&self, layer: usize, pos: usize, slot: usize) -> usize {
        layer * self.layer_elems + (pos * self.max_batch + slot) * self.groups * self.head_dim
    }

    /// Write new keys and values for `layer` into slots `batch_offset .. batch_offset + b`,
    /// each at that slot's [`visible_len`](Self::visible_len), and mark them pending for
    /// `layer` (see the type's docs; [`advance`](Self::advance) commits).
    ///
    /// `k`, `v`: `[sq, b, ng, hn]`.
    ///
    /// Errors, with nothing written: `Shape` (`k`/`v`); `InvalidArgument` (`layer`);
    /// `CacheCapacity` (`max_batch`) when `batch_offset + b > max_batch`; `CacheCapacity`
    /// (`max_seq`, naming the slot) when a slot would grow past `max_seq`.
    pub fn append(
        &mut self,
        layer: usize,
        batch_offset: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        check_layer(layer, self.num_layers)?;
        let (ng, hn) = (Some(self.groups), Some(self.head_dim));
        k.expect_shape("k", &[None, None, ng, hn])?;
        let (sq, b) = (k.shape()[0], k.shape()[1]);
        v.expect_shape("v", &[Some(sq), Some(b), ng, hn])?;
        self.check_batch_range(batch_offset, b)?;
        let starts = self
            .lengths
            .starts(layer, batch_offset, b, sq, self.max_seq)?;
        let row = self.groups * self.head_dim;
        for (i, &start) in starts.iter().enumerate() {
            let slot = batch_offset + i;
            for t in 0..sq {
                let dst = self.offset(layer, start + t, slot);
                let src = (t * b + i) * row;
                self.k[dst..dst + row].copy_from_slice(&k.data()[src..src + row]);
                self.v[dst..dst + row].copy_from_slice(&v.data()[src..src + row]);
            }
        }
        self.lengths.add_pending(layer, batch_offset, b, sq);
        Ok(())
    }

    /// Commit a step: every layer must have appended exactly `sq` tokens to each slot of
    /// `batch_offset .. batch_offset + b`; the committed lengths of those slots grow by `sq`
    /// and their pending counts return to 0.
    ///
    /// Errors (nothing changes): `CacheCapacity` (`max_batch`) for a bad range;
    /// `InvalidArgument` (`advance`) naming the first layer and slot whose pending count is
    /// not `sq`.
    pub fn advance(&mut self, batch_offset: usize, b: usize, sq: usize) -> Result<()> {
        self.check_batch_range(batch_offset, b)?;
        self.lengths.advance(batch_offset, b, sq)
    }

    /// Drop every pending (appended but uncommitted) token of every layer and slot. The
    /// committed lengths and their contents are untouched.
    pub fn rollback(&mut self) {
        self.lengths.rollback();
    }

    /// Keys and values `[len, ng, hn]` of positions `0..len` of batch slot `slot` in `layer`.
    ///
    /// Errors (`InvalidArgument`) for a bad layer or slot, or `len` above the slot's
    /// [`visible_len`](Self::visible_len) for that layer.
    pub fn gather_kv(&self, layer: usize, slot: usize, len: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let visible = self.visible_len(layer, slot)?;
        if len > visible {
            return Err(AttnError::InvalidArgument {
                arg: "len".into(),
                expected: format!(
                    "at most {visible} (the length layer {layer} sees in slot {slot})"
                ),
                got: len.to_string(),
            });
        }
        let row = self.groups * self.head_dim;
        let mut k = Vec::with_capacity(len * row);
        let mut v = Vec::with_capacity(len * row);
        for p in 0..len {
            let o = self.offset(layer, p, slot);
            k.extend_from_slice(&self.k[o..o + row]);
            v.extend_from_slice(&self.v[o..o + row]);
        }
        Ok((k, v))
    }

    /// The runtime contract's name for [`gather_kv`](Self::gather_kv).
    pub fn keys(&self, layer: usize, batch_idx: usize, len: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        self.gather_kv(layer, batch_idx, len)
    }

    /// Reorder batch slots for beam search: new slot `i` takes the contents and length of old
    /// slot `src[i]`, for every layer, for `i < src.len()`; slots at or beyond `src.len()` are
    /// unchanged. Entries may repeat (a beam that spawns several children) and need not cover
    /// every slot.
    ///
    /// Errors (nothing changes): `InvalidArgument` (`perm`) when `src` is longer than
    /// `max_batch` or names a slot outside it, or (`reorder`) while a step is pending.
    pub fn reorder(&mut self, src: &[usize]) -> Result<()> {
        self.lengths.check_reorder(src)?;
        let row = self.groups * self.head_dim;
        for buf in [&mut self.k, &mut self.v] {
            for layer in 0..self.num_layers {
                let base = layer * self.layer_elems;
                for pos in 0..self.max_seq {
                    let line = base + pos * self.max_batch * row;
                    // One position of every slot: copy it out so repeated sources read old data.
                    let old_line = buf[line..line + self.max_batch * row].to_vec();
                    for (i, &s) in src.iter().enumerate() {
                        let d = line + i * row;
                        buf[d..d + row].copy_from_slice(&old_line[s * row..(s + 1) * row]);
                    }
                }
            }
        }
        self.lengths.reorder(src);
        Ok(())
    }

    /// Forget every sequence: lengths and pending counts return to 0. Stored values are left
    /// in place (they are unreachable until overwritten).
    pub fn reset(&mut self) {
        self.lengths.reset();
    }

    /// Forget slots `batch_offset .. batch_offset + b` only (a finished request).
    ///
    /// Errors (`CacheCapacity`, `max_batch`) for a bad range.
    pub fn reset_slots(&mut self, batch_offset: usize, b: usize) -> Result<()> {
        self.check_batch_range(batch_offset, b)?;
        self.lengths.reset_slots(batch_offset, b);
        Ok(())
    }

    fn check_slot(&self, slot: usize) -> Result<()> {
        if slot >= self.max_batch {
            return Err(AttnError::InvalidArgument {
                arg: "slot".into(),
                expected: format!("a batch slot in 0..{}", self.max_batch),
                got: slot.to_string(),
            });
        }
        Ok(())
    }

    fn check_batch_range(&self, batch_offset: usize, b: usize) -> Result<()> {
        let end = batch_offset.saturating_add(b);
        if end > self.max_batch {
            return Err(AttnError::CacheCapacity {
                arg: format!("max_batch (batch_offset {batch_offset} + b {b})"),
                capacity: self.max_batch,
                needed: end,
            });
        }
        Ok(())
    }
}
