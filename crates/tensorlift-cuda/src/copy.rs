//! Overlapped host-to-device copies from pinned chunks on several streams.
//!
//! Each submitted chunk's copies go on the next stream, followed by an event from a small
//! pool. A completion thread waits for those events in submission order and only then
//! drops the chunk, which returns it to its pool, and reports the chunk's tag: the host
//! never reuses a buffer with a copy from it in flight, on success, on error, or when the
//! engine is dropped.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use cudarc::driver::sys;

use crate::device::{Event, Stream};
use crate::driver;
use crate::kernels::{KernelType, Kernels};
use crate::{CudaError, DeviceArena, Gpu, PageCacheRange, PinnedChunk};

/// One piece of a chunk: `rows` rows of `len` bytes; row `k` at `src_offset + k *
/// src_pitch` in the chunk goes to `dst_offset + k * dst_pitch` in the arena. One row is a
/// plain copy; more are one 2D copy (`cuMemcpy2DAsync`), which is how a slice of an inner
/// dimension is gathered without a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Offset in the pinned chunk.
    pub src_offset: usize,
    /// Offset in the device arena.
    pub dst_offset: usize,
    /// Bytes per row.
    pub len: usize,
    /// Rows (1 for a plain copy).
    pub rows: usize,
    /// Bytes from one row's start to the next in the chunk (at least `len`).
    pub src_pitch: usize,
    /// Bytes from one row's start to the next in the arena (at least `len`).
    pub dst_pitch: usize,
}

impl Piece {
    /// A plain copy of `len` bytes.
    pub const fn flat(src_offset: usize, dst_offset: usize, len: usize) -> Piece {
        Piece { src_offset, dst_offset, len, rows: 1, src_pitch: len, dst_pitch: len }
    }

    /// Where the last row ends, from the start, on each side; `None` on overflow or when
    /// rows would overlap.
    fn extents(&self) -> Option<(usize, usize)> {
        if self.rows > 1 && (self.src_pitch < self.len || self.dst_pitch < self.len) {
            return None;
        }
        let last = self.rows.max(1) - 1;
        let src = self.src_offset.checked_add(last.checked_mul(self.src_pitch)?)?.checked_add(self.len)?;
        let dst = self.dst_offset.checked_add(last.checked_mul(self.dst_pitch)?)?.checked_add(self.len)?;
        Some((src, dst))
    }
}

/// Called on the completion thread with a chunk's tag once its copies have completed (or
/// failed); the chunk is back in its pool by then.
pub type OnCopied = Box<dyn Fn(u64, Result<(), CudaError>) + Send>;

/// Work queued on a stream: what it holds until it is done.
struct Work {
    /// What the copies read (none for a kernel launch): a pinned chunk, which other devices'
    /// copies may share, or a range of the page cache.
    chunk: Option<Box<dyn Send>>,
    /// Device memory the work reads or writes, and the kernels it runs: kept until it is done.
    arenas: Vec<Arc<DeviceArena>>,
    kernels: Option<Arc<Kernels>>,
    tag: u64,
    /// A copy that failed to queue after others from this chunk had been queued.
    failed: Option<CudaError>,
}

impl Work {
    /// Never releases what the work holds: where the device may still be reading or writing
    /// it (a wait for it failed), its memory must never be handed out again.
    fn leak(self) {
        std::mem::forget(self.chunk);
        std::mem::forget(self.arenas);
        std::mem::forget(self.kernels);
    }
}

/// Work and the event recorded behind it: the completion thread releases the work once
/// the event has completed.
struct Pending {
    event: Event,
    work: Work,
}

/// Asynchronous copies on several streams with completion tracking.
pub struct CopyEngine {
    gpu: Gpu,
    streams: Vec<Arc<Stream>>,
    next: usize,
    tx: Option<Sender<Pending>>,
    done: Option<JoinHandle<()>>,
    /// The process that started the completion thread (a forked one has none of it).
    made: tensorlift_io::MadeIn,
    failure: Arc<Mutex<Option<CudaError>>>,
    events: Arc<Mutex<Vec<Event>>>,
}

