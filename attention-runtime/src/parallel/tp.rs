//! [`TpLayer`]: one tensor-parallel rank of an attention layer, on any backend.
//!
//! The rank's layer is the whole layer's shard ([`super::tp_load`]): its own heads and
//! groups, so its output is its heads' share of `linear_proj`'s product (row-parallel). The
//! shares are summed over the group: an all-reduce, or with sequence parallelism a
//! reduce-scatter along the sequence, the input then being this rank's sequence slice,
//! all-gathered before `linear_qkv` (Megatron-Core's `sequence_parallel`).
//!
//! `TpLayer` is itself a [`BackendLayer`] (and a [`TrainLayer`](crate::backend::TrainLayer)
//! when the rank's layer is, [`super::tp_train`]), so an engine drives it as it drives one
//! GPU: a [`CpuLayer`](crate::backend::CpuLayer) with [`super::InProcessComm`], or a
//! [`CudaLayer`](crate::cuda::CudaLayer) with [`super::NcclComm`]. KV caches are the rank's
//! own (its groups only: make them with the rank's config).
//!
//! Every rank must call with the same shapes and arguments: the collectives compare element
//! counts at most (the in-process communicator) and a call differing in shape only is not
//! detected. Errors: a rank's own checks fail before anything is written, as on one GPU; but
//! a cache step (`prefill`, `decode`, `forward_paged`) whose *peer* fails returns the
//! collective's error after this rank appended its keys and values, which stay **pending**:
//! after a failed step call [`StaticCache::rollback`](crate::backend::StaticCache::rollback)
//! on every rank, as after any failed multi-layer step (paged: the rows written lie past
//! each request's length, in its own blocks; do not count them). (An agreement before each step would avoid it at the cost of a host round trip per
//! decode step; the context-parallel steps, which exchange a description anyway, do agree
//! first.)

use super::comm::Communicator;
use super::tp_shard::TpPlan;
use crate::backend::{BTensor, Backend, BackendLayer};
use crate::config::LayerConfig;
use crate::error::{AttnError, Result};
use crate::kv_cache::PagedBatch;
use crate::layer::ForwardArgs;
use crate::tensor::Tensor;

/// One rank of a tensor-parallel layer: the rank's shard `layer` and the group's `comm`.
#[derive(Debug)]
pub struct TpLayer<L, C> {
    pub(crate) layer: L,
    pub(crate) comm: C,
    pub(crate) plan: TpPlan,
    pub(crate) sequence_parallel: bool,
}

