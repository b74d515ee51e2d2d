//! Opening a checkpoint: the user's path is looked up once, every shard is opened once
//! (relative to the opened model folder, never blocking), checked, and the same descriptor
//! is what a load reads.
//!
//! The folder and link policy (docs/ENVIRONMENT.md states it for users):
//! - a shard name in an index is a plain relative name: no absolute path, no `..`;
//! - a link (the index file, or a shard) may resolve inside the model folder, or, for a
//!   Hugging Face hub cache snapshot (`models--ORG--NAME/snapshots/REV/`), into that same
//!   repository's `blobs/` folder; anywhere else is refused (even a hub cache's blobs from
//!   a folder that is no snapshot: a hostile folder could name another repository's);
//! - the path the user gives is theirs: links in it are followed, and a single file named
//!   directly is read wherever it lives;
//! - a FIFO, device, socket or directory where a shard or the index should be is an error
//!   naming it;
//! - the same file reached under two names is one shard (device and inode compared).

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tensorlift_format::{
    check_relative, header_len, natural_cmp, normal_name, parse_header, parse_index, FileIdentity, FormatError, Header,
    LoadPlan, Shard, TensorInfo, HEADER_PREFIX_LEN, INDEX_FILE_NAME, MAX_INDEX_LEN,
};

use crate::file::{file_identity, kind_name};
use crate::remote::get::RemoteFolder;
use crate::remote::{RemoteObject, RemoteOptions};
use crate::IoError;

/// Default bound on the header bytes one plan holds (see [`PlanLimits::max_header_bytes`]).
pub const DEFAULT_MAX_HEADER_BYTES: u64 = 256 << 20;
/// Default bound on the distinct shard names of an index (see [`PlanLimits::max_shards`]).
pub const DEFAULT_MAX_SHARDS: usize = 10_000;
/// Default bound on the shard descriptors one plan keeps open (see [`PlanLimits::max_open_files`]).
pub const DEFAULT_MAX_OPEN_FILES: usize = 128;

/// Memory that parsing and planning use per byte of header, at most: a tensor entry is at
/// least about 50 bytes of JSON and costs about 350 bytes parsed and planned; a metadata
/// entry (`"k":""`, 7 bytes) about 100.
const PARSE_BYTES_PER_HEADER_BYTE: u64 = 16;
/// The same for an index, whose values are parsed into a JSON tree: an array element of 2
/// bytes (`0,`) is a 32-byte value, in a vector that may hold twice its length while it
/// grows, and the text itself is held too.
const PARSE_BYTES_PER_INDEX_BYTE: u64 = 40;

/// Bounds on what planning may hold, whatever the checkpoint says.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PlanLimits {
    /// Header bytes of all shards together (default 256 MiB; a real checkpoint of 100,000
    /// tensors has about 15 MB). Over it, planning fails with [`FormatError::HeaderBudget`].
    pub max_header_bytes: u64,
    /// Descriptors of shard files open at once (default 128, and never more than a quarter
    /// of `RLIMIT_NOFILE`): planning keeps half of them open for the load (shards past that
    /// are closed after their header is read, and reopened by the load, which checks that
    /// they are the same files); a load reads a window of a quarter of them at a time (each
    /// shard can take two, with O_DIRECT).
    pub max_open_files: usize,
    /// Distinct shard names an index may list, and `.safetensors` files a folder without one
    /// may hold (default 10,000; the largest real checkpoints have a few hundred shards).
    /// Each name is looked up (a folder's are opened) before the index is checked against
    /// the headers, so the bound keeps a hostile index or folder from making planning take
    /// minutes.
    pub max_shards: usize,
    /// How a remote checkpoint (`s3://`, `gs://`, `az://`, `http(s)://`) is read: request
    /// sizes, concurrency, retries and timeouts (default [`RemoteOptions::from_env`]).
    pub remote: RemoteOptions,
}

impl Default for PlanLimits {
    fn default() -> Self {
        PlanLimits {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_open_files: DEFAULT_MAX_OPEN_FILES,
            max_shards: DEFAULT_MAX_SHARDS,
            remote: RemoteOptions::from_env(),
        }
    }
}

impl PlanLimits {
    /// [`max_open_files`](Self::max_open_files), capped by a quarter of the process's
    /// open-file limit, and at least 1.
    pub fn open_files_bound(&self) -> usize {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes into the struct we pass, nothing else.
        let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
        } else {
            1024
        };
        self.max_open_files.min(soft / 4).max(1)
    }
}

/// What planning tells a load that starts reading before planning ends (see
/// [`open_checkpoint_observed`](crate::open_checkpoint_observed)). Its methods are called from planning's threads.
pub trait PlanObserver: Sync {
    /// Whether [`headers_read`](Self::headers_read) is wanted (building its plan costs a
    /// little per shard).
    fn wants_early_plan(&self) -> bool {
        false
    }

    /// Every shard's header has been read and none parsed yet: `early` holds the shards,
    /// with the descriptors planning keeps open and no tensors ([`LoadPlan::unparsed`]).
    /// Not called for PyTorch files, whose tensors are known only once read whole.
    fn headers_read(&self, early: Checkpoint) {
        let _ = early;
    }

    /// Shard `i`'s header is validated ([`parse_header`]); `header_hash` is the hash of its
    /// bytes ([`tensorlift_format::header_hash`]). After `headers_read`, and in no set order
    /// between shards. The checks across shards (names, the index) come later.
    fn validated(&self, i: usize, header_hash: u64) {
        let _ = (i, header_hash);
    }

    /// Whether nobody waits for the plan any more (a load that was dropped): planning then
    /// stops at the next header and fails with [`FormatError::Io`] (`Interrupted`).
    fn cancelled(&self) -> bool {
        false
    }
}

/// An observer that wants nothing.
pub(crate) struct Quiet;

impl PlanObserver for Quiet {}

/// A planned checkpoint and the descriptors its planning opened: the shards it keeps open,
/// and the model folder where it closed some. A load reads these same descriptors; shards
/// that were closed to bound open files are reopened relative to the folder and must be the
/// same files. A remote checkpoint holds its objects instead
/// ([`remote_object`](Self::remote_object)).
///
/// It dereferences to its [`LoadPlan`]. Clones share the descriptors.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    plan: LoadPlan,
    /// The model folder, to reopen shards whose descriptors were closed to bound open files;
    /// `None` for a remote checkpoint, and where every shard's is held (a process that keeps
    /// many plans, as transformers keeps a handle a shard, would hold two descriptors each).
    dir: Option<Arc<File>>,
    files: Vec<Option<Arc<File>>>,
    /// The index file planning read, as it was then.
    index_identity: Option<FileIdentity>,
    /// A remote checkpoint's shards, by shard (empty for a local one).
    remote: Vec<Arc<RemoteObject>>,
    /// A remote checkpoint's folder in its store.
    remote_root: Option<Arc<RemoteFolder>>,
    /// When planning began, in nanoseconds since the epoch (`None` for a remote checkpoint).
    planned_ns: Option<i128>,
    /// The remote checkpoint (its URL) this one is the local copy of, where planning found
    /// a copy in a cache folder.
    copy_of: Option<PathBuf>,
}

/// How long before planning a file's last status change must be for its unchanged times to
/// prove it unchanged: file systems keep times in ticks (a few milliseconds on kernels
/// without fine-grained timestamps, seconds on some file systems), and a write within the
/// tick that planning saw moves no time (as git's "racily clean" entries).
pub const SETTLED_NS: i128 = 2_000_000_000;

