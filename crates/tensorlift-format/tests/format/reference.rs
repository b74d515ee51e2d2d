//! Files written by the reference Python `safetensors` package read identically.

use std::path::Path;
use std::process::Command;

use tensorlift_format::{parse_header, resolve};

use crate::support::{tempdir, StdSource};

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

    let plan = resolve(&StdSource, &dir.join("sharded")).unwrap();
    assert_eq!(plan.shards().len(), 2);
    let mut checked = 0;
    for want in &manifest {
        let name = want["name"].as_str().unwrap();
        let file = want["file"].as_str().unwrap();
        let (dtype, shape, len) = if file == "single.safetensors" {
            let t = header.tensors.iter().find(|t| t.name == name).unwrap();
            (t.dtype, t.shape.clone(), t.len())
        } else {
            let t = plan.tensors().iter().find(|t| t.name == name).unwrap();
            assert_eq!(plan.shards()[t.shard].name, Path::new(file).file_name().unwrap().to_str().unwrap());
            (t.dtype, t.shape.clone(), t.len())
        };
        assert_eq!(dtype.to_string(), want["dtype"].as_str().unwrap(), "{name}");
        let want_shape: Vec<usize> = serde_json::from_value(want["shape"].clone()).unwrap();
        assert_eq!(shape, want_shape, "{name}");
        assert_eq!(len, want["nbytes"].as_u64().unwrap(), "{name}");
        checked += 1;
    }
    assert_eq!(checked, header.tensors.len() + plan.tensors().len());
}
