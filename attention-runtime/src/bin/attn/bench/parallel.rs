//! `attn bench parallel`: the Llama-3-8B layer (the layer bench's preset: hidden 4096, 32
//! heads × 128, 8 groups, q/k RMS norm, rope, causal, bf16, seeded random weights) over one
//! sequence of 32k-128k tokens, on one GPU (TP = CP = 1: a plain [`CudaLayer`]),
//! tensor-parallel (TP = 2: [`TpLayer`]`<CudaLayer, NcclComm>` on GPUs 0 and 1, one thread per
//! rank in this process, as `examples/tensor_parallel.rs`) and context-parallel (CP = 2:
//! [`CpCudaLayer`]`<NcclComm>` on GPUs 0 and 1, one row per `cp_comm_type`; rank `r` gets its
//! rows of the sequence, `[s / 2, 1, h]`).
//!
//! Timing: CUDA events on each rank's stream around each call (the layer's forward on device
//! tensors, or with `--train` forward_train + backward); `warmup` untimed calls, then the
//! median of `reps` per rank; a row's time is the slowest rank's. Speedup is over the
//! TP = CP = 1 row of the same length; scaling efficiency = speedup / (TP × CP). Bytes
//! communicated: counted by wrapping the rank's [`NcclComm`] in [`CountingComm`] (payload and
//! ring-estimate wire bytes of one call, per rank; for CP this includes the few bytes of the
//! call check every rank makes first). Results in [`super::parallel_report`].
//!
//! With `--train` the CP rows time `CpCudaLayer::forward_train_device` + `backward_device`
//! (the p2p backward's ring does not overlap its exchanges). Fewer than two GPUs or no libnccl: the TP = 2 / CP = 2 rows are
//! n/a with a note (not an error); a rank that fails (out of memory, a peer timing out) ends
//! that rank's rows, with a note.

use std::sync::Arc;
use std::time::Duration;

use attention_runtime::backend::{BackendLayer, CudaBackend, TrainLayer};
use attention_runtime::cuda::{CudaLayer, CudaRuntime, DeviceTensor, ElemType};
use attention_runtime::device::{CudaDevice, Device};
use attention_runtime::modules::SplitMix64;
use attention_runtime::parallel::tp_load::shard_layer;
use attention_runtime::parallel::{
    nccl_version, CpCommType, CpCudaLayer, NcclComm, NcclUniqueId, TpLayer,
};
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::train::{BackwardOptions, TrainOptions};
use attention_runtime::{AttentionLayer, AttnError, ForwardArgs, Result, RuntimeDims, Tensor};
use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
use cudarc::driver::CudaStream;

use super::chart::{svg_path_for, write_svg};
use super::common::{cuda_err, median};
use super::layer_report::LayerShape;
use super::parallel_count::{CommCount, CommCounter, CountingComm};
use super::parallel_report::{panels, table, to_json, ParRow};

/// Bound on each collective's completion (a missing or stuck peer is an error, not a hang).
const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(120);

/// Options of `attn bench parallel`.
#[derive(Debug, Clone)]
pub struct ParallelOptions {
    /// Sequence lengths (one sequence each).
    pub seqlens: Vec<usize>,
    /// Tensor-parallel sizes: 1 and/or 2.
    pub tps: Vec<usize>,
    /// Context-parallel sizes: 1 and/or 2 (CP = 1 is the TP = 1 row).
    pub cps: Vec<usize>,
    /// The exchanges timed at CP > 1.
    pub cp_comm_types: Vec<CpCommType>,
    /// Also time the training step (forward_train + backward), TP and CP rows.
    pub train: bool,
    /// Untimed calls first.
    pub warmup: usize,
    /// Timed calls (median per rank).
    pub reps: usize,
    /// Write the JSON report here, and the SVG chart beside it.
    pub json: Option<std::path::PathBuf>,
}

fn bad<T>(arg: &str, expected: &str, got: String) -> Result<T> {
    Err(AttnError::InvalidArgument {
        arg: arg.into(),
        expected: expected.into(),
        got,
    })
}

