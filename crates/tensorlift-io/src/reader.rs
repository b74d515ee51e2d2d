//! The front end: choosing a backend, opening files, issuing reads.

use crate::process::MadeIn;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};

use tokio::sync::oneshot;

use crate::op::{FillTarget, ReadOp, SendPtr};
use crate::pread::{run_to_end, PreadPool};
use crate::probe::{unavailable, unavailable_reason, uring_status, UringStatus};
use crate::uring::UringPool;
use crate::{DirectSupport, IoBufMut, IoError, OpenFile, ReadFailed, ReadResult};

/// An I/O backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendKind {
    /// io_uring rings on worker threads, O_DIRECT where the file system allows.
    Uring,
    /// A pool of threads doing `pread`, O_DIRECT where the file system allows.
    Pread,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Uring => "uring",
            BackendKind::Pread => "pread",
        })
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "uring" | "io_uring" | "io-uring" => Ok(BackendKind::Uring),
            "pread" => Ok(BackendKind::Pread),
            "mmap" => Err("mmap is not an I/O backend: a file truncated under a memory map kills the process \
                 (SIGBUS), so zero-copy mapped views are the library's unsafe opt-in (MapContract); \
                 expected uring or pread"
                .to_owned()),
            other => Err(format!("unknown I/O backend '{other}' (expected uring or pread)")),
        }
    }
}

/// The environment variable that overrides the automatic choice.
pub const IO_ENV: &str = "TENSORLIFT_IO";

/// State of io_uring fixed-buffer registration.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FixedBuffers {
    /// Nothing was registered.
    None,
    /// Regions totalling `bytes` are registered with every ring.
    Registered { regions: usize, bytes: u64 },
    /// Registration was refused; reads go unregistered.
    Refused(String),
}

/// What a reader chose and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoReport {
    /// The backend in use.
    pub backend: BackendKind,
    /// Why this backend (a request, or the fallback reason).
    pub reason: String,
    /// What the io_uring probe found.
    pub uring: UringStatus,
    /// Fixed-buffer registration.
    pub fixed_buffers: FixedBuffers,
}

/// Faults to inject, for testing the fallbacks without a hostile kernel.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Faults {
    /// Pretend io_uring setup failed with this errno.
    pub refuse_uring: Option<i32>,
    /// Pretend every file system refuses O_DIRECT.
    pub refuse_direct: bool,
    /// Cap each system call's read at this many bytes, forcing short reads.
    pub max_read: Option<usize>,
    /// Pretend buffer registration failed with this errno.
    pub refuse_register: Option<i32>,
}

/// Configures a [`Reader`].
#[derive(Debug, Clone)]
pub struct ReaderBuilder {
    backend: Option<BackendKind>,
    queue_depth: u32,
    workers: usize,
    pread_threads: usize,
    direct: bool,
    faults: Faults,
}

impl Default for ReaderBuilder {
    fn default() -> Self {
        ReaderBuilder {
            backend: None,
            queue_depth: 64,
            workers: 2,
            pread_threads: 8,
            direct: true,
            faults: Faults::default(),
        }
    }
}

