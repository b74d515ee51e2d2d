//! Host arenas: page-aligned memory that reads fill in disjoint chunks, readable range by
//! range as the chunks that cover it complete.
//!
//! This is how the CPU path lands tensors in their final memory with no staging copy, while
//! keeping every access safe: writers hold [`ArenaChunk`]s (disjoint by construction, each
//! handed out once); readers only see ranges whose chunks all came back through
//! [`HostArena::complete`].

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::{AlignedBuf, IoBufMut, PAGE};

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Page-aligned host memory filled by reads, chunk by chunk.
#[derive(Debug)]
pub struct HostArena {
    // Never moved or resized while the arena lives; only ever accessed through raw pointers
    // derived from `base`, by chunk owners (writes) or through `get` (reads of completed
    // chunks). `None` only inside `drop`, which hands it back to the pool.
    mem: Option<AlignedBuf>,
    pool: Option<Weak<ArenaPool>>,
    base: *mut u8,
    len: usize,
    chunk: usize,
    handed_out: AtomicBool,
    filled: Box<[AtomicBool]>,
    /// Whether `mem` is a mapping of its own that nothing has touched (not reused memory).
    fresh: bool,
    /// Whether `mem` is registered with the process's userfaultfd, its chunks filled by
    /// copies (see [`crate::fill`]); set before any chunk is handed out (`setup` orders
    /// the two).
    registered: AtomicBool,
    /// Held while the arena is registered and while its chunks are handed out.
    setup: Mutex<()>,
    /// Of an arena filled by copies, by chunk: whether every page of the chunk is present
    /// (copied in, or its missing pages mapped as zero pages), so that anything may touch it.
    present: Box<[AtomicBool]>,
    /// Bytes that landed by copying cached pages in.
    copied: AtomicUsize,
    /// Why this arena stopped being filled by copies, if it did ([`Self::stop_filling`]).
    stopped: std::sync::OnceLock<String>,
}

// SAFETY: the memory is only written through ArenaChunks, which are disjoint and each owned
// by one thread at a time, and only read through `get`, for completed chunks only.
unsafe impl Send for HostArena {}
// SAFETY: as above; shared access never reads bytes a writer may still touch.
unsafe impl Sync for HostArena {}

impl HostArena {
    /// An arena of `len` zero bytes to be filled in chunks of `chunk` bytes (a multiple of
    /// the page size). `None` if the memory cannot be allocated.
    pub fn new(len: usize, chunk: usize) -> Option<Arc<HostArena>> {
        Self::with_pages(len, chunk, true)
    }

    /// [`new`](Self::new), with transparent huge pages (`huge`) or base pages.
    pub fn with_pages(len: usize, chunk: usize, huge: bool) -> Option<Arc<HostArena>> {
        // Large arenas are lazily zeroed maps (see AlignedBuf): no pass over memory.
        let mem = AlignedBuf::zeroed_pages(len, PAGE, huge)?;
        let fresh = mem.is_mapped() && !huge;
        Self::from_mem(mem, None, len, chunk, fresh)
    }

    /// [`with_pages`](Self::with_pages), taking memory a dropped arena left in `pool` when
    /// one fits (already faulted in: no page faults, no zeroing; its bytes are the old
    /// arena's until reads overwrite them, and only completed chunks are ever readable),
    /// and leaving this arena's memory there when it is dropped.
    ///
    /// `kept` is what [`ArenaPool::take_for`] found for this arena, if anything.
    pub fn pooled(
        pool: &Arc<ArenaPool>,
        kept: Option<AlignedBuf>,
        len: usize,
        chunk: usize,
        huge: bool,
    ) -> Option<Arc<HostArena>> {
        let (mem, fresh) = match kept {
            Some(m) if m.len() >= len => (m, false),
            _ => {
                let m = AlignedBuf::zeroed_pages(len, PAGE, huge)?;
                let fresh = m.is_mapped() && !huge;
                (m, fresh)
            }
        };
        Self::from_mem(mem, Some(Arc::downgrade(pool)), len, chunk, fresh)
    }

