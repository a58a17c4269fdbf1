//! `attn bench prefill|backward|decode|layer|parallel`: GPU benchmarks of the library's kernels against PyTorch SDPA.
//!
//! - [`prefill`]: the `prefill_*_sm80` kernel over head dims x causal x seqlens (TFLOP/s), plus the
//!   kernel cache's cold compile and warm start; its results in [`prefill_report`].
//! - [`backward`]: the attention backward (preprocess + dK/dV + dQ) against SDPA flash and
//!   cuDNN backward on the prefill bench's shapes (TFLOP/s at 2.5 x forward FLOPs); its
//!   results in [`backward_report`]; with `--layer`, [`backward_layer`]: the layer's training
//!   step (forward + backward) against the same layer in PyTorch (autograd).
//! - [`decode`]: the fused decode step over contexts x batches (GB/s), next to the card's copy
//!   bandwidth; its results in [`decode_report`].
//! - [`layer`]: the whole layer through the public API against the same layer in PyTorch;
//!   its results in [`layer_report`]; per-call kernel times and API overhead from an Nsight
//!   Compute profile of a [`profile`] run in [`ncu`].
//! - [`parallel`]: the Llama-3-8B layer on one GPU, tensor-parallel (TP = 2) and
//!   context-parallel (CP = 2, each `cp_comm_type`; with `--train` also the training step) on two over NCCL, one thread
//!   per GPU, at 32k-128k tokens: time, speedup, scaling efficiency and the bytes each rank
//!   communicates (counted by [`parallel_count`] around the communicator); its results in
//!   [`parallel_report`].
//! - [`chart`]: the SVG chart every bench writes beside its JSON.
//! - [`common`]: CUDA timing helpers and the reports' JSON, shared by all.
//!
//! Part of the CLI, not of the library: it needs only the library's public API.

mod backward;
mod backward_layer;
mod backward_report;
mod chart;
mod common;
mod decode;
mod decode_report;
mod layer;
mod layer_report;
mod ncu;
mod parallel;
mod parallel_count;
mod parallel_report;
mod prefill;
mod prefill_report;
mod profile;
mod read_ceiling;

use clap::Subcommand;

use attention_runtime::{AttnError, Result};

/// `attn bench` subcommands.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time the `prefill_*_sm80` kernel against PyTorch SDPA (flash, cuDNN) on the same shapes:
    /// head dims x causal/non-causal x seqlens at a fixed token count, bf16, CUDA events,
    /// median after warm-up, inputs rotated beyond L2. Prints a ratio table.
    Prefill(BenchPrefillArgs),
    /// Time the attention backward (D preprocess + dK/dV + dQ, given the forward's O and LSE,
    /// computed untimed) against PyTorch SDPA's flash and cuDNN backward on the same shapes:
    /// head dims x causal/non-causal x seqlens at a fixed token count, bf16, CUDA events,
    /// median after warm-up, inputs rotated beyond L2. TFLOP/s at 2.5 x the forward's FLOPs.
    /// With --layer: the whole layer's training step (forward_train + backward on device
    /// tensors) against the PyTorch layer of bench_layer.py under autograd (SDPA flash, cuDNN).
    Backward(BenchBackwardArgs),
    /// Time the fused decode step (decode_splitkv: rope + KV append + split-KV attention + combine)
    /// against PyTorch SDPA's flash backend: bf16, one new token per sequence over a filled
    /// cache, contexts x batches, GB/s of the K/V read once, CUDA events, median after
    /// warm-up, caches rotated beyond L2, plus the card's device-to-device copy bandwidth.
    Decode(BenchDecodeArgs),
    /// Time the whole layer as users call it (device tensors: forward, prefill over a static
    /// cache and a paged pool, a chunk after cached tokens through both, eager and graph
    /// decode steps; Llama-3-8B and a head-dim-64 layer by default) against the same layer
    /// in PyTorch (SDPA flash and cuDNN) in the same run; with an Nsight Compute profile
    /// (--profile-once, then --ncu-csv), each call's overhead over its kernels.
    Layer(Box<BenchLayerArgs>),
    /// Time the Llama-3-8B layer (bf16, one causal sequence) on one GPU (TP = CP = 1),
    /// tensor-parallel (TP = 2) and context-parallel (CP = 2, each --cp-comm-type, forward
    /// only) over NCCL on GPUs 0 and 1 (one thread per rank), CUDA events, median per rank
    /// after warm-up, the slowest rank reported: time, speedup over one GPU, scaling
    /// efficiency (speedup / (TP x CP)) and the bytes each rank communicates per call
    /// (counted around the communicator). With fewer than 2 GPUs or no libnccl the 2-GPU
    /// rows are n/a with a note.
    Parallel(BenchParallelArgs),
}

