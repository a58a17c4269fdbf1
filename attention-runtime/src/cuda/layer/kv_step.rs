//! What every KV-cache step shares: kernel configs, argument checks, the projection and
//! `qkv_prep` launch.

use super::*;

/// q, k, v, gate and buffers that must outlive the queued kernels.
pub(super) type Prepped = (
    DeviceTensor,
    DeviceTensor,
    DeviceTensor,
    Option<DeviceTensor>,
    Vec<CudaSlice<i32>>,
);

/// Raw pointers of one `qkv_prep` launch (0 = null): `qkv [n, qkv_out]` in, q `[n, np, hn]`,
/// k/v `[n, ng, hn]`, gate `[n, np, hn]` out, int32 positions `[n]`.
pub(super) struct PrepPtrs {
    pub(super) qkv: u64,
    pub(super) q: u64,
    pub(super) k: u64,
    pub(super) v: u64,
    pub(super) gate: u64,
    pub(super) positions: u64,
}

/// KV-cache inference on the GPU (static cache): same semantics as the CPU layer's
/// `prefill` / `decode`.
impl CudaLayer {
    /// The KV-cache kernel of `phase`, from the registry's family function.
    pub(super) fn kv_config(&self, phase: Phase) -> Result<KernelConfig> {
        let (spec, hd) = (&self.config.spec, self.config.head_dim);
        match phase {
            Phase::DecodeRows => Ok(registry::decode_rows(spec, hd)),
            Phase::DecodeRowsPaged => Ok(registry::decode_rows_paged(spec, hd)),
            Phase::AppendKv => Ok(registry::append_kv(spec, hd)),
            Phase::DecodeSplitKv => registry::decode_splitkv(spec, hd).map_err(render_err),
            p => Err(AttnError::Render(format!("`{p}` is not a KV-cache kernel"))),
        }
    }

    /// The `qkv_prep` kernel of a fused decode step (no rope: `decode_splitkv` applies it).
    pub(super) fn decode_splitkv_prep(&self) -> Result<KernelConfig> {
        registry::qkv_prep_for_decode_splitkv(&self.config.spec, self.config.head_dim)
            .map_err(render_err)
    }

    /// The checks of [`crate::plan`] every static-cache step shares, plus the cache's dtype.
    pub(super) fn check_kv_step(
        &self,
        cache: &crate::cuda::DeviceStaticKvCache,
        args: &ForwardArgs<'_>,
    ) -> Result<()> {
        crate::plan::check_kv_args(&self.config, args)?;
        crate::plan::check_cache_geometry(&self.config, cache.groups(), cache.head_dim())?;
        // The cache's element type must be the layer's: the kernels write and read it raw.
        self.check_input("cache", cache.layer_k(0)?)?;
        Ok(())
    }

    /// linear_qkv + qkv_prep (`prep`, with rope at `positions` when it has rope).
    pub(super) fn project_and_prep(
        &self,
        x: &DeviceTensor,
        n: usize,
        prep: &KernelConfig,
        positions: Option<&[i32]>,
        mscale: f32,
    ) -> Result<Prepped> {
        crate::reference::rope::check_mscale(mscale)?;
        let rt = &*self.rt;
        let st = rt.stream();
        let c = &self.config;
        let (np, ng, hn) = (c.heads, c.groups, c.head_dim);
        let Projections::SelfAttention { qkv } = &self.proj_in else {
            return Err(bad("config.kind", "self-attention", "cross-attention"));
        };
        // The positions go up before the GEMM is queued (a copy from pageable host memory
        // may wait for the stream).
        let mut keep = Vec::new();
        let p_pos = match positions {
            Some(p) if prep.rope.is_some() => {
                let buf = upload(st, p, "positions")?;
                let ptr = dptr(&buf, rt);
                keep.push(buf);
                ptr
            }
            _ => 0,
        };
        let mut a = self.alloc(&[n, qkv.out_features()], "linear_qkv output")?;
        linear_qkv_into(rt, x, qkv, &mut a)?;
        let q = self.alloc(&[n, np, hn], "q")?;
        let k = self.alloc(&[n, ng, hn], "k")?;
        let v = self.alloc(&[n, ng, hn], "v")?;
        let gate = if c.output_gate {
            Some(self.alloc(&[n, np, hn], "gate")?)
        } else {
            None
        };
        let p = PrepPtrs {
            qkv: tptr(&a, rt),
            q: tptr(&q, rt),
            k: tptr(&k, rt),
            v: tptr(&v, rt),
            gate: opt_ptr(gate.as_ref(), rt),
            positions: p_pos,
        };
        // Queued only: `a` and the positions are freed in stream order after the kernel.
        self.launch_prep(st, prep, n, &p, mscale)?;
        drop(a);
        Ok((q, k, v, gate, keep))
    }

