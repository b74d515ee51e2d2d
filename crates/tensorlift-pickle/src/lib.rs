//! Reads PyTorch checkpoints (`pytorch_model.bin`, `.pt`) written by `torch.save` of a
//! `state_dict`, without executing anything.
//!
//! Unpickling with Python runs whatever code the file's author chose; this crate's pickle
//! interpreter only builds values. It accepts what `torch.load(weights_only=True)` accepts
//! for a state_dict, and reads it to the same tensors: the opcodes of PyTorch's weights-only
//! unpickler (protocol 2, which `torch.save` writes, with Python 2's short strings) and its
//! allowlist of globals (`collections.OrderedDict`, the `torch._utils._rebuild_*` functions
//! of plain tensors and parameters, storage classes, dtypes, `torch.device`, `torch.Size`,
//! ...). Any other global or opcode is an error that names it, as PyTorch refuses it;
//! quantized, sparse and nested tensors, which PyTorch allows, are refused by name. A
//! differential test holds this against PyTorch itself. Memory is bounded by [`Limits`],
//! as a safetensors header's is: the pickle's values by a multiple of its bytes, and every
//! size in the pickle is checked against the file.
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

pub use error::{ErrorKind, TorchError, SCANS_PER_BYTE};
pub use source::ReadAt;
pub use torch::{Layout, Limits, Storage, TorchCheckpoint, TorchTensor};

/// Whether a file name is one `torch.save` checkpoints usually have.
pub fn is_torch_file_name(name: &str) -> bool {
    name.ends_with(".bin") || name.ends_with(".pt") || name.ends_with(".pth")
}
