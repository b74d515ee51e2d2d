use std::time::Duration;

use tensorlift_io::IoReport;

/// Bytes done out of the total, reported as chunks land.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes landed so far.
    pub done: u64,
    /// Bytes the load will move.
    pub total: u64,
}

/// What a load did and how long it took.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LoadStats {
    /// Bytes of tensor data loaded, as the files store them (a dtype conversion's output may
    /// be larger or smaller; slices count only their own bytes).
    pub bytes: u64,
    /// Bytes read from files (tensor data plus alignment padding and gaps read through).
    pub bytes_read: u64,
    /// Bytes of every tensor in the checkpoint, whole, whether this load selected it or
    /// not: with `bytes_read`, what filters and slices saved.
    pub checkpoint_bytes: u64,
    /// Tensors delivered.
    pub tensors: usize,
    /// Shards read.
    pub shards: usize,
    /// Wall time from the start of the load (planning included) to the last tensor.
    pub wall: Duration,
    /// Time from the start of the load (planning included) to its first read being issued:
    /// what planning, laying out and allocating cost before any byte moves. `None` when
    /// nothing was read (zero-copy views, an empty selection).
    pub first_read: Option<Duration>,
    /// Time from the start of the load to the moment its whole plan stood: every header
    /// parsed, and the checks across shards done. A host load of a whole checkpoint starts
    /// reading each shard once its own header is validated, so its `first_read` can come
    /// before this; other loads read after it. `None` for a plan made before the load.
    pub planned: Option<Duration>,
    /// Time the pipeline spent waiting for reads.
    pub read_wait: Duration,
    /// Time spent copying to the device (zero on the CPU path, which reads in place).
    pub copy: Duration,
    /// Where the tensors live ([`Device::Cpu`](crate::Device::Cpu) or
    /// [`Device::Cuda`](crate::Device::Cuda); `"cpu"`, `"cuda:N"` in JSON).
    pub device: crate::Device,
    /// Why that device (a request, or the fallback reason).
    pub device_reason: String,
    /// The I/O backend and why it was chosen.
    pub io: IoReport,
    /// Shards read with O_DIRECT.
    pub direct_shards: usize,
    /// Shards read through the page cache.
    pub buffered_shards: usize,
    /// Shards read from object storage or HTTP, by ranged GETs.
    pub remote_shards: usize,
    /// Most bytes ever in flight at once; never more than the staging budget.
    pub max_in_flight_bytes: u64,
    /// Whether new host memory used huge pages (`None` when the load allocated none: no
    /// host memory, or all of it reused).
    pub huge_pages: Option<bool>,
    /// Bytes of host memory a previous load left and this one reused (already faulted in).
    pub reused_host_bytes: u64,
    /// Bytes of shard files whose SHA-256 was checked against the expected digest (see
    /// [`LoaderBuilder::verify`](crate::LoaderBuilder::verify)).
    pub verified_bytes: u64,
    /// Bytes of shard files a verifying load handed out unchecked (no expected digest,
    /// under [`Verify::IfKnown`](crate::Verify::IfKnown)); 0 for a load that does not verify.
    pub unverified_bytes: u64,
    /// Bytes of new host memory the prefaulting threads faulted in (page-rounded), of
    /// chunks whose reads had not landed when they got to them; the rest, the reads (and
    /// conversions) faulted themselves.
    pub prefaulted_bytes: u64,
    /// Why prefaulting stopped early, if it did (a kernel before 5.14 has no
    /// `MADV_POPULATE_WRITE`).
    pub prefault_failure: Option<String>,
    /// Bytes copied to the device by DMA straight from the page cache (see
    /// [`LoaderBuilder::page_cache_dma`](crate::LoaderBuilder::page_cache_dma)); they are
    /// counted in `bytes_read` too.
    pub page_cache_dma_bytes: u64,
    /// Why a load that could have copied from the page cache by DMA read into staging
    /// instead: the error of the first range the driver would not register (or that no
    /// thread to register ranges could be started).
    pub page_cache_dma_refused: Option<String>,
    /// Staging chunks this load took beyond the loader's staging budget (see
    /// [`LoaderBuilder::staging_budget`](crate::LoaderBuilder::staging_budget)), one at a
    /// time: a load that held none while the loader's other loads held every one (a stream
    /// not being read holds its landed chunks) takes one of its own rather than wait on them.
    pub spare_staging_chunks: usize,
    /// Bytes that landed in new host memory by copying the shards' cached pages in (see
    /// [`LoaderBuilder::fill_by_copy`](crate::LoaderBuilder::fill_by_copy)); they are
    /// counted in `bytes_read` too.
    pub copied_bytes: u64,
    /// Why a host load that could have filled new memory by copying cached pages in did
    /// not, or stopped (userfaultfd refused: the process, its sandbox or its kernel; a shard
    /// read with O_DIRECT after all).
    pub fill_by_copy_refused: Option<String>,
    /// Of a group load ([`Loader::load_group_blocking`](crate::Loader::load_group_blocking)),
    /// the bytes this rank sent to each rank, by rank (empty for other loads).
    pub sent_to: Vec<u64>,
    /// Of a group load, the bytes this rank received from each rank, by rank (empty for
    /// other loads).
    pub received_from: Vec<u64>,
}

impl LoadStats {
    /// The statistics as a JSON object, durations in seconds (what `tensorlift load --json`
    /// prints, and the Python package's `stats=` dict holds).
    pub fn to_json(&self) -> serde_json::Value {
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
        serde_json::json!({
            "device": self.device.to_string(),
            "device_reason": self.device_reason,
            "io": self.io.backend.to_string(),
            "io_reason": self.io.reason,
            "tensors_loaded": self.tensors,
            "shards": self.shards,
            "direct_shards": self.direct_shards,
            "buffered_shards": self.buffered_shards,
            "remote_shards": self.remote_shards,
            "bytes": self.bytes,
            "bytes_read": self.bytes_read,
            "checkpoint_bytes": self.checkpoint_bytes,
            "max_in_flight_bytes": self.max_in_flight_bytes,
            "huge_pages": self.huge_pages,
            "reused_host_bytes": self.reused_host_bytes,
            "verified_bytes": self.verified_bytes,
            "unverified_bytes": self.unverified_bytes,
            "prefaulted_bytes": self.prefaulted_bytes,
            "prefault_failure": self.prefault_failure,
            "page_cache_dma_bytes": self.page_cache_dma_bytes,
            "page_cache_dma_refused": self.page_cache_dma_refused,
            "spare_staging_chunks": self.spare_staging_chunks,
            "copied_bytes": self.copied_bytes,
            "fill_by_copy_refused": self.fill_by_copy_refused,
            "sent_to": self.sent_to,
            "received_from": self.received_from,
            "first_read_seconds": secs(self.first_read),
            "planned_seconds": secs(self.planned),
            "read_wait_seconds": self.read_wait.as_secs_f64(),
            "copy_seconds": self.copy.as_secs_f64(),
            "seconds": self.wall.as_secs_f64(),
            "gbps": self.gbps(),
        })
    }

    /// Tensor bytes per second of wall time ([`bytes`](Self::bytes), as stored), in GB/s
    /// (10^9).
    pub fn gbps(&self) -> f64 {
        let s = self.wall.as_secs_f64();
        if s > 0.0 {
            self.bytes as f64 / s / 1e9
        } else {
            0.0
        }
    }
}
