//! Faults end the load cleanly with an error naming file and tensor.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tensorlift::BackendKind;
use tensorlift::{Dtype, LoadError};

use crate::support::*;

#[test]
fn truncated_during_the_load() {
    let dir = scratch();
    let path = dir.join("t.safetensors");
    write_shard(
        &path,
        &[("first", Dtype::U8, &[64 << 10]), ("second", Dtype::U8, &[1 << 20]), ("third", Dtype::U8, &[100])],
    );
    for backend in [BackendKind::Uring, BackendKind::Pread] {
        let original = std::fs::read(&path).unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let (c, p) = (Arc::clone(&cut), path.clone());
        let loader = base()
            .io_backend(backend)
            .chunk_size(4096)
            .staging_budget(4096)
            .progress(move |_| {
                // After the first chunk lands, cut the file inside "second".
                if !c.swap(true, Ordering::SeqCst) {
                    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(200_000).unwrap();
                }
            })
            .build()
            .unwrap();
        // The next read to land (in the file's order, and before the cut) finds the file
        // shorter than planned. (A read past the end that failed first would be
        // `IoError::UnexpectedEof`, saying where the file ends now: tensorlift-io's tests.)
        match loader.load_blocking(&path) {
            Err(LoadError::ShardChanged { file, what }) => {
                assert_eq!(file, path.canonicalize().unwrap());
                assert!(what.contains("length is 200000 bytes") && what.contains("while it was being read"), "{what}");
            }
            other => panic!("{backend:?}: {other:?}"),
        }
        std::fs::write(&path, original).unwrap();
    }
}

/// Defect: a shard rewritten in place during a load (same length) loaded with a mix of old
/// and new bytes. Its identity is checked after its last read: the load fails naming it.
#[test]
fn rewritten_in_place_during_the_load() {
    let dir = scratch();
    let path = dir.join("w.safetensors");
    write_shard(&path, &[("first", Dtype::U8, &[64 << 10]), ("second", Dtype::U8, &[64 << 10])]);
    for backend in [BackendKind::Uring, BackendKind::Pread] {
        let original = std::fs::read(&path).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let (d, p) = (Arc::clone(&done), path.clone());
        let loader = base()
            .io_backend(backend)
            .chunk_size(4096)
            .staging_budget(4096)
            .queue_depth(1)
            .progress(move |_| {
                // After the first chunk lands, rewrite the rest of the file in place: same
                // length, other bytes. The pause steps past the file system's clock tick,
                // which a change within the same tick as planning would not move.
                if !d.swap(true, Ordering::SeqCst) {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    let mut bytes = std::fs::read(&p).unwrap();
                    let n = bytes.len();
                    bytes[n - 70_000..].iter_mut().for_each(|b| *b = !*b);
                    std::fs::OpenOptions::new().write(true).open(&p).unwrap().write_all_at(&bytes, 0).unwrap();
                }
            })
            .build()
            .unwrap();
        match loader.load_blocking(&path) {
            Err(LoadError::ShardChanged { file, what }) => {
                assert_eq!(file, path.canonicalize().unwrap(), "{backend:?}");
                assert!(what.contains("while it was being read"), "{backend:?}: {what}");
            }
            other => panic!("{backend:?}: {other:?}"),
        }
        std::fs::write(&path, original).unwrap();
    }
}

/// Defect: a stream handed out the tensors of a shard rewritten in place while it was read
/// as their chunks landed (only the shard's last read checked the file); the load failed
/// only after. Each read is checked before the tensors it completes go out.
#[test]
fn a_stream_hands_out_nothing_read_after_a_rewrite_in_place() {
    let dir = scratch();
    let path = dir.join("s.safetensors");
    let truth =
        write_shard(&path, &[("a", Dtype::U8, &[8 << 10]), ("b", Dtype::U8, &[8 << 10]), ("c", Dtype::U8, &[8 << 10])]);
    let original = std::fs::read(&path).unwrap();
    for backend in [BackendKind::Uring, BackendKind::Pread] {
        // One read in flight, issued as the stream is polled: once "a" is out, "b"'s last
        // bytes have not been read.
        let loader = base().io_backend(backend).chunk_size(4096).staging_budget(4096).queue_depth(1).build().unwrap();
        let mut stream = loader.stream_blocking(&path).unwrap();
        let first = tensorlift::block_on(stream.next()).unwrap().unwrap();
        assert_eq!((first.name(), first.bytes().unwrap()), ("a", truth["a"].as_slice()), "{backend:?}");
        // "b" and "c" rewritten in place: same length, other bytes (past the clock's tick,
        // which a change within the tick of planning would not move).
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut bytes = original.clone();
        let n = bytes.len();
        bytes[n - (16 << 10)..].iter_mut().for_each(|b| *b = !*b);
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().write_all_at(&bytes, 0).unwrap();
        let err = match tensorlift::block_on(stream.next()) {
            Some(Ok(t)) => panic!("{backend:?}: {} handed out after the rewrite", t.name()),
            Some(Err(e)) => e,
            None => panic!("{backend:?}: the stream ended without an error"),
        };
        match err {
            LoadError::ShardChanged { what, .. } => {
                assert!(what.contains("while it was being read"), "{backend:?}: {what}")
            }
            other => panic!("{backend:?}: {other:?}"),
        }
        std::fs::write(&path, &original).unwrap();
    }
}

