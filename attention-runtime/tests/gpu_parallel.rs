//! Tensor parallelism over NCCL on two GPUs of one host: [`NcclComm`]'s collectives on device
//! tensors, [`TpLayer`] over each GPU's [`CudaLayer`] (its shard of the layer) against one GPU
//! and the CPU reference (forward padded / packed / sequence parallel, static- and
//! paged-cache prefill and decode, the training backward), `run_realtime_tests` over NCCL,
//! and a missing peer. Every test is `#[ignore = "requires a CUDA GPU"]` (2 GPUs and libnccl;
//! always compiled); run them with `scripts/gpu-bundle.sh` and `gpu-bundle/run.sh` on the
//! GPU machine (CONTRIBUTING.md), with `libnccl.so` on `LD_LIBRARY_PATH` (cudarc does not
//! look for `libnccl.so.2`: a pip or PyTorch install needs a `libnccl.so` link beside it).
//! One thread drives each GPU (cudarc's NCCL communicator stays on the thread that made it).
//!
//! Weights and inputs are rounded to bf16 on the host so every side sees the same values.
//! Tolerances (relative Frobenius error): [`TOL_OUT`] 2e-2 for outputs (the single-GPU tests'
//! 1e-2 plus each rank's bf16 partial and the bf16 all-reduce), [`TOL_GRAD`] 4e-2 for
//! gradients (their 3e-2 plus the same).

use std::time::Duration;

use attention_runtime::backend::{Backend, BackendLayer, CpuLayer, TrainLayer};
use attention_runtime::cuda::{CudaLayer, CudaRuntime, DeviceTensor, ElemType};
use attention_runtime::device::CudaDevice;
use attention_runtime::kv_cache::{BlockTable, PagedBatch};
use attention_runtime::modules::SplitMix64;
use attention_runtime::parallel::realtime::run_realtime_tests;
use attention_runtime::parallel::tp_load::shard_layer;
use attention_runtime::parallel::{Communicator, NcclComm, NcclUniqueId, TpLayer, TpPlan};
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::train::{BackwardOptions, TrainOptions};
use attention_runtime::{
    AttentionLayer, AttnError, ForwardArgs, PackedSeqParams, Result, RuntimeDims, Tensor,
    WeightStore,
};

mod common;
use common::{gpu_at, rand_t, rel_err, round};

const TOL_OUT: f64 = 2e-2;
const TOL_GRAD: f64 = 4e-2;
const TIMEOUT: Duration = Duration::from_secs(120);
/// A Llama-like layer, scaled down: GQA, RMS q/k norm, rope, causal.
const SPEC: &str =
    "self, heads=8, gqa=4, head_dim=64, hidden=512, qk_layernorm=rms, rope, mask=causal";

/// `SPEC`'s layer with seeded weights rounded to bf16.
fn layer(spec: &str, seed: u64) -> SpecLayer {
    let cfg = SpecLayer::config_from_str(spec, &RuntimeDims::default()).unwrap();
    let l = SpecLayer::init(cfg.clone(), seed).unwrap();
    let sd: Vec<_> = l
        .state_dict("")
        .into_iter()
        .map(|(k, t)| (k, round(&t, ElemType::Bf16)))
        .collect();
    SpecLayer::load(cfg, &WeightStore::from_tensors(sd), "").unwrap()
}

fn check(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e} > {tol}");
}

