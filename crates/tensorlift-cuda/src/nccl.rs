//! NCCL, loaded at run time like the driver: communicators between processes, one GPU each,
//! and the point-to-point exchanges that a cooperative load sends each rank its slices with.
//!
//! The library is `TENSORLIFT_LIBNCCL` where that names a path, else the first of
//! [`LIBNCCL_NAMES`] the dynamic loader finds (PyTorch's wheels put NCCL at
//! `site-packages/nvidia/nccl/lib/libnccl.so.2`, outside its search path: name it then). It
//! is opened once, on the first use, and every symbol used is looked up then, so that a
//! missing or older library is an error ([`CudaError::Nccl`]), never a panic.
//!
//! An exchange waits for its work while watching NCCL's error state, and checks it again
//! once the work is done; it gives up after the communicator's timeout ([`DEFAULT_TIMEOUT`]
//! unless [`Comm::set_timeout`] says otherwise), since NCCL within a node does not report a
//! rank that exited. A failed exchange aborts the communicator.
//!
//! The calls are bound here rather than through cudarc's `nccl` module, whose loader panics
//! when it finds no library, does not look for NCCL's own soname (`libnccl.so.2`), and types
//! results as Rust enums (a code that a newer NCCL adds would be undefined behaviour).
//!
//! ```no_run
//! use tensorlift_cuda::{nccl, Gpu};
//! # fn main() -> Result<(), tensorlift_cuda::CudaError> {
//! // Rank 0 makes the id and hands its bytes to the other ranks (a file, a TCP store, MPI).
//! let id = nccl::UniqueId::new()?;
//! let comm = nccl::Comm::new(&Gpu::open(0)?, &id, 0, 2)?;
//! assert_eq!((comm.rank(), comm.world()), (0, 2));
//! # Ok(()) }
//! ```

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::device::Stream;
use cudarc::driver::sys;

use crate::{CudaError, DeviceArena, Gpu};

/// The environment variable naming the NCCL library to load (a path).
pub const LIBNCCL_ENV: &str = "TENSORLIFT_LIBNCCL";

/// The library names tried, in order, unless [`LIBNCCL_ENV`] names a path.
pub const LIBNCCL_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// `NCCL_UNIQUE_ID_BYTES`.
const ID_BYTES: usize = 128;

/// `ncclUniqueId`.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawId {
    internal: [c_char; ID_BYTES],
}

type NcclResult = c_int;
type Comm_ = *mut c_void;
/// `ncclUint8`: every exchange moves bytes.
const UINT8: c_int = 1;
/// `ncclInProgress`, which a non-blocking communicator answers; tensorlift's block.
const IN_PROGRESS: NcclResult = 7;

struct Api {
    _lib: libloading::Library,
    library: PathBuf,
    version: c_int,
    get_unique_id: unsafe extern "C" fn(*mut RawId) -> NcclResult,
    init_rank: unsafe extern "C" fn(*mut Comm_, c_int, RawId, c_int) -> NcclResult,
    destroy: unsafe extern "C" fn(Comm_) -> NcclResult,
    abort: unsafe extern "C" fn(Comm_) -> NcclResult,
    async_error: unsafe extern "C" fn(Comm_, *mut NcclResult) -> NcclResult,
    send: unsafe extern "C" fn(*const c_void, usize, c_int, c_int, Comm_, sys::CUstream) -> NcclResult,
    recv: unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, Comm_, sys::CUstream) -> NcclResult,
    group_start: unsafe extern "C" fn() -> NcclResult,
    group_end: unsafe extern "C" fn() -> NcclResult,
    error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
}

impl Api {
    fn error(&self, call: &'static str, code: NcclResult) -> CudaError {
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
        let text = unsafe { (self.error_string)(code) };
        let message = if text.is_null() {
            format!("NCCL error {code}")
        } else {
            // SAFETY: not null; a static string, as above.
            format!("{} ({code})", unsafe { CStr::from_ptr(text) }.to_string_lossy())
        };
        CudaError::Nccl { call, message }
    }

