//! [`CpLayer`]: one context-parallel rank of a self-attention layer on the CPU reference.
//!
//! The rank holds its tokens ([`CpLayout`]: chunks `r` and `2 cp - 1 - r` of every sequence)
//! and the whole layer's weights (or, combined with tensor parallelism, its tensor-parallel
//! shard: wrap a `CpLayer` in a [`super::TpLayer`]). `linear_qkv`, q/k norm, rope (at each
//! token's position in its whole sequence) and `linear_proj` run on its own tokens; core
//! attention is [`CpCoreAttention`], which exchanges K/V (or heads) by `cp_comm_type`.
//!
//! Forward, and static-cache prefill and decode with each rank caching its own tokens
//! ([`super::cp_cache`], [`super::cp_cache_step`]); paged steps are refused. Training:
//! [`CpLayer::forward_train`] / [`CpLayer::backward`] (module `train`). The GPU counterpart
//! is [`super::CpCudaLayer`].

use attention_codegen::{AttentionKind, Sinks};

mod train;
pub use train::CpSaved;

use super::comm::Communicator;
use super::cp_cache::{CpCpuBackend, CpStaticKvCache};
use super::cp_cache_step::{CaptureCore, KvCapture};
use super::cp_core::{CpCoreAttention, CpSinks};
use super::cp_layout::CpLayout;
use super::CpCommType;
use crate::backend::BackendLayer;
use crate::config::LayerConfig;
use crate::error::{AttnError, Result};
use crate::kv_cache::{PagedBatch, PagedKvCache, StaticKvCache};
use crate::layer::{AttentionLayer, ForwardArgs, LayerOutput, LayerParts, PackedSeqParams};
use crate::tensor::Tensor;

/// One rank of a context-parallel layer: the layer (whole, or a tensor-parallel shard), the
/// context-parallel group's `comm` and `cp_comm_type`.
#[derive(Debug)]
pub struct CpLayer<L, C> {
    pub(super) layer: L,
    pub(super) comm: C,
    pub(super) layout: CpLayout,
    comm_type: CpCommType,
}

fn bad(arg: &str, expected: impl Into<String>, got: impl Into<String>) -> AttnError {
    AttnError::InvalidArgument {
        arg: arg.into(),
        expected: expected.into(),
        got: got.into(),
    }
}

impl<L: AttentionLayer, C: Communicator<Tensor = Tensor> + Sync> CpLayer<L, C> {
    /// Rank `comm.rank()` of `comm.world_size()` (`cp_size`) of `layer`.
    ///
    /// Errors: [`AttnError::InvalidArgument`] for a cross-attention layer (`config.kind`), or
    /// with `a2a` when `cp_size` does not divide the heads or the groups (`cp_size`).
    pub fn new(layer: L, comm: C, cp_comm_type: CpCommType) -> Result<Self> {
        let cfg = layer.config();
        if cfg.kind != AttentionKind::SelfAttention {
            return Err(bad(
                "config.kind",
                "self-attention under context parallelism",
                "cross-attention",
            ));
        }
        let layout = CpLayout::new(comm.rank(), comm.world_size())?;
        let cp = layout.cp_size;
        if cp_comm_type == CpCommType::A2a
            && (!cfg.heads.is_multiple_of(cp) || !cfg.groups.is_multiple_of(cp))
        {
            return Err(bad(
                "cp_size",
                format!(
                    "a divisor of heads = {} and groups = {} for cp_comm_type a2a",
                    cfg.heads, cfg.groups
                ),
                cp.to_string(),
            ));
        }
        Ok(CpLayer {
            layer,
            comm,
            layout,
            comm_type: cp_comm_type,
        })
    }

    /// This rank's layout.
    pub fn layout(&self) -> &CpLayout {
        &self.layout
    }
    /// The layer.
    pub fn inner(&self) -> &L {
        &self.layer
    }
    /// The exchange.
    pub fn cp_comm_type(&self) -> CpCommType {
        self.comm_type
    }

    pub(super) fn sinks(
        &self,
        parts: &crate::layer::SelfAttentionParts<'_>,
    ) -> Result<Option<CpSinks>> {
        let cfg = self.layer.config();
        Ok(match cfg.sinks {
            None => None,
            Some(Sinks::OffByOne) => Some(CpSinks::OffByOne),
            Some(Sinks::Learnable) => {
                let sd = parts.core_attention.state_dict();
                let t = sd
                    .iter()
                    .find(|(k, _)| k == "softmax_offset")
                    .map(|(_, t)| t)
                    .ok_or_else(|| AttnError::MissingWeight {
                        key: "core_attention.softmax_offset".into(),
                        source_name: "the layer's state_dict".into(),
                    })?;
                t.expect_shape("core_attention.softmax_offset", &[Some(cfg.heads)])?;
                Some(CpSinks::PerHead(t.data().to_vec()))
            }
        })
    }

    /// Forward of this rank's tokens: `hidden` `[s / cp, b, h]` (padded; this rank's chunks
    /// of the whole `[s, b, h]`, [`CpLayout::split`]) or packed `[t / cp, h]` with
    /// `args.packed` giving the whole batch's `cu_seqlens_q` (every length a multiple of
    /// `2 cp`). `args.positions`, when given, are the whole sequence's (`[s]` or `[t]`).
    /// Returns this rank's rows of the output and `linear_proj`'s bias.
    ///
    /// Errors: [`AttnError::InvalidArgument`] for a mask or bias tensor, a mask type other
    /// than causal, causal_bottom_right or no_mask, a sequence length that is not a multiple
    /// of `2 cp`, a core attention with other math than the default
    /// ([`AttnError::NoBackendImpl`]); the layer's own errors; [`AttnError::Collective`].
    pub fn forward(&self, hidden: &Tensor, args: &ForwardArgs<'_>) -> Result<LayerOutput> {
        self.forward_capture(hidden, args, None)
    }

