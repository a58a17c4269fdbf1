//! The forward on device tensors ([`CudaLayer::forward_device`]) and its host-tensor
//! convenience: padded or packed sequences, every mask type, bias, sinks, gate.

use super::*;

/// Sequence geometry of one forward.
pub(super) struct Geometry {
    /// Rows (tokens) of the queries and the keys.
    pub(super) nq: usize,
    pub(super) nk: usize,
    /// `batch` argument: b (padded) or the number of sequences (packed).
    pub(super) batch: usize,
    /// `seqlen_q` / `seqlen_k` (padded), longest sequences (packed).
    pub(super) sq: usize,
    pub(super) sk: usize,
    /// Device cu_seqlens (packed only).
    pub(super) cu_q: Option<CudaSlice<i32>>,
    pub(super) cu_k: Option<CudaSlice<i32>>,
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

    pub(super) fn geometry(
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
    pub(super) fn positions(&self, g: &Geometry, args: &ForwardArgs<'_>) -> Result<Vec<i32>> {
        let packed = args.packed.is_some();
        let s = if packed { g.nq } else { g.sq };
        let b = if packed { 1 } else { g.batch };
        let pos = crate::plan::forward_positions(g.nq, s, b, args)?;
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
        self.check_input("hidden", hidden)?;
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
        // Scalar kernel arguments, checked before anything is queued.
        let (wl, wr) = self.window()?;
        let (sq_i, sk_i) = (
            to_i32("seqlen_q", g.sq as i64)?,
            to_i32("seqlen_k", g.sk as i64)?,
        );
        let mut out = self.alloc(&[g.nq, c.hidden], "output")?;
        if g.nq == 0 {
            return Ok((out, self.proj.bias.as_ref()));
        }

        // Kernels resolved and metadata uploaded before the first GEMM is queued: a kernel
        // that cannot load fails with nothing queued, and a copy from pageable host memory
        // (which may wait for the stream) waits for no GEMM of this call.
        let prep_kernel = kernel(rt, &self.prep)?;
        // The fast kernel when this GPU runs it; the general one otherwise. A fast kernel
        // that fails to build falls back with a warning, except under ATTN_JIT=off, where
        // its absence from the cache is an error naming it (select_forward).
        let (chosen, (fwd_key, fwd_f)) =
            select_forward(self.fast_config(&fcfg).as_ref(), &fcfg, |c| {
                self.load_attention(c)
            })?;
        let positions = match &pos_host {
            Some(p) => Some(upload(st, p, "positions")?),
            None => None,
        };
        // Raised by qkv_prep when a value it writes to v is not finite; the attention kernel
        // then takes its exact path, so junk at masked keys (padding) never reaches a row.
        let v_flag = st
            .alloc_zeros::<i32>(1)
            .map_err(crate::cuda::tensor::alloc_err("v_nonfinite", 4))?;

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
        let p_vflag = dptr(&v_flag, rt);
        {
            let (key, f) = prep_kernel;
            let grid = if is_self { g.nq } else { g.nq.max(g.nk) };
            let cfg = LaunchConfig {
                grid_dim: (to_i32("rows", grid as i64)? as u32, 1, 1),
                block_dim: ((self.prep.warps * 32) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let params = PrepParams {
                qkv: tptr(&a, rt),
                kv: opt_ptr(kv_in.as_ref(), rt),
                q_out: tptr(&q, rt),
                k_out: tptr(&k, rt),
                v_out: tptr(&v, rt),
                gate_out: opt_ptr(gate.as_ref(), rt),
                positions: positions.as_ref().map_or(0, |p| dptr(p, rt)),
                num_tokens: g.nq as i32,
                num_kv_tokens: g.nk as i32,
                v_nonfinite: p_vflag,
                ..self.prep_params(args.rope_mscale)
            };
            // SAFETY: PrepParams is the qkv_prep parameter layout (tests/
            // nvrtc_params_layout.rs); every pointer is a live device buffer of the
            // documented shape or null where the variant ignores it; the grid covers every
            // token row.
            unsafe { launch_params(st, &f, cfg, &params) }.map_err(launch_err(&key))?;
        }

        // 3. Attention forward.
        let o = self.alloc(&[g.nq, np, hn], "attention output")?;
        let lse = crate::cuda::tensor::alloc_uninit::<f32>(st, np * g.nq, "lse")?;
        let fwd_key = {
            let (key, f) = (fwd_key, fwd_f);
            let cfg = fwd_launch_config(&chosen, g.sq, np, g.batch);
            let params = FwdParams {
                q: tptr(&q, rt),
                k: tptr(&k, rt),
                v: tptr(&v, rt),
                out: tptr(&o, rt),
                lse: dptr(&lse, rt),
                cu_seqlens_q: g.cu_q.as_ref().map_or(0, |s| dptr(s, rt)),
                cu_seqlens_k: g.cu_k.as_ref().map_or(0, |s| dptr(s, rt)),
                batch: g.batch as i32,
                num_heads: np as i32,
                num_groups: ng as i32,
                seqlen_q: sq_i,
                seqlen_k: sk_i,
                softmax_scale: c.softmax_scale,
                window_left: wl,
                window_right: wr,
                mask: mask_buf.as_ref().map_or(0, |s| dptr(s, rt)),
                mask_strides,
                bias: bias_buf.as_ref().map_or(0, |s| dptr(s, rt)),
                bias_strides,
                sinks: self.sinks.as_ref().map_or(0, |s| dptr(s, rt)),
                gate: opt_ptr(gate.as_ref(), rt),
                // prefill_sm80 reads the v_nonfinite flag (prefill_rows ignores it); no max-logit
                // record.
                v_nonfinite: p_vflag,
                ..FwdParams::default()
            };
            // SAFETY: FwdParams is the parameter layout of prefill_rows and prefill_sm80
            // (tests/nvrtc_params_layout.rs); q/o/gate are [nq, np, hn], k/v [nk, ng, hn]
            // (padded rows are s-major, b-minor, as the kernel indexes them), lse [np, nq],
            // cu_seqlens [batch + 1], mask/bias broadcast by the strides computed above; the
            // grid covers every (row block, head, sequence).
            unsafe { launch_prefill(st, &f, &key, &chosen, cfg, &params, (g.nq, g.nk)) }?;
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
