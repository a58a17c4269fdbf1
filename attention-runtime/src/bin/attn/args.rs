//! The flags of `attn layer` and `attn backward`, the checks between them, and reading the
//! files they name (see [`crate::data`] for the dtype policy and the error labels).

use std::path::{Path, PathBuf};

use attention_runtime::{AttnError, Device, ForwardArgs, Result, RuntimeDims, Tensor, WeightNames};

use crate::data::{self, Labels, Source};

/// The data files both subcommands read: hidden states, rope positions, a mask, a bias, a
/// cross-attention context.
#[derive(clap::Args)]
pub struct DataArgs {
    /// safetensors file with the input hidden states `[s, b, h]`, a floating dtype (f32; f64,
    /// bf16 and f16 are converted).
    #[arg(long)]
    pub input: PathBuf,
    /// Name of the input tensor in --input.
    #[arg(long, default_value = "input")]
    pub input_name: String,
    /// safetensors file with `positions` `[s]`: rope positions, i32 or i64 (read as integers;
    /// a float file is refused), each in 0..=2147483647.
    #[arg(long)]
    pub positions: Option<PathBuf>,
    /// safetensors file with `attention_mask` (bool, u8, i32, i64 or float; nonzero = masked
    /// out), broadcastable to `[b, 1|np, sq, sk]`: for padding and arbitrary masks.
    #[arg(long)]
    pub mask_file: Option<PathBuf>,
    /// safetensors file with `attention_bias`, a floating dtype (f32; f64, bf16 and f16 are
    /// converted): an additive post-scale bias broadcastable to `[b, np, sq, sk]` (`-inf`
    /// masks a key; a row masked entirely gives zeros). `attn backward` writes its gradient
    /// as `grad_attention_bias`.
    #[arg(long)]
    pub bias_file: Option<PathBuf>,
    /// safetensors file with the cross-attention key/value states `[sk, b, h]`, a floating
    /// dtype.
    #[arg(long)]
    pub context: Option<PathBuf>,
    /// Name of the context tensor in --context (default `context`; only with --context).
    #[arg(long)]
    pub context_name: Option<String>,
}

/// The layer's dimensions, when the spec leaves them out.
#[derive(clap::Args)]
pub struct DimArgs {
    /// Query heads, when the spec leaves them out.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value groups, when the spec leaves them out.
    #[arg(long)]
    pub groups: Option<usize>,
    /// Head dim, when the spec leaves it out.
    #[arg(long)]
    pub head_dim: Option<usize>,
    /// Hidden size, when the spec leaves it out.
    #[arg(long)]
    pub hidden: Option<usize>,
}

impl From<&DimArgs> for RuntimeDims {
    fn from(d: &DimArgs) -> RuntimeDims {
        RuntimeDims {
            heads: d.heads,
            groups: d.groups,
            head_dim: d.head_dim,
            hidden: d.hidden,
        }
    }
}

/// Arguments of `attn layer`.
#[derive(clap::Args)]
pub struct LayerArgs {
    /// The spec, in the `#[attention]` grammar.
    #[arg(long)]
    pub spec: String,
    /// safetensors file with the layer's weights.
    #[arg(long)]
    pub weights: PathBuf,
    /// Prefix of the weight names, e.g. `decoder.layers.0.self_attention.` (Hugging Face:
    /// the attention module's, `model.layers.0.self_attn.`, or the block's, `model.layers.0.`).
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// How the weights are named: `megatron`, `hf` (Llama/Mistral/Qwen2/Qwen3, GPT-2 or BERT,
    /// detected from the keys under --prefix) or `hf:llama|hf:gpt2|hf:bert`.
    #[arg(long, default_value = "megatron", value_parser = parse_names)]
    pub names: WeightNames,
    #[command(flatten)]
    pub data: DataArgs,
    /// Where to write `output` and `output_bias`.
    #[arg(long)]
    pub output: PathBuf,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[command(flatten)]
    pub dims: DimArgs,
}

/// Arguments of `attn backward`.
#[derive(clap::Args)]
pub struct BackwardArgs {
    /// The spec, in the `#[attention]` grammar.
    #[arg(long)]
    pub spec: String,
    /// safetensors file with the layer's weights (Megatron names).
    #[arg(long)]
    pub weights: PathBuf,
    /// Prefix of the weight names, e.g. `decoder.layers.0.self_attention.`.
    #[arg(long, default_value = "")]
    pub prefix: String,
    #[command(flatten)]
    pub data: DataArgs,
    /// safetensors file with `grad_output`, the gradient of the output: the output's shape
    /// (`[s, b, h]`), a floating dtype (f32; f64, bf16, f16 are converted).
    #[arg(long)]
    pub grad_output: PathBuf,
    /// Where to write `output`, `grad_input` and `grad.<name>`.
    #[arg(long)]
    pub output: PathBuf,
    /// `cpu`, `cuda` or `cuda:N` (the CUDA training path takes mask tensors and a bias, and
    /// returns the bias's gradient); results are written as f32.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute the linears' weight gradients in a second step (`backward_dw`); the result
    /// is bitwise the same.
    #[arg(long)]
    pub delay_wgrad: bool,
    /// CUDA: run the deterministic attention backward (bitwise-reproducible gradients)
    /// instead of the fused one, whose dQ is summed with f32 atomics. The CPU backend is
    /// always deterministic.
    #[arg(long)]
    pub deterministic: bool,
    /// `none` or `core_attention` (selective recompute: core attention runs again in the
    /// backward); the result is bitwise the same.
    #[arg(long, default_value = "none")]
    pub recompute: String,
    #[command(flatten)]
    pub dims: DimArgs,
}

