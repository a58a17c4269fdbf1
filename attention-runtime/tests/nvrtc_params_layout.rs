//! The kernel parameter structs: the CUDA declarations (`templates/partials/params.cu`) have
//! the size of the host's `#[repr(C)]` twins (`cuda::params`) and every field, by name, their
//! offset and size, checked with NVRTC alone (no GPU): a `static_assert` on the size, and per
//! field a probe kernel that stores the field's offset and size, which the compiler folds to
//! constants in its PTX (NVRTC has no constant `offsetof` for a `static_assert`). Also: the CUBIN parameter-table reader the
//! catalog test relies on reads a known signature right.
//!
//! Needs libnvrtc (see `nvrtc_catalog.rs`); `ATTN_SKIP_NVRTC=1` skips.

use attention_codegen::render::params_source;
use attention_codegen::DType;
use attention_runtime::cuda::params::{
    cuda_fields, AppendParams, BwdParams, FwdParams, KernelParams, PagedDecodeParams, PrepParams,
};
use attention_runtime::jit::{
    compile_ptx, compile_with_log, cubin_params, nvrtc_available, CubinParam,
};

fn require_nvrtc() -> bool {
    if std::env::var("ATTN_SKIP_NVRTC").as_deref() == Ok("1") {
        eprintln!("ATTN_SKIP_NVRTC=1: skipping the NVRTC layout check");
        return false;
    }
    assert!(
        nvrtc_available(),
        "NVRTC (libnvrtc) not found: run scripts/install-nvrtc.sh and put the directory it \
         prints on LD_LIBRARY_PATH (or set ATTN_SKIP_NVRTC=1)"
    );
    true
}

/// The integer constants `entry`'s body in `ptx` moves into registers, in order
/// (`mov.u64 %rd3, 12;`).
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

/// For every field of `P`: a kernel that takes CUDA struct `name` and stores the field's
/// offset (`&p.f - &p`, folded to a constant by the compiler) and size as one constant
/// `offset << 16 | size`, which its PTX moves. Plus a `static_assert` on the struct's size.
fn check_struct<P: KernelParams>(name: &str, dtype: DType) -> Vec<String> {
    let mut src = params_source(dtype).expect("params partial renders");
    src.push_str(&format!(
        "static_assert(sizeof({name}) == {size}, \"sizeof({name}) != {size} (Rust)\");\n",
        size = std::mem::size_of::<P>()
    ));
    let fields = cuda_fields::<P>();
    for (field, _, _) in &fields {
        src.push_str(&format!(
            "extern \"C\" __global__ void probe_{field}(const __grid_constant__ {name} p, \
             unsigned long long* o) {{ *o = ((unsigned long long)((const char*)&p.{field} - \
             (const char*)&p) << 16) | sizeof(p.{field}); }}\n"
        ));
    }
    let mut failures = Vec::new();
    for arch in ["sm_80", "sm_90a"] {
        if let Err(e) = compile_with_log("params_probe", &src, arch) {
            failures.push(format!("{name} ({dtype:?}, {arch}): {e}"));
        }
    }
    let ptx = match compile_ptx("params_probe", &src, "compute_80") {
        Ok(p) => p,
        Err(e) => return vec![format!("{name} ({dtype:?}) to PTX: {e}")],
    };
    for (field, off, size) in fields {
        // One constant: offset << 16 | size.
        let got: Vec<(usize, usize)> = moved_constants(&ptx, &format!("probe_{field}"))
            .iter()
            .map(|c| (c >> 16, c & 0xffff))
            .collect();
        if got != [(off, size)] {
            failures.push(format!(
                "{name}.{field} ({dtype:?}): the CUDA declaration has (offset, size) {got:?}, \
                 the Rust struct ({off}, {size})"
            ));
        }
    }
    failures
}

#[test]
fn cuda_param_structs_have_the_rust_layouts() {
    if !require_nvrtc() {
        return;
    }
    let mut failures = Vec::new();
    for dtype in [DType::Bf16, DType::F16] {
        failures.extend(check_struct::<FwdParams>("FwdParams", dtype));
        failures.extend(check_struct::<PrepParams>("PrepParams", dtype));
        failures.extend(check_struct::<AppendParams>("AppendParams", dtype));
        failures.extend(check_struct::<PagedDecodeParams>(
            "PagedDecodeParams",
            dtype,
        ));
        failures.extend(check_struct::<BwdParams>("BwdParams", dtype));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn cubin_parameter_table_reads_a_known_signature() {
    if !require_nvrtc() {
        return;
    }
    let src = "struct S { long long a; int b; };\n\
               extern \"C\" __global__ void sig(const int* p, int a, long long b, float c, \
               char d, double e, S s) { (void)p; (void)a; (void)b; (void)c; (void)d; (void)e; \
               (void)s; }\n\
               extern \"C\" __global__ void other(int x) { (void)x; }\n";
    let c = compile_with_log("sig", src, "sm_90a").expect("compiles");
    let got = cubin_params(&c.cubin, "sig").expect("parameter table");
    let want: Vec<CubinParam> = [(0, 8), (8, 4), (16, 8), (24, 4), (28, 1), (32, 8), (40, 16)]
        .iter()
        .enumerate()
        .map(|(i, &(offset, size))| CubinParam {
            ordinal: i as u16,
            offset,
            size,
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(cubin_params(&c.cubin, "missing"), None);
    assert_eq!(cubin_params(b"not an elf", "sig"), None);
}
