//! Kernel cache: compiled CUBINs in memory and on disk, so that NVRTC runs once per kernel
//! per machine (or never, with a cache shipped by `attn aot`).
//!
//! # Lookup
//! [`KernelCache::get_or_compile`] looks a kernel up by its readable key, its source, the
//! NVRTC options ([`jit::nvrtc_options`]) and the target arch, in order:
//! 1. the in-process map (one slot per kernel, so one cache serves several devices: a
//!    device asks for its own arch);
//! 2. the on-disk entry;
//! 3. NVRTC (unless [`CacheConfig::jit`] is `false`, i.e. `ATTN_JIT=off`), then the entry is
//!    written to disk.
//!
//! A kernel is compiled once even when many threads ask for it at the same moment: each kernel
//! has its own slot mutex, held while that kernel is loaded or compiled; the map of slots is
//! locked only to find or insert a slot, never during a compile.
//!
//! # On-disk format
//! Directory: `ATTN_CACHE_DIR` if set, else the user's cache directory (from the `dirs`
//! crate: `$XDG_CACHE_HOME`, else `$HOME/.cache` on Linux) + `/attention-kernels`
//! ([`CacheConfig::default_dir`]).
//!
//! File name: `<key>.<arch>.<hash16>.cubin`, where `<key>` is the kernel key (characters other
//! than `[A-Za-z0-9_-]` become `_`) and `<hash16>` is the first 16 hex digits of a SHA-256 of
//! the key, the source, the NVRTC options, the arch and the NVRTC version.
//!
//! Every entry is a header followed by the CUBIN (all integers little-endian):
//!
//! | bytes | field |
//! |-------|-------|
//! | 8 | magic `ATTNCUBN` |
//! | 4 | format version ([`FORMAT_VERSION`]) |
//! | 4 + K | key length, key (UTF-8) |
//! | 4 + A | arch length, arch |
//! | 4 + 4 | NVRTC major, minor (i32) |
//! | 32 | source hash: SHA-256 of key, source, options and arch (no NVRTC version) |
//! | 8 | payload length |
//! | 32 | payload checksum (SHA-256 of the CUBIN) |
//! | N | payload: the CUBIN |
//!
//! An entry is written to a temp file in the same directory (`tempfile`) and renamed over the
//! final name, so readers (other processes sharing the directory) see either no entry or a whole one.
//! An entry whose header or checksum does not match (truncated, corrupted, written by another
//! version) is logged with `tracing::warn`, recompiled and replaced. When the directory
//! cannot be written (read-only, full, or not creatable), the cache warns once and continues
//! in memory only; existing entries are still read.
//!
//! # Hash
//! Both hashes are SHA-256 (the `sha2` crate). Fields are length-prefixed so that no two
//! field lists hash the same byte stream. The checksum catches any corruption of the payload
//! (not only single-byte flips), and the header repeats the key, arch, NVRTC version and the
//! full source hash, which are checked on every load; the file name carries only 64 bits of
//! the hash, enough to keep entries apart, since the header is what a load trusts.
//!
//! # Machines without NVRTC
//! When libnvrtc cannot be loaded ([`CacheConfig::nvrtc_version`] is `None`), the file name's
//! hash cannot be computed; the cache then scans for `<key>.<arch>.*.cubin` entries whose
//! source hash matches and takes the newest NVRTC version. A deploy with only the driver
//! can run from a cache shipped by `attn aot`.

use std::collections::HashMap;
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::jit::{self, JitError};

/// Environment variable overriding the cache directory.
pub const CACHE_DIR_ENV: &str = "ATTN_CACHE_DIR";
/// Environment variable that forbids compiling when set to `off` (or `0`, `false`, `no`).
pub const JIT_ENV: &str = "ATTN_JIT";
/// Version of the on-disk entry format; entries of another version are recompiled.
///
/// Version 1 used 64-bit FNV-1a hashes; version 2 uses SHA-256.
pub const FORMAT_VERSION: u32 = 2;
/// Sub-directory of the user's cache directory.
pub const CACHE_SUBDIR: &str = "attention-kernels";

const MAGIC: [u8; 8] = *b"ATTNCUBN";
const EXTENSION: &str = "cubin";
const MAX_KEY_IN_NAME: usize = 120;

/// A SHA-256 digest: the source hash and the payload checksum of an entry.
type Digest256 = [u8; 32];

