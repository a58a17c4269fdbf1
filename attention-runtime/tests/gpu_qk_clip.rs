//! QK-Clip on the GPU ([`TrainLayer`] for [`CudaLayer`]: the running max-logit record kept on
//! the device, `clip_qk` rescaling the device `linear_qkv.weight` in place) against the CPU
//! layer's ([`CpuLayer`]). Every test is `#[ignore = "requires a CUDA GPU"]` (always compiled);
//! run them with `scripts/gpu-bundle.sh` and `gpu-bundle/run.sh` on the GPU machine
//! (CONTRIBUTING.md).
//!
//! Inputs are fresh random draws (the seed is printed), rounded to the layer's dtype, and the
//! CPU layer gets the CUDA layer's (rounded) weights, so both see the same values. The CUDA
//! record must be bitwise the running max of its own forwards' per-head maxima (the fold runs
//! on the device) and within bf16 noise of the CPU record; the clipped device weight must be
//! bitwise the formula applied to the device record (f32 product, one rounding), and close to
//! the CPU layer's clipped weight. Logits here are large on purpose (tens to hundreds), so
//! outputs are not compared (a sharp softmax magnifies bf16 rounding); the records are.

use attention_runtime::backend::{Backend, BackendLayer, CpuLayer, SavedForward, TrainLayer};
use attention_runtime::cuda::{CudaLayer, ElemType};
use attention_runtime::modules::SplitMix64;
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::train::{BackwardOptions, QkClipReport, Recompute, TrainOptions};
use attention_runtime::{
    AttentionLayer, AttnError, ForwardArgs, PackedSeqParams, RuntimeDims, Tensor, WeightStore,
};

mod common;
use common::{fresh_seed, gpu, rand_t, rel_err, round, round_f};

fn bits(t: &Tensor) -> Vec<u32> {
    t.data().iter().map(|x| x.to_bits()).collect()
}

/// A layer of `spec` whose weights are rounded to the spec's dtype, `linear_qkv.weight`
/// scaled by 4 (large logits) and group 0's query rows by 5 more (group 0's max logit well
/// above the others', so a threshold between them clips group 0 only).
fn layer(spec: &str, seed: u64) -> SpecLayer {
    let config = SpecLayer::config_from_str(spec, &RuntimeDims::default()).unwrap();
    let elem = ElemType::from(config.dtype);
    let l = SpecLayer::init(config.clone(), seed).unwrap();
    let (per, hn, h) = (config.heads / config.groups, config.head_dim, config.hidden);
    let sd = l
        .state_dict("")
        .into_iter()
        .map(|(k, t)| {
            if k != "linear_qkv.weight" {
                return (k, round(&t, elem));
            }
            let mut t = t;
            for (i, v) in t.data_mut().iter_mut().enumerate() {
                *v *= if i / h < per * hn { 20.0 } else { 4.0 };
            }
            (k, round(&t, elem))
        })
        .collect::<Vec<_>>();
    SpecLayer::load(config, &WeightStore::from_tensors(sd), "").unwrap()
}

fn qkv_host(l: &CpuLayer<SpecLayer>) -> Tensor {
    l.inner()
        .state_dict("")
        .into_iter()
        .find(|(k, _)| k == "linear_qkv.weight")
        .unwrap()
        .1
}

fn group_max(record: &[f32], per: usize) -> Vec<f32> {
    record
        .chunks(per)
        .map(|g| g.iter().copied().fold(f32::NEG_INFINITY, f32::max))
        .collect()
}

fn close_logit(g: f32, w: f32) -> bool {
    (g - w).abs() <= 0.05 * w.abs().max(1.0) || (g == f32::NEG_INFINITY && w == g)
}

