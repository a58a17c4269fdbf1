//! Submodule roles and their default implementations.
//!
//! A layer is assembled from role objects: [`LinearModule`] (`linear_qkv`, `linear_q`,
//! `linear_kv`, `linear_proj`), [`NormModule`] (`q_layernorm`, `k_layernorm`) and
//! [`CoreAttentionModule`] (`core_attention`). A spec may replace any of them with a user type
//! implementing the role trait and [`Submodule`] (construction from a config or from weights).
//!
//! Defaults: [`Linear`], [`QkNormLayer`], [`DotProductAttention`].

use attention_codegen::{MaskType, QkNorm, Role, Sinks, Window};

use crate::config::LayerConfig;
use crate::error::{AttnError, Result};
use crate::layer::PackedSeqParams;
use crate::reference::{self, AttendParams, SeqDims, SinkLogits};
use crate::tensor::Tensor;
use crate::weights::WeightStore;

/// How a submodule runs on the CUDA backend: as the device's kernels for its role (cuBLASLt
/// GEMMs for linears, the fused `qkv_prep` norm, the attention kernels), fed with these
/// parameters.
///
/// The default submodules implement it with their own parameters. A user submodule that
/// overrides a role runs on a GPU only when it implements this trait and returns it from
/// its role trait's `cuda()` method; otherwise moving the layer to a GPU
/// ([`CudaLayer::new`](crate::cuda::CudaLayer::new)) is an
/// [`crate::AttnError::NoBackendImpl`] naming the role, never a
/// silent run of the default math. A module whose CPU math differs from its role's default
/// (quantized weights, adapters, ...) implements it by returning the parameters in the default
/// layout that reproduce its math (e.g. dequantized or merged weights), or does not implement
/// it at all.
pub trait CudaSubmodule {
    /// The parameters under their names relative to the module, in the default module's
    /// layout: linears `weight` `[out, in]` and `bias` `[out]`; norms `weight` / `bias`
    /// `[hn]`; core attention `softmax_offset` `[np]` (learnable sinks only).
    fn cuda_state_dict(&self) -> Result<Vec<(String, Tensor)>>;
}

/// How a submodule takes part in a backward (crate::train): its math IS its role's default
/// math (the [`Linear`], [`QkNormLayer`], [`DotProductAttention`] formulas) over these
/// parameters, which are its own trainable parameters, so their gradients are the module's.
///
/// The default submodules implement it. A user submodule with other math does not (a
/// backward through it is an [`AttnError::NoBackendImpl`]): unlike
/// [`CudaSubmodule`], equivalent parameters are not enough, the gradient must be of the
/// module's own parameters.
pub trait TrainSubmodule {
    /// The trainable parameters under their names relative to the module, in the default
    /// module's layout: linears `weight` `[out, in]` and `bias` `[out]`; norms `weight` /
    /// `bias` `[hn]`; core attention `softmax_offset` `[np]` (learnable sinks only).
    fn train_state_dict(&self) -> Result<Vec<(String, Tensor)>>;
}

