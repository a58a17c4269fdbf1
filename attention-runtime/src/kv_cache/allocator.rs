//! The paged pool's block allocator: a free list plus per-block reference counts.
//!
//! A block id is a `u32` in `0..num_blocks` (block tables store them as `i32`, so a pool holds
//! at most `i32::MAX` blocks). A block is *allocated* while its reference count is positive.
//! Several requests may hold the same block (a shared prompt prefix): each holder beyond the
//! first calls [`BlockAllocator::retain`], every holder calls [`BlockAllocator::release`], and
//! the block returns to the free list when the last holder releases it.
//!
//! Every fallible call is all-or-nothing: on error the allocator is unchanged.

use crate::error::{AttnError, Result};

/// Free-list block allocator with reference counts.
///
/// Allocation pops from a LIFO free list (a freshly created allocator hands out `0, 1, 2, ...`),
/// so recently freed (cache-warm) blocks are reused first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockAllocator {
    /// Free block ids; the next allocation pops from the end.
    free: Vec<u32>,
    /// Reference count per block id; 0 = free.
    refcount: Vec<u32>,
}

impl BlockAllocator {
    /// An allocator over `num_blocks` blocks, all free.
    ///
    /// Errors (`InvalidArgument`, `num_blocks`) when `num_blocks` is 0 or above `i32::MAX`
    /// (block tables hold ids as int32).
    pub fn new(num_blocks: usize) -> Result<Self> {
        if num_blocks == 0 || num_blocks > i32::MAX as usize {
            return Err(AttnError::InvalidArgument {
                arg: "num_blocks".into(),
                expected: format!("1..={}", i32::MAX),
                got: num_blocks.to_string(),
            });
        }
        // `num_blocks <= i32::MAX` so every id fits in u32.
        let free = (0..num_blocks as u32).rev().collect();
        Ok(BlockAllocator {
            free,
            refcount: vec![0; num_blocks],
        })
    }

    /// Pool size in blocks.
    pub fn num_blocks(&self) -> usize {
        self.refcount.len()
    }

    /// Number of free blocks.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Number of allocated blocks.
    pub fn num_allocated(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Reference count of `id` (0 = free). Errors (`BlockId`) when `id` is outside the pool.
    pub fn refcount(&self, id: u32) -> Result<u32> {
        self.check_range("id", id as i64)?;
        Ok(self.refcount[id as usize])
    }

    /// Whether `id` is inside the pool and allocated.
    pub fn is_allocated(&self, id: u32) -> bool {
        self.refcount.get(id as usize).is_some_and(|&c| c > 0)
    }

    /// Allocate `n` blocks, each with reference count 1, all or nothing.
    ///
    /// Errors with `PoolExhausted` (allocator unchanged) when fewer than `n` blocks are free.
    pub fn alloc(&mut self, n: usize) -> Result<Vec<u32>> {
        if n > self.free.len() {
            return Err(AttnError::PoolExhausted {
                requested: n,
                free: self.free.len(),
                total: self.num_blocks(),
            });
        }
        let ids = self.free.split_off(self.free.len() - n);
        let ids: Vec<u32> = ids.into_iter().rev().collect();
        for &id in &ids {
            self.refcount[id as usize] = 1;
        }
        Ok(ids)
    }

    /// Add a holder to an allocated block (share it, e.g. a common prompt prefix).
    ///
    /// Errors (`BlockId`) when `id` is outside the pool or free, or its count would overflow.
    pub fn retain(&mut self, id: u32) -> Result<()> {
        self.check_allocated("id", id as i64)?;
        let c = &mut self.refcount[id as usize];
        *c = c.checked_add(1).ok_or_else(|| AttnError::BlockId {
            arg: "id".into(),
            expected: "a block with fewer than u32::MAX holders".into(),
            got: id as i64,
        })?;
        Ok(())
    }

    /// Drop one holder of `id`; the block returns to the free list when its count reaches 0.
    /// Returns whether the block was freed.
    ///
    /// Errors (`BlockId`, allocator unchanged) when `id` is outside the pool or already free
    /// (a double release).
    pub fn release(&mut self, id: u32) -> Result<bool> {
        self.check_allocated("id", id as i64)?;
        let c = &mut self.refcount[id as usize];
        *c -= 1;
        if *c == 0 {
            self.free.push(id);
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// Release every id in `ids` (a request's blocks), all or nothing: an id may appear at
    /// most as many times as it has holders. Returns how many blocks were freed.
    ///
    /// Errors (`BlockId` naming `ids[i]`, allocator unchanged) on an id outside the pool, free,
    /// or released more often than it is held.
    pub fn release_all(&mut self, ids: &[u32]) -> Result<usize> {
        let mut drops: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
        for (i, &id) in ids.iter().enumerate() {
            let arg = format!("ids[{i}]");
            self.check_allocated(&arg, id as i64)?;
            let d = drops.entry(id).or_insert(0);
            *d += 1;
            if *d > self.refcount[id as usize] {
                return Err(AttnError::BlockId {
                    arg,
                    expected: format!(
                        "a block released at most as often as it is held ({} holders)",
                        self.refcount[id as usize]
                    ),
                    got: id as i64,
                });
            }
        }
        let mut freed = 0;
        for &id in ids {
            if self.release(id)? {
                freed += 1;
            }
        }
        Ok(freed)
    }

    /// Check that `id` (named `arg` in the error) is inside the pool.
    pub(crate) fn check_range(&self, arg: &str, id: i64) -> Result<()> {
        if id < 0 || id as u64 >= self.num_blocks() as u64 {
            return Err(AttnError::BlockId {
                arg: arg.into(),
                expected: format!("an id in 0..{}", self.num_blocks()),
                got: id,
            });
        }
        Ok(())
    }

    /// Check that `id` (named `arg` in the error) is inside the pool and allocated.
    pub(crate) fn check_allocated(&self, arg: &str, id: i64) -> Result<()> {
        self.check_range(arg, id)?;
        if self.refcount[id as usize] == 0 {
            return Err(AttnError::BlockId {
                arg: arg.into(),
                expected: "an allocated block (this one is free)".into(),
                got: id,
            });
        }
        Ok(())
    }
}