/// SHA-256 fed with length-prefixed fields, so that no two field lists hash the same byte
/// stream.
struct FieldHasher(Sha256);

impl FieldHasher {
    fn new() -> Self {
        Self(Sha256::new())
    }

    /// Feed one field: its length (u64 LE), then its bytes.
    fn field(&mut self, bytes: &[u8]) {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    fn finish(self) -> Digest256 {
        self.0.finalize().into()
    }
}

/// SHA-256 of `bytes`: the payload checksum.
fn checksum(bytes: &[u8]) -> Digest256 {
    Sha256::digest(bytes).into()
}

/// Lower-case hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Hash of the key, source, NVRTC options and arch: identifies a kernel build independently
/// of the NVRTC version.
fn source_hash(key: &str, source: &str, arch: &str) -> Digest256 {
    let mut h = FieldHasher::new();
    h.field(b"attn-kernel-cache");
    h.field(key.as_bytes());
    h.field(source.as_bytes());
    let opts = jit::nvrtc_options(arch);
    h.field(&(opts.len() as u64).to_le_bytes());
    for o in &opts {
        h.field(o.as_bytes());
    }
    h.field(arch.as_bytes());
    h.finish()
}

/// The file name's hash: the first 64 bits of a SHA-256 of the source hash and the NVRTC
/// version.
fn entry_hash(source_hash: &Digest256, nvrtc: (i32, i32)) -> u64 {
    let mut h = FieldHasher::new();
    h.field(source_hash);
    h.field(&nvrtc.0.to_le_bytes());
    h.field(&nvrtc.1.to_le_bytes());
    let d = h.finish();
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// The key as it appears in file names.
fn file_key(key: &str) -> String {
    let mut s: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    s.truncate(MAX_KEY_IN_NAME);
    if s.is_empty() {
        s.push('_');
    }
    s
}

fn file_name(key: &str, arch: &str, hash: u64) -> String {
    format!("{}.{arch}.{hash:016x}.{EXTENSION}", file_key(key))
}

/// A compiled kernel image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cubin {
    /// Kernel key; also the CUDA entry point's name.
    pub key: String,
    /// The architecture the image was built for, e.g. `sm_90a`.
    pub arch: String,
    /// The CUBIN (ELF) image, ready for `cuModuleLoadData`.
    pub bytes: Vec<u8>,
}

/// Where a lookup found its kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOrigin {
    /// The in-process map.
    Memory,
    /// An on-disk entry.
    Disk,
    /// NVRTC compiled it during this lookup.
    Compiled,
}

/// Configuration of a [`KernelCache`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Directory of the on-disk cache; `None` for memory only.
    pub dir: Option<PathBuf>,
    /// Whether a miss may compile with NVRTC (`ATTN_JIT=off` sets `false`).
    pub jit: bool,
    /// NVRTC's `(major, minor)`, part of the on-disk key; `None` when libnvrtc is absent.
    pub nvrtc_version: Option<(i32, i32)>,
}

impl CacheConfig {
    /// JIT on, the given directory, and the NVRTC version of the loadable libnvrtc (if any).
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            jit: true,
            nvrtc_version: jit::nvrtc_version().ok(),
        }
    }

    /// JIT on, no directory.
    pub fn memory_only() -> Self {
        Self::new(None)
    }

    /// Set whether a miss may compile.
    pub fn with_jit(mut self, jit: bool) -> Self {
        self.jit = jit;
        self
    }

    /// The default directory: `ATTN_CACHE_DIR` if set and non-empty, else the user's cache
    /// directory ([`dirs::cache_dir`]) + `/attention-kernels`. On Linux that is
    /// `$XDG_CACHE_HOME/attention-kernels` (if absolute), else `~/.cache/attention-kernels`;
    /// on macOS `~/Library/Caches/attention-kernels`. `None` when no home directory is known.
    pub fn default_dir() -> Option<PathBuf> {
        match std::env::var_os(CACHE_DIR_ENV).filter(|v| !v.is_empty()) {
            Some(d) => Some(PathBuf::from(d)),
            None => dirs::cache_dir().map(|d| d.join(CACHE_SUBDIR)),
        }
    }

    /// Read `ATTN_CACHE_DIR` (see [`default_dir`](Self::default_dir)) and `ATTN_JIT`
    /// (`on`/`1`/`true`/`yes` or unset: compile on a miss; `off`/`0`/`false`/`no`: never).
    /// Another `ATTN_JIT` value is an [`JitError::InvalidArgument`].
    pub fn from_env() -> Result<Self, JitError> {
        let jit = match std::env::var(JIT_ENV) {
            Err(std::env::VarError::NotPresent) => true,
            Err(std::env::VarError::NotUnicode(v)) => {
                return Err(JitError::InvalidArgument {
                    arg: JIT_ENV,
                    expected: "`on` or `off`",
                    got: v.to_string_lossy().into_owned(),
                })
            }
            Ok(v) => parse_jit(&v)?,
        };
        Ok(Self::new(Self::default_dir()).with_jit(jit))
    }
}