impl ReaderBuilder {
    /// Forces a backend (otherwise `TENSORLIFT_IO`, else io_uring when available, else pread).
    pub fn backend(mut self, backend: BackendKind) -> Self {
        self.backend = Some(backend);
        self
    }
    /// Reads in flight across all rings (io_uring); default 64.
    pub fn queue_depth(mut self, depth: u32) -> Self {
        self.queue_depth = depth.clamp(1, 4096);
        self
    }
    /// io_uring worker threads, one ring each; default 2.
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers.clamp(1, 64);
        self
    }
    /// pread threads; default 8.
    pub fn pread_threads(mut self, threads: usize) -> Self {
        self.pread_threads = threads.clamp(1, 256);
        self
    }
    /// Whether to use O_DIRECT for aligned ranges; default true.
    pub fn direct(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }
    /// Injects faults (tests of the fallbacks).
    pub fn faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Builds the reader. Never fails: a refused backend falls back, with the reason in
    /// [`Reader::report`].
    pub fn build(self) -> Reader {
        let (requested, why) = match (self.backend, std::env::var(IO_ENV)) {
            (Some(b), _) => (Some(b), format!("{b} requested")),
            (None, Ok(v)) => match v.parse::<BackendKind>() {
                Ok(b) => (Some(b), format!("{IO_ENV}={v}")),
                Err(e) => {
                    tracing::warn!("{IO_ENV}: {e}; choosing automatically");
                    (None, format!("{IO_ENV} ignored ({e})"))
                }
            },
            (None, Err(_)) => (None, String::new()),
        };
        let uring = match self.faults.refuse_uring {
            Some(errno) => unavailable(&std::io::Error::from_raw_os_error(errno)),
            None => uring_status().clone(),
        };
        let join = |a: &str, b: String| if a.is_empty() { b } else { format!("{a}; {b}") };
        let (backend, reason) = match requested {
            Some(BackendKind::Pread) => (pread(self.pread_threads), why),
            Some(BackendKind::Uring) | None => match &uring {
                UringStatus::Available => {
                    let depth = self.queue_depth.div_ceil(self.workers as u32).max(1);
                    match UringPool::new(self.workers, depth) {
                        Ok(pool) => (Backend::Uring(pool), join(&why, "io_uring available".into())),
                        Err(e) => (pread(self.pread_threads), join(&why, format!("pread: {}", unavailable_reason(&e)))),
                    }
                }
                UringStatus::Unavailable { reason, .. } => {
                    (pread(self.pread_threads), join(&why, format!("pread: {reason}")))
                }
            },
        };
        let kind = backend.kind();
        tracing::debug!(backend = %kind, %reason, "I/O backend chosen");
        Reader {
            backend,
            direct: self.direct,
            faults: self.faults,
            report: Mutex::new(IoReport { backend: kind, reason, uring, fixed_buffers: FixedBuffers::None }),
            copiers: OnceLock::new(),
            registered_owners: Mutex::new(Vec::new()),
            fixed_regions: Mutex::new(Vec::new()),
            made: MadeIn::here(),
        }
    }
}

fn pread(threads: usize) -> Backend {
    match PreadPool::new(threads) {
        Ok(p) => Backend::Pread(Some(p)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start pread threads; reading on the caller's thread");
            Backend::Pread(None)
        }
    }
}

#[derive(Debug)]
enum Backend {
    Uring(UringPool),
    /// `None` when no thread could be started: reads run on the caller's thread.
    Pread(Option<PreadPool>),
}

impl Backend {
    fn kind(&self) -> BackendKind {
        match self {
            Backend::Uring(_) => BackendKind::Uring,
            Backend::Pread(_) => BackendKind::Pread,
        }
    }
}

/// Reads byte ranges of files into caller-owned buffers.
///
/// Dropping the reader waits for reads still in flight, so no buffer is freed while the
/// kernel writes into it.
#[derive(Debug)]
pub struct Reader {
    backend: Backend,
    direct: bool,
    faults: Faults,
    report: Mutex<IoReport>,
    /// Threads that fill arenas by copying cached pages in ([`crate::fill`]), one a CPU
    /// (sixteen at most, as io_uring workers), started at the first such read; `None` if
    /// none could be.
    copiers: OnceLock<Option<PreadPool>>,
    /// Owners of memory registered as fixed buffers. Declared after the rings (`backend`)
    /// that registered it, so dropped after them.
    registered_owners: Mutex<Vec<Arc<dyn std::any::Any + Send + Sync>>>,
    /// The regions registered as fixed buffers (address, length), by slot: a buffer whose
    /// [`IoBufMut::fixed_slot`] names a slot is read into as a fixed buffer only where it lies
    /// in that slot's region here (not another reader's, or an earlier registration's).
    fixed_regions: Mutex<Vec<(usize, usize)>>,
    /// The process that built it. A process forked from that one has none of its threads,
    /// and shares its rings with it: there, reads run on the caller's thread.
    made: MadeIn,
}

