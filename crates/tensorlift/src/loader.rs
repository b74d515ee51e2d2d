//! `LoaderBuilder` -> `Loader` -> tensors.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use globset::{Glob, GlobSet, GlobSetBuilder};
use tensorlift_io::{BackendKind, Checkpoint, Faults, MapContract, PlanLimits, PlanObserver, Reader};
use tracing::Instrument;

use crate::config::{
    default_io_workers, Config, DirectIo, HugePages, ReadWhilePlanning, Settings, Verify, DEFAULT_CHUNK_SIZE,
    DEFAULT_QUEUE_DEPTH, DEFAULT_STAGING_BUDGET, DEFAULT_STREAMS,
};
use crate::device::DEVICE_ENV;
use crate::pipeline::PlanEvent;
use crate::target::{open_devices, resolve_device, Target};
use crate::{
    Device, DevicePlan, LoadError, LoadStats, Model, Progress, Sharding, SliceRule, Tensor, TensorSlice, TensorStream,
};

/// Configures a [`Loader`]. Every option has a default that suits a large checkpoint.
#[derive(Clone)]
pub struct LoaderBuilder {
    cfg: Config,
}

impl std::fmt::Debug for LoaderBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoaderBuilder")
            .field("device", &self.cfg.device)
            .field("staging_budget", &self.cfg.staging_budget)
            .field("chunk_size", &self.cfg.chunk_size)
            .field("queue_depth", &self.cfg.queue_depth)
            .field("io_backend", &self.cfg.io_backend)
            .field("filter", &self.cfg.filter)
            .finish_non_exhaustive()
    }
}

impl Default for LoaderBuilder {
    fn default() -> Self {
        LoaderBuilder {
            cfg: Config {
                device: None,
                staging_budget: DEFAULT_STAGING_BUDGET,
                chunk_size: DEFAULT_CHUNK_SIZE,
                queue_depth: DEFAULT_QUEUE_DEPTH,
                io_backend: None,
                io_workers: default_io_workers(),
                direct: DirectIo::Auto,
                filter: Vec::new(),
                progress: None,
                faults: Faults::default(),
                limits: PlanLimits::default(),
                map_views: None,
                streams: DEFAULT_STREAMS,
                huge_pages: HugePages::Auto,
                prefault: true,
                fill_by_copy: true,
                page_cache_dma: true,
                read_while_planning: ReadWhilePlanning::Auto,
                verify: Verify::Off,
                convert_to: None,
                slices: Default::default(),
                place: None,
                devices: None,
                host_pool: tensorlift_io::ArenaPool::new(usize::MAX),
            },
        }
    }
}

