//! Cancellation and shutdown: buffers outlive the kernel's use of them, and none leak.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tensorlift_io::{AlignedBuf, BackendKind, Faults, IoBufMut};

use crate::support::{pattern, reader, scratch, write_file};

/// A buffer that runs `then` as it is dropped (wherever that is: a worker, where its read's
/// future was dropped).
struct OnDrop(AlignedBuf, Option<Box<dyn FnOnce() + Send>>);
// SAFETY: delegates to AlignedBuf.
unsafe impl IoBufMut for OnDrop {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.0.stable_mut_ptr()
    }
    fn capacity(&self) -> usize {
        self.0.capacity()
    }
}
impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some(then) = self.1.take() {
            then();
        }
    }
}

/// A buffer of `len` bytes that runs `then` as it is dropped.
fn on_drop(len: usize, then: impl FnOnce() + Send + 'static) -> OnDrop {
    OnDrop(AlignedBuf::zeroed(len, 4096).unwrap(), Some(Box::new(then)))
}

/// A buffer of `len` bytes that counts its drops in `drops`.
fn counted(len: usize, drops: &Arc<AtomicUsize>) -> OnDrop {
    let drops = Arc::clone(drops);
    on_drop(len, move || {
        drops.fetch_add(1, Ordering::SeqCst);
    })
}

#[test]
fn dropped_futures_keep_buffers_until_the_kernel_is_done() {
    let dir = scratch(false).unwrap();
    let path = write_file(&dir, "big.bin", &pattern(8 << 20, 11));
    for backend in [BackendKind::Uring, BackendKind::Pread] {
        let drops = Arc::new(AtomicUsize::new(0));
        let r = reader(backend, Faults::default());
        let file = r.open(&path).unwrap();
        let n = 256;
        for i in 0..n {
            let buf = counted(1 << 20, &drops);
            // The future is dropped at once, with the read queued or in flight.
            drop(r.read(&file, (i % 8) << 20, buf, 0, 1 << 20));
        }
        drop(file);
        // Dropping the reader drains what is in flight; then every buffer has been freed.
        drop(r);
        assert_eq!(drops.load(Ordering::SeqCst), n as usize, "{backend:?}");
    }
}

/// The reader's last reference dropped on one of its own workers: the worker does not join
/// itself (a panic there, which would free the buffers of reads still in flight), and every
/// buffer is dropped.
#[test]
fn a_reader_dropped_on_its_own_worker_lets_every_read_finish() {
    let dir = scratch(false).unwrap();
    let path = write_file(&dir, "big.bin", &pattern(8 << 20, 13));
    for backend in [BackendKind::Uring, BackendKind::Pread] {
        let drops = Arc::new(AtomicUsize::new(0));
        let r = Arc::new(reader(backend, Faults::default()));
        let file = r.open(&path).unwrap();
        let n = 64usize;
        for i in 0..n as u64 {
            // The buffer holds a reference to its reader: where its read's future was dropped,
            // it is dropped on the reader's worker, and the last one drops the reader there.
            let (held, counted) = (Arc::clone(&r), Arc::clone(&drops));
            let buf = on_drop(1 << 20, move || {
                drop(held);
                counted.fetch_add(1, Ordering::SeqCst);
            });
            drop(r.read(&file, (i % 8) << 20, buf, 0, 1 << 20));
        }
        drop(file);
        drop(r);
        let until = std::time::Instant::now() + Duration::from_secs(60);
        while drops.load(Ordering::SeqCst) < n && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(drops.load(Ordering::SeqCst), n, "{backend:?}");
    }
}