/// Options of `attn bench parallel` (see [`parallel`]).
#[derive(clap::Args)]
pub struct BenchParallelArgs {
    /// Sequence lengths (one sequence each), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "32768,65536,131072")]
    seqlens: Vec<usize>,
    /// Tensor-parallel sizes, comma separated (1 and/or 2; rank r on GPU r).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    tp: Vec<usize>,
    /// Context-parallel sizes, comma separated (1 and/or 2; rank r on GPU r; CP = 1 is the
    /// TP = 1 row).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    cp: Vec<usize>,
    /// The context-parallel exchanges timed at CP = 2, comma separated (p2p, all_gather,
    /// a2a).
    #[arg(long, value_delimiter = ',', default_value = "p2p,all_gather,a2a")]
    cp_comm_type: Vec<String>,
    /// Also time the training step (forward_train + backward).
    #[arg(long)]
    train: bool,
    /// Untimed calls before each case.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed calls per case (median per rank).
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Write the JSON report here, and the SVG chart beside it (same name, `.svg`).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// Options of `attn bench layer` (see [`layer`]).
#[derive(clap::Args)]
pub struct BenchLayerArgs {
    /// Layer shapes, comma separated: `llama3-8b` (hidden 4096, 32 heads x 128, 8 groups),
    /// `llama3.2-1b` or `hd64` (hidden 2048, 32 heads x 64, 8 groups), `custom` (the
    /// --hidden/--heads/--groups/--head-dim below).
    #[arg(long, value_delimiter = ',', default_value = "llama3-8b,llama3.2-1b")]
    presets: Vec<String>,
    /// Which calls to time, comma separated: prefill (from empty: forward, static cache),
    /// chunk (after cached tokens, static cache), paged (the paged-pool variants of both),
    /// decode (eager and graph steps), or all.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    cases: Vec<String>,
    /// Hidden size of the `custom` preset (default 4096; only with `custom` in --presets).
    #[arg(long)]
    hidden: Option<usize>,
    /// Query heads of the `custom` preset (default 32; only with `custom` in --presets).
    #[arg(long)]
    heads: Option<usize>,
    /// KV groups of the `custom` preset (default 8; only with `custom` in --presets).
    #[arg(long)]
    groups: Option<usize>,
    /// Head dim of the `custom` preset (default 128; only with `custom` in --presets).
    #[arg(long)]
    head_dim: Option<usize>,
    /// Prefill lengths (one sequence), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "2048,8192,16384")]
    seqlens: Vec<usize>,
    /// Tokens of the chunk prefilled after `--ctx-before` cached tokens (0 = skip).
    #[arg(long, default_value_t = 2048)]
    chunk: usize,
    /// Cached tokens before the chunk.
    #[arg(long, default_value_t = 6144)]
    ctx_before: usize,
    /// Block size of the paged pool (a power of two >= 16).
    #[arg(long, default_value_t = 64)]
    block_size: usize,
    /// Decode batches, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,128")]
    batches: Vec<usize>,
    /// Decode contexts (cached tokens per sequence), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "8192,32768")]
    contexts: Vec<usize>,
    /// Skip (with a note) decode shapes whose K+V cache exceeds this many bytes (suffixes
    /// K, M, G, T: powers of 1024).
    #[arg(long, default_value = "24G", value_parser = layer_report::parse_bytes)]
    max_cache_bytes: usize,
    /// Untimed calls before each case.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Timed calls per case (median, or mean of queued decode steps).
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// The PyTorch layer script (`none` to skip).
    #[arg(long, default_value = "scripts/bench_layer.py")]
    torch_script: String,
    /// Write the JSON report here, and the SVG chart beside it (same name, `.svg`).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Profile mode (run under Nsight Compute with --profile-from-start off): each call
    /// once after its warm-up, in a profiler window opened by a marker kernel; the case
    /// names go to this file. No timing, no PyTorch. See scripts/bench-all.sh.
    #[arg(long, value_name = "MANIFEST")]
    profile_once: Option<std::path::PathBuf>,
    /// `ncu --csv` output of a --profile-once run (`ncu --import R.ncu-rep --csv`): report
    /// each call's kernel sum and its overhead `(call - kernels) / call`. Needs
    /// --ncu-manifest.
    #[arg(long, requires = "ncu_manifest")]
    ncu_csv: Option<std::path::PathBuf>,
    /// The manifest that --profile-once wrote for --ncu-csv.
    #[arg(long, requires = "ncu_csv")]
    ncu_manifest: Option<std::path::PathBuf>,
}

#[derive(clap::Args)]
pub struct BenchDecodeArgs {
    /// Write the JSON report here, and the SVG chart beside it (same name, `.svg`).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Cached tokens per sequence, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "8192,32768")]
    contexts: Vec<usize>,
    /// Sequences per step, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    batches: Vec<usize>,
    /// Query heads.
    #[arg(long, default_value_t = 32)]
    heads: usize,
    /// KV groups.
    #[arg(long, default_value_t = 8)]
    groups: usize,
    /// Head dim.
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// Skip shapes whose K+V cache exceeds this many GiB.
    #[arg(long, default_value_t = 8)]
    max_cache_gib: usize,
    /// Timed steps per shape (median reported).
    #[arg(long, default_value_t = 50)]
    reps: usize,
    /// The SDPA baseline script (`none` to skip).
    #[arg(long, default_value = "scripts/bench_sdpa.py")]
    sdpa_script: String,
    /// Pool block sizes of the paged decode rows timed beside the static step (the paged
    /// batch's split-KV decode kernel over a shuffled block table), comma separated; empty
    /// to skip.
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    paged_block_sizes: Vec<usize>,
    /// Also time the static step at each of these KV split counts (1-128, comma
    /// separated; rows `decode_splitkv_s<N>` in a sweep table), to check the automatic
    /// choice.
    #[arg(long, value_delimiter = ',')]
    split_sweep: Vec<usize>,
    /// Also time multi-token steps of these new-token counts (2-16, comma separated; rows
    /// `decode_splitkv_t<T>` in their own table, against the one-token step and the read
    /// ceiling).
    #[arg(long, value_delimiter = ',')]
    tokens: Vec<usize>,
}

#[derive(clap::Args)]
pub struct BenchPrefillArgs {
    /// Write the JSON report here, and the SVG chart beside it (same name, `.svg`).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Head dims, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "64,128,256")]
    head_dims: Vec<usize>,
    /// Sequence lengths, comma separated (each divides --total-tokens).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "512,1024,2048,4096,8192,16384"
    )]
    seqlens: Vec<usize>,
    /// Tokens per launch (batch = total / seqlen).
    #[arg(long, default_value_t = 16384)]
    total_tokens: usize,
    /// Timed launches per shape (median reported).
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Extra tiles to time, `<head_dim>:m<M>n<N>w<warps>s<stages>`, comma separated;
    /// `<head_dim>:sm90:<tile>` times a Hopper-kernel tile (where this GPU runs it).
    #[arg(long, value_delimiter = ',')]
    tiles: Vec<String>,
    /// The SDPA baseline script (`none` to skip).
    #[arg(long, default_value = "scripts/bench_sdpa.py")]
    sdpa_script: String,
}

