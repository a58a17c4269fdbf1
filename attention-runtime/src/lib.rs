//! Runtime for generated attention layers.
//!
//! - [`tensor`]: host tensors and their layouts.
//! - [`error`]: the typed errors every call returns.
//! - [`config`]: a spec resolved against runtime dims ([`LayerConfig`]).
//! - [`modules`]: submodule role traits and their default implementations.
//! - [`layer`]: the layer forward shared by generated structs ([`AttentionLayer`]).
//! - [`backend`]: the backend seam ([`backend::BackendLayer`] over the CPU reference and CUDA).
//! - [`plan`]: step planning (checks, positions, batch geometry) shared by every backend.
//! - [`weights`]: safetensors weights ([`WeightStore`]) under Megatron or Hugging Face names
//!   ([`WeightNames`], [`weights::hf`]).
//! - [`reference`](mod@reference): the CPU reference math.
//! - [`parallel`]: tensor and context parallelism over a [`parallel::Communicator`]
//!   (in-process threads or NCCL).
//! - [`train`]: training on the CPU reference (backward, delayed wgrad, selective recompute,
//!   QK-Clip); the backend-neutral trait is [`backend::TrainLayer`].

pub mod backend;
pub mod config;
pub mod cuda;
pub mod device;
pub mod error;
pub mod jit;
pub mod kernel_cache;
pub mod kv_cache;
pub mod layer;
pub mod modules;
pub mod parallel;
pub mod plan;
pub mod reference;
pub mod spec_layer;
pub mod tensor;
pub mod train;
pub mod weights;

pub use config::{LayerConfig, RuntimeDims};
pub use device::Device;
pub use error::{AttnError, Result};
pub use layer::{
    AttentionLayer, CrossAttentionParts, ForwardArgs, LayerOutput, LayerParts, PackedSeqParams,
    SelfAttentionParts,
};
pub use modules::{
    CoreArgs, CoreAttentionModule, DotProductAttention, Linear, LinearModule, NormModule,
    QkNormLayer, Submodule,
};
pub use tensor::Tensor;
pub use weights::hf::HfFamily;
pub use weights::names::WeightNames;
pub use weights::WeightStore;
