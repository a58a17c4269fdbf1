//! Zero-copy wrapping of a caller's cudarc buffers as [`DeviceTensor`]s.
//!
//! A serving engine or a training loop already holds its activations in `CudaSlice`s and
//! `CudaView`s; these wrappers let every `*_device` call read them (and
//! [`CudaLayer::decode_device_into`](super::CudaLayer::decode_device_into) write into them)
//! without a copy:
//! - an owned `CudaSlice` becomes a tensor with [`DeviceTensor::from_slice`];
//! - a borrowed `CudaView` becomes a [`DeviceTensorRef`] (read-only) and a `CudaViewMut` a
//!   [`DeviceTensorMut`], both tied to the view's lifetime and dereferencing to
//!   `DeviceTensor`.
//!
//! Stream order: wrapping makes `stream` (pass the runtime's, [`CudaRuntime::stream`]) wait
//! for the view's last writer; dropping the wrapper records the view's read (or write) event
//! on `stream` after everything queued while it lived, so the caller's later work on the
//! buffer, on any stream, waits for the layer's kernels (cudarc's event tracking, on by
//! default).

use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

use super::tensor::{DeviceData, DeviceElem, DeviceTensor};
use super::CudaRuntime;
use crate::error::{AttnError, Result};

/// A read-only [`DeviceTensor`] over a caller's `CudaView` (no copy); see the module docs.
pub struct DeviceTensorRef<'a, 'v, T: DeviceElem> {
    tensor: ManuallyDrop<DeviceTensor>,
    view: &'a CudaView<'v, T>,
    stream: Arc<CudaStream>,
}

/// A writable [`DeviceTensor`] over a caller's `CudaViewMut` (no copy); see the module docs.
pub struct DeviceTensorMut<'a, 'v, T: DeviceElem> {
    tensor: ManuallyDrop<DeviceTensor>,
    view: &'a mut CudaViewMut<'v, T>,
    stream: Arc<CudaStream>,
    _elem: PhantomData<T>,
}

/// A tensor over raw device memory that must never be freed by the tensor (leaked on drop).
///
/// # Safety
/// `ptr` must point to at least `len` elements of `T` on `stream`'s context that stay valid
/// while the tensor lives.
unsafe fn borrowed<T: DeviceElem>(
    stream: &Arc<CudaStream>,
    ptr: u64,
    len: usize,
    shape: &[usize],
) -> Result<ManuallyDrop<DeviceTensor>> {
    let n: usize = shape.iter().product();
    if len < n {
        // Checked before the upgrade: a slice dropped on this error path would free the
        // caller's memory.
        return Err(AttnError::InvalidArgument {
            arg: "slice".into(),
            expected: format!("at least {n} elements for shape {shape:?}"),
            got: format!("{len} elements"),
        });
    }
    let slice = stream.upgrade_device_ptr::<T>(ptr, len);
    match DeviceTensor::from_slice(slice, shape) {
        Ok(t) => Ok(ManuallyDrop::new(t)),
        Err(_) => unreachable!("the length was checked above"),
    }
}

/// Give a borrowed tensor's storage back without freeing it.
fn release(t: &mut ManuallyDrop<DeviceTensor>) {
    // SAFETY: called once, from Drop; the tensor is not used afterwards.
    let t = unsafe { ManuallyDrop::take(t) };
    match t.into_data() {
        DeviceData::Bf16(s) => {
            s.leak();
        }
        DeviceData::F16(s) => {
            s.leak();
        }
        DeviceData::F32(s) => {
            s.leak();
        }
    }
}

impl<'a, 'v, T: DeviceElem> DeviceTensorRef<'a, 'v, T> {
    /// Wrap `view` as a dense tensor of `shape` read on `rt`'s stream.
    ///
    /// Errors: `InvalidArgument` (`slice`) when the view holds fewer elements than `shape`.
    pub fn new(rt: &CudaRuntime, view: &'a CudaView<'v, T>, shape: &[usize]) -> Result<Self> {
        let stream = rt.stream().clone();
        // Waits for the view's last writer on `stream`; the read event recorded here is
        // recorded again on drop, after the work queued meanwhile.
        let ptr = {
            let (ptr, sync) = view.device_ptr(&stream);
            drop(sync);
            ptr
        };
        // SAFETY: the view covers `view.len()` elements that outlive 'a, which bounds self.
        let tensor = unsafe { borrowed::<T>(&stream, ptr, view.len(), shape)? };
        Ok(DeviceTensorRef {
            tensor,
            view,
            stream,
        })
    }
}

impl<T: DeviceElem> Deref for DeviceTensorRef<'_, '_, T> {
    type Target = DeviceTensor;
    fn deref(&self) -> &DeviceTensor {
        &self.tensor
    }
}

impl<T: DeviceElem> Drop for DeviceTensorRef<'_, '_, T> {
    fn drop(&mut self) {
        release(&mut self.tensor);
        // Record the view's read event after everything queued while the wrapper lived.
        let (_, sync) = self.view.device_ptr(&self.stream);
        drop(sync);
    }
}

impl<'a, 'v, T: DeviceElem> DeviceTensorMut<'a, 'v, T> {
    /// Wrap `view` as a dense writable tensor of `shape` used on `rt`'s stream.
    ///
    /// Errors: `InvalidArgument` (`slice`) when the view holds fewer elements than `shape`.
    pub fn new(
        rt: &CudaRuntime,
        view: &'a mut CudaViewMut<'v, T>,
        shape: &[usize],
    ) -> Result<Self> {
        let stream = rt.stream().clone();
        let len = view.len();
        let ptr = {
            let (ptr, sync) = view.device_ptr_mut(&stream);
            drop(sync);
            ptr
        };
        // SAFETY: the view covers `len` elements that outlive 'a, which bounds self; the
        // exclusive borrow of the view keeps every other user out while it lives.
        let tensor = unsafe { borrowed::<T>(&stream, ptr, len, shape)? };
        Ok(DeviceTensorMut {
            tensor,
            view,
            stream,
            _elem: PhantomData,
        })
    }
}

impl<T: DeviceElem> Deref for DeviceTensorMut<'_, '_, T> {
    type Target = DeviceTensor;
    fn deref(&self) -> &DeviceTensor {
        &self.tensor
    }
}

impl<T: DeviceElem> DerefMut for DeviceTensorMut<'_, '_, T> {
    fn deref_mut(&mut self) -> &mut DeviceTensor {
        &mut self.tensor
    }
}

impl<T: DeviceElem> Drop for DeviceTensorMut<'_, '_, T> {
    fn drop(&mut self) {
        release(&mut self.tensor);
        // Record the view's write event after everything queued while the wrapper lived.
        let (_, sync) = self.view.device_ptr_mut(&self.stream);
        drop(sync);
    }
}
