//! [`TpPlan`]: which heads, key/value groups and weight rows one tensor-parallel rank owns,
//! and the sharding of a layer's Megatron-named tensors to that rank.
//!
//! Megatron-Core's layout (`ColumnParallelLinear` / `RowParallelLinear`, semantics.md "Tensor
//! parallel"):
//! - `linear_qkv` is column-parallel: rank `r` owns query heads
//!   `r * np/tp .. (r + 1) * np/tp` and their key/value groups, whole: its rows of
//!   `linear_qkv.weight` `[(np + 2 ng) hn, h]` (and `.bias`) are its groups' blocks of the
//!   interleaved layout, per group `[per*hn q | per*hn gate | hn k | hn v]`. Cross-attention:
//!   `linear_q` rows of its heads, `linear_kv` rows of its heads (`2 hn` each).
//! - `linear_proj` is row-parallel: rank `r` owns the columns of its heads of
//!   `linear_proj.weight` `[h, np hn]`; its bias `[h]` is whole on every rank (the layer
//!   returns it unadded, after the reduction).
//! - `q_layernorm` / `k_layernorm` (over `hn`) are whole on every rank (and must stay
//!   bitwise equal: [`super::realtime`]); learnable sinks `core_attention.softmax_offset`
//!   `[np]` are split by head.
//!
//! Fewer groups than ranks (`ng < tp`, `tp % ng == 0`): each group is replicated on
//! `tp / ng` consecutive ranks, each owning a slice of the group's query heads and a copy of
//! its key and value rows (the convention of serving engines such as vLLM and
//! TensorRT-LLM; Megatron-Core's own `divide(num_query_groups, tp)` asserts `ng % tp == 0`).

use std::ops::Range;

use crate::config::{LayerConfig, RuntimeDims};
use crate::error::{AttnError, Result};
use crate::tensor::Tensor;

/// One tensor-parallel rank's share of a layer (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpPlan {
    /// This rank, `0..tp_size`.
    pub tp_rank: usize,
    /// Ranks in the tensor-parallel group.
    pub tp_size: usize,
    /// Query heads of the whole layer (np).
    pub heads: usize,
    /// Key/value groups of the whole layer (ng).
    pub groups: usize,
    /// Head dim hn.
    pub head_dim: usize,
    /// Query heads on this rank (`np / tp`).
    pub heads_per_rank: usize,
    /// Key/value groups on this rank (`ng / tp`, or 1 when groups are replicated).
    pub groups_per_rank: usize,
    /// This rank's first query head.
    pub first_head: usize,
    /// This rank's first key/value group.
    pub first_group: usize,
    /// Ranks holding a copy of each group (`tp / ng` when `ng < tp`, else 1).
    pub group_replicas: usize,
}

fn bad(arg: &str, expected: impl Into<String>, got: impl Into<String>) -> AttnError {
    AttnError::InvalidArgument {
        arg: arg.into(),
        expected: expected.into(),
        got: got.into(),
    }
}

impl TpPlan {
    /// Rank `tp_rank`'s share of a layer of `cfg` split over `tp_size` ranks.
    ///
    /// Errors: [`AttnError::InvalidArgument`] naming `tp_size` when it is 0, does not divide
    /// the query heads, or neither divides nor is a multiple of the key/value groups
    /// (`ng % tp == 0`: whole groups per rank; `tp % ng == 0`: groups replicated); naming
    /// `tp_rank` when it is not below `tp_size`.
    pub fn new(cfg: &LayerConfig, tp_rank: usize, tp_size: usize) -> Result<Self> {
        let (np, ng) = (cfg.heads, cfg.groups);
        if tp_size == 0 || !np.is_multiple_of(tp_size) {
            return Err(bad(
                "tp_size",
                format!("a divisor of heads = {np} (each rank owns whole query heads)"),
                tp_size.to_string(),
            ));
        }
        if !ng.is_multiple_of(tp_size) && !tp_size.is_multiple_of(ng) {
            return Err(bad(
                "tp_size",
                format!(
                    "a divisor of groups = {ng} (whole key/value groups per rank) or a \
                     multiple of it (groups replicated)"
                ),
                tp_size.to_string(),
            ));
        }
        if tp_rank >= tp_size {
            return Err(bad(
                "tp_rank",
                format!("a rank below tp_size = {tp_size}"),
                tp_rank.to_string(),
            ));
        }
        let heads_per_rank = np / tp_size;
        let (groups_per_rank, group_replicas) = if ng >= tp_size {
            (ng / tp_size, 1)
        } else {
            (1, tp_size / ng)
        };
        Ok(TpPlan {
            tp_rank,
            tp_size,
            heads: np,
            groups: ng,
            head_dim: cfg.head_dim,
            heads_per_rank,
            groups_per_rank,
            first_head: tp_rank * heads_per_rank,
            first_group: tp_rank * groups_per_rank / group_replicas,
            group_replicas,
        })
    }