impl std::ops::Deref for Checkpoint {
    type Target = LoadPlan;
    fn deref(&self) -> &LoadPlan {
        &self.plan
    }
}

impl std::ops::DerefMut for Checkpoint {
    fn deref_mut(&mut self) -> &mut LoadPlan {
        &mut self.plan
    }
}

impl Checkpoint {
    /// The plan.
    pub fn plan(&self) -> &LoadPlan {
        &self.plan
    }

    /// The checkpoint with only the tensors at `indices` into its plan's tensors, sharing
    /// its descriptors ([`LoadPlan::subset`]): a clone that does not copy the rest of a
    /// large plan.
    pub fn subset(&self, indices: impl IntoIterator<Item = usize>) -> Checkpoint {
        Checkpoint {
            plan: self.plan.subset(indices),
            dir: self.dir.clone(),
            files: self.files.clone(),
            index_identity: self.index_identity,
            remote: self.remote.clone(),
            remote_root: self.remote_root.clone(),
            planned_ns: self.planned_ns,
            copy_of: self.copy_of.clone(),
        }
    }

    /// Whether shard `i`, whose open descriptor now has the identity `now`, is certainly the
    /// file planned: it has the planned identity (file, length, modification and status
    /// change times), and its status last changed at least [`SETTLED_NS`] before planning
    /// began, so that a write since would have moved it. Where this is not so, only the
    /// file's bytes can tell.
    pub fn certainly_unchanged(&self, i: usize, now: &FileIdentity) -> bool {
        let (Some(planned), Some(shard)) = (self.planned_ns, self.plan.shards().get(i)) else { return false };
        identity_change(&shard.identity, now).is_none() && shard.identity.changed_ns < planned - SETTLED_NS
    }

    /// The plan, without the descriptors.
    pub fn into_plan(self) -> LoadPlan {
        self.plan
    }

    /// The index file as planning read it (its device, inode, length and times), for a
    /// checkpoint planned from an index: a later reading of the index can be held to it.
    pub fn index_identity(&self) -> Option<&FileIdentity> {
        self.index_identity.as_ref()
    }

    /// The remote checkpoint (its URL) whose local copy, in a cache folder, this plan was
    /// made from, in place of the store's objects; `None` otherwise.
    pub fn copy_of(&self) -> Option<&Path> {
        self.copy_of.as_deref()
    }

    /// Marks the plan as made from the local copy of the remote checkpoint `url`.
    pub(crate) fn mark_copy_of(&mut self, url: &Path) {
        self.copy_of = Some(url.to_path_buf());
    }

    /// Whether the checkpoint is remote (object storage or HTTP): its shards are read by
    /// [`remote_object`](Self::remote_object), not from descriptors.
    pub fn is_remote(&self) -> bool {
        self.remote_root.is_some()
    }

    /// A file of a remote checkpoint's folder (`name` relative to it, as an index names its
    /// shards), read whole if it is at most `max` bytes: its bytes and identity (length,
    /// modification time, and its ETag's hash for the inode, as planning records the
    /// index's), or `None` where there is no such object. An error for a local checkpoint.
    /// Given up (an `Interrupted` error, its requests dropped) once `cancelled` says nobody
    /// waits for it, asked every 20 ms, or (`TimedOut`) past the remote options'
    /// `plan_timeout`.
    pub fn fetch_remote_file(
        &self,
        name: &str,
        max: u64,
        cancelled: &dyn Fn() -> bool,
    ) -> io::Result<Option<(Vec<u8>, FileIdentity)>> {
        match &self.remote_root {
            Some(folder) => folder.fetch(name, max, cancelled),
            None => Err(io::Error::new(io::ErrorKind::InvalidInput, "a local checkpoint has no remote folder")),
        }
    }

    /// Shard `i` of a remote checkpoint, as planning saw it (`None` for a local one).
    pub fn remote_object(&self, i: usize) -> Option<&Arc<RemoteObject>> {
        self.remote.get(i)
    }

    /// A remote checkpoint planned from `plan`, `objects` by shard.
    pub(crate) fn remote(
        plan: LoadPlan,
        index_identity: Option<FileIdentity>,
        objects: Vec<Arc<RemoteObject>>,
        folder: RemoteFolder,
    ) -> Self {
        let files = vec![None; objects.len()];
        let remote_root = Some(Arc::new(folder));
        Checkpoint {
            plan,
            dir: None,
            files,
            index_identity,
            remote: objects,
            remote_root,
            planned_ns: None,
            copy_of: None,
        }
    }

    /// Number of shard descriptors held open.
    pub fn open_files(&self) -> usize {
        self.files.iter().filter(|f| f.is_some()).count()
    }

    /// The descriptor planning kept for shard `i`, if it kept one, without taking it (to
    /// look at the file, not to read it: see [`take_checked`](Self::take_checked)).
    pub fn shard_file(&self, i: usize) -> Option<&File> {
        self.files.get(i)?.as_deref()
    }

    /// Whether [`take_checked`](Self::take_checked) would open shard `i` again by its name
    /// (planning closed it, or it was taken already), rather than hand over the descriptor
    /// planning read its header from.
    pub fn reopens(&self, i: usize) -> bool {
        !self.is_remote() && self.files.get(i).is_none_or(Option::is_none)
    }

    /// Closes the descriptor held for shard `i`, if any: a load that took the shard from
    /// another plan of the same files (one made while planning went on) has no use for it.
    /// The shard can be taken from this plan after that only where the plan holds the model
    /// folder (planning closed some shards): a path is never looked up again.
    pub fn release_shard(&mut self, i: usize) {
        if let Some(f) = self.files.get_mut(i) {
            *f = None;
        }
    }

    /// The descriptor of shard `i`, checked to be the planned file, unchanged, and the
    /// identity the checks found it with: the descriptor planning read (it is released by
    /// this call), or, for a shard closed after planning, the file reopened by its name
    /// relative to the model folder. A reader of the descriptor checks after its reads that
    /// the file still has that identity (status change time included), so that a write
    /// meanwhile is refused.
    ///
    /// The file must have the planned device, inode, length and modification time
    /// ([`content_change`]). Its status change time may have moved since planning: a file
    /// moved away, linked or `chmod`ed reads as planned through the descriptor held, as it
    /// would through the reference's mapping. Since a write whose modification time was
    /// set back moves it too, the header is then read again through the descriptor and
    /// compared with the planned one; `check` says when else it is (see [`HeaderCheck`]).
    pub fn take_checked(&mut self, i: usize, check: HeaderCheck) -> Result<(Arc<File>, FileIdentity), IoError> {
        let shard = self.plan.shards().get(i).ok_or_else(|| IoError::Open {
            file: self.plan.root().to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, format!("no shard {i} in the plan")),
        })?;
        let changed = |what: String| IoError::Changed { file: shard.path.clone(), what };
        let hash = match check {
            HeaderCheck::Planned => shard.header_hash,
            HeaderCheck::Fresh(hash) => hash,
        };
        let reopened = self.reopens(i);
        let file = match self.files.get_mut(i).and_then(Option::take) {
            Some(f) => f,
            None => {
                // Looked up again by name: pinned with O_PATH first and compared with the
                // planned file before it is opened for reading, so a file swapped in under
                // the name (a device, a FIFO, a link out of the folder) is never opened.
                let Some(dir) = &self.dir else {
                    let what = if self.is_remote() {
                        "a remote shard is read through its object, not a descriptor"
                    } else {
                        // Never looked up by its path again: see release_shard.
                        "its descriptor was released, and the plan holds no folder to reopen it from"
                    };
                    return Err(changed(what.into()));
                };
                let l = locate(dir, &shard.name).map_err(|e| changed(format!("cannot reopen it: {e}")))?;
                if !l.meta.is_file() {
                    return Err(changed(format!("it is now a {}", kind_name(&l.meta))));
                }
                if (l.meta.dev(), l.meta.ino()) != (shard.identity.dev, shard.identity.ino) {
                    return Err(changed("another file has taken its name".into()));
                }
                Arc::new(l.open_for_reading().map_err(|e| changed(format!("cannot reopen it: {e}")))?)
            }
        };
        let now = file_identity(&file.metadata().map_err(|e| changed(format!("cannot stat it: {e}")))?);
        if let Some(what) = content_change(&shard.identity, &now) {
            return Err(changed(what));
        }
        // Read after the identity was taken: a write before the read shows in the hash, one
        // after it in the reader's check of that identity.
        let read_again = now.changed_ns != shard.identity.changed_ns
            || reopened
            || (check == HeaderCheck::Planned && !self.certainly_unchanged(i, &now));
        if read_again {
            check_header(shard, &file, hash)?;
        }
        Ok((file, now))
    }
}

