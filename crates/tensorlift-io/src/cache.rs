//! Page-cache control for cold and warm measurements: no root needed.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Drops a file's clean pages from the page cache (`posix_fadvise(POSIX_FADV_DONTNEED)`),
/// after flushing dirty ones, so the next read comes from the storage device. Anything but a
/// regular file is `InvalidInput` (a FIFO is not opened).
pub fn evict(path: &Path) -> io::Result<()> {
    let f = open_regular(path)?;
    f.sync_data()?;
    // SAFETY: advice on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Where the file at `path` lives on a file system that keeps file data in a cache of its
/// own, beyond the page cache that [`evict`] drops and [`resident_fraction`] sees: its name
/// and that cache (ZFS's ARC; a network or cluster file system's client or server cache).
/// `None` for the others (ext4, XFS, btrfs, tmpfs, ...). A cold read there may come from
/// memory all the same.
pub fn cache_beyond_page_cache(path: &Path) -> io::Result<Option<&'static str>> {
    let f = open_regular(path)?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs writes one statfs into `st`, for a descriptor we own.
    if unsafe { libc::fstatfs(f.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatfs succeeded, so it filled `st` (zeroed before, so every byte is set).
    // (Every magic is 32 bits; `f_type` is signed on some targets: compared as the u32 it is.)
    let magic = unsafe { st.assume_init() }.f_type as u32;
    Ok(match magic {
        0x2fc1_2fc1 => Some("ZFS, whose ARC caches file data apart from the page cache"),
        0x6969 => Some("NFS, whose server caches file data"),
        0xff53_4d42 | 0xfe53_4d42 => Some("SMB, whose server caches file data"),
        0x6573_5546 => Some("a FUSE file system (virtiofs among them), whose daemon or host may cache file data"),
        0x4750_4653 => Some("GPFS, whose page pool caches file data apart from the page cache"),
        0x0bd0_0bd0 => Some("Lustre, whose servers cache file data"),
        0x00c3_6400 => Some("CephFS, whose servers cache file data"),
        0x0102_1997 => Some("9p (a VM's or WSL's share), whose host may cache file data"),
        _ => None,
    })
}

/// Fraction of a file's pages resident in the page cache (0.0 to 1.0), exactly: from
/// `cachestat(2)` where the kernel has it, else `mincore` over the whole file (an error where
/// `mincore` would not tell this process the truth: see [`resident_estimate`]). Anything but
/// a regular file is `InvalidInput` (a FIFO is not opened).
pub fn resident_fraction(path: &Path) -> io::Result<f64> {
    resident_fraction_of(&open_regular(path)?)
}

/// `path` opened for reading if it is a regular file: a FIFO's open would wait for a writer,
/// and a device's may act on the device, so neither is opened to be waited on.
fn open_regular(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if !std::fs::metadata(path)?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not a regular file", path.display())));
    }
    // Without blocking all the same, should it have been swapped for a FIFO since.
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not a regular file", path.display())));
    }
    Ok(f)
}

/// [`resident_fraction`] of an open file. `mincore` never touches the mapped pages, so a
/// file truncated meanwhile cannot fault here.
pub fn resident_fraction_of(f: &File) -> io::Result<f64> {
    residency(f, usize::MAX)
}

/// How the engine tells whether a shard is in the page cache, before choosing between
/// O_DIRECT and buffered reads for it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResidencyProbe {
    /// `cachestat(2)` (Linux 6.5): the kernel counts the cached pages of the whole file,
    /// in tens of microseconds for a GB (it counts folios, not pages).
    Cachestat,
    /// `mincore` on [`SAMPLED_PAGES`] pages spread over the file, for kernels (or seccomp
    /// profiles) without `cachestat`; the reason it is not available.
    MincoreSampled(String),
}

impl std::fmt::Display for ResidencyProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResidencyProbe::Cachestat => f.write_str("cachestat(2), the whole file"),
            ResidencyProbe::MincoreSampled(why) => {
                write!(f, "mincore on {SAMPLED_PAGES} sampled pages a file (cachestat(2): {why})")
            }
        }
    }
}

/// Pages that a sampled `mincore` looks at in a file, at most: in runs of 16, spread evenly.
pub const SAMPLED_PAGES: usize = 1024;

/// Which [`ResidencyProbe`] this process uses, tried once (on the running executable's
/// file) and remembered.
pub fn residency_probe() -> ResidencyProbe {
    probe().clone()
}

