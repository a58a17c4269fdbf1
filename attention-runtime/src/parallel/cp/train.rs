//! Training through a context-parallel rank ([`CpLayer::forward_train`],
//! [`CpLayer::backward`], [`CpLayer::backward_dw`]) on the CPU reference, as Megatron-Core
//! trains with `context_parallel_size > 1`.
//!
//! Each rank runs the layer's training forward and backward ([`crate::train`]) on its own
//! tokens; only core attention exchanges data ([`super::super::cp_core_train`]: the forward
//! keeps the global LSE, the backward sums `dQ` over every rank's K/V and returns each
//! rank's `dK`/`dV` to it). The input gradient is this rank's rows (its tokens, as the
//! input). Parameter gradients (`linear_qkv.*`, `q_layernorm.*`, `k_layernorm.*`,
//! `linear_proj.weight`, `core_attention.softmax_offset`) are all-reduced (summed) over the
//! context-parallel group, as Megatron's gradient all-reduce over the data x context
//! parallel group does, so every rank holds the whole layer's gradient. The max logit of a
//! forward ([`CpSaved::max_logit`]) is the max over the group.

use std::collections::BTreeMap;

use attention_codegen::{MaskType, Window};

use super::{bad, CpLayer};
use crate::backend::SavedForward;
use crate::error::{AttnError, Result};
use crate::layer::{AttentionLayer, ForwardArgs, LayerParts, PackedSeqParams};
use crate::parallel::comm::Communicator;
use crate::parallel::cp_core::segs_of;
use crate::parallel::cp_core_train::CpCoreTrain;
use crate::parallel::{CpCommType, CpLayout};
use crate::tensor::Tensor;
use crate::train::{self, BackwardOptions, CpuSaved, LayerGrads, TrainOptions};

/// What [`CpLayer::forward_train`] saves for [`CpLayer::backward`]: the rank's training
/// context ([`CpuSaved`], its core attention's output and global LSE) and the call's
/// sequences.
#[derive(Debug, Clone)]
pub struct CpSaved {
    inner: CpuSaved,
    layout: CpLayout,
    comm_type: CpCommType,
    padded: Option<(usize, usize)>,
    local_cu: Vec<usize>,
    mask: MaskType,
    window: Option<Window>,
}

impl CpSaved {
    /// Per query head the max pre-softmax logit of this forward over the whole group's
    /// queries and keys, `[np]` (the same on every rank).
    pub fn max_logit(&self) -> &[f32] {
        self.inner.max_logit()
    }
    /// Bytes of activations this rank holds for the backward ([`CpuSaved::saved_bytes`]).
    pub fn saved_bytes(&self) -> usize {
        self.inner.saved_bytes()
    }
    /// Whether weight gradients wait for [`CpLayer::backward_dw`].
    pub fn wgrad_pending(&self) -> bool {
        self.inner.wgrad_pending()
    }
}

impl SavedForward for CpSaved {
    fn max_logit(&self) -> &[f32] {
        CpSaved::max_logit(self)
    }
    fn saved_bytes(&self) -> usize {
        CpSaved::saved_bytes(self)
    }
}

