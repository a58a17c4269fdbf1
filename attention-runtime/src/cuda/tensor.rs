//! [`DeviceTensor`]: a row-major tensor in GPU memory, in bf16, f16 or f32.
//!
//! Storage is one cudarc [`CudaSlice`] per tensor. The shape is explicit and the strides are
//! row strides in elements with the last dimension contiguous (stride 1). Tensors built here
//! are dense (`strides` are the row-major strides of `shape`); [`DeviceTensor::view`] gives a
//! free reinterpretation as another dense shape with the same element count, which is how
//! the `[s, b, h]` hidden states are read as `[s * b, h]` rows ([`DeviceTensor::rows`]) and
//! how packed `[t, h]` is read as is.
//!
//! Host round trips go through the CPU [`Tensor`] (f32), converting with `half`.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, DriverError, ValidAsZeroBits};
use half::{bf16, f16};

use crate::error::{AttnError, Result};
use crate::tensor::Tensor;

/// Element type of a [`DeviceTensor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElemType {
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
    /// IEEE single.
    F32,
}

impl ElemType {
    /// `bf16`, `f16` or `f32`.
    pub fn name(self) -> &'static str {
        match self {
            ElemType::Bf16 => "bf16",
            ElemType::F16 => "f16",
            ElemType::F32 => "f32",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            ElemType::Bf16 | ElemType::F16 => 2,
            ElemType::F32 => 4,
        }
    }
}

impl From<attention_codegen::DType> for ElemType {
    fn from(d: attention_codegen::DType) -> Self {
        match d {
            attention_codegen::DType::Bf16 => ElemType::Bf16,
            attention_codegen::DType::F16 => ElemType::F16,
        }
    }
}

/// The typed storage of a [`DeviceTensor`].
#[derive(Debug)]
pub enum DeviceData {
    /// bf16 elements.
    Bf16(CudaSlice<bf16>),
    /// f16 elements.
    F16(CudaSlice<f16>),
    /// f32 elements.
    F32(CudaSlice<f32>),
}

/// A Rust element type a [`DeviceTensor`] can hold.
pub trait DeviceElem: DeviceRepr + ValidAsZeroBits + Copy + Send + Sync + 'static {
    /// The matching [`ElemType`].
    const ELEM: ElemType;
    /// Convert from f32 (round to nearest even).
    fn from_f32(x: f32) -> Self;
    /// Convert to f32 (exact).
    fn to_f32(self) -> f32;
    /// Wrap a slice.
    fn wrap(s: CudaSlice<Self>) -> DeviceData;
    /// Borrow the slice when the storage has this type.
    fn get(d: &DeviceData) -> Option<&CudaSlice<Self>>;
    /// Borrow the slice mutably when the storage has this type.
    fn get_mut(d: &mut DeviceData) -> Option<&mut CudaSlice<Self>>;
}

macro_rules! elem {
    ($t:ty, $v:ident, $from:expr, $to:expr) => {
        impl DeviceElem for $t {
            const ELEM: ElemType = ElemType::$v;
            fn from_f32(x: f32) -> Self {
                $from(x)
            }
            fn to_f32(self) -> f32 {
                $to(self)
            }
            fn wrap(s: CudaSlice<Self>) -> DeviceData {
                DeviceData::$v(s)
            }
            fn get(d: &DeviceData) -> Option<&CudaSlice<Self>> {
                match d {
                    DeviceData::$v(s) => Some(s),
                    _ => None,
                }
            }
            fn get_mut(d: &mut DeviceData) -> Option<&mut CudaSlice<Self>> {
                match d {
                    DeviceData::$v(s) => Some(s),
                    _ => None,
                }
            }
        }
    };
}
elem!(bf16, Bf16, bf16::from_f32, bf16::to_f32);
elem!(f16, F16, f16::from_f32, f16::to_f32);
elem!(f32, F32, |x| x, |x| x);

/// Map an allocation failure to [`AttnError::DeviceAlloc`].
pub(crate) fn alloc_err(arg: &str, bytes: usize) -> impl FnOnce(DriverError) -> AttnError + '_ {
    move |e| AttnError::DeviceAlloc {
        arg: arg.to_string(),
        bytes,
        msg: e.to_string(),
    }
}

/// Map another driver failure to [`AttnError::Cuda`].
pub(crate) fn cuda_err(call: &str) -> impl FnOnce(DriverError) -> AttnError + '_ {
    move |e| AttnError::Cuda {
        call: call.to_string(),
        msg: e.to_string(),
    }
}

/// Allocate `len` elements of `T` on `stream` without initializing them. Errors (never
/// panics) when the device is out of memory.
pub(crate) fn alloc_uninit<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    len: usize,
    arg: &str,
) -> Result<CudaSlice<T>> {
    // SAFETY: every caller writes the buffer (kernel output, GEMM output or copy) before it
    // is read; tests poison outputs to prove that.
    unsafe { stream.alloc::<T>(len.max(1)) }
        .map_err(alloc_err(arg, len.max(1) * std::mem::size_of::<T>()))
}