    /// [`forward`](Self::forward), handing the rank's rotated keys and values to `capture`
    /// (a KV-cache prefill, [`super::cp_cache_step`]).
    pub(super) fn forward_capture(
        &self,
        hidden: &Tensor,
        args: &ForwardArgs<'_>,
        capture: Option<&KvCapture>,
    ) -> Result<LayerOutput> {
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
        let (positions, local_cu) = self.local_call(hidden, args)?;
        let core = self.core(&parts)?;
        let captured = capture.map(|into| CaptureCore { inner: &core, into });
        let local_parts = crate::layer::SelfAttentionParts {
            core_attention: match &captured {
                Some(c) => c,
                None => &core,
            },
            ..parts
        };
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
        local_parts.forward(hidden, &local_args)
    }

    /// This rank's rope positions and (packed) local `cu_seqlens` of a call.
    fn local_call(
        &self,
        hidden: &Tensor,
        args: &ForwardArgs<'_>,
    ) -> Result<(Vec<i64>, Option<Vec<i32>>)> {
        let cp = self.layout.cp_size;
        let rows0 = hidden.shape().first().copied().unwrap_or(0);
        // The whole batch's sequences and this rank's rows of them.
        let (cu_global, local_cu) = match &args.packed {
            Some(pk) => {
                let total = rows0 * cp;
                let local = self.layout.local_cu_seqlens(pk.cu_seqlens_q, total)?;
                let cu = crate::modules::check_cu_seqlens("cu_seqlens_q", pk.cu_seqlens_q, total)?;
                (cu, Some(local))
            }
            None => {
                self.layout.chunks("hidden", rows0 * cp)?;
                (vec![0, rows0 * cp], None)
            }
        };
        let rows = self.layout.local_rows("hidden", &cu_global)?;
        let positions: Vec<i64> = match args.positions {
            Some(p) => {
                if p.len() != rows0 * cp {
                    return Err(AttnError::Shape {
                        arg: "positions".into(),
                        expected: format!("[{}] (the whole sequence's)", rows0 * cp),
                        got: vec![p.len()],
                    });
                }
                rows.iter().map(|&r| p[r]).collect()
            }
            None => {
                // Default rope positions: the token's index in its sequence.
                let mut starts = vec![0usize; rows0 * cp];
                for w in cu_global.windows(2) {
                    starts[w[0]..w[1]].iter_mut().for_each(|s| *s = w[0]);
                }
                rows.iter().map(|&r| (r - starts[r]) as i64).collect()
            }
        };
        Ok((positions, local_cu))
    }

    /// The core attention of this rank.
    fn core(&self, parts: &crate::layer::SelfAttentionParts<'_>) -> Result<CpCoreAttention<'_, C>> {
        let cfg = self.layer.config();
        Ok(CpCoreAttention {
            comm: &self.comm,
            layout: self.layout,
            comm_type: self.comm_type,
            heads: cfg.heads,
            groups: cfg.groups,
            head_dim: cfg.head_dim,
            scale: cfg.softmax_scale,
            sinks: self.sinks(parts)?,
        })
    }

    fn no_cache(&self, what: &str) -> AttnError {
        bad(
            "context parallel",
            format!("forward or a static KV cache ({what} over a paged cache is not implemented)"),
            what,
        )
    }
}

/// The CPU backend seam (forward, static-cache prefill and decode), so a [`super::TpLayer`] can wrap a `CpLayer`
/// (tensor and context parallelism together).
impl<L: AttentionLayer, C: Communicator<Tensor = Tensor> + Sync> BackendLayer for CpLayer<L, C> {
    type Backend = CpCpuBackend;
    fn backend(&self) -> CpCpuBackend {
        CpCpuBackend {
            layout: self.layout,
        }
    }
    fn layer_config(&self) -> &LayerConfig {
        self.layer.config()
    }
    fn output_bias(&self) -> Option<&Tensor> {
        self.layer.parts().output_bias()
    }
    fn forward(&self, hidden: &Tensor, args: &ForwardArgs<'_>) -> Result<Tensor> {
        Ok(CpLayer::forward(self, hidden, args)?.output)
    }
    /// This rank's rows `[s / cp, b, h]` of a prompt into empty slots (see
    /// [`super::cp_cache_step`]).
    fn prefill(
        &self,
        hidden: &Tensor,
        cache: &mut CpStaticKvCache<StaticKvCache>,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<Tensor> {
        Ok(self
            .prefill_cp(hidden, cache, layer, batch_offset, args)?
            .output)
    }
    /// One decode step, `hidden` `[1, b, h]` the same on every rank (see
    /// [`super::cp_cache_step`]).
    fn decode(
        &self,
        hidden: &Tensor,
        cache: &mut CpStaticKvCache<StaticKvCache>,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<Tensor> {
        Ok(self
            .decode_cp(hidden, cache, layer, batch_offset, args)?
            .output)
    }
    fn forward_paged(
        &self,
        _: &Tensor,
        _: &mut PagedKvCache,
        _: usize,
        _: &PagedBatch<'_>,
    ) -> Result<Tensor> {
        Err(self.no_cache("forward_paged"))
    }
}
