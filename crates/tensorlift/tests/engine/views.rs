//! Typed views: the right dtype and alignment, or an exact refusal.

use tensorlift::{Dtype, ViewError};

use crate::support::*;

#[test]
fn typed_views() {
    let dir = scratch();
    let path = dir.join("v.safetensors");
    write_shard(
        &path,
        &[
            ("f", Dtype::F32, &[4]),
            ("b", Dtype::U8, &[1]),
            ("odd", Dtype::F32, &[2]),
            ("h", Dtype::F16, &[3]),
            ("bf", Dtype::BF16, &[2]),
        ],
    );
    let raw = std::fs::read(&path).unwrap();
    let model = base().build().unwrap().load_blocking(&path).unwrap();
    let f = model.get("f").unwrap();
    let vals: &[f32] = f.as_slice().unwrap();
    let want: Vec<f32> = f.bytes().unwrap().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(vals.len(), 4);
    assert!(vals.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert!(matches!(f.as_slice::<f64>(), Err(ViewError::Dtype { actual: Dtype::F32, requested: Dtype::F64, .. })));
    assert!(matches!(f.as_slice::<u8>(), Err(ViewError::Dtype { .. })));
    // "odd" starts one byte after a 4-aligned position of the file. Read, it lands in memory
    // of its own, aligned, as the reference's reads are: a view works (it was refused).
    let data = raw.len() - model.tensors().iter().map(|t| t.len()).sum::<usize>();
    let odd_bytes = &raw[data + 16 + 1..data + 16 + 1 + 8];
    let odd = model.get("odd").unwrap();
    let vals: &[f32] = odd.as_slice().unwrap();
    assert_eq!((vals.len(), odd.bytes().unwrap()), (2, odd_bytes));
    // Mapped, it is where the file has it (as the reference's mapped tensors are): a view is
    // refused, a copy works.
    let mapped = base().map_views(map_contract()).build().unwrap().load_blocking(&path).unwrap();
    let odd = mapped.get("odd").unwrap();
    assert!(matches!(odd.as_slice::<f32>(), Err(ViewError::Misaligned { align: 4, .. })));
    let copied: Vec<f32> = odd.to_vec().unwrap();
    assert_eq!(copied.len(), 2);
    assert_eq!(copied[0].to_le_bytes(), odd_bytes[..4]);
    let h: Vec<half::f16> = model.get("h").unwrap().to_vec().unwrap();
    assert_eq!(h.len(), 3);
    let bf: Vec<half::bf16> = model.get("bf").unwrap().to_vec().unwrap();
    assert_eq!(bf[1].to_bits().to_le_bytes(), model.get("bf").unwrap().bytes().unwrap()[2..4]);
    // The bytes are the file's own bytes.
    let start = raw.len() - model.tensors().iter().map(|t| t.len()).sum::<usize>();
    assert_eq!(&raw[start..start + 16], f.bytes().unwrap());
}

/// A tensor with no elements may name any size for another dimension (as the reference
/// reads it); DLPack's sizes are signed, so its export is refused, never a negative size.
#[test]
fn a_dimension_past_dlpacks_is_refused_by_its_export() {
    let dir = scratch();
    let path = dir.join("e.safetensors");
    let json = br#"{"e":{"dtype":"F32","shape":[0,18446744073709551615],"data_offsets":[0,0]},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(json);
    file.extend_from_slice(&[0u8; 8]);
    std::fs::write(&path, file).unwrap();
    let model = base().build().unwrap().load_blocking(&path).unwrap();
    let e = model.get("e").unwrap();
    assert_eq!((e.shape(), e.len()), (&[0, usize::MAX][..], 0));
    let refused =
        |r: Result<(), ViewError>| matches!(r, Err(ViewError::NoDlpackShape { ref tensor, .. }) if tensor == "e");
    assert!(refused(e.to_dlpack().map(|_| ())), "versioned");
    assert!(refused(e.to_dlpack_legacy().map(|_| ())), "legacy");
}
