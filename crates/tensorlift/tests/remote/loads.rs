//! What works on a local folder works on a bucket and over HTTP, to the same bytes.

use std::collections::BTreeMap;

use tensorlift::{Dtype, FormatError, LoadError, Model, Sharding, Split};
use tensorlift_testkit::net::{HttpServer, Validators};

use crate::{assert_identical, base, sharded, Remote};

/// Every tensor's bytes and dtype, for comparing two loads.
fn contents(model: &Model) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    model
        .tensors()
        .iter()
        .map(|t| (t.name().to_owned(), (t.dtype(), t.shape().to_vec(), t.to_host().unwrap().into_owned())))
        .collect()
}

#[test]
fn a_bucket_loads_to_the_files_bytes_by_folder_index_and_file() {
    let r = Remote::new();
    let truth = sharded(&r.root);
    let Some(_s3) = r.s3() else { return };
    let loader = base().build().unwrap();
    for url in ["s3://bucket/model", "s3://bucket/model/", "s3://bucket/model/model.safetensors.index.json"] {
        let model = loader.load_blocking(url).unwrap();
        assert_identical(&model, &truth, url);
        let s = model.stats();
        assert_eq!((s.remote_shards, s.direct_shards, s.buffered_shards), (3, 0, 0), "{url}");
        // The data, and no more of the headers than the page each data section starts in.
        let data = s.checkpoint_bytes - header_bytes(&r.root.join("bucket/model"));
        assert!(s.bytes_read >= data && s.bytes_read <= data + 3 * 4096, "{url}: {} of {data}", s.bytes_read);
    }
    // One shard named directly.
    let one = loader.load_blocking("s3://bucket/model/model-00003-of-00003.safetensors").unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one.get("third").unwrap().to_host().unwrap().as_ref(), truth["third"].as_slice());
    // Planning names shards by URL.
    let plan = loader.plan("s3://bucket/model").unwrap();
    assert!(plan.is_remote());
    assert_eq!(plan.shards()[0].path.to_str(), Some("s3://bucket/model/model-00001-of-00003.safetensors"));
    // A read of a planned object: its bytes; a range past its end (or whose end overflows)
    // an error at once, the buffer handed back.
    let object = plan.remote_object(0).unwrap();
    let file = std::fs::read(r.root.join("bucket/model/model-00001-of-00003.safetensors")).unwrap();
    let read = |offset: u64, len: usize| {
        tensorlift::block_on(tensorlift_io::read_object(object, offset, vec![0u8; len], 0, len))
    };
    assert_eq!(read(3, 100).unwrap(), file[3..103]);
    for (offset, len) in [(file.len() as u64 - 10, 11), (u64::MAX - 4, 8)] {
        let failed = read(offset, len).unwrap_err();
        assert!(failed.error.to_string().contains("run past the end of the"), "{}", failed.error);
        assert_eq!(failed.buf.map(|b| b.len()), Some(len));
    }
}

/// Header bytes of every shard in `dir` (8 + N each): what a load does not read again.
fn header_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| {
            let b = std::fs::read(e.path()).unwrap();
            8 + u64::from_le_bytes(b[..8].try_into().unwrap())
        })
        .sum()
}

#[test]
fn filters_slices_conversion_and_streams_give_the_local_loads_bytes() {
    let r = Remote::new();
    sharded(&r.root);
    let Some(_s3) = r.s3() else { return };
    let local = r.root.join("bucket/model");
    let options = [
        ("filter", base().filter(["f*", "third"])),
        ("tensor-parallel rank 1 of 2", base().shard(rank_one())),
        ("to f32", base().convert_to(Dtype::F32)),
    ];
    for (what, builder) in options {
        let loader = builder.build().unwrap();
        let want = contents(&loader.load_blocking(&local).unwrap());
        let got = contents(&loader.load_blocking("s3://bucket/model").unwrap());
        assert!(!want.is_empty(), "{what}");
        assert_eq!(got, want, "{what}");
    }
    // Streamed, each tensor as it lands.
    let loader = base().build().unwrap();
    let mut stream = loader.stream_blocking("s3://bucket/model").unwrap();
    let mut seen = BTreeMap::new();
    while let Some(t) = tensorlift::block_on(stream.next()) {
        let t = t.unwrap();
        seen.insert(t.name().to_owned(), t.to_host().unwrap().into_owned());
    }
    let want: BTreeMap<String, Vec<u8>> =
        contents(&loader.load_blocking(&local).unwrap()).into_iter().map(|(n, (_, _, b))| (n, b)).collect();
    assert_eq!(seen, want);
}

fn rank_one() -> Sharding {
    Sharding::new(1, 2)
        .unwrap()
        .rule("big", Split::Column)
        .unwrap()
        .rule("f16", Split::Column)
        .unwrap()
        .rule("f64", Split::Row)
        .unwrap()
}