    fn check(&self, call: &'static str, code: NcclResult) -> Result<(), CudaError> {
        match code {
            0 => Ok(()),
            c => Err(self.error(call, c)),
        }
    }
}

/// The process's NCCL, opened once; the reason where it could not be.
fn api() -> Result<&'static Api, CudaError> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let candidates: Vec<PathBuf> = match std::env::var_os(LIBNCCL_ENV) {
            Some(p) => vec![PathBuf::from(p)],
            None => LIBNCCL_NAMES.map(PathBuf::from).to_vec(),
        };
        let mut errors = Vec::new();
        for path in &candidates {
            // SAFETY: loading NCCL runs its initialisers, as every NCCL program does; nothing
            // in it is called before its symbols are resolved.
            match unsafe { libloading::Library::new(path) } {
                Ok(lib) => return open(lib, path.clone()),
                Err(e) => {
                    // dlerror's text, without the name it starts with.
                    let text = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
                    let name = format!("{}: ", path.display());
                    errors.push(text.strip_prefix(&name).map(str::to_owned).unwrap_or(text));
                }
            }
        }
        let names: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        let why = match errors.first() {
            Some(first) if errors.iter().all(|e| e == first) => first.clone(),
            _ => errors.join("; "),
        };
        Err(format!(
            "no NCCL library could be loaded (tried {}: {why}); set {LIBNCCL_ENV} to its path",
            names.join(", ")
        ))
    })
    .as_ref()
    .map_err(|why| CudaError::Nccl { call: "loading NCCL", message: why.clone() })
}

fn open(lib: libloading::Library, library: PathBuf) -> Result<Api, String> {
    fn get<T: Copy>(lib: &libloading::Library, name: &str) -> Result<T, String> {
        // SAFETY: every name below is looked up with its exact C signature from nccl.h.
        unsafe { lib.get::<T>(name.as_bytes()) }.map(|s| *s).map_err(|e| format!("the NCCL library lacks {name}: {e}"))
    }
    let get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult = get(&lib, "ncclGetVersion")?;
    let mut version = 0;
    // SAFETY: writes one int.
    if unsafe { get_version(&mut version) } != 0 {
        return Err(format!("{}: ncclGetVersion failed", library.display()));
    }
    Ok(Api {
        version,
        get_unique_id: get(&lib, "ncclGetUniqueId")?,
        init_rank: get(&lib, "ncclCommInitRank")?,
        destroy: get(&lib, "ncclCommDestroy")?,
        abort: get(&lib, "ncclCommAbort")?,
        async_error: get(&lib, "ncclCommGetAsyncError")?,
        send: get(&lib, "ncclSend")?,
        recv: get(&lib, "ncclRecv")?,
        group_start: get(&lib, "ncclGroupStart")?,
        group_end: get(&lib, "ncclGroupEnd")?,
        error_string: get(&lib, "ncclGetErrorString")?,
        library,
        _lib: lib,
    })
}

/// The NCCL library the process loaded and its version (`22800` is 2.28.0), or why none
/// could be (for `tensorlift doctor`).
pub fn status() -> Result<(PathBuf, i32), String> {
    match api() {
        Ok(a) => Ok((a.library.clone(), a.version)),
        Err(CudaError::Nccl { message, .. }) => Err(message),
        Err(e) => Err(e.to_string()),
    }
}

/// A communicator's id (`ncclUniqueId`): made by one rank, handed to every other rank out of
/// band, as bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UniqueId([u8; ID_BYTES]);

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UniqueId(..)")
    }
}

impl UniqueId {
    /// A new id (`ncclGetUniqueId`), from the rank that hands it to the others.
    pub fn new() -> Result<UniqueId, CudaError> {
        let api = api()?;
        let mut raw = RawId { internal: [0; ID_BYTES] };
        // SAFETY: writes one ncclUniqueId.
        api.check("ncclGetUniqueId", unsafe { (api.get_unique_id)(&mut raw) })?;
        Ok(UniqueId(raw.internal.map(|c| c as u8)))
    }

    /// The id as bytes, to send to the other ranks.
    pub fn to_bytes(&self) -> [u8; 128] {
        self.0
    }

