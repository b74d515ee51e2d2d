//! The scheduler: reads at depth, into buffers that a destination lends, tensors as they land.
//!
//! The layout ([`crate::layout`]) says which chunks of which files to read and in what
//! order. The scheduler issues those reads while the queue depth and the staging budget
//! allow, asking the destination ([`Sink`]) for a buffer for each and handing the filled
//! buffer back; it does not know where bytes end up. The host destination lends the final
//! memory itself (no staging copy); the CUDA destination lends pinned chunks and copies
//! them to the device, or takes a read to copy it straight from the page cache
//! ([`Sink::serve`]). Shards are opened when their first read is issued and closed after
//! their last one lands, or after the sink let go of the reads it took ([`crate::open`]).
//!
//! A host load of a whole checkpoint starts before planning ends ([`TensorStream::start_early`]):
//! once every header is read, each shard's data section is known (it runs from the header's
//! end to the file's), so its memory is allocated and its reads are laid out; each shard's
//! reads are issued as soon as its own header is validated, while the other headers are
//! parsed and the plan is checked across shards. Tensors are handed out only once the whole
//! plan stands, so a checkpoint that fails its checks yields none.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tensorlift_format::LoadPlan;
use tensorlift_io::{Checkpoint, ReadFuture, Reader};

use crate::config::{Config, DirectIo};
use crate::error::{plan_file, read_error};
use crate::layout::{self, Read, Span};
use crate::open::ShardIo;
use crate::sink::{Serve, Sink};
use crate::target::{Landing, Target};
use crate::{LoadError, LoadStats, Progress, Tensor};

/// Host memory a loaded tensor costs beyond its bytes, at most (name, shape, bookkeeping).
const TENSOR_OVERHEAD: u64 = 1024;

/// A read in flight.
struct InFlight<B> {
    read: usize,
    fut: ReadFuture<B>,
}

/// The reads of one load and the files they need.
struct Scheduler<S: Sink> {
    sink: S,
    reads: Vec<Read>,
    next: usize,
    in_flight: VecDeque<InFlight<S::Buf>>,
    files: Vec<Option<ShardIo>>,
    reads_left: Vec<usize>,
    queue_depth: usize,
    budget: u64,
    in_flight_bytes: u64,
    /// Shards open for reading now (or kept open by the sink for reads it took), and the
    /// most that may be.
    open: usize,
    window: usize,
    /// Shards this scheduler is done with that the sink still holds open (see
    /// [`Sink::holds`]): counted in `open` until the sink lets them go.
    held_by_sink: Vec<usize>,
    /// When the load started (for [`LoadStats::first_read`]).
    started: Instant,
    /// Whether this load made its plan (see [`tensorlift_io::HeaderCheck`]).
    fresh: bool,
    /// While planning goes on: each shard's header hash once it is validated, and how many
    /// are not yet. Reads wait for their shard's.
    validated: Option<Vec<Option<u64>>>,
    unvalidated: usize,
}

enum Dest {
    Host(Box<Scheduler<crate::dest_host::HostSink>>),
    Cuda(Box<Scheduler<crate::dest_cuda::CudaSink>>),
    Devices(Box<Scheduler<crate::dest_devices::DevicesSink>>),
    /// Zero-copy views, all ready at the start.
    Mapped,
}

/// Tensors of one load, yielded as their bytes land (on the device, for a CUDA load).
///
/// Dropping the stream cancels the load: reads not yet started are given up, reads in the
/// kernel's hands finish in the I/O workers, copies in flight finish on the device, and then
/// their memory is freed; nothing is left running
/// or allocated. (In a process forked from the one that made it, which has none of the
/// load's threads and whose locks they may have held at the fork, dropping it releases
/// nothing: what it holds is left as the fork copied it.)
pub struct TensorStream {
    reader: Arc<Reader>,
    plan: Checkpoint,
    direct: DirectIo,
    dest: Dest,
    ready: VecDeque<Tensor>,
    progress: Option<crate::config::ProgressFn>,
    done_bytes: u64,
    total_bytes: u64,
    started: Instant,
    read_wait: Duration,
    /// When the stream last had to wait, for `read_wait`.
    waiting_since: Option<Instant>,
    finished: bool,
    /// An error to report once everything in flight has drained.
    failed: Option<LoadError>,
    stats: LoadStats,
    /// While planning goes on ([`start_early`](Self::start_early)): what it reports.
    planning: Option<tokio::sync::mpsc::UnboundedReceiver<PlanEvent>>,
    /// For a load onto several devices: the bytes each device's tensors take, as stored.
    device_bytes: Vec<u64>,
    /// The process that made it.
    made: tensorlift_io::MadeIn,
    /// Steps (reads landed, copies done) since the stream last gave its executor back its
    /// thread: see [`STEPS_PER_TURN`].
    steps: u32,
}

