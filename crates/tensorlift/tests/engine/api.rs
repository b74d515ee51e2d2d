//! The library's API does what it says: metadata on the model, the stream as a
//! `futures_core::Stream`, an async caller's thread kept free, measured statistics.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use tensorlift::Dtype;

use crate::support::*;

#[test]
fn metadata_is_on_the_model() {
    let dir = scratch();
    let truth = write_sharded(&dir, &[&[("a", Dtype::U8, &[3])], &[("b", Dtype::U8, &[4])]]);
    // Shard metadata, written by hand into the first shard's header.
    let first = dir.join("model-00001-of-00002.safetensors");
    let json = r#"{"__metadata__":{"format":"pt","who":"test"},"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}"#;
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    bytes.extend_from_slice(&truth["a"]);
    std::fs::write(&first, bytes).unwrap();
    let model = base().build().unwrap().load_blocking(&dir).unwrap();
    assert_eq!(model.metadata().get("format").map(String::as_str), Some("pt"));
    assert_eq!(model.shard_metadata().len(), 2);
    assert_eq!(model.shard_metadata()[0].1["who"], "test");
    assert!(model.shard_metadata()[1].1.is_empty());
    assert_eq!(model.index_metadata().unwrap()["total_size"], serde_json::Value::Null);
}

#[test]
fn the_stream_is_a_futures_stream() {
    let dir = scratch();
    let path = dir.join("s.safetensors");
    let truth = write_shard(&path, &quirky());
    let mut stream = base().chunk_size(4096).build().unwrap().stream_blocking(&path).unwrap();
    let mut seen = 0;
    while let Some(t) = tensorlift::block_on(std::future::poll_fn(|cx| Pin::new(&mut stream).poll_next(cx))) {
        let t = t.unwrap();
        assert!(t.bytes().unwrap() == truth[t.name()].as_slice());
        seen += 1;
    }
    assert_eq!(seen, truth.len());
}

/// Defect: `load()` (and `stream()`, which blocked its caller outright) planned on the
/// caller's async thread, stalling a single-threaded runtime while headers were parsed. The
/// timer here must keep ticking before the first byte lands, while 150,000 tensor headers
/// are parsed. Both futures can be spawned (they are `Send`).
#[test]
fn an_async_callers_thread_keeps_serving_while_headers_are_parsed() {
    fn send<F: std::future::Future + Send>(f: F) -> F {
        f
    }
    let dir = scratch();
    let names: Vec<String> = (0..150_000).map(|i| format!("layer.{i}.weight")).collect();
    let specs: Vec<Spec<'_>> = names.iter().map(|n| (n.as_str(), Dtype::U8, &[1usize][..])).collect();
    let path = dir.join("big-header.safetensors");
    write_shard(&path, &specs);
    for streamed in [false, true] {
        let ticks = Arc::new(AtomicUsize::new(0));
        let at_first_progress = Arc::new(AtomicUsize::new(usize::MAX));
        let (t, f) = (Arc::clone(&ticks), Arc::clone(&at_first_progress));
        let loader = base()
            .progress(move |_| {
                let _ = f.compare_exchange(usize::MAX, t.load(Ordering::SeqCst), Ordering::SeqCst, Ordering::SeqCst);
            })
            .build()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let loaded = rt.block_on(async {
            let t = Arc::clone(&ticks);
            let timer = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    t.fetch_add(1, Ordering::SeqCst);
                }
            });
            let n = if streamed {
                let mut stream = send(loader.stream(&path)).await.unwrap();
                let mut n = 0;
                while let Some(t) = stream.next().await {
                    t.unwrap();
                    n += 1;
                }
                n
            } else {
                send(loader.load(&path)).await.unwrap().len()
            };
            timer.abort();
            n
        });
        assert_eq!(loaded, 150_000);
        let ticked = at_first_progress.load(Ordering::SeqCst);
        assert!(
            ticked != usize::MAX && ticked >= 3,
            "the timer ticked {ticked} times while headers were parsed (streamed: {streamed})"
        );
    }
}

