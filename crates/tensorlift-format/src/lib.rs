//! Parsing and validation of safetensors checkpoints, from header bytes to a [`LoadPlan`].
//!
//! This crate is pure: it performs no I/O and contains no unsafe code. Callers read the
//! first `8 + N` bytes of each file (see [`header_len`]) and hand them to
//! [`parse_header`]; [`LoadPlan::assemble`] checks shards against each other and against
//! their index. Opening files (links, folders, the hub cache layout) is `tensorlift-io`'s job.
//!
//! A checkpoint is untrusted input. Validation follows the reference `safetensors` reader
//! (header cap, strict UTF-8 and JSON, known dtypes, checked shape arithmetic, offsets
//! contiguous from 0, data ending exactly at the end of the file) and is stricter where
//! the reference is lax: duplicate tensor names (in a header or an index), shard names that
//! leave the model folder, and index/shard disagreements are errors.
//!
//! ```
//! use std::path::Path;
//! use tensorlift_format::{parse_header, Dtype};
//!
//! let json = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
//! let mut file = (json.len() as u64).to_le_bytes().to_vec();
//! file.extend_from_slice(json);
//! file.extend_from_slice(&[0u8; 8]);
//! let header = parse_header(Path::new("w.safetensors"), &file, file.len() as u64)?;
//! assert_eq!(header.tensors[0].dtype, Dtype::F32);
//! assert_eq!(header.data_start(), 8 + json.len() as u64);
//! # Ok::<(), tensorlift_format::FormatError>(())
//! ```
#![forbid(unsafe_code)]

mod error;
mod header;
mod index;
mod plan;
mod slice;
mod writer;

pub use error::FormatError;
pub use header::{
    header_len, parse_dtype, parse_header, sniff_pytorch, Header, TensorInfo, HEADER_PREFIX_LEN, MAX_HEADER_LEN,
};
pub use index::{check_relative, natural_cmp, normal_name, parse_index, Index, INDEX_FILE_NAME, MAX_INDEX_LEN};
pub use plan::{header_hash, FileIdentity, LoadPlan, PlannedTensor, Shard};
/// Element types: the reference `safetensors` crate's `Dtype`, whose names are the header's
/// `dtype` strings (`"BF16"`, `"F8_E4M3"`, ...), shown here as a re-export rather than with
/// that crate's own notes (its order of variants means nothing to tensorlift).
#[doc(no_inline)]
pub use safetensors::Dtype;
pub use slice::{Gather, SliceError, SliceLayout, TensorSlice};
pub use writer::{encode_header, EncodedHeader};
