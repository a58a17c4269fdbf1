//! The host plan of context-parallel core attention on a GPU: which attention-kernel launches
//! a rank queues for one block of keys, so that the kernel's own masks (bottom-right causal,
//! window) compute exactly what [`super::CpCoreAttention`] computes on the CPU.
//!
//! Every visibility rule under context parallelism depends only on
//! `delta = key token - query token` (token indices in the whole sequence, `sq = sk`):
//! [`Visibility`] is the interval of visible deltas (causal: `delta <= 0`; window `(L, R)`:
//! `-L <= delta <= R`; both: the intersection). A rank's queries and a block of keys are
//! [`Segment`]s: rows of a buffer holding consecutive tokens of one sequence. For every pair
//! (query segment, key segment) [`pair_jobs`] picks one of three kernels ([`KernelKind`]):
//! - `Layer` (the layer's mask with causal made bottom-right, and its window) when the two
//!   ranges end at the same token: the kernel's bottom-right diagonal `i + sk - sq` is then the
//!   query's own token, so its masks are the whole sequence's;
//! - `Full` (no mask, no window) when every query of the pair sees every key;
//! - `Band` (a uint8 mask tensor read through strides `[width, 0, -1, 1]`, so the element of
//!   query `i`, key `j` is `band[item][offset + j - i]`: a Toeplitz mask) otherwise, e.g. a
//!   sliding window across the chunks of another rank;
//!
//! and skips pairs where nothing is visible. A key range that straddles the end of the query
//! range is split there (the part before is `Layer`, the part after `Full`/`Band`). Full
//! jobs of one sequence that tile a rectangle are merged.
//!
//! [`pack`] turns the jobs into [`Launch`]es: the packed (`cu_seqlens`) kernel mode, one
//! virtual sequence per job, with empty filler sequences (queries without keys, or keys
//! without queries) so that `cu_seqlens_q` / `cu_seqlens_k` stay consecutive. Filler rows see
//! no key: the kernel writes zeros and LSE `-inf` there, which an LSE merge ignores. Jobs whose
//! query or key ranges overlap go to separate launches.
//!
//! Also here: the row index tables of the device-side row gathers ([`global_sources`],
//! [`head_split_index`], [`head_merge_index`], [`batch_major_index`]).

use std::ops::Range;

use attention_codegen::{MaskType, Window};

use super::cp_layout::CpLayout;
use crate::error::{AttnError, Result};

/// The visible `delta = key token - query token` of a mask and window (`None`: unbounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Visibility {
    /// Smallest visible delta.
    pub lo: Option<i64>,
    /// Largest visible delta.
    pub hi: Option<i64>,
}

/// Far beyond any token index, and safe to add to one.
const FAR: i64 = i64::MAX / 4;

impl Visibility {
    /// The visibility of `mask` (causal, causal_bottom_right or no_mask: with `sq = sk` both
    /// causal types are the same) and `window` (`-1` = unbounded side).
    ///
    /// Errors: [`AttnError::InvalidArgument`] (`mask_type`) for any other mask type.
    pub fn new(mask: MaskType, window: Option<Window>) -> Result<Self> {
        let causal = match mask {
            MaskType::Causal | MaskType::CausalBottomRight => true,
            MaskType::NoMask => false,
            other => {
                return Err(AttnError::InvalidArgument {
                    arg: "mask_type".into(),
                    expected: "causal, causal_bottom_right or no_mask under context parallelism"
                        .into(),
                    got: other.name().into(),
                })
            }
        };
        let (mut lo, mut hi) = (None, None);
        if let Some(w) = window {
            if w.left >= 0 {
                lo = Some(-w.left);
            }
            if w.right >= 0 {
                hi = Some(w.right);
            }
        }
        if causal {
            hi = Some(hi.map_or(0, |h: i64| h.min(0)));
        }
        Ok(Visibility { lo, hi })
    }

    /// Whether a key `delta` tokens after the query is visible.
    pub fn sees(&self, delta: i64) -> bool {
        self.lo.is_none_or(|l| delta >= l) && self.hi.is_none_or(|h| delta <= h)
    }

    fn lo_(&self) -> i64 {
        self.lo.unwrap_or(-FAR)
    }

