//! The CUDA destination: reads land in pinned chunks, which are copied to the device on
//! several streams while the next chunks are read.
//!
//! Every tensor of the load gets a 256-byte aligned place in one device allocation
//! ([`layout::device_layout`]), checked against the device's free memory before a byte is
//! read. A filled chunk's bytes go to their places as asynchronous copies followed by an
//! event; the chunk returns to the pinned pool only once that event has completed, and a
//! tensor is yielded only once every copy into it has completed. The device allocation is
//! freed when the last tensor that refers to it drops.
//!
//! A load that converts dtypes ([`crate::LoaderBuilder::convert_to`]) copies the bytes of
//! each tensor to convert into a scratch allocation instead, and once they are all there,
//! a kernel (`kernels/convert.cu`) writes the converted tensor into its place; the tensor is
//! yielded when that kernel has completed. The scratch allocation, the size of the
//! converted tensors as stored, lives until the load ends.
//!
//! A verified load ([`crate::LoaderBuilder::verify`]) hashes each shard's pinned chunks in
//! file order before it copies them ([`crate::hashing`]), and holds the shard's tensors
//! until its whole file checked out.
//!
//! A shard in the page cache is not read into staging: the sink takes each of its reads
//! ([`Sink::serve`]) and hands it to registering threads, which map the read's range of the
//! file read-only and register it with CUDA read-only (pinning its pages, while earlier
//! ranges copy); the copies then read the page cache by DMA, and the range is unpinned once
//! they have completed ([`crate::LoaderBuilder::page_cache_dma`]). Where a registration is
//! refused, that thread reads the range into a pinned chunk instead, and the sink takes no
//! more reads (those already taken still try to register). After each range's copies, the
//! file is checked to be the one planned, unchanged, as the scheduler checks a shard after
//! each read, before the tensors the range completes go out.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tensorlift_cuda::{
    CopyEngine, CudaError, DeviceArena, Gpu, KernelType, Kernels, PageCacheRange, PinnedChunk, PinnedPool,
};
use tensorlift_format::{Dtype, LoadPlan};
use tensorlift_io::{DmaWindow, IoError, OpenFile};

use crate::config::Config;
use crate::digest::{DigestSource, Sha256};
use crate::error::{plan_file, read_error};
use crate::hashing::{Check, Hashed, Hashers, Landed};
use crate::layout::{self, chunks_to_wait_for, completed_by, Place, Read, Span};
use crate::open::ShardIo;
use crate::sink::{Serve, Sink};
use crate::{Device, LoadError, Tensor};

/// A CUDA device chosen by a loader, with its staging memory.
#[derive(Debug)]
pub(crate) struct CudaTarget {
    pub gpu: Gpu,
    pub pool: Arc<PinnedPool>,
    pub streams: usize,
    /// The device's kernels, loaded when the loader converts dtypes.
    pub kernels: Option<Arc<Kernels>>,
}

/// A completion's tag: a chunk's copies (`span << 32 | index`), or with this bit, the
/// conversion of tensor `tag & !CONVERTED`.
const CONVERTED: u64 = 1 << 63;

/// The kernel type of a dtype the kernels convert.
fn kernel_type(d: Dtype) -> Option<KernelType> {
    Some(match d {
        Dtype::BF16 => KernelType::BF16,
        Dtype::F16 => KernelType::F16,
        Dtype::F32 => KernelType::F32,
        Dtype::F8_E4M3 => KernelType::F8E4M3,
        Dtype::F8_E5M2 => KernelType::F8E5M2,
        _ => return None,
    })
}

/// A chunk's tag and how its copies went.
type Copied = (u64, Result<(), CudaError>);

/// Copies that finished, reported by the copy engine's completion thread, ranges the
/// registering threads are done with, and the waker of the load waiting for either.
#[derive(Default)]
struct Completions {
    state: Mutex<Done>,
}

#[derive(Default)]
struct Done {
    copied: VecDeque<Copied>,
    registered: VecDeque<Registered>,
    waker: Option<Waker>,
}

impl Completions {
    fn push(&self, tag: u64, result: Result<(), CudaError>) {
        self.wake_with(|d| d.copied.push_back((tag, result)));
    }

    fn push_registered(&self, r: Registered) {
        self.wake_with(|d| d.registered.push_back(r));
    }

