//! Shards in the page cache copied to the device by DMA straight from it
//! (`LoaderBuilder::page_cache_dma`): the bytes land as the file has them, the device really
//! read memory registered read-only, every registration is undone (the driver guard checks),
//! a file rewritten meanwhile fails the load, and where the driver refuses, the load reads
//! into staging and says why.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tensorlift::{DirectIo, Dtype, LoadError};
use tensorlift_cuda::emulator::{self, Fault};
use tensorlift_testkit::{write_shard, write_sharded, Spec};

use super::{assert_on_device, base, driver, quirky, scratch};

/// Whether device 0 says it registers host memory read-only.
fn device_registers_read_only() -> bool {
    match tensorlift_cuda::cuda_status() {
        tensorlift_cuda::CudaStatus::Available(d) => d.devices[0].read_only_host_register == Some(true),
        tensorlift_cuda::CudaStatus::Unavailable(_) => false,
    }
}

#[test]
fn warm_shards_are_copied_from_the_page_cache() {
    let _d = driver();
    let dir = scratch();
    let path = dir.join("warm.safetensors");
    // Just written: in the page cache.
    let truth = write_shard(&path, &quirky());
    // Slow copies: a range unpinned before its copy ran would show.
    emulator::set_fault(Fault::CopyDelayMicros(300));
    let supported = device_registers_read_only();
    for chunk in [4096usize, 64 << 10, 1 << 20] {
        let what = format!("chunk {chunk}");
        let before = emulator::read_only_copies();
        let loader = base().chunk_size(chunk).staging_budget(3 * chunk).build().unwrap();
        let model = loader.load_blocking(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_on_device(&model, &truth, &what);
        let s = model.stats();
        assert_eq!((s.buffered_shards, s.direct_shards), (1, 0), "{what}");
        if !supported {
            assert!(s.page_cache_dma_refused.is_some(), "{what}: {s:?}");
            eprintln!("this device refuses read-only registration: {:?}", s.page_cache_dma_refused);
            continue;
        }
        assert_eq!(s.page_cache_dma_refused, None, "{what}");
        assert!(s.page_cache_dma_bytes > 0, "{what}");
        assert_eq!(s.page_cache_dma_bytes, s.bytes_read, "{what}: every byte by DMA");
        assert_eq!(s.to_json()["page_cache_dma_bytes"], s.bytes_read, "{what}");
        if let (Some(a), Some(b)) = (before, emulator::read_only_copies()) {
            assert!(b > a, "{what}: the device read no read-only registration");
        }
    }
    // Read buffered but not in the page cache: read into staging, at depth (a registration
    // would fault the pages in one at a time), until the kernel's readahead has brought the
    // rest in. Where eviction does nothing (tmpfs), skipped.
    tensorlift_io::cache::evict(&path).unwrap();
    if tensorlift_io::cache::resident_fraction(&path).unwrap() == 0.0 {
        let model = base().direct_io(DirectIo::Never).chunk_size(4096).build().unwrap().load_blocking(&path).unwrap();
        assert_on_device(&model, &truth, "evicted");
        let s = model.stats();
        assert_eq!(s.buffered_shards, 1);
        assert!(s.page_cache_dma_bytes < s.bytes_read, "{} of {} by DMA", s.page_cache_dma_bytes, s.bytes_read);
    }
    // Turned off, and for shards read with O_DIRECT: staging, and not one copy from memory
    // registered read-only.
    for (what, loader) in [
        ("off", base().page_cache_dma(false).build().unwrap()),
        ("O_DIRECT", base().direct_io(DirectIo::Always).build().unwrap()),
    ] {
        let before = emulator::read_only_copies();
        let model = loader.load_blocking(&path).unwrap();
        assert_on_device(&model, &truth, what);
        assert_eq!((model.stats().page_cache_dma_bytes, &model.stats().page_cache_dma_refused), (0, &None), "{what}");
        assert_eq!(emulator::read_only_copies(), before, "{what}");
    }
}

#[test]
fn a_refused_registration_reads_into_staging_and_says_why() {
    let _d = driver();
    if !emulator::is_emulated() {
        return;
    }
    let dir = scratch();
    let path = dir.join("refused.safetensors");
    let truth = write_shard(&path, &quirky());
    emulator::set_fault(Fault::NoReadOnlyRegister(true));
    let before = emulator::read_only_copies();
    let model = base().chunk_size(64 << 10).staging_budget(128 << 10).build().unwrap().load_blocking(&path).unwrap();
    assert_on_device(&model, &truth, "refused");
    let s = model.stats();
    assert_eq!(s.page_cache_dma_bytes, 0);
    let why = s.page_cache_dma_refused.as_deref().unwrap_or_default();
    assert!(why.contains("cuMemHostRegister") && why.contains("CUDA_ERROR_NOT_SUPPORTED"), "{why}");
    assert_eq!(emulator::read_only_copies(), before);
}

/// Where the device reads pageable memory through the host's page tables (Grace Hopper),
/// registering does not pin: warm shards are read into staging, and the load says why.
#[test]
fn a_device_that_reads_through_host_page_tables_copies_from_staging() {
    let _d = driver();
    if !emulator::is_emulated() {
        return;
    }
    let dir = scratch();
    let path = dir.join("gh200.safetensors");
    let truth = write_shard(&path, &quirky());
    emulator::set_fault(Fault::HostPageTables(true));
    let before = emulator::read_only_copies();
    let model = base().chunk_size(64 << 10).staging_budget(128 << 10).build().unwrap().load_blocking(&path).unwrap();
    emulator::set_fault(Fault::HostPageTables(false));
    assert_on_device(&model, &truth, "through host page tables");
    let s = model.stats();
    assert_eq!(s.page_cache_dma_bytes, 0);
    let why = s.page_cache_dma_refused.as_deref().unwrap_or_default();
    assert!(why.contains("PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES"), "{why}");
    assert_eq!(emulator::read_only_copies(), before);
}

#[test]
fn a_shard_rewritten_while_the_device_reads_it_fails_the_load() {
    let _d = driver();
    let dir = scratch();
    let path = dir.join("rewritten.safetensors");
    write_shard(&path, &[("a", Dtype::U8, &[1 << 20]), ("b", Dtype::U8, &[1 << 20])]);
    let len = std::fs::metadata(&path).unwrap().len();
    // The rewrite must move the file's times: past the clock's tick from its creation.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let done = Arc::new(AtomicBool::new(false));
    let (d, p) = (done.clone(), path.clone());
    let loader = base()
        .chunk_size(64 << 10)
        .staging_budget(128 << 10)
        .progress(move |_| {
            // Same length, other bytes, in place: the pages the device reads change.
            if !d.swap(true, Ordering::SeqCst) {
                let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
                std::io::Seek::seek(&mut f, std::io::SeekFrom::End(-4096)).unwrap();
                f.write_all(&[0xa5; 4096]).unwrap();
            }
        })
        .build()
        .unwrap();
    match loader.load_blocking(&path) {
        Err(LoadError::ShardChanged { what, .. }) => assert!(what.contains("while it was being read"), "{what}"),
        other => panic!("{other:?}"),
    }
    assert!(done.load(Ordering::SeqCst));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
}

/// Defect: a stream handed out a tensor whose bytes the device copied from the page cache of
/// a shard rewritten meanwhile, when other ranges of the shard were still being copied (the
/// file was checked only after the shard's last range). Every range is checked now before
/// the tensors it completes go out.
#[test]
fn a_stream_hands_out_nothing_copied_after_a_rewrite() {
    let _d = driver();
    if !emulator::is_emulated() {
        return; // the timing comes from the emulator's slow copies
    }
    let dir = scratch();
    let path = dir.join("rewritten.safetensors");
    let truth = write_shard(
        &path,
        &[("a", Dtype::U8, &[4096]), ("b", Dtype::U8, &[512 << 10]), ("c", Dtype::U8, &[512 << 10])],
    );
    let original = std::fs::read(&path).unwrap();
    // Past the clock's tick, so that the rewrite moves the file's times.
    std::thread::sleep(std::time::Duration::from_millis(20));
    // Each copy runs 20 ms after it is queued: "b"'s last copies read the file well after
    // "a" is out, when it has been rewritten.
    emulator::set_fault(Fault::CopyDelayMicros(20_000));
    let before = emulator::read_only_copies();
    let loader = base().chunk_size(64 << 10).staging_budget(128 << 10).build().unwrap();
    let mut stream = loader.stream_blocking(&path).unwrap();
    let first = tensorlift::block_on(stream.next()).unwrap().unwrap();
    assert_eq!((first.name(), first.to_host().unwrap().as_ref()), ("a", truth["a"].as_slice()));
    let mut bytes = original.clone();
    let n = bytes.len();
    bytes[n - (1 << 20)..].iter_mut().for_each(|b| *b = !*b);
    std::os::unix::fs::FileExt::write_all_at(&std::fs::OpenOptions::new().write(true).open(&path).unwrap(), &bytes, 0)
        .unwrap();
    let err = loop {
        match tensorlift::block_on(stream.next()) {
            Some(Ok(t)) => {
                assert!(t.to_host().unwrap().as_ref() == truth[t.name()].as_slice(), "{} as rewritten", t.name())
            }
            Some(Err(e)) => break e,
            None => panic!("the stream ended without an error"),
        }
    };
    match err {
        LoadError::ShardChanged { what, .. } => assert!(what.contains("while it was being read"), "{what}"),
        other => panic!("{other:?}"),
    }
    drop(stream);
    assert!(emulator::read_only_copies() > before, "copied from the page cache");
    emulator::set_fault(Fault::CopyDelayMicros(0));
}

/// Descriptors of files under `dir` this process holds now.
fn open_under(dir: &std::path::Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|fds| fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok()).filter(|t| t.starts_with(dir)).count())
        .unwrap_or(0)
}

