//! What is measured: tensorlift, the baselines, and the limits.

use std::any::Any;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tensorlift::Loader;
use tensorlift_io::{AlignedBuf, BackendKind, MappedFile, Reader};

/// Something to time: loads the checkpoint and returns the bytes moved, plus whatever holds
/// the loaded memory (dropped after the clock stops, as a server would keep it).
pub type Run = Box<dyn Fn(&Checkpoint) -> anyhow::Result<(u64, Box<dyn Any>)>>;

/// The checkpoint under test.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub shards: Vec<PathBuf>,
    pub bytes: u64,
    pub file_bytes: u64,
    pub tensors: usize,
    /// Whether a shard is a PyTorch file (read through the plan, not as safetensors).
    pub pytorch: bool,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> anyhow::Result<Checkpoint> {
        let plan = tensorlift::plan(dir)?;
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            shards: plan.shards().iter().map(|s| s.path.clone()).collect(),
            bytes: plan.total_bytes(),
            file_bytes: plan.shards().iter().map(|s| s.file_len).sum(),
            tensors: plan.tensors().len(),
            pytorch: plan.shards().iter().any(|s| tensorlift_io::is_pytorch_file(&s.path)),
        })
    }
}

/// Whether an entry is an engine (loads tensors) or a limit (moves bytes into nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Engine,
    Limit,
}

pub struct Entry {
    pub name: &'static str,
    pub kind: Kind,
    pub run: Run,
}

/// tensorlift's engine; `report_read` prints each run's bytes read against the checkpoint's.
pub fn tensorlift(loader: Arc<Loader>, reuse_host_memory: bool, report_read: bool) -> Entry {
    Entry {
        name: "tensorlift",
        kind: Kind::Engine,
        run: Box::new(move |c| {
            let model = loader.load_blocking(&c.dir)?;
            let s = model.stats();
            eprintln!(
                "tensorlift: first read at +{:.1} ms, plan whole at +{:.1} ms; {:.3} GB new host memory reused, {:.3} GB prefaulted, {:.3} GB filled by copy{}",
                s.first_read.unwrap_or_default().as_secs_f64() * 1e3,
                s.planned.unwrap_or_default().as_secs_f64() * 1e3,
                s.reused_host_bytes as f64 / 1e9,
                s.prefaulted_bytes as f64 / 1e9,
                s.copied_bytes as f64 / 1e9,
                s.fill_by_copy_refused.as_deref().map_or_else(String::new, |w| format!(" (refused: {w})")),
            );
            if s.device != tensorlift::Device::Cpu {
                let refused =
                    s.page_cache_dma_refused.as_deref().map_or_else(String::new, |w| format!(" (refused: {w})"));
                eprintln!(
                    "tensorlift: {:.3} GB copied by DMA from the page cache{refused}",
                    s.page_cache_dma_bytes as f64 / 1e9
                );
            }
            if report_read {
                eprintln!(
                    "tensorlift: loaded {} bytes, read {} of the checkpoint's {} ({:.1}%)",
                    s.bytes,
                    s.bytes_read,
                    s.checkpoint_bytes,
                    100.0 * s.bytes_read as f64 / s.checkpoint_bytes.max(1) as f64
                );
            }
            Ok((
                model.stats().bytes,
                Box::new(Held { model: Some(model), loader: Arc::clone(&loader), reuse_host_memory }),
            ))
        }),
    }
}

/// tensorlift onto several devices at once (`--devices`), each byte read once: the bytes
/// landed on every device, and each run prints the bytes it read.
pub fn tensorlift_devices(loader: Arc<Loader>) -> Entry {
    Entry {
        name: "tensorlift",
        kind: Kind::Engine,
        run: Box::new(move |c| {
            let models = loader.load_devices_blocking(&c.dir)?;
            let landed: u64 = models.iter().map(|m| m.stats().bytes).sum();
            if let Some(s) = models.first().map(|m| m.stats()) {
                eprintln!(
                    "tensorlift: {} bytes onto {} devices, read {} of the checkpoint's {} once",
                    landed,
                    models.len(),
                    s.bytes_read,
                    s.checkpoint_bytes
                );
            }
            Ok((landed, Box::new(models)))
        }),
    }
}

