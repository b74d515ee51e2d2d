use std::path::PathBuf;

use tensorlift_format::FormatError;
use tensorlift_io::IoError;

/// Why converting a landed tensor failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConversionFailure {
    /// On the host.
    #[error(transparent)]
    Host(#[from] crate::convert::ConvertError),
    /// On the device: the kernel's launch or run.
    #[error(transparent)]
    Kernel(#[from] tensorlift_cuda::CudaError),
    /// The memory for the converted tensor is not what the load laid out (a bug in
    /// tensorlift: please report it).
    #[error("{0}")]
    Memory(String),
}

/// Why a load failed. Every variant names the file, and the tensor where there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The checkpoint is invalid (bad header, bad index, shard outside the folder, ...).
    #[error(transparent)]
    Format(#[from] FormatError),
    /// Opening a shard failed.
    #[error(transparent)]
    Open(IoError),
    /// Reading a shard failed; `tensor` is the first tensor the failed range holds.
    #[error("{}: tensor '{tensor}': {source}", file.display())]
    Read {
        file: PathBuf,
        tensor: String,
        #[source]
        source: IoError,
    },
    /// A shard changed between planning and loading (different length or header), or while
    /// it was read: each read is checked (the file's identity, length and times) before any
    /// tensor it completes is handed out, so a stream never hands out a tensor read after
    /// such a change.
    #[error("{}: shard changed since it was planned: {what}", file.display())]
    ShardChanged { file: PathBuf, what: String },
    /// Host memory for the tensors could not be allocated.
    #[error("{}: cannot allocate {bytes} bytes of host memory for its tensors", file.display())]
    OutOfMemory { file: PathBuf, bytes: u64 },
    /// The checkpoint needs more host memory than this process can get now (checked before
    /// anything is allocated: memory is committed when touched, so a load over it would be
    /// killed midway rather than fail).
    #[error("{}: the tensors need {needed} bytes of host memory, but only {available} bytes are available", file.display())]
    HostMemory { file: PathBuf, needed: u64, available: u64 },
    /// The device has less free memory than the load needs (checked before any read).
    #[error("{}: the tensors need {needed} bytes on {device}, which has {free} bytes free", file.display())]
    DeviceMemory { file: PathBuf, device: crate::Device, needed: u64, free: u64 },
    /// A copy to the device failed; `tensor` is the first tensor the chunk held.
    #[error("{}: tensor '{tensor}': copy to {device} failed: {source}", file.display())]
    Copy {
        file: PathBuf,
        tensor: String,
        device: crate::Device,
        #[source]
        source: tensorlift_cuda::CudaError,
    },
    /// A CUDA call of the load failed (not a copy).
    #[error("{}: {source}", file.display())]
    Cuda {
        file: PathBuf,
        #[source]
        source: tensorlift_cuda::CudaError,
    },
    /// A CUDA device was asked for and cannot be used: `reason` says why (the driver's
    /// absence, a device that does not exist, staging memory that cannot be pinned, ...),
    /// with the driver's error as `source` where one failed.
    #[error("CUDA device {ordinal} is unavailable: {reason}")]
    CudaUnavailable {
        ordinal: usize,
        reason: String,
        #[source]
        source: Option<tensorlift_cuda::CudaError>,
    },
    /// The tensor filter selects no tensor of the checkpoint.
    #[error("{}: no tensor matches the filter {}", file.display(), patterns.iter().map(|p| format!("'{p}'")).collect::<Vec<_>>().join(", "))]
    NothingMatched { file: PathBuf, patterns: Vec<String> },
    /// The planning thread stopped without an answer (a bug in tensorlift: please report it).
    #[error("planning stopped without an answer (a bug in tensorlift: please report it)")]
    PlanningFailed,
    /// An option this build does not support in this combination (the message says which).
    #[error("not supported: {0}")]
    Unsupported(String),
    /// Converting a landed tensor to another dtype failed.
    #[error("{}: tensor '{tensor}': conversion to {to} failed: {source}", file.display())]
    Convert {
        file: PathBuf,
        tensor: String,
        to: tensorlift_format::Dtype,
        #[source]
        source: ConversionFailure,
    },
    /// A caller's destination for a tensor is misused (too small, on another device,
    /// overlapping another tensor's), or the placement rule refused the tensor.
    #[error("{}: tensor '{tensor}': cannot place it: {message}", file.display())]
    Destination { file: std::path::PathBuf, tensor: String, message: String },
    /// A slice does not fit its tensor, or a slice rule refused the tensor.
    #[error("{}: tensor '{tensor}': cannot slice: {message}", file.display())]
    Slice { file: std::path::PathBuf, tensor: String, message: String },
    /// A tensor filter pattern is not a valid glob.
    #[error("invalid tensor filter '{pattern}': {message}")]
    InvalidFilter { pattern: String, message: String },
    /// A shard's (or the index's) bytes are not what their expected SHA-256 says.
    #[error("{}: its SHA-256 is {actual}, but {expected_by} expects {expected}", file.display())]
    Checksum {
        file: PathBuf,
        expected: crate::digest::Sha256,
        actual: crate::digest::Sha256,
        /// Where the expected digest was found.
        expected_by: crate::digest::DigestSource,
    },
    /// The index is a Hugging Face hub cache blob whose bytes are not what its name, git's
    /// SHA-1 object name for them, says (in a hub cache the index is stored in git, not with
    /// LFS, so its blob has no SHA-256 name).
    #[error(
        "{}: its bytes are not the hub cache blob {} they should be: git's SHA-1 of them is {actual}, the blob's \
         name {expected}",
        file.display(),
        blob.display()
    )]
    IndexBlob { file: PathBuf, blob: PathBuf, expected: String, actual: String },
    /// A shard's hashing ended before its digest (its thread ended early: a bug in
    /// tensorlift, please report it); its tensors are never handed out.
    #[error("{}: its SHA-256 was not computed: the hashing stopped early (a bug in tensorlift: please report it)", file.display())]
    HashingFailed { file: PathBuf },
    /// A load that must verify every shard found no expected digest for this one.
    #[error(
        "{}: no expected SHA-256 to verify it with: it is no hub cache blob named by its digest, and {} does not \
         list it (`tensorlift manifest` writes one; verify if-known loads such shards unverified)",
        file.display(),
        sums_file.display()
    )]
    NoDigest { file: PathBuf, sums_file: PathBuf },
    /// The `SHA256SUMS` beside the checkpoint cannot be read.
    #[error(transparent)]
    Sums(#[from] crate::digest::SumsError),
    /// A group load failed on another rank, or the ranks could not agree.
    #[error("group load: {0}")]
    Group(String),
    /// A device string could not be parsed.
    #[error("invalid device '{0}' (expected auto, cpu, cuda or cuda:N)")]
    InvalidDevice(String),
}