impl LoaderBuilder {
    /// Where tensors go (default: `TENSORLIFT_DEVICE`, else `Auto`).
    pub fn device(mut self, device: Device) -> Self {
        self.cfg.device = Some(device);
        self
    }
    /// Bytes the pipeline may have in flight at once (default 256 MiB, at least a page).
    /// A load's staging never exceeds it, however large the checkpoint; a budget smaller
    /// than the chunk size makes chunks of half the budget. (On a GPU, page-cache DMA pins as much
    /// again of the page cache: [`LoaderBuilder::page_cache_dma`].) The loads of one loader
    /// onto a GPU share the budget; a load that holds none of it while the others hold it
    /// all (a stream not being read keeps what landed for it) takes a spare chunk beyond it,
    /// one at a time, rather than wait on them ([`LoadStats::spare_staging_chunks`]); the
    /// loader keeps spares for its later loads, so it pins at most the budget plus a chunk
    /// for each load running at once.
    pub fn staging_budget(mut self, bytes: usize) -> Self {
        self.cfg.staging_budget = bytes.max(tensorlift_io::PAGE);
        self
    }
    /// Bytes per read (default 8 MiB), rounded up to a whole page, at most 1 GiB and at most
    /// the staging budget.
    pub fn chunk_size(mut self, bytes: usize) -> Self {
        self.cfg.chunk_size = bytes.clamp(tensorlift_io::PAGE, 1 << 30).next_multiple_of(tensorlift_io::PAGE);
        self
    }
    /// Reads in flight at most (default 64), across all shards.
    pub fn queue_depth(mut self, depth: u32) -> Self {
        self.cfg.queue_depth = depth.clamp(1, 4096);
        self
    }
    /// Forces an I/O backend (default: `TENSORLIFT_IO`, else io_uring when available, else pread).
    pub fn io_backend(mut self, backend: BackendKind) -> Self {
        self.cfg.io_backend = Some(backend);
        self
    }
    /// io_uring worker threads, one ring each (default: one per CPU, 2 to 16; see
    /// [`default_io_workers`]).
    pub fn io_workers(mut self, workers: usize) -> Self {
        self.cfg.io_workers = workers.max(1);
        self
    }
    /// When to use O_DIRECT (default: for shards not in the page cache).
    pub fn direct_io(mut self, direct: DirectIo) -> Self {
        self.cfg.direct = direct;
        self
    }
    /// Loads only tensors whose name matches one of these names or globs (`*`, `?`, `[..]`,
    /// `{a,b}`). Applied to the plan, before any tensor data is read.
    pub fn filter<I, S>(mut self, patterns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cfg.filter.extend(patterns.into_iter().map(Into::into));
        self
    }
    /// Called as data lands, with bytes done and the total.
    pub fn progress(mut self, f: impl Fn(Progress) + Send + Sync + 'static) -> Self {
        self.cfg.progress = Some(Arc::new(f));
        self
    }
    /// Most header bytes one plan may hold, all shards together (default 256 MiB, far over
    /// any real checkpoint's; a PyTorch file's pickle counts by its length). A checkpoint over it fails to plan with
    /// [`FormatError::HeaderBudget`](crate::FormatError::HeaderBudget), before its memory is used.
    pub fn max_header_bytes(mut self, bytes: u64) -> Self {
        self.cfg.limits.max_header_bytes = bytes;
        self
    }
    /// Most shard file descriptors open at once, while planning and while loading (default
    /// 128, and never over a quarter of the process's `RLIMIT_NOFILE`; see
    /// [`PlanLimits::max_open_files`](crate::PlanLimits)).
    pub fn max_open_files(mut self, files: usize) -> Self {
        self.cfg.limits.max_open_files = files.max(1);
        self
    }
    /// Most distinct shard names an index may list (default 10,000).
    pub fn max_shards(mut self, shards: usize) -> Self {
        self.cfg.limits.max_shards = shards.max(1);
        self
    }
    /// How checkpoints in object storage or behind HTTP (`s3://`, `gs://`, `az://`,
    /// `https://`) are read: bytes per ranged GET, GETs in flight, retries and timeouts
    /// (default [`RemoteOptions::from_env`](crate::RemoteOptions::from_env)). Credentials and
    /// endpoints come from the environment, as the provider's own tools take them.
    pub fn remote(mut self, options: crate::RemoteOptions) -> Self {
        self.cfg.limits.remote = options;
        self
    }
    /// Copies remote checkpoints into `dir` as they are read, so that the next load of the
    /// same objects is local, once the store says they are unchanged (their length, and
    /// ETag or modification time; one HEAD each). Only shards a load reads whole are kept.
    /// Sets [`RemoteOptions::cache_dir`](crate::RemoteOptions::cache_dir).
    pub fn remote_cache(mut self, dir: impl AsRef<Path>) -> Self {
        self.cfg.limits.remote.cache_dir = Some(dir.as_ref().into());
        self
    }
    /// Loads tensors as zero-copy views of memory-mapped shards instead of reading them
    /// into memory of their own. The [`MapContract`] is the caller's promise that the files
    /// stay as they are while tensors are alive; only `unsafe` code can make one (see
    /// [`MapContract::new`]), because a file truncated under a map kills the process.
    /// Mapped views are host memory: [`build`](Self::build) refuses them with a CUDA device
    /// or with [`place_with`](Self::place_with), and [`Device::Auto`] then means the host.
    pub fn map_views(mut self, contract: MapContract) -> Self {
        self.cfg.map_views = Some(contract);
        self
    }
    /// Loads only `slice` of tensor `name` (its exact name): for a slice of the first
    /// dimension only those rows are read; see [`crate::slicing`]. A name the load does not
    /// have is an error. Takes precedence over [`slice_with`](Self::slice_with) and
    /// [`shard`](Self::shard) for that tensor.
    pub fn slice(mut self, name: impl Into<String>, slice: TensorSlice) -> Self {
        self.cfg.slices.named.insert(name.into(), slice);
        self
    }
    /// Loads, of each tensor, the part `rule` chooses (a closure
    /// `Fn(&str, &[usize]) -> Result<Option<TensorSlice>, String>`, or any [`SliceRule`]).
    /// One rule per loader: this replaces an earlier `slice_with` or [`shard`](Self::shard).
    /// Slices apply to the plans this loader makes ([`Loader::plan`], [`Loader::load`]); a
    /// plan made elsewhere is loaded as it is.
    pub fn slice_with(mut self, rule: impl SliceRule + 'static) -> Self {
        self.cfg.slices.rule = Some(Arc::new(rule));
        self
    }
    /// Loads one tensor-parallel rank's part of each tensor (see [`Sharding`]); replaces an
    /// earlier [`slice_with`](Self::slice_with).
    pub fn shard(self, sharding: Sharding) -> Self {
        self.slice_with(sharding)
    }
    /// Loads onto several CUDA devices at once, each getting the part of the checkpoint its
    /// [`DevicePlan`] chooses (whole tensors, or its tensor-parallel slices), reading each
    /// byte of the checkpoint once (see [`crate::devices`]). The devices share the staging
    /// budget; each has [`streams`](Self::streams) streams. Get a model per device with
    /// [`Loader::load_devices`], or every device's tensors from [`Loader::stream`] (a
    /// tensor's [`location`](crate::Tensor::location) says which).
    ///
    /// [`build`](Self::build) refuses a device twice, a device that is not `cuda:N`, and
    /// this with [`device`](Self::device), loader-wide slices ([`slice`](Self::slice),
    /// [`slice_with`](Self::slice_with), [`shard`](Self::shard): give each device its own),
    /// caller memory, mapped views or verification.
    pub fn devices(mut self, plans: impl IntoIterator<Item = DevicePlan>) -> Self {
        self.cfg.devices = Some(plans.into_iter().collect());
        self
    }
    /// Places tensors in memory the caller owns: `rule` (a closure
    /// `Fn(&TensorRequest) -> Result<Option<Destination>, String>`, or any
    /// [`PlaceRule`](crate::place::PlaceRule)) says where each goes, or `None` for
    /// tensorlift's own memory. See [`crate::place`].
    pub fn place_with(mut self, rule: impl crate::place::PlaceRule + 'static) -> Self {
        self.cfg.place = Some(Arc::new(rule));
        self
    }
    /// Converts floating-point tensors (BF16, F16, F32, F8_E4M3, F8_E5M2) to `dtype` (BF16,
    /// F16 or F32) as they land, rounding to nearest even (see [`crate::convert`]); other
    /// tensors are loaded as stored. On a CUDA device a kernel converts each tensor once its
    /// stored bytes are on the device (in a scratch allocation the size of the converted
    /// tensors as stored, which lives until the load ends), the same values as the host (bit for bit, NaN payloads aside).
    pub fn convert_to(mut self, dtype: tensorlift_format::Dtype) -> Self {
        self.cfg.convert_to = Some(dtype);
        self
    }
    /// Whether host memory for tensors uses transparent huge pages (default: base pages,
    /// [`HugePages::Auto`]).
    pub fn huge_pages(mut self, pages: HugePages) -> Self {
        self.cfg.huge_pages = pages;
        self
    }
    /// Whether new host memory is faulted in ahead of the reads, on threads of its own
    /// (default true; `MADV_POPULATE_WRITE`, Linux 5.14). Reads into memory never touched
    /// pay the kernel's page faults and zeroing themselves, and with O_DIRECT they wait for
    /// them; prefaulting moves that work off the reads' path, onto threads of its own (one a
    /// CPU, four at most). [`LoadStats::prefaulted_bytes`] says how much it did.
    pub fn prefault(mut self, on: bool) -> Self {
        self.cfg.prefault = on;
        self
    }
    /// Whether new host memory for shards in the page cache is filled by copying their
    /// cached pages in (default true; userfaultfd's `UFFDIO_COPY`, Linux 5.11, no privilege
    /// needed). A read into fresh memory costs the kernel a zeroed page before the copy;
    /// a copy into a missing page allocates it and fills it, never zeroing it (a warm 0.98 GB
    /// host load on a 2-vCPU VM: 0.13-0.14 s in process against 0.21-0.22 s without;
    /// docs/BENCHMARKS.md, "Host pages, fifth pass"). Applies to the loader's own
    /// memory (not reused, not huge pages) for shards all but wholly cached (99%); the
    /// pages filled are the process's own, so a tensor never depends on the file
    /// afterwards. Where userfaultfd is refused, loads read as before and
    /// [`LoadStats::fill_by_copy_refused`] says why; [`LoadStats::copied_bytes`] counts
    /// what was copied. Such memory is not prefaulted ([`prefault`](Self::prefault)).
    pub fn fill_by_copy(mut self, on: bool) -> Self {
        self.cfg.fill_by_copy = on;
        self
    }
    /// Whether a load onto a GPU copies the shards that are in the page cache to the device
    /// by DMA straight from it (default on). Each chunk's range of the file is mapped
    /// read-only and registered with CUDA read-only (pinning its pages, on threads of their
    /// own, while earlier chunks copy), and copied from there: no CPU copy into staging, which
    /// is what bounds a warm load otherwise. A pinned range holds a chunk of the staging pool
    /// until its copies complete. Where the device or the driver refuses the registration,
    /// the load reads into staging instead, and [`LoadStats::page_cache_dma_refused`] says
    /// why. Loads that verify checksums (which read every byte on the CPU anyway), loads
    /// onto several devices, shards read with O_DIRECT, ranges not wholly in the page cache,
    /// and files this process neither owns nor may write (whose cached pages the kernel
    /// does not show) use staging. [`LoadStats::page_cache_dma_bytes`] counts what went by DMA.
    pub fn page_cache_dma(mut self, on: bool) -> Self {
        self.cfg.page_cache_dma = on;
        self
    }
    /// Whether a host load of a whole checkpoint starts reading before planning ends
    /// (default [`ReadWhilePlanning::Auto`]): once every header is read, each shard's reads
    /// start as soon as its own header is validated, while the other headers are parsed and
    /// the plan is checked across shards. Tensors are handed out only once the plan stands
    /// either way, and a checkpoint that fails its checks fails the load with the same
    /// error. Loads with a filter, slices, a conversion, caller memory or mapped views, and
    /// loads to a GPU, always plan first. [`LoadStats::planned`] and
    /// [`LoadStats::first_read`] show what a load did.
    pub fn read_while_planning(mut self, policy: ReadWhilePlanning) -> Self {
        self.cfg.read_while_planning = policy;
        self
    }
    /// Checks each shard's SHA-256 as a load reads it (default [`Verify::Off`]). The
    /// expected digest is the name of the Hugging Face hub cache blob the shard's file is,
    /// else its line in `SHA256SUMS` beside the checkpoint (coreutils' format; `tensorlift
    /// manifest` writes one); the index is checked too where `SHA256SUMS` lists it, or, in a hub
    /// cache, against its blob's name, git's SHA-1 of it ([`LoadError::IndexBlob`]). A shard's
    /// tensors are handed out only once its whole file checked out (whole-shard
    /// verification, see docs/ARCHITECTURE.md); a mismatch fails the load with
    /// [`LoadError::Checksum`], naming the file and both digests. A verified load reads
    /// whole every shard it takes a tensor from (with a filter, or
    /// [`load_named`](Loader::load_named_blocking), only the shards that hold the tensors
    /// asked for, and any shard that holds no tensor at all, are read, and only they need a
    /// digest; on the host, the tensors of a shard
    /// keep its whole file in memory while any of them lives); each is hashed while it is read (in
    /// file order, on a thread of its own: on its final host memory, or, for a CUDA device,
    /// on each pinned chunk before the chunk is copied); with [mapped views](Self::map_views),
    /// each mapped file is hashed whole before any view is handed out.
    /// [`build`](Self::build) refuses it with caller memory or slices.
    pub fn verify(mut self, policy: Verify) -> Self {
        self.cfg.verify = policy;
        self
    }
    /// Whether host memory of dropped tensors is kept for this loader's next load (default
    /// true). A load takes kept memory of the right size, already faulted in, instead of
    /// paying the kernel's page faults and zeroing again. The loader keeps at most as much
    /// as its largest single load used, and memory kept for another shape is given back
    /// before a load allocates. [`Loader::release_host_memory`] and dropping the loader
    /// give it all back.
    pub fn reuse_host_memory(mut self, reuse: bool) -> Self {
        self.cfg.host_pool = tensorlift_io::ArenaPool::new(if reuse { usize::MAX } else { 0 });
        self
    }
    /// Shares kept host memory with other loaders (see
    /// [`reuse_host_memory`](Self::reuse_host_memory)).
    pub fn host_memory_pool(mut self, pool: Arc<tensorlift_io::ArenaPool>) -> Self {
        self.cfg.host_pool = pool;
        self
    }
    /// CUDA streams that copies to the device are spread over (default 2, at least 1, at
    /// most 64).
    pub fn streams(mut self, streams: usize) -> Self {
        self.cfg.streams = streams.clamp(1, 64);
        self
    }
    /// Injects I/O faults, to test the fallbacks and error paths.
    #[doc(hidden)]
    pub fn io_faults(mut self, faults: Faults) -> Self {
        self.cfg.faults = faults;
        self
    }

