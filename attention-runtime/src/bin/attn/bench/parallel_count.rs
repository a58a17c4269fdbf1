//! [`CountingComm`]: a [`Communicator`] that forwards every collective to the one it wraps and
//! counts what this rank hands it, so `attn bench parallel` reports the bytes the
//! tensor-parallel layer actually communicates (not a formula of what it should).
//!
//! Two numbers per collective, per rank:
//! - payload: the bytes of the buffer the rank hands the collective, as nccl-tests' "size":
//!   all-reduce the tensor, all-gather the gathered `recv`, reduce-scatter and all-to-all
//!   `send`, send/recv the sent buffer, the control-plane byte collectives their `bytes`;
//! - wire: what a ring algorithm sends from this rank for that payload `S` over `n` ranks
//!   (nccl-tests' bus-bandwidth factors, PERFORMANCE.md of nccl-tests): all-reduce
//!   `2 (n - 1) / n × S`, all-gather / reduce-scatter / all-to-all `(n - 1) / n × S`,
//!   send/recv `S`, byte all-gather and broadcast `(n - 1) × len`. An estimate: NCCL may pick
//!   a tree or NVLS algorithm, which moves other amounts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use attention_runtime::cuda::DeviceTensor;
use attention_runtime::parallel::{Communicator, DeviceCommunicator};
use attention_runtime::{Result, Tensor};
use cudarc::driver::{CudaEvent, CudaStream};

/// Bytes of a tensor as a collective moves it.
pub trait PayloadBytes {
    /// Elements × bytes per element.
    fn payload_bytes(&self) -> u64;
}

impl PayloadBytes for DeviceTensor {
    fn payload_bytes(&self) -> u64 {
        (self.numel() * self.elem().size()) as u64
    }
}

impl PayloadBytes for Tensor {
    /// Host tensors are f32.
    fn payload_bytes(&self) -> u64 {
        (self.numel() * 4) as u64
    }
}

/// Running totals of one rank's collectives (shared with the bench through an `Arc`, since
/// the communicator moves into the layer).
#[derive(Debug, Default)]
pub struct CommCounter {
    calls: AtomicU64,
    payload: AtomicU64,
    wire: AtomicU64,
}

/// A snapshot of a [`CommCounter`]; differences of two give one call's traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommCount {
    /// Collectives called.
    pub calls: u64,
    /// Payload bytes (see the module docs).
    pub payload: u64,
    /// Estimated bytes sent by this rank (ring algorithm).
    pub wire: u64,
}

impl CommCount {
    /// `self - earlier` (saturating).
    pub fn since(self, earlier: CommCount) -> CommCount {
        CommCount {
            calls: self.calls.saturating_sub(earlier.calls),
            payload: self.payload.saturating_sub(earlier.payload),
            wire: self.wire.saturating_sub(earlier.wire),
        }
    }
}

impl CommCounter {
    /// The totals so far.
    pub fn snapshot(&self) -> CommCount {
        CommCount {
            calls: self.calls.load(Ordering::Relaxed),
            payload: self.payload.load(Ordering::Relaxed),
            wire: self.wire.load(Ordering::Relaxed),
        }
    }

    fn add(&self, payload: u64, wire: u64) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.payload.fetch_add(payload, Ordering::Relaxed);
        self.wire.fetch_add(wire, Ordering::Relaxed);
    }
}

/// `comm` with every successful collective counted in `counter`.
#[derive(Debug)]
pub struct CountingComm<C> {
    inner: C,
    counter: Arc<CommCounter>,
}

impl<C: Communicator> CountingComm<C> {
    /// Wrap `inner`; the returned counter sees every collective it completes.
    pub fn new(inner: C) -> (Self, Arc<CommCounter>) {
        let counter = Arc::new(CommCounter::default());
        (
            CountingComm {
                inner,
                counter: counter.clone(),
            },
            counter,
        )
    }

    /// `(n - 1) / n × s`.
    fn part(&self, s: u64) -> u64 {
        let n = self.inner.world_size() as u64;
        s * n.saturating_sub(1) / n.max(1)
    }

    fn count<T>(&self, r: Result<T>, payload: u64, wire: u64) -> Result<T> {
        if r.is_ok() {
            self.counter.add(payload, wire);
        }
        r
    }
}

impl<C> Communicator for CountingComm<C>
where
    C: Communicator,
    C::Tensor: PayloadBytes,
{
    type Tensor = C::Tensor;
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&self, t: &mut C::Tensor) -> Result<()> {
        let s = t.payload_bytes();
        let r = self.inner.all_reduce_sum(t);
        self.count(r, s, 2 * self.part(s))
    }
    fn all_gather(&self, send: &C::Tensor, recv: &mut C::Tensor) -> Result<()> {
        let s = recv.payload_bytes();
        let r = self.inner.all_gather(send, recv);
        self.count(r, s, self.part(s))
    }
    fn reduce_scatter_sum(&self, send: &C::Tensor, recv: &mut C::Tensor) -> Result<()> {
        let s = send.payload_bytes();
        let r = self.inner.reduce_scatter_sum(send, recv);
        self.count(r, s, self.part(s))
    }
    fn all_to_all(&self, send: &C::Tensor, recv: &mut C::Tensor) -> Result<()> {
        let s = send.payload_bytes();
        let r = self.inner.all_to_all(send, recv);
        self.count(r, s, self.part(s))
    }
    fn send_recv(
        &self,
        send: &C::Tensor,
        to: usize,
        recv: &mut C::Tensor,
        from: usize,
    ) -> Result<()> {
        let s = send.payload_bytes();
        let r = self.inner.send_recv(send, to, recv, from);
        self.count(r, s, s)
    }
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let s = bytes.len() as u64;
        let n = self.inner.world_size() as u64;
        let r = self.inner.all_gather_bytes(bytes);
        self.count(r, s, s * n.saturating_sub(1))
    }
    fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Result<Vec<u8>> {
        let s = bytes.len() as u64;
        let n = self.inner.world_size() as u64;
        let r = self.inner.broadcast_bytes(bytes, root);
        self.count(r, s, s * n.saturating_sub(1))
    }
}

