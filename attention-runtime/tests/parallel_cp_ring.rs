//! The `p2p` ring schedule of the GPU path ([`attention_runtime::parallel::cp_ring`]) on the
//! host, at CP = 2..6 (CP = 2 cannot tell a reversed ring: rank `r + 1` and `r - 1` are the
//! same rank):
//! - over [`InProcessComm`]: every rank runs the ops in order with real exchanges of tagged
//!   blocks, and each compute step must hold the block of the rank the plan attends
//!   ([`ring_source`], what the device path hands [`p2p_jobs`]);
//! - through an emulation of two streams per rank (ops that start and end, exchanges that
//!   match their peer's, random interleavings): no compute reads a buffer that an exchange
//!   overwrites before or while it reads, no deadlock, the overlapped order does overlap and
//!   the serial one does not; and the emulation does catch a schedule missing a wait.

mod parallel_common;

use attention_codegen::MaskType;
use attention_runtime::modules::SplitMix64;
use attention_runtime::parallel::cp_plan::{p2p_jobs, Visibility};
use attention_runtime::parallel::cp_ring::{ring_ops, ring_source, RingOp, RingStream, RingWork};
use attention_runtime::parallel::{Communicator, CpLayout};
use attention_runtime::Tensor;
use parallel_common::ranks;

#[test]
fn ring_direction_over_in_process_comm_at_cp_3_and_4() {
    for cp in [3usize, 4, 5] {
        for overlap in [true, false] {
            let seen = ranks(cp, |c| {
                let layout = CpLayout::new(c.rank(), cp)?;
                // Block of rank r: 6 elements tagged r.
                let tag = |r: usize| Tensor::new(&[6], vec![r as f32; 6]).unwrap();
                let mut bufs = [tag(c.rank()), Tensor::new(&[6], vec![-1.0; 6])?];
                let mut seen = Vec::new();
                for op in ring_ops(layout, overlap) {
                    match op.work {
                        RingWork::Exchange {
                            send_buf,
                            to,
                            recv_buf,
                            from,
                            ..
                        } => {
                            let mut recv = Tensor::zeros(&[6]);
                            c.send_recv(&bufs[send_buf], to, &mut recv, from)?;
                            bufs[recv_buf] = recv;
                        }
                        RingWork::Compute { step, src, buf } => {
                            let got = bufs[buf].data()[0] as usize;
                            assert!(bufs[buf].data().iter().all(|&x| x == got as f32));
                            assert_eq!(src, ring_source(layout, step));
                            seen.push((step, src, got));
                        }
                    }
                }
                Ok(seen)
            });
            for (r, steps) in seen.iter().enumerate() {
                assert_eq!(steps.len(), cp);
                for &(step, src, got) in steps {
                    // Step i attends rank r - i's block, and that block is what arrived.
                    assert_eq!(src, (r + cp - step) % cp, "cp={cp} rank={r} step={step}");
                    assert_eq!(got, src, "cp={cp} rank={r} step={step} overlap={overlap}");
                }
                // Every block exactly once.
                let mut all: Vec<usize> = steps.iter().map(|s| s.2).collect();
                all.sort();
                assert_eq!(all, (0..cp).collect::<Vec<_>>());
            }
        }
    }
}

#[test]
fn ring_sources_are_the_blocks_the_plan_attends() {
    // The plan's step-0 block is the rank's own (one Layer job per sequence when causal).
    let vis = Visibility::new(MaskType::Causal, None).unwrap();
    for cp in 2..=4usize {
        for r in 0..cp {
            let layout = CpLayout::new(r, cp).unwrap();
            assert_eq!(ring_source(layout, 0), r);
            let local_cu = [0usize, 2 * cp];
            let own = p2p_jobs(layout, &local_cu, ring_source(layout, 0), vis);
            assert_eq!(own.len(), 1, "cp={cp} rank={r}: {own:?}");
            // Causal: rank r sees every earlier rank's first chunk, so each step has work.
            for step in 1..cp {
                let jobs = p2p_jobs(layout, &local_cu, ring_source(layout, step), vis);
                assert!(!jobs.is_empty(), "cp={cp} rank={r} step={step}");
            }
        }
    }
}

/// One op in flight: its index and, for a compute, the block it read at its start.
#[derive(Clone, Copy)]
struct Flight {
    op: usize,
    read: Option<usize>,
}

/// The emulation's outcome.
#[derive(Debug, Default)]
struct Outcome {
    /// A compute and an exchange of one rank were in flight together.
    overlapped: bool,
}

