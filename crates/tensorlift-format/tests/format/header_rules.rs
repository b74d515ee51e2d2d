//! One test per validation rule of a single header.

use std::path::Path;

use tensorlift_format::{parse_header, Dtype, FormatError};

use crate::support::file_with;

fn parse(bytes: &[u8]) -> Result<tensorlift_format::Header, FormatError> {
    parse_header(Path::new("m.safetensors"), bytes, bytes.len() as u64)
}

const ONE: &str = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;

#[test]
fn valid_header_parses() {
    let h = parse(&file_with(ONE, 16)).unwrap();
    assert_eq!(h.tensors.len(), 1);
    assert_eq!(h.tensors[0].name, "a");
    assert_eq!(h.tensors[0].shape, vec![2, 2]);
    assert_eq!(h.data_start(), 8 + ONE.len() as u64);
    assert_eq!(h.data_len(), 16);
}

#[test]
fn needs_only_the_header_bytes() {
    let f = file_with(ONE, 16);
    let prefix = &f[..8 + ONE.len()];
    let h = parse_header(Path::new("m"), prefix, f.len() as u64).unwrap();
    assert_eq!(h.tensors[0].data_offsets, (0, 16));
}

#[test]
fn file_shorter_than_prefix() {
    assert!(matches!(parse(&[1, 2, 3]), Err(FormatError::HeaderTooSmall { len: 3, .. })));
}

#[test]
fn header_over_cap() {
    let mut f = 100_000_001u64.to_le_bytes().to_vec();
    f.extend_from_slice(b"{}");
    assert!(matches!(parse(&f), Err(FormatError::HeaderTooLarge { header_len: 100_000_001, .. })));
    // u64::MAX must not wrap into something small.
    let f = u64::MAX.to_le_bytes();
    assert!(matches!(parse(&f), Err(FormatError::HeaderTooLarge { .. })));
}

#[test]
fn header_past_end_of_file() {
    let mut f = 64u64.to_le_bytes().to_vec();
    f.extend_from_slice(b"{}");
    assert!(matches!(parse(&f), Err(FormatError::HeaderIncomplete { header_len: 64, available: 10, .. })));
}

#[test]
fn header_not_utf8() {
    let mut f = file_with(r#"{"a":{}}"#, 0);
    f[10] = 0xff;
    assert!(matches!(parse(&f), Err(FormatError::HeaderNotUtf8 { valid_up_to: 2, .. })));
}

#[test]
fn strict_json() {
    for bad in [
        r#"{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}x"#,
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]}}\0\0",
        r#"{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},}"#,
        r#"[1,2]"#,
        "",
    ] {
        let err = parse(&file_with(bad, 4)).unwrap_err();
        assert!(matches!(err, FormatError::HeaderJson { .. }), "{bad:?}: {err}");
    }
}

#[test]
fn trailing_spaces_are_padding() {
    let json = format!("{ONE}      ");
    assert!(parse(&file_with(&json, 16)).is_ok());
}

#[test]
fn metadata_must_be_flat_string_map() {
    let ok = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
    let h = parse(&file_with(ok, 1)).unwrap();
    assert_eq!(h.metadata.unwrap()["format"], "pt");
    for bad in [r#"{"__metadata__":{"n":1}}"#, r#"{"__metadata__":{"n":{"x":"y"}}}"#, r#"{"__metadata__":"x"}"#] {
        let err = parse(&file_with(bad, 0)).unwrap_err();
        assert!(matches!(err, FormatError::InvalidMetadata { .. }), "{bad}: {err}");
    }
}

