//! Memory maps, without a SIGBUS reachable from safe code.
//!
//! Touching a mapped page whose file was truncated, or whose read fails in the file system
//! (EIO from FUSE or a network file system), raises SIGBUS and kills the process. So:
//! - copies out of a mapping ([`MappedFile::copy_to`]) go through `process_vm_readv` on this
//!   process, which turns such a fault into an `EFAULT` error;
//! - zero-copy views ([`MappedFile::view`]) need a [`MapContract`], which only an `unsafe`
//!   call creates: the caller promises what the kernel cannot check;
//! - a [`DmaWindow`] is a read-only mapping that the CPU never reads: it only gives its
//!   addresses, for a device to register and read by DMA (`tensorlift-cuda`).

use std::io;
use std::path::{Path, PathBuf};

use crate::{IoError, OpenFile};

/// The caller's promise that makes zero-copy views of mapped files sound.
///
/// Created only by the `unsafe` [`MapContract::new`]; see its `# Safety` section.
#[derive(Debug, Clone, Copy)]
pub struct MapContract(());

impl MapContract {
    /// Accepts the contract of memory-mapped views.
    ///
    /// # Safety
    ///
    /// While any view of a file mapped under this contract is alive (a slice from
    /// [`MappedFile::view`], or a tensor that holds one):
    /// - the file is not truncated or shrunk, by this process or any other: an access past the
    ///   new end raises SIGBUS;
    /// - the file is not written: a view's bytes would change while borrowed;
    /// - the file system does not fail reads of it (a FUSE or network file system returning
    ///   EIO raises SIGBUS on access).
    pub unsafe fn new() -> MapContract {
        MapContract(())
    }
}

/// A file's bytes, mapped private to this process (copy on write): tensorlift only reads
/// them, and a consumer that writes through a view (torch, in place) writes its own copy of
/// the page, never the file, as with the reference `safetensors`' maps.
///
/// Held as a raw mapping: nothing here makes a reference to its bytes (not even for
/// `Debug`) except [`view`](MappedFile::view), under the caller's contract.
#[derive(Debug)]
pub struct MappedFile {
    map: memmap2::MmapRaw,
    path: PathBuf,
}

impl MappedFile {
    /// Maps `file` whole. Mapping touches no page: it cannot fault.
    pub fn map(file: &OpenFile) -> Result<MappedFile, IoError> {
        let map_err = |source| IoError::Map { file: file.path().to_path_buf(), source };
        let len = usize::try_from(file.len()).map_err(|e| map_err(io::Error::other(e)))?;
        // SAFETY: a private (copy-on-write) mapping of `len` bytes of a file we hold open.
        // Creating it touches no page; every access of ours goes through `copy_to` (which
        // cannot fault) or through `view`, which requires the caller's MapContract; writes
        // by a consumer land in private copies of pages, never in the file.
        let map = unsafe { memmap2::MmapOptions::new().len(len).map_copy(file.file()) }.map_err(map_err)?;
        let map = memmap2::MmapRaw::from(map);
        let _ = map.advise(memmap2::Advice::Sequential);
        Ok(MappedFile { map, path: file.path().to_path_buf() })
    }

    /// Length of the mapping.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The file it maps.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Copies `dst.len()` bytes at `offset` out of the mapping. A page that cannot be read
    /// (the file was truncated, or the file system failed) is an error, never a SIGBUS.
    pub fn copy_to(&self, offset: u64, dst: &mut [u8]) -> Result<(), IoError> {
        let len = dst.len();
        let eof = |at| IoError::UnexpectedEof { file: self.path.clone(), offset, len: len as u64, at };
        let end = offset.checked_add(len as u64).ok_or_else(|| eof(self.map.len() as u64))?;
        if end > self.map.len() as u64 {
            return Err(eof(self.map.len() as u64));
        }
        self.copy_out(offset as usize, dst).map_err(|(done, source)| {
            let (at, len) = (offset + done as u64, (len - done) as u64);
            IoError::Read { file: self.path.clone(), offset: at, len, source }
        })
    }

    /// [`copy_to`](Self::copy_to) as [`copy_by_kernel`] reports it: on failure, the bytes
    /// copied before it and the error (`InvalidInput` with none copied for a range past the
    /// mapping).
    pub fn copy_out(&self, offset: usize, dst: &mut [u8]) -> Result<(), (usize, io::Error)> {
        if offset.checked_add(dst.len()).is_none_or(|end| end > self.map.len()) {
            return Err((0, io::Error::new(io::ErrorKind::InvalidInput, "past the end of the mapping")));
        }
        // A raw pointer, never a slice of the map: a reference to pages that may have been
        // truncated away would let the compiler assume they can be read.
        // SAFETY: the range lies in this mapping, which `self` keeps mapped through the call;
        // the mapping is read-only and no `&mut` to it is ever made, and `dst` is the caller's
        // own `&mut`, so not this memory. Pages the file no longer backs are an error.
        unsafe { copy_by_kernel(self.map.as_ptr().wrapping_add(offset), dst) }
    }

