//! Parsing and validation of one safetensors header.
//!
//! A safetensors file is `[u64 little-endian N][N bytes of JSON header][data]`. The parser
//! here looks at those first `8 + N` bytes only: the caller reads them (see
//! [`header_len`] to learn `N` from the first 8) and passes the file's length, which the
//! validation needs to check that the data ends exactly at the end of the file.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use safetensors::Dtype;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::FormatError;

/// Bytes of the little-endian header-length prefix.
pub const HEADER_PREFIX_LEN: u64 = 8;
/// Largest header the format allows (the reference reader's cap).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor as its header describes it, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name, unique within its file.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, row-major. Empty for a scalar.
    pub shape: Vec<usize>,
    /// `[begin, end)` relative to the start of the data section.
    pub data_offsets: (u64, u64),
}

impl TensorInfo {
    /// Number of bytes of data.
    pub fn len(&self) -> u64 {
        self.data_offsets.1 - self.data_offsets.0
    }

    /// Whether the tensor holds no bytes (a dimension of 0).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of elements (1 for a scalar). Cannot overflow: validation checked it.
    pub fn num_elements(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// A validated header: the tensors sorted by data offset, and the free-form metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// `N`, the length of the JSON text.
    pub header_len: u64,
    /// `__metadata__`, if present.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Tensors in file order (ascending data offset).
    pub tensors: Vec<TensorInfo>,
}

impl Header {
    /// File offset where the data section begins (`8 + N`).
    pub fn data_start(&self) -> u64 {
        HEADER_PREFIX_LEN + self.header_len
    }

    /// Length of the data section: where the tensor that ends last ends. (In a safetensors
    /// file that is the last one; a PyTorch file's views of one storage may overlap, and a
    /// later one end first.)
    pub fn data_len(&self) -> u64 {
        self.tensors.iter().map(|t| t.data_offsets.1).max().unwrap_or(0)
    }
}

/// Reads `N` from the first 8 bytes of a file of `file_len` bytes, and checks it against
/// the cap and the file's length, so the caller knows how many more bytes to read.
pub fn header_len(file: &Path, prefix: &[u8], file_len: u64) -> Result<u64, FormatError> {
    let Some(first8) = prefix.get(..HEADER_PREFIX_LEN as usize) else {
        return Err(FormatError::HeaderTooSmall { file: file.to_path_buf(), len: prefix.len() as u64 });
    };
    if file_len < HEADER_PREFIX_LEN {
        return Err(FormatError::HeaderTooSmall { file: file.to_path_buf(), len: file_len });
    }
    let mut arr = [0u8; 8];
    arr.copy_from_slice(first8);
    let n = u64::from_le_bytes(arr);
    // A PyTorch file read as safetensors shows a nonsense length: say what it really is.
    let pytorch =
        || sniff_pytorch(prefix).map(|layout| FormatError::PyTorchCheckpoint { file: file.to_path_buf(), layout });
    if n > MAX_HEADER_LEN {
        return Err(pytorch().unwrap_or(FormatError::HeaderTooLarge { file: file.to_path_buf(), header_len: n }));
    }
    // n <= 1e8, so the sum cannot overflow.
    if HEADER_PREFIX_LEN + n > file_len {
        return Err(pytorch().unwrap_or(FormatError::HeaderIncomplete {
            file: file.to_path_buf(),
            header_len: n,
            available: file_len,
        }));
    }
    Ok(n)
}

/// What kind of PyTorch file these first bytes start, if they look like one: `torch.save`
/// writes a zip archive since PyTorch 1.6, and a bare pickle (protocol 2) before that.
/// Only consulted once the bytes have failed as safetensors: a valid header length can
/// start with the same bytes.
pub fn sniff_pytorch(prefix: &[u8]) -> Option<&'static str> {
    match prefix {
        [b'P', b'K', 3, 4, ..] | [b'P', b'K', 5, 6, ..] => {
            Some("a zip archive, as torch.save writes since PyTorch 1.6")
        }
        [0x80, 2..=5, ..] => Some("a pickle, as torch.save wrote before PyTorch 1.6"),
        _ => None,
    }
}

