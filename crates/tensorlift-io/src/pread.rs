//! The pread backend: a pool of threads doing positional reads, for when io_uring is refused.

use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::op::{ReadOp, Step};

pub(crate) struct PreadPool {
    tx: Option<Sender<ReadOp>>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for PreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreadPool").field("threads", &self.threads.len()).finish()
    }
}

impl PreadPool {
    pub fn new(threads: usize) -> io::Result<PreadPool> {
        let (tx, rx) = mpsc::channel();
        let rx = Arc::new(Mutex::new(rx));
        let mut pool = PreadPool { tx: Some(tx), threads: Vec::new() };
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            pool.threads
                .push(std::thread::Builder::new().name(format!("tensorlift-pread-{i}")).spawn(move || worker(&rx))?);
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
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
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

/// Drives one op with blocking reads until it finishes.
pub(crate) fn run_to_end(mut op: ReadOp) {
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
