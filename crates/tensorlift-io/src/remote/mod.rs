//! Checkpoints in object storage and behind HTTP: `s3://`, `gs://`, `az://` (and
//! `abfs://`), `http://` and `https://`.
//!
//! A remote checkpoint is planned like a local one ([`open_checkpoint`](crate::open_checkpoint)
//! sends such a path here): its index, or the `*.safetensors` objects under the prefix, then
//! each shard's header by ranged GETs (the first [`HEADER_GUESS`] bytes at once, then the
//! rest where the header is longer), validated by the same parser under the same
//! [`PlanLimits`](crate::PlanLimits). A load then reads each shard's byte ranges by
//! concurrent ranged GETs ([`read_object`]) whose bodies are written straight into the
//! buffers the load lends: its final host memory, or its pinned staging chunks.
//!
//! Every request goes through `object_store` (arrow-rs) and its stores, configured from the
//! environment as each provider's own tools are (`AWS_*`, `GOOGLE_*`, `AZURE_*`), with its
//! retries (backoff on 5xx, throttling, timeouts and dropped connections, a body that breaks
//! off resumed where it stopped); the options here ([`RemoteOptions`]) set how many and how
//! long. Each GET names the ETag the plan saw (`If-Match`) and checks the object's size, so
//! an object replaced during a load fails it ([`IoError::Changed`](crate::IoError::Changed)).
//! The requests run on one small runtime of this crate's own, so that callers need none.

mod cache;
mod plan;
mod read;
mod store;

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub(crate) use plan::open_remote;
pub use read::{fetch_discarding, read_object};
pub use store::RemoteObject;

/// Bytes of a shard read at once to find its header: most headers fit, and the rest of a
/// longer one is read by a second GET.
pub const HEADER_GUESS: u64 = 64 << 10;

/// Schemes read through object storage.
const SCHEMES: [&str; 8] = ["s3://", "s3a://", "gs://", "az://", "abfs://", "abfss://", "http://", "https://"];

/// Whether `path` is the URL of a remote checkpoint (by its scheme: `s3://`, `s3a://`,
/// `gs://`, `az://`, `abfs://`, `abfss://`, `http://`, `https://`) rather than a local path.
/// A local folder whose name begins so is reached as `./s3:/...`.
pub fn is_remote(path: &Path) -> bool {
    path.to_str().is_some_and(|p| {
        let lower = p.get(..8).unwrap_or(p).to_ascii_lowercase();
        SCHEMES.iter().any(|s| lower.starts_with(s))
    })
}

/// How a remote checkpoint is read: request sizes, concurrency, retries and timeouts.
///
/// The defaults and how they were measured are in docs/BENCHMARKS.md ("Remote checkpoints":
/// on one machine the settings could not be told apart; a host with a real network should
/// set them). Each can also be set from the environment for a whole process
/// (`TENSORLIFT_REMOTE_PART_SIZE`, `_CONCURRENCY`, `_RETRIES`, `_TIMEOUT_SECS`, `_CACHE`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RemoteOptions {
    /// Bytes asked for by one ranged GET, at most (default 8 MiB, never under
    /// [`MIN_PART_SIZE`]): a load's read of a chunk is cut into parts of this size, fetched at
    /// once.
    pub part_size: u64,
    /// Ranged GETs in flight at once for one checkpoint (default 32).
    pub concurrency: usize,
    /// Times a failed request is tried again, with exponential backoff (default 8): a 5xx,
    /// throttling (503 SlowDown, 429), a timeout, a dropped connection, or a body cut short.
    pub retries: usize,
    /// Time one request may take before it is abandoned and retried (default 60 s); the
    /// connection itself must open within a tenth of it.
    pub timeout: Duration,
    /// Time after the first try of a request past which it is no longer retried (default
    /// 3 minutes).
    pub retry_window: Duration,
    /// A folder where remote checkpoints are copied as they are read (default none;
    /// `TENSORLIFT_REMOTE_CACHE`): the next load of the same objects reads the copy, once the
    /// store says they are unchanged (length, and ETag or modification time). A copy is
    /// kept only of shards a load read whole.
    pub cache_dir: Option<std::sync::Arc<Path>>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            part_size: 8 << 20,
            concurrency: 32,
            retries: 8,
            timeout: Duration::from_secs(60),
            retry_window: Duration::from_secs(180),
            cache_dir: None,
        }
    }
}