    /// An id received from the rank that made it.
    pub fn from_bytes(bytes: [u8; 128]) -> UniqueId {
        UniqueId(bytes)
    }
}

/// How long an exchange waits for its work before it gives up, unless
/// [`Comm::set_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a failed exchange waits for NCCL's abort, then for its stream to finish.
const ABORT_WAIT: Duration = Duration::from_secs(10);

/// Bytes a rank says in [`Comm::agree`]: its flag, then its token.
const SAY: usize = 9;

/// One rank's communicator on its GPU, and the stream its exchanges run on. Destroyed when
/// dropped; aborted instead once an exchange on it has failed.
///
/// NCCL reports a rank that went away over the network, not within a node: there, ranks
/// waiting on one that exited wait until their exchange's timeout
/// ([`set_timeout`](Self::set_timeout), [`DEFAULT_TIMEOUT`]), then abort.
pub struct Comm {
    api: &'static Api,
    raw: Comm_,
    gpu: Gpu,
    stream: Arc<Stream>,
    rank: usize,
    world: usize,
    failed: bool,
    timeout: Duration,
    /// Where [`agree`](Self::agree) gathers what each rank says: allocated with the
    /// communicator, so that agreeing needs no memory a failing rank may not have.
    said: Arc<DeviceArena>,
}

// SAFETY: a communicator may be used from any thread, one at a time (`&mut self` for every
// call that enqueues work); NCCL forbids only concurrent use.
unsafe impl Send for Comm {}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Comm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.gpu.ordinal())
            .finish_non_exhaustive()
    }
}

impl Comm {
    /// Rank `rank` of `world` ranks on `gpu` (`ncclCommInitRank`): every rank calls this with
    /// the same id, and it returns once all have.
    pub fn new(gpu: &Gpu, id: &UniqueId, rank: usize, world: usize) -> Result<Comm, CudaError> {
        let api = api()?;
        let (Ok(n), Ok(r)) = (c_int::try_from(world), c_int::try_from(rank)) else {
            return Err(CudaError::Nccl { call: "ncclCommInitRank", message: format!("rank {rank} of {world}") });
        };
        if rank >= world {
            return Err(CudaError::Nccl { call: "ncclCommInitRank", message: format!("rank {rank} of {world}") });
        }
        let stream = gpu.new_stream()?;
        let _restore = gpu.enter()?;
        let mut raw: Comm_ = std::ptr::null_mut();
        let id = RawId { internal: id.0.map(|b| b as c_char) };
        // SAFETY: writes one communicator handle; the id is passed by value, as nccl.h takes
        // it; the device's context is current, which NCCL takes the device from.
        api.check("ncclCommInitRank", unsafe { (api.init_rank)(&mut raw, n, id, r) })?;
        // After the communicator stands (a failure before would leave the others in their
        // init). Without it this rank aborts and returns the error; the others learn of it in
        // their first exchange across nodes, and at its timeout within one.
        let said = match DeviceArena::new(gpu, world * SAY) {
            Ok(a) => Arc::new(a),
            Err(e) => {
                abort(api, raw, gpu);
                return Err(e);
            }
        };
        Ok(Comm { api, raw, gpu: gpu.clone(), stream, rank, world, failed: false, timeout: DEFAULT_TIMEOUT, said })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// How many ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The device.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Starts an exchange: copies, sends and receives that [`Exchange::run`] queues together.
    pub fn exchange(&mut self) -> Exchange<'_> {
        Exchange { comm: self, ops: Vec::new() }
    }