#[test]
fn a_header_longer_than_the_first_get_is_read_in_two() {
    let r = Remote::new();
    let dir = r.root.join("bucket/wide");
    std::fs::create_dir_all(&dir).unwrap();
    let names: Vec<String> = (0..1500).map(|i| format!("model.layers.{i}.self_attn.q_proj.weight")).collect();
    let specs: Vec<tensorlift_testkit::Spec<'_>> =
        names.iter().map(|n| (n.as_str(), Dtype::F16, &[3usize][..])).collect();
    let truth = tensorlift_testkit::write_shard(&dir.join("model.safetensors"), &specs);
    // Planning's first GET of a shard asks for 64 KiB.
    assert!(header_bytes(&dir) > 64 << 10, "the fixture's header must outgrow the first GET");
    let Some(_s3) = r.s3() else { return };
    let model = base().build().unwrap().load_blocking("s3://bucket/wide").unwrap();
    assert_identical(&model, &truth, "wide header");
}

#[test]
fn an_index_cannot_reach_outside_its_prefix() {
    let r = Remote::new();
    sharded(&r.root);
    let dir = r.root.join("bucket/escape");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        r.root.join("bucket/model/model-00001-of-00003.safetensors"),
        r.root.join("bucket/secret.safetensors"),
    )
    .unwrap();
    tensorlift_testkit::write_index(&dir, &[("bool", "../secret.safetensors")]);
    // Over plain HTTP, names a lenient server could resolve outside the folder (`..;` to
    // Tomcat, `..\` to IIS, `%2e%2e` decoded twice) are refused before any GET of them.
    let http = HttpServer::start(&r.root).unwrap();
    let loader = base().build().unwrap();
    for shard in ["..;/secret.safetensors", "..\\secret.safetensors", "%2e%2e/secret.safetensors"] {
        tensorlift_testkit::write_index(&dir, &[("bool", shard)]);
        let err = loader.load_blocking(format!("http://127.0.0.1:{}/bucket/escape", http.port)).unwrap_err();
        assert!(
            matches!(&err, LoadError::Format(FormatError::ShardUnreadable { shard: s, .. }) if s == shard)
                && err.to_string().contains("not read over HTTP"),
            "{shard}: {err:?}"
        );
    }
    tensorlift_testkit::write_index(&dir, &[("bool", "../secret.safetensors")]);
    let Some(_s3) = r.s3() else { return };
    let err = base().build().unwrap().load_blocking("s3://bucket/escape").unwrap_err();
    assert!(
        matches!(&err, LoadError::Format(FormatError::ShardOutsideFolder { shard, .. }) if shard == "../secret.safetensors"),
        "{err:?}"
    );
}

#[test]
fn missing_objects_and_wrong_credentials_give_the_servers_word() {
    let r = Remote::new();
    sharded(&r.root);
    let Some(_s3) = r.s3() else { return };
    let loader = base().build().unwrap();
    let err = loader.load_blocking("s3://nobucket/model").unwrap_err().to_string();
    assert!(err.contains("s3://nobucket/model") && err.contains("NoSuchBucket"), "{err}");
    let err = loader.load_blocking("s3://bucket/nothing-here").unwrap_err();
    assert!(matches!(&err, LoadError::Format(FormatError::NoShards { .. })), "{err:?}");
    let err = loader.load_blocking("s3://bucket/model/missing.safetensors").unwrap_err().to_string();
    assert!(err.contains("missing.safetensors") && err.to_lowercase().contains("not found"), "{err}");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    let err = loader.load_blocking("s3://bucket/model").unwrap_err().to_string();
    assert!(err.contains("SignatureDoesNotMatch"), "{err}");
    std::env::remove_var("AWS_ACCESS_KEY_ID");
    std::env::remove_var("AWS_SECRET_ACCESS_KEY");
    std::env::set_var("AWS_SKIP_SIGNATURE", "true");
    let err = loader.load_blocking("s3://bucket/model").unwrap_err().to_string();
    std::env::remove_var("AWS_SKIP_SIGNATURE");
    assert!(err.contains("s3://bucket/model") && (err.contains("403") || err.contains("Access")), "{err}");
}

#[test]
fn a_plain_http_server_with_ranges_serves_a_folder_and_a_file() {
    let r = Remote::new();
    let truth = sharded(&r.root);
    let http = HttpServer::start(&r.root).unwrap();
    let loader = base().build().unwrap();
    let url = format!("http://127.0.0.1:{}/bucket/model", http.port);
    let model = loader.load_blocking(&url).unwrap();
    assert_identical(&model, &truth, &url);
    assert_eq!(model.stats().remote_shards, 3);
    let file = format!("{url}/model-00002-of-00003.safetensors");
    let model = loader.load_blocking(&file).unwrap();
    assert_eq!(model.len(), crate::quirky().len() - 7);
    // A folder with no index: over HTTP, which cannot list, its model.safetensors.
    let single = r.root.join("bucket/single");
    std::fs::create_dir_all(&single).unwrap();
    let truth = tensorlift_testkit::write_shard(&single.join("model.safetensors"), &crate::quirky());
    let model = loader.load_blocking(format!("http://127.0.0.1:{}/bucket/single/", http.port)).unwrap();
    assert_identical(&model, &truth, "http folder without an index");
}

