//! NVRTC compilation of rendered kernel sources straight to CUBIN.
//!
//! NVRTC is loaded at run time (cudarc's `dynamic-loading`). cudarc panics when a symbol is
//! used without the library present, so every entry point here probes first
//! ([`nvrtc_available`]) and returns [`JitError::NvrtcNotFound`] instead. On a machine
//! without CUDA, `scripts/install-nvrtc.sh` installs the `nvidia-cuda-nvrtc` wheel into
//! `.tools/nvrtc` and prints the directory to put on `LD_LIBRARY_PATH`.
//!
//! Options: `--gpu-architecture=<arch>`, `-std=c++17`, `-default-device`. No
//! `--use_fast_math`: the kernels already use `exp2f` with the softmax scale folded in, and
//! fast math would also flush denormals and approximate the divisions, `sincosf` and
//! `powf` of the rope, which the CPU reference does not.

use std::ffi::{c_char, c_int, CStr, CString};

use cudarc::nvrtc::sys;
use thiserror::Error;

/// Errors of NVRTC compilation.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum JitError {
    /// libnvrtc could not be loaded.
    #[error(
        "NVRTC not found: libnvrtc could not be loaded. Run scripts/install-nvrtc.sh and put \
         the directory it prints on LD_LIBRARY_PATH"
    )]
    NvrtcNotFound,
    /// A kernel failed to compile; `log` is NVRTC's full program log.
    #[error("NVRTC failed to compile kernel `{key}` for {arch} ({status}):\n{log}")]
    Compile {
        /// Kernel key (entry name).
        key: String,
        /// Target architecture, e.g. `sm_90a`.
        arch: String,
        /// NVRTC's status string.
        status: String,
        /// NVRTC's program log.
        log: String,
    },
    /// An argument that cannot be passed to NVRTC.
    #[error("argument `{arg}`: expected {expected}, got {got:?}")]
    InvalidArgument {
        /// Argument name.
        arg: &'static str,
        /// What was expected.
        expected: &'static str,
        /// The value given.
        got: String,
    },
    /// `ATTN_JIT=off` forbids compiling and the kernel is not in the cache.
    #[error(
        "kernel `{key}` for {arch} is not in the kernel cache ({cache_dir}) and ATTN_JIT=off \
         forbids compiling it; precompile it with `attn aot --arch {arch} ...` into that directory"
    )]
    JitDisabled {
        /// Kernel key (entry name).
        key: String,
        /// Target architecture.
        arch: String,
        /// The cache directory searched, or a note that there is none.
        cache_dir: String,
    },
    /// Another NVRTC call failed.
    #[error("NVRTC call {call} failed for kernel `{key}`: {status}")]
    Nvrtc {
        /// Kernel key.
        key: String,
        /// The NVRTC function.
        call: &'static str,
        /// NVRTC's status string.
        status: String,
    },
}

/// Whether libnvrtc can be loaded (safe to call on any machine).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the candidate library names.
    unsafe { sys::is_culib_present() }
}

fn status_string(r: sys::nvrtcResult) -> String {
    // SAFETY: only called after the library was found; NVRTC returns a static C string.
    let p = unsafe { sys::nvrtcGetErrorString(r) };
    if p.is_null() {
        return format!("{r:?}");
    }
    // SAFETY: non-null, NUL-terminated static string from NVRTC.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// NVRTC's `(major, minor)` version.
pub fn nvrtc_version() -> Result<(i32, i32), JitError> {
    if !nvrtc_available() {
        return Err(JitError::NvrtcNotFound);
    }
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: the library is present; both pointers are valid for writes.
    let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(JitError::Nvrtc {
            key: String::new(),
            call: "nvrtcVersion",
            status: status_string(r),
        });
    }
    Ok((major, minor))
}

/// Destroys the program on drop.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created by nvrtcCreateProgram and destroyed once.
            unsafe {
                sys::nvrtcDestroyProgram(&mut self.0);
            }
        }
    }
}

fn program_log(prog: &Program) -> String {
    let mut size: usize = 0;
    // SAFETY: valid program, valid out pointer.
    if unsafe { sys::nvrtcGetProgramLogSize(prog.0, &mut size) } != sys::nvrtcResult::NVRTC_SUCCESS
        || size == 0
    {
        return String::new();
    }
    let mut buf = vec![0u8; size];
    // SAFETY: the buffer holds `size` bytes as NVRTC asked.
    if unsafe { sys::nvrtcGetProgramLog(prog.0, buf.as_mut_ptr() as *mut c_char) }
        != sys::nvrtcResult::NVRTC_SUCCESS
    {
        return String::new();
    }
    while buf.last() == Some(&0) {
        buf.pop();
    }
    String::from_utf8_lossy(&buf).into_owned()
}