    /// How long each exchange waits for its work (the slowest rank included) before it
    /// aborts the communicator and fails.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Whether every rank is ready, and agrees: each rank says whether it is (`ok`) and a
    /// `token` (a digest of what it is about to do) to every other. Returns the ranks that
    /// are not ready (this one among them when `!ok`), or an error naming the ranks whose
    /// token differs from this rank's. A rank not heard from counts as not ready. Every rank
    /// must call it at the same point. An error of the exchange itself aborts the
    /// communicator; ranks that disagree do not (nothing was sent but the word).
    pub fn agree(&mut self, ok: bool, token: u64) -> Result<Vec<usize>, CudaError> {
        let (world, me) = (self.world, self.rank);
        // Nothing is queued on a failed communicator's stream, which may not finish.
        if self.failed {
            return Err(CudaError::Nccl { call: "agree", message: "the communicator failed earlier".into() });
        }
        let said = Arc::clone(&self.said);
        let mine: Vec<u8> = std::iter::once(u8::from(!ok)).chain(token.to_le_bytes()).collect();
        // In the stream's order, before the sends: every rank not ready until it says
        // otherwise, then this rank's word.
        let written = (|| {
            let _restore = self.gpu.enter()?;
            memset(&self.stream, &said, 0, world * SAY, 1)?;
            mine.iter().enumerate().try_for_each(|(k, &b)| memset(&self.stream, &said, me * SAY + k, 1, b))
        })();
        if let Err(e) = written {
            self.fail();
            return Err(e);
        }
        let mut x = self.exchange();
        for peer in (0..world).filter(|&p| p != me) {
            x.send(peer, Block::flat(&said, me * SAY, SAY))?;
            x.recv(peer, Block::flat(&said, peer * SAY, SAY))?;
        }
        x.run()?;
        let mut all = vec![0u8; world * SAY];
        if let Err(e) = said.copy_to_host(0, &mut all) {
            self.fail();
            return Err(e);
        }
        let words: Vec<&[u8]> = all.chunks_exact(SAY).collect();
        let failed: Vec<usize> = (0..world).filter(|&r| words[r][0] != 0).collect();
        let differ: Vec<usize> = (0..world).filter(|&r| !failed.contains(&r) && words[r][1..] != mine[1..]).collect();
        if ok && !differ.is_empty() {
            return Err(CudaError::Nccl {
                call: "agree",
                message: format!(
                    "ranks {differ:?} are about to do something else than rank {me} (another plan or other parts)"
                ),
            });
        }
        Ok(failed)
    }

    /// Aborts the communicator (after a failure): NCCL is asked to stop its work in flight
    /// (waiting at most 10 s for the abort to return), and every later exchange on it fails. The other ranks learn of it over the network; within a
    /// node, only by their own timeout.
    pub fn abort(&mut self) {
        self.fail();
    }

    fn fail(&mut self) {
        if !self.failed {
            self.failed = true;
            abort(self.api, self.raw, &self.gpu);
        }
    }
}

