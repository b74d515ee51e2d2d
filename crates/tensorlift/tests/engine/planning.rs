//! Reading while planning goes on: a host load of a whole checkpoint reads each shard once
//! its own header is validated, and hands out tensors only once the whole plan stands.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tensorlift::{Dtype, LoaderBuilder, ReadWhilePlanning};

use crate::support::*;

/// A loader that reads while planning goes on wherever the load allows it (the default,
/// `Auto`, does where it pays: see `auto_reads_while_planning_where_it_pays`).
fn early() -> LoaderBuilder {
    base().read_while_planning(ReadWhilePlanning::Always)
}

/// 24 shards of small tensors and one large one each, a first shard of few tensors and
/// later ones of 2,600: the first shard is read while the later headers are parsed (the
/// first read comes before the plan stands, by a wide margin: 60,000 tensors take far
/// longer to parse than the first shard's ten), and every tensor is the file's, whether its
/// chunks landed before the plan stood or after (the progress callback slows the reads so
/// that both happen). A load told to plan first, or with a filter, reads nothing before the
/// plan stands.
#[test]
fn a_shard_is_read_once_its_own_header_is_validated() {
    let dir = scratch();
    let names = many_names(24);
    let bigs: Vec<String> = (0..24).map(|s| format!("big.{s}")).collect();
    let shards: Vec<Vec<Spec<'_>>> = many_tensors(&names)
        .into_iter()
        .enumerate()
        .map(|(s, mut specs)| {
            specs.insert(specs.len() / 2, (bigs[s].as_str(), Dtype::U8, &[3 << 20][..]));
            specs
        })
        .collect();
    let refs: Vec<&[Spec<'_>]> = shards.iter().map(Vec::as_slice).collect();
    let truth = write_sharded(&dir, &refs);
    let tensors = truth.len();
    let slowed = |b: LoaderBuilder| {
        b.read_while_planning(ReadWhilePlanning::Always).progress(|_| std::thread::sleep(Duration::from_micros(300)))
    };
    for (what, loader) in loaders_with(256 << 10, slowed) {
        let model = loader.load_blocking(&dir).unwrap();
        assert_identical(&model, &truth, &what);
        let s = model.stats();
        assert_eq!((s.tensors, s.shards), (tensors, 24), "{what}");
        let planned = s.planned.expect("this load made its plan");
        // (Mapped views read nothing.)
        match s.first_read {
            Some(first) => assert!(first < planned, "{what}: first read at {first:?}, plan stood at {planned:?}"),
            None => assert!(what.starts_with("mapped views"), "{what}: a reading load records its first read"),
        }
    }
    // Loads that plan first read nothing before the plan stands: asked to, or with a filter.
    let plan_first = base().read_while_planning(ReadWhilePlanning::Never).build().unwrap();
    let filtered = early().filter(["big.*", "model.*"]).build().unwrap();
    for (what, loader) in [("plan first", plan_first), ("filtered", filtered)] {
        let model = loader.load_blocking(&dir).unwrap();
        assert_identical(&model, &truth, what);
        let (first, planned) = (model.stats().first_read.unwrap(), model.stats().planned.unwrap());
        assert!(first >= planned, "{what}: first read at {first:?}, plan stood at {planned:?}");
    }
}

/// Small tensors a shard beyond the first of [`many_tensors`].
const PER_SHARD: usize = 2600;

/// Tensor names for `shards` shards of [`many_tensors`].
fn many_names(shards: usize) -> Vec<String> {
    (0..10 + PER_SHARD * (shards - 1)).map(|i| format!("model.layers.{i}.self_attn.o_proj.weight")).collect()
}

/// `names` laid out over shards: a first shard of 10 small tensors, then 2,600 in each of
/// the others (many headers to parse after the first is validated).
fn many_tensors(names: &[String]) -> Vec<Vec<Spec<'_>>> {
    const SHAPES: [&[usize]; 7] = [&[1], &[2], &[3], &[4], &[5], &[6], &[7]];
    let shards = 1 + (names.len() - 10) / PER_SHARD;
    (0..shards)
        .map(|s| {
            let range = if s == 0 { 0..10 } else { 10 + (s - 1) * PER_SHARD..10 + s * PER_SHARD };
            names[range].iter().enumerate().map(|(k, n)| (n.as_str(), Dtype::F32, SHAPES[k % 7])).collect()
        })
        .collect()
}

