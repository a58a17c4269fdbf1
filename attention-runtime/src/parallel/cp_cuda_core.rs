//! Core attention of one context-parallel rank on a GPU, by `cp_comm_type`, over device
//! tensors end to end (NCCL moves device buffers; only index tables and `cu_seqlens` go up
//! from the host). Inputs are the rank's q, k, v, gate in its packed local layout
//! ([`super::cp_call`]); the output is `[t, np, hn]` in the same layout.
//!
//! - `p2p`: K and V packed into one buffer `[2 t, ng hn]` travel around the ring (`cp - 1`
//!   exchanges with rank + 1 and rank - 1) in the order of [`cp_ring::ring_ops`]: two
//!   receive buffers, the exchange of step `i + 1`'s block on the communicator's stream while
//!   step `i`'s launches run on the layer's, CUDA events between them (serial when overlap is
//!   off: the same launches in the same order, bitwise the same result). Each step's launches
//!   ([`cp_plan::p2p_jobs`]) are merged by their LSE into an f32 result; sinks and gate are
//!   applied once at the end.
//! - `all_gather`: every rank's K/V buffer all-gathered, reordered into whole-sequence order
//!   by a row gather, then [`cp_plan::all_gather_jobs`] (the layer's kernel over each chunk's
//!   key prefix when causal: no merge of overlapping partials), merged as `p2p`.
//! - `a2a` (Ulysses): q, k, v (and the gate) split by head blocks, all-to-all'ed, reordered
//!   into whole sequences; the layer's own kernel attends every token of this rank's
//!   `np / cp` heads (sinks and gate included); the output goes back the same way.

use super::cp_call::CpCall;
use super::cp_layout::CpLayout;
use super::cp_plan::{self, KernelKind, Launch};
use super::cp_ring::{self, RingStream, RingWork};
use super::nccl::DeviceCommunicator;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream};

use crate::cuda::cp_kernels::{upload_index, LoadedCp, RowIndex};
use crate::cuda::layer::{CpAcc, CpAttnKernel, CpLaunch, CpQkv};
use crate::cuda::{CudaLayer, DeviceTensor};
use crate::error::{AttnError, Result};

/// The kernels of the kinds a plan's launches use, loaded before anything is queued.
pub(crate) struct Kernels(Vec<(KernelKind, CpAttnKernel)>);

impl Kernels {
    fn load<'a>(
        layer: &CudaLayer,
        call: &CpCall,
        launches: impl IntoIterator<Item = &'a Launch>,
    ) -> Result<Kernels> {
        let mut out: Vec<(KernelKind, CpAttnKernel)> = Vec::new();
        for l in launches {
            if !out.iter().any(|(k, _)| *k == l.kind) {
                out.push((l.kind, layer.cp_kernel(l.kind, call.mask)?));
            }
        }
        Ok(Kernels(out))
    }

    fn get(&self, kind: KernelKind) -> Result<&CpAttnKernel> {
        self.0
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, k)| k)
            .ok_or_else(|| AttnError::Render(format!("no kernel loaded for a {kind:?} launch")))
    }
}

/// The index tables of `a2a` on the device.
pub(crate) struct UlyssesTables {
    /// `[t, np]` heads -> `[cp][t]` head blocks (any head count: rows of one block).
    split: RowIndex,
    /// `[cp (owner)][t]` -> whole-sequence order.
    to_global: RowIndex,
    /// Whole-sequence order -> `[cp (owner)][t]`.
    back: RowIndex,
    /// `[cp (head block)][t]` -> `[t, np]`.
    merge: RowIndex,
    /// The whole batch's `cu_seqlens`, int32.
    cu: CudaSlice<i32>,
}

