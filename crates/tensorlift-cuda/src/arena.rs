//! Device memory: one allocation per load, freed when the last holder drops it.

use cudarc::driver::{sys, CudaSlice, DevicePtrMut, DeviceRepr};

use crate::device::Current;
use crate::driver::{self, pointer};
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
    /// `CudaSlice`s). Safe, unlike [`LentMemory::new`]: the slice owns its memory, it is moved
    /// here, and it comes back only once tensorlift is done with it
    /// ([`LentMemory::into_owner`], [`DeviceArena::into_owner`],
    /// `tensorlift::place::DeviceBuffer::into_inner`). Its elements are plain data
    /// (`bytemuck::Pod`): whatever bytes a load writes there are valid values.
    ///
    /// Everything cudarc has queued that uses the slice is waited for first: the allocation
    /// (stream-ordered where the device has memory pools), what was queued on its stream
    /// before (a zeroing), and, where cudarc tracks the slice's uses across streams, reads
    /// and writes on other streams. Then nothing but tensorlift's copies, on its own streams,
    /// touches the memory. Which device and context the memory belongs to is checked when a
    /// load first uses it ([`DeviceArena::lent`]). The calling thread's current context is
    /// left as it was.
    ///
    /// A slice whose stream is the per-thread default stream (`CU_STREAM_PER_THREAD`,
    /// candle's) must be lent from the thread that queued its allocation and zeroing: that
    /// handle names the calling thread's own stream, so work another thread queued on its
    /// own is not waited for (a late zeroing would then overwrite the loaded bytes).
    /// candle's integration lends each slice on the thread that allocated it.
    pub fn from_cuda_slice<T: DeviceRepr + bytemuck::Pod + Send + Sync>(
        mut slice: CudaSlice<T>,
    ) -> Result<LentMemory, CudaError> {
        // The slice's context is made current here (by cudarc, and for the wait below): the
        // caller's comes back after.
        let _restore = Current::save();
        let stream = std::sync::Arc::clone(slice.stream());
        // Asking for the pointer to write makes the slice's stream wait for its tracked uses
        // on other streams; the guard records this write there when it drops, at once.
        let ptr = slice.device_ptr_mut(&stream).0;
        // The wait is tensorlift's own call (an integer result), on cudarc's stream, with the
        // slice's context current: the null handle names the legacy stream of whatever
        // context is current (the guard restores the caller's), and CU_STREAM_PER_THREAD
        // (candle's default stream) the calling thread's own stream.
        let api = driver::api()?;
        // SAFETY: the context is live: the slice's stream holds it.
        api.check(unsafe { (api.cuCtxSetCurrent)(stream.context().cu_ctx()) }, "cuCtxSetCurrent")?;
        // SAFETY: the stream is live: the slice holds it.
        api.check(unsafe { (api.cuStreamSynchronize)(stream.cu_stream()) }, "cuStreamSynchronize")?;
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
    /// A caller's: what keeps it allocated, dropped instead of a free (`None` while
    /// [`DeviceArena::into_owner`] hands it back).
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
        let r = unsafe { (gpu.api().cuMemAlloc_v2)(&mut ptr, len.max(1)) };
        if r == driver::ERROR_OUT_OF_MEMORY {
            return Err(CudaError::OutOfMemory { what: "device memory", bytes: len as u64 });
        }
        gpu.api().check(r, "cuMemAlloc")?;
        Ok(DeviceArena { gpu: gpu.clone(), ptr, len, backing: Backing::Allocated })
    }

    /// An arena over device memory a caller lent ([`LentMemory`]), for loads to place
    /// tensors in. The driver is asked what the address is: memory that is not one
    /// allocation of `gpu` covering the whole range, or that belongs to another context
    /// than `gpu`'s (its primary context; memory of no one context, such as memory-pool
    /// allocations, is the device's), is refused, and its owner dropped. The owner is kept
    /// until the arena drops, and dropped then instead of a free.
    pub fn lent(gpu: &Gpu, memory: LentMemory) -> Result<DeviceArena, CudaError> {
        // Dropped last: a refused owner's drop (a CudaSlice binds its context) comes before
        // the caller's context is restored.
        let _restore = Current::save();
        let LentMemory { ptr, len, owner } = memory;
        let _enter = gpu.enter()?;
        let foreign = |why: String| CudaError::Foreign(format!("{ptr:#x} + {len} bytes: {why}"));
        let api = gpu.api();
        let attribute = |attr: std::ffi::c_int, out: *mut std::ffi::c_void| {
            // SAFETY: `out` points at a value of the type the attribute writes (below).
            api.check(unsafe { (api.cuPointerGetAttribute)(out, attr, ptr) }, "cuPointerGetAttribute")
        };
        let (mut start, mut size, mut ordinal): (sys::CUdeviceptr, usize, std::ffi::c_int) = (0, 0, -1);
        let mut kind: std::ffi::c_uint = 0;
        let known = attribute(pointer::MEMORY_TYPE, (&raw mut kind).cast())
            .and_then(|()| attribute(pointer::RANGE_START_ADDR, (&raw mut start).cast()))
            .and_then(|()| attribute(pointer::RANGE_SIZE, (&raw mut size).cast()))
            .and_then(|()| attribute(pointer::DEVICE_ORDINAL, (&raw mut ordinal).cast()));
        if known.is_err() || kind != driver::MEMORYTYPE_DEVICE {
            return Err(foreign("not device memory the driver knows".into()));
        }
        if usize::try_from(ordinal).ok() != Some(gpu.ordinal()) {
            return Err(foreign(format!("on device {ordinal}, not cuda:{}", gpu.ordinal())));
        }
        let mut context: sys::CUcontext = std::ptr::null_mut();
        attribute(pointer::CONTEXT, (&raw mut context).cast())
            .map_err(|e| foreign(format!("its context is unknown ({e})")))?;
        if !context.is_null() && context != gpu.raw_context() {
            return Err(foreign(format!(
                "allocated in another context than cuda:{}'s primary context, where the load's copies run",
                gpu.ordinal()
            )));
        }
        let end = ptr.checked_add(len as u64).ok_or_else(|| foreign("overflows".into()))?;
        if end > start + size as u64 {
            return Err(foreign(format!("its allocation ends at {:#x}", start + size as u64)));
        }
        Ok(DeviceArena { gpu: gpu.clone(), ptr, len, backing: Backing::Lent(Some(owner)) })
    }

    /// For lent memory, its owner back, the arena consumed; tensorlift's own allocations
    /// come back as `Err`. An arena that is the caller's alone has no copy into it running:
    /// the copy engine holds an arena until the copies into it have completed.
    ///
    /// The device's work is waited for first (`cuCtxSynchronize`): the owner may
    /// free the memory stream-ordered, not after a consumer's stream. Where that wait fails,
    /// the arena comes back too (and, dropped, leaks the memory rather than let it be freed
    /// under work that may still use it).
    pub fn into_owner(mut self) -> Result<Box<dyn std::any::Any + Send + Sync>, DeviceArena> {
        if matches!(self.backing, Backing::Allocated) || !self.lent_settled() {
            return Err(self);
        }
        let owner = match &mut self.backing {
            Backing::Lent(owner) => owner.take(),
            Backing::Allocated => None,
        };
        owner.ok_or(self)
    }

    /// Waits for the work of the device's context, before lent memory goes back to its
    /// owner: a cudarc `CudaSlice` frees stream-ordered (`cuMemFreeAsync` on cudarc's
    /// stream), which is not ordered after work a consumer queued on a stream of its own on a
    /// tensor exported by DLPack; `cuMemFree_v2`, which frees tensorlift's own memory, waits
    /// so itself. Whether the wait succeeded.
    fn lent_settled(&self) -> bool {
        let Ok(_entered) = self.gpu.enter() else { return false };
        // SAFETY: waits for the work of the context entered; no memory is touched.
        unsafe { (self.gpu.api().cuCtxSynchronize)() == crate::driver::SUCCESS }
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
        let api = self.gpu.api();
        // SAFETY: [offset, offset + len) lies inside the allocation, which lives as long as
        // self, and dst is a writable host buffer of exactly len bytes.
        let r = unsafe { (api.cuMemcpyDtoH_v2)(dst.as_mut_ptr().cast(), self.ptr + offset as u64, dst.len()) };
        api.check(r, "cuMemcpyDtoH")
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
        let api = self.gpu.api();
        // SAFETY: [offset, offset + len) lies inside the allocation, and src is a readable host
        // buffer of exactly len bytes; the call returns once the copy is done.
        let r = unsafe { (api.cuMemcpyHtoD_v2)(self.ptr + offset as u64, src.as_ptr().cast(), src.len()) };
        api.check(r, "cuMemcpyHtoD")
    }
}

