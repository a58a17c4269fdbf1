//! Hugging Face attention weight names, mapped to and from the layer's own (Megatron-Core)
//! layout.
//!
//! The prefix names the attention module of one layer, as Megatron's does
//! (`decoder.layers.0.self_attention.`); under it each family keeps its own names:
//!
//! | family | models | module | tensors under the module (`nn.Linear` `[out, in]` unless noted) |
//! | --- | --- | --- | --- |
//! | [`HfFamily::Llama`] | Llama, Mistral, Qwen2, Qwen3 (gpt-oss's `sinks` too) | `model.layers.N.self_attn.` | `q_proj` `[np hn, h]`, `k_proj`/`v_proj` `[ng hn, h]`, `o_proj` `[h, np hn]`, each `.weight` and, where the spec has it, `.bias`; `q_norm`/`k_norm` `.weight` `[hn]` (Qwen3); `sinks` `[np]` |
//! | [`HfFamily::Gpt2`] | GPT-2 | `h.N.attn.` | `c_attn` (Conv1D: weight `[h, 3 np hn]` = `[in, out]`, output columns `[q \| k \| v]`), `c_proj` (Conv1D `[np hn, h]`), biases `[out]` |
//! | [`HfFamily::Bert`] | BERT, MiniLM | `encoder.layer.N.attention.` | `self.query`, `self.key`, `self.value` `[np hn, h]`, `output.dense` `[h, np hn]`, biases |
//!
//! Loading fuses q, k and v into `linear_qkv`'s GQA-interleaved rows (per group `g`: the
//! `np/ng` query heads `g np/ng ..`, then key head `g`, then value head `g`, each `hn` rows;
//! the split in [`crate::layer`] reads them back in that order), transposes Conv1D weights,
//! renames `o_proj`/`c_proj`/`output.dense` to `linear_proj`, `q_norm`/`k_norm` to
//! `q_layernorm`/`k_layernorm` and `sinks` to `core_attention.softmax_offset`. Saving
//! ([`from_megatron`]) is the exact inverse: only rows move, so a round trip is bitwise.
//!
//! Errors name the key and the family: [`AttnError::HfMissingWeight`],
//! [`AttnError::HfExtraWeight`] (a tensor under the prefix that the spec does not use, such as a
//! bias the spec lacks), [`AttnError::HfWeightShape`], [`AttnError::HfFamilyNotFound`];
//! [`AttnError::InvalidArgument`] for a spec the family cannot express (cross-attention, an
//! output gate, GQA in GPT-2 or BERT).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use attention_codegen::{AttentionKind, QkNorm, Sinks};

use crate::config::LayerConfig;
use crate::error::{AttnError, Result};
use crate::tensor::Tensor;
use crate::weights::WeightStore;

/// A family of Hugging Face checkpoints that share attention weight names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HfFamily {
    /// Llama, Mistral, Qwen2, Qwen3: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `q_norm`,
    /// `k_norm` (and `sinks`).
    Llama,
    /// GPT-2: `c_attn`, `c_proj` (Conv1D, weights stored `[in, out]`).
    Gpt2,
    /// BERT: `self.query`, `self.key`, `self.value`, `output.dense`.
    Bert,
}

impl HfFamily {
    /// Every family, in detection order.
    pub const ALL: [HfFamily; 3] = [HfFamily::Llama, HfFamily::Gpt2, HfFamily::Bert];