    fn hi_(&self) -> i64 {
        self.hi.unwrap_or(FAR)
    }

    /// Whether visibility depends only on the order of the tokens (no left bound; no right
    /// bound or `delta <= 0`), so any subsequence of a sequence attends as itself.
    pub fn order_only(&self) -> bool {
        self.lo.is_none() && matches!(self.hi, None | Some(0))
    }

    /// Whether every key is visible.
    pub fn unbounded(&self) -> bool {
        self.lo.is_none() && self.hi.is_none()
    }
}

/// Rows `rows` of a buffer holding the consecutive tokens `tok ..` of one sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Buffer rows.
    pub rows: Range<usize>,
    /// Token index (in the whole sequence) of the first row.
    pub tok: usize,
}

impl Segment {
    fn sub(&self, toks: Range<i64>) -> Range<usize> {
        let a = self.rows.start + (toks.start - self.tok as i64) as usize;
        a..a + (toks.end - toks.start) as usize
    }
}

/// Merge segments that continue each other (in rows and in tokens).
pub fn merge_segments(segs: Vec<Segment>) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    for s in segs.into_iter().filter(|s| !s.rows.is_empty()) {
        match out.last_mut() {
            Some(l) if l.rows.end == s.rows.start && l.tok + l.rows.len() == s.tok => {
                l.rows.end = s.rows.end;
            }
            _ => out.push(s),
        }
    }
    out
}

/// The kernel of a [`Job`] (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelKind {
    /// The layer's mask (causal bottom-right) and window; query and key ranges end together.
    Layer,
    /// Every key visible.
    Full,
    /// A Toeplitz uint8 mask tensor.
    Band,
}

/// Queries `q` (rows of the query buffer) against keys `k` (rows of the key buffer) with
/// kernel `kind`; `delta0` = token of `k.start` - token of `q.start` (what `Band` masks by).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The kernel.
    pub kind: KernelKind,
    /// Query rows.
    pub q: Range<usize>,
    /// Key rows.
    pub k: Range<usize>,
    /// Token delta of the first key to the first query.
    pub delta0: i64,
}

/// The jobs of queries `q` against keys `k` of the same sequence (see the module docs).
pub fn pair_jobs(q: &Segment, k: &Segment, vis: Visibility, out: &mut Vec<Job>) {
    if q.rows.is_empty() || k.rows.is_empty() {
        return;
    }
    let (qt, kt) = (q.tok as i64, k.tok as i64);
    let (qe, ke) = (qt + q.rows.len() as i64, kt + k.rows.len() as i64);
    let (lo, hi) = (vis.lo_(), vis.hi_());
    // Deltas of the pair: [kt - (qe - 1), (ke - 1) - qt].
    if ke - 1 - qt < lo || kt - (qe - 1) > hi {
        return;
    }
    // Keys straddling the end of the queries: split them there.
    if qe > kt && qe < ke {
        let n1 = (qe - kt) as usize;
        let (a, b) = (k.rows.start, k.rows.end);
        pair_jobs(
            q,
            &Segment {
                rows: a..a + n1,
                tok: k.tok,
            },
            vis,
            out,
        );
        pair_jobs(
            q,
            &Segment {
                rows: a + n1..b,
                tok: k.tok + n1,
            },
            vis,
            out,
        );
        return;
    }
    // Keys some query sees [ka, kb), queries that see some key [qa, qb) (tokens).
    let (ka, kb) = ((qt + lo).max(kt), (qe - 1 + hi).min(ke - 1) + 1);
    let (qa, qb) = ((kt - hi).max(qt), (ke - 1 - lo).min(qe - 1) + 1);
    let full = lo <= ka - (qb - 1) && kb - 1 - qa <= hi;
    let (kind, qr, kr) = if qe == ke {
        // Aligned at the end (full or not): trim the starts only (the end stays the
        // diagonal), so the jobs of one query range keep one kernel.
        (KernelKind::Layer, qa..qe, ka..ke)
    } else if full {
        (KernelKind::Full, qa..qb, ka..kb)
    } else {
        (KernelKind::Band, qa..qb, ka..kb)
    };
    out.push(Job {
        kind,
        delta0: kr.start - qr.start,
        q: q.sub(qr),
        k: k.sub(kr),
    });
}

