//! Backward of the layer's elementwise and linear pieces: linear (`dX`, `dW`, `db`), q/k norms
//! (LayerNorm, RMSNorm, L2, with weight and bias gradients) and the sigmoid output gate. Rope's
//! backward is [`RopeTable::apply_backward`](super::RopeTable::apply_backward), core
//! attention's [`attend_sequence_backward`](super::attend_sequence_backward).
//!
//! Every sum accumulates in f64; results are f32.

use attention_codegen::QkNorm;

use super::attention::dot;
use crate::error::{AttnError, Result};

fn check(arg: &str, got: usize, want: usize, shape: &str) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(AttnError::Shape {
            arg: arg.into(),
            expected: format!("{shape} ({want} elements)"),
            got: vec![got],
        })
    }
}

/// Input gradient of `y = x W^T (+ b)`: `dX = dY W`, `dy` `[n, out]`, `w` `[out, in]`;
/// returns `[n, in]`. Errors when a length does not match `n`, `in`, `out`.
pub fn linear_backward_input(
    dy: &[f32],
    w: &[f32],
    n: usize,
    inf: usize,
    outf: usize,
) -> Result<Vec<f32>> {
    check("grad_output", dy.len(), n * outf, &format!("[{n}, {outf}]"))?;
    check("weight", w.len(), outf * inf, &format!("[{outf}, {inf}]"))?;
    let mut dx = vec![0f32; n * inf];
    let mut acc = vec![0f64; inf];
    for r in 0..n {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for (o, &g) in dy[r * outf..][..outf].iter().enumerate() {
            if g == 0.0 {
                continue;
            }
            let g = g as f64;
            for (a, &wv) in acc.iter_mut().zip(&w[o * inf..][..inf]) {
                *a += g * wv as f64;
            }
        }
        for (d, a) in dx[r * inf..][..inf].iter_mut().zip(&acc) {
            *d = *a as f32;
        }
    }
    Ok(dx)
}

/// Weight gradient of `y = x W^T`: `dW = dY^T X`, `dy` `[n, out]`, `x` `[n, in]`; returns
/// `[out, in]`. Errors when a length does not match `n`, `in`, `out`.
pub fn linear_weight_grad(
    dy: &[f32],
    x: &[f32],
    n: usize,
    inf: usize,
    outf: usize,
) -> Result<Vec<f32>> {
    check("grad_output", dy.len(), n * outf, &format!("[{n}, {outf}]"))?;
    check("x", x.len(), n * inf, &format!("[{n}, {inf}]"))?;
    // Transposes so each output element is one contiguous dot product.
    let mut dyt = vec![0f32; n * outf];
    for r in 0..n {
        for o in 0..outf {
            dyt[o * n + r] = dy[r * outf + o];
        }
    }
    let mut xt = vec![0f32; n * inf];
    for r in 0..n {
        for i in 0..inf {
            xt[i * n + r] = x[r * inf + i];
        }
    }
    let mut dw = vec![0f32; outf * inf];
    for o in 0..outf {
        let g = &dyt[o * n..][..n];
        for i in 0..inf {
            dw[o * inf + i] = dot(g, &xt[i * n..][..n]) as f32;
        }
    }
    Ok(dw)
}

/// Bias gradient of `y = x W^T + b`: the column sums of `dy` `[n, out]`; returns `[out]`.
pub fn linear_bias_grad(dy: &[f32], n: usize, outf: usize) -> Result<Vec<f32>> {
    check("grad_output", dy.len(), n * outf, &format!("[{n}, {outf}]"))?;
    let mut acc = vec![0f64; outf];
    for row in dy.chunks_exact(outf.max(1)) {
        for (a, &g) in acc.iter_mut().zip(row) {
            *a += g as f64;
        }
    }
    Ok(acc.into_iter().map(|a| a as f32).collect())
}

/// The gradients [`normalize_rows_backward`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct NormGrads {
    /// Gradient of the input rows, `[n, hn]`.
    pub dx: Vec<f32>,
    /// Gradient of the weight `[hn]` (LayerNorm and RMSNorm given a weight).
    pub dweight: Option<Vec<f32>>,
    /// Gradient of the bias `[hn]` (given a bias; LayerNorm).
    pub dbias: Option<Vec<f32>>,
}

