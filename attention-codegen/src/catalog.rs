//! The kernel catalog: specs of real models, rendered ahead of time into
//! `kernels-generated/` (regenerate with `cargo run -p attention-codegen --bin regen-kernels`).

use crate::registry::{kernels_for_spec_head_dims, Target};
use crate::render::{render_all, KernelConfig, KernelSource, RenderError};
use crate::spec::{AttentionKind, AttentionSpec, MaskType, QkNorm, Rope, RopeMode, Window};

/// One model of the catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogEntry {
    /// Model name, e.g. `llama-3-8b`.
    pub name: &'static str,
    /// Its attention spec.
    pub spec: AttentionSpec,
}

fn self_attn(heads: usize, gqa: usize, head_dim: usize) -> AttentionSpec {
    AttentionSpec {
        heads: Some(heads),
        gqa: Some(gqa),
        head_dims: vec![head_dim],
        ..AttentionSpec::new(AttentionKind::SelfAttention)
    }
}

/// The catalog's models, in a fixed order.
pub fn catalog() -> Vec<CatalogEntry> {
    vec![
        // Llama-3-8B: 32 heads, 8 groups, hn 128, rope base 500000, causal, no biases.
        CatalogEntry {
            name: "llama-3-8b",
            spec: AttentionSpec {
                hidden: Some(4096),
                bias: false,
                rope: Some(Rope {
                    mode: RopeMode::Half,
                    rotary_percent: 1.0,
                    rotary_base: 500000.0,
                }),
                masks: vec![
                    MaskType::Causal,
                    MaskType::PaddingCausal,
                    MaskType::CausalBottomRight,
                ],
                ..self_attn(32, 8, 128)
            },
        },
        // Qwen3-8B style: q/k RMSNorm, 32/8/128, rope base 1e6, no biases.
        CatalogEntry {
            name: "qwen3-8b",
            spec: AttentionSpec {
                hidden: Some(4096),
                qk_norm: Some(QkNorm::Rms),
                eps: 1e-6,
                bias: false,
                rope: Some(Rope {
                    mode: RopeMode::Half,
                    rotary_percent: 1.0,
                    rotary_base: 1e6,
                }),
                masks: vec![MaskType::Causal, MaskType::PaddingCausal],
                ..self_attn(32, 8, 128)
            },
        },
        // GPT-2: 12 heads of 64 (MHA), learned absolute positions (no rope), causal, biases.
        CatalogEntry {
            name: "gpt2",
            spec: AttentionSpec {
                hidden: Some(768),
                masks: vec![MaskType::Causal, MaskType::Padding],
                ..self_attn(12, 12, 64)
            },
        },
        // Mistral-7B: 32/8/128, rope, sliding window 4096 (left 4095, right 0), no biases.
        CatalogEntry {
            name: "mistral-7b",
            spec: AttentionSpec {
                hidden: Some(4096),
                bias: false,
                rope: Some(Rope {
                    mode: RopeMode::Half,
                    rotary_percent: 1.0,
                    rotary_base: 10000.0,
                }),
                window: Some(Window {
                    left: 4095,
                    right: 0,
                }),
                masks: vec![MaskType::Causal, MaskType::PaddingCausal],
                ..self_attn(32, 8, 128)
            },
        },
        // Gemma-7B style: 16 heads of 256 (MHA), rope, causal, no biases.
        CatalogEntry {
            name: "gemma-7b",
            spec: AttentionSpec {
                hidden: Some(3072),
                bias: false,
                rope: Some(Rope {
                    mode: RopeMode::Half,
                    rotary_percent: 1.0,
                    rotary_base: 10000.0,
                }),
                masks: vec![MaskType::Causal],
                ..self_attn(16, 16, 256)
            },
        },
        // all-MiniLM-L6-v2 (a 6-layer BERT; small BERTs alike): 12 heads of 32 (MHA), learned
        // absolute positions (no rope), padding masks, biases.
        CatalogEntry {
            name: "all-minilm-l6-v2",
            spec: AttentionSpec {
                hidden: Some(384),
                masks: vec![MaskType::Padding],
                ..self_attn(12, 12, 32)
            },
        },
        // Phi-2: 32 heads of 80 (MHA), hidden 2560, partial rope (partial_rotary_factor 0.4:
        // the first 32 channels, rotate_half), base 10000, biases on q/k/v and dense, no q/k
        // norm, causal.
        CatalogEntry {
            name: "phi-2",
            spec: AttentionSpec {
                hidden: Some(2560),
                rope: Some(Rope {
                    mode: RopeMode::Half,
                    rotary_percent: 0.4,
                    rotary_base: 10000.0,
                }),
                masks: vec![MaskType::Causal],
                ..self_attn(32, 32, 80)
            },
        },
        // Whisper-small style cross-attention: 12 heads of 64, no rope, encoder padding.
        CatalogEntry {
            name: "whisper-small-cross",
            spec: AttentionSpec {
                heads: Some(12),
                gqa: Some(12),
                head_dims: vec![64],
                hidden: Some(768),
                masks: vec![MaskType::NoMask, MaskType::Padding],
                ..AttentionSpec::new(AttentionKind::CrossAttention)
            },
        },
    ]
}

