//! The copy layer: bytes go file -> pinned chunk -> device -> host unchanged, chunks come
//! back only after their copies, and nothing leaks. Against the emulated driver by default
//! (CI has no GPU), and unchanged against a real one with `TENSORLIFT_TEST_DRIVER=real`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tensorlift_cuda::emulator::{self, Fault};
use tensorlift_cuda::{
    cuda_status, CopyEngine, CudaError, CudaStatus, DeviceArena, Gpu, PageCacheRange, Piece, PinnedPool,
};
use tensorlift_io::{BackendKind, DmaWindow, Reader};
use tensorlift_testkit::pattern;

/// One test at a time: the driver's counts and faults are the process's.
struct Driver(#[allow(dead_code)] MutexGuard<'static, ()>);

impl Drop for Driver {
    fn drop(&mut self) {
        // Every test ends with nothing of its own left on the device.
        if let Some(live) = emulator::live() {
            let t = Instant::now();
            let mut live = live;
            while (live.allocations, live.registrations, live.streams, live.events) != (0, 0, 0, 0)
                && t.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(5));
                live = emulator::live().unwrap_or_default();
            }
            if !std::thread::panicking() {
                assert_eq!((live.allocations, live.registrations, live.streams, live.events), (0, 0, 0, 0), "{live:?}");
            }
        }
        emulator::reset();
    }
}