impl std::fmt::Debug for CopyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyEngine").field("streams", &self.streams.len()).finish_non_exhaustive()
    }
}

impl CopyEngine {
    /// An engine with `streams` streams (at least one).
    pub fn new(gpu: &Gpu, streams: usize) -> Result<CopyEngine, CudaError> {
        Self::with_completion(gpu, streams, Box::new(|_, _| {}))
    }

    /// An engine that reports each chunk's tag to `on_copied` once its copies are done.
    pub fn with_completion(gpu: &Gpu, streams: usize, on_copied: OnCopied) -> Result<CopyEngine, CudaError> {
        let streams = (0..streams.max(1)).map(|_| gpu.new_stream()).collect::<Result<Vec<_>, _>>()?;
        let (tx, rx) = mpsc::channel();
        let failure = Arc::new(Mutex::new(None));
        let events = Arc::new(Mutex::new(Vec::new()));
        let (f, e, g) = (Arc::clone(&failure), Arc::clone(&events), gpu.clone());
        let done = std::thread::Builder::new()
            .name("tensorlift-cuda-done".into())
            .spawn(move || complete(&g, &rx, &f, &e, &on_copied))
            .map_err(|_| CudaError::OutOfMemory { what: "a completion thread", bytes: 0 })?;
        let made = tensorlift_io::MadeIn::here();
        Ok(CopyEngine { gpu: gpu.clone(), streams, next: 0, tx: Some(tx), done: Some(done), made, failure, events })
    }

    /// Number of streams.
    pub fn streams(&self) -> usize {
        self.streams.len()
    }

    /// Queues the copies of `pieces` from `chunk` into `arena`, and takes the chunk until they
    /// have completed. Never waits for the device.
    pub fn copy(&mut self, chunk: PinnedChunk, arena: &Arc<DeviceArena>, pieces: &[Piece]) -> Result<(), CudaError> {
        self.copy_tagged(chunk, arena, pieces, 0)
    }

    /// [`copy`](Self::copy), reporting `tag` to the completion callback when done. On an
    /// error the chunk is still held until every copy already queued from it has completed.
    pub fn copy_tagged(
        &mut self,
        chunk: PinnedChunk,
        arena: &Arc<DeviceArena>,
        pieces: &[Piece],
        tag: u64,
    ) -> Result<(), CudaError> {
        self.copy_to(chunk, &[(arena, pieces)], tag)
    }

    /// [`copy_tagged`](Self::copy_tagged) into several arenas: each with its pieces.
    pub fn copy_to(
        &mut self,
        chunk: PinnedChunk,
        targets: &[(&Arc<DeviceArena>, &[Piece])],
        tag: u64,
    ) -> Result<(), CudaError> {
        self.copy_shared(Arc::new(chunk), targets, tag)
    }

    /// [`copy_to`](Self::copy_to) from a chunk that the engines of other devices copy from
    /// too: it goes back to its pool once the last of them has let it go (each after its
    /// own copies have completed). The chunk is only read.
    pub fn copy_shared(
        &mut self,
        chunk: Arc<PinnedChunk>,
        targets: &[(&Arc<DeviceArena>, &[Piece])],
        tag: u64,
    ) -> Result<(), CudaError> {
        let (src, cap) = (chunk.ptr(), chunk.as_slice().len());
        self.copy_host(src, cap, Box::new(chunk), targets, tag)
    }

