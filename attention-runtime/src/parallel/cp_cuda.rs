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
//! Every call first checks on the host that every rank makes the same call
//! ([`super::cp_call::agree`]: one small all-gather of bytes, which waits for the rank's
//! stream), then queues its work without waiting (with the communicator's timeout, each
//! collective waits for its completion).
//!
//! Forward, and static-cache prefill and decode with each rank caching its own tokens
//! (`parallel/cp_cuda_cache.rs`); paged steps are refused, and there is no training
//! backward under context parallelism on the GPU yet. A non-finite V element at a key that
//! some query's mask hides can still reach that query's row here (the single-GPU forward
//! guards it with `qkv_prep`'s `v_nonfinite` flag, which is per rank).

use super::comm::Communicator;
use super::cp_cache::CpStaticKvCache;
use super::cp_call::{agree, CpCall};
use super::cp_cuda_cache::CpCudaBackend;
use super::cp_cuda_core::{by_kv, ulysses, Plan};
use super::cp_layout::CpLayout;
use super::CpCommType;
use crate::backend::BackendLayer;
use crate::config::LayerConfig;
use crate::cuda::cp_kernels::upload_index;
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
}

impl<C: Communicator<Tensor = DeviceTensor>> CpCudaLayer<C> {
    /// Rank `comm.rank()` of `comm.world_size()` (`cp_size`) of `layer`.
    ///
    /// Errors: [`AttnError::InvalidArgument`] for a cross-attention layer (`config.kind`), or
    /// with `a2a` when `cp_size` does not divide the heads or the groups (`cp_size`); those of
    /// [`CpLayout::new`].
    pub fn new(layer: CudaLayer, comm: C, cp_comm_type: CpCommType) -> Result<Self> {
        let cfg = layer.config();
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
        })
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
    /// Errors: those of [`CpCall::new`] and [`agree`]; [`AttnError::InvalidArgument`] /
    /// [`AttnError::DType`] for `hidden` on another device or of another dtype;
    /// [`AttnError::Collective`] when an exchange fails; device errors.
    pub fn forward_device(
        &self,
        hidden: &DeviceTensor,
        args: &ForwardArgs<'_>,
    ) -> Result<DeviceTensor> {
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
        agree(
            &self.comm,
            &call.descriptor(self.layout.cp_size, self.comm_type, cfg),
        )?;
        let t = call.rows();
        if t == 0 {
            return self.layer.cp_alloc(&[0, cfg.hidden], "output");
        }
        // Everything that can fail on the host before anything is queued: the plan, its
        // kernels, the helpers.
        let plan = Plan::new(&self.layer, self.layout, &call, self.comm_type)?;
        let h = self.layer.cp_helpers()?;
        let st = self.layer.runtime().stream();
        // Padded with b > 1: batch-major rows.
        let reorder = match call.padded {
            Some((s, b)) if b > 1 => Some((
                upload_index(st, &super::cp_plan::batch_major_index(s, b, false), s * b)?,
                upload_index(st, &super::cp_plan::batch_major_index(s, b, true), s * b)?,
            )),
            _ => None,
        };
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
        let o = match &plan {
            Plan::Ulysses(kern, tab) => ulysses(layer, comm, layout, &call, (kern, tab), &qkv, &h)?,
            _ => by_kv(layer, comm, layout, &call, &plan, &qkv, &h)?,
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
impl<C: Communicator<Tensor = DeviceTensor>> BackendLayer for CpCudaLayer<C> {
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
