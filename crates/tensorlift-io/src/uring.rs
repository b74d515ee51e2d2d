//! The io_uring backend: one ring per worker thread, driven outside any async reactor.
//!
//! Callers send [`ReadOp`]s over a channel and wake the worker through an eventfd whose read
//! is always armed in the ring, so a worker blocks in one place (`submit_and_wait`) for both
//! new work and completions. A worker keeps every in-flight op (and so its buffer) until the
//! kernel completes it, and drains all of them before it exits.

use crate::process::MadeIn;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Mutex;
use std::thread::JoinHandle;

use io_uring::{opcode, types, IoUring};

use crate::op::{ReadOp, Segment, Step};

const WAKE: u64 = u64::MAX;

pub(crate) enum Msg {
    Read(ReadOp),
    Register(Vec<(usize, usize)>, Sender<io::Result<()>>),
}

struct Worker {
    tx: Sender<Msg>,
    wake: OwnedFd,
}

/// A set of io_uring worker threads.
pub(crate) struct UringPool {
    workers: Vec<Worker>,
    next: AtomicUsize,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The process whose threads (and rings) these are.
    made: MadeIn,
}

impl std::fmt::Debug for UringPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringPool").field("workers", &self.workers.len()).finish()
    }
}

impl UringPool {
    /// Starts `workers` rings of `depth` entries each.
    pub fn new(workers: usize, depth: u32) -> io::Result<UringPool> {
        let mut pool = UringPool {
            workers: Vec::new(),
            next: AtomicUsize::new(0),
            threads: Mutex::new(Vec::new()),
            made: MadeIn::here(),
        };
        for i in 0..workers.max(1) {
            let ring = IoUring::builder().build(depth.next_power_of_two().max(8))?;
            // SAFETY: eventfd has no memory-safety preconditions.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fd is a new descriptor that nothing else owns.
            let wake = unsafe { OwnedFd::from_raw_fd(fd) };
            let (tx, rx) = mpsc::channel();
            let wake_fd = wake.as_raw_fd();
            let handle = std::thread::Builder::new()
                .name(format!("tensorlift-uring-{i}"))
                .spawn(move || run(ring, rx, wake_fd, depth as usize))?;
            pool.workers.push(Worker { tx, wake });
            if let Ok(mut t) = pool.threads.lock() {
                t.push(handle);
            }
        }
        Ok(pool)
    }

    /// Queues a read on the next worker.
    pub fn submit(&self, op: ReadOp) {
        let w = &self.workers[self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len()];
        if let Err(mpsc::SendError(Msg::Read(op))) = w.tx.send(Msg::Read(op)) {
            // Only possible if the worker thread died; the op's completion reports it.
            op.fail_worker_gone();
            return;
        }
        wake(&w.wake);
    }

    /// Registers `regions` as fixed buffers with every ring.
    pub fn register(&self, regions: &[(usize, usize)]) -> io::Result<()> {
        for w in &self.workers {
            let (tx, rx) = mpsc::channel();
            w.tx.send(Msg::Register(regions.to_vec(), tx)).map_err(|_| io::Error::other("io_uring worker gone"))?;
            wake(&w.wake);
            rx.recv().map_err(|_| io::Error::other("io_uring worker gone"))??;
        }
        Ok(())
    }
}

impl Drop for UringPool {
    fn drop(&mut self) {
        // Closing the channels tells each worker to finish what is in flight and exit.
        let wakes: Vec<OwnedFd> = self.workers.drain(..).map(|w| w.wake).collect();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        if self.made.elsewhere() {
            // A forked process has none of the workers, and its wake descriptors are the
            // parent's: nothing to wake or wait for.
            crate::process::join_threads(self.made, threads);
            return;
        }
        for w in &wakes {
            wake(w);
        }
        // Dropped on one of its own workers (by a buffer's drop there): that worker goes on
        // until its reads are done, and writes to its wake descriptor as it ends, which must
        // stay open (not closed and its number reused) until then. (Workers and their
        // threads are in the same order.)
        let me = std::thread::current().id();
        let mine = threads.iter().position(|t| t.thread().id() == me);
        crate::process::join_threads(self.made, threads);
        let mut wakes = wakes;
        if let Some(i) = mine.filter(|&i| i < wakes.len()) {
            std::mem::forget(wakes.swap_remove(i));
        }
    }
}

fn wake(fd: &OwnedFd) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a valid u64 to an eventfd we own.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

struct InFlight {
    op: ReadOp,
    seg: Segment,
}

struct State {
    ring: IoUring,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    registered: bool,
}

impl Drop for State {
    fn drop(&mut self) {
        // Reads still in flight (a panic unwinding the worker: the loop ends only when none
        // is): closing the ring cancels them in the background, and the kernel may still
        // write into their buffers, which are leaked rather than freed; their callers hear
        // that the worker is gone.
        for InFlight { op, .. } in std::mem::take(&mut self.slots).into_iter().flatten() {
            op.abandon();
        }
    }
}

