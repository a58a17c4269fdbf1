//! Attention over the KV caches: the reference `flash_decode_and_prefill` for the paged cache
//! and its static-cache counterpart. Both use bottom-right causal alignment (query `i` of `sq`
//! new tokens sees key `j` of `sk` cached ones iff `j <= i + sk - sq`), the layer's window,
//! and GQA by group index (query head `h` reads group `h / (np / ng)`).

use attention_codegen::{MaskType, Window};

use super::attention::{attend_sequence, AttendParams, SeqDims};
use crate::error::{AttnError, Result};
use crate::kv_cache::{PagedBatch, PagedKvCache, StaticKvCache};
use crate::tensor::Tensor;

/// Check `q`'s head count and dim against the cache's groups and head dim, the scale and the
/// window. Returns `np`.
fn check_common(
    q: &Tensor,
    heads_dim: usize,
    groups: usize,
    head_dim: usize,
    scale: f32,
    window: Option<Window>,
) -> Result<usize> {
    let np = q.shape()[heads_dim];
    if q.shape()[heads_dim + 1] != head_dim {
        let mut expected: Vec<String> = q.shape().iter().map(|_| "_".to_string()).collect();
        expected[heads_dim + 1] = head_dim.to_string();
        return Err(AttnError::Shape {
            arg: "q".into(),
            expected: format!("[{}] (head dim of the cache)", expected.join(", ")),
            got: q.shape().to_vec(),
        });
    }
    if np == 0 || !np.is_multiple_of(groups) {
        return Err(AttnError::InvalidArgument {
            arg: "q".into(),
            expected: format!("a positive multiple of the cache's {groups} groups as head count"),
            got: format!("{np} heads"),
        });
    }
    if !scale.is_finite() {
        return Err(AttnError::InvalidArgument {
            arg: "scale".into(),
            expected: "a finite softmax scale".into(),
            got: scale.to_string(),
        });
    }
    if let Some(w) = window {
        if w.left < -1 || w.right < -1 {
            return Err(AttnError::InvalidArgument {
                arg: "window".into(),
                expected: "sides >= -1 (-1 = unbounded)".into(),
                got: format!("({}, {})", w.left, w.right),
            });
        }
    }
    Ok(np)
}

/// Mixed decode + prefill attention over a paged cache (the reference system's
/// `flash_decode_and_prefill`).
///
/// - `q`: packed `[T, np, hn]`, request `i`'s queries at rows `cu_seqlens_q[i] ..
///   cu_seqlens_q[i + 1]` (already rotated, like the cached keys).
/// - Request `i` attends to its `seqlens_k[i]` cached keys of `layer` (new ones included: call
///   [`PagedKvCache::append_paged`] first) through block-table row `i`, with bottom-right
///   causal alignment and `window`, scaled by `scale`.
/// - `max_seqlen_q` / `max_seqlen_k` are the launch bounds a kernel sizes its grid with; they
///   must be at least the largest new-token count and the largest `seqlens_k`.
/// - Returns `[T, np, hn]`. A request with no new tokens contributes nothing; a fully masked
///   row is zeros.
///
/// Errors: `Shape` (`q` rank or head dim); `InvalidArgument` (`q` heads not a multiple of the
/// groups, `scale`, `window`, `layer`, `max_seqlen_q`, `max_seqlen_k`); every error of
/// [`PagedBatch::validate`].
#[allow(clippy::too_many_arguments)]
pub fn flash_decode_and_prefill(
    q: &Tensor,
    cache: &PagedKvCache,
    layer: usize,
    batch: &PagedBatch,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    scale: f32,
    window: Option<Window>,
) -> Result<Tensor> {
    q.expect_shape("q", &[None, None, Some(cache.head_dim())])?;
    let np = check_common(q, 1, cache.groups(), cache.head_dim(), scale, window)?;
    let (t, hn, ng) = (q.shape()[0], cache.head_dim(), cache.groups());
    // Validates `layer` before the batch (cheap, and names the right argument first).
    cache.layer_k(layer)?;
    let reqs = batch.validate(cache, t)?;
    let need_q = reqs.iter().map(|r| r.q_len).max().unwrap_or(0);
    let need_k = reqs.iter().map(|r| r.k_len).max().unwrap_or(0);
    for (arg, given, need, what) in [
        ("max_seqlen_q", max_seqlen_q, need_q, "new tokens"),
        ("max_seqlen_k", max_seqlen_k, need_k, "seqlens_k"),
    ] {
        if given < need {
            return Err(AttnError::InvalidArgument {
                arg: arg.into(),
                expected: format!("at least {need} (the largest request's {what})"),
                got: given.to_string(),
            });
        }
    }
    let row = np * hn;
    let mut out = vec![0f32; t * row];
    let params = AttendParams {
        window,
        ..AttendParams::new(scale, MaskType::CausalBottomRight)
    };
    for (i, r) in reqs.iter().enumerate() {
        if r.q_len == 0 {
            continue;
        }
        let ids = batch.block_table.row(i)?;
        let (k, v) =
            cache.gather_named(layer, ids, r.k_len, |c| format!("block_table[{i}][{c}]"))?;
        let range = r.q_start * row..(r.q_start + r.q_len) * row;
        let dims = SeqDims {
            sq: r.q_len,
            sk: r.k_len,
            heads: np,
            groups: ng,
            head_dim: hn,
        };
        let res = attend_sequence(&q.data()[range.clone()], &k, &v, dims, &params)?;
        out[range].copy_from_slice(&res.out);
    }
    Tensor::new(&[t, np, hn], out)
}