impl From<crate::device::InvalidDevice> for LoadError {
    fn from(e: crate::device::InvalidDevice) -> Self {
        LoadError::InvalidDevice(e.0)
    }
}

/// The file an error about the whole checkpoint names: its one shard, its index, or its folder.
pub(crate) fn plan_file(plan: &tensorlift_format::LoadPlan) -> std::path::PathBuf {
    match (plan.shards(), plan.index_file()) {
        ([one], _) => one.path.clone(),
        (_, Some(index)) => index.to_path_buf(),
        _ => plan.root().to_path_buf(),
    }
}

/// The error of a failed read, naming the first tensor it holds.
pub(crate) fn read_error(
    plan: &tensorlift_format::LoadPlan,
    read: &crate::layout::Read,
    source: tensorlift_io::IoError,
) -> LoadError {
    let range = read.file_offset..read.file_offset + read.len as u64;
    let tensor = plan
        .tensors()
        .iter()
        .find(|t| t.shard == read.shard && t.file_range.end > range.start && t.file_range.start < range.end)
        .map_or_else(
            || match plan.tensors() {
                // Read before the plan stood, which would name the tensor.
                [] => format!("<bytes {}..{}, read before the plan stood>", range.start, range.end),
                _ => "<padding>".to_owned(),
            },
            |t| t.name.clone(),
        );
    match source {
        // A remote object replaced or cut during the load.
        tensorlift_io::IoError::Changed { file, what } => LoadError::ShardChanged { file, what },
        source => LoadError::Read { file: plan.shards()[read.shard].path.clone(), tensor, source },
    }
}
