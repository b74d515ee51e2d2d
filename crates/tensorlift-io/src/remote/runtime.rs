//! The small runtime of this crate's own that every remote request runs on, so that callers
//! need none.

use crate::process::MadeIn;
use std::future::Future;
use std::sync::Mutex;

/// Threads of the runtime that serves remote requests: they copy bodies into buffers, so a
/// few; idle ones cost nothing.
const NET_THREADS: usize = 4;

/// The runtime every remote request runs on, made on first use in each process: a child
/// made by `fork` (Python's multiprocessing, a data loader's workers) has none of its
/// parent's threads, so it makes its own (the parent's is left alone, never dropped there).
/// An error (with why) where the process cannot make its threads.
pub(crate) fn runtime() -> Result<&'static tokio::runtime::Runtime, std::io::Error> {
    static RT: Mutex<Option<(MadeIn, &'static tokio::runtime::Runtime)>> = Mutex::new(None);
    let lock = || RT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let ours = |rt: &Option<(MadeIn, &'static tokio::runtime::Runtime)>| match *rt {
        Some((made, runtime)) if !made.elsewhere() => Some(runtime),
        _ => None,
    };
    if let Some(runtime) = ours(&lock()) {
        return Ok(runtime);
    }
    // Built with the lock released: starting threads takes a while, and a process forked
    // meanwhile (by another thread) would find the lock held forever.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, NET_THREADS);
    let built = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("tensorlift-net")
        .enable_all()
        .build()
        .map_err(|e| std::io::Error::other(format!("cannot start the network runtime: {e}")))?;
    let mut rt = lock();
    if let Some(runtime) = ours(&rt) {
        // Another thread's, made meanwhile: one per process. Ours stops without waiting,
        // which is allowed on an async runtime's thread too.
        drop(rt);
        built.shutdown_background();
        return Ok(runtime);
    }
    // One per process, for the process's life.
    let runtime: &'static tokio::runtime::Runtime = Box::leak(Box::new(built));
    *rt = Some((MadeIn::here(), runtime));
    Ok(runtime)
}

/// The error planning stops with once nobody waits for the plan (a dropped load), local or
/// remote.
pub(crate) fn planning_cancelled() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::Interrupted, "planning was cancelled: nobody waits for the plan")
}

/// A bound on remote work from the options' `plan_timeout`: when it ends, and the error
/// that says so, naming the work.
pub(crate) struct Deadline {
    at: std::time::Instant,
    message: String,
}

impl Deadline {
    /// `timeout` from now, for `what` ("planning", "fetching SHA256SUMS").
    pub(crate) fn plan_timeout(timeout: std::time::Duration, what: &str) -> Deadline {
        let now = std::time::Instant::now();
        // (A time past what the clock counts is a year: never, for one plan or file.)
        let at = now.checked_add(timeout).unwrap_or(now + std::time::Duration::from_secs(365 * 86_400));
        let message = format!(
            "{what} took longer than its plan_timeout ({} s; TENSORLIFT_REMOTE_PLAN_TIMEOUT_SECS) allows",
            timeout.as_secs_f64()
        );
        Deadline { at, message }
    }
}

/// How often [`run_until`] asks whether its caller still waits.
const CANCEL_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Runs `fut` on the network runtime and blocks this thread until it is done (safe on any
/// thread, an async runtime's included: planning blocks as reading a local header does),
/// or until `cancelled` says nobody waits any more (asked every 20 ms), with the error
/// `Interrupted`, or until `deadline` (`TimedOut`, naming what ran long and what set the
/// bound): the task is then aborted, which drops its requests in flight.
pub(crate) fn run_until<F>(
    fut: F,
    cancelled: &dyn Fn() -> bool,
    deadline: &Deadline,
) -> Result<F::Output, std::io::Error>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    if cancelled() {
        return Err(planning_cancelled());
    }
    let (done, result) = std::sync::mpsc::sync_channel(1);
    let handle = runtime()?.spawn(async move {
        // The receiver is gone only once the caller has given up.
        let _ = done.send(fut.await);
    });
    loop {
        match result.recv_timeout(CANCEL_POLL) {
            Ok(output) => return Ok(output),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if cancelled() => {
                handle.abort();
                return Err(planning_cancelled());
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if std::time::Instant::now() >= deadline.at => {
                handle.abort();
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, deadline.message.clone()));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            // The task ended without a result: it panicked.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let why = crate::block_on(handle).err().map_or_else(|| "no result".to_owned(), |e| e.to_string());
                return Err(std::io::Error::other(format!("a network task failed: {why}")));
            }
        }
    }
}
