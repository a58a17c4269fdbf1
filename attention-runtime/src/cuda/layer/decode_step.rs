//! One decode step of a [`CudaLayer`] over a static KV cache, planned once and enqueued per
//! step (plan, then run): the eager device-resident step ([`CudaLayer::decode_device`]) and
//! the CUDA graph ([`CudaLayer::capture_decode`]) launch the same plan, so they run the
//! same kernels on the same buffers and give bitwise equal results.
//!
//! A plan ([`DecodePlan`]) holds everything that does not change from step to step: the
//! fixed device buffers, the cuBLASLt GEMMs with their algorithms chosen, the rope cos/sin
//! tables for the cache's whole position range, the loaded kernels and the `decode_splitkv`
//! arguments. A step then costs the host a lookup, the capacity check, one small upload
//! (each slot's position, int32 `[b]`), two device-to-device copies (hidden in, output out)
//! and five kernels (two cuBLASLt GEMMs, `qkv_prep`, `decode_splitkv` split and combine); with
//! [`CudaLayer::decode_device_into`] nothing is allocated, and nothing synchronizes.

use cudarc::driver::{CudaFunction, CudaStream};

use super::kv_step::PrepPtrs;
use super::*;
use crate::cuda::decode::{
    cache_binding, decode_slots, decode_splitkv_kernels, launch_decode_splitkv, num_splits,
    CacheBinding, DecodeBuffers, DecodeSplitKvArgs, PreparedGemm, RopeTables,
};
use crate::cuda::tensor::{copy_dtod, cuda_err};
use attention_codegen::render::DECODE_SPLITKV_MAX_TOKENS;

/// How many decode plans a layer keeps (one per distinct cache binding, batch, token count,
/// pinned split count and mscale; a serving loop with a few batch sizes stays within it,
/// others evict the least recently used).
const MAX_PLANS: usize = 8;

/// The fixed part of one layer decode step (see the module docs).
pub(crate) struct DecodePlan {
    pub(crate) bufs: DecodeBuffers,
    pub(crate) gemms: [PreparedGemm; 2],
    prep: KernelConfig,
    pp: PrepPtrs,
    /// `decode_splitkv` arguments with `num_splits` = the plan's capacity (`max_splits`).
    flash: DecodeSplitKvArgs,
    kernels: (String, CudaFunction, CudaFunction),
    pub(crate) binding: CacheBinding,
    mscale_bits: u32,
    /// Split count `o_part` / `lse_part` are sized for, and the pinned count (0 = none) the
    /// plan was made under.
    pub(crate) max_splits: usize,
    pinned: usize,
    /// Resident split blocks of the device ([`decode_slots`]).
    slots: usize,
    /// New tokens per sequence of a step (1 to `DECODE_SPLITKV_MAX_TOKENS`).
    tokens: usize,
}

impl std::fmt::Debug for DecodePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodePlan")
            .field("binding", &self.binding)
            .field("max_splits", &self.max_splits)
            .finish_non_exhaustive()
    }
}

impl DecodePlan {
    /// The buffers, GEMMs and binding a captured graph keeps alive.
    pub(crate) fn into_graph_parts(self) -> (DecodeBuffers, [PreparedGemm; 2], CacheBinding) {
        (self.bufs, self.gemms, self.binding)
    }

    /// The split count of a step whose longest visible length (after the append) is
    /// `max_len`: the pinned count, else [`num_splits`] (never above the plan's capacity:
    /// `num_splits` grows with `max_len <= max_seq`).
    pub(crate) fn splits_for(&self, max_len: usize) -> usize {
        if self.pinned > 0 {
            self.pinned
        } else {
            let b = self.binding.batch;
            num_splits(self.slots, b, self.flash.num_groups as usize, max_len).min(self.max_splits)
        }
    }
}