pub(crate) fn check_arch(arch: &str) -> Result<(), JitError> {
    let ok = arch
        .strip_prefix("sm_")
        .or_else(|| arch.strip_prefix("compute_"))
        .is_some_and(|rest| {
            let digits = rest.trim_end_matches(['a', 'f']);
            !digits.is_empty()
                && digits.len() + 1 >= rest.len()
                && digits.bytes().all(|b| b.is_ascii_digit())
        });
    if ok {
        Ok(())
    } else {
        Err(JitError::InvalidArgument {
            arg: "arch",
            expected: "a GPU architecture like `sm_80` or `sm_90a`",
            got: arch.to_string(),
        })
    }
}

/// The NVRTC options [`compile_cubin`] passes for `arch`, in order. The kernel cache hashes
/// them into its keys, so a change here invalidates every cached entry.
pub fn nvrtc_options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
        "-default-device".to_string(),
    ]
}

/// A successful compilation: the CUBIN image and NVRTC's log (warnings; usually empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// CUBIN (ELF) image for the requested architecture.
    pub cubin: Vec<u8>,
    /// NVRTC's program log.
    pub log: String,
}

/// Compile one rendered kernel (`source`, entry point named `key`) to CUBIN for `arch`
/// (`"sm_80"`, `"sm_90a"`, ...). A compile failure returns [`JitError::Compile`] with the
/// key and NVRTC's full log.
pub fn compile_cubin(key: &str, source: &str, arch: &str) -> Result<Vec<u8>, JitError> {
    compile_with_log(key, source, arch).map(|c| c.cubin)
}

/// Compile `source` for `arch` and return the program (errors as [`compile_with_log`]).
fn compile_program(key: &str, source: &str, arch: &str) -> Result<Program, JitError> {
    compile_program_with(key, source, arch, &[])
}

/// [`compile_program`] with `extra` NVRTC options after [`nvrtc_options`].
fn compile_program_with(
    key: &str,
    source: &str,
    arch: &str,
    extra: &[&str],
) -> Result<Program, JitError> {
    check_arch(arch)?;
    let c_src = CString::new(source).map_err(|_| JitError::InvalidArgument {
        arg: "source",
        expected: "CUDA source without NUL bytes",
        got: format!("source of `{key}` with a NUL byte"),
    })?;
    let c_name = CString::new(format!("{key}.cu")).map_err(|_| JitError::InvalidArgument {
        arg: "key",
        expected: "a kernel key without NUL bytes",
        got: key.to_string(),
    })?;
    if !nvrtc_available() {
        return Err(JitError::NvrtcNotFound);
    }
    let nvrtc_err = |call: &'static str, r: sys::nvrtcResult| JitError::Nvrtc {
        key: key.to_string(),
        call,
        status: status_string(r),
    };

    let mut prog = Program(std::ptr::null_mut());
    // SAFETY: the library is present; strings are NUL-terminated and outlive the call;
    // no headers are passed.
    let r = unsafe {
        sys::nvrtcCreateProgram(
            &mut prog.0,
            c_src.as_ptr(),
            c_name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err("nvrtcCreateProgram", r));
    }

    // `arch` was checked to be ASCII letters, digits and `_`: no NUL in any option.
    let opts: Vec<CString> = nvrtc_options(arch)
        .into_iter()
        .chain(extra.iter().map(|o| o.to_string()))
        .filter_map(|o| CString::new(o).ok())
        .collect();
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: valid program; option pointers live until the call returns.
    let r = unsafe { sys::nvrtcCompileProgram(prog.0, opt_ptrs.len() as c_int, opt_ptrs.as_ptr()) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(JitError::Compile {
            key: key.to_string(),
            arch: arch.to_string(),
            status: status_string(r),
            log: program_log(&prog),
        });
    }
    Ok(prog)
}

