use std::path::PathBuf;

/// A PyTorch checkpoint that cannot be read, and which file it is.
#[derive(Debug, thiserror::Error)]
#[error("{} (read as a PyTorch checkpoint): {kind}", file.display())]
pub struct TorchError {
    /// The file.
    pub file: PathBuf,
    /// What is wrong with it.
    pub kind: ErrorKind,
}

/// How many items of its values the reader may look at per byte of a pickle (each
/// container it checks counts its items), past a floor of 16 Mi.
pub const SCANS_PER_BYTE: u64 = 64;

/// Every way a PyTorch checkpoint can be refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Reading the file failed.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    /// Neither a zip archive nor the legacy pickle layout.
    #[error("not a PyTorch checkpoint: {0}")]
    NotTorch(String),
    /// The pickle makes the reader look at its values again and again (a large value,
    /// kept in the memo, checked by each of many small calls): past [`SCANS_PER_BYTE`]
    /// items per byte of pickle, it is refused rather than read for hours.
    #[error(
        "the pickle has had its values looked at {scanned} times by byte {at} (at most {SCANS_PER_BYTE} per byte \
         and 16 Mi more): one value checked again by many calls, which no torch.save writes"
    )]
    Rescans { at: usize, scanned: u64 },
    /// The zip archive is malformed, or uses a feature `torch.save` never writes.
    #[error("invalid zip archive: {0}")]
    Zip(String),
    /// The pickle names a global outside the allowlist: nothing was called.
    #[error("refused global '{module}.{name}' at pickle byte {at}: only the globals a state_dict needs are allowed, and nothing is executed")]
    RefusedGlobal { module: String, name: String, at: usize },
    /// The pickle uses an opcode a state_dict never needs (or one this reader refuses).
    #[error("refused pickle opcode {name} (0x{code:02x}) at byte {at}")]
    RefusedOpcode { code: u8, name: &'static str, at: usize },
    /// The pickle is malformed: a stack underflow, a bad memo reference, wrong arguments.
    #[error("invalid pickle at byte {at}: {message}")]
    Pickle { at: usize, message: String },
    /// Memory for the pickle's values could not be had (an address-space or memory limit),
    /// although they were within their budget.
    #[error("the pickle's values ({bytes} bytes so far) need memory that could not be allocated")]
    OutOfMemory { bytes: u64 },
    /// A bound on memory was reached.
    #[error("{what} exceeds the limit of {limit} ({setting})")]
    Limit { what: String, limit: u64, setting: &'static str },
    /// The pickled object is not a state_dict (a mapping of names to tensors).
    #[error("not a state_dict: {0}")]
    NotStateDict(String),
    /// A tensor refers to bytes its storage does not have, or the storage to bytes the file does not have.
    #[error("tensor '{tensor}': {message}")]
    Tensor { tensor: String, message: String },
    /// Data written on a big-endian machine.
    #[error("written on a big-endian machine: tensorlift reads little-endian checkpoints only (re-save it on a little-endian machine)")]
    BigEndian,
}

impl ErrorKind {
    pub(crate) fn pickle(at: usize, message: impl Into<String>) -> Self {
        ErrorKind::Pickle { at, message: message.into() }
    }
}
