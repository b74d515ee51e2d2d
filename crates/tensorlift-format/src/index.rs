//! `model.safetensors.index.json`: which shard holds each tensor.

use std::path::{Component, Path};

use std::hash::BuildHasher;

use hashbrown::hash_table::{Entry, HashTable};
use hashbrown::DefaultHashBuilder;
use serde::Deserialize;

use crate::FormatError;

/// Conventional file name of a sharded checkpoint's index.
pub const INDEX_FILE_NAME: &str = "model.safetensors.index.json";
/// Largest index file accepted; real indexes of 100,000 tensors are a few MB.
pub const MAX_INDEX_LEN: u64 = 100_000_000;

/// A parsed index: each tensor's shard, in the order the file lists them, and the shard
/// names it uses, each once.
#[derive(Clone)]
pub struct Index {
    /// `metadata` as written (often `{"total_size": ...}`); kept verbatim.
    pub metadata: Option<serde_json::Value>,
    /// Every tensor name, one after another (one allocation, not one per name).
    names: String,
    /// (end of the name in `names`, shard number), in file order: a name starts where the
    /// one before it ends. Numbers index `shards`.
    entries: Vec<(u32, u32)>,
    /// Shard file names (relative to the index's folder), as spelled, in order of first
    /// appearance.
    shards: Vec<String>,
    /// Entry numbers, by the hash of their names.
    lookup: HashTable<u32>,
    hasher: DefaultHashBuilder,
}

impl PartialEq for Index {
    fn eq(&self, other: &Index) -> bool {
        // The look-up is made from the entries.
        (&self.metadata, &self.names, &self.entries, &self.shards)
            == (&other.metadata, &other.names, &other.entries, &other.shards)
    }
}

impl Eq for Index {}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("metadata", &self.metadata)
            .field("tensors", &self.entries.len())
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}

impl Index {
    /// Number of tensors listed.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no tensor is listed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every (tensor name, shard file name), in the order the file lists them.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.numbered_entries().map(|(t, s)| (t, self.shards[s as usize].as_str()))
    }

    /// Every (tensor name, shard number), numbers indexing [`shards`](Self::shards).
    pub fn numbered_entries(&self) -> impl Iterator<Item = (&str, u32)> + '_ {
        (0..self.entries.len()).map(|i| (self.name(i), self.entries[i].1))
    }

    /// The number of the shard (in [`shards`](Self::shards)) that lists `tensor`.
    pub fn shard_of(&self, tensor: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(tensor);
        self.lookup.find(hash, |&i| self.name(i as usize) == tensor).map(|&i| self.entries[i as usize].1)
    }

    /// Shard names as spelled, each once, in order of first appearance.
    pub fn shards(&self) -> &[String] {
        &self.shards
    }

    /// Shard names, deduplicated, in natural order.
    pub fn shard_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.shards.iter().map(String::as_str).collect();
        names.sort_by(|a, b| natural_cmp(a, b));
        names
    }

    fn name(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.entries[i - 1].0 as usize };
        &self.names[start..self.entries[i].0 as usize]
    }
}

#[derive(Deserialize)]
struct RawIndex<'a> {
    #[serde(default)]
    metadata: Option<serde_json::Value>,
    #[serde(borrow)]
    weight_map: Pairs<'a>,
}

