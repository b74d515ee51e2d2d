//! Host arenas: page-aligned memory that reads fill in disjoint chunks, readable range by
//! range as the chunks that cover it complete.
//!
//! This is how the CPU path lands tensors in their final memory with no staging copy, while
//! keeping every access safe: writers hold [`ArenaChunk`]s (disjoint by construction, each
//! handed out once); readers only see ranges whose chunks all came back through
//! [`HostArena::complete`].

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::{AlignedBuf, IoBufMut, PAGE};

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Page-aligned host memory filled by reads, chunk by chunk.
#[derive(Debug)]
pub struct HostArena {
    // Never moved or resized once created; only ever accessed through raw pointers derived
    // from `base`, by chunk owners (writes) or through `get` (reads of completed chunks).
    _mem: AlignedBuf,
    base: *mut u8,
    len: usize,
    chunk: usize,
    handed_out: AtomicBool,
    filled: Box<[AtomicBool]>,
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
        let mut mem = AlignedBuf::zeroed_pages(len, PAGE, huge)?;
        let base = mem.stable_mut_ptr();
        // No chunk larger than the arena (rounded to a page): that also keeps the rounding
        // from overflowing for any `chunk`, since `len` bytes were allocated.
        let whole = len.checked_next_multiple_of(PAGE)?.max(PAGE);
        let chunk = chunk.clamp(PAGE, whole).checked_next_multiple_of(PAGE)?;
        let chunks = len.div_ceil(chunk);
        LIVE.fetch_add(1, Ordering::Relaxed);
        Some(Arc::new(HostArena {
            _mem: mem,
            base,
            len,
            chunk,
            handed_out: AtomicBool::new(false),
            filled: (0..chunks).map(|_| AtomicBool::new(false)).collect(),
        }))
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
    /// handed back untouched: completing it here would expose bytes its owner may still write.
    pub fn complete(&self, chunk: ArenaChunk) -> Result<usize, ArenaChunk> {
        if !std::ptr::eq(self, &*chunk.arena) {
            return Err(chunk);
        }
        self.filled[chunk.index].store(true, Ordering::Release);
        Ok(chunk.index)
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
        if range.start > range.end || range.end > self.len {
            return None;
        }
        if !self.chunks_covering(&range).all(|i| self.filled[i].load(Ordering::Acquire)) {
            return None;
        }
        // SAFETY: range.start <= len, so the pointer stays inside the allocation.
        let start = unsafe { self.base.add(range.start) };
        // SAFETY: the range is inside the allocation, which lives as long as self; every chunk
        // covering it completed (Acquire pairs with the Release in `complete`), and a completed
        // chunk's owner gave it up, so nobody writes these bytes any more.
        Some(unsafe { std::slice::from_raw_parts(start, range.len()) })
    }
}

impl Drop for HostArena {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
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
    /// Position in the arena.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }
}

// SAFETY: the chunk's bytes lie inside the arena's allocation, which the chunk keeps alive
// through its Arc and which never moves; chunks are disjoint and handed out once, and the
// arena exposes no view of them before `complete` consumes the chunk.
unsafe impl IoBufMut for ArenaChunk {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: range.start <= len, inside the allocation.
        unsafe { self.arena.base.add(self.range.start) }
    }
    fn capacity(&self) -> usize {
        self.range.len()
    }
}
