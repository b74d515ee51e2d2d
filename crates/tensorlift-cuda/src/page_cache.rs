//! Warm shards copied to the device straight from the page cache: a read-only mapping of a
//! file's range ([`DmaWindow`]), pinned by registering it with CUDA read-only, is a source
//! of copies like a pinned chunk, with no CPU copy into staging.

use tensorlift_io::DmaWindow;

use crate::driver;
use crate::{CudaError, Gpu};

/// A file's range in the page cache, registered read-only with one device's context:
/// copies to that device read it by DMA. Unregistered (the pages unpinned) and unmapped when
/// dropped; the copy engine keeps it until the copies from it have completed.
#[derive(Debug)]
pub struct PageCacheRange {
    gpu: Gpu,
    /// Unmapped by Drop once unregistered; leaked where it may still be registered.
    window: std::mem::ManuallyDrop<DmaWindow>,
}

impl PageCacheRange {
    /// Pins `window`'s pages for `gpu` (`cuMemHostRegister` with
    /// `CU_MEMHOSTREGISTER_READ_ONLY`). The pages not yet in the page cache are read from the
    /// file first, on this thread. Refused where the device cannot read read-only host memory
    /// (`CUDA_ERROR_NOT_SUPPORTED`) or the file's pages cannot be pinned.
    pub fn register(gpu: &Gpu, window: DmaWindow) -> Result<PageCacheRange, CudaError> {
        let (base, len) = window.pages();
        let _restore = gpu.enter()?;
        let api = gpu.api();
        // SAFETY: [base, base + len) is the live mapping `window` owns, whole pages of it;
        // the registration only pins them for the device to read (READ_ONLY), and is undone in
        // Drop, before the window is unmapped.
        let r = unsafe { (api.cuMemHostRegister_v2)(base.cast_mut().cast(), len, driver::MEMHOSTREGISTER_READ_ONLY) };
        api.check(r, "cuMemHostRegister")?;
        Ok(PageCacheRange { gpu: gpu.clone(), window: std::mem::ManuallyDrop::new(window) })
    }

    /// The device it is registered with.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The range's length in bytes.
    pub fn len(&self) -> usize {
        self.window.len()
    }

    /// Whether the range is empty (never: an empty window is not mapped).
    pub fn is_empty(&self) -> bool {
        self.window.is_empty()
    }

    /// The range's first byte, for the device to read; never read by the CPU.
    pub(crate) fn ptr(&self) -> *const u8 {
        self.window.start()
    }
}

impl Drop for PageCacheRange {
    fn drop(&mut self) {
        let unregistered = self.gpu.enter().is_ok_and(|_restore| {
            // SAFETY: unregisters exactly the range registered in `register`, once; the copy
            // engine drops this value only after the copies from it have completed.
            let r = unsafe { (self.gpu.api().cuMemHostUnregister)(self.window.pages().0.cast_mut().cast()) };
            r == driver::SUCCESS
        });
        if unregistered {
            // SAFETY: dropped once, here, and never used after; the pages are no longer
            // registered, so unmapping them leaves no registration behind.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.window) };
        }
    }
}