/// Merge `Full` jobs that tile a rectangle (same queries and adjacent keys, or the reverse).
pub fn merge_full(jobs: &mut Vec<Job>) {
    loop {
        let mut hit = None;
        'search: for i in 0..jobs.len() {
            for j in 0..jobs.len() {
                let (a, b) = (&jobs[i], &jobs[j]);
                if i == j || a.kind != KernelKind::Full || b.kind != KernelKind::Full {
                    continue;
                }
                if a.q == b.q && a.k.end == b.k.start {
                    hit = Some((i, j, a.q.clone(), a.k.start..b.k.end));
                    break 'search;
                }
                if a.k == b.k && a.q.end == b.q.start {
                    hit = Some((i, j, a.q.start..b.q.end, a.k.clone()));
                    break 'search;
                }
            }
        }
        let Some((i, j, q, k)) = hit else { return };
        let delta0 = jobs[i].delta0;
        jobs[i] = Job {
            kind: KernelKind::Full,
            q,
            k,
            delta0,
        };
        jobs.remove(j);
    }
}

/// Rows of this rank's queries of every sequence, as segments: sequence `s` holds local rows
/// `local_cu[s] .. local_cu[s + 1]`, chunks `r` then `2 cp - 1 - r` (adjacent ones merged).
pub fn rank_segments(layout: CpLayout, local_cu: &[usize]) -> Vec<Vec<Segment>> {
    local_cu
        .windows(2)
        .map(|w| {
            let c = (w[1] - w[0]) / 2;
            let n = 2 * layout.cp_size;
            let (a, b) = (layout.cp_rank, n - 1 - layout.cp_rank);
            merge_segments(vec![
                Segment {
                    rows: w[0]..w[0] + c,
                    tok: a * c,
                },
                Segment {
                    rows: w[0] + c..w[1],
                    tok: b * c,
                },
            ])
        })
        .collect()
}

/// The jobs of one `p2p` ring step: this rank's queries against the K/V block of rank
/// `src` (laid out as this rank's: same `local_cu`). When `src` is this rank and visibility
/// depends only on order, one `Layer` job per sequence over the whole local block.
pub fn p2p_jobs(layout: CpLayout, local_cu: &[usize], src: usize, vis: Visibility) -> Vec<Job> {
    let qs = rank_segments(layout, local_cu);
    let ks = rank_segments(layout.of_rank(src), local_cu);
    let mut jobs = Vec::new();
    for (s, w) in local_cu.windows(2).enumerate() {
        if src == layout.cp_rank && vis.order_only() {
            if w[1] > w[0] {
                jobs.push(Job {
                    kind: if vis.unbounded() {
                        KernelKind::Full
                    } else {
                        KernelKind::Layer
                    },
                    q: w[0]..w[1],
                    k: w[0]..w[1],
                    delta0: 0,
                });
            }
            continue;
        }
        let mut mine = Vec::new();
        for q in &qs[s] {
            for k in &ks[s] {
                pair_jobs(q, k, vis, &mut mine);
            }
        }
        merge_full(&mut mine);
        jobs.extend(mine);
    }
    jobs
}

/// The jobs of `all_gather`: this rank's queries against every key of its sequence, the
/// keys in whole-sequence order (sequence `s` at rows `local_cu[s] * cp ..`).
pub fn all_gather_jobs(layout: CpLayout, local_cu: &[usize], vis: Visibility) -> Vec<Job> {
    let cp = layout.cp_size;
    let qs = rank_segments(layout, local_cu);
    let mut jobs = Vec::new();
    for (s, w) in local_cu.windows(2).enumerate() {
        let k = Segment {
            rows: w[0] * cp..w[1] * cp,
            tok: 0,
        };
        let mut mine = Vec::new();
        if vis.unbounded() {
            if w[1] > w[0] {
                mine.push(Job {
                    kind: KernelKind::Full,
                    q: w[0]..w[1],
                    k: k.rows,
                    delta0: 0,
                });
            }
        } else {
            for q in &qs[s] {
                pair_jobs(q, &k, vis, &mut mine);
            }
            merge_full(&mut mine);
        }
        jobs.extend(mine);
    }
    jobs
}

