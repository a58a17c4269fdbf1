//! The kernel registry against the runtime's choices, with no GPU: every kernel the CUDA layer
//! can launch for a spec is in `attn aot --spec` (per arch) and `attn render`, a cache built by
//! `attn aot --spec` serves every one of them under `ATTN_JIT=off`, and with `ATTN_JIT=off` a
//! cache without the `prefill_*_sm80` kernel is an error naming it, never a quiet fallback.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use attention_codegen::registry::{self, Target};
use attention_codegen::render::KernelConfig;
use attention_codegen::{parse_spec, AttentionKind, AttentionSpec};
use attention_runtime::cuda::launch::select_forward;
use attention_runtime::jit::{nvrtc_available, JitError};
use attention_runtime::kernel_cache::{CacheConfig, KernelCache};
use attention_runtime::AttnError;

/// Specs covering self/cross, every mask, bias (per call), window, both sink kinds, the gate,
/// every q/k norm, both rope modes (full and partial), both dtypes and several head dims.
const SPECS: &[&str] = &[
    "self, heads=8, gqa=2, head_dim=128, qk_layernorm=rms, rope, mask=[causal, padding_causal, causal_bottom_right]",
    "self, heads=4, gqa=1, head_dim=64, qk_layernorm=l2, window=(2, 0), sinks=learnable",
    "self, heads=2, head_dim=[64, 256], mask=[causal, padding], window=(-1, 0)",
    "self, heads=2, head_dim=64, output_gate, dtype=f16, sinks=off_by_one, mask=causal_bottom_right",
    "self, heads=2, head_dim=128, qk_layernorm, rope=interleaved, rotary_percent=0.5, mask=[no_mask, arbitrary]",
    "cross, heads=4, head_dim=64, mask=[no_mask, padding]",
    "cross, heads=2, head_dim=128, mask=padding",
];

const ARCHS: &[&str] = &["sm_90a", "sm_86", "sm_80", "sm_75"];

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

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p = std::env::temp_dir().join(format!(
            "attn-registry-{tag}-{}-{}-{nanos}",
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
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

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

/// Every kernel key the CUDA layer launches for `spec` at `hd` on `target`, following its call
/// sites (cuda/layer.rs): the forward's prep; per mask type × bias the fast kernel
/// (`prefill_tensor_core`: `_sm90` on sm_90a, else `_sm80`) when the device runs it, else `prefill_rows`, and `prefill_rows` too as the fallback when the fast one
/// cannot load; prefill's append + its fast kernel (or `decode_rows`), the fused decode step's
/// rope-less prep and `decode_splitkv` (its row-block variant for each step of 1 to 16 tokens),
/// paged batches' append + the prefill chunks' fast kernel (or `decode_rows_paged`) + the
/// decode requests' paged `decode_splitkv` (likewise; self-attention only);
/// cross-attention's context cache: append + the step's fast kernel (or `decode_rows`).
fn launched(spec: &AttentionSpec, hd: usize, target: Target) -> Vec<String> {
    let mut keys = vec![registry::qkv_prep(spec, hd).unwrap().key()];
    for &mask in &spec.masks {
        for bias in [false, true] {
            let fwd = registry::prefill_rows(spec, hd, mask, bias);
            if let Some(fast) = registry::prefill_tensor_core(&fwd, target) {
                keys.push(fast.key());
            }
            keys.push(fwd.key());
        }
    }
    if spec.kind == AttentionKind::SelfAttention {
        keys.push(registry::append_kv(spec, hd).key());
        keys.push(registry::decode_rows(spec, hd).key());
        // Static-cache prefill: the tensor-core kernel when the device runs it (else decode).
        keys.extend(registry::cache_prefill(spec, hd, target).map(|c| c.key()));
        keys.extend(registry::paged_prefill(spec, hd, target).map(|c| c.key()));
        // Paged batches' decode rows: the split-KV decode kernel when the device runs it.
        keys.extend(registry::decode_splitkv_paged(spec, hd, target).map(|c| c.key()));
        keys.push(
            registry::qkv_prep_for_decode_splitkv(spec, hd)
                .unwrap()
                .key(),
        );
        keys.push(registry::decode_splitkv(spec, hd).unwrap().key());
        keys.push(registry::decode_rows_paged(spec, hd).key());
        // Steps of 1 to 16 tokens (prefill routes them to the decode step; paged requests of
        // as many): the row-block variant for heads per group x tokens rows.
        let heads = spec.heads.unwrap();
        let per = heads / spec.gqa.unwrap_or(heads);
        if let Target::Device { smem_optin, .. } = target {
            for t in 1..=16 {
                keys.extend(
                    registry::decode_splitkv_rows(spec, hd, per * t, smem_optin)
                        .unwrap()
                        .map(|c| c.key()),
                );
                keys.extend(
                    registry::decode_splitkv_paged_rows(spec, hd, per * t, target).map(|c| c.key()),
                );
            }
        }
    } else {
        // The context cache (cuda/layer/cross_cache.rs): filled by the cross prep and
        // append_kv, attended by the tensor-core kernel without mask (else decode_rows_*_full).
        keys.push(registry::append_kv(spec, hd).key());
        match registry::cross_cache_step(spec, hd, target) {
            Some(c) => keys.push(c.key()),
            None => keys.push(registry::decode_rows(spec, hd).key()),
        }
    }
    keys
}

#[test]
fn aot_list_and_render_carry_every_kernel_the_layer_launches() {
    let mut fast_total = 0;
    let mut sm90_total = 0;
    for s in SPECS {
        let spec = parse_spec(s).unwrap();
        let arch_list = ARCHS.join(",");
        let out = stdout_of(&attn(&["aot", "--arch", &arch_list, "--spec", s, "--list"]));
        let rendered = stdout_of(&attn(&["render", "--spec", s]));
        for arch in ARCHS {
            let target = Target::from_arch(arch).unwrap();
            let listed: Vec<&str> = out
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("{arch} ")))
                .collect();
            let mut want_all = Vec::new();
            for &hd in &spec.head_dims {
                want_all.extend(launched(&spec, hd, target));
            }
            for want in &want_all {
                assert!(
                    listed.contains(&want.as_str()),
                    "{s} on {arch}: aot --list lacks {want}: {listed:?}"
                );
                assert!(
                    rendered.contains(&format!("// ===== {want} =====")),
                    "{s}: attn render lacks {want}"
                );
                fast_total += usize::from(want.ends_with("_sm80"));
                sm90_total += usize::from(want.ends_with("_sm90"));
            }
            // Nothing the layer never launches on this arch (a fast kernel it cannot run would
            // fail to compile on old archs or waste the deploy's compile time).
            for key in &listed {
                assert!(
                    want_all.iter().any(|w| w == key),
                    "{s} on {arch}: aot --list has {key}, which the layer never launches"
                );
            }
        }
    }
    assert!(fast_total > 0, "no spec launches a prefill_sm80 kernel");
    assert!(
        sm90_total > 0,
        "no spec launches a prefill_sm90 kernel on sm_90a"
    );
}

