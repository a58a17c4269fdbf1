//! KV-cache steps under context parallelism over NCCL on two GPUs of one host:
//! [`CpCudaLayer`] (CP = 2, rank `r` on GPU `r`) prefills a prompt (each rank its chunks `r`
//! and `3 - r`, stored in its own device cache) and then runs 8 decode steps (the same new
//! token on both ranks, stored on one), against one GPU's [`CudaLayer`] prefill + decode over
//! the whole prompt and the CPU reference: causal (GQA, RMS q/k norm, rope) with `p2p` and
//! `all_gather` for the prefill; a sliding window with learnable sinks and the output gate
//! (the window leaves one rank no visible key for some steps); off-by-one sinks in f16 at head
//! dim 128. Every layer poisons its buffers with NaN (an unwritten element is a NaN in the
//! output, and a NaN fails the comparison); both ranks' decode outputs must be the same bits.
//! Then the typed errors: a full cache on one rank, and ranks whose caches disagree. Every
//! test is `#[ignore = "requires a CUDA GPU"]` (2 GPUs and libnccl; always compiled). Run
//! them one at a time (`--test-threads=1`): each makes its own NCCL group on GPUs 0 and 1.
//!
//! Weights and inputs are rounded to the layer's dtype on the host. Tolerances (relative
//! Frobenius error): [`TOL_ONE_GPU`] against one GPU (a partial result is merged in f32, the
//! one-GPU kernel rounds once), [`TOL_CPU`] against the CPU reference.

use std::time::Duration;

use attention_runtime::backend::{Backend, BackendLayer, CpuLayer, StaticCache};
use attention_runtime::cuda::{CudaLayer, CudaRuntime};
use attention_runtime::device::CudaDevice;
use attention_runtime::modules::SplitMix64;
use attention_runtime::parallel::{CpCommType, CpCudaLayer, CpLayout, NcclComm, NcclUniqueId};
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{
    AttentionLayer, AttnError, Device, ForwardArgs, Result, RuntimeDims, Tensor, WeightStore,
};

const TOL_ONE_GPU: f64 = 1e-2;
const TOL_CPU: f64 = 2e-2;
const TIMEOUT: Duration = Duration::from_secs(120);
/// Decode steps after the prompt.
const STEPS: usize = 8;
/// Batch slots `SLOT0 .. SLOT0 + B` of `MAX_BATCH`.
const B: usize = 2;
const SLOT0: usize = 1;
const MAX_BATCH: usize = 3;

fn gpu(ordinal: usize) -> CudaDevice {
    match Device::cuda(ordinal) {
        Ok(Device::Cuda(d)) => d,
        other => panic!("CUDA GPU {ordinal} is required: {other:?}"),
    }
}

fn round(t: &Tensor, f16: bool) -> Tensor {
    let r = |x: f32| {
        if f16 {
            half::f16::from_f32(x).to_f32()
        } else {
            half::bf16::from_f32(x).to_f32()
        }
    };
    Tensor::new(t.shape(), t.data().iter().map(|&x| r(x)).collect()).unwrap()
}

fn layer(spec: &str, seed: u64) -> SpecLayer {
    let f16 = spec.contains("dtype=f16");
    let cfg = SpecLayer::config_from_str(spec, &RuntimeDims::default()).unwrap();
    let l = SpecLayer::init(cfg.clone(), seed).unwrap();
    let sd: Vec<_> = l
        .state_dict("")
        .into_iter()
        .map(|(k, t)| (k, round(&t, f16)))
        .collect();
    SpecLayer::load(cfg, &WeightStore::from_tensors(sd), "").unwrap()
}

fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.shape(), want.shape());
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in got.data().iter().zip(want.data()) {
        assert!(x.is_finite(), "NaN/inf in a GPU result");
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn check(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e} > {tol}");
    eprintln!("{what}: relative error {e:.2e}");
}