/// Defect: a poll of a load went on for as long as reads kept landing by the time they were
/// looked at (cached files, a deep queue), up to the whole load, holding its executor's
/// thread all along. Here each chunk's progress callback waits long enough for the reads
/// queued behind it to land, so every read is done when polled: a poll must still hand the
/// thread back after a bounded number of chunks, and the bytes are the file's.
#[test]
fn a_poll_of_a_load_handles_a_bounded_number_of_chunks() {
    let dir = scratch();
    let names: Vec<String> = (0..16).map(|i| format!("t{i}")).collect();
    let specs: Vec<Spec<'_>> = names.iter().map(|n| (n.as_str(), Dtype::U8, &[4usize << 20][..])).collect();
    let path = dir.join("m.safetensors");
    let truth = write_shard(&path, &specs);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let loader = base()
        .chunk_size(1 << 20)
        .queue_depth(4)
        .progress(move |_| {
            c.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(3));
        })
        .build()
        .unwrap();
    let mut load = Box::pin(loader.load(&path));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let (mut most, mut polls) = (0, 0);
    let model = loop {
        let before = calls.load(Ordering::SeqCst);
        let polled = load.as_mut().poll(&mut cx);
        most = most.max(calls.load(Ordering::SeqCst) - before);
        polls += 1;
        match polled {
            std::task::Poll::Ready(m) => break m.unwrap(),
            std::task::Poll::Pending => std::thread::sleep(Duration::from_micros(200)),
        }
    };
    assert_identical(&model, &truth, "loaded a few chunks a poll");
    // (A report a chunk: 64 MiB and the header's page.)
    let chunks = calls.load(Ordering::SeqCst);
    assert!(chunks >= 64, "{chunks} progress reports");
    assert!(most <= 16, "one poll handled {most} chunks (of {chunks}, in {polls} polls)");
}

#[test]
fn statistics_are_measured() {
    let dir = scratch();
    let path = dir.join("m.safetensors");
    write_shard(&path, &[("a", Dtype::U8, &[3 << 20]), ("b", Dtype::U8, &[5 << 20]), ("c", Dtype::U8, &[100])]);
    let file_len = std::fs::metadata(&path).unwrap().len();
    let model = base().chunk_size(1 << 20).build().unwrap().load_blocking(&path).unwrap();
    let s = model.stats();
    assert_eq!(s.bytes, (8 << 20) + 100);
    // Every byte from the page-aligned start of the data to its end was read, no more.
    assert!(s.bytes_read >= s.bytes && s.bytes_read <= file_len, "{} of {file_len}", s.bytes_read);
    assert_eq!(s.tensors, 3);
    // The first read was issued after planning began and before the load ended.
    let first = s.first_read.expect("a load that reads has a first read");
    assert!(first > std::time::Duration::ZERO && first <= s.wall, "{first:?} of {:?}", s.wall);
    // With a filter, only the selected tensor's bytes (and page padding) are read.
    let model = base().filter(["c"]).build().unwrap().load_blocking(&path).unwrap();
    assert!(model.stats().bytes_read < 2 * 4096, "{}", model.stats().bytes_read);
    // Zero-copy views read nothing.
    let model = base().map_views(map_contract()).build().unwrap().load_blocking(&path).unwrap();
    assert_eq!(model.stats().bytes_read, 0);
    assert_eq!(model.stats().first_read, None);
}

