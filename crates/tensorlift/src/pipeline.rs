//! The CPU pipeline: plan -> extents -> chunked reads at depth -> tensors as they land.
//!
//! Selected tensors that sit close together in a shard form an *extent*, read into one
//! page-aligned [`HostArena`] whose base maps to a page-aligned file offset. Aligned file
//! offsets therefore land at aligned addresses, and O_DIRECT reads go straight into the
//! final memory: there is no staging copy on the CPU path. Extents are cut into chunks;
//! chunks of all shards are interleaved so that several files are read at once. Reads in
//! flight are bounded by the queue depth, and their bytes by the staging budget.
//!
//! Shards are read through the descriptors their planning opened ([`Checkpoint`]), opened
//! for reading when their first read is issued and closed after their last one lands, and
//! interleaved a window of shards at a time, so open files stay bounded however many
//! shards a checkpoint has.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tensorlift_format::{LoadPlan, PlannedTensor, Shard};
use tensorlift_io::{
    cache, ArenaChunk, Checkpoint, HostArena, IoError, MappedFile, OpenFile, ReadFuture, Reader, PAGE,
};

use crate::loader::{Config, DirectIo};
use crate::{LoadError, LoadStats, Progress, Tensor};

/// Host memory a loaded tensor costs beyond its bytes, at most (name, shape, bookkeeping).
const TENSOR_OVERHEAD: u64 = 1024;

/// Gaps of unselected tensors up to this size are read through rather than splitting an extent.
const MAX_GAP: u64 = 1 << 20;

/// A run of selected tensors in one shard, read as one piece.
struct Span {
    shard: usize,
    /// Page-aligned file offset that arena byte 0 holds.
    base: u64,
    /// End of the last tensor (file offset).
    end: u64,
    /// Tensors (indices into the plan), in file order.
    tensors: Vec<usize>,
}

/// A span with the arena it is read into.
struct Extent {
    span: Span,
    arena: Arc<HostArena>,
    /// Chunks still to land for each tensor of `span.tensors`.
    remaining: Vec<usize>,
}

struct Job {
    extent: usize,
    shard: usize,
    chunk: ArenaChunk,
    file_offset: u64,
    len: usize,
}

/// A read in flight; `len` bytes of the budget are held until it lands.
struct InFlight {
    extent: usize,
    shard: usize,
    file_offset: u64,
    len: usize,
    fut: ReadFuture<ArenaChunk>,
}

/// Tensors of one load, yielded as their bytes land.
///
/// Dropping the stream cancels the load: reads in flight finish in the I/O workers, which
/// then free their memory; nothing is left running or allocated.
pub struct TensorStream {
    reader: Arc<Reader>,
    plan: Checkpoint,
    direct: DirectIo,
    /// Shards open for reading now, and the reads each still has to land.
    files: Vec<Option<Arc<OpenFile>>>,
    reads_left: Vec<usize>,
    window: usize,
    extents: Vec<Extent>,
    jobs: VecDeque<Job>,
    in_flight: VecDeque<InFlight>,
    ready: VecDeque<Tensor>,
    queue_depth: usize,
    budget: u64,
    progress: Option<crate::loader::ProgressFn>,
    done_bytes: u64,
    in_flight_bytes: u64,
    started: Instant,
    read_wait: Duration,
    finished: bool,
    stats: LoadStats,
}

impl std::fmt::Debug for TensorStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorStream")
            .field("tensors", &self.plan.tensors().len())
            .field("in_flight", &self.in_flight.len())
            .field("ready", &self.ready.len())
            .finish()
    }
}

impl TensorStream {
    pub(crate) fn start(
        reader: Arc<Reader>,
        plan: Checkpoint,
        cfg: &Config,
        stats: LoadStats,
        started: Instant,
    ) -> Result<TensorStream, LoadError> {
        let _span =
            tracing::info_span!("plan_io", tensors = plan.tensors().len(), shards = plan.shards().len()).entered();
        let mut stream = TensorStream {
            reader,
            direct: cfg.direct,
            files: vec![None; plan.shards().len()],
            reads_left: vec![0; plan.shards().len()],
            window: cfg.limits.open_files_bound(),
            extents: Vec::new(),
            jobs: VecDeque::new(),
            in_flight: VecDeque::new(),
            ready: VecDeque::new(),
            queue_depth: cfg.queue_depth as usize,
            budget: cfg.staging_budget.max(cfg.chunk_size) as u64,
            progress: cfg.progress.clone(),
            done_bytes: 0,
            in_flight_bytes: 0,
            started,
            read_wait: Duration::ZERO,
            finished: false,
            stats,
            plan,
        };
        stream.stats.bytes = stream.plan.total_bytes();
        // Each tensor costs a few small allocations (its name, shape, the model's index):
        // check that their total can be had before making them, since each alone would abort.
        let per_tensor = stream.plan.tensors().len() as u64 * TENSOR_OVERHEAD;
        if !tensorlift_io::can_allocate(per_tensor) {
            return Err(LoadError::OutOfMemory { file: stream.plan_file(), bytes: per_tensor });
        }
        let spans = spans(&stream.plan);
        let mut shards: Vec<usize> = spans.iter().map(|s| s.shard).collect();
        shards.dedup();
        stream.stats.shards = shards.len();
        match cfg.map_views {
            Some(contract) => stream.map_all(&spans, contract)?,
            None => stream.arrange(spans, cfg.chunk_size)?,
        }
        Ok(stream)
    }

