//! [`NcclComm`]: a [`Communicator`] over device tensors through cudarc's NCCL bindings
//! (`cudarc::nccl`, loaded at run time: a machine without libnccl gets
//! [`AttnError::BackendUnavailable`] from [`nccl_version`], never a panic; the id and the
//! probe are in [`super::nccl_id`]).
//!
//! Launch: one NCCL communicator per GPU, each created and used on its own thread, either
//! one process driving several GPUs (one thread per GPU, the [`NcclUniqueId`] shared in
//! memory) or one process per GPU (rank 0 makes the id and hands it over through a file,
//! [`NcclUniqueId::write_file`] / [`NcclUniqueId::read_file`], or an environment variable,
//! [`NcclUniqueId::from_env`]). cudarc's `Comm` is not `Send`, so a communicator stays on the
//! thread that made it.
//!
//! Streams: NCCL runs on the communicator's own stream ([`NcclComm::comm_stream`], forked
//! from the runtime's). Every [`Communicator`] collective is ordered with the stream of the
//! [`CudaRuntime`] the communicator was made with (the caller's stream, on which the rank's
//! [`CudaLayer`](crate::cuda::CudaLayer) queues its kernels): the communication stream waits
//! for the caller's stream before the collective, and the caller's stream for the collective
//! after it (two events), so a collective behaves as if it were queued on the caller's stream.
//! [`DeviceCommunicator`] adds the unordered form of `send_recv` that the overlapped `p2p`
//! ring orders itself with events ([`super::cp_ring`]). Grouped calls (`all_to_all`,
//! `send_recv`) use NCCL's group API directly on the communication stream.
//!
//! Timeouts: with a timeout set, each collective (the byte collectives too, before they read
//! their result back) records an event after it and polls it until done or the timeout passes.
//! On a timeout, or an NCCL error, the communicator is aborted at once (`ncclCommAbort`, which
//! ends its queued kernels, so no later work waits behind a dead collective) and marked
//! broken: that call and every later one return [`AttnError::Collective`] without queuing
//! anything ([`NcclComm::broken`] says why). Without a timeout collectives are asynchronous.
//! With a timeout, [`NcclComm::new`] runs `ncclCommInitRank` (which blocks until every rank
//! has joined; cudarc gives no non-blocking init) on a helper thread and returns
//! [`AttnError::Collective`] when it has not finished within the timeout or
//! [`INIT_MIN_TIMEOUT`], whichever is longer (that thread stays blocked in
//! NCCL: the cost of a peer that never came). What is not bounded: NCCL may connect peers lazily inside the first collective's host call
//! (`NCCL_RUNTIME_CONNECT`), and ranks that call different collectives or sizes are undefined
//! behaviour in NCCL (the in-process communicator detects them; NCCL cannot).
//!
//! Not run in CI: no GPU there. The two-GPU tests are `attention-runtime/tests/gpu_parallel.rs`
//! and `gpu_parallel_cp.rs`.

use std::cell::{Ref, RefCell};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream};
use cudarc::nccl::{result as nccl_result, Comm, Id, NcclType, ReduceOp};

use super::comm::{check_blocks, check_numel, check_peer, Communicator};
use super::nccl_id::{nccl_version, NcclUniqueId};
use crate::cuda::{CudaRuntime, DeviceElem, DeviceTensor, ElemType};
use crate::error::{AttnError, Result};

/// A [`Communicator`] over device tensors whose collectives run on a stream of their own, with
/// the unordered exchange that an overlapped schedule orders itself ([`super::cp_ring`]).
pub trait DeviceCommunicator: Communicator<Tensor = DeviceTensor> {
    /// The stream the [`Communicator`] collectives are ordered with, before and after (the
    /// runtime's): a layer that uses this communicator must queue its kernels there.
    fn caller_stream(&self) -> &Arc<CudaStream>;
    /// The stream the exchanges run on.
    fn comm_stream(&self) -> &Arc<CudaStream>;
    /// Queue [`Communicator::send_recv`] on [`comm_stream`](Self::comm_stream) only: no
    /// ordering with any other stream and no waiting. The caller makes the communication
    /// stream wait for the buffers' writers and last readers, records an event after it for
    /// the buffers' next users, and hands that event to [`complete`](Self::complete).
    ///
    /// Errors: as [`Communicator::send_recv`].
    fn queue_send_recv(
        &self,
        send: &DeviceTensor,
        to: usize,
        recv: &mut DeviceTensor,
        from: usize,
    ) -> Result<()>;
    /// Wait (on the host, within the timeout when one is set; at once without) for `done`, an
    /// event recorded on the communication stream after queued exchanges of `op`.
    ///
    /// Errors: [`AttnError::Collective`] when the timeout passes (the communicator is then
    /// aborted and broken) or the event fails.
    fn complete(&self, op: &str, done: &CudaEvent) -> Result<()>;
}

