//! Opening checkpoints: files, folders and indexes into plans, the folder and link policy
//! (with the Hugging Face hub cache layout), and every way a checkpoint can be hostile.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use tensorlift_format::{Dtype, FormatError};
use tensorlift_io::{open_checkpoint, Checkpoint, HeaderCheck, IoError, PlanLimits};
use tensorlift_testkit::{write_index, write_shard};

use crate::support::scratch;

fn dir() -> PathBuf {
    scratch(false).unwrap()
}

fn open(path: &Path) -> Result<Checkpoint, FormatError> {
    open_checkpoint(path, &PlanLimits::default())
}

fn sharded() -> PathBuf {
    let dir = dir();
    write_shard(&dir.join("s-1.safetensors"), &[("a", Dtype::F32, &[4]), ("b", Dtype::U8, &[3])]);
    write_shard(&dir.join("s-2.safetensors"), &[("c", Dtype::F16, &[2, 2])]);
    write_index(&dir, &[("a", "s-1.safetensors"), ("b", "s-1.safetensors"), ("c", "s-2.safetensors")]);
    dir
}

fn mkfifo(path: &Path) {
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
}

/// The bytes of every tensor of a plan, read through the descriptors it holds.
fn read_all(mut ck: Checkpoint) -> Vec<(String, Vec<u8>)> {
    use std::os::unix::fs::FileExt;
    let mut out = Vec::new();
    for i in 0..ck.shards().len() {
        let (f, _) = ck.take_checked(i, HeaderCheck::Planned).unwrap();
        for t in ck.tensors().iter().filter(|t| t.shard == i) {
            let mut b = vec![0; t.len() as usize];
            f.read_exact_at(&mut b, t.file_range.start).unwrap();
            out.push((t.name.clone(), b));
        }
    }
    out.sort();
    out
}

#[test]
fn single_file() {
    let dir = dir();
    let f = dir.join("one.safetensors");
    write_shard(&f, &[("x", Dtype::I64, &[2])]);
    let plan = open(&f).unwrap();
    assert_eq!(plan.shards().len(), 1);
    assert_eq!(plan.shards()[0].name, "one.safetensors");
    let t = &plan.tensors()[0];
    let start = plan.shards()[0].data_start();
    assert_eq!(t.file_range, start..start + 16);
}

#[test]
fn folder_uses_its_index() {
    let dir = sharded();
    let plan = open(&dir).unwrap();
    let names: Vec<_> = plan.tensors().iter().map(|t| (t.name.as_str(), t.shard)).collect();
    assert_eq!(names, [("a", 0), ("b", 0), ("c", 1)]);
    assert!(plan.index_file().is_some());
    assert_eq!(plan.index_metadata().unwrap()["total_size"], 0);
    assert_eq!(plan.total_bytes(), 16 + 3 + 8);
    // The index path itself resolves to the same plan.
    assert_eq!(open(&dir.join("model.safetensors.index.json")).unwrap().plan(), plan.plan());
}

#[test]
fn folder_without_index_in_natural_order() {
    let dir = dir();
    for i in [10, 2, 1] {
        write_shard(&dir.join(format!("shard-{i}.safetensors")), &[(&format!("t{i}"), Dtype::U8, &[1])]);
    }
    fs::write(dir.join("notes.txt"), "ignored").unwrap();
    let plan = open(&dir).unwrap();
    let shards: Vec<_> = plan.shards().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(shards, ["shard-1.safetensors", "shard-2.safetensors", "shard-10.safetensors"]);
    assert!(plan.index_file().is_none());
}

#[test]
fn empty_folder_and_missing_path() {
    assert!(matches!(open(&dir()), Err(FormatError::NoShards { .. })));
    assert!(matches!(open(Path::new("/nonexistent/x.safetensors")), Err(FormatError::Io { .. })));
}