/// Each rank of a `--devices` load with a loader of its own, every rank at once (as one
/// process a GPU loads): the bytes landed on every device, and each run prints the bytes
/// the ranks read together.
pub fn per_rank(loaders: Vec<Arc<Loader>>) -> Entry {
    Entry {
        name: "per-rank",
        kind: Kind::Engine,
        run: Box::new(move |c| {
            let models = std::thread::scope(|s| {
                let running: Vec<_> = loaders.iter().map(|l| s.spawn(|| l.load_blocking(&c.dir))).collect();
                running
                    .into_iter()
                    .map(|h| h.join().map_err(|_| anyhow::anyhow!("a rank's load panicked"))?.map_err(Into::into))
                    .collect::<anyhow::Result<Vec<_>>>()
            })?;
            let landed: u64 = models.iter().map(|m| m.stats().bytes).sum();
            let read: u64 = models.iter().map(|m| m.stats().bytes_read).sum();
            eprintln!("per-rank: {} bytes onto {} devices, the ranks read {read} together", landed, models.len());
            Ok((landed, Box::new(models)))
        }),
    }
}

/// A loaded model, dropped after the clock stopped; unless memory reuse was asked for, the
/// memory its tensors leave is given back too, so that every run loads into fresh memory,
/// as a server's first load does.
struct Held {
    model: Option<tensorlift::Model>,
    loader: Arc<Loader>,
    reuse_host_memory: bool,
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.model.take());
        if !self.reuse_host_memory {
            self.loader.release_host_memory();
        }
    }
}

/// Reads each shard whole into a Vec, parses the header with the reference crate, copies
/// each tensor out.
pub fn std_read() -> Entry {
    Entry {
        name: "std-read",
        kind: Kind::Engine,
        run: Box::new(|c| {
            let mut out: Vec<Vec<u8>> = Vec::new();
            let mut bytes = 0;
            for p in &c.shards {
                let buf = std::fs::read(p).with_context(|| p.display().to_string())?;
                let (n, meta) = safetensors::SafeTensors::read_metadata(&buf)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                for info in meta.tensors().values() {
                    let (b, e) = info.data_offsets;
                    out.push(buf[8 + n + b..8 + n + e].to_vec());
                    bytes += (e - b) as u64;
                }
            }
            Ok((bytes, Box::new(out)))
        }),
    }
}

/// Maps every shard. Copies out of the maps go through `MappedFile::copy_to`, which turns a
/// page that cannot be read into an error rather than a SIGBUS (safe code cannot touch a
/// mapping directly).
fn map_shards(c: &Checkpoint) -> anyhow::Result<Vec<MappedFile>> {
    let r = Reader::builder().backend(BackendKind::Pread).pread_threads(1).build();
    c.shards.iter().map(|p| Ok(MappedFile::map(&*r.open_with(p, false)?)?)).collect()
}

/// Memory-maps each shard and copies each tensor out, by offsets from tensorlift's plan.
pub fn mmap_copy() -> Entry {
    Entry {
        name: "mmap-copy",
        kind: Kind::Engine,
        run: Box::new(|c| {
            let plan = tensorlift::plan(&c.dir)?;
            let maps = map_shards(c)?;
            let mut out = Vec::with_capacity(plan.tensors().len());
            for t in plan.tensors() {
                let mut v = vec![0u8; t.len() as usize];
                maps[t.shard].copy_to(t.file_range.start, &mut v)?;
                out.push(v);
            }
            Ok((plan.total_bytes(), Box::new(out)))
        }),
    }
}

/// The reference crate: `SafeTensors::deserialize` on the file's bytes (read whole: safe code
/// here cannot hand out a view of a map), then a copy per tensor.
pub fn safetensors_crate() -> Entry {
    Entry {
        name: "safetensors-crate",
        kind: Kind::Engine,
        run: Box::new(|c| {
            let mut out = Vec::new();
            let mut bytes = 0;
            for p in &c.shards {
                let file = std::fs::read(p).with_context(|| p.display().to_string())?;
                let st = safetensors::SafeTensors::deserialize(&file)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                for (_, view) in st.tensors() {
                    bytes += view.data().len() as u64;
                    out.push(view.data().to_vec());
                }
            }
            Ok((bytes, Box::new(out)))
        }),
    }
}