    /// The file an error about the whole checkpoint names: its one shard, its index, or its folder.
    fn plan_file(&self) -> std::path::PathBuf {
        match (self.plan.shards(), self.plan.index_file()) {
            ([one], _) => one.path.clone(),
            (_, Some(index)) => index.to_path_buf(),
            _ => self.plan.root().to_path_buf(),
        }
    }

    /// Opens shard `i` for reading: the descriptor planning opened (or the same file,
    /// reopened and checked), with O_DIRECT unless the shard is already in the page cache.
    fn open_shard(&mut self, i: usize, direct: DirectIo) -> Result<Arc<OpenFile>, LoadError> {
        let file = self.plan.take_shard(i).map_err(open_error)?;
        let shard = &self.plan.shards()[i];
        // A shard already in the page cache reads faster buffered; O_DIRECT would go to disk.
        let direct = match direct {
            DirectIo::Always => true,
            DirectIo::Never => false,
            DirectIo::Auto => cache::resident_fraction_of(&file).map_or(true, |f| f < 0.5),
        };
        let file = self.reader.open_file(&shard.path, file, direct).map_err(open_error)?;
        check_unchanged(shard, &file)?;
        if file.is_direct() {
            self.stats.direct_shards += 1;
        } else {
            self.stats.buffered_shards += 1;
        }
        Ok(file)
    }

    /// Zero-copy views of mapped shards, under the caller's contract: every tensor is ready at once.
    fn map_all(&mut self, spans: &[Span], contract: tensorlift_io::MapContract) -> Result<(), LoadError> {
        let mut mapped: Option<(usize, Arc<MappedFile>)> = None;
        for e in spans {
            let map = match &mapped {
                Some((s, m)) if *s == e.shard => Arc::clone(m),
                _ => {
                    // The mapping keeps no descriptor: the file closes once it is mapped.
                    let file = self.open_shard(e.shard, DirectIo::Never)?;
                    let m = Arc::new(MappedFile::map(&file).map_err(LoadError::Open)?);
                    mapped = Some((e.shard, Arc::clone(&m)));
                    m
                }
            };
            for &t in &e.tensors {
                let pt = &self.plan.tensors()[t];
                let range = pt.file_range.start as usize..pt.file_range.end as usize;
                self.ready.push_back(Tensor::mapped(&pt.name, pt.dtype, &pt.shape, Arc::clone(&map), range, contract));
            }
        }
        self.stats.bytes_read = self.plan.total_bytes();
        self.done_bytes = self.stats.bytes_read;
        Ok(())
    }

