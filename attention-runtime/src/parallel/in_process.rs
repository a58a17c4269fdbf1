//! [`InProcessComm`]: a [`Communicator`] over host tensors for N ranks driven by N threads of
//! one process, on std channels. It is the CPU backend's communicator and the oracle the NCCL
//! path is compared with.
//!
//! Every ordered pair of ranks has its own channel, and every message carries the collective
//! that sent it and its index on that pair, so ranks that call different collectives (or the
//! same one with other sizes) get [`AttnError::Collective`] instead of garbage. A receive
//! waits at most the group's timeout: a peer that never comes is an error, never a hang; a
//! peer whose communicator was dropped (it failed or exited) is an error at once.
//!
//! Sums (`all_reduce_sum`, `reduce_scatter_sum`) are taken in f64 in rank order `0..n` on
//! every rank, then rounded to f32 once, so every rank gets the same bits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::Duration;

use super::comm::{check_blocks, check_numel, check_peer, Communicator};
use crate::error::{AttnError, Result};
use crate::tensor::Tensor;

/// What travels between two ranks.
#[derive(Debug)]
enum Payload {
    F32(Vec<f32>),
    Bytes(Vec<u8>),
}

#[derive(Debug)]
struct Msg {
    op: &'static str,
    index: u64,
    payload: Payload,
}

/// One rank's end of an in-process group (see the module docs). `Send + Sync`: move each
/// rank's communicator to its thread ([`run_ranks`] does).
#[derive(Debug)]
pub struct InProcessComm {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// `to[j]`: the channel to rank `j` (`None` for this rank).
    to: Vec<Option<Sender<Msg>>>,
    /// `from[i]`: the channel from rank `i` (`None` for this rank).
    from: Vec<Option<Mutex<Receiver<Msg>>>>,
    /// Messages sent to / received from each peer so far.
    sent: Vec<AtomicU64>,
    received: Vec<AtomicU64>,
}

impl InProcessComm {
    /// A group of `world_size` ranks whose receives wait at most `timeout`; element `r` is
    /// rank `r`'s communicator.
    ///
    /// Errors: [`AttnError::InvalidArgument`] (`world_size`) for 0.
    pub fn group(world_size: usize, timeout: Duration) -> Result<Vec<InProcessComm>> {
        if world_size == 0 {
            return Err(AttnError::InvalidArgument {
                arg: "world_size".into(),
                expected: "at least 1 rank".into(),
                got: "0".into(),
            });
        }
        let n = world_size;
        let mut to: Vec<Vec<Option<Sender<Msg>>>> = (0..n).map(|_| vec![]).collect();
        let mut from: Vec<Vec<Option<Mutex<Receiver<Msg>>>>> = (0..n).map(|_| vec![]).collect();
        for (src, row) in to.iter_mut().enumerate() {
            for (dst, inbox) in from.iter_mut().enumerate() {
                if src == dst {
                    row.push(None);
                    inbox.push(None);
                } else {
                    let (tx, rx) = channel();
                    row.push(Some(tx));
                    inbox.push(Some(Mutex::new(rx)));
                }
            }
        }
        Ok(to
            .into_iter()
            .zip(from)
            .enumerate()
            .map(|(rank, (to, from))| InProcessComm {
                rank,
                world: n,
                timeout,
                to,
                from,
                sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
                received: (0..n).map(|_| AtomicU64::new(0)).collect(),
            })
            .collect())
    }

    /// The receive timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn err(&self, op: &str, expected: String, got: String) -> AttnError {
        AttnError::Collective {
            op: op.into(),
            rank: self.rank,
            expected,
            got,
        }
    }

    fn send(&self, op: &'static str, dst: usize, payload: Payload) -> Result<()> {
        let Some(tx) = &self.to[dst] else {
            return Err(self.err(op, "a peer rank".into(), format!("rank {dst} (self)")));
        };
        let index = self.sent[dst].fetch_add(1, Ordering::SeqCst);
        tx.send(Msg { op, index, payload }).map_err(|_| {
            self.err(
                op,
                format!("rank {dst} to take part"),
                format!("rank {dst} dropped its communicator (it failed or exited)"),
            )
        })
    }

    fn recv(&self, op: &'static str, src: usize) -> Result<Payload> {
        let Some(rx) = &self.from[src] else {
            return Err(self.err(op, "a peer rank".into(), format!("rank {src} (self)")));
        };
        let index = self.received[src].fetch_add(1, Ordering::SeqCst);
        let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
        let msg = rx.recv_timeout(self.timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => self.err(
                op,
                format!("message {index} from rank {src} within {:?}", self.timeout),
                "nothing (timed out)".into(),
            ),
            RecvTimeoutError::Disconnected => self.err(
                op,
                format!("message {index} from rank {src}"),
                format!("rank {src} dropped its communicator (it failed or exited)"),
            ),
        })?;
        if msg.op != op || msg.index != index {
            return Err(self.err(
                op,
                format!("`{op}` (message {index}) from rank {src}"),
                format!("`{}` (message {})", msg.op, msg.index),
            ));
        }
        Ok(msg.payload)
    }

    fn recv_f32(&self, op: &'static str, src: usize, len: usize) -> Result<Vec<f32>> {
        match self.recv(op, src)? {
            Payload::F32(v) if v.len() == len => Ok(v),
            Payload::F32(v) => Err(self.err(
                op,
                format!("{len} elements from rank {src}"),
                format!("{} elements", v.len()),
            )),
            Payload::Bytes(_) => {
                Err(self.err(op, format!("f32 elements from rank {src}"), "bytes".into()))
            }
        }
    }

    fn recv_bytes(&self, op: &'static str, src: usize) -> Result<Vec<u8>> {
        match self.recv(op, src)? {
            Payload::Bytes(v) => Ok(v),
            Payload::F32(_) => {
                Err(self.err(op, format!("bytes from rank {src}"), "f32 elements".into()))
            }
        }
    }

    /// Every rank's `data` (this rank's own included), in rank order: each peer gets
    /// `block(j)` of `data` (the whole of it when `block` is `None`).
    fn exchange(
        &self,
        op: &'static str,
        data: &[f32],
        block: Option<usize>,
    ) -> Result<Vec<Vec<f32>>> {
        let part = |j: usize| match block {
            Some(w) => &data[j * w..(j + 1) * w],
            None => data,
        };
        for j in (0..self.world).filter(|&j| j != self.rank) {
            self.send(op, j, Payload::F32(part(j).to_vec()))?;
        }
        let len = part(self.rank).len();
        (0..self.world)
            .map(|i| {
                if i == self.rank {
                    Ok(part(i).to_vec())
                } else {
                    self.recv_f32(op, i, len)
                }
            })
            .collect()
    }
}