/// Parses and validates the header of a file of `file_len` bytes whose first bytes are
/// `bytes` (at least `8 + N` of them; more are ignored).
pub fn parse_header(file: &Path, bytes: &[u8], file_len: u64) -> Result<Header, FormatError> {
    let n = header_len(file, bytes, file_len)?;
    let end = (HEADER_PREFIX_LEN + n) as usize;
    let Some(json) = bytes.get(HEADER_PREFIX_LEN as usize..end) else {
        return Err(FormatError::HeaderIncomplete {
            file: file.to_path_buf(),
            header_len: n,
            available: bytes.len() as u64,
        });
    };
    let text = std::str::from_utf8(json)
        .map_err(|e| FormatError::HeaderNotUtf8 { file: file.to_path_buf(), valid_up_to: e.valid_up_to() })?;
    // The common case in one pass; any error is found again by the two-pass reading,
    // which names the entry it is in.
    let (metadata, mut tensors) = match parse_fast(text) {
        Some(parsed) => parsed,
        None => parse_checked(file, text)?,
    };

    // The reference writer lists tensors by offset, but the format does not require it
    // (nor does the reference reader). Stable: empty tensors at one offset keep their order.
    if !tensors.is_sorted_by_key(|t| t.data_offsets) {
        tensors.sort_by_key(|t| t.data_offsets);
    }
    let mut expected_begin = 0u64;
    for t in &tensors {
        let (begin, end) = t.data_offsets;
        if begin != expected_begin || end < begin {
            return Err(FormatError::InvalidOffsets {
                file: file.to_path_buf(),
                tensor: t.name.clone(),
                begin,
                end,
                expected_begin,
            });
        }
        let expected = byte_size(file, t)?;
        if end - begin != expected {
            return Err(FormatError::SizeMismatch {
                file: file.to_path_buf(),
                tensor: t.name.clone(),
                begin,
                end,
                expected,
            });
        }
        expected_begin = end;
    }

    let header = Header { header_len: n, metadata, tensors };
    let data_len = header.data_len();
    if header.data_start().checked_add(data_len) != Some(file_len) {
        return Err(FormatError::DataLengthMismatch { file: file.to_path_buf(), header_len: n, data_len, file_len });
    }
    Ok(header)
}

/// The two-pass reading: every entry as raw JSON first (syntax errors are the header's),
/// then each entry on its own (errors name the tensor). Used to report an error precisely.
#[allow(clippy::type_complexity)]
fn parse_checked(file: &Path, text: &str) -> Result<(Option<BTreeMap<String, String>>, Vec<TensorInfo>), FormatError> {
    let entries = parse_entries(text)
        .map_err(|e| FormatError::HeaderJson { file: file.to_path_buf(), message: e.to_string() })?;

    let oom = |what, bytes: usize| FormatError::OutOfMemory { file: file.to_path_buf(), what, bytes: bytes as u64 };
    let mut metadata = None;
    let mut tensors: Vec<TensorInfo> = Vec::new();
    let count = entries.0.len();
    tensors.try_reserve_exact(count).map_err(|_| oom("the tensor list", count * std::mem::size_of::<TensorInfo>()))?;
    let mut seen: hashbrown::HashSet<&str> = Default::default();
    seen.try_reserve(count).map_err(|_| oom("the tensor names", count * std::mem::size_of::<&str>()))?;
    for (name, raw) in &entries.0 {
        let name: &str = name;
        if !seen.insert(name) {
            return Err(FormatError::DuplicateTensor { file: file.to_path_buf(), tensor: name.to_owned() });
        }
        if name == "__metadata__" {
            // `null` is accepted by the reference reader and means no metadata.
            let map: Option<BTreeMap<String, String>> = serde_json::from_str(raw.get())
                .map_err(|e| FormatError::InvalidMetadata { file: file.to_path_buf(), message: e.to_string() })?;
            metadata = map;
        } else {
            tensors.push(parse_tensor(file, name, raw)?);
        }
    }

    Ok((metadata, tensors))
}

#[derive(Deserialize)]
struct FastTensor<'a> {
    #[serde(borrow)]
    dtype: Cow<'a, str>,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// One pass over a header that is valid: each entry straight into its typed form, with no
/// second parse of each entry and no copy of its dtype string. `None` on any problem
/// (syntax, a wrong type, a duplicate name, an unknown dtype, memory), which the two-pass
/// reading then reports.
#[allow(clippy::type_complexity)]
fn parse_fast(text: &str) -> Option<(Option<BTreeMap<String, String>>, Vec<TensorInfo>)> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = (Option<BTreeMap<String, String>>, Vec<TensorInfo>);
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object of tensor entries")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut metadata = None;
            let mut has_metadata = false;
            let mut tensors: Vec<TensorInfo> = Vec::new();
            let fail = || de::Error::custom("");
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                if tensors.len() == tensors.capacity() && tensors.try_reserve(tensors.len().max(16)).is_err() {
                    return Err(fail());
                }
                if key == "__metadata__" {
                    if std::mem::replace(&mut has_metadata, true) {
                        return Err(fail());
                    }
                    metadata = map.next_value::<Option<BTreeMap<String, String>>>()?;
                } else {
                    let t: FastTensor<'de> = map.next_value()?;
                    let dtype = parse_dtype(&t.dtype).ok_or_else(fail)?;
                    let name = key.into_owned();
                    tensors.push(TensorInfo { name, dtype, shape: t.shape, data_offsets: t.data_offsets });
                }
            }
            // Duplicate tensor names, checked once all are read (without a second copy).
            if !unique_names(&tensors) {
                return Err(fail());
            }
            Ok((metadata, tensors))
        }
    }
    let mut d = serde_json::Deserializer::from_str(text);
    let parsed = d.deserialize_map(V).ok()?;
    // Trailing bytes other than JSON whitespace are refused, as the reference does.
    d.end().ok()?;
    Some(parsed)
}