#[test]
fn a_bucket_without_an_index_loads_its_shards_in_natural_order() {
    let r = Remote::new();
    let dir = r.root.join("bucket/scan");
    std::fs::create_dir_all(&dir).unwrap();
    let mut truth = tensorlift_testkit::write_shard(&dir.join("part-10.safetensors"), &[("late", Dtype::F32, &[9])]);
    truth.extend(tensorlift_testkit::write_shard(&dir.join("part-9.safetensors"), &[("early", Dtype::U8, &[70])]));
    std::fs::write(dir.join("README.md"), "not a shard").unwrap();
    let Some(_s3) = r.s3() else { return };
    let loader = base().build().unwrap();
    let plan = loader.plan("s3://bucket/scan").unwrap();
    let names: Vec<&str> = plan.shards().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["part-9.safetensors", "part-10.safetensors"]);
    assert_identical(&loader.load_plan_blocking(plan).unwrap(), &truth, "scan");
}

/// PyTorch files (`torch.save`, zip and legacy layouts) in a bucket: each tensor as the local
/// load of the same files gives it (itself held to torch's own reading elsewhere), by file
/// name, by a folder's `pytorch_model.bin`, and through `pytorch_model.bin.index.json`.
#[test]
fn pytorch_files_in_a_bucket_load_as_from_a_local_folder() {
    let r = Remote::new();
    let fixture = |name: &str| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tensorlift-pickle/tests/fixtures").join(name)
    };
    let put = |from: &str, to: &str| {
        let to = r.root.join("bucket/torch").join(to);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(fixture(from), to).unwrap();
    };
    put("tied.zip.bin", "single/pytorch_model.bin");
    put("every_dtype.legacy.bin", "legacy/every_dtype.pt");
    put("every_dtype.zip.bin", "sharded/pytorch_model-00001-of-00002.bin");
    put("second_shard.zip.bin", "sharded/pytorch_model-00002-of-00002.bin");
    put("views.zip.bin", "strided/pytorch_model.bin");
    // The index names every tensor's shard, as transformers writes it.
    let loader = base().build().unwrap();
    let first = contents(&loader.load_blocking(fixture("every_dtype.zip.bin")).unwrap());
    let mut map: serde_json::Map<String, serde_json::Value> =
        first.keys().map(|k| (k.clone(), "pytorch_model-00001-of-00002.bin".into())).collect();
    map.insert("extra.weight".into(), "pytorch_model-00002-of-00002.bin".into());
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(r.root.join("bucket/torch/sharded/pytorch_model.bin.index.json"), index.to_string()).unwrap();
    let Some(_s3) = r.s3() else { return };
    for (url, local) in [
        ("s3://bucket/torch/single", "single"),
        ("s3://bucket/torch/single/pytorch_model.bin", "single/pytorch_model.bin"),
        ("s3://bucket/torch/legacy/every_dtype.pt", "legacy/every_dtype.pt"),
        ("s3://bucket/torch/sharded", "sharded"),
        ("s3://bucket/torch/sharded/pytorch_model.bin.index.json", "sharded"),
    ] {
        let want = contents(&loader.load_blocking(r.root.join("bucket/torch").join(local)).unwrap());
        let model = loader.load_blocking(url).unwrap();
        assert!(want.len() > 1, "{url}");
        assert_eq!(contents(&model), want, "{url}");
        let s = model.stats();
        assert_eq!((s.remote_shards, s.direct_shards, s.buffered_shards), (s.shards, 0, 0), "{url}");
    }
    // Converted as it lands, as from local disk.
    let f32s = base().convert_to(Dtype::F32).build().unwrap();
    let want = contents(&f32s.load_blocking(r.root.join("bucket/torch/sharded")).unwrap());
    assert_eq!(contents(&f32s.load_blocking("s3://bucket/torch/sharded").unwrap()), want);
    // What a local load refuses, a remote one refuses alike.
    let err = loader.load_blocking("s3://bucket/torch/strided").unwrap_err().to_string();
    assert!(err.contains("tensor 'transposed' is a strided view"), "{err}");
    // The stores read the environment too: this test holds the lock on it (`Remote`).
    struct Unset;
    impl Drop for Unset {
        fn drop(&mut self) {
            std::env::remove_var("TENSORLIFT_USE_SAFETENSORS");
        }
    }
    let unset = Unset;
    std::env::set_var("TENSORLIFT_USE_SAFETENSORS", "1");
    let refused = loader.load_blocking("s3://bucket/torch/single").unwrap_err();
    drop(unset);
    assert!(matches!(refused, LoadError::Format(FormatError::PyTorchCheckpoint { .. })), "{refused:?}");
    assert!(refused.to_string().contains("safetensors only"), "{refused}");
}

