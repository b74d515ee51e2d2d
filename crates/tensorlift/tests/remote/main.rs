//! Remote checkpoints against real servers the tests start: `s3s-fs` (an S3 server over a
//! folder, from crates.io; `scripts/test` installs it), a plain HTTP server with `Range`
//! support, and a proxy that injects faults between the two ends.
//!
//! The stores read their configuration from the environment, as a user's would, so these
//! tests run one at a time in this process of their own ([`Remote`] holds the lock).

mod faults;
mod loads;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tensorlift::{Device, Dtype, Loader, LoaderBuilder, Model, RemoteOptions};
use tensorlift_testkit::net::{S3Server, S3_KEYS};

/// One test at a time: the environment is the process's.
#[derive(Debug)]
pub struct Remote {
    _one: MutexGuard<'static, ()>,
    /// The folder the S3 server serves (its subfolders are buckets).
    pub root: PathBuf,
}

impl Remote {
    /// Takes the lock and a fresh folder; no server yet.
    #[allow(clippy::new_without_default)] // Takes a lock: not a default value.
    pub fn new() -> Remote {
        static ONE: Mutex<()> = Mutex::new(());
        let one = ONE.lock().unwrap_or_else(|p| p.into_inner());
        let root = tensorlift_testkit::scratch_in(Path::new(env!("CARGO_TARGET_TMPDIR")), "tl-remote-");
        Remote { _one: one, root }
    }

    /// An S3 server over [`root`](Self::root), and the environment pointed at it; `None`
    /// (saying why) where `s3s-fs` is not installed and `TENSORLIFT_REQUIRE_S3` is unset (the
    /// test command sets it, so CI never skips).
    pub fn s3(&self) -> Option<S3Server> {
        let Some(bin) = tensorlift_testkit::net::s3s_fs() else {
            assert!(
                std::env::var_os("TENSORLIFT_REQUIRE_S3").is_none(),
                "s3s-fs is not installed: `cargo install s3s-fs@0.14.1 --features binary --locked --root \
                 ~/.cache/tensorlift/s3s-fs-0.14.1` (./scripts/test does)"
            );
            eprintln!("skipped: s3s-fs is not installed (./scripts/test installs it)");
            return None;
        };
        let server = S3Server::start(&bin, &self.root).expect("starting s3s-fs");
        point_at(server.port);
        Some(server)
    }
}

/// Points the S3 client's environment at a port on 127.0.0.1 (a server, or a proxy).
pub fn point_at(port: u16) {
    for (k, v) in S3Server::env(port) {
        std::env::set_var(k, v);
    }
    std::env::set_var("AWS_SECRET_ACCESS_KEY", S3_KEYS.1);
}

/// Options that give up fast, and parts small enough that a chunk takes several GETs.
pub fn quick() -> RemoteOptions {
    let mut o = RemoteOptions::default();
    // The smallest part a load asks for: a 256 KiB chunk takes four GETs.
    o.part_size = tensorlift::RemoteOptions::default().part_size.min(64 << 10);
    o.concurrency = 8;
    o.retries = 3;
    o.timeout = Duration::from_secs(2);
    o.retry_window = Duration::from_secs(30);
    o
}

/// Runs `script` (Python, with torch: the test command's environment) with `path` as its
/// argument: how the tests have torch itself write a PyTorch file.
pub fn torch_writes(script: &str, path: &Path) {
    let out = std::process::Command::new("python3").args(["-c", script]).arg(path).output().unwrap();
    assert!(out.status.success(), "torch writes the file: {}", String::from_utf8_lossy(&out.stderr));
}

pub fn base() -> LoaderBuilder {
    Loader::builder().device(Device::Cpu).queue_depth(8).chunk_size(256 << 10).remote(quick())
}

pub use tensorlift_testkit::quirky;

/// A sharded checkpoint in `bucket/model` under `root`; every tensor's bytes.
pub fn sharded(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let dir = root.join("bucket/model");
    std::fs::create_dir_all(&dir).unwrap();
    let specs = quirky();
    let (a, b) = specs.split_at(7);
    tensorlift_testkit::write_sharded(&dir, &[a, b, &[("third", Dtype::I64, &[70_000])]])
}

pub fn assert_identical(model: &Model, truth: &BTreeMap<String, Vec<u8>>, what: &str) {
    assert_eq!(model.len(), truth.len(), "{what}: tensor count");
    for (name, want) in truth {
        let t = model.get(name).unwrap_or_else(|| panic!("{what}: {name} missing"));
        let got = t.to_host().unwrap();
        assert!(got.as_ref() == want.as_slice(), "{what}: {name} differs ({} vs {} bytes)", got.len(), want.len());
    }
}
