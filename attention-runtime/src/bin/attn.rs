//! `attn`: run one attention layer from safetensors, list the kernel catalog, render kernels.
//!
//! ```text
//! attn layer --spec "<spec>" --weights W.safetensors [--prefix P] --input X.safetensors
//!            [--input-name input] --output O.safetensors [--device cpu|cuda]
//!            [--positions P.safetensors] [--mask-file M.safetensors] [--context C.safetensors]
//! attn catalog
//! attn render --spec "<spec>" [--head-dim D]
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use attention_codegen::{catalog, render};
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{
    AttentionLayer, AttnError, Device, ForwardArgs, Result, RuntimeDims, Tensor, WeightStore,
};
use clap::{Parser, Subcommand};
use safetensors::{Dtype, SafeTensors};

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
    /// Run one layer's forward on weights stored under Megatron-Core names.
    ///
    /// Writes `output` [s, b, h] and, when the layer has one, `output_bias` [h] (not added to
    /// the output, as the reference system returns it), both f32.
    Layer(Box<LayerArgs>),
    /// List the catalog's models and kernels.
    Catalog,
    /// Print the rendered kernel sources for one spec.
    Render {
        /// The spec, in the `#[attention]` grammar.
        #[arg(long)]
        spec: String,
        /// Head dim, when the spec leaves it out.
        #[arg(long)]
        head_dim: Option<usize>,
    },
}

#[derive(clap::Args)]
struct LayerArgs {
    /// The spec, in the `#[attention]` grammar.
    #[arg(long)]
    spec: String,
    /// safetensors file with the layer's weights.
    #[arg(long)]
    weights: PathBuf,
    /// Prefix of the weight names, e.g. `decoder.layers.0.self_attention.`.
    #[arg(long, default_value = "")]
    prefix: String,
    /// safetensors file with the input hidden states [s, b, h] (f32, bf16 or f16).
    #[arg(long)]
    input: PathBuf,
    /// Name of the input tensor.
    #[arg(long, default_value = "input")]
    input_name: String,
    /// Where to write `output` and `output_bias`.
    #[arg(long)]
    output: PathBuf,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// safetensors file with `positions` [s] (int or float): rope positions.
    #[arg(long)]
    positions: Option<PathBuf>,
    /// safetensors file with `attention_mask` (bool/uint8/float, nonzero = masked out),
    /// broadcastable to [b, 1|np, sq, sk]: for padding and arbitrary masks.
    #[arg(long)]
    mask_file: Option<PathBuf>,
    /// safetensors file with `context` [sk, b, h]: cross-attention key/value states.
    #[arg(long)]
    context: Option<PathBuf>,
    /// Query heads, when the spec leaves them out.
    #[arg(long)]
    heads: Option<usize>,
    /// Key/value groups, when the spec leaves them out.
    #[arg(long)]
    groups: Option<usize>,
    /// Head dim, when the spec leaves it out.
    #[arg(long)]
    head_dim: Option<usize>,
    /// Hidden size, when the spec leaves it out.
    #[arg(long)]
    hidden: Option<usize>,
}

fn io_err(path: &Path, source: std::io::Error) -> AttnError {
    AttnError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Read tensor `name` from a safetensors file as f32, whatever its numeric dtype.
fn read_tensor(path: &Path, name: &str, flag: &str) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| AttnError::Safetensors {
        path: path.display().to_string(),
        msg: e.to_string(),
    })?;
    let view = st.tensor(name).map_err(|_| AttnError::MissingWeight {
        key: name.into(),
        source_name: format!("{} (given by {flag})", path.display()),
    })?;
    let d = view.data();
    let data: Vec<f32> = match view.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::I64 => d
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        Dtype::I32 => d
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        Dtype::BOOL | Dtype::U8 => d.iter().map(|&b| f32::from(b)).collect(),
        other => {
            return Err(AttnError::DType {
                arg: format!("{flag} tensor `{name}`"),
                expected: "f32, f64, bf16, f16, i64, i32, u8 or bool".into(),
                got: format!("{other:?}"),
            })
        }
    };
    Tensor::new(view.shape(), data)
}

fn run_layer(a: &LayerArgs) -> Result<()> {
    let device = Device::from_flag(&a.device)?;
    if device.is_cuda() {
        return Err(AttnError::BackendUnavailable(format!(
            "{device} was found, but the CUDA layer backend is not implemented yet; use --device cpu"
        )));
    }
    eprintln!("attn: running on the {device}");
    let dims = RuntimeDims {
        heads: a.heads,
        groups: a.groups,
        head_dim: a.head_dim,
        hidden: a.hidden,
    };
    let config = SpecLayer::config_from_str(&a.spec, &dims)?;
    let weights = WeightStore::from_file(&a.weights)?;
    let layer = SpecLayer::load(config, &weights, &a.prefix)?;

    let input = read_tensor(&a.input, &a.input_name, "--input")?;
    let positions: Option<Vec<i64>> = a
        .positions
        .as_deref()
        .map(|p| read_tensor(p, "positions", "--positions"))
        .transpose()?
        .map(|t| t.data().iter().map(|&x| x as i64).collect());
    let mask = a
        .mask_file
        .as_deref()
        .map(|p| read_tensor(p, "attention_mask", "--mask-file"))
        .transpose()?;
    let context = a
        .context
        .as_deref()
        .map(|p| read_tensor(p, "context", "--context"))
        .transpose()?;

    let args = ForwardArgs {
        attention_mask: mask.as_ref(),
        key_value_states: context.as_ref(),
        positions: positions.as_deref(),
        ..ForwardArgs::default()
    };
    let out = layer.forward(&input, &args)?;
    let mut tensors = vec![("output".to_string(), out.output)];
    if let Some(b) = out.bias {
        tensors.push(("output_bias".to_string(), b));
    }
    WeightStore::save(&a.output, &tensors)?;
    eprintln!("attn: wrote {}", a.output.display());
    Ok(())
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
    let kernels = match (spec.head_dims.is_empty(), head_dim) {
        (true, Some(hd)) => render::kernels_for_spec_with_head_dim(&spec, hd),
        (true, None) => {
            return Err(AttnError::InvalidArgument {
                arg: "--head-dim".into(),
                expected: "a head dim, since the spec leaves head_dim out".into(),
                got: "nothing".into(),
            })
        }
        (false, _) => render::kernels_for_spec(&spec),
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Layer(a) => run_layer(a),
        Command::Catalog => run_catalog(),
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
