//! Step planning shared by every backend (plan, then run): the argument checks, positions
//! and batch geometry of a KV-cache step are computed here once, from the layer's config and
//! the cache's bookkeeping, and each backend ([`crate::backend`]) runs the plan with its own
//! tensors and kernels. A plan is made before anything is written or queued, so an error
//! leaves caches untouched on every backend.

use attention_codegen::{AttentionKind, MaskType};

use crate::backend::{PagedCache, StaticCache};
use crate::config::LayerConfig;
use crate::error::{AttnError, Result};
use crate::kv_cache::{PagedBatch, PagedRequest};
use crate::layer::ForwardArgs;
use crate::modules::check_cu_seqlens;

fn bad(arg: &str, expected: impl Into<String>, got: impl Into<String>) -> AttnError {
    AttnError::InvalidArgument {
        arg: arg.into(),
        expected: expected.into(),
        got: got.into(),
    }
}

/// A static-cache step of `s` new tokens for batch slots `batch_offset .. batch_offset + b`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticStep {
    /// New tokens per slot.
    pub s: usize,
    /// Slots in the step.
    pub b: usize,
    /// Each slot's length before the step (where its new tokens are appended) `[b]`.
    pub starts: Vec<usize>,
    /// Rope position of every row of the `[s, b]` hidden states, row `si * b + bi`:
    /// `starts[bi] + si`, or `args.positions[si]` when given.
    pub positions: Vec<i64>,
}

impl StaticStep {
    /// Rows of the step (`s * b`).
    pub fn rows(&self) -> usize {
        self.s * self.b
    }

    /// Each slot's key length after the append (`starts[i] + s`).
    pub fn key_lens(&self) -> impl Iterator<Item = usize> + '_ {
        self.starts.iter().map(move |&l| l + self.s)
    }
}

/// Errors unless `c` is a self-attention layer and `args` holds only what a KV-cache step
/// takes (`positions`, `rope_mscale`, and a `mask_type` that names the step's own
/// visibility: unset, `causal` or `causal_bottom_right`; a cache step is always bottom-right
/// causal over the cached keys, so `padding`, `padding_causal`, `arbitrary` and `no_mask`,
/// which a cache step cannot honour, are refused rather than ignored).
pub fn check_kv_args(c: &LayerConfig, args: &ForwardArgs<'_>) -> Result<()> {
    if c.kind != AttentionKind::SelfAttention {
        return Err(bad(
            "config.kind",
            "self-attention for a KV-cache step",
            "cross-attention",
        ));
    }
    if args.attention_mask.is_some()
        || args.attention_bias.is_some()
        || args.packed.is_some()
        || args.key_value_states.is_some()
    {
        return Err(bad(
            "args",
            "only positions and rope_mscale for a KV-cache step",
            "mask, bias, packed or key_value_states",
        ));
    }
    crate::reference::rope::check_mscale(args.rope_mscale)?;
    if let Some(m) = args.mask_type {
        if !matches!(m, MaskType::Causal | MaskType::CausalBottomRight) {
            return Err(bad(
                "args.mask_type",
                "unset, causal or causal_bottom_right (a KV-cache step is bottom-right causal)",
                format!("{m:?}"),
            ));
        }
    }
    Ok(())
}

/// Errors (`InvalidArgument`, `cache`) unless the cache holds the layer's groups and head dim.
pub fn check_cache_geometry(c: &LayerConfig, groups: usize, head_dim: usize) -> Result<()> {
    if groups != c.groups || head_dim != c.head_dim {
        return Err(bad(
            "cache",
            format!("groups {} and head_dim {}", c.groups, c.head_dim),
            format!("groups {groups} and head_dim {head_dim}"),
        ));
    }
    Ok(())
}

/// Plan a static-cache step (prefill or decode) of `hidden_shape` `[s, b, h]` into `layer`
/// of `cache` at slots `batch_offset .. batch_offset + b`.
///
/// Errors, in this order: `InvalidArgument` (`config.kind` for cross-attention; `args` with
/// a mask, bias, packing or context), `Shape` (`hidden`), `InvalidArgument` (`cache` of other
/// groups or head dim; `layer`), `CacheCapacity` (`max_batch`; `max_seq` naming the layer and
/// slot), `Shape` (`positions` not `[s]`).
pub fn static_step(
    c: &LayerConfig,
    hidden_shape: &[usize],
    cache: &impl StaticCache,
    layer: usize,
    batch_offset: usize,
    args: &ForwardArgs<'_>,
) -> Result<StaticStep> {
    check_kv_args(c, args)?;
    let h = c.hidden;
    let &[s, b, hh] = hidden_shape else {
        return Err(AttnError::Shape {
            arg: "hidden".into(),
            expected: format!("[s, b, {h}]"),
            got: hidden_shape.to_vec(),
        });
    };
    if hh != h {
        return Err(AttnError::Shape {
            arg: "hidden".into(),
            expected: format!("[s, b, {h}]"),
            got: hidden_shape.to_vec(),
        });
    }
    if b == 0 {
        return Err(AttnError::Shape {
            arg: "hidden".into(),
            expected: format!("[s, b, {h}] with b >= 1 (a cache step serves at least one slot)"),
            got: hidden_shape.to_vec(),
        });
    }
    check_cache_geometry(c, cache.groups(), cache.head_dim())?;
    let starts = cache.check_append(layer, batch_offset, b, s)?;
    let positions = match args.positions {
        Some(p) if p.len() != s => {
            return Err(AttnError::Shape {
                arg: "positions".into(),
                expected: format!("[{s}]"),
                got: vec![p.len()],
            })
        }
        Some(p) => (0..s * b).map(|r| p[r / b]).collect(),
        None => (0..s * b).map(|r| (starts[r % b] + r / b) as i64).collect(),
    };
    Ok(StaticStep {
        s,
        b,
        starts,
        positions,
    })
}

