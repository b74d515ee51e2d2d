//! The CUDA side of tensorlift. This crate is the only one that will name cudarc.
//!
//! It holds no code yet: the CUDA path (driver probe, pinned staging, device arenas,
//! overlapped copies) is tracked as its own piece of work, and until it lands the engine
//! reports CUDA as unavailable rather than pretending to load onto a GPU.
