//! Fused decode over a static KV cache (`decode_splitkv` + `decode_splitkv..._combine`), the KV
//! append kernel (`append_kv`), rope tables and CUDA-graph capture of a decode step: the attention
//! kernels alone ([`DecodeGraph`]) or a whole layer step with its cuBLASLt linears
//! ([`LayerDecodeGraph`], built by [`CudaLayer::capture_decode`](super::CudaLayer::capture_decode)).
//!
//! Split count ([`num_splits`]): the most splits whose blocks fit in one wave of the
//! device's resident blocks ([`decode_slots`]; a partial second wave costs up to 25%), never
//! more than one split per 128 keys of the longest sequence (so the combine stays small), at
//! most 128.

use std::ffi::c_void;
use std::sync::Arc;

use attention_codegen::render::{
    decode_splitkv_smem_bytes, KernelConfig, DECODE_SPLITKV_COMBINE_WARPS,
};
use cudarc::driver::{
    sys, CudaFunction, CudaGraph, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};

use super::launch::{launch_err, load_function, load_module};
use super::params::{dependent_order, launch_ordered, launch_params_ordered};
use super::tensor::{cuda_err, upload};
use super::CudaRuntime;
use crate::error::{AttnError, Result};

/// Threads per block of the `<key>_combine` kernel.
fn combine_threads() -> u32 {
    (DECODE_SPLITKV_COMBINE_WARPS * 32) as u32
}

