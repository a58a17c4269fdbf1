//! `attn bench parallel`: the Llama-3-8B layer (the layer bench's preset: hidden 4096, 32
//! heads × 128, 8 groups, q/k RMS norm, rope, causal, bf16, seeded random weights) over one
//! sequence of 32k-128k tokens, on one GPU (TP = 1: a plain [`CudaLayer`]) and tensor-parallel
//! (TP = 2: [`TpLayer`]`<CudaLayer, NcclComm>` on GPUs 0 and 1, one thread per rank in this
//! process, as `examples/tensor_parallel.rs`).
//!
//! Timing: CUDA events on each rank's stream around each call (the layer's forward on device
//! tensors, or with `--train` forward_train + backward); `warmup` untimed calls, then the
//! median of `reps` per rank; a row's time is the slowest rank's. Speedup is over the TP = 1
//! row of the same length; scaling efficiency = speedup / TP. Bytes communicated: counted by
//! wrapping the rank's [`NcclComm`] in [`CountingComm`] (payload and ring-estimate wire bytes
//! of one call, per rank). Results in [`super::parallel_report`].
//!
//! Not measured: context parallelism (no CUDA implementation: the report's note says so).
//! Fewer than two GPUs or no libnccl: the TP = 2 rows are n/a with a note (not an error); a
//! rank that fails (out of memory, a peer timing out) ends that rank's rows, with a note.

use std::sync::Arc;
use std::time::Duration;

use attention_runtime::backend::{CudaBackend, TrainLayer};
use attention_runtime::cuda::{CudaLayer, CudaRuntime, DeviceTensor, ElemType};
use attention_runtime::device::{CudaDevice, Device};
use attention_runtime::modules::SplitMix64;
use attention_runtime::parallel::tp_load::shard_layer;
use attention_runtime::parallel::{nccl_version, NcclComm, NcclUniqueId, TpLayer};
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::train::{BackwardOptions, TrainOptions};
use attention_runtime::{AttentionLayer, AttnError, ForwardArgs, Result, RuntimeDims, Tensor};
use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
use cudarc::driver::CudaStream;

use super::chart::{svg_path_for, write_svg};
use super::common::{cuda_err, median};
use super::layer_report::LayerShape;
use super::parallel_count::{CommCount, CommCounter, CountingComm};
use super::parallel_report::{panels, table, to_json, ParRow, CP_NOTE};

/// Bound on each collective's completion (a missing or stuck peer is an error, not a hang).
const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(120);

/// Options of `attn bench parallel`.
#[derive(Debug, Clone)]
pub struct ParallelOptions {
    /// Sequence lengths (one sequence each).
    pub seqlens: Vec<usize>,
    /// Tensor-parallel sizes: 1 and/or 2.
    pub tps: Vec<usize>,
    /// Also time the training step (forward_train + backward).
    pub train: bool,
    /// Untimed calls first.
    pub warmup: usize,
    /// Timed calls (median per rank).
    pub reps: usize,
    /// Write the JSON report here, and the SVG chart beside it.
    pub json: Option<std::path::PathBuf>,
}

impl ParallelOptions {
    /// Errors: [`AttnError::InvalidArgument`] for a TP size other than 1 or 2 (`--tp`), no
    /// lengths or a zero length (`--seqlens`), zero `--reps`.
    pub fn validate(&self) -> Result<()> {
        let bad = |arg: &str, expected: &str, got: String| {
            Err(AttnError::InvalidArgument {
                arg: arg.into(),
                expected: expected.into(),
                got,
            })
        };
        if self.tps.is_empty() || self.tps.iter().any(|&t| t != 1 && t != 2) {
            return bad(
                "--tp",
                "1 and/or 2 (two GPUs of one host)",
                format!("{:?}", self.tps),
            );
        }
        if self.seqlens.is_empty() || self.seqlens.contains(&0) {
            return bad(
                "--seqlens",
                "one or more lengths > 0",
                format!("{:?}", self.seqlens),
            );
        }
        if self.reps == 0 {
            return bad("--reps", "at least 1", "0".into());
        }
        Ok(())
    }

    fn modes(&self) -> Vec<&'static str> {
        if self.train {
            vec!["forward", "train"]
        } else {
            vec!["forward"]
        }
    }
}

fn random_hidden(st: &Arc<CudaStream>, shape: &[usize], seed: u64) -> Result<DeviceTensor> {
    let mut rng = SplitMix64::new(seed);
    DeviceTensor::from_host(
        st,
        &Tensor::from_fn(shape, |_| rng.uniform()),
        ElemType::Bf16,
    )
}