    fn from_mem(
        mut mem: AlignedBuf,
        pool: Option<Weak<ArenaPool>>,
        len: usize,
        chunk: usize,
        fresh: bool,
    ) -> Option<Arc<HostArena>> {
        if mem.len() < len {
            return None;
        }
        let base = mem.stable_mut_ptr();
        // No chunk larger than the arena (rounded to a page): that also keeps the rounding
        // from overflowing for any `chunk`, since `len` bytes were allocated.
        let whole = len.checked_next_multiple_of(PAGE)?.max(PAGE);
        let chunk = chunk.clamp(PAGE, whole).checked_next_multiple_of(PAGE)?;
        let chunks = len.div_ceil(chunk);
        LIVE.fetch_add(1, Ordering::Relaxed);
        Some(Arc::new(HostArena {
            mem: Some(mem),
            pool,
            base,
            len,
            chunk,
            handed_out: AtomicBool::new(false),
            filled: (0..chunks).map(|_| AtomicBool::new(false)).collect(),
            fresh,
            registered: AtomicBool::new(false),
            setup: Mutex::new(()),
            present: (0..chunks).map(|_| AtomicBool::new(false)).collect(),
            copied: AtomicUsize::new(0),
            stopped: std::sync::OnceLock::new(),
        }))
    }

