//! Filling fresh memory with cached file pages, without the kernel zeroing it first.
//!
//! A read into memory never touched costs a page fault and a zeroed page per 4 KiB before
//! the copy: on the development VM the zeroing alone was a sixth of a warm host load's
//! profile. userfaultfd's `UFFDIO_COPY` allocates each missing page of a registered range
//! and fills it by copying, never zeroing it; copying from a read-only shared mapping of a
//! cached file, it does the same work with about a fifth less CPU (docs/BENCHMARKS.md,
//! "Host pages, fourth pass"). The pages it fills are private: a tensor never depends on the
//! file afterwards, and a file cut short makes the copy fail with `EFAULT`, never a SIGBUS.
//!
//! One userfaultfd serves the process, opened with `UFFD_USER_MODE_ONLY` (Linux 5.11): no
//! privilege is needed, and a fault the kernel itself takes in a registered range (a read
//! into it) fails with `EFAULT` rather than waiting. No thread serves faults, so a user-mode
//! touch of a missing page of a registered range would wait forever. These rules rule it
//! out, and [`crate::HostArena`] keeps them:
//! - only an arena's own fresh mapping is registered, before any chunk is handed out, and a
//!   registered arena is never prefaulted;
//! - a chunk of it is written by one copy of its whole span of pages (the pages past the
//!   copied bytes mapped as zero pages, so every page of the chunk is present after it);
//!   before anything else writes or reads it (a read, a caller, `complete`), its missing
//!   pages are mapped as zero pages (or, failing that, it is unregistered);
//! - an arena unregisters its memory when dropped, before the memory serves anything else
//!   (or unmaps it);
//! - a process forked from the one that opened the descriptor does not use it (its copies
//!   of registered ranges are not registered, and the descriptor serves the parent).
//!
//! Where userfaultfd is refused (`vm.unprivileged_userfaultfd`, a seccomp profile, an older
//! kernel, another page size), [`status`] says why and loads read as before.

use crate::process::MadeIn;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

use crate::PAGE;

/// The ioctl numbers and structures of `linux/userfaultfd.h`. The numbers are those of the
/// generic ioctl encoding; elsewhere no descriptor is ever opened ([`SUPPORTED`]).
mod sys {
    const fn iowr(nr: u64, size: usize) -> u64 {
        (3 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
    }
    const fn ior(nr: u64, size: usize) -> u64 {
        (2 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
    }

    #[repr(C)]
    pub struct Api {
        pub api: u64,
        pub features: u64,
        pub ioctls: u64,
    }
    #[repr(C)]
    pub struct Range {
        pub start: u64,
        pub len: u64,
    }
    #[repr(C)]
    pub struct Register {
        pub range: Range,
        pub mode: u64,
        pub ioctls: u64,
    }
    #[repr(C)]
    pub struct Copy {
        pub dst: u64,
        pub src: u64,
        pub len: u64,
        pub mode: u64,
        pub copy: i64,
    }
    #[repr(C)]
    pub struct ZeroPage {
        pub range: Range,
        pub mode: u64,
        pub zeropage: i64,
    }

    pub const API: u64 = 0xAA;
    pub const USER_MODE_ONLY: libc::c_int = 1;
    pub const REGISTER_MODE_MISSING: u64 = 1;
    /// `_UFFDIO_COPY` and `_UFFDIO_ZEROPAGE` in a range's `ioctls`.
    pub const RANGE_IOCTLS: u64 = (1 << 0x03) | (1 << 0x04);
    pub const UFFDIO_API: u64 = iowr(0x3F, std::mem::size_of::<Api>());
    pub const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<Register>());
    pub const UFFDIO_UNREGISTER: u64 = ior(0x01, std::mem::size_of::<Range>());
    pub const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<Copy>());
    pub const UFFDIO_ZEROPAGE: u64 = iowr(0x04, std::mem::size_of::<ZeroPage>());
    /// Architectures whose ioctl numbers are the generic encoding's.
    pub const SUPPORTED: bool = cfg!(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "riscv64",
        target_arch = "loongarch64"
    ));
}

/// The process's userfaultfd, opened at the first use.
pub(crate) struct FillFd {
    fd: OwnedFd,
    /// The process that opened it: a userfaultfd serves the address space it was opened in,
    /// so a process forked since must not use the descriptor it inherited.
    made: MadeIn,
}

static FILL: OnceLock<Result<FillFd, String>> = OnceLock::new();

/// The process's userfaultfd for filling by copy, or why there is none.
pub(crate) fn fill_fd() -> Result<&'static FillFd, &'static str> {
    let fd = FILL.get_or_init(FillFd::open).as_ref().map_err(String::as_str)?;
    if fd.made.elsewhere() {
        return Err("this process was forked from the one that opened userfaultfd (whose address space it serves)");
    }
    Ok(fd)
}

/// Whether host loads can fill fresh memory by copying cached pages in (userfaultfd), or
/// why not. Opens the process's userfaultfd if nothing has yet.
pub fn status() -> Result<(), String> {
    fill_fd().map(|_| ()).map_err(str::to_owned)
}

