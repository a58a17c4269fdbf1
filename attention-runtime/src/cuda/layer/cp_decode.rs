//! KV-cache hooks of context parallelism into [`CudaLayer`], driven by
//! [`CpCudaLayer`](crate::parallel::CpCudaLayer)'s prefill and decode
//! (`parallel/cp_cuda_cache.rs`): appending a rank's own tokens to its device cache, the
//! partial attention (output and LSE) of one new query per slot over the keys a rank holds,
//! and the merge of every rank's partials.
//!
//! The partial runs on the context-parallel forward's own machinery: the visible keys of each
//! slot (a suffix of the rank's cached keys, then the new token's key on the rank that stores
//! it) are gathered from the cache into one key/value buffer, and the forward kernel attends
//! them with no mask (`KernelKind::Full`), writing its LSE, merged into an f32 running result
//! ([`CudaLayer::cp_partial`]).

use std::ops::Range;

use super::*;
use crate::cuda::cp_kernels::{upload_index, LoadedCp};
use crate::parallel::cp_plan::{KernelKind, Launch, Visibility};

impl CudaLayer {
    /// Load every kernel a context-parallel cache step runs (the helpers, `qkv_prep`,
    /// `append_kv`, the no-mask forward kernel), so a kernel that cannot be loaded is an error
    /// before the ranks agree on the step rather than a rank missing from a collective.
    pub(crate) fn cp_cache_kernels(&self) -> Result<()> {
        self.cp_helpers()?;
        kernel(&self.rt, &self.prep)?;
        kernel(&self.rt, &self.kv_config(Phase::AppendKv)?)?;
        self.cp_kernel(KernelKind::Full, MaskType::NoMask)?;
        Ok(())
    }

