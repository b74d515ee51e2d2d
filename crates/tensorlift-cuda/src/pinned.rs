//! Pinned staging memory: one anonymous mapping registered with CUDA, carved into chunks
//! that reads fill and copies drain.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use tensorlift_io::{AlignedBuf, IoBufMut, IoError, Reader, PAGE};

use crate::driver;
use crate::{CudaError, Gpu};

/// A fixed budget of page-locked host memory in equal chunks.
///
/// The memory is an anonymous mapping registered with `cuMemHostRegister` (PORTABLE, not
/// write-combined), which io_uring can register as fixed buffers too; memory from
/// `cuMemHostAlloc` cannot be registered with io_uring on every kernel.
///
/// The loads of one loader share the pool. A load that holds none of its chunks while
/// others hold them all (a stream not being read holds its landed chunks until it is) may
/// take a [`spare`](Self::spare) chunk, beyond the budget, so that no load waits on another
/// that may never go on. Spares are kept for the next load that needs one.
#[derive(Debug)]
pub struct PinnedPool {
    gpu: Gpu,
    // Freed by Drop::drop once it is unregistered; leaked where it may still be registered
    // (a later mapping at its address must not inherit a stale registration).
    mem: std::mem::ManuallyDrop<AlignedBuf>,
    base: *mut u8,
    chunk: usize,
    count: usize,
    fixed: AtomicBool,
    free: Mutex<Vec<usize>>,
    returned: Condvar,
    /// Async waiters for a chunk (see `poll_acquire`), woken when one comes back.
    waiting: Mutex<Vec<std::task::Waker>>,
    /// Spare chunks not lent out (see `spare`), each registered on its own.
    spares: Mutex<Vec<Spare>>,
    /// Spare chunks made, lent out or not (each kept until the pool is dropped).
    spares_made: std::sync::atomic::AtomicUsize,
}

// SAFETY: the memory is only written through PinnedChunks, each owned by one holder at a
// time (the free list hands an index out once until it is returned).
unsafe impl Send for PinnedPool {}
// SAFETY: as above; the pool's own state is behind mutexes.
unsafe impl Sync for PinnedPool {}

impl PinnedPool {
    /// `budget` bytes (rounded down to whole chunks, at least one) in chunks of `chunk` bytes.
    pub fn new(gpu: &Gpu, budget: usize, chunk: usize) -> Result<Arc<PinnedPool>, CudaError> {
        let too_big = CudaError::OutOfMemory { what: "staging memory", bytes: budget.max(chunk) as u64 };
        let chunk = chunk.max(PAGE).checked_next_multiple_of(PAGE).ok_or(too_big.clone())?;
        let count = (budget / chunk).max(1);
        let len = count.checked_mul(chunk).ok_or(too_big)?;
        let mut mem = AlignedBuf::zeroed(len, PAGE)
            .ok_or(CudaError::OutOfMemory { what: "staging memory", bytes: len as u64 })?;
        let base = mem.stable_mut_ptr();
        let _restore = gpu.enter()?;
        // SAFETY: [base, base + len) is a live mapping owned by `mem`, which the pool keeps
        // until Drop unregisters it first.
        let r = unsafe { (gpu.api().cuMemHostRegister_v2)(base.cast(), len, driver::MEMHOSTREGISTER_PORTABLE) };
        gpu.api().check(r, "cuMemHostRegister")?;
        Ok(Arc::new(PinnedPool {
            gpu: gpu.clone(),
            mem: std::mem::ManuallyDrop::new(mem),
            base,
            chunk,
            count,
            fixed: AtomicBool::new(false),
            free: Mutex::new((0..count).rev().collect()),
            returned: Condvar::new(),
            waiting: Mutex::new(Vec::new()),
            spares: Mutex::new(Vec::new()),
            spares_made: std::sync::atomic::AtomicUsize::new(0),
        }))
    }