/// How many steps a stream takes before it hands its executor back its thread, even with
/// more work ready. Reads that land as fast as they are handled (cached files, a deep queue)
/// would otherwise keep one poll going for the whole load (checks, conversions, the progress
/// callback, all on the executor's thread), and other tasks on that thread would wait for
/// it. A turn is then at most this many chunks' handling; giving the thread back costs one
/// wake-up per turn (loader-bench's A/B saw no change: docs/BENCHMARKS.md). (Counted across
/// tensors handed out, so that a caller that takes each tensor as it comes, as `load` does,
/// is bounded too.)
const STEPS_PER_TURN: u32 = 16;

impl Drop for TensorStream {
    fn drop(&mut self) {
        if self.made.elsewhere() {
            // The load's threads (hashing, registering, completing copies) are the parent's:
            // waiting for them, or taking a lock one of them held at the fork, would wait
            // forever, and the device's state is the parent's. Left as it is.
            std::mem::forget(std::mem::replace(&mut self.dest, Dest::Mapped));
            std::mem::forget(std::mem::take(&mut self.ready));
            std::mem::forget(self.planning.take());
        }
    }
}

/// What the planning thread of a load that starts early reports, in this order: the plan of
/// the shards alone (not sent for PyTorch files), each shard as its header is validated,
/// and the whole plan or the error that ended planning.
pub(crate) enum PlanEvent {
    Early(Checkpoint),
    Validated(usize, u64),
    /// With the moment planning ended.
    Done(Result<Checkpoint, LoadError>, Instant),
}

