//! Arenas filled by copying cached pages in (userfaultfd): the bytes are the file's, a file
//! cut short is an error (no SIGBUS, no wait), and every other way of writing a chunk, or
//! of reusing the memory, still works.

use std::sync::{mpsc, Arc};
use std::time::Duration;

use tensorlift_io::{fill, ArenaPool, BackendKind, HostArena, HostChunk, IoError, Reader, PAGE};

use crate::support::{pattern, scratch, write_file, BACKENDS};

const MIB: usize = 1 << 20;

/// Whether this host fills by copies; where it does not, a test says why and checks
/// nothing, unless `TENSORLIFT_REQUIRE_FILL` is set (the test command sets it where
/// userfaultfd is known to work).
fn available() -> bool {
    match fill::status() {
        Ok(()) => true,
        Err(why) if std::env::var_os("TENSORLIFT_REQUIRE_FILL").is_some() => {
            panic!("TENSORLIFT_REQUIRE_FILL is set, but filling by copy is unavailable: {why}")
        }
        Err(why) => {
            eprintln!("filling by copy unavailable here ({why}): not checked");
            false
        }
    }
}

/// Runs `f` on a thread of its own and fails if it takes a minute: a write to a missing
/// registered page would wait forever, and a test must fail rather than hang.
fn within_a_minute<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: still waiting after a minute (a missing registered page touched?)")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what} failed (above)"),
    }
}

/// A fresh arena of base pages of `len` bytes in chunks of `chunk`, registered to be filled
/// by copies.
fn registered(len: usize, chunk: usize) -> Arc<HostArena> {
    let arena = HostArena::with_pages(len, chunk, false).unwrap();
    arena.fill_by_copy().unwrap();
    arena
}

/// Reads `file` (buffered, so cached) into an arena of `chunk`-byte chunks filled by copies,
/// each chunk read whole, and returns the arena with every chunk landed.
fn load(reader: &Reader, path: &std::path::Path, len: usize, chunk: usize) -> Arc<HostArena> {
    let file = reader.open_with(path, false).unwrap();
    let arena = registered(len.next_multiple_of(PAGE), chunk);
    assert!(arena.fills_by_copy() && !arena.can_prefault());
    for c in arena.take_chunks() {
        let r = c.range();
        let n = r.len().min(len.saturating_sub(r.start));
        let c = reader.read(&file, r.start as u64, HostChunk::Arena(c), 0, n).wait().map_err(|f| f.error).unwrap();
        let HostChunk::Arena(c) = c else { unreachable!() };
        arena.complete(c).unwrap();
    }
    arena
}

#[test]
fn copies_give_the_files_bytes_with_every_backend() {
    if !available() {
        return;
    }
    let dir = scratch(false).unwrap();
    // Not a whole number of pages, and the last chunk shorter than the others.
    let len = 5 * MIB + 12_345;
    let bytes = pattern(len, 11);
    let path = write_file(&dir, "f.bin", &bytes);
    for backend in BACKENDS {
        let reader = Reader::builder().backend(backend).build();
        let p = path.clone();
        let arena = within_a_minute("a load by copies", move || load(&reader, &p, len, 2 * MIB));
        assert_eq!(arena.get(0..len).unwrap(), &bytes[..], "{backend}");
        assert_eq!(arena.copied_bytes(), len as u64, "{backend}: every chunk was copied");
        // Past the file's end, to the page: zeroes, as the file's last page reads.
        let whole = len.next_multiple_of(PAGE);
        assert!(arena.get(len..whole).unwrap().iter().all(|&b| b == 0));
    }
}

