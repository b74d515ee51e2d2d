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

/// name -> sha256 of each tensor the reference `safetensors` (with torch, from the test
/// environment's python3) reads from the files `convert` wrote in `dir`, following its index.
fn by_reference(dir: &Path) -> BTreeMap<String, String> {
    let script = "import hashlib, json, os, sys, torch\n\
                  from safetensors import safe_open\n\
                  d = sys.argv[1]\n\
                  index = os.path.join(d, 'model.safetensors.index.json')\n\
                  files = sorted(set(json.load(open(index))['weight_map'].values())) if os.path.exists(index) \
                  else ['model.safetensors']\n\
                  got = {}\n\
                  for f in files:\n\
                  \x20   with safe_open(os.path.join(d, f), framework='pt') as st:\n\
                  \x20       for k in st.keys():\n\
                  \x20           t = st.get_tensor(k).contiguous().reshape(-1).view(torch.uint8)\n\
                  \x20           got[k] = hashlib.sha256(t.numpy().tobytes()).hexdigest()\n\
                  print(json.dumps(got))\n";
    let out = Command::new("python3").args(["-c", script, s(dir)]).output().expect("python3 is needed");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
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
            // And as the reference reads what convert wrote, its index followed.
            assert_eq!(by_reference(&dst), expected("every_dtype"), "{file} {max}: the reference's reading");
            for shard in std::fs::read_dir(&dst).unwrap().map(|e| e.unwrap().path()) {
                if shard.extension().is_some_and(|e| e == "safetensors") {
                    assert_aligned(&shard);
                }
            }
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
        // The reference writer's metadata and `convert.py`'s record of the name removed, as
        // the reference reads them; and the tensors, as it reads them.
        let script = "import hashlib, json, sys\n\
                      from safetensors import safe_open\n\
                      with safe_open(sys.argv[1], framework='np') as f:\n\
                      \x20   got = {k: hashlib.sha256(f.get_tensor(k).tobytes()).hexdigest() for k in f.keys()}\n\
                      \x20   print(json.dumps({'metadata': f.metadata(), 'tensors': got}))\n";
        let model = dst.join("model.safetensors");
        let out = Command::new("python3").args(["-c", script, s(&model)]).output().expect("python3 is needed");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["metadata"], serde_json::json!({"format": "pt", "lm_head.weight": "embed.weight"}), "{file}");
        let by_reference: BTreeMap<String, String> = serde_json::from_value(v["tensors"].clone()).unwrap();
        assert_eq!(by_reference, want, "{file}");
        assert_aligned(&model);
    }
}

/// Tied weights are kept under the first of their names in sorted order, as `convert.py`
/// keeps `sorted(names)[0]`, whatever order torch.save wrote them in; a file torch.save
/// writes here (torch from the test environment).
#[test]
fn tied_weights_keep_their_first_name_in_sorted_order() {
    let d = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-");
    let src = d.join("tied.bin");
    let script = "import sys, torch\n\
                  t = torch.arange(6, dtype=torch.float32)\n\
                  torch.save({'z.weight': t, 'b': torch.ones(3, dtype=torch.float16), 'a.weight': t}, sys.argv[1])\n";
    let out = Command::new("python3").args(["-c", script, s(&src)]).output().expect("python3 is needed");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dst = d.join("out");
    let out = tensorlift(&["convert", s(&src), s(&dst)]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("tied: 'z.weight' shares its data with 'a.weight'"), "{text}");
    let model = dst.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"], serde_json::json!({"format": "pt", "z.weight": "a.weight"}));
    assert!(header.get("z.weight").is_none() && header.get("a.weight").is_some(), "{header}");
    // F32 before F16 (the reference's layout), whatever the state_dict's order.
    assert_eq!(header["a.weight"]["data_offsets"], serde_json::json!([0, 24]));
    assert_eq!(header["b"]["data_offsets"], serde_json::json!([24, 30]));
}