/// One rank of an NCCL group on one GPU (see the module docs).
#[derive(Debug)]
pub struct NcclComm {
    /// `None` once aborted.
    comm: RefCell<Option<Comm>>,
    rank: usize,
    world_size: usize,
    rt: Arc<CudaRuntime>,
    /// NCCL's stream.
    stream: Arc<CudaStream>,
    timeout: Option<Duration>,
    /// Why the communicator was aborted.
    broken: RefCell<Option<String>>,
}

impl NcclComm {
    /// Join the group `id` as `rank` of `world_size` on `rt`'s device
    /// (`ncclCommInitRank`: blocks until every rank has joined); collectives are ordered with
    /// `rt`'s stream and run on a stream of their own. `timeout` bounds each collective's
    /// completion (`None`: asynchronous, unbounded).
    ///
    /// Errors: those of [`nccl_version`]; [`AttnError::InvalidArgument`] (`rank`) for a rank
    /// outside `0..world_size`; [`AttnError::Cuda`] binding the device or creating the
    /// stream; [`AttnError::Collective`] (`ncclCommInitRank`) naming NCCL's error.
    pub fn new(
        rt: Arc<CudaRuntime>,
        rank: usize,
        world_size: usize,
        id: &NcclUniqueId,
        timeout: Option<Duration>,
    ) -> Result<Self> {
        nccl_version()?;
        check_peer("rank", rank, world_size)?;
        let cuda = |call: &str| {
            let call = call.to_string();
            move |e: cudarc::driver::DriverError| AttnError::Cuda {
                call,
                msg: e.to_string(),
            }
        };
        // NCCL takes the device from the thread's current context.
        rt.device()
            .context
            .bind_to_thread()
            .map_err(cuda("bind_to_thread (NCCL init)"))?;
        let stream = rt
            .stream()
            .fork()
            .map_err(cuda("cuStreamCreate (NCCL stream)"))?;
        let raw = Id::uninit(id.bytes().map(|b| b as ::core::ffi::c_char));
        let init_stream = stream.clone();
        let ctx = rt.device().context.clone();
        let init = move || -> Result<SendComm> {
            ctx.bind_to_thread()
                .map_err(cuda("bind_to_thread (NCCL init)"))?;
            Comm::from_rank(init_stream, rank, world_size, raw)
                .map(SendComm)
                .map_err(|e| AttnError::Collective {
                    op: "ncclCommInitRank".into(),
                    rank,
                    expected: format!("ncclSuccess joining a group of {world_size}"),
                    got: format!("{:?}", e.0),
                })
        };
        let comm = match timeout.map(|t| t.max(INIT_MIN_TIMEOUT)) {
            None => init()?.0,
            Some(t) => {
                run_with_timeout(init, t)
                    .ok_or_else(|| AttnError::Collective {
                        op: "ncclCommInitRank".into(),
                        rank,
                        expected: format!("every rank of {world_size} joining within {t:?}"),
                        got: "timed out (a peer never joined; the init thread is left blocked \
                              in NCCL)"
                            .into(),
                    })??
                    .0
            }
        };
        Ok(NcclComm {
            comm: RefCell::new(Some(comm)),
            rank,
            world_size,
            rt,
            stream,
            timeout,
            broken: RefCell::new(None),
        })
    }

    /// The runtime whose stream the collectives are ordered with.
    pub fn runtime(&self) -> &Arc<CudaRuntime> {
        &self.rt
    }

    /// Why the communicator was aborted (a timeout or an NCCL error), or `None` while it is
    /// usable.
    pub fn broken(&self) -> Option<String> {
        self.broken.borrow().clone()
    }