/// Loaded split and combine (`<key>_combine`) functions of a `decode_splitkv` config
/// (compiled on first use).
pub fn decode_splitkv_kernels(
    rt: &CudaRuntime,
    config: &KernelConfig,
) -> Result<(String, CudaFunction, CudaFunction)> {
    let key = config.key();
    let combine_key = format!("{key}_combine");
    let mut cache = rt.kernels.lock().unwrap_or_else(|p| p.into_inner());
    if let (Some(f), Some(m)) = (cache.get(&key), cache.get(&combine_key)) {
        return Ok((key, f.clone(), m.clone()));
    }
    let module = load_module(rt, config)?;
    let (f, m) = (
        load_function(&module, &key)?,
        load_function(&module, &combine_key)?,
    );
    let smem = decode_splitkv_smem_bytes(config.head_dim, config.row_blocks);
    f.set_attribute(
        sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .map_err(|e| AttnError::Cuda {
        call: format!("cuFuncSetAttribute max dynamic shared memory {key} ({smem} B)"),
        msg: e.to_string(),
    })?;
    cache.insert(key.clone(), f.clone());
    cache.insert(combine_key, m.clone());
    Ok((key, f, m))
}

/// Number of KV splits for a decode step of `batch` sequences of `groups` groups whose
/// longest visible length is `max_len`, on a device where `slots` split blocks can be
/// resident at once ([`decode_slots`]): the most splits whose blocks still fit in one wave
/// (`batch * groups * splits <= slots`), at least 1, never more than one split per 128 keys
/// of `max_len`, at most 128. Non-decreasing in `max_len`.
///
/// Source: `attn bench decode --split-sweep` on an H200 (2026-11-30, hd128, 32 heads / 8
/// groups, 264 slots): at every batch (1-64) and context (8k, 32k) the fastest count was
/// the largest that fills one wave (33 / 8 / 2 / 1 at batch 1 / 4 / 16 / 64; 1.15-1.32x the
/// earlier four-blocks-per-SM rule, which made 1.9-2.4 waves); counts that leave a partial
/// second wave lose up to 25%.
pub fn num_splits(slots: usize, batch: usize, groups: usize, max_len: usize) -> usize {
    let blocks = (batch * groups).max(1);
    (slots / blocks).min(max_len.div_ceil(128)).clamp(1, 128)
}

/// Split blocks of the `config` decode kernel resident at once on the runtime's device:
/// SMs times the blocks per SM its shared memory and registers allow (CUDA occupancy
/// calculator), at least the SM count. Loads the kernel (cached) if needed.
///
/// Errors: those of [`decode_splitkv_kernels`] and [`sm_count`]; [`AttnError::Cuda`] from the
/// occupancy query.
pub fn decode_slots(rt: &CudaRuntime, config: &KernelConfig) -> Result<usize> {
    let (key, f, _) = decode_splitkv_kernels(rt, config)?;
    let per_sm = f
        .occupancy_max_active_blocks_per_multiprocessor(
            (config.warps * 32) as u32,
            decode_splitkv_smem_bytes(config.head_dim, config.row_blocks),
            None,
        )
        .map_err(|e| AttnError::Cuda {
            call: format!("cuOccupancyMaxActiveBlocksPerMultiprocessor {key}"),
            msg: e.to_string(),
        })?;
    Ok(sm_count(rt)? * (per_sm as usize).max(1))
}

/// Number of SMs of the runtime's device.
pub fn sm_count(rt: &CudaRuntime) -> Result<usize> {
    rt.device()
        .context
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map(|n| n.max(1) as usize)
        .map_err(cuda_err("cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)"))
}

/// Rope cos/sin tables on the device, f32 `[rows, rot_dim / 2]` (times mscale).
#[derive(Debug)]
pub struct RopeTables {
    /// cos table.
    pub cos: CudaSlice<f32>,
    /// sin table.
    pub sin: CudaSlice<f32>,
    /// Positions covered.
    pub rows: usize,
    /// The mscale they were built with.
    pub mscale: f32,
}

impl RopeTables {
    /// Upload `cos`, `sin` (`[rows, rot_dim / 2]`).
    pub fn new(
        stream: &Arc<CudaStream>,
        cos: &[f32],
        sin: &[f32],
        rows: usize,
        mscale: f32,
    ) -> Result<Self> {
        Ok(RopeTables {
            cos: upload(stream, cos, "rope cos")?,
            sin: upload(stream, sin, "rope sin")?,
            rows,
            mscale,
        })
    }
}

/// Raw device pointers and sizes of one fused decode step of `num_tokens` new tokens per
/// sequence (everything fixed-shape, so the same value can be launched eagerly or captured
/// in a graph). Layouts: see templates/decode_splitkv.cu; `T` = `num_tokens`, token-major
/// (`[T, batch, ..]`, as a prefill's `[s, b, ..]`).
#[derive(Debug, Clone, Copy)]
pub struct DecodeSplitKvArgs {
    /// q `[T, batch, np, hn]` (unrotated).
    pub q: u64,
    /// New k `[T, batch, ng, hn]` (unrotated).
    pub k_new: u64,
    /// New v `[T, batch, ng, hn]`.
    pub v_new: u64,
    /// Layer K cache `[max_seq, max_batch, ng, hn]`.
    pub k_cache: u64,
    /// Layer V cache.
    pub v_cache: u64,
    /// int32 `[batch]`: position of the first new token (= visible length before the
    /// append); token t sits at `cache_seqlens[b] + t`.
    pub cache_seqlens: u64,
    /// f32 `[rows, rot/2]` or 0 without rope.
    pub rope_cos: u64,
    /// f32 `[rows, rot/2]` or 0.
    pub rope_sin: u64,
    /// f32 `[splits, T, batch, np, hn]`.
    pub o_part: u64,
    /// f32 `[splits, T, batch, np]`.
    pub lse_part: u64,
    /// Output `[T, batch, np, hn]`.
    pub out: u64,
    /// f32 `[np, T * batch]`.
    pub lse: u64,
    /// f32 `[np]` learnable sinks or 0.
    pub sinks: u64,
    /// Gate `[T, batch, np, hn]` or 0.
    pub gate: u64,
    /// Sequences.
    pub batch: i32,
    /// First batch slot.
    pub batch_offset: i32,
    /// Cache batch slots.
    pub max_batch: i32,
    /// Query heads.
    pub num_heads: i32,
    /// Groups.
    pub num_groups: i32,
    /// KV splits.
    pub num_splits: i32,
    /// New tokens per sequence, 1 to
    /// [`DECODE_SPLITKV_MAX_TOKENS`](attention_codegen::render::DECODE_SPLITKV_MAX_TOKENS).
    pub num_tokens: i32,
    /// Softmax scale.
    pub softmax_scale: f32,
    /// Window left (-1 unbounded).
    pub window_left: i32,
    /// Window right (-1 unbounded).
    pub window_right: i32,
}

/// The launch of a `decode_splitkv` split kernel over `grid` (splits, groups, sequences): its
/// block size is the variant's `__launch_bounds__` (4 warps, 8 for four row blocks:
/// `decode_splitkv_warps`) and its dynamic shared memory the size [`decode_splitkv_kernels`]
/// allowed for it (`decode_splitkv_smem_bytes`), both read back from the function.
fn split_launch_config(split: &CudaFunction, grid: (i32, i32, i32)) -> Result<LaunchConfig> {
    let threads = split
        .get_attribute(sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)
        .map_err(cuda_err("cuFuncGetAttribute(MAX_THREADS_PER_BLOCK)"))?;
    let smem = split
        .get_attribute(
            sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        )
        .map_err(cuda_err(
            "cuFuncGetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)",
        ))?;
    Ok(LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block_dim: (threads.max(32) as u32, 1, 1),
        shared_mem_bytes: smem.max(0) as u32,
    })
}

