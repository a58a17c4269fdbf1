//! Context parallelism's hooks into [`CudaLayer`], driven by
//! [`CpCudaLayer`](crate::parallel::CpCudaLayer): `linear_qkv` + `qkv_prep` of a rank's rows,
//! the attention launches of a [`cp_plan`](crate::parallel::cp_plan) plan merged by their LSE
//! into an f32 running result, attention over whole sequences (`a2a`), and `linear_proj`.
//!
//! Every tensor here is in a rank's packed local layout (sequence after sequence, each its
//! chunks `r` then `2 cp - 1 - r`): q, gate `[t, np, hn]`, k, v `[t, ng, hn]`. Keys and values
//! of a launch come from one buffer `[2 kv_rows, ng * hn]`: keys in rows `0 .. kv_rows`,
//! values in rows `kv_rows .. 2 kv_rows`.

mod backward;
pub(crate) use backward::{f32_zeros, CpBwdIn};

use super::*;
use crate::cuda::cp_kernels::{self, LoadedCp};
use crate::parallel::cp_plan::{KernelKind, Launch, Visibility};

/// An attention kernel chosen for context-parallel launches.
pub(crate) struct CpAttnKernel {
    cfg: KernelConfig,
    key: String,
    f: cudarc::driver::CudaFunction,
    window: (i32, i32),
}

/// One planned launch with its device metadata: `cu_seqlens` and (`Band`) mask, uploaded
/// before the call queues anything (a copy from pageable host memory may wait for the
/// stream).
pub(crate) struct CpLaunch {
    pub(crate) launch: Launch,
    cu_q: CudaSlice<i32>,
    cu_k: CudaSlice<i32>,
    band: Option<(CudaSlice<u8>, usize, usize)>,
}

/// q, k, v and the output gate of a rank's rows (see the module docs).
pub(crate) struct CpQkv {
    pub(crate) q: DeviceTensor,
    pub(crate) k: DeviceTensor,
    pub(crate) v: DeviceTensor,
    pub(crate) gate: Option<DeviceTensor>,
}

/// The running merged attention of a rank's query rows: f32 output `[rows, np, hn]` and LSE
/// `[np, rows]` (natural log; `-inf` where no key was seen yet).
pub(crate) struct CpAcc {
    pub(super) out: CudaSlice<f32>,
    pub(super) lse: CudaSlice<f32>,
    pub(super) rows: usize,
}

fn shape_err(arg: &str, expected: String, got: Vec<usize>) -> AttnError {
    AttnError::Shape {
        arg: arg.into(),
        expected,
        got,
    }
}

impl CudaLayer {
    /// A tensor of the layer's dtype (NaN-filled when outputs are poisoned).
    pub(crate) fn cp_alloc(&self, shape: &[usize], arg: &str) -> Result<DeviceTensor> {
        self.alloc(shape, arg)
    }

    /// The helper kernels of the layer's dtype and head dim.
    pub(crate) fn cp_helpers(&self) -> Result<LoadedCp> {
        let k = cp_kernels::CpKernels::render(self.config.dtype, self.config.head_dim)?;
        cp_kernels::load(&self.rt, &k)
    }

    /// `linear_qkv` + `qkv_prep` of `x` `[n, h]` (rope at `positions`, one per row).
    pub(crate) fn cp_project(
        &self,
        x: &DeviceTensor,
        positions: &[i32],
        mscale: f32,
    ) -> Result<CpQkv> {
        self.check_input("hidden", x)?;
        let (n, _) = x.rows("hidden", self.config.hidden)?;
        if positions.len() != n {
            return Err(shape_err(
                "positions",
                format!("[{n}] (one per row)"),
                vec![positions.len()],
            ));
        }
        let (q, k, v, gate, keep) =
            self.project_and_prep(x, n, &self.prep, Some(positions), mscale)?;
        drop(keep);
        Ok(CpQkv { q, k, v, gate })
    }

    /// Load `c`'s kernel the way the layer's forward picks its own: the tensor-core kernel
    /// this GPU runs (`prefill_sm90` / `prefill_sm80`), else `prefill_rows`.
    fn cp_load(&self, c: KernelConfig) -> Result<CpAttnKernel> {
        let fast = self.fast_config(&c);
        let (cfg, (key, f)) = select_forward(fast.as_ref(), &c, |c| self.load_attention(c))?;
        let window = if cfg.has_window {
            self.window()?
        } else {
            (-1, -1)
        };
        Ok(CpAttnKernel {
            cfg,
            key,
            f,
            window,
        })
    }

