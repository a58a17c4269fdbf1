//! Tensor parallelism (TP = 2): one attention layer split over two ranks by heads, each rank
//! running its shard and the ranks summing their shares over a communicator. Both launch
//! styles of issue 12:
//!
//!     # one process, one thread per rank: two GPUs over NCCL when the machine has them and
//!     # libnccl, otherwise two CPU-reference ranks over the in-process communicator
//!     cargo run --release --example tensor_parallel
//!
//!     # one process per GPU: rank 0 writes NCCL's unique id to the file, rank 1 waits for it
//!     cargo run --release --example tensor_parallel -- --rank 0 --id-file /tmp/attn_nccl_id &
//!     cargo run --release --example tensor_parallel -- --rank 1 --id-file /tmp/attn_nccl_id
//!
//!     # or hand the id over in an environment variable (rank 0 prints it)
//!     ATTN_NCCL_ID=<256 hex digits> cargo run --release --example tensor_parallel -- --rank 1
//!
//! Every rank builds the same seeded layer and input, keeps its shard, and prints the relative
//! error of its (all-reduced) output against the whole layer on the CPU reference.

use std::error::Error;
use std::time::Duration;

use attention::runtime::backend::{Backend, BackendLayer, CpuLayer};
use attention::runtime::cuda::{CudaLayer, CudaRuntime};
use attention::runtime::modules::SplitMix64;
use attention::runtime::parallel::tp_load::shard_layer;
use attention::runtime::parallel::{
    nccl_version, run_ranks, Communicator, NcclComm, NcclUniqueId, TpLayer,
};
use attention::runtime::spec_layer::SpecLayer;
use attention::runtime::{AttentionLayer, Device, ForwardArgs, RuntimeDims, Tensor};

const SPEC: &str =
    "self, heads=8, gqa=4, head_dim=64, hidden=512, qk_layernorm=rms, rope, mask=causal";
const TP: usize = 2;
const TIMEOUT: Duration = Duration::from_secs(120);
const ID_VAR: &str = "ATTN_NCCL_ID";

fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in got.data().iter().zip(want.data()) {
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// The whole layer, the input and the single-rank output: the same on every rank.
fn setup() -> Result<(SpecLayer, Tensor, Tensor), Box<dyn Error>> {
    let cfg = SpecLayer::config_from_str(SPEC, &RuntimeDims::default())?;
    let full = SpecLayer::init(cfg, 7)?;
    let mut rng = SplitMix64::new(8);
    let x = Tensor::from_fn(&[64, 1, 512], |_| rng.uniform());
    let want = full.forward(&x, &ForwardArgs::default())?.output;
    Ok((full, x, want))
}

/// Rank `rank` of TP on GPU `rank`, over NCCL group `id`: its output on the host.
fn gpu_rank(
    full: &SpecLayer,
    x: &Tensor,
    rank: usize,
    id: &NcclUniqueId,
) -> attention::runtime::Result<Tensor> {
    let Device::Cuda(dev) = Device::cuda(rank)? else {
        unreachable!("Device::cuda returns a CUDA device")
    };
    let comm = NcclComm::new(CudaRuntime::get(&dev)?, rank, TP, id, Some(TIMEOUT))?;
    let shard = shard_layer(full, rank, TP)?;
    let layer = TpLayer::new(CudaLayer::new(&shard, &dev)?, comm, full.config(), false)?;
    let be = layer.backend();
    be.download(&layer.forward(&be.upload(x)?, &ForwardArgs::default())?)
}

fn report(what: &str, outs: &[Tensor], want: &Tensor) {
    for (r, y) in outs.iter().enumerate() {
        println!(
            "{what} rank {r}: relative error vs the whole layer {:.2e}",
            rel_err(y, want)
        );
    }
}

/// One process, one thread per rank.
fn threads() -> Result<(), Box<dyn Error>> {
    let (full, x, want) = setup()?;
    let gpus = (0..TP).all(|i| Device::cuda(i).is_ok());
    if gpus && nccl_version().is_ok() {
        let id = NcclUniqueId::new()?;
        let outs = std::thread::scope(|s| {
            let hs: Vec<_> = (0..TP)
                .map(|r| {
                    let (full, x, id) = (&full, &x, &id);
                    s.spawn(move || gpu_rank(full, x, r, id))
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("rank thread"))
                .collect::<attention::runtime::Result<Vec<_>>>()
        })?;
        report("GPU (NCCL)", &outs, &want);
    } else {
        println!("fewer than {TP} GPUs or no libnccl: {TP} CPU-reference ranks in this process");
        let outs = run_ranks(TP, TIMEOUT, |comm| {
            let shard = shard_layer(&full, comm.rank(), TP)?;
            TpLayer::new(CpuLayer::new(shard), comm, full.config(), false)?
                .forward(&x, &ForwardArgs::default())
        })?
        .into_iter()
        .collect::<attention::runtime::Result<Vec<_>>>()?;
        report("CPU", &outs, &want);
    }
    Ok(())
}

/// One process per GPU: `--rank R [--id-file PATH]`, the id from the file or `ATTN_NCCL_ID`.
fn one_rank(rank: usize, id_file: Option<&str>) -> Result<(), Box<dyn Error>> {
    let (full, x, want) = setup()?;
    let id = match (rank, id_file) {
        (0, Some(path)) => {
            let id = NcclUniqueId::new()?;
            id.write_file(path)?;
            id
        }
        (0, None) => {
            let id = NcclUniqueId::new()?;
            println!("{ID_VAR}={}", id.to_hex());
            id
        }
        (_, Some(path)) => NcclUniqueId::read_file(path, TIMEOUT)?,
        (_, None) => NcclUniqueId::from_env(ID_VAR)?,
    };
    let y = gpu_rank(&full, &x, rank, &id)?;
    println!(
        "GPU (NCCL) rank {rank}: relative error vs the whole layer {:.2e}",
        rel_err(&y, &want)
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    };
    match flag("--rank") {
        None => threads(),
        Some(r) => one_rank(r.parse()?, flag("--id-file")),
    }
}