    /// This builder, loading into host memory unless it or `TENSORLIFT_DEVICE` names a
    /// device (`auto` names none): for callers whose tensors end up on the host anyway,
    /// which a GPU on the way would only cost a copy back (and its memory).
    #[cfg(feature = "candle")]
    pub(crate) fn host_unless_named(self) -> Self {
        let named = match self.cfg.device {
            Some(d) => d != Device::Auto,
            // (A value that is no device, or not text, is named: the build says so.)
            None => std::env::var_os(DEVICE_ENV)
                .is_some_and(|v| !matches!(v.to_str().map(str::parse::<Device>), Some(Ok(Device::Auto)))),
        };
        if named || self.cfg.devices.is_some() {
            self
        } else {
            self.device(Device::Cpu)
        }
    }

    /// Builds the loader: probes the environment once and starts the I/O workers.
    pub fn build(mut self) -> Result<Loader, LoadError> {
        // A budget smaller than a chunk makes chunks of half the budget (a page at least),
        // so that it still holds and two reads (or a read and a copy) can overlap.
        let page = tensorlift_io::PAGE;
        if self.cfg.chunk_size > self.cfg.staging_budget {
            self.cfg.chunk_size = (self.cfg.staging_budget / 2 / page * page).max(page);
        }
        let filter = compile_filter(&self.cfg.filter)?;
        if let Some(plans) = &self.cfg.devices {
            let devices: Vec<Device> = plans.iter().map(|p| p.device).collect();
            return self.build_devices(devices, filter);
        }
        let mut requested = match self.cfg.device {
            Some(d) => (d, "requested".to_owned()),
            None => match std::env::var(DEVICE_ENV) {
                Ok(v) => (
                    v.parse().map_err(|_| LoadError::InvalidDevice(format!("{DEVICE_ENV}={v}")))?,
                    format!("{DEVICE_ENV}={v}"),
                ),
                Err(std::env::VarError::NotUnicode(v)) => {
                    return Err(LoadError::InvalidDevice(format!("{DEVICE_ENV}={}", v.to_string_lossy())));
                }
                Err(std::env::VarError::NotPresent) => (Device::Auto, "default".to_owned()),
            },
        };
        if let Some(to) = self.cfg.convert_to {
            use tensorlift_format::Dtype;
            if !matches!(to, Dtype::BF16 | Dtype::F16 | Dtype::F32) {
                return Err(LoadError::Unsupported(format!("conversion to {to} (targets are BF16, F16 and F32)")));
            }
        }
        // Mapped views are the files' pages in host memory: they go nowhere else.
        if self.cfg.map_views.is_some() {
            if self.cfg.place.is_some() {
                return Err(LoadError::Unsupported(
                    "caller destinations with mapped views (mapped tensors are views of the files, not copies into \
                     the caller's memory)"
                        .into(),
                ));
            }
            match requested.0 {
                // The environment's choice, not this loader's: the host, saying why.
                Device::Cuda(_) if self.cfg.device.is_none() => {
                    requested = (Device::Cpu, format!("{}, but mapped views are host memory", requested.1))
                }
                Device::Cuda(n) => {
                    return Err(LoadError::Unsupported(format!(
                        "mapped views on cuda:{n} (they are views of the files in host memory; load to the host, or \
                         read onto the device without them)"
                    )))
                }
                Device::Auto => requested = (Device::Cpu, "auto: mapped views are host memory".to_owned()),
                Device::Cpu => {}
            }
        }
        let reader = Arc::new(self.reader_builder().build());
        let (target, device_reason) = resolve_device(requested.0, requested.1, &self.cfg, &reader)?;
        let device = match &target {
            Target::Host => Device::Cpu,
            Target::Cuda(c) => Device::Cuda(c.gpu.ordinal()),
            // (resolve_device opens one device.)
            Target::Devices(d) => d.first().map_or(Device::Cpu, |c| Device::Cuda(c.gpu.ordinal())),
        };
        if self.cfg.verify != Verify::Off {
            let refused = if self.cfg.place.is_some() {
                Some("verified loads into caller memory".to_owned())
            } else if !self.cfg.slices.is_empty() {
                Some("verified loads with slices (a verified load reads whole shards)".to_owned())
            } else {
                None
            };
            if let Some(what) = refused {
                return Err(LoadError::Unsupported(what));
            }
        }
        Ok(Loader { reader, cfg: self.cfg, filter, device, device_reason, target })
    }
}