/// The GET limit of a remote checkpoint: every byte of its shards by ranged GETs of the
/// load's part size, at its concurrency, counted and dropped (no copy, no tensors).
pub fn get_limit() -> Entry {
    Entry {
        name: "get-limit",
        kind: Kind::Limit,
        run: Box::new(|c| {
            let mut limits = tensorlift::PlanLimits::default();
            limits.remote.cache_dir = None;
            let plan = tensorlift_io::open_checkpoint(&c.dir, &limits)?;
            anyhow::ensure!(plan.is_remote(), "{} is not a remote checkpoint", c.dir.display());
            let objects: Vec<_> = (0..plan.shards().len()).filter_map(|i| plan.remote_object(i).cloned()).collect();
            let bytes = tensorlift_io::remote::fetch_discarding(&objects)?;
            Ok((bytes, Box::new(())))
        }),
    }
}

/// Reads of every shard at depth into reused buffers, one ring per CPU: O_DIRECT when cold
/// (the storage limit), buffered when warm (the page-cache copy limit; O_DIRECT would bypass
/// it). The reader (its rings and threads) and the buffers (touched once) are made when the
/// entry is, outside the timed runs, as tensorlift's loader makes its own once.
pub fn read_limit(direct: bool) -> Entry {
    // Every CPU reads (cached reads are copies made on the submitting thread), with four
    // reads in flight each: the most this machine's storage and page cache give.
    const CHUNK: usize = 4 << 20;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let window = (4 * workers).max(32);
    // (Where io_uring is refused, the reader falls back to pread: as many threads as reads
    // in flight, so the limit is not one of a few threads.)
    let r = Reader::builder()
        .backend(BackendKind::Uring)
        .workers(workers)
        .queue_depth(window as u32)
        .pread_threads(window)
        .direct(direct)
        .build();
    let mut buffers: Vec<AlignedBuf> = (0..window).filter_map(|_| AlignedBuf::zeroed(CHUNK, 4096)).collect();
    for b in &mut buffers {
        // Faulted in now, not by the first timed run's reads.
        b.as_mut_slice().fill(1);
    }
    let buffers = std::sync::Mutex::new(buffers);
    Entry {
        name: "read-limit",
        kind: Kind::Limit,
        run: Box::new(move |c| {
            let files = c.shards.iter().map(|p| r.open(p)).collect::<Result<Vec<_>, _>>()?;
            let mut jobs: VecDeque<(usize, u64, usize)> = VecDeque::new();
            let mut offsets = vec![0u64; files.len()];
            while offsets.iter().zip(&files).any(|(o, f)| *o < f.len()) {
                for (i, f) in files.iter().enumerate() {
                    if offsets[i] < f.len() {
                        let n = (f.len() - offsets[i]).min(CHUNK as u64) as usize;
                        jobs.push_back((i, offsets[i], n));
                        offsets[i] += n as u64;
                    }
                }
            }
            let mut pool = buffers.lock().map_err(|_| anyhow::anyhow!("a run panicked"))?;
            let mut in_flight = VecDeque::new();
            let mut bytes = 0;
            let mut failed = None;
            while !jobs.is_empty() || !in_flight.is_empty() {
                while failed.is_none() && !jobs.is_empty() && !pool.is_empty() {
                    let (Some((i, off, n)), Some(buf)) = (jobs.pop_front(), pool.pop()) else { break };
                    in_flight.push_back(r.read(&files[i], off, buf, 0, n));
                    bytes += n as u64;
                }
                if failed.is_some() {
                    jobs.clear();
                }
                if let Some(f) = in_flight.pop_front() {
                    // Every buffer comes back to the pool, a failed read's too.
                    match f.wait() {
                        Ok(buf) => pool.push(buf),
                        Err(e) => {
                            failed.get_or_insert(e.error);
                            pool.extend(e.buf);
                        }
                    }
                }
            }
            match failed {
                Some(e) => Err(e.into()),
                None => Ok((bytes, Box::new(()))),
            }
        }),
    }
}

/// The candle way onto a GPU: a memory map, then one device allocation and one synchronous
/// copy from pageable memory per tensor (here each tensor passes through a reused pageable
/// buffer, since safe code copies out of a map with `MappedFile::copy_to`).
pub fn per_tensor_htod(gpu: tensorlift_cuda::Gpu) -> Entry {
    Entry {
        name: "per-tensor-htod",
        kind: Kind::Engine,
        run: Box::new(move |c| {
            let plan = tensorlift::plan(&c.dir)?;
            let maps = map_shards(c)?;
            let mut out = Vec::with_capacity(plan.tensors().len());
            let mut bytes = Vec::new();
            for t in plan.tensors() {
                bytes.resize(t.len() as usize, 0);
                maps[t.shard].copy_to(t.file_range.start, &mut bytes)?;
                let arena = tensorlift_cuda::DeviceArena::new(&gpu, bytes.len())?;
                arena.copy_from_host(0, &bytes)?;
                out.push(arena);
            }
            Ok((plan.total_bytes(), Box::new(out)))
        }),
    }
}

