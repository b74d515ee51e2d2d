use std::io;
use std::path::PathBuf;

/// An I/O failure, naming the file and, for a read, the byte range.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IoError {
    /// The file could not be opened or inspected.
    #[error("{}: cannot open: {source}", file.display())]
    Open {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The kernel reported an error for a read.
    #[error("{}: read of {len} bytes at offset {offset} failed: {source}", file.display())]
    Read {
        file: PathBuf,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    /// The file ended before the requested range did: it was truncated or replaced.
    #[error("{}: file ends at byte {at}, inside the read of {len} bytes at offset {offset} (truncated or replaced?)", file.display())]
    UnexpectedEof { file: PathBuf, offset: u64, len: u64, at: u64 },
    /// The destination buffer cannot hold the requested bytes.
    #[error("{}: a {capacity}-byte buffer cannot take {len} bytes at buffer offset {buf_offset}", file.display())]
    BufferTooSmall { file: PathBuf, buf_offset: usize, len: usize, capacity: usize },
    /// The worker serving the read went away before completing it (a bug, never an
    /// environment fact), or the load it was for was dropped first.
    #[error("{}: the I/O worker stopped before the read of {len} bytes at offset {offset} completed", file.display())]
    WorkerGone { file: PathBuf, offset: u64, len: u64 },
    /// Registering fixed buffers with io_uring failed.
    #[error("cannot register buffers with io_uring: {source}")]
    Register {
        #[source]
        source: io::Error,
    },
    /// Memory sized by the file (a header read again) could not be had.
    #[error("{}: cannot allocate {bytes} bytes", file.display())]
    OutOfMemory { file: PathBuf, bytes: u64 },
    /// A shard is not the file that was planned, or it changed since.
    #[error("{}: shard changed since it was planned: {what}", file.display())]
    Changed { file: PathBuf, what: String },
    /// A request for a byte range of a remote object failed, after the store's retries.
    #[error("{}: GET of {len} bytes at offset {offset} failed: {source}", file.display())]
    Remote {
        file: PathBuf,
        offset: u64,
        len: u64,
        #[source]
        source: Box<object_store::Error>,
    },
    /// Memory-mapping the file failed.
    #[error("{}: cannot map: {source}", file.display())]
    Map {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A failed read: the error, and the caller's buffer back.
///
/// `buf` is `None` only if the worker itself is gone ([`IoError::WorkerGone`]), which the
/// design rules out: the buffer was then dropped safely on the worker's side, or, where the
/// worker unwound with the read still in the kernel's hands, leaked (the kernel may still
/// write into it).
#[derive(Debug)]
pub struct ReadFailed<B> {
    /// What went wrong.
    pub error: IoError,
    /// The buffer lent to the read.
    pub buf: Option<B>,
}

/// The outcome of a read: the buffer back, filled, or the failure with the buffer.
pub type ReadResult<B> = Result<B, ReadFailed<B>>;
