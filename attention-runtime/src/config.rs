//! [`LayerConfig`]: an [`AttentionSpec`] resolved against the dimensions supplied at run time.
//!
//! A spec may leave `heads`, `gqa`, `head_dim` and `hidden` out; [`RuntimeDims`] supplies them.
//! A value given in both places must agree, and a value missing from both is an error
//! ([`AttnError::ConfigMismatch`]). Defaults follow the reference system: `groups = heads`,
//! `head_dim = hidden / heads`, `hidden = heads * head_dim`.

use attention_codegen::{
    AttentionKind, AttentionSpec, DType, MaskType, QkNorm, Rope, Sinks, Window,
};

use crate::error::{AttnError, Result};

/// Dimensions supplied at run time (a model config). `None` = take it from the spec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuntimeDims {
    /// `num_attention_heads` (np).
    pub heads: Option<usize>,
    /// `num_query_groups` (ng).
    pub groups: Option<usize>,
    /// `kv_channels` (hn).
    pub head_dim: Option<usize>,
    /// Hidden size h.
    pub hidden: Option<usize>,
}

/// A fully resolved layer configuration: every dimension known, every default applied.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerConfig {
    /// Self or cross attention.
    pub kind: AttentionKind,
    /// Query heads np.
    pub heads: usize,
    /// Key/value groups ng (`heads` for MHA and for cross-attention).
    pub groups: usize,
    /// Head dim hn.
    pub head_dim: usize,
    /// Hidden size h.
    pub hidden: usize,
    /// q/k norm over the head dim, if any.
    pub qk_norm: Option<QkNorm>,
    /// Norm epsilon.
    pub eps: f32,
    /// Whether `linear_qkv` (`linear_q`/`linear_kv`) has a bias (`add_bias_linear || add_qkv_bias`).
    pub qkv_bias: bool,
    /// Whether `linear_proj` has a bias (`add_bias_linear`).
    pub proj_bias: bool,
    /// Rotary embedding, if any (self-attention only).
    pub rope: Option<Rope>,
    /// The layer's default mask type.
    pub mask: MaskType,
    /// Sliding window, bottom-right aligned.
    pub window: Option<Window>,
    /// The resolved softmax scale (`softmax_scale` or `1/sqrt(head_dim)`).
    pub softmax_scale: f32,
    /// Attention sinks.
    pub sinks: Option<Sinks>,
    /// Attention output gate (self-attention only): `linear_qkv` emits a gate per query head.
    pub output_gate: bool,
    /// Element type on the GPU (the CPU reference always computes in f32).
    pub dtype: DType,
    /// The spec this config was resolved from.
    pub spec: AttentionSpec,
}

fn show(v: Option<usize>) -> String {
    v.map_or_else(|| "unset".to_string(), |v| v.to_string())
}

/// Merge one dimension given in the spec and/or the runtime dims.
fn merge(field: &str, spec: Option<usize>, dims: Option<usize>) -> Result<Option<usize>> {
    match (spec, dims) {
        (Some(a), Some(b)) if a != b => Err(AttnError::ConfigMismatch {
            field: field.into(),
            spec: a.to_string(),
            config: b.to_string(),
        }),
        (a, b) => Ok(a.or(b)),
    }
}