/// A linear projection `y = x W^T`, its bias kept apart (the layer adds it where the reference
/// system does, and returns `linear_proj`'s bias unadded).
pub trait LinearModule: Send + Sync {
    /// Input features.
    fn in_features(&self) -> usize;
    /// Output features.
    fn out_features(&self) -> usize;
    /// `x` `[n, in]` -> `x W^T` `[n, out]`, WITHOUT the bias.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// The bias `[out]`, if any.
    fn bias(&self) -> Option<&Tensor>;
    /// The parameters under their names relative to the module (`weight`, `bias`), for
    /// saving. Default: none.
    fn state_dict(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    /// This module's CUDA implementation, if it has one (see [`CudaSubmodule`]). Default:
    /// none, so a layer holding it cannot move to a GPU.
    fn cuda(&self) -> Option<&dyn CudaSubmodule> {
        None
    }
    /// This module's training-side view, if it has one (see [`TrainSubmodule`]). Default:
    /// none, so a backward through a layer holding it is an
    /// [`AttnError::NoBackendImpl`] naming the role.
    fn train(&self) -> Option<&dyn TrainSubmodule> {
        None
    }
    /// The weight `[out, in]` (row-major, the default layout) that [`forward`](Self::forward)
    /// reads, mutably, for in-place training updates: QK-Clip rescales rows of
    /// `linear_qkv`'s ([`crate::train::qk_clip`]). Return it only when changing it changes
    /// the module's math accordingly (as [`TrainSubmodule`]'s parameters are the module's
    /// own). Default: none (a layer whose `linear_qkv` has none cannot be clipped:
    /// [`AttnError::NoBackendImpl`]).
    fn weight_mut(&mut self) -> Option<&mut Tensor> {
        None
    }
}

/// A norm over the last dim.
pub trait NormModule: Send + Sync {
    /// `x` `[n, hn]` -> normalized `[n, hn]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// The parameters under their names relative to the module. Default: none.
    fn state_dict(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    /// This module's CUDA implementation, if it has one (see [`CudaSubmodule`]). Default:
    /// none, so a layer holding it cannot move to a GPU.
    fn cuda(&self) -> Option<&dyn CudaSubmodule> {
        None
    }
    /// This module's training-side view, if it has one (see [`TrainSubmodule`]). Default:
    /// none, so a backward through a layer holding it is an
    /// [`AttnError::NoBackendImpl`] naming the role.
    fn train(&self) -> Option<&dyn TrainSubmodule> {
        None
    }
}

/// Arguments of a core attention call.
#[derive(Clone, Copy)]
pub struct CoreArgs<'a> {
    /// The mask type in force (the layer default or the call's override).
    pub mask_type: MaskType,
    /// Sliding window, bottom-right aligned.
    pub window: Option<Window>,
    /// Boolean mask as f32 (nonzero = masked out), broadcastable to `[b, np|1, sq, sk]`
    /// (packed: `[n_seqs, np|1, max_seqlen_q, max_seqlen_kv]`). Only for mask types that
    /// take a tensor (`padding`, `padding_causal`, `arbitrary`).
    pub attention_mask: Option<&'a Tensor>,
    /// Additive post-scale bias broadcastable to `[b, np, sq, sk]` (packed: as the mask).
    /// `-inf` masks a key like the mask does (a row masked entirely gives zeros, LSE `-inf`);
    /// a finite bias, even `f32::MIN` (Hugging Face's `finfo(float32).min` masks), stays a
    /// finite logit (the CUDA kernels saturate logits at +-2^126 so nothing overflows).
    /// Whatever the bias holds at masked positions is never used.
    pub attention_bias: Option<&'a Tensor>,
    /// Packed (THD) layout: q `[t, np, hn]`, k/v `[tk, ng, hn]` split by `cu_seqlens_q` /
    /// `cu_seqlens_kv`.
    pub packed: Option<PackedSeqParams<'a>>,
}

impl<'a> CoreArgs<'a> {
    /// Args with `mask_type` and nothing else.
    pub fn new(mask_type: MaskType) -> Self {
        CoreArgs {
            mask_type,
            window: None,
            attention_mask: None,
            attention_bias: None,
            packed: None,
        }
    }
}

/// Core attention: `softmax(q k^T * scale + bias + mask) v` per query head.
pub trait CoreAttentionModule: Send + Sync {
    /// Padded: q `[sq, b, np, hn]`, k/v `[sk, b, ng, hn]` -> `[sq, b, np, hn]`.
    /// Packed (`args.packed`): q `[t, np, hn]`, k/v `[tk, ng, hn]` -> `[t, np, hn]`.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, args: &CoreArgs<'_>) -> Result<Tensor>;
    /// The parameters under their names relative to the module. Default: none.
    fn state_dict(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    /// This module's CUDA implementation, if it has one (see [`CudaSubmodule`]). Default:
    /// none, so a layer holding it cannot move to a GPU.
    fn cuda(&self) -> Option<&dyn CudaSubmodule> {
        None
    }
    /// This module's training-side view, if it has one (see [`TrainSubmodule`]). Default:
    /// none, so a backward through a layer holding it is an
    /// [`AttnError::NoBackendImpl`] naming the role.
    fn train(&self) -> Option<&dyn TrainSubmodule> {
        None
    }
}

/// Construction of a role object, used by generated layers.
pub trait Submodule: Sized {
    /// A freshly initialized module for `role` under `cfg`, deterministic in `seed`.
    fn init(cfg: &LayerConfig, role: Role, seed: u64) -> Result<Self>;
    /// The module for `role` loaded from `weights`: keys are `{prefix}{role name}.{param}`
    /// (`prefix` is the layer's, e.g. `decoder.layers.0.self_attention.`, or empty).
    fn load(cfg: &LayerConfig, role: Role, weights: &WeightStore, prefix: &str) -> Result<Self>;
}

/// A tiny deterministic generator (SplitMix64) for weight initialization.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[-1, 1)`.
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f64 / (1u64 << 23) as f64 - 1.0) as f32
    }
}

