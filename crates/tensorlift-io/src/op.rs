//! One read request and the state machine every backend drives it with: a direct body for
//! the aligned part, buffered reads for the rest, short reads resubmitted, a refused direct
//! read retried buffered.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::{IoError, OpenFile};

/// Largest single read handed to the kernel (Linux caps one read near 2 GiB).
const MAX_SEGMENT: usize = 1 << 30;

/// Times in a row a read may be refused with EAGAIN before a direct read goes on buffered
/// and a buffered one fails. The descriptors read blocking, so the kernel should never
/// refuse; were it to, resubmitting for ever would spin a worker and never end the load.
const MAX_REFUSED: u32 = 1000;

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
    /// EAGAIN answers since the last bytes read ([`MAX_REFUSED`]).
    pub refused: u32,
    pub fixed: Option<u16>,
    pub max_segment: usize,
    /// For a whole chunk of an arena filled by copies: where the copy comes from
    /// ([`crate::fill`]). Tried first; reads fill what it does not.
    pub fill: Option<FillTarget>,
    pub complete: Option<Completion>,
    /// Set when the read's future is dropped before it completed: no one waits for the
    /// bytes, so the read ends before its next segment goes to the kernel.
    pub given_up: Arc<AtomicBool>,
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
                self.refused = 0;
                self.done += n.min(seg.len as usize);
                if self.done >= self.len {
                    Step::Done(Ok(()))
                } else if self.is_given_up() {
                    Step::Done(Err(self.worker_gone()))
                } else {
                    Step::Continue
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Step::Continue,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && self.refused < MAX_REFUSED => {
                self.refused += 1;
                Step::Continue
            }
            // A direct read refused that often: the rest of the file is read buffered, as
            // where O_DIRECT is refused outright.
            Err(e) if seg.direct && e.raw_os_error() == Some(libc::EAGAIN) => {
                self.refused = 0;
                self.file.disable_direct(format!("O_DIRECT read refused {MAX_REFUSED} times in a row: {e}"));
                Step::Continue
            }
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

    /// Whether the read's future was dropped: nobody waits for its bytes.
    pub fn is_given_up(&self) -> bool {
        self.given_up.load(Ordering::Acquire)
    }

    fn worker_gone(&self) -> IoError {
        IoError::WorkerGone { file: self.file.path().to_path_buf(), offset: self.offset, len: self.len as u64 }
    }

    /// Fails the read because no worker can serve it (a bug, never an environment fact),
    /// or because its future was dropped before a worker started it.
    pub fn fail_worker_gone(self) {
        let err = self.worker_gone();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn again() -> io::Result<usize> {
        Err(io::Error::from_raw_os_error(libc::EAGAIN))
    }

    fn op(file: OpenFile, dst: *mut u8, len: usize) -> ReadOp {
        let file = Arc::new(file);
        ReadOp {
            file,
            dst: SendPtr(dst),
            offset: 0,
            len,
            done: 0,
            refused: 0,
            fixed: None,
            max_segment: 8192,
            fill: None,
            complete: None,
            given_up: Arc::default(),
        }
    }

    /// A read the kernel keeps refusing with EAGAIN fails, rather than being resubmitted
    /// for ever; bytes read in between start the count again.
    #[test]
    fn a_read_refused_again_and_again_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [1u8; 64]).unwrap();
        let mut buf = [0u8; 64];
        let mut op = op(OpenFile::open(&path, false, false).unwrap(), buf.as_mut_ptr(), 64);
        op.max_segment = 8;
        let seg = op.next_segment();
        for _ in 0..MAX_REFUSED {
            assert!(matches!(op.advance(&seg, again()), Step::Continue));
        }
        assert!(matches!(op.advance(&seg, Ok(8)), Step::Continue));
        let seg = op.next_segment();
        for _ in 0..MAX_REFUSED {
            assert!(matches!(op.advance(&seg, again()), Step::Continue));
        }
        match op.advance(&seg, again()) {
            Step::Done(Err(IoError::Read { offset: 0, len: 64, source, .. })) => {
                assert_eq!(source.raw_os_error(), Some(libc::EAGAIN))
            }
            _ => panic!("not failed with EAGAIN"),
        }
        // An interrupted read is always resubmitted.
        assert!(matches!(op.advance(&seg, Err(io::Error::from_raw_os_error(libc::EINTR))), Step::Continue));
    }

    /// A direct read refused as often goes on buffered, as where O_DIRECT is refused.
    #[test]
    fn a_direct_read_refused_again_and_again_goes_on_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 16384]).unwrap();
        let file = OpenFile::open(&path, true, false).unwrap();
        if !file.is_direct() {
            eprintln!("skipped: no O_DIRECT here ({:?})", file.buffered_reason());
            return;
        }
        let mut buf = vec![0u8; 3 * 8192];
        let skip = buf.as_ptr().align_offset(8192);
        // SAFETY: skip < 8192, so 8192 bytes from it lie in the buffer.
        let mut op = op(file, unsafe { buf.as_mut_ptr().add(skip) }, 8192);
        let seg = op.next_segment();
        assert!(seg.direct);
        for _ in 0..=MAX_REFUSED {
            assert!(matches!(op.advance(&seg, again()), Step::Continue));
        }
        assert!(!op.file.is_direct() && !op.next_segment().direct);
        assert!(
            op.file.buffered_reason().is_some_and(|r| r.contains("refused 1000 times")),
            "{:?}",
            op.file.buffered_reason()
        );
    }
}
