//! [`WeightStore`]: named weights from safetensors (f32, bf16 or f16, all read as f32).
//!
//! Names follow Megatron-Core's state dict of one attention layer (`linear_qkv.weight`
//! `[(np + 2 ng) hn, h]`, `linear_qkv.bias`, `q_layernorm.weight` `[hn]`, `linear_proj.weight`
//! `[h, np hn]`, ...), optionally under a model prefix such as
//! `decoder.layers.0.self_attention.`. Hugging Face names ([`hf`]) are converted to these at
//! load time and back when saving; [`names::WeightNames`] chooses between the two.

pub mod hf;
pub mod names;

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::error::{AttnError, Result};
use crate::tensor::Tensor;

/// A set of named host tensors, decoded to f32.
#[derive(Debug, Clone, Default)]
pub struct WeightStore {
    source: String,
    tensors: BTreeMap<String, std::result::Result<Tensor, String>>,
    /// The file's `__metadata__` string map (empty when it has none).
    metadata: BTreeMap<String, String>,
}

fn st_err(path: &str, e: impl std::fmt::Display) -> AttnError {
    AttnError::Safetensors {
        path: path.into(),
        msg: e.to_string(),
    }
}

impl WeightStore {
    /// Read a safetensors file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| AttnError::Io {
            path: name.clone(),
            source,
        })?;
        Self::decode(&bytes, name)
    }

    /// Parse safetensors bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::decode(bytes, "<bytes>".into())
    }

    fn decode(bytes: &[u8], source: String) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| st_err(&source, e))?;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| st_err(&source, e))?;
        let metadata = header
            .metadata()
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let data = view.data();
            let vals: Option<Vec<f32>> = match view.dtype() {
                Dtype::F32 => Some(
                    data.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ),
                Dtype::BF16 => Some(
                    data.chunks_exact(2)
                        .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                        .collect(),
                ),
                Dtype::F16 => Some(
                    data.chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                        .collect(),
                ),
                _ => None,
            };
            let entry = match vals {
                Some(v) => Ok(Tensor::new(&shape, v)?),
                None => Err(format!("{:?}", view.dtype())),
            };
            tensors.insert(name, entry);
        }
        Ok(WeightStore {
            source,
            tensors,
            metadata,
        })
    }

    /// A store over in-memory tensors, keyed by name; each tensor keeps its own shape
    /// (row-major f32), checked against the expected one by [`get`](Self::get).
    pub fn from_tensors(tensors: Vec<(String, Tensor)>) -> Self {
        WeightStore {
            source: "<memory>".into(),
            tensors: tensors.into_iter().map(|(k, t)| (k, Ok(t))).collect(),
            metadata: BTreeMap::new(),
        }
    }

    /// The file's `__metadata__` (free-form strings; empty when the file has none, and for a
    /// store built in memory). Tensor-parallel shards record `tp_rank` and `tp_size` there
    /// ([`crate::parallel::tp_load`]).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Where the weights came from (a path, `<bytes>` or `<memory>`).
    pub fn source_name(&self) -> &str {
        &self.source
    }

    /// Every tensor name, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// The tensor `key` as f32, checked against `expected_shape`.
    ///
    /// Errors: [`AttnError::MissingWeight`] naming the key, [`AttnError::WeightShape`] naming
    /// the key and both shapes, [`AttnError::DType`] for a non-float tensor.
    pub fn get(&self, key: &str, expected_shape: &[usize]) -> Result<Tensor> {
        match self.tensors.get(key) {
            None => Err(AttnError::MissingWeight {
                key: key.into(),
                source_name: self.source.clone(),
            }),
            Some(Err(dt)) => Err(AttnError::DType {
                arg: key.into(),
                expected: "F32, BF16 or F16".into(),
                got: dt.clone(),
            }),
            Some(Ok(t)) if t.shape() != expected_shape => Err(AttnError::WeightShape {
                key: key.into(),
                expected: expected_shape.to_vec(),
                got: t.shape().to_vec(),
            }),
            Some(Ok(t)) => Ok(t.clone()),
        }
    }

    /// Serialize `tensors` (as f32) to safetensors bytes.
    pub fn to_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
        Self::to_bytes_with_metadata(tensors, &BTreeMap::new())
    }

    /// Serialize `tensors` (as f32) to safetensors bytes with `metadata` as the file's
    /// `__metadata__` (none when empty).
    pub fn to_bytes_with_metadata(
        tensors: &[(String, Tensor)],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Vec<u8>> {
        let raw: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(k, t)| {
                (
                    k.clone(),
                    t.shape().to_vec(),
                    t.data().iter().flat_map(|v| v.to_le_bytes()).collect(),
                )
            })
            .collect();
        let views = raw
            .iter()
            .map(|(k, s, b)| {
                safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| st_err("<bytes>", e))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = (!metadata.is_empty()).then(|| {
            metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        });
        safetensors::serialize(views, &meta).map_err(|e| st_err("<bytes>", e))
    }

    /// Write `tensors` (as f32) to a safetensors file at `path`.
    pub fn save(path: impl AsRef<Path>, tensors: &[(String, Tensor)]) -> Result<()> {
        Self::save_with_metadata(path, tensors, &BTreeMap::new())
    }

    /// Write `tensors` (as f32) to a safetensors file at `path` with `metadata` (see
    /// [`to_bytes_with_metadata`](Self::to_bytes_with_metadata)).
    pub fn save_with_metadata(
        path: impl AsRef<Path>,
        tensors: &[(String, Tensor)],
        metadata: &BTreeMap<String, String>,
    ) -> Result<()> {
        let path = path.as_ref();
        let bytes = Self::to_bytes_with_metadata(tensors, metadata)?;
        std::fs::write(path, bytes).map_err(|source| AttnError::Io {
            path: path.display().to_string(),
            source,
        })
    }
}