/// `parts` summed elementwise in f64, in order, rounded once.
fn sum_in_order(parts: &[Vec<f32>]) -> Vec<f32> {
    let n = parts.first().map_or(0, Vec::len);
    (0..n)
        .map(|e| parts.iter().map(|p| p[e] as f64).sum::<f64>() as f32)
        .collect()
}

impl Communicator for InProcessComm {
    type Tensor = Tensor;
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        let parts = self.exchange("all_reduce", t.data(), None)?;
        t.data_mut().copy_from_slice(&sum_in_order(&parts));
        Ok(())
    }
    fn all_gather(&self, send: &Tensor, recv: &mut Tensor) -> Result<()> {
        let n = send.numel();
        check_numel("recv", "all_gather", recv.numel(), n * self.world)?;
        let parts = self.exchange("all_gather", send.data(), None)?;
        for (i, p) in parts.iter().enumerate() {
            recv.data_mut()[i * n..(i + 1) * n].copy_from_slice(p);
        }
        Ok(())
    }
    fn reduce_scatter_sum(&self, send: &Tensor, recv: &mut Tensor) -> Result<()> {
        let w = check_blocks("send", "reduce_scatter", send.numel(), self.world)?;
        check_numel("recv", "reduce_scatter", recv.numel(), w)?;
        let parts = self.exchange("reduce_scatter", send.data(), Some(w))?;
        recv.data_mut().copy_from_slice(&sum_in_order(&parts));
        Ok(())
    }
    fn all_to_all(&self, send: &Tensor, recv: &mut Tensor) -> Result<()> {
        let w = check_blocks("send", "all_to_all", send.numel(), self.world)?;
        check_numel("recv", "all_to_all", recv.numel(), send.numel())?;
        let parts = self.exchange("all_to_all", send.data(), Some(w))?;
        for (i, p) in parts.iter().enumerate() {
            recv.data_mut()[i * w..(i + 1) * w].copy_from_slice(p);
        }
        Ok(())
    }
    fn send_recv(&self, send: &Tensor, to: usize, recv: &mut Tensor, from: usize) -> Result<()> {
        check_peer("to", to, self.world)?;
        check_peer("from", from, self.world)?;
        if to == self.rank || from == self.rank {
            if to != from {
                return Err(AttnError::InvalidArgument {
                    arg: "to/from".into(),
                    expected: "both this rank or both peers".into(),
                    got: format!("to = {to}, from = {from}, rank = {}", self.rank),
                });
            }
            check_numel("recv", "send_recv", recv.numel(), send.numel())?;
            recv.data_mut().copy_from_slice(send.data());
            return Ok(());
        }
        self.send("send_recv", to, Payload::F32(send.data().to_vec()))?;
        let v = self.recv_f32("send_recv", from, recv.numel())?;
        recv.data_mut().copy_from_slice(&v);
        Ok(())
    }
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        for j in (0..self.world).filter(|&j| j != self.rank) {
            self.send("all_gather_bytes", j, Payload::Bytes(bytes.to_vec()))?;
        }
        (0..self.world)
            .map(|i| {
                if i == self.rank {
                    Ok(bytes.to_vec())
                } else {
                    self.recv_bytes("all_gather_bytes", i)
                }
            })
            .collect()
    }
    fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Result<Vec<u8>> {
        check_peer("root", root, self.world)?;
        if self.rank == root {
            for j in (0..self.world).filter(|&j| j != root) {
                self.send("broadcast_bytes", j, Payload::Bytes(bytes.to_vec()))?;
            }
            Ok(bytes.to_vec())
        } else {
            self.recv_bytes("broadcast_bytes", root)
        }
    }
}

/// Run `f` on `world_size` ranks, one thread each, over a fresh in-process group whose
/// receives wait at most `timeout`; returns each rank's result in rank order. A rank whose
/// thread panicked gives [`AttnError::Collective`] (`op` `run_ranks`) naming it; its peers'
/// pending receives fail at once (its communicator is dropped).
///
/// Errors: those of [`InProcessComm::group`].
pub fn run_ranks<T: Send>(
    world_size: usize,
    timeout: Duration,
    f: impl Fn(InProcessComm) -> Result<T> + Sync,
) -> Result<Vec<Result<T>>> {
    let comms = InProcessComm::group(world_size, timeout)?;
    let f = &f;
    Ok(std::thread::scope(|s| {
        let handles: Vec<_> = comms.into_iter().map(|c| s.spawn(move || f(c))).collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().unwrap_or_else(|_| {
                    Err(AttnError::Collective {
                        op: "run_ranks".into(),
                        rank,
                        expected: "the rank's closure to return".into(),
                        got: "a panic".into(),
                    })
                })
            })
            .collect()
    }))
}