    fn wake_with(&self, add: impl FnOnce(&mut Done)) {
        // A poisoned lock (a panic while it was held: a bug) still takes the news: the load
        // waits for it.
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        add(&mut s);
        let waker = s.waker.take();
        drop(s);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// What a registering thread did with a read the sink took.
struct Registered {
    read: Read,
    outcome: Outcome,
}

enum Outcome {
    /// Its range of the file, pinned in the page cache for the device to read; with the
    /// pool chunk that stands for it in the staging budget.
    Dma { range: PageCacheRange, token: PinnedChunk },
    /// The driver would not register it (why): the range was read into its chunk instead.
    Staged { chunk: PinnedChunk, refused: String },
    /// Neither could be done: the read failed, or the load was dropped meanwhile.
    Failed(IoError),
}

/// Where a read the sink took is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// With the registering threads: it stands for a read in flight, as a read into staging
    /// does until it lands.
    Registering,
    /// Its copies read the page cache.
    Dma,
    /// Its copies read the chunk it was read into.
    Staged,
}

/// A read the sink took: the file it is of (kept open), until its copies have completed and
/// the file has been checked.
struct Taken {
    shard: usize,
    file: Arc<OpenFile>,
    len: u64,
    stage: Stage,
}

/// Copying shards in the page cache straight from it (see the module's docs).
struct PageCacheDma {
    registrar: Option<Registrar>,
    /// The reads taken whose copies have not completed, by tag.
    taken: HashMap<u64, Taken>,
    /// Bytes whose copies read the page cache.
    bytes: u64,
    /// Why reads are no longer taken: the first registration the driver refused, or no
    /// registering thread could be started.
    refused: Option<String>,
}

/// A read for the registering threads: its range of the file mapped, and a pool chunk.
struct Job {
    read: Read,
    file: Arc<OpenFile>,
    window: DmaWindow,
    token: PinnedChunk,
}

/// Threads that register the ranges of the reads the sink takes: pinning pages costs the
/// driver time on the CPU, which they spend while earlier ranges copy. Dropping it stops
/// them and waits for them: each finishes the job in hand (one registration of pages that
/// were resident, or one read of them), answers the jobs still queued as failed, and ends.
struct Registrar {
    jobs: Option<mpsc::Sender<Job>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Registrar {
    /// Registering threads: a quarter of the CPUs, one to four (a guess until a GPU host
    /// has measured it). `None` when no thread can be had.
    fn start(gpu: &Gpu, done: &Arc<Completions>) -> Option<Registrar> {
        let n = crate::config::cpus().map_or(1, |n| n / 4).clamp(1, 4);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for _ in 0..n {
            let (rx, gpu, done, stop) = (Arc::clone(&rx), gpu.clone(), Arc::clone(done), Arc::clone(&stop));
            let spawned = std::thread::Builder::new().name("tensorlift-register".into()).spawn(move || loop {
                let job = match rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                let Ok(job) = job else { return };
                let (read, gone) = (job.read, gone(&job));
                // A panic (a bug) must not lose the job: the load waits for every one.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| register(&gpu, &stop, job)));
                let outcome = r.unwrap_or(Outcome::Failed(gone));
                done.push_registered(Registered { read, outcome });
            });
            threads.extend(spawned);
        }
        (!threads.is_empty()).then_some(Registrar { jobs: Some(tx), stop, threads })
    }
}

impl Drop for Registrar {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.jobs.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The error of a job that was never done: its load went first.
fn gone(job: &Job) -> IoError {
    IoError::WorkerGone { file: job.file.path().to_path_buf(), offset: job.read.file_offset, len: job.read.len as u64 }
}

/// Pins `job`'s range of its file for `gpu`, or, where the driver refuses, reads it into
/// the job's chunk.
fn register(gpu: &Gpu, stop: &AtomicBool, job: Job) -> Outcome {
    if stop.load(Ordering::Relaxed) {
        return Outcome::Failed(gone(&job));
    }
    let Job { read, file, window, token } = job;
    let refused = match PageCacheRange::register(gpu, window) {
        Ok(range) => return Outcome::Dma { range, token },
        Err(why) => why.to_string(),
    };
    let mut chunk = token;
    let capacity = chunk.as_slice().len();
    let Some(dst) = chunk.as_mut_slice().get_mut(..read.len) else {
        let file = file.path().to_path_buf();
        return Outcome::Failed(IoError::BufferTooSmall { file, buf_offset: 0, len: read.len, capacity });
    };
    use std::os::unix::fs::FileExt;
    match file.file().read_exact_at(dst, read.file_offset) {
        Ok(()) => Outcome::Staged { chunk, refused },
        Err(source) => Outcome::Failed(IoError::Read {
            file: file.path().to_path_buf(),
            offset: read.file_offset,
            len: read.len as u64,
            source,
        }),
    }
}

pub(crate) struct CudaSink {
    device: Device,
    spans: Vec<Span>,
    /// The allocations tensors land in: the load's own first, then the caller's, then the
    /// scratch allocation of a converting load.
    targets: Vec<Arc<DeviceArena>>,
    /// Each tensor's final place: (target, offset).
    places: Vec<Option<(usize, u64)>>,
    /// Each tensor's claim on caller memory, for tensors the caller placed.
    claims: Vec<Option<Arc<crate::place::DeviceClaim>>>,
    /// For a converting load: each tensor's conversion, and where its stored bytes land.
    conversion: Option<Conversion>,
    pool: Arc<PinnedPool>,
    engine: Option<CopyEngine>,
    done: Arc<Completions>,
    /// Chunks whose copies are still to complete, for each tensor of each span.
    remaining: Vec<Vec<usize>>,
    pending: usize,
    /// Spare staging chunks taken (see `buffer`).
    pub(crate) spares: usize,
    chunk: usize,
    first_copy: Option<Instant>,
    last_done: Option<Instant>,
    /// For a verified load.
    verify: Option<Verifying>,
    gpu: Gpu,
    /// Copies straight from the page cache, unless the loader turned them off or verifies.
    dma: Option<PageCacheDma>,
}

/// What a chunk's copies read.
enum Source {
    Chunk(Arc<PinnedChunk>),
    /// A range of the page cache, and the pool chunk that stands for it in the staging
    /// budget until its copies complete.
    PageCache(PageCacheRange, PinnedChunk),
}

/// A verified load's shards: hashed in their pinned chunks before the copies, and their
/// tensors held until their whole file checked out.
struct Verifying {
    hashers: Hashers<Staged>,
    /// Each span's check, until it checked out (`None` for a span not verified).
    checks: Vec<Option<Check>>,
    /// Each tensor's span.
    span_of: Vec<usize>,
    verified_bytes: u64,
}

/// A landed pinned chunk, waiting to be hashed before its copies.
struct Staged {
    read: Read,
    chunk: PinnedChunk,
}

impl Landed for Staged {
    fn bytes(&self) -> &[u8] {
        self.chunk.as_slice().get(..self.read.len).unwrap_or_default()
    }
}

/// The conversions of one load.
struct Conversion {
    kernels: Arc<Kernels>,
    to: Dtype,
    /// Each tensor's (from, to) kernel types, for the tensors converted.
    kinds: Vec<Option<(KernelType, KernelType)>>,
    /// Where converted tensors' stored bytes land in the scratch allocation (a target).
    raw: Vec<Option<u64>>,
    scratch: usize,
}

impl CudaSink {
    #[allow(clippy::too_many_arguments)] // The load's parts, each used once here.
    pub(crate) fn new(
        cuda: &CudaTarget,
        plan: &LoadPlan,
        spans: Vec<Span>,
        dests: Vec<Option<crate::place::Resolved>>,
        cfg: &Config,
        reads: &[Read],
        checks: Option<Vec<Option<(Sha256, DigestSource)>>>,
        ready: &mut VecDeque<Tensor>,
    ) -> Result<CudaSink, LoadError> {
        let device = Device::Cuda(cuda.gpu.ordinal());
        let cuda_err = |source: CudaError| LoadError::Cuda { file: plan_file(plan), source };
        // Which tensors a kernel converts, and to what.
        let to = cfg.convert_to.and_then(|to| Some((to, kernel_type(to)?)));
        let kinds: Vec<Option<(KernelType, KernelType)>> = plan
            .tensors()
            .iter()
            .map(|t| match (to, kernel_type(t.dtype)) {
                (Some((to, kt)), Some(kf)) if t.dtype != to => Some((kf, kt)),
                _ => None,
            })
            .collect();
        // Tensors the caller placed take no room in the load's own allocation.
        let mut targets: Vec<Arc<DeviceArena>> = Vec::new();
        let mut caller: Vec<Option<(usize, u64)>> = vec![None; plan.tensors().len()];
        let mut claims = vec![None; plan.tensors().len()];
        for (i, d) in dests.into_iter().enumerate() {
            if let Some(crate::place::Resolved::Device { arena, offset, claim }) = d {
                let k = match targets.iter().position(|a| Arc::ptr_eq(a, &arena)) {
                    Some(k) => k,
                    None => {
                        targets.push(arena);
                        targets.len() - 1
                    }
                };
                caller[i] = Some((k, offset));
                claims[i] = Some(claim);
            }
        }
        let own = layout::device_layout(plan, &spans, |i| match (caller[i], kinds[i]) {
            (Some(_), _) => Place::No,
            (None, Some(_)) => Place::Packed(crate::place::loaded_as(&plan.tensors()[i], cfg.convert_to).1),
            (None, None) => Place::AsLoaded,
        });
        let raw = layout::device_layout(plan, &spans, |i| if kinds[i].is_some() { Place::AsLoaded } else { Place::No });
        // Before a byte is read: does the device have room for the whole load? (A layout
        // past a u64, sized by the files, needs more than any device has.)
        let (free, _) = cuda.gpu.memory_info().map_err(cuda_err)?;
        let sized = own.zip(raw).and_then(|(own, raw)| Some((own.1.checked_add(raw.1)?, own, raw)));
        let needed = sized.as_ref().map_or(u64::MAX, |s| s.0);
        let no_room = || LoadError::DeviceMemory { file: plan_file(plan), device, needed, free };
        let Some((_, (own, total), (raw, scratch_len))) = sized.filter(|s| s.0 <= free) else {
            return Err(no_room());
        };
        let alloc = |len: u64| match DeviceArena::new(&cuda.gpu, len as usize) {
            Ok(a) => Ok(Arc::new(a)),
            Err(CudaError::OutOfMemory { .. }) => Err(no_room()),
            Err(e) => Err(cuda_err(e)),
        };
        // The load's own allocation is target 0, the caller's after it, the scratch one last.
        targets.insert(0, alloc(total)?);
        let places: Vec<Option<(usize, u64)>> =
            own.iter().zip(&caller).map(|(o, c)| c.map(|(k, off)| (k + 1, off)).or(o.map(|off| (0, off)))).collect();
        let conversion = match (to, &cuda.kernels) {
            (Some((to, _)), Some(kernels)) if kinds.iter().any(Option::is_some) => {
                targets.push(alloc(scratch_len)?);
                Some(Conversion { kernels: Arc::clone(kernels), to, kinds, raw, scratch: targets.len() - 1 })
            }
            _ => None,
        };
        let mut sink = CudaSink {
            device,
            spans: Vec::new(),
            targets,
            places,
            claims,
            conversion,
            pool: Arc::clone(&cuda.pool),
            engine: None,
            done: Arc::new(Completions::default()),
            remaining: Vec::new(),
            pending: 0,
            spares: 0,
            chunk: cfg.chunk_size,
            first_copy: None,
            last_done: None,
            verify: None,
            gpu: cuda.gpu.clone(),
            dma: (cfg.page_cache_dma && checks.is_none()).then(|| PageCacheDma {
                registrar: None,
                taken: HashMap::new(),
                bytes: 0,
                refused: tensorlift_cuda::page_cache_dma_refused(&cuda.gpu),
            }),
        };
        if let Some(checks) = checks {
            let (checks, hashers) = crate::hashing::verify_spans(plan, &spans, reads, &checks, true);
            let mut span_of = vec![usize::MAX; plan.tensors().len()];
            for (k, span) in spans.iter().enumerate() {
                span.tensors.iter().for_each(|&t| span_of[t] = k);
            }
            sink.verify = Some(Verifying { hashers, checks, span_of, verified_bytes: 0 });
        }
        // Tensors with no bytes wait for nothing (and need no kernel: an empty tensor's
        // conversion is its new dtype).
        let mut now = Vec::new();
        sink.remaining = spans.iter().map(|span| chunks_to_wait_for(plan, span, sink.chunk, |t| now.push(t))).collect();
        for t in now {
            let tensor = sink.make(plan, t, true);
            sink.emit(t, tensor, ready);
        }
        sink.spans = spans;
        let d = Arc::clone(&sink.done);
        let engine = CopyEngine::with_completion(&cuda.gpu, cuda.streams, Box::new(move |tag, r| d.push(tag, r)))
            .map_err(cuda_err)?;
        sink.engine = Some(engine);
        Ok(sink)
    }