fn role_seed(seed: u64, role: Role) -> u64 {
    let r = Role::ALL.iter().position(|x| *x == role).unwrap_or(0) as u64 + 1;
    SplitMix64::new(seed ^ r.wrapping_mul(0xA24B_AED4_963E_E407)).next_u64()
}

fn wrong_role(what: &str, role: Role) -> AttnError {
    AttnError::InvalidArgument {
        arg: "role".into(),
        expected: what.into(),
        got: role.name().into(),
    }
}

/// `(out, in, has_bias)` of the linear for `role` under `cfg`.
pub fn linear_shape(cfg: &LayerConfig, role: Role) -> Result<(usize, usize, bool)> {
    let (np, hn, h) = (cfg.heads, cfg.head_dim, cfg.hidden);
    Ok(match role {
        Role::LinearQkv => (cfg.qkv_out_features(), h, cfg.qkv_bias),
        Role::LinearQ => (np * hn, h, cfg.qkv_bias),
        Role::LinearKv => (2 * np * hn, h, cfg.qkv_bias),
        Role::LinearProj => (h, np * hn, cfg.proj_bias),
        r => {
            return Err(wrong_role(
                "linear_qkv, linear_q, linear_kv or linear_proj",
                r,
            ))
        }
    })
}

/// The default linear: weight `[out, in]`, optional bias `[out]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// A linear over `weight` `[out, in]` and `bias` `[out]`. Errors on other shapes.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        weight.expect_shape("weight", &[None, None])?;
        if let Some(b) = &bias {
            b.expect_shape("bias", &[Some(weight.shape()[0])])?;
        }
        Ok(Linear { weight, bias })
    }
}

impl LinearModule for Linear {
    fn cuda(&self) -> Option<&dyn CudaSubmodule> {
        Some(self)
    }
    fn train(&self) -> Option<&dyn TrainSubmodule> {
        Some(self)
    }
    fn in_features(&self) -> usize {
        self.weight.shape()[1]
    }
    fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (o, i) = (self.out_features(), self.in_features());
        x.expect_shape("x", &[None, Some(i)])?;
        let n = x.shape()[0];
        let y = reference::linear(x.data(), self.weight.data(), None, n, i, o)?;
        Tensor::new(&[n, o], y)
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    fn weight_mut(&mut self) -> Option<&mut Tensor> {
        Some(&mut self.weight)
    }
    fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![("weight".to_string(), self.weight.clone())];
        if let Some(b) = &self.bias {
            v.push(("bias".to_string(), b.clone()));
        }
        v
    }
}

