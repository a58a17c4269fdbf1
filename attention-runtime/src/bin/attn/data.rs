//! The data tensors of `attn layer` and `attn backward` (hidden states, a gradient, a mask, a
//! bias, rope positions, a cross-attention context), each read from the safetensors file one
//! flag gives, and the flags named in every error about them.
//!
//! Dtype policy, the same for every flag:
//! - data tensors (`--input`, `--grad-output`, `--bias-file`, `--context`): floating dtypes
//!   only (f32; f64, bf16 and f16 are converted to f32); an integer or bool tensor is a
//!   [`AttnError::DType`] naming the flag, the tensor and its dtype;
//! - `--mask-file`: bool, u8, i32, i64 or a float dtype (nonzero = masked out);
//! - `--positions`: i32 or i64 only, each value in `0..=i32::MAX` (what the CUDA kernels take;
//!   the same range on the CPU, so both devices accept the same files), read as integers (a
//!   float file is refused: f32 holds integers exactly only up to 2^24).
//!
//! A tensor missing from its file is an [`AttnError::MissingTensor`] (not a missing weight).
//! Errors the library reports about its own arguments (`hidden`, `key_value_states`,
//! `attention_mask`, ...) are renamed to the flags through [`Labels`].

use std::path::Path;

use attention_runtime::{AttnError, Result, Tensor};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};

/// Where one tensor comes from: the flag, the file it names and the tensor's name in it.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    /// The flag (`--input`).
    pub flag: &'static str,
    /// The file the flag gives.
    pub path: &'a Path,
    /// The tensor's name in the file (`input`).
    pub name: &'a str,
}

impl Source<'_> {
    /// How errors name the tensor: `--input tensor "input"`.
    pub fn label(&self) -> String {
        format!("{} tensor \"{}\"", self.flag, self.name)
    }

    /// Decode the file and hand the tensor's view to `f`.
    fn with_view<R>(&self, f: impl FnOnce(&TensorView<'_>) -> Result<R>) -> Result<R> {
        let bytes = std::fs::read(self.path).map_err(|e| AttnError::Io {
            path: given_by(&self.path.display().to_string(), self.flag),
            source: e,
        })?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| AttnError::Safetensors {
            path: given_by(&self.path.display().to_string(), self.flag),
            msg: e.to_string(),
        })?;
        let view = st.tensor(self.name).map_err(|_| {
            let mut names = st.names();
            names.sort();
            let got = match names.len() {
                0 => "no tensors".to_string(),
                n if n <= 8 => format!("{names:?}"),
                n => format!("{:?} and {} more", &names[..8], n - 8),
            };
            AttnError::MissingTensor {
                arg: self.flag.into(),
                key: self.name.into(),
                path: self.path.display().to_string(),
                got,
            }
        })?;
        f(&view)
    }

    fn dtype_err(&self, expected: &str, got: Dtype) -> AttnError {
        AttnError::DType {
            arg: self.label(),
            expected: expected.into(),
            got: format!("{got:?}"),
        }
    }
}

/// `path (given by --flag)`: a file named with the flag that gave it.
pub fn given_by(path: &str, flag: &str) -> String {
    format!("{path} (given by {flag})")
}