impl Reader {
    /// A builder with the defaults.
    pub fn builder() -> ReaderBuilder {
        ReaderBuilder::default()
    }

    /// What this reader chose and why.
    pub fn report(&self) -> IoReport {
        self.report.lock().map(|r| r.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The backend in use.
    pub fn backend(&self) -> BackendKind {
        self.backend.kind()
    }

    /// Opens a file for reading, without blocking (a FIFO or device is refused): a buffered
    /// descriptor, plus an O_DIRECT one where the file system allows it.
    pub fn open(&self, path: &Path) -> Result<Arc<OpenFile>, IoError> {
        self.open_with(path, true)
    }

    /// Opens a file, using O_DIRECT only if `direct` is set (and the reader allows it): a
    /// file already in the page cache reads faster buffered.
    pub fn open_with(&self, path: &Path, direct: bool) -> Result<Arc<OpenFile>, IoError> {
        OpenFile::open(path, direct && self.direct, self.faults.refuse_direct).map(Arc::new)
    }

    /// Reads through a descriptor the caller already opened and checked (a shard from
    /// [`Checkpoint::take_checked`](crate::Checkpoint::take_checked)): no path is looked up
    /// again. `path` names it in errors. A descriptor opened with `O_NONBLOCK` is made
    /// blocking (of its open file, which descriptors duplicated from it share): io_uring
    /// refuses a read of a non-blocking file on a file system that cannot read without
    /// waiting.
    pub fn open_file(&self, path: &Path, file: Arc<std::fs::File>, direct: bool) -> Result<Arc<OpenFile>, IoError> {
        OpenFile::from_file(path, file, direct && self.direct, self.faults.refuse_direct).map(Arc::new)
    }

    /// Registers memory regions as io_uring fixed buffers, so that reads into buffers whose
    /// [`IoBufMut::fixed_slot`] names a region skip per-read page pinning. A no-op for other
    /// backends. On failure, reads still work, unregistered, and the report says why.
    ///
    /// # Safety
    ///
    /// Each region must be valid for writes and stay allocated (not freed or unmapped) for as
    /// long as this reader lives.
    pub unsafe fn register_buffers(&self, regions: &[(*mut u8, usize)]) -> Result<(), IoError> {
        let Backend::Uring(pool) = &self.backend else { return Ok(()) };
        let plain: Vec<(usize, usize)> = regions.iter().map(|&(p, l)| (p as usize, l)).collect();
        let result = match self.faults.refuse_register {
            Some(errno) => Err(std::io::Error::from_raw_os_error(errno)),
            // The rings are the parent's (and its threads are not here).
            None if self.forked() => Err(std::io::Error::other("a process forked from the reader's registers nothing")),
            None => pool.register(&plain),
        };
        let state = match &result {
            Ok(()) => FixedBuffers::Registered { regions: plain.len(), bytes: plain.iter().map(|r| r.1 as u64).sum() },
            Err(e) => FixedBuffers::Refused(format!("{e}")),
        };
        if let Ok(mut fixed) = self.fixed_regions.lock() {
            *fixed = if result.is_ok() { plain } else { Vec::new() };
        }
        if let Ok(mut r) = self.report.lock() {
            r.fixed_buffers = state;
        }
        result.map_err(|source| IoError::Register { source })
    }

    /// [`register_buffers`](Self::register_buffers) for regions that `owner` keeps alive:
    /// the reader holds `owner` until its rings are gone.
    ///
    /// # Safety
    ///
    /// Each region must be valid for writes and lie in memory that stays allocated for as
    /// long as `owner` lives.
    pub unsafe fn register_owned_buffers(
        &self,
        regions: &[(*mut u8, usize)],
        owner: Arc<dyn std::any::Any + Send + Sync>,
    ) -> Result<(), IoError> {
        if let Ok(mut owners) = self.registered_owners.lock() {
            owners.push(owner);
        }
        // SAFETY: the regions live as long as `owner`, which the reader now keeps until its
        // rings are dropped (the field is dropped after `backend`).
        unsafe { self.register_buffers(regions) }
    }

    /// Reads `len` bytes at `offset` of `file` into `buf[buf_offset..]`, taking the buffer
    /// and handing it back when done. Dropping the returned future gives the read up: what
    /// is not yet with the kernel is not read (the buffer is dropped on the worker's side);
    /// what is stays with it until the kernel is done with the buffer.
    pub fn read<B: IoBufMut>(
        &self,
        file: &Arc<OpenFile>,
        offset: u64,
        buf: B,
        buf_offset: usize,
        len: usize,
    ) -> ReadFuture<B> {
        let mut buf = match admit(file.path(), buf, buf_offset, len) {
            Ok(buf) => buf,
            Err(done) => return done,
        };
        // Offsets are signed in the kernel: io_uring takes -1 for "the file's position" (and
        // pread refuses it); a read's end past 2^63 - 1 is refused the same way by both.
        if offset.checked_add(len as u64).is_none_or(|end| end > i64::MAX as u64) {
            let source = std::io::Error::from_raw_os_error(libc::EINVAL);
            let error = IoError::Read { file: file.path().to_path_buf(), offset, len: len as u64, source };
            return ReadFuture::ready(Err(ReadFailed { error, buf: Some(buf) }));
        }
        // A whole chunk of an arena filled by copies, from a cached file: copied in on the
        // copying threads. Anything else readies the buffer for writes (stable_mut_ptr).
        // (Not with short reads injected: those test the reads.)
        let forked = self.forked();
        let fill = match (buf_offset, self.faults.max_read) {
            (0, None) if !forked => copy_target(&buf, file, || self.copiers()),
            _ => None,
        };
        let (dst, fill, copier) = match fill {
            Some((dst, target, copier)) => (dst, Some(target), Some(copier)),
            // SAFETY: buf_offset + len <= capacity was checked above.
            None => (unsafe { buf.stable_mut_ptr().add(buf_offset) }, None, None),
        };
        let fixed = buf.fixed_slot().filter(|&slot| self.in_fixed_region(slot, dst as usize, len));
        let (tx, rx) = oneshot::channel();
        let given_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let op = ReadOp {
            file: Arc::clone(file),
            dst: SendPtr(dst),
            offset,
            len,
            done: 0,
            refused: 0,
            fixed,
            max_segment: self.faults.max_read.unwrap_or(usize::MAX).max(1),
            fill,
            complete: Some(Box::new(move |f: crate::op::Finish| match f {
                crate::op::Finish::Done(r) => {
                    let _ = tx.send(with_buf(r, buf));
                }
                crate::op::Finish::Abandoned(error) => {
                    std::mem::forget(buf);
                    let _ = tx.send(Err(ReadFailed { error, buf: None }));
                }
            })),
            given_up: Arc::clone(&given_up),
        };
        let pending =
            Pending { rx, file: file.path().to_path_buf(), offset, len: len as u64, given_up: Some(given_up) };
        match (copier, &self.backend) {
            // No thread of the reader's is in a forked process.
            _ if forked => run_to_end(op),
            (Some(copier), _) => copier.submit(op),
            (None, Backend::Uring(pool)) => pool.submit(op),
            (None, Backend::Pread(Some(pool))) => pool.submit(op),
            (None, Backend::Pread(None)) => run_to_end(op),
        }
        ReadFuture { state: State::Waiting(pending) }
    }
}

impl Reader {
    /// Whether `[start, start + len)` lies in the region this reader registered as fixed
    /// buffer `slot`.
    fn in_fixed_region(&self, slot: u16, start: usize, len: usize) -> bool {
        let region = self.fixed_regions.lock().ok().and_then(|r| r.get(usize::from(slot)).copied());
        region.is_some_and(|(base, size)| {
            start >= base && start.checked_add(len).is_some_and(|end| end <= base.saturating_add(size))
        })
    }

    /// Whether this is a process forked from the one that built the reader (a data
    /// loader's worker, say): it has none of the reader's threads, and the rings it
    /// inherited are the parent's, so reads there run on the caller's thread.
    fn forked(&self) -> bool {
        self.made.elsewhere()
    }

    /// The threads that copy cached pages into arenas, started at the first call.
    fn copiers(&self) -> Option<&PreadPool> {
        self.copiers
            .get_or_init(|| {
                let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 16);
                PreadPool::named(cpus, "tensorlift-copy").ok()
            })
            .as_ref()
    }
}

/// For a read into a whole chunk of an arena filled by copies ([`crate::fill`]) from a file
/// read buffered: the chunk's start, and what to copy into it. Where the file cannot be
/// copied from (read with O_DIRECT, not mappable) or no copying thread could be started,
/// the arena stops being filled by copies: its chunks are then read into like any other's.
/// The copying threads (`copiers`) are started only for such a read.
fn copy_target<'a, B: IoBufMut>(
    buf: &B,
    file: &OpenFile,
    copiers: impl FnOnce() -> Option<&'a PreadPool>,
) -> Option<(*mut u8, FillTarget, &'a PreadPool)> {
    let any: &dyn std::any::Any = buf;
    let chunk = match any.downcast_ref::<crate::HostChunk>() {
        Some(crate::HostChunk::Arena(c)) => c,
        Some(crate::HostChunk::Caller(_)) => return None,
        None => any.downcast_ref::<crate::ArenaChunk>()?,
    };
    let (index, dst, arena) = chunk.copy_target()?;
    let Some(copiers) = copiers() else {
        arena.stop_filling("no copying thread could be started");
        return None;
    };
    match file.copy_source() {
        Some((src, src_len)) => {
            Some((dst, FillTarget { index, src: SendPtr(src.cast_mut()), src_len, arena }, copiers))
        }
        None => {
            arena.stop_filling(match file.is_direct() {
                true => "the shard was read with O_DIRECT (not cached)",
                false => "the shard could not be mapped to copy from",
            });
            None
        }
    }
}

