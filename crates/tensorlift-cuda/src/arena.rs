//! Device memory: one allocation per load, freed when the last holder drops it.

use cudarc::driver::{sys, CudaSlice, DevicePtr, DeviceRepr};

use crate::error::{check, Call};
use crate::{CudaError, Gpu};

/// Device memory a caller owns (a framework's tensor, a caching allocator's block), lent
/// to tensorlift for tensors to be placed in.
pub struct LentMemory {
    ptr: u64,
    len: usize,
    owner: Box<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for LentMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LentMemory").field("ptr", &format_args!("{:#x}", self.ptr)).field("len", &self.len).finish()
    }
}

impl LentMemory {
    /// `len` bytes of device memory at `ptr`, kept allocated by `owner` (which tensorlift
    /// keeps until it is done with the memory, and then drops).
    ///
    /// # Safety
    ///
    /// The range stays allocated while `owner` is alive, and nothing but tensorlift reads
    /// or writes it while a load that places tensors there runs (its copies and kernels are
    /// asynchronous). Which device it is on is checked with the driver when it is used.
    pub unsafe fn new(ptr: u64, len: usize, owner: impl std::any::Any + Send + Sync) -> LentMemory {
        LentMemory { ptr, len, owner: Box::new(owner) }
    }

    /// Lends a cudarc allocation (a framework's storage: candle's CUDA tensors are
    /// `CudaSlice`s). Safe, unlike [`LentMemory::new`]: the slice owns its memory, and once
    /// it is moved here nothing but tensorlift can reach that memory until it is handed back
    /// ([`LentMemory::into_owner`], `tensorlift::place::DeviceBuffer::into_inner`).
    ///
    /// Waits for the slice's stream first: the allocation (stream-ordered where the device
    /// has memory pools) and whatever was queued before it (a zeroing) are done before
    /// tensorlift's copies, on its own streams, write there. Which device the slice is on is
    /// checked when a load first uses it.
    pub fn from_cuda_slice<T: DeviceRepr + Send + Sync + 'static>(
        slice: CudaSlice<T>,
    ) -> Result<LentMemory, CudaError> {
        let stream = std::sync::Arc::clone(slice.stream());
        stream.synchronize().call("cuStreamSynchronize")?;
        // The guard records a read on the slice's stream when it drops: nothing is pending.
        let ptr = slice.device_ptr(&stream).0;
        Ok(LentMemory { ptr, len: slice.num_bytes(), owner: Box::new(slice) })
    }

    /// The device address of byte 0.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The owner back, unused (downcast it to the type lent).
    pub fn into_owner(self) -> Box<dyn std::any::Any + Send + Sync> {
        self.owner
    }
}

/// One `cuMemAlloc` allocation on a device, or device memory a caller lent.
pub struct DeviceArena {
    gpu: Gpu,
    ptr: sys::CUdeviceptr,
    len: usize,
    backing: Backing,
}

/// Who frees an arena's memory.
enum Backing {
    /// tensorlift's `cuMemAlloc`, freed when the arena drops.
    Allocated,
    /// A caller's: what keeps it allocated, dropped instead of a free (`None` once handed
    /// back by [`DeviceArena::take_owner`]).
    Lent(Option<Box<dyn std::any::Any + Send + Sync>>),
}

impl std::fmt::Debug for DeviceArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceArena")
            .field("device", &self.gpu.ordinal())
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .field("lent", &matches!(self.backing, Backing::Lent(_)))
            .finish()
    }
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
        Ok(DeviceArena { gpu: gpu.clone(), ptr, len, backing: Backing::Allocated })
    }

    /// An arena over device memory a caller lent ([`LentMemory`]), for loads to place
    /// tensors in. The driver is asked what the address is: memory that is not one
    /// allocation of `gpu` covering the whole range is refused. The memory's owner is kept
    /// until the arena drops, and dropped then instead of a free.
    pub fn lent(gpu: &Gpu, memory: LentMemory) -> Result<DeviceArena, CudaError> {
        let LentMemory { ptr, len, owner } = memory;
        let _restore = gpu.enter()?;
        let foreign = |why: String| CudaError::Foreign(format!("{ptr:#x} + {len} bytes: {why}"));
        let attribute = |attr: sys::CUpointer_attribute, out: *mut std::ffi::c_void| {
            // SAFETY: `out` points at a value of the type the attribute writes (below).
            check(unsafe { sys::cuPointerGetAttribute(out, attr, ptr) }, "cuPointerGetAttribute")
        };
        let (mut start, mut size, mut ordinal): (sys::CUdeviceptr, usize, std::ffi::c_int) = (0, 0, -1);
        let mut kind: std::ffi::c_uint = 0;
        let known = attribute(sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (&raw mut kind).cast())
            .and_then(|()| {
                attribute(sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, (&raw mut start).cast())
            })
            .and_then(|()| attribute(sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE, (&raw mut size).cast()))
            .and_then(|()| {
                attribute(sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, (&raw mut ordinal).cast())
            });
        if known.is_err() || kind != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as std::ffi::c_uint {
            return Err(foreign("not device memory the driver knows".into()));
        }
        if usize::try_from(ordinal).ok() != Some(gpu.ordinal()) {
            return Err(foreign(format!("on device {ordinal}, not cuda:{}", gpu.ordinal())));
        }
        let end = ptr.checked_add(len as u64).ok_or_else(|| foreign("overflows".into()))?;
        if end > start + size as u64 {
            return Err(foreign(format!("its allocation ends at {:#x}", start + size as u64)));
        }
        Ok(DeviceArena { gpu: gpu.clone(), ptr, len, backing: Backing::Lent(Some(owner)) })
    }

    /// For lent memory, its owner back (once: `None` after, and for tensorlift's own
    /// allocations). The caller must know that no copy into the memory is still running:
    /// the engine holds an arena until its copies have completed, so an arena no one else
    /// holds has none.
    pub fn take_owner(&mut self) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        match &mut self.backing {
            Backing::Lent(owner) => owner.take(),
            Backing::Allocated => None,
        }
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
        if let Backing::Lent(_) = self.backing {
            // Lent memory goes back to its owner, with the owner's value.
            return;
        }
        if let Ok(_restore) = self.gpu.enter_for_release() {
            // SAFETY: frees the allocation made in `new`, once; copies into it were
            // synchronised before the arena could be dropped (the engine holds it until then).
            let _ = unsafe { sys::cuMemFree_v2(self.ptr) };
        }
    }
}
