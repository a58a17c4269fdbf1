//! The pieces of the CUDA layer's backward around the attention kernels: the
//! `qkv_prep_backward` kernel (rope backward, q/k norm backward with parameter partials,
//! scatter into `linear_qkv`'s GQA-interleaved columns), the output gate's backward,
//! deterministic column sums, and the linears' backward GEMMs through cuBLASLt.
//!
//! Kernels come from `templates/layer_backward.cu`, rendered here (placeholders filled from
//! the layer's `qkv_prep` config: dtype, head dim, q/k norm, rope mode and rotated channels,
//! output gate) and compiled through the process-wide kernel cache like every other kernel
//! (NVRTC on a miss; `ATTN_JIT=off` needs them in the cache). One module per config, key
//! [`PrepBackwardKernels::key`]:
//! `qkv_prep_backward_<dtype>_hd<D>_<nonorm|layernorm|rmsnorm|l2norm>_<norope|ropehalf<R>|ropeinter<R>>[_gate]`,
//! with the entries `qkv_prep_backward_...` (the module key), `gate_backward_<dtype>`,
//! `kv_interleave_backward_<dtype>` (cross-attention's `linear_kv` gradient layout),
//! `column_sum_<dtype>`, `column_sum_f32_<dtype>`, `bias_grad_reduce_<dtype>`, and QK-Clip's
//! `max_logit_fold_<dtype>` (the layer's device record) and `qk_clip_scale_rows_<dtype>`
//! (the in-place rescale of `linear_qkv.weight`). Cross-attention (no q/k norm, rope or
//! gate there) uses the module of the plain config (`..._nonorm_norope`).
//!
//! **Determinism.** Nothing here uses atomics: the column sums (bias gradients, the norms'
//! weight and bias gradients) run in two fixed-order passes (rows in chunks of
//! [`SUM_CHUNK`], then the chunks), and cuBLASLt GEMMs are bitwise reproducible for the same
//! shapes on the same GPU (one heuristic pick, no split-K atomics requested). The cost is an
//! f32 partial buffer (`ceil(rows / SUM_CHUNK) x cols` per column sum; the norms'
//! `rows x 4 x head_dim`) and one extra small launch per sum.
//!
//! GEMMs (row-major, `W [out, in]`): input gradient `dX [n, in] = dY [n, out] · W` in the
//! layer's dtype (f32 accumulation), weight gradient `dW [out, in] = dYᵀ · X` with bf16/f16
//! operands and an **f32** result (cuBLASLt mixed-precision: A/B 16-bit, C/D f32, compute
//! f32).

use std::sync::Arc;

use attention_codegen::render::KernelConfig;
use attention_codegen::{QkNorm, RopeMode};
use cudarc::cublaslt::{result as lt, sys as ltsys, Matmul, MatmulConfig, MatmulShared};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use super::params::KernelParams;
use super::tensor::{alloc_uninit, DeviceElem, DeviceTensor, ElemType};
use super::CudaRuntime;
use crate::error::{AttnError, Result};

/// Rows summed per chunk in the first pass of a column sum.
pub const SUM_CHUNK: usize = 256;
/// Warps per block of `qkv_prep_backward` (`PREP_WARPS` in the template).
pub const PREP_BWD_WARPS: usize = 4;

const TEMPLATE: &str = include_str!("../../../templates/layer_backward.cu");
const TYPES: &str = include_str!("../../../templates/partials/types.cu");