    /// [`copy_to`](Self::copy_to) from a range of the page cache registered with this
    /// engine's device: the copies read the file's pages by DMA, and the range is unpinned,
    /// and `with` dropped (a token that stands for the pinned pages in a budget), once they
    /// have completed. A piece's `src_offset` counts from the range's start.
    pub fn copy_from_page_cache(
        &mut self,
        range: PageCacheRange,
        with: Box<dyn Send>,
        targets: &[(&Arc<DeviceArena>, &[Piece])],
        tag: u64,
    ) -> Result<(), CudaError> {
        if range.gpu().ordinal() != self.gpu.ordinal() {
            return Err(CudaError::OutOfBounds {
                what: "host memory registered with another device",
                len: range.len(),
            });
        }
        let (src, cap) = (range.ptr(), range.len());
        self.copy_host(src, cap, Box::new((range, with)), targets, tag)
    }

    /// Queues copies of `pieces` from the `cap` bytes of registered host memory at `src`,
    /// which `keep` holds registered (and unwritten) until it is dropped, after the copies.
    fn copy_host(
        &mut self,
        src: *const u8,
        cap: usize,
        keep: Box<dyn Send>,
        targets: &[(&Arc<DeviceArena>, &[Piece])],
        tag: u64,
    ) -> Result<(), CudaError> {
        if let Some(e) = self.failure.lock().ok().and_then(|mut f| f.take()) {
            return Err(e);
        }
        for (arena, p) in targets.iter().flat_map(|&(a, ps)| ps.iter().map(move |p| (a, p))) {
            if arena.gpu().ordinal() != self.gpu.ordinal() {
                return Err(CudaError::OutOfBounds { what: "another device's memory", len: p.len });
            }
            let ends = p.extents();
            let src_ok = ends.is_some_and(|(s, _)| s <= cap);
            let dst_ok = ends.is_some_and(|(_, d)| d <= arena.len());
            if !src_ok || !dst_ok {
                return Err(CudaError::OutOfBounds {
                    what: if src_ok { "device arena" } else { "host source" },
                    len: p.len,
                });
            }
        }
        let stream = Arc::clone(&self.streams[self.next % self.streams.len()]);
        self.next = self.next.wrapping_add(1);
        let _restore = self.gpu.enter()?;
        let api = self.gpu.api();
        let mut failed = None;
        let all = targets.iter().flat_map(|&(a, ps)| ps.iter().map(move |p| (a, p)));
        for (arena, p) in all.filter(|(_, p)| p.len > 0 && p.rows > 0) {
            // SAFETY: src_offset + len <= the source's capacity was checked above.
            let src = unsafe { src.add(p.src_offset) };
            let dst = arena.device_ptr() + p.dst_offset as u64;
            let (r, call) = if p.rows == 1 {
                // SAFETY: both ranges were checked against the source and the arena; the source
                // is page-locked (registered) memory that this engine keeps (`keep`), unmoved,
                // until the event recorded after this copy completes, and only the device reads
                // it (a pinned chunk is unwritten meanwhile: engines sharing one only read it; a
                // range of the page cache changes only with its file, which the loader checks
                // after the copies); the arena is kept alive alongside it.
                (unsafe { (api.cuMemcpyHtoDAsync_v2)(dst, src.cast(), p.len, stream.raw()) }, "cuMemcpyHtoDAsync")
            } else {
                let copy = sys::CUDA_MEMCPY2D {
                    srcXInBytes: 0,
                    srcY: 0,
                    srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_HOST,
                    srcHost: src.cast(),
                    srcDevice: 0,
                    srcArray: std::ptr::null_mut(),
                    srcPitch: p.src_pitch,
                    dstXInBytes: 0,
                    dstY: 0,
                    dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                    dstHost: std::ptr::null_mut(),
                    dstDevice: dst,
                    dstArray: std::ptr::null_mut(),
                    dstPitch: p.dst_pitch,
                    WidthInBytes: p.len,
                    Height: p.rows,
                };
                // SAFETY: every row of both sides was checked against the source and the arena
                // (pitches at least the row length, no overflow); the source stays pinned and
                // is read only by the device until the event after this copy completes, as for
                // a plain copy, and the descriptor is read by the call, which does not keep it.
                (unsafe { (api.cuMemcpy2DAsync_v2)(&copy, stream.raw()) }, "cuMemcpy2DAsync")
            };
            if let Err(e) = api.check(r, call) {
                failed = Some(e);
                break;
            }
        }
        // Even after a failure, copies queued before it still read the chunk: the chunk goes
        // back only behind an event.
        let arenas = targets.iter().map(|(a, _)| Arc::clone(a)).collect();
        self.track(&stream, Work { chunk: Some(keep), arenas, kernels: None, tag, failed })
    }