    /// Makes the arena's chunks fill by copying cached file pages in, where a read allows
    /// it (see [`crate::fill`]): a read of a file read buffered into a whole chunk then
    /// copies the file's pages into the chunk's fresh memory, which the kernel need not
    /// zero first. Only for fresh memory of base pages, before any chunk is handed out; a
    /// prefaulter then leaves the arena alone. `Err` says why not (the arena reads as
    /// before).
    pub fn fill_by_copy(&self) -> Result<(), String> {
        if !self.can_fill_by_copy() {
            return Err("not a fresh mapping of base pages (reused, heap or huge-page memory)".into());
        }
        // take_chunks waits for this, so a chunk is never handed out while it registers.
        let _setup = self.setup.lock().unwrap_or_else(|p| p.into_inner());
        if self.handed_out.load(Ordering::Acquire) || self.registered.load(Ordering::Acquire) {
            return Err("chunks already handed out".into());
        }
        let fd = crate::fill::fill_fd().map_err(str::to_owned)?;
        fd.register(self.base, self.span()).map_err(|e| format!("userfaultfd registration: {e}"))?;
        self.registered.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether the arena's memory could be filled by copies: a fresh mapping of base pages
    /// of its own, of some bytes ([`fill_by_copy`](Self::fill_by_copy) may still be
    /// refused by the kernel).
    pub fn can_fill_by_copy(&self) -> bool {
        self.fresh && self.len > 0
    }

    /// The arena's bytes rounded up to the page: what is registered (the mapping is
    /// page-rounded beyond `len`, see AlignedBuf::mapped).
    fn span(&self) -> usize {
        self.len.next_multiple_of(PAGE)
    }

    /// Unregisters the whole arena; whether that succeeded (also where it was not
    /// registered in this process: a forked one refuses the descriptor).
    fn unregister_all(&self) -> bool {
        crate::fill::fill_fd().is_ok_and(|fd| fd.unregister(self.base, self.span()).is_ok())
    }

    /// Chunk `k`'s start and page-rounded length.
    pub(crate) fn chunk_pages(&self, k: usize) -> (*mut u8, usize) {
        let start = k * self.chunk;
        // start <= len: inside the allocation, whose mapping is page-rounded beyond len.
        (
            self.base.wrapping_add(start),
            ((k + 1) * self.chunk).min(self.len).saturating_sub(start).next_multiple_of(PAGE),
        )
    }

    /// Makes every page of chunk `k` of an arena filled by copies present (its missing pages
    /// mapped as zero pages), so that anything may touch it: a touch of a missing page of a
    /// registered range would wait for a fault handler there is none of. Where that fails
    /// (the kernel out of memory), the chunk is unregistered, then the whole arena. Whether
    /// the chunk may now be touched: `false` only where all of those failed, and then
    /// nothing may touch it. In a process forked after the arena was registered, its copy
    /// of the memory is not registered (fill_fd refuses there): nothing is needed.
    pub(crate) fn ready_chunk(&self, k: usize) -> bool {
        if !self.fills_by_copy() || self.present.get(k).is_none_or(|p| p.load(Ordering::Acquire)) {
            return true;
        }
        let (start, pages) = self.chunk_pages(k);
        let ok = crate::fill::fill_fd().map_or(true, |fd| {
            // Zero pages need no change to the mapping; unregistering the chunk splits the
            // mapping (which needs memory); unregistering the whole arena, which is the
            // mapping it registered, needs no split (merging may still need a little).
            fd.zero(start, pages).is_ok() || fd.unregister(start, pages).is_ok() || {
                self.stop_filling("the kernel could not map a chunk's pages (out of memory)");
                !self.fills_by_copy()
            }
        });
        if ok {
            self.mark_present(k);
        }
        ok
    }

    /// Whether the arena's chunks fill by copies ([`fill_by_copy`](Self::fill_by_copy)).
    pub fn fills_by_copy(&self) -> bool {
        self.registered.load(Ordering::Acquire)
    }

    /// Why this arena, registered to be filled by copies, stopped being filled so, if it did
    /// (its file could not be copied from, or the kernel could not make a chunk's pages
    /// present).
    pub fn fill_stopped(&self) -> Option<&str> {
        self.stopped.get().map(String::as_str)
    }

    /// Bytes that landed in this arena by copying cached pages in.
    pub fn copied_bytes(&self) -> u64 {
        self.copied.load(Ordering::Relaxed) as u64
    }

    /// Counts `bytes` that landed by copies in chunk `k`, every page of which is present.
    pub(crate) fn copied_into(&self, k: usize, bytes: usize) {
        self.copied.fetch_add(bytes, Ordering::Relaxed);
        self.mark_present(k);
    }

    /// Notes that every page of chunk `k` is present.
    pub(crate) fn mark_present(&self, k: usize) {
        if let Some(p) = self.present.get(k) {
            p.store(true, Ordering::Release);
        }
    }

    /// Number of arenas alive in this process (for leak tests).
    pub fn live_count() -> usize {
        LIVE.load(Ordering::Relaxed)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the arena holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every chunk, once: later calls return an empty list, so no range is ever writable twice.
    pub fn take_chunks(self: &Arc<Self>) -> Vec<ArenaChunk> {
        let _setup = self.setup.lock().unwrap_or_else(|p| p.into_inner());
        if self.handed_out.swap(true, Ordering::AcqRel) {
            return Vec::new();
        }
        (0..self.filled.len())
            .map(|i| ArenaChunk {
                arena: Arc::clone(self),
                index: i,
                range: i * self.chunk..((i + 1) * self.chunk).min(self.len),
            })
            .collect()
    }

    /// Marks a chunk's bytes as final and returns its index. A chunk of another arena is
    /// handed back untouched: completing it here would expose bytes its owner may still
    /// write. So is a chunk of an arena filled by copies whose pages could not be made
    /// present (the kernel out of memory): its bytes stay unreadable.
    pub fn complete(&self, chunk: ArenaChunk) -> Result<usize, ArenaChunk> {
        if !std::ptr::eq(self, &*chunk.arena) {
            return Err(chunk);
        }
        // A chunk of an arena filled by copies that nothing wrote (an empty read, a
        // failed one) still has missing pages: present them before anyone may read them.
        let mut chunk = chunk;
        if !chunk.release() {
            return Err(chunk);
        }
        self.filled[chunk.index].store(true, Ordering::Release);
        Ok(chunk.index)
    }

    /// Stops filling this arena by copies (a file that cannot be copied from: `why`): it is
    /// unregistered whole, and its chunks are then written as in any other arena. Chunks
    /// already readied for writing keep their zero pages.
    pub(crate) fn stop_filling(&self, why: &str) {
        if !self.fills_by_copy() {
            return;
        }
        let _ = self.stopped.set(why.to_owned());
        // Under `setup`, so that two callers do not both unregister.
        let _setup = self.setup.lock().unwrap_or_else(|p| p.into_inner());
        if self.fills_by_copy() && self.unregister_all() {
            self.registered.store(false, Ordering::Release);
        }
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> usize {
        self.filled.len()
    }

    /// Whether the arena is fresh mapped memory whose pages a [`Prefaulter`] can fault in
    /// (a small arena is a heap block, which the allocator may already have touched).
    /// An arena filled by copies is left alone: its pages must stay missing for the copies.
    pub fn can_prefault(&self) -> bool {
        self.mem.as_ref().is_some_and(AlignedBuf::is_mapped) && !self.fills_by_copy()
    }

    /// Faults in chunk `k`'s pages, writable, in steps of 2 MiB (`MADV_POPULATE_WRITE`,
    /// Linux 5.14), until `stop` is set or the chunk has landed. Changes no byte: a page
    /// already present is left as it is, a missing one is mapped as the zeroes it reads as.
    /// Returns the bytes faulted in.
    pub(crate) fn prefault_chunk(&self, k: usize, stop: &AtomicBool) -> std::io::Result<usize> {
        const STEP: usize = 2 << 20;
        if k >= self.filled.len() || !self.can_prefault() {
            return Ok(0);
        }
        // The mapping is page-rounded beyond `len` (see AlignedBuf::mapped).
        let start = k * self.chunk;
        let end = ((k + 1) * self.chunk).min(self.len).next_multiple_of(PAGE);
        let mut at = start;
        while at < end {
            if stop.load(Ordering::Relaxed) || self.filled[k].load(Ordering::Relaxed) {
                break;
            }
            let n = STEP.min(end - at);
            // SAFETY: [at, at + n) is page-aligned and inside the arena's live mapping (the
            // caller holds the arena); MADV_POPULATE_WRITE writes no byte, so a read filling
            // the same pages meanwhile sees its own bytes, never zeroes over them.
            let rc = unsafe { libc::madvise(self.base.wrapping_add(at).cast(), n, libc::MADV_POPULATE_WRITE) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            at += n;
        }
        Ok(at - start)
    }

    /// Indices of the chunks that overlap `range`.
    pub fn chunks_covering(&self, range: &Range<usize>) -> Range<usize> {
        if range.is_empty() {
            return 0..0;
        }
        range.start / self.chunk..range.end.div_ceil(self.chunk)
    }

    /// The bytes of `range`, if every chunk covering it has completed.
    pub fn get(&self, range: Range<usize>) -> Option<&[u8]> {
        let start = self.addr(range.clone())?;
        // SAFETY: the range is inside the allocation, which lives as long as self; every chunk
        // covering it completed (Acquire pairs with the Release in `complete`), and a completed
        // chunk's owner gave it up, so nothing safe writes these bytes any more. (Memory lent
        // writable through an FFI edge is that edge's to keep from views: the Python
        // binding's `writable_if` says how.)
        Some(unsafe { std::slice::from_raw_parts(start, range.len()) })
    }

    /// The address of `range`'s bytes, if every chunk covering it has completed, for a
    /// consumer handed the memory itself ([`copy_out`](Self::copy_out) copies it): nothing
    /// here reads them.
    pub fn addr(&self, range: Range<usize>) -> Option<*const u8> {
        if range.start > range.end || range.end > self.len {
            return None;
        }
        if !self.chunks_covering(&range).all(|i| self.filled[i].load(Ordering::Acquire)) {
            return None;
        }
        // range.start <= len: the address is inside the allocation (or one past its end).
        Some(self.base.wrapping_add(range.start).cast_const())
    }

    /// Copies `range`'s bytes into `dst` (of the same length) by the kernel
    /// ([`crate::copy_by_kernel`]), not through a reference: memory lent to a consumer that
    /// writes it is copied as it is, torn by such a write but with no data race. On
    /// failure, the bytes copied before it and the error (`InvalidInput` with none copied
    /// where `range` has not all landed, lies outside the arena, or is not `dst`'s length).
    pub fn copy_out(&self, range: Range<usize>, dst: &mut [u8]) -> Result<(), (usize, io::Error)> {
        let addr = self.addr(range.clone()).filter(|_| range.len() == dst.len());
        let Some(addr) = addr else {
            return Err((0, io::Error::new(io::ErrorKind::InvalidInput, "not a landed range of the arena's length")));
        };
        // SAFETY: `addr` is `range` of this arena, which `self` keeps mapped through the call;
        // its chunks have all landed, so no read or `&mut` of the arena's covers them any more,
        // and `dst` is the caller's own `&mut`, not this memory.
        unsafe { crate::copy_by_kernel(addr, dst) }
    }
}

impl Drop for HostArena {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
        // Registered memory is unregistered before it serves anything else; where that
        // fails, it is unmapped rather than pooled (a page left missing would wait).
        if self.fills_by_copy() && !self.unregister_all() {
            drop(self.mem.take());
            return;
        }
        // No chunk or reader is left (they hold the Arc): the memory can serve another arena.
        if let (Some(mem), Some(pool)) = (self.mem.take(), self.pool.as_ref().and_then(Weak::upgrade)) {
            pool.give(mem);
        }
    }
}

/// Faults in fresh arena memory ahead of the reads that fill it, on threads of its own:
/// a read into memory never touched pays the kernel's page fault and zeroing on the
/// reading thread (about 0.35-0.5 s of CPU per GB on the development VM), and with O_DIRECT
/// the read waits for it. Chunks are taken in the order the reads are issued; a chunk that
/// has landed is skipped. Dropping it (or [`stop`](Self::stop)) ends the threads within
/// one 2 MiB step each.
#[derive(Debug)]
pub struct Prefaulter {
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicUsize>,
    failed: Arc<Mutex<Option<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// The process that started the threads (a forked one has none of them).
    made: crate::process::MadeIn,
}

impl Prefaulter {
    /// Starts faulting in `work`, (arena, chunk index) each, in order, on up to `threads`
    /// threads that take the next chunk in turn. `None` when there is nothing to do or no
    /// thread can be had (the reads then fault the pages themselves).
    pub fn start(work: Vec<(Arc<HostArena>, usize)>, threads: usize) -> Option<Prefaulter> {
        // Chunks are multiples of PAGE: where the kernel's pages are larger (16 or 64 KiB),
        // a chunk may start inside one, which madvise refuses. The reads fault them instead.
        if crate::cache::page_size() != PAGE {
            return None;
        }
        let work: Arc<Vec<_>> = Arc::new(work.into_iter().filter(|(a, _)| a.can_prefault()).collect());
        if work.is_empty() {
            return None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(Mutex::new(None));
        let next = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..threads.clamp(1, work.len()) {
            let (s, b, f, n, w) =
                (Arc::clone(&stop), Arc::clone(&bytes), Arc::clone(&failed), Arc::clone(&next), Arc::clone(&work));
            let spawned = std::thread::Builder::new().name("tensorlift-prefault".into()).spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let Some((arena, k)) = w.get(n.fetch_add(1, Ordering::Relaxed)) else { break };
                    match arena.prefault_chunk(*k, &s) {
                        Ok(done) => {
                            b.fetch_add(done, Ordering::Relaxed);
                        }
                        // EINVAL: a kernel before 5.14 (or a sandbox that refuses the
                        // advice). Any error ends the prefaulting; the reads fault what is
                        // left, as they would without it.
                        Err(e) => {
                            *f.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                            s.store(true, Ordering::Relaxed);
                        }
                    }
                }
            });
            // Threads that cannot be had leave their share to the others.
            if let Ok(h) = spawned {
                handles.push(h);
            }
        }
        if handles.is_empty() {
            return None;
        }
        Some(Prefaulter { stop, bytes, failed, threads: handles, made: crate::process::MadeIn::here() })
    }

    /// Bytes faulted in so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed) as u64
    }

