//! SHA-256 digests of checkpoint files: the `SHA256SUMS` file of coreutils (what
//! `sha256sum` writes and `sha256sum -c` checks), the digest a Hugging Face hub cache names
//! a file's blob by, each shard's expected digest, and the manifest of a checkpoint
//! ([`manifest`]).
//!
//! ```no_run
//! let m = tensorlift::checksums::manifest("models/llama")?;
//! let written = m.write()?; // models/llama/SHA256SUMS: `sha256sum -c SHA256SUMS` passes there
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

pub use crate::digest::{
    expected, format_sums, hub_blob_digest, parse_sums, sha256_file, DigestSource, Expected, Sha256, SumsError,
    SUMS_FILE,
};
use crate::digest::{format_sums_in, open_existing, parse_sums_bytes, plain, read_sums_bytes, relative, sha256_of};

/// Each shard's expected digest and where it was found (`None`: none found, where the
/// policy allows it).
pub(crate) type Digests = Vec<Option<(Sha256, DigestSource)>>;

/// What a verifying load of `plan` checks each shard against (see
/// [`LoaderBuilder::verify`](crate::LoaderBuilder::verify)): the expected digests, after
/// the index is checked (where a digest of it is known, or a hub cache names its blob by
/// git's SHA-1 of it: the file planning read, unchanged
/// since, and while it is hashed) and, under [`Verify::Required`], every shard the load
/// reads is seen to have one. `cancelled` says when nobody waits for them any more: a
/// remote checkpoint's fetches are then given up.
pub(crate) fn for_load(
    plan: &tensorlift_io::Checkpoint,
    policy: crate::Verify,
    cancelled: &dyn Fn() -> bool,
) -> Result<Digests, crate::LoadError> {
    // A plan made from a remote checkpoint's local copy would check the copy against the
    // cache folder (which holds no SHA256SUMS): a verified load reads the store.
    if let Some(url) = plan.copy_of() {
        return Err(crate::LoadError::Unsupported(format!(
            "a verified load of {}: this plan was made from its local copy in a cache folder, and a verified load \
             reads the store (plan it with the loader that verifies, or without a cache folder)",
            url.display()
        )));
    }
    // A remote checkpoint's SHA256SUMS and index are fetched from its folder in the store;
    // the shards' bytes are hashed as they land either way.
    let e = if plan.is_remote() { remote_expected(plan, cancelled)? } else { expected(plan)? };
    if let (Some(path), Some((want, from))) = (plan.index_file(), &e.index) {
        let actual = match plan.is_remote() {
            true => remote_index_digest(plan, path, cancelled)?,
            false => index_digest(plan, path)?,
        };
        if actual != *want {
            return Err(crate::LoadError::Checksum {
                file: path.to_path_buf(),
                expected: *want,
                actual,
                expected_by: from.clone(),
            });
        }
    }
    // In a hub cache the index is a git blob, named by git's SHA-1 of it: checked by that
    // where SHA256SUMS does not list it (a remote checkpoint has no local blob).
    if let (Some(path), None, false) = (plan.index_file(), &e.index, plan.is_remote()) {
        // (An index large enough to be stored with LFS is named by its SHA-256.)
        if let Some(want) = crate::digest::hub_blob_digest(path) {
            let actual = index_digest(plan, path)?;
            if actual != want {
                let blob = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
                let expected_by = crate::digest::DigestSource::HubBlob(blob);
                return Err(crate::LoadError::Checksum {
                    file: path.to_path_buf(),
                    expected: want,
                    actual,
                    expected_by,
                });
            }
        } else if let Some((blob, want)) = crate::digest::hub_git_blob(path) {
            let actual = index_hashed(plan, path, crate::digest::git_blob_sha1_of).map_err(|e| index_error(path, e))?;
            if actual != want {
                let hex = |d: &[u8; 20]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
                return Err(crate::LoadError::IndexBlob {
                    file: path.to_path_buf(),
                    blob,
                    expected: hex(&want),
                    actual: hex(&actual),
                });
            }
        }
    }
    if policy == crate::Verify::Required {
        // Only the shards the load reads need one: a plan narrowed to a few tensors reads
        // their shards alone (the others' headers were parsed, not verified: their
        // metadata is not checked).
        let read = crate::layout::verified_shards(plan);
        if let Some(i) = (e.shards.iter().zip(&read)).position(|(d, &read)| read && d.is_none()) {
            let file = crate::digest::named_path(plan.root(), &plan.shards()[i]);
            return Err(crate::LoadError::NoDigest { file, sums_file: e.sums_file });
        }
    }
    Ok(e.shards)
}

