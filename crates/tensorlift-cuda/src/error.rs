use crate::driver::DriverCode;

/// A CUDA failure, naming the driver call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// No usable driver or device (the probe's reason).
    #[error("CUDA is unavailable: {0}")]
    Unavailable(String),
    /// The ordinal names no visible device.
    #[error("CUDA device {ordinal} does not exist ({count} visible)")]
    NoSuchDevice { ordinal: usize, count: usize },
    /// A driver call failed: the call, and the code it returned.
    #[error("{call} failed: {source}")]
    Driver {
        call: &'static str,
        #[source]
        source: DriverCode,
    },
    /// Host or device memory could not be had.
    #[error("cannot allocate {bytes} bytes of {what}")]
    OutOfMemory { what: &'static str, bytes: u64 },
    /// Memory a caller lent is not what it was said to be.
    #[error("caller's device memory at {0}")]
    Foreign(String),
    /// An NCCL call failed, or NCCL could not be loaded.
    #[error("{call} failed: {message}")]
    Nccl { call: &'static str, message: String },
    /// A copy named bytes outside its source chunk or its device arena.
    #[error("copy of {len} bytes out of bounds ({what})")]
    OutOfBounds { what: &'static str, len: usize },
}
