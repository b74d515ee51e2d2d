//! Caller-owned destinations on the host: tensors land in the caller's memory, checked
//! against an independent reading of the file; misuse is an error before any read.

use std::collections::BTreeMap;

use tensorlift::place::{Destination, HostBuffer, TensorRequest};
use tensorlift::{Dtype, LoadError, TensorSlice};
use tensorlift_testkit::slice_bytes;

use crate::support::{base, reading_loaders_with, scratch, write_shard, Spec};

const TENSORS: &[Spec<'static>] = &[
    ("ids", Dtype::I32, &[100, 8]),
    ("q", Dtype::F32, &[16, 8]),
    ("k", Dtype::F32, &[8, 8]),
    ("v", Dtype::F32, &[8, 8]),
    ("odd", Dtype::U8, &[4099]),
    ("m", Dtype::F32, &[6, 10]),
    ("h", Dtype::F16, &[33]),
    ("empty", Dtype::F32, &[0]),
];

/// q, k and v back to back in one fused buffer, `odd` (misaligned in the file) in a buffer of
/// its own at an odd offset, a gathered slice of `m`, and `h` converted to F32: all the
/// caller's; `ids` is tensorlift's.
#[test]
fn tensors_land_in_the_callers_memory_on_every_backend() {
    let dir = scratch();
    let path = dir.join("model.safetensors");
    let full = write_shard(&path, TENSORS);
    let (q, k, v) = (16 * 8 * 4, 8 * 8 * 4, 8 * 8 * 4);
    let mut want: BTreeMap<String, Vec<u8>> = full.clone();
    want.insert("m".into(), slice_bytes(&full["m"], &[6, 10], 4, &[1..5, 2..9]));
    let h32: Vec<u8> =
        full["h"].chunks(2).flat_map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32().to_le_bytes()).collect();
    for chunk in [4096, 1 << 20] {
        let qkv = HostBuffer::new(vec![0u8; q + k + v]);
        let other = HostBuffer::new(vec![0xAAu8; 8192]);
        let (a, b) = (qkv.clone(), other.clone());
        let rule = move |t: &TensorRequest<'_>| -> Result<Option<Destination>, String> {
            Ok(match t.name {
                "q" => Some(Destination::host(&a, 0)),
                "k" => Some(Destination::host(&a, q)),
                "v" => Some(Destination::host(&a, q + k)),
                "odd" => Some(Destination::host(&b, 1)),
                "m" => Some(Destination::host(&b, 4101)),
                "h" => {
                    assert_eq!((t.dtype, t.bytes), (Dtype::F32, 33 * 4), "requests are as loaded");
                    Some(Destination::host(&b, 4101 + 112))
                }
                "empty" => Some(Destination::host(&b, 0)),
                _ => None,
            })
        };
        // Only `h` is F16: converting F16 to F32 converts it alone.
        let more = |bl: tensorlift::LoaderBuilder| {
            bl.place_with(rule.clone()).slice("m", TensorSlice::new([1..5, 2..9])).convert_to(Dtype::F32)
        };
        for (what, loader) in reading_loaders_with(chunk, more) {
            let model = loader.load_blocking(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
            for (name, bytes) in &want {
                let t = model.get(name).unwrap();
                let got = t.bytes().unwrap();
                let bytes = if name == "h" { &h32 } else { bytes };
                assert!(got == bytes.as_slice(), "{what}: {name}");
            }
            assert_eq!(model.get("h").unwrap().dtype(), Dtype::F32);
            // The memory is the caller's: it cannot be taken back while tensors use it.
            let qkv = qkv.clone().into_inner().unwrap_err();
            drop((model, loader, qkv));
        }
        drop(rule);
        let bytes = *qkv.into_inner().unwrap().downcast::<Vec<u8>>().unwrap();
        assert!(bytes == [&full["q"][..], &full["k"][..], &full["v"][..]].concat(), "chunk {chunk}: fused buffer");
        let bytes = *other.into_inner().unwrap().downcast::<Vec<u8>>().unwrap();
        assert_eq!(bytes[0], 0xAA, "nothing written outside the tensors");
        assert!(bytes[1..4100] == full["odd"][..]);
        assert!(bytes[4101..4101 + 112] == want["m"][..]);
        assert!(bytes[4213..4213 + 132] == h32[..]);
        assert!(bytes[4213 + 132..].iter().all(|&b| b == 0xAA));
    }
}

#[test]
fn misplaced_tensors_are_refused_before_reading() {
    let dir = scratch();
    let path = dir.join("model.safetensors");
    write_shard(&path, TENSORS);
    let small = HostBuffer::new(vec![0u8; 100]);
    let shared = HostBuffer::new(vec![0u8; 4096]);
    let place = |rule: fn(&TensorRequest<'_>, &HostBuffer, &HostBuffer) -> Option<Destination>| {
        let (s, b) = (small.clone(), shared.clone());
        base().place_with(move |t: &TensorRequest<'_>| Ok(rule(t, &s, &b))).build().unwrap().load_blocking(&path)
    };
    let cases: Vec<(LoadError, &str, &str)> = vec![
        (
            place(|t, s, _| (t.name == "q").then(|| Destination::host(s, 0))).unwrap_err(),
            "q",
            "do not fit in 100 bytes",
        ),
        (
            place(|t, _, b| match t.name {
                "k" => Some(Destination::host(b, 0)),
                "v" => Some(Destination::host(b, 128)),
                _ => None,
            })
            .unwrap_err(),
            "v",
            "overlap",
        ),
    ];
    for (e, tensor, says) in cases {
        match e {
            LoadError::Destination { tensor: t, message, .. } => {
                assert_eq!(t, tensor);
                assert!(message.contains(says), "{message}");
            }
            e => panic!("{e}"),
        }
    }
    // A rule's own refusal names the tensor.
    let e = base()
        .place_with(|t: &TensorRequest<'_>| if t.name == "k" { Err("no room for k".to_owned()) } else { Ok(None) })
        .build()
        .unwrap()
        .load_blocking(&path)
        .unwrap_err();
    assert!(
        matches!(&e, LoadError::Destination { tensor, message, .. } if tensor == "k" && message == "no room for k")
    );
    // Device memory for a host load is the wrong device.
    // SAFETY: the address is never used: the load refuses it before any driver call.
    let lent = unsafe { tensorlift::place::LentMemory::new(1 << 40, 4096, ()) };
    let gpu_buf = tensorlift::place::DeviceBuffer::new(tensorlift::Device::Cuda(0), lent);
    let e = base()
        .place_with(move |_: &TensorRequest<'_>| Ok(Some(Destination::device(&gpu_buf, 0))))
        .build()
        .unwrap()
        .load_blocking(&path)
        .unwrap_err();
    assert!(e.to_string().contains("device memory on cuda:0 was given for a load to the host"), "{e}");
    // Claims end with the failed loads: the memory is the caller's again.
    assert!(small.into_inner().is_ok() && shared.into_inner().is_ok());
}