impl std::fmt::Debug for TensorStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorStream")
            .field("tensors", &self.plan.tensors().len())
            .field("ready", &self.ready.len())
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl TensorStream {
    /// A stream with nothing to read yet.
    fn new(reader: Arc<Reader>, plan: Checkpoint, cfg: &Config, stats: LoadStats, started: Instant) -> Self {
        TensorStream {
            reader,
            direct: cfg.direct,
            dest: Dest::Mapped,
            ready: VecDeque::new(),
            progress: cfg.progress.clone(),
            done_bytes: 0,
            total_bytes: 0,
            started,
            read_wait: Duration::ZERO,
            waiting_since: None,
            finished: false,
            failed: None,
            stats,
            plan,
            planning: None,
            device_bytes: Vec::new(),
            made: tensorlift_io::MadeIn::here(),
            steps: 0,
        }
    }

    /// Starts loading a whole plan. `fresh` when this load made it; `checks`, each shard's
    /// expected digest for a verified load (`None`: an unverified load), from
    /// [`crate::checksums::for_load`].
    #[allow(clippy::too_many_arguments)] // One call site: the loader's.
    pub(crate) fn start(
        reader: Arc<Reader>,
        mut plan: Checkpoint,
        cfg: &Config,
        target: &Target,
        stats: LoadStats,
        started: Instant,
        fresh: bool,
        checks: Option<crate::checksums::Digests>,
    ) -> Result<TensorStream, LoadError> {
        let _span =
            tracing::info_span!("plan_io", tensors = plan.tensors().len(), shards = plan.shards().len()).entered();
        tensors_fit(&plan, 1)?;
        // Where every tensor lands, decided here once (the caller's placement checked)
        // before anything is read or allocated.
        let landing = Landing::decide(cfg, target, &plan)?;
        // Onto several devices: each one's plan, and the plan narrowed to what they need.
        let mut device_plans = match landing {
            Landing::Devices(_) => {
                let shares = cfg.devices.as_deref().unwrap_or_default();
                let plans = crate::dest_devices::plans(&mut plan, shares)?;
                // Each device's tensors cost their few allocations too.
                tensors_fit(&plan, plans.len())?;
                Some(plans)
            }
            _ => None,
        };
        // A verified load reads every shard it takes a tensor from whole (its build refused
        // what would not).
        let spans = match checks {
            Some(_) => layout::whole_files(&plan).map_err(|shard| {
                LoadError::Unsupported(format!(
                    "verified loads of {}, whose tensors share bytes (views of one storage): load it unverified, \
                     or convert it to safetensors",
                    plan.shards()[shard].path.display()
                ))
            })?,
            None => layout::spans(&plan, |i| landing.read_into_caller(&plan, i, cfg)),
        };
        let unverified: u64 = match &checks {
            Some(c) => spans
                .iter()
                .filter(|s| c.get(s.shard).is_none_or(Option::is_none))
                .map(|s| plan.shards()[s.shard].file_len)
                .sum(),
            None => 0,
        };
        let mut stream = TensorStream::new(reader, plan, cfg, stats, started);
        if fresh {
            stream.stats.planned = Some(started.elapsed());
        }
        plan_stats(&mut stream.stats, &stream.plan, &spans);
        if let Some(plans) = &device_plans {
            // The bytes that land: each device's.
            stream.device_bytes = plans.iter().map(LoadPlan::total_bytes).collect();
            stream.stats.bytes = stream.device_bytes.iter().sum();
        }
        stream.stats.unverified_bytes = unverified;
        let reads = read_list(&stream.plan, &spans, cfg)?;
        stream.total_bytes = reads.iter().map(|r| r.len as u64).sum();
        match landing {
            Landing::Mapped(contract) => {
                // Nothing is read: the tensors are views of the files.
                // (The loader's reader only opens the files: a view reads nothing.)
                crate::open::map_all(
                    &stream.reader,
                    &mut stream.plan,
                    &spans,
                    contract,
                    cfg.convert_to,
                    fresh,
                    checks,
                    &mut stream.ready,
                    &mut stream.stats,
                )?;
            }
            Landing::Host { caller } => {
                let mut scheduler = stream.host_scheduler(cfg, spans, caller, reads, fresh, checks)?;
                scheduler.sink.start_prefault();
                stream.dest = Dest::Host(Box::new(scheduler));
            }
            Landing::Cuda { target, caller } => {
                let sink = crate::dest_cuda::CudaSink::new(
                    target,
                    &stream.plan,
                    spans,
                    caller,
                    cfg,
                    &reads,
                    checks,
                    &mut stream.ready,
                )?;
                stream.dest = Dest::Cuda(Box::new(Scheduler::new(sink, reads, &stream.plan, cfg, started, fresh)));
            }
            Landing::Devices(targets) => {
                let plans = device_plans.take().unwrap_or_default();
                let sink =
                    crate::dest_devices::DevicesSink::new(targets, plans, &spans, cfg, &reads, &mut stream.ready)?;
                stream.dest = Dest::Devices(Box::new(Scheduler::new(sink, reads, &stream.plan, cfg, started, fresh)));
            }
        }
        Ok(stream)
    }

    /// The scheduler of a host load of `spans`, read as `reads` into memory taken now.
    fn host_scheduler(
        &mut self,
        cfg: &Config,
        spans: Vec<Span>,
        dests: Vec<Option<crate::place::Resolved>>,
        reads: Vec<Read>,
        fresh: bool,
        checks: Option<Vec<Option<(crate::digest::Sha256, crate::digest::DigestSource)>>>,
    ) -> Result<Scheduler<crate::dest_host::HostSink>, LoadError> {
        let copies = copy_shards(&self.plan, cfg);
        let sink = crate::dest_host::HostSink::new(
            &self.plan,
            &copies,
            spans,
            dests,
            cfg,
            &reads,
            checks,
            &mut self.stats,
            &mut self.ready,
        )?;
        Ok(Scheduler::new(sink, reads, &self.plan, cfg, self.started, fresh))
    }

    /// Starts a host load of every tensor of a checkpoint while planning goes on: `early` is
    /// the plan of its shards alone ([`tensorlift_format::LoadPlan::unparsed`]); what
    /// planning reports next is given with [`planning`](Self::planning). Memory for each
    /// shard's data section is taken now, and each shard's reads wait for its header to be
    /// validated; prefaulting waits for every header. The caller has checked that the load
    /// reads everything as it is stored (no filter, slice, conversion, caller memory or
    /// mapped views), so the plan's spans are these.
    pub(crate) fn start_early(
        reader: Arc<Reader>,
        early: Checkpoint,
        cfg: &Config,
        stats: LoadStats,
        started: Instant,
    ) -> Result<TensorStream, LoadError> {
        let _span = tracing::info_span!("plan_io_early", shards = early.shards().len()).entered();
        let mut stream = TensorStream::new(reader, early, cfg, stats, started);
        let spans = layout::shard_spans(&stream.plan);
        let reads = read_list(&stream.plan, &spans, cfg)?;
        stream.total_bytes = reads.iter().map(|r| r.len as u64).sum();
        let mut scheduler = stream.host_scheduler(cfg, spans, Vec::new(), reads, true, None)?;
        scheduler.validated = Some(vec![None; stream.plan.shards().len()]);
        scheduler.unvalidated = stream.plan.shards().len();
        stream.dest = Dest::Host(Box::new(scheduler));
        Ok(stream)
    }

    /// The stream of [`start_early`](Self::start_early), told what planning reports next.
    pub(crate) fn planning(mut self, events: tokio::sync::mpsc::UnboundedReceiver<PlanEvent>) -> Self {
        self.planning = Some(events);
        self
    }

    /// Takes in what planning reported since the last call; the stream waits for more
    /// (`cx` is woken) while planning goes on.
    fn poll_planning(&mut self, cx: &mut Context<'_>) {
        while let Some(events) = self.planning.as_mut() {
            let Poll::Ready(event) = events.poll_recv(cx) else { return };
            match event {
                Some(PlanEvent::Validated(i, hash)) => {
                    // Memory is faulted in ahead once every header is validated: not for a
                    // checkpoint that is about to fail.
                    if let Dest::Host(s) = &mut self.dest {
                        if s.validate(i, hash) {
                            s.sink.start_prefault();
                        }
                    }
                }
                // Sent once, before this stream was made.
                Some(PlanEvent::Early(_)) => {}
                Some(PlanEvent::Done(Ok(plan), at)) => {
                    self.planning = None;
                    self.stats.planned = Some(at.saturating_duration_since(self.started));
                    if let Err(e) = self.planned(plan) {
                        self.failed = Some(e);
                    }
                }
                Some(PlanEvent::Done(Err(e), _)) => {
                    self.planning = None;
                    self.failed = Some(e);
                }
                // The planning thread ended without a word: it panicked (a bug).
                None => {
                    self.planning = None;
                    self.failed = Some(LoadError::PlanningFailed);
                }
            }
        }
    }

    /// Planning ended with `plan`, which replaces the plan of the shards alone: the tensors
    /// whose bytes have landed are ready, the others will be as their chunks land.
    fn planned(&mut self, mut plan: Checkpoint) -> Result<(), LoadError> {
        let same_shards = plan.shards().len() == self.plan.shards().len()
            && plan
                .shards()
                .iter()
                .zip(self.plan.shards())
                .all(|(a, b)| a.identity == b.identity && a.data_start() == b.data_start());
        let Dest::Host(s) = &mut self.dest else { return Err(LoadError::PlanningFailed) };
        if !same_shards {
            return Err(LoadError::PlanningFailed);
        }
        tensors_fit(&plan, 1)?;
        let spans = layout::spans(&plan, |_| false);
        plan_stats(&mut self.stats, &plan, &spans);
        // Shards with no tensors have nothing to read after all.
        let mut keep = vec![false; plan.shards().len()];
        for span in &spans {
            keep[span.shard] = true;
        }
        s.sink.planned(&plan, spans, &mut self.ready)?;
        s.sink.start_prefault();
        s.validated = None;
        self.total_bytes -= s.drop_reads(&keep);
        // The shards already opened took the early plan's descriptors; the plan's copies of
        // them are closed, so that a shard's descriptor closes after its last read.
        for i in 0..plan.shards().len() {
            if self.plan.reopens(i) {
                plan.release_shard(i);
            }
        }
        self.plan = plan;
        Ok(())
    }

    /// The next tensor whose bytes have all landed; `None` when the load is complete.
    /// (`TensorStream` is also a [`futures_core::Stream`] of the same items.)
    pub async fn next(&mut self) -> Option<Result<Tensor, LoadError>> {
        std::future::poll_fn(|cx| self.poll_tensor(cx)).await
    }

    fn poll_tensor(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Tensor, LoadError>>> {
        loop {
            if let Some(e) = self.failed.take() {
                // A failed load drains its reads and copies before it reports.
                let drained = match &mut self.dest {
                    Dest::Host(s) => s.poll_abort(cx),
                    Dest::Cuda(s) => s.poll_abort(cx),
                    Dest::Devices(s) => s.poll_abort(cx),
                    Dest::Mapped => Poll::Ready(()),
                };
                if drained.is_pending() {
                    self.failed = Some(e);
                    return Poll::Pending;
                }
                self.dest = Dest::Mapped;
                self.ready.clear();
                // An error met while planning went on (a read, an open) waits for planning
                // to end: planning's own error, which a load that planned first would have
                // met first, is the one reported.
                let mut e = e;
                while let Some(events) = self.planning.as_mut() {
                    match events.poll_recv(cx) {
                        Poll::Pending => {
                            self.failed = Some(e);
                            return Poll::Pending;
                        }
                        Poll::Ready(Some(PlanEvent::Done(Err(planning), _))) => {
                            e = planning;
                            self.planning = None;
                        }
                        Poll::Ready(Some(PlanEvent::Done(Ok(_), _)) | None) => self.planning = None,
                        Poll::Ready(Some(_)) => {}
                    }
                }
                self.finished = true;
                return Poll::Ready(Some(Err(e)));
            }
            if let Some(t) = self.ready.pop_front() {
                self.stats.tensors += 1;
                return Poll::Ready(Some(Ok(t)));
            }
            if self.finished {
                return Poll::Ready(None);
            }
            if self.planning.is_some() {
                self.poll_planning(cx);
                if self.failed.is_some() || !self.ready.is_empty() {
                    continue;
                }
            }
            let step = match &mut self.dest {
                Dest::Host(s) => {
                    s.poll_step(cx, &self.reader, &mut self.plan, self.direct, &mut self.ready, &mut self.stats)
                }
                Dest::Cuda(s) => {
                    s.poll_step(cx, &self.reader, &mut self.plan, self.direct, &mut self.ready, &mut self.stats)
                }
                Dest::Devices(s) => {
                    s.poll_step(cx, &self.reader, &mut self.plan, self.direct, &mut self.ready, &mut self.stats)
                }
                Dest::Mapped => Poll::Ready(Ok(Step::Done)),
            };
            match step {
                Poll::Pending => {
                    self.waiting_since.get_or_insert_with(Instant::now);
                    self.steps = 0;
                    return Poll::Pending;
                }
                Poll::Ready(Ok(Step::Progress { bytes, read })) => {
                    if let (true, Some(t0)) = (read, self.waiting_since.take()) {
                        self.read_wait += t0.elapsed();
                    }
                    self.waiting_since = None;
                    if bytes > 0 {
                        self.done_bytes += bytes;
                        if let Some(p) = &self.progress {
                            p(Progress { done: self.done_bytes, total: self.total_bytes });
                        }
                    }
                    self.steps += 1;
                    if self.steps >= STEPS_PER_TURN {
                        // Woken at once: the executor runs its other tasks, then this one.
                        self.steps = 0;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                }
                // Every read landed before planning ended: its end wakes the stream.
                Poll::Ready(Ok(Step::Done)) if self.planning.is_some() => return Poll::Pending,
                Poll::Ready(Ok(Step::Done)) => self.finish(),
                Poll::Ready(Err(e)) => self.failed = Some(e),
            }
        }
    }

    fn finish(&mut self) {
        self.finished = true;
        self.stats.wall = self.started.elapsed();
        self.stats.read_wait = self.read_wait;
        match &mut self.dest {
            Dest::Cuda(s) => {
                self.stats.copy = s.sink.copy_time();
                self.stats.verified_bytes = s.sink.verified_bytes();
                (self.stats.page_cache_dma_bytes, self.stats.page_cache_dma_refused) = s.sink.page_cache_dma();
                self.stats.spare_staging_chunks = s.sink.spares;
            }
            Dest::Devices(s) => {
                self.stats.copy = s.sink.copy_time();
                self.stats.spare_staging_chunks = s.sink.spares();
            }
            Dest::Host(s) => {
                (self.stats.prefaulted_bytes, self.stats.prefault_failure) = s.sink.finish_prefault();
                self.stats.copied_bytes = s.sink.copied_bytes();
                if self.stats.fill_by_copy_refused.is_none() {
                    self.stats.fill_by_copy_refused = s.sink.fill_stopped();
                }
                self.stats.verified_bytes = s.sink.verified_bytes();
            }
            Dest::Mapped => {}
        }
    }

    /// Statistics so far (complete once `next` has returned `None`).
    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }

    /// For a load onto several devices, the bytes each device's tensors take as stored (in
    /// the order of the loader's devices); empty for a load onto one.
    pub(crate) fn device_bytes(&self) -> &[u64] {
        &self.device_bytes
    }

    /// The plan being loaded; for a load onto several devices, the plan of what is read
    /// (each tensor narrowed to the slice that holds every device's part). A load that starts before planning ends (see
    /// [`LoaderBuilder::read_while_planning`](crate::LoaderBuilder::read_while_planning))
    /// has, until the plan stands (before its first tensor), a plan of its shards alone: no
    /// tensors, metadata or index metadata. The same type as [`Loader::plan`](crate::Loader::plan)'s
    /// (a [`Checkpoint`] is its [`LoadPlan`] and the shards it holds open).
    pub fn plan(&self) -> &Checkpoint {
        &self.plan
    }
}

/// What one scheduling step did.
enum Step {
    /// Bytes reached their destination (0 when only reads were issued); `read` when a read
    /// completed (rather than background work).
    Progress { bytes: u64, read: bool },
    /// Every read landed and every copy completed.
    Done,
}

impl futures_core::Stream for TensorStream {
    type Item = Result<Tensor, LoadError>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_tensor(cx)
    }
}

