//! Reads PyTorch checkpoints (`pytorch_model.bin`, `.pt`) written by `torch.save` of a
//! `state_dict`, without executing anything.
//!
//! Unpickling with Python runs whatever code the file's author chose; this crate's pickle
//! interpreter only builds values. It knows the opcodes a state_dict uses and an allowlist
//! of globals (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter`, the typed storage classes, `torch.device`,
//! `torch.Size`); any other global is an error that names it. Memory is bounded by
//! [`Limits`], as a safetensors header's is, and every size in the pickle is checked
//! against the file.
//!
//! Both layouts are read: the zip archive of PyTorch >= 1.6 and the legacy layout. Tensor
//! data is not read until asked for ([`TorchCheckpoint::tensor_bytes`]), and each storage is
//! a plain byte range of the file.
//!
//! ```
//! use std::path::Path;
//! use tensorlift_pickle::{TorchCheckpoint, Limits};
//!
//! // A pickle that names `os.system` is refused before anything could call it.
//! let evil: &[u8] = b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85q\x02Rq\x03.";
//! let err = TorchCheckpoint::read(evil, Path::new("evil.bin"), &Limits::default()).unwrap_err();
//! assert!(err.to_string().contains("refused global 'os.system'"), "{err}");
//! ```
#![forbid(unsafe_code)]

mod error;
mod source;
mod torch;
mod vm;
mod zip;

pub use error::{ErrorKind, TorchError};
pub use source::ReadAt;
pub use torch::{Layout, Limits, Storage, TorchCheckpoint, TorchTensor};

/// Whether a file name is one `torch.save` checkpoints usually have.
pub fn is_torch_file_name(name: &str) -> bool {
    name.ends_with(".bin") || name.ends_with(".pt") || name.ends_with(".pth")
}
