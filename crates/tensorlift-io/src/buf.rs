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
/// them while the value is lent to a read. [`fixed_slot`](IoBufMut::fixed_slot) is a hint:
/// a reader reads into the bytes as fixed buffer `i` only where they lie inside region `i`
/// of the regions it registered ([`Reader::register_buffers`](crate::Reader::register_buffers)),
/// and as any other buffer elsewhere.
pub unsafe trait IoBufMut: Send + 'static {
    /// Start of the writable bytes.
    fn stable_mut_ptr(&mut self) -> *mut u8;
    /// Number of writable bytes.
    fn capacity(&self) -> usize;
    /// The io_uring fixed-buffer slot covering these bytes, if registered (checked by the
    /// reader against what it registered).
    fn fixed_slot(&self) -> Option<u16> {
        None
    }
    /// Readies the bytes for writes by this process's own code (a remote read copies into
    /// them), not only by the kernel's: `false` where they cannot be (an arena chunk filled
    /// by copies whose pages the kernel could not make present, where such a write would
    /// wait forever), and then no such write may be made.
    fn ready_for_cpu_writes(&mut self) -> bool {
        true
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

// (No impl for `Box<[u8]>`: moving a `Box` into the read's completion asserts that it is the
// only way to its bytes, which the kernel's writes through the pointer taken before would
// contradict under Rust's aliasing rules. A `Vec`'s pointer makes no such claim.)

/// A zero-filled buffer aligned for direct I/O (a page, by default).
///
/// Buffers of [`MAP_THRESHOLD`] bytes or more are anonymous memory maps: the kernel supplies
/// zero pages lazily, so creating one touches no memory (the allocator's `alloc_zeroed` would
/// write zeros over every page of an over-aligned block first), and those of 2 MiB or more
/// are 2 MiB-aligned and advised to use transparent huge pages, so filling them takes one
/// page fault per 2 MiB instead of one per 4 KiB.
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    storage: Storage,
}

#[derive(Debug, Clone, Copy)]
enum Storage {
    Heap { align: usize },
    Mapped { map_len: usize, map_start: NonNull<u8> },
}

// SAFETY: AlignedBuf uniquely owns its allocation, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads of initialised bytes.
unsafe impl Sync for AlignedBuf {}

/// Alignment suited to O_DIRECT on every common file system.
pub const PAGE: usize = 4096;
/// Buffers at least this large are memory maps rather than heap blocks.
pub const MAP_THRESHOLD: usize = 256 << 10;
const HUGE: usize = 2 << 20;

impl AlignedBuf {
    /// `len` zero bytes aligned to `align` (a power of two). `None` if the layout is
    /// invalid or the allocation fails: the caller decides, nothing aborts.
    pub fn zeroed(len: usize, align: usize) -> Option<Self> {
        Self::zeroed_pages(len, align, true)
    }

    /// [`zeroed`](Self::zeroed), asking for transparent huge pages (`huge`) for a large
    /// mapping or not: which faults in faster depends on the machine's memory state (see
    /// [`page_probe`](crate::page_probe)).
    pub fn zeroed_pages(len: usize, align: usize, huge: bool) -> Option<Self> {
        if !align.is_power_of_two() {
            return None;
        }
        if len >= MAP_THRESHOLD && align <= HUGE {
            return Self::mapped(len, if len >= HUGE { HUGE } else { align.max(PAGE) }, huge);
        }
        let layout = Layout::from_size_align(len.max(1), align).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        Some(Self { ptr: NonNull::new(ptr)?, len, storage: Storage::Heap { align } })
    }

    fn mapped(len: usize, align: usize, huge: bool) -> Option<Self> {
        // Map `align` extra bytes so that an aligned start lies inside; the slack stays
        // mapped (never touched, so it costs no memory) and is unmapped with the rest.
        let map_len = len.checked_add(align)?.checked_next_multiple_of(PAGE)?;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        let map_start = NonNull::new(p.cast::<u8>())?;
        let skip = (align - (p as usize) % align) % align;
        // SAFETY: skip < align, and the mapping is len + align bytes long.
        let ptr = unsafe { map_start.add(skip) };
        if huge && align >= HUGE {
            // Advice only: failure (THP disabled) leaves ordinary pages.
            // SAFETY: the range lies inside our mapping and madvise changes no contents.
            unsafe { libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
        }
        Some(Self { ptr, len, storage: Storage::Mapped { map_len, map_start } })
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is an anonymous map of its own (not a heap block).
    pub(crate) fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address of the bytes, for a consumer handed the memory itself
    /// ([`copy_out`](Self::copy_out) copies it): nothing here reads them.
    pub fn addr(&self) -> *const u8 {
        self.ptr.as_ptr().cast_const()
    }

    /// Copies the first `dst.len()` bytes into `dst` by the kernel ([`crate::copy_by_kernel`]),
    /// not through a reference: memory lent to a consumer that writes it is copied as it is,
    /// torn by such a write but with no data race. On failure, the bytes copied before it
    /// and the error (`InvalidInput` with none copied where `dst` is longer than the buffer).
    pub fn copy_out(&self, dst: &mut [u8]) -> Result<(), (usize, std::io::Error)> {
        if dst.len() > self.len {
            return Err((0, std::io::Error::new(std::io::ErrorKind::InvalidInput, "longer than the buffer")));
        }
        // SAFETY: the first dst.len() bytes are this buffer's, which `self` keeps allocated
        // through the call; `&self` rules out a `&mut` to them from `as_mut_slice`, and `dst`
        // is the caller's own `&mut`, not this memory.
        unsafe { crate::copy_by_kernel(self.addr(), dst) }
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
        match self.storage {
            Storage::Heap { align } => {
                // SAFETY: `zeroed` built this same layout with from_size_align, which checked it.
                let layout = unsafe { Layout::from_size_align_unchecked(self.len.max(1), align) };
                // SAFETY: allocated in `zeroed` with exactly this layout, and freed only here.
                unsafe { dealloc(self.ptr.as_ptr(), layout) }
            }
            Storage::Mapped { map_len, map_start } => {
                // SAFETY: unmaps exactly the mapping made in `mapped`, once.
                unsafe { libc::munmap(map_start.as_ptr().cast(), map_len) };
            }
        }
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
