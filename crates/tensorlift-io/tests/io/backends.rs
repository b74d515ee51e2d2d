//! Every backend returns the file's exact bytes, for every kind of range.

use std::sync::Arc;

use tensorlift_io::{AlignedBuf, BackendKind, Faults, OpenFile, Reader};

use crate::support::{faults, pattern, reader, scratch, write_file, BACKENDS};

const LEN: usize = 3 * 1024 * 1024 + 4099;

/// (offset, len) pairs: aligned, odd, across page boundaries, up to and across the end.
fn ranges() -> Vec<(u64, usize)> {
    vec![
        (0, LEN),
        (0, 4096),
        (4096, 1 << 20),
        (1, 1),
        (4095, 2),
        (12_345, 678_901),
        (8192, LEN - 8192),
        (LEN as u64 - 1, 1),
        (LEN as u64 - 4099, 4099),
        (2 * 1024 * 1024 - 3, 1024 * 1024 + 7),
    ]
}

fn check_all(r: &Reader, file: &Arc<OpenFile>, data: &[u8]) {
    for (offset, len) in ranges() {
        let want = &data[offset as usize..offset as usize + len];
        // Page-aligned destination (the direct path when the range allows).
        let buf = AlignedBuf::zeroed(len + 4096, 4096).unwrap();
        let buf = r.read(file, offset, buf, 0, len).wait().unwrap_or_else(|f| panic!("{}", f.error));
        assert!(buf.as_slice()[..len] == *want, "{:?} aligned dst, range {offset}+{len}", r.backend());
        // An odd destination offset in a Vec: never direct for the memory side.
        let buf = vec![0u8; len + 3];
        let buf = r.read(file, offset, buf, 3, len).wait().unwrap_or_else(|f| panic!("{}", f.error));
        assert!(buf[3..] == *want, "{:?} odd dst, range {offset}+{len}", r.backend());
    }
}

fn run(tmpfs: bool, f: Faults) {
    let Some(dir) = scratch(tmpfs) else {
        eprintln!("skipped: no /dev/shm on this machine");
        return;
    };
    let data = pattern(LEN, 42);
    let path = write_file(&dir, "data.bin", &data);
    for backend in BACKENDS {
        let r = reader(backend, f.clone());
        let file = r.open(&path).unwrap();
        assert_eq!(file.len(), LEN as u64);
        check_all(&r, &file, &data);
        // Aligned reads never made the kernel refuse O_DIRECT (EINVAL would turn it off).
        if f.max_read.is_none() && file.is_direct() {
            assert_eq!(file.buffered_reason(), None);
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn identical_bytes_on_disk() {
    run(false, Faults::default());
}

#[test]
fn identical_bytes_on_tmpfs() {
    run(true, Faults::default());
}

#[test]
fn identical_bytes_with_short_reads() {
    // Each system call returns at most 4097 bytes (direct ones 4096): every range needs
    // many resubmissions, and direct reads end unaligned mid-range.
    run(false, faults(|f| f.max_read = Some(4097)));
}

#[test]
fn direct_io_is_used_where_the_file_system_allows() {
    let dir = scratch(false).unwrap();
    let path = write_file(&dir, "d.bin", &pattern(1 << 20, 1));
    let r = reader(BackendKind::Uring, Faults::default());
    let file = r.open(&path).unwrap();
    let align = file.dio_align();
    assert!(align.offset.is_power_of_two() && align.memory.is_power_of_two(), "{align:?}");
    eprintln!("O_DIRECT on {}: {} {:?}", dir.display(), file.is_direct(), file.buffered_reason());
    // The doctor's check, which performs a real direct read, agrees with the open.
    let support = tensorlift_io::direct_io_support(&path).unwrap();
    assert_eq!(support.refused.is_none(), file.is_direct(), "{support:?}");
    if file.is_direct() {
        // An aligned read stays direct (the kernel did not refuse it) and is exact.
        let buf = r.read(&file, 0, AlignedBuf::zeroed(1 << 20, 4096).unwrap(), 0, 1 << 20).wait().unwrap();
        assert!(buf.as_slice() == pattern(1 << 20, 1));
        assert!(file.is_direct() && file.buffered_reason().is_none());
    } else {
        assert!(file.buffered_reason().is_some(), "a buffered file says why");
    }
}

#[test]
fn many_reads_in_flight_across_files() {
    let dir = scratch(false).unwrap();
    let files: Vec<(Vec<u8>, std::path::PathBuf)> = (0..4)
        .map(|i| {
            let d = pattern(1 << 20, i + 10);
            let p = write_file(&dir, &format!("f{i}.bin"), &d);
            (d, p)
        })
        .collect();
    for backend in BACKENDS {
        let r = reader(backend, Faults::default());
        let open: Vec<_> = files.iter().map(|(_, p)| r.open(p).unwrap()).collect();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let mut futs = Vec::new();
            for (i, f) in open.iter().enumerate() {
                for k in 0..16u64 {
                    let buf = AlignedBuf::zeroed(65536, 4096).unwrap();
                    futs.push((i, k, r.read(f, k * 65536, buf, 0, 65536)));
                }
            }
            for (i, k, fut) in futs {
                let buf = fut.await.unwrap_or_else(|f| panic!("{}", f.error));
                let at = (k * 65536) as usize;
                assert!(buf.as_slice() == &files[i].0[at..at + 65536], "{backend:?} file {i} chunk {k}");
            }
        });
    }
}