impl<L, C> TpLayer<L, C>
where
    L: BackendLayer,
    C: Communicator<Tensor = BTensor<L::Backend>>,
{
    /// Rank `comm.rank()` of a layer of `full` (the whole layer's config) split over
    /// `comm.world_size()` ranks; `layer` must be that rank's shard. With
    /// `sequence_parallel`, [`forward`](BackendLayer::forward) takes and returns this rank's
    /// slice of the sequence (`[s / tp, b, h]`, packed `[t / tp, h]`).
    ///
    /// Errors: those of [`TpPlan::new`]; [`AttnError::InvalidArgument`] (`layer`) when the
    /// shard's heads, groups, head dim or hidden size are not this rank's (a shard made for
    /// another `tp_size`: mismatched world sizes).
    pub fn new(layer: L, comm: C, full: &LayerConfig, sequence_parallel: bool) -> Result<Self> {
        let plan = TpPlan::new(full, comm.rank(), comm.world_size())?;
        let want = plan.config(full)?;
        let got = layer.layer_config();
        let dims = |c: &LayerConfig| {
            format!(
                "heads = {}, groups = {}, head_dim = {}, hidden = {}",
                c.heads, c.groups, c.head_dim, c.hidden
            )
        };
        if dims(got) != dims(&want) || got.kind != want.kind {
            return Err(AttnError::InvalidArgument {
                arg: "layer".into(),
                expected: format!(
                    "tp_rank {}'s shard at tp_size = {}: {}",
                    plan.tp_rank,
                    plan.tp_size,
                    dims(&want)
                ),
                got: dims(got),
            });
        }
        Ok(TpLayer {
            layer,
            comm,
            plan,
            sequence_parallel,
        })
    }

    /// The rank's share.
    pub fn plan(&self) -> &TpPlan {
        &self.plan
    }
    /// `tp_rank`.
    pub fn tp_rank(&self) -> usize {
        self.plan.tp_rank
    }
    /// `tp_size`.
    pub fn tp_size(&self) -> usize {
        self.plan.tp_size
    }
    /// Whether sequence parallelism is on.
    pub fn sequence_parallel(&self) -> bool {
        self.sequence_parallel
    }
    /// The rank's layer.
    pub fn inner(&self) -> &L {
        &self.layer
    }
    /// The communicator.
    pub fn comm(&self) -> &C {
        &self.comm
    }

    /// With sequence parallelism: this rank's slice -> the whole sequence (all-gather
    /// along dim 0). Without: `None` (use `hidden` as it is).
    pub(crate) fn gather_seq(
        &self,
        arg: &str,
        t: &BTensor<L::Backend>,
    ) -> Result<Option<BTensor<L::Backend>>> {
        if !self.sequence_parallel {
            return Ok(None);
        }
        let be = self.layer.backend();
        let mut shape = be.shape(t).to_vec();
        if shape.is_empty() {
            return Err(AttnError::Shape {
                arg: arg.into(),
                expected: "[s / tp_size, ...]".into(),
                got: shape,
            });
        }
        shape[0] *= self.plan.tp_size;
        let mut full = be.zeros_as(t, &shape)?;
        self.comm.all_gather(t, &mut full)?;
        Ok(Some(full))
    }

    /// Sum the ranks' shares of `y`: all-reduce, or reduce-scatter along dim 0 with
    /// sequence parallelism (`split_seq`).
    pub(crate) fn reduce(
        &self,
        mut y: BTensor<L::Backend>,
        split_seq: bool,
    ) -> Result<BTensor<L::Backend>> {
        if !split_seq {
            self.comm.all_reduce_sum(&mut y)?;
            return Ok(y);
        }
        let be = self.layer.backend();
        let mut shape = be.shape(&y).to_vec();
        shape[0] /= self.plan.tp_size;
        let mut out = be.zeros_as(&y, &shape)?;
        self.comm.reduce_scatter_sum(&y, &mut out)?;
        Ok(out)
    }

    fn no_sp(&self, what: &str) -> Result<()> {
        if self.sequence_parallel {
            return Err(AttnError::InvalidArgument {
                arg: "sequence_parallel".into(),
                expected: format!(
                    "off for {what} (KV-cache steps take the whole sequence on every rank)"
                ),
                got: "on".into(),
            });
        }
        Ok(())
    }
}

impl<L, C> BackendLayer for TpLayer<L, C>
where
    L: BackendLayer,
    C: Communicator<Tensor = BTensor<L::Backend>>,
{
    type Backend = L::Backend;
    fn backend(&self) -> L::Backend {
        self.layer.backend()
    }
    /// The rank's config (its heads and groups).
    fn layer_config(&self) -> &LayerConfig {
        self.layer.layer_config()
    }
    fn output_bias(&self) -> Option<&Tensor> {
        self.layer.output_bias()
    }
    fn forward(
        &self,
        hidden: &BTensor<L::Backend>,
        args: &ForwardArgs<'_>,
    ) -> Result<BTensor<L::Backend>> {
        let full = self.gather_seq("hidden", hidden)?;
        let y = self.layer.forward(full.as_ref().unwrap_or(hidden), args)?;
        self.reduce(y, self.sequence_parallel)
    }
    fn prefill(
        &self,
        hidden: &BTensor<L::Backend>,
        cache: &mut <L::Backend as Backend>::StaticCache,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<BTensor<L::Backend>> {
        self.no_sp("prefill")?;
        let y = self
            .layer
            .prefill(hidden, cache, layer, batch_offset, args)?;
        self.reduce(y, false)
    }
    fn decode(
        &self,
        hidden: &BTensor<L::Backend>,
        cache: &mut <L::Backend as Backend>::StaticCache,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<BTensor<L::Backend>> {
        self.no_sp("decode")?;
        let y = self
            .layer
            .decode(hidden, cache, layer, batch_offset, args)?;
        self.reduce(y, false)
    }
    fn forward_paged(
        &self,
        hidden: &BTensor<L::Backend>,
        cache: &mut <L::Backend as Backend>::PagedCache,
        layer: usize,
        batch: &PagedBatch<'_>,
    ) -> Result<BTensor<L::Backend>> {
        self.no_sp("forward_paged")?;
        let y = self.layer.forward_paged(hidden, cache, layer, batch)?;
        self.reduce(y, false)
    }
}
