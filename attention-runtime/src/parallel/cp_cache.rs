//! KV caches under context parallelism: [`CpStaticKvCache`], one rank's cache of the tokens
//! it owns, and [`CpCpuBackend`], the backend of a [`super::CpLayer`] that makes them.
//!
//! # Who stores what
//! Each rank keeps the keys and values of the tokens it owns, in the order it received them,
//! in an ordinary static cache (its `inner` cache: [`StaticKvCache`] on the CPU, the device
//! cache on a GPU). Beside it the rank records, for every batch slot, the owner of every
//! position of the whole sequence; every rank holds the same record, so each knows every
//! rank's share without communicating:
//!
//! - A prefill (into an empty slot only) of a prompt of `s` tokens (`s` a multiple of
//!   `2 cp`) stores each rank's chunks, `r` and `2 cp - 1 - r` ([`super::CpLayout`]): rank
//!   `r` stores `s / cp` tokens.
//! - Each decode token (one per slot per step) is stored by exactly one rank: the rank that
//!   holds the fewest tokens of that slot, the lowest such rank on ties
//!   ([`CpCacheBook::decode_owner`]). The rule reads only the shared record, so all ranks
//!   agree; it keeps the shares within one token of each other.
//!
//! # Lengths
//! [`StaticCache::seqlens`] are the lengths of the whole sequences (every rank reports the
//! same). [`StaticCache::max_seq`] is the capacity of each rank's own cache (per slot): a
//! step that would overflow any rank's cache is a [`AttnError::CacheCapacity`] on every rank
//! (each rank computes every rank's share), before anything changes; this assumes every
//! rank's cache was made with the same dimensions. Appends are pending per layer until
//! [`StaticCache::advance`] commits the step (with the global token count, as for one GPU:
//! `advance(batch_offset, b, 1)` after a decode step on every rank) or
//! [`StaticCache::rollback`] drops it, exactly as [`StaticKvCache`] does.

use super::cp_layout::CpLayout;
use crate::backend::{Backend, CpuBackend, StaticCache};
use crate::error::{AttnError, Result};
use crate::kv_cache::{PagedKvCache, StaticKvCache};
use crate::tensor::Tensor;

fn bad(arg: &str, expected: impl Into<String>, got: impl Into<String>) -> AttnError {
    AttnError::InvalidArgument {
        arg: arg.into(),
        expected: expected.into(),
        got: got.into(),
    }
}

/// The static cache a rank stores its own tokens in ([`StaticKvCache`], or the device
/// cache): the per-layer pending count the context-parallel cache checks before it commits.
pub trait CpLocalCache: StaticCache {
    /// Tokens `layer` has appended to `slot` in the current (uncommitted) step.
    fn pending_len(&self, layer: usize, slot: usize) -> Result<usize>;
}

impl CpLocalCache for StaticKvCache {
    fn pending_len(&self, layer: usize, slot: usize) -> Result<usize> {
        self.pending(layer, slot)
    }
}

/// The shared record of a context-parallel cache: the owning rank of every position of every
/// slot, committed and pending per layer (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpCacheBook {
    layout: CpLayout,
    num_layers: usize,
    max_batch: usize,
    /// Committed owners per slot, `[max_batch][len]`.
    owners: Vec<Vec<u32>>,
    /// Committed lengths (`owners[slot].len()`).
    seqlens: Vec<usize>,
    /// Pending owners, `[num_layers * max_batch][new tokens]`.
    pending: Vec<Vec<u32>>,
}

impl CpCacheBook {
    fn new(layout: CpLayout, num_layers: usize, max_batch: usize) -> Self {
        CpCacheBook {
            layout,
            num_layers,
            max_batch,
            owners: vec![Vec::new(); max_batch],
            seqlens: vec![0; max_batch],
            pending: vec![Vec::new(); num_layers * max_batch],
        }
    }

