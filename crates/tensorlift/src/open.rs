//! Opening a planned shard for reading: the descriptor planning opened (or the same file,
//! reopened and checked), checked against the plan, with O_DIRECT unless it is cached.

use std::collections::VecDeque;
use std::sync::Arc;

use tensorlift_format::{LoadPlan, Shard};
use tensorlift_io::{
    cache, Checkpoint, HeaderCheck, IoBufMut, IoError, MapContract, MappedFile, OpenFile, ReadFuture, Reader,
    RemoteObject,
};

use crate::config::DirectIo;
use crate::digest::{DigestSource, Sha256};
use crate::layout::Span;
use crate::{LoadError, LoadStats, Tensor};

/// A shard open for reading: a local file, or a remote object read by ranged GETs.
#[derive(Debug, Clone)]
pub(crate) enum ShardIo {
    File(Arc<OpenFile>),
    Object(Arc<RemoteObject>),
}

impl ShardIo {
    /// Reads `len` bytes at `offset` into `buf[..len]`, giving the buffer back with the result.
    pub(crate) fn read<B: IoBufMut>(&self, reader: &Reader, offset: u64, buf: B, len: usize) -> ReadFuture<B> {
        match self {
            ShardIo::File(f) => reader.read(f, offset, buf, 0, len),
            ShardIo::Object(o) => tensorlift_io::read_object(o, offset, buf, 0, len),
        }
    }
}

/// Opens shard `i` of `plan` for reading, and counts it as direct, buffered or remote.
pub(crate) fn open_shard(
    reader: &Reader,
    plan: &mut Checkpoint,
    i: usize,
    direct: DirectIo,
    check: HeaderCheck,
    stats: &mut LoadStats,
) -> Result<ShardIo, LoadError> {
    // A remote shard needs no opening: each of its GETs names the object planned (its ETag)
    // and checks its length.
    if let Some(object) = plan.remote_object(i) {
        stats.remote_shards += 1;
        return Ok(ShardIo::Object(Arc::clone(object)));
    }
    // One look at the file decides what is checked, and is what it must still be after
    // its reads (see still_as_planned).
    let (file, taken) = plan.take_checked(i, check).map_err(open_error)?;
    let shard = &plan.shards()[i];
    // A shard already in the page cache reads faster buffered; O_DIRECT would go to disk.
    // Where the kernel hides which pages are cached (no cachestat, a file this process
    // neither owns nor may write: a read-only model volume in a container), buffered: a
    // warm shard read with O_DIRECT would be read from the disk again on every start.
    let direct = match direct {
        DirectIo::Always => true,
        DirectIo::Never => false,
        DirectIo::Auto => match cache::resident_estimate(&file) {
            Ok(fraction) => fraction < 0.5,
            Err(e) => e.kind() != std::io::ErrorKind::PermissionDenied,
        },
    };
    let file = reader.open_file(&shard.path, file, direct).map_err(open_error)?;
    // Its reads are checked against the identity it was opened with: the one decided on
    // (the planned length among it).
    if let Some(what) = tensorlift_io::identity_change(&taken, file.identity_at_open()) {
        return Err(LoadError::ShardChanged { file: shard.path.clone(), what: format!("{what}, while it was opened") });
    }
    if file.is_direct() {
        stats.direct_shards += 1;
    } else {
        stats.buffered_shards += 1;
    }
    Ok(ShardIo::File(file))
}

/// Zero-copy views of mapped shards, under the caller's contract: every tensor is ready at
/// once. A verified load (`checks`, by shard) first hashes each shard's whole mapping, in
/// parallel, and hands out nothing unless every digest is the expected one.
#[allow(clippy::too_many_arguments)] // The load's parts, each used once here.
pub(crate) fn map_all(
    reader: &Reader,
    plan: &mut Checkpoint,
    spans: &[Span],
    contract: MapContract,
    convert_to: Option<tensorlift_format::Dtype>,
    fresh: bool,
    checks: Option<Vec<Option<(Sha256, DigestSource)>>>,
    ready: &mut VecDeque<Tensor>,
    stats: &mut LoadStats,
) -> Result<(), LoadError> {
    let mut maps: Vec<Arc<MappedFile>> = Vec::with_capacity(spans.len());
    for e in spans {
        let map = match maps.last() {
            Some(m) if spans[maps.len() - 1].shard == e.shard => Arc::clone(m),
            _ => {
                // The mapping keeps no descriptor: the file closes once it is mapped.
                let check = header_check(plan, e.shard, fresh);
                let ShardIo::File(file) = open_shard(reader, plan, e.shard, DirectIo::Never, check, stats)? else {
                    return Err(LoadError::Unsupported(
                        "mapped views of a remote checkpoint (a view maps a local file; load it into memory)".into(),
                    ));
                };
                let map = MappedFile::map(&file).map_err(LoadError::Open)?;
                // Mapped as it was checked: a write between the checks and the mapping is
                // refused (after it, the caller's contract holds).
                still_as_planned(plan.plan(), e.shard, &ShardIo::File(Arc::clone(&file)))?;
                Arc::new(map)
            }
        };
        maps.push(map);
    }
    if let Some(checks) = checks {
        stats.verified_bytes = verify_mapped(plan.plan(), spans, &maps, &checks, contract)?;
    }
    let shared = crate::layout::sharing_bytes(plan.plan());
    for (e, map) in spans.iter().zip(maps) {
        for &t in &e.tensors {
            let pt = &plan.tensors()[t];
            let range = pt.file_range.start as usize..pt.file_range.end as usize;
            let (dtype, _) = crate::place::loaded_as(pt, convert_to);
            let tensor = if pt.gather.is_none() && dtype == pt.dtype {
                Tensor::mapped(&pt.name, pt.dtype, &pt.shape, Arc::clone(&map), range, contract).sharing(shared[t])
            } else {
                // A gathered slice is not one range of the file, nor a converted tensor the
                // file's bytes: they are written out of the mapping.
                Tensor::produced(plan.plan(), pt, dtype, map.view_range(contract, range).unwrap_or_default())?
            };
            ready.push_back(tensor);
        }
    }
    Ok(())
}

