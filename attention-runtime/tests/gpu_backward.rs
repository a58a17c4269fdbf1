//! The attention backward kernels (`cuda::backward`: preprocess, dK/dV, dQ) against the CPU
//! reference (`reference::attend_sequence_backward`), on a GPU. Every test is
//! `#[ignore = "requires a CUDA GPU"]` (always compiled); run with `scripts/gpu-bundle.sh`
//! then `gpu-bundle/run.sh` there.
//!
//! Each case draws fresh random q, k, v, dO (seed printed), runs the tensor-core forward
//! (`cuda::prefill_sm80`) for O and LSE, then the backward with dq, dk, dv (and dsinks)
//! poisoned with NaN, twice: the two runs must be bitwise equal (the backward's one mode is
//! deterministic). The reference gets the same rounded inputs and the GPU's O and LSE.
//! Checks: no NaN / Inf anywhere; relative Frobenius error of dq, dk, dv (and dsinks) at
//! most `TOL` = 2e-2: P and dS enter the tensor cores rounded to bf16 (8 significant bits,
//! relative rounding 2^-9), and the gradients are written in bf16, so per-element errors
//! of a few 1e-3 are expected; sums of signed dS terms cancel, which raises the relative
//! error of dK and dQ above the forward's (1e-2), and 2e-2 leaves room for that while
//! still catching any indexing or masking error (those give O(1) errors). Query rows that
//! see no key (LSE -inf) must have exactly zero dq, and keys that no query sees exactly
//! zero dk and dv. A case with a bias also runs the fast mode without asking for dbias (the
//! fused kernels' bias variant; asking for dbias runs the deterministic pair).

use std::sync::Arc;

use attention_codegen::registry::{backward_configs, backward_fused_config_sm90};
use attention_codegen::render::{KernelConfig, Phase, PrefillTile};
use attention_codegen::{DType, MaskType, Sinks, Window};
use attention_runtime::cuda::backward::{AttentionBackward, BwdArgs, BwdLayout};
use attention_runtime::cuda::prefill_sm80::{
    PrefillArgs, PrefillExtras, PrefillLayout, PrefillSm80Kernel, PrefillStrided,
};
use attention_runtime::cuda::DeviceElem;
use attention_runtime::modules::SplitMix64;
use attention_runtime::reference::attend_sequence_backward;
use attention_runtime::reference::attention::{AttendParams, SeqDims, SinkLogits};
use attention_runtime::AttnError;
use cudarc::driver::{CudaSlice, CudaStream};
use half::{bf16, f16};

mod common;
use common::{bits_equal, cuda_stream, fresh_seed, odd, rel_frob};

const TOL: f64 = 2e-2;

#[derive(Clone, Debug)]
struct Case {
    dtype: DType,
    hd: usize,
    mask: MaskType,
    window: Option<(i32, i32)>,
    sinks: Option<Sinks>,
    heads: usize,
    groups: usize,
    /// (sq, sk) per sequence; padded when all equal and `packed` is false.
    seqs: Vec<(usize, usize)>,
    packed: bool,
    /// Mask tensor of this logical shape (1 = broadcast dim, else the full
    /// `[batch, heads, max_sq, max_sk]` dim); `[b, 1, 1, sk]` is a key-padding mask (sequence
    /// 0 fully masked when batch > 1), others random with a fully masked row.
    mask_shape: Option<[usize; 4]>,
    /// Additive f32 bias of this logical shape (same convention), values in [-2, 2]; dbias
    /// is compared with the reference's.
    bias_shape: Option<[usize; 4]>,
    /// Run the fast mode on the Hopper kernel with this tile (e.g. another schedule) instead
    /// of the registry's choice.
    fused_tile: Option<PrefillTile>,
}

impl Case {
    fn new(hd: usize, mask: MaskType, sq: usize, sk: usize, batch: usize) -> Case {
        Case {
            dtype: DType::Bf16,
            hd,
            mask,
            window: None,
            sinks: None,
            heads: 4,
            groups: 2,
            seqs: vec![(sq, sk); batch],
            packed: false,
            mask_shape: None,
            bias_shape: None,
            fused_tile: None,
        }
    }
}

/// Elements round-tripped through the kernel's dtype.
trait Elem: DeviceElem + Default + Unpin {
    fn nan() -> Self;
}
impl Elem for bf16 {
    fn nan() -> Self {
        bf16::NAN
    }
}
impl Elem for f16 {
    fn nan() -> Self {
        f16::NAN
    }
}

struct Grads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dsinks: Vec<f32>,
    dbias: Vec<f32>,
}

