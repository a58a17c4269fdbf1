//! [`CpLayout`]: which tokens a context-parallel rank holds.
//!
//! Each sequence (the whole padded sequence, or each packed sequence on its own) of `len`
//! tokens is cut into `2 cp` chunks of `len / (2 cp)` tokens; rank `r` holds chunks `r` and
//! `2 cp - 1 - r`, in that order, so every rank gets the same share of causal work
//! (semantics.md; Megatron's `get_batch_on_this_cp_rank`, TransformerEngine's THD split).
//! Every sequence length must be a multiple of `2 cp`.

use std::ops::Range;

use crate::error::{AttnError, Result};
use crate::modules::check_cu_seqlens;
use crate::tensor::Tensor;

/// A context-parallel rank's share of the sequences (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpLayout {
    /// This rank, `0..cp_size`.
    pub cp_rank: usize,
    /// Ranks in the context-parallel group.
    pub cp_size: usize,
}

impl CpLayout {
    /// Rank `cp_rank` of `cp_size`.
    ///
    /// Errors: [`AttnError::InvalidArgument`] (`cp_size` 0, `cp_rank` not below it).
    pub fn new(cp_rank: usize, cp_size: usize) -> Result<Self> {
        if cp_size == 0 || cp_rank >= cp_size {
            return Err(AttnError::InvalidArgument {
                arg: "cp_rank".into(),
                expected: format!("a rank below cp_size = {cp_size} (cp_size >= 1)"),
                got: cp_rank.to_string(),
            });
        }
        Ok(CpLayout { cp_rank, cp_size })
    }

    /// This layout for another rank of the group.
    pub fn of_rank(&self, cp_rank: usize) -> CpLayout {
        CpLayout { cp_rank, ..*self }
    }

    /// The two chunks (token ranges) this rank holds of a sequence of `len` tokens.
    ///
    /// Errors: [`AttnError::InvalidArgument`] (`arg`) when `len` is not a multiple of
    /// `2 cp_size`.
    pub fn chunks(&self, arg: &str, len: usize) -> Result<[Range<usize>; 2]> {
        let n = 2 * self.cp_size;
        if !len.is_multiple_of(n) {
            return Err(AttnError::InvalidArgument {
                arg: arg.into(),
                expected: format!("a sequence length that is a multiple of 2 * cp_size = {n}"),
                got: len.to_string(),
            });
        }
        let c = len / n;
        let (a, b) = (self.cp_rank, n - 1 - self.cp_rank);
        Ok([a * c..(a + 1) * c, b * c..(b + 1) * c])
    }

    /// The token index (within its sequence of `len`) of this rank's `i`-th local token of
    /// that sequence (`len` already checked by [`chunks`](Self::chunks)).
    pub fn token(&self, len: usize, i: usize) -> usize {
        let c = len / (2 * self.cp_size);
        if i < c {
            self.cp_rank * c + i
        } else {
            (2 * self.cp_size - 1 - self.cp_rank) * c + (i - c)
        }
    }

    /// The global rows (dim 0) of this rank's rows, in local order, for sequences split by
    /// `cu` (`[0, s]` for one padded sequence).
    pub fn local_rows(&self, arg: &str, cu: &[usize]) -> Result<Vec<usize>> {
        let mut rows = Vec::new();
        for w in cu.windows(2) {
            for r in self.chunks(arg, w[1] - w[0])? {
                rows.extend(r.map(|t| w[0] + t));
            }
        }
        Ok(rows)
    }

    /// The local `cu_seqlens` of global `cu_seqlens` (every length divided by `cp_size`).
    ///
    /// Errors: those of [`check_cu_seqlens`] (`cu_seqlens_q`, over `total` tokens), and of
    /// [`chunks`](Self::chunks) naming `cu_seqlens_q`.
    pub fn local_cu_seqlens(&self, cu: &[i32], total: usize) -> Result<Vec<i32>> {
        let c = check_cu_seqlens("cu_seqlens_q", cu, total)?;
        for w in c.windows(2) {
            self.chunks("cu_seqlens_q", w[1] - w[0])?;
        }
        Ok(c.iter().map(|&x| (x / self.cp_size) as i32).collect())
    }

    /// This rank's rows of a whole tensor: `full` `[s, ...]` (padded, one sequence along dim
    /// 0) when `cu` is `None`, or packed `[t, ...]` split by `cu`.
    ///
    /// Errors: those of [`local_rows`](Self::local_rows) / [`check_cu_seqlens`].
    pub fn split(&self, full: &Tensor, cu: Option<&[i32]>) -> Result<Tensor> {
        if full.rank() == 0 {
            return Err(AttnError::Shape {
                arg: "full".into(),
                expected: "[s, ...] (a sequence dimension first)".into(),
                got: vec![],
            });
        }
        let s = full.shape()[0];
        let cu = match cu {
            Some(cu) => check_cu_seqlens("cu_seqlens_q", cu, s)?,
            None => vec![0, s],
        };
        let rows = self.local_rows("full", &cu)?;
        let w = full.numel() / s.max(1);
        let data = rows
            .iter()
            .flat_map(|&r| full.data()[r * w..(r + 1) * w].iter().copied())
            .collect();
        let mut shape = full.shape().to_vec();
        shape[0] = rows.len();
        Tensor::new(&shape, data)
    }

    /// The whole tensor from every rank's [`split`](Self::split) part (`parts[r]` rank
    /// `r`'s), the inverse of `split`.
    ///
    /// Errors: [`AttnError::Shape`] (`parts`) for parts of other shapes or another count than
    /// `cp_size`; those of [`split`](Self::split).
    pub fn unsplit(&self, parts: &[Tensor], cu: Option<&[i32]>) -> Result<Tensor> {
        let first = parts
            .first()
            .map(|p| p.shape().to_vec())
            .unwrap_or_default();
        if parts.len() != self.cp_size
            || first.is_empty()
            || parts.iter().any(|p| p.shape() != first)
        {
            return Err(AttnError::Shape {
                arg: "parts".into(),
                expected: format!("{} parts of one shape [s / cp, ...]", self.cp_size),
                got: parts.iter().map(|p| p.numel()).collect(),
            });
        }
        let s = first[0] * self.cp_size;
        let cu = match cu {
            Some(cu) => check_cu_seqlens("cu_seqlens_q", cu, s)?,
            None => vec![0, s],
        };
        let w = parts[0].numel() / first[0].max(1);
        let mut shape = first.clone();
        shape[0] = s;
        let mut out = Tensor::zeros(&shape);
        for (r, p) in parts.iter().enumerate() {
            for (i, g) in self
                .of_rank(r)
                .local_rows("parts", &cu)?
                .into_iter()
                .enumerate()
            {
                out.data_mut()[g * w..(g + 1) * w].copy_from_slice(&p.data()[i * w..(i + 1) * w]);
            }
        }
        Ok(out)
    }
}