/// Queue the split and combine kernels of one decode step on `stream`; on sm_90+ the combine
/// is a programmatic dependent launch ([`LaunchOrder::Programmatic`](super::params::LaunchOrder)),
/// so its launch overlaps the split kernel's tail.
pub fn launch_decode_splitkv(
    stream: &Arc<CudaStream>,
    key: &str,
    split: &CudaFunction,
    combine: &CudaFunction,
    a: &DecodeSplitKvArgs,
) -> Result<()> {
    let cfg = split_launch_config(split, (a.num_splits, a.num_groups, a.batch))?;
    let mut b = stream.launch_builder(split);
    b.arg(&a.q)
        .arg(&a.k_new)
        .arg(&a.v_new)
        .arg(&a.k_cache)
        .arg(&a.v_cache);
    b.arg(&a.cache_seqlens).arg(&a.rope_cos).arg(&a.rope_sin);
    b.arg(&a.o_part).arg(&a.lse_part);
    b.arg(&a.batch).arg(&a.batch_offset).arg(&a.max_batch);
    b.arg(&a.num_heads).arg(&a.num_groups).arg(&a.num_splits);
    b.arg(&a.num_tokens);
    b.arg(&a.softmax_scale)
        .arg(&a.window_left)
        .arg(&a.window_right);
    // SAFETY: the argument list matches the decode_splitkv entry point (render.rs docs); the
    // caller guarantees every pointer is a live buffer of the documented shape and that the
    // cache has room for num_tokens rows at cache_seqlens[b] (validated on the host).
    unsafe { b.launch(cfg) }.map_err(launch_err(key))?;
    // The merge sees the step's T * batch query rows as its batch ([T, batch] token-major).
    let rows = a.batch * a.num_tokens;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, a.num_heads as u32, 1),
        block_dim: (combine_threads(), 1, 1),
        shared_mem_bytes: 0,
    };
    let mut args: [*mut c_void; 9] = [
        &a.o_part as *const u64 as *mut c_void,
        &a.lse_part as *const u64 as *mut c_void,
        &a.out as *const u64 as *mut c_void,
        &a.lse as *const u64 as *mut c_void,
        &a.sinks as *const u64 as *mut c_void,
        &a.gate as *const u64 as *mut c_void,
        &rows as *const i32 as *mut c_void,
        &a.num_heads as *const i32 as *mut c_void,
        &a.num_splits as *const i32 as *mut c_void,
    ];
    let order = dependent_order(combine).map_err(launch_err(key))?;
    // SAFETY: matches the `_combine` entry point (o_part, lse_part, out, lse, sinks, gate,
    // batch, num_heads, num_splits); buffers as above; the combine waits for the split kernel
    // (`griddepcontrol.wait`) before it reads o_part / lse_part.
    unsafe { launch_ordered(stream, combine, cfg, order, &mut args, None) }.map_err(launch_err(key))
}

/// Queue the split and combine kernels of a paged batch's decode requests (`decode_splitkv` in
/// its paged mode, loaded with [`decode_splitkv_kernels`]): split grid `(num_splits,
/// num_groups, batch)`, combine grid `(merge_rows, num_heads)`, both launched with `p` as
/// their parameters (the combine as a programmatic dependent launch on sm_90+).
///
/// # Safety
/// Every pointer in `p` is a live device buffer of the shape `templates/decode_splitkv.cu`
/// documents for its paged mode, `requests` lists `batch` requests of the paged batch with
/// 1 to 16 query rows each (rows beyond the kernel's pass take more passes), `row_starts` /
/// `row_tokens` their `merge_rows` rows, and their block ids and
/// lengths were validated against the pool.
pub unsafe fn launch_decode_splitkv_paged(
    stream: &Arc<CudaStream>,
    key: &str,
    split: &CudaFunction,
    combine: &CudaFunction,
    p: &super::params::PagedDecodeParams,
) -> Result<()> {
    let cfg = split_launch_config(split, (p.num_splits, p.num_groups, p.batch))?;
    // SAFETY: PagedDecodeParams is the parameter layout of both paged entries
    // (tests/nvrtc_catalog.rs); the buffers are the caller's guarantee.
    unsafe { super::params::launch(stream, split, cfg, p) }.map_err(launch_err(key))?;
    let cfg = LaunchConfig {
        grid_dim: (p.merge_rows as u32, p.num_heads as u32, 1),
        block_dim: (combine_threads(), 1, 1),
        shared_mem_bytes: 0,
    };
    let order = dependent_order(combine).map_err(launch_err(key))?;
    // SAFETY: as above; the combine waits for the split kernel (`griddepcontrol.wait`) before
    // it reads o_part / lse_part.
    unsafe { launch_params_ordered(stream, combine, cfg, order, p) }.map_err(launch_err(key))
}

/// A decode step captured in a CUDA graph on its own stream: replaying it re-runs the same
/// kernels on the same fixed buffers (the caller updates their contents between replays).
pub struct DecodeGraph {
    stream: Arc<CudaStream>,
    graph: CudaGraph,
}

impl std::fmt::Debug for DecodeGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeGraph").finish_non_exhaustive()
    }
}

impl DecodeGraph {
    /// Capture `a`'s split + combine launches (the runtime's stream is synchronized first, so
    /// every buffer is ready). Errors: `Cuda` when capture or instantiation fails.
    pub fn capture(
        rt: &CudaRuntime,
        key: &str,
        split: &CudaFunction,
        combine: &CudaFunction,
        a: &DecodeSplitKvArgs,
    ) -> Result<Self> {
        rt.synchronize("before graph capture")?;
        let stream = rt
            .device()
            .context
            .new_stream()
            .map_err(cuda_err("cuStreamCreate"))?;
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(cuda_err("cuStreamBeginCapture"))?;
        let launched = launch_decode_splitkv(&stream, key, split, combine, a);
        let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        launched?;
        let graph = ended
            .map_err(cuda_err("cuStreamEndCapture"))?
            .ok_or_else(|| AttnError::Cuda {
                call: "cuStreamEndCapture".into(),
                msg: "the capture recorded no graph".into(),
            })?;
        Ok(DecodeGraph { stream, graph })
    }

