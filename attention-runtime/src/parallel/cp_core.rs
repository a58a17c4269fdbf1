//! [`CpCoreAttention`]: core attention of one context-parallel rank on the CPU reference,
//! exchanging keys and values (or heads) with the other ranks of its group.
//!
//! It stands in for the layer's `core_attention` ([`super::CpLayer`] builds it for each
//! call), so `linear_qkv`, q/k norm, rope and `linear_proj` run as in a single-rank layer on
//! the rank's own tokens. Visibility is decided on each token's index in its whole sequence
//! ([`CpLayout::token`]) with the same predicate as one rank ([`crate::reference::visible`]
//! with `sq = sk` = the sequence length), so causal, no mask and the sliding window mean what
//! they mean without context parallelism.
//!
//! - `p2p`: the K/V of every rank travel around the ring (`cp - 1` [`Communicator::send_recv`]
//!   steps to rank + 1); each step's partial attention (output and LSE, sinks left out) is
//!   merged into the running result by its LSE, then the sinks join the softmax once.
//!   Megatron overlaps each step's exchange with the previous step's compute; here they run
//!   one after the other (same result).
//! - `all_gather`: every rank's K/V are all-gathered, then merged as in `p2p`.
//! - `a2a` (Ulysses): q, k, v are all-to-all'ed from "my tokens, every head" to "every token,
//!   my `np / cp` heads (`ng / cp` groups)", attended whole, and all-to-all'ed back.

use attention_codegen::MaskType;

use super::comm::Communicator;
use super::cp_layout::CpLayout;
use super::CpCommType;
use crate::error::{AttnError, Result};
use crate::modules::{check_cu_seqlens, CoreArgs, CoreAttentionModule};
use crate::reference::{attend_sequence, visible, AttendParams, SeqDims, SinkLogits};
use crate::tensor::Tensor;

/// Attention sinks of the layer, by value.
#[derive(Debug, Clone, PartialEq)]
pub enum CpSinks {
    /// A zero logit in every row.
    OffByOne,
    /// Learnable logits `[np]`.
    PerHead(Vec<f32>),
}

/// One rank's core attention under context parallelism (see the module docs).
pub struct CpCoreAttention<'a, C> {
    /// The context-parallel group.
    pub comm: &'a C,
    /// This rank's layout.
    pub layout: CpLayout,
    /// How K/V (or heads) are exchanged.
    pub comm_type: CpCommType,
    /// Query heads np (of this rank's layer).
    pub heads: usize,
    /// Groups ng.
    pub groups: usize,
    /// Head dim hn.
    pub head_dim: usize,
    /// Softmax scale.
    pub scale: f32,
    /// Attention sinks.
    pub sinks: Option<CpSinks>,
}

/// A sequence: its whole length and its rows in this rank's packed buffers.
#[derive(Debug, Clone)]
pub(super) struct Seg {
    pub(super) len: usize,
    pub(super) rows: std::ops::Range<usize>,
}

/// The sequences of a call: padded `(s, b)` (each batch entry one sequence of `s * cp`
/// tokens, rows batch-major after [`reorder`]) or this rank's packed `cu_seqlens`.
pub(super) fn segs_of(padded: Option<(usize, usize)>, local_cu: &[usize], cp: usize) -> Vec<Seg> {
    match padded {
        Some((s, b)) => (0..b)
            .map(|bi| Seg {
                len: s * cp,
                rows: bi * s..(bi + 1) * s,
            })
            .collect(),
        None => local_cu
            .windows(2)
            .map(|w| Seg {
                len: (w[1] - w[0]) * cp,
                rows: w[0]..w[1],
            })
            .collect(),
    }
}

/// Running softmax-merged output `[rows, np, hn]` and LSE `[rows, np]`, in f64, and the
/// max logit per head `[np]` of the partials merged so far.
pub(super) struct Acc {
    out: Vec<f64>,
    lse: Vec<f64>,
    max_logit: Vec<f32>,
    np: usize,
    hn: usize,
}

impl Acc {
    pub(super) fn new(rows: usize, np: usize, hn: usize) -> Self {
        Acc {
            out: vec![0.0; rows * np * hn],
            lse: vec![f64::NEG_INFINITY; rows * np],
            max_logit: vec![f32::NEG_INFINITY; np],
            np,
            hn,
        }
    }