    /// The short name used by `--names hf:NAME` (`llama`, `gpt2`, `bert`).
    pub fn name(self) -> &'static str {
        match self {
            HfFamily::Llama => "llama",
            HfFamily::Gpt2 => "gpt2",
            HfFamily::Bert => "bert",
        }
    }

    /// The models that use these names, in words.
    pub fn models(self) -> &'static str {
        match self {
            HfFamily::Llama => "Llama/Mistral/Qwen2/Qwen3",
            HfFamily::Gpt2 => "GPT-2",
            HfFamily::Bert => "BERT/MiniLM",
        }
    }

    /// The attention module's name inside a transformer block (`self_attn.`, `attn.`,
    /// `attention.`): detection also looks there when the prefix names the block.
    pub fn module(self) -> &'static str {
        match self {
            HfFamily::Llama => "self_attn.",
            HfFamily::Gpt2 => "attn.",
            HfFamily::Bert => "attention.",
        }
    }

    /// The key (under the prefix) whose presence identifies the family.
    fn marker(self) -> &'static str {
        match self {
            HfFamily::Llama => "q_proj.weight",
            HfFamily::Gpt2 => "c_attn.weight",
            HfFamily::Bert => "self.query.weight",
        }
    }

    /// Tensors under the attention module that are not parameters of the attention layer
    /// and are skipped: Llama's old `rotary_emb.inv_freq` buffer, GPT-2's causal-mask
    /// buffers, BERT's post-attention LayerNorm (applied after the residual, outside the layer).
    fn not_ours(self) -> &'static [&'static str] {
        match self {
            HfFamily::Llama => &["rotary_emb.inv_freq"],
            HfFamily::Gpt2 => &["bias", "masked_bias"],
            HfFamily::Bert => &["output.LayerNorm.weight", "output.LayerNorm.bias"],
        }
    }
}

impl fmt::Display for HfFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.models())
    }
}

impl FromStr for HfFamily {
    type Err = AttnError;
    /// `llama`, `gpt2` or `bert` (also `mistral`, `qwen2`, `qwen3` for `llama`, `minilm`
    /// for `bert`).
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "llama" | "mistral" | "qwen2" | "qwen3" => HfFamily::Llama,
            "gpt2" => HfFamily::Gpt2,
            "bert" | "minilm" => HfFamily::Bert,
            other => {
                return Err(AttnError::InvalidArgument {
                    arg: "hf family".into(),
                    expected: "llama (mistral, qwen2, qwen3), gpt2 or bert (minilm)".into(),
                    got: other.into(),
                })
            }
        })
    }
}

/// Where one layer's Hugging Face attention weights are: the family and the prefix of the
/// attention module (the prefix given, or it with [`HfFamily::module`] appended).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfLayout {
    /// The family found (or given).
    pub family: HfFamily,
    /// The attention module's prefix, e.g. `encoder.layer.0.attention.`.
    pub prefix: String,
}

impl fmt::Display for HfLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} names under `{}`", self.family, self.prefix)
    }
}

