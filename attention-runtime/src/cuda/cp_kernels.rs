//! The helper kernels of context-parallel core attention on the GPU
//! (`templates/cp_attention.cu`): the LSE merge of partial attention results, the output
//! (sinks and gate applied once, rounded once), an f32 fill, and a row gather that reorders
//! rows of any element type by an index table.
//!
//! Rendered here (placeholders filled: dtype, head dim) and compiled through the process-wide
//! kernel cache like every other kernel (NVRTC on a miss; `ATTN_JIT=off` needs them in the
//! cache). One module per (dtype, head dim), key [`CpKernels::key`]
//! `cp_attention_<dtype>_hd<D>`, entries `cp_merge_<dtype>`, `cp_finish_<dtype>`,
//! `cp_fill_f32`, `cp_gather_rows`. The NVRTC test is `tests/nvrtc_cp_attention.rs`.

use std::sync::Arc;

use attention_codegen::DType;
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};

use super::tensor::{DeviceData, DeviceElem, DeviceTensor};
use super::CudaRuntime;
use crate::error::{AttnError, Result};

const TEMPLATE: &str = include_str!("../../../templates/cp_attention.cu");
const TYPES: &str = include_str!("../../../templates/partials/types.cu");

/// The rendered module of one dtype and head dim.
#[derive(Debug, Clone)]
pub struct CpKernels {
    /// Module key `cp_attention_<dtype>_hd<D>`.
    pub key: String,
    /// CUDA source.
    pub source: String,
    /// `cp_merge_<dtype>`.
    pub merge_entry: String,
    /// `cp_finish_<dtype>`.
    pub finish_entry: String,
    /// The head dim it is compiled for.
    pub head_dim: usize,
}

impl CpKernels {
    /// Render the module. Errors ([`AttnError::Render`]) for a head dim that is not a
    /// positive multiple of 16.
    pub fn render(dtype: DType, head_dim: usize) -> Result<CpKernels> {
        if head_dim == 0 || !head_dim.is_multiple_of(16) {
            return Err(AttnError::Render(format!(
                "cp_attention: head dim {head_dim} is not a multiple of 16"
            )));
        }
        let dt = dtype.name();
        let elem = match dtype {
            DType::Bf16 => "bf16_t",
            DType::F16 => "f16_t",
        };
        let key = format!("cp_attention_{dt}_hd{head_dim}");
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
            "unfilled placeholder in cp_attention.cu"
        );
        Ok(CpKernels {
            merge_entry: format!("cp_merge_{dt}"),
            finish_entry: format!("cp_finish_{dt}"),
            head_dim,
            key,
            source,
        })
    }

    /// Every entry point: merge, finish, fill, gather.
    pub fn entries(&self) -> [&str; 4] {
        [
            &self.merge_entry,
            &self.finish_entry,
            "cp_fill_f32",
            "cp_gather_rows",
        ]
    }
}

/// The loaded entries of a [`CpKernels`] module.
pub(crate) struct LoadedCp {
    head_dim: usize,
    merge: CudaFunction,
    finish: CudaFunction,
    fill: CudaFunction,
    gather: CudaFunction,
}

/// Load (compiling on a cache miss) the module of `k` on `rt`'s device; its functions are
/// kept in the runtime's kernel map under `<module key>::<entry>`.
pub(crate) fn load(rt: &CudaRuntime, k: &CpKernels) -> Result<LoadedCp> {
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
            for n in names {
                let f = super::launch::load_function(&module, n)?;
                cache.insert(slot(n), f.clone());
                fs.push(f);
            }
            fs
        }
    };
    let [merge, finish, fill, gather]: [CudaFunction; 4] =
        fs.try_into().map_err(|_| AttnError::Cuda {
            call: format!("load {}", k.key),
            msg: "expected four entries".into(),
        })?;
    Ok(LoadedCp {
        head_dim: k.head_dim,
        merge,
        finish,
        fill,
        gather,
    })
}

fn launch_err(key: &str) -> impl FnOnce(cudarc::driver::DriverError) -> AttnError + '_ {
    super::launch::launch_err(key)
}

/// Blocks of 256 threads for a grid-stride loop over `n` elements.
fn stride_grid(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 1 << 20) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn i32_arg(arg: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| AttnError::InvalidArgument {
        arg: arg.into(),
        expected: "a value that fits in int32".into(),
        got: v.to_string(),
    })
}