/// [`many_tensors`] over `shards` shards, written to `dir` with an index, the first shard also
/// holding a tensor `big` of `len` bytes; every tensor's bytes.
fn write_many(dir: &std::path::Path, shards: usize, len: usize) -> std::collections::BTreeMap<String, Vec<u8>> {
    let names = many_names(shards);
    let mut specs = many_tensors(&names);
    let shape = [len];
    specs[0].push(("big", Dtype::U8, &shape));
    let refs: Vec<&[Spec<'_>]> = specs.iter().map(Vec::as_slice).collect();
    write_sharded(dir, &refs)
}

/// A shard's reads wait for its own header: with the first shard's header invalid, and
/// many headers after it to parse, nothing is read (no byte lands) before the load fails
/// with planning's error.
#[test]
fn a_shard_whose_header_fails_is_never_read() {
    let dir = scratch();
    let names = many_names(12);
    let specs = many_tensors(&names);
    let refs: Vec<&[Spec<'_>]> = specs.iter().map(Vec::as_slice).collect();
    write_sharded(&dir, &refs);
    let first = dir.join("model-00001-of-00012.safetensors");
    let mut bytes = std::fs::read(&first).unwrap();
    let at = bytes.windows(5).position(|w| w == b"\"F32\"").unwrap();
    bytes[at + 1..at + 4].copy_from_slice(b"X32");
    std::fs::write(&first, bytes).unwrap();
    let want = tensorlift::plan(&dir).unwrap_err().to_string();
    assert!(want.contains("model-00001-of-00012.safetensors"), "{want}");
    let landed = Arc::new(AtomicU64::new(0));
    let l = Arc::clone(&landed);
    let loader = early().progress(move |p| l.store(p.done, Ordering::SeqCst)).build().unwrap();
    assert_eq!(loader.load_blocking(&dir).unwrap_err().to_string(), want);
    assert_eq!(landed.load(Ordering::SeqCst), 0);
}

/// A header that fails validation in the last shard fails the load with the error planning
/// alone gives, after the earlier shards' reads began (bytes landed: the first shard is
/// validated long before the last); the stream hands out no tensor before it, and the
/// loader's next load is whole.
#[test]
fn a_later_shard_that_fails_validation_fails_the_load_with_planning_s_error() {
    let dir = scratch();
    let truth = write_many(&dir, 12, 1 << 20);
    let last = dir.join("model-00012-of-00012.safetensors");
    let good = std::fs::read(&last).unwrap();
    // The last shard's header names a dtype that does not exist; same length.
    let mut bad = good.clone();
    let at = bad.windows(5).position(|w| w == b"\"F32\"").unwrap();
    bad[at + 1..at + 4].copy_from_slice(b"X32");
    std::fs::write(&last, &bad).unwrap();
    let want = tensorlift::plan(&dir).unwrap_err().to_string();
    assert!(want.contains("model-00012-of-00012.safetensors"), "{want}");
    let landed = Arc::new(AtomicU64::new(0));
    let l = Arc::clone(&landed);
    let loader = early().progress(move |p| l.store(p.done, Ordering::SeqCst)).build().unwrap();
    for what in ["stream", "load"] {
        landed.store(0, Ordering::SeqCst);
        let err = match what {
            "stream" => {
                let mut stream = loader.stream_blocking(&dir).unwrap();
                match tensorlift::block_on(stream.next()) {
                    Some(Err(e)) => e,
                    other => panic!("{other:?}"),
                }
            }
            _ => loader.load_blocking(&dir).unwrap_err(),
        };
        assert_eq!(err.to_string(), want, "{what}");
        assert!(landed.load(Ordering::SeqCst) > 0, "{what}: nothing was read before planning failed");
    }
    std::fs::write(&last, &good).unwrap();
    assert_identical(&loader.load_blocking(&dir).unwrap(), &truth, "after a failed load");
}

/// An index that disagrees with the headers is found after every header is validated, and
/// so after reads began: the load fails with planning's own error.
#[test]
fn an_index_that_disagrees_fails_the_load_with_planning_s_error() {
    let dir = scratch();
    write_shard(&dir.join("s-1.safetensors"), &[("a", Dtype::U8, &[300_000]), ("b", Dtype::U8, &[3])]);
    write_shard(&dir.join("s-2.safetensors"), &[("c", Dtype::U8, &[300_000])]);
    tensorlift_testkit::write_index(
        &dir,
        &[("a", "s-1.safetensors"), ("b", "s-2.safetensors"), ("c", "s-2.safetensors")],
    );
    let want = tensorlift::plan(&dir).unwrap_err().to_string();
    for (what, loader) in loaders_with(64 << 10, |b| b.read_while_planning(ReadWhilePlanning::Always)) {
        let got = loader.load_blocking(&dir).unwrap_err().to_string();
        assert_eq!(got, want, "{what}");
    }
}

/// Shards whose data sections hold nothing, or nothing past the page their header ends in:
/// a shard with no tensors, one of empty tensors only, and one whose header ends exactly on
/// a page boundary; each read while planning goes on, identical to the files.
#[test]
fn shards_with_little_or_nothing_to_read_load_while_planning() {
    let dir = scratch();
    let mut truth = write_shard(&dir.join("a-1.safetensors"), &quirky());
    truth.extend(write_shard(&dir.join("a-2.safetensors"), &[]));
    truth.extend(write_shard(
        &dir.join("a-3.safetensors"),
        &[("empty_bf16", Dtype::BF16, &[0, 4]), ("nil", Dtype::U8, &[0])],
    ));
    // 8 + N = 4096: the data section starts on a page.
    let mut json = br#"{"paged":{"dtype":"U8","shape":[5000],"data_offsets":[0,5000]}}"#.to_vec();
    json.resize(4088, b' ');
    let data = tensorlift_testkit::pattern(5000, 7);
    let mut bytes = 4088u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(&data);
    std::fs::write(dir.join("a-4.safetensors"), bytes).unwrap();
    truth.insert("paged".into(), data);
    for (what, loader) in loaders_with(4096, |b| b.read_while_planning(ReadWhilePlanning::Always)) {
        let model = loader.load_blocking(&dir).unwrap();
        assert_identical(&model, &truth, &what);
    }
}

/// More shards than planning keeps open: the others are reopened by name, checked against
/// the header hash each was validated with, and read whole.
#[test]
fn shards_planning_closed_are_reopened_and_read_while_planning() {
    let dir = scratch();
    let names: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
    let shapes: Vec<[usize; 1]> = (0..10).map(|i| [1000 + 4099 * i]).collect();
    let shards: Vec<Vec<Spec<'_>>> = (0..10).map(|i| vec![(names[i].as_str(), Dtype::U8, &shapes[i][..])]).collect();
    let refs: Vec<&[Spec<'_>]> = shards.iter().map(Vec::as_slice).collect();
    let truth = write_sharded(&dir, &refs);
    for (what, loader) in loaders_with(8192, |b| b.max_open_files(4).read_while_planning(ReadWhilePlanning::Always)) {
        assert_identical(&loader.load_blocking(&dir).unwrap(), &truth, &what);
    }
}

/// Memory is taken for each shard's data section before its header is validated. A
/// checkpoint whose memory cannot be had fails with `HostMemory`; one that also fails its
/// checks fails with planning's error, as a load that planned first would.
#[test]
fn a_checkpoint_that_fails_its_checks_reports_that_before_memory() {
    use std::io::Write;
    let dir = scratch();
    // A terabyte, sparse: no machine that runs these tests has it to spare.
    let huge = 1u64 << 40;
    let write = |name: &str, json: String, data: u64| {
        let mut f = std::fs::File::create(dir.join(name)).unwrap();
        f.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
        f.write_all(json.as_bytes()).unwrap();
        f.set_len(8 + json.len() as u64 + data).unwrap();
    };
    write("a.safetensors", format!(r#"{{"t":{{"dtype":"U8","shape":[{huge}],"data_offsets":[0,{huge}]}}}}"#), huge);
    let loader = early().build().unwrap();
    match loader.load_blocking(&dir) {
        Err(tensorlift::LoadError::HostMemory { needed, .. }) => assert!(needed >= huge, "{needed}"),
        other => panic!("{other:?}"),
    }
    write("b.safetensors", r#"{"b":{"dtype":"X9","shape":[1],"data_offsets":[0,1]}}"#.into(), 1);
    let want = tensorlift::plan(&dir).unwrap_err().to_string();
    assert!(want.contains("b.safetensors"), "{want}");
    assert_eq!(loader.load_blocking(&dir).unwrap_err().to_string(), want);
    assert_eq!(loader.stream_blocking(&dir).unwrap_err().to_string(), want);
}

/// `Auto` reads while planning goes on where it pays: with 4 CPUs or more, or when the
/// largest shard (here the first) is not in the page cache; with fewer CPUs and the checkpoint cached, the
/// load plans first. Where the file system cannot drop a file's pages (tmpfs), the cold
/// half says so and is skipped.
#[test]
fn auto_reads_while_planning_where_it_pays() {
    let dir = scratch();
    // Data enough in the first shard that its header's pages are a small part of it.
    let truth = write_many(&dir, 24, 4 << 20);
    let loader = base().build().unwrap();
    let order = |model: &tensorlift::Model| (model.stats().first_read.unwrap(), model.stats().planned.unwrap());
    let model = loader.load_blocking(&dir).unwrap();
    assert_identical(&model, &truth, "cached");
    let (first, planned) = order(&model);
    if std::thread::available_parallelism().is_ok_and(|n| n.get() >= 4) {
        assert!(first < planned, "4+ CPUs: first read at {first:?}, plan stood at {planned:?}");
    } else {
        assert!(first >= planned, "cached, under 4 CPUs: first read at {first:?}, plan stood at {planned:?}");
    }
    drop(model);
    let first_shard = dir.join("model-00001-of-00024.safetensors");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        std::fs::File::open(&path).unwrap().sync_all().unwrap();
        tensorlift_io::cache::evict(&path).unwrap();
    }
    let resident = tensorlift_io::cache::resident_estimate(&std::fs::File::open(&first_shard).unwrap()).unwrap();
    if resident >= 0.5 {
        eprintln!("skipped the cold half: the file system kept {:.0}% of the first shard cached", resident * 100.0);
        return;
    }
    let model = loader.load_blocking(&dir).unwrap();
    assert_identical(&model, &truth, "not cached");
    let (first, planned) = order(&model);
    assert!(first < planned, "not cached: first read at {first:?}, plan stood at {planned:?}");
}
