//! Opening a device, only after the probe says there is one.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};

use crate::error::Call;
use crate::{cuda_status, CudaError, CudaStatus};

/// An open CUDA device (its primary context).
#[derive(Debug, Clone)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    name: String,
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
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal)).map_err(|_| {
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
        // SAFETY: no CudaSlice is ever made on this context by tensorlift; cudarc requires
        // only that slices made without tracking are synchronised by their user.
        unsafe { ctx.disable_event_tracking() };
        Ok(Gpu { ctx, name: dev.name.clone() })
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
        self.bind()?;
        let (free, total) = cudarc::driver::result::mem_get_info().call("cuMemGetInfo")?;
        Ok((free as u64, total as u64))
    }

    /// A new non-default stream.
    pub fn new_stream(&self) -> Result<Arc<CudaStream>, CudaError> {
        self.ctx.new_stream().call("cuStreamCreate")
    }

    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub(crate) fn bind(&self) -> Result<(), CudaError> {
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")
    }

    /// Makes the context current for a release (a free, an unregistration): directly, so
    /// that an error some earlier cudarc call recorded on the context cannot make the
    /// release be skipped and leak.
    pub(crate) fn bind_for_release(&self) -> Result<(), CudaError> {
        // SAFETY: the context is retained by self.ctx for as long as self lives.
        crate::error::check(unsafe { cudarc::driver::sys::cuCtxSetCurrent(self.ctx.cu_ctx()) }, "cuCtxSetCurrent")
    }
}
