//! The CUDA layer backward's own kernels (`templates/layer_backward.cu`, rendered by
//! `attention_runtime::cuda::train_ops`): `qkv_prep_backward_*` for every q/k norm, rope mode
//! (full and partial) and gate, plus `gate_backward_<dtype>`, the column sums, the bias
//! gradient's reduction and QK-Clip's `max_logit_fold_<dtype>` / `qk_clip_scale_rows_<dtype>`
//! (every entry of the module is checked), compile
//! with NVRTC to CUBIN for sm_80 and sm_90a without warnings and without spills; the prep
//! entry takes one `QkvPrepBwdParams` by value whose CUDA field offsets and sizes equal the
//! host struct's (probe kernels, as `nvrtc_params_layout.rs` does).
//!
//! Needs libnvrtc (see `nvrtc_catalog.rs`); `ATTN_SKIP_NVRTC=1` skips.

use attention_codegen::render::{KernelConfig, Phase, PrepLayout};
use attention_codegen::{DType, QkNorm, RopeMode};
use attention_runtime::cuda::params::KernelParams;
use attention_runtime::cuda::train_ops::{PrepBackwardKernels, QkvPrepBwdParams};
use attention_runtime::jit::{
    compile_ptx, compile_with_ptxas_info, cubin_param_layout, nvrtc_available, PtxasUsage,
};

fn require_nvrtc() -> bool {
    if std::env::var("ATTN_SKIP_NVRTC").as_deref() == Ok("1") {
        eprintln!("ATTN_SKIP_NVRTC=1: skipping the NVRTC layer-backward check");
        return false;
    }
    assert!(
        nvrtc_available(),
        "NVRTC (libnvrtc) not found: run scripts/install-nvrtc.sh and put the directory it \
         prints on LD_LIBRARY_PATH (or set ATTN_SKIP_NVRTC=1)"
    );
    true
}

fn prep(
    dtype: DType,
    hd: usize,
    norm: Option<QkNorm>,
    rope: Option<(RopeMode, usize)>,
    gate: bool,
) -> KernelConfig {
    let mut c = KernelConfig::new(Phase::QkvPrep, dtype, hd);
    c.layout = PrepLayout::SelfAttention;
    c.qk_norm = norm;
    c.rope = rope;
    c.output_gate = gate;
    c
}

/// A `static_assert` on the struct's size, and for every field of the host struct a probe
/// kernel storing the CUDA field's `offset << 16 | size` as one constant (NVRTC has no
/// constant `offsetof` for a `static_assert`; the PTX moves the folded constant).
fn layout_probes() -> String {
    let mut s = format!(
        "\nstatic_assert(sizeof(QkvPrepBwdParams) == {}, \"QkvPrepBwdParams size\");\n",
        std::mem::size_of::<QkvPrepBwdParams>()
    );
    for (name, _, _) in QkvPrepBwdParams::FIELDS {
        s.push_str(&format!(
            "extern \"C\" __global__ void probe_{name}(const __grid_constant__ QkvPrepBwdParams p, \
             unsigned long long* o) {{ *o = ((unsigned long long)((const char*)&p.{name} - \
             (const char*)&p) << 16) | sizeof(p.{name}); }}\n"
        ));
    }
    s
}

/// The integer constants `entry`'s body in `ptx` moves into registers, in order.
fn moved_constants(ptx: &str, entry: &str) -> Vec<usize> {
    let Some(start) = ptx.find(&format!(".entry {entry}(")) else {
        return Vec::new();
    };
    let body = &ptx[start..];
    let body = &body[..body.find("\n}").unwrap_or(body.len())];
    body.lines()
        .filter_map(|l| {
            let l = l.trim().strip_prefix("mov.u64")?;
            let imm = l.split(',').nth(1)?.trim().trim_end_matches(';');
            imm.parse().ok()
        })
        .collect()
}

#[test]
fn qkv_prep_backward_params_have_the_rust_layout() {
    if !require_nvrtc() {
        return;
    }
    for dtype in [DType::Bf16, DType::F16] {
        let k =
            PrepBackwardKernels::render(&prep(dtype, 64, Some(QkNorm::Rms), None, true)).unwrap();
        let src = format!("{}{}", k.source, layout_probes());
        let ptx = compile_ptx(&k.key, &src, "compute_80").expect("compiles to PTX");
        for (name, off, size) in QkvPrepBwdParams::FIELDS {
            let got: Vec<(usize, usize)> = moved_constants(&ptx, &format!("probe_{name}"))
                .iter()
                .map(|c| (c >> 16, c & 0xffff))
                .collect();
            assert_eq!(
                got,
                [(*off, *size)],
                "QkvPrepBwdParams.{name} ({dtype:?}): CUDA (offset, size) vs Rust"
            );
        }
    }
}