#[test]
fn unknown_dtype() {
    let json = r#"{"a":{"dtype":"F17","shape":[1],"data_offsets":[0,4]}}"#;
    match parse(&file_with(json, 4)) {
        Err(FormatError::UnknownDtype { tensor, dtype, .. }) => {
            assert_eq!((tensor.as_str(), dtype.as_str()), ("a", "F17"))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_or_mistyped_fields_name_the_tensor() {
    for bad in [
        r#"{"t":{"dtype":"F32","shape":[1]}}"#,
        r#"{"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
        r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#,
        r#"{"t":5}"#,
    ] {
        match parse(&file_with(bad, 4)) {
            Err(FormatError::InvalidTensorEntry { tensor, .. }) => assert_eq!(tensor, "t"),
            other => panic!("{bad}: {other:?}"),
        }
    }
}

#[test]
fn duplicate_names_are_an_error() {
    let json =
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
    match parse(&file_with(json, 2)) {
        Err(FormatError::DuplicateTensor { tensor, .. }) => assert_eq!(tensor, "a"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn shape_overflow_is_checked() {
    let json = r#"{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#;
    assert!(matches!(parse(&file_with(json, 8)), Err(FormatError::SizeOverflow { .. })));
    let json = r#"{"a":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,8]}}"#;
    assert!(matches!(parse(&file_with(json, 8)), Err(FormatError::SizeOverflow { .. })));
}

#[test]
fn sub_byte_dtypes_must_fill_whole_bytes() {
    let ok = r#"{"a":{"dtype":"F4","shape":[6],"data_offsets":[0,3]},"b":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[3,6]}}"#;
    assert!(parse(&file_with(ok, 6)).is_ok());
    let bad = r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#;
    assert!(matches!(parse(&file_with(bad, 2)), Err(FormatError::PartialByte { bits: 12, .. })));
    let bad = r#"{"a":{"dtype":"F6_E3M2","shape":[3],"data_offsets":[0,3]}}"#;
    assert!(matches!(parse(&file_with(bad, 3)), Err(FormatError::PartialByte { bits: 18, .. })));
}

#[test]
fn size_must_match_shape_and_dtype() {
    let json = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,12]}}"#;
    assert!(matches!(
        parse(&file_with(json, 12)),
        Err(FormatError::SizeMismatch { expected: 8, begin: 0, end: 12, .. })
    ));
}

#[test]
fn offsets_contiguous_from_zero() {
    let not_zero = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
    let hole =
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}}"#;
    let overlap = r#"{"a":{"dtype":"U16","shape":[1],"data_offsets":[0,2]},"b":{"dtype":"U16","shape":[1],"data_offsets":[1,3]}}"#;
    let backwards = r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"U8","shape":[1],"data_offsets":[0,4294967295]}}"#;
    let reversed = r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[3,1]}}"#;
    for (json, tensor) in [(not_zero, "a"), (hole, "b"), (overlap, "b"), (reversed, "a")] {
        match parse(&file_with(json, 3)) {
            Err(FormatError::InvalidOffsets { tensor: t, .. }) => assert_eq!(t, tensor, "{json}"),
            other => panic!("{json}: {other:?}"),
        }
    }
    // A range of 2^32 - 1 bytes for a one-byte tensor: its size is what is wrong.
    match parse(&file_with(backwards, 3)) {
        Err(FormatError::SizeMismatch { tensor, begin: 0, end: 4294967295, expected: 1, .. }) => {
            assert_eq!(tensor, "b")
        }
        other => panic!("{backwards}: {other:?}"),
    }
}

