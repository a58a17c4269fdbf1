//! The runtime's error type. Every variant names the argument, what was expected and what was
//! given, so a caller can fix the call without reading the source.

use thiserror::Error;

/// Result alias for the runtime.
pub type Result<T, E = AttnError> = std::result::Result<T, E>;

/// Every way a runtime call can fail on bad input or a missing resource.
///
/// Helpers adding variants: append at the end, keep the "argument, expected, got" shape.
#[derive(Debug, Error)]
pub enum AttnError {
    /// A tensor argument has the wrong shape.
    #[error("`{arg}` has the wrong shape: expected {expected}, got {got:?}")]
    Shape {
        /// The argument's name.
        arg: String,
        /// The expected shape, in words (`[s, b, 4096]`).
        expected: String,
        /// The shape given.
        got: Vec<usize>,
    },
    /// A tensor argument has the wrong element type.
    #[error("`{arg}` has the wrong dtype: expected {expected}, got {got}")]
    DType {
        /// The argument's name.
        arg: String,
        /// Accepted dtypes.
        expected: String,
        /// The dtype given.
        got: String,
    },
    /// A scalar or list argument is out of range or inconsistent.
    #[error("invalid `{arg}`: expected {expected}, got {got}")]
    InvalidArgument {
        /// The argument's name.
        arg: String,
        /// What is accepted.
        expected: String,
        /// What was given.
        got: String,
    },
    /// `cu_seqlens` is not a valid cumulative length list.
    #[error("invalid `{arg}`: {expected}; got {got:?}")]
    CuSeqlens {
        /// The argument's name (`cu_seqlens_q`, ...).
        arg: String,
        /// The violated rule (first 0, non-decreasing, last == total tokens).
        expected: String,
        /// The list given.
        got: Vec<i64>,
    },
    /// A KV-cache write would exceed its capacity. Nothing was written.
    #[error("KV cache capacity exceeded for `{arg}`: capacity {capacity}, needed {needed}")]
    CacheCapacity {
        /// What ran out (`max_seq`, `max_batch`, `block_table row 3`).
        arg: String,
        /// The capacity.
        capacity: usize,
        /// What the call needed.
        needed: usize,
    },
    /// The paged pool has too few free blocks. Nothing was allocated.
    #[error("paged KV pool exhausted: requested {requested} blocks, {free} free of {total}")]
    PoolExhausted {
        /// Blocks asked for.
        requested: usize,
        /// Blocks free.
        free: usize,
        /// Pool size.
        total: usize,
    },
    /// A block id outside the pool, or one not allocated.
    #[error("invalid block id in `{arg}`: expected {expected}, got {got}")]
    BlockId {
        /// Where the id came from (`block_table[2][5]`).
        arg: String,
        /// The valid range or state.
        expected: String,
        /// The id given.
        got: i64,
    },
    /// A weight is missing from a weights file.
    #[error("missing weight `{key}` in {source_name}")]
    MissingWeight {
        /// The full (prefixed) tensor name.
        key: String,
        /// The file or store.
        source_name: String,
    },
    /// A weight has the wrong shape.
    #[error("weight `{key}` has the wrong shape: expected {expected:?}, got {got:?}")]
    WeightShape {
        /// The full (prefixed) tensor name.
        key: String,
        /// The expected shape.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// The spec is malformed.
    #[error("invalid attention spec: {0}")]
    Spec(#[from] attention_codegen::SpecError),
    /// A dimension given both in the spec and in the runtime config disagrees, or is
    /// missing from both.
    #[error("config `{field}`: spec says {spec}, runtime config says {config}")]
    ConfigMismatch {
        /// The field (`heads`, `head_dim`, `hidden`).
        field: String,
        /// The spec's value (or "unset").
        spec: String,
        /// The config's value (or "unset").
        config: String,
    },
    /// A file could not be read or written.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A safetensors file is malformed.
    #[error("safetensors error in {path}: {msg}")]
    Safetensors {
        /// The path.
        path: String,
        /// The library's message.
        msg: String,
    },
    /// The requested backend is not available on this machine.
    #[error("backend unavailable: {0}")]
    BackendUnavailable(String),
    /// Kernel rendering failed.
    #[error("kernel rendering failed: {0}")]
    Render(String),
    /// A device allocation failed (out of memory or a bad context).
    #[error("device allocation of {bytes} bytes for `{arg}` failed: {msg}")]
    DeviceAlloc {
        /// What was being allocated (`linear_qkv output`, `q`, ...).
        arg: String,
        /// Bytes requested.
        bytes: usize,
        /// The driver's message (`CUDA_ERROR_OUT_OF_MEMORY`, ...).
        msg: String,
    },
    /// A kernel launch (or the work it queued) failed.
    #[error("launching kernel `{key}` failed: {msg}")]
    KernelLaunch {
        /// The kernel key (entry name), or the library call (`cublasLtMatmul linear_qkv`).
        key: String,
        /// The driver's or library's message.
        msg: String,
    },
    /// Another CUDA driver, NVRTC or cuBLASLt call failed.
    #[error("CUDA call `{call}` failed: {msg}")]
    Cuda {
        /// The operation (`memcpy_dtoh output`, `load_module prefill_rows_bf16_...`).
        call: String,
        /// The driver's or library's message.
        msg: String,
    },
    /// Kernel compilation or the kernel cache failed: NVRTC missing, a compile error (with
    /// the kernel key and NVRTC's log), or `ATTN_JIT=off` and a cache miss (naming the key).
    #[error(transparent)]
    Jit(#[from] crate::jit::JitError),
    /// A submodule has no implementation on the backend the layer is moved to (a user
    /// override that does not implement that backend's trait, e.g.
    /// [`CudaSubmodule`](crate::modules::CudaSubmodule)).
    #[error("submodule `{role}` has no {backend} implementation: {hint}")]
    NoBackendImpl {
        /// The role (`linear_proj`, `q_layernorm`, ...).
        role: String,
        /// The backend (`cuda`).
        backend: String,
        /// What the submodule must implement.
        hint: String,
    },
    /// A Hugging Face weight the layer needs is missing from the weights file.
    #[error("missing weight `{key}` ({family} names) in {source_name}")]
    HfMissingWeight {
        /// The family whose names were read.
        family: crate::weights::hf::HfFamily,
        /// The full (prefixed) tensor name.
        key: String,
        /// The file or store.
        source_name: String,
    },
    /// A tensor under the layer's Hugging Face prefix that the spec has no use for (a bias
    /// the spec lacks, a q/k norm without `qk_layernorm`, an unknown tensor).
    #[error("unexpected weight `{key}` ({family} names): expected {expected}")]
    HfExtraWeight {
        /// The family whose names were read.
        family: crate::weights::hf::HfFamily,
        /// The full (prefixed) tensor name.
        key: String,
        /// What the spec allows there.
        expected: String,
    },
    /// A Hugging Face weight has the wrong shape (shapes in the checkpoint's own layout:
    /// GPT-2's Conv1D weights are `[in, out]`).
    #[error(
        "weight `{key}` ({family} names) has the wrong shape: expected {expected:?}, got {got:?}"
    )]
    HfWeightShape {
        /// The family whose names were read.
        family: crate::weights::hf::HfFamily,
        /// The full (prefixed) tensor name.
        key: String,
        /// The shape the spec implies.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// No Hugging Face family's attention weights under the prefix.
    #[error("no Hugging Face attention weights under prefix `{prefix}` in {source_name}: expected one of {expected}; keys there: {got}")]
    HfFamilyNotFound {
        /// The prefix searched.
        prefix: String,
        /// The file or store.
        source_name: String,
        /// The keys that would identify a family, relative to the prefix.
        expected: String,
        /// The keys found under the prefix (the first few).
        got: String,
    },
    /// A training call out of order on a saved forward context (crate::train): a backward on
    /// a context whose activations an earlier backward consumed (no saved forward left),
    /// `backward_dw` before `backward`, after a backward that did not delay the weight
    /// gradients, or a second time. Nothing was computed or changed.
    #[error("`{call}` out of order: expected {expected}, got {got}")]
    TrainState {
        /// The call (`backward`, `backward_dw`).
        call: String,
        /// The state the call needs.
        expected: String,
        /// The context's state.
        got: String,
    },
    /// A collective or point-to-point exchange between ranks failed ([`crate::parallel`]): a
    /// peer that timed out, a peer that dropped its communicator (failed or exited), ranks
    /// that called different collectives or sent other sizes, or an NCCL error. What this rank
    /// had received is discarded; its tensors are unchanged.
    #[error("collective `{op}` failed on rank {rank}: expected {expected}, got {got}")]
    Collective {
        /// The collective (`all_reduce`, `all_gather`, `send_recv`, `ncclCommInitRank`, ...).
        op: String,
        /// The rank that reports the failure.
        rank: usize,
        /// What the rank waited for.
        expected: String,
        /// What happened instead.
        got: String,
    },
    /// Parameters that must be bitwise equal on every rank differ (Megatron's
    /// `run_realtime_tests`, [`crate::parallel::realtime`]): the rank whose copy differs from
    /// rank 0's, with both SHA-256 digests.
    #[error("`{param}` differs on rank {rank}: expected rank 0's SHA-256 {expected}, got {got}")]
    RankMismatch {
        /// The parameter (`q_layernorm.weight`, ...).
        param: String,
        /// The rank whose copy differs.
        rank: usize,
        /// Rank 0's digest (hex).
        expected: String,
        /// This rank's digest (hex).
        got: String,
    },
    /// A tensor-parallel shard does not belong to the rank it was given to: a tensor of the
    /// wrong shape (a shard of another `tp_size`), or a file whose metadata names another
    /// rank or world size ([`crate::parallel::tp_load`]). Nothing was loaded.
    #[error("tp_rank {rank}: shard `{key}` is wrong: expected {expected}, got {got}")]
    Shard {
        /// The rank the shard was given to.
        rank: usize,
        /// The tensor (full, prefixed name) or metadata key.
        key: String,
        /// What the rank's shard must be.
        expected: String,
        /// What was given.
        got: String,
    },
    /// A data tensor (an input, a gradient, a mask, positions: not a weight) is missing from
    /// the file given for it (the `attn` CLI's `--input`, `--grad-output`, `--positions`, ...).
    #[error("missing tensor `{key}` in {path} (given by `{arg}`): the file holds {got}")]
    MissingTensor {
        /// The argument that named the file (`--grad-output`).
        arg: String,
        /// The tensor looked up (`grad_output`).
        key: String,
        /// The file.
        path: String,
        /// The tensors the file holds (the first few names).
        got: String,
    },
}
