//! Static-cache prefill and decode of a [`CpCudaLayer`] on device tensors: the GPU
//! counterpart of [`super::cp_cache_step`] (same inputs, owner rule, visibility, agreement and
//! errors; see there and [`super::cp_cache`]). Each rank's device cache
//! ([`DeviceStaticKvCache`], inside a [`CpStaticKvCache`]) holds the tokens it owns.
//!
//! - **Prefill**: the context-parallel forward of the rank's rows
//!   ([`CpCudaLayer::forward_device`], causal with the layer's window), then `linear_qkv` and
//!   `qkv_prep` of the same rows once more for the keys and values to store (the forward does
//!   not hand its own out; an extra projection of the prompt rows), appended to the rank's
//!   cache.
//! - **Decode**: q/k/v of the new token on every rank; the keys of each slot that the rank
//!   holds and the query sees (with a window, a suffix of its cached keys: positions are
//!   increasing) are gathered from the cache, with the new token's key on the rank that
//!   stores it, and attended by the forward kernel with no mask, writing its LSE
//!   ([`crate::cuda::CudaLayer`]'s `cp_cache_partial`); the partials (rounded to the
//!   layer's dtype, as the forward's are) and their f32 LSEs are all-gathered (two NCCL
//!   all-gathers) and merged in f32 in rank order on every rank (the same bits everywhere); sinks and the output gate once; `linear_proj`. The new key and value
//!   are appended on their owner last, after everything else was queued.
//!
//! The step's agreement ([`Communicator::all_gather_bytes`](crate::parallel::Communicator::all_gather_bytes)) waits for the rank's stream.

use std::ops::Range;

use attention_codegen::MaskType;

use super::cp_cache::{CpLocalCache, CpStaticKvCache};
use super::cp_cache_step::{agree, step_meta};
use super::cp_cuda::CpCudaLayer;
use super::DeviceCommunicator;
use crate::backend::{Backend, BackendLayer, CudaBackend, StaticCache};
use crate::cuda::{DevicePagedKvCache, DeviceStaticKvCache, DeviceTensor, ElemType};
use crate::error::{AttnError, Result};
use crate::layer::ForwardArgs;
use crate::plan::StaticStep;
use crate::reference::visible;
use crate::tensor::Tensor;

use super::cp_layout::CpLayout;

fn bad(arg: &str, expected: impl Into<String>, got: impl Into<String>) -> AttnError {
    AttnError::InvalidArgument {
        arg: arg.into(),
        expected: expected.into(),
        got: got.into(),
    }
}

impl CpLocalCache for DeviceStaticKvCache {
    fn pending_len(&self, layer: usize, slot: usize) -> Result<usize> {
        let seq = self.seqlens().get(slot).copied().ok_or_else(|| {
            bad(
                "slot",
                format!("a batch slot below {}", self.max_batch()),
                slot.to_string(),
            )
        })?;
        Ok(self.visible_len(layer, slot)? - seq)
    }
}

/// The CUDA backend of a context-parallel rank: [`CudaBackend`]'s tensors, and static caches
/// that are [`CpStaticKvCache`]s over this rank's device cache (`max_seq` is each rank's
/// capacity per slot). Paged caches are the device's (a context-parallel layer refuses
/// paged steps).
#[derive(Debug, Clone)]
pub struct CpCudaBackend {
    /// The device backend.
    pub device: CudaBackend,
    /// The rank the caches are made for.
    pub layout: CpLayout,
}

impl Backend for CpCudaBackend {
    type Tensor = DeviceTensor;
    type StaticCache = CpStaticKvCache<DeviceStaticKvCache>;
    type PagedCache = DevicePagedKvCache;
    fn name(&self) -> &'static str {
        self.device.name()
    }
    fn upload(&self, t: &Tensor) -> Result<DeviceTensor> {
        self.device.upload(t)
    }
    fn download(&self, t: &DeviceTensor) -> Result<Tensor> {
        self.device.download(t)
    }
    fn shape<'t>(&self, t: &'t DeviceTensor) -> &'t [usize] {
        t.shape()
    }
    fn zeros(&self, shape: &[usize]) -> Result<DeviceTensor> {
        self.device.zeros(shape)
    }
    fn zeros_as(&self, like: &DeviceTensor, shape: &[usize]) -> Result<DeviceTensor> {
        self.device.zeros_as(like, shape)
    }
    fn copy_rows(
        &self,
        dst: &mut DeviceTensor,
        dst_row: usize,
        src: &DeviceTensor,
        src_row: usize,
        rows: usize,
    ) -> Result<()> {
        self.device.copy_rows(dst, dst_row, src, src_row, rows)
    }
    fn static_cache(
        &self,
        num_layers: usize,
        max_seq: usize,
        max_batch: usize,
        groups: usize,
        head_dim: usize,
    ) -> Result<Self::StaticCache> {
        let inner = self
            .device
            .static_cache(num_layers, max_seq, max_batch, groups, head_dim)?;
        CpStaticKvCache::new(self.layout, inner)
    }
    fn paged_cache(
        &self,
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        groups: usize,
        head_dim: usize,
    ) -> Result<DevicePagedKvCache> {
        self.device
            .paged_cache(num_layers, num_blocks, block_size, groups, head_dim)
    }
    fn synchronize(&self) -> Result<()> {
        self.device.synchronize()
    }
}