fn keys_under(store: &WeightStore, prefix: &str) -> Vec<String> {
    store
        .keys()
        .filter(|k| k.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// The layout of `family` at `prefix` or at `prefix` + [`HfFamily::module`], whichever holds
/// the family's marker key (`q_proj.weight`, `c_attn.weight`, `self.query.weight`).
fn locate(store: &WeightStore, prefix: &str, family: HfFamily) -> Option<HfLayout> {
    [prefix.to_string(), format!("{prefix}{}", family.module())]
        .into_iter()
        .find(|p| store.contains(&format!("{p}{}", family.marker())))
        .map(|prefix| HfLayout { family, prefix })
}

/// The Hugging Face family whose attention weights sit under `prefix` (the attention module's
/// prefix, or the transformer block's: `model.layers.0.` finds `model.layers.0.self_attn.`).
///
/// Errors: [`AttnError::HfFamilyNotFound`] (naming the prefix and the keys seen there) when no
/// family's marker key is there; [`AttnError::InvalidArgument`] (`prefix`) when two are.
pub fn detect(store: &WeightStore, prefix: &str) -> Result<HfLayout> {
    let found: Vec<HfLayout> = HfFamily::ALL
        .iter()
        .filter_map(|&f| locate(store, prefix, f))
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => {
            let keys = keys_under(store, prefix);
            let shown: Vec<&str> = keys.iter().take(8).map(String::as_str).collect();
            Err(AttnError::HfFamilyNotFound {
                prefix: prefix.into(),
                source_name: store.source_name().into(),
                expected: HfFamily::ALL
                    .iter()
                    .map(|f| format!("`{}{}` ({})", f.module(), f.marker(), f.name()))
                    .collect::<Vec<_>>()
                    .join(", "),
                got: if keys.is_empty() {
                    "none".into()
                } else {
                    format!(
                        "{} keys: {}{}",
                        keys.len(),
                        shown.join(", "),
                        if keys.len() > shown.len() {
                            ", ..."
                        } else {
                            ""
                        }
                    )
                },
            })
        }
        several => Err(AttnError::InvalidArgument {
            arg: "prefix".into(),
            expected: "the weights of exactly one Hugging Face family under it".into(),
            got: several
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        }),
    }
}

/// The layout of `family` under `prefix` (as [`detect`] looks for it, without guessing the
/// family). Errors: [`AttnError::HfMissingWeight`] naming the family's first key.
pub fn layout_of(store: &WeightStore, prefix: &str, family: HfFamily) -> Result<HfLayout> {
    locate(store, prefix, family).ok_or_else(|| AttnError::HfMissingWeight {
        family,
        key: format!("{prefix}{}", family.marker()),
        source_name: store.source_name().into(),
    })
}

/// Refuse specs the family cannot express. Errors: [`AttnError::InvalidArgument`].
fn check_supported(cfg: &LayerConfig, family: HfFamily) -> Result<()> {
    let refuse = |arg: &str, what: String| {
        Err(AttnError::InvalidArgument {
            arg: arg.into(),
            expected: format!("a spec that {} names can express", family.name()),
            got: what,
        })
    };
    if cfg.kind != AttentionKind::SelfAttention {
        return refuse("kind", "cross-attention".into());
    }
    if cfg.output_gate {
        return refuse("output_gate", "an output gate".into());
    }
    if family != HfFamily::Llama {
        if cfg.groups != cfg.heads {
            return refuse(
                "gqa",
                format!("{} groups for {} heads (only MHA)", cfg.groups, cfg.heads),
            );
        }
        if let Some(n) = cfg.qk_norm {
            return refuse(
                "qk_layernorm",
                format!("{n:?} (the family has no q/k norm)"),
            );
        }
        if cfg.sinks == Some(Sinks::Learnable) {
            return refuse("sinks", "learnable sinks (the family has none)".into());
        }
    }
    Ok(())
}

/// Rows of `q` `[np hn, w]`, `k` and `v` `[ng hn, w]` interleaved per group
/// `[per hn q | hn k | hn v]` (w = 1 for biases): `linear_qkv`'s layout.
fn fuse_qkv(cfg: &LayerConfig, q: &[f32], k: &[f32], v: &[f32], w: usize) -> Vec<f32> {
    let (ng, hn) = (cfg.groups, cfg.head_dim);
    let per = cfg.heads_per_group();
    let mut out = Vec::with_capacity(q.len() + k.len() + v.len());
    for g in 0..ng {
        out.extend_from_slice(&q[g * per * hn * w..(g + 1) * per * hn * w]);
        out.extend_from_slice(&k[g * hn * w..(g + 1) * hn * w]);
        out.extend_from_slice(&v[g * hn * w..(g + 1) * hn * w]);
    }
    out
}

/// The inverse of [`fuse_qkv`]: `linear_qkv` rows (row width `w`) -> q, k, v.
fn split_qkv(cfg: &LayerConfig, fused: &[f32], w: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (ng, hn) = (cfg.groups, cfg.head_dim);
    let per = cfg.heads_per_group();
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for g in fused.chunks_exact((per + 2) * hn * w).take(ng) {
        q.extend_from_slice(&g[..per * hn * w]);
        k.extend_from_slice(&g[per * hn * w..(per + 1) * hn * w]);
        v.extend_from_slice(&g[(per + 1) * hn * w..]);
    }
    (q, k, v)
}

/// `[r, c]` -> `[c, r]`.
fn transpose(t: &Tensor) -> Result<Tensor> {
    let (r, c) = (t.shape()[0], t.shape()[1]);
    let d = t.data();
    Tensor::new(
        &[c, r],
        (0..c * r).map(|i| d[(i % r) * c + i / r]).collect(),
    )
}

/// Reads a family's keys under a prefix, remembering which it used, so that the rest can be
/// reported as extra.
struct Reader<'a> {
    store: &'a WeightStore,
    layout: &'a HfLayout,
    used: RefCell<BTreeSet<String>>,
}