impl LoaderBuilder {
    /// [`build`](Self::build) for a loader onto several devices.
    fn build_devices(self, devices: Vec<Device>, filter: Option<GlobSet>) -> Result<Loader, LoadError> {
        let refused = if devices.is_empty() {
            Some("devices() with no device".to_owned())
        } else if self.cfg.device.is_some() {
            Some("device() with devices() (each device plan names its device)".to_owned())
        } else if !self.cfg.slices.is_empty() {
            Some("loader-wide slices with devices() (give each device plan its slices)".to_owned())
        } else if self.cfg.place.is_some() {
            Some("caller memory with devices()".to_owned())
        } else if self.cfg.map_views.is_some() {
            Some("mapped views with devices() (they are host memory)".to_owned())
        } else if self.cfg.verify != Verify::Off {
            Some("verified loads with devices()".to_owned())
        } else if let Some(d) = devices.iter().find(|d| !matches!(d, Device::Cuda(_))) {
            Some(format!("{d} in devices() (a load onto several devices is onto CUDA devices)"))
        } else {
            devices
                .iter()
                .enumerate()
                .find(|(i, d)| devices[..*i].contains(d))
                .map(|(_, d)| format!("{d} twice in devices()"))
        };
        if let Some(what) = refused {
            return Err(LoadError::Unsupported(what));
        }
        let ordinals: Vec<usize> =
            devices.iter().filter_map(|d| if let Device::Cuda(n) = d { Some(*n) } else { None }).collect();
        let reader = Arc::new(self.reader_builder().build());
        let target = open_devices(&ordinals, &self.cfg, &reader)?;
        let device = devices[0];
        let device_reason = "requested".to_owned();
        Ok(Loader { reader, cfg: self.cfg, filter, device, device_reason, target })
    }

