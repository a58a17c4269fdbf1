//! Rotary position embedding (half / interleaved, partial, explicit positions, mscale).
//!
//! `inv_freq[j] = 1 / base^(2j / dim)` for `j < dim / 2`, `dim = int(hn * rotary_percent)`;
//! only the first `dim` channels of each head rotate, the rest pass through.

use attention_codegen::{Rope, RopeMode};

use crate::config::rotary_dim;
use crate::error::{AttnError, Result};

/// Precomputed rotary tables for one head dim.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeTable {
    /// Head dim hn.
    pub head_dim: usize,
    /// Rotated channels `dim` (even, <= hn).
    pub rot_dim: usize,
    /// Layout.
    pub mode: RopeMode,
    /// `inv_freq`, `[rot_dim / 2]`, in f64.
    pub inv_freq: Vec<f64>,
}

impl RopeTable {
    /// Tables for `rope` over heads of `head_dim` channels. Errors when the rotary dim is 0,
    /// odd or larger than the head dim.
    pub fn new(rope: &Rope, head_dim: usize) -> Result<Self> {
        let rot_dim = rotary_dim(head_dim, rope.rotary_percent);
        if rot_dim == 0 || !rot_dim.is_multiple_of(2) || rot_dim > head_dim {
            return Err(AttnError::InvalidArgument {
                arg: "rotary_percent".into(),
                expected: format!("head_dim * rotary_percent a positive even number <= {head_dim}"),
                got: format!("{} (rotary dim {rot_dim})", rope.rotary_percent),
            });
        }
        let inv_freq = (0..rot_dim / 2)
            .map(|j| 1.0 / rope.rotary_base.powf((2 * j) as f64 / rot_dim as f64))
            .collect();
        Ok(RopeTable {
            head_dim,
            rot_dim,
            mode: rope.mode,
            inv_freq,
        })
    }

    /// `cos` and `sin` tables `[max_seq, rot_dim / 2]` (f32, times `mscale`) for positions
    /// `0..max_seq`, as a fused decode kernel consumes them.
    pub fn cos_sin(&self, max_seq: usize, mscale: f32) -> (Vec<f32>, Vec<f32>) {
        let half = self.rot_dim / 2;
        let mut c = Vec::with_capacity(max_seq * half);
        let mut s = Vec::with_capacity(max_seq * half);
        for p in 0..max_seq {
            for f in &self.inv_freq {
                let a = p as f64 * f;
                c.push((a.cos() * mscale as f64) as f32);
                s.push((a.sin() * mscale as f64) as f32);
            }
        }
        (c, s)
    }

    /// Rotate `x` (`[n, heads, hn]`, row-major) in place; token `t` is at `positions[t]`.
    /// Errors when `x` is not `positions.len() * heads * hn` long.
    pub fn apply(&self, x: &mut [f32], heads: usize, positions: &[i64], mscale: f32) -> Result<()> {
        self.rotate(x, heads, positions, mscale, 1.0)
    }

    /// The backward of [`apply`](Self::apply): `x` holds the gradient of the rotated tensor
    /// (`[n, heads, hn]`) and becomes the gradient of its input, in place. Rope is a rotation
    /// `R(theta) * mscale` per channel pair, so its transpose is the rotation by `-theta`
    /// times `mscale` (`(a, b) -> (a c + b s, b c - a s)`); channels past `rot_dim` pass
    /// through. Errors as [`apply`](Self::apply).
    pub fn apply_backward(
        &self,
        x: &mut [f32],
        heads: usize,
        positions: &[i64],
        mscale: f32,
    ) -> Result<()> {
        self.rotate(x, heads, positions, mscale, -1.0)
    }

    /// Rotation by `sign * theta`, times `mscale`.
    fn rotate(
        &self,
        x: &mut [f32],
        heads: usize,
        positions: &[i64],
        mscale: f32,
        sign: f64,
    ) -> Result<()> {
        check_mscale(mscale)?;
        let hn = self.head_dim;
        if x.len() != positions.len() * heads * hn {
            return Err(AttnError::Shape {
                arg: "positions".into(),
                expected: format!(
                    "one position per token: x has {} elements of [_, {heads}, {hn}]",
                    x.len()
                ),
                got: vec![positions.len()],
            });
        }
        let half = self.rot_dim / 2;
        let ms = mscale as f64;
        let mut cs = vec![(0f64, 0f64); half];
        for (t, &pos) in positions.iter().enumerate() {
            for (j, f) in self.inv_freq.iter().enumerate() {
                let a = pos as f64 * f;
                cs[j] = (a.cos() * ms, sign * a.sin() * ms);
            }
            for h in 0..heads {
                let row = &mut x[(t * heads + h) * hn..][..hn];
                match self.mode {
                    RopeMode::Half => {
                        for (j, &(c, s)) in cs.iter().enumerate() {
                            let (a, b) = (row[j] as f64, row[j + half] as f64);
                            row[j] = (a * c - b * s) as f32;
                            row[j + half] = (b * c + a * s) as f32;
                        }
                    }
                    RopeMode::Interleaved => {
                        for (j, &(c, s)) in cs.iter().enumerate() {
                            let (a, b) = (row[2 * j] as f64, row[2 * j + 1] as f64);
                            row[2 * j] = (a * c - b * s) as f32;
                            row[2 * j + 1] = (b * c + a * s) as f32;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Rotate `x` (`[n, heads, head_dim]`) in place at `positions` (`[n]`) with `rope` and
/// `mscale` (multiplies cos and sin). See [`RopeTable::apply`].
pub fn apply_rope(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    positions: &[i64],
    rope: &Rope,
    mscale: f32,
) -> Result<()> {
    RopeTable::new(rope, head_dim)?.apply(x, heads, positions, mscale)
}

/// Errors ([`AttnError::InvalidArgument`], `args.rope_mscale`) unless the rope scale is
/// finite (a NaN or infinite scale would turn every rotated q and k into NaN).
pub fn check_mscale(mscale: f32) -> Result<()> {
    if mscale.is_finite() {
        Ok(())
    } else {
        Err(AttnError::InvalidArgument {
            arg: "args.rope_mscale".into(),
            expected: "a finite rope scale".into(),
            got: mscale.to_string(),
        })
    }
}
