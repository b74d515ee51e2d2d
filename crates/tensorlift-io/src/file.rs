//! An open shard: a buffered descriptor, and a direct (O_DIRECT) one where the file system allows.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::IoError;

/// Direct-I/O alignment of a file: offsets and lengths must be multiples of `offset`, and
/// memory addresses multiples of `memory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DioAlign {
    /// Required alignment of memory addresses.
    pub memory: u32,
    /// Required alignment of file offsets and lengths.
    pub offset: u32,
}

impl DioAlign {
    /// What to assume when the kernel cannot say (statx without STATX_DIOALIGN).
    pub const UNKNOWN: DioAlign = DioAlign { memory: 4096, offset: 4096 };
}

/// A file opened for reading by a [`Reader`](crate::Reader): one descriptor for buffered
/// reads and, where the file system allows, a second one with O_DIRECT for the aligned body
/// of each read. The second is opened through `/proc/self/fd` (the same open file, never a
/// new look-up of its name) and checked to be the same inode.
#[derive(Debug)]
pub struct OpenFile {
    path: PathBuf,
    buffered: Arc<File>,
    direct: Option<File>,
    direct_enabled: AtomicBool,
    buffered_reason: Mutex<Option<String>>,
    align: DioAlign,
    len: u64,
    /// The file's identity as it was opened ([`Self::identity_at_open`]).
    opened: tensorlift_format::FileIdentity,
    /// Whether the kernel shows this process which of its pages are cached, found once.
    residency_visible: OnceLock<bool>,
    /// The whole file mapped read-only, at the first copy out of it ([`Self::copy_source`]);
    /// never read through (see there).
    copy_source: OnceLock<Option<memmap2::MmapRaw>>,
}

impl OpenFile {
    /// Opens `path` (without blocking: a FIFO is refused, not waited on).
    pub(crate) fn open(path: &Path, want_direct: bool, refuse_direct: bool) -> Result<OpenFile, IoError> {
        let open_err = |source| IoError::Open { file: path.to_path_buf(), source };
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(path)
            .map_err(open_err)?;
        Self::from_file(path, Arc::new(file), want_direct, refuse_direct)
    }