fn parse_jit(v: &str) -> Result<bool, JitError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "" | "on" | "1" | "true" | "yes" => Ok(true),
        "off" | "0" | "false" | "no" => Ok(false),
        _ => Err(JitError::InvalidArgument {
            arg: JIT_ENV,
            expected: "`on` or `off`",
            got: v.to_string(),
        }),
    }
}

/// Counters of a [`KernelCache`] since its construction.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CacheStats {
    /// Lookups answered by the in-process map.
    pub memory_hits: u64,
    /// Lookups answered by a valid on-disk entry.
    pub disk_hits: u64,
    /// Lookups found neither in memory nor on disk (compiled, or an error).
    pub misses: u64,
    /// NVRTC compilations run (successful or not).
    pub compiles: u64,
    /// Total wall time of those compilations, in milliseconds.
    pub compile_ms: f64,
    /// Total time of successful disk loads (read + validation), in milliseconds.
    pub disk_load_ms: f64,
    /// On-disk entries found invalid (truncated, corrupted, foreign) and replaced.
    pub corrupt_entries: u64,
    /// Entries written to disk.
    pub disk_writes: u64,
    /// `true` once a write failed and the cache went memory-only for writes.
    pub memory_only: bool,
}

#[derive(Default)]
struct Counters {
    memory_hits: AtomicU64,
    disk_hits: AtomicU64,
    misses: AtomicU64,
    compiles: AtomicU64,
    compile_us: AtomicU64,
    disk_load_us: AtomicU64,
    corrupt_entries: AtomicU64,
    disk_writes: AtomicU64,
}

type Slot = Arc<Mutex<Option<Arc<Cubin>>>>;

/// Thread-safe cache of compiled kernels, in memory and on disk (see the module docs).
pub struct KernelCache {
    config: CacheConfig,
    slots: Mutex<HashMap<(String, String, Digest256), Slot>>,
    counters: Counters,
    writable: AtomicBool,
}

impl std::fmt::Debug for KernelCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelCache")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Lock, ignoring poisoning: the protected data stays consistent (a slot is only set to a
/// finished value).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn elapsed_us(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX)
}

enum Read {
    Missing,
    Valid(Vec<u8>, (i32, i32)),
    Corrupt(String),
    Unreadable(std::io::Error),
}

/// What an entry's header must say.
struct Expect<'a> {
    key: &'a str,
    arch: &'a str,
    /// `None`: any NVRTC version (machines without NVRTC).
    nvrtc: Option<(i32, i32)>,
    source_hash: Digest256,
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("truncated in the header's {what}"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().unwrap_or_default(),
        ))
    }
    fn i32(&mut self, what: &str) -> Result<i32, String> {
        Ok(i32::from_le_bytes(
            self.take(4, what)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().unwrap_or_default(),
        ))
    }
    fn digest(&mut self, what: &str) -> Result<Digest256, String> {
        Ok(self.take(32, what)?.try_into().unwrap_or_default())
    }
    fn string(&mut self, what: &str) -> Result<&'a [u8], String> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
}

