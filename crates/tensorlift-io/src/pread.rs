//! The pread backend: a pool of threads doing positional reads, for when io_uring is refused.

use crate::process::MadeIn;
use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::op::{FillTarget, ReadOp, Step};
use crate::PAGE;

pub(crate) struct PreadPool {
    tx: Option<Sender<ReadOp>>,
    threads: Vec<JoinHandle<()>>,
    /// The process whose threads these are.
    made: MadeIn,
}

impl std::fmt::Debug for PreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreadPool").field("threads", &self.threads.len()).finish()
    }
}

impl PreadPool {
    pub fn new(threads: usize) -> io::Result<PreadPool> {
        Self::named(threads, "tensorlift-pread")
    }

    /// A pool whose threads are named `name-N`.
    pub fn named(threads: usize, name: &str) -> io::Result<PreadPool> {
        let (tx, rx) = mpsc::channel();
        let rx = Arc::new(Mutex::new(rx));
        let mut pool = PreadPool { tx: Some(tx), threads: Vec::new(), made: MadeIn::here() };
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            pool.threads.push(std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || worker(&rx))?);
        }
        Ok(pool)
    }

    pub fn submit(&self, op: ReadOp) {
        let Some(tx) = &self.tx else { return };
        if let Err(mpsc::SendError(op)) = tx.send(op) {
            op.fail_worker_gone();
        }
    }
}

impl Drop for PreadPool {
    fn drop(&mut self) {
        // Closing the channel lets each thread finish its current read and exit.
        self.tx.take();
        crate::process::join_threads(self.made, self.threads.drain(..));
    }
}

fn worker(rx: &Mutex<Receiver<ReadOp>>) {
    loop {
        let op = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(op) = op else { return };
        run_to_end(op);
    }
}

/// Drives one op with blocking reads until it finishes: a copy of cached pages first,
/// where the op has one to try ([`ReadOp::fill`]).
pub(crate) fn run_to_end(mut op: ReadOp) {
    // Its future dropped while it waited for a worker: the buffer goes back unread.
    if op.is_given_up() {
        return op.fail_worker_gone();
    }
    if let Some(fill) = op.fill.take() {
        if copy_whole(&op, &fill) {
            fill.arena.copied_into(fill.index, op.len);
            op.done = op.len;
            // The arena is let go before the result is: the reader may drop its last
            // reference right after, and expects its memory back in the pool then.
            drop(fill);
            return op.finish(Ok(()));
        }
    }
    loop {
        let seg = op.next_segment();
        // SAFETY: seg.dst points to seg.len writable bytes of the buffer the op owns, and
        // nobody else touches them until the op finishes.
        let n = unsafe { libc::pread(seg.fd, seg.dst.cast(), seg.len as usize, seg.offset as libc::off_t) };
        let result = if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) };
        match op.advance(&seg, result) {
            Step::Continue => {}
            Step::Done(r) => return op.finish(r),
        }
    }
}

/// Fills the op's chunk by copying the file's cached pages in: its bytes (the last page's
/// bytes past them zeroed, as a read leaves them), then the rest of the chunk's pages as zero
/// pages, so that every page of it is present. Where that cannot be done (the file cut
/// short: EFAULT, or a length now short of the bytes copied), the chunk's missing pages
/// become zero pages for the reads to fill (and find the file's end), and `false`.
fn copy_whole(op: &ReadOp, fill: &FillTarget) -> bool {
    // The arena was registered with this descriptor, so it opened (a forked process
    // refuses it, and reads into memory of its own that is not registered).
    let Ok(fd) = crate::fill::fill_fd() else { return false };
    let (dst, pages) = fill.arena.chunk_pages(fill.index);
    let copy = op.len.next_multiple_of(PAGE);
    let fits = op.offset % PAGE as u64 == 0
        && dst == op.dst.0
        && copy <= pages
        && op.offset.checked_add(copy as u64).is_some_and(|end| end <= fill.src_len as u64);
    if fits {
        let src = fill.src.0.wrapping_add(op.offset as usize);
        match copy_in_steps(fd, dst, src, copy) {
            Ok(()) => {
                // SAFETY: [dst + len, dst + copy) lies in the chunk the op owns, whose pages
                // the copy just made present (so this write cannot wait on a fault): what
                // the last page holds past the read's bytes is zeroes, as a read leaves it.
                unsafe { std::ptr::write_bytes(dst.wrapping_add(op.len), 0, copy - op.len) };
                // A file cut inside the last page copied reads as zeroes there, not EFAULT:
                // its length now says whether every byte copied was the file's.
                let end = op.offset + op.len as u64;
                let whole = op.file.current_len().is_ok_and(|now| now >= end);
                if whole && fd.zero(dst.wrapping_add(copy), pages - copy).is_ok() {
                    return true;
                }
            }
            Err(e) => tracing::debug!(file = %op.file.path().display(), offset = op.offset, error = %e,
                "copying cached pages failed; reading instead"),
        }
    }
    // Reads write through the kernel, which fails (EFAULT) rather than wait on a missing
    // registered page: the chunk is readied for them first (where even that fails, the
    // read fails with EFAULT).
    fill.arena.ready_chunk(fill.index);
    false
}

/// Copies `len` bytes from the file's mapping at `src` into the registered `dst` (page
/// multiples), 2 MiB at a time, dropping each step's source pages from the process after it:
/// the copy maps them in (shared page cache, not new memory, but counted in the process's
/// resident size), so a load's resident size stays its tensors', plus a step a thread.
fn copy_in_steps(fd: &crate::fill::FillFd, dst: *mut u8, src: *mut u8, len: usize) -> std::io::Result<()> {
    const STEP: usize = 2 << 20;
    let mut at = 0;
    while at < len {
        let n = STEP.min(len - at);
        // SAFETY: [dst + at, + n) lies in the chunk the op owns (len <= its pages), whose
        // pages are registered and nothing else touches; the source lies inside the file's
        // mapping, which the op's OpenFile keeps, and only the kernel reads it.
        let copied = unsafe { fd.copy(dst.wrapping_add(at), src.wrapping_add(at), n) };
        // SAFETY: [src + at, + n) lies inside the file's read-only shared mapping, which the
        // op's OpenFile keeps and nothing reads through; dropping its page-table entries
        // changes no byte of the file or of any memory of ours.
        unsafe { libc::madvise(src.wrapping_add(at).cast(), n, libc::MADV_DONTNEED) };
        copied?;
        at += n;
    }
    Ok(())
}