/// A PyTorch file written by torch itself, large enough that planning goes past the first
/// GET: a pickle longer than it, a zip directory longer than a block, record headers each in
/// a block of its own. Each tensor holds the values torch was given. And a file of more
/// records than planning may take GETs for is refused, saying why.
#[test]
fn a_large_pytorch_file_is_planned_by_ranged_gets_and_bounded() {
    let r = Remote::new();
    let dir = r.root.join("bucket/large");
    std::fs::create_dir_all(&dir).unwrap();
    let save = |path: &std::path::Path, n: usize, cols: usize| {
        let script = format!(
            "import sys, torch\n\
             sd = {{f'model.layers.{{i}}.self_attn.a_projection_whose_name_is_long_enough_that_the_pickle_\
             of_three_hundred_of_them_outgrows_the_first_get.weight': \
             torch.arange(i, i + 32 * {cols}, dtype=torch.float32).reshape(32, {cols}) for i in range({n})}}\n\
             torch.save(sd, sys.argv[1])"
        );
        crate::torch_writes(&script, path);
    };
    // 300 records of 20 KiB: a block each.
    save(&dir.join("pytorch_model.bin"), 300, 160);
    let (pickle, archive) = {
        let bytes = std::fs::read(dir.join("pytorch_model.bin")).unwrap();
        let at = |name: &[u8]| bytes.windows(name.len()).position(|w| w == name).unwrap();
        (at(b"data/0"), bytes.len())
    };
    assert!(pickle > 64 << 10, "the pickle ({pickle} bytes) must outgrow the first GET ({archive} bytes)");
    let Some(_s3) = r.s3() else { return };
    let model = base().build().unwrap().load_blocking("s3://bucket/large").unwrap();
    assert_eq!(model.len(), 300);
    for i in [0usize, 1, 150, 299] {
        let name = format!(
            "model.layers.{i}.self_attn.a_projection_whose_name_is_long_enough_that_the_pickle_\
             of_three_hundred_of_them_outgrows_the_first_get.weight"
        );
        let t = model.get(&name).unwrap_or_else(|| panic!("{name}"));
        let want: Vec<u8> = (0..32 * 160).flat_map(|k| ((i + k) as f32).to_le_bytes()).collect();
        assert_eq!(t.shape(), &[32, 160]);
        assert!(t.to_host().unwrap().as_ref() == want.as_slice(), "tensor {i}");
    }
    // More records than planning may GET: refused, naming the way out.
    let mut few = crate::quick();
    few.pytorch_reads = 100;
    let err = base().remote(few).build().unwrap().load_blocking("s3://bucket/large").unwrap_err().to_string();
    assert!(err.contains("more than 100 reads") && err.contains("tensorlift convert"), "{err}");
}

#[test]
fn urls_that_carry_more_than_a_place_are_refused() {
    let _r = Remote::new();
    let loader = base().build().unwrap();
    for (url, says) in [
        ("s3://bucket/model?versionId=3", "query string"),
        ("https://account.blob.core.windows.net/c/model/?sv=2024&sig=secret", "query string"),
        ("https://user:secret@example.invalid/model/", "credentials in a URL"),
        ("https://secret@example.invalid/model/", "credentials in a URL"),
        ("abfss://container:secret@account.dfs.core.windows.net/model/", "credentials in a URL"),
    ] {
        let err = loader.load_blocking(url).unwrap_err().to_string();
        assert!(err.contains(says), "{url}: {err}");
        // The refusal names the URL without what it refuses.
        assert!(!err.contains("secret") && err.contains("REDACTED"), "{url}: {err}");
    }
}

#[test]
fn folder_names_that_need_encoding_are_not_encoded_twice() {
    let r = Remote::new();
    let dir = r.root.join("bucket/org~x/llama [7b]");
    std::fs::create_dir_all(&dir).unwrap();
    let truth = tensorlift_testkit::write_sharded(&dir, &[&crate::quirky()[..3], &crate::quirky()[3..]]);
    let Some(_s3) = r.s3() else { return };
    let loader = base().build().unwrap();
    for url in ["s3://bucket/org~x/llama%20%5B7b%5D/", "s3://bucket/org~x/llama%20%5B7b%5D"] {
        assert_identical(&loader.load_blocking(url).unwrap(), &truth, url);
    }
}

#[test]
fn a_listing_over_the_shard_bound_is_refused() {
    let r = Remote::new();
    let dir = r.root.join("bucket/many");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..3 {
        tensorlift_testkit::write_shard(&dir.join(format!("part-{i}.safetensors")), &[("t", Dtype::U8, &[4])]);
    }
    let Some(_s3) = r.s3() else { return };
    let err = base().max_shards(2).build().unwrap().load_blocking("s3://bucket/many").unwrap_err().to_string();
    assert!(err.contains("max_shards"), "{err}");
}

#[test]
fn a_server_that_cannot_show_a_change_is_refused() {
    let r = Remote::new();
    let single = r.root.join("bucket/single");
    std::fs::create_dir_all(&single).unwrap();
    tensorlift_testkit::write_shard(&single.join("model.safetensors"), &crate::quirky());
    let http = HttpServer::start_with(&r.root, Validators::Neither).unwrap();
    let url = format!("http://127.0.0.1:{}/bucket/single/model.safetensors", http.port);
    let err = base().build().unwrap().load_blocking(&url).unwrap_err().to_string();
    assert!(err.contains("neither an ETag nor a Last-Modified"), "{err}");
}

#[test]
fn a_timeout_from_the_environment_that_cannot_be_a_duration_is_ignored() {
    let _r = Remote::new();
    std::env::set_var("TENSORLIFT_REMOTE_TIMEOUT_SECS", "1e20");
    let o = tensorlift::RemoteOptions::from_env();
    std::env::remove_var("TENSORLIFT_REMOTE_TIMEOUT_SECS");
    assert_eq!(o.timeout, tensorlift::RemoteOptions::default().timeout);
}