/// The raw device address of a tensor's storage (any element type).
pub(crate) fn tensor_ptr(t: &DeviceTensor, st: &Arc<CudaStream>) -> u64 {
    match t.data() {
        DeviceData::Bf16(s) => s.device_ptr(st).0,
        DeviceData::F16(s) => s.device_ptr(st).0,
        DeviceData::F32(s) => s.device_ptr(st).0,
    }
}

fn shape_err(arg: &str, expected: String, got: usize) -> AttnError {
    AttnError::Shape {
        arg: arg.into(),
        expected,
        got: vec![got],
    }
}

impl LoadedCp {
    /// `p[..n] = value`.
    pub(crate) fn fill_f32(
        &self,
        st: &Arc<CudaStream>,
        p: &mut CudaSlice<f32>,
        n: usize,
        value: f32,
    ) -> Result<()> {
        if p.len() < n {
            return Err(shape_err("fill", format!("{n} elements"), p.len()));
        }
        if n == 0 {
            return Ok(());
        }
        let nn = n as i64;
        let mut b = st.launch_builder(&self.fill);
        b.arg(p).arg(&value).arg(&nn);
        // SAFETY: (float*, float, long long); p holds n elements; grid-stride.
        unsafe { b.launch(stride_grid(n)) }
            .map(|_| ())
            .map_err(launch_err("cp_fill_f32"))
    }

