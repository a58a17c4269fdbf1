//! The backward of one sequence's core attention ([`attend_sequence`](super::attend_sequence)),
//! in the FlashAttention-2 formulation (Dao, "FlashAttention-2: Faster Attention with Better
//! Parallelism and Work Partitioning", 2023, Algorithm 2):
//!
//! ```text
//! S_ij  = scale * q_i . k_j + bias_ij                 (visible keys only)
//! P_ij  = exp(S_ij - lse_i)                           (lse from the forward, sink included)
//! D_i   = rowsum(dO_i * O_i)
//! dV_j  = sum_i P_ij dO_i
//! dP_ij = dO_i . v_j
//! dS_ij = P_ij (dP_ij - D_i)
//! dQ_i  = scale * sum_j dS_ij k_j
//! dK_j  = scale * sum_i dS_ij q_i
//! dsink = -sum_i P_sink,i D_i,   P_sink,i = exp(sink - lse_i)   (learnable sinks)
//! dbias_ij = dS_ij
//! ```
//!
//! With GQA, `dK`/`dV` of a group sum over the group's query heads. Every sum accumulates in
//! f64. Masked keys (by the mask, the window, causality, `mask_fn` or a `-inf` bias) are never
//! read, and a fully masked row (`lse = -inf`, or only the sink column left) contributes
//! nothing: its `dQ` row is zero, never NaN.

use super::attention::{dot, AttendParams, SeqDims, SinkLogits};
use super::mask::visible;
use crate::error::{AttnError, Result};

/// The gradients [`attend_sequence_backward`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct AttendGrads {
    /// Gradient of `q`, `[sq, np, hn]`.
    pub dq: Vec<f32>,
    /// Gradient of `k`, `[sk, ng, hn]` (summed over each group's query heads).
    pub dk: Vec<f32>,
    /// Gradient of `v`, `[sk, ng, hn]` (summed over each group's query heads).
    pub dv: Vec<f32>,
    /// Gradient of the learnable sink logits, `[np]`; `Some` only for
    /// [`SinkLogits::PerHead`] (the off-by-one column has no parameter).
    pub dsinks: Option<Vec<f32>>,
    /// Gradient of the additive bias, `[np, sq, sk]` (head-major; `0` at masked positions),
    /// when asked for (`want_dbias`). Broadcasting the bias to `[b, np, sq, sk]` is undone by
    /// the caller (summing over the broadcast dims).
    pub dbias: Option<Vec<f32>>,
}

fn check_len(arg: &str, got: usize, shape: &[usize]) -> Result<()> {
    let want: usize = shape.iter().product();
    if got == want {
        Ok(())
    } else {
        Err(AttnError::Shape {
            arg: arg.into(),
            expected: format!("{shape:?} ({want} elements)"),
            got: vec![got],
        })
    }
}