/// A tensor larger than the 8 MiB buffer `convert` copies through comes out whole, as
/// torch.load reads the source and the reference safetensors reads the output.
#[test]
fn a_tensor_larger_than_the_copy_buffer_is_written_whole() {
    let d = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-");
    let (src, dst) = (d.join("big.bin"), d.join("out"));
    let save = "import sys, torch\n\
                g = torch.Generator().manual_seed(5)\n\
                big = torch.randn(3 << 20, generator=g)\n\
                torch.save({'big': big, 'part': big[5:3000000], 'small': torch.arange(7)}, sys.argv[1])\n";
    let out = Command::new("python3").args(["-c", save, s(&src)]).output().expect("python3 is needed");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = tensorlift(&["convert", s(&src), s(&dst)]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let check = "import sys, torch\n\
                 from safetensors.torch import load_file\n\
                 want = torch.load(sys.argv[1], weights_only=True)\n\
                 got = load_file(sys.argv[2])\n\
                 assert sorted(got) == sorted(want), (sorted(got), sorted(want))\n\
                 assert all(torch.equal(got[k], want[k]) for k in want)\n\
                 print('same')\n";
    let model = dst.join("model.safetensors");
    let out = Command::new("python3").args(["-c", check, s(&src), s(&model)]).output().expect("python3 is needed");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "same\n", "{}", String::from_utf8_lossy(&out.stderr));
}

