//! Integration tests of tensorlift-io, one module per area.

mod backends;
mod faults;
mod lifecycle;
mod support;