/// Median ms of `reps` calls of `mode` after `warmup`, and one call's collectives.
fn time_mode<L: TrainLayer<Backend = CudaBackend>>(
    layer: &L,
    st: &Arc<CudaStream>,
    o: &ParallelOptions,
    mode: &str,
    tokens: usize,
    hidden: usize,
    counter: Option<&CommCounter>,
) -> Result<(f64, CommCount)> {
    let x = random_hidden(st, &[tokens, 1, hidden], tokens as u64)?;
    let dy = if mode == "train" {
        Some(random_hidden(st, &[tokens, 1, hidden], tokens as u64 + 1)?)
    } else {
        None
    };
    let args = ForwardArgs::default();
    let snap = || counter.map(CommCounter::snapshot).unwrap_or_default();
    let (mut ms, mut comm) = (Vec::new(), CommCount::default());
    for it in 0..o.warmup + o.reps {
        let ev = || {
            st.record_event(Some(CU_EVENT_DEFAULT))
                .map_err(cuda_err("record event"))
        };
        let before = snap();
        let e0 = ev()?;
        match &dy {
            None => drop(layer.forward(&x, &args)?),
            Some(dy) => {
                let (y, mut saved) = layer.forward_train(&x, &args, &TrainOptions::default())?;
                let g = layer.backward(&mut saved, dy, &BackwardOptions::default())?;
                drop((y, saved, g));
            }
        }
        let e1 = ev()?;
        let t = e0
            .elapsed_ms(&e1)
            .map_err(cuda_err("elapsed (bench parallel)"))? as f64;
        comm = snap().since(before);
        if it >= o.warmup {
            ms.push(t);
        }
    }
    Ok((median(ms), comm))
}

/// One rank's results: `(mode, tokens, ms, collectives)`, in order until the first failure,
/// and that failure.
type RankOut = (Vec<(String, usize, f64, CommCount)>, Option<AttnError>);