#[test]
fn a_cached_copy_makes_the_next_load_local_until_the_object_changes() {
    let r = Remote::new();
    let truth = sharded(&r.root);
    let cache = r.root.join("cache");
    let Some(_s3) = r.s3() else { return };
    let loader = base().remote_cache(&cache).build().unwrap();
    // First load: from the store, copied as it is read.
    let first = loader.load_blocking("s3://bucket/model").unwrap();
    assert_identical(&first, &truth, "first load");
    assert_eq!(first.stats().remote_shards, 3);
    let copy = store_folder(&cache).join("model");
    for name in ["model.safetensors.index.json", "model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    {
        let original = std::fs::read(r.root.join("bucket/model").join(name)).unwrap();
        assert!(std::fs::read(copy.join(name)).unwrap() == original, "{name}: the copy is not the object");
    }
    // Second load: local, the same bytes.
    let second = loader.load_blocking("s3://bucket/model").unwrap();
    assert_identical(&second, &truth, "second load");
    let s = second.stats();
    assert_eq!((s.remote_shards, s.direct_shards + s.buffered_shards), (0, 3));
    // A plan made from the copy says so, and a verified load, which reads the store, does
    // not take it (it would check the copy against a cache folder that lists no digest).
    let plan = loader.plan("s3://bucket/model").unwrap();
    assert_eq!(plan.copy_of(), Some(std::path::Path::new("s3://bucket/model")));
    let err = base().verify(tensorlift::Verify::IfKnown).build().unwrap().load_plan_blocking(plan).unwrap_err();
    assert!(matches!(&err, LoadError::Unsupported(m) if m.contains("its local copy")), "{err:?}");
    // A shard changed on the store: its copy is not used; the load reads the store again,
    // and copies the new object.
    let shard = r.root.join("bucket/model/model-00002-of-00003.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&shard, &bytes).unwrap();
    let third = loader.load_blocking("s3://bucket/model").unwrap();
    assert_eq!(third.stats().remote_shards, 3);
    assert!(std::fs::read(copy.join("model-00002-of-00003.safetensors")).unwrap() == bytes);
    // A filtered load reads parts of shards 2 and 3: it leaves no copy of them, nor partial
    // files (shard 1 is small enough that planning's first GET read all of it).
    let cache2 = r.root.join("cache2");
    let partial = base().remote_cache(&cache2).filter(["tail_u8"]).build().unwrap();
    partial.load_blocking("s3://bucket/model").unwrap();
    let mut left: Vec<_> = std::fs::read_dir(store_folder(&cache2).join("model"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "model-00001-of-00003.safetensors",
            "model-00001-of-00003.safetensors.tlcache",
            "model.safetensors.index.json",
            "model.safetensors.index.json.tlcache"
        ]
    );
}

/// Descriptors this process holds open on temporary copies (`*.partial-*`) under `dir`,
/// once the cache's writer has none open (it keeps one open through a burst of writes):
/// waits for that, up to 20 s.
fn partial_copies_open(dir: &std::path::Path) -> usize {
    for _ in 0..200 {
        if partial_fds(dir) == 0 {
            return 0;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    partial_fds(dir)
}

/// Descriptors this process holds open now on files named `*.partial-*` under `dir`.
fn partial_fds(dir: &std::path::Path) -> usize {
    let dir = std::fs::canonicalize(dir).unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(&dir) && target.to_string_lossy().contains(".partial-"))
        .count()
}

#[test]
fn a_plan_of_many_shards_holds_no_descriptor_for_copies_not_yet_written() {
    let r = Remote::new();
    let dir = r.root.join("bucket/many-shards");
    std::fs::create_dir_all(&dir).unwrap();
    let names: Vec<String> = (0..40).map(|i| format!("t{i}")).collect();
    let specs: Vec<Vec<tensorlift_testkit::Spec<'_>>> =
        names.iter().map(|n| vec![(n.as_str(), Dtype::F32, &[70_000usize][..])]).collect();
    let shards: Vec<&[tensorlift_testkit::Spec<'_>]> = specs.iter().map(Vec::as_slice).collect();
    let truth = tensorlift_testkit::write_sharded(&dir, &shards);
    let Some(_s3) = r.s3() else { return };
    let cache = r.root.join("cache-many");
    let loader = base().remote_cache(&cache).build().unwrap();
    // Planned: 40 shards, each to be copied as it is read (planning's first GET of each
    // already written to its copy), and no descriptor held for them.
    let plan = loader.plan("s3://bucket/many-shards").unwrap();
    assert_eq!(plan.shards().len(), 40);
    // (The writer writes them as it gets to them: waited for, up to 20 s.)
    let store = store_folder(&cache).join("many-shards");
    let partials = || {
        std::fs::read_dir(&store)
            .unwrap()
            .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().contains(".partial-")))
            .count()
    };
    for _ in 0..200 {
        if partials() == 40 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(partials(), 40, "planning's first bytes are not in the copies");
    assert_eq!(partial_copies_open(&cache), 0, "a plan holds a descriptor per shard's copy");
    // (The count sees a descriptor that is held.)
    let control = store.join("control.partial-0");
    let held = std::fs::File::create(&control).unwrap();
    assert!(partial_fds(&cache) >= 1, "a held descriptor is not counted");
    drop(held);
    std::fs::remove_file(&control).unwrap();
    let model = loader.load_plan_blocking(plan).unwrap();
    assert_identical(&model, &truth, "many shards");
    drop(model);
    assert_eq!(partial_copies_open(&cache), 0);
    // Every copy whole: the next load is local.
    let again = loader.load_blocking("s3://bucket/many-shards").unwrap();
    assert_eq!(again.stats().remote_shards, 0);
}

/// The one folder of a store's copies in a cache folder (`s3-bucket-HASH`).
fn store_folder(cache: &std::path::Path) -> std::path::PathBuf {
    let found: Vec<_> = std::fs::read_dir(cache).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].file_name().unwrap().to_string_lossy().starts_with("s3-bucket-"), "{found:?}");
    found[0].clone()
}