/// A mixed decode + prefill step over a paged cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagedStep {
    /// Packed rows (new tokens of every request).
    pub rows: usize,
    /// The requests, validated against the pool.
    pub requests: Vec<PagedRequest>,
    /// Rope position of every row: request `i`'s new tokens sit at
    /// `seqlens_k[i] - new_i .. seqlens_k[i]`.
    pub positions: Vec<i64>,
    /// Most new tokens of one request.
    pub max_q: usize,
}

/// Plan a paged step of `hidden_shape` `[T, h]` (packed) into `cache`.
///
/// Errors: `InvalidArgument` (`config.kind`), `Shape` (`hidden`), `InvalidArgument` (`cache`
/// of other groups or head dim), then the batch's own checks ([`PagedCache::validate`]:
/// `CuSeqlens`, `InvalidArgument`, `CacheCapacity`, `BlockId`).
pub fn paged_step(
    c: &LayerConfig,
    hidden_shape: &[usize],
    cache: &impl PagedCache,
    batch: &PagedBatch<'_>,
) -> Result<PagedStep> {
    if c.kind != AttentionKind::SelfAttention {
        return Err(bad(
            "config.kind",
            "self-attention for a KV-cache step",
            "cross-attention",
        ));
    }
    let h = c.hidden;
    let &[rows, hh] = hidden_shape else {
        return Err(AttnError::Shape {
            arg: "hidden".into(),
            expected: format!("[t, {h}] (packed)"),
            got: hidden_shape.to_vec(),
        });
    };
    if hh != h {
        return Err(AttnError::Shape {
            arg: "hidden".into(),
            expected: format!("[t, {h}] (packed)"),
            got: hidden_shape.to_vec(),
        });
    }
    check_cache_geometry(c, cache.groups(), cache.head_dim())?;
    let requests = cache.validate(batch, rows)?;
    let mut positions = vec![0i64; rows];
    for r in &requests {
        for i in 0..r.q_len {
            positions[r.q_start + i] = (r.k_len - r.q_len + i) as i64;
        }
    }
    let max_q = requests.iter().map(|r| r.q_len).max().unwrap_or(0);
    Ok(PagedStep {
        rows,
        requests,
        positions,
        max_q,
    })
}

/// Rope position of every row of a forward over `rows` hidden rows: padded `[s, b]` rows
/// (`row = si * b + bi`) at `args.positions[si]` or `si`; packed (`args.packed`, `s = rows`,
/// `b = 1`) at `args.positions[t]` or each token's offset in its sequence.
///
/// Errors: `Shape` (`positions` not `[s]`), `CuSeqlens` (`cu_seqlens_q`).
pub fn forward_positions(
    rows: usize,
    s: usize,
    b: usize,
    args: &ForwardArgs<'_>,
) -> Result<Vec<i64>> {
    let packed = args.packed.is_some();
    Ok(match (args.positions, &args.packed) {
        (Some(p), _) if p.len() != s => {
            return Err(AttnError::Shape {
                arg: "positions".into(),
                expected: format!(
                    "[{s}] (one per {})",
                    if packed {
                        "packed token"
                    } else {
                        "sequence position"
                    }
                ),
                got: vec![p.len()],
            })
        }
        (Some(p), None) => (0..rows).map(|r| p[r / b]).collect(),
        (Some(p), Some(_)) => p.to_vec(),
        (None, None) => (0..rows).map(|r| (r / b) as i64).collect(),
        (None, Some(pk)) => {
            let cu = check_cu_seqlens("cu_seqlens_q", pk.cu_seqlens_q, rows)?;
            let mut pos = vec![0i64; rows];
            for w in cu.windows(2) {
                for (i, t) in (w[0]..w[1]).enumerate() {
                    pos[t] = i as i64;
                }
            }
            pos
        }
    })
}