/// Whether no two tensors share a name (false also when the set cannot be had).
pub(crate) fn unique_names(tensors: &[TensorInfo]) -> bool {
    let mut seen: hashbrown::HashSet<&str> = Default::default();
    seen.try_reserve(tensors.len()).is_ok() && tensors.iter().all(|t| seen.insert(t.name.as_str()))
}

/// Bytes that `shape` elements of `dtype` take, with checked arithmetic.
fn byte_size(file: &Path, t: &TensorInfo) -> Result<u64, FormatError> {
    let overflow = || FormatError::SizeOverflow { file: file.to_path_buf(), tensor: t.name.clone() };
    let elements = t.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64)).ok_or_else(overflow)?;
    let bits = elements.checked_mul(t.dtype.bitsize() as u64).ok_or_else(overflow)?;
    if bits % 8 != 0 {
        return Err(FormatError::PartialByte { file: file.to_path_buf(), tensor: t.name.clone(), bits });
    }
    Ok(bits / 8)
}

#[derive(Deserialize)]
struct RawTensor {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

fn parse_tensor(file: &Path, name: &str, raw: &RawValue) -> Result<TensorInfo, FormatError> {
    let t: RawTensor = serde_json::from_str(raw.get()).map_err(|e| FormatError::InvalidTensorEntry {
        file: file.to_path_buf(),
        tensor: name.to_owned(),
        message: e.to_string(),
    })?;
    let dtype = parse_dtype(&t.dtype).ok_or_else(|| FormatError::UnknownDtype {
        file: file.to_path_buf(),
        tensor: name.to_owned(),
        dtype: t.dtype.clone(),
    })?;
    Ok(TensorInfo { name: name.to_owned(), dtype, shape: t.shape, data_offsets: t.data_offsets })
}

/// The dtype for a header's dtype string, by the reference crate's own names.
pub fn parse_dtype(s: &str) -> Option<Dtype> {
    Dtype::deserialize(de::value::StrDeserializer::<de::value::Error>::new(s)).ok()
}

/// The top-level object as an ordered list of (key, raw value), keeping duplicates so that
/// they can be reported rather than silently collapsed as a map would.
struct Entries<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

fn parse_entries(text: &str) -> Result<Entries<'_>, serde_json::Error> {
    // from_str rejects trailing bytes other than JSON whitespace, as the reference does.
    serde_json::from_str(text)
}

impl<'de: 'a, 'a> Deserialize<'de> for Entries<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0).min(4096));
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    // The entry count comes from the file: grow fallibly, so that a header of
                    // millions of entries under a memory limit is an error, not an abort.
                    if out.len() == out.capacity() && out.try_reserve(out.len().max(16)).is_err() {
                        return Err(de::Error::custom(format_args!(
                            "out of memory after {} entries of the header",
                            out.len()
                        )));
                    }
                    out.push((key, map.next_value::<&'de RawValue>()?));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod fast_and_checked {
    use super::*;

    /// The data section ends where its last-ending tensor ends, not where the last-starting
    /// one does: a PyTorch file's views of one storage overlap (found by an audit, where
    /// `inspect` said 30 bytes of a storage of 100).
    #[test]
    fn the_data_section_ends_with_the_tensor_that_ends_last() {
        let t =
            |name: &str, data_offsets| TensorInfo { name: name.into(), dtype: Dtype::U8, shape: vec![], data_offsets };
        let header = Header { header_len: 8, metadata: None, tensors: vec![t("whole", (0, 100)), t("view", (10, 30))] };
        assert_eq!(header.data_len(), 100);
        assert_eq!(Header { header_len: 8, metadata: None, tensors: vec![] }.data_len(), 0);
    }

    /// The one-pass reading accepts exactly what the two-pass reading accepts, with the
    /// same result, and declines (for the two-pass reading to report) everything else.
    #[test]
    fn both_readings_agree() {
        let cases = [
            r#"{}"#,
            r#"{"__metadata__":null}"#,
            r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            r#"{"b\u00e9\n":{"dtype":"F\u0033\u0032","shape":[],"data_offsets":[0,4],"extra":[1,{"x":2}]}}"#,
            r#"{"a":{"data_offsets":[0,1],"shape":[1],"dtype":"U8"},"b":{"dtype":"BF16","shape":[0,3],"data_offsets":[1,1]}}"#,
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
            r#"{"__metadata__":{},"__metadata__":{}}"#,
            r#"{"__metadata__":{"n":1}}"#,
            r#"{"a":{"dtype":"F17","shape":[1],"data_offsets":[0,4]}}"#,
            r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            r#"{"a":5}"#,
            r#"[1]"#,
            r#"{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}} x"#,
            r#"{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},}"#,
        ];
        for text in cases {
            let checked = parse_checked(Path::new("h"), text);
            match parse_fast(text) {
                Some(fast) => assert_eq!(Some(fast), checked.ok(), "{text}"),
                None => assert!(checked.is_err(), "the fast reading declined a valid header: {text}"),
            }
        }
    }
}