/// Parameters of `qkv_prep_backward` (the CUDA declaration is `QkvPrepBwdParams` in
/// `templates/layer_backward.cu`). Pointers are raw device addresses (0 = null).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QkvPrepBwdParams {
    /// The forward's `linear_qkv` output `[n, W]`.
    pub qkv: u64,
    /// Gradient of post-rope q `[n, np, hn]`.
    pub dq: u64,
    /// Gradient of post-rope k `[n, ng, hn]`.
    pub dk: u64,
    /// Gradient of v `[n, ng, hn]`.
    pub dv: u64,
    /// Gradient of the raw gate `[n, np, hn]`, or null.
    pub dgate: u64,
    /// Written: gradient of the `linear_qkv` output `[n, W]`.
    pub dqkv: u64,
    /// Written: f32 `[n, 4, hn]` norm parameter partials, or null.
    pub norm_partials: u64,
    /// q norm weight `[hn]`, or null.
    pub q_norm_weight: u64,
    /// q norm bias (unused by the backward; kept for symmetry), or null.
    pub q_norm_bias: u64,
    /// k norm weight, or null.
    pub k_norm_weight: u64,
    /// k norm bias, or null.
    pub k_norm_bias: u64,
    /// int32 `[n]` rope positions, or null.
    pub positions: u64,
    /// Norm epsilon.
    pub eps: f32,
    /// Rope base.
    pub rotary_base: f32,
    /// The forward's rope mscale.
    pub mscale: f32,
    /// Token rows.
    pub num_tokens: i32,
    /// Query heads.
    pub num_heads: i32,
    /// K/V groups.
    pub num_groups: i32,
}

// SAFETY: #[repr(C)], every field an integer, a float or a raw device pointer (u64); the
// NVRTC test (tests/nvrtc_layer_backward.rs) holds the CUDA declaration to FIELDS.
unsafe impl KernelParams for QkvPrepBwdParams {
    const FIELDS: &'static [(&'static str, usize, usize)] = &{
        macro_rules! f {
            ($($n:ident: $t:ty),*) => {
                [$((stringify!($n), std::mem::offset_of!(QkvPrepBwdParams, $n), std::mem::size_of::<$t>())),*]
            };
        }
        f!(
            qkv: u64,
            dq: u64,
            dk: u64,
            dv: u64,
            dgate: u64,
            dqkv: u64,
            norm_partials: u64,
            q_norm_weight: u64,
            q_norm_bias: u64,
            k_norm_weight: u64,
            k_norm_bias: u64,
            positions: u64,
            eps: f32,
            rotary_base: f32,
            mscale: f32,
            num_tokens: i32,
            num_heads: i32,
            num_groups: i32
        )
    };
}

/// The rendered `layer_backward` module of one `qkv_prep` config.
#[derive(Debug, Clone)]
pub struct PrepBackwardKernels {
    /// Module key = the `qkv_prep_backward` entry.
    pub key: String,
    /// CUDA source.
    pub source: String,
    /// `gate_backward_<dtype>`.
    pub gate_entry: String,
    /// `kv_interleave_backward_<dtype>`.
    pub kv_entry: String,
    /// `column_sum_<dtype>`.
    pub sum_entry: String,
    /// `column_sum_f32_<dtype>`.
    pub sum_f32_entry: String,
    /// `bias_grad_reduce_<dtype>`.
    pub bias_entry: String,
    /// `max_logit_fold_<dtype>` (QK-Clip's device record).
    pub fold_entry: String,
    /// `qk_clip_scale_rows_<dtype>` (QK-Clip's rescale of `linear_qkv.weight`).
    pub scale_entry: String,
}

