//! [`CpCudaLayer`]: one context-parallel rank of a self-attention layer on a GPU, over device
//! tensors end to end, the CUDA counterpart of [`super::CpLayer`] (same inputs, layouts,
//! masks and errors; see [`super::cp_call`]).
//!
//! The rank holds its tokens (chunks `r` and `2 cp - 1 - r` of every sequence) and the whole
//! layer ([`CudaLayer`]). `linear_qkv`, q/k norm, rope (at each token's position in its whole
//! sequence) and `linear_proj` run on its own rows; core attention exchanges K/V (or heads)
//! over the communicator ([`super::NcclComm`] in practice) by `cp_comm_type`
//! (`parallel/cp_cuda_core.rs`), on the existing forward kernels with the masks of
//! [`super::cp_plan`] and the LSE merge of [`crate::cuda::cp_kernels`].
//!
//! Every call first prepares everything that can fail before its first collective: the host
//! checks ([`CpCall`]), the plan and its kernels (compiled on a cache miss), the helper
//! kernels, the index tables, the exchange buffers and (`p2p`, `all_gather`) the f32 result
//! or (`a2a`) the attention output. Then every rank, prepared or failed, takes part in
//! [`agree_ready`] (one small all-gather of bytes, which waits
//! for the rank's stream): a rank that failed returns its error, its peers an
//! [`AttnError::Collective`] naming it, and a call that differs between ranks is an
//! [`AttnError::RankMismatch`] everywhere; nobody waits for a peer that has given up, and the
//! communicator's timeout never counts a peer's kernel compilation. Then it queues its work
//! without waiting (with the communicator's timeout, each collective waits for its
//! completion). What can still fail after that on one rank only (an allocation of the
//! projection, of a per-launch partial or of the layer's output; a launch) leaves its
//! peers in their next collective: bounded by the communicator's timeout, unbounded without.
//!
//! Streams: the layer's kernels run on its runtime's stream, which must be the stream the
//! communicator orders its collectives with ([`DeviceCommunicator::caller_stream`], checked by
//! [`CpCudaLayer::new`]; the layer cannot change runtime afterwards). The `p2p` ring's
//! exchanges run on the communicator's own stream, overlapped with the attention of the
//! block before ([`super::cp_ring`]; [`CpCudaLayer::set_overlap`] turns it off).
//!
//! Forward, and static-cache prefill and decode with each rank caching its own tokens
//! (`parallel/cp_cuda_cache.rs`); paged steps are refused. The training forward and backward
//! are in `parallel/cp_cuda_backward.rs`. A non-finite V element at a key that
//! some query's mask hides can still reach that query's row here (the single-GPU forward
//! guards it with `qkv_prep`'s `v_nonfinite` flag, which is per rank).

use super::cp_cache::CpStaticKvCache;
use super::cp_call::{agree_ready, CpCall};
use super::cp_cuda_cache::CpCudaBackend;
use super::cp_cuda_core::{by_kv, ulysses, Buffers, Plan};
use super::cp_layout::CpLayout;
use super::nccl::DeviceCommunicator;
use super::CpCommType;
use crate::backend::BackendLayer;
use crate::config::LayerConfig;
use crate::cuda::cp_kernels::{upload_index, LoadedCp, RowIndex};
use crate::cuda::{CudaLayer, DevicePagedKvCache, DeviceStaticKvCache, DeviceTensor};
use crate::error::{AttnError, Result};
use crate::kv_cache::PagedBatch;
use crate::layer::{ForwardArgs, LayerOutput};
use crate::tensor::Tensor;

use attention_codegen::AttentionKind;

fn bad(arg: &str, expected: impl Into<String>, got: impl Into<String>) -> AttnError {
    AttnError::InvalidArgument {
        arg: arg.into(),
        expected: expected.into(),
        got: got.into(),
    }
}

/// One rank of a context-parallel layer on a GPU: the whole layer, the context-parallel
/// group's `comm` (over device tensors) and `cp_comm_type`.
#[derive(Debug)]
pub struct CpCudaLayer<C> {
    layer: CudaLayer,
    comm: C,
    layout: CpLayout,
    comm_type: CpCommType,
    overlap: bool,
}

/// Everything a rank prepares for one call before its first collective.
struct Prepared {
    call: CpCall,
    /// `None` when the rank has no rows.
    work: Option<Work>,
}

struct Work {
    plan: Plan,
    h: LoadedCp,
    /// Padded with `b > 1`: the gathers to batch-major rows and back.
    reorder: Option<(RowIndex, RowIndex)>,
    bufs: Buffers,
}

