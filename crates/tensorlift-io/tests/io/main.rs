//! Integration tests of tensorlift-io, one module per area.

mod backends;
mod checkpoint;
mod faults;
mod fill;
mod hardening;
mod lifecycle;
mod prefault;
mod support;
