//! `tensorlift load` end to end: digests match the reference reader, JSON shape, exit codes.

use std::path::Path;
use std::process::{Command, Output};

fn tensorlift(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tensorlift")).args(args).output().unwrap()
}

fn reference_fixture() -> std::path::PathBuf {
    let dir = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/reference/make_fixture.py");
    let out =
        Command::new("python3").arg(script).arg(&dir).output().expect("python3 is needed for the reference tests");
    assert!(out.status.success(), "pip install -r requirements-test.txt: {}", String::from_utf8_lossy(&out.stderr));
    dir
}

#[test]
fn json_digests_match_the_reference_reader() {
    let dir = reference_fixture();
    let manifest: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    for io in ["uring", "pread"] {
        let out = tensorlift(&[
            "load",
            dir.join("sharded").to_str().unwrap(),
            "--device",
            "cpu",
            "--digest",
            "sha256",
            "--json",
            "--io",
            io,
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["device"], "cpu");
        assert_eq!(v["io"], io);
        assert!(v["seconds"].as_f64().unwrap() > 0.0 && v["gbps"].as_f64().unwrap() > 0.0);
        let tensors = v["tensors"].as_array().unwrap();
        let sharded: Vec<_> = manifest.iter().filter(|m| m["file"] != "single.safetensors").collect();
        assert_eq!(tensors.len(), sharded.len());
        assert_eq!(v["bytes"].as_u64().unwrap(), sharded.iter().map(|m| m["nbytes"].as_u64().unwrap()).sum::<u64>());
        for m in sharded {
            let t = tensors.iter().find(|t| t["name"] == m["name"]).unwrap();
            assert_eq!(t["sha256"], m["sha256"], "{io}: {}", m["name"]);
            assert_eq!(t["dtype"], m["dtype"]);
            assert_eq!(t["shape"], m["shape"]);
        }
    }
}

#[test]
fn without_digest_json_has_no_tensor_list() {
    let dir = reference_fixture();
    let out = tensorlift(&["load", dir.join("single.safetensors").to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.get("tensors").is_none());
    assert_eq!(v["bytes"], 540);
    assert!(v["planned_seconds"].as_f64().unwrap() > 0.0, "{v}");
    // Never reading while planning: nothing is read before the plan stands.
    let path = dir.join("single.safetensors");
    let out = tensorlift(&["load", path.to_str().unwrap(), "--json", "--read-while-planning", "never"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["first_read_seconds"].as_f64().unwrap() >= v["planned_seconds"].as_f64().unwrap(), "{v}");
}

#[test]
fn human_output_lists_digest_then_summary() {
    let dir = reference_fixture();
    let out =
        tensorlift(&["load", dir.join("single.safetensors").to_str().unwrap(), "--digest", "sha256", "--filter", "f*"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines.len(), 3 + 3, "{text}");
    assert!(lines[0].ends_with("  f16") && lines[0].len() == 64 + 2 + 3);
    assert!(lines[3].starts_with("loaded 3 tensors"));
}

#[test]
fn unavailable_device_and_bad_input_exit_1() {
    let dir = reference_fixture();
    let p = dir.join("single.safetensors");
    let out = Command::new(env!("CARGO_BIN_EXE_tensorlift"))
        .args(["load", p.to_str().unwrap(), "--device", "cuda:0"])
        .env("TENSORLIFT_LIBCUDA", "/nonexistent/libcuda.so.1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.starts_with("error: ") && err.contains("CUDA") && err.lines().count() == 1, "{err}");
    // A device that does not parse is a usage error.
    let out = tensorlift(&["load", p.to_str().unwrap(), "--device", "tpu"]);
    assert_eq!(out.status.code(), Some(2));
    std::fs::write(dir.join("bad.safetensors"), b"garbage!garbage").unwrap();
    let out = tensorlift(&["load", dir.join("bad.safetensors").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(tensorlift(&["load", p.to_str().unwrap(), "--digest", "md5"]).status.code(), Some(2));
    assert_eq!(tensorlift(&["load", p.to_str().unwrap(), "--io", "floppy"]).status.code(), Some(2));
    // A verified load with a filter reads the shards it takes tensors from whole: with no
    // digest for this one, it fails as any verified load would.
    let out = tensorlift(&["load", p.to_str().unwrap(), "--device", "cpu", "--verify", "--filter", "*"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SHA256SUMS"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = tensorlift(&["load", p.to_str().unwrap(), "--device", "cpu", "--verify=off", "--filter", "*"]);
    assert_eq!(out.status.code(), Some(0));
}

/// `--device cuda:0` (and `auto`, which picks it) loads onto the device; digests, computed
/// by copying back, equal the CPU path's. On the emulated driver unless
/// `TENSORLIFT_TEST_DRIVER=real`.
#[test]
fn cuda_digests_equal_the_cpu_path() {
    let dir = reference_fixture();
    let sharded = dir.join("sharded");
    let run = |device: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tensorlift"));
        cmd.args(["load", sharded.to_str().unwrap(), "--device", device, "--digest", "sha256", "--json"]);
        if !tensorlift_testkit::real_driver() {
            cmd.env("TENSORLIFT_LIBCUDA", tensorlift_testkit::emulated_driver());
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{device}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let cpu = run("cpu");
    for device in ["cuda:0", "auto"] {
        let gpu = run(device);
        assert_eq!(gpu["device"], "cuda:0", "{device}");
        assert_eq!(gpu["tensors"], cpu["tensors"], "{device}");
    }
    // The doctor reports the device's memory and the pinned staging the loader holds.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tensorlift"));
    cmd.args(["doctor", "--json"]);
    if !tensorlift_testkit::real_driver() {
        cmd.env("TENSORLIFT_LIBCUDA", tensorlift_testkit::emulated_driver());
    }
    let v: serde_json::Value = serde_json::from_slice(&cmd.output().unwrap().stdout).unwrap();
    assert_eq!(v["would_use"]["device"], "cuda:0", "{v}");
    assert!(v["would_use"]["device_memory"]["total_bytes"].as_u64().unwrap() > 0, "{v}");
    assert!(v["would_use"]["pinned_staging_bytes"].as_u64().unwrap() > 0, "{v}");
}

/// Runs `tensorlift ARGS` and returns whether it succeeded, its standard output, and its
/// peak resident memory in bytes. Measured by a small Python parent (`ru_maxrss` of its
/// children): a child of this test process would count the test process's own peak, which
/// the kernel carries over into a child that execs from a shared address space.
fn tensorlift_peak_memory(args: &[&str]) -> (bool, Vec<u8>, u64) {
    let script = "import resource, subprocess, sys\n\
                  r = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE)\n\
                  sys.stderr.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n\
                  sys.stdout.buffer.write(r.stdout)\n\
                  sys.exit(r.returncode)\n";
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_tensorlift"))
        .args(args)
        .output()
        .expect("python3 is needed for the reference tests");
    let kib: u64 = String::from_utf8_lossy(&out.stderr).trim().rsplit('\n').next().unwrap().parse().unwrap();
    (out.status.success(), out.stdout, kib * 1024)
}

/// A host load's peak resident memory is its tensors' and the process's own, whether new
/// memory for the cached shard is filled by copy (whose source, the file's mapping, must not
/// stay resident in the process) or read into.
#[test]
fn a_host_loads_peak_memory_is_its_tensors() {
    let dir = tensorlift_testkit::scratch_in(Path::new(env!("CARGO_TARGET_TMPDIR")), "tl-cli-rss-");
    let path = dir.join("big.safetensors");
    let size: usize = 160 << 20;
    tensorlift_testkit::write_shard(&path, &[("w", tensorlift_format::Dtype::U8, &[size])]);
    // Cached: it was just written.
    let p = path.to_str().unwrap();
    let (ok, _, base) = tensorlift_peak_memory(&["inspect", p]);
    assert!(ok);
    for args in
        [&["load", "--device", "cpu", "--json", p][..], &["load", "--device", "cpu", "--json", "--no-fill-by-copy", p]]
    {
        let (ok, stdout, peak) = tensorlift_peak_memory(args);
        assert!(ok, "{args:?}");
        let v: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
        if args.len() == 5 && std::env::var_os("TENSORLIFT_REQUIRE_FILL").is_some() {
            assert_eq!(v["copied_bytes"], v["bytes_read"], "{v}");
        }
        // The tensor, the process as `inspect` needs it, 32 MiB for the load's own, and what
        // each copying thread (one a CPU, 16 at most) maps of the file at once (2 MiB).
        let threads = std::thread::available_parallelism().map_or(16, |n| n.get()).min(16) as u64;
        assert!(
            peak < size as u64 + base + (32 << 20) + threads * (2 << 20),
            "{args:?}: peak {peak} bytes for a {size}-byte tensor (inspect: {base})"
        );
        assert!(peak >= size as u64, "{peak}: the tensor was resident");
    }
}
