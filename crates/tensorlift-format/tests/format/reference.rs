//! Files written by the reference Python `safetensors` package read identically.

use std::path::Path;
use std::process::Command;

use tensorlift_format::parse_header;

use crate::support::tempdir;

/// Writes the reference fixture with Python. The test suite's own set-up installs the
/// packages (see README); a machine without them fails here with the reason.
pub fn reference_fixture() -> std::path::PathBuf {
    let dir = tempdir();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/reference/make_fixture.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&dir)
        .output()
        .expect("python3 must be installed for the reference tests");
    assert!(
        out.status.success(),
        "the reference writer failed (pip install -r requirements-test.txt): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

#[test]
fn reference_files_read_identically() {
    use sha2::{Digest, Sha256};
    let dir = reference_fixture();
    let manifest: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    // Every file the reference wrote (the single file and each shard): each tensor's dtype,
    // shape and size, and its bytes where the parsed offsets put them, by the reference's
    // digest of the array it read.
    let mut files: Vec<&str> = manifest.iter().map(|w| w["file"].as_str().unwrap()).collect();
    files.dedup();
    assert_eq!(files.len(), 3, "{files:?}");
    let mut checked = 0;
    for file in files {
        let path = dir.join(file);
        let bytes = std::fs::read(&path).unwrap();
        let header = parse_header(&path, &bytes, bytes.len() as u64).unwrap();
        if file == "single.safetensors" {
            assert_eq!(header.metadata.as_ref().unwrap()["who"], "reference");
        }
        let wanted: Vec<&serde_json::Value> = manifest.iter().filter(|w| w["file"] == file).collect();
        assert_eq!(wanted.len(), header.tensors.len(), "{file}");
        for want in wanted {
            let name = want["name"].as_str().unwrap();
            let t = header.tensors.iter().find(|t| t.name == name).unwrap();
            assert_eq!(t.dtype.to_string(), want["dtype"].as_str().unwrap(), "{name}");
            let want_shape: Vec<usize> = serde_json::from_value(want["shape"].clone()).unwrap();
            assert_eq!(t.shape, want_shape, "{name}");
            assert_eq!(t.len(), want["nbytes"].as_u64().unwrap(), "{name}");
            let start = (header.data_start() + t.data_offsets.0) as usize;
            let data = &bytes[start..start + t.len() as usize];
            assert_eq!(format!("{:x}", Sha256::digest(data)), want["sha256"].as_str().unwrap(), "{file}: {name}");
            checked += 1;
        }
    }
    assert_eq!(checked, manifest.len());
}