/// One attention-kernel launch in the packed mode: virtual sequence `v` has
/// `cu_q[v + 1] - cu_q[v]` query rows (from row `q_rows.start` of the query buffer) and
/// `cu_k[v + 1] - cu_k[v]` keys (from row `k_rows.start` of the key buffer). Its output and
/// LSE cover every row of `q_rows` (filler rows: zeros, LSE `-inf`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The kernel.
    pub kind: KernelKind,
    /// Query (and output) rows covered.
    pub q_rows: Range<usize>,
    /// Key rows read.
    pub k_rows: Range<usize>,
    /// Query offsets relative to `q_rows.start`, `[items + 1]`.
    pub cu_q: Vec<i32>,
    /// Key offsets relative to `k_rows.start`, `[items + 1]`.
    pub cu_k: Vec<i32>,
    /// Per virtual sequence, the token delta of its first key to its first query (0 for
    /// fillers).
    pub delta0: Vec<i64>,
    /// Longest query range of a virtual sequence.
    pub max_q: usize,
    /// Longest key range of a virtual sequence.
    pub max_k: usize,
}

/// A `Band` launch's mask: `masked[v * width + offset + j - i]` for virtual sequence `v`,
/// query `i`, key `j` (nonzero = masked out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BandMask {
    /// Bytes per virtual sequence.
    pub width: usize,
    /// Index of `j - i = 0` within a row.
    pub offset: usize,
    /// `[items, width]`.
    pub masked: Vec<u8>,
}

impl Launch {
    /// Virtual sequences.
    pub fn items(&self) -> usize {
        self.cu_q.len() - 1
    }

    /// The Toeplitz mask of a `Band` launch under `vis`.
    pub fn band(&self, vis: Visibility) -> BandMask {
        let offset = self.max_q.saturating_sub(1);
        let width = (self.max_q + self.max_k).saturating_sub(1).max(1);
        let mut masked = vec![0u8; self.items() * width];
        for v in 0..self.items() {
            let empty = self.cu_q[v + 1] == self.cu_q[v] || self.cu_k[v + 1] == self.cu_k[v];
            if empty {
                continue;
            }
            for (x, m) in masked[v * width..(v + 1) * width].iter_mut().enumerate() {
                let dl = x as i64 - offset as i64;
                *m = u8::from(!vis.sees(self.delta0[v] + dl));
            }
        }
        BandMask {
            width,
            offset,
            masked,
        }
    }

    /// The band of [`band`](Self::band) as a dense uint8 mask `[items, max_q, max_k]`
    /// (nonzero = masked out; element `(v, i, j)` = `band[v][offset + j - i]`), for kernels
    /// whose mask strides must be non-negative (the attention backward).
    pub fn dense_band(&self, vis: Visibility) -> Vec<u8> {
        let b = self.band(vis);
        let (mq, mk) = (self.max_q, self.max_k);
        let mut dense = vec![1u8; self.items() * mq * mk];
        for v in 0..self.items() {
            for i in 0..mq {
                for j in 0..mk {
                    dense[(v * mq + i) * mk + j] = b.masked[v * b.width + b.offset + j - i];
                }
            }
        }
        dense
    }
}

fn i32_of(arg: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| AttnError::InvalidArgument {
        arg: arg.into(),
        expected: "a row count that fits in int32".into(),
        got: v.to_string(),
    })
}

