//! A verified load's shards, hashed as their chunks land.
//!
//! SHA-256 reads a file's bytes in order, so each shard's chunks go to a thread of its own,
//! which hashes them in file order (a chunk that lands early waits for the ones before it),
//! hands each chunk back once it is hashed where the sink wants it back, and, once the last
//! one is hashed, reports the file's digest and the hash of its header's bytes, which the
//! sink compares with the header that planning parsed
//! ([`tensorlift_format::header_hash`]). Shards are hashed in parallel, one thread each; a
//! shard is hashed while it is read, so that only its last chunk is left to hash when its
//! last byte lands.
//!
//! The host sink hashes the chunks of its arenas once they have landed (nothing comes
//! back); the CUDA sink hashes each pinned chunk before it copies it to the device, and
//! gets the chunk back to copy.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Waker};

use sha2::Digest as _;

use crate::digest::Sha256;

/// A landed chunk, whose bytes a hashing thread reads.
pub(crate) trait Landed: Send + 'static {
    /// The chunk's bytes: the file's, from the chunk's first byte.
    fn bytes(&self) -> &[u8];
}

/// What the hashing reports.
pub(crate) enum Hashed<T> {
    /// A chunk of span `span` is hashed: here it is back (only where the sink asked for its
    /// chunks back).
    Chunk { span: usize, item: T },
    /// Every byte of span `span`'s file is hashed: its digest, and the hash of its first
    /// `header_len` bytes (`None` where they could not be held: memory).
    Shard { span: usize, digest: Sha256, header: Option<u64> },
    /// Span `span`'s hashing ended without a digest (its thread ended early: a bug): the
    /// load must fail, since its tensors can never be released.
    Failed { span: usize },
}

/// One shard's hashing, in file order.
struct InOrder<T> {
    span: usize,
    chunks: usize,
    header_len: usize,
    next: usize,
    early: BTreeMap<usize, T>,
    hasher: sha2::Sha256,
    hashed: usize,
    /// The header's bytes, where they span several chunks.
    header_bytes: Vec<u8>,
    header: Option<u64>,
    give_back: bool,
}

impl<T: Landed> InOrder<T> {
    fn new(span: usize, chunks: usize, header_len: usize, give_back: bool) -> Self {
        InOrder {
            span,
            chunks,
            header_len,
            next: 0,
            early: BTreeMap::new(),
            hasher: sha2::Sha256::new(),
            hashed: 0,
            header_bytes: Vec::new(),
            header: None,
            give_back,
        }
    }

    /// Takes chunk `index` and hashes every chunk now in order, sending what is done to
    /// `out`. Returns whether the shard is done.
    fn feed(&mut self, index: usize, item: T, out: &mpsc::Sender<Hashed<T>>, cancel: &AtomicBool) -> bool {
        self.early.insert(index, item);
        while let Some(item) = self.early.remove(&self.next) {
            if cancel.load(Ordering::Relaxed) {
                return true;
            }
            let bytes = item.bytes();
            self.header_part(bytes);
            // In steps of 1 MiB, with the cancel checked between them: a chunk may be up to
            // 1 GiB, and a dropped load waits for its hashing threads to stop.
            for step in bytes.chunks(1 << 20) {
                if cancel.load(Ordering::Relaxed) {
                    return true;
                }
                self.hasher.update(step);
            }
            self.hashed += bytes.len();
            self.next += 1;
            if self.give_back {
                let _ = out.send(Hashed::Chunk { span: self.span, item });
            }
        }
        if self.next < self.chunks {
            return false;
        }
        let digest = Sha256(std::mem::take(&mut self.hasher).finalize().into());
        let _ = out.send(Hashed::Shard { span: self.span, digest, header: self.header });
        true
    }

    /// Hashes the part of the header in `bytes` (the chunk after `self.hashed` bytes).
    fn header_part(&mut self, bytes: &[u8]) {
        if self.hashed >= self.header_len {
            return;
        }
        let want = self.header_len - self.hashed;
        if self.hashed == 0 && bytes.len() >= want {
            self.header = Some(tensorlift_format::header_hash(&bytes[..want]));
            return;
        }
        // A header longer than a chunk (planning held it whole too): gathered, fallibly.
        if self.hashed == 0 && self.header_bytes.try_reserve_exact(self.header_len).is_err() {
            self.header_len = 0;
            return;
        }
        let part = &bytes[..want.min(bytes.len())];
        self.header_bytes.extend_from_slice(part);
        if self.header_bytes.len() == self.header_len {
            self.header = Some(tensorlift_format::header_hash(&self.header_bytes));
            self.header_bytes = Vec::new();
        }
    }
}