    /// The I/O layer this builder's settings ask for.
    fn reader_builder(&self) -> tensorlift_io::ReaderBuilder {
        let mut io = Reader::builder()
            .queue_depth(self.cfg.queue_depth)
            .workers(self.cfg.io_workers)
            .direct(self.cfg.direct != DirectIo::Never)
            .faults(self.cfg.faults.clone());
        if let Some(b) = self.cfg.io_backend {
            io = io.backend(b);
        }
        io
    }
}

fn compile_filter(patterns: &[String]) -> Result<Option<GlobSet>, LoadError> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut set = GlobSetBuilder::new();
    for p in patterns {
        let glob =
            Glob::new(p).map_err(|e| LoadError::InvalidFilter { pattern: p.clone(), message: e.kind().to_string() })?;
        set.add(glob);
    }
    set.build().map(Some).map_err(|e| LoadError::InvalidFilter { pattern: patterns.join(","), message: e.to_string() })
}

/// Loads checkpoints. Immutable and cheap to share: one loader serves many loads, on any
/// thread, and owns the I/O workers.
pub struct Loader {
    reader: Arc<Reader>,
    pub(crate) cfg: Config,
    filter: Option<GlobSet>,
    pub(crate) device: Device,
    device_reason: String,
    target: Target,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("device", &self.device)
            .field("io", &self.reader.report())
            .finish_non_exhaustive()
    }
}

impl Loader {
    /// A builder with the defaults.
    pub fn builder() -> LoaderBuilder {
        LoaderBuilder::default()
    }

    /// The device tensors go to (`Auto` resolved: `Cpu` or `Cuda(n)`); for a loader onto
    /// several devices ([`LoaderBuilder::devices`]), the first.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The devices tensors go to: the one of [`device`](Self::device), or those of
    /// [`LoaderBuilder::devices`], in order.
    pub fn devices(&self) -> Vec<Device> {
        match &self.cfg.devices {
            None => vec![self.device],
            Some(plans) => plans.iter().map(|p| p.device).collect(),
        }
    }

    /// Host memory of dropped tensors kept for the next load, in bytes.
    pub fn retained_host_memory(&self) -> usize {
        self.cfg.host_pool.retained_bytes()
    }

    /// Gives kept host memory back to the system now; memory of tensors dropped after this
    /// is not kept until the next load.
    pub fn release_host_memory(&self) {
        self.cfg.host_pool.release();
    }

    /// The settings this loader runs with.
    pub fn settings(&self) -> Settings {
        Settings {
            chunk_size: self.cfg.chunk_size,
            staging_budget: self.cfg.staging_budget,
            queue_depth: self.cfg.queue_depth,
            io_workers: self.cfg.io_workers,
            direct_io: self.cfg.direct,
            streams: self.cfg.streams,
            huge_pages: self.cfg.huge_pages,
            prefault_threads: self.cfg.prefault_threads(),
            fill_by_copy: self.cfg.fill_by_copy,
            page_cache_dma: self.cfg.page_cache_dma,
            read_while_planning: self.cfg.read_while_planning,
            verify: self.cfg.verify,
        }
    }

    /// Why that device: a request, a variable, or `auto`'s probe result.
    pub fn device_reason(&self) -> &str {
        &self.device_reason
    }

    /// Free and total memory of the loader's CUDA device (the first, for a loader onto
    /// several), in bytes; `None` on the host.
    pub fn device_memory(&self) -> Option<(u64, u64)> {
        match &self.target {
            Target::Cuda(c) => c.gpu.memory_info().ok(),
            Target::Devices(d) => d.first()?.gpu.memory_info().ok(),
            Target::Host => None,
        }
    }

    /// Bytes of pinned staging memory the loader holds (registered with CUDA): its pool (the
    /// staging budget) and the spare chunks its loads took beyond it
    /// ([`LoadStats::spare_staging_chunks`]), which it keeps; `None` on the host. Whether
    /// its chunks are also io_uring fixed buffers is in [`io_report`](Self::io_report)'s
    /// `fixed_buffers`.
    pub fn pinned_staging(&self) -> Option<u64> {
        let held = |p: &tensorlift_cuda::PinnedPool| ((p.chunks() + p.spare_chunks()) * p.chunk_size()) as u64;
        match &self.target {
            Target::Cuda(c) => Some(held(&c.pool)),
            // One pool serves every device.
            Target::Devices(d) => d.first().map(|c| held(&c.pool)),
            Target::Host => None,
        }
    }

    /// What the I/O layer chose and why.
    pub fn io_report(&self) -> tensorlift_io::IoReport {
        self.reader.report()
    }

    /// The validated plan for `path`, with the filter applied. Reads headers only; the
    /// shards it opened stay open (up to half of [`LoaderBuilder::max_open_files`]) for the
    /// load.
    ///
    /// This reads and parses every header on the calling thread (milliseconds for most
    /// checkpoints, more for 100,000s of tensors); [`load`](Self::load) does it on a
    /// thread of its own instead.
    pub fn plan(&self, path: impl AsRef<Path>) -> Result<Checkpoint, LoadError> {
        self.planner().plan(path.as_ref())
    }

    /// [`plan`](Self::plan) on a planning thread of its own, which the returned future
    /// waits for without blocking its executor's thread. Dropping the future stops the
    /// planning at its next header, or at once for a remote checkpoint, whose requests in
    /// flight are dropped (a caller's timeout, or Ctrl-C in Python, ends it).
    pub async fn plan_async(&self, path: impl AsRef<Path>) -> Result<Checkpoint, LoadError> {
        let Some(mut events) = self.spawn_planner(path.as_ref(), false) else {
            // No thread to be had: plan on this one.
            return self.plan(path);
        };
        loop {
            match events.recv().await {
                Some(PlanEvent::Done(plan, _)) => return plan,
                Some(_) => {}
                // No answer means the thread panicked: a bug, reported as such.
                None => return Err(LoadError::PlanningFailed),
            }
        }
    }

