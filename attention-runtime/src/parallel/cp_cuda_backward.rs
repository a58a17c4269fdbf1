//! Training through a context-parallel rank on a GPU: [`CpCudaLayer::forward_train_device`],
//! [`CpCudaLayer::backward_device`] and [`CpCudaLayer::backward_dw_device`], the CUDA
//! counterpart of [`super::CpLayer::forward_train`] / [`super::CpLayer::backward`] (same
//! semantics: Megatron-Core's context-parallel training).
//!
//! The layer's own training forward and backward ([`CudaLayer`]'s, `cuda/layer/train.rs`)
//! run on the rank's rows (batch-major, as the CP forward); only core attention is replaced
//! (a crate-private hook) by the exchange here:
//!
//! - forward: the CP forward's launches (`p2p` ring, `all_gather`) merged by their LSE, or
//!   `a2a`'s whole-sequence attention of this rank's heads; it keeps the ungated output and
//!   the global LSE with the sink column joined (`a2a`: the LSE of its head block, which
//!   the backward reads in the same head-split layout).
//! - backward (`p2p` / `all_gather`): the single-GPU attention backward kernels run once
//!   per planned launch with the global LSE; dq sums over launches and K/V blocks in f32,
//!   dk/dv in f32 accumulators that travel the ring with the K/V (and one extra hop to their
//!   owner) or are reduce-scattered to their owner after the all-gather; the learnable
//!   sinks' gradient over the rank's rows comes from the global LSE and `D = rowsum(dO O)`.
//! - backward (`a2a`): q, k, v, O and dO all-to-all'ed to this rank's heads over whole
//!   sequences, the single-GPU backward of those heads, dq/dk/dv all-to-all'ed back.
//!
//! Parameter gradients are all-reduced (summed) over the group, as Megatron's gradient
//! all-reduce over data x context parallel ranks does; the input gradient is this rank's
//! rows. Not here (typed errors): selective recompute, cross-attention. The QK-Clip max
//! logit of a CP training forward is not computed (the CP launches run without it): the
//! layer's record is left as it was.

use std::collections::BTreeMap;

use cudarc::driver::CudaSlice;

use super::comm::Communicator;
use super::cp_call::{agree, CpCall};
use super::cp_cuda::CpCudaLayer;
use super::cp_layout::CpLayout;
use super::cp_plan::{self, KernelKind};
use super::CpCommType;
use super::DeviceCommunicator;
use crate::cuda::backward::AttentionBackward;
use crate::cuda::cp_backward_kernels::{self, CpBackwardKernels, LoadedCpBackward};
use crate::cuda::cp_kernels::{upload_index, LoadedCp, RowIndex};
use crate::cuda::layer::{f32_zeros, CpAttnKernel, CpBwdIn, CpLaunch, CudaCoreHook};
use crate::cuda::{CudaLayer, CudaSaved, DeviceTensor};
use crate::error::{AttnError, Result};
use crate::layer::{ForwardArgs, PackedSeqParams};
use crate::train::{BackwardOptions, LayerGrads, TrainOptions};

fn bad(arg: &str, expected: impl Into<String>, got: impl Into<String>) -> AttnError {
    AttnError::InvalidArgument {
        arg: arg.into(),
        expected: expected.into(),
        got: got.into(),
    }
}

/// The `a2a` index tables (as the forward's).
struct Tables {
    split: RowIndex,
    to_global: RowIndex,
    back: RowIndex,
    merge: RowIndex,
    cu: CudaSlice<i32>,
}

/// The launches and tables of a training call, uploaded once by the forward.
enum TrainPlan {
    Ring(Vec<Vec<CpLaunch>>),
    /// Launches over the whole-sequence K/V, the gather from all-gathered rows to sequence
    /// order, and its inverse.
    Gathered(Vec<CpLaunch>, RowIndex, RowIndex),
    Ulysses(Box<Tables>),
}

