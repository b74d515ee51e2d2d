//! Opening a device, only after the probe says there is one.

use std::ffi::{c_int, c_uint};
use std::sync::Arc;

use cudarc::driver::sys;

use crate::driver::{self, Driver};
use crate::{cuda_status, CudaError, CudaStatus};

/// An open CUDA device (its primary context).
///
/// Every call tensorlift makes on a caller's thread leaves that thread's current CUDA
/// context as it found it (`Gpu::enter`): a program that works on another device
/// (`torch.cuda.set_device(1)`) keeps it after a load, or after a tensor is freed.
#[derive(Debug, Clone)]
pub struct Gpu {
    ctx: Arc<Primary>,
    name: String,
}

/// A device's primary context, retained while this value lives.
#[derive(Debug)]
struct Primary {
    api: &'static Driver,
    device: c_int,
    ordinal: usize,
    raw: sys::CUcontext,
}

// SAFETY: a context handle may be used on any thread (the driver API is thread-safe), and
// this one stays retained until the value drops.
unsafe impl Send for Primary {}
// SAFETY: as above; the handle is never mutated.
unsafe impl Sync for Primary {}

impl Drop for Primary {
    fn drop(&mut self) {
        // The thread's current context is left as it was, whatever the release does.
        let _restore = Current::save();
        // SAFETY: releases the retain made in `Gpu::open`, once; every stream, event, module
        // and allocation of this context holds a `Gpu`, so none outlives it.
        let _ = unsafe { (self.api.cuDevicePrimaryCtxRelease_v2)(self.device) };
    }
}