impl CudaLayer {
    /// The `decode_splitkv` kernel of a step of `tokens` new tokens per sequence: the
    /// row-block variant for `tokens` times the heads per group rows
    /// ([`registry::decode_splitkv_rows`]). `None` when this GPU cannot run it (below sm_80,
    /// or not even one row block within its shared memory).
    pub(crate) fn decode_step_config(&self, tokens: usize) -> Result<Option<KernelConfig>> {
        let (sm, smem_optin) = match self.target {
            registry::Target::Device { sm, smem_optin, .. } => (sm, smem_optin),
            registry::Target::AnyDevice => return Ok(None),
        };
        if sm < registry::TENSOR_CORE_MIN_SM {
            return Ok(None);
        }
        let c = &self.config;
        let rows = c.heads / c.groups.max(1) * tokens;
        registry::decode_splitkv_rows(&c.spec, c.head_dim, rows, smem_optin).map_err(render_err)
    }

    /// Build the plan of a decode step of `tokens` new tokens for `b` sequences in slots
    /// `batch_offset .. batch_offset + b` of layer `layer` of `cache`, rope tables scaled by
    /// `mscale`. Checks as [`capture_decode`](Self::capture_decode).
    pub(crate) fn plan_decode(
        &self,
        cache: &DeviceStaticKvCache,
        shape: StepShape,
        mscale: f32,
        shared_rope: Option<Arc<RopeTables>>,
    ) -> Result<DecodePlan> {
        let StepShape {
            layer,
            batch_offset,
            b,
            tokens,
        } = shape;
        if b == 0 {
            return Err(bad("b", "at least one sequence", "0"));
        }
        if !(1..=DECODE_SPLITKV_MAX_TOKENS).contains(&tokens) {
            return Err(bad(
                "tokens",
                format!("1 to {DECODE_SPLITKV_MAX_TOKENS} new tokens per sequence"),
                tokens.to_string(),
            ));
        }
        cache.check_append(layer, batch_offset, b, 0)?;
        let kc = cache.layer_k(layer)?;
        if kc.elem() != self.elem {
            return Err(AttnError::DType {
                arg: "cache".into(),
                expected: self.elem.name().into(),
                got: kc.elem().name().into(),
            });
        }
        let rt = &*self.rt;
        let st = rt.stream();
        let c = &self.config;
        let (np, ng, hn, h) = (c.heads, c.groups, c.head_dim, c.hidden);
        let Projections::SelfAttention { qkv } = &self.proj_in else {
            return Err(bad("config.kind", "self-attention", "cross-attention"));
        };
        let prep = self.decode_splitkv_prep()?;
        let fcfg = self.decode_step_config(tokens)?.ok_or_else(|| {
            AttnError::BackendUnavailable(format!(
                "the fused decode step (decode_splitkv, {tokens} token(s) per sequence) needs \
                 sm_80+ and its shared memory, which this GPU lacks; prefill runs such steps"
            ))
        })?;
        let n = tokens * b;
        let slots = decode_slots(rt, &fcfg)?;
        let pinned = self.decode_splits.load(Ordering::Relaxed);
        let max_splits = match pinned {
            0 => num_splits(slots, b, ng, cache.max_seq()),
            n => n,
        };
        let un = |shape: &[usize], arg: &str| DeviceTensor::uninit(st, self.elem, shape, arg);
        let f32buf = |n: usize, arg: &str| crate::cuda::tensor::alloc_uninit::<f32>(st, n, arg);
        // Rope tables: another plan's when they cover this cache's positions at this mscale
        // (row p is the angle at p whatever the table's length), else built here.
        let rope = match (c.rope, shared_rope) {
            (Some(_), Some(t))
                if t.rows >= cache.max_seq() && t.mscale.to_bits() == mscale.to_bits() =>
            {
                Some(t)
            }
            (Some(r), _) => {
                let t = crate::reference::rope::RopeTable::new(&r, hn)?;
                let (cs, sn) = t.cos_sin(cache.max_seq(), mscale);
                Some(Arc::new(RopeTables::new(
                    st,
                    &cs,
                    &sn,
                    cache.max_seq(),
                    mscale,
                )?))
            }
            (None, _) => None,
        };
        // Token-major rows ([tokens, b], as a prefill's [s, b]).
        let bufs = DecodeBuffers {
            x: un(&[n, h], "decode hidden")?,
            qkv: un(&[n, qkv.out_features()], "decode linear_qkv output")?,
            q: un(&[n, np, hn], "decode q")?,
            k: un(&[n, ng, hn], "decode k")?,
            v: un(&[n, ng, hn], "decode v")?,
            gate: if c.output_gate {
                Some(un(&[n, np, hn], "decode gate")?)
            } else {
                None
            },
            seqlens: crate::cuda::tensor::alloc_uninit::<i32>(st, b, "decode cache_seqlens")?,
            rope,
            o_part: f32buf(max_splits * n * np * hn, "decode o_part")?,
            lse_part: f32buf(max_splits * n * np, "decode lse_part")?,
            lse: f32buf(np * n, "decode lse")?,
            o: un(&[n, np, hn], "decode attention output")?,
            out: un(&[n, h], "decode output")?,
        };
        let gemm_qkv = PreparedGemm::new(
            rt,
            self.elem,
            n,
            qkv.out_features(),
            h,
            tptr(&qkv.weight, rt),
            tptr(&bufs.x, rt),
            tptr(&bufs.qkv, rt),
            opt_ptr(qkv.bias.as_ref(), rt),
        )?;
        let gemm_proj = PreparedGemm::new(
            rt,
            self.elem,
            n,
            h,
            np * hn,
            tptr(&self.proj.weight, rt),
            tptr(&bufs.o, rt),
            tptr(&bufs.out, rt),
            0,
        )?;
        let pp = PrepPtrs {
            qkv: tptr(&bufs.qkv, rt),
            q: tptr(&bufs.q, rt),
            k: tptr(&bufs.k, rt),
            v: tptr(&bufs.v, rt),
            gate: opt_ptr(bufs.gate.as_ref(), rt),
            positions: 0,
        };
        let (wl, wr) = match c.window {
            Some(w) => (to_i32("window", w.left)?, to_i32("window", w.right)?),
            None => (-1, -1),
        };
        let flash = DecodeSplitKvArgs {
            q: pp.q,
            k_new: pp.k,
            v_new: pp.v,
            k_cache: tptr(kc, rt),
            v_cache: tptr(cache.layer_v(layer)?, rt),
            cache_seqlens: dptr(&bufs.seqlens, rt),
            rope_cos: bufs.rope.as_ref().map_or(0, |t| dptr(&t.cos, rt)),
            rope_sin: bufs.rope.as_ref().map_or(0, |t| dptr(&t.sin, rt)),
            o_part: dptr(&bufs.o_part, rt),
            lse_part: dptr(&bufs.lse_part, rt),
            out: tptr(&bufs.o, rt),
            lse: dptr(&bufs.lse, rt),
            sinks: self.sinks.as_ref().map_or(0, |x| dptr(x, rt)),
            gate: pp.gate,
            batch: to_i32("b", b as i64)?,
            batch_offset: to_i32("batch_offset", batch_offset as i64)?,
            max_batch: to_i32("max_batch", cache.max_batch() as i64)?,
            num_heads: np as i32,
            num_groups: ng as i32,
            num_splits: max_splits as i32,
            num_tokens: tokens as i32,
            softmax_scale: c.softmax_scale,
            window_left: wl,
            window_right: wr,
        };
        // Compile and load every kernel now, so a step (or a capture) only launches.
        let kernels = decode_splitkv_kernels(rt, &fcfg)?;
        kernel(rt, &prep)?;
        Ok(DecodePlan {
            bufs,
            gemms: [gemm_qkv, gemm_proj],
            prep,
            pp,
            flash,
            kernels,
            binding: cache_binding(rt, cache, layer, batch_offset, b)?,
            mscale_bits: mscale.to_bits(),
            max_splits,
            pinned,
            slots,
            tokens,
        })
    }

