//! The command line does what its documentation says: variables and flags, exit codes,
//! pipes, errors, and what `load --json` and `doctor` report.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use tensorlift::Dtype;
use tensorlift_testkit::write_shard;

const BIN: &str = env!("CARGO_BIN_EXE_tensorlift");

fn scratch() -> PathBuf {
    tensorlift_testkit::scratch_in(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")), "tl-cli-")
}

/// Runs the binary with no usable GPU (whatever this machine has) and these variables.
fn run(env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("TENSORLIFT_LIBCUDA", "/nonexistent/libcuda.so.1")
        .env_remove("TENSORLIFT_DEVICE")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn model() -> PathBuf {
    let dir = scratch();
    let path = dir.join("m.safetensors");
    write_shard(&path, &[("a.weight", Dtype::F32, &[64]), ("b.weight", Dtype::U8, &[100])]);
    path
}

#[test]
fn the_device_variable_works_and_the_flag_wins() {
    let m = model();
    let p = m.to_str().unwrap();
    let out = run(&[("TENSORLIFT_DEVICE", "cuda:0")], &["load", p]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("CUDA device 0 is unavailable"), "{}", stderr(&out));
    let out = run(&[("TENSORLIFT_DEVICE", "cuda:0")], &["load", p, "--device", "cpu", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run(&[("TENSORLIFT_DEVICE", "cpu")], &["load", p, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["device_reason"], "TENSORLIFT_DEVICE=cpu");
    // A bad value in the variable is an error naming it; a bad flag is a usage error.
    let out = run(&[("TENSORLIFT_DEVICE", "gpu")], &["load", p]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("TENSORLIFT_DEVICE=gpu"), "{}", stderr(&out));
    let out = run(&[], &["load", p, "--device", "gpu"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn doctor_reports_device_problems_instead_of_failing() {
    for (value, expect) in [("cuda:0", "CUDA device 0 is unavailable"), ("gpu", "TENSORLIFT_DEVICE=gpu")] {
        let out = run(&[("TENSORLIFT_DEVICE", value)], &["doctor", "--json"]);
        assert_eq!(out.status.code(), Some(0), "{value}: {}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v["would_use"]["device_reason"].as_str().unwrap().contains(expect), "{value}: {v}");
        assert!(v["memlock"]["note"].is_string(), "{v}");
    }
    let out = run(&[("TENSORLIFT_DEVICE", "cpu")], &["doctor", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["would_use"]["device"], "cpu");
    assert_eq!(v["would_use"]["device_reason"], "TENSORLIFT_DEVICE=cpu");
    let out = run(&[], &["doctor", "--path", "/nonexistent/models"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("/nonexistent/models"), "{}", stderr(&out));
}

#[test]
fn a_closed_pipe_is_a_quiet_success() {
    let dir = scratch();
    let names: Vec<String> = (0..20_000).map(|i| format!("tensor.{i}")).collect();
    let specs: Vec<_> = names.iter().map(|n| (n.as_str(), Dtype::U8, &[1usize][..])).collect();
    let path = dir.join("many.safetensors");
    write_shard(&path, &specs);
    for args in [&["inspect", path.to_str().unwrap(), "--json"][..], &["inspect", path.to_str().unwrap()]] {
        let mut child = Command::new(BIN).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut first = [0u8; 10];
        child.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(out.stderr.is_empty(), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn errors_say_each_thing_once() {
    let out = run(&[], &["inspect", "/nonexistent/x.safetensors"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_filter_that_matches_nothing_is_an_error() {
    let m = model();
    let out = run(&[], &["load", m.to_str().unwrap(), "--device", "cpu", "--filter", "nope.*"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no tensor matches the filter 'nope.*'"), "{}", stderr(&out));
}

#[test]
fn load_json_says_what_it_did() {
    let m = model();
    let out = run(&[], &["load", m.to_str().unwrap(), "--device", "cpu", "--json", "--direct", "never"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tensors_loaded"], 2);
    assert_eq!(v["bytes"], 64 * 4 + 100);
    assert_eq!((v["direct_shards"].as_u64(), v["buffered_shards"].as_u64()), (Some(0), Some(1)));
    for key in ["device_reason", "io_reason"] {
        assert!(!v[key].as_str().unwrap().is_empty(), "{key}: {v}");
    }
    // Text output: one unit for data sizes, no article typos.
    let out = run(&[], &["load", m.to_str().unwrap(), "--device", "cpu"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(" GB in ") && text.contains("GB/s"), "{text}");
}

/// The tuning flags take whole MiB, at least one: 0 (which the loader would round up to
/// reads of one page) and values past a usize are usage errors naming the flag.
#[test]
fn tuning_flags_refuse_zero_and_overflow() {
    let m = model();
    let p = m.to_str().unwrap();
    for flag in ["--chunk-mib", "--budget-mib"] {
        for value in ["0", "18446744073709551615"] {
            let out = run(&[], &["load", p, "--device", "cpu", flag, value]);
            assert_eq!(out.status.code(), Some(2), "{flag} {value}: {}", stderr(&out));
            assert!(stderr(&out).contains(flag), "{flag} {value}: {}", stderr(&out));
        }
        let out = run(&[], &["load", p, "--device", "cpu", flag, "1"]);
        assert_eq!(out.status.code(), Some(0), "{flag} 1: {}", stderr(&out));
    }
}
