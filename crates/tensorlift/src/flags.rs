//! The loader's tuning flags, as command lines take them (feature `clap`): one definition
//! for `tensorlift load` and `loader-bench`, flattened into each one's arguments.

use tensorlift_io::BackendKind;

use crate::config::{DirectIo, HugePages, ReadWhilePlanning};
use crate::loader::LoaderBuilder;

/// `--chunk-mib`, `--budget-mib`, `--queue-depth`, `--io`, `--io-workers`, `--direct`,
/// `--huge-pages`, `--no-prefault`, `--no-fill-by-copy`, `--no-page-cache-dma`,
/// `--read-while-planning`: each left out keeps the loader's default.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Tuning {
    /// Bytes per read, in MiB (default 8; at least 1).
    #[arg(long, value_name = "MIB", value_parser = mib)]
    pub chunk_mib: Option<usize>,
    /// Bytes in flight at most, in MiB (default 256; at least 1).
    #[arg(long, value_name = "MIB", value_parser = mib)]
    pub budget_mib: Option<usize>,
    /// Reads in flight at most (default 64).
    #[arg(long)]
    pub queue_depth: Option<u32>,
    /// I/O backend: uring or pread (default: io_uring when available, else pread).
    #[arg(long, value_parser = |s: &str| s.parse::<BackendKind>())]
    pub io: Option<BackendKind>,
    /// io_uring worker threads, one ring each (default: one per CPU, 2 to 16).
    #[arg(long)]
    pub io_workers: Option<usize>,
    /// O_DIRECT policy: auto (for shards not in the page cache), always, never.
    #[arg(long, value_parser = |s: &str| s.parse::<DirectIo>())]
    pub direct: Option<DirectIo>,
    /// Huge pages for host memory: auto, always, never.
    #[arg(long, value_parser = |s: &str| s.parse::<HugePages>())]
    pub huge_pages: Option<HugePages>,
    /// Do not fault in new host memory ahead of the reads (on by default; see
    /// `LoaderBuilder::prefault`).
    #[arg(long)]
    pub no_prefault: bool,
    /// Do not fill new host memory by copying cached pages in (on by default; see
    /// `LoaderBuilder::fill_by_copy`).
    #[arg(long)]
    pub no_fill_by_copy: bool,
    /// On a GPU, read shards that are in the page cache into staging, rather than copying
    /// them to the device by DMA straight from the page cache (see
    /// `LoaderBuilder::page_cache_dma`).
    #[arg(long)]
    pub no_page_cache_dma: bool,
    /// Whether a load to the CPU reads each shard once its own header is validated, while
    /// the rest is planned: auto (where it pays: 4+ CPUs, or a largest shard not in the page
    /// cache), always, never.
    #[arg(long, value_parser = |s: &str| s.parse::<ReadWhilePlanning>())]
    pub read_while_planning: Option<ReadWhilePlanning>,
}

/// A number of MiB whose bytes a `usize` holds (else a usage error, not a wrapped number).
fn mib(s: &str) -> Result<usize, String> {
    let m: usize = s.parse().map_err(|e| format!("{e}"))?;
    if m == 0 {
        // (The loader would round it up to a page: reads of 4 KiB, a read list too long
        // to hold for a large checkpoint.)
        return Err("at least 1 MiB".into());
    }
    m.checked_mul(1 << 20).map(|_| m).ok_or_else(|| format!("{m} MiB is more bytes than a usize holds"))
}

impl Tuning {
    /// `builder` with every flag that was given.
    pub fn apply(&self, mut builder: LoaderBuilder) -> LoaderBuilder {
        if let Some(m) = self.chunk_mib {
            builder = builder.chunk_size(m << 20);
        }
        if let Some(m) = self.budget_mib {
            builder = builder.staging_budget(m << 20);
        }
        if let Some(d) = self.queue_depth {
            builder = builder.queue_depth(d);
        }
        if let Some(io) = self.io {
            builder = builder.io_backend(io);
        }
        if let Some(w) = self.io_workers {
            builder = builder.io_workers(w);
        }
        if let Some(d) = self.direct {
            builder = builder.direct_io(d);
        }
        if let Some(p) = self.huge_pages {
            builder = builder.huge_pages(p);
        }
        if self.no_prefault {
            builder = builder.prefault(false);
        }
        if self.no_fill_by_copy {
            builder = builder.fill_by_copy(false);
        }
        if self.no_page_cache_dma {
            builder = builder.page_cache_dma(false);
        }
        if let Some(p) = self.read_while_planning {
            builder = builder.read_while_planning(p);
        }
        builder
    }
}
