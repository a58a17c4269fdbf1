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
//! Streams: every collective is queued on the stream of the [`CudaRuntime`] the communicator
//! was made with, the stream the rank's [`CudaLayer`](crate::cuda::CudaLayer) queues its
//! kernels on, so collectives and kernels are ordered without events. Grouped calls
//! (`all_to_all`, `send_recv`) use NCCL's group API directly, which is only correct on that one
//! stream (cudarc records its buffer-use events before `ncclGroupEnd`).
//!
//! Timeouts: with a timeout set, each collective (the byte collectives too, before they read
//! their result back) records an event after it and polls it until done or the timeout passes
//! ([`AttnError::Collective`]); dropping the communicator then
//! aborts it (`ncclCommAbort`). Without a timeout collectives are asynchronous. What is not
//! bounded: `ncclCommInitRank` blocks until every rank has joined (cudarc gives no
//! non-blocking init), NCCL may connect peers lazily inside the first collective's host call
//! (`NCCL_RUNTIME_CONNECT`), and ranks that call different collectives or sizes are undefined
//! behaviour in NCCL (the in-process communicator detects them; NCCL cannot).
//!
//! Not run in CI: no GPU there. The two-GPU tests are `attention-runtime/tests/gpu_parallel.rs`
//! and `gpu_parallel_cp.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::CudaSlice;
use cudarc::nccl::{result as nccl_result, Comm, Id, NcclType, ReduceOp};

use super::comm::{check_blocks, check_numel, check_peer, Communicator};
use super::nccl_id::{nccl_version, NcclUniqueId};
use crate::cuda::{CudaRuntime, DeviceElem, DeviceTensor, ElemType};
use crate::error::{AttnError, Result};

/// One rank of an NCCL group on one GPU (see the module docs).
#[derive(Debug)]
pub struct NcclComm {
    comm: Comm,
    rt: Arc<CudaRuntime>,
    timeout: Option<Duration>,
}

impl NcclComm {
    /// Join the group `id` as `rank` of `world_size` on `rt`'s device and stream
    /// (`ncclCommInitRank`: blocks until every rank has joined). `timeout` bounds each
    /// collective's completion (`None`: asynchronous, unbounded).
    ///
    /// Errors: those of [`nccl_version`]; [`AttnError::InvalidArgument`] (`rank`) for a rank
    /// outside `0..world_size`; [`AttnError::Cuda`] binding the device;
    /// [`AttnError::Collective`] (`ncclCommInitRank`) naming NCCL's error.
    pub fn new(
        rt: Arc<CudaRuntime>,
        rank: usize,
        world_size: usize,
        id: &NcclUniqueId,
        timeout: Option<Duration>,
    ) -> Result<Self> {
        nccl_version()?;
        check_peer("rank", rank, world_size)?;
        // NCCL takes the device from the thread's current context.
        rt.device()
            .context
            .bind_to_thread()
            .map_err(|e| AttnError::Cuda {
                call: "bind_to_thread (NCCL init)".into(),
                msg: e.to_string(),
            })?;
        let raw = Id::uninit(id.bytes().map(|b| b as ::core::ffi::c_char));
        let comm = Comm::from_rank(rt.stream().clone(), rank, world_size, raw).map_err(|e| {
            AttnError::Collective {
                op: "ncclCommInitRank".into(),
                rank,
                expected: format!("ncclSuccess joining a group of {world_size}"),
                got: format!("{:?}", e.0),
            }
        })?;
        Ok(NcclComm { comm, rt, timeout })
    }

    /// The runtime (device and stream) the collectives run on.
    pub fn runtime(&self) -> &Arc<CudaRuntime> {
        &self.rt
    }

