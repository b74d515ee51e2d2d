use std::collections::BTreeMap;
use std::path::PathBuf;

use tensorlift::BackendKind;
use tensorlift::{DirectIo, Dtype, Loader, LoaderBuilder, Model};

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

/// Every dtype, scalars, zero-size tensors, odd sizes that misalign what follows.
pub fn quirky() -> Vec<Spec<'static>> {
    vec![
        ("bool", Dtype::BOOL, &[3]),
        ("f32_after_3_bytes", Dtype::F32, &[5, 7]),
        ("u8", Dtype::U8, &[4097]),
        ("i8", Dtype::I8, &[9]),
        ("f8_e5m2", Dtype::F8_E5M2, &[11]),
        ("f8_e4m3", Dtype::F8_E4M3, &[3, 3]),
        ("f8_e8m0", Dtype::F8_E8M0, &[2]),
        ("f8_e4m3fnuz", Dtype::F8_E4M3FNUZ, &[5]),
        ("f8_e5m2fnuz", Dtype::F8_E5M2FNUZ, &[5]),
        ("i16", Dtype::I16, &[33]),
        ("u16", Dtype::U16, &[2, 2]),
        ("f16", Dtype::F16, &[64, 65]),
        ("bf16", Dtype::BF16, &[3000]),
        ("scalar_f32", Dtype::F32, &[]),
        ("empty", Dtype::F32, &[0, 16]),
        ("i32", Dtype::I32, &[7]),
        ("u32", Dtype::U32, &[1]),
        ("f64", Dtype::F64, &[2, 3, 4]),
        ("c64", Dtype::C64, &[3]),
        ("i64", Dtype::I64, &[5]),
        ("u64", Dtype::U64, &[2]),
        ("f4", Dtype::F4, &[6]),
        ("f6_e2m3", Dtype::F6_E2M3, &[4]),
        ("f6_e3m2", Dtype::F6_E3M2, &[8]),
        ("big", Dtype::F32, &[300, 1000]),
        ("tail_u8", Dtype::U8, &[13]),
    ]
}
