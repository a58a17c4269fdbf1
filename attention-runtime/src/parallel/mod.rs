//! Tensor and context parallelism (issue 12): one attention layer split over several ranks,
//! Megatron-Core's way (semantics.md, "Tensor parallel" / "Context parallel").
//!
//! - [`Communicator`]: the collectives (all-reduce, all-gather, reduce-scatter, all-to-all,
//!   send/recv, bytes) over a backend's tensors. [`InProcessComm`] runs N ranks on N threads
//!   over host tensors (a missing peer is a timeout error, never a hang); [`NcclComm`] runs
//!   one rank per GPU over device tensors through cudarc's NCCL (libnccl loaded at run time:
//!   a missing library is [`AttnError::BackendUnavailable`]).
//! - Tensor parallel (`tp_size`, `tp_rank`): [`TpPlan`] says which heads, key/value groups
//!   and weight rows a rank owns (whole groups per rank, or groups replicated when
//!   `ng < tp`); [`tp_load`] shards a whole layer or checkpoint at load time, or loads
//!   per-rank `mp_rank_0N` shard files; [`TpLayer`] runs a rank on any backend (row-parallel
//!   `linear_proj` then all-reduce, or reduce-scatter with `sequence_parallel` and an
//!   all-gather before `linear_qkv`), for forward, static and paged KV caches, decode, and the
//!   training backward ([`tp_train`]).
//! - [`realtime::run_realtime_tests`]: q/k norm parameters compared across ranks by SHA-256
//!   digests gathered over the communicator.
//! - Context parallel (`cp_size`, `cp_comm_type`): [`CpLayout`] (chunks `r` and
//!   `2 cp - 1 - r` of every sequence), [`CpLayer`] / [`CpCoreAttention`] on the CPU
//!   reference with `p2p` (ring exchange of K/V, partials merged by LSE), `all_gather` and
//!   `a2a` (Ulysses); causal, no mask and sliding window; padded and packed sequences.
//!   [`CpCudaLayer`] is the same on a GPU over device tensors and [`NcclComm`]: the existing
//!   forward kernels run the launches [`cp_plan`] derives from the same visibility rules
//!   (bottom-right alignment, or a Toeplitz mask tensor for windows across chunks), their
//!   partials merged by LSE on the device ([`crate::cuda::cp_kernels`]); [`cp_call`] checks a
//!   call on the host and that every rank is ready for the same one; [`cp_ring`] schedules
//!   the `p2p` ring's exchanges on the communicator's stream, overlapped with compute.
//! - KV caches under context parallelism ([`cp_cache`], [`cp_cache_step`]): each rank caches
//!   the tokens it owns (its prompt chunks, then every `cp`-th decode token by the
//!   fewest-tokens rule) in a [`CpStaticKvCache`]; a decode step attends the new token over
//!   each rank's cache and merges the partials by LSE (CPU reference and CUDA).
//!
//! What runs where, and what is missing (see README.md, "Tensor and context parallelism"):
//! the CPU paths are tested against the single-rank layer with the in-process communicator;
//! the CUDA plans are tested on the host by emulating the kernel (`tests/parallel_cp_plan.rs`);
//! the CUDA paths ([`TpLayer`] over [`CudaLayer`](crate::cuda::CudaLayer), [`CpCudaLayer`])
//! have two-GPU tests (`tests/gpu_parallel.rs`, `tests/gpu_parallel_cp.rs`,
//! `tests/gpu_parallel_cp_backward.rs`, `tests/gpu_parallel_cp_decode.rs`); the ring
//! schedule is tested on the host at CP = 2..6 (`tests/parallel_cp_ring.rs`). Paged KV caches
//! under context parallelism and the `a2a+p2p` hierarchy are not written.

pub mod comm;
pub mod cp;
pub mod cp_cache;
pub mod cp_cache_step;
pub mod cp_call;
pub mod cp_core;
mod cp_core_train;
pub mod cp_cuda;
mod cp_cuda_backward;
pub mod cp_cuda_cache;
mod cp_cuda_core;
pub mod cp_layout;
pub mod cp_plan;
pub mod cp_ring;
pub mod in_process;
pub mod nccl;
pub mod nccl_id;
pub mod realtime;
pub mod tp;
pub mod tp_load;
pub mod tp_shard;
pub mod tp_train;

use std::fmt;
use std::str::FromStr;

use crate::error::AttnError;

pub use comm::Communicator;
pub use cp::{CpLayer, CpSaved};
pub use cp_cache::{CpCpuBackend, CpStaticKvCache};
pub use cp_core::CpCoreAttention;
pub use cp_cuda::CpCudaLayer;
pub use cp_cuda_backward::CpCudaSaved;
pub use cp_cuda_cache::CpCudaBackend;
pub use cp_layout::CpLayout;
pub use in_process::{run_ranks, InProcessComm};
pub use nccl::{DeviceCommunicator, NcclComm};
pub use nccl_id::{nccl_version, NcclUniqueId};
pub use tp::TpLayer;
pub use tp_shard::TpPlan;

/// How context-parallel ranks exchange keys and values (Megatron's `cp_comm_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpCommType {
    /// `p2p`: a ring of K/V exchanges, partial outputs merged by their LSE.
    P2p,
    /// `all_gather`: every rank's K/V gathered, then attended.
    AllGather,
    /// `a2a` (DeepSpeed Ulysses): all-to-all from sequence-split to head-split and back.
    A2a,
}

impl CpCommType {
    /// Every type, in Megatron's order.
    pub const ALL: [CpCommType; 3] = [CpCommType::P2p, CpCommType::AllGather, CpCommType::A2a];

    /// Megatron's name: `p2p`, `all_gather`, `a2a`.
    pub fn name(self) -> &'static str {
        match self {
            CpCommType::P2p => "p2p",
            CpCommType::AllGather => "all_gather",
            CpCommType::A2a => "a2a",
        }
    }
}

impl fmt::Display for CpCommType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CpCommType {
    type Err = AttnError;
    /// `p2p`, `all_gather` or `a2a`. Errors: [`AttnError::InvalidArgument`] (`cp_comm_type`)
    /// for anything else, `a2a+p2p` (the hierarchical type) included.
    fn from_str(s: &str) -> Result<Self, AttnError> {
        CpCommType::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| AttnError::InvalidArgument {
                arg: "cp_comm_type".into(),
                expected: "p2p, all_gather or a2a (a2a+p2p is not implemented)".into(),
                got: s.into(),
            })
    }
}