    /// Why prefaulting stopped early, if it did (the kernel's error).
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits for the threads to go through all the work, and returns the bytes faulted in.
    pub fn wait(&mut self) -> u64 {
        crate::process::join_threads(self.made, self.threads.drain(..));
        self.bytes()
    }

    /// Stops the threads and waits for them (at most one 2 MiB step each).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // A panic in a thread (a bug) is not the load's failure: the reads fault the rest.
        crate::process::join_threads(self.made, self.threads.drain(..));
    }
}

impl Drop for Prefaulter {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Host memory that dropped arenas leave for the next ones, up to a byte budget: a process
/// that loads again (a server swapping models, a benchmark loop) gets memory that is already
/// faulted in, instead of paying the kernel's page faults and zeroing again (0.35 s of CPU
/// per GB on the development VM: `benches/fresh_memory.py`). The memory is the caller's own peak: it was held by tensors
/// until they were dropped. [`release`](Self::release) returns it to the system.
#[derive(Debug)]
pub struct ArenaPool {
    state: Mutex<PoolState>,
}

#[derive(Debug, Default)]
struct PoolState {
    bufs: Vec<AlignedBuf>,
    bytes: usize,
    max_bytes: usize,
    /// The largest load's arenas together: the pool never keeps more.
    peak: usize,
}

impl ArenaPool {
    /// A pool that keeps at most `max_bytes` (0: keeps nothing).
    pub fn new(max_bytes: usize) -> Arc<ArenaPool> {
        Arc::new(ArenaPool { state: Mutex::new(PoolState { max_bytes, ..PoolState::default() }) })
    }

