//! The layer logic shared by every generated attention struct.
//!
//! A generated struct owns its submodules and implements [`AttentionLayer`] by returning
//! borrowed [`LayerParts`] (plus its [`LayerConfig`]); every other method has a default
//! that runs the reference system's forward on those parts:
//!
//! self-attention: `linear_qkv` (+ bias) -> GQA-interleaved split (per group
//! `[per*hn q | per*hn gate (output_gate) | hn k | hn v]`) -> q/k norm -> rope -> core
//! attention -> `* sigmoid(gate)` -> `linear_proj` (bias returned, not added).
//!
//! cross-attention: `linear_q(hidden)`, `linear_kv(context)` viewed `[sk, b, np, 2 hn]` and
//! split per head `[k_h | v_h]` -> core attention -> `linear_proj`. For encoder-decoder
//! decoding the context is projected once into a [`CrossKvCache`](crate::kv_cache::CrossKvCache)
//! ([`CrossAttentionParts::set_context`]) and each step attends over it
//! ([`CrossAttentionParts::cross_step`]).

use attention_codegen::{AttentionKind, MaskType, Role};

use crate::config::LayerConfig;
use crate::error::{AttnError, Result};
use crate::kv_cache::{PagedBatch, PagedKvCache, StaticKvCache};
use crate::modules::{check_cu_seqlens, CoreArgs, CoreAttentionModule, LinearModule, NormModule};
use crate::reference::RopeTable;
use crate::tensor::Tensor;

mod cross_cache;

/// What a layer returns: the output and, beside it, `linear_proj`'s bias (NOT added).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerOutput {
    /// `[s, b, h]` (padded) or `[t, h]` (packed).
    pub output: Tensor,
    /// `[h]`, the output projection's bias, when it has one.
    pub bias: Option<Tensor>,
}

/// Packed (THD) sequence metadata: token ranges per sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedSeqParams<'a> {
    /// int32 `[n + 1]`: starts at 0, non-decreasing, ends at the number of query tokens `t`.
    pub cu_seqlens_q: &'a [i32],
    /// int32 `[n + 1]` over the key tokens. Self-attention: must equal `cu_seqlens_q` (or be
    /// empty, meaning the same). Cross-attention: splits `key_value_states` `[tk, h]`.
    pub cu_seqlens_kv: &'a [i32],
    /// Longest query sequence (0 = compute it). Sets the `sq` extent of packed mask/bias
    /// tensors `[n, np|1, max_seqlen_q, max_seqlen_kv]`.
    pub max_seqlen_q: usize,
    /// Longest key sequence (0 = compute it).
    pub max_seqlen_kv: usize,
}

/// Per-call arguments of a forward. `Default` gives none of them and `rope_mscale = 1`.
#[derive(Clone, Copy)]
pub struct ForwardArgs<'a> {
    /// Boolean mask as f32 (nonzero = masked out) broadcastable to `[b, 1|np, sq, sk]`
    /// (packed: `[n, 1|np, max_seqlen_q, max_seqlen_kv]`), for `padding`, `padding_causal`
    /// and `arbitrary` masks only.
    pub attention_mask: Option<&'a Tensor>,
    /// Cross-attention context `[sk, b, h]` (packed: `[tk, h]`). Required for cross, refused
    /// for self.
    pub key_value_states: Option<&'a Tensor>,
    /// Rope positions `[s]` (padded, shared by the batch) or `[t]` (packed). Default: `0..s`,
    /// per sequence when packed; for a KV-cache step, each sequence's cached length onwards.
    pub positions: Option<&'a [i64]>,
    /// Additive post-scale bias broadcastable to `[b, np, sq, sk]` (packed: as the mask).
    /// `-inf` masks a key like the mask does (a row masked entirely gives zeros, LSE `-inf`);
    /// a finite bias, even `f32::MIN` (Hugging Face's `finfo(float32).min` masks), stays a
    /// finite logit (the CUDA kernels saturate logits at +-2^126 so nothing overflows).
    /// Whatever the bias holds at masked positions is never used.
    pub attention_bias: Option<&'a Tensor>,
    /// Packed (THD) input `[t, h]` when set.
    pub packed: Option<PackedSeqParams<'a>>,
    /// Override the layer's default mask type.
    pub mask_type: Option<MaskType>,
    /// Multiplies rope's cos and sin (YaRN). Default 1.
    pub rope_mscale: f32,
}