/// Reads `shard`'s header through `file` and compares it with `header`, the planned
/// header's hash: "its header differs from the planned one" where it does not match.
fn check_header(shard: &Shard, file: &File, header: u64) -> Result<(), IoError> {
    let changed = |what: String| IoError::Changed { file: shard.path.clone(), what };
    let n = shard.data_start() as usize;
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(n).map_err(|_| IoError::OutOfMemory { file: shard.path.clone(), bytes: n as u64 })?;
    bytes.resize(n, 0);
    file.read_exact_at(&mut bytes, 0).map_err(|e| changed(format!("cannot re-read its header: {e}")))?;
    if tensorlift_format::header_hash(&bytes) != header {
        return Err(changed("its header differs from the planned one".into()));
    }
    Ok(())
}

/// When [`Checkpoint::take_checked`] reads a shard's header again, and which hash it is
/// compared with. It always is where the file was reopened by its name, or its status
/// changed since planning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderCheck {
    /// For a plan made before the reading began (the file may have changed since): with the
    /// shard's planned hash, also where the shard comes through the descriptor planning
    /// read it from, unless it is certainly unchanged since
    /// ([`Checkpoint::certainly_unchanged`]). A plan's tensors read one at a time, as a
    /// Python handle's are, would otherwise each read the header whole.
    Planned,
    /// For a plan being made by the reader, which reads the descriptors planning read the
    /// headers from: with this hash, the one validation found (the plan holds none yet).
    Fresh(u64),
}

/// Plans the local checkpoint at `path` (see [`crate::open_checkpoint_observed`]).
pub(crate) fn open_local(
    path: &Path,
    limits: &PlanLimits,
    observer: &dyn PlanObserver,
) -> Result<Checkpoint, FormatError> {
    let io_err = |source| FormatError::Io { file: path.to_path_buf(), source };
    // The user's own path: links in it are followed. Nothing is opened yet, so nothing blocks.
    let meta = std::fs::metadata(path).map_err(io_err)?;
    let mut planner = Planner::new(limits, observer);
    if meta.is_dir() {
        let root = std::fs::canonicalize(path).map_err(io_err)?;
        let dir = open_dir(&root).map_err(io_err)?;
        let policy = LinkPolicy::for_root(&root);
        match planner.open_entry(&dir, &root, &policy, INDEX_FILE_NAME, &root.join(INDEX_FILE_NAME))? {
            Some(opened) => planner.plan_index(dir, root, INDEX_FILE_NAME, opened, &policy),
            None => planner.plan_scan(dir, root, &policy),
        }
    } else if !meta.is_file() {
        Err(FormatError::NotARegularFile { file: path.to_path_buf(), kind: kind_name(&meta) })
    } else {
        let (name, root, dir) = named_file(path)?;
        if path.extension().is_some_and(|e| e == "json") {
            let policy = LinkPolicy::for_root(&root);
            let context = root.join(&name);
            match planner.open_entry(&dir, &root, &policy, &name, &context)? {
                Some(opened) => planner.plan_index(dir, root, &name, opened, &policy),
                None => Err(io_err(io::Error::from(io::ErrorKind::NotFound))),
            }
        } else {
            // A file named directly is read wherever its links lead.
            let context = root.join(&name);
            let opened = planner
                .open_entry(&dir, &root, &LinkPolicy::Anywhere, &name, &context)?
                .ok_or_else(|| io_err(io::Error::from(io::ErrorKind::NotFound)))?;
            planner.add_shard(&context, name, opened)?;
            planner.finish(&context, dir, root, None)
        }
    }
}

/// A file named directly: its name, and its folder (canonical, and opened). The folder is
/// the parent of the path as given, not of where a link resolves.
fn named_file(path: &Path) -> Result<(String, PathBuf, File), FormatError> {
    let io_err = |source| FormatError::Io { file: path.to_path_buf(), source };
    let name = path.file_name().ok_or_else(|| FormatError::NotACheckpoint { file: path.to_path_buf() })?;
    let name = name.to_str().ok_or_else(|| FormatError::NameNotUtf8 { file: path.to_path_buf() })?.to_owned();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let root = std::fs::canonicalize(parent).map_err(io_err)?;
    let dir = open_dir(&root).map_err(io_err)?;
    Ok((name, root, dir))
}

/// The shard files an index names: each distinct name checked (relative, inside the
/// folder) and spelled once (`a`, `./a` and `././a` are one file before any look-up), with
/// the spellings the index uses for it, in natural order of the spelled names; at most
/// `max_shards` of them. The index repeats each name once per tensor: the work here is
/// once per distinct name, not per tensor.
pub(crate) fn index_shards(
    context: &Path,
    index: &tensorlift_format::Index,
    limits: &PlanLimits,
) -> Result<Vec<(String, Vec<String>)>, FormatError> {
    let distinct: std::collections::BTreeSet<&str> = index.shards().iter().map(String::as_str).collect();
    let mut spellings: HashMap<String, Vec<String>> = HashMap::new();
    for raw in distinct {
        check_relative(context, raw)?;
        spellings.entry(normal_name(raw)).or_default().push(raw.to_owned());
    }
    if spellings.len() > limits.max_shards {
        return Err(FormatError::InvalidIndex {
            file: context.to_path_buf(),
            message: format!(
                "it names {} shard files, over the limit of {} (PlanLimits::max_shards)",
                spellings.len(),
                limits.max_shards
            ),
        });
    }
    let mut names: Vec<(String, Vec<String>)> = spellings.into_iter().collect();
    names.sort_by(|a, b| natural_cmp(&a.0, &b.0));
    Ok(names)
}

/// `TENSORLIFT_USE_SAFETENSORS=1` asks for safetensors only: PyTorch checkpoints are refused
/// (saying how to convert them) instead of read by the pickle reader, as transformers'
/// `use_safetensors=True` does.
pub const USE_SAFETENSORS_ENV: &str = "TENSORLIFT_USE_SAFETENSORS";

/// The index of a sharded PyTorch checkpoint, as the hub names it.
pub const TORCH_INDEX: &str = "pytorch_model.bin.index.json";
/// A single-file PyTorch checkpoint, as the hub names it.
pub const TORCH_SINGLE: &str = "pytorch_model.bin";
/// Whether a folder entry is a PyTorch file or index, as a folder without safetensors is
/// scanned for them (locally and in a store).
pub(crate) fn is_torch_entry(name: &str) -> bool {
    [".bin", ".pt", ".pth", ".bin.index.json"].iter().any(|x| name.ends_with(x))
}