impl<S: Sink> Scheduler<S> {
    fn new(sink: S, reads: Vec<Read>, plan: &LoadPlan, cfg: &Config, started: Instant, fresh: bool) -> Self {
        let mut reads_left = vec![0; plan.shards().len()];
        for r in &reads {
            reads_left[r.shard] += 1;
        }
        Scheduler {
            sink,
            reads,
            next: 0,
            in_flight: VecDeque::new(),
            files: vec![None; plan.shards().len()],
            reads_left,
            queue_depth: cfg.queue_depth as usize,
            budget: cfg.staging_budget.max(cfg.chunk_size) as u64,
            in_flight_bytes: 0,
            open: 0,
            window: read_window(cfg),
            held_by_sink: Vec::new(),
            started,
            fresh,
            validated: None,
            unvalidated: 0,
        }
    }

    /// Shard `i` was validated, with `hash`; true when it was the last one to be.
    fn validate(&mut self, i: usize, hash: u64) -> bool {
        if let Some(slot) = self.validated.as_mut().and_then(|v| v.get_mut(i)) {
            if slot.replace(hash).is_none() {
                self.unvalidated -= 1;
                return self.unvalidated == 0;
            }
        }
        false
    }

    /// Drops the reads not yet issued of the shards that `keep` rejects (shards with no
    /// tensors, read before the plan said so), closing those left with none in flight.
    /// Returns the bytes dropped.
    fn drop_reads(&mut self, keep: &[bool]) -> u64 {
        let tail = self.reads.split_off(self.next);
        let mut dropped = 0;
        for r in tail {
            if keep.get(r.shard).copied().unwrap_or(true) {
                self.reads.push(r);
            } else {
                dropped += r.len as u64;
                self.reads_left[r.shard] -= 1;
                if self.reads_left[r.shard] == 0 {
                    self.close(r.shard);
                }
            }
        }
        dropped
    }