#[test]
fn a_cache_that_others_could_redirect_is_not_written() {
    use std::os::unix::fs::PermissionsExt;
    let r = Remote::new();
    let truth = sharded(&r.root);
    let Some(_s3) = r.s3() else { return };
    // Learn the store's folder name, then plant a link under that name in a fresh cache.
    let first = r.root.join("cache-a");
    base().remote_cache(&first).build().unwrap().load_blocking("s3://bucket/model").unwrap();
    let name = store_folder(&first).file_name().unwrap().to_owned();
    let (cache, victim) = (r.root.join("cache-b"), r.root.join("victim"));
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(&victim, cache.join(&name)).unwrap();
    let model = base().remote_cache(&cache).build().unwrap().load_blocking("s3://bucket/model").unwrap();
    assert_identical(&model, &truth, "through a planted link");
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0, "written through the link");
    // The cache folder itself a link that another user made (where anyone may make one, as
    // in /tmp), to a folder of ours: nothing is written through it. (Only root can make a
    // link that another user owns.)
    let (planted, ours) = (r.root.join("cache-link"), r.root.join("ours"));
    std::fs::create_dir_all(&ours).unwrap();
    std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(&ours, &planted).unwrap();
    match std::os::unix::fs::lchown(&planted, Some(65534), Some(65534)) {
        Ok(()) => {
            let model = base().remote_cache(&planted).build().unwrap().load_blocking("s3://bucket/model").unwrap();
            assert_identical(&model, &truth, "through a link another user made");
            assert_eq!(std::fs::read_dir(&ours).unwrap().count(), 0, "written through another user's link");
            // The same link, ours: used.
            std::os::unix::fs::lchown(&planted, Some(0), Some(0)).unwrap();
            base().remote_cache(&planted).build().unwrap().load_blocking("s3://bucket/model").unwrap();
            assert_eq!(std::fs::read_dir(&ours).unwrap().count(), 1, "our own link is a cache folder");
        }
        Err(e) => eprintln!("a link another user owns needs root to make ({e}): that case is not checked"),
    }
    // A cache folder others may write to is neither written nor read: a whole, noted copy
    // planted there (cache-a's, which matches the store) is not used.
    let open = r.root.join("cache-c");
    copy_tree(&first, &open);
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let model = base().remote_cache(&open).build().unwrap().load_blocking("s3://bucket/model").unwrap();
    assert_identical(&model, &truth, "shared cache folder");
    assert_eq!(model.stats().remote_shards, 3, "a copy in a folder others may write to was read");
    // The same copy, in a folder of the owner's only, is.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o700)).unwrap();
    let model = base().remote_cache(&open).build().unwrap().load_blocking("s3://bucket/model").unwrap();
    assert_eq!(model.stats().remote_shards, 0);
    // A note or copy that others may write, or that another user made (as one who swapped
    // the whole folder, through a folder above it that they may write to, would have), is
    // not read: the checkpoint comes from the store (a plan is local only where every
    // object's copy is usable).
    let shard = store_folder(&open).join("model/model-00002-of-00003.safetensors");
    let note = shard.with_extension("safetensors.tlcache");
    for file in [&shard, &note] {
        let mode = std::fs::metadata(file).unwrap().permissions().mode();
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode | 0o020)).unwrap();
        let model = base().remote_cache(&open).build().unwrap().load_blocking("s3://bucket/model").unwrap();
        assert_identical(&model, &truth, "a copy others may write");
        assert_eq!(model.stats().remote_shards, 3, "{} others may write was read", file.display());
        // (Read again from the store, it is copied anew: ours, and used.)
        let model = base().remote_cache(&open).build().unwrap().load_blocking("s3://bucket/model").unwrap();
        assert_eq!(model.stats().remote_shards, 0);
    }
    for file in [&shard, &note] {
        match std::os::unix::fs::chown(file, Some(65534), None) {
            Ok(()) => {
                let model = base().remote_cache(&open).build().unwrap().load_blocking("s3://bucket/model").unwrap();
                assert_identical(&model, &truth, "another user's copy");
                assert_eq!(model.stats().remote_shards, 3, "{} of another user was read", file.display());
            }
            Err(e) => eprintln!("a file another user owns needs root to make ({e}): that case is not checked"),
        }
    }
}

