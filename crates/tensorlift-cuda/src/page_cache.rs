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

/// Why `gpu`'s copies must not read the page cache by DMA, if they must not: where the
/// device reads pageable memory through the host's page tables (Grace Hopper), registering
/// a range does not pin it, and a page the kernel drops or a file cut while the device
/// copies would fault the device (a sticky error of the context, which every user of the
/// context shares), not leave it stale bytes. [`PageCacheRange::register`] refuses such a
/// device; a caller asks first to say why it will not try.
pub fn page_cache_dma_refused(gpu: &Gpu) -> Option<String> {
    match gpu.reads_pageable_memory_through_host_page_tables() {
        Ok(false) => None,
        Ok(true) => Some(
            "the device reads pageable memory through the host's page tables \
             (CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES): registering a range of \
             the page cache would not pin it"
                .into(),
        ),
        Err(e) => Some(format!("cannot tell whether registering pins host memory: {e}")),
    }
}

impl PageCacheRange {
    /// Pins `window`'s pages for `gpu` (`cuMemHostRegister` with
    /// `CU_MEMHOSTREGISTER_READ_ONLY`). The pages not yet in the page cache are read from the
    /// file first, on this thread. Refused where the device cannot read read-only host memory
    /// (`CUDA_ERROR_NOT_SUPPORTED`), where registering would not pin the pages
    /// ([`page_cache_dma_refused`]), or where the file's pages cannot be pinned.
    pub fn register(gpu: &Gpu, window: DmaWindow) -> Result<PageCacheRange, CudaError> {
        if let Some(why) = page_cache_dma_refused(gpu) {
            return Err(CudaError::Unavailable(why));
        }
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