    /// Tensor `t` in its final place: as loaded, or, when `converted` (its kernel has
    /// completed, or it has no bytes), in its new dtype.
    fn make(&self, plan: &LoadPlan, t: usize, converted: bool) -> Tensor {
        let pt = &plan.tensors()[t];
        let (target, offset) = self.places[t].unwrap_or((0, 0));
        let to = self.conversion.as_ref().filter(|c| converted && c.kinds[t].is_some()).map(|c| c.to);
        let (dtype, len) = crate::place::loaded_as(pt, to);
        Tensor::device(&pt.name, dtype, &pt.shape, Arc::clone(&self.targets[target]), offset, len as usize)
            .with_device_claim(self.claims[t].clone())
    }

    /// Where tensor `t`'s stored bytes are copied: the scratch allocation for a tensor to
    /// convert, else its final place.
    fn copy_place(&self, t: usize) -> Option<(usize, u64)> {
        match &self.conversion {
            Some(c) if c.kinds[t].is_some() => c.raw[t].map(|r| (c.scratch, r)),
            _ => self.places[t],
        }
    }

    /// From the first copy queued to the last one completed.
    pub(crate) fn copy_time(&self) -> Duration {
        match self.copy_window() {
            (Some(a), Some(b)) => b.saturating_duration_since(a),
            _ => Duration::ZERO,
        }
    }

