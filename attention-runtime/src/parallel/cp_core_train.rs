//! [`CpCoreTrain`]: core attention of one context-parallel rank in training on the CPU
//! reference: the forward of [`CpCoreAttention`] that also keeps the global (merged) LSE, and
//! its backward.
//!
//! The backward follows Megatron-Core's context-parallel attention (TransformerEngine's
//! `AttnFuncWithCPAndKVP2P` and friends): with the forward's global LSE (sink column
//! included) and `D = rowsum(dO * O)` of the final output, FlashAttention-2's backward
//! ([`attend_sequence_backward`]) splits into independent pieces per (query chunk, KV chunk)
//! that sum exactly: `dQ` of this rank's queries sums the pieces over every rank's K/V, and
//! `dK`/`dV` of a rank's K/V sum the pieces of every rank's queries and go back to that rank.
//!
//! - `p2p`: K/V travel the ring again (`cp - 1` steps to rank + 1) with a `dK`/`dV`
//!   accumulator beside them, each rank adding its queries' piece; after the last step a
//!   rank holds the accumulator of rank + 1's K/V, complete, and one more step hands it to its
//!   owner.
//! - `all_gather`: K/V all-gathered; the pieces of every rank's K/V are reduce-scattered
//!   (`reduce_scatter_sum`) back to their owners.
//! - `a2a`: q, k, v, the output, its gradient and the LSE are all-to-all'ed to "every token,
//!   this rank's heads", the whole sequence's backward runs for those heads, and `dQ`, `dK`,
//!   `dV` are all-to-all'ed back.
//!
//! The learnable sinks' gradient is this rank's share (its queries; under `a2a` its heads
//! over every query); the layer sums it over the group with the other parameter gradients.

use attention_codegen::{MaskType, Window};

use super::comm::Communicator;
use super::cp_core::{reorder, CpCoreAttention, CpSinks, Seg};
use super::CpCommType;
use crate::error::Result;
use crate::reference::{attend_sequence_backward, visible, AttendParams, SeqDims, SinkLogits};
use crate::tensor::Tensor;
use crate::train::CoreHook;

/// One rank's core attention for training (see the module docs).
pub(super) struct CpCoreTrain<'a, C> {
    /// The forward's core attention (exchange, heads, scale, sinks).
    pub(super) core: CpCoreAttention<'a, C>,
    /// The call's sequences in this rank's (batch-major) rows.
    pub(super) segs: Vec<Seg>,
    /// Padded `(s / cp, b)`, or `None` for packed rows.
    pub(super) padded: Option<(usize, usize)>,
    /// The mask type (causal, causal_bottom_right or no_mask).
    pub(super) mask: MaskType,
    /// The sliding window.
    pub(super) window: Option<Window>,
}

/// `[rows, np]` -> `[np, rows]` of rows `r0..r0 + n`.
fn lse_rows(lse: &[f32], r0: usize, n: usize, np: usize) -> Vec<f32> {
    let mut t = vec![0f32; n * np];
    for i in 0..n {
        for h in 0..np {
            t[h * n + i] = lse[(r0 + i) * np + h];
        }
    }
    t
}

fn add(acc: &mut [f32], x: &[f32]) {
    acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
}

