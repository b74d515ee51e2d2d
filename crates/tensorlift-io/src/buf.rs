//! Buffers that reads borrow by ownership.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// Memory a read may write into while it owns the value.
///
/// A read takes the buffer by value and hands it back with the result, so nobody can
/// touch the memory while the kernel writes it. If the caller stops waiting (drops the
/// future), the buffer stays with the I/O worker until the kernel has completed the read.
///
/// # Safety
///
/// Implementors guarantee that [`stable_mut_ptr`](IoBufMut::stable_mut_ptr) returns a
/// pointer to [`capacity`](IoBufMut::capacity) bytes that are valid for writes, that those
/// bytes do not move for as long as the value exists (moving the value itself must not move
/// them: heap storage, a mapping, pinned memory), and that no other code reads or writes
/// them while the value is lent to a read. If [`fixed_slot`](IoBufMut::fixed_slot) returns
/// `Some(i)`, the bytes must lie inside region `i` of the regions registered with
/// [`Reader::register_buffers`](crate::Reader::register_buffers).
pub unsafe trait IoBufMut: Send + 'static {
    /// Start of the writable bytes.
    fn stable_mut_ptr(&mut self) -> *mut u8;
    /// Number of writable bytes.
    fn capacity(&self) -> usize;
    /// The io_uring fixed-buffer slot covering these bytes, if registered.
    fn fixed_slot(&self) -> Option<u16> {
        None
    }
}

// SAFETY: a Vec's heap storage does not move when the Vec is moved, and the read owns it.
unsafe impl IoBufMut for Vec<u8> {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
    fn capacity(&self) -> usize {
        self.len()
    }
}

// SAFETY: as for Vec: boxed storage stays put while the box moves.
unsafe impl IoBufMut for Box<[u8]> {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
    fn capacity(&self) -> usize {
        self.len()
    }
}

/// A zero-filled heap buffer aligned for direct I/O (a page, by default).
///
/// Large buffers come from the allocator's `mmap` path, so their pages cost nothing until
/// a read fills them.
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    align: usize,
}

// SAFETY: AlignedBuf uniquely owns its allocation, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads of initialised bytes.
unsafe impl Sync for AlignedBuf {}

/// Alignment suited to O_DIRECT on every common file system.
pub const PAGE: usize = 4096;

impl AlignedBuf {
    /// `len` zero bytes aligned to `align` (a power of two). `None` if the layout is
    /// invalid or the allocation fails: the caller decides, nothing aborts.
    pub fn zeroed(len: usize, align: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(1), align).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        Some(Self { ptr: NonNull::new(ptr)?, len, align })
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to len initialised (zeroed, then written) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `zeroed` built this same layout with from_size_align, which checked it.
        let layout = unsafe { Layout::from_size_align_unchecked(self.len.max(1), self.align) };
        // SAFETY: allocated in `zeroed` with exactly this layout, and freed only here.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

// SAFETY: the allocation is owned by the value and never moves while it lives.
unsafe impl IoBufMut for AlignedBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn capacity(&self) -> usize {
        self.len
    }
}
