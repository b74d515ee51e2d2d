//! Generated headers round-trip; mutated or arbitrary bytes never panic.

use std::path::Path;

use proptest::prelude::*;
use tensorlift_format::{encode_header, parse_header, Dtype};

const DTYPES: [Dtype; 12] = [
    Dtype::BOOL,
    Dtype::U8,
    Dtype::F8_E4M3,
    Dtype::I16,
    Dtype::F16,
    Dtype::BF16,
    Dtype::F32,
    Dtype::I32,
    Dtype::F64,
    Dtype::C64,
    Dtype::U64,
    Dtype::F4,
];

fn tensors() -> impl Strategy<Value = Vec<(String, Dtype, Vec<usize>)>> {
    prop::collection::btree_map(
        "[a-z][a-z0-9._]{0,12}",
        (0..DTYPES.len(), prop::collection::vec(0usize..6, 0..4)),
        0..12,
    )
    .prop_map(|m| {
        m.into_iter()
            .map(|(name, (d, mut shape))| {
                // F4 needs an even element count to fill whole bytes.
                if DTYPES[d] == Dtype::F4 {
                    shape.push(2);
                }
                (name, DTYPES[d], shape)
            })
            .collect()
    })
}

fn build(ts: &[(String, Dtype, Vec<usize>)]) -> Vec<u8> {
    let specs: Vec<_> = ts.iter().map(|(n, d, s)| (n.as_str(), *d, s.as_slice())).collect();
    let enc = encode_header(&specs, None).unwrap();
    let (mut file, offsets) = (enc.bytes, enc.offsets);
    file.resize(file.len() + offsets.last().map_or(0, |o| o.1) as usize, 0xab);
    file
}

proptest! {
    #[test]
    fn valid_headers_round_trip(ts in tensors()) {
        let file = build(&ts);
        let h = parse_header(Path::new("p"), &file, file.len() as u64).unwrap();
        let mut got: Vec<_> = h.tensors.iter().map(|t| (t.name.clone(), t.dtype, t.shape.clone())).collect();
        got.sort();
        let mut want = ts.clone();
        want.sort();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn mutated_headers_never_panic(ts in tensors(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), cut in any::<prop::sample::Index>()) {
        let mut file = build(&ts);
        for (at, byte) in flips {
            let i = at.index(file.len());
            file[i] = byte;
        }
        let _ = parse_header(Path::new("p"), &file, file.len() as u64);
        let cut = cut.index(file.len() + 1);
        let _ = parse_header(Path::new("p"), &file[..cut], file.len() as u64);
        let _ = parse_header(Path::new("p"), &file[..cut], cut as u64);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), len in any::<u64>()) {
        let _ = parse_header(Path::new("p"), &bytes, len);
        let _ = tensorlift_format::parse_index(Path::new("i.json"), &bytes);
    }
}
