//! Mixed decode + prefill over a device paged cache.

use super::*;

impl CudaLayer {
    /// Mixed decode + prefill over a device paged cache, with the CPU layer's
    /// `forward_paged` semantics: `hidden` is packed `[T, h]`; request `i` owns rows
    /// `cu_seqlens_q[i] .. cu_seqlens_q[i + 1]` (decode requests first, then prefill chunks,
    /// though any order works), attends to its `seqlens_k[i]` cached keys (the new ones
    /// included, at positions `seqlens_k[i] - new_i ..`) bottom-right causal, with the
    /// spec's window, sinks and GQA. Returns `[T, h]` and `linear_proj`'s bias unadded.
    ///
    /// Launches: `linear_qkv` -> `qkv_prep` (rope at each token's own position) ->
    /// `kvappend` (rotated k and v into their pool blocks through `block_table`) -> the
    /// tensor-core forward kernel in its paged mode (every request in one launch, K/V through
    /// the block table; the one-warp-per-row `paged` kernel when its tile does not fit) ->
    /// `linear_proj`.
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
        if hidden.elem() != self.elem {
            return Err(AttnError::DType {
                arg: "hidden".into(),
                expected: self.elem.name().into(),
                got: hidden.elem().name().into(),
            });
        }
        let plan = crate::plan::paged_step(c, hidden.shape(), &*cache, batch)?;
        let h = c.hidden;
        let n = plan.rows;
        let (kc, vc) = cache.layer_kv(layer)?;
        if kc.elem() != self.elem {
            return Err(AttnError::DType {
                arg: "cache".into(),
                expected: self.elem.name().into(),
                got: kc.elem().name().into(),
            });
        }
        let table = batch.block_table;
        let (bs, max_blocks) = (cache.block_size(), table.max_blocks());
        to_i32("block_size", bs as i64)?;
        to_i32("block_table max_blocks", max_blocks as i64)?;
        to_i32("hidden rows", n as i64)?;
        if n == 0 {
            return self.alloc(&[0, h], "output");
        }
        // Resolve every kernel before anything is queued (see prefill_device).
        let append_kernel = kernel(&self.rt, &self.kv_config(Phase::PagedAppend)?)?;
        kernel(&self.rt, &self.prep)?;
        let fast = self.paged_prefill_config();
        let attn_kernel = match &fast {
            Some(fc) => self.load_fast(fc)?,
            None => kernel(&self.rt, &self.kv_config(Phase::Paged)?)?,
        };
        let positions: Vec<i32> = plan
            .positions
            .iter()
            .map(|&p| to_i32("seqlens_k", p))
            .collect::<Result<_>>()?;
        let (reqs, max_q) = (&plan.requests, plan.max_q);
        let nreq = reqs.len();
        let rt = &*self.rt;
        let st = rt.stream();
        let (q, k, v, gate, _keep) =
            self.project_and_prep(hidden, n, &self.prep, Some(&positions), 1.0)?;
        let cu_d = upload(st, batch.cu_seqlens_q, "cu_seqlens_q")?;
        let lens_d = upload(st, batch.seqlens_k, "seqlens_k")?;
        let table_d = upload(st, table.as_slice(), "block_table")?;
        let (p_cu, p_lens, p_table) = (dptr(&cu_d, rt), dptr(&lens_d, rt), dptr(&table_d, rt));
        let (nr, ngr, bsi, mbi) = (nreq as i32, c.groups as i32, bs as i32, max_blocks as i32);
        let (pkc, pvc) = (tptr(kc, rt), tptr(vc, rt));
        {
            let (key, f) = append_kernel;
            let (pk, pv) = (tptr(&k, rt), tptr(&v, rt));
            let zero = 0i32;
            let cfg = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut lb = st.launch_builder(&f);
            lb.arg(&pk)
                .arg(&pv)
                .arg(&pkc)
                .arg(&pvc)
                .arg(&p_cu)
                .arg(&p_lens)
                .arg(&p_table);
            lb.arg(&nr)
                .arg(&ngr)
                .arg(&bsi)
                .arg(&mbi)
                .arg(&zero)
                .arg(&zero);
            // SAFETY: matches the kvappend entry point; k/v [n, ng, hn]; cu_seqlens_q
            // [nreq + 1], seqlens_k [nreq], block_table [rows, max_blocks] with rows >= nreq;
            // every written block id was validated against the pool by `cache.validate`.
            unsafe { lb.launch(cfg) }.map_err(launch_err(&key))?;
        }
        let o = self.alloc(&[n, c.heads, c.head_dim], "attention output")?;
        let lse = crate::cuda::tensor::alloc_uninit::<f32>(st, c.heads * n, "lse")?;
        let (pq, po, plse) = (tptr(&q, rt), tptr(&o, rt), dptr(&lse, rt));
        let nh = c.heads as i32;
        let scale = c.softmax_scale;
        let (wl, wr) = match c.window {
            Some(w) => (to_i32("window", w.left)?, to_i32("window", w.right)?),
            None => (-1, -1),
        };
        let p_sinks = self.sinks.as_ref().map_or(0, |x| dptr(x, rt));
        let p_gate = opt_ptr(gate.as_ref(), rt);
        let (key, f) = attn_kernel;
        if let Some(fc) = fast {
            // Every request (decode rows and prefill chunks) on the tensor-core kernel,
            // K/V through the block table.
            let tile = fc.fast_tile();
            let cfg = LaunchConfig {
                grid_dim: (
                    max_q.div_ceil(tile.block_m).max(1) as u32,
                    c.heads as u32,
                    nreq as u32,
                ),
                block_dim: ((tile.warps * 32) as u32, 1, 1),
                shared_mem_bytes: tile.smem_bytes(c.head_dim) as u32,
            };
            let (null, zero_i, zero_l) = (0u64, 0i32, 0i64);
            let mq = to_i32("max_seqlen_q", max_q as i64)?;
            let mut lb = st.launch_builder(&f);
            lb.arg(&pq).arg(&pkc).arg(&pvc).arg(&po).arg(&plse);
            lb.arg(&p_cu).arg(&null).arg(&nr).arg(&nh).arg(&ngr);
            lb.arg(&mq).arg(&zero_i).arg(&scale).arg(&wl).arg(&wr);
            lb.arg(&null)
                .arg(&zero_l)
                .arg(&zero_l)
                .arg(&zero_l)
                .arg(&zero_l);
            lb.arg(&null)
                .arg(&zero_l)
                .arg(&zero_l)
                .arg(&zero_l)
                .arg(&zero_l);
            lb.arg(&p_sinks).arg(&p_gate).arg(&null).arg(&null);
            lb.arg(&p_lens).arg(&zero_i).arg(&zero_i);
            lb.arg(&p_table).arg(&bsi).arg(&mbi);
            // SAFETY: matches the fwdfast entry point in its paged mode (templates/
            // fwd_fast.cu): q/o/gate [n, np, hn] packed by cu_seqlens_q [nreq + 1], lse
            // [np, n], pools [num_blocks, block_size, ng, hn], seqlens_k [nreq] and every
            // block id validated on the host (`cache.validate`).
            unsafe { lb.launch(cfg) }.map_err(launch_err(&key))?;
        } else if nreq > 0 {
            let pcfg = self.kv_config(Phase::Paged)?;
            let cfg = LaunchConfig {
                grid_dim: (
                    max_q.div_ceil(pcfg.warps) as u32,
                    c.heads as u32,
                    nreq as u32,
                ),
                block_dim: ((pcfg.warps * 32) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut lb = st.launch_builder(&f);
            lb.arg(&pq).arg(&pkc).arg(&pvc).arg(&po).arg(&plse);
            lb.arg(&p_cu).arg(&p_lens).arg(&p_table);
            lb.arg(&nr).arg(&nh).arg(&ngr).arg(&bsi).arg(&mbi);
            lb.arg(&scale).arg(&wl).arg(&wr).arg(&p_sinks).arg(&p_gate);
            // SAFETY: matches the paged entry point; q/o/gate [n, np, hn] packed, lse
            // [np, n], pools [num_blocks, block_size, ng, hn], lengths validated on the host.
            unsafe { lb.launch(cfg) }.map_err(launch_err(&key))?;
        }
        let o = o.view(&[n, c.heads * c.head_dim])?;
        let mut out = self.alloc(&[n, h], "output")?;
        linear_proj_into(rt, &o, &self.proj, &mut out)?;
        // Freed in stream order after the queued kernels.
        drop((q, k, v, gate, cu_d, lens_d, table_d, lse));
        Ok(out)
    }
}
