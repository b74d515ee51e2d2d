//! The copy layer on a real GPU: bytes go file -> pinned chunk -> device -> host unchanged.
//! Without a usable GPU each test prints why it skipped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tensorlift_cuda::{cuda_status, CopyEngine, CudaError, CudaStatus, DeviceArena, Gpu, Piece, PinnedPool};
use tensorlift_io::{BackendKind, Reader};
use tensorlift_testkit::pattern;

fn gpu() -> Option<Gpu> {
    match cuda_status() {
        CudaStatus::Unavailable(why) => {
            eprintln!("skipped: no usable GPU: {why}");
            None
        }
        CudaStatus::Available(_) => Some(Gpu::open(0).expect("the probe found a device, so it opens")),
    }
}

fn wait_all_free(pool: &PinnedPool) {
    let t = Instant::now();
    while pool.free_chunks() != pool.chunks() {
        assert!(t.elapsed() < Duration::from_secs(10), "chunks not returned");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn chunks_round_trip_through_the_device() {
    let Some(gpu) = gpu() else { return };
    const MIB: usize = 1 << 20;
    let pool = PinnedPool::new(&gpu, 4 * MIB, MIB).unwrap();
    let arena = Arc::new(DeviceArena::new(&gpu, 16 * MIB).unwrap());
    let mut engine = CopyEngine::new(&gpu, 3).unwrap();
    let data = pattern(16 * MIB, 1);
    // 16 chunks through a pool of 4: acquire blocks until copies complete.
    for i in 0..16 {
        let mut c = pool.acquire();
        c.as_mut_slice().copy_from_slice(&data[i * MIB..(i + 1) * MIB]);
        engine.copy(c, &arena, &[Piece { src_offset: 0, dst_offset: i * MIB, len: MIB }]).unwrap();
    }
    engine.synchronize().unwrap();
    wait_all_free(&pool);
    let mut back = vec![0u8; 16 * MIB];
    arena.copy_to_host(0, &mut back).unwrap();
    assert!(back == data);
}

#[test]
fn pieces_scatter_one_chunk() {
    let Some(gpu) = gpu() else { return };
    let pool = PinnedPool::new(&gpu, 1 << 20, 1 << 20).unwrap();
    let arena = Arc::new(DeviceArena::new(&gpu, 4096).unwrap());
    let mut engine = CopyEngine::new(&gpu, 2).unwrap();
    let mut c = pool.acquire();
    c.as_mut_slice()[..300].copy_from_slice(&pattern(300, 2));
    let want = c.as_slice()[..300].to_vec();
    let pieces =
        [Piece { src_offset: 0, dst_offset: 256, len: 100 }, Piece { src_offset: 100, dst_offset: 1024, len: 200 }];
    engine.copy(c, &arena, &pieces).unwrap();
    engine.synchronize().unwrap();
    let mut a = vec![0u8; 100];
    let mut b = vec![0u8; 200];
    arena.copy_to_host(256, &mut a).unwrap();
    arena.copy_to_host(1024, &mut b).unwrap();
    assert_eq!(a, want[..100]);
    assert_eq!(b, want[100..]);
}

#[test]
fn out_of_bounds_copies_are_refused() {
    let Some(gpu) = gpu() else { return };
    let pool = PinnedPool::new(&gpu, 1 << 20, 1 << 20).unwrap();
    let arena = Arc::new(DeviceArena::new(&gpu, 4096).unwrap());
    let mut engine = CopyEngine::new(&gpu, 1).unwrap();
    let e = engine.copy(pool.acquire(), &arena, &[Piece { src_offset: 0, dst_offset: 4000, len: 200 }]).unwrap_err();
    assert!(matches!(e, CudaError::OutOfBounds { what: "device arena", .. }));
    let e = engine
        .copy(pool.acquire(), &arena, &[Piece { src_offset: (1 << 20) - 10, dst_offset: 0, len: 20 }])
        .unwrap_err();
    assert!(matches!(e, CudaError::OutOfBounds { what: "pinned chunk", .. }));
    assert!(matches!(arena.copy_to_host(4090, &mut [0u8; 10]), Err(CudaError::OutOfBounds { .. })));
    // The refused copies gave their chunks back.
    wait_all_free(&pool);
}

#[test]
fn file_to_device_through_registered_pinned_chunks() {
    let Some(gpu) = gpu() else { return };
    // The system temp folder: this executable also runs from a copy on GPU hosts.
    let dir = tempfile::tempdir().unwrap();
    let data = pattern((8 << 20) + 123, 3);
    let path = dir.path().join("f.bin");
    std::fs::write(&path, &data).unwrap();
    let pool = PinnedPool::new(&gpu, 4 << 20, 1 << 20).unwrap();
    let reader = Reader::builder().backend(BackendKind::Uring).build();
    // SAFETY: `pool` is declared before `reader`, so it outlives it.
    let registered = unsafe { pool.register_with(&reader) };
    eprintln!("fixed buffers: {registered:?}, {:?}", reader.report().fixed_buffers);
    let file = reader.open(&path).unwrap();
    let arena = Arc::new(DeviceArena::new(&gpu, data.len()).unwrap());
    let mut engine = CopyEngine::new(&gpu, 2).unwrap();
    let mut offset = 0;
    while offset < data.len() {
        let n = (data.len() - offset).min(1 << 20);
        let c = reader.read(&file, offset as u64, pool.acquire(), 0, n).wait().map_err(|f| f.error).unwrap();
        engine.copy(c, &arena, &[Piece { src_offset: 0, dst_offset: offset, len: n }]).unwrap();
        offset += n;
    }
    engine.synchronize().unwrap();
    let mut back = vec![0u8; data.len()];
    arena.copy_to_host(0, &mut back).unwrap();
    assert!(back == data);
    drop(engine);
    drop(reader);
}