/// Serialize one entry (header + payload).
fn encode_entry(
    key: &str,
    arch: &str,
    nvrtc: (i32, i32),
    source_hash: &Digest256,
    cubin: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(112 + key.len() + arch.len() + cubin.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    for s in [key, arch] {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    out.extend_from_slice(&nvrtc.0.to_le_bytes());
    out.extend_from_slice(&nvrtc.1.to_le_bytes());
    out.extend_from_slice(source_hash);
    out.extend_from_slice(&(cubin.len() as u64).to_le_bytes());
    out.extend_from_slice(&checksum(cubin));
    out.extend_from_slice(cubin);
    out
}

/// Parse and validate one entry; returns the payload and the NVRTC version it was built with.
fn decode_entry(mut bytes: Vec<u8>, want: &Expect<'_>) -> Result<(Vec<u8>, (i32, i32)), String> {
    let mut c = Cursor(&bytes);
    if c.take(MAGIC.len(), "magic")? != MAGIC {
        return Err("bad magic (not a kernel cache entry)".into());
    }
    let version = c.u32("format version")?;
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version}, expected {FORMAT_VERSION}"
        ));
    }
    let key = c.string("key")?;
    if key != want.key.as_bytes() {
        return Err(format!(
            "header key {:?}, expected {:?}",
            String::from_utf8_lossy(key),
            want.key
        ));
    }
    let arch = c.string("arch")?;
    if arch != want.arch.as_bytes() {
        return Err(format!(
            "header arch {:?}, expected {:?}",
            String::from_utf8_lossy(arch),
            want.arch
        ));
    }
    let nvrtc = (c.i32("NVRTC major")?, c.i32("NVRTC minor")?);
    if let Some(v) = want.nvrtc {
        if v != nvrtc {
            return Err(format!("built by NVRTC {nvrtc:?}, expected {v:?}"));
        }
    }
    let sh = c.digest("source hash")?;
    if sh != want.source_hash {
        return Err(format!(
            "source hash {}, expected {}",
            hex(&sh),
            hex(&want.source_hash)
        ));
    }
    let len = c.u64("payload length")?;
    let sum = c.digest("payload checksum")?;
    let rest = c.0.len() as u64;
    if rest != len {
        return Err(format!(
            "payload is {rest} bytes, header says {len} (truncated?)"
        ));
    }
    if len == 0 {
        return Err("empty payload".into());
    }
    let header_len = bytes.len() - c.0.len();
    let got = checksum(c.0);
    if got != sum {
        return Err(format!(
            "payload checksum {}, header says {} (corrupted)",
            hex(&got),
            hex(&sum)
        ));
    }
    bytes.drain(..header_len);
    Ok((bytes, nvrtc))
}

fn read_entry(path: &Path, want: &Expect<'_>) -> Read {
    match fs::read(path) {
        Ok(bytes) => match decode_entry(bytes, want) {
            Ok((payload, v)) => Read::Valid(payload, v),
            Err(reason) => Read::Corrupt(reason),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => Read::Missing,
        Err(e) => Read::Unreadable(e),
    }
}

/// Write `data` to `dir/name` atomically: a temp file in `dir` ([`tempfile`]), then a rename
/// over the final name. The temp file is removed if anything fails.
fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let mut builder = tempfile::Builder::new();
    builder.prefix(".").suffix(".tmp");
    // Same mode as `fs::write` (0o666 less the umask), not tempfile's private 0o600: a
    // cache built by `attn aot` may be read by another user at deploy.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(fs::Permissions::from_mode(0o666));
    }
    let mut tmp = builder.tempfile_in(dir)?;
    tmp.write_all(data)?;
    tmp.flush()?;
    tmp.persist(dir.join(name)).map_err(|e| e.error)?;
    Ok(())
}

impl KernelCache {
    /// A cache with the given configuration. Touches no file until the first lookup.
    pub fn new(config: CacheConfig) -> Self {
        Self {
            config,
            slots: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            writable: AtomicBool::new(true),
        }
    }