fn gpu() -> (Driver, Gpu) {
    static ONE: Mutex<()> = Mutex::new(());
    let guard = Driver(ONE.lock().unwrap_or_else(|p| p.into_inner()));
    if !tensorlift_testkit::real_driver() {
        // SAFETY: tensorlift's emulated driver, which defines the driver API as it is.
        unsafe { tensorlift_cuda::use_driver_library(tensorlift_testkit::emulated_driver()) };
        assert!(emulator::is_emulated(), "{}", cuda_status());
        emulator::reset();
    }
    match cuda_status() {
        CudaStatus::Available(_) => (guard, Gpu::open(0).expect("the probe found a device, so it opens")),
        CudaStatus::Unavailable(why) => panic!("no usable CUDA driver: {why}"),
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
    let (_driver, gpu) = gpu();
    const MIB: usize = 1 << 20;
    let pool = PinnedPool::new(&gpu, 4 * MIB, MIB).unwrap();
    let arena = Arc::new(DeviceArena::new(&gpu, 16 * MIB).unwrap());
    let mut engine = CopyEngine::new(&gpu, 3).unwrap();
    // Slow copies: a chunk handed back before its copy ran would be overwritten first.
    emulator::set_fault(Fault::CopyDelayMicros(2000));
    let data = pattern(16 * MIB, 1);
    // 16 chunks through a pool of 4: acquire blocks until copies complete.
    for i in 0..16 {
        let mut c = pool.acquire();
        c.as_mut_slice().copy_from_slice(&data[i * MIB..(i + 1) * MIB]);
        engine.copy(c, &arena, &[Piece::flat(0, i * MIB, MIB)]).unwrap();
    }
    engine.synchronize().unwrap();
    wait_all_free(&pool);
    let mut back = vec![0u8; 16 * MIB];
    arena.copy_to_host(0, &mut back).unwrap();
    assert!(back == data);
}

#[test]
fn pieces_scatter_one_chunk() {
    let (_driver, gpu) = gpu();
    let pool = PinnedPool::new(&gpu, 1 << 20, 1 << 20).unwrap();
    let arena = Arc::new(DeviceArena::new(&gpu, 4096).unwrap());
    let mut engine = CopyEngine::new(&gpu, 2).unwrap();
    let mut c = pool.acquire();
    c.as_mut_slice()[..300].copy_from_slice(&pattern(300, 2));
    let want = c.as_slice()[..300].to_vec();
    let pieces = [Piece::flat(0, 256, 100), Piece::flat(100, 1024, 200)];
    engine.copy(c, &arena, &pieces).unwrap();
    engine.synchronize().unwrap();
    let mut a = vec![0u8; 100];
    let mut b = vec![0u8; 200];
    arena.copy_to_host(256, &mut a).unwrap();
    arena.copy_to_host(1024, &mut b).unwrap();
    assert_eq!(a, want[..100]);
    assert_eq!(b, want[100..]);
}

/// Defect: a completion callback that panicked unwound the completion thread, which
/// dropped every copy queued behind it (its chunk back in the pool while the device still
/// read it) and never reported their tags. The panic is contained: the copies behind it
/// complete and are reported, their chunks come back after them, and the engine reports
/// the panic.
#[test]
fn a_panicking_completion_callback_releases_nothing_early() {
    let (_driver, gpu) = gpu();
    const MIB: usize = 1 << 20;
    let pool = PinnedPool::new(&gpu, 4 * MIB, MIB).unwrap();
    let arena = Arc::new(DeviceArena::new(&gpu, 4 * MIB).unwrap());
    let reported = Arc::new(Mutex::new(Vec::new()));
    let r = Arc::clone(&reported);
    let on_copied = Box::new(move |tag: u64, result: Result<(), CudaError>| {
        r.lock().unwrap().push((tag, result.is_ok()));
        assert_ne!(tag, 0, "the caller's callback panics on tag 0");
    });
    let mut engine = CopyEngine::with_completion(&gpu, 2, on_copied).unwrap();
    // Slow copies: those behind the first are still in flight when its callback panics.
    emulator::set_fault(Fault::CopyDelayMicros(20_000));
    let data = pattern(4 * MIB, 5);
    for i in 0..4 {
        let mut c = pool.acquire();
        c.as_mut_slice().copy_from_slice(&data[i * MIB..(i + 1) * MIB]);
        engine.copy_tagged(c, &arena, &[Piece::flat(0, i * MIB, MIB)], i as u64).unwrap();
    }
    let t = Instant::now();
    while reported.lock().unwrap().len() < 4 {
        assert!(t.elapsed() < Duration::from_secs(10), "reported: {:?}", reported.lock().unwrap());
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(*reported.lock().unwrap(), [(0, true), (1, true), (2, true), (3, true)]);
    let err = engine.synchronize().unwrap_err();
    assert!(err.to_string().contains("the completion callback panicked"), "{err}");
    wait_all_free(&pool);
    let mut back = vec![0u8; 4 * MIB];
    arena.copy_to_host(0, &mut back).unwrap();
    assert!(back == data);
}

/// A chunk size or budget near the address space's end is an error, not an overflow.
#[test]
fn a_staging_pool_too_large_to_address_is_refused() {
    let (_driver, gpu) = gpu();
    for (budget, chunk) in [(usize::MAX, usize::MAX - 5), (usize::MAX, usize::MAX / 2 + 4096)] {
        match PinnedPool::new(&gpu, budget, chunk) {
            Err(CudaError::OutOfMemory { what: "staging memory", .. }) => {}
            other => panic!("{budget} {chunk}: {other:?}"),
        }
    }
}

#[test]
fn out_of_bounds_copies_are_refused() {
    let (_driver, gpu) = gpu();
    let pool = PinnedPool::new(&gpu, 1 << 20, 1 << 20).unwrap();
    let arena = Arc::new(DeviceArena::new(&gpu, 4096).unwrap());
    let mut engine = CopyEngine::new(&gpu, 1).unwrap();
    let e = engine.copy(pool.acquire(), &arena, &[Piece::flat(0, 4000, 200)]).unwrap_err();
    assert!(matches!(e, CudaError::OutOfBounds { what: "device arena", .. }));
    let e = engine.copy(pool.acquire(), &arena, &[Piece::flat((1 << 20) - 10, 0, 20)]).unwrap_err();
    assert!(matches!(e, CudaError::OutOfBounds { what: "host source", .. }));
    assert!(matches!(arena.copy_to_host(4090, &mut [0u8; 10]), Err(CudaError::OutOfBounds { .. })));
    // The refused copies gave their chunks back.
    wait_all_free(&pool);
}

#[test]
fn file_to_device_through_registered_pinned_chunks() {
    let (_driver, gpu) = gpu();
    // The system temp folder: this executable also runs from a copy on GPU hosts.
    let dir = tempfile::tempdir().unwrap();
    let data = pattern((8 << 20) + 123, 3);
    let path = dir.path().join("f.bin");
    std::fs::write(&path, &data).unwrap();
    let pool = PinnedPool::new(&gpu, 4 << 20, 1 << 20).unwrap();
    let reader = Reader::builder().backend(BackendKind::Uring).build();
    let registered = pool.register_with(&reader);
    eprintln!("fixed buffers: {registered:?}, {:?}", reader.report().fixed_buffers);
    let file = reader.open(&path).unwrap();
    let arena = Arc::new(DeviceArena::new(&gpu, data.len()).unwrap());
    let mut engine = CopyEngine::new(&gpu, 2).unwrap();
    let mut offset = 0;
    while offset < data.len() {
        let n = (data.len() - offset).min(1 << 20);
        let c = reader.read(&file, offset as u64, pool.acquire(), 0, n).wait().map_err(|f| f.error).unwrap();
        engine.copy(c, &arena, &[Piece::flat(0, offset, n)]).unwrap();
        offset += n;
    }
    engine.synchronize().unwrap();
    let mut back = vec![0u8; data.len()];
    arena.copy_to_host(0, &mut back).unwrap();
    assert!(back == data);
    drop(engine);
    drop(reader);
}

#[test]
fn a_failed_copy_keeps_its_chunk_until_earlier_copies_finish() {
    let (_driver, gpu) = gpu();
    if !emulator::is_emulated() {
        eprintln!("skipped on a real driver: needs the emulator's injected copy failure");
        return;
    }
    let pool = PinnedPool::new(&gpu, 2 << 20, 1 << 20).unwrap();
    let arena = Arc::new(DeviceArena::new(&gpu, 4 << 20).unwrap());
    let mut engine = CopyEngine::new(&gpu, 2).unwrap();
    emulator::set_fault(Fault::CopyDelayMicros(20_000));
    emulator::set_fault(Fault::FailCopy(3));
    let mut c = pool.acquire();
    c.as_mut_slice().copy_from_slice(&pattern(1 << 20, 9));
    let want = c.as_slice().to_vec();
    // Four pieces: the first two are queued (and slow), the third fails.
    let pieces: Vec<Piece> = (0..4).map(|i| Piece::flat(i << 18, i << 18, 1 << 18)).collect();
    let err = engine.copy(c, &arena, &pieces).unwrap_err();
    assert!(matches!(err, CudaError::Driver { call: "cuMemcpyHtoDAsync", .. }), "{err}");
    // The chunk is not back yet: the two queued copies still read it.
    assert_eq!(pool.free_chunks(), 1);
    // The failure was the caller's to handle; the engine itself is still usable.
    engine.synchronize().unwrap();
    wait_all_free(&pool);
    let mut back = vec![0u8; 1 << 19];
    arena.copy_to_host(0, &mut back).unwrap();
    assert_eq!(back, want[..1 << 19]);
}

#[test]
fn device_memory_is_reported_and_runs_out_cleanly() {
    let (_driver, gpu) = gpu();
    let (free, total) = gpu.memory_info().unwrap();
    assert!(free <= total && total > 0);
    let a = DeviceArena::new(&gpu, 1 << 20).unwrap();
    let (free2, _) = gpu.memory_info().unwrap();
    assert!(free2 <= free - (1 << 20) || !emulator::is_emulated());
    drop(a);
    let e = DeviceArena::new(&gpu, usize::MAX / 2).unwrap_err();
    assert!(matches!(e, CudaError::OutOfMemory { .. }), "{e}");
}

/// A driver result that the CUDA 12.8 bindings have no value for (917, which CUDA 13.1 added;
/// 12345, which no version defines) is an error carrying its number, named by the driver
/// where it names it: tensorlift reads results as integers, never as an enum a newer driver
/// could hand an invalid value of.
#[test]
fn a_result_code_the_bindings_do_not_know_is_an_error_with_its_number() {
    let (_driver, gpu) = gpu();
    if !emulator::is_emulated() {
        eprintln!("skipped on a real driver: needs the emulator's injected result");
        return;
    }
    for code in [917u32, 12_345] {
        emulator::set_fault(Fault::AllocResult(code));
        let e = DeviceArena::new(&gpu, 1 << 20).unwrap_err();
        let CudaError::Driver { call: "cuMemAlloc", source } = &e else { panic!("{e}") };
        assert_eq!((source.code(), source.name()), (code as i32, None), "{e}");
        assert_eq!(e.to_string(), format!("cuMemAlloc failed: CUDA error {code} (a code this driver does not name)"));
    }
    // A code the driver names is named by it.
    emulator::set_fault(Fault::AllocResult(201));
    let e = DeviceArena::new(&gpu, 1 << 20).unwrap_err();
    assert_eq!(e.to_string(), "cuMemAlloc failed: CUDA_ERROR_INVALID_CONTEXT (201)");
    emulator::set_fault(Fault::AllocResult(0));
    drop(DeviceArena::new(&gpu, 1 << 20).unwrap());
}

/// A cudarc slice on its context's default stream (the null handle, which names the legacy
/// stream of whatever context is current), lent from a thread with no context current: the
/// wait for its allocation and zeroing runs in the slice's own context, and the thread is
/// left with none, as it was.
#[test]
fn a_slice_on_cudarcs_default_stream_is_waited_for_in_its_own_context() {
    use cudarc::driver::{sys, CudaContext, CudaSlice};
    let (_driver, gpu) = gpu();
    let ctx = CudaContext::new(0).unwrap();
    let slice = ctx.default_stream().alloc_zeros::<u32>(1024).unwrap();
    // SAFETY: unbinds this thread's context; nothing of the test's is left using it.
    assert_eq!(unsafe { sys::cuCtxSetCurrent(std::ptr::null_mut()) }, sys::CUresult::CUDA_SUCCESS);
    let lent = tensorlift_cuda::LentMemory::from_cuda_slice(slice).unwrap();
    let mut current = std::ptr::null_mut();
    // SAFETY: writes one context handle.
    assert_eq!(unsafe { sys::cuCtxGetCurrent(&mut current) }, sys::CUresult::CUDA_SUCCESS);
    assert!(current.is_null(), "the thread's (absent) context is restored");
    let arena = DeviceArena::lent(&gpu, lent).unwrap();
    let mut back = vec![1u8; 4096];
    arena.copy_to_host(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0), "the zeroing is done");
    assert_eq!(arena.into_owner().unwrap().downcast::<CudaSlice<u32>>().unwrap().len(), 1024);
    drop(ctx);
}

#[test]
fn async_copies_from_pageable_memory_are_refused_by_the_emulator() {
    use cudarc::driver::{sys, CudaContext};
    let (_driver, gpu) = gpu();
    if !emulator::is_emulated() {
        return;
    }
    // The guard that lets every CUDA test catch a copy from pageable memory (which the load
    // path promises never to make): refused; the same bytes registered first are copied.
    let arena = DeviceArena::new(&gpu, 4096).unwrap();
    let ctx = CudaContext::new(0).unwrap();
    ctx.bind_to_thread().unwrap();
    let mut pageable = vec![7u8; 4096];
    let copy = |src: &[u8]| {
        // SAFETY: `src` is live for the call and the synchronize after it; the device range
        // is the arena's, 4096 bytes.
        let r =
            unsafe { sys::cuMemcpyHtoDAsync_v2(arena.device_ptr(), src.as_ptr().cast(), 4096, std::ptr::null_mut()) };
        // SAFETY: a wait on the context bound above.
        assert_eq!(unsafe { sys::cuCtxSynchronize() }, sys::CUresult::CUDA_SUCCESS);
        r
    };
    assert_eq!(copy(&pageable), sys::CUresult::CUDA_ERROR_INVALID_VALUE);
    // SAFETY: registers (then unregisters) a live Vec of 4096 bytes that outlives both.
    let r = unsafe { sys::cuMemHostRegister_v2(pageable.as_mut_ptr().cast(), 4096, 0) };
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
    assert_eq!(copy(&pageable), sys::CUresult::CUDA_SUCCESS);
    // SAFETY: registered above; no copy from it is in flight (synchronized).
    assert_eq!(unsafe { sys::cuMemHostUnregister(pageable.as_mut_ptr().cast()) }, sys::CUresult::CUDA_SUCCESS);
    let mut back = vec![0u8; 4096];
    arena.copy_to_host(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 7), "the registered copy landed");
    drop(ctx);
    let pool = PinnedPool::new(&gpu, 1 << 20, 1 << 20).unwrap();
    drop(pool);
    // Registration refused: the pool reports it and allocates nothing.
    emulator::set_fault(Fault::RefuseRegister(true));
    let e = PinnedPool::new(&gpu, 1 << 20, 1 << 20).unwrap_err();
    assert!(matches!(e, CudaError::Driver { call: "cuMemHostRegister", .. }), "{e}");
}