/// The plan of a call, made and uploaded before anything is queued.
pub(crate) enum Plan {
    /// `p2p`: per ring step, its launches (step `i` attends rank `rank - i`'s block).
    Ring(Vec<Vec<CpLaunch>>, Kernels),
    /// `all_gather`: launches over the whole-sequence K/V, and the gather index from the
    /// all-gathered `[cp][2][t]` rows to `[2][t cp]` in sequence order.
    Gathered(Vec<CpLaunch>, Kernels, RowIndex),
    /// `a2a`: the layer's own kernel over whole sequences, and the index tables.
    Ulysses(CpAttnKernel, Box<UlyssesTables>),
}

fn upload_all(layer: &CudaLayer, call: &CpCall, launches: Vec<Launch>) -> Result<Vec<CpLaunch>> {
    launches
        .into_iter()
        .map(|l| layer.cp_upload_launch(l, call.vis))
        .collect()
}

impl Plan {
    /// Plan `call` for `comm_type`: launches and their metadata, kernels, index tables.
    pub(crate) fn new(
        layer: &CudaLayer,
        layout: CpLayout,
        call: &CpCall,
        comm_type: super::CpCommType,
    ) -> Result<Plan> {
        use super::CpCommType::*;
        let (cp, t) = (layout.cp_size, call.rows());
        let st = layer.runtime().stream();
        let src = cp_plan::global_sources(layout, &call.local_cu);
        Ok(match comm_type {
            P2p => {
                let steps = (0..cp)
                    .map(|step| {
                        let from = cp_ring::ring_source(layout, step);
                        cp_plan::pack(cp_plan::p2p_jobs(layout, &call.local_cu, from, call.vis))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let k = Kernels::load(layer, call, steps.iter().flatten())?;
                let steps = steps
                    .into_iter()
                    .map(|l| upload_all(layer, call, l))
                    .collect::<Result<_>>()?;
                Plan::Ring(steps, k)
            }
            AllGather => {
                let jobs = cp_plan::all_gather_jobs(layout, &call.local_cu, call.vis);
                let launches = cp_plan::pack(jobs)?;
                let k = Kernels::load(layer, call, &launches)?;
                let idx: Vec<usize> = (0..2)
                    .flat_map(|half| src.iter().map(move |&(o, lr)| o * 2 * t + half * t + lr))
                    .collect();
                let idx = upload_index(st, &idx, cp * 2 * t)?;
                Plan::Gathered(upload_all(layer, call, launches)?, k, idx)
            }
            A2a => {
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
                        i32::try_from(x).map_err(|_| AttnError::InvalidArgument {
                            arg: "cu_seqlens_q".into(),
                            expected: "offsets that fit in int32".into(),
                            got: x.to_string(),
                        })
                    })
                    .collect::<Result<_>>()?;
                let tables = UlyssesTables {
                    split: upload_index(st, &cp_plan::head_split_index(t, cp), big)?,
                    to_global: upload_index(st, &to_global, big)?,
                    back: upload_index(st, &back, big)?,
                    merge: upload_index(st, &cp_plan::head_merge_index(t, cp), big)?,
                    cu: crate::cuda::tensor::upload(st, &cu, "cu_seqlens_q")?,
                };
                Plan::Ulysses(layer.cp_whole_kernel(call.mask)?, Box::new(tables))
            }
        })
    }
}

/// The buffers of `p2p` and `all_gather`, allocated before the call's first collective.
pub(crate) enum KvBuffers {
    /// `p2p`: the two ring buffers `[2 t, ng hn]` (buffer 0: the rank's own K/V).
    Ring([DeviceTensor; 2]),
    /// `all_gather`: the rank's K/V, every rank's `[cp 2 t, ng hn]`, and the same in sequence
    /// order.
    Gathered(DeviceTensor, DeviceTensor, DeviceTensor),
}

/// What `p2p` / `all_gather` write, allocated before the call's first collective.
pub(crate) struct ByKvBuffers {
    kv: KvBuffers,
    acc: CpAcc,
}

