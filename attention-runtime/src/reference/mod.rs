//! The CPU reference backend: the pure math of the layer, in f32 with f64 accumulation for
//! dot products, softmax sums and norm statistics. It is the oracle the GPU kernels are
//! checked against.
//!
//! - [`attention`]: one sequence's core attention ([`attend_sequence`]).
//! - [`attention_backward`]: its backward ([`attend_sequence_backward`]).
//! - [`grad`]: backward of linear, norms and the output gate.
//! - [`mask`]: the visibility predicate of every mask type and the window.
//! - [`rope`]: rotary embedding.
//! - [`norm`]: q/k norms.
//! - [`linear`](mod@linear): `y = x W^T (+ b)`.
//! - [`paged`]: attention over the KV caches (owned by the kv-cache work).

pub mod attention;
pub mod attention_backward;
pub mod grad;
pub mod linear;
pub mod mask;
pub mod norm;
pub mod paged;
pub mod rope;

pub use attention::{
    attend_sequence, AttendOutput, AttendParams, BiasFn, MaskFn, SeqDims, SinkLogits,
};
pub use attention_backward::{attend_sequence_backward, AttendGrads};
pub use linear::linear;
pub use mask::visible;
pub use norm::normalize_rows;
pub use rope::{apply_rope, RopeTable};
