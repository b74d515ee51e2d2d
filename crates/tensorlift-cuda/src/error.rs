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

/// A result other than success from a driver call: the code, and the driver's name for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverCode {
    code: i32,
    name: Option<String>,
}

impl DriverCode {
    pub(crate) fn new(code: i32, name: Option<String>) -> DriverCode {
        DriverCode { code, name }
    }

    /// The `CUresult` code (2 is `CUDA_ERROR_OUT_OF_MEMORY`).
    pub fn code(&self) -> i32 {
        self.code
    }

    /// The driver's name for the code, where it has one.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

impl std::fmt::Display for DriverCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name} ({})", self.code),
            None => write!(f, "CUDA error {} (a code this driver does not name)", self.code),
        }
    }
}

impl std::error::Error for DriverCode {}