/// Two micro-batches (padded, then packed) on both backends; the records; a clip of group 0
/// (threshold between group 0's max and the others'); the weights; one more forward.
fn check(spec: &str, alpha: f32) {
    let seed = fresh_seed();
    println!("{spec} | alpha {alpha} | seed {seed:#x}");
    let mut rng = SplitMix64::new(seed);
    let base = layer(spec, seed ^ 0x5eed);
    let c = base.config().clone();
    let (np, ng, h) = (c.heads, c.groups, c.hidden);
    let per = np / ng;
    let mut cuda = CudaLayer::new(&base, &gpu()).unwrap();
    cuda.set_poison_outputs(true);
    let elem = cuda.elem();
    let mut cpu = CpuLayer::new(base);
    let be = cuda.backend();
    assert_eq!(cuda.max_logit_record().unwrap(), None);
    // Micro-batch 1: padded [s, b, h]; micro-batch 2: packed.
    let s1 = 9 + (rng.next_u64() % 20) as usize;
    let x1 = rand_t(&mut rng, &[s1, 2, h], 1.5, elem);
    let lens = [
        1 + (rng.next_u64() % 30) as i32,
        1 + (rng.next_u64() % 30) as i32,
    ];
    let cu = [0, lens[0], lens[0] + lens[1]];
    let x2 = rand_t(&mut rng, &[cu[2] as usize, h], 1.5, elem);
    let packed = ForwardArgs {
        packed: Some(PackedSeqParams {
            cu_seqlens_q: &cu,
            cu_seqlens_kv: &cu,
            max_seqlen_q: 0,
            max_seqlen_kv: 0,
        }),
        ..ForwardArgs::default()
    };
    let calls = [(&x1, ForwardArgs::default()), (&x2, packed)];
    let mut gpu_seen = vec![f32::NEG_INFINITY; np];
    for (x, args) in &calls {
        let (_, s) = cpu
            .forward_train(x, args, &TrainOptions::default())
            .unwrap();
        drop(s);
        let (_, s) = cuda
            .forward_train(&be.upload(x).unwrap(), args, &TrainOptions::default())
            .unwrap();
        for (m, v) in gpu_seen.iter_mut().zip(SavedForward::max_logit(&s)) {
            *m = m.max(*v);
        }
    }
    let got_rec = cuda.max_logit_record().unwrap().expect("a record");
    let want_rec = cpu.max_logit_record().unwrap().expect("a record");
    assert_eq!(
        bits(&Tensor::new(&[np], got_rec.clone()).unwrap()),
        bits(&Tensor::new(&[np], gpu_seen).unwrap()),
        "the device record is the running max of the device forwards' maxima"
    );
    for (hd, (g, w)) in got_rec.iter().zip(&want_rec).enumerate() {
        assert!(close_logit(*g, *w), "record[{hd}]: gpu {g} vs cpu {w}");
    }
    // A threshold between group 0's max and every other group's.
    let gm = group_max(&want_rec, per);
    let others = gm[1..].iter().copied().fold(f32::NEG_INFINITY, f32::max);
    assert!(
        gm[0] > 1.5 * others.max(1.0),
        "group 0 dominates (its q rows are scaled): {gm:?}"
    );
    let threshold = if ng == 1 {
        gm[0] * 0.5
    } else {
        (gm[0] * others.max(1.0)).sqrt()
    };
    let w_dev0 = cuda.linear_qkv_weight().unwrap().to_host().unwrap();
    let want_r = cpu.clip_qk(threshold, alpha).unwrap();
    let got_r: QkClipReport = cuda.clip_qk(threshold, alpha).unwrap();
    println!("  threshold {threshold}: cpu {want_r:?}\n  gpu {got_r:?}");
    assert_eq!(got_r.clipped, vec![0]);
    assert_eq!(got_r.clipped, want_r.clipped);
    for (g, w) in got_r.group_max.iter().zip(&want_r.group_max) {
        assert!(close_logit(*g, *w), "group max: gpu {g} vs cpu {w}");
    }
    assert_eq!(
        cuda.max_logit_record().unwrap(),
        None,
        "reset on the device"
    );
    assert_eq!(cpu.max_logit_record().unwrap(), None);
    // The device weight: bitwise the formula over the device record (f32 factor, f32
    // product, one rounding to the dtype); every other row bitwise unchanged.
    let w_dev = cuda.linear_qkv_weight().unwrap().to_host().unwrap();
    let hn = c.head_dim;
    let gw = if c.output_gate { per * hn } else { 0 };
    let gcols = per * hn + gw + 2 * hn;
    let eta = threshold as f64 / got_r.group_max[0] as f64;
    let (fq, fk) = (
        eta.powf(alpha as f64) as f32,
        eta.powf(1.0 - alpha as f64) as f32,
    );
    for row in 0..c.qkv_out_features() {
        let (g, r) = (row / gcols, row % gcols);
        let f = match (g, r) {
            (0, r) if r < per * hn => Some(fq),
            (0, r) if (per * hn + gw..per * hn + gw + hn).contains(&r) => Some(fk),
            _ => None,
        };
        for j in 0..h {
            let (a, b) = (w_dev0.data()[row * h + j], w_dev.data()[row * h + j]);
            let want = f.map_or(a, |f| round_f(a * f, elem));
            assert_eq!(
                b.to_bits(),
                want.to_bits(),
                "row {row} col {j}: {b} vs {want} (factor {f:?})"
            );
        }
    }
    let e = rel_err(&w_dev, &round(&qkv_host(&cpu), elem));
    println!("  clipped weight vs cpu: rel err {e:.2e}");
    assert!(e <= 1e-2, "clipped linear_qkv.weight: rel err {e:.3e}");
    // The next forward reads the clipped weight: the records agree again and group 0's max
    // logit is at most the threshold (no q/k bias or norm in these specs: its logits scale
    // by eta; x1 alone saw at most the max over both micro-batches).
    cpu.forward_train(&x1, &ForwardArgs::default(), &TrainOptions::default())
        .unwrap();
    cuda.forward_train(
        &be.upload(&x1).unwrap(),
        &ForwardArgs::default(),
        &TrainOptions::default(),
    )
    .unwrap();
    let rec = cuda.max_logit_record().unwrap().unwrap();
    for (hd, (g, w)) in rec
        .iter()
        .zip(&cpu.max_logit_record().unwrap().unwrap())
        .enumerate()
    {
        assert!(
            close_logit(*g, *w),
            "record after the clip [{hd}]: gpu {g} vs cpu {w}"
        );
    }
    let g0 = group_max(&rec, per)[0];
    assert!(
        g0 <= threshold * 1.05,
        "group 0's max logit after the clip {g0} > threshold {threshold}"
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gqa_gate_bf16_record_and_clip_match_the_cpu() {
    check(
        "self, heads=8, gqa=2, head_dim=64, hidden=256, bias=false, output_gate, rope, \
         mask=causal",
        0.5,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn mha_f16_window_sinks_record_and_clip_match_the_cpu() {
    check(
        "self, heads=4, head_dim=64, hidden=256, bias=false, dtype=f16, window=(32, 0), \
         sinks=learnable, mask=causal",
        0.25,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn mqa_hd128_record_and_clip_match_the_cpu() {
    check(
        "self, heads=4, gqa=1, head_dim=128, hidden=256, bias=false, mask=no_mask",
        1.0,
    );
}

/// Only the training forward records: not the inference forward, not the backward's
/// recompute of core attention; errors and a clip without a record change nothing.
#[test]
#[ignore = "requires a CUDA GPU"]
fn what_records_and_what_errors_leave_unchanged() {
    let spec = "self, heads=4, gqa=2, head_dim=64, hidden=128, qk_layernorm=rms, rope, \
                mask=causal";
    let seed = fresh_seed();
    println!("seed {seed:#x}");
    let mut rng = SplitMix64::new(seed);
    let base = layer(spec, seed);
    let mut cuda = CudaLayer::new(&base, &gpu()).unwrap();
    let be = cuda.backend();
    let w0 = cuda.linear_qkv_weight().unwrap().to_host().unwrap();
    // A clip with nothing recorded: nothing clipped, no weight touched.
    let r = cuda.clip_qk(1e-3, 0.5).unwrap();
    assert!(r.clipped.is_empty() && r.group_max.iter().all(|m| *m == f32::NEG_INFINITY));
    assert_eq!(
        bits(&cuda.linear_qkv_weight().unwrap().to_host().unwrap()),
        bits(&w0)
    );
    let x = be
        .upload(&rand_t(&mut rng, &[11, 2, 128], 1.5, ElemType::Bf16))
        .unwrap();
    // Inference forward: no record.
    BackendLayer::forward(&cuda, &x, &ForwardArgs::default()).unwrap();
    assert_eq!(cuda.max_logit_record().unwrap(), None);
    let (_, mut s) = cuda
        .forward_train(
            &x,
            &ForwardArgs::default(),
            &TrainOptions {
                recompute: Recompute::CoreAttention,
            },
        )
        .unwrap();
    let rec = cuda.max_logit_record().unwrap().unwrap();
    assert_eq!(
        rec,
        SavedForward::max_logit(&s),
        "the first forward's maxima"
    );
    let dy = be.upload(&Tensor::zeros(&[11, 2, 128])).unwrap();
    cuda.backward(&mut s, &dy, &BackwardOptions::default())
        .unwrap();
    BackendLayer::forward(&cuda, &x, &ForwardArgs::default()).unwrap();
    assert_eq!(
        cuda.max_logit_record().unwrap().unwrap(),
        rec,
        "neither the recompute nor the inference forward records"
    );
    // Bad arguments: typed errors, record and weight unchanged.
    for (t, a, arg) in [
        (0.0, 0.5, "threshold"),
        (f32::NAN, 0.5, "threshold"),
        (1.0, 1.5, "alpha"),
    ] {
        let e = cuda.clip_qk(t, a).unwrap_err();
        assert!(
            matches!(&e, AttnError::InvalidArgument { arg: got, .. } if got == arg),
            "{e}"
        );
    }
    assert_eq!(cuda.max_logit_record().unwrap().unwrap(), rec);
    assert_eq!(
        bits(&cuda.linear_qkv_weight().unwrap().to_host().unwrap()),
        bits(&w0)
    );
    // Cross-attention: no linear_qkv to clip.
    let cc = SpecLayer::config_from_str(
        "cross, heads=4, head_dim=32, hidden=128, mask=no_mask",
        &RuntimeDims::default(),
    )
    .unwrap();
    let mut cl = CudaLayer::new(&SpecLayer::init(cc, 1).unwrap(), &gpu()).unwrap();
    assert!(cl.linear_qkv_weight().is_none());
    let ctx = rand_t(&mut rng, &[5, 2, 128], 1.0, ElemType::Bf16);
    let args = ForwardArgs {
        key_value_states: Some(&ctx),
        ..ForwardArgs::default()
    };
    cl.forward_train(&x, &args, &TrainOptions::default())
        .unwrap();
    let e = cl.clip_qk(1.0, 0.5).unwrap_err();
    assert!(
        matches!(&e, AttnError::InvalidArgument { arg, .. } if arg == "config.kind"),
        "{e}"
    );
    assert!(cl.max_logit_record().unwrap().is_some(), "kept");
}
