//! Resolving a user's path into a validated [`LoadPlan`] over one or more shards.

use std::collections::{HashMap, HashSet};
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::header::{header_len, parse_header, Header, HEADER_PREFIX_LEN};
use crate::index::{check_relative, natural_cmp, parse_index, Index, INDEX_FILE_NAME, MAX_INDEX_LEN};
use crate::FormatError;

/// What a [`CheckpointSource`] says a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file of this many bytes.
    File { len: u64 },
    /// A directory.
    Dir,
    /// Anything else (device, socket, ...).
    Other,
}

/// The file-system questions resolution asks. Keeping them behind a trait keeps this crate
/// free of I/O; `tensorlift-io` implements it over `std::fs`.
pub trait CheckpointSource {
    /// What `path` is, following symbolic links.
    fn kind(&self, path: &Path) -> io::Result<EntryKind>;
    /// File names (not paths) in a directory.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// The absolute path with every link resolved.
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf>;
    /// Exactly `len` bytes at `offset` (an error if the file is shorter).
    fn read_at(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>>;
}

/// One shard of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// Canonical path of the file.
    pub path: PathBuf,
    /// Name relative to the model folder, as a user would write it.
    pub name: String,
    /// File length seen at planning time; a load checks it again.
    pub file_len: u64,
    /// The validated header.
    pub header: Header,
}

impl Shard {
    /// File offset where the data section begins.
    pub fn data_start(&self) -> u64 {
        self.header.data_start()
    }
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
    /// Absolute byte range in the shard file.
    pub file_range: Range<u64>,
}

impl PlannedTensor {
    /// Bytes of data.
    pub fn len(&self) -> u64 {
        self.file_range.end - self.file_range.start
    }

    /// Whether the tensor holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.file_range.is_empty()
    }
}

/// Every tensor of a checkpoint with the shard and byte range it comes from. Tensors are
/// ordered by shard, then by offset, which is the order a sequential read meets them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadPlan {
    root: PathBuf,
    index: Option<PathBuf>,
    shards: Vec<Shard>,
    tensors: Vec<PlannedTensor>,
}