    fn arrange(&mut self, spans: Vec<Span>, chunk_size: usize) -> Result<(), LoadError> {
        let needed: u64 = spans.iter().map(|s| (s.end - s.base).next_multiple_of(PAGE as u64)).sum();
        if let Some(available) = tensorlift_io::host_memory_available().filter(|&a| needed > a) {
            return Err(LoadError::HostMemory { file: self.plan_file(), needed, available });
        }
        let mut per_extent: Vec<VecDeque<Job>> = Vec::with_capacity(spans.len());
        let mut extents = Vec::with_capacity(spans.len());
        for (ei, span) in spans.into_iter().enumerate() {
            let len = (span.end - span.base) as usize;
            let arena = HostArena::new(len.next_multiple_of(PAGE), chunk_size).ok_or_else(|| {
                LoadError::OutOfMemory { file: self.plan.shards()[span.shard].path.clone(), bytes: len as u64 }
            })?;
            let remaining = span
                .tensors
                .iter()
                .map(|&t| arena.chunks_covering(&arena_range(&span, &self.plan.tensors()[t])).len())
                .collect();
            let mut jobs = VecDeque::new();
            for chunk in arena.take_chunks() {
                let r = chunk.range();
                let read = len.min(r.end).saturating_sub(r.start);
                self.reads_left[span.shard] += 1;
                jobs.push_back(Job {
                    extent: ei,
                    shard: span.shard,
                    file_offset: span.base + r.start as u64,
                    len: read,
                    chunk,
                });
            }
            per_extent.push(jobs);
            extents.push(Extent { span, arena, remaining });
        }
        // Zero-size tensors, and any covered by no chunk, are ready now.
        for e in &extents {
            for (k, &t) in e.span.tensors.iter().enumerate() {
                if e.remaining[k] == 0 {
                    self.ready.push_back(make(&self.plan, e, t));
                }
            }
        }
        // Interleave shards so reads are in flight on several files at once, a window of
        // shards at a time so that open files stay bounded.
        let mut by_shard: Vec<VecDeque<Job>> = Vec::new();
        for (ei, jobs) in per_extent.into_iter().enumerate() {
            let s = extents[ei].span.shard;
            if by_shard.len() <= s {
                by_shard.resize_with(s + 1, VecDeque::new);
            }
            by_shard[s].extend(jobs);
        }
        by_shard.retain(|q| !q.is_empty());
        for window in by_shard.chunks_mut(self.window) {
            while window.iter().any(|q| !q.is_empty()) {
                for q in window.iter_mut() {
                    if let Some(j) = q.pop_front() {
                        self.stats.bytes_read += j.len as u64;
                        self.jobs.push_back(j);
                    }
                }
            }
        }
        self.extents = extents;
        Ok(())
    }

    /// Issues reads while the queue depth and the byte budget allow, opening each shard
    /// when its first read is issued.
    fn fill(&mut self) -> Result<(), LoadError> {
        while self.in_flight.len() < self.queue_depth {
            let Some((len, shard)) = self.jobs.front().map(|j| (j.len as u64, j.shard)) else { break };
            if self.in_flight_bytes + len > self.budget {
                break;
            }
            let file = match &self.files[shard] {
                Some(f) => Arc::clone(f),
                None => {
                    let f = self.open_shard(shard, self.direct)?;
                    self.files[shard] = Some(Arc::clone(&f));
                    f
                }
            };
            let Some(job) = self.jobs.pop_front() else { break };
            let fut = self.reader.read(&file, job.file_offset, job.chunk, 0, job.len);
            self.in_flight_bytes += len;
            self.stats.max_in_flight_bytes = self.stats.max_in_flight_bytes.max(self.in_flight_bytes);
            self.in_flight.push_back(InFlight {
                extent: job.extent,
                shard,
                file_offset: job.file_offset,
                len: job.len,
                fut,
            });
        }
        Ok(())
    }

    /// The next tensor whose bytes have all landed; `None` when the load is complete.
    pub async fn next(&mut self) -> Option<Result<Tensor, LoadError>> {
        loop {
            if let Some(t) = self.ready.pop_front() {
                self.stats.tensors += 1;
                return Some(Ok(t));
            }
            if self.finished {
                return None;
            }
            if let Err(e) = self.fill() {
                self.abort().await;
                return Some(Err(e));
            }
            let Some(f) = self.in_flight.pop_front() else {
                self.finish();
                continue;
            };
            let t0 = Instant::now();
            let result = f.fut.await;
            self.read_wait += t0.elapsed();
            self.in_flight_bytes -= f.len as u64;
            // The shard's last read has landed: close it.
            self.reads_left[f.shard] -= 1;
            if self.reads_left[f.shard] == 0 {
                self.files[f.shard] = None;
            }
            match result {
                Ok(chunk) => self.landed(f.extent, chunk, f.len),
                Err(failed) => {
                    let err = self.read_error(f.extent, f.file_offset, f.len, failed.error);
                    self.abort().await;
                    return Some(Err(err));
                }
            }
        }
    }

