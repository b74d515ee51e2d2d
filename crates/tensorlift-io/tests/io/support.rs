use std::path::{Path, PathBuf};

use tensorlift_io::{BackendKind, Faults, Reader};

pub use tensorlift_testkit::pattern;

/// A scratch folder on the same file system as the build (a real disk, where O_DIRECT
/// works), or under /dev/shm (tmpfs) when `tmpfs` is set.
pub fn scratch(tmpfs: bool) -> Option<PathBuf> {
    let base = if tmpfs { PathBuf::from("/dev/shm") } else { PathBuf::from(env!("CARGO_TARGET_TMPDIR")) };
    if !base.is_dir() {
        return None;
    }
    tensorlift_testkit::try_scratch_in(&base, "tl-io-").ok()
}

pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

pub const BACKENDS: [BackendKind; 2] = [BackendKind::Uring, BackendKind::Pread];

pub fn reader(backend: BackendKind, faults: Faults) -> Reader {
    let refused = faults.refuse_uring.is_some();
    let r = Reader::builder().backend(backend).queue_depth(16).faults(faults).build();
    // io_uring falls back to pread quietly; where the test command knows the kernel has it
    // (TENSORLIFT_REQUIRE_URING), a fallback would turn io_uring's tests into pread's.
    if backend == BackendKind::Uring && !refused && std::env::var_os("TENSORLIFT_REQUIRE_URING").is_some() {
        let report = r.report();
        assert_eq!(report.backend, BackendKind::Uring, "io_uring was asked for and refused: {}", report.reason);
    }
    r
}

pub fn faults(f: impl FnOnce(&mut Faults)) -> Faults {
    let mut x = Faults::default();
    f(&mut x);
    x
}
