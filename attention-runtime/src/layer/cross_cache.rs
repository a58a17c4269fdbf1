//! Cross-attention over a cached encoder context (encoder-decoder decoding, e.g. Whisper,
//! T5): the context's keys and values are projected by `linear_kv` once per request into a
//! [`CrossKvCache`] ([`CrossAttentionParts::set_context`]); every prefill or decode step then
//! runs `linear_q`, attention over the cached context (no causal mask; each slot sees its own
//! context length, so padded contexts of different lengths mix in one batch) and
//! `linear_proj` only ([`CrossAttentionParts::cross_step`]).

use attention_codegen::{AttentionKind, MaskType};

use super::{bad, hidden_rows, project, CrossAttentionParts, LayerOutput, LayerParts};
use crate::error::{AttnError, Result};
use crate::kv_cache::cross::check_context;
use crate::kv_cache::CrossKvCache;
use crate::layer::PackedSeqParams;
use crate::modules::CoreArgs;
use crate::tensor::Tensor;

impl CrossAttentionParts<'_> {
    fn check_cross(&self) -> Result<()> {
        if self.config.kind != AttentionKind::CrossAttention {
            return Err(bad("config.kind", "cross-attention", "self-attention"));
        }
        Ok(())
    }

    fn check_cache(&self, cache: &CrossKvCache) -> Result<()> {
        let c = self.config;
        if cache.heads() != c.heads || cache.head_dim() != c.head_dim {
            return Err(bad(
                "cache",
                format!("heads {} and head_dim {}", c.heads, c.head_dim),
                format!("heads {} and head_dim {}", cache.heads(), cache.head_dim()),
            ));
        }
        Ok(())
    }

    /// Project a context once and store it in `layer` of `cache` for slots `batch_offset ..
    /// batch_offset + b`: `linear_kv(key_value_states)` (bias added) split per head into
    /// `[k_h | v_h]`, as [`forward`](Self::forward) does, replacing what those slots held.
    ///
    /// `key_value_states`: the encoder output `[sk, b, h]` (sequence-first, padded).
    /// `context_lens`: `[b]`, each slot's real context length in `1..=sk`; positions past
    /// it are padding, never attended to (what they hold does not matter). `None`: every
    /// slot has `sk` positions.
    ///
    /// Errors, with the cache unchanged: `InvalidArgument` (`config.kind` for a
    /// self-attention layer, `cache` of other heads or head dim, `layer`, `context_lens`, an
    /// empty context), `Shape` (`key_value_states`, a `linear_kv` that gives another shape),
    /// `CacheCapacity` (`max_batch` for the slot range, `max_ctx` when `sk` exceeds it).
    pub fn set_context(
        &self,
        key_value_states: &Tensor,
        cache: &mut CrossKvCache,
        layer: usize,
        batch_offset: usize,
        context_lens: Option<&[usize]>,
    ) -> Result<()> {
        self.check_cross()?;
        let c = self.config;
        let (nk, sk, b) = hidden_rows("key_value_states", key_value_states, c.hidden, false)?;
        self.check_cache(cache)?;
        cache.context_lens(layer)?;
        check_context(
            cache.max_ctx(),
            cache.max_batch(),
            batch_offset,
            b,
            sk,
            context_lens,
        )?;
        let (np, hn) = (c.heads, c.head_dim);
        let kv = project(
            self.linear_kv,
            &Tensor::new(&[nk, c.hidden], key_value_states.data().to_vec())?,
            "linear_kv",
            2 * np * hn,
        )?;
        let mut k = Vec::with_capacity(nk * np * hn);
        let mut v = Vec::with_capacity(nk * np * hn);
        for hrow in kv.data().chunks_exact(2 * hn) {
            k.extend_from_slice(&hrow[..hn]);
            v.extend_from_slice(&hrow[hn..]);
        }
        let shape = [sk, b, np, hn];
        cache.store(
            layer,
            batch_offset,
            &Tensor::new(&shape, k)?,
            &Tensor::new(&shape, v)?,
            context_lens,
        )
    }

    /// A prefill or decode step over cached contexts: `hidden` `[s, b, h]` holds `s` new
    /// decoder tokens of the requests in slots `batch_offset .. batch_offset + b` (a decode
    /// step is `s = 1`). Runs `linear_q`, attention of each slot's queries over its cached
    /// context (keys `0 .. context length`, no causal mask; the layer's window, bottom-right
    /// aligned to the slot's context, and sinks apply) and `linear_proj`. Returns the output
    /// `[s, b, h]` and `linear_proj`'s bias unadded. The cache is only read.
    ///
    /// Equals [`forward`](Self::forward) with `key_value_states` the slot's context and a
    /// padding mask hiding the keys past each slot's length (for a layer without window;
    /// with one, a forward over each slot's unpadded context).
    ///
    /// Errors: `InvalidArgument` (`config.kind` for a self-attention layer, `cache` of other
    /// heads or head dim or naming a slot without context, `layer`), `Shape` (`hidden`, a
    /// submodule output of the wrong shape), `CacheCapacity` (`max_batch` for the slot
    /// range).
    pub fn cross_step(
        &self,
        hidden: &Tensor,
        cache: &CrossKvCache,
        layer: usize,
        batch_offset: usize,
    ) -> Result<LayerOutput> {
        self.check_cross()?;
        let c = self.config;
        let (n, s, b) = hidden_rows("hidden", hidden, c.hidden, false)?;
        self.check_cache(cache)?;
        let lens = cache.step_lens(layer, batch_offset, b)?;
        let (np, hn) = (c.heads, c.head_dim);
        let w = np * hn;
        let o = if n == 0 {
            Vec::new()
        } else {
            let q = project(
                self.linear_q,
                &Tensor::new(&[n, c.hidden], hidden.data().to_vec())?,
                "linear_q",
                w,
            )?;
            // q [s, b, np, hn] -> packed by slot [b * s, np, hn].
            let mut qp = Vec::with_capacity(n * w);
            for bi in 0..b {
                for si in 0..s {
                    qp.extend_from_slice(&q.data()[(si * b + bi) * w..][..w]);
                }
            }
            let (mut kp, mut vp, mut cu_k) = (Vec::new(), Vec::new(), vec![0i32]);
            for (bi, &len) in lens.iter().enumerate() {
                let (kk, vv) = cache.gather_kv(layer, batch_offset + bi)?;
                kp.extend_from_slice(&kk);
                vp.extend_from_slice(&vv);
                cu_k.push(cu_k[bi] + to_i32("context length", len)?);
            }
            let cu_q = (0..=b)
                .map(|i| to_i32("s * b", i * s))
                .collect::<Result<Vec<_>>>()?;
            let tk = kp.len() / w;
            let core = CoreArgs {
                mask_type: MaskType::NoMask,
                window: c.window,
                attention_mask: None,
                attention_bias: None,
                packed: Some(PackedSeqParams {
                    cu_seqlens_q: &cu_q,
                    cu_seqlens_kv: &cu_k,
                    max_seqlen_q: 0,
                    max_seqlen_kv: 0,
                }),
            };
            let op = self.core_attention.forward(
                &Tensor::new(&[n, np, hn], qp)?,
                &Tensor::new(&[tk, np, hn], kp)?,
                &Tensor::new(&[tk, np, hn], vp)?,
                &core,
            )?;
            op.expect_shape("core_attention output", &[Some(n), Some(np), Some(hn)])?;
            let mut o = vec![0f32; n * w];
            for bi in 0..b {
                for si in 0..s {
                    o[(si * b + bi) * w..][..w]
                        .copy_from_slice(&op.data()[(bi * s + si) * w..][..w]);
                }
            }
            o
        };
        if self.linear_proj.out_features() != c.hidden {
            return Err(bad(
                "linear_proj",
                format!("{} output features", c.hidden),
                self.linear_proj.out_features().to_string(),
            ));
        }
        let output = if n == 0 {
            Tensor::zeros(&[s, b, c.hidden])
        } else {
            let y = self.linear_proj.forward(&Tensor::new(&[n, w], o)?)?;
            y.expect_shape("linear_proj", &[Some(n), Some(c.hidden)])?;
            y.reshape(&[s, b, c.hidden])?
        };
        let bias = self.linear_proj.bias().cloned();
        if let Some(bt) = &bias {
            bt.expect_shape("linear_proj.bias", &[Some(c.hidden)])?;
        }
        Ok(LayerOutput { output, bias })
    }
}