impl<C: Communicator<Tensor = Tensor> + Sync> CpCoreTrain<'_, C> {
    fn pack(&self, x: &[f32], w: usize) -> Vec<f32> {
        match self.padded {
            Some((s, b)) => reorder(x, s, b, w, false),
            None => x.to_vec(),
        }
    }

    fn unpack(&self, x: Vec<f32>, w: usize) -> Vec<f32> {
        match self.padded {
            Some((s, b)) => reorder(&x, s, b, w, true),
            None => x,
        }
    }

    /// The max over the group of every rank's per-head max logit.
    fn global_max(&self, local: Vec<f32>) -> Result<Vec<f32>> {
        let np = local.len();
        let cp = self.core.cp();
        let mut all = Tensor::zeros(&[cp * np]);
        self.core
            .comm
            .all_gather(&Tensor::new(&[np], local)?, &mut all)?;
        let mut m = vec![f32::NEG_INFINITY; np];
        for block in all.data().chunks_exact(np) {
            m.iter_mut().zip(block).for_each(|(a, b)| *a = a.max(*b));
        }
        Ok(m)
    }

    /// The backward piece of this rank's queries over rank `src`'s K/V (`kb`, `vb`), every
    /// sequence: `dq` accumulates, `dk`/`dv` (of `src`'s K/V) accumulate, and with
    /// `with_sinks` the learnable sinks' gradient over this rank's queries.
    #[allow(clippy::too_many_arguments)]
    fn piece(
        &self,
        x: &Packed<'_>,
        kb: &[f32],
        vb: &[f32],
        src: usize,
        with_sinks: bool,
        g: &mut PieceGrads,
    ) -> Result<()> {
        let c = &self.core;
        let (np, ng, hn) = (c.heads, c.groups, c.head_dim);
        let (me, other) = (c.layout, c.layout.of_rank(src));
        let (mask, window) = (self.mask, self.window);
        for sg in &self.segs {
            let n = sg.rows.len();
            let len = sg.len;
            let f = move |_h: usize, i: usize, j: usize| {
                !visible(
                    mask,
                    window,
                    len,
                    len,
                    me.token(len, i),
                    other.token(len, j),
                )
            };
            let mut p = AttendParams::new(c.scale, MaskType::NoMask);
            p.mask_fn = Some(&f);
            if with_sinks {
                if let Some(CpSinks::PerHead(s)) = &c.sinks {
                    p.sinks = Some(SinkLogits::PerHead(s));
                }
            }
            let dims = SeqDims {
                sq: n,
                sk: n,
                heads: np,
                groups: ng,
                head_dim: hn,
            };
            let (r0, r1) = (sg.rows.start, sg.rows.end);
            let (qs, ks) = (r0 * np * hn..r1 * np * hn, r0 * ng * hn..r1 * ng * hn);
            let r = attend_sequence_backward(
                &x.q[qs.clone()],
                &kb[ks.clone()],
                &vb[ks.clone()],
                &x.out[qs.clone()],
                &lse_rows(x.lse, r0, n, np),
                &x.dout[qs.clone()],
                dims,
                &p,
                false,
            )?;
            g.dq[qs]
                .iter_mut()
                .zip(&r.dq)
                .for_each(|(a, b)| *a += *b as f64);
            add(&mut g.dk[ks.clone()], &r.dk);
            add(&mut g.dv[ks], &r.dv);
            if let Some(ds) = &r.dsinks {
                g.dsinks
                    .iter_mut()
                    .zip(ds)
                    .for_each(|(a, b)| *a += *b as f64);
            }
        }
        Ok(())
    }

    /// `p2p` / `all_gather` backward: `(dq, dk, dv, dsinks)`, rows packed.
    fn by_kv_backward(&self, x: &Packed<'_>) -> Result<Grads> {
        let c = &self.core;
        let (cp, rank) = (c.cp(), c.layout.cp_rank);
        let kvn = x.k.len();
        let mut g = PieceGrads {
            dq: vec![0f64; x.q.len()],
            dk: Vec::new(),
            dv: Vec::new(),
            dsinks: vec![0f64; c.heads],
        };
        let kv = Tensor::new(&[2 * kvn], [x.k, x.v].concat())?;
        let own = if c.comm_type == CpCommType::AllGather {
            let mut all = Tensor::zeros(&[cp * 2 * kvn]);
            c.comm.all_gather(&kv, &mut all)?;
            let mut dkv = Vec::with_capacity(cp * 2 * kvn);
            for src in 0..cp {
                let (bk, bv) = all.data()[src * 2 * kvn..(src + 1) * 2 * kvn].split_at(kvn);
                g.dk = vec![0f32; kvn];
                g.dv = vec![0f32; kvn];
                self.piece(x, bk, bv, src, src == rank, &mut g)?;
                dkv.extend_from_slice(&g.dk);
                dkv.extend_from_slice(&g.dv);
            }
            let mut own = Tensor::zeros(&[2 * kvn]);
            c.comm
                .reduce_scatter_sum(&Tensor::new(&[cp * 2 * kvn], dkv)?, &mut own)?;
            own.into_data()
        } else {
            // [k | v | dk | dv] of one rank's K/V travel together.
            let mut buf = Tensor::new(&[4 * kvn], [x.k, x.v, &vec![0f32; 2 * kvn]].concat())?;
            for step in 0..cp {
                let src = (rank + cp - step) % cp;
                g.dk = vec![0f32; kvn];
                g.dv = vec![0f32; kvn];
                {
                    let (bk, rest) = buf.data().split_at(kvn);
                    self.piece(x, bk, &rest[..kvn], src, step == 0, &mut g)?;
                }
                let d = &mut buf.data_mut()[2 * kvn..];
                add(&mut d[..kvn], &g.dk);
                add(&mut d[kvn..], &g.dv);
                if step + 1 < cp {
                    let mut next = Tensor::zeros(&[4 * kvn]);
                    c.comm
                        .send_recv(&buf, (rank + 1) % cp, &mut next, (rank + cp - 1) % cp)?;
                    buf = next;
                }
            }
            // This rank holds rank + 1's accumulator: hand it to its owner.
            let mine = Tensor::new(&[2 * kvn], buf.data()[2 * kvn..].to_vec())?;
            if cp > 1 {
                let mut own = Tensor::zeros(&[2 * kvn]);
                c.comm
                    .send_recv(&mine, (rank + 1) % cp, &mut own, (rank + cp - 1) % cp)?;
                own.into_data()
            } else {
                mine.into_data()
            }
        };
        let (dk, dv) = own.split_at(kvn);
        Ok((
            g.dq.into_iter().map(|x| x as f32).collect(),
            dk.to_vec(),
            dv.to_vec(),
            g.dsinks,
        ))
    }

    /// `a2a` backward: the whole sequence of this rank's heads.
    fn ulysses_backward(&self, x: &Packed<'_>) -> Result<Grads> {
        let c = &self.core;
        let (cp, hn, np, ng) = (c.cp(), c.head_dim, c.heads, c.groups);
        let (hq, hg) = (np / cp, ng / cp);
        let rows = x.q.len() / (np * hn);
        let me = c.layout.cp_rank;
        let qa = c.a2a(c.head_blocks_w(x.q, np, hn))?;
        let ka = c.a2a(c.head_blocks_w(x.k, ng, hn))?;
        let va = c.a2a(c.head_blocks_w(x.v, ng, hn))?;
        let oa = c.a2a(c.head_blocks_w(x.out, np, hn))?;
        let da = c.a2a(c.head_blocks_w(x.dout, np, hn))?;
        let la = c.a2a(c.head_blocks_w(x.lse, np, 1))?;
        let mut bq = vec![0f32; cp * rows * hq * hn];
        let mut bk = vec![0f32; cp * rows * hg * hn];
        let mut bv = vec![0f32; cp * rows * hg * hn];
        let mut dsinks = vec![0f64; np];
        for sg in &self.segs {
            let mut p = AttendParams::new(c.scale, self.mask);
            p.window = self.window;
            p.sinks = c.local_sinks();
            let dims = SeqDims {
                sq: sg.len,
                sk: sg.len,
                heads: hq,
                groups: hg,
                head_dim: hn,
            };
            let r = attend_sequence_backward(
                &c.gather_seq(&qa, sg, rows, hq * hn),
                &c.gather_seq(&ka, sg, rows, hg * hn),
                &c.gather_seq(&va, sg, rows, hg * hn),
                &c.gather_seq(&oa, sg, rows, hq * hn),
                &lse_rows(&c.gather_seq(&la, sg, rows, hq), 0, sg.len, hq),
                &c.gather_seq(&da, sg, rows, hq * hn),
                dims,
                &p,
                false,
            )?;
            c.scatter_seq(&r.dq, sg, rows, hq * hn, &mut bq);
            c.scatter_seq(&r.dk, sg, rows, hg * hn, &mut bk);
            c.scatter_seq(&r.dv, sg, rows, hg * hn, &mut bv);
            if let Some(ds) = &r.dsinks {
                for (a, b) in dsinks[me * hq..(me + 1) * hq].iter_mut().zip(ds) {
                    *a += *b as f64;
                }
            }
        }
        Ok((
            c.merge_head_blocks(&c.a2a(bq)?, np, hn),
            c.merge_head_blocks(&c.a2a(bk)?, ng, hn),
            c.merge_head_blocks(&c.a2a(bv)?, ng, hn),
            dsinks,
        ))
    }
}