impl PrepBackwardKernels {
    /// Render the module for the `qkv_prep` config `prep` (its dtype, head dim, q/k norm,
    /// rope, gate; a cross-attention config gets the plain module, which its backward needs
    /// only for the helpers). Errors ([`AttnError::Render`]) for a head dim that is not a
    /// multiple of 16, or a cross-attention config with a q/k norm, rope or gate.
    pub fn render(prep: &KernelConfig) -> Result<PrepBackwardKernels> {
        if prep.layout != attention_codegen::render::PrepLayout::SelfAttention {
            if prep.qk_norm.is_some() || prep.rope.is_some() || prep.output_gate {
                return Err(AttnError::Render(
                    "qkv_prep_backward: cross-attention with a q/k norm, rope or output gate"
                        .into(),
                ));
            }
            let mut plain = prep.clone();
            plain.layout = attention_codegen::render::PrepLayout::SelfAttention;
            return PrepBackwardKernels::render(&plain);
        }
        let hd = prep.head_dim;
        if hd == 0 || !hd.is_multiple_of(16) {
            return Err(AttnError::Render(format!(
                "qkv_prep_backward: head dim {hd} is not a multiple of 16"
            )));
        }
        let dt = prep.dtype.name();
        let (norm_name, norm_id) = match prep.qk_norm {
            None => ("nonorm", 0),
            Some(QkNorm::Layer) => ("layernorm", 1),
            Some(QkNorm::Rms) => ("rmsnorm", 2),
            Some(QkNorm::L2) => ("l2norm", 3),
        };
        let (rope_name, rope_id, rot) = match prep.rope {
            None => ("norope".to_string(), 0, 0),
            Some((RopeMode::Half, r)) => (format!("ropehalf{r}"), 1, r),
            Some((RopeMode::Interleaved, r)) => (format!("ropeinter{r}"), 2, r),
        };
        let gate = prep.output_gate;
        let key = format!(
            "qkv_prep_backward_{dt}_hd{hd}_{norm_name}_{rope_name}{}",
            if gate { "_gate" } else { "" }
        );
        let elem = match prep.dtype {
            attention_codegen::DType::Bf16 => "bf16_t",
            attention_codegen::DType::F16 => "f16_t",
        };
        let types = TYPES
            .replace("{{ dtype }}", dt)
            .replace("{{ elem }}", elem)
            .replace("{{ head_dim }}", &hd.to_string());
        let source = TEMPLATE
            .replace("{{ types }}", &types)
            .replace("{{ prep_key }}", &key)
            .replace("{{ key }}", &key)
            .replace("{{ dtype }}", dt)
            .replace("{{ head_dim }}", &hd.to_string())
            .replace("{{ qk_norm }}", norm_name)
            .replace("{{ qk_norm_id }}", &norm_id.to_string())
            .replace("{{ rope }}", &rope_name)
            .replace("{{ rope_id }}", &rope_id.to_string())
            .replace("{{ rot_dim }}", &rot.to_string())
            .replace("{{ has_gate }}", if gate { "true" } else { "false" })
            .replace("{{ has_gate_id }}", if gate { "1" } else { "0" });
        debug_assert!(
            !source.contains("{{"),
            "unfilled placeholder in layer_backward.cu"
        );
        Ok(PrepBackwardKernels {
            gate_entry: format!("gate_backward_{dt}"),
            kv_entry: format!("kv_interleave_backward_{dt}"),
            sum_entry: format!("column_sum_{dt}"),
            sum_f32_entry: format!("column_sum_f32_{dt}"),
            bias_entry: format!("bias_grad_reduce_{dt}"),
            fold_entry: format!("max_logit_fold_{dt}"),
            scale_entry: format!("qk_clip_scale_rows_{dt}"),
            key,
            source,
        })
    }

    /// Every entry point: the prep backward, the gate backward, the kv interleave, both
    /// column sums, the attention bias gradient's reduction, QK-Clip's record fold and row
    /// rescale.
    pub fn entries(&self) -> [&str; 8] {
        [
            &self.key,
            &self.gate_entry,
            &self.kv_entry,
            &self.sum_entry,
            &self.sum_f32_entry,
            &self.bias_entry,
            &self.fold_entry,
            &self.scale_entry,
        ]
    }
}

/// The loaded entries of a [`PrepBackwardKernels`] module.
pub(crate) struct LoadedPrepBackward {
    pub key: String,
    pub prep: CudaFunction,
    pub gate: CudaFunction,
    pub kv: CudaFunction,
    pub sum: CudaFunction,
    pub sum_f32: CudaFunction,
    pub bias_reduce: CudaFunction,
    pub fold: CudaFunction,
    pub scale_rows: CudaFunction,
}

