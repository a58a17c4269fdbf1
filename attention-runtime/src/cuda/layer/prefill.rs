//! Prefill over a device static cache on the tensor-core forward kernel.

use super::*;

impl CudaLayer {
    /// Prefill (or any step of `s` tokens) over a device static cache with host tensors in
    /// and out: [`prefill_device`](Self::prefill_device) plus the copies (the read-back
    /// synchronizes). Errors as the CPU layer's `prefill`; on error nothing is written to
    /// the cache.
    pub fn prefill(
        &self,
        hidden: &Tensor,
        cache: &mut crate::cuda::DeviceStaticKvCache,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<LayerOutput> {
        // Plan first (nothing is uploaded for a call that cannot run).
        crate::plan::static_step(
            &self.config,
            hidden.shape(),
            &*cache,
            layer,
            batch_offset,
            args,
        )?;
        self.check_kv_step(cache, args)?;
        let x = DeviceTensor::from_host(self.rt.stream(), hidden, self.elem)?;
        let out = self.prefill_device(&x, cache, layer, batch_offset, args)?;
        Ok(LayerOutput {
            output: out.to_host()?.reshape(hidden.shape())?,
            bias: self.proj_bias_host.clone(),
        })
    }

    /// Prefill (or any step of `s` tokens) over a device static cache, on device tensors and
    /// asynchronous: `hidden` `[s, b, h]` (the layer's dtype) for slots
    /// `batch_offset .. batch_offset + b`; new k/v are appended at each slot's visible length
    /// (rope positions from there, or `args.positions` `[s]`), then the tokens attend to
    /// `[0, len + s)` bottom-right causal on the tensor-core forward kernel reading the cache
    /// in place. Returns the output `[s, b, h]` (`linear_proj`'s bias unadded); commit the
    /// append with [`DeviceStaticKvCache::advance`]. Queued on the runtime's stream, nothing
    /// synchronizes (see [`forward_device`](Self::forward_device) for when errors surface).
    ///
    /// Errors (before anything is queued, the cache untouched; every kernel is loaded
    /// first): `Shape` (`hidden`, `positions`), `DType` (`hidden`, `cache`),
    /// `InvalidArgument` (cross-attention, masks/bias/packing in `args`, a cache of other
    /// groups or head dim), `CacheCapacity`, `Jit` (a kernel that cannot be loaded, e.g.
    /// `ATTN_JIT=off` and a cache without it), `DeviceAlloc`; `KernelLaunch` / `Cuda` from
    /// the device. `s == 0` or `b == 0` returns an empty `[s, b, h]` tensor.
    pub fn prefill_device(
        &self,
        hidden: &DeviceTensor,
        cache: &mut crate::cuda::DeviceStaticKvCache,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<DeviceTensor> {
        let c = &self.config;
        let h = c.hidden;
        let plan = crate::plan::static_step(c, hidden.shape(), &*cache, layer, batch_offset, args)?;
        self.check_kv_step(cache, args)?;
        if hidden.elem() != self.elem {
            return Err(AttnError::DType {
                arg: "hidden".into(),
                expected: self.elem.name().into(),
                got: hidden.elem().name().into(),
            });
        }
        let (s, b) = (plan.s, plan.b);
        let n = s * b;
        let starts = &plan.starts;
        if n == 0 {
            return self.alloc(&[s, b, h], "output");
        }
        // Resolve every kernel before anything is queued: one that cannot be loaded
        // (ATTN_JIT=off with a cache that lacks it) fails with the cache untouched.
        let append_kernel = kernel(&self.rt, &self.kv_config(Phase::PagedAppend)?)?;
        kernel(&self.rt, &self.prep)?;
        let fast = self.cache_prefill_config();
        let attn_kernel = match &fast {
            Some(fc) => self.load_fast(fc)?,
            None => kernel(&self.rt, &self.kv_config(Phase::Decode)?)?,
        };
        let positions: Vec<i32> = plan
            .positions
            .iter()
            .map(|&p| to_i32("positions", p))
            .collect::<Result<_>>()?;
        let rt = &*self.rt;
        let st = rt.stream();
        let (q, k, v, gate, _keep) =
            self.project_and_prep(hidden, n, &self.prep, Some(&positions), args.rope_mscale)?;
        let lens: Vec<i32> = starts.iter().map(|&l| (l + s) as i32).collect();
        let lens_d = upload(st, &lens, "seqlens_k")?;
        let (kc, vc) = (cache.layer_k(layer)?, cache.layer_v(layer)?);
        // Append (padded [s, b] rows, static layout).
        {
            let (key, f) = append_kernel;
            let (pk, pv, pkc, pvc) = (tptr(&k, rt), tptr(&v, rt), tptr(kc, rt), tptr(vc, rt));
            let (null, pl) = (0u64, dptr(&lens_d, rt));
            let (bi, ngi, one, zero) = (b as i32, c.groups as i32, 1i32, 0i32);
            let (bo, mb) = (batch_offset as i32, cache.max_batch() as i32);
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
                .arg(&null)
                .arg(&pl)
                .arg(&null);
            lb.arg(&bi).arg(&ngi).arg(&one).arg(&zero).arg(&bo).arg(&mb);
            // SAFETY: matches the kvappend entry point; capacity validated by check_append.
            unsafe { lb.launch(cfg) }.map_err(launch_err(&key))?;
        }
        // Attention over the cache: the tensor-core forward kernel reading the cache slots
        // in place (bottom-right causal), or, when its tile does not fit this GPU, the
        // one-warp-per-row `decode` kernel (the named fallback).
        let o = self.alloc(&[n, c.heads, c.head_dim], "attention output")?;
        let lse = crate::cuda::tensor::alloc_uninit::<f32>(st, c.heads * n, "lse")?;
        let (wl, wr) = match c.window {
            Some(w) => (to_i32("window", w.left)?, to_i32("window", w.right)?),
            None => (-1, -1),
        };
        let p_sinks = self.sinks.as_ref().map_or(0, |x| dptr(x, rt));
        let p_gate = opt_ptr(gate.as_ref(), rt);
        let (pq, pkc, pvc, po, plse) = (
            tptr(&q, rt),
            tptr(kc, rt),
            tptr(vc, rt),
            tptr(&o, rt),
            dptr(&lse, rt),
        );
        let pl = dptr(&lens_d, rt);
        let (bi, bo, mb) = (b as i32, batch_offset as i32, cache.max_batch() as i32);
        let (nh, ngr, sq) = (c.heads as i32, c.groups as i32, s as i32);
        let scale = c.softmax_scale;
        let (key, f) = attn_kernel;
        if let Some(fc) = fast {
            let tile = fc.fast_tile();
            let cfg = LaunchConfig {
                grid_dim: (s.div_ceil(tile.block_m) as u32, c.heads as u32, b as u32),
                block_dim: ((tile.warps * 32) as u32, 1, 1),
                shared_mem_bytes: tile.smem_bytes(c.head_dim) as u32,
            };
            let (null, zero_i, zero_l) = (0u64, 0i32, 0i64);
            let mut lb = st.launch_builder(&f);
            lb.arg(&pq).arg(&pkc).arg(&pvc).arg(&po).arg(&plse);
            lb.arg(&null).arg(&null).arg(&bi).arg(&nh).arg(&ngr);
            lb.arg(&sq).arg(&zero_i).arg(&scale).arg(&wl).arg(&wr);
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
            lb.arg(&pl).arg(&bo).arg(&mb);
            lb.arg(&null).arg(&zero_i).arg(&zero_i);
            // SAFETY: matches the fwdfast entry point in its static-cache mode (templates/
            // fwd_fast.cu): q/o/gate [s, b, np, hn], cache layer [max_seq, max_batch, ng, hn]
            // with slots batch_offset..+b, cache_seqlens_k [b] <= max_seq (check_append).
            unsafe { lb.launch(cfg) }.map_err(launch_err(&key))?;
        } else {
            let dcfg = self.kv_config(Phase::Decode)?;
            let cfg = LaunchConfig {
                grid_dim: (s.div_ceil(dcfg.warps) as u32, c.heads as u32, b as u32),
                block_dim: ((dcfg.warps * 32) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut lb = st.launch_builder(&f);
            lb.arg(&pq).arg(&pkc).arg(&pvc).arg(&po).arg(&plse).arg(&pl);
            lb.arg(&bi).arg(&bo).arg(&mb).arg(&nh).arg(&ngr).arg(&sq);
            lb.arg(&scale).arg(&wl).arg(&wr).arg(&p_sinks).arg(&p_gate);
            // SAFETY: matches the decode entry point; q/o/gate [s, b, np, hn], cache layer
            // [max_seq, max_batch, ng, hn], seqlens_k [b].
            unsafe { lb.launch(cfg) }.map_err(launch_err(&key))?;
        }
        cache.mark_appended(layer, batch_offset, b, s);
        let o = o.view(&[n, c.heads * c.head_dim])?;
        let mut out = self.alloc(&[n, h], "output")?;
        linear_proj_into(rt, &o, &self.proj, &mut out)?;
        // Freed in stream order after the queued kernels.
        drop((q, k, v, gate, lens_d, lse));
        out.view(&[s, b, h])
    }
}