    /// Merge a partial of `n` rows from `row0`: `out` `[n, np, hn]`, `lse` `[np, n]`.
    pub(super) fn merge(&mut self, row0: usize, n: usize, out: &[f32], lse: &[f32]) {
        let (np, hn) = (self.np, self.hn);
        for i in 0..n {
            for h in 0..np {
                let lp = lse[h * n + i] as f64;
                if lp == f64::NEG_INFINITY {
                    continue;
                }
                let a = (row0 + i) * np + h;
                let la = self.lse[a];
                let m = la.max(lp);
                let (wa, wp) = ((la - m).exp(), (lp - m).exp());
                let tot = wa + wp;
                let o = &mut self.out[a * hn..(a + 1) * hn];
                let p = &out[(i * np + h) * hn..][..hn];
                for (x, y) in o.iter_mut().zip(p) {
                    *x = (*x * wa + *y as f64 * wp) / tot;
                }
                self.lse[a] = m + tot.ln();
            }
        }
    }

    /// The output with the sink column joined to every softmax row.
    pub(super) fn finish(self, sinks: Option<&CpSinks>) -> Vec<f32> {
        self.finish_lse(sinks).0
    }

    /// [`finish`](Self::finish) and the LSE `[rows, np]` with the sink column joined (the
    /// global LSE the backward reads), and the max logit `[np]`.
    pub(super) fn finish_lse(self, sinks: Option<&CpSinks>) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (np, hn) = (self.np, self.hn);
        let mut lse = self.lse;
        let mut out = self.out;
        if let Some(s) = sinks {
            for (a, l) in lse.iter_mut().enumerate() {
                let sink = match s {
                    CpSinks::OffByOne => 0.0,
                    CpSinks::PerHead(v) => v[a % np] as f64,
                };
                if *l == f64::NEG_INFINITY {
                    // Only the sink column is left in the softmax.
                    *l = sink;
                    continue;
                }
                let m = l.max(sink);
                let total = m + ((*l - m).exp() + (sink - m).exp()).ln();
                let f = (*l - total).exp();
                out[a * hn..(a + 1) * hn].iter_mut().for_each(|x| *x *= f);
                *l = total;
            }
        }
        (
            out.into_iter().map(|x| x as f32).collect(),
            lse.into_iter().map(|x| x as f32).collect(),
            self.max_logit,
        )
    }
}

fn bad(arg: &str, expected: impl Into<String>, got: impl Into<String>) -> AttnError {
    AttnError::InvalidArgument {
        arg: arg.into(),
        expected: expected.into(),
        got: got.into(),
    }
}

/// Padded `[s, b, w]` -> batch-major `[b * s, w]`, or back (`inverse`).
pub(super) fn reorder(data: &[f32], s: usize, b: usize, w: usize, inverse: bool) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    for bi in 0..b {
        for i in 0..s {
            let (p, q) = ((i * b + bi) * w, (bi * s + i) * w);
            let (src, dst) = if inverse { (q, p) } else { (p, q) };
            out[dst..dst + w].copy_from_slice(&data[src..src + w]);
        }
    }
    out
}

