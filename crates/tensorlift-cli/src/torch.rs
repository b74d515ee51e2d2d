//! PyTorch `.bin` checkpoints: `inspect` them and `convert` them to safetensors, read by
//! tensorlift-pickle (nothing in them is executed).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::json;
use tensorlift_pickle::{ErrorKind, Limits, TorchCheckpoint, TorchTensor};

use crate::text::printable;

use tensorlift_io::{TORCH_INDEX, TORCH_SINGLE};

/// Whether `path` names a PyTorch checkpoint rather than a safetensors one: a file whose
/// first bytes are a zip archive's or a pickle's rather than a safetensors header (as `load`
/// tells them, whatever the file's name, but for one named `.safetensors`, which is read as
/// nothing else), or a folder with `pytorch_model.bin` (or its index) and no safetensors.
pub fn is_torch(path: &Path) -> bool {
    if path.is_file() {
        return tensorlift_io::is_pytorch_file(path);
    }
    if !path.is_dir() {
        return false;
    }
    let has_safetensors = std::fs::read_dir(path).is_ok_and(|mut d| {
        d.any(|e| {
            e.is_ok_and(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.ends_with(".safetensors") || n == "model.safetensors.index.json")
            })
        })
    });
    !has_safetensors && (path.join(TORCH_INDEX).is_file() || path.join(TORCH_SINGLE).is_file())
}

struct Opened {
    path: PathBuf,
    file: File,
    ck: TorchCheckpoint,
    /// The file as it was opened: checked again once everything is written, so that a file
    /// rewritten during the convert fails it rather than be written out mixed.
    identity: tensorlift_format::FileIdentity,
}

/// Opens the checkpoint's files under the rules a load applies (links kept inside the
/// folder, regular files only, the index bounded: `tensorlift_io::open_pytorch`), reads
/// each, and checks an index against what the files hold.
fn open_all(path: &Path) -> anyhow::Result<Vec<Opened>> {
    let found = tensorlift_io::open_pytorch(path, &tensorlift_io::PlanLimits::default())?;
    let mut opened = Vec::new();
    let mut held: HashMap<String, String> = HashMap::new();
    // Every file's tensors are held at once: their pickles share one budget, as a load's do.
    let budget = tensorlift_io::DEFAULT_MAX_HEADER_BYTES;
    let mut spent = 0u64;
    for (name, p, file) in found.files {
        let identity = tensorlift_io::file_identity(&file.metadata().with_context(|| format!("{}", p.display()))?);
        let ck = match TorchCheckpoint::read(&file, &p, &Limits::default().max_pickle_bytes(budget - spent)) {
            Ok(ck) => ck,
            Err(e) if spent > 0 && matches!(e.kind, ErrorKind::Limit { setting: "max_pickle_bytes", .. }) => {
                return Err(anyhow::Error::from(e).context(format!(
                    "the files' pickles may hold {budget} bytes together; {spent} were read before {}",
                    p.display()
                )))
            }
            Err(e) => return Err(e.into()),
        };
        spent += ck.pickle_bytes.min(budget - spent);
        for t in &ck.tensors {
            if let Some(first) = held.insert(t.name.clone(), name.clone()) {
                bail!("tensor '{}' is in both {} and {name}", printable(&t.name), printable(&first));
            }
        }
        opened.push(Opened { path: p, file, ck, identity });
    }
    if let Some(map) = &found.weight_map {
        for (tensor, file) in map {
            match held.get(tensor) {
                Some(f) if f == file => {}
                Some(f) => bail!(
                    "the index puts '{}' in {}, but it is in {}",
                    printable(tensor),
                    printable(file),
                    printable(f)
                ),
                None => bail!("the index lists '{}' in {}, which does not hold it", printable(tensor), printable(file)),
            }
        }
        if let Some(t) = held.keys().find(|t| !map.contains_key(*t)) {
            bail!("tensor '{}' is not in the index", printable(t));
        }
    }
    Ok(opened)
}

fn shape_str(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("[{}]", dims.join(", "))
}