/// Run every rank's `ops` (rank r: `ops[r]`) through two streams per rank in a random
/// interleaving: an op starts when it heads its stream and its waits have ended; a compute
/// reads its buffer at its start and at its end (both must be its block); an exchange ends
/// only when its receiver's exchange of the same step has started and its sender's has too,
/// and writes its receive buffer from the sender's send buffer then.
fn emulate(ops: &[Vec<RingOp>], rng: &mut SplitMix64) -> Result<Outcome, String> {
    let cp = ops.len();
    let mut bufs: Vec<[Option<usize>; 2]> = (0..cp).map(|r| [Some(r), None]).collect();
    let mut done: Vec<Vec<bool>> = ops.iter().map(|o| vec![false; o.len()]).collect();
    let mut next: Vec<[usize; 2]> = vec![[0, 0]; cp];
    let mut flight: Vec<[Option<Flight>; 2]> = vec![[None, None]; cp];
    let mut started_exchange: Vec<Vec<bool>> = vec![vec![false; cp]; cp];
    let mut out = Outcome::default();
    let sidx = |s: RingStream| usize::from(s == RingStream::Comm);
    // The index of rank r's `k`-th op on stream s.
    let nth = |r: usize, s: usize, k: usize| -> Option<usize> {
        ops[r]
            .iter()
            .enumerate()
            .filter(|(_, o)| sidx(o.stream) == s)
            .nth(k)
            .map(|(i, _)| i)
    };
    loop {
        // Every possible action: (rank, stream, start?).
        let mut acts = Vec::new();
        for r in 0..cp {
            for s in 0..2 {
                match flight[r][s] {
                    None => {
                        if let Some(i) = nth(r, s, next[r][s]) {
                            if ops[r][i].waits.iter().all(|&w| done[r][w]) {
                                acts.push((r, s, true));
                            }
                        }
                    }
                    Some(f) => {
                        let ok = match ops[r][f.op].work {
                            RingWork::Exchange { step, to, from, .. } => {
                                started_exchange[to][step] && started_exchange[from][step]
                            }
                            RingWork::Compute { .. } => true,
                        };
                        if ok {
                            acts.push((r, s, false));
                        }
                    }
                }
            }
        }
        if acts.is_empty() {
            let all = done.iter().all(|d| d.iter().all(|&x| x));
            return if all { Ok(out) } else { Err("deadlock".into()) };
        }
        let (r, s, start) = acts[(rng.next_u64() % acts.len() as u64) as usize];
        if start {
            let i = nth(r, s, next[r][s]).unwrap();
            let read = match ops[r][i].work {
                RingWork::Compute { src, buf, step } => {
                    if bufs[r][buf] != Some(src) {
                        return Err(format!(
                            "rank {r} step {step} starts on {:?}, not block {src}",
                            bufs[r][buf]
                        ));
                    }
                    Some(src)
                }
                RingWork::Exchange { step, .. } => {
                    started_exchange[r][step] = true;
                    None
                }
            };
            flight[r][s] = Some(Flight { op: i, read });
            if flight[r][0].is_some() && flight[r][1].is_some() {
                out.overlapped = true;
            }
        } else {
            let f = flight[r][s].take().unwrap();
            match ops[r][f.op].work {
                RingWork::Compute { step, buf, .. } => {
                    if bufs[r][buf] != f.read {
                        return Err(format!(
                            "rank {r} step {step}: buffer {buf} overwritten while read \
                             ({:?} -> {:?})",
                            f.read, bufs[r][buf]
                        ));
                    }
                }
                RingWork::Exchange {
                    step,
                    recv_buf,
                    from,
                    ..
                } => {
                    // What `from` sends at this step: its buffer step % 2, live.
                    let sent = bufs[from][step % 2];
                    bufs[r][recv_buf] = sent;
                }
            }
            done[r][f.op] = true;
            next[r][s] += 1;
        }
    }
}

fn all_ranks(cp: usize, overlap: bool) -> Vec<Vec<RingOp>> {
    (0..cp)
        .map(|r| ring_ops(CpLayout::new(r, cp).unwrap(), overlap))
        .collect()
}

#[test]
fn overlapped_and_serial_rings_are_race_free_in_any_interleaving() {
    let mut rng = SplitMix64::new(0x5eed_c0de);
    for cp in 1..=6usize {
        for overlap in [true, false] {
            let ops = all_ranks(cp, overlap);
            let mut overlapped = false;
            for _ in 0..400 {
                let o = emulate(&ops, &mut rng)
                    .unwrap_or_else(|e| panic!("cp={cp} overlap={overlap}: {e}"));
                overlapped |= o.overlapped;
            }
            // The overlapped ring runs an exchange while a compute runs (from cp 2, which
            // has one exchange); the serial one never does.
            assert_eq!(overlapped, overlap && cp > 1, "cp={cp} overlap={overlap}");
        }
    }
}

#[test]
fn the_emulation_catches_a_missing_wait() {
    let mut rng = SplitMix64::new(0x5eed_c0de);
    for cp in 3..=5usize {
        // Drop the wait of the second exchange on the first compute: it receives into
        // buffer 0, which compute 0 reads.
        let mut ops = all_ranks(cp, true);
        for rank_ops in &mut ops {
            let x1 = rank_ops
                .iter()
                .position(|o| matches!(o.work, RingWork::Exchange { step: 1, .. }))
                .unwrap();
            assert!(!rank_ops[x1].waits.is_empty());
            rank_ops[x1].waits.clear();
        }
        let caught = (0..400).any(|_| emulate(&ops, &mut rng).is_err());
        assert!(caught, "cp={cp}: a missing wait went unnoticed");
        // And the compute of step 1 not waiting for its block.
        let mut ops = all_ranks(cp, true);
        for rank_ops in &mut ops {
            let c1 = rank_ops
                .iter()
                .position(|o| matches!(o.work, RingWork::Compute { step: 1, .. }))
                .unwrap();
            rank_ops[c1].waits.clear();
        }
        let caught = (0..400).any(|_| emulate(&ops, &mut rng).is_err());
        assert!(caught, "cp={cp}: a compute before its block went unnoticed");
    }
}

#[test]
fn schedule_shape() {
    for cp in 1..=5usize {
        for r in 0..cp {
            let layout = CpLayout::new(r, cp).unwrap();
            for overlap in [true, false] {
                let ops = ring_ops(layout, overlap);
                let computes = ops
                    .iter()
                    .filter(|o| o.stream == RingStream::Compute)
                    .count();
                assert_eq!((computes, ops.len()), (cp, 2 * cp - 1));
                for (i, o) in ops.iter().enumerate() {
                    assert!(o.waits.iter().all(|&w| w < i), "{o:?}");
                    if let RingWork::Exchange { to, from, .. } = o.work {
                        assert_eq!((to, from), ((r + 1) % cp, (r + cp - 1) % cp));
                    }
                }
            }
        }
    }
}
