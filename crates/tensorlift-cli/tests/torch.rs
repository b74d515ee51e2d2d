//! `tensorlift inspect` and `tensorlift convert` on PyTorch checkpoints written as
//! `torch.save` writes them (tensorlift-pickle's fixtures): what `convert` writes loads back
//! to the bytes numpy made, and hostile files are refused with the global named.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

fn tensorlift(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tensorlift")).args(args).output().unwrap()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tensorlift-pickle/tests/fixtures").join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// name -> sha256 of the contiguous bytes numpy wrote beside the fixture.
fn expected(case: &str) -> BTreeMap<String, String> {
    let v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(fixture(&format!("{case}.expect.json"))).unwrap()).unwrap();
    v.into_iter().map(|(k, t)| (k, sha256_of_hex(t["hex"].as_str().unwrap()))).collect()
}

/// The sha256 (hex) of the bytes a hex string spells.
fn sha256_of_hex(hex: &str) -> String {
    let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    format!("{:x}", Sha256::digest(&bytes))
}

/// name -> sha256 of each tensor `tensorlift load` reads from `dir`.
fn loaded(dir: &Path) -> BTreeMap<String, String> {
    digests(&tensorlift(&["load", "--device", "cpu", "--digest", "sha256", "--json", s(dir)]))
}

/// name -> sha256 from the output of a successful `tensorlift load --digest sha256 --json`.
fn digests(out: &Output) -> BTreeMap<String, String> {
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap().to_owned(), t["sha256"].as_str().unwrap().to_owned()))
        .collect()
}