/// Compile one source to PTX for the virtual architecture `arch` (`"compute_80"`): the
/// parameter accesses tests read offsets from. Errors as [`compile_with_log`].
pub fn compile_ptx(key: &str, source: &str, arch: &str) -> Result<String, JitError> {
    let prog = compile_program(key, source, arch)?;
    let nvrtc_err = |call: &'static str, r: sys::nvrtcResult| JitError::Nvrtc {
        key: key.to_string(),
        call,
        status: status_string(r),
    };
    let mut size: usize = 0;
    // SAFETY: compiled program, valid out pointer.
    let r = unsafe { sys::nvrtcGetPTXSize(prog.0, &mut size) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err("nvrtcGetPTXSize", r));
    }
    let mut ptx = vec![0u8; size];
    // SAFETY: the buffer holds `size` bytes as NVRTC asked.
    let r = unsafe { sys::nvrtcGetPTX(prog.0, ptx.as_mut_ptr() as *mut c_char) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err("nvrtcGetPTX", r));
    }
    let end = ptx.iter().position(|&b| b == 0).unwrap_or(ptx.len());
    Ok(String::from_utf8_lossy(&ptx[..end]).into_owned())
}

/// [`compile_cubin`], also returning NVRTC's log of a successful compilation.
pub fn compile_with_log(key: &str, source: &str, arch: &str) -> Result<Compiled, JitError> {
    cubin_of(key, compile_program(key, source, arch)?, arch)
}

/// [`compile_with_log`] with ptxas's resource report in the log
/// (`--ptxas-options=-v`: per entry "Used N registers" and "N bytes spill stores"); see
/// [`PtxasUsage::parse`]. For tests and tuning: the kernel cache never uses it.
pub fn compile_with_ptxas_info(key: &str, source: &str, arch: &str) -> Result<Compiled, JitError> {
    let prog = compile_program_with(key, source, arch, &["--ptxas-options=-v"])?;
    cubin_of(key, prog, arch)
}

/// Registers and spills of one compiled entry, from ptxas's `-v` report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PtxasUsage {
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of spill stores.
    pub spill_stores: u32,
    /// Bytes of spill loads.
    pub spill_loads: u32,
}

impl PtxasUsage {
    /// The usage of every entry in a [`compile_with_ptxas_info`] log, in order, as
    /// (entry name, usage).
    pub fn parse(log: &str) -> Vec<(String, PtxasUsage)> {
        let num_before = |l: &str, unit: &str| -> Option<u32> {
            let end = l.find(unit)?;
            l[..end].split_whitespace().last()?.parse().ok()
        };
        let mut out = Vec::new();
        let mut name = String::new();
        let mut spills = (0, 0);
        for l in log.lines() {
            if let Some(rest) = l.split("Compiling entry function '").nth(1) {
                name = rest.split('\'').next().unwrap_or("").to_string();
                spills = (0, 0);
            } else if l.contains("bytes spill stores") {
                spills = (
                    num_before(l, "bytes spill stores").unwrap_or(0),
                    num_before(l, "bytes spill loads").unwrap_or(0),
                );
            } else if let Some(regs) = num_before(l, "registers") {
                if l.contains("Used") {
                    out.push((
                        name.clone(),
                        PtxasUsage {
                            registers: regs,
                            spill_stores: spills.0,
                            spill_loads: spills.1,
                        },
                    ));
                }
            }
        }
        out
    }
}

fn cubin_of(key: &str, prog: Program, arch: &str) -> Result<Compiled, JitError> {
    let nvrtc_err = |call: &'static str, r: sys::nvrtcResult| JitError::Nvrtc {
        key: key.to_string(),
        call,
        status: status_string(r),
    };
    let mut size: usize = 0;
    // SAFETY: compiled program, valid out pointer.
    let r = unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err("nvrtcGetCUBINSize", r));
    }
    let mut cubin = vec![0u8; size];
    // SAFETY: the buffer holds `size` bytes as NVRTC asked.
    let r = unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr() as *mut c_char) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err("nvrtcGetCUBIN", r));
    }
    if cubin.is_empty() {
        return Err(JitError::Nvrtc {
            key: key.to_string(),
            call: "nvrtcGetCUBIN",
            status: format!("empty CUBIN for {arch} (a virtual `compute_*` arch gives PTX only)"),
        });
    }
    Ok(Compiled {
        cubin,
        log: program_log(&prog),
    })
}

/// One kernel parameter as a CUBIN records it: position, byte offset in the parameter
/// buffer, byte size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CubinParam {
    /// Position in the parameter list (0-based).
    pub ordinal: u16,
    /// Byte offset in the parameter buffer.
    pub offset: u16,
    /// Byte size.
    pub size: u16,
}