/// The backward of [`attend_sequence`](super::attend_sequence) for one sequence.
///
/// - `q`: `[sq, np, hn]`, `k`/`v`: `[sk, ng, hn]`: the forward's inputs.
/// - `out`: `[sq, np, hn]` and `lse`: `[np, sq]`: the forward's outputs
///   ([`AttendOutput`](super::AttendOutput)); `lse` includes the sink column.
/// - `dout`: `[sq, np, hn]`, the gradient of `out`.
/// - `dims`, `p`: the same as the forward's.
/// - `want_dbias`: also return the bias gradient `dS` (`[np, sq, sk]`).
///
/// Formulas: the module docs (FlashAttention-2, Algorithm 2). Accumulation in f64; masked
/// keys never read; a fully masked row gives zeros.
///
/// Errors ([`AttnError::Shape`] / [`AttnError::InvalidArgument`]) when a slice length does not
/// match `dims`, `groups` does not divide `heads`, or the learnable sink logits are not `[np]`.
#[allow(clippy::too_many_arguments)]
pub fn attend_sequence_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dims: SeqDims,
    p: &AttendParams<'_>,
    want_dbias: bool,
) -> Result<AttendGrads> {
    let SeqDims {
        sq,
        sk,
        heads,
        groups,
        head_dim: hn,
    } = dims;
    if groups == 0 || !heads.is_multiple_of(groups) {
        return Err(AttnError::InvalidArgument {
            arg: "dims.groups".into(),
            expected: format!("a positive divisor of heads = {heads}"),
            got: groups.to_string(),
        });
    }
    check_len("q", q.len(), &[sq, heads, hn])?;
    check_len("k", k.len(), &[sk, groups, hn])?;
    check_len("v", v.len(), &[sk, groups, hn])?;
    check_len("out", out.len(), &[sq, heads, hn])?;
    check_len("lse", lse.len(), &[heads, sq])?;
    check_len("dout", dout.len(), &[sq, heads, hn])?;
    if let Some(SinkLogits::PerHead(s)) = p.sinks {
        if s.len() != heads {
            return Err(AttnError::Shape {
                arg: "sinks".into(),
                expected: format!("[{heads}]"),
                got: vec![s.len()],
            });
        }
    }
    let per = heads / groups;
    let scale = p.scale as f64;
    let mut dq = vec![0f32; sq * heads * hn];
    let mut dk = vec![0f64; sk * groups * hn];
    let mut dv = vec![0f64; sk * groups * hn];
    let mut dsinks = match p.sinks {
        Some(SinkLogits::PerHead(_)) => Some(vec![0f32; heads]),
        _ => None,
    };
    let mut dbias = want_dbias.then(|| vec![0f32; heads * sq * sk]);
    let mut probs = vec![0f64; sk];
    let mut vis = vec![false; sk];
    let mut acc = vec![0f64; hn];
    for h in 0..heads {
        let g = h / per;
        let sink = match p.sinks {
            None => None,
            Some(SinkLogits::OffByOne) => Some(0f64),
            Some(SinkLogits::PerHead(s)) => Some(s[h] as f64),
        };
        let mut dsink = 0f64;
        for i in 0..sq {
            let l = lse[h * sq + i] as f64;
            if l == f64::NEG_INFINITY {
                // Fully masked without a sink: the output row is a constant zero.
                continue;
            }
            let qrow = &q[(i * heads + h) * hn..][..hn];
            let orow = &out[(i * heads + h) * hn..][..hn];
            let dorow = &dout[(i * heads + h) * hn..][..hn];
            let d = dot(dorow, orow);
            let mut any = false;
            for j in 0..sk {
                vis[j] = false;
                let ok = visible(p.mask, p.window, sq, sk, i, j)
                    && !p.mask_fn.is_some_and(|f| f(h, i, j));
                if !ok {
                    continue;
                }
                let b = p.bias_fn.map_or(0.0, |f| f(h, i, j) as f64);
                if b == f64::NEG_INFINITY {
                    continue;
                }
                vis[j] = true;
                any = true;
                let krow = &k[(j * groups + g) * hn..][..hn];
                probs[j] = (dot(qrow, krow) * scale + b - l).exp();
            }
            if let Some(s) = sink {
                // A fully masked row with a sink has out = 0, so D = 0 and this adds 0.
                dsink -= (s - l).exp() * d;
            }
            if !any {
                continue;
            }
            acc.iter_mut().for_each(|a| *a = 0.0);
            for j in 0..sk {
                if !vis[j] {
                    continue;
                }
                let pij = probs[j];
                let base = (j * groups + g) * hn;
                let krow = &k[base..][..hn];
                let vrow = &v[base..][..hn];
                let dp = dot(dorow, vrow);
                let ds = pij * (dp - d);
                if let Some(db) = dbias.as_mut() {
                    db[(h * sq + i) * sk + j] = ds as f32;
                }
                let dsc = ds * scale;
                for c in 0..hn {
                    dv[base + c] += pij * dorow[c] as f64;
                    dk[base + c] += dsc * qrow[c] as f64;
                    acc[c] += dsc * krow[c] as f64;
                }
            }
            for (o, a) in dq[(i * heads + h) * hn..][..hn].iter_mut().zip(&acc) {
                *o = *a as f32;
            }
        }
        if let Some(ds) = dsinks.as_mut() {
            ds[h] = dsink as f32;
        }
    }
    Ok(AttendGrads {
        dq,
        dk: dk.into_iter().map(|x| x as f32).collect(),
        dv: dv.into_iter().map(|x| x as f32).collect(),
        dsinks,
        dbias,
    })
}