    /// Reads `file`, a descriptor the caller opened (and checked); `path` names it in errors.
    pub(crate) fn from_file(
        path: &Path,
        buffered: Arc<File>,
        want_direct: bool,
        refuse_direct: bool,
    ) -> Result<OpenFile, IoError> {
        let open_err = |source| IoError::Open { file: path.to_path_buf(), source };
        let meta = buffered.metadata().map_err(open_err)?;
        if !meta.is_file() {
            let kind = kind_name(&meta);
            return Err(open_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("is a {kind}, not a regular file"),
            )));
        }
        // Opened without blocking (a FIFO would have waited for a writer), read blocking: a
        // read of a file with O_NONBLOCK on a file system that cannot read without waiting
        // (NFS, FUSE; any file before Linux 5.12) is refused by io_uring with EAGAIN, again
        // and again, rather than handed to its workers.
        set_blocking(&buffered).map_err(open_err)?;
        // SAFETY: advice only; the descriptor is open and owned by `buffered`.
        unsafe { libc::posix_fadvise(buffered.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        let (align, mut reason) = match dio_align(&buffered) {
            Ok(Some(a)) if a.offset == 0 => {
                (DioAlign::UNKNOWN, Some("the file system does not support O_DIRECT (statx)".to_owned()))
            }
            Ok(Some(a)) => (a, None),
            Ok(None) | Err(_) => (DioAlign::UNKNOWN, None),
        };
        let mut direct = None;
        if !want_direct {
            reason = Some("direct I/O not requested".into());
        } else if refuse_direct {
            reason = Some("O_DIRECT refused: Invalid argument (os error 22) (injected)".into());
        } else if reason.is_none() {
            match reopen_direct(&buffered, &meta) {
                Ok(f) => direct = Some(f),
                Err(e) => reason = Some(format!("O_DIRECT refused: {e}")),
            }
        }
        Ok(OpenFile {
            path: path.to_path_buf(),
            buffered,
            direct_enabled: AtomicBool::new(direct.is_some()),
            direct,
            buffered_reason: Mutex::new(reason),
            align,
            len: meta.len(),
            opened: file_identity(&meta),
            residency_visible: OnceLock::new(),
            copy_source: OnceLock::new(),
        })
    }

    /// Where the kernel can copy the file's cached pages from, into an arena filled by
    /// copies ([`crate::fill`]): a read-only shared mapping of the whole file as opened,
    /// made at the first call, whose address only the kernel ever reads (a page it cannot
    /// read fails the copy with EFAULT). Its start and page-rounded length; `None` for a file
    /// read with O_DIRECT (not cached: a copy would read it page by page), an empty one, or
    /// one that cannot be mapped.
    pub(crate) fn copy_source(&self) -> Option<(*const u8, usize)> {
        if self.is_direct() || self.len == 0 {
            return None;
        }
        let len = usize::try_from(self.len).ok()?;
        let map = self.copy_source.get_or_init(|| {
            // SAFETY: a shared read-only mapping of the file, which nothing in this crate
            // reads through: only its address goes to the kernel (UFFDIO_COPY), which fails
            // with EFAULT where a page cannot be read, so a file truncated meanwhile cannot
            // raise SIGBUS in this process.
            unsafe { memmap2::MmapOptions::new().len(len).map(&*self.buffered) }.ok().map(memmap2::MmapRaw::from)
        });
        map.as_ref().map(|m| (m.as_ptr(), len.next_multiple_of(crate::cache::page_size())))
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the kernel tells this process which of the file's pages are in the page
    /// cache (`mincore`): not for a file it neither owns nor may write, unless privileged.
    /// Found on the first call, then remembered.
    pub fn residency_visible(&self) -> bool {
        *self.residency_visible.get_or_init(|| crate::cache::residency_visible(&self.buffered))
    }

    /// Length when opened.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// The file's identity (device, inode, length, times) when it was opened: a read can
    /// be checked to have seen the file as it was then.
    pub fn identity_at_open(&self) -> &tensorlift_format::FileIdentity {
        &self.opened
    }

    /// Whether the file was empty when opened.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Direct-I/O alignment (the kernel's answer, or 4096 when unknown).
    pub fn dio_align(&self) -> DioAlign {
        self.align
    }

    /// Whether reads still use O_DIRECT for aligned ranges.
    pub fn is_direct(&self) -> bool {
        self.direct_enabled.load(Ordering::Relaxed)
    }

    /// Why reads of this file are buffered, if they are.
    pub fn buffered_reason(&self) -> Option<String> {
        self.buffered_reason.lock().map_or(None, |r| r.clone())
    }

    /// The length of the file now, which differs from [`len`](Self::len) if it was
    /// truncated or replaced in place since it was opened.
    pub fn current_len(&self) -> io::Result<u64> {
        Ok(self.buffered.metadata()?.len())
    }

    /// The buffered descriptor.
    pub fn file(&self) -> &File {
        &self.buffered
    }

    pub(crate) fn buffered_fd(&self) -> RawFd {
        self.buffered.as_raw_fd()
    }

    pub(crate) fn direct_fd(&self) -> Option<RawFd> {
        self.direct.as_ref().filter(|_| self.is_direct()).map(AsRawFd::as_raw_fd)
    }

    /// Called when the kernel refuses a direct read: later reads of this file are buffered.
    pub(crate) fn disable_direct(&self, why: String) {
        if self.direct_enabled.swap(false, Ordering::Relaxed) {
            tracing::debug!(file = %self.path.display(), %why, "falling back to buffered reads");
            if let Ok(mut r) = self.buffered_reason.lock() {
                *r = Some(why);
            }
        }
    }
}

/// A second descriptor of the same open file with O_DIRECT: through `/proc/self/fd`, which
/// names the open file itself rather than looking its path up again, and checked to be the
/// same inode.
fn reopen_direct(file: &File, meta: &std::fs::Metadata) -> io::Result<File> {
    use std::os::unix::fs::MetadataExt;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let m = f.metadata()?;
    if (m.dev(), m.ino()) != (meta.dev(), meta.ino()) {
        return Err(io::Error::other("/proc/self/fd did not lead back to the same file"));
    }
    set_blocking(&f)?;
    Ok(f)
}

/// Clears `O_NONBLOCK` of `file`'s open file (see [`OpenFile::from_file`]).
fn set_blocking(file: &File) -> io::Result<()> {
    // SAFETY: F_GETFL reads the flags of an open descriptor that `file` owns.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK != 0 {
        // SAFETY: F_SETFL changes the status flags of an open descriptor that `file` owns.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The file's direct-I/O alignment from statx, `None` when the kernel does not report it.
fn dio_align(file: &File) -> io::Result<Option<DioAlign>> {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open, the path is the empty C string (AT_EMPTY_PATH: the
    // descriptor itself), and stx a valid, writable statx struct.
    let rc =
        unsafe { libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return Ok(None);
    }
    Ok(Some(DioAlign { memory: stx.stx_dio_mem_align, offset: stx.stx_dio_offset_align }))
}

/// What a non-regular file is, in words.
pub(crate) fn kind_name(m: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// Whether O_DIRECT works for a path, found by doing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectSupport {
    /// The file that was tried.
    pub tried: PathBuf,
    /// Its direct-I/O alignment (statx, or 4096 when unknown).
    pub align: DioAlign,
    /// `None` if a direct read worked, else why not.
    pub refused: Option<String>,
}

/// A file's identity and state, as [`FileIdentity`](tensorlift_format::FileIdentity)
/// records them.
pub fn file_identity(m: &std::fs::Metadata) -> tensorlift_format::FileIdentity {
    use std::os::unix::fs::MetadataExt;
    tensorlift_format::FileIdentity {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        modified_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        changed_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
    }
}

/// Takes an advisory `flock(2)` lock on `file` (shared, or `exclusive`) without waiting:
/// false where another open file description holds a lock that excludes it, or where the
/// file system gives none. It lasts until `file` (every descriptor of its description) is
/// closed: a process killed while holding it lets it go. For files several processes make
/// and clean up (a cache's temporary copies, `convert`'s staging folders), so that one
/// tells a live owner's from one left behind, across PID namespaces and hosts alike.
pub fn try_lock(file: &std::fs::File, exclusive: bool) -> bool {
    use std::os::fd::AsRawFd;
    let how = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
    // SAFETY: flock on a descriptor `file` owns, open for the call; no memory is passed.
    unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nonblocking(fd: RawFd) -> bool {
        // SAFETY: F_GETFL reads the flags of a descriptor the test's OpenFile holds open.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        assert!(flags >= 0, "{}", io::Error::last_os_error());
        flags & libc::O_NONBLOCK != 0
    }

    /// Both descriptors read blocking: io_uring refuses a read of an O_NONBLOCK file on a
    /// file system that cannot read without waiting (EAGAIN), every time it is resubmitted.
    #[test]
    fn the_descriptors_read_blocking_though_opened_without_blocking() {
        // (Where /tmp is a tmpfs, which refuses O_DIRECT, only the buffered one is checked.)
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 1 << 16]).unwrap();
        for want_direct in [false, true] {
            let f = OpenFile::open(&path, want_direct, false).unwrap();
            assert!(!nonblocking(f.buffered_fd()), "buffered, want_direct {want_direct}");
            if let Some(fd) = f.direct.as_ref().map(AsRawFd::as_raw_fd) {
                assert!(!nonblocking(fd), "direct");
            }
        }
    }
}