/// One model's kernel configs on `target`: the registry's
/// ([`kernels_for_spec_head_dims`]).
fn entry_configs(spec: &AttentionSpec, target: Target) -> Result<Vec<KernelConfig>, RenderError> {
    kernels_for_spec_head_dims(spec, target)
}

/// The catalog's kernel configs on `target` (`attn aot --catalog` asks per arch),
/// deduplicated by key, in catalog order.
pub fn catalog_configs(target: Target) -> Result<Vec<KernelConfig>, RenderError> {
    let mut out: Vec<KernelConfig> = Vec::new();
    for entry in catalog() {
        for c in entry_configs(&entry.spec, target)? {
            if !out.iter().any(|o| o.key() == c.key()) {
                out.push(c);
            }
        }
    }
    Ok(out)
}

/// Every kernel of the catalog on any device ([`catalog_configs`] rendered), deduplicated
/// by key, in catalog order.
pub fn catalog_kernels() -> Result<Vec<KernelSource>, RenderError> {
    render_all(&catalog_configs(Target::AnyDevice)?)
}

/// For each catalog kernel key, the names of the models that use it (catalog order).
pub fn catalog_users() -> Result<Vec<(String, Vec<&'static str>)>, RenderError> {
    let mut out: Vec<(String, Vec<&'static str>)> = Vec::new();
    for entry in catalog() {
        for c in entry_configs(&entry.spec, Target::AnyDevice)? {
            let key = c.key();
            match out.iter_mut().find(|(k, _)| *k == key) {
                Some((_, users)) => users.push(entry.name),
                None => out.push((key, vec![entry.name])),
            }
        }
    }
    Ok(out)
}

/// The text of `kernels-generated/MANIFEST.txt`: one line per kernel, `key  model, model`.
pub fn manifest() -> Result<String, RenderError> {
    let mut s = String::from(
        "# Generated by `cargo run -p attention-codegen --bin regen-kernels`; do not edit.\n\
         # One line per kernel: <key> <models using it>. Each kernel is <key>.cu here.\n\
         # Key parts: family (prefill_rows, prefill .._sm80, decode_rows, decode_splitkv, append_kv,\n\
         # qkv_prep), dtype, hd<head dim>, mask or causal/full, _win sliding window, _sink1\n\
         # off-by-one sink, _sinkl learnable sink, _bias attention bias, _paged K/V in a paged pool,\n\
         # _gate output gate, qkv_prep: layout, norm, rope<mode><rotated dims>; _w<warps per block>;\n\
         # prefill: _m<block_m>n<block_n>w<warps>s<K/V stages>, then the arch, _sm80 (sm_80+)\n\
         # or _sm90 (sm_90a only: Hopper's wgmma).\n",
    );
    for (key, users) in catalog_users()? {
        s.push_str(&format!("{key} {}\n", users.join(",")));
    }
    Ok(s)
}

/// Every file of `kernels-generated/` as `(file name, contents)`: `<key>.cu` per catalog
/// kernel, then `MANIFEST.txt`.
pub fn generated_files() -> Result<Vec<(String, String)>, RenderError> {
    let mut files: Vec<(String, String)> = catalog_kernels()?
        .into_iter()
        .map(|k| (format!("{}.cu", k.key), k.source))
        .collect();
    files.push(("MANIFEST.txt".to_string(), manifest()?));
    Ok(files)
}
