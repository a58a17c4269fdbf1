//! The helper kernels of context-parallel core attention's backward on the GPU
//! (`templates/cp_backward.cu`): slice the forward's global LSE for one launch, add a
//! launch's dq / dk / dv into f32 accumulators, round the sums once, join the sink column to
//! a merged LSE, and the learnable sinks' gradient over a rank's rows. The attention backward
//! itself runs on the single-GPU kernels ([`crate::cuda::backward`]).
//!
//! Rendered here (dtype, head dim) and compiled through the process-wide kernel cache like
//! the other kernels. One module per (dtype, head dim), key [`CpBackwardKernels::key`]
//! `cp_backward_<dtype>_hd<D>`. The NVRTC test is `tests/nvrtc_cp_backward.rs`.

use std::sync::Arc;

use attention_codegen::DType;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use super::cp_kernels::{tensor_ptr, tensor_ptr_mut};
use super::tensor::{DeviceTensor, ElemType};
use super::CudaRuntime;
use crate::error::{AttnError, Result};

const TEMPLATE: &str = include_str!("../../../templates/cp_backward.cu");
const TYPES: &str = include_str!("../../../templates/partials/types.cu");

/// The rendered module of one dtype and head dim.
#[derive(Debug, Clone)]
pub struct CpBackwardKernels {
    /// Module key `cp_backward_<dtype>_hd<D>`.
    pub key: String,
    /// CUDA source.
    pub source: String,
    /// The element type's name (`bf16`, `f16`).
    pub dtype: String,
    /// The head dim it is compiled for.
    pub head_dim: usize,
}

impl CpBackwardKernels {
    /// Render the module. Errors ([`AttnError::Render`]) for a head dim that is not a
    /// positive multiple of 16.
    pub fn render(dtype: DType, head_dim: usize) -> Result<CpBackwardKernels> {
        if head_dim == 0 || !head_dim.is_multiple_of(16) {
            return Err(AttnError::Render(format!(
                "cp_backward: head dim {head_dim} is not a multiple of 16"
            )));
        }
        let dt = dtype.name();
        let elem = match dtype {
            DType::Bf16 => "bf16_t",
            DType::F16 => "f16_t",
        };
        let key = format!("cp_backward_{dt}_hd{head_dim}");
        let types = TYPES
            .replace("{{ dtype }}", dt)
            .replace("{{ elem }}", elem)
            .replace("{{ head_dim }}", &head_dim.to_string());
        let source = TEMPLATE
            .replace("{{ types }}", &types)
            .replace("{{ key }}", &key)
            .replace("{{ dtype }}", dt)
            .replace("{{ head_dim }}", &head_dim.to_string());
        debug_assert!(
            !source.contains("{{"),
            "unfilled placeholder in cp_backward.cu"
        );
        Ok(CpBackwardKernels {
            key,
            source,
            dtype: dt.to_string(),
            head_dim,
        })
    }

    /// Every entry point, in load order: add rows, cast, LSE slice, LSE sink, dsinks.
    pub fn entries(&self) -> [String; 5] {
        let dt = &self.dtype;
        [
            format!("cpb_add_rows_{dt}"),
            format!("cpb_cast_{dt}"),
            "cpb_lse_slice".to_string(),
            "cpb_lse_sink".to_string(),
            format!("cpb_dsinks_{dt}"),
        ]
    }
}

/// The loaded entries of a [`CpBackwardKernels`] module.
pub(crate) struct LoadedCpBackward {
    elem: ElemType,
    add_rows: CudaFunction,
    cast: CudaFunction,
    lse_slice: CudaFunction,
    lse_sink: CudaFunction,
    dsinks: CudaFunction,
}

/// Load (compiling on a cache miss) the module of `k` on `rt`'s device.
pub(crate) fn load(rt: &CudaRuntime, k: &CpBackwardKernels) -> Result<LoadedCpBackward> {
    let mut cache = rt.kernels.lock().unwrap_or_else(|p| p.into_inner());
    let names = k.entries();
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
            for n in &names {
                let f = super::launch::load_function(&module, n)?;
                cache.insert(slot(n), f.clone());
                fs.push(f);
            }
            fs
        }
    };
    let [add_rows, cast, lse_slice, lse_sink, dsinks]: [CudaFunction; 5] =
        fs.try_into().map_err(|_| AttnError::Cuda {
            call: format!("load {}", k.key),
            msg: "expected five entries".into(),
        })?;
    Ok(LoadedCpBackward {
        elem: if k.dtype == "bf16" {
            ElemType::Bf16
        } else {
            ElemType::F16
        },
        add_rows,
        cast,
        lse_slice,
        lse_sink,
        dsinks,
    })
}

