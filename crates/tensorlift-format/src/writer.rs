//! Encoding a header, for tools that write checkpoints (fixtures, synthetic benchmarks).

use std::collections::BTreeMap;

use safetensors::Dtype;
use serde_json::{json, Map, Value};

/// Header bytes ready to write, and where each tensor's data goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedHeader {
    /// `8 + N` bytes: the length prefix and the JSON text.
    pub bytes: Vec<u8>,
    /// `[begin, end)` of each tensor in the data section, in the order given.
    pub offsets: Vec<(u64, u64)>,
}

impl EncodedHeader {
    /// Bytes of data that must follow the header.
    pub fn data_len(&self) -> u64 {
        self.offsets.last().map_or(0, |o| o.1)
    }
}

/// Encodes the `8 + N` header bytes for `tensors` laid out back to back in the given order,
/// and returns them with each tensor's `[begin, end)` in the data section. The JSON is
/// padded with spaces to a multiple of 8 bytes, as the reference writer does, so that the
/// data section starts 8-byte aligned. Returns `None` for what no reader would take: a size
/// that overflows, a sub-byte tensor that does not fill whole bytes, a name given twice, or
/// a tensor named `__metadata__`.
pub fn encode_header(
    tensors: &[(&str, Dtype, &[usize])],
    metadata: Option<&BTreeMap<String, String>>,
) -> Option<EncodedHeader> {
    let mut map = Map::new();
    if let Some(m) = metadata {
        map.insert("__metadata__".into(), json!(m));
    }
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut at = 0u64;
    for (name, dtype, shape) in tensors {
        let elements = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64))?;
        let bits = elements.checked_mul(dtype.bitsize() as u64)?;
        if bits % 8 != 0 || *name == "__metadata__" {
            return None;
        }
        let end = at.checked_add(bits / 8)?;
        let entry = json!({"dtype": dtype.to_string(), "shape": shape, "data_offsets": [at, end]});
        if map.insert((*name).to_owned(), entry).is_some() {
            return None;
        }
        offsets.push((at, end));
        at = end;
    }
    let mut text = serde_json::to_vec(&Value::Object(map)).ok()?;
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    Some(EncodedHeader { bytes: out, offsets })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_no_reader_would_take_are_not_encoded() {
        let ok = encode_header(&[("a", Dtype::F4, &[4]), ("b", Dtype::U8, &[3])], None).unwrap();
        assert_eq!(ok.offsets, [(0, 2), (2, 5)]);
        let len = ok.bytes.len() as u64 + ok.data_len();
        assert!(crate::parse_header(std::path::Path::new("x"), &ok.bytes, len).is_ok());
        // Three four-bit values are a byte and a half.
        assert!(encode_header(&[("a", Dtype::F4, &[3])], None).is_none());
        assert!(encode_header(&[("a", Dtype::U8, &[1]), ("a", Dtype::U8, &[2])], None).is_none());
        assert!(encode_header(&[("__metadata__", Dtype::U8, &[1])], None).is_none());
    }
}
