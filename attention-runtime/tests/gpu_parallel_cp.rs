//! Context parallelism over NCCL on two GPUs of one host: [`CpCudaLayer`] (CP = 2, each rank
//! its chunks `r` and `3 - r` of every sequence on GPU `r`) with `p2p`, `all_gather` and
//! `a2a`, put back in order, against one GPU's [`CudaLayer`] over the whole input and the CPU
//! reference: causal (GQA, RMS q/k norm, rope), no mask, a causal sliding window with
//! learnable sinks and the output gate, a two-sided window with off-by-one sinks in f16 at head
//! dim 128, rope at given positions with a mask-type override; padded (b = 1 and 2) and packed
//! (three sequences) input. `p2p` runs twice, its ring overlapped with compute (exchanges on
//! the communicator's stream, `parallel/cp_ring.rs`) and serial: the two outputs must be
//! bitwise equal. Every layer poisons its buffers with NaN, the f32 LSE and accumulator
//! buffers of the merge included (an unwritten element is a NaN in the output, and a NaN
//! fails the comparison). Then one test per error class, a rank that fails alone (its peer
//! gets an error naming it), a layer on another stream than its communicator's, and a missing
//! peer (a timeout that aborts the communicator; later calls fail at once). Every test is
//! `#[ignore = "requires a CUDA GPU"]` (2 GPUs and libnccl; always compiled). The tests take
//! one lock around their NCCL groups, so plain `cargo test` runs them one group at a time.
//!
//! Weights and inputs are rounded to the layer's dtype on the host so every side sees the
//! same values; inputs come from a fresh seed per run (printed; `ATTN_TEST_SEED` replays). Tolerances (relative Frobenius error): [`TOL_ONE_GPU`] 1e-2 against one GPU
//! (each partial result is rounded to bf16 once more before the f32 merge), [`TOL_CPU`] 2e-2
//! against the CPU reference (one GPU's 1e-2 plus the same).

mod common;

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use attention_runtime::backend::{Backend, BackendLayer};
use attention_runtime::cuda::{CudaLayer, CudaRuntime, DeviceTensor, ElemType};
use attention_runtime::device::CudaDevice;
use attention_runtime::kv_cache::{BlockTable, PagedBatch};
use attention_runtime::modules::SplitMix64;
use attention_runtime::parallel::{CpCommType, CpCudaLayer, CpLayout, NcclComm, NcclUniqueId};
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{
    AttentionLayer, AttnError, ForwardArgs, PackedSeqParams, Result, RuntimeDims, Tensor,
    WeightStore,
};
use common::{bitwise, fresh_seed, gpu_at as gpu, rel_err, round};

const TOL_ONE_GPU: f64 = 1e-2;
const TOL_CPU: f64 = 2e-2;
const TIMEOUT: Duration = Duration::from_secs(120);
/// A Llama-like layer, scaled down: GQA, RMS q/k norm, rope, causal.
const SPEC: &str =
    "self, heads=8, gqa=4, head_dim=64, hidden=512, qk_layernorm=rms, rope, mask=causal";

/// One NCCL group at a time on GPUs 0 and 1, whatever the test harness's thread count.
static GROUP: Mutex<()> = Mutex::new(());

fn one_group() -> MutexGuard<'static, ()> {
    GROUP.lock().unwrap_or_else(|p| p.into_inner())
}

fn elem(spec: &str) -> ElemType {
    if is_f16(spec) {
        ElemType::F16
    } else {
        ElemType::Bf16
    }
}

fn is_f16(spec: &str) -> bool {
    spec.contains("dtype=f16")
}

/// A fresh seed plus `offset`, printed.
fn seed(offset: u64) -> u64 {
    let s = fresh_seed().wrapping_add(offset);
    eprintln!("seed {s:#x} (ATTN_TEST_SEED replays it)");
    s
}

/// `spec`'s layer with seeded weights rounded to its dtype.
fn layer(spec: &str, seed: u64) -> SpecLayer {
    let cfg = SpecLayer::config_from_str(spec, &RuntimeDims::default()).unwrap();
    let l = SpecLayer::init(cfg.clone(), seed).unwrap();
    let sd: Vec<_> = l
        .state_dict("")
        .into_iter()
        .map(|(k, t)| (k, round(&t, elem(spec))))
        .collect();
    SpecLayer::load(cfg, &WeightStore::from_tensors(sd), "").unwrap()
}

