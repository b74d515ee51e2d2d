//! `tensorlift doctor`: reports every fact, honours the overrides, never fails for a
//! missing GPU.

use std::process::Command;

fn doctor(env: &[(&str, &str)], args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tensorlift"))
        .arg("doctor")
        .arg("--json")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn reports_every_fact() {
    let dir = tempfile::tempdir().unwrap();
    let v = doctor(&[], &["--path", dir.path().to_str().unwrap()]);
    for key in ["kernel", "gpu", "nccl", "io_uring", "o_direct", "memlock", "would_use"] {
        assert!(!v[key].is_null(), "{key} missing: {v}");
    }
    if v["gpu"]["available"] == false {
        assert!(!v["gpu"]["reason"].as_str().unwrap().is_empty());
        assert_eq!(v["would_use"]["device"], "cpu");
    }
    assert_eq!(v["o_direct"]["path"], dir.path().to_str().unwrap());
    assert_eq!(v["would_use"]["read_while_planning"], "auto");
    // Filling by copy: available, or why not (the test command requires it where the
    // kernel has user-mode userfaultfd).
    match v["fill_by_copy"]["available"].as_bool() {
        Some(true) => assert!(v["fill_by_copy"].get("reason").is_none()),
        Some(false) => {
            assert!(!v["fill_by_copy"]["reason"].as_str().unwrap().is_empty(), "{v}");
            assert!(std::env::var_os("TENSORLIFT_REQUIRE_FILL").is_none(), "filling by copy required: {v}");
        }
        None => panic!("fill_by_copy missing: {v}"),
    }
    // The probe's scratch file is gone afterwards.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn overrides_are_honoured_and_explained() {
    let v = doctor(&[("TENSORLIFT_IO", "pread")], &[]);
    assert_eq!(v["would_use"]["io"], "pread");
    assert!(v["would_use"]["io_reason"].as_str().unwrap().contains("TENSORLIFT_IO=pread"));
    let v = doctor(&[("TENSORLIFT_LIBCUDA", "/nonexistent/libcuda.so.1")], &[]);
    assert_eq!(v["gpu"]["available"], false);
    assert!(v["gpu"]["reason"].as_str().unwrap().contains("/nonexistent/libcuda.so.1"));
}

#[test]
fn nccl_is_reported_where_it_loads_and_explained_where_not() {
    let v = doctor(&[("TENSORLIFT_LIBNCCL", "/nonexistent/libnccl.so.2")], &[]);
    assert_eq!(v["nccl"]["available"], false, "{v}");
    let why = v["nccl"]["reason"].as_str().unwrap();
    assert!(why.contains("/nonexistent/libnccl.so.2") && why.contains("TENSORLIFT_LIBNCCL"), "{why}");
    // The emulated driver carries an emulated NCCL (2.28.0).
    let emulator = tensorlift_testkit::emulated_driver();
    let v = doctor(&[("TENSORLIFT_LIBNCCL", emulator.to_str().unwrap())], &[]);
    assert_eq!(v["nccl"]["available"], true, "{v}");
    assert_eq!(v["nccl"]["version"], "2.28.0");
    assert_eq!(v["nccl"]["library"], emulator.to_str().unwrap());
}

/// A device that reads pageable memory through the host's page tables (Grace Hopper) is
/// said to read warm shards into staging: registering does not pin there.
#[test]
fn a_device_reading_through_host_page_tables_is_described() {
    let emulator = tensorlift_testkit::emulated_driver();
    let lib = emulator.to_str().unwrap();
    for (on, text) in [("0", "warm shards copy by DMA"), ("1", "the device reads pageable memory through the host's")] {
        let env = [("TENSORLIFT_LIBCUDA", lib), ("TLEMU_DEVICES", "1"), ("TLEMU_HOST_PAGE_TABLES", on)];
        let v = doctor(&env, &[]);
        assert_eq!(v["gpu"]["devices"][0]["host_page_tables"], on == "1", "{v}");
        let out = Command::new(env!("CARGO_BIN_EXE_tensorlift")).arg("doctor").envs(env).output().unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains(text), "{}", String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn a_driver_with_devices_is_described() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("fake.c");
    std::fs::write(
        &src,
        r#"#include <string.h>
#include <stddef.h>
int cuInit(unsigned f) { return 0; }
int cuDriverGetVersion(int *v) { *v = 12080; return 0; }
int cuDeviceGetCount(int *c) { *c = 1; return 0; }
int cuDeviceGet(int *d, int o) { *d = o; return 0; }
int cuDeviceGetName(char *n, int l, int d) { strncpy(n, "Fake GPU", l); return 0; }
int cuDeviceTotalMem_v2(size_t *m, int d) { *m = (size_t)80 << 30; return 0; }
"#,
    )
    .unwrap();
    let so = dir.path().join("libcuda.so.1");
    let cc = Command::new("cc").args(["-shared", "-fPIC", "-o"]).arg(&so).arg(&src).output().expect("cc is needed");
    assert!(cc.status.success());
    let v = doctor(&[("TENSORLIFT_LIBCUDA", so.to_str().unwrap())], &[]);
    assert_eq!(v["gpu"]["available"], true);
    assert_eq!(v["gpu"]["driver_version"], "12.8");
    assert_eq!(v["gpu"]["devices"][0]["name"], "Fake GPU");
    assert_eq!(v["gpu"]["devices"][0]["memory_bytes"], 80u64 << 30);
    // This stand-in answers the probe but lacks the functions loads call: auto falls back to
    // the host and says why.
    assert_eq!(v["would_use"]["device"], "cpu");
    assert!(v["would_use"]["device_reason"].as_str().unwrap().starts_with("auto: "), "{v}");
    let human =
        Command::new(env!("CARGO_BIN_EXE_tensorlift")).arg("doctor").env("TENSORLIFT_LIBCUDA", &so).output().unwrap();
    let text = String::from_utf8(human.stdout).unwrap();
    assert!(text.contains("cuda:0 Fake GPU, 80.0 GiB"), "{text}");
}

/// A C program that runs a command as `nobody` under a seccomp filter (one that allows
/// everything), as in a container: `cachestat` is not tried under a filter, and `mincore`
/// hides from a process which pages of a file it neither owns nor may write are cached.
const SANDBOX_C: &str = r#"
#define _GNU_SOURCE
#include <linux/filter.h>
#include <grp.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct sock_filter allow[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
    struct sock_fprog prog = {1, allow};
    if (argc < 2) return 2;
    if (setgroups(0, NULL) || setresgid(65534, 65534, 65534) || setresuid(65534, 65534, 65534)) {
        perror("setresuid");
        return 77;
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) {
        perror("seccomp");
        return 78;
    }
    execv(argv[1], argv + 1);
    perror("execv");
    return 79;
}
"#;

/// Where the kernel hides residency (no cachestat under a seccomp filter, a file owned by
/// another user and not writable: a read-only model volume in a container), doctor says so
/// and a load reads the shard buffered, without filling memory by copy, which on a cold
/// file would fault page by page (mincore says every page is cached there).
#[test]
fn hidden_residency_is_reported_and_read_buffered() {
    use std::os::unix::fs::PermissionsExt;
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let dir = tempfile::tempdir().unwrap();
    let sandbox = dir.path().join("sandbox");
    let built = Command::new("cc")
        .args(["-O1", "-o"])
        .arg(&sandbox)
        .args(["-x", "c", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            std::io::Write::write_all(c.stdin.as_mut().unwrap(), SANDBOX_C.as_bytes())?;
            drop(c.stdin.take());
            c.wait()
        })
        .is_ok_and(|s| s.success());
    if !root || !built {
        eprintln!("skipped: needs root (to become nobody) and a C compiler (root {root}, compiled {built})");
        return;
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("m.safetensors");
    tensorlift_testkit::write_shard(&path, &[("a", tensorlift_format::Dtype::F32, &[1 << 20])]);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(&sandbox).arg(env!("CARGO_BIN_EXE_tensorlift")).args(args).output().unwrap();
        match out.status.code() {
            Some(0) => Some(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()),
            // Not this environment's to give: no user nobody, no seccomp, or a binary or
            // folder nobody cannot reach.
            Some(77..=79) => None,
            _ => panic!("{args:?}: {}", String::from_utf8_lossy(&out.stderr)),
        }
    };
    let p = path.to_str().unwrap();
    let Some(v) = run(&["doctor", "--json", "--path", p]) else {
        eprintln!("skipped: cannot run as nobody under a seccomp filter here");
        return;
    };
    if v["o_direct"]["supported"] != true {
        // Buffered either way: nothing would tell the residency's part.
        eprintln!("skipped: no O_DIRECT for {p}: {}", v["o_direct"]);
        return;
    }
    let residency = &v["page_cache_residency"];
    assert_eq!(residency["cachestat"], false, "{residency}");
    assert_eq!(residency["hidden_for"], p, "{residency}");
    // A folder is told by its first shard.
    let v = run(&["doctor", "--json", "--path", dir.path().to_str().unwrap()]).unwrap();
    assert_eq!(v["page_cache_residency"]["hidden_for"], p, "{v}");
    let s = run(&["load", p, "--device", "cpu", "--json"]).unwrap();
    assert_eq!(
        (&s["buffered_shards"], &s["direct_shards"], &s["copied_bytes"]),
        (&1.into(), &0.into(), &0.into()),
        "{s}"
    );
    // Unhidden (this process, root), the same cached file is filled by copy where that is
    // available: the case above differs by the residency alone.
    let out =
        Command::new(env!("CARGO_BIN_EXE_tensorlift")).args(["load", p, "--device", "cpu", "--json"]).output().unwrap();
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    if std::env::var_os("TENSORLIFT_REQUIRE_FILL").is_some() {
        assert!(s["copied_bytes"].as_u64().unwrap() > 0, "{s}");
    }
}

/// The memlock note says whether the limit counts: not for a process with CAP_IPC_LOCK (as
/// `capsh --decode` reads the capability set), and it does once util-linux's `setpriv` takes
/// the capability away.
#[test]
fn the_memlock_note_knows_cap_ipc_lock() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let caps = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim().to_owned();
    let Ok(decoded) = Command::new("capsh").arg(format!("--decode={caps}")).output() else {
        eprintln!("skipped: no capsh here");
        return;
    };
    // (Held in the initial user namespace, where the kernel asks.)
    let initial = std::fs::read_to_string("/proc/self/uid_map").unwrap().split_whitespace().collect::<Vec<_>>()
        == ["0", "0", "4294967295"];
    let held = initial && String::from_utf8_lossy(&decoded.stdout).contains("cap_ipc_lock");
    let note = |v: serde_json::Value| v["memlock"]["note"].as_str().unwrap().to_owned();
    let here = note(doctor(&[], &[]));
    assert_eq!(here.starts_with("not counted: the process holds CAP_IPC_LOCK"), held, "{here}");
    if held {
        // Taken out of every set the child could hold it in.
        let drop = ["--inh-caps=-ipc_lock", "--ambient-caps=-ipc_lock", "--bounding-set=-ipc_lock"];
        let out =
            Command::new("setpriv").args(drop).args([env!("CARGO_BIN_EXE_tensorlift"), "doctor", "--json"]).output();
        match out {
            Ok(out) if out.status.success() => {
                let without = note(serde_json::from_slice(&out.stdout).unwrap());
                assert!(!without.contains("CAP_IPC_LOCK"), "{without}");
            }
            other => eprintln!("skipped the case without it: setpriv could not drop it here: {other:?}"),
        }
    }
}

