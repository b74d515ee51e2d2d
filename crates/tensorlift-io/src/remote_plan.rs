//! Planning a remote checkpoint: its index or its listing, then each shard's header by
//! ranged GETs, validated under the same limits as a local checkpoint's. It sits beside
//! `checkpoint` (whose shared planning steps it uses) and above `remote` (whose stores,
//! objects and cache it uses); neither imports it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectMeta, ObjectStoreExt};
use tensorlift_format::{
    header_len, natural_cmp, parse_index, FileIdentity, FormatError, HEADER_PREFIX_LEN, INDEX_FILE_NAME, MAX_INDEX_LEN,
};

use crate::checkpoint::{
    assemble, header_fits, index_fits, index_shards, is_torch_entry, no_torch_weights, open_local, safetensors_only,
    spend_header_budget, torch_header, torch_refused, Checkpoint, HeaderWork, Pending, PlanLimits, PlanObserver, Quiet,
    SAFETENSORS_ONLY, TORCH_INDEX, TORCH_SINGLE,
};
use crate::remote::cache;
use crate::remote::get::{body, body_into, RemoteFolder};
use crate::remote::meta::{identity, modified_ns};
use crate::remote::runtime::{planning_cancelled, run_until, Deadline};
use crate::remote::store::{self, store_error, Place, RemoteObject};

/// Bytes of a shard read at once to find its header: most headers fit, and the rest of a
/// longer one is read by a second GET.
pub(crate) const HEADER_GUESS: u64 = 64 << 10;

/// Shards whose first bytes are fetched at once while planning.
const HEADER_FETCHES: usize = 16;

/// Objects a folder's listing may go through, at most (its subfolders' included).
const MAX_LISTED: usize = 100_000;

/// A single file checkpoint is named by its URL.
const SINGLE_FILE: &str = "model.safetensors";

/// The blocks a PyTorch file's small reads (its zip directory, each record's header) are
/// fetched in while planning, and how many are kept.
const TORCH_BLOCK: u64 = 16 << 10;
const TORCH_BLOCKS_KEPT: usize = 256;

/// What a remote URL names, in the folder it resolves to.
enum Named {
    /// An index (`….json`).
    Index(String),
    /// One shard (`….safetensors`).
    Shard(String),
    /// A PyTorch file (`….bin`, `….pt`, `….pth`).
    Torch(String),
    /// The folder itself: its index, else its listing.
    Folder,
}

/// The folder a URL's path resolves to and what in it the URL names: a last part that is
/// no file of a checkpoint is a folder named without its trailing slash.
fn resolve(place: Place, last: Option<String>) -> io::Result<(Place, Named)> {
    Ok(match last {
        Some(name) if name.ends_with(".json") => (place, Named::Index(name)),
        Some(name) if name.ends_with(".safetensors") => (place, Named::Shard(name)),
        Some(name) if [".bin", ".pt", ".pth"].iter().any(|e| name.ends_with(e)) => (place, Named::Torch(name)),
        Some(folder) => (place.folder(&folder)?, Named::Folder),
        None => (place, Named::Folder),
    })
}

