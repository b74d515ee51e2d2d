//! One read request and the state machine every backend drives it with: a direct body for
//! the aligned part, buffered reads for the rest, short reads resubmitted, a refused direct
//! read retried buffered.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use crate::{IoError, OpenFile};

/// Largest single read handed to the kernel (Linux caps one read near 2 GiB).
const MAX_SEGMENT: usize = 1 << 30;

/// A raw destination pointer that travels to a worker thread with the buffer that owns it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SendPtr(pub *mut u8);
// SAFETY: the pointer is only dereferenced (by the kernel or a pread) while the ReadOp that
// carries it also owns the buffer it points into, which is Send.
unsafe impl Send for SendPtr {}

pub(crate) type Completion = Box<dyn FnOnce(Finish) + Send>;

/// How a read ends for its caller.
pub(crate) enum Finish {
    /// With this result, the buffer handed back.
    Done(Result<(), IoError>),
    /// Given up with the read still in the kernel's hands (the worker unwound): the caller
    /// gets this error without the buffer, which is leaked, since the kernel may still
    /// write into it.
    Abandoned(IoError),
}

/// A read in progress. Owns the destination buffer (inside `complete`) until it finishes.
pub(crate) struct ReadOp {
    pub file: Arc<OpenFile>,
    pub dst: SendPtr,
    pub offset: u64,
    pub len: usize,
    pub done: usize,
    pub fixed: Option<u16>,
    pub max_segment: usize,
    /// For a whole chunk of an arena filled by copies: where the copy comes from
    /// ([`crate::fill`]). Tried first; reads fill what it does not.
    pub fill: Option<FillTarget>,
    pub complete: Option<Completion>,
}

/// A chunk of an arena filled by copies, and the file's cached pages to copy in.
pub(crate) struct FillTarget {
    /// The chunk's index in its arena (which gives its pages, from `ReadOp::dst`).
    pub index: usize,
    /// The file's read-only mapping ([`OpenFile::copy_source`]), only ever read by the kernel.
    pub src: SendPtr,
    /// Its page-rounded length.
    pub src_len: usize,
    /// The chunk's arena, which counts what was copied and readies what was not.
    pub arena: Arc<crate::HostArena>,
}

/// One system call's worth of a read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Segment {
    pub fd: RawFd,
    pub direct: bool,
    pub dst: *mut u8,
    pub len: u32,
    pub offset: u64,
}

pub(crate) enum Step {
    /// Issue the next segment.
    Continue,
    /// The read is finished, successfully or not.
    Done(Result<(), IoError>),
}

impl ReadOp {
    /// The next segment to read; callers only ask while `done < len`.
    pub fn next_segment(&self) -> Segment {
        let pos = self.offset + self.done as u64;
        // SAFETY: done < len and the buffer holds len bytes from dst (checked at submission).
        let dst = unsafe { self.dst.0.add(self.done) };
        let rem = self.len - self.done;
        let align = self.file.dio_align();
        let (off_a, mem_a) = (align.offset as usize, align.memory.max(1) as usize);
        let cap = self.max_segment.min(MAX_SEGMENT);
        if let Some(fd) = self.file.direct_fd() {
            if pos % off_a as u64 == 0 && (dst as usize) % mem_a == 0 && rem >= off_a {
                let aligned = rem - rem % off_a;
                let cap = (cap - cap % off_a).max(off_a);
                return Segment { fd, direct: true, dst, len: aligned.min(cap) as u32, offset: pos };
            }
        }
        Segment { fd: self.file.buffered_fd(), direct: false, dst, len: rem.min(cap) as u32, offset: pos }
    }

    /// Accounts for the result of `seg` and says what to do next.
    pub fn advance(&mut self, seg: &Segment, result: io::Result<usize>) -> Step {
        match result {
            // The file ended early: say where it ends now (it may have been cut well before
            // this read's offset), not where the read was.
            Ok(0) => Step::Done(Err(IoError::UnexpectedEof {
                file: self.file.path().to_path_buf(),
                offset: self.offset,
                len: self.len as u64,
                at: self.file.current_len().map_or(seg.offset, |now| now.min(seg.offset)),
            })),
            Ok(n) => {
                self.done += n.min(seg.len as usize);
                if self.done >= self.len {
                    Step::Done(Ok(()))
                } else {
                    Step::Continue
                }
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => Step::Continue,
            Err(e) if seg.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                self.file.disable_direct(format!("O_DIRECT read refused: {e}"));
                Step::Continue
            }
            Err(source) => Step::Done(Err(IoError::Read {
                file: self.file.path().to_path_buf(),
                offset: self.offset,
                len: self.len as u64,
                source,
            })),
        }
    }

    /// Fails the read because no worker can serve it (a bug, never an environment fact).
    pub fn fail_worker_gone(self) {
        let err =
            IoError::WorkerGone { file: self.file.path().to_path_buf(), offset: self.offset, len: self.len as u64 };
        self.finish(Err(err));
    }

    /// Hands the result (and so the buffer) back to the caller. A panic there (the
    /// caller's buffer type, dropped here where its read's future was dropped) is caught:
    /// it must not unwind the worker, whose other reads are in the kernel's hands.
    pub fn finish(mut self, result: Result<(), IoError>) {
        if let Some(complete) = self.complete.take() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| complete(Finish::Done(result))));
        }
    }

    /// Gives the read up while the kernel may still write into its buffer (its worker
    /// unwound): the caller hears of it, and the buffer is leaked, not freed.
    pub fn abandon(mut self) {
        let error =
            IoError::WorkerGone { file: self.file.path().to_path_buf(), offset: self.offset, len: self.len as u64 };
        if let Some(complete) = self.complete.take() {
            complete(Finish::Abandoned(error));
        }
    }
}