impl<C: DeviceCommunicator> CpCudaLayer<C> {
    /// Rank `comm.rank()` of `comm.world_size()` (`cp_size`) of `layer`; the `p2p` ring
    /// overlaps its exchanges with compute.
    ///
    /// Errors: [`AttnError::InvalidArgument`] for a cross-attention layer (`config.kind`), with
    /// `a2a` when `cp_size` does not divide the heads or the groups (`cp_size`), or for a
    /// communicator whose collectives are ordered with another stream than the layer's
    /// (`comm`: make it with the layer's runtime); those of [`CpLayout::new`].
    pub fn new(layer: CudaLayer, comm: C, cp_comm_type: CpCommType) -> Result<Self> {
        let cfg = layer.config();
        let (ls, cs) = (layer.runtime().stream(), comm.caller_stream());
        // The same device's context and the same stream (a default stream's handle is null
        // on every device).
        if ls.context().ordinal() != cs.context().ordinal() || ls.cu_stream() != cs.cu_stream() {
            return Err(bad(
                "comm",
                format!(
                    "a communicator ordered with the layer's stream (device {}'s runtime the \
                     layer runs on)",
                    layer.runtime().device().ordinal
                ),
                format!(
                    "one ordered with another stream (device {})",
                    cs.context().ordinal()
                ),
            ));
        }
        if cfg.kind != AttentionKind::SelfAttention {
            return Err(bad(
                "config.kind",
                "self-attention under context parallelism",
                "cross-attention",
            ));
        }
        let layout = CpLayout::new(comm.rank(), comm.world_size())?;
        let cp = layout.cp_size;
        if cp_comm_type == CpCommType::A2a
            && (!cfg.heads.is_multiple_of(cp) || !cfg.groups.is_multiple_of(cp))
        {
            return Err(bad(
                "cp_size",
                format!(
                    "a divisor of heads = {} and groups = {} for cp_comm_type a2a",
                    cfg.heads, cfg.groups
                ),
                cp.to_string(),
            ));
        }
        Ok(CpCudaLayer {
            layer,
            comm,
            layout,
            comm_type: cp_comm_type,
            overlap: true,
        })
    }

    /// Overlap the `p2p` ring's exchanges with compute (`true`, the default) or run them one
    /// after the other (`false`): the same launches in the same order, so both give bitwise
    /// the same output (see [`super::cp_ring`]).
    pub fn set_overlap(&mut self, on: bool) {
        self.overlap = on;
    }

    /// Whether the `p2p` ring overlaps its exchanges with compute.
    pub fn overlap(&self) -> bool {
        self.overlap
    }

    /// This rank's layout.
    pub fn layout(&self) -> &CpLayout {
        &self.layout
    }
    /// The layer.
    pub fn inner(&self) -> &CudaLayer {
        &self.layer
    }
    /// The communicator.
    pub fn comm(&self) -> &C {
        &self.comm
    }
    /// The exchange.
    pub fn cp_comm_type(&self) -> CpCommType {
        self.comm_type
    }

    /// Forward of this rank's rows on device tensors: `hidden` `[s / cp, b, h]` (padded) or
    /// `[t / cp, h]` with `args.packed` (the whole batch's `cu_seqlens_q`), in the layer's
    /// dtype; returns this rank's output rows `[s / cp * b, h]` (or `[t / cp, h]`), bias
    /// unadded ([`CudaLayer::output_bias`]). Every rank of the group must call it with the
    /// same geometry.
    ///
    /// Errors: those of [`CpCall::new`] and [`agree_ready`] (a peer that failed, a call that
    /// differs); [`AttnError::InvalidArgument`] / [`AttnError::DType`] for `hidden` on another
    /// device or of another dtype; [`AttnError::Collective`] when an exchange fails or times
    /// out (the communicator is then broken); device errors.
    pub fn forward_device(
        &self,
        hidden: &DeviceTensor,
        args: &ForwardArgs<'_>,
    ) -> Result<DeviceTensor> {
        let cfg = self.layer.config();
        let local = self.prepare(hidden, args);
        let Prepared { call, work } = agree_ready(&self.comm, local, |p| {
            p.call.descriptor(self.layout.cp_size, self.comm_type, cfg)
        })?;
        let t = call.rows();
        let Some(Work {
            plan,
            h,
            reorder,
            bufs,
        }) = work
        else {
            return self.layer.cp_alloc(&[0, cfg.hidden], "output");
        };
        let st = self.layer.runtime().stream();
        let x = match &reorder {
            Some((fwd, _)) => {
                let mut x = self
                    .layer
                    .cp_alloc(&[t, cfg.hidden], "hidden (batch-major)")?;
                h.gather_rows(st, hidden, &mut x, fwd)?;
                Some(x)
            }
            None => None,
        };
        let qkv = self.layer.cp_project(
            x.as_ref().unwrap_or(hidden),
            &call.positions,
            args.rope_mscale,
        )?;
        drop(x);
        let (layer, comm, layout) = (&self.layer, &self.comm, self.layout);
        let o = match (&plan, bufs) {
            (Plan::Ulysses(kern, tab), Buffers::Ulysses(b)) => {
                ulysses(layer, comm, layout, &call, (kern, tab), &qkv, *b, &h)?
            }
            (_, Buffers::ByKv(b)) => by_kv(
                layer,
                comm,
                (layout, self.overlap),
                &call,
                &plan,
                *b,
                &qkv,
                &h,
            )?,
            _ => {
                return Err(AttnError::Render(
                    "context parallel: a plan with another plan's buffers".into(),
                ))
            }
        };
        drop(qkv);
        let y = self.layer.cp_output(o)?;
        match &reorder {
            Some((_, inv)) => {
                let mut out = self.layer.cp_alloc(&[t, cfg.hidden], "output")?;
                h.gather_rows(st, &y, &mut out, inv)?;
                Ok(out)
            }
            None => Ok(y),
        }
    }

