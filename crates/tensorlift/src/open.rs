//! Opening a planned shard for reading: the descriptor planning opened (or the same file,
//! reopened and checked), checked against the plan, with O_DIRECT unless it is cached.

use std::collections::VecDeque;
use std::sync::Arc;

use tensorlift_format::Shard;
use tensorlift_io::{cache, Checkpoint, IoError, MapContract, MappedFile, OpenFile, Reader};

use crate::layout::Span;
use crate::loader::DirectIo;
use crate::{LoadError, LoadStats, Tensor};

/// Opens shard `i` of `plan` for reading, and counts it as direct or buffered.
pub(crate) fn open_shard(
    reader: &Reader,
    plan: &mut Checkpoint,
    i: usize,
    direct: DirectIo,
    stats: &mut LoadStats,
) -> Result<Arc<OpenFile>, LoadError> {
    let file = plan.take_shard(i).map_err(open_error)?;
    let shard = &plan.shards()[i];
    // A shard already in the page cache reads faster buffered; O_DIRECT would go to disk.
    let direct = match direct {
        DirectIo::Always => true,
        DirectIo::Never => false,
        DirectIo::Auto => cache::resident_estimate(&file).map_or(true, |f| f < 0.5),
    };
    let file = reader.open_file(&shard.path, file, direct).map_err(open_error)?;
    check_unchanged(shard, &file)?;
    if file.is_direct() {
        stats.direct_shards += 1;
    } else {
        stats.buffered_shards += 1;
    }
    Ok(file)
}

/// Zero-copy views of mapped shards, under the caller's contract: every tensor is ready at once.
pub(crate) fn map_all(
    plan: &mut Checkpoint,
    spans: &[Span],
    contract: MapContract,
    convert_to: Option<tensorlift_format::Dtype>,
    ready: &mut VecDeque<Tensor>,
    stats: &mut LoadStats,
) -> Result<(), LoadError> {
    let reader = Reader::builder().backend(tensorlift_io::BackendKind::Pread).pread_threads(1).build();
    let mut mapped: Option<(usize, Arc<MappedFile>)> = None;
    for e in spans {
        let map = match &mapped {
            Some((s, m)) if *s == e.shard => Arc::clone(m),
            _ => {
                // The mapping keeps no descriptor: the file closes once it is mapped.
                let file = open_shard(&reader, plan, e.shard, DirectIo::Never, stats)?;
                let m = Arc::new(MappedFile::map(&file).map_err(LoadError::Open)?);
                mapped = Some((e.shard, Arc::clone(&m)));
                m
            }
        };
        for &t in &e.tensors {
            let pt = &plan.tensors()[t];
            let range = pt.file_range.start as usize..pt.file_range.end as usize;
            let (dtype, _) = crate::place::loaded_as(pt, convert_to);
            let tensor = if pt.gather.is_none() && dtype == pt.dtype {
                Tensor::mapped(&pt.name, pt.dtype, &pt.shape, Arc::clone(&map), range, contract)
            } else {
                // A gathered slice is not one range of the file, nor a converted tensor the
                // file's bytes: they are written out of the mapping.
                Tensor::produced(plan.plan(), pt, dtype, map.view(contract).get(range).unwrap_or_default())?
            };
            ready.push_back(tensor);
        }
    }
    Ok(())
}

/// A shard that is no longer the planned file is [`LoadError::ShardChanged`].
pub(crate) fn open_error(e: IoError) -> LoadError {
    match e {
        IoError::Changed { file, what } => LoadError::ShardChanged { file, what },
        e => LoadError::Open(e),
    }
}

/// Refuses a shard whose length or header differ from what was planned: an edit in place
/// can keep the modification time that [`Checkpoint::take_shard`] compares.
fn check_unchanged(shard: &Shard, file: &OpenFile) -> Result<(), LoadError> {
    use std::os::unix::fs::FileExt;
    let changed = |what: String| LoadError::ShardChanged { file: shard.path.clone(), what };
    if file.len() != shard.file_len {
        return Err(changed(format!("length is {} bytes, planned {}", file.len(), shard.file_len)));
    }
    // The bytes are compared with the planned header's hash: no second parse.
    let n = shard.data_start() as usize;
    let mut buf = Vec::new();
    buf.try_reserve_exact(n).map_err(|_| LoadError::OutOfMemory { file: shard.path.clone(), bytes: n as u64 })?;
    buf.resize(n, 0);
    file.file().read_exact_at(&mut buf, 0).map_err(|e| changed(format!("cannot re-read its header: {e}")))?;
    if tensorlift_format::header_hash(&buf) != shard.header_hash {
        return Err(changed("its header differs from the planned one".into()));
    }
    Ok(())
}