fn run<T: Elem>(case: &Case, seed: u64) {
    let (ctx, stream) = cuda_stream();
    let mut rng = SplitMix64::new(seed);
    let (np, ng, hd) = (case.heads, case.groups, case.hd);
    let batch = case.seqs.len();
    let total_q: usize = case.seqs.iter().map(|s| s.0).sum();
    let total_k: usize = case.seqs.iter().map(|s| s.1).sum();
    let max_q = case.seqs.iter().map(|s| s.0).max().unwrap();
    let max_k = case.seqs.iter().map(|s| s.1).max().unwrap();
    if !case.packed {
        assert!(case.seqs.iter().all(|s| *s == case.seqs[0]));
    }
    let mut gen = |n: usize, amp: f32| -> Vec<T> {
        (0..n).map(|_| T::from_f32(rng.uniform() * amp)).collect()
    };
    let q_h = gen(total_q * np * hd, 1.7);
    let k_h = gen(total_k * ng * hd, 1.7);
    let v_h = gen(total_k * ng * hd, 1.7);
    let do_h = gen(total_q * np * hd, 1.0);
    let sink_h: Vec<f32> = (0..np).map(|h| 0.5 * h as f32 - 0.7).collect();
    let full = [batch, np, max_q, max_k];
    let strides_of = |shape: [usize; 4]| -> [i64; 4] {
        let mut st = [0i64; 4];
        let mut acc = 1i64;
        for d in (0..4).rev() {
            assert!(
                shape[d] == 1 || shape[d] == full[d],
                "bad test shape {shape:?}"
            );
            st[d] = if shape[d] == 1 { 0 } else { acc };
            acc *= shape[d] as i64;
        }
        st
    };
    let mask_h: Option<(Vec<u8>, [i64; 4])> = case.mask_shape.map(|shape| {
        let st = strides_of(shape);
        let n: usize = shape.iter().product();
        let v: Vec<u8> = if shape == [batch, 1, 1, max_k] {
            // Key padding: sequence b keeps its first len_b keys (none for b = 0).
            let mut v = vec![0u8; n];
            for (b, &(_, sk)) in case.seqs.iter().enumerate() {
                let keep = if b == 0 && batch > 1 {
                    0
                } else {
                    odd(&mut rng, sk / 2, sk / 2 + 1).min(sk)
                };
                for j in keep..max_k {
                    v[b * max_k + j] = 1;
                }
            }
            v
        } else {
            let mut v: Vec<u8> = (0..n).map(|_| u8::from(rng.uniform() > 0.4)).collect();
            // One fully masked row (sequence 0, head 0, row 3) where rows are not broadcast.
            if shape[2] > 3 {
                for j in 0..shape[3] {
                    v[3 * st[2] as usize + j * st[3] as usize] = 1;
                }
            }
            v
        };
        (v, st)
    });
    let bias_h: Option<(Vec<f32>, [i64; 4])> = case.bias_shape.map(|shape| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.uniform() * 2.0).collect();
        (v, strides_of(shape))
    });

    let q = stream.clone_htod(&q_h).unwrap();
    let k = stream.clone_htod(&k_h).unwrap();
    let v = stream.clone_htod(&v_h).unwrap();
    let dout = stream.clone_htod(&do_h).unwrap();
    let sinks = stream.clone_htod(&sink_h).unwrap();
    let mask_d = mask_h.as_ref().map(|(v, _)| stream.clone_htod(v).unwrap());
    let mask_arg = mask_d.as_ref().map(|d| PrefillStrided {
        data: d,
        strides: mask_h.as_ref().unwrap().1,
        extent: full,
    });
    let bias_d = bias_h.as_ref().map(|(v, _)| stream.clone_htod(v).unwrap());
    let bias_arg = bias_d.as_ref().map(|d| PrefillStrided {
        data: d,
        strides: bias_h.as_ref().unwrap().1,
        extent: full,
    });
    let has_bias = bias_h.is_some();
    let n_dbias = batch * np * max_q * max_k;
    let mut cu_q = vec![0i32];
    let mut cu_k = vec![0i32];
    for (a, b) in &case.seqs {
        cu_q.push(cu_q.last().unwrap() + *a as i32);
        cu_k.push(cu_k.last().unwrap() + *b as i32);
    }
    let cu_q_d = stream.clone_htod(&cu_q).unwrap();
    let cu_k_d = stream.clone_htod(&cu_k).unwrap();
    let scale = 1.0 / (hd as f32).sqrt();
    let window = case.window.unwrap_or((-1, -1));
    let learnable = case.sinks == Some(Sinks::Learnable);

    // Forward: O and LSE.
    let mut fwd = KernelConfig::new(Phase::PrefillSm80, case.dtype, hd);
    fwd.mask = Some(case.mask);
    fwd.has_window = case.window.is_some();
    fwd.sinks = case.sinks;
    fwd.has_bias = has_bias;
    let fwd = PrefillSm80Kernel::compile(&ctx, &fwd).expect("forward compiles");
    let mut out: CudaSlice<T> = stream.alloc_zeros(total_q * np * hd).unwrap();
    let mut lse: CudaSlice<f32> = stream.alloc_zeros(total_q * np).unwrap();
    let fwd_layout = if case.packed {
        PrefillLayout::Packed {
            cu_seqlens_q: &cu_q_d,
            cu_seqlens_k: &cu_k_d,
            max_seqlen_q: max_q,
            total_q,
            total_k,
        }
    } else {
        PrefillLayout::Padded {
            seqlen_q: max_q,
            seqlen_k: max_k,
        }
    };
    fwd.launch_with(
        &stream,
        PrefillArgs {
            q: &q,
            k: &k,
            v: &v,
            out: &mut out,
            lse: &mut lse,
            batch,
            num_heads: np,
            num_groups: ng,
            layout: fwd_layout,
            softmax_scale: scale,
            window,
            sinks: learnable.then_some(&sinks),
            gate: None,
            max_logit: None,
        },
        PrefillExtras {
            mask: mask_arg,
            bias: bias_arg,
            v_nonfinite: None,
        },
    )
    .expect("forward launch");

    let configs = backward_configs(case.dtype, hd, case.mask, case.window.is_some(), has_bias);
    let bwd = match case.fused_tile {
        None => AttentionBackward::compile(&ctx, &configs),
        Some(tile) => {
            let mut f = backward_fused_config_sm90(
                case.dtype,
                hd,
                case.mask,
                case.window.is_some(),
                has_bias,
            )
            .expect("a head dim of the Hopper kernel");
            f.tile = Some(tile);
            AttentionBackward::compile_with_fused(&ctx, &configs, Some(f))
        }
    }
    .expect("backward compiles");
    if let Some(tile) = case.fused_tile {
        // The fast mode runs the kernel asked for (a schedule other than 2 ends the key in s<n>_sm90).
        let key = bwd.fused_key().expect("the given fused kernel");
        let want = match tile.stages {
            2 => "w8_sm90".to_string(),
            st => format!("w8s{st}_sm90"),
        };
        assert!(key.ends_with(&want), "{key}");
        let tile_key = format!("_m{}n{}w8", tile.block_m, tile.block_n);
        assert!(key.contains(&tile_key), "{key}");
    }
    let layout = if case.packed {
        BwdLayout::Packed {
            cu_seqlens_q: &cu_q_d,
            cu_seqlens_k: &cu_k_d,
            max_seqlen_q: max_q,
            max_seqlen_k: max_k,
            total_q,
            total_k,
        }
    } else {
        BwdLayout::Padded {
            seqlen_q: max_q,
            seqlen_k: max_k,
        }
    };
    let tof = |x: Vec<T>| -> Vec<f32> { x.into_iter().map(|e| e.to_f32()).collect() };
    // `with_dbias`: ask for the bias gradient (when there is a bias); the fast mode without it
    // runs the fused kernel's bias variant, with it the deterministic pair.
    let launch = |deterministic: bool, with_dbias: bool| -> Grads {
        let mut dq = stream
            .clone_htod(&vec![T::nan(); total_q * np * hd])
            .unwrap();
        let mut dk = stream
            .clone_htod(&vec![T::nan(); total_k * ng * hd])
            .unwrap();
        let mut dv = stream
            .clone_htod(&vec![T::nan(); total_k * ng * hd])
            .unwrap();
        let mut ds = stream.clone_htod(&vec![f32::NAN; np]).unwrap();
        let mut db = stream.clone_htod(&vec![f32::NAN; n_dbias.max(1)]).unwrap();
        bwd.launch(
            &stream,
            BwdArgs {
                q: &q,
                k: &k,
                v: &v,
                out: &out,
                lse: &lse,
                deterministic,
                dout: &dout,
                dq: &mut dq,
                dk: &mut dk,
                dv: &mut dv,
                batch,
                num_heads: np,
                num_groups: ng,
                layout,
                softmax_scale: scale,
                window,
                sinks: learnable.then_some(&sinks),
                dsinks: if learnable { Some(&mut ds) } else { None },
                mask: mask_arg,
                bias: bias_arg,
                dbias: if has_bias && with_dbias {
                    Some(&mut db)
                } else {
                    None
                },
            },
        )
        .expect("backward launch");
        stream.synchronize().expect("backward run");
        Grads {
            dq: tof(stream.clone_dtoh(&dq).unwrap()),
            dk: tof(stream.clone_dtoh(&dk).unwrap()),
            dv: tof(stream.clone_dtoh(&dv).unwrap()),
            dsinks: stream.clone_dtoh(&ds).unwrap(),
            dbias: stream.clone_dtoh(&db).unwrap(),
        }
    };
    let g1 = launch(true, true);
    let g2 = launch(true, true);
    // The fast mode (fused kernel, dq by f32 atomics): dk, dv (and dsinks, dbias) are still
    // bitwise reproducible; dq is checked against the reference below like the others.
    let f1 = launch(false, true);
    let f2 = launch(false, true);
    // With a bias, the fast mode once more without dbias: the fused kernel with the bias.
    let fb = has_bias.then(|| launch(false, false));
    assert!(
        bits_equal(&f1.dk, &f2.dk)
            && bits_equal(&f1.dv, &f2.dv)
            && (!learnable || bits_equal(&f1.dsinks, &f2.dsinks))
            && (!has_bias || bits_equal(&f1.dbias, &f2.dbias)),
        "{case:?} seed {seed}: two fast backward runs differ in dk, dv, dsinks or dbias"
    );
    assert!(
        bits_equal(&g1.dq, &g2.dq)
            && bits_equal(&g1.dk, &g2.dk)
            && bits_equal(&g1.dv, &g2.dv)
            && (!learnable || bits_equal(&g1.dsinks, &g2.dsinks))
            && (!has_bias || bits_equal(&g1.dbias, &g2.dbias)),
        "{case:?} seed {seed}: two backward runs differ (not deterministic)"
    );

    // Reference per sequence, from the same rounded inputs and the GPU's O and LSE.
    let (qf, kf, vf, dof) = (
        tof(q_h.clone()),
        tof(k_h.clone()),
        tof(v_h.clone()),
        tof(do_h.clone()),
    );
    let of = tof(stream.clone_dtoh(&out).unwrap());
    let lsef = stream.clone_dtoh(&lse).unwrap();
    let mut ref_dq = vec![0f32; total_q * np * hd];
    let mut ref_dk = vec![0f32; total_k * ng * hd];
    let mut ref_dv = vec![0f32; total_k * ng * hd];
    let mut ref_ds = vec![0f32; np];
    let mut ref_db = vec![0f32; n_dbias.max(1)];
    let (rq, rk) = (np * hd, ng * hd);
    // Rows (token, head) whose LSE is -inf: their dq must be exactly 0.
    let mut empty_rows = Vec::new();
    for (b, &(sq, sk)) in case.seqs.iter().enumerate() {
        let qtok = |i: usize| {
            if case.packed {
                cu_q[b] as usize + i
            } else {
                i * batch + b
            }
        };
        let ktok = |j: usize| {
            if case.packed {
                cu_k[b] as usize + j
            } else {
                j * batch + b
            }
        };
        let gather = |src: &[f32], n: usize, w: usize, tok: &dyn Fn(usize) -> usize| {
            let mut v = Vec::with_capacity(n * w);
            for i in 0..n {
                v.extend_from_slice(&src[tok(i) * w..(tok(i) + 1) * w]);
            }
            v
        };
        let qs = gather(&qf, sq, rq, &qtok);
        let os = gather(&of, sq, rq, &qtok);
        let dos = gather(&dof, sq, rq, &qtok);
        let ks = gather(&kf, sk, rk, &ktok);
        let vs = gather(&vf, sk, rk, &ktok);
        let mut ls = vec![0f32; np * sq];
        for h in 0..np {
            for i in 0..sq {
                ls[h * sq + i] = lsef[h * total_q + qtok(i)];
                if ls[h * sq + i] == f32::NEG_INFINITY {
                    empty_rows.push((qtok(i), h));
                }
            }
        }
        let mask_fn = |h: usize, i: usize, j: usize| -> bool {
            let (v, st) = mask_h.as_ref().unwrap();
            let off = b as i64 * st[0] + h as i64 * st[1] + i as i64 * st[2] + j as i64 * st[3];
            v[off as usize] != 0
        };
        let bias_fn = |h: usize, i: usize, j: usize| -> f32 {
            let (v, st) = bias_h.as_ref().unwrap();
            let off = b as i64 * st[0] + h as i64 * st[1] + i as i64 * st[2] + j as i64 * st[3];
            v[off as usize]
        };
        let mut p = AttendParams::new(scale, case.mask);
        if mask_h.is_some() {
            p.mask_fn = Some(&mask_fn);
        }
        if has_bias {
            p.bias_fn = Some(&bias_fn);
        }
        p.window = case.window.map(|(l, r)| Window {
            left: l as i64,
            right: r as i64,
        });
        p.sinks = match case.sinks {
            None => None,
            Some(Sinks::OffByOne) => Some(SinkLogits::OffByOne),
            Some(Sinks::Learnable) => Some(SinkLogits::PerHead(&sink_h)),
        };
        let g = attend_sequence_backward(
            &qs,
            &ks,
            &vs,
            &os,
            &ls,
            &dos,
            SeqDims {
                sq,
                sk,
                heads: np,
                groups: ng,
                head_dim: hd,
            },
            &p,
            has_bias,
        )
        .expect("reference backward");
        if let Some(dbias) = &g.dbias {
            // [np, sq, sk] per sequence into the dense [batch, np, max_q, max_k].
            for h in 0..np {
                for i in 0..sq {
                    for j in 0..sk {
                        ref_db[((b * np + h) * max_q + i) * max_k + j] =
                            dbias[(h * sq + i) * sk + j];
                    }
                }
            }
        }
        for i in 0..sq {
            ref_dq[qtok(i) * rq..(qtok(i) + 1) * rq].copy_from_slice(&g.dq[i * rq..(i + 1) * rq]);
        }
        for j in 0..sk {
            ref_dk[ktok(j) * rk..(ktok(j) + 1) * rk].copy_from_slice(&g.dk[j * rk..(j + 1) * rk]);
            ref_dv[ktok(j) * rk..(ktok(j) + 1) * rk].copy_from_slice(&g.dv[j * rk..(j + 1) * rk]);
        }
        if let Some(ds) = g.dsinks {
            for (a, d) in ref_ds.iter_mut().zip(ds) {
                *a += d;
            }
        }
    }

    let mut errs = Vec::new();
    let mut modes = vec![("deterministic", &g1), ("fast", &f1)];
    if let Some(fb) = &fb {
        modes.push(("fast, bias without dbias", fb));
    }
    for (mode, g1) in modes {
        let with_dbias = mode != "fast, bias without dbias";
        errs.push(format!("[{mode}]"));
        for (what, got, want) in [
            ("dq", &g1.dq, &ref_dq),
            ("dk", &g1.dk, &ref_dk),
            ("dv", &g1.dv, &ref_dv),
        ] {
            if let Some(i) = got.iter().position(|x| !x.is_finite()) {
                panic!(
                    "{case:?} seed {seed} {mode}: {what}[{i}] = {} (NaN/Inf or unwritten)",
                    got[i]
                );
            }
            let err = rel_frob(got, want);
            assert!(
                err <= TOL,
                "{case:?} seed {seed} {mode}: {what} rel. Frobenius error {err:.3e} > {TOL}"
            );
            errs.push(format!("{what} {err:.2e}"));
        }
        if has_bias && with_dbias {
            if let Some(i) = g1.dbias.iter().position(|x| !x.is_finite()) {
                panic!(
                    "{case:?} seed {seed} {mode}: dbias[{i}] = {} (NaN/Inf or unwritten)",
                    g1.dbias[i]
                );
            }
            let err = rel_frob(&g1.dbias, &ref_db);
            assert!(
                err <= TOL,
                "{case:?} seed {seed} {mode}: dbias rel. Frobenius error {err:.3e} > {TOL}"
            );
            errs.push(format!("dbias {err:.2e}"));
        }
        if learnable {
            assert!(
                g1.dsinks.iter().all(|x| x.is_finite()),
                "{case:?} seed {seed} {mode}: dsinks {:?}",
                g1.dsinks
            );
            let err = rel_frob(&g1.dsinks, &ref_ds);
            assert!(
            err <= TOL,
            "{case:?} seed {seed} {mode}: dsinks {:?} vs reference {ref_ds:?} (rel. error {err:.3e})",
            g1.dsinks
        );
            errs.push(format!("dsinks {err:.2e}"));
        }
        for &(tok, h) in &empty_rows {
            let row = &g1.dq[(tok * np + h) * hd..(tok * np + h + 1) * hd];
            assert!(
                row.iter().all(|x| *x == 0.0),
                "{case:?} seed {seed} {mode}: dq of row {tok} head {h} (LSE -inf) is not zero"
            );
        }
        // Keys no query sees have exactly zero dK and dV here too. Unseen is read off the
        // reference's dV (P^T dO, zero only when no query weights the key); the reference's dK
        // can also vanish by cancellation (a row that sees one key has dS = P (dP - D) = 0
        // exactly in f64 but not in bf16), so a zero reference dK alone proves nothing.
        for (r, wr) in ref_dv.chunks(hd).enumerate() {
            if wr.iter().all(|x| *x == 0.0) {
                for (what, got) in [("dk", &g1.dk), ("dv", &g1.dv)] {
                    assert!(
                    got[r * hd..(r + 1) * hd].iter().all(|x| *x == 0.0),
                    "{case:?} seed {seed} {mode}: {what} row {r} should be zero (no query sees it)"
                );
                }
            }
        }
    }
    eprintln!(
        "ok {:?} hd{} {:?} {:?} bias {:?} win {:?} sinks {:?} heads {}/{} seqs {:?} packed {} ({} empty rows), fast mode {}: {}",
        case.dtype,
        hd,
        case.mask,
        case.mask_shape,
        case.bias_shape,
        case.window,
        case.sinks,
        np,
        ng,
        &case.seqs[..case.seqs.len().min(4)],
        case.packed,
        empty_rows.len(),
        bwd.fused_key().unwrap_or("none (deterministic pair)"),
        errs.join(", ")
    );
}