#[test]
fn offsets_in_any_json_order_are_sorted() {
    let json =
        r#"{"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
    let h = parse(&file_with(json, 3)).unwrap();
    let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn data_must_end_at_end_of_file() {
    assert!(matches!(parse(&file_with(ONE, 17)), Err(FormatError::DataLengthMismatch { data_len: 16, .. })));
    assert!(matches!(parse(&file_with(ONE, 15)), Err(FormatError::DataLengthMismatch { data_len: 16, .. })));
}

#[test]
fn every_dtype_with_its_bit_width() {
    let table = [
        ("BOOL", Dtype::BOOL, 8),
        ("U8", Dtype::U8, 8),
        ("I8", Dtype::I8, 8),
        ("F8_E5M2", Dtype::F8_E5M2, 8),
        ("F8_E4M3", Dtype::F8_E4M3, 8),
        ("F8_E8M0", Dtype::F8_E8M0, 8),
        ("F8_E4M3FNUZ", Dtype::F8_E4M3FNUZ, 8),
        ("F8_E5M2FNUZ", Dtype::F8_E5M2FNUZ, 8),
        ("I16", Dtype::I16, 16),
        ("U16", Dtype::U16, 16),
        ("F16", Dtype::F16, 16),
        ("BF16", Dtype::BF16, 16),
        ("I32", Dtype::I32, 32),
        ("U32", Dtype::U32, 32),
        ("F32", Dtype::F32, 32),
        ("C64", Dtype::C64, 64),
        ("F64", Dtype::F64, 64),
        ("I64", Dtype::I64, 64),
        ("U64", Dtype::U64, 64),
        ("F4", Dtype::F4, 4),
        ("F6_E2M3", Dtype::F6_E2M3, 6),
        ("F6_E3M2", Dtype::F6_E3M2, 6),
    ];
    for (name, dtype, bits) in table {
        assert_eq!(tensorlift_format::parse_dtype(name), Some(dtype));
        assert_eq!(dtype.bitsize(), bits, "{name}");
        // 8 elements fill whole bytes for every width.
        let bytes = 8 * bits / 8;
        let json = format!(r#"{{"t":{{"dtype":"{name}","shape":[2,4],"data_offsets":[0,{bytes}]}}}}"#);
        let h = parse(&file_with(&json, bytes)).unwrap();
        assert_eq!(h.tensors[0].dtype, dtype);
    }
}

#[test]
fn errors_name_file_and_tensor() {
    let json = r#"{"w.q":{"dtype":"F32","shape":[2],"data_offsets":[0,12]}}"#;
    let f = file_with(json, 12);
    let err = parse_header(Path::new("/models/x.safetensors"), &f, f.len() as u64).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("/models/x.safetensors") && msg.contains("'w.q'"), "{msg}");
    assert_eq!(err.file(), Path::new("/models/x.safetensors"));
}

#[test]
fn null_metadata_is_no_metadata() {
    // The reference reader accepts `"__metadata__": null`.
    let json = r#"{"__metadata__":null,"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
    let h = parse(&file_with(json, 1)).unwrap();
    assert_eq!(h.metadata, None);
    assert_eq!(h.tensors.len(), 1);
}

#[test]
fn pytorch_files_are_named_as_such() {
    // A zip written by torch.save >= 1.6 starts "PK\3\4"; read as a length that is 67324752.
    let mut zip = b"PK\x03\x04\x00\x00\x08\x08".to_vec();
    zip.resize(104, 0);
    match parse(&zip) {
        Err(FormatError::PyTorchCheckpoint { layout, .. }) => assert!(layout.contains("zip"), "{layout}"),
        other => panic!("{other:?}"),
    }
    // A legacy torch.save file is a protocol-2 pickle that starts with its magic number.
    let mut pickle = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19".to_vec();
    pickle.resize(300, 0);
    match parse(&pickle) {
        Err(FormatError::PyTorchCheckpoint { layout, .. }) => assert!(layout.contains("pickle"), "{layout}"),
        other => panic!("{other:?}"),
    }
    // The same first two bytes as a pickle can be a valid header length (0x0280 = 640).
    let json = format!(r#"{{"a":{{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}}}{}"#, " ".repeat(640 - 53));
    assert_eq!(json.len(), 640);
    let f = file_with(&json, 1);
    assert_eq!(&f[..2], b"\x80\x02");
    assert!(parse(&f).is_ok());
}

#[test]
fn index_rules() {
    use tensorlift_format::{parse_index, FormatError::InvalidIndex};
    let p = Path::new("model.safetensors.index.json");
    // A tensor listed twice is refused, not collapsed into one entry.
    let dup = br#"{"weight_map":{"a":"x.safetensors","a":"y.safetensors"}}"#;
    match parse_index(p, dup) {
        Err(InvalidIndex { message, .. }) => assert!(message.contains("'a' twice"), "{message}"),
        other => panic!("{other:?}"),
    }
    // An index of nothing is refused, not a checkpoint of no tensors.
    for empty in [&br#"{"weight_map":{}}"#[..], br#"{"metadata":{"total_size":0},"weight_map":{}}"#] {
        match parse_index(p, empty) {
            Err(InvalidIndex { message, .. }) => assert_eq!(message, "weight_map lists no tensors"),
            other => panic!("{other:?}"),
        }
    }
    // Null metadata is fine; a name that names no file is not.
    assert!(parse_index(p, br#"{"metadata":null,"weight_map":{"a":"x.safetensors"}}"#).is_ok());
    for bad in [".", "./", "./."] {
        let json = format!(r#"{{"weight_map":{{"a":"{bad}"}}}}"#);
        assert!(matches!(parse_index(p, json.as_bytes()), Err(FormatError::ShardOutsideFolder { .. })), "{bad}");
    }
    assert_eq!(tensorlift_format::normal_name("././a/./b.safetensors"), "a/b.safetensors");
}
