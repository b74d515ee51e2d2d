//! Every load scenario on the CUDA path: against the emulated driver (CI has no GPU), and
//! unchanged against a real one with `TENSORLIFT_TEST_DRIVER=real` (`scripts/gpu-host`).
//! Each test ends by checking, on the emulator, that nothing is left on the device.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tensorlift::BackendKind;
use tensorlift::{Device, DirectIo, Dtype, LoadError, Loader, LoaderBuilder, Model};
use tensorlift_cuda::emulator::{self, Fault};
use tensorlift_testkit::{write_shard, write_sharded, Spec};

mod devices;
mod page_cache;

/// One test at a time (the driver's counts and faults are the process's); on drop, checks
/// that the test left nothing alive on the device, and clears the faults.
struct Driver(#[allow(dead_code)] MutexGuard<'static, ()>);

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(mut live) = emulator::live() {
            let t = Instant::now();
            let busy =
                |l: &emulator::Live| (l.allocations, l.registrations, l.streams, l.events, l.contexts, l.modules);
            while busy(&live) != (0, 0, 0, 0, 0, 0) && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(5));
                live = emulator::live().unwrap_or_default();
            }
            if !std::thread::panicking() {
                assert_eq!(busy(&live), (0, 0, 0, 0, 0, 0), "left on the device: {live:?}");
            }
        }
        emulator::reset();
    }
}

fn driver() -> Driver {
    static ONE: Mutex<()> = Mutex::new(());
    let guard = Driver(ONE.lock().unwrap_or_else(|p| p.into_inner()));
    if !tensorlift_testkit::real_driver() {
        // SAFETY: tensorlift's emulated driver, which defines the driver API as it is.
        unsafe { tensorlift_cuda::use_driver_library(tensorlift_testkit::emulated_driver()) };
        assert!(emulator::is_emulated(), "{}", tensorlift_cuda::cuda_status());
        emulator::reset();
    }
    guard
}

fn scratch() -> PathBuf {
    // The system temp folder: this executable also runs from a copy on GPU hosts.
    tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cuda-")
}

fn base() -> LoaderBuilder {
    Loader::builder().device(Device::Cuda(0)).queue_depth(8)
}

/// Every tensor on the device, at a 256-byte aligned address, with the file's bytes.
fn assert_on_device(model: &Model, truth: &BTreeMap<String, Vec<u8>>, what: &str) {
    assert_eq!(model.len(), truth.len(), "{what}: tensor count");
    for (name, want) in truth {
        let t = model.get(name).unwrap_or_else(|| panic!("{what}: {name} missing"));
        assert_eq!(t.location(), Device::Cuda(0), "{what}: {name}");
        let ptr = t.device_ptr().unwrap();
        assert_eq!(ptr % 256, 0, "{what}: {name} at {ptr:#x}");
        assert!(t.bytes().is_err(), "{what}: a device tensor has no host view");
        let got = t.to_host().unwrap();
        assert!(got.as_ref() == want.as_slice(), "{what}: {name} differs ({} vs {} bytes)", got.len(), want.len());
    }
}

fn quirky() -> Vec<Spec<'static>> {
    vec![
        ("bool", Dtype::BOOL, &[3]),
        ("f32_after_3_bytes", Dtype::F32, &[5, 7]),
        ("u8", Dtype::U8, &[4097]),
        ("f8_e4m3", Dtype::F8_E4M3, &[3, 3]),
        ("i16", Dtype::I16, &[33]),
        ("f16", Dtype::F16, &[64, 65]),
        ("bf16", Dtype::BF16, &[3000]),
        ("scalar_f32", Dtype::F32, &[]),
        ("empty", Dtype::F32, &[0, 16]),
        ("f64", Dtype::F64, &[2, 3, 4]),
        ("c64", Dtype::C64, &[3]),
        ("f4", Dtype::F4, &[6]),
        ("f6_e2m3", Dtype::F6_E2M3, &[4]),
        ("big", Dtype::F32, &[300, 1000]),
        ("tail_u8", Dtype::U8, &[13]),
    ]
}