/// Plans the remote checkpoint at `path`: an `…/x.safetensors` object or a PyTorch file, an
/// `…/x.json` index, or a folder (its `model.safetensors.index.json`, else its
/// `*.safetensors` objects in natural order, else its `pytorch_model.bin.index.json` or
/// `pytorch_model.bin`; over HTTP, which lists nothing, its `model.safetensors`).
///
/// Planning stops when `observer` says it is [cancelled](PlanObserver::cancelled) (a load
/// that was dropped), its requests in flight dropped with it.
pub(crate) fn open_remote(
    path: &Path,
    limits: &PlanLimits,
    observer: &dyn PlanObserver,
) -> Result<Checkpoint, FormatError> {
    let cancelled = || observer.cancelled();
    // One bound on the whole planning's time, whatever each request's.
    let deadline = &Deadline::plan_timeout(limits.remote.plan_timeout, "planning");
    // (The URL as printed: one that carries credentials is refused, and the refusal names it.)
    let io_err = |source| FormatError::Io { file: crate::remote::redact_url(path).into_owned(), source };
    let text = path.to_str().ok_or_else(|| FormatError::NotACheckpoint { file: path.to_path_buf() })?;
    let (place, last) = store::connect(text, &limits.remote).map_err(io_err)?;
    let (place, named) = resolve(place, last).map_err(io_err)?;
    // A whole local copy of every object, unchanged on the store, is planned locally; copies
    // are read only from a cache folder no one else may write to.
    let cache_dir = limits.remote.cache_dir.clone().filter(|root| match cache::trusted(root) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => {
            tracing::warn!("{}: not used as a cache: {e}", root.display());
            false
        }
    });
    if let Some(root) = cache_dir {
        let (p, name, lim) = (place.clone(), cached_entry(&named), limits.clone());
        let found =
            name.map(|n| run_until(async move { cached(&p, &n, &root, &lim).await }, &cancelled, deadline)).transpose();
        if let Some((local, files)) = found.map_err(io_err)?.flatten() {
            // Told only to stop: a load that started reading the copy early could not go on
            // with the store's plan, should the copy turn out unusable.
            match open_local(&local, limits, &OnlyCancel(observer)) {
                // The plan holds the very files that were checked (its descriptors are read).
                Ok(mut plan) if planned_files(&plan) == files => {
                    tracing::info!("{}: read from its local copy {}", path.display(), local.display());
                    plan.mark_copy_of(path);
                    return Ok(plan);
                }
                Ok(_) => tracing::warn!("{}: its local copy changed while it was checked", path.display()),
                Err(e) if observer.cancelled() => return Err(e),
                Err(e) => tracing::warn!("{}: its local copy cannot be planned: {e}", path.display()),
            }
        }
    }
    let limits = limits.clone();
    run_until(async move { plan(place, named, limits).await }, &cancelled, deadline).map_err(io_err)?
}

/// An observer that passes on only whether planning is [cancelled](PlanObserver::cancelled).
struct OnlyCancel<'a>(&'a dyn PlanObserver);

impl PlanObserver for OnlyCancel<'_> {
    fn cancelled(&self) -> bool {
        self.0.cancelled()
    }
}

/// The object whose local copy stands for what `named` names: the index or shard named, a
/// folder's index; `None` for what has no copy (a PyTorch file).
fn cached_entry(named: &Named) -> Option<String> {
    match named {
        Named::Index(name) | Named::Shard(name) => Some(name.clone()),
        Named::Folder => Some(INDEX_FILE_NAME.to_owned()),
        Named::Torch(_) => None,
    }
}

/// The files (device, inode) of a local plan: its shards and its index, sorted.
fn planned_files(plan: &Checkpoint) -> Vec<(u64, u64)> {
    let mut files: Vec<(u64, u64)> = plan.shards().iter().map(|s| (s.identity.dev, s.identity.ino)).collect();
    files.extend(plan.index_identity().map(|i| (i.dev, i.ino)));
    files.sort_unstable();
    files
}

/// `local`'s file (device, inode), where it is a whole copy of the object at `location` as
/// the store describes it now (one HEAD).
async fn fresh(
    store: &Arc<dyn object_store::ObjectStore>,
    location: ObjectPath,
    url: String,
    local: PathBuf,
) -> Option<(u64, u64)> {
    let meta = store.head(&location).await.ok()?;
    cache::usable(&local, &cache::Note::of(&url, &meta))
}

