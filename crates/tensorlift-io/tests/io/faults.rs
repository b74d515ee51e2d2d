//! Forced fallbacks and failures: each ends in correct bytes or an exact error.

use tensorlift_io::{AlignedBuf, BackendKind, Faults, FixedBuffers, IoBufMut, IoError, Reader, UringStatus};

use crate::support::{faults, pattern, reader, scratch, write_file, BACKENDS};

#[test]
fn refused_io_uring_falls_back_to_pread_with_the_reason() {
    let dir = scratch(false).unwrap();
    let data = pattern(100_000, 3);
    let path = write_file(&dir, "f.bin", &data);
    for (errno, words) in [(libc::ENOSYS, "ENOSYS"), (libc::EPERM, "seccomp"), (libc::ENOMEM, "RLIMIT_MEMLOCK")] {
        let r = Reader::builder().faults(faults(|f| f.refuse_uring = Some(errno))).build();
        let report = r.report();
        assert_eq!(report.backend, BackendKind::Pread);
        assert!(report.reason.contains(words), "{}", report.reason);
        assert!(matches!(report.uring, UringStatus::Unavailable { errno: Some(e), .. } if e == errno));
        let file = r.open(&path).unwrap();
        let buf = r.read(&file, 17, vec![0; 99_000], 0, 99_000).wait().unwrap();
        assert!(buf == data[17..99_017]);
    }
}

#[test]
fn refused_o_direct_reads_buffered_with_the_reason() {
    let dir = scratch(false).unwrap();
    let data = pattern(1 << 20, 4);
    let path = write_file(&dir, "f.bin", &data);
    for backend in [BackendKind::Uring, BackendKind::Pread] {
        let r = reader(backend, faults(|f| f.refuse_direct = true));
        let file = r.open(&path).unwrap();
        assert!(!file.is_direct());
        assert!(file.buffered_reason().unwrap().contains("O_DIRECT refused"));
        let buf = r.read(&file, 0, AlignedBuf::zeroed(1 << 20, 4096).unwrap(), 0, 1 << 20).wait().unwrap();
        assert!(buf.as_slice() == data);
    }
}

/// Defect: io_uring takes offset -1 (2^64 - 1) as "the file's position": a read there
/// returned the file's first bytes, where pread refuses it. Every backend refuses a read
/// whose end is past 2^63 - 1.
#[test]
fn a_read_past_the_largest_signed_offset_is_refused() {
    let dir = scratch(false).unwrap();
    let path = write_file(&dir, "o.bin", &pattern(8192, 6));
    for backend in BACKENDS {
        let r = reader(backend, Faults::default());
        let file = r.open(&path).unwrap();
        for (offset, len) in [(u64::MAX, 100), (i64::MAX as u64 - 10, 100), (i64::MAX as u64, 1)] {
            let err = r.read(&file, offset, vec![0u8; 100], 0, len).wait().unwrap_err();
            assert!(err.buf.is_some(), "the buffer comes back");
            match err.error {
                IoError::Read { offset: o, len: l, ref source, .. } => {
                    assert_eq!((o, l), (offset, len as u64), "{backend:?}");
                    assert_eq!(source.raw_os_error(), Some(libc::EINVAL), "{backend:?}");
                }
                ref other => panic!("{backend:?}: {other}"),
            }
        }
    }
}

#[test]
fn truncated_file_is_an_exact_error() {
    let dir = scratch(false).unwrap();
    let path = write_file(&dir, "t.bin", &pattern(1 << 20, 5));
    for backend in BACKENDS {
        let r = reader(backend, Faults::default());
        let file = r.open(&path).unwrap();
        // Planned at 1 MiB, truncated before the read.
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(102_400).unwrap();
        let err = r.read(&file, 0, AlignedBuf::zeroed(1 << 20, 4096).unwrap(), 0, 1 << 20).wait().unwrap_err();
        assert!(err.buf.is_some(), "the buffer comes back");
        match err.error {
            IoError::UnexpectedEof { ref file, offset: 0, len: 1_048_576, at } => {
                assert_eq!(file, &path);
                assert_eq!(at, 102_400, "{backend:?}");
            }
            ref other => panic!("{backend:?}: {other}"),
        }
        assert!(err.error.to_string().contains("t.bin"));
        std::fs::write(&path, pattern(1 << 20, 5)).unwrap();
    }
}

#[test]
fn buffer_too_small_is_refused_before_any_io() {
    let dir = scratch(false).unwrap();
    let path = write_file(&dir, "f.bin", &pattern(10_000, 6));
    let r = reader(BackendKind::Uring, Faults::default());
    let file = r.open(&path).unwrap();
    let err = r.read(&file, 0, vec![0u8; 100], 50, 51).wait().unwrap_err();
    assert!(matches!(err.error, IoError::BufferTooSmall { buf_offset: 50, len: 51, capacity: 100, .. }));
    assert_eq!(err.buf.unwrap().len(), 100);
    let err = r.read(&file, 0, vec![0u8; 100], usize::MAX, 2).wait().unwrap_err();
    assert!(matches!(err.error, IoError::BufferTooSmall { .. }));
}