/// Where a span's chunks go.
enum Route<T> {
    /// To the span's thread.
    Thread(mpsc::Sender<(usize, T)>),
    /// Hashed on the load's thread, where no thread could be had.
    Here(Box<InOrder<T>>),
    /// Nowhere: the span's thread ended early; `reported` once the load has taken its
    /// `Failed` (until then the hashing is busy).
    Dead { reported: bool },
}

/// A hashing thread's last word: `Failed` for its span, unless it finished or the load was
/// cancelled (a thread that panics still reports, so the load fails rather than waits).
struct LastWord<T> {
    span: usize,
    out: mpsc::Sender<Hashed<T>>,
    waker: Arc<Mutex<Option<Waker>>>,
    finished: bool,
}

impl<T> Drop for LastWord<T> {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.out.send(Hashed::Failed { span: self.span });
        }
        wake(&self.waker);
    }
}

/// Wakes the load (the waker is taken out of its lock first: a waker can run the task, and
/// the task can drop the hashing, which takes the lock).
fn wake(waker: &Mutex<Option<Waker>>) {
    let w = waker.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(w) = w {
        w.wake();
    }
}

/// The hashing of a load's verified shards, by span.
pub(crate) struct Hashers<T> {
    /// Each span's chunk count and header length, where it is verified.
    shape: Vec<Option<(usize, usize)>>,
    routes: Vec<Option<Route<T>>>,
    give_back: bool,
    /// (In a mutex: a stream is shared between threads, and a receiver is not.)
    results: Mutex<mpsc::Receiver<Hashed<T>>>,
    sender: mpsc::Sender<Hashed<T>>,
    waker: Arc<Mutex<Option<Waker>>>,
    /// Set when the load ends early: a hashing thread stops at its next chunk.
    cancel: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Chunks sent that have not come back yet (where they come back), by span.
    chunks_out: Vec<usize>,
    /// Tests: hash on the load's thread, as where no thread can be had.
    #[cfg(test)]
    inline: bool,
}

impl<T: Landed> Hashers<T> {
    /// The hashing of the spans that `shape` gives a chunk count and header length for;
    /// chunks come back through [`poll`](Self::poll) where `give_back`.
    pub(crate) fn new(shape: Vec<Option<(usize, usize)>>, give_back: bool) -> Self {
        let (sender, results) = mpsc::channel();
        Hashers {
            routes: shape.iter().map(|_| None).collect(),
            give_back,
            results: Mutex::new(results),
            sender,
            waker: Arc::default(),
            cancel: Arc::default(),
            threads: Vec::new(),
            chunks_out: vec![0; shape.len()],
            shape,
            #[cfg(test)]
            inline: false,
        }
    }

    /// Whether span `span` is hashed.
    pub(crate) fn hashes(&self, span: usize) -> bool {
        self.shape.get(span).is_some_and(Option::is_some)
    }

    /// Hands chunk `index` of span `span` over (the span's thread starts with its first).
    pub(crate) fn send(&mut self, span: usize, index: usize, item: T) {
        let Some(&Some((chunks, header_len))) = self.shape.get(span) else { return };
        if self.routes[span].is_none() {
            self.routes[span] = Some(self.spawn(span, chunks, header_len));
        }
        if self.give_back {
            self.chunks_out[span] += 1;
        }
        match &mut self.routes[span] {
            Some(Route::Thread(tx)) => {
                if let Err(mpsc::SendError((_, item))) = tx.send((index, item)) {
                    // The thread is gone (it reports Failed, or the load was cancelled).
                    drop(item);
                    self.routes[span] = Some(Route::Dead { reported: false });
                    if self.give_back {
                        self.chunks_out[span] -= 1;
                    }
                }
            }
            // Kept until `poll` takes the digest, so that the hashing is busy until then.
            Some(Route::Here(h)) => {
                h.feed(index, item, &self.sender, &self.cancel);
            }
            Some(Route::Dead { .. }) | None => {
                drop(item);
                if self.give_back {
                    self.chunks_out[span] -= 1;
                }
            }
        }
    }

