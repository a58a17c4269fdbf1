//! The attention spec model: what one `#[attention(...)]` line (or one `--spec` string)
//! means once it has been parsed and validated.
//!
//! The grammar that produces it lives in [`crate::grammar`], the rules that check it in
//! [`mod@crate::validate`]. Every field maps onto a Megatron-Core `TransformerConfig` field; the
//! field docs name it.

use std::fmt;

/// Head dims the kernels are rendered for. The one place this set is defined.
pub const SUPPORTED_HEAD_DIMS: &[usize] = &[32, 64, 80, 96, 128, 160, 192, 224, 256];

/// Self- or cross-attention (`SelfAttention` / `CrossAttention` in the reference system).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttentionKind {
    /// `self`: q, k and v all come from the hidden states through `linear_qkv`.
    SelfAttention,
    /// `cross`: q from the hidden states (`linear_q`), k and v from the context (`linear_kv`).
    CrossAttention,
}

/// The q/k normalization (`qk_layernorm` plus `normalization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QkNorm {
    /// `layer`: LayerNorm with weight and bias over the head dim.
    Layer,
    /// `rms`: `x / sqrt(mean(x^2) + eps) * w`.
    Rms,
    /// `l2`: `x * rsqrt(mean(x^2) + eps)`, no weight.
    L2,
}

/// Rotary layout (`rotary_interleaved`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RopeMode {
    /// `half` (default, LLaMA/NeoX): `t cos + rotate_half(t) sin`.
    Half,
    /// `interleaved` (RoFormer): adjacent pairs rotate together.
    Interleaved,
}

/// Rotary embedding settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    /// Layout of the rotated channels.
    pub mode: RopeMode,
    /// Fraction of the head dim that rotates (`rotary_percent`, default 1.0).
    pub rotary_percent: f64,
    /// Frequency base (`rotary_base`, default 10000).
    pub rotary_base: f64,
}

impl Default for Rope {
    fn default() -> Self {
        Rope {
            mode: RopeMode::Half,
            rotary_percent: 1.0,
            rotary_base: 10000.0,
        }
    }
}

/// `AttnMaskType` of the reference system; the discriminants match its enum values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MaskType {
    /// Caller-given boolean mask, true = masked out, broadcastable to `[b, 1|np, sq, sk]`.
    Padding = 1,
    /// Key `j` visible to query `i` iff `j <= i` (top-left aligned).
    Causal = 2,
    /// Nothing masked.
    NoMask = 3,
    /// Padding and causal together (the packed/THD form).
    PaddingCausal = 4,
    /// Caller-given general mask broadcastable to `[b, np, sq, sk]`.
    Arbitrary = 5,
    /// Key `j` visible to query `i` iff `j <= i + sk - sq`.
    CausalBottomRight = 6,
}

impl MaskType {
    /// Every mask type, in the reference system's order.
    pub const ALL: [MaskType; 6] = [
        MaskType::Padding,
        MaskType::Causal,
        MaskType::NoMask,
        MaskType::PaddingCausal,
        MaskType::Arbitrary,
        MaskType::CausalBottomRight,
    ];

    /// The spelling used in specs and kernel keys (`causal_bottom_right`, ...).
    pub fn name(self) -> &'static str {
        match self {
            MaskType::Padding => "padding",
            MaskType::Causal => "causal",
            MaskType::NoMask => "no_mask",
            MaskType::PaddingCausal => "padding_causal",
            MaskType::Arbitrary => "arbitrary",
            MaskType::CausalBottomRight => "causal_bottom_right",
        }
    }

    /// Parse the spec spelling.
    pub fn from_name(s: &str) -> Option<MaskType> {
        MaskType::ALL.into_iter().find(|m| m.name() == s)
    }

    /// Whether the mask hides keys right of the (top-left or bottom-right) diagonal.
    pub fn is_causal(self) -> bool {
        matches!(
            self,
            MaskType::Causal | MaskType::PaddingCausal | MaskType::CausalBottomRight
        )
    }

    /// Whether the caller supplies a boolean mask tensor at run time.
    pub fn takes_mask_tensor(self) -> bool {
        matches!(
            self,
            MaskType::Padding | MaskType::PaddingCausal | MaskType::Arbitrary
        )
    }

    /// Whether a sliding window may be combined with this mask. `arbitrary` already states
    /// every visible position, so a window on top of it is rejected.
    pub fn accepts_window(self) -> bool {
        !matches!(self, MaskType::Arbitrary)
    }
}

