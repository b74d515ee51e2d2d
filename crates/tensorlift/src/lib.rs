//! Load safetensors checkpoints into GPU or host memory at the speed of the hardware.
#![forbid(unsafe_code)]

use std::path::Path;

pub use tensorlift_format as format;
pub use tensorlift_format::{Dtype, FormatError, LoadPlan};

/// Resolves `path` (a `.safetensors` file, an index JSON or a folder) and validates every
/// shard's header, reading headers only.
pub fn plan(path: impl AsRef<Path>) -> Result<LoadPlan, FormatError> {
    tensorlift_format::resolve(&tensorlift_io::FsSource, path.as_ref())
}