#[test]
fn aot_list_per_arch_drops_sm80_kernels_the_device_cannot_run() {
    let s = "self, heads=2, head_dim=256, mask=causal";
    let out = stdout_of(&attn(&[
        "aot",
        "--arch",
        "sm_90a,sm_86",
        "--spec",
        s,
        "--list",
    ]));
    let fast = |arch: &str| {
        out.lines()
            .any(|l| l.starts_with(&format!("{arch} prefill_bf16_hd256_causal_")))
    };
    // 198 KiB tile: fits Hopper's 227 KiB, not sm_86's 99 KiB.
    assert!(fast("sm_90a"), "{out}");
    assert!(!fast("sm_86"), "{out}");
    assert!(out
        .lines()
        .any(|l| l.starts_with("sm_86 prefill_rows_bf16_hd256_causal_w")));
    // The Hopper kernel only for sm_90a: `sm_90` (no wgmma) lists the sm80 one.
    let out = stdout_of(&attn(&[
        "aot",
        "--arch",
        "sm_90a,sm_90",
        "--spec",
        s,
        "--list",
    ]));
    assert!(
        out.lines()
            .any(|l| l.starts_with("sm_90a ") && l.ends_with("_sm90")),
        "{out}"
    );
    assert!(
        !out.lines()
            .any(|l| l.starts_with("sm_90 ") && l.ends_with("_sm90")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("sm_90 ") && l.ends_with("_sm80")),
        "{out}"
    );
    let bad = attn(&["aot", "--arch", "sm_9x", "--spec", s, "--list"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("sm_9x"));
}

/// `select_forward` over a real kernel cache: render, then look the CUBIN up for `arch`.
fn load_from<'a>(
    cache: &'a KernelCache,
    arch: &'static str,
) -> impl FnMut(&KernelConfig) -> attention_runtime::Result<String> + 'a {
    move |c: &KernelConfig| {
        let src = c.render().unwrap();
        cache
            .get_or_compile(&src.key, &src.source, arch)
            .map(|_| src.key)
            .map_err(AttnError::from)
    }
}