/// The buffer back for a read of `len` bytes into `buf[buf_offset..]` that has I/O to do;
/// else the read's outcome already: a buffer too small for it, or nothing to read.
pub(crate) fn admit<B: IoBufMut>(file: &Path, buf: B, buf_offset: usize, len: usize) -> Result<B, ReadFuture<B>> {
    if buf_offset.checked_add(len).is_none_or(|end| end > buf.capacity()) {
        let error = IoError::BufferTooSmall { file: file.to_path_buf(), buf_offset, len, capacity: buf.capacity() };
        return Err(ReadFuture::ready(Err(ReadFailed { error, buf: Some(buf) })));
    }
    if len == 0 {
        return Err(ReadFuture::ready(Ok(buf)));
    }
    Ok(buf)
}

fn with_buf<B>(r: Result<(), IoError>, buf: B) -> ReadResult<B> {
    match r {
        Ok(()) => Ok(buf),
        Err(error) => Err(ReadFailed { error, buf: Some(buf) }),
    }
}

/// A read in flight. Resolves to the buffer, filled, or the failure with the buffer.
#[derive(Debug)]
pub struct ReadFuture<B> {
    state: State<B>,
}

#[derive(Debug)]
enum State<B> {
    Ready(Option<ReadResult<B>>),
    Waiting(Pending<B>),
}