    /// Replay once and wait for it.
    pub fn replay(&self) -> Result<()> {
        self.graph.launch().map_err(cuda_err("cuGraphLaunch"))?;
        self.stream
            .synchronize()
            .map_err(cuda_err("graph replay synchronize"))
    }
}

/// Bytes of cuBLASLt workspace the runtime's handle offers its heuristic (cudarc's
/// `Workspace`: 32 MiB from compute capability 9, else 4 MiB). A prepared GEMM asks the
/// heuristic with the same limit, so it picks the algorithm the eager linears pick.
fn blaslt_workspace_limit(rt: &CudaRuntime) -> Result<usize> {
    let major = rt
        .device()
        .context
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .map_err(cuda_err("cuDeviceGetAttribute(COMPUTE_CAPABILITY_MAJOR)"))?;
    Ok(if major >= 9 { 33_554_432 } else { 4_194_304 })
}

fn blas_err(call: &str) -> impl FnOnce(cudarc::cublaslt::result::CublasError) -> AttnError + '_ {
    move |e| AttnError::Cuda {
        call: call.to_string(),
        msg: e.to_string(),
    }
}

/// One linear `y [rows, out] = x [rows, in] · W^T (+ bias)` prepared for stream capture:
/// descriptors, layouts and the heuristic's algorithm are chosen up front (the same ones
/// [`linear`](super::linear) uses, so results are bitwise equal), device pointers are raw
/// and fixed, and the workspace is this GEMM's own buffer of the size the algorithm needs.
/// [`launch`](Self::launch) only queues `cublasLtMatmul`, which is legal while capturing.
pub(crate) struct PreparedGemm {
    handle: cudarc::cublaslt::sys::cublasLtHandle_t,
    desc: cudarc::cublaslt::sys::cublasLtMatmulDesc_t,
    layouts: [cudarc::cublaslt::sys::cublasLtMatrixLayout_t; 3],
    algo: cudarc::cublaslt::sys::cublasLtMatmulAlgo_t,
    workspace: Option<CudaSlice<u8>>,
    ws_ptr: u64,
    ws_size: usize,
    w: u64,
    x: u64,
    y: u64,
}

// SAFETY: the descriptors, layouts and algorithm are host objects owned by this value alone
// and never mutated after `new`; the handle is the runtime's, which cuBLASLt lets any thread
// use. A PreparedGemm is only ever used by one thread at a time (behind `&mut`, a graph
// that owns it, or the layer's plan mutex), so moving it between threads is sound.
unsafe impl Send for PreparedGemm {}

