//! Where a shard's expected SHA-256 is found: the Hugging Face hub cache blob its file is,
//! then the `SHA256SUMS` beside it (written here by coreutils' `sha256sum`).

use std::path::Path;
use std::process::Command;

use tensorlift::checksums::{expected, sha256_file, DigestSource, Sha256};
use tensorlift::Dtype;
use tensorlift_testkit::{write_shard, write_sharded, Spec};

use crate::support::scratch;

fn coreutils_sums(dir: &Path, files: &[&str]) -> String {
    let out = Command::new("sha256sum").args(files).current_dir(dir).output().expect("coreutils' sha256sum");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

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
    std::fs::write(dir.join("SHA256SUMS"), format!("{sums}{zeros} {}\n", names[0])).unwrap();
    let err = expected(&plan).unwrap_err();
    assert_eq!(err.line, 2, "{err}");
}

#[test]
fn a_hub_cache_names_blobs_by_their_digest() {
    let cache = scratch();
    let repo = cache.join("models--org--tiny");
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
    // Write the file, then move it to its blob, named as the hub names it.
    let tmp = cache.join("model.safetensors");
    write_shard(&tmp, &[("w", Dtype::BF16, &[16, 16])]);
    let digest: Sha256 = sha256_file(&tmp).unwrap();
    let blob = repo.join("blobs").join(digest.to_string());
    std::fs::rename(&tmp, &blob).unwrap();
    std::os::unix::fs::symlink(format!("../../blobs/{digest}"), repo.join("snapshots/abc123/model.safetensors"))
        .unwrap();
    let plan = tensorlift::plan(repo.join("snapshots/abc123")).unwrap();
    let e = expected(&plan).unwrap();
    assert_eq!(e.shards, [Some((digest, DigestSource::HubBlob(blob.canonicalize().unwrap())))]);
    // A blob named by a git SHA-1 (a small file the hub keeps in git) says nothing.
    let sha1 = repo.join("blobs").join("a".repeat(40));
    std::fs::rename(&blob, &sha1).unwrap();
    std::fs::remove_file(repo.join("snapshots/abc123/model.safetensors")).unwrap();
    std::os::unix::fs::symlink(
        format!("../../blobs/{}", "a".repeat(40)),
        repo.join("snapshots/abc123/model.safetensors"),
    )
    .unwrap();
    let plan = tensorlift::plan(repo.join("snapshots/abc123")).unwrap();
    assert_eq!(expected(&plan).unwrap().shards, [None]);
}
