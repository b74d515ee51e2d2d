//! Page-cache control for cold and warm measurements: no root needed.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Drops a file's clean pages from the page cache (`posix_fadvise(POSIX_FADV_DONTNEED)`),
/// after flushing dirty ones, so the next read comes from the storage device.
pub fn evict(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    f.sync_data()?;
    // SAFETY: advice on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Fraction of a file's pages resident in the page cache (0.0 to 1.0), from `mincore`.
pub fn resident_fraction(path: &Path) -> io::Result<f64> {
    resident_fraction_of(&File::open(path)?)
}

/// [`resident_fraction`] of an open file. `mincore` never touches the mapped pages, so a
/// file truncated meanwhile cannot fault here.
pub fn resident_fraction_of(f: &File) -> io::Result<f64> {
    let len = usize::try_from(f.metadata()?.len()).map_err(io::Error::other)?;
    if len == 0 {
        return Ok(1.0);
    }
    // SAFETY: a read-only private mapping of a file we hold open; only mincore looks at it.
    let map = unsafe { memmap2::MmapOptions::new().len(len).map(f) }?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
    let pages = len.div_ceil(page);
    let mut vec = Vec::new();
    vec.try_reserve_exact(pages).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
    vec.resize(pages, 0u8);
    // SAFETY: the range is the whole live mapping, and vec has one byte per page of it.
    let rc = unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, len, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec.iter().filter(|&&b| b & 1 == 1).count() as f64 / pages as f64)
}

/// Bytes available to an unprivileged user on the file system holding `path` (statvfs).
pub fn free_space(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statvfs is plain data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and st a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}