impl Default for ForwardArgs<'_> {
    fn default() -> Self {
        ForwardArgs {
            attention_mask: None,
            key_value_states: None,
            positions: None,
            attention_bias: None,
            packed: None,
            mask_type: None,
            rope_mscale: 1.0,
        }
    }
}

/// Borrowed submodules of a self-attention layer.
#[derive(Clone, Copy)]
pub struct SelfAttentionParts<'a> {
    /// The resolved config.
    pub config: &'a LayerConfig,
    /// `h -> (np + 2 ng) hn` (+ `np hn` gate columns with `output_gate`).
    pub linear_qkv: &'a dyn LinearModule,
    /// Query norm over hn (required iff the config has `qk_norm`).
    pub q_layernorm: Option<&'a dyn NormModule>,
    /// Key norm over hn (required iff the config has `qk_norm`).
    pub k_layernorm: Option<&'a dyn NormModule>,
    /// Core attention.
    pub core_attention: &'a dyn CoreAttentionModule,
    /// `np hn -> h`.
    pub linear_proj: &'a dyn LinearModule,
}

/// Borrowed submodules of a cross-attention layer.
#[derive(Clone, Copy)]
pub struct CrossAttentionParts<'a> {
    /// The resolved config.
    pub config: &'a LayerConfig,
    /// `h -> np hn` from the hidden states.
    pub linear_q: &'a dyn LinearModule,
    /// `h -> 2 np hn` from the context, per head `[k_h | v_h]`.
    pub linear_kv: &'a dyn LinearModule,
    /// Core attention.
    pub core_attention: &'a dyn CoreAttentionModule,
    /// `np hn -> h`.
    pub linear_proj: &'a dyn LinearModule,
}