    fn spawn(&mut self, span: usize, chunks: usize, header_len: usize) -> Route<T> {
        let give_back = self.give_back;
        #[cfg(test)]
        if self.inline {
            return Route::Here(Box::new(InOrder::new(span, chunks, header_len, give_back)));
        }
        let (tx, rx) = mpsc::channel::<(usize, T)>();
        let (out, waker, cancel) = (self.sender.clone(), Arc::clone(&self.waker), Arc::clone(&self.cancel));
        let spawned = std::thread::Builder::new().name("tensorlift-sha256".into()).spawn(move || {
            let mut last = LastWord { span, out: out.clone(), waker: Arc::clone(&waker), finished: false };
            let mut h = InOrder::new(span, chunks, header_len, give_back);
            while let Ok((index, item)) = rx.recv() {
                let done = h.feed(index, item, &out, &cancel);
                wake(&waker);
                if done {
                    break;
                }
            }
            // Done, or cancelled (a load that ended early hears nothing more).
            last.finished = h.next >= h.chunks || cancel.load(Ordering::Relaxed);
        });
        match spawned {
            Ok(t) => {
                self.threads.push(t);
                Route::Thread(tx)
            }
            Err(e) => {
                tracing::debug!(error = %e, span, "no hashing thread: the shard is hashed on the load's");
                Route::Here(Box::new(InOrder::new(span, chunks, header_len, give_back)))
            }
        }
    }

    /// What is done: chunks back and shards hashed. Registers `cx`'s waker first, so that
    /// what is done after the results are taken still wakes the load.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Vec<Hashed<T>> {
        *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
        let done: Vec<Hashed<T>> = self.results.lock().unwrap_or_else(|p| p.into_inner()).try_iter().collect();
        for d in &done {
            match *d {
                Hashed::Chunk { span, .. } => self.chunks_out[span] = self.chunks_out[span].saturating_sub(1),
                Hashed::Shard { span, .. } => self.routes[span] = None,
                // What the thread held is gone with it.
                Hashed::Failed { span } => {
                    self.routes[span] = Some(Route::Dead { reported: true });
                    self.chunks_out[span] = 0;
                }
            }
        }
        done
    }

    /// Whether chunks or digests are still to come back.
    pub(crate) fn busy(&self) -> bool {
        let waiting = |r: &Option<Route<T>>| !matches!(r, None | Some(Route::Dead { reported: true }));
        self.chunks_out.iter().any(|&n| n > 0) || self.routes.iter().any(waiting)
    }
}

impl<T> Hashers<T> {
    /// Stops the hashing threads at their next chunk and waits for them: nothing of a load
    /// runs on after it ends (but the thread this runs on, if it is one of them: a task can
    /// be dropped by the waker a hashing thread wakes). The chunks they held are dropped.
    pub(crate) fn stop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        // A thread waiting for its next chunk sees its channel closed.
        self.routes.iter_mut().for_each(|r| *r = None);
        let me = std::thread::current().id();
        for t in self.threads.drain(..) {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
        // Chunks handed back but not taken.
        self.results.lock().unwrap_or_else(|p| p.into_inner()).try_iter().for_each(drop);
        self.chunks_out.iter_mut().for_each(|n| *n = 0);
    }
}

impl<T> Drop for Hashers<T> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// For a verified load of `spans` (whole files: `layout::whole_files`) read as `reads`:
/// each span's check (`None` where its shard has no expected digest, by shard in `checks`),
/// and the hashing of the spans that have one.
pub(crate) fn verify_spans<T: Landed>(
    plan: &tensorlift_format::LoadPlan,
    spans: &[crate::layout::Span],
    reads: &[crate::layout::Read],
    checks: &[Option<(Sha256, crate::digest::DigestSource)>],
    give_back: bool,
) -> (Vec<Option<Check>>, Hashers<T>) {
    let mut chunks = vec![0usize; spans.len()];
    for r in reads {
        chunks[r.span] += 1;
    }
    let span_checks: Vec<Option<Check>> = spans
        .iter()
        .map(|span| checks.get(span.shard).cloned().flatten().map(|(want, by)| Check::new(want, by)))
        .collect();
    // A whole file's header is its first bytes.
    let shape = (spans.iter().zip(&span_checks).zip(chunks))
        .map(|((span, check), n)| {
            let shard = &plan.shards()[span.shard];
            check.as_ref().map(|_| (n, shard.data_start().min(shard.file_len) as usize))
        })
        .collect();
    (span_checks, Hashers::new(shape, give_back))
}

/// A shard that a verified load checks before any of its tensors is handed out.
pub(crate) struct Check {
    pub expected: Sha256,
    pub expected_by: crate::digest::DigestSource,
    /// Its tensors complete so far, held until the check.
    pub held: Vec<crate::Tensor>,
}

impl Check {
    pub(crate) fn new(expected: Sha256, expected_by: crate::digest::DigestSource) -> Self {
        Check { expected, expected_by, held: Vec::new() }
    }

