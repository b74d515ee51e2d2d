//! Integration tests of the engine, one module per area.

mod api;
mod correctness;
mod faults;
mod support;
mod views;