    fn pend(&self, layer: usize, slot: usize) -> &[u32] {
        &self.pending[layer * self.max_batch + slot]
    }

    /// The owner of every position `layer` sees in `slot` (committed, then `layer`'s pending).
    pub fn visible_owners(&self, layer: usize, slot: usize) -> impl Iterator<Item = usize> + '_ {
        self.owners[slot]
            .iter()
            .chain(self.pend(layer, slot))
            .map(|&r| r as usize)
    }

    /// Length of the whole sequence `layer` sees in `slot`.
    pub fn visible_len(&self, layer: usize, slot: usize) -> usize {
        self.seqlens[slot] + self.pend(layer, slot).len()
    }

    /// Tokens of `slot` each rank stores, as `layer` sees them, `[cp]`.
    pub fn counts(&self, layer: usize, slot: usize) -> Vec<usize> {
        let mut c = vec![0; self.layout.cp_size];
        self.visible_owners(layer, slot).for_each(|r| c[r] += 1);
        c
    }

    /// Global positions of the tokens `rank` stores in `slot` (as `layer` sees them), in
    /// their order in that rank's cache.
    pub fn positions_of(&self, layer: usize, slot: usize, rank: usize) -> Vec<usize> {
        self.visible_owners(layer, slot)
            .enumerate()
            .filter(|&(_, r)| r == rank)
            .map(|(p, _)| p)
            .collect()
    }

    /// The rank that stores `slot`'s next decode token: the fewest tokens, lowest rank on
    /// ties.
    pub fn decode_owner(&self, layer: usize, slot: usize) -> usize {
        let c = self.counts(layer, slot);
        (0..c.len()).min_by_key(|&r| (c[r], r)).unwrap_or(0)
    }

    /// Owners of a prefill of `s` tokens (chunk `i` of `2 cp` belongs to rank
    /// `min(i, 2 cp - 1 - i)`).
    pub fn prefill_owners(&self, s: usize) -> Vec<u32> {
        let n = 2 * self.layout.cp_size;
        let c = (s / n).max(1);
        (0..s)
            .map(|t| {
                let i = (t / c).min(n - 1);
                i.min(n - 1 - i) as u32
            })
            .collect()
    }

    fn add_pending(&mut self, layer: usize, slot: usize, owners: &[u32]) {
        self.pending[layer * self.max_batch + slot].extend_from_slice(owners);
    }
}

/// One context-parallel rank's static KV cache: its own tokens in `inner`, and the shared
/// record of who owns which position (see the module docs). `S` is [`StaticKvCache`] on the
/// CPU or the device cache on a GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct CpStaticKvCache<S> {
    inner: S,
    book: CpCacheBook,
}

impl<S: CpLocalCache> CpStaticKvCache<S> {
    /// Rank `layout.cp_rank`'s cache over `inner` (its own, empty cache: `max_seq` there is
    /// this rank's capacity per slot).
    ///
    /// Errors: [`AttnError::InvalidArgument`] (`inner`) for a cache that holds tokens.
    pub fn new(layout: CpLayout, inner: S) -> Result<Self> {
        if inner.seqlens().iter().any(|&l| l != 0) {
            return Err(bad("inner", "an empty cache", "a cache holding tokens"));
        }
        let book = CpCacheBook::new(layout, inner.num_layers(), inner.max_batch());
        Ok(CpStaticKvCache { inner, book })
    }

    /// This rank's own cache (its tokens only, in the order received).
    pub fn inner(&self) -> &S {
        &self.inner
    }
    /// The shared record of owners.
    pub fn book(&self) -> &CpCacheBook {
        &self.book
    }
    /// This rank's layout.
    pub fn layout(&self) -> CpLayout {
        self.book.layout
    }

    pub(crate) fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    pub(crate) fn add_pending(&mut self, layer: usize, slot: usize, owners: &[u32]) {
        self.book.add_pending(layer, slot, owners);
    }