/// The calling thread's current CUDA context, made current again when dropped.
#[derive(Debug)]
pub(crate) struct Current(Option<(&'static Driver, sys::CUcontext)>);

impl Current {
    pub(crate) fn save() -> Current {
        let Ok(api) = driver::api() else { return Current(None) };
        let mut prev = std::ptr::null_mut();
        // SAFETY: writes one context handle (possibly null) into `prev`.
        let ok = unsafe { (api.cuCtxGetCurrent)(&mut prev) } == driver::SUCCESS;
        Current(ok.then_some((api, prev)))
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        if let Some((api, prev)) = self.0 {
            // SAFETY: prev was this thread's current context (or null) when saved; a context
            // a caller made current outlives its own use of it.
            let _ = unsafe { (api.cuCtxSetCurrent)(prev) };
        }
    }
}

impl Gpu {
    /// Opens device `ordinal`. Fails with the probe's reason when there is no usable driver.
    pub fn open(ordinal: usize) -> Result<Gpu, CudaError> {
        let info = match cuda_status() {
            CudaStatus::Unavailable(why) => return Err(CudaError::Unavailable(why.clone())),
            CudaStatus::Available(info) => info,
        };
        let dev = info.devices.get(ordinal).ok_or(CudaError::NoSuchDevice { ordinal, count: info.devices.len() })?;
        let api = driver::api()?;
        let ordinal_c = c_int::try_from(ordinal).map_err(|_| CudaError::NoSuchDevice { ordinal, count: 0 })?;
        // SAFETY: cuInit takes a flags word that must be 0 (the probe made the same call).
        api.check(unsafe { (api.cuInit)(0) }, "cuInit")?;
        let mut device: c_int = 0;
        // SAFETY: writes one device handle; the probe saw `ordinal` among the devices.
        api.check(unsafe { (api.cuDeviceGet)(&mut device, ordinal_c) }, "cuDeviceGet")?;
        let mut raw: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: writes one context handle, retained until `Primary` releases it.
        api.check(unsafe { (api.cuDevicePrimaryCtxRetain)(&mut raw, device) }, "cuDevicePrimaryCtxRetain")?;
        Ok(Gpu { ctx: Arc::new(Primary { api, device, ordinal, raw }), name: dev.name.clone() })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the device reads pageable host memory through the host's page tables
    /// (`CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES`, Grace Hopper):
    /// there `cuMemHostRegister` does not pin a range, only faults its pages in, so a range
    /// of a file's page cache that the kernel drops, or a file cut, while the device copies
    /// from it is a fault on the device, not stale bytes.
    pub fn reads_pageable_memory_through_host_page_tables(&self) -> Result<bool, CudaError> {
        let attribute =
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES as c_int;
        let mut v: c_int = 0;
        // SAFETY: writes one int, for the device handle this context was retained for.
        let r = unsafe { (self.api().cuDeviceGetAttribute)(&mut v, attribute, self.ctx.device) };
        self.api().check(r, "cuDeviceGetAttribute")?;
        Ok(v != 0)
    }

    /// Free and total device memory, in bytes (`cuMemGetInfo`).
    pub fn memory_info(&self) -> Result<(u64, u64), CudaError> {
        let _restore = self.enter()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: writes two size_t values; the device's context is current.
        self.api().check(unsafe { (self.api().cuMemGetInfo_v2)(&mut free, &mut total) }, "cuMemGetInfo")?;
        Ok((free as u64, total as u64))
    }

    /// The driver's functions.
    pub(crate) fn api(&self) -> &'static Driver {
        self.ctx.api
    }

    /// The primary context's handle.
    pub(crate) fn raw_context(&self) -> sys::CUcontext {
        self.ctx.raw
    }

    /// A new non-blocking stream of the device's context.
    pub(crate) fn new_stream(&self) -> Result<Arc<Stream>, CudaError> {
        let _restore = self.enter()?;
        let (api, mut raw): (_, sys::CUstream) = (self.api(), std::ptr::null_mut());
        // SAFETY: writes one stream handle, of the current context (this device's).
        let r = unsafe { (api.cuStreamCreate)(&mut raw, driver::STREAM_NON_BLOCKING) };
        api.check(r, "cuStreamCreate")?;
        Ok(Arc::new(Stream { gpu: self.clone(), raw }))
    }

    /// A new event of the device's context, with the driver's `flags`.
    pub(crate) fn new_event(&self, flags: c_uint) -> Result<Event, CudaError> {
        let _restore = self.enter()?;
        let mut raw: sys::CUevent = std::ptr::null_mut();
        // SAFETY: writes one event handle, of the current context (this device's).
        self.api().check(unsafe { (self.api().cuEventCreate)(&mut raw, flags) }, "cuEventCreate")?;
        Ok(Event { gpu: self.clone(), raw })
    }

    /// Makes the device's context current on this thread until the returned guard drops,
    /// then restores the thread's previous one.
    pub(crate) fn enter(&self) -> Result<Current, CudaError> {
        let restore = Current::save();
        // SAFETY: the context is retained by self.ctx for as long as self lives.
        self.api().check(unsafe { (self.api().cuCtxSetCurrent)(self.ctx.raw) }, "cuCtxSetCurrent")?;
        Ok(restore)
    }
}

/// A stream of a device's context, destroyed when dropped (its queued work still runs).
#[derive(Debug)]
pub(crate) struct Stream {
    gpu: Gpu,
    raw: sys::CUstream,
}

// SAFETY: a stream handle may be used on any thread (the driver API is thread-safe); this
// one lives until the value drops, and its context (held by `gpu`) longer.
unsafe impl Send for Stream {}
// SAFETY: as above; the handle is never mutated.
unsafe impl Sync for Stream {}

impl Stream {
    /// The driver's handle, for calls that queue work on the stream.
    pub(crate) fn raw(&self) -> sys::CUstream {
        self.raw
    }

    /// Waits until the work queued on the stream has completed.
    pub(crate) fn synchronize(&self) -> Result<(), CudaError> {
        let _restore = self.gpu.enter()?;
        // SAFETY: the stream is live (owned by self).
        self.gpu.api().check(unsafe { (self.gpu.api().cuStreamSynchronize)(self.raw) }, "cuStreamSynchronize")
    }

    /// A new event recorded behind the work queued on the stream so far.
    pub(crate) fn record_event(&self) -> Result<Event, CudaError> {
        let _restore = self.gpu.enter()?;
        let event = self.gpu.new_event(driver::EVENT_DISABLE_TIMING)?;
        event.record(self)?;
        Ok(event)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Ok(_restore) = self.gpu.enter() {
            // SAFETY: destroys the stream made in `Gpu::new_stream`, once; work queued on it
            // still completes (the driver destroys it then).
            let _ = unsafe { (self.gpu.api().cuStreamDestroy_v2)(self.raw) };
        }
    }
}

/// An event of a device's context, destroyed when dropped.
#[derive(Debug)]
pub(crate) struct Event {
    gpu: Gpu,
    raw: sys::CUevent,
}

// SAFETY: an event handle may be used on any thread (the driver API is thread-safe); this
// one lives until the value drops, and its context (held by `gpu`) longer.
unsafe impl Send for Event {}
// SAFETY: as above; the handle is never mutated.
unsafe impl Sync for Event {}

impl Event {
    /// Records the event behind the work queued on `stream` so far (of the same device),
    /// with the device's context current on this thread (the caller's `Gpu::enter`: the copy
    /// engine records one a chunk, inside the context it queued the chunk's copies in).
    pub(crate) fn record(&self, stream: &Stream) -> Result<(), CudaError> {
        // SAFETY: both handles are live and of this device's context.
        self.gpu.api().check(unsafe { (self.gpu.api().cuEventRecord)(self.raw, stream.raw) }, "cuEventRecord")
    }

    /// Whether the work the event was recorded behind has completed, with the device's
    /// context current on this thread (the caller's `Gpu::enter`: the driver may answer
    /// `CUDA_ERROR_INVALID_CONTEXT` without one; the copy engine and the completion thread
    /// ask, and wait, inside it).
    pub(crate) fn is_complete(&self) -> Result<bool, CudaError> {
        // SAFETY: the event is live (owned by self).
        match unsafe { (self.gpu.api().cuEventQuery)(self.raw) } {
            driver::ERROR_NOT_READY => Ok(false),
            r => self.gpu.api().check(r, "cuEventQuery").map(|()| true),
        }
    }

    /// Waits until the work the event was recorded behind has completed, with the device's
    /// context current on this thread (as for [`is_complete`](Self::is_complete)).
    pub(crate) fn synchronize(&self) -> Result<(), CudaError> {
        // SAFETY: the event is live (owned by self).
        self.gpu.api().check(unsafe { (self.gpu.api().cuEventSynchronize)(self.raw) }, "cuEventSynchronize")
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if let Ok(_restore) = self.gpu.enter() {
            // SAFETY: destroys the event made in `Gpu::new_event`, once; a wait on it is
            // never in progress (waits borrow it).
            let _ = unsafe { (self.gpu.api().cuEventDestroy_v2)(self.raw) };
        }
    }
}