/// Aborts `raw` on a thread of its own, waiting for it at most [`ABORT_WAIT`]: within a node
/// NCCL's abort may wait for every rank to abort too, which a rank that exited never does;
/// the thread is then left to it. The handle is used for nothing after this.
fn abort(api: &'static Api, raw: Comm_, gpu: &Gpu) {
    let (handle, gpu2) = (raw as usize, gpu.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name("tensorlift-nccl-abort".into()).spawn(move || {
        let _restore = gpu2.enter();
        // SAFETY: the handle is live, and after this abort nothing uses it (the caller's
        // contract: a failed communicator makes no exchange and is not destroyed).
        let _ = unsafe { (api.abort)(handle as Comm_) };
        let _ = tx.send(());
    });
    match spawned {
        Ok(_) => {
            if rx.recv_timeout(ABORT_WAIT).is_err() {
                tracing::warn!("ncclCommAbort did not return within {ABORT_WAIT:?}; going on without it");
            }
        }
        Err(_) => {
            let _restore = gpu.enter();
            // SAFETY: as above, on this thread, there being no other.
            let _ = unsafe { (api.abort)(raw) };
        }
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        if self.failed {
            return;
        }
        let _restore = self.gpu.enter();
        // SAFETY: the handle is live and dropped once; every exchange waited for its work.
        let _ = unsafe { (self.api.destroy)(self.raw) };
    }
}

/// Part of a device arena: `rows` rows of `width` bytes, `pitch` bytes apart, from `offset`.
#[derive(Debug, Clone)]
pub struct Block {
    /// The arena.
    pub arena: Arc<DeviceArena>,
    /// Where the first row starts.
    pub offset: usize,
    /// Rows.
    pub rows: usize,
    /// Bytes a row.
    pub width: usize,
    /// Bytes from one row's start to the next (at least `width` where there are two rows).
    pub pitch: usize,
}

impl Block {
    /// `len` contiguous bytes at `offset`.
    pub fn flat(arena: &Arc<DeviceArena>, offset: usize, len: usize) -> Block {
        Block { arena: Arc::clone(arena), offset, rows: 1, width: len, pitch: len }
    }

    fn bytes(&self) -> usize {
        self.rows * self.width
    }

    fn contiguous(&self) -> bool {
        self.rows <= 1 || self.pitch == self.width
    }

    fn ptr(&self) -> u64 {
        self.arena.device_ptr() + self.offset as u64
    }

    /// Whether every row lies inside the arena, on `gpu`.
    fn check(&self, gpu: &Gpu, what: &'static str) -> Result<(), CudaError> {
        let out = || CudaError::OutOfBounds { what, len: self.rows.saturating_mul(self.width) };
        if self.arena.gpu().ordinal() != gpu.ordinal() || (self.rows > 1 && self.pitch < self.width) {
            return Err(out());
        }
        let end = match self.rows {
            0 => Some(self.offset),
            r => (r - 1)
                .checked_mul(self.pitch)
                .and_then(|e| e.checked_add(self.width))
                .and_then(|e| e.checked_add(self.offset)),
        };
        match end {
            Some(end) if end <= self.arena.len() => Ok(()),
            _ => Err(out()),
        }
    }
}

enum Step {
    Copy {
        dst: Block,
        src: Block,
    },
    Send {
        peer: usize,
        src: Block,
    },
    /// A strided send gathered into `via` (contiguous, as many bytes) first.
    SendVia {
        peer: usize,
        src: Block,
        via: Block,
    },
    Recv {
        peer: usize,
        dst: Block,
    },
}

/// Copies, sends and receives on one communicator, queued together by [`run`](Self::run):
/// first the copies and the gathers of strided sends (into memory the caller gave,
/// [`send_via`](Self::send_via)), then every send and receive in one NCCL group. NCCL moves
/// contiguous blocks only, and an exchange allocates nothing. Every block's bounds are
/// checked as it is added. A rank's sends to a peer and that peer's receives from it match
/// in the order each adds them.
pub struct Exchange<'c> {
    comm: &'c mut Comm,
    ops: Vec<Step>,
}

impl std::fmt::Debug for Exchange<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange").field("comm", &self.comm).field("steps", &self.ops.len()).finish()
    }
}