/// Hashes each verified shard's whole mapping (spans of a verified load are whole files,
/// one a shard), the shards in parallel, one thread a CPU; the bytes of shards verified.
fn verify_mapped(
    plan: &tensorlift_format::LoadPlan,
    spans: &[Span],
    maps: &[Arc<MappedFile>],
    checks: &[Option<(Sha256, DigestSource)>],
    contract: MapContract,
) -> Result<u64, LoadError> {
    use sha2::Digest as _;
    // Each verified shard (a span of a verified load is a whole file), its mapping and what
    // it is checked against.
    let work: Vec<(&Shard, &MappedFile, &(Sha256, DigestSource))> = spans
        .iter()
        .zip(maps)
        .filter_map(|(e, m)| Some((plan.shards().get(e.shard)?, &**m, checks.get(e.shard)?.as_ref()?)))
        .collect();
    let threads = crate::config::cpus().unwrap_or(1).clamp(1, work.len().max(1));
    let hash = |map: &MappedFile| Sha256(sha2::Sha256::digest(map.view(contract)).into());
    // Each work item's digest by its index, from helpers and this thread; one a helper lost
    // (a panic: a bug) is hashed below, so that no shard is handed out unchecked.
    let claimed = std::sync::atomic::AtomicUsize::new(0);
    let mut digests: Vec<Option<Sha256>> = vec![None; work.len()];
    let found: Vec<(usize, Sha256)> = std::thread::scope(|scope| {
        let hash_some = || {
            let mut out = Vec::new();
            loop {
                let i = claimed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(_, map, _)) = work.get(i) else { break };
                out.push((i, hash(map)));
            }
            out
        };
        let helpers: Vec<_> =
            (1..threads).filter_map(|_| std::thread::Builder::new().spawn_scoped(scope, hash_some).ok()).collect();
        let mut all = hash_some();
        for h in helpers {
            all.extend(h.join().unwrap_or_default());
        }
        all
    });
    for (i, d) in found {
        digests[i] = Some(d);
    }
    let mut verified = 0;
    for (&(shard, map, (expected, by)), digest) in work.iter().zip(digests) {
        let digest = digest.unwrap_or_else(|| hash(map));
        let header = map.view(contract).get(..shard.data_start() as usize).map(tensorlift_format::header_hash);
        crate::hashing::Check::new(*expected, by.clone()).settle(plan.root(), shard, digest, header)?;
        verified += shard.file_len;
    }
    Ok(verified)
}

/// How a shard of a whole plan is checked: `fresh` when this load made the plan.
pub(crate) fn header_check(plan: &Checkpoint, i: usize, fresh: bool) -> HeaderCheck {
    match plan.shards().get(i) {
        Some(shard) if fresh => HeaderCheck::Fresh(shard.header_hash),
        _ => HeaderCheck::Planned,
    }
}

/// Refuses shard `i` when the file read is no longer as planned (its identity, length or
/// modification time moved), or its status changed since it was opened for this load (a
/// rewrite in place, even of the same length and with its modification time set back,
/// moves the status change time). Called after each read lands, before the tensors it
/// completes are handed out, and after the copies of each read the CUDA destination took to
/// copy from the page cache.
pub(crate) fn still_as_planned(plan: &LoadPlan, i: usize, file: &ShardIo) -> Result<(), LoadError> {
    // Each GET of a remote shard checked the object already.
    let ShardIo::File(file) = file else { return Ok(()) };
    let Some(shard) = plan.shards().get(i) else { return Ok(()) };
    let changed = |what: String| LoadError::ShardChanged { file: shard.path.clone(), what };
    let now = file.file().metadata().map_err(|e| changed(format!("cannot stat it after reading it: {e}")))?;
    let now = tensorlift_io::file_identity(&now);
    let moved = tensorlift_io::content_change(&shard.identity, &now)
        .or_else(|| tensorlift_io::identity_change(file.identity_at_open(), &now));
    match moved {
        Some(what) => Err(changed(format!("{what}, while it was being read"))),
        None => Ok(()),
    }
}

/// A shard that is no longer the planned file is [`LoadError::ShardChanged`].
pub(crate) fn open_error(e: IoError) -> LoadError {
    match e {
        IoError::Changed { file, what } => LoadError::ShardChanged { file, what },
        IoError::OutOfMemory { file, bytes } => LoadError::OutOfMemory { file, bytes },
        e => LoadError::Open(e),
    }
}