/// A program's own current context (another device, another library's) survives every call
/// tensorlift makes on its thread, and the drops of what tensorlift made.
#[test]
fn the_callers_current_context_is_left_as_it_was() {
    let (_driver, _) = gpu();
    if !emulator::is_emulated() {
        return;
    }
    let theirs = 0x5eed_0000;
    std::thread::spawn(move || {
        emulator::set_current_context(theirs);
        let gpu = Gpu::open(0).unwrap();
        assert_eq!(emulator::current_context(), Some(theirs), "Gpu::open");
        let (free, _) = gpu.memory_info().unwrap();
        assert!(free > 0);
        let pool = PinnedPool::new(&gpu, 1 << 20, 1 << 20).unwrap();
        let arena = Arc::new(DeviceArena::new(&gpu, 1 << 20).unwrap());
        let mut engine = CopyEngine::new(&gpu, 2).unwrap();
        engine.copy(pool.acquire(), &arena, &[Piece::flat(0, 0, 4096)]).unwrap();
        engine.synchronize().unwrap();
        arena.copy_to_host(0, &mut [0u8; 16]).unwrap();
        assert_eq!(emulator::current_context(), Some(theirs), "copies");
        drop(engine);
        drop(arena);
        drop(pool);
        drop(gpu);
        assert_eq!(emulator::current_context(), Some(theirs), "drops");
    })
    .join()
    .unwrap();
}

