//! The header parser on arbitrary bytes: it may reject, never panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.safetensors");
    // As the real file length, and as a file that is longer than the bytes read.
    let _ = tensorlift_format::parse_header(path, data, data.len() as u64);
    let _ = tensorlift_format::parse_header(path, data, data.len() as u64 + 4096);
});