/// A caller's buffer that panics as it is dropped on the worker does not unwind the worker
/// (whose other reads are in the kernel's hands): its panic is caught, and every other read
/// completes. (Were the worker to unwind another way, its reads in flight are abandoned:
/// their callers hear that the worker is gone, and their buffers are leaked.)
#[test]
fn a_buffer_whose_drop_panics_on_the_worker_leaves_the_other_reads_whole() {
    let dir = scratch(false).unwrap();
    let path = write_file(&dir, "big.bin", &pattern(8 << 20, 14));
    let r = tensorlift_io::Reader::builder().backend(BackendKind::Uring).workers(1).queue_depth(16).build();
    let file = r.open(&path).unwrap();
    // A small read first, its future dropped: its completion drops the buffer, which panics.
    // (A caller's type may panic so; on the worker, where its read's future was dropped.)
    let boom = on_drop(4096, || {
        if !std::thread::panicking() {
            panic!("a caller's buffer panics as it is dropped (on the io_uring worker)");
        }
    });
    drop(r.read(&file, 0, boom, 0, 4096));
    let reads: Vec<_> = (0..64u64)
        .map(|i| r.read(&file, (i % 8) << 20, AlignedBuf::zeroed(1 << 20, 4096).unwrap(), 0, 1 << 20))
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let failed: Vec<String> = reads
            .into_iter()
            .map(tensorlift_io::block_on)
            .filter_map(|r| r.err().map(|f| f.error.to_string()))
            .collect();
        let _ = tx.send(failed);
    });
    let failed = rx.recv_timeout(Duration::from_secs(60)).expect("a read still waits after a minute");
    assert!(failed.is_empty(), "{} reads failed: {:?}", failed.len(), failed.first());
    // The worker is still there: another read goes through it.
    let buf = tensorlift_io::block_on(r.read(&file, 3, vec![0; 10], 0, 10)).unwrap_or_else(|f| panic!("{}", f.error));
    assert_eq!(buf, pattern(8 << 20, 14)[3..13]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_mid_flight_in_async_code() {
    let dir = scratch(false).unwrap();
    let data = pattern(32 << 20, 12);
    let path = write_file(&dir, "big.bin", &data);
    let drops = Arc::new(AtomicUsize::new(0));
    let r = reader(BackendKind::Uring, Faults::default());
    let file = r.open(&path).unwrap();
    let futs: Vec<_> = (0..32).map(|i| r.read(&file, i << 20, counted(1 << 20, &drops), 0, 1 << 20)).collect();
    let all = async {
        for f in futs {
            let _ = f.await;
        }
    };
    // Cancel after a moment, whatever has completed.
    let _ = tokio::time::timeout(Duration::from_micros(200), all).await;
    // The reader still works after a cancellation.
    let buf = r.read(&file, 5, vec![0; 100], 0, 100).await.unwrap_or_else(|f| panic!("{}", f.error));
    assert!(buf == data[5..105]);
    drop(r);
    assert_eq!(drops.load(Ordering::SeqCst), 32);
}

#[test]
fn page_cache_eviction_and_residency() {
    let dir = scratch(false).unwrap();
    let path = write_file(&dir, "c.bin", &pattern(4 << 20, 13));
    std::fs::read(&path).unwrap();
    assert!(tensorlift_io::cache::resident_fraction(&path).unwrap() > 0.99);
    tensorlift_io::cache::evict(&path).unwrap();
    let left = tensorlift_io::cache::resident_fraction(&path).unwrap();
    assert!(left < 0.01, "{left} of the file still cached");
    // A FIFO (no writer: opening it to read would wait forever) is refused at once.
    let fifo = dir.join("fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let (tx, rx) = std::sync::mpsc::channel();
    let f = fifo.clone();
    // (On a thread: an open that waits for a writer fails the test, not hangs it.)
    std::thread::spawn(move || {
        let _ = tx.send([tensorlift_io::cache::evict(&f).err(), tensorlift_io::cache::resident_fraction(&f).err()]);
    });
    // The file system's type as coreutils' stat reads it: a cache beyond the page cache is
    // named for those that have one, and only for those.
    let out = std::process::Command::new("stat").args(["-f", "-c", "%t"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "stat: {}", String::from_utf8_lossy(&out.stderr));
    let magic = u64::from_str_radix(String::from_utf8(out.stdout).unwrap().trim(), 16).unwrap();
    let own = [
        0x2fc1_2fc1,
        0x6969,
        0xff53_4d42,
        0xfe53_4d42,
        0x6573_5546,
        0x4750_4653,
        0x0bd0_0bd0,
        0x00c3_6400,
        0x0102_1997,
    ];
    let beyond = tensorlift_io::cache::cache_beyond_page_cache(&path).unwrap();
    assert_eq!(beyond.is_some(), own.contains(&magic), "{magic:x}: {beyond:?}");
    let errors = rx.recv_timeout(std::time::Duration::from_secs(30)).expect("a FIFO was waited on");
    for e in errors {
        assert_eq!(e.map(|e| e.kind()), Some(std::io::ErrorKind::InvalidInput));
    }
}

/// A process forked from the one that built a reader (a data loader's worker, with the
/// parent's open files) reads through it, on its own thread, since none of the reader's
/// threads are there; and drops it without waiting for them. The parent's reader still reads.
#[test]
fn a_forked_process_reads_through_the_parents_reader_and_drops_it() {
    let dir = scratch(false).unwrap();
    let data = pattern(4 << 20, 13);
    let path = write_file(&dir, "f.bin", &data);
    let readers: Vec<_> = [BackendKind::Uring, BackendKind::Pread].map(|b| reader(b, Faults::default())).into();
    let files: Vec<_> = readers.iter().map(|r| r.open(&path).unwrap()).collect();
    let read_all = |r: &tensorlift_io::Reader, f: &Arc<tensorlift_io::OpenFile>| {
        let buf = r.read(f, 0, AlignedBuf::zeroed(4 << 20, 4096).unwrap(), 0, 4 << 20).wait().map_err(|e| e.error);
        buf.is_ok_and(|b| b.as_slice()[..] == data[..])
    };
    // The parent's threads have work behind them before the fork.
    assert!(readers.iter().zip(&files).all(|(r, f)| read_all(r, f)));
    // SAFETY: the child runs only this reading and dropping (glibc's malloc is fork-safe),
    // and leaves by _exit, running nothing of the parent's at exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let ok = readers.iter().zip(&files).all(|(r, f)| read_all(r, f));
            drop(files.clone());
            drop(readers);
            ok
        }));
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(if matches!(ok, Ok(true)) { 0 } else { 3 }) };
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child, writing its status to a local.
        let done = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if done == pid {
            break;
        }
        if std::time::Instant::now() > deadline {
            // SAFETY: kills our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: reaps it, writing its status to a local.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            panic!("the forked process did not end within a minute (waiting on its parent's threads)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the child's status: {status:#x}");
    assert!(readers.iter().zip(&files).all(|(r, f)| read_all(r, f)));
}