fn check(case: Case) {
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    match case.dtype {
        DType::Bf16 => run::<bf16>(&case, seed),
        DType::F16 => run::<f16>(&case, seed),
    }
}

/// Each mask type at head dims 64 and 128, odd lengths (not multiples of any tile), GQA 4/2.
#[test]
#[ignore = "requires a CUDA GPU"]
fn backward_every_mask_hd64_hd128() {
    let mut rng = SplitMix64::new(fresh_seed());
    for hd in [64, 128] {
        for mask in [
            MaskType::NoMask,
            MaskType::Causal,
            MaskType::CausalBottomRight,
        ] {
            let s = odd(&mut rng, 131, 90);
            check(Case::new(hd, mask, s, s, 2));
        }
    }
}

/// GQA 8/2, MQA 8/1 and MHA 4/4; f16 as well as bf16.
#[test]
#[ignore = "requires a CUDA GPU"]
fn backward_gqa_and_f16() {
    let mut c = Case::new(128, MaskType::Causal, 203, 203, 2);
    c.heads = 8;
    c.groups = 2;
    check(c.clone());
    c.groups = 1;
    c.hd = 64;
    check(c.clone());
    let mut c = Case::new(64, MaskType::Causal, 157, 157, 2);
    c.heads = 4;
    c.groups = 4;
    c.dtype = DType::F16;
    check(c.clone());
    c.hd = 128;
    c.mask = MaskType::NoMask;
    c.heads = 8;
    c.groups = 2;
    check(c);
}