/// Load (compiling on a cache miss) the module of `k` on `rt`'s device; its functions are
/// kept in the runtime's kernel map under their entry names (`<module key>` for the prep
/// entry; the dtype-suffixed helpers are the same code in every module).
pub(crate) fn load(rt: &CudaRuntime, k: &PrepBackwardKernels) -> Result<LoadedPrepBackward> {
    let mut cache = rt.kernels.lock().unwrap_or_else(|p| p.into_inner());
    let names = k.entries();
    // The runtime's function map is keyed by name, and the helper entries
    // (`gate_backward_<dt>`, `kv_interleave_backward_<dt>`, ...) have the same name in every
    // module although they are compiled for the module's HEAD_DIM: qualify them with the
    // module key, or a layer of another head dim reuses them (a cross-attention layer at hd32
    // after one at hd64 interleaved its K/V gradient with hd64's kernel).
    let slot = |n: &str| format!("{}::{n}", k.key);
    let hit: Option<Vec<CudaFunction>> =
        names.iter().map(|n| cache.get(&slot(n)).cloned()).collect();
    let fs = match hit {
        Some(fs) => fs,
        None => {
            let arch = rt.device().arch();
            let cubin = crate::kernel_cache::KernelCache::global()?
                .get_or_compile(&k.key, &k.source, &arch)?;
            let module = rt
                .device()
                .context
                .load_module(cudarc::nvrtc::Ptx::from_binary(cubin.bytes.clone()))
                .map_err(|e| AttnError::Cuda {
                    call: format!("cuModuleLoadData {} ({arch})", k.key),
                    msg: e.to_string(),
                })?;
            let mut fs = Vec::with_capacity(names.len());
            for n in names {
                let f = super::launch::load_function(&module, n)?;
                cache.insert(slot(n), f.clone());
                fs.push(f);
            }
            fs
        }
    };
    let mut it = fs.into_iter();
    let mut next = || it.next().expect("eight entries");
    Ok(LoadedPrepBackward {
        key: k.key.clone(),
        prep: next(),
        gate: next(),
        kv: next(),
        sum: next(),
        sum_f32: next(),
        bias_reduce: next(),
        fold: next(),
        scale_rows: next(),
    })
}

fn launch_err(key: &str) -> impl FnOnce(cudarc::driver::DriverError) -> AttnError + '_ {
    super::launch::launch_err(key)
}

fn i32_arg(arg: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| AttnError::InvalidArgument {
        arg: arg.into(),
        expected: "a value that fits in int32".into(),
        got: v.to_string(),
    })
}

