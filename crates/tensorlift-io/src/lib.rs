//! Bytes from files into caller-owned buffers.
//!
//! This crate knows nothing of CUDA. It turns (file, byte range) requests into bytes in
//! buffers that the caller owns and lends by value for the duration of a read.
#![deny(clippy::undocumented_unsafe_blocks)]

mod source;

pub use source::FsSource;
