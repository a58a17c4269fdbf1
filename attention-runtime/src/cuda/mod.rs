//! The CUDA backend: device tensors, cuBLASLt linears, NVRTC-compiled kernels and the layer.
//!
//! - [`tensor`]: [`DeviceTensor`] (bf16 / f16 / f32, row-major, host round trips).
//! - [`linear`]: `linear_qkv`, `linear_q`, `linear_kv`, `linear_proj` through cuBLASLt.
//! - [`launch`]: the per-device kernel cache (render -> NVRTC CUBIN for the exact arch ->
//!   module) and launch helpers whose errors name the kernel key.
//! - [`params`]: the kernel families' typed parameter structs ([`params::FwdParams`]) and
//!   their launch; [`tma`]: the TMA tensor maps of the warp-specialized Hopper prefill tile.
//! - [`layer`]: [`CudaLayer`], any [`AttentionLayer`](crate::AttentionLayer) on the GPU.
//! - [`cross_cache`]: [`DeviceCrossKvCache`], cross-attention's cached encoder context.
//! - [`train_ops`]: the layer backward's kernels around the attention backward
//!   (`qkv_prep_backward`, gate backward, deterministic column sums) and its GEMMs; the
//!   training entry points are [`CudaLayer::forward_train_device`] and friends.
//!
//! Everything a layer does is queued on its runtime's stream ([`CudaRuntime::stream`]: the
//! device's default one, or a caller's through [`CudaRuntime::with_stream`] and
//! [`CudaLayer::set_runtime`]); device calls never synchronize, host-tensor conveniences do
//! when they read the result back. [`wrap`] lets the device calls read and write a caller's
//! cudarc buffers without copies.

pub mod backward;
pub mod cp_backward_kernels;
pub mod cp_kernels;
pub mod cross_cache;
pub mod decode;
pub mod kv_cache;
pub mod launch;
pub mod layer;
pub mod linear;
pub mod params;
pub mod prefill_sm80;
pub mod tensor;
pub mod tma;
pub mod train_ops;
pub mod wrap;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublaslt::CudaBlasLT;
use cudarc::driver::{CudaFunction, CudaStream};

use crate::device::CudaDevice;
use crate::error::{AttnError, Result};

pub use cross_cache::DeviceCrossKvCache;
pub use kv_cache::{DevicePagedKvCache, DeviceStaticKvCache};
pub use layer::{CudaLayer, CudaSaved};
pub use linear::DeviceLinear;
pub use tensor::{DeviceData, DeviceElem, DeviceTensor, ElemType};
pub use wrap::{DeviceTensorMut, DeviceTensorRef};

/// Bytes cuBLASLt's workspace takes on Hopper (cudarc allocates it and panics if it cannot,
/// so [`CudaRuntime::get`] checks free memory first).
const BLASLT_WORKSPACE: usize = 32 << 20;

/// Per-device state shared by every layer on that device: the stream, the cuBLASLt handle
/// and the in-memory kernel cache (key -> loaded function).
pub struct CudaRuntime {
    device: CudaDevice,
    stream: Arc<CudaStream>,
    blas: CudaBlasLT,
    /// Shared by every runtime of the device (see [`CudaRuntime::with_stream`]).
    pub(crate) kernels: Arc<Mutex<HashMap<String, CudaFunction>>>,
}

impl std::fmt::Debug for CudaRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaRuntime")
            .field("device", &self.device)
            .finish()
    }
}

fn runtimes() -> &'static Mutex<HashMap<usize, Arc<CudaRuntime>>> {
    static R: OnceLock<Mutex<HashMap<usize, Arc<CudaRuntime>>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Keep freed memory in the device's default stream-ordered pool (release threshold: no
/// limit) instead of returning it to the driver at every synchronization. Every call's
/// intermediates come from that pool (cudarc allocates with `cuMemAllocAsync`); with the
/// driver's default threshold of 0 a call that follows a synchronization maps its buffers
/// afresh, which costs time proportional to their size (what the PyTorch caching allocator
/// avoids the same way). Memory stays available to other pools and processes only through
/// `cuMemPoolTrimTo`.
fn keep_pool_memory(device: &CudaDevice) -> Result<()> {
    use cudarc::driver::sys;
    let dev = device.context.cu_device();
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold: u64 = u64::MAX;
    // SAFETY: plain driver calls on a device the context was created for; `pool` and
    // `threshold` outlive the calls, and the attribute takes a cuuint64_t.
    let res = unsafe {
        match sys::cuDeviceGetDefaultMemPool(&mut pool, dev) {
            sys::CUresult::CUDA_SUCCESS => sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            ),
            e => e,
        }
    };
    match res {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        e => Err(AttnError::Cuda {
            call: "cuMemPoolSetAttribute RELEASE_THRESHOLD".into(),
            msg: format!("{e:?}"),
        }),
    }
}

