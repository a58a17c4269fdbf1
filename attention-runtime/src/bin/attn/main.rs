//! `attn`: run one attention layer from safetensors, list the kernel catalog, render kernels.
//!
//! ```text
//! attn layer --spec "<spec>" --weights W.safetensors [--prefix P] [--names megatron|hf|hf:FAMILY]
//!            --input X.safetensors
//!            [--input-name input] --output O.safetensors [--device cpu|cuda]
//!            [--positions P.safetensors] [--mask-file M.safetensors] [--bias-file B.safetensors]
//!            [--context C.safetensors [--context-name context]]
//! attn backward --spec "<spec>" --weights W.safetensors [--prefix P] --input X.safetensors
//!            [--input-name input] --grad-output G.safetensors --output O.safetensors
//!            [--device cpu|cuda] [--positions P] [--mask-file M] [--bias-file B]
//!            [--context C [--context-name N]] [--delay-wgrad] [--deterministic]
//!            [--recompute none|core_attention]
//! attn catalog
//! attn render --spec "<spec>" [--head-dim D]
//! attn aot --arch sm_90a[,sm_80,...] (--catalog | --spec "<spec>" [--head-dim D]) [--cache-dir DIR] [--list]
//! attn bench prefill|backward|decode|layer [...]                 (GPU; see the `bench` module)
//! ```
//!
//! The flags of `layer` and `backward`, the dtypes each data file takes and how errors name
//! the flags are in the `args` and `data` modules.
//!
//! Built with the `cli` feature of `attention-runtime` (its dependencies, clap, indicatif
//! and tracing-subscriber, stay out of what a library user compiles):
//! `cargo run -p attention-runtime --features cli --bin attn -- ...`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use attention_codegen::{catalog, registry, render};
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{
    AttentionLayer, AttnError, Device, Result, Tensor, WeightNames, WeightStore,
};
use clap::{Parser, Subcommand};

mod args;
mod bench;
mod data;

use args::{BackwardArgs, LayerArgs};

#[derive(Parser)]
#[command(
    name = "attn",
    version,
    about = "Attention layers from a one-line spec"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Precompile kernels into the on-disk kernel cache, so a deploy never runs NVRTC.
    Aot(AotArgs),
    /// Run one layer's forward on weights stored under Megatron-Core or Hugging Face names.
    ///
    /// Writes `output` `[s, b, h]` and, when the layer has one, `output_bias` `[h]` (not added to
    /// the output, as the reference system returns it), both f32.
    Layer(Box<LayerArgs>),
    /// Run one layer's forward and backward (training) on the CPU reference or, with
    /// `--device cuda`, the GPU (mask tensors and bias included).
    ///
    /// Writes f32 tensors: `output` `[s, b, h]`, `output_bias` `[h]` (when the layer has one),
    /// `grad_input` `[s, b, h]`, `grad.<name>` for every parameter that gets a gradient
    /// (`<name>` the Megatron name without the prefix, e.g. `grad.linear_qkv.weight`;
    /// `linear_proj.bias` gets none: it is returned unadded), `grad_key_value_states`
    /// (cross-attention) and `grad_attention_bias` (with --bias-file).
    Backward(Box<BackwardArgs>),
    /// List the catalog's models and kernels.
    Catalog,
    /// Benchmarks (GPU): `attn bench prefill|backward|decode|layer` (see `attn bench --help`).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Print the rendered kernel sources for one spec.
    Render {
        /// The spec, in the `#[attention]` grammar.
        #[arg(long)]
        spec: String,
        /// Head dim, when the spec leaves it out (or to pick one of the spec's head dims).
        #[arg(long)]
        head_dim: Option<usize>,
    },
}

