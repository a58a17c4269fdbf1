//! Training through a tensor-parallel rank: [`TrainLayer`] for [`TpLayer`] over any rank
//! layer that trains ([`CpuLayer`](crate::backend::CpuLayer), [`CudaLayer`](crate::cuda::CudaLayer)).
//!
//! The backward mirrors the forward's communication, as Megatron-Core's autograd functions
//! do: the input gradient of the column-parallel `linear_qkv` is each rank's share of the
//! whole, summed (all-reduce; with sequence parallelism `grad_output` is all-gathered first
//! and the input gradient reduce-scattered). Parameter gradients are the rank's shard of the
//! whole layer's, with three sums over the group:
//! - `q_layernorm.*` / `k_layernorm.*`: whole on every rank, each rank's gradient covers its
//!   heads only; they are all-reduced (what Megatron's `finalize_model_grads` does for
//!   `qk_layernorm` parameters across the tensor-parallel group).
//! - replicated groups (`ng < tp`): the key/value rows of `linear_qkv.weight` / `.bias` are
//!   summed over the group's replicas, so every copy gets the whole gradient.
//! - `attention_bias` broadcast over heads (head dim 1 or absent): its gradient sums over
//!   heads, so it is all-reduced; a per-head bias is the caller's slice of this rank's heads
//!   and its gradient stays the rank's.
//!
//! Caveats: with one query head per rank a per-head bias (head dim 1) cannot be told from a
//! shared one and is taken as shared. QK-Clip ([`TrainLayer::clip_qk`]) exchanges the
//! ranks' records first: a replicated group's max is taken over every replica's heads, so
//! that its copies' key rows get the same factor (exactly the whole layer's clip, sharded).

use std::collections::BTreeMap;

use super::comm::{gather_ready, Communicator};
use super::tp::TpLayer;
use crate::backend::{BTensor, Backend, TrainLayer};
use crate::error::Result;
use crate::layer::ForwardArgs;
use crate::train::{BackwardOptions, LayerGrads, TrainOptions};

impl<L, C> TpLayer<L, C>
where
    L: TrainLayer,
    C: Communicator<Tensor = BTensor<L::Backend>>,
{
    /// Sum the key/value rows (the last `2 hn` rows: the rank's one group) of a replicated
    /// group's `linear_qkv` gradient over its replicas.
    fn reduce_replicated_kv(&self, g: &mut BTensor<L::Backend>) -> Result<()> {
        let p = &self.plan;
        if p.group_replicas == 1 {
            return Ok(());
        }
        let be = self.layer.backend();
        let mut shape = be.shape(g).to_vec();
        let (rows, kv) = (shape[0], 2 * p.head_dim);
        shape[0] = p.groups * kv;
        let mut slots = be.zeros_as(g, &shape)?;
        be.copy_rows(&mut slots, p.first_group * kv, g, rows - kv, kv)?;
        self.comm.all_reduce_sum(&mut slots)?;
        be.copy_rows(g, rows - kv, &slots, p.first_group * kv, kv)
    }

    fn reduce_params(&self, params: &mut BTreeMap<String, BTensor<L::Backend>>) -> Result<()> {
        for (name, g) in params.iter_mut() {
            if name.starts_with("q_layernorm.") || name.starts_with("k_layernorm.") {
                self.comm.all_reduce_sum(g)?;
            } else if name == "linear_qkv.weight" || name == "linear_qkv.bias" {
                self.reduce_replicated_kv(g)?;
            }
        }
        Ok(())
    }
}