/// Attention over a [`StaticKvCache`] after [`StaticKvCache::append`]: the new queries of
/// batch slots `batch_offset .. batch_offset + b` attend to keys `[0, visible_len)` of `layer`
/// (committed length plus this layer's pending tokens), bottom-right causal with `window`.
///
/// - `q`: `[sq, b, np, hn]`; returns `[sq, b, np, hn]`.
///
/// Errors: `Shape` (`q`); `InvalidArgument` (`q` heads, `scale`, `window`, `layer`, and `q`
/// when a slot holds fewer than `sq` keys: append the new keys first); `CacheCapacity`
/// (`max_batch`) for a slot range past the cache.
pub fn attend_static(
    q: &Tensor,
    cache: &StaticKvCache,
    layer: usize,
    batch_offset: usize,
    scale: f32,
    window: Option<Window>,
) -> Result<Tensor> {
    q.expect_shape("q", &[None, None, None, Some(cache.head_dim())])?;
    let np = check_common(q, 2, cache.groups(), cache.head_dim(), scale, window)?;
    let (sq, b, hn, ng) = (q.shape()[0], q.shape()[1], cache.head_dim(), cache.groups());
    cache.layer_k(layer)?;
    let end = batch_offset.saturating_add(b);
    if end > cache.max_batch() {
        return Err(AttnError::CacheCapacity {
            arg: format!("max_batch (batch_offset {batch_offset} + b {b})"),
            capacity: cache.max_batch(),
            needed: end,
        });
    }
    let row = np * hn;
    let params = AttendParams {
        window,
        ..AttendParams::new(scale, MaskType::CausalBottomRight)
    };
    let mut out = vec![0f32; sq * b * row];
    for i in 0..b {
        let slot = batch_offset + i;
        let sk = cache.visible_len(layer, slot)?;
        if sk < sq {
            return Err(AttnError::InvalidArgument {
                arg: "q".into(),
                expected: format!(
                    "at most {sk} query tokens (keys layer {layer} holds in batch slot {slot}; append first)"
                ),
                got: format!("{sq} query tokens"),
            });
        }
        let (k, v) = cache.gather_kv(layer, slot, sk)?;
        let mut qs = Vec::with_capacity(sq * row);
        for t in 0..sq {
            let o = (t * b + i) * row;
            qs.extend_from_slice(&q.data()[o..o + row]);
        }
        let dims = SeqDims {
            sq,
            sk,
            heads: np,
            groups: ng,
            head_dim: hn,
        };
        let res = attend_sequence(&qs, &k, &v, dims, &params)?;
        for t in 0..sq {
            let o = (t * b + i) * row;
            out[o..o + row].copy_from_slice(&res.out[t * row..(t + 1) * row]);
        }
    }
    Tensor::new(&[sq, b, np, hn], out)
}