/// Copy a host slice to a new device buffer (at least one element, so null never appears).
pub(crate) fn upload<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    data: &[T],
    arg: &str,
) -> Result<CudaSlice<T>> {
    let mut dst = alloc_uninit::<T>(stream, data.len(), arg)?;
    if !data.is_empty() {
        stream
            .memcpy_htod(data, &mut dst)
            .map_err(cuda_err(&format!("memcpy_htod {arg}")))?;
    }
    Ok(dst)
}

/// A dense row-major tensor in device memory.
///
/// Invariants: `strides` has one entry per dimension, `strides.last() == 1`, and the storage
/// holds at least `shape.iter().product()` elements.
#[derive(Debug)]
pub struct DeviceTensor {
    data: DeviceData,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

fn dense_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

impl DeviceTensor {
    /// Wrap `slice` as a dense tensor of `shape`. Errors when the slice is shorter than the
    /// shape's element count.
    pub fn from_slice<T: DeviceElem>(slice: CudaSlice<T>, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if slice.len() < n {
            return Err(AttnError::InvalidArgument {
                arg: "slice".into(),
                expected: format!("at least {n} elements for shape {shape:?}"),
                got: format!("{} elements", slice.len()),
            });
        }
        Ok(DeviceTensor {
            data: T::wrap(slice),
            shape: shape.to_vec(),
            strides: dense_strides(shape),
        })
    }

    /// A tensor of `shape` with unspecified contents (every kernel output is fully written).
    pub fn uninit(
        stream: &Arc<CudaStream>,
        elem: ElemType,
        shape: &[usize],
        arg: &str,
    ) -> Result<Self> {
        let n: usize = shape.iter().product();
        let data = match elem {
            ElemType::Bf16 => DeviceData::Bf16(alloc_uninit(stream, n, arg)?),
            ElemType::F16 => DeviceData::F16(alloc_uninit(stream, n, arg)?),
            ElemType::F32 => DeviceData::F32(alloc_uninit(stream, n, arg)?),
        };
        Ok(DeviceTensor {
            data,
            shape: shape.to_vec(),
            strides: dense_strides(shape),
        })
    }

    /// Copy a host tensor to the device as `elem` (f32 values rounded to nearest even).
    pub fn from_host(stream: &Arc<CudaStream>, t: &Tensor, elem: ElemType) -> Result<Self> {
        fn up<T: DeviceElem>(s: &Arc<CudaStream>, t: &Tensor) -> Result<DeviceData> {
            let v: Vec<T> = t.data().iter().map(|&x| T::from_f32(x)).collect();
            Ok(T::wrap(upload(s, &v, "host tensor")?))
        }
        let data = match elem {
            ElemType::Bf16 => up::<bf16>(stream, t)?,
            ElemType::F16 => up::<f16>(stream, t)?,
            ElemType::F32 => up::<f32>(stream, t)?,
        };
        Ok(DeviceTensor {
            data,
            shape: t.shape().to_vec(),
            strides: dense_strides(t.shape()),
        })
    }

    /// The CUDA context (device) that holds the tensor.
    pub fn context(&self) -> &Arc<cudarc::driver::CudaContext> {
        match &self.data {
            DeviceData::Bf16(s) => s.context(),
            DeviceData::F16(s) => s.context(),
            DeviceData::F32(s) => s.context(),
        }
    }

    /// The storage, taken out of the tensor.
    pub(crate) fn into_data(self) -> DeviceData {
        self.data
    }

    /// Copy back to a host f32 tensor (synchronizes the tensor's stream).
    pub fn to_host(&self) -> Result<Tensor> {
        fn down<T: DeviceElem>(s: &CudaSlice<T>, n: usize) -> Result<Vec<f32>> {
            let v = s
                .stream()
                .clone_dtoh(&s.slice(..n))
                .map_err(cuda_err("memcpy_dtoh"))?;
            Ok(v.into_iter().map(T::to_f32).collect())
        }
        let n = self.numel();
        let v = match &self.data {
            DeviceData::Bf16(s) => down(s, n)?,
            DeviceData::F16(s) => down(s, n)?,
            DeviceData::F32(s) => down(s, n)?,
        };
        Tensor::new(&self.shape, v)
    }