/// The parts of either kind of layer.
#[derive(Clone, Copy)]
pub enum LayerParts<'a> {
    /// Self-attention.
    SelfAttention(SelfAttentionParts<'a>),
    /// Cross-attention.
    CrossAttention(CrossAttentionParts<'a>),
}

fn bad(arg: &str, expected: impl Into<String>, got: impl Into<String>) -> AttnError {
    AttnError::InvalidArgument {
        arg: arg.into(),
        expected: expected.into(),
        got: got.into(),
    }
}

impl<'a> LayerParts<'a> {
    /// The config.
    pub fn config(&self) -> &LayerConfig {
        match self {
            LayerParts::SelfAttention(p) => p.config,
            LayerParts::CrossAttention(p) => p.config,
        }
    }

    /// Forward over `hidden`: `[s, b, h]` (sequence-first, padded), or `[t, h]` with
    /// `args.packed`; cross-attention also reads `args.key_value_states` `[sk, b, h]` (packed:
    /// `[tk, h]`). Returns [`LayerOutput`] with `output` in `hidden`'s layout. Details and
    /// errors: [`SelfAttentionParts::forward`] / [`CrossAttentionParts::forward`].
    pub fn forward(&self, hidden: &Tensor, args: &ForwardArgs<'_>) -> Result<LayerOutput> {
        match self {
            LayerParts::SelfAttention(p) => p.forward(hidden, args),
            LayerParts::CrossAttention(p) => p.forward(hidden, args),
        }
    }

    fn self_only(&self, what: &str) -> Result<&SelfAttentionParts<'_>> {
        match self {
            LayerParts::SelfAttention(p) => Ok(p),
            LayerParts::CrossAttention(_) => Err(bad(
                "config.kind",
                format!("self-attention for {what} (a KV-cache step)"),
                "cross-attention",
            )),
        }
    }

    /// `linear_proj`'s bias `[h]`, which the layer returns unadded.
    pub fn output_bias(&self) -> Option<&'a Tensor> {
        match self {
            LayerParts::SelfAttention(p) => p.linear_proj.bias(),
            LayerParts::CrossAttention(p) => p.linear_proj.bias(),
        }
    }

    /// The parameters the CUDA backend runs with, under the names of
    /// [`state_dict`](Self::state_dict): each submodule's
    /// [`CudaSubmodule::cuda_state_dict`](crate::modules::CudaSubmodule).
    ///
    /// Errors: [`AttnError::NoBackendImpl`] naming the first submodule (in Megatron order)
    /// without a CUDA implementation; the submodule's own errors.
    pub fn cuda_state_dict(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        use crate::modules::CudaSubmodule;
        let mut out = Vec::new();
        let mut add = |role: Role, m: Option<&dyn CudaSubmodule>| -> Result<()> {
            let m = m.ok_or_else(|| AttnError::NoBackendImpl {
                role: role.name().into(),
                backend: "cuda".into(),
                hint: "implement attention::runtime::modules::CudaSubmodule for the \
                       submodule's type and return it from its role trait's `cuda()`"
                    .into(),
            })?;
            out.extend(
                m.cuda_state_dict()?
                    .into_iter()
                    .map(|(k, t)| (format!("{prefix}{}.{k}", role.name()), t)),
            );
            Ok(())
        };
        match self {
            LayerParts::SelfAttention(p) => {
                add(Role::LinearQkv, p.linear_qkv.cuda())?;
                if let Some(n) = p.q_layernorm {
                    add(Role::QLayernorm, n.cuda())?;
                }
                if let Some(n) = p.k_layernorm {
                    add(Role::KLayernorm, n.cuda())?;
                }
                add(Role::CoreAttention, p.core_attention.cuda())?;
                add(Role::LinearProj, p.linear_proj.cuda())?;
            }
            LayerParts::CrossAttention(p) => {
                add(Role::LinearQ, p.linear_q.cuda())?;
                add(Role::LinearKv, p.linear_kv.cuda())?;
                add(Role::CoreAttention, p.core_attention.cuda())?;
                add(Role::LinearProj, p.linear_proj.cuda())?;
            }
        }
        Ok(out)
    }

    /// Every parameter under its Megatron name, `{prefix}{role}.{param}`, each tensor in
    /// Megatron's layout, row-major (a linear's `weight` `[out, in]` and `bias` `[out]`).
    pub fn state_dict(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let mut add = |role: Role, sd: Vec<(String, Tensor)>| {
            out.extend(
                sd.into_iter()
                    .map(|(k, t)| (format!("{prefix}{}.{k}", role.name()), t)),
            );
        };
        match self {
            LayerParts::SelfAttention(p) => {
                add(Role::LinearQkv, p.linear_qkv.state_dict());
                if let Some(n) = p.q_layernorm {
                    add(Role::QLayernorm, n.state_dict());
                }
                if let Some(n) = p.k_layernorm {
                    add(Role::KLayernorm, n.state_dict());
                }
                add(Role::CoreAttention, p.core_attention.state_dict());
                add(Role::LinearProj, p.linear_proj.state_dict());
            }
            LayerParts::CrossAttention(p) => {
                add(Role::LinearQ, p.linear_q.state_dict());
                add(Role::LinearKv, p.linear_kv.state_dict());
                add(Role::CoreAttention, p.core_attention.state_dict());
                add(Role::LinearProj, p.linear_proj.state_dict());
            }
        }
        out
    }
}

