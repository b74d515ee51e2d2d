//! A validated [`LoadPlan`] over one or more shards, assembled from headers that the caller
//! read (this crate does no I/O: `tensorlift-io` opens the files).

use hashbrown::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::Dtype;

use crate::header::{Header, TensorInfo, HEADER_PREFIX_LEN};
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
    /// Status change time (ctime), in nanoseconds since the epoch: a write changes it, and
    /// unlike the modification time no one can set it back.
    pub changed_ns: i128,
}

/// One shard of a plan: the file, and what its header says of it as a whole (its tensors
/// are the plan's, see [`LoadPlan::tensors`]).
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
    /// `N`, the length of the header's JSON text.
    pub header_len: u64,
    /// The header's `__metadata__`, if present.
    pub metadata: Option<std::collections::BTreeMap<String, String>>,
    /// Length of the data section (for a PyTorch file, up to the end of its last tensor).
    pub data_len: u64,
    /// Number of tensors the header lists, loaded or not.
    pub tensor_count: usize,
}

impl Shard {
    /// A shard of the file at `path`, named `name`, whose validated header is `header`: the
    /// shard, and the header's tensors, which [`LoadPlan::assemble`] takes.
    pub fn from_header(
        path: PathBuf,
        name: String,
        identity: FileIdentity,
        header_hash: u64,
        header: Header,
    ) -> (Shard, Vec<TensorInfo>) {
        let shard = Shard {
            path,
            name,
            aliases: Vec::new(),
            file_len: identity.len,
            identity,
            header_hash,
            header_len: header.header_len,
            data_len: header.data_len(),
            tensor_count: header.tensors.len(),
            metadata: header.metadata,
        };
        (shard, header.tensors)
    }

    /// A shard of the file at `path` whose header (`header_len` bytes of JSON) is read but
    /// not yet parsed: nothing is known of its tensors or metadata, and its data section is
    /// taken to run to the end of the file. See [`LoadPlan::unparsed`].
    pub fn unparsed(path: PathBuf, name: String, identity: FileIdentity, header_len: u64) -> Shard {
        Shard {
            path,
            name,
            aliases: Vec::new(),
            file_len: identity.len,
            identity,
            header_hash: 0,
            header_len,
            data_len: identity.len.saturating_sub(HEADER_PREFIX_LEN + header_len),
            tensor_count: 0,
            metadata: None,
        }
    }

    /// File offset where the data section begins.
    pub fn data_start(&self) -> u64 {
        HEADER_PREFIX_LEN + self.header_len
    }
}

/// A hash of a header's `8 + N` bytes, to tell whether a file still holds the header that was
/// planned (not a defence against a chosen collision: the file was already trusted once).
pub fn header_hash(bytes: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    // A fixed seed: the hash is compared within one process only, but must not change
    // between planning and loading. foldhash reads 16 bytes a step (SipHash showed in the
    // profile of planning 100,000 tensors).
    foldhash::quality::FixedState::with_seed(0x7e45_0c1f_d1ff_7a3b).hash_one(bytes)
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
    // Shared, not copied, by the plans `subset` makes (a file's tensors read one at a time
    // make one each): the metadata a header or index holds may be most of its bytes.
    index_metadata: Option<Arc<serde_json::Value>>,
    shards: Arc<[Shard]>,
    tensors: Vec<PlannedTensor>,
    checkpoint_bytes: u64,
}