pub fn inspect(path: &Path, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let opened = open_all(path)?;
    if json {
        let tensors: Vec<_> = opened
            .iter()
            .flat_map(|o| {
                o.ck.tensors.iter().map(move |t| {
                    json!({"name": t.name, "dtype": t.dtype.to_string(), "shape": t.shape, "bytes": t.nbytes(),
                           "contiguous": t.is_contiguous(), "file": o.path.file_name().map(|n| n.to_string_lossy())})
                })
            })
            .collect();
        let layouts: Vec<_> = opened.iter().map(|o| format!("{:?}", o.ck.layout).to_lowercase()).collect();
        let skipped: Vec<_> = opened.iter().flat_map(|o| o.ck.skipped.iter()).collect();
        crate::text::write_json(
            out,
            &json!({"format": "pytorch", "layouts": layouts, "tensors": tensors, "skipped": skipped}),
        )?;
        return Ok(());
    }
    writeln!(out, "{:<48} {:<6} {:<20} {:>12}  file", "tensor", "dtype", "shape", "bytes")?;
    let (mut count, mut bytes) = (0usize, 0usize);
    for o in &opened {
        for t in &o.ck.tensors {
            let name = o.path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
            let view = if t.is_contiguous() { "" } else { " (strided view)" };
            writeln!(
                out,
                "{:<48} {:<6} {:<20} {:>12}  {}{view}",
                printable(&t.name),
                t.dtype.to_string(),
                shape_str(&t.shape),
                t.nbytes(),
                printable(&name)
            )?;
            count += 1;
            bytes += t.nbytes();
        }
    }
    let layouts: Vec<_> = opened.iter().map(|o| format!("{:?}", o.ck.layout).to_lowercase()).collect();
    writeln!(
        out,
        "{count} tensors, {bytes} bytes, {} PyTorch file(s) ({}), read without executing them",
        opened.len(),
        layouts.join(", ")
    )?;
    for o in &opened {
        if !o.ck.skipped.is_empty() {
            writeln!(
                out,
                "{}: not tensors, skipped: {}",
                printable(&o.path.display().to_string()),
                printable(&o.ck.skipped.join(", "))
            )?;
        }
    }
    Ok(())
}

/// `5GB`, `500MB`, `2GiB`, `1000`: bytes, as the hub's `max_shard_size` spells them.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("'{s}' is not a size (examples: 5GB, 500MB, 2GiB)"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1048576.0,
        "gib" => 1073741824.0,
        _ => return Err(format!("'{s}': unknown unit (B, KB, MB, GB, KiB, MiB, GiB)")),
    };
    let v = n * mult;
    if !(1.0..=1.8e19).contains(&v) {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(v as u64)
}

/// A tensor's place: file, storage, dtype, offset, shape and strides. Two names with one place are
/// tied weights.
type ViewKey = (usize, String, String, usize, Vec<usize>, Vec<usize>);