/// sq != sk: bottom-right causal both ways (sq > sk: the first rows see no key, LSE -inf,
/// zero dq), top-left causal with sk > sq (keys past sq: zero dk, dv).
#[test]
#[ignore = "requires a CUDA GPU"]
fn backward_cross_lengths_and_empty_rows() {
    let mut rng = SplitMix64::new(fresh_seed());
    let a = odd(&mut rng, 33, 40);
    let b = odd(&mut rng, 150, 90);
    check(Case::new(64, MaskType::CausalBottomRight, a, b, 2));
    check(Case::new(128, MaskType::CausalBottomRight, b, a, 2));
    check(Case::new(64, MaskType::Causal, a, b, 2));
    check(Case::new(128, MaskType::NoMask, a, b, 3));
}

/// Sliding windows: causal with a left window, bottom-right with both sides, no_mask with
/// both sides (keys outside every row's window, rows whose window is empty).
#[test]
#[ignore = "requires a CUDA GPU"]
fn backward_sliding_window() {
    let mut c = Case::new(128, MaskType::Causal, 301, 301, 2);
    c.window = Some((37, 0));
    c.heads = 8;
    c.groups = 2;
    check(c);
    let mut c = Case::new(64, MaskType::CausalBottomRight, 90, 250, 2);
    c.window = Some((70, 0));
    check(c);
    let mut c = Case::new(64, MaskType::NoMask, 260, 260, 1);
    c.window = Some((20, 45));
    check(c);
    // sq > sk with a window: rows before the diagonal see nothing.
    let mut c = Case::new(128, MaskType::NoMask, 200, 77, 1);
    c.window = Some((5, 3));
    check(c);
}

