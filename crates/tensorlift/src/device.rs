use std::fmt;
use std::str::FromStr;

/// Where tensors are loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Device {
    /// A CUDA device when one is usable, else the host; the reason is in the stats.
    #[default]
    Auto,
    /// Host memory.
    Cpu,
    /// CUDA device by ordinal: tensors are loaded into its memory (pinned staging chunks,
    /// copied on several streams). A loader asking for a device it cannot use fails to build
    /// with [`LoadError::CudaUnavailable`](crate::LoadError::CudaUnavailable) and the reason.
    Cuda(usize),
}

/// The environment variable that overrides the device when the builder did not set one.
pub const DEVICE_ENV: &str = "TENSORLIFT_DEVICE";

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// A device name that is not `auto`, `cpu`, `cuda` or `cuda:N` (it converts into
/// [`LoadError::InvalidDevice`](crate::LoadError::InvalidDevice)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid device '{0}' (expected auto, cpu, cuda or cuda:N)")]
pub struct InvalidDevice(pub String);

impl FromStr for Device {
    type Err = InvalidDevice;
    fn from_str(s: &str) -> Result<Self, InvalidDevice> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => t
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| InvalidDevice(s.to_owned())),
        }
    }
}