/// A folder holding PyTorch files (`first` of them) but none of the hub's weights names:
/// other pickles (`training_args.bin`) are not weights.
pub(crate) fn no_torch_weights(first: PathBuf) -> FormatError {
    FormatError::PyTorchCheckpoint {
        file: first,
        layout: "the folder holds PyTorch files but neither pytorch_model.bin nor its index, and no .safetensors files",
    }
}

pub(crate) const SAFETENSORS_ONLY: &str = "TENSORLIFT_USE_SAFETENSORS=1 asks for safetensors only";

pub(crate) fn safetensors_only() -> bool {
    std::env::var(USE_SAFETENSORS_ENV).is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "True" | "yes"))
}

/// Why the PyTorch checkpoint named `file` (as it was looked up, not where its links lead) is
/// not read, if it is not: safetensors only were asked for, or its name says it is a
/// safetensors file. (A check that a file is safetensors by opening it, as the reference's
/// `safe_open` refuses anything else, must not pass a pickle so named.)
pub(crate) fn torch_refused(file: &Path) -> Option<&'static str> {
    if safetensors_only() {
        return Some(SAFETENSORS_ONLY);
    }
    let named = file.file_name().is_some_and(|n| n.as_encoded_bytes().ends_with(b".safetensors"));
    named.then_some("named .safetensors, so read as nothing else: rename it .bin to read it as PyTorch")
}

/// Where links may lead.
enum LinkPolicy {
    Anywhere,
    Within { root: PathBuf, blobs: Option<PathBuf> },
}

impl LinkPolicy {
    fn for_root(root: &Path) -> LinkPolicy {
        // models--ORG--NAME/snapshots/REV[/SUBFOLDER...]: files are links into
        // models--ORG--NAME/blobs (a subfolder, as diffusers checkpoints have, is in a snapshot too).
        let blobs = root.ancestors().find_map(|a| {
            let snapshots = a.parent().filter(|p| p.file_name().is_some_and(|n| n == "snapshots"))?;
            let repo = snapshots.parent()?;
            repo.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("models--"))
                .then(|| repo.join("blobs"))
        });
        LinkPolicy::Within { root: root.to_path_buf(), blobs }
    }

    fn allows(&self, real: &Path) -> bool {
        match self {
            LinkPolicy::Anywhere => true,
            LinkPolicy::Within { root, blobs } => {
                real.starts_with(root) || blobs.as_ref().is_some_and(|b| real.parent() == Some(b.as_path()))
            }
        }
    }
}

/// Whether a link in `folder` (an opened model folder, canonical) that resolves to `real`
/// may be followed, by the rule shards' links follow: it stays in the folder, or, for a
/// Hugging Face hub cache snapshot, it leads into that repository's `blobs/`.
pub fn link_allowed(folder: &Path, real: &Path) -> bool {
    LinkPolicy::for_root(folder).allows(real)
}

/// A shard's header as read: bytes to parse, or (a PyTorch file) already read.
pub(crate) enum HeaderWork {
    Parse(Vec<u8>),
    Done(Header, u64),
}

/// Parses a header's bytes, with the hash a load compares.
fn parse(path: &Path, file_len: u64, bytes: &[u8]) -> Result<(Header, u64), FormatError> {
    parse_header(path, bytes, file_len).map(|h| (h, tensorlift_format::header_hash(bytes)))
}

/// Parses the headers read for `pending`, on up to one thread per CPU (8 at most), telling
/// `observer` of each as it is validated; results in order, `None` for a header already
/// read (a PyTorch file's). Thread `t` of `n` takes shards `t`, `t + n`, ...: a load reads
/// shards from the first on, so they are validated in about that order.
fn parse_all(pending: &[Pending], observer: &dyn PlanObserver) -> Vec<Option<Result<(Header, u64), FormatError>>> {
    let one = |k: usize| match &pending[k].work {
        HeaderWork::Parse(_) if observer.cancelled() => Some(Err(cancelled(&pending[k].path))),
        HeaderWork::Parse(bytes) => {
            let r = parse(&pending[k].path, pending[k].identity.len, bytes);
            if let Ok((_, hash)) = &r {
                observer.validated(k, *hash);
            }
            Some(r)
        }
        HeaderWork::Done(..) => None,
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8).min(pending.len());
    // A thread costs more than a small header: only batches worth it are split.
    let bytes: usize = pending.iter().map(|p| if let HeaderWork::Parse(b) = &p.work { b.len() } else { 0 }).sum();
    if threads < 2 || bytes < 1 << 20 {
        return (0..pending.len()).map(one).collect();
    }
    let mut out: Vec<Option<Result<(Header, u64), FormatError>>> = (0..pending.len()).map(|_| None).collect();
    std::thread::scope(|s| {
        let one = &one;
        // A thread that cannot be had (a process at its limit) leaves its part to this one.
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                std::thread::Builder::new()
                    .name("tensorlift-plan".into())
                    .spawn_scoped(s, move || (t..pending.len()).step_by(threads).map(one).collect::<Vec<_>>())
                    .ok()
            })
            .collect();
        for (t, h) in handles.into_iter().enumerate() {
            let results = match h.map(|h| h.join()) {
                Some(Ok(results)) => results,
                // Not started, or a parser that panicked (a bug): those headers are parsed
                // here, where a panic that comes back is the caller's to see.
                _ => (t..pending.len()).step_by(threads).map(one).collect(),
            };
            for (k, r) in (t..pending.len()).step_by(threads).zip(results) {
                out[k] = r;
            }
        }
    });
    out
}

/// The error planning stops with when its observer is [cancelled](PlanObserver::cancelled).
fn cancelled(file: &Path) -> FormatError {
    FormatError::Io { file: file.to_path_buf(), source: crate::remote::runtime::planning_cancelled() }
}

/// A shard whose header has been read (and not yet parsed), under its first name.
pub(crate) struct Pending {
    pub(crate) name: String,
    /// Other names the index or the folder uses for the same file.
    pub(crate) aliases: Vec<String>,
    pub(crate) path: PathBuf,
    pub(crate) identity: FileIdentity,
    pub(crate) work: HeaderWork,
}

/// An opened regular file: its descriptor, identity and canonical path.
struct Opened {
    file: File,
    identity: FileIdentity,
    path: PathBuf,
}

struct Planner<'a> {
    limits: &'a PlanLimits,
    observer: &'a dyn PlanObserver,
    open_bound: usize,
    header_bytes: u64,
    /// Shards whose headers are read, in load order; their indices are the plan's.
    pending: Vec<Pending>,
    /// The descriptors kept for the load, by shard, and how many there are.
    files: Vec<Option<Arc<File>>>,
    kept: usize,
    by_identity: HashMap<(u64, u64), usize>,
    /// When planning began, in nanoseconds since the epoch.
    started_ns: i128,
}