/// The kernels convert on the device; launches outside their arenas, misaligned,
/// overlapping, or of a pair no kernel converts are refused before they reach the device.
#[test]
fn conversion_kernels_run_and_misuse_is_refused() {
    use tensorlift_cuda::{KernelType, Kernels};
    let (_driver, gpu) = gpu();
    let kernels = Arc::new(Kernels::load(&gpu).unwrap());
    let src = Arc::new(DeviceArena::new(&gpu, 4096).unwrap());
    let dst = Arc::new(DeviceArena::new(&gpu, 8192).unwrap());
    let values: Vec<u8> =
        [1.5f32, -2.0, 0.0, 65504.0].iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
    src.copy_from_host(0, &values).unwrap();
    let mut engine = CopyEngine::new(&gpu, 2).unwrap();
    let bf16_f32 = (KernelType::BF16, KernelType::F32);
    engine.convert_tagged(&kernels, bf16_f32, (&src, 0), (&dst, 256), 4, 7).unwrap();
    engine.synchronize().unwrap();
    let mut out = [0u8; 16];
    dst.copy_to_host(256, &mut out).unwrap();
    let got: Vec<f32> = out.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(got, [1.5, -2.0, 0.0, 65536.0]);
    let refused = |e: Result<(), CudaError>| matches!(e, Err(CudaError::OutOfBounds { .. }));
    assert!(refused(engine.convert_tagged(&kernels, bf16_f32, (&src, 4094), (&dst, 0), 2, 0)), "past the source");
    assert!(refused(engine.convert_tagged(&kernels, bf16_f32, (&src, 0), (&dst, 8190), 2, 0)), "past the target");
    assert!(refused(engine.convert_tagged(&kernels, bf16_f32, (&src, 1), (&dst, 0), 2, 0)), "misaligned source");
    assert!(refused(engine.convert_tagged(&kernels, bf16_f32, (&src, 0), (&dst, 2), 2, 0)), "misaligned target");
    assert!(refused(engine.convert_tagged(&kernels, bf16_f32, (&src, 0), (&src, 0), 2, 0)), "overlapping");
    let to_fp8 = (KernelType::F32, KernelType::F8E4M3);
    assert!(refused(engine.convert_tagged(&kernels, to_fp8, (&dst, 0), (&src, 0), 2, 0)), "no such kernel");
    drop((engine, kernels));
    if let Some(live) = emulator::live() {
        assert_eq!(live.modules, 0, "the module is unloaded with the kernels");
    }
}

