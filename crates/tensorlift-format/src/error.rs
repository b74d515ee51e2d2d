use std::path::PathBuf;

/// Every way a checkpoint can fail validation.
///
/// Each variant names the file it concerns and, where there is one, the tensor, so that
/// the `Display` form alone tells a user what to look at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The file is shorter than the 8-byte header length prefix.
    #[error("{}: file is {len} bytes, too small to hold the 8-byte header length", file.display())]
    HeaderTooSmall { file: PathBuf, len: u64 },

    /// The declared header length is over the 100,000,000-byte cap of the format.
    #[error("{}: header length {header_len} exceeds the limit of {max} bytes", file.display(), max = crate::MAX_HEADER_LEN)]
    HeaderTooLarge { file: PathBuf, header_len: u64 },

    /// The declared header runs past the end of the file (or of the bytes given).
    #[error("{}: header of {header_len} bytes runs past the end of the {available}-byte input", file.display())]
    HeaderIncomplete { file: PathBuf, header_len: u64, available: u64 },

    /// The header is not valid UTF-8.
    #[error("{}: header is not valid UTF-8 (at byte {valid_up_to} of the header)", file.display())]
    HeaderNotUtf8 { file: PathBuf, valid_up_to: usize },

    /// The header is not one valid JSON object (syntax, trailing bytes, NULs, wrong types).
    #[error("{}: header is not valid JSON: {message}", file.display())]
    HeaderJson { file: PathBuf, message: String },

    /// `__metadata__` is not a flat map of strings to strings.
    #[error("{}: __metadata__ must map strings to strings: {message}", file.display())]
    InvalidMetadata { file: PathBuf, message: String },

    /// A tensor entry lacks a field or has one of the wrong type.
    #[error("{}: tensor '{tensor}': invalid entry: {message}", file.display())]
    InvalidTensorEntry { file: PathBuf, tensor: String, message: String },

    /// The same tensor name appears twice in one header (the reference reader keeps the last).
    #[error("{}: tensor '{tensor}' appears more than once in the header", file.display())]
    DuplicateTensor { file: PathBuf, tensor: String },

    /// The dtype string is not one of the format's dtypes.
    #[error("{}: tensor '{tensor}': unknown dtype '{dtype}'", file.display())]
    UnknownDtype { file: PathBuf, tensor: String, dtype: String },

    /// shape x dtype size does not fit in 64 bits.
    #[error("{}: tensor '{tensor}': element count times dtype size overflows", file.display())]
    SizeOverflow { file: PathBuf, tensor: String },

    /// A sub-byte dtype (F4, F6_*) whose element count does not fill whole bytes.
    #[error("{}: tensor '{tensor}': {bits} bits of data do not fill whole bytes", file.display())]
    PartialByte { file: PathBuf, tensor: String, bits: u64 },

    /// The data offsets do not span exactly shape x dtype bytes.
    #[error("{}: tensor '{tensor}': data_offsets [{begin}, {end}] span {} bytes but shape and dtype need {expected}", file.display(), end.saturating_sub(*begin))]
    SizeMismatch { file: PathBuf, tensor: String, begin: u64, end: u64, expected: u64 },

    /// A tensor does not start where the previous one ended (a hole or an overlap), or ends before it starts.
    #[error("{}: tensor '{tensor}': data_offsets [{begin}, {end}] should start at {expected_begin} (offsets must be contiguous from 0 with no holes or overlaps)", file.display())]
    InvalidOffsets { file: PathBuf, tensor: String, begin: u64, end: u64, expected_begin: u64 },

    /// The data section does not end exactly at the end of the file.
    #[error("{}: header describes {data_len} data bytes after the 8-byte length and the {header_len}-byte header ({} bytes in all), but the file has {file_len} bytes", file.display(), data_len.saturating_add(*header_len).saturating_add(8))]
    DataLengthMismatch { file: PathBuf, header_len: u64, data_len: u64, file_len: u64 },

    /// The index file is not valid JSON of the expected shape.
    #[error("{}: invalid index: {message}", file.display())]
    InvalidIndex { file: PathBuf, message: String },

    /// A shard path from the index (or a file in the folder) resolves outside the model folder.
    #[error("{}: shard '{shard}' is outside the model folder ({reason})", file.display())]
    ShardOutsideFolder { file: PathBuf, shard: String, reason: &'static str },

    /// A shard the index names does not exist or cannot be read.
    #[error("{}: shard '{shard}': {source}", file.display())]
    ShardUnreadable {
        file: PathBuf,
        shard: String,
        #[source]
        source: std::io::Error,
    },

    /// The index places a tensor in a shard whose header does not hold it.
    #[error("{}: tensor '{tensor}' is listed in shard '{shard}' but that shard does not contain it", file.display())]
    TensorNotInShard { file: PathBuf, tensor: String, shard: String },

    /// A shard holds a tensor the index does not list.
    #[error("{}: shard '{shard}' contains tensor '{tensor}', which the index does not list", file.display())]
    TensorNotInIndex { file: PathBuf, tensor: String, shard: String },

    /// One tensor name is found in two shards.
    #[error("{}: tensor '{tensor}' appears in two shards: '{first}' and '{second}'", file.display())]
    TensorInTwoShards { file: PathBuf, tensor: String, first: String, second: String },

    /// A shard or index is a FIFO, a device, a socket or a directory, not a regular file.
    #[error("{}: is a {kind}, not a regular file", file.display())]
    NotARegularFile { file: PathBuf, kind: &'static str },

    /// The file is a PyTorch checkpoint (`torch.save`), not safetensors.
    #[error("{}: is a PyTorch checkpoint ({layout}), not a safetensors file; convert it to safetensors first (`tensorlift convert` reads it without executing it: tensorlift convert SRC DST)", file.display())]
    PyTorchCheckpoint { file: PathBuf, layout: &'static str },

    /// A PyTorch checkpoint that tensorlift's pickle reader refused, or cannot load as
    /// byte ranges (a strided view).
    #[error("{}: {message}", file.display())]
    PyTorch { file: PathBuf, message: String },

    /// The headers a plan would hold exceed the configured budget.
    #[error("{}: the headers of this checkpoint need {needed} bytes, over the plan's header budget of {limit} bytes (raise it with LoaderBuilder::max_header_bytes)", file.display())]
    HeaderBudget { file: PathBuf, needed: u64, limit: u64 },

    /// Memory whose size comes from the file could not be allocated.
    #[error("{}: cannot allocate {bytes} bytes for {what}", file.display())]
    OutOfMemory { file: PathBuf, what: &'static str, bytes: u64 },

    /// The path is a folder with neither an index nor any `.safetensors` file.
    #[error("{}: no model.safetensors.index.json and no .safetensors files in this folder", file.display())]
    NoShards { file: PathBuf },

    /// A folder (or a store's folder) without an index holds more checkpoint files than a
    /// plan opens ([`PlanLimits::max_shards`](../tensorlift_io/struct.PlanLimits.html)).
    #[error(
        "{}: {what}, over the limit of {limit} (PlanLimits::max_shards): name its index or one file instead",
        file.display()
    )]
    TooManyFiles { file: PathBuf, what: String, limit: usize },

    /// The path is not a `.safetensors` file, an index JSON file or a folder.
    #[error("{}: not a .safetensors file, a .json index or a folder", file.display())]
    NotACheckpoint { file: PathBuf },

    /// A checkpoint file whose name is not UTF-8: shards are named by UTF-8 names, as an
    /// index names them.
    #[error("{}: the file's name is not UTF-8, which shard names must be (rename it)", file.display())]
    NameNotUtf8 { file: PathBuf },

    /// Reading a file failed.
    #[error("{}: {source}", file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FormatError {
    /// The file this error is about.
    pub fn file(&self) -> &std::path::Path {
        use FormatError::*;
        match self {
            HeaderTooSmall { file, .. }
            | HeaderTooLarge { file, .. }
            | HeaderIncomplete { file, .. }
            | HeaderNotUtf8 { file, .. }
            | HeaderJson { file, .. }
            | InvalidMetadata { file, .. }
            | InvalidTensorEntry { file, .. }
            | DuplicateTensor { file, .. }
            | UnknownDtype { file, .. }
            | SizeOverflow { file, .. }
            | PartialByte { file, .. }
            | SizeMismatch { file, .. }
            | InvalidOffsets { file, .. }
            | DataLengthMismatch { file, .. }
            | InvalidIndex { file, .. }
            | ShardOutsideFolder { file, .. }
            | ShardUnreadable { file, .. }
            | TensorNotInShard { file, .. }
            | TensorNotInIndex { file, .. }
            | TensorInTwoShards { file, .. }
            | NotARegularFile { file, .. }
            | PyTorchCheckpoint { file, .. }
            | PyTorch { file, .. }
            | HeaderBudget { file, .. }
            | OutOfMemory { file, .. }
            | NoShards { file }
            | TooManyFiles { file, .. }
            | NotACheckpoint { file }
            | NameNotUtf8 { file }
            | Io { file, .. } => file,
        }
    }
}
