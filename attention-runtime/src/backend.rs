//! The backend seam: one set of traits that the CPU reference backend and the CUDA backend
//! both implement, so an engine is written once over [`BackendLayer`] and runs on either.
//!
//! - [`Backend`]: where tensors and KV caches live, with the few tensor operations an engine
//!   needs between layers (upload, download, row copies, caches, synchronize).
//! - [`BackendLayer`]: a layer on a backend: forward (padded and packed), prefill and decode
//!   over a static cache, mixed decode + prefill over a paged cache, each over the backend's
//!   own tensors and caches. The CPU layer is any [`AttentionLayer`] wrapped in [`CpuLayer`];
//!   the CUDA layer is [`CudaLayer`].
//! - [`TrainLayer`]: training (forward with a saved context, backward, delayed weight
//!   gradients, QK-Clip with the layer's own max-logit record), implemented for [`CpuLayer`]
//!   and [`CudaLayer`] (see [`CudaLayer::forward_train_device`] for what the CUDA path saves
//!   and supports).
//! - [`StaticCache`] / [`PagedCache`]: the bookkeeping of both backends' caches.
//!
//! Validation, positions and batch geometry of the cache steps are computed above the seam,
//! once, by [`crate::plan`]; each backend runs the plan with its own kernels.
//!
//! Outputs: every call returns the layer output only; `linear_proj`'s bias, which the
//! reference system returns unadded beside it, is [`BackendLayer::output_bias`].
//!
//! Asynchrony: the CPU backend computes in the call; the CUDA backend queues work on its
//! stream and returns (see [`CudaLayer::forward_device`] for when device errors surface);
//! [`Backend::synchronize`] waits for it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::config::LayerConfig;
use crate::cuda::{
    CudaLayer, CudaRuntime, CudaSaved, DevicePagedKvCache, DeviceStaticKvCache, DeviceTensor,
    ElemType,
};
use crate::error::Result;
use crate::kv_cache::{BlockAllocator, PagedBatch, PagedKvCache, PagedRequest, StaticKvCache};
use crate::layer::{AttentionLayer, ForwardArgs};
use crate::tensor::Tensor;
use crate::train::{BackwardOptions, CpuSaved, LayerGrads, QkClip, QkClipReport, TrainOptions};

/// The bookkeeping of a static KV cache, the same on every backend.
pub trait StaticCache {
    /// Layers in the cache.
    fn num_layers(&self) -> usize;
    /// Batch slots.
    fn max_batch(&self) -> usize;
    /// Positions per slot.
    fn max_seq(&self) -> usize;
    /// Key/value groups.
    fn groups(&self) -> usize;
    /// Head dim.
    fn head_dim(&self) -> usize;
    /// Committed length of every slot `[max_batch]`.
    fn seqlens(&self) -> &[usize];
    /// Each slot's start for `sq` new tokens of `layer` in `batch_offset .. + b`; nothing
    /// changes. Errors: `InvalidArgument` (`layer`), `CacheCapacity`.
    fn check_append(
        &self,
        layer: usize,
        batch_offset: usize,
        b: usize,
        sq: usize,
    ) -> Result<Vec<usize>>;
    /// Commit a step of `sq` tokens in every layer for slots `batch_offset .. + b`.
    fn advance(&mut self, batch_offset: usize, b: usize, sq: usize) -> Result<()>;
    /// Drop every pending (uncommitted) token.
    fn rollback(&mut self);
}