impl TrainPlan {
    fn new(
        layer: &CudaLayer,
        layout: CpLayout,
        call: &CpCall,
        comm_type: CpCommType,
    ) -> Result<Self> {
        let (cp, t) = (layout.cp_size, call.rows());
        let st = layer.runtime().stream();
        let up = |ls: Vec<cp_plan::Launch>| -> Result<Vec<CpLaunch>> {
            ls.into_iter()
                .map(|l| layer.cp_upload_launch(l, call.vis))
                .collect()
        };
        let src = cp_plan::global_sources(layout, &call.local_cu);
        Ok(match comm_type {
            CpCommType::P2p => TrainPlan::Ring(
                (0..cp)
                    .map(|step| {
                        let from = (layout.cp_rank + cp - step) % cp;
                        up(cp_plan::pack(cp_plan::p2p_jobs(
                            layout,
                            &call.local_cu,
                            from,
                            call.vis,
                        ))?)
                    })
                    .collect::<Result<_>>()?,
            ),
            CpCommType::AllGather => {
                let launches =
                    cp_plan::pack(cp_plan::all_gather_jobs(layout, &call.local_cu, call.vis))?;
                let idx: Vec<usize> = (0..2)
                    .flat_map(|half| src.iter().map(move |&(o, lr)| o * 2 * t + half * t + lr))
                    .collect();
                let mut inv = vec![0usize; idx.len()];
                for (g, &a) in idx.iter().enumerate() {
                    inv[a] = g;
                }
                TrainPlan::Gathered(
                    up(launches)?,
                    upload_index(st, &idx, cp * 2 * t)?,
                    upload_index(st, &inv, cp * 2 * t)?,
                )
            }
            CpCommType::A2a => {
                let big = t * cp;
                let to_global: Vec<usize> = src.iter().map(|&(o, lr)| o * t + lr).collect();
                let mut back = vec![0usize; big];
                for (g, &(o, lr)) in src.iter().enumerate() {
                    back[o * t + lr] = g;
                }
                let cu: Vec<i32> = call
                    .global_cu
                    .iter()
                    .map(|&x| {
                        i32::try_from(x).map_err(|_| {
                            bad("cu_seqlens_q", "offsets that fit in int32", x.to_string())
                        })
                    })
                    .collect::<Result<_>>()?;
                TrainPlan::Ulysses(Box::new(Tables {
                    split: upload_index(st, &cp_plan::head_split_index(t, cp), big)?,
                    to_global: upload_index(st, &to_global, big)?,
                    back: upload_index(st, &back, big)?,
                    merge: upload_index(st, &cp_plan::head_merge_index(t, cp), big)?,
                    cu: crate::cuda::tensor::upload(st, &cu, "cu_seqlens_q")?,
                }))
            }
        })
    }

    fn launches(&self) -> Vec<&CpLaunch> {
        match self {
            TrainPlan::Ring(steps) => steps.iter().flatten().collect(),
            TrainPlan::Gathered(l, ..) => l.iter().collect(),
            TrainPlan::Ulysses(_) => Vec::new(),
        }
    }
}

/// What [`CpCudaLayer::forward_train_device`] saves for
/// [`CpCudaLayer::backward_device`]: the layer's training context ([`CudaSaved`], with the
/// global LSE) and the call's geometry and uploaded plan.
pub struct CpCudaSaved {
    inner: CudaSaved,
    call: CpCall,
    plan: TrainPlan,
    layout: CpLayout,
    comm_type: CpCommType,
}

impl std::fmt::Debug for CpCudaSaved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpCudaSaved")
            .field("inner", &self.inner)
            .field("layout", &self.layout)
            .field("comm_type", &self.comm_type)
            .finish()
    }
}

impl CpCudaSaved {
    /// Bytes of activations held for the backward ([`CudaSaved::saved_bytes`]).
    pub fn saved_bytes(&self) -> usize {
        self.inner.saved_bytes()
    }
    /// Whether weight gradients wait for [`CpCudaLayer::backward_dw_device`].
    pub fn wgrad_pending(&self) -> bool {
        self.inner.wgrad_pending()
    }
}