/// Packed (cu_seqlens) ragged sequences, one of length 1, one with sq > sk (empty rows).
#[test]
#[ignore = "requires a CUDA GPU"]
fn backward_packed_ragged() {
    let mut c = Case::new(64, MaskType::Causal, 0, 0, 0);
    c.packed = true;
    c.seqs = vec![(1, 1), (70, 70), (129, 129), (33, 33)];
    check(c.clone());
    c.hd = 128;
    c.mask = MaskType::CausalBottomRight;
    c.seqs = vec![(40, 100), (7, 3), (65, 65), (130, 200)];
    c.heads = 8;
    c.groups = 2;
    check(c.clone());
    c.mask = MaskType::NoMask;
    c.window = Some((16, 16));
    c.dtype = DType::F16;
    check(c);
}

/// Off-by-one and learnable sinks (their gradient `dsinks`), with causal masks.
#[test]
#[ignore = "requires a CUDA GPU"]
fn backward_sinks() {
    for sinks in [Sinks::OffByOne, Sinks::Learnable] {
        let mut c = Case::new(64, MaskType::Causal, 150, 150, 2);
        c.sinks = Some(sinks);
        check(c.clone());
        // Rows that see no key but the sink: zero dq, dsinks from the sink alone.
        c.hd = 128;
        c.mask = MaskType::CausalBottomRight;
        c.seqs = vec![(120, 50); 2];
        check(c);
    }
}