/// [`residency_probe`], without the copy.
fn probe() -> &'static ResidencyProbe {
    static PROBE: std::sync::OnceLock<ResidencyProbe> = std::sync::OnceLock::new();
    PROBE.get_or_init(|| {
        // A seccomp filter may kill the process on a system call it does not know (an
        // allow-list older than cachestat, as systemd's SystemCallFilter= makes by
        // default), rather than fail it: under any filter, it is not tried.
        if seccomp_filtered() {
            return ResidencyProbe::MincoreSampled(
                "not tried under a seccomp filter, which could end the process for it".to_owned(),
            );
        }
        let file = match std::env::current_exe().and_then(File::open) {
            Ok(f) => f,
            Err(e) => return ResidencyProbe::MincoreSampled(format!("not tried: no file to try it on ({e})")),
        };
        match cachestat(&file) {
            Ok(_) => ResidencyProbe::Cachestat,
            Err(e) => ResidencyProbe::MincoreSampled(match e.raw_os_error() {
                Some(libc::ENOSYS) => "not in this kernel".to_owned(),
                Some(libc::EPERM) => "refused (a seccomp profile)".to_owned(),
                _ => e.to_string(),
            }),
        }
    })
}

/// Why residency is not known where `mincore` would not tell this process the truth (the
/// message of the [`io::ErrorKind::PermissionDenied`] error [`resident_estimate`] returns).
pub const HIDDEN: &str =
    "mincore does not show this process which pages of a file it neither owns nor may write are cached";

/// The fraction of `f` in the page cache as the engine estimates it before reading: exact
/// with `cachestat`, else from [`SAMPLED_PAGES`] sampled pages; without `cachestat`, a file
/// this process neither owns nor may write is an [`io::ErrorKind::PermissionDenied`] error
/// ([`HIDDEN`]: `mincore` would say all of it is cached). Never a scan of every page on the
/// load's path: a multi-GB shard takes microseconds either way.
pub fn resident_estimate(f: &File) -> io::Result<f64> {
    residency(f, SAMPLED_PAGES)
}

/// The fraction of `f` in the page cache from `mincore` alone, on every page or on at most
/// `max_pages` sampled pages: the reading used without `cachestat` (public for benchmarks).
pub fn mincore_fraction(f: &File, max_pages: Option<usize>) -> io::Result<f64> {
    let len = file_len(f)?;
    if len == 0 {
        return Ok(1.0);
    }
    mincore_sampled(f, len, max_pages.unwrap_or(usize::MAX))
}

/// `cachestat` where the probe found it, else `mincore` on at most `budget` pages.
fn residency(f: &File, budget: usize) -> io::Result<f64> {
    let len = file_len(f)?;
    if len == 0 {
        return Ok(1.0);
    }
    if *probe() == ResidencyProbe::Cachestat {
        if let Ok(cached) = cachestat(f) {
            return Ok(fraction(cached, len));
        }
    }
    // mincore says every page of a file this process neither owns nor may write is cached
    // (the kernel hides the truth): such a reading would have cold shards read buffered.
    if !residency_visible(f) {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, HIDDEN));
    }
    mincore_sampled(f, len, budget)
}

/// Whether a seccomp filter is on this process (`Seccomp: 2` in `/proc/self/status`); an
/// unreadable status counts as filtered.
fn seccomp_filtered() -> bool {
    match std::fs::read_to_string("/proc/self/status") {
        Ok(status) => status.lines().any(|l| l.strip_prefix("Seccomp:").is_some_and(|v| v.trim() != "0")),
        Err(_) => true,
    }
}

fn file_len(f: &File) -> io::Result<usize> {
    usize::try_from(f.metadata()?.len()).map_err(io::Error::other)
}

/// Whether `mincore` on a mapping of `file` tells the truth: the process owns the file, may
/// write it, or is privileged (the kernel's `can_do_mincore`; since Linux 5.0 it reports every
/// page of any other file as cached).
pub(crate) fn residency_visible(file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 || file.metadata().is_ok_and(|m| m.uid() == euid) {
        return true;
    }
    let Ok(path) = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())) else { return false };
    // SAFETY: a NUL-terminated path; faccessat only checks permissions.
    unsafe { libc::faccessat(libc::AT_FDCWD, path.as_ptr(), libc::W_OK, libc::AT_EACCESS) == 0 }
}

pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize
}

fn fraction(cached_pages: u64, len: usize) -> f64 {
    let pages = len.div_ceil(page_size()) as f64;
    (cached_pages as f64 / pages).min(1.0)
}