impl<'a> Planner<'a> {
    fn new(limits: &'a PlanLimits, observer: &'a dyn PlanObserver) -> Self {
        Planner {
            limits,
            observer,
            open_bound: limits.open_files_bound(),
            header_bytes: 0,
            pending: Vec::new(),
            files: Vec::new(),
            kept: 0,
            by_identity: HashMap::new(),
            started_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i128),
        }
    }

    /// Opens `name` in the folder under `policy`; `None` if there is no such entry.
    ///
    /// The name is looked up once, as an `O_PATH` descriptor: that opens nothing for I/O (a
    /// device or FIFO is neither opened nor waited on). Where it leads is read from that
    /// descriptor (`/proc/self/fd`), not from a second look-up of the name, and checked
    /// against the policy before anything else is revealed about it; only then is the same
    /// file opened for reading, through the descriptor.
    fn open_entry(
        &self,
        dir: &File,
        root: &Path,
        policy: &LinkPolicy,
        name: &str,
        context: &Path,
    ) -> Result<Option<Opened>, FormatError> {
        let unreadable =
            |source| FormatError::ShardUnreadable { file: context.to_path_buf(), shard: name.to_owned(), source };
        let located = match locate(dir, name) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // A name that exists as a link leading nowhere is an error, not an absence.
                return match std::fs::symlink_metadata(root.join(name)) {
                    Ok(m) if m.file_type().is_symlink() => {
                        Err(unreadable(io::Error::new(io::ErrorKind::NotFound, "a link that leads nowhere")))
                    }
                    _ => Ok(None),
                };
            }
            Err(e) => return Err(unreadable(e)),
        };
        if !policy.allows(&located.path) {
            return Err(FormatError::ShardOutsideFolder {
                file: context.to_path_buf(),
                shard: name.to_owned(),
                reason: "a link resolves outside the folder",
            });
        }
        if !located.meta.is_file() {
            return Err(FormatError::NotARegularFile { file: root.join(name), kind: kind_name(&located.meta) });
        }
        let file = located.open_for_reading().map_err(unreadable)?;
        Ok(Some(Opened { file, identity: file_identity(&located.meta), path: located.path }))
    }

    /// A shard an index names, which must be there.
    fn open_shard(
        &self,
        dir: &File,
        root: &Path,
        policy: &LinkPolicy,
        name: &str,
        context: &Path,
    ) -> Result<Opened, FormatError> {
        self.open_entry(dir, root, policy, name, context)?.ok_or_else(|| FormatError::ShardUnreadable {
            file: context.to_path_buf(),
            shard: name.to_owned(),
            source: io::Error::from(io::ErrorKind::NotFound),
        })
    }

    fn plan_index(
        mut self,
        dir: File,
        root: PathBuf,
        index_name: &str,
        index: Opened,
        policy: &LinkPolicy,
    ) -> Result<Checkpoint, FormatError> {
        let context = root.join(index_name);
        let (parsed, identity) = read_index(&context, index)?;
        let names = index_shards(&context, &parsed, self.limits)?;
        let mut added = Vec::with_capacity(names.len());
        for batch in names.chunks(self.batch()) {
            let mut opened = Vec::with_capacity(batch.len());
            for (name, _) in batch {
                let o = self.open_shard(&dir, &root, policy, name, &context).map_err(|e| self.earlier_error(e))?;
                opened.push((context.clone(), name.clone(), o));
            }
            added.extend(self.add_shards(opened)?);
        }
        for ((name, raws), i) in names.into_iter().zip(added) {
            let shard = &mut self.pending[i];
            for raw in raws {
                if raw != shard.name && !shard.aliases.contains(&raw) {
                    shard.aliases.push(raw);
                }
            }
            if name != shard.name && !shard.aliases.contains(&name) {
                shard.aliases.push(name);
            }
        }
        self.finish(&context, dir, root, Some((parsed, identity)))
    }

    fn plan_scan(mut self, dir: File, root: PathBuf, policy: &LinkPolicy) -> Result<Checkpoint, FormatError> {
        let io_err = |source| FormatError::Io { file: root.clone(), source };
        let mut names = Vec::new();
        // Of PyTorch files, what is needed: the least name (for messages), and whether the
        // hub's two names are there (only they are ever opened). Not every name: a folder
        // of training output may hold millions.
        let (mut least_torch, mut torch_index, mut torch_single): (Option<String>, bool, bool) = (None, false, false);
        for entry in std::fs::read_dir(&root).map_err(io_err)? {
            let name = match entry.map_err(io_err)?.file_name().into_string() {
                Ok(name) => name,
                // Names that are not UTF-8 cannot be shard names: a shard named so is refused
                // (skipped, the checkpoint would load without it), other files are not ours.
                Err(name) if std::os::unix::ffi::OsStrExt::as_bytes(&*name).ends_with(b".safetensors") => {
                    return Err(FormatError::NameNotUtf8 { file: root.join(name) });
                }
                Err(_) => continue,
            };
            if name.ends_with(".safetensors") {
                names.push(name);
            } else if is_torch_entry(&name) {
                torch_index |= name == TORCH_INDEX;
                torch_single |= name == TORCH_SINGLE;
                if least_torch.as_ref().is_none_or(|l| name < *l) {
                    least_torch = Some(name);
                }
            }
            // Each .safetensors name is an open and a header read: a folder of millions is
            // refused as an index naming them would be. (Of PyTorch files only the hub's
            // names are ever opened.)
            if names.len() > self.limits.max_shards {
                return Err(FormatError::TooManyFiles {
                    file: root,
                    what: "the folder has more .safetensors files".into(),
                    limit: self.limits.max_shards,
                });
            }
        }
        names.sort_by(|a, b| natural_cmp(a, b));
        if names.is_empty() {
            let Some(first) = least_torch else { return Err(FormatError::NoShards { file: root }) };
            if safetensors_only() {
                return Err(FormatError::PyTorchCheckpoint { file: root.join(first), layout: SAFETENSORS_ONLY });
            }
            // The hub's names only: a folder also holds other pickles (training_args.bin)
            // that are not weights.
            if torch_index {
                let context = root.join(TORCH_INDEX);
                if let Some(opened) = self.open_entry(&dir, &root, policy, TORCH_INDEX, &context)? {
                    return self.plan_index(dir, root, TORCH_INDEX, opened, policy);
                }
            }
            if torch_single {
                names.push(TORCH_SINGLE.to_owned());
            } else {
                return Err(no_torch_weights(root.join(first)));
            }
        }
        let mut added = Vec::with_capacity(names.len());
        for batch in names.chunks(self.batch()) {
            let mut opened = Vec::with_capacity(batch.len());
            for name in batch {
                let context = root.join(name);
                // Listed a moment ago; gone now is an error, not a skip.
                let o = self
                    .open_entry(&dir, &root, policy, name, &context)
                    .and_then(|o| {
                        o.ok_or_else(|| FormatError::ShardUnreadable {
                            file: root.clone(),
                            shard: name.clone(),
                            source: io::Error::from(io::ErrorKind::NotFound),
                        })
                    })
                    .map_err(|e| self.earlier_error(e))?;
                opened.push((context, name.clone(), o));
            }
            added.extend(self.add_shards(opened)?);
        }
        for (name, i) in names.into_iter().zip(added) {
            if self.pending[i].name != name {
                self.pending[i].aliases.push(name);
            }
        }
        let context = root.clone();
        self.finish(&context, dir, root, None)
    }

    /// Reads a shard's header from its descriptor, or records `name` as another name of a
    /// file already read. Returns the shard's index.
    fn add_shard(&mut self, context: &Path, name: String, opened: Opened) -> Result<usize, FormatError> {
        Ok(self.add_shards(vec![(context.to_path_buf(), name, opened)])?[0])
    }

    /// [`add_shard`](Self::add_shard) for several files opened at once, (context, name,
    /// file) each: their headers are read one after another (the header budget is spent in
    /// order) and parsed later, all together ([`finish`](Self::finish)). Descriptors past
    /// the half of the bound that planning keeps are closed once their header is read.
    fn add_shards(&mut self, items: Vec<(PathBuf, String, Opened)>) -> Result<Vec<usize>, FormatError> {
        let earlier = self.pending.len();
        let mut slots = Vec::with_capacity(items.len());
        for (context, name, opened) in items {
            if self.observer.cancelled() {
                return Err(cancelled(&opened.path));
            }
            // A file already read is the same shard.
            let key = (opened.identity.dev, opened.identity.ino);
            if let Some(&i) = self.by_identity.get(&key) {
                slots.push(i);
                continue;
            }
            let work = match self.read_header(&context, &name, &opened) {
                Ok(w) => w,
                // The first error in the files' order: a header read in an earlier batch
                // that does not parse comes before this one.
                Err(e) => return Err(self.first_parse_error(earlier).unwrap_or(e)),
            };
            // Half the bound is held between planning and loading; the load's window of
            // shards open for reading (two descriptors each with O_DIRECT) takes the other half.
            let keep = self.kept < (self.open_bound / 2).max(1);
            self.kept += usize::from(keep);
            let i = self.pending.len();
            self.files.push(keep.then(|| Arc::new(opened.file)));
            self.by_identity.insert(key, i);
            self.pending.push(Pending {
                name,
                aliases: Vec::new(),
                path: opened.path,
                identity: opened.identity,
                work,
            });
            slots.push(i);
        }
        Ok(slots)
    }

    /// `e`, met opening a batch of shards, or the error of a header read in an earlier
    /// batch that does not parse, which comes first in the files' order.
    fn earlier_error(&self, e: FormatError) -> FormatError {
        self.first_parse_error(self.pending.len()).unwrap_or(e)
    }

    /// The first error among the first `n` headers read, parsed again (an error path only).
    fn first_parse_error(&self, n: usize) -> Option<FormatError> {
        self.pending[..n].iter().find_map(|p| match &p.work {
            HeaderWork::Parse(bytes) => parse(&p.path, p.identity.len, bytes).err(),
            HeaderWork::Done(..) => None,
        })
    }

    /// Shards opened at once for [`add_shards`](Self::add_shards): with the half of the
    /// bound that planning keeps open, within three quarters of it.
    fn batch(&self) -> usize {
        (self.open_bound / 4).max(1)
    }

    /// 8 bytes, then N, never the data; N is checked against the file's length and the
    /// plan's header budget before anything is allocated. A safetensors header is left to
    /// parse; a PyTorch file is read whole here.
    ///
    /// `name`: the shard's name as looked up (where links lead is `opened.path`: a hub
    /// cache's `model.safetensors` is a link to a blob of no such name).
    fn read_header(&mut self, context: &Path, name: &str, opened: &Opened) -> Result<HeaderWork, FormatError> {
        let path = &opened.path;
        let file_len = opened.identity.len;
        let prefix_len = HEADER_PREFIX_LEN.min(file_len) as usize;
        let prefix = read_exact_at(&opened.file, path, 0, prefix_len, "a header")?;
        let n = match header_len(path, &prefix, file_len) {
            Err(FormatError::PyTorchCheckpoint { file, .. }) => match torch_refused(Path::new(name)) {
                Some(layout) => return Err(FormatError::PyTorchCheckpoint { file, layout }),
                None => return self.read_torch(context, opened).map(|(h, hash)| HeaderWork::Done(h, hash)),
            },
            other => other?,
        };
        self.spend_header_budget(context, HEADER_PREFIX_LEN + n)?;
        header_fits(path, n)?;
        let bytes = read_exact_at(&opened.file, path, 0, (HEADER_PREFIX_LEN + n) as usize, "a header")?;
        Ok(HeaderWork::Parse(bytes))
    }

    /// Counts `bytes` of header against the plan's budget, or says it is spent.
    fn spend_header_budget(&mut self, context: &Path, bytes: u64) -> Result<(), FormatError> {
        spend_header_budget(&mut self.header_bytes, self.limits, context, bytes)
    }

    /// A PyTorch checkpoint, read whole ([`torch_header`]).
    fn read_torch(&mut self, context: &Path, opened: &Opened) -> Result<(Header, u64), FormatError> {
        torch_header(&opened.file, &opened.path, opened.identity.len, self.limits, &mut self.header_bytes, context)
    }

    /// Parses every header read (telling the observer, which first gets a plan of the
    /// shards alone), then builds the plan and checks it across shards. `context` is the
    /// file errors name (the index, for a sharded checkpoint).
    fn finish(
        self,
        context: &Path,
        dir: File,
        root: PathBuf,
        index: Option<(tensorlift_format::Index, FileIdentity)>,
    ) -> Result<Checkpoint, FormatError> {
        let dir = Arc::new(dir);
        let safetensors = self.pending.iter().all(|p| matches!(p.work, HeaderWork::Parse(_)));
        if safetensors && self.observer.wants_early_plan() {
            let shards = self
                .pending
                .iter()
                .map(|p| {
                    let header_len = match &p.work {
                        HeaderWork::Parse(bytes) => bytes.len() as u64 - HEADER_PREFIX_LEN,
                        HeaderWork::Done(h, _) => h.header_len,
                    };
                    let mut shard = Shard::unparsed(p.path.clone(), p.name.clone(), p.identity, header_len);
                    shard.aliases.clone_from(&p.aliases);
                    shard
                })
                .collect();
            let plan = LoadPlan::unparsed(root.clone(), index.is_some().then(|| context.to_path_buf()), shards);
            let (files, index_identity) = (self.files.clone(), index.as_ref().map(|i| i.1));
            let dir = Some(Arc::clone(&dir));
            self.observer.headers_read(Checkpoint {
                plan,
                dir,
                files,
                index_identity,
                remote: Vec::new(),
                remote_root: None,
                planned_ns: Some(self.started_ns),
                copy_of: None,
            });
        }
        let started_ns = self.started_ns;
        let (plan, index_identity) = assemble(context, root, index, self.pending, self.observer)?;
        // The folder is kept only to reopen shards closed to bound open files.
        let dir = self.files.iter().any(Option::is_none).then_some(dir);
        Ok(Checkpoint {
            plan,
            dir,
            files: self.files,
            index_identity,
            remote: Vec::new(),
            remote_root: None,
            planned_ns: Some(started_ns),
            copy_of: None,
        })
    }
}

