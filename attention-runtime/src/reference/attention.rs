//! Core attention for one sequence: `softmax(q k^T * scale + bias + mask) v` per query head,
//! with GQA by indexing (query head `i` uses group `i / (np / ng)`), every mask type, the
//! bottom-right aligned sliding window, additive bias and attention sinks.
//!
//! Scores, softmax sums and the weighted sum of values accumulate in f64.

use attention_codegen::{MaskType, Window};

use super::mask::visible;
use crate::error::{AttnError, Result};

/// Dimensions of one sequence's attention problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqDims {
    /// Query tokens.
    pub sq: usize,
    /// Key tokens.
    pub sk: usize,
    /// Query heads np.
    pub heads: usize,
    /// Key/value groups ng (divides `heads`).
    pub groups: usize,
    /// Head dim hn.
    pub head_dim: usize,
}

/// The extra softmax column of attention sinks (dropped after the softmax).
#[derive(Clone, Copy)]
pub enum SinkLogits<'a> {
    /// `off_by_one`: a zero logit in every row.
    OffByOne,
    /// `learnable`: one logit per query head, `[np]`.
    PerHead(&'a [f32]),
}

/// A caller-given predicate `(head, i, j) -> true when masked out` (the padding/arbitrary
/// mask tensor, already broadcast).
pub type MaskFn<'a> = &'a dyn Fn(usize, usize, usize) -> bool;
/// A caller-given additive post-scale bias `(head, i, j) -> bias`.
pub type BiasFn<'a> = &'a dyn Fn(usize, usize, usize) -> f32;

/// Everything besides q, k and v that shapes the attention.
#[derive(Clone, Copy)]
pub struct AttendParams<'a> {
    /// Multiplies `q k^T` (the bias is added after scaling).
    pub scale: f32,
    /// The generated part of the mask (`causal`, `causal_bottom_right`, ...). Mask types that
    /// take a tensor (`padding`, `padding_causal`, `arbitrary`) read it through `mask_fn`;
    /// `padding_causal` adds top-left causality.
    pub mask: MaskType,
    /// Sliding window `(left, right)`, bottom-right aligned, `-1` = unbounded.
    pub window: Option<Window>,
    /// Caller mask, true = masked out.
    pub mask_fn: Option<MaskFn<'a>>,
    /// Additive bias.
    pub bias_fn: Option<BiasFn<'a>>,
    /// Attention sinks.
    pub sinks: Option<SinkLogits<'a>>,
}

impl<'a> AttendParams<'a> {
    /// Params with `scale` and `mask`, nothing else.
    pub fn new(scale: f32, mask: MaskType) -> Self {
        AttendParams {
            scale,
            mask,
            window: None,
            mask_fn: None,
            bias_fn: None,
            sinks: None,
        }
    }
}

/// The result of [`attend_sequence`].
#[derive(Debug, Clone, PartialEq)]
pub struct AttendOutput {
    /// `[sq, np, hn]`; a fully masked row is all zeros.
    pub out: Vec<f32>,
    /// Log-sum-exp of each softmax row (sink column included), `[np, sq]`. A fully masked
    /// row (by the mask, the window, causality or a `-inf` bias) has `-inf`, or the sink
    /// logit when a sink column keeps the row non-empty.
    pub lse: Vec<f32>,
    /// Per query head the max pre-softmax logit `q k^T * scale + bias` over visible
    /// positions (QK-Clip statistic), `[np]`; `-inf` when nothing is visible.
    pub max_logit: Vec<f32>,
}

pub(crate) fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; 4];
    let n4 = a.len() / 4 * 4;
    let (a4, ar) = a.split_at(n4);
    let (b4, br) = b.split_at(n4);
    for (x, y) in a4.chunks_exact(4).zip(b4.chunks_exact(4)) {
        acc[0] += x[0] as f64 * y[0] as f64;
        acc[1] += x[1] as f64 * y[1] as f64;
        acc[2] += x[2] as f64 * y[2] as f64;
        acc[3] += x[3] as f64 * y[3] as f64;
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (x, y) in ar.iter().zip(br) {
        s += *x as f64 * *y as f64;
    }
    s
}

