//! Dropping a load mid-flight frees everything and leaves nothing running. Its own test
//! binary, since it counts the process's live arenas.

use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use tensorlift::BackendKind;
use tensorlift::{Device, Dtype, Loader, ReadWhilePlanning};
use tensorlift_io::HostArena;

fn checkpoint() -> (std::path::PathBuf, BTreeMap<String, Vec<u8>>) {
    let dir = tensorlift_testkit::scratch_in(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")), "tl-cancel-");
    let names: Vec<String> = (0..16).map(|i| format!("t{i}")).collect();
    let specs: Vec<_> = names.iter().map(|n| (n.as_str(), Dtype::U8, &[4usize << 20][..])).collect();
    let path = dir.join("m.safetensors");
    let truth = tensorlift_testkit::write_shard(&path, &specs);
    (path, truth)
}

fn wait_for_no_arenas() {
    let t = Instant::now();
    while HostArena::live_count() != 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "{} arenas still alive", HostArena::live_count());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn cancelled_loads_free_everything() {
    let (path, truth) = checkpoint();
    // Planning first, and reading while planning goes on (dropped before or after the plan stands).
    let policies = [ReadWhilePlanning::Never, ReadWhilePlanning::Always];
    for (backend, policy) in [BackendKind::Uring, BackendKind::Pread].into_iter().flat_map(|b| policies.map(|p| (b, p)))
    {
        let builder = Loader::builder().device(Device::Cpu).io_backend(backend).read_while_planning(policy);
        let loader = builder.chunk_size(1 << 20).build().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        // A load future dropped with reads in flight: polled until its first chunk has landed
        // (the progress callback says so), then dropped, unfinished.
        let landed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let l = std::sync::Arc::clone(&landed);
        let slow = Loader::builder()
            .device(Device::Cpu)
            .io_backend(backend)
            .read_while_planning(policy)
            .chunk_size(1 << 20)
            .queue_depth(1)
            .progress(move |p| {
                l.store(p.done, std::sync::atomic::Ordering::SeqCst);
                // Each chunk holds the load back, so the timeout comes first.
                std::thread::sleep(Duration::from_millis(20));
            })
            .build()
            .unwrap();
        let finished = rt.block_on(async {
            let load = slow.load(&path);
            tokio::pin!(load);
            let started = Instant::now();
            loop {
                tokio::select! {
                    r = &mut load => return Some(r.is_ok()),
                    _ = tokio::time::sleep(Duration::from_millis(1)) => {
                        if landed.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                            return None;
                        }
                        assert!(started.elapsed() < Duration::from_secs(30), "no chunk landed in 30 s");
                    }
                }
            }
        });
        // (A poll hands its thread back after at most 16 chunks, however fast reads land, and
        // the timer is then seen: 64 chunks cannot all land before the first is seen. Before
        // that bound, a poll whose reads all landed by the time each was looked at finished
        // the whole load, and this failed now and then on a busy machine.)
        assert_eq!(finished, None, "the load finished before it could be dropped");
        drop(slow);
        // A stream dropped after its first tensor.
        let mut stream = loader.stream_blocking(&path).unwrap();
        let first = tensorlift::block_on(stream.next()).unwrap().unwrap();
        assert_eq!(first.bytes().unwrap().len(), 4 << 20);
        drop(first);
        drop(stream);
        // In-flight reads complete in the workers, which then drop the last references.
        wait_for_no_arenas();
        // And the loader still works afterwards.
        let m = loader.load_blocking(&path).unwrap();
        assert_eq!(m.len(), truth.len());
        assert!(m.tensors().iter().all(|t| t.bytes().unwrap() == truth[t.name()].as_slice()));
        drop(m);
        drop(loader);
        assert_eq!(HostArena::live_count(), 0, "{backend:?} {policy}");
    }
    cancelled_verified_loads_stop_hashing_and_free_everything();
}

/// A verified load dropped after its first tensor: its hashing threads stop and are waited
/// for, and every arena is freed. (Called by the test above, after its own loads: the two
/// count the same process-wide arenas, so they cannot run side by side.)
fn cancelled_verified_loads_stop_hashing_and_free_everything() {
    let (path, truth) = checkpoint();
    tensorlift::checksums::manifest(&path).unwrap().write().unwrap();
    let loader =
        Loader::builder().device(Device::Cpu).chunk_size(1 << 20).verify(tensorlift::Verify::Required).build().unwrap();
    let mut stream = loader.stream_blocking(&path).unwrap();
    let first = tensorlift::block_on(stream.next()).unwrap().unwrap();
    assert_eq!(first.bytes().unwrap(), truth[first.name()].as_slice());
    drop(first);
    drop(stream);
    wait_for_no_arenas();
    let m = loader.load_blocking(&path).unwrap();
    assert_eq!(m.stats().verified_bytes, std::fs::metadata(&path).unwrap().len());
    drop(m);
    drop(loader);
    assert_eq!(HostArena::live_count(), 0);
}