    /// The process-wide cache, configured from the environment ([`CacheConfig::from_env`])
    /// on first use. An invalid `ATTN_JIT` is returned as an error on every call.
    pub fn global() -> Result<&'static KernelCache, JitError> {
        static GLOBAL: OnceLock<Result<KernelCache, JitError>> = OnceLock::new();
        GLOBAL
            .get_or_init(|| CacheConfig::from_env().map(KernelCache::new))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// The on-disk directory, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.config.dir.as_deref()
    }

    /// The CUBIN of kernel `key` (entry point name) built from `source` for `arch`: from
    /// memory, disk, or NVRTC (see the module docs). Errors: an invalid arch, a compile
    /// failure ([`JitError::Compile`]), NVRTC missing, or a miss with JIT off
    /// ([`JitError::JitDisabled`]). Disk problems are never errors: they are logged and the
    /// kernel is compiled.
    pub fn get_or_compile(
        &self,
        key: &str,
        source: &str,
        arch: &str,
    ) -> Result<Arc<Cubin>, JitError> {
        self.lookup(key, source, arch).map(|(c, _)| c)
    }

    /// [`get_or_compile`](Self::get_or_compile), also saying where the kernel came from.
    pub fn lookup(
        &self,
        key: &str,
        source: &str,
        arch: &str,
    ) -> Result<(Arc<Cubin>, CacheOrigin), JitError> {
        jit::check_arch(arch)?;
        let sh = source_hash(key, source, arch);
        let slot = lock(&self.slots)
            .entry((key.to_string(), arch.to_string(), sh))
            .or_default()
            .clone();
        // Only this kernel's slot is held from here on: other kernels proceed in parallel,
        // and threads asking for this one wait for its single load or compile.
        let mut guard = lock(&slot);
        if let Some(c) = guard.as_ref() {
            self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok((Arc::clone(c), CacheOrigin::Memory));
        }
        let (cubin, origin) = self.load_or_compile(key, source, arch, sh)?;
        let cubin = Arc::new(cubin);
        *guard = Some(Arc::clone(&cubin));
        Ok((cubin, origin))
    }

    /// The on-disk path of the entry for this kernel (whether or not it exists); `None`
    /// without a directory or without NVRTC (whose version is part of the name).
    pub fn entry_path(&self, key: &str, source: &str, arch: &str) -> Option<PathBuf> {
        let dir = self.config.dir.as_ref()?;
        let v = self.config.nvrtc_version?;
        let h = entry_hash(&source_hash(key, source, arch), v);
        Some(dir.join(file_name(key, arch, h)))
    }

    /// Counters since construction.
    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            memory_hits: get(&c.memory_hits),
            disk_hits: get(&c.disk_hits),
            misses: get(&c.misses),
            compiles: get(&c.compiles),
            compile_ms: get(&c.compile_us) as f64 / 1e3,
            disk_load_ms: get(&c.disk_load_us) as f64 / 1e3,
            corrupt_entries: get(&c.corrupt_entries),
            disk_writes: get(&c.disk_writes),
            memory_only: !self.writable.load(Ordering::Relaxed),
        }
    }

    fn load_or_compile(
        &self,
        key: &str,
        source: &str,
        arch: &str,
        sh: Digest256,
    ) -> Result<(Cubin, CacheOrigin), JitError> {
        let make = |bytes: Vec<u8>| Cubin {
            key: key.to_string(),
            arch: arch.to_string(),
            bytes,
        };
        let start = Instant::now();
        if let Some(bytes) = self.load(key, arch, sh) {
            self.counters.disk_hits.fetch_add(1, Ordering::Relaxed);
            self.counters
                .disk_load_us
                .fetch_add(elapsed_us(start), Ordering::Relaxed);
            return Ok((make(bytes), CacheOrigin::Disk));
        }
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        if !self.config.jit {
            return Err(JitError::JitDisabled {
                key: key.to_string(),
                arch: arch.to_string(),
                cache_dir: match &self.config.dir {
                    Some(d) => d.display().to_string(),
                    None => "no cache directory: set ATTN_CACHE_DIR".to_string(),
                },
            });
        }
        let start = Instant::now();
        let compiled = jit::compile_cubin(key, source, arch);
        self.counters.compiles.fetch_add(1, Ordering::Relaxed);
        self.counters
            .compile_us
            .fetch_add(elapsed_us(start), Ordering::Relaxed);
        let bytes = compiled?;
        tracing::debug!(
            key,
            arch,
            ms = start.elapsed().as_secs_f64() * 1e3,
            "NVRTC compiled kernel"
        );
        if let (Some(dir), Some(v)) = (&self.config.dir, self.config.nvrtc_version) {
            let name = file_name(key, arch, entry_hash(&sh, v));
            self.store(dir, &name, &encode_entry(key, arch, v, &sh, &bytes));
        }
        Ok((make(bytes), CacheOrigin::Compiled))
    }

    /// A valid on-disk entry's payload, or `None` (missing, unreadable or invalid: logged).
    fn load(&self, key: &str, arch: &str, sh: Digest256) -> Option<Vec<u8>> {
        let dir = self.config.dir.as_ref()?;
        let want = Expect {
            key,
            arch,
            nvrtc: self.config.nvrtc_version,
            source_hash: sh,
        };
        let candidates: Vec<PathBuf> = match self.config.nvrtc_version {
            Some(v) => vec![dir.join(file_name(key, arch, entry_hash(&sh, v)))],
            None => {
                // No NVRTC: any version's entry for this source will do; scan for them.
                let prefix = format!("{}.{arch}.", file_key(key));
                let suffix = format!(".{EXTENSION}");
                fs::read_dir(dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_str()
                            .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(&suffix))
                    })
                    .map(|e| e.path())
                    .collect()
            }
        };
        let mut best: Option<(Vec<u8>, (i32, i32))> = None;
        for path in candidates {
            match read_entry(&path, &want) {
                Read::Missing => {}
                Read::Valid(bytes, v) => {
                    if best.as_ref().is_none_or(|(_, bv)| v > *bv) {
                        best = Some((bytes, v));
                    }
                }
                Read::Corrupt(reason) => {
                    self.counters
                        .corrupt_entries
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        path = %path.display(),
                        key,
                        arch,
                        "invalid kernel cache entry ({reason}); recompiling and replacing it"
                    );
                }
                Read::Unreadable(e) => {
                    tracing::warn!(
                        path = %path.display(),
                        key,
                        arch,
                        "cannot read kernel cache entry ({e}); recompiling"
                    );
                }
            }
        }
        best.map(|(b, _)| b)
    }

    /// Write an entry; on the first failure, warn once and stop writing.
    fn store(&self, dir: &Path, name: &str, data: &[u8]) {
        if !self.writable.load(Ordering::Relaxed) {
            return;
        }
        match write_atomic(dir, name, data) {
            Ok(()) => {
                self.counters.disk_writes.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                if self.writable.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        dir = %dir.display(),
                        "kernel cache directory is not writable ({e}); compiled kernels are \
                         kept in memory only for this process (warned once)"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_sha256() {
        // Published SHA-256 test vector ("abc", FIPS 180-2).
        assert_eq!(
            hex(&checksum(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn hashes_separate_fields_and_versions() {
        // Length prefixes: moving a byte between key and source changes the hash.
        assert_ne!(
            source_hash("ab", "c", "sm_80"),
            source_hash("a", "bc", "sm_80")
        );
        assert_ne!(
            source_hash("k", "s", "sm_80"),
            source_hash("k", "s", "sm_90a")
        );
        let sh = source_hash("k", "s", "sm_80");
        assert_ne!(entry_hash(&sh, (13, 0)), entry_hash(&sh, (13, 1)));
    }

    #[test]
    fn parse_jit_values() {
        for on in ["", "on", "ON", "1", "true", "yes"] {
            assert_eq!(parse_jit(on), Ok(true), "{on}");
        }
        for off in ["off", "Off", "0", "false", "no"] {
            assert_eq!(parse_jit(off), Ok(false), "{off}");
        }
        assert!(matches!(
            parse_jit("maybe"),
            Err(JitError::InvalidArgument { arg: JIT_ENV, got, .. }) if got == "maybe"
        ));
    }

    #[test]
    fn entry_round_trip_and_rejections() {
        let want = Expect {
            key: "k",
            arch: "sm_80",
            nvrtc: Some((13, 0)),
            source_hash: [7; 32],
        };
        let e = encode_entry("k", "sm_80", (13, 0), &[7; 32], b"\x7fELFpayload");
        assert_eq!(decode_entry(e.clone(), &want).unwrap().0, b"\x7fELFpayload");
        // Every truncation and every single-byte flip is rejected.
        for n in 0..e.len() {
            assert!(
                decode_entry(e[..n].to_vec(), &want).is_err(),
                "truncated at {n}"
            );
            let mut f = e.clone();
            f[n] ^= 0x01;
            assert!(decode_entry(f, &want).is_err(), "flip at {n}");
        }
        let other = Expect { key: "j", ..want };
        assert!(decode_entry(e, &other).unwrap_err().contains("key"));
    }

    #[test]
    fn file_names_keep_the_key() {
        assert_eq!(
            file_name("prefill_rows_bf16_hd128", "sm_90a", 0xab),
            "prefill_rows_bf16_hd128.sm_90a.00000000000000ab.cubin"
        );
        assert_eq!(file_key("a/b.c"), "a_b_c");
        assert_eq!(file_key(""), "_");
    }
}