    /// The address of the byte at `offset` (within the mapping), for a consumer handed the
    /// mapped memory itself: nothing here reads it.
    pub fn addr(&self, offset: usize) -> Option<*const u8> {
        (offset <= self.map.len()).then(|| self.map.as_ptr().wrapping_add(offset))
    }

    /// The mapped bytes, without a copy, under the caller's [`MapContract`].
    pub fn view(&self, contract: MapContract) -> &[u8] {
        self.view_range(contract, 0..self.map.len()).unwrap_or_default()
    }

    /// The mapped bytes of `range` (`None` past the mapping), without a copy, under the
    /// caller's [`MapContract`]: a reference to those bytes alone.
    pub fn view_range(&self, _contract: MapContract, range: std::ops::Range<usize>) -> Option<&[u8]> {
        if range.start > range.end || range.end > self.map.len() {
            return None;
        }
        // SAFETY: the range lies in the mapping, which lives as long as self; the caller's
        // MapContract promises that the file is neither cut short nor written, and that its
        // file system does not fail, while the view lives, so every byte can be read and the
        // file does not change them. (Pages of the mapping lent writable to a consumer, as
        // the Python binding lends them, are that lender's to keep from a view.)
        Some(unsafe { std::slice::from_raw_parts(self.map.as_ptr().wrapping_add(range.start), range.len()) })
    }
}

/// Copies `dst.len()` bytes from `src`, an address in this process, with the kernel:
/// `process_vm_readv` on this process, or, where a sandbox's seccomp filter refuses that
/// call (`EPERM`, `ENOSYS`), `pread` of `/proc/thread-self/mem` (else `/proc/self/mem`). The bytes are never read through a
/// reference, so
/// - a page that cannot be read (a mapped file cut short, or its file system failing) is an
///   error, never a SIGBUS;
/// - memory that a consumer may write meanwhile (host memory lent to one writable, as the
///   Python binding lends tensors to torch and numpy) is copied as it is at that moment, its
///   bytes torn by such a write, but it is no data race of this process's Rust code.
///
/// An address that is not this process's memory is an error too. On failure: the bytes
/// copied before it, and the error; `EPERM` or `ENOSYS` with none copied where the process
/// may use neither way.
///
/// The owners of such memory copy it out safely: [`MappedFile::copy_to`],
/// [`HostArena::copy_out`](crate::HostArena::copy_out),
/// [`AlignedBuf::copy_out`](crate::AlignedBuf::copy_out),
/// [`Claim::copy_out`](crate::Claim::copy_out).
///
/// # Safety
/// Each page of `src..src + dst.len()` is either mapped by nothing (an error) or host
/// memory that the caller may read (its own, or memory lent to it) and that no `&mut`
/// reference covers meanwhile (`dst` included). Its pages need not be readable: a page
/// that cannot be read is an error. (`/proc`'s `mem` reads even pages mapped without read permission, and a device's
/// memory mapped into the process through its driver: such memory is never the caller's to
/// read this way.)
pub unsafe fn copy_by_kernel(src: *const u8, dst: &mut [u8]) -> Result<(), (usize, io::Error)> {
    match copy_by_process_vm_readv(src, dst) {
        Err((0, e)) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOSYS)) => {
            copy_by_proc_self_mem(src, dst).map_err(|(done, other)| match done {
                // Neither way: the first refusal says why.
                0 if other.kind() == io::ErrorKind::NotFound || other.raw_os_error() == Some(libc::EACCES) => (0, e),
                _ => (done, other),
            })
        }
        r => r,
    }
}

/// What a page that cannot be read gives.
fn unreadable() -> io::Error {
    io::Error::other("a page could not be read (a mapped file cut short, a failing file system, or no memory there)")
}

fn copy_by_process_vm_readv(src: *const u8, dst: &mut [u8]) -> Result<(), (usize, io::Error)> {
    let len = dst.len();
    let mut done = 0usize;
    while done < len {
        let n = (len - done).min(1 << 30);
        let local = libc::iovec { iov_base: dst[done..].as_mut_ptr().cast(), iov_len: n };
        // The remote side is this process's own memory; the kernel reads it with fault
        // handling, so a page it cannot bring in is EFAULT here.
        let remote = libc::iovec { iov_base: src.wrapping_add(done).cast_mut().cast(), iov_len: n };
        let pid = std::process::id() as libc::pid_t;
        // SAFETY: `local` covers n writable bytes of `dst`; the kernel only reads `remote` (an
        // address it checks, reporting a fault as EFAULT) and writes `local`.
        let rc = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        if rc <= 0 {
            let source =
                if rc == 0 { io::Error::from(io::ErrorKind::UnexpectedEof) } else { io::Error::last_os_error() };
            return Err((done, if source.raw_os_error() == Some(libc::EFAULT) { unreadable() } else { source }));
        }
        done += rc as usize;
    }
    Ok(())
}