impl<C: Communicator<Tensor = Tensor>> CpCoreAttention<'_, C> {
    pub(super) fn cp(&self) -> usize {
        self.layout.cp_size
    }

    /// The partial attention of this rank's queries over rank `src`'s keys and values, every
    /// sequence, merged into `acc`.
    #[allow(clippy::too_many_arguments)]
    fn partial(
        &self,
        segs: &[Seg],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        src: CpLayout,
        mask: MaskType,
        window: Option<attention_codegen::Window>,
        acc: &mut Acc,
    ) -> Result<()> {
        let (np, ng, hn) = (self.heads, self.groups, self.head_dim);
        for sg in segs {
            let n = sg.rows.len();
            let me = self.layout;
            let f = move |_h: usize, i: usize, j: usize| {
                !visible(
                    mask,
                    window,
                    sg.len,
                    sg.len,
                    me.token(sg.len, i),
                    src.token(sg.len, j),
                )
            };
            let mut p = AttendParams::new(self.scale, MaskType::NoMask);
            p.mask_fn = Some(&f);
            let dims = SeqDims {
                sq: n,
                sk: n,
                heads: np,
                groups: ng,
                head_dim: hn,
            };
            let (r0, r1) = (sg.rows.start, sg.rows.end);
            let r = attend_sequence(
                &q[r0 * np * hn..r1 * np * hn],
                &k[r0 * ng * hn..r1 * ng * hn],
                &v[r0 * ng * hn..r1 * ng * hn],
                dims,
                &p,
            )?;
            acc.merge(r0, n, &r.out, &r.lse);
            for (m, x) in acc.max_logit.iter_mut().zip(&r.max_logit) {
                *m = m.max(*x);
            }
        }
        Ok(())
    }

    /// `p2p` and `all_gather`: K/V of every rank, partials merged by LSE.
    fn by_kv(
        &self,
        segs: &[Seg],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        args: &CoreArgs<'_>,
    ) -> Result<Vec<f32>> {
        Ok(self
            .by_kv_acc(segs, q, k, v, args.mask_type, args.window)?
            .finish(self.sinks.as_ref()))
    }

    /// [`by_kv`](Self::by_kv) before the sinks join: the merged partials.
    pub(super) fn by_kv_acc(
        &self,
        segs: &[Seg],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: MaskType,
        window: Option<attention_codegen::Window>,
    ) -> Result<Acc> {
        let (cp, rank) = (self.cp(), self.layout.cp_rank);
        let rows = q.len() / (self.heads * self.head_dim);
        let mut acc = Acc::new(rows, self.heads, self.head_dim);
        let kvn = k.len();
        let mut kv = Tensor::new(&[2 * kvn], [k, v].concat())?;
        let gathered = if self.comm_type == CpCommType::AllGather {
            let mut all = Tensor::zeros(&[cp * 2 * kvn]);
            self.comm.all_gather(&kv, &mut all)?;
            Some(all)
        } else {
            None
        };
        for step in 0..cp {
            let src = (rank + cp - step) % cp;
            let block = match &gathered {
                Some(all) => &all.data()[src * 2 * kvn..(src + 1) * 2 * kvn],
                None => kv.data(),
            };
            let (bk, bv) = block.split_at(kvn);
            self.partial(
                segs,
                q,
                bk,
                bv,
                self.layout.of_rank(src),
                mask,
                window,
                &mut acc,
            )?;
            if gathered.is_none() && step + 1 < cp {
                let mut next = Tensor::zeros(&[2 * kvn]);
                self.comm
                    .send_recv(&kv, (rank + 1) % cp, &mut next, (rank + cp - 1) % cp)?;
                kv = next;
            }
        }
        Ok(acc)
    }

    /// Blocks of `w` heads of `x` `[rows, heads, hn]` grouped by rank: `[cp][rows, w, hn]`.
    fn head_blocks(&self, x: &[f32], heads: usize) -> Vec<f32> {
        self.head_blocks_w(x, heads, self.head_dim)
    }

    /// [`head_blocks`](Self::head_blocks) with `hn` elements per head.
    pub(super) fn head_blocks_w(&self, x: &[f32], heads: usize, hn: usize) -> Vec<f32> {
        let cp = self.cp();
        let w = heads / cp;
        let rows = x.len() / (heads * hn);
        let mut out = Vec::with_capacity(x.len());
        for j in 0..cp {
            for r in 0..rows {
                out.extend_from_slice(&x[(r * heads + j * w) * hn..(r * heads + (j + 1) * w) * hn]);
            }
        }
        out
    }

    pub(super) fn a2a(&self, x: Vec<f32>) -> Result<Vec<f32>> {
        let n = x.len();
        let send = Tensor::new(&[n], x)?;
        let mut recv = Tensor::zeros(&[n]);
        self.comm.all_to_all(&send, &mut recv)?;
        Ok(recv.into_data())
    }

    /// `a2a`: every token of this rank's heads, attended whole, sent back.
    fn ulysses(
        &self,
        segs: &[Seg],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        args: &CoreArgs<'_>,
    ) -> Result<Vec<f32>> {
        Ok(self
            .ulysses_lse(segs, q, k, v, args.mask_type, args.window, false)?
            .0)
    }

    /// Rebuild `[rows, heads, w]` from `[cp (head block)][rows, heads / cp, w]`.
    pub(super) fn merge_head_blocks(&self, got: &[f32], heads: usize, w: usize) -> Vec<f32> {
        let cp = self.cp();
        let hq = heads / cp;
        let rows = got.len() / (heads * w);
        let mut out = vec![0f32; got.len()];
        for j in 0..cp {
            for r in 0..rows {
                let from = (j * rows + r) * hq * w;
                let to = (r * heads + j * hq) * w;
                out[to..to + hq * w].copy_from_slice(&got[from..from + hq * w]);
            }
        }
        out
    }

    /// The whole sequence `sg` in token order, `[len, w]`, from `x` `[cp (source rank)][rows,
    /// w]` (every rank's rows of it).
    pub(super) fn gather_seq(&self, x: &[f32], sg: &Seg, rows: usize, w: usize) -> Vec<f32> {
        let mut out = vec![0f32; sg.len * w];
        for src in 0..self.cp() {
            let l = self.layout.of_rank(src);
            for (i, r) in sg.rows.clone().enumerate() {
                let t = l.token(sg.len, i);
                let from = (src * rows + r) * w;
                out[t * w..(t + 1) * w].copy_from_slice(&x[from..from + w]);
            }
        }
        out
    }

    /// The inverse of [`gather_seq`](Self::gather_seq): the whole sequence's `[len, w]` rows
    /// scattered into `back` `[cp (destination rank)][rows, w]`.
    pub(super) fn scatter_seq(&self, x: &[f32], sg: &Seg, rows: usize, w: usize, back: &mut [f32]) {
        for dst in 0..self.cp() {
            let l = self.layout.of_rank(dst);
            for (i, row) in sg.rows.clone().enumerate() {
                let t = l.token(sg.len, i);
                let to = (dst * rows + row) * w;
                back[to..to + w].copy_from_slice(&x[t * w..(t + 1) * w]);
            }
        }
    }

    /// This rank's heads' sink logits under `a2a`.
    pub(super) fn local_sinks(&self) -> Option<SinkLogits<'_>> {
        let hq = self.heads / self.cp();
        let me = self.layout.cp_rank;
        match &self.sinks {
            None => None,
            Some(CpSinks::OffByOne) => Some(SinkLogits::OffByOne),
            Some(CpSinks::PerHead(s)) => Some(SinkLogits::PerHead(&s[me * hq..(me + 1) * hq])),
        }
    }

    /// [`ulysses`](Self::ulysses) returning also (`want_lse`) the LSE `[rows, np]` (sink
    /// included) and the max logit `[np]` (this rank's heads; `-inf` for the others).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub(super) fn ulysses_lse(
        &self,
        segs: &[Seg],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: MaskType,
        window: Option<attention_codegen::Window>,
        want_lse: bool,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>, Vec<f32>)> {
        let (cp, hn) = (self.cp(), self.head_dim);
        let (hq, hg) = (self.heads / cp, self.groups / cp);
        let rows = q.len() / (self.heads * hn);
        // [cp (source rank)][rows, hq | hg, hn]: every rank's tokens of this rank's heads.
        let qa = self.a2a(self.head_blocks(q, self.heads))?;
        let ka = self.a2a(self.head_blocks(k, self.groups))?;
        let va = self.a2a(self.head_blocks(v, self.groups))?;
        let me = self.layout.cp_rank;
        let mut max_logit = vec![f32::NEG_INFINITY; self.heads];
        let mut back = vec![0f32; cp * rows * hq * hn];
        let mut back_lse = vec![0f32; if want_lse { cp * rows * hq } else { 0 }];
        for sg in segs {
            let mut p = AttendParams::new(self.scale, mask);
            p.window = window;
            p.sinks = self.local_sinks();
            let dims = SeqDims {
                sq: sg.len,
                sk: sg.len,
                heads: hq,
                groups: hg,
                head_dim: hn,
            };
            let r = attend_sequence(
                &self.gather_seq(&qa, sg, rows, hq * hn),
                &self.gather_seq(&ka, sg, rows, hg * hn),
                &self.gather_seq(&va, sg, rows, hg * hn),
                dims,
                &p,
            )?;
            self.scatter_seq(&r.out, sg, rows, hq * hn, &mut back);
            if want_lse {
                // [hq, len] -> [len, hq].
                let mut t = vec![0f32; sg.len * hq];
                for h in 0..hq {
                    for i in 0..sg.len {
                        t[i * hq + h] = r.lse[h * sg.len + i];
                    }
                }
                self.scatter_seq(&t, sg, rows, hq, &mut back_lse);
            }
            for (m, x) in max_logit[me * hq..(me + 1) * hq]
                .iter_mut()
                .zip(&r.max_logit)
            {
                *m = m.max(*x);
            }
        }
        // [cp (head block)][rows, hq, hn] -> [rows, np, hn].
        let out = self.merge_head_blocks(&self.a2a(back)?, self.heads, hn);
        let lse = if want_lse {
            Some(self.merge_head_blocks(&self.a2a(back_lse)?, self.heads, 1))
        } else {
            None
        };
        Ok((out, lse, max_logit))
    }
}