    fn check_range(&self, layer: usize, batch_offset: usize, b: usize) -> Result<()> {
        if layer >= self.book.num_layers {
            return Err(bad(
                "layer",
                format!("a layer below {}", self.book.num_layers),
                layer.to_string(),
            ));
        }
        if batch_offset + b > self.book.max_batch {
            return Err(AttnError::CacheCapacity {
                arg: "max_batch".into(),
                capacity: self.book.max_batch,
                needed: batch_offset + b,
            });
        }
        Ok(())
    }

    /// Check a step of `sq` tokens of `layer` into slots `batch_offset .. + b` and return
    /// each slot's global start. `sq == 1` is a decode token (stored by
    /// [`CpCacheBook::decode_owner`]); any other `sq` a prefill, which needs an empty slot
    /// and a multiple of `2 cp` tokens. Nothing changes.
    ///
    /// Errors: [`AttnError::InvalidArgument`] (`layer`; `cache` for a prefill into a slot
    /// that holds tokens; `hidden` for a prefill length that is not a multiple of `2 cp`),
    /// [`AttnError::CacheCapacity`] (`max_batch`; `max_seq` naming the rank, layer and slot
    /// whose own cache would overflow).
    pub fn check_step(
        &self,
        layer: usize,
        batch_offset: usize,
        b: usize,
        sq: usize,
    ) -> Result<Vec<usize>> {
        self.check_range(layer, batch_offset, b)?;
        let (cp, cap) = (self.book.layout.cp_size, self.inner.max_seq());
        let mut starts = Vec::with_capacity(b);
        for slot in batch_offset..batch_offset + b {
            let g = self.book.visible_len(layer, slot);
            let counts = self.book.counts(layer, slot);
            let (rank, need) = if sq == 1 {
                let o = self.book.decode_owner(layer, slot);
                (o, counts[o] + 1)
            } else {
                if g != 0 {
                    return Err(bad(
                        "cache",
                        format!(
                            "an empty batch slot {slot} for a prefill under context parallelism \
                             (continue a sequence with decode steps)"
                        ),
                        format!("a slot holding {g} tokens"),
                    ));
                }
                if !sq.is_multiple_of(2 * cp) {
                    return Err(bad(
                        "hidden",
                        format!(
                            "a prompt length that is a multiple of 2 * cp_size = {}",
                            2 * cp
                        ),
                        sq.to_string(),
                    ));
                }
                (0, sq / cp)
            };
            if need > cap {
                return Err(AttnError::CacheCapacity {
                    arg: format!(
                        "max_seq (context-parallel rank {rank}, layer {layer}, batch slot {slot} \
                         holds {} of {g} tokens)",
                        counts[rank]
                    ),
                    capacity: cap,
                    needed: need,
                });
            }
            starts.push(g);
        }
        Ok(starts)
    }
}