#[test]
fn listed_shard_must_exist() {
    let dir = sharded();
    write_index(&dir, &[("a", "s-1.safetensors"), ("b", "s-1.safetensors"), ("c", "s-9.safetensors")]);
    match open(&dir) {
        Err(FormatError::ShardUnreadable { shard, .. }) => assert_eq!(shard, "s-9.safetensors"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn index_and_shards_must_agree() {
    let dir = sharded();
    write_index(
        &dir,
        &[("a", "s-1.safetensors"), ("b", "s-1.safetensors"), ("c", "s-1.safetensors"), ("z", "s-2.safetensors")],
    );
    match open(&dir) {
        Err(FormatError::TensorNotInShard { tensor, shard, .. }) => {
            assert_eq!((tensor.as_str(), shard.as_str()), ("c", "s-1.safetensors"))
        }
        other => panic!("{other:?}"),
    }
    write_index(&dir, &[("a", "s-1.safetensors"), ("c", "s-2.safetensors")]);
    match open(&dir) {
        Err(FormatError::TensorNotInIndex { tensor, .. }) => assert_eq!(tensor, "b"),
        other => panic!("{other:?}"),
    }
    let dir = self::dir();
    write_shard(&dir.join("a.safetensors"), &[("w", Dtype::U8, &[1])]);
    write_shard(&dir.join("b.safetensors"), &[("w", Dtype::U8, &[1])]);
    match open(&dir) {
        Err(FormatError::TensorInTwoShards { tensor, first, second, .. }) => {
            assert_eq!((tensor.as_str(), first.as_str(), second.as_str()), ("w", "a.safetensors", "b.safetensors"))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn shard_paths_stay_in_the_folder() {
    let outside = dir();
    write_shard(&outside.join("evil.safetensors"), &[("a", Dtype::U8, &[1])]);
    let evil = outside.join("evil.safetensors");
    for shard in [evil.to_str().unwrap(), "../evil.safetensors", "sub/../../evil.safetensors", "", "."] {
        let dir = dir();
        write_index(&dir, &[("a", shard)]);
        let err = open(&dir).unwrap_err();
        assert!(matches!(err, FormatError::ShardOutsideFolder { .. }), "{shard}: {err}");
    }
    // A link inside the folder that points outside it, named by the index or found by a scan.
    let dir = dir();
    symlink(&evil, dir.join("link.safetensors")).unwrap();
    write_index(&dir, &[("a", "link.safetensors")]);
    assert!(matches!(open(&dir), Err(FormatError::ShardOutsideFolder { .. })));
    fs::remove_file(dir.join("model.safetensors.index.json")).unwrap();
    assert!(matches!(open(&dir), Err(FormatError::ShardOutsideFolder { .. })));
    // A link that stays inside is fine.
    let dir = sharded();
    fs::create_dir(dir.join("sub")).unwrap();
    symlink(dir.join("s-2.safetensors"), dir.join("sub/c.safetensors")).unwrap();
    write_index(&dir, &[("a", "s-1.safetensors"), ("b", "s-1.safetensors"), ("c", "sub/c.safetensors")]);
    assert!(open(&dir).is_ok());
}

/// Defect: an index that is a link to another folder's index loaded that other folder.
#[test]
fn a_linked_index_cannot_leave_the_folder() {
    let other = sharded();
    let dir = dir();
    symlink(other.join("model.safetensors.index.json"), dir.join("model.safetensors.index.json")).unwrap();
    for path in [dir.clone(), dir.join("model.safetensors.index.json")] {
        match open(&path) {
            Err(FormatError::ShardOutsideFolder { shard, .. }) => assert_eq!(shard, "model.safetensors.index.json"),
            other => panic!("{}: {other:?}", path.display()),
        }
    }
}

/// Defect: one shard named under many spellings was parsed and held once per spelling.
#[test]
fn one_file_under_many_names_is_one_shard() {
    let dir = dir();
    write_shard(&dir.join("a.safetensors"), &[("w0", Dtype::U8, &[3]), ("w1", Dtype::U8, &[3])]);
    write_shard(&dir.join("b.safetensors"), &[("v", Dtype::U8, &[2])]);
    fs::hard_link(dir.join("a.safetensors"), dir.join("hard.safetensors")).unwrap();
    write_index(&dir, &[("w0", "./a.safetensors"), ("w1", "././hard.safetensors"), ("v", "b.safetensors")]);
    let plan = open(&dir).unwrap();
    assert_eq!(plan.shards().len(), 2, "{:?}", plan.shards().iter().map(|s| &s.name).collect::<Vec<_>>());
    let a = plan.shards().iter().find(|s| s.tensor_count == 2).unwrap();
    assert_eq!(a.name, "a.safetensors");
    assert_eq!(a.aliases, ["./a.safetensors", "././hard.safetensors", "hard.safetensors"]);
    assert_eq!(plan.open_files(), 2);

    // Forty spellings of one shard whose header alone is over a tenth of the budget: planned once.
    let dir = self::dir();
    let names: Vec<String> = (0..2000).map(|i| format!("t{i:05}")).collect();
    let specs: Vec<(&str, Dtype, &[usize])> = names.iter().map(|n| (n.as_str(), Dtype::U8, &[1usize][..])).collect();
    write_shard(&dir.join("a.safetensors"), &specs);
    let header_len = plan_header_len(&dir.join("a.safetensors"));
    let spellings: Vec<String> = (0..40).map(|k| format!("{}a.safetensors", "./".repeat(k))).collect();
    let entries: Vec<(&str, &str)> =
        names.iter().enumerate().map(|(i, n)| (n.as_str(), spellings[i % 40].as_str())).collect();
    write_index(&dir, &entries);
    let mut limits = PlanLimits::default();
    limits.max_header_bytes = header_len * 10;
    let plan = open_checkpoint(&dir, &limits).unwrap();
    assert_eq!(plan.shards().len(), 1);
    assert_eq!(plan.tensors().len(), 2000);

    // Distinct files are counted against the budget, with an error that names it.
    let dir = self::dir();
    write_shard(&dir.join("x.safetensors"), &specs);
    write_shard(&dir.join("y.safetensors"), &[("other", Dtype::U8, &[1])]);
    limits.max_header_bytes = header_len;
    match open_checkpoint(&dir, &limits) {
        Err(FormatError::HeaderBudget { limit, needed, .. }) => {
            assert_eq!(limit, header_len);
            assert!(needed > header_len);
        }
        other => panic!("{other:?}"),
    }
    let msg = open_checkpoint(&dir, &limits).unwrap_err().to_string();
    assert!(msg.contains("max_header_bytes"), "{msg}");
}

fn plan_header_len(path: &Path) -> u64 {
    let b = fs::read(path).unwrap();
    8 + u64::from_le_bytes(b[..8].try_into().unwrap())
}

/// Defect: shards were looked up by name again when loaded, and a FIFO hung the load.
#[test]
fn shards_are_read_through_the_descriptors_planning_opened() {
    let outside = dir();
    let dir = sharded();
    let truth = read_all(open(&dir).unwrap());

    // Held descriptors: a FIFO put in a shard's place after planning is never opened; the
    // descriptor held still reads the planned file, moved away (its status change time
    // moved, which the caller answers by reading the header again), as does the other.
    let mut plan = open(&dir).unwrap();
    assert_eq!(plan.open_files(), 2);
    fs::rename(dir.join("s-1.safetensors"), outside.join("moved.safetensors")).unwrap();
    mkfifo(&dir.join("s-1.safetensors"));
    let (moved, _) = plan.take_checked(0, HeaderCheck::Planned).unwrap();
    assert!(!plan.certainly_unchanged(0, &tensorlift_io::file_identity(&moved.metadata().unwrap())));
    let (f, _) = plan.take_checked(1, HeaderCheck::Planned).unwrap();
    for (f, name) in [(&moved, "a"), (&f, "c")] {
        let t = plan.tensors().iter().find(|t| t.name == name).unwrap();
        let mut b = vec![0; t.len() as usize];
        std::os::unix::fs::FileExt::read_exact_at(&**f, &mut b, t.file_range.start).unwrap();
        assert_eq!(truth.iter().find(|(n, _)| n == name).unwrap().1, b, "{name}");
    }

    // A shard that was closed to bound open files is reopened and must be the planned file:
    // a FIFO in its place is an error (never a wait), and so is another file under its name.
    fs::remove_file(dir.join("s-1.safetensors")).unwrap();
    fs::rename(outside.join("moved.safetensors"), dir.join("s-1.safetensors")).unwrap();
    let mut limits = PlanLimits::default();
    limits.max_open_files = 2;
    let mut plan = open_checkpoint(&dir, &limits).unwrap();
    assert_eq!(plan.open_files(), 1);
    fs::rename(dir.join("s-2.safetensors"), outside.join("s-2.safetensors")).unwrap();
    mkfifo(&dir.join("s-2.safetensors"));
    match plan.take_checked(1, HeaderCheck::Planned) {
        Err(IoError::Changed { what, .. }) => assert!(what.contains("FIFO"), "{what}"),
        other => panic!("{other:?}"),
    }
    fs::remove_file(dir.join("s-2.safetensors")).unwrap();
    // A link to a copy outside the folder: same bytes, another file.
    fs::copy(outside.join("s-2.safetensors"), outside.join("copy.safetensors")).unwrap();
    symlink(outside.join("copy.safetensors"), dir.join("s-2.safetensors")).unwrap();
    match plan.take_checked(1, HeaderCheck::Planned) {
        Err(IoError::Changed { what, .. }) => assert!(what.contains("another file"), "{what}"),
        other => panic!("{other:?}"),
    }
    // The held one is still fine.
    assert!(plan.take_checked(0, HeaderCheck::Planned).is_ok());
}

#[test]
fn special_files_are_named_not_waited_on() {
    // A FIFO found by a folder scan.
    let dir = dir();
    write_shard(&dir.join("a.safetensors"), &[("a", Dtype::U8, &[1])]);
    mkfifo(&dir.join("b.safetensors"));
    match open(&dir) {
        Err(FormatError::NotARegularFile { file, kind }) => {
            assert_eq!((file.file_name().unwrap().to_str().unwrap(), kind), ("b.safetensors", "FIFO"))
        }
        other => panic!("{other:?}"),
    }
    // A FIFO or a directory where the index should be.
    let dir = self::dir();
    mkfifo(&dir.join("model.safetensors.index.json"));
    assert!(matches!(open(&dir), Err(FormatError::NotARegularFile { kind: "FIFO", .. })));
    let dir = self::dir();
    fs::create_dir(dir.join("model.safetensors.index.json")).unwrap();
    write_shard(&dir.join("a.safetensors"), &[("a", Dtype::U8, &[1])]);
    assert!(matches!(open(&dir), Err(FormatError::NotARegularFile { kind: "directory", .. })));
    // An index naming a directory or a device.
    let dir = self::dir();
    fs::create_dir(dir.join("d.safetensors")).unwrap();
    write_index(&dir, &[("a", "d.safetensors")]);
    assert!(matches!(open(&dir), Err(FormatError::NotARegularFile { kind: "directory", .. })));
    // A FIFO given directly.
    let dir = self::dir();
    mkfifo(&dir.join("f.safetensors"));
    assert!(matches!(open(&dir.join("f.safetensors")), Err(FormatError::NotARegularFile { kind: "FIFO", .. })));
    assert!(matches!(open(Path::new("/dev/zero")), Err(FormatError::NotARegularFile { .. })));
}

#[test]
fn pytorch_folders_are_named() {
    let dir = dir();
    let mut zip = b"PK\x03\x04".to_vec();
    zip.resize(104, 0);
    fs::write(dir.join("pytorch_model.bin"), &zip).unwrap();
    // Read by the pickle reader (which refuses this broken zip), in a folder or by name;
    // TENSORLIFT_USE_SAFETENSORS=1 is covered by the CLI's tests (it is the environment).
    match open(&dir) {
        Err(FormatError::PyTorch { file, .. }) => assert!(file.ends_with("pytorch_model.bin")),
        other => panic!("{other:?}"),
    }
    let msg = open(&dir.join("pytorch_model.bin")).unwrap_err().to_string();
    assert!(msg.contains("read as a PyTorch checkpoint") && msg.contains("invalid zip archive"), "{msg}");
    // Other PyTorch files, and no weights: named, with the way to convert.
    let dir = self::dir();
    fs::write(dir.join("training_args.bin"), &zip).unwrap();
    match open(&dir) {
        Err(e @ FormatError::PyTorchCheckpoint { .. }) => {
            assert!(e.to_string().contains("neither pytorch_model.bin nor its index"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

/// The layout `huggingface_hub` writes: `models--ORG--NAME/{blobs,refs,snapshots/REV}`,
/// every file of a snapshot a relative link to `../../blobs/HASH`.
fn hub_cache(root: &Path) -> (PathBuf, Vec<(String, Vec<u8>)>) {
    let repo = root.join("models--org--tiny");
    let snap = repo.join("snapshots/0123456789abcdef");
    fs::create_dir_all(repo.join("blobs")).unwrap();
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::create_dir_all(&snap).unwrap();
    fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    let staging = dir();
    let truth = tensorlift_testkit::write_sharded(
        &staging,
        &[&[("a", Dtype::F32, &[5, 3]), ("b", Dtype::BF16, &[7])], &[("c", Dtype::U8, &[11])]],
    );
    for (k, entry) in fs::read_dir(&staging).unwrap().enumerate() {
        let entry = entry.unwrap();
        // (A SHA-256's 64 hex digits, as the hub names an LFS file's blob.)
        let blob =
            format!("{k:02}{}", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".get(2..).unwrap());
        fs::rename(entry.path(), repo.join("blobs").join(&blob)).unwrap();
        symlink(format!("../../blobs/{blob}"), snap.join(entry.file_name())).unwrap();
    }
    (snap, truth.into_iter().collect())
}

#[test]
fn hugging_face_hub_cache_folders_load() {
    let root = dir();
    let (snap, truth) = hub_cache(&root);
    let plan = open(&snap).unwrap();
    assert_eq!(plan.shards().len(), 2);
    assert!(plan.index_file().is_some());
    assert_eq!(read_all(plan), truth);
    // The index path, and the folder scan without an index.
    assert_eq!(read_all(open(&snap.join("model.safetensors.index.json")).unwrap()), truth);
    // The same snapshot through a link to it.
    let link = root.join("latest");
    symlink(&snap, &link).unwrap();
    assert_eq!(read_all(open(&link).unwrap()), truth);
    // A single file given directly.
    let one = open(&snap.join("model-00002-of-00002.safetensors")).unwrap();
    assert_eq!(one.shards()[0].name, "model-00002-of-00002.safetensors");
    assert_eq!(read_all(one), truth.iter().filter(|(n, _)| n == "c").cloned().collect::<Vec<_>>());
    // Without the index, the folder scan follows the same links.
    let index = fs::read_link(snap.join("model.safetensors.index.json")).unwrap();
    fs::remove_file(snap.join("model.safetensors.index.json")).unwrap();
    assert_eq!(read_all(open(&snap).unwrap()), truth);
    symlink(&index, snap.join("model.safetensors.index.json")).unwrap();

    // A subfolder of a snapshot (the diffusers layout) links three levels up.
    fs::create_dir(snap.join("unet")).unwrap();
    let blob = fs::read_link(snap.join("model-00002-of-00002.safetensors")).unwrap();
    symlink(Path::new("..").join(&blob), snap.join("unet/diffusion.safetensors")).unwrap();
    let unet = open(&snap.join("unet")).unwrap();
    assert_eq!(read_all(unet), truth.iter().filter(|(n, _)| n == "c").cloned().collect::<Vec<_>>());

    // Links into another repository's blobs, or elsewhere, are still refused.
    let (other, _) = hub_cache(&dir());
    let stray = snap.join("stray.safetensors");
    let other_blob = fs::read_link(other.join("model-00002-of-00002.safetensors")).unwrap();
    symlink(other.join(&other_blob), &stray).unwrap();
    fs::remove_file(snap.join("model.safetensors.index.json")).unwrap();
    assert!(matches!(open(&snap), Err(FormatError::ShardOutsideFolder { .. })), "{:?}", open(&snap));
    // And `..` in an index is refused in a snapshot too.
    fs::remove_file(&stray).unwrap();
    write_index(&snap, &[("a", "../../blobs/x")]);
    assert!(matches!(open(&snap), Err(FormatError::ShardOutsideFolder { .. })));
}

#[test]
fn a_local_dir_of_links_into_a_hub_cache_is_refused_and_its_files_load_by_name() {
    // What `snapshot_download(local_dir=...)` wrote before huggingface_hub 0.23: a plain
    // folder whose files are links to the hub cache's blobs. A folder may not lead there (a
    // hostile one could name any repository's blobs); a file named directly is the user's.
    let root = dir();
    let (snap, truth) = hub_cache(&root);
    let local = root.join("local");
    fs::create_dir(&local).unwrap();
    for entry in fs::read_dir(&snap).unwrap() {
        let entry = entry.unwrap();
        let blob = fs::canonicalize(entry.path()).unwrap();
        symlink(&blob, local.join(entry.file_name())).unwrap();
    }
    assert!(matches!(open(&local), Err(FormatError::ShardOutsideFolder { .. })), "{:?}", open(&local));
    let one = open(&local.join("model-00002-of-00002.safetensors")).unwrap();
    assert_eq!(read_all(one), truth.iter().filter(|(n, _)| n == "c").cloned().collect::<Vec<_>>());
}

/// Defect: every shard was opened at once, so 3000 shards ran out of descriptors.
#[test]
fn open_files_stay_bounded() {
    let dir = dir();
    let names: Vec<String> = (0..300).map(|i| format!("s{i:04}.safetensors")).collect();
    for (i, n) in names.iter().enumerate() {
        write_shard(&dir.join(n), &[(&format!("t{i}"), Dtype::U8, &[2])]);
    }
    let mut limits = PlanLimits::default();
    limits.max_open_files = 16;
    let mut plan = open_checkpoint(&dir, &limits).unwrap();
    assert_eq!(plan.shards().len(), 300);
    // Half the bound is held for the load; the load's window takes the other half.
    assert_eq!(plan.open_files(), 8);
    for i in 0..300 {
        plan.take_checked(i, HeaderCheck::Planned).unwrap();
    }
    assert_eq!(plan.open_files(), 0);
}

#[test]
fn a_header_over_memory_is_an_error() {
    // A header that claims the 100 MB maximum in a file that has it, all spaces: parsing it
    // must not need more than its size, and a file shorter than its claim is refused before
    // anything is allocated.
    let dir = dir();
    let f = dir.join("short.safetensors");
    let mut b = 99_999_999u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    fs::write(&f, &b).unwrap();
    assert!(matches!(open(&f), Err(FormatError::HeaderIncomplete { header_len: 99_999_999, .. })));
}

/// Red-team findings: special files outside the folder are refused as outside (never opened,
/// nor their kind revealed); a dangling index link is an error; an index named directly is
/// the file errors name; the distinct shard names of an index are bounded.
#[test]
fn links_out_are_refused_before_anything_is_opened() {
    let dir = dir();
    write_shard(&dir.join("a.safetensors"), &[("a", Dtype::U8, &[1])]);
    symlink("/dev/null", dir.join("x.safetensors")).unwrap();
    match open(&dir) {
        Err(FormatError::ShardOutsideFolder { shard, .. }) => assert_eq!(shard, "x.safetensors"),
        other => panic!("{other:?}"),
    }
    let outside = self::dir();
    mkfifo(&outside.join("p"));
    fs::remove_file(dir.join("x.safetensors")).unwrap();
    symlink(outside.join("p"), dir.join("x.safetensors")).unwrap();
    assert!(matches!(open(&dir), Err(FormatError::ShardOutsideFolder { .. })));

    let dir = sharded();
    fs::remove_file(dir.join("model.safetensors.index.json")).unwrap();
    symlink("nowhere.json", dir.join("model.safetensors.index.json")).unwrap();
    match open(&dir) {
        Err(FormatError::ShardUnreadable { source, .. }) => assert!(source.to_string().contains("leads nowhere")),
        other => panic!("{other:?}"),
    }

    let dir = sharded();
    fs::rename(dir.join("model.safetensors.index.json"), dir.join("custom.index.json")).unwrap();
    write_index(
        &dir,
        &[("a", "s-1.safetensors"), ("b", "s-1.safetensors"), ("c", "s-2.safetensors"), ("z", "s-2.safetensors")],
    );
    fs::rename(dir.join("model.safetensors.index.json"), dir.join("custom.index.json")).unwrap();
    match open(&dir.join("custom.index.json")) {
        Err(FormatError::TensorNotInShard { file, .. }) => {
            assert!(file.ends_with("custom.index.json"), "{}", file.display())
        }
        other => panic!("{other:?}"),
    }

    let dir = self::dir();
    let names: Vec<String> = (0..20).map(|i| format!("t{i}")).collect();
    let shards: Vec<String> = (0..20).map(|i| format!("s{i}.safetensors")).collect();
    let entries: Vec<(&str, &str)> = names.iter().zip(&shards).map(|(n, s)| (n.as_str(), s.as_str())).collect();
    write_index(&dir, &entries);
    let mut limits = PlanLimits::default();
    limits.max_shards = 10;
    match open_checkpoint(&dir, &limits) {
        Err(FormatError::InvalidIndex { message, .. }) => assert!(message.contains("max_shards"), "{message}"),
        other => panic!("{other:?}"),
    }
    // A folder without an index, of more files than that: refused as its names are listed,
    // before any is opened (these are not even safetensors: one as many as the limit is
    // opened, and refused for what it holds).
    let dir = self::dir();
    for s in &shards[..11] {
        fs::write(dir.join(s), b"not opened").unwrap();
    }
    match open_checkpoint(&dir, &limits) {
        Err(e @ FormatError::TooManyFiles { limit: 10, .. }) => assert!(e.to_string().contains("max_shards"), "{e}"),
        other => panic!("{other:?}"),
    }
    // PyTorch files beside them are not opened (only the hub's names are): not counted.
    for i in 0..20 {
        fs::write(dir.join(format!("checkpoint-{i}.pt")), b"not opened").unwrap();
    }
    fs::remove_file(dir.join(&shards[0])).unwrap();
    let ten = open_checkpoint(&dir, &limits);
    assert!(matches!(ten, Err(FormatError::HeaderTooLarge { .. })), "{ten:?}");
}

#[test]
fn pytorch_files_of_any_name_are_named() {
    for name in ["model.pt", "pytorch_model-00001-of-00002.bin", "weights.pth"] {
        let dir = dir();
        fs::write(dir.join(name), b"PK\x03\x04").unwrap();
        match open(&dir) {
            Err(FormatError::PyTorchCheckpoint { file, .. }) => assert!(file.ends_with(name)),
            other => panic!("{name}: {other:?}"),
        }
    }
}

/// What planning told an observer, in order.
#[derive(Default)]
struct Recorder {
    events: std::sync::Mutex<Vec<Event>>,
}

#[derive(Debug)]
enum Event {
    Early(Box<Checkpoint>),
    Validated(usize, u64),
}

impl tensorlift_io::PlanObserver for Recorder {
    fn wants_early_plan(&self) -> bool {
        true
    }
    fn headers_read(&self, early: Checkpoint) {
        self.events.lock().unwrap().push(Event::Early(Box::new(early)));
    }
    fn validated(&self, i: usize, header_hash: u64) {
        self.events.lock().unwrap().push(Event::Validated(i, header_hash));
    }
}

/// A load that reads while planning goes on is told, first, every shard with its data
/// section where the plan will put it (and no tensors), then each shard as its header is
/// validated, once each, with the hash the plan keeps (here the headers are large enough to
/// be parsed on several threads). Shards past the descriptors planning keeps open come
/// without one, as in the plan.
#[test]
fn an_observer_learns_the_shards_before_their_headers_are_parsed() {
    let dir = dir();
    // About 1.6 MB of headers: parsed on several threads where there are CPUs for them.
    let names: Vec<String> = (0..21_000).map(|i| format!("model.layers.{i}.mlp.weight")).collect();
    let mut entries = Vec::new();
    let shapes: Vec<[usize; 1]> = (1..=6).map(|n| [n]).collect();
    for s in 0..6 {
        let specs: Vec<tensorlift_testkit::Spec<'_>> =
            names[s * 3500..(s + 1) * 3500].iter().map(|n| (n.as_str(), Dtype::U8, &shapes[s][..])).collect();
        let file = format!("m-{s}.safetensors");
        write_shard(&dir.join(&file), &specs);
        entries.extend(names[s * 3500..(s + 1) * 3500].iter().map(|n| (n.clone(), file.clone())));
    }
    let entries: Vec<(&str, &str)> = entries.iter().map(|(n, f)| (n.as_str(), f.as_str())).collect();
    write_index(&dir, &entries);
    let mut limits = PlanLimits::default();
    limits.max_open_files = 8; // keeps 4 descriptors open
    let recorder = Recorder::default();
    let plan = tensorlift_io::open_checkpoint_observed(&dir, &limits, &recorder).unwrap();
    let events = recorder.events.into_inner().unwrap();
    let Some((Event::Early(early), validated)) = events.split_first() else { panic!("{events:?}") };
    assert!(early.tensors().is_empty());
    assert_eq!(early.index_file(), plan.index_file());
    assert_eq!(early.shards().len(), 6);
    for (i, (e, p)) in early.shards().iter().zip(plan.shards()).enumerate() {
        assert_eq!((&e.path, &e.name, e.identity), (&p.path, &p.name, p.identity));
        assert_eq!((e.data_start(), e.data_len), (p.data_start(), p.data_len), "shard {i}");
        assert_eq!(early.reopens(i), i >= 4, "shard {i}");
    }
    let mut seen: Vec<(usize, u64)> = validated
        .iter()
        .map(|e| match e {
            Event::Validated(i, h) => (*i, *h),
            other => panic!("{other:?} after the early plan"),
        })
        .collect();
    seen.sort();
    let hashes: Vec<(usize, u64)> = plan.shards().iter().enumerate().map(|(i, s)| (i, s.header_hash)).collect();
    assert_eq!(seen, hashes);
}

/// A header that fails validation is never reported as validated, and its error is the
/// plan's; the early plan still came first.
#[test]
fn an_observer_hears_nothing_of_a_header_that_fails() {
    let dir = dir();
    write_shard(&dir.join("m-0.safetensors"), &[("a", Dtype::U8, &[3])]);
    let bad = dir.join("m-1.safetensors");
    let json = br#"{"b":{"dtype":"X9","shape":[1],"data_offsets":[0,1]}}"#;
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json);
    bytes.push(0);
    fs::write(&bad, bytes).unwrap();
    let recorder = Recorder::default();
    let err = tensorlift_io::open_checkpoint_observed(&dir, &PlanLimits::default(), &recorder).unwrap_err();
    assert!(err.to_string().contains("m-1.safetensors"), "{err}");
    let events = recorder.events.into_inner().unwrap();
    assert!(matches!(events.as_slice(), [Event::Early(_), Event::Validated(0, _)]), "{events:?}");
}

/// Headers are all read before any is parsed, but errors keep the files' order: a header
/// read in an earlier batch that does not parse comes before a later batch's file that
/// cannot be opened (here one shard a batch, and the second shard a FIFO).
#[test]
fn an_earlier_bad_header_comes_before_a_later_file_that_cannot_be_opened() {
    let dir = dir();
    write_shard(&dir.join("a-1.safetensors"), &[("a", Dtype::U8, &[3])]);
    let json = br#"{"b":{"dtype":"X9","shape":[1],"data_offsets":[0,1]}}"#;
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json);
    bytes.push(0);
    fs::write(dir.join("a-2.safetensors"), bytes).unwrap();
    mkfifo(&dir.join("a-3.safetensors"));
    let mut limits = PlanLimits::default();
    limits.max_open_files = 4;
    let err = open_checkpoint(&dir, &limits).unwrap_err();
    assert!(matches!(&err, FormatError::UnknownDtype { file, .. } if file.ends_with("a-2.safetensors")), "{err:?}");
}

/// A shard is certainly the file planned only when its identity is as planned and its
/// status last changed well before planning began: a file written just before planning
/// (whose next write could fall in the same tick of its times) is not, nor a file written
/// since, nor another file.
#[test]
fn a_shard_is_certainly_unchanged_only_when_settled_before_planning() {
    let d = dir();
    let path = d.join("m.safetensors");
    write_shard(&path, &[("a", Dtype::F32, &[4])]);
    let identity = |p: &Path| tensorlift_io::file_identity(&fs::metadata(p).unwrap());
    // Written just now: its times prove nothing.
    let fresh = open(&path).unwrap();
    assert!(!fresh.certainly_unchanged(0, &identity(&path)));
    // Settled before planning: its unchanged times prove it unchanged.
    std::thread::sleep(std::time::Duration::from_nanos(tensorlift_io::SETTLED_NS as u64 + 100_000_000));
    let plan = open(&path).unwrap();
    assert!(plan.certainly_unchanged(0, &identity(&path)));
    assert!(!plan.certainly_unchanged(1, &identity(&path)), "no shard 1");
    // Rewritten in place, same length: its status change time moved.
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes).unwrap();
    assert!(!plan.certainly_unchanged(0, &identity(&path)));
    // A subset keeps what it knows.
    let again = open(&path).unwrap();
    assert!(!again.subset([0]).certainly_unchanged(0, &identity(&path)), "written since, under 2 s before planning");
}

/// A shard whose status changed after planning is taken with its header read again: a
/// chmod (no write) gives the descriptor, with the identity it was found with; a header
/// rewritten in place with its modification time set back is refused, by name or held.
#[test]
fn a_shard_whose_status_changed_is_taken_with_its_header_read_again() {
    use std::os::unix::fs::{FileExt, PermissionsExt};
    let d = dir();
    let path = d.join("m.safetensors");
    write_shard(&path, &[("a", Dtype::F32, &[4]), ("b", Dtype::I32, &[4])]);
    // A plan that holds every shard's descriptor holds no folder: a shard released is never
    // looked up by its path again.
    let mut plan = open(&path).unwrap();
    plan.release_shard(0);
    match plan.take_checked(0, HeaderCheck::Planned) {
        Err(IoError::Changed { what, .. }) => assert!(what.contains("descriptor was released"), "{what}"),
        other => panic!("{other:?}"),
    }
    // One that closed a shard to bound open files holds the folder, and reopens from it.
    write_shard(&d.join("z.safetensors"), &[("z", Dtype::U8, &[1])]);
    let mut limits = PlanLimits::default();
    limits.max_open_files = 2;
    for reopened in [false, true] {
        let mut plan = open_checkpoint(&d, &limits).unwrap();
        assert_eq!((plan.open_files(), plan.shards()[0].name.as_str()), (1, "m.safetensors"));
        if reopened {
            plan.release_shard(0); // as a plan closes a shard to bound open files
        }
        assert_eq!(plan.reopens(0), reopened);
        let planned = plan.shards()[0].identity;
        // Past the file system's clock tick, so that the change moves the status time.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        // Compared with the hash given (a plan still being made has none of its own yet).
        let hash = plan.shards()[0].header_hash;
        match plan.subset([0, 1]).take_checked(0, HeaderCheck::Fresh(hash ^ 1)) {
            Err(IoError::Changed { what, .. }) => assert!(what.contains("header differs"), "{reopened}: {what}"),
            other => panic!("{reopened}: {other:?}"),
        }
        let (_, taken) = plan.subset([0, 1]).take_checked(0, HeaderCheck::Fresh(hash)).unwrap();
        assert_ne!(taken.changed_ns, planned.changed_ns, "reopened: {reopened}");
        assert_eq!((taken.ino, taken.len, taken.modified_ns), (planned.ino, planned.len, planned.modified_ns));

        // The header's bytes changed (every a and b swapped), same length, the modification
        // time set back.
        let mtime = fs::metadata(&path).unwrap().modified().unwrap();
        let bytes = fs::read(&path).unwrap();
        let swapped: Vec<u8> = bytes
            .iter()
            .map(|&c| {
                if c == b'a' {
                    b'b'
                } else if c == b'b' {
                    b'a'
                } else {
                    c
                }
            })
            .collect();
        let n = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&swapped[..n], 0).unwrap();
        f.set_times(fs::FileTimes::new().set_modified(mtime)).unwrap();
        match plan.take_checked(0, HeaderCheck::Planned) {
            Err(IoError::Changed { what, .. }) => assert!(what.contains("header differs"), "{reopened}: {what}"),
            other => panic!("{reopened}: {other:?}"),
        }
        f.write_all_at(&bytes[..n], 0).unwrap();
    }
}

/// Defect: a shard whose file name is not UTF-8 was skipped by a folder scan (the checkpoint
/// loaded without it) and, named directly, called "not a .safetensors file".
#[test]
fn a_shard_named_in_bytes_that_are_not_utf8_is_refused_by_name() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let d = dir();
    write_shard(&d.join("a.safetensors"), &[("a", Dtype::U8, &[1])]);
    let odd = d.join(OsStr::from_bytes(b"b\xff.safetensors"));
    write_shard(&odd, &[("b", Dtype::U8, &[1])]);
    // Another file named so is not a shard: the scan passes it by.
    fs::write(d.join(OsStr::from_bytes(b"notes\xff.txt")), b"x").unwrap();
    for path in [d.clone(), odd.clone()] {
        match open(&path) {
            Err(e @ FormatError::NameNotUtf8 { .. }) => {
                let FormatError::NameNotUtf8 { file } = &e else { unreachable!() };
                assert_eq!(file, &odd);
                assert!(e.to_string().contains("name is not UTF-8"), "{e}");
            }
            other => panic!("{}: {other:?}", path.display()),
        }
    }
    fs::remove_file(&odd).unwrap();
    let plan = open(&d).unwrap();
    assert_eq!(plan.tensors().iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["a"]);
}

/// Defect: a PyTorch file named `.safetensors` was read as PyTorch, so a check that a file
/// is safetensors by opening it (the reference refuses anything else) passed a pickle. Its
/// name is its claim: it is refused, named directly or found by a folder scan, and read as
/// PyTorch once named so.
#[test]
fn a_pytorch_file_named_safetensors_is_refused() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tensorlift-pickle/tests/fixtures/tied.zip.bin");
    let d = dir();
    let named = d.join("model.safetensors");
    fs::copy(&fixture, &named).unwrap();
    for path in [named.clone(), d.clone()] {
        match open(&path) {
            Err(e @ FormatError::PyTorchCheckpoint { .. }) => {
                let FormatError::PyTorchCheckpoint { file, layout } = &e else { unreachable!() };
                assert_eq!(file, &named);
                assert!(layout.contains("named .safetensors"), "{e}");
            }
            other => panic!("{}: {other:?}", path.display()),
        }
    }
    // Its name as looked up is its claim, not the name of the file a link leads to: a hub
    // cache's model.safetensors is a link to a blob.
    fs::rename(&named, d.join("blob")).unwrap();
    symlink("blob", &named).unwrap();
    for path in [named.clone(), d.clone()] {
        match open(&path) {
            Err(FormatError::PyTorchCheckpoint { layout, .. }) => assert!(layout.contains("named .safetensors")),
            other => panic!("{}: {other:?}", path.display()),
        }
    }
    fs::remove_file(&named).unwrap();
    fs::rename(d.join("blob"), d.join("pytorch_model.bin")).unwrap();
    let plan = open(&d).unwrap();
    assert!(!plan.tensors().is_empty());
}

/// A zip may store its pickle after the tensors' data (PyTorch reads such a file, and so
/// does tensorlift): each file's pickle is charged to the plan's header budget all the
/// same, not only the bytes before its first tensor, so that files together cannot hold more
/// than the budget in names and shapes. Two such files written by torch and reordered by
/// Python's zipfile: planned within a budget of both pickles, refused within less.
#[test]
fn pickles_stored_after_the_data_are_charged_to_the_header_budget() {
    let d = dir();
    let script = r#"
import io, json, sys, zipfile
import torch
folder, sizes, weight_map = sys.argv[1], {}, {}
for i in range(2):
    state = {f"t{i}_" + "x" * 200 + f"_{k}": torch.arange(4, dtype=torch.float32) + k for k in range(20)}
    buf = io.BytesIO()
    torch.save(state, buf)
    src = zipfile.ZipFile(buf)
    names = sorted(src.namelist(), key=lambda n: n.endswith("/data.pkl"))
    name = f"pytorch_model-0000{i + 1}-of-00002.bin"
    with zipfile.ZipFile(f"{folder}/{name}", "w") as out:
        for n in names:
            out.writestr(src.getinfo(n), src.read(n))
    sizes[name] = src.getinfo(names[-1]).file_size
    weight_map.update({k: name for k in state})
json.dump({"weight_map": weight_map}, open(f"{folder}/pytorch_model.bin.index.json", "w"))
print(json.dumps(sizes))
"#;
    let out = match Command::new("python3").args(["-c", script]).arg(&d).output() {
        Ok(o) if o.status.success() => o,
        other => {
            let why = other.map_or_else(|e| e.to_string(), |o| String::from_utf8_lossy(&o.stderr).into_owned());
            let required = std::env::var_os("CI").is_some() || std::env::var_os("TENSORLIFT_REQUIRE_DEPS").is_some();
            assert!(!required && why.contains("No module named 'torch'"), "python3 with torch: {why}");
            eprintln!("skipped: torch is not installed here (./scripts/test installs it)");
            return;
        }
    };
    let sizes: std::collections::BTreeMap<String, u64> = serde_json::from_slice(&out.stdout).unwrap();
    let pickles: u64 = sizes.values().sum();
    let mut limits = PlanLimits::default();
    limits.max_header_bytes = pickles + (64 << 10);
    let plan = open_checkpoint(&d, &limits).unwrap();
    assert_eq!(plan.tensors().len(), 40);
    // Each pickle fits the budget alone; both do not.
    assert!(sizes.values().all(|&p| p < pickles - 1));
    limits.max_header_bytes = pickles - 1;
    let err = open_checkpoint(&d, &limits).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("max_header_bytes") || err.contains("max_pickle_bytes"), "{err}");
}
