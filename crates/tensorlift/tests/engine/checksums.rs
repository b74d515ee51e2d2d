//! Where a shard's expected SHA-256 is found: the Hugging Face hub cache blob its file is,
//! then the `SHA256SUMS` beside it (written here by coreutils' `sha256sum`).

use std::path::Path;

use tensorlift::checksums::{expected, sha256_file, DigestSource, Sha256};
use tensorlift::Dtype;
use tensorlift_testkit::{write_shard, write_sharded, Spec};

use crate::support::scratch;

use tensorlift_testkit::coreutils_sha256sums as coreutils_sums;

#[test]
fn digests_come_from_sha256sums_beside_the_checkpoint() {
    let dir = scratch();
    let a: &[Spec<'_>] = &[("a", Dtype::F32, &[8, 3])];
    let b: &[Spec<'_>] = &[("b", Dtype::U8, &[77])];
    write_sharded(&dir, &[a, b]);
    let names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    let plan = tensorlift::plan(&dir).unwrap();
    // None yet: no SHA256SUMS, and the files are no hub blobs.
    let e = expected(&plan).unwrap();
    assert_eq!(e.shards, [None, None]);
    assert_eq!(e.sums_file, dir.canonicalize().unwrap().join("SHA256SUMS"));
    // One listed (as ./name), then both.
    let sums = coreutils_sums(&dir, &[&format!("./{}", names[1])]);
    std::fs::write(dir.join("SHA256SUMS"), &sums).unwrap();
    let e = expected(&plan).unwrap();
    let want = |n: &str| (sha256_file(&dir.join(n)).unwrap(), DigestSource::SumsFile(e.sums_file.clone()));
    assert_eq!(e.shards, [None, Some(want(names[1]))]);
    std::fs::write(dir.join("SHA256SUMS"), coreutils_sums(&dir, &names)).unwrap();
    assert_eq!(expected(&plan).unwrap().shards, [Some(want(names[0])), Some(want(names[1]))]);
    // A malformed file, or a shard listed with two digests, is an error naming the line.
    let zeros = "0".repeat(64);
    std::fs::write(dir.join("SHA256SUMS"), format!("{sums}{zeros}  {}\n", names[1])).unwrap();
    let err = expected(&plan).unwrap_err();
    assert_eq!(
        (err.line, err.message.as_str()),
        (2, format!("'{}' is listed twice, with two digests", names[1]).as_str())
    );
    std::fs::write(dir.join("SHA256SUMS"), format!("# made by sha256sum\n\n{sums}{zeros}\n")).unwrap();
    let err = expected(&plan).unwrap_err();
    assert_eq!((err.line, err.message.as_str()), (4, "the digest is not followed by a blank and a name"), "{err}");
    // A link, or something other than a regular file, in its place is refused, not followed.
    std::fs::remove_file(dir.join("SHA256SUMS")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.join("SHA256SUMS")).unwrap();
    let err = expected(&plan).unwrap_err();
    assert!(err.message.contains("symbolic link"), "{err}");
    std::fs::remove_file(dir.join("SHA256SUMS")).unwrap();
    std::fs::create_dir(dir.join("SHA256SUMS")).unwrap();
    assert_eq!(expected(&plan).unwrap_err().message, "not a regular file");
}

/// A hub cache laid out as the hub lays it out: `models--org--tiny/snapshots/r/m.safetensors`
/// a link to `../../blobs/<its SHA-256>`. With `rot`, the blob's last byte changes after it
/// was named. Returns the snapshot folder, the blob and the name's digest.
fn hub_snapshot(spec: Spec<'_>, rot: bool) -> (std::path::PathBuf, std::path::PathBuf, Sha256) {
    let cache = scratch();
    let repo = cache.join("models--org--tiny");
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots/r")).unwrap();
    let tmp = cache.join("m.safetensors");
    write_shard(&tmp, &[spec]);
    let digest = sha256_file(&tmp).unwrap();
    let blob = repo.join("blobs").join(digest.to_string());
    let mut bytes = std::fs::read(&tmp).unwrap();
    if rot {
        let last = bytes.len() - 1;
        bytes[last] ^= 0x80;
    }
    std::fs::write(&blob, &bytes).unwrap();
    std::fs::remove_file(&tmp).unwrap();
    std::os::unix::fs::symlink(format!("../../blobs/{digest}"), repo.join("snapshots/r/m.safetensors")).unwrap();
    (repo.join("snapshots/r"), blob, digest)
}

#[test]
fn a_hub_digest_and_a_listed_one_must_agree() {
    let (snapshot, _, digest) = hub_snapshot(("w", Dtype::F32, &[3]), false);
    std::fs::write(snapshot.join("SHA256SUMS"), format!("{}  m.safetensors\n", "1".repeat(64))).unwrap();
    let err = expected(&tensorlift::plan(&snapshot).unwrap()).unwrap_err();
    assert!(err.message.contains("but the hub cache blob it is") && err.message.contains(&digest.to_string()), "{err}");
    // A folder named blobs outside a hub cache names nothing.
    let plain = scratch();
    std::fs::create_dir(plain.join("blobs")).unwrap();
    write_shard(&plain.join("blobs").join(digest.to_string()), &[("w", Dtype::F32, &[3])]);
    std::os::unix::fs::symlink(format!("blobs/{digest}"), plain.join("m.safetensors")).unwrap();
    let e = expected(&tensorlift::plan(plain.join("m.safetensors")).unwrap()).unwrap();
    assert_eq!(e.shards, [None]);
}

#[test]
fn a_hub_cache_names_blobs_by_their_digest() {
    let (snapshot, blob, digest) = hub_snapshot(("w", Dtype::BF16, &[16, 16]), false);
    let plan = tensorlift::plan(&snapshot).unwrap();
    let e = expected(&plan).unwrap();
    assert_eq!(e.shards, [Some((digest, DigestSource::HubBlob(blob.canonicalize().unwrap())))]);
    // A blob named by a git SHA-1 (a small file the hub keeps in git) says nothing.
    let sha1 = blob.with_file_name("a".repeat(40));
    std::fs::rename(&blob, &sha1).unwrap();
    std::fs::remove_file(snapshot.join("m.safetensors")).unwrap();
    std::os::unix::fs::symlink(format!("../../blobs/{}", "a".repeat(40)), snapshot.join("m.safetensors")).unwrap();
    let plan = tensorlift::plan(&snapshot).unwrap();
    assert_eq!(expected(&plan).unwrap().shards, [None]);
}

// ---- Verified loads -------------------------------------------------------------------

use tensorlift::{LoadError, Verify};

use crate::support::{assert_identical, base, map_contract, reading_loaders_with};

/// Two shards of several 4 KiB chunks each, with SHA256SUMS written by coreutils.
fn verified_checkpoint() -> (std::path::PathBuf, std::collections::BTreeMap<String, Vec<u8>>) {
    let dir = scratch();
    let a: &[Spec<'_>] = &[("a.0", Dtype::F32, &[3000]), ("a.1", Dtype::U8, &[5]), ("a.2", Dtype::BF16, &[4096])];
    let b: &[Spec<'_>] = &[("b.0", Dtype::I64, &[1500]), ("b.1", Dtype::F16, &[0]), ("b.2", Dtype::U8, &[9000])];
    let truth = write_sharded(&dir, &[a, b]);
    // The index with a total_size, as transformers writes it.
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).unwrap().replace("\"metadata\":{}", "\"metadata\":{\"total_size\":0}");
    std::fs::write(&index, text).unwrap();
    let sums = coreutils_sums(
        &dir,
        &["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"],
    );
    std::fs::write(dir.join("SHA256SUMS"), sums).unwrap();
    (dir, truth)
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

#[test]
fn a_verified_load_checks_every_shard_on_every_backend() {
    let (dir, truth) = verified_checkpoint();
    let total = file_len(&dir.join("model-00001-of-00002.safetensors"))
        + file_len(&dir.join("model-00002-of-00002.safetensors"));
    for (what, loader) in reading_loaders_with(4096, |b| b.verify(Verify::Required)) {
        let model = loader.load_blocking(&dir).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_identical(&model, &truth, &what);
        assert_eq!((model.stats().verified_bytes, model.stats().unverified_bytes), (total, 0), "{what}");
        assert_eq!(model.stats().to_json()["verified_bytes"], total, "{what}");
    }
}

/// Flips one byte of the second shard at `at` (from its start; negative from its end),
/// then loads it streamed: the error names the shard and both digests (the actual one as
/// coreutils computes it), and none of that shard's tensors was handed out.
fn flipped(at: i64) {
    flipped_with(at, base().chunk_size(4096));
    flipped_with(at, base().map_views(map_contract()));
}

fn flipped_with(at: i64, builder: tensorlift::LoaderBuilder) {
    let (dir, _) = verified_checkpoint();
    let name = "model-00002-of-00002.safetensors";
    let path = dir.join(name);
    let expected = sha256_file(&path).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let i = if at < 0 { bytes.len() as i64 + at } else { at } as usize;
    bytes[i] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let actual: Sha256 = coreutils_sums(&dir, &[name])[..64].parse().unwrap();
    let loader = builder.verify(Verify::Required).build().unwrap();
    let mut got = Vec::new();
    // A mapped load hashes every file before it starts: the error comes from the start.
    let err = match loader.stream_blocking(&dir) {
        Err(e) => e,
        Ok(mut stream) => loop {
            match tensorlift::block_on(stream.next()) {
                Some(Ok(t)) => got.push(t.name().to_owned()),
                Some(Err(e)) => break e,
                None => panic!("byte {i}: the load succeeded"),
            }
        },
    };
    match &err {
        LoadError::Checksum { file, expected: e, actual: a, expected_by: DigestSource::SumsFile(s) } => {
            assert_eq!(file, &path.canonicalize().unwrap(), "byte {i}");
            assert_eq!((e, a), (&expected, &actual), "byte {i}");
            assert_eq!(s, &dir.canonicalize().unwrap().join("SHA256SUMS"));
        }
        other => panic!("byte {i}: {other}"),
    }
    assert!(err.to_string().contains(&format!("its SHA-256 is {actual}, but")), "{err}");
    assert!(got.iter().all(|n| n.starts_with("a.")), "byte {i}: tensors of the bad shard came: {got:?}");
}

#[test]
fn verified_mapped_views_hash_every_file_before_any_view() {
    let (dir, truth) = verified_checkpoint();
    let total = file_len(&dir.join("model-00001-of-00002.safetensors"))
        + file_len(&dir.join("model-00002-of-00002.safetensors"));
    let model = base().map_views(map_contract()).verify(Verify::Required).build().unwrap().load_blocking(&dir).unwrap();
    assert_identical(&model, &truth, "mapped, verified");
    assert_eq!((model.stats().verified_bytes, model.stats().unverified_bytes), (total, 0));
    assert!(model.tensors().iter().all(|t| t.is_mapped()), "views of the files");
}

#[test]
fn a_byte_flipped_in_the_first_chunk_fails_its_shard() {
    // The first byte of the data section, in the first 4 KiB chunk (after the header).
    let (dir, _) = verified_checkpoint();
    let bytes = std::fs::read(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert!(data_start < 4096);
    flipped(data_start as i64);
}

#[test]
fn a_byte_flipped_in_a_middle_chunk_fails_its_shard() {
    let (dir, _) = verified_checkpoint();
    flipped(file_len(&dir.join("model-00002-of-00002.safetensors")) as i64 / 2);
}

#[test]
fn a_byte_flipped_in_the_last_chunk_fails_its_shard() {
    flipped(-1);
}

#[test]
fn a_byte_flipped_in_a_header_fails_its_shard() {
    // A tensor's name in the JSON header ("b.2" becomes "b.3"): a valid file, but not the one
    // the digest names. (A one-file checkpoint: an index would disagree first.)
    let dir = scratch();
    let truth = write_shard(&dir.join("m.safetensors"), &[("b.2", Dtype::U8, &[10])]);
    std::fs::write(dir.join("SHA256SUMS"), coreutils_sums(&dir, &["m.safetensors"])).unwrap();
    let mut bytes = std::fs::read(dir.join("m.safetensors")).unwrap();
    let at = bytes.windows(3).position(|w| w == b"b.2").unwrap();
    bytes[at + 2] = b'3';
    std::fs::write(dir.join("m.safetensors"), &bytes).unwrap();
    let err = base().verify(Verify::Required).build().unwrap().load_blocking(dir.join("m.safetensors")).unwrap_err();
    assert!(matches!(err, LoadError::Checksum { .. }), "{err}");
    drop(truth);
}

#[test]
fn a_byte_flipped_in_the_index_fails_the_load() {
    let (dir, _) = verified_checkpoint();
    let index = dir.join("model.safetensors.index.json");
    // One byte changed, the JSON still valid: total_size 0 becomes 1.
    let text = std::fs::read_to_string(&index).unwrap();
    assert!(text.contains("\"total_size\":0"));
    std::fs::write(&index, text.replacen("\"total_size\":0", "\"total_size\":1", 1)).unwrap();
    let err = base().verify(Verify::Required).build().unwrap().load_blocking(&dir).unwrap_err();
    match err {
        LoadError::Checksum { file, .. } => assert_eq!(file, index.canonicalize().unwrap()),
        other => panic!("{other}"),
    }
}

#[test]
fn the_index_checked_is_the_one_planned() {
    // SHA256SUMS lists the index as written; the plan is made from another index (the
    // total size changed), which is then put back as listed: its digest now checks out,
    // but it is not the index the plan came from.
    let (dir, truth) = verified_checkpoint();
    let index = dir.join("model.safetensors.index.json");
    let listed = std::fs::read(&index).unwrap();
    let text = String::from_utf8(listed.clone()).unwrap();
    std::fs::write(&index, text.replacen("\"total_size\":0", "\"total_size\":1", 1)).unwrap();
    let loader = base().verify(Verify::Required).build().unwrap();
    let plan = loader.plan(&dir).unwrap();
    // Put back as a new file (a new inode: no reliance on timestamps moving).
    let tmp = dir.join("index.tmp");
    std::fs::write(&tmp, &listed).unwrap();
    std::fs::rename(&tmp, &index).unwrap();
    match loader.load_plan_blocking(plan).unwrap_err() {
        LoadError::ShardChanged { file, what } => {
            assert_eq!(file, index.canonicalize().unwrap());
            assert!(what.starts_with("the index: "), "{what}");
        }
        other => panic!("{other}"),
    }
    // Planned anew, it loads.
    assert_identical(&loader.load_blocking(&dir).unwrap(), &truth, "planned anew");
}

#[test]
fn shards_without_a_digest_fail_a_required_load_and_are_counted_under_if_known() {
    let (dir, truth) = verified_checkpoint();
    let first = dir.join("model-00001-of-00002.safetensors");
    let second = dir.join("model-00002-of-00002.safetensors");
    // SHA256SUMS lists the first shard only.
    std::fs::write(dir.join("SHA256SUMS"), coreutils_sums(&dir, &["model-00001-of-00002.safetensors"])).unwrap();
    let err = base().verify(Verify::Required).build().unwrap().load_blocking(&dir).unwrap_err();
    match &err {
        LoadError::NoDigest { file, sums_file } => {
            assert_eq!(file, &second.canonicalize().unwrap());
            assert_eq!(sums_file, &dir.canonicalize().unwrap().join("SHA256SUMS"));
        }
        other => panic!("{other}"),
    }
    let model = base().verify(Verify::IfKnown).build().unwrap().load_blocking(&dir).unwrap();
    assert_identical(&model, &truth, "if-known");
    assert_eq!((model.stats().verified_bytes, model.stats().unverified_bytes), (file_len(&first), file_len(&second)));
    // A malformed SHA256SUMS fails any verified load.
    std::fs::write(dir.join("SHA256SUMS"), "nonsense\n").unwrap();
    let err = base().verify(Verify::IfKnown).build().unwrap().load_blocking(&dir).unwrap_err();
    assert!(matches!(&err, LoadError::Sums(e) if e.line == 1), "{err}");
    // An unverified load reads neither, and reports no verification.
    let model = base().build().unwrap().load_blocking(&dir).unwrap();
    assert_eq!((model.stats().verified_bytes, model.stats().unverified_bytes), (0, 0));
    // A shard that is a link to another file of the folder, SHA256SUMS listing the file it
    // leads to but not the name the index gives: the error names the index's name, the
    // line SHA256SUMS lacks (not the file it leads to, which SHA256SUMS does list).
    std::fs::rename(&second, dir.join("real.safetensors")).unwrap();
    std::os::unix::fs::symlink("real.safetensors", &second).unwrap();
    let listed = ["model-00001-of-00002.safetensors", "real.safetensors"];
    std::fs::write(dir.join("SHA256SUMS"), coreutils_sums(&dir, &listed)).unwrap();
    match base().verify(Verify::Required).build().unwrap().load_blocking(&dir).unwrap_err() {
        LoadError::NoDigest { file, .. } => {
            assert_eq!(file, dir.canonicalize().unwrap().join("model-00002-of-00002.safetensors"))
        }
        other => panic!("{other}"),
    }
}

#[test]
fn a_hub_blob_whose_content_is_not_its_name_fails() {
    // The blob's content changed after it was named (bit rot).
    let (snapshot, _, named) = hub_snapshot(("w", Dtype::F32, &[300]), true);
    for loader in [base(), base().map_views(map_contract())] {
        let err = loader.verify(Verify::Required).build().unwrap().load_blocking(&snapshot).unwrap_err();
        match err {
            // Named as the snapshot names it (the blob's name is a digest), the blob where
            // the expected digest came from.
            LoadError::Checksum { expected, expected_by: DigestSource::HubBlob(blob), file, .. } => {
                assert_eq!(expected, named);
                assert_eq!(file, snapshot.canonicalize().unwrap().join("m.safetensors"));
                assert!(blob.parent().unwrap().ends_with("blobs"), "{}", blob.display());
            }
            other => panic!("{other}"),
        }
    }
}

#[test]
fn verified_loads_refuse_slices() {
    let b = base().slice("a.0", tensorlift::TensorSlice::new(std::iter::once(0..10)));
    let err = b.verify(Verify::Required).build().unwrap_err();
    assert!(matches!(&err, LoadError::Unsupported(m) if m.starts_with("verified loads with slices")), "{err}");
}

#[test]
fn a_verified_load_refuses_tensors_that_share_bytes() {
    // A PyTorch file whose tensors are views of one storage (tied weights): each shard is
    // counted down in file order, which shared bytes break, so the load is refused rather
    // than risked.
    let dir = scratch();
    let bin = include_bytes!("../../../tensorlift-pickle/tests/fixtures/tied.zip.bin");
    std::fs::write(dir.join("pytorch_model.bin"), bin).unwrap();
    std::fs::write(dir.join("SHA256SUMS"), coreutils_sums(&dir, &["pytorch_model.bin"])).unwrap();
    let err = base().verify(Verify::Required).build().unwrap().load_blocking(&dir).unwrap_err();
    assert!(
        matches!(&err, LoadError::Unsupported(m) if m.starts_with("verified loads of ") && m.contains("share bytes")),
        "{err}"
    );
    // Unverified, it loads: every tensor torch reads from it.
    let expect: serde_json::Value =
        serde_json::from_str(include_str!("../../../tensorlift-pickle/tests/fixtures/tied.expect.json")).unwrap();
    let want = expect.as_object().unwrap().len();
    assert_eq!(base().build().unwrap().load_blocking(&dir).unwrap().len(), want);
}

/// In a hub cache snapshot every file is a link into the repository's `blobs/`, a
/// `SHA256SUMS` the repository ships too: it is read through that link (as a shard is),
/// never through one that leads out of the folder.
#[test]
fn a_sha256sums_in_a_hub_snapshot_is_read_through_its_link() {
    let (snapshot, _, digest) = hub_snapshot(("w", Dtype::F32, &[3]), false);
    let blobs = snapshot.join("../../blobs");
    // A listed digest other than the blob's: the disagreement shows the file was read.
    let sums = format!("{}  m.safetensors\n", "1".repeat(64));
    std::fs::write(blobs.join("b".repeat(40)), &sums).unwrap();
    std::os::unix::fs::symlink(format!("../../blobs/{}", "b".repeat(40)), snapshot.join("SHA256SUMS")).unwrap();
    let plan = tensorlift::plan(&snapshot).unwrap();
    let err = expected(&plan).unwrap_err();
    assert!(err.message.contains("but the hub cache blob it is") && err.message.contains(&digest.to_string()), "{err}");
    std::fs::write(blobs.join("b".repeat(40)), format!("{digest}  m.safetensors\n")).unwrap();
    assert!(expected(&plan).unwrap().shards[0].is_some());
    // A link out of the snapshot and its repository's blobs is not followed.
    let outside = scratch().join("SHA256SUMS");
    std::fs::write(&outside, &sums).unwrap();
    std::fs::remove_file(snapshot.join("SHA256SUMS")).unwrap();
    std::os::unix::fs::symlink(&outside, snapshot.join("SHA256SUMS")).unwrap();
    let err = expected(&plan).unwrap_err();
    assert!(err.message.contains("symbolic link that leads out of its folder"), "{err}");
}

/// Names match as `sha256sum -c` resolves them: an absolute name, or one that ends with
/// `/`, is not the folder's file; a line whose name is not UTF-8 names no shard, and two
/// such lines are not one name listed twice; a long line is cut short in an error.
#[test]
fn sums_lines_name_what_sha256sum_would_check() {
    let dir = scratch();
    write_shard(&dir.join("m.safetensors"), &[("w", Dtype::F32, &[3])]);
    let d = sha256_file(&dir.join("m.safetensors")).unwrap();
    let plan = tensorlift::plan(&dir).unwrap();
    for name in ["/m.safetensors", "m.safetensors/", "//m.safetensors"] {
        std::fs::write(dir.join("SHA256SUMS"), format!("{d}  {name}\n")).unwrap();
        assert_eq!(expected(&plan).unwrap().shards, [None], "{name}");
    }
    let mut bytes = format!("{}  caf", "1".repeat(64)).into_bytes();
    bytes.extend_from_slice(b"\xe9\n");
    bytes.extend_from_slice(format!("{}  caf", "2".repeat(64)).as_bytes());
    bytes.extend_from_slice(b"\xe8\n");
    bytes.extend_from_slice(format!("{d}  ./m.safetensors\n").as_bytes());
    std::fs::write(dir.join("SHA256SUMS"), &bytes).unwrap();
    let sums_file = expected(&plan).unwrap().sums_file;
    assert_eq!(expected(&plan).unwrap().shards, [Some((d, DigestSource::SumsFile(sums_file)))]);
    // A shard whose name holds U+FFFD is not the one a line of invalid UTF-8 names.
    let odd = scratch();
    write_shard(&odd.join("m\u{FFFD}.safetensors"), &[("w", Dtype::F32, &[3])]);
    let d = sha256_file(&odd.join("m\u{FFFD}.safetensors")).unwrap();
    std::fs::write(odd.join("SHA256SUMS"), [format!("{d}  m").as_bytes(), b"\xff.safetensors\n"].concat()).unwrap();
    assert_eq!(expected(&tensorlift::plan(&odd).unwrap()).unwrap().shards, [None]);
    // A tagged line with a megabyte where its digest should be.
    std::fs::write(dir.join("SHA256SUMS"), format!("SHA256 (m.safetensors) = {}\n", "a".repeat(1 << 20))).unwrap();
    let err = expected(&plan).unwrap_err();
    assert!(err.to_string().len() < 400 && err.message.contains("..."), "{} bytes", err.to_string().len());
}

#[test]
fn a_verified_load_of_a_few_tensors_reads_and_checks_only_their_shards() {
    // A plan narrowed to tensors of the second shard (as a handle loading one tensor at a
    // time does) reads that shard whole and hashes it; the first is neither read, nor
    // held in memory, nor asked for a digest.
    let (dir, truth) = verified_checkpoint();
    let second = dir.join("model-00002-of-00002.safetensors");
    std::fs::write(dir.join("SHA256SUMS"), coreutils_sums(&dir, &["model-00002-of-00002.safetensors"])).unwrap();
    for (what, loader) in reading_loaders_with(4096, |b| b.verify(Verify::Required)) {
        let plan = loader.plan(&dir).unwrap();
        let model = loader.load_named_blocking(&plan, &["b.0", "b.2"]).unwrap_or_else(|e| panic!("{what}: {e}"));
        let want: std::collections::BTreeMap<_, _> = truth
            .iter()
            .filter(|(k, _)| ["b.0", "b.2"].contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_identical(&model, &want, &what);
        let stats = model.stats();
        assert_eq!((stats.verified_bytes, stats.unverified_bytes), (file_len(&second), 0), "{what}");
        assert_eq!(stats.bytes_read, file_len(&second), "{what}");
        // A tensor of the first shard, which SHA256SUMS does not list, is refused.
        match loader.load_named_blocking(&plan, &["a.1"]).unwrap_err() {
            LoadError::NoDigest { file, .. } => {
                assert_eq!(file, dir.canonicalize().unwrap().join("model-00001-of-00002.safetensors"), "{what}")
            }
            other => panic!("{what}: {other}"),
        }
    }
}

#[test]
fn a_filtered_verified_load_reads_and_checks_the_shards_it_takes_tensors_from() {
    let (dir, truth) = verified_checkpoint();
    let second = dir.join("model-00002-of-00002.safetensors");
    let want: std::collections::BTreeMap<_, _> =
        truth.iter().filter(|(k, _)| k.starts_with("b.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut loaders = reading_loaders_with(4096, |b| b.verify(Verify::Required).filter(["b.*"]));
    let mapped = base().map_views(map_contract()).verify(Verify::Required).filter(["b.*"]).build().unwrap();
    loaders.push(("mapped views".to_owned(), mapped));
    for (what, loader) in loaders {
        let model = loader.load_blocking(&dir).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_identical(&model, &want, &what);
        let stats = model.stats();
        assert_eq!(
            (stats.verified_bytes, stats.unverified_bytes, stats.bytes_read),
            // (Views read nothing: their files were hashed whole.)
            (file_len(&second), 0, if what == "mapped views" { 0 } else { file_len(&second) }),
            "{what}"
        );
    }
    // A byte flipped in the shard the filter reads fails the load; in the other, it does not.
    let mut bytes = std::fs::read(&second).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&second, &bytes).unwrap();
    let err = base().verify(Verify::Required).filter(["b.*"]).build().unwrap().load_blocking(&dir).unwrap_err();
    assert!(matches!(&err, LoadError::Checksum { file, .. } if file == &second.canonicalize().unwrap()), "{err}");
    let model = base().verify(Verify::Required).filter(["a.*"]).build().unwrap().load_blocking(&dir).unwrap();
    assert_eq!(model.stats().unverified_bytes, 0);
}

/// A sharded hub cache snapshot: each shard a link to `blobs/<its SHA-256>`, the index a
/// link to `blobs/<git's SHA-1 of it>` (named by `git hash-object`), as the hub lays out a
/// file stored in git. Returns the snapshot, the index's blob, and the truth.
fn hub_sharded_snapshot() -> (std::path::PathBuf, std::path::PathBuf, std::collections::BTreeMap<String, Vec<u8>>) {
    let cache = scratch();
    let repo = cache.join("models--org--sharded");
    let (blobs, snapshot) = (repo.join("blobs"), repo.join("snapshots/r"));
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    let made = cache.join("made");
    std::fs::create_dir(&made).unwrap();
    let a: &[Spec<'_>] = &[("a.0", Dtype::F32, &[300]), ("a.1", Dtype::U8, &[5])];
    let b: &[Spec<'_>] = &[("b.0", Dtype::BF16, &[77])];
    let truth = write_sharded(&made, &[a, b]);
    let mut index_blob = None;
    for entry in std::fs::read_dir(&made).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let blob_name = if name.ends_with(".json") {
            let out = std::process::Command::new("git").arg("hash-object").arg(&path).output().expect("git");
            assert!(out.status.success());
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        } else {
            sha256_file(&path).unwrap().to_string()
        };
        std::fs::rename(&path, blobs.join(&blob_name)).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob_name}"), snapshot.join(&name)).unwrap();
        if name.ends_with(".json") {
            index_blob = Some(blobs.join(&blob_name));
        }
    }
    (snapshot, index_blob.unwrap(), truth)
}

#[test]
fn a_hub_cache_index_is_checked_by_its_git_name() {
    let (snapshot, index_blob, truth) = hub_sharded_snapshot();
    let loader = base().verify(Verify::Required).build().unwrap();
    let model = loader.load_blocking(&snapshot).unwrap();
    assert_identical(&model, &truth, "hub snapshot");
    assert_eq!(model.stats().unverified_bytes, 0);
    // The index's blob changed after it was named: its second shard left out (a valid
    // index, which would load the first shard's tensors alone, both verified), and the load
    // fails naming both SHA-1s, the one git gives the new bytes among them.
    let text = std::fs::read_to_string(&index_blob).unwrap();
    let fewer = text.replace(r#","b.0":"model-00002-of-00002.safetensors""#, "");
    assert_ne!(fewer, text, "{text}");
    std::fs::write(&index_blob, &fewer).unwrap();
    let out = std::process::Command::new("git").arg("hash-object").arg(&index_blob).output().unwrap();
    let git_says = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    for policy in [Verify::Required, Verify::IfKnown] {
        match base().verify(policy).build().unwrap().load_blocking(&snapshot).unwrap_err() {
            LoadError::IndexBlob { file, blob, expected, actual } => {
                assert_eq!(file, snapshot.canonicalize().unwrap().join("model.safetensors.index.json"));
                assert_eq!(blob, index_blob.canonicalize().unwrap());
                assert_eq!(expected, index_blob.file_name().unwrap().to_str().unwrap());
                assert_eq!(actual, git_says);
            }
            other => panic!("{policy:?}: {other}"),
        }
    }
    // An unverified load does not look.
    assert_eq!(base().build().unwrap().load_blocking(&snapshot).unwrap().len(), 2);
    // An index stored with LFS is a blob named by its SHA-256: checked by that.
    let tmp = index_blob.with_file_name("tmp");
    std::fs::write(&tmp, &text).unwrap();
    let lfs = index_blob.with_file_name(sha256_file(&tmp).unwrap().to_string());
    std::fs::rename(&tmp, &lfs).unwrap();
    let link = snapshot.join("model.safetensors.index.json");
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(format!("../../blobs/{}", lfs.file_name().unwrap().to_str().unwrap()), &link).unwrap();
    assert_eq!(base().verify(Verify::Required).build().unwrap().load_blocking(&snapshot).unwrap().len(), 3);
    std::fs::write(&lfs, &fewer).unwrap();
    match base().verify(Verify::Required).build().unwrap().load_blocking(&snapshot).unwrap_err() {
        LoadError::Checksum { file, expected_by: DigestSource::HubBlob(blob), .. } => {
            let named = snapshot.canonicalize().unwrap().join("model.safetensors.index.json");
            assert_eq!((file, blob), (named, lfs.canonicalize().unwrap()))
        }
        other => panic!("{other}"),
    }
}

#[test]
fn a_shard_with_no_tensors_is_still_checked() {
    // A file emptied to a header of no tensors (a valid safetensors file) after its digest
    // was listed: a verified load reads its header, and fails, rather than load nothing.
    let dir = scratch();
    let path = dir.join("model.safetensors");
    write_shard(&path, &[("w", Dtype::F32, &[64])]);
    std::fs::write(dir.join("SHA256SUMS"), coreutils_sums(&dir, &["model.safetensors"])).unwrap();
    write_shard(&path, &[]);
    for builder in [base(), base().map_views(map_contract())] {
        match builder.verify(Verify::Required).build().unwrap().load_blocking(&path).unwrap_err() {
            LoadError::Checksum { file, .. } => assert_eq!(file, path.canonicalize().unwrap()),
            other => panic!("{other}"),
        }
    }
    // With no digest for it, a required load fails as for any shard, filtered or not.
    std::fs::remove_file(dir.join("SHA256SUMS")).unwrap();
    for builder in [base(), base().filter(["w"])] {
        let err = builder.verify(Verify::Required).build().unwrap().load_blocking(&dir).unwrap_err();
        assert!(matches!(&err, LoadError::NoDigest { file, .. } if file == &path.canonicalize().unwrap()), "{err}");
    }
}
