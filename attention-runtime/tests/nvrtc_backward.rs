//! The attention backward kernels (`templates/backward_*.cu`) compile with NVRTC to CUBIN
//! for sm_80 and sm_90a without warnings, take one `BwdParams` by value (the CUBIN's
//! parameter table), and use no local memory for spills (ptxas `-v` through NVRTC); the
//! register counts are printed (`--nocapture`). An output gate is refused when rendering,
//! naming the feature.
//!
//! Needs libnvrtc (see `nvrtc_catalog.rs`); `ATTN_SKIP_NVRTC=1` skips.

use attention_codegen::registry::{
    backward, backward_configs, backward_fused_config, backward_fused_config_sm90,
    backward_fused_for, backward_kernels_for, Target,
};
use attention_codegen::render::{KernelConfig, Phase, PrefillTile, RenderError};
use attention_codegen::{parse_spec, DType, MaskType};
use attention_runtime::cuda::params::{param_layout, BwdParams};
use attention_runtime::jit::{
    compile_with_ptxas_info, cubin_param_layout, nvrtc_available, PtxasUsage,
};

fn require_nvrtc() -> bool {
    if std::env::var("ATTN_SKIP_NVRTC").as_deref() == Ok("1") {
        eprintln!("ATTN_SKIP_NVRTC=1: skipping the NVRTC backward check");
        return false;
    }
    assert!(
        nvrtc_available(),
        "NVRTC (libnvrtc) not found: run scripts/install-nvrtc.sh and put the directory it \
         prints on LD_LIBRARY_PATH (or set ATTN_SKIP_NVRTC=1)"
    );
    true
}

/// Compile `c` for `arch`; failures (errors, warnings, a wrong parameter table, spills) are
/// pushed to `failures`.
fn compile_one(c: &KernelConfig, arch: &str, failures: &mut Vec<String>) {
    compile_one_spilling(c, arch, 0, failures)
}

/// [`compile_one`] allowing up to `max_spill` bytes of spill stores and loads each.
fn compile_one_spilling(c: &KernelConfig, arch: &str, max_spill: u32, failures: &mut Vec<String>) {
    let k = c.render().expect("renders");
    let compiled = match compile_with_ptxas_info(&k.key, &k.source, arch) {
        Ok(x) => x,
        Err(e) => {
            failures.push(e.to_string());
            return;
        }
    };
    if compiled.log.contains("warning") {
        failures.push(format!(
            "{} for {arch} has warnings:\n{}",
            k.key, compiled.log
        ));
    }
    let mut entries = vec![k.key.clone()];
    if c.phase == Phase::BackwardPreprocess {
        entries.push(format!("{}_dsink", k.key));
    }
    if matches!(c.phase, Phase::BackwardDqDkDv | Phase::BackwardDqDkDvSm90) {
        entries.push(format!("{}_dq_convert", k.key));
    }
    let want = param_layout(c.phase, false).expect("backward phases have a layout");
    assert_eq!(want, vec![(0, std::mem::size_of::<BwdParams>())]);
    for e in &entries {
        let got = cubin_param_layout(&compiled.cubin, e)
            .unwrap_or_else(|| panic!("{e} for {arch}: no parameter table"));
        if got != want {
            failures.push(format!(
                "{e} for {arch}: parameters {got:?}, the host launches {want:?}"
            ));
        }
    }
    let usage = PtxasUsage::parse(&compiled.log);
    for e in &entries {
        match usage.iter().find(|(n, _)| n == e) {
            Some((_, u)) => {
                eprintln!(
                    "{e} {arch}: {} registers, {} bytes spill stores, {} bytes spill loads, \
                     {} bytes dynamic shared memory",
                    u.registers,
                    u.spill_stores,
                    u.spill_loads,
                    c.backward_smem_bytes()
                );
                if u.spill_stores > max_spill || u.spill_loads > max_spill {
                    failures.push(format!("{e} for {arch} spills: {u:?}"));
                }
            }
            None => failures.push(format!(
                "{e} for {arch}: no ptxas usage line in the log:\n{}",
                compiled.log
            )),
        }
    }
}