impl BenchLayerArgs {
    /// The `custom` preset of --hidden, --heads, --groups and --head-dim (each defaulted).
    ///
    /// Errors: [`AttnError::InvalidArgument`] naming the first of those flags given when
    /// --presets has no `custom` (the flag would be ignored).
    fn custom_shape(&self) -> Result<layer_report::LayerShape> {
        let dims = [
            ("--hidden", self.hidden),
            ("--heads", self.heads),
            ("--groups", self.groups),
            ("--head-dim", self.head_dim),
        ];
        if !self.presets.iter().any(|p| p == "custom") {
            if let Some((flag, Some(v))) = dims.iter().find(|(_, v)| v.is_some()) {
                return Err(AttnError::InvalidArgument {
                    arg: (*flag).into(),
                    expected: "`custom` in --presets (the flag sets the custom preset's shape)"
                        .into(),
                    got: format!("{flag} {v} with --presets {}", self.presets.join(",")),
                });
            }
        }
        let (hidden, heads) = (self.hidden.unwrap_or(4096), self.heads.unwrap_or(32));
        let (groups, head_dim) = (self.groups.unwrap_or(8), self.head_dim.unwrap_or(128));
        Ok(layer_report::LayerShape {
            name: format!("h{hidden}-{heads}x{head_dim}-g{groups}"),
            hidden,
            heads,
            groups,
            head_dim,
        })
    }
}

