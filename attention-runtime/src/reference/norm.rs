//! q/k norms over the head dim: LayerNorm, RMSNorm and L2 (statistics in f64).

use attention_codegen::QkNorm;

use crate::error::{AttnError, Result};

/// Normalize every row of `x` (`[n, hn]`, `hn = row length`) in place.
///
/// - `Layer`: `(x - mean) / sqrt(var + eps) * w + b` (biased variance; `w`, `b` `[hn]`).
/// - `Rms`: `x / sqrt(mean(x^2) + eps) * w`.
/// - `L2`: `x * rsqrt(mean(x^2) + eps)`, no weight.
///
/// A missing `weight` means ones, a missing `bias` zeros. Errors when `x` is not a whole
/// number of rows or `weight`/`bias` is not `[hn]`.
pub fn normalize_rows(
    x: &mut [f32],
    hn: usize,
    kind: QkNorm,
    eps: f32,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
) -> Result<()> {
    if hn == 0 || !x.len().is_multiple_of(hn) {
        return Err(AttnError::Shape {
            arg: "x".into(),
            expected: format!("[n, {hn}]"),
            got: vec![x.len()],
        });
    }
    for (arg, t) in [("weight", weight), ("bias", bias)] {
        if let Some(t) = t {
            if t.len() != hn {
                return Err(AttnError::Shape {
                    arg: arg.into(),
                    expected: format!("[{hn}]"),
                    got: vec![t.len()],
                });
            }
        }
    }
    let eps = eps as f64;
    for row in x.chunks_exact_mut(hn) {
        let n = hn as f64;
        let (shift, inv) = match kind {
            QkNorm::Layer => {
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
                (mean, 1.0 / (var + eps).sqrt())
            }
            QkNorm::Rms | QkNorm::L2 => {
                let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n;
                (0.0, 1.0 / (ms + eps).sqrt())
            }
        };
        let use_affine = kind != QkNorm::L2;
        for (c, v) in row.iter_mut().enumerate() {
            let mut y = (*v as f64 - shift) * inv;
            if use_affine {
                if let Some(w) = weight {
                    y *= w[c] as f64;
                }
                if let Some(b) = bias {
                    y += b[c] as f64;
                }
            }
            *v = y as f32;
        }
    }
    Ok(())
}
