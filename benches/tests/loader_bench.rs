//! loader-bench end to end on a small synthetic checkpoint: the report holds every engine
//! and limit with consistent numbers, and bad arguments are refused.

use std::process::Command;

fn bench(args: &[&str], cache: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_loader-bench")).args(args).arg("--cache-dir").arg(cache).output().unwrap()
}

#[test]
fn json_report_has_engines_limits_and_skips() {
    let cache = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = bench(
        &["--synthetic", "24M", "--shards", "3", "--dtype", "mixed", "--runs", "2", "--device", "cpu", "--json"],
        cache.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["checkpoint"]["shards"], 3);
    let bytes = v["checkpoint"]["bytes"].as_u64().unwrap();
    assert!(bytes > 16 << 20 && bytes < 40 << 20, "{bytes}");
    assert_eq!(v["backends"]["device"], "cpu");
    for mode in ["warm", "cold"] {
        let m = &v["modes"][mode];
        for e in ["tensorlift", "std-read", "mmap-copy", "safetensors-crate"] {
            let e = &m["engines"][e];
            assert_eq!(e["bytes"].as_u64(), Some(bytes), "{mode}: every engine moves every tensor byte");
            assert_eq!(e["runs_seconds"].as_array().unwrap().len(), 2);
            assert!(e["gbps"].as_f64().unwrap() > 0.0);
        }
        // Each engine's ratio is its rate over tensorlift's.
        let tl = m["engines"]["tensorlift"]["gbps"].as_f64().unwrap();
        for e in ["std-read", "mmap-copy", "safetensors-crate"] {
            let e = &m["engines"][e];
            let want = e["gbps"].as_f64().unwrap() / tl;
            assert!((e["ratio_to_tensorlift"].as_f64().unwrap() - want).abs() < 1e-9 * want.max(1.0), "{e}");
        }
        let limit = &m["limits"]["read-limit"];
        assert!(limit["bytes"].as_u64().unwrap() >= bytes, "reads whole files");
        assert!(limit["tensorlift_fraction"].as_f64().unwrap() > 0.0);
    }
    // tensorlift's tensors were checked against the files in both modes, and the cold runs
    // began cold.
    let notes: Vec<&str> = v["notes"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    assert!(notes.iter().any(|n| n.contains("checked byte for byte") && n.contains("each of its 4 runs")), "{notes:?}");
    assert_eq!(v["byte_checked"], serde_json::json!({"runs": 4, "of": 4}));
    assert!(notes.iter().any(|n| n.starts_with("cold runs began with at most")), "{notes:?}");
    // No GPU here: the GPU entries say why they did not run.
    assert!(v["skipped"]["per-tensor-htod"].as_str().unwrap().starts_with("no usable GPU: "));
    assert!(v["skipped"]["h2d-limit"].as_str().unwrap().starts_with("no usable GPU: "));
    assert!(v["skipped"]["h2d-limit-streams"].as_str().unwrap().starts_with("no usable GPU: "));
    // The second run reuses the generated checkpoint.
    let out = bench(
        &[
            "--synthetic",
            "24M",
            "--shards",
            "3",
            "--dtype",
            "mixed",
            "--runs",
            "1",
            "--cache",
            "warm",
            "--baselines",
            "none",
        ],
        cache.path(),
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("generating"), "regenerated");
    assert!(text.contains("warm cache") && !text.contains("cold cache") && !text.contains("std-read"), "{text}");
}

#[test]
fn bad_arguments() {
    let cache = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    // Usage errors are 2, as clap's own are: every flag's value is checked by clap.
    for args in [
        &["--baselines", "torch"][..],
        &["--synthetic", "lots"],
        &["--synthetic", "inf"],
        &["--device", "gpu"],
        &["--group", "0"],
        &["--devices", "0"],
    ] {
        let out = bench(args, cache.path());
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // A size below the smallest synthetic checkpoint is said, not made larger.
    let out = bench(&["--synthetic", "1k"], cache.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the smallest synthetic checkpoint is"));
    assert_eq!(bench(&["--dir", "/nonexistent/model"], cache.path()).status.code(), Some(1));
    let out = bench(&["--synthetic", "24M", "--device", "cuda:0"], cache.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CUDA"));
}

/// An error quoting a tensor's name, which the checkpoint chose, prints its escape
/// sequences escaped, not for the terminal to act on.
#[test]
fn a_checkpoints_names_cannot_drive_the_terminal() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    // Two bytes of shape, one of data: refused, naming the tensor.
    let header = br#"{"\u001b]0;PWNED\u0007\u001b[31mevil":{"dtype":"U8","shape":[2],"data_offsets":[0,1]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.push(7);
    let path = dir.path().join("m.safetensors");
    std::fs::write(&path, file).unwrap();
    let out = bench(
        &["--dir", path.to_str().unwrap(), "--device", "cpu", "--runs", "1", "--cache", "warm", "--baselines", "none"],
        dir.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("\\u{1b}]0;PWNED\\u{7}\\u{1b}[31mevil"), "{err}");
    assert!(!err.contains('\u{1b}') && !err.contains('\u{7}'), "{err}");
}

/// A PyTorch checkpoint is measured: the baselines that read safetensors with the reference
/// crate are skipped, saying why, and the one that reads by the plan runs.
#[test]
fn a_pytorch_checkpoint_skips_the_safetensors_baselines() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/tensorlift-pickle/tests/fixtures");
    let path = dir.path().join("weights");
    std::fs::copy(fixture.join("every_dtype.zip.bin"), &path).unwrap();
    let out = bench(
        &["--dir", path.to_str().unwrap(), "--device", "cpu", "--runs", "1", "--cache", "warm", "--json"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for b in ["std-read", "safetensors-crate"] {
        assert!(v["skipped"][b].as_str().unwrap().contains("the checkpoint is a PyTorch one"), "{v}");
    }
    let engines = &v["modes"]["warm"]["engines"];
    assert!(engines["mmap-copy"]["bytes"].as_u64().unwrap() > 0 && engines["tensorlift"].is_object(), "{v}");
}

#[test]
fn idle_memory_is_a_mode_of_its_own() {
    let cache = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = bench(
        &[
            "--synthetic",
            "8M",
            "--runs",
            "1",
            "--device",
            "cpu",
            "--cache",
            "warm",
            "--baselines",
            "none",
            "--idle-secs",
            "1",
            "--json",
        ],
        cache.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let modes: Vec<&String> = v["modes"].as_object().unwrap().keys().collect();
    assert_eq!(modes, ["warm", "warm-idle"]);
    assert!(v["modes"]["warm-idle"]["engines"]["tensorlift"]["gbps"].as_f64().unwrap() > 0.0);
}

#[test]
fn both_copy_limits_are_measured_on_a_device() {
    // The emulated driver (a real one with TENSORLIFT_TEST_DRIVER=real): the limits are
    // copies of memory here, and only their shape is checked.
    let cache = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loader-bench"));
    cmd.args(["--synthetic", "24M", "--runs", "1", "--cache", "warm", "--baselines", "none", "--device", "cuda:0"])
        .args(["--json", "--cache-dir"])
        .arg(cache.path());
    if !tensorlift_testkit::real_driver() {
        cmd.env("TENSORLIFT_LIBCUDA", tensorlift_testkit::emulated_driver());
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let limits = &v["modes"]["warm"]["limits"];
    let bytes = v["checkpoint"]["bytes"].as_u64().unwrap();
    assert!(limits["h2d-limit"]["bytes"].as_u64().unwrap() >= bytes, "{limits}");
    // Several streams, large buffers: at least 4 GiB moved, as nvbandwidth moves.
    assert!(limits["h2d-limit-streams"]["bytes"].as_u64().unwrap() >= 4 << 30, "{limits}");
    assert!(limits["h2d-limit-streams"]["gbps"].as_f64().unwrap() > 0.0, "{limits}");
}

#[test]
fn a_group_of_processes_reads_each_byte_once() {
    // Two processes on the emulated driver's cuda:0 and cuda:1, over its emulated NCCL: the
    // bytes, not the speed (copies of host memory here).
    if tensorlift_testkit::real_driver() {
        return;
    }
    let cache = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let emulator = tensorlift_testkit::emulated_driver();
    let out = Command::new(env!("CARGO_BIN_EXE_loader-bench"))
        .args(["--synthetic", "24M", "--runs", "2", "--cache", "warm", "--baselines", "none", "--group", "2"])
        .args(["--json", "--cache-dir"])
        .arg(cache.path())
        .env("TENSORLIFT_LIBCUDA", &emulator)
        .env("TENSORLIFT_LIBNCCL", &emulator)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bytes = v["checkpoint"]["bytes"].as_u64().unwrap();
    let engines = &v["modes"]["warm"]["engines"];
    let landed = engines["tensorlift"]["bytes"].as_u64().unwrap();
    // Both land every rank's part (the replicated tensors on both ranks).
    assert_eq!(engines["per-rank"]["bytes"].as_u64(), Some(landed), "{engines}");
    assert!(landed > bytes && landed < bytes * 2, "{landed} of {bytes}");
    assert_eq!(engines["tensorlift"]["runs_seconds"].as_array().unwrap().len(), 2);
    // What the ranks read: the checkpoint once together (give or take a few pages), more alone.
    let read = |name: &str| -> Vec<u64> {
        stderr
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map(|l| l.split(" the ranks read ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap())
            .collect()
    };
    let (together, alone) = (read("tensorlift"), read("per-rank"));
    assert_eq!((together.len(), alone.len()), (2, 2), "{stderr}");
    for (t, a) in together.iter().zip(&alone) {
        assert!(*t >= bytes && *t < bytes + (1 << 20), "together {t} of {bytes}");
        assert!(*a > *t + bytes / 8, "alone {a}, together {t}");
    }
}

/// A shard another process keeps mapped stays in the page cache whatever the eviction: a
/// cold run then fails, saying so, rather than report a warm figure as a cold one.
#[test]
fn a_cold_run_that_cannot_start_cold_fails() {
    let cache = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let args = ["--synthetic", "8M", "--shards", "2", "--runs", "1", "--device", "cpu", "--baselines", "none"];
    let out = bench(&[&args[..], &["--cache", "warm"]].concat(), cache.path());
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let mut shards: Vec<std::path::PathBuf> =
        walk(cache.path()).into_iter().filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect();
    shards.sort();
    assert_eq!(shards.len(), 2, "{shards:?}");
    // This process maps the first shard and touches every page of it.
    let r = tensorlift_io::Reader::builder().backend(tensorlift_io::BackendKind::Pread).pread_threads(1).build();
    let file = r.open_with(&shards[0], false).unwrap();
    let map = tensorlift_io::MappedFile::map(&file).unwrap();
    let mut all = vec![0u8; std::fs::metadata(&shards[0]).unwrap().len() as usize];
    map.copy_to(0, &mut all).unwrap();
    let out = bench(&[&args[..], &["--cache", "cold"]].concat(), cache.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("still in the page cache after eviction"), "{err}");
    drop(map);
    // Unmapped, it can be evicted: the same run succeeds.
    let out = bench(&[&args[..], &["--cache", "cold"]].concat(), cache.path());
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