/// Host-to-device bandwidth as nvbandwidth's `host_to_device_memcpy_ce` measures the copy
/// engines: large pinned buffers (4 of 256 MiB), each copied whole to a place of its own on
/// the device, on 4 streams at once, until as many bytes as the checkpoint holds (at least
/// 4 GiB) have moved. The buffers, the device memory and the streams are made (and used
/// once) when the entry is, outside the timed runs, as nvbandwidth leaves them out.
pub fn h2d_limit_streams(gpu: tensorlift_cuda::Gpu) -> anyhow::Result<Entry> {
    const CHUNK: usize = 256 << 20;
    const STREAMS: usize = 4;
    let pool = tensorlift_cuda::PinnedPool::new(&gpu, STREAMS * CHUNK, CHUNK)?;
    let arena = Arc::new(tensorlift_cuda::DeviceArena::new(&gpu, STREAMS * CHUNK)?);
    let engine = std::sync::Mutex::new(tensorlift_cuda::CopyEngine::new(&gpu, STREAMS)?);
    let copy = move |target: u64| -> anyhow::Result<u64> {
        let mut engine = engine.lock().map_err(|_| anyhow::anyhow!("a run panicked"))?;
        let (mut moved, mut i) = (0u64, 0usize);
        while moved < target {
            let piece = tensorlift_cuda::Piece::flat(0, (i % STREAMS) * CHUNK, CHUNK);
            engine.copy(pool.acquire(), &arena, &[piece])?;
            (moved, i) = (moved + CHUNK as u64, i + 1);
        }
        engine.synchronize()?;
        Ok(moved)
    };
    // Once untimed: every buffer pinned and mapped, every stream used.
    copy((STREAMS * CHUNK) as u64)?;
    Ok(Entry {
        name: "h2d-limit-streams",
        kind: Kind::Limit,
        run: Box::new(move |c| Ok((copy(c.bytes.max(4 << 30))?, Box::new(())))),
    })
}

/// Host-to-device bandwidth: as many bytes as the checkpoint holds, moved as large copies
/// from pinned buffers to the device on two streams (tensorlift's default). The buffers, the
/// device memory and the streams are made (and used once) when the entry is, outside the
/// timed runs, as tensorlift's loader makes its staging once.
pub fn h2d_limit(gpu: tensorlift_cuda::Gpu) -> anyhow::Result<Entry> {
    const CHUNK: usize = 256 << 20;
    const STREAMS: usize = 2;
    let pool = tensorlift_cuda::PinnedPool::new(&gpu, STREAMS * CHUNK, CHUNK)?;
    let arena = Arc::new(tensorlift_cuda::DeviceArena::new(&gpu, CHUNK)?);
    let engine = std::sync::Mutex::new(tensorlift_cuda::CopyEngine::new(&gpu, STREAMS)?);
    let copy = move |target: u64| -> anyhow::Result<u64> {
        let mut engine = engine.lock().map_err(|_| anyhow::anyhow!("a run panicked"))?;
        let mut moved = 0u64;
        while moved < target {
            let piece = tensorlift_cuda::Piece::flat(0, 0, CHUNK);
            engine.copy(pool.acquire(), &arena, &[piece])?;
            moved += CHUNK as u64;
        }
        engine.synchronize()?;
        Ok(moved)
    };
    // Once untimed: every buffer pinned and mapped, every stream used.
    copy((STREAMS * CHUNK) as u64)?;
    Ok(Entry {
        name: "h2d-limit",
        kind: Kind::Limit,
        run: Box::new(move |c| Ok((copy(c.bytes.max(1))?, Box::new(())))),
    })
}