fn sm80_and_fallback() -> (KernelConfig, KernelConfig) {
    let spec = parse_spec("self, heads=4, gqa=2, head_dim=64, mask=causal").unwrap();
    let fwd = registry::prefill_rows(&spec, 64, spec.masks[0], false);
    let fast = registry::prefill_sm80(&fwd, Target::from_arch("sm_90a").unwrap()).unwrap();
    (fast, fwd)
}

#[test]
fn jit_off_without_the_sm80_kernel_is_an_error_naming_it() {
    let (fast, fwd) = sm80_and_fallback();
    let dir = TempDir::new("jitoff");
    // With NVRTC here, the cache holds the fallback: the old code quietly ran it.
    let have_fallback = nvrtc_available();
    if have_fallback {
        let on = KernelCache::new(CacheConfig::new(Some(dir.path().into())));
        let src = fwd.render().unwrap();
        on.get_or_compile(&src.key, &src.source, "sm_90a").unwrap();
    }
    let off = KernelCache::new(CacheConfig::new(Some(dir.path().into())).with_jit(false));
    let (r, logs) = with_logs(|| select_forward(Some(&fast), &fwd, load_from(&off, "sm_90a")));
    match &r {
        Err(AttnError::Jit(JitError::JitDisabled { key, arch, .. })) => {
            assert_eq!(key, &fast.key());
            assert_eq!(arch, "sm_90a");
        }
        other => panic!("expected JitDisabled naming {}, got {other:?}", fast.key()),
    }
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains(&fast.key()) && msg.contains("ATTN_JIT=off"),
        "{msg}"
    );
    assert!(!logs.contains("falling back"), "{logs}");
    if have_fallback {
        // The fallback itself is there and loads: the error is about the fast kernel only.
        assert_eq!(
            select_forward(None, &fwd, load_from(&off, "sm_90a"))
                .unwrap()
                .1,
            fwd.key()
        );
    }
}

#[test]
fn sm80_kernel_build_failure_falls_back_with_a_warning() {
    let (fast, fwd) = sm80_and_fallback();
    let fast_key = fast.key();
    let (r, logs) = with_logs(|| {
        select_forward(Some(&fast), &fwd, |c| {
            if c.key() == fast_key {
                Err(AttnError::Jit(JitError::Compile {
                    key: c.key(),
                    arch: "sm_90a".into(),
                    status: "NVRTC_ERROR_COMPILATION".into(),
                    log: "simulated".into(),
                }))
            } else {
                Ok(c.key())
            }
        })
    });
    let (chosen, key) = r.unwrap();
    assert_eq!((chosen.key(), key), (fwd.key(), fwd.key()));
    assert!(
        logs.contains("WARN") && logs.contains(&fast_key) && logs.contains(&fwd.key()),
        "{logs}"
    );
    // The fast kernel when it loads, with no warning.
    let (r, logs) = with_logs(|| select_forward(Some(&fast), &fwd, |c| Ok(c.key())));
    assert_eq!(r.unwrap().0.key(), fast_key);
    assert!(logs.is_empty(), "{logs}");
}

#[test]
fn cache_from_aot_spec_serves_every_launched_kernel_with_jit_off() {
    if !require_nvrtc() {
        return;
    }
    let s = "self, heads=4, gqa=2, head_dim=64, rope, mask=causal";
    let dir = TempDir::new("aot");
    let d = dir.path().to_str().unwrap();
    stdout_of(&attn(&[
        "aot",
        "--arch",
        "sm_90a",
        "--spec",
        s,
        "--cache-dir",
        d,
    ]));
    let spec = parse_spec(s).unwrap();
    let off = KernelCache::new(CacheConfig::new(Some(dir.path().into())).with_jit(false));
    let mut load = load_from(&off, "sm_90a");
    for key in launched(&spec, 64, Target::from_arch("sm_90a").unwrap()) {
        let c = registry::kernels_for(&spec, 64, Target::AnyDevice)
            .unwrap()
            .into_iter()
            .find(|c| c.key() == key)
            .unwrap_or_else(|| panic!("{key} not in the registry"));
        load(&c).unwrap_or_else(|e| panic!("{key}: {e}"));
    }
    // The forward picks the device's tensor-core kernel from that cache (on sm_90a at head
    // dim 64: the Hopper one).
    let fwd = registry::prefill_rows(&spec, 64, spec.masks[0], false);
    let fast = registry::prefill_tensor_core(&fwd, Target::from_arch("sm_90a").unwrap());
    let (chosen, _) = select_forward(fast.as_ref(), &fwd, load_from(&off, "sm_90a")).unwrap();
    assert!(chosen.key().ends_with("_sm90"), "{}", chosen.key());
}