/// `cachestat(2)`'s number on the architectures tensorlift builds for (the syscall table
/// shared by new syscalls since Linux 5.1; the libc crate does not name it for glibc).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64"))]
const SYS_CACHESTAT: libc::c_long = 451;

/// Pages of `f` in the page cache, from `cachestat(2)` over the whole file.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64"))]
fn cachestat(f: &File) -> io::Result<u64> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    // A length of 0 means to the end of the file.
    let range = Range { off: 0, len: 0 };
    let mut stat = Stat::default();
    // SAFETY: cachestat reads `range` and writes `stat`, both live and of the kernel's
    // layout (struct cachestat_range, struct cachestat); the descriptor is ours; flags 0.
    let rc =
        unsafe { libc::syscall(SYS_CACHESTAT, f.as_raw_fd(), &range as *const Range, &mut stat as *mut Stat, 0u32) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.nr_cache)
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64")))]
fn cachestat(_: &File) -> io::Result<u64> {
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}

/// The fraction of `f`'s pages in the page cache, from `mincore` on at most `budget` pages:
/// every page when the file has no more, else runs of 16 pages spread evenly.
fn mincore_sampled(f: &File, len: usize, budget: usize) -> io::Result<f64> {
    const RUN: usize = 16;
    // SAFETY: a read-only shared mapping of a file we hold open; no byte of it is read (only
    // mincore looks at it), so a file truncated meanwhile cannot fault this process.
    let map = memmap2::MmapRaw::from(unsafe { memmap2::MmapOptions::new().len(len).map(f) }?);
    let page = page_size();
    let pages = len.div_ceil(page);
    let (runs, run) = if pages <= budget { (1, pages) } else { ((budget / RUN).max(1), RUN) };
    let mut vec = Vec::new();
    vec.try_reserve_exact(run).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
    vec.resize(run, 0u8);
    let (mut resident, mut seen) = (0usize, 0usize);
    for k in 0..runs {
        // Evenly spaced starts, the last run ending at the last page.
        let first = if runs == 1 { 0 } else { k * (pages - run) / (runs - 1) };
        let bytes = (run * page).min(len - first * page);
        let n = bytes.div_ceil(page);
        // SAFETY: [first page, + bytes) lies in the live mapping, and vec has a byte for
        // each of its n pages.
        let rc = unsafe {
            libc::mincore(map.as_ptr().wrapping_add(first * page) as *mut libc::c_void, bytes, vec.as_mut_ptr())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        resident += vec[..n].iter().filter(|&&b| b & 1 == 1).count();
        seen += n;
    }
    Ok(resident as f64 / seen.max(1) as f64)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways of counting agree with the file's state, whole and sampled, cached and
    /// evicted (a file on tmpfs cannot be evicted: it is skipped there).
    #[test]
    fn probes_agree_with_the_cache() {
        let dir = std::env::temp_dir().join(format!("tensorlift-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, vec![7u8; 64 << 20]).unwrap();
        let f = File::open(&path).unwrap();
        let len = file_len(&f).unwrap();
        // Just written: cached.
        assert!(mincore_sampled(&f, len, usize::MAX).unwrap() > 0.99);
        assert!(mincore_sampled(&f, len, SAMPLED_PAGES).unwrap() > 0.99);
        assert!(resident_estimate(&f).unwrap() > 0.99);
        if let Ok(cached) = cachestat(&f) {
            assert!(fraction(cached, len) > 0.99);
        }
        evict(&path).unwrap();
        let left = mincore_sampled(&f, len, usize::MAX).unwrap();
        if left < 0.01 {
            assert!(mincore_sampled(&f, len, SAMPLED_PAGES).unwrap() < 0.01);
            assert!(resident_estimate(&f).unwrap() < 0.01);
            if let Ok(cached) = cachestat(&f) {
                assert!(fraction(cached, len) < 0.01);
            }
        }
        // Half cached, the second half: the sample sees about half.
        use std::os::unix::fs::FileExt;
        let mut half = vec![0u8; 32 << 20];
        f.read_exact_at(&mut half, 32 << 20).unwrap();
        if left < 0.01 {
            let sampled = mincore_sampled(&f, len, SAMPLED_PAGES).unwrap();
            assert!((0.4..0.6).contains(&sampled), "{sampled}");
            assert!((0.4..0.6).contains(&resident_estimate(&f).unwrap()));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