    /// The kernel of a plan's `kind` under the call's `mask`: `Layer` is the layer's kernel
    /// with causal made bottom-right (the spec's window kept), `Full` no mask and no window,
    /// `Band` an `arbitrary` mask tensor; none of them with sinks or the gate (applied once
    /// after the merge, [`cp_finish`](Self::cp_finish)).
    pub(crate) fn cp_kernel(&self, kind: KernelKind, mask: MaskType) -> Result<CpAttnKernel> {
        let (spec, hd) = (&self.config.spec, self.config.head_dim);
        let mut c = match kind {
            KernelKind::Layer => {
                let m = if mask == MaskType::Causal {
                    MaskType::CausalBottomRight
                } else {
                    mask
                };
                registry::prefill_rows(spec, hd, m, false)
            }
            KernelKind::Full => registry::prefill_rows(spec, hd, MaskType::NoMask, false),
            KernelKind::Band => registry::prefill_rows(spec, hd, MaskType::Arbitrary, false),
        };
        if kind != KernelKind::Layer {
            c.has_window = false;
        }
        c.sinks = None;
        c.output_gate = false;
        self.cp_load(c)
    }

    /// The layer's own kernel for `mask` (sinks and gate included): `a2a` attends whole
    /// sequences.
    pub(crate) fn cp_whole_kernel(&self, mask: MaskType) -> Result<CpAttnKernel> {
        let c = registry::prefill_rows(&self.config.spec, self.config.head_dim, mask, false);
        self.cp_load(c)
    }

    /// A running result of `rows` query rows with nothing seen (output 0, LSE `-inf`).
    pub(crate) fn cp_acc(&self, rows: usize, h: &LoadedCp) -> Result<CpAcc> {
        let st = self.rt.stream();
        let np = self.config.heads;
        let n = rows * np * self.config.head_dim;
        let mut out = crate::cuda::tensor::alloc_uninit::<f32>(st, n, "cp output")?;
        let mut lse = crate::cuda::tensor::alloc_uninit::<f32>(st, rows * np, "cp lse")?;
        if self.poison.load(Ordering::Relaxed) {
            // Poisoned first, so a start value that does not cover every element shows.
            h.fill_f32(st, &mut out, n, f32::NAN)?;
            h.fill_f32(st, &mut lse, rows * np, f32::NAN)?;
        }
        st.memset_zeros(&mut out)
            .map_err(crate::cuda::tensor::cuda_err("memset cp output"))?;
        h.fill_f32(st, &mut lse, rows * np, f32::NEG_INFINITY)?;
        Ok(CpAcc { out, lse, rows })
    }

    /// Upload the metadata of launch `l` (its `Band` mask under `vis`).
    pub(crate) fn cp_upload_launch(&self, l: Launch, vis: Visibility) -> Result<CpLaunch> {
        let st = self.rt.stream();
        let band = if l.kind == KernelKind::Band {
            let b = l.band(vis);
            Some((upload(st, &b.masked, "cp band mask")?, b.offset, b.width))
        } else {
            None
        };
        Ok(CpLaunch {
            cu_q: upload(st, &l.cu_q, "cu_seqlens_q")?,
            cu_k: upload(st, &l.cu_k, "cu_seqlens_k")?,
            band,
            launch: l,
        })
    }

