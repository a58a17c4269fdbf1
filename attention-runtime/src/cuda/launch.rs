//! Kernel compilation, loading and launch errors.
//!
//! A kernel is rendered from its [`KernelConfig`], fetched from the process-wide
//! [`KernelCache`](crate::kernel_cache::KernelCache) (memory, then the on-disk cache, then
//! NVRTC straight to a CUBIN) for the device's exact arch ([`CudaDevice::arch`](crate::device::CudaDevice::arch): `sm_90a`
//! on H100/H200), loaded as a module, and cached per device under its key. The cache lock is
//! held while compiling, so a kernel is compiled once even when several threads ask for it.

use attention_codegen::render::KernelConfig;
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule, DriverError};

use super::CudaRuntime;
use crate::error::{AttnError, Result};
use crate::jit::JitError;

/// The loaded function for `config` on `rt`'s device, compiling it on first use.
///
/// Errors: [`AttnError::Render`] (template), [`AttnError::Jit`] (NVRTC missing, a compile
/// error with the key and NVRTC's log, or `ATTN_JIT=off` and a cache miss), [`AttnError::Cuda`]
/// (module load or function lookup).
pub fn kernel(rt: &CudaRuntime, config: &KernelConfig) -> Result<(String, CudaFunction)> {
    let key = config.key();
    let mut cache = rt.kernels.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(f) = cache.get(&key) {
        return Ok((key, f.clone()));
    }
    let module = load_module(rt, config)?;
    let f = load_function(&module, &key)?;
    cache.insert(key.clone(), f.clone());
    Ok((key, f))
}

/// Render `config`, get its CUBIN for the device's arch from the kernel cache (compiling on a
/// miss) and load it as a module. Callers keep the functions they take from it in
/// `rt.kernels`.
///
/// Errors: [`AttnError::Render`], [`AttnError::Jit`] (NVRTC missing, a compile error with
/// the key and log, or `ATTN_JIT=off` and a miss), [`AttnError::Cuda`] (module load).
pub(crate) fn load_module(rt: &CudaRuntime, config: &KernelConfig) -> Result<Arc<CudaModule>> {
    let src = config
        .render()
        .map_err(|e| AttnError::Render(e.to_string()))?;
    let arch = rt.device().arch();
    let cubin =
        crate::kernel_cache::KernelCache::global()?.get_or_compile(&src.key, &src.source, &arch)?;
    crate::cuda::prefill_sm80::check_tma_param_table(config, &cubin.bytes)?;
    rt.device()
        .context
        .load_module(cudarc::nvrtc::Ptx::from_binary(cubin.bytes.clone()))
        .map_err(|e| AttnError::Cuda {
            call: format!("cuModuleLoadData {} ({arch})", src.key),
            msg: e.to_string(),
        })
}

/// Pick and load the forward kernel: `fast` (the registry's tensor-core kernel,
/// [`prefill_tensor_core`](attention_codegen::registry::prefill_tensor_core): `prefill_*_sm90`
/// on Hopper, `prefill_*_sm80` elsewhere, `None` where this GPU runs neither) when it loads,
/// else `fallback` (the general `prefill_rows` kernel). `load` loads one config ([`kernel`] on a
/// device).
///
/// A fast kernel that fails to load falls back with a `tracing` warning naming both kernels
/// and the error, except for [`JitError::JitDisabled`] (`ATTN_JIT=off` and the kernel is not in
/// the cache): that error is returned, naming the fast kernel's key, so a deploy cache that
/// lacks it fails loudly instead of running the slow kernel.
///
/// Errors: `JitDisabled` for the fast kernel, or `fallback`'s load error.
pub fn select_forward<T>(
    fast: Option<&KernelConfig>,
    fallback: &KernelConfig,
    mut load: impl FnMut(&KernelConfig) -> Result<T>,
) -> Result<(KernelConfig, T)> {
    if let Some(c) = fast {
        match load(c) {
            Ok(t) => return Ok((c.clone(), t)),
            Err(e @ AttnError::Jit(JitError::JitDisabled { .. })) => return Err(e),
            Err(e) => tracing::warn!(
                "tensor-core forward kernel {} unavailable, falling back to {} ({e})",
                c.key(),
                fallback.key()
            ),
        }
    }
    let t = load(fallback)?;
    Ok((fallback.clone(), t))
}

/// The entry point `name` of a loaded module.
pub(crate) fn load_function(module: &Arc<CudaModule>, name: &str) -> Result<CudaFunction> {
    module.load_function(name).map_err(|e| AttnError::Cuda {
        call: format!("cuModuleGetFunction {name}"),
        msg: e.to_string(),
    })
}

/// Map a launch failure to [`AttnError::KernelLaunch`] naming `key`.
pub fn launch_err(key: &str) -> impl FnOnce(DriverError) -> AttnError + '_ {
    move |e| AttnError::KernelLaunch {
        key: key.to_string(),
        msg: e.to_string(),
    }
}
