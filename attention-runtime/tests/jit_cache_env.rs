//! `CacheConfig::from_env` and `KernelCache::global`: one test, so that no other test of this
//! binary races on the environment variables it sets.

use std::path::PathBuf;

use attention_runtime::jit::JitError;
use attention_runtime::kernel_cache::{CacheConfig, KernelCache, CACHE_SUBDIR};

#[test]
fn config_from_environment() {
    let dir = std::env::temp_dir().join(format!("attn-jit-cache-env-{}", std::process::id()));
    std::env::set_var("ATTN_CACHE_DIR", &dir);
    std::env::set_var("ATTN_JIT", "off");
    let c = CacheConfig::from_env().unwrap();
    assert_eq!(c.dir.as_deref(), Some(dir.as_path()));
    assert!(!c.jit);

    // The global cache reads the same variables once.
    let g = KernelCache::global().unwrap();
    assert_eq!(g.config().dir.as_deref(), Some(dir.as_path()));
    assert!(!g.config().jit);
    match g.get_or_compile("k_env", "extern \"C\" __global__ void k_env() {}", "sm_80") {
        Err(JitError::JitDisabled { key, .. }) => assert_eq!(key, "k_env"),
        other => panic!("expected JitDisabled, got {other:?}"),
    }
    assert!(std::ptr::eq(g, KernelCache::global().unwrap()));

    std::env::set_var("ATTN_JIT", "sometimes");
    match CacheConfig::from_env() {
        Err(
            e @ JitError::InvalidArgument {
                arg: "ATTN_JIT", ..
            },
        ) => {
            assert!(e.to_string().contains("sometimes"), "{e}");
        }
        other => panic!("expected an ATTN_JIT error, got {other:?}"),
    }

    // Defaults: no ATTN_CACHE_DIR -> $XDG_CACHE_HOME/attention-kernels, else ~/.cache/...
    std::env::set_var("ATTN_JIT", "on");
    std::env::remove_var("ATTN_CACHE_DIR");
    std::env::set_var("XDG_CACHE_HOME", "/xdg/cache");
    let c = CacheConfig::from_env().unwrap();
    assert!(c.jit);
    assert_eq!(c.dir, Some(PathBuf::from("/xdg/cache").join(CACHE_SUBDIR)));
    std::env::remove_var("XDG_CACHE_HOME");
    std::env::set_var("HOME", "/home/someone");
    assert_eq!(
        CacheConfig::default_dir(),
        Some(PathBuf::from("/home/someone/.cache").join(CACHE_SUBDIR))
    );
    // An empty ATTN_CACHE_DIR counts as unset.
    std::env::set_var("ATTN_CACHE_DIR", "");
    assert_eq!(
        CacheConfig::default_dir(),
        Some(PathBuf::from("/home/someone/.cache").join(CACHE_SUBDIR))
    );
}