/// The other supported head dims: 32, 80, 96, and 160 to 256 (where pairs of warps split dK/dV's
/// head dim).
#[test]
#[ignore = "requires a CUDA GPU"]
fn backward_other_head_dims() {
    for hd in [32, 80, 96, 160, 192, 224, 256] {
        check(Case::new(hd, MaskType::Causal, 173, 173, 2));
        check(Case::new(hd, MaskType::NoMask, 66, 140, 1));
    }
    let mut c = Case::new(256, MaskType::CausalBottomRight, 100, 130, 0);
    c.packed = true;
    c.seqs = vec![(100, 130), (17, 5)];
    c.window = Some((40, 0));
    c.heads = 8;
    c.groups = 2;
    check(c);
}

/// Typed errors: an output gate at compile time; a dtype mismatch, a short buffer, dsinks
/// without sinks and a missing mask tensor at launch time.
#[test]
#[ignore = "requires a CUDA GPU"]
fn backward_typed_errors() {
    let (ctx, stream) = cuda_stream();
    let mut cs = attention_codegen::registry::backward_configs(
        DType::Bf16,
        64,
        MaskType::Causal,
        false,
        false,
    );
    cs[2].output_gate = true;
    match AttentionBackward::compile(&ctx, &cs) {
        Err(AttnError::Render(msg)) => eprintln!("ok: {msg}"),
        Err(e) => panic!("expected a render error, got {e}"),
        Ok(_) => panic!("output gate: expected an error"),
    }
    let padding =
        AttentionBackward::new(&ctx, DType::Bf16, 64, MaskType::Padding, false, false).unwrap();
    let r = small_launch::<bf16>(&padding, &stream, false, false);
    assert!(
        matches!(&r, Err(AttnError::InvalidArgument { arg, .. }) if arg == "mask"),
        "{r:?}"
    );
    let bwd =
        AttentionBackward::new(&ctx, DType::Bf16, 64, MaskType::Causal, false, false).unwrap();
    let r = small_launch::<f16>(&bwd, &stream, false, false);
    assert!(matches!(r, Err(AttnError::DType { .. })), "{r:?}");
    let r = small_launch::<bf16>(&bwd, &stream, true, false);
    assert!(
        matches!(&r, Err(AttnError::Shape { arg, .. }) if arg == "dv"),
        "{r:?}"
    );
    let r = small_launch::<bf16>(&bwd, &stream, false, true);
    assert!(
        matches!(&r, Err(AttnError::InvalidArgument { arg, .. }) if arg == "sinks"),
        "{r:?}"
    );
    small_launch::<bf16>(&bwd, &stream, false, false).expect("a well-formed call runs");
    stream.synchronize().unwrap();
}