fn check_len(arg: &str, got: usize, shape: [usize; 3]) -> Result<()> {
    if got == shape.iter().product::<usize>() {
        Ok(())
    } else {
        Err(AttnError::Shape {
            arg: arg.into(),
            expected: format!("{shape:?} ({} elements)", shape.iter().product::<usize>()),
            got: vec![got],
        })
    }
}

/// Attention of one sequence.
///
/// - `q`: `[sq, np, hn]`, `k`/`v`: `[sk, ng, hn]` (row-major).
/// - Key `j` is visible to query `i` when the generated mask, the window and `mask_fn` all
///   allow it (see [`super::mask::visible`]) and its bias is not `-inf`. Masked keys are never
///   read: whatever K, V or the bias hold there (NaN, Inf, stale data) changes nothing.
/// - A fully masked row gives zeros (semantics.md), never NaN.
/// - Returns `out [sq, np, hn]`, `lse [np, sq]`, `max_logit [np]`.
///
/// Errors ([`AttnError::Shape`] / [`AttnError::InvalidArgument`]) when a slice length does not
/// match `dims`, `groups` does not divide `heads`, or the learnable sink logits are not `[np]`.
pub fn attend_sequence(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: SeqDims,
    p: &AttendParams<'_>,
) -> Result<AttendOutput> {
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
    check_len("q", q.len(), [sq, heads, hn])?;
    check_len("k", k.len(), [sk, groups, hn])?;
    check_len("v", v.len(), [sk, groups, hn])?;
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
    let mut out = vec![0f32; sq * heads * hn];
    let mut lse = vec![f32::NEG_INFINITY; heads * sq];
    let mut max_logit = vec![f32::NEG_INFINITY; heads];
    let mut logits = vec![0f64; sk];
    let mut vis = vec![false; sk];
    let mut acc = vec![0f64; hn];
    for h in 0..heads {
        let g = h / per;
        let sink = match p.sinks {
            None => None,
            Some(SinkLogits::OffByOne) => Some(0f64),
            Some(SinkLogits::PerHead(s)) => Some(s[h] as f64),
        };
        for i in 0..sq {
            let qrow = &q[(i * heads + h) * hn..][..hn];
            let mut m = f64::NEG_INFINITY;
            let mut any = false;
            for j in 0..sk {
                let ok = visible(p.mask, p.window, sq, sk, i, j)
                    && !p.mask_fn.is_some_and(|f| f(h, i, j));
                vis[j] = false;
                if !ok {
                    continue;
                }
                // A `-inf` bias masks the key like the mask does: it is skipped, so whatever
                // K and V hold there never meets a zero weight (0 * NaN).
                let b = p.bias_fn.map_or(0.0, |f| f(h, i, j) as f64);
                if b == f64::NEG_INFINITY {
                    continue;
                }
                vis[j] = true;
                any = true;
                let krow = &k[(j * groups + g) * hn..][..hn];
                // f64: a finite bias (even f32::MIN) stays a finite logit.
                let l = dot(qrow, krow) * scale + b;
                logits[j] = l;
                if l > m {
                    m = l;
                }
            }
            if !any {
                // Fully masked: zeros; the LSE is the sink column's logit when there is one
                // (it alone is left in the softmax), else -inf.
                if let Some(s) = sink {
                    lse[h * sq + i] = s as f32;
                }
                continue;
            }
            if (m as f32) > max_logit[h] {
                max_logit[h] = m as f32;
            }
            let mm = match sink {
                Some(s) if s > m => s,
                _ => m,
            };
            let mut sum = sink.map_or(0.0, |s| (s - mm).exp());
            acc.iter_mut().for_each(|a| *a = 0.0);
            for j in 0..sk {
                if !vis[j] {
                    continue;
                }
                let w = (logits[j] - mm).exp();
                sum += w;
                let vrow = &v[(j * groups + g) * hn..][..hn];
                for (a, x) in acc.iter_mut().zip(vrow) {
                    *a += w * *x as f64;
                }
            }
            let orow = &mut out[(i * heads + h) * hn..][..hn];
            for (o, a) in orow.iter_mut().zip(&acc) {
                *o = (*a / sum) as f32;
            }
            lse[h * sq + i] = (mm + sum.ln()) as f32;
        }
    }
    Ok(AttendOutput {
        out,
        lse,
        max_logit,
    })
}