    /// When the first copy was queued and the last one completed (`None`: not yet).
    pub(crate) fn copy_window(&self) -> (Option<Instant>, Option<Instant>) {
        (self.first_copy, self.last_done)
    }

    /// Hands tensor `t` out, or holds it while its shard is being verified.
    fn emit(&mut self, t: usize, tensor: Tensor, ready: &mut VecDeque<Tensor>) {
        let check = self.verify.as_mut().and_then(|v| v.checks.get_mut(*v.span_of.get(t)?)?.as_mut());
        match check {
            Some(c) => c.held.push(tensor),
            None => ready.push_back(tensor),
        }
    }

    /// Bytes of shard files whose digest checked out so far.
    pub(crate) fn verified_bytes(&self) -> u64 {
        self.verify.as_ref().map_or(0, |v| v.verified_bytes)
    }

    /// Bytes copied straight from the page cache, and why that stopped, if it did.
    pub(crate) fn page_cache_dma(&self) -> (u64, Option<String>) {
        self.dma.as_ref().map_or((0, None), |d| (d.bytes, d.refused.clone()))
    }

    /// A read a registering thread is done with: its copies are queued, or its error is the
    /// load's.
    fn registered(&mut self, plan: &LoadPlan, Registered { read, outcome }: Registered) -> Result<(), LoadError> {
        let taken = self.dma.as_mut().and_then(|d| d.taken.get_mut(&Self::tag(&read)));
        match outcome {
            Outcome::Dma { range, token } => {
                if let Some(t) = taken {
                    t.stage = Stage::Dma;
                }
                self.copy_from(plan, &read, Source::PageCache(range, token))
            }
            Outcome::Staged { chunk, refused } => {
                if let Some(t) = taken {
                    t.stage = Stage::Staged;
                }
                // No more reads are taken.
                if let Some(d) = self.dma.as_mut() {
                    d.refused.get_or_insert(refused);
                }
                self.copy_from(plan, &read, Source::Chunk(Arc::new(chunk)))
            }
            Outcome::Failed(error) => Err(read_error(plan, &read, error)),
        }
    }

