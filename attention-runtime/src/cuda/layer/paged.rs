//! Mixed decode + prefill over a device paged cache.

use super::*;
use crate::cuda::decode::{
    decode_slots, decode_splitkv_kernels, launch_decode_splitkv_paged, num_splits,
};
use crate::cuda::params::PagedDecodeParams;
use attention_codegen::render::DECODE_SPLITKV_MAX_TOKENS;

impl CudaLayer {
    /// Mixed decode + prefill over a device paged cache, with the CPU layer's
    /// `forward_paged` semantics: `hidden` is packed `[T, h]`; request `i` owns rows
    /// `cu_seqlens_q[i] .. cu_seqlens_q[i + 1]` (decode requests first, then prefill chunks,
    /// though any order works), attends to its `seqlens_k[i]` cached keys (the new ones
    /// included, at positions `seqlens_k[i] - new_i ..`) bottom-right causal, with the
    /// spec's window, sinks and GQA. Returns `[T, h]` and `linear_proj`'s bias unadded.
    ///
    /// Launches: `linear_qkv` -> `qkv_prep` (rope at each token's own position) ->
    /// `append_kv` (rotated k and v into their pool blocks through `block_table`) ->
    /// attention, K/V read through the block table: the prefill chunks on the tensor-core
    /// forward kernel in its paged mode (one launch per run of consecutive prefill requests,
    /// so one launch when the decode requests come first; the one-warp-per-row `decode_rows_paged`
    /// kernel when its tile does not fit), the decode requests (1 to 16 new tokens each:
    /// decode, speculative or multi-token steps) on the split-KV decode kernel `decode_splitkv`
    /// in its paged mode plus its combine step, the group's heads times the request's tokens
    /// as the rows of its tile (when this GPU runs it; otherwise they join the prefill
    /// launches) -> `linear_proj`.
    ///
    /// Everything (layer, shapes, cu_seqlens, lengths, block ids, capacity, blocks shared or
    /// written by two requests) is validated and every kernel loaded on the host first: on
    /// error nothing is written. Errors: `Shape` (`hidden`), `DType` (`cache`; `hidden` for
    /// the device call), `InvalidArgument` (cross-attention, a pool of other groups or head
    /// dim, `layer`), `CuSeqlens`, `BlockId`, `CacheCapacity`, `DeviceAlloc`, `Jit`,
    /// `KernelLaunch`, `Cuda`.
    pub fn forward_paged(
        &self,
        hidden: &Tensor,
        cache: &mut crate::cuda::DevicePagedKvCache,
        layer: usize,
        batch: &crate::kv_cache::PagedBatch<'_>,
    ) -> Result<LayerOutput> {
        let h = self.config.hidden;
        if !matches!(hidden.shape(), [_, hh] if *hh == h) {
            return Err(AttnError::Shape {
                arg: "hidden".into(),
                expected: format!("[t, {h}] (packed)"),
                got: hidden.shape().to_vec(),
            });
        }
        let x = DeviceTensor::from_host(self.rt.stream(), hidden, self.elem)?;
        let out = self.forward_paged_device(&x, cache, layer, batch)?;
        let output = if hidden.shape()[0] == 0 {
            Tensor::new(&[0, h], Vec::new())?
        } else {
            out.to_host()?.reshape(hidden.shape())?
        };
        Ok(LayerOutput {
            output,
            bias: self.proj_bias_host.clone(),
        })
    }

