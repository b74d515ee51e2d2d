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

#[test]
fn a_hub_digest_and_a_listed_one_must_agree() {
    let cache = scratch();
    let repo = cache.join("models--org--tiny");
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots/r")).unwrap();
    let tmp = cache.join("m.safetensors");
    write_shard(&tmp, &[("w", Dtype::F32, &[3])]);
    let digest = sha256_file(&tmp).unwrap();
    std::fs::rename(&tmp, repo.join("blobs").join(digest.to_string())).unwrap();
    std::os::unix::fs::symlink(format!("../../blobs/{digest}"), repo.join("snapshots/r/m.safetensors")).unwrap();
    let snapshot = repo.join("snapshots/r");
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