    /// A taken read's copies completed: its bytes are counted, and the file is checked to be
    /// the one planned, unchanged (a write while the device read its pages would not show in
    /// the bytes), before any tensor the read completes goes out: after every read, not only
    /// a shard's last, since tensors go out as their reads complete.
    fn taken_done(&mut self, plan: &LoadPlan, tag: u64) -> Result<(), LoadError> {
        let Some(d) = self.dma.as_mut() else { return Ok(()) };
        let Some(t) = d.taken.remove(&tag) else { return Ok(()) };
        if t.stage == Stage::Dma {
            d.bytes += t.len;
        }
        crate::open::still_as_planned(plan, t.shard, &ShardIo::File(t.file))
    }

    /// Tensor `t`'s bytes have all landed: yields it, or launches its conversion.
    fn converted_or_ready(&mut self, plan: &LoadPlan, t: usize, ready: &mut VecDeque<Tensor>) -> Result<(), LoadError> {
        let launch = self.conversion.as_ref().and_then(|c| Some((c, c.kinds[t]?, c.raw[t]?, self.places[t]?)));
        let (Some((c, kind, raw, (target, place))), Some(engine)) = (launch, self.engine.as_mut()) else {
            let tensor = self.make(plan, t, false);
            self.emit(t, tensor, ready);
            return Ok(());
        };
        let pt = &plan.tensors()[t];
        let n = (pt.len() / kind.0.width() as u64) as usize;
        let tag = CONVERTED | t as u64;
        let (src, dst) = (&self.targets[c.scratch], &self.targets[target]);
        let launched = engine.convert_tagged(&c.kernels, kind, (src, raw as usize), (dst, place as usize), n, tag);
        match launched {
            Ok(()) => {
                self.pending += 1;
                Ok(())
            }
            Err(source) => Err(LoadError::Convert {
                file: plan.shards()[pt.shard].path.clone(),
                tensor: pt.name.clone(),
                to: c.to,
                source: source.into(),
            }),
        }
    }

