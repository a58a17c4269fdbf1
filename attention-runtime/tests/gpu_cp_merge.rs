//! The LSE merge of context-parallel attention (`cp_merge_<dtype>` in
//! `templates/cp_attention.cu`) on one GPU, row by row: a NaN already in the running output
//! reaches the result even when its weight underflows to 0 (it used to be dropped), a running
//! result that has seen nothing (output 0, LSE `-inf`) adds exactly nothing, a finite running
//! output whose weight underflows adds exactly nothing, a partial row with LSE `-inf` changes
//! nothing, and an unwritten (NaN) running output with LSE `-inf` shows as NaN (so the
//! accumulator must be zeroed, which `CudaLayer::cp_acc` does). `#[ignore = "requires a CUDA
//! GPU"]`, always compiled.

mod common;

use attention_codegen::DType;
use attention_runtime::cuda::cp_kernels::CpKernels;
use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::bf16;

const HD: usize = 64;

/// One merge row: running output value and LSE, partial output value and LSE.
struct Row {
    acc: f32,
    la: f32,
    part: f32,
    lp: f32,
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn merge_propagates_nans_and_adds_exact_zeros() {
    let (ctx, st) = common::cuda_stream();
    let k = CpKernels::render(DType::Bf16, HD).unwrap();
    let arch = attention_runtime::device::arch_for_capability(ctx.compute_capability().unwrap());
    let cubin = attention_runtime::jit::compile_cubin(&k.key, &k.source, &arch).expect("nvrtc");
    let f = ctx
        .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
        .expect("module")
        .load_function(&k.merge_entry)
        .expect("entry");
    let ninf = f32::NEG_INFINITY;
    let rows = [
        // 0: NaN in the running output, its weight exp(-200) = 0: NaN.
        Row {
            acc: f32::NAN,
            la: 0.0,
            part: 2.0,
            lp: 200.0,
        },
        // 1: nothing seen yet: the partial exactly.
        Row {
            acc: 0.0,
            la: ninf,
            part: 2.0,
            lp: 1.0,
        },
        // 2: a finite running output whose weight underflows: the partial exactly.
        Row {
            acc: 3.0,
            la: 0.0,
            part: 1.5,
            lp: 200.0,
        },
        // 3: a partial that saw no key: unchanged (its output is not read).
        Row {
            acc: 5.0,
            la: 0.5,
            part: f32::NAN,
            lp: ninf,
        },
        // 4: an unwritten running output: NaN.
        Row {
            acc: f32::NAN,
            la: ninf,
            part: 2.0,
            lp: 1.0,
        },
        // 5: equal weights: the mean.
        Row {
            acc: 1.0,
            la: 0.25,
            part: 3.0,
            lp: 0.25,
        },
    ];
    let n = rows.len();
    let expand = |v: Vec<f32>| -> Vec<f32> { v.into_iter().flat_map(|x| [x; HD]).collect() };
    let acc_h = expand(rows.iter().map(|r| r.acc).collect());
    let part_h: Vec<bf16> = expand(rows.iter().map(|r| r.part).collect())
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let la_h: Vec<f32> = rows.iter().map(|r| r.la).collect();
    let lp_h: Vec<f32> = rows.iter().map(|r| r.lp).collect();
    let mut acc = st.clone_htod(&acc_h).unwrap();
    let mut la = st.clone_htod(&la_h).unwrap();
    let part = st.clone_htod(&part_h).unwrap();
    let lp = st.clone_htod(&lp_h).unwrap();
    let (heads, acc_rows, row0, nn) = (1i32, n as i64, 0i64, n as i64);
    let mut b = st.launch_builder(&f);
    b.arg(&mut acc)
        .arg(&mut la)
        .arg(&part)
        .arg(&lp)
        .arg(&heads)
        .arg(&acc_rows)
        .arg(&row0)
        .arg(&nn);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: cp_merge's parameters (float*, float*, const bf16*, const float*, int,
    // long long x3); acc and part hold n x HD elements, la and lp n (one head).
    unsafe { b.launch(cfg) }.expect("launch");
    let out = st.clone_dtoh(&acc).unwrap();
    let lse = st.clone_dtoh(&la).unwrap();
    let row = |i: usize| &out[i * HD..(i + 1) * HD];
    assert!(
        row(0).iter().all(|x| x.is_nan()),
        "row 0: {:?}",
        &row(0)[..4]
    );
    assert!(
        row(1).iter().all(|&x| x == 2.0),
        "row 1: {:?}",
        &row(1)[..4]
    );
    assert_eq!(lse[1], 1.0);
    assert!(
        row(2).iter().all(|&x| x == 1.5),
        "row 2: {:?}",
        &row(2)[..4]
    );
    assert_eq!(lse[2], 200.0);
    assert!(
        row(3).iter().all(|&x| x == 5.0),
        "row 3: {:?}",
        &row(3)[..4]
    );
    assert_eq!(lse[3], 0.5);
    assert!(
        row(4).iter().all(|x| x.is_nan()),
        "row 4: {:?}",
        &row(4)[..4]
    );
    assert!(
        row(5).iter().all(|&x| x == 2.0),
        "row 5: {:?}",
        &row(5)[..4]
    );
    assert!(
        (lse[5] - (0.25 + 2f32.ln())).abs() < 1e-6,
        "row 5 lse {}",
        lse[5]
    );
}
