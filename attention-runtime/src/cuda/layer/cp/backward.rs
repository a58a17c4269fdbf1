//! Context parallelism's training hooks into [`CudaLayer`], driven by
//! `parallel/cp_cuda_backward.rs`: the forward's merged result as training needs it (the
//! output, the ungated output with an output gate, the global LSE with the sink column
//! joined), whole-sequence attention that keeps its LSE (`a2a`), and the attention backward
//! of one planned launch or of whole sequences on the single-GPU backward kernels
//! ([`crate::cuda::backward`]) with the forward's global LSE.
//!
//! A launch of a [`cp_plan`](crate::parallel::cp_plan) plan reads a contiguous range of a
//! rank's query rows and of a key/value buffer; the backward kernels take whole buffers, so
//! q, the output, its gradient, the LSE and the key/value rows of the launch are copied into
//! compact buffers first, and its dq / dk / dv are added into f32 accumulators
//! ([`LoadedCpBackward::add_rows`]) that are rounded once at the end. `Band` launches read a
//! dense mask `[items, max_q, max_k]` materialized from the Toeplitz band (the backward's
//! mask strides are non-negative).

use super::*;
use crate::cuda::backward::{BwdArgs, BwdLayout};
use crate::cuda::cp_backward_kernels::LoadedCpBackward;
use crate::cuda::prefill_sm80::PrefillStrided;
use crate::parallel::cp_plan::Visibility;

/// An f32 device tensor of zeros.
pub(crate) fn f32_zeros(
    st: &Arc<cudarc::driver::CudaStream>,
    shape: &[usize],
    arg: &str,
) -> Result<DeviceTensor> {
    let mut t = DeviceTensor::uninit(st, ElemType::F32, shape, arg)?;
    if t.numel() > 0 {
        st.memset_zeros(t.typed_mut::<f32>(arg)?)
            .map_err(crate::cuda::tensor::cuda_err("memset f32 zeros"))?;
    }
    Ok(t)
}

fn zero<T: DeviceElem>(st: &Arc<cudarc::driver::CudaStream>, t: &mut DeviceTensor) -> Result<()> {
    if t.numel() > 0 {
        st.memset_zeros(t.typed_mut::<T>("scratch")?)
            .map_err(crate::cuda::tensor::cuda_err("memset zeros"))?;
    }
    Ok(())
}

/// The inputs of one launch's (or one whole-sequence) backward.
pub(crate) struct CpBwdIn<'a> {
    /// Queries `[rows, heads, hn]`.
    pub(crate) q: &'a DeviceTensor,
    /// The forward's (ungated) output, layout of `q`.
    pub(crate) o: &'a DeviceTensor,
    /// Its gradient, layout of `q`.
    pub(crate) dout: &'a DeviceTensor,
    /// The global LSE f32 `[heads, rows]`, sink joined.
    pub(crate) lse: &'a CudaSlice<f32>,
}

impl CudaLayer {
    /// The training forward's core results from a merged `acc`: `linear_proj`'s input
    /// (gated with `gate`), the ungated output (with a gate), and the LSE `[np, rows]` with
    /// the sink column joined (what the backward kernels read).
    pub(crate) fn cp_train_finish(
        &self,
        acc: &CpAcc,
        gate: Option<&DeviceTensor>,
        h: &LoadedCp,
        hb: &LoadedCpBackward,
    ) -> Result<(DeviceTensor, Option<DeviceTensor>, CudaSlice<f32>)> {
        let st = self.rt.stream();
        let np = self.config.heads;
        let first = self.cp_finish(acc, gate, h)?;
        let ungated = match gate {
            Some(_) => Some(self.cp_finish(acc, None, h)?),
            None => None,
        };
        let mut lse = crate::cuda::tensor::alloc_uninit::<f32>(st, np * acc.rows, "cp lse")?;
        st.memcpy_dtod(&acc.lse, &mut lse)
            .map_err(crate::cuda::tensor::cuda_err("memcpy_dtod cp lse"))?;
        match self.config.sinks {
            None => {}
            Some(Sinks::OffByOne) => hb.lse_sink(st, &mut lse, None, (np, acc.rows))?,
            Some(Sinks::Learnable) => {
                let s = self
                    .sinks
                    .as_ref()
                    .ok_or_else(|| AttnError::MissingWeight {
                        key: "core_attention.softmax_offset".into(),
                        source_name: "the CUDA layer".into(),
                    })?;
                hb.lse_sink(st, &mut lse, Some(s), (np, acc.rows))?
            }
        }
        Ok((first, ungated, lse))
    }