#[test]
fn a_file_cut_short_fails_the_read_and_never_waits() {
    if !available() {
        return;
    }
    let dir = scratch(false).unwrap();
    let len = 4 * MIB;
    let path = write_file(&dir, "cut.bin", &pattern(len, 3));
    let p = path.clone();
    let err = within_a_minute("a read of a cut file", move || {
        let reader = Reader::builder().backend(BackendKind::Pread).build();
        let file = reader.open_with(&p, false).unwrap();
        let arena = registered(len, MIB);
        let mut chunks = arena.take_chunks();
        let first = chunks.remove(0);
        let first = reader.read(&file, 0, first, 0, MIB).wait().map_err(|f| f.error).unwrap();
        arena.complete(first).unwrap();
        // The file loses its last 2.5 MiB after it was opened (and mapped, by the copy).
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len((MIB + MIB / 2) as u64).unwrap();
        let last = chunks.pop().unwrap();
        let failed = reader.read(&file, (3 * MIB) as u64, last, 0, MIB).wait().unwrap_err();
        (failed.error, arena.copied_bytes())
    });
    match err {
        (IoError::UnexpectedEof { at, .. }, copied) => {
            assert_eq!(at, (MIB + MIB / 2) as u64);
            assert_eq!(copied, MIB as u64, "only the first chunk was copied");
        }
        (other, _) => panic!("expected the file's end, got {other}"),
    }
}

#[test]
fn other_writers_and_reused_memory_never_wait() {
    if !available() {
        return;
    }
    let dir = scratch(false).unwrap();
    let len = 4 * MIB;
    let bytes = pattern(len, 5);
    let path = write_file(&dir, "w.bin", &bytes);
    let b = bytes.clone();
    within_a_minute("writes that are not copies", move || {
        let reader = Reader::builder().backend(BackendKind::Uring).build();
        let file = reader.open_with(&path, false).unwrap();
        let pool = ArenaPool::new(64 * MIB);
        // As a load takes memory: asking the pool first (which also sizes what it keeps).
        let kept = pool.take_for(&[len]).pop().flatten();
        assert!(kept.is_none());
        let arena = HostArena::pooled(&pool, kept, len, MIB, false).unwrap();
        arena.fill_by_copy().unwrap();
        let mut chunks = arena.take_chunks();
        // Chunk 0: written by the caller, not by a read.
        let mut c0 = chunks.remove(0);
        c0.as_mut_slice().fill(0x5a);
        // Chunk 1: a read that does not start at the chunk's start (read, not copied).
        let c1 = chunks.remove(0);
        let c1 = reader.read(&file, (MIB + 100) as u64, c1, 100, MIB - 100).wait().map_err(|f| f.error).unwrap();
        // Chunk 2: copied. Chunk 3: never written.
        let c2 = chunks.remove(0);
        let c2 = reader.read(&file, (2 * MIB) as u64, c2, 0, MIB).wait().map_err(|f| f.error).unwrap();
        for c in [c0, c1, c2] {
            arena.complete(c).unwrap();
        }
        let got = arena.get(0..3 * MIB).unwrap();
        assert!(got[..MIB].iter().all(|&x| x == 0x5a));
        assert!(got[MIB..MIB + 100].iter().all(|&x| x == 0), "bytes no read wrote are zeroes");
        assert_eq!(&got[MIB + 100..3 * MIB], &b[MIB + 100..3 * MIB]);
        assert_eq!(arena.copied_bytes(), MIB as u64);
        // Dropped with chunk 3 never written: its memory goes back to the pool, unregistered,
        // and a later arena reuses it (not fresh, so not filled by copies) and writes all of it.
        drop(chunks);
        drop(arena);
        assert!(pool.retained_bytes() >= len);
        let kept = pool.take_for(&[len]).pop().flatten().expect("the dropped arena's memory");
        let again = HostArena::pooled(&pool, Some(kept), len, MIB, false).unwrap();
        assert!(again.fill_by_copy().is_err(), "reused memory is not filled by copies");
        for mut c in again.take_chunks() {
            c.as_mut_slice().fill(0x11);
            again.complete(c).unwrap();
        }
        assert!(again.get(0..len).unwrap().iter().all(|&x| x == 0x11));
    });
}

#[test]
fn only_fresh_memory_of_base_pages_fills_by_copy() {
    if !available() {
        return;
    }
    let huge = HostArena::with_pages(8 * MIB, MIB, true).unwrap();
    assert!(huge.fill_by_copy().is_err());
    let small = HostArena::with_pages(PAGE, PAGE, false).unwrap();
    assert!(small.fill_by_copy().is_err(), "a heap block may share pages with the allocator's");
    let handed = HostArena::with_pages(4 * MIB, MIB, false).unwrap();
    let chunks = handed.take_chunks();
    assert!(handed.fill_by_copy().is_err(), "chunks handed out first");
    drop(chunks);
}