impl<L: AttentionLayer, C: Communicator<Tensor = Tensor> + Sync> CpLayer<L, C> {
    fn train_hook(
        &self,
        padded: Option<(usize, usize)>,
        local_cu: &[usize],
        mask: MaskType,
        window: Option<Window>,
    ) -> Result<CpCoreTrain<'_, C>> {
        let LayerParts::SelfAttention(parts) = self.layer.parts() else {
            return Err(bad("config.kind", "self-attention", "cross-attention"));
        };
        if parts.core_attention.train().is_none() {
            return Err(AttnError::NoBackendImpl {
                role: "core_attention".into(),
                backend: "context parallel".into(),
                hint: "the default core attention's math (TrainSubmodule)".into(),
            });
        }
        Ok(CpCoreTrain {
            core: self.core(&parts)?,
            segs: segs_of(padded, local_cu, self.layout.cp_size),
            padded,
            mask,
            window,
        })
    }

    /// Sum parameter gradients over the group (in name order, the same on every rank).
    fn reduce_params(&self, params: &mut BTreeMap<String, Tensor>) -> Result<()> {
        for g in params.values_mut() {
            self.comm.all_reduce_sum(g)?;
        }
        Ok(())
    }

    /// Training forward of this rank's tokens: the arguments, shapes and output of
    /// [`forward`](Self::forward) (bitwise its output), and the context for
    /// [`backward`](Self::backward). Every rank of the group must call it together.
    ///
    /// Errors: those of [`forward`](Self::forward) (a mask or bias tensor:
    /// [`AttnError::InvalidArgument`] `attention_mask/attention_bias`; a mask type other than
    /// causal, causal_bottom_right or no_mask: `mask_type`; a sequence length that is not a
    /// multiple of `2 cp`: `hidden` / `cu_seqlens_q`), [`AttnError::Shape`] (`hidden`), those
    /// of [`crate::train::forward_train`], [`AttnError::Collective`].
    pub fn forward_train(
        &self,
        hidden: &Tensor,
        args: &ForwardArgs<'_>,
        opts: &TrainOptions,
    ) -> Result<(Tensor, CpSaved)> {
        let cfg = self.layer.config();
        if args.attention_mask.is_some() || args.attention_bias.is_some() {
            return Err(bad(
                "attention_mask/attention_bias",
                "none under context parallelism",
                "a tensor",
            ));
        }
        let mask = args.mask_type.unwrap_or(cfg.mask);
        if !matches!(
            mask,
            MaskType::Causal | MaskType::CausalBottomRight | MaskType::NoMask
        ) {
            return Err(bad(
                "mask_type",
                "causal, causal_bottom_right or no_mask under context parallelism",
                mask.name(),
            ));
        }
        let h = cfg.hidden;
        let padded = match args.packed {
            None => {
                hidden.expect_shape("hidden", &[None, None, Some(h)])?;
                Some((hidden.shape()[0], hidden.shape()[1]))
            }
            Some(_) => {
                hidden.expect_shape("hidden", &[None, Some(h)])?;
                None
            }
        };
        let (positions, local_cu) = self.local_call(hidden, args)?;
        let lcu: Vec<usize> = local_cu
            .as_ref()
            .map(|c| c.iter().map(|&x| x as usize).collect())
            .unwrap_or_default();
        let hook = self.train_hook(padded, &lcu, mask, cfg.window)?;
        let local_args = ForwardArgs {
            positions: Some(&positions),
            packed: local_cu.as_ref().map(|cu| PackedSeqParams {
                cu_seqlens_q: cu,
                cu_seqlens_kv: &[],
                max_seqlen_q: 0,
                max_seqlen_kv: 0,
            }),
            ..*args
        };
        let (y, inner) =
            train::forward_train_with(&self.layer.parts(), hidden, &local_args, opts, Some(&hook))?;
        Ok((
            y,
            CpSaved {
                inner,
                layout: self.layout,
                comm_type: self.comm_type,
                padded,
                local_cu: lcu,
                mask,
                window: cfg.window,
            },
        ))
    }

    /// Backward of this rank's tokens: `grad_output` has this rank's output's shape
    /// (`[s / cp, b, h]` or packed `[t / cp, h]`). Returns this rank's input gradient and
    /// the whole layer's parameter gradients (summed over the group, the same on every rank)
    /// under Megatron names ([`LayerGrads`]). Every rank of the group must call it together.
    ///
    /// Errors (before anything is exchanged, nothing consumed): [`AttnError::Shape`]
    /// (`grad_output` of another shape), [`AttnError::TrainState`] (a context whose backward
    /// already ran), [`AttnError::InvalidArgument`] (`saved`: a context of another rank,
    /// group size, exchange or layer config); [`AttnError::Collective`].
    pub fn backward(
        &self,
        saved: &mut CpSaved,
        grad_output: &Tensor,
        opts: &BackwardOptions,
    ) -> Result<LayerGrads<Tensor>> {
        self.check_saved(saved)?;
        let hook = self.train_hook(saved.padded, &saved.local_cu, saved.mask, saved.window)?;
        let mut g = train::backward_with(
            &self.layer.parts(),
            &mut saved.inner,
            grad_output,
            opts,
            Some(&hook),
        )?;
        self.reduce_params(&mut g.params)?;
        Ok(g)
    }

    /// The weight gradients a backward with [`BackwardOptions::delay_wgrad`] left pending
    /// (summed over the group). Errors: those of [`crate::train::backward_dw`], `saved` as
    /// in [`backward`](Self::backward), [`AttnError::Collective`].
    pub fn backward_dw(&self, saved: &mut CpSaved) -> Result<BTreeMap<String, Tensor>> {
        self.check_saved(saved)?;
        let mut params = train::backward_dw(&mut saved.inner)?;
        self.reduce_params(&mut params)?;
        Ok(params)
    }

    fn check_saved(&self, saved: &CpSaved) -> Result<()> {
        if saved.layout != self.layout || saved.comm_type != self.comm_type {
            return Err(bad(
                "saved",
                format!(
                    "a context of this rank's forward_train (cp_rank {} of {}, {})",
                    self.layout.cp_rank, self.layout.cp_size, self.comm_type
                ),
                format!(
                    "cp_rank {} of {}, {}",
                    saved.layout.cp_rank, saved.layout.cp_size, saved.comm_type
                ),
            ));
        }
        Ok(())
    }
}
