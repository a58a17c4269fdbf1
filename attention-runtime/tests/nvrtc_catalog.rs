//! Every catalog kernel compiles with NVRTC to CUBIN for sm_80 and sm_90a (the Hopper
//! `prefill_*_sm90` family for sm_90a only), and its compiled
//! parameter list is the layout of the host struct it is launched with (`cuda::params`).
//!
//! Needs libnvrtc (13.x): run `scripts/install-nvrtc.sh` and put the directory it prints on
//! `LD_LIBRARY_PATH`. Without NVRTC this test fails, unless `ATTN_SKIP_NVRTC=1` is set.

use attention_codegen::catalog::{catalog_configs, catalog_kernels};
use attention_codegen::registry::Target;
use attention_codegen::render::{KernelConfig, Phase};
use attention_codegen::DType;
use attention_runtime::cuda::params::{fwd_tma_param_layout, param_layout};
use attention_runtime::cuda::prefill_sm80::takes_tma_maps;
use attention_runtime::jit::{
    compile_cubin, compile_with_log, cubin_param_layout, nvrtc_available, nvrtc_version, JitError,
};

const ARCHS: &[&str] = &["sm_80", "sm_90a"];

/// `false` when the test must be skipped explicitly; panics when NVRTC is missing otherwise.
fn require_nvrtc() -> bool {
    if std::env::var("ATTN_SKIP_NVRTC").as_deref() == Ok("1") {
        eprintln!("ATTN_SKIP_NVRTC=1: skipping the NVRTC compile check");
        return false;
    }
    assert!(
        nvrtc_available(),
        "NVRTC (libnvrtc) not found. Run `scripts/install-nvrtc.sh` and put the directory it \
         prints on LD_LIBRARY_PATH, e.g.\n  export LD_LIBRARY_PATH=\"$(scripts/install-nvrtc.sh | \
         tail -n1):$LD_LIBRARY_PATH\"\n(or set ATTN_SKIP_NVRTC=1 to skip this check explicitly)"
    );
    true
}

/// The ELF magic every CUBIN starts with.
fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF")
}

