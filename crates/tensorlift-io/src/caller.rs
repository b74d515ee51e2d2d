//! Host memory the caller owns, that loads write into: a server's own allocator, a fused
//! buffer several tensors share, a `Vec` a framework keeps.
//!
//! The caller hands over the memory ([`CallerRegion::new`]); each tensor placed in it
//! claims a range ([`CallerRegion::claim`]), and claims never overlap. A claim is written
//! either by reads, through disjoint [`CallerChunk`]s handed out once, or all at once by
//! [`Claim::write`]; its bytes are readable ([`Claim::get`]) only once all of it is
//! written. The caller gets the memory back ([`CallerRegion::into_inner`]) once no claim is
//! left.

use std::any::Any;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::IoBufMut;

/// Memory a caller can lend: any owned byte buffer (`Vec<u8>`, `Box<[u8]>`, a framework's
/// storage that derefs to bytes).
pub trait CallerMemory: Send + Sync + 'static {
    /// The bytes, once: loads write through a pointer taken from this single call.
    fn bytes_mut(&mut self) -> &mut [u8];
    /// The value, to give back to its owner.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send + Sync>;
}

impl<T: AsMut<[u8]> + Send + Sync + 'static> CallerMemory for T {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.as_mut()
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send + Sync> {
        self
    }
}

/// Why a range of caller memory cannot be claimed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimError {
    /// The range ends past the memory.
    #[error("bytes {start}..{end} do not fit in {len} bytes of caller memory")]
    TooSmall { start: usize, end: usize, len: usize },
    /// Another tensor already claimed part of the range.
    #[error("bytes {start}..{end} overlap bytes {other_start}..{other_end}, claimed by another tensor")]
    Overlap { start: usize, end: usize, other_start: usize, other_end: usize },
}

/// Caller memory that tensors are placed in.
pub struct CallerRegion {
    // The owner's value, held as a raw pointer from `Box::into_raw` (a `Box` moved after the
    // bytes were borrowed would assert unique access to them, and bytes inside the value
    // itself, as in an array, would be invalidated): untouched while the region lives,
    // every access goes through `base`, taken from the one `bytes_mut` call, to ranges
    // that claims keep disjoint. Rebuilt into a `Box` once, by `into_inner` or `drop`.
    mem: Mutex<Option<RawMemory>>,
    base: *mut u8,
    len: usize,
    claimed: Mutex<Vec<Range<usize>>>,
}

// SAFETY: the memory is only written through claims, which are disjoint, and through their
// chunks, each owned by one thread at a time; it is only read through `Claim::get`, once
// every byte of the claim is written.
unsafe impl Send for CallerRegion {}
// SAFETY: as above.
unsafe impl Sync for CallerRegion {}

impl std::fmt::Debug for CallerRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerRegion").field("len", &self.len).finish_non_exhaustive()
    }
}

/// The owner's value, leaked from its `Box` until it is rebuilt.
struct RawMemory(*mut dyn CallerMemory);

impl RawMemory {
    fn into_box(self) -> Box<dyn CallerMemory> {
        // SAFETY: the pointer came from `Box::into_raw` (in `CallerRegion::new`), and this
        // value, which is not `Clone`, is consumed: the box is rebuilt once.
        unsafe { Box::from_raw(self.0) }
    }
}

impl CallerRegion {
    /// Takes `mem` to place tensors in.
    pub fn new(mem: impl CallerMemory) -> Arc<CallerRegion> {
        let raw: *mut dyn CallerMemory = Box::into_raw(Box::new(mem));
        // SAFETY: `raw` is the only pointer to the value, just leaked from its box and valid
        // until it is rebuilt; this `&mut` ends with this statement.
        let bytes = unsafe { (*raw).bytes_mut() };
        let (base, len) = (bytes.as_mut_ptr(), bytes.len());
        Arc::new(CallerRegion { mem: Mutex::new(Some(RawMemory(raw))), base, len, claimed: Mutex::new(Vec::new()) })
    }

    /// Bytes of memory.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the memory has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Claims `range` for one tensor, if it fits and no other claim overlaps it. The claim
    /// ends when it is dropped (when the tensor holding it drops).
    pub fn claim(self: &Arc<Self>, range: Range<usize>) -> Result<Claim, ClaimError> {
        if range.start > range.end || range.end > self.len {
            return Err(ClaimError::TooSmall { start: range.start, end: range.end, len: self.len });
        }
        let mut claimed = self.claimed.lock().unwrap_or_else(|p| p.into_inner());
        let overlaps =
            |o: &&Range<usize>| !range.is_empty() && !o.is_empty() && o.start < range.end && range.start < o.end;
        if let Some(o) = claimed.iter().find(overlaps) {
            return Err(ClaimError::Overlap {
                start: range.start,
                end: range.end,
                other_start: o.start,
                other_end: o.end,
            });
        }
        claimed.push(range.clone());
        Ok(Claim {
            region: Arc::clone(self),
            range,
            handed_out: AtomicBool::new(false),
            filled: Mutex::new(Vec::new()),
            written: AtomicBool::new(false),
        })
    }