#[test]
fn every_dtype_and_layout_lands_on_the_device() {
    let _d = driver();
    let dir = scratch();
    let path = dir.join("quirky.safetensors");
    let truth = write_shard(&path, &quirky());
    // Slow copies and a small pinned budget: a chunk reused before its copy ran would show.
    emulator::set_fault(Fault::CopyDelayMicros(300));
    for chunk in [4096usize, 64 << 10, 1 << 20] {
        for backend in [BackendKind::Uring, BackendKind::Pread] {
            // Buffered reads, into staging or copied from the page cache.
            for (direct, dma) in [(DirectIo::Always, false), (DirectIo::Never, false), (DirectIo::Never, true)] {
                let what = format!("{backend}/{direct:?}/dma {dma}/chunk {chunk}");
                let loader = base()
                    .io_backend(backend)
                    .direct_io(direct)
                    .page_cache_dma(dma)
                    .chunk_size(chunk)
                    .staging_budget(3 * chunk)
                    .build()
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(loader.device(), Device::Cuda(0));
                let model = loader.load_blocking(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_on_device(&model, &truth, &what);
                assert!(model.stats().max_in_flight_bytes <= (3 * chunk) as u64, "{what}");
                assert_eq!(model.stats().device, tensorlift::Device::Cuda(0));
            }
        }
    }
}

/// A PyTorch file whose `lm_head.weight` is `embed.weight` (tied), beside views of the
/// same storage: every name lands with its bytes, and the twins share one place on the
/// device, copied once. (The fixture's bytes are in this executable: it also runs from a
/// copy on GPU hosts.)
#[test]
fn tied_pytorch_weights_share_device_memory() {
    let _d = driver();
    let (dir, truth) = tied_pytorch_checkpoint();
    let model = base().chunk_size(4096).build().unwrap().load_blocking(&dir).unwrap();
    assert_on_device(&model, &truth, "tied");
    let ptr = |name: &str| model.get(name).unwrap().device_ptr().unwrap();
    assert_eq!(ptr("embed.weight"), ptr("lm_head.weight"));
}

/// A folder with the tied PyTorch fixture as `pytorch_model.bin`, and each tensor's bytes as
/// torch reads them.
fn tied_pytorch_checkpoint() -> (PathBuf, BTreeMap<String, Vec<u8>>) {
    let expect: serde_json::Value =
        serde_json::from_str(include_str!("../../../tensorlift-pickle/tests/fixtures/tied.expect.json")).unwrap();
    let hex = |s: &str| (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect();
    let truth = expect.as_object().unwrap().iter().map(|(k, t)| (k.clone(), hex(t["hex"].as_str().unwrap()))).collect();
    let dir = scratch();
    std::fs::write(
        dir.join("pytorch_model.bin"),
        include_bytes!("../../../tensorlift-pickle/tests/fixtures/tied.zip.bin"),
    )
    .unwrap();
    (dir, truth)
}

#[test]
fn sharded_folders_and_filters() {
    let _d = driver();
    let dir = scratch();
    let a: Vec<Spec<'_>> = vec![("embed", Dtype::BF16, &[1000, 64]), ("l0.w", Dtype::F16, &[64, 300])];
    let b: Vec<Spec<'_>> = vec![("l1.w", Dtype::F16, &[64, 300]), ("norm", Dtype::F32, &[64])];
    let c: Vec<Spec<'_>> = vec![("head", Dtype::BF16, &[513, 64])];
    let truth = write_sharded(&dir, &[&a, &b, &c]);
    let loader = base().chunk_size(64 << 10).streams(3).build().unwrap();
    let model = loader.load_blocking(&dir).unwrap();
    assert_on_device(&model, &truth, "sharded");
    assert_eq!(model.stats().shards, 3);
    drop(model);
    let loader = base().chunk_size(16 << 10).filter(["l*.w"]).build().unwrap();
    let model = loader.load_blocking(&dir).unwrap();
    let want: BTreeMap<_, _> = truth.into_iter().filter(|(n, _)| n.starts_with('l')).collect();
    assert_on_device(&model, &want, "filtered");
}

#[test]
fn streamed_tensors_are_already_on_the_device() {
    let _d = driver();
    let dir = scratch();
    let path = dir.join("s.safetensors");
    let names: Vec<String> = (0..12).map(|i| format!("t{i}")).collect();
    let specs: Vec<Spec<'_>> = names.iter().map(|n| (n.as_str(), Dtype::U8, &[300_000usize][..])).collect();
    let truth = write_shard(&path, &specs);
    // Copies run late: a tensor yielded before its copies completed would read back wrong.
    emulator::set_fault(Fault::CopyDelayMicros(5_000));
    let loader = base().chunk_size(64 << 10).build().unwrap();
    let mut stream = loader.stream_blocking(&path).unwrap();
    let mut seen = 0;
    while let Some(t) = tensorlift::block_on(stream.next()) {
        let t = t.unwrap();
        assert!(t.to_host().unwrap().as_ref() == truth[t.name()].as_slice(), "{} yielded early", t.name());
        seen += 1;
    }
    assert_eq!(seen, truth.len());
    assert!(stream.stats().copy > Duration::ZERO);
}

#[test]
fn reference_fixtures_have_the_reference_digests() {
    use sha2::{Digest, Sha256};
    let _d = driver();
    let dir = scratch();
    let out =
        std::process::Command::new("python3").arg(tensorlift_testkit::reference_script()).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let manifest: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let loader = base().chunk_size(4096).build().unwrap();
    for (what, path) in [("single", dir.join("single.safetensors")), ("sharded", dir.join("sharded"))] {
        let model = loader.load_blocking(&path).unwrap();
        // Every tensor the reference wrote there, none missing.
        let written = manifest.iter().filter(|m| m["file"].as_str().unwrap().starts_with(what)).count();
        assert_eq!(model.len(), written, "{what}");
        assert!(written > 0, "{what}");
        for t in model.tensors() {
            let m = manifest.iter().find(|m| m["name"] == t.name()).unwrap();
            assert_eq!(format!("{:x}", Sha256::digest(t.to_host().unwrap())), m["sha256"].as_str().unwrap(), "{what}");
        }
    }
}

#[test]
fn device_out_of_memory_is_clear_and_reads_nothing() {
    let _d = driver();
    if !emulator::is_emulated() {
        return;
    }
    let dir = scratch();
    let path = dir.join("m.safetensors");
    write_shard(&path, &[("a", Dtype::F32, &[1 << 20])]);
    emulator::set_fault(Fault::DeviceMemory(1 << 20));
    let loader = base().build().unwrap();
    match loader.load_blocking(&path) {
        Err(LoadError::DeviceMemory { needed, free, device, .. }) => {
            assert_eq!((needed, device), (4 << 20, Device::Cuda(0)));
            assert!(free <= 1 << 20);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(emulator::copies(), Some(0), "nothing was copied");
}

#[test]
fn a_failed_copy_names_the_tensor_and_frees_everything() {
    let _d = driver();
    if !emulator::is_emulated() {
        return;
    }
    let dir = scratch();
    let path = dir.join("m.safetensors");
    write_shard(&path, &[("first", Dtype::U8, &[100_000]), ("second", Dtype::U8, &[400_000])]);
    emulator::set_fault(Fault::CopyDelayMicros(1_000));
    emulator::set_fault(Fault::FailCopy(4));
    let loader = base().chunk_size(64 << 10).build().unwrap();
    match loader.load_blocking(&path) {
        Err(LoadError::Copy { tensor, device, .. }) => {
            assert_eq!((tensor.as_str(), device), ("second", Device::Cuda(0)))
        }
        other => panic!("{other:?}"),
    }
    // The loader still works afterwards.
    emulator::set_fault(Fault::FailCopy(0));
    assert_eq!(loader.load_blocking(&path).unwrap().len(), 2);
}

#[test]
fn truncation_and_changes_end_the_load_cleanly() {
    let _d = driver();
    let dir = scratch();
    let path = dir.join("t.safetensors");
    write_shard(
        &path,
        &[("first", Dtype::U8, &[64 << 10]), ("second", Dtype::U8, &[1 << 20]), ("third", Dtype::U8, &[100])],
    );
    // Read into staging, the file is seen to have changed when the next read lands (or the
    // read past the new end fails); copied from the page cache, it is seen to have changed
    // after the first copies (or, where the pages past the end cannot be pinned, the read
    // into staging that replaces them fails).
    for dma in [false, true] {
        let specs: [Spec<'_>; 3] =
            [("first", Dtype::U8, &[64 << 10]), ("second", Dtype::U8, &[1 << 20]), ("third", Dtype::U8, &[100])];
        write_shard(&path, &specs);
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, p) = (cut.clone(), path.clone());
        let loader = base()
            .chunk_size(4096)
            .staging_budget(4096)
            .page_cache_dma(dma)
            .progress(move |_| {
                if !c.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(200_000).unwrap();
                }
            })
            .build()
            .unwrap();
        match loader.load_blocking(&path) {
            Err(LoadError::Read { tensor, .. }) => assert_eq!(tensor, "second", "dma: {dma}"),
            Err(LoadError::ShardChanged { what, .. }) => assert!(what.contains("length is 200000"), "{dma}: {what}"),
            other => panic!("dma: {dma}: {other:?}"),
        }
        emulator::reset();
    }
    // Changed between planning and loading.
    write_shard(&path, &[("a", Dtype::F32, &[100])]);
    let loader = base().build().unwrap();
    let plan = loader.plan(&path).unwrap();
    write_shard(&path, &[("a", Dtype::F32, &[101])]);
    assert!(matches!(loader.load_plan_blocking(plan), Err(LoadError::ShardChanged { .. })));
}

#[test]
fn cancelled_loads_leave_nothing_on_the_device() {
    let _d = driver();
    let dir = scratch();
    let path = dir.join("c.safetensors");
    let names: Vec<String> = (0..8).map(|i| format!("t{i}")).collect();
    let specs: Vec<Spec<'_>> = names.iter().map(|n| (n.as_str(), Dtype::U8, &[1usize << 20][..])).collect();
    let truth = write_shard(&path, &specs);
    emulator::set_fault(Fault::CopyDelayMicros(2_000));
    let loader = base().chunk_size(256 << 10).build().unwrap();
    // A stream dropped after its first tensor, with reads and copies in flight.
    let mut stream = loader.stream_blocking(&path).unwrap();
    let first = tensorlift::block_on(stream.next()).unwrap().unwrap();
    drop(stream);
    assert!(first.to_host().unwrap().as_ref() == truth[first.name()].as_slice());
    drop(first);
    // A load future dropped mid-flight.
    // Polled until the emulator has made a copy of it (32 copies of 2 ms each: most are
    // still to come), then dropped.
    let before = emulator::copies();
    let mut load = Box::pin(loader.load(&path));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            std::future::Future::poll(load.as_mut(), &mut cx).is_pending(),
            "the load ended before a copy was seen"
        );
        if !emulator::is_emulated() || emulator::copies() > before {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no copy was made in a minute");
        std::thread::sleep(Duration::from_micros(200));
    }
    drop(load);
    // The loader still loads everything, and Driver's drop checks nothing is left.
    let m = loader.load_blocking(&path).unwrap();
    assert_on_device(&m, &truth, "after cancellations");
}

#[test]
fn auto_picks_the_gpu_and_says_why() {
    let _d = driver();
    let loader = Loader::builder().device(Device::Auto).build().unwrap();
    assert_eq!(loader.device(), Device::Cuda(0));
    assert!(loader.device_reason().contains("cuda:0"), "{}", loader.device_reason());
    let (free, total) = loader.device_memory().unwrap();
    assert!(free <= total && total > 0);
    assert!(loader.pinned_staging().unwrap() > 0);
}

#[test]
fn dlpack_export_keeps_device_memory_alive_until_the_deleter() {
    let _d = driver();
    let dir = scratch();
    let path = dir.join("d.safetensors");
    let truth = write_shard(&path, &[("w", Dtype::BF16, &[3, 5]), ("b", Dtype::F32, &[7])]);
    let loader = base().build().unwrap();
    let model = loader.load_blocking(&path).unwrap();
    let t = model.get("w").unwrap();
    let p = t.to_dlpack().unwrap();
    // SAFETY: p was just made and is not deleted until below; this reads it as a consumer.
    let m = unsafe { &*p };
    assert_eq!((m.dl_tensor.device.device_type, m.dl_tensor.device.device_id), (2, 0));
    assert_eq!(m.dl_tensor.data as u64, t.device_ptr().unwrap());
    assert_eq!((m.dl_tensor.dtype.code, m.dl_tensor.dtype.bits), (4, 16));
    assert_eq!(m.flags & tensorlift::dlpack::FLAG_READ_ONLY, 0, "device memory is the consumer's to use");
    let deleter = m.deleter.unwrap();
    drop(model);
    drop(loader);
    // The load's device allocation is still alive: the managed tensor holds it.
    if let Some(live) = emulator::live() {
        assert_eq!(live.allocations, 1);
    }
    // A tensor outlives its loader and model too.
    let b = tensor_without_its_loader(&path);
    assert!(b.to_host().unwrap().as_ref() == truth["b"].as_slice());
    drop(b);
    // SAFETY: the one deletion of the tensor made above.
    unsafe { deleter(p) };
}

/// A tensor loaded by a loader that is dropped at once.
fn tensor_without_its_loader(path: &std::path::Path) -> tensorlift::Tensor {
    let loader = base().build().unwrap();
    loader.load_blocking(path).unwrap().get("b").unwrap().clone()
}

/// Loads of one loader share its pinned staging: when others hold every chunk, a load that
/// holds one waits for it to come back, and one that holds none takes a spare, rather than
/// failing; every load has the file's bytes.
#[test]
fn loads_of_one_loader_share_its_staging() {
    let _d = driver();
    let dir = scratch();
    let path = dir.join("shared.safetensors");
    let names: Vec<String> = (0..6).map(|i| format!("t{i}")).collect();
    let specs: Vec<Spec<'_>> = names.iter().map(|n| (n.as_str(), Dtype::U8, &[600_000usize][..])).collect();
    let truth = write_shard(&path, &specs);
    emulator::set_fault(Fault::CopyDelayMicros(500));
    // Read into staging (rather than copied from the page cache): the chunks are what the
    // loads share.
    let loader = std::sync::Arc::new(
        base().chunk_size(64 << 10).staging_budget(2 * (64 << 10)).page_cache_dma(false).build().unwrap(),
    );
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let (l, p) = (std::sync::Arc::clone(&loader), path.clone());
            std::thread::spawn(move || {
                l.load_blocking(&p).map(|m| {
                    m.tensors()
                        .iter()
                        .map(|t| (t.name().to_owned(), t.to_host().unwrap().into_owned()))
                        .collect::<BTreeMap<_, _>>()
                })
            })
        })
        .collect();
    for t in threads {
        let got = t.join().unwrap().unwrap();
        assert!(got == truth);
    }
    // A stream dropped with reads in flight gives its chunks back to the next load.
    let mut s = loader.stream_blocking(&path).unwrap();
    let _ = tensorlift::block_on(s.next());
    drop(s);
    assert_eq!(loader.load_blocking(&path).unwrap().len(), 6);
}