/// The core attention hook of one call.
struct Hook<'a, C> {
    layer: &'a CudaLayer,
    comm: &'a C,
    layout: CpLayout,
    call: &'a CpCall,
    plan: &'a TrainPlan,
    h: &'a LoadedCp,
    hb: &'a LoadedCpBackward,
}

impl<C: Communicator<Tensor = DeviceTensor>> Hook<'_, C> {
    fn rows(&self) -> usize {
        self.call.rows()
    }

    /// K and V in one buffer `[2 t, ng hn]`.
    fn pack_kv(&self, k: &DeviceTensor, v: &DeviceTensor) -> Result<DeviceTensor> {
        let cfg = self.layer.config();
        let t = self.rows();
        let st = self.layer.runtime().stream();
        let mut kv = self
            .layer
            .cp_alloc(&[2 * t, cfg.groups * cfg.head_dim], "cp k/v")?;
        kv.copy_rows_from(st, 0, k, 0, t)?;
        kv.copy_rows_from(st, t, v, 0, t)?;
        Ok(kv)
    }

    fn fwd_kernels(&self) -> Result<Vec<(KernelKind, CpAttnKernel)>> {
        let mut out: Vec<(KernelKind, CpAttnKernel)> = Vec::new();
        for l in self.plan.launches() {
            if !out.iter().any(|(k, _)| *k == l.launch.kind) {
                out.push((
                    l.launch.kind,
                    self.layer.cp_kernel(l.launch.kind, self.call.mask)?,
                ));
            }
        }
        Ok(out)
    }

    fn bwd_kernels(&self) -> Result<Vec<(KernelKind, std::sync::Arc<AttentionBackward>)>> {
        let mut out: Vec<(KernelKind, std::sync::Arc<AttentionBackward>)> = Vec::new();
        for l in self.plan.launches() {
            if !out.iter().any(|(k, _)| *k == l.launch.kind) {
                out.push((
                    l.launch.kind,
                    self.layer
                        .cp_backward_kernels(l.launch.kind, self.call.mask)?,
                ));
            }
        }
        Ok(out)
    }

    /// Every token of this rank's head block of `x` (`[t, heads, hn]`), in sequence order:
    /// `[t cp, heads / cp, hn]`.
    fn scatter(
        &self,
        tab: &Tables,
        x: &DeviceTensor,
        heads: usize,
        arg: &str,
    ) -> Result<DeviceTensor> {
        let (cp, t) = (self.layout.cp_size, self.rows());
        let hn = self.layer.config().head_dim;
        let st = self.layer.runtime().stream();
        let bw = heads / cp;
        let mut send = self.layer.cp_alloc(&[cp * t, bw * hn], arg)?;
        self.h.gather_rows(st, x, &mut send, &tab.split)?;
        let mut recv = self.layer.cp_alloc(&[cp * t, bw * hn], arg)?;
        self.comm.all_to_all(&send, &mut recv)?;
        let mut glob = self.layer.cp_alloc(&[cp * t, bw, hn], arg)?;
        self.h.gather_rows(st, &recv, &mut glob, &tab.to_global)?;
        Ok(glob)
    }

    /// The inverse of [`scatter`](Self::scatter), into `out` (`[t, heads, hn]`).
    fn gather_back(
        &self,
        tab: &Tables,
        x: &DeviceTensor,
        heads: usize,
        out: &mut DeviceTensor,
        arg: &str,
    ) -> Result<()> {
        let (cp, t) = (self.layout.cp_size, self.rows());
        let hn = self.layer.config().head_dim;
        let st = self.layer.runtime().stream();
        let bw = heads / cp;
        let mut send = self.layer.cp_alloc(&[cp * t, bw * hn], arg)?;
        self.h.gather_rows(st, x, &mut send, &tab.back)?;
        let mut recv = self.layer.cp_alloc(&[cp * t, bw * hn], arg)?;
        self.comm.all_to_all(&send, &mut recv)?;
        self.h.gather_rows(st, &recv, out, &tab.merge)
    }

    fn ulysses_forward(
        &self,
        tab: &Tables,
        (q, k, v, gate): (
            &DeviceTensor,
            &DeviceTensor,
            &DeviceTensor,
            Option<&DeviceTensor>,
        ),
    ) -> Result<(DeviceTensor, Option<DeviceTensor>, CudaSlice<f32>)> {
        let cfg = self.layer.config();
        let (cp, rank) = (self.layout.cp_size, self.layout.cp_rank);
        let (np, ng, hn) = (cfg.heads, cfg.groups, cfg.head_dim);
        let (hq, hg, t) = (np / cp, ng / cp, self.rows());
        let wq = self.scatter(tab, q, np, "cp q (a2a)")?;
        let wk = self.scatter(tab, k, ng, "cp k (a2a)")?;
        let wv = self.scatter(tab, v, ng, "cp v (a2a)")?;
        let wg = gate
            .map(|g| self.scatter(tab, g, np, "cp gate (a2a)"))
            .transpose()?;
        let cu = (&self.call.global_cu[..], &tab.cu);
        let heads = (hq, hg, rank);
        let (o_w, lse) = match &wg {
            None => {
                let kern = self.layer.cp_whole_kernel(self.call.mask)?;
                self.layer
                    .cp_whole_lse(&kern, (&wq, &wk, &wv, None), cu, heads)?
            }
            Some(_) => {
                let kern = self.layer.cp_whole_kernel_ungated(self.call.mask)?;
                self.layer
                    .cp_whole_lse(&kern, (&wq, &wk, &wv, None), cu, heads)?
            }
        };
        let mut o = self.layer.cp_alloc(&[t, np, hn], "attention output")?;
        self.gather_back(tab, &o_w, np, &mut o, "cp output (a2a)")?;
        drop(o_w);
        match wg {
            None => Ok((o, None, lse)),
            Some(wg) => {
                let kern = self.layer.cp_whole_kernel(self.call.mask)?;
                let (g_w, scratch) =
                    self.layer
                        .cp_whole_lse(&kern, (&wq, &wk, &wv, Some(&wg)), cu, heads)?;
                drop(scratch);
                let mut first = self.layer.cp_alloc(&[t, np, hn], "gated output")?;
                self.gather_back(tab, &g_w, np, &mut first, "cp gated output (a2a)")?;
                Ok((first, Some(o), lse))
            }
        }
    }

    fn by_kv_forward(
        &self,
        (q, k, v, gate): (
            &DeviceTensor,
            &DeviceTensor,
            &DeviceTensor,
            Option<&DeviceTensor>,
        ),
    ) -> Result<(DeviceTensor, Option<DeviceTensor>, CudaSlice<f32>)> {
        let (cp, rank) = (self.layout.cp_size, self.layout.cp_rank);
        let t = self.rows();
        let st = self.layer.runtime().stream();
        let kernels = self.fwd_kernels()?;
        let kern = |kind: KernelKind| {
            kernels
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, k)| k)
                .ok_or_else(|| AttnError::Render(format!("no kernel loaded for {kind:?}")))
        };
        let kv = self.pack_kv(k, v)?;
        let w = kv.shape()[1];
        let mut acc = self.layer.cp_acc(t, self.h)?;
        match self.plan {
            TrainPlan::Ring(steps) => {
                let mut kv = kv;
                for (i, launches) in steps.iter().enumerate() {
                    for pl in launches {
                        self.layer.cp_partial(
                            kern(pl.launch.kind)?,
                            pl,
                            q,
                            (&kv, t),
                            &mut acc,
                            self.h,
                        )?;
                    }
                    if i + 1 < steps.len() {
                        let mut next = self.layer.cp_alloc(&[2 * t, w], "cp k/v (received)")?;
                        self.comm.send_recv(
                            &kv,
                            (rank + 1) % cp,
                            &mut next,
                            (rank + cp - 1) % cp,
                        )?;
                        kv = next;
                    }
                }
            }
            TrainPlan::Gathered(launches, idx, _) => {
                let mut all = self
                    .layer
                    .cp_alloc(&[cp * 2 * t, w], "cp k/v (all ranks)")?;
                self.comm.all_gather(&kv, &mut all)?;
                let mut glob = self
                    .layer
                    .cp_alloc(&[2 * t * cp, w], "cp k/v (sequence order)")?;
                self.h.gather_rows(st, &all, &mut glob, idx)?;
                for pl in launches {
                    self.layer.cp_partial(
                        kern(pl.launch.kind)?,
                        pl,
                        q,
                        (&glob, t * cp),
                        &mut acc,
                        self.h,
                    )?;
                }
            }
            TrainPlan::Ulysses(_) => unreachable!("a2a runs ulysses_forward"),
        }
        self.layer.cp_train_finish(&acc, gate, self.h, self.hb)
    }

    #[allow(clippy::too_many_arguments)]
    fn by_kv_backward(
        &self,
        x: &CpBwdIn<'_>,
        (k, v): (&DeviceTensor, &DeviceTensor),
        (dq, dk, dv): (&mut DeviceTensor, &mut DeviceTensor, &mut DeviceTensor),
        dsinks: Option<&mut DeviceTensor>,
        deterministic: bool,
    ) -> Result<()> {
        let cfg = self.layer.config();
        let (cp, rank) = (self.layout.cp_size, self.layout.cp_rank);
        let (np, hn) = (cfg.heads, cfg.head_dim);
        let t = self.rows();
        let st = self.layer.runtime().stream();
        let kernels = self.bwd_kernels()?;
        let bwd = |kind: KernelKind| -> Result<&AttentionBackward> {
            kernels
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, k)| &**k)
                .ok_or_else(|| AttnError::Render(format!("no backward kernel for {kind:?}")))
        };
        let kv = self.pack_kv(k, v)?;
        let w = kv.shape()[1];
        let mut dq_acc = f32_zeros(st, &[t, np * hn], "cp dq (f32)")?;
        let flags = (self.call.vis, self.hb, deterministic);
        let own = match self.plan {
            TrainPlan::Ring(steps) => {
                let (mut kv, mut dkv) = (kv, f32_zeros(st, &[2 * t, w], "cp dk/dv (f32)")?);
                for (i, launches) in steps.iter().enumerate() {
                    for pl in launches {
                        self.layer.cp_launch_backward(
                            bwd(pl.launch.kind)?,
                            pl,
                            x,
                            (&kv, t),
                            (&mut dq_acc, &mut dkv),
                            flags,
                        )?;
                    }
                    if i + 1 < steps.len() {
                        let (to, from) = ((rank + 1) % cp, (rank + cp - 1) % cp);
                        let mut next = self.layer.cp_alloc(&[2 * t, w], "cp k/v (received)")?;
                        self.comm.send_recv(&kv, to, &mut next, from)?;
                        kv = next;
                        let mut dnext = f32_zeros(st, &[2 * t, w], "cp dk/dv (received)")?;
                        self.comm.send_recv(&dkv, to, &mut dnext, from)?;
                        dkv = dnext;
                    }
                }
                // This rank holds rank + 1's accumulator: hand it to its owner.
                if cp > 1 {
                    let mut own = f32_zeros(st, &[2 * t, w], "cp dk/dv (own)")?;
                    self.comm
                        .send_recv(&dkv, (rank + 1) % cp, &mut own, (rank + cp - 1) % cp)?;
                    own
                } else {
                    dkv
                }
            }
            TrainPlan::Gathered(launches, idx, inv) => {
                let mut all = self
                    .layer
                    .cp_alloc(&[cp * 2 * t, w], "cp k/v (all ranks)")?;
                self.comm.all_gather(&kv, &mut all)?;
                let mut glob = self
                    .layer
                    .cp_alloc(&[2 * t * cp, w], "cp k/v (sequence order)")?;
                self.h.gather_rows(st, &all, &mut glob, idx)?;
                drop(all);
                let mut dglob = f32_zeros(st, &[2 * t * cp, w], "cp dk/dv (sequence order)")?;
                for pl in launches {
                    self.layer.cp_launch_backward(
                        bwd(pl.launch.kind)?,
                        pl,
                        x,
                        (&glob, t * cp),
                        (&mut dq_acc, &mut dglob),
                        flags,
                    )?;
                }
                let mut dall = f32_zeros(st, &[cp * 2 * t, w], "cp dk/dv (by owner)")?;
                self.h.gather_rows(st, &dglob, &mut dall, inv)?;
                let mut own = f32_zeros(st, &[2 * t, w], "cp dk/dv (own)")?;
                self.comm.reduce_scatter_sum(&dall, &mut own)?;
                own
            }
            TrainPlan::Ulysses(_) => unreachable!("a2a runs ulysses_backward"),
        };
        self.hb.cast(st, &dq_acc, dq)?;
        let mut half = f32_zeros(st, &[t, w], "cp dk/dv half")?;
        half.copy_rows_from(st, 0, &own, 0, t)?;
        self.hb.cast(st, &half, dk)?;
        half.copy_rows_from(st, 0, &own, t, t)?;
        self.hb.cast(st, &half, dv)?;
        if let Some(ds) = dsinks {
            self.layer.cp_dsinks(self.hb, x, ds)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn ulysses_backward(
        &self,
        tab: &Tables,
        x: &CpBwdIn<'_>,
        (k, v): (&DeviceTensor, &DeviceTensor),
        (dq, dk, dv): (&mut DeviceTensor, &mut DeviceTensor, &mut DeviceTensor),
        dsinks: Option<&mut DeviceTensor>,
        deterministic: bool,
    ) -> Result<()> {
        let cfg = self.layer.config();
        let (cp, rank) = (self.layout.cp_size, self.layout.cp_rank);
        let (np, ng, hn) = (cfg.heads, cfg.groups, cfg.head_dim);
        let (hq, hg, big) = (np / cp, ng / cp, self.rows() * cp);
        let wq = self.scatter(tab, x.q, np, "cp q (a2a)")?;
        let wk = self.scatter(tab, k, ng, "cp k (a2a)")?;
        let wv = self.scatter(tab, v, ng, "cp v (a2a)")?;
        let wo = self.scatter(tab, x.o, np, "cp out (a2a)")?;
        let wd = self.scatter(tab, x.dout, np, "cp dout (a2a)")?;
        let mut dq_w = self.layer.cp_alloc(&[big, hq, hn], "cp dq (a2a)")?;
        let mut dk_w = self.layer.cp_alloc(&[big, hg, hn], "cp dk (a2a)")?;
        let mut dv_w = self.layer.cp_alloc(&[big, hg, hn], "cp dv (a2a)")?;
        self.layer.cp_whole_backward(
            &CpBwdIn {
                q: &wq,
                o: &wo,
                dout: &wd,
                lse: x.lse,
            },
            (&wk, &wv),
            (&self.call.global_cu, &tab.cu),
            (hq, hg, rank),
            self.call.mask,
            (&mut dq_w, &mut dk_w, &mut dv_w),
            dsinks,
            deterministic,
        )?;
        drop((wq, wk, wv, wo, wd));
        self.gather_back(tab, &dq_w, np, dq, "cp dq (a2a)")?;
        self.gather_back(tab, &dk_w, ng, dk, "cp dk (a2a)")?;
        self.gather_back(tab, &dv_w, ng, dv, "cp dv (a2a)")
    }
}