    /// Queue one launch `pl` of a plan ([`cp_upload_launch`](Self::cp_upload_launch); its
    /// kind's kernel `kern`) over queries `q` (the rank's rows) and the key/value buffer `kv`
    /// (`[2 kv_rows, ng * hn]`), and merge its partial result into `acc`.
    ///
    /// Errors: [`AttnError::Shape`] when the launch's rows fall outside `q`, `kv` or `acc`;
    /// [`AttnError::InvalidArgument`] for more than 65535 virtual sequences or a band mask
    /// that does not match the kernel; launch errors.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cp_partial(
        &self,
        kern: &CpAttnKernel,
        pl: &CpLaunch,
        q: &DeviceTensor,
        (kv, kv_rows): (&DeviceTensor, usize),
        acc: &mut CpAcc,
        h: &LoadedCp,
    ) -> Result<()> {
        let (l, bufs) = (&pl.launch, pl);
        let rt = &*self.rt;
        let st = rt.stream();
        let c = &self.config;
        let (np, ng, hn) = (c.heads, c.groups, c.head_dim);
        let es = self.elem.size();
        let q_rows = q.numel() / (np * hn);
        if l.q_rows.end > q_rows.min(acc.rows)
            || l.k_rows.end > kv_rows
            || kv.numel() < 2 * kv_rows * ng * hn
            || l.q_rows.is_empty()
        {
            return Err(shape_err(
                "cp launch",
                format!(
                    "query rows {:?} within {q_rows} and key rows {:?} within {kv_rows}",
                    l.q_rows, l.k_rows
                ),
                q.shape().to_vec(),
            ));
        }
        if l.items() > 65535 {
            return Err(bad(
                "cu_seqlens_q",
                "at most 65535 sequence pieces per context-parallel launch (grid z)",
                l.items().to_string(),
            ));
        }
        if bufs.band.is_some() != kern.cfg.mask.is_some_and(|m| m.takes_mask_tensor()) {
            return Err(bad(
                "cp launch",
                "a band mask exactly for the mask-tensor kernel",
                kern.key.clone(),
            ));
        }
        let n = l.q_rows.len();
        let part = self.alloc(&[n, np, hn], "cp partial output")?;
        let mut lse = crate::cuda::tensor::alloc_uninit::<f32>(st, np * n, "cp partial lse")?;
        if self.poison.load(Ordering::Relaxed) {
            // Every row the merge reads must be written by the kernel (filler rows: -inf).
            h.fill_f32(st, &mut lse, np * n, f32::NAN)?;
        }
        let (mask, mask_strides) = match &bufs.band {
            Some((buf, off, w)) => (dptr(buf, rt) + *off as u64, [*w as i64, 0, -1, 1]),
            None => (0, [0; 4]),
        };
        let kvp = tptr(kv, rt);
        let params = FwdParams {
            q: tptr(q, rt) + (l.q_rows.start * np * hn * es) as u64,
            k: kvp + (l.k_rows.start * ng * hn * es) as u64,
            v: kvp + ((kv_rows + l.k_rows.start) * ng * hn * es) as u64,
            out: tptr(&part, rt),
            lse: dptr(&lse, rt),
            cu_seqlens_q: dptr(&bufs.cu_q, rt),
            cu_seqlens_k: dptr(&bufs.cu_k, rt),
            batch: l.items() as i32,
            num_heads: np as i32,
            num_groups: ng as i32,
            seqlen_q: to_i32("seqlen_q", l.max_q as i64)?,
            seqlen_k: to_i32("seqlen_k", l.max_k as i64)?,
            softmax_scale: c.softmax_scale,
            window_left: kern.window.0,
            window_right: kern.window.1,
            mask,
            mask_strides,
            ..FwdParams::default()
        };
        let cfg = fwd_launch_config(&kern.cfg, l.max_q, np, l.items());
        // SAFETY: FwdParams is the forward kernels' parameter layout (tests/
        // nvrtc_params_layout.rs). Packed mode: q points at row q_rows.start of q, whose
        // rows q_rows lie inside it (checked above); k/v at key row k_rows.start of kv's key
        // and value halves, rows k_rows inside kv_rows (checked); cu_seqlens_q/_k have
        // items + 1 entries ending at the ranges' lengths (cp_plan::pack); out and lse are
        // [n, np, hn] and [np, n]; the band mask (mask-tensor kernels only) is items x width
        // bytes and the kernel reads element offset + j - i of row `item` for i < sq_item,
        // j < sk_item, inside the row (width = max_q + max_k - 1, offset = max_q - 1).
        unsafe {
            launch_prefill(
                st,
                &kern.f,
                &kern.key,
                &kern.cfg,
                cfg,
                &params,
                (n, l.k_rows.len()),
            )
        }?;
        let (accr, row0) = (acc.rows, l.q_rows.start);
        match self.elem {
            ElemType::Bf16 => h.merge::<bf16>(
                st,
                &mut acc.out,
                &mut acc.lse,
                &part,
                &lse,
                np,
                (accr, row0, n),
            ),
            ElemType::F16 => h.merge::<f16>(
                st,
                &mut acc.out,
                &mut acc.lse,
                &part,
                &lse,
                np,
                (accr, row0, n),
            ),
            ElemType::F32 => h.merge::<f32>(
                st,
                &mut acc.out,
                &mut acc.lse,
                &part,
                &lse,
                np,
                (accr, row0, n),
            ),
        }?;
        // Freed in stream order, after the queued kernels.
        drop((part, lse));
        Ok(())
    }

    /// The output `[rows, np, hn]` of a merged result: the sink column and the output gate
    /// (`[rows, np, hn]`) applied once, rounded once to the layer's dtype.
    pub(crate) fn cp_finish(
        &self,
        acc: &CpAcc,
        gate: Option<&DeviceTensor>,
        h: &LoadedCp,
    ) -> Result<DeviceTensor> {
        let rt = &*self.rt;
        let st = rt.stream();
        let (np, hn) = (self.config.heads, self.config.head_dim);
        let mut out = self.alloc(&[acc.rows, np, hn], "attention output")?;
        let sinks = match self.config.sinks {
            None => (0, 0),
            Some(Sinks::OffByOne) => (1, 0),
            Some(Sinks::Learnable) => (2, self.sinks.as_ref().map_or(0, |s| dptr(s, rt))),
        };
        if sinks.0 == 2 && sinks.1 == 0 {
            return Err(AttnError::MissingWeight {
                key: "core_attention.softmax_offset".into(),
                source_name: "the CUDA layer".into(),
            });
        }
        let dims = (acc.rows, np);
        match self.elem {
            ElemType::Bf16 => h.finish::<bf16>(st, &acc.out, &acc.lse, gate, sinks, &mut out, dims),
            ElemType::F16 => h.finish::<f16>(st, &acc.out, &acc.lse, gate, sinks, &mut out, dims),
            ElemType::F32 => h.finish::<f32>(st, &acc.out, &acc.lse, gate, sinks, &mut out, dims),
        }?;
        Ok(out)
    }

    /// `a2a`: attention of whole sequences (`cu` over `[t]` rows, and its device copy
    /// `cu_d`, int32) of one head block: q and
    /// gate `[t, hq, hn]`, k/v `[t, hg, hn]` (`hq = np / cp` heads `block * hq ..`, `hg`
    /// groups), with the layer's own kernel `kern` (mask, window, sinks of those heads, gate).
    /// Returns the output `[t, hq, hn]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cp_whole(
        &self,
        kern: &CpAttnKernel,
        qkv: &CpQkv,
        (cu, cu_d): (&[usize], &CudaSlice<i32>),
        (hq, hg, block): (usize, usize, usize),
    ) -> Result<DeviceTensor> {
        let rt = &*self.rt;
        let st = rt.stream();
        let c = &self.config;
        let hn = c.head_dim;
        let t = cu.last().copied().unwrap_or(0);
        let seqs = cu.len().saturating_sub(1);
        let dims_ok = qkv.q.numel() == t * hq * hn
            && qkv.k.numel() == t * hg * hn
            && qkv.v.numel() == t * hg * hn
            && qkv.gate.as_ref().is_none_or(|g| g.numel() == t * hq * hn)
            && (block + 1) * hq <= c.heads;
        if !dims_ok {
            return Err(shape_err(
                "q",
                format!("[{t}, {hq}, {hn}] with k, v [{t}, {hg}, {hn}]"),
                qkv.q.shape().to_vec(),
            ));
        }
        if seqs > 65535 {
            return Err(bad(
                "cu_seqlens_q",
                "at most 65535 sequences (grid z)",
                seqs.to_string(),
            ));
        }
        let out = self.alloc(&[t, hq, hn], "attention output")?;
        if t == 0 {
            return Ok(out);
        }
        if cu_d.len() < cu.len() {
            return Err(shape_err(
                "cu_seqlens_q",
                format!("{} entries on the device", cu.len()),
                vec![cu_d.len()],
            ));
        }
        let max = cu.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        let lse = crate::cuda::tensor::alloc_uninit::<f32>(st, hq * t, "lse")?;
        let sinks = self
            .sinks
            .as_ref()
            .map_or(0, |s| dptr(s, rt) + (block * hq * 4) as u64);
        let params = FwdParams {
            q: tptr(&qkv.q, rt),
            k: tptr(&qkv.k, rt),
            v: tptr(&qkv.v, rt),
            out: tptr(&out, rt),
            lse: dptr(&lse, rt),
            cu_seqlens_q: dptr(cu_d, rt),
            cu_seqlens_k: dptr(cu_d, rt),
            batch: seqs as i32,
            num_heads: hq as i32,
            num_groups: hg as i32,
            seqlen_q: to_i32("seqlen_q", max as i64)?,
            seqlen_k: to_i32("seqlen_k", max as i64)?,
            softmax_scale: c.softmax_scale,
            window_left: kern.window.0,
            window_right: kern.window.1,
            sinks,
            gate: opt_ptr(qkv.gate.as_ref(), rt),
            ..FwdParams::default()
        };
        let cfg = fwd_launch_config(&kern.cfg, max, hq, seqs);
        // SAFETY: FwdParams is the forward kernels' parameter layout; packed mode over `t`
        // rows split by cu (seqs + 1 entries ending at t); q, gate, out [t, hq, hn], k, v
        // [t, hg, hn] (checked above), lse [hq, t]; sinks points at this block's hq entries
        // of the layer's [np] sink logits ((block + 1) hq <= np, checked).
        unsafe { launch_prefill(st, &kern.f, &kern.key, &kern.cfg, cfg, &params, (t, t)) }?;
        drop(lse);
        Ok(out)
    }

    /// `linear_proj` of the core attention's output `o` `[n, np, hn]`: `[n, h]` (bias
    /// unadded).
    pub(crate) fn cp_output(&self, o: DeviceTensor) -> Result<DeviceTensor> {
        let c = &self.config;
        let n = o.numel() / (c.heads * c.head_dim).max(1);
        let o = o.view(&[n, c.heads * c.head_dim])?;
        let mut out = self.alloc(&[n, c.hidden], "output")?;
        linear_proj_into(&self.rt, &o, &self.proj, &mut out)?;
        Ok(out)
    }
}