    /// Closes shard `i` for this scheduler: it leaves the open count now, or, while the sink
    /// still holds it open for reads it took, once the sink lets it go.
    fn close(&mut self, i: usize) {
        if self.files[i].take().is_some() {
            if self.sink.holds(i) {
                self.held_by_sink.push(i);
            } else {
                self.open -= 1;
            }
        }
    }

    /// Takes back the open count of the shards the sink has let go.
    fn release_held(&mut self) {
        let before = self.held_by_sink.len();
        let sink = &self.sink;
        self.held_by_sink.retain(|&i| sink.holds(i));
        self.open -= before - self.held_by_sink.len();
    }

    /// A read (or a read the sink took) was issued: when the first was, and the most bytes in
    /// flight.
    fn issued(&mut self, stats: &mut LoadStats) {
        if self.next == 0 {
            stats.first_read = Some(self.started.elapsed());
        }
        let in_flight = self.in_flight_bytes + self.sink.taken_bytes();
        stats.max_in_flight_bytes = stats.max_in_flight_bytes.max(in_flight);
    }

    /// Issues reads while the queue depth, the budget and the sink's buffers allow,
    /// opening each shard when its first read is issued.
    fn fill(
        &mut self,
        cx: &mut Context<'_>,
        reader: &Reader,
        plan: &mut Checkpoint,
        direct: DirectIo,
        stats: &mut LoadStats,
    ) -> Result<(), LoadError> {
        self.release_held();
        while self.in_flight.len() < self.queue_depth {
            let Some(read) = self.reads.get(self.next).copied() else { break };
            if self.in_flight_bytes + read.len as u64 > self.budget {
                break;
            }
            let file = match &self.files[read.shard] {
                Some(f) => f.clone(),
                // A new shard waits until one of the window closes.
                None if self.open >= self.window => break,
                None => {
                    let check = match &self.validated {
                        // Planning goes on: a shard is read once its header is validated.
                        Some(v) => match v.get(read.shard).copied().flatten() {
                            Some(hash) => tensorlift_io::HeaderCheck::Fresh(hash),
                            None => break,
                        },
                        None => crate::open::header_check(plan, read.shard, self.fresh),
                    };
                    let f = crate::open::open_shard(reader, plan, read.shard, direct, check, stats)?;
                    self.files[read.shard] = Some(f.clone());
                    self.open += 1;
                    f
                }
            };
            // (Holding no buffer, the load must not wait for one on other loads alone.)
            let idle = self.in_flight.is_empty() && !self.sink.busy();
            match self.sink.serve(plan, &read, &file, idle, cx) {
                Serve::Read => {}
                Serve::Later => break,
                Serve::Taken => {
                    // The sink moves the bytes itself, and checks the file once they have
                    // moved: the shard closes here if this was its last read.
                    self.issued(stats);
                    stats.bytes_read += read.len as u64;
                    self.next += 1;
                    self.reads_left[read.shard] -= 1;
                    if self.reads_left[read.shard] == 0 {
                        self.close(read.shard);
                    }
                    continue;
                }
            }
            let Some(buf) = self.sink.buffer(plan, &read, idle, cx)? else { break };
            let fut = file.read(reader, read.file_offset, buf, read.len);
            self.in_flight_bytes += read.len as u64;
            self.issued(stats);
            self.in_flight.push_back(InFlight { read: self.next, fut });
            self.next += 1;
        }
        Ok(())
    }