    /// Merge a partial (`part_out` `[n, heads, hd]` of `T`, `part_lse` f32 `[heads, n]`;
    /// `hd` the module's head dim)
    /// into rows `row0 .. row0 + n` of the running result (`acc_out` f32
    /// `[acc_rows, heads, hd]`, `acc_lse` f32 `[heads, acc_rows]`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn merge<T: DeviceElem>(
        &self,
        st: &Arc<CudaStream>,
        acc_out: &mut CudaSlice<f32>,
        acc_lse: &mut CudaSlice<f32>,
        part_out: &DeviceTensor,
        part_lse: &CudaSlice<f32>,
        heads: usize,
        (acc_rows, row0, n): (usize, usize, usize),
    ) -> Result<()> {
        let hd = self.head_dim;
        if row0 + n > acc_rows
            || acc_out.len() < acc_rows * heads * hd
            || acc_lse.len() < acc_rows * heads
            || part_out.numel() < n * heads * hd
            || part_lse.len() < n * heads
        {
            return Err(shape_err(
                "cp merge",
                format!(
                    "rows {row0}..{} of {acc_rows} at {heads} heads x {hd}",
                    row0 + n
                ),
                part_out.numel(),
            ));
        }
        if n == 0 || heads == 0 {
            return Ok(());
        }
        let part = part_out.typed::<T>("partial output")?;
        let h = i32_arg("heads", heads)?;
        let (ar, r0, nn) = (acc_rows as i64, row0 as i64, n as i64);
        let mut b = st.launch_builder(&self.merge);
        b.arg(acc_out)
            .arg(acc_lse)
            .arg(part)
            .arg(part_lse)
            .arg(&h)
            .arg(&ar)
            .arg(&r0)
            .arg(&nn);
        let cfg = LaunchConfig {
            grid_dim: ((n * heads).div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: (float*, float*, const T*, const float*, int, long long x3); sizes checked
        // above; one warp per (row, head) of the partial.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(launch_err("cp_merge"))
    }

    /// `out` `[rows, heads, hd]` of `T` from the merged result (`acc_out` f32
    /// `[rows, heads, hd]`, `acc_lse` f32 `[heads, rows]`): sinks (`sink_mode` 0 none, 1 a
    /// zero logit, 2 `sinks`, the address of f32 `[heads]`) and `gate` (`[rows, heads, hd]`
    /// of `T`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn finish<T: DeviceElem>(
        &self,
        st: &Arc<CudaStream>,
        acc_out: &CudaSlice<f32>,
        acc_lse: &CudaSlice<f32>,
        gate: Option<&DeviceTensor>,
        (sink_mode, sinks): (i32, u64),
        out: &mut DeviceTensor,
        (rows, heads): (usize, usize),
    ) -> Result<()> {
        let n = rows * heads * self.head_dim;
        if out.numel() != n
            || acc_out.len() < n
            || acc_lse.len() < rows * heads
            || gate.is_some_and(|g| g.numel() != n)
        {
            return Err(shape_err(
                "cp finish",
                format!(
                    "out, acc and gate of {rows} x {heads} x {} elements",
                    self.head_dim
                ),
                out.numel(),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        let gp = gate.map_or(0u64, |g| tensor_ptr(g, st));
        let o = out.typed_mut::<T>("out")?;
        let (h, r) = (i32_arg("heads", heads)?, rows as i64);
        let mut b = st.launch_builder(&self.finish);
        b.arg(acc_out)
            .arg(acc_lse)
            .arg(&gp)
            .arg(&sinks)
            .arg(&sink_mode)
            .arg(o)
            .arg(&h)
            .arg(&r);
        // SAFETY: (const float*, const float*, const T* (or null), const float* (or null),
        // int, T*, int, long long); every buffer holds rows x heads x HEAD_DIM (checked), lse
        // heads x rows, sinks `heads` floats when sink_mode is 2 (the caller's); grid-stride.
        unsafe { b.launch(stride_grid(n)) }
            .map(|_| ())
            .map_err(launch_err("cp_finish"))
    }

    /// `dst` row `r` = `src` row `idx.rows[r]`: `dst` holds `idx`'s row count of rows of
    /// a multiple of 16 bytes, `src` at least `idx.src_rows` rows of the same width.
    pub(crate) fn gather_rows(
        &self,
        st: &Arc<CudaStream>,
        src: &DeviceTensor,
        dst: &mut DeviceTensor,
        idx: &RowIndex,
    ) -> Result<()> {
        let rows = idx.rows;
        let (sb, db) = (
            src.numel() * src.elem().size(),
            dst.numel() * dst.elem().size(),
        );
        let row_bytes = db.checked_div(rows).unwrap_or(0);
        if dst.elem() != src.elem()
            || row_bytes * rows != db
            || !row_bytes.is_multiple_of(16)
            || sb < idx.src_rows * row_bytes
        {
            return Err(shape_err(
                "cp gather",
                format!(
                    "dst of {rows} rows of a multiple of 16 bytes, src of {} such rows",
                    idx.src_rows
                ),
                db,
            ));
        }
        if rows == 0 || row_bytes == 0 {
            return Ok(());
        }
        let sp = tensor_ptr(src, st);
        let dp = tensor_ptr_mut(dst, st);
        let (r, u4) = (rows as i64, i32_arg("row width", row_bytes / 16)?);
        let mut b = st.launch_builder(&self.gather);
        b.arg(&sp).arg(&dp).arg(&idx.idx).arg(&r).arg(&u4);
        // SAFETY: (const uint4*, uint4*, const int*, long long, int); dst holds rows x row_u4
        // units, idx `rows` entries, each below idx.src_rows (checked at upload), which src
        // holds (checked above); grid-stride.
        unsafe { b.launch(stride_grid(rows * row_bytes / 16)) }
            .map(|_| ())
            .map_err(launch_err("cp_gather_rows"))
    }
}

/// The raw device address of a tensor's storage, for writing.
pub(crate) fn tensor_ptr_mut(t: &mut DeviceTensor, st: &Arc<CudaStream>) -> u64 {
    fn go<T: DeviceElem>(t: &mut DeviceTensor, st: &Arc<CudaStream>) -> u64 {
        match t.typed_mut::<T>("t") {
            Ok(s) => s.device_ptr_mut(st).0,
            Err(_) => 0,
        }
    }
    match t.elem() {
        super::ElemType::Bf16 => go::<half::bf16>(t, st),
        super::ElemType::F16 => go::<half::f16>(t, st),
        super::ElemType::F32 => go::<f32>(t, st),
    }
}

/// A gather index table on the device: `rows` entries, each below `src_rows`.
pub(crate) struct RowIndex {
    idx: CudaSlice<i32>,
    rows: usize,
    src_rows: usize,
}

/// Upload a gather index table for a source of `src_rows` rows.
///
/// Errors: [`AttnError::InvalidArgument`] (`index`) for an entry at or past `src_rows` or
/// beyond int32 (nothing is queued).
pub(crate) fn upload_index(
    st: &Arc<CudaStream>,
    idx: &[usize],
    src_rows: usize,
) -> Result<RowIndex> {
    let v: Vec<i32> = idx
        .iter()
        .map(|&i| {
            i32::try_from(i)
                .ok()
                .filter(|_| i < src_rows)
                .ok_or_else(|| AttnError::InvalidArgument {
                    arg: "index".into(),
                    expected: format!("a row below {src_rows} that fits in int32"),
                    got: i.to_string(),
                })
        })
        .collect::<Result<_>>()?;
    Ok(RowIndex {
        idx: super::tensor::upload(st, &v, "cp gather index")?,
        rows: idx.len(),
        src_rows,
    })
}
