//! A validated [`LoadPlan`] over one or more shards, assembled from headers that the caller
//! read (this crate does no I/O: `tensorlift-io` opens the files).

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::header::Header;
use crate::index::Index;
use crate::slice::{Gather, SliceError, TensorSlice};
use crate::FormatError;

/// Which file a shard is, as the file system identifies it, and its state when planned: a
/// load refuses a shard whose identity, length or modification time changed since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileIdentity {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Length in bytes.
    pub len: u64,
    /// Modification time, in nanoseconds since the epoch.
    pub modified_ns: i128,
}

/// One shard of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// Canonical path of the file (links resolved).
    pub path: PathBuf,
    /// Name relative to the model folder, as a user would write it.
    pub name: String,
    /// Other names the index uses for this same file (`./a.safetensors`, a hard link, ...).
    pub aliases: Vec<String>,
    /// File length seen at planning time; a load checks it again.
    pub file_len: u64,
    /// The file's identity when planned.
    pub identity: FileIdentity,
    /// A hash of the header's bytes as planned ([`header_hash`]): a load compares it with
    /// the bytes it finds, without parsing them again.
    pub header_hash: u64,
    /// The validated header.
    pub header: Header,
}

impl Shard {
    /// File offset where the data section begins.
    pub fn data_start(&self) -> u64 {
        self.header.data_start()
    }
}

/// A hash of a header's `8 + N` bytes, to tell whether a file still holds the header that was
/// planned (not a defence against a chosen collision: the file was already trusted once).
pub fn header_hash(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// One tensor to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTensor {
    /// The tensor's name, unique across the plan.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Index into [`LoadPlan::shards`].
    pub shard: usize,
    /// Absolute byte range in the shard file: the bytes read for this tensor (for a slice,
    /// the range that covers it).
    pub file_range: Range<u64>,
    /// For a slice that is not one contiguous range: which bytes of `file_range` are its.
    pub gather: Option<Box<Gather>>,
}

impl PlannedTensor {
    /// Bytes of the tensor as loaded (for a slice, the slice's).
    pub fn len(&self) -> u64 {
        match &self.gather {
            Some(g) => g.len(),
            None => self.file_range.end - self.file_range.start,
        }
    }

    /// Whether the tensor holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Narrows the tensor to `slice`: its shape becomes the slice's, and its file range the
    /// bytes that cover the slice (see [`TensorSlice::layout`]).
    pub fn slice(&mut self, slice: &TensorSlice) -> Result<(), SliceError> {
        if self.gather.is_some() {
            return Err(SliceError::AlreadySliced);
        }
        let l = slice.layout(&self.shape, self.dtype.bitsize())?;
        let start = self.file_range.start + l.first;
        self.file_range = start..start + l.len;
        self.shape = l.shape;
        self.gather = l.gather.map(Box::new);
        Ok(())
    }
}

/// Every tensor of a checkpoint with the shard and byte range it comes from. Tensors are
/// ordered by shard, then by offset, which is the order a sequential read meets them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadPlan {
    root: PathBuf,
    index: Option<PathBuf>,
    index_metadata: Option<serde_json::Value>,
    shards: Vec<Shard>,
    tensors: Vec<PlannedTensor>,
}

impl LoadPlan {
    /// Builds a plan from validated shard headers: checks that no tensor name is in two
    /// shards and, for a sharded checkpoint, that the index and the headers agree (every
    /// indexed tensor is in the shard the index names, under any of that shard's names, and
    /// every shard tensor is indexed). `context` is the file errors name.
    pub fn assemble(
        context: &Path,
        root: PathBuf,
        index: Option<(PathBuf, Index)>,
        shards: Vec<Shard>,
    ) -> Result<LoadPlan, FormatError> {
        let count: usize = shards.iter().map(|s| s.header.tensors.len()).sum();
        let mut tensors: Vec<PlannedTensor> = Vec::new();
        tensors.try_reserve_exact(count).map_err(|_| FormatError::OutOfMemory {
            file: context.to_path_buf(),
            what: "the plan's tensor list",
            bytes: (count * std::mem::size_of::<PlannedTensor>()) as u64,
        })?;
        let mut owner: HashMap<&str, usize, FastBuild> = HashMap::default();
        owner.try_reserve(count).map_err(|_| FormatError::OutOfMemory {
            file: context.to_path_buf(),
            what: "the plan's name table",
            bytes: (count * 2 * std::mem::size_of::<(&str, usize)>()) as u64,
        })?;
        for (i, shard) in shards.iter().enumerate() {
            for t in &shard.header.tensors {
                if let Some(first) = owner.insert(&t.name, i) {
                    return Err(FormatError::TensorInTwoShards {
                        file: context.to_path_buf(),
                        tensor: t.name.clone(),
                        first: shards[first].name.clone(),
                        second: shard.name.clone(),
                    });
                }
            }
        }
        // The index is checked against the names' owners, the one table of every name.
        if let Some((path, index)) = &index {
            check_against_index(path, index, &shards, &owner)?;
        }
        for (i, shard) in shards.iter().enumerate() {
            for t in &shard.header.tensors {
                let start = shard.data_start() + t.data_offsets.0;
                tensors.push(PlannedTensor {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    shard: i,
                    file_range: start..start + t.len(),
                    gather: None,
                });
            }
        }
        let (index, index_metadata) = match index {
            Some((path, index)) => (Some(path), index.metadata),
            None => (None, None),
        };
        Ok(LoadPlan { root, index, index_metadata, shards, tensors })
    }

