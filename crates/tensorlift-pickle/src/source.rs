//! Random-access reads, so that a multi-gigabyte checkpoint is never read whole.

use std::io;

/// Bytes that can be read at any offset: a file, or a slice in tests and fuzzing.
pub trait ReadAt {
    /// Total length in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; an error (`UnexpectedEof`) where the source ends first.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn size(&self) -> io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).ok().filter(|&s| s <= <[u8]>::len(self));
        match start.and_then(|s| self.get(s..s.checked_add(buf.len())?)) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end")),
        }
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

/// `len` bytes at `offset` in a vector of their own, allocated fallibly (the length comes
/// from the file, checked against the source's length first).
pub(crate) fn read_vec<R: ReadAt + ?Sized>(src: &R, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let total = src.size()?;
    if offset.checked_add(len).is_none_or(|end| end > total) {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{len} bytes at {offset} run past the end of the {total}-byte file"),
        ));
    }
    let n = usize::try_from(len).map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, "too large"))?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, format!("{n} bytes")))?;
    v.resize(n, 0);
    src.read_exact_at(&mut v, offset)?;
    Ok(v)
}