/// A buffer that, as it is dropped, says whether a read wrote into it (its bytes start
/// zero; the file's are not all zero).
struct Inspected(AlignedBuf, std::sync::mpsc::Sender<bool>);
// SAFETY: delegates to AlignedBuf.
unsafe impl IoBufMut for Inspected {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.0.stable_mut_ptr()
    }
    fn capacity(&self) -> usize {
        self.0.capacity()
    }
}
impl Drop for Inspected {
    fn drop(&mut self) {
        let _ = self.1.send(self.0.as_slice().iter().any(|&b| b != 0));
    }
}

/// Reads whose futures are dropped before a worker starts them are not read: their buffers
/// go back unwritten (a dropped load does not go on reading what it had queued), and the
/// reader serves the next read as before.
#[test]
fn reads_given_up_before_they_start_are_not_read() {
    let dir = scratch(false).unwrap();
    let data = pattern(1 << 20, 7);
    assert!(data[..4096].iter().any(|&b| b != 0));
    let path = write_file(&dir, "f.bin", &data);
    for backend in [BackendKind::Uring, BackendKind::Pread] {
        let r = tensorlift_io::Reader::builder().backend(backend).workers(1).pread_threads(1).queue_depth(16).build();
        if backend == BackendKind::Uring && std::env::var_os("TENSORLIFT_REQUIRE_URING").is_some() {
            assert_eq!(r.report().backend, BackendKind::Uring, "{}", r.report().reason);
        }
        let file = r.open(&path).unwrap();
        // The first read's buffer holds the one worker as it is dropped there (its future is
        // dropped at once), until the gate opens: the reads after it wait, given up. (Where
        // the read was done before its future was dropped, the buffer is dropped here, and
        // holds nothing: tried again.)
        let main = std::thread::current().id();
        let (gate, held) = std::sync::mpsc::channel::<()>();
        let mut held = Some(held);
        for _ in 0..100 {
            let (entered, on) = std::sync::mpsc::channel();
            let wait = held.take().unwrap();
            let (back, again) = std::sync::mpsc::channel();
            drop(r.read(
                &file,
                0,
                on_drop(4096, move || {
                    let worker = std::thread::current().id() != main;
                    if worker {
                        let _ = entered.send(true);
                        let _ = wait.recv();
                    } else {
                        let _ = back.send(wait);
                        let _ = entered.send(false);
                    }
                }),
                0,
                4096,
            ));
            if on.recv_timeout(Duration::from_secs(60)).expect("the first read's buffer was kept") {
                break;
            }
            held = again.recv().ok();
        }
        assert!(held.is_none(), "{backend:?}: the first read was always done before its future was dropped");
        let (tx, written) = std::sync::mpsc::channel();
        let n = 8;
        for i in 0..n {
            let buf = Inspected(AlignedBuf::zeroed(4096, 4096).unwrap(), tx.clone());
            drop(r.read(&file, i * 4096, buf, 0, 4096));
        }
        gate.send(()).unwrap();
        for _ in 0..n {
            let was = written.recv_timeout(Duration::from_secs(60)).expect("a given-up read's buffer was kept");
            assert!(!was, "{backend:?}: a read given up before it started was read");
        }
        let got = r.read(&file, 4096, AlignedBuf::zeroed(4096, 4096).unwrap(), 0, 4096).wait().unwrap();
        assert_eq!(got.as_slice(), &data[4096..8192], "{backend:?}");
    }
}