    /// The communicator, or the error of a broken one.
    fn live(&self, op: &str) -> Result<Ref<'_, Comm>> {
        let c = self.comm.borrow();
        if c.is_some() {
            return Ok(Ref::map(c, |c| c.as_ref().expect("checked above")));
        }
        Err(AttnError::Collective {
            op: op.into(),
            rank: self.rank,
            expected: "a usable communicator".into(),
            got: format!(
                "it was aborted earlier ({}); make a new group",
                self.broken().unwrap_or_default()
            ),
        })
    }

    /// Abort the communicator (`ncclCommAbort`, through dropping cudarc's `Comm`) and mark it
    /// broken with `why`.
    fn abort(&self, why: String) {
        let comm = self.comm.borrow_mut().take();
        if let Some(c) = comm {
            // cudarc's drop panics when ncclCommAbort itself fails: the communicator is gone
            // either way.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(c)));
        }
        self.broken.borrow_mut().get_or_insert(why);
    }

    fn nccl_err(&self, op: &str) -> impl FnOnce(nccl_result::NcclError) -> AttnError + '_ {
        let op = op.to_string();
        move |e| AttnError::Collective {
            op,
            rank: self.rank,
            expected: "ncclSuccess".into(),
            got: format!("{:?}", e.0),
        }
    }

    fn cuda_err(&self, op: &str) -> impl FnOnce(cudarc::driver::DriverError) -> AttnError + '_ {
        let op = op.to_string();
        move |e| AttnError::Collective {
            op,
            rank: self.rank,
            expected: "the stream to run".into(),
            got: e.to_string(),
        }
    }

    /// With a timeout: wait for `done` on the host, aborting the communicator when the
    /// timeout passes.
    fn wait_event(&self, op: &str, done: &CudaEvent) -> Result<()> {
        let Some(timeout) = self.timeout else {
            return Ok(());
        };
        let start = Instant::now();
        while !done.try_is_complete().map_err(self.cuda_err(op))? {
            if start.elapsed() > timeout {
                self.abort(format!("`{op}` timed out after {timeout:?}"));
                return Err(AttnError::Collective {
                    op: op.into(),
                    rank: self.rank,
                    expected: format!("completion within {timeout:?}"),
                    got: "still running (a peer is missing or stuck); the communicator is \
                          aborted"
                        .into(),
                });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(())
    }

    /// Queue `f` on the communication stream, ordered with the caller's stream before and
    /// after, then (with a timeout) wait for it. An NCCL error aborts the communicator.
    fn ordered(&self, op: &str, f: impl FnOnce(&Comm) -> Result<()>) -> Result<()> {
        let comm = self.live(op)?;
        self.stream
            .join(self.rt.stream())
            .map_err(self.cuda_err(op))?;
        let r = f(&comm);
        drop(comm);
        if let Err(e @ AttnError::Collective { .. }) = &r {
            self.abort(e.to_string());
        }
        r?;
        let done = self.stream.record_event(None).map_err(self.cuda_err(op))?;
        self.rt.stream().wait(&done).map_err(self.cuda_err(op))?;
        self.wait_event(op, &done)
    }

    fn grouped(&self, op: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        nccl_result::group_start().map_err(self.nccl_err(op))?;
        let r = f();
        let end = nccl_result::group_end()
            .map(|_| ())
            .map_err(self.nccl_err(op));
        r.and(end)
    }
}

fn typed_all_reduce<T: DeviceElem + NcclType>(
    c: &NcclComm,
    comm: &Comm,
    t: &mut DeviceTensor,
) -> Result<()> {
    let n = t.numel();
    let s = t.typed_mut::<T>("t")?;
    comm.all_reduce_in_place(&mut s.slice_mut(..n), &ReduceOp::Sum)
        .map_err(c.nccl_err("all_reduce"))?;
    Ok(())
}

fn typed_all_gather<T: DeviceElem + NcclType>(
    c: &NcclComm,
    comm: &Comm,
    send: &DeviceTensor,
    recv: &mut DeviceTensor,
) -> Result<()> {
    let (n, m) = (send.numel(), recv.numel());
    let s = send.typed::<T>("send")?;
    let r = recv.typed_mut::<T>("recv")?;
    comm.all_gather(&s.slice(..n), &mut r.slice_mut(..m))
        .map_err(c.nccl_err("all_gather"))?;
    Ok(())
}

fn typed_reduce_scatter<T: DeviceElem + NcclType>(
    c: &NcclComm,
    comm: &Comm,
    send: &DeviceTensor,
    recv: &mut DeviceTensor,
) -> Result<()> {
    let (n, m) = (send.numel(), recv.numel());
    let s = send.typed::<T>("send")?;
    let r = recv.typed_mut::<T>("recv")?;
    comm.reduce_scatter(&s.slice(..n), &mut r.slice_mut(..m), &ReduceOp::Sum)
        .map_err(c.nccl_err("reduce_scatter"))?;
    Ok(())
}

/// Grouped sends and receives: `(send block, to)` and `(recv block, from)` pairs, element
/// ranges of `send` / `recv`.
#[allow(clippy::too_many_arguments)]
fn typed_p2p<T: DeviceElem + NcclType>(
    c: &NcclComm,
    comm: &Comm,
    op: &str,
    send: &DeviceTensor,
    recv: &mut DeviceTensor,
    sends: &[(std::ops::Range<usize>, usize)],
    recvs: &[(std::ops::Range<usize>, usize)],
) -> Result<()> {
    let s = send.typed::<T>("send")?;
    let r = recv.typed_mut::<T>("recv")?;
    c.grouped(op, || {
        for (range, to) in sends {
            comm.send(&s.slice(range.clone()), *to as i32)
                .map_err(c.nccl_err(op))?;
        }
        for (range, from) in recvs {
            comm.recv(&mut r.slice_mut(range.clone()), *from as i32)
                .map_err(c.nccl_err(op))?;
        }
        Ok(())
    })
}

macro_rules! by_elem {
    ($elem:expr, $f:ident ( $($a:expr),* )) => {
        match $elem {
            ElemType::Bf16 => $f::<half::bf16>($($a),*),
            ElemType::F16 => $f::<half::f16>($($a),*),
            ElemType::F32 => $f::<f32>($($a),*),
        }
    };
}

impl NcclComm {
    fn upload_u8(&self, v: &[u8]) -> Result<CudaSlice<u8>> {
        self.rt
            .stream()
            .clone_htod(v)
            .map_err(self.cuda_err("bytes upload"))
    }

    fn download_u8(&self, s: &CudaSlice<u8>) -> Result<Vec<u8>> {
        self.rt
            .stream()
            .clone_dtoh(s)
            .map_err(self.cuda_err("bytes download"))
    }
}

impl Communicator for NcclComm {
    type Tensor = DeviceTensor;
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn all_reduce_sum(&self, t: &mut DeviceTensor) -> Result<()> {
        self.ordered("all_reduce", |comm| {
            by_elem!(t.elem(), typed_all_reduce(self, comm, t))
        })
    }
    fn all_gather(&self, send: &DeviceTensor, recv: &mut DeviceTensor) -> Result<()> {
        check_numel(
            "recv",
            "all_gather",
            recv.numel(),
            send.numel() * self.world_size(),
        )?;
        self.ordered("all_gather", |comm| {
            by_elem!(send.elem(), typed_all_gather(self, comm, send, recv))
        })
    }
    fn reduce_scatter_sum(&self, send: &DeviceTensor, recv: &mut DeviceTensor) -> Result<()> {
        let w = check_blocks("send", "reduce_scatter", send.numel(), self.world_size())?;
        check_numel("recv", "reduce_scatter", recv.numel(), w)?;
        self.ordered("reduce_scatter", |comm| {
            by_elem!(send.elem(), typed_reduce_scatter(self, comm, send, recv))
        })
    }
    fn all_to_all(&self, send: &DeviceTensor, recv: &mut DeviceTensor) -> Result<()> {
        let n = self.world_size();
        let w = check_blocks("send", "all_to_all", send.numel(), n)?;
        check_numel("recv", "all_to_all", recv.numel(), send.numel())?;
        let blocks: Vec<_> = (0..n).map(|j| (j * w..(j + 1) * w, j)).collect();
        self.ordered("all_to_all", |comm| {
            by_elem!(
                send.elem(),
                typed_p2p(self, comm, "all_to_all", send, recv, &blocks, &blocks)
            )
        })
    }
    fn send_recv(
        &self,
        send: &DeviceTensor,
        to: usize,
        recv: &mut DeviceTensor,
        from: usize,
    ) -> Result<()> {
        check_peer("to", to, self.world_size())?;
        check_peer("from", from, self.world_size())?;
        let sends = [(0..send.numel(), to)];
        let recvs = [(0..recv.numel(), from)];
        self.ordered("send_recv", |comm| {
            by_elem!(
                send.elem(),
                typed_p2p(self, comm, "send_recv", send, recv, &sends, &recvs)
            )
        })
    }
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let n = self.world_size();
        let op = "all_gather_bytes";
        // Lengths first (8 little-endian bytes each), then every rank's bytes padded to the
        // longest. Each download below waits for the caller's stream, which waits for the
        // collective: `ordered` bounds that wait first.
        let len = self.upload_u8(&(bytes.len() as u64).to_le_bytes())?;
        let mut lens = self.upload_u8(&vec![0u8; 8 * n])?;
        self.ordered(op, |comm| {
            comm.all_gather(&len, &mut lens)
                .map(|_| ())
                .map_err(self.nccl_err(op))
        })?;
        let lens: Vec<usize> = self
            .download_u8(&lens)?
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as usize)
            .collect();
        let max = lens.iter().copied().max().unwrap_or(0).max(1);
        let mut padded = bytes.to_vec();
        padded.resize(max, 0);
        let send = self.upload_u8(&padded)?;
        let mut recv = self.upload_u8(&vec![0u8; max * n])?;
        self.ordered(op, |comm| {
            comm.all_gather(&send, &mut recv)
                .map(|_| ())
                .map_err(self.nccl_err(op))
        })?;
        let all = self.download_u8(&recv)?;
        Ok(lens
            .iter()
            .enumerate()
            .map(|(i, &l)| all[i * max..i * max + l].to_vec())
            .collect())
    }
    fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Result<Vec<u8>> {
        check_peer("root", root, self.world_size())?;
        let op = "broadcast_bytes";
        let mut len = self.upload_u8(&(bytes.len() as u64).to_le_bytes())?;
        self.ordered(op, |comm| {
            comm.broadcast_in_place(&mut len, root as i32)
                .map(|_| ())
                .map_err(self.nccl_err(op))
        })?;
        let l = self.download_u8(&len)?;
        let l = u64::from_le_bytes(l.try_into().unwrap_or([0; 8])) as usize;
        let mut data = bytes.to_vec();
        data.resize(l.max(1), 0);
        let mut buf = self.upload_u8(&data)?;
        self.ordered(op, |comm| {
            comm.broadcast_in_place(&mut buf, root as i32)
                .map(|_| ())
                .map_err(self.nccl_err(op))
        })?;
        let mut out = self.download_u8(&buf)?;
        out.truncate(l);
        Ok(out)
    }
}