impl<L, C> TrainLayer for TpLayer<L, C>
where
    L: TrainLayer,
    C: Communicator<Tensor = BTensor<L::Backend>>,
{
    type Saved = L::Saved;
    fn forward_train(
        &self,
        hidden: &BTensor<L::Backend>,
        args: &ForwardArgs<'_>,
        opts: &TrainOptions,
    ) -> Result<(BTensor<L::Backend>, L::Saved)> {
        let full = self.gather_seq("hidden", hidden)?;
        let (y, saved) = self
            .layer
            .forward_train(full.as_ref().unwrap_or(hidden), args, opts)?;
        Ok((self.reduce(y, self.sequence_parallel)?, saved))
    }
    fn backward(
        &self,
        saved: &mut L::Saved,
        grad_output: &BTensor<L::Backend>,
        opts: &BackwardOptions,
    ) -> Result<LayerGrads<BTensor<L::Backend>>> {
        let full = self.gather_seq("grad_output", grad_output)?;
        let mut g = self
            .layer
            .backward(saved, full.as_ref().unwrap_or(grad_output), opts)?;
        g.grad_input = self.reduce(g.grad_input, self.sequence_parallel)?;
        if let Some(kv) = g.grad_key_value_states.take() {
            g.grad_key_value_states = Some(self.reduce(kv, false)?);
        }
        if let Some(b) = g.grad_attention_bias.take() {
            let shape = self.layer.backend().shape(&b).to_vec();
            let per_head = shape.len() >= 3 && shape[shape.len() - 3] > 1;
            g.grad_attention_bias = Some(if per_head { b } else { self.reduce(b, false)? });
        }
        self.reduce_params(&mut g.params)?;
        Ok(g)
    }
    fn backward_dw(&self, saved: &mut L::Saved) -> Result<BTreeMap<String, BTensor<L::Backend>>> {
        let mut params = self.layer.backward_dw(saved)?;
        self.reduce_params(&mut params)?;
        Ok(params)
    }
    /// This rank's heads' record (`[np / tp]`, the shard's own).
    fn max_logit_record(&self) -> Result<Option<Vec<f32>>> {
        self.layer.max_logit_record()
    }
    /// QK-Clip on this rank's shard, with every rank's record exchanged first (one small
    /// all-gather of host bytes): with whole groups per rank (`ng >= tp`) each group's max is
    /// the rank's own; with replicated groups (`ng < tp`) a group's max is taken over every
    /// replica's heads, so every copy of its key rows gets the same factor and the result
    /// is the whole layer's clip, sharded. Every rank must call it (it is collective).
    ///
    /// All or nothing: each rank first checks its arguments and its record; if any rank
    /// fails, no rank changes its weight or its record.
    ///
    /// Errors (nothing changed on any rank): on the failing rank, its own error (those of
    /// [`TrainLayer::clip_qk`], e.g. `InvalidArgument` (`record`) for a NaN); on its peers,
    /// [`crate::AttnError::Collective`] naming the first failed rank; those of
    /// [`Communicator::all_gather_bytes`].
    fn clip_qk(&mut self, threshold: f32, alpha: f32) -> Result<crate::train::QkClipReport> {
        let local = self.layer.max_logit_record().and_then(|r| {
            crate::train::qk_clip::plan(self.layer.layer_config(), r.as_deref(), threshold, alpha)
                .map(|_| r)
        });
        let (local, all) = gather_ready(
            &self.comm,
            local,
            encode_record,
            "QK-Clip record exchange",
            "every rank's record checked (threshold, alpha, no NaN or +inf)",
        )?;
        let records = all
            .iter()
            .enumerate()
            .map(|(rank, m)| {
                decode_record(m).ok_or_else(|| crate::AttnError::Collective {
                    op: "QK-Clip record exchange".into(),
                    rank,
                    expected: "a record message".into(),
                    got: format!("a malformed record message of {} bytes", m.len()),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let record = if self.plan.group_replicas > 1 {
            replica_group_max(&self.plan, &records).map(|m| vec![m; self.plan.heads_per_rank])
        } else {
            local
        };
        self.layer
            .clip_qk_with_record(record.as_deref(), threshold, alpha)
    }
    /// Not used by tensor parallelism itself (its [`clip_qk`](TrainLayer::clip_qk) reduces
    /// the records across ranks): clips the shard with a record of its heads the caller
    /// supplies, as [`TrainLayer::clip_qk_with_record`] does, without communication.
    fn clip_qk_with_record(
        &mut self,
        record: Option<&[f32]>,
        threshold: f32,
        alpha: f32,
    ) -> Result<crate::train::QkClipReport> {
        self.layer.clip_qk_with_record(record, threshold, alpha)
    }
}

/// This rank's record for the exchange: `[0]` (no record) or `[1][f32 LE ...]`.
fn encode_record(record: &Option<Vec<f32>>) -> Vec<u8> {
    match record {
        None => vec![0],
        Some(r) => std::iter::once(1)
            .chain(r.iter().flat_map(|x| x.to_le_bytes()))
            .collect(),
    }
}

/// A peer's record (`None` inside: it has none), or `None` for a malformed message.
fn decode_record(m: &[u8]) -> Option<Option<Vec<f32>>> {
    match m {
        [0] => Some(None),
        [1, rest @ ..] if rest.len() % 4 == 0 => Some(Some(
            rest.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        )),
        _ => None,
    }
}

/// The max over every head of every replica of this rank's (replicated) group: ranks
/// `r` with `r / group_replicas` equal to this rank's hold its copies. `None` when no
/// replica has a record.
fn replica_group_max(plan: &super::TpPlan, records: &[Option<Vec<f32>>]) -> Option<f32> {
    let group = plan.tp_rank / plan.group_replicas;
    records
        .iter()
        .enumerate()
        .filter(|(r, _)| r / plan.group_replicas == group)
        .filter_map(|(_, rec)| rec.as_ref())
        .flatten()
        .copied()
        .reduce(f32::max)
}
