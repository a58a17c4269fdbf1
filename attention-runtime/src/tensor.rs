//! Host tensors: row-major f32 with an explicit shape.
//!
//! The CPU reference backend computes in f32 (accumulating in f64 where it matters). Layouts
//! follow the reference system: hidden states are sequence-first `[s, b, h]`, packed (THD)
//! hidden states are `[t, h]`, per-head tensors `[s, b, heads, head_dim]` or `[t, heads,
//! head_dim]`. The last dimension is contiguous.

use crate::error::{AttnError, Result};

/// The element count of `shape`, or [`AttnError::InvalidArgument`] (`shape`) when it
/// overflows `usize`.
fn checked_numel(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| AttnError::InvalidArgument {
            arg: "shape".into(),
            expected: "an element count that fits in usize".into(),
            got: format!("{shape:?}"),
        })
}

/// A row-major f32 tensor on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    /// A tensor of `shape` over `data` (row-major). Errors ([`AttnError::InvalidArgument`])
    /// when the lengths disagree (`data`) or the shape's element count overflows `usize`
    /// (`shape`).
    pub fn new(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        let n = checked_numel(shape)?;
        if n != data.len() {
            return Err(AttnError::InvalidArgument {
                arg: "data".into(),
                expected: format!("{n} elements for shape {shape:?}"),
                got: format!("{} elements", data.len()),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            data,
        })
    }

    /// [`from_fn`](Self::from_fn) that returns an error instead of aborting or panicking:
    /// [`AttnError::InvalidArgument`] (`shape`) when the element count overflows `usize` or
    /// the host cannot allocate it.
    pub fn try_from_fn(shape: &[usize], f: impl FnMut(usize) -> f32) -> Result<Self> {
        let n = checked_numel(shape)?;
        let mut data: Vec<f32> = Vec::new();
        data.try_reserve_exact(n)
            .map_err(|e| AttnError::InvalidArgument {
                arg: "shape".into(),
                expected: "a tensor the host can allocate".into(),
                got: format!("{shape:?}: {n} f32 ({e})"),
            })?;
        data.extend((0..n).map(f));
        Ok(Tensor {
            shape: shape.to_vec(),
            data,
        })
    }

    /// A tensor of zeros. Panics when the element count overflows `usize` or cannot be
    /// allocated (as `vec!` does); [`try_from_fn`](Self::try_from_fn) returns an error instead.
    pub fn zeros(shape: &[usize]) -> Self {
        let n = shape.iter().product();
        Tensor {
            shape: shape.to_vec(),
            data: vec![0.0; n],
        }
    }

    /// A tensor whose element at flat index `i` is `f(i)`. Panics as [`zeros`](Self::zeros)
    /// does; [`try_from_fn`](Self::try_from_fn) returns an error instead.
    pub fn from_fn(shape: &[usize], f: impl FnMut(usize) -> f32) -> Self {
        let n = shape.iter().product();
        Tensor {
            shape: shape.to_vec(),
            data: (0..n).map(f).collect(),
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The elements, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The elements, row-major, mutable.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Take the elements.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// The same elements under a new shape with the same element count.
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        Tensor::new(shape, self.data)
    }

    /// Check that the shape equals `expected`, naming `arg` in the error. `None` entries
    /// match any size.
    pub fn expect_shape(&self, arg: &str, expected: &[Option<usize>]) -> Result<()> {
        let ok = self.shape.len() == expected.len()
            && self
                .shape
                .iter()
                .zip(expected)
                .all(|(s, e)| e.is_none_or(|e| e == *s));
        if ok {
            Ok(())
        } else {
            let words: Vec<String> = expected
                .iter()
                .map(|e| e.map_or_else(|| "_".to_string(), |e| e.to_string()))
                .collect();
            Err(AttnError::Shape {
                arg: arg.into(),
                expected: format!("[{}]", words.join(", ")),
                got: self.shape.clone(),
            })
        }
    }
}

/// Element strides of a tensor of `shape` broadcast to the 4-d `target` (right-aligned, as in
/// PyTorch: missing leading dims and size-1 dims repeat with stride 0). Errors, naming `arg`,
/// when a dim is neither 1 nor the target's.
pub fn broadcast_strides(arg: &str, shape: &[usize], target: [usize; 4]) -> Result<[usize; 4]> {
    let err = || AttnError::Shape {
        arg: arg.into(),
        expected: format!("broadcastable to {target:?}"),
        got: shape.to_vec(),
    };
    if shape.len() > 4 {
        return Err(err());
    }
    let mut full = [1usize; 4];
    full[4 - shape.len()..].copy_from_slice(shape);
    let mut strides = [0usize; 4];
    let mut s = 1;
    for d in (0..4).rev() {
        if full[d] == target[d] && full[d] != 1 {
            strides[d] = s;
        } else if full[d] != 1 {
            return Err(err());
        }
        s *= full[d];
    }
    Ok(strides)
}

/// Check a copy of rows `src_row .. src_row + rows` of a row-major tensor of `src` shape into
/// rows `dst_row ..` of one of `dst` shape (a row: every dim after the first) and return the
/// row width in elements. Errors: `Shape` (`src`) for another row width or a range outside
/// either tensor.
pub(crate) fn check_row_copy(
    dst: &[usize],
    src: &[usize],
    dst_row: usize,
    src_row: usize,
    rows: usize,
) -> Result<usize> {
    let width = |s: &[usize]| s.iter().skip(1).product::<usize>();
    let w = width(dst);
    let (nd, ns) = (
        dst.first().copied().unwrap_or(0),
        src.first().copied().unwrap_or(0),
    );
    if width(src) != w || src_row + rows > ns || dst_row + rows > nd {
        return Err(AttnError::Shape {
            arg: "src".into(),
            expected: format!(
                "rows {src_row}..{} of width {w} into rows {dst_row}..{} of {dst:?}",
                src_row + rows,
                dst_row + rows,
            ),
            got: src.to_vec(),
        });
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_strides_right_aligned() {
        // [b, 1, 1, sk] padding mask against [b, np, sq, sk].
        assert_eq!(
            broadcast_strides("m", &[2, 1, 1, 5], [2, 4, 3, 5]).unwrap(),
            [5, 0, 0, 1]
        );
        // A bias without the batch dim: [np, sq, sk].
        assert_eq!(
            broadcast_strides("b", &[4, 3, 5], [2, 4, 3, 5]).unwrap(),
            [0, 15, 5, 1]
        );
        // Full shape.
        assert_eq!(
            broadcast_strides("b", &[2, 4, 3, 5], [2, 4, 3, 5]).unwrap(),
            [60, 15, 5, 1]
        );
    }

    #[test]
    fn broadcast_strides_errors_name_the_argument() {
        let e = broadcast_strides("attention_bias", &[3, 5], [2, 4, 3, 6]).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("attention_bias") && msg.contains("[3, 5]"),
            "{msg}"
        );
        assert!(broadcast_strides("m", &[1, 1, 1, 1, 1], [1, 1, 1, 1]).is_err());
    }
}