    /// [`forward_paged`](Self::forward_paged) on device tensors, asynchronous: `hidden`
    /// packed `[T, h]` in the layer's dtype; returns the output `[T, h]` (`linear_proj`'s bias
    /// unadded). Queued on the runtime's stream, nothing synchronizes (see
    /// [`forward_device`](Self::forward_device) for when errors surface); the small per-step
    /// metadata (positions, cu_seqlens, lengths, block table) is uploaded per call.
    ///
    /// Errors (before anything is queued, the pool untouched): as `forward_paged`, plus
    /// `DType` (`hidden`).
    pub fn forward_paged_device(
        &self,
        hidden: &DeviceTensor,
        cache: &mut crate::cuda::DevicePagedKvCache,
        layer: usize,
        batch: &crate::kv_cache::PagedBatch<'_>,
    ) -> Result<DeviceTensor> {
        let c = &self.config;
        self.check_input("hidden", hidden)?;
        let step = crate::plan::paged_step(c, hidden.shape(), &*cache, batch)?;
        let h = c.hidden;
        let n = step.rows;
        let (kc, vc) = cache.layer_kv(layer)?;
        self.check_input("cache", kc)?;
        let table = batch.block_table;
        let (bs, max_blocks) = (cache.block_size(), table.max_blocks());
        to_i32("block_size", bs as i64)?;
        to_i32("block_table max_blocks", max_blocks as i64)?;
        to_i32("hidden rows", n as i64)?;
        if n == 0 {
            return self.alloc(&[0, h], "output");
        }
        // Resolve every kernel before anything is queued (see prefill_device).
        let append_kernel = kernel(&self.rt, &self.kv_config(Phase::AppendKv)?)?;
        kernel(&self.rt, &self.prep)?;
        let attn_config = match self.paged_prefill_config() {
            Some(fc) => fc,
            None => self.kv_config(Phase::DecodeRowsPaged)?,
        };
        let (attn_key, attn_f) = self.load_attention(&attn_config)?;
        let (wl, wr) = self.window()?;
        let reqs = step.requests;
        let mut plan = PagedPlan::new(&reqs, self.paged_decode_config().is_some());
        // The decode requests' kernel: the row-block variant for their most new tokens (if it
        // were missing, every request runs the prefill kernel, never none).
        let decode_config = match plan.decode.is_empty() {
            true => None,
            false => self.paged_decode_config_for(plan.decode_max_q),
        };
        if decode_config.is_none() && !plan.decode.is_empty() {
            plan = PagedPlan::new(&reqs, false);
        }
        let decode_kernels = match decode_config {
            Some(dc) => Some((
                decode_splitkv_kernels(&self.rt, &dc)?,
                decode_slots(&self.rt, &dc)?,
            )),
            None => None,
        };
        let splits = match (&decode_kernels, plan.decode.is_empty()) {
            (Some((_, slots)), false) => {
                num_splits(*slots, plan.decode.len(), c.groups, plan.decode_max_k)
            }
            _ => 0,
        };
        let decode_kernels = decode_kernels.map(|(k, _)| k);
        let positions: Vec<i32> = step
            .positions
            .iter()
            .map(|&p| to_i32("seqlens_k", p))
            .collect::<Result<_>>()?;
        let nreq = reqs.len();
        let rt = &*self.rt;
        let st = rt.stream();
        // Metadata up before the first GEMM is queued (a copy from pageable host memory may
        // wait for the stream).
        let cu_d = upload(st, batch.cu_seqlens_q, "cu_seqlens_q")?;
        let lens_d = upload(st, batch.seqlens_k, "seqlens_k")?;
        let table_d = upload(st, table.as_slice(), "block_table")?;
        let req_d = match (&decode_kernels, plan.decode.is_empty()) {
            (Some(_), false) => Some((
                upload(st, &plan.decode, "decode requests")?,
                upload(st, &plan.decode_row_starts, "decode row starts")?,
                upload(st, &plan.decode_row_tokens, "decode row tokens")?,
            )),
            _ => None,
        };
        let (q, k, v, gate, _keep) =
            self.project_and_prep(hidden, n, &self.prep, Some(&positions), 1.0)?;
        let (p_cu, p_lens, p_table) = (dptr(&cu_d, rt), dptr(&lens_d, rt), dptr(&table_d, rt));
        let (nr, ngr, bsi, mbi) = (nreq as i32, c.groups as i32, bs as i32, max_blocks as i32);
        let (pkc, pvc) = (tptr(kc, rt), tptr(vc, rt));
        let append = AppendParams {
            k: tptr(&k, rt),
            v: tptr(&v, rt),
            k_dst: pkc,
            v_dst: pvc,
            cu_seqlens_q: p_cu,
            seqlens_k: p_lens,
            block_table: p_table,
            batch: nr,
            num_groups: ngr,
            block_size: bsi,
            max_blocks_per_seq: mbi,
            ..AppendParams::default()
        };
        // SAFETY: k/v [n, ng, hn]; cu_seqlens_q [nreq + 1], seqlens_k [nreq], block_table
        // [rows, max_blocks] with rows >= nreq; every written block id was validated
        // against the pool by `cache.validate`.
        unsafe { self.launch_append(&append_kernel, n, &append) }?;
        let o = self.alloc(&[n, c.heads, c.head_dim], "attention output")?;
        let lse = crate::cuda::tensor::alloc_uninit::<f32>(st, c.heads * n, "lse")?;
        // Paged mode of prefill_sm80 (and the fields the `decode_rows_paged` fallback reads):
        // packed q by cu_seqlens_q, request r's cache_seqlens_k[r] keys through its block table
        // row.
        let params = FwdParams {
            q: tptr(&q, rt),
            k: pkc,
            v: pvc,
            out: tptr(&o, rt),
            lse: dptr(&lse, rt),
            cu_seqlens_q: p_cu,
            batch: nr,
            num_heads: c.heads as i32,
            num_groups: ngr,
            softmax_scale: c.softmax_scale,
            window_left: wl,
            window_right: wr,
            sinks: self.sinks.as_ref().map_or(0, |x| dptr(x, rt)),
            gate: opt_ptr(gate.as_ref(), rt),
            cache_seqlens_k: p_lens,
            block_table: p_table,
            block_size: bsi,
            max_blocks_per_seq: mbi,
            ..FwdParams::default()
        };
        // Prefill chunks: one launch per run of consecutive requests that are not decode requests
        // (one run when the decode requests come first), the request arrays offset to the
        // run's first request. The paged-path LSE is scratch (only the output is returned):
        // a run that is not the batch's last strides it by its own token count.
        for run in &plan.prefill_runs {
            let r0 = run.first as u64;
            let params = FwdParams {
                cu_seqlens_q: p_cu + 4 * r0,
                cache_seqlens_k: p_lens + 4 * r0,
                block_table: p_table + 4 * r0 * max_blocks as u64,
                batch: run.count as i32,
                seqlen_q: run.max_q as i32,
                ..params
            };
            let cfg = fwd_launch_config(&attn_config, run.max_q, c.heads, run.count);
            // SAFETY: FwdParams is the parameter layout of prefill_sm80 and decode_rows_paged
            // (tests/nvrtc_params_layout.rs): q/o/gate [n, np, hn] packed by cu_seqlens_q
            // [nreq + 1] (the run reads entries first .. first + count), lse [np, n] (indexed
            // below h * cu_seqlens_q[first + count] + n), pools [num_blocks, block_size, ng,
            // hn], seqlens_k [nreq] and every block id validated on the host
            // (`cache.validate`).
            // q has n token rows, each pool num_blocks * block_size (the TMA maps' extents).
            let pool_rows = kc.numel() / (c.groups * c.head_dim);
            unsafe {
                launch_prefill(
                    st,
                    &attn_f,
                    &attn_key,
                    &attn_config,
                    cfg,
                    &params,
                    (n, pool_rows),
                )
            }?;
        }
        // Decode rows: the split-KV decode kernel and its combine step over the block table.
        let mut decode_bufs = None;
        if let (Some((key, split_f, combine_f)), Some((req_d, starts_d, tokens_d))) =
            (&decode_kernels, req_d.as_ref())
        {
            let nd = plan.decode.len();
            let rows = plan.decode_row_tokens.len();
            let f32buf =
                |len: usize, arg: &str| crate::cuda::tensor::alloc_uninit::<f32>(st, len, arg);
            let o_part = f32buf(splits * rows * c.heads * c.head_dim, "decode o_part")?;
            let lse_part = f32buf(splits * rows * c.heads, "decode lse_part")?;
            let dp = PagedDecodeParams {
                q: params.q,
                k_pool: pkc,
                v_pool: pvc,
                o_part: dptr(&o_part, rt),
                lse_part: dptr(&lse_part, rt),
                out: params.out,
                lse: params.lse,
                sinks: params.sinks,
                gate: params.gate,
                requests: dptr(req_d, rt),
                cu_seqlens_q: p_cu,
                seqlens_k: p_lens,
                block_table: p_table,
                row_starts: dptr(starts_d, rt),
                row_tokens: dptr(tokens_d, rt),
                batch: nd as i32,
                merge_rows: rows as i32,
                num_heads: c.heads as i32,
                num_groups: ngr,
                num_splits: splits as i32,
                total_q: n as i32,
                block_size: bsi,
                max_blocks_per_seq: mbi,
                softmax_scale: c.softmax_scale,
                window_left: wl,
                window_right: wr,
            };
            // SAFETY: as the prefill launch; requests [nd] are decode requests of this batch
            // (1 to 16 query rows each, at most the config's row count), row_starts [nd + 1]
            // and row_tokens [rows] their merge rows; o_part / lse_part hold `splits` splits
            // of `rows` rows.
            unsafe { launch_decode_splitkv_paged(st, key, split_f, combine_f, &dp) }?;
            decode_bufs = Some((o_part, lse_part));
        }
        let o = o.view(&[n, c.heads * c.head_dim])?;
        let mut out = self.alloc(&[n, h], "output")?;
        linear_proj_into(rt, &o, &self.proj, &mut out)?;
        // Freed in stream order after the queued kernels.
        drop((
            q,
            k,
            v,
            gate,
            cu_d,
            lens_d,
            table_d,
            req_d,
            lse,
            decode_bufs,
        ));
        Ok(out)
    }
}