/// Every mask and window variant at head dims 64 and 128 on both archs; f16 and the other
/// head dims on one arch each (a CPU machine compiles a backward kernel in ~2 s).
#[test]
fn backward_kernels_compile_without_spills() {
    if !require_nvrtc() {
        return;
    }
    let mut failures = Vec::new();
    let mut n = 0;
    for hd in [64, 128] {
        for (mask, win) in [
            (MaskType::NoMask, false),
            (MaskType::Causal, false),
            (MaskType::CausalBottomRight, true),
        ] {
            let cs = backward_configs(DType::Bf16, hd, mask, win, false);
            for arch in ["sm_80", "sm_90a"] {
                let from = if mask == MaskType::NoMask { 0 } else { 1 };
                for c in &cs[from..] {
                    compile_one(c, arch, &mut failures);
                    n += 1;
                }
            }
        }
    }
    for (dtype, hd, arch) in [
        (DType::F16, 128, "sm_80"),
        (DType::Bf16, 32, "sm_90a"),
        (DType::Bf16, 80, "sm_90a"),
        (DType::Bf16, 96, "sm_80"),
        (DType::Bf16, 160, "sm_90a"),
        (DType::F16, 192, "sm_80"),
        (DType::Bf16, 224, "sm_80"),
        (DType::Bf16, 256, "sm_90a"),
    ] {
        for c in &backward_configs(dtype, hd, MaskType::Causal, true, false) {
            compile_one(c, arch, &mut failures);
            n += 1;
        }
    }
    // Mask tensors and bias (smaller steps: their per-element reads cost registers).
    for (mask, win, bias, hd, arch) in [
        (MaskType::PaddingCausal, true, false, 64, "sm_80"),
        (MaskType::PaddingCausal, true, false, 128, "sm_90a"),
        (MaskType::Arbitrary, false, false, 128, "sm_80"),
        (MaskType::Padding, false, true, 64, "sm_90a"),
        (MaskType::Causal, true, true, 128, "sm_80"),
        (MaskType::NoMask, false, true, 128, "sm_90a"),
    ] {
        for c in &backward_configs(DType::Bf16, hd, mask, win, bias)[1..] {
            compile_one(c, arch, &mut failures);
            n += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} compiles failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Spill bytes (stores, loads) the fused kernel may have: its dK/dV accumulators take half the
/// register file at head dims 128 and 256, and ptxas spills a few values there (NVRTC 13:
/// 0-44 bytes on the plain mask variants, up to 132 with a mask tensor or a bias).
const FUSED_MAX_SPILL: u32 = 160;

/// The fused (fast-mode) kernel: every head dim with a warp grid, every mask kind, window
/// and bias, on both archs where it matters (sm_90a takes the vector f32 reductions).
#[test]
fn fused_backward_kernels_compile_without_spills() {
    if !require_nvrtc() {
        return;
    }
    let only = std::env::var("ATTN_FUSED_ONLY").ok();
    let mut failures = Vec::new();
    let mut n = 0;
    let mut cases = vec![
        (DType::Bf16, 64, MaskType::Causal, false, false, "sm_80"),
        (DType::Bf16, 64, MaskType::Causal, false, false, "sm_90a"),
        (DType::Bf16, 128, MaskType::NoMask, false, false, "sm_90a"),
        (DType::Bf16, 128, MaskType::Causal, false, false, "sm_80"),
        (DType::Bf16, 128, MaskType::Causal, false, false, "sm_90a"),
        (DType::Bf16, 64, MaskType::NoMask, false, false, "sm_90a"),
        (
            DType::Bf16,
            128,
            MaskType::CausalBottomRight,
            true,
            false,
            "sm_90a",
        ),
        (DType::Bf16, 256, MaskType::Causal, false, false, "sm_90a"),
        (DType::Bf16, 256, MaskType::NoMask, false, false, "sm_80"),
        (DType::F16, 32, MaskType::Causal, true, false, "sm_90a"),
        (DType::Bf16, 96, MaskType::Causal, false, false, "sm_90a"),
        (DType::Bf16, 192, MaskType::Causal, false, false, "sm_90a"),
        (
            DType::Bf16,
            128,
            MaskType::PaddingCausal,
            true,
            false,
            "sm_90a",
        ),
        (DType::Bf16, 64, MaskType::Arbitrary, false, true, "sm_90a"),
        (DType::Bf16, 128, MaskType::Causal, false, true, "sm_90a"),
    ];
    if let Some(hd) = only.as_deref().and_then(|s| s.parse::<usize>().ok()) {
        cases.retain(|c| c.1 == hd);
    }
    for (dtype, hd, mask, win, bias, arch) in cases {
        let c = backward_fused_config(dtype, hd, mask, win, bias).expect("a fused config");
        compile_one_spilling(&c, arch, FUSED_MAX_SPILL, &mut failures);
        n += 1;
    }
    for hd in [80, 160, 224] {
        assert!(backward_fused_config(DType::Bf16, hd, MaskType::Causal, false, false).is_none());
    }
    assert!(
        failures.is_empty(),
        "{} of {n} compiles failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn backward_keys_and_unsupported_features() {
    let [pre, dkdv, dq] =
        backward_configs(DType::Bf16, 128, MaskType::CausalBottomRight, true, false);
    assert_eq!(pre.key(), "backward_preprocess_bf16_hd128");
    assert_eq!(
        dkdv.key(),
        "backward_dkdv_bf16_hd128_causal_bottom_right_win_m32n64w4_sm80"
    );
    assert_eq!(
        dq.key(),
        "backward_dq_bf16_hd128_causal_bottom_right_win_m64n64w4_sm80"
    );
    for c in [&pre, &dkdv, &dq] {
        let k = c.render().expect("renders");
        assert_eq!(k.key, c.key());
        assert!(k.source.contains("const BwdParams p"), "{}", k.key);
    }
    // An output gate: refused, naming the feature.
    let unsupported = |c: KernelConfig, arg: &str| match c.render() {
        Err(RenderError::Unsupported { argument, .. }) => {
            assert!(argument.contains(arg), "{argument}")
        }
        other => panic!("{}: expected Unsupported({arg}), got {other:?}", c.key()),
    };
    // Mask tensors are read per element.
    for mask in [
        MaskType::Padding,
        MaskType::PaddingCausal,
        MaskType::Arbitrary,
    ] {
        for c in &backward_configs(DType::Bf16, 64, mask, false, false)[1..] {
            let k = c.render().expect("renders");
            assert!(k.source.contains("mask_stride_k] != 0"), "{}", k.key);
        }
    }
    assert!(!dq.render().unwrap().source.contains("mask_stride_k] != 0"));
    // A bias is read per element and dbias written.
    let mut c = dq.clone();
    c.has_bias = true;
    let k = c.render().expect("renders");
    assert!(
        k.key.contains("_bias_") && k.source.contains("dbrow[jb]"),
        "{}",
        k.key
    );
    let mut c = dq.clone();
    c.output_gate = true;
    unsupported(c, "output_gate");
    // Every supported head dim renders (above 128 the dK/dV kernel pairs its 8 warps).
    for &hd in attention_codegen::render::BACKWARD_HEAD_DIMS {
        for c in backward_configs(DType::F16, hd, MaskType::Causal, false, false) {
            c.render().expect("renders");
        }
    }
    assert_eq!(
        backward_configs(DType::Bf16, 256, MaskType::Causal, false, false)[1].key(),
        "backward_dkdv_bf16_hd256_causal_m32n64w8_sm80"
    );
    // The registry's lists: a separate backward list with every mask, the device's limits.
    let spec =
        parse_spec("self, heads = 8, gqa = 2, window = (63, 0), mask = [causal, padding]").unwrap();
    let keys: Vec<String> = backward_kernels_for(&spec, 64, Target::AnyDevice)
        .unwrap()
        .iter()
        .map(|c| c.key())
        .collect();
    assert_eq!(
        keys,
        [
            "backward_preprocess_bf16_hd64",
            "backward_dkdv_bf16_hd64_causal_win_m64n64w4_sm80",
            "backward_dq_bf16_hd64_causal_win_m64n64w4_sm80",
            "backward_dqdkdv_bf16_hd64_causal_win_m128n128w8_sm80",
            "backward_dqdkdv_bf16_hd64_causal_win_m128n128w8s4_sm90",
            "backward_dkdv_bf16_hd64_causal_win_bias_m32n64w4_sm80",
            "backward_dq_bf16_hd64_causal_win_bias_m64n32w4_sm80",
            "backward_dqdkdv_bf16_hd64_causal_win_bias_m128n128w8_sm80",
            "backward_dqdkdv_bf16_hd64_causal_win_bias_m128n128w8s4_sm90",
            "backward_dkdv_bf16_hd64_padding_win_m32n64w4_sm80",
            "backward_dq_bf16_hd64_padding_win_m64n32w4_sm80",
            "backward_dqdkdv_bf16_hd64_padding_win_m128n128w8_sm80",
            "backward_dqdkdv_bf16_hd64_padding_win_m128n128w8s4_sm90",
            "backward_dkdv_bf16_hd64_padding_win_bias_m32n64w4_sm80",
            "backward_dq_bf16_hd64_padding_win_bias_m64n32w4_sm80",
            "backward_dqdkdv_bf16_hd64_padding_win_bias_m128n128w8_sm80",
            "backward_dqdkdv_bf16_hd64_padding_win_bias_m128n128w8s4_sm90",
        ]
    );
    assert!(backward(
        &spec,
        64,
        MaskType::Causal,
        false,
        Target::from_arch("sm_75").unwrap()
    )
    .is_err());
    assert!(backward(
        &spec,
        128,
        MaskType::Causal,
        true,
        Target::from_arch("sm_80").unwrap()
    )
    .is_ok());
    let gated = parse_spec("self, heads = 8, output_gate, mask = causal").unwrap();
    assert!(backward(&gated, 64, MaskType::Causal, false, Target::AnyDevice).is_err());
}

/// The Hopper fused kernel (`backward_dqdkdv_*_sm90`, wgmma), in every schedule a head dim
/// has (`PrefillTile::for_backward_sm90`: 2 and 4 at head dim 64, 2, 3 and 4 at 128, 2 at
/// 256; keys end in `w8_sm90` for 2, `w8s<n>_sm90` for the others): every
/// mask kind, window and bias at head dims 64, 128 and 256 and both dtypes compile for
/// sm_90a with one `BwdParams` by value and at most [`FUSED_MAX_SPILL`] bytes of spills; the
/// schedules a head dim lacks, and any other tile, are refused.
#[test]
fn fused_backward_sm90_kernels_compile() {
    if !require_nvrtc() {
        return;
    }
    let mut failures = Vec::new();
    let mut n = 0;
    for hd in [64, 128, 256] {
        for (dtype, mask, win, bias) in [
            (DType::Bf16, MaskType::NoMask, false, false),
            (DType::Bf16, MaskType::Causal, false, false),
            (DType::F16, MaskType::CausalBottomRight, true, false),
            (DType::Bf16, MaskType::PaddingCausal, false, false),
            (DType::Bf16, MaskType::Arbitrary, false, true),
        ] {
            let c = backward_fused_config_sm90(dtype, hd, mask, win, bias).expect("a config");
            assert!(c.key().ends_with("_sm90"), "{}", c.key());
            assert!(!c.phase.compiles_for("sm_80") && c.phase.compiles_for("sm_90a"));
            let default = c.prefill_tile().stages;
            assert_eq!(default, [4, 3, 2][hd / 128], "{}", c.key());
            for schedule in 2..=4 {
                let mut o = c.clone();
                o.tile = Some(PrefillTile::for_backward_sm90(hd, schedule));
                let has = match schedule {
                    2 => true,
                    3 => hd == 128,
                    _ => hd <= 128,
                };
                let want = if schedule == 2 {
                    "w8_sm90".to_string()
                } else {
                    format!("w8s{schedule}_sm90")
                };
                assert!(o.key().ends_with(&want), "{}", o.key());
                assert_eq!(o.key() == c.key(), schedule == default, "{}", o.key());
                if has {
                    compile_one_spilling(&o, "sm_90a", FUSED_MAX_SPILL, &mut failures);
                    n += 1;
                } else {
                    assert!(matches!(
                        o.render(),
                        Err(RenderError::BadPrefillTile { .. })
                    ));
                }
            }
        }
    }
    for hd in [32, 96, 192] {
        assert!(
            backward_fused_config_sm90(DType::Bf16, hd, MaskType::Causal, false, false).is_none()
        );
    }
    // Any other tile is refused.
    let mut c =
        backward_fused_config_sm90(DType::Bf16, 128, MaskType::Causal, false, false).unwrap();
    c.tile = Some(PrefillTile {
        block_m: 128,
        ..PrefillTile::for_backward_sm90(128, 3)
    });
    assert!(matches!(
        c.render(),
        Err(RenderError::BadPrefillTile { .. })
    ));
    assert!(
        failures.is_empty(),
        "{} of {n} compiles failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// The fast-mode kernel a device runs: the Hopper one on a wgmma device at head dims 64, 128
/// and 256 (with or without a bias), the sm80 one otherwise (and on devices without wgmma, and for `AnyDevice`).
#[test]
fn fused_backward_choice_per_device() {
    let hopper = Target::Device {
        sm: 90,
        smem_optin: 227 * 1024,
        wgmma: true,
    };
    let ampere = Target::from_arch("sm_80").unwrap();
    let plain_90 = Target::Device {
        sm: 90,
        smem_optin: 227 * 1024,
        wgmma: false,
    };
    let pick = |hd: usize, t: Target| {
        backward_fused_for(DType::Bf16, hd, MaskType::Causal, false, false, t).map(|c| c.phase)
    };
    for hd in [64, 128, 256] {
        assert_eq!(pick(hd, hopper), Some(Phase::BackwardDqDkDvSm90), "hd{hd}");
        // With an additive bias too (without its gradient; asking for it runs the pair).
        assert_eq!(
            backward_fused_for(DType::Bf16, hd, MaskType::Causal, false, true, hopper)
                .map(|c| c.phase),
            Some(Phase::BackwardDqDkDvSm90),
            "hd{hd} bias"
        );
    }
    assert_eq!(pick(96, hopper), Some(Phase::BackwardDqDkDv));
    assert_eq!(pick(80, hopper), None);
    for t in [plain_90, Target::AnyDevice] {
        assert_eq!(pick(128, t), Some(Phase::BackwardDqDkDv));
    }
    // The sm80 fused tiles need 171-178 KiB of shared memory, over sm_80's 163 KiB: the
    // deterministic pair runs there (the launcher used to fail to load the fused kernel).
    assert_eq!(pick(64, ampere), None);
    assert_eq!(pick(128, ampere), None);
    // Its shared memory fits Hopper's opt-in limit (and the registry checks that).
    let c = backward_fused_config_sm90(DType::Bf16, 128, MaskType::Causal, false, false).unwrap();
    assert!(
        c.backward_smem_bytes() <= 227 * 1024,
        "{}",
        c.backward_smem_bytes()
    );
    let small = Target::Device {
        sm: 90,
        smem_optin: 100 * 1024,
        wgmma: true,
    };
    assert_ne!(pick(128, small), Some(Phase::BackwardDqDkDvSm90));
}
