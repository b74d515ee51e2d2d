use std::collections::BTreeMap;
use std::path::PathBuf;

use tensorlift::BackendKind;
use tensorlift::{DirectIo, Loader, LoaderBuilder, Model};

pub use tensorlift_testkit::{write_shard, write_sharded, Spec};

/// A scratch folder on the build's disk (where O_DIRECT works).
pub fn scratch() -> PathBuf {
    tensorlift_testkit::scratch_in(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")), "tl-engine-")
}

pub fn assert_identical(model: &Model, truth: &BTreeMap<String, Vec<u8>>, what: &str) {
    assert_eq!(model.len(), truth.len(), "{what}: tensor count");
    for (name, want) in truth {
        let t = model.get(name).unwrap_or_else(|| panic!("{what}: {name} missing"));
        assert!(
            t.bytes().unwrap() == want.as_slice(),
            "{what}: {name} differs ({} vs {} bytes)",
            t.bytes().unwrap().len(),
            want.len()
        );
    }
}

/// Every combination of backend and direct-I/O policy, with small chunks so that tensors
/// span chunks and chunks span tensors.
pub fn loaders(chunk: usize) -> Vec<(String, Loader)> {
    loaders_with(chunk, |b| b)
}

/// [`loaders`], each with `more` options.
pub fn loaders_with(chunk: usize, more: impl Fn(LoaderBuilder) -> LoaderBuilder) -> Vec<(String, Loader)> {
    let mut out = reading_loaders_with(chunk, &more);
    out.push((
        format!("mapped views/chunk {chunk}"),
        more(base().map_views(map_contract()).chunk_size(chunk)).build().unwrap(),
    ));
    out
}

/// [`loaders_with`] but the mapped views: the loaders that read, for options that mapped
/// views do not take (caller destinations).
pub fn reading_loaders_with(chunk: usize, more: impl Fn(LoaderBuilder) -> LoaderBuilder) -> Vec<(String, Loader)> {
    let mut out = Vec::new();
    for backend in [BackendKind::Uring, BackendKind::Pread] {
        for direct in [DirectIo::Always, DirectIo::Never, DirectIo::Auto] {
            let l = more(base().io_backend(backend).direct_io(direct).chunk_size(chunk)).build().unwrap();
            // (Where the test command knows the kernel has io_uring, a quiet fallback to pread
            // would make these pread's loads twice.)
            if backend == BackendKind::Uring && std::env::var_os("TENSORLIFT_REQUIRE_URING").is_some() {
                let io = l.io_report();
                assert_eq!(io.backend, BackendKind::Uring, "io_uring was asked for and refused: {}", io.reason);
            }
            out.push((format!("{backend}/{direct:?}/chunk {chunk}"), l));
        }
    }
    out
}

/// The opt-in to zero-copy mapped views, as a caller makes it.
pub fn map_contract() -> tensorlift::MapContract {
    // SAFETY: every file these tests map is private to the test, and no test truncates or
    // writes a file while tensors mapped from it are alive.
    unsafe { tensorlift::MapContract::new() }
}

pub fn base() -> LoaderBuilder {
    Loader::builder().device(tensorlift::Device::Cpu).queue_depth(8)
}

pub use tensorlift_testkit::quirky;