#[derive(Debug)]
struct Pending<B> {
    rx: oneshot::Receiver<ReadResult<B>>,
    file: std::path::PathBuf,
    offset: u64,
    len: u64,
    /// The read's flag that nobody waits for it any more, set when this is dropped: a read
    /// not yet in the kernel's hands then ends unread, its buffer handed back.
    given_up: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl<B> Drop for Pending<B> {
    fn drop(&mut self) {
        if let Some(g) = &self.given_up {
            g.store(true, std::sync::atomic::Ordering::Release);
        }
    }
}

impl<B> ReadFuture<B> {
    pub(crate) fn ready(r: ReadResult<B>) -> Self {
        ReadFuture { state: State::Ready(Some(r)) }
    }

    /// A read that another task completes through `rx` (a remote object's).
    pub(crate) fn waiting(
        rx: oneshot::Receiver<ReadResult<B>>,
        file: std::path::PathBuf,
        offset: u64,
        len: u64,
    ) -> Self {
        ReadFuture { state: State::Waiting(Pending { rx, file, offset, len, given_up: None }) }
    }

    /// Blocks the current thread until the read completes. Safe to call anywhere, also
    /// inside an async runtime (where it blocks that worker thread).
    pub fn wait(self) -> ReadResult<B> {
        block_on(self)
    }
}

/// Runs a future to completion on the current thread, parking between polls.
///
/// The futures of this crate (and the engine's pipeline built on them) need no reactor: a
/// worker thread completes them and wakes the waiter, so no async runtime is required.
pub fn block_on<F: Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let mut fut = std::pin::pin!(fut);
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
            return r;
        }
        std::thread::park();
    }
}