impl LayerConfig {
    /// Resolve `spec` against `dims`.
    ///
    /// Errors: [`AttnError::ConfigMismatch`] when a dimension disagrees between the two or is
    /// missing from both (reported as "unset"), or when the resolved dimensions are
    /// inconsistent (`heads % groups != 0`, cross-attention with `groups != heads`,
    /// `hidden` not derivable); [`AttnError::InvalidArgument`] for an odd rotary dim, a
    /// zero dimension, a bad window or an output gate on cross-attention.
    pub fn new(spec: &AttentionSpec, dims: &RuntimeDims) -> Result<LayerConfig> {
        let heads = merge("heads", spec.heads, dims.heads)?;
        let groups = merge("groups", spec.gqa, dims.groups)?;
        let hidden = merge("hidden", spec.hidden, dims.hidden)?;
        let head_dim = match (spec.head_dims.as_slice(), dims.head_dim) {
            ([], d) => d,
            ([d], None) => Some(*d),
            (ds, None) => {
                return Err(AttnError::ConfigMismatch {
                    field: "head_dim".into(),
                    spec: format!("{ds:?} (several)"),
                    config: "unset (pick one of the spec's head dims)".into(),
                })
            }
            (ds, Some(d)) => {
                if ds.contains(&d) {
                    Some(d)
                } else {
                    return Err(AttnError::ConfigMismatch {
                        field: "head_dim".into(),
                        spec: format!("{ds:?}"),
                        config: d.to_string(),
                    });
                }
            }
        };
        let heads = heads.ok_or_else(|| AttnError::ConfigMismatch {
            field: "heads".into(),
            spec: "unset".into(),
            config: "unset".into(),
        })?;
        let head_dim = match (head_dim, hidden) {
            (Some(d), _) => d,
            (None, Some(h)) if heads > 0 && h.is_multiple_of(heads) => h / heads,
            (None, h) => {
                return Err(AttnError::ConfigMismatch {
                    field: "head_dim".into(),
                    spec: "unset".into(),
                    config: format!("unset (hidden = {}, heads = {heads})", show(h)),
                })
            }
        };
        let too_big = |what: &str| AttnError::InvalidArgument {
            arg: "heads / head_dim / hidden".into(),
            expected: format!("a layer whose {what} fits in usize"),
            got: format!(
                "heads = {heads}, groups = {}, head_dim = {head_dim}, hidden = {}",
                show(groups),
                show(hidden)
            ),
        };
        let hidden = match hidden {
            Some(h) => h,
            None => heads
                .checked_mul(head_dim)
                .ok_or_else(|| too_big("heads * head_dim"))?,
        };
        let groups = groups.unwrap_or(heads);
        for (name, v) in [
            ("heads", heads),
            ("groups", groups),
            ("head_dim", head_dim),
            ("hidden", hidden),
        ] {
            if v == 0 {
                return Err(AttnError::InvalidArgument {
                    arg: name.into(),
                    expected: "a positive value".into(),
                    got: "0".into(),
                });
            }
        }
        // The largest weight, linear_qkv with an output gate: (2 heads + 2 groups) x head_dim
        // rows of hidden columns; every other size of the layer is smaller.
        heads
            .checked_add(groups)
            .and_then(|x| x.checked_mul(2))
            .and_then(|x| x.checked_mul(head_dim))
            .and_then(|x| x.checked_mul(hidden))
            .ok_or_else(|| {
                too_big("linear_qkv weight ((2 heads + 2 groups) * head_dim * hidden)")
            })?;
        if !heads.is_multiple_of(groups) {
            return Err(AttnError::ConfigMismatch {
                field: "groups".into(),
                spec: format!("a divisor of heads = {heads}"),
                config: groups.to_string(),
            });
        }
        if spec.kind == AttentionKind::CrossAttention {
            if groups != heads {
                return Err(AttnError::ConfigMismatch {
                    field: "groups".into(),
                    spec: format!("cross-attention needs groups == heads = {heads}"),
                    config: groups.to_string(),
                });
            }
            if spec.output_gate {
                return Err(AttnError::InvalidArgument {
                    arg: "output_gate".into(),
                    expected: "self-attention only".into(),
                    got: "output_gate on cross-attention".into(),
                });
            }
            if spec.qk_norm.is_some() {
                return Err(AttnError::InvalidArgument {
                    arg: "qk_layernorm".into(),
                    expected: "self-attention only (the reference system's cross-attention has no q/k norm)".into(),
                    got: "qk_layernorm on cross-attention".into(),
                });
            }
            if spec.rope.is_some() {
                return Err(AttnError::InvalidArgument {
                    arg: "rope".into(),
                    expected: "self-attention only".into(),
                    got: "rope on cross-attention".into(),
                });
            }
        }
        if let Some(r) = &spec.rope {
            let dim = rotary_dim(head_dim, r.rotary_percent);
            if dim == 0 || !dim.is_multiple_of(2) || dim > head_dim {
                return Err(AttnError::InvalidArgument {
                    arg: "rotary_percent".into(),
                    expected: format!(
                        "head_dim * rotary_percent to be a positive even number <= {head_dim}"
                    ),
                    got: format!("{} (rotary dim {dim})", r.rotary_percent),
                });
            }
            if r.rotary_base.is_nan() || r.rotary_base <= 0.0 {
                return Err(AttnError::InvalidArgument {
                    arg: "rotary_base".into(),
                    expected: "a positive number".into(),
                    got: r.rotary_base.to_string(),
                });
            }
        }
        if let Some(w) = spec.window {
            if w.left < -1 || w.right < -1 {
                return Err(AttnError::InvalidArgument {
                    arg: "window".into(),
                    expected: "(left, right) each >= -1".into(),
                    got: format!("({}, {})", w.left, w.right),
                });
            }
        }
        let softmax_scale = spec.softmax_scale.unwrap_or(1.0 / (head_dim as f64).sqrt()) as f32;
        Ok(LayerConfig {
            kind: spec.kind,
            heads,
            groups,
            head_dim,
            hidden,
            qk_norm: spec.qk_norm,
            eps: spec.eps as f32,
            qkv_bias: spec.has_qkv_bias(),
            proj_bias: spec.bias,
            rope: spec.rope,
            mask: spec.default_mask(),
            window: spec.window,
            softmax_scale,
            sinks: spec.sinks,
            output_gate: spec.output_gate,
            dtype: spec.dtype,
            spec: spec.clone(),
        })
    }