impl Reader<'_> {
    fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.layout.prefix)
    }

    /// The tensor `rel` with `shape`, required.
    fn get(&self, rel: &str, shape: &[usize]) -> Result<Tensor> {
        let key = self.key(rel);
        let family = self.layout.family;
        self.used.borrow_mut().insert(key.clone());
        self.store.get(&key, shape).map_err(|e| match e {
            AttnError::MissingWeight { key, source_name } => AttnError::HfMissingWeight {
                family,
                key,
                source_name,
            },
            AttnError::WeightShape { key, expected, got } => AttnError::HfWeightShape {
                family,
                key,
                expected,
                got,
            },
            other => other,
        })
    }

    /// The tensor `rel` when `wanted` (required then); otherwise it must be absent, since the
    /// spec has no use for it (`why` says which spec item).
    fn maybe(&self, rel: &str, shape: &[usize], wanted: bool, why: &str) -> Result<Option<Tensor>> {
        if wanted {
            return self.get(rel, shape).map(Some);
        }
        let key = self.key(rel);
        if self.store.contains(&key) {
            return Err(AttnError::HfExtraWeight {
                family: self.layout.family,
                key,
                expected: format!("absent: the spec has {why}"),
            });
        }
        Ok(None)
    }

    /// Every key under the prefix was used (or is one the family keeps beside the layer).
    fn finish(&self) -> Result<()> {
        let used = self.used.borrow();
        let skip: Vec<String> = self
            .layout
            .family
            .not_ours()
            .iter()
            .map(|r| self.key(r))
            .collect();
        match keys_under(self.store, &self.layout.prefix)
            .into_iter()
            .find(|k| !used.contains(k) && !skip.contains(k))
        {
            None => Ok(()),
            Some(key) => Err(AttnError::HfExtraWeight {
                family: self.layout.family,
                key,
                expected: "only the attention layer's tensors under the prefix".into(),
            }),
        }
    }
}

/// The tensor names of `family`, relative to the attention module: q, k, v weights (or the
/// fused one), their biases, the output projection's weight and bias.
struct Names {
    q: &'static str,
    k: &'static str,
    v: &'static str,
    o: &'static str,
}

fn names(family: HfFamily) -> Names {
    match family {
        HfFamily::Llama => Names {
            q: "q_proj",
            k: "k_proj",
            v: "v_proj",
            o: "o_proj",
        },
        HfFamily::Bert => Names {
            q: "self.query",
            k: "self.key",
            v: "self.value",
            o: "output.dense",
        },
        // GPT-2 fuses q, k, v in one Conv1D.
        HfFamily::Gpt2 => Names {
            q: "c_attn",
            k: "c_attn",
            v: "c_attn",
            o: "c_proj",
        },
    }
}