    /// The model folder.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The index file, for a sharded checkpoint that has one.
    pub fn index_file(&self) -> Option<&Path> {
        self.index.as_deref()
    }
    /// The index's `metadata` object as written (often `{"total_size": ...}`).
    pub fn index_metadata(&self) -> Option<&serde_json::Value> {
        self.index_metadata.as_ref()
    }
    /// Every shard's `__metadata__`, merged: where shards disagree on a key, the first shard
    /// (in load order) that has it wins.
    pub fn metadata(&self) -> std::collections::BTreeMap<String, String> {
        let mut out = std::collections::BTreeMap::new();
        for s in &self.shards {
            for (k, v) in s.header.metadata.iter().flatten() {
                out.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        out
    }
    /// The shards, in load order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }
    /// The tensors, by shard then offset.
    pub fn tensors(&self) -> &[PlannedTensor] {
        &self.tensors
    }
    /// Sum of every tensor's bytes.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(PlannedTensor::len).sum()
    }
    /// A plan of only the tensors `keep` accepts; shards left with none are kept (their
    /// headers are still part of the checkpoint) but have nothing to read.
    pub fn retain(&mut self, mut keep: impl FnMut(&PlannedTensor) -> bool) {
        self.tensors.retain(|t| keep(t));
    }
    /// Narrows tensors to slices: `choose` gives each tensor's slice (or `None` to keep it
    /// whole), and a slice that does not fit its tensor is `refused`'s error. Stops at the
    /// first error, leaving the tensors before it sliced.
    pub fn slice_with<E>(
        &mut self,
        mut choose: impl FnMut(&PlannedTensor) -> Result<Option<TensorSlice>, E>,
        mut refused: impl FnMut(&PlannedTensor, SliceError) -> E,
    ) -> Result<(), E> {
        for t in &mut self.tensors {
            if let Some(s) = choose(t)? {
                let mut sliced = t.clone();
                sliced.slice(&s).map_err(|e| refused(t, e))?;
                *t = sliced;
            }
        }
        Ok(())
    }
    /// Bytes of every tensor the shards hold, loaded or not, before any slice.
    pub fn checkpoint_bytes(&self) -> u64 {
        self.shards.iter().flat_map(|s| &s.header.tensors).map(|t| t.len()).sum()
    }
}

/// FNV-1a: names are short and come from files already bounded in size; SipHash's
/// protection against chosen collisions costs more than the parse here, and a collision
/// flood only makes planning slower, within the header budget.
#[derive(Default, Clone, Copy)]
pub(crate) struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        self.0 = h;
    }
}

pub(crate) type FastBuild = std::hash::BuildHasherDefault<Fnv>;

fn check_against_index(
    index_path: &Path,
    index: &Index,
    shards: &[Shard],
    owner: &HashMap<&str, usize, FastBuild>,
) -> Result<(), FormatError> {
    // Each name the index spells, to its shard in the plan: once per distinct name.
    let mut by_name: HashMap<&str, usize, FastBuild> = HashMap::default();
    for (i, s) in shards.iter().enumerate() {
        by_name.insert(&s.name, i);
        for a in &s.aliases {
            by_name.insert(a, i);
        }
    }
    let planned: Vec<Option<usize>> = index.shards().iter().map(|n| by_name.get(n.as_str()).copied()).collect();
    for (tensor, shard) in index.numbered_entries() {
        let want = planned[*shard as usize];
        if want.is_none() || owner.get(tensor.as_str()).copied() != want {
            return Err(FormatError::TensorNotInShard {
                file: index_path.to_path_buf(),
                tensor: tensor.clone(),
                shard: index.shards()[*shard as usize].clone(),
            });
        }
    }
    // Every indexed tensor is in its shard, and no tensor is in two shards (checked when the
    // plan is assembled): so if the counts agree, every shard tensor is indexed. Only when
    // they do not is the missing one looked for, to name it.
    let in_shards: usize = shards.iter().map(|s| s.header.tensors.len()).sum();
    if in_shards == index.len() {
        return Ok(());
    }
    let indexed: std::collections::HashSet<&str> = index.entries().map(|(t, _)| t).collect();
    for shard in shards {
        for t in &shard.header.tensors {
            if !indexed.contains(t.name.as_str()) {
                return Err(FormatError::TensorNotInIndex {
                    file: index_path.to_path_buf(),
                    tensor: t.name.clone(),
                    shard: shard.name.clone(),
                });
            }
        }
    }
    Ok(())
}