impl Submodule for Linear {
    /// Weights uniform with standard deviation `1/sqrt(in)`, biases uniform in `[-0.1, 0.1)`.
    fn init(cfg: &LayerConfig, role: Role, seed: u64) -> Result<Self> {
        let (o, i, has_bias) = linear_shape(cfg, role)?;
        let mut rng = SplitMix64::new(role_seed(seed, role));
        let a = (3.0 / i as f32).sqrt();
        // Fallible: a layer too large for the host is an error, not an abort.
        let weight = Tensor::try_from_fn(&[o, i], |_| rng.uniform() * a)?;
        let bias = if has_bias {
            Some(Tensor::try_from_fn(&[o], |_| rng.uniform() * 0.1)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }
    fn load(cfg: &LayerConfig, role: Role, weights: &WeightStore, prefix: &str) -> Result<Self> {
        let (o, i, has_bias) = linear_shape(cfg, role)?;
        let weight = weights.get(&format!("{prefix}{}.weight", role.name()), &[o, i])?;
        let bias = if has_bias {
            Some(weights.get(&format!("{prefix}{}.bias", role.name()), &[o])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }
}

/// The default q/k norm over the head dim: LayerNorm (weight and bias `[hn]`), RMSNorm
/// (weight `[hn]`) or L2 (no parameters).
#[derive(Debug, Clone, PartialEq)]
pub struct QkNormLayer {
    /// Which norm.
    pub kind: QkNorm,
    /// Epsilon.
    pub eps: f32,
    /// Head dim.
    pub head_dim: usize,
    /// `[hn]` (LayerNorm and RMSNorm).
    pub weight: Option<Tensor>,
    /// `[hn]` (LayerNorm).
    pub bias: Option<Tensor>,
}

fn norm_kind(cfg: &LayerConfig, role: Role) -> Result<QkNorm> {
    if !matches!(role, Role::QLayernorm | Role::KLayernorm) {
        return Err(wrong_role("q_layernorm or k_layernorm", role));
    }
    cfg.qk_norm.ok_or_else(|| AttnError::InvalidArgument {
        arg: "qk_layernorm".into(),
        expected: "a q/k norm in the spec to build q_layernorm/k_layernorm".into(),
        got: "none".into(),
    })
}

impl NormModule for QkNormLayer {
    fn cuda(&self) -> Option<&dyn CudaSubmodule> {
        Some(self)
    }
    fn train(&self) -> Option<&dyn TrainSubmodule> {
        Some(self)
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.expect_shape("x", &[None, Some(self.head_dim)])?;
        let mut y = x.clone();
        reference::normalize_rows(
            y.data_mut(),
            self.head_dim,
            self.kind,
            self.eps,
            self.weight.as_ref().map(Tensor::data),
            self.bias.as_ref().map(Tensor::data),
        )?;
        Ok(y)
    }
    fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        if let Some(w) = &self.weight {
            v.push(("weight".to_string(), w.clone()));
        }
        if let Some(b) = &self.bias {
            v.push(("bias".to_string(), b.clone()));
        }
        v
    }
}

impl Submodule for QkNormLayer {
    /// Weights `1 + u/10`, biases `u/10`, `u` uniform in `[-1, 1)`.
    fn init(cfg: &LayerConfig, role: Role, seed: u64) -> Result<Self> {
        let kind = norm_kind(cfg, role)?;
        let hn = cfg.head_dim;
        let mut rng = SplitMix64::new(role_seed(seed, role));
        let weight =
            (kind != QkNorm::L2).then(|| Tensor::from_fn(&[hn], |_| 1.0 + 0.1 * rng.uniform()));
        let bias = (kind == QkNorm::Layer).then(|| Tensor::from_fn(&[hn], |_| 0.1 * rng.uniform()));
        Ok(QkNormLayer {
            kind,
            eps: cfg.eps,
            head_dim: hn,
            weight,
            bias,
        })
    }
    fn load(cfg: &LayerConfig, role: Role, weights: &WeightStore, prefix: &str) -> Result<Self> {
        let kind = norm_kind(cfg, role)?;
        let hn = cfg.head_dim;
        let key = |p: &str| format!("{prefix}{}.{p}", role.name());
        let weight = if kind != QkNorm::L2 {
            Some(weights.get(&key("weight"), &[hn])?)
        } else {
            None
        };
        let bias = if kind == QkNorm::Layer {
            Some(weights.get(&key("bias"), &[hn])?)
        } else {
            None
        };
        Ok(QkNormLayer {
            kind,
            eps: cfg.eps,
            head_dim: hn,
            weight,
            bias,
        })
    }
}

/// The default core attention (the CPU reference). Holds the learnable sink logits
/// (`core_attention.softmax_offset`, `[np]`) when `sinks = learnable`.
#[derive(Debug, Clone, PartialEq)]
pub struct DotProductAttention {
    /// Query heads np.
    pub heads: usize,
    /// Groups ng.
    pub groups: usize,
    /// Head dim hn.
    pub head_dim: usize,
    /// Softmax scale.
    pub scale: f32,
    /// Sink type.
    pub sinks: Option<Sinks>,
    /// Learnable sink logits `[np]`.
    pub softmax_offset: Option<Tensor>,
}

impl Submodule for DotProductAttention {
    /// Learnable sink logits uniform in `[-1, 1)`.
    fn init(cfg: &LayerConfig, role: Role, seed: u64) -> Result<Self> {
        if role != Role::CoreAttention {
            return Err(wrong_role("core_attention", role));
        }
        let mut rng = SplitMix64::new(role_seed(seed, role));
        let softmax_offset = (cfg.sinks == Some(Sinks::Learnable))
            .then(|| Tensor::from_fn(&[cfg.heads], |_| rng.uniform()));
        Ok(DotProductAttention {
            heads: cfg.heads,
            groups: cfg.groups,
            head_dim: cfg.head_dim,
            scale: cfg.softmax_scale,
            sinks: cfg.sinks,
            softmax_offset,
        })
    }
    fn load(cfg: &LayerConfig, role: Role, weights: &WeightStore, prefix: &str) -> Result<Self> {
        let mut m = Self::init(cfg, role, 0)?;
        if cfg.sinks == Some(Sinks::Learnable) {
            m.softmax_offset = Some(weights.get(
                &format!("{prefix}core_attention.softmax_offset"),
                &[cfg.heads],
            )?);
        }
        Ok(m)
    }
}

/// A tensor broadcast (right-aligned, size-1 dims repeat) to a 4-d shape.
struct Bcast<'a> {
    data: &'a [f32],
    strides: [usize; 4],
}

impl<'a> Bcast<'a> {
    fn new(arg: &str, t: &'a Tensor, target: [usize; 4]) -> Result<Self> {
        Ok(Bcast {
            data: t.data(),
            strides: crate::tensor::broadcast_strides(arg, t.shape(), target)?,
        })
    }
    fn at(&self, b: usize, h: usize, i: usize, j: usize) -> f32 {
        let s = &self.strides;
        self.data[b * s[0] + h * s[1] + i * s[2] + j * s[3]]
    }
}

/// The optional attention mask (nonzero = masked out) and additive bias of a call, each
/// broadcast to `[N, np, sq, sk]` (`N` batch entries or packed sequences).
struct EntryMasks<'a> {
    mask: Option<Bcast<'a>>,
    bias: Option<Bcast<'a>>,
}

impl<'a> EntryMasks<'a> {
    /// Broadcast `mask` (`attention_mask`) then `bias` (`attention_bias`) to `target`.
    fn new(mask: Option<&'a Tensor>, bias: Option<&'a Tensor>, target: [usize; 4]) -> Result<Self> {
        Ok(EntryMasks {
            mask: mask
                .map(|m| Bcast::new("attention_mask", m, target))
                .transpose()?,
            bias: bias
                .map(|m| Bcast::new("attention_bias", m, target))
                .transpose()?,
        })
    }

