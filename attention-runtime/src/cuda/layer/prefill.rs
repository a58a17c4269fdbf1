//! Prefill over a device static cache on the tensor-core forward kernel.

use super::*;
use attention_codegen::render::DECODE_SPLITKV_MAX_TOKENS;

impl CudaLayer {
    /// The key of the attention kernel a static-cache step of `tokens` new tokens per
    /// sequence (without explicit positions) runs on this GPU: `decode_splitkv_*` (its
    /// `_rb2` / `_rb4` variant for more rows) up to 16 tokens when this GPU runs it, else the
    /// tensor-core forward kernel over the cache (`prefill_*_sm80` / `_sm90`) or its
    /// `decode_rows_*` fallback. Errors: `Render` (a spec the registry cannot build).
    pub fn cache_step_kernel(&self, tokens: usize) -> Result<String> {
        if (1..=DECODE_SPLITKV_MAX_TOKENS).contains(&tokens)
            && matches!(self.proj_in, Projections::SelfAttention { .. })
        {
            if let Some(c) = self.decode_step_config(tokens)? {
                return Ok(c.key());
            }
        }
        Ok(match self.cache_prefill_config() {
            Some(c) => c.key(),
            None => self.kv_config(Phase::DecodeRows)?.key(),
        })
    }

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
    /// in place; a step of at most 16 tokens without `args.positions` runs the fused decode
    /// step instead ([`decode_device_into`](Self::decode_device_into), multi-token decode). Returns the output `[s, b, h]` (`linear_proj`'s bias unadded); commit the
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
        self.check_input("hidden", hidden)?;
        let (s, b) = (plan.s, plan.b);
        let n = s * b;
        let starts = &plan.starts;
        if n == 0 {
            return self.alloc(&[s, b, h], "output");
        }
        // A short step (multi-token decode: speculative tokens, multi-token prediction) runs
        // the fused decode kernel: the group's heads times the tokens share each K/V tile, the
        // keys split across the GPU, instead of a 64-128-row query tile per head mostly empty.
        if s <= DECODE_SPLITKV_MAX_TOKENS
            && args.positions.is_none()
            && matches!(self.proj_in, Projections::SelfAttention { .. })
            && self.decode_step_config(s)?.is_some()
        {
            let mut out = self.alloc(&[s, b, h], "output")?;
            self.decode_device_into(hidden, &mut out, cache, layer, batch_offset, args)?;
            return Ok(out);
        }
        // Resolve every kernel before anything is queued: one that cannot be loaded
        // (ATTN_JIT=off with a cache that lacks it) fails with the cache untouched.
        let append_kernel = kernel(&self.rt, &self.kv_config(Phase::AppendKv)?)?;
        kernel(&self.rt, &self.prep)?;
        let attn_config = match self.cache_prefill_config() {
            Some(fc) => fc,
            None => self.kv_config(Phase::DecodeRows)?,
        };
        let (attn_key, attn_f) = self.load_attention(&attn_config)?;
        let (wl, wr) = self.window()?;
        let positions: Vec<i32> = plan
            .positions
            .iter()
            .map(|&p| to_i32("positions", p))
            .collect::<Result<_>>()?;
        let rt = &*self.rt;
        let st = rt.stream();
        // The lengths go up before the GEMM is queued (a copy from pageable host memory may
        // wait for the stream).
        let lens: Vec<i32> = starts.iter().map(|&l| (l + s) as i32).collect();
        let lens_d = upload(st, &lens, "seqlens_k")?;
        let (q, k, v, gate, _keep) =
            self.project_and_prep(hidden, n, &self.prep, Some(&positions), args.rope_mscale)?;
        let (kc, vc) = (cache.layer_k(layer)?, cache.layer_v(layer)?);
        // Append (padded [s, b] rows, static layout).
        let append = AppendParams {
            k: tptr(&k, rt),
            v: tptr(&v, rt),
            k_dst: tptr(kc, rt),
            v_dst: tptr(vc, rt),
            seqlens_k: dptr(&lens_d, rt),
            batch: b as i32,
            num_groups: c.groups as i32,
            block_size: 1,
            cache_batch_offset: batch_offset as i32,
            cache_max_batch: cache.max_batch() as i32,
            ..AppendParams::default()
        };
        // SAFETY: k/v [s, b, ng, hn] padded rows; capacity validated by check_append.
        unsafe { self.launch_append(&append_kernel, n, &append) }?;
        // Attention over the cache: the tensor-core forward kernel reading the cache slots
        // in place (bottom-right causal), or, when its tile does not fit this GPU, the
        // one-warp-per-row `decode_rows` kernel (the named fallback).
        let o = self.alloc(&[n, c.heads, c.head_dim], "attention output")?;
        let lse = crate::cuda::tensor::alloc_uninit::<f32>(st, c.heads * n, "lse")?;
        // Static-cache mode of prefill_sm80 (and the fields the `decode_rows` fallback reads):
        // padded q [s, b], keys of sequence i in cache slot batch_offset + i, cache_seqlens_k of
        // them.
        let params = FwdParams {
            q: tptr(&q, rt),
            k: tptr(kc, rt),
            v: tptr(vc, rt),
            out: tptr(&o, rt),
            lse: dptr(&lse, rt),
            batch: b as i32,
            num_heads: c.heads as i32,
            num_groups: c.groups as i32,
            seqlen_q: s as i32,
            softmax_scale: c.softmax_scale,
            window_left: wl,
            window_right: wr,
            sinks: self.sinks.as_ref().map_or(0, |x| dptr(x, rt)),
            gate: opt_ptr(gate.as_ref(), rt),
            cache_seqlens_k: dptr(&lens_d, rt),
            cache_batch_offset: batch_offset as i32,
            cache_max_batch: cache.max_batch() as i32,
            ..FwdParams::default()
        };
        let cfg = fwd_launch_config(&attn_config, s, c.heads, b);
        // SAFETY: FwdParams is the parameter layout of prefill_sm80 and decode_rows
        // (tests/nvrtc_params_layout.rs): q/o/gate [s, b, np, hn], cache layer [max_seq,
        // max_batch, ng, hn] with slots batch_offset..+b, cache_seqlens_k [b] <= max_seq
        // (check_append).
        let kv_tokens = kc.numel() / (c.groups * c.head_dim);
        unsafe {
            launch_prefill(
                st,
                &attn_f,
                &attn_key,
                &attn_config,
                cfg,
                &params,
                (n, kv_tokens),
            )
        }?;
        cache.mark_appended(layer, batch_offset, b, s);
        let o = o.view(&[n, c.heads * c.head_dim])?;
        let mut out = self.alloc(&[n, h], "output")?;
        linear_proj_into(rt, &o, &self.proj, &mut out)?;
        // Freed in stream order after the queued kernels.
        drop((q, k, v, gate, lens_d, lse));
        out.view(&[s, b, h])
    }
}