    fn landed(&mut self, ei: usize, chunk: ArenaChunk, len: usize) {
        let range = chunk.range();
        let plan = &self.plan;
        let e = &mut self.extents[ei];
        // Every chunk of an extent was cut from its own arena.
        let Ok(index) = e.arena.complete(chunk) else { return };
        // Tensors overlapping this chunk, found from the first one ending after its start.
        let span = &e.span;
        let first = span.tensors.partition_point(|&t| arena_range(span, &plan.tensors()[t]).end <= range.start);
        let mut newly = Vec::new();
        for k in first..span.tensors.len() {
            let ar = arena_range(span, &plan.tensors()[span.tensors[k]]);
            if ar.start >= range.end {
                break;
            }
            if !ar.is_empty() && e.arena.chunks_covering(&ar).contains(&index) {
                e.remaining[k] -= 1;
                if e.remaining[k] == 0 {
                    newly.push(span.tensors[k]);
                }
            }
        }
        for t in newly {
            let t = make(plan, &self.extents[ei], t);
            self.ready.push_back(t);
        }
        self.done_bytes += len as u64;
        if let Some(p) = &self.progress {
            p(Progress { done: self.done_bytes, total: self.stats.bytes_read });
        }
    }

    fn read_error(&self, ei: usize, offset: u64, len: usize, source: tensorlift_io::IoError) -> LoadError {
        let e = &self.extents[ei].span;
        let plan = &self.plan;
        let tensor = e
            .tensors
            .iter()
            .map(|&t| &plan.tensors()[t])
            .find(|t| t.file_range.end > offset && t.file_range.start < offset + len as u64)
            .map_or_else(|| "<padding>".to_owned(), |t| t.name.clone());
        LoadError::Read { file: plan.shards()[e.shard].path.clone(), tensor, source }
    }

    /// Ends a failed load: waits for every read in flight, then frees all memory.
    async fn abort(&mut self) {
        self.jobs.clear();
        while let Some(f) = self.in_flight.pop_front() {
            let _ = f.fut.await;
        }
        self.files.iter_mut().for_each(|f| *f = None);
        self.ready.clear();
        self.extents.clear();
        self.finished = true;
    }

    fn finish(&mut self) {
        self.finished = true;
        self.stats.wall = self.started.elapsed();
        self.stats.read_wait = self.read_wait;
    }

    /// Statistics so far (complete once `next` has returned `None`).
    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }

    /// The plan being loaded.
    pub fn plan(&self) -> &LoadPlan {
        self.plan.plan()
    }
}

fn make(plan: &LoadPlan, e: &Extent, t: usize) -> Tensor {
    let pt = &plan.tensors()[t];
    Tensor::host(&pt.name, pt.dtype, &pt.shape, Arc::clone(&e.arena), arena_range(&e.span, pt))
}

/// A shard that is no longer the planned file is [`LoadError::ShardChanged`].
fn open_error(e: IoError) -> LoadError {
    match e {
        IoError::Changed { file, what } => LoadError::ShardChanged { file, what },
        e => LoadError::Open(e),
    }
}

/// The tensor's bytes within its extent's arena.
fn arena_range(e: &Span, t: &PlannedTensor) -> Range<usize> {
    (t.file_range.start - e.base) as usize..(t.file_range.end - e.base) as usize
}

/// Groups the plan's tensors into spans: runs within a shard separated by small gaps.
fn spans(plan: &LoadPlan) -> Vec<Span> {
    let mut out: Vec<Span> = Vec::new();
    for (i, t) in plan.tensors().iter().enumerate() {
        match out.last_mut() {
            Some(e) if e.shard == t.shard && t.file_range.start >= e.end && t.file_range.start - e.end <= MAX_GAP => {
                e.end = e.end.max(t.file_range.end);
                e.tensors.push(i);
            }
            _ => out.push(Span {
                shard: t.shard,
                base: t.file_range.start - t.file_range.start % PAGE as u64,
                end: t.file_range.end,
                tensors: vec![i],
            }),
        }
    }
    out
}

/// Refuses a shard whose length or header differ from what was planned: an edit in place
/// can keep the modification time that [`Checkpoint::take_shard`] compares.
fn check_unchanged(shard: &Shard, file: &OpenFile) -> Result<(), LoadError> {
    use std::os::unix::fs::FileExt;
    let changed = |what: String| LoadError::ShardChanged { file: shard.path.clone(), what };
    if file.len() != shard.file_len {
        return Err(changed(format!("length is {} bytes, planned {}", file.len(), shard.file_len)));
    }
    // The planned header was held in memory, so this many bytes can be held again.
    let mut buf = vec![0u8; shard.data_start() as usize];
    file.file().read_exact_at(&mut buf, 0).map_err(|e| changed(format!("cannot re-read its header: {e}")))?;
    match tensorlift_format::parse_header(&shard.path, &buf, file.len()) {
        Ok(h) if h == shard.header => Ok(()),
        Ok(_) => Err(changed("its header differs from the planned one".into())),
        Err(e) => Err(changed(format!("its header no longer parses: {e}"))),
    }
}