#[derive(clap::Args)]
pub struct BenchBackwardArgs {
    /// Write the JSON report here, and the SVG chart beside it (same name, `.svg`).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Head dims, comma separated (each divides --hidden). Not with --layer.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "64,128,256",
        conflicts_with = "layer"
    )]
    head_dims: Vec<usize>,
    /// Sequence lengths, comma separated (each divides --total-tokens). Not with --layer
    /// (see --layer-seqlens).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "2048,4096,8192,16384",
        conflicts_with = "layer"
    )]
    seqlens: Vec<usize>,
    /// Tokens per launch (batch = total / seqlen). Not with --layer.
    #[arg(long, default_value_t = 16384, conflicts_with = "layer")]
    total_tokens: usize,
    /// Model width: heads = hidden / head_dim. Not with --layer.
    #[arg(long, default_value_t = 2048, conflicts_with = "layer")]
    hidden: usize,
    /// Timed launches per shape (median reported).
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Untimed launches per shape first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// The SDPA baseline script, run with `--mode backward` (`none` to skip). Not with
    /// --layer (see --torch-script).
    #[arg(
        long,
        default_value = "scripts/bench_sdpa.py",
        conflicts_with = "layer"
    )]
    sdpa_script: String,
    /// Time the layer's training step (forward + backward) instead of the kernels.
    #[arg(long)]
    layer: bool,
    /// --layer: layer presets, comma separated (`llama3-8b`, `llama3.2-1b` or `hd64`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "llama3-8b",
        requires = "layer"
    )]
    presets: Vec<String>,
    /// --layer: sequence lengths (one sequence each), comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "2048,8192",
        requires = "layer"
    )]
    layer_seqlens: Vec<usize>,
    /// --layer: the PyTorch layer script, run with `--train-seqlens` (`none` to skip).
    #[arg(long, default_value = "scripts/bench_layer.py", requires = "layer")]
    torch_script: String,
}

