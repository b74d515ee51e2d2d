//! Opening a device, only after the probe says there is one.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};

use crate::error::Call;
use crate::{cuda_status, CudaError, CudaStatus};

/// An open CUDA device (its primary context).
///
/// Every call tensorlift makes on a caller's thread leaves that thread's current CUDA
/// context as it found it (`Gpu::enter`): a program that works on another device
/// (`torch.cuda.set_device(1)`) keeps it after a load, or after a tensor is freed.
#[derive(Debug, Clone)]
pub struct Gpu {
    ctx: std::mem::ManuallyDrop<Arc<CudaContext>>,
    name: String,
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // Releasing the primary context binds it to this thread: restore what was current.
        let _restore = Current::save();
        // SAFETY: dropped once, here, and never used again.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.ctx) };
    }
}

/// The calling thread's current CUDA context, made current again when dropped.
#[derive(Debug)]
pub(crate) struct Current(Option<cudarc::driver::sys::CUcontext>);

impl Current {
    pub(crate) fn save() -> Current {
        let mut prev = std::ptr::null_mut();
        // SAFETY: writes one context handle (possibly null) into `prev`.
        let ok =
            unsafe { cudarc::driver::sys::cuCtxGetCurrent(&mut prev) } == cudarc::driver::sys::CUresult::CUDA_SUCCESS;
        Current(ok.then_some(prev))
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        if let Some(prev) = self.0 {
            // SAFETY: prev was this thread's current context (or null) when saved; a context
            // a caller made current outlives its own use of it.
            let _ = unsafe { cudarc::driver::sys::cuCtxSetCurrent(prev) };
        }
    }
}

impl Gpu {
    /// Opens device `ordinal`. Fails with the probe's reason when there is no usable driver,
    /// so cudarc, which panics without libcuda, is never reached in that case.
    pub fn open(ordinal: usize) -> Result<Gpu, CudaError> {
        let info = match cuda_status() {
            CudaStatus::Unavailable(why) => return Err(CudaError::Unavailable(why.clone())),
            CudaStatus::Available(info) => info,
        };
        let dev = info.devices.get(ordinal).ok_or(CudaError::NoSuchDevice { ordinal, count: info.devices.len() })?;
        // cudarc loads the driver by its standard names and panics if that fails; the probe
        // may have used another path (TENSORLIFT_LIBCUDA), so contain that case too.
        // cudarc binds the context to this thread: the caller's comes back after. (Inside
        // the unwind guard: the first driver call through cudarc is what can panic.)
        let ctx = std::panic::catch_unwind(|| {
            let _restore = Current::save();
            CudaContext::new(ordinal)
        })
        .map_err(|_| {
            CudaError::Unavailable(format!(
                "cudarc could not load the driver by its standard names ({})",
                crate::LIBCUDA_NAMES.join(", ")
            ))
        })?;
        let ctx = ctx.call("cuDevicePrimaryCtxRetain")?;
        // cudarc's event tracking orders its own CudaSlice allocations across streams, and
        // with it every first stream of a context waits for the whole device
        // (cuCtxSynchronize): tensorlift orders its copies with its own events and uses no
        // CudaSlice, so a load must not wait for the caller's unrelated GPU work.
        // SAFETY: no CudaSlice is ever made on this context by tensorlift, and no stream or
        // handle of it reaches a caller (`new_stream` and `context` are crate-private);
        // cudarc requires only that slices made without tracking are synchronised by their
        // user.
        unsafe { ctx.disable_event_tracking() };
        Ok(Gpu { ctx: std::mem::ManuallyDrop::new(ctx), name: dev.name.clone() })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Free and total device memory, in bytes (`cuMemGetInfo`).
    pub fn memory_info(&self) -> Result<(u64, u64), CudaError> {
        let _restore = self.enter()?;
        let (free, total) = cudarc::driver::result::mem_get_info().call("cuMemGetInfo")?;
        Ok((free as u64, total as u64))
    }

    /// A new non-default stream. Crate-private: the context has cudarc's event tracking
    /// off, so a `CudaSlice` made through a stream of it (or its `context()`) would not be
    /// ordered across streams; no such stream may reach a caller.
    pub(crate) fn new_stream(&self) -> Result<Arc<CudaStream>, CudaError> {
        let _restore = Current::save();
        self.ctx.new_stream().call("cuStreamCreate")
    }

    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Makes the device's context current on this thread until the returned guard drops,
    /// then restores the thread's previous one.
    pub(crate) fn enter(&self) -> Result<Current, CudaError> {
        let restore = Current::save();
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        Ok(restore)
    }

    /// Makes the context current for a release (a free, an unregistration): directly, so
    /// that an error some earlier cudarc call recorded on the context cannot make the
    /// release be skipped and leak.
    /// (The guard restores the thread's previous context.)
    pub(crate) fn enter_for_release(&self) -> Result<Current, CudaError> {
        let restore = Current::save();
        // SAFETY: the context is retained by self.ctx for as long as self lives.
        crate::error::check(unsafe { cudarc::driver::sys::cuCtxSetCurrent(self.ctx.cu_ctx()) }, "cuCtxSetCurrent")?;
        Ok(restore)
    }
}