/// The layer's weights under Megatron names (no prefix: `linear_qkv.weight`, ...), converted
/// from `store`'s Hugging Face tensors at `layout`.
///
/// Errors: [`AttnError::HfMissingWeight`], [`AttnError::HfWeightShape`] (shapes in the
/// checkpoint's own layout, e.g. GPT-2's `[in, out]`), [`AttnError::HfExtraWeight`] (a tensor
/// under the prefix the spec does not use, e.g. `o_proj.bias` with `bias = false`),
/// [`AttnError::DType`] for a non-float tensor, [`AttnError::InvalidArgument`] for a spec the
/// family cannot express.
pub fn to_megatron(
    store: &WeightStore,
    layout: &HfLayout,
    cfg: &LayerConfig,
) -> Result<WeightStore> {
    let family = layout.family;
    check_supported(cfg, family)?;
    let r = Reader {
        store,
        layout,
        used: RefCell::new(BTreeSet::new()),
    };
    let (np, ng, hn, h) = (cfg.heads, cfg.groups, cfg.head_dim, cfg.hidden);
    let (qw, kw) = (np * hn, ng * hn);
    let nm = names(family);
    let no_qkv_bias = "no qkv bias";
    let no_proj_bias = "no linear_proj bias";
    let mut out: Vec<(String, Tensor)> = Vec::new();

    // q, k, v -> linear_qkv.
    let (qkv_w, qkv_b) = if family == HfFamily::Gpt2 {
        let w = transpose(&r.get("c_attn.weight", &[h, qw + 2 * kw])?)?;
        let b = r.maybe("c_attn.bias", &[qw + 2 * kw], cfg.qkv_bias, no_qkv_bias)?;
        let (wd, bd) = (w.data(), b.as_ref().map(Tensor::data));
        let fw = fuse_qkv(
            cfg,
            &wd[..qw * h],
            &wd[qw * h..(qw + kw) * h],
            &wd[(qw + kw) * h..],
            h,
        );
        let fb = bd.map(|b| fuse_qkv(cfg, &b[..qw], &b[qw..qw + kw], &b[qw + kw..], 1));
        (fw, fb)
    } else {
        let q = r.get(&format!("{}.weight", nm.q), &[qw, h])?;
        let k = r.get(&format!("{}.weight", nm.k), &[kw, h])?;
        let v = r.get(&format!("{}.weight", nm.v), &[kw, h])?;
        let bias =
            |n: &str, len: usize| r.maybe(&format!("{n}.bias"), &[len], cfg.qkv_bias, no_qkv_bias);
        let (qb, kb, vb) = (bias(nm.q, qw)?, bias(nm.k, kw)?, bias(nm.v, kw)?);
        let fw = fuse_qkv(cfg, q.data(), k.data(), v.data(), h);
        let fb = match (qb, kb, vb) {
            (Some(q), Some(k), Some(v)) => Some(fuse_qkv(cfg, q.data(), k.data(), v.data(), 1)),
            _ => None,
        };
        (fw, fb)
    };
    out.push((
        "linear_qkv.weight".into(),
        Tensor::new(&[cfg.qkv_out_features(), h], qkv_w)?,
    ));
    if let Some(b) = qkv_b {
        out.push((
            "linear_qkv.bias".into(),
            Tensor::new(&[cfg.qkv_out_features()], b)?,
        ));
    }

    // Output projection -> linear_proj.
    let proj_w = if family == HfFamily::Gpt2 {
        transpose(&r.get("c_proj.weight", &[qw, h])?)?
    } else {
        r.get(&format!("{}.weight", nm.o), &[h, qw])?
    };
    out.push(("linear_proj.weight".into(), proj_w));
    if let Some(b) = r.maybe(&format!("{}.bias", nm.o), &[h], cfg.proj_bias, no_proj_bias)? {
        out.push(("linear_proj.bias".into(), b));
    }

    // Llama family only: q/k norms and learnable sinks.
    if family == HfFamily::Llama {
        let weighted = matches!(cfg.qk_norm, Some(QkNorm::Rms | QkNorm::Layer));
        let biased = cfg.qk_norm == Some(QkNorm::Layer);
        for (hf, ours) in [("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")] {
            let why = "no qk_layernorm with a weight";
            if let Some(w) = r.maybe(&format!("{hf}.weight"), &[hn], weighted, why)? {
                out.push((format!("{ours}.weight"), w));
            }
            let why = "no qk_layernorm = layer (the only norm with a bias)";
            if let Some(b) = r.maybe(&format!("{hf}.bias"), &[hn], biased, why)? {
                out.push((format!("{ours}.bias"), b));
            }
        }
        let learnable = cfg.sinks == Some(Sinks::Learnable);
        if let Some(s) = r.maybe("sinks", &[np], learnable, "no learnable sinks")? {
            out.push(("core_attention.softmax_offset".into(), s));
        }
    }
    r.finish()?;
    Ok(WeightStore::from_tensors(out))
}