    /// Issues what it can, then waits for one event: a read landing or background work
    /// (device copies) completing.
    fn poll_step(
        &mut self,
        cx: &mut Context<'_>,
        reader: &Reader,
        plan: &mut Checkpoint,
        direct: DirectIo,
        ready: &mut VecDeque<Tensor>,
        stats: &mut LoadStats,
    ) -> Poll<Result<Step, LoadError>> {
        if let Err(e) = self.fill(cx, reader, plan, direct, stats) {
            return Poll::Ready(Err(e));
        }
        if self.in_flight.is_empty() && !self.sink.busy() {
            if self.next < self.reads.len() {
                // Nothing of ours in flight, and no buffer free: other loads of the same
                // loader hold the staging memory, and the sink wakes us when a chunk is back.
                return Poll::Pending;
            }
            return Poll::Ready(Ok(Step::Done));
        }
        if self.sink.busy() {
            if let Poll::Ready(r) = self.sink.poll_progress(cx, plan, ready) {
                return Poll::Ready(r.map(|bytes| Step::Progress { bytes, read: false }));
            }
        }
        let Some(f) = self.in_flight.front_mut() else { return Poll::Pending };
        let Poll::Ready(result) = Pin::new(&mut f.fut).poll(cx) else { return Poll::Pending };
        let Some(f) = self.in_flight.pop_front() else { return Poll::Pending };
        let read = self.reads[f.read];
        self.in_flight_bytes -= read.len as u64;
        // Each read, once landed, before any tensor it completes is handed out (tensors go
        // out as their chunks land, not when the shard is done): the file must be seen to be
        // the one that was planned, unchanged, so that no tensor of a shard rewritten while
        // it was read is handed out. (One fstat a chunk.) The shard's last read closes it.
        self.reads_left[read.shard] -= 1;
        if let Some(file) = self.files[read.shard].clone() {
            if self.reads_left[read.shard] == 0 {
                self.close(read.shard);
            }
            if let Err(e) = crate::open::still_as_planned(plan.plan(), read.shard, &file) {
                return Poll::Ready(Err(e));
            }
        }
        match result {
            Ok(buf) => {
                stats.bytes_read += read.len as u64;
                let bytes = match self.sink.landed(plan, &read, buf, ready) {
                    Ok(b) => b,
                    Err(e) => return Poll::Ready(Err(e)),
                };
                Poll::Ready(Ok(Step::Progress { bytes, read: true }))
            }
            Err(failed) => Poll::Ready(Err(read_error(plan, &read, failed.error))),
        }
    }

