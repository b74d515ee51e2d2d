//! Load safetensors checkpoints into GPU or host memory at the speed of the hardware.
//!
//! The API is a builder, an immutable engine, and tensors delivered as they land:
//!
//! ```no_run
//! use tensorlift::{Device, Loader};
//!
//! # fn main() -> Result<(), tensorlift::LoadError> {
//! let loader = Loader::builder().device(Device::Cpu).filter(["model.layers.0.*"]).build()?;
//! let model = loader.load_blocking("models/llama")?;
//! let w = model.get("model.layers.0.mlp.up_proj.weight").unwrap();
//! let values: &[half::bf16] = w.as_slice().unwrap();
//! println!("{} {:?} {} values, {:.1} GB/s", w.name(), w.shape(), values.len(), model.stats().gbps());
//! # Ok(()) }
//! ```
//!
//! In async code, `loader.load(path).await`, or `loader.stream(path).await?` and
//! `stream.next().await` for each tensor as soon as its bytes are in memory.
//!
//! Checkpoints are untrusted input: a shard's header is validated (`tensorlift-format`)
//! before any of its data is read, and no tensor is handed out before every header is
//! validated and the shards are checked against each other; shards must stay inside the
//! model folder (see `docs/ENVIRONMENT.md` for the folder and link policy), each shard is
//! opened once and that descriptor is read, header memory is bounded ([`PlanLimits`]), and
//! host memory is the tensors' own size plus page padding (a verified load with a filter:
//! the whole files of the shards it reads; and, between loads, what a loader keeps for its
//! next one: at most its largest load's); reads in flight never exceed
//! the staging budget. No safe API can reach a SIGBUS: memory-mapped views are an opt-in
//! that takes an `unsafe`-made [`MapContract`].
#![forbid(unsafe_code)]

#[cfg(feature = "candle")]
pub mod candle;
pub mod checksums;
mod config;
pub mod convert;
mod dest_cuda;
mod dest_devices;
mod dest_host;
mod device;
pub mod devices;
mod digest;
mod error;
#[cfg(feature = "clap")]
pub mod flags;
pub mod group;
mod hashing;
mod layout;
mod loader;
mod open;
mod pipeline;
pub mod place;
mod sink;
pub mod slicing;
mod stats;
mod target;
mod tensor;
#[cfg(feature = "clap")]
pub mod terminal;

use std::path::Path;

pub use config::{
    default_io_workers, DirectIo, HugePages, ReadWhilePlanning, Settings, Verify, DEFAULT_CHUNK_SIZE,
    DEFAULT_QUEUE_DEPTH, DEFAULT_STAGING_BUDGET, DEFAULT_STREAMS, MAX_DEFAULT_IO_WORKERS,
};
pub use device::{Device, InvalidDevice, DEVICE_ENV};
pub use devices::DevicePlan;
pub use error::{ConversionFailure, LoadError};
pub use loader::{Loader, LoaderBuilder};
pub use pipeline::TensorStream;
pub use slicing::{Sharding, SliceRule, Split, TensorSlice};
pub use stats::{LoadStats, Progress};
pub use tensor::{Element, Model, Tensor, ViewError};
pub use tensorlift_cuda::{dlpack, CudaError};
/// Element types, by the names headers use (`BF16`, `F32`, ...).
#[doc(no_inline)]
pub use tensorlift_format::Dtype;
pub use tensorlift_format::{FormatError, LoadPlan, PlannedTensor, Shard};
pub use tensorlift_io::{
    block_on, is_remote, redact_url, BackendKind, Checkpoint, FixedBuffers, IoError, IoReport, MapContract, PlanLimits,
    RemoteOptions, UringStatus,
};
#[doc(hidden)]
pub use tensorlift_io::{ArenaPool, Faults};

/// Resolves `path` (a `.safetensors` file, an index JSON or a folder) and validates every
/// shard's header, reading headers only, with the default [`PlanLimits`]. The shards it
/// opened stay open for a load of the plan ([`Loader::load_plan`]).
pub fn plan(path: impl AsRef<Path>) -> Result<Checkpoint, FormatError> {
    tensorlift_io::open_checkpoint(path.as_ref(), &PlanLimits::default())
}

/// The README's examples, compiled as doctests so that they stay true to the API.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