/// The overlapped ring's exchanges, counted when queued (their completion is the caller's
/// [`DeviceCommunicator::complete`], which fails the whole call when it fails).
impl<C: DeviceCommunicator> DeviceCommunicator for CountingComm<C> {
    fn caller_stream(&self) -> &Arc<CudaStream> {
        self.inner.caller_stream()
    }
    fn comm_stream(&self) -> &Arc<CudaStream> {
        self.inner.comm_stream()
    }
    fn queue_send_recv(
        &self,
        send: &DeviceTensor,
        to: usize,
        recv: &mut DeviceTensor,
        from: usize,
    ) -> Result<()> {
        let s = send.payload_bytes();
        let r = self.inner.queue_send_recv(send, to, recv, from);
        self.count(r, s, s)
    }
    fn complete(&self, op: &str, done: &CudaEvent) -> Result<()> {
        self.inner.complete(op, done)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use attention_runtime::backend::{BackendLayer, CpuLayer};
    use attention_runtime::modules::SplitMix64;
    use attention_runtime::parallel::tp_load::shard_layer;
    use attention_runtime::parallel::{run_ranks, TpLayer};
    use attention_runtime::spec_layer::SpecLayer;
    use attention_runtime::{AttentionLayer, ForwardArgs, RuntimeDims};

    use super::*;

    const SPEC: &str =
        "self, heads=4, gqa=2, head_dim=32, hidden=128, qk_layernorm=rms, rope, mask=causal";

    /// A TP = 2 forward on the CPU reference over the in-process communicator: one
    /// all-reduce of the output `[s, b, h]` f32 per rank; with sequence parallelism an
    /// all-gather of the input and a reduce-scatter of the output, both of the whole
    /// sequence.
    fn counted_forward(sp: bool) -> Vec<CommCount> {
        let cfg = SpecLayer::config_from_str(SPEC, &RuntimeDims::default()).unwrap();
        let full = SpecLayer::init(cfg, 3).unwrap();
        let (s, h) = (8usize, 128usize);
        let mut rng = SplitMix64::new(5);
        let x = Tensor::from_fn(&[s, 1, h], |_| rng.uniform());
        run_ranks(2, Duration::from_secs(30), |comm| {
            let rank = comm.rank();
            let (comm, counter) = CountingComm::new(comm);
            let shard = shard_layer(&full, rank, 2).unwrap();
            let layer = TpLayer::new(CpuLayer::new(shard), comm, full.config(), sp).unwrap();
            let input = if sp {
                Tensor::from_fn(&[s / 2, 1, h], |i| x.data()[rank * (s / 2) * h + i])
            } else {
                x.clone()
            };
            let before = counter.snapshot();
            layer.forward(&input, &ForwardArgs::default())?;
            Ok(counter.snapshot().since(before))
        })
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
    }

    #[test]
    fn tp2_forward_counts_one_all_reduce_of_the_output() {
        let bytes = (8 * 128 * 4) as u64;
        for c in counted_forward(false) {
            assert_eq!(
                c,
                CommCount {
                    calls: 1,
                    payload: bytes,
                    wire: bytes // 2 (n - 1) / n = 1 at n = 2
                }
            );
        }
    }

    #[test]
    fn tp2_sequence_parallel_counts_gather_and_scatter() {
        let bytes = (8 * 128 * 4) as u64;
        for c in counted_forward(true) {
            assert_eq!(
                c,
                CommCount {
                    calls: 2,
                    payload: 2 * bytes,
                    wire: bytes
                }
            );
        }
    }

    #[test]
    fn failed_collectives_are_not_counted_and_since_saturates() {
        let out = run_ranks(2, Duration::from_secs(30), |comm| {
            let (comm, counter) = CountingComm::new(comm);
            // recv of the wrong size: a Shape error before anything is sent.
            let send = Tensor::zeros(&[4]);
            let mut recv = Tensor::zeros(&[3]);
            let err = comm.all_gather(&send, &mut recv).is_err();
            Ok((err, counter.snapshot()))
        })
        .unwrap();
        for r in out {
            let (err, c) = r.unwrap();
            assert!(err);
            assert_eq!(c, CommCount::default());
        }
        let a = CommCount {
            calls: 1,
            payload: 10,
            wire: 5,
        };
        assert_eq!(CommCount::default().since(a), CommCount::default());
    }
}