#[test]
fn replaced_between_plan_and_load() {
    let dir = scratch();
    let path = dir.join("r.safetensors");
    write_shard(&path, &[("a", Dtype::F32, &[100])]);
    let loader = base().build().unwrap();
    let plan = loader.plan(&path).unwrap();
    // Same length, different header: another tensor name. The modification time shows it,
    // or, when the clock's tick hides it, the header read again.
    write_shard(&path, &[("b", Dtype::F32, &[100])]);
    match loader.load_plan_blocking(plan.clone()) {
        Err(LoadError::ShardChanged { what, .. }) => {
            assert!(what.contains("header") || what.contains("modified"), "{what}")
        }
        other => panic!("{other:?}"),
    }
    // Different length.
    write_shard(&path, &[("a", Dtype::F32, &[101])]);
    match loader.load_plan_blocking(plan) {
        Err(LoadError::ShardChanged { what, .. }) => assert!(what.contains("length"), "{what}"),
        other => panic!("{other:?}"),
    }
}

/// Defect: a shard whose status changed after planning without a write (a chmod, a hard
/// link, moved away and back: what an atomic replace of its name does to the file a handle
/// holds) was refused as changed, where the reference's mapping reads it. It loads as
/// planned, its header read again; a header rewritten in place with its modification time
/// set back is still refused.
#[test]
fn status_changes_after_planning_that_are_no_write() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch();
    let path = dir.join("s.safetensors");
    let truth = write_shard(&path, &[("a", Dtype::F32, &[100]), ("b", Dtype::U8, &[7])]);
    let loader = base().build().unwrap();
    let plan = loader.plan(&path).unwrap();
    // Past the file system's clock tick, so that each change moves the status change time.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let before = std::fs::metadata(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::hard_link(&path, dir.join("link")).unwrap();
    std::fs::rename(&path, dir.join("away")).unwrap();
    std::fs::rename(dir.join("away"), &path).unwrap();
    let after = std::fs::metadata(&path).unwrap();
    assert_ne!((before.ctime(), before.ctime_nsec()), (after.ctime(), after.ctime_nsec()));
    assert_identical(&loader.load_plan_blocking(plan.clone()).unwrap(), &truth, "chmod, link, moved and back");

    // The header rewritten in place, same length, the modification time set back.
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.windows(4).position(|w| w == b"\"a\":").unwrap();
    bytes[at + 1] = b'c';
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&bytes, 0).unwrap();
    file.set_times(std::fs::FileTimes::new().set_modified(before.modified().unwrap())).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), before.modified().unwrap());
    match loader.load_plan_blocking(plan) {
        Err(LoadError::ShardChanged { what, .. }) => assert!(what.contains("header differs"), "{what}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_shard_and_bad_checkpoint() {
    let dir = scratch();
    let loader = base().build().unwrap();
    let err = loader.load_blocking(dir.join("nope.safetensors")).unwrap_err();
    assert!(matches!(err, LoadError::Format(_)), "{err}");
    let json = br#"{"a":1}"#;
    let mut bad = (json.len() as u64).to_le_bytes().to_vec();
    bad.extend_from_slice(json);
    std::fs::write(dir.join("bad.safetensors"), bad).unwrap();
    let err = loader.load_blocking(dir.join("bad.safetensors")).unwrap_err();
    assert!(err.to_string().contains("bad.safetensors") && err.to_string().contains("'a'"), "{err}");
}

#[test]
fn io_fallbacks_still_load_identically() {
    let dir = scratch();
    let path = dir.join("f.safetensors");
    let truth = write_shard(&path, &quirky());
    let mut f = tensorlift::Faults::default();
    f.refuse_uring = Some(libc_eperm());
    f.refuse_direct = true;
    f.max_read = Some(1000);
    let loader = base().chunk_size(8192).io_faults(f).build().unwrap();
    assert_eq!(loader.io_report().backend, BackendKind::Pread);
    let model = loader.load_blocking(&path).unwrap();
    assert_identical(&model, &truth, "pread, buffered, short reads");
    assert_eq!(model.stats().direct_shards, 0);
    assert!(model.stats().io.reason.contains("seccomp"));
}

fn libc_eperm() -> i32 {
    1
}

/// A shard replaced by a FIFO after planning: the FIFO is never opened or waited on. The
/// descriptor planning opened still names the planned file, moved away, and the load reads
/// it (its header read again, as its status changed), as the reference's mapping would; a
/// shard that had to be reopened (open files are bounded) is refused as a FIFO.
#[test]
fn replaced_by_a_fifo_after_planning() {
    let dir = scratch();
    let truth = write_sharded(&dir, &[&[("a", Dtype::U8, &[5000])], &[("b", Dtype::F32, &[300])]]);
    let swap = |name: &str| {
        let p = dir.join(name);
        std::fs::rename(&p, dir.join(format!("{name}.old"))).unwrap();
        assert!(std::process::Command::new("mkfifo").arg(&p).status().unwrap().success());
    };
    let restore = |name: &str| {
        std::fs::remove_file(dir.join(name)).unwrap();
        std::fs::rename(dir.join(format!("{name}.old")), dir.join(name)).unwrap();
    };
    let loader = base().build().unwrap();
    let plan = loader.plan(&dir).unwrap();
    swap("model-00001-of-00002.safetensors");
    swap("model-00002-of-00002.safetensors");
    assert_identical(&loader.load_plan_blocking(plan).unwrap(), &truth, "the files planned, moved away");
    restore("model-00001-of-00002.safetensors");
    restore("model-00002-of-00002.safetensors");
    assert_identical(&base().build().unwrap().load_blocking(&dir).unwrap(), &truth, "planned anew");

    let loader = base().max_open_files(2).build().unwrap();
    let plan = loader.plan(&dir).unwrap();
    assert_eq!(plan.open_files(), 1);
    swap("model-00002-of-00002.safetensors");
    match loader.load_plan_blocking(plan) {
        Err(LoadError::ShardChanged { file, what }) => {
            assert!(file.ends_with("model-00002-of-00002.safetensors"), "{}", file.display());
            assert!(what.contains("FIFO"), "{what}");
        }
        other => panic!("{other:?}"),
    }
    restore("model-00002-of-00002.safetensors");
}

/// Many shards load with few descriptors: open files are bounded while planning and loading.
#[test]
fn many_shards_few_open_files() {
    let dir = scratch();
    let names: Vec<String> = (0..200).map(|i| format!("t{i}")).collect();
    let specs: Vec<Vec<Spec<'_>>> = names.iter().map(|n| vec![(n.as_str(), Dtype::U16, &[300][..])]).collect();
    let shards: Vec<&[Spec<'_>]> = specs.iter().map(Vec::as_slice).collect();
    let truth = write_sharded(&dir, &shards);
    let loader = base().max_open_files(8).chunk_size(4096).build().unwrap();
    let plan = loader.plan(&dir).unwrap();
    assert_eq!(plan.open_files(), 4);
    let model = loader.load_plan_blocking(plan).unwrap();
    assert_identical(&model, &truth, "200 shards, 8 open");
    assert_eq!(model.stats().shards, 200);
}

/// Found by an audit for panics: a header claiming exabytes of a sparse file (or a store
/// an object's size) made the list of reads, 40 bytes a chunk, an allocation that failed and
/// aborted the process, before any memory was checked. It is an `OutOfMemory` error now,
/// for a host load, a mapped one and one reading while it plans.
#[test]
fn a_checkpoint_claiming_exabytes_is_an_error_not_an_abort() {
    // A file of 2^60 bytes takes no memory on tmpfs, which allows such lengths (ext4 stops
    // at 16 TiB, whose list of reads could be had).
    let Ok(dir) = tensorlift_testkit::try_scratch_in(std::path::Path::new("/dev/shm"), "tl-huge-") else {
        eprintln!("skipped: no /dev/shm to hold a sparse file of 2^60 bytes");
        return;
    };
    let _gone = RemovedAtEnd(dir.clone());
    let path = dir.join("huge.safetensors");
    let json = format!(r#"{{"w":{{"dtype":"U8","shape":[{}],"data_offsets":[0,{}]}}}}"#, 1u64 << 60, 1u64 << 60);
    let mut head = (json.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(json.as_bytes());
    let f = std::fs::File::create(&path).unwrap();
    f.write_all_at(&head, 0).unwrap();
    f.set_len(head.len() as u64 + (1 << 60)).unwrap();
    // In chunks of 4 KiB the list cannot be had at all; in the default 8 MiB ones (5.5 TB
    // of list) an overcommitted allocation could be had, and is refused as more than the
    // process can fill.
    for (what, loader) in [
        ("host, default chunks", base().build().unwrap()),
        ("mapped, default chunks", base().map_views(map_contract()).build().unwrap()),
        ("host", base().chunk_size(4096).build().unwrap()),
        ("mapped", base().map_views(map_contract()).chunk_size(4096).build().unwrap()),
        (
            "reading while planning",
            base().chunk_size(4096).read_while_planning(tensorlift::ReadWhilePlanning::Always).build().unwrap(),
        ),
    ] {
        match loader.load_blocking(&path) {
            Err(LoadError::OutOfMemory { bytes, .. }) => assert!(bytes >= 1 << 40, "{what}: {bytes}"),
            other => panic!("{what}: {other:?}"),
        }
    }
}

/// A folder removed when the test ends, passed or failed.
struct RemovedAtEnd(std::path::PathBuf);

impl Drop for RemovedAtEnd {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