#[test]
fn missing_file_names_the_path() {
    let r = reader(BackendKind::Pread, Faults::default());
    let err = r.open(std::path::Path::new("/nonexistent/shard.safetensors")).unwrap_err();
    assert!(matches!(err, IoError::Open { .. }));
    assert!(err.to_string().contains("/nonexistent/shard.safetensors"));
}

/// A page-aligned buffer that says it lies in fixed-buffer slot 0.
struct Fixed(AlignedBuf);
// SAFETY: delegates to AlignedBuf; the tests register exactly this allocation as slot 0.
unsafe impl IoBufMut for Fixed {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.0.stable_mut_ptr()
    }
    fn capacity(&self) -> usize {
        self.0.capacity()
    }
    fn fixed_slot(&self) -> Option<u16> {
        Some(0)
    }
}

fn fixed_reads(f: Faults) -> (FixedBuffers, bool) {
    let dir = scratch(false).unwrap();
    let data = pattern(1 << 20, 8);
    let path = write_file(&dir, "f.bin", &data);
    let mut buf = Fixed(AlignedBuf::zeroed(1 << 20, 4096).unwrap());
    let r = reader(BackendKind::Uring, f);
    let region = (buf.stable_mut_ptr(), buf.capacity());
    // SAFETY: `buf` is declared before `r`, so its allocation outlives the reader.
    let registered = unsafe { r.register_buffers(&[region]) }.is_ok();
    let file = r.open(&path).unwrap();
    for (off, len) in [(0u64, 1usize << 20), (4096, 8192), (3, 1000)] {
        buf = r.read(&file, off, buf, 0, len).wait().unwrap_or_else(|f| panic!("{}", f.error));
        assert!(buf.0.as_slice()[..len] == data[off as usize..off as usize + len]);
    }
    (r.report().fixed_buffers, registered)
}

#[test]
fn fixed_buffers_registered_and_read_into() {
    if r_is_pread() {
        eprintln!("skipped: io_uring unavailable here");
        return;
    }
    let (state, ok) = fixed_reads(Faults::default());
    assert!(ok);
    assert_eq!(state, FixedBuffers::Registered { regions: 1, bytes: 1 << 20 });
}

/// A buffer that names a fixed slot another reader registered (or this reader's slot of
/// other memory) is read into as any buffer: it used to be a fixed read of the wrong
/// region, which the kernel refuses (EFAULT), failing the read.
#[test]
fn a_slot_of_another_readers_registration_still_reads() {
    if r_is_pread() {
        eprintln!("skipped: io_uring unavailable here");
        return;
    }
    let dir = scratch(false).unwrap();
    let data = pattern(1 << 20, 11);
    let path = write_file(&dir, "f.bin", &data);
    let mut buf = Fixed(AlignedBuf::zeroed(1 << 20, 4096).unwrap());
    let mut other = AlignedBuf::zeroed(1 << 20, 4096).unwrap();
    let (first, second) =
        (reader(BackendKind::Uring, Faults::default()), reader(BackendKind::Uring, Faults::default()));
    // SAFETY: the buffer is declared before the reader, so it outlives it.
    unsafe { first.register_buffers(&[(buf.stable_mut_ptr(), buf.capacity())]) }.unwrap();
    // SAFETY: as above.
    unsafe { second.register_buffers(&[(other.stable_mut_ptr(), other.capacity())]) }.unwrap();
    let file = second.open(&path).unwrap();
    for (off, len) in [(0u64, 1usize << 20), (4096, 8192)] {
        buf = second.read(&file, off, buf, 0, len).wait().unwrap_or_else(|f| panic!("{}", f.error));
        assert!(buf.0.as_slice()[..len] == data[off as usize..off as usize + len]);
    }
    // The reader that registered it reads into it as its fixed buffer.
    let file = first.open(&path).unwrap();
    buf = first.read(&file, 3, buf, 0, 1000).wait().unwrap_or_else(|f| panic!("{}", f.error));
    assert!(buf.0.as_slice()[..1000] == data[3..1003]);
}

#[test]
fn refused_registration_still_reads() {
    if r_is_pread() {
        eprintln!("skipped: io_uring unavailable here");
        return;
    }
    let (state, ok) = fixed_reads(faults(|f| f.refuse_register = Some(libc::ENOMEM)));
    assert!(!ok);
    assert!(matches!(state, FixedBuffers::Refused(ref why) if why.contains("memory")), "{state:?}");
}