impl<S: CpLocalCache> StaticCache for CpStaticKvCache<S> {
    fn num_layers(&self) -> usize {
        self.inner.num_layers()
    }
    fn max_batch(&self) -> usize {
        self.inner.max_batch()
    }
    /// This rank's capacity per slot (see the module docs).
    fn max_seq(&self) -> usize {
        self.inner.max_seq()
    }
    fn groups(&self) -> usize {
        self.inner.groups()
    }
    fn head_dim(&self) -> usize {
        self.inner.head_dim()
    }
    /// Whole-sequence lengths (the same on every rank).
    fn seqlens(&self) -> &[usize] {
        &self.book.seqlens
    }
    fn check_append(
        &self,
        layer: usize,
        batch_offset: usize,
        b: usize,
        sq: usize,
    ) -> Result<Vec<usize>> {
        self.check_step(layer, batch_offset, b, sq)
    }
    /// Commit a step of `sq` tokens (the whole sequence's count) in every layer: every layer
    /// must have appended the same `sq` tokens to each slot (else `InvalidArgument`
    /// `advance`, nothing changes); this rank's own cache commits the tokens it stored.
    fn advance(&mut self, batch_offset: usize, b: usize, sq: usize) -> Result<()> {
        if batch_offset + b > self.book.max_batch {
            return Err(AttnError::CacheCapacity {
                arg: "max_batch".into(),
                capacity: self.book.max_batch,
                needed: batch_offset + b,
            });
        }
        let me = self.book.layout.cp_rank as u32;
        let mut mine = Vec::with_capacity(b);
        for slot in batch_offset..batch_offset + b {
            let first = self.book.pend(0, slot).to_vec();
            for layer in 0..self.book.num_layers {
                let p = self.book.pend(layer, slot);
                if p.len() != sq || p != first.as_slice() {
                    return Err(bad(
                        "advance",
                        format!(
                            "every layer to have appended the same {sq} tokens to batch slot \
                             {slot}"
                        ),
                        format!("layer {layer} appended {}", p.len()),
                    ));
                }
                let own = p.iter().filter(|&&r| r == me).count();
                let held = self.inner.pending_len(layer, slot)?;
                if held != own {
                    return Err(bad(
                        "advance",
                        format!(
                            "layer {layer}'s own cache to hold {own} new tokens of slot {slot}"
                        ),
                        held.to_string(),
                    ));
                }
            }
            mine.push(first.iter().filter(|&&r| r == me).count());
        }
        // Checked above: none of these can fail.
        for (i, &n) in mine.iter().enumerate() {
            self.inner.advance(batch_offset + i, 1, n)?;
        }
        for slot in batch_offset..batch_offset + b {
            let p = std::mem::take(&mut self.book.pending[slot]);
            self.book.owners[slot].extend(p);
            self.book.seqlens[slot] += sq;
            for layer in 1..self.book.num_layers {
                self.book.pending[layer * self.book.max_batch + slot].clear();
            }
        }
        Ok(())
    }
    fn rollback(&mut self) {
        self.inner.rollback();
        self.book.pending.iter_mut().for_each(Vec::clear);
    }
}

/// The CPU backend of a context-parallel rank: [`CpuBackend`]'s tensors, and static caches
/// that are [`CpStaticKvCache`]s of this rank (`max_seq` is each rank's capacity per slot).
/// Paged caches are [`PagedKvCache`]s (a context-parallel layer refuses paged steps).
#[derive(Debug, Clone, Copy)]
pub struct CpCpuBackend {
    /// The rank the caches are made for.
    pub layout: CpLayout,
}

impl Backend for CpCpuBackend {
    type Tensor = Tensor;
    type StaticCache = CpStaticKvCache<StaticKvCache>;
    type PagedCache = PagedKvCache;
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn upload(&self, t: &Tensor) -> Result<Tensor> {
        CpuBackend.upload(t)
    }
    fn download(&self, t: &Tensor) -> Result<Tensor> {
        CpuBackend.download(t)
    }
    fn shape<'t>(&self, t: &'t Tensor) -> &'t [usize] {
        t.shape()
    }
    fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        CpuBackend.zeros(shape)
    }
    fn copy_rows(
        &self,
        dst: &mut Tensor,
        dst_row: usize,
        src: &Tensor,
        src_row: usize,
        rows: usize,
    ) -> Result<()> {
        CpuBackend.copy_rows(dst, dst_row, src, src_row, rows)
    }
    fn static_cache(
        &self,
        num_layers: usize,
        max_seq: usize,
        max_batch: usize,
        groups: usize,
        head_dim: usize,
    ) -> Result<Self::StaticCache> {
        let inner = StaticKvCache::new(num_layers, max_seq, max_batch, groups, head_dim)?;
        CpStaticKvCache::new(self.layout, inner)
    }
    fn paged_cache(
        &self,
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        groups: usize,
        head_dim: usize,
    ) -> Result<PagedKvCache> {
        CpuBackend.paged_cache(num_layers, num_blocks, block_size, groups, head_dim)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
