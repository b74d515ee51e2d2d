//! `tensorlift manifest`: the SHA256SUMS it writes is what coreutils' `sha256sum` writes for
//! the same files, `sha256sum -c` passes on it (and fails once a byte changes), and what
//! `sha256sum` writes parses back, escaped names included.

use std::path::Path;
use std::process::{Command, Output};

use tensorlift::Dtype;
use tensorlift_testkit::{scratch_in, write_shard, write_sharded};

fn tensorlift(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tensorlift")).args(args).output().unwrap()
}

/// `sha256sum ARGS` run in `dir` (coreutils).
fn sha256sum(dir: &Path, args: &[&str]) -> Output {
    Command::new("sha256sum").args(args).current_dir(dir).output().expect("coreutils' sha256sum")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn sha256sum_checks_the_manifest_of_a_sharded_checkpoint() {
    let dir = scratch_in(&std::env::temp_dir(), "tl-manifest-");
    let a: &[tensorlift_testkit::Spec<'_>] = &[("a", Dtype::F32, &[64, 33]), ("b", Dtype::BF16, &[7])];
    let b: &[tensorlift_testkit::Spec<'_>] = &[("c", Dtype::U8, &[100_001])];
    let c: &[tensorlift_testkit::Spec<'_>] = &[("d", Dtype::I64, &[3, 3])];
    write_sharded(&dir, &[a, b, c]);
    std::fs::write(dir.join("SHA256SUMS"), format!("{}  model-00001-of-00003.safetensors\n", "0".repeat(64))).unwrap();

    let out = tensorlift(&["manifest", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("wrote 4 digests to {}", dir.join("SHA256SUMS").display())));
    let ours = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();

    // The same lines as coreutils writes for the shards and the index.
    let files = [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ];
    let theirs = sha256sum(&dir, &files);
    assert!(theirs.status.success());
    assert_eq!(ours, text(&theirs.stdout));

    // sha256sum -c passes, every file checked...
    let check = sha256sum(&dir, &["-c", "--strict", "SHA256SUMS"]);
    assert!(check.status.success(), "{}{}", text(&check.stdout), text(&check.stderr));
    for f in files {
        assert!(text(&check.stdout).contains(&format!("{f}: OK")), "{}", text(&check.stdout));
    }
    // ... and fails, on that shard, once one byte of its data changes.
    let last = dir.join(files[2]);
    let mut bytes = std::fs::read(&last).unwrap();
    let at = bytes.len() - 1;
    bytes[at] ^= 1;
    std::fs::write(&last, bytes).unwrap();
    let check = sha256sum(&dir, &["-c", "SHA256SUMS"]);
    assert!(!check.status.success());
    assert!(text(&check.stdout).contains(&format!("{}: FAILED", files[2])), "{}", text(&check.stdout));
}

#[test]
fn a_shard_the_index_names_twice_gets_a_line_for_each_name() {
    // `y` is a hard link to `x`: one shard, reached by two names of the index. A stale line
    // for `y` is replaced, not kept beside the new one.
    let dir = scratch_in(&std::env::temp_dir(), "tl-manifest-");
    write_shard(&dir.join("x.safetensors"), &[("a", Dtype::F32, &[9]), ("b", Dtype::U8, &[3])]);
    std::fs::hard_link(dir.join("x.safetensors"), dir.join("y.safetensors")).unwrap();
    let index = r#"{"metadata":{},"weight_map":{"a":"x.safetensors","b":"y.safetensors"}}"#;
    std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
    std::fs::write(dir.join("SHA256SUMS"), format!("{}  y.safetensors\n", "0".repeat(64))).unwrap();
    let out = tensorlift(&["manifest", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let theirs = sha256sum(&dir, &["x.safetensors", "y.safetensors", "model.safetensors.index.json"]);
    assert_eq!(std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap(), text(&theirs.stdout));
    let check = sha256sum(&dir, &["-c", "--strict", "SHA256SUMS"]);
    assert!(check.status.success(), "{}{}", text(&check.stdout), text(&check.stderr));
}

/// Stale lines naming a shard another way (its absolute path, a path through a folder and
/// back), written by coreutils before the shard changed, would fail `sha256sum -c` if kept
/// as they were: they keep their names with the shard's new digest, in place; another
/// file's line stays as it was.
#[test]
fn stale_lines_naming_a_shard_another_way_get_its_new_digest() {
    let dir = scratch_in(&std::env::temp_dir(), "tl-manifest-");
    let shard = dir.join("model.safetensors");
    write_shard(&shard, &[("a", Dtype::F32, &[9])]);
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::os::unix::fs::symlink("model.safetensors", dir.join("alias.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), "{}").unwrap();
    let absolute = shard.to_str().unwrap();
    let other_ways = [absolute, "sub/../model.safetensors"];
    let old = sha256sum(&dir, &[&other_ways[..], &["alias.safetensors", "config.json"]].concat());
    assert!(old.status.success());
    std::fs::write(dir.join("SHA256SUMS"), &old.stdout).unwrap();
    // The shard changes: its old lines are stale.
    write_shard(&shard, &[("a", Dtype::F32, &[9]), ("b", Dtype::U8, &[2])]);
    let out = tensorlift(&["manifest", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let check = sha256sum(&dir, &["-c", "--strict", "SHA256SUMS"]);
    assert!(check.status.success(), "{}{}", text(&check.stdout), text(&check.stderr));
    assert!(text(&check.stdout).contains(&format!("{absolute}: OK")), "{}", text(&check.stdout));
    // The link is a name of the folder's one shard: the manifest's own line for it is
    // replaced (moved to its lines, at the end); the others stay in place.
    let want = [&other_ways[..], &["config.json"], &["alias.safetensors", "model.safetensors"]]
        .map(|names| text(&sha256sum(&dir, names).stdout))
        .concat();
    assert_eq!(std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap(), want);
}

#[test]
fn names_that_need_escaping_round_trip_through_coreutils() {
    let dir = scratch_in(&std::env::temp_dir(), "tl-manifest-");
    let name = "we ird\\name.safetensors";
    write_shard(&dir.join(name), &[("x", Dtype::F16, &[5, 5])]);
    let out = tensorlift(&["manifest", dir.join(name).to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let ours = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    let theirs = sha256sum(&dir, &[name]);
    assert_eq!(ours, text(&theirs.stdout));
    assert!(ours.starts_with('\\'), "{ours}");
    // What it prints is the line it wrote (the name escaped as sha256sum escapes it).
    assert!(text(&out.stdout).starts_with(&ours), "{}", text(&out.stdout));
    let check = sha256sum(&dir, &["-c", "--strict", "SHA256SUMS"]);
    assert!(check.status.success(), "{}{}", text(&check.stdout), text(&check.stderr));
    // What coreutils wrote parses back to the file's name and digest.
    let parsed = tensorlift::checksums::parse_sums(&text(&theirs.stdout), Path::new("SHA256SUMS")).unwrap();
    let digest = tensorlift::checksums::sha256_file(&dir.join(name)).unwrap();
    assert_eq!(parsed, [(name.to_owned(), digest)]);
}

#[test]
fn an_invalid_checkpoint_gets_no_manifest() {
    let dir = scratch_in(&std::env::temp_dir(), "tl-manifest-");
    let path = dir.join("bad.safetensors");
    write_shard(&path, &[("x", Dtype::F32, &[4])]);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 3).unwrap();
    let out = tensorlift(&["manifest", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(text(&out.stderr).starts_with("error: "), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("bad.safetensors"), "{}", text(&out.stderr));
    assert!(!dir.join("SHA256SUMS").exists());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "nothing is left beside the file");
}

#[test]
fn other_entries_are_kept_and_links_are_not_followed() {
    let dir = scratch_in(&std::env::temp_dir(), "tl-manifest-");
    write_shard(&dir.join("model.safetensors"), &[("x", Dtype::F32, &[9])]);
    std::fs::write(dir.join("config.json"), "{}\n").unwrap();
    // A SHA256SUMS with the config's digest and a stale one for the weights.
    let config = text(&sha256sum(&dir, &["config.json"]).stdout);
    std::fs::write(dir.join("SHA256SUMS"), format!("{config}{}  ./model.safetensors\n", "0".repeat(64))).unwrap();
    let out = tensorlift(&["manifest", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let written = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    assert_eq!(written, format!("{config}{}", text(&sha256sum(&dir, &["model.safetensors"]).stdout)));
    let check = sha256sum(&dir, &["-c", "--strict", "SHA256SUMS"]);
    assert!(check.status.success(), "{}", text(&check.stdout));

    // SHA256SUMS as a link to a file elsewhere: refused, and that file left as it was.
    let elsewhere = scratch_in(&std::env::temp_dir(), "tl-manifest-victim-").join("precious");
    std::fs::write(&elsewhere, "keep me\n").unwrap();
    std::fs::remove_file(dir.join("SHA256SUMS")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, dir.join("SHA256SUMS")).unwrap();
    let out = tensorlift(&["manifest", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("symbolic link"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "keep me\n");
    // Links planted at the names it writes beside SHA256SUMS (this process's) are not
    // followed either: it takes the next free name.
    std::fs::remove_file(dir.join("SHA256SUMS")).unwrap();
    for n in 0..3 {
        let planted = dir.join(format!(".SHA256SUMS.partial-{}-{n}", std::process::id()));
        std::os::unix::fs::symlink(&elsewhere, planted).unwrap();
    }
    let m = tensorlift::checksums::manifest(&dir).unwrap();
    assert_eq!(m.write().unwrap(), dir.canonicalize().unwrap().join("SHA256SUMS"));
    assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "keep me\n");
    assert!(std::fs::symlink_metadata(dir.join("SHA256SUMS")).unwrap().is_file());
    let check = sha256sum(&dir, &["-c", "--strict", "SHA256SUMS"]);
    assert!(check.status.success(), "{}", text(&check.stdout));
}

#[test]
fn load_verify_checks_what_manifest_wrote() {
    let dir = scratch_in(&std::env::temp_dir(), "tl-manifest-");
    let a: &[tensorlift_testkit::Spec<'_>] = &[("a", Dtype::F32, &[5000])];
    let b: &[tensorlift_testkit::Spec<'_>] = &[("b", Dtype::U8, &[7000])];
    write_sharded(&dir, &[a, b]);
    let d = dir.to_str().unwrap();
    // No SHA256SUMS yet: --verify fails saying where it looked; --verify=if-known loads.
    let out = tensorlift(&["load", d, "--device", "cpu", "--verify"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no expected SHA-256 to verify it with"), "{}", text(&out.stderr));
    let out = tensorlift(&["load", d, "--device", "cpu", "--verify=if-known", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verified_bytes"], 0);
    assert!(v["unverified_bytes"].as_u64().unwrap() > 12_000);
    // With the manifest, every byte is verified.
    assert_eq!(tensorlift(&["manifest", d]).status.code(), Some(0));
    let out = tensorlift(&["load", d, "--device", "cpu", "--verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let files: u64 = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).unwrap().len())
        .sum();
    assert!(
        text(&out.stdout).contains(&format!("sha256: {files} bytes verified, 0 unverified")),
        "{}",
        text(&out.stdout)
    );
    // The same onto a CUDA device (the emulated driver, or a real one on a GPU host).
    let on_cuda = || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tensorlift"));
        cmd.args(["load", d, "--device", "cuda:0", "--verify"]);
        if !tensorlift_testkit::real_driver() {
            cmd.env("TENSORLIFT_LIBCUDA", tensorlift_testkit::emulated_driver());
        }
        cmd.output().unwrap()
    };
    let out = on_cuda();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("sha256: {files} bytes verified, 0 unverified")),
        "{}",
        text(&out.stdout)
    );
    // A byte changed after: the load fails naming the shard and both digests.
    let shard = dir.join("model-00002-of-00002.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    let now = text(&sha256sum(&dir, &["model-00002-of-00002.safetensors"]).stdout)[..64].to_owned();
    let out = tensorlift(&["load", d, "--device", "cpu", "--verify"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("model-00002-of-00002.safetensors: its SHA-256 is ") && err.contains(&now), "{err}");
    let out = on_cuda();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("model-00002-of-00002.safetensors: its SHA-256 is ") && err.contains(&now), "{err}");
}

/// The lines of an existing `SHA256SUMS` for other files are kept byte for byte (a name
/// that is not UTF-8, a comment, the tagged form), and `sha256sum -c` passes on the result.
#[test]
fn other_lines_of_an_existing_sha256sums_are_kept_as_they_are() {
    use std::os::unix::ffi::OsStrExt;
    let dir = scratch_in(&std::env::temp_dir(), "tl-manifest-");
    write_shard(&dir.join("model.safetensors"), &[("w", Dtype::F32, &[5])]);
    let odd = std::ffi::OsStr::from_bytes(b"caf\xe9.txt");
    std::fs::write(dir.join(odd), b"not a shard").unwrap();
    std::fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
    let listed = Command::new("sha256sum").arg(odd).current_dir(&dir).output().unwrap().stdout;
    let tagged = sha256sum(&dir, &["--tag", "tokenizer.json"]).stdout;
    let before =
        [b"# kept\n".as_slice(), &listed, &tagged, format!("{}  model.safetensors\n", "0".repeat(64)).as_bytes()]
            .concat();
    std::fs::write(dir.join("SHA256SUMS"), &before).unwrap();
    let out = tensorlift(&["manifest", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let after = std::fs::read(dir.join("SHA256SUMS")).unwrap();
    let mine = sha256sum(&dir, &["model.safetensors"]).stdout;
    assert_eq!(after, [b"# kept\n".as_slice(), &listed, &tagged, &mine].concat());
    let check = sha256sum(&dir, &["-c", "SHA256SUMS"]);
    assert!(check.status.success(), "{}{}", text(&check.stdout), text(&check.stderr));
}

/// A line of an absolute name is not the folder's file (`sha256sum -c` reads
/// `/model.safetensors` from the root): it is another file's line, kept; the folder's own
/// line is replaced.
#[test]
fn a_line_of_an_absolute_name_is_kept() {
    let dir = scratch_in(&std::env::temp_dir(), "tl-manifest-");
    write_shard(&dir.join("model.safetensors"), &[("w", Dtype::F32, &[5])]);
    let absolute = format!("{}  /model.safetensors\n", "1".repeat(64));
    let before = format!("{absolute}{}  model.safetensors\n", "0".repeat(64));
    std::fs::write(dir.join("SHA256SUMS"), &before).unwrap();
    let out = tensorlift(&["manifest", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let after = std::fs::read(dir.join("SHA256SUMS")).unwrap();
    let mine = sha256sum(&dir, &["model.safetensors"]).stdout;
    assert_eq!(after, [absolute.as_bytes(), &mine].concat());
}

/// A `SHA256SUMS` in BSD's reversed form (one blank between digest and name, as
/// `sha256 -r` writes it): its first line sets the form for every line, so the manifest's
/// lines are written in it too, and both `sha256sum -c` and a verified load read them.
#[test]
fn a_sha256sums_in_the_one_space_form_is_kept_in_it() {
    let dir = scratch_in(&std::env::temp_dir(), "tl-manifest-");
    write_shard(&dir.join("model.safetensors"), &[("w", Dtype::F32, &[5])]);
    std::fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
    let theirs = text(&sha256sum(&dir, &["tokenizer.json"]).stdout).replacen("  ", " ", 1);
    std::fs::write(dir.join("SHA256SUMS"), &theirs).unwrap();
    let out = tensorlift(&["manifest", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let written = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    let mine = text(&sha256sum(&dir, &["model.safetensors"]).stdout).replacen("  ", " ", 1);
    assert_eq!(written, format!("{theirs}{mine}"));
    let check = sha256sum(&dir, &["-c", "--strict", "SHA256SUMS"]);
    assert!(check.status.success(), "{}{}", text(&check.stdout), text(&check.stderr));
    let out = tensorlift(&["load", dir.to_str().unwrap(), "--device", "cpu", "--verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// The line that set a one-space file's form may be one the manifest replaces: the form is
/// then the kept lines', and where they would read otherwise without it (a name that starts
/// with a space), nothing is written.
#[test]
fn a_form_that_only_a_replaced_line_set_is_not_silently_changed() {
    let dir = scratch_in(&std::env::temp_dir(), "tl-manifest-");
    write_shard(&dir.join("model.safetensors"), &[("w", Dtype::F32, &[5])]);
    std::fs::write(dir.join(" notes.txt"), b"notes").unwrap();
    let model = text(&sha256sum(&dir, &["model.safetensors"]).stdout)[..64].to_owned();
    let notes = text(&sha256sum(&dir, &[" notes.txt"]).stdout)[..64].to_owned();
    // One-space form: the second line names " notes.txt" (sha256sum -c agrees).
    let before = format!("{} model.safetensors\n{notes}  notes.txt\n", "0".repeat(64));
    std::fs::write(dir.join("SHA256SUMS"), &before).unwrap();
    std::fs::write(dir.join("SHA256SUMS.ok"), format!("{model} model.safetensors\n{notes}  notes.txt\n")).unwrap();
    assert!(sha256sum(&dir, &["-c", "--strict", "SHA256SUMS.ok"]).status.success());
    let out = tensorlift(&["manifest", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains("cannot be kept with this manifest's in one form"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap(), before);
    // An empty SHA256SUMS: the manifest's lines, and nothing before them.
    std::fs::write(dir.join("SHA256SUMS"), b"").unwrap();
    let out = tensorlift(&["manifest", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap().starts_with(&model));
}
