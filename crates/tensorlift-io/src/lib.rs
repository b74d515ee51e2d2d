//! Bytes from files into caller-owned buffers, as fast as the storage allows.
//!
//! A [`Reader`] turns (file, byte range) requests into bytes in buffers that the caller
//! lends by value ([`IoBufMut`]) and gets back with the result. It knows nothing of CUDA.
//!
//! Backends, chosen at run time ([`ReaderBuilder::build`] never fails):
//! - **io_uring**: one ring per worker thread, reads at depth across files, O_DIRECT for the
//!   aligned part of each range (alignment from `statx`), buffered reads for the rest,
//!   short reads resubmitted, fixed buffers when registered;
//! - **pread**: a thread pool, used when io_uring is refused (ENOSYS, EPERM, ENOMEM).
//!
//! `TENSORLIFT_IO=uring|pread` overrides the choice; [`Reader::report`] says what was
//! chosen and why.
//!
//! [`open_checkpoint`] opens a checkpoint's folder and shards once, under the folder and link
//! policy, and plans it; loads read those same descriptors. Memory maps ([`MappedFile`]) copy
//! out without a SIGBUS reachable from safe code; zero-copy views need the `unsafe`
//! [`MapContract`].
//!
//! ```
//! use tensorlift_io::{AlignedBuf, Reader};
//! # let dir = std::env::temp_dir().join(format!("tl-io-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # let path = dir.join("f.bin");
//! # std::fs::write(&path, vec![7u8; 10_000])?;
//! let reader = Reader::builder().build();
//! let file = reader.open(&path)?;
//! let buf = AlignedBuf::zeroed(8192, 4096).unwrap();
//! let buf = reader.read(&file, 4096, buf, 0, 5904).wait().map_err(|f| f.error)?;
//! assert!(buf.as_slice()[..5904].iter().all(|&b| b == 7));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(clippy::undocumented_unsafe_blocks)]

mod arena;
mod buf;
pub mod cache;
mod caller;
mod checkpoint;
mod error;
mod file;
pub mod fill;
mod mmap;
mod op;
mod open;
mod pread;
mod probe;
mod process;
mod reader;
pub mod remote;
mod remote_plan;
mod uring;

pub use arena::{ArenaChunk, ArenaPool, HostArena, Prefaulter};
pub use buf::{AlignedBuf, IoBufMut, MAP_THRESHOLD, PAGE};
pub use caller::{CallerChunk, CallerMemory, CallerRegion, Claim, ClaimError, HostChunk};
pub use checkpoint::{
    content_change, identity_change, is_pytorch_file, link_allowed, open_pytorch, Checkpoint, HeaderCheck, PlanLimits,
    PlanObserver, PyTorchFiles, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_OPEN_FILES, SETTLED_NS, TORCH_INDEX,
    TORCH_SINGLE, USE_SAFETENSORS_ENV,
};
pub use error::{IoError, ReadFailed, ReadResult};
pub use file::{file_identity, try_lock, DioAlign, DirectSupport, OpenFile};
pub use mmap::{copy_by_kernel, DmaWindow, MapContract, MappedFile};
pub use open::{open_checkpoint, open_checkpoint_observed};
pub use probe::{
    can_allocate, has_cap_ipc_lock, host_memory_available, kernel_release, memlock, page_probe, uring_status, Memlock,
    PageChoice, UringStatus,
};
pub use process::{join_threads, MadeIn};
pub use reader::{
    block_on, direct_io_support, BackendKind, Faults, FixedBuffers, IoReport, ReadFuture, Reader, ReaderBuilder, IO_ENV,
};
pub use remote::{is_remote, read_object, redact_url, RemoteObject, RemoteOptions};