/// A cuBLASLt handle on `stream` of `device`, after checking that the device has room for
/// its workspace (cudarc allocates it and panics if it cannot).
fn blas_on(device: &CudaDevice, stream: &Arc<CudaStream>) -> Result<CudaBlasLT> {
    let ctx = &device.context;
    ctx.bind_to_thread()
        .map_err(tensor::cuda_err("bind_to_thread"))?;
    let (free, _) = ctx
        .mem_get_info()
        .map_err(tensor::cuda_err("mem_get_info"))?;
    if free < BLASLT_WORKSPACE {
        return Err(AttnError::DeviceAlloc {
            arg: "cuBLASLt workspace".into(),
            bytes: BLASLT_WORKSPACE,
            msg: format!("only {free} bytes free"),
        });
    }
    CudaBlasLT::new(stream.clone()).map_err(|e| AttnError::Cuda {
        call: "cublasLtCreate".into(),
        msg: e.to_string(),
    })
}

impl CudaRuntime {
    /// The runtime of `device` (created once per ordinal, then shared).
    ///
    /// Errors: [`AttnError::DeviceAlloc`] when the device lacks memory for cuBLASLt's
    /// workspace, [`AttnError::Cuda`] when the handle cannot be created.
    pub fn get(device: &CudaDevice) -> Result<Arc<CudaRuntime>> {
        let mut map = runtimes().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = map.get(&device.ordinal) {
            return Ok(r.clone());
        }
        let stream = device.context.default_stream();
        let blas = blas_on(device, &stream)?;
        keep_pool_memory(device)?;
        let rt = Arc::new(CudaRuntime {
            device: device.clone(),
            stream,
            blas,
            kernels: Arc::new(Mutex::new(HashMap::new())),
        });
        map.insert(device.ordinal, rt.clone());
        Ok(rt)
    }

    /// A runtime of the same device whose work is queued on `stream`, a caller's stream of
    /// this device's context (e.g. `device.context.new_stream()`, or an engine's own). It
    /// shares the device's kernel cache and has its own cuBLASLt handle (and 32 MiB
    /// workspace), so make one per stream and hand it to every layer
    /// ([`CudaLayer::set_runtime`]). Buffers made on other streams stay usable: cudarc's event
    /// tracking orders their uses across streams.
    ///
    /// Errors: `InvalidArgument` (`stream`) for a stream of another device (devices are
    /// compared by ordinal: cudarc opens each device's primary context); `DeviceAlloc` /
    /// `Cuda` as [`get`](Self::get).
    pub fn with_stream(&self, stream: Arc<CudaStream>) -> Result<Arc<CudaRuntime>> {
        if stream.context().ordinal() != self.device.ordinal {
            return Err(AttnError::InvalidArgument {
                arg: "stream".into(),
                expected: format!("a stream of device {}'s context", self.device.ordinal),
                got: "a stream of another context".into(),
            });
        }
        let blas = blas_on(&self.device, &stream)?;
        Ok(Arc::new(CudaRuntime {
            device: self.device.clone(),
            stream,
            blas,
            kernels: self.kernels.clone(),
        }))
    }

    /// The device.
    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    /// The stream every operation of this runtime is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The cuBLASLt handle.
    pub fn blas(&self) -> &CudaBlasLT {
        &self.blas
    }

    /// Wait for the stream; a failure names `what` (the kernels queued since the last sync).
    pub fn synchronize(&self, what: &str) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| AttnError::KernelLaunch {
                key: what.to_string(),
                msg: e.to_string(),
            })
    }

    /// Number of kernels compiled and loaded in this process for this device.
    pub fn cached_kernels(&self) -> usize {
        self.kernels.lock().map(|m| m.len()).unwrap_or(0)
    }
}