impl Drop for DeviceArena {
    fn drop(&mut self) {
        if let Backing::Lent(owner) = &mut self.backing {
            // Lent memory goes back to its owner, with the owner's value; an owner's drop (a
            // CudaSlice's free) may bind its context to this thread, whose own comes back.
            let _restore = Current::save();
            let Some(owner) = owner.take() else { return };
            if self.lent_settled() {
                drop(owner);
            } else {
                // Work that may still use the memory could not be waited for: the owner is
                // leaked rather than let free it (as the copy engine leaks what it cannot
                // wait for).
                tracing::warn!(
                    ptr = self.ptr,
                    len = self.len,
                    "lent device memory leaked: the device's work could not be waited for"
                );
                std::mem::forget(owner);
            }
            return;
        }
        let freed = self.gpu.enter().map(|_restore| {
            // SAFETY: frees the allocation made in `new`, once; copies into it were
            // synchronised before the arena could be dropped (the engine holds it until then).
            unsafe { (self.gpu.api().cuMemFree_v2)(self.ptr) }
        });
        // (At the process's exit the driver may be shut down already: nothing to say then.)
        let deinitialized = sys::CUresult::CUDA_ERROR_DEINITIALIZED as driver::CuResult;
        match freed {
            Ok(r) if r == driver::SUCCESS || r == deinitialized => {}
            _ => tracing::warn!(
                ptr = self.ptr,
                len = self.len,
                "device memory not freed: the driver refused ({freed:?})"
            ),
        }
    }
}