    /// Waits for every read in flight (their buffers go back), then for the sink's work.
    fn poll_abort(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.next = self.reads.len();
        while let Some(f) = self.in_flight.front_mut() {
            if Pin::new(&mut f.fut).poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.in_flight.pop_front();
        }
        self.files.iter_mut().for_each(|f| *f = None);
        self.held_by_sink.clear();
        self.open = 0;
        self.sink.abort();
        Poll::Ready(())
    }
}

/// Each tensor costs a few small allocations (its name, shape, the model's index), on each
/// of `copies` devices: whether their total can be had, checked before they are made, since
/// each alone would abort.
fn tensors_fit(plan: &LoadPlan, copies: usize) -> Result<(), LoadError> {
    let per_tensor = (plan.tensors().len() as u64).saturating_mul(copies as u64).saturating_mul(TENSOR_OVERHEAD);
    if !tensorlift_io::can_allocate(per_tensor) {
        return Err(LoadError::OutOfMemory { file: plan_file(plan), bytes: per_tensor });
    }
    Ok(())
}

/// The plan's part of a load's statistics: its bytes, and the shards `spans` read.
fn plan_stats(stats: &mut LoadStats, plan: &LoadPlan, spans: &[Span]) {
    let mut shards: Vec<usize> = spans.iter().map(|s| s.shard).collect();
    shards.dedup();
    stats.bytes = plan.total_bytes();
    stats.checkpoint_bytes = plan.checkpoint_bytes();
    stats.shards = shards.len();
}