fn to_i32(arg: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| AttnError::InvalidArgument {
        arg: arg.into(),
        expected: "a value that fits in int32".into(),
        got: v.to_string(),
    })
}

impl LayerParts<'_> {
    fn cross_only(&self, what: &str) -> Result<&CrossAttentionParts<'_>> {
        match self {
            LayerParts::CrossAttention(p) => Ok(p),
            LayerParts::SelfAttention(_) => Err(bad(
                "layer",
                format!("cross-attention for {what}"),
                "self-attention",
            )),
        }
    }

    /// Cross-attention only: [`CrossAttentionParts::set_context`]. Errors as it does, and
    /// `InvalidArgument` (`layer`) for a self-attention layer.
    pub fn set_context(
        &self,
        key_value_states: &Tensor,
        cache: &mut CrossKvCache,
        layer: usize,
        batch_offset: usize,
        context_lens: Option<&[usize]>,
    ) -> Result<()> {
        self.cross_only("set_context")?.set_context(
            key_value_states,
            cache,
            layer,
            batch_offset,
            context_lens,
        )
    }

    /// Cross-attention only: [`CrossAttentionParts::cross_step`]. Errors as it does, and
    /// `InvalidArgument` (`layer`) for a self-attention layer.
    pub fn cross_step(
        &self,
        hidden: &Tensor,
        cache: &CrossKvCache,
        layer: usize,
        batch_offset: usize,
    ) -> Result<LayerOutput> {
        self.cross_only("cross_step")?
            .cross_step(hidden, cache, layer, batch_offset)
    }
}
