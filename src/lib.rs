//! `attention`: turn a one-line attention spec into a specialized transformer attention layer
//! with Megatron-Core semantics.
//!
//! ```
//! use attention::attention;
//! use attention::runtime::{ForwardArgs, RuntimeDims, Tensor};
//!
//! #[attention(self, heads = 4, gqa = 2, head_dim = 64, qk_layernorm = rms, rope, mask = causal)]
//! pub struct TinyAttention;
//!
//! let layer = TinyAttention::new(RuntimeDims::default(), 0).unwrap();
//! let hidden = Tensor::zeros(&[3, 1, 256]); // [s, b, h], h = heads * head_dim
//! let out = layer.forward(&hidden, &ForwardArgs::default()).unwrap();
//! assert_eq!(out.output.shape(), &[3, 1, 256]); // out.bias: linear_proj's bias, not added
//! assert!(!TinyAttention::KERNELS.is_empty());
//! ```
//!
//! # What `#[attention(...)]` generates
//!
//! On a field-less, non-generic struct (`struct Name;`), for the grammar of
//! [`codegen::grammar`]:
//! - the struct's fields: the submodules under their Megatron-Core names, typed with the
//!   runtime's defaults ([`runtime::modules::Linear`], [`runtime::modules::QkNormLayer`],
//!   [`runtime::modules::DotProductAttention`]) or with the user type the spec names
//!   (`linear_proj = my::Proj`, which implements the role trait and
//!   [`runtime::modules::Submodule`]):
//!   - self-attention: `linear_qkv`, `q_layernorm` and `k_layernorm` (only with
//!     `qk_layernorm`), `core_attention`, `linear_proj`;
//!   - cross-attention: `linear_q`, `linear_kv`, `core_attention`, `linear_proj`;
//!
//!   plus `config: LayerConfig` (the spec resolved against the runtime dims);
//! - `Name::SPEC: &str`, the canonical spec string, and `Name::spec() -> AttentionSpec`
//!   (`codegen::validate::parse_spec(Name::SPEC) == Name::spec()`);
//! - `Name::KERNELS: &[StaticKernel]`, the CUDA sources rendered at compile time for every
//!   kernel the layer can launch on any GPU (`codegen::registry::kernels_for` per head dim:
//!   fast and fallback forward per mask and bias, prep, cache kernels), each under a readable
//!   key such as
//!   `prefill_rows_bf16_hd128_causal_...`; empty when the spec leaves `head_dim` to the runtime.
//!   The Hopper prefill kernels (keys ending in `_sm90`) compile for `sm_90a` only: filter
//!   with `StaticKernel::compiles_for(arch)` before compiling the table for one GPU;
//! - constructors: `new(dims, seed)` (fresh weights), `from_config(config, seed)`,
//!   `from_weights(&WeightStore, prefix, dims)` and `from_safetensors(path, prefix, dims)`
//!   (Megatron names `{prefix}linear_qkv.weight`, `{prefix}linear_qkv.bias`,
//!   `{prefix}q_layernorm.weight`, ...), and `config_for(&dims)`;
//! - [`runtime::AttentionLayer`] (`config`, `parts`, and through them `forward`, `prefill`,
//!   `decode`, `forward_paged`, `state_dict`), with the same methods inherent on the struct so
//!   no trait import is needed (`prefill`, `decode`, `forward_paged` for self-attention only).
//!
//! A spec error is reported at the offending token of the attribute; the macro then emits the
//! struct as written with stub items of the same signatures, so one mistake gives one error.
//!
//! This root package re-exports the macro ([`attention`]), the runtime ([`runtime`]) and the
//! spec/codegen crate ([`codegen`]); generated code refers only to `::attention::...` paths,
//! so users add this one dependency.

pub use attention_codegen as codegen;
pub use attention_macros::attention;
pub use attention_runtime as runtime;