impl LoadPlan {
    /// The model folder.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The index file, for a sharded checkpoint that has one.
    pub fn index_file(&self) -> Option<&Path> {
        self.index.as_deref()
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
}

/// Resolves `path` (a `.safetensors` file, an index JSON file, or a folder) into a plan,
/// reading only headers. A folder uses its `model.safetensors.index.json` when present,
/// else every `*.safetensors` file in it in natural order.
pub fn resolve(source: &dyn CheckpointSource, path: &Path) -> Result<LoadPlan, FormatError> {
    let io_err = |source| FormatError::Io { file: path.to_path_buf(), source };
    match source.kind(path).map_err(io_err)? {
        EntryKind::Dir => {
            let root = source.canonicalize(path).map_err(io_err)?;
            let index = root.join(INDEX_FILE_NAME);
            if matches!(source.kind(&index), Ok(EntryKind::File { .. })) {
                return resolve_index(source, &index);
            }
            let names = source.list_dir(&root).map_err(io_err)?;
            let mut shards: Vec<String> = names.into_iter().filter(|n| n.ends_with(".safetensors")).collect();
            shards.sort_by(|a, b| natural_cmp(a, b));
            if shards.is_empty() {
                return Err(FormatError::NoShards { file: root });
            }
            let mut loaded = Vec::with_capacity(shards.len());
            for name in shards {
                loaded.push(open_shard(source, &root, &root, name)?);
            }
            from_shards(&root, root.clone(), None, loaded)
        }
        EntryKind::File { .. } if path.extension().is_some_and(|e| e == "json") => resolve_index(source, path),
        EntryKind::File { .. } => {
            let file = source.canonicalize(path).map_err(io_err)?;
            let root = file.parent().map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
            let name = file.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            let shard = read_shard(source, file.clone(), name)?;
            from_shards(&file, root, None, vec![shard])
        }
        EntryKind::Other => Err(FormatError::NotACheckpoint { file: path.to_path_buf() }),
    }
}

fn resolve_index(source: &dyn CheckpointSource, index_path: &Path) -> Result<LoadPlan, FormatError> {
    let io_err = |source| FormatError::Io { file: index_path.to_path_buf(), source };
    let index_path = source.canonicalize(index_path).map_err(io_err)?;
    let root = index_path.parent().map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
    let len = match source.kind(&index_path).map_err(io_err)? {
        EntryKind::File { len } => len,
        _ => return Err(FormatError::NotACheckpoint { file: index_path }),
    };
    if len > MAX_INDEX_LEN {
        return Err(FormatError::InvalidIndex {
            file: index_path,
            message: format!("{len} bytes is over the {MAX_INDEX_LEN}-byte limit for an index"),
        });
    }
    let bytes = source.read_at(&index_path, 0, len as usize).map_err(io_err)?;
    let index = parse_index(&index_path, &bytes)?;
    let mut shards = Vec::new();
    for name in index.shard_names() {
        shards.push(open_shard(source, &root, &index_path, name.to_owned())?);
    }
    check_against_index(&index_path, &index, &shards)?;
    from_shards(&index_path, root, Some(index_path.clone()), shards)
}

/// Opens a shard named relative to `root`, refusing one that resolves outside it.
fn open_shard(source: &dyn CheckpointSource, root: &Path, context: &Path, name: String) -> Result<Shard, FormatError> {
    check_relative(context, &name)?;
    let unreadable = |source| FormatError::ShardUnreadable { file: context.to_path_buf(), shard: name.clone(), source };
    let path = source.canonicalize(&root.join(&name)).map_err(unreadable)?;
    if !path.starts_with(root) {
        return Err(FormatError::ShardOutsideFolder {
            file: context.to_path_buf(),
            shard: name,
            reason: "a link resolves outside the folder",
        });
    }
    read_shard(source, path, name)
}

/// Reads and validates one shard's header: 8 bytes, then N, never the data.
fn read_shard(source: &dyn CheckpointSource, path: PathBuf, name: String) -> Result<Shard, FormatError> {
    let io_err = |source| FormatError::Io { file: path.clone(), source };
    let file_len = match source.kind(&path).map_err(io_err)? {
        EntryKind::File { len } => len,
        _ => return Err(FormatError::NotACheckpoint { file: path }),
    };
    let prefix_len = HEADER_PREFIX_LEN.min(file_len) as usize;
    let mut bytes = source.read_at(&path, 0, prefix_len).map_err(io_err)?;
    let n = header_len(&path, &bytes, file_len)?;
    bytes.extend(source.read_at(&path, HEADER_PREFIX_LEN, n as usize).map_err(io_err)?);
    let header = parse_header(&path, &bytes, file_len)?;
    Ok(Shard { path, name, file_len, header })
}

/// Checks the index and the shard headers agree: every indexed tensor is in the shard the
/// index names, and every shard tensor is indexed.
fn check_against_index(index_path: &Path, index: &Index, shards: &[Shard]) -> Result<(), FormatError> {
    // Each shard's tensor names as a set: the index can list 100,000s of tensors.
    let by_name: HashMap<&str, HashSet<&str>> =
        shards.iter().map(|s| (s.name.as_str(), s.header.tensors.iter().map(|t| t.name.as_str()).collect())).collect();
    for (tensor, shard_name) in &index.weight_map {
        // Every shard name comes from this same weight_map, so the look-up always succeeds.
        if !by_name.get(shard_name.as_str()).is_some_and(|names| names.contains(tensor.as_str())) {
            return Err(FormatError::TensorNotInShard {
                file: index_path.to_path_buf(),
                tensor: tensor.clone(),
                shard: shard_name.clone(),
            });
        }
    }
    for shard in shards {
        for t in &shard.header.tensors {
            if !index.weight_map.contains_key(&t.name) {
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

/// Builds the plan and enforces that no tensor name appears in two shards.
fn from_shards(
    context: &Path,
    root: PathBuf,
    index: Option<PathBuf>,
    shards: Vec<Shard>,
) -> Result<LoadPlan, FormatError> {
    let count = shards.iter().map(|s| s.header.tensors.len()).sum();
    let mut owner: HashMap<&str, usize> = HashMap::with_capacity(count);
    let mut tensors = Vec::with_capacity(count);
    for (i, shard) in shards.iter().enumerate() {
        for t in &shard.header.tensors {
            if let Some(&first) = owner.get(t.name.as_str()) {
                return Err(FormatError::TensorInTwoShards {
                    file: context.to_path_buf(),
                    tensor: t.name.clone(),
                    first: shards[first].name.clone(),
                    second: shard.name.clone(),
                });
            }
            owner.insert(&t.name, i);
            let start = shard.data_start() + t.data_offsets.0;
            tensors.push(PlannedTensor {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                shard: i,
                file_range: start..start + t.len(),
            });
        }
    }
    Ok(LoadPlan { root, index, shards, tensors })
}