    /// [`reference::attend_sequence`] of entry `n` (`q`, `k`, `v` its rows), with `p` plus
    /// entry `n`'s slice of the mask and bias.
    fn attend(
        &self,
        n: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dims: SeqDims,
        p: &AttendParams<'_>,
    ) -> Result<reference::AttendOutput> {
        let mf = self
            .mask
            .as_ref()
            .map(|m| move |h: usize, i: usize, j: usize| m.at(n, h, i, j) != 0.0);
        let bf = self
            .bias
            .as_ref()
            .map(|m| move |h: usize, i: usize, j: usize| m.at(n, h, i, j));
        let mut pn = *p;
        pn.mask_fn = mf.as_ref().map(|f| f as reference::MaskFn<'_>);
        pn.bias_fn = bf.as_ref().map(|f| f as reference::BiasFn<'_>);
        reference::attend_sequence(q, k, v, dims, &pn)
    }
}

/// Validate a cumulative length list against `total` tokens, naming `arg`: length `n + 1 >= 2`,
/// first 0, non-decreasing, last == `total`. Returns it as `usize`.
pub fn check_cu_seqlens(arg: &str, cu: &[i32], total: usize) -> Result<Vec<usize>> {
    let err = |expected: &str| AttnError::CuSeqlens {
        arg: arg.into(),
        expected: expected.into(),
        got: cu.iter().map(|&x| x as i64).collect(),
    };
    if cu.len() < 2 {
        return Err(err("length n + 1 >= 2"));
    }
    if cu[0] != 0 {
        return Err(err("first entry 0"));
    }
    if cu.windows(2).any(|w| w[1] < w[0]) {
        return Err(err("non-decreasing"));
    }
    if cu[cu.len() - 1] as i64 != total as i64 {
        return Err(err(&format!("last entry == total tokens {total}")));
    }
    Ok(cu.iter().map(|&x| x as usize).collect())
}

impl DotProductAttention {
    fn sink_logits(&self) -> Result<Option<SinkLogits<'_>>> {
        Ok(match self.sinks {
            None => None,
            Some(Sinks::OffByOne) => Some(SinkLogits::OffByOne),
            Some(Sinks::Learnable) => match &self.softmax_offset {
                Some(t) => Some(SinkLogits::PerHead(t.data())),
                None => {
                    return Err(AttnError::InvalidArgument {
                        arg: "core_attention.softmax_offset".into(),
                        expected: format!("[{}] learnable sink logits", self.heads),
                        got: "none".into(),
                    })
                }
            },
        })
    }
}

impl CoreAttentionModule for DotProductAttention {
    fn cuda(&self) -> Option<&dyn CudaSubmodule> {
        Some(self)
    }
    fn train(&self) -> Option<&dyn TrainSubmodule> {
        Some(self)
    }
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, args: &CoreArgs<'_>) -> Result<Tensor> {
        let (np, ng, hn) = (self.heads, self.groups, self.head_dim);
        let sinks = self.sink_logits()?;
        let mask_t = if args.mask_type.takes_mask_tensor() {
            args.attention_mask
        } else {
            None
        };
        if args.attention_mask.is_some() && !args.mask_type.takes_mask_tensor() {
            return Err(AttnError::InvalidArgument {
                arg: "attention_mask".into(),
                expected:
                    "none for this mask type (only padding, padding_causal, arbitrary take a mask)"
                        .into(),
                got: format!("a mask tensor with mask type {}", args.mask_type.name()),
            });
        }
        let mut p = AttendParams::new(self.scale, args.mask_type);
        p.window = args.window;
        p.sinks = sinks;
        match &args.packed {
            None => {
                q.expect_shape("q", &[None, None, Some(np), Some(hn)])?;
                let (sq, b) = (q.shape()[0], q.shape()[1]);
                k.expect_shape("k", &[None, Some(b), Some(ng), Some(hn)])?;
                let sk = k.shape()[0];
                v.expect_shape("v", &[Some(sk), Some(b), Some(ng), Some(hn)])?;
                let masks = EntryMasks::new(mask_t, args.attention_bias, [b, np, sq, sk])?;
                let dims = SeqDims {
                    sq,
                    sk,
                    heads: np,
                    groups: ng,
                    head_dim: hn,
                };
                let mut out = Tensor::zeros(&[sq, b, np, hn]);
                let (qw, kw) = (np * hn, ng * hn);
                for bi in 0..b {
                    let gather = |t: &Tensor, s: usize, w: usize| -> Vec<f32> {
                        (0..s)
                            .flat_map(|i| t.data()[(i * b + bi) * w..][..w].iter().copied())
                            .collect()
                    };
                    let (qb, kb, vb) = (gather(q, sq, qw), gather(k, sk, kw), gather(v, sk, kw));
                    let r = masks.attend(bi, &qb, &kb, &vb, dims, &p)?;
                    for i in 0..sq {
                        out.data_mut()[(i * b + bi) * qw..][..qw]
                            .copy_from_slice(&r.out[i * qw..][..qw]);
                    }
                }
                Ok(out)
            }
            Some(pk) => {
                q.expect_shape("q", &[None, Some(np), Some(hn)])?;
                k.expect_shape("k", &[None, Some(ng), Some(hn)])?;
                let tk = k.shape()[0];
                v.expect_shape("v", &[Some(tk), Some(ng), Some(hn)])?;
                let cq = check_cu_seqlens("cu_seqlens_q", pk.cu_seqlens_q, q.shape()[0])?;
                let ck = check_cu_seqlens("cu_seqlens_kv", pk.cu_seqlens_kv, tk)?;
                if cq.len() != ck.len() {
                    return Err(AttnError::CuSeqlens {
                        arg: "cu_seqlens_kv".into(),
                        expected: format!("{} entries, as cu_seqlens_q", cq.len()),
                        got: pk.cu_seqlens_kv.iter().map(|&x| x as i64).collect(),
                    });
                }
                let n = cq.len() - 1;
                let mq = (0..n)
                    .map(|s| cq[s + 1] - cq[s])
                    .max()
                    .unwrap_or(0)
                    .max(pk.max_seqlen_q);
                let mk = (0..n)
                    .map(|s| ck[s + 1] - ck[s])
                    .max()
                    .unwrap_or(0)
                    .max(pk.max_seqlen_kv);
                let masks = EntryMasks::new(mask_t, args.attention_bias, [n, np, mq, mk])?;
                let mut out = Tensor::zeros(q.shape());
                let (qw, kw) = (np * hn, ng * hn);
                for s in 0..n {
                    let (q0, q1, k0, k1) = (cq[s], cq[s + 1], ck[s], ck[s + 1]);
                    let dims = SeqDims {
                        sq: q1 - q0,
                        sk: k1 - k0,
                        heads: np,
                        groups: ng,
                        head_dim: hn,
                    };
                    let r = masks.attend(
                        s,
                        &q.data()[q0 * qw..q1 * qw],
                        &k.data()[k0 * kw..k1 * kw],
                        &v.data()[k0 * kw..k1 * kw],
                        dims,
                        &p,
                    )?;
                    out.data_mut()[q0 * qw..q1 * qw].copy_from_slice(&r.out);
                }
                Ok(out)
            }
        }
    }
    fn state_dict(&self) -> Vec<(String, Tensor)> {
        self.softmax_offset
            .iter()
            .map(|t| ("softmax_offset".to_string(), t.clone()))
            .collect()
    }
}

impl CudaSubmodule for Linear {
    fn cuda_state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(<Self as LinearModule>::state_dict(self))
    }
}

impl CudaSubmodule for QkNormLayer {
    fn cuda_state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(<Self as NormModule>::state_dict(self))
    }
}

impl CudaSubmodule for DotProductAttention {
    fn cuda_state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(<Self as CoreAttentionModule>::state_dict(self))
    }
}

impl TrainSubmodule for Linear {
    fn train_state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(<Self as LinearModule>::state_dict(self))
    }
}

impl TrainSubmodule for QkNormLayer {
    fn train_state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(<Self as NormModule>::state_dict(self))
    }
}

impl TrainSubmodule for DotProductAttention {
    fn train_state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(<Self as CoreAttentionModule>::state_dict(self))
    }
}