#[test]
fn converted_checkpoints_load_back_to_numpys_bytes() {
    for file in ["every_dtype.zip.bin", "every_dtype.legacy.bin"] {
        for max in ["5GB", "100B"] {
            let dst = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-").join("out");
            let out = tensorlift(&["convert", s(&fixture(file)), s(&dst), "--max-shard-size", max]);
            assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(loaded(&dst), expected("every_dtype"), "{file} {max}");
            let leftovers: Vec<_> =
                std::fs::read_dir(dst.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(leftovers, [std::ffi::OsString::from("out")], "written in a folder beside, then renamed");
            let sharded = dst.join("model.safetensors.index.json").exists();
            assert_eq!(sharded, max == "100B", "{file} {max}");
            assert_eq!(dst.join("model.safetensors").exists(), !sharded);
            if sharded {
                assert!(dst.join("model-00001-of-00006.safetensors").exists());
            }
        }
    }
}

#[test]
fn tied_weights_are_written_once_and_views_made_contiguous() {
    for file in ["views.zip.bin", "views.legacy.bin"] {
        let dst = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-").join("out");
        let out = tensorlift(&["convert", s(&fixture(file)), s(&dst)]);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains("tied: 'lm_head.weight' shares its data with 'embed.weight' and was not written again"),
            "{text}"
        );
        let mut want = expected("views");
        want.remove("lm_head.weight");
        assert_eq!(loaded(&dst), want, "{file}");
        // The reference writer's metadata.
        let header = std::fs::read(dst.join("model.safetensors")).unwrap();
        assert!(String::from_utf8_lossy(&header[..200]).contains(r#""__metadata__":{"format":"pt"}"#));
    }
}

#[test]
fn inspect_reads_pytorch_files_and_folders() {
    let out = tensorlift(&["inspect", "--json", s(&fixture("views.zip.bin"))]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["format"], "pytorch");
    assert_eq!(v["tensors"].as_array().unwrap().len(), 6);
    assert_eq!(v["skipped"], serde_json::json!(["epoch"]));
    let t = &v["tensors"][2];
    assert_eq!((t["name"].as_str(), t["contiguous"].as_bool()), (Some("transposed"), Some(false)));
    // A folder with pytorch_model.bin and no safetensors.
    let d = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-");
    std::fs::copy(fixture("every_dtype.legacy.bin"), d.join("pytorch_model.bin")).unwrap();
    let out = tensorlift(&["inspect", s(&d)]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("22 tensors, 453 bytes, 1 PyTorch file(s) (legacy)"), "{text}");
}

#[test]
fn hostile_and_misused_inputs_are_refused() {
    for (file, want) in [
        ("evil_system.bin", "refused global 'posix.system'"),
        ("evil_eval.bin", "refused global '__builtin__.eval'"),
        ("compressed.bin", "is compressed"),
        ("big_endian.bin", "big-endian"),
    ] {
        for cmd in ["inspect", "convert"] {
            let dst = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-").join("out");
            let out = if cmd == "inspect" {
                tensorlift(&[cmd, s(&fixture(file))])
            } else {
                tensorlift(&[cmd, s(&fixture(file)), s(&dst)])
            };
            assert_eq!(out.status.code(), Some(1), "{cmd} {file}");
            let err = String::from_utf8(out.stderr).unwrap();
            assert!(err.contains(want), "{cmd} {file}: {err}");
            assert!(!dst.exists(), "{cmd} {file}: nothing is written");
        }
    }
    // An existing, non-empty destination is never written into.
    let d = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-");
    std::fs::write(d.join("keep"), b"x").unwrap();
    let out = tensorlift(&["convert", s(&fixture("views.zip.bin")), s(&d)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists and is not an empty folder"));
    assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
    let out = tensorlift(&["convert", s(&fixture("views.zip.bin")), s(&d), "--max-shard-size", "lots"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_file_torch_wrote_converts_and_loads_back_to_torchs_bytes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tensorlift-pickle/tests/fixtures-torch");
    let want: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("expect.json")).unwrap()).unwrap();
    let dst = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-").join("out");
    let out = tensorlift(&["convert", s(&dir.join("state_dict.zip.bin")), s(&dst), "--max-shard-size", "500B"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let got = loaded(&dst);
    for (name, w) in want["tensors"].as_object().unwrap() {
        if name == "tied.b" {
            assert!(!got.contains_key(name), "tied.b is tied.a's data, written once");
            continue;
        }
        assert_eq!(got[name], sha256_of_hex(w["hex"].as_str().unwrap()), "{name}");
    }
    assert_eq!(got.len(), want["tensors"].as_object().unwrap().len() - 1);
}

/// `tensorlift load` of a folder with PyTorch weights and no safetensors: the pickle reader
/// plans it, the engine reads it (on the host and on the CUDA path), and the bytes equal
/// numpy's; TENSORLIFT_USE_SAFETENSORS=1 refuses it saying how to convert.
#[test]
fn folders_with_pytorch_weights_load_through_the_pickle_reader() {
    let run = |dir: &Path, device: &str, env: Option<(&str, &str)>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tensorlift"));
        cmd.args(["load", s(dir), "--device", device, "--digest", "sha256", "--json"]);
        if !tensorlift_testkit::real_driver() {
            cmd.env("TENSORLIFT_LIBCUDA", tensorlift_testkit::emulated_driver());
        }
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    for file in ["every_dtype.zip.bin", "every_dtype.legacy.bin"] {
        let d = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-");
        std::fs::copy(fixture(file), d.join("pytorch_model.bin")).unwrap();
        // Another pickle beside the weights is not read.
        std::fs::copy(fixture("evil_system.bin"), d.join("training_args.bin")).unwrap();
        for device in ["cpu", "cuda:0"] {
            assert_eq!(digests(&run(&d, device, None)), expected("every_dtype"), "{file} {device}");
        }
        let out = run(&d, "cpu", Some(("TENSORLIFT_USE_SAFETENSORS", "1")));
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("TENSORLIFT_USE_SAFETENSORS=1 asks for safetensors only")
                && err.contains("tensorlift convert"),
            "{err}"
        );
    }
    // Tied and overlapping contiguous views: each name gets its bytes, on both paths.
    for file in ["tied.zip.bin", "tied.legacy.bin"] {
        let d = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-");
        std::fs::copy(fixture(file), d.join("pytorch_model.bin")).unwrap();
        for device in ["cpu", "cuda:0"] {
            assert_eq!(digests(&run(&d, device, None)), expected("tied"), "{file} {device}");
        }
    }
    // Shards through pytorch_model.bin.index.json.
    let d = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-");
    std::fs::copy(fixture("every_dtype.zip.bin"), d.join("pytorch_model-00001-of-00002.bin")).unwrap();
    std::fs::copy(fixture("second_shard.zip.bin"), d.join("pytorch_model-00002-of-00002.bin")).unwrap();
    let mut want = expected("every_dtype");
    let mut map: serde_json::Map<String, serde_json::Value> =
        want.keys().map(|k| (k.clone(), "pytorch_model-00001-of-00002.bin".into())).collect();
    map.insert("extra.weight".into(), "pytorch_model-00002-of-00002.bin".into());
    want.extend(expected("second_shard"));
    std::fs::write(
        d.join("pytorch_model.bin.index.json"),
        serde_json::to_vec(&serde_json::json!({"metadata": {}, "weight_map": map})).unwrap(),
    )
    .unwrap();
    for device in ["cpu", "cuda:0"] {
        assert_eq!(digests(&run(&d, device, None)), want, "index {device}");
    }
    // A strided view cannot be one byte range: refused, naming it and the way out.
    let d = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-");
    std::fs::copy(fixture("views.zip.bin"), d.join("pytorch_model.bin")).unwrap();
    let out = run(&d, "cpu", None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tensor 'transposed' is a strided view") && err.contains("tensorlift convert"), "{err}");
    // Only other pickles: not weights.
    let d = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-");
    std::fs::copy(fixture("evil_system.bin"), d.join("training_args.bin")).unwrap();
    let out = run(&d, "cpu", None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("neither pytorch_model.bin nor its index"));
    // A hostile pytorch_model.bin: refused with the global named, nothing run.
    let d = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-");
    std::fs::copy(fixture("evil_system.bin"), d.join("pytorch_model.bin")).unwrap();
    let out = run(&d, "cpu", None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused global 'posix.system'"));
}

/// inspect and convert open PyTorch files under the rules a load applies: links out of
/// the folder and FIFOs are refused (they followed links and blocked on FIFOs before), and
/// a name safetensors cannot hold is refused before anything is written.
#[test]
fn inspect_and_convert_keep_to_the_folder_rules() {
    let outside = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-");
    std::fs::copy(fixture("every_dtype.zip.bin"), outside.join("secret.bin")).unwrap();
    let linked = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-");
    std::os::unix::fs::symlink(outside.join("secret.bin"), linked.join("pytorch_model.bin")).unwrap();
    let fifo = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-");
    assert!(Command::new("mkfifo").arg(fifo.join("pytorch_model.bin")).status().unwrap().success());
    for (dir, want) in [(&linked, "outside the model folder"), (&fifo, "is a FIFO")] {
        for cmd in ["inspect", "convert"] {
            let dst = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-").join("out");
            let mut c = Command::new(env!("CARGO_BIN_EXE_tensorlift"));
            c.arg(cmd).arg(dir);
            if cmd == "convert" {
                c.arg(&dst);
            }
            let out = c.output().unwrap();
            assert_eq!(out.status.code(), Some(1), "{cmd} {}", dir.display());
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(want), "{cmd}: {err}");
            assert!(!dst.exists());
        }
    }
    // One file under two hard-linked names in an index is one file, as a load treats it.
    let d = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-");
    std::fs::copy(fixture("every_dtype.zip.bin"), d.join("a.bin")).unwrap();
    std::fs::hard_link(d.join("a.bin"), d.join("b.bin")).unwrap();
    let names: Vec<String> = expected("every_dtype").into_keys().collect();
    let map: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), if i % 2 == 0 { "a.bin" } else { "./b.bin" }.into()))
        .collect();
    std::fs::write(
        d.join("pytorch_model.bin.index.json"),
        serde_json::to_vec(&serde_json::json!({"weight_map": map})).unwrap(),
    )
    .unwrap();
    let dst = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-").join("out");
    let out = tensorlift(&["convert", s(&d), s(&dst)]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(loaded(&dst), expected("every_dtype"));
    let dst = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-").join("out");
    let out = tensorlift(&["convert", s(&fixture("name_metadata.bin")), s(&dst)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be written as safetensors (nothing was written)"));
    assert!(!dst.exists());
}