    /// Bytes kept now.
    pub fn retained_bytes(&self) -> usize {
        self.lock().bytes
    }

    // A panic while the lock was held cannot leave the state inconsistent (every update is
    // a push or a pop with its byte count), so a poisoned lock is used as it is.
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Frees everything kept, and keeps nothing given back until the next load: memory of
    /// tensors dropped later, or of a dropped load's reads that land later, is freed too.
    pub fn release(&self) {
        self.lock().peak = 0;
        self.free_kept();
    }

    fn free_kept(&self) {
        let bufs = {
            let mut s = self.lock();
            s.bytes = 0;
            std::mem::take(&mut s.bufs)
        };
        drop(bufs);
    }

    /// For each of `lens`, a kept buffer that fits it (see `take`), and then frees every
    /// buffer left: memory kept for a load of another shape is given back before the new
    /// load allocates, so a process never holds more than its largest load.
    pub fn take_for(&self, lens: &[usize]) -> Vec<Option<AlignedBuf>> {
        {
            let mut s = self.lock();
            s.peak = s.peak.max(lens.iter().fold(0usize, |a, &l| a.saturating_add(l)));
        }
        let out = lens.iter().map(|&l| self.take(l)).collect();
        self.free_kept();
        out
    }

    /// The smallest kept buffer of at least `len` bytes and not much more (a quarter, plus
    /// 2 MiB), so that a small load does not pin a large one.
    fn take(&self, len: usize) -> Option<AlignedBuf> {
        // No memory asked for (a span read into the caller's memory): nothing to give.
        if len == 0 {
            return None;
        }
        let mut s = self.lock();
        let most = len.saturating_add(len / 4).saturating_add(2 << 20);
        let i =
            (0..s.bufs.len()).filter(|&i| (len..=most).contains(&s.bufs[i].len())).min_by_key(|&i| s.bufs[i].len())?;
        let buf = s.bufs.swap_remove(i);
        s.bytes -= buf.len();
        Some(buf)
    }