/// The digest of the index file at `path`, which must be the file planning read, unchanged
/// since and while it is hashed (the plan's shards are the ones it named).
fn index_digest(plan: &tensorlift_io::Checkpoint, path: &Path) -> Result<Sha256, crate::LoadError> {
    index_hashed(plan, path, sha256_of).map_err(|e| index_error(path, e))
}

fn index_error(path: &Path, e: IndexHash) -> crate::LoadError {
    match e {
        IndexHash::Io(source) => {
            crate::LoadError::Open(tensorlift_io::IoError::Open { file: path.to_path_buf(), source })
        }
        IndexHash::Changed(what) => crate::LoadError::ShardChanged { file: path.to_path_buf(), what },
    }
}

/// Why the index could not be hashed as planning read it.
enum IndexHash {
    Io(std::io::Error),
    /// How it changed since planning, or while it was hashed.
    Changed(String),
}

/// The index at `path` hashed by `hash`, which must be the file planning read, unchanged
/// since and while it is hashed: for loads and manifests alike.
fn index_hashed<T>(
    plan: &tensorlift_io::Checkpoint,
    path: &Path,
    hash: impl FnOnce(&std::fs::File, u64) -> std::io::Result<T>,
) -> Result<T, IndexHash> {
    let (f, len) = open_existing(path, true).map_err(IndexHash::Io)?;
    let identity = |f: &std::fs::File| f.metadata().map(|m| tensorlift_io::file_identity(&m)).map_err(IndexHash::Io);
    let before = identity(&f)?;
    if let Some(what) = plan.index_identity().and_then(|planned| tensorlift_io::identity_change(planned, &before)) {
        return Err(IndexHash::Changed(format!("the index: {what}")));
    }
    let actual = hash(&f, len).map_err(IndexHash::Io)?;
    if let Some(what) = tensorlift_io::identity_change(&before, &identity(&f)?) {
        return Err(IndexHash::Changed(format!("the index, while it was hashed: {what}")));
    }
    Ok(actual)
}

/// The expected digests of a remote checkpoint, from the `SHA256SUMS` object beside its
/// shards (fetched, bounded), if there is one.
fn remote_expected(
    plan: &tensorlift_io::Checkpoint,
    cancelled: &dyn Fn() -> bool,
) -> Result<crate::digest::Expected, crate::LoadError> {
    let sums_file = plan.root().join(SUMS_FILE);
    let fail = |message: String| crate::digest::SumsError { file: sums_file.clone(), line: 0, message };
    let fetched =
        plan.fetch_remote_file(SUMS_FILE, crate::digest::MAX_SUMS_BYTES, cancelled).map_err(|e| fail(e.to_string()))?;
    let listed = match fetched {
        Some((bytes, _)) => crate::digest::parse_sums_bytes(&bytes, &sums_file)?.0,
        None => Vec::new(),
    };
    Ok(crate::digest::expected_from(plan, &listed, sums_file, true)?)
}

/// The digest of a remote checkpoint's index, fetched again: the object planning read (its
/// length, modification time and ETag).
fn remote_index_digest(
    plan: &tensorlift_io::Checkpoint,
    path: &Path,
    cancelled: &dyn Fn() -> bool,
) -> Result<Sha256, crate::LoadError> {
    let changed = |what: String| crate::LoadError::ShardChanged { file: path.to_path_buf(), what };
    let name = path.strip_prefix(plan.root()).unwrap_or(path).to_string_lossy().into_owned();
    let fetched = plan
        .fetch_remote_file(&name, tensorlift_format::MAX_INDEX_LEN, cancelled)
        .map_err(|source| crate::LoadError::Open(tensorlift_io::IoError::Open { file: path.to_path_buf(), source }))?;
    let Some((bytes, now)) = fetched else { return Err(changed("the index is gone".into())) };
    if let Some(what) = plan.index_identity().and_then(|planned| tensorlift_io::identity_change(planned, &now)) {
        return Err(changed(format!("the index: {what}")));
    }
    Ok(Sha256(<sha2::Sha256 as sha2::Digest>::digest(&bytes).into()))
}

/// The digests of a checkpoint's files, as a `SHA256SUMS` in its folder lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The checkpoint's folder, which the names are relative to.
    pub folder: PathBuf,
    /// Every shard, under each name the index gives it, then the index (where there is
    /// one), with its digest.
    pub entries: Vec<(String, Sha256)>,
}