/// Consecutive requests `first .. first + count` of a paged batch, launched together on the
/// prefill kernel; `max_q` is their longest chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PrefillRun {
    first: usize,
    count: usize,
    max_q: usize,
}

/// Which request of a paged batch runs on which kernel.
#[derive(Debug, PartialEq, Eq)]
struct PagedPlan {
    /// Requests with 1 to 16 new tokens (decode, speculative or multi-token steps), for the
    /// split-KV decode kernel.
    decode: Vec<i32>,
    /// Their longest key count.
    decode_max_k: usize,
    /// Their most new tokens.
    decode_max_q: usize,
    /// `[decode.len() + 1]`: decode request `i`'s query rows are merge rows
    /// `decode_row_starts[i] ..`.
    decode_row_starts: Vec<i32>,
    /// Each merge row's packed token.
    decode_row_tokens: Vec<i32>,
    /// Maximal runs of the other requests with at least one new token.
    prefill_runs: Vec<PrefillRun>,
}

impl PagedPlan {
    /// With `split_decode`, requests with 1 to 16 new tokens
    /// ([`DECODE_SPLITKV_MAX_TOKENS`]) go to the decode kernel; every other request (and
    /// every request without it) to the prefill runs. Requests with no new token join a run
    /// (the kernel skips them) but never start one.
    fn new(reqs: &[crate::kv_cache::PagedRequest], split_decode: bool) -> PagedPlan {
        let is_decode = |r: &crate::kv_cache::PagedRequest| {
            split_decode && (1..=DECODE_SPLITKV_MAX_TOKENS).contains(&r.q_len)
        };
        let decode: Vec<i32> = (0..reqs.len())
            .filter(|&i| is_decode(&reqs[i]))
            .map(|i| i as i32)
            .collect();
        let decode_max_k = reqs
            .iter()
            .filter(|r| is_decode(r))
            .map(|r| r.k_len)
            .max()
            .unwrap_or(0);
        let mut prefill_runs: Vec<PrefillRun> = Vec::new();
        let mut open: Option<PrefillRun> = None;
        for (i, r) in reqs.iter().enumerate() {
            if is_decode(r) {
                prefill_runs.extend(open.take().filter(|run| run.max_q > 0));
                continue;
            }
            let run = open.get_or_insert(PrefillRun {
                first: i,
                count: 0,
                max_q: 0,
            });
            run.count += 1;
            run.max_q = run.max_q.max(r.q_len);
        }
        prefill_runs.extend(open.filter(|run| run.max_q > 0));
        let (mut decode_row_starts, mut decode_row_tokens) = (vec![0i32], Vec::new());
        for &i in &decode {
            let r = &reqs[i as usize];
            decode_row_tokens.extend((r.q_start..r.q_start + r.q_len).map(|t| t as i32));
            decode_row_starts.push(decode_row_tokens.len() as i32);
        }
        PagedPlan {
            decode_max_q: reqs
                .iter()
                .filter(|r| is_decode(r))
                .map(|r| r.q_len)
                .max()
                .unwrap_or(0),
            decode,
            decode_max_k,
            decode_row_starts,
            decode_row_tokens,
            prefill_runs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::PagedRequest;

    fn reqs(q_lens: &[usize]) -> Vec<PagedRequest> {
        let mut at = 0;
        q_lens
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                let r = PagedRequest {
                    q_start: at,
                    q_len: q,
                    k_len: 10 * (i + 1) + q,
                };
                at += q;
                r
            })
            .collect()
    }

