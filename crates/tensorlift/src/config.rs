//! A loader's configuration: the policies and their parsers, the defaults, the settings as
//! the builder fixed them ([`Config`]) and as a loader reports them ([`Settings`]).

use std::sync::Arc;

use tensorlift_io::{BackendKind, Faults, MapContract, PlanLimits};

use crate::{Device, Progress};

pub(crate) type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// When to read with O_DIRECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DirectIo {
    /// For shards not already in the page cache (cached ones read faster buffered).
    #[default]
    Auto,
    /// Always, where the file system allows it.
    Always,
    /// Never: every read goes through the page cache.
    Never,
}

/// One of three policies from `auto`, `always` or `never` (any case); `what` names the
/// policy in the error.
fn parse_policy<T>(s: &str, what: &str, [auto, always, never]: [T; 3]) -> Result<T, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(auto),
        "always" => Ok(always),
        "never" => Ok(never),
        other => Err(format!("unknown {what} policy '{other}' (expected auto, always or never)")),
    }
}

impl std::str::FromStr for DirectIo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_policy(s, "direct-I/O", [DirectIo::Auto, DirectIo::Always, DirectIo::Never])
    }
}

/// Whether host arenas use transparent huge pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum HugePages {
    /// Base pages. Whether a load's fresh huge pages fill faster depends on how many whole
    /// huge pages the kernel has ready (and, with `defrag` at `madvise`, on the compaction
    /// it does to make more), which neither a sample of other memory nor the first chunks of
    /// the load's own can tell: on the dev VM a 32 MiB sample filled at 6-7 GB/s with huge
    /// pages, and 1 GB loads that took them ran 0.13 s in some fresh processes and 0.6-1.0 s
    /// in others, against 0.27-0.30 s, every time, with base pages; timing the load's
    /// first chunks was swamped by the reads faulting the same memory (docs/BENCHMARKS.md).
    /// Huge pages are used when asked for ([`Always`](Self::Always)); `doctor` shows the
    /// sample.
    #[default]
    Auto,
    /// Always ask for huge pages.
    Always,
    /// Never: base pages.
    Never,
}

impl std::str::FromStr for HugePages {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_policy(s, "huge-pages", [HugePages::Auto, HugePages::Always, HugePages::Never])
    }
}

/// Whether a host load of a whole checkpoint reads while planning goes on (see
/// [`LoaderBuilder::read_while_planning`](crate::LoaderBuilder::read_while_planning)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ReadWhilePlanning {
    /// Where it pays: on a machine of 4 CPUs or more (parsing and reads each have CPUs of
    /// their own; assumed, as only 2-CPU machines have been measured), or when the largest
    /// shard is mostly not in the page cache (the reads wait on the disk, and parsing hides
    /// behind them). On 2 CPUs with the checkpoint cached, parsing and reads share the CPUs,
    /// and planning first was as fast or faster (docs/BENCHMARKS.md).
    #[default]
    Auto,
    /// Always, where the load allows it.
    Always,
    /// Never: nothing is read before the plan stands.
    Never,
}

impl ReadWhilePlanning {
    /// With this many CPUs or more, [`Auto`](Self::Auto) reads while planning whatever the
    /// page cache holds.
    pub const AUTO_CPUS: usize = 4;
}

impl std::str::FromStr for ReadWhilePlanning {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let all = [ReadWhilePlanning::Auto, ReadWhilePlanning::Always, ReadWhilePlanning::Never];
        parse_policy(s, "read-while-planning", all)
    }
}

impl std::fmt::Display for ReadWhilePlanning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReadWhilePlanning::Auto => "auto",
            ReadWhilePlanning::Always => "always",
            ReadWhilePlanning::Never => "never",
        })
    }
}

#[derive(Clone)]
pub(crate) struct Config {
    pub device: Option<Device>,
    pub staging_budget: usize,
    pub chunk_size: usize,
    pub queue_depth: u32,
    pub io_backend: Option<BackendKind>,
    pub io_workers: usize,
    pub direct: DirectIo,
    pub filter: Vec<String>,
    pub progress: Option<ProgressFn>,
    pub faults: Faults,
    pub limits: PlanLimits,
    pub map_views: Option<MapContract>,
    pub streams: usize,
    pub huge_pages: HugePages,
    pub prefault: bool,
    pub fill_by_copy: bool,
    pub page_cache_dma: bool,
    pub read_while_planning: ReadWhilePlanning,
    pub verify: Verify,
    pub convert_to: Option<tensorlift_format::Dtype>,
    pub slices: crate::slicing::Slices,
    pub place: Option<Arc<dyn crate::place::PlaceRule>>,
    /// The devices of a load onto several, each with its part (`None`: one device).
    pub devices: Option<Vec<crate::devices::DevicePlan>>,
    pub host_pool: Arc<tensorlift_io::ArenaPool>,
}