fn build(jobs: &[Job]) -> Result<Launch> {
    let (q0, k0) = (jobs[0].q.start, jobs[0].k.start);
    let (mut qc, mut kc) = (q0, k0);
    let (mut cu_q, mut cu_k, mut delta0) = (vec![0i32], vec![0i32], Vec::new());
    let mut push = |nq: usize, nk: usize, d: i64, qc: usize, kc: usize| -> Result<()> {
        cu_q.push(i32_of("cu_seqlens_q", qc + nq - q0)?);
        cu_k.push(i32_of("cu_seqlens_k", kc + nk - k0)?);
        delta0.push(d);
        Ok(())
    };
    let (mut max_q, mut max_k) = (0, 0);
    for j in jobs {
        if j.q.start > qc {
            push(j.q.start - qc, 0, 0, qc, kc)?;
            qc = j.q.start;
        }
        if j.k.start > kc {
            push(0, j.k.start - kc, 0, qc, kc)?;
            kc = j.k.start;
        }
        push(j.q.len(), j.k.len(), j.delta0, qc, kc)?;
        (qc, kc) = (j.q.end, j.k.end);
        max_q = max_q.max(j.q.len());
        max_k = max_k.max(j.k.len());
    }
    // Filler query rows see no key; their count can exceed every job's.
    for w in cu_q.windows(2) {
        max_q = max_q.max((w[1] - w[0]) as usize);
    }
    Ok(Launch {
        kind: jobs[0].kind,
        q_rows: q0..qc,
        k_rows: k0..kc,
        cu_q,
        cu_k,
        delta0,
        max_q,
        max_k,
    })
}

/// The launches of `jobs`: per kernel, greedy passes in query order, each taking every job
/// whose query and key ranges start at or after the previous taken job's ends.
///
/// Errors: [`AttnError::InvalidArgument`] for row counts beyond int32.
pub fn pack(jobs: Vec<Job>) -> Result<Vec<Launch>> {
    let mut out = Vec::new();
    for kind in [KernelKind::Layer, KernelKind::Full, KernelKind::Band] {
        let mut pending: Vec<Job> = jobs.iter().filter(|j| j.kind == kind).cloned().collect();
        pending.sort_by_key(|j| (j.q.start, j.k.start));
        while !pending.is_empty() {
            let (mut take, mut rest) = (Vec::new(), Vec::new());
            let (mut qe, mut ke) = (0, 0);
            for j in pending {
                if j.q.start >= qe && j.k.start >= ke {
                    (qe, ke) = (j.q.end, j.k.end);
                    take.push(j);
                } else {
                    rest.push(j);
                }
            }
            out.push(build(&take)?);
            pending = rest;
        }
    }
    Ok(out)
}

/// For every row of the whole batch in sequence order (sequence `s` at rows
/// `local_cu[s] * cp ..`), the rank that holds it and its row in that rank's local buffer.
pub fn global_sources(layout: CpLayout, local_cu: &[usize]) -> Vec<(usize, usize)> {
    let n = 2 * layout.cp_size;
    let mut out = Vec::with_capacity(local_cu.last().copied().unwrap_or(0) * layout.cp_size);
    for w in local_cu.windows(2) {
        let c = (w[1] - w[0]) / 2;
        for t in 0..c * n {
            let chunk = t / c;
            let (rank, second) = if chunk < layout.cp_size {
                (chunk, false)
            } else {
                (n - 1 - chunk, true)
            };
            out.push((rank, w[0] + usize::from(second) * c + t % c));
        }
    }
    out
}

/// Gather index of a head split: `x` `[rows, cp * w]` (as rows of `w`) -> `[cp][rows]`
/// (block `j` = every row's heads `j w .. (j + 1) w`): destination row `j * rows + i` reads
/// source row `i * cp + j`.
pub fn head_split_index(rows: usize, cp: usize) -> Vec<usize> {
    (0..cp)
        .flat_map(|j| (0..rows).map(move |i| i * cp + j))
        .collect()
}

/// The inverse of [`head_split_index`]: `[cp][rows]` -> `[rows, cp * w]`.
pub fn head_merge_index(rows: usize, cp: usize) -> Vec<usize> {
    (0..rows)
        .flat_map(|i| (0..cp).map(move |j| j * rows + i))
        .collect()
}

/// Gather index from padded `[s, b]` rows (row `i * b + bi`) to batch-major `[b, s]`
/// (row `bi * s + i`); `inverse` the other way.
pub fn batch_major_index(s: usize, b: usize, inverse: bool) -> Vec<usize> {
    let mut out = vec![0; s * b];
    for bi in 0..b {
        for i in 0..s {
            let (sm, bm) = (i * b + bi, bi * s + i);
            if inverse {
                out[sm] = bm;
            } else {
                out[bm] = sm;
            }
        }
    }
    out
}