    /// Overwrite every element with NaN (test poisoning of outputs).
    pub fn fill_nan(&mut self) -> Result<()> {
        fn fill<T: DeviceElem>(s: &mut CudaSlice<T>) -> Result<()> {
            let v = vec![T::from_f32(f32::NAN); s.len()];
            s.stream()
                .clone()
                .memcpy_htod(&v, s)
                .map_err(cuda_err("memcpy_htod NaN fill"))
        }
        match &mut self.data {
            DeviceData::Bf16(s) => fill(s),
            DeviceData::F16(s) => fill(s),
            DeviceData::F32(s) => fill(s),
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Row strides in elements (last entry 1).
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The element type.
    pub fn elem(&self) -> ElemType {
        match &self.data {
            DeviceData::Bf16(_) => ElemType::Bf16,
            DeviceData::F16(_) => ElemType::F16,
            DeviceData::F32(_) => ElemType::F32,
        }
    }

    /// The storage.
    pub fn data(&self) -> &DeviceData {
        &self.data
    }

    /// The typed slice, or a dtype error naming `arg`.
    pub fn typed<T: DeviceElem>(&self, arg: &str) -> Result<&CudaSlice<T>> {
        T::get(&self.data).ok_or_else(|| AttnError::DType {
            arg: arg.into(),
            expected: T::ELEM.name().into(),
            got: self.elem().name().into(),
        })
    }

    /// The typed slice, mutably, or a dtype error naming `arg`.
    pub fn typed_mut<T: DeviceElem>(&mut self, arg: &str) -> Result<&mut CudaSlice<T>> {
        let got = self.elem();
        T::get_mut(&mut self.data).ok_or_else(|| AttnError::DType {
            arg: arg.into(),
            expected: T::ELEM.name().into(),
            got: got.name().into(),
        })
    }

    /// The same storage under another dense shape with the same element count (free).
    pub fn view(self, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return Err(AttnError::Shape {
                arg: "view".into(),
                expected: format!("a shape with {} elements", self.numel()),
                got: shape.to_vec(),
            });
        }
        Ok(DeviceTensor {
            data: self.data,
            strides: dense_strides(shape),
            shape: shape.to_vec(),
        })
    }

    /// Interpret hidden states as rows for a GEMM: `[s, b, h]` (padded, sequence-first) or
    /// `[t, h]` (packed) -> `(rows, h)` = `(s * b, h)` or `(t, h)`. Errors naming `arg` when
    /// the last dim is not `h` or the rank is not 2 or 3.
    pub fn rows(&self, arg: &str, h: usize) -> Result<(usize, usize)> {
        match self.shape.as_slice() {
            [s, b, hh] if *hh == h => Ok((s * b, h)),
            [t, hh] if *hh == h => Ok((*t, h)),
            _ => Err(AttnError::Shape {
                arg: arg.into(),
                expected: format!("[s, b, {h}] or packed [t, {h}]"),
                got: self.shape.clone(),
            }),
        }
    }
}

impl DeviceTensor {
    /// Copy `rows` rows of `src` starting at row `src_row` into `self` at row `dst_row`,
    /// queued on `stream` (device to device, asynchronous). Both tensors are row-major with
    /// the same element type and the same row width (the product of every dim after the
    /// first).
    ///
    /// Errors: `DType` (`src`), `Shape` (`src` of another row width, or a row range outside
    /// either tensor), `Cuda`.
    pub fn copy_rows_from(
        &mut self,
        stream: &Arc<CudaStream>,
        dst_row: usize,
        src: &DeviceTensor,
        src_row: usize,
        rows: usize,
    ) -> Result<()> {
        if src.elem() != self.elem() {
            return Err(AttnError::DType {
                arg: "src".into(),
                expected: self.elem().name().into(),
                got: src.elem().name().into(),
            });
        }
        let w = crate::tensor::check_row_copy(self.shape(), src.shape(), dst_row, src_row, rows)?;
        if rows == 0 || w == 0 {
            return Ok(());
        }
        fn go<T: DeviceElem>(
            st: &Arc<CudaStream>,
            src: &DeviceTensor,
            dst: &mut DeviceTensor,
            (s0, d0, n): (usize, usize, usize),
        ) -> Result<()> {
            let s = src.typed::<T>("src")?;
            let d = dst.typed_mut::<T>("dst")?;
            st.memcpy_dtod(&s.slice(s0..s0 + n), &mut d.slice_mut(d0..d0 + n))
                .map_err(cuda_err("memcpy_dtod"))
        }
        let r = (src_row * w, dst_row * w, rows * w);
        match self.elem() {
            ElemType::Bf16 => go::<bf16>(stream, src, self, r),
            ElemType::F16 => go::<f16>(stream, src, self, r),
            ElemType::F32 => go::<f32>(stream, src, self, r),
        }
    }
}

/// Copy `src` into `dst` (same element type, `dst.numel()` elements) on `stream`.
pub(crate) fn copy_dtod(
    stream: &Arc<CudaStream>,
    src: &DeviceTensor,
    dst: &mut DeviceTensor,
) -> Result<()> {
    fn go<T: DeviceElem>(
        st: &Arc<CudaStream>,
        src: &DeviceTensor,
        dst: &mut DeviceTensor,
    ) -> Result<()> {
        let n = dst.numel();
        let s = src.typed::<T>("hidden")?;
        let d = dst.typed_mut::<T>("out")?;
        st.memcpy_dtod(&s.slice(..n), &mut d.slice_mut(..n))
            .map_err(cuda_err("memcpy_dtod"))
    }
    match dst.elem() {
        ElemType::Bf16 => go::<bf16>(stream, src, dst),
        ElemType::F16 => go::<f16>(stream, src, dst),
        ElemType::F32 => go::<f32>(stream, src, dst),
    }
}