impl<C: Communicator<Tensor = Tensor> + Sync> CoreAttentionModule for CpCoreAttention<'_, C> {
    /// Padded: q `[s/cp, b, np, hn]`, k/v `[s/cp, b, ng, hn]`, this rank's tokens (see
    /// [`CpLayout`]); packed: q `[t/cp, np, hn]` with this rank's `cu_seqlens` (every length
    /// divided by `cp`). Output: q's shape.
    ///
    /// Errors: [`AttnError::InvalidArgument`] for a mask or bias tensor, or a mask type other
    /// than causal, causal_bottom_right or no_mask; `Shape` / `CuSeqlens` for bad inputs;
    /// [`AttnError::Collective`] when the exchange fails.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, args: &CoreArgs<'_>) -> Result<Tensor> {
        let (np, ng, hn, cp) = (self.heads, self.groups, self.head_dim, self.cp());
        if args.attention_mask.is_some() || args.attention_bias.is_some() {
            return Err(bad(
                "attention_mask/attention_bias",
                "none under context parallelism",
                "a tensor",
            ));
        }
        if !matches!(
            args.mask_type,
            MaskType::Causal | MaskType::CausalBottomRight | MaskType::NoMask
        ) {
            return Err(bad(
                "mask_type",
                "causal, causal_bottom_right or no_mask under context parallelism",
                args.mask_type.name(),
            ));
        }
        let (segs, padded) = match &args.packed {
            None => {
                q.expect_shape("q", &[None, None, Some(np), Some(hn)])?;
                let (s, b) = (q.shape()[0], q.shape()[1]);
                k.expect_shape("k", &[Some(s), Some(b), Some(ng), Some(hn)])?;
                v.expect_shape("v", &[Some(s), Some(b), Some(ng), Some(hn)])?;
                let segs = (0..b)
                    .map(|bi| Seg {
                        len: s * cp,
                        rows: bi * s..(bi + 1) * s,
                    })
                    .collect::<Vec<_>>();
                (segs, Some((s, b)))
            }
            Some(pk) => {
                q.expect_shape("q", &[None, Some(np), Some(hn)])?;
                let t = q.shape()[0];
                k.expect_shape("k", &[Some(t), Some(ng), Some(hn)])?;
                v.expect_shape("v", &[Some(t), Some(ng), Some(hn)])?;
                let cu = check_cu_seqlens("cu_seqlens_q", pk.cu_seqlens_q, t)?;
                let segs = cu
                    .windows(2)
                    .map(|w| Seg {
                        len: (w[1] - w[0]) * cp,
                        rows: w[0]..w[1],
                    })
                    .collect::<Vec<_>>();
                (segs, None)
            }
        };
        for sg in &segs {
            self.layout.chunks("q", sg.len)?;
        }
        let pack = |x: &Tensor, w: usize| match padded {
            Some((s, b)) => reorder(x.data(), s, b, w, false),
            None => x.data().to_vec(),
        };
        let (qp, kp, vp) = (pack(q, np * hn), pack(k, ng * hn), pack(v, ng * hn));
        let out = match self.comm_type {
            CpCommType::P2p | CpCommType::AllGather => self.by_kv(&segs, &qp, &kp, &vp, args)?,
            CpCommType::A2a => self.ulysses(&segs, &qp, &kp, &vp, args)?,
        };
        let out = match padded {
            Some((s, b)) => reorder(&out, s, b, np * hn, true),
            None => out,
        };
        Tensor::new(q.shape(), out)
    }
}
