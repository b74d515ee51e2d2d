//! The CUDA side of tensorlift, and the only crate that names cudarc.
//!
//! Everything here is decided at run time: [`cuda_status`] opens the driver library
//! itself (cudarc panics when it is missing) and reports either the driver and its devices
//! or the reason CUDA cannot be used. No build needs the CUDA toolkit or a GPU.
//!
//! ```
//! match tensorlift_cuda::cuda_status() {
//!     tensorlift_cuda::CudaStatus::Available(d) => println!("CUDA {} with {} devices", d.version_string(), d.devices.len()),
//!     tensorlift_cuda::CudaStatus::Unavailable(why) => println!("no CUDA: {why}"),
//! }
//! ```
//!
//! The copy layer ([`Gpu`], [`PinnedPool`], [`DeviceArena`], [`CopyEngine`]) builds and is
//! type-checked everywhere but has not yet run on a GPU, and the engine does not use it
//! yet: loads go to the host.
#![deny(clippy::undocumented_unsafe_blocks)]

mod arena;
mod copy;
mod device;
mod error;
mod pinned;
mod probe;

pub use arena::DeviceArena;
pub use copy::{CopyEngine, Piece};
pub use device::Gpu;
pub use error::CudaError;
pub use pinned::{PinnedChunk, PinnedPool};
pub use probe::{cuda_status, probe_library, CudaStatus, DeviceInfo, DriverInfo, LIBCUDA_ENV, LIBCUDA_NAMES};