    /// The memory, back to its owner, once no claim is left (no tensor placed in it is
    /// alive); else the region again.
    pub fn into_inner(self: Arc<Self>) -> Result<Box<dyn Any + Send + Sync>, Arc<Self>> {
        let region = Arc::try_unwrap(self)?;
        let mem = region.mem.lock().unwrap_or_else(|p| p.into_inner()).take();
        // Set at construction and taken only here, from the one owner left.
        Ok(mem.map_or_else(|| Box::new(()) as Box<dyn Any + Send + Sync>, |m| m.into_box().into_any()))
    }
}

impl Drop for CallerRegion {
    fn drop(&mut self) {
        if let Some(m) = self.mem.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            drop(m.into_box());
        }
    }
}

/// One tensor's range of caller memory.
#[derive(Debug)]
pub struct Claim {
    region: Arc<CallerRegion>,
    range: Range<usize>,
    handed_out: AtomicBool,
    /// Sub-ranges written by reads (relative to the claim).
    filled: Mutex<Vec<Range<usize>>>,
    written: AtomicBool,
}

impl Claim {
    /// Bytes claimed.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// Whether the claim has no bytes.
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// The claim's first byte (in the region: the range was checked when claimed).
    fn start(&self) -> *mut u8 {
        self.region.base.wrapping_add(self.range.start)
    }

    /// The claim's offset in its region.
    pub fn offset(&self) -> usize {
        self.range.start
    }

    /// The claim cut into chunks of `chunk` bytes for reads, once: later calls (and calls
    /// after [`write`](Self::write)) return nothing, so no byte is writable twice at once.
    pub fn take_chunks(self: &Arc<Self>, chunk: usize) -> Vec<CallerChunk> {
        if self.written.load(Ordering::Acquire) || self.handed_out.swap(true, Ordering::AcqRel) {
            return Vec::new();
        }
        let chunk = chunk.max(1);
        (0..self.len().div_ceil(chunk))
            .map(|i| CallerChunk { claim: Arc::clone(self), range: i * chunk..((i + 1) * chunk).min(self.len()) })
            .collect()
    }

    /// Hands a read's chunk back: its bytes are written.
    pub fn complete(&self, chunk: CallerChunk) {
        if std::ptr::eq(Arc::as_ptr(&chunk.claim), self) {
            self.filled.lock().unwrap_or_else(|p| p.into_inner()).push(chunk.range.clone());
        }
    }

    /// Writes the whole claim at once with `f` (a gather, a conversion), unless chunks were
    /// handed out to reads; `false` if they were.
    pub fn write(&self, f: impl FnOnce(&mut [u8])) -> bool {
        if self.handed_out.swap(true, Ordering::AcqRel) {
            return false;
        }
        // SAFETY: the range was checked against the region when claimed, no other claim
        // overlaps it, and no chunk of it was handed out (checked just now, and never after):
        // these bytes are reachable through this call alone.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.start(), self.len()) };
        f(bytes);
        self.written.store(true, Ordering::Release);
        true
    }

    /// The claim's bytes, once every one of them has been written; `None` before.
    pub fn get(&self) -> Option<&[u8]> {
        let start = self.addr()?;
        // SAFETY: every byte of the claim was written (`addr`), by completed chunks (whose
        // writers have handed them back) or by `write`; nothing writes it any more, and it
        // lies in the region, which this claim keeps alive.
        Some(unsafe { std::slice::from_raw_parts(start, self.len()) })
    }

    /// The address of the claim's bytes, once every one of them has been written (`None`
    /// before), for a consumer handed the memory itself ([`copy_out`](Self::copy_out)
    /// copies it): nothing here reads them.
    pub fn addr(&self) -> Option<*const u8> {
        if !self.written.load(Ordering::Acquire) {
            let mut filled = self.filled.lock().unwrap_or_else(|p| p.into_inner());
            filled.sort_by_key(|r| r.start);
            let covered = filled.iter().try_fold(0, |at, r| (r.start == at).then_some(r.end));
            if covered != Some(self.len()) && !self.is_empty() {
                return None;
            }
            self.written.store(true, Ordering::Release);
        }
        Some(self.start().cast_const())
    }