    /// Queue one step of `plan` on `stream` with `splits` KV splits: `linear_qkv`,
    /// `qkv_prep` (no rope: `decode_splitkv` rotates), `decode_splitkv` split + combine,
    /// `linear_proj`. Reads `plan.bufs.x` and the positions in `plan.bufs.seqlens`; writes
    /// `plan.bufs.out`.
    pub(crate) fn enqueue_decode(
        &self,
        plan: &DecodePlan,
        stream: &Arc<CudaStream>,
        splits: usize,
    ) -> Result<()> {
        let n = plan.binding.batch * plan.tokens;
        plan.gemms[0].launch(stream, "linear_qkv (decode)")?;
        self.launch_prep(stream, &plan.prep, n, &plan.pp, 1.0)?;
        let mut a = plan.flash;
        a.num_splits = splits.clamp(1, plan.max_splits) as i32;
        let (key, split_f, combine_f) = &plan.kernels;
        launch_decode_splitkv(stream, key, split_f, combine_f, &a)?;
        plan.gemms[1].launch(stream, "linear_proj (decode)")
    }

    /// One decode step on device tensors, asynchronous: `hidden` `[T, b, h]` (`T` new tokens
    /// per sequence, 1 to [`DECODE_SPLITKV_MAX_TOKENS`] = 16: multi-token decode for
    /// speculative decoding or multi-token prediction) or `[b, h]` (`T` = 1), the layer's
    /// dtype, on this layer's device, for slots `batch_offset .. batch_offset + b` of
    /// `cache`'s layer `layer`; the result (`linear_proj`'s bias unadded), `T * b * h`
    /// elements laid out `[T, b, h]`, is written into `out`. The new k/v are appended at each
    /// slot's visible length `len` (token t at `len + t`, rope there from tables built once per
    /// plan) and token t attends to keys `[0, len + t + 1)` (bottom-right causal, the spec's
    /// window): the semantics of a [`prefill`](Self::prefill) of `T` tokens, which takes this
    /// path for `T <= 16`. All of a group's heads times the `T` tokens are the rows of one
    /// tensor-core tile, so each K/V element is read once per pass of up to 64 rows (16 at
    /// head dims above 128 or where the wider kernels do not fit the GPU's shared memory;
    /// more rows take several passes). Commit with [`DeviceStaticKvCache::advance`] (by `T`).
    ///
    /// Everything is queued on the runtime's stream ([`CudaRuntime::stream`]) and nothing
    /// synchronizes: a serving loop enqueues every layer and synchronizes once. Host-side
    /// checks (shapes, dtypes, capacity) fail before anything is queued and leave the cache
    /// untouched; an error of the device itself (a faulting kernel) surfaces at the next
    /// synchronizing call (`to_host`, [`CudaRuntime::synchronize`]) as [`AttnError::Cuda`].
    /// In steady state nothing is allocated: the plan for this (cache, layer, slots, b, T,
    /// pinned split count, mscale) is built on first use and kept (up to 8 per layer, least
    /// recently used evicted).
    ///
    /// Errors: `Shape` (`hidden`, `out`), `DType` (`hidden`, `out`, `cache`),
    /// `InvalidArgument` (cross-attention, `args` with positions/masks/bias/packing, a cache
    /// of other groups or head dim), `CacheCapacity` (a slot lacks room for `T` rows),
    /// `BackendUnavailable` (a GPU that cannot run the fused decode kernel: below sm_80, or
    /// its shared memory over the GPU's limit; [`decode`](Self::decode) and
    /// [`decode_device`](Self::decode_device) then take the prefill path), `DeviceAlloc`,
    /// `Render` / `Jit` (building the plan's kernels, first call only), `KernelLaunch`,
    /// `Cuda`; `Shape` (`hidden`) also for `T` outside 1..=16.
    pub fn decode_device_into(
        &self,
        hidden: &DeviceTensor,
        out: &mut DeviceTensor,
        cache: &mut DeviceStaticKvCache,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<()> {
        let h = self.config.hidden;
        let (tokens, b) = self.decode_hidden_shape(hidden)?;
        if out.numel() != tokens * b * h {
            return Err(AttnError::Shape {
                arg: "out".into(),
                expected: format!("[{tokens}, {b}, {h}] (or [{}, {h}])", tokens * b),
                got: out.shape().to_vec(),
            });
        }
        self.check_input("hidden", hidden)?;
        self.check_input("out", out)?;
        if args.positions.is_some() {
            return Err(bad(
                "args.positions",
                "none for a device decode step (each slot decodes at its own length; use prefill)",
                "explicit positions",
            ));
        }
        self.check_kv_step(cache, args)?;
        let starts = cache.check_append(layer, batch_offset, b, tokens)?;
        let st = self.rt.stream();
        let mut plans = self.decode_plans.lock().unwrap_or_else(|p| p.into_inner());
        let binding = cache_binding(&self.rt, cache, layer, batch_offset, b)?;
        let pinned = self.decode_splits.load(Ordering::Relaxed);
        let mscale_bits = args.rope_mscale.to_bits();
        let idx = match plans.iter().position(|p| {
            p.binding == binding
                && p.mscale_bits == mscale_bits
                && p.pinned == pinned
                && p.tokens == tokens
        }) {
            // Most recently used last (eviction takes the front).
            Some(i) => {
                let p = plans.remove(i);
                plans.push(p);
                plans.len() - 1
            }
            None => {
                let shared = shared_rope(&plans, cache.max_seq(), args.rope_mscale);
                let shape = StepShape {
                    layer,
                    batch_offset,
                    b,
                    tokens,
                };
                let plan = self.plan_decode(cache, shape, args.rope_mscale, shared)?;
                if plans.len() == MAX_PLANS {
                    plans.remove(0);
                }
                plans.push(plan);
                plans.len() - 1
            }
        };
        let plan = &mut plans[idx];
        let lens: Vec<i32> = starts.iter().map(|&l| l as i32).collect();
        st.memcpy_htod(&lens, &mut plan.bufs.seqlens)
            .map_err(cuda_err("memcpy_htod cache_seqlens"))?;
        copy_dtod(st, hidden, &mut plan.bufs.x)?;
        if self.poison.load(Ordering::Relaxed) {
            plan.bufs.o.fill_nan()?;
            plan.bufs.out.fill_nan()?;
        }
        let max_len = starts.iter().max().copied().unwrap_or(0) + tokens;
        let splits = plan.splits_for(max_len);
        self.enqueue_decode(plan, st, splits)?;
        copy_dtod(st, &plan.bufs.out, out)?;
        cache.mark_appended(layer, batch_offset, b, tokens);
        Ok(())
    }

    /// [`decode_device_into`](Self::decode_device_into) into a new tensor `[T, b, h]` (one
    /// small stream-ordered allocation per call). On a GPU that cannot run the fused decode
    /// kernel (below sm_80, or its shared memory over the limit) the step runs as a
    /// [`prefill_device`](Self::prefill_device) of `T` tokens (same semantics).
    pub fn decode_device(
        &self,
        hidden: &DeviceTensor,
        cache: &mut DeviceStaticKvCache,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<DeviceTensor> {
        let (tokens, b) = self.decode_hidden_shape(hidden)?;
        let shape = [tokens, b, self.config.hidden];
        // A GPU without the fused decode kernel runs the step as a prefill (same semantics).
        if self.decode_step_config(shape[0])?.is_none() && args.positions.is_none() {
            if hidden.shape().len() == 3 {
                return self.prefill_device(hidden, cache, layer, batch_offset, args);
            }
            let st = self.rt.stream();
            let mut x = DeviceTensor::uninit(st, hidden.elem(), &shape, "hidden")?;
            copy_dtod(st, hidden, &mut x)?;
            return self.prefill_device(&x, cache, layer, batch_offset, args);
        }
        let mut out = self.alloc(&shape, "output")?;
        self.decode_device_into(hidden, &mut out, cache, layer, batch_offset, args)?;
        Ok(out)
    }
}

impl CudaLayer {
    /// `(T, b)` of a decode step's `hidden`: `[T, b, h]` with `T` in
    /// 1..=[`DECODE_SPLITKV_MAX_TOKENS`], or `[b, h]` (`T` = 1); else a `Shape` error.
    fn decode_hidden_shape(&self, hidden: &DeviceTensor) -> Result<(usize, usize)> {
        let h = self.config.hidden;
        match hidden.shape() {
            [t, b, hh] if *hh == h && (1..=DECODE_SPLITKV_MAX_TOKENS).contains(t) => Ok((*t, *b)),
            [b, hh] if *hh == h => Ok((1, *b)),
            other => Err(AttnError::Shape {
                arg: "hidden".into(),
                expected: format!(
                    "[T, b, {h}] with T in 1..={DECODE_SPLITKV_MAX_TOKENS}, or [b, {h}]"
                ),
                got: other.to_vec(),
            }),
        }
    }
}

/// The slots a decode plan serves (`b` sequences from `batch_offset` of layer `layer`) and
/// the new tokens per sequence of its steps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepShape {
    pub(crate) layer: usize,
    pub(crate) batch_offset: usize,
    pub(crate) b: usize,
    pub(crate) tokens: usize,
}

/// Rope tables of one of `plans` covering `max_seq` positions at `mscale`, to share (each
/// table is `[max_seq, rot / 2]` f32 twice: 64 MiB at 128k positions and 128 channels).
fn shared_rope(plans: &[DecodePlan], max_seq: usize, mscale: f32) -> Option<Arc<RopeTables>> {
    plans
        .iter()
        .filter_map(|p| p.bufs.rope.as_ref())
        .find(|t| t.rows >= max_seq && t.mscale.to_bits() == mscale.to_bits())
        .cloned()
}

impl CudaLayer {
    /// Pin the KV split count of eager [`decode`](Self::decode) (`None`: chosen per step
    /// from the batch, the groups and the longest sequence, see
    /// [`num_splits`]). A [`LayerDecodeGraph`](crate::cuda::decode::LayerDecodeGraph)
    /// fixes its split count at capture; eager decode pinned to the same count gives
    /// bitwise equal results. Errors: `InvalidArgument` (`decode_splits`) outside 1..=64.
    pub fn set_decode_splits(&self, splits: Option<usize>) -> Result<()> {
        match splits {
            Some(n) if !(1..=64).contains(&n) => Err(bad(
                "decode_splits",
                "a split count in 1..=64",
                n.to_string(),
            )),
            _ => {
                self.decode_splits
                    .store(splits.unwrap_or(0), Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// Capture one decode step of this layer for `b` sequences in slots
    /// `batch_offset .. batch_offset + b` of `cache`'s layer `layer` in a CUDA graph
    /// (`linear_qkv` and `linear_proj` through cuBLASLt with their algorithms chosen before
    /// capture, `qkv_prep`, `decode_splitkv` split + combine with rope from cos/sin tables at each
    /// slot's position, read from a device int32 array). The split count is the pinned
    /// one ([`set_decode_splits`](Self::set_decode_splits)) or the one that covers the
    /// cache's full `max_seq`. `args` takes only `rope_mscale` (no positions, masks, bias,
    /// packing or context). Nothing is written to the cache.
    ///
    /// Errors: `InvalidArgument` (`config.kind` for cross-attention, `args`, `cache` for
    /// other groups or head dim, `b` of 0), `CacheCapacity` (`max_batch`), `DType`
    /// (`cache`), `DeviceAlloc`, `Render`, `BackendUnavailable`, `Cuda`.
    pub fn capture_decode(
        &self,
        cache: &crate::cuda::DeviceStaticKvCache,
        layer: usize,
        batch_offset: usize,
        b: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<crate::cuda::decode::LayerDecodeGraph> {
        self.capture_decode_tokens(cache, layer, batch_offset, b, 1, args)
    }

    /// [`capture_decode`](Self::capture_decode) of a step of `tokens` new tokens per
    /// sequence (1 to 16: the multi-token step of
    /// [`decode_device_into`](Self::decode_device_into), e.g. verifying speculative tokens):
    /// each replay takes `hidden` `[tokens, b, h]`. Errors as `capture_decode`, plus
    /// `InvalidArgument` (`tokens` outside 1..=16) and `BackendUnavailable` (a GPU
    /// that cannot run the tensor-core decode kernel, `tokens > 1`).
    pub fn capture_decode_tokens(
        &self,
        cache: &crate::cuda::DeviceStaticKvCache,
        layer: usize,
        batch_offset: usize,
        b: usize,
        tokens: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<crate::cuda::decode::LayerDecodeGraph> {
        use crate::cuda::decode::LayerDecodeGraph;
        self.check_kv_step(cache, args)?;
        if args.positions.is_some() {
            return Err(bad(
                "args.positions",
                "none for a captured decode step (each slot decodes at its own length)",
                "explicit positions",
            ));
        }
        let shared = {
            let plans = self.decode_plans.lock().unwrap_or_else(|p| p.into_inner());
            shared_rope(&plans, cache.max_seq(), args.rope_mscale)
        };
        let shape = StepShape {
            layer,
            batch_offset,
            b,
            tokens,
        };
        let plan = self.plan_decode(cache, shape, args.rope_mscale, shared)?;
        let splits = plan.max_splits;
        let (stream, graph) =
            LayerDecodeGraph::capture_on(&self.rt, |cs| self.enqueue_decode(&plan, cs, splits))?;
        let (bufs, gemms, binding) = plan.into_graph_parts();
        Ok(LayerDecodeGraph {
            rt: self.rt.clone(),
            stream,
            graph,
            bufs,
            _gemms: gemms,
            binding,
            hidden: self.config.hidden,
            splits,
            tokens,
            proj_bias_host: self.proj_bias_host.clone(),
            poison: self.poison.load(Ordering::Relaxed),
        })
    }

    /// One decode step (`hidden` `[1, b, h]`, host tensors in and out) through the fused
    /// `decode_splitkv` kernel: rope of the new q/k from cos/sin tables at each slot's own
    /// position, append, split-KV attention, LSE combine. A convenience over
    /// [`decode_device`](Self::decode_device) (the same plan and kernels, then a copy back
    /// that synchronizes). With `args.positions` it takes the [`prefill`](Self::prefill)
    /// path (explicit positions). Errors as the CPU layer's `decode`; on error nothing is
    /// written to the cache.
    pub fn decode(
        &self,
        hidden: &Tensor,
        cache: &mut crate::cuda::DeviceStaticKvCache,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<LayerOutput> {
        hidden.expect_shape("hidden", &[Some(1), None, Some(self.config.hidden)])?;
        if args.positions.is_some() {
            return self.prefill(hidden, cache, layer, batch_offset, args);
        }
        self.check_kv_step(cache, args)?;
        let b = hidden.shape()[1];
        cache.check_append(layer, batch_offset, b, 1)?;
        let x = DeviceTensor::from_host(self.rt.stream(), hidden, self.elem)?;
        let out = self.decode_device(&x, cache, layer, batch_offset, args)?;
        Ok(LayerOutput {
            output: out.to_host()?.reshape(hidden.shape())?,
            bias: self.proj_bias_host.clone(),
        })
    }
}