fn parse_names(s: &str) -> std::result::Result<WeightNames, String> {
    s.parse().map_err(|e: AttnError| e.to_string())
}

/// The `--device` flag opened; its errors name the flag (a missing GPU included).
pub fn open_device(flag: &str) -> Result<Device> {
    Device::from_flag(flag).map_err(|e| match e {
        AttnError::BackendUnavailable(msg) => {
            AttnError::BackendUnavailable(format!("{msg} (--device {flag})"))
        }
        AttnError::InvalidArgument { arg, expected, .. } if arg == "ordinal" => {
            AttnError::InvalidArgument {
                arg: "--device".into(),
                expected,
                got: flag.into(),
            }
        }
        e => e,
    })
}

/// The data tensors of one call, read from their files, and the labels that rename the
/// library's arguments to the flags that gave them.
pub struct Data {
    /// `--input`.
    pub input: Tensor,
    /// `--positions`.
    pub positions: Option<Vec<i64>>,
    /// `--mask-file`.
    pub mask: Option<Tensor>,
    /// `--bias-file`.
    pub bias: Option<Tensor>,
    /// `--context`.
    pub context: Option<Tensor>,
    /// The library's argument names (`hidden`, `key_value_states`, ...) as the flags.
    pub labels: Labels,
}

impl DataArgs {
    /// Refuse a flag that only means something with another one (`--context-name` without
    /// `--context`), before anything is read.
    ///
    /// Errors: [`AttnError::InvalidArgument`] naming the flag.
    pub fn check(&self) -> Result<()> {
        if let (Some(name), None) = (&self.context_name, &self.context) {
            return Err(AttnError::InvalidArgument {
                arg: "--context-name".into(),
                expected: "--context too (it names the tensor in the --context file)".into(),
                got: format!("--context-name {name} without --context"),
            });
        }
        Ok(())
    }

    /// Read every file given (see [`crate::data`] for the dtypes each flag takes).
    ///
    /// Errors: those of [`data::read_float`], [`data::read_mask`] and
    /// [`data::read_positions`], each naming its flag.
    pub fn read(&self) -> Result<Data> {
        let mut labels = Labels::default();
        let input = Source {
            flag: "--input",
            path: &self.input,
            name: &self.input_name,
        };
        labels.add("hidden", input.label());
        let input = data::read_float(input)?;
        let positions = optional(
            &mut labels,
            ("positions", "--positions", "positions"),
            self.positions.as_deref(),
            data::read_positions,
        )?;
        let mask = optional(
            &mut labels,
            ("attention_mask", "--mask-file", "attention_mask"),
            self.mask_file.as_deref(),
            data::read_mask,
        )?;
        let bias = optional(
            &mut labels,
            ("attention_bias", "--bias-file", "attention_bias"),
            self.bias_file.as_deref(),
            data::read_float,
        )?;
        let context = optional(
            &mut labels,
            (
                "key_value_states",
                "--context",
                self.context_name.as_deref().unwrap_or("context"),
            ),
            self.context.as_deref(),
            data::read_float,
        )?;
        Ok(Data {
            input,
            positions,
            mask,
            bias,
            context,
            labels,
        })
    }
}

/// Read the tensor `name` of the file `path` that `flag` gives, if given, and label the
/// library's argument `lib` with the tensor (or, when the flag is not given, the flag).
fn optional<T>(
    labels: &mut Labels,
    (lib, flag, name): (&'static str, &'static str, &str),
    path: Option<&Path>,
    read: fn(Source<'_>) -> Result<T>,
) -> Result<Option<T>> {
    let Some(path) = path else {
        labels.add(lib, flag.into());
        return Ok(None);
    };
    let src = Source { flag, path, name };
    labels.add(lib, src.label());
    read(src).map(Some)
}

impl Data {
    /// The forward's arguments over these tensors.
    pub fn forward_args(&self) -> ForwardArgs<'_> {
        ForwardArgs {
            attention_mask: self.mask.as_ref(),
            attention_bias: self.bias.as_ref(),
            key_value_states: self.context.as_ref(),
            positions: self.positions.as_deref(),
            ..ForwardArgs::default()
        }
    }
}
