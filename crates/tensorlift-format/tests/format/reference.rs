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
    let dir = reference_fixture();
    let manifest: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let single = dir.join("single.safetensors");
    let bytes = std::fs::read(&single).unwrap();
    let header = parse_header(&single, &bytes, bytes.len() as u64).unwrap();
    assert_eq!(header.metadata.as_ref().unwrap()["who"], "reference");

    // The sharded half of the fixture is planned by tensorlift-io's tests (it opens files).
    let mut checked = 0;
    for want in manifest.iter().filter(|w| w["file"] == "single.safetensors") {
        let name = want["name"].as_str().unwrap();
        let t = header.tensors.iter().find(|t| t.name == name).unwrap();
        assert_eq!(t.dtype.to_string(), want["dtype"].as_str().unwrap(), "{name}");
        let want_shape: Vec<usize> = serde_json::from_value(want["shape"].clone()).unwrap();
        assert_eq!(t.shape, want_shape, "{name}");
        assert_eq!(t.len(), want["nbytes"].as_u64().unwrap(), "{name}");
        checked += 1;
    }
    assert_eq!(checked, header.tensors.len());
}