impl<B> Unpin for ReadFuture<B> {}

impl<B> Future for ReadFuture<B> {
    type Output = ReadResult<B>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            State::Ready(r) => match r.take() {
                Some(r) => Poll::Ready(r),
                None => Poll::Pending,
            },
            State::Waiting(p) => match Pin::new(&mut p.rx).poll(cx) {
                Poll::Ready(Ok(r)) => Poll::Ready(r),
                Poll::Ready(Err(_)) => {
                    let error = IoError::WorkerGone { file: p.file.clone(), offset: p.offset, len: p.len };
                    Poll::Ready(Err(ReadFailed { error, buf: None }))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// Tries a direct read on `path`: the file itself, or for a folder its first
/// `.safetensors` file, or else a scratch file created there (and removed).
pub fn direct_io_support(path: &Path) -> Result<DirectSupport, IoError> {
    let open_err = |source| IoError::Open { file: path.to_path_buf(), source };
    let meta = std::fs::metadata(path).map_err(open_err)?;
    let mut scratch = None;
    let file = if meta.is_dir() {
        // A regular file of the folder itself (links are not followed out of it).
        let found = std::fs::read_dir(path)
            .map_err(open_err)?
            .filter_map(Result::ok)
            .find(|e| {
                e.path().extension().is_some_and(|x| x == "safetensors") && e.file_type().is_ok_and(|t| t.is_file())
            })
            .map(|e| e.path());
        match found {
            Some(f) => f,
            None => {
                // A new file, never an existing one or a link planted under its name.
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let f = path.join(format!(".tensorlift-direct-probe-{}", std::process::id()));
                let mut out = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&f)
                    .map_err(open_err)?;
                if let Err(e) = out.write_all(&[0u8; 8192]) {
                    let _ = std::fs::remove_file(&f);
                    return Err(open_err(e));
                }
                scratch = Some(f.clone());
                f
            }
        }
    } else {
        path.to_path_buf()
    };
    let result = try_direct(&file);
    if let Some(s) = scratch {
        let _ = std::fs::remove_file(s);
    }
    result
}

fn try_direct(file: &Path) -> Result<DirectSupport, IoError> {
    let reader = Reader::builder().backend(BackendKind::Pread).pread_threads(1).build();
    let f = Arc::new(OpenFile::open(file, true, false)?);
    if f.is_direct() && f.len() >= f.dio_align().offset as u64 {
        let n = f.dio_align().offset as usize;
        let buf = crate::AlignedBuf::zeroed(n, (f.dio_align().memory as usize).max(crate::PAGE)).ok_or_else(|| {
            IoError::Open { file: file.to_path_buf(), source: std::io::Error::from(std::io::ErrorKind::OutOfMemory) }
        })?;
        reader.read(&f, 0, buf, 0, n).wait().map_err(|e| e.error)?;
    }
    Ok(DirectSupport { tried: file.to_path_buf(), align: f.dio_align(), refused: f.buffered_reason() })
}