    fn run(first: usize, count: usize, max_q: usize) -> PrefillRun {
        PrefillRun {
            first,
            count,
            max_q,
        }
    }

    #[test]
    fn decode_first_batches_take_one_prefill_launch() {
        let p = PagedPlan::new(&reqs(&[1, 1, 1, 30, 0, 17]), true);
        assert_eq!(p.decode, [0, 1, 2]);
        assert_eq!(p.decode_max_k, 31);
        assert_eq!(p.decode_max_q, 1);
        assert_eq!(p.decode_row_starts, [0, 1, 2, 3]);
        assert_eq!(p.decode_row_tokens, [0, 1, 2]);
        assert_eq!(p.prefill_runs, [run(3, 3, 30)]);
    }

    #[test]
    fn requests_of_up_to_16_tokens_take_the_decode_kernel() {
        // q_lens 1, 4, 16, 17, 2 at tokens 0, 1, 5, 21, 38.
        let p = PagedPlan::new(&reqs(&[1, 4, 16, 17, 2]), true);
        assert_eq!(p.decode, [0, 1, 2, 4]);
        assert_eq!(p.decode_max_q, 16);
        assert_eq!(p.decode_max_k, 10 * 5 + 2);
        assert_eq!(p.decode_row_starts, [0, 1, 5, 21, 23]);
        let want: Vec<i32> = (0..21).chain([38, 39]).collect();
        assert_eq!(p.decode_row_tokens, want);
        assert_eq!(p.prefill_runs, [run(3, 1, 17)]);
    }

    #[test]
    fn any_order_splits_into_runs() {
        let p = PagedPlan::new(&reqs(&[50, 1, 0, 1, 20, 30, 1]), true);
        assert_eq!(p.decode, [1, 3, 6]);
        assert_eq!(p.prefill_runs, [run(0, 1, 50), run(4, 2, 30)]);
        // An empty request alone starts no launch.
        let p = PagedPlan::new(&reqs(&[1, 0, 1]), true);
        assert_eq!(p.prefill_runs, []);
        assert_eq!(p.decode, [0, 2]);
    }

    #[test]
    fn without_the_decode_kernel_everything_is_one_run() {
        let p = PagedPlan::new(&reqs(&[1, 4, 1]), false);
        assert!(p.decode.is_empty());
        assert_eq!(p.prefill_runs, [run(0, 3, 4)]);
    }
}