/// Why a manifest could not be made or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The checkpoint is not one tensorlift reads.
    #[error(transparent)]
    Format(#[from] tensorlift_format::FormatError),
    /// A file could not be read or written.
    #[error("{}: {source}", file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The manifest of the checkpoint at `path` (a `.safetensors` file, an index or a folder):
/// its shards and its index, validated as a load validates them, each read whole and hashed
/// (the files in parallel, one thread a CPU).
pub fn manifest(path: impl AsRef<Path>) -> Result<Manifest, ManifestError> {
    let path = path.as_ref();
    // The manifest is written beside the files: a remote checkpoint has none here.
    if tensorlift_io::is_remote(path) {
        return Err(ManifestError::Io {
            file: tensorlift_io::redact_url(path).into_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "a manifest is written beside local files; run it where the checkpoint is on disk",
            ),
        });
    }
    let plan = crate::plan(path)?;
    let folder = plan.root().to_path_buf();
    let shards = plan.shards().len();
    let index = plan.index_file().map(Path::to_path_buf);
    let count = shards + usize::from(index.is_some());
    let io = |file: &Path, source: std::io::Error| ManifestError::Io { file: file.to_path_buf(), source };
    let open = |p: &Path, follow: bool| open_existing(p, follow).map_err(|e| io(p, e));
    // One file: a shard through the descriptor planning validated (or opened again by its
    // resolved path, links not followed), its planned length, then checked unchanged; the
    // index as planning reads it, a regular file.
    let hash = |i: usize| -> Result<Sha256, ManifestError> {
        if i < shards {
            let s = &plan.shards()[i];
            let reopened;
            let f = match plan.shard_file(i) {
                Some(f) => f,
                None => {
                    reopened = open(&s.path, false)?.0;
                    &reopened
                }
            };
            let digest = sha256_of(f, s.file_len).map_err(|e| io(&s.path, e))?;
            let now = tensorlift_io::file_identity(&f.metadata().map_err(|e| io(&s.path, e))?);
            if let Some(what) = tensorlift_io::identity_change(&s.identity, &now) {
                return Err(io(&s.path, std::io::Error::other(format!("changed while it was hashed: {what}"))));
            }
            Ok(digest)
        } else {
            // The index planning read, so that its digest goes with the shards it named.
            let p = index.as_deref().unwrap_or(&folder);
            index_hashed(&plan, p, sha256_of).map_err(|e| match e {
                IndexHash::Io(e) => io(p, e),
                IndexHash::Changed(what) => {
                    io(p, std::io::Error::other(format!("changed since it was planned: {what}")))
                }
            })
        }
    };
    let threads = crate::config::cpus().unwrap_or(1).clamp(1, count.max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let digests: Vec<std::sync::Mutex<Option<Result<Sha256, ManifestError>>>> =
        (0..count).map(|_| std::sync::Mutex::new(None)).collect();
    let work = || loop {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if i >= count {
            break;
        }
        let d = hash(i);
        *digests[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(d);
    };
    // Helpers where threads can be had (a refused one is no panic), and this thread, which
    // hashes whatever they leave.
    std::thread::scope(|scope| {
        for _ in 1..threads {
            let _ = std::thread::Builder::new().spawn_scoped(scope, work);
        }
        work();
    });
    // Each file under every name the index gives it (the same file reached by two names is
    // one shard with aliases): `sha256sum -c` checks each name, and a line left for an alias
    // would keep its old digest.
    // (Spellings of one name, `./x` and `x`, are one line.)
    let names_of = |s: &tensorlift_format::Shard| {
        let mut seen = std::collections::HashSet::new();
        std::iter::once(&s.name).chain(&s.aliases).filter(|n| seen.insert(plain(n))).cloned().collect::<Vec<_>>()
    };
    let mut names: Vec<Vec<String>> = plan.shards().iter().map(names_of).collect();
    if let Some(index) = &index {
        names.push(vec![index.strip_prefix(&folder).unwrap_or(index).to_string_lossy().into_owned()]);
    }
    let mut entries = Vec::with_capacity(count);
    for (names, d) in names.into_iter().zip(digests) {
        let d = d.into_inner().unwrap_or_else(|p| p.into_inner());
        let d = d.unwrap_or_else(|| Err(io(&folder, std::io::Error::other("not hashed"))))?;
        entries.extend(names.into_iter().map(|n| (n, d)));
    }
    Ok(Manifest { folder, entries })
}

impl Manifest {
    /// Writes the manifest as `SHA256SUMS` in the checkpoint's folder. The lines of a
    /// `SHA256SUMS` already there for other files (a tokenizer, a config), and its comments,
    /// are kept as they are, byte for byte, before this manifest's (a line that names one of
    /// this manifest's files by another name, an absolute path or a link, is kept under that
    /// name with the file's new digest); one that cannot be read
    /// is an error, and is left as it is. The file is written beside it under a new name,
    /// then renamed over it: a reader never sees half a file, and no link at either name is
    /// followed (the new file replaces a link). Returns its path.
    pub fn write(&self) -> Result<PathBuf, ManifestError> {
        let path = self.folder.join(SUMS_FILE);
        let io = |file: &Path, source: std::io::Error| ManifestError::Io { file: file.to_path_buf(), source };
        let ours: std::collections::HashSet<String> = self.entries.iter().map(|(n, _)| plain(n)).collect();
        let cannot_keep = |e: SumsError| {
            let at = if e.line > 0 { format!(" (line {})", e.line) } else { String::new() };
            io(&path, std::io::Error::other(format!("its other entries cannot be kept: {}{at}", e.message)))
        };
        let mut text: Vec<u8> = Vec::new();
        let mut kept: Vec<(String, Sha256)> = Vec::new();
        let mut one_space = false;
        if let Some(bytes) = read_sums_bytes(&path).map_err(cannot_keep)? {
            // Its entries read as a whole (the first line sets the form for the rest); the
            // lines of this manifest's files are replaced, any other is kept as it is (an
            // absolute name, `/model.safetensors`, is not the folder's file: kept).
            let (entries, _) = parse_sums_bytes(&bytes, &path).map_err(cannot_keep)?;
            // A line that names one of this manifest's files another way (an absolute path,
            // `a/../b`, a link to it) would be checked against the file, old digest and all,
            // by `sha256sum -c`: it is kept under its name with the file's digest. (Files are
            // told apart as the system does, by device and inode, following links as
            // `sha256sum -c` does.)
            use std::os::unix::fs::MetadataExt;
            let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
            let digests: std::collections::HashMap<(u64, u64), Sha256> =
                self.entries.iter().filter_map(|(n, d)| Some((id(&self.folder.join(n))?, *d))).collect();
            let digest_of = |n: &str| id(&self.folder.join(n)).and_then(|i| digests.get(&i).copied());
            let mut replaced = std::collections::HashSet::new();
            let mut rewritten = std::collections::HashMap::new();
            for (line, n, d) in entries {
                if relative(&n).is_some_and(|n| ours.contains(&n)) {
                    replaced.insert(line);
                    continue;
                }
                let d = match digest_of(&n) {
                    Some(new) => {
                        rewritten.insert(line, (n.clone(), new));
                        new
                    }
                    None => d,
                };
                kept.push((n, d));
            }
            let raw_lines: Vec<&[u8]> = match bytes.is_empty() {
                true => Vec::new(),
                false => bytes.strip_suffix(b"\n").unwrap_or(&bytes).split(|&b| b == b'\n').collect(),
            };
            // The form is the lines' left (a replaced line may have been the one that set
            // it); with none, two spaces, as sha256sum writes.
            let mut left: Vec<u8> = Vec::new();
            for (i, raw) in raw_lines.iter().enumerate() {
                if !replaced.contains(&(i + 1)) {
                    left.extend_from_slice(raw);
                    left.push(b'\n');
                }
            }
            one_space = parse_sums_bytes(&left, &path).map_err(cannot_keep)?.1 == Some(true);
            for (i, raw) in raw_lines.iter().enumerate() {
                match rewritten.get(&(i + 1)) {
                    _ if replaced.contains(&(i + 1)) => {}
                    Some(entry) => {
                        text.extend_from_slice(format_sums_in(std::slice::from_ref(entry), one_space).as_bytes())
                    }
                    None => {
                        text.extend_from_slice(raw);
                        text.push(b'\n');
                    }
                }
            }
        }
        // In the file's form: lines of the other form after its first would not be read.
        text.extend_from_slice(format_sums_in(&self.entries, one_space).as_bytes());
        // What is written must read back as the kept entries, then this manifest's.
        let reread = parse_sums_bytes(&text, &path).map_err(cannot_keep)?.0;
        let reread: Vec<(String, Sha256)> = reread.into_iter().map(|(_, n, d)| (n, d)).collect();
        if reread != [kept, self.entries.clone()].concat() {
            return Err(io(
                &path,
                std::io::Error::other(
                    "its other entries cannot be kept with this manifest's in one form (a name that starts with a \
                     space or `*`): nothing was written",
                ),
            ));
        }
        let mut created = None;
        for n in 0..100 {
            let p = self.folder.join(format!(".{SUMS_FILE}.partial-{}-{n}", std::process::id()));
            // create_new: never an existing file, nor a link, at that name.
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&p) {
                Ok(f) => {
                    created = Some((p, f));
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io(&p, e)),
            }
        }
        let Some((partial, mut f)) = created else {
            return Err(io(&path, std::io::Error::other("no free name for the file written beside it")));
        };
        let result = (|| {
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&partial, &path)?;
            std::fs::File::open(&self.folder)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result.map_err(|e| io(&path, e))?;
        Ok(path)
    }
}