/// Run `f(rank, device, comm)` on GPUs 0 and 1, one thread each, over a fresh NCCL group.
fn two_gpus<T: Send>(f: impl Fn(usize, CudaDevice, NcclComm) -> Result<T> + Sync) -> Vec<T> {
    let id = NcclUniqueId::new().expect("libnccl and a unique id");
    let f = &f;
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|r| {
                s.spawn(move || {
                    let dev = gpu(r);
                    let rt = CudaRuntime::get(&dev)?;
                    let comm = NcclComm::new(rt, r, 2, &id, Some(TIMEOUT))?;
                    f(r, dev, comm)
                })
            })
            .collect();
        hs.into_iter()
            .enumerate()
            .map(|(r, h)| {
                h.join()
                    .unwrap()
                    .unwrap_or_else(|e| panic!("rank {r}: {e}"))
            })
            .collect()
    })
}

fn poisoned(full: &SpecLayer, dev: &CudaDevice) -> Result<CudaLayer> {
    let l = CudaLayer::new(full, dev)?;
    l.set_poison_outputs(true);
    Ok(l)
}

/// Prefill `prompt` (`[s_rows, B, h]`; `cp` times that is the whole prompt) into a cache of
/// `cap` tokens per slot, commit, then decode `steps` committing each: the prefill output and
/// every decode output, on the host.
fn run<L: BackendLayer>(
    l: &L,
    cap: usize,
    cp: usize,
    prompt: &Tensor,
    steps: &[Tensor],
) -> Result<(Tensor, Vec<Tensor>)> {
    let be = l.backend();
    let cfg = l.layer_config();
    let mut cache = be.static_cache(1, cap, MAX_BATCH, cfg.groups, cfg.head_dim)?;
    let args = ForwardArgs::default();
    let p = be.download(&l.prefill(&be.upload(prompt)?, &mut cache, 0, SLOT0, &args)?)?;
    cache.advance(SLOT0, B, prompt.shape()[0] * cp)?;
    let mut outs = Vec::new();
    for x in steps {
        outs.push(be.download(&l.decode(&be.upload(x)?, &mut cache, 0, SLOT0, &args)?)?);
        cache.advance(SLOT0, B, 1)?;
    }
    Ok((p, outs))
}

