//! The forward on device tensors ([`CudaLayer::forward_device`]) and its host-tensor
//! convenience: padded or packed sequences, every mask type, bias, sinks, gate.

use super::*;

/// Sequence geometry of one forward.
pub(super) struct Geometry {
    /// Rows (tokens) of the queries and the keys.
    nq: usize,
    nk: usize,
    /// `batch` argument: b (padded) or the number of sequences (packed).
    batch: usize,
    /// `seqlen_q` / `seqlen_k` (padded), longest sequences (packed).
    sq: usize,
    sk: usize,
    /// Device cu_seqlens (packed only).
    cu_q: Option<CudaSlice<i32>>,
    cu_k: Option<CudaSlice<i32>>,
}

impl CudaLayer {
    /// Forward on the GPU with host tensors in and out; same contract and errors as the CPU
    /// layer's `forward` (`hidden` `[s, b, h]`, or `[t, h]` with `args.packed`; returns the
    /// output of the same shape and `linear_proj`'s bias unadded).
    pub fn forward(&self, hidden: &Tensor, args: &ForwardArgs<'_>) -> Result<LayerOutput> {
        let x = DeviceTensor::from_host(self.rt.stream(), hidden, self.elem)?;
        let (y, _) = self.forward_device(&x, args)?;
        let out = y.to_host()?.reshape(hidden.shape())?;
        Ok(LayerOutput {
            output: out,
            bias: self.proj_bias_host.clone(),
        })
    }

    /// Forward over device-resident hidden states (`[s, b, h]` or packed `[t, h]`, in the
    /// spec's dtype). Returns the output `[rows, h]` (rows = `s * b` or `t`) in the spec's
    /// dtype, and `linear_proj`'s device bias `[h]`.
    ///
    /// Asynchronous: the work is queued on the runtime's stream ([`CudaRuntime::stream`]) and
    /// nothing waits for it; read the output (`to_host`) or synchronize to wait. Host-side
    /// checks fail before anything is queued; a fault of a queued kernel surfaces at the next
    /// synchronizing call as [`AttnError::Cuda`]. Mask, bias, positions and context tensors
    /// in `args` are host tensors, uploaded per call (small per-step metadata).
    pub fn forward_device(
        &self,
        hidden: &DeviceTensor,
        args: &ForwardArgs<'_>,
    ) -> Result<(DeviceTensor, Option<&DeviceTensor>)> {
        match self.elem {
            ElemType::Bf16 => self.forward_typed::<bf16>(hidden, args),
            ElemType::F16 => self.forward_typed::<f16>(hidden, args),
            ElemType::F32 => Err(AttnError::DType {
                arg: "spec dtype".into(),
                expected: "bf16 or f16".into(),
                got: "f32".into(),
            }),
        }
    }