/// The buffers of `a2a`, allocated before the call's first collective: one all-to-all pair
/// per width (`np / cp` heads: q, the gate and the output on its way back; `ng / cp` groups:
/// k and v), each reused in stream order; the whole-sequence q, k, v (and gate) of this
/// rank's head block; the merged output `[t, np, hn]`.
pub(crate) struct UlyssesBuffers {
    heads: (DeviceTensor, DeviceTensor),
    groups: (DeviceTensor, DeviceTensor),
    whole: CpQkv,
    out: DeviceTensor,
}

/// The buffers of a plan ([`Plan::buffers`]).
pub(crate) enum Buffers {
    /// `p2p`, `all_gather`.
    ByKv(Box<ByKvBuffers>),
    /// `a2a`.
    Ulysses(Box<UlyssesBuffers>),
}

impl Plan {
    /// The buffers of the plan for `t` local rows.
    pub(crate) fn buffers(
        &self,
        layer: &CudaLayer,
        cp: usize,
        t: usize,
        h: &LoadedCp,
    ) -> Result<Buffers> {
        let c = layer.config();
        let w = c.groups * c.head_dim;
        let kv = match self {
            Plan::Ring(..) => KvBuffers::Ring([
                layer.cp_alloc(&[2 * t, w], "cp k/v")?,
                layer.cp_alloc(&[2 * t, w], "cp k/v (received)")?,
            ]),
            Plan::Gathered(..) => KvBuffers::Gathered(
                layer.cp_alloc(&[2 * t, w], "cp k/v")?,
                layer.cp_alloc(&[cp * 2 * t, w], "cp k/v (all ranks)")?,
                layer.cp_alloc(&[2 * t * cp, w], "cp k/v (sequence order)")?,
            ),
            Plan::Ulysses(..) => {
                let (hq, hg, hn) = (c.heads / cp, c.groups / cp, c.head_dim);
                let pair = |bw: usize, arg: &str| -> Result<(DeviceTensor, DeviceTensor)> {
                    Ok((
                        layer.cp_alloc(&[cp * t, bw * hn], arg)?,
                        layer.cp_alloc(&[cp * t, bw * hn], arg)?,
                    ))
                };
                let whole = |bw: usize, arg: &str| layer.cp_alloc(&[t * cp, bw, hn], arg);
                return Ok(Buffers::Ulysses(Box::new(UlyssesBuffers {
                    heads: pair(hq, "cp heads (a2a)")?,
                    groups: pair(hg, "cp groups (a2a)")?,
                    whole: CpQkv {
                        q: whole(hq, "cp q (a2a)")?,
                        k: whole(hg, "cp k (a2a)")?,
                        v: whole(hg, "cp v (a2a)")?,
                        gate: if c.output_gate {
                            Some(whole(hq, "cp gate (a2a)")?)
                        } else {
                            None
                        },
                    },
                    out: layer.cp_alloc(&[t, c.heads, hn], "attention output")?,
                })));
            }
        };
        Ok(Buffers::ByKv(Box::new(ByKvBuffers {
            kv,
            acc: layer.cp_acc(t, h)?,
        })))
    }
}

/// K and V into one buffer `kv` `[2 t, ng hn]` (keys, then values).
fn pack_kv(layer: &CudaLayer, qkv: &CpQkv, t: usize, kv: &mut DeviceTensor) -> Result<()> {
    let st = layer.runtime().stream();
    kv.copy_rows_from(st, 0, &qkv.k, 0, t)?;
    kv.copy_rows_from(st, t, &qkv.v, 0, t)
}

/// Run every launch over one K/V buffer (`[2 kv_rows, ng hn]`), merging into `acc`.
fn run_launches(
    layer: &CudaLayer,
    kernels: &Kernels,
    launches: &[CpLaunch],
    q: &DeviceTensor,
    kv: (&DeviceTensor, usize),
    acc: &mut CpAcc,
    h: &LoadedCp,
) -> Result<()> {
    for pl in launches {
        layer.cp_partial(kernels.get(pl.launch.kind)?, pl, q, kv, acc, h)?;
    }
    Ok(())
}