/// Defect: what a finished copy held was released on the completion thread, and a panic in
/// its drop (a token of the caller's, an owner of lent memory) was recorded only for the
/// engine's next call, which a load's last copy never makes: the callback heard "done". It
/// now hears the failure.
#[test]
fn a_panic_releasing_the_last_copys_memory_reaches_the_callback() {
    struct PanicsOnDrop;
    impl Drop for PanicsOnDrop {
        fn drop(&mut self) {
            panic!("the caller's token panics when dropped");
        }
    }
    let (_driver, gpu) = gpu();
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(8192, 3);
    let path = dir.path().join("f.bin");
    std::fs::write(&path, &data).unwrap();
    let file = Reader::builder().backend(BackendKind::Pread).build().open(&path).unwrap();
    let arena = Arc::new(DeviceArena::new(&gpu, data.len()).unwrap());
    let reported = Arc::new(Mutex::new(Vec::new()));
    let r = Arc::clone(&reported);
    let on_copied = Box::new(move |tag: u64, result: Result<(), CudaError>| {
        r.lock().unwrap().push((tag, result.map_err(|e| e.to_string())));
    });
    let mut engine = CopyEngine::with_completion(&gpu, 1, on_copied).unwrap();
    let range = PageCacheRange::register(&gpu, DmaWindow::map(&file, 0, data.len()).unwrap()).unwrap();
    let pieces = [Piece::flat(0, 0, data.len())];
    engine.copy_from_page_cache(range, Box::new(PanicsOnDrop), &[(&arena, &pieces)], 7).unwrap();
    let t = Instant::now();
    while reported.lock().unwrap().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10), "no report");
        std::thread::sleep(Duration::from_millis(1));
    }
    let reported = reported.lock().unwrap().clone();
    assert_eq!(reported, [(7, Err("CUDA is unavailable: releasing a finished copy's memory panicked".to_owned()))]);
    // The copy itself completed: the bytes are there.
    let mut back = vec![0u8; data.len()];
    arena.copy_to_host(0, &mut back).unwrap();
    assert!(back == data);
}