    /// Registers every chunk with `reader` as an io_uring fixed buffer (slot = chunk index),
    /// so reads into them skip per-read page pinning. The reader keeps the pool alive as
    /// long as the registration lasts. On refusal reads still work, unregistered.
    pub fn register_with(self: &Arc<Self>, reader: &Reader) -> Result<(), IoError> {
        let regions: Vec<(*mut u8, usize)> = (0..self.count).map(|i| (self.chunk_ptr(i), self.chunk)).collect();
        let owner: Arc<dyn std::any::Any + Send + Sync> = Arc::clone(self) as _;
        // SAFETY: each region lies in the pool's mapping, which lives as long as the pool,
        // which the reader keeps (`owner`) until its rings are gone.
        let r = unsafe { reader.register_owned_buffers(&regions, owner) };
        self.fixed.store(r.is_ok(), Ordering::Release);
        r
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> usize {
        self.chunk
    }

    /// Number of chunks.
    pub fn chunks(&self) -> usize {
        self.count
    }

    /// Number of spare chunks made (see [`spare`](Self::spare)), which the pool keeps.
    pub fn spare_chunks(&self) -> usize {
        self.spares_made.load(Ordering::Relaxed)
    }

    /// A free chunk, waiting until one is returned: back-pressure, never growth.
    pub fn acquire(self: &Arc<Self>) -> PinnedChunk {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(index) = free.pop() {
                return PinnedChunk { pool: Arc::clone(self), index, own: None };
            }
            free = self.returned.wait(free).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// A free chunk if one is available now.
    pub fn try_acquire(self: &Arc<Self>) -> Option<PinnedChunk> {
        let index = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
        Some(PinnedChunk { pool: Arc::clone(self), index, own: None })
    }

    /// A free chunk, or `Pending` with `cx`'s waker kept until one is returned: how an async
    /// load waits for staging memory that other loads of the same loader hold.
    pub fn poll_acquire(self: &Arc<Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<PinnedChunk> {
        if let Some(c) = self.try_acquire() {
            return std::task::Poll::Ready(c);
        }
        if let Ok(mut w) = self.waiting.lock() {
            if !w.iter().any(|x| x.will_wake(cx.waker())) {
                w.push(cx.waker().clone());
            }
        }
        // A chunk may have come back between the two looks.
        match self.try_acquire() {
            Some(c) => std::task::Poll::Ready(c),
            None => std::task::Poll::Pending,
        }
    }

    /// A spare chunk, beyond the pool's budget, page-locked like the pool's: for a load that
    /// holds no chunk while every one of the pool's is lent out, which would otherwise wait
    /// on loads that may never give one back (a stream on the same thread that is not being
    /// read). One kept from an earlier load if there is one, else a new one, which the pool
    /// keeps once it comes back (freed with the pool). A load holds at most one at a time, so
    /// the pool pins at most the budget plus a chunk for each load running at once.
    pub fn spare(self: &Arc<Self>) -> Result<PinnedChunk, CudaError> {
        let kept = self.spares.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
        if let Some(spare) = kept {
            return Ok(PinnedChunk { pool: Arc::clone(self), index: usize::MAX, own: Some(spare) });
        }
        let mut mem = AlignedBuf::zeroed(self.chunk, PAGE)
            .ok_or(CudaError::OutOfMemory { what: "a spare staging chunk", bytes: self.chunk as u64 })?;
        let base = mem.stable_mut_ptr();
        let _restore = self.gpu.enter()?;
        // SAFETY: [base, base + chunk) is a live mapping owned by `mem`, which the spare
        // keeps until the pool's Drop unregisters it first.
        let r =
            unsafe { (self.gpu.api().cuMemHostRegister_v2)(base.cast(), self.chunk, driver::MEMHOSTREGISTER_PORTABLE) };
        // (Refused, `mem` is freed unregistered.)
        self.gpu.api().check(r, "cuMemHostRegister")?;
        self.spares_made.fetch_add(1, Ordering::Relaxed);
        Ok(PinnedChunk { pool: Arc::clone(self), index: usize::MAX, own: Some(Spare { mem }) })
    }

    /// Chunks not currently lent out.
    pub fn free_chunks(&self) -> usize {
        self.free.lock().map_or(0, |f| f.len())
    }

    fn chunk_ptr(&self, index: usize) -> *mut u8 {
        // SAFETY: index < count, so the offset stays inside the mapping.
        unsafe { self.base.add(index * self.chunk) }
    }

    fn release(&self, index: usize) {
        // Pushed back even past a panic elsewhere (as acquire takes it): a chunk dropped
        // here would leave a waiter of a one-chunk pool blocked for good.
        self.free.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(index);
        self.returned.notify_one();
        let wakers = self.waiting.lock().map(|mut w| std::mem::take(&mut *w)).unwrap_or_default();
        for w in wakers {
            w.wake();
        }
    }
}

impl PinnedPool {
    /// Unregisters the range registered at `base`; whether the driver did.
    ///
    /// # Safety
    ///
    /// `base` is a range this pool registered and has not unregistered yet.
    unsafe fn unregister(&self, base: *mut u8) -> bool {
        self.gpu.enter().is_ok_and(|_restore| {
            // SAFETY: the caller's contract: a registered range, unregistered once.
            (unsafe { (self.gpu.api().cuMemHostUnregister)(base.cast()) }) == driver::SUCCESS
        })
    }
}

impl Drop for PinnedPool {
    fn drop(&mut self) {
        // Every spare is back (a lent one holds the pool): each unregistered, then freed, or
        // leaked where it may still be registered.
        let spares = std::mem::take(self.spares.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner));
        for spare in spares {
            // SAFETY: the range `spare` registered in `spare()`, once.
            if !unsafe { self.unregister(spare.mem.addr().cast_mut()) } {
                std::mem::forget(spare);
            }
        }
        // Every chunk holds an Arc to the pool, so none is lent out (and no copy from one is
        // in flight: the copy engine holds chunks until their copies complete).
        // SAFETY: the range registered in `new`, once.
        if unsafe { self.unregister(self.base) } {
            // SAFETY: dropped once, here, and never used after; no chunk (each holds the pool)
            // and no registration refers to it any more.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.mem) };
        }
    }
}

/// One chunk of a [`PinnedPool`] (or a [spare](PinnedPool::spare)), returned to the pool
/// when dropped.
#[derive(Debug)]
pub struct PinnedChunk {
    pool: Arc<PinnedPool>,
    index: usize,
    own: Option<Spare>,
}

/// A spare chunk's own memory, registered with the driver on its own.
#[derive(Debug)]
struct Spare {
    mem: AlignedBuf,
}

impl PinnedChunk {
    /// The chunk's index in its pool; `None` for a spare.
    pub fn index(&self) -> Option<usize> {
        self.own.is_none().then_some(self.index)
    }

    pub(crate) fn ptr(&self) -> *const u8 {
        match &self.own {
            Some(s) => s.mem.addr(),
            None => self.pool.chunk_ptr(self.index),
        }
    }

    /// The chunk's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the chunk's `pool.chunk` bytes are owned by this value (a pool chunk lent
        // once, or a spare's own memory); nobody writes them while borrowed here.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.pool.chunk) }
    }

    /// The chunk's bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let ptr = self.stable_mut_ptr();
        // SAFETY: as in as_slice, and &mut self makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(ptr, self.pool.chunk) }
    }
}

impl Drop for PinnedChunk {
    fn drop(&mut self) {
        match self.own.take() {
            // Kept for the next load that needs one (its copies are complete: the copy
            // engine holds a chunk until they are).
            Some(spare) => self.pool.spares.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(spare),
            None => self.pool.release(self.index),
        }
    }
}

// SAFETY: the chunk's bytes lie in the pool's mapping, which the chunk keeps alive and which
// never moves, or in a spare's own mapping, which the chunk owns while lent; the free lists
// lend each index, and each spare, to one chunk at a time. (When `fixed`, chunk
// `i` is the region registered as slot `i` with the reader it was registered with; a reader
// checks that against its own registration before it reads into a slot.)
unsafe impl IoBufMut for PinnedChunk {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        match &mut self.own {
            Some(s) => s.mem.stable_mut_ptr(),
            None => self.pool.chunk_ptr(self.index),
        }
    }
    fn capacity(&self) -> usize {
        self.pool.chunk
    }
    fn fixed_slot(&self) -> Option<u16> {
        // (A spare is registered with no reader.)
        let pooled = self.own.is_none() && self.pool.fixed.load(Ordering::Acquire);
        (pooled && self.index <= u16::MAX as usize).then_some(self.index as u16)
    }
}