    /// Queues the copies of a landed chunk's bytes to their places. Other devices' sinks
    /// may copy from the same chunk ([`crate::dest_devices`]): it goes back to the pool once
    /// the last of their copies has completed.
    pub(crate) fn copy(&mut self, plan: &LoadPlan, read: &Read, buf: Arc<PinnedChunk>) -> Result<u64, LoadError> {
        self.copy_from(plan, read, Source::Chunk(buf)).map(|()| 0)
    }

    /// Queues the copies of `read`'s bytes, in `source`, to their places.
    fn copy_from(&mut self, plan: &LoadPlan, read: &Read, source: Source) -> Result<(), LoadError> {
        let Some(span) = self.spans.get(read.span) else { return Ok(()) };
        // Tensors to convert go to the scratch allocation, the others to their places; the
        // pieces are grouped by allocation.
        let mut by_target: Vec<Vec<tensorlift_cuda::Piece>> = vec![Vec::new(); self.targets.len()];
        for (target, p) in layout::pieces(plan, span, |t| self.copy_place(t), read) {
            by_target[target].push(tensorlift_cuda::Piece {
                src_offset: p.src,
                dst_offset: p.dst as usize,
                len: p.len,
                rows: p.rows,
                src_pitch: p.src_pitch,
                dst_pitch: p.dst_pitch as usize,
            });
        }
        let targets: Vec<(&Arc<DeviceArena>, &[tensorlift_cuda::Piece])> =
            self.targets.iter().zip(&by_target).filter(|(_, p)| !p.is_empty()).map(|(a, p)| (a, &p[..])).collect();
        let Some(engine) = self.engine.as_mut() else { return Ok(()) };
        self.first_copy.get_or_insert_with(Instant::now);
        let tag = Self::tag(read);
        let copied = match source {
            Source::Chunk(buf) => engine.copy_shared(buf, &targets, tag),
            Source::PageCache(range, token) => engine.copy_from_page_cache(range, Box::new(token), &targets, tag),
        };
        match copied {
            Ok(()) => {
                self.pending += 1;
                Ok(())
            }
            Err(e) => Err(self.copy_error(plan, tag, e)),
        }
    }

    fn tag(read: &Read) -> u64 {
        ((read.span as u64) << 32) | read.index as u64
    }

    /// The error of a failed copy, naming the first tensor the chunk holds.
    fn copy_error(&self, plan: &LoadPlan, tag: u64, source: CudaError) -> LoadError {
        if tag & CONVERTED != 0 {
            let pt = plan.tensors().get((tag & !CONVERTED) as usize);
            let tensor = pt.map_or_else(String::new, |t| t.name.clone());
            let file = pt.and_then(|t| plan.shards().get(t.shard)).map_or_else(|| plan_file(plan), |s| s.path.clone());
            let to = self.conversion.as_ref().map_or(Dtype::F32, |c| c.to);
            return LoadError::Convert { file, tensor, to, source: source.into() };
        }
        let (span, index) = ((tag >> 32) as usize, (tag & 0xffff_ffff) as usize);
        let Some(s) = self.spans.get(span) else { return LoadError::Cuda { file: plan_file(plan), source } };
        let start = s.base + (index * self.chunk) as u64;
        let tensor = s
            .tensors
            .iter()
            .map(|&t| &plan.tensors()[t])
            .find(|t| t.file_range.end > start && !t.is_empty())
            .map_or_else(|| "<padding>".to_owned(), |t| t.name.clone());
        LoadError::Copy { file: plan.shards()[s.shard].path.clone(), tensor, device: self.device, source }
    }
}

impl Sink for CudaSink {
    type Buf = PinnedChunk;

