//! Prefaulting arena memory ahead of the reads: pages become resident, no byte changes,
//! landed chunks are skipped.

use std::sync::Arc;

use tensorlift_io::{ArenaChunk, HostArena, IoBufMut, Prefaulter, PAGE};

const MIB: usize = 1 << 20;

/// Whether every page of `len` bytes at `ptr` is resident (mincore on anonymous memory).
fn resident(ptr: *mut u8, len: usize) -> bool {
    let mut vec = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: [ptr, ptr + len) is page-aligned and inside a live arena mapping; mincore
    // only reports on it, and vec has a byte per page.
    let rc = unsafe { libc::mincore(ptr.cast(), len, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    vec.iter().all(|&b| b & 1 == 1)
}

fn write(chunk: &mut ArenaChunk, byte: u8) {
    let n = chunk.capacity();
    // SAFETY: the chunk owns these n bytes of the arena, and nothing else writes them.
    unsafe { std::ptr::write_bytes(chunk.stable_mut_ptr(), byte, n) };
}

#[test]
fn prefaulting_makes_pages_resident_and_changes_no_byte() {
    let arena = HostArena::with_pages(16 * MIB, 4 * MIB, false).unwrap();
    assert!(arena.can_prefault());
    let mut chunks = arena.take_chunks();
    assert_eq!(chunks.len(), 4);
    let ptrs: Vec<*mut u8> = chunks.iter_mut().map(|c| c.stable_mut_ptr()).collect();
    assert!(!resident(ptrs[0], 4 * MIB), "fresh memory is not resident yet");
    // Chunk 1 holds bytes a read wrote; chunk 3 has landed (its zeroes are final).
    write(&mut chunks[1], 0xa5);
    let c3 = chunks.pop().unwrap();
    arena.complete(c3).unwrap();

    let work = (0..4).map(|k| (Arc::clone(&arena), k)).collect();
    let mut p = Prefaulter::start(work, 2).expect("a prefaulting thread");
    let bytes = p.wait();
    match p.failure() {
        // A kernel before 5.14, or a sandbox: prefaulting stops, the bytes are still right.
        Some(why) => {
            assert!(std::env::var_os("TENSORLIFT_REQUIRE_PREFAULT").is_none(), "prefaulting required: {why}");
            eprintln!("MADV_POPULATE_WRITE refused here ({why}): residency not checked")
        }
        None => {
            // Chunks 0 to 2, each whole; chunk 3 landed and is skipped.
            assert_eq!(bytes, 12 * MIB as u64);
            assert!(resident(ptrs[0], 4 * MIB) && resident(ptrs[2], 4 * MIB));
        }
    }

    for c in chunks {
        arena.complete(c).unwrap();
    }
    let bytes = arena.get(0..16 * MIB).unwrap();
    assert!(bytes[..4 * MIB].iter().all(|&b| b == 0));
    assert!(bytes[4 * MIB..8 * MIB].iter().all(|&b| b == 0xa5));
    assert!(bytes[8 * MIB..].iter().all(|&b| b == 0));
}

#[test]
fn nothing_to_prefault_starts_no_thread() {
    assert!(Prefaulter::start(Vec::new(), 4).is_none());
    // A small arena is a heap block: not prefaulted.
    let small = HostArena::with_pages(64 << 10, PAGE, false).unwrap();
    assert!(!small.can_prefault());
    assert!(Prefaulter::start(vec![(small, 0)], 1).is_none());
}

#[test]
fn a_stopped_prefaulter_lets_go_of_its_arenas() {
    let arena = HostArena::with_pages(64 * MIB, 8 * MIB, false).unwrap();
    let work = (0..8).map(|k| (Arc::clone(&arena), k)).collect();
    let p = Prefaulter::start(work, 1).unwrap();
    drop(p);
    // Stopped and joined: the threads' references are gone.
    assert_eq!(Arc::strong_count(&arena), 1);
}
