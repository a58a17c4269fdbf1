//! The fast (FlashAttention-2 style) forward kernel against the CPU reference
//! (`reference::attend_sequence`), on a GPU. Every test is `#[ignore = "requires a CUDA GPU"]`
//! (always compiled); run with `scripts/gpu-bundle.sh` then `gpu-bundle/run.sh` there.
//!
//! Each case draws fresh random inputs (seed printed), poisons `out`, `lse` and `max_logit`
//! with NaN, fails on NaN, and bounds the relative Frobenius error of the output by 1e-2
//! (LSE and max logit: absolute error <= 2e-2, and `-inf` exactly where the reference has
//! it). Each case launches twice and requires bitwise-identical results (determinism).

use std::sync::Arc;

use attention_codegen::render::{KernelConfig, Phase, PrefillTile};
use attention_codegen::{DType, MaskType, Sinks, Window};
use attention_runtime::cuda::params::{fwd_launch_config, launch, FwdParams};
use attention_runtime::cuda::prefill_sm80::{
    PrefillArgs, PrefillExtras, PrefillLayout, PrefillSm80Kernel, PrefillStrided,
};
use attention_runtime::modules::SplitMix64;
use attention_runtime::reference::attention::{attend_sequence, AttendParams, SeqDims, SinkLogits};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr};
use half::{bf16, f16};

mod common;
use common::{cuda_stream, fresh_seed, odd, rel_frob};

const TOL: f64 = 1e-2;

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
    tile: Option<PrefillTile>,
    /// Mask tensor of this logical shape (1 = broadcast dim, else the full
    /// `[batch, heads, max_sq, max_sk]` dim); `[b, 1, 1, sk]` is a key-padding mask (sequence
    /// 0 fully masked when batch > 1), others random with a fully masked row.
    mask_shape: Option<[usize; 4]>,
    /// Additive f32 bias of this logical shape (same convention), values in [-2, 2].
    bias_shape: Option<[usize; 4]>,
    /// Run the general one-warp-per-row `fwd` kernel (the fallback where the tensor-core
    /// kernel does not run) instead, launched with its `FwdParams`; it computes no max logit.
    general: bool,
    /// Packed only: the values of this sequence are all +inf (give it no queries). The key
    /// tiles of the sequence before it run into its rows (a TMA box reads on past the
    /// sequence's end): its output must stay finite and exact.
    inf_v_seq: Option<usize>,
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
            tile: None,
            mask_shape: None,
            bias_shape: None,
            general: false,
            inf_v_seq: None,
        }
    }
}

/// The kernel under test: the tensor-core kernel, or the general `fwd` kernel (key, entry).
enum Kernel {
    Fast(PrefillSm80Kernel),
    General(KernelConfig, CudaFunction),
}

impl Kernel {
    fn key(&self) -> String {
        match self {
            Kernel::Fast(k) => k.key().to_string(),
            Kernel::General(c, _) => c.key(),
        }
    }
}

/// The raw device address of `s` (a kernel argument).
fn dptr<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    let (p, _sync) = s.device_ptr(stream);
    p
}

/// Compile the general `fwd` kernel of `config` (phase `Forward`) for `ctx`'s device.
fn compile_general(ctx: &Arc<CudaContext>, config: &KernelConfig) -> CudaFunction {
    let src = config.render().expect("renders");
    let arch = attention_runtime::device::arch_for_capability(ctx.compute_capability().unwrap());
    let cubin = attention_runtime::jit::compile_cubin(&src.key, &src.source, &arch).expect("nvrtc");
    ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
        .expect("module")
        .load_function(&src.key)
        .expect("entry")
}

/// Elements round-tripped through the kernel's dtype.
trait Elem: cudarc::driver::DeviceRepr + Copy + Default + Unpin {
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    fn nan() -> Self;
}
impl Elem for bf16 {
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn nan() -> Self {
        bf16::NAN
    }
}
impl Elem for f16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn nan() -> Self {
        f16::NAN
    }
}

struct GpuResult {
    out: Vec<f32>,
    lse: Vec<f32>,
    max_logit: Vec<f32>,
}

