//! Devices: the CPU reference backend and CUDA GPUs.
//!
//! Probing never panics. cudarc panics when libcuda or libnvrtc is absent, so every CUDA entry
//! point first checks `is_culib_present()` and returns [`AttnError::BackendUnavailable`].

use crate::error::{AttnError, Result};
use std::fmt;
use std::sync::Arc;

/// A CUDA GPU that was opened successfully.
#[derive(Clone)]
pub struct CudaDevice {
    /// The CUDA ordinal.
    pub ordinal: usize,
    /// The marketing name (`NVIDIA H100 80GB HBM3`).
    pub name: String,
    /// Compute capability `(major, minor)`.
    pub compute_capability: (i32, i32),
    /// The cudarc context (primary context of the device).
    pub context: Arc<cudarc::driver::CudaContext>,
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .field("compute_capability", &self.compute_capability)
            .finish()
    }
}

impl CudaDevice {
    /// The NVRTC architecture for this device's exact compute capability: `sm_90a` on
    /// Hopper (the `a` unlocks wgmma/setmaxnreg), `sm_80` on A100, `sm_89`, ...
    pub fn arch(&self) -> String {
        arch_for_capability(self.compute_capability)
    }
}

/// The NVRTC `--gpu-architecture` name for a compute capability. Hopper (9.0) and
/// Blackwell datacenter parts get their arch-specific `a` variant.
pub fn arch_for_capability((major, minor): (i32, i32)) -> String {
    let suffix = if minor == 0 && (major == 9 || major == 10) {
        "a"
    } else {
        ""
    };
    format!("sm_{major}{minor}{suffix}")
}

/// Where a layer runs.
#[derive(Debug, Clone)]
pub enum Device {
    /// The CPU reference backend (f32, f64 accumulation): the oracle and the fallback.
    Cpu,
    /// A CUDA GPU.
    Cuda(CudaDevice),
}

impl Device {
    /// Open CUDA device `ordinal`. Errors (never panics) when libcuda is missing, the driver
    /// fails to initialize, or there is no such GPU.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        // SAFETY: probing only tries to dlopen the library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(AttnError::BackendUnavailable(
                "libcuda (the NVIDIA driver library) was not found".into(),
            ));
        }
        let count = cudarc::driver::CudaContext::device_count()
            .map_err(|e| AttnError::BackendUnavailable(format!("CUDA driver init failed: {e}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(AttnError::InvalidArgument {
                arg: "ordinal".into(),
                expected: format!("a CUDA device ordinal below {count}"),
                got: ordinal.to_string(),
            });
        }
        let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(|e| {
            AttnError::BackendUnavailable(format!("opening CUDA device {ordinal} failed: {e}"))
        })?;
        let name = ctx.name().unwrap_or_else(|_| "unknown CUDA device".into());
        let compute_capability = ctx.compute_capability().map_err(|e| {
            AttnError::BackendUnavailable(format!("reading compute capability failed: {e}"))
        })?;
        Ok(Device::Cuda(CudaDevice {
            ordinal,
            name,
            compute_capability,
            context: ctx,
        }))
    }

    /// CUDA device 0 when it can be opened, otherwise the CPU backend. Logs which, and why.
    pub fn best() -> Device {
        match Device::cuda(0) {
            Ok(d) => {
                tracing::info!("using {d}");
                d
            }
            Err(e) => {
                tracing::info!("using the CPU reference backend ({e})");
                Device::Cpu
            }
        }
    }

    /// Whether this is a CUDA device.
    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// Parse a `--device` flag: `cpu`, `cuda` or `cuda:N`.
    pub fn from_flag(flag: &str) -> Result<Device> {
        match flag {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Device::cuda(0),
            s if s.starts_with("cuda:") => {
                let n = s[5..]
                    .parse::<usize>()
                    .map_err(|_| AttnError::InvalidArgument {
                        arg: "--device".into(),
                        expected: "cpu, cuda or cuda:N".into(),
                        got: s.into(),
                    })?;
                Device::cuda(n)
            }
            other => Err(AttnError::InvalidArgument {
                arg: "--device".into(),
                expected: "cpu, cuda or cuda:N".into(),
                got: other.into(),
            }),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("CPU reference backend"),
            Device::Cuda(d) => write!(
                f,
                "CUDA device {} ({}, sm_{}{})",
                d.ordinal, d.name, d.compute_capability.0, d.compute_capability.1
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names() {
        assert_eq!(arch_for_capability((9, 0)), "sm_90a");
        assert_eq!(arch_for_capability((8, 0)), "sm_80");
        assert_eq!(arch_for_capability((8, 9)), "sm_89");
    }

    #[test]
    fn bad_device_flag_is_an_error() {
        let e = Device::from_flag("tpu").unwrap_err().to_string();
        assert!(e.contains("--device") && e.contains("tpu"), "{e}");
        let e = Device::from_flag("cuda:x").unwrap_err().to_string();
        assert!(e.contains("cuda:x"), "{e}");
    }

    #[test]
    fn best_never_panics() {
        // On a machine without a GPU this must fall back to the CPU; with one, open it.
        let d = Device::best();
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            assert!(!d.is_cuda());
        }
    }
}