/// Every mode and length on one layer; stops at the first failure (the peers' next
/// collective then times out, so they stop too).
fn run_rank<L: TrainLayer<Backend = CudaBackend>>(
    layer: &L,
    st: &Arc<CudaStream>,
    o: &ParallelOptions,
    hidden: usize,
    counter: Option<&CommCounter>,
) -> RankOut {
    let mut out = Vec::new();
    for mode in o.modes() {
        for &s in &o.seqlens {
            match time_mode(layer, st, o, mode, s, hidden, counter) {
                Ok((ms, c)) => out.push((mode.to_string(), s, ms, c)),
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

fn cuda_dev(i: usize) -> Result<CudaDevice> {
    match Device::cuda(i)? {
        Device::Cuda(d) => Ok(d),
        Device::Cpu => Err(AttnError::BackendUnavailable(format!("no CUDA device {i}"))),
    }
}

/// Rank `rank` of TP = `tp` on GPU `rank` over the NCCL group `id`.
fn tp_rank(
    full: &SpecLayer,
    rank: usize,
    tp: usize,
    id: &NcclUniqueId,
    o: &ParallelOptions,
) -> RankOut {
    let setup = || -> Result<_> {
        let dev = cuda_dev(rank)?;
        let rt = CudaRuntime::get(&dev)?;
        let comm = NcclComm::new(rt, rank, tp, id, Some(COLLECTIVE_TIMEOUT))?;
        let (comm, counter) = CountingComm::new(comm);
        let cuda = CudaLayer::new(&shard_layer(full, rank, tp)?, &dev)?;
        let st = cuda.runtime().stream().clone();
        Ok((TpLayer::new(cuda, comm, full.config(), false)?, st, counter))
    };
    match setup() {
        Ok((layer, st, counter)) => run_rank(&layer, &st, o, full.config().hidden, Some(&counter)),
        Err(e) => (Vec::new(), Some(e)),
    }
}

/// Why TP = `tp` cannot run here, if it cannot.
fn tp_unavailable(tp: usize) -> Option<String> {
    if let Some(i) = (0..tp).find(|&i| cuda_dev(i).is_err()) {
        return Some(format!(
            "TP = {tp}: n/a, needs {tp} GPUs (no CUDA device {i})"
        ));
    }
    nccl_version()
        .err()
        .map(|e| format!("TP = {tp}: n/a, NCCL unavailable: {e}"))
}

/// Time every TP size, mode and length; returns the table (and writes the JSON and SVG).
pub fn run_parallel(o: &ParallelOptions) -> Result<String> {
    o.validate()?;
    let shape = LayerShape::preset("llama3-8b").ok_or_else(|| AttnError::InvalidArgument {
        arg: "preset".into(),
        expected: "the layer bench's llama3-8b preset".into(),
        got: "missing".into(),
    })?;
    let dev0 = cuda_dev(0)?;
    let config = SpecLayer::config_from_str(&shape.spec(), &RuntimeDims::default())?;
    let full = SpecLayer::init(config, 7)?;
    let mut notes = vec![CP_NOTE.to_string()];
    let mut rows = Vec::new();
    let mut tps = o.tps.clone();
    tps.sort_unstable();
    tps.dedup();
    for tp in tps {
        // Per rank: what it measured.
        let mut per_rank: Vec<Vec<(String, usize, f64, CommCount)>> = Vec::new();
        if tp == 1 {
            let cuda = CudaLayer::new(&full, &dev0)?;
            let st = cuda.runtime().stream().clone();
            let (out, err) = run_rank(&cuda, &st, o, shape.hidden, None);
            if let Some(e) = err {
                notes.push(format!("TP = 1: stopped: {e}"));
            }
            per_rank.push(out);
        } else if let Some(why) = tp_unavailable(tp) {
            notes.push(why);
        } else {
            let id = NcclUniqueId::new()?;
            let outs: Vec<RankOut> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..tp)
                    .map(|r| {
                        let (full, id) = (&full, &id);
                        s.spawn(move || tp_rank(full, r, tp, id, o))
                    })
                    .collect();
                hs.into_iter()
                    .enumerate()
                    .map(|(r, h)| {
                        h.join().unwrap_or_else(|_| {
                            (
                                Vec::new(),
                                Some(AttnError::BackendUnavailable(format!(
                                    "TP = {tp} rank {r} thread panicked"
                                ))),
                            )
                        })
                    })
                    .collect()
            });
            for (r, (out, err)) in outs.into_iter().enumerate() {
                if let Some(e) = err {
                    notes.push(format!("TP = {tp} rank {r}: stopped: {e}"));
                }
                per_rank.push(out);
            }
        }
        for mode in o.modes() {
            for &s in &o.seqlens {
                let got: Vec<_> = per_rank
                    .iter()
                    .map(|v| v.iter().find(|x| x.0 == mode && x.1 == s))
                    .collect();
                let all = !got.is_empty() && got.iter().all(Option::is_some);
                rows.push(ParRow {
                    mode: mode.into(),
                    tokens: s,
                    tp,
                    cp: 1,
                    rank_ms: if all {
                        got.iter().flatten().map(|x| x.2).collect()
                    } else {
                        Vec::new()
                    },
                    comm: got
                        .first()
                        .copied()
                        .flatten()
                        .map(|x| x.3)
                        .unwrap_or_default(),
                });
            }
        }
    }
    let note = notes.join("\n");
    eprintln!("{note}");
    let device = if o.tps.contains(&2) {
        format!("{} (TP ranks on GPUs 0..TP)", dev0.name)
    } else {
        dev0.name.clone()
    };
    let text = table(&rows, &device, &note);
    if let Some(path) = &o.json {
        std::fs::write(path, to_json(&rows, &device, &note)).map_err(|e| AttnError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        write_svg(
            &svg_path_for(path),
            &format!("attn bench parallel: Llama-3-8B layer, TP scaling ({device})"),
            &panels(&rows),
            2,
        )?;
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> ParallelOptions {
        ParallelOptions {
            seqlens: vec![32768],
            tps: vec![1, 2],
            train: false,
            warmup: 1,
            reps: 3,
            json: None,
        }
    }

    #[test]
    fn options_are_checked_before_any_gpu_work() {
        assert!(opts().validate().is_ok());
        let mut o = opts();
        o.tps = vec![1, 4];
        match o.validate() {
            Err(AttnError::InvalidArgument { arg, got, .. }) => {
                assert_eq!(arg, "--tp");
                assert_eq!(got, "[1, 4]");
            }
            r => panic!("{r:?}"),
        }
        let mut o = opts();
        o.seqlens = vec![0];
        assert!(
            matches!(o.validate(), Err(AttnError::InvalidArgument { arg, .. }) if arg == "--seqlens")
        );
        let mut o = opts();
        o.reps = 0;
        assert!(
            matches!(o.validate(), Err(AttnError::InvalidArgument { arg, .. }) if arg == "--reps")
        );
        // A bad option is the error even here (no GPU in CI): validation comes first.
        let mut o = opts();
        o.tps = vec![3];
        assert!(
            matches!(run_parallel(&o), Err(AttnError::InvalidArgument { arg, .. }) if arg == "--tp")
        );
    }

    #[test]
    fn train_adds_the_train_mode() {
        assert_eq!(opts().modes(), vec!["forward"]);
        let mut o = opts();
        o.train = true;
        assert_eq!(o.modes(), vec!["forward", "train"]);
    }
}
