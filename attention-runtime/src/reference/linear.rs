//! The reference linear layer: `y = x W^T (+ b)`.

use super::attention::dot;
use crate::error::{AttnError, Result};

/// `y = x W^T (+ b)` with `x` `[n, in]`, `w` `[out, in]`, `b` `[out]`; returns `[n, out]`.
/// Dot products accumulate in f64. Errors when the lengths do not match `n`, `in`, `out`.
pub fn linear(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    n: usize,
    inf: usize,
    outf: usize,
) -> Result<Vec<f32>> {
    for (arg, got, want) in [("x", x.len(), n * inf), ("weight", w.len(), outf * inf)] {
        if got != want {
            return Err(AttnError::Shape {
                arg: arg.into(),
                expected: format!("{want} elements"),
                got: vec![got],
            });
        }
    }
    if let Some(b) = b {
        if b.len() != outf {
            return Err(AttnError::Shape {
                arg: "bias".into(),
                expected: format!("[{outf}]"),
                got: vec![b.len()],
            });
        }
    }
    let mut y = vec![0f32; n * outf];
    // Block over rows of x so a block of W rows stays in cache while several x rows use it.
    const RB: usize = 8;
    const OB: usize = 64;
    for r0 in (0..n).step_by(RB) {
        let r1 = (r0 + RB).min(n);
        for o0 in (0..outf).step_by(OB) {
            let o1 = (o0 + OB).min(outf);
            for r in r0..r1 {
                let xr = &x[r * inf..][..inf];
                let yr = &mut y[r * outf..][..outf];
                for o in o0..o1 {
                    let mut s = dot(xr, &w[o * inf..][..inf]);
                    if let Some(b) = b {
                        s += b[o] as f64;
                    }
                    yr[o] = s as f32;
                }
            }
        }
    }
    Ok(y)
}