/// One padded launch of 16 rows, 2 heads at head dim 64 on zeros; `short_dv` passes a dv one
/// element short, `dsinks_only` a dsinks buffer without sinks.
fn small_launch<T: Elem>(
    bwd: &AttentionBackward,
    stream: &Arc<CudaStream>,
    short_dv: bool,
    dsinks_only: bool,
) -> Result<(), AttnError> {
    let n = 16 * 2 * 64;
    let x: CudaSlice<T> = stream.alloc_zeros(n).unwrap();
    let lse: CudaSlice<f32> = stream.alloc_zeros(32).unwrap();
    let mut dq: CudaSlice<T> = stream.alloc_zeros(n).unwrap();
    let mut dk: CudaSlice<T> = stream.alloc_zeros(n).unwrap();
    let mut dv: CudaSlice<T> = stream
        .alloc_zeros(if short_dv { n - 1 } else { n })
        .unwrap();
    let mut ds: CudaSlice<f32> = stream.alloc_zeros(2).unwrap();
    bwd.launch(
        stream,
        BwdArgs {
            q: &x,
            k: &x,
            v: &x,
            out: &x,
            lse: &lse,
            deterministic: false,
            dout: &x,
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dv,
            batch: 1,
            num_heads: 2,
            num_groups: 2,
            layout: BwdLayout::Padded {
                seqlen_q: 16,
                seqlen_k: 16,
            },
            softmax_scale: 0.125,
            window: (-1, -1),
            sinks: None,
            dsinks: if dsinks_only { Some(&mut ds) } else { None },
            mask: None,
            bias: None,
            dbias: None,
        },
    )
}

/// Mask tensors (padding, padding_causal, arbitrary) as the forward takes them: key padding
/// `[b, 1, 1, sk]` (sequence 0 fully masked), per-head random masks with a fully masked row,
/// broadcast shapes; padded and packed; with a window on padding_causal.
#[test]
#[ignore = "requires a CUDA GPU"]
fn backward_mask_tensors() {
    let mut c = Case::new(64, MaskType::Padding, 97, 97, 3);
    c.mask_shape = Some([3, 1, 1, 97]);
    check(c.clone());
    c.hd = 128;
    c.mask = MaskType::PaddingCausal;
    c.mask_shape = Some([3, 4, 97, 97]);
    check(c.clone());
    c.mask = MaskType::Arbitrary;
    c.mask_shape = Some([1, 4, 97, 97]);
    c.dtype = DType::F16;
    check(c.clone());
    let mut c = Case::new(64, MaskType::PaddingCausal, 0, 0, 0);
    c.packed = true;
    c.seqs = vec![(50, 50), (130, 130), (9, 9)];
    c.mask_shape = Some([3, 1, 130, 130]);
    c.window = Some((40, 0));
    check(c);
}

/// An additive bias (full, per-head broadcast over batch, key-only) and its gradient dbias
/// (dense dS, compared with the reference's), with masks, a window, GQA, packed.
#[test]
#[ignore = "requires a CUDA GPU"]
fn backward_bias_and_dbias() {
    let mut c = Case::new(64, MaskType::Causal, 111, 111, 2);
    c.bias_shape = Some([2, 4, 111, 111]);
    check(c.clone());
    c.hd = 128;
    c.mask = MaskType::NoMask;
    c.bias_shape = Some([1, 4, 111, 111]);
    c.window = Some((30, 10));
    check(c.clone());
    c.mask = MaskType::Padding;
    c.window = None;
    c.mask_shape = Some([2, 1, 1, 111]);
    c.bias_shape = Some([2, 1, 1, 111]);
    c.dtype = DType::F16;
    check(c);
    let mut c = Case::new(64, MaskType::CausalBottomRight, 0, 0, 0);
    c.packed = true;
    c.seqs = vec![(60, 90), (100, 100), (5, 2)];
    c.bias_shape = Some([3, 4, 100, 100]);
    check(c);
}

/// On an sm_90 device (unless `ATTN_DISABLE_SM90` or `ATTN_BWD_SM90_SCHEDULE` is set) the
/// fast mode runs the Hopper kernel (`backward_dqdkdv_*_sm90`) at head dims 64 (its anchored
/// schedule, `s4`), 128 (overlapped, `s3`) and 256, with and without a bias, the sm80 one at
/// the others; every other device runs the sm80 one.
#[test]
#[ignore = "requires a CUDA GPU"]
fn backward_fast_mode_picks_the_hopper_kernel_on_sm90() {
    let (ctx, _stream) = cuda_stream();
    let hopper = ctx.compute_capability().unwrap() == (9, 0)
        && !attention_runtime::cuda::layer::sm90_disabled()
        && std::env::var_os("ATTN_BWD_SM90_SCHEDULE").is_none();
    for hd in [64, 96, 128, 256] {
        for bias in [false, true] {
            let bwd = AttentionBackward::new(&ctx, DType::Bf16, hd, MaskType::Causal, false, bias)
                .unwrap();
            let key = bwd.fused_key().expect("a fused kernel");
            let want = match hd {
                64 if hopper => "s4_sm90",
                128 if hopper => "s3_sm90",
                256 if hopper => "w8_sm90",
                _ => "_sm80",
            };
            assert!(key.ends_with(want), "hd{hd} bias {bias}: {key}");
            eprintln!("hd{hd} bias {bias}: fast mode runs {key}");
        }
    }
}