/// Parses the headers read for `pending` (telling `observer` of each), then builds the plan
/// and checks it across shards and against the index; with the index's identity.
pub(crate) fn assemble(
    context: &Path,
    root: PathBuf,
    index: Option<(tensorlift_format::Index, FileIdentity)>,
    pending: Vec<Pending>,
    observer: &dyn PlanObserver,
) -> Result<(LoadPlan, Option<FileIdentity>), FormatError> {
    let parsed = parse_all(&pending, observer);
    let mut shards = Vec::with_capacity(pending.len());
    for (p, parsed) in pending.into_iter().zip(parsed) {
        let (header, header_hash) = match (p.work, parsed) {
            (HeaderWork::Done(header, hash), _) => (header, hash),
            (HeaderWork::Parse(_), Some(r)) => r?,
            (HeaderWork::Parse(bytes), None) => parse(&p.path, p.identity.len, &bytes)?,
        };
        let (mut shard, tensors) = Shard::from_header(p.path, p.name, p.identity, header_hash, header);
        shard.aliases = p.aliases;
        shards.push((shard, tensors));
    }
    let index_identity = index.as_ref().map(|i| i.1);
    let index = index.map(|(i, _)| (context.to_path_buf(), i));
    Ok((LoadPlan::assemble(context, root, index, shards)?, index_identity))
}