/// The same copy through `/proc/thread-self/mem` (`/proc/self/mem` before Linux 3.17: that
/// names the main thread, which has no memory to read once it has exited), opened for this
/// call (a descriptor kept across a `fork` would read the parent's memory): a page that
/// cannot be read is `EIO` there.
fn copy_by_proc_self_mem(src: *const u8, dst: &mut [u8]) -> Result<(), (usize, io::Error)> {
    use std::os::unix::fs::FileExt;
    let mem = match std::fs::File::open("/proc/thread-self/mem") {
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::File::open("/proc/self/mem"),
        r => r,
    };
    let mem = mem.map_err(|e| (0, e))?;
    let len = dst.len();
    let mut done = 0usize;
    while done < len {
        // Addresses are file offsets here; one past 2^63 - 1 is none of this process's.
        let at = (src as u64).checked_add(done as u64).filter(|&a| a <= i64::MAX as u64);
        let Some(at) = at else { return Err((done, unreadable())) };
        let n = (len - done).min(1 << 30);
        match mem.read_at(&mut dst[done..done + n], at) {
            Ok(0) => return Err((done, unreadable())),
            Ok(k) => done += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EIO | libc::EFAULT)) => return Err((done, unreadable())),
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

/// A range of a file mapped shared and read-only, which no code of the CPU reads: it only
/// gives its addresses, so that a device can pin the file's pages (registered read-only with
/// CUDA) and copy them by DMA straight from the page cache, with no CPU copy.
///
/// Pinning keeps the pages for as long as they are registered: a file written meanwhile
/// changes what the device reads (a truncated one leaves it the stale pages it pinned), never
/// the safety of the process; the loader checks each file is unchanged after its copies, as
/// it does after its reads.
#[derive(Debug)]
pub struct DmaWindow {
    /// Raw: nothing makes a reference to its bytes, not even `Debug`.
    map: memmap2::MmapRaw,
    /// Where the range asked for starts in the mapping (which starts on a page).
    skip: usize,
    len: usize,
    /// The kernel's page size.
    page: usize,
    /// Whether the kernel shows this process which of the file's pages are cached (see
    /// [`resident`](Self::resident)).
    residency_visible: bool,
}

impl DmaWindow {
    /// Maps `len` bytes of `file` at `offset` (within its length). Mapping touches no page.
    pub fn map(file: &OpenFile, offset: u64, len: usize) -> Result<DmaWindow, IoError> {
        let map_err = |source| IoError::Map { file: file.path().to_path_buf(), source };
        let end = offset.checked_add(len as u64).filter(|&e| e <= file.len() && len > 0);
        if end.is_none() {
            return Err(map_err(io::Error::from(io::ErrorKind::InvalidInput)));
        }
        let page = crate::cache::page_size() as u64;
        let start = offset - offset % page;
        let skip = (offset - start) as usize;
        // SAFETY: a shared read-only mapping of bytes inside the file. Nothing ever reads it
        // through a reference: `DmaWindow` hands out addresses only, and a device reads them
        // after pinning the pages, so a truncated file cannot raise SIGBUS in this process.
        let map =
            unsafe { memmap2::MmapOptions::new().offset(start).len(skip + len).map(file.file()) }.map_err(map_err)?;
        let map = memmap2::MmapRaw::from(map);
        Ok(DmaWindow { map, skip, len, page: page as usize, residency_visible: file.residency_visible() })
    }

    /// The whole pages the range lies in: their start (page-aligned) and length, what a
    /// registration pins. Never to be read by the CPU.
    pub fn pages(&self) -> (*const u8, usize) {
        (self.map.as_ptr(), (self.skip + self.len).next_multiple_of(self.page))
    }

    /// The address of the range's first byte. Never to be read by the CPU.
    pub fn start(&self) -> *const u8 {
        self.map.as_ptr().wrapping_add(self.skip)
    }

    /// The range's length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether every page of the range is in the page cache now (`mincore`, which touches
    /// no page): a device pinning a page that is not would read it from the file first, one
    /// fault at a time. An error where the kernel does not say: for a file this process
    /// neither owns nor may write, `mincore` reports every page cached (since Linux 5.0, so
    /// as not to leak another user's accesses), which would be a lie here.
    pub fn resident(&self) -> io::Result<bool> {
        if !self.residency_visible {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the kernel hides which pages of a file this process neither owns nor may write are cached",
            ));
        }
        let (base, len) = self.pages();
        let pages = len.div_ceil(self.page);
        let mut vec = Vec::new();
        vec.try_reserve_exact(pages).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        vec.resize(pages, 0u8);
        // SAFETY: [base, base + len) is the live mapping this value owns, and vec has a byte
        // for each of its pages; mincore only looks at the page tables.
        let rc = unsafe { libc::mincore(base.cast_mut().cast(), len, vec.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(vec.iter().all(|&b| b & 1 == 1))
    }

    /// Whether the range is empty (never: an empty range is not mapped).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