    /// The layer's part of every `qkv_prep` launch: norm weights, eps, rope base, `mscale`,
    /// head counts; buffers, token counts and the flag stay null / 0 for the caller to set.
    pub(super) fn prep_params(&self, mscale: f32) -> PrepParams {
        let rt = &*self.rt;
        let c = &self.config;
        PrepParams {
            q_norm_weight: opt_ptr(self.q_norm.0.as_ref(), rt),
            q_norm_bias: opt_ptr(self.q_norm.1.as_ref(), rt),
            k_norm_weight: opt_ptr(self.k_norm.0.as_ref(), rt),
            k_norm_bias: opt_ptr(self.k_norm.1.as_ref(), rt),
            eps: c.eps,
            rotary_base: c.rope.map_or(10000.0, |r| r.rotary_base as f32),
            mscale,
            num_heads: c.heads as i32,
            num_groups: c.groups as i32,
            ..PrepParams::default()
        }
    }

    /// Queue the `append_kv` kernel (`kernel`, loaded from [`kv_config`](Self::kv_config))
    /// over `rows` new token rows: one block per row.
    ///
    /// # Safety
    /// `p`'s buffers hold `rows` rows and destinations with room for them (the caller
    /// validated capacity and block ids on the host).
    pub(super) unsafe fn launch_append(
        &self,
        kernel: &(String, cudarc::driver::CudaFunction),
        rows: usize,
        p: &AppendParams,
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: AppendParams is the append_kv parameter layout (tests/
        // nvrtc_params_layout.rs); buffers as the caller guarantees.
        unsafe { launch_params(self.rt.stream(), &kernel.1, cfg, p) }.map_err(launch_err(&kernel.0))
    }

    /// Queue the `qkv_prep` kernel `prep` over `n` rows on `stream` (raw pointers, so it
    /// can be captured in a graph). Returns the kernel key.
    pub(super) fn launch_prep(
        &self,
        stream: &Arc<cudarc::driver::CudaStream>,
        prep: &KernelConfig,
        n: usize,
        p: &PrepPtrs,
        mscale: f32,
    ) -> Result<String> {
        let (key, f) = kernel(&self.rt, prep)?;
        let cfg = LaunchConfig {
            grid_dim: (to_i32("rows", n as i64)? as u32, 1, 1),
            block_dim: ((prep.warps * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // Cache paths never read a masked key (exact per-row kernels, range-exact decode):
        // no v_nonfinite flag.
        let params = PrepParams {
            qkv: p.qkv,
            q_out: p.q,
            k_out: p.k,
            v_out: p.v,
            gate_out: p.gate,
            positions: p.positions,
            num_tokens: n as i32,
            num_kv_tokens: n as i32,
            ..self.prep_params(mscale)
        };
        // SAFETY: PrepParams is the qkv_prep parameter layout (tests/nvrtc_params_layout.rs);
        // the caller's buffers have the documented shapes for `n` rows; positions has n
        // entries when rope is on.
        unsafe { launch_params(stream, &f, cfg, &params) }.map_err(launch_err(&key))?;
        Ok(key)
    }
}