/// Writes `src` (a PyTorch checkpoint) to `dst` as safetensors: one `model.safetensors`,
/// or shards of at most `max_shard` bytes named as the hub names them with
/// `model.safetensors.index.json`. Tied weights (several names over the same storage and
/// view) are written once, as the reference `convert.py` writes them: under the first of
/// their names in sorted order, each other name recorded in `__metadata__` as
/// `{"removed": "kept"}`. Strided views are written contiguous. In each shard the tensors
/// lie widest element type first and then by name, as the reference writer orders them
/// (it orders types of one width by its own list of them), so that every tensor's data is
/// aligned to its element size.
pub fn convert(src: &Path, dst: &Path, max_shard: u64, out: &mut dyn Write) -> anyhow::Result<()> {
    if tensorlift::is_remote(src) {
        bail!(
            "{}: convert reads local PyTorch files; download them first (nothing was written)",
            tensorlift::redact_url(src).display()
        );
    }
    let opened = open_all(src)?;
    // DST is renamed into place at the end: it must be a name of its own (not `.`), and
    // nothing there but an empty folder; a link, even to an empty folder, is not replaced.
    if dst.file_name().is_none() {
        bail!("{}: name the folder to write, not `.`, `..` or `/` (nothing was written)", dst.display());
    }
    match std::fs::symlink_metadata(dst) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Ok(m) if m.file_type().is_symlink() => {
            bail!("{}: is a symbolic link; name the folder itself (nothing was written)", dst.display())
        }
        Ok(m) if m.is_dir() && std::fs::read_dir(dst).is_ok_and(|mut d| d.next().is_none()) => {}
        _ => bail!("{}: exists and is not an empty folder (nothing was written)", dst.display()),
    }
    // Every tensor, grouped with the names tied to it (the same storage and view), in the
    // order of each group's first name.
    let mut group_of: HashMap<ViewKey, usize> = HashMap::new();
    let mut names = std::collections::HashSet::new();
    let mut groups: Vec<Vec<(usize, &TorchTensor)>> = Vec::new();
    for (i, o) in opened.iter().enumerate() {
        for t in &o.ck.tensors {
            if !names.insert(t.name.clone()) {
                bail!("tensor '{}' appears in more than one file", printable(&t.name));
            }
            if t.nbytes() > 0 {
                let key =
                    (i, t.storage.clone(), t.dtype.to_string(), t.storage_offset, t.shape.clone(), t.strides.clone());
                if let Some(&g) = group_of.get(&key) {
                    groups[g].push((i, t));
                    continue;
                }
                group_of.insert(key, groups.len());
            }
            groups.push(vec![(i, t)]);
        }
    }
    // Each group written once, under its first name in sorted order (`convert.py`'s
    // `sorted(names)[0]`); the others are recorded as removed in favour of it.
    let mut todo: Vec<(usize, &TorchTensor)> = Vec::with_capacity(groups.len());
    let mut dropped: Vec<(String, String)> = Vec::new();
    for mut g in groups {
        g.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        let kept = g[0];
        dropped.extend(g[1..].iter().map(|(_, t)| (t.name.clone(), kept.1.name.clone())));
        todo.push(kept);
    }
    // Values that are not tensors are not written; with no tensor at all, the checkpoint
    // is most likely one that nests its state_dict (Lightning's `{"state_dict": ...}`,
    // `{"model": ...}`), which is refused rather than written as an empty model.
    let skipped: Vec<&String> = opened.iter().flat_map(|o| o.ck.skipped.iter()).collect();
    if opened.iter().all(|o| o.ck.tensors.is_empty()) {
        let what = match skipped.is_empty() {
            true => "it holds nothing".to_owned(),
            false => format!("at its top are values that are not tensors: {}", printable(&join_names(&skipped))),
        };
        bail!(
            "{}: no tensors to convert ({what}); a state_dict nested under a key is not read: save the state_dict \
             itself (nothing was written)",
            src.display()
        );
    }
    // Shards in order: a new one when the next tensor would pass the limit (a tensor
    // larger than the limit gets a shard of its own); in each, widest element type first,
    // then by name, as the reference writer orders them: every tensor's data starts at a
    // multiple of its element size, as zero-copy readers need.
    let mut shards: Vec<Vec<(usize, &TorchTensor)>> = vec![Vec::new()];
    let mut size = 0u64;
    for (i, t) in todo {
        let n = t.nbytes() as u64;
        if size > 0 && size + n > max_shard {
            shards.push(Vec::new());
            size = 0;
        }
        size += n;
        shards.last_mut().expect("one shard at least").push((i, t));
    }
    for shard in &mut shards {
        shard.sort_by(|a, b| b.1.dtype.bitsize().cmp(&a.1.dtype.bitsize()).then_with(|| a.1.name.cmp(&b.1.name)));
    }
    let count = shards.len();
    // Each name removed in favour of a kept one, by the kept one's shard (found by one
    // look-up each: tied views may be many).
    let shard_of: std::collections::HashMap<&str, usize> =
        shards.iter().enumerate().flat_map(|(k, shard)| shard.iter().map(move |(_, t)| (t.name.as_str(), k))).collect();
    let mut removed_in: Vec<Vec<(&String, &String)>> = vec![Vec::new(); count];
    for (removed, kept) in &dropped {
        if let Some(&k) = shard_of.get(kept.as_str()) {
            removed_in[k].push((removed, kept));
        }
    }
    // Every header is made and checked before anything is written: what is written must
    // read back, so names the format cannot hold (`__metadata__`) are refused up front.
    let mut headers = Vec::with_capacity(count);
    for (k, shard) in shards.iter().enumerate() {
        let name = if count == 1 {
            "model.safetensors".to_owned()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", k + 1)
        };
        for (_, t) in shard {
            if !reference_can_hold(t) {
                bail!(
                    "tensor '{}' of shape {:?} cannot be written: the reference readers cannot hold it \
                     (numpy's size or torch's strides overflow 64 bits; nothing was written)",
                    printable(&t.name),
                    t.shape
                );
            }
        }
        // The reference writer's metadata, and each name removed in favour of one here.
        let mut metadata: BTreeMap<String, String> = [("format".to_owned(), "pt".to_owned())].into();
        for &(removed, kept) in &removed_in[k] {
            metadata.entry(removed.clone()).or_insert_with(|| kept.clone());
        }
        let specs: Vec<(&str, tensorlift_format::Dtype, &[usize])> =
            shard.iter().map(|(_, t)| (t.name.as_str(), t.dtype, t.shape.as_slice())).collect();
        let enc = tensorlift_format::encode_header(&specs, Some(&metadata)).context(
            "these tensors cannot be written as safetensors (nothing was written): a size overflows, a name \
             repeats or is __metadata__, or a sub-byte tensor does not fill whole bytes",
        )?;
        let written_len = enc.bytes.len() as u64 + enc.data_len();
        tensorlift_format::parse_header(&dst.join(&name), &enc.bytes, written_len)
            .context("these tensors cannot be written as safetensors (nothing was written)")?;
        headers.push((name, enc));
    }
    // Everything is written into a folder beside DST and renamed to DST at the end: an
    // error or an interruption leaves no partial checkpoint that would load as a whole one.
    let parent = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let base = dst.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    remove_stale_partials(&parent, &base, out)?;
    // (Held, as a shared lock on the folder, until this convert is over: another convert
    // tells a live one's staging folder by it, wherever that one runs.)
    let (staging, _held) = new_staging(&parent, &base)?;
    let written = write_shards(&staging, &shards, headers, &opened, out);
    let result = written.and_then(|(tensors, total)| {
        for o in &opened {
            let now = tensorlift_io::file_identity(&o.file.metadata()?);
            // (Its bytes, by length and modification time: a rename or chmod meanwhile is
            // not a change of what was read.)
            if now.len != o.identity.len || now.modified_ns != o.identity.modified_ns {
                bail!(
                    "{} was written while it was converted (its length or modification time moved): nothing was \
                     written; convert it again",
                    o.path.display()
                );
            }
        }
        if dst.exists() {
            // Empty (checked above): rename replaces an empty folder.
            std::fs::remove_dir(dst).with_context(|| format!("replacing {}", dst.display()))?;
        }
        std::fs::rename(&staging, dst)
            .with_context(|| format!("renaming {} to {}", staging.display(), dst.display()))?;
        // The rename itself made durable: a success reported is one a power loss keeps.
        File::open(&parent)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {} after renaming {} into it", parent.display(), dst.display()))?;
        Ok((tensors, total))
    });
    let (tensors, total) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    for (name, first) in &dropped {
        writeln!(
            out,
            "tied: '{}' shares its data with '{}' and was not written again",
            printable(name),
            printable(first)
        )?;
    }
    if !skipped.is_empty() {
        writeln!(out, "not tensors, not written: {}", printable(&join_names(&skipped)))?;
    }
    writeln!(out, "{tensors} tensors, {total} bytes, from {} PyTorch file(s)", opened.len())?;
    Ok(())
}