    /// Plans `path` on a thread of its own, which reports to the receiver returned (`None`
    /// where no thread could be had) and stops once the receiver is dropped; `early` when
    /// the load may start before planning ends.
    fn spawn_planner(&self, path: &Path, early: bool) -> Option<tokio::sync::mpsc::UnboundedReceiver<PlanEvent>> {
        let planner = self.planner();
        let owned = path.to_path_buf();
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let spawned = std::thread::Builder::new().name("tensorlift-plan".into()).spawn(move || {
            let plan = planner.plan_observed(&owned, Some(&Forward { events: tx.clone(), early }));
            let _ = tx.send(PlanEvent::Done(plan, Instant::now()));
        });
        spawned.ok().map(|_| events)
    }

    fn planner(&self) -> Planner {
        Planner {
            limits: self.cfg.limits.clone(),
            verify: self.cfg.verify != Verify::Off,
            filter: self.filter.clone(),
            patterns: self.cfg.filter.clone(),
            slices: self.cfg.slices.clone(),
        }
    }

    /// Starts loading `path` and yields tensors as their bytes land. Headers are read on a
    /// planning thread of the load's own, which the returned future waits for without
    /// blocking its executor's thread; where [`LoaderBuilder::read_while_planning`] has it,
    /// a host load of a whole checkpoint then reads each shard once its own header is
    /// validated, while the other headers are parsed on a planning thread of the load's own
    /// (other loads wait for the whole plan, made on that thread too). Tensors come only
    /// once the whole plan stands: a checkpoint that fails its checks yields none, only the
    /// error, which such a load returns from [`TensorStream::next`] rather than from here.
    /// Dropping the stream also stops the planning.
    pub async fn stream(&self, path: impl AsRef<Path>) -> Result<TensorStream, LoadError> {
        self.start_planning(path.as_ref(), Instant::now()).await
    }

    /// [`stream`](Self::stream) for callers without an async runtime: blocks this thread
    /// while headers are read.
    pub fn stream_blocking(&self, path: impl AsRef<Path>) -> Result<TensorStream, LoadError> {
        tensorlift_io::block_on(self.stream(path))
    }

    /// Starts loading a plan made earlier (by [`plan`](Self::plan) or [`crate::plan`]), as it
    /// is: this loader's [filter](LoaderBuilder::filter) and slices
    /// ([`shard`](LoaderBuilder::shard), [`slice`](LoaderBuilder::slice)) are applied by
    /// planning through it ([`plan`](Self::plan)), not here, so that a plan made by
    /// [`crate::plan`] loads every tensor, whole, whatever the loader's. A shard that changed
    /// since (another file, its length, its modification time, or, where
    /// only its status changed, its header) is refused with [`LoadError::ShardChanged`]. A
    /// rewrite of tensor bytes alone, in place, with the modification time set back, is not
    /// seen: only the bytes tell (a checksum, [`LoaderBuilder::verify`]).
    pub fn stream_plan(&self, plan: Checkpoint) -> Result<TensorStream, LoadError> {
        let checks = self.expected_digests(&plan)?;
        self.start(plan, Instant::now(), false, checks)
    }

    /// `started` is when the load began (before planning, where the caller planned), so that
    /// the wall time in the stats covers planning, opening and reading. `fresh` when this
    /// load made the plan (a plan made earlier has each shard's header read again, unless
    /// the shard is certainly unchanged since: `Checkpoint::certainly_unchanged`);
    /// `checks`, what [`expected_digests`](Self::expected_digests) found.
    fn start(
        &self,
        plan: Checkpoint,
        started: Instant,
        fresh: bool,
        checks: Option<crate::checksums::Digests>,
    ) -> Result<TensorStream, LoadError> {
        let stats = self.new_stats();
        TensorStream::start(Arc::clone(&self.reader), plan, &self.cfg, &self.target, stats, started, fresh, checks)
    }

    /// The digests a verified load of `plan` checks its shards against (`None` for an
    /// unverified load): read from the `SHA256SUMS` beside them or the hub cache's names,
    /// the index hashed (a remote checkpoint's fetched from its store).
    fn expected_digests(&self, plan: &Checkpoint) -> Result<Option<crate::checksums::Digests>, LoadError> {
        match self.cfg.verify {
            Verify::Off => Ok(None),
            policy => crate::checksums::for_load(plan, policy, &|| false).map(Some),
        }
    }

    /// [`expected_digests`](Self::expected_digests) on a thread of its own, which the
    /// returned future waits for: a remote checkpoint's come from its store, which an async
    /// caller's thread must not wait for. Dropped, the thread gives up its requests to the
    /// store (within 20 ms) and lets go of the plan's copy.
    async fn expected_digests_async(&self, plan: &Checkpoint) -> Result<Option<crate::checksums::Digests>, LoadError> {
        let policy = self.cfg.verify;
        if policy == Verify::Off {
            return Ok(None);
        }
        let owned = plan.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new().name("tensorlift-digests".into()).spawn(move || {
            let digests = crate::checksums::for_load(&owned, policy, &|| tx.is_closed());
            let _ = tx.send(digests);
        });
        match spawned {
            Ok(_) => rx.await.map_err(|_| LoadError::PlanningFailed)?.map(Some),
            // No thread to be had: on this one.
            Err(_) => self.expected_digests(plan),
        }
    }

    /// Starts a load of the plan its planning thread made.
    async fn start_planned(
        &self,
        plan: Result<Checkpoint, LoadError>,
        started: Instant,
    ) -> Result<TensorStream, LoadError> {
        let plan = plan?;
        let checks = self.expected_digests_async(&plan).await?;
        self.start(plan, started, true, checks)
    }

    /// The statistics of a load that has not started.
    pub(crate) fn new_stats(&self) -> LoadStats {
        LoadStats {
            bytes: 0,
            bytes_read: 0,
            checkpoint_bytes: 0,
            tensors: 0,
            shards: 0,
            wall: Default::default(),
            read_wait: Default::default(),
            copy: Default::default(),
            device: self.device,
            device_reason: self.device_reason.clone(),
            io: self.reader.report(),
            direct_shards: 0,
            buffered_shards: 0,
            remote_shards: 0,
            max_in_flight_bytes: 0,
            huge_pages: None,
            prefaulted_bytes: 0,
            prefault_failure: None,
            page_cache_dma_bytes: 0,
            page_cache_dma_refused: None,
            spare_staging_chunks: 0,
            copied_bytes: 0,
            fill_by_copy_refused: None,
            first_read: None,
            planned: None,
            reused_host_bytes: 0,
            verified_bytes: 0,
            unverified_bytes: 0,
            sent_to: Vec::new(),
            received_from: Vec::new(),
        }
    }