    /// The rank's own layer config: `heads_per_rank` query heads, `groups_per_rank` groups,
    /// the same head dim, hidden size, scale and everything else.
    ///
    /// Errors: those of [`LayerConfig::new`] (none for a config [`TpPlan::new`] accepted).
    pub fn config(&self, cfg: &LayerConfig) -> Result<LayerConfig> {
        let mut spec = cfg.spec.clone();
        spec.heads = spec.heads.map(|_| self.heads_per_rank);
        spec.gqa = spec.gqa.map(|_| self.groups_per_rank);
        let dims = RuntimeDims {
            heads: Some(self.heads_per_rank),
            groups: Some(self.groups_per_rank),
            head_dim: Some(cfg.head_dim),
            hidden: Some(cfg.hidden),
        };
        let mut local = LayerConfig::new(&spec, &dims)?;
        // The same head dim gives the same scale; keep the whole layer's bits regardless.
        local.softmax_scale = cfg.softmax_scale;
        Ok(local)
    }

    /// The rows of `linear_qkv` (`.weight` and `.bias`) this rank owns, in order.
    pub fn qkv_rows(&self, cfg: &LayerConfig) -> Vec<Range<usize>> {
        let hn = self.head_dim;
        let per = self.heads / self.groups;
        let per_l = self.heads_per_rank / self.groups_per_rank;
        let gate = if cfg.output_gate { per } else { 0 };
        let gcols = (per + gate + 2) * hn;
        let mut rows = Vec::new();
        for gl in 0..self.groups_per_rank {
            let g = self.first_group + gl;
            let base = g * gcols;
            let qh0 = self.first_head + gl * per_l - g * per;
            rows.push(base + qh0 * hn..base + (qh0 + per_l) * hn);
            if cfg.output_gate {
                let gb = base + per * hn;
                rows.push(gb + qh0 * hn..gb + (qh0 + per_l) * hn);
            }
            let kb = base + (per + gate) * hn;
            rows.push(kb..kb + 2 * hn);
        }
        rows
    }

    /// This rank's query heads.
    pub fn head_range(&self) -> Range<usize> {
        self.first_head..self.first_head + self.heads_per_rank
    }