/// The bookkeeping of a paged KV cache (a block pool and its allocator), the same on every
/// backend.
pub trait PagedCache {
    /// Layers in the pool.
    fn num_layers(&self) -> usize;
    /// Tokens per block.
    fn block_size(&self) -> usize;
    /// Blocks in the pool.
    fn num_blocks(&self) -> usize;
    /// Key/value groups.
    fn groups(&self) -> usize;
    /// Head dim.
    fn head_dim(&self) -> usize;
    /// The pool's allocator.
    fn allocator(&self) -> &BlockAllocator;
    /// The pool's allocator, to allocate and free blocks.
    fn allocator_mut(&mut self) -> &mut BlockAllocator;
    /// Check a step of `num_tokens` new tokens against the pool and return its requests
    /// (see [`PagedBatch::validate`]). Nothing changes.
    fn validate(&self, batch: &PagedBatch<'_>, num_tokens: usize) -> Result<Vec<PagedRequest>>;
}

/// Where tensors and caches live, and the tensor operations an engine needs between layers.
pub trait Backend {
    /// The backend's tensor (row-major).
    type Tensor;
    /// The backend's static KV cache.
    type StaticCache: StaticCache;
    /// The backend's paged KV cache.
    type PagedCache: PagedCache;
    /// `"cpu"` or `"cuda"`.
    fn name(&self) -> &'static str;
    /// A host tensor on this backend (the CUDA backend converts to the layer's dtype).
    fn upload(&self, t: &Tensor) -> Result<Self::Tensor>;
    /// A backend tensor on the host in f32 (the CUDA backend synchronizes).
    fn download(&self, t: &Self::Tensor) -> Result<Tensor>;
    /// The tensor's shape.
    fn shape<'t>(&self, t: &'t Self::Tensor) -> &'t [usize];
    /// A zeroed tensor of `shape`.
    fn zeros(&self, shape: &[usize]) -> Result<Self::Tensor>;
    /// A zeroed tensor of `shape` with `like`'s element type (the CUDA backend's parameter
    /// gradients are f32 whatever the layer's dtype). Default: [`zeros`](Self::zeros).
    fn zeros_as(&self, like: &Self::Tensor, shape: &[usize]) -> Result<Self::Tensor> {
        let _ = like;
        self.zeros(shape)
    }
    /// Copy rows `src_row .. src_row + rows` of `src` to rows `dst_row ..` of `dst` (same row
    /// width). Errors: `Shape` (`src`) for ranges outside either tensor or other widths.
    fn copy_rows(
        &self,
        dst: &mut Self::Tensor,
        dst_row: usize,
        src: &Self::Tensor,
        src_row: usize,
        rows: usize,
    ) -> Result<()>;
    /// A zeroed static cache of `num_layers` layers, K and V `[max_seq, max_batch, groups,
    /// head_dim]` each.
    fn static_cache(
        &self,
        num_layers: usize,
        max_seq: usize,
        max_batch: usize,
        groups: usize,
        head_dim: usize,
    ) -> Result<Self::StaticCache>;
    /// A zeroed pool of `num_blocks` blocks of `block_size` tokens per layer.
    fn paged_cache(
        &self,
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        groups: usize,
        head_dim: usize,
    ) -> Result<Self::PagedCache>;
    /// Wait for the queued work (a no-op on the CPU).
    fn synchronize(&self) -> Result<()>;
}

/// A tensor of backend `B`.
pub type BTensor<B> = <B as Backend>::Tensor;