    /// Queues a conversion of `n` elements of `from` at `src_offset` in `src` into `to` at
    /// `dst_offset` in `dst`, on the next stream, reporting `tag` when it has completed; the
    /// arenas and the kernels are kept until then. The work queued before it on other
    /// streams is not waited for: call it once the copies it reads have completed.
    #[allow(clippy::too_many_arguments)] // Two (arena, offset) pairs, a count, two types, a tag.
    pub fn convert_tagged(
        &mut self,
        kernels: &Arc<Kernels>,
        (from, to): (KernelType, KernelType),
        (src, src_offset): (&Arc<DeviceArena>, usize),
        (dst, dst_offset): (&Arc<DeviceArena>, usize),
        n: usize,
        tag: u64,
    ) -> Result<(), CudaError> {
        if let Some(e) = self.failure.lock().ok().and_then(|mut f| f.take()) {
            return Err(e);
        }
        let ordinal = self.gpu.ordinal();
        if [kernels.gpu(), src.gpu(), dst.gpu()].iter().any(|g| g.ordinal() != ordinal) {
            return Err(CudaError::OutOfBounds { what: "another device's memory", len: n });
        }
        let end = |offset: usize, width: usize| n.checked_mul(width).and_then(|b| b.checked_add(offset));
        let (Some(src_end), Some(dst_end)) = (end(src_offset, from.width()), end(dst_offset, to.width())) else {
            return Err(CudaError::OutOfBounds { what: "a conversion's size", len: n });
        };
        if src_end > src.len() || dst_end > dst.len() {
            return Err(CudaError::OutOfBounds { what: "a conversion's arena", len: n });
        }
        // Kernels load and store whole elements: a misaligned address is a device fault that
        // poisons the context, so it is refused here.
        let (s, d) = (src.device_ptr() + src_offset as u64, dst.device_ptr() + dst_offset as u64);
        if s % from.width() as u64 != 0 || d % to.width() as u64 != 0 {
            return Err(CudaError::OutOfBounds { what: "a conversion's misaligned elements", len: n });
        }
        let same = Arc::ptr_eq(src, dst) && src_offset < dst_end && dst_offset < src_end;
        if same || !kernels.converts(from, to) {
            return Err(CudaError::OutOfBounds { what: "a conversion's ranges (overlapping or unsupported)", len: n });
        }
        let stream = Arc::clone(&self.streams[self.next % self.streams.len()]);
        self.next = self.next.wrapping_add(1);
        let _restore = self.gpu.enter()?;
        // SAFETY: both ranges were checked to lie in their arenas, on this device, and not to
        // overlap within one arena (two arenas over the same memory can only be made through
        // the unsafe `LentMemory::new`, whose caller keeps them apart); the arenas (and the
        // kernels) are kept by the pending entry below until the event recorded after the
        // launch has completed.
        let failed = unsafe { kernels.launch_convert(stream.raw(), from, to, s, d, n as u64) }.err();
        let pending = Work {
            chunk: None,
            arenas: vec![Arc::clone(src), Arc::clone(dst)],
            kernels: Some(Arc::clone(kernels)),
            tag,
            failed,
        };
        self.track(&stream, pending)
    }

