//! fp8 decoding against an independent implementation: `ml_dtypes`, the package JAX and
//! numpy users get float8 from (installed by the test command).

use std::process::Command;

use tensorlift::convert::{f8_e4m3fn_to_f32, f8_e5m2_to_f32};

fn reference(ty: &str) -> Vec<u32> {
    let script = format!(
        "import ml_dtypes, numpy as np; v = np.arange(256, dtype=np.uint8).view(ml_dtypes.{ty}).astype(np.float32); \
         print(' '.join(str(x) for x in v.view(np.uint32)))"
    );
    let out = Command::new("python3").args(["-c", &script]).output().expect("python3 with ml_dtypes (./scripts/test)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().split_whitespace().map(|w| w.parse().unwrap()).collect()
}

#[test]
fn every_fp8_value_matches_ml_dtypes() {
    for (ty, decode) in [("float8_e4m3fn", f8_e4m3fn_to_f32 as fn(u8) -> f32), ("float8_e5m2", f8_e5m2_to_f32)] {
        let want = reference(ty);
        assert_eq!(want.len(), 256);
        for (b, &w) in want.iter().enumerate() {
            let got = decode(b as u8);
            let w = f32::from_bits(w);
            assert!(got.to_bits() == w.to_bits() || (got.is_nan() && w.is_nan()), "{ty} {b:#04x}: {got} vs {w}");
        }
    }
}

/// `convert_to` converts floating-point tensors as they land (checked here against `half`
/// applied to the written bytes), and leaves the others as stored.
#[test]
fn loads_convert_floating_tensors_as_they_land() {
    use half::{bf16, f16};
    use tensorlift::{Dtype, Loader};
    let dir = tensorlift_testkit::scratch_in(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")), "tl-convert-");
    let path = dir.join("m.safetensors");
    let truth = tensorlift_testkit::write_shard(
        &path,
        &[
            ("bf", Dtype::BF16, &[33, 7]),
            ("hf", Dtype::F16, &[100]),
            ("f", Dtype::F32, &[9]),
            ("e4", Dtype::F8_E4M3, &[256]),
            ("ids", Dtype::I32, &[5]),
            ("mask", Dtype::U8, &[3]),
        ],
    );
    let as_f32 = |name: &str, dtype: Dtype| -> Vec<f32> {
        let b = &truth[name];
        match dtype {
            Dtype::BF16 => b.chunks(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F16 => b.chunks(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F32 => b.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            _ => b.iter().map(|&x| tensorlift::convert::f8_e4m3fn_to_f32(x)).collect(),
        }
    };
    let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
    // Reads into tensorlift's memory, and zero-copy mapped views (converted out of the map).
    let loaders = |to| {
        let b = Loader::builder().device(tensorlift::Device::Cpu).convert_to(to).chunk_size(4096);
        [b.clone().build().unwrap(), b.map_views(crate::support::map_contract()).build().unwrap()]
    };
    for (to, loader) in [Dtype::F32, Dtype::BF16, Dtype::F16].into_iter().flat_map(|to| loaders(to).map(|l| (to, l))) {
        let model = loader.load_blocking(&path).unwrap();
        let floats: [(&str, Dtype, &[usize]); 4] = [
            ("bf", Dtype::BF16, &[33, 7]),
            ("hf", Dtype::F16, &[100]),
            ("f", Dtype::F32, &[9]),
            ("e4", Dtype::F8_E4M3, &[256]),
        ];
        for (name, from, shape) in floats {
            let t = model.get(name).unwrap();
            assert_eq!(t.dtype(), to, "{name}");
            assert_eq!(t.shape(), shape, "{name}");
            let want = as_f32(name, from);
            let got: Vec<f32> = match to {
                Dtype::F32 => t.to_vec::<f32>().unwrap(),
                Dtype::BF16 => t.to_vec::<bf16>().unwrap().iter().map(|v| v.to_f32()).collect(),
                _ => t.to_vec::<f16>().unwrap().iter().map(|v| v.to_f32()).collect(),
            };
            assert_eq!(got.len(), want.len(), "{name}");
            for (g, w) in got.iter().zip(&want) {
                let w = match to {
                    Dtype::F32 => *w,
                    Dtype::BF16 => bf16::from_f32(*w).to_f32(),
                    _ => f16::from_f32(*w).to_f32(),
                };
                assert!(same(*g, w), "{name} -> {to}: {g} vs {w}");
            }
        }
        assert_eq!(model.get("ids").unwrap().dtype(), Dtype::I32);
        assert!(model.get("ids").unwrap().bytes().unwrap() == truth["ids"].as_slice());
        assert!(model.get("mask").unwrap().bytes().unwrap() == truth["mask"].as_slice());
    }
    // Targets other than BF16, F16 and F32 are refused when the loader is built.
    assert!(Loader::builder().device(tensorlift::Device::Cpu).convert_to(Dtype::I8).build().is_err());
}

/// Converted tensors are written into memory of their own, which a loader's next load
/// takes back (as it takes the stored bytes' memory): the second load's values are its own
/// file's, not the first's left in reused memory.
#[test]
fn converted_tensors_reuse_memory_across_loads() {
    use half::{bf16, f16};
    use tensorlift::{Dtype, Loader};
    let dir = tensorlift_testkit::scratch_in(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")), "tl-convert-");
    // The same layout twice, other bytes (the names pick the pattern).
    let first = tensorlift_testkit::write_shard(
        &dir.join("one.safetensors"),
        &[("a", Dtype::BF16, &[300, 700]), ("b", Dtype::F16, &[1 << 18]), ("n", Dtype::I32, &[9])],
    );
    let second = tensorlift_testkit::write_shard(
        &dir.join("two.safetensors"),
        &[("c", Dtype::BF16, &[300, 700]), ("d", Dtype::F16, &[1 << 18]), ("m", Dtype::I32, &[9])],
    );
    let want = |bytes: &[u8], from: Dtype| -> Vec<u32> {
        bytes
            .chunks(2)
            .map(|c| match from {
                Dtype::BF16 => bf16::from_le_bytes([c[0], c[1]]).to_f32().to_bits(),
                _ => f16::from_le_bytes([c[0], c[1]]).to_f32().to_bits(),
            })
            .collect()
    };
    let loader = Loader::builder().device(tensorlift::Device::Cpu).convert_to(Dtype::F32).build().unwrap();
    let check = |model: &tensorlift::Model, truth: &std::collections::BTreeMap<String, Vec<u8>>, names: [&str; 3]| {
        for (name, from) in [(names[0], Dtype::BF16), (names[1], Dtype::F16)] {
            let t = model.get(name).unwrap();
            assert_eq!(t.dtype(), Dtype::F32);
            let got: Vec<u32> = t.to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect();
            let w = want(&truth[name], from);
            assert_eq!(got.len(), w.len(), "{name}");
            // Bit for bit, NaN payloads aside.
            let nan = |b: u32| f32::from_bits(b).is_nan();
            let bad = got.iter().zip(&w).position(|(&g, &w)| g != w && !(nan(g) && nan(w)));
            assert_eq!(bad, None, "{name}: first difference");
        }
        assert!(model.get(names[2]).unwrap().bytes().unwrap() == truth[names[2]].as_slice());
    };
    let m = loader.load_blocking(dir.join("one.safetensors")).unwrap();
    check(&m, &first, ["a", "b", "n"]);
    assert_eq!(m.stats().reused_host_bytes, 0);
    drop(m);
    let m = loader.load_blocking(dir.join("two.safetensors")).unwrap();
    check(&m, &second, ["c", "d", "m"]);
    // The converted tensors' memory (4 bytes an element) came back, and the stored bytes'.
    let converted = (300 * 700 * 4 + (1 << 18) * 4) as u64;
    assert!(m.stats().reused_host_bytes >= converted + (300 * 700 * 2), "{}", m.stats().reused_host_bytes);
}
