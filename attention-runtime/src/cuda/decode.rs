//! Fused decode over a static KV cache (`flashdec` + `flashdec..._merge`), the KV append
//! kernel (`kvappend`), rope tables and CUDA-graph capture of a decode step.
//!
//! Split count ([`num_splits`]): enough blocks to cover the SMs twice when `batch * groups`
//! alone cannot, never more than one split per 256 keys of the longest sequence, at most 64.

use std::sync::Arc;

use attention_codegen::render::{KernelConfig, FLASH_DECODE_MAX_WARPS};
use cudarc::driver::{
    sys, CudaFunction, CudaGraph, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};

use super::launch::launch_err;
use super::tensor::{cuda_err, upload};
use super::CudaRuntime;
use crate::error::{AttnError, Result};

/// Loaded split and merge functions of a `flashdec` config (compiled on first use).
pub fn flash_decode_kernels(
    rt: &CudaRuntime,
    config: &KernelConfig,
) -> Result<(String, CudaFunction, CudaFunction)> {
    let key = config.key();
    let merge_key = format!("{key}_merge");
    let mut cache = rt.kernels.lock().unwrap_or_else(|p| p.into_inner());
    if let (Some(f), Some(m)) = (cache.get(&key), cache.get(&merge_key)) {
        return Ok((key, f.clone(), m.clone()));
    }
    let src = config
        .render()
        .map_err(|e| AttnError::Render(e.to_string()))?;
    let arch = rt.device().arch();
    let jit_err = |e: crate::jit::JitError| AttnError::BackendUnavailable(e.to_string());
    let cubin = crate::kernel_cache::KernelCache::global()
        .map_err(jit_err)?
        .get_or_compile(&src.key, &src.source, &arch)
        .map_err(jit_err)?;
    let module = rt
        .device()
        .context
        .load_module(cudarc::nvrtc::Ptx::from_binary(cubin.bytes.clone()))
        .map_err(|e| AttnError::Cuda {
            call: format!("cuModuleLoadData {key} ({arch})"),
            msg: e.to_string(),
        })?;
    let load = |name: &str| {
        module.load_function(name).map_err(|e| AttnError::Cuda {
            call: format!("cuModuleGetFunction {name}"),
            msg: e.to_string(),
        })
    };
    let (f, m) = (load(&key)?, load(&merge_key)?);
    cache.insert(key.clone(), f.clone());
    cache.insert(merge_key, m.clone());
    Ok((key, f, m))
}

/// Number of KV splits for a decode step of `batch` sequences of `groups` groups whose
/// longest visible length is `max_len`, on a device of `sms` SMs.
pub fn num_splits(sms: usize, batch: usize, groups: usize, max_len: usize) -> usize {
    let blocks = (batch * groups).max(1);
    let want = (2 * sms).div_ceil(blocks);
    want.min(max_len.div_ceil(256)).clamp(1, 64)
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

/// Raw device pointers and sizes of one fused decode step (everything fixed-shape, so the
/// same value can be launched eagerly or captured in a graph). Layouts: see
/// templates/flash_decode.cu.
#[derive(Debug, Clone, Copy)]
pub struct FlashDecodeArgs {
    /// q `[batch, np, hn]` (unrotated).
    pub q: u64,
    /// New k `[batch, ng, hn]` (unrotated).
    pub k_new: u64,
    /// New v `[batch, ng, hn]`.
    pub v_new: u64,
    /// Layer K cache `[max_seq, max_batch, ng, hn]`.
    pub k_cache: u64,
    /// Layer V cache.
    pub v_cache: u64,
    /// int32 `[batch]`: position of the new token (= visible length before the append).
    pub cache_seqlens: u64,
    /// f32 `[rows, rot/2]` or 0 without rope.
    pub rope_cos: u64,
    /// f32 `[rows, rot/2]` or 0.
    pub rope_sin: u64,
    /// f32 `[splits, batch, np, hn]`.
    pub o_part: u64,
    /// f32 `[splits, batch, np]`.
    pub lse_part: u64,
    /// Output `[batch, np, hn]`.
    pub out: u64,
    /// f32 `[np, batch]`.
    pub lse: u64,
    /// f32 `[np]` learnable sinks or 0.
    pub sinks: u64,
    /// Gate `[batch, np, hn]` or 0.
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
    /// Softmax scale.
    pub softmax_scale: f32,
    /// Window left (-1 unbounded).
    pub window_left: i32,
    /// Window right (-1 unbounded).
    pub window_right: i32,
}

/// Queue the split and merge kernels of one decode step on `stream`.
pub fn launch_flash_decode(
    stream: &Arc<CudaStream>,
    key: &str,
    split: &CudaFunction,
    merge: &CudaFunction,
    a: &FlashDecodeArgs,
) -> Result<()> {
    let per = (a.num_heads / a.num_groups.max(1)).max(1) as usize;
    let warps = per.min(FLASH_DECODE_MAX_WARPS);
    let cfg = LaunchConfig {
        grid_dim: (a.num_splits as u32, a.num_groups as u32, a.batch as u32),
        block_dim: ((warps * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
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
    b.arg(&a.softmax_scale)
        .arg(&a.window_left)
        .arg(&a.window_right);
    // SAFETY: the argument list matches the flashdec entry point (render.rs docs); the
    // caller guarantees every pointer is a live buffer of the documented shape and that the
    // cache has room at cache_seqlens[b] (validated on the host).
    unsafe { b.launch(cfg) }.map_err(launch_err(key))?;
    let cfg = LaunchConfig {
        grid_dim: (a.batch as u32, a.num_heads as u32, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = stream.launch_builder(merge);
    b.arg(&a.o_part).arg(&a.lse_part).arg(&a.out).arg(&a.lse);
    b.arg(&a.sinks)
        .arg(&a.gate)
        .arg(&a.batch)
        .arg(&a.num_heads)
        .arg(&a.num_splits);
    // SAFETY: matches the `_merge` entry point; buffers as above.
    unsafe { b.launch(cfg) }.map_err(launch_err(key))?;
    Ok(())
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
    /// Capture `a`'s split + merge launches (the runtime's stream is synchronized first, so
    /// every buffer is ready). Errors: `Cuda` when capture or instantiation fails.
    pub fn capture(
        rt: &CudaRuntime,
        key: &str,
        split: &CudaFunction,
        merge: &CudaFunction,
        a: &FlashDecodeArgs,
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
        let launched = launch_flash_decode(&stream, key, split, merge, a);
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