    fn geometry(
        &self,
        hidden: &DeviceTensor,
        ctx: Option<&DeviceTensor>,
        args: &ForwardArgs<'_>,
    ) -> Result<Geometry> {
        let h = self.config.hidden;
        let packed = args.packed.is_some();
        let shape_of = |arg: &str, t: &DeviceTensor| -> Result<(usize, usize, usize)> {
            match (t.shape(), packed) {
                ([s, b, hh], false) if *hh == h => Ok((s * b, *s, *b)),
                ([t, hh], true) if *hh == h => Ok((*t, *t, 1)),
                (s, _) => Err(AttnError::Shape {
                    arg: arg.into(),
                    expected: if packed {
                        format!("[t, {h}] (packed)")
                    } else {
                        format!("[s, b, {h}]")
                    },
                    got: s.to_vec(),
                }),
            }
        };
        let (nq, sq, b) = shape_of("hidden", hidden)?;
        let (nk, sk, bk) = match ctx {
            Some(c) => shape_of("key_value_states", c)?,
            None => (nq, sq, b),
        };
        if bk != b {
            return Err(AttnError::Shape {
                arg: "key_value_states".into(),
                expected: format!("[sk, {b}, {h}]"),
                got: ctx.map(|c| c.shape().to_vec()).unwrap_or_default(),
            });
        }
        match &args.packed {
            None => Ok(Geometry {
                nq,
                nk,
                batch: b,
                sq,
                sk,
                cu_q: None,
                cu_k: None,
            }),
            Some(pk) => {
                let cq = check_cu_seqlens("cu_seqlens_q", pk.cu_seqlens_q, nq)?;
                let cu_kv: &[i32] = if ctx.is_none() {
                    if !pk.cu_seqlens_kv.is_empty() && pk.cu_seqlens_kv != pk.cu_seqlens_q {
                        return Err(AttnError::CuSeqlens {
                            arg: "cu_seqlens_kv".into(),
                            expected: "equal to cu_seqlens_q (or empty) for self-attention".into(),
                            got: pk.cu_seqlens_kv.iter().map(|&x| x as i64).collect(),
                        });
                    }
                    pk.cu_seqlens_q
                } else {
                    pk.cu_seqlens_kv
                };
                let ck = check_cu_seqlens("cu_seqlens_kv", cu_kv, nk)?;
                if cq.len() != ck.len() {
                    return Err(AttnError::CuSeqlens {
                        arg: "cu_seqlens_kv".into(),
                        expected: format!("{} entries, as cu_seqlens_q", cq.len()),
                        got: cu_kv.iter().map(|&x| x as i64).collect(),
                    });
                }
                let n = cq.len() - 1;
                let mq = (0..n).map(|s| cq[s + 1] - cq[s]).max().unwrap_or(0);
                let mk = (0..n).map(|s| ck[s + 1] - ck[s]).max().unwrap_or(0);
                Ok(Geometry {
                    nq,
                    nk,
                    batch: n,
                    sq: mq.max(pk.max_seqlen_q),
                    sk: mk.max(pk.max_seqlen_kv),
                    cu_q: Some(upload(self.rt.stream(), pk.cu_seqlens_q, "cu_seqlens_q")?),
                    cu_k: Some(upload(self.rt.stream(), cu_kv, "cu_seqlens_kv")?),
                })
            }
        }
    }

    /// Rope position of every query row, as the CPU layer computes them.
    fn positions(&self, g: &Geometry, args: &ForwardArgs<'_>) -> Result<Vec<i32>> {
        let packed = args.packed.is_some();
        let s = if packed { g.nq } else { g.sq };
        let b = if packed { 1 } else { g.batch };
        let pos: Vec<i64> = match (args.positions, &args.packed) {
            (Some(p), _) if p.len() != s => {
                return Err(AttnError::Shape {
                    arg: "positions".into(),
                    expected: format!(
                        "[{s}] (one per {})",
                        if packed {
                            "packed token"
                        } else {
                            "sequence position"
                        }
                    ),
                    got: vec![p.len()],
                })
            }
            (Some(p), None) => (0..g.nq).map(|r| p[r / b]).collect(),
            (Some(p), Some(_)) => p.to_vec(),
            (None, None) => (0..g.nq).map(|r| (r / b) as i64).collect(),
            (None, Some(pk)) => {
                let mut pos = vec![0i64; g.nq];
                for w in pk.cu_seqlens_q.windows(2) {
                    for (i, t) in (w[0]..w[1]).enumerate() {
                        pos[t as usize] = i as i64;
                    }
                }
                pos
            }
        };
        pos.into_iter().map(|p| to_i32("positions", p)).collect()
    }