impl RemoteOptions {
    /// The defaults, with what the environment sets (`TENSORLIFT_REMOTE_PART_SIZE` in bytes,
    /// `TENSORLIFT_REMOTE_CONCURRENCY`, `TENSORLIFT_REMOTE_RETRIES`,
    /// `TENSORLIFT_REMOTE_TIMEOUT_SECS`, `TENSORLIFT_REMOTE_CACHE`); a value that does not
    /// parse is ignored with a warning.
    pub fn from_env() -> Self {
        fn var<T: std::str::FromStr>(name: &str) -> Option<T> {
            let v = std::env::var(name).ok()?;
            let parsed = v.trim().parse().ok();
            if parsed.is_none() {
                tracing::warn!("{name}={v:?} is not a number; ignored");
            }
            parsed
        }
        let mut o = RemoteOptions::default();
        if let Some(v) = var::<u64>("TENSORLIFT_REMOTE_PART_SIZE") {
            o.part_size = v;
        }
        if let Some(v) = var::<usize>("TENSORLIFT_REMOTE_CONCURRENCY") {
            o.concurrency = v.max(1);
        }
        if let Some(v) = var("TENSORLIFT_REMOTE_RETRIES") {
            o.retries = v;
        }
        if let Some(dir) = std::env::var_os("TENSORLIFT_REMOTE_CACHE").filter(|d| !d.is_empty()) {
            o.cache_dir = Some(Path::new(&dir).into());
        }
        if let Some(v) = var::<f64>("TENSORLIFT_REMOTE_TIMEOUT_SECS") {
            match Duration::try_from_secs_f64(v) {
                Ok(d) if !d.is_zero() => o.timeout = d,
                _ => tracing::warn!("TENSORLIFT_REMOTE_TIMEOUT_SECS={v} is not a usable time; ignored"),
            }
        }
        o
    }

    /// [`part_size`](Self::part_size), at least [`MIN_PART_SIZE`].
    pub fn part_size(&self) -> u64 {
        self.part_size.max(MIN_PART_SIZE)
    }
}

/// The smallest ranged GET a load makes, whatever [`RemoteOptions::part_size`] says: smaller
/// ones cost a request each for little.
pub const MIN_PART_SIZE: u64 = 64 << 10;

/// Threads of the runtime that serves remote requests: they copy bodies into buffers, so a
/// few; idle ones cost nothing.
const NET_THREADS: usize = 4;

/// The runtime every remote request runs on, made on first use in each process: a child
/// made by `fork` (Python's multiprocessing, a data loader's workers) has none of its
/// parent's threads, so it makes its own (the parent's is left alone, never dropped there).
/// An error (with why) where the process cannot make its threads.
fn runtime() -> Result<&'static tokio::runtime::Runtime, std::io::Error> {
    static RT: Mutex<Option<(u32, &'static tokio::runtime::Runtime)>> = Mutex::new(None);
    let mut rt = RT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let pid = std::process::id();
    match *rt {
        Some((owner, runtime)) if owner == pid => Ok(runtime),
        _ => {
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, NET_THREADS);
            let built = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("tensorlift-net")
                .enable_all()
                .build()
                .map_err(|e| std::io::Error::other(format!("cannot start the network runtime: {e}")))?;
            // One per process, for the process's life.
            let runtime: &'static tokio::runtime::Runtime = Box::leak(Box::new(built));
            *rt = Some((pid, runtime));
            Ok(runtime)
        }
    }
}

/// Runs `fut` on the network runtime and blocks this thread until it is done: safe on any
/// thread, an async runtime's included (planning blocks as reading a local header does).
fn run<F>(fut: F) -> Result<F::Output, std::io::Error>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handle = runtime()?.spawn(fut);
    crate::block_on(handle).map_err(|e| std::io::Error::other(format!("a network task failed: {e}")))
}

/// A remote checkpoint's folder, for the files beside its shards (a `SHA256SUMS`).
#[derive(Debug)]
pub(crate) struct RemoteFolder {
    pub(crate) place: store::Place,
}

impl RemoteFolder {
    /// `name` under the folder, whole, if it is at most `max` bytes; `None` if absent.
    pub(crate) fn fetch(
        &self,
        name: &str,
        max: u64,
    ) -> std::io::Result<Option<(Vec<u8>, tensorlift_format::FileIdentity)>> {
        let place = self.place.clone();
        let name = name.to_owned();
        run(async move { plan::fetch_file(&place, &name, max).await })?
    }
}

/// What every object of one remote checkpoint shares: its store, its options, and the bound
/// on its requests in flight.
#[derive(Debug)]
pub(crate) struct Shared {
    store: Arc<dyn object_store::ObjectStore>,
    options: RemoteOptions,
    permits: Arc<tokio::sync::Semaphore>,
    /// The folder of this store's copies in a cache folder ([`cache::store_key`]).
    cache_key: String,
}
