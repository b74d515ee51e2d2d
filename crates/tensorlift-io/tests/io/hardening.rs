//! Safe APIs that must not reach undefined behaviour or a SIGBUS.

use tensorlift_io::{BackendKind, HostArena, IoError, MappedFile, Reader};

use crate::support::{pattern, scratch, write_file};

/// Defect: `complete` accepted another arena's chunk (only a debug assertion checked it), so
/// safe code could read bytes that chunk's owner was still writing.
#[test]
fn an_arena_refuses_another_arenas_chunk() {
    let a = HostArena::new(8192, 4096).unwrap();
    let b = HostArena::new(8192, 4096).unwrap();
    let mut foreign = b.take_chunks();
    let chunk = foreign.remove(0);
    let back = a.complete(chunk).expect_err("a chunk of b completed in a");
    assert_eq!(back.range(), 0..4096);
    assert!(a.get(0..4096).is_none(), "a's first chunk is exposed though none of its chunks completed");
    // Its own chunk completes, and only then is its range readable.
    let own = a.take_chunks().remove(0);
    assert_eq!(a.complete(own).unwrap(), 0);
    assert_eq!(a.get(0..4096).map(<[u8]>::len), Some(4096));
    assert!(a.take_chunks().is_empty(), "chunks are handed out once");
}

/// Defect: `HostArena::new(_, usize::MAX)` divided by zero.
#[test]
fn any_chunk_size_is_accepted() {
    for chunk in [0, 1, 4095, usize::MAX / 2, usize::MAX - 1, usize::MAX] {
        let a = HostArena::new(10_000, chunk).unwrap();
        let chunks = a.take_chunks();
        assert_eq!(chunks.last().unwrap().range().end, 10_000, "chunk {chunk}");
    }
    assert!(HostArena::new(usize::MAX, 4096).is_none());
    assert!(HostArena::new(usize::MAX - 4096, usize::MAX).is_none());
}

/// Defect: with a memory map, a file truncated during a load killed the process (SIGBUS).
/// Copies out of a map now report it.
#[test]
fn a_truncated_mapped_file_is_an_error_not_a_sigbus() {
    let dir = scratch(false).unwrap();
    let bytes = pattern(1 << 20, 3);
    let path = write_file(&dir, "m.bin", &bytes);
    let reader = Reader::builder().backend(BackendKind::Pread).build();
    let file = reader.open(&path).unwrap();
    let map = MappedFile::map(&file).unwrap();
    let mut out = vec![0u8; 100_000];
    map.copy_to(900_000, &mut out).unwrap();
    assert_eq!(out, bytes[900_000..1_000_000]);
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(4096).unwrap();
    match map.copy_to(900_000, &mut out) {
        Err(IoError::Read { offset, .. }) => assert_eq!(offset, 900_000),
        other => panic!("{other:?}"),
    }
    // Bytes still inside the file are fine; a range past the mapping is refused up front.
    map.copy_to(0, &mut out[..4096]).unwrap();
    assert_eq!(out[..4096], bytes[..4096]);
    assert!(matches!(map.copy_to((1 << 20) - 10, &mut out), Err(IoError::UnexpectedEof { .. })));
    // The copy itself: an address that is not this process's memory is an error too.
    // SAFETY: nothing maps the null page: no memory is read.
    let (done, e) = unsafe { tensorlift_io::copy_by_kernel(std::ptr::null(), &mut out[..10]) }.unwrap_err();
    assert_eq!(done, 0);
    assert!(e.to_string().contains("could not be read"), "{e}");
}

#[test]
fn mmap_is_not_a_backend() {
    let err = "mmap".parse::<BackendKind>().unwrap_err();
    assert!(err.contains("SIGBUS") && err.contains("MapContract"), "{err}");
    // The variable is refused the same way: reads go through io_uring or pread.
    let r = Reader::builder().build();
    assert!(matches!(r.backend(), BackendKind::Uring | BackendKind::Pread));
}

#[test]
fn special_files_are_refused_without_waiting() {
    let dir = scratch(false).unwrap();
    let fifo = dir.join("p");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let reader = Reader::builder().backend(BackendKind::Pread).build();
    let err = reader.open(&fifo).unwrap_err().to_string();
    assert!(err.contains("FIFO"), "{err}");
    let err = tensorlift_io::direct_io_support(&fifo).unwrap_err().to_string();
    assert!(err.contains("FIFO"), "{err}");
}

/// A read that starts past the end of a truncated file says where the file ends now, not
/// where the read was.
#[test]
fn end_of_file_errors_name_the_real_end() {
    let dir = scratch(false).unwrap();
    let path = write_file(&dir, "t.bin", &pattern(300_000, 4));
    for backend in crate::support::BACKENDS {
        let reader = Reader::builder().backend(backend).build();
        let file = reader.open(&path).unwrap();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(100_000).unwrap();
        match reader.read(&file, 204_800, vec![0u8; 4096], 0, 4096).wait() {
            Err(f) => match f.error {
                IoError::UnexpectedEof { at, offset, .. } => {
                    assert_eq!((at, offset), (100_000, 204_800), "{backend:?}")
                }
                other => panic!("{backend:?}: {other}"),
            },
            Ok(_) => panic!("{backend:?}: read past the end succeeded"),
        }
        std::fs::write(&path, pattern(300_000, 4)).unwrap();
    }
}