impl<C: Communicator<Tensor = DeviceTensor>> CudaCoreHook for Hook<'_, C> {
    fn forward(
        &self,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        gate: Option<&DeviceTensor>,
    ) -> Result<(DeviceTensor, Option<DeviceTensor>, CudaSlice<f32>)> {
        match self.plan {
            TrainPlan::Ulysses(tab) => self.ulysses_forward(tab, (q, k, v, gate)),
            _ => self.by_kv_forward((q, k, v, gate)),
        }
    }

    fn backward(
        &self,
        (q, k, v): (&DeviceTensor, &DeviceTensor, &DeviceTensor),
        o: &DeviceTensor,
        lse: &CudaSlice<f32>,
        dout: &DeviceTensor,
        grads: (&mut DeviceTensor, &mut DeviceTensor, &mut DeviceTensor),
        dsinks: Option<&mut DeviceTensor>,
        deterministic: bool,
    ) -> Result<()> {
        let x = CpBwdIn { q, o, dout, lse };
        match self.plan {
            TrainPlan::Ulysses(tab) => {
                self.ulysses_backward(tab, &x, (k, v), grads, dsinks, deterministic)
            }
            _ => self.by_kv_backward(&x, (k, v), grads, dsinks, deterministic),
        }
    }
}

impl<C: DeviceCommunicator> CpCudaLayer<C> {
    fn helpers(&self) -> Result<(LoadedCp, LoadedCpBackward)> {
        let cfg = self.inner().config();
        let h = self.inner().cp_helpers()?;
        let hb = cp_backward_kernels::load(
            self.inner().runtime(),
            &CpBackwardKernels::render(cfg.spec.dtype, cfg.head_dim)?,
        )?;
        Ok((h, hb))
    }