/// The weight map as listed: names copied one after another into one string, shard names
/// interned as they are read (an index repeats a few names 100,000s of times, one after
/// another).
struct Pairs<'a> {
    names: String,
    entries: Vec<(u32, u32)>,
    shards: Vec<String>,
    _text: std::marker::PhantomData<&'a str>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Pairs<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a str>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Pairs<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of tensor names to shard file names")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Pairs<'a>, A::Error> {
                let oom = || serde::de::Error::custom("out of memory reading weight_map");
                let mut names = String::new();
                let mut entries: Vec<(u32, u32)> = Vec::new();
                let mut shards: Vec<String> = Vec::new();
                let mut by_name: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
                while let Some(key) = map.next_key::<JsonStr<'de>>()? {
                    // Sizes come from the file: grow fallibly, so that an index of millions
                    // of entries under a memory limit is an error, not an abort.
                    if entries.len() == entries.capacity() && entries.try_reserve(entries.len().max(16)).is_err() {
                        return Err(oom());
                    }
                    if names.len() + key.0.len() > names.capacity()
                        && names.try_reserve(names.len().max(key.0.len()).max(1024)).is_err()
                    {
                        return Err(oom());
                    }
                    names.push_str(&key.0);
                    // parse_index refuses texts over MAX_INDEX_LEN bytes, far below 4 GiB.
                    let end = u32::try_from(names.len())
                        .map_err(|_| serde::de::Error::custom("weight_map's names are over 4 GiB"))?;
                    let shard = map.next_value::<JsonStr<'de>>()?.0;
                    // The same shard as the entry before: the common case, no look-up.
                    let id = match entries.last() {
                        Some(&(_, last)) if shards[last as usize] == *shard => last,
                        _ => match by_name.get(shard.as_ref()) {
                            Some(&id) => id,
                            None => {
                                let id = u32::try_from(shards.len())
                                    .map_err(|_| serde::de::Error::custom("too many shard names"))?;
                                shards.push(shard.clone().into_owned());
                                by_name.insert(shard.into_owned(), id);
                                id
                            }
                        },
                    };
                    entries.push((end, id));
                }
                Ok(Pairs { names, entries, shards, _text: std::marker::PhantomData })
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// A JSON string, borrowed from the text where it has no escapes.
struct JsonStr<'a>(std::borrow::Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for JsonStr<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a str>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = JsonStr<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<JsonStr<'a>, E> {
                Ok(JsonStr(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<JsonStr<'a>, E> {
                Ok(JsonStr(std::borrow::Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

/// Parses and validates an index file's bytes: strict UTF-8 and JSON, `weight_map` an
/// object of strings, every shard name a plain relative path (no `..`, not absolute), no
/// tensor listed twice. `file` is the path errors name.
pub fn parse_index(file: &Path, bytes: &[u8]) -> Result<Index, FormatError> {
    let invalid = |message: String| FormatError::InvalidIndex { file: file.to_path_buf(), message };
    if bytes.len() as u64 > MAX_INDEX_LEN {
        return Err(invalid(format!("{} bytes is over the {MAX_INDEX_LEN}-byte limit for an index", bytes.len())));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| invalid(format!("not UTF-8: {e}")))?;
    let raw: RawIndex<'_> = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
    let Pairs { names, entries, shards, .. } = raw.weight_map;
    // An index names the shards to load: one naming none would make a checkpoint of nothing
    // (and a verified load of nothing) where the folder's files are a model.
    if entries.is_empty() {
        return Err(invalid("weight_map lists no tensors".into()));
    }
    for shard in &shards {
        check_relative(file, shard)?;
    }
    let mut index = Index {
        metadata: raw.metadata,
        names,
        entries,
        shards,
        lookup: HashTable::new(),
        hasher: DefaultHashBuilder::default(),
    };
    // No tensor listed twice, found while the look-up is built.
    let mut lookup = HashTable::new();
    let hash_of = |i: &u32| index.hasher.hash_one(index.name(*i as usize));
    lookup.try_reserve(index.entries.len(), hash_of).map_err(|_| invalid("out of memory checking names".into()))?;
    for i in 0..index.entries.len() {
        let name = index.name(i);
        match lookup.entry(index.hasher.hash_one(name), |&j| index.name(j as usize) == name, hash_of) {
            Entry::Occupied(first) => {
                let first = index.entries[*first.get() as usize].1;
                return Err(invalid(format!(
                    "weight_map lists tensor '{name}' twice (in '{}' and in '{}')",
                    index.shards[first as usize], index.shards[index.entries[i].1 as usize]
                )));
            }
            // Entry numbers fit: the entries were counted in u32 offsets.
            Entry::Vacant(v) => {
                v.insert(i as u32);
            }
        }
    }
    index.lookup = lookup;
    Ok(index)
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