/// A backward's inputs in packed (batch-major) rows.
struct Packed<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    out: &'a [f32],
    lse: &'a [f32],
    dout: &'a [f32],
}

/// Accumulators of the pieces.
struct PieceGrads {
    dq: Vec<f64>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dsinks: Vec<f64>,
}

type Grads = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f64>);

impl<C: Communicator<Tensor = Tensor> + Sync> CoreHook for CpCoreTrain<'_, C> {
    /// The LSE is `[rows, np]` in packed (batch-major) rows, the sink column included.
    fn forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let c = &self.core;
        let (qw, kw) = (c.heads * c.head_dim, c.groups * c.head_dim);
        let (qp, kp, vp) = (self.pack(q, qw), self.pack(k, kw), self.pack(v, kw));
        let (out, lse, max_logit) = match c.comm_type {
            CpCommType::P2p | CpCommType::AllGather => c
                .by_kv_acc(&self.segs, &qp, &kp, &vp, self.mask, self.window)?
                .finish_lse(c.sinks.as_ref()),
            CpCommType::A2a => {
                let (o, l, m) =
                    c.ulysses_lse(&self.segs, &qp, &kp, &vp, self.mask, self.window, true)?;
                (o, l.unwrap_or_default(), m)
            }
        };
        Ok((self.unpack(out, qw), lse, self.global_max(max_logit)?))
    }

    fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        dout: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>, Option<Vec<f32>>)> {
        let c = &self.core;
        let (qw, kw) = (c.heads * c.head_dim, c.groups * c.head_dim);
        let (qp, kp, vp) = (self.pack(q, qw), self.pack(k, kw), self.pack(v, kw));
        let (op, dp) = (self.pack(out, qw), self.pack(dout, qw));
        let x = Packed {
            q: &qp,
            k: &kp,
            v: &vp,
            out: &op,
            lse,
            dout: &dp,
        };
        let (dq, dk, dv, ds) = match c.comm_type {
            CpCommType::P2p | CpCommType::AllGather => self.by_kv_backward(&x)?,
            CpCommType::A2a => self.ulysses_backward(&x)?,
        };
        let dsinks = matches!(c.sinks, Some(CpSinks::PerHead(_)))
            .then(|| ds.into_iter().map(|x| x as f32).collect());
        Ok((
            self.unpack(dq, qw),
            self.unpack(dk, kw),
            self.unpack(dv, kw),
            dsinks,
        ))
    }
}
