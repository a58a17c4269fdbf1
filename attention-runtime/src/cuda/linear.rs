//! The layer's linears on the GPU, through cuBLASLt (cudarc's [`Matmul`] wrapper): no
//! hand-written GEMM.
//!
//! Row-major `y [n, out] = x [n, in] · W^T (+ b)`, `W [out, in]`, is the column-major product
//! `y^T (out x n) = W^T-as-stored (transposed) · x^T`, i.e. `transa = true`, `m = out`,
//! `n = rows`, `k = in`, every leading dimension the row length. The bias is per `m` row of
//! the column-major result, exactly cuBLASLt's `BIAS` epilogue, so it is fused there for
//! `linear_qkv`, `linear_q` and `linear_kv`. `linear_proj` leaves its bias out and returns it
//! beside the output (the reference system adds it later, fused with the residual).
//!
//! bf16/f16 accumulate in f32 (`CUBLAS_COMPUTE_32F`); f32 uses cudarc's TF32 compute type.

use std::sync::Arc;

use cudarc::cublaslt::{Matmul, MatmulConfig};
use cudarc::driver::CudaStream;
use half::{bf16, f16};

use super::tensor::{DeviceElem, DeviceTensor, ElemType};
use super::CudaRuntime;
use crate::error::{AttnError, Result};
use crate::tensor::Tensor;

/// A linear's parameters in device memory: `weight [out, in]`, optional `bias [out]`, both in
/// the layer's element type.
#[derive(Debug)]
pub struct DeviceLinear {
    /// `[out, in]`.
    pub weight: DeviceTensor,
    /// `[out]`.
    pub bias: Option<DeviceTensor>,
}

impl DeviceLinear {
    /// Upload host `weight [out, in]` and `bias [out]` as `elem`. Errors naming `arg` on other
    /// shapes.
    pub fn from_host(
        stream: &Arc<CudaStream>,
        arg: &str,
        weight: &Tensor,
        bias: Option<&Tensor>,
        elem: ElemType,
    ) -> Result<Self> {
        weight.expect_shape(&format!("{arg}.weight"), &[None, None])?;
        if let Some(b) = bias {
            b.expect_shape(&format!("{arg}.bias"), &[Some(weight.shape()[0])])?;
        }
        Ok(DeviceLinear {
            weight: DeviceTensor::from_host(stream, weight, elem)?,
            bias: bias
                .map(|b| DeviceTensor::from_host(stream, b, elem))
                .transpose()?,
        })
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.weight.shape()[1]
    }
}

