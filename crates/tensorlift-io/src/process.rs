//! Which process made a value: [`MadeIn`]; and joining a value's threads: [`join_threads`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

/// The process a value was made in. A process forked from that one (Python's
/// multiprocessing, a data loader's workers) has none of its threads, and shares its
/// descriptors with it (io_uring rings, eventfds, sockets, a userfaultfd that serves the
/// parent's address space): there, such a value is not used as it is.
///
/// Told by the process id and by a count of forks that a `pthread_atfork` handler keeps in
/// each child: a child in a new PID namespace can have its parent's id (the parent is 1 in
/// a container, and so is the child in its own namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MadeIn {
    pid: u32,
    forks: u64,
}

/// Forks this process is down from its first [`MadeIn`]: each child adds one.
static FORKS: AtomicU64 = AtomicU64::new(0);

extern "C" fn forked_child() {
    // (Async-signal-safe: an atomic add.)
    FORKS.fetch_add(1, Ordering::Relaxed);
}

fn forks() -> u64 {
    // Registered once, without a lock (a `Once` caught running by a fork would block every
    // later call in the child).
    static REGISTERED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !REGISTERED.swap(true, Ordering::AcqRel) {
        // SAFETY: registers a child handler that only adds to an atomic; a failure (ENOMEM)
        // leaves the process id alone to tell a fork, as before.
        let _ = unsafe { libc::pthread_atfork(None, None, Some(forked_child)) };
    }
    FORKS.load(Ordering::Relaxed)
}

impl MadeIn {
    /// This process.
    pub fn here() -> MadeIn {
        MadeIn { pid: std::process::id(), forks: forks() }
    }

    /// Whether this is another process than the one it was made in (a forked one).
    pub fn elsewhere(self) -> bool {
        self != MadeIn::here()
    }
}

/// Joins a value's threads, made in `made`: in a forked process, which has none of them,
/// their handles are forgotten (a handle's drop would detach a thread of this process that
/// reuses the parent's thread's descriptor); a thread does not join itself (the value's
/// last reference can be dropped on one of its own threads: it is left to end on its own).
pub fn join_threads(made: MadeIn, threads: impl IntoIterator<Item = JoinHandle<()>>) {
    if made.elsewhere() {
        threads.into_iter().for_each(std::mem::forget);
        return;
    }
    let me = std::thread::current().id();
    for t in threads {
        if t.thread().id() != me {
            // A panic in a thread (a bug) is not the caller's failure.
            let _ = t.join();
        }
    }
}