/// Names for a message: the first 20, and how many more.
fn join_names(names: &[&String]) -> String {
    let mut s = names.iter().take(20).map(|n| n.as_str()).collect::<Vec<_>>().join(", ");
    if names.len() > 20 {
        s += &format!(" and {} more", names.len() - 20);
    }
    s
}

/// Whether the reference readers can hold a tensor of this shape: numpy refuses an array
/// whose non-zero dimensions times the element size overflow (`array is too big`), torch
/// one whose row-major strides do (`Stride calculation overflowed`), even when it is
/// empty. The product of every dimension (a zero counted as one) times the element size
/// bounds both.
fn reference_can_hold(t: &TorchTensor) -> bool {
    let es = (t.dtype.bitsize() / 8).max(1) as u64;
    t.shape.iter().try_fold(es, |a, &d| a.checked_mul((d as u64).max(1))).is_some_and(|n| n <= i64::MAX as u64)
}

/// A new, empty staging folder beside DST, `.BASE.partial-PID-N`: made by this call (never
/// one that was there, nor a link, which another process or an earlier one with this
/// process id may have left), the first free N; with the folder open and locked (shared)
/// for as long as the returned file lives. It is made under another name, locked, and only
/// then given its own: another convert never sees it unlocked.
fn new_staging(parent: &Path, base: &str) -> anyhow::Result<(PathBuf, Option<File>)> {
    for n in 0..1000 {
        let making = parent.join(format!(".{base}.making-{}-{n}", std::process::id()));
        let staging = parent.join(format!(".{base}.partial-{}-{n}", std::process::id()));
        if std::fs::symlink_metadata(&staging).is_ok() {
            continue;
        }
        match std::fs::create_dir(&making) {
            Ok(()) => {
                let held = File::open(&making).ok().filter(|f| tensorlift_io::try_lock(f, false));
                match std::fs::rename(&making, &staging) {
                    Ok(()) => return Ok((staging, held)),
                    // (Something took the name meanwhile: the next N.)
                    Err(_) if std::fs::symlink_metadata(&staging).is_ok() => {
                        let _ = std::fs::remove_dir(&making);
                        continue;
                    }
                    Err(e) => {
                        let _ = std::fs::remove_dir(&making);
                        return Err(e)
                            .with_context(|| format!("renaming {} to {}", making.display(), staging.display()));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", making.display())),
        }
    }
    bail!("{}: no free name for a staging folder beside it (.{base}.partial-*)", parent.display())
}

/// Removes the staging folders (`.BASE.partial-PID-N`, or `.BASE.partial-PID` as earlier
/// versions named them) that earlier runs of `convert` into the same destination left
/// behind when they were killed: their process is gone here, and no one holds the folder's
/// lock (a live convert in another PID namespace or on another host holds its own). One
/// that cannot be removed (another user's) is left, saying so: it is not this convert's
/// business.
fn remove_stale_partials(parent: &Path, base: &str, out: &mut dyn Write) -> anyhow::Result<()> {
    let prefix = format!(".{base}.partial-");
    let Ok(entries) = std::fs::read_dir(parent) else { return Ok(()) };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(tail) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else { continue };
        // `PID` or `PID-N`, digits only: nothing else is a staging folder of ours.
        let mut parts = tail.splitn(2, '-');
        let pid = parts.next().unwrap_or_default();
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(pid) || parts.next().is_some_and(|n| !digits(n)) {
            continue;
        }
        if Path::new(&format!("/proc/{pid}")).exists() || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        // (A folder, not a link, as checked above; held by no one, and held by this convert
        // until it is removed.)
        let Some(_held) = File::open(e.path()).ok().filter(|f| tensorlift_io::try_lock(f, true)) else { continue };
        match std::fs::remove_dir_all(e.path()) {
            Ok(()) => writeln!(
                out,
                "removed {}, left by an interrupted convert (process {pid})",
                crate::text::path(&e.path())
            )?,
            Err(why) => writeln!(
                out,
                "warning: {} was left by an interrupted convert (process {pid}) and cannot be removed: {why}",
                crate::text::path(&e.path())
            )?,
        }
    }
    Ok(())
}

/// The buffer a contiguous tensor is copied through.
const COPY_BUFFER: usize = 8 << 20;

/// Copies `len` bytes at `offset` of `src` to `w`, through `buf`; returns `len`.
fn copy_range(src: &File, offset: u64, len: u64, w: &mut dyn Write, buf: &mut [u8]) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], offset + done)?;
        w.write_all(&buf[..n])?;
        done += n as u64;
    }
    Ok(len)
}

