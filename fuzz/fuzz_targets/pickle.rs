//! The PyTorch reader on arbitrary bytes (zip or legacy): it may reject, never panic, and
//! every tensor it accepts lies inside its storage, which lies inside the file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tensorlift_pickle::{Limits, TorchCheckpoint};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default().max_pickle_bytes(1 << 20);
    if let Ok(ck) = TorchCheckpoint::read(data, Path::new("fuzz.bin"), &limits) {
        for (_, s) in &ck.storages {
            assert!(s.offset + s.len <= data.len() as u64);
        }
        for t in &ck.tensors {
            let bytes = ck.tensor_bytes(data, Path::new("fuzz.bin"), t).expect("an accepted tensor reads");
            assert_eq!(bytes.len(), t.nbytes());
        }
    }
});
