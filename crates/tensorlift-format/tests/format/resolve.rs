//! Resolving files, folders and indexes into plans, and every way they can disagree.

use std::fs;
use std::path::{Path, PathBuf};

use tensorlift_format::{encode_header, resolve, Dtype, FormatError};

use crate::support::{tempdir, StdSource};

fn write_shard(path: &Path, tensors: &[(&str, Dtype, &[usize])]) {
    let enc = encode_header(tensors, None).unwrap();
    let (mut file, offsets) = (enc.bytes, enc.offsets);
    let len = offsets.last().map_or(0, |o| o.1);
    file.extend((0..len).map(|i| i as u8));
    fs::write(path, file).unwrap();
}

fn write_index(dir: &Path, entries: &[(&str, &str)]) -> PathBuf {
    let map: serde_json::Map<String, serde_json::Value> =
        entries.iter().map(|(t, s)| ((*t).into(), (*s).into())).collect();
    let path = dir.join("model.safetensors.index.json");
    fs::write(&path, serde_json::to_vec(&serde_json::json!({"metadata": {}, "weight_map": map})).unwrap()).unwrap();
    path
}

fn sharded() -> PathBuf {
    let dir = tempdir();
    write_shard(&dir.join("s-1.safetensors"), &[("a", Dtype::F32, &[4]), ("b", Dtype::U8, &[3])]);
    write_shard(&dir.join("s-2.safetensors"), &[("c", Dtype::F16, &[2, 2])]);
    write_index(&dir, &[("a", "s-1.safetensors"), ("b", "s-1.safetensors"), ("c", "s-2.safetensors")]);
    dir
}

#[test]
fn single_file() {
    let dir = tempdir();
    let f = dir.join("one.safetensors");
    write_shard(&f, &[("x", Dtype::I64, &[2])]);
    let plan = resolve(&StdSource, &f).unwrap();
    assert_eq!(plan.shards().len(), 1);
    let t = &plan.tensors()[0];
    let start = plan.shards()[0].data_start();
    assert_eq!(t.file_range, start..start + 16);
}

#[test]
fn folder_uses_its_index() {
    let dir = sharded();
    let plan = resolve(&StdSource, &dir).unwrap();
    let names: Vec<_> = plan.tensors().iter().map(|t| (t.name.as_str(), t.shard)).collect();
    assert_eq!(names, [("a", 0), ("b", 0), ("c", 1)]);
    assert!(plan.index_file().is_some());
    assert_eq!(plan.total_bytes(), 16 + 3 + 8);
    // The index path itself resolves to the same plan.
    assert_eq!(resolve(&StdSource, &dir.join("model.safetensors.index.json")).unwrap(), plan);
}

#[test]
fn folder_without_index_in_natural_order() {
    let dir = tempdir();
    for i in [10, 2, 1] {
        write_shard(&dir.join(format!("shard-{i}.safetensors")), &[(&format!("t{i}"), Dtype::U8, &[1])]);
    }
    fs::write(dir.join("notes.txt"), "ignored").unwrap();
    let plan = resolve(&StdSource, &dir).unwrap();
    let shards: Vec<_> = plan.shards().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(shards, ["shard-1.safetensors", "shard-2.safetensors", "shard-10.safetensors"]);
    assert!(plan.index_file().is_none());
}

#[test]
fn empty_folder() {
    assert!(matches!(resolve(&StdSource, &tempdir()), Err(FormatError::NoShards { .. })));
}

#[test]
fn missing_path_is_io_error() {
    assert!(matches!(resolve(&StdSource, Path::new("/nonexistent/x.safetensors")), Err(FormatError::Io { .. })));
}