/// The backward of [`normalize_rows`](super::normalize_rows): `x` is the forward's input
/// `[n, hn]`, `dy` the gradient of its output.
///
/// With `xh` the normalized row (`(x - mean) r` for LayerNorm, `x r` for RMS/L2, `r` the
/// inverse std / rms), `g = dy * w` (`w` = ones when absent or L2):
///
/// - LayerNorm: `dx = r (g - mean(g) - xh mean(g xh))`
/// - RMSNorm / L2: `dx = r (g - xh mean(g xh))`
/// - `dw = sum_rows dy xh`, `db = sum_rows dy`.
///
/// (The standard derivation, e.g. Ba et al., "Layer Normalization", 2016; Zhang & Sennrich,
/// "Root Mean Square Layer Normalization", 2019.) Errors as the forward.
pub fn normalize_rows_backward(
    x: &[f32],
    dy: &[f32],
    hn: usize,
    kind: QkNorm,
    eps: f32,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
) -> Result<NormGrads> {
    if hn == 0 || !x.len().is_multiple_of(hn) {
        return Err(AttnError::Shape {
            arg: "x".into(),
            expected: format!("[n, {hn}]"),
            got: vec![x.len()],
        });
    }
    check(
        "dy",
        dy.len(),
        x.len(),
        &format!("[{}, {hn}]", x.len() / hn),
    )?;
    for (arg, t) in [("weight", weight), ("bias", bias)] {
        if let Some(t) = t {
            check(arg, t.len(), hn, &format!("[{hn}]"))?;
        }
    }
    let affine = kind != QkNorm::L2;
    let weight = weight.filter(|_| affine);
    let bias = bias.filter(|_| affine);
    let eps = eps as f64;
    let n = hn as f64;
    let mut dx = vec![0f32; x.len()];
    let mut dw = weight.map(|_| vec![0f64; hn]);
    let mut db = bias.map(|_| vec![0f64; hn]);
    let mut xh = vec![0f64; hn];
    let mut g = vec![0f64; hn];
    for ((row, dyr), dxr) in x
        .chunks_exact(hn)
        .zip(dy.chunks_exact(hn))
        .zip(dx.chunks_exact_mut(hn))
    {
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
        for c in 0..hn {
            xh[c] = (row[c] as f64 - shift) * inv;
            let d = dyr[c] as f64;
            g[c] = d * weight.map_or(1.0, |w| w[c] as f64);
            if let Some(dw) = dw.as_mut() {
                dw[c] += d * xh[c];
            }
            if let Some(db) = db.as_mut() {
                db[c] += d;
            }
        }
        let mean_g = if kind == QkNorm::Layer {
            g.iter().sum::<f64>() / n
        } else {
            0.0
        };
        let mean_gx = g.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / n;
        for c in 0..hn {
            dxr[c] = (inv * (g[c] - mean_g - xh[c] * mean_gx)) as f32;
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect();
    Ok(NormGrads {
        dx,
        dweight: dw.map(f),
        dbias: db.map(f),
    })
}

/// `sigmoid(g)` as the forward computes it (f64, rounded to f32).
pub fn sigmoid(g: f32) -> f32 {
    (1.0 / (1.0 + (-(g as f64)).exp())) as f32
}

/// The backward of the output gate `y = o * sigmoid(g)` (elementwise): returns `(do, dg)` with
/// `do = dy sigmoid(g)` and `dg = dy o sigmoid(g) (1 - sigmoid(g))`. Errors when the lengths
/// differ.
pub fn gate_backward(dy: &[f32], o: &[f32], g: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
    check("o", o.len(), dy.len(), "as grad_output")?;
    check("gate", g.len(), dy.len(), "as grad_output")?;
    let mut d_o = Vec::with_capacity(dy.len());
    let mut d_g = Vec::with_capacity(dy.len());
    for ((&d, &ov), &gv) in dy.iter().zip(o).zip(g) {
        let s = 1.0 / (1.0 + (-(gv as f64)).exp());
        d_o.push((d as f64 * s) as f32);
        d_g.push((d as f64 * ov as f64 * s * (1.0 - s)) as f32);
    }
    Ok((d_o, d_g))
}
