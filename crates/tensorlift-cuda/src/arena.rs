//! Device memory: one allocation per load, freed when the last holder drops it.

use cudarc::driver::sys;

use crate::error::check;
use crate::{CudaError, Gpu};

/// One `cuMemAlloc` allocation on a device.
#[derive(Debug)]
pub struct DeviceArena {
    gpu: Gpu,
    ptr: sys::CUdeviceptr,
    len: usize,
}

impl DeviceArena {
    /// `len` bytes of device memory (uninitialised).
    pub fn new(gpu: &Gpu, len: usize) -> Result<DeviceArena, CudaError> {
        let _restore = gpu.enter()?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: writes one device pointer into `ptr`; a zero-length request asks for one byte.
        let r = unsafe { sys::cuMemAlloc_v2(&mut ptr, len.max(1)) };
        if r == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            return Err(CudaError::OutOfMemory { what: "device memory", bytes: len as u64 });
        }
        check(r, "cuMemAlloc")?;
        Ok(DeviceArena { gpu: gpu.clone(), ptr, len })
    }

    /// The device address of byte 0.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the arena holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device the memory is on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Copies `dst.len()` bytes at `offset` back to the host, synchronously (for checks and
    /// digests, never on the load path).
    pub fn copy_to_host(&self, offset: usize, dst: &mut [u8]) -> Result<(), CudaError> {
        if offset.checked_add(dst.len()).is_none_or(|end| end > self.len) {
            return Err(CudaError::OutOfBounds { what: "device arena read-back", len: dst.len() });
        }
        if dst.is_empty() {
            return Ok(());
        }
        let _restore = self.gpu.enter()?;
        // SAFETY: [offset, offset + len) lies inside the allocation, which lives as long as
        // self, and dst is a writable host buffer of exactly len bytes.
        let r = unsafe { sys::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), self.ptr + offset as u64, dst.len()) };
        check(r, "cuMemcpyDtoH")
    }
}

impl DeviceArena {
    /// Copies `src` to `offset` synchronously from pageable memory: the slow way some
    /// loaders copy each tensor, kept for baselines and checks, never used on the load path.
    pub fn copy_from_host(&self, offset: usize, src: &[u8]) -> Result<(), CudaError> {
        if offset.checked_add(src.len()).is_none_or(|end| end > self.len) {
            return Err(CudaError::OutOfBounds { what: "device arena write", len: src.len() });
        }
        if src.is_empty() {
            return Ok(());
        }
        let _restore = self.gpu.enter()?;
        // SAFETY: [offset, offset + len) lies inside the allocation, and src is a readable host
        // buffer of exactly len bytes; the call returns once the copy is done.
        let r = unsafe { sys::cuMemcpyHtoD_v2(self.ptr + offset as u64, src.as_ptr().cast(), src.len()) };
        check(r, "cuMemcpyHtoD")
    }
}

impl Drop for DeviceArena {
    fn drop(&mut self) {
        if let Ok(_restore) = self.gpu.enter_for_release() {
            // SAFETY: frees the allocation made in `new`, once; copies into it were
            // synchronised before the arena could be dropped (the engine holds it until then).
            let _ = unsafe { sys::cuMemFree_v2(self.ptr) };
        }
    }
}