    /// Everything of one call that can fail before its first collective (see the module
    /// docs): the checks, the plan, the kernels, the index tables, the exchange buffers.
    fn prepare(&self, hidden: &DeviceTensor, args: &ForwardArgs<'_>) -> Result<Prepared> {
        let cfg = self.layer.config();
        let call = CpCall::new(
            self.layout,
            hidden.shape(),
            cfg.hidden,
            args,
            cfg.mask,
            cfg.window,
        )?;
        self.layer.check_input("hidden", hidden)?;
        let t = call.rows();
        if t == 0 {
            return Ok(Prepared { call, work: None });
        }
        let plan = Plan::new(&self.layer, self.layout, &call, self.comm_type)?;
        let h = self.layer.cp_helpers()?;
        let st = self.layer.runtime().stream();
        let reorder = match call.padded {
            Some((s, b)) if b > 1 => Some((
                upload_index(st, &super::cp_plan::batch_major_index(s, b, false), s * b)?,
                upload_index(st, &super::cp_plan::batch_major_index(s, b, true), s * b)?,
            )),
            _ => None,
        };
        let bufs = plan.buffers(&self.layer, self.layout.cp_size, t, &h)?;
        Ok(Prepared {
            call,
            work: Some(Work {
                plan,
                h,
                reorder,
                bufs,
            }),
        })
    }

    /// [`forward_device`](Self::forward_device) with host tensors in and out (the output in
    /// `hidden`'s shape) and `linear_proj`'s bias, as [`super::CpLayer::forward`] returns.
    pub fn forward(&self, hidden: &Tensor, args: &ForwardArgs<'_>) -> Result<LayerOutput> {
        let x = DeviceTensor::from_host(self.layer.runtime().stream(), hidden, self.layer.elem())?;
        let y = self.forward_device(&x, args)?;
        Ok(LayerOutput {
            output: y.to_host()?.reshape(hidden.shape())?,
            bias: self.layer.output_bias().cloned(),
        })
    }

    fn no_cache(&self, what: &str) -> AttnError {
        bad(
            "context parallel",
            format!("forward or a static KV cache ({what} over a paged cache is not implemented)"),
            what,
        )
    }
}

/// The CUDA backend seam: forward, static-cache prefill and decode (paged steps refused).
impl<C: DeviceCommunicator> BackendLayer for CpCudaLayer<C> {
    type Backend = CpCudaBackend;
    fn backend(&self) -> CpCudaBackend {
        self.cp_backend()
    }
    fn layer_config(&self) -> &LayerConfig {
        self.layer.config()
    }
    fn output_bias(&self) -> Option<&Tensor> {
        self.layer.output_bias()
    }
    fn forward(&self, hidden: &DeviceTensor, args: &ForwardArgs<'_>) -> Result<DeviceTensor> {
        self.forward_device(hidden, args)?.view(hidden.shape())
    }
    /// [`CpCudaLayer::prefill_cp`] (`parallel/cp_cuda_cache.rs`).
    fn prefill(
        &self,
        hidden: &DeviceTensor,
        cache: &mut CpStaticKvCache<DeviceStaticKvCache>,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<DeviceTensor> {
        self.prefill_cp(hidden, cache, layer, batch_offset, args)
    }
    /// [`CpCudaLayer::decode_cp`] (`parallel/cp_cuda_cache.rs`).
    fn decode(
        &self,
        hidden: &DeviceTensor,
        cache: &mut CpStaticKvCache<DeviceStaticKvCache>,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<DeviceTensor> {
        self.decode_cp(hidden, cache, layer, batch_offset, args)
    }
    fn forward_paged(
        &self,
        _: &DeviceTensor,
        _: &mut DevicePagedKvCache,
        _: usize,
        _: &PagedBatch<'_>,
    ) -> Result<DeviceTensor> {
        Err(self.no_cache("forward_paged"))
    }
}