impl ParallelOptions {
    /// Errors: [`AttnError::InvalidArgument`] for a TP size other than 1 or 2 (`--tp`), a CP
    /// size other than 1 or 2 (`--cp`), CP = 2 without an exchange (`--cp-comm-type`), no
    /// lengths, a zero length or (with CP = 2) one that is not a multiple of 4 (`--seqlens`),
    /// zero `--reps`.
    pub fn validate(&self) -> Result<()> {
        if self.tps.is_empty() || self.tps.iter().any(|&t| t != 1 && t != 2) {
            return bad(
                "--tp",
                "1 and/or 2 (two GPUs of one host)",
                format!("{:?}", self.tps),
            );
        }
        if self.cps.iter().any(|&c| c != 1 && c != 2) {
            return bad(
                "--cp",
                "1 and/or 2 (two GPUs of one host)",
                format!("{:?}", self.cps),
            );
        }
        let cp2 = self.cps.contains(&2);
        if cp2 && self.cp_comm_types.is_empty() {
            return bad(
                "--cp-comm-type",
                "one or more of p2p, all_gather, a2a with CP = 2",
                "none".into(),
            );
        }
        if self.seqlens.is_empty()
            || self.seqlens.contains(&0)
            || (cp2 && self.seqlens.iter().any(|s| !s.is_multiple_of(4)))
        {
            return bad(
                "--seqlens",
                "one or more lengths > 0 (multiples of 2 x CP = 4 with CP = 2)",
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

    /// Every configuration, in table order: TP = CP = 1 (the baseline), TP > 1, then each
    /// CP > 1 exchange.
    fn configs(&self) -> Vec<Config> {
        let mut out = vec![Config {
            tp: 1,
            cp: 1,
            ty: None,
        }];
        let mut tps = self.tps.clone();
        tps.sort_unstable();
        tps.dedup();
        out.extend(tps.into_iter().filter(|&t| t > 1).map(|tp| Config {
            tp,
            cp: 1,
            ty: None,
        }));
        let mut cps = self.cps.clone();
        cps.sort_unstable();
        cps.dedup();
        for cp in cps.into_iter().filter(|&c| c > 1) {
            let mut seen = Vec::new();
            for &ty in &self.cp_comm_types {
                if !seen.contains(&ty) {
                    seen.push(ty);
                    out.push(Config {
                        tp: 1,
                        cp,
                        ty: Some(ty),
                    });
                }
            }
        }
        out
    }
}

/// One configuration of the table.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Config {
    tp: usize,
    cp: usize,
    ty: Option<CpCommType>,
}

impl Config {
    fn ranks(&self) -> usize {
        self.tp * self.cp
    }

    fn label(&self) -> String {
        match self.ty {
            Some(t) => format!("CP = {} {t}", self.cp),
            None => format!("TP = {}", self.tp),
        }
    }

    /// The modes it runs (the same for every configuration).
    fn modes(&self, o: &ParallelOptions) -> Vec<&'static str> {
        o.modes()
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

/// One call of a mode on a rank: the input `x` and, for a training step, the output
/// gradient `dy`.
type Step<'a> = dyn Fn(&DeviceTensor, Option<&DeviceTensor>) -> Result<()> + 'a;

/// Forward, or with `dy` forward_train + backward, of a trainable layer.
fn train_step<L: TrainLayer<Backend = CudaBackend>>(
    layer: &L,
) -> impl Fn(&DeviceTensor, Option<&DeviceTensor>) -> Result<()> + '_ {
    move |x, dy| {
        let args = ForwardArgs::default();
        match dy {
            None => drop(layer.forward(x, &args)?),
            Some(dy) => {
                let (y, mut saved) = layer.forward_train(x, &args, &TrainOptions::default())?;
                let g = layer.backward(&mut saved, dy, &BackwardOptions::default())?;
                drop((y, saved, g));
            }
        }
        Ok(())
    }
}

/// Forward, or with `dy` the CP training step (forward_train + backward), of one CP rank.
fn cp_train_step<C: attention_runtime::parallel::DeviceCommunicator>(
    layer: &CpCudaLayer<C>,
) -> impl Fn(&DeviceTensor, Option<&DeviceTensor>) -> Result<()> + '_ {
    move |x, dy| {
        let args = ForwardArgs::default();
        match dy {
            None => drop(BackendLayer::forward(layer, x, &args)?),
            Some(dy) => {
                let (y, mut saved) =
                    layer.forward_train_device(x, &args, &TrainOptions::default())?;
                let g = layer.backward_device(&mut saved, dy, &BackwardOptions::default())?;
                drop((y, saved, g));
            }
        }
        Ok(())
    }
}

/// Median ms of `reps` calls of `mode` after `warmup` on `rows` input rows, and one call's
/// collectives.
#[allow(clippy::too_many_arguments)]
fn time_mode(
    step: &Step<'_>,
    st: &Arc<CudaStream>,
    o: &ParallelOptions,
    mode: &str,
    (tokens, rows): (usize, usize),
    hidden: usize,
    counter: Option<&CommCounter>,
) -> Result<(f64, CommCount)> {
    let x = random_hidden(st, &[rows, 1, hidden], tokens as u64)?;
    let dy = if mode == "train" {
        Some(random_hidden(st, &[rows, 1, hidden], tokens as u64 + 1)?)
    } else {
        None
    };
    let snap = || counter.map(CommCounter::snapshot).unwrap_or_default();
    let (mut ms, mut comm) = (Vec::new(), CommCount::default());
    for it in 0..o.warmup + o.reps {
        let ev = || {
            st.record_event(Some(CU_EVENT_DEFAULT))
                .map_err(cuda_err("record event"))
        };
        let before = snap();
        let e0 = ev()?;
        step(&x, dy.as_ref())?;
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

/// One measurement: `(mode, tokens, ms, collectives)`.
type Measured = (String, usize, f64, CommCount);

/// One rank's results in order until the first failure, and that failure.
type RankOut = (Vec<Measured>, Option<AttnError>);

/// Every mode and length on one rank (its `1 / cp` of each sequence); stops at the first
/// failure (the peers' next collective then times out, so they stop too).
fn run_rank(
    step: &Step<'_>,
    st: &Arc<CudaStream>,
    o: &ParallelOptions,
    (modes, cp): (&[&'static str], usize),
    hidden: usize,
    counter: Option<&CommCounter>,
) -> RankOut {
    let mut out = Vec::new();
    for &mode in modes {
        for &s in &o.seqlens {
            match time_mode(step, st, o, mode, (s, s / cp), hidden, counter) {
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

/// Rank `rank` of `c` (TP or CP) on GPU `rank` over the NCCL group `id`.
fn parallel_rank(
    full: &SpecLayer,
    rank: usize,
    c: Config,
    id: &NcclUniqueId,
    o: &ParallelOptions,
) -> RankOut {
    let n = c.ranks();
    let hidden = full.config().hidden;
    let setup = || -> Result<_> {
        let dev = cuda_dev(rank)?;
        let rt = CudaRuntime::get(&dev)?;
        let comm = NcclComm::new(rt, rank, n, id, Some(COLLECTIVE_TIMEOUT))?;
        let (comm, counter) = CountingComm::new(comm);
        Ok((dev, comm, counter))
    };
    let run = || -> std::result::Result<RankOut, AttnError> {
        let (dev, comm, counter) = setup()?;
        let modes = c.modes(o);
        Ok(match c.ty {
            None => {
                let cuda = CudaLayer::new(&shard_layer(full, rank, n)?, &dev)?;
                let st = cuda.runtime().stream().clone();
                let l = TpLayer::new(cuda, comm, full.config(), false)?;
                let step = train_step(&l);
                run_rank(&step, &st, o, (&modes, 1), hidden, Some(&counter))
            }
            Some(ty) => {
                let cuda = CudaLayer::new(full, &dev)?;
                let st = cuda.runtime().stream().clone();
                let l = CpCudaLayer::new(cuda, comm, ty)?;
                let step = cp_train_step(&l);
                run_rank(&step, &st, o, (&modes, c.cp), hidden, Some(&counter))
            }
        })
    };
    run().unwrap_or_else(|e| (Vec::new(), Some(e)))
}

/// Why `n` ranks cannot run here, if they cannot.
fn unavailable(label: &str, n: usize) -> Option<String> {
    if let Some(i) = (0..n).find(|&i| cuda_dev(i).is_err()) {
        return Some(format!("{label}: n/a, needs {n} GPUs (no CUDA device {i})"));
    }
    nccl_version()
        .err()
        .map(|e| format!("{label}: n/a, NCCL unavailable: {e}"))
}

/// Every rank of `c`, one thread each; per rank what it measured, failures as notes.
fn run_config(
    full: &SpecLayer,
    c: Config,
    o: &ParallelOptions,
    dev0: &CudaDevice,
    notes: &mut Vec<String>,
) -> Result<Vec<Vec<Measured>>> {
    let label = c.label();
    let mut per_rank = Vec::new();
    if c.ranks() == 1 {
        let cuda = CudaLayer::new(full, dev0)?;
        let st = cuda.runtime().stream().clone();
        let modes = c.modes(o);
        let (out, err) = run_rank(
            &train_step(&cuda),
            &st,
            o,
            (&modes, 1),
            full.config().hidden,
            None,
        );
        if let Some(e) = err {
            notes.push(format!("{label}: stopped: {e}"));
        }
        per_rank.push(out);
        return Ok(per_rank);
    }
    if let Some(why) = unavailable(&label, c.ranks()) {
        notes.push(why);
        return Ok(per_rank);
    }
    let id = NcclUniqueId::new()?;
    let outs: Vec<RankOut> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..c.ranks())
            .map(|r| {
                let id = &id;
                s.spawn(move || parallel_rank(full, r, c, id, o))
            })
            .collect();
        hs.into_iter()
            .enumerate()
            .map(|(r, h)| {
                h.join().unwrap_or_else(|_| {
                    (
                        Vec::new(),
                        Some(AttnError::BackendUnavailable(format!(
                            "{label} rank {r} thread panicked"
                        ))),
                    )
                })
            })
            .collect()
    });
    for (r, (out, err)) in outs.into_iter().enumerate() {
        if let Some(e) = err {
            notes.push(format!("{label} rank {r}: stopped: {e}"));
        }
        per_rank.push(out);
    }
    Ok(per_rank)
}

/// Time every configuration, mode and length; returns the table (and writes the JSON and
/// SVG).
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
    let configs = o.configs();
    let mut notes = Vec::new();
    let mut rows = Vec::new();
    for c in configs.iter().copied() {
        let per_rank = run_config(&full, c, o, &dev0, &mut notes)?;
        for mode in c.modes(o) {
            for &s in &o.seqlens {
                let got: Vec<_> = per_rank
                    .iter()
                    .map(|v| v.iter().find(|x| x.0 == mode && x.1 == s))
                    .collect();
                let all = !got.is_empty() && got.iter().all(Option::is_some);
                rows.push(ParRow {
                    mode: mode.into(),
                    tokens: s,
                    tp: c.tp,
                    cp: c.cp,
                    cp_comm_type: c.ty.map(|t| t.name().to_string()),
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
    if !note.is_empty() {
        eprintln!("{note}");
    }
    let device = if configs.iter().any(|c| c.ranks() > 1) {
        format!("{} (ranks on GPUs 0..N)", dev0.name)
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
            &format!("attn bench parallel: Llama-3-8B layer, TP and CP scaling ({device})"),
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
            cps: vec![1, 2],
            cp_comm_types: CpCommType::ALL.to_vec(),
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
        let mut o = opts();
        o.cps = vec![4];
        assert!(
            matches!(o.validate(), Err(AttnError::InvalidArgument { arg, .. }) if arg == "--cp")
        );
        let mut o = opts();
        o.cp_comm_types.clear();
        assert!(
            matches!(o.validate(), Err(AttnError::InvalidArgument { arg, .. }) if arg == "--cp-comm-type")
        );
        let mut o = opts();
        o.seqlens = vec![32770];
        assert!(
            matches!(o.validate(), Err(AttnError::InvalidArgument { arg, .. }) if arg == "--seqlens")
        );
        // Without CP = 2 any length and no exchange are fine.
        o.cps = vec![1];
        o.cp_comm_types.clear();
        assert!(o.validate().is_ok());
        // A bad option is the error even here (no GPU in CI): validation comes first.
        let mut o = opts();
        o.tps = vec![3];
        assert!(
            matches!(run_parallel(&o), Err(AttnError::InvalidArgument { arg, .. }) if arg == "--tp")
        );
    }

    #[test]
    fn configurations_in_table_order_cp_trains_too() {
        let mut o = opts();
        o.train = true;
        o.cp_comm_types = vec![CpCommType::A2a, CpCommType::P2p, CpCommType::A2a];
        let c = o.configs();
        let labels: Vec<String> = c.iter().map(Config::label).collect();
        assert_eq!(labels, ["TP = 1", "TP = 2", "CP = 2 a2a", "CP = 2 p2p"]);
        assert_eq!(c[1].modes(&o), vec!["forward", "train"]);
        assert_eq!(c[2].modes(&o), vec!["forward", "train"]);
        assert_eq!(c[3].ranks(), 2);
        // CP = 1 and TP = 1 are the same single-GPU row.
        o.tps = vec![1];
        o.cps = vec![1];
        assert_eq!(o.configs().len(), 1);
    }

    #[test]
    fn train_adds_the_train_mode() {
        assert_eq!(opts().modes(), vec!["forward"]);
        let mut o = opts();
        o.train = true;
        assert_eq!(o.modes(), vec!["forward", "train"]);
    }
}