    /// Keeps `buf` if the budget allows (the smaller of `max_bytes` and the largest load's
    /// arenas), dropping the oldest kept buffers to make room.
    fn give(&self, buf: AlignedBuf) {
        let mut s = self.lock();
        let most = s.max_bytes.min(s.peak);
        if buf.len() > most {
            return;
        }
        let mut freed = Vec::new();
        while s.bytes + buf.len() > most && !s.bufs.is_empty() {
            let old = s.bufs.remove(0);
            s.bytes -= old.len();
            freed.push(old);
        }
        s.bytes += buf.len();
        s.bufs.push(buf);
        drop(s);
        // Unmapped outside the lock.
        drop(freed);
    }
}

/// A disjoint, writable piece of a [`HostArena`], lent to one read at a time.
#[derive(Debug)]
pub struct ArenaChunk {
    arena: Arc<HostArena>,
    index: usize,
    range: Range<usize>,
}

impl ArenaChunk {
    fn start(&self) -> *mut u8 {
        // range.start <= len: inside the allocation.
        self.arena.base.wrapping_add(self.range.start)
    }

    /// For a chunk of an arena filled by copies whose pages are still missing: its index,
    /// start and arena, for [`crate::fill`]'s copy into it. The copy makes every page of it
    /// present, or the copying thread readies it ([`HostArena::ready_chunk`]).
    pub(crate) fn copy_target(&self) -> Option<(usize, *mut u8, Arc<HostArena>)> {
        let missing = self.arena.present.get(self.index).is_some_and(|p| !p.load(Ordering::Acquire));
        (self.arena.fills_by_copy() && missing && !self.range.is_empty())
            .then(|| (self.index, self.start(), Arc::clone(&self.arena)))
    }

