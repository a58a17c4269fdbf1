//! `--profile-once`: the GPU side of [`ncu`](super::ncu)'s per-call kernel sums. Each
//! profiled call runs inside a `cuProfilerStart` / `cuProfilerStop` window that begins with
//! one launch of the empty [`MARKER`] kernel (compiled here by NVRTC), so Nsight Compute,
//! started with `--profile-from-start off`, profiles exactly the marker and that call's
//! kernels. Without a profiler attached the windows cost nothing but the marker launch.

use std::sync::Arc;

use attention_runtime::device::CudaDevice;
use attention_runtime::jit::compile_cubin;
use attention_runtime::{AttnError, Result};
use cudarc::driver::{CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

use super::common::cuda_err;
use super::ncu::MARKER;

/// Opens one profiler window per call (see the module docs).
pub struct Profiler {
    stream: Arc<CudaStream>,
    marker: CudaFunction,
    _module: Arc<CudaModule>,
    windows: u32,
}

impl Profiler {
    /// Compile and load the marker kernel for `device`; windows go on `stream`.
    ///
    /// Errors: [`AttnError::Cuda`] when NVRTC cannot compile the marker or its module does
    /// not load.
    pub fn new(device: &CudaDevice, stream: &Arc<CudaStream>) -> Result<Self> {
        let src =
            format!("extern \"C\" __global__ void {MARKER}(int window) {{ (void)window; }}\n");
        let cubin = compile_cubin(MARKER, &src, &device.arch()).map_err(|e| AttnError::Cuda {
            call: format!("NVRTC {MARKER}"),
            msg: e.to_string(),
        })?;
        let module = device
            .context
            .load_module(Ptx::from_binary(cubin))
            .map_err(cuda_err("cuModuleLoadData marker"))?;
        let marker = module
            .load_function(MARKER)
            .map_err(cuda_err("cuModuleGetFunction marker"))?;
        Ok(Profiler {
            stream: stream.clone(),
            marker,
            _module: module,
            windows: 0,
        })
    }

    /// Run `f` (one call, already warmed up) in a profiler window: synchronize, start the
    /// profiler, launch the marker, run `f`, synchronize, stop the profiler. The window is
    /// closed even when `f` fails.
    pub fn window(&mut self, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let st = &self.stream;
        st.synchronize().map_err(cuda_err("profile: synchronize"))?;
        st.context()
            .bind_to_thread()
            .map_err(cuda_err("profile: bind context"))?;
        // SAFETY: plain driver calls on the current context; no pointers are passed.
        unsafe { cudarc::driver::sys::cuProfilerStart() }
            .result()
            .map_err(cuda_err("cuProfilerStart"))?;
        let w = self.windows as i32;
        let mut launch = st.launch_builder(&self.marker);
        launch.arg(&w);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the marker takes one int and touches no memory.
        let r = unsafe { launch.launch(cfg) }
            .map(|_| ())
            .map_err(cuda_err("launch marker"))
            .and_then(|()| f())
            .and_then(|()| st.synchronize().map_err(cuda_err("profile: synchronize")));
        // SAFETY: as above.
        let stop = unsafe { cudarc::driver::sys::cuProfilerStop() }
            .result()
            .map_err(cuda_err("cuProfilerStop"));
        self.windows += 1;
        r.and(stop)
    }
}