/// Adds `bytes` of header to `spent`, the header bytes a plan holds, or says the plan's
/// budget is spent (local and remote planning alike).
pub(crate) fn spend_header_budget(
    spent: &mut u64,
    limits: &PlanLimits,
    context: &Path,
    bytes: u64,
) -> Result<(), FormatError> {
    let needed = spent.saturating_add(bytes);
    if needed > limits.max_header_bytes {
        return Err(FormatError::HeaderBudget { file: context.to_path_buf(), needed, limit: limits.max_header_bytes });
    }
    *spent = needed;
    Ok(())
}

/// Whether parsing a header of `n` bytes of JSON can have its memory. Parsing makes small
/// allocations for every entry (names, shapes, the plan's copy), which cannot fail
/// gracefully one by one: their total is checked first.
pub(crate) fn header_fits(file: &Path, n: u64) -> Result<(), FormatError> {
    let bytes = n.saturating_mul(PARSE_BYTES_PER_HEADER_BYTE);
    if !crate::can_allocate(bytes) {
        return Err(FormatError::OutOfMemory { file: file.to_path_buf(), what: "parsing the header", bytes });
    }
    Ok(())
}

/// Whether an index of `len` bytes may be read and parsed: under the index size limit, and
/// its parsed form's memory to be had.
pub(crate) fn index_fits(context: &Path, len: u64) -> Result<(), FormatError> {
    if len > MAX_INDEX_LEN {
        return Err(FormatError::InvalidIndex {
            file: context.to_path_buf(),
            message: format!("{len} bytes is over the {MAX_INDEX_LEN}-byte limit for an index"),
        });
    }
    let bytes = len.saturating_mul(PARSE_BYTES_PER_INDEX_BYTE);
    if !crate::can_allocate(bytes) {
        return Err(FormatError::OutOfMemory { file: context.to_path_buf(), what: "parsing the index", bytes });
    }
    Ok(())
}

/// An index's bytes, bounded, parsed; with the file's identity as it was read.
fn read_index(context: &Path, index: Opened) -> Result<(tensorlift_format::Index, FileIdentity), FormatError> {
    let len = index.identity.len;
    index_fits(context, len)?;
    let bytes = read_exact_at(&index.file, context, 0, len as usize, "the index")?;
    let identity = index.identity;
    drop(index);
    Ok((parse_index(context, &bytes)?, identity))
}

/// The files of a PyTorch checkpoint, opened under the rules a plan's shards are.
#[derive(Debug)]
pub struct PyTorchFiles {
    /// Each file once (under its first name), in natural name order: its name relative to
    /// the folder, its path, and the descriptor to read.
    pub files: Vec<(String, PathBuf, File)>,
    /// The index's map of tensor name to file name (names normalized), when the folder
    /// has `pytorch_model.bin.index.json`.
    pub weight_map: Option<std::collections::BTreeMap<String, String>>,
}

/// Whether the regular file at `path` is read as a PyTorch checkpoint, as a plan tells it:
/// by its first bytes (a zip archive's or a pickle's, not a safetensors header), whatever
/// its name, but for a file named `.safetensors`, which is read as nothing else, and never
/// with `TENSORLIFT_USE_SAFETENSORS=1`. `false` for anything that cannot be opened and read
/// (a plan of it says why), and for what is not a regular file (never opened: a FIFO would
/// block).
pub fn is_pytorch_file(path: &Path) -> bool {
    if !path.is_file() || torch_refused(path).is_some() {
        return false;
    }
    let Ok(file) = File::open(path) else { return false };
    let len = file.metadata().map_or(0, |m| m.len());
    let mut prefix = vec![0u8; HEADER_PREFIX_LEN.min(len) as usize];
    if std::io::Read::read_exact(&mut &file, &mut prefix).is_err() {
        return false;
    }
    matches!(header_len(path, &prefix, len), Err(FormatError::PyTorchCheckpoint { .. }))
}

/// Opens the PyTorch files of `path` for a tool that reads them itself (`tensorlift
/// inspect` and `convert`, which also take tensors no plan can hold, strided views): a
/// file named directly, or a folder's `pytorch_model.bin.index.json` shards, or its
/// `pytorch_model.bin`. The rules are a plan's: links stay inside the folder, regular files
/// only (opened without blocking), one file under several names is opened once, and the
/// index is bounded.
pub fn open_pytorch(path: &Path, limits: &PlanLimits) -> Result<PyTorchFiles, FormatError> {
    let io_err = |source| FormatError::Io { file: path.to_path_buf(), source };
    let meta = std::fs::metadata(path).map_err(io_err)?;
    let planner = Planner::new(limits, &Quiet);
    let mut out = PyTorchFiles { files: Vec::new(), weight_map: None };
    // One file under several names (hard links, links) is opened once, under its first
    // name, which `add` returns, so that the index's names can be mapped to it.
    let mut seen: HashMap<(u64, u64), String> = HashMap::new();
    let mut add = |name: String, o: Opened| -> String {
        let first = seen.entry((o.identity.dev, o.identity.ino)).or_insert_with(|| name.clone()).clone();
        if first == name {
            out.files.push((name, o.path, o.file));
        }
        first
    };
    if meta.is_dir() {
        let root = std::fs::canonicalize(path).map_err(io_err)?;
        let dir = open_dir(&root).map_err(io_err)?;
        let policy = LinkPolicy::for_root(&root);
        let context = root.join(TORCH_INDEX);
        if let Some(index) = planner.open_entry(&dir, &root, &policy, TORCH_INDEX, &context)? {
            let (parsed, _) = read_index(&context, index)?;
            // Each spelling the index uses, to the name its file is kept under.
            let mut spelled: HashMap<String, String> = HashMap::new();
            for (name, raws) in index_shards(&context, &parsed, limits)? {
                let opened = planner.open_shard(&dir, &root, &policy, &name, &context)?;
                let kept = add(name, opened);
                for raw in raws {
                    spelled.insert(raw, kept.clone());
                }
            }
            let map = parsed
                .entries()
                .map(|(tensor, raw)| {
                    let file = spelled.get(raw).cloned().unwrap_or_else(|| raw.to_owned());
                    (tensor.to_owned(), file)
                })
                .collect();
            out.weight_map = Some(map);
        } else if let Some(o) = planner.open_entry(&dir, &root, &policy, TORCH_SINGLE, &root.join(TORCH_SINGLE))? {
            add(TORCH_SINGLE.to_owned(), o);
        } else {
            return Err(FormatError::PyTorch {
                file: root,
                message: format!("no {TORCH_SINGLE} and no {TORCH_INDEX}"),
            });
        }
    } else if !meta.is_file() {
        return Err(FormatError::NotARegularFile { file: path.to_path_buf(), kind: kind_name(&meta) });
    } else {
        let (name, root, dir) = named_file(path)?;
        let context = root.join(&name);
        // A file named directly is read wherever its links lead, as for a plan.
        let o = planner
            .open_entry(&dir, &root, &LinkPolicy::Anywhere, &name, &context)?
            .ok_or_else(|| io_err(io::Error::from(io::ErrorKind::NotFound)))?;
        add(name, o);
    }
    Ok(out)
}