    /// The layer's own whole-sequence kernel for `mask` without the output gate (sinks
    /// kept): the ungated output O and its LSE for the backward under `a2a`.
    pub(crate) fn cp_whole_kernel_ungated(&self, mask: MaskType) -> Result<CpAttnKernel> {
        let mut c = registry::prefill_rows(&self.config.spec, self.config.head_dim, mask, false);
        c.output_gate = false;
        self.cp_load(c)
    }

    /// [`cp_whole`](Self::cp_whole) returning also the LSE f32 `[hq, t]` (sink included).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cp_whole_lse(
        &self,
        kern: &CpAttnKernel,
        (q, k, v, gate): (
            &DeviceTensor,
            &DeviceTensor,
            &DeviceTensor,
            Option<&DeviceTensor>,
        ),
        (cu, cu_d): (&[usize], &CudaSlice<i32>),
        (hq, hg, block): (usize, usize, usize),
    ) -> Result<(DeviceTensor, CudaSlice<f32>)> {
        let rt = &*self.rt;
        let st = rt.stream();
        let c = &self.config;
        let hn = c.head_dim;
        let t = cu.last().copied().unwrap_or(0);
        let seqs = cu.len().saturating_sub(1);
        let dims_ok = q.numel() == t * hq * hn
            && k.numel() == t * hg * hn
            && v.numel() == t * hg * hn
            && gate.is_none_or(|g| g.numel() == t * hq * hn)
            && (block + 1) * hq <= c.heads
            && cu_d.len() >= cu.len();
        if !dims_ok {
            return Err(shape_err(
                "q",
                format!("[{t}, {hq}, {hn}] with k, v [{t}, {hg}, {hn}]"),
                q.shape().to_vec(),
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
        let lse = crate::cuda::tensor::alloc_uninit::<f32>(st, (hq * t).max(1), "lse")?;
        if t == 0 {
            return Ok((out, lse));
        }
        let max = cu.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        let sinks = self
            .sinks
            .as_ref()
            .map_or(0, |s| dptr(s, rt) + (block * hq * 4) as u64);
        let params = FwdParams {
            q: tptr(q, rt),
            k: tptr(k, rt),
            v: tptr(v, rt),
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
            gate: opt_ptr(gate, rt),
            ..FwdParams::default()
        };
        let cfg = fwd_launch_config(&kern.cfg, max, hq, seqs);
        // SAFETY: as cp_whole: FwdParams layout; packed mode over t rows split by cu
        // (seqs + 1 entries ending at t, on the device in cu_d); q, gate, out [t, hq, hn],
        // k, v [t, hg, hn] (checked), lse [hq, t]; sinks at this block's hq entries of the
        // layer's [np] logits ((block + 1) hq <= np, checked).
        unsafe { launch_prefill(st, &kern.f, &kern.key, &kern.cfg, cfg, &params, (t, t)) }?;
        Ok((out, lse))
    }

    /// The backward kernels of a launch kind (the forward's kernel choice,
    /// [`cp_kernel`](Self::cp_kernel)): `Layer` the call's mask with causal made
    /// bottom-right and the layer's window, `Full` no mask, `Band` a mask tensor.
    pub(crate) fn cp_backward_kernels(
        &self,
        kind: KernelKind,
        mask: MaskType,
    ) -> Result<Arc<crate::cuda::backward::AttentionBackward>> {
        let c = &self.config;
        let (m, win) = match kind {
            KernelKind::Layer => (
                if mask == MaskType::Causal {
                    MaskType::CausalBottomRight
                } else {
                    mask
                },
                c.window.is_some(),
            ),
            KernelKind::Full => (MaskType::NoMask, false),
            KernelKind::Band => (MaskType::Arbitrary, false),
        };
        super::super::train::attention_backward(
            &self.rt,
            &attention_codegen::registry::backward_configs(c.spec.dtype, c.head_dim, m, win, false),
        )
    }

    /// Queue the backward of one planned launch `pl` (kernels `bwd` of its kind) over this
    /// rank's rows `x` and the key/value buffer `kv` (`[2 kv_rows, ng hn]`), adding its dq
    /// into `dq_acc` (f32 `[rows, np hn]`) and its dk / dv into `dkv_acc` (f32
    /// `[2 kv_rows, ng hn]`, keys then values).
    ///
    /// Errors: [`AttnError::Shape`] when the launch's rows fall outside the buffers; those
    /// of the backward launch.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cp_launch_backward(
        &self,
        bwd: &crate::cuda::backward::AttentionBackward,
        pl: &CpLaunch,
        x: &CpBwdIn<'_>,
        (kv, kv_rows): (&DeviceTensor, usize),
        (dq_acc, dkv_acc): (&mut DeviceTensor, &mut DeviceTensor),
        (vis, hb, deterministic): (Visibility, &LoadedCpBackward, bool),
    ) -> Result<()> {
        match self.elem {
            ElemType::Bf16 => self.cp_launch_backward_t::<bf16>(
                bwd,
                pl,
                x,
                (kv, kv_rows),
                (dq_acc, dkv_acc),
                (vis, hb, deterministic),
            ),
            ElemType::F16 => self.cp_launch_backward_t::<f16>(
                bwd,
                pl,
                x,
                (kv, kv_rows),
                (dq_acc, dkv_acc),
                (vis, hb, deterministic),
            ),
            ElemType::F32 => Err(bad("layer dtype", "bf16 or f16 (CUDA training)", "f32")),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn cp_launch_backward_t<T: DeviceElem>(
        &self,
        bwd: &crate::cuda::backward::AttentionBackward,
        pl: &CpLaunch,
        x: &CpBwdIn<'_>,
        (kv, kv_rows): (&DeviceTensor, usize),
        (dq_acc, dkv_acc): (&mut DeviceTensor, &mut DeviceTensor),
        (vis, hb, deterministic): (Visibility, &LoadedCpBackward, bool),
    ) -> Result<()> {
        let st = self.rt.stream();
        let c = &self.config;
        let (np, ng, hn) = (c.heads, c.groups, c.head_dim);
        let l = &pl.launch;
        let rows = x.q.numel() / (np * hn);
        let (n, nk) = (l.q_rows.len(), l.k_rows.len());
        if l.q_rows.end > rows
            || l.k_rows.end > kv_rows
            || kv.numel() < 2 * kv_rows * ng * hn
            || dq_acc.numel() < rows * np * hn
            || dkv_acc.numel() < 2 * kv_rows * ng * hn
            || n == 0
        {
            return Err(shape_err(
                "cp backward launch",
                format!(
                    "query rows {:?} within {rows} and key rows {:?} within {kv_rows}",
                    l.q_rows, l.k_rows
                ),
                x.q.shape().to_vec(),
            ));
        }
        let q0 = l.q_rows.start;
        let compact = |src: &DeviceTensor, row0: usize, cnt: usize, heads: usize, arg: &str| {
            let mut t = self.alloc(&[cnt, heads, hn], arg)?;
            t.copy_rows_from(st, 0, src, row0, cnt)?;
            Ok::<_, AttnError>(t)
        };
        let qc = compact(x.q, q0, n, np, "cp backward q")?;
        let oc = compact(x.o, q0, n, np, "cp backward out")?;
        let dc = compact(x.dout, q0, n, np, "cp backward dout")?;
        let kc = compact(kv, l.k_rows.start, nk, ng, "cp backward k")?;
        let vc = compact(kv, kv_rows + l.k_rows.start, nk, ng, "cp backward v")?;
        let mut lc = crate::cuda::tensor::alloc_uninit::<f32>(st, np * n, "cp backward lse")?;
        hb.lse_slice(st, x.lse, &mut lc, (np, rows), (q0, n))?;
        let mut dq = self.alloc(&[n, np, hn], "cp backward dq")?;
        let mut dk = self.alloc(&[nk, ng, hn], "cp backward dk")?;
        let mut dv = self.alloc(&[nk, ng, hn], "cp backward dv")?;
        // Filler rows (queries without keys, keys without queries) contribute zeros.
        zero::<T>(st, &mut dq)?;
        zero::<T>(st, &mut dk)?;
        zero::<T>(st, &mut dv)?;
        let items = l.items();
        let band = match l.kind {
            KernelKind::Band => Some(upload(st, &l.dense_band(vis), "cp band mask (dense)")?),
            _ => None,
        };
        let window = if l.kind == KernelKind::Layer {
            self.window()?
        } else {
            (-1, -1)
        };
        bwd.launch::<T>(
            st,
            BwdArgs {
                q: qc.typed::<T>("q")?,
                k: kc.typed::<T>("k")?,
                v: vc.typed::<T>("v")?,
                out: oc.typed::<T>("out")?,
                lse: &lc,
                deterministic,
                dout: dc.typed::<T>("dout")?,
                dq: dq.typed_mut::<T>("dq")?,
                dk: dk.typed_mut::<T>("dk")?,
                dv: dv.typed_mut::<T>("dv")?,
                batch: items,
                num_heads: np,
                num_groups: ng,
                layout: BwdLayout::Packed {
                    cu_seqlens_q: &pl.cu_q,
                    cu_seqlens_k: &pl.cu_k,
                    max_seqlen_q: l.max_q,
                    max_seqlen_k: l.max_k,
                    total_q: n,
                    total_k: nk,
                },
                softmax_scale: c.softmax_scale,
                window,
                sinks: None,
                dsinks: None,
                mask: band.as_ref().map(|m| PrefillStrided {
                    data: m,
                    strides: [(l.max_q * l.max_k) as i64, 0, l.max_k as i64, 1],
                    extent: [items, np, l.max_q, l.max_k],
                }),
                bias: None,
                dbias: None,
            },
        )?;
        hb.add_rows(st, dq_acc, &dq, q0, n, np * hn)?;
        hb.add_rows(st, dkv_acc, &dk, l.k_rows.start, nk, ng * hn)?;
        hb.add_rows(st, dkv_acc, &dv, kv_rows + l.k_rows.start, nk, ng * hn)?;
        // Freed in stream order, after the queued kernels.
        drop((qc, oc, dc, kc, vc, lc, dq, dk, dv, band));
        Ok(())
    }

    /// `a2a`: the backward of whole sequences (`cu` over `t` rows, its device copy `cu_d`) of
    /// head block `block` (`hq` heads, `hg` groups) with the layer's own mask and window:
    /// `x` in `[t, hq, hn]` (its LSE `[hq, t]`, sink included), k / v `[t, hg, hn]`. Writes
    /// dq `[t, hq, hn]`, dk / dv `[t, hg, hn]` and, for learnable sinks, this block's
    /// gradient into `dsinks` (f32 `[np]`, zero elsewhere).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cp_whole_backward(
        &self,
        x: &CpBwdIn<'_>,
        (k, v): (&DeviceTensor, &DeviceTensor),
        (cu, cu_d): (&[usize], &CudaSlice<i32>),
        (hq, hg, block): (usize, usize, usize),
        mask: MaskType,
        grads: (&mut DeviceTensor, &mut DeviceTensor, &mut DeviceTensor),
        dsinks: Option<&mut DeviceTensor>,
        deterministic: bool,
    ) -> Result<()> {
        match self.elem {
            ElemType::Bf16 => self.cp_whole_backward_t::<bf16>(
                x,
                (k, v),
                (cu, cu_d),
                (hq, hg, block),
                mask,
                grads,
                dsinks,
                deterministic,
            ),
            ElemType::F16 => self.cp_whole_backward_t::<f16>(
                x,
                (k, v),
                (cu, cu_d),
                (hq, hg, block),
                mask,
                grads,
                dsinks,
                deterministic,
            ),
            ElemType::F32 => Err(bad("layer dtype", "bf16 or f16 (CUDA training)", "f32")),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn cp_whole_backward_t<T: DeviceElem>(
        &self,
        x: &CpBwdIn<'_>,
        (k, v): (&DeviceTensor, &DeviceTensor),
        (cu, cu_d): (&[usize], &CudaSlice<i32>),
        (hq, hg, block): (usize, usize, usize),
        mask: MaskType,
        (dq, dk, dv): (&mut DeviceTensor, &mut DeviceTensor, &mut DeviceTensor),
        dsinks: Option<&mut DeviceTensor>,
        deterministic: bool,
    ) -> Result<()> {
        let st = self.rt.stream();
        let c = &self.config;
        let hn = c.head_dim;
        let t = cu.last().copied().unwrap_or(0);
        let seqs = cu.len().saturating_sub(1);
        if t == 0 {
            return Ok(());
        }
        let bwd = super::super::train::attention_backward(
            &self.rt,
            &attention_codegen::registry::backward_configs(
                c.spec.dtype,
                hn,
                mask,
                c.window.is_some(),
                false,
            ),
        )?;
        // This block's learnable sink logits and their gradient.
        let learn = c.sinks == Some(Sinks::Learnable);
        let sinks = match (&self.sinks, learn) {
            (Some(s), true) => {
                let mut b = crate::cuda::tensor::alloc_uninit::<f32>(st, hq, "cp sinks")?;
                st.memcpy_dtod(&s.slice(block * hq..(block + 1) * hq), &mut b)
                    .map_err(crate::cuda::tensor::cuda_err("memcpy_dtod cp sinks"))?;
                Some(b)
            }
            _ => None,
        };
        let mut ds = match &sinks {
            Some(_) => Some(crate::cuda::tensor::alloc_uninit::<f32>(
                st,
                hq,
                "cp dsinks",
            )?),
            None => None,
        };
        let max = cu.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        bwd.launch::<T>(
            st,
            BwdArgs {
                q: x.q.typed::<T>("q")?,
                k: k.typed::<T>("k")?,
                v: v.typed::<T>("v")?,
                out: x.o.typed::<T>("out")?,
                lse: x.lse,
                deterministic,
                dout: x.dout.typed::<T>("dout")?,
                dq: dq.typed_mut::<T>("dq")?,
                dk: dk.typed_mut::<T>("dk")?,
                dv: dv.typed_mut::<T>("dv")?,
                batch: seqs,
                num_heads: hq,
                num_groups: hg,
                layout: BwdLayout::Packed {
                    cu_seqlens_q: cu_d,
                    cu_seqlens_k: cu_d,
                    max_seqlen_q: max,
                    max_seqlen_k: max,
                    total_q: t,
                    total_k: t,
                },
                softmax_scale: c.softmax_scale,
                window: self.window()?,
                sinks: sinks.as_ref(),
                dsinks: ds.as_mut(),
                mask: None,
                bias: None,
                dbias: None,
            },
        )?;
        if let (Some(out), Some(ds)) = (dsinks, ds.as_ref()) {
            let o = out.typed_mut::<f32>("dsinks")?;
            st.memset_zeros(o)
                .map_err(crate::cuda::tensor::cuda_err("memset dsinks"))?;
            st.memcpy_dtod(ds, &mut o.slice_mut(block * hq..(block + 1) * hq))
                .map_err(crate::cuda::tensor::cuda_err("memcpy_dtod dsinks"))?;
        }
        drop((sinks, ds));
        Ok(())
    }

    /// The learnable sinks' gradient over this rank's rows (`p2p`, `all_gather`):
    /// `x.o`, `x.dout` `[rows, np, hn]`, `x.lse` `[np, rows]` (sink joined), into `dsinks`.
    pub(crate) fn cp_dsinks(
        &self,
        hb: &LoadedCpBackward,
        x: &CpBwdIn<'_>,
        dsinks: &mut DeviceTensor,
    ) -> Result<()> {
        let c = &self.config;
        let (np, hn) = (c.heads, c.head_dim);
        let rows = x.o.numel() / (np * hn);
        let s = self
            .sinks
            .as_ref()
            .ok_or_else(|| AttnError::MissingWeight {
                key: "core_attention.softmax_offset".into(),
                source_name: "the CUDA layer".into(),
            })?;
        hb.dsinks(
            self.rt.stream(),
            (x.o, x.dout),
            x.lse,
            s,
            dsinks,
            (np, rows, hn),
        )
    }
}