impl Config {
    /// Threads that prefault host memory: one a CPU, four at most (faulting is bound by
    /// the memory system well before that).
    pub(crate) fn prefault_threads(&self) -> usize {
        if !self.prefault {
            return 0;
        }
        // One a CPU: a cold load's I/O workers mostly wait on the disk, and a warm load's
        // copies would fault the same pages themselves (on the development VM, two threads
        // on its 2 CPUs did as well warm as one, and better cold).
        cpus().unwrap_or(1).clamp(1, 4)
    }
}

/// CPUs this process may run on (affinity and cgroup quota counted), asked once: the
/// question reads several files each time (std's `available_parallelism`), and a load of
/// one small tensor asks it.
pub(crate) fn cpus() -> Option<usize> {
    static CPUS: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().ok().map(|n| n.get()))
}

/// Default staging budget: bytes in flight at once.
pub const DEFAULT_STAGING_BUDGET: usize = 256 << 20;
/// Default chunk size.
pub const DEFAULT_CHUNK_SIZE: usize = 8 << 20;
/// Default reads in flight at most.
pub const DEFAULT_QUEUE_DEPTH: u32 = 64;
/// Default CUDA streams that copies are spread over.
pub const DEFAULT_STREAMS: usize = 2;
/// The most io_uring worker threads a loader starts by default.
pub const MAX_DEFAULT_IO_WORKERS: usize = 16;

/// Default io_uring worker threads: one per CPU this process may run on (affinity and cgroup
/// quota counted), at least 2 and at most [`MAX_DEFAULT_IO_WORKERS`].
///
/// Reads of cached data are copies that the kernel makes on the thread that submitted them,
/// so a warm load runs at about one thread's copy rate per worker: on a 16-CPU H100 host,
/// 2 workers loaded 8.98 GB/s and 16 loaded 22.96-28.14 GB/s, against a host-to-device limit
/// of 28.9-34.5 GB/s measured in the same runs (docs/BENCHMARKS.md). Reads from the disk need few workers; more cost them nothing.
pub fn default_io_workers() -> usize {
    cpus().unwrap_or(2).clamp(2, MAX_DEFAULT_IO_WORKERS)
}

/// The settings a loader runs with, after defaults and clamping.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settings {
    /// Bytes per read.
    pub chunk_size: usize,
    /// Bytes in flight at most.
    pub staging_budget: usize,
    /// Reads in flight at most.
    pub queue_depth: u32,
    /// io_uring worker threads.
    pub io_workers: usize,
    /// O_DIRECT policy.
    pub direct_io: DirectIo,
    /// CUDA streams.
    pub streams: usize,
    /// Huge pages for host memory.
    pub huge_pages: HugePages,
    /// Threads that fault in new host memory ahead of the reads (0: none, see
    /// [`LoaderBuilder::prefault`](crate::LoaderBuilder::prefault)).
    pub prefault_threads: usize,
    /// Whether new host memory for cached shards is filled by copying their pages in (see
    /// [`LoaderBuilder::fill_by_copy`](crate::LoaderBuilder::fill_by_copy)).
    pub fill_by_copy: bool,
    /// Whether shards in the page cache are copied to the device by DMA straight from it
    /// (see [`LoaderBuilder::page_cache_dma`](crate::LoaderBuilder::page_cache_dma)).
    pub page_cache_dma: bool,
    /// Whether a host load of a whole checkpoint reads while planning goes on (see
    /// [`LoaderBuilder::read_while_planning`](crate::LoaderBuilder::read_while_planning)).
    pub read_while_planning: ReadWhilePlanning,
    /// Whether loads check each shard's SHA-256 (see [`LoaderBuilder::verify`](crate::LoaderBuilder::verify)).
    pub verify: Verify,
}

/// Whether a load checks each shard's SHA-256 against the digest expected of it (see
/// [`LoaderBuilder::verify`](crate::LoaderBuilder::verify)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Verify {
    /// No checks (the default).
    #[default]
    Off,
    /// Every shard the load reads is checked; one with no expected digest fails the load.
    Required,
    /// The shards with an expected digest are checked; the others load unverified, and
    /// [`LoadStats::unverified_bytes`](crate::LoadStats::unverified_bytes) counts them.
    IfKnown,
}

impl std::str::FromStr for Verify {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" | "no" | "never" => Ok(Verify::Off),
            "on" | "yes" | "required" => Ok(Verify::Required),
            "if-known" => Ok(Verify::IfKnown),
            _ => Err(format!("invalid verify policy '{s}' (expected required, if-known or off)")),
        }
    }
}
