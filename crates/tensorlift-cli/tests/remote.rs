//! `tensorlift inspect` and `load` on a bucket of a real S3 server (`s3s-fs`) and over
//! plain HTTP: the reference writer's files, read to the reference's digests, on the host
//! and on the (emulated) device; the provider's word when credentials are wrong.

use std::path::Path;
use std::process::{Command, Output};

use tensorlift_testkit::net::{HttpServer, S3Server};

/// The reference writer's fixture under `root/bucket/`, and its manifest (name -> sha256).
fn fixture(root: &Path) -> Vec<serde_json::Value> {
    let dir = root.join("bucket");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/reference/make_fixture.py");
    let out = Command::new("python3").arg(script).arg(&dir).output().expect("python3 is needed");
    assert!(out.status.success(), "pip install -r requirements-test.txt: {}", String::from_utf8_lossy(&out.stderr));
    let manifest: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    manifest.into_iter().filter(|m| m["file"] != "single.safetensors").collect()
}

fn run(port: u16, args: &[&str], extra: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tensorlift"));
    // Only this server's settings: none of the caller's S3 setup or remote options.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("AWS_") || k.starts_with("TENSORLIFT_REMOTE_") {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd.args(args).env("TENSORLIFT_REMOTE_RETRIES", "1");
    for (k, v) in S3Server::env(port) {
        cmd.env(k, v);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn assert_digests(out: &Output, manifest: &[serde_json::Value], what: &str) -> serde_json::Value {
    assert_eq!(out.status.code(), Some(0), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), manifest.len(), "{what}");
    for m in manifest {
        let t = tensors.iter().find(|t| t["name"] == m["name"]).unwrap();
        assert_eq!(t["sha256"], m["sha256"], "{what}: {}", m["name"]);
    }
    v
}

#[test]
fn a_bucket_loads_to_the_reference_digests_on_the_host_and_the_device() {
    let root = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-s3-");
    let manifest = fixture(&root);
    let Some(bin) = tensorlift_testkit::net::s3s_fs() else {
        assert!(std::env::var_os("TENSORLIFT_REQUIRE_S3").is_none(), "s3s-fs is not installed");
        eprintln!("skipped: s3s-fs is not installed (./scripts/test installs it)");
        return;
    };
    let s3 = S3Server::start(&bin, &root).unwrap();
    let url = "s3://bucket/sharded";
    let load = ["load", url, "--digest", "sha256", "--json"];
    let v = assert_digests(&run(s3.port, &[&load[..], &["--device", "cpu"]].concat(), &[]), &manifest, "cpu");
    assert_eq!(v["remote_shards"], 2, "{v}");
    let emulator = tensorlift_testkit::emulated_driver();
    let driver: Vec<(&str, &str)> = if tensorlift_testkit::real_driver() {
        Vec::new()
    } else {
        vec![("TENSORLIFT_LIBCUDA", emulator.to_str().unwrap())]
    };
    let v = assert_digests(&run(s3.port, &[&load[..], &["--device", "cuda:0"]].concat(), &driver), &manifest, "cuda");
    assert_eq!(v["device"], "cuda:0");
    // Verified against a SHA256SUMS in the bucket, written by coreutils: each pinned chunk is
    // hashed before its copy to the device.
    let folder = root.join("bucket/sharded");
    let mut names: Vec<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors") || n.ends_with(".json"))
        .collect();
    names.sort();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    std::fs::write(folder.join("SHA256SUMS"), tensorlift_testkit::coreutils_sha256sums(&folder, &names)).unwrap();
    let verified = [&load[..], &["--device", "cuda:0", "--verify"]].concat();
    let v = assert_digests(&run(s3.port, &verified, &driver), &manifest, "cuda, verified");
    assert!(v["verified_bytes"].as_u64().unwrap() > 0 && v["unverified_bytes"] == 0, "{v}");
    // --cache-dir: the second load reads the local copy, to the same digests.
    let cache = root.join("cache");
    let cached = [&load[..], &["--device", "cpu", "--cache-dir", cache.to_str().unwrap()]].concat();
    let v = assert_digests(&run(s3.port, &cached, &[]), &manifest, "cached, first");
    assert_eq!(v["remote_shards"], 2, "{v}");
    let v = assert_digests(&run(s3.port, &cached, &[]), &manifest, "cached, second");
    assert_eq!(v["remote_shards"], 0, "{v}");
    // inspect lists the tensors without reading them.
    let out = run(s3.port, &["inspect", url], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(manifest.iter().all(|m| text.contains(m["name"].as_str().unwrap())), "{text}");
    // doctor plans it: reachable, two shards.
    let out = run(s3.port, &["doctor", "--json", "--path", url], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&v["remote"]["reachable"], &v["remote"]["shards"]), (&true.into(), &2.into()), "{v}");
    assert!(v["o_direct"].is_null(), "{v}");
    // Wrong credentials: exit 1 with the server's own reason.
    let out = run(s3.port, &["load", url], &[("AWS_SECRET_ACCESS_KEY", "wrong")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SignatureDoesNotMatch"), "{out:?}");
    // A URL that carries credentials is refused, and named without them, by load and by
    // doctor (its JSON and its text).
    let secret = "https://user:secret@127.0.0.1:1/model/?sig=secret";
    for args in [&["load", secret][..], &["doctor", "--path", secret], &["doctor", "--json", "--path", secret]] {
        let out = run(s3.port, args, &[]);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!stdout.contains("secret") && !stderr.contains("secret"), "{args:?}: {stdout}\n{stderr}");
        assert!(stdout.contains("REDACTED") || stderr.contains("REDACTED"), "{args:?}: {stdout}\n{stderr}");
    }
}

#[test]
fn an_http_folder_loads_to_the_reference_digests() {
    let root = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-http-");
    let manifest = fixture(&root);
    let http = HttpServer::start(&root).unwrap();
    let url = format!("http://127.0.0.1:{}/bucket/sharded/", http.port);
    let out = run(0, &["load", &url, "--digest", "sha256", "--json", "--device", "cpu"], &[]);
    assert_digests(&out, &manifest, "http");
}

/// PyTorch files in a bucket (the pickle fixtures, whose tensors numpy wrote beside them):
/// `tensorlift load` gives numpy's bytes on the host and the (emulated) device, from one
/// file and from a folder's `pytorch_model.bin`, and `inspect` lists the tensors.
#[test]
fn pytorch_files_in_a_bucket_load_to_numpys_bytes() {
    use sha2::{Digest, Sha256};
    let root = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-s3-torch-");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tensorlift-pickle/tests/fixtures");
    let folder = root.join("bucket/tied");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(fixtures.join("tied.zip.bin"), folder.join("pytorch_model.bin")).unwrap();
    std::fs::copy(fixtures.join("every_dtype.legacy.bin"), root.join("bucket/every_dtype.pt")).unwrap();
    // name -> sha256 of the bytes numpy wrote beside each fixture.
    let expected = |case: &str| -> Vec<serde_json::Value> {
        let v: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&std::fs::read(fixtures.join(format!("{case}.expect.json"))).unwrap()).unwrap();
        v.into_iter()
            .map(|(name, t)| {
                let hex = t["hex"].as_str().unwrap();
                let bytes: Vec<u8> =
                    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
                serde_json::json!({"name": name, "sha256": format!("{:x}", Sha256::digest(&bytes))})
            })
            .collect()
    };
    let Some(bin) = tensorlift_testkit::net::s3s_fs() else {
        assert!(std::env::var_os("TENSORLIFT_REQUIRE_S3").is_none(), "s3s-fs is not installed");
        eprintln!("skipped: s3s-fs is not installed (./scripts/test installs it)");
        return;
    };
    let s3 = S3Server::start(&bin, &root).unwrap();
    let emulator = tensorlift_testkit::emulated_driver();
    let driver: Vec<(&str, &str)> = if tensorlift_testkit::real_driver() {
        Vec::new()
    } else {
        vec![("TENSORLIFT_LIBCUDA", emulator.to_str().unwrap())]
    };
    for (url, case) in [("s3://bucket/tied", "tied"), ("s3://bucket/every_dtype.pt", "every_dtype")] {
        let want = expected(case);
        for (device, env) in [("cpu", &[][..]), ("cuda:0", &driver[..])] {
            let out = run(s3.port, &["load", url, "--digest", "sha256", "--json", "--device", device], env);
            let v = assert_digests(&out, &want, &format!("{url} on {device}"));
            assert_eq!(v["remote_shards"], 1, "{v}");
        }
    }
    let out = run(s3.port, &["inspect", "s3://bucket/tied"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(expected("tied").iter().all(|m| text.contains(m["name"].as_str().unwrap())), "{text}");
}