    /// `[t, h]` rows of `x` (any shape of `t * h` elements) in batch-major order (padded
    /// with `b > 1`: reordered), or back (`inverse`).
    fn rows_in(
        &self,
        call: &CpCall,
        x: &DeviceTensor,
        inverse: bool,
        arg: &str,
    ) -> Result<DeviceTensor> {
        let layer = self.inner();
        let (t, hd) = (call.rows(), layer.config().hidden);
        if x.numel() != t * hd {
            return Err(AttnError::Shape {
                arg: arg.into(),
                expected: format!("{t} x {hd} elements (this rank's rows)"),
                got: x.shape().to_vec(),
            });
        }
        let st = layer.runtime().stream();
        let mut out = layer.cp_alloc(&[t, hd], arg)?;
        match call.padded {
            Some((s, b)) if b > 1 => {
                let idx = upload_index(st, &cp_plan::batch_major_index(s, b, inverse), s * b)?;
                let h = layer.cp_helpers()?;
                h.gather_rows(st, x, &mut out, &idx)?;
            }
            _ => crate::cuda::tensor::copy_dtod(st, x, &mut out)?,
        }
        Ok(out)
    }

    /// Training forward of this rank's rows on device tensors: the arguments and layouts of
    /// [`forward_device`](Self::forward_device) (output `[t, h]`, this rank's rows, bias
    /// unadded) and the context for [`backward_device`](Self::backward_device). Every rank of
    /// the group must call it together.
    ///
    /// Errors: those of `forward_device` and of [`CudaLayer::forward_train_device`];
    /// [`AttnError::InvalidArgument`] (`recompute`) for selective recompute, (`hidden`) for
    /// an empty call.
    pub fn forward_train_device(
        &self,
        hidden: &DeviceTensor,
        args: &ForwardArgs<'_>,
        opts: &TrainOptions,
    ) -> Result<(DeviceTensor, CpCudaSaved)> {
        let layer = self.inner();
        let cfg = layer.config();
        let layout = *self.layout();
        let call = CpCall::new(
            layout,
            hidden.shape(),
            cfg.hidden,
            args,
            cfg.mask,
            cfg.window,
        )?;
        layer.check_input("hidden", hidden)?;
        if call.rows() == 0 {
            return Err(bad("hidden", "at least one token to train on", "0 rows"));
        }
        if opts.recompute != crate::train::Recompute::None {
            return Err(bad(
                "recompute",
                "Recompute::None under context parallelism on CUDA",
                format!("{:?}", opts.recompute),
            ));
        }
        let comm_type = self.cp_comm_type();
        agree(
            self.comm(),
            &format!("train {}", call.descriptor(layout.cp_size, comm_type, cfg)),
        )?;
        let plan = TrainPlan::new(layer, layout, &call, comm_type)?;
        let (h, hb) = self.helpers()?;
        let x = self.rows_in(&call, hidden, false, "hidden (batch-major)")?;
        let cu: Vec<i32> = call.local_cu.iter().map(|&c| c as i32).collect();
        let positions: Vec<i64> = call.positions.iter().map(|&p| p as i64).collect();
        let local_args = ForwardArgs {
            positions: Some(&positions),
            packed: Some(PackedSeqParams {
                cu_seqlens_q: &cu,
                cu_seqlens_kv: &cu,
                max_seqlen_q: 0,
                max_seqlen_kv: 0,
            }),
            ..*args
        };
        let hook = Hook {
            layer,
            comm: self.comm(),
            layout,
            call: &call,
            plan: &plan,
            h: &h,
            hb: &hb,
        };
        let (y, inner) = layer.forward_train_with(&x, &local_args, opts, Some(&hook))?;
        let y = self.rows_in(&call, &y, true, "output")?;
        Ok((
            y,
            CpCudaSaved {
                inner,
                call,
                plan,
                layout,
                comm_type,
            },
        ))
    }