/// A stream that is not being read holds the staging its reads landed in (the loader's only
/// chunk here: it takes the chunk a copy gives back for its next read before it hands out the
/// tensor). A load on the same thread, which would wait for that chunk for ever, takes a
/// spare one of its own instead; both load the files' bytes, and the spare is given back
/// (the driver's check at the end finds no registration left).
#[test]
fn a_load_does_not_wait_on_a_stream_that_is_not_read() {
    let _d = driver();
    // A load that waits for ever fails the test binary after two minutes rather than hang it
    // (the guard stands the watch down however the test ends).
    struct Finished(std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Finished {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let finished = Finished(std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let f = std::sync::Arc::clone(&finished.0);
    std::thread::spawn(move || {
        for _ in 0..120 {
            std::thread::sleep(Duration::from_secs(1));
            if f.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
        }
        eprintln!("a_load_does_not_wait_on_a_stream_that_is_not_read: still waiting after two minutes");
        std::process::exit(101);
    });
    let dir = scratch();
    let names: Vec<String> = (0..8).map(|i| format!("t{i}")).collect();
    let specs: Vec<Spec<'_>> = names.iter().map(|n| (n.as_str(), Dtype::U8, &[100_000usize][..])).collect();
    let streamed = write_shard(&dir.join("a.safetensors"), &specs);
    let loaded = write_shard(&dir.join("b.safetensors"), &[("u", Dtype::F32, &[3, 50_000]), ("v", Dtype::U8, &[7])]);
    // The stream hands out a tensor once its copy completes, holding the chunk its next read
    // took; were that read to land and be copied in the same poll (rarely), the chunk would
    // come back while its copy is delayed here (on the emulator) rather than at once.
    let emulated = emulator::set_fault(Fault::CopyDelayMicros(50_000));
    for budget in [64 << 10, 2 * (64 << 10)] {
        let loader = base().chunk_size(64 << 10).staging_budget(budget).page_cache_dma(false).build().unwrap();
        let mut stream = loader.stream_blocking(dir.join("a.safetensors")).unwrap();
        let first = tensorlift::block_on(stream.next()).unwrap().unwrap();
        let model = loader.load_blocking(dir.join("b.safetensors")).unwrap();
        let bytes: BTreeMap<String, Vec<u8>> =
            model.tensors().iter().map(|t| (t.name().to_owned(), t.to_host().unwrap().into_owned())).collect();
        assert!(bytes == loaded, "the load beside the stream");
        if budget == 64 << 10 && emulated {
            assert!(model.stats().spare_staging_chunks > 0, "{:?}", model.stats());
            // The spare is kept, and counted in what the loader pins.
            assert_eq!(loader.pinned_staging(), Some(2 * (64 << 10)));
        }
        let mut got = BTreeMap::from([(first.name().to_owned(), first.to_host().unwrap().into_owned())]);
        while let Some(t) = tensorlift::block_on(stream.next()) {
            let t = t.unwrap();
            got.insert(t.name().to_owned(), t.to_host().unwrap().into_owned());
        }
        assert!(got == streamed, "the stream, read on after the load");
    }
    drop(finished);
}

/// A load leaves the calling thread's current CUDA context as it found it (a Python thread
/// that works on another device with torch keeps it), and so do the drops.
#[test]
fn a_load_leaves_the_callers_context_alone() {
    let _d = driver();
    if !emulator::is_emulated() {
        return;
    }
    let dir = scratch();
    let path = dir.join("ctx.safetensors");
    let truth = write_shard(&path, &[("a", Dtype::F32, &[1000]), ("b", Dtype::U8, &[77])]);
    std::thread::spawn(move || {
        let theirs = 0x0dd_c0de;
        emulator::set_current_context(theirs);
        let loader = base().build().unwrap();
        let model = loader.load_blocking(&path).unwrap();
        assert_on_device(&model, &truth, "load");
        assert_eq!(emulator::current_context(), Some(theirs), "after the load");
        drop(model);
        drop(loader);
        assert_eq!(emulator::current_context(), Some(theirs), "after the drops");
    })
    .join()
    .unwrap();
}

/// Every 16-bit and 8-bit input, and f32 edge cases, converted by the device kernels
/// exactly as the host converts them; tensors of other dtypes load as stored.
#[test]
fn conversion_kernels_match_the_host_bit_for_bit() {
    use tensorlift::convert;
    let _d = driver();
    let dir = scratch();
    let path = dir.join("convert.safetensors");
    let every16: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
    let every8: Vec<u8> = (0..=u8::MAX).collect();
    let f32s: Vec<u8> = [1.0f32, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN, 1e-40, 65520.0, 1e-8]
        .iter()
        .map(|v| v.to_bits())
        .chain([0x3f80_8000, 0x3f81_8000, 0x3380_0000, 0x3380_0001, 0x7f7f_ffff])
        .chain((0..4096u32).map(|i| i.wrapping_mul(2_654_435_761)))
        .flat_map(u32::to_le_bytes)
        .collect();
    let tensors: Vec<(&str, Dtype, Vec<u8>)> = vec![
        ("bf16", Dtype::BF16, every16.clone()),
        ("f16", Dtype::F16, every16),
        ("f32", Dtype::F32, f32s),
        ("e4m3", Dtype::F8_E4M3, every8.clone()),
        ("e5m2", Dtype::F8_E5M2, every8),
        ("ints", Dtype::I32, (0..100u8).collect()),
        ("empty", Dtype::BF16, Vec::new()),
    ];
    let specs: Vec<(&str, Dtype, Vec<usize>)> =
        tensors.iter().map(|(n, d, b)| (*n, *d, vec![b.len() / (d.bitsize() / 8)])).collect();
    let spec_refs: Vec<Spec<'_>> = specs.iter().map(|(n, d, s)| (*n, *d, s.as_slice())).collect();
    let enc = tensorlift_format::encode_header(&spec_refs, None).unwrap();
    let mut file = enc.bytes.clone();
    for (_, _, b) in &tensors {
        file.extend_from_slice(b);
    }
    std::fs::write(&path, file).unwrap();
    // Equal bits, or both NaN with the same sign (the host may convert NaN payloads in
    // hardware).
    let same = |to: Dtype, a: &[u8], b: &[u8]| -> bool {
        a.len() == b.len()
            && a.chunks(to.bitsize() / 8).zip(b.chunks(to.bitsize() / 8)).all(|(x, y)| {
                let f = |c: &[u8]| match to {
                    Dtype::F32 => f32::from_le_bytes(c.try_into().unwrap()),
                    Dtype::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
                    _ => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                };
                x == y || (f(x).is_nan() && f(y).is_nan() && f(x).is_sign_negative() == f(y).is_sign_negative())
            })
    };
    emulator::set_fault(Fault::CopyDelayMicros(200));
    for to in [Dtype::BF16, Dtype::F16, Dtype::F32] {
        for chunk in [4096usize, 1 << 20] {
            let what = format!("to {to}, chunk {chunk}");
            let loader = base().convert_to(to).chunk_size(chunk).staging_budget(2 * chunk).build().unwrap();
            let model = loader.load_blocking(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
            for (name, from, bytes) in &tensors {
                let t = model.get(name).unwrap();
                assert_eq!(t.location(), Device::Cuda(0), "{what}: {name}");
                assert_eq!(t.device_ptr().unwrap() % 256, 0, "{what}: {name}");
                let got = t.to_host().unwrap();
                if !convert::can_convert(*from, to) {
                    assert_eq!(t.dtype(), *from, "{what}: {name}");
                    assert!(got.as_ref() == bytes.as_slice(), "{what}: {name}");
                    continue;
                }
                assert_eq!(t.dtype(), to, "{what}: {name}");
                let mut want = vec![0u8; bytes.len() / (from.bitsize() / 8) * (to.bitsize() / 8)];
                convert::convert(*from, to, bytes, &mut want).unwrap();
                assert!(same(to, &got, &want), "{what}: {name} differs from the host conversion");
            }
        }
    }
}

/// A slice and a conversion together, on the device.
#[test]
fn sliced_tensors_are_converted_on_the_device() {
    let _d = driver();
    let dir = scratch();
    let path = dir.join("m.safetensors");
    let full = write_shard(&path, &[("m", Dtype::F32, &[6, 10])]);
    let model = base()
        .slice("m", tensorlift::TensorSlice::new([1..5, 2..9]))
        .convert_to(Dtype::BF16)
        .build()
        .unwrap()
        .load_blocking(&path)
        .unwrap();
    let t = model.get("m").unwrap();
    assert_eq!((t.dtype(), t.shape()), (Dtype::BF16, &[4usize, 7][..]));
    let src = tensorlift_testkit::slice_bytes(&full["m"], &[6, 10], 4, &[1..5, 2..9]);
    let mut want = vec![0u8; src.len() / 2];
    tensorlift::convert::convert(Dtype::F32, Dtype::BF16, &src, &mut want).unwrap();
    // Pattern bytes hold NaNs: compare as the host converts them, NaN for NaN.
    let got = t.to_host().unwrap();
    for (g, w) in got.chunks(2).zip(want.chunks(2)) {
        let (g, w) = (half::bf16::from_le_bytes([g[0], g[1]]), half::bf16::from_le_bytes([w[0], w[1]]));
        assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "{g} vs {w}");
    }
}

/// Slices of inner dimensions gathered on the device by 2D copies from the pinned chunks,
/// first-dimension slices read alone, all against an independent reading.
#[test]
fn slices_are_gathered_on_the_device() {
    use std::ops::Range;
    use tensorlift::TensorSlice;
    let _d = driver();
    let dir = scratch();
    let path = dir.join("sliced.safetensors");
    let specs: &[Spec<'static>] = &[
        ("before", Dtype::U8, &[3]),
        ("m", Dtype::F32, &[37, 53]),
        ("t3", Dtype::BF16, &[5, 6, 7]),
        ("rows", Dtype::U8, &[1000, 3]),
        ("empty_cols", Dtype::F32, &[4, 8]),
        ("last", Dtype::I64, &[9, 2]),
    ];
    let slices: Vec<(&str, Vec<Range<usize>>)> = vec![
        ("m", vec![3..20, 5..40]),
        ("t3", vec![1..4, 0..6, 2..5]),
        #[allow(clippy::single_range_in_vec_init)] // One range: a slice of the first dimension.
        ("rows", vec![100..900]),
        ("empty_cols", vec![0..4, 3..3]),
        ("last", vec![8..9, 1..2]),
    ];
    let full = write_shard(&path, specs);
    let mut want = full.clone();
    for (name, ranges) in &slices {
        let &(_, dtype, shape) = specs.iter().find(|s| s.0 == *name).unwrap();
        want.insert(
            name.to_string(),
            tensorlift_testkit::slice_bytes(&full[*name], shape, dtype.bitsize() / 8, ranges),
        );
    }
    emulator::set_fault(Fault::CopyDelayMicros(200));
    for chunk in [4096usize, 1 << 20] {
        let mut b = base().chunk_size(chunk).staging_budget(3 * chunk);
        for (name, ranges) in &slices {
            b = b.slice(*name, TensorSlice::new(ranges.clone()));
        }
        emulator::reset();
        let model = b.build().unwrap().load_blocking(&path).unwrap();
        assert_on_device(&model, &want, &format!("chunk {chunk}"));
        assert_eq!(model.get("m").unwrap().shape(), &[17, 35]);
        if chunk == 1 << 20 {
            // One chunk: each tensor is one copy, the 35 runs of the two gathered slices
            // two 2D copies (the real driver has no count to read).
            if let Some(copies) = emulator::copies() {
                assert!(copies <= 6, "{copies} copies");
            }
        }
    }
}

/// Caller-owned device memory: q, k and v copied straight into one fused allocation of the
/// caller's, a sliced tensor gathered into it by 2D copies, a converted one written there by
/// the kernel; misuse refused before any copy.
#[test]
fn tensors_land_in_the_callers_device_memory() {
    use tensorlift::place::{Destination, DeviceBuffer, LentMemory, TensorRequest};
    use tensorlift::TensorSlice;
    let _d = driver();
    let dir = scratch();
    let path = dir.join("model.safetensors");
    let specs: &[Spec<'static>] = &[
        ("q", Dtype::F32, &[16, 8]),
        ("k", Dtype::F32, &[8, 8]),
        ("v", Dtype::F32, &[8, 8]),
        ("m", Dtype::F32, &[6, 10]),
        ("h", Dtype::F16, &[33]),
        ("ids", Dtype::I32, &[100]),
        ("empty", Dtype::F32, &[0]),
    ];
    let full = write_shard(&path, specs);
    let gpu = tensorlift_cuda::Gpu::open(0).unwrap();
    let mem = std::sync::Arc::new(tensorlift_cuda::DeviceArena::new(&gpu, 4096).unwrap());
    let (ptr, keep) = (mem.device_ptr(), std::sync::Arc::clone(&mem));
    // SAFETY: `keep` holds the allocation; only the loads below touch it until they end.
    let buf = DeviceBuffer::new(Device::Cuda(0), unsafe { LentMemory::new(ptr, 4096, keep) });
    let (q, k) = (512u64, 256u64);
    let b = buf.clone();
    let rule = move |t: &TensorRequest<'_>| -> Result<Option<Destination>, String> {
        Ok(match t.name {
            "q" => Some(Destination::device(&b, 0)),
            "k" => Some(Destination::device(&b, q as usize)),
            "v" => Some(Destination::device(&b, (q + k) as usize)),
            "m" => Some(Destination::device(&b, 1024)),
            "h" => Some(Destination::device(&b, 2048)),
            _ => None,
        })
    };
    emulator::set_fault(Fault::CopyDelayMicros(200));
    for chunk in [4096usize, 1 << 20] {
        let loader = base()
            .chunk_size(chunk)
            .staging_budget(2 * chunk)
            .place_with(rule.clone())
            .slice("m", TensorSlice::new([1..5, 2..9]))
            .convert_to(Dtype::F32)
            .build()
            .unwrap();
        let model = loader.load_blocking(&path).unwrap();
        let m = tensorlift_testkit::slice_bytes(&full["m"], &[6, 10], 4, &[1..5, 2..9]);
        let h: Vec<u8> =
            full["h"].chunks(2).flat_map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32().to_le_bytes()).collect();
        for (name, at, want) in
            [("q", 0, &full["q"]), ("k", q, &full["k"]), ("v", q + k, &full["v"]), ("m", 1024, &m), ("h", 2048, &h)]
        {
            let t = model.get(name).unwrap();
            assert_eq!(t.device_ptr(), Some(ptr + at), "chunk {chunk}: {name} is in the caller's memory");
            assert!(t.to_host().unwrap().as_ref() == want.as_slice(), "chunk {chunk}: {name}");
            let mut direct = vec![0u8; want.len()];
            mem.copy_to_host(at as usize, &mut direct).unwrap();
            assert!(direct == *want, "chunk {chunk}: {name} read from the caller's pointer");
        }
        assert!(model.get("ids").unwrap().to_host().unwrap().as_ref() == full["ids"].as_slice());
        assert_eq!(model.get("ids").unwrap().dtype(), Dtype::I32);
        if chunk == 1 << 20 {
            assert!(emulator::copies().is_none_or(|c| c <= 8), "{:?} copies", emulator::copies());
        }
        drop((model, loader));
        emulator::reset();
    }
    // Misuse: each refused before a copy, naming the tensor.
    type Rule = Box<dyn Fn(&TensorRequest<'_>) -> Option<Destination> + Send + Sync>;
    let refuse = |rule: Rule, says: &str| {
        let e = base()
            .place_with(move |t: &TensorRequest<'_>| Ok(rule(t)))
            .build()
            .unwrap()
            .load_blocking(&path)
            .unwrap_err();
        assert!(matches!(e, LoadError::Destination { .. }) && e.to_string().contains(says), "{says}: {e}");
        assert_eq!(emulator::copies().unwrap_or(0), 0, "{says}: nothing copied");
    };
    let b = buf.clone();
    refuse(Box::new(move |t| (t.name == "q").then(|| Destination::device(&b, 4000))), "do not fit in 4096 bytes");
    let b = buf.clone();
    refuse(
        Box::new(move |t| match t.name {
            "q" => Some(Destination::device(&b, 0)),
            "k" => Some(Destination::device(&b, 256)),
            _ => None,
        }),
        "overlap",
    );
    // The same memory lent twice: caught by address.
    // SAFETY: as above; `mem` outlives the loads.
    let twice = DeviceBuffer::new(Device::Cuda(0), unsafe { LentMemory::new(ptr, 4096, ()) });
    let b = buf.clone();
    refuse(
        Box::new(move |t| match t.name {
            "q" => Some(Destination::device(&b, 0)),
            "k" => Some(Destination::device(&twice, 256)),
            _ => None,
        }),
        "overlaps tensor 'q'",
    );
    // An empty tensor between two that overlap by address hides nothing.
    // SAFETY: as above; `mem` outlives the loads.
    let again = DeviceBuffer::new(Device::Cuda(0), unsafe { LentMemory::new(ptr, 4096, ()) });
    let b = buf.clone();
    refuse(
        Box::new(move |t| match t.name {
            "q" => Some(Destination::device(&b, 0)),
            "empty" => Some(Destination::device(&b, 256)),
            "k" => Some(Destination::device(&again, 300)),
            _ => None,
        }),
        "overlaps tensor 'q'",
    );
    let b = buf.clone();
    refuse(Box::new(move |t| (t.name == "q").then(|| Destination::device(&b, 2))), "not aligned");
    // SAFETY: never used: the driver says it is not device memory before any copy.
    let host = DeviceBuffer::new(Device::Cuda(0), unsafe { LentMemory::new(0x1000, 4096, ()) });
    refuse(Box::new(move |t| (t.name == "q").then(|| Destination::device(&host, 0))), "not device memory");
    // SAFETY: as above; the range runs past the allocation, which the driver tells.
    let past = DeviceBuffer::new(Device::Cuda(0), unsafe { LentMemory::new(ptr + 2048, 4096, ()) });
    refuse(Box::new(move |t| (t.name == "q").then(|| Destination::device(&past, 0))), "allocation ends");
    // SAFETY: as above: refused for its device before it is used.
    let other = DeviceBuffer::new(Device::Cuda(1), unsafe { LentMemory::new(ptr, 4096, ()) });
    refuse(Box::new(move |t| (t.name == "q").then(|| Destination::device(&other, 0))), "is on cuda:1");
    drop((buf, rule));
    // Every owner was dropped: only the test's own handle keeps the allocation.
    assert_eq!(std::sync::Arc::strong_count(&mem), 1);
}

/// cudarc allocations lent to a load, as candle's CUDA tensors are
/// (`LentMemory::from_cuda_slice`): the bytes land in them (a slice gathered by 2D copies, a
/// conversion written by the kernel), and each slice comes back to its owner, read back on
/// its own stream with the file's bytes; not while a tensor placed in it is alive.
#[test]
fn cudarc_slices_lent_to_a_load_come_back_with_the_files_bytes() {
    use cudarc::driver::{CudaContext, CudaSlice};
    use tensorlift::place::{Destination, DeviceBuffer, LentMemory, TensorRequest};
    use tensorlift::TensorSlice;
    let _d = driver();
    let dir = scratch();
    let path = dir.join("model.safetensors");
    let specs: &[Spec<'static>] = &[
        ("w", Dtype::F32, &[16, 8]),
        ("m", Dtype::F32, &[6, 10]),
        ("h", Dtype::F16, &[33]),
        ("ids", Dtype::I64, &[9]),
    ];
    let full = write_shard(&path, specs);
    // The framework's side: its own context handle and stream, as candle's CudaDevice has.
    // Its zeroing of each slice runs late: the load's copies must wait for it.
    emulator::set_fault(Fault::MemsetDelayMicros(20_000));
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.new_stream().unwrap();
    let f32s = |n: usize| LentMemory::from_cuda_slice(stream.alloc_zeros::<f32>(n).unwrap()).unwrap();
    let mut lent = vec![
        ("m", f32s(4 * 7)),
        ("h", f32s(33)),
        ("ids", LentMemory::from_cuda_slice(stream.alloc_zeros::<i64>(9).unwrap()).unwrap()),
    ];
    // Last, a slice last written on another of the framework's streams (cudarc tracks it
    // with events): that write too must be done before the load's copies.
    let other = ctx.new_stream().unwrap();
    let mut w = stream.alloc_zeros::<f32>(128).unwrap();
    other.memset_zeros(&mut w).unwrap();
    lent.push(("w", LentMemory::from_cuda_slice(w).unwrap()));
    let lent: BTreeMap<&str, DeviceBuffer> =
        lent.into_iter().map(|(name, memory)| (name, DeviceBuffer::new(Device::Cuda(0), memory))).collect();
    let ptrs: BTreeMap<&str, u64> = lent.iter().map(|(n, b)| (*n, b.device_ptr())).collect();
    let bufs = lent.clone();
    let rule = move |t: &TensorRequest<'_>| -> Result<Option<Destination>, String> {
        Ok(bufs.get(t.name).map(|b| Destination::device(b, 0)))
    };
    emulator::set_fault(Fault::CopyDelayMicros(200));
    let loader = base()
        .chunk_size(4096)
        .staging_budget(8192)
        .place_with(rule)
        .slice("m", TensorSlice::new([1..5, 2..9]))
        .convert_to(Dtype::F32)
        .build()
        .unwrap();
    let model = loader.load_blocking(&path).unwrap();
    for (name, ptr) in &ptrs {
        assert_eq!(model.get(name).unwrap().device_ptr(), Some(*ptr), "{name} is in the lent slice");
    }
    let mut lent = lent;
    let w = lent.remove("w").unwrap();
    let w = w.into_inner().expect_err("a tensor placed in it is alive");
    drop((model, loader));
    let back = |b: DeviceBuffer| b.into_inner().unwrap_or_else(|_| panic!("the slice comes back"));
    let as_bytes = |v: Vec<f32>| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let w = back(w).downcast::<CudaSlice<f32>>().unwrap();
    assert!(as_bytes(stream.clone_dtoh(&*w).unwrap()) == full["w"]);
    let m = back(lent.remove("m").unwrap()).downcast::<CudaSlice<f32>>().unwrap();
    assert!(
        as_bytes(stream.clone_dtoh(&*m).unwrap())
            == tensorlift_testkit::slice_bytes(&full["m"], &[6, 10], 4, &[1..5, 2..9])
    );
    let h = back(lent.remove("h").unwrap()).downcast::<CudaSlice<f32>>().unwrap();
    let want: Vec<f32> = full["h"].chunks(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
    assert!(as_bytes(stream.clone_dtoh(&*h).unwrap()) == as_bytes(want), "h, converted");
    let ids = back(lent.remove("ids").unwrap()).downcast::<CudaSlice<i64>>().unwrap();
    let ids: Vec<u8> = stream.clone_dtoh(&*ids).unwrap().iter().flat_map(|x| x.to_le_bytes()).collect();
    assert!(ids == full["ids"]);
    // An arena of lent memory gives its owner back; one of tensorlift's own has none.
    let gpu = tensorlift_cuda::Gpu::open(0).unwrap();
    let lent = LentMemory::from_cuda_slice(stream.alloc_zeros::<u32>(64).unwrap()).unwrap();
    let arena = tensorlift_cuda::DeviceArena::lent(&gpu, lent).unwrap();
    assert_eq!(arena.into_owner().unwrap().downcast::<CudaSlice<u32>>().unwrap().len(), 64);
    assert!(tensorlift_cuda::DeviceArena::new(&gpu, 64).unwrap().into_owner().is_err());
    drop((w, m, h, gpu, other, stream, ctx));
}

/// Two shards of several 4 KiB chunks, with SHA256SUMS written by coreutils' `sha256sum`.
fn verified_checkpoint() -> (PathBuf, BTreeMap<String, Vec<u8>>, [PathBuf; 2]) {
    let dir = scratch();
    let a: &[Spec<'_>] = &[("a.0", Dtype::F32, &[3000]), ("a.1", Dtype::BF16, &[64, 33]), ("a.2", Dtype::U8, &[5])];
    let b: &[Spec<'_>] = &[
        ("b.0", Dtype::F16, &[0]),
        ("b.1", Dtype::I64, &[1500]),
        ("b.2", Dtype::U8, &[9000]),
        ("b.3", Dtype::BF16, &[700]),
    ];
    let truth = write_sharded(&dir, &[a, b]);
    let names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    let mut listed = names.to_vec();
    listed.push("model.safetensors.index.json");
    std::fs::write(dir.join("SHA256SUMS"), tensorlift_testkit::coreutils_sha256sums(&dir, &listed)).unwrap();
    let paths = names.map(|n| dir.join(n).canonicalize().unwrap());
    (dir, truth, paths)
}

#[test]
fn verified_loads_hash_pinned_chunks_before_their_copies() {
    use tensorlift::Verify;
    let _d = driver();
    let (dir, truth, paths) = verified_checkpoint();
    let total: u64 = paths.iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
    // Many chunks a shard, in little staging (chunks that wait to be hashed hold it), with
    // copies completing late; one chunk a shard; and converted on the device.
    emulator::set_fault(Fault::CopyDelayMicros(500));
    for (what, builder) in [
        ("4 KiB chunks, 3 in staging", base().chunk_size(4096).staging_budget(3 * 4096)),
        ("1 MiB chunks", base().chunk_size(1 << 20)),
    ] {
        let model = builder.verify(Verify::Required).build().unwrap().load_blocking(&dir).unwrap();
        assert_on_device(&model, &truth, what);
        assert_eq!((model.stats().verified_bytes, model.stats().unverified_bytes), (total, 0), "{what}");
    }
    // Filtered: the one shard that holds the tensors asked for is read whole and checked.
    let loader = base().chunk_size(4096).filter(["b.*"]).verify(Verify::Required).build().unwrap();
    let model = loader.load_blocking(&dir).unwrap();
    let b: BTreeMap<_, _> =
        truth.iter().filter(|(k, _)| k.starts_with("b.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    assert_on_device(&model, &b, "filtered");
    let second = std::fs::metadata(&paths[1]).unwrap().len();
    let s = model.stats();
    assert_eq!((s.verified_bytes, s.unverified_bytes, s.bytes_read), (second, 0, second), "filtered");
    emulator::reset();
    let model = base().chunk_size(4096).convert_to(Dtype::F32).verify(Verify::Required).build().unwrap();
    let model = model.load_blocking(&dir).unwrap();
    assert_eq!(model.stats().verified_bytes, total, "converted");
    let b1 = model.get("a.1").unwrap();
    assert_eq!((b1.dtype(), b1.location()), (Dtype::F32, Device::Cuda(0)));
}

#[test]
fn a_shard_emptied_of_tensors_is_still_checked_on_the_device() {
    // Its digest listed, then the file rewritten with no tensors: a verified load onto the
    // device reads its header and fails, rather than load, as verified, nothing.
    use tensorlift::Verify;
    let _d = driver();
    let dir = scratch();
    let path = dir.join("model.safetensors");
    write_shard(&path, &[("w", Dtype::F32, &[64])]);
    std::fs::write(dir.join("SHA256SUMS"), tensorlift_testkit::coreutils_sha256sums(&dir, &["model.safetensors"]))
        .unwrap();
    write_shard(&path, &[]);
    // (A statement: the loader is dropped here, before the driver's check that nothing is
    // left.)
    match base().verify(Verify::Required).build().unwrap().load_blocking(&path).unwrap_err() {
        LoadError::Checksum { file, .. } => assert_eq!(file, path.canonicalize().unwrap()),
        other => panic!("{other}"),
    };
}

#[test]
fn a_corrupted_shard_hands_out_none_of_its_tensors_from_the_device() {
    use tensorlift::Verify;
    let _d = driver();
    for (at, convert) in [("first", false), ("middle", false), ("last", false), ("last", true)] {
        let (dir, _, paths) = verified_checkpoint();
        let path = &paths[1];
        let mut bytes = std::fs::read(path).unwrap();
        let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let i = match at {
            "first" => data_start,
            "middle" => bytes.len() / 2,
            _ => bytes.len() - 1,
        };
        bytes[i] ^= 0x01;
        std::fs::write(path, &bytes).unwrap();
        let name = path.file_name().unwrap().to_str().unwrap();
        let actual = tensorlift_testkit::coreutils_sha256sums(&dir, &[name])[..64].to_owned();
        // Converted tensors come out when their kernel completes: held all the same.
        let builder = base().chunk_size(4096).verify(Verify::Required);
        let loader = if convert { builder.convert_to(Dtype::F32) } else { builder }.build().unwrap();
        let mut stream = loader.stream_blocking(&dir).unwrap();
        let mut got = Vec::new();
        let err = loop {
            match tensorlift::block_on(stream.next()) {
                Some(Ok(t)) => got.push(t.name().to_owned()),
                Some(Err(e)) => break e,
                None => panic!("{at}: the load succeeded"),
            }
        };
        match &err {
            LoadError::Checksum { file, actual: a, .. } => {
                assert_eq!((file, a.to_string()), (path, actual), "{at}");
            }
            other => panic!("{at}: {other}"),
        }
        assert!(got.iter().all(|n| n.starts_with("a.")), "{at}: tensors of the bad shard came: {got:?}");
        drop(stream);
    }
    // A verified stream dropped midway, hashing and copying: nothing is left on the device
    // (Driver's drop checks) and the staging comes back.
    let (dir, truth, _) = verified_checkpoint();
    emulator::set_fault(Fault::CopyDelayMicros(2_000));
    let loader = base().chunk_size(4096).staging_budget(4 * 4096).verify(Verify::Required).build().unwrap();
    let mut stream = loader.stream_blocking(&dir).unwrap();
    let first = tensorlift::block_on(stream.next()).unwrap().unwrap();
    drop(stream);
    assert!(first.to_host().unwrap().as_ref() == truth[first.name()].as_slice());
    drop(first);
    let model = loader.load_blocking(&dir).unwrap();
    assert_on_device(&model, &truth, "after a dropped verified stream");
}