fn rand_t(rng: &mut SplitMix64, shape: &[usize], f16: bool) -> Tensor {
    let e = if f16 { ElemType::F16 } else { ElemType::Bf16 };
    common::rand_t(rng, shape, 1.0, e)
}

fn check(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e} > {tol}");
    eprintln!("{what}: relative error {e:.2e}");
}

/// Run `f(rank, device, comm)` on GPUs 0 and 1, one thread each, over a fresh NCCL group.
fn two_gpus<T: Send>(f: impl Fn(usize, CudaDevice, NcclComm) -> Result<T> + Sync) -> Vec<T> {
    let _one = one_group();
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

/// Forward of host `x` on any backend layer, back on the host.
fn fwd<L: BackendLayer>(l: &L, x: &Tensor, args: &ForwardArgs<'_>) -> Result<Tensor> {
    let be = l.backend();
    be.download(&l.forward(&be.upload(x)?, args)?)
}

/// A CUDA layer of `full` on `dev` with poisoned buffers.
fn poisoned(full: &SpecLayer, dev: &CudaDevice) -> Result<CudaLayer> {
    let l = CudaLayer::new(full, dev)?;
    l.set_poison_outputs(true);
    Ok(l)
}

/// One input of a case: the whole tensor and its call's arguments.
struct Input<'a> {
    name: &'static str,
    x: Tensor,
    args: ForwardArgs<'a>,
}

impl Input<'_> {
    fn cu(&self) -> Option<&[i32]> {
        self.args.packed.map(|p| p.cu_seqlens_q)
    }
}

fn packed_args(cu: &[i32]) -> ForwardArgs<'_> {
    ForwardArgs {
        packed: Some(PackedSeqParams {
            cu_seqlens_q: cu,
            cu_seqlens_kv: &[],
            max_seqlen_q: 0,
            max_seqlen_kv: 0,
        }),
        ..Default::default()
    }
}

/// CP = 2 with every comm type on `inputs` equals one GPU and the CPU reference.
fn cp_case(spec: &str, seed: u64, inputs: &[Input<'_>]) {
    let full = layer(spec, seed);
    let one = poisoned(&full, &gpu(0)).unwrap();
    let mut want = Vec::new();
    for inp in inputs {
        let cpu = full.forward(&inp.x, &inp.args).unwrap().output;
        let y = fwd(&one, &inp.x, &inp.args).unwrap();
        check(
            &format!("{spec} {}: one GPU vs CPU", inp.name),
            &y,
            &cpu,
            1e-2,
        );
        want.push((y, cpu));
    }
    drop(one);
    // p2p overlapped, p2p serial, all_gather, a2a.
    let runs = [
        (CpCommType::P2p, true),
        (CpCommType::P2p, false),
        (CpCommType::AllGather, true),
        (CpCommType::A2a, true),
    ];
    let mut p2p_overlapped: Vec<Tensor> = Vec::new();
    for (ty, overlap) in runs {
        let out = two_gpus(|_, dev, c| {
            let mut l = CpCudaLayer::new(poisoned(&full, &dev)?, c, ty)?;
            l.set_overlap(overlap);
            let layout = *l.layout();
            inputs
                .iter()
                .map(|inp| fwd(&l, &layout.split(&inp.x, inp.cu())?, &inp.args))
                .collect::<Result<Vec<_>>>()
        });
        let layout = CpLayout::new(0, 2).unwrap();
        for (i, (inp, (one_y, cpu))) in inputs.iter().zip(&want).enumerate() {
            let parts: Vec<Tensor> = out.iter().map(|o| o[i].clone()).collect();
            let y = layout.unsplit(&parts, inp.cu()).unwrap();
            let what = format!("{spec} {} cp=2 {ty} overlap={overlap}", inp.name);
            check(&format!("{what} vs one GPU"), &y, one_y, TOL_ONE_GPU);
            check(&format!("{what} vs CPU"), &y, cpu, TOL_CPU);
            if ty == CpCommType::P2p && overlap {
                p2p_overlapped.push(y);
            } else if ty == CpCommType::P2p {
                assert!(
                    bitwise(&y, &p2p_overlapped[i]),
                    "{what}: the serial ring differs from the overlapped one"
                );
            }
        }
    }
}

/// Padded b = 2 and b = 1 (several 128-row tiles per chunk) and packed (three sequences).
fn standard_inputs<'a>(h: usize, f16: bool, seed: u64, cu: &'a [i32]) -> Vec<Input<'a>> {
    let mut rng = SplitMix64::new(seed);
    vec![
        Input {
            name: "padded b=2",
            x: rand_t(&mut rng, &[96, 2, h], f16),
            args: ForwardArgs::default(),
        },
        Input {
            name: "padded b=1",
            x: rand_t(&mut rng, &[1024, 1, h], f16),
            args: ForwardArgs::default(),
        },
        Input {
            name: "packed",
            x: rand_t(&mut rng, &[*cu.last().unwrap() as usize, h], f16),
            args: packed_args(cu),
        },
    ]
}