/// By shard, whether its reads may fill new host memory by copying its cached pages in
/// ([`Config::fill_by_copy`]): a local file all but wholly cached (99%; a page not cached
/// would be read by a fault of its own, where a buffered read reads ahead), which
/// [`crate::open::open_shard`] then opens buffered. Empty when the load allows none.
fn copy_shards(plan: &Checkpoint, cfg: &Config) -> Vec<bool> {
    if !cfg.fill_by_copy || cfg.huge_pages == crate::HugePages::Always || cfg.direct == crate::DirectIo::Always {
        return Vec::new();
    }
    (0..plan.shards().len())
        .map(|i| {
            plan.shard_file(i).is_some_and(|f| tensorlift_io::cache::resident_estimate(f).is_ok_and(|r| r >= 0.99))
        })
        .collect()
}

/// Shards a load reads at once: a quarter of the open-file bound, since each shard read can
/// hold two descriptors (O_DIRECT), and planning may hold up to half of the bound until the
/// load takes them.
fn read_window(cfg: &Config) -> usize {
    (cfg.limits.open_files_bound() / 4).max(1)
}

/// The load's reads ([`layout::reads`]): a list the memory for which cannot be had (a
/// header claiming exabytes) is [`LoadError::OutOfMemory`], before anything else is
/// allocated for the data. A large one is first held to the memory the process can fill:
/// where memory is overcommitted its allocation succeeds, and filling it would get the
/// process killed.
fn read_list(plan: &Checkpoint, spans: &[Span], cfg: &Config) -> Result<Vec<Read>, LoadError> {
    let out_of_memory = |bytes| LoadError::OutOfMemory { file: plan.root().to_path_buf(), bytes };
    let bytes = layout::reads_bytes(spans, cfg.chunk_size);
    // (64 MiB: the list of 14 TB read in chunks of 8 MiB. The list is built from lists by
    // shard: twice its size at its peak.)
    if bytes >= 64 << 20 && tensorlift_io::host_memory_available().is_some_and(|a| bytes.saturating_mul(2) > a) {
        return Err(out_of_memory(bytes));
    }
    layout::reads(spans, cfg.chunk_size, read_window(cfg)).map_err(out_of_memory)
}