    /// The shard is hashed (`digest`, and `header`, the hash of its header's bytes): its
    /// held tensors, if the digest is the expected one and the header the one planning
    /// parsed (else the file was rewritten after planning, and the tensors laid out by the
    /// planned header are not the file's).
    /// (`root`: the checkpoint's folder, where the shard has its name.)
    pub(crate) fn settle(
        self,
        root: &std::path::Path,
        shard: &tensorlift_format::Shard,
        digest: Sha256,
        header: Option<u64>,
    ) -> Result<Vec<crate::Tensor>, crate::LoadError> {
        if digest != self.expected {
            // Named as the folder names it (the blob a hub cache snapshot's file resolves
            // to is named where the expected digest came from).
            return Err(crate::LoadError::Checksum {
                file: crate::digest::named_path(root, shard),
                expected: self.expected,
                actual: digest,
                expected_by: self.expected_by,
            });
        }
        match header {
            Some(h) if h == shard.header_hash => Ok(self.held),
            Some(_) => Err(crate::LoadError::ShardChanged {
                file: shard.path.clone(),
                what: "its header is not the one planned (the file was rewritten after planning)".into(),
            }),
            None => Err(crate::LoadError::OutOfMemory { file: shard.path.clone(), bytes: shard.data_start() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Bytes(Vec<u8>);
    impl Landed for Bytes {
        fn bytes(&self) -> &[u8] {
            &self.0
        }
    }

    /// Feeds `data` in chunks of `chunk` bytes, in the order `order` gives, and returns what
    /// came out.
    fn run(data: &[u8], chunk: usize, header_len: usize, order: &[usize]) -> (Vec<Hashed<Bytes>>, bool) {
        let chunks = data.len().div_ceil(chunk);
        let (tx, rx) = mpsc::channel();
        let cancel = AtomicBool::new(false);
        let mut h = InOrder::new(7, chunks, header_len, true);
        let mut done = false;
        for &i in order {
            let part = data[i * chunk..((i + 1) * chunk).min(data.len())].to_vec();
            done = h.feed(i, Bytes(part), &tx, &cancel);
        }
        (rx.try_iter().collect(), done)
    }

    #[test]
    fn chunks_are_hashed_in_file_order_whatever_order_they_land_in() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let whole = Sha256(sha2::Sha256::digest(&data).into());
        // A header within the first chunk, and one over three chunks.
        for header_len in [50, 250] {
            let (out, done) = run(&data, 100, header_len, &[3, 0, 2, 1, 9, 5, 4, 8, 6, 7]);
            assert!(done);
            let back: Vec<u8> = out
                .iter()
                .filter_map(|h| match h {
                    Hashed::Chunk { item, .. } => Some(item.0.clone()),
                    _ => None,
                })
                .flatten()
                .collect();
            assert_eq!(back, data, "chunks come back in file order");
            match out.last() {
                Some(Hashed::Shard { span: 7, digest, header }) => {
                    assert_eq!(*digest, whole);
                    assert_eq!(*header, Some(tensorlift_format::header_hash(&data[..header_len])));
                }
                _ => panic!("no digest"),
            }
        }
        // Until the first chunk lands, nothing is hashed.
        let (out, done) = run(&data, 100, 50, &[1, 2, 3]);
        assert!(out.is_empty() && !done);
    }

    fn poll_now<T: Landed>(h: &mut Hashers<T>) -> Vec<Hashed<T>> {
        h.poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn hashing_on_the_loads_thread_stays_busy_until_its_digest_is_taken() {
        // Where no thread can be had, a shard is hashed as its chunks are sent; the load
        // must still see its digest (it once ended the load with the digest unread).
        let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let mut h = Hashers::new(vec![None, Some((3, 10))], false);
        h.inline = true;
        for i in [2, 0, 1] {
            h.send(1, i, Bytes(data[i * 100..(i + 1) * 100].to_vec()));
        }
        assert!(h.busy(), "the digest is not taken yet");
        let done = poll_now(&mut h);
        assert!(matches!(done.as_slice(), [Hashed::Shard { span: 1, .. }]));
        assert!(!h.busy());
    }

    struct Boom;
    impl Landed for Boom {
        fn bytes(&self) -> &[u8] {
            panic!("a hashing thread's bug")
        }
    }

    #[test]
    fn a_hashing_thread_that_dies_fails_its_shard() {
        let mut h = Hashers::new(vec![Some((2, 10))], true);
        h.send(0, 0, Boom);
        let started = std::time::Instant::now();
        let done = loop {
            let done = poll_now(&mut h);
            if !done.is_empty() || started.elapsed() > std::time::Duration::from_secs(10) {
                break done;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!(matches!(done.as_slice(), [Hashed::Failed { span: 0 }]));
        // Its chunk went with it; a later chunk goes nowhere; nothing is left to wait for.
        h.send(0, 1, Boom);
        assert!(!h.busy());
    }
}