/// Every tensor's data in a safetensors file starts at a multiple of its element size (the
/// reference writer's layout, which zero-copy readers need).
fn assert_aligned(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    for (name, t) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let width = match t["dtype"].as_str().unwrap() {
            "F64" | "I64" | "U64" | "C64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            _ => 1,
        };
        let start = 8 + n as u64 + t["data_offsets"][0].as_u64().unwrap();
        assert_eq!(start % width, 0, "{}: '{name}' ({}) starts at byte {start}", path.display(), t["dtype"]);
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
    // A file is told by its bytes, as `load` tells it, not by its name: a PyTorch zip with
    // no extension is inspected as PyTorch, and a safetensors file named `.bin` as
    // safetensors.
    std::fs::copy(fixture("views.zip.bin"), d.join("weights")).unwrap();
    let out = tensorlift(&["inspect", "--json", s(&d.join("weights"))]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["format"], "pytorch");
    tensorlift_testkit::write_shard(&d.join("st.bin"), &[("w", tensorlift::Dtype::F32, &[3, 2])]);
    let out = tensorlift(&["inspect", "--json", s(&d.join("st.bin"))]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["tensors"][0]["name"].as_str(), v["format"].as_str()), (Some("w"), None), "{v}");
    let out = tensorlift(&["load", "--json", "--device", "cpu", s(&d.join("st.bin"))]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
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

/// A legacy-layout PyTorch file of one FloatStorage '0' of `numel` elements, of which only
/// `(element, value)` are written (the rest is a hole in a sparse file), and one tensor
/// `w` over it with `shape` and `stride`.
fn sparse_legacy(path: &Path, numel: u64, values: &[(u64, f32)], shape: &[u64], stride: &[u64]) {
    use std::io::{Seek, SeekFrom, Write};
    let long = |v: u64| -> Vec<u8> {
        let mut b = vec![0x8a, 8];
        b.extend_from_slice(&v.to_le_bytes());
        b
    };
    let tuple = |v: &[u64]| -> Vec<u8> {
        let mut b = vec![b'('];
        v.iter().for_each(|&x| b.extend(long(x)));
        b.push(b't');
        b
    };
    let mut p = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.\x80\x02M\xe9\x03.\x80\x02}.".to_vec();
    p.extend_from_slice(b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(");
    p.extend_from_slice(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x06\x00\x00\x00cuda:0");
    p.extend(long(numel));
    p.extend_from_slice(b"NtQK\x00");
    p.extend(tuple(shape));
    p.extend(tuple(stride));
    p.extend_from_slice(b"\x89}tRs.\x80\x02]X\x01\x00\x00\x000a.");
    p.extend_from_slice(&numel.to_le_bytes());
    let data = p.len() as u64;
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&p).unwrap();
    f.set_len(data + numel * 4).unwrap();
    for &(e, v) in values {
        f.seek(SeekFrom::Start(data + e * 4)).unwrap();
        f.write_all(&v.to_le_bytes()).unwrap();
    }
}

fn sha256_of(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Defect: a view of two elements whose stride spans a 1 GiB storage (8 KB on disk) made
/// `convert` read the whole span (1.05 GB resident; an OOM kill in a 1 GiB cgroup). Now the
/// view, spread wide, is gathered through a window that moves forward, within a 300 MB
/// address space.
#[test]
fn a_sparse_strided_view_converts_in_bounded_memory() {
    let d = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-");
    let numel = 1u64 << 28;
    let src = d.join("sparse.bin");
    sparse_legacy(&src, numel, &[(0, 1.5), (numel - 1, -2.0)], &[2], &[numel - 1]);
    let dst = d.join("out");
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 300000 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_tensorlift"))
        .args(["convert", s(&src), s(&dst)])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let want: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(loaded(&dst), BTreeMap::from([("w".to_owned(), sha256_of(&want))]));
}

/// Defect: an empty tensor of shape [0, 2^62, 2] converted (exit 0) into a file the
/// reference cannot read ("Stride calculation overflowed"). Now it is refused by name, and
/// nothing is written.
#[test]
fn shapes_the_reference_cannot_hold_are_refused() {
    let d = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-");
    let src = d.join("huge_empty.bin");
    sparse_legacy(&src, 4, &[], &[0, 1 << 62, 2], &[1, 1, 1]);
    let dst = d.join("out");
    let out = tensorlift(&["convert", s(&src), s(&dst)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tensor 'w' of shape [0, 4611686018427387904, 2] cannot be written"), "{err}");
    assert!(!dst.exists());
    assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1, "only the source is left");
}

/// A convert killed mid-way (an OOM kill, say) leaves its staging folder behind; the next
/// convert into the same destination recognises it (its process is gone, and no one holds
/// its lock) and removes it, and leaves alone one whose process still runs, one whose lock
/// is held (a live convert in another PID namespace, or on another host), and a name that
/// is not a staging folder's.
#[test]
fn folders_left_by_a_killed_convert_are_removed_by_the_next() {
    let d = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-");
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let stale = d.join(format!(".out.partial-{dead}"));
    let running = d.join(format!(".out.partial-{}", std::process::id()));
    let elsewhere = d.join(format!(".out.partial-{dead}-7"));
    let hostile = d.join(format!(".out.partial-{dead}-\u{1b}]0;pwned\u{7}"));
    for dir in [&stale, &running, &elsewhere, &hostile] {
        std::fs::create_dir(dir).unwrap();
        std::fs::write(dir.join("model.safetensors"), b"half written").unwrap();
    }
    let held = std::fs::File::open(&elsewhere).unwrap();
    assert!(tensorlift_io::try_lock(&held, false));
    let out = tensorlift(&["convert", s(&fixture("every_dtype.zip.bin")), s(&d.join("out"))]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("left by an interrupted convert (process {dead})")), "{text}");
    assert!(!stale.exists());
    assert!(running.exists() && elsewhere.exists() && hostile.exists());
    assert_eq!(loaded(&d.join("out")), expected("every_dtype"));
    // A destination whose name holds a terminal escape: the stale folder's name, printed as
    // it is removed, is escaped.
    let name = "o\u{1b}]0;pwned\u{7}";
    let stale = d.join(format!(".{name}.partial-{dead}"));
    std::fs::create_dir(&stale).unwrap();
    let out = tensorlift(&["convert", s(&fixture("every_dtype.zip.bin")), s(&d.join(name))]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("left by an interrupted convert") && text.contains("\\u{1b}"), "{text}");
    assert!(!text.contains('\u{1b}') && !stale.exists(), "{text}");
}

/// Defect: convert wrote into a staging folder that was already there (`create_dir_all`
/// of `.out.partial-PID`): a folder left with other files under a reused process id put
/// them in the output, and a link there sent the output elsewhere, DST becoming that link.
/// The staging folder is always made new, at the first free name; DST given as a link, or
/// as `.`, is refused before anything is written.
#[test]
fn convert_stages_in_a_folder_of_its_own_and_writes_only_there() {
    let d = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-");
    let elsewhere = d.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    // Planted at the names this convert would take, and at the one it took before: its
    // process id is the shell's ($$), which exec hands over.
    let script = r#"ln -s "$1" ".out.partial-$$" && ln -s "$1" ".out.partial-$$-0" && mkdir ".out.partial-$$-1" && echo junk > ".out.partial-$$-1/model-00009-of-00009.safetensors" && exec "$2" convert "$3" out"#;
    let out = Command::new("bash")
        .args(["-c", script, "_", s(&elsewhere), env!("CARGO_BIN_EXE_tensorlift"), s(&fixture("every_dtype.zip.bin"))])
        .current_dir(&d)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let written = d.join("out");
    assert!(std::fs::symlink_metadata(&written).unwrap().is_dir());
    let names: Vec<_> = std::fs::read_dir(&written).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["model.safetensors"]);
    assert_eq!(loaded(&written), expected("every_dtype"));
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);

    // DST a link to an empty folder, a dangling link, or `.`: refused, nothing written.
    let empty = d.join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::os::unix::fs::symlink(&empty, d.join("lnk")).unwrap();
    std::os::unix::fs::symlink(d.join("nowhere"), d.join("dangling")).unwrap();
    for (dst, says) in [("lnk", "symbolic link"), ("dangling", "symbolic link"), (".", "name the folder")] {
        let out = Command::new(env!("CARGO_BIN_EXE_tensorlift"))
            .args(["convert", s(&fixture("every_dtype.zip.bin")), dst])
            .current_dir(&d)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{dst}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(says), "{dst}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stdout.is_empty(), "{dst}: {}", String::from_utf8_lossy(&out.stdout));
    }
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
    assert!(!d.join("nowhere").exists());
}

/// A checkpoint that nests its state_dict (as Lightning's do) has no tensor at its top:
/// `convert` says so and writes nothing, rather than an empty model; values beside
/// top-level tensors are named as not written.
#[test]
fn a_nested_state_dict_is_refused_by_convert_and_other_values_are_named() {
    let dir = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-");
    let script = "import sys, torch\n\
        w = torch.arange(6, dtype=torch.float32)\n\
        torch.save({'state_dict': {'w': w}, 'epoch': 3}, sys.argv[1] + '/nested.pt')\n\
        torch.save({'w': w, 'step': 5}, sys.argv[1] + '/beside.pt')\n";
    let made = std::process::Command::new("python3").args(["-c", script]).arg(&dir).output().unwrap();
    assert!(made.status.success(), "torch writes them: {}", String::from_utf8_lossy(&made.stderr));
    let out = tensorlift(&["convert", s(&dir.join("nested.pt")), s(&dir.join("nested-out"))]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no tensors to convert") && err.contains("state_dict, epoch"), "{err}");
    assert!(!dir.join("nested-out").exists());
    // Loaded, it is an error too, not a model of no tensors.
    let out = tensorlift(&["load", "--device", "cpu", s(&dir.join("nested.pt"))]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("only other values (state_dict, epoch): a state_dict nested under a key is not read"),
        "{err}"
    );
    let out = tensorlift(&["convert", s(&dir.join("beside.pt")), s(&dir.join("beside-out"))]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("not tensors, not written: step") && text.contains("1 tensors"), "{text}");
    assert_eq!(loaded(&dir.join("beside-out")).len(), 1);
}

/// `convert` reads local files: a URL is refused as one, with its credentials left out, and
/// nothing is written.
#[test]
fn convert_refuses_a_url_without_echoing_its_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("out");
    let out = tensorlift(&["convert", "https://user:s3cr3t-T0KEN@example.com/m/pytorch_model.bin", s(&dst)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("convert reads local PyTorch files; download them first (nothing was written)"), "{err}");
    assert!(!err.contains("s3cr3t-T0KEN"), "{err}");
    assert!(!dst.exists());
}
