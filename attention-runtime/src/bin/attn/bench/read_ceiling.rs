//! The card's read-only bandwidth for `attn bench decode`: one kernel that reads a large
//! buffer once (16-byte non-coherent loads, a grid-stride loop over a grid of a few blocks per
//! SM, one 32-bit xor per block written so the loads cannot be dropped). A decode step only
//! reads its K/V, so it can pass the copy figure (read + write); issue 11 §2 reports decode
//! against both.

use std::sync::Arc;

use attention_runtime::cuda::CudaRuntime;
use attention_runtime::{AttnError, Result};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::common::cuda_err;

/// Entry point of [`SOURCE`].
const ENTRY: &str = "read_bandwidth";

/// CUDA source of the probe: `sink[blockIdx.x]` = xor of every 32-bit word the block read
/// from `src` (`n16` 16-byte vectors, 16-byte aligned).
const SOURCE: &str = r#"
extern "C" __global__ void __launch_bounds__(512) read_bandwidth(
    const uint4* __restrict__ src, unsigned long long n16, unsigned* __restrict__ sink) {
    unsigned acc = 0;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    // Four independent loads in flight per thread per iteration.
    for (; i + 3 * stride < n16; i += 4 * stride) {
        uint4 a = __ldg(src + i), b = __ldg(src + i + stride);
        uint4 c = __ldg(src + i + 2 * stride), d = __ldg(src + i + 3 * stride);
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w;
        acc ^= c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < n16; i += stride) {
        uint4 a = __ldg(src + i);
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    for (int o = 16; o > 0; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
    __shared__ unsigned part[16];
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned r = 0;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) r ^= part[w];
        sink[blockIdx.x] = r;
    }
}
"#;

/// The loaded probe and its sink buffer.
pub struct ReadProbe {
    f: cudarc::driver::CudaFunction,
    sink: CudaSlice<u32>,
    blocks: u32,
}

impl ReadProbe {
    /// Compile (NVRTC, for the runtime's device) and load the probe, with a grid of `4 * sms`
    /// blocks of 512 threads.
    ///
    /// Errors: [`AttnError::Jit`] (compile), [`AttnError::Cuda`] (load, allocation).
    pub fn new(rt: &CudaRuntime, sms: usize) -> Result<Self> {
        let arch = rt.device().arch();
        let cubin = attention_runtime::jit::compile_cubin(ENTRY, SOURCE, &arch)?;
        let m = rt
            .device()
            .context
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .map_err(cuda_err("cuModuleLoadData read_bandwidth"))?;
        let f = m
            .load_function(ENTRY)
            .map_err(cuda_err("cuModuleGetFunction read_bandwidth"))?;
        let blocks = (4 * sms).max(1) as u32;
        let sink = rt
            .stream()
            .alloc_zeros(blocks as usize)
            .map_err(cuda_err("alloc read sink"))?;
        Ok(ReadProbe { f, sink, blocks })
    }

    /// Queue one read of all of `src` (its length a multiple of 8 elements) on `stream`.
    ///
    /// Errors: [`AttnError::InvalidArgument`] for a length not a multiple of 8;
    /// [`AttnError::Cuda`] (launch).
    pub fn read(
        &mut self,
        stream: &Arc<cudarc::driver::CudaStream>,
        src: &CudaSlice<bf16>,
    ) -> Result<()> {
        if !src.len().is_multiple_of(8) {
            return Err(AttnError::InvalidArgument {
                arg: "read probe buffer".into(),
                expected: "a multiple of 8 bf16 elements (16-byte vectors)".into(),
                got: src.len().to_string(),
            });
        }
        let n16 = (src.len() / 8) as u64;
        let cfg = LaunchConfig {
            grid_dim: (self.blocks, 1, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&self.f);
        b.arg(src).arg(&n16).arg(&mut self.sink);
        // SAFETY: `src` holds n16 16-byte vectors (checked above; CUDA allocations are
        // 256-byte aligned), `sink` holds `blocks` u32, the grid has `blocks` blocks.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(cuda_err("launch read_bandwidth"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe compiles with NVRTC alone for Hopper and Ampere, without spills, and its
    /// entry takes (pointer, u64, pointer) as `read` pushes them.
    #[test]
    fn probe_compiles_with_nvrtc() {
        if std::env::var("ATTN_SKIP_NVRTC").as_deref() == Ok("1") {
            eprintln!("ATTN_SKIP_NVRTC=1: skipping the read probe's NVRTC check");
            return;
        }
        assert!(
            attention_runtime::jit::nvrtc_available(),
            "NVRTC (libnvrtc) not found: run scripts/install-nvrtc.sh (or set ATTN_SKIP_NVRTC=1)"
        );
        for arch in ["sm_90a", "sm_80"] {
            let c = attention_runtime::jit::compile_with_ptxas_info(ENTRY, SOURCE, arch).unwrap();
            let params = attention_runtime::jit::cubin_params(&c.cubin, ENTRY).unwrap();
            let layout: Vec<(u16, u16)> = params.iter().map(|p| (p.offset, p.size)).collect();
            assert_eq!(layout, [(0, 8), (8, 8), (16, 8)], "{arch}");
            for (_, u) in attention_runtime::jit::PtxasUsage::parse(&c.log) {
                assert_eq!(u.spill_stores, 0, "{arch}: {}", c.log);
            }
        }
    }
}