/// `megatron` (a layer's state dict under Megatron names without a prefix, as
/// [`crate::AttentionLayer::state_dict`]`("")` gives it) renamed and re-laid out as `family`'s
/// tensors under `prefix` (the attention module's, e.g. `model.layers.0.self_attn.`): the
/// inverse of [`to_megatron`], bitwise.
///
/// Errors: [`AttnError::InvalidArgument`] for a spec the family cannot express or a parameter
/// it has no name for (`state_dict`, naming the key); [`AttnError::MissingWeight`] /
/// [`AttnError::WeightShape`] when the state dict lacks a tensor the config implies (a layer
/// with user submodules that name their parameters otherwise).
pub fn from_megatron(
    megatron: &[(String, Tensor)],
    cfg: &LayerConfig,
    family: HfFamily,
    prefix: &str,
) -> Result<Vec<(String, Tensor)>> {
    check_supported(cfg, family)?;
    let store = WeightStore::from_tensors(megatron.to_vec());
    let (np, ng, hn, h) = (cfg.heads, cfg.groups, cfg.head_dim, cfg.hidden);
    let (qw, kw) = (np * hn, ng * hn);
    let nm = names(family);
    let mut used = BTreeSet::new();
    let mut take = |k: &str, shape: &[usize], present: bool| -> Result<Option<Tensor>> {
        used.insert(k.to_string());
        present.then(|| store.get(k, shape)).transpose()
    };
    let mut out: Vec<(String, Tensor)> = Vec::new();
    let mut put = |rel: &str, t: Tensor| out.push((format!("{prefix}{rel}"), t));

    let qkv = take("linear_qkv.weight", &[cfg.qkv_out_features(), h], true)?;
    let qkv_b = take("linear_qkv.bias", &[cfg.qkv_out_features()], cfg.qkv_bias)?;
    let (q, k, v) = split_qkv(cfg, qkv.as_ref().map_or(&[][..], Tensor::data), h);
    let bias = qkv_b.as_ref().map(|b| split_qkv(cfg, b.data(), 1));
    if family == HfFamily::Gpt2 {
        let all: Vec<f32> = [q, k, v].concat();
        put(
            "c_attn.weight",
            transpose(&Tensor::new(&[qw + 2 * kw, h], all)?)?,
        );
        if let Some((qb, kb, vb)) = bias {
            put(
                "c_attn.bias",
                Tensor::new(&[qw + 2 * kw], [qb, kb, vb].concat())?,
            );
        }
    } else {
        put(&format!("{}.weight", nm.q), Tensor::new(&[qw, h], q)?);
        put(&format!("{}.weight", nm.k), Tensor::new(&[kw, h], k)?);
        put(&format!("{}.weight", nm.v), Tensor::new(&[kw, h], v)?);
        if let Some((qb, kb, vb)) = bias {
            put(&format!("{}.bias", nm.q), Tensor::new(&[qw], qb)?);
            put(&format!("{}.bias", nm.k), Tensor::new(&[kw], kb)?);
            put(&format!("{}.bias", nm.v), Tensor::new(&[kw], vb)?);
        }
    }
    if let Some(w) = take("linear_proj.weight", &[h, qw], true)? {
        if family == HfFamily::Gpt2 {
            put("c_proj.weight", transpose(&w)?);
        } else {
            put(&format!("{}.weight", nm.o), w);
        }
    }
    if let Some(b) = take("linear_proj.bias", &[h], cfg.proj_bias)? {
        put(&format!("{}.bias", nm.o), b);
    }
    if family == HfFamily::Llama {
        let weighted = matches!(cfg.qk_norm, Some(QkNorm::Rms | QkNorm::Layer));
        let biased = cfg.qk_norm == Some(QkNorm::Layer);
        for (hf, ours) in [("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")] {
            if let Some(w) = take(&format!("{ours}.weight"), &[hn], weighted)? {
                put(&format!("{hf}.weight"), w);
            }
            if let Some(b) = take(&format!("{ours}.bias"), &[hn], biased)? {
                put(&format!("{hf}.bias"), b);
            }
        }
        let learnable = cfg.sinks == Some(Sinks::Learnable);
        if let Some(s) = take("core_attention.softmax_offset", &[np], learnable)? {
            put("sinks", s);
        }
    }
    if let Some((key, _)) = megatron.iter().find(|(k, _)| !used.contains(k)) {
        return Err(AttnError::InvalidArgument {
            arg: "state_dict".into(),
            expected: format!("only parameters that {} names can hold", family.name()),
            got: format!("`{key}`"),
        });
    }
    Ok(out)
}
