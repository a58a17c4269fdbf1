//! [`SpecLayer`]: a layer built at run time from a spec string, with the default submodule
//! types. The `attn` CLI and config-driven engines use it; the `#[attention]` macro generates
//! a struct with the same behaviour at build time.

use attention_codegen::{AttentionKind, AttentionSpec, Role};

use crate::config::{LayerConfig, RuntimeDims};
use crate::error::{AttnError, Result};
use crate::layer::{AttentionLayer, CrossAttentionParts, LayerParts, SelfAttentionParts};
use crate::modules::{DotProductAttention, Linear, QkNormLayer, Submodule};
use crate::weights::hf::HfLayout;
use crate::weights::names::{megatron_view, state_dict_as, WeightNames};
use crate::weights::WeightStore;

/// A self- or cross-attention layer with the default submodules
/// ([`Linear`], [`QkNormLayer`], [`DotProductAttention`]).
///
/// Self-attention holds `linear_qkv`, optional `q_layernorm`/`k_layernorm`, `core_attention`
/// and `linear_proj`; cross-attention holds `linear_q`, `linear_kv`, `core_attention` and
/// `linear_proj`.
#[derive(Debug, Clone)]
pub struct SpecLayer {
    config: LayerConfig,
    linear_qkv: Option<Linear>,
    linear_q: Option<Linear>,
    linear_kv: Option<Linear>,
    q_layernorm: Option<QkNormLayer>,
    k_layernorm: Option<QkNormLayer>,
    core_attention: DotProductAttention,
    linear_proj: Linear,
}

impl SpecLayer {
    /// Parse `spec` (the `#[attention]` grammar) and resolve it against `dims`.
    pub fn config_from_str(spec: &str, dims: &RuntimeDims) -> Result<LayerConfig> {
        let spec: AttentionSpec = attention_codegen::parse_spec(spec)?;
        if let Some((role, path)) = spec.overrides.first() {
            return Err(AttnError::InvalidArgument {
                arg: "spec".into(),
                expected:
                    "no submodule overrides (user types exist only in code built with #[attention])"
                        .into(),
                got: format!("{} = {path}", role.name()),
            });
        }
        LayerConfig::new(&spec, dims)
    }

    /// Build a layer with seeded random weights.
    pub fn init(config: LayerConfig, seed: u64) -> Result<Self> {
        Self::build(
            config,
            |cfg, role| Linear::init(cfg, role, seed),
            |cfg, role| QkNormLayer::init(cfg, role, seed),
            |cfg| DotProductAttention::init(cfg, Role::CoreAttention, seed),
        )
    }

    /// Load the layer's weights from `weights` under Megatron names with `prefix`
    /// (e.g. `decoder.layers.0.self_attention.`). A missing or misshaped tensor is an error
    /// naming its key.
    pub fn load(config: LayerConfig, weights: &WeightStore, prefix: &str) -> Result<Self> {
        Self::build(
            config,
            |cfg, role| Linear::load(cfg, role, weights, prefix),
            |cfg, role| QkNormLayer::load(cfg, role, weights, prefix),
            |cfg| DotProductAttention::load(cfg, Role::CoreAttention, weights, prefix),
        )
    }

    /// Load the layer's weights from `weights` named as `names` says: Megatron names with
    /// `prefix` as [`load`](Self::load) does, or Hugging Face names with `prefix` the attention
    /// module's (`model.layers.0.self_attn.`; [`WeightNames::Hf`] also takes the block's,
    /// `model.layers.0.`), mapped into the layer's layout
    /// ([`crate::weights::hf`]). Returns the layer and, for Hugging Face names, the family and
    /// prefix found.
    ///
    /// Errors: those of [`load`](Self::load); for Hugging Face names a missing, extra or
    /// misshaped key naming the key and the family ([`AttnError::HfMissingWeight`],
    /// [`AttnError::HfExtraWeight`], [`AttnError::HfWeightShape`]), no family found
    /// ([`AttnError::HfFamilyNotFound`]), a spec the family cannot express
    /// ([`AttnError::InvalidArgument`]).
    pub fn load_named(
        config: LayerConfig,
        weights: &WeightStore,
        prefix: &str,
        names: WeightNames,
    ) -> Result<(Self, Option<HfLayout>)> {
        let view = megatron_view(weights, prefix, names, &config)?;
        let layer = Self::load(config, view.store(), view.prefix())?;
        Ok((layer, view.hf_layout().cloned()))
    }

