//! Cross-attention over a cached encoder context on the GPU (encoder-decoder decoding), with
//! the CPU layer's semantics ([`CrossAttentionParts::set_context`] /
//! [`CrossAttentionParts::cross_step`](crate::CrossAttentionParts::cross_step)):
//!
//! - [`CudaLayer::set_context_device`], once per request and layer: `linear_kv` (cuBLASLt,
//!   bias fused) -> `qkv_prep` (cross layout, keys and values only) -> `append_kv` into the
//!   slots of a [`DeviceCrossKvCache`], whose device lengths are updated in stream order.
//! - [`CudaLayer::cross_step_device`], per prefill or decode step: `linear_q` -> the
//!   tensor-core forward kernel without mask in its static-cache mode (each slot's keys
//!   `0 .. context length` read in place, padding never visited), or `decode_rows_*_full` where
//!   this GPU cannot run it -> `linear_proj`. No upload: the lengths live on the device.
//!
//! [`CrossAttentionParts::set_context`]: crate::CrossAttentionParts::set_context

use super::*;
use crate::cuda::linear::{linear_kv_into, linear_q_into};
use crate::cuda::DeviceCrossKvCache;

impl CudaLayer {
    /// The tensor-core config of a step over a context cache
    /// ([`registry::cross_cache_step`]: the forward kernel without mask, in its
    /// static-cache mode); `None` when this GPU cannot run it (the `decode_rows_*_full` kernel
    /// runs then) or for a self-attention layer.
    pub fn cross_cache_step_config(&self) -> Option<KernelConfig> {
        if self.config.kind != AttentionKind::CrossAttention {
            return None;
        }
        registry::cross_cache_step(&self.config.spec, self.config.head_dim, self.target)
    }

    /// The key of the attention kernel [`cross_step_device`](Self::cross_step_device)
    /// launches on this GPU.
    pub fn cross_step_kernel_key(&self) -> String {
        match self.cross_cache_step_config() {
            Some(c) => c.key(),
            None => registry::decode_rows(&self.config.spec, self.config.head_dim).key(),
        }
    }

    /// Checks shared by both calls: a cross-attention layer, a cache of its heads, head dim
    /// and dtype, and `x` (`arg`) a `[s, b, h]` tensor of the layer's dtype. Returns `(s, b)`.
    fn check_cross_cache(
        &self,
        arg: &str,
        x: &DeviceTensor,
        cache: &DeviceCrossKvCache,
    ) -> Result<(usize, usize)> {
        let c = &self.config;
        if c.kind != AttentionKind::CrossAttention {
            return Err(bad(
                "config.kind",
                "cross-attention for a context cache",
                "self-attention",
            ));
        }
        let h = c.hidden;
        let (s, b) = match x.shape() {
            [s, b, hh] if *hh == h => (*s, *b),
            other => {
                return Err(AttnError::Shape {
                    arg: arg.into(),
                    expected: format!("[s, b, {h}]"),
                    got: other.to_vec(),
                })
            }
        };
        self.check_input(arg, x)?;
        if cache.heads() != c.heads || cache.head_dim() != c.head_dim {
            return Err(bad(
                "cache",
                format!("heads {} and head_dim {}", c.heads, c.head_dim),
                format!("heads {} and head_dim {}", cache.heads(), cache.head_dim()),
            ));
        }
        if cache.elem() != self.elem {
            return Err(AttnError::DType {
                arg: "cache".into(),
                expected: self.elem.name().into(),
                got: cache.elem().name().into(),
            });
        }
        to_i32(&format!("{arg} rows"), (s * b) as i64)?;
        Ok((s, b))
    }