impl PreparedGemm {
    /// Prepare `y = x · W^T (+ bias)` for `rows` rows, `W [out, inp]`, all buffers raw
    /// pointers of `elem` (`bias [out]` or 0). The caller keeps every buffer alive as long
    /// as the GEMM (or a graph that captured it) may run.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        rt: &CudaRuntime,
        elem: super::ElemType,
        rows: usize,
        out: usize,
        inp: usize,
        w: u64,
        x: u64,
        y: u64,
        bias: u64,
    ) -> Result<Self> {
        use cudarc::cublaslt::result as lt;
        use cudarc::cublaslt::sys as ls;
        use cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulShared};
        let (mtype, ctype) = match elem {
            super::ElemType::Bf16 => (
                <CudaBlasLT as Matmul<half::bf16>>::matrix_type(),
                <CudaBlasLT as Matmul<half::bf16>>::compute_type(),
            ),
            super::ElemType::F16 => (
                <CudaBlasLT as Matmul<half::f16>>::matrix_type(),
                <CudaBlasLT as Matmul<half::f16>>::compute_type(),
            ),
            super::ElemType::F32 => (
                <CudaBlasLT as Matmul<f32>>::matrix_type(),
                <CudaBlasLT as Matmul<f32>>::compute_type(),
            ),
        };
        let handle = *rt.blas().handle();
        let desc = lt::create_matmul_desc(ctype, ls::cudaDataType_t::CUDA_R_32F)
            .map_err(blas_err("cublasLtMatmulDescCreate"))?;
        // From here on `g` owns every descriptor (its Drop frees what was created).
        let mut g = PreparedGemm {
            handle,
            desc,
            layouts: [std::ptr::null_mut(); 3],
            // SAFETY: a plain-old-data struct; overwritten by the heuristic below.
            algo: unsafe { std::mem::zeroed() },
            workspace: None,
            ws_ptr: 0,
            ws_size: 0,
            w,
            x,
            y,
        };
        let (m, n, k) = (out as u64, rows as u64, inp as u64);
        let dims = [(k, m, inp as i64), (k, n, inp as i64), (m, n, out as i64)];
        for (i, (r, c, ld)) in dims.into_iter().enumerate() {
            g.layouts[i] = lt::create_matrix_layout(mtype, r, c, ld)
                .map_err(blas_err("cublasLtMatrixLayoutCreate"))?;
        }
        let set = |attr: ls::cublasLtMatmulDescAttributes_t, p: *const std::ffi::c_void, n| {
            // SAFETY: `desc` is live; `p` points at `n` bytes of the attribute's type.
            unsafe { lt::set_matmul_desc_attribute(desc, attr, p, n) }
                .map_err(blas_err("cublasLtMatmulDescSetAttribute"))
        };
        let (t, nt) = (1i32, 0i32);
        use ls::cublasLtMatmulDescAttributes_t as A;
        set(A::CUBLASLT_MATMUL_DESC_TRANSA, (&t as *const i32).cast(), 4)?;
        set(
            A::CUBLASLT_MATMUL_DESC_TRANSB,
            (&nt as *const i32).cast(),
            4,
        )?;
        set(
            A::CUBLASLT_MATMUL_DESC_TRANSC,
            (&nt as *const i32).cast(),
            4,
        )?;
        let epilogue = if bias != 0 {
            set(
                A::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                (&bias as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )?;
            ls::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        } else {
            ls::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        };
        set(
            A::CUBLASLT_MATMUL_DESC_EPILOGUE,
            (&epilogue as *const ls::cublasLtEpilogue_t).cast(),
            std::mem::size_of::<ls::cublasLtEpilogue_t>(),
        )?;
        let pref = lt::create_matmul_pref().map_err(blas_err("cublasLtMatmulPreferenceCreate"))?;
        let limit = blaslt_workspace_limit(rt)?;
        // SAFETY: `pref` is live; the attribute is a usize.
        let heur = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                ls::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&limit as *const usize).cast(),
                std::mem::size_of::<usize>(),
            )
            .and_then(|()| {
                lt::get_matmul_algo_heuristic(
                    handle,
                    desc,
                    g.layouts[0],
                    g.layouts[1],
                    g.layouts[2],
                    g.layouts[2],
                    pref,
                )
            })
        };
        // SAFETY: created above, not used afterwards.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        let heur = heur.map_err(blas_err("cublasLtMatmulAlgoGetHeuristic"))?;
        g.algo = heur.algo;
        if heur.workspaceSize > 0 {
            let ws = super::tensor::alloc_uninit::<u8>(
                rt.stream(),
                heur.workspaceSize,
                "cuBLASLt workspace",
            )?;
            g.ws_ptr = {
                use cudarc::driver::DevicePtr;
                let (p, _sync) = ws.device_ptr(rt.stream());
                p
            };
            g.ws_size = heur.workspaceSize;
            g.workspace = Some(ws);
        }
        Ok(g)
    }

    /// Queue the GEMM on `stream` (legal while `stream` is capturing).
    pub(crate) fn launch(&self, stream: &CudaStream, what: &str) -> Result<()> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: descriptors are live (owned by self); pointers are the fixed buffers the
        // caller keeps alive, of the shapes the layouts describe; the workspace holds
        // `ws_size` bytes as the chosen algorithm requires.
        unsafe {
            cudarc::cublaslt::result::matmul(
                self.handle,
                self.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                self.w as *const std::ffi::c_void,
                self.layouts[0],
                self.x as *const std::ffi::c_void,
                self.layouts[1],
                self.y as *const std::ffi::c_void,
                self.layouts[2],
                self.y as *mut std::ffi::c_void,
                self.layouts[2],
                &self.algo,
                self.ws_ptr as *mut std::ffi::c_void,
                self.ws_size,
                stream.cu_stream() as _,
            )
        }
        .map_err(|e| AttnError::KernelLaunch {
            key: format!("cublasLtMatmul {what}"),
            msg: e.to_string(),
        })
    }
}