    /// Readies the chunk for any other reader or writer ([`HostArena::ready_chunk`]).
    fn release(&mut self) -> bool {
        self.arena.ready_chunk(self.index)
    }

    /// Position in the arena.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// The chunk's bytes, to write (zeroes in new memory, an earlier load's bytes in reused
    /// memory). Empty for a chunk of an arena filled by copies whose pages could not be made
    /// present (the kernel out of memory); `complete` then refuses it.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        if !self.release() {
            return &mut [];
        }
        let len = self.range.len();
        let ptr = self.stable_mut_ptr();
        // SAFETY: the chunk's bytes lie inside the live arena allocation (the chunk holds
        // its Arc) and are initialised (zero pages, or bytes written before); chunks are
        // disjoint and handed out once, no view of them exists before `complete` consumes
        // the chunk, and &mut self makes this the only access meanwhile.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }
}

// SAFETY: the chunk's bytes lie inside the arena's allocation, which the chunk keeps alive
// through its Arc and which never moves; chunks are disjoint and handed out once, and the
// arena exposes no view of them before `complete` consumes the chunk.
unsafe impl IoBufMut for ArenaChunk {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        // Where the pages cannot be made present, a read's write into them fails (EFAULT:
        // the descriptor is user-mode only) and `complete` refuses the chunk; a write of
        // this process's own asks `ready_for_cpu_writes` first.
        self.release();
        self.start()
    }
    fn capacity(&self) -> usize {
        self.range.len()
    }
    /// Where the pages cannot be made present (an arena filled by copies, the kernel out of
    /// memory), a kernel's write into them fails (EFAULT: the descriptor is user-mode only),
    /// but this process's own would wait forever for a copy that never comes: refused.
    fn ready_for_cpu_writes(&mut self) -> bool {
        self.release()
    }
}