/// Sliding window `(left, right)`, bottom-right aligned; `-1` means unbounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    /// Keys visible to the left of the diagonal (`-1` = all).
    pub left: i64,
    /// Keys visible to the right of the diagonal (`-1` = all).
    pub right: i64,
}

/// Attention sinks (`softmax_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sinks {
    /// `off_by_one`: a zero logit column is added to every softmax row.
    OffByOne,
    /// `learnable`: a per-head learned logit column.
    Learnable,
}

/// Element type of activations and weights on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// bfloat16 (default).
    Bf16,
    /// IEEE half.
    F16,
}

impl DType {
    /// The spelling used in specs and kernel keys.
    pub fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
        }
    }
}

/// A submodule role that a spec may replace with a user type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Fused q/k/v projection (self-attention).
    LinearQkv,
    /// Query projection (cross-attention).
    LinearQ,
    /// Key/value projection (cross-attention).
    LinearKv,
    /// Output projection.
    LinearProj,
    /// The core attention (softmax(qk^T) v).
    CoreAttention,
    /// Query norm.
    QLayernorm,
    /// Key norm.
    KLayernorm,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 7] = [
        Role::LinearQkv,
        Role::LinearQ,
        Role::LinearKv,
        Role::LinearProj,
        Role::CoreAttention,
        Role::QLayernorm,
        Role::KLayernorm,
    ];

    /// The spec key and Megatron submodule name.
    pub fn name(self) -> &'static str {
        match self {
            Role::LinearQkv => "linear_qkv",
            Role::LinearQ => "linear_q",
            Role::LinearKv => "linear_kv",
            Role::LinearProj => "linear_proj",
            Role::CoreAttention => "core_attention",
            Role::QLayernorm => "q_layernorm",
            Role::KLayernorm => "k_layernorm",
        }
    }

    /// Parse the spec key.
    pub fn from_name(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }
}

/// A validated attention spec.
///
/// Dimensions left out at compile time (`heads`, `head_dim`, `hidden`) are `None`/empty and
/// come from the runtime config; a value given in both places must agree.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionSpec {
    /// Self or cross attention.
    pub kind: AttentionKind,
    /// `num_attention_heads` (np).
    pub heads: Option<usize>,
    /// `num_query_groups` (ng); `None` means `heads` (MHA).
    pub gqa: Option<usize>,
    /// `kv_channels` (hn). Several values render kernels for each; empty = from the config.
    pub head_dims: Vec<usize>,
    /// Hidden size h; `None` = `heads * head_dim`.
    pub hidden: Option<usize>,
    /// q/k norm, if any.
    pub qk_norm: Option<QkNorm>,
    /// `layernorm_epsilon` (default 1e-5).
    pub eps: f64,
    /// `add_bias_linear` (default true): biases on qkv and proj.
    pub bias: bool,
    /// `add_qkv_bias`: qkv bias even when `bias = false`.
    pub qkv_bias: bool,
    /// Rotary embedding, if any.
    pub rope: Option<Rope>,
    /// Mask types to render kernels for; the first is the layer's default mask.
    pub masks: Vec<MaskType>,
    /// Sliding window.
    pub window: Option<Window>,
    /// `softmax_scale`; `None` = `1/sqrt(head_dim)`.
    pub softmax_scale: Option<f64>,
    /// Attention sinks.
    pub sinks: Option<Sinks>,
    /// `attention_output_gate`.
    pub output_gate: bool,
    /// Element type.
    pub dtype: DType,
    /// Submodules replaced by user types: role and the type's path as written.
    pub overrides: Vec<(Role, String)>,
}