#[test]
fn a_file_cut_inside_the_last_page_copied_is_its_end_not_zeroes() {
    if !available() {
        return;
    }
    let dir = scratch(false).unwrap();
    let len = 2 * MIB;
    let path = write_file(&dir, "tail.bin", &pattern(len, 9));
    let p = path.clone();
    let (err, copied) = within_a_minute("a read of a file cut inside its last page", move || {
        let reader = Reader::builder().backend(BackendKind::Pread).build();
        let file = reader.open_with(&p, false).unwrap();
        let arena = registered(len, len);
        let chunk = arena.take_chunks().pop().unwrap();
        // 100 bytes go: the last page still maps (reading zeroes past the end).
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len((len - 100) as u64).unwrap();
        let failed = reader.read(&file, 0, chunk, 0, len).wait().unwrap_err();
        (failed.error, arena.copied_bytes())
    });
    assert!(matches!(err, IoError::UnexpectedEof { at, .. } if at == (len - 100) as u64), "{err}");
    assert_eq!(copied, 0);
}

#[test]
fn a_short_read_leaves_the_rest_of_its_pages_zero_and_unwritten_chunks_read_as_zeroes() {
    if !available() {
        return;
    }
    let dir = scratch(false).unwrap();
    let len = 3 * MIB;
    let bytes = pattern(len, 13);
    let path = write_file(&dir, "short.bin", &bytes);
    let b = bytes.clone();
    within_a_minute("short reads and empty chunks", move || {
        let reader = Reader::builder().backend(BackendKind::Uring).build();
        let file = reader.open_with(&path, false).unwrap();
        let arena = registered(len, MIB);
        let mut chunks = arena.take_chunks();
        // Chunk 0: 5000 bytes of it read (copied: two pages, the second partly the file's).
        let c0 = chunks.remove(0);
        let c0 = reader.read(&file, 0, c0, 0, 5000).wait().map_err(|f| f.error).unwrap();
        // Chunk 1: an empty read; chunk 2: never read. Both complete as they are.
        let c1 = chunks.remove(0);
        let c1 = reader.read(&file, MIB as u64, c1, 0, 0).wait().map_err(|f| f.error).unwrap();
        for c in [c0, c1, chunks.remove(0)] {
            arena.complete(c).unwrap();
        }
        let got = arena.get(0..len).unwrap();
        assert_eq!(&got[..5000], &b[..5000]);
        assert!(got[5000..].iter().all(|&x| x == 0), "past what was read: zeroes, as a read leaves them");
        assert_eq!(arena.copied_bytes(), 5000);
    });
}

#[test]
fn a_file_read_with_o_direct_stops_the_copies_and_reads() {
    if !available() {
        return;
    }
    let dir = scratch(false).unwrap();
    let len = 3 * MIB;
    let bytes = pattern(len, 17);
    let path = write_file(&dir, "direct.bin", &bytes);
    let b = bytes.clone();
    within_a_minute("reads of a file opened O_DIRECT", move || {
        let reader = Reader::builder().backend(BackendKind::Uring).build();
        let file = reader.open_with(&path, true).unwrap();
        if !file.is_direct() {
            eprintln!("O_DIRECT refused here: not checked");
            return;
        }
        let arena = registered(len, MIB);
        for c in arena.take_chunks() {
            let at = c.range().start as u64;
            let c = reader.read(&file, at, c, 0, MIB).wait().map_err(|f| f.error).unwrap();
            arena.complete(c).unwrap();
        }
        assert!(!arena.fills_by_copy(), "a file read with O_DIRECT is not copied from: the arena is unregistered");
        assert_eq!(arena.fill_stopped(), Some("the shard was read with O_DIRECT (not cached)"));
        assert_eq!(arena.copied_bytes(), 0);
        assert_eq!(arena.get(0..len).unwrap(), &b[..]);
    });
}
