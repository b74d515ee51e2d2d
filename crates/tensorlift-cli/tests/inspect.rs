//! `tensorlift inspect` end to end: output, exit codes, and no panic on bad input.

use std::path::PathBuf;
use std::process::{Command, Output};

use tensorlift::Dtype;
use tensorlift_testkit::write_shard;

fn tensorlift(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tensorlift")).args(args).output().unwrap()
}

fn dir() -> PathBuf {
    tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cli-")
}

#[test]
fn table_lists_every_tensor_and_totals() {
    let d = dir();
    write_shard(&d.join("a.safetensors"), &[("w", Dtype::F32, &[2, 3]), ("b", Dtype::BF16, &[3])]);
    let out = tensorlift(&["inspect", d.join("a.safetensors").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[1].starts_with("w ")
            && lines[1].contains("F32")
            && lines[1].contains("[2, 3]")
            && lines[1].contains(" 24 ")
    );
    assert!(lines[2].starts_with("b ") && lines[2].contains("BF16") && lines[2].ends_with("a.safetensors"));
    assert_eq!(lines[3], "total: 2 tensors, 30 bytes in 1 shard");
}

#[test]
fn json_has_the_documented_shape() {
    let d = dir();
    write_shard(&d.join("m-1.safetensors"), &[("x", Dtype::U8, &[5])]);
    write_shard(&d.join("m-2.safetensors"), &[("y", Dtype::F16, &[2])]);
    let out = tensorlift(&["inspect", "--json", d.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["total_bytes"], 9);
    assert_eq!(v["files"].as_array().unwrap().len(), 2);
    let f0 = &v["files"][0];
    assert!(f0["path"].as_str().unwrap().ends_with("m-1.safetensors"));
    assert_eq!(f0["data_bytes"], 5);
    assert_eq!(f0["header_bytes"].as_u64().unwrap() % 8, 0);
    assert!(f0["metadata"].is_null());
    let y = &v["tensors"][1];
    assert_eq!(y["name"], "y");
    assert_eq!(y["dtype"], "F16");
    assert_eq!(y["shape"], serde_json::json!([2]));
    assert_eq!(y["data_offsets"], serde_json::json!([0, 4]));
    assert!(y["file"].as_str().unwrap().ends_with("m-2.safetensors"));
}

#[test]
fn misaligned_tensor_warns() {
    let d = dir();
    write_shard(&d.join("a.safetensors"), &[("u", Dtype::U8, &[1]), ("f", Dtype::F32, &[1])]);
    let out = tensorlift(&["inspect", d.join("a.safetensors").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.starts_with("warning: ") && err.contains("'f'") && err.contains("4-byte"), "{err}");
    assert!(!err.contains("'u'"));
}

#[test]
fn bad_input_exits_1_with_one_error_line() {
    let d = dir();
    let bad = d.join("bad.safetensors");
    let json = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,12]}}"#;
    let mut f = (json.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(json);
    f.extend_from_slice(&[0; 12]);
    std::fs::write(&bad, f).unwrap();
    for path in [bad.to_str().unwrap(), "/nonexistent/model"] {
        let out = tensorlift(&["inspect", path]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("error: ") && err.contains(path), "{err}");
    }
    let out = tensorlift(&["inspect", bad.to_str().unwrap()]);
    assert!(String::from_utf8(out.stderr).unwrap().contains("'w'"));
}

#[test]
fn garbage_files_never_panic() {
    let d = dir();
    let p = d.join("g.safetensors");
    let mut seed = 0x2545F4914F6CDD1Du64;
    for len in [0usize, 1, 7, 8, 9, 64, 300] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        std::fs::write(&p, bytes).unwrap();
        let out = tensorlift(&["inspect", p.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "len {len}");
    }
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(tensorlift(&["inspect"]).status.code(), Some(2));
    assert_eq!(tensorlift(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(tensorlift(&["--help"]).status.code(), Some(0));
}
