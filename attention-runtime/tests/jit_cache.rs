//! The kernel cache (in memory and on disk) and `attn aot`, with real NVRTC and no GPU.
//!
//! Needs libnvrtc (13.x): run `scripts/install-nvrtc.sh` and put the directory it prints on
//! `LD_LIBRARY_PATH`. Without NVRTC these tests fail, unless `ATTN_SKIP_NVRTC=1` is set.
//!
//! Every test builds its [`CacheConfig`] directly (no environment variables), in its own
//! temp directory, so the tests run in parallel; `jit_cache_env.rs` covers `from_env`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Instant;

use attention_codegen::render::KernelSource;
use attention_codegen::{catalog, parse_spec, render};
use attention_runtime::jit::{nvrtc_available, JitError};
use attention_runtime::kernel_cache::{CacheConfig, CacheOrigin, CacheStats, KernelCache};

const SPEC: &str = "self, heads=8, head_dim=64, mask=causal";

fn require_nvrtc() -> bool {
    if std::env::var("ATTN_SKIP_NVRTC").as_deref() == Ok("1") {
        eprintln!("ATTN_SKIP_NVRTC=1: skipping");
        return false;
    }
    assert!(
        nvrtc_available(),
        "NVRTC (libnvrtc) not found. Run `scripts/install-nvrtc.sh` and put the directory it \
         prints on LD_LIBRARY_PATH (or set ATTN_SKIP_NVRTC=1 to skip explicitly)"
    );
    true
}

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p = std::env::temp_dir().join(format!(
            "attn-jit-cache-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o755));
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tiny kernel named `name` whose source varies with `k`.
fn src(name: &str, k: u32) -> String {
    format!("extern \"C\" __global__ void {name}(float* x) {{ x[threadIdx.x] *= {k}.0f; }}\n")
}

fn cache_in(dir: &Path) -> KernelCache {
    KernelCache::new(CacheConfig::new(Some(dir.to_path_buf())))
}

fn is_elf(b: &[u8]) -> bool {
    b.starts_with(b"\x7fELF")
}

/// The `.cubin` entries of a directory, sorted.
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cubin"))
        .collect();
    v.sort();
    v
}

/// Files other than finished entries (leftover temp files).
fn stray_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_none_or(|e| e != "cubin"))
        .collect()
}

/// Captures WARN-level logs of the calling thread while `f` runs.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

fn with_logs<R>(f: impl FnOnce() -> R) -> (R, String) {
    let logs = Logs::default();
    let sub = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
        .finish();
    let r = tracing::subscriber::with_default(sub, f);
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    (r, text)
}

fn attn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_attn"))
        .args(args)
        .env_remove("ATTN_JIT")
        .output()
        .expect("run attn")
}