    /// Errors ([`AttnError::InvalidArgument`] naming `qk_layernorm`, `rope` or
    /// `output_gate`) for a cross-attention config with any of them. [`LayerConfig::new`]
    /// never builds one (the reference system's `CrossAttention` has no q/k norm, rope or
    /// output gate); a config assembled field by field can hold one, and the training paths
    /// refuse it rather than train a layer whose forward ignores it.
    pub(crate) fn check_cross_extras(&self) -> Result<()> {
        if self.kind != AttentionKind::CrossAttention {
            return Ok(());
        }
        for (on, arg) in [
            (self.qk_norm.is_some(), "qk_layernorm"),
            (self.rope.is_some(), "rope"),
            (self.output_gate, "output_gate"),
        ] {
            if on {
                return Err(AttnError::InvalidArgument {
                    arg: arg.into(),
                    expected: "self-attention only (the reference system's cross-attention has \
                               no q/k norm, rope or output gate)"
                        .into(),
                    got: format!("{arg} on cross-attention"),
                });
            }
        }
        Ok(())
    }

    /// Query heads per group (`heads / groups`).
    pub fn heads_per_group(&self) -> usize {
        self.heads / self.groups
    }

    /// Output features of `linear_qkv`: `(np + 2 ng) hn`, plus `np hn` with the output gate.
    /// Per group the columns are `[per*hn queries | per*hn gates (if gated) | hn key | hn value]`.
    pub fn qkv_out_features(&self) -> usize {
        let gate = if self.output_gate { self.heads } else { 0 };
        (self.heads + gate + 2 * self.groups) * self.head_dim
    }

    /// The rotary dim (`int(head_dim * rotary_percent)`), 0 without rope.
    pub fn rotary_dim(&self) -> usize {
        self.rope
            .map_or(0, |r| rotary_dim(self.head_dim, r.rotary_percent))
    }
}

/// `int(head_dim * rotary_percent)`, as the reference system computes it.
pub fn rotary_dim(head_dim: usize, rotary_percent: f64) -> usize {
    let d = head_dim as f64 * rotary_percent;
    if d.is_finite() && d > 0.0 {
        d as usize
    } else {
        0
    }
}