impl LoadPlan {
    /// Builds a plan from shards and their validated headers' tensors (see
    /// [`Shard::from_header`]): checks that no tensor name is in two shards and, for a
    /// sharded checkpoint, that the index and the headers agree (every indexed tensor is in
    /// the shard the index names, under any of that shard's names, and every shard tensor
    /// is indexed). `context` is the file errors name.
    ///
    /// Each shard's names must be unique within it, as [`parse_header`](crate::parse_header)
    /// validates them: the checks here are across shards, and rely on that (debug builds
    /// assert it).
    pub fn assemble(
        context: &Path,
        root: PathBuf,
        index: Option<(PathBuf, Index)>,
        shards: Vec<(Shard, Vec<TensorInfo>)>,
    ) -> Result<LoadPlan, FormatError> {
        let count: usize = shards.iter().map(|(_, t)| t.len()).sum();
        let mut tensors: Vec<PlannedTensor> = Vec::new();
        tensors.try_reserve_exact(count).map_err(|_| FormatError::OutOfMemory {
            file: context.to_path_buf(),
            what: "the plan's tensor list",
            bytes: (count * std::mem::size_of::<PlannedTensor>()) as u64,
        })?;
        // The one rule within a shard that the checks across shards rely on, for lists that
        // did not come from `parse_header` (debug builds; a header's names are unique).
        debug_assert!(shards.iter().all(|(_, t)| crate::header::unique_names(t)), "a shard lists a tensor name twice");
        match &index {
            // The index's own look-up answers for every name: no table of the plan's names.
            Some((path, index)) if !agrees_with_index(index, &shards) => {
                return Err(disagreement(context, path, index, &shards));
            }
            Some(_) => {}
            None if shards.len() > 1 => drop(owners(context, &shards)?),
            None => {}
        }
        let mut checkpoint_bytes = 0u64;
        let mut kept = Vec::with_capacity(shards.len());
        for (i, (shard, infos)) in shards.into_iter().enumerate() {
            let start = shard.data_start();
            // Names and shapes move from the header into the plan: no copy of either.
            for t in infos {
                checkpoint_bytes = checkpoint_bytes.saturating_add(t.len());
                let first = start + t.data_offsets.0;
                tensors.push(PlannedTensor {
                    file_range: first..first + t.len(),
                    name: t.name,
                    dtype: t.dtype,
                    shape: t.shape,
                    shard: i,
                    gather: None,
                });
            }
            kept.push(shard);
        }
        let (index, index_metadata) = match index {
            Some((path, index)) => (Some(path), index.metadata),
            None => (None, None),
        };
        Ok(LoadPlan {
            root,
            index,
            index_metadata: index_metadata.map(Arc::new),
            shards: kept.into(),
            tensors,
            checkpoint_bytes,
        })
    }

