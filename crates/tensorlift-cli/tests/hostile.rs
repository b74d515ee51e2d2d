//! The promises README.md makes about hostile checkpoints, end to end through the binary:
//! no crash, no hang, no memory or descriptors beyond bounds, no output injection.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tensorlift::Dtype;
use tensorlift_testkit::write_shard;

const BIN: &str = env!("CARGO_BIN_EXE_tensorlift");

fn scratch() -> PathBuf {
    tensorlift_testkit::scratch_in(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")), "tl-cli-")
}

/// Runs the binary under a shell's `ulimit` (e.g. `-v 200000` for a 200 MB address space).
fn under_ulimit(limit: &str, args: &[&str]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit {limit} && exec \"$0\" \"$@\""))
        .arg(BIN)
        .args(args)
        .output()
        .unwrap()
}

/// Runs the binary and kills it if it has not finished within `secs`: a hang fails the test.
fn within(secs: u64, args: &[&str]) -> Output {
    let mut child = Command::new(BIN).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("tensorlift {args:?} still running after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A safetensors file as written by hand: the header's length, the header, the data.
fn write_header_file(path: &Path, json: &str, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
    f.write_all(json.as_bytes()).unwrap();
    f.write_all(data).unwrap();
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Defect: under a 200 MB address space, inspecting a header of 1,000,000 tensors aborted
/// ("memory allocation of 72000000 bytes failed"). Allocations sized by a file are fallible.
#[test]
fn a_million_tensors_under_a_memory_limit_is_an_error_not_an_abort() {
    let dir = scratch();
    let path = dir.join("many.safetensors");
    let mut json = String::from("{");
    for i in 0..1_000_000 {
        json.push_str(&format!("\"t{i:07}\":{{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}},"));
    }
    json.pop();
    json.push('}');
    write_header_file(&path, &json, &[]);
    for cmd in ["inspect", "load"] {
        let out = under_ulimit("-v 200000", &[cmd, path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {:?} {}", out.status, stderr(&out));
        let err = stderr(&out);
        assert!(err.starts_with("error: ") && err.contains("many.safetensors"), "{cmd}: {err}");
    }
}

/// Metadata-heavy headers and indexes (1.5 million short entries, or a huge metadata array)
/// under a memory limit: an error, never an abort.
#[test]
fn metadata_heavy_files_under_a_memory_limit_are_errors_not_aborts() {
    let dir = scratch();
    let path = dir.join("meta.safetensors");
    let mut json = String::from("{\"__metadata__\":{");
    for i in 0..1_500_000 {
        json.push_str(&format!("\"k{i}\":\"\","));
    }
    json.pop();
    json.push_str("},\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}");
    write_header_file(&path, &json, &[7]);
    let idx = scratch();
    write_shard(&idx.join("a.safetensors"), &[("w", Dtype::U8, &[1])]);
    let mut index = String::from("{\"metadata\":[");
    for _ in 0..10_000_000 {
        index.push_str("0,");
    }
    index.push_str("0],\"weight_map\":{\"w\":\"a.safetensors\"}}");
    std::fs::write(idx.join("model.safetensors.index.json"), index).unwrap();
    for (limit, args) in [
        ("-v 190000", ["inspect", path.to_str().unwrap()]),
        ("-v 300000", ["load", path.to_str().unwrap()]),
        ("-v 300000", ["inspect", idx.to_str().unwrap()]),
    ] {
        let out = under_ulimit(limit, &args);
        let code = out.status.code();
        assert!(code == Some(1) || code == Some(0), "{args:?} under {limit}: {:?} {}", out.status, stderr(&out));
    }
}

/// Defect: a sparse file whose header claims more bytes than the machine has (a few KB on
/// disk) was loaded until the kernel killed the process. The memory is checked first.
#[test]
fn a_sparse_file_larger_than_memory_is_an_error_not_an_oom_kill() {
    let dir = scratch();
    let path = dir.join("sparse.safetensors");
    let total = tensorlift_io::host_memory_available().expect("meminfo") + (4 << 30);
    let json = format!("{{\"w\":{{\"dtype\":\"U8\",\"shape\":[{total}],\"data_offsets\":[0,{total}]}}}}");
    write_header_file(&path, &json, &[]);
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(8 + json.len() as u64 + total).unwrap();
    let out = within(120, &["load", path.to_str().unwrap(), "--device", "cpu"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{:?} {err}", out.status);
    assert!(err.contains("host memory") && err.contains("sparse.safetensors"), "{err}");
    // The header alone is fine to inspect.
    assert_eq!(within(30, &["inspect", path.to_str().unwrap()]).status.code(), Some(0));
}

/// Defect: 3000 shards failed with EMFILE under `ulimit -n 1024` (every shard was open).
#[test]
fn thousands_of_shards_under_a_descriptor_limit() {
    let dir = scratch();
    let names: Vec<String> = (0..3000).map(|i| format!("w{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        write_shard(&dir.join(format!("s{i:04}.safetensors")), &[(n.as_str(), Dtype::U8, &[3])]);
    }
    for cmd in [&["inspect", dir.to_str().unwrap()][..], &["load", dir.to_str().unwrap(), "--device", "cpu", "--json"]]
    {
        let out = under_ulimit("-n 256", cmd);
        assert_eq!(out.status.code(), Some(0), "{cmd:?}: {}", stderr(&out));
    }
    let out = under_ulimit("-n 256", &["load", dir.to_str().unwrap(), "--device", "cpu", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["bytes"], 9000);
    // With O_DIRECT each shard being read holds two descriptors: still within the limit.
    let out = under_ulimit("-n 128", &["load", dir.to_str().unwrap(), "--device", "cpu", "--direct", "always"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// Defect: names from a checkpoint were printed raw, so a file could write terminal escape
/// sequences or a fake `error:` line.
#[test]
fn names_from_the_file_cannot_write_to_the_terminal() {
    let dir = scratch();
    let evil = "w\x1b[2J\x1b]0;owned\x07\nerror: all is fine\u{9b}\u{202e}";
    let path = dir.join("e.safetensors");
    write_shard(&path, &[(evil, Dtype::U8, &[4]), ("x", Dtype::U8, &[1])]);
    let p = path.to_str().unwrap();
    for args in [&["inspect", p][..], &["load", p, "--device", "cpu", "--digest", "sha256"]] {
        let out = within(30, args);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(!text.contains('\x1b') && !text.contains('\x07'), "{args:?}: {text:?}");
        assert!(!text.lines().any(|l| l.starts_with("error:")), "{args:?}: {text:?}");
        assert!(
            text.contains("w\\u{1b}[2J\\u{1b}]0;owned\\u{7}\\nerror: all is fine\\u{9b}\\u{202e}"),
            "{args:?}: {text:?}"
        );
    }
    // JSON output escapes them too (serde_json alone leaves C1, DEL and bidi characters raw).
    for args in [&["inspect", p, "--json"][..], &["load", p, "--device", "cpu", "--digest", "sha256", "--json"]] {
        let out = within(30, args);
        assert!(out.stdout.is_ascii(), "{args:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v["tensors"].as_array().unwrap().iter().any(|t| t["name"] == evil), "{args:?}");
    }
    // In an error line too: a shard the index names that does not hold the tensor.
    let dir = scratch();
    write_shard(&dir.join("a.safetensors"), &[("x", Dtype::U8, &[1])]);
    tensorlift_testkit::write_index(&dir, &[("x", "a.safetensors"), (evil, "a.safetensors")]);
    let out = within(30, &["inspect", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(!err.contains('\x1b'), "{err:?}");
}

/// Defect: `TENSORLIFT_IO=mmap` reached a SIGBUS when a shard shrank during the load. No flag
/// or variable selects memory maps now.
#[test]
fn mmap_cannot_be_selected_from_outside() {
    let dir = scratch();
    let path = dir.join("m.safetensors");
    write_shard(&path, &[("a", Dtype::F32, &[1000])]);
    let p = path.to_str().unwrap();
    let out = within(30, &["load", p, "--io", "mmap"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("SIGBUS"));
    let out =
        Command::new(BIN).args(["load", p, "--device", "cpu", "--json"]).env("TENSORLIFT_IO", "mmap").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["io"] == "uring" || v["io"] == "pread", "{v}");
}

/// Defect: `doctor --path FIFO` and a load of a FIFO waited forever for a writer.
#[test]
fn fifos_are_refused_not_waited_on() {
    let dir = scratch();
    let fifo = dir.join("model.safetensors");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let f = fifo.to_str().unwrap();
    let out = within(30, &["doctor", "--path", f]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("FIFO"));
    for args in [&["inspect", f][..], &["load", f], &["inspect", dir.to_str().unwrap()]] {
        let out = within(30, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains("FIFO"), "{args:?}: {}", stderr(&out));
    }
}

/// A PyTorch checkpoint is named as one, not as a header of absurd length.
#[test]
fn pytorch_files_say_what_they_are() {
    let dir = scratch();
    let mut zip = b"PK\x03\x04".to_vec();
    zip.resize(104, 0);
    std::fs::write(dir.join("pytorch_model.bin"), &zip).unwrap();
    for p in [dir.clone(), dir.join("pytorch_model.bin")] {
        let out = within(30, &["inspect", p.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("PyTorch"), "{}", stderr(&out));
    }
}

/// Defect: a pickle that appends a list to itself (64 MiB of it) aborted the process under
/// an address-space limit ("memory allocation of 3072006144 bytes failed"). Every
/// allocation its values make is fallible: the same limit is now an error, exit 1.
#[test]
fn a_self_appending_pickle_is_an_error_under_an_address_space_limit() {
    let dir = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-");
    let path = dir.join("self_list.bin");
    // A legacy-layout preamble (magic number, protocol 1001, system information), then a
    // list, memo 0, and 64 MiB of MARK, 1000 references to it, APPENDS.
    let mut p = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.\x80\x02M\xe9\x03.\x80\x02}.".to_vec();
    p.extend_from_slice(b"\x80\x02]q\x00");
    let mut chunk = vec![b'('];
    chunk.extend(std::iter::repeat_n(*b"h\x00", 1000).flatten());
    chunk.push(b'e');
    for _ in 0..(64 << 20) / chunk.len() {
        p.extend_from_slice(&chunk);
    }
    p.extend_from_slice(b".\x80\x02].");
    std::fs::write(&path, &p).unwrap();
    let out = under_ulimit("-v 400000", &["inspect", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("could not be allocated") || err.contains("(pickle_memory_per_byte)"), "{err}");
}