/// Copies a folder tree (files and folders only), keeping each file's inode new: a copy's
/// note names the file it was written to, so the copied notes are rewritten to match.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else if !e.file_name().to_string_lossy().ends_with(".tlcache") {
            std::fs::copy(e.path(), &dest).unwrap();
            let note = e.path().with_extension(format!("{}.tlcache", e.path().extension().unwrap().to_string_lossy()));
            let m = std::fs::metadata(&dest).unwrap();
            let text = std::fs::read_to_string(&note).unwrap();
            let text: String =
                text.lines()
                    .map(|l| {
                        if l.starts_with("file ") {
                            format!("file {} {}\n", m.dev(), m.ino())
                        } else {
                            format!("{l}\n")
                        }
                    })
                    .collect();
            std::fs::write(
                dest.with_extension(format!("{}.tlcache", dest.extension().unwrap().to_string_lossy())),
                text,
            )
            .unwrap();
        }
    }
}

/// gs:// and az:// through object_store's GCS and Azure clients, each pointed at a plain
/// HTTP file server the way their emulators are reached (a service-account key's
/// `gcs_base_url`, as for fake-gcs-server; Azurite's `AZURE_STORAGE_USE_EMULATOR`): the
/// clients' URLs, headers and ranged GETs, to the files' bytes. (No GCS or Azure server
/// runs here; their own protocols past a GET, such as listing, are not exercised.)
#[test]
fn gcs_and_azure_urls_go_through_their_stores_clients() {
    let r = Remote::new();
    let truth = sharded(&r.root);
    std::fs::create_dir_all(r.root.join("devstoreaccount1")).unwrap();
    std::os::unix::fs::symlink(r.root.join("bucket"), r.root.join("devstoreaccount1/container")).unwrap();
    let http = HttpServer::start(&r.root).unwrap();
    let base_url = format!("http://127.0.0.1:{}", http.port);
    let key = format!(
        r#"{{"gcs_base_url": "{base_url}", "disable_oauth": true, "client_email": "", "private_key": "", "private_key_id": ""}}"#
    );
    std::env::set_var("GOOGLE_SERVICE_ACCOUNT_KEY", key);
    let gcs = base().build().unwrap().load_blocking("gs://bucket/model");
    std::env::remove_var("GOOGLE_SERVICE_ACCOUNT_KEY");
    assert_identical(&gcs.unwrap(), &truth, "gs://");
    std::env::set_var("AZURE_STORAGE_USE_EMULATOR", "true");
    std::env::set_var("AZURITE_BLOB_STORAGE_URL", &base_url);
    let azure = base().build().unwrap().load_blocking("az://container/model/model.safetensors.index.json");
    // Azure Data Lake's URL names the container where a user would be (not a credential).
    let adls = "abfss://container@devstoreaccount1.dfs.core.windows.net/model/model.safetensors.index.json";
    let data_lake = base().build().unwrap().load_blocking(adls);
    std::env::remove_var("AZURE_STORAGE_USE_EMULATOR");
    std::env::remove_var("AZURITE_BLOB_STORAGE_URL");
    assert_identical(&azure.unwrap(), &truth, "az://");
    assert_identical(&data_lake.unwrap(), &truth, "abfss://");
}

/// The shards and index of `bucket/model`, and a `SHA256SUMS` of them written by coreutils.
pub(crate) fn with_sums(root: &std::path::Path) {
    let dir = root.join("bucket/model");
    let names = [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ];
    std::fs::write(dir.join("SHA256SUMS"), tensorlift_testkit::coreutils_sha256sums(&dir, &names)).unwrap();
}