    fn check_saved(&self, saved: &CpCudaSaved) -> Result<()> {
        if saved.layout != *self.layout() || saved.comm_type != self.cp_comm_type() {
            return Err(bad(
                "saved",
                format!(
                    "a context of this rank's forward_train (cp_rank {} of {}, {})",
                    self.layout().cp_rank,
                    self.layout().cp_size,
                    self.cp_comm_type()
                ),
                format!(
                    "cp_rank {} of {}, {}",
                    saved.layout.cp_rank, saved.layout.cp_size, saved.comm_type
                ),
            ));
        }
        Ok(())
    }

    /// Backward of this rank's rows: `grad_output` `[t, h]` (or any shape of as many
    /// elements: this rank's output rows, in the layer's dtype). Returns this rank's input
    /// gradient `[t, h]` (layer dtype) and the whole layer's parameter gradients (f32, summed
    /// over the group) under Megatron names. Every rank must call it together.
    ///
    /// Errors (before anything is exchanged): [`AttnError::Shape`] (`grad_output`),
    /// [`AttnError::InvalidArgument`] (`saved`: another rank's, group's or exchange's
    /// context), those of [`CudaLayer::backward_device`]; [`AttnError::Collective`].
    pub fn backward_device(
        &self,
        saved: &mut CpCudaSaved,
        grad_output: &DeviceTensor,
        opts: &BackwardOptions,
    ) -> Result<LayerGrads<DeviceTensor>> {
        self.check_saved(saved)?;
        let layer = self.inner();
        layer.check_input("grad_output", grad_output)?;
        let dy = self.rows_in(&saved.call, grad_output, false, "grad_output")?;
        let (h, hb) = self.helpers()?;
        let hook = Hook {
            layer,
            comm: self.comm(),
            layout: saved.layout,
            call: &saved.call,
            plan: &saved.plan,
            h: &h,
            hb: &hb,
        };
        let mut g = layer.backward_with(&mut saved.inner, &dy, opts, Some(&hook))?;
        g.grad_input = self.rows_in(&saved.call, &g.grad_input, true, "grad_input")?;
        for p in g.params.values_mut() {
            self.comm().all_reduce_sum(p)?;
        }
        Ok(g)
    }

    /// The weight gradients a backward with [`BackwardOptions::delay_wgrad`] left pending,
    /// summed over the group. Errors: those of [`CudaLayer::backward_dw_device`], `saved` as
    /// in [`backward_device`](Self::backward_device), [`AttnError::Collective`].
    pub fn backward_dw_device(
        &self,
        saved: &mut CpCudaSaved,
    ) -> Result<BTreeMap<String, DeviceTensor>> {
        self.check_saved(saved)?;
        let mut params = self.inner().backward_dw_device(&mut saved.inner)?;
        for p in params.values_mut() {
            self.comm().all_reduce_sum(p)?;
        }
        Ok(params)
    }
}