impl LoadedPrepBackward {
    /// Queue `qkv_prep_backward` over `rows` tokens.
    ///
    /// # Safety
    /// `p`'s buffers hold `rows` token rows of the documented shapes (or are null where
    /// allowed).
    pub unsafe fn launch_prep(
        &self,
        st: &Arc<CudaStream>,
        rows: usize,
        p: &QkvPrepBwdParams,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (i32_arg("rows", rows)? as u32, 1, 1),
            block_dim: ((PREP_BWD_WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: QkvPrepBwdParams is the kernel's parameter struct (layout test in
        // tests/nvrtc_layer_backward.rs); buffers per the caller's contract.
        unsafe { super::params::launch(st, &self.prep, cfg, p) }.map_err(launch_err(&self.key))
    }

    /// `d_o = dy * sigmoid(g)`, `d_gate = dy * o * sigmoid'(g)` over `n` elements (all five
    /// tensors of dtype `T`, at least `n` elements each).
    pub fn gate_backward<T: DeviceElem>(
        &self,
        st: &Arc<CudaStream>,
        dy: &DeviceTensor,
        o: &DeviceTensor,
        gate: &DeviceTensor,
        d_o: &mut DeviceTensor,
        d_gate: &mut DeviceTensor,
    ) -> Result<()> {
        let n = dy.numel();
        for (a, t) in [("o", o.numel()), ("gate", gate.numel())]
            .into_iter()
            .chain([("d_o", d_o.numel()), ("d_gate", d_gate.numel())])
        {
            if t != n {
                return Err(AttnError::Shape {
                    arg: a.into(),
                    expected: format!("{n} elements"),
                    got: vec![t],
                });
            }
        }
        if n == 0 {
            return Ok(());
        }
        let (dy, o, gate) = (
            dy.typed::<T>("dy")?,
            o.typed::<T>("o")?,
            gate.typed::<T>("gate")?,
        );
        let d_o = d_o.typed_mut::<T>("d_o")?;
        let d_gate = d_gate.typed_mut::<T>("d_gate")?;
        let blocks = n.div_ceil(256).min(65535 * 8) as u32;
        let nn = n as i64;
        let mut b = st.launch_builder(&self.gate);
        b.arg(dy).arg(o).arg(gate).arg(d_o).arg(d_gate).arg(&nn);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the entry's signature is (const T*, const T*, const T*, T*, T*, long long);
        // every buffer holds n elements (checked above); the loop is grid-stride.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(launch_err("gate_backward"))
    }

    /// Cross-attention: `dkv [vecs, 2 hd]` (per head `[dk | dv]`) from `dk`, `dv`
    /// `[vecs, hd]` (dtype `T`).
    pub fn kv_interleave<T: DeviceElem>(
        &self,
        st: &Arc<CudaStream>,
        dk: &DeviceTensor,
        dv: &DeviceTensor,
        dkv: &mut DeviceTensor,
    ) -> Result<()> {
        let n = dk.numel();
        if dv.numel() != n || dkv.numel() != 2 * n {
            return Err(AttnError::Shape {
                arg: "dkv".into(),
                expected: format!("dk, dv of {n} elements and dkv of {}", 2 * n),
                got: vec![dv.numel(), dkv.numel()],
            });
        }
        let hd = dk.shape().last().copied().unwrap_or(1).max(1);
        if n == 0 {
            return Ok(());
        }
        let vecs = (n / hd) as i64;
        let (dk, dv) = (dk.typed::<T>("dk")?, dv.typed::<T>("dv")?);
        let dkv = dkv.typed_mut::<T>("dkv")?;
        let mut b = st.launch_builder(&self.kv);
        b.arg(dk).arg(dv).arg(dkv).arg(&vecs);
        // SAFETY: (const T*, const T*, T*, long long); dk, dv hold vecs x HEAD_DIM elements
        // (the caller's last dim is the module's head dim), dkv twice that; grid-stride.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (n.div_ceil(256).min(65535 * 8) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map(|_| ())
        .map_err(launch_err("kv_interleave_backward"))
    }

    /// Column sums of `src` `[rows, cols]` (dtype `T`, or f32 when `T = f32`) into a new f32
    /// `[cols]` buffer, deterministic (two fixed-order passes).
    pub fn column_sum<T: DeviceElem>(
        &self,
        st: &Arc<CudaStream>,
        src: &CudaSlice<T>,
        rows: usize,
        cols: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if out.len() < cols {
            return Err(AttnError::Shape {
                arg: "column sum output".into(),
                expected: format!("{cols} elements"),
                got: vec![out.len()],
            });
        }
        if rows == 0 || cols == 0 {
            return st
                .memset_zeros(out)
                .map_err(super::tensor::cuda_err("memset column sum"));
        }
        let chunks = rows.div_ceil(SUM_CHUNK);
        let mut part = alloc_uninit::<f32>(st, chunks * cols, "column sum partials")?;
        let (r, c, pc) = (
            i32_arg("rows", rows)?,
            i32_arg("cols", cols)?,
            i32_arg("chunk", SUM_CHUNK)?,
        );
        if chunks > 65535 {
            return Err(AttnError::InvalidArgument {
                arg: "rows".into(),
                expected: format!("at most {} rows", 65535 * SUM_CHUNK),
                got: rows.to_string(),
            });
        }
        let f = if T::ELEM == ElemType::F32 {
            &self.sum_f32
        } else {
            &self.sum
        };
        let grid_x = cols.div_ceil(256) as u32;
        {
            let mut b = st.launch_builder(f);
            b.arg(src).arg(&mut part).arg(&r).arg(&c).arg(&pc);
            // SAFETY: (const T*, float*, int, int, int); src holds rows x cols, part
            // chunks x cols.
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (grid_x, chunks as u32, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(launch_err("column_sum"))?;
        }
        let (rc, one) = (i32_arg("chunks", chunks)?, i32_arg("chunks", chunks)?);
        let mut b = st.launch_builder(&self.sum_f32);
        b.arg(&part).arg(out).arg(&rc).arg(&c).arg(&one);
        // SAFETY: (const float*, float*, int, int, int); part holds chunks x cols, out cols;
        // one chunk of every row.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (grid_x, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(launch_err("column_sum_f32"))?;
        Ok(())
    }

    /// The additive attention bias's gradient in its own shape: `dense` is the attention
    /// backward's f32 dS `[b, h, i, j]` = `target`, `bias_dims` the bias's 4-d extent (each
    /// dim `target`'s or 1, a broadcast dim); `out` (`bias_dims`' product) gets every bias
    /// element's sum over the positions it feeds, in fixed order (deterministic).
    pub fn bias_grad_reduce(
        &self,
        st: &Arc<CudaStream>,
        dense: &CudaSlice<f32>,
        target: [usize; 4],
        bias_dims: [usize; 4],
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let n: usize = bias_dims.iter().product();
        let full: usize = target.iter().product();
        if out.len() < n || dense.len() < full {
            return Err(AttnError::Shape {
                arg: "attention bias gradient".into(),
                expected: format!("{n} output and {full} dense elements"),
                got: vec![out.len(), dense.len()],
            });
        }
        if bias_dims.iter().zip(target).any(|(&d, t)| d != 1 && d != t) {
            return Err(AttnError::Shape {
                arg: "attention bias extent".into(),
                expected: format!("each dim 1 or that of {target:?}"),
                got: bias_dims.to_vec(),
            });
        }
        if n == 0 {
            return Ok(());
        }
        let v = target
            .iter()
            .chain(&bias_dims)
            .map(|&x| i32_arg("attention bias extent", x))
            .collect::<Result<Vec<i32>>>()?;
        let blocks = n.div_ceil(256).min(65535) as u32;
        let mut b = st.launch_builder(&self.bias_reduce);
        b.arg(dense).arg(out);
        for x in &v {
            b.arg(x);
        }
        // SAFETY: (const float*, float*, int x 8); dense holds the target's product, out
        // the bias extent's; grid-stride over out.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(launch_err("bias_grad_reduce"))?;
        Ok(())
    }
}

impl LoadedPrepBackward {
    /// QK-Clip's record: `running[i] = max(running[i], src[i])` over f32 `[n]` on the device
    /// (a NaN in `src` is ignored).
    pub fn max_fold(
        &self,
        st: &Arc<CudaStream>,
        src: &CudaSlice<f32>,
        running: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let n = src.len();
        if running.len() != n {
            return Err(AttnError::Shape {
                arg: "max-logit record".into(),
                expected: format!("[{n}] (the forward's max logits)"),
                got: vec![running.len()],
            });
        }
        if n == 0 {
            return Ok(());
        }
        let nn = i32_arg("heads", n)?;
        let mut b = st.launch_builder(&self.fold);
        b.arg(src).arg(running).arg(&nn);
        // SAFETY: (const float*, float*, int); both hold n floats (checked above); one thread
        // per element.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (n.div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map(|_| ())
        .map_err(launch_err("max_logit_fold"))
    }

    /// QK-Clip's rescale in place: `w [rows, cols]` (dtype `T`) row `r` times
    /// `row_factor[r]` (f32 `[rows]`; rows of factor 1 untouched).
    pub fn scale_rows<T: DeviceElem>(
        &self,
        st: &Arc<CudaStream>,
        w: &mut DeviceTensor,
        row_factor: &CudaSlice<f32>,
    ) -> Result<()> {
        let (rows, cols) = match w.shape() {
            [r, c] => (*r, *c),
            s => {
                return Err(AttnError::Shape {
                    arg: "linear_qkv.weight".into(),
                    expected: "[rows, cols]".into(),
                    got: s.to_vec(),
                })
            }
        };
        if row_factor.len() != rows {
            return Err(AttnError::Shape {
                arg: "row factors".into(),
                expected: format!("[{rows}] (one per weight row)"),
                got: vec![row_factor.len()],
            });
        }
        let n = rows * cols;
        if n == 0 {
            return Ok(());
        }
        let (r, c) = (rows as i64, i32_arg("cols", cols)?);
        let ws = w.typed_mut::<T>("linear_qkv.weight")?;
        let mut b = st.launch_builder(&self.scale_rows);
        b.arg(ws).arg(row_factor).arg(&r).arg(&c);
        // SAFETY: (T*, const float*, long long, int); w holds rows x cols elements of T and
        // row_factor rows floats (checked above); grid-stride.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (n.div_ceil(256).min(65535 * 8) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map(|_| ())
        .map_err(launch_err("qk_clip_scale_rows"))
    }
}

/// `dx [rows, inp] = dy [rows, out] · w [out, inp]` in dtype `T` (f32 accumulation).
pub(crate) fn gemm_dgrad<T: DeviceElem>(
    rt: &CudaRuntime,
    arg: &str,
    dy: &DeviceTensor,
    w: &DeviceTensor,
    rows: usize,
    dx: &mut DeviceTensor,
) -> Result<()>
where
    cudarc::cublaslt::CudaBlasLT: Matmul<T>,
{
    let (out, inp) = (w.shape()[0], w.shape()[1]);
    if dy.numel() < rows * out || dx.numel() < rows * inp {
        return Err(AttnError::Shape {
            arg: arg.into(),
            expected: format!("dy [{rows}, {out}] and dx [{rows}, {inp}]"),
            got: dy.shape().to_vec(),
        });
    }
    if rows == 0 {
        return Ok(());
    }
    let ws = w.typed::<T>(&format!("{arg}.weight"))?.slice(..);
    let ys = dy.typed::<T>(arg)?.slice(..rows * out);
    let cfg = MatmulConfig {
        transa: false,
        transb: false,
        transc: false,
        m: inp as u64,
        n: rows as u64,
        k: out as u64,
        alpha: 1.0,
        lda: inp as i64,
        ldb: out as i64,
        beta: 0.0,
        ldc: inp as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    let xs = dx.typed_mut::<T>(arg)?;
    // SAFETY: A = W row-major [out, inp] = column-major inp x out (lda = inp), B = dy
    // row-major [rows, out] = column-major out x rows (ldb = out), C = dx row-major
    // [rows, inp] = column-major inp x rows (ldc = inp); sizes checked above.
    unsafe {
        rt.blas()
            .matmul(cfg, &ws, &ys, xs, None, None)
            .map_err(|e| AttnError::KernelLaunch {
                key: format!("cublasLtMatmul {arg} dgrad ({rows}x{out} . {out}x{inp})"),
                msg: e.to_string(),
            })?;
    }
    Ok(())
}

struct LtGuard {
    layouts: Vec<ltsys::cublasLtMatrixLayout_t>,
    desc: Option<ltsys::cublasLtMatmulDesc_t>,
    pref: Option<ltsys::cublasLtMatmulPreference_t>,
}

impl Drop for LtGuard {
    fn drop(&mut self) {
        // SAFETY: each handle was created by cuBLASLt and is destroyed once.
        unsafe {
            for l in self.layouts.drain(..) {
                let _ = lt::destroy_matrix_layout(l);
            }
            if let Some(d) = self.desc.take() {
                let _ = lt::destroy_matmul_desc(d);
            }
            if let Some(p) = self.pref.take() {
                let _ = lt::destroy_matmul_pref(p);
            }
        }
    }
}

/// `dw [out, inp] (f32) = dy [rows, out]ᵀ · x [rows, inp]`, operands of dtype `elem`
/// (bf16/f16), f32 output and accumulation (cuBLASLt mixed precision, no workspace).
pub(crate) fn gemm_wgrad_f32(
    rt: &CudaRuntime,
    arg: &str,
    (dy, x): (&DeviceTensor, &DeviceTensor),
    (rows, out, inp): (usize, usize, usize),
    dw: &mut CudaSlice<f32>,
) -> Result<()> {
    let st = rt.stream();
    if dy.numel() < rows * out
        || x.numel() < rows * inp
        || dy.elem() != x.elem()
        || dw.len() < out * inp
    {
        return Err(AttnError::Shape {
            arg: arg.into(),
            expected: format!(
                "dy [{rows}, {out}], x [{rows}, {inp}] of one dtype, dw [{out}, {inp}]"
            ),
            got: dy.shape().to_vec(),
        });
    }
    if rows == 0 || out == 0 || inp == 0 {
        return st
            .memset_zeros(dw)
            .map_err(super::tensor::cuda_err("memset weight gradient"));
    }
    let ab = match dy.elem() {
        ElemType::Bf16 => ltsys::cudaDataType_t::CUDA_R_16BF,
        ElemType::F16 => ltsys::cudaDataType_t::CUDA_R_16F,
        ElemType::F32 => {
            return Err(AttnError::DType {
                arg: arg.into(),
                expected: "bf16 or f16".into(),
                got: "f32".into(),
            })
        }
    };
    let lt_err = |what: &str| {
        let key = format!("cublasLt {what} {arg} wgrad ({out}x{rows} . {rows}x{inp})");
        move |e: cudarc::cublaslt::result::CublasError| AttnError::KernelLaunch {
            key,
            msg: format!("{e:?}"),
        }
    };
    // cuBLASLt runs in the current context: make it this stream's (cudarc's own matmul
    // wrapper relies on an earlier binding).
    st.context()
        .bind_to_thread()
        .map_err(super::tensor::cuda_err("cuCtxSetCurrent"))?;
    let (m, n, k) = (inp as u64, out as u64, rows as u64);
    let mut g = LtGuard {
        layouts: Vec::new(),
        desc: None,
        pref: None,
    };
    // A = x as stored: column-major inp x rows (m x k, lda = inp), not transposed.
    g.layouts
        .push(lt::create_matrix_layout(ab, m, k, inp as i64).map_err(lt_err("layout"))?);
    // B = dy as stored: column-major out x rows (n x k, ldb = out), transposed to k x n.
    g.layouts
        .push(lt::create_matrix_layout(ab, n, k, out as i64).map_err(lt_err("layout"))?);
    // C = D = dw column-major inp x out (m x n, ldc = inp) = row-major [out, inp], f32.
    g.layouts.push(
        lt::create_matrix_layout(ltsys::cudaDataType_t::CUDA_R_32F, m, n, inp as i64)
            .map_err(lt_err("layout"))?,
    );
    let desc = lt::create_matmul_desc(
        ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ltsys::cudaDataType_t::CUDA_R_32F,
    )
    .map_err(lt_err("desc"))?;
    g.desc = Some(desc);
    let (ta, tb): (i32, i32) = (0, 1);
    // SAFETY: live descriptor; the attributes are int32 transpose flags.
    unsafe {
        lt::set_matmul_desc_attribute(
            desc,
            ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &ta as *const i32 as *const _,
            std::mem::size_of::<i32>(),
        )
        .map_err(lt_err("transa"))?;
        lt::set_matmul_desc_attribute(
            desc,
            ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            &tb as *const i32 as *const _,
            std::mem::size_of::<i32>(),
        )
        .map_err(lt_err("transb"))?;
    }
    let pref = lt::create_matmul_pref().map_err(lt_err("preference"))?;
    g.pref = Some(pref);
    let handle = *rt.blas().handle();
    let (la, lb, lc) = (g.layouts[0], g.layouts[1], g.layouts[2]);
    // SAFETY: live handles; the heuristic only reads them.
    let heur = unsafe { lt::get_matmul_algo_heuristic(handle, desc, la, lb, lc, lc, pref) }
        .map_err(lt_err("heuristic"))?;
    let (alpha, beta) = (1.0f32, 0.0f32);
    macro_rules! run {
        ($t:ty) => {{
            let xs = x.typed::<$t>(arg)?;
            let ys = dy.typed::<$t>(arg)?;
            let (xp, _g1) = cudarc::driver::DevicePtr::device_ptr(xs, st);
            let (yp, _g2) = cudarc::driver::DevicePtr::device_ptr(ys, st);
            let (wp, _g3) = cudarc::driver::DevicePtrMut::device_ptr_mut(dw, st);
            // SAFETY: the layouts above describe x (inp x rows), dy (out x rows) and dw
            // (inp x out, f32), all live buffers of at least those sizes (checked), on
            // `st`, the stream the matmul is queued on; no workspace.
            unsafe {
                lt::matmul(
                    handle,
                    desc,
                    &alpha as *const f32 as *const _,
                    &beta as *const f32 as *const _,
                    xp as *const _,
                    la,
                    yp as *const _,
                    lb,
                    wp as *const _,
                    lc,
                    wp as *mut _,
                    lc,
                    &heur.algo as *const _,
                    std::ptr::null_mut(),
                    0,
                    st.cu_stream() as *mut _,
                )
            }
            .map_err(lt_err("matmul"))?;
        }};
    }
    match dy.elem() {
        ElemType::Bf16 => run!(half::bf16),
        ElemType::F16 => run!(half::f16),
        ElemType::F32 => unreachable!("refused above"),
    }
    drop(g);
    Ok(())
}