/// The local copy to plan from instead of the store, and the files (device, inode) its
/// plan must hold: the cached index or file `name`, where the cache holds a whole copy of it
/// and of every shard it names, each a copy of the object as the store describes it now (one
/// HEAD each, and the first that differs ends the check). `None` otherwise, or for a folder
/// without an index (whose listing could have changed).
async fn cached(place: &Place, name: &str, root: &Path, limits: &PlanLimits) -> Option<(PathBuf, Vec<(u64, u64)>)> {
    let copy_of = |name: &str| -> Option<(ObjectPath, String, PathBuf)> {
        let (location, url) = place.child(name).ok()?;
        let local = cache::local_path(root, &place.shared.cache_key, &location)?;
        // No copy here at all: nothing to ask the store.
        std::fs::symlink_metadata(&local).ok()?;
        Some((location, url.to_str()?.to_owned(), local))
    };
    let store = &place.shared.store;
    let (location, url, local) = copy_of(name)?;
    let entry = fresh(store, location, url, local.clone()).await?;
    let mut files = vec![entry];
    if !name.ends_with(".safetensors") {
        // The shards the cached index names, each checked.
        let bytes = cache::read_small(&local, entry, MAX_INDEX_LEN)?;
        index_fits(&local, bytes.len() as u64).ok()?;
        let index = parse_index(&local, &bytes).ok()?;
        let names = index_shards(&local, &index, limits).ok()?;
        let checks: Vec<_> = names.iter().map(|(n, _)| copy_of(n)).collect::<Option<_>>()?;
        let mut heads = futures_util::stream::iter(checks.into_iter().map(|(l, u, p)| fresh(store, l, u, p)))
            .buffered(HEADER_FETCHES);
        while let Some(file) = heads.next().await {
            files.push(file?);
        }
    }
    files.sort_unstable();
    Some((local, files))
}

async fn plan(place: Place, named: Named, limits: PlanLimits) -> Result<Checkpoint, FormatError> {
    match named {
        Named::Index(name) => {
            let index = fetch_index(&place, &name).await?.ok_or_else(|| not_found(&place, &name))?;
            plan_index(&place, &name, index, &limits).await
        }
        Named::Shard(name) | Named::Torch(name) => {
            let context = place.child(&name).map_err(|e| io(&place, e))?.1;
            shards(&place, &context, None, vec![(name, Vec::new())], &limits).await
        }
        Named::Folder => {
            if let Some(index) = fetch_index(&place, INDEX_FILE_NAME).await? {
                return plan_index(&place, INDEX_FILE_NAME, index, &limits).await;
            }
            let (names, torch) = list_safetensors(&place, &limits).await?;
            let root = PathBuf::from(&place.url);
            if names.is_empty() {
                // Where there are no safetensors, the hub's PyTorch names, as in a local folder:
                // its index (while it is there), else its single file.
                let Some(first) = torch.first().map(|n| root.join(n)) else {
                    return Err(FormatError::NoShards { file: root });
                };
                if safetensors_only() {
                    return Err(FormatError::PyTorchCheckpoint { file: first, layout: SAFETENSORS_ONLY });
                }
                if torch.iter().any(|n| n == TORCH_INDEX) {
                    if let Some(index) = fetch_index(&place, TORCH_INDEX).await? {
                        return plan_index(&place, TORCH_INDEX, index, &limits).await;
                    }
                }
                if torch.iter().any(|n| n == TORCH_SINGLE) {
                    return shards(&place, &root, None, vec![(TORCH_SINGLE.to_owned(), Vec::new())], &limits).await;
                }
                return Err(no_torch_weights(first));
            }
            let names = names.into_iter().map(|n| (n, Vec::new())).collect();
            shards(&place, &root, None, names, &limits).await
        }
    }
}

/// An index object's meta and bytes, bounded; `None` where there is none.
async fn fetch_index(place: &Place, name: &str) -> Result<Option<(ObjectMeta, Vec<u8>)>, FormatError> {
    let (location, url) = place.child(name).map_err(|e| io(place, e))?;
    let reply = match place.shared.store.get_opts(&location, GetOptions::default()).await {
        Ok(r) => r,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(FormatError::Io { file: url, source: store_error(e) }),
    };
    let len = reply.meta.size;
    index_fits(&url, len)?;
    let meta = reply.meta.clone();
    let bytes = body(reply, len, &url).await?;
    // Kept beside the shards' copies: the next load plans from it.
    if let (Some(root), Some(text)) = (&place.shared.options.cache_dir, url.to_str()) {
        if let Some(local) = cache::local_path(root, &place.shared.cache_key, &location) {
            cache::put(root, local, cache::Note::of(text, &meta), &bytes);
        }
    }
    Ok(Some((meta, bytes)))
}

