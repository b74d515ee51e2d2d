//! The CUDA side of tensorlift, and the only crate that calls the CUDA driver.
//!
//! Everything here is decided at run time: [`cuda_status`] opens the driver library
//! itself and reports either the driver and its devices or the reason CUDA cannot be used.
//! No build needs the CUDA toolkit or a GPU. The driver's functions are called through a
//! table resolved from that library, with every result read as the integer the driver
//! returns ([`DriverCode`]); cudarc supplies the types, and the `CudaSlice`s a caller lends.
//!
//! ```
//! match tensorlift_cuda::cuda_status() {
//!     tensorlift_cuda::CudaStatus::Available(d) => println!("CUDA {} with {} devices", d.version_string(), d.devices.len()),
//!     tensorlift_cuda::CudaStatus::Unavailable(why) => println!("no CUDA: {why}"),
//! }
//! ```
//!
//! The copy layer: [`Gpu`] (a device's primary context), [`PinnedPool`] (registered staging
//! memory in chunks, io_uring fixed buffers), [`DeviceArena`] (one allocation, freed with
//! its last holder), [`CopyEngine`] (asynchronous copies on several streams, chunks back in
//! their pool only after their copies' events), [`PageCacheRange`] (a file's range in the
//! page cache, registered read-only, that copies read by DMA with no staging copy). The
//! engine's CUDA destination is built on it. CI runs it against the emulated driver ([`emulator`]); `scripts/gpu-host` against a
//! real one.
#![deny(clippy::undocumented_unsafe_blocks)]

mod arena;
mod copy;
mod device;
pub mod dlpack;
mod driver;
pub mod emulator;
mod error;
mod kernels;
pub mod nccl;
mod page_cache;
mod pinned;
mod probe;

pub use arena::{DeviceArena, LentMemory};
pub use copy::{CopyEngine, OnCopied, Piece};
pub use device::Gpu;
pub use error::{CudaError, DriverCode};
pub use kernels::{KernelType, Kernels};
pub use page_cache::{page_cache_dma_refused, PageCacheRange};
pub use pinned::{PinnedChunk, PinnedPool};
pub use probe::{
    cuda_status, probe_library, use_driver_library, CudaStatus, DeviceInfo, DriverInfo, LIBCUDA_ENV, LIBCUDA_NAMES,
};
