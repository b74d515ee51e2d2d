//! Integration tests of the engine, one module per area.

mod api;
mod checksums;
mod convert;
mod correctness;
mod faults;
mod place;
mod planning;
mod slices;
mod support;
mod views;