/// Blocks of 256 threads for a grid-stride loop over `n` elements.
fn stride_grid(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 1 << 20) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn shape_err(arg: &str, expected: String, got: usize) -> AttnError {
    AttnError::Shape {
        arg: arg.into(),
        expected,
        got: vec![got],
    }
}

fn i32_arg(arg: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| AttnError::InvalidArgument {
        arg: arg.into(),
        expected: "a value that fits in int32".into(),
        got: v.to_string(),
    })
}

fn launch_err(key: &str) -> impl FnOnce(cudarc::driver::DriverError) -> AttnError + '_ {
    super::launch::launch_err(key)
}

impl LoadedCpBackward {
    fn check_elem(&self, arg: &str, t: &DeviceTensor) -> Result<()> {
        if t.elem() == self.elem {
            Ok(())
        } else {
            Err(AttnError::DType {
                arg: arg.into(),
                expected: self.elem.name().into(),
                got: t.elem().name().into(),
            })
        }
    }

    /// `acc[(row0 + r) * width + c] += src[r * width + c]` for `r < n`: `acc` f32, `src` of
    /// the module's dtype.
    pub(crate) fn add_rows(
        &self,
        st: &Arc<CudaStream>,
        acc: &mut DeviceTensor,
        src: &DeviceTensor,
        row0: usize,
        n: usize,
        width: usize,
    ) -> Result<()> {
        self.check_elem("cp add src", src)?;
        if acc.elem() != ElemType::F32
            || acc.numel() < (row0 + n) * width
            || src.numel() < n * width
        {
            return Err(shape_err(
                "cp add",
                format!("an f32 accumulator of {} elements", (row0 + n) * width),
                acc.numel(),
            ));
        }
        if n == 0 || width == 0 {
            return Ok(());
        }
        let (ap, sp) = (tensor_ptr_mut(acc, st), tensor_ptr(src, st));
        let (r0, nn, w) = (row0 as i64, n as i64, i32_arg("width", width)?);
        let mut b = st.launch_builder(&self.add_rows);
        b.arg(&ap).arg(&sp).arg(&r0).arg(&nn).arg(&w);
        // SAFETY: (float*, const elem_t*, long long, long long, int); acc holds
        // (row0 + n) * width f32, src n * width elements (checked); grid-stride.
        unsafe { b.launch(stride_grid(n * width)) }
            .map(|_| ())
            .map_err(launch_err("cpb_add_rows"))
    }