    /// Every parameter under `names` with `prefix` (see [`state_dict_as`]): Megatron names,
    /// or a Hugging Face family's, loadable again by [`load_named`](Self::load_named).
    ///
    /// Errors: [`AttnError::InvalidArgument`] for [`WeightNames::Hf`] without a family, or a
    /// spec the family cannot express.
    pub fn state_dict_named(
        &self,
        prefix: &str,
        names: WeightNames,
    ) -> Result<Vec<(String, crate::tensor::Tensor)>> {
        state_dict_as(self, prefix, names)
    }

    /// QK-Clip on this layer's `linear_qkv.weight` with a record the caller keeps
    /// ([`QkClip::clip_layer`](crate::train::QkClip::clip_layer): per group, query rows times
    /// `eta^alpha`, key rows times `eta^(1 - alpha)`, `eta = threshold / m_g` when
    /// `m_g > threshold`), then resets the record. Training through
    /// [`CpuLayer`](crate::backend::CpuLayer) needs no record of the caller's: the layer keeps
    /// one and clips itself ([`TrainLayer::clip_qk`](crate::backend::TrainLayer::clip_qk)).
    ///
    /// Errors: those of [`QkClip::clip`](crate::train::QkClip::clip) (a cross-attention
    /// layer, a bad threshold or alpha); nothing changes.
    pub fn clip_qk(
        &mut self,
        record: &mut crate::train::QkClip,
        threshold: f32,
        alpha: f32,
    ) -> Result<crate::train::QkClipReport> {
        record.clip_layer(self, threshold, alpha)
    }

    fn build(
        config: LayerConfig,
        linear: impl Fn(&LayerConfig, Role) -> Result<Linear>,
        norm: impl Fn(&LayerConfig, Role) -> Result<QkNormLayer>,
        core: impl Fn(&LayerConfig) -> Result<DotProductAttention>,
    ) -> Result<Self> {
        let cfg = &config;
        let is_self = cfg.kind == AttentionKind::SelfAttention;
        let norms = is_self && cfg.qk_norm.is_some();
        Ok(SpecLayer {
            linear_qkv: is_self.then(|| linear(cfg, Role::LinearQkv)).transpose()?,
            linear_q: (!is_self).then(|| linear(cfg, Role::LinearQ)).transpose()?,
            linear_kv: (!is_self)
                .then(|| linear(cfg, Role::LinearKv))
                .transpose()?,
            q_layernorm: norms.then(|| norm(cfg, Role::QLayernorm)).transpose()?,
            k_layernorm: norms.then(|| norm(cfg, Role::KLayernorm)).transpose()?,
            core_attention: core(cfg)?,
            linear_proj: linear(cfg, Role::LinearProj)?,
            config,
        })
    }
}

impl AttentionLayer for SpecLayer {
    fn config(&self) -> &LayerConfig {
        &self.config
    }

    fn linear_qkv_mut(&mut self) -> Option<&mut dyn crate::modules::LinearModule> {
        self.linear_qkv
            .as_mut()
            .map(|l| l as &mut dyn crate::modules::LinearModule)
    }

    fn parts(&self) -> LayerParts<'_> {
        match (&self.linear_qkv, &self.linear_q, &self.linear_kv) {
            (Some(qkv), _, _) => LayerParts::SelfAttention(SelfAttentionParts {
                config: &self.config,
                linear_qkv: qkv,
                q_layernorm: self.q_layernorm.as_ref().map(|n| n as _),
                k_layernorm: self.k_layernorm.as_ref().map(|n| n as _),
                core_attention: &self.core_attention,
                linear_proj: &self.linear_proj,
            }),
            (None, Some(q), Some(kv)) => LayerParts::CrossAttention(CrossAttentionParts {
                config: &self.config,
                linear_q: q,
                linear_kv: kv,
                core_attention: &self.core_attention,
                linear_proj: &self.linear_proj,
            }),
            _ => unreachable!("SpecLayer::build sets linear_qkv or linear_q and linear_kv"),
        }
    }
}