fn stream_err(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> AttnError + '_ {
    move |e| AttnError::Cuda {
        call: what.into(),
        msg: e.to_string(),
    }
}

/// The ring of `p2p` ([`cp_ring::ring_ops`]): the layer's stream computes, the
/// communicator's exchanges, events order them. The rank's own K/V is in `bufs[0]`.
#[allow(clippy::too_many_arguments)]
fn ring<C: DeviceCommunicator>(
    layer: &CudaLayer,
    comm: &C,
    (layout, overlap): (CpLayout, bool),
    (steps, kernels): (&[Vec<CpLaunch>], &Kernels),
    q: &DeviceTensor,
    bufs: &mut [DeviceTensor; 2],
    (acc, t): (&mut CpAcc, usize),
    h: &LoadedCp,
) -> Result<()> {
    let cs: &CudaStream = layer.runtime().stream();
    let xs: &CudaStream = comm.comm_stream();
    let ops = cp_ring::ring_ops(layout, overlap);
    // The first exchange after the own block is packed and both buffers exist.
    xs.join(cs)
        .map_err(stream_err("cuStreamWaitEvent (cp ring start)"))?;
    let mut run = || -> Result<()> {
        let mut done: Vec<CudaEvent> = Vec::with_capacity(ops.len());
        let mut unpolled: Vec<usize> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let s = match op.stream {
                RingStream::Compute => cs,
                RingStream::Comm => xs,
            };
            for &w in &op.waits {
                s.wait(&done[w])
                    .map_err(stream_err("cuStreamWaitEvent (cp ring)"))?;
            }
            match op.work {
                RingWork::Exchange {
                    send_buf,
                    to,
                    recv_buf,
                    from,
                    ..
                } => {
                    let [b0, b1] = bufs;
                    let (send, recv) = if send_buf == 0 && recv_buf == 1 {
                        (&*b0, b1)
                    } else {
                        (&*b1, b0)
                    };
                    comm.queue_send_recv(send, to, recv, from)?;
                    unpolled.push(i);
                }
                RingWork::Compute { step, buf, .. } => {
                    let launches = steps.get(step).ok_or_else(|| {
                        AttnError::Render(format!("no launches planned for ring step {step}"))
                    })?;
                    run_launches(layer, kernels, launches, q, (&bufs[buf], t), acc, h)?;
                }
            }
            done.push(
                s.record_event(None)
                    .map_err(stream_err("cuEventRecord (cp ring)"))?,
            );
            // The host waits for an exchange (within the communicator's timeout) only once
            // the compute that overlaps it is queued.
            if op.stream == RingStream::Compute {
                for j in unpolled.drain(..) {
                    comm.complete("send_recv", &done[j])?;
                }
            }
        }
        Ok(())
    };
    let r = run();
    // Buffers are freed in the layer stream's order: after every exchange, on error too.
    let joined = cs
        .join(xs)
        .map_err(stream_err("cuStreamWaitEvent (cp ring end)"));
    r.and(joined)
}