    /// Copies the claim's bytes into `dst` (of the same length) by the kernel
    /// ([`crate::copy_by_kernel`]), not through a reference: memory the caller writes
    /// meanwhile is copied as it is, torn by such a write but with no data race. On failure,
    /// the bytes copied before it and the error (`InvalidInput` with none copied where not
    /// every byte has been written yet, or `dst` is not the claim's length).
    pub fn copy_out(&self, dst: &mut [u8]) -> Result<(), (usize, std::io::Error)> {
        let Some(addr) = self.addr().filter(|_| dst.len() == self.len()) else {
            let e = std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a written claim of the buffer's length");
            return Err((0, e));
        };
        // SAFETY: the claim's bytes lie in its region, which the claim keeps alive through
        // the call; all have been written, so no writer of ours holds them, and `dst` is the
        // caller's own `&mut` (a caller's region is lent to us, not handed back as `&mut`).
        unsafe { crate::copy_by_kernel(addr, dst) }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut claimed = self.region.claimed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = claimed.iter().position(|r| *r == self.range) {
            claimed.swap_remove(i);
        }
    }
}

/// A part of a claim that one read fills.
#[derive(Debug)]
pub struct CallerChunk {
    claim: Arc<Claim>,
    range: Range<usize>,
}

// SAFETY: chunks of a claim are disjoint and each is handed out once (`take_chunks`); the
// bytes lie in the region, which the chunk keeps alive through its claim, at a fixed address.
unsafe impl IoBufMut for CallerChunk {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        // The chunk's range lies within its claim, which lies within the region.
        self.claim.start().wrapping_add(self.range.start)
    }
    fn capacity(&self) -> usize {
        self.range.len()
    }
}

/// A buffer a host load reads into: its own arena's chunk, or a chunk of caller memory.
#[derive(Debug)]
pub enum HostChunk {
    /// A chunk of an arena.
    Arena(crate::ArenaChunk),
    /// A chunk of a caller's claim.
    Caller(CallerChunk),
}

// SAFETY: delegates to the two kinds, each of which upholds the contract.
unsafe impl IoBufMut for HostChunk {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        match self {
            HostChunk::Arena(c) => c.stable_mut_ptr(),
            HostChunk::Caller(c) => c.stable_mut_ptr(),
        }
    }
    fn capacity(&self) -> usize {
        match self {
            HostChunk::Arena(c) => c.capacity(),
            HostChunk::Caller(c) => c.capacity(),
        }
    }
    fn fixed_slot(&self) -> Option<u16> {
        match self {
            HostChunk::Arena(c) => c.fixed_slot(),
            HostChunk::Caller(c) => c.fixed_slot(),
        }
    }
    fn ready_for_cpu_writes(&mut self) -> bool {
        match self {
            HostChunk::Arena(c) => c.ready_for_cpu_writes(),
            HostChunk::Caller(c) => c.ready_for_cpu_writes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_disjoint_and_in_bounds() {
        let r = CallerRegion::new(vec![0u8; 100]);
        let a = r.claim(0..40).unwrap();
        assert_eq!(
            r.claim(30..50).unwrap_err(),
            ClaimError::Overlap { start: 30, end: 50, other_start: 0, other_end: 40 }
        );
        assert!(matches!(r.claim(90..101), Err(ClaimError::TooSmall { .. })));
        let b = r.claim(40..100).unwrap();
        // Empty claims overlap nothing.
        let _e = r.claim(10..10).unwrap();
        drop(a);
        let _c = r.claim(0..40).unwrap();
        drop(b);
    }

    #[test]
    fn bytes_are_readable_only_once_written_and_the_owner_gets_them_back() {
        let r = CallerRegion::new(vec![0u8; 64]);
        let c = Arc::new(r.claim(8..40).unwrap());
        let chunks = c.take_chunks(10);
        assert_eq!(chunks.len(), 4);
        assert!(c.take_chunks(10).is_empty());
        assert!(!c.write(|_| ()), "chunks were handed out");
        let mut chunks = chunks.into_iter();
        let mut first = chunks.next().unwrap();
        // SAFETY: the chunk's 10 bytes are writable.
        unsafe { std::ptr::write_bytes(first.stable_mut_ptr(), 7, first.capacity()) };
        c.complete(first);
        assert!(c.get().is_none(), "three chunks are still out");
        for mut ch in chunks {
            // SAFETY: as above.
            unsafe { std::ptr::write_bytes(ch.stable_mut_ptr(), 7, ch.capacity()) };
            c.complete(ch);
        }
        assert_eq!(c.get().unwrap(), &[7u8; 32][..]);
        let w = r.claim(40..48).unwrap();
        assert!(w.write(|b| b.fill(9)));
        assert_eq!(w.get().unwrap(), &[9u8; 8][..]);
        let r = r.into_inner().unwrap_err();
        drop((c, w));
        let v = r.into_inner().unwrap().downcast::<Vec<u8>>().unwrap();
        assert_eq!(&v[8..40], &[7u8; 32][..]);
        assert_eq!(&v[40..48], &[9u8; 8][..]);
    }
}