impl AttentionSpec {
    /// A spec with every default and no dimensions: the starting point of validation.
    pub fn new(kind: AttentionKind) -> Self {
        AttentionSpec {
            kind,
            heads: None,
            gqa: None,
            head_dims: Vec::new(),
            hidden: None,
            qk_norm: None,
            eps: 1e-5,
            bias: true,
            qkv_bias: false,
            rope: None,
            masks: vec![MaskType::Causal],
            window: None,
            softmax_scale: None,
            sinks: None,
            output_gate: false,
            dtype: DType::Bf16,
            overrides: Vec::new(),
        }
    }

    /// Whether `linear_qkv` (or `linear_q`/`linear_kv`) carries a bias.
    pub fn has_qkv_bias(&self) -> bool {
        self.bias || self.qkv_bias
    }

    /// The layer's default mask type (the first listed).
    pub fn default_mask(&self) -> MaskType {
        self.masks.first().copied().unwrap_or(MaskType::Causal)
    }

    /// The user type replacing `role`, if any.
    pub fn override_for(&self, role: Role) -> Option<&str> {
        self.overrides
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, p)| p.as_str())
    }
}

fn fmt_float(x: f64) -> String {
    let s = format!("{x:?}");
    if s.contains('.') || s.contains('e') || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}

/// The canonical spec string: every non-default item, in a fixed order. Parsing it back
/// gives an equal spec.
impl fmt::Display for AttentionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items: Vec<String> = vec![match self.kind {
            AttentionKind::SelfAttention => "self".into(),
            AttentionKind::CrossAttention => "cross".into(),
        }];
        if let Some(h) = self.heads {
            items.push(format!("heads = {h}"));
        }
        if let Some(g) = self.gqa {
            items.push(format!("gqa = {g}"));
        }
        match self.head_dims.as_slice() {
            [] => {}
            [d] => items.push(format!("head_dim = {d}")),
            ds => items.push(format!(
                "head_dim = [{}]",
                ds.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
        if let Some(h) = self.hidden {
            items.push(format!("hidden = {h}"));
        }
        if let Some(n) = self.qk_norm {
            items.push(
                match n {
                    QkNorm::Layer => "qk_layernorm = layer",
                    QkNorm::Rms => "qk_layernorm = rms",
                    QkNorm::L2 => "qk_layernorm = l2",
                }
                .into(),
            );
        }
        if self.eps != 1e-5 {
            items.push(format!("eps = {}", fmt_float(self.eps)));
        }
        if !self.bias {
            items.push("bias = false".into());
        }
        if self.qkv_bias {
            items.push("qkv_bias".into());
        }
        if let Some(r) = self.rope {
            items.push(
                match r.mode {
                    RopeMode::Half => "rope = half",
                    RopeMode::Interleaved => "rope = interleaved",
                }
                .into(),
            );
            if r.rotary_percent != 1.0 {
                items.push(format!("rotary_percent = {}", fmt_float(r.rotary_percent)));
            }
            if r.rotary_base != 10000.0 {
                items.push(format!("rotary_base = {}", fmt_float(r.rotary_base)));
            }
        }
        match self.masks.as_slice() {
            [MaskType::Causal] => {}
            [m] => items.push(format!("mask = {}", m.name())),
            ms => items.push(format!(
                "mask = [{}]",
                ms.iter().map(|m| m.name()).collect::<Vec<_>>().join(", ")
            )),
        }
        if let Some(w) = self.window {
            items.push(format!("window = ({}, {})", w.left, w.right));
        }
        if let Some(s) = self.softmax_scale {
            items.push(format!("softmax_scale = {}", fmt_float(s)));
        }
        if let Some(s) = self.sinks {
            items.push(
                match s {
                    Sinks::OffByOne => "sinks = off_by_one",
                    Sinks::Learnable => "sinks = learnable",
                }
                .into(),
            );
        }
        if self.output_gate {
            items.push("output_gate".into());
        }
        if self.dtype != DType::Bf16 {
            items.push(format!("dtype = {}", self.dtype.name()));
        }
        for (role, path) in &self.overrides {
            items.push(format!("{} = {}", role.name(), path));
        }
        f.write_str(&items.join(", "))
    }
}
