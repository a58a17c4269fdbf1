//! Context parallelism (CP = 2): one attention layer split over two ranks by sequence, rank
//! `r` holding chunks `r` and `3 - r` of the four chunks of every sequence, with each
//! `cp_comm_type` (`p2p`, `all_gather`, `a2a`):
//!
//!     # one process, one thread per rank: two GPUs over NCCL (CpCudaLayer) when the machine
//!     # has them and libnccl, otherwise two CPU-reference ranks (CpLayer) in process
//!     cargo run --release --example context_parallel
//!
//! One process per GPU works as in `examples/tensor_parallel.rs` (the NCCL unique id through
//! a file or `ATTN_NCCL_ID`), with `CpCudaLayer::new(CudaLayer::new(&full, &dev)?, comm, ty)`
//! in place of the tensor-parallel rank.
//!
//! Every rank builds the same seeded layer and input, keeps its chunks
//! ([`CpLayout::split`]), and the ranks' outputs put back in order ([`CpLayout::unsplit`])
//! are compared with the whole layer on the CPU reference.

use std::error::Error;
use std::time::Duration;

use attention::runtime::cuda::{CudaLayer, CudaRuntime};
use attention::runtime::modules::SplitMix64;
use attention::runtime::parallel::{
    nccl_version, run_ranks, Communicator, CpCommType, CpCudaLayer, CpLayer, CpLayout, NcclComm,
    NcclUniqueId,
};
use attention::runtime::spec_layer::SpecLayer;
use attention::runtime::{AttentionLayer, Device, ForwardArgs, Result, RuntimeDims, Tensor};

const SPEC: &str =
    "self, heads=8, gqa=4, head_dim=64, hidden=512, qk_layernorm=rms, rope, mask=causal";
const CP: usize = 2;
const TIMEOUT: Duration = Duration::from_secs(120);

fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in got.data().iter().zip(want.data()) {
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// Rank `rank` of CP on GPU `rank` over NCCL group `id`: its rows of the output.
fn gpu_rank(
    full: &SpecLayer,
    x: &Tensor,
    ty: CpCommType,
    rank: usize,
    id: &NcclUniqueId,
) -> Result<Tensor> {
    let Device::Cuda(dev) = Device::cuda(rank)? else {
        unreachable!("Device::cuda returns a CUDA device")
    };
    let comm = NcclComm::new(CudaRuntime::get(&dev)?, rank, CP, id, Some(TIMEOUT))?;
    let layer = CpCudaLayer::new(CudaLayer::new(full, &dev)?, comm, ty)?;
    let mine = layer.layout().split(x, None)?;
    Ok(layer.forward(&mine, &ForwardArgs::default())?.output)
}

fn main() -> std::result::Result<(), Box<dyn Error>> {
    let cfg = SpecLayer::config_from_str(SPEC, &RuntimeDims::default())?;
    let full = SpecLayer::init(cfg, 7)?;
    let mut rng = SplitMix64::new(8);
    let x = Tensor::from_fn(&[256, 1, 512], |_| rng.uniform());
    let want = full.forward(&x, &ForwardArgs::default())?.output;
    let gpus = (0..CP).all(|i| Device::cuda(i).is_ok()) && nccl_version().is_ok();
    if !gpus {
        println!("fewer than {CP} GPUs or no libnccl: {CP} CPU-reference ranks in this process");
    }
    for ty in CpCommType::ALL {
        let parts: Vec<Tensor> = if gpus {
            let id = NcclUniqueId::new()?;
            std::thread::scope(|s| {
                let hs: Vec<_> = (0..CP)
                    .map(|r| {
                        let (full, x, id) = (&full, &x, &id);
                        s.spawn(move || gpu_rank(full, x, ty, r, id))
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().expect("rank thread"))
                    .collect::<Result<Vec<_>>>()
            })?
        } else {
            run_ranks(CP, TIMEOUT, |comm| {
                let mine = CpLayout::new(comm.rank(), CP)?.split(&x, None)?;
                let layer = CpLayer::new(full.clone(), comm, ty)?;
                Ok(layer.forward(&mine, &ForwardArgs::default())?.output)
            })?
            .into_iter()
            .collect::<Result<Vec<_>>>()?
        };
        let y = CpLayout::new(0, CP)?.unsplit(&parts, None)?;
        println!(
            "{} cp={CP} {ty}: relative error vs the whole layer {:.2e}",
            if gpus { "GPU (NCCL)" } else { "CPU" },
            rel_err(&y, &want)
        );
    }
    Ok(())
}