async fn plan_index(
    place: &Place,
    name: &str,
    (meta, bytes): (ObjectMeta, Vec<u8>),
    limits: &PlanLimits,
) -> Result<Checkpoint, FormatError> {
    let context = place.child(name).map_err(|e| io(place, e))?.1;
    let index = parse_index(&context, &bytes)?;
    drop(bytes);
    let names = index_shards(&context, &index, limits)?;
    shards(place, &context, Some((index, identity(&meta))), names, limits).await
}

/// The names of the `*.safetensors` objects directly under the folder, in natural order
/// (over HTTP, which cannot list, `model.safetensors` where it exists), and of its PyTorch
/// files and index, sorted.
async fn list_safetensors(place: &Place, limits: &PlanLimits) -> Result<(Vec<String>, Vec<String>), FormatError> {
    let root = || PathBuf::from(&place.url);
    // A plain HTTP server lists nothing (object_store lists only WebDAV servers, and reads
    // other replies as an empty folder).
    if place.http {
        return Ok((vec![SINGLE_FILE.to_owned()], Vec::new()));
    }
    let prefix = (!place.prefix.as_ref().is_empty()).then_some(&place.prefix);
    // Page by page, stopping at a bound: a prefix may hold millions of objects.
    let mut listing = place.shared.store.list(prefix);
    let (mut names, mut scanned, mut torch) = (Vec::new(), 0usize, Vec::new());
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(|e| FormatError::Io { file: root(), source: store_error(e) })?;
        scanned += 1;
        if scanned > MAX_LISTED {
            return Err(FormatError::InvalidIndex {
                file: root(),
                message: format!(
                    "more than {MAX_LISTED} objects under it; name its model.safetensors.index.json or one file in \
                     the URL instead"
                ),
            });
        }
        // Objects in the folder itself, not in folders below it.
        let depth = meta.location.parts().count();
        if depth != place.prefix.parts().count() + 1 {
            continue;
        }
        match meta.location.filename() {
            Some(n) if n.ends_with(".safetensors") => names.push(n.to_owned()),
            // The names a local folder counts as PyTorch files, bounded as the shards are.
            Some(n) if is_torch_entry(n) => {
                torch.push(n.to_owned());
                if torch.len() > limits.max_shards {
                    return Err(too_many(root(), "the folder lists more PyTorch files", limits.max_shards));
                }
            }
            _ => {}
        }
        if names.len() > limits.max_shards {
            return Err(too_many(root(), "the folder lists more .safetensors files", limits.max_shards));
        }
    }
    names.sort_by(|a, b| natural_cmp(a, b));
    torch.sort();
    Ok((names, torch))
}