fn compile_one(c: &KernelConfig, arch: &str, failures: &mut Vec<String>) {
    let k = PrepBackwardKernels::render(c).expect("renders");
    let source = format!(
        "{}\nstatic_assert(sizeof(QkvPrepBwdParams) == {}, \"size\");\n",
        k.source,
        std::mem::size_of::<QkvPrepBwdParams>()
    );
    let compiled = match compile_with_ptxas_info(&k.key, &source, arch) {
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
    let want = vec![(0usize, std::mem::size_of::<QkvPrepBwdParams>())];
    let got = cubin_param_layout(&compiled.cubin, &k.key)
        .unwrap_or_else(|| panic!("{} for {arch}: no parameter table", k.key));
    if got != want {
        failures.push(format!(
            "{} for {arch}: parameters {got:?}, the host launches {want:?}",
            k.key
        ));
    }
    let usage = PtxasUsage::parse(&compiled.log);
    for e in k.entries() {
        match usage.iter().find(|(n, _)| n == e) {
            Some((_, u)) => {
                eprintln!(
                    "{e} ({}) {arch}: {} registers, spills {}/{}",
                    k.key, u.registers, u.spill_stores, u.spill_loads
                );
                if u.spill_stores != 0 || u.spill_loads != 0 {
                    failures.push(format!("{e} ({}) for {arch} spills: {u:?}", k.key));
                }
            }
            None => failures.push(format!(
                "{e} ({}) for {arch}: no ptxas usage line in the log:\n{}",
                k.key, compiled.log
            )),
        }
    }
}

/// Every norm x rope (none, half, interleaved partial) x gate at head dim 128 (bf16) on both
/// archs; other head dims and f16 on one arch each.
#[test]
fn layer_backward_kernels_compile_without_spills() {
    if !require_nvrtc() {
        return;
    }
    let mut failures = Vec::new();
    let mut n = 0;
    for norm in [
        None,
        Some(QkNorm::Layer),
        Some(QkNorm::Rms),
        Some(QkNorm::L2),
    ] {
        for rope in [
            None,
            Some((RopeMode::Half, 128)),
            Some((RopeMode::Interleaved, 64)),
        ] {
            for gate in [false, true] {
                for arch in ["sm_80", "sm_90a"] {
                    compile_one(
                        &prep(DType::Bf16, 128, norm, rope, gate),
                        arch,
                        &mut failures,
                    );
                    n += 1;
                }
            }
        }
    }
    for (dtype, hd, norm, rope, arch) in [
        (
            DType::F16,
            64,
            Some(QkNorm::Rms),
            Some((RopeMode::Half, 32)),
            "sm_80",
        ),
        (
            DType::Bf16,
            32,
            Some(QkNorm::Layer),
            Some((RopeMode::Interleaved, 32)),
            "sm_90a",
        ),
        (DType::Bf16, 96, Some(QkNorm::L2), None, "sm_80"),
        // Head dim 80: partial last chunk (Phi-2's partial rope 0.4 = 32 channels).
        (
            DType::Bf16,
            80,
            Some(QkNorm::Layer),
            Some((RopeMode::Half, 32)),
            "sm_80",
        ),
        (
            DType::Bf16,
            80,
            Some(QkNorm::Rms),
            Some((RopeMode::Interleaved, 80)),
            "sm_90a",
        ),
        (DType::F16, 80, Some(QkNorm::L2), None, "sm_80"),
        (DType::Bf16, 80, None, Some((RopeMode::Half, 80)), "sm_90a"),
        (
            DType::F16,
            128,
            Some(QkNorm::Layer),
            Some((RopeMode::Half, 64)),
            "sm_90a",
        ),
    ] {
        compile_one(&prep(dtype, hd, norm, rope, true), arch, &mut failures);
        n += 1;
    }
    assert!(
        failures.is_empty(),
        "{} of {n} compiles failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn layer_backward_keys_and_refusals() {
    let k = PrepBackwardKernels::render(&prep(
        DType::Bf16,
        128,
        Some(QkNorm::Rms),
        Some((RopeMode::Half, 64)),
        true,
    ))
    .unwrap();
    assert_eq!(
        k.key,
        "qkv_prep_backward_bf16_hd128_rmsnorm_ropehalf64_gate"
    );
    assert_eq!(
        k.entries(),
        [
            "qkv_prep_backward_bf16_hd128_rmsnorm_ropehalf64_gate",
            "gate_backward_bf16",
            "kv_interleave_backward_bf16",
            "column_sum_bf16",
            "column_sum_f32_bf16",
            "bias_grad_reduce_bf16",
            "max_logit_fold_bf16",
            "qk_clip_scale_rows_bf16",
        ]
    );
    assert!(!k.source.contains("{{"), "unfilled placeholder");
    let k = PrepBackwardKernels::render(&prep(DType::F16, 64, None, None, false)).unwrap();
    assert_eq!(k.key, "qkv_prep_backward_f16_hd64_nonorm_norope");
    // Cross-attention: the plain module (its helpers); a norm, rope or gate is refused.
    let mut cross = prep(DType::Bf16, 64, None, None, false);
    cross.layout = PrepLayout::CrossAttention;
    assert_eq!(
        PrepBackwardKernels::render(&cross).unwrap().key,
        "qkv_prep_backward_bf16_hd64_nonorm_norope"
    );
    cross.rope = Some((RopeMode::Half, 64));
    assert!(PrepBackwardKernels::render(&cross).is_err());
    // Head dim 80 (a partial last 32-channel chunk per lane) renders; 72 (not a multiple of
    // 16) does not.
    assert_eq!(
        PrepBackwardKernels::render(&prep(DType::Bf16, 80, None, None, false))
            .unwrap()
            .key,
        "qkv_prep_backward_bf16_hd80_nonorm_norope"
    );
    assert!(PrepBackwardKernels::render(&prep(DType::Bf16, 72, None, None, false)).is_err());
}