/// Small cases for compute-sanitizer (memcheck, racecheck) on the fast kernels: a partial
/// query tile and a partial KV tile, GQA, causal, a window and a packed ragged batch, at
/// head dims 64, 128 and 256 (on an sm_90 device the Hopper kernel, there also its other
/// schedules).
#[test]
#[ignore = "requires a CUDA GPU"]
fn backward_sanitizer_cases() {
    let hopper = on_sm90();
    // (head dim, the Hopper kernel's tile: None = the registry's choice)
    let mut runs = vec![(64, None), (128, None), (256, None)];
    if hopper {
        for (hd, schedule) in OTHER_SCHEDULES {
            runs.push((hd, Some(PrefillTile::for_backward_sm90(hd, schedule))));
        }
    }
    for (hd, fused_tile) in runs {
        let mut c = Case::new(hd, MaskType::Causal, 150, 150, 1);
        c.heads = 4;
        c.groups = 2;
        c.fused_tile = fused_tile;
        check(c);
        let mut c = Case::new(hd, MaskType::NoMask, 0, 0, 0);
        c.packed = true;
        c.seqs = vec![(70, 130), (5, 3)];
        c.window = Some((20, 9));
        c.fused_tile = fused_tile;
        check(c);
    }
}

/// The Hopper kernel's schedules that are not a head dim's default
/// (`PrefillTile::for_backward_sm90`): (head dim, schedule).
const OTHER_SCHEDULES: [(usize, usize); 3] = [(64, 2), (128, 2), (128, 4)];

/// The Hopper kernel's other schedules ([`OTHER_SCHEDULES`]) on an sm_90 device, the cases
/// of [`check_sm90_variant`].
#[test]
#[ignore = "requires a CUDA GPU"]
fn backward_sm90_schedules() {
    if on_sm90() {
        for (hd, schedule) in OTHER_SCHEDULES {
            check_sm90_variant(hd, PrefillTile::for_backward_sm90(hd, schedule));
        }
    }
}

/// The Hopper kernel's default tiles at head dims 64, 128 and 256 (at 256 P^T and dS^T go
/// through shared memory, the warpgroups splitting S^T's queries and dK/dV/dQ's columns) on
/// an sm_90 device, the cases of [`check_sm90_variant`].
#[test]
#[ignore = "requires a CUDA GPU"]
fn backward_sm90_default_tiles() {
    if on_sm90() {
        for hd in [64, 128, 256] {
            check_sm90_variant(hd, sm90_tile(hd));
        }
    }
}

/// The Hopper kernel's default tile at `hd`.
fn sm90_tile(hd: usize) -> PrefillTile {
    PrefillTile::for_backward(Phase::BackwardDqDkDvSm90, hd, false)
}

/// Whether this is an sm_90 device (the Hopper kernels run); says so when not.
fn on_sm90() -> bool {
    let (ctx, _stream) = cuda_stream();
    let hopper = ctx.compute_capability().unwrap() == (9, 0);
    if !hopper {
        eprintln!("not an sm_90 device: the Hopper backward kernel does not run here");
    }
    hopper
}

/// The fast mode on the Hopper kernel with `tile` at `hd` against the CPU reference: every
/// causal kind, padded and packed ragged batches with windows, GQA, f16, a mask tensor and a
/// bias (fast mode without dbias).
fn check_sm90_variant(hd: usize, tile: PrefillTile) {
    let mut rng = SplitMix64::new(fresh_seed());
    for mask in [
        MaskType::NoMask,
        MaskType::Causal,
        MaskType::CausalBottomRight,
    ] {
        let s = odd(&mut rng, 131, 90);
        let mut c = Case::new(hd, mask, s, s, 2);
        c.fused_tile = Some(tile);
        check(c);
    }
    for (mask, seqs, window) in [
        (
            MaskType::Causal,
            vec![(1, 1), (70, 130), (129, 129)],
            (37, 5),
        ),
        (
            MaskType::CausalBottomRight,
            vec![(1, 1), (100, 130), (17, 5)],
            (40, 0),
        ),
    ] {
        let mut c = Case::new(hd, mask, 0, 0, 0);
        c.packed = true;
        c.seqs = seqs;
        c.window = Some(window);
        c.heads = 8;
        c.groups = 2;
        c.dtype = DType::F16;
        c.fused_tile = Some(tile);
        check(c);
    }
    let mut c = Case::new(hd, MaskType::PaddingCausal, 97, 97, 2);
    c.mask_shape = Some([2, 4, 97, 97]);
    c.bias_shape = Some([1, 4, 97, 97]);
    c.fused_tile = Some(tile);
    check(c);
}