/// A spawned task that is aborted when this is dropped (planning given up), its requests in
/// flight dropped with it, rather than left to run on its own.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads every named shard's header (a few at once, each spent against the plan's header
/// budget in order), then plans them.
async fn shards(
    place: &Place,
    context: &Path,
    index: Option<(tensorlift_format::Index, FileIdentity)>,
    names: Vec<(String, Vec<String>)>,
    limits: &PlanLimits,
) -> Result<Checkpoint, FormatError> {
    if index.is_some() {
        for (name, _) in &names {
            place.check_indexed(name).map_err(|source| FormatError::ShardUnreadable {
                file: context.to_path_buf(),
                shard: name.clone(),
                source,
            })?;
        }
    }
    // Each fetch is a task of its own, so that it completes (and its request's timeout does
    // not run out) while an earlier PyTorch file is planned, which takes a while.
    let mut fetches = futures_util::stream::iter(names.into_iter().map(|(name, spellings)| {
        let (place, file) = (place.clone(), context.to_path_buf());
        let context = file.clone();
        // Guarded from the start: a buffered future may be dropped before its first poll.
        let task = AbortOnDrop(tokio::spawn(async move {
            let (location, url) = place.child(&name).map_err(|e| FormatError::ShardUnreadable {
                file: context.clone(),
                shard: name.clone(),
                source: e,
            })?;
            let first = first_bytes(&place, &location, &url, &context, &name).await?;
            Ok::<_, FormatError>((name, spellings, location, url, first))
        }));
        async move {
            let mut task = task;
            (&mut task.0).await.unwrap_or_else(|e| {
                Err(FormatError::Io { file, source: io::Error::other(format!("planning a shard failed: {e}")) })
            })
        }
    }))
    .buffered(HEADER_FETCHES);
    let mut header_bytes = 0u64;
    let mut pending = Vec::new();
    let mut objects = Vec::new();
    while let Some((name, spellings, location, url, (meta, mut bytes))) = fetches.try_next().await? {
        let aliases = spellings.into_iter().filter(|s| *s != name).collect();
        let n = match header_len(&url, &bytes, meta.size) {
            Err(FormatError::PyTorchCheckpoint { file, .. }) => {
                if let Some(layout) = torch_refused(&file) {
                    return Err(FormatError::PyTorchCheckpoint { file, layout });
                }
                let object = Arc::new(RemoteObject::uncached(Arc::clone(&place.shared), location, url.clone(), &meta));
                let (header, hash) = torch(&object, bytes, limits, &mut header_bytes, context).await?;
                let work = HeaderWork::Done(header, hash);
                pending.push(Pending { name, aliases, path: url, identity: identity(&meta), work });
                objects.push(object);
                continue;
            }
            other => other?,
        };
        let wanted = HEADER_PREFIX_LEN + n;
        spend_header_budget(&mut header_bytes, limits, context, wanted)?;
        header_fits(&url, n)?;
        let object = Arc::new(RemoteObject::new(Arc::clone(&place.shared), location, url.clone(), &meta));
        if let Some(copy) = &object.cache {
            copy.write(0, bytes::Bytes::copy_from_slice(&bytes));
        }
        let got = bytes.len();
        if wanted > got as u64 {
            rest_of_header(&object, got as u64, wanted, &mut bytes).await?;
            if let Some(copy) = &object.cache {
                copy.write(got as u64, bytes::Bytes::copy_from_slice(&bytes[got..]));
            }
        }
        bytes.truncate(wanted as usize);
        pending.push(Pending { name, aliases, path: url, identity: identity(&meta), work: HeaderWork::Parse(bytes) });
        objects.push(object);
    }
    drop(fetches);
    let (plan, index_identity) = assemble(context, PathBuf::from(&place.url), index, pending, &Quiet)?;
    let folder = RemoteFolder { place: place.clone() };
    Ok(Checkpoint::remote(plan, index_identity, objects, folder))
}

/// A PyTorch file's header ([`torch_header`]), read by the pickle reader from the object on
/// a blocking thread ([`TorchObject`]), `head` being its first bytes as planning fetched them.
async fn torch(
    object: &Arc<RemoteObject>,
    head: Vec<u8>,
    limits: &PlanLimits,
    spent: &mut u64,
    context: &Path,
) -> Result<(tensorlift_format::Header, u64), FormatError> {
    // Dropped with this future (planning given up, or done): the reader's GETs then stop.
    let (_planning, watched) = tokio::sync::watch::channel(());
    let reader = TorchObject {
        object: Arc::clone(object),
        head,
        blocks: std::sync::Mutex::default(),
        gets: std::sync::atomic::AtomicUsize::new(0),
        failed: std::sync::Mutex::new(None),
        planning: watched,
    };
    let (limits, context, mut left) = (limits.clone(), context.to_path_buf(), *spent);
    let read = tokio::task::spawn_blocking(move || {
        let url = reader.object.url().to_path_buf();
        let header = torch_header(&reader, &url, reader.object.len(), &limits, &mut left, &context);
        // The pickle reader names a read that failed as a flaw of the file: a failed GET (a
        // changed object, a server that gave up) is said as what it was.
        let failed = reader.failed.lock().unwrap_or_else(|p| p.into_inner()).take();
        match (header, failed) {
            (Err(_), Some(source)) => Err(FormatError::Io { file: url, source }),
            (header, _) => header.map(|h| (h, left)),
        }
    });
    let (header, now) = read.await.map_err(|e| FormatError::Io {
        file: object.url().to_path_buf(),
        source: io::Error::other(format!("reading a PyTorch file failed: {e}")),
    })??;
    *spent = now;
    Ok(header)
}