impl<C: DeviceCommunicator> CpCudaLayer<C> {
    /// The backend whose caches this rank's KV-cache steps take.
    pub fn cp_backend(&self) -> CpCudaBackend {
        CpCudaBackend {
            device: self.inner().backend(),
            layout: *self.layout(),
        }
    }

    /// Local checks of a step (`whole` the whole step's `[s, b, h]`), then the agreement of
    /// every rank ([`super::cp_cache_step`]).
    #[allow(clippy::too_many_arguments)]
    fn plan_cached(
        &self,
        decode: bool,
        hidden: &DeviceTensor,
        whole: &[usize],
        cache: &CpStaticKvCache<DeviceStaticKvCache>,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<StaticStep> {
        let l = self.inner();
        let cfg = l.config();
        let local = (|| {
            if cache.layout() != *self.layout() {
                return Err(bad(
                    "cache",
                    format!("a cache of context-parallel rank {}", self.layout().cp_rank),
                    format!("rank {}'s", cache.layout().cp_rank),
                ));
            }
            let plan = crate::plan::static_step(cfg, whole, cache, layer, batch_offset, args)?;
            l.check_input("hidden", hidden)?;
            l.check_input("cache", cache.inner().layer_k(0)?)?;
            l.cp_cache_kernels()?;
            Ok(plan)
        })();
        let b = whole.get(1).copied().unwrap_or(0);
        let lens: Vec<usize> =
            if layer < cache.num_layers() && batch_offset + b <= cache.max_batch() {
                (batch_offset..batch_offset + b)
                    .map(|slot| cache.book().visible_len(layer, slot))
                    .collect()
            } else {
                Vec::new()
            };
        let s = whole.first().copied().unwrap_or(0);
        agree(
            self.comm(),
            &step_meta(decode, layer, batch_offset, b, s, &lens),
            local,
        )
    }

    /// Prefill of this rank's rows `[s / cp, b, h]` (the layer's dtype) of a prompt into
    /// empty slots, as [`super::CpLayer::prefill_cp`] on the CPU (see the module docs).
    /// Returns this rank's output rows `[s / cp, b, h]` (bias unadded).
    ///
    /// Errors: as [`super::CpLayer::prefill_cp`]; `DType` for `hidden` or a cache of another
    /// dtype; those of [`CpCudaLayer::forward_device`]; device errors.
    pub fn prefill_cp(
        &self,
        hidden: &DeviceTensor,
        cache: &mut CpStaticKvCache<DeviceStaticKvCache>,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<DeviceTensor> {
        let l = self.inner();
        let layout = *self.layout();
        let mut whole = hidden.shape().to_vec();
        if let Some(s) = whole.first_mut() {
            *s *= layout.cp_size;
        }
        let plan = self.plan_cached(false, hidden, &whole, cache, layer, batch_offset, args)?;
        let (s, b) = (plan.s, plan.b);
        let sl = s / layout.cp_size;
        // The prompt's positions `[s]` (the plan's are `[s * b]`, token-major).
        let positions: Vec<i64> = plan.positions.iter().step_by(b.max(1)).copied().collect();
        let fwd = ForwardArgs {
            positions: Some(&positions),
            mask_type: Some(MaskType::Causal),
            rope_mscale: args.rope_mscale,
            ..ForwardArgs::default()
        };
        let y = self.forward_device(hidden, &fwd)?;
        // The rank's keys and values, padded [s / cp, b] rows at their whole-prompt positions.
        let rows: Vec<i32> = (0..sl * b)
            .map(|r| {
                let p = positions[layout.token(s, r / b)];
                i32::try_from(p).map_err(|_| bad("positions", "int32 positions", p.to_string()))
            })
            .collect::<Result<_>>()?;
        let qkv = l.cp_project(hidden, &rows, args.rope_mscale)?;
        l.cp_append(
            cache.inner_mut(),
            layer,
            batch_offset,
            (&qkv.k, &qkv.v),
            0,
            sl,
            b,
        )?;
        let owners = cache.book().prefill_owners(s);
        for slot in batch_offset..batch_offset + b {
            cache.add_pending(layer, slot, &owners);
        }
        y.view(hidden.shape())
    }

    /// One decode step: `hidden` `[1, b, h]` (the layer's dtype, the same on every rank), as
    /// [`super::CpLayer::decode_cp`] on the CPU (see the module docs). Returns `[1, b, h]`
    /// (bias unadded), the same on every rank.
    ///
    /// Errors: as [`super::CpLayer::decode_cp`]; `DType` for `hidden` or a cache of another
    /// dtype; [`AttnError::Collective`]; device errors.
    pub fn decode_cp(
        &self,
        hidden: &DeviceTensor,
        cache: &mut CpStaticKvCache<DeviceStaticKvCache>,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<DeviceTensor> {
        let l = self.inner();
        let cfg = l.config();
        let layout = *self.layout();
        let (me, cp) = (layout.cp_rank, layout.cp_size);
        let whole = hidden.shape().to_vec();
        if whole.first() != Some(&1) {
            return Err(AttnError::Shape {
                arg: "hidden".into(),
                expected: format!("[1, b, {}]", cfg.hidden),
                got: whole,
            });
        }
        let plan = self.plan_cached(true, hidden, &whole, cache, layer, batch_offset, args)?;
        let b = plan.b;
        let (np, hn) = (cfg.heads, cfg.head_dim);
        let positions: Vec<i32> = plan
            .positions
            .iter()
            .map(|&p| i32::try_from(p).map_err(|_| bad("positions", "int32", p.to_string())))
            .collect::<Result<_>>()?;
        // Per slot: its owner, and the rank's cached keys the new query sees (a suffix).
        let mut owners = Vec::with_capacity(b);
        let mut own = Vec::with_capacity(b);
        let mut cached: Vec<Range<usize>> = Vec::with_capacity(b);
        for (i, &g) in plan.starts.iter().enumerate() {
            let slot = batch_offset + i;
            owners.push(cache.book().decode_owner(layer, slot) as u32);
            own.push(owners[i] as usize == me);
            let pos = cache.book().positions_of(layer, slot, me);
            let lo = pos
                .iter()
                .position(|&p| visible(MaskType::CausalBottomRight, cfg.window, 1, g + 1, 0, p))
                .unwrap_or(pos.len());
            cached.push(lo..pos.len());
        }
        let h = l.cp_helpers()?;
        let qkv = l.cp_project(hidden, &positions, args.rope_mscale)?;
        let acc = l.cp_cache_partial(
            cache.inner(),
            layer,
            batch_offset,
            &qkv.q,
            &cached,
            ((&qkv.k, &qkv.v), &own),
            &h,
        )?;
        let (out, lse) = l.cp_acc_tensors(acc, &h)?;
        let st = l.runtime().stream();
        let mut outs = DeviceTensor::uninit(st, l.elem(), &[cp * b, np * hn], "cp outs")?;
        let mut lses = DeviceTensor::uninit(st, ElemType::F32, &[cp * np, b], "cp lses")?;
        self.comm().all_gather(&out, &mut outs)?;
        self.comm().all_gather(&lse, &mut lses)?;
        drop((out, lse));
        let merged = l.cp_merge_ranks((&outs, &lses), cp, b, &h)?;
        drop((outs, lses));
        let o = l.cp_finish(&merged, qkv.gate.as_ref(), &h)?;
        let y = l.cp_output(o)?;
        for (i, &mine) in own.iter().enumerate() {
            if mine {
                l.cp_append(
                    cache.inner_mut(),
                    layer,
                    batch_offset + i,
                    (&qkv.k, &qkv.v),
                    i,
                    1,
                    1,
                )?;
            }
        }
        for (i, &o) in owners.iter().enumerate() {
            cache.add_pending(layer, batch_offset + i, &[o]);
        }
        y.view(hidden.shape())
    }
}