    /// Whether a load of a path can start reading before planning ends: a host load that
    /// reads every tensor as stored, into memory of its own (see
    /// [`TensorStream::start_early`]).
    fn reads_while_planning(&self) -> bool {
        crate::target::may_read_while_planning(&self.cfg, &self.target)
    }

    /// Plans `path` on a thread of its own (an async caller's thread keeps serving other
    /// tasks meanwhile) and starts reading as soon as it can: once every header is read,
    /// each shard once its own header is validated (where
    /// [`reads_while_planning`](Self::reads_while_planning) allows; else after planning).
    async fn start_planning(&self, path: &Path, started: Instant) -> Result<TensorStream, LoadError> {
        let Some(mut events) = self.spawn_planner(path, self.reads_while_planning()) else {
            // No thread to be had: plan on this one.
            let plan = self.plan(path)?;
            let checks = self.expected_digests(&plan)?;
            return self.start(plan, started, true, checks);
        };
        loop {
            match events.recv().await {
                // Where it would not pay, the load waits for the whole plan.
                Some(PlanEvent::Early(early)) if !self.early_start_pays(&early) => {}
                Some(PlanEvent::Early(early)) => {
                    let reader = Arc::clone(&self.reader);
                    return match TensorStream::start_early(reader, early, &self.cfg, self.new_stats(), started) {
                        Ok(stream) => Ok(stream.planning(events)),
                        // Memory was refused before the headers were validated. The load is
                        // then what one that planned first makes of it: planning's error, or
                        // a start from the whole plan (which needs no memory for shards with
                        // no tensors, and says exactly what it needs).
                        Err(e) => loop {
                            match events.recv().await {
                                Some(PlanEvent::Done(plan, _)) => break self.start_planned(plan, started).await,
                                None => break Err(e),
                                Some(_) => {}
                            }
                        },
                    };
                }
                // Headers of a load that does not start early (a plan first, PyTorch files,
                // or where it would not pay).
                Some(PlanEvent::Validated(..)) => {}
                Some(PlanEvent::Done(plan, _)) => return self.start_planned(plan, started).await,
                // No answer means the thread panicked: a bug, reported as such.
                None => return Err(LoadError::PlanningFailed),
            }
        }
    }

    /// Whether reading while planning goes on pays for a load of `early`'s shards (see
    /// [`ReadWhilePlanning::Auto`]).
    fn early_start_pays(&self, early: &Checkpoint) -> bool {
        if self.cfg.read_while_planning == ReadWhilePlanning::Always {
            return true;
        }
        let cpus = crate::config::cpus().unwrap_or(1);
        // The largest shard planning kept open stands for the checkpoint (a small one is
        // mostly the header planning just read, which is cached).
        let resident = || {
            let (i, _) = (0..early.shards().len())
                .filter(|&i| early.shard_file(i).is_some())
                .map(|i| (i, early.shards()[i].file_len))
                .max_by_key(|&(_, len)| len)?;
            early.shard_file(i).map(tensorlift_io::cache::resident_estimate)
        };
        cpus >= ReadWhilePlanning::AUTO_CPUS || early_start_pays(cpus, resident())
    }

    /// Loads every (selected) tensor of `path`. Headers are read and parsed on a planning
    /// thread of the load's own, reads by the loader's I/O workers: the caller's thread only
    /// waits, and hands landed chunks on (checks, conversions, progress), at most 16 a poll
    /// before it gives its executor the thread back. A loader onto several devices loads with
    /// [`load_devices`](Self::load_devices).
    pub async fn load(&self, path: impl AsRef<Path>) -> Result<Model, LoadError> {
        let started = Instant::now();
        self.one_device()?;
        collect(self.start_planning(path.as_ref(), started).await?).await
    }

    /// Loads every (selected) tensor of `path` onto each device, reading each byte once: a
    /// model per device, in the order of [`devices`](Self::devices), each with that
    /// device's tensors (its part of each) and the load's statistics, where `device`,
    /// `bytes` (as stored) and `tensors` are that device's and the rest the load's
    /// (`bytes_read`: the bytes read once for every device; `wall`: the whole load's). A
    /// loader onto one device gives one model.
    pub async fn load_devices(&self, path: impl AsRef<Path>) -> Result<Vec<Model>, LoadError> {
        let started = Instant::now();
        let mut stream = self.start_planning(path.as_ref(), started).await?;
        let devices = self.devices();
        let mut each: Vec<Vec<Tensor>> = devices.iter().map(|_| Vec::new()).collect();
        while let Some(t) = stream.next().await {
            let t = t?;
            // A tensor is on one of the loader's devices; with one device, on that one
            // (or the host, where `auto` fell back to it).
            let k = devices.iter().position(|&d| d == t.location()).unwrap_or(0);
            each[k].push(t);
        }
        let load = stream.stats();
        Ok(devices
            .iter()
            .zip(each)
            .enumerate()
            .map(|(k, (&device, tensors))| {
                let mut stats = load.clone();
                stats.device = device;
                // As stored, as a load onto one device counts them.
                stats.bytes = stream.device_bytes().get(k).copied().unwrap_or(load.bytes);
                stats.tensors = tensors.len();
                Model::new(tensors, stats, stream.plan())
            })
            .collect())
    }

    /// [`load_devices`](Self::load_devices) for callers without an async runtime.
    pub fn load_devices_blocking(&self, path: impl AsRef<Path>) -> Result<Vec<Model>, LoadError> {
        tensorlift_io::block_on(self.load_devices(path))
    }

    /// Refuses to gather a load onto several devices into one model (names would repeat).
    fn one_device(&self) -> Result<(), LoadError> {
        match self.cfg.devices.as_ref().map_or(1, Vec::len) {
            0 | 1 => Ok(()),
            n => Err(LoadError::Unsupported(format!(
                "one model from a load onto {n} devices (its tensors' names repeat): use load_devices, or stream"
            ))),
        }
    }

