//! Plans assembled from headers and an index: the index's look-up, and the errors for an
//! index and headers that disagree, whichever way the check runs (threads are used from
//! 16,384 tensors on).

use std::path::{Path, PathBuf};

use tensorlift_format::{
    encode_header, parse_header, parse_index, Dtype, FileIdentity, FormatError, LoadPlan, Shard, TensorInfo,
};

/// A shard named `name` holding U8 tensors of one byte, named as given.
fn shard(n: u64, name: &str, tensors: &[&str]) -> (Shard, Vec<TensorInfo>) {
    let specs: Vec<(&str, Dtype, &[usize])> = tensors.iter().map(|t| (*t, Dtype::U8, &[1usize][..])).collect();
    let enc = encode_header(&specs, None).unwrap();
    let len = enc.bytes.len() as u64 + enc.data_len();
    let header = parse_header(Path::new(name), &enc.bytes, len).unwrap();
    let identity = FileIdentity { dev: 1, ino: n, len, modified_ns: 0, changed_ns: 0 };
    Shard::from_header(PathBuf::from("/m").join(name), name.to_owned(), identity, 0, header)
}

fn index(pairs: &[(&str, &str)]) -> tensorlift_format::Index {
    let map: serde_json::Map<String, serde_json::Value> =
        pairs.iter().map(|(t, s)| ((*t).to_owned(), (*s).into())).collect();
    let text = serde_json::to_vec(&serde_json::json!({ "weight_map": map })).unwrap();
    parse_index(Path::new("/m/i.json"), &text).unwrap()
}

fn assemble(
    ix: Option<tensorlift_format::Index>,
    shards: Vec<(Shard, Vec<TensorInfo>)>,
) -> Result<LoadPlan, FormatError> {
    LoadPlan::assemble(Path::new("/m/i.json"), PathBuf::from("/m"), ix.map(|i| (PathBuf::from("/m/i.json"), i)), shards)
}

#[test]
fn the_index_finds_every_name_in_its_shard() {
    let text = br#"{"weight_map":{"b":"s-2","a\u00e9":"s-1","c":"s-2","":"s-1"}}"#;
    let ix = parse_index(Path::new("i.json"), text).unwrap();
    let entries: Vec<(&str, &str)> = ix.entries().collect();
    assert_eq!(entries, [("b", "s-2"), ("aé", "s-1"), ("c", "s-2"), ("", "s-1")]);
    assert_eq!(ix.shards(), ["s-2", "s-1"]);
    for (t, s) in [("b", 0), ("aé", 1), ("c", 0), ("", 1)] {
        assert_eq!(ix.shard_of(t), Some(s), "{t}");
    }
    for missing in ["a", "bb", "a\\u00e9", "C"] {
        assert_eq!(ix.shard_of(missing), None, "{missing}");
    }
    // Equal indexes compare equal whatever their look-ups' seeds.
    assert_eq!(ix, parse_index(Path::new("i.json"), text).unwrap());
}

#[test]
fn a_plan_takes_the_headers_tensors() {
    let ix = index(&[("a", "s-1"), ("b", "./s-1"), ("c", "s-2")]);
    let mut s1 = shard(1, "s-1", &["a", "b"]);
    s1.0.aliases.push("./s-1".into());
    let plan = assemble(Some(ix), vec![s1, shard(2, "s-2", &["c"])]).unwrap();
    let names: Vec<(&str, usize)> = plan.tensors().iter().map(|t| (t.name.as_str(), t.shard)).collect();
    assert_eq!(names, [("a", 0), ("b", 0), ("c", 1)]);
    assert_eq!(plan.checkpoint_bytes(), 3);
    assert_eq!(plan.shards().iter().map(|s| s.tensor_count).collect::<Vec<_>>(), [2, 1]);
    assert_eq!(plan.shards()[1].data_len, 1);
}

/// Each disagreement, at a few tensors and past the threshold where the check runs on
/// threads: the same error, naming the same tensor.
#[test]
fn disagreements_are_named_exactly() {
    for filler in [0usize, 20_000] {
        let extra: Vec<String> = (0..filler).map(|i| format!("f{i}")).collect();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let with =
            |names: &[&'static str]| -> Vec<&str> { names.iter().copied().chain(extra.iter().copied()).collect() };
        let listed = |pairs: &[(&'static str, &'static str)]| {
            let mut all: Vec<(&str, &str)> = pairs.to_vec();
            all.extend(extra.iter().map(|t| (*t, "s-3")));
            index(&all)
        };
        let shards = |a: &[&'static str], b: &[&'static str]| {
            vec![shard(1, "s-1", a), shard(2, "s-2", b), shard(3, "s-3", &with(&[]))]
        };

        // Listed in the other shard, with counts that agree.
        let ix = listed(&[("a", "s-1"), ("b", "s-2"), ("c", "s-2")]);
        match assemble(Some(ix), shards(&["a", "b"], &["c"])) {
            Err(FormatError::TensorNotInShard { tensor, shard, .. }) => {
                assert_eq!((tensor.as_str(), shard.as_str()), ("b", "s-2"))
            }
            other => panic!("{filler}: {other:?}"),
        }
        // A shard tensor the index does not list.
        let ix = listed(&[("a", "s-1"), ("c", "s-2")]);
        match assemble(Some(ix), shards(&["a", "b"], &["c"])) {
            Err(FormatError::TensorNotInIndex { tensor, shard, .. }) => {
                assert_eq!((tensor.as_str(), shard.as_str()), ("b", "s-1"))
            }
            other => panic!("{filler}: {other:?}"),
        }
        // Listed, but in no shard.
        let ix = listed(&[("a", "s-1"), ("b", "s-1"), ("c", "s-2"), ("d", "s-2")]);
        match assemble(Some(ix), shards(&["a", "b"], &["c"])) {
            Err(FormatError::TensorNotInShard { tensor, .. }) => assert_eq!(tensor, "d"),
            other => panic!("{filler}: {other:?}"),
        }
        // One name in two shards, listed once: the name in two shards is what is said.
        let ix = listed(&[("a", "s-1"), ("b", "s-1"), ("c", "s-2")]);
        match assemble(Some(ix), shards(&["a", "b"], &["b", "c"])) {
            Err(FormatError::TensorInTwoShards { tensor, first, second, .. }) => {
                assert_eq!((tensor.as_str(), first.as_str(), second.as_str()), ("b", "s-1", "s-2"))
            }
            other => panic!("{filler}: {other:?}"),
        }
        // No index: a name in two shards.
        match assemble(None, shards(&["a", "b"], &["b"])) {
            Err(FormatError::TensorInTwoShards { tensor, .. }) => assert_eq!(tensor, "b"),
            other => panic!("{filler}: {other:?}"),
        }
        // And the agreeing case plans every tensor.
        let ix = listed(&[("a", "s-1"), ("b", "s-1"), ("c", "s-2")]);
        assert_eq!(assemble(Some(ix), shards(&["a", "b"], &["c"])).unwrap().tensors().len(), 3 + filler);
    }
}