/// `copy_bytes` copies a host tensor through the kernel, never reading it through a
/// reference: the bytes of every kind of host tensor, and, for a mapped view whose file was
/// cut short, an error where a read of the view would raise SIGBUS. (This breaks the
/// contract of mapped views on purpose, and touches the tensor only through `copy_bytes`.)
#[test]
fn copy_bytes_copies_through_the_kernel_and_a_cut_mapped_file_is_an_error() {
    let dir = scratch();
    let spec: Vec<tensorlift_testkit::Spec<'_>> = vec![("a", Dtype::U8, &[3 << 20]), ("b", Dtype::F32, &[3, 5])];
    let path = dir.join("m.safetensors");
    let truth = write_shard(&path, &spec);
    // b as f16, converted here by `half` (round to nearest even, as the engine converts).
    let b_f16: Vec<u8> = truth["b"]
        .chunks_exact(4)
        .flat_map(|c| half::f16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes())
        .collect();
    for (converted, loader) in
        [(false, base()), (true, base().convert_to(Dtype::F16)), (false, base().map_views(map_contract()))]
    {
        let model = loader.build().unwrap().load_blocking(&path).unwrap();
        for t in model.tensors() {
            let want = match t.name() {
                "b" if converted => b_f16.clone(),
                name => truth[name].clone(),
            };
            assert_eq!(t.copy_bytes().unwrap(), want, "{}", t.name());
            // Into a buffer of the caller's, of exactly the tensor's length.
            let mut into = vec![0u8; t.len()];
            t.copy_bytes_into(&mut into).unwrap();
            assert_eq!(into, want, "{}", t.name());
            let mut short = vec![0u8; t.len() - 1];
            match t.copy_bytes_into(&mut short) {
                Err(tensorlift::ViewError::Length { len, buffer, .. }) => {
                    assert_eq!((len, buffer), (t.len(), t.len() - 1))
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(model.get("a").unwrap().copy_bytes().unwrap(), truth["a"]);
    }
    // Where a sandbox refuses both of the kernel's ways, copy_bytes reads as a view does,
    // which a file cut short would kill with SIGBUS.
    let mut probe = [0u8; 8];
    if let Err((_, e)) = tensorlift_io::AlignedBuf::zeroed(8, 8).unwrap().copy_out(&mut probe) {
        eprintln!("skipped: the kernel copies nothing here: {e}");
        return;
    }
    let model = base().map_views(map_contract()).build().unwrap().load_blocking(&path).unwrap();
    let a = model.get("a").unwrap();
    assert!(a.is_mapped());
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(4096).unwrap();
    match a.copy_bytes() {
        Err(tensorlift::ViewError::Unreadable { tensor, message }) => {
            assert_eq!(tensor, "a");
            assert!(message.contains("a page could not be read"), "{message}");
        }
        other => panic!("{:?}", other.map(|b| b.len())),
    }
}

/// New host memory is faulted in ahead of the reads: while the reads wait (the progress
/// callback holds the load after its first chunk, one read in flight), the prefaulting
/// thread goes on; the bytes are the file's all the same. Off, nothing is prefaulted.
/// (Memory filled by copy is never prefaulted: that is off here, see the next test.)
#[test]
fn new_memory_is_prefaulted_ahead_of_the_reads() {
    let dir = scratch();
    let spec: Vec<tensorlift_testkit::Spec<'_>> = vec![("a", Dtype::U8, &[40 << 20]), ("b", Dtype::F32, &[3, 5])];
    let truth = write_shard(&dir.join("m.safetensors"), &spec);
    let load = |on: bool| {
        let paused = Arc::new(AtomicUsize::new(0));
        let p = Arc::clone(&paused);
        let loader = base()
            .queue_depth(1)
            .chunk_size(4 << 20)
            .prefault(on)
            .fill_by_copy(false)
            .progress(move |_| {
                if p.fetch_add(1, Ordering::Relaxed) == 0 {
                    std::thread::sleep(Duration::from_millis(300));
                }
            })
            .build()
            .unwrap();
        assert_eq!(loader.settings().prefault_threads > 0, on);
        loader.load_blocking(dir.join("m.safetensors")).unwrap()
    };
    let m = load(true);
    assert_identical(&m, &truth, "prefaulted");
    let s = m.stats();
    match &s.prefault_failure {
        // A kernel before 5.14, or a sandbox that refuses the advice: the bytes are right.
        Some(why) => {
            assert!(std::env::var_os("TENSORLIFT_REQUIRE_PREFAULT").is_none(), "prefaulting required: {why}");
            eprintln!("MADV_POPULATE_WRITE refused here ({why}): amount not checked")
        }
        None => {
            // 300 ms is far more than faulting in 36 MiB takes: most chunks are done before
            // their reads, whole.
            assert!(s.prefaulted_bytes >= 16 << 20, "{} bytes prefaulted", s.prefaulted_bytes);
            assert!(s.prefaulted_bytes <= (40 << 20) + 2 * 4096, "{}", s.prefaulted_bytes);
        }
    }
    let m = load(false);
    assert_identical(&m, &truth, "not prefaulted");
    assert_eq!(m.stats().prefaulted_bytes, 0);
}

/// A cached shard's new host memory is filled by copying its pages in (userfaultfd), not
/// prefaulted, with the file's bytes; off, or for a shard not cached, or in memory an earlier
/// load left, it is read as before, with the same bytes.
#[test]
fn cached_shards_fill_new_memory_by_copy() {
    // A touch of a missing page of memory registered for copies would wait forever: the
    // test binary fails after two minutes rather than hang.
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = Arc::clone(&finished);
    std::thread::spawn(move || {
        for _ in 0..120 {
            std::thread::sleep(Duration::from_secs(1));
            if f.load(Ordering::Relaxed) {
                return;
            }
        }
        eprintln!("cached_shards_fill_new_memory_by_copy: still loading after two minutes (a missing page touched?)");
        std::process::exit(101);
    });
    let dir = scratch();
    let mut spec: Vec<tensorlift_testkit::Spec<'_>> = vec![
        ("fill_big", Dtype::U8, &[(24 << 20) + 4095]),
        ("fill_f32", Dtype::F32, &[3, 5]),
        ("fill_bf16", Dtype::BF16, &[7, 1001]),
    ];
    spec.extend(quirky());
    let path = dir.join("m.safetensors");
    let truth = write_shard(&path, &spec);
    let available = match tensorlift_io::fill::status() {
        Ok(()) => true,
        Err(why) => {
            assert!(std::env::var_os("TENSORLIFT_REQUIRE_FILL").is_none(), "filling by copy required: {why}");
            eprintln!("filling by copy unavailable here ({why}): only the fallback checked");
            false
        }
    };
    let loader = base().chunk_size(4 << 20).build().unwrap();
    assert!(loader.settings().fill_by_copy);
    let m = loader.load_blocking(&path).unwrap();
    assert_identical(&m, &truth, "filled by copy");
    let s = m.stats().clone();
    assert_eq!(s.buffered_shards, 1, "the shard was just written: cached");
    if available {
        assert_eq!(s.copied_bytes, s.bytes_read, "every byte read was copied in");
        assert_eq!(s.prefaulted_bytes, 0, "memory filled by copy is not prefaulted");
        assert_eq!(s.fill_by_copy_refused, None);
    } else {
        assert_eq!(s.copied_bytes, 0);
        assert!(s.fill_by_copy_refused.is_some());
    }
    // The same loader again: the memory the first load left is reused, read into.
    drop(m);
    let m = loader.load_blocking(&path).unwrap();
    assert_identical(&m, &truth, "reused memory");
    assert!(m.stats().reused_host_bytes > 0);
    assert_eq!(m.stats().copied_bytes, 0, "reused memory is read into, not filled by copy");
    drop(m);
    // Off.
    let m = base().fill_by_copy(false).build().unwrap().load_blocking(&path).unwrap();
    assert_identical(&m, &truth, "fill by copy off");
    assert_eq!((m.stats().copied_bytes, m.stats().fill_by_copy_refused.as_deref()), (0, None));
    // Huge pages: read into.
    let m = base().huge_pages(tensorlift::HugePages::Always).build().unwrap().load_blocking(&path).unwrap();
    assert_identical(&m, &truth, "huge pages");
    assert_eq!(m.stats().copied_bytes, 0);
    // Not cached: read from the disk (O_DIRECT where the file system allows), not copied.
    tensorlift_io::cache::evict(&path).unwrap();
    if tensorlift_io::cache::resident_fraction(&path).unwrap() < 0.5 {
        let m = base().build().unwrap().load_blocking(&path).unwrap();
        assert_identical(&m, &truth, "not cached");
        assert_eq!(m.stats().copied_bytes, 0);
    }
    finished.store(true, Ordering::Relaxed);
}

/// A loader's second load takes the memory its first load's dropped tensors left (already
/// faulted in), and still yields the second checkpoint's bytes, not the first's; memory of
/// another shape is given back before a load allocates; release and the option work.
#[test]
fn host_memory_is_reused_across_loads_and_given_back() {
    let dir = scratch();
    let spec: Vec<tensorlift_testkit::Spec<'_>> = vec![("a", Dtype::F32, &[300, 700]), ("b", Dtype::U8, &[4 << 20])];
    let first = write_shard(&dir.join("one.safetensors"), &spec);
    // The same layout, other bytes (names pick the pattern).
    let other: Vec<tensorlift_testkit::Spec<'_>> = vec![("c", Dtype::F32, &[300, 700]), ("d", Dtype::U8, &[4 << 20])];
    let second = write_shard(&dir.join("two").join("two.safetensors").tap_dir(), &other);
    let loader = base().build().unwrap();
    let live = tensorlift_io::HostArena::live_count();
    let m = loader.load_blocking(dir.join("one.safetensors")).unwrap();
    assert_identical(&m, &first, "first load");
    assert_eq!(m.stats().reused_host_bytes, 0);
    assert_eq!(loader.retained_host_memory(), 0, "nothing is kept while tensors live");
    drop(m);
    let kept = loader.retained_host_memory();
    assert!(kept >= 300 * 700 * 4 + (4 << 20), "{kept}");
    let m = loader.load_blocking(dir.join("two").join("two.safetensors")).unwrap();
    assert_eq!(m.stats().reused_host_bytes, kept as u64);
    assert_eq!(m.stats().huge_pages, None, "no new memory: no page choice to report");
    assert_eq!(m.stats().prefaulted_bytes, 0, "reused memory is already faulted in");
    assert_identical(&m, &second, "second load, in reused memory");
    assert_eq!(loader.retained_host_memory(), 0);
    drop(m);
    // A small load of another shape: the large memory is given back, not held beside it.
    let small = write_shard(&dir.join("small.safetensors"), &[("s", Dtype::U8, &[10])]);
    let m = loader.load_blocking(dir.join("small.safetensors")).unwrap();
    assert_identical(&m, &small, "small load");
    assert_eq!(m.stats().reused_host_bytes, 0);
    assert_eq!(loader.retained_host_memory(), 0, "the large memory was freed before the small load");
    drop(m);
    assert!(loader.retained_host_memory() > 0);
    loader.release_host_memory();
    assert_eq!(loader.retained_host_memory(), 0);
    // Two loads alive at once, then dropped: no more is kept than one load used.
    let a = loader.load_blocking(dir.join("one.safetensors")).unwrap();
    let b = loader.load_blocking(dir.join("two").join("two.safetensors")).unwrap();
    drop((a, b));
    assert!(
        loader.retained_host_memory() <= kept,
        "{} kept, the largest load used {kept}",
        loader.retained_host_memory()
    );
    assert!(loader.retained_host_memory() > 0);
    // Released while a load's memory is still out: when it comes back, it is freed, not kept
    // (as a dropped load's reads that land after the release are).
    let m = loader.load_blocking(dir.join("one.safetensors")).unwrap();
    loader.release_host_memory();
    drop(m);
    assert_eq!(loader.retained_host_memory(), 0, "memory given back after a release was kept");
    // Turned off, nothing is kept.
    let off = base().reuse_host_memory(false).build().unwrap();
    drop(off.load_blocking(dir.join("one.safetensors")).unwrap());
    assert_eq!(off.retained_host_memory(), 0);
    // Dropping the loader frees what it kept, and tensors outliving it free theirs.
    let m = loader.load_blocking(dir.join("one.safetensors")).unwrap();
    drop(loader);
    drop(m);
    assert_eq!(tensorlift_io::HostArena::live_count(), live);
}

trait TapDir {
    fn tap_dir(self) -> Self;
}

impl TapDir for std::path::PathBuf {
    /// Creates the parent folder, for a path about to be written.
    fn tap_dir(self) -> Self {
        std::fs::create_dir_all(self.parent().unwrap()).unwrap();
        self
    }
}

/// Mapped views are host memory: a loader for a CUDA device, or one that places tensors in
/// the caller's memory, is refused when it is built (before anything is opened or read),
/// and `Auto` loads to the host.
#[test]
fn mapped_views_go_to_the_host_only() {
    use tensorlift::{Device, LoadError, Loader};
    let err = Loader::builder().device(Device::Cuda(0)).map_views(map_contract()).build().unwrap_err();
    assert!(
        matches!(&err, LoadError::Unsupported(m) if m.starts_with("mapped views on cuda:0 (they are views of the files in host memory")),
        "{err}"
    );
    let err = base()
        .map_views(map_contract())
        .place_with(|_: &tensorlift::place::TensorRequest<'_>| Ok(None))
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, LoadError::Unsupported(m) if m.starts_with("caller destinations with mapped views")),
        "{err}"
    );
    let loader = Loader::builder().device(Device::Auto).map_views(map_contract()).build().unwrap();
    assert_eq!(loader.device(), Device::Cpu);
    assert_eq!(loader.device_reason(), "auto: mapped views are host memory");
}