    /// Loads the tensors of a plan made earlier whose names are in `names` (exact names,
    /// not globs), reusing the plan's open shards: how a reader that keeps a checkpoint open
    /// (like Python's `safe_open`) loads one tensor at a time.
    pub fn load_named_blocking(&self, plan: &Checkpoint, names: &[&str]) -> Result<Model, LoadError> {
        // A subset, not a clone of every entry narrowed after: one call per tensor of a large
        // checkpoint walks the plan's names once, and copies only what it loads.
        let wanted: std::collections::HashSet<&str> = names.iter().copied().collect();
        let keep = plan.tensors().iter().enumerate().filter(|(_, t)| wanted.contains(t.name.as_str())).map(|(i, _)| i);
        self.load_plan_blocking(plan.subset(keep))
    }

    /// Loads a plan made earlier, as it is (see [`stream_plan`](Self::stream_plan)).
    pub async fn load_plan(&self, plan: Checkpoint) -> Result<Model, LoadError> {
        self.one_device()?;
        let checks = self.expected_digests_async(&plan).await?;
        collect(self.start(plan, Instant::now(), false, checks)?).await
    }

    /// [`load_plan`](Self::load_plan) for callers without an async runtime.
    pub fn load_plan_blocking(&self, plan: Checkpoint) -> Result<Model, LoadError> {
        tensorlift_io::block_on(self.load_plan(plan))
    }

    /// [`load`](Self::load) for callers without an async runtime: blocks this thread.
    pub fn load_blocking(&self, path: impl AsRef<Path>) -> Result<Model, LoadError> {
        tensorlift_io::block_on(self.load(path))
    }
}

/// What planning needs of a loader, to plan on another thread.
struct Planner {
    limits: PlanLimits,
    /// Whether the load verifies digests: a verified load of a remote checkpoint plans from
    /// the store, never a local copy of it (the digests it checks are the store's).
    verify: bool,
    filter: Option<GlobSet>,
    patterns: Vec<String>,
    slices: crate::slicing::Slices,
}

/// Whether reading while planning pays with `cpus` CPUs and a checkpoint whose largest
/// shard is this much in the page cache (`None`: no shard to look at; an error: unknown).
/// With 4 CPUs or more, parsing and reads each have CPUs of their own (an assumption: only
/// 2-CPU machines have been measured, docs/BENCHMARKS.md); with fewer, it pays only when the
/// reads wait on the disk. Unknown residency counts as not cached, as `DirectIo::Auto`
/// counts it.
fn early_start_pays(cpus: usize, resident: Option<std::io::Result<f64>>) -> bool {
    cpus >= ReadWhilePlanning::AUTO_CPUS || resident.is_some_and(|r| r.map_or(true, |fraction| fraction < 0.5))
}

/// Forwards what planning reports to the load waiting for it; `early` when the load may
/// start before planning ends.
struct Forward {
    events: tokio::sync::mpsc::UnboundedSender<PlanEvent>,
    early: bool,
}

impl PlanObserver for Forward {
    fn wants_early_plan(&self) -> bool {
        self.early
    }

    fn headers_read(&self, early: Checkpoint) {
        // A load that was dropped no longer listens.
        let _ = self.events.send(PlanEvent::Early(early));
    }

    fn validated(&self, i: usize, header_hash: u64) {
        let _ = self.events.send(PlanEvent::Validated(i, header_hash));
    }

    fn cancelled(&self) -> bool {
        self.events.is_closed()
    }
}

impl Planner {
    fn plan(&self, path: &Path) -> Result<Checkpoint, LoadError> {
        self.plan_observed(path, None)
    }

    fn plan_observed(&self, path: &Path, observer: Option<&dyn PlanObserver>) -> Result<Checkpoint, LoadError> {
        let _span = tracing::info_span!("plan", path = %tensorlift_io::redact_url(path).display()).entered();
        let uncached;
        let limits = if self.verify && self.limits.remote.cache_dir.is_some() && tensorlift_io::is_remote(path) {
            let mut l = self.limits.clone();
            l.remote.cache_dir = None;
            uncached = l;
            &uncached
        } else {
            &self.limits
        };
        let mut plan = match observer {
            Some(o) => tensorlift_io::open_checkpoint_observed(path, limits, o)?,
            None => tensorlift_io::open_checkpoint(path, limits)?,
        };
        if let Some(set) = &self.filter {
            let before = plan.tensors().len();
            plan.retain(|t| set.is_match(&t.name));
            if plan.tensors().is_empty() && before > 0 {
                return Err(LoadError::NothingMatched {
                    file: crate::error::plan_file(&plan),
                    patterns: self.patterns.clone(),
                });
            }
        }
        self.slices.apply(&mut plan)?;
        Ok(plan)
    }
}

async fn collect(mut stream: TensorStream) -> Result<Model, LoadError> {
    let span = tracing::info_span!("read", tensors = stream.plan().tensors().len());
    async move {
        let mut tensors = Vec::with_capacity(stream.plan().tensors().len());
        while let Some(t) = stream.next().await {
            tensors.push(t?);
        }
        Ok(Model::new(tensors, stream.stats().clone(), stream.plan()))
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::early_start_pays;

    #[test]
    fn reading_while_planning_pays_with_cpus_to_spare_or_a_cold_checkpoint() {
        let err = || Some(Err(std::io::Error::from(std::io::ErrorKind::Unsupported)));
        assert!(early_start_pays(4, Some(Ok(1.0))), "4 CPUs, cached");
        assert!(early_start_pays(2, Some(Ok(0.1))), "2 CPUs, cold");
        assert!(!early_start_pays(2, Some(Ok(0.9))), "2 CPUs, cached");
        assert!(!early_start_pays(1, Some(Ok(0.5))), "half cached counts as cached");
        assert!(early_start_pays(2, err()), "unknown counts as not cached");
        assert!(!early_start_pays(2, None), "no shard to look at");
    }
}
