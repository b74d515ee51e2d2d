//! The index parser on arbitrary bytes: it may reject, never panic; accepted shard names never escape.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(index) = tensorlift_format::parse_index(Path::new("model.safetensors.index.json"), data) {
        for shard in index.shards() {
            assert!(Path::new(shard).components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)));
            // Every accepted name names a file: its one spelling is not empty.
            assert!(!tensorlift_format::normal_name(shard).is_empty());
        }
        // Every entry's shard number names one of them, no tensor is listed twice, and
        // each is found by name.
        let mut names = std::collections::HashSet::new();
        for (tensor, shard) in index.numbered_entries() {
            assert!((shard as usize) < index.shards().len());
            assert!(names.insert(tensor));
            // The look-up finds every listed tensor in its shard.
            assert_eq!(index.shard_of(tensor), Some(shard));
        }
        assert_eq!(index.entries().count(), index.len());
    }
});