/// The safetensors files of the checkpoint at `dir`, found without tensorlift: the files
/// its index (`model.safetensors.index.json`, the one a folder is loaded by) maps tensors
/// to, else the file itself, else every `.safetensors` file in the folder.
fn files_of(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let index = if dir.is_dir() {
        Some(dir.join("model.safetensors.index.json")).filter(|p| p.is_file())
    } else {
        Some(dir.to_path_buf()).filter(|p| p.to_str().is_some_and(|n| n.ends_with(".json")))
    };
    let folder = if dir.is_dir() { dir } else { dir.parent().unwrap_or(Path::new(".")) };
    let mut files: Vec<PathBuf> = match index {
        Some(index) => {
            let text: serde_json::Value = serde_json::from_slice(&std::fs::read(&index)?)?;
            let map = text["weight_map"].as_object().context("the index has no weight_map")?;
            map.values().filter_map(|v| v.as_str()).map(|n| folder.join(n)).collect()
        }
        None if !dir.is_dir() => vec![dir.to_path_buf()],
        None => std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect(),
    };
    files.sort();
    files.dedup();
    Ok(files)
}

/// Checks the tensors a `tensorlift` run holds against the files read here, without
/// tensorlift: each shard's header parsed as plain JSON, and each tensor's bytes read at its
/// offsets (one tensor in memory at a time), device tensors copied back. Every tensor of
/// every shard, and nothing else. `Ok(false)` where `held` is not a plain load's (several
/// devices, a group).
pub fn check_tensorlift(c: &Checkpoint, held: &dyn Any) -> anyhow::Result<bool> {
    use std::os::unix::fs::FileExt;
    let Some(model) = held.downcast_ref::<Held>().and_then(|h| h.model.as_ref()) else { return Ok(false) };
    let mut seen = 0usize;
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for path in &files_of(&c.dir)? {
        let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut n = [0u8; 8];
        f.read_exact_at(&mut n, 0)?;
        let n = u64::from_le_bytes(n);
        let mut header = vec![0u8; usize::try_from(n)?];
        f.read_exact_at(&mut header, 8)?;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&header).with_context(|| format!("{}: its header", path.display()))?;
        for (name, entry) in header.iter().filter(|(k, _)| *k != "__metadata__") {
            let offsets =
                entry["data_offsets"].as_array().and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)));
            let Some((begin, end)) = offsets else {
                anyhow::bail!("{}: tensor '{name}' has no offsets", path.display())
            };
            want.resize(usize::try_from(end - begin)?, 0);
            f.read_exact_at(&mut want, 8 + n + begin)?;
            let t = model.get(name).with_context(|| format!("{}: tensor '{name}' was not loaded", path.display()))?;
            got.resize(t.len(), 0);
            t.copy_bytes_into(&mut got).with_context(|| format!("tensor '{name}': copying it back"))?;
            anyhow::ensure!(got == want, "{}: tensor '{name}' differs from the file's bytes", path.display());
            seen += 1;
        }
    }
    anyhow::ensure!(seen == model.len(), "{} tensors loaded, {seen} in the files", model.len());
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensorlift::Dtype;

    /// The check finds a tensor whose bytes differ from the file's, one the file has that
    /// was not loaded, and passes the loaded ones.
    #[test]
    fn the_byte_check_fails_where_a_load_differs_from_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let a: &[tensorlift_testkit::Spec<'_>] = &[("a", Dtype::F32, &[300]), ("b", Dtype::U8, &[77])];
        let b: &[tensorlift_testkit::Spec<'_>] = &[("c", Dtype::BF16, &[9, 9])];
        tensorlift_testkit::write_sharded(dir.path(), &[a, b]);
        let c = Checkpoint::open(dir.path()).unwrap();
        let loader = Arc::new(Loader::builder().device(tensorlift::Device::Cpu).build().unwrap());
        let load = |l: &Loader| l.load_blocking(dir.path()).unwrap();
        let held = |model| Held { model: Some(model), loader: Arc::clone(&loader), reuse_host_memory: false };
        assert!(check_tensorlift(&c, &held(load(&loader))).unwrap());
        // The last byte of the second shard (tensor c's) changed after the load.
        let model = load(&loader);
        let path = dir.path().join("model-00002-of-00002.safetensors");
        let mut bytes = std::fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = check_tensorlift(&c, &held(model)).unwrap_err();
        assert!(err.to_string().contains("tensor 'c' differs from the file's bytes"), "{err:#}");
        // A load of part of the files misses a tensor they have.
        let part = Loader::builder().device(tensorlift::Device::Cpu).filter(["a", "c"]).build().unwrap();
        let err = check_tensorlift(&c, &held(load(&part))).unwrap_err();
        assert!(err.to_string().contains("tensor 'b' was not loaded"), "{err:#}");
    }
}