#[test]
fn every_catalog_kernel_compiles_for_sm80_and_sm90a() {
    if !require_nvrtc() {
        return;
    }
    let (major, minor) = nvrtc_version().expect("nvrtcVersion");
    eprintln!("NVRTC {major}.{minor}");
    let configs = catalog_configs(Target::AnyDevice).expect("catalog configs");
    assert!(!configs.is_empty());
    let mut failures = Vec::new();
    for config in &configs {
        let k = &config.render().expect("catalog renders");
        for arch in ARCHS.iter().filter(|a| k.phase.compiles_for(a)) {
            match compile_with_log(&k.key, &k.source, arch) {
                Ok(c) if c.log.contains("warning") => failures.push(format!(
                    "kernel `{}` for {arch} compiled with warnings:\n{}",
                    k.key, c.log
                )),
                Ok(c) => {
                    let cubin = c.cubin;
                    assert!(
                        is_elf(&cubin),
                        "{} for {arch}: CUBIN is not an ELF image",
                        k.key
                    );
                    // The entry point keeps its (extern "C") name: the key.
                    let needle = k.key.as_bytes();
                    assert!(
                        cubin.windows(needle.len()).any(|w| w == needle),
                        "{} for {arch}: the CUBIN has no symbol named after the key",
                        k.key
                    );
                    // The compiled parameter list is the host struct the kernel is launched
                    // with (cuda::params), offset for offset.
                    // (Paged decode_splitkv: its `_combine` entry takes the same struct.)
                    let mut entries = vec![k.key.clone()];
                    if k.phase == Phase::DecodeSplitKv && k.paged_kv {
                        entries.push(format!("{}_combine", k.key));
                    }
                    // (The warp-specialized Hopper tile: FwdParams' fields, then TMA maps.)
                    let layout = if takes_tma_maps(config) {
                        Some(fwd_tma_param_layout())
                    } else {
                        param_layout(k.phase, k.paged_kv)
                    };
                    for (entry, want) in entries.iter().filter_map(|e| Some((e, layout.clone()?))) {
                        let got = cubin_param_layout(&cubin, entry)
                            .unwrap_or_else(|| panic!("{entry} for {arch}: no parameter table"));
                        if got != want {
                            failures.push(format!(
                                "kernel `{entry}` for {arch}: parameters (offset, size) \
                                 {got:?}, the host launches {want:?}"
                            ));
                        }
                    }
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} compiles failed:\n{}",
        failures.len(),
        configs.len() * ARCHS.len(),
        failures.join("\n\n")
    );
}

/// Kernels outside the catalog's choices still compile: f16, sinks, gate, every qkv_prep norm
/// and rope mode, every mask with a window where allowed.
#[test]
fn feature_variants_compile() {
    if !require_nvrtc() {
        return;
    }
    use attention_codegen::render::PrepLayout;
    use attention_codegen::{MaskType, QkNorm, RopeMode, Sinks};
    let mut configs = Vec::new();
    for mask in MaskType::ALL {
        let mut c = KernelConfig::new(Phase::PrefillRows, DType::F16, 96);
        c.mask = Some(mask);
        c.has_window = mask.accepts_window();
        c.sinks = Some(Sinks::Learnable);
        c.has_bias = true;
        c.output_gate = true;
        configs.push(c);
    }
    for phase in [Phase::DecodeRows, Phase::DecodeRowsPaged] {
        let mut c = KernelConfig::new(phase, DType::F16, 192);
        c.has_window = true;
        c.sinks = Some(Sinks::OffByOne);
        c.output_gate = true;
        configs.push(c);
    }
    for (norm, rope) in [
        (Some(QkNorm::Layer), Some((RopeMode::Interleaved, 64))),
        (Some(QkNorm::L2), Some((RopeMode::Half, 48))),
        (Some(QkNorm::Rms), None),
    ] {
        let mut c = KernelConfig::new(Phase::QkvPrep, DType::F16, 96);
        c.qk_norm = norm;
        c.rope = rope;
        c.output_gate = true;
        configs.push(c);
    }
    let mut cross = KernelConfig::new(Phase::QkvPrep, DType::F16, 128);
    cross.layout = PrepLayout::CrossAttention;
    cross.qk_norm = Some(QkNorm::Layer);
    configs.push(cross);
    // Cross-attention's context-cache step with a window and sinks (gpu_kv_cross.rs runs
    // these): the mask-free tensor-core kernel in its static-cache mode and its fallback.
    for (spec, hd) in [
        (
            "cross, heads=2, head_dim=256, window=(16, 0), sinks=off_by_one, mask=no_mask",
            256,
        ),
        (
            "cross, heads=2, head_dim=128, sinks=learnable, dtype=f16",
            128,
        ),
    ] {
        use attention_codegen::registry::{self, Target};
        let spec = attention_codegen::parse_spec(spec).expect("spec");
        configs.extend(registry::cross_cache_step(&spec, hd, Target::AnyDevice));
        configs.push(registry::decode_rows(&spec, hd));
    }

    let mut failures = Vec::new();
    for c in &configs {
        let k = c.render().expect("renders");
        for arch in ARCHS.iter().filter(|a| k.phase.compiles_for(a)) {
            match compile_with_log(&k.key, &k.source, arch) {
                Ok(c) if c.log.contains("warning") => failures.push(format!(
                    "kernel `{}` for {arch} compiled with warnings:\n{}",
                    k.key, c.log
                )),
                Ok(_) => {}
                Err(e) => failures.push(e.to_string()),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "compiles failed:\n{}",
        failures.join("\n\n")
    );
}

/// Every kernel family renders and compiles at the head dims added for real checkpoints
/// (32: MiniLM / small BERTs, 80: Phi-2, 160, 224), where no catalog model exercises the rope, q/k norm,
/// sink, gate and window paths: a self-attention spec with every feature a kernel specializes
/// on and a cross-attention spec, each kernel the registry lists for them. (Run over every
/// supported head dim and both archs once, 2026-11-30: all compile; the list is kept short
/// because a CPU machine compiles ~3 s per kernel.)
#[test]
fn every_kernel_family_compiles_at_the_new_head_dims() {
    if !require_nvrtc() {
        return;
    }
    use attention_codegen::registry::{kernels_for, Target};
    use attention_codegen::{parse_spec, SUPPORTED_HEAD_DIMS};
    let specs = [
        parse_spec(
            "self, heads = 4, gqa = 2, qk_layernorm = rms, rope, sinks = learnable, output_gate, \
             window = (63, 0), mask = causal",
        )
        .unwrap(),
        parse_spec("cross, heads = 2, mask = padding").unwrap(),
    ];
    let mut failures = Vec::new();
    let mut compiled = 0;
    for hd in [32, 80, 160, 224] {
        assert!(SUPPORTED_HEAD_DIMS.contains(&hd), "{hd} is supported");
        let mut seen = std::collections::HashSet::new();
        for spec in &specs {
            for c in kernels_for(spec, hd, Target::AnyDevice).expect("registry lists") {
                let k = c.render().expect("renders");
                if !seen.insert(k.key.clone()) {
                    continue;
                }
                compiled += 1;
                match compile_with_log(&k.key, &k.source, "sm_90a") {
                    Ok(c) if c.log.contains("warning") => failures.push(format!(
                        "kernel `{}` compiled with warnings:\n{}",
                        k.key, c.log
                    )),
                    Ok(_) => {}
                    Err(e) => failures.push(e.to_string()),
                }
            }
        }
    }
    assert!(compiled >= 40, "only {compiled} kernels listed");
    assert!(
        failures.is_empty(),
        "{} of {compiled} compiles failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn a_broken_kernel_reports_key_and_log() {
    if !require_nvrtc() {
        return;
    }
    let src = "extern \"C\" __global__ void broken_kernel() { undeclared_thing = 1; }";
    match compile_cubin("broken_kernel", src, "sm_80") {
        Err(JitError::Compile { key, arch, log, .. }) => {
            assert_eq!(key, "broken_kernel");
            assert_eq!(arch, "sm_80");
            assert!(log.contains("undeclared_thing"), "log: {log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}

/// Head dim 80 (Phi-2), the one supported dim that is not a multiple of 32, on both archs:
/// the one-warp-per-row families with every variant that touches the partly empty third
/// channel chunk (q/k norms, full and partial rope in both modes, gate, sinks, window, the
/// general forward with a mask tensor and bias, f16) and the tensor-core families.
#[test]
fn head_dim_80_variants_compile_for_sm80_and_sm90a() {
    if !require_nvrtc() {
        return;
    }
    use attention_codegen::registry::{kernels_for, Target};
    use attention_codegen::{parse_spec, MaskType, Sinks};
    let mut configs = Vec::new();
    for spec in [
        "self, heads = 4, gqa = 2, qk_layernorm = layer, rope = interleaved, sinks = off_by_one, \
         output_gate, window = (63, 0), mask = causal, dtype = f16",
        "self, heads = 4, qk_layernorm = l2, rope, rotary_percent = 0.4, mask = padding_causal",
        "cross, heads = 2, qk_layernorm = rms, sinks = learnable, mask = padding",
    ] {
        let spec = parse_spec(spec).expect("spec");
        configs.extend(kernels_for(&spec, 80, Target::AnyDevice).expect("registry lists"));
    }
    let mut fwd = KernelConfig::new(Phase::PrefillRows, DType::Bf16, 80);
    fwd.mask = Some(MaskType::Arbitrary);
    fwd.has_bias = true;
    fwd.sinks = Some(Sinks::Learnable);
    fwd.output_gate = true;
    configs.push(fwd);
    let mut failures = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for c in &configs {
        let k = c.render().expect("renders");
        if !seen.insert(k.key.clone()) {
            continue;
        }
        for arch in ARCHS.iter().filter(|a| k.phase.compiles_for(a)) {
            match compile_with_log(&k.key, &k.source, arch) {
                Ok(c) if c.log.contains("warning") => failures.push(format!(
                    "kernel `{}` for {arch} compiled with warnings:\n{}",
                    k.key, c.log
                )),
                Ok(_) => {}
                Err(e) => failures.push(e.to_string()),
            }
        }
    }
    assert!(seen.len() >= 20, "only {} kernels listed", seen.len());
    assert!(
        failures.is_empty(),
        "{} compiles failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Every catalog `decode_splitkv` kernel, and the multi-token row-block variants (`_rb2`,
/// `_rb4`, static and paged) at every head dim that has them (the catalog's GQA specs reach
/// them at head dim 128 only), with its `_combine`, compiles for sm_90a without spills (ptxas
/// `-v` through NVRTC: the wider variants hold 16 x 16 * row_blocks scores per warp, the
/// merge 8 splits' loads).
#[test]
fn decode_kernels_use_no_local_memory() {
    use attention_codegen::render::{decode_splitkv_runs, decode_splitkv_warps};
    use attention_codegen::{RopeMode, Sinks, SUPPORTED_HEAD_DIMS};
    if !require_nvrtc() {
        return;
    }
    let mut kernels: Vec<_> = catalog_kernels()
        .unwrap()
        .into_iter()
        .filter(|k| k.phase == Phase::DecodeSplitKv)
        .collect();
    for &hd in SUPPORTED_HEAD_DIMS {
        for rb in [2, 4] {
            if !decode_splitkv_runs(hd, rb, 232_448) {
                continue;
            }
            for paged in [false, true] {
                let mut c = KernelConfig::new(Phase::DecodeSplitKv, DType::Bf16, hd);
                c.row_blocks = rb;
                c.warps = decode_splitkv_warps(rb);
                c.paged_kv = paged;
                // The heaviest variant: window, learnable sinks, gate, rope (static).
                c.has_window = true;
                c.sinks = Some(Sinks::Learnable);
                c.output_gate = true;
                c.rope = (!paged).then_some((RopeMode::Half, hd));
                kernels.push(c.render().unwrap());
            }
        }
    }
    let mut failures = Vec::new();
    let mut checked = 0;
    for k in kernels {
        let entries = [k.key.clone(), format!("{}_combine", k.key)];
        checked += check_no_spills_sm90a(&k.key, &k.source, &entries, None, &mut failures);
    }
    assert!(checked >= 2, "no decode_splitkv kernel in the catalog");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The warp-specialized Hopper tile (`PrefillTile::for_head_dim_sm90_ws`: a producer
/// warpgroup, mbarriers, `setmaxnreg`, the two-warpgroup ping-pong) compiles for sm_90a at
/// every head dim it takes, plain and with every feature (mask tensor, bias, window, sinks,
/// gate) and paged, without local memory (the `setmaxnreg` budgets of templates/prefill_sm90.cu
/// are sized for that), and takes the parameters the host launches it with (`FwdTmaParams`
/// without a paged pool: TMA maps after the fields).
#[test]
fn warp_specialized_sm90_tiles_compile() {
    use attention_codegen::render::PrefillTile;
    use attention_codegen::{MaskType, Sinks};
    if !require_nvrtc() {
        return;
    }
    let mut failures = Vec::new();
    for hd in [64, 128, 192, 256] {
        for variant in 0..3 {
            let mut c = KernelConfig::new(Phase::PrefillSm90, DType::Bf16, hd);
            c.tile = Some(PrefillTile::for_head_dim_sm90_ws(hd));
            match variant {
                0 => c.mask = Some(MaskType::Causal),
                1 => {
                    c.mask = Some(MaskType::PaddingCausal);
                    c.has_window = true;
                    c.sinks = Some(Sinks::Learnable);
                    c.has_bias = true;
                    c.output_gate = true;
                }
                _ => {
                    c.mask = Some(MaskType::CausalBottomRight);
                    c.paged_kv = true;
                }
            }
            let k = c.render().unwrap();
            assert!(k.source.contains("setmaxnreg"), "{}", k.key);
            // The kernel takes TMA maps after FwdParams' fields (a paged pool's too).
            assert!(k.source.contains("TmaMaps tma_maps"), "{}", k.key);
            let params = fwd_tma_param_layout();
            check_no_spills_sm90a(
                &k.key,
                &k.source,
                std::slice::from_ref(&k.key),
                Some(&params),
                &mut failures,
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Compile `source` (kernel `key`) for sm_90a and check each of `entries` in ptxas's resource
/// report: printed, and a failure pushed for any spill or a missing report line; with
/// `params`, also for an entry whose compiled parameter table (offset, size) differs. Returns
/// the entries checked.
fn check_no_spills_sm90a(
    key: &str,
    source: &str,
    entries: &[String],
    params: Option<&[(usize, usize)]>,
    failures: &mut Vec<String>,
) -> usize {
    use attention_runtime::jit::{compile_with_ptxas_info, PtxasUsage};
    let compiled = compile_with_ptxas_info(key, source, "sm_90a").expect("compiles");
    if let Some(want) = params {
        for e in entries {
            let got = cubin_param_layout(&compiled.cubin, e).unwrap_or_default();
            if got != want {
                failures.push(format!(
                    "{e}: parameters (offset, size) {got:?}, the host launches {want:?}"
                ));
            }
        }
    }
    let usage = PtxasUsage::parse(&compiled.log);
    let mut checked = 0;
    for e in entries {
        match usage.iter().find(|(n, _)| n == e) {
            Some((_, u)) => {
                eprintln!(
                    "{e} sm_90a: {} registers, {} / {} bytes spill stores / loads",
                    u.registers, u.spill_stores, u.spill_loads
                );
                if u.spill_stores > 0 || u.spill_loads > 0 {
                    failures.push(format!("{e} spills: {u:?}"));
                }
                checked += 1;
            }
            None => failures.push(format!("{e}: no ptxas usage line:\n{}", compiled.log)),
        }
    }
    checked
}
