//! The attention backward kernels (`templates/backward_*.cu`) compile with NVRTC to CUBIN
//! for sm_80 and sm_90a without warnings, take one `BwdParams` by value (the CUBIN's
//! parameter table), and use no local memory for spills (ptxas `-v` through NVRTC); the
//! register counts are printed (`--nocapture`). Unsupported features are refused when
//! rendering, naming the feature.
//!
//! Needs libnvrtc (see `nvrtc_catalog.rs`); `ATTN_SKIP_NVRTC=1` skips.

use attention_codegen::registry::{backward, backward_configs, backward_kernels_for, Target};
use attention_codegen::render::{KernelConfig, Phase, RenderError};
use attention_codegen::{parse_spec, DType, MaskType};
use attention_runtime::cuda::params::{param_layout, BwdParams};
use attention_runtime::jit::{compile_with_ptxas_info, cubin_params, nvrtc_available, PtxasUsage};

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
    let want = param_layout(c.phase, false).expect("backward phases have a layout");
    assert_eq!(want, vec![(0, std::mem::size_of::<BwdParams>())]);
    for e in &entries {
        let got: Vec<(usize, usize)> = cubin_params(&compiled.cubin, e)
            .unwrap_or_else(|| panic!("{e} for {arch}: no parameter table"))
            .iter()
            .map(|p| (p.offset as usize, p.size as usize))
            .collect();
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
                if u.spill_stores != 0 || u.spill_loads != 0 {
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

/// Every mask and window variant at head dims 64 and 128 on both archs; f16 and head dims
/// 32 and 96 on one arch each (a CPU machine compiles a backward kernel in ~2 s).
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
            let cs = backward_configs(DType::Bf16, hd, mask, win);
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
        (DType::Bf16, 96, "sm_80"),
    ] {
        for c in &backward_configs(dtype, hd, MaskType::Causal, true) {
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

#[test]
fn backward_keys_and_unsupported_features() {
    let [pre, dkdv, dq] = backward_configs(DType::Bf16, 128, MaskType::CausalBottomRight, true);
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
    // Mask tensors, bias, gate, head dims over 128: refused, naming the feature.
    let unsupported = |c: KernelConfig, arg: &str| match c.render() {
        Err(RenderError::Unsupported { argument, .. }) => {
            assert!(argument.contains(arg), "{argument}")
        }
        other => panic!("{}: expected Unsupported({arg}), got {other:?}", c.key()),
    };
    for mask in [
        MaskType::Padding,
        MaskType::PaddingCausal,
        MaskType::Arbitrary,
    ] {
        unsupported(
            backward_configs(DType::Bf16, 64, mask, false)[1].clone(),
            "mask",
        );
    }
    let mut c = dq.clone();
    c.has_bias = true;
    unsupported(c, "has_bias");
    for hd in [160, 192, 224, 256] {
        unsupported(
            backward_configs(DType::F16, hd, MaskType::Causal, false)[2].clone(),
            "head_dim",
        );
    }
    // The registry's lists: a separate backward list, mask tensors skipped, the device's limits.
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
        ]
    );
    assert!(backward(
        &spec,
        64,
        MaskType::Causal,
        Target::from_arch("sm_75").unwrap()
    )
    .is_err());
    assert!(backward(
        &spec,
        128,
        MaskType::Causal,
        Target::from_arch("sm_80").unwrap()
    )
    .is_ok());
    let gated = parse_spec("self, heads = 8, output_gate, mask = causal").unwrap();
    assert!(backward(&gated, 64, MaskType::Causal, Target::AnyDevice).is_err());
}