/// Shards whose last reads the device still copies stay open, and count against the
/// loader's bound on open files until their copies are done.
#[test]
fn shards_copied_from_the_page_cache_keep_to_the_open_file_bound() {
    let _d = driver();
    let dir = scratch();
    let names: Vec<String> = (0..64).map(|i| format!("t{i}")).collect();
    let specs: Vec<Vec<Spec<'_>>> = names.iter().map(|n| vec![(n.as_str(), Dtype::U8, &[3000][..])]).collect();
    let shards: Vec<&[Spec<'_>]> = specs.iter().map(Vec::as_slice).collect();
    let truth = write_sharded(&dir, &shards);
    // Slow copies: each shard's one read is in flight on the device long after it was taken.
    emulator::set_fault(Fault::CopyDelayMicros(2_000));
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (m, d) = (most.clone(), dir.clone());
    let loader = base()
        .max_open_files(8)
        .chunk_size(4096)
        .staging_budget(64 * 4096)
        .progress(move |_| {
            m.fetch_max(open_under(&d), Ordering::SeqCst);
        })
        .build()
        .unwrap();
    let model = loader.load_blocking(&dir).unwrap();
    assert_on_device(&model, &truth, "64 shards, 8 open files");
    if device_registers_read_only() {
        assert_eq!(model.stats().page_cache_dma_bytes, model.stats().bytes_read);
    }
    let most = most.load(Ordering::SeqCst);
    assert!(most > 0 && most <= 8, "{most} shard files open at once");
}