    /// A plan of shards whose headers have been read but not yet parsed: no tensors, and
    /// each shard's data section taken to run from its header's end to the end of the file,
    /// as a valid header will say. A load can start reading such a shard's data section as
    /// soon as its header is validated, while the rest of planning goes on; the plan that
    /// [`assemble`](Self::assemble) makes later says which tensors those bytes hold.
    pub fn unparsed(root: PathBuf, index: Option<PathBuf>, shards: Vec<Shard>) -> LoadPlan {
        LoadPlan { root, index, index_metadata: None, shards: shards.into(), tensors: Vec::new(), checkpoint_bytes: 0 }
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
        self.index_metadata.as_deref()
    }
    /// Every shard's `__metadata__`, merged: where shards disagree on a key, the first shard
    /// (in load order) that has it wins.
    pub fn metadata(&self) -> std::collections::BTreeMap<String, String> {
        let mut out = std::collections::BTreeMap::new();
        for s in self.shards.iter() {
            for (k, v) in s.metadata.iter().flatten() {
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
        // Each shard's tensors fit in its file, but files together may pass 2^64 bytes.
        self.tensors.iter().map(PlannedTensor::len).fold(0, u64::saturating_add)
    }
    /// A plan of only the tensors `keep` accepts; shards left with none are kept (their
    /// headers are still part of the checkpoint) but have nothing to read.
    pub fn retain(&mut self, mut keep: impl FnMut(&PlannedTensor) -> bool) {
        self.tensors.retain(|t| keep(t));
    }
    /// The plan of the tensors at `indices` into [`tensors`](Self::tensors) only, in the
    /// plan's order (an index given twice counts once; one past the end, not at all): what
    /// [`retain`](Self::retain) would leave of a clone, without cloning the other tensors
    /// (a file's tensors read one at a time would otherwise cost a whole plan each).
    pub fn subset(&self, indices: impl IntoIterator<Item = usize>) -> LoadPlan {
        let mut keep: Vec<usize> = indices.into_iter().filter(|&i| i < self.tensors.len()).collect();
        keep.sort_unstable();
        keep.dedup();
        LoadPlan {
            root: self.root.clone(),
            index: self.index.clone(),
            index_metadata: self.index_metadata.clone(),
            shards: Arc::clone(&self.shards),
            tensors: keep.into_iter().map(|i| self.tensors[i].clone()).collect(),
            checkpoint_bytes: self.checkpoint_bytes,
        }
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
        self.checkpoint_bytes
    }
}

/// Whether the index and the headers agree, by one look-up in the index per shard tensor:
/// each must be listed, in a shard that is this one under one of its names. Header names
/// are unique within a header, so a name in two shards fails in one of them; and once every
/// shard tensor is a distinct index entry, equal counts mean every entry is a shard tensor.
fn agrees_with_index(index: &Index, shards: &[(Shard, Vec<TensorInfo>)]) -> bool {
    let count: usize = shards.iter().map(|(_, t)| t.len()).sum();
    if count != index.len() {
        return false;
    }
    let planned = planned_shards(index, shards);
    let check = |(i, infos): (usize, &[TensorInfo])| {
        infos.iter().all(|t| index.shard_of(&t.name).is_some_and(|n| planned[n as usize] == Some(i)))
    };
    let parts: Vec<(usize, &[TensorInfo])> = shards.iter().map(|(_, t)| t.as_slice()).enumerate().collect();
    // A look-up is a cache miss or two: 100,000s of them are worth a few threads.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8).min(parts.len());
    if threads < 2 || count < 1 << 14 {
        return parts.into_iter().all(check);
    }
    let per = parts.len().div_ceil(threads);
    std::thread::scope(|s| {
        // A thread that cannot be had leaves its part to this one.
        let handles: Vec<_> = parts
            .chunks(per)
            .map(|part| {
                let h = std::thread::Builder::new()
                    .name("tensorlift-plan".into())
                    .spawn_scoped(s, move || part.iter().copied().all(check));
                (part, h.ok())
            })
            .collect();
        let mut agree = true;
        for (part, h) in handles {
            agree &= match h.map(|h| h.join()) {
                Some(Ok(ok)) => ok,
                _ => part.iter().copied().all(check),
            };
        }
        agree
    })
}

/// For each shard name of the index, by number, the plan's shard it names.
fn planned_shards(index: &Index, shards: &[(Shard, Vec<TensorInfo>)]) -> Vec<Option<usize>> {
    let mut by_name: HashMap<&str, usize> = HashMap::default();
    for (i, (s, _)) in shards.iter().enumerate() {
        by_name.insert(&s.name, i);
        for a in &s.aliases {
            by_name.insert(a, i);
        }
    }
    index.shards().iter().map(|n| by_name.get(n.as_str()).copied()).collect()
}

/// Each tensor name's shard, or the error for a name in two shards: the table of every
/// name, for a checkpoint without an index (and to name an index's disagreement).
fn owners<'a>(context: &Path, shards: &'a [(Shard, Vec<TensorInfo>)]) -> Result<HashMap<&'a str, usize>, FormatError> {
    let count: usize = shards.iter().map(|(_, t)| t.len()).sum();
    let mut owner: HashMap<&str, usize> = HashMap::default();
    owner.try_reserve(count).map_err(|_| FormatError::OutOfMemory {
        file: context.to_path_buf(),
        what: "the plan's name table",
        bytes: (count * 2 * std::mem::size_of::<(&str, usize)>()) as u64,
    })?;
    for (i, (shard, infos)) in shards.iter().enumerate() {
        for t in infos {
            if let Some(first) = owner.insert(&t.name, i) {
                return Err(FormatError::TensorInTwoShards {
                    file: context.to_path_buf(),
                    tensor: t.name.clone(),
                    first: shards[first].0.name.clone(),
                    second: shard.name.clone(),
                });
            }
        }
    }
    Ok(owner)
}

/// The error for an index and headers that disagree, found again in the order a reader
/// expects it: a name in two shards first, then the index's entries in the file's order,
/// then the first shard tensor the index does not list.
fn disagreement(context: &Path, index_path: &Path, index: &Index, shards: &[(Shard, Vec<TensorInfo>)]) -> FormatError {
    let owner = match owners(context, shards) {
        Ok(owner) => owner,
        Err(e) => return e,
    };
    let planned = planned_shards(index, shards);
    for (tensor, shard) in index.numbered_entries() {
        let want = planned[shard as usize];
        if want.is_none() || owner.get(tensor).copied() != want {
            return FormatError::TensorNotInShard {
                file: index_path.to_path_buf(),
                tensor: tensor.to_owned(),
                shard: index.shards()[shard as usize].clone(),
            };
        }
    }
    for (shard, infos) in shards {
        if let Some(t) = infos.iter().find(|t| index.shard_of(&t.name).is_none()) {
            return FormatError::TensorNotInIndex {
                file: index_path.to_path_buf(),
                tensor: t.name.clone(),
                shard: shard.name.clone(),
            };
        }
    }
    // Unreachable by the argument of `agrees_with_index`; an error all the same.
    FormatError::InvalidIndex {
        file: index_path.to_path_buf(),
        message: "the index and the shards' headers disagree".into(),
    }
}