fn io_err(path: &Path, source: std::io::Error) -> AttnError {
    AttnError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The layer of `--spec`, the dimension flags and `--weights` (Megatron or Hugging Face
/// names), with the flags named in its errors.
fn load_layer(
    spec: &str,
    dims: &args::DimArgs,
    weights: &Path,
    prefix: &str,
    names: WeightNames,
) -> Result<SpecLayer> {
    let config = SpecLayer::config_from_str(spec, &dims.into()).map_err(data::relabel_config)?;
    let weights =
        WeightStore::from_file(weights).map_err(|e| data::relabel_file(e, "--weights"))?;
    let (layer, hf) = SpecLayer::load_named(config, &weights, prefix, names)
        .map_err(|e| data::relabel_file(e, "--weights"))?;
    if let Some(layout) = hf {
        eprintln!("attn: weights: {layout}");
    }
    Ok(layer)
}

/// Write `tensors` to the file `--output` gives.
fn save_output(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    WeightStore::save(path, tensors).map_err(|e| data::relabel_file(e, "--output"))?;
    eprintln!("attn: wrote {}", path.display());
    Ok(())
}

fn run_layer(a: &LayerArgs) -> Result<()> {
    a.data.check()?;
    let device = args::open_device(&a.device)?;
    eprintln!("attn: running on the {device}");
    let layer = load_layer(&a.spec, &a.dims, &a.weights, &a.prefix, a.names)?;
    let data = a.data.read()?;
    let args = data.forward_args();
    let out = match &device {
        Device::Cuda(d) => {
            attention_runtime::cuda::CudaLayer::new(&layer, d)?.forward(&data.input, &args)
        }
        Device::Cpu => layer.forward(&data.input, &args),
    }
    .map_err(|e| data.labels.relabel(e))?;
    let mut tensors = vec![("output".to_string(), out.output)];
    if let Some(b) = out.bias {
        tensors.push(("output_bias".to_string(), b));
    }
    save_output(&a.output, &tensors)
}

fn run_backward(a: &BackwardArgs) -> Result<()> {
    use attention_runtime::train::{Recompute, TrainOptions};
    a.data.check()?;
    // The device first (a missing GPU is a typed error before any file is read).
    let device = args::open_device(&a.device)?;
    let recompute = match a.recompute.as_str() {
        "none" => Recompute::None,
        "core_attention" => Recompute::CoreAttention,
        other => {
            return Err(AttnError::InvalidArgument {
                arg: "--recompute".into(),
                expected: "none or core_attention".into(),
                got: other.into(),
            })
        }
    };
    eprintln!("attn: running on the {device}");
    let layer = load_layer(
        &a.spec,
        &a.dims,
        &a.weights,
        &a.prefix,
        WeightNames::Megatron,
    )?;
    let mut data = a.data.read()?;
    let grad_src = data::Source {
        flag: "--grad-output",
        path: &a.grad_output,
        name: "grad_output",
    };
    data.labels.add("grad_output", grad_src.label());
    let grad_output = data::read_float(grad_src)?;
    let output_bias = layer.parts().output_bias().cloned();
    let topts = TrainOptions { recompute };
    let (output, grads) = train_step(a, &device, layer, &data, &grad_output, &topts)
        .map_err(|e| data.labels.relabel(e))?;
    let mut tensors = vec![("output".to_string(), output)];
    if let Some(b) = output_bias {
        tensors.push(("output_bias".to_string(), b));
    }
    tensors.push(("grad_input".to_string(), grads.grad_input));
    if let Some(g) = grads.grad_key_value_states {
        tensors.push(("grad_key_value_states".to_string(), g));
    }
    if let Some(g) = grads.grad_attention_bias {
        tensors.push(("grad_attention_bias".to_string(), g));
    }
    tensors.extend(
        grads
            .params
            .into_iter()
            .map(|(k, t)| (format!("grad.{k}"), t)),
    );
    save_output(&a.output, &tensors)
}

/// `forward_train`, then `backward` (and `backward_dw` with `--delay-wgrad`) on `device`;
/// the output and every gradient come back as host f32 tensors.
fn train_step(
    a: &BackwardArgs,
    device: &Device,
    layer: SpecLayer,
    data: &args::Data,
    grad_output: &Tensor,
    topts: &attention_runtime::train::TrainOptions,
) -> Result<(Tensor, attention_runtime::train::LayerGrads<Tensor>)> {
    use attention_runtime::backend::{CpuLayer, TrainLayer};
    use attention_runtime::train::BackwardOptions;
    let args = data.forward_args();
    let opts = BackwardOptions {
        delay_wgrad: a.delay_wgrad,
        want_bias_grad: data.bias.is_some(),
        deterministic: a.deterministic,
    };
    match device {
        Device::Cpu => {
            let cpu = CpuLayer::new(layer);
            let (output, mut saved) = cpu.forward_train(&data.input, &args, topts)?;
            let mut grads = cpu.backward(&mut saved, grad_output, &opts)?;
            if a.delay_wgrad {
                grads.params.extend(cpu.backward_dw(&mut saved)?);
            }
            Ok((output, grads))
        }
        Device::Cuda(d) => {
            // The layer's dtype on the GPU; every result comes back as f32.
            use attention_runtime::backend::{Backend, BackendLayer};
            let gpu = attention_runtime::cuda::CudaLayer::new(&layer, d)?;
            let be = gpu.backend();
            let x = be.upload(&data.input)?;
            let dy = be.upload(grad_output)?;
            let (y, mut saved) = gpu.forward_train(&x, &args, topts)?;
            let mut g = gpu.backward(&mut saved, &dy, &opts)?;
            if a.delay_wgrad {
                g.params.extend(gpu.backward_dw(&mut saved)?);
            }
            let host = |t: &attention_runtime::cuda::DeviceTensor| be.download(t);
            let grads = attention_runtime::train::LayerGrads {
                grad_input: host(&g.grad_input)?,
                grad_key_value_states: g.grad_key_value_states.as_ref().map(host).transpose()?,
                grad_attention_bias: g.grad_attention_bias.as_ref().map(host).transpose()?,
                params: g
                    .params
                    .iter()
                    .map(|(k, t)| Ok((k.clone(), host(t)?)))
                    .collect::<Result<_>>()?,
            };
            Ok((host(&y)?, grads))
        }
    }
}

/// Write to stdout; a closed pipe (`attn catalog | head`) ends the output quietly.
fn emit(out: &mut impl Write, text: std::fmt::Arguments<'_>) -> Result<()> {
    match out.write_fmt(text).and_then(|_| out.write_all(b"\n")) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(AttnError::Io {
            path: "<stdout>".into(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn run_catalog() -> Result<()> {
    let mut out = std::io::stdout().lock();
    for entry in catalog::catalog() {
        emit(&mut out, format_args!("{:<20} {}", entry.name, entry.spec))?;
    }
    let users = catalog::catalog_users().map_err(|e| AttnError::Render(e.to_string()))?;
    emit(
        &mut out,
        format_args!("\n{} kernels (key, models):", users.len()),
    )?;
    for (key, models) in users {
        emit(&mut out, format_args!("  {key:<56} {}", models.join(", ")))?;
    }
    Ok(())
}

fn run_render(spec: &str, head_dim: Option<usize>) -> Result<()> {
    let spec = attention_codegen::parse_spec(spec)?;
    let kernels = match pick_head_dim(&spec, head_dim)? {
        Some(hd) => render::kernels_for_spec_with_head_dim(&spec, hd),
        None => render::kernels_for_spec(&spec),
    }
    .map_err(|e| AttnError::Render(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    for k in kernels {
        emit(
            &mut out,
            format_args!("// ===== {} =====\n{}", k.key, k.source),
        )?;
    }
    Ok(())
}

/// The head dim `--head-dim` picks for `spec` (`render`, `aot`): `None` for every head dim
/// the spec lists.
///
/// Errors: [`AttnError::InvalidArgument`] naming `--head-dim` when the spec lists no head dim
/// and the flag is missing, or the flag names one the spec does not list.
fn pick_head_dim(
    spec: &attention_codegen::AttentionSpec,
    head_dim: Option<usize>,
) -> Result<Option<usize>> {
    match head_dim {
        None if spec.head_dims.is_empty() => Err(AttnError::InvalidArgument {
            arg: "--head-dim".into(),
            expected: "a head dim, since the spec leaves head_dim out".into(),
            got: "nothing".into(),
        }),
        Some(hd) if !spec.head_dims.is_empty() && !spec.head_dims.contains(&hd) => {
            Err(AttnError::InvalidArgument {
                arg: "--head-dim".into(),
                expected: format!("one of the spec's head dims {:?}", spec.head_dims),
                got: hd.to_string(),
            })
        }
        hd => Ok(hd),
    }
}

/// Arguments of `attn aot`.
#[derive(clap::Args)]
struct AotArgs {
    /// Target architectures, comma-separated, e.g. `sm_90a,sm_80`.
    #[arg(long, value_delimiter = ',', required = true)]
    arch: Vec<String>,
    /// Precompile every kernel of the catalog.
    #[arg(long, conflicts_with_all = ["spec", "head_dim"], required_unless_present = "spec")]
    catalog: bool,
    /// Precompile the kernels of this spec (the `#[attention]` grammar).
    #[arg(long)]
    spec: Option<String>,
    /// Head dim, when the spec leaves it out (or to pick one of the spec's head dims).
    #[arg(long, requires = "spec")]
    head_dim: Option<usize>,
    /// Print `<arch> <kernel key>` for every kernel it would compile (the kernel registry's
    /// list for each arch) and exit, compiling nothing.
    #[arg(long)]
    list: bool,
    /// Cache directory; default `ATTN_CACHE_DIR`, else the user's cache dir
    /// (on Linux `$XDG_CACHE_HOME` or `~/.cache`) + `/attention-kernels`.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

/// The registry's kernel configs `attn aot` compiles for one target: the catalog's, or the
/// spec's for its head dims (or `--head-dim`).
fn aot_configs(a: &AotArgs, target: registry::Target) -> Result<Vec<render::KernelConfig>> {
    let configs = match &a.spec {
        None => catalog::catalog_configs(target),
        Some(s) => {
            let spec = attention_codegen::parse_spec(s)?;
            match pick_head_dim(&spec, a.head_dim)? {
                Some(hd) => registry::kernels_for(&spec, hd, target),
                None => registry::kernels_for_spec_head_dims(&spec, target),
            }
        }
    };
    configs.map_err(|e| AttnError::Render(e.to_string()))
}

fn aot_jit_err(e: attention_runtime::jit::JitError) -> AttnError {
    AttnError::Jit(e)
}

/// `attn aot`: compile, for each arch, the kernel registry's kernels for that arch
/// ([`registry::kernels_for`]: exactly those the runtime can launch there) into the on-disk
/// kernel cache (in parallel, one worker per core), with a progress bar on stderr and a one-line summary on stdout. `ATTN_JIT` is
/// ignored: compiling is the point.
fn run_aot(a: &AotArgs) -> Result<()> {
    use attention_runtime::kernel_cache::{CacheConfig, CacheOrigin, KernelCache};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    // Per arch, the registry's kernels for that device (the `prefill_*_sm80` kernel only where
    // the runtime would launch it), each rendered once.
    let mut kernels: Vec<render::KernelSource> = Vec::new();
    let mut jobs_idx: Vec<(usize, &str)> = Vec::new();
    for arch in &a.arch {
        let target =
            registry::Target::from_arch(arch).map_err(|e| AttnError::Render(e.to_string()))?;
        for c in aot_configs(a, target)? {
            let key = c.key();
            let i = match kernels.iter().position(|k| k.key == key) {
                Some(i) => i,
                None => {
                    kernels.push(c.render().map_err(|e| AttnError::Render(e.to_string()))?);
                    kernels.len() - 1
                }
            };
            jobs_idx.push((i, arch.as_str()));
        }
    }
    if a.list {
        let mut out = std::io::stdout().lock();
        for &(i, arch) in &jobs_idx {
            emit(&mut out, format_args!("{arch} {}", kernels[i].key))?;
        }
        return Ok(());
    }
    let dir = a
        .cache_dir
        .clone()
        .or_else(CacheConfig::default_dir)
        .ok_or_else(|| AttnError::InvalidArgument {
            arg: "--cache-dir".into(),
            expected: "a cache directory (or ATTN_CACHE_DIR, XDG_CACHE_HOME or HOME set)".into(),
            got: "nothing".into(),
        })?;
    // Fail early, with the OS error, when the directory cannot be written.
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    tempfile::NamedTempFile::new_in(&dir).map_err(|e| io_err(&dir, e))?;

    let config = CacheConfig::new(Some(dir.clone()));
    if config.nvrtc_version.is_none() {
        return Err(aot_jit_err(attention_runtime::jit::JitError::NvrtcNotFound));
    }
    let cache = KernelCache::new(config);
    let jobs: Vec<(&render::KernelSource, &str)> = jobs_idx
        .iter()
        .map(|&(i, arch)| (&kernels[i], arch))
        .collect();
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(jobs.len() as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {elapsed} {wide_msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let start = std::time::Instant::now();
    let next = AtomicUsize::new(0);
    let (compiled, cached) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let first_err: Mutex<Option<attention_runtime::jit::JitError>> = Mutex::new(None);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(k, arch)) = jobs.get(i) else { break };
                if first_err.lock().map_or(true, |e| e.is_some()) {
                    break;
                }
                bar.set_message(format!("{} {arch}", k.key));
                match cache.lookup(&k.key, &k.source, arch) {
                    Ok((_, CacheOrigin::Compiled)) => compiled.fetch_add(1, Ordering::Relaxed),
                    Ok(_) => cached.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        if let Ok(mut slot) = first_err.lock() {
                            slot.get_or_insert(e);
                        }
                        break;
                    }
                };
                bar.inc(1);
            });
        }
    });
    bar.finish_and_clear();
    if let Some(e) = first_err.into_inner().ok().flatten() {
        return Err(aot_jit_err(e));
    }
    let stats = cache.stats();
    if stats.memory_only {
        return Err(io_err(
            &dir,
            std::io::Error::other("writing a kernel cache entry failed (see the warning log)"),
        ));
    }
    let mut out = std::io::stdout().lock();
    emit(
        &mut out,
        format_args!(
            "aot: kernels={} jobs={} archs={} ({}) compiled={} already_cached={} \
             corrupt_replaced={} compile_ms={:.0} wall_ms={:.0} dir={}",
            kernels.len(),
            jobs.len(),
            a.arch.len(),
            a.arch.join(","),
            compiled.into_inner(),
            cached.into_inner(),
            stats.corrupt_entries,
            stats.compile_ms,
            start.elapsed().as_secs_f64() * 1e3,
            dir.display()
        ),
    )
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Aot(a) => run_aot(a),
        Command::Layer(a) => run_layer(a),
        Command::Backward(a) => run_backward(a),
        Command::Catalog => run_catalog(),
        Command::Bench(b) => bench::run(b),
        Command::Render { spec, head_dim } => run_render(spec, *head_dim),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("attn: error: {e}");
            ExitCode::FAILURE
        }
    }
}
