//! NCCL's library probe ([`nccl_version`]) and unique id ([`NcclUniqueId`]): made by rank 0
//! and handed to every rank in memory, through a file or an environment variable. Nothing
//! here needs a GPU.

use std::path::Path;
use std::time::{Duration, Instant};

use cudarc::nccl::{result as nccl_result, Id};

use crate::error::{AttnError, Result};

/// The lowest NCCL version whose API this module uses (2.7: `ncclSend` / `ncclRecv`), in
/// NCCL's version code.
const MIN_NCCL_VERSION: i32 = 2700;

/// The loaded libnccl's version code (`ncclGetVersion`: 22304 for 2.23.4).
///
/// Errors: [`AttnError::BackendUnavailable`] when libnccl cannot be loaded (cudarc looks for
/// `libnccl.so` on the loader's path: a pip-installed `libnccl.so.2` needs a `libnccl.so`
/// link beside it) or is older than 2.7.
pub fn nccl_version() -> Result<i32> {
    // SAFETY: probing only tries to dlopen the library (cudarc panics on a missing library
    // at first use, so this runs before any other NCCL call).
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(AttnError::BackendUnavailable(
            "libnccl (NCCL) was not found: put libnccl.so on LD_LIBRARY_PATH \
             (for a pip-installed nvidia-nccl, a libnccl.so link to libnccl.so.2)"
                .into(),
        ));
    }
    let v = nccl_result::get_nccl_version()
        .map_err(|e| AttnError::BackendUnavailable(format!("ncclGetVersion failed: {:?}", e.0)))?;
    if v < MIN_NCCL_VERSION {
        return Err(AttnError::BackendUnavailable(format!(
            "NCCL version code {v} is older than 2.7 (code {MIN_NCCL_VERSION})"
        )));
    }
    Ok(v)
}

/// NCCL's unique id (`ncclUniqueId`, 128 bytes): made once by rank 0, given to every rank.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclUniqueId([u8; 128]);

impl std::fmt::Debug for NcclUniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclUniqueId({}...)", &self.to_hex()[..16])
    }
}

impl NcclUniqueId {
    /// A fresh id (`ncclGetUniqueId`; on rank 0 only).
    ///
    /// Errors: those of [`nccl_version`]; [`AttnError::Collective`] (`ncclGetUniqueId`).
    pub fn new() -> Result<Self> {
        nccl_version()?;
        let id = Id::new().map_err(|e| AttnError::Collective {
            op: "ncclGetUniqueId".into(),
            rank: 0,
            expected: "ncclSuccess".into(),
            got: format!("{:?}", e.0),
        })?;
        Ok(NcclUniqueId(id.internal().map(|c| c as u8)))
    }

    /// The raw 128 bytes.
    pub fn bytes(&self) -> &[u8; 128] {
        &self.0
    }

    /// The id as 256 lowercase hex digits (for a file or an environment variable).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parse [`to_hex`](Self::to_hex)'s form (surrounding whitespace ignored).
    ///
    /// Errors: [`AttnError::InvalidArgument`] (`nccl_id`) for anything but 256 hex digits.
    pub fn from_hex(s: &str) -> Result<Self> {
        let s = s.trim();
        let bad = || AttnError::InvalidArgument {
            arg: "nccl_id".into(),
            expected: "256 hex digits (NcclUniqueId::to_hex)".into(),
            got: format!(
                "{} characters: {:?}",
                s.len(),
                s.chars().take(24).collect::<String>()
            ),
        };
        if s.len() != 256 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 128];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(NcclUniqueId(out))
    }

    /// The id from environment variable `var` (one process per GPU).
    ///
    /// Errors: [`AttnError::InvalidArgument`] (`var`) when it is unset; those of
    /// [`from_hex`](Self::from_hex).
    pub fn from_env(var: &str) -> Result<Self> {
        let v = std::env::var(var).map_err(|_| AttnError::InvalidArgument {
            arg: var.into(),
            expected: "an NCCL unique id (256 hex digits) set by the launcher".into(),
            got: "unset or not unicode".into(),
        })?;
        Self::from_hex(&v)
    }

    /// Write the id to `path` (a temporary file renamed into place, so a reader never sees
    /// half of it).
    ///
    /// Errors: [`AttnError::Io`].
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let io = |source| AttnError::Io {
            path: path.display().to_string(),
            source,
        };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        let tmp = tempfile::NamedTempFile::new_in(dir.unwrap_or(Path::new("."))).map_err(io)?;
        std::fs::write(tmp.path(), self.to_hex()).map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        Ok(())
    }

    /// Read the id from `path`, waiting up to `timeout` for rank 0 to write it.
    ///
    /// Errors: [`AttnError::Collective`] (`read nccl id`) when the file does not appear in
    /// time; [`AttnError::Io`]; those of [`from_hex`](Self::from_hex).
    pub fn read_file(path: impl AsRef<Path>, timeout: Duration) -> Result<Self> {
        let path = path.as_ref();
        let start = Instant::now();
        loop {
            match std::fs::read_to_string(path) {
                Ok(s) => return Self::from_hex(&s),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if start.elapsed() > timeout {
                        return Err(AttnError::Collective {
                            op: "read nccl id".into(),
                            rank: usize::MAX,
                            expected: format!(
                                "{} written by rank 0 within {timeout:?}",
                                path.display()
                            ),
                            got: "no file".into(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(AttnError::Io {
                        path: path.display().to_string(),
                        source,
                    })
                }
            }
        }
    }
}
