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
//! shared one and is taken as shared. QK-Clip ([`TrainLayer::clip_qk`]) on a shard sees only
//! the rank's heads: right for whole groups; replicated groups would need the max over every
//! replica's heads (a max all-reduce the communicator does not have yet) so that their key
//! rows stay equal, so it is refused there (a typed error).

use std::collections::BTreeMap;

use super::comm::Communicator;
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
    /// QK-Clip on this rank's shard with its own record: exact when every group lies whole
    /// on one rank. Errors ([`crate::AttnError::NoBackendImpl`], nothing changed) with
    /// replicated groups (`ng < tp`), whose key rows need the max over every replica's heads.
    fn clip_qk(&mut self, threshold: f32, alpha: f32) -> Result<crate::train::QkClipReport> {
        if self.plan.groups < self.plan.tp_size {
            return Err(crate::AttnError::NoBackendImpl {
                role: "QK-Clip with replicated key/value groups (groups < tp_size)".into(),
                backend: "tensor parallel".into(),
                hint: "the group max needs a max all-reduce over the replicas; clip with \
                       tp_size <= groups"
                    .into(),
            });
        }
        self.layer.clip_qk(threshold, alpha)
    }
}