/// CP = 2 prefill of a `s`-token prompt and [`STEPS`] decode steps against one GPU and the
/// CPU reference, prefill exchanging by `types`.
fn cp_decode_case(spec: &str, seed: u64, s: usize, types: &[CpCommType]) {
    let full = layer(spec, seed);
    let f16 = spec.contains("dtype=f16");
    let h = full.config().hidden;
    let mut rng = SplitMix64::new(seed + 1);
    let mut rand = |shape: &[usize]| round(&Tensor::from_fn(shape, |_| rng.uniform()), f16);
    let prompt = rand(&[s, B, h]);
    let steps: Vec<Tensor> = (0..STEPS).map(|_| rand(&[1, B, h])).collect();
    let cap = s + STEPS;
    let (cpu_p, cpu_d) = run(&CpuLayer::new(full.clone()), cap, 1, &prompt, &steps).unwrap();
    let (one_p, one_d) = {
        let l = poisoned(&full, &gpu(0)).unwrap();
        run(&l, cap, 1, &prompt, &steps).unwrap()
    };
    check(
        &format!("{spec}: one GPU prefill vs CPU"),
        &one_p,
        &cpu_p,
        TOL_CPU,
    );
    for &ty in types {
        let got = two_gpus(|r, dev, comm| {
            let l = CpCudaLayer::new(poisoned(&full, &dev)?, comm, ty)?;
            let local = CpLayout::new(r, 2)?.split(&prompt, None)?;
            run(&l, cap.div_ceil(2), 2, &local, &steps)
        });
        let what = format!("{spec} {ty}");
        let parts: Vec<Tensor> = got.iter().map(|(p, _)| p.clone()).collect();
        let y = CpLayout::new(0, 2).unwrap().unsplit(&parts, None).unwrap();
        check(
            &format!("{what}: prefill vs one GPU"),
            &y,
            &one_p,
            TOL_ONE_GPU,
        );
        check(&format!("{what}: prefill vs CPU"), &y, &cpu_p, TOL_CPU);
        for k in 0..STEPS {
            assert_eq!(
                got[0].1[k], got[1].1[k],
                "{what}: decode {k} differs by rank"
            );
            let d = &got[0].1[k];
            check(
                &format!("{what}: decode {k} vs one GPU"),
                d,
                &one_d[k],
                TOL_ONE_GPU,
            );
            check(&format!("{what}: decode {k} vs CPU"), d, &cpu_d[k], TOL_CPU);
        }
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cp2_causal_prefill_and_decode_match_one_gpu() {
    let spec = "self, heads=8, gqa=4, head_dim=64, hidden=512, qk_layernorm=rms, rope, mask=causal";
    cp_decode_case(spec, 11, 64, &CpCommType::ALL);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cp2_sliding_window_sinks_and_gate_prefill_and_decode_match_one_gpu() {
    // Prompt 64, chunks of 16: at position 64 a window of 10 sees keys 54.. (rank 0's chunk
    // 48..64 only: rank 1 has no visible key until it stores a decode token).
    let spec = "self, heads=8, gqa=4, head_dim=64, hidden=512, qk_layernorm=rms, rope, \
                window=(10, 0), sinks=learnable, output_gate, mask=causal";
    cp_decode_case(spec, 13, 64, &[CpCommType::P2p]);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cp2_off_by_one_sinks_f16_hd128_prefill_and_decode_match_one_gpu() {
    let spec = "self, heads=4, gqa=2, head_dim=128, hidden=512, dtype=f16, \
                window=(40, 0), sinks=off_by_one, mask=causal";
    cp_decode_case(spec, 17, 96, &[CpCommType::AllGather]);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cp2_cache_errors_are_typed_on_both_ranks() {
    let spec = "self, heads=8, gqa=4, head_dim=64, hidden=512, rope, mask=causal";
    let full = layer(spec, 19);
    let h = full.config().hidden;
    let prompt = Tensor::from_fn(&[8, B, h], |i| ((i % 7) as f32) * 0.1);
    let step = Tensor::from_fn(&[1, B, h], |i| ((i % 5) as f32) * 0.1);
    let got = two_gpus(|r, dev, comm| {
        let l = CpCudaLayer::new(poisoned(&full, &dev)?, comm, CpCommType::P2p)?;
        let be = l.backend();
        let args = ForwardArgs::default();
        // 4 prompt tokens per rank and capacity 5: decode steps 1 and 2 fill both ranks.
        let mut cache = be.static_cache(1, 5, MAX_BATCH, 4, 64)?;
        let local = CpLayout::new(r, 2)?.split(&prompt, None)?;
        l.prefill(&be.upload(&local)?, &mut cache, 0, SLOT0, &args)?;
        cache.advance(SLOT0, B, 8)?;
        let x = be.upload(&step)?;
        for _ in 0..2 {
            l.decode(&x, &mut cache, 0, SLOT0, &args)?;
            cache.advance(SLOT0, B, 1)?;
        }
        let full_err = l.decode(&x, &mut cache, 0, SLOT0, &args).unwrap_err();
        let lens = (cache.seqlens().to_vec(), cache.inner().seqlens().to_vec());
        // A step committed on rank 0 only: the next step disagrees.
        let mut c2 = be.static_cache(1, 16, MAX_BATCH, 4, 64)?;
        l.prefill(&be.upload(&local)?, &mut c2, 0, SLOT0, &args)?;
        c2.advance(SLOT0, B, 8)?;
        l.decode(&x, &mut c2, 0, SLOT0, &args)?;
        if r == 0 {
            c2.advance(SLOT0, B, 1)?;
        } else {
            c2.rollback();
        }
        let before = (c2.seqlens().to_vec(), c2.inner().seqlens().to_vec());
        let mismatch = l.decode(&x, &mut c2, 0, SLOT0, &args).unwrap_err();
        let after = (c2.seqlens().to_vec(), c2.inner().seqlens().to_vec());
        assert_eq!(before, after, "rank {r}: a refused step changed the cache");
        Ok((full_err, lens, mismatch))
    });
    for (r, (full_err, lens, mismatch)) in got.into_iter().enumerate() {
        assert!(
            matches!(
                full_err,
                AttnError::CacheCapacity {
                    capacity: 5,
                    needed: 6,
                    ..
                }
            ),
            "rank {r}: {full_err}"
        );
        assert_eq!(lens.0[SLOT0], 10, "rank {r}");
        assert_eq!(lens.1[SLOT0], 5, "rank {r}");
        assert!(
            matches!(&mismatch, AttnError::InvalidArgument { arg, .. } if arg == "cache"),
            "rank {r}: {mismatch}"
        );
    }
}