/// The trait every generated layer implements. Only [`config`](Self::config) and
/// [`parts`](Self::parts) are required; the rest delegate to the parts.
pub trait AttentionLayer {
    /// The resolved config.
    fn config(&self) -> &LayerConfig;
    /// The layer's submodules, borrowed.
    fn parts(&self) -> LayerParts<'_>;
    /// Forward: `hidden` `[s, b, h]` (or `[t, h]` packed) -> output of the same shape, and
    /// `linear_proj`'s bias `[h]` unadded.
    fn forward(&self, hidden: &Tensor, args: &ForwardArgs<'_>) -> Result<LayerOutput> {
        self.parts().forward(hidden, args)
    }
    /// Static-cache step (self-attention): see [`SelfAttentionParts::prefill`].
    fn prefill(
        &self,
        hidden: &Tensor,
        cache: &mut StaticKvCache,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<LayerOutput> {
        self.parts()
            .self_only("prefill")?
            .prefill(hidden, cache, layer, batch_offset, args)
    }
    /// One decode step (`hidden` `[1, b, h]`): see [`SelfAttentionParts::decode`].
    fn decode(
        &self,
        hidden: &Tensor,
        cache: &mut StaticKvCache,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<LayerOutput> {
        self.parts()
            .self_only("decode")?
            .decode(hidden, cache, layer, batch_offset, args)
    }
    /// Mixed decode + prefill over a paged cache: see [`SelfAttentionParts::forward_paged`].
    fn forward_paged(
        &self,
        hidden: &Tensor,
        cache: &mut PagedKvCache,
        layer: usize,
        batch: &PagedBatch<'_>,
    ) -> Result<LayerOutput> {
        self.parts()
            .self_only("forward_paged")?
            .forward_paged(hidden, cache, layer, batch)
    }
    /// Every parameter under its Megatron name with `prefix` (for saving to safetensors).
    fn state_dict(&self, prefix: &str) -> Vec<(String, Tensor)> {
        self.parts().state_dict(prefix)
    }
    /// A self-attention layer's `linear_qkv`, mutably: the in-place parameter updates of
    /// training reach it here (QK-Clip rescales its weight's query and key rows,
    /// [`QkClip::clip_layer`](crate::train::QkClip::clip_layer)). Default: `None` (such a
    /// layer cannot be clipped: [`AttnError::NoBackendImpl`]); cross-attention layers have
    /// none. `#[attention]` structs and [`SpecLayer`](crate::spec_layer::SpecLayer) return
    /// theirs.
    fn linear_qkv_mut(&mut self) -> Option<&mut dyn LinearModule> {
        None
    }
}

/// `x W^T + b` through a module, checking the result shape.
fn project(m: &dyn LinearModule, x: &Tensor, arg: &str, out: usize) -> Result<Tensor> {
    if m.out_features() != out {
        return Err(bad(
            arg,
            format!("{out} output features"),
            m.out_features().to_string(),
        ));
    }
    let mut y = m.forward(x)?;
    y.expect_shape(arg, &[Some(x.shape()[0]), Some(out)])?;
    if let Some(b) = m.bias() {
        b.expect_shape(&format!("{arg}.bias"), &[Some(out)])?;
        for row in y.data_mut().chunks_exact_mut(out) {
            for (v, bb) in row.iter_mut().zip(b.data()) {
                *v += bb;
            }
        }
    }
    Ok(y)
}

fn apply_norm(m: Option<&dyn NormModule>, arg: &str, x: Vec<f32>, hn: usize) -> Result<Vec<f32>> {
    match m {
        None => Err(bad(
            arg,
            "a norm module (the config has qk_layernorm)",
            "none",
        )),
        Some(m) => {
            let rows = x.len() / hn;
            let y = m.forward(&Tensor::new(&[rows, hn], x)?)?;
            y.expect_shape(arg, &[Some(rows), Some(hn)])?;
            Ok(y.into_data())
        }
    }
}

/// Rows of hidden states: `[s, b, h]` -> (n = s*b, s, b), or `[t, h]` packed -> (t, t, 1).
fn hidden_rows(arg: &str, x: &Tensor, h: usize, packed: bool) -> Result<(usize, usize, usize)> {
    if packed {
        x.expect_shape(arg, &[None, Some(h)])?;
        Ok((x.shape()[0], x.shape()[0], 1))
    } else {
        x.expect_shape(arg, &[None, None, Some(h)])?;
        Ok((x.shape()[0] * x.shape()[1], x.shape()[0], x.shape()[1]))
    }
}

/// q, k, v (and gate) of a self-attention layer, before rope.
struct Qkv {
    q: Vec<f32>,
    gate: Option<Vec<f32>>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl SelfAttentionParts<'_> {
    fn check_parts(&self) -> Result<()> {
        let c = self.config;
        if c.kind != AttentionKind::SelfAttention {
            return Err(bad("config.kind", "self-attention", "cross-attention"));
        }
        if c.qk_norm.is_none() && (self.q_layernorm.is_some() || self.k_layernorm.is_some()) {
            return Err(bad(
                "q_layernorm/k_layernorm",
                "none (the config has no qk_layernorm)",
                "a norm module",
            ));
        }
        Ok(())
    }

    /// linear_qkv, split, q/k norm. `x` `[n, h]`.
    fn qkv(&self, x: &Tensor) -> Result<Qkv> {
        let c = self.config;
        let (np, ng, hn) = (c.heads, c.groups, c.head_dim);
        let per = np / ng;
        let n = x.shape()[0];
        let y = project(self.linear_qkv, x, "linear_qkv", c.qkv_out_features())?;
        let gw = if c.output_gate { per * hn } else { 0 };
        let gcols = per * hn + gw + 2 * hn;
        let mut q = Vec::with_capacity(n * np * hn);
        let mut gate = c.output_gate.then(|| Vec::with_capacity(n * np * hn));
        let mut k = Vec::with_capacity(n * ng * hn);
        let mut v = Vec::with_capacity(n * ng * hn);
        for row in y.data().chunks_exact(ng * gcols) {
            for g in row.chunks_exact(gcols) {
                q.extend_from_slice(&g[..per * hn]);
                if let Some(gt) = gate.as_mut() {
                    gt.extend_from_slice(&g[per * hn..per * hn + gw]);
                }
                k.extend_from_slice(&g[per * hn + gw..per * hn + gw + hn]);
                v.extend_from_slice(&g[per * hn + gw + hn..]);
            }
        }
        if c.qk_norm.is_some() {
            q = apply_norm(self.q_layernorm, "q_layernorm", q, hn)?;
            k = apply_norm(self.k_layernorm, "k_layernorm", k, hn)?;
        }
        Ok(Qkv { q, gate, k, v })
    }

    fn rope(&self, t: &mut Qkv, positions: &[i64], mscale: f32) -> Result<()> {
        let c = self.config;
        if let Some(r) = &c.rope {
            let table = RopeTable::new(r, c.head_dim)?;
            table.apply(&mut t.q, c.heads, positions, mscale)?;
            table.apply(&mut t.k, c.groups, positions, mscale)?;
        }
        Ok(())
    }

    /// Gate and output projection. `o` `[n, np hn]`, output reshaped to `out_shape`.
    fn finish(
        &self,
        mut o: Vec<f32>,
        gate: Option<Vec<f32>>,
        out_shape: &[usize],
    ) -> Result<LayerOutput> {
        let c = self.config;
        if let Some(g) = gate {
            for (x, g) in o.iter_mut().zip(g) {
                *x *= (1.0 / (1.0 + (-(g as f64)).exp())) as f32;
            }
        }
        let w = c.heads * c.head_dim;
        let n = o.len() / w;
        let y = self.linear_proj.forward(&Tensor::new(&[n, w], o)?)?;
        if self.linear_proj.out_features() != c.hidden {
            return Err(bad(
                "linear_proj",
                format!("{} output features", c.hidden),
                self.linear_proj.out_features().to_string(),
            ));
        }
        y.expect_shape("linear_proj", &[Some(n), Some(c.hidden)])?;
        let bias = self.linear_proj.bias().cloned();
        if let Some(b) = &bias {
            b.expect_shape("linear_proj.bias", &[Some(c.hidden)])?;
        }
        Ok(LayerOutput {
            output: y.reshape(out_shape)?,
            bias,
        })
    }

    /// Forward over `hidden` `[s, b, h]`, or `[t, h]` with `args.packed`.
    ///
    /// Errors: `Shape` (hidden, mask, bias, positions), `CuSeqlens` (`cu_seqlens_q`,
    /// `cu_seqlens_kv`), `InvalidArgument` (`key_value_states` given to self-attention, a
    /// mask tensor with a mask type that takes none, missing norm modules).
    pub fn forward(&self, hidden: &Tensor, args: &ForwardArgs<'_>) -> Result<LayerOutput> {
        self.check_parts()?;
        let c = self.config;
        if args.key_value_states.is_some() {
            return Err(bad(
                "key_value_states",
                "none for self-attention",
                "a tensor",
            ));
        }
        let packed = args.packed.is_some();
        let (n, s, b) = hidden_rows("hidden", hidden, c.hidden, packed)?;
        let x = Tensor::new(&[n, c.hidden], hidden.data().to_vec())?;
        // Positions per row.
        let mut cu_kv_owned = None;
        let positions = crate::plan::forward_positions(n, s, b, args)?;
        if let Some(pk) = &args.packed {
            check_cu_seqlens("cu_seqlens_q", pk.cu_seqlens_q, n)?;
            if !pk.cu_seqlens_kv.is_empty() && pk.cu_seqlens_kv != pk.cu_seqlens_q {
                return Err(AttnError::CuSeqlens {
                    arg: "cu_seqlens_kv".into(),
                    expected: "equal to cu_seqlens_q (or empty) for self-attention".into(),
                    got: pk.cu_seqlens_kv.iter().map(|&x| x as i64).collect(),
                });
            }
            cu_kv_owned = Some(PackedSeqParams {
                cu_seqlens_kv: pk.cu_seqlens_q,
                ..*pk
            });
        }
        let mut t = self.qkv(&x)?;
        self.rope(&mut t, &positions, args.rope_mscale)?;
        let (np, ng, hn) = (c.heads, c.groups, c.head_dim);
        let (qs, ks): (Vec<usize>, Vec<usize>) = if packed {
            (vec![n, np, hn], vec![n, ng, hn])
        } else {
            (vec![s, b, np, hn], vec![s, b, ng, hn])
        };
        let q = Tensor::new(&qs, t.q)?;
        let k = Tensor::new(&ks, t.k)?;
        let v = Tensor::new(&ks, t.v)?;
        let core = CoreArgs {
            mask_type: args.mask_type.unwrap_or(c.mask),
            window: c.window,
            attention_mask: args.attention_mask,
            attention_bias: args.attention_bias,
            packed: cu_kv_owned,
        };
        let o = self.core_attention.forward(&q, &k, &v, &core)?;
        o.expect_shape(
            "core_attention output",
            &qs.iter().map(|&d| Some(d)).collect::<Vec<_>>(),
        )?;
        self.finish(o.into_data(), t.gate, hidden.shape())
    }

    /// Attend new tokens over a cache: q packed `[sum sq_i, np, hn]` by sequence, keys packed.
    fn attend_cached(
        &self,
        q: Vec<f32>,
        cu_q: &[i32],
        k: Vec<f32>,
        v: Vec<f32>,
        cu_k: &[i32],
    ) -> Result<Vec<f32>> {
        let c = self.config;
        let (np, ng, hn) = (c.heads, c.groups, c.head_dim);
        let tq = q.len() / (np * hn);
        let tk = k.len() / (ng * hn);
        let core = CoreArgs {
            mask_type: MaskType::CausalBottomRight,
            window: c.window,
            attention_mask: None,
            attention_bias: None,
            packed: Some(PackedSeqParams {
                cu_seqlens_q: cu_q,
                cu_seqlens_kv: cu_k,
                max_seqlen_q: 0,
                max_seqlen_kv: 0,
            }),
        };
        let o = self.core_attention.forward(
            &Tensor::new(&[tq, np, hn], q)?,
            &Tensor::new(&[tk, ng, hn], k)?,
            &Tensor::new(&[tk, ng, hn], v)?,
            &core,
        )?;
        o.expect_shape("core_attention output", &[Some(tq), Some(np), Some(hn)])?;
        Ok(o.into_data())
    }

    /// A static-cache step: `hidden` `[s, b, h]` for batch slots `batch_offset..+b`.
    ///
    /// Rotates q and k at each slot's own positions (`cache.visible_len(layer, slot) + i`, or
    /// `args.positions` `[s]` when given), appends k and v to `layer` of the cache (see
    /// [`StaticKvCache::append`]; call [`StaticKvCache::advance`] once every layer has
    /// appended), then attends over keys `[0, len + s)` bottom-right causal with the layer's
    /// window. Only `positions` and `rope_mscale` of `args` are accepted here.
    pub fn prefill(
        &self,
        hidden: &Tensor,
        cache: &mut StaticKvCache,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<LayerOutput> {
        self.check_parts()?;
        let c = self.config;
        let plan = crate::plan::static_step(c, hidden.shape(), &*cache, layer, batch_offset, args)?;
        let (s, b, n) = (plan.s, plan.b, plan.rows());
        let (start, positions) = (plan.starts, plan.positions);
        let x = Tensor::new(&[n, c.hidden], hidden.data().to_vec())?;
        let mut t = self.qkv(&x)?;
        self.rope(&mut t, &positions, args.rope_mscale)?;
        let (np, ng, hn) = (c.heads, c.groups, c.head_dim);
        let k = Tensor::new(&[s, b, ng, hn], t.k)?;
        let v = Tensor::new(&[s, b, ng, hn], t.v)?;
        cache.append(layer, batch_offset, &k, &v)?;
        // q [s, b, np, hn] -> packed by slot [b * s, np, hn].
        let w = np * hn;
        let mut qp = Vec::with_capacity(n * w);
        for bi in 0..b {
            for si in 0..s {
                qp.extend_from_slice(&t.q[(si * b + bi) * w..][..w]);
            }
        }
        let (mut kp, mut vp, mut cu_k, cu_q) = (
            Vec::new(),
            Vec::new(),
            vec![0i32],
            (0..=b).map(|i| (i * s) as i32).collect::<Vec<_>>(),
        );
        for (bi, st) in start.iter().enumerate() {
            let len = st + s;
            let (kk, vv) = cache.gather_kv(layer, batch_offset + bi, len)?;
            kp.extend_from_slice(&kk);
            vp.extend_from_slice(&vv);
            cu_k.push(cu_k[bi] + len as i32);
        }
        let o = self.attend_cached(qp, &cu_q, kp, vp, &cu_k)?;
        let mut out = vec![0f32; n * w];
        for bi in 0..b {
            for si in 0..s {
                out[(si * b + bi) * w..][..w].copy_from_slice(&o[(bi * s + si) * w..][..w]);
            }
        }
        self.finish(out, t.gate, hidden.shape())
    }

    /// One decode step: [`prefill`](Self::prefill) with `hidden` `[1, b, h]`.
    pub fn decode(
        &self,
        hidden: &Tensor,
        cache: &mut StaticKvCache,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<LayerOutput> {
        hidden.expect_shape("hidden", &[Some(1), None, Some(self.config.hidden)])?;
        self.prefill(hidden, cache, layer, batch_offset, args)
    }

    /// Mixed decode + prefill over a paged cache: `hidden` `[T, h]` packed by
    /// `batch.cu_seqlens_q`. Request `i`'s new tokens sit at positions
    /// `seqlens_k[i] - new_i .. seqlens_k[i]` (rope), their k/v are appended to `layer` of the
    /// cache, then each request attends over its `seqlens_k[i]` cached keys, bottom-right
    /// causal with the layer's window. Returns `[T, h]`.
    pub fn forward_paged(
        &self,
        hidden: &Tensor,
        cache: &mut PagedKvCache,
        layer: usize,
        batch: &PagedBatch<'_>,
    ) -> Result<LayerOutput> {
        self.check_parts()?;
        let c = self.config;
        let plan = crate::plan::paged_step(c, hidden.shape(), &*cache, batch)?;
        let (n, reqs, positions) = (plan.rows, plan.requests, plan.positions);
        let x = Tensor::new(&[n, c.hidden], hidden.data().to_vec())?;
        let mut t = self.qkv(&x)?;
        self.rope(&mut t, &positions, 1.0)?;
        let (ng, hn) = (c.groups, c.head_dim);
        let k = Tensor::new(&[n, ng, hn], t.k)?;
        let v = Tensor::new(&[n, ng, hn], t.v)?;
        cache.append_paged(layer, &k, &v, batch)?;
        let (mut kp, mut vp, mut cu_k) = (Vec::new(), Vec::new(), vec![0i32]);
        for (i, r) in reqs.iter().enumerate() {
            let (kk, vv) = cache.gather_kv(layer, batch.block_table.row(i)?, r.k_len)?;
            kp.extend_from_slice(&kk);
            vp.extend_from_slice(&vv);
            cu_k.push(cu_k[i] + r.k_len as i32);
        }
        let o = self.attend_cached(t.q, batch.cu_seqlens_q, kp, vp, &cu_k)?;
        self.finish(o, t.gate, hidden.shape())
    }
}

impl CrossAttentionParts<'_> {
    /// Forward over `hidden` `[sq, b, h]` with `args.key_value_states` `[sk, b, h]` (packed:
    /// `[t, h]` and `[tk, h]` split by `cu_seqlens_q` / `cu_seqlens_kv`).
    ///
    /// Errors: `InvalidArgument` (`key_value_states` missing), `Shape`, `CuSeqlens`.
    pub fn forward(&self, hidden: &Tensor, args: &ForwardArgs<'_>) -> Result<LayerOutput> {
        let c = self.config;
        if c.kind != AttentionKind::CrossAttention {
            return Err(bad("config.kind", "cross-attention", "self-attention"));
        }
        let ctx = args.key_value_states.ok_or_else(|| {
            bad(
                "key_value_states",
                "the context [sk, b, h] for cross-attention",
                "none",
            )
        })?;
        let packed = args.packed.is_some();
        let (n, s, b) = hidden_rows("hidden", hidden, c.hidden, packed)?;
        let (nk, sk, bk) = hidden_rows("key_value_states", ctx, c.hidden, packed)?;
        if bk != b {
            return Err(AttnError::Shape {
                arg: "key_value_states".into(),
                expected: format!("[sk, {b}, {}]", c.hidden),
                got: ctx.shape().to_vec(),
            });
        }
        let (np, hn) = (c.heads, c.head_dim);
        let q = project(
            self.linear_q,
            &Tensor::new(&[n, c.hidden], hidden.data().to_vec())?,
            "linear_q",
            np * hn,
        )?;
        let kv = project(
            self.linear_kv,
            &Tensor::new(&[nk, c.hidden], ctx.data().to_vec())?,
            "linear_kv",
            2 * np * hn,
        )?;
        let mut k = Vec::with_capacity(nk * np * hn);
        let mut v = Vec::with_capacity(nk * np * hn);
        for hrow in kv.data().chunks_exact(2 * hn) {
            k.extend_from_slice(&hrow[..hn]);
            v.extend_from_slice(&hrow[hn..]);
        }
        let (qs, ks): (Vec<usize>, Vec<usize>) = if packed {
            (vec![n, np, hn], vec![nk, np, hn])
        } else {
            (vec![s, b, np, hn], vec![sk, b, np, hn])
        };
        let core = CoreArgs {
            mask_type: args.mask_type.unwrap_or(c.mask),
            window: c.window,
            attention_mask: args.attention_mask,
            attention_bias: args.attention_bias,
            packed: args.packed,
        };
        let o = self.core_attention.forward(
            &q.reshape(&qs)?,
            &Tensor::new(&ks, k)?,
            &Tensor::new(&ks, v)?,
            &core,
        )?;
        o.expect_shape(
            "core_attention output",
            &qs.iter().map(|&d| Some(d)).collect::<Vec<_>>(),
        )?;
        let w = np * hn;
        let y = self
            .linear_proj
            .forward(&Tensor::new(&[n, w], o.into_data())?)?;
        y.expect_shape("linear_proj", &[Some(n), Some(c.hidden)])?;
        let bias = self.linear_proj.bias().cloned();
        Ok(LayerOutput {
            output: y.reshape(hidden.shape())?,
            bias,
        })
    }
}
