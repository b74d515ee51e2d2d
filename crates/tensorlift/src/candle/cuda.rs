//! candle's CUDA devices (feature `candle-cuda`): each tensor is read into a `CudaSlice`
//! that candle's device allocated, lent to the load, and handed back to candle as the
//! tensor's storage once its bytes have landed.

use candle_core::backend::BackendDevice;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
pub(super) use candle_core::cuda_backend::CudaDevice;
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DeviceLocation, Storage};
use tensorlift_format::Dtype;

use super::{changed_type, still_in_use, CandleError};
use crate::place::{Destination, DeviceBuffer, LentMemory};

/// One tensor's memory on candle's device.
pub(super) struct Lent {
    buffer: DeviceBuffer,
    device: CudaDevice,
}

/// candle's CUDA device, if `device` is one.
pub(super) fn of(device: &candle_core::Device) -> Option<CudaDevice> {
    match device {
        candle_core::Device::Cuda(dev) => Some(dev.clone()),
        _ => None,
    }
}

/// The ordinal of candle's CUDA device (`cuda:N`).
pub(super) fn ordinal(dev: &CudaDevice) -> usize {
    match dev.location() {
        DeviceLocation::Cuda { gpu_id } => gpu_id,
        _ => 0,
    }
}

pub(super) fn device(dev: CudaDevice) -> candle_core::Device {
    candle_core::Device::Cuda(dev)
}

/// A `CudaSlice` of `dtype`'s element type for `bytes` bytes, allocated by candle's device
/// on its stream and lent to the load; `None` for empty tensors and the types candle keeps
/// as raw bytes (or widens). Zeroed (`alloc_zeros`; candle's `alloc` is unsafe): a device
/// memset costs little beside the copy that follows. Lent here, on the thread that
/// allocated it: candle's stream is the per-thread default stream, whose handle names the
/// calling thread's.
pub(super) fn lend(dev: &CudaDevice, dtype: Dtype, bytes: u64) -> Result<Option<Lent>, String> {
    let Ok(bytes) = usize::try_from(bytes) else { return Ok(None) };
    if bytes == 0 {
        return Ok(None);
    }
    fn typed<T>(dev: &CudaDevice, bytes: usize) -> Result<Option<Lent>, String>
    where
        T: DeviceRepr + ValidAsZeroBits + bytemuck::Pod + Send + Sync,
    {
        let slice = dev
            .alloc_zeros::<T>(bytes / std::mem::size_of::<T>())
            .map_err(|e| format!("candle's device could not allocate {bytes} bytes: {e}"))?;
        let memory = LentMemory::from_cuda_slice(slice).map_err(|e| e.to_string())?;
        let device = crate::Device::Cuda(ordinal(dev));
        Ok(Some(Lent { buffer: DeviceBuffer::new(device, memory), device: dev.clone() }))
    }
    with_vec_type!(dtype, T => typed::<T>(dev, bytes), _ => Ok(None))
}

impl Lent {
    pub(super) fn destination(&self) -> Destination {
        Destination::device(&self.buffer, 0)
    }

    /// The candle tensor whose storage is this memory, once the load is done with it (its
    /// copies have completed: a tensor is yielded only then).
    pub(super) fn into_tensor(
        self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
    ) -> Result<candle_core::Tensor, CandleError> {
        let inner = self.buffer.into_inner().map_err(|_| still_in_use(name))?;
        fn typed<T: CudaDType + DeviceRepr + 'static>(
            name: &str,
            shape: &[usize],
            inner: Box<dyn std::any::Any + Send + Sync>,
            device: CudaDevice,
        ) -> Result<candle_core::Tensor, CandleError> {
            let slice = inner.downcast::<CudaSlice<T>>().map_err(|_| changed_type(name))?;
            // candle's kernels trust the shape over the storage: they must agree.
            let elements = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            if elements != Some(slice.len()) {
                let msg = format!("{} elements of memory for shape {shape:?}", slice.len());
                return Err(CandleError::Candle { tensor: name.to_owned(), source: candle_core::Error::Msg(msg) });
            }
            let storage = CudaStorage::wrap_cuda_slice(*slice, device);
            Ok(candle_core::Tensor::from_storage(Storage::Cuda(storage), shape.to_vec(), BackpropOp::none(), false))
        }
        with_vec_type!(dtype, T => typed::<T>(name, shape, inner, self.device), _ => Err(CandleError::Unsupported { tensor: name.to_owned(), dtype }))
    }
}