impl State {
    /// Pushes the op's next segment; the op must have bytes left.
    fn start(&mut self, op: ReadOp) {
        let seg = op.next_segment();
        let Some(slot) = self.free.pop() else {
            // Callers check for a free slot first; finish rather than panic if that ever changes.
            op.fail_worker_gone();
            return;
        };
        let fd = types::Fd(seg.fd);
        let entry = match op.fixed.filter(|_| self.registered) {
            Some(index) => opcode::ReadFixed::new(fd, seg.dst, seg.len, index).offset(seg.offset).build(),
            None => opcode::Read::new(fd, seg.dst, seg.len).offset(seg.offset).build(),
        };
        self.slots[slot] = Some(InFlight { op, seg });
        self.push(entry.user_data(slot as u64));
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) {
        loop {
            // SAFETY: the entry's buffer belongs to an op held in `slots` until its completion
            // is reaped, or leaked with it should the worker unwind first (State's drop), or
            // is the worker's wake buffer, freed only once its read completed (WakeBuf): it
            // outlives the kernel's use of it.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // The submission queue is full: hand what is there to the kernel.
            let _ = self.ring.submit();
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

fn run(ring: IoUring, rx: Receiver<Msg>, wake_fd: i32, depth: usize) {
    let mut st =
        State { ring, slots: (0..depth).map(|_| None).collect(), free: (0..depth).rev().collect(), registered: false };
    // The wake read's buffer, on the heap: freed where the function ends with no wake read
    // in the kernel's hands, else leaked (no way out of this function, a panic or a ring
    // that stops answering, leaves the kernel a freed or reused buffer).
    let mut wake = WakeBuf { buf: Some(Box::new([0u8; 8])), in_kernel: false };
    let arm_wake = |st: &mut State, wake: &mut WakeBuf| {
        if let Some(buf) = wake.buf.as_mut() {
            let e = opcode::Read::new(types::Fd(wake_fd), buf.as_mut_ptr(), 8).build().user_data(WAKE);
            st.push(e);
            wake.in_kernel = true;
        }
    };
    arm_wake(&mut st, &mut wake);
    let mut backlog: VecDeque<ReadOp> = VecDeque::new();
    let mut open = true;
    loop {
        while open {
            match rx.try_recv() {
                Ok(Msg::Read(op)) => backlog.push_back(op),
                Ok(Msg::Register(regions, reply)) => {
                    let iov: Vec<libc::iovec> =
                        regions.iter().map(|&(p, l)| libc::iovec { iov_base: p as *mut _, iov_len: l }).collect();
                    // SAFETY: the caller of Reader::register_buffers promised these regions stay
                    // valid while the reader lives (an owner the reader keeps until its rings
                    // are gone). A ring can outlive its reader only where the reader was dropped
                    // on this worker, which then runs on: the kernel keeps registered pages
                    // pinned, and reads in flight hold their buffers' owners.
                    let r = unsafe { st.ring.submitter().register_buffers(&iov) };
                    st.registered = r.is_ok();
                    let _ = reply.send(r);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        while !st.free.is_empty() {
            let Some(op) = backlog.pop_front() else { break };
            // Its future dropped while it waited: the buffer goes back unread.
            if op.is_given_up() {
                op.fail_worker_gone();
                continue;
            }
            st.start(op);
        }
        if !open && backlog.is_empty() && st.in_flight() == 0 {
            break;
        }
        match st.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)) => {}
            Err(e) => {
                // Not expected from a healthy ring. Completions may still arrive, and the
                // buffers must stay alive until they do, so back off and try again rather
                // than spin.
                tracing::error!(error = %e, "io_uring_enter failed; retrying");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        let done: Vec<(u64, i32)> = st.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (token, res) in done {
            if token == WAKE {
                wake.in_kernel = false;
                if open {
                    arm_wake(&mut st, &mut wake);
                }
                continue;
            }
            let slot = token as usize;
            let Some(InFlight { mut op, seg }) = st.slots[slot].take() else { continue };
            st.free.push(slot);
            let result = if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(res as usize) };
            match op.advance(&seg, result) {
                Step::Continue => st.start(op),
                Step::Done(r) => op.finish(r),
            }
        }
    }
    // The wake read may still be armed: complete it, so that its buffer can be freed.
    if !wake.in_kernel {
        return;
    }
    let one = 1u64;
    // SAFETY: writes 8 bytes from a valid u64 to the eventfd, which the pool keeps open until
    // this thread has been joined (or, dropped on this thread, leaves open).
    unsafe { libc::write(wake_fd, (&one as *const u64).cast(), 8) };
    loop {
        match st.ring.submit_and_wait(1) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(_) => break,
            Ok(_) => {}
        }
        if st.ring.completion().any(|c| c.user_data() == WAKE) {
            wake.in_kernel = false;
            break;
        }
    }
}

/// The worker's wake read's 8-byte buffer: dropped as any box where no wake read is in the
/// kernel's hands, leaked where one may be.
struct WakeBuf {
    buf: Option<Box<[u8; 8]>>,
    in_kernel: bool,
}

impl Drop for WakeBuf {
    fn drop(&mut self) {
        if self.in_kernel {
            std::mem::forget(self.buf.take());
        }
    }
}
