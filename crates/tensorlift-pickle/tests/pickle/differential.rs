//! The reader against PyTorch itself: scripts/torch-differential.py writes many
//! checkpoints (dtypes, layouts, protocols, views, Python 2 pickles, device locations,
//! hostile pickles) and what `torch.load(weights_only=True, map_location="cpu")` makes of
//! each; what torch reads must read to the same tensors, what it refuses must be refused
//! with the global or opcode named.

use std::path::{Path, PathBuf};
use std::process::Command;

use tensorlift_pickle::{Limits, TorchCheckpoint};

/// Runs the generator with the `python3` on the PATH (the test command puts its virtual
/// environment, with torch, first, and sets `TENSORLIFT_REQUIRE_DEPS`). Outside it, a
/// machine without torch skips, saying so.
fn generate() -> Option<PathBuf> {
    let dir = std::env::temp_dir().join(format!("tl-torch-differential-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/torch-differential.py");
    let out = Command::new("python3").arg(&script).arg(&dir).output();
    let why = match out {
        Ok(o) if o.status.success() => return Some(dir),
        Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
        Err(e) => e.to_string(),
    };
    let required = std::env::var_os("CI").is_some() || std::env::var_os("TENSORLIFT_REQUIRE_DEPS").is_some();
    if required || !why.contains("No module named 'torch'") {
        panic!("scripts/torch-differential.py failed: {why}");
    }
    eprintln!("skipped: torch is not installed here (./scripts/test installs it): {why}");
    None
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn reads_what_torch_reads_and_refuses_what_torch_refuses() {
    let Some(dir) = generate() else { return };
    let expect: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.join("expect.json")).unwrap()).unwrap();
    assert!(expect.len() >= 45, "{} variants", expect.len());
    let (mut read, mut refused) = (0, 0);
    for (name, want) in &expect {
        let path = dir.join(format!("{name}.bin"));
        let f = std::fs::File::open(&path).unwrap();
        let got = TorchCheckpoint::read(&f, &path, &Limits::default());
        if let Some(why) = want.get("tensorlift_refuses") {
            let e = got.expect_err(name).to_string();
            assert!(e.contains(why.as_str().unwrap()), "{name}: {e}");
            continue;
        }
        if !want["ok"].as_bool().unwrap() {
            let e = match got {
                Ok(ck) => panic!("{name}: torch refuses it ({}), tensorlift reads {:?}", want["error"], ck.tensors),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(want["names"].as_str().unwrap()), "{name}: {e}\ntorch: {}", want["error"]);
            refused += 1;
            continue;
        }
        let ck = got.unwrap_or_else(|e| panic!("{name}: torch reads it, tensorlift says: {e}"));
        let tensors: Vec<serde_json::Value> = ck
            .tensors
            .iter()
            .map(|t| {
                let bytes = ck.tensor_bytes(&f, &path, t).unwrap_or_else(|e| panic!("{name}: {e}"));
                serde_json::json!([t.name, t.dtype.to_string(), t.shape, hex(&bytes)])
            })
            .collect();
        assert_eq!(&serde_json::Value::from(tensors), &want["tensors"], "{name}");
        assert_eq!(&serde_json::json!(ck.skipped), &want["other"], "{name}");
        read += 1;
    }
    eprintln!("{read} files read as torch reads them, {refused} refused as torch refuses them");
    assert!(read >= 25 && refused >= 15, "{read} read, {refused} refused");
    let _ = std::fs::remove_dir_all(&dir);
}