    fn buffer(
        &mut self,
        plan: &LoadPlan,
        read: &Read,
        idle: bool,
        cx: &mut Context<'_>,
    ) -> Result<Option<PinnedChunk>, LoadError> {
        // The pool is the loader's: other loads may hold every chunk for now. Waiting is for
        // a chunk of this load's own to come back; one that holds none (its chunks all with
        // others, say a stream not being read on the thread that waits here) takes a spare.
        match self.pool.poll_acquire(cx) {
            Poll::Ready(c) => Ok(Some(c)),
            Poll::Pending if idle => {
                let file = plan.shards()[read.shard].path.clone();
                let spare = self.pool.spare().map_err(|source| LoadError::Cuda { file, source })?;
                self.spares += 1;
                Ok(Some(spare))
            }
            Poll::Pending => Ok(None),
        }
    }

    fn serve(&mut self, _plan: &LoadPlan, read: &Read, file: &ShardIo, idle: bool, cx: &mut Context<'_>) -> Serve {
        // Ranges of shards read buffered that are wholly in the page cache, until the driver
        // refuses a registration.
        let (Some(d), ShardIo::File(file)) = (self.dma.as_mut(), file) else { return Serve::Read };
        if file.is_direct() || d.refused.is_some() || read.len == 0 {
            return Serve::Read;
        }
        let Ok(window) = DmaWindow::map(file, read.file_offset, read.len) else { return Serve::Read };
        if !window.resident().unwrap_or(false) {
            // Reads at depth bring it in faster than faults under a registration would; and
            // where the kernel does not say, staging is the safe guess.
            return Serve::Read;
        }
        // Pinned pages count against the staging budget as a chunk of the pool: the
        // loader's loads together pin at most about twice the budget (ranges are pinned in
        // whole pages).
        let Poll::Ready(token) = self.pool.poll_acquire(cx) else {
            // Read into a spare rather than wait on other loads (see `buffer`).
            return if idle { Serve::Read } else { Serve::Later };
        };
        if d.registrar.is_none() {
            d.registrar = Registrar::start(&self.gpu, &self.done);
            if d.registrar.is_none() {
                d.refused = Some("no thread to register ranges of the page cache could be started".into());
            }
        }
        let Some(jobs) = d.registrar.as_ref().and_then(|r| r.jobs.as_ref()) else { return Serve::Read };
        if jobs.send(Job { read: *read, file: Arc::clone(file), window, token }).is_err() {
            return Serve::Read;
        }
        let taken =
            Taken { shard: read.shard, file: Arc::clone(file), len: read.len as u64, stage: Stage::Registering };
        d.taken.insert(Self::tag(read), taken);
        // Counted until its copies complete.
        self.pending += 1;
        Serve::Taken
    }

    fn holds(&self, shard: usize) -> bool {
        self.dma.as_ref().is_some_and(|d| d.taken.values().any(|t| t.shard == shard))
    }

    fn taken_bytes(&self) -> u64 {
        let registering =
            |d: &PageCacheDma| d.taken.values().filter(|t| t.stage == Stage::Registering).map(|t| t.len).sum();
        self.dma.as_ref().map_or(0, registering)
    }

    fn landed(
        &mut self,
        plan: &LoadPlan,
        read: &Read,
        buf: PinnedChunk,
        _ready: &mut VecDeque<Tensor>,
    ) -> Result<u64, LoadError> {
        match self.verify.as_mut() {
            // Hashed first; copied when it comes back (poll_progress).
            Some(v) if v.hashers.hashes(read.span) => {
                v.hashers.send(read.span, read.index, Staged { read: *read, chunk: buf });
                Ok(0)
            }
            _ => self.copy(plan, read, Arc::new(buf)),
        }
    }

