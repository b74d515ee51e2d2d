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
    let names = |conditional: bool| -> HashSet<String> {
        v["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["action"] == "SCMP_ACT_ALLOW" && (conditional || g.get("args").is_none()))
            .flat_map(|g| g["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_owned()))
            .collect()
    };
    // Allowed whatever the arguments; and allowed at all (some only with certain arguments).
    let (allowed, allowed_at_all) = (names(false), names(true));
    for n in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
        assert!(allowed.contains(n), "{n}");
    }
    for n in repo("docker/observed-syscalls.txt").lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        assert!(allowed_at_all.contains(n), "observed syscall {n} is not allowed");
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
    // userfaultfd only with UFFD_USER_MODE_ONLY (flags & 1 == 1): a descriptor whose faults
    // taken by the kernel could be made to wait stays denied.
    let uffd: Vec<_> = v["syscalls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["names"].as_array().unwrap().iter().any(|n| n == "userfaultfd"))
        .collect();
    assert_eq!(uffd.len(), 1);
    assert_eq!(uffd[0]["action"], "SCMP_ACT_ALLOW");
    assert_eq!(uffd[0]["names"], serde_json::json!(["userfaultfd"]));
    assert_eq!(
        uffd[0]["args"],
        serde_json::json!([{"index": 0, "value": 1, "valueTwo": 1, "op": "SCMP_CMP_MASKED_EQ"}])
    );
}

#[test]
fn compose_mounts_the_model_read_only_with_the_profile() {
    let c = repo("docker/compose.yaml");
    assert!(c.contains(":/models:ro"));
    assert!(c.contains("seccomp=./seccomp-io-uring.json"));
    assert!(c.contains("memlock: -1"));
    assert!(c.contains("loader-bench"));
}

#[test]
fn default_profile_plus_io_uring_is_made_at_use_time() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    // Shaped like Docker's default: allow rules, one conditional on arguments, no io_uring.
    let input = serde_json::json!({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["io_uring_setup"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
    ]});
    let path = dir.path().join("default.json");
    std::fs::write(&path, input.to_string()).unwrap();
    let out = std::process::Command::new("python3")
        .arg(root.join("docker/seccomp-from-default.py"))
        .arg("--input")
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["defaultAction"], "SCMP_ACT_ERRNO");
    assert_eq!(v["syscalls"][0], input["syscalls"][0]);
    assert_eq!(v["syscalls"][1], input["syscalls"][1]);
    assert_eq!(v["syscalls"][2]["names"], serde_json::json!(["io_uring_enter", "io_uring_register", "io_uring_setup"]));
    assert_eq!(v["syscalls"][2]["action"], "SCMP_ACT_ALLOW");
    assert_eq!(v["syscalls"][3]["names"], serde_json::json!(["userfaultfd"]));
    assert_eq!(v["syscalls"][3]["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
    assert_eq!(v["syscalls"].as_array().unwrap().len(), 4);
}