    fn forward_typed<T: DeviceElem>(
        &self,
        hidden: &DeviceTensor,
        args: &ForwardArgs<'_>,
    ) -> Result<(DeviceTensor, Option<&DeviceTensor>)>
    where
        cudarc::cublaslt::CudaBlasLT: cudarc::cublaslt::Matmul<T>,
    {
        let rt = &*self.rt;
        let st = rt.stream();
        let c = &self.config;
        let (np, ng, hn) = (c.heads, c.groups, c.head_dim);
        let is_self = c.kind == AttentionKind::SelfAttention;
        if hidden.elem() != self.elem {
            return Err(AttnError::DType {
                arg: "hidden".into(),
                expected: self.elem.name().into(),
                got: hidden.elem().name().into(),
            });
        }
        let ctx = match (is_self, args.key_value_states) {
            (true, Some(_)) => {
                return Err(bad(
                    "key_value_states",
                    "none for self-attention",
                    "a tensor",
                ))
            }
            (false, None) => {
                return Err(bad(
                    "key_value_states",
                    "the context [sk, b, h] for cross-attention",
                    "none",
                ))
            }
            (true, None) => None,
            (false, Some(t)) => Some(DeviceTensor::from_host(st, t, self.elem)?),
        };
        let g = self.geometry(hidden, ctx.as_ref(), args)?;
        let fcfg = self.fwd_config(args);
        let mask_type = fcfg.mask.unwrap_or(MaskType::NoMask);
        if args.attention_mask.is_some() && !mask_type.takes_mask_tensor() {
            return Err(bad(
                "attention_mask",
                "none for this mask type (only padding, padding_causal, arbitrary take a mask)",
                format!("a mask tensor with mask type {}", mask_type.name()),
            ));
        }
        if g.batch > 65535 || np > 65535 {
            return Err(bad(
                "batch / heads",
                "at most 65535 each (grid y/z limits)",
                format!("batch {} heads {np}", g.batch),
            ));
        }
        // Positions are checked (shape, int32 range) before anything is queued.
        let pos_host = if self.prep.rope.is_some() && g.nq > 0 {
            Some(self.positions(&g, args)?)
        } else {
            None
        };
        let target = [g.batch, np, g.sq, g.sk];
        // Mask: uint8 (nonzero = masked out) in the tensor's own layout, broadcast by strides.
        let (mask_buf, mask_strides) = match args.attention_mask {
            Some(m) if mask_type.takes_mask_tensor() => {
                let s = bcast_strides("attention_mask", m.shape(), target)?;
                let v: Vec<u8> = m.data().iter().map(|&x| u8::from(x != 0.0)).collect();
                (Some(upload(st, &v, "attention_mask")?), s)
            }
            _ if mask_type.takes_mask_tensor() => {
                (Some(upload(st, &[0u8], "attention_mask")?), [0; 4])
            }
            _ => (None, [0; 4]),
        };
        let (bias_buf, bias_strides) = match args.attention_bias {
            Some(bt) => {
                let s = bcast_strides("attention_bias", bt.shape(), target)?;
                (Some(upload(st, bt.data(), "attention_bias")?), s)
            }
            None => (None, [0; 4]),
        };
        let mut out = self.alloc(&[g.nq, c.hidden], "output")?;
        if g.nq == 0 {
            return Ok((out, self.proj.bias.as_ref()));
        }

        // 1. Projections.
        let (a, kv_in) = match (&self.proj_in, &ctx) {
            (Projections::SelfAttention { qkv }, _) => {
                let mut a = self.alloc(&[g.nq, qkv.out_features()], "linear_qkv output")?;
                linear_qkv_into(rt, hidden, qkv, &mut a)?;
                (a, None)
            }
            (Projections::CrossAttention { q, kv }, Some(cx)) => {
                (linear_q(rt, hidden, q)?, Some(linear_kv(rt, cx, kv)?))
            }
            (Projections::CrossAttention { .. }, None) => unreachable!("checked above"),
        };

        // 2. qkv_prep.
        let q = self.alloc(&[g.nq, np, hn], "q")?;
        let k = self.alloc(&[g.nk, ng, hn], "k")?;
        let v = self.alloc(&[g.nk, ng, hn], "v")?;
        let gate = if c.output_gate {
            Some(self.alloc(&[g.nq, np, hn], "gate")?)
        } else {
            None
        };
        let positions = match &pos_host {
            Some(p) => Some(upload(st, p, "positions")?),
            None => None,
        };
        // Raised by qkv_prep when a value it writes to v is not finite; the attention kernel
        // then takes its exact path, so junk at masked keys (padding) never reaches a row.
        let v_flag = st
            .alloc_zeros::<i32>(1)
            .map_err(crate::cuda::tensor::alloc_err("v_nonfinite", 4))?;
        let p_vflag = dptr(&v_flag, rt);
        {
            let (key, f) = kernel(rt, &self.prep)?;
            let grid = if is_self { g.nq } else { g.nq.max(g.nk) };
            let cfg = LaunchConfig {
                grid_dim: (to_i32("rows", grid as i64)? as u32, 1, 1),
                block_dim: ((self.prep.warps * 32) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let p_qkv = tptr(&a, rt);
            let p_kv = opt_ptr(kv_in.as_ref(), rt);
            let (p_q, p_k, p_v) = (tptr(&q, rt), tptr(&k, rt), tptr(&v, rt));
            let p_gate = opt_ptr(gate.as_ref(), rt);
            let p_qw = opt_ptr(self.q_norm.0.as_ref(), rt);
            let p_qb = opt_ptr(self.q_norm.1.as_ref(), rt);
            let p_kw = opt_ptr(self.k_norm.0.as_ref(), rt);
            let p_kb = opt_ptr(self.k_norm.1.as_ref(), rt);
            let eps = c.eps;
            let p_pos = positions.as_ref().map_or(0, |p| dptr(p, rt));
            let base = c.rope.map_or(10000.0, |r| r.rotary_base as f32);
            let mscale = args.rope_mscale;
            let (nt, nkt) = (g.nq as i32, g.nk as i32);
            let (nh, ngr) = (np as i32, ng as i32);
            let mut b = st.launch_builder(&f);
            b.arg(&p_qkv)
                .arg(&p_kv)
                .arg(&p_q)
                .arg(&p_k)
                .arg(&p_v)
                .arg(&p_gate);
            b.arg(&p_qw).arg(&p_qb).arg(&p_kw).arg(&p_kb).arg(&eps);
            b.arg(&p_pos).arg(&base).arg(&mscale);
            b.arg(&nt).arg(&nkt).arg(&nh).arg(&ngr).arg(&p_vflag);
            // SAFETY: the argument list matches the qkv_prep entry point (render.rs docs):
            // every pointer is a live device buffer of the documented shape or null where the
            // variant ignores it; grid covers every token row.
            unsafe { b.launch(cfg) }.map_err(launch_err(&key))?;
        }

        // 3. Attention forward.
        let o = self.alloc(&[g.nq, np, hn], "attention output")?;
        let lse = crate::cuda::tensor::alloc_uninit::<f32>(st, np * g.nq, "lse")?;
        let fwd_key = {
            // The fast kernel when this GPU runs it; the general one otherwise. A fast kernel
            // that fails to build falls back with a warning, except under ATTN_JIT=off, where
            // its absence from the cache is an error naming it (select_forward).
            let (chosen, kf) =
                select_forward(self.fast_config(&fcfg).as_ref(), &fcfg, |c| kernel(rt, c))?;
            let (is_fast, (key, f)) = match chosen.phase {
                Phase::ForwardFast => {
                    let c = chosen;
                    let smem = c.fast_tile().smem_bytes(hn);
                    if smem > 48 * 1024 {
                        kf.1.set_attribute(
                            cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                            smem as i32,
                        )
                        .map_err(|e| AttnError::Cuda {
                            call: format!("cuFuncSetAttribute max dynamic shared memory {}", kf.0),
                            msg: e.to_string(),
                        })?;
                    }
                    (Some(c.fast_tile()), kf)
                }
                _ => (None, kf),
            };
            let (rows, threads, smem) = match is_fast {
                Some(t) => (t.block_m, t.warps * 32, t.smem_bytes(hn)),
                None => (fcfg.warps, fcfg.warps * 32, 0),
            };
            let cfg = LaunchConfig {
                grid_dim: (
                    g.sq.div_ceil(rows).max(1) as u32,
                    np as u32,
                    g.batch.max(1) as u32,
                ),
                block_dim: (threads as u32, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let (p_q, p_k, p_v, p_o) = (tptr(&q, rt), tptr(&k, rt), tptr(&v, rt), tptr(&o, rt));
            let p_lse = dptr(&lse, rt);
            let p_cq = g.cu_q.as_ref().map_or(0, |s| dptr(s, rt));
            let p_ck = g.cu_k.as_ref().map_or(0, |s| dptr(s, rt));
            let batch = g.batch as i32;
            let (nh, ngr) = (np as i32, ng as i32);
            let (sq, sk) = (
                to_i32("seqlen_q", g.sq as i64)?,
                to_i32("seqlen_k", g.sk as i64)?,
            );
            let scale = c.softmax_scale;
            let (wl, wr) = match c.window {
                Some(w) => (to_i32("window", w.left)?, to_i32("window", w.right)?),
                None => (-1, -1),
            };
            let p_mask = mask_buf.as_ref().map_or(0, |s| dptr(s, rt));
            let p_bias = bias_buf.as_ref().map_or(0, |s| dptr(s, rt));
            let p_sinks = self.sinks.as_ref().map_or(0, |s| dptr(s, rt));
            let p_gate = opt_ptr(gate.as_ref(), rt);
            let [mb, mh, mq, mk] = mask_strides;
            let [bb, bh, bq, bk] = bias_strides;
            let mut b = st.launch_builder(&f);
            b.arg(&p_q).arg(&p_k).arg(&p_v).arg(&p_o).arg(&p_lse);
            b.arg(&p_cq).arg(&p_ck).arg(&batch).arg(&nh).arg(&ngr);
            b.arg(&sq).arg(&sk).arg(&scale).arg(&wl).arg(&wr);
            b.arg(&p_mask).arg(&mb).arg(&mh).arg(&mq).arg(&mk);
            b.arg(&p_bias).arg(&bb).arg(&bh).arg(&bq).arg(&bk);
            b.arg(&p_sinks).arg(&p_gate);
            // fwdfast_* takes the same list plus the per-head max-logit record (null: off)
            // and the v_nonfinite flag.
            let p_max_logit: u64 = 0;
            let (no_cache, zero) = (0u64, 0i32);
            if is_fast.is_some() {
                b.arg(&p_max_logit).arg(&p_vflag);
                b.arg(&no_cache).arg(&zero).arg(&zero);
                b.arg(&no_cache).arg(&zero).arg(&zero);
            }
            // SAFETY: the argument list matches the fwd / fwdfast entry point (render.rs docs); q/o/gate
            // are [nq, np, hn], k/v [nk, ng, hn] (padded rows are s-major, b-minor, as the
            // kernel indexes them), lse [np, nq], cu_seqlens [batch + 1], mask/bias broadcast
            // by the strides computed above; grid covers every (row block, head, sequence).
            unsafe { b.launch(cfg) }.map_err(launch_err(&key))?;
            key
        };

        // 4. Output projection (bias returned, not added).
        let o = o.view(&[g.nq, np * hn])?;
        let bias = linear_proj_into(rt, &o, &self.proj, &mut out)?;
        // No synchronization: the buffers below are freed in stream order (cudarc frees on
        // the stream the work was queued on), so they live until the queued kernels are done.
        tracing::trace!(
            "forward queued: {} -> {} -> linear_proj",
            self.prep.key(),
            fwd_key
        );
        drop((
            a, kv_in, q, k, v, gate, positions, lse, mask_buf, bias_buf, g, v_flag,
        ));
        Ok((out, bias))
    }
}
