//! tensorlift's candle integration: a BERT written by the reference writer gives the same
//! outputs through tensorlift as through candle's own loader; slices, conversion and every
//! dtype reach candle as the file holds them; what candle cannot hold is a clear error.

use std::path::PathBuf;
use std::process::Command;

use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;
use tensorlift::candle::{CandleError, Handover};
use tensorlift::{Dtype, Loader, TensorSlice};
use tensorlift_testkit::{slice_bytes, write_shard};

fn scratch() -> PathBuf {
    tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-candle-")
}

/// The CUDA driver the tests use: the emulated one here, the real one on a GPU host.
fn use_test_driver() {
    if !tensorlift_testkit::real_driver() {
        // SAFETY: tensorlift's emulated driver, which defines the driver API as it is.
        unsafe { tensorlift_cuda::use_driver_library(tensorlift_testkit::emulated_driver()) };
    }
}

fn host() -> tensorlift::LoaderBuilder {
    Loader::builder().device(tensorlift::Device::Cpu)
}

#[test]
fn a_bert_gives_the_same_outputs_as_with_candles_own_loader() {
    let dir = scratch();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/make_model.py");
    // The reference writer, from the Python environment the test command puts first on PATH.
    let out = Command::new("python3").arg(script).arg(&dir).output().expect("python3 runs the reference writer");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let c = candle_bert::compare(&dir).unwrap();
    assert_eq!(c.shape, [2, 8, 64]);
    assert_eq!(c.max_abs_diff, 0.0, "the two models differ");
    assert_eq!(c.handover, Handover::Moved);
}

