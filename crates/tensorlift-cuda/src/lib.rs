//! The CUDA side of tensorlift, and the only crate that will name cudarc.
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
//! The copy engine (pinned staging, device arenas, overlapped copies) is not built yet.
#![deny(clippy::undocumented_unsafe_blocks)]

mod probe;

pub use probe::{cuda_status, probe_library, CudaStatus, DeviceInfo, DriverInfo, LIBCUDA_ENV, LIBCUDA_NAMES};