/// A file's ranges in the page cache, registered read-only, copy to the device by DMA with
/// the file's bytes: ranges that start and end inside pages (as a shard's chunks do), plain
/// and 2D, each unpinned once its copies have completed.
#[test]
fn ranges_of_the_page_cache_copy_to_the_device() {
    let (_driver, gpu) = gpu();
    let dir = tempfile::tempdir().unwrap();
    let data = pattern((3 << 20) + 777, 5);
    let path = dir.path().join("f.bin");
    std::fs::write(&path, &data).unwrap();
    let reader = Reader::builder().backend(BackendKind::Pread).build();
    let file = reader.open(&path).unwrap();
    let arena = Arc::new(DeviceArena::new(&gpu, data.len()).unwrap());
    let mut engine = CopyEngine::new(&gpu, 2).unwrap();
    let before = emulator::read_only_copies();
    let (mut offset, mut copies) = (0usize, 0u64);
    for n in [1usize, 4095, 1 << 20, 12_345, 4096, usize::MAX].into_iter().cycle() {
        let n = n.min(data.len() - offset);
        let window = DmaWindow::map(&file, offset as u64, n).unwrap();
        let range = match PageCacheRange::register(&gpu, window) {
            Ok(r) => r,
            Err(e) if !emulator::is_emulated() => {
                eprintln!("skipped: this device does not register the page cache read-only: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(range.len(), n);
        // Past the range: refused before anything is queued.
        let past = engine.copy_from_page_cache(range, Box::new(()), &[(&arena, &[Piece::flat(1, offset, n)])], 0);
        assert!(matches!(past, Err(CudaError::OutOfBounds { what: "host source", .. })), "{past:?}");
        let range = PageCacheRange::register(&gpu, DmaWindow::map(&file, offset as u64, n).unwrap()).unwrap();
        engine.copy_from_page_cache(range, Box::new(()), &[(&arena, &[Piece::flat(0, offset, n)])], 0).unwrap();
        copies += 1;
        offset += n;
        if offset == data.len() {
            break;
        }
    }
    // Rows of 100 bytes, 300 apart in the file, packed on the device.
    let rows = 1000;
    let gathered = Arc::new(DeviceArena::new(&gpu, rows * 100).unwrap());
    let range = PageCacheRange::register(&gpu, DmaWindow::map(&file, 5, rows * 300).unwrap()).unwrap();
    let piece = Piece { src_offset: 0, dst_offset: 0, len: 100, rows, src_pitch: 300, dst_pitch: 100 };
    engine.copy_from_page_cache(range, Box::new(()), &[(&gathered, &[piece])], 0).unwrap();
    engine.synchronize().unwrap();
    let mut back = vec![0u8; data.len()];
    arena.copy_to_host(0, &mut back).unwrap();
    assert!(back == data);
    let mut rows_back = vec![0u8; rows * 100];
    gathered.copy_to_host(0, &mut rows_back).unwrap();
    let want: Vec<u8> = (0..rows).flat_map(|r| data[5 + r * 300..5 + r * 300 + 100].iter().copied()).collect();
    assert!(rows_back == want);
    // The device read them where they were registered read-only: every copy, every row.
    if let (Some(a), Some(b)) = (before, emulator::read_only_copies()) {
        assert_eq!(b - a, copies + rows as u64);
    }
    drop(engine);
}

/// The emulated driver pins as a real one: a read-only mapping is refused unless it is
/// registered read-only, a device write into memory registered read-only faults, and a
/// device without read-only registration says `CUDA_ERROR_NOT_SUPPORTED`.
#[test]
fn the_emulator_pins_read_only_memory_as_the_driver_does() {
    use cudarc::driver::sys;
    let (_driver, gpu) = gpu();
    if !emulator::is_emulated() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.bin");
    std::fs::write(&path, pattern(3 * 4096, 1)).unwrap();
    let file = Reader::builder().backend(BackendKind::Pread).build().open(&path).unwrap();
    let window = DmaWindow::map(&file, 100, 8000).unwrap();
    let (base, len) = window.pages();
    assert_eq!((base as usize % 4096, len), (0, 8192));
    // SAFETY: registers a live mapping of `len` bytes (refused, so nothing to undo): with no
    // context current, as a registration needs one, then in device 0's primary context.
    let r = unsafe { sys::cuMemHostRegister_v2(base.cast_mut().cast(), len, 0) };
    assert_eq!(r, sys::CUresult::CUDA_ERROR_INVALID_CONTEXT);
    // So does an event.
    let mut event = std::ptr::null_mut();
    // SAFETY: an out-parameter of the driver API (refused: nothing is made).
    let r = unsafe { sys::cuEventCreate(&mut event, 0) };
    assert_eq!(r, sys::CUresult::CUDA_ERROR_INVALID_CONTEXT);
    let mut ctx = std::ptr::null_mut();
    // SAFETY: a driver API out-parameter, for device 0, which exists.
    assert_eq!(unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, 0) }, sys::CUresult::CUDA_SUCCESS);
    // SAFETY: the context just retained.
    assert_eq!(unsafe { sys::cuCtxSetCurrent(ctx) }, sys::CUresult::CUDA_SUCCESS);
    // SAFETY: as above.
    let r = unsafe { sys::cuMemHostRegister_v2(base.cast_mut().cast(), len, 0) };
    assert_eq!(r, sys::CUresult::CUDA_ERROR_INVALID_VALUE);
    // An event of device 0's context, recorded on a stream of device 1's: refused, as a real
    // driver refuses an event and a stream of two contexts.
    // SAFETY: an out-parameter of the driver API, in the context made current above.
    assert_eq!(unsafe { sys::cuEventCreate(&mut event, 0) }, sys::CUresult::CUDA_SUCCESS);
    let mut other = std::ptr::null_mut();
    // SAFETY: a driver API out-parameter, for device 1, which the emulator has.
    assert_eq!(unsafe { sys::cuDevicePrimaryCtxRetain(&mut other, 1) }, sys::CUresult::CUDA_SUCCESS);
    // SAFETY: the context just retained.
    assert_eq!(unsafe { sys::cuCtxSetCurrent(other) }, sys::CUresult::CUDA_SUCCESS);
    let mut stream = std::ptr::null_mut();
    // SAFETY: an out-parameter of the driver API, in device 1's context.
    assert_eq!(unsafe { sys::cuStreamCreate(&mut stream, 0) }, sys::CUresult::CUDA_SUCCESS);
    // SAFETY: both handles are live.
    assert_eq!(unsafe { sys::cuEventRecord(event, stream) }, sys::CUresult::CUDA_ERROR_INVALID_HANDLE);
    // SAFETY: the handles made above, destroyed once.
    assert_eq!(unsafe { sys::cuStreamDestroy_v2(stream) }, sys::CUresult::CUDA_SUCCESS);
    // SAFETY: as above.
    assert_eq!(unsafe { sys::cuEventDestroy_v2(event) }, sys::CUresult::CUDA_SUCCESS);
    // SAFETY: no context current on this thread, as before.
    unsafe { sys::cuCtxSetCurrent(std::ptr::null_mut()) };
    // SAFETY: the references retained above, let go.
    unsafe { sys::cuDevicePrimaryCtxRelease_v2(0) };
    // SAFETY: as above.
    unsafe { sys::cuDevicePrimaryCtxRelease_v2(1) };
    let range = PageCacheRange::register(&gpu, window).unwrap();
    let arena = DeviceArena::new(&gpu, 4096).unwrap();
    // SAFETY: the emulator refuses the write before touching the host range (which is a live,
    // read-only mapping: the write would fault if it were made).
    let r = unsafe { sys::cuMemcpyDtoH_v2(base.cast_mut().cast(), arena.device_ptr(), 16) };
    assert_eq!(r, sys::CUresult::CUDA_ERROR_ILLEGAL_ADDRESS);
    emulator::reset();
    drop(range);
    emulator::set_fault(Fault::NoReadOnlyRegister(true));
    let e = PageCacheRange::register(&gpu, DmaWindow::map(&file, 0, 4096).unwrap()).unwrap_err();
    assert!(e.to_string().contains("CUDA_ERROR_NOT_SUPPORTED"), "{e}");
    // Where registering would not pin (the device reads through the host's page tables),
    // it is refused before it is made.
    emulator::reset();
    emulator::set_fault(Fault::HostPageTables(true));
    let e = PageCacheRange::register(&gpu, DmaWindow::map(&file, 0, 4096).unwrap()).unwrap_err();
    emulator::reset();
    assert!(e.to_string().contains("PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES"), "{e}");
    let info = match cuda_status() {
        CudaStatus::Available(d) => d.devices[0].read_only_host_register,
        CudaStatus::Unavailable(why) => panic!("{why}"),
    };
    assert_eq!(info, Some(true), "probed before the fault, when the device had it");
}