/// An attention layer on a backend: the calls an engine makes, the same on every backend.
///
/// Semantics are the CPU reference's ([`crate::layer::SelfAttentionParts`]); shapes:
/// `hidden` `[s, b, h]` (packed: `[t, h]` with `args.packed`), static-cache steps
/// `[s, b, h]` (decode: `s = 1`), paged steps packed `[T, h]`; the output has the shape of
/// `hidden`. Errors are the backend's typed errors, raised before anything is written.
pub trait BackendLayer {
    /// The backend the layer runs on.
    type Backend: Backend;
    /// The backend, for tensors and caches.
    fn backend(&self) -> Self::Backend;
    /// The resolved config.
    fn layer_config(&self) -> &LayerConfig;
    /// `linear_proj`'s bias `[h]` (returned unadded, as the reference system does).
    fn output_bias(&self) -> Option<&Tensor>;
    /// Forward (padded or packed; self- or cross-attention).
    fn forward(
        &self,
        hidden: &BTensor<Self::Backend>,
        args: &ForwardArgs<'_>,
    ) -> Result<BTensor<Self::Backend>>;
    /// A static-cache step of `s` tokens for slots `batch_offset .. + b` (appends to
    /// `layer`; commit with [`StaticCache::advance`] once every layer appended).
    fn prefill(
        &self,
        hidden: &BTensor<Self::Backend>,
        cache: &mut <Self::Backend as Backend>::StaticCache,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<BTensor<Self::Backend>>;
    /// One decode step: `hidden` `[1, b, h]`.
    fn decode(
        &self,
        hidden: &BTensor<Self::Backend>,
        cache: &mut <Self::Backend as Backend>::StaticCache,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<BTensor<Self::Backend>>;
    /// Mixed decode + prefill over a paged cache: `hidden` packed `[T, h]`.
    fn forward_paged(
        &self,
        hidden: &BTensor<Self::Backend>,
        cache: &mut <Self::Backend as Backend>::PagedCache,
        layer: usize,
        batch: &PagedBatch<'_>,
    ) -> Result<BTensor<Self::Backend>>;
}

/// What a training forward saved, as every backend's context reports it.
pub trait SavedForward {
    /// Per query head the max pre-softmax logit of this one forward, `[np]` (QK-Clip's
    /// statistic). The layer already folded it into its own running record
    /// ([`TrainLayer::max_logit_record`]); this is the per-micro-batch value, e.g. for
    /// logging or for a [`crate::train::QkClip`] the caller keeps.
    fn max_logit(&self) -> &[f32];
    /// Bytes of activations held for the backward (0 once consumed).
    fn saved_bytes(&self) -> usize;
}

/// Training on a backend: a forward that saves what the backward needs, the backward of the
/// whole layer, and the delayed weight gradients (Megatron's `backward_dw`). Implemented for
/// [`CpuLayer`] by [`crate::train`] and for [`CudaLayer`] (its own
/// [`Saved`](Self::Saved) context, [`CudaSaved`]). Shapes and semantics are
/// [`crate::train`]'s.
///
/// QK-Clip ([`crate::train::qk_clip`]) as the reference system does it: the layer keeps the
/// running per-head max of the pre-softmax logits. Every [`forward_train`](Self::forward_train)
/// raises it (over micro-batches, until a clip), [`max_logit_record`](Self::max_logit_record)
/// reads it, and [`clip_qk`](Self::clip_qk) rescales the layer's own `linear_qkv` query and
/// key rows and resets it. The CPU layer keeps the record on the host; the CUDA layer keeps it
/// on the device (no host round trip per forward).
///
/// Misuse is a typed error and changes nothing: a `grad_output` of another shape or dtype
/// ([`crate::AttnError::Shape`] / [`crate::AttnError::DType`]), a backward on a context whose
/// activations were consumed, `backward_dw` before `backward` or twice
/// ([`crate::AttnError::TrainState`]), a clip of a cross-attention layer or with a bad
/// threshold or alpha ([`crate::AttnError::InvalidArgument`]).
pub trait TrainLayer: BackendLayer {
    /// The backend's saved-forward context.
    type Saved: SavedForward;
    /// Forward (as [`BackendLayer::forward`], bitwise the same output) that also returns the
    /// context for [`backward`](Self::backward), and raises the layer's max-logit record by
    /// this forward's per-head max ([`SavedForward::max_logit`]).
    fn forward_train(
        &self,
        hidden: &BTensor<Self::Backend>,
        args: &ForwardArgs<'_>,
        opts: &TrainOptions,
    ) -> Result<(BTensor<Self::Backend>, Self::Saved)>;
    /// Backward from `grad_output` (the output's shape): the input gradient and the parameter
    /// gradients under Megatron names ([`LayerGrads`]). Consumes the saved activations.
    fn backward(
        &self,
        saved: &mut Self::Saved,
        grad_output: &BTensor<Self::Backend>,
        opts: &BackwardOptions,
    ) -> Result<LayerGrads<BTensor<Self::Backend>>>;
    /// The weight gradients a backward with [`BackwardOptions::delay_wgrad`] left pending,
    /// under Megatron names; bitwise equal to the one-step backward's.
    fn backward_dw(
        &self,
        saved: &mut Self::Saved,
    ) -> Result<BTreeMap<String, BTensor<Self::Backend>>>;
    /// The layer's QK-Clip record: per query head `[np]` the max pre-softmax logit
    /// (`q k^T * scale + bias` over visible positions) over every
    /// [`forward_train`](Self::forward_train) since the last [`clip_qk`](Self::clip_qk)
    /// (`-inf` for a head that saw nothing); `None` when no training forward ran since. The
    /// CUDA layer reads it back from the device (synchronizing its stream).
    fn max_logit_record(&self) -> Result<Option<Vec<f32>>>;
    /// QK-Clip on the layer's own `linear_qkv.weight` with its record
    /// ([`crate::train::qk_clip`]): per group `m_g` = the record's max over the group's
    /// heads; when `m_g > threshold`, `eta = threshold / m_g`, the group's query rows times
    /// `eta^alpha`, its key rows times `eta^(1 - alpha)`; value and gate rows and every bias
    /// untouched. Resets the record (also when nothing was clipped; without a record nothing
    /// is clipped). Megatron's defaults: `threshold` 100, `alpha` 0.5.
    ///
    /// Run it between steps, after the backwards of the forwards it covers: a backward reads
    /// the weights its forward ran with.
    ///
    /// Errors (nothing changed): [`crate::AttnError::InvalidArgument`] for a cross-attention
    /// layer (`config.kind`), a `threshold` not finite and > 0, an `alpha` outside `[0, 1]`;
    /// [`crate::AttnError::NoBackendImpl`] (CPU) for a wrapped layer that does not hand out
    /// its `linear_qkv` weight ([`AttentionLayer::linear_qkv_mut`]).
    fn clip_qk(&mut self, threshold: f32, alpha: f32) -> Result<QkClipReport>;
    /// [`clip_qk`](Self::clip_qk) with a record the caller supplies instead of the layer's
    /// own (`[np]` per query head, `None`: nothing observed), for a record reduced across
    /// ranks (a tensor-parallel group whose key/value groups are replicated takes the max
    /// over every replica's heads, [`crate::parallel::TpLayer`]). The layer's own record is
    /// reset as by `clip_qk`.
    ///
    /// Errors (nothing changed): those of `clip_qk`; [`crate::AttnError::InvalidArgument`]
    /// (`record`) for a record of another head count or one holding a NaN.
    fn clip_qk_with_record(
        &mut self,
        record: Option<&[f32]>,
        threshold: f32,
        alpha: f32,
    ) -> Result<QkClipReport>;
}

impl SavedForward for CpuSaved {
    fn max_logit(&self) -> &[f32] {
        CpuSaved::max_logit(self)
    }
    fn saved_bytes(&self) -> usize {
        CpuSaved::saved_bytes(self)
    }
}

impl<L: AttentionLayer> TrainLayer for CpuLayer<L> {
    type Saved = CpuSaved;
    fn forward_train(
        &self,
        hidden: &Tensor,
        args: &ForwardArgs<'_>,
        opts: &TrainOptions,
    ) -> Result<(Tensor, CpuSaved)> {
        let (y, saved) = crate::train::forward_train(&self.0.parts(), hidden, args, opts)?;
        self.record().observe(saved.max_logit())?;
        Ok((y, saved))
    }
    fn backward(
        &self,
        saved: &mut CpuSaved,
        grad_output: &Tensor,
        opts: &BackwardOptions,
    ) -> Result<LayerGrads<Tensor>> {
        crate::train::backward(&self.0.parts(), saved, grad_output, opts)
    }
    fn backward_dw(&self, saved: &mut CpuSaved) -> Result<BTreeMap<String, Tensor>> {
        crate::train::backward_dw(saved)
    }
    fn max_logit_record(&self) -> Result<Option<Vec<f32>>> {
        Ok(self.record().record().map(<[f32]>::to_vec))
    }
    fn clip_qk(&mut self, threshold: f32, alpha: f32) -> Result<QkClipReport> {
        let record = self.1.get_mut().unwrap_or_else(|p| p.into_inner());
        record.clip_layer(&mut self.0, threshold, alpha)
    }
    fn clip_qk_with_record(
        &mut self,
        record: Option<&[f32]>,
        threshold: f32,
        alpha: f32,
    ) -> Result<QkClipReport> {
        let mut given = QkClip::new();
        if let Some(r) = record {
            given.observe(r)?;
        }
        let report = given.clip_layer(&mut self.0, threshold, alpha)?;
        self.1.get_mut().unwrap_or_else(|p| p.into_inner()).reset();
        Ok(report)
    }
}

impl SavedForward for CudaSaved {
    fn max_logit(&self) -> &[f32] {
        CudaSaved::max_logit(self)
    }
    fn saved_bytes(&self) -> usize {
        CudaSaved::saved_bytes(self)
    }
}

/// Training on the GPU: gradients as device tensors, `grad_input` in the
/// layer's dtype and the parameters' in f32 (see [`CudaLayer::forward_train_device`]).
impl TrainLayer for CudaLayer {
    type Saved = CudaSaved;
    fn forward_train(
        &self,
        hidden: &DeviceTensor,
        args: &ForwardArgs<'_>,
        opts: &TrainOptions,
    ) -> Result<(DeviceTensor, CudaSaved)> {
        let (y, saved) = self.forward_train_device(hidden, args, opts)?;
        Ok((y.view(hidden.shape())?, saved))
    }
    fn backward(
        &self,
        saved: &mut CudaSaved,
        grad_output: &DeviceTensor,
        opts: &BackwardOptions,
    ) -> Result<LayerGrads<DeviceTensor>> {
        self.backward_device(saved, grad_output, opts)
    }
    fn backward_dw(&self, saved: &mut CudaSaved) -> Result<BTreeMap<String, DeviceTensor>> {
        self.backward_dw_device(saved)
    }
    fn max_logit_record(&self) -> Result<Option<Vec<f32>>> {
        self.max_logit_record_device()
    }
    fn clip_qk(&mut self, threshold: f32, alpha: f32) -> Result<QkClipReport> {
        self.clip_qk_device(threshold, alpha)
    }
    fn clip_qk_with_record(
        &mut self,
        record: Option<&[f32]>,
        threshold: f32,
        alpha: f32,
    ) -> Result<QkClipReport> {
        self.clip_qk_device_with_record(record, threshold, alpha)
    }
}

impl StaticCache for StaticKvCache {
    fn num_layers(&self) -> usize {
        self.num_layers()
    }
    fn max_batch(&self) -> usize {
        self.max_batch()
    }
    fn max_seq(&self) -> usize {
        self.max_seq()
    }
    fn groups(&self) -> usize {
        self.groups()
    }
    fn head_dim(&self) -> usize {
        self.head_dim()
    }
    fn seqlens(&self) -> &[usize] {
        self.seqlens()
    }
    fn check_append(&self, layer: usize, bo: usize, b: usize, sq: usize) -> Result<Vec<usize>> {
        self.check_append(layer, bo, b, sq)
    }
    fn advance(&mut self, batch_offset: usize, b: usize, sq: usize) -> Result<()> {
        self.advance(batch_offset, b, sq)
    }
    fn rollback(&mut self) {
        self.rollback()
    }
}

impl StaticCache for DeviceStaticKvCache {
    fn num_layers(&self) -> usize {
        self.num_layers()
    }
    fn max_batch(&self) -> usize {
        self.max_batch()
    }
    fn max_seq(&self) -> usize {
        self.max_seq()
    }
    fn groups(&self) -> usize {
        self.groups()
    }
    fn head_dim(&self) -> usize {
        self.head_dim()
    }
    fn seqlens(&self) -> &[usize] {
        self.seqlens()
    }
    fn check_append(&self, layer: usize, bo: usize, b: usize, sq: usize) -> Result<Vec<usize>> {
        self.check_append(layer, bo, b, sq)
    }
    fn advance(&mut self, batch_offset: usize, b: usize, sq: usize) -> Result<()> {
        self.advance(batch_offset, b, sq)
    }
    fn rollback(&mut self) {
        self.rollback()
    }
}

impl PagedCache for PagedKvCache {
    fn num_layers(&self) -> usize {
        self.num_layers()
    }
    fn block_size(&self) -> usize {
        self.block_size()
    }
    fn num_blocks(&self) -> usize {
        self.num_blocks()
    }
    fn groups(&self) -> usize {
        self.groups()
    }
    fn head_dim(&self) -> usize {
        self.head_dim()
    }
    fn allocator(&self) -> &BlockAllocator {
        self.allocator()
    }
    fn allocator_mut(&mut self) -> &mut BlockAllocator {
        self.allocator_mut()
    }
    fn validate(&self, batch: &PagedBatch<'_>, num_tokens: usize) -> Result<Vec<PagedRequest>> {
        batch.validate(self, num_tokens)
    }
}

impl PagedCache for DevicePagedKvCache {
    fn num_layers(&self) -> usize {
        self.num_layers()
    }
    fn block_size(&self) -> usize {
        self.block_size()
    }
    fn num_blocks(&self) -> usize {
        self.num_blocks()
    }
    fn groups(&self) -> usize {
        self.groups()
    }
    fn head_dim(&self) -> usize {
        self.head_dim()
    }
    fn allocator(&self) -> &BlockAllocator {
        self.allocator()
    }
    fn allocator_mut(&mut self) -> &mut BlockAllocator {
        self.allocator_mut()
    }
    fn validate(&self, batch: &PagedBatch<'_>, num_tokens: usize) -> Result<Vec<PagedRequest>> {
        self.validate(batch, num_tokens)
    }
}

/// The CPU reference backend (f32 tensors, f64 accumulation where it matters): the oracle.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    type Tensor = Tensor;
    type StaticCache = StaticKvCache;
    type PagedCache = PagedKvCache;
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn upload(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn download(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn shape<'t>(&self, t: &'t Tensor) -> &'t [usize] {
        t.shape()
    }
    fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::zeros(shape))
    }
    fn copy_rows(
        &self,
        dst: &mut Tensor,
        dst_row: usize,
        src: &Tensor,
        src_row: usize,
        rows: usize,
    ) -> Result<()> {
        let w = crate::tensor::check_row_copy(dst.shape(), src.shape(), dst_row, src_row, rows)?;
        dst.data_mut()[dst_row * w..(dst_row + rows) * w]
            .copy_from_slice(&src.data()[src_row * w..(src_row + rows) * w]);
        Ok(())
    }
    fn static_cache(
        &self,
        num_layers: usize,
        max_seq: usize,
        max_batch: usize,
        groups: usize,
        head_dim: usize,
    ) -> Result<StaticKvCache> {
        StaticKvCache::new(num_layers, max_seq, max_batch, groups, head_dim)
    }
    fn paged_cache(
        &self,
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        groups: usize,
        head_dim: usize,
    ) -> Result<PagedKvCache> {
        PagedKvCache::new(num_layers, num_blocks, block_size, groups, head_dim)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

/// Any [`AttentionLayer`] (a struct generated by `#[attention]`, a
/// [`SpecLayer`](crate::spec_layer::SpecLayer)) on the CPU reference backend, with the
/// layer's QK-Clip record (a [`QkClip`] that [`TrainLayer::forward_train`] raises and
/// [`TrainLayer::clip_qk`] consumes).
#[derive(Debug)]
pub struct CpuLayer<L>(pub L, Mutex<QkClip>);

impl<L: Clone> Clone for CpuLayer<L> {
    /// The layer and its QK-Clip record.
    fn clone(&self) -> Self {
        CpuLayer(self.0.clone(), Mutex::new(self.record().clone()))
    }
}

impl<L> CpuLayer<L> {
    fn record(&self) -> std::sync::MutexGuard<'_, QkClip> {
        self.1.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<L: AttentionLayer> CpuLayer<L> {
    /// Wrap `layer` (with an empty QK-Clip record).
    pub fn new(layer: L) -> Self {
        CpuLayer(layer, Mutex::new(QkClip::new()))
    }

    /// The wrapped layer.
    pub fn inner(&self) -> &L {
        &self.0
    }
    /// The wrapped layer, unwrapped.
    pub fn into_inner(self) -> L {
        self.0
    }
}

impl<L: AttentionLayer> BackendLayer for CpuLayer<L> {
    type Backend = CpuBackend;
    fn backend(&self) -> CpuBackend {
        CpuBackend
    }
    fn layer_config(&self) -> &LayerConfig {
        self.0.config()
    }
    fn output_bias(&self) -> Option<&Tensor> {
        self.0.parts().output_bias()
    }
    fn forward(&self, hidden: &Tensor, args: &ForwardArgs<'_>) -> Result<Tensor> {
        Ok(self.0.forward(hidden, args)?.output)
    }
    fn prefill(
        &self,
        hidden: &Tensor,
        cache: &mut StaticKvCache,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<Tensor> {
        Ok(self
            .0
            .prefill(hidden, cache, layer, batch_offset, args)?
            .output)
    }
    fn decode(
        &self,
        hidden: &Tensor,
        cache: &mut StaticKvCache,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<Tensor> {
        Ok(self
            .0
            .decode(hidden, cache, layer, batch_offset, args)?
            .output)
    }
    fn forward_paged(
        &self,
        hidden: &Tensor,
        cache: &mut PagedKvCache,
        layer: usize,
        batch: &PagedBatch<'_>,
    ) -> Result<Tensor> {
        Ok(self.0.forward_paged(hidden, cache, layer, batch)?.output)
    }
}

/// The CUDA backend: device tensors in the layer's dtype on the runtime's stream.
#[derive(Debug, Clone)]
pub struct CudaBackend {
    rt: Arc<CudaRuntime>,
    elem: ElemType,
}

impl CudaBackend {
    /// The backend of `rt` with tensors of `elem`.
    pub fn new(rt: Arc<CudaRuntime>, elem: ElemType) -> Self {
        CudaBackend { rt, elem }
    }
    /// The runtime (device, stream, cuBLASLt, kernels).
    pub fn runtime(&self) -> &Arc<CudaRuntime> {
        &self.rt
    }
    /// The element type of the tensors it makes.
    pub fn elem(&self) -> ElemType {
        self.elem
    }
}

impl Backend for CudaBackend {
    type Tensor = DeviceTensor;
    type StaticCache = DeviceStaticKvCache;
    type PagedCache = DevicePagedKvCache;
    fn name(&self) -> &'static str {
        "cuda"
    }
    fn upload(&self, t: &Tensor) -> Result<DeviceTensor> {
        DeviceTensor::from_host(self.rt.stream(), t, self.elem)
    }
    fn download(&self, t: &DeviceTensor) -> Result<Tensor> {
        t.to_host()
    }
    fn shape<'t>(&self, t: &'t DeviceTensor) -> &'t [usize] {
        t.shape()
    }
    fn zeros(&self, shape: &[usize]) -> Result<DeviceTensor> {
        crate::cuda::kv_cache::zeros(self.rt.stream(), self.elem, shape)
    }
    fn zeros_as(&self, like: &DeviceTensor, shape: &[usize]) -> Result<DeviceTensor> {
        crate::cuda::kv_cache::zeros(self.rt.stream(), like.elem(), shape)
    }
    fn copy_rows(
        &self,
        dst: &mut DeviceTensor,
        dst_row: usize,
        src: &DeviceTensor,
        src_row: usize,
        rows: usize,
    ) -> Result<()> {
        dst.copy_rows_from(self.rt.stream(), dst_row, src, src_row, rows)
    }
    fn static_cache(
        &self,
        num_layers: usize,
        max_seq: usize,
        max_batch: usize,
        groups: usize,
        head_dim: usize,
    ) -> Result<DeviceStaticKvCache> {
        DeviceStaticKvCache::new(
            self.rt.stream(),
            self.elem,
            num_layers,
            max_seq,
            max_batch,
            groups,
            head_dim,
        )
    }
    fn paged_cache(
        &self,
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        groups: usize,
        head_dim: usize,
    ) -> Result<DevicePagedKvCache> {
        DevicePagedKvCache::new(
            self.rt.stream(),
            self.elem,
            num_layers,
            num_blocks,
            block_size,
            groups,
            head_dim,
        )
    }
    fn synchronize(&self) -> Result<()> {
        self.rt.synchronize("CudaBackend::synchronize")
    }
}

impl BackendLayer for CudaLayer {
    type Backend = CudaBackend;
    fn backend(&self) -> CudaBackend {
        CudaBackend::new(self.runtime().clone(), self.elem())
    }
    fn layer_config(&self) -> &LayerConfig {
        self.config()
    }
    fn output_bias(&self) -> Option<&Tensor> {
        self.output_bias()
    }
    fn forward(&self, hidden: &DeviceTensor, args: &ForwardArgs<'_>) -> Result<DeviceTensor> {
        self.forward_device(hidden, args)?.0.view(hidden.shape())
    }
    fn prefill(
        &self,
        hidden: &DeviceTensor,
        cache: &mut DeviceStaticKvCache,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<DeviceTensor> {
        self.prefill_device(hidden, cache, layer, batch_offset, args)?
            .view(hidden.shape())
    }
    fn decode(
        &self,
        hidden: &DeviceTensor,
        cache: &mut DeviceStaticKvCache,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<DeviceTensor> {
        // The seam's decode is one token (`[1, b, h]`), as the CPU backend's; multi-token
        // steps go through `prefill` (which takes the same fused kernel up to 16 tokens).
        if !matches!(hidden.shape(), [1, _, _]) {
            return Err(crate::error::AttnError::Shape {
                arg: "hidden".into(),
                expected: "[1, b, h] (one token; use prefill for several)".into(),
                got: hidden.shape().to_vec(),
            });
        }
        self.decode_device(hidden, cache, layer, batch_offset, args)?
            .view(hidden.shape())
    }
    fn forward_paged(
        &self,
        hidden: &DeviceTensor,
        cache: &mut DevicePagedKvCache,
        layer: usize,
        batch: &PagedBatch<'_>,
    ) -> Result<DeviceTensor> {
        self.forward_paged_device(hidden, cache, layer, batch)
    }
}