    /// [`set_context_device`](Self::set_context_device) from a host context `[sk, b, h]`
    /// (uploaded in the layer's dtype). Errors as it does, the `Shape` of
    /// `key_value_states` checked before the upload.
    pub fn set_context(
        &self,
        key_value_states: &Tensor,
        cache: &mut DeviceCrossKvCache,
        layer: usize,
        batch_offset: usize,
        context_lens: Option<&[usize]>,
    ) -> Result<()> {
        let h = self.config.hidden;
        if !matches!(key_value_states.shape(), [_, _, hh] if *hh == h) {
            return Err(AttnError::Shape {
                arg: "key_value_states".into(),
                expected: format!("[sk, b, {h}]"),
                got: key_value_states.shape().to_vec(),
            });
        }
        let x = DeviceTensor::from_host(self.rt.stream(), key_value_states, self.elem)?;
        self.set_context_device(&x, cache, layer, batch_offset, context_lens)
    }

    /// Project a context once into `layer` of `cache` for slots `batch_offset ..
    /// batch_offset + b`, replacing what they held, on device tensors and asynchronous:
    /// `key_value_states` `[sk, b, h]` (the encoder output, the layer's dtype);
    /// `context_lens` `[b]` each slot's real length in `1..=sk` (positions past it are
    /// padding, never attended to), `None` = `sk` for every slot. Launches `linear_kv`,
    /// `qkv_prep` (cross layout, keys and values only) and `append_kv` (every `sk` row, the
    /// padding included, to cache positions `0 .. sk`), then queues the copy of the new
    /// lengths to the device. Nothing synchronizes (see
    /// [`forward_device`](Self::forward_device) for when device errors surface).
    ///
    /// Errors (before anything is queued, the cache untouched; every kernel is loaded
    /// first): `InvalidArgument` (`config.kind` for a self-attention layer, `cache` of other
    /// heads or head dim, `layer`, `context_lens`, an empty context), `Shape`
    /// (`key_value_states`), `DType` (`key_value_states`, `cache`), `CacheCapacity`
    /// (`max_batch` for the slot range, `max_ctx` when `sk` exceeds it), `Jit`,
    /// `DeviceAlloc`; `KernelLaunch` / `Cuda` from the device.
    pub fn set_context_device(
        &self,
        key_value_states: &DeviceTensor,
        cache: &mut DeviceCrossKvCache,
        layer: usize,
        batch_offset: usize,
        context_lens: Option<&[usize]>,
    ) -> Result<()> {
        let (sk, b) = self.check_cross_cache("key_value_states", key_value_states, cache)?;
        let lens = cache.check_context(layer, batch_offset, b, sk, context_lens)?;
        let c = &self.config;
        let (np, hn) = (c.heads, c.head_dim);
        let Projections::CrossAttention { kv: kv_lin, .. } = &self.proj_in else {
            return Err(bad("config.kind", "cross-attention", "self-attention"));
        };
        let nk = sk * b;
        if nk == 0 {
            return Ok(());
        }
        // Resolve every kernel before anything is queued.
        let (prep_key, prep_f) = kernel(&self.rt, &self.prep)?;
        let (app_key, app_f) = kernel(&self.rt, &self.kv_config(Phase::AppendKv)?)?;
        let rt = &*self.rt;
        let st = rt.stream();
        let mut a = self.alloc(&[nk, kv_lin.out_features()], "linear_kv output")?;
        linear_kv_into(rt, key_value_states, kv_lin, &mut a)?;
        let k = self.alloc(&[nk, np, hn], "k")?;
        let v = self.alloc(&[nk, np, hn], "v")?;
        let (pa, pk, pv) = (tptr(&a, rt), tptr(&k, rt), tptr(&v, rt));
        let nki = to_i32("key_value_states rows", nk as i64)?;
        let nh = np as i32;
        {
            let cfg = LaunchConfig {
                grid_dim: (nki as u32, 1, 1),
                block_dim: ((self.prep.warps * 32) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // The cross layout with no query rows (num_tokens 0: qkv and q_out never
            // touched): kv [nk, np * 2 * hn] (per head [k_h | v_h]) -> k / v [nk, np, hn];
            // no norm, rope or gate (cross specs have none).
            let p = PrepParams {
                kv: pa,
                k_out: pk,
                v_out: pv,
                eps: c.eps,
                rotary_base: 10000.0,
                mscale: 1.0,
                num_tokens: 0,
                num_kv_tokens: nki,
                num_heads: nh,
                num_groups: nh,
                ..PrepParams::default()
            };
            // SAFETY: PrepParams is the qkv_prep parameter layout (tests/
            // nvrtc_params_layout.rs); the grid covers every context row, buffers as above.
            unsafe { launch_params(st, &prep_f, cfg, &p) }.map_err(launch_err(&prep_key))?;
        }
        let seq: Vec<i32> = vec![sk as i32; b];
        let seq_d = upload(st, &seq, "context seqlens")?;
        {
            let (kc, vc) = (cache.layer_k(layer)?, cache.layer_v(layer)?);
            let append = AppendParams {
                k: pk,
                v: pv,
                k_dst: tptr(kc, rt),
                v_dst: tptr(vc, rt),
                seqlens_k: dptr(&seq_d, rt),
                batch: b as i32,
                num_groups: nh,
                block_size: 1,
                cache_batch_offset: batch_offset as i32,
                cache_max_batch: cache.max_batch() as i32,
                ..AppendParams::default()
            };
            // SAFETY: append_kv in its static mode (null block table, padded [sk, b] rows):
            // row t goes to position t / b of slot batch_offset + t % b, positions < sk <=
            // max_ctx and slots < max_batch (check_context), cache layer [max_ctx, max_batch,
            // np, hn].
            unsafe { self.launch_append(&(app_key, app_f), nk, &append) }?;
        }
        cache.commit_lens(st, layer, batch_offset, &lens)?;
        // Freed in stream order after the queued kernels.
        drop((a, k, v, seq_d));
        Ok(())
    }

    /// [`cross_step_device`](Self::cross_step_device) with host tensors in and out (the
    /// read-back synchronizes): `hidden` `[s, b, h]` -> output `[s, b, h]` and
    /// `linear_proj`'s bias unadded. Errors as it does.
    pub fn cross_step(
        &self,
        hidden: &Tensor,
        cache: &DeviceCrossKvCache,
        layer: usize,
        batch_offset: usize,
    ) -> Result<LayerOutput> {
        let h = self.config.hidden;
        if !matches!(hidden.shape(), [_, _, hh] if *hh == h) {
            return Err(AttnError::Shape {
                arg: "hidden".into(),
                expected: format!("[s, b, {h}]"),
                got: hidden.shape().to_vec(),
            });
        }
        let x = DeviceTensor::from_host(self.rt.stream(), hidden, self.elem)?;
        let out = self.cross_step_device(&x, cache, layer, batch_offset)?;
        let output = if hidden.numel() == 0 {
            Tensor::zeros(hidden.shape())
        } else {
            out.to_host()?.reshape(hidden.shape())?
        };
        Ok(LayerOutput {
            output,
            bias: self.proj_bias_host.clone(),
        })
    }

    /// A prefill or decode step over cached contexts, on device tensors and asynchronous:
    /// `hidden` `[s, b, h]` (the layer's dtype) holds `s` new decoder tokens of the requests
    /// in slots `batch_offset .. batch_offset + b` of `layer` (a decode step is `s = 1`).
    /// Runs `linear_q`, attention of each slot's queries over its context keys
    /// `0 .. context length` (no causal mask; the spec's window, bottom-right aligned to the
    /// slot's context, and sinks apply) on the tensor-core kernel reading the cache in place
    /// (`decode_rows_*_full` where this GPU cannot run it,
    /// [`cross_step_kernel_key`](Self::cross_step_kernel_key)), and `linear_proj`. Returns
    /// the output `[s, b, h]` (`linear_proj`'s bias unadded). The cache is only read;
    /// nothing is uploaded or synchronized.
    ///
    /// Errors (before anything is queued; the attention kernel is loaded first):
    /// `InvalidArgument` (`config.kind` for a self-attention layer, `cache` of other heads
    /// or head dim or naming a slot without context, `layer`, batch or heads past the grid
    /// limits), `Shape` / `DType` (`hidden`), `DType` (`cache`), `CacheCapacity`
    /// (`max_batch` for the slot range), `Jit`, `DeviceAlloc`; `KernelLaunch` / `Cuda` from
    /// the device. `s == 0` or `b == 0` returns an empty `[s, b, h]` tensor.
    pub fn cross_step_device(
        &self,
        hidden: &DeviceTensor,
        cache: &DeviceCrossKvCache,
        layer: usize,
        batch_offset: usize,
    ) -> Result<DeviceTensor> {
        let (s, b) = self.check_cross_cache("hidden", hidden, cache)?;
        cache.step_lens(layer, batch_offset, b)?;
        let c = &self.config;
        let (np, hn, h) = (c.heads, c.head_dim, c.hidden);
        if b > 65535 || np > 65535 {
            return Err(bad(
                "batch / heads",
                "at most 65535 each (grid z/y limits)",
                format!("batch {b} heads {np}"),
            ));
        }
        let Projections::CrossAttention { q: q_lin, .. } = &self.proj_in else {
            return Err(bad("config.kind", "cross-attention", "self-attention"));
        };
        let n = s * b;
        if n == 0 {
            return self.alloc(&[s, b, h], "output");
        }
        let (wl, wr) = self.window()?;
        // Resolve the attention kernel before anything is queued: the tensor-core kernel in
        // its static-cache mode, mask none, or `decode_rows_*_full` where it cannot run.
        let attn_config = match self.cross_cache_step_config() {
            Some(fc) => fc,
            None => self.kv_config(Phase::DecodeRows)?,
        };
        let (key, f) = self.load_attention(&attn_config)?;
        let rt = &*self.rt;
        let st = rt.stream();
        let mut q = self.alloc(&[n, np * hn], "linear_q output")?;
        linear_q_into(rt, hidden, q_lin, &mut q)?;
        let o = self.alloc(&[n, np, hn], "attention output")?;
        let lse = crate::cuda::tensor::alloc_uninit::<f32>(st, np * n, "lse")?;
        let (kc, vc) = (cache.layer_k(layer)?, cache.layer_v(layer)?);
        let params = FwdParams {
            q: tptr(&q, rt),
            k: tptr(kc, rt),
            v: tptr(vc, rt),
            out: tptr(&o, rt),
            lse: dptr(&lse, rt),
            batch: b as i32,
            num_heads: np as i32,
            num_groups: np as i32,
            seqlen_q: s as i32,
            softmax_scale: c.softmax_scale,
            window_left: wl,
            window_right: wr,
            sinks: self.sinks.as_ref().map_or(0, |x| dptr(x, rt)),
            cache_seqlens_k: cache.lens_ptr(st, layer, batch_offset),
            cache_batch_offset: batch_offset as i32,
            cache_max_batch: cache.max_batch() as i32,
            ..FwdParams::default()
        };
        let cfg = fwd_launch_config(&attn_config, s, np, b);
        // SAFETY: FwdParams is the parameter layout of prefill_sm80 and decode_rows (tests/
        // nvrtc_params_layout.rs): q/o [s, b, np, hn], cache layer [max_ctx, max_batch, np,
        // hn] with slots batch_offset..+b, cache_seqlens_k the cache's device lengths of those
        // slots, each in 1..=max_ctx (step_lens checked the host copy they mirror); lse
        // [np, s * b].
        let kv_tokens = kc.numel() / (np * hn);
        unsafe { launch_prefill(st, &f, &key, &attn_config, cfg, &params, (n, kv_tokens)) }?;
        let o = o.view(&[n, np * hn])?;
        let mut out = self.alloc(&[n, h], "output")?;
        linear_proj_into(rt, &o, &self.proj, &mut out)?;
        // Freed in stream order after the queued kernels.
        drop((q, lse));
        out.view(&[s, b, h])
    }
}