/// In a hub cache snapshot the weights are links into the repository's `blobs/`: the O_DIRECT
/// check reads the blob a load would read, not a scratch file written into the snapshot; a
/// link out of the folder is not followed.
#[test]
fn o_direct_is_tried_on_the_blob_a_snapshot_links_to() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models--org--m");
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots/r")).unwrap();
    let blob = repo.join("blobs").join("ab".repeat(32));
    std::fs::write(&blob, vec![7u8; 1 << 16]).unwrap();
    let snapshot = repo.join("snapshots/r");
    std::os::unix::fs::symlink(format!("../../blobs/{}", "ab".repeat(32)), snapshot.join("m.safetensors")).unwrap();
    let v = doctor(&[], &["--path", snapshot.to_str().unwrap()]);
    assert_eq!(v["o_direct"]["tried"], blob.canonicalize().unwrap().to_str().unwrap(), "{v}");
    // A link elsewhere is not the folder's file: a scratch file there is tried, and removed.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::os::unix::fs::symlink(&blob, other.join("m.safetensors")).unwrap();
    let v = doctor(&[], &["--path", other.to_str().unwrap()]);
    let tried = v["o_direct"]["tried"].as_str().unwrap();
    assert!(tried.starts_with(other.to_str().unwrap()) && !tried.ends_with("m.safetensors"), "{v}");
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 1);
}