    fn nccl_err(&self, op: &str) -> impl FnOnce(nccl_result::NcclError) -> AttnError + '_ {
        let op = op.to_string();
        move |e| AttnError::Collective {
            op,
            rank: self.comm.rank(),
            expected: "ncclSuccess".into(),
            got: format!("{:?}", e.0),
        }
    }

    fn cuda_err(&self, op: &str) -> impl FnOnce(cudarc::driver::DriverError) -> AttnError + '_ {
        let op = op.to_string();
        move |e| AttnError::Collective {
            op,
            rank: self.comm.rank(),
            expected: "the stream to run".into(),
            got: e.to_string(),
        }
    }

    /// With a timeout: wait for what `op` queued, polling an event.
    fn wait(&self, op: &str) -> Result<()> {
        let Some(timeout) = self.timeout else {
            return Ok(());
        };
        let ev = self
            .rt
            .stream()
            .record_event(None)
            .map_err(self.cuda_err(op))?;
        let start = Instant::now();
        while !ev.try_is_complete().map_err(self.cuda_err(op))? {
            if start.elapsed() > timeout {
                return Err(AttnError::Collective {
                    op: op.into(),
                    rank: self.comm.rank(),
                    expected: format!("completion within {timeout:?}"),
                    got: "still running (a peer is missing or stuck; drop this \
                          communicator to abort it)"
                        .into(),
                });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(())
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

fn typed_all_reduce<T: DeviceElem + NcclType>(c: &NcclComm, t: &mut DeviceTensor) -> Result<()> {
    let n = t.numel();
    let s = t.typed_mut::<T>("t")?;
    c.comm
        .all_reduce_in_place(&mut s.slice_mut(..n), &ReduceOp::Sum)
        .map_err(c.nccl_err("all_reduce"))?;
    Ok(())
}

fn typed_all_gather<T: DeviceElem + NcclType>(
    c: &NcclComm,
    send: &DeviceTensor,
    recv: &mut DeviceTensor,
) -> Result<()> {
    let (n, m) = (send.numel(), recv.numel());
    let s = send.typed::<T>("send")?;
    let r = recv.typed_mut::<T>("recv")?;
    c.comm
        .all_gather(&s.slice(..n), &mut r.slice_mut(..m))
        .map_err(c.nccl_err("all_gather"))?;
    Ok(())
}

fn typed_reduce_scatter<T: DeviceElem + NcclType>(
    c: &NcclComm,
    send: &DeviceTensor,
    recv: &mut DeviceTensor,
) -> Result<()> {
    let (n, m) = (send.numel(), recv.numel());
    let s = send.typed::<T>("send")?;
    let r = recv.typed_mut::<T>("recv")?;
    c.comm
        .reduce_scatter(&s.slice(..n), &mut r.slice_mut(..m), &ReduceOp::Sum)
        .map_err(c.nccl_err("reduce_scatter"))?;
    Ok(())
}

/// Grouped sends and receives: `(send block, to)` and `(recv block, from)` pairs, element
/// ranges of `send` / `recv`.
fn typed_p2p<T: DeviceElem + NcclType>(
    c: &NcclComm,
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
            c.comm
                .send(&s.slice(range.clone()), *to as i32)
                .map_err(c.nccl_err(op))?;
        }
        for (range, from) in recvs {
            c.comm
                .recv(&mut r.slice_mut(range.clone()), *from as i32)
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
        self.comm.rank()
    }
    fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    fn all_reduce_sum(&self, t: &mut DeviceTensor) -> Result<()> {
        by_elem!(t.elem(), typed_all_reduce(self, t))?;
        self.wait("all_reduce")
    }
    fn all_gather(&self, send: &DeviceTensor, recv: &mut DeviceTensor) -> Result<()> {
        check_numel(
            "recv",
            "all_gather",
            recv.numel(),
            send.numel() * self.world_size(),
        )?;
        by_elem!(send.elem(), typed_all_gather(self, send, recv))?;
        self.wait("all_gather")
    }
    fn reduce_scatter_sum(&self, send: &DeviceTensor, recv: &mut DeviceTensor) -> Result<()> {
        let w = check_blocks("send", "reduce_scatter", send.numel(), self.world_size())?;
        check_numel("recv", "reduce_scatter", recv.numel(), w)?;
        by_elem!(send.elem(), typed_reduce_scatter(self, send, recv))?;
        self.wait("reduce_scatter")
    }
    fn all_to_all(&self, send: &DeviceTensor, recv: &mut DeviceTensor) -> Result<()> {
        let n = self.world_size();
        let w = check_blocks("send", "all_to_all", send.numel(), n)?;
        check_numel("recv", "all_to_all", recv.numel(), send.numel())?;
        let blocks: Vec<_> = (0..n).map(|j| (j * w..(j + 1) * w, j)).collect();
        by_elem!(
            send.elem(),
            typed_p2p(self, "all_to_all", send, recv, &blocks, &blocks)
        )?;
        self.wait("all_to_all")
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
        by_elem!(
            send.elem(),
            typed_p2p(self, "send_recv", send, recv, &sends, &recvs)
        )?;
        self.wait("send_recv")
    }
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let n = self.world_size();
        // Lengths first (8 little-endian bytes each), then every rank's bytes padded to the
        // longest.
        let len = self.upload_u8(&(bytes.len() as u64).to_le_bytes())?;
        let mut lens = self.upload_u8(&vec![0u8; 8 * n])?;
        self.comm
            .all_gather(&len, &mut lens)
            .map_err(self.nccl_err("all_gather_bytes"))?;
        // The download below synchronizes the stream: bound the wait first.
        self.wait("all_gather_bytes")?;
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
        self.comm
            .all_gather(&send, &mut recv)
            .map_err(self.nccl_err("all_gather_bytes"))?;
        self.wait("all_gather_bytes")?;
        let all = self.download_u8(&recv)?;
        Ok(lens
            .iter()
            .enumerate()
            .map(|(i, &l)| all[i * max..i * max + l].to_vec())
            .collect())
    }
    fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Result<Vec<u8>> {
        check_peer("root", root, self.world_size())?;
        let mut len = self.upload_u8(&(bytes.len() as u64).to_le_bytes())?;
        self.comm
            .broadcast_in_place(&mut len, root as i32)
            .map_err(self.nccl_err("broadcast_bytes"))?;
        self.wait("broadcast_bytes")?;
        let l = self.download_u8(&len)?;
        let l = u64::from_le_bytes(l.try_into().unwrap_or([0; 8])) as usize;
        let mut data = bytes.to_vec();
        data.resize(l.max(1), 0);
        let mut buf = self.upload_u8(&data)?;
        self.comm
            .broadcast_in_place(&mut buf, root as i32)
            .map_err(self.nccl_err("broadcast_bytes"))?;
        self.wait("broadcast_bytes")?;
        let mut out = self.download_u8(&buf)?;
        out.truncate(l);
        Ok(out)
    }
}
