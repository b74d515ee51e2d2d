//! Integration tests of tensorlift-format, one module per area.

mod assemble;
mod header_rules;
mod properties;
mod reference;
mod support;