impl FillFd {
    fn open() -> Result<FillFd, String> {
        if !sys::SUPPORTED {
            return Err("not built for this architecture".into());
        }
        if crate::cache::page_size() != PAGE {
            return Err(format!(
                "the kernel's pages are {} bytes, arenas are laid out in {PAGE}",
                crate::cache::page_size()
            ));
        }
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | sys::USER_MODE_ONLY;
        // SAFETY: userfaultfd takes flags only and returns a new descriptor or -1.
        let rc = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            let why = match e.raw_os_error() {
                Some(libc::EPERM) => "refused (EPERM: a seccomp profile, or a security module)".to_owned(),
                Some(libc::ENOSYS) => "not in this kernel or refused by seccomp (ENOSYS)".to_owned(),
                Some(libc::EINVAL) => "this kernel has no user-mode-only userfaultfd (Linux 5.11)".to_owned(),
                _ => format!("userfaultfd: {e}"),
            };
            return Err(why);
        }
        // SAFETY: the syscall returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(rc as RawFd) };
        let mut api = sys::Api { api: sys::API, features: 0, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes `api`, a live struct of the kernel's layout.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), sys::UFFDIO_API as _, &mut api as *mut sys::Api) };
        if rc != 0 {
            return Err(format!("userfaultfd handshake (UFFDIO_API): {}", io::Error::last_os_error()));
        }
        Ok(FillFd { fd, made: MadeIn::here() })
    }

    /// Registers `[start, start + len)` for filling: its missing pages are then filled by
    /// [`copy`] only. `start` and `len` are page multiples, and the range is memory of the
    /// caller's own (a private anonymous mapping) that nothing has touched and nothing
    /// will touch before it is filled or unregistered.
    pub(crate) fn register(&self, start: *mut u8, len: usize) -> io::Result<()> {
        let mut reg = sys::Register {
            range: sys::Range { start: start as u64, len: len as u64 },
            mode: sys::REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes `reg`, a live struct of the kernel's
        // layout; registering changes no byte and no mapping's contents.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UFFDIO_REGISTER as _, &mut reg as *mut sys::Register) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        if reg.ioctls & sys::RANGE_IOCTLS != sys::RANGE_IOCTLS {
            // Registered, but the copies are not offered there: undo it.
            let _ = self.unregister(start, len);
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        Ok(())
    }

    /// Unregisters `[start, start + len)` (page multiples): its missing pages fault in as
    /// zeroes again, as in any private anonymous mapping.
    pub(crate) fn unregister(&self, start: *mut u8, len: usize) -> io::Result<()> {
        let mut range = sys::Range { start: start as u64, len: len as u64 };
        // SAFETY: UFFDIO_UNREGISTER reads `range`, a live struct of the kernel's layout;
        // unregistering changes no byte.
        let rc =
            unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UFFDIO_UNREGISTER as _, &mut range as *mut sys::Range) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Fills the missing pages `[dst, dst + len)` of a registered range by copying `len`
    /// bytes from `src` (page multiples, `src` readable by the kernel: a read-only mapping
    /// of a file). On an error, some of the pages may be filled and the others missing.
    ///
    /// # Safety
    ///
    /// `[dst, dst + len)` must be memory this call may write (registered with this
    /// descriptor, owned by the caller, not referenced by anything else); `src` is only
    /// read by the kernel, which fails with `EFAULT` where it cannot read.
    pub(crate) unsafe fn copy(&self, dst: *mut u8, src: *const u8, len: usize) -> io::Result<()> {
        whole_range(len, false, |done| {
            let mut c = sys::Copy {
                dst: dst as u64 + done as u64,
                src: src as u64 + done as u64,
                len: (len - done) as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads and writes `c`, a live struct of the kernel's layout;
            // it writes only missing pages of the destination, which the caller owns.
            let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UFFDIO_COPY as _, &mut c as *mut sys::Copy) };
            (rc, c.copy)
        })
    }

    /// Maps the missing pages `[dst, dst + len)` of a registered range (page multiples) as
    /// zero pages, which a later write copies on write as usual; pages already present are
    /// left as they are.
    pub(crate) fn zero(&self, dst: *mut u8, len: usize) -> io::Result<()> {
        whole_range(len, true, |done| {
            let mut z = sys::ZeroPage {
                range: sys::Range { start: dst as u64 + done as u64, len: (len - done) as u64 },
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: UFFDIO_ZEROPAGE reads and writes `z`, a live struct of the kernel's
            // layout; it maps the zero page read-only where pages are missing, which changes
            // no byte (missing pages read as zeroes).
            let rc =
                unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UFFDIO_ZEROPAGE as _, &mut z as *mut sys::ZeroPage) };
            (rc, z.zeropage)
        })
    }
}

/// Runs a ranged userfaultfd ioctl over `len` bytes until all are done: `step(done)` issues
/// it for `[done, len)` and returns its result and the bytes it reports done (negative: an
/// error). On EAGAIN (a partial operation, or the address space changing meanwhile) or
/// EINTR it goes on from there, unless nothing got done a thousand times in a row; on
/// EEXIST (a page already present) it skips that page where `skip_present`; any other error
/// ends it, some pages perhaps done.
fn whole_range(len: usize, skip_present: bool, mut step: impl FnMut(usize) -> (libc::c_int, i64)) -> io::Result<()> {
    let (mut done, mut idle) = (0usize, 0u32);
    while done < len {
        let (rc, progress) = step(done);
        if rc == 0 {
            if progress <= 0 {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            done += progress as usize;
            continue;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EINTR) => {
                idle = if progress > 0 { 0 } else { idle + 1 };
                if idle >= 1000 {
                    return Err(e);
                }
                done += progress.max(0) as usize;
            }
            Some(libc::EEXIST) if skip_present => done += progress.max(0) as usize + PAGE,
            _ => return Err(e),
        }
    }
    Ok(())
}