    /// `dst = src` rounded to the module's dtype (`dst.numel()` elements of f32 `src`).
    pub(crate) fn cast(
        &self,
        st: &Arc<CudaStream>,
        src: &DeviceTensor,
        dst: &mut DeviceTensor,
    ) -> Result<()> {
        self.check_elem("cp cast dst", dst)?;
        let n = dst.numel();
        if src.elem() != ElemType::F32 || src.numel() < n {
            return Err(shape_err(
                "cp cast",
                format!("an f32 source of {n} elements"),
                src.numel(),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        let (sp, dp) = (tensor_ptr(src, st), tensor_ptr_mut(dst, st));
        let nn = n as i64;
        let mut b = st.launch_builder(&self.cast);
        b.arg(&sp).arg(&dp).arg(&nn);
        // SAFETY: (const float*, elem_t*, long long); both hold n elements; grid-stride.
        unsafe { b.launch(stride_grid(n)) }
            .map(|_| ())
            .map_err(launch_err("cpb_cast"))
    }

    /// `dst [np, n]` = rows `row0 .. row0 + n` of `src [np, rows]` (f32 LSE).
    pub(crate) fn lse_slice(
        &self,
        st: &Arc<CudaStream>,
        src: &CudaSlice<f32>,
        dst: &mut CudaSlice<f32>,
        (np, rows): (usize, usize),
        (row0, n): (usize, usize),
    ) -> Result<()> {
        if src.len() < np * rows || dst.len() < np * n || row0 + n > rows {
            return Err(shape_err(
                "cp lse slice",
                format!("[{np}, {rows}] rows {row0}..{} into [{np}, {n}]", row0 + n),
                src.len(),
            ));
        }
        if n == 0 || np == 0 {
            return Ok(());
        }
        let (h, r, r0, nn) = (i32_arg("heads", np)?, rows as i64, row0 as i64, n as i64);
        let mut b = st.launch_builder(&self.lse_slice);
        b.arg(src).arg(dst).arg(&h).arg(&r).arg(&r0).arg(&nn);
        // SAFETY: (const float*, float*, int, long long, long long, long long); src holds
        // np * rows, dst np * n floats, row0 + n <= rows (checked); grid-stride.
        unsafe { b.launch(stride_grid(np * n)) }
            .map(|_| ())
            .map_err(launch_err("cpb_lse_slice"))
    }

    /// Join the sink column (`sinks`: `None` = off-by-one, a zero logit; `Some` = learnable
    /// `[np]`) to an LSE `[np, rows]` merged without it, in place.
    pub(crate) fn lse_sink(
        &self,
        st: &Arc<CudaStream>,
        lse: &mut CudaSlice<f32>,
        sinks: Option<&CudaSlice<f32>>,
        (np, rows): (usize, usize),
    ) -> Result<()> {
        if lse.len() < np * rows || sinks.is_some_and(|s| s.len() < np) {
            return Err(shape_err(
                "cp lse sink",
                format!("an LSE [{np}, {rows}] and sinks [{np}]"),
                lse.len(),
            ));
        }
        if np * rows == 0 {
            return Ok(());
        }
        let (mode, h, r) = (
            if sinks.is_some() { 2i32 } else { 1 },
            i32_arg("heads", np)?,
            rows as i64,
        );
        let null = 0u64;
        let mut b = st.launch_builder(&self.lse_sink);
        b.arg(lse);
        match sinks {
            Some(s) => b.arg(s),
            None => b.arg(&null),
        };
        b.arg(&mode).arg(&h).arg(&r);
        // SAFETY: (float*, const float*, int, int, long long); lse holds np * rows floats,
        // sinks np (read only in mode 2, null otherwise); grid-stride.
        unsafe { b.launch(stride_grid(np * rows)) }
            .map(|_| ())
            .map_err(launch_err("cpb_lse_sink"))
    }

    /// `dsinks[h] = -sum_i exp(sinks[h] - lse[h, i]) * rowsum(dout * out)[i, h]` over `rows`
    /// rows: `out`, `dout` `[rows, np, hn]` of the module's dtype, `lse` f32 `[np, rows]`
    /// (sink joined), `sinks` and `dsinks` f32 `[np]`.
    pub(crate) fn dsinks(
        &self,
        st: &Arc<CudaStream>,
        (out, dout): (&DeviceTensor, &DeviceTensor),
        lse: &CudaSlice<f32>,
        sinks: &CudaSlice<f32>,
        dsinks: &mut DeviceTensor,
        (np, rows, hn): (usize, usize, usize),
    ) -> Result<()> {
        self.check_elem("out", out)?;
        self.check_elem("dout", dout)?;
        if out.numel() < rows * np * hn
            || dout.numel() < rows * np * hn
            || lse.len() < np * rows
            || sinks.len() < np
            || dsinks.elem() != ElemType::F32
            || dsinks.numel() < np
        {
            return Err(shape_err(
                "cp dsinks",
                format!("out/dout [{rows}, {np}, {hn}], lse [{np}, {rows}], f32 dsinks [{np}]"),
                out.numel(),
            ));
        }
        if np == 0 {
            return Ok(());
        }
        let (op, dp, gp) = (
            tensor_ptr(out, st),
            tensor_ptr(dout, st),
            tensor_ptr_mut(dsinks, st),
        );
        let (h, r) = (i32_arg("heads", np)?, rows as i64);
        let mut b = st.launch_builder(&self.dsinks);
        b.arg(&op)
            .arg(&dp)
            .arg(lse)
            .arg(sinks)
            .arg(&gp)
            .arg(&h)
            .arg(&r);
        let cfg = LaunchConfig {
            grid_dim: (np as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: (const elem_t*, const elem_t*, const float*, const float*, float*, int,
        // long long); sizes checked above; one block of 256 per head (the kernel's reduction
        // assumes 256 threads).
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(launch_err("cpb_dsinks"))
    }
}