/// A remote PyTorch file as the pickle reader reads it: at many small offsets (its zip
/// directory, each record's header) and a few large ones (the pickle). Small reads come from
/// blocks of [`TORCH_BLOCK`] bytes, fetched once by a ranged GET each and kept (a few
/// hundred, then dropped all at once), large ones by a GET of their own; every GET is
/// checked against the object as planned (its ETag, its length), and there are at most
/// [`RemoteOptions::pytorch_reads`](crate::RemoteOptions::pytorch_reads): a zip archive
/// takes about one a record whose data lies more than a block from the last (a few hundred
/// for the largest models). Each read waits for its GET: it runs on a blocking thread.
struct TorchObject {
    object: Arc<RemoteObject>,
    head: Vec<u8>,
    blocks: std::sync::Mutex<std::collections::HashMap<u64, Arc<Vec<u8>>>>,
    gets: std::sync::atomic::AtomicUsize,
    /// The first GET that failed, as it failed.
    failed: std::sync::Mutex<Option<io::Error>>,
    /// Closed when planning is given up (a dropped load): the GET in flight is dropped and
    /// no other is made.
    planning: tokio::sync::watch::Receiver<()>,
}

impl TorchObject {
    /// `len` bytes at `offset`, by one ranged GET.
    fn fetch(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let fail = |e: io::Error| {
            let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            let said = io::Error::new(e.kind(), e.to_string());
            failed.get_or_insert(e);
            said
        };
        let most = self.object.options().pytorch_reads;
        if self.gets.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= most {
            return Err(fail(io::Error::other(format!(
                "planning this PyTorch file takes more than {most} reads (about one a record; \
                 RemoteOptions::pytorch_reads): convert it to safetensors (`tensorlift convert`) or download it"
            ))));
        }
        let mut buf = Vec::new();
        buf.try_reserve_exact(len).map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, format!("{len} bytes")))?;
        buf.resize(len, 0);
        let mut planning = self.planning.clone();
        if planning.has_changed().is_err() {
            return Err(fail(planning_cancelled()));
        }
        let read = crate::remote::read_object(&self.object, offset, buf, 0, len);
        let got = crate::block_on(async move {
            tokio::select! {
                biased;
                // Nothing is ever sent: this is the sender dropped.
                _ = planning.changed() => None,
                got = read => Some(got),
            }
        });
        match got {
            Some(got) => got.map_err(|failed| fail(io::Error::other(failed.error))),
            None => Err(fail(planning_cancelled())),
        }
    }

    /// The block that starts at `start`.
    fn block(&self, start: u64) -> io::Result<Arc<Vec<u8>>> {
        let mut blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = blocks.get(&start) {
            return Ok(Arc::clone(b));
        }
        let len = TORCH_BLOCK.min(self.object.len() - start) as usize;
        let block = Arc::new(self.fetch(start, len)?);
        if blocks.len() >= TORCH_BLOCKS_KEPT {
            blocks.clear();
        }
        blocks.insert(start, Arc::clone(&block));
        Ok(block)
    }
}