impl DeviceCommunicator for NcclComm {
    fn caller_stream(&self) -> &Arc<CudaStream> {
        self.rt.stream()
    }
    fn comm_stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    fn queue_send_recv(
        &self,
        send: &DeviceTensor,
        to: usize,
        recv: &mut DeviceTensor,
        from: usize,
    ) -> Result<()> {
        check_peer("to", to, self.world_size())?;
        check_peer("from", from, self.world_size())?;
        let (sends, recvs) = ([(0..send.numel(), to)], [(0..recv.numel(), from)]);
        let comm = self.live("send_recv")?;
        let r = by_elem!(
            send.elem(),
            typed_p2p(self, &comm, "send_recv", send, recv, &sends, &recvs)
        );
        drop(comm);
        if let Err(e @ AttnError::Collective { .. }) = &r {
            self.abort(e.to_string());
        }
        r
    }
    fn complete(&self, op: &str, done: &CudaEvent) -> Result<()> {
        self.wait_event(op, done)
    }
}

/// The least time [`NcclComm::new`] gives `ncclCommInitRank` when a timeout is set (NCCL's
/// own setup, topology discovery and connections, takes seconds).
pub const INIT_MIN_TIMEOUT: Duration = Duration::from_secs(20);

/// cudarc's `Comm`, handed once from the init thread to the caller's.
struct SendComm(Comm);

// SAFETY: an NCCL communicator may be used from any thread as long as no two threads use it
// at once; the init thread creates it and hands it over through a channel without touching it
// again (or, on a timeout, never finishes and never hands it over).
unsafe impl Send for SendComm {}

/// Run `f` on a new thread and wait at most `timeout` for its result: `None` when it has not
/// finished by then (the thread is left running; its result is dropped when it ends).
pub(crate) fn run_with_timeout<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
    timeout: Duration,
) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // The receiver is gone after a timeout: nothing to do with the result then.
        let _ = tx.send(f());
    });
    rx.recv_timeout(timeout).ok()
}

#[cfg(test)]
mod init_timeout_tests {
    use super::*;

    #[test]
    fn a_blocked_call_times_out_and_a_quick_one_returns() {
        let t0 = Instant::now();
        let blocked = run_with_timeout(
            || std::thread::sleep(Duration::from_secs(30)),
            Duration::from_millis(200),
        );
        assert!(blocked.is_none());
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert_eq!(run_with_timeout(|| 7, Duration::from_secs(5)), Some(7));
    }
}