/// `p2p` and `all_gather` (see the module docs) into the buffers `b` of
/// [`Plan::buffers`]; `overlap` for the ring.
#[allow(clippy::too_many_arguments)]
pub(crate) fn by_kv<C: DeviceCommunicator>(
    layer: &CudaLayer,
    comm: &C,
    (layout, overlap): (CpLayout, bool),
    call: &CpCall,
    plan: &Plan,
    b: ByKvBuffers,
    qkv: &CpQkv,
    h: &LoadedCp,
) -> Result<DeviceTensor> {
    let cp = layout.cp_size;
    let t = call.rows();
    let st = layer.runtime().stream();
    let ByKvBuffers { kv, mut acc } = b;
    match (plan, kv) {
        (Plan::Ring(steps, kernels), KvBuffers::Ring(mut bufs)) => {
            pack_kv(layer, qkv, t, &mut bufs[0])?;
            ring(
                layer,
                comm,
                (layout, overlap),
                (steps, kernels),
                &qkv.q,
                &mut bufs,
                (&mut acc, t),
                h,
            )?;
        }
        (
            Plan::Gathered(launches, kernels, idx),
            KvBuffers::Gathered(mut kv, mut all, mut glob),
        ) => {
            pack_kv(layer, qkv, t, &mut kv)?;
            comm.all_gather(&kv, &mut all)?;
            drop(kv);
            h.gather_rows(st, &all, &mut glob, idx)?;
            drop(all);
            run_launches(
                layer,
                kernels,
                launches,
                &qkv.q,
                (&glob, t * cp),
                &mut acc,
                h,
            )?;
        }
        _ => {
            return Err(AttnError::InvalidArgument {
                arg: "cp_comm_type".into(),
                expected: "p2p or all_gather with their buffers here (a2a runs `ulysses`)".into(),
                got: "another plan".into(),
            })
        }
    }
    layer.cp_finish(&acc, qkv.gate.as_ref(), h)
}

/// `a2a` (see the module docs): `kern` is the layer's own kernel, `tab` the plan's tables, `b`
/// the buffers of [`Plan::buffers`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn ulysses<C: DeviceCommunicator>(
    layer: &CudaLayer,
    comm: &C,
    layout: CpLayout,
    call: &CpCall,
    (kern, tab): (&CpAttnKernel, &UlyssesTables),
    qkv: &CpQkv,
    b: UlyssesBuffers,
    h: &LoadedCp,
) -> Result<DeviceTensor> {
    let (cp, rank) = (layout.cp_size, layout.cp_rank);
    let cfg = layer.config();
    let (np, ng) = (cfg.heads, cfg.groups);
    let st = layer.runtime().stream();
    let UlyssesBuffers {
        heads: (mut hs, mut hr),
        groups: (mut gs, mut gr),
        mut whole,
        mut out,
    } = b;
    // Every token of this rank's head block, in sequence order, into `glob`
    // `[t cp, width / cp, hn]` through the all-to-all pair (send, recv) of that width.
    let scatter = |x: &DeviceTensor,
                   (send, recv): (&mut DeviceTensor, &mut DeviceTensor),
                   glob: &mut DeviceTensor|
     -> Result<()> {
        h.gather_rows(st, x, send, &tab.split)?;
        comm.all_to_all(send, recv)?;
        h.gather_rows(st, recv, glob, &tab.to_global)
    };
    scatter(&qkv.q, (&mut hs, &mut hr), &mut whole.q)?;
    scatter(&qkv.k, (&mut gs, &mut gr), &mut whole.k)?;
    scatter(&qkv.v, (&mut gs, &mut gr), &mut whole.v)?;
    match (&qkv.gate, &mut whole.gate) {
        (Some(g), Some(wg)) => scatter(g, (&mut hs, &mut hr), wg)?,
        (None, None) => {}
        _ => {
            return Err(AttnError::InvalidArgument {
                arg: "output_gate".into(),
                expected: "a gate exactly when the layer has one".into(),
                got: format!("{}", qkv.gate.is_some()),
            })
        }
    }
    drop((gs, gr));
    let hq = np / cp;
    let o = layer.cp_whole(
        kern,
        &whole,
        (&call.global_cu, &tab.cu),
        (hq, ng / cp, rank),
    )?;
    drop(whole);
    // Back: [cp (owner rank)][t] rows of this head block, all-to-all, heads merged.
    h.gather_rows(st, &o, &mut hs, &tab.back)?;
    drop(o);
    comm.all_to_all(&hs, &mut hr)?;
    h.gather_rows(st, &hr, &mut out, &tab.merge)?;
    Ok(out)
}