    fn poll_progress(
        &mut self,
        cx: &mut Context<'_>,
        plan: &LoadPlan,
        ready: &mut VecDeque<Tensor>,
    ) -> Poll<Result<u64, LoadError>> {
        let mut bytes = 0u64;
        let queued = ready.len();
        // Hashed chunks go on to their copies; a shard whose file checked out lets its
        // tensors go (those still copying go when they are done).
        let hashed = self.verify.as_mut().map(|v| v.hashers.poll(cx)).unwrap_or_default();
        let progressed = !hashed.is_empty();
        for done in hashed {
            match done {
                Hashed::Chunk { item, .. } => {
                    if let Err(e) = self.copy(plan, &item.read, Arc::new(item.chunk)) {
                        return Poll::Ready(Err(e));
                    }
                }
                Hashed::Shard { span, digest, header } => {
                    let Some(v) = self.verify.as_mut() else { continue };
                    let (Some(s), Some(check)) = (self.spans.get(span), v.checks.get_mut(span).and_then(Option::take))
                    else {
                        continue;
                    };
                    let shard = &plan.shards()[s.shard];
                    match check.settle(plan.root(), shard, digest, header) {
                        Ok(held) => ready.extend(held),
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                    v.verified_bytes += shard.file_len;
                }
                Hashed::Failed { span } => {
                    let file = self.spans.get(span).map(|s| plan.shards()[s.shard].path.clone()).unwrap_or_default();
                    return Poll::Ready(Err(LoadError::HashingFailed { file }));
                }
            }
        }
        loop {
            // Ranges registered go on to their copies; then copies completed.
            let next = {
                let mut s = self.done.state.lock().unwrap_or_else(|p| p.into_inner());
                match s.registered.pop_front() {
                    Some(r) => Some(Err(r)),
                    None => match s.copied.pop_front() {
                        Some(x) => Some(Ok(x)),
                        None => {
                            if self.pending > 0 && bytes == 0 {
                                s.waker = Some(cx.waker().clone());
                            }
                            None
                        }
                    },
                }
            };
            let (tag, result) = match next {
                None => break,
                Some(Ok(copied)) => copied,
                Some(Err(registered)) => {
                    // The read taken becomes its copies (counted as they are queued).
                    self.pending = self.pending.saturating_sub(1);
                    if let Err(e) = self.registered(plan, registered) {
                        return Poll::Ready(Err(e));
                    }
                    continue;
                }
            };
            self.pending = self.pending.saturating_sub(1);
            self.last_done = Some(Instant::now());
            if let Err(e) = result {
                return Poll::Ready(Err(self.copy_error(plan, tag, e)));
            }
            if tag & CONVERTED != 0 {
                // A conversion completed: its tensor is ready, in its new dtype.
                let t = (tag & !CONVERTED) as usize;
                let tensor = self.make(plan, t, true);
                self.emit(t, tensor, ready);
                continue;
            }
            if let Err(e) = self.taken_done(plan, tag) {
                return Poll::Ready(Err(e));
            }
            let (si, index) = ((tag >> 32) as usize, (tag & 0xffff_ffff) as usize);
            let Some(span) = self.spans.get(si) else { continue };
            bytes += (span.len() - (index * self.chunk) as u64).min(self.chunk as u64);
            for t in completed_by(plan, span, &mut self.remaining[si], index, self.chunk) {
                if let Err(e) = self.converted_or_ready(plan, t, ready) {
                    return Poll::Ready(Err(e));
                }
            }
        }
        // A converted tensor is ready with no bytes to report: it goes out now, not with the
        // next completion.
        if bytes > 0 || progressed || !self.busy() || ready.len() > queued {
            Poll::Ready(Ok(bytes))
        } else {
            Poll::Pending
        }
    }

    fn busy(&self) -> bool {
        self.pending > 0 || self.verify.as_ref().is_some_and(|v| v.hashers.busy())
    }

    fn abort(&mut self) {
        self.shut_down();
        self.pending = 0;
    }
}

impl CudaSink {
    /// Ends the sink's background work: the hashing and registering threads stop (each after
    /// the job in hand) and give their chunks back; the ranges they registered and no copy
    /// took are unpinned; dropping the engine waits for every copy in flight; then chunks are
    /// back in the pool, ranges of the page cache unpinned, and nothing reads or writes the
    /// device allocation any more.
    fn shut_down(&mut self) {
        self.verify.take();
        self.dma.take();
        self.done.state.lock().unwrap_or_else(|p| p.into_inner()).registered.clear();
        self.engine.take();
    }
}

impl Drop for CudaSink {
    fn drop(&mut self) {
        self.shut_down();
    }
}