impl Drop for PreparedGemm {
    fn drop(&mut self) {
        use cudarc::cublaslt::result as lt;
        // SAFETY: each handle was created by `new` and is destroyed once; null ones skipped.
        unsafe {
            for l in self.layouts {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
        }
        let _ = self.workspace.take();
    }
}

/// Copy host f32 values into a device tensor of any element type on `stream` (rounded to
/// nearest even). `dst` must hold at least `src.len()` elements.
pub(crate) fn copy_into(
    stream: &Arc<CudaStream>,
    src: &[f32],
    dst: &mut super::DeviceTensor,
    arg: &str,
) -> Result<()> {
    fn put<T: super::DeviceElem>(
        stream: &Arc<CudaStream>,
        src: &[f32],
        dst: &mut super::DeviceTensor,
        arg: &str,
    ) -> Result<()> {
        let v: Vec<T> = src.iter().map(|&x| T::from_f32(x)).collect();
        let s = dst.typed_mut::<T>(arg)?;
        stream
            .memcpy_htod(&v, s)
            .map_err(cuda_err(&format!("memcpy_htod {arg}")))
    }
    if dst.numel() < src.len() {
        return Err(AttnError::InvalidArgument {
            arg: arg.into(),
            expected: format!("at most {} values", dst.numel()),
            got: format!("{} values", src.len()),
        });
    }
    match dst.elem() {
        super::ElemType::Bf16 => put::<half::bf16>(stream, src, dst, arg),
        super::ElemType::F16 => put::<half::f16>(stream, src, dst, arg),
        super::ElemType::F32 => put::<f32>(stream, src, dst, arg),
    }
}

/// Copy a device tensor back to host f32 values on `stream` (and wait for it).
fn copy_out(stream: &Arc<CudaStream>, src: &super::DeviceTensor) -> Result<Vec<f32>> {
    fn get<T: super::DeviceElem>(
        stream: &Arc<CudaStream>,
        s: &CudaSlice<T>,
        n: usize,
    ) -> Result<Vec<f32>> {
        let v = stream
            .clone_dtoh(&s.slice(..n))
            .map_err(cuda_err("memcpy_dtoh"))?;
        stream
            .synchronize()
            .map_err(cuda_err("graph output synchronize"))?;
        Ok(v.into_iter().map(T::to_f32).collect())
    }
    let n = src.numel();
    match src.data() {
        super::DeviceData::Bf16(s) => get(stream, s, n),
        super::DeviceData::F16(s) => get(stream, s, n),
        super::DeviceData::F32(s) => get(stream, s, n),
    }
}

/// The fixed device buffers of a captured layer decode step (see [`LayerDecodeGraph`]).
pub(crate) struct DecodeBuffers {
    /// hidden in, `[b, h]`.
    pub x: super::DeviceTensor,
    /// linear_qkv output `[b, qkv_out]`.
    pub qkv: super::DeviceTensor,
    /// q `[b, np, hn]`, k/v `[b, ng, hn]`, gate `[b, np, hn]` (output gate only).
    pub q: super::DeviceTensor,
    /// See `q`.
    pub k: super::DeviceTensor,
    /// See `q`.
    pub v: super::DeviceTensor,
    /// See `q`.
    pub gate: Option<super::DeviceTensor>,
    /// int32 `[b]`: each slot's position (visible length before the append).
    pub seqlens: CudaSlice<i32>,
    /// Rope tables `[rows >= max_seq, rot/2]` (rope only), shared between a layer's plans.
    pub rope: Option<Arc<RopeTables>>,
    /// f32 `[splits, b, np, hn]`, `[splits, b, np]`, `[np, b]`.
    pub o_part: CudaSlice<f32>,
    /// See `o_part`.
    pub lse_part: CudaSlice<f32>,
    /// See `o_part`.
    pub lse: CudaSlice<f32>,
    /// attention output `[b, np, hn]`.
    pub o: super::DeviceTensor,
    /// layer output `[b, h]` (linear_proj without its bias).
    pub out: super::DeviceTensor,
}

/// Which cache (and which part of it) a [`LayerDecodeGraph`] was captured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CacheBinding {
    /// Raw pointers of the layer's K and V storage.
    pub k: u64,
    /// See `k`.
    pub v: u64,
    /// The cache's `max_seq` and `max_batch`.
    pub max_seq: usize,
    /// See `max_seq`.
    pub max_batch: usize,
    /// Layer index, first batch slot, sequences.
    pub layer: usize,
    /// See `layer`.
    pub batch_offset: usize,
    /// See `layer`.
    pub batch: usize,
}

/// A whole layer decode step (`linear_qkv` -> `qkv_prep` -> `decode_splitkv` split + combine ->
/// `linear_proj`) captured in one CUDA graph over fixed device buffers, for `b` sequences in
/// slots `batch_offset .. batch_offset + b` of one layer of one [`DeviceStaticKvCache`](super::DeviceStaticKvCache).
///
/// Built by [`CudaLayer::capture_decode`](super::CudaLayer::capture_decode) (one new token
/// per sequence) or [`CudaLayer::capture_decode_tokens`](super::CudaLayer::capture_decode_tokens)
/// (`T` of them: speculative decoding). Each
/// [`replay`](Self::replay) copies the hidden states `[T, b, h]` and each slot's position
/// (an int32 device array the kernels read, so no kernel argument changes between replays)
/// into the fixed buffers, launches the graph on its own stream and reads back the output
/// `[T, b, h]`. The split count is fixed at capture; an eager
/// [`CudaLayer::decode`](super::CudaLayer::decode) with the same split count
/// ([`CudaLayer::set_decode_splits`](super::CudaLayer::set_decode_splits)) gives bitwise
/// equal outputs and cache contents.
pub struct LayerDecodeGraph {
    pub(crate) rt: Arc<CudaRuntime>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) graph: CudaGraph,
    pub(crate) bufs: DecodeBuffers,
    /// The captured GEMMs' descriptors and workspaces, alive as long as the graph.
    pub(crate) _gemms: [PreparedGemm; 2],
    pub(crate) binding: CacheBinding,
    pub(crate) hidden: usize,
    pub(crate) splits: usize,
    /// New tokens per sequence of a replay (1 to 16).
    pub(crate) tokens: usize,
    pub(crate) proj_bias_host: Option<crate::tensor::Tensor>,
    pub(crate) poison: bool,
}

impl std::fmt::Debug for LayerDecodeGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerDecodeGraph")
            .field("binding", &self.binding)
            .field("splits", &self.splits)
            .finish_non_exhaustive()
    }
}