    /// Append rows `row0 ..` of `k`, `v` (`[rows, ng, hn]`, padded `[s, b]` order from
    /// `row0`) to slots `slot0 .. slot0 + b` of `layer` at their visible lengths, and mark
    /// them pending. Nothing is queued when the cache cannot take them.
    ///
    /// Errors: `InvalidArgument` (`layer`), `CacheCapacity`, `Shape` (`k`), `Jit`, launch
    /// errors.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cp_append(
        &self,
        cache: &mut DeviceStaticKvCache,
        layer: usize,
        slot0: usize,
        (k, v): (&DeviceTensor, &DeviceTensor),
        row0: usize,
        s: usize,
        b: usize,
    ) -> Result<()> {
        let c = &self.config;
        let w = c.groups * c.head_dim;
        let n = s * b;
        if n == 0 {
            return Ok(());
        }
        if k.numel() < (row0 + n) * w || v.numel() != k.numel() {
            return Err(AttnError::Shape {
                arg: "k".into(),
                expected: format!("at least {} rows of {w}, v alike", row0 + n),
                got: k.shape().to_vec(),
            });
        }
        self.check_input("k", k)?;
        self.check_input("cache", cache.layer_k(layer)?)?;
        let starts = cache.check_append(layer, slot0, b, s)?;
        let append_kernel = kernel(&self.rt, &self.kv_config(Phase::AppendKv)?)?;
        let rt = &*self.rt;
        let st = rt.stream();
        let lens: Vec<i32> = starts
            .iter()
            .map(|&l| to_i32("seqlens_k", (l + s) as i64))
            .collect::<Result<_>>()?;
        let lens_d = upload(st, &lens, "seqlens_k")?;
        let es = self.elem.size() as u64;
        let (kc, vc) = (cache.layer_k(layer)?, cache.layer_v(layer)?);
        let append = AppendParams {
            k: tptr(k, rt) + (row0 * w) as u64 * es,
            v: tptr(v, rt) + (row0 * w) as u64 * es,
            k_dst: tptr(kc, rt),
            v_dst: tptr(vc, rt),
            seqlens_k: dptr(&lens_d, rt),
            batch: b as i32,
            num_groups: c.groups as i32,
            block_size: 1,
            cache_batch_offset: slot0 as i32,
            cache_max_batch: cache.max_batch() as i32,
            ..AppendParams::default()
        };
        // SAFETY: k/v hold rows row0 .. row0 + s b of [ng, hn] (checked), padded [s, b];
        // the cache layer [max_seq, max_batch, ng, hn] has room for s more tokens in slots
        // slot0 .. + b (check_append).
        unsafe { self.launch_append(&append_kernel, n, &append) }?;
        cache.mark_appended(layer, slot0, b, s);
        drop(lens_d);
        Ok(())
    }

    /// The partial attention of `q` `[b, np, hn]` (one query per slot `slot0 + i`) over the
    /// cached keys `cached[i]` (a range of that slot's rows in `layer` of `cache`), then,
    /// when `new_kv` is given and `own[i]`, row `i` of its keys and values (`[b, ng, hn]`),
    /// every key visible. Returns the f32 result (a slot with no key keeps output 0 and LSE
    /// `-inf`).
    ///
    /// Errors: `Shape` for ranges outside the cache; `Jit`; launch errors.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cp_cache_partial(
        &self,
        cache: &DeviceStaticKvCache,
        layer: usize,
        slot0: usize,
        q: &DeviceTensor,
        cached: &[Range<usize>],
        (new_kv, own): ((&DeviceTensor, &DeviceTensor), &[bool]),
        h: &LoadedCp,
    ) -> Result<CpAcc> {
        let c = &self.config;
        let (ng, hn) = (c.groups, c.head_dim);
        let w = ng * hn;
        let b = cached.len();
        let (mb, ms) = (cache.max_batch(), cache.max_seq());
        let kern = self.cp_kernel(KernelKind::Full, MaskType::NoMask)?;
        let mut acc = self.cp_acc(b, h)?;
        // Key rows of each slot in the buffer: its cached range, then its new key.
        let lens: Vec<usize> = (0..b)
            .map(|i| cached[i].len() + usize::from(own.get(i).copied().unwrap_or(false)))
            .collect();
        let kv_rows: usize = lens.iter().sum();
        if kv_rows == 0 {
            return Ok(acc);
        }
        let idx: Vec<usize> = cached
            .iter()
            .enumerate()
            .flat_map(|(i, r)| r.clone().map(move |p| p * mb + slot0 + i))
            .collect();
        if cached.iter().any(|r| r.end > ms) || slot0 + b > mb {
            return Err(AttnError::Shape {
                arg: "cached".into(),
                expected: format!("rows within max_seq = {ms} of slots within {mb}"),
                got: cached.iter().map(|r| r.end).collect(),
            });
        }
        // Launches over runs of slots that have keys.
        let mut launches = Vec::new();
        let (mut i, mut k0) = (0, 0);
        while i < b {
            if lens[i] == 0 {
                i += 1;
                continue;
            }
            let (start, kstart) = (i, k0);
            let (mut cu_k, mut max_k) = (vec![0i32], 0);
            while i < b && lens[i] > 0 {
                k0 += lens[i];
                max_k = max_k.max(lens[i]);
                cu_k.push(to_i32("cu_seqlens_k", (k0 - kstart) as i64)?);
                i += 1;
            }
            let items = i - start;
            let l = Launch {
                kind: KernelKind::Full,
                q_rows: start..i,
                k_rows: kstart..k0,
                cu_q: (0..=items as i32).collect(),
                cu_k,
                delta0: vec![0; items],
                max_q: 1,
                max_k,
            };
            launches.push(self.cp_upload_launch(l, Visibility { lo: None, hi: None })?);
        }
        let st = self.rt.stream();
        let mut kv = self.alloc(&[2 * kv_rows, w], "cp decode k/v")?;
        if !idx.is_empty() {
            let table = upload_index(st, &idx, ms * mb)?;
            for (half, src) in [cache.layer_k(layer)?, cache.layer_v(layer)?]
                .into_iter()
                .enumerate()
            {
                let mut g = self.alloc(&[idx.len(), w], "cp decode cached k/v")?;
                h.gather_rows(st, src, &mut g, &table)?;
                let mut from = 0;
                let mut at = half * kv_rows;
                for (i, r) in cached.iter().enumerate() {
                    kv.copy_rows_from(st, at, &g, from, r.len())?;
                    from += r.len();
                    at += lens[i];
                }
            }
        }
        let mut at = 0;
        for i in 0..b {
            at += cached[i].len();
            if lens[i] > cached[i].len() {
                let (nk, nv) = new_kv;
                kv.copy_rows_from(st, at, nk, i, 1)?;
                kv.copy_rows_from(st, kv_rows + at, nv, i, 1)?;
                at += 1;
            }
        }
        for pl in &launches {
            self.cp_partial(&kern, pl, q, (&kv, kv_rows), &mut acc, h)?;
        }
        // Freed in stream order after the queued kernels.
        drop(kv);
        Ok(acc)
    }

    /// A rank's running result to all-gather: its output rounded to the layer's dtype
    /// (`[rows, np * hn]`, no sinks, no gate: they join after the merge of every rank) and its
    /// LSE (f32 `[np, rows]`). The merge kernel reads partials in the layer's dtype, as the
    /// context-parallel forward's partials are.
    pub(crate) fn cp_acc_tensors(
        &self,
        acc: CpAcc,
        h: &LoadedCp,
    ) -> Result<(DeviceTensor, DeviceTensor)> {
        let (np, hn) = (self.config.heads, self.config.head_dim);
        let st = self.rt.stream();
        let rows = acc.rows;
        let mut out = self.alloc(&[rows, np * hn], "cp partial output")?;
        let dims = (rows, np);
        match self.elem {
            ElemType::Bf16 => {
                h.finish::<bf16>(st, &acc.out, &acc.lse, None, (0, 0), &mut out, dims)
            }
            ElemType::F16 => h.finish::<f16>(st, &acc.out, &acc.lse, None, (0, 0), &mut out, dims),
            ElemType::F32 => h.finish::<f32>(st, &acc.out, &acc.lse, None, (0, 0), &mut out, dims),
        }?;
        Ok((out, DeviceTensor::from_slice(acc.lse, &[np, rows])?))
    }

    /// Merge every rank's partial, in rank order: `outs` `[cp * rows, np * hn]` (the layer's
    /// dtype) and `lses` f32 `[cp * np, rows]` (all-gathered
    /// [`cp_acc_tensors`](Self::cp_acc_tensors)).
    pub(crate) fn cp_merge_ranks(
        &self,
        (outs, lses): (&DeviceTensor, &DeviceTensor),
        cp: usize,
        rows: usize,
        h: &LoadedCp,
    ) -> Result<CpAcc> {
        let (np, hn) = (self.config.heads, self.config.head_dim);
        let st = self.rt.stream();
        let mut acc = self.cp_acc(rows, h)?;
        for r in 0..cp {
            let mut part = self.alloc(&[rows, np * hn], "cp part")?;
            part.copy_rows_from(st, 0, outs, r * rows, rows)?;
            let mut lse = DeviceTensor::uninit(st, ElemType::F32, &[np, rows], "cp part lse")?;
            lse.copy_rows_from(st, 0, lses, r * np, np)?;
            let lse_s = lse.typed::<f32>("cp part lse")?;
            let dims = (rows, 0, rows);
            match self.elem {
                ElemType::Bf16 => {
                    h.merge::<bf16>(st, &mut acc.out, &mut acc.lse, &part, lse_s, np, dims)
                }
                ElemType::F16 => {
                    h.merge::<f16>(st, &mut acc.out, &mut acc.lse, &part, lse_s, np, dims)
                }
                ElemType::F32 => {
                    h.merge::<f32>(st, &mut acc.out, &mut acc.lse, &part, lse_s, np, dims)
                }
            }?;
            // Freed in stream order after the merge.
            drop((part, lse));
        }
        Ok(acc)
    }
}
