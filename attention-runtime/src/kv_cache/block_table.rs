//! The block table: which pool blocks hold each request's keys and values.

use super::allocator::BlockAllocator;
use crate::error::{AttnError, Result};

/// Marker for an unused block-table entry.
pub const UNUSED_BLOCK: i32 = -1;

/// An int32 block table `[batch, max_blocks]`, row-major, as the kernels read it.
///
/// Row `r` lists, in order, the pool blocks holding positions `c * block_size ..
/// (c + 1) * block_size` of request `r` (entry `[r][c]`). Used entries come first; the rest of
/// the row is [`UNUSED_BLOCK`] (`-1`). Any other negative entry, or a used entry after an
/// unused one, is rejected by every constructor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockTable {
    batch: usize,
    max_blocks: usize,
    data: Vec<i32>,
}

impl BlockTable {
    /// An empty table (every entry `-1`) of `batch` rows of `max_blocks` entries.
    ///
    /// Errors (`InvalidArgument`) when `batch * max_blocks` overflows.
    pub fn new(batch: usize, max_blocks: usize) -> Result<Self> {
        let n = batch
            .checked_mul(max_blocks)
            .ok_or_else(|| AttnError::InvalidArgument {
                arg: "max_blocks".into(),
                expected: "batch * max_blocks to fit in usize".into(),
                got: format!("{batch} * {max_blocks}"),
            })?;
        Ok(BlockTable {
            batch,
            max_blocks,
            data: vec![UNUSED_BLOCK; n],
        })
    }

    /// A table over existing row-major int32 entries `[batch, max_blocks]`.
    ///
    /// Errors: `InvalidArgument` (`data`) on a length mismatch; `BlockId` naming
    /// `block_table[r][c]` on an entry below -1 or a used entry after an unused one.
    pub fn from_raw(batch: usize, max_blocks: usize, data: Vec<i32>) -> Result<Self> {
        let mut t = BlockTable::new(batch, max_blocks)?;
        if data.len() != t.data.len() {
            return Err(AttnError::InvalidArgument {
                arg: "data".into(),
                expected: format!("{} entries ([{batch}, {max_blocks}])", t.data.len()),
                got: format!("{} entries", data.len()),
            });
        }
        t.data = data;
        for r in 0..batch {
            t.check_row_form(r)?;
        }
        Ok(t)
    }

    /// Number of rows (requests).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Entries per row.
    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// All entries, row-major `[batch, max_blocks]` (what a kernel uploads).
    pub fn as_slice(&self) -> &[i32] {
        &self.data
    }

    /// Row `r` (`max_blocks` entries, used ones first, then `-1`).
    pub fn row(&self, r: usize) -> Result<&[i32]> {
        self.check_row_index(r)?;
        Ok(&self.data[r * self.max_blocks..(r + 1) * self.max_blocks])
    }

    /// Number of used entries in row `r`.
    pub fn row_len(&self, r: usize) -> Result<usize> {
        Ok(self.row(r)?.iter().take_while(|&&id| id >= 0).count())
    }

    /// Replace row `r` by `ids` (the rest of the row becomes `-1`).
    ///
    /// Errors (table unchanged): `InvalidArgument` for a bad row; `CacheCapacity` when `ids`
    /// is longer than `max_blocks`; `BlockId` naming `ids[i]` for an id above `i32::MAX`.
    pub fn set_row(&mut self, r: usize, ids: &[u32]) -> Result<()> {
        self.check_row_index(r)?;
        if ids.len() > self.max_blocks {
            return Err(AttnError::CacheCapacity {
                arg: format!("block_table row {r} (max_blocks)"),
                capacity: self.max_blocks,
                needed: ids.len(),
            });
        }
        for (i, &id) in ids.iter().enumerate() {
            Self::check_id_fits(&format!("ids[{i}]"), id)?;
        }
        let row = &mut self.data[r * self.max_blocks..(r + 1) * self.max_blocks];
        row.fill(UNUSED_BLOCK);
        for (dst, &id) in row.iter_mut().zip(ids) {
            *dst = id as i32;
        }
        Ok(())
    }

    /// Append block `id` to row `r`.
    ///
    /// Errors (table unchanged): `CacheCapacity` when the row is full; `BlockId` for an id
    /// above `i32::MAX`; `InvalidArgument` for a bad row.
    pub fn push(&mut self, r: usize, id: u32) -> Result<()> {
        let len = self.row_len(r)?;
        if len == self.max_blocks {
            return Err(AttnError::CacheCapacity {
                arg: format!("block_table row {r} (max_blocks)"),
                capacity: self.max_blocks,
                needed: len + 1,
            });
        }
        Self::check_id_fits("id", id)?;
        self.data[r * self.max_blocks + len] = id as i32;
        Ok(())
    }

    /// Set every entry of row `r` to `-1` (the caller releases the blocks).
    pub fn clear_row(&mut self, r: usize) -> Result<()> {
        self.check_row_index(r)?;
        self.data[r * self.max_blocks..(r + 1) * self.max_blocks].fill(UNUSED_BLOCK);
        Ok(())
    }

    /// Check every used entry against `allocator`: inside the pool and allocated.
    ///
    /// Errors with `BlockId` naming `block_table[r][c]`.
    pub fn validate(&self, allocator: &BlockAllocator) -> Result<()> {
        for r in 0..self.batch {
            for c in 0..self.row_len(r)? {
                self.check_entry(allocator, r, c)?;
            }
        }
        Ok(())
    }

    /// Check entry `[r][c]` against `allocator`: used, inside the pool and allocated.
    /// Returns the id. Errors with `BlockId` naming `block_table[r][c]`.
    pub(crate) fn check_entry(
        &self,
        allocator: &BlockAllocator,
        r: usize,
        c: usize,
    ) -> Result<u32> {
        let arg = format!("block_table[{r}][{c}]");
        let id = self.data[r * self.max_blocks + c];
        if id < 0 {
            return Err(AttnError::BlockId {
                arg,
                expected: "a block id (this entry is unused, -1)".into(),
                got: id as i64,
            });
        }
        allocator.check_allocated(&arg, id as i64)?;
        Ok(id as u32)
    }

    fn check_row_index(&self, r: usize) -> Result<()> {
        if r >= self.batch {
            return Err(AttnError::InvalidArgument {
                arg: "row".into(),
                expected: format!("a row in 0..{}", self.batch),
                got: r.to_string(),
            });
        }
        Ok(())
    }

    fn check_row_form(&self, r: usize) -> Result<()> {
        let row = &self.data[r * self.max_blocks..(r + 1) * self.max_blocks];
        let mut seen_unused = false;
        for (c, &id) in row.iter().enumerate() {
            let bad = id < UNUSED_BLOCK || (seen_unused && id != UNUSED_BLOCK);
            if bad {
                return Err(AttnError::BlockId {
                    arg: format!("block_table[{r}][{c}]"),
                    expected: "a block id >= 0 before any unused entry, or -1 (unused)".into(),
                    got: id as i64,
                });
            }
            seen_unused |= id == UNUSED_BLOCK;
        }
        Ok(())
    }

    fn check_id_fits(arg: &str, id: u32) -> Result<()> {
        if id > i32::MAX as u32 {
            return Err(AttnError::BlockId {
                arg: arg.into(),
                expected: format!("an id <= {}", i32::MAX),
                got: id as i64,
            });
        }
        Ok(())
    }
}