/// [`cubin_params`] as the host's parameter layouts are written: `(byte offset, byte size)`
/// per parameter, in order (what `cuda::params::param_layout` and
/// `cuda::params::fwd_tma_param_layout` return). `None` as [`cubin_params`].
pub fn cubin_param_layout(cubin: &[u8], entry: &str) -> Option<Vec<(usize, usize)>> {
    cubin_params(cubin, entry).map(|ps| {
        ps.iter()
            .map(|p| (p.offset as usize, p.size as usize))
            .collect()
    })
}

/// The parameter list of entry point `entry` of a CUBIN, in ordinal order, from the
/// `EIATTR_KPARAM_INFO` records of its `.nv.info.<entry>` section (what the driver uses to
/// lay out a launch's parameter buffer). `None` when the image is not a 64-bit ELF or has no
/// such section. Used by the tests that hold the host's parameter structs to the kernels.
pub fn cubin_params(cubin: &[u8], entry: &str) -> Option<Vec<CubinParam>> {
    let u16_at = |o: usize| -> Option<u16> {
        Some(u16::from_le_bytes(cubin.get(o..o + 2)?.try_into().ok()?))
    };
    let u32_at = |o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(cubin.get(o..o + 4)?.try_into().ok()?))
    };
    let u64_at = |o: usize| -> Option<u64> {
        Some(u64::from_le_bytes(cubin.get(o..o + 8)?.try_into().ok()?))
    };
    if !cubin.starts_with(b"\x7fELF") || cubin.get(4) != Some(&2) {
        return None;
    }
    let shoff = u64_at(0x28)? as usize;
    let (shentsize, shnum, shstrndx) = (
        u16_at(0x3A)? as usize,
        u16_at(0x3C)? as usize,
        u16_at(0x3E)? as usize,
    );
    // (name offset, file offset, size) of section i.
    let section = |i: usize| -> Option<(usize, usize, usize)> {
        let h = shoff + i * shentsize;
        Some((
            u32_at(h)? as usize,
            u64_at(h + 0x18)? as usize,
            u64_at(h + 0x20)? as usize,
        ))
    };
    let (_, stroff, strsize) = section(shstrndx)?;
    let names = cubin.get(stroff..stroff + strsize)?;
    let want = format!(".nv.info.{entry}");
    let data = (0..shnum).find_map(|i| {
        let (name, off, size) = section(i)?;
        let end = names.get(name..)?.iter().position(|&c| c == 0)?;
        (names.get(name..name + end)? == want.as_bytes()).then(|| cubin.get(off..off + size))?
    })?;
    // Records: format byte, attribute byte, then a 2-byte value (formats 1-3) or a 2-byte
    // length and that many bytes (format 4, EIFMT_SVAL). KPARAM_INFO (0x17): u32 index,
    // u16 ordinal, u16 offset, u32 flags whose bits 18.. hold the size.
    const EIATTR_KPARAM_INFO: u8 = 0x17;
    let mut params = Vec::new();
    let mut i = 0;
    while i + 4 <= data.len() {
        let (fmt, attr) = (data[i], data[i + 1]);
        let len = u16::from_le_bytes([data[i + 2], data[i + 3]]) as usize;
        match fmt {
            4 => {
                let val = data.get(i + 4..i + 4 + len)?;
                if attr == EIATTR_KPARAM_INFO && val.len() >= 12 {
                    let flags = u32::from_le_bytes(val[8..12].try_into().ok()?);
                    params.push(CubinParam {
                        ordinal: u16::from_le_bytes([val[4], val[5]]),
                        offset: u16::from_le_bytes([val[6], val[7]]),
                        size: ((flags >> 18) & 0x3fff) as u16,
                    });
                }
                i += 4 + len;
            }
            1..=3 => i += 4,
            _ => break,
        }
    }
    params.sort_by_key(|p| p.ordinal);
    Some(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_arch() {
        for bad in ["", "sm_", "90a", "sm_9x", "sm_90ab", "gfx90a"] {
            assert!(
                matches!(
                    compile_cubin("k", "", bad),
                    Err(JitError::InvalidArgument { arg: "arch", .. })
                ),
                "{bad}"
            );
        }
        for good in ["sm_80", "sm_90a", "sm_100f", "compute_90"] {
            assert!(check_arch(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn rejects_nul_in_source() {
        assert!(matches!(
            compile_cubin("k", "a\0b", "sm_80"),
            Err(JitError::InvalidArgument { arg: "source", .. })
        ));
    }
}
