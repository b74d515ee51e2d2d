//! `model.safetensors.index.json`: which shard holds each tensor.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use serde::Deserialize;

use crate::FormatError;

/// Conventional file name of a sharded checkpoint's index.
pub const INDEX_FILE_NAME: &str = "model.safetensors.index.json";
/// Largest index file accepted; real indexes of 100,000 tensors are a few MB.
pub const MAX_INDEX_LEN: u64 = 100_000_000;

/// A parsed index: tensor name to shard file name, in name order, plus shard names in
/// first-appearance order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// `metadata` as written (often `{"total_size": ...}`); kept verbatim.
    pub metadata: Option<serde_json::Value>,
    /// Tensor name to shard file name (relative to the index's folder).
    pub weight_map: BTreeMap<String, String>,
}

impl Index {
    /// Shard names, deduplicated, in natural order.
    pub fn shard_names(&self) -> Vec<&str> {
        // Deduplicate first: a few shards are named by 100,000s of entries.
        let unique: std::collections::HashSet<&str> = self.weight_map.values().map(String::as_str).collect();
        let mut names: Vec<&str> = unique.into_iter().collect();
        names.sort_by(|a, b| natural_cmp(a, b));
        names
    }
}

#[derive(Deserialize)]
struct RawIndex {
    #[serde(default)]
    metadata: Option<serde_json::Value>,
    weight_map: Pairs,
}

/// A JSON object as its (key, value) pairs in file order, duplicates kept so that they can
/// be refused: a map would silently keep one of them.
struct Pairs(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Pairs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Pairs;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of tensor names to shard file names")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Pairs, A::Error> {
                let mut out = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if out.len() == out.capacity() && out.try_reserve(out.len().max(16)).is_err() {
                        return Err(serde::de::Error::custom("out of memory reading weight_map"));
                    }
                    out.push((key, map.next_value()?));
                }
                Ok(Pairs(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Parses an index file's bytes and checks that every shard name is a plain relative path
/// that cannot leave the index's folder (no absolute paths, no `..`).
pub fn parse_index(file: &Path, bytes: &[u8]) -> Result<Index, FormatError> {
    let invalid = |message: String| FormatError::InvalidIndex { file: file.to_path_buf(), message };
    let text = std::str::from_utf8(bytes).map_err(|e| invalid(format!("not UTF-8: {e}")))?;
    let raw: RawIndex = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
    let mut weight_map = BTreeMap::new();
    // An index names a few shards 100,000s of times, mostly in runs: a name is checked
    // when it differs from the last one checked.
    let mut checked: Option<String> = None;
    for (tensor, shard) in raw.weight_map.0 {
        let serde_json::Value::String(shard) = shard else {
            return Err(invalid(format!("weight_map entry for '{tensor}' is not a string")));
        };
        if checked.as_deref() != Some(shard.as_str()) {
            check_relative(file, &shard)?;
            checked = Some(shard.clone());
        }
        match weight_map.entry(tensor) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(shard);
            }
            std::collections::btree_map::Entry::Occupied(o) => {
                return Err(invalid(format!(
                    "weight_map lists tensor '{}' twice (in '{}' and in '{shard}')",
                    o.key(),
                    o.get()
                )));
            }
        }
    }
    Ok(Index { metadata: raw.metadata, weight_map })
}

/// Rejects shard names that are absolute or climb out of the folder, before any file
/// system look-up. Links that point outside are caught later, on the resolved path.
pub fn check_relative(file: &Path, shard: &str) -> Result<(), FormatError> {
    let outside =
        |reason| FormatError::ShardOutsideFolder { file: file.to_path_buf(), shard: shard.to_owned(), reason };
    if shard.is_empty() {
        return Err(outside("empty path"));
    }
    if shard.contains('\0') {
        return Err(outside("NUL in path"));
    }
    let mut named = false;
    for c in Path::new(shard).components() {
        match c {
            Component::Normal(_) => named = true,
            Component::CurDir => {}
            Component::ParentDir => return Err(outside("'..' in path")),
            Component::RootDir | Component::Prefix(_) => return Err(outside("absolute path")),
        }
    }
    if !named {
        return Err(outside("no file name"));
    }
    Ok(())
}

/// A shard name as one spelling: `./a.safetensors` and `a.safetensors` are the same name.
/// Call on names that passed [`check_relative`].
pub fn normal_name(shard: &str) -> String {
    let parts: Vec<&str> = Path::new(shard)
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => p.to_str(),
            _ => None,
        })
        .collect();
    parts.join("/")
}

/// Orders names so that digit runs compare as numbers: `shard-2` before `shard-10`.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                let ord = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb)).then_with(|| da.cmp(&db));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let z = d.iter().take_while(|&&c| c == b'0').count();
    &d[z..]
}