    /// Records an event after the work just queued on `stream` and hands `pending` to the
    /// completion thread, which releases what it holds once the event has completed.
    fn track(&mut self, stream: &Arc<Stream>, mut work: Work) -> Result<(), CudaError> {
        let event = match self.event().and_then(|e| e.record(stream).map(|()| e)) {
            Ok(e) => e,
            Err(e) => {
                // No event: wait for the stream here, so that the memory is free to go back.
                let failed = work.failed.take();
                if stream.synchronize().is_err() {
                    // The stream's state is unknown: never hand this memory (or the kernels
                    // a launch may still run) out again.
                    work.leak();
                }
                return Err(failed.unwrap_or(e));
            }
        };
        let err = work.failed.clone();
        let pending = Pending { event, work };
        let sent = match &self.tx {
            Some(tx) => tx.send(pending).map_err(|mpsc::SendError(p)| p),
            None => Err(pending),
        };
        if let Err(p) = sent {
            // The completion thread is gone: wait here instead, and release the work only
            // once the wait says it is done.
            match p.event.synchronize() {
                Ok(()) => drop(p),
                Err(_) => {
                    std::mem::forget(p.event);
                    p.work.leak();
                }
            }
            return Err(CudaError::Unavailable("the completion thread stopped".into()));
        }
        match err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn event(&self) -> Result<Event, CudaError> {
        if let Some(e) = self.events.lock().ok().and_then(|mut p| p.pop()) {
            return Ok(e);
        }
        self.gpu.new_event(driver::EVENT_BLOCKING_SYNC | driver::EVENT_DISABLE_TIMING)
    }

    /// Waits until every queued copy has completed; reports the first failure.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        for s in &self.streams {
            s.synchronize()?;
        }
        match self.failure.lock().ok().and_then(|mut f| f.take()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for CopyEngine {
    fn drop(&mut self) {
        // Drain: the completion thread releases every chunk once its copies are done.
        self.tx.take();
        tensorlift_io::join_threads(self.made, self.done.take());
        // Streams and events bind their context when they are destroyed, and restore the
        // thread's own after.
        self.streams.clear();
        if let Ok(mut pool) = self.events.lock() {
            pool.clear();
        }
    }
}

/// The completion thread: releases each pending work, in order, once its event has
/// completed, and reports its tag. Nothing it calls may unwind it: the work queued behind
/// (in the channel) would be dropped with its copies in flight.
fn complete(
    gpu: &Gpu,
    rx: &Receiver<Pending>,
    failure: &Mutex<Option<CudaError>>,
    events: &Mutex<Vec<Event>>,
    on_copied: &OnCopied,
) {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    let fail = |e: &CudaError| {
        if let Ok(mut f) = failure.lock() {
            f.get_or_insert(e.clone());
        }
    };
    // Held for the thread's life (its guard restores nothing that matters here): the
    // releases below (events, streams, frees) find their context current already.
    let _current = gpu.enter();
    for Pending { event, work: mut p } in rx {
        let (tag, failed) = (p.tag, p.failed.take());
        let mut result = event.synchronize();
        match &result {
            // The work is done: the chunk may go back to its pool, the memory and the
            // kernels be released, and the event reused. A drop that panics (a waker, a
            // caller's owner of lent memory) is contained, and is this work's failure: the
            // callback hears of it, so the load that queued the work's last copy does too.
            Ok(()) => {
                if catch_unwind(AssertUnwindSafe(|| drop(p))).is_err() {
                    let e = CudaError::Unavailable("releasing a finished copy's memory panicked".into());
                    fail(&e);
                    result = Err(e);
                }
                if let Ok(mut pool) = events.lock() {
                    pool.push(event);
                }
            }
            // Its state is unknown: what it holds is never handed out again.
            Err(e) => {
                fail(e);
                std::mem::forget(event);
                p.leak();
            }
        }
        if let Some(e) = failed {
            result = Err(e);
        }
        if catch_unwind(AssertUnwindSafe(|| on_copied(tag, result))).is_err() {
            fail(&CudaError::Unavailable("the completion callback panicked".into()));
        }
    }
}