impl Exchange<'_> {
    /// Copies `src` into `dst` on this device (the same rows and width).
    pub fn copy(&mut self, dst: Block, src: Block) -> Result<(), CudaError> {
        src.check(&self.comm.gpu, "exchange copy source")?;
        dst.check(&self.comm.gpu, "exchange copy destination")?;
        if (src.rows, src.width) != (dst.rows, dst.width) {
            return Err(CudaError::OutOfBounds { what: "exchange copy of blocks of other shapes", len: src.bytes() });
        }
        self.ops.push(Step::Copy { dst, src });
        Ok(())
    }

    /// Sends `src` (contiguous; a strided block goes by [`send_via`](Self::send_via)) to rank
    /// `peer`.
    pub fn send(&mut self, peer: usize, src: Block) -> Result<(), CudaError> {
        self.wire(&src, "exchange send (a strided one goes by send_via)")?;
        self.peer(peer)?;
        self.ops.push(Step::Send { peer, src });
        Ok(())
    }

    /// Sends `src` to rank `peer`, gathered first into `via` (as many contiguous bytes), memory
    /// the caller allocated (before agreeing with the other ranks, where a failure to get it
    /// can still be said) rather than the exchange.
    pub fn send_via(&mut self, peer: usize, src: Block, via: Block) -> Result<(), CudaError> {
        src.check(&self.comm.gpu, "exchange send")?;
        self.wire(&via, "exchange send staging")?;
        self.peer(peer)?;
        if via.bytes() != src.bytes() {
            return Err(CudaError::OutOfBounds { what: "exchange send staging of another size", len: via.bytes() });
        }
        self.ops.push(Step::SendVia { peer, src, via });
        Ok(())
    }

    /// Receives into `dst` (contiguous) what rank `peer` sends it (as many bytes as `dst`
    /// holds).
    pub fn recv(&mut self, peer: usize, dst: Block) -> Result<(), CudaError> {
        self.wire(&dst, "exchange receive into a strided block")?;
        self.peer(peer)?;
        self.ops.push(Step::Recv { peer, dst });
        Ok(())
    }

    /// Whether NCCL can move `b` as it is: inside its arena on this device, and contiguous.
    fn wire(&self, b: &Block, what: &'static str) -> Result<(), CudaError> {
        b.check(&self.comm.gpu, what)?;
        match b.contiguous() {
            true => Ok(()),
            false => Err(CudaError::OutOfBounds { what, len: b.bytes() }),
        }
    }

    fn peer(&self, peer: usize) -> Result<(), CudaError> {
        if peer >= self.comm.world || peer == self.comm.rank {
            return Err(CudaError::Nccl {
                call: "exchange",
                message: format!("no peer rank {peer} of {}", self.comm.world),
            });
        }
        Ok(())
    }

    /// Queues every step and waits for them, watching the communicator for errors (a peer
    /// that went away): on one, the communicator is aborted, and this and every later
    /// exchange on it fail.
    pub fn run(self) -> Result<(), CudaError> {
        let Exchange { comm, ops } = self;
        if comm.failed {
            return Err(CudaError::Nccl { call: "exchange", message: "the communicator failed earlier".into() });
        }
        let _restore = comm.gpu.enter()?;
        // Every block is held until the stream has done with it.
        let mut held: Vec<Block> = Vec::new();
        let mut wire: Vec<(bool, usize, Block)> = Vec::new();
        let result = (|| -> Result<(), CudaError> {
            // The copies and gathers first, in the stream's order before the group.
            for op in ops {
                match op {
                    Step::Copy { dst, src } => {
                        copy_2d(&comm.stream, &dst, &src)?;
                        held.extend([dst, src]);
                    }
                    Step::SendVia { peer, src, via } => {
                        let rows = Block { rows: src.rows, width: src.width, pitch: src.width, ..via.clone() };
                        copy_2d(&comm.stream, &rows, &src)?;
                        held.push(src);
                        wire.push((true, peer, via));
                    }
                    Step::Send { peer, src } => wire.push((true, peer, src)),
                    Step::Recv { peer, dst } => wire.push((false, peer, dst)),
                }
            }
            let api = comm.api;
            // SAFETY: opens a group; closed below on every path.
            api.check("ncclGroupStart", unsafe { (api.group_start)() })?;
            let mut queued = Ok(());
            for (sending, peer, b) in &wire {
                let (len, ptr, peer) = (b.bytes(), b.ptr(), *peer as c_int);
                if len == 0 {
                    continue;
                }
                let cu = comm.stream.raw();
                queued = if *sending {
                    // SAFETY: the block was checked inside its arena on this device; the arena
                    // is held (in `wire`) until the stream has completed, waited for below.
                    api.check("ncclSend", unsafe { (api.send)(ptr as *const c_void, len, UINT8, peer, comm.raw, cu) })
                } else {
                    // SAFETY: as for the send; the block is written by this stream alone.
                    api.check("ncclRecv", unsafe { (api.recv)(ptr as *mut c_void, len, UINT8, peer, comm.raw, cu) })
                };
                if queued.is_err() {
                    break;
                }
            }
            // SAFETY: closes the group opened above.
            let ended = api.check("ncclGroupEnd", unsafe { (api.group_end)() });
            queued.and(ended)
        })();
        let waited = result.and_then(|()| wait(comm));
        if waited.is_err() {
            comm.fail();
        }
        // Nothing queued may outlive the memory it uses: after a failure, the blocks are
        // released once the stream is seen done (an aborted communicator's work ends), and
        // leaked if it is not within a bounded wait (a wedged NCCL), never freed under it.
        // (This avoids a use after free; it does not promise that freeing other memory of
        // the device returns while such a stream runs.)
        let blocks = (wire, held);
        if comm.failed && !drained(&comm.stream, ABORT_WAIT) {
            tracing::warn!("an aborted exchange's stream did not finish: its device memory is left allocated");
            std::mem::forget(blocks);
        } else {
            drop(blocks);
        }
        waited
    }
}