fn gemm_typed<T: DeviceElem>(
    rt: &CudaRuntime,
    arg: &str,
    x: &DeviceTensor,
    rows: usize,
    lin: &DeviceLinear,
    fuse_bias: bool,
    y: &mut DeviceTensor,
) -> Result<()>
where
    cudarc::cublaslt::CudaBlasLT: Matmul<T>,
{
    let (out, inp) = (lin.out_features(), lin.in_features());
    if rows == 0 {
        return Ok(());
    }
    let xs = x.typed::<T>(arg)?.slice(..rows * inp);
    let ws = lin.weight.typed::<T>(&format!("{arg}.weight"))?.slice(..);
    let bias = match (&lin.bias, fuse_bias) {
        (Some(b), true) => Some(b.typed::<T>(&format!("{arg}.bias"))?.slice(..)),
        _ => None,
    };
    let cfg = MatmulConfig {
        transa: true,
        transb: false,
        transc: false,
        m: out as u64,
        n: rows as u64,
        k: inp as u64,
        alpha: 1.0,
        lda: inp as i64,
        ldb: inp as i64,
        beta: 0.0,
        ldc: out as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    let ys = y.typed_mut::<T>(arg)?;
    // SAFETY: A = W is [out, in] row-major (k x m column-major, lda = in), B = x is
    // [rows, in] row-major (k x n, ldb = in), C = y is [rows, out] (m x n, ldc = out); all
    // three buffers hold at least those many elements (checked shapes, sliced above); the bias
    // holds `out` elements.
    unsafe {
        rt.blas()
            .matmul(cfg, &ws, &xs, ys, bias.as_ref(), None)
            .map_err(|e| AttnError::KernelLaunch {
                key: format!("cublasLtMatmul {arg} ({rows}x{inp} . {out}x{inp}^T)"),
                msg: e.to_string(),
            })?;
    }
    Ok(())
}

/// `x [rows..] · W^T (+ bias if fuse_bias)` -> `[rows, out]` in `x`'s element type.
fn gemm(
    rt: &CudaRuntime,
    arg: &str,
    x: &DeviceTensor,
    lin: &DeviceLinear,
    fuse_bias: bool,
) -> Result<DeviceTensor> {
    let (rows, _) = x.rows(arg, lin.in_features())?;
    let mut y = DeviceTensor::uninit(rt.stream(), x.elem(), &[rows, lin.out_features()], arg)?;
    gemm_into(rt, arg, x, lin, fuse_bias, &mut y)?;
    Ok(y)
}

/// [`gemm`] into an existing `[rows, out]` tensor of `x`'s element type.
fn gemm_into(
    rt: &CudaRuntime,
    arg: &str,
    x: &DeviceTensor,
    lin: &DeviceLinear,
    fuse_bias: bool,
    y: &mut DeviceTensor,
) -> Result<()> {
    let (rows, _) = x.rows(arg, lin.in_features())?;
    if y.shape() != [rows, lin.out_features()] || y.elem() != x.elem() {
        return Err(AttnError::Shape {
            arg: format!("{arg} output"),
            expected: format!("[{rows}, {}] {}", lin.out_features(), x.elem().name()),
            got: y.shape().to_vec(),
        });
    }
    if lin.weight.elem() != x.elem() {
        return Err(AttnError::DType {
            arg: format!("{arg}.weight"),
            expected: x.elem().name().into(),
            got: lin.weight.elem().name().into(),
        });
    }
    match x.elem() {
        ElemType::Bf16 => gemm_typed::<bf16>(rt, arg, x, rows, lin, fuse_bias, y),
        ElemType::F16 => gemm_typed::<f16>(rt, arg, x, rows, lin, fuse_bias, y),
        ElemType::F32 => gemm_typed::<f32>(rt, arg, x, rows, lin, fuse_bias, y),
    }
}

/// `linear_qkv`: hidden `[s, b, h]` or `[t, h]` -> `[rows, qkv_out]` with the bias fused in
/// cuBLASLt's epilogue. Columns are GQA-interleaved per group as the weight's rows are.
pub fn linear_qkv(rt: &CudaRuntime, x: &DeviceTensor, lin: &DeviceLinear) -> Result<DeviceTensor> {
    gemm(rt, "linear_qkv", x, lin, true)
}

/// `linear_q` (cross-attention): hidden -> `[rows, np * hn]`, bias fused.
pub fn linear_q(rt: &CudaRuntime, x: &DeviceTensor, lin: &DeviceLinear) -> Result<DeviceTensor> {
    gemm(rt, "linear_q", x, lin, true)
}

/// `linear_kv` (cross-attention): context -> `[rows, 2 * np * hn]` (per head `[k_h | v_h]`),
/// bias fused.
pub fn linear_kv(rt: &CudaRuntime, x: &DeviceTensor, lin: &DeviceLinear) -> Result<DeviceTensor> {
    gemm(rt, "linear_kv", x, lin, true)
}

/// `linear_proj`: `[rows, np * hn]` -> (`[rows, h]` WITHOUT the bias, the bias `[h]`).
pub fn linear_proj<'a>(
    rt: &CudaRuntime,
    x: &DeviceTensor,
    lin: &'a DeviceLinear,
) -> Result<(DeviceTensor, Option<&'a DeviceTensor>)> {
    Ok((gemm(rt, "linear_proj", x, lin, false)?, lin.bias.as_ref()))
}

/// [`linear_qkv`] into `out` `[rows, qkv_out]` (e.g. a poisoned buffer in tests).
pub fn linear_qkv_into(
    rt: &CudaRuntime,
    x: &DeviceTensor,
    lin: &DeviceLinear,
    out: &mut DeviceTensor,
) -> Result<()> {
    gemm_into(rt, "linear_qkv", x, lin, true, out)
}

/// [`linear_q`] into `out` `[rows, np * hn]` (e.g. a poisoned buffer in tests).
pub fn linear_q_into(
    rt: &CudaRuntime,
    x: &DeviceTensor,
    lin: &DeviceLinear,
    out: &mut DeviceTensor,
) -> Result<()> {
    gemm_into(rt, "linear_q", x, lin, true, out)
}

/// [`linear_kv`] into `out` `[rows, 2 * np * hn]` (e.g. a poisoned buffer in tests).
pub fn linear_kv_into(
    rt: &CudaRuntime,
    x: &DeviceTensor,
    lin: &DeviceLinear,
    out: &mut DeviceTensor,
) -> Result<()> {
    gemm_into(rt, "linear_kv", x, lin, true, out)
}

/// [`linear_proj`] into `out` `[rows, h]`; returns the bias `[h]`, unadded.
pub fn linear_proj_into<'a>(
    rt: &CudaRuntime,
    x: &DeviceTensor,
    lin: &'a DeviceLinear,
    out: &mut DeviceTensor,
) -> Result<Option<&'a DeviceTensor>> {
    gemm_into(rt, "linear_proj", x, lin, false, out)?;
    Ok(lin.bias.as_ref())
}