impl tensorlift_pickle::ReadAt for TorchObject {
    fn size(&self) -> io::Result<u64> {
        Ok(self.object.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|&end| end <= self.object.len());
        let Some(end) = end else {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"));
        };
        if end <= self.head.len() as u64 {
            buf.copy_from_slice(&self.head[offset as usize..end as usize]);
            return Ok(());
        }
        if buf.len() as u64 > TORCH_BLOCK {
            buf.copy_from_slice(&self.fetch(offset, buf.len())?);
            return Ok(());
        }
        let (mut at, mut done) = (offset, 0);
        while done < buf.len() {
            let start = at / TORCH_BLOCK * TORCH_BLOCK;
            let block = self.block(start)?;
            let from = (at - start) as usize;
            let n = (block.len() - from).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&block[from..from + n]);
            (at, done) = (at + n as u64, done + n);
        }
        Ok(())
    }
}

/// The first [`HEADER_GUESS`] bytes of a shard (fewer for a smaller one), with its meta.
async fn first_bytes(
    place: &Place,
    location: &ObjectPath,
    url: &Path,
    context: &Path,
    name: &str,
) -> Result<(ObjectMeta, Vec<u8>), FormatError> {
    let unreadable =
        |source| FormatError::ShardUnreadable { file: context.to_path_buf(), shard: name.to_owned(), source };
    let options = GetOptions { range: Some(GetRange::Bounded(0..HEADER_GUESS)), ..GetOptions::default() };
    let reply = match place.shared.store.get_opts(location, options).await {
        Ok(reply) => reply,
        // No range of an empty object can be served (416): such a shard is refused as the
        // same file is locally, for its length, not for the store's answer. (object_store
        // names the status only in its message; the tests over HTTP and S3 hold it to it.)
        Err(e) if e.to_string().contains("status code: 416") => match place.shared.store.head(location).await {
            Ok(meta) if meta.size == 0 => return Ok((meta, Vec::new())),
            _ => return Err(unreadable(store_error(e))),
        },
        Err(e) => return Err(unreadable(store_error(e))),
    };
    let meta = reply.meta.clone();
    // Neither an ETag nor a modification time: a change during the load could not be seen.
    if meta.e_tag.is_none() && modified_ns(&meta) == 0 {
        return Err(FormatError::Io {
            file: url.to_path_buf(),
            source: io::Error::other(
                "the server gives neither an ETag nor a Last-Modified time for it, so a change during the load \
                 could not be detected; serve it from a server that does",
            ),
        });
    }
    let bytes = body(reply, HEADER_GUESS.min(meta.size), url).await?;
    Ok((meta, bytes))
}

/// Bytes `from..to` of a header longer than the first GET, from the same object, appended
/// to `out`.
async fn rest_of_header(object: &RemoteObject, from: u64, to: u64, out: &mut Vec<u8>) -> Result<(), FormatError> {
    let file = || object.url().to_path_buf();
    let options =
        GetOptions { range: Some(GetRange::Bounded(from..to)), if_match: object.if_match(), ..GetOptions::default() };
    let changed = |what: String| FormatError::Io {
        file: file(),
        source: io::Error::other(format!("changed while its header was read: {what}")),
    };
    let reply = match object.shared.store.get_opts(&object.location, options).await {
        Ok(r) => r,
        Err(object_store::Error::Precondition { .. }) => return Err(changed("its ETag moved".into())),
        Err(object_store::Error::NotFound { .. }) => return Err(changed("it was deleted".into())),
        Err(e) => return Err(FormatError::Io { file: file(), source: store_error(e) }),
    };
    if let Some(what) = object.change(&reply.meta) {
        return Err(changed(what));
    }
    body_into(reply, to - from, object.url(), out).await
}

/// A folder too large to list: name its index or a file instead.
fn too_many(root: PathBuf, what: &str, limit: usize) -> FormatError {
    FormatError::TooManyFiles { file: root, what: what.to_owned(), limit }
}

fn not_found(place: &Place, name: &str) -> FormatError {
    let file = place.child(name).map_or_else(|_| PathBuf::from(&place.url), |c| c.1);
    FormatError::Io { file, source: io::Error::new(io::ErrorKind::NotFound, "no such object") }
}

fn io(place: &Place, source: io::Error) -> FormatError {
    FormatError::Io { file: PathBuf::from(&place.url), source }
}