/// Three sequences: 96, 264 and 128 tokens (multiples of 2 cp = 4).
const CU: [i32; 4] = [0, 96, 360, 488];

#[test]
#[ignore = "requires a CUDA GPU"]
fn cp2_causal_gqa_rope_matches_one_gpu() {
    cp_case(SPEC, seed(1), &standard_inputs(512, false, seed(2), &CU));
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cp2_no_mask_matches_one_gpu() {
    let spec = "self, heads=8, gqa=2, head_dim=64, hidden=512, qkv_bias, rope, mask=no_mask";
    cp_case(spec, seed(3), &standard_inputs(512, false, seed(4), &CU));
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cp2_causal_sliding_window_sinks_and_gate_match_one_gpu() {
    // A window of 100 keys crosses chunk borders (chunks of 24-256 tokens): p2p needs the
    // Toeplitz band mask on other ranks' chunks.
    let spec = "self, heads=8, gqa=4, head_dim=64, hidden=512, qk_layernorm=rms, rope, \
                window=(100, 0), sinks=learnable, output_gate, mask=causal";
    cp_case(spec, seed(5), &standard_inputs(512, false, seed(6), &CU));
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cp2_two_sided_window_off_by_one_sinks_f16_hd128_match_one_gpu() {
    let spec = "self, heads=4, gqa=2, head_dim=128, hidden=512, dtype=f16, \
                window=(40, 24), sinks=off_by_one, mask=no_mask";
    cp_case(spec, seed(7), &standard_inputs(512, true, seed(8), &CU));
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cp2_rope_positions_and_a_mask_type_override_match_one_gpu() {
    let mut rng = SplitMix64::new(seed(10));
    let positions: Vec<i64> = (0..256).map(|i| 3 * i + 5).collect();
    let inputs = [
        Input {
            name: "positions",
            x: rand_t(&mut rng, &[256, 2, 512], false),
            args: ForwardArgs {
                positions: Some(&positions),
                ..Default::default()
            },
        },
        Input {
            name: "no_mask override",
            x: rand_t(&mut rng, &[256, 2, 512], false),
            args: ForwardArgs {
                mask_type: Some(attention_codegen::MaskType::NoMask),
                ..Default::default()
            },
        },
    ];
    cp_case(SPEC, seed(9), &inputs);
}

/// Every rank's error for a call that must fail before any collective.
fn rank_errors(
    full: &SpecLayer,
    ty: CpCommType,
    x: &Tensor,
    args: &ForwardArgs<'_>,
) -> Vec<AttnError> {
    two_gpus(|_, dev, c| {
        let l = CpCudaLayer::new(CudaLayer::new(full, &dev)?, c, ty)?;
        Ok(fwd(&l, x, args).unwrap_err())
    })
}

fn assert_arg(e: &AttnError, want: &str) {
    let arg = match e {
        AttnError::InvalidArgument { arg, .. }
        | AttnError::Shape { arg, .. }
        | AttnError::CuSeqlens { arg, .. } => arg,
        other => panic!("{other}"),
    };
    assert_eq!(arg, want, "{e}");
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cp2_bad_inputs_are_typed_errors_on_both_ranks() {
    let full = layer(SPEC, 11);
    // A sequence that does not split into 2 cp chunks: 3 rows per rank is s = 6.
    for e in rank_errors(
        &full,
        CpCommType::P2p,
        &Tensor::zeros(&[3, 1, 512]),
        &ForwardArgs::default(),
    ) {
        assert_arg(&e, "hidden");
    }
    // Input split for another cp size: 16 tokens are 8 rows per rank at cp = 2, not 4.
    let cu = [0, 16];
    for e in rank_errors(
        &full,
        CpCommType::AllGather,
        &Tensor::zeros(&[4, 512]),
        &packed_args(&cu),
    ) {
        assert_arg(&e, "cu_seqlens_q");
    }
    let bias = Tensor::zeros(&[1, 1, 8, 8]);
    let with_bias = ForwardArgs {
        attention_bias: Some(&bias),
        ..Default::default()
    };
    let x = Tensor::zeros(&[4, 1, 512]);
    for e in rank_errors(&full, CpCommType::A2a, &x, &with_bias) {
        assert_arg(&e, "attention_mask/attention_bias");
    }
    let arbitrary = ForwardArgs {
        mask_type: Some(attention_codegen::MaskType::Arbitrary),
        ..Default::default()
    };
    for e in rank_errors(&full, CpCommType::P2p, &x, &arbitrary) {
        assert_arg(&e, "mask_type");
    }
    let short = [0i64; 3];
    let bad_pos = ForwardArgs {
        positions: Some(&short),
        ..Default::default()
    };
    for e in rank_errors(&full, CpCommType::P2p, &x, &bad_pos) {
        assert_arg(&e, "positions");
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cp2_ranks_that_call_differently_get_a_rank_mismatch() {
    let full = layer(SPEC, 12);
    let out = two_gpus(|r, dev, c| {
        let l = CpCudaLayer::new(CudaLayer::new(&full, &dev)?, c, CpCommType::P2p)?;
        // Rank 1 passes another batch size.
        let x = Tensor::zeros(&[8, 1 + r, 512]);
        Ok(fwd(&l, &x, &ForwardArgs::default()).unwrap_err())
    });
    for e in out {
        assert!(
            matches!(&e, AttnError::RankMismatch { rank: 1, param, .. } if param == "context-parallel call"),
            "{e}"
        );
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cp2_hidden_of_another_dtype_is_refused() {
    let full = layer(SPEC, 13);
    let out = two_gpus(|_, dev, c| {
        let l = CpCudaLayer::new(CudaLayer::new(&full, &dev)?, c, CpCommType::P2p)?;
        let x = DeviceTensor::from_host(
            l.inner().runtime().stream(),
            &Tensor::zeros(&[4, 1, 512]),
            ElemType::F32,
        )?;
        Ok(l.forward_device(&x, &ForwardArgs::default()).unwrap_err())
    });
    for e in out {
        assert!(
            matches!(&e, AttnError::DType { arg, .. } if arg == "hidden"),
            "{e}"
        );
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cp2_unsupported_layers_and_paged_steps_are_refused() {
    // a2a needs cp to divide the heads and the groups (3 groups).
    let l3 = layer(
        "self, heads=6, gqa=3, head_dim=64, hidden=384, mask=causal",
        14,
    );
    let cross = layer("cross, heads=2, head_dim=64, hidden=128, mask=no_mask", 15);
    let full = layer(SPEC, 16);
    let out = two_gpus(|_, dev, c| {
        let e1 = CpCudaLayer::new(CudaLayer::new(&l3, &dev)?, c, CpCommType::A2a).unwrap_err();
        Ok(e1)
    });
    for e in out {
        assert_arg(&e, "cp_size");
    }
    let out = two_gpus(|_, dev, c| {
        Ok(CpCudaLayer::new(CudaLayer::new(&cross, &dev)?, c, CpCommType::P2p).unwrap_err())
    });
    for e in out {
        assert_arg(&e, "config.kind");
    }
    // Static-cache steps run (tests/gpu_parallel_cp_decode.rs); paged steps are refused.
    let out = two_gpus(|_, dev, c| {
        let l = CpCudaLayer::new(CudaLayer::new(&full, &dev)?, c, CpCommType::P2p)?;
        let be = l.backend();
        let cfg = l.layer_config().clone();
        let mut pc = be.paged_cache(1, 4, 16, cfg.groups, cfg.head_dim)?;
        let table = BlockTable::new(1, 1)?;
        let batch = PagedBatch {
            cu_seqlens_q: &[0, 1],
            seqlens_k: &[1],
            block_table: &table,
        };
        let x = be.upload(&Tensor::zeros(&[1, cfg.hidden]))?;
        Ok(l.forward_paged(&x, &mut pc, 0, &batch)
            .expect_err("paged steps are refused"))
    });
    for e in out {
        assert_arg(&e, "context parallel");
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cp2_a_rank_that_fails_alone_is_named_on_its_peer() {
    let full = layer(SPEC, seed(18));
    for ty in CpCommType::ALL {
        let out = two_gpus(|r, dev, c| {
            let l = CpCudaLayer::new(CudaLayer::new(&full, &dev)?, c, ty)?;
            // Rank 1 passes 3 rows (s = 6: not a multiple of 2 cp); rank 0 a good call.
            let x = Tensor::zeros(&[if r == 1 { 3 } else { 4 }, 1, 512]);
            Ok(fwd(&l, &x, &ForwardArgs::default()).unwrap_err())
        });
        assert_arg(&out[1], "hidden");
        match &out[0] {
            AttnError::Collective {
                op, rank: 1, got, ..
            } => {
                assert_eq!(op, "context-parallel call");
                assert!(got.contains("hidden"), "{got}");
            }
            other => panic!("{ty} rank 0: {other}"),
        }
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cp2_a_layer_on_another_stream_than_its_communicator_is_refused() {
    let full = layer(SPEC, seed(19));
    let out = two_gpus(|_, dev, c| {
        let mut l = CudaLayer::new(&full, &dev)?;
        let rt = CudaRuntime::get(&dev)?;
        let other = dev.context.new_stream().map_err(|e| AttnError::Cuda {
            call: "new_stream".into(),
            msg: e.to_string(),
        })?;
        l.set_runtime(rt.with_stream(other)?)?;
        Ok(CpCudaLayer::new(l, c, CpCommType::P2p).unwrap_err())
    });
    for e in out {
        assert_arg(&e, "comm");
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
/// Named to run last: rank 0's aborted communicator must not disturb another test.
fn zz_cp2_missing_peer_is_a_timeout_error_and_aborts_the_communicator() {
    let full = layer(SPEC, seed(17));
    let x = Tensor::zeros(&[8, 1, 512]);
    // Compile and load every kernel first, under the long timeout (kernels load before the
    // call's first collective anyway, so a peer's compilation never counts).
    two_gpus(|_, dev, c| {
        let l = CpCudaLayer::new(CudaLayer::new(&full, &dev)?, c, CpCommType::P2p)?;
        fwd(&l, &x, &ForwardArgs::default())
    });
    let _one = one_group();
    let id = NcclUniqueId::new().unwrap();
    type Outcome = (Result<()>, Option<(AttnError, Duration, Option<String>)>);
    let res: Vec<Outcome> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2usize)
            .map(|r| {
                let (full, id, x) = (&full, &id, &x);
                s.spawn(move || -> Outcome {
                    let run = || -> Result<CpCudaLayer<NcclComm>> {
                        let dev = gpu(r);
                        let rt = CudaRuntime::get(&dev)?;
                        let c = NcclComm::new(rt, r, 2, id, Some(Duration::from_secs(2)))?;
                        let l = CpCudaLayer::new(CudaLayer::new(full, &dev)?, c, CpCommType::P2p)?;
                        // One call together first: NCCL may connect peers lazily, inside the
                        // first collective's host call, which no timeout bounds.
                        fwd(&l, x, &ForwardArgs::default())?;
                        Ok(l)
                    };
                    let l = match run() {
                        Ok(l) => l,
                        Err(e) => return (Err(e), None),
                    };
                    if r == 1 {
                        // Never takes part again; keeps its communicator until rank 0 has
                        // given up.
                        std::thread::sleep(Duration::from_secs(6));
                        return (Ok(()), None);
                    }
                    let first = fwd(&l, x, &ForwardArgs::default()).map(|_| ());
                    // A later call fails at once: the communicator is aborted, nothing queues.
                    let t0 = Instant::now();
                    let again = fwd(&l, x, &ForwardArgs::default()).unwrap_err();
                    (first, Some((again, t0.elapsed(), l.comm().broken())))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    match &res[0].0 {
        Err(AttnError::Collective {
            rank: 0, expected, ..
        }) => {
            assert!(expected.contains("within"), "{expected}");
        }
        other => panic!("rank 0: {other:?}"),
    }
    let (again, took, broken) = res[0].1.as_ref().expect("rank 0 tried again");
    match again {
        AttnError::Collective { rank: 0, got, .. } => {
            assert!(got.contains("aborted"), "{got}");
        }
        other => panic!("rank 0, second call: {other}"),
    }
    assert!(
        *took < Duration::from_secs(1),
        "the second call took {took:?}"
    );
    assert!(
        broken.as_deref().is_some_and(|b| b.contains("timed out")),
        "{broken:?}"
    );
    assert!(res[1].0.is_ok());
}