#[test]
fn listed_shard_must_exist() {
    let dir = sharded();
    write_index(&dir, &[("a", "s-1.safetensors"), ("b", "s-1.safetensors"), ("c", "s-9.safetensors")]);
    match resolve(&StdSource, &dir) {
        Err(FormatError::ShardUnreadable { shard, .. }) => assert_eq!(shard, "s-9.safetensors"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn listed_tensor_must_be_in_its_shard() {
    let dir = sharded();
    write_index(
        &dir,
        &[("a", "s-1.safetensors"), ("b", "s-1.safetensors"), ("c", "s-1.safetensors"), ("z", "s-2.safetensors")],
    );
    match resolve(&StdSource, &dir) {
        Err(FormatError::TensorNotInShard { tensor, shard, .. }) => {
            assert_eq!((tensor.as_str(), shard.as_str()), ("c", "s-1.safetensors"))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn shard_tensor_must_be_indexed() {
    let dir = sharded();
    write_index(&dir, &[("a", "s-1.safetensors"), ("c", "s-2.safetensors")]);
    match resolve(&StdSource, &dir) {
        Err(FormatError::TensorNotInIndex { tensor, .. }) => assert_eq!(tensor, "b"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn no_tensor_in_two_shards() {
    let dir = tempdir();
    write_shard(&dir.join("a.safetensors"), &[("w", Dtype::U8, &[1])]);
    write_shard(&dir.join("b.safetensors"), &[("w", Dtype::U8, &[1])]);
    match resolve(&StdSource, &dir) {
        Err(FormatError::TensorInTwoShards { tensor, first, second, .. }) => {
            assert_eq!((tensor.as_str(), first.as_str(), second.as_str()), ("w", "a.safetensors", "b.safetensors"))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn shard_paths_stay_in_the_folder() {
    let outside = tempdir();
    write_shard(&outside.join("evil.safetensors"), &[("a", Dtype::U8, &[1])]);
    let evil = outside.join("evil.safetensors");
    for shard in [evil.to_str().unwrap(), "../evil.safetensors", "sub/../../evil.safetensors", ""] {
        let dir = tempdir();
        write_index(&dir, &[("a", shard)]);
        let err = resolve(&StdSource, &dir).unwrap_err();
        assert!(
            matches!(err, FormatError::InvalidIndex { .. } | FormatError::ShardOutsideFolder { .. }),
            "{shard}: {err}"
        );
        assert!(matches!(err, FormatError::ShardOutsideFolder { .. }), "{shard}: {err}");
    }
    // A link inside the folder that points outside it.
    let dir = tempdir();
    std::os::unix::fs::symlink(&evil, dir.join("link.safetensors")).unwrap();
    write_index(&dir, &[("a", "link.safetensors")]);
    assert!(matches!(resolve(&StdSource, &dir), Err(FormatError::ShardOutsideFolder { .. })));
    // The same link found by a folder scan.
    fs::remove_file(dir.join("model.safetensors.index.json")).unwrap();
    assert!(matches!(resolve(&StdSource, &dir), Err(FormatError::ShardOutsideFolder { .. })));
    // A link that stays inside is fine.
    let dir = sharded();
    fs::create_dir(dir.join("sub")).unwrap();
    std::os::unix::fs::symlink(dir.join("s-2.safetensors"), dir.join("sub/c.safetensors")).unwrap();
    write_index(&dir, &[("a", "s-1.safetensors"), ("b", "s-1.safetensors"), ("c", "sub/c.safetensors")]);
    assert!(resolve(&StdSource, &dir).is_ok());
}

#[test]
fn malformed_index() {
    for bad in [&b"{"[..], b"{\"weight_map\": {\"a\": 3}}", b"{\"metadata\": {}}", b"\xff\xfe"] {
        let dir = tempdir();
        fs::write(dir.join("model.safetensors.index.json"), bad).unwrap();
        assert!(matches!(resolve(&StdSource, &dir), Err(FormatError::InvalidIndex { .. })), "{bad:?}");
    }
}

#[test]
fn bad_shard_in_folder_names_the_file() {
    let dir = tempdir();
    fs::write(dir.join("bad.safetensors"), b"\x02\0\0\0\0\0\0\0{}x").unwrap();
    let err = resolve(&StdSource, &dir).unwrap_err();
    assert!(err.to_string().contains("bad.safetensors"), "{err}");
    assert!(matches!(err, FormatError::DataLengthMismatch { .. }));
}