#[test]
fn verified_remote_loads_check_each_shard_against_the_stores_sha256sums() {
    use tensorlift::Verify;
    let r = Remote::new();
    let truth = sharded(&r.root);
    with_sums(&r.root);
    let cache = r.root.join("cache");
    let Some(_s3) = r.s3() else { return };
    // Whole and verified, on the host; with a warm cache too, which a verified load does not
    // read (the digests it checks are the store's).
    base().remote_cache(&cache).build().unwrap().load_blocking("s3://bucket/model").unwrap();
    let model =
        base().remote_cache(&cache).verify(Verify::Required).build().unwrap().load_blocking("s3://bucket/model");
    let model = model.unwrap();
    assert_identical(&model, &truth, "verified");
    let s = model.stats();
    let shards: u64 = (1..=3)
        .map(|i| {
            std::fs::metadata(r.root.join(format!("bucket/model/model-0000{i}-of-00003.safetensors"))).unwrap().len()
        })
        .sum();
    assert_eq!((s.remote_shards, s.verified_bytes, s.unverified_bytes), (3, shards, 0));
    // One byte flipped in the middle of a shard: a checksum error naming it and both digests.
    let shard = r.root.join("bucket/model/model-00002-of-00003.safetensors");
    let good = std::fs::read(&shard).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    std::fs::write(&shard, &bad).unwrap();
    let err = base().verify(Verify::Required).build().unwrap().load_blocking("s3://bucket/model").unwrap_err();
    assert!(
        matches!(&err, LoadError::Checksum { file, .. } if file.ends_with("model-00002-of-00003.safetensors")),
        "{err:?}"
    );
    std::fs::write(&shard, &good).unwrap();
    // The index listed with another digest: the index is named.
    let sums = r.root.join("bucket/model/SHA256SUMS");
    let text = std::fs::read_to_string(&sums).unwrap();
    let wrong: String = text
        .lines()
        .map(|l| if l.ends_with("index.json") { format!("{}{}\n", "0".repeat(64), &l[64..]) } else { format!("{l}\n") })
        .collect();
    std::fs::write(&sums, wrong).unwrap();
    let err = base().verify(Verify::Required).build().unwrap().load_blocking("s3://bucket/model").unwrap_err();
    assert!(
        matches!(&err, LoadError::Checksum { file, .. } if file.ends_with("model.safetensors.index.json")),
        "{err:?}"
    );
    // No SHA256SUMS: required fails saying where it looked; if-known loads, unverified.
    std::fs::remove_file(&sums).unwrap();
    let err = base().verify(Verify::Required).build().unwrap().load_blocking("s3://bucket/model").unwrap_err();
    assert!(
        matches!(&err, LoadError::NoDigest { sums_file, .. } if sums_file.to_str() == Some("s3://bucket/model/SHA256SUMS")),
        "{err:?}"
    );
    let model = base().verify(Verify::IfKnown).build().unwrap().load_blocking("s3://bucket/model").unwrap();
    assert_eq!((model.stats().verified_bytes, model.stats().unverified_bytes), (0, shards));
    // A manifest is written beside local files only.
    let err = tensorlift::checksums::manifest("s3://bucket/model").unwrap_err().to_string();
    assert!(err.contains("local files"), "{err}");
}

#[test]
fn without_etags_a_change_shows_by_the_modification_time() {
    let r = Remote::new();
    sharded(&r.root);
    let http = HttpServer::start_with(&r.root, Validators::LastModified).unwrap();
    let url = format!("http://127.0.0.1:{}/bucket/model", http.port);
    let loader = base().build().unwrap();
    let plan = loader.plan(&url).unwrap();
    // Same length, other bytes, a later time (HTTP dates have whole seconds).
    let shard = r.root.join("bucket/model/model-00002-of-00003.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&shard, &bytes).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    std::fs::File::options().write(true).open(&shard).unwrap().set_modified(later).unwrap();
    let err = loader.load_plan_blocking(plan).unwrap_err();
    assert!(
        matches!(&err, LoadError::ShardChanged { file, what }
            if file.ends_with("model-00002-of-00003.safetensors") && what.contains("modification time")),
        "{err:?}"
    );
}

#[test]
fn a_credential_that_expires_past_any_clock_lasts_a_day() {
    use std::io::{BufRead, BufReader, Write};
    let r = Remote::new();
    let truth = sharded(&r.root);
    let http = HttpServer::start(&r.root).unwrap();
    // GCE's metadata server (where `GCE_METADATA_HOST` says), whose token expires in 2^64 - 1
    // seconds: object_store adds that to the clock, which overflows (a panic in its task).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&asked);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let body = r#"{"access_token": "t", "expires_in": 18446744073709551615, "token_type": "Bearer"}"#;
            let head =
                "HTTP/1.1 200 OK\r\nMetadata-Flavor: Google\r\nContent-Type: application/json\r\nConnection: close";
            let _ = write!(&conn, "{head}\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        }
    });
    std::env::set_var("GCE_METADATA_HOST", format!("127.0.0.1:{port}"));
    std::env::set_var("GOOGLE_BASE_URL", format!("http://127.0.0.1:{}", http.port));
    let model = base().build().unwrap().load_blocking("gs://bucket/model");
    std::env::remove_var("GCE_METADATA_HOST");
    std::env::remove_var("GOOGLE_BASE_URL");
    assert_identical(&model.unwrap(), &truth, "gs:// with the metadata server's token");
    assert!(asked.load(std::sync::atomic::Ordering::Relaxed) >= 1, "the token came from the metadata server");
}

/// An empty shard is refused as the same file is locally (too short for a header), not with
/// the store's answer to a range of nothing (a 416), on S3 and over HTTP.
#[test]
fn an_empty_shard_is_refused_as_it_is_locally() {
    let r = Remote::new();
    let dir = r.root.join("bucket/empty");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), b"").unwrap();
    let Some(_s3) = r.s3() else { return };
    let http = HttpServer::start(&r.root).unwrap();
    let loader = base().build().unwrap();
    let local = dir.join("model.safetensors");
    let s3 = "s3://bucket/empty/model.safetensors".to_owned();
    let web = format!("http://127.0.0.1:{}/bucket/empty/model.safetensors", http.port);
    for source in [local.display().to_string(), s3, web] {
        match loader.plan(&source) {
            Err(LoadError::Format(FormatError::HeaderTooSmall { len: 0, .. })) => {}
            Err(other) => panic!("{source}: {other:?}"),
            Ok(_) => panic!("{source}: an empty file planned"),
        }
    }
}
