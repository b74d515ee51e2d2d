//! Loaded bytes are identical to an independent reading of the file.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tensorlift::Dtype;

use crate::support::*;

#[test]
fn single_file_every_dtype_every_backend() {
    let dir = scratch();
    let path = dir.join("quirky.safetensors");
    let truth = write_shard(&path, &quirky());
    for chunk in [4096, 1 << 20] {
        // Also a load that reads while it plans, which learns of misaligned tensors late.
        let early = base().read_while_planning(tensorlift::ReadWhilePlanning::Always).chunk_size(chunk);
        let mut all = loaders(chunk);
        all.push((format!("reading while planning/chunk {chunk}"), early.build().unwrap()));
        for (what, loader) in all {
            let model = loader.load_blocking(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_identical(&model, &truth, &what);
            assert_eq!(model.get("scalar_f32").unwrap().shape(), &[] as &[usize]);
            assert!(model.get("empty").unwrap().is_empty());
            if !what.starts_with("mapped") {
                // Read tensors are aligned for their elements wherever the file put them
                // (f32_after_3_bytes, i16, ... are not, in the file), as the reference's are.
                for t in model.tensors() {
                    let align = (t.dtype().bitsize() / 8).clamp(1, 8);
                    assert_eq!(t.bytes().unwrap().as_ptr() as usize % align, 0, "{what}: {}", t.name());
                }
            }
        }
    }
}

#[test]
fn sharded_folder_every_backend() {
    let dir = scratch();
    let a: Vec<Spec<'_>> = vec![("embed", Dtype::BF16, &[1000, 64]), ("l0.w", Dtype::F16, &[64, 300])];
    let b: Vec<Spec<'_>> = vec![("l1.w", Dtype::F16, &[64, 300]), ("norm", Dtype::F32, &[64])];
    let c: Vec<Spec<'_>> = vec![("head", Dtype::BF16, &[513, 64])];
    let truth = write_sharded(&dir, &[&a, &b, &c]);
    for (what, loader) in loaders(64 << 10) {
        let model = loader.load_blocking(&dir).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_identical(&model, &truth, &what);
        assert_eq!(model.stats().shards, 3);
        assert_eq!(model.stats().bytes, truth.values().map(|v| v.len() as u64).sum::<u64>());
    }
    // The index file and the folder name the same checkpoint.
    let m = base().build().unwrap().load_blocking(dir.join("model.safetensors.index.json")).unwrap();
    assert_identical(&m, &truth, "via index");
}

#[test]
fn async_load_and_stream_match() {
    let dir = scratch();
    let path = dir.join("m.safetensors");
    let truth = write_shard(&path, &quirky());
    let loader = base().chunk_size(4096).build().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    let model = rt.block_on(loader.load(&path)).unwrap();
    assert_identical(&model, &truth, "async");
    // The load future can be spawned (it is Send).
    let loader = Arc::new(loader);
    let l2 = Arc::clone(&loader);
    let p2 = path.clone();
    let spawned = rt.block_on(rt.spawn(async move { l2.load(&p2).await.map(|m| m.len()) })).unwrap().unwrap();
    assert_eq!(spawned, truth.len());
    let mut stream = loader.stream_blocking(&path).unwrap();
    let mut seen = 0;
    while let Some(t) = tensorlift::block_on(stream.next()) {
        let t = t.unwrap();
        assert!(t.bytes().unwrap() == truth[t.name()].as_slice(), "{}", t.name());
        seen += 1;
    }
    assert_eq!(seen, truth.len());
    assert_eq!(stream.stats().tensors, truth.len());
}

#[test]
fn stream_yields_tensors_before_the_load_ends() {
    let dir = scratch();
    let specs: Vec<(String, Dtype, Vec<usize>)> =
        (0..32).map(|i| (format!("t{i:02}"), Dtype::F32, vec![64, 1024])).collect();
    let specs_ref: Vec<Spec<'_>> = specs.iter().map(|(n, d, s)| (n.as_str(), *d, s.as_slice())).collect();
    let path = dir.join("m.safetensors");
    write_shard(&path, &specs_ref);
    let done = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    let (d, t) = (Arc::clone(&done), Arc::clone(&total));
    let loader = base()
        .chunk_size(64 << 10)
        .staging_budget(128 << 10)
        .progress(move |p| {
            d.store(p.done, Ordering::SeqCst);
            t.store(p.total, Ordering::SeqCst);
        })
        .build()
        .unwrap();
    let mut stream = loader.stream_blocking(&path).unwrap();
    let first = tensorlift::block_on(stream.next()).unwrap().unwrap();
    assert_eq!(first.name(), "t00");
    let (d, t) = (done.load(Ordering::SeqCst), total.load(Ordering::SeqCst));
    assert!(d < t / 4, "first tensor came after {d} of {t} bytes");
    while tensorlift::block_on(stream.next()).is_some() {}
    assert_eq!(done.load(Ordering::SeqCst), total.load(Ordering::SeqCst));
}

#[test]
fn staging_budget_bounds_bytes_in_flight() {
    let dir = scratch();
    let path = dir.join("m.safetensors");
    let full = write_shard(&path, &[("a", Dtype::U8, &[5 << 20]), ("b", Dtype::U8, &[3 << 20])]);
    // A budget smaller than a chunk (64 KiB, 12 KiB) holds too: the chunks shrink to half of it.
    for budget in [12 << 10, 64 << 10, 1 << 20, 3 << 20] {
        let loader = base().chunk_size(256 << 10).staging_budget(budget).queue_depth(1024).build().unwrap();
        let model = loader.load_blocking(&path).unwrap();
        let peak = model.stats().max_in_flight_bytes;
        assert!(peak <= budget as u64, "budget {budget}: peak {peak}");
        assert!(peak > 0);
        for name in ["a", "b"] {
            assert!(model.get(name).unwrap().bytes().unwrap() == full[name].as_slice(), "budget {budget}: {name}");
        }
    }
}

#[test]
fn filter_reads_only_selected_tensors() {
    let dir = scratch();
    let a: Vec<Spec<'_>> =
        vec![("model.layers.0.w", Dtype::F16, &[64, 64]), ("model.layers.1.w", Dtype::F16, &[1024, 1024])];
    let b: Vec<Spec<'_>> = vec![("model.layers.10.w", Dtype::F16, &[64, 64]), ("lm_head", Dtype::F32, &[8])];
    let truth = write_sharded(&dir, &[&a, &b]);
    let loader = base().filter(["model.layers.?.w", "lm_head"]).build().unwrap();
    let model = loader.load_blocking(&dir).unwrap();
    let names: Vec<_> = model.tensors().iter().map(|t| t.name().to_owned()).collect();
    assert_eq!(names, ["lm_head", "model.layers.0.w", "model.layers.1.w"]);
    for n in &names {
        assert!(model.get(n).unwrap().bytes().unwrap() == truth[n].as_slice());
    }
    // Only the selected tensors' bytes (plus page padding) were read.
    let selected: u64 = names.iter().map(|n| truth[n].len() as u64).sum();
    assert!(model.stats().bytes_read < selected + 4 * 4096 + 2 * (1 << 20), "{}", model.stats().bytes_read);
    let only_b = base().filter(["lm_head"]).build().unwrap().load_blocking(&dir).unwrap();
    assert_eq!(only_b.stats().shards, 1);
    assert!(matches!(base().filter(["[oops"]).build(), Err(tensorlift::LoadError::InvalidFilter { .. })));
}

/// The files the other tests write (with tensorlift's header encoder, and the truth the
/// writer keeps) are the reference's: Python `safetensors` reads every tensor of `quirky()`
/// to the same dtype, shape and bytes as the truth holds.
#[test]
fn the_reference_reads_the_test_fixtures_as_their_truth() {
    let dir = scratch();
    let path = dir.join("quirky.safetensors");
    let truth = write_shard(&path, &quirky());
    let script = "import hashlib, json, sys, safetensors\n\
        got = safetensors.deserialize(open(sys.argv[1], 'rb').read())\n\
        print(json.dumps({n: [t['dtype'], t['shape'], hashlib.sha256(bytes(t['data'])).hexdigest()] for n, t in got}))";
    let out = Command::new("python3").args(["-c", script]).arg(&path).output().expect("python3 is needed");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: BTreeMap<String, (String, Vec<usize>, String)> = serde_json::from_slice(&out.stdout).unwrap();
    let want: BTreeMap<String, (String, Vec<usize>, String)> = quirky()
        .into_iter()
        .map(|(n, d, shape)| {
            (n.to_owned(), (d.to_string(), shape.to_vec(), format!("{:x}", Sha256::digest(&truth[n]))))
        })
        .collect();
    assert_eq!(got, want);
}

#[test]
fn reference_python_files_load_identically() {
    let dir = scratch();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/reference/make_fixture.py");
    let out =
        Command::new("python3").arg(&script).arg(&dir).output().expect("python3 is needed for the reference tests");
    assert!(out.status.success(), "pip install -r requirements-test.txt: {}", String::from_utf8_lossy(&out.stderr));
    let manifest: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    for (what, loader) in loaders(4096) {
        let single = loader.load_blocking(dir.join("single.safetensors")).unwrap();
        let sharded = loader.load_blocking(dir.join("sharded")).unwrap();
        assert_eq!(single.len() + sharded.len(), manifest.len());
        for m in &manifest {
            let name = m["name"].as_str().unwrap();
            let model = if m["file"] == "single.safetensors" { &single } else { &sharded };
            let t = model.get(name).unwrap();
            let digest = format!("{:x}", Sha256::digest(t.bytes().unwrap()));
            assert_eq!(digest, m["sha256"].as_str().unwrap(), "{what}: {name}");
            assert_eq!(t.dtype().to_string(), m["dtype"].as_str().unwrap());
        }
    }
}

#[test]
fn device_choice() {
    use tensorlift::{Device, LoadError, Loader};
    assert_eq!(Loader::builder().device(Device::Auto).build().unwrap().device(), Device::Cpu);
    match Loader::builder().device(Device::Cuda(0)).build() {
        Err(LoadError::CudaUnavailable { ordinal: 0, reason, .. }) => assert!(!reason.is_empty()),
        other => panic!("{other:?}"),
    }
    assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
    assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
    assert!("gpu".parse::<Device>().is_err());
}

/// The bytes of each tensor of a PyTorch fixture, from its `.expect.json` (written by
/// PyTorch itself, see crates/tensorlift-pickle/tests/fixtures).
fn torch_expected(json: &str) -> BTreeMap<String, Vec<u8>> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let hex = |s: &str| (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect();
    v.as_object().unwrap().iter().map(|(k, t)| (k.clone(), hex(t["hex"].as_str().unwrap()))).collect()
}

/// A PyTorch file whose `lm_head.weight` is `embed.weight` (tied), beside views of the
/// same storage: every name gets its bytes, and the twins are one read and one piece of
/// memory, as `torch.load` makes them one storage.
#[test]
fn tied_pytorch_weights_are_read_once_and_share_memory() {
    let truth = torch_expected(include_str!("../../../tensorlift-pickle/tests/fixtures/tied.expect.json"));
    for (file, bytes) in [
        ("tied.zip.bin", &include_bytes!("../../../tensorlift-pickle/tests/fixtures/tied.zip.bin")[..]),
        ("tied.legacy.bin", &include_bytes!("../../../tensorlift-pickle/tests/fixtures/tied.legacy.bin")[..]),
    ] {
        let dir = scratch();
        std::fs::write(dir.join("pytorch_model.bin"), bytes).unwrap();
        // The storage's bytes, from the page they start in: the twins (and the views that
        // follow in order) are one read of them, the view inside them another; a read per
        // tensor, as before, would be five.
        let plan = tensorlift::plan(&dir).unwrap();
        let start = plan.tensors().iter().map(|t| t.file_range.start).min().unwrap();
        let end = plan.tensors().iter().map(|t| t.file_range.end).max().unwrap();
        let pass = end - start / 4096 * 4096;
        for (what, loader) in loaders(4096) {
            let what = format!("{file} {what}");
            let model = loader.load_blocking(&dir).unwrap();
            assert_identical(&model, &truth, &what);
            let ptr = |name: &str| model.get(name).unwrap().bytes().unwrap().as_ptr();
            assert_eq!(ptr("embed.weight"), ptr("lm_head.weight"), "{what}");
            // Each twin says it shares its bytes (a consumer that writes one changes the
            // other); a tensor of a storage of its own, or of no bytes, does not.
            let shares = |name: &str| model.get(name).unwrap().shares_bytes();
            assert!(shares("embed.weight") && shares("lm_head.weight"), "{what}");
            assert!(!shares("other") && !shares("empty"), "{what}");
            if model.stats().bytes_read > 0 {
                assert!(model.stats().bytes_read <= 2 * pass, "{what}: read {} of {pass}", model.stats().bytes_read);
            }
        }
    }
}

/// A plan kept open (as Python's `safe_open` keeps one) loads named tensors, one call at a
/// time or several at once, each with the file's bytes; a name the plan lacks loads nothing.
#[test]
fn named_tensors_load_from_a_plan_made_earlier() {
    let dir = scratch();
    let path = dir.join("m.safetensors");
    let full = write_shard(&path, &[("a", Dtype::U8, &[3000]), ("b", Dtype::F32, &[7, 3]), ("c", Dtype::I64, &[5])]);
    let loader = base().build().unwrap();
    let plan = loader.plan(&path).unwrap();
    for name in ["c", "a", "b"] {
        let model = loader.load_named_blocking(&plan, &[name]).unwrap();
        assert_eq!(model.len(), 1);
        assert!(model.get(name).unwrap().bytes().unwrap() == full[name].as_slice(), "{name}");
    }
    let model = loader.load_named_blocking(&plan, &["b", "nope", "a", "b"]).unwrap();
    let names: Vec<&str> = model.tensors().iter().map(|t| t.name()).collect();
    assert_eq!(names, ["a", "b"]);
    assert!(loader.load_named_blocking(&plan, &["nope"]).unwrap().is_empty());
    // The plan is as it was: every tensor still there.
    assert_eq!(plan.tensors().len(), 3);
}