/// Waits for the stream's work, checking the communicator's error state as it goes and
/// once more when the work is done (a receive that failed completes without its bytes), for
/// at most the communicator's timeout.
fn wait(comm: &Comm) -> Result<(), CudaError> {
    let done = comm.stream.record_event()?;
    let started = std::time::Instant::now();
    let mut pause = Duration::from_micros(50);
    loop {
        let complete = done.is_complete()?;
        let mut state: NcclResult = 0;
        // SAFETY: writes one result code; the handle is live.
        comm.api.check("ncclCommGetAsyncError", unsafe { (comm.api.async_error)(comm.raw, &mut state) })?;
        if state != 0 && state != IN_PROGRESS {
            return Err(comm.api.error("ncclCommGetAsyncError", state));
        }
        if complete {
            return Ok(());
        }
        if started.elapsed() > comm.timeout {
            return Err(CudaError::Nccl {
                call: "exchange",
                message: format!(
                    "no answer from the other ranks within {} s: one may have stopped (NCCL within a node does not \
                     report a rank that exits)",
                    comm.timeout.as_secs_f64()
                ),
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(2));
    }
}

/// Whether the stream's work completes within `limit` (`false` also when it cannot be
/// asked).
fn drained(stream: &Stream, limit: Duration) -> bool {
    let Ok(done) = stream.record_event() else { return false };
    let started = std::time::Instant::now();
    loop {
        match done.is_complete() {
            Ok(true) => return true,
            Ok(false) if started.elapsed() < limit => std::thread::sleep(Duration::from_millis(1)),
            _ => return false,
        }
    }
}

/// Queues a fill of `len` bytes at `offset` of `arena` with `value` on `stream` (the
/// arena's device current).
fn memset(stream: &Stream, arena: &DeviceArena, offset: usize, len: usize, value: u8) -> Result<(), CudaError> {
    if offset.checked_add(len).is_none_or(|end| end > arena.len()) {
        return Err(CudaError::OutOfBounds { what: "agreement memory", len });
    }
    let api = arena.gpu().api();
    // SAFETY: the range lies inside the arena, which the communicator holds for as long as
    // it lives, and every exchange waits for its stream before returning.
    let r = unsafe { (api.cuMemsetD8Async)(arena.device_ptr() + offset as u64, value, len, stream.raw()) };
    api.check(r, "cuMemsetD8Async")
}

/// Queues a device-to-device copy of `src` into `dst` (shapes checked by the caller).
fn copy_2d(stream: &Stream, dst: &Block, src: &Block) -> Result<(), CudaError> {
    if src.bytes() == 0 {
        return Ok(());
    }
    let api = dst.arena.gpu().api();
    if src.contiguous() && dst.contiguous() {
        // SAFETY: both blocks were checked inside their arenas on this device, which are
        // held until the stream has completed.
        let r = unsafe { (api.cuMemcpyDtoDAsync_v2)(dst.ptr(), src.ptr(), src.bytes(), stream.raw()) };
        return api.check(r, "cuMemcpyDtoDAsync");
    }
    let copy = sys::CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        srcHost: std::ptr::null(),
        srcDevice: src.ptr(),
        srcArray: std::ptr::null_mut(),
        srcPitch: if src.rows > 1 { src.pitch } else { src.width },
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        dstHost: std::ptr::null_mut(),
        dstDevice: dst.ptr(),
        dstArray: std::ptr::null_mut(),
        dstPitch: if dst.rows > 1 { dst.pitch } else { dst.width },
        WidthInBytes: src.width,
        Height: src.rows,
    };
    // SAFETY: every row of both blocks was checked inside its arena (pitches at least the
    // width); the descriptor is read by the call, which does not keep it.
    api.check(unsafe { (api.cuMemcpy2DAsync_v2)(&copy, stream.raw()) }, "cuMemcpy2DAsync")
}
