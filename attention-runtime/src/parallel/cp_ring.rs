//! The schedule of the `p2p` ring on a GPU ([`super::CpCudaLayer`]): which K/V block each
//! ring step attends, which of two receive buffers holds it, and the order of the exchanges
//! and the attention launches on two streams (communication, compute) with the events between
//! them. Host only: the device path (`parallel/cp_cuda_core.rs`) walks [`ring_ops`] as it is,
//! and `tests/parallel_cp_ring.rs` runs the same list through a two-stream emulation (random
//! interleavings of every rank's streams) and through [`super::InProcessComm`].
//!
//! The ring (Megatron's `p2p`, and [`super::CpCoreAttention`]'s): at step `i` (`0..cp`) rank
//! `r` attends the K/V block of rank `r - i` (mod `cp`); between steps every rank sends the
//! block it holds to rank `r + 1` and receives rank `r - 1`'s. Two buffers: step `i` reads
//! buffer `i % 2` (buffer 0 is the rank's own block); the exchange of step `i` sends buffer
//! `i % 2` and receives into buffer `(i + 1) % 2`.
//!
//! Overlapped ([`ring_ops`] with `overlap`): the exchange of step `i` runs on the
//! communication stream while the compute stream attends step `i`'s block. Its dependencies:
//! - the exchange of step `i` waits for the compute of step `i - 1` (the last reader of the
//!   buffer it receives into; the exchange of step `i - 1` is before it on its own stream);
//! - the compute of step `i + 1` waits for the exchange of step `i` (its block arrived);
//! - the first exchange waits for everything queued on the compute stream before the ring
//!   (the rank's own block packed, both buffers allocated): the caller joins the streams
//!   before the first op, and the compute stream after the last.
//!
//! Serial (without `overlap`): every op waits for the op before it, whichever stream it is
//! on, so nothing overlaps. Both orders queue the same launches over the same blocks in the
//! same order on the compute stream, so their results are bitwise equal.

use super::cp_layout::CpLayout;

/// The stream an op is queued on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingStream {
    /// The attention launches and their LSE merges (the layer's stream).
    Compute,
    /// The K/V exchanges (the communicator's stream).
    Comm,
}

/// What an op does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingWork {
    /// Ring step `step`: attend the block of rank `src`, held in buffer `buf`.
    Compute {
        /// Ring step, `0..cp`.
        step: usize,
        /// The rank whose K/V block this is (`rank - step` mod `cp`).
        src: usize,
        /// The buffer (0 or 1) holding it.
        buf: usize,
    },
    /// The exchange after ring step `step`: send buffer `send_buf` to rank `to`, receive rank
    /// `from`'s block into buffer `recv_buf`.
    Exchange {
        /// The ring step whose block is sent (`0..cp - 1`).
        step: usize,
        /// The buffer sent.
        send_buf: usize,
        /// `rank + 1` mod `cp`.
        to: usize,
        /// The buffer received into.
        recv_buf: usize,
        /// `rank - 1` mod `cp`.
        from: usize,
    },
}

/// One op of the schedule: its stream, its work, and the ops (indices into the schedule,
/// all earlier) whose completion it waits for besides the ops before it on its own stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingOp {
    /// The stream.
    pub stream: RingStream,
    /// The work.
    pub work: RingWork,
    /// Earlier ops (on the other stream) it waits for.
    pub waits: Vec<usize>,
}

/// The rank whose K/V block rank `layout.cp_rank` attends at ring step `step` (what
/// [`super::cp_plan::p2p_jobs`] is called with).
pub fn ring_source(layout: CpLayout, step: usize) -> usize {
    let cp = layout.cp_size;
    (layout.cp_rank + cp - step % cp) % cp
}

/// The ops of one rank's ring, in the order they are queued (see the module docs): per step,
/// its exchange (except after the last step), then its compute.
pub fn ring_ops(layout: CpLayout, overlap: bool) -> Vec<RingOp> {
    let (cp, rank) = (layout.cp_size, layout.cp_rank);
    let mut ops: Vec<RingOp> = Vec::with_capacity(2 * cp);
    let mut last_compute: Option<usize> = None;
    let mut last_exchange: Option<usize> = None;
    for step in 0..cp {
        let buf = step % 2;
        if step + 1 < cp {
            let waits = if overlap {
                last_compute.into_iter().collect()
            } else {
                ops.len().checked_sub(1).into_iter().collect()
            };
            last_exchange = Some(ops.len());
            ops.push(RingOp {
                stream: RingStream::Comm,
                work: RingWork::Exchange {
                    step,
                    send_buf: buf,
                    to: (rank + 1) % cp,
                    recv_buf: 1 - buf,
                    from: (rank + cp - 1) % cp,
                },
                waits,
            });
        }
        // The block of this step arrived with the exchange of the step before (step 0: the
        // rank's own). Serial: also after this step's exchange (the op just queued).
        let waits = if overlap {
            if step == 0 {
                Vec::new()
            } else {
                ops.iter()
                    .rposition(
                        |o| matches!(o.work, RingWork::Exchange { step: s, .. } if s + 1 == step),
                    )
                    .into_iter()
                    .collect()
            }
        } else {
            last_exchange
                .filter(|&e| e + 1 == ops.len())
                .into_iter()
                .collect()
        };
        last_compute = Some(ops.len());
        ops.push(RingOp {
            stream: RingStream::Compute,
            work: RingWork::Compute {
                step,
                src: ring_source(layout, step),
                buf,
            },
            waits,
        });
    }
    ops
}