fn run<T: Elem>(case: &Case, seed: u64) {
    let (ctx, stream) = cuda_stream();
    let mut rng = SplitMix64::new(seed);
    let (np, ng, hd) = (case.heads, case.groups, case.hd);
    let batch = case.seqs.len();
    let total_q: usize = case.seqs.iter().map(|s| s.0).sum();
    let total_k: usize = case.seqs.iter().map(|s| s.1).sum();
    let (max_q, max_k) = (
        case.seqs.iter().map(|s| s.0).max().unwrap(),
        case.seqs.iter().map(|s| s.1).max().unwrap(),
    );
    if !case.packed {
        assert!(case.seqs.iter().all(|s| *s == case.seqs[0]));
    }
    // Host inputs, rounded to the element type (the reference sees the same values).
    let mut gen =
        |n: usize| -> Vec<T> { (0..n).map(|_| T::from_f32(rng.uniform() * 1.7)).collect() };
    let q_h = gen(total_q * np * hd);
    let k_h = gen(total_k * ng * hd);
    let mut v_h = gen(total_k * ng * hd);
    if let Some(b) = case.inf_v_seq {
        assert!(case.packed && case.seqs[b].0 == 0, "bad test case");
        let k0: usize = case.seqs[..b].iter().map(|s| s.1).sum();
        for x in &mut v_h[k0 * ng * hd..(k0 + case.seqs[b].1) * ng * hd] {
            *x = T::from_f32(f32::INFINITY);
        }
    }
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
        let n: usize = shape.iter().product();
        let st = strides_of(shape);
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

    // Under SM90 (see `sm90_family`) the Hopper kernel runs every case whose head dim it
    // takes (multiples of 64), with its own default tile.
    let sm90 = SM90.with(|f| f.get()) && !case.general && hd % 64 == 0;
    let phase = if case.general {
        Phase::PrefillRows
    } else if sm90 {
        Phase::PrefillSm90
    } else {
        Phase::PrefillSm80
    };
    let mut config = KernelConfig::new(phase, case.dtype, hd);
    config.mask = Some(case.mask);
    config.has_window = case.window.is_some();
    config.sinks = case.sinks;
    config.has_bias = case.bias_shape.is_some();
    config.tile = if !sm90 {
        case.tile
    } else if SM90_WS.with(|f| f.get()) {
        // The default (warp-specialized, TMA) tile.
        None
    } else {
        // The tile without a producer warpgroup, on the same cases.
        let heavy = case.mask.takes_mask_tensor() || config.has_bias || config.has_window;
        Some(PrefillTile::for_head_dim_sm90(hd, heavy))
    };
    let kernel = if case.general {
        Kernel::General(config.clone(), compile_general(&ctx, &config))
    } else {
        Kernel::Fast(PrefillSm80Kernel::compile(&ctx, &config).expect("compile"))
    };

    let q = stream.clone_htod(&q_h).unwrap();
    let k = stream.clone_htod(&k_h).unwrap();
    let v = stream.clone_htod(&v_h).unwrap();
    let sinks = stream.clone_htod(&sink_h).unwrap();
    let mask_d = mask_h.as_ref().map(|(v, _)| stream.clone_htod(v).unwrap());
    let bias_d = bias_h.as_ref().map(|(v, _)| stream.clone_htod(v).unwrap());
    let mut cu_q = vec![0i32];
    let mut cu_k = vec![0i32];
    for (a, b) in &case.seqs {
        cu_q.push(cu_q.last().unwrap() + *a as i32);
        cu_k.push(cu_k.last().unwrap() + *b as i32);
    }
    let cu_q_d = stream.clone_htod(&cu_q).unwrap();
    let cu_k_d = stream.clone_htod(&cu_k).unwrap();
    let scale = 1.0 / (hd as f32).sqrt();

    let launch = || -> GpuResult {
        let mut out: CudaSlice<T> = stream
            .clone_htod(&vec![T::nan(); total_q * np * hd])
            .unwrap();
        let mut lse = stream.clone_htod(&vec![f32::NAN; total_q * np]).unwrap();
        let mut ml = stream.clone_htod(&vec![f32::NEG_INFINITY; np]).unwrap();
        let kernel = match &kernel {
            Kernel::Fast(k) => k,
            Kernel::General(config, f) => {
                let params = FwdParams {
                    q: dptr(&q, &stream),
                    k: dptr(&k, &stream),
                    v: dptr(&v, &stream),
                    out: dptr(&out, &stream),
                    lse: dptr(&lse, &stream),
                    cu_seqlens_q: if case.packed {
                        dptr(&cu_q_d, &stream)
                    } else {
                        0
                    },
                    cu_seqlens_k: if case.packed {
                        dptr(&cu_k_d, &stream)
                    } else {
                        0
                    },
                    batch: batch as i32,
                    num_heads: np as i32,
                    num_groups: ng as i32,
                    seqlen_q: max_q as i32,
                    seqlen_k: max_k as i32,
                    softmax_scale: scale,
                    window_left: case.window.map_or(-1, |w| w.0),
                    window_right: case.window.map_or(-1, |w| w.1),
                    mask: mask_d.as_ref().map_or(0, |d| dptr(d, &stream)),
                    mask_strides: mask_h.as_ref().map_or([0; 4], |m| m.1),
                    bias: bias_d.as_ref().map_or(0, |d| dptr(d, &stream)),
                    bias_strides: bias_h.as_ref().map_or([0; 4], |b| b.1),
                    sinks: if case.sinks == Some(Sinks::Learnable) {
                        dptr(&sinks, &stream)
                    } else {
                        0
                    },
                    ..FwdParams::default()
                };
                let cfg = fwd_launch_config(config, max_q, np, batch);
                // SAFETY: FwdParams is the `fwd` parameter layout (tests/nvrtc_params_layout.rs);
                // every pointer is a live buffer of the documented shape, or null where unused.
                unsafe { launch(&stream, f, cfg, &params) }.expect("launch");
                stream.synchronize().expect("kernel run");
                return GpuResult {
                    out: stream
                        .clone_dtoh(&out)
                        .unwrap()
                        .into_iter()
                        .map(|x: T| x.to_f32())
                        .collect(),
                    lse: stream.clone_dtoh(&lse).unwrap(),
                    max_logit: stream.clone_dtoh(&ml).unwrap(),
                };
            }
        };
        let layout = if case.packed {
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
        let extras = PrefillExtras {
            mask: mask_d.as_ref().map(|d| PrefillStrided {
                data: d,
                strides: mask_h.as_ref().unwrap().1,
                extent: full,
            }),
            bias: bias_d.as_ref().map(|d| PrefillStrided {
                data: d,
                strides: bias_h.as_ref().unwrap().1,
                extent: full,
            }),
            v_nonfinite: None,
        };
        kernel
            .launch_with(
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
                    layout,
                    softmax_scale: scale,
                    window: case.window.unwrap_or((-1, -1)),
                    sinks: (case.sinks == Some(Sinks::Learnable)).then_some(&sinks),
                    gate: None,
                    max_logit: Some(&mut ml),
                },
                extras,
            )
            .expect("launch");
        stream.synchronize().expect("kernel run");
        GpuResult {
            out: stream
                .clone_dtoh(&out)
                .unwrap()
                .into_iter()
                .map(|x: T| x.to_f32())
                .collect(),
            lse: stream.clone_dtoh(&lse).unwrap(),
            max_logit: stream.clone_dtoh(&ml).unwrap(),
        }
    };
    let r1 = launch();
    let r2 = launch();
    assert!(
        r1.out
            .iter()
            .zip(&r2.out)
            .all(|(a, b)| a.to_bits() == b.to_bits())
            && r1
                .lse
                .iter()
                .zip(&r2.lse)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
        "{case:?} seed {seed}: two launches differ (not deterministic)"
    );

    // Reference per sequence, gathered into the kernel's layouts.
    let tof = |x: &[T]| -> Vec<f32> { x.iter().map(|e| e.to_f32()).collect() };
    let (qf, kf, vf) = (tof(&q_h), tof(&k_h), tof(&v_h));
    let mut ref_out = vec![0f32; total_q * np * hd];
    let mut ref_lse = vec![0f32; total_q * np];
    let mut ref_ml = vec![f32::NEG_INFINITY; np];
    for (b, &(sq, sk)) in case.seqs.iter().enumerate() {
        if sq == 0 {
            continue;
        }
        // token index of row i of sequence b
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
        let mut qs = Vec::with_capacity(sq * np * hd);
        for i in 0..sq {
            qs.extend_from_slice(&qf[qtok(i) * np * hd..(qtok(i) + 1) * np * hd]);
        }
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        for j in 0..sk {
            ks.extend_from_slice(&kf[ktok(j) * ng * hd..(ktok(j) + 1) * ng * hd]);
            vs.extend_from_slice(&vf[ktok(j) * ng * hd..(ktok(j) + 1) * ng * hd]);
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
        if bias_h.is_some() {
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
        let r = attend_sequence(
            &qs,
            &ks,
            &vs,
            SeqDims {
                sq,
                sk,
                heads: np,
                groups: ng,
                head_dim: hd,
            },
            &p,
        )
        .expect("reference");
        for i in 0..sq {
            ref_out[qtok(i) * np * hd..(qtok(i) + 1) * np * hd]
                .copy_from_slice(&r.out[i * np * hd..(i + 1) * np * hd]);
            for h in 0..np {
                ref_lse[h * total_q + qtok(i)] = r.lse[h * sq + i];
            }
        }
        for (m, r) in ref_ml.iter_mut().zip(&r.max_logit) {
            *m = m.max(*r);
        }
    }

    assert!(
        r1.out.iter().all(|x| x.is_finite()),
        "{case:?} seed {seed}: NaN/inf (or unwritten) output"
    );
    let err = rel_frob(&r1.out, &ref_out);
    assert!(
        err <= TOL,
        "{case:?} seed {seed}: rel. Frobenius error {err:.3e} > {TOL}"
    );
    // The general kernel computes no max logit (its buffer stays -inf).
    let checks: &[(&str, &Vec<f32>, &Vec<f32>)] = if case.general {
        &[("lse", &r1.lse, &ref_lse)]
    } else {
        &[
            ("lse", &r1.lse, &ref_lse),
            ("max_logit", &r1.max_logit, &ref_ml),
        ]
    };
    for &(what, got, want) in checks {
        for (idx, (g, w)) in got.iter().zip(want.iter()).enumerate() {
            let ok = if w.is_infinite() {
                g == w
            } else {
                (g - w).abs() <= 2e-2 * (1.0 + w.abs())
            };
            assert!(
                ok,
                "{case:?} seed {seed}: {what}[{idx}] = {g}, reference {w}"
            );
        }
    }
    eprintln!(
        "ok {} {:?} hd{} seqs {:?} packed {} win {:?} sinks {:?} mask {:?} bias {:?}: rel err {err:.2e}",
        kernel.key(),
        case.mask,
        hd,
        &case.seqs[..case.seqs.len().min(3)],
        case.packed,
        case.window,
        case.sinks,
        case.mask_shape,
        case.bias_shape
    );
}

thread_local! {
    /// Run the cases on the Hopper kernel (`prefill_*_sm90`) where it takes the head dim.
    static SM90: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// With SM90: run the default tile, warp-specialized with TMA loads
    /// (`PrefillTile::for_head_dim_sm90_ws`); without it, `PrefillTile::for_head_dim_sm90`'s.
    static SM90_WS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn check(case: Case) {
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    match case.dtype {
        DType::Bf16 => run::<bf16>(&case, seed),
        DType::F16 => run::<f16>(&case, seed),
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn every_head_dim_causal_and_full_padded() {
    let mut rng = SplitMix64::new(fresh_seed());
    // Every supported head dim (32, 160 and 224 came with real checkpoints: MiniLM, ...).
    for &hd in attention_codegen::SUPPORTED_HEAD_DIMS {
        for mask in [MaskType::Causal, MaskType::NoMask] {
            let s = odd(&mut rng, 131, 90);
            check(Case::new(hd, mask, s, s, 2));
        }
    }
}

/// Head dim 80 (Phi-2): 5 k16 steps of q.k and 10 n8 tiles of O, rows of 160 bytes (176 with
/// the shared-memory pad). Packed varlen with GQA, bottom-right with sq > sk, a window with a
/// bias and a learnable sink, a key-padding mask, f16, and other tiles (128 keys per step,
/// 3 stages, 8 warps).
#[test]
#[ignore = "requires a CUDA GPU"]
fn head_dim_80_variants() {
    let mut rng = SplitMix64::new(fresh_seed());
    let mut c = Case::new(80, MaskType::Causal, 1, 1, 1);
    c.packed = true;
    c.heads = 8;
    c.groups = 2;
    let a = odd(&mut rng, 100, 100);
    c.seqs = vec![(1, 1), (a, a + 7), (37, 37), (200, 150)];
    check(c);
    check(Case::new(80, MaskType::CausalBottomRight, 150, 61, 2));
    let s = odd(&mut rng, 140, 90);
    let mut c = Case::new(80, MaskType::Causal, s, s, 2);
    c.window = Some((40, 0));
    c.bias_shape = Some([1, 4, s, s]);
    c.sinks = Some(Sinks::Learnable);
    check(c);
    let mut c = Case::new(80, MaskType::Padding, s, s, 3);
    c.mask_shape = Some([3, 1, 1, s]);
    check(c);
    let mut c = Case::new(80, MaskType::Causal, 257, 257, 2);
    c.dtype = DType::F16;
    c.sinks = Some(Sinks::OffByOne);
    check(c);
    for (bm, bn, w, st) in [(128, 128, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2)] {
        let mut c = Case::new(80, MaskType::Causal, 211, 211, 2);
        c.tile = Some(PrefillTile {
            block_m: bm,
            block_n: bn,
            warps: w,
            stages: st,
        });
        check(c);
    }
}

/// The general one-warp-per-row `fwd` kernel (the fallback where the tensor-core kernel does
/// not run: before sm_80, or a tile over the shared memory), which the layer never picks on
/// an H100/H200: head dim 80 (lanes 16..31 of the third channel chunk hold no channel) next
/// to 64 and 96, padded and packed, with a mask tensor, a bias, a window and sinks.
#[test]
#[ignore = "requires a CUDA GPU"]
fn general_kernel_head_dims_80_64_96() {
    let mut rng = SplitMix64::new(fresh_seed());
    for hd in [80, 64, 96] {
        let s = odd(&mut rng, 60, 50);
        let mut c = Case::new(hd, MaskType::Causal, s, s, 2);
        c.general = true;
        check(c);
        let mut c = Case::new(hd, MaskType::PaddingCausal, s, s, 3);
        c.general = true;
        c.mask_shape = Some([3, 1, 1, s]);
        c.bias_shape = Some([1, 4, s, s]);
        c.sinks = Some(Sinks::Learnable);
        check(c);
    }
    let mut c = Case::new(80, MaskType::CausalBottomRight, 1, 1, 1);
    c.general = true;
    c.packed = true;
    c.heads = 8;
    c.groups = 2;
    c.window = Some((20, 0));
    c.sinks = Some(Sinks::OffByOne);
    c.seqs = vec![(1, 1), (40, 47), (70, 33)];
    check(c);
    let mut c = Case::new(80, MaskType::Arbitrary, 37, 90, 2);
    c.general = true;
    c.dtype = DType::F16;
    c.mask_shape = Some([2, 4, 37, 90]);
    check(c);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn bottom_right_and_cross_lengths() {
    let mut rng = SplitMix64::new(fresh_seed());
    let a = odd(&mut rng, 33, 40);
    let b = odd(&mut rng, 150, 90);
    check(Case::new(64, MaskType::CausalBottomRight, a, b, 2));
    // sq > sk: the first rows see no key -> zeros and LSE -inf.
    check(Case::new(128, MaskType::CausalBottomRight, b, a, 2));
    check(Case::new(128, MaskType::Causal, b, a, 1));
    check(Case::new(256, MaskType::NoMask, a, b, 3));
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn sliding_window_and_gqa() {
    let mut c = Case::new(128, MaskType::Causal, 301, 301, 2);
    c.window = Some((37, 0));
    c.heads = 8;
    c.groups = 1;
    check(c);
    let mut c = Case::new(64, MaskType::NoMask, 260, 290, 1);
    c.window = Some((20, 15));
    c.heads = 6;
    c.groups = 3;
    check(c);
    let mut c = Case::new(96, MaskType::CausalBottomRight, 100, 333, 2);
    c.window = Some((128, 0));
    check(c);
}

/// Packed sequences whose last key tile runs into the next sequence's rows, all of whose
/// values are +inf: keys past a sequence's end must contribute exactly nothing (0 * inf is
/// NaN), whichever way the kernel loads its tiles. Head dims 64-256, causal and not.
#[test]
#[ignore = "requires a CUDA GPU"]
fn packed_tail_before_inf_values() {
    for (hd, mask) in [
        (64, MaskType::NoMask),
        (128, MaskType::Causal),
        (128, MaskType::NoMask),
        (256, MaskType::Causal),
    ] {
        let mut c = Case::new(hd, mask, 1, 1, 1);
        c.packed = true;
        c.seqs = vec![(37, 37), (0, 200), (150, 150), (0, 130)];
        c.inf_v_seq = Some(1);
        check(c.clone());
        c.inf_v_seq = Some(3);
        check(c);
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn packed_varlen() {
    let mut rng = SplitMix64::new(fresh_seed());
    for (hd, mask) in [
        (128, MaskType::Causal),
        (64, MaskType::NoMask),
        (256, MaskType::CausalBottomRight),
    ] {
        let mut c = Case::new(hd, mask, 1, 1, 1);
        c.packed = true;
        c.heads = 8;
        c.groups = 2;
        let a = odd(&mut rng, 100, 100);
        let b = odd(&mut rng, 1, 20);
        c.seqs = vec![(1, 1), (a, a + 7), (b, b), (200, 150)];
        check(c);
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn sinks_and_f16() {
    let mut c = Case::new(64, MaskType::Causal, 150, 150, 2);
    c.sinks = Some(Sinks::Learnable);
    check(c);
    let mut c = Case::new(128, MaskType::CausalBottomRight, 90, 40, 1);
    c.sinks = Some(Sinks::OffByOne);
    check(c);
    let mut c = Case::new(128, MaskType::Causal, 257, 257, 2);
    c.dtype = DType::F16;
    check(c);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn other_tiles() {
    for (hd, bm, bn, w, st) in [
        (128, 128, 64, 8, 2),
        (128, 64, 64, 4, 3),
        (128, 128, 32, 4, 2),
        (64, 128, 128, 4, 2),
        (256, 64, 64, 4, 2),
        (256, 128, 32, 8, 2),
    ] {
        let mut c = Case::new(hd, MaskType::Causal, 211, 211, 2);
        c.tile = Some(PrefillTile {
            block_m: bm,
            block_n: bn,
            warps: w,
            stages: st,
        });
        check(c);
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn mask_tensors_and_bias() {
    let mut rng = SplitMix64::new(fresh_seed());
    let (np, b) = (4, 3);
    // Key-padding mask [b, 1, 1, sk] (sequence 0 fully masked: zeros and LSE -inf).
    for (hd, mask) in [(64, MaskType::Padding), (128, MaskType::PaddingCausal)] {
        let s = odd(&mut rng, 150, 100);
        let mut c = Case::new(hd, mask, s, s, b);
        c.mask_shape = Some([b, 1, 1, s]);
        check(c);
    }
    // Arbitrary [b, h, sq, sk], cross lengths, GQA.
    let (sq, sk) = (odd(&mut rng, 70, 60), odd(&mut rng, 190, 80));
    let mut c = Case::new(128, MaskType::Arbitrary, sq, sk, b);
    c.mask_shape = Some([b, np, sq, sk]);
    check(c);
    let mut c = Case::new(256, MaskType::Arbitrary, 133, 133, 2);
    c.mask_shape = Some([2, np, 133, 133]);
    check(c);
    // Additive bias [1, h, sq, sk] with causal, no mask and a window.
    let s = odd(&mut rng, 140, 90);
    for (hd, mask, window) in [
        (128, MaskType::Causal, None),
        (64, MaskType::NoMask, None),
        (128, MaskType::Causal, Some((40, 0))),
    ] {
        let mut c = Case::new(hd, mask, s, s, 2);
        c.window = window;
        c.bias_shape = Some([1, np, s, s]);
        check(c);
    }
    // Mask tensor and bias together, with a learnable sink.
    let mut c = Case::new(64, MaskType::PaddingCausal, 170, 170, 2);
    c.mask_shape = Some([2, 1, 1, 170]);
    c.bias_shape = Some([2, np, 170, 170]);
    c.sinks = Some(Sinks::Learnable);
    check(c);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn packed_with_mask_and_bias() {
    let mut rng = SplitMix64::new(fresh_seed());
    let a = odd(&mut rng, 100, 100);
    let seqs = vec![(1, 1), (a, a + 7), (37, 37), (200, 150)];
    let (mq, mk) = (200.max(a), 150.max(a + 7));
    // Padding-causal key padding [n, 1, 1, max_sk], then arbitrary [n, h, max_sq, max_sk]
    // with a bias [1, h, max_sq, max_sk].
    let mut c = Case::new(128, MaskType::PaddingCausal, 1, 1, 1);
    c.packed = true;
    c.heads = 8;
    c.groups = 2;
    c.seqs = seqs.clone();
    c.mask_shape = Some([4, 1, 1, mk]);
    check(c);
    let mut c = Case::new(64, MaskType::Arbitrary, 1, 1, 1);
    c.packed = true;
    c.heads = 4;
    c.groups = 4;
    c.seqs = seqs;
    c.mask_shape = Some([4, 4, mq, mk]);
    c.bias_shape = Some([1, 4, mq, mk]);
    check(c);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn mask_and_bias_arguments_are_checked() {
    let (ctx, stream) = cuda_stream();
    let mut config = KernelConfig::new(Phase::PrefillSm80, DType::Bf16, 64);
    config.mask = Some(MaskType::Padding);
    let kernel = PrefillSm80Kernel::compile(&ctx, &config).expect("compile");
    let (b, np, s, hd) = (2, 2, 16, 64);
    let x: CudaSlice<bf16> = stream.alloc_zeros(b * np * s * hd).unwrap();
    let mut out: CudaSlice<bf16> = stream.alloc_zeros(b * np * s * hd).unwrap();
    let mut lse: CudaSlice<f32> = stream.alloc_zeros(b * np * s).unwrap();
    let short: CudaSlice<u8> = stream.alloc_zeros(b * s - 1).unwrap();
    let good: CudaSlice<u8> = stream.alloc_zeros(b * s).unwrap();
    let bias: CudaSlice<f32> = stream.alloc_zeros(np * s * s).unwrap();
    let mut try_launch = |extras: PrefillExtras<'_>| {
        kernel.launch_with(
            &stream,
            PrefillArgs {
                q: &x,
                k: &x,
                v: &x,
                out: &mut out,
                lse: &mut lse,
                batch: b,
                num_heads: np,
                num_groups: np,
                layout: PrefillLayout::Padded {
                    seqlen_q: s,
                    seqlen_k: s,
                },
                softmax_scale: 0.125,
                window: (-1, -1),
                sinks: None,
                gate: None,
                max_logit: None,
            },
            extras,
        )
    };
    let err = try_launch(PrefillExtras::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("mask"), "{err}");
    let m = PrefillStrided {
        data: &short,
        strides: [s as i64, 0, 0, 1],
        extent: [b, np, s, s],
    };
    let err = try_launch(PrefillExtras {
        mask: Some(m),
        bias: None,
        v_nonfinite: None,
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("mask"), "{err}");
    let bi = PrefillStrided {
        data: &bias,
        strides: [0, (s * s) as i64, s as i64, 1],
        extent: [b, np, s, s],
    };
    // A valid mask, but a bias the kernel does not read.
    let m = PrefillStrided {
        data: &good,
        strides: [s as i64, 0, 0, 1],
        extent: [b, np, s, s],
    };
    let err = try_launch(PrefillExtras {
        mask: Some(m),
        bias: Some(bi),
        v_nonfinite: None,
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("bias"), "{err}");
}

/// The Hopper family (`prefill_*_sm90`, wgmma; sm_90 only) on every case above whose head dim
/// it takes (64, 128, 192, 256): masks, windows, GQA, packed varlen, sinks, f16, mask tensors
/// and biases, cross lengths with rows that see no key.
#[test]
#[ignore = "requires a CUDA GPU"]
fn sm90_family() {
    let (ctx, _) = cuda_stream();
    if ctx.compute_capability().unwrap() != (9, 0) {
        eprintln!("not an sm_90 GPU: the prefill_*_sm90 kernels do not run here");
        return;
    }
    SM90.with(|f| f.set(true));
    every_head_dim_causal_and_full_padded();
    bottom_right_and_cross_lengths();
    sliding_window_and_gqa();
    packed_varlen();
    sinks_and_f16();
    other_tiles();
    mask_tensors_and_bias();
    packed_with_mask_and_bias();
    packed_tail_before_inf_values();
    let mut c = Case::new(192, MaskType::Causal, 333, 333, 2);
    c.window = Some((100, 0));
    c.sinks = Some(Sinks::Learnable);
    check(c);
    let mut c = Case::new(64, MaskType::Causal, 1000, 1000, 1);
    c.heads = 8;
    c.groups = 1;
    check(c);
    SM90.with(|f| f.set(false));
}

/// `sm90_family` on the warp-specialized tile (a producer warpgroup loading through
/// mbarriers; `PrefillTile::for_head_dim_sm90_ws`).
#[test]
#[ignore = "requires a CUDA GPU"]
fn sm90_ws_family() {
    SM90_WS.with(|f| f.set(true));
    sm90_family();
    SM90_WS.with(|f| f.set(false));
}

/// `sm90_sanitizer_cases` on the warp-specialized tile.
#[test]
#[ignore = "requires a CUDA GPU"]
fn sm90_ws_sanitizer_cases() {
    SM90_WS.with(|f| f.set(true));
    sm90_sanitizer_cases();
    SM90_WS.with(|f| f.set(false));
}

/// A few small cases of the Hopper kernel, both schedules (head dim 128: three stages,
/// pipelined; 256: two), sized for compute-sanitizer (memcheck, racecheck).
#[test]
#[ignore = "requires a CUDA GPU"]
fn sm90_sanitizer_cases() {
    let (ctx, _) = cuda_stream();
    if ctx.compute_capability().unwrap() != (9, 0) {
        eprintln!("not an sm_90 GPU: the prefill_*_sm90 kernels do not run here");
        return;
    }
    SM90.with(|f| f.set(true));
    check(Case::new(128, MaskType::Causal, 300, 300, 2));
    let mut c = Case::new(256, MaskType::NoMask, 1, 1, 1);
    c.packed = true;
    c.seqs = vec![(1, 1), (70, 77), (130, 65)];
    check(c);
    let mut c = Case::new(128, MaskType::PaddingCausal, 150, 150, 2);
    c.mask_shape = Some([2, 1, 1, 150]);
    c.bias_shape = Some([1, 4, 150, 150]);
    c.sinks = Some(Sinks::Learnable);
    check(c);
    // The tile that crosses a packed sequence's end (TMA: its V rows past the end zeroed).
    let mut c = Case::new(128, MaskType::Causal, 1, 1, 1);
    c.packed = true;
    c.seqs = vec![(37, 37), (0, 200)];
    c.inf_v_seq = Some(1);
    check(c);
    SM90.with(|f| f.set(false));
}