/// A PyTorch checkpoint (`torch.save`) of `len` bytes in `src` (a local file, a remote
/// object), read by tensorlift-pickle without executing anything: a header whose tensors
/// are the state_dict's, each a byte range of its storage in the file, and whose "header
/// bytes" are everything before the first tensor (the zip's directory entries and the
/// pickle), hashed like a safetensors header so that a load notices a changed file. The
/// pickle may take what is left of the plan's header budget (`spent` so far), and the
/// header bytes (or the pickle's, if more: a zip may store it after the data) are spent
/// against it.
pub(crate) fn torch_header<R: tensorlift_pickle::ReadAt + ?Sized>(
    src: &R,
    path: &Path,
    len: u64,
    limits: &PlanLimits,
    spent: &mut u64,
    context: &Path,
) -> Result<(Header, u64), FormatError> {
    let pytorch = |message: String| FormatError::PyTorch { file: path.to_path_buf(), message };
    let left = limits.max_header_bytes.saturating_sub(*spent);
    let pickle_limits = tensorlift_pickle::Limits::default().max_pickle_bytes(left);
    let ck = tensorlift_pickle::TorchCheckpoint::read(src, path, &pickle_limits)
        .map_err(|e| pytorch(format!("read as a PyTorch checkpoint (nothing in it was executed): {}", e.kind)))?;
    tracing::info!(
        "{}: a PyTorch checkpoint ({:?} layout), read by tensorlift's pickle reader, which executes nothing",
        path.display(),
        ck.layout
    );
    let pickle_bytes = ck.pickle_bytes;
    // No tensor, only other values: most likely a state_dict nested under a key (Lightning's
    // `{"state_dict": ...}`, `{"model": ...}`), which would load as an empty model.
    if ck.tensors.is_empty() && !ck.skipped.is_empty() {
        let mut names: Vec<&str> = ck.skipped.iter().take(5).map(String::as_str).collect();
        if ck.skipped.len() > names.len() {
            names.push("...");
        }
        return Err(pytorch(format!(
            "no tensors at its top, only other values ({}): a state_dict nested under a key is not read; save \
             the state_dict itself",
            names.join(", ")
        )));
    }
    // The tensors, moved out of the checkpoint, at absolute file offsets first.
    let mut tensors = Vec::new();
    tensors.try_reserve_exact(ck.tensors.len()).map_err(|_| FormatError::OutOfMemory {
        file: path.to_path_buf(),
        what: "the PyTorch checkpoint's tensors",
        bytes: ck.tensors.len() as u64 * 64,
    })?;
    for t in ck.tensors {
        if !t.is_contiguous() {
            return Err(pytorch(format!(
                "tensor '{}' is a strided view of its storage and cannot be loaded as one byte range; \
                 `tensorlift convert` writes it contiguous, as safetensors",
                t.name
            )));
        }
        let st = ck.storages.get(&t.storage).ok_or_else(|| pytorch(format!("storage '{}' is missing", t.storage)))?;
        let start = (t.storage_offset as u64)
            .checked_mul((t.dtype.bitsize() / 8) as u64)
            .and_then(|b| b.checked_add(st.offset))
            .ok_or_else(|| pytorch(format!("tensor '{}': its offset overflows", t.name)))?;
        let len = t.nbytes() as u64;
        tensors.push(TensorInfo { name: t.name, dtype: t.dtype, shape: t.shape, data_offsets: (start, start + len) });
    }
    tensors.sort_by_key(|t| t.data_offsets.0);
    let data_start = tensors.first().map_or(HEADER_PREFIX_LEN, |t| t.data_offsets.0).max(HEADER_PREFIX_LEN).min(len);
    // What planning holds came from the pickle, which a zip may store after the data: the
    // budget is charged for it, not only for the bytes before the first tensor.
    spend_header_budget(spent, limits, context, data_start.max(pickle_bytes))?;
    // Then relative to where the "header" ends, as a safetensors header's are.
    for t in &mut tensors {
        let (start, end) = t.data_offsets;
        let begin = start
            .checked_sub(data_start)
            .ok_or_else(|| pytorch(format!("tensor '{}' starts at byte {start}", t.name)))?;
        t.data_offsets = (begin, end - data_start);
    }
    let mut bytes = Vec::new();
    let n = data_start as usize;
    bytes.try_reserve_exact(n).map_err(|_| FormatError::OutOfMemory {
        file: path.to_path_buf(),
        what: "the PyTorch checkpoint's header",
        bytes: data_start,
    })?;
    bytes.resize(n, 0);
    src.read_exact_at(&mut bytes, 0).map_err(|source| FormatError::Io { file: path.to_path_buf(), source })?;
    let header = Header { header_len: data_start - HEADER_PREFIX_LEN, metadata: None, tensors };
    Ok((header, tensorlift_format::header_hash(&bytes)))
}

/// `len` bytes at `offset`, into memory allocated fallibly.
fn read_exact_at(
    file: &File,
    path: &Path,
    offset: u64,
    len: usize,
    what: &'static str,
) -> Result<Vec<u8>, FormatError> {
    let mut buf = Vec::new();
    buf.try_reserve_exact(len).map_err(|_| FormatError::OutOfMemory {
        file: path.to_path_buf(),
        what,
        bytes: len as u64,
    })?;
    buf.resize(len, 0);
    file.read_exact_at(&mut buf, offset).map_err(|source| FormatError::Io { file: path.to_path_buf(), source })?;
    Ok(buf)
}

fn open_dir(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
}

/// A name looked up in a folder, not yet opened for reading.
struct Located {
    /// An `O_PATH` descriptor: it pins the file without opening it for I/O.
    fd: File,
    meta: std::fs::Metadata,
    /// Where the name led, links resolved, read from the descriptor itself.
    path: PathBuf,
}

/// Looks `name` up relative to `dir` (following links) as an `O_PATH` descriptor.
fn locate(dir: &File, name: &str) -> io::Result<Located> {
    let c = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: dir is an open descriptor and c a NUL-terminated name; openat returns a new
    // descriptor or -1.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by openat and nothing else owns it.
    let fd = unsafe { File::from_raw_fd(fd) };
    let meta = fd.metadata()?;
    // The descriptor's own path: what the look-up led to, links resolved, with no second
    // look-up that a swap could redirect. (Linux always has it where /proc is mounted.)
    let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|e| {
        io::Error::new(e.kind(), format!("cannot tell where the name leads without /proc/self/fd: {e}"))
    })?;
    if !path.is_absolute() {
        return Err(io::Error::other("it was removed while being opened"));
    }
    Ok(Located { fd, meta, path })
}

impl Located {
    /// The same file opened for reading, through its descriptor (no look-up of any name),
    /// checked to be the same inode.
    fn open_for_reading(&self) -> io::Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))?;
        let m = f.metadata()?;
        if (m.dev(), m.ino()) != (self.meta.dev(), self.meta.ino()) || !m.is_file() {
            return Err(io::Error::other("it was replaced while being opened"));
        }
        Ok(f)
    }
}

/// How `now` differs from the planned identity `was`, in words; `None` when it does not.
pub fn identity_change(was: &FileIdentity, now: &FileIdentity) -> Option<String> {
    if let Some(what) = content_change(was, now) {
        return Some(what);
    }
    if now.changed_ns != was.changed_ns {
        return Some("it was changed after planning (its status change time moved)".into());
    }
    None
}

/// [`identity_change`] but for the status change time: how `now` is another file, or one
/// whose length or modification time moved. A status change alone may be no write (a
/// `chmod`, a hard link, a rename, an unlink of a file still open), or a write whose
/// modification time was set back: only the file's bytes can tell.
pub fn content_change(was: &FileIdentity, now: &FileIdentity) -> Option<String> {
    if (now.dev, now.ino) != (was.dev, was.ino) {
        return Some("another file has taken its name".into());
    }
    if now.len != was.len {
        return Some(format!("length is {} bytes, planned {}", now.len, was.len));
    }
    if now.modified_ns != was.modified_ns {
        return Some("it was modified after planning".into());
    }
    None
}
