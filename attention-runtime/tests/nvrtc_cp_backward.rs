//! The helper kernels of context-parallel attention's backward on the GPU
//! (`templates/cp_backward.cu`, rendered by `attention_runtime::cuda::cp_backward_kernels`)
//! compile with NVRTC to CUBIN for sm_80 and sm_90a without warnings and without spills, for
//! every supported head dim and both dtypes, and each entry's compiled parameter list is
//! what the host launches (sizes and offsets in the CUBIN's parameter table).
//!
//! Needs libnvrtc (see `nvrtc_catalog.rs`); `ATTN_SKIP_NVRTC=1` skips.

use attention_codegen::{DType, SUPPORTED_HEAD_DIMS};
use attention_runtime::cuda::cp_backward_kernels::CpBackwardKernels;
use attention_runtime::jit::{
    compile_with_ptxas_info, cubin_param_layout, nvrtc_available, PtxasUsage,
};

fn require_nvrtc() -> bool {
    if std::env::var("ATTN_SKIP_NVRTC").as_deref() == Ok("1") {
        eprintln!("ATTN_SKIP_NVRTC=1: skipping the NVRTC cp_backward check");
        return false;
    }
    assert!(
        nvrtc_available(),
        "NVRTC (libnvrtc) not found: run scripts/install-nvrtc.sh and put the directory it \
         prints on LD_LIBRARY_PATH (or set ATTN_SKIP_NVRTC=1)"
    );
    true
}

/// (offset, size) of every parameter the host pushes, per entry (pointers 8 bytes).
fn host_params(entry: &str) -> Vec<(usize, usize)> {
    let sizes: &[usize] = if entry.starts_with("cpb_add_rows_") {
        // acc, src, row0, n, width
        &[8, 8, 8, 8, 4]
    } else if entry.starts_with("cpb_cast_") {
        // src, dst, n
        &[8, 8, 8]
    } else if entry == "cpb_lse_slice" {
        // src, dst, num_heads, rows, row0, n
        &[8, 8, 4, 8, 8, 8]
    } else if entry == "cpb_lse_sink" {
        // lse, sinks, sink_mode, num_heads, rows
        &[8, 8, 4, 4, 8]
    } else {
        // out, dout, lse, sinks, dsinks, num_heads, rows
        &[8, 8, 8, 8, 8, 4, 8]
    };
    let mut off = 0usize;
    sizes
        .iter()
        .map(|&s| {
            off = off.next_multiple_of(s);
            let p = (off, s);
            off += s;
            p
        })
        .collect()
}

#[test]
fn cp_backward_kernels_compile_without_spills() {
    if !require_nvrtc() {
        return;
    }
    let mut failures = Vec::new();
    let mut n = 0;
    for dtype in [DType::Bf16, DType::F16] {
        for &hd in SUPPORTED_HEAD_DIMS {
            let k = CpBackwardKernels::render(dtype, hd).expect("renders");
            for arch in ["sm_80", "sm_90a"] {
                let compiled = match compile_with_ptxas_info(&k.key, &k.source, arch) {
                    Ok(c) => c,
                    Err(e) => {
                        failures.push(e.to_string());
                        continue;
                    }
                };
                n += 1;
                if compiled.log.contains("warning") {
                    failures.push(format!("{} {arch}: warnings:\n{}", k.key, compiled.log));
                }
                let usage = PtxasUsage::parse(&compiled.log);
                for e in k.entries() {
                    match usage.iter().find(|(name, _)| *name == e) {
                        Some((_, u)) if u.spill_stores != 0 || u.spill_loads != 0 => {
                            failures.push(format!("{e} ({}) {arch} spills: {u:?}", k.key))
                        }
                        Some(_) => {}
                        None => failures.push(format!("{e} ({}) {arch}: no ptxas usage", k.key)),
                    }
                    let got = cubin_param_layout(&compiled.cubin, &e).unwrap_or_default();
                    let want = host_params(&e);
                    if got != want {
                        failures.push(format!(
                            "{e} ({}) {arch}: parameters {got:?}, the host pushes {want:?}",
                            k.key
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(n, 2 * SUPPORTED_HEAD_DIMS.len() * 2);
}

#[test]
fn head_dims_that_are_not_multiples_of_16_are_refused() {
    for hd in [0, 8, 72] {
        assert!(CpBackwardKernels::render(DType::Bf16, hd).is_err(), "{hd}");
    }
    let k = CpBackwardKernels::render(DType::F16, 64).unwrap();
    assert_eq!(k.key, "cp_backward_f16_hd64");
    assert_eq!(k.entries()[0], "cpb_add_rows_f16");
    assert!(!k.source.contains("{{"));
}