fn stdout_of(o: &Output) -> String {
    assert!(
        o.status.success(),
        "attn failed: {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `name=value` from `attn aot`'s summary line.
fn field(summary: &str, name: &str) -> usize {
    let pat = format!("{name}=");
    let rest = &summary[summary
        .find(&pat)
        .unwrap_or_else(|| panic!("no {name} in {summary:?}"))
        + pat.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The kernels of [`SPEC`] that compile for `arch` (`attn aot --arch` compiles those; the
/// spec's list is the union over devices, the Hopper `prefill_*_sm90` kernels included).
fn spec_kernels(arch: &str) -> Vec<KernelSource> {
    render::kernels_for_spec(&parse_spec(SPEC).unwrap())
        .unwrap()
        .into_iter()
        .filter(|k| k.phase.compiles_for(arch))
        .collect()
}

#[test]
fn miss_then_memory_hit_then_disk_hit() {
    if !require_nvrtc() {
        return;
    }
    let dir = TempDir::new("hit");
    let cache = cache_in(dir.path());
    let s = src("k_hit", 2);

    let (a, origin) = cache.lookup("k_hit", &s, "sm_80").unwrap();
    assert_eq!(origin, CacheOrigin::Compiled);
    assert!(is_elf(&a.bytes));
    assert_eq!((a.key.as_str(), a.arch.as_str()), ("k_hit", "sm_80"));
    let st = cache.stats();
    assert_eq!(
        (
            st.misses,
            st.compiles,
            st.disk_writes,
            st.memory_hits,
            st.disk_hits
        ),
        (1, 1, 1, 0, 0)
    );
    assert!(st.compile_ms > 0.0);

    // The entry keeps the readable key, the arch and a 16-digit hash in its name.
    let files = entries(dir.path());
    assert_eq!(files.len(), 1);
    let name = files[0].file_name().unwrap().to_str().unwrap().to_string();
    let parts: Vec<&str> = name.split('.').collect();
    assert_eq!(parts.len(), 4, "{name}");
    assert_eq!((parts[0], parts[1], parts[3]), ("k_hit", "sm_80", "cubin"));
    assert_eq!(parts[2].len(), 16);
    assert!(parts[2].bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(
        Some(files[0].clone()),
        cache.entry_path("k_hit", &s, "sm_80")
    );
    assert!(stray_files(dir.path()).is_empty());

    let (b, origin) = cache.lookup("k_hit", &s, "sm_80").unwrap();
    assert_eq!(origin, CacheOrigin::Memory);
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(cache.stats().memory_hits, 1);
    assert_eq!(cache.stats().compiles, 1);

    // Another process (a fresh cache) loads it from disk without compiling.
    let fresh = cache_in(dir.path());
    let (c, origin) = fresh.lookup("k_hit", &s, "sm_80").unwrap();
    assert_eq!(origin, CacheOrigin::Disk);
    assert_eq!(c.bytes, a.bytes);
    let st = fresh.stats();
    assert_eq!((st.disk_hits, st.misses, st.compiles), (1, 0, 0));
}

#[test]
fn key_includes_source_and_arch() {
    if !require_nvrtc() {
        return;
    }
    let dir = TempDir::new("keys");
    let cache = cache_in(dir.path());
    let a = cache
        .get_or_compile("k_var", &src("k_var", 2), "sm_80")
        .unwrap();
    // Same key, other source: a miss and a second entry, not the stale cubin.
    let b = cache
        .get_or_compile("k_var", &src("k_var", 3), "sm_80")
        .unwrap();
    assert_ne!(a.bytes, b.bytes);
    // Same source, other arch (one cache serves several devices).
    let c = cache
        .get_or_compile("k_var", &src("k_var", 2), "sm_90a")
        .unwrap();
    assert_eq!(c.arch, "sm_90a");
    assert_ne!(a.bytes, c.bytes);
    let st = cache.stats();
    assert_eq!((st.misses, st.compiles, st.disk_writes), (3, 3, 3));
    assert_eq!(entries(dir.path()).len(), 3);
}

#[test]
fn corrupted_entries_are_detected_recompiled_and_replaced() {
    if !require_nvrtc() {
        return;
    }
    type Corrupt = fn(&mut Vec<u8>);
    let cases: [(&str, Corrupt); 6] = [
        ("truncated to half", |b| b.truncate(b.len() / 2)),
        ("truncated by one byte", |b| {
            b.pop();
        }),
        ("truncated inside the header", |b| b.truncate(10)),
        ("empty file", |b| b.clear()),
        ("payload byte flipped", |b| {
            let n = b.len();
            b[n - 100] ^= 0x40;
        }),
        ("garbage header", |b| b[..24].copy_from_slice(&[0xA5; 24])),
    ];
    let dir = TempDir::new("corrupt");
    let s = src("k_corrupt", 5);
    let good = cache_in(dir.path())
        .get_or_compile("k_corrupt", &s, "sm_80")
        .unwrap();
    let path = cache_in(dir.path())
        .entry_path("k_corrupt", &s, "sm_80")
        .unwrap();
    let pristine = std::fs::read(&path).unwrap();
    for (what, corrupt) in cases {
        let mut bytes = pristine.clone();
        corrupt(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();

        let cache = cache_in(dir.path());
        let ((c, origin), logs) = with_logs(|| cache.lookup("k_corrupt", &s, "sm_80").unwrap());
        assert_eq!(origin, CacheOrigin::Compiled, "{what}");
        assert_eq!(c.bytes, good.bytes, "{what}");
        let st = cache.stats();
        assert_eq!(
            (
                st.corrupt_entries,
                st.disk_hits,
                st.misses,
                st.compiles,
                st.disk_writes
            ),
            (1, 0, 1, 1, 1),
            "{what}: {st:?}"
        );
        assert!(
            logs.contains("invalid kernel cache entry") && logs.contains("k_corrupt"),
            "{what}: warning not logged: {logs:?}"
        );
        // Replaced by a valid entry: the next process loads it from disk.
        assert_eq!(std::fs::read(&path).unwrap(), pristine, "{what}");
        let next = cache_in(dir.path());
        assert_eq!(
            next.lookup("k_corrupt", &s, "sm_80").unwrap().1,
            CacheOrigin::Disk,
            "{what}"
        );
        assert_eq!(next.stats().corrupt_entries, 0);
    }
    assert!(stray_files(dir.path()).is_empty());
}

#[test]
fn eight_threads_one_compile() {
    if !require_nvrtc() {
        return;
    }
    let dir = TempDir::new("threads");
    let cache = cache_in(dir.path());
    let s = src("k_threads", 7);
    let barrier = Barrier::new(8);
    let got: Vec<Arc<attention_runtime::kernel_cache::Cubin>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                sc.spawn(|| {
                    barrier.wait();
                    cache.get_or_compile("k_threads", &s, "sm_80").unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(got.iter().all(|c| Arc::ptr_eq(c, &got[0])));
    let st = cache.stats();
    assert_eq!(
        (st.compiles, st.misses, st.memory_hits, st.disk_writes),
        (1, 1, 7, 1),
        "{st:?}"
    );

    // Different kernels from 8 threads at once: each compiled exactly once.
    let barrier = Barrier::new(8);
    std::thread::scope(|sc| {
        for t in 0..8u32 {
            let (cache, barrier) = (&cache, &barrier);
            sc.spawn(move || {
                barrier.wait();
                let key = format!("k_par{}", t % 4);
                cache
                    .get_or_compile(&key, &src(&key, t % 4), "sm_80")
                    .unwrap();
            });
        }
    });
    let st = cache.stats();
    assert_eq!((st.compiles, st.memory_hits), (5, 11), "{st:?}");
    assert_eq!(entries(dir.path()).len(), 5);
}

#[test]
fn two_aot_processes_share_one_dir() {
    if !require_nvrtc() {
        return;
    }
    let dir = TempDir::new("procs");
    let d = dir.path().to_str().unwrap().to_string();
    let args = ["aot", "--arch", "sm_80", "--spec", SPEC, "--cache-dir", &d];
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_attn"))
            .args(args)
            .env_remove("ATTN_JIT")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (p1, p2) = (spawn(), spawn());
    let (o1, o2) = (
        p1.wait_with_output().unwrap(),
        p2.wait_with_output().unwrap(),
    );
    let kernels = spec_kernels("sm_80");
    for o in [&o1, &o2] {
        let out = stdout_of(o);
        assert_eq!(field(&out, "kernels"), kernels.len(), "{out}");
        assert_eq!(
            field(&out, "compiled") + field(&out, "already_cached"),
            kernels.len()
        );
    }
    assert_eq!(entries(dir.path()).len(), kernels.len());
    assert!(
        stray_files(dir.path()).is_empty(),
        "{:?}",
        stray_files(dir.path())
    );

    // Every entry is valid and loadable with JIT off.
    let cache = KernelCache::new(CacheConfig::new(Some(dir.path().into())).with_jit(false));
    for k in &kernels {
        let (c, origin) = cache.lookup(&k.key, &k.source, "sm_80").unwrap();
        assert_eq!(origin, CacheOrigin::Disk, "{}", k.key);
        assert!(is_elf(&c.bytes));
    }
    let st = cache.stats();
    assert_eq!((st.compiles, st.corrupt_entries), (0, 0));
}

#[test]
fn warm_start_calls_nvrtc_zero_times() {
    if !require_nvrtc() {
        return;
    }
    let dir = TempDir::new("warm");
    let d = dir.path().to_str().unwrap().to_string();
    let aot = |archs: &str| {
        stdout_of(&attn(&[
            "aot",
            "--arch",
            archs,
            "--catalog",
            "--cache-dir",
            &d,
        ]))
    };
    // What `aot --arch sm_90a` compiles: the catalog's kernels for that arch (not the
    // union over devices: e.g. no decode_rows_*_full, which runs only where the cross-attention
    // step's tensor-core kernel cannot).
    let kernels: Vec<KernelSource> =
        catalog::catalog_configs(attention_codegen::registry::Target::from_arch("sm_90a").unwrap())
            .unwrap()
            .iter()
            .map(|c| c.render().unwrap())
            .collect();
    let cold = Instant::now();
    let first = aot("sm_90a");
    let cold_s = cold.elapsed().as_secs_f64();
    assert_eq!(field(&first, "kernels"), kernels.len());
    assert_eq!(field(&first, "compiled"), kernels.len(), "{first}");
    let second = aot("sm_90a");
    assert_eq!(field(&second, "compiled"), 0, "{second}");
    assert_eq!(field(&second, "already_cached"), kernels.len(), "{second}");
    eprintln!("aot (cold): {}", first.trim());
    eprintln!("aot (warm): {}", second.trim());

    // A fresh process-like cache, JIT allowed: still zero NVRTC calls.
    let cache = cache_in(dir.path());
    let mut per_kernel = Vec::new();
    for k in &kernels {
        let t = Instant::now();
        let (c, origin) = cache.lookup(&k.key, &k.source, "sm_90a").unwrap();
        per_kernel.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(origin, CacheOrigin::Disk, "{}", k.key);
        assert!(is_elf(&c.bytes));
        assert!(
            c.bytes.windows(k.key.len()).any(|w| w == k.key.as_bytes()),
            "{}: entry name not in the cubin",
            k.key
        );
    }
    let st: CacheStats = cache.stats();
    assert_eq!(st.compiles, 0, "warm start ran NVRTC: {st:?}");
    assert_eq!((st.disk_hits, st.misses), (kernels.len() as u64, 0));
    let mean = per_kernel.iter().sum::<f64>() / per_kernel.len() as f64;
    let max = per_kernel.iter().cloned().fold(0.0, f64::max);
    eprintln!(
        "warm load per kernel ({} catalog kernels, sm_90a): mean {mean:.3} ms, max {max:.3} ms \
         (render excluded); cold aot of the catalog: {cold_s:.2} s wall",
        kernels.len()
    );
    assert!(mean < 5.0, "warm load {mean:.3} ms per kernel");
}

#[test]
fn unwritable_dir_degrades_to_memory_only_with_one_warning() {
    if !require_nvrtc() {
        return;
    }
    // A directory that cannot be created even by root: its parent is a regular file.
    let tmp = TempDir::new("ro");
    let file = tmp.path().join("file");
    std::fs::write(&file, b"not a directory").unwrap();
    let dirs = vec![file.join("cache")];
    // And a chmod 0o555 directory, where that blocks writes (not as root).
    let ro = tmp.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    let mut dirs = dirs;
    if std::fs::write(ro.join("probe"), b"").is_err() {
        dirs.push(ro.clone());
    } else {
        eprintln!(
            "running as root: chmod 0o555 does not block writes; using the file-parent dir only"
        );
    }
    for dir in dirs {
        let cache = cache_in(&dir);
        let (_, logs) = with_logs(|| {
            for i in 0..3u32 {
                let key = format!("k_ro{i}");
                let s = src(&key, i);
                assert_eq!(
                    cache.lookup(&key, &s, "sm_80").unwrap().1,
                    CacheOrigin::Compiled
                );
                assert_eq!(
                    cache.lookup(&key, &s, "sm_80").unwrap().1,
                    CacheOrigin::Memory
                );
            }
        });
        let st = cache.stats();
        assert!(st.memory_only, "{st:?}");
        assert_eq!(
            (st.compiles, st.memory_hits, st.disk_writes),
            (3, 3, 0),
            "{st:?}"
        );
        assert_eq!(
            logs.matches("not writable").count(),
            1,
            "{}: expected one warning, got: {logs}",
            dir.display()
        );
    }

    // `attn aot` into such a directory fails with the OS error instead of pretending.
    let d = file.join("cache");
    let o = attn(&[
        "aot",
        "--arch",
        "sm_80",
        "--spec",
        SPEC,
        "--cache-dir",
        d.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(d.to_str().unwrap()), "{err}");
}

#[test]
fn readonly_warm_cache_still_serves_hits() {
    if !require_nvrtc() {
        return;
    }
    // A shipped cache mounted read-only: entries load, nothing is written, no warning.
    let dir = TempDir::new("rowarm");
    let s = src("k_rowarm", 9);
    cache_in(dir.path())
        .get_or_compile("k_rowarm", &s, "sm_80")
        .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    let cache = KernelCache::new(CacheConfig::new(Some(dir.path().into())).with_jit(false));
    let (r, logs) = with_logs(|| cache.lookup("k_rowarm", &s, "sm_80"));
    assert_eq!(r.unwrap().1, CacheOrigin::Disk);
    assert!(logs.is_empty(), "{logs}");
    assert!(!cache.stats().memory_only);
}

#[test]
fn jit_off_miss_is_an_error_naming_the_kernel() {
    if !require_nvrtc() {
        return;
    }
    let dir = TempDir::new("jitoff");
    let off = KernelCache::new(CacheConfig::new(Some(dir.path().into())).with_jit(false));
    let s = src("k_deploy", 4);
    let err = off.get_or_compile("k_deploy", &s, "sm_90a").unwrap_err();
    match &err {
        JitError::JitDisabled {
            key,
            arch,
            cache_dir,
        } => {
            assert_eq!((key.as_str(), arch.as_str()), ("k_deploy", "sm_90a"));
            assert_eq!(cache_dir, dir.path().to_str().unwrap());
        }
        other => panic!("expected JitDisabled, got {other:?}"),
    }
    let msg = err.to_string();
    for needle in [
        "k_deploy",
        "sm_90a",
        "ATTN_JIT=off",
        "attn aot",
        dir.path().to_str().unwrap(),
    ] {
        assert!(msg.contains(needle), "{needle} not in {msg}");
    }
    let st = off.stats();
    assert_eq!((st.misses, st.compiles), (1, 0));
    assert!(entries(dir.path()).is_empty());

    // Memory-only with JIT off: the error says there is no directory.
    let mem = KernelCache::new(CacheConfig::memory_only().with_jit(false));
    let msg = mem
        .get_or_compile("k_deploy", &s, "sm_90a")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("ATTN_CACHE_DIR"), "{msg}");

    // Once the cache holds the kernel, JIT off hits it (the error is not cached either).
    cache_in(dir.path())
        .get_or_compile("k_deploy", &s, "sm_90a")
        .unwrap();
    assert_eq!(
        off.lookup("k_deploy", &s, "sm_90a").unwrap().1,
        CacheOrigin::Disk
    );
    assert_eq!(off.stats().compiles, 0);
}

#[test]
fn machine_without_nvrtc_loads_a_shipped_cache() {
    if !require_nvrtc() {
        return;
    }
    let dir = TempDir::new("nonvrtc");
    let s = src("k_ship", 6);
    let built = cache_in(dir.path())
        .get_or_compile("k_ship", &s, "sm_80")
        .unwrap();
    // Another NVRTC version's entry for the same kernel must not confuse the scan.
    let no_nvrtc = CacheConfig {
        nvrtc_version: None,
        ..CacheConfig::new(Some(dir.path().into())).with_jit(false)
    };
    let cache = KernelCache::new(no_nvrtc);
    let (c, origin) = cache.lookup("k_ship", &s, "sm_80").unwrap();
    assert_eq!(origin, CacheOrigin::Disk);
    assert_eq!(c.bytes, built.bytes);
    // Other source with the same key: not served from the scan.
    assert!(matches!(
        cache.lookup("k_ship", &src("k_ship", 8), "sm_80"),
        Err(JitError::JitDisabled { .. })
    ));
}

#[test]
fn errors_are_returned_not_cached() {
    if !require_nvrtc() {
        return;
    }
    let dir = TempDir::new("errs");
    let cache = cache_in(dir.path());
    assert!(matches!(
        cache.get_or_compile("k", &src("k", 1), "sm80"),
        Err(JitError::InvalidArgument { arg: "arch", .. })
    ));
    let bad = "extern \"C\" __global__ void k_bad() { undefined_thing(); }";
    for _ in 0..2 {
        match cache.get_or_compile("k_bad", bad, "sm_80") {
            Err(JitError::Compile { key, log, .. }) => {
                assert_eq!(key, "k_bad");
                assert!(log.contains("undefined_thing"), "{log}");
            }
            other => panic!("expected a compile error, got {other:?}"),
        }
    }
    let st = cache.stats();
    assert_eq!((st.compiles, st.disk_writes), (2, 0));
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn aot_rejects_bad_arguments() {
    let dir = TempDir::new("aotargs");
    let d = dir.path().to_str().unwrap();
    // Neither --catalog nor --spec; both; no --arch.
    for args in [
        vec!["aot", "--arch", "sm_80", "--cache-dir", d],
        vec![
            "aot",
            "--arch",
            "sm_80",
            "--catalog",
            "--spec",
            SPEC,
            "--cache-dir",
            d,
        ],
        vec!["aot", "--catalog", "--cache-dir", d],
    ] {
        let o = attn(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
    }
    if !require_nvrtc() {
        return;
    }
    let o = attn(&["aot", "--arch", "sm_9x", "--spec", SPEC, "--cache-dir", d]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("sm_9x"), "{err}");
    let o = attn(&[
        "aot",
        "--arch",
        "sm_80",
        "--spec",
        "self, heads=8",
        "--cache-dir",
        d,
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--head-dim"));
}
