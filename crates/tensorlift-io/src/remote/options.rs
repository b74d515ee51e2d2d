//! How a remote checkpoint is read: [`RemoteOptions`].

use std::path::Path;
use std::time::Duration;

/// How a remote checkpoint is read: request sizes, concurrency, retries and timeouts.
///
/// The defaults and how they were measured are in docs/BENCHMARKS.md ("Remote checkpoints":
/// on one machine the settings could not be told apart; a host with a real network should
/// set them). Each can also be set from the environment for a whole process
/// (`TENSORLIFT_REMOTE_PART_SIZE`, `_CONCURRENCY`, `_RETRIES`, `_TIMEOUT_SECS`,
/// `_PLAN_TIMEOUT_SECS`, `_CACHE`).
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
    /// store says they are unchanged (length and strong ETag). A copy is kept only of shards
    /// a load read whole, of objects with a strong ETag.
    pub cache_dir: Option<std::sync::Arc<Path>>,
    /// Ranged reads the planning of one PyTorch file (`.bin`, `.pt`) may make (default
    /// 4,096): about one a record of its zip archive. A file that needs more is refused (say
    /// to convert it to safetensors), so that a hostile object stating a million records
    /// cannot take a million round trips.
    pub pytorch_reads: usize,
    /// Time the planning of one checkpoint may take, all its requests together (default 15
    /// minutes; `TENSORLIFT_REMOTE_PLAN_TIMEOUT_SECS`): each request is bounded on its own,
    /// but a server that answers every one of thousands slowly, within its timeout, would
    /// hold planning for hours. Each of a verified load's fetches of `SHA256SUMS` and the
    /// index, after planning, has this bound too.
    pub plan_timeout: Duration,
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
            pytorch_reads: 4096,
            plan_timeout: Duration::from_secs(15 * 60),
        }
    }
}

impl RemoteOptions {
    /// The defaults, with what the environment sets (`TENSORLIFT_REMOTE_PART_SIZE` in bytes,
    /// `TENSORLIFT_REMOTE_CONCURRENCY`, `TENSORLIFT_REMOTE_RETRIES`,
    /// `TENSORLIFT_REMOTE_TIMEOUT_SECS`, `TENSORLIFT_REMOTE_PLAN_TIMEOUT_SECS`,
    /// `TENSORLIFT_REMOTE_CACHE`); a value that does not
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
        for (name, slot) in [
            ("TENSORLIFT_REMOTE_TIMEOUT_SECS", &mut o.timeout),
            ("TENSORLIFT_REMOTE_PLAN_TIMEOUT_SECS", &mut o.plan_timeout),
        ] {
            if let Some(v) = var::<f64>(name) {
                match Duration::try_from_secs_f64(v) {
                    Ok(d) if !d.is_zero() => *slot = d,
                    _ => tracing::warn!("{name}={v} is not a usable time; ignored"),
                }
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
