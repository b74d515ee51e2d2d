//! Fixtures for tensorlift's tests (a dev-dependency only): deterministic bytes, and
//! checkpoints written with the bytes each tensor holds, as the truth that loaded bytes are
//! compared with.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::Path;

use tensorlift_format::{encode_header, Dtype};

/// A new folder for a test's files: `base/tl-run-PID/PREFIXxxxxxx`, one `tl-run-` folder per
/// test process. Kept after the test (for a look after a failure), and removed by a later
/// run: the first call of a process in `base` removes the `tl-run-` folders of processes
/// that have ended, so runs do not pile up.
pub fn try_scratch_in(base: &Path, prefix: &str) -> std::io::Result<std::path::PathBuf> {
    static CLEANED: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
    {
        let mut cleaned = CLEANED.lock().unwrap_or_else(|p| p.into_inner());
        if !cleaned.iter().any(|b| b == base) {
            cleaned.push(base.to_path_buf());
            for entry in std::fs::read_dir(base)?.flatten() {
                let name = entry.file_name();
                let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("tl-run-")) else { continue };
                // Another process's folder, once that process is gone (no /proc entry).
                if pid.parse::<u32>().is_ok_and(|p| p != std::process::id()) && !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }
    let run = base.join(format!("tl-run-{}", std::process::id()));
    std::fs::create_dir_all(&run)?;
    Ok(tempfile::Builder::new().prefix(prefix).tempdir_in(run)?.keep())
}

/// [`try_scratch_in`], failing the test when the folder cannot be made.
pub fn scratch_in(base: &Path, prefix: &str) -> std::path::PathBuf {
    try_scratch_in(base, prefix).unwrap_or_else(|e| panic!("a scratch folder in {}: {e}", base.display()))
}

/// A tensor to write: name, dtype, shape.
pub type Spec<'a> = (&'a str, Dtype, &'a [usize]);

/// Deterministic bytes that differ at every offset (xorshift), so a misplaced byte shows.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// [`pattern`] seeded by a name, so each tensor's bytes differ.
pub fn pattern_for(name: &str, len: usize) -> Vec<u8> {
    let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    pattern(len, seed)
}

/// Writes one shard and returns each tensor's bytes as written.
///
/// # Panics
///
/// If a size overflows or the file cannot be written: this is test code.
pub fn write_shard(path: &Path, tensors: &[Spec<'_>]) -> BTreeMap<String, Vec<u8>> {
    let enc = encode_header(tensors, None).expect("sizes fit");
    let mut file = enc.bytes.clone();
    let mut truth = BTreeMap::new();
    for ((name, _, _), (b, e)) in tensors.iter().zip(&enc.offsets) {
        let data = pattern_for(name, (e - b) as usize);
        file.extend_from_slice(&data);
        truth.insert((*name).to_owned(), data);
    }
    std::fs::write(path, file).expect("writing a fixture");
    truth
}

/// A sharded folder (`model-0000i-of-0000n.safetensors`) with its index; returns every
/// tensor's bytes.
///
/// # Panics
///
/// As [`write_shard`].
pub fn write_sharded(dir: &Path, shards: &[&[Spec<'_>]]) -> BTreeMap<String, Vec<u8>> {
    let mut truth = BTreeMap::new();
    let mut map = serde_json::Map::new();
    for (i, tensors) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len());
        for (t, _, _) in *tensors {
            map.insert((*t).to_owned(), name.clone().into());
        }
        truth.extend(write_shard(&dir.join(&name), tensors));
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_vec(&index).expect("json"))
        .expect("writing the index");
    truth
}

/// Writes `dir/model.safetensors.index.json` mapping each tensor to a shard name, in the
/// order given; returns its path.
///
/// # Panics
///
/// If the file cannot be written.
pub fn write_index(dir: &Path, entries: &[(&str, &str)]) -> std::path::PathBuf {
    let map: serde_json::Map<String, serde_json::Value> =
        entries.iter().map(|(t, s)| ((*t).to_owned(), (*s).into())).collect();
    let path = dir.join("model.safetensors.index.json");
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(&path, serde_json::to_vec(&index).expect("json")).expect("writing the index");
    path
}

/// The environment variable that makes CUDA tests use the real driver (`real`) instead of
/// the emulated one (the default; see `crates/tensorlift-cuda/emulator`).
pub const TEST_DRIVER_ENV: &str = "TENSORLIFT_TEST_DRIVER";

/// Whether CUDA tests run against the real driver (`TENSORLIFT_TEST_DRIVER=real`).
pub fn real_driver() -> bool {
    std::env::var(TEST_DRIVER_ENV).is_ok_and(|v| v == "real")
}

/// The emulated driver library: `TENSORLIFT_EMULATOR` if set, else
/// `libtensorlift_cuda_emulator.so` in the target folder that holds the running test
/// executable (`scripts/test` builds it before the tests).
///
/// # Panics
///
/// If it has not been built: CUDA tests must not silently skip.
pub fn emulated_driver() -> std::path::PathBuf {
    // A copied test executable (scripts/gpu-host's dry run) names it explicitly.
    if let Some(p) = std::env::var_os("TENSORLIFT_EMULATOR") {
        return std::path::PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test> -> target/<profile>/libtensorlift_cuda_emulator.so
    let lib =
        exe.parent().and_then(Path::parent).map(|d| d.join("libtensorlift_cuda_emulator.so")).expect("a target folder");
    assert!(
        lib.is_file(),
        "the emulated CUDA driver is not built at {}: run `cargo build -p tensorlift-cuda-emulator` \
         (./scripts/test does), or set {TEST_DRIVER_ENV}=real on a GPU host",
        lib.display()
    );
    lib
}

/// The reference fixture writer, `tests/reference/make_fixture.py`: in the source tree the
/// test was built from, or, for a test executable copied elsewhere (a GPU host), under the
/// current folder.
pub fn reference_script() -> std::path::PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/reference/make_fixture.py");
    if built.is_file() {
        built
    } else {
        std::path::PathBuf::from("tests/reference/make_fixture.py")
    }
}

/// `files` of `dir` as coreutils' `sha256sum` lists them (`<digest>  <name>` lines): the
/// SHA256SUMS that verified loads are checked against, computed by a program tensorlift
/// did not write.
pub fn coreutils_sha256sums(dir: &Path, files: &[&str]) -> String {
    let out =
        std::process::Command::new("sha256sum").args(files).current_dir(dir).output().expect("coreutils' sha256sum");
    assert!(out.status.success(), "sha256sum: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("sha256sum writes UTF-8 for UTF-8 names")
}

/// The bytes of `ranges` (one per leading dimension; whole dimensions after) of a tensor of
/// `shape` whose elements are `elem` bytes, by visiting every element: an independent
/// reading to hold slicing code to.
pub fn slice_bytes(full: &[u8], shape: &[usize], elem: usize, ranges: &[std::ops::Range<usize>]) -> Vec<u8> {
    selected(shape, ranges).flat_map(|k| &full[k * elem..(k + 1) * elem]).copied().collect()
}

/// [`slice_bytes`] for elements `bits` wide, narrower than a byte too: the selected elements'
/// bits, packed from the lowest bit of each byte, as safetensors stores them.
pub fn slice_bits(full: &[u8], shape: &[usize], bits: usize, ranges: &[std::ops::Range<usize>]) -> Vec<u8> {
    if bits % 8 == 0 {
        return slice_bytes(full, shape, bits / 8, ranges);
    }
    let bit = |k: usize| (full[k / 8] >> (k % 8)) & 1;
    let mut out = vec![0u8; (shape.iter().product::<usize>() * bits).div_ceil(8)];
    let mut at = 0;
    for e in selected(shape, ranges) {
        for b in 0..bits {
            out[at / 8] |= bit(e * bits + b) << (at % 8);
            at += 1;
        }
    }
    out.truncate(at.div_ceil(8));
    out
}

/// The row-major indices of the elements of a tensor of `shape` that `ranges` select.
fn selected<'a>(shape: &'a [usize], ranges: &'a [std::ops::Range<usize>]) -> impl Iterator<Item = usize> + 'a {
    let count: usize = shape.iter().product();
    (0..count).filter(move |&k| {
        let mut rem = k;
        (0..shape.len()).rev().all(|d| {
            let i = rem % shape[d];
            rem /= shape[d];
            ranges.get(d).is_none_or(|r| r.contains(&i))
        })
    })
}

/// Every dtype, scalars, zero-size tensors, odd sizes that misalign what follows.
pub fn quirky() -> Vec<Spec<'static>> {
    vec![
        ("bool", Dtype::BOOL, &[3]),
        ("f32_after_3_bytes", Dtype::F32, &[5, 7]),
        ("u8", Dtype::U8, &[4097]),
        ("i8", Dtype::I8, &[9]),
        ("f8_e5m2", Dtype::F8_E5M2, &[11]),
        ("f8_e4m3", Dtype::F8_E4M3, &[3, 3]),
        ("f8_e8m0", Dtype::F8_E8M0, &[2]),
        ("f8_e4m3fnuz", Dtype::F8_E4M3FNUZ, &[5]),
        ("f8_e5m2fnuz", Dtype::F8_E5M2FNUZ, &[5]),
        ("i16", Dtype::I16, &[33]),
        ("u16", Dtype::U16, &[2, 2]),
        ("f16", Dtype::F16, &[64, 65]),
        ("bf16", Dtype::BF16, &[3000]),
        ("scalar_f32", Dtype::F32, &[]),
        ("empty", Dtype::F32, &[0, 16]),
        ("i32", Dtype::I32, &[7]),
        ("u32", Dtype::U32, &[1]),
        ("f64", Dtype::F64, &[2, 3, 4]),
        ("c64", Dtype::C64, &[3]),
        ("i64", Dtype::I64, &[5]),
        ("u64", Dtype::U64, &[2]),
        ("f4", Dtype::F4, &[6]),
        ("f6_e2m3", Dtype::F6_E2M3, &[4]),
        ("f6_e3m2", Dtype::F6_E3M2, &[8]),
        ("big", Dtype::F32, &[300, 1000]),
        ("tail_u8", Dtype::U8, &[13]),
    ]
}

pub mod net;
