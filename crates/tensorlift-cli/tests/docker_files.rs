//! The Docker files stay true: the image builds with CI's command, and the seccomp profile
//! allows io_uring and everything the binaries were seen to call, and nothing privileged.

use std::collections::HashSet;
use std::path::Path;

fn repo(p: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(p)).unwrap()
}

#[test]
fn image_builds_with_the_command_ci_runs() {
    let dockerfile = repo("docker/Dockerfile");
    let ci = repo(".ci/run");
    let build = dockerfile.lines().find_map(|l| l.strip_prefix("RUN cargo build")).expect("a cargo build step");
    let command = format!("cargo build{build}");
    assert!(ci.lines().any(|l| l.trim() == command), "CI does not run `{command}`");
    assert!(dockerfile.contains("USER tensorlift"), "runs as a non-root user");
    assert!(dockerfile.contains(r#"CMD ["tensorlift", "doctor""#));
}

#[test]
fn seccomp_profile_allows_io_uring_and_what_we_use() {
    let v: serde_json::Value = serde_json::from_str(&repo("docker/seccomp-io-uring.json")).unwrap();
    assert_eq!(v["defaultAction"], "SCMP_ACT_ERRNO");
    let allowed: HashSet<String> = v["syscalls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["action"] == "SCMP_ACT_ALLOW")
        .flat_map(|g| g["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_owned()))
        .collect();
    for n in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
        assert!(allowed.contains(n), "{n}");
    }
    for n in repo("docker/observed-syscalls.txt").lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        assert!(allowed.contains(n), "observed syscall {n} is not allowed");
    }
    for n in [
        "mount",
        "umount2",
        "pivot_root",
        "bpf",
        "ptrace",
        "kexec_load",
        "init_module",
        "unshare",
        "setns",
        "keyctl",
        "perf_event_open",
        "userfaultfd",
        "reboot",
    ] {
        assert!(!allowed.contains(n), "{n} must stay denied");
    }
}

#[test]
fn compose_mounts_the_model_read_only_with_the_profile() {
    let c = repo("docker/compose.yaml");
    assert!(c.contains(":/models:ro"));
    assert!(c.contains("seccomp=./seccomp-io-uring.json"));
    assert!(c.contains("memlock: -1"));
    assert!(c.contains("loader-bench"));
}