impl LayerDecodeGraph {
    /// Capture the queued work of `body` on a fresh non-blocking stream (the runtime's
    /// stream is synchronized first so every fixed buffer is ready).
    pub(crate) fn capture_on(
        rt: &CudaRuntime,
        body: impl FnOnce(&Arc<CudaStream>) -> Result<()>,
    ) -> Result<(Arc<CudaStream>, CudaGraph)> {
        rt.synchronize("before graph capture")?;
        let stream = rt
            .device()
            .context
            .new_stream()
            .map_err(cuda_err("cuStreamCreate"))?;
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(cuda_err("cuStreamBeginCapture"))?;
        let queued = body(&stream);
        let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        queued?;
        let graph = ended
            .map_err(cuda_err("cuStreamEndCapture"))?
            .ok_or_else(|| AttnError::Cuda {
                call: "cuStreamEndCapture".into(),
                msg: "the capture recorded no graph".into(),
            })?;
        Ok((stream, graph))
    }

    /// KV splits of the captured `decode_splitkv` launch.
    pub fn num_splits(&self) -> usize {
        self.splits
    }

    /// Sequences per replay.
    pub fn batch(&self) -> usize {
        self.binding.batch
    }

    /// New tokens per sequence of a replay (1 for [`CudaLayer::capture_decode`](super::CudaLayer::capture_decode), `T` for
    /// [`CudaLayer::capture_decode_tokens`](super::CudaLayer::capture_decode_tokens)).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// When on, the attention and layer output buffers are filled with NaN before each
    /// replay, so an element the graph leaves unwritten shows up as NaN (tests).
    pub fn set_poison_outputs(&mut self, on: bool) {
        self.poison = on;
    }

    /// One decode step: `hidden` `[T, b, h]` (`T` = [`tokens`](Self::tokens), 1 for a
    /// one-token graph) for the captured slots of `cache` (which must be the cache the graph
    /// was captured against). Appends each slot's `T` new k/v rows at its visible length (the
    /// layer's pending append, as eager decode; commit with
    /// [`DeviceStaticKvCache::advance`](super::DeviceStaticKvCache::advance)) and returns the
    /// output `[T, b, h]` with `linear_proj`'s bias unadded.
    ///
    /// Errors (nothing is written, the graph is not launched): `Shape` (`hidden`),
    /// `InvalidArgument` (`cache`: another cache, or one whose layer storage moved),
    /// `CacheCapacity` (a slot is full); `Cuda` / `KernelLaunch` from the device.
    pub fn replay(
        &mut self,
        hidden: &crate::tensor::Tensor,
        cache: &mut super::DeviceStaticKvCache,
    ) -> Result<crate::layer::LayerOutput> {
        let bd = self.binding;
        let t = self.tokens;
        hidden.expect_shape("hidden", &[Some(t), Some(bd.batch), Some(self.hidden)])?;
        let now = cache_binding(&self.rt, cache, bd.layer, bd.batch_offset, bd.batch)?;
        if now != bd {
            return Err(AttnError::InvalidArgument {
                arg: "cache".into(),
                expected: "the cache this decode graph was captured against".into(),
                got: "another cache (or different storage)".into(),
            });
        }
        let starts = cache.check_append(bd.layer, bd.batch_offset, bd.batch, t)?;
        let lens: Vec<i32> = starts.iter().map(|&l| l as i32).collect();
        let st = self.stream.clone();
        st.join(self.rt.stream())
            .map_err(cuda_err("cuStreamWaitEvent (runtime stream)"))?;
        st.memcpy_htod(&lens, &mut self.bufs.seqlens)
            .map_err(cuda_err("memcpy_htod cache_seqlens"))?;
        copy_into(&st, hidden.data(), &mut self.bufs.x, "hidden")?;
        if self.poison {
            let nan = vec![f32::NAN; self.bufs.out.numel().max(self.bufs.o.numel())];
            copy_into(&st, &nan[..self.bufs.o.numel()], &mut self.bufs.o, "o")?;
            copy_into(
                &st,
                &nan[..self.bufs.out.numel()],
                &mut self.bufs.out,
                "out",
            )?;
        }
        self.graph.launch().map_err(cuda_err("cuGraphLaunch"))?;
        let out = copy_out(&st, &self.bufs.out)?;
        cache.mark_appended(bd.layer, bd.batch_offset, bd.batch, t);
        Ok(crate::layer::LayerOutput {
            output: crate::tensor::Tensor::new(&[t, bd.batch, self.hidden], out)?,
            bias: self.proj_bias_host.clone(),
        })
    }
}

