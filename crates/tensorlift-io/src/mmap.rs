//! The mmap backend: zero-copy views, and copies out of a mapping.

use crate::{IoError, OpenFile};

/// The file's mapping, created once.
pub(crate) fn map(file: &OpenFile) -> Result<&memmap2::Mmap, IoError> {
    if let Some(m) = file.map.get() {
        return Ok(m);
    }
    // SAFETY: the mapping is read-only and private to this process. Its bytes can change if
    // another process writes the file, which changes data but not memory safety for u8
    // reads; truncation is checked by callers against the current length (see copy_out).
    let m = unsafe { memmap2::MmapOptions::new().map(file.buffered_file()) }
        .map_err(|source| IoError::Map { file: file.path().to_path_buf(), source })?;
    let _ = m.advise(memmap2::Advice::Sequential);
    Ok(file.map.get_or_init(|| m))
}

/// Copies `len` bytes at `offset` out of the mapping into `dst`.
pub(crate) fn copy_out(file: &OpenFile, offset: u64, dst: *mut u8, len: usize) -> Result<(), IoError> {
    let m = map(file)?;
    let eof = |at| IoError::UnexpectedEof { file: file.path().to_path_buf(), offset, len: len as u64, at };
    let end = offset.checked_add(len as u64).ok_or_else(|| eof(m.len() as u64))?;
    if end > m.len() as u64 {
        return Err(eof(m.len() as u64));
    }
    // A file truncated after it was mapped would fault on access: check it is still long enough.
    let now = file.current_len().map_err(|source| IoError::Read {
        file: file.path().to_path_buf(),
        offset,
        len: len as u64,
        source,
    })?;
    if end > now {
        return Err(eof(now));
    }
    // SAFETY: offset < end <= the mapping's length, so the pointer stays inside it.
    let src = unsafe { m.as_ptr().add(offset as usize) };
    // SAFETY: [offset, end) lies inside the mapping, dst points to len writable bytes owned by
    // the caller's buffer, and a private mapping never overlaps a caller's buffer.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
    Ok(())
}