    /// Rank `tp_rank`'s shard of the parameter `name` (relative to the layer, e.g.
    /// `linear_qkv.weight`) of the whole layer `cfg`, from the whole tensor `t`; `key` names
    /// it in errors.
    ///
    /// Errors: [`AttnError::WeightShape`] (`key`) when `t` is not the whole layer's shape;
    /// [`AttnError::InvalidArgument`] (`key`) for a name that is not a parameter of the layer.
    pub fn shard(&self, cfg: &LayerConfig, name: &str, key: &str, t: &Tensor) -> Result<Tensor> {
        let want = full_shape(cfg, name).ok_or_else(|| {
            bad(
                key,
                "a parameter of the attention layer (linear_qkv, linear_q, linear_kv, \
                 linear_proj, q_layernorm, k_layernorm, core_attention.softmax_offset)",
                name,
            )
        })?;
        if t.shape() != want.as_slice() {
            return Err(AttnError::WeightShape {
                key: key.into(),
                expected: want,
                got: t.shape().to_vec(),
            });
        }
        let hn = self.head_dim;
        let heads = self.head_range();
        match name {
            "linear_qkv.weight" | "linear_qkv.bias" => take_rows(t, &self.qkv_rows(cfg)),
            "linear_q.weight" | "linear_q.bias" => {
                take_rows(t, std::slice::from_ref(&(heads.start * hn..heads.end * hn)))
            }
            "linear_kv.weight" | "linear_kv.bias" => take_rows(
                t,
                std::slice::from_ref(&(2 * heads.start * hn..2 * heads.end * hn)),
            ),
            "linear_proj.weight" => take_cols(t, heads.start * hn..heads.end * hn),
            "core_attention.softmax_offset" => take_rows(t, std::slice::from_ref(&heads)),
            _ => Ok(t.clone()),
        }
    }

    /// The shape of this rank's shard of parameter `name`, `None` for an unknown name.
    pub fn shard_shape(&self, cfg: &LayerConfig, name: &str) -> Option<Vec<usize>> {
        let local = self.config(cfg).ok()?;
        full_shape(&local, name)
    }

    /// Rank `tp_rank`'s shard of a whole layer's state dict (names `{prefix}{param}`), in
    /// the same order. Errors: those of [`shard`](Self::shard), and
    /// [`AttnError::InvalidArgument`] (the key) for a name without `prefix`.
    pub fn shard_state_dict(
        &self,
        cfg: &LayerConfig,
        sd: &[(String, Tensor)],
        prefix: &str,
    ) -> Result<Vec<(String, Tensor)>> {
        sd.iter()
            .map(|(k, t)| {
                let name = k
                    .strip_prefix(prefix)
                    .ok_or_else(|| bad(k, format!("a name under prefix `{prefix}`"), k.as_str()))?;
                Ok((k.clone(), self.shard(cfg, name, k, t)?))
            })
            .collect()
    }
}

/// The whole shape of parameter `name` under `cfg`, `None` for an unknown name.
pub fn full_shape(cfg: &LayerConfig, name: &str) -> Option<Vec<usize>> {
    use attention_codegen::Role;
    let (role, param) = name.rsplit_once('.')?;
    let role = Role::ALL.iter().copied().find(|r| r.name() == role)?;
    match (role, param) {
        (Role::QLayernorm | Role::KLayernorm, "weight" | "bias") => Some(vec![cfg.head_dim]),
        (Role::CoreAttention, "softmax_offset") => Some(vec![cfg.heads]),
        (Role::CoreAttention, _) => None,
        (_, "weight") => crate::modules::linear_shape(cfg, role)
            .ok()
            .map(|(o, i, _)| vec![o, i]),
        (_, "bias") => crate::modules::linear_shape(cfg, role)
            .ok()
            .map(|(o, _, _)| vec![o]),
        _ => None,
    }
}

/// Rows `ranges` of `t` (dim 0), concatenated.
fn take_rows(t: &Tensor, ranges: &[Range<usize>]) -> Result<Tensor> {
    let w = t.shape()[1..].iter().product::<usize>();
    let mut data = Vec::new();
    let mut n = 0;
    for r in ranges {
        data.extend_from_slice(&t.data()[r.start * w..r.end * w]);
        n += r.len();
    }
    let mut shape = t.shape().to_vec();
    shape[0] = n;
    Tensor::new(&shape, data)
}

/// Columns `cols` of a 2-d `t`.
fn take_cols(t: &Tensor, cols: Range<usize>) -> Result<Tensor> {
    let (rows, w) = (t.shape()[0], t.shape()[1]);
    let data = (0..rows)
        .flat_map(|r| {
            t.data()[r * w + cols.start..r * w + cols.end]
                .iter()
                .copied()
        })
        .collect();
    Tensor::new(&[rows, cols.len()], data)
}