/// Run `f(rank, device, comm)` on GPUs 0 and 1, one thread each, over a fresh NCCL group.
fn two_gpus<T: Send>(f: impl Fn(usize, CudaDevice, NcclComm) -> Result<T> + Sync) -> Vec<T> {
    let id = NcclUniqueId::new().expect("libnccl and a unique id");
    let f = &f;
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|r| {
                s.spawn(move || {
                    let dev = gpu_at(r);
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

fn tp_rank(
    full: &SpecLayer,
    dev: &CudaDevice,
    comm: NcclComm,
    sp: bool,
) -> Result<TpLayer<CudaLayer, NcclComm>> {
    let shard = shard_layer(full, comm.rank(), comm.world_size())?;
    TpLayer::new(CudaLayer::new(&shard, dev)?, comm, full.config(), sp)
}

fn seq_slice(t: &Tensor, r: usize, tp: usize) -> Tensor {
    let n = t.shape()[0] / tp;
    let w = t.numel() / t.shape()[0];
    let mut shape = t.shape().to_vec();
    shape[0] = n;
    Tensor::new(&shape, t.data()[r * n * w..(r + 1) * n * w].to_vec()).unwrap()
}

/// Forward of host `x` on any backend layer, back on the host.
fn fwd<L: BackendLayer>(l: &L, x: &Tensor, args: &ForwardArgs<'_>) -> Result<Tensor> {
    let be = l.backend();
    be.download(&l.forward(&be.upload(x)?, args)?)
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn nccl_collectives_on_device_tensors() {
    let out = two_gpus(|r, dev, c| {
        let st = CudaRuntime::get(&dev)?.stream().clone();
        let up =
            |v: Vec<f32>, e| DeviceTensor::from_host(&st, &Tensor::new(&[v.len()], v).unwrap(), e);
        let rf = r as f32;
        let mut res = Vec::new();
        for e in [ElemType::F32, ElemType::Bf16] {
            let mut x = up(vec![rf + 1.0, 2.0 * rf], e)?;
            c.all_reduce_sum(&mut x)?;
            let mut g = up(vec![0.0; 4], e)?;
            c.all_gather(&up(vec![rf, rf + 0.5], e)?, &mut g)?;
            let mut rs = up(vec![0.0], e)?;
            c.reduce_scatter_sum(&up(vec![rf, 10.0 + rf], e)?, &mut rs)?;
            let mut a = up(vec![0.0; 2], e)?;
            c.all_to_all(&up(vec![10.0 * rf, 10.0 * rf + 1.0], e)?, &mut a)?;
            let mut ring = up(vec![0.0; 3], e)?;
            c.send_recv(&up(vec![rf; 3], e)?, 1 - r, &mut ring, 1 - r)?;
            res.push([x, g, rs, a, ring].map(|t| t.to_host().unwrap().data().to_vec()));
        }
        let bytes = c.all_gather_bytes(&vec![r as u8 + 7; r + 2])?;
        let b = c.broadcast_bytes(format!("root {r}").as_bytes(), 1)?;
        Ok((res, bytes, b))
    });
    for (r, (res, bytes, b)) in out.into_iter().enumerate() {
        for got in res {
            assert_eq!(got[0], vec![3.0, 2.0]);
            assert_eq!(got[1], vec![0.0, 0.5, 1.0, 1.5]);
            assert_eq!(got[2], vec![if r == 0 { 1.0 } else { 21.0 }]);
            assert_eq!(got[3], vec![r as f32, 10.0 + r as f32]);
            assert_eq!(got[4], vec![(1 - r) as f32; 3]);
        }
        assert_eq!(bytes, vec![vec![7u8; 2], vec![8u8; 3]]);
        assert_eq!(b, b"root 1");
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn nccl_id_through_a_file_as_one_process_per_gpu_would() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nccl_id");
    let out: Vec<Vec<f32>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2usize)
            .map(|r| {
                let path = path.clone();
                s.spawn(move || -> Result<Vec<f32>> {
                    let id = if r == 0 {
                        let id = NcclUniqueId::new()?;
                        id.write_file(&path)?;
                        id
                    } else {
                        NcclUniqueId::read_file(&path, TIMEOUT)?
                    };
                    let dev = gpu_at(r);
                    let rt = CudaRuntime::get(&dev)?;
                    let c = NcclComm::new(rt.clone(), r, 2, &id, Some(TIMEOUT))?;
                    let mut x = DeviceTensor::from_host(
                        rt.stream(),
                        &Tensor::new(&[1], vec![r as f32 + 1.0])?,
                        ElemType::F32,
                    )?;
                    c.all_reduce_sum(&mut x)?;
                    Ok(x.to_host()?.data().to_vec())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    });
    assert_eq!(out, vec![vec![3.0], vec![3.0]]);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn tp2_forward_matches_one_gpu_and_the_cpu_reference() {
    let full = layer(SPEC, 21);
    let mut rng = SplitMix64::new(22);
    let x = rand_t(&mut rng, &[64, 2, 512], 1.0, ElemType::Bf16);
    let xp = rand_t(&mut rng, &[96, 512], 1.0, ElemType::Bf16);
    let cu = [0, 30, 96];
    let packed = ForwardArgs {
        packed: Some(PackedSeqParams {
            cu_seqlens_q: &cu,
            cu_seqlens_kv: &[],
            max_seqlen_q: 0,
            max_seqlen_kv: 0,
        }),
        ..Default::default()
    };
    let want = full.forward(&x, &ForwardArgs::default()).unwrap().output;
    let want_p = full.forward(&xp, &packed).unwrap().output;
    let one = CudaLayer::new(&full, &gpu_at(0)).unwrap();
    let one_y = fwd(&one, &x, &ForwardArgs::default()).unwrap();
    check("one GPU vs CPU", &one_y, &want, 1e-2);
    for sp in [false, true] {
        let out = two_gpus(|r, dev, c| {
            let l = tp_rank(&full, &dev, c, sp)?;
            let (xr, xpr) = if sp {
                (seq_slice(&x, r, 2), seq_slice(&xp, r, 2))
            } else {
                (x.clone(), xp.clone())
            };
            Ok((
                fwd(&l, &xr, &ForwardArgs::default())?,
                fwd(&l, &xpr, &packed)?,
            ))
        });
        for (r, (y, yp)) in out.iter().enumerate() {
            let cut = |t: &Tensor| if sp { seq_slice(t, r, 2) } else { t.clone() };
            check(
                &format!("tp2 sp={sp} rank {r} vs CPU"),
                y,
                &cut(&want),
                TOL_OUT,
            );
            check(
                &format!("tp2 sp={sp} rank {r} vs one GPU"),
                y,
                &cut(&one_y),
                TOL_OUT,
            );
            check(
                &format!("tp2 sp={sp} rank {r} packed vs CPU"),
                yp,
                &cut(&want_p),
                TOL_OUT,
            );
        }
    }
}

/// Prefill 40 tokens and decode 2 over a static cache; a prefill + decode step over a paged
/// cache. Host outputs, in order.
fn cache_steps<L: BackendLayer>(l: &L, xs: &[Tensor]) -> Result<Vec<Tensor>> {
    let (ng, hn) = (l.layer_config().groups, l.layer_config().head_dim);
    let be = l.backend();
    let mut sc = be.static_cache(1, 64, 2, ng, hn)?;
    let mut out = vec![be.download(&l.prefill(
        &be.upload(&xs[0])?,
        &mut sc,
        0,
        0,
        &ForwardArgs::default(),
    )?)?];
    attention_runtime::backend::StaticCache::advance(&mut sc, 0, 2, 40)?;
    for x in &xs[1..3] {
        out.push(be.download(&l.decode(
            &be.upload(x)?,
            &mut sc,
            0,
            0,
            &ForwardArgs::default(),
        )?)?);
        attention_runtime::backend::StaticCache::advance(&mut sc, 0, 2, 1)?;
    }
    let mut pc = be.paged_cache(1, 8, 64, ng, hn)?;
    let mut table = BlockTable::new(2, 2)?;
    for r in 0..2 {
        let ids = attention_runtime::backend::PagedCache::allocator_mut(&mut pc).alloc(1)?;
        table.set_row(r, &ids)?;
    }
    let steps: [(&[i32], &[i32]); 2] = [(&[0, 37, 50], &[37, 13]), (&[0, 1, 2], &[38, 14])];
    for (x, (cu, seqlens)) in xs[3..].iter().zip(steps) {
        let batch = PagedBatch {
            cu_seqlens_q: cu,
            seqlens_k: seqlens,
            block_table: &table,
        };
        out.push(be.download(&l.forward_paged(&be.upload(x)?, &mut pc, 0, &batch)?)?);
    }
    Ok(out)
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn tp2_static_and_paged_cache_steps_match_the_cpu_reference() {
    let full = layer(SPEC, 31);
    let mut rng = SplitMix64::new(32);
    let xs: Vec<Tensor> = [
        vec![40, 2, 512],
        vec![1, 2, 512],
        vec![1, 2, 512],
        vec![50, 512],
        vec![2, 512],
    ]
    .iter()
    .map(|s| rand_t(&mut rng, s, 1.0, ElemType::Bf16))
    .collect();
    let want = cache_steps(&CpuLayer::new(full.clone()), &xs).unwrap();
    let out = two_gpus(|_, dev, c| cache_steps(&tp_rank(&full, &dev, c, false)?, &xs));
    for (r, ys) in out.iter().enumerate() {
        for (s, (y, w)) in ys.iter().zip(&want).enumerate() {
            check(&format!("rank {r} step {s}"), y, w, TOL_OUT);
        }
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn tp2_backward_matches_the_cpu_reference_shards() {
    // Whole groups per rank, and MQA's one group replicated on both ranks.
    let mqa = "self, heads=8, gqa=1, head_dim=64, hidden=512, qk_layernorm=rms, rope, mask=causal";
    for spec in [SPEC, mqa] {
        backward_case(spec);
    }
}

fn backward_case(spec: &str) {
    let full = layer(spec, 41);
    let cfg = full.config().clone();
    let mut rng = SplitMix64::new(42);
    let x = rand_t(&mut rng, &[32, 2, 512], 1.0, ElemType::Bf16);
    let dy = rand_t(&mut rng, &[32, 2, 512], 1.0, ElemType::Bf16);
    let cpu = CpuLayer::new(full.clone());
    let (_, mut saved) = cpu
        .forward_train(&x, &ForwardArgs::default(), &TrainOptions::default())
        .unwrap();
    let want = cpu
        .backward(&mut saved, &dy, &BackwardOptions::default())
        .unwrap();
    let out = two_gpus(|_, dev, c| {
        let l = tp_rank(&full, &dev, c, false)?;
        let be = l.backend();
        let (_, mut s) = l.forward_train(
            &be.upload(&x)?,
            &ForwardArgs::default(),
            &TrainOptions::default(),
        )?;
        let g = l.backward(&mut s, &be.upload(&dy)?, &BackwardOptions::default())?;
        let params: Vec<(String, Tensor)> = g
            .params
            .iter()
            .map(|(k, t)| Ok((k.clone(), be.download(t)?)))
            .collect::<Result<_>>()?;
        Ok((be.download(&g.grad_input)?, params))
    });
    for (r, (gi, params)) in out.iter().enumerate() {
        check(
            &format!("rank {r} grad_input"),
            gi,
            &want.grad_input,
            TOL_GRAD,
        );
        let plan = TpPlan::new(&cfg, r, 2).unwrap();
        assert_eq!(params.len(), want.params.len());
        for (name, g) in params {
            let w = plan.shard(&cfg, name, name, &want.params[name]).unwrap();
            check(&format!("{spec} rank {r} {name}"), g, &w, TOL_GRAD);
        }
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn realtime_tests_over_nccl_find_a_flipped_bit() {
    let full = layer(SPEC, 51);
    let out = two_gpus(|r, _, c| {
        let l = shard_layer(&full, r, 2)?;
        run_realtime_tests(&c, &l)?;
        let mut sd = l.state_dict("");
        if r == 1 {
            let t = &mut sd
                .iter_mut()
                .find(|(k, _)| k == "k_layernorm.weight")
                .unwrap()
                .1;
            t.data_mut()[5] = f32::from_bits(t.data()[5].to_bits() ^ 1);
        }
        let flipped = SpecLayer::load(l.config().clone(), &WeightStore::from_tensors(sd), "")?;
        Ok(run_realtime_tests(&c, &flipped).unwrap_err())
    });
    for e in out {
        assert!(
            matches!(&e, AttnError::RankMismatch { param, rank: 1, .. } if param == "k_layernorm.weight"),
            "{e}"
        );
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
/// Named to run last (the gpu-bundle runs tests one at a time, by name): rank 0's aborted
/// communicator must not disturb another test.
fn wait_for_a_missing_peer_times_out_over_nccl() {
    let id = NcclUniqueId::new().unwrap();
    let res: Vec<Result<()>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2usize)
            .map(|r| {
                s.spawn(move || -> Result<()> {
                    let dev = gpu_at(r);
                    let rt = CudaRuntime::get(&dev)?;
                    let c = NcclComm::new(rt.clone(), r, 2, &id, Some(Duration::from_secs(2)))?;
                    // One collective together first: NCCL may connect peers lazily, inside
                    // the first collective's host call, which no timeout bounds.
                    let mut x = DeviceTensor::from_host(
                        rt.stream(),
                        &Tensor::zeros(&[1024]),
                        ElemType::F32,
                    )?;
                    c.all_reduce_sum(&mut x)?;
                    if r == 1 {
                        // Joins the group, then never takes part; keeps its communicator
                        // until rank 0 has given up.
                        std::thread::sleep(Duration::from_secs(6));
                        return Ok(());
                    }
                    c.all_reduce_sum(&mut x)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    match &res[0] {
        Err(AttnError::Collective {
            op,
            rank: 0,
            expected,
            ..
        }) => {
            assert_eq!(op, "all_reduce");
            assert!(expected.contains("within"), "{expected}");
        }
        other => panic!("rank 0: {other:?}"),
    }
    assert!(res[1].is_ok());
}

#[test]
#[ignore = "requires a CUDA GPU"]
/// A rank whose peer never calls `ncclCommInitRank` gets a typed error after the init bound
/// (the timeout, at least `INIT_MIN_TIMEOUT`) instead of waiting forever.
fn zz_init_without_the_peer_times_out() {
    let id = NcclUniqueId::new().unwrap();
    let rt = CudaRuntime::get(&gpu_at(0)).unwrap();
    let t0 = std::time::Instant::now();
    let e = NcclComm::new(rt, 0, 2, &id, Some(Duration::from_secs(1))).unwrap_err();
    let took = t0.elapsed();
    match &e {
        AttnError::Collective {
            op,
            rank: 0,
            expected,
            ..
        } => {
            assert_eq!(op, "ncclCommInitRank");
            assert!(expected.contains("within"), "{expected}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        took >= attention_runtime::parallel::nccl::INIT_MIN_TIMEOUT
            && took < attention_runtime::parallel::nccl::INIT_MIN_TIMEOUT + Duration::from_secs(10),
        "{took:?}"
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn tp2_qk_clip_of_a_replicated_group_matches_the_cpu_reference() {
    // MQA: the one group is replicated on both ranks. Rank 1's query heads (4..8) are scaled
    // by 2, so its max logit is about twice rank 0's, and the threshold lies between them:
    // rank 0 must clip its copy of the group by rank 1's max.
    let spec = "self, heads=8, gqa=1, head_dim=64, hidden=512, rope, mask=causal";
    let base = layer(spec, 61);
    let cfg = base.config().clone();
    let sd: Vec<_> = base
        .state_dict("")
        .into_iter()
        .map(|(k, mut t)| {
            if k == "linear_qkv.weight" {
                let h = cfg.hidden;
                t.data_mut()[4 * 64 * h..8 * 64 * h]
                    .iter_mut()
                    .for_each(|v| *v *= 2.0);
            }
            (k, t)
        })
        .collect();
    let full = SpecLayer::load(cfg.clone(), &WeightStore::from_tensors(sd), "").unwrap();
    let mut rng = SplitMix64::new(62);
    let x = rand_t(&mut rng, &[32, 2, 512], 1.0, ElemType::Bf16);
    let mut cpu = CpuLayer::new(full.clone());
    cpu.forward_train(&x, &ForwardArgs::default(), &TrainOptions::default())
        .unwrap();
    let rec = cpu.max_logit_record().unwrap().unwrap();
    let m0 = rec[..4].iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let m1 = rec[4..].iter().copied().fold(f32::NEG_INFINITY, f32::max);
    assert!(m0 > 0.0 && m1 > 1.5 * m0, "record {rec:?}");
    let threshold = 0.5 * (m0 + m1);
    let want = cpu.clip_qk(threshold, 0.5).unwrap();
    assert_eq!(want.clipped, [0]);
    let want_w = cpu
        .inner()
        .state_dict("")
        .into_iter()
        .find(|(k, _)| k == "linear_qkv.weight")
        .unwrap()
        .1;
    let out = two_gpus(|_, dev, c| {
        let mut l = tp_rank(&full, &dev, c, false)?;
        let be = l.backend();
        l.forward_train(
            &be.upload(&x)?,
            &ForwardArgs::default(),
            &TrainOptions::default(),
        )?;
        let report = l.clip_qk(threshold, 0.5)?;
        let w = be.download(l.inner().linear_qkv_weight().unwrap())?;
        Ok((report, w, l.max_logit_record()?))
    });
    for (r, (report, w, rec)) in out.iter().enumerate() {
        assert_eq!(report.clipped, [0], "rank {r}");
        let e = (report.group_max[0] - want.group_max[0]).abs() / want.group_max[0];
        assert!(e < 2e-2, "rank {r}: group max {report:?} vs {want:?}");
        let plan = TpPlan::new(&cfg, r, 2).unwrap();
        let ws = plan
            .shard(&cfg, "linear_qkv.weight", "linear_qkv.weight", &want_w)
            .unwrap();
        check(&format!("rank {r} clipped linear_qkv.weight"), w, &ws, 1e-2);
        assert_eq!(rec, &None, "rank {r}: the record is reset");
    }
}