#[test]
fn tensors_reach_candle_as_the_file_holds_them() {
    let dir = scratch();
    let path = dir.join("m.safetensors");
    let specs: &[(&str, Dtype, &[usize])] = &[
        ("u8", Dtype::U8, &[5]),
        ("u32", Dtype::U32, &[3]),
        ("i16", Dtype::I16, &[4]),
        ("i32", Dtype::I32, &[2, 2]),
        ("i64", Dtype::I64, &[3]),
        ("bf16", Dtype::BF16, &[3, 5]),
        ("f16", Dtype::F16, &[7]),
        ("f32", Dtype::F32, &[2, 3]),
        ("f64", Dtype::F64, &[2]),
        ("e4m3", Dtype::F8_E4M3, &[6]),
        ("empty", Dtype::F32, &[0, 3]),
        ("u16", Dtype::U16, &[2, 3]),
    ];
    let full = write_shard(&path, specs);
    let model = tensorlift::candle::load(host(), &path).unwrap();
    assert_eq!(model.len(), specs.len());
    assert_eq!(model.handover(), Handover::Moved);
    for &(name, dtype, shape) in specs {
        let t = model.get(name).unwrap();
        assert_eq!(t.dims(), shape, "{name}");
        if dtype == Dtype::U16 {
            // candle has no u16: its own reader widens them to u32, and so does tensorlift.
            assert_eq!(t.dtype(), DType::U32);
            let want: Vec<u32> = full[name].chunks(2).map(|b| u32::from(u16::from_le_bytes([b[0], b[1]]))).collect();
            assert_eq!(t.flatten_all().unwrap().to_vec1::<u32>().unwrap(), want);
            continue;
        }
        assert_eq!(t.dtype(), DType::try_from(dtype).unwrap(), "{name}");
        // The bytes candle holds, read back through its own F32/U8 views.
        let bytes: Vec<u8> = match dtype {
            Dtype::U8 => t.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
            Dtype::U32 => {
                t.flatten_all().unwrap().to_vec1::<u32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            Dtype::I16 => {
                t.flatten_all().unwrap().to_vec1::<i16>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            Dtype::I32 => {
                t.flatten_all().unwrap().to_vec1::<i32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            Dtype::I64 => {
                t.flatten_all().unwrap().to_vec1::<i64>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            Dtype::BF16 => {
                t.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            Dtype::F16 => {
                t.flatten_all().unwrap().to_vec1::<half::f16>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            Dtype::F32 => {
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            Dtype::F64 => {
                t.flatten_all().unwrap().to_vec1::<f64>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            // fp8: compare its F32 values with the file's, decoded.
            _ => {
                let got = t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                let want: Vec<f32> = full[name].iter().map(|&b| tensorlift::convert::f8_e4m3fn_to_f32(b)).collect();
                assert!(got.iter().zip(&want).all(|(a, b)| a == b || (a.is_nan() && b.is_nan())), "{name}");
                continue;
            }
        };
        assert!(bytes == full[name], "{name}");
    }
}

#[test]
fn slices_and_conversion_reach_candle_through_the_var_builder() {
    let dir = scratch();
    let path = dir.join("m.safetensors");
    let full = write_shard(&path, &[("w", Dtype::F32, &[8, 6]), ("b", Dtype::F32, &[8])]);
    let builder = host().slice("w", TensorSlice::new([2..6, 1..4])).convert_to(Dtype::BF16);
    let model = tensorlift::candle::load(builder, &path).unwrap();
    let w = model.get("w").unwrap();
    assert_eq!((w.dims(), w.dtype()), (&[4usize, 3][..], DType::BF16));
    let want: Vec<half::bf16> = slice_bytes(&full["w"], &[8, 6], 4, &[2..6, 1..4])
        .chunks(4)
        .map(|c| half::bf16::from_f32(f32::from_le_bytes(c.try_into().unwrap())))
        .collect();
    let got = w.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap();
    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())));
    // Through the backend: its shape is checked, its dtype converted by candle on request.
    assert!(model.contains_tensor("w") && !model.contains_tensor("nope"));
    let as_f32 = model.get_unchecked("w", DType::F32, &Device::Cpu).unwrap();
    assert_eq!(as_f32.dtype(), DType::F32);
    let wrong = SimpleBackend::get(&model, (8, 6).into(), "w", candle_nn::Init::Const(0.0), DType::F32, &Device::Cpu);
    assert!(wrong.unwrap_err().to_string().contains("shape mismatch for w"));
    let vb = model.into_var_builder(DType::F32, Device::Cpu);
    assert_eq!(vb.get((4, 3), "w").unwrap().dtype(), DType::F32);
}

#[test]
fn what_candle_cannot_hold_is_an_error_naming_the_tensor() {
    let dir = scratch();
    let path = dir.join("m.safetensors");
    write_shard(&path, &[("w", Dtype::F32, &[1 << 16]), ("flags", Dtype::BOOL, &[4])]);
    // Refused as the load is planned: not a byte of the file is read first.
    let read = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let r = std::sync::Arc::clone(&read);
    let builder = host().progress(move |p| {
        r.fetch_max(p.done, std::sync::atomic::Ordering::SeqCst);
    });
    match tensorlift::candle::load(builder, &path) {
        Err(CandleError::Unsupported { tensor, dtype }) => assert_eq!((tensor.as_str(), dtype), ("flags", Dtype::BOOL)),
        other => panic!("{other:?}"),
    }
    assert_eq!(read.load(std::sync::atomic::Ordering::SeqCst), 0, "bytes were read before the refusal");
    match tensorlift::candle::load(host(), dir.join("missing")) {
        Err(CandleError::Load(_)) => {}
        other => panic!("{other:?}"),
    }
}

/// A load onto a GPU (the emulated driver here, a real one on a GPU host) is copied back to
/// the host for candle, and says so.
#[test]
fn a_device_load_is_copied_back_for_candle() {
    use_test_driver();
    let dir = scratch();
    let path = dir.join("m.safetensors");
    let full = write_shard(&path, &[("w", Dtype::F16, &[3, 4])]);
    let builder = Loader::builder().device(tensorlift::Device::Cuda(0)).convert_to(Dtype::F32);
    let model = tensorlift::candle::load(builder, &path).unwrap();
    assert_eq!(model.handover(), Handover::CopiedFromDevice);
    let w = model.get("w").unwrap();
    assert_eq!((w.dims(), w.dtype()), (&[3usize, 4][..], DType::F32));
    let want: Vec<f32> = full["w"].chunks(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
    let got = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())));
}

/// `load` gives host tensors: with no device named, it loads into host memory, not onto a
/// GPU that `auto` would choose (to copy each tensor back, and fail where the model is larger
/// than the GPU).
#[test]
fn a_load_that_names_no_device_goes_straight_to_the_host() {
    use_test_driver();
    let dir = scratch();
    let path = dir.join("m.safetensors");
    let full = write_shard(&path, &[("w", Dtype::F32, &[3, 4])]);
    for builder in [Loader::builder(), Loader::builder().device(tensorlift::Device::Auto)] {
        let model = tensorlift::candle::load(builder, &path).unwrap();
        assert_eq!(model.handover(), Handover::Moved);
        assert_eq!(model.stats().device, tensorlift::Device::Cpu);
        let got: Vec<u8> = model
            .get("w")
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(got, full["w"]);
    }
}

/// Found by an audit for panics: a tensor the file claims is larger than the host's memory
/// (a sparse file of 1 PiB on tmpfs takes none) made the buffer lent to candle an allocation that
/// panicked, or, where memory is overcommitted, one that the reads would fill until the
/// process was killed. It is an error before anything is read.
#[test]
fn a_tensor_larger_than_memory_is_an_error_not_a_panic() {
    let Ok(dir) = tensorlift_testkit::try_scratch_in(std::path::Path::new("/dev/shm"), "tl-candle-huge-") else {
        eprintln!("skipped: no /dev/shm to hold a sparse file of 1 PiB");
        return;
    };
    let path = dir.join("huge.safetensors");
    let n = 1u64 << 50;
    let json = format!(r#"{{"w":{{"dtype":"F32","shape":[{}],"data_offsets":[0,{n}]}}}}"#, n / 4);
    let mut head = (json.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(json.as_bytes());
    let f = std::fs::File::create(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &head, 0).unwrap();
    f.set_len(head.len() as u64 + n).unwrap();
    let got = tensorlift::candle::load(host(), &path);
    let _ = std::fs::remove_dir_all(&dir);
    let err = match got {
        Err(CandleError::Load(e)) => e.to_string(),
        other => panic!("{other:?}"),
    };
    assert!(err.contains("host memory"), "{err}");
}