/// Whether io_uring is refused here (its tests then skip), which the test command, where it
/// knows the kernel has it (`TENSORLIFT_REQUIRE_URING`), does not accept.
fn r_is_pread() -> bool {
    let status = tensorlift_io::uring_status();
    let refused = !matches!(status, UringStatus::Available);
    assert!(!(refused && std::env::var_os("TENSORLIFT_REQUIRE_URING").is_some()), "io_uring required: {status}");
    refused
}

/// Runs in a child process (it changes process-wide limits): without CAP_IPC_LOCK and with
/// a 64 KiB RLIMIT_MEMLOCK, registering 16 MiB must be refused, and reads still be exact.
#[test]
fn tight_memlock() {
    if std::env::var_os("TL_MEMLOCK_CHILD").is_some() {
        return memlock_child();
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "faults::tight_memlock", "--nocapture", "--test-threads=1"])
        .env("TL_MEMLOCK_CHILD", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("memlock child done"), "{text}");
}

fn memlock_child() {
    drop_cap_ipc_lock();
    let lim = libc::rlimit { rlim_cur: 64 * 1024, rlim_max: 64 * 1024 };
    // SAFETY: setrlimit reads the valid struct we pass.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) }, 0);
    let dir = scratch(false).unwrap();
    let data = pattern(16 << 20, 9);
    let path = write_file(&dir, "f.bin", &data);
    let mut buf = Fixed(AlignedBuf::zeroed(16 << 20, 4096).unwrap());
    let r = Reader::builder().build();
    let region = (buf.stable_mut_ptr(), buf.capacity());
    // SAFETY: `buf` outlives `r` (declared first).
    let reg = unsafe { r.register_buffers(&[region]) };
    let report = r.report();
    if report.backend == BackendKind::Uring {
        assert!(reg.is_err(), "16 MiB registered under a 64 KiB memlock without CAP_IPC_LOCK");
        assert!(matches!(report.fixed_buffers, FixedBuffers::Refused(_)));
    }
    let file = r.open(&path).unwrap();
    buf = r.read(&file, 0, buf, 0, 16 << 20).wait().unwrap_or_else(|f| panic!("{}", f.error));
    assert!(buf.0.as_slice() == data);
    println!("memlock child done: {:?} {:?}", report.backend, report.fixed_buffers);
}

/// Clears CAP_IPC_LOCK from the effective set, so memlock limits apply even to root.
fn drop_cap_ipc_lock() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const CAP_IPC_LOCK: u32 = 14;
    let mut h = Header { version: 0x2008_0522, pid: 0 };
    let mut d = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: capget writes a header and two data structs of exactly these layouts.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()) };
    assert_eq!(rc, 0);
    d[0].effective &= !(1 << CAP_IPC_LOCK);
    // SAFETY: capset reads the same structs; dropping a capability is always allowed.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()) };
    assert_eq!(rc, 0);
}

/// Runs in a child process: a real seccomp filter refuses io_uring_setup with EPERM, as
/// Docker's default profile does. The reader must fall back to pread, say why, and read
/// exact bytes.
#[test]
fn real_seccomp_refusal() {
    if std::env::var_os("TL_SECCOMP_CHILD").is_some() {
        return seccomp_child();
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "faults::real_seccomp_refusal", "--nocapture", "--test-threads=1"])
        .env("TL_SECCOMP_CHILD", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("seccomp child done"), "{text}");
}

fn seccomp_child() {
    const IO_URING_SETUP: u32 = 425; // the same number on x86_64 and aarch64
                                     // BPF: load the syscall number; if io_uring_setup, fail with EPERM; else allow.
    let filter = [
        libc::sock_filter { code: 0x20, jt: 0, jf: 0, k: 0 },
        libc::sock_filter { code: 0x15, jt: 0, jf: 1, k: IO_URING_SETUP },
        libc::sock_filter { code: 0x06, jt: 0, jf: 0, k: 0x0005_0000 | libc::EPERM as u32 },
        libc::sock_filter { code: 0x06, jt: 0, jf: 0, k: 0x7fff_0000 },
    ];
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut _ };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integer arguments.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }, 0);
    // SAFETY: prog points to a valid filter program that outlives the call (the kernel copies it).
    let rc = unsafe { libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const libc::sock_fprog) };
    assert_eq!(rc, 0);
    let dir = scratch(false).unwrap();
    let data = pattern(3 << 20, 21);
    let path = write_file(&dir, "f.bin", &data);
    let r = Reader::builder().build();
    let report = r.report();
    assert_eq!(report.backend, BackendKind::Pread, "{report:?}");
    assert!(report.reason.contains("EPERM") && report.reason.contains("seccomp"), "{}", report.reason);
    let file = r.open(&path).unwrap();
    let buf = r.read(&file, 5, AlignedBuf::zeroed(3 << 20, 4096).unwrap(), 0, (3 << 20) - 5).wait().unwrap();
    assert!(buf.as_slice()[..(3 << 20) - 5] == data[5..]);
    println!("seccomp child done: {}", report.reason);
}