/// Writes every shard (and the index, for more than one) into `dir`, synced; returns the
/// tensors and bytes written.
fn write_shards(
    dir: &Path,
    shards: &[Vec<(usize, &TorchTensor)>],
    headers: Vec<(String, tensorlift_format::EncodedHeader)>,
    opened: &[Opened],
    out: &mut dyn Write,
) -> anyhow::Result<(usize, u64)> {
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; COPY_BUFFER];
    for (shard, (name, enc)) in shards.iter().zip(headers) {
        let path = dir.join(&name);
        let mut w = BufWriter::with_capacity(
            8 << 20,
            File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        );
        w.write_all(&enc.bytes)?;
        for (i, t) in shard {
            let o = &opened[*i];
            // A contiguous tensor is copied through a buffer of 8 MiB (a tensor of tens of
            // GB needs no memory of its size); a strided view is gathered in memory.
            total += match o.ck.contiguous_range(&o.path, t)? {
                Some((offset, len)) => copy_range(&o.file, offset, len, &mut w, &mut buf)
                    .with_context(|| format!("copying tensor '{}' from {}", printable(&t.name), o.path.display()))?,
                None => {
                    // Memory is committed as it is touched: more than the host has would get
                    // the process killed midway instead of this error.
                    let needed = o.ck.gather_memory(&o.path, t)?;
                    if !tensorlift_io::can_allocate(needed) {
                        bail!(
                            "{}: tensor '{}' is a strided view, gathered in memory: it needs {needed} bytes, more \
                             than this host has available",
                            o.path.display(),
                            printable(&t.name)
                        );
                    }
                    let bytes = o.ck.tensor_bytes(&o.file, &o.path, t)?;
                    w.write_all(&bytes)?;
                    bytes.len() as u64
                }
            };
            weight_map.insert(t.name.clone(), name.clone());
        }
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        writeln!(out, "wrote {name} ({} tensors)", shard.len())?;
    }
    if shards.len() > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&index)?)?;
        File::open(&path)?.sync_all()?;
        writeln!(out, "wrote model.safetensors.index.json")?;
    }
    File::open(dir)?.sync_all()?;
    Ok((weight_map.len(), total))
}
