//! `attention`: turn a one-line attention spec into a specialized transformer attention layer.
//!
//! ```ignore
//! use attention::attention;
//!
//! #[attention(self, heads = 32, gqa = 8, head_dim = 128, qk_layernorm = rms, rope, mask = causal)]
//! pub struct LlamaAttention;
//! ```
//!
//! This root package re-exports the macro ([`attention`]), the runtime ([`runtime`]) and the
//! spec/codegen crate ([`codegen`]); generated code refers only to `::attention::...` paths,
//! so users add this one dependency.

pub use attention_codegen as codegen;
pub use attention_macros::attention;
pub use attention_runtime as runtime;