/// The little-endian elements of `view` as f32 when its dtype is a float one.
fn floats(view: &TensorView<'_>) -> Option<Vec<f32>> {
    let d = view.data();
    Some(match view.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// The little-endian elements of `view` as i64 when its dtype is i32 or i64.
fn integers(view: &TensorView<'_>) -> Option<Vec<i64>> {
    let d = view.data();
    Some(match view.dtype() {
        Dtype::I64 => d
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        Dtype::I32 => d
            .chunks_exact(4)
            .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        _ => return None,
    })
}

const FLOAT_DTYPES: &str = "a floating dtype: f32 (f64, bf16, f16 are converted)";

/// A data tensor (hidden states, a gradient, a bias, a context): a floating dtype, as f32.
///
/// Errors: [`AttnError::Io`], [`AttnError::Safetensors`] (naming the flag beside the path),
/// [`AttnError::MissingTensor`], [`AttnError::DType`] for an integer or bool tensor.
pub fn read_float(src: Source<'_>) -> Result<Tensor> {
    src.with_view(|view| {
        let data = floats(view).ok_or_else(|| src.dtype_err(FLOAT_DTYPES, view.dtype()))?;
        Tensor::new(view.shape(), data)
    })
}

/// A mask (`--mask-file`): bool, u8, i32, i64 or a floating dtype, as f32 (nonzero = masked
/// out; every nonzero integer stays nonzero in f32).
///
/// Errors: as [`read_float`], [`AttnError::DType`] for another dtype.
pub fn read_mask(src: Source<'_>) -> Result<Tensor> {
    src.with_view(|view| {
        let data = match view.dtype() {
            Dtype::BOOL | Dtype::U8 => view.data().iter().map(|&b| f32::from(b)).collect(),
            _ => match (integers(view), floats(view)) {
                (Some(ints), _) => ints.into_iter().map(|v| v as f32).collect(),
                (None, Some(f)) => f,
                (None, None) => {
                    return Err(src.dtype_err(
                        "bool, u8, i32, i64 or a floating dtype (nonzero = masked out)",
                        view.dtype(),
                    ))
                }
            },
        };
        Tensor::new(view.shape(), data)
    })
}

/// Rope positions (`--positions`): a 1-D i32 or i64 tensor `[s]`, each value in
/// `0..=i32::MAX`, read as integers.
///
/// Errors: as [`read_float`]; [`AttnError::DType`] for a float or other dtype,
/// [`AttnError::Shape`] for another rank, [`AttnError::InvalidArgument`] for a value out of
/// range (naming its index).
pub fn read_positions(src: Source<'_>) -> Result<Vec<i64>> {
    src.with_view(|view| {
        let p = integers(view).ok_or_else(|| {
            src.dtype_err(
                "an integer dtype, i32 or i64 (a float holds integers exactly only up to 2^24)",
                view.dtype(),
            )
        })?;
        if view.shape().len() != 1 {
            return Err(AttnError::Shape {
                arg: src.label(),
                expected: "[s] (one position per sequence position, shared by the batch)".into(),
                got: view.shape().to_vec(),
            });
        }
        let max = i64::from(i32::MAX);
        if let Some((i, v)) = p.iter().enumerate().find(|(_, v)| !(0..=max).contains(*v)) {
            return Err(AttnError::InvalidArgument {
                arg: format!("{}[{i}]", src.label()),
                expected: format!("a position in 0..={max} (int32, what the CUDA kernels take)"),
                got: v.to_string(),
            });
        }
        Ok(p)
    })
}

/// The library's names for the data arguments, each with how the CLI names it (the flag and
/// the tensor in its file), for [`Labels::relabel`].
#[derive(Default)]
pub struct Labels(Vec<(&'static str, String)>);

impl Labels {
    /// Name the library's argument `arg` (`hidden`) as `label` (`--input tensor "input"`).
    pub fn add(&mut self, arg: &'static str, label: String) -> &mut Self {
        self.0.push((arg, label));
        self
    }

    /// `arg` with the library's name replaced by the CLI's: `arg` itself, or `arg` followed
    /// by an index or a remark (`positions[3]`, `attention_mask (broadcast)`).
    fn rename(&self, arg: &str) -> Option<String> {
        self.0.iter().find_map(|(lib, label)| {
            let rest = arg.strip_prefix(lib)?;
            let boundary = rest
                .chars()
                .next()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
            boundary.then(|| format!("{label}{rest}"))
        })
    }

    /// `e` with every argument name of the library that this CLI call feeds from a flag
    /// renamed to the flag; other errors unchanged.
    pub fn relabel(&self, mut e: AttnError) -> AttnError {
        let arg = match &mut e {
            AttnError::Shape { arg, .. }
            | AttnError::DType { arg, .. }
            | AttnError::InvalidArgument { arg, .. }
            | AttnError::CuSeqlens { arg, .. } => arg,
            _ => return e,
        };
        if let Some(renamed) = self.rename(arg) {
            *arg = renamed;
        }
        e
    }
}

/// How the dimension `field` of a [`RuntimeDims`](attention_runtime::RuntimeDims) is given on
/// the command line: in `--spec` or by its own flag.
fn dim_label(field: &str) -> Option<String> {
    let flag = match field {
        "heads" => "--heads",
        "groups" => "--groups",
        "head_dim" => "--head-dim",
        "hidden" => "--hidden",
        _ => return None,
    };
    Some(format!("{field} (--spec or {flag})"))
}

/// A config error of `--spec` and the dimension flags with the flags named: a
/// [`AttnError::ConfigMismatch`] or zero dimension gets `(--spec or --heads)` after the field.
pub fn relabel_config(mut e: AttnError) -> AttnError {
    if let AttnError::ConfigMismatch { field: name, .. }
    | AttnError::InvalidArgument { arg: name, .. } = &mut e
    {
        if let Some(label) = dim_label(name) {
            *name = label;
        }
    }
    e
}

/// An error about the weights file or the output file with its flag named beside the path
/// (`I/O error on W (given by --weights)`, `missing weight ... in W (given by --weights)`);
/// other errors unchanged.
pub fn relabel_file(mut e: AttnError, flag: &str) -> AttnError {
    match &mut e {
        AttnError::Io { path, .. } | AttnError::Safetensors { path, .. } => {
            *path = given_by(path, flag)
        }
        AttnError::MissingWeight { source_name, .. }
        | AttnError::HfMissingWeight { source_name, .. }
        | AttnError::HfFamilyNotFound { source_name, .. } => {
            *source_name = given_by(source_name, flag)
        }
        _ => {}
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape_err(arg: &str) -> AttnError {
        AttnError::Shape {
            arg: arg.into(),
            expected: "[_, _, 512]".into(),
            got: vec![1],
        }
    }

    fn arg_of(e: &AttnError) -> &str {
        match e {
            AttnError::Shape { arg, .. } => arg,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn labels_rename_whole_names_only() {
        let mut l = Labels::default();
        l.add("hidden", "--input tensor \"x\"".into())
            .add("positions", "--positions".into());
        assert_eq!(
            arg_of(&l.relabel(shape_err("hidden"))),
            "--input tensor \"x\""
        );
        assert_eq!(
            arg_of(&l.relabel(shape_err("positions[3]"))),
            "--positions[3]"
        );
        assert_eq!(
            arg_of(&l.relabel(shape_err("hidden (rows)"))),
            "--input tensor \"x\" (rows)"
        );
        // Another argument that starts with a known name stays as it is.
        assert_eq!(arg_of(&l.relabel(shape_err("hidden_size"))), "hidden_size");
        assert_eq!(arg_of(&l.relabel(shape_err("q"))), "q");
        // Errors without an argument name pass through.
        let e = l.relabel(AttnError::Render("x".into()));
        assert!(matches!(e, AttnError::Render(_)));
    }

    #[test]
    fn config_and_file_errors_get_their_flags() {
        let e = relabel_config(AttnError::ConfigMismatch {
            field: "head_dim".into(),
            spec: "64".into(),
            config: "128".into(),
        });
        assert!(
            e.to_string().contains("head_dim (--spec or --head-dim)"),
            "{e}"
        );
        let e = relabel_config(AttnError::InvalidArgument {
            arg: "rotary_percent".into(),
            expected: "x".into(),
            got: "y".into(),
        });
        assert!(e.to_string().contains("`rotary_percent`"), "{e}");
        let e = relabel_file(
            AttnError::MissingWeight {
                key: "linear_qkv.weight".into(),
                source_name: "w.safetensors".into(),
            },
            "--weights",
        );
        assert!(
            e.to_string()
                .ends_with("in w.safetensors (given by --weights)"),
            "{e}"
        );
    }
}