/// Run one `attn bench` subcommand and print its table.
pub fn run(cmd: &BenchCommand) -> Result<()> {
    let a = match cmd {
        BenchCommand::Prefill(a) => a,
        BenchCommand::Backward(b) if b.layer => {
            let shapes = b
                .presets
                .iter()
                .map(|p| {
                    layer_report::LayerShape::preset(p).ok_or_else(|| AttnError::InvalidArgument {
                        arg: "--presets".into(),
                        expected: "llama3-8b, llama3.2-1b (hd64)".into(),
                        got: p.clone(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let opts = backward_layer::TrainStepOptions {
                shapes,
                seqlens: b.layer_seqlens.clone(),
                warmup: b.warmup,
                reps: b.reps,
                torch_script: (b.torch_script != "none").then(|| b.torch_script.clone().into()),
                json: b.json.clone(),
            };
            println!("{}", backward_layer::run_train_step(&opts)?);
            return Ok(());
        }
        BenchCommand::Backward(b) => {
            let opts = backward::BackwardOptions {
                head_dims: b.head_dims.clone(),
                seqlens: b.seqlens.clone(),
                total_tokens: b.total_tokens,
                hidden: b.hidden,
                reps: b.reps,
                warmup: b.warmup,
                sdpa_script: (b.sdpa_script != "none").then(|| b.sdpa_script.clone().into()),
                json: b.json.clone(),
            };
            println!("{}", backward::run_backward(&opts)?);
            return Ok(());
        }
        BenchCommand::Layer(l) => {
            let custom = l.custom_shape()?;
            let mut shapes = Vec::new();
            for p in &l.presets {
                let shape = match p.as_str() {
                    "custom" => custom.clone(),
                    name => layer_report::LayerShape::preset(name).ok_or_else(|| {
                        AttnError::InvalidArgument {
                            arg: "--presets".into(),
                            expected: "llama3-8b, llama3.2-1b (hd64) or custom".into(),
                            got: name.into(),
                        }
                    })?,
                };
                shapes.push(shape);
            }
            let opts = layer::LayerOptions {
                shapes,
                cases: layer::Cases::parse(&l.cases)?,
                seqlens: l.seqlens.clone(),
                chunk: l.chunk,
                ctx_before: l.ctx_before,
                block_size: l.block_size,
                batches: l.batches.clone(),
                contexts: l.contexts.clone(),
                max_cache_bytes: l.max_cache_bytes,
                warmup: l.warmup,
                reps: l.reps,
                torch_script: (l.torch_script != "none").then(|| l.torch_script.clone().into()),
                json: l.json.clone(),
                profile_once: l.profile_once.clone(),
                ncu: l.ncu_csv.clone().zip(l.ncu_manifest.clone()),
            };
            println!("{}", layer::run_layer(&opts)?);
            return Ok(());
        }
        BenchCommand::Parallel(p) => {
            let opts = parallel::ParallelOptions {
                seqlens: p.seqlens.clone(),
                tps: p.tp.clone(),
                cps: p.cp.clone(),
                cp_comm_types: p
                    .cp_comm_type
                    .iter()
                    .map(|t| t.parse())
                    .collect::<attention_runtime::Result<_>>()?,
                train: p.train,
                warmup: p.warmup,
                reps: p.reps,
                json: p.json.clone(),
            };
            println!("{}", parallel::run_parallel(&opts)?);
            return Ok(());
        }
        BenchCommand::Decode(d) => {
            let opts = decode::DecodeOptions {
                contexts: d.contexts.clone(),
                batches: d.batches.clone(),
                heads: d.heads,
                groups: d.groups,
                head_dim: d.head_dim,
                max_cache_bytes: d.max_cache_gib << 30,
                reps: d.reps,
                sdpa_script: (d.sdpa_script != "none").then(|| d.sdpa_script.clone().into()),
                json: d.json.clone(),
                paged_block_sizes: d.paged_block_sizes.clone(),
                split_sweep: d.split_sweep.clone(),
                tokens: d.tokens.clone(),
                ..Default::default()
            };
            println!("{}", decode::run_decode(&opts)?);
            return Ok(());
        }
    };
    let mut extra = Vec::new();
    let mut extra_sm90 = Vec::new();
    for t in &a.tiles {
        let (hd, tile) = t
            .split_once(':')
            .ok_or_else(|| AttnError::InvalidArgument {
                arg: "--tiles".into(),
                expected: "<head_dim>:[sm90:]m<M>n<N>w<warps>s<stages>".into(),
                got: t.clone(),
            })?;
        let hd = hd
            .parse::<usize>()
            .map_err(|_| AttnError::InvalidArgument {
                arg: "--tiles".into(),
                expected: "a head dim before ':'".into(),
                got: t.clone(),
            })?;
        match tile.strip_prefix("sm90:") {
            Some(t) => extra_sm90.push((hd, prefill::parse_tile(t)?)),
            None => extra.push((hd, prefill::parse_tile(tile)?)),
        }
    }
    let opts = prefill::PrefillOptions {
        head_dims: a.head_dims.clone(),
        seqlens: a.seqlens.clone(),
        total_tokens: a.total_tokens,
        reps: a.reps,
        extra_tiles: extra,
        extra_tiles_sm90: extra_sm90,
        sdpa_script: (a.sdpa_script != "none").then(|| a.sdpa_script.clone().into()),
        json: a.json.clone(),
        ..Default::default()
    };
    let table = prefill::run_prefill(&opts)?;
    println!("{table}");
    Ok(())
}