impl LayerDecodeGraph {
    /// One decode step on device tensors, asynchronous: `hidden` `[T, b, h]` (`T` =
    /// [`tokens`](Self::tokens); or `[b, h]` when `T` is 1), the layer's dtype, for the
    /// captured slots of `cache` (the cache the graph was captured against); the output,
    /// `T * b * h` elements laid out `[T, b, h]` (`linear_proj`'s bias unadded), is written
    /// into `out`.
    /// The graph runs on its own stream, ordered after the work already queued on the
    /// runtime's stream, and the runtime's stream waits for it: a caller that only uses the
    /// runtime's stream sees plain stream order. Nothing synchronizes; the append is pending
    /// as with [`replay`](Self::replay).
    ///
    /// Errors (before anything is queued): `Shape` (`hidden`, `out`), `DType`,
    /// `InvalidArgument` (another cache), `CacheCapacity` (a slot is full); `Cuda` from the
    /// driver (copies, the graph launch).
    pub fn replay_device(
        &mut self,
        hidden: &super::DeviceTensor,
        out: &mut super::DeviceTensor,
        cache: &mut super::DeviceStaticKvCache,
    ) -> Result<()> {
        let bd = self.binding;
        let t = self.tokens;
        let want = t * bd.batch * self.hidden;
        if hidden.numel() != want || !matches!(hidden.shape().last(), Some(&h) if h == self.hidden)
        {
            return Err(AttnError::Shape {
                arg: "hidden".into(),
                expected: format!(
                    "[{t}, {}, {}] or [{}, {1}]",
                    bd.batch,
                    self.hidden,
                    t * bd.batch
                ),
                got: hidden.shape().to_vec(),
            });
        }
        if out.numel() != want {
            return Err(AttnError::Shape {
                arg: "out".into(),
                expected: format!("[{t}, {}, {}]", bd.batch, self.hidden),
                got: out.shape().to_vec(),
            });
        }
        for (arg, e) in [("hidden", hidden.elem()), ("out", out.elem())] {
            if e != self.bufs.x.elem() {
                return Err(AttnError::DType {
                    arg: arg.into(),
                    expected: self.bufs.x.elem().name().into(),
                    got: e.name().into(),
                });
            }
        }
        let now = cache_binding(&self.rt, cache, bd.layer, bd.batch_offset, bd.batch)?;
        if now != bd {
            return Err(AttnError::InvalidArgument {
                arg: "cache".into(),
                expected: "the cache this decode graph was captured against".into(),
                got: "another cache (or different storage)".into(),
            });
        }
        let starts = cache.check_append(bd.layer, bd.batch_offset, bd.batch, t)?;
        let lens: Vec<i32> = starts.iter().map(|&l| l as i32).collect();
        let st = self.stream.clone();
        let main = self.rt.stream().clone();
        st.join(&main)
            .map_err(cuda_err("cuStreamWaitEvent (runtime stream)"))?;
        st.memcpy_htod(&lens, &mut self.bufs.seqlens)
            .map_err(cuda_err("memcpy_htod cache_seqlens"))?;
        super::tensor::copy_dtod(&st, hidden, &mut self.bufs.x)?;
        if self.poison {
            self.bufs.o.fill_nan()?;
            self.bufs.out.fill_nan()?;
        }
        self.graph.launch().map_err(cuda_err("cuGraphLaunch"))?;
        super::tensor::copy_dtod(&st, &self.bufs.out, out)?;
        main.join(&st)
            .map_err(cuda_err("cuStreamWaitEvent (graph stream)"))?;
        cache.mark_appended(bd.layer, bd.batch_offset, bd.batch, t);
        Ok(())
    }
}

/// The binding of `layer`, slots `batch_offset .. + batch` of `cache`.
pub(crate) fn cache_binding(
    rt: &CudaRuntime,
    cache: &super::DeviceStaticKvCache,
    layer: usize,
    batch_offset: usize,
    batch: usize,
) -> Result<CacheBinding> {
    let ptr = |t: &super::DeviceTensor| -> u64 {
        use cudarc::driver::DevicePtr;
        match t.data() {
            super::DeviceData::Bf16(s) => s.device_ptr(rt.stream()).0,
            super::DeviceData::F16(s) => s.device_ptr(rt.stream()).0,
            super::DeviceData::F32(s) => s.device_ptr(rt.stream()).0,
        }
    };
    Ok(CacheBinding {
        k: ptr(cache.layer_k(layer)?),
        v: ptr(cache.layer_v(layer)?),
        max_seq: cache.max_seq(),
        max_batch: cache.max_batch(),
        layer,
        batch_offset,
        batch,
    })
}

#[cfg(test)]
mod tests {
    use super::num_splits;

    #[test]
    fn splits_fill_one_wave_of_resident_blocks() {
        // H200, hd128: 132 SMs x 2 resident blocks; 8 groups. The counts the split sweep
        // measured fastest (2026-11-30).
        for (batch, ctx, want) in [(1, 8192, 33), (4, 8192, 8), (16, 32768, 2), (64, 8192, 1)] {
            assert_eq!(num_splits(264, batch, 8, ctx + 1), want, "batch {batch}");
        }
        // One split per 128 keys at most; at least 1; at most 128.
        assert_eq!(num_splits(264, 1, 8, 300), 3);
        assert_eq!(num_splits(264, 1, 8, 0), 1);
        assert_eq!(num_splits(100_000, 1, 1, 1 << 20), 128);
        // Never decreasing in the length (decode plans size their buffers for max_seq).
        let mut last = 0;
        for len in (0..20_000).step_by(97) {
            let s = num_splits(264, 2, 8, len);
            assert!(s >= last, "len {len}");
            last = s;
        }
    }
}
