//! A local copy of remote checkpoints ([`RemoteOptions::cache_dir`](super::RemoteOptions)),
//! written as a load reads them, so that the next load of the same objects is local.
//!
//! An object is kept as `CACHE/KEY/PATH`: `KEY` names its store (scheme, host and a hash of
//! what else tells stores apart: port, endpoint, account), `PATH` is its location in the
//! store, part by part as `object_store` spells it (never `.`, `..` or a separator). Beside
//! it, `PATH.tlcache` notes what it is a copy of (URL, length, ETag, modification time) and
//! which file the copy is (device, inode). Bytes land in a temporary file of this copy's own
//! (created exclusively at the first write, never through a link, readable by the owner
//! only, and open only through a burst of writes to it, so that a plan of many shards holds no descriptor for
//! their copies) as the load's GETs bring them, written by a writer thread so that a slow
//! disk never holds a request;
//! once every byte is there it is synced, any old note is removed, it takes its name, and
//! then the note is written and synced. A copy is used only when its note matches what the
//! store says of the object now, and the file planned is the file noted. A load that reads
//! part of a shard keeps no copy of it. Failing to write the cache never fails a load: the
//! copy is dropped, and logged.

use std::fs::File;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use object_store::path::Path as ObjectPath;
use object_store::ObjectMeta;

/// Suffix of the note beside a cached copy.
const NOTE: &str = ".tlcache";
/// Infix of a copy being written.
const PARTIAL: &str = ".partial-";
/// Bytes queued for the writer at most; past it a copy is dropped rather than wait.
const MAX_QUEUED: u64 = 256 << 20;
/// A note is a few lines.
const MAX_NOTE: u64 = 64 << 10;

/// The folder of one store's copies under `root`: `SCHEME-HOST-HASH`, where the hash covers
/// the scheme, host, port, the part of the URL's path the store takes for itself rather
/// than for the object (`path`, the object's path, is the rest: a path-style URL's bucket,
/// `https://s3.REGION.amazonaws.com/BUCKET/...`, or container) and the environment that
/// points the same scheme and host at another store (an S3 endpoint, an Azure account).
pub(crate) fn store_key(url: &url::Url, path: &ObjectPath) -> String {
    // (The user part is an `abfss://` URL's container: the one place a URL names one. Where
    // there is none, the identity is what it was before containers counted, so that copies
    // already made keep their folder.)
    let user = if url.username().is_empty() { String::new() } else { format!("{}@", url.username()) };
    let mut identity = format!("{}://{user}{}:{:?}", url.scheme(), url.host_str().unwrap_or(""), url.port());
    // (Added only where there is such a part, so that other URLs' copies keep their folder.)
    let segments: Vec<&str> = url.path_segments().map(|s| s.filter(|p| !p.is_empty()).collect()).unwrap_or_default();
    // The object's parts are the URL's last segments, decoded: a segment holding an encoded
    // `/` is as many parts as it has pieces, so the store's own part is found by counting
    // the object's parts off the end, not by comparing the numbers of each.
    let mut parts = path.parts().count();
    let mut own = segments.len();
    while own > 0 && parts > 0 {
        let pieces = 1 + segments[own - 1].to_ascii_lowercase().matches("%2f").count();
        parts = parts.saturating_sub(pieces);
        own -= 1;
    }
    if own > 0 {
        identity += &format!("\n/{}", segments[..own].join("/"));
    }
    // Every variable of the providers that can point a URL at another store: endpoints,
    // accounts, emulators, and the service-account keys that carry a base URL.
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())))
        .filter(|(k, _)| {
            (k.starts_with("AWS_") && k.contains("ENDPOINT"))
                || (k.starts_with("AZURE_")
                    && (k.contains("ENDPOINT") || k.contains("ACCOUNT") || k.contains("EMULATOR")))
                || k.starts_with("AZURITE_")
                || k.starts_with("GOOGLE_SERVICE_ACCOUNT")
                || k == "GOOGLE_BASE_URL"
        })
        .collect();
    vars.sort();
    for (k, v) in vars {
        // A secret names no store: only a key's base URL, if it has one, does.
        let secret = ["KEY", "SECRET", "TOKEN", "SAS", "PASSWORD"].iter().any(|s| k.contains(s));
        let v = if secret { base_url_in(&v).unwrap_or_default() } else { v };
        identity += &format!("\n{k}={v}");
    }
    let host: String = url
        .host_str()
        .unwrap_or("")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' })
        .take(64)
        .collect();
    format!("{}-{host}-{:016x}", url.scheme(), tensorlift_format::header_hash(identity.as_bytes()))
}

/// The `gcs_base_url` a service-account key's JSON names (as for fake-gcs-server), if any.
fn base_url_in(key: &str) -> Option<String> {
    let after = &key[key.find("\"gcs_base_url\"")? + 14..];
    let start = after.find('"')? + 1;
    let len = after[start..].find('"')?;
    Some(after[start..start + len].to_owned())
}

/// Where the copy of the object at `location` of the store `key` is kept under `root`;
/// `None` for a location whose parts could be taken for this module's own files.
pub(crate) fn local_path(root: &Path, key: &str, location: &ObjectPath) -> Option<PathBuf> {
    let mut out = root.join(key);
    let mut any = false;
    for part in location.parts() {
        let part = part.as_ref();
        if part.is_empty()
            || part == "."
            || part == ".."
            || part.contains('/')
            || part.ends_with(NOTE)
            || part.contains(PARTIAL)
        {
            return None;
        }
        out.push(part);
        any = true;
    }
    any.then_some(out)
}

/// What a copy is a copy of, and which file it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Note {
    pub(crate) url: String,
    pub(crate) size: u64,
    pub(crate) e_tag: Option<String>,
    pub(crate) modified_ns: i128,
    /// Device and inode of the copy (0 until it is made).
    pub(crate) file: (u64, u64),
}

impl Note {
    pub(crate) fn of(url: &str, meta: &ObjectMeta) -> Note {
        let (size, e_tag) = (meta.size, meta.e_tag.clone());
        Note { url: url.to_owned(), size, e_tag, modified_ns: super::meta::modified_ns(meta), file: (0, 0) }
    }

    fn text(&self) -> String {
        format!(
            "url {}\nsize {}\netag {}\nmodified_ns {}\nfile {} {}\n",
            self.url,
            self.size,
            self.e_tag.as_deref().unwrap_or("-"),
            self.modified_ns,
            self.file.0,
            self.file.1
        )
    }

    fn parse(text: &str) -> Option<Note> {
        let mut lines = text.lines().map(|l| l.split_once(' '));
        let mut field = |key: &str| match lines.next()? {
            Some((k, v)) if k == key => Some(v.to_owned()),
            _ => None,
        };
        let url = field("url")?;
        let size = field("size")?.parse().ok()?;
        let e_tag = field("etag").filter(|t| t != "-");
        let modified_ns = field("modified_ns")?.parse().ok()?;
        let file = field("file")?;
        let (dev, ino) = file.split_once(' ')?;
        Some(Note { url, size, e_tag, modified_ns, file: (dev.parse().ok()?, ino.parse().ok()?) })
    }

    /// Whether a copy noted as `self` is a copy of the object as `now` describes it: the same
    /// URL and length, and the same strong ETag. Without one, nothing tells: an object
    /// replaced by one of its length with its time kept (`cp -p`, `rsync -t`, or within the
    /// second HTTP dates count) would be served from its old copy for as long as the copy
    /// lasts, so such objects are not kept ([`CacheFile::create`]).
    pub(crate) fn matches(&self, now: &Note) -> bool {
        self.url == now.url && self.size == now.size && strong(&self.e_tag) && self.e_tag == now.e_tag
    }
}

/// Whether `e_tag` is a strong ETag (one that changes with the bytes).
fn strong(e_tag: &Option<String>) -> bool {
    e_tag.as_deref().is_some_and(|t| !t.is_empty() && !t.starts_with("W/"))
}

/// How long a temporary copy may go unwritten before it may be taken for one a process left
/// behind (killed while writing it): past the moment between its making and its lock.
const ABANDONED: Duration = Duration::from_secs(3600);

/// Removes, once per folder a process copies into, the temporary copies there that have not
/// been written for [`ABANDONED`] and that no write holds (each holds a shared lock on its
/// file while it writes): left by a process killed while writing them. Nothing else would
/// remove them, and each may be a whole shard. (A live copy idle that long, of a plan kept
/// for an hour between reads, is given up by its own process when it next writes or
/// finishes it and finds it gone.) Best effort: what cannot be read, locked or removed
/// stays.
fn sweep_abandoned(folder: &Path) {
    static SWEPT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    match SWEPT.lock() {
        Ok(mut swept) if !swept.iter().any(|f| f == folder) => swept.push(folder.to_path_buf()),
        _ => return,
    }
    let Ok(entries) = std::fs::read_dir(folder) else { return };
    for entry in entries.flatten() {
        use std::os::unix::ffi::OsStrExt;
        let name = entry.file_name();
        let name = name.as_bytes();
        if !name.windows(PARTIAL.len()).any(|w| w == PARTIAL.as_bytes()) {
            continue;
        }
        // (Not followed, not waited on: a regular file, idle long enough, no one's.)
        let Ok(f) = File::options().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(entry.path())
        else {
            continue;
        };
        let idle = f.metadata().ok().filter(std::fs::Metadata::is_file).and_then(|m| m.modified().ok());
        if idle.and_then(|t| t.elapsed().ok()).is_some_and(|e| e > ABANDONED) && crate::try_lock(&f, true) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn note_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(NOTE);
    PathBuf::from(p)
}

/// The copy at `path`, if its note says it is a whole copy of the object `now` describes and
/// `path` is the very file noted (a regular file, not a link): its device and inode, which
/// the plan made from it must have.
pub(crate) fn usable(path: &Path, now: &Note) -> Option<(u64, u64)> {
    let mut text = String::new();
    let note = File::options().read(true).custom_flags(libc::O_NOFOLLOW).open(note_path(path)).ok()?;
    if !written_by_me(&note.metadata().ok()?) {
        return None;
    }
    note.take(MAX_NOTE).read_to_string(&mut text).ok()?;
    let noted = Note::parse(&text)?;
    let meta = std::fs::symlink_metadata(path).ok()?;
    let here = (meta.dev(), meta.ino());
    (noted.matches(now) && meta.is_file() && written_by_me(&meta) && meta.len() == now.size && noted.file == here)
        .then_some(here)
}

/// The effective user of this process.
fn my_uid() -> u32 {
    // SAFETY: geteuid takes nothing, cannot fail, and only returns a number.
    unsafe { libc::geteuid() }
}

/// Whether a note or copy is this user's, and no one else may write it: one another user
/// made (who swapped the cache folder between its check and its use, through a folder above
/// it that they may write to) is never read.
fn written_by_me(meta: &std::fs::Metadata) -> bool {
    my_uid() == meta.uid() && meta.mode() & 0o022 == 0
}

/// Reads the copy at `path` whole, at most `max` bytes (an index, `usable` first).
pub(crate) fn read_small(path: &Path, file: (u64, u64), max: u64) -> Option<Vec<u8>> {
    let f = File::options().read(true).custom_flags(libc::O_NOFOLLOW).open(path).ok()?;
    let meta = f.metadata().ok()?;
    if (meta.dev(), meta.ino()) != file || !written_by_me(&meta) || meta.len() > max {
        return None;
    }
    let mut out = Vec::new();
    out.try_reserve_exact(meta.len() as usize).ok()?;
    f.take(max).read_to_end(&mut out).ok()?;
    Some(out)
}

/// Checks the cache folder: made (for the owner only) if missing; refused when another user
/// owns it or others may write to it (they could swap a copy).
fn check_root(root: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(root)?;
    trusted(root)
}

/// Whether copies under `root` may be read: it is a folder this process's user owns, and
/// no one else may write to it or move it. So, as OpenSSH checks a key's folder:
/// - every link on the way to it was made by this user or root (a link another user planted,
///   in a folder anyone may write to such as `/tmp`, would send copies where they choose);
/// - every folder above it is this user's or root's, and not writable by every user
///   unless it is sticky, as `/tmp` is (then they may not move what is ours). A folder its
///   group may write to is allowed (a Kubernetes volume's `fsGroup`, a team's folder): a
///   copy's note names the file it was written to, and a note or copy is read only where
///   it is this user's and no one else may write it, so neither a copy nor a whole folder
///   swapped in later is read.
pub(crate) fn trusted(root: &Path) -> io::Result<()> {
    let refuse = |what: String| Err(io::Error::new(io::ErrorKind::PermissionDenied, what));
    let meta = std::fs::metadata(root)?;
    let me = my_uid();
    if meta.uid() != me || meta.mode() & 0o022 != 0 {
        return refuse("the cache folder belongs to another user or others may write to it".to_owned());
    }
    let ours = |m: &std::fs::Metadata| m.uid() == me || m.uid() == 0;
    let named = std::env::current_dir().map(|d| d.join(root)).unwrap_or_else(|_| root.to_path_buf());
    for at in named.ancestors() {
        let m = std::fs::symlink_metadata(at)?;
        if m.file_type().is_symlink() && !ours(&m) {
            return refuse(format!("{} is a link another user made", at.display()));
        }
    }
    let real = std::fs::canonicalize(root)?;
    for at in real.ancestors().skip(1) {
        let m = std::fs::metadata(at)?;
        let (anyone_writes, sticky) = (m.mode() & 0o002 != 0, m.mode() & 0o1000 != 0);
        if !ours(&m) || (anyone_writes && !sticky) {
            return refuse(format!(
                "{} (above the cache folder) belongs to another user or others may write to it",
                at.display()
            ));
        }
    }
    Ok(())
}

/// Writes a whole object's bytes as its copy at once (an index, read whole by planning).
pub(crate) fn put(root: &Path, path: PathBuf, note: Note, bytes: &[u8]) {
    if let Some(copy) = CacheFile::create(root, path, note) {
        copy.write_now(0, bytes);
    }
}

/// A copy being written: bytes as they land, at their offsets; whole once they cover the
/// object. Dropped before that, it removes its temporary file.
#[derive(Debug)]
pub(crate) struct CacheFile {
    path: PathBuf,
    partial: PathBuf,
    note: Note,
    /// The device and inode of the folder it is made in, as checked when it was planned
    /// (made through no link): the temporary file, made later, is made only in that folder.
    folder: (u64, u64),
    state: Mutex<Option<Writing>>,
    /// Set (under `state`'s lock) while the whole copy is being synced and named, with no
    /// lock held: `state` is `None` by then, and `settle` waits for this to clear.
    finishing: std::sync::atomic::AtomicBool,
    /// Signalled as writes land, and when the copy is whole or given up.
    landed: Condvar,
    /// The process writing it: a forked child that drops it leaves the parent's copy be.
    made: crate::process::MadeIn,
}

#[derive(Debug)]
struct Writing {
    /// The device and inode of the temporary file, made at the first write. It is opened
    /// by the writer for a burst of writes and closed after (a plan of thousands of shards holds no descriptor
    /// for their copies), and written without the lock held, so that a slow disk never
    /// holds the network's threads, which queue bytes under the lock.
    file: Option<(u64, u64)>,
    /// Byte ranges written, sorted and merged.
    written: Vec<Range<u64>>,
    /// Byte ranges queued for the writer (written ones included).
    queued: Vec<Range<u64>>,
}

impl CacheFile {
    /// Starts the copy at `path` (under `root`) of the object `note` describes; `None`
    /// (logged) where it cannot be made.
    pub(crate) fn create(root: &Path, path: PathBuf, note: Note) -> Option<CacheFile> {
        static MADE: AtomicU64 = AtomicU64::new(0);
        if !strong(&note.e_tag) {
            tracing::debug!(
                "{}: not cached: the store gives no strong ETag, by which a later load could tell the copy \
                 is still the object",
                path.display()
            );
            return None;
        }
        let mut partial = path.as_os_str().to_owned();
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        partial.push(format!("{PARTIAL}{}-{}-{stamp:x}", std::process::id(), MADE.fetch_add(1, Ordering::Relaxed)));
        let partial = PathBuf::from(partial);
        let made = (|| -> io::Result<(u64, u64)> {
            check_root(root)?;
            let parent = path.parent().ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            let rel = parent.strip_prefix(root).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // Folder by folder from the cache folder, none of them a link (nothing is made
            // through one): the copy lands where it is named.
            let mut at = root.to_path_buf();
            for part in rel.components() {
                at.push(part);
                match std::fs::symlink_metadata(&at) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => return Err(io::Error::new(io::ErrorKind::InvalidInput, "a link inside the cache folder")),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        std::fs::DirBuilder::new().mode(0o700).create(&at)?;
                    }
                    Err(e) => return Err(e),
                }
            }
            sweep_abandoned(parent);
            let m = std::fs::symlink_metadata(parent)?;
            Ok((m.dev(), m.ino()))
        })();
        match made {
            Ok(folder) => {
                let w = Writing { file: None, written: Vec::new(), queued: Vec::new() };
                Some(CacheFile {
                    path,
                    partial,
                    note,
                    folder,
                    state: Mutex::new(Some(w)),
                    finishing: std::sync::atomic::AtomicBool::new(false),
                    landed: Condvar::new(),
                    made: crate::process::MadeIn::here(),
                })
            }
            Err(e) => {
                tracing::warn!("{}: not cached: {e}", path.display());
                None
            }
        }
    }

    /// Makes the temporary file, exclusively, never through a link, readable by the owner
    /// only, of the object's length; returns its device and inode.
    fn make_partial(&self) -> io::Result<(u64, u64)> {
        let parent = self.partial.parent().ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let m = std::fs::symlink_metadata(parent)?;
        if !m.is_dir() || (m.dev(), m.ino()) != self.folder {
            return Err(io::Error::other("its folder was replaced since it was planned"));
        }
        let file = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.partial)?;
        // (Made: removed if it cannot be sized.)
        match file.set_len(self.note.size).and_then(|()| file.metadata()) {
            Ok(m) => Ok((m.dev(), m.ino())),
            Err(e) => {
                let _ = std::fs::remove_file(&self.partial);
                Err(e)
            }
        }
    }

    /// The temporary file made as `id`, opened again (never through a link) and locked
    /// (shared) while it is open, so that no sweep takes it meanwhile: an error where it is
    /// gone or another file has its name (a sweep took it for abandoned), or it cannot be
    /// locked (as on some network file systems, where copies are not made: a sweep there
    /// could take a live one).
    fn open_partial(&self, id: (u64, u64)) -> io::Result<File> {
        let file = File::options().write(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(&self.partial)?;
        if !crate::try_lock(&file, false) {
            return Err(io::Error::other("its temporary file cannot be locked"));
        }
        let m = file.metadata()?;
        if (m.dev(), m.ino()) != id {
            return Err(io::Error::other("its temporary file was replaced"));
        }
        Ok(file)
    }

    /// Queues `bytes` for the writer thread, to land at `offset` of the copy; the copy is
    /// dropped when the writer is too far behind.
    pub(crate) fn write(self: &Arc<Self>, offset: u64, bytes: bytes::Bytes) {
        let end = offset.saturating_add(bytes.len() as u64).min(self.note.size);
        match self.state.lock() {
            Ok(mut state) => match state.as_mut() {
                Some(w) if end > offset => add(&mut w.queued, offset..end),
                _ => return,
            },
            Err(_) => return,
        }
        if !writer::queue(Arc::clone(self), offset, bytes) {
            self.drop_copy("the disk falls behind the network", true);
        }
    }

    /// Waits (at most `limit`) for the copy to be whole, when every byte of it has been
    /// queued; gives it up otherwise (a load that read part of the object). Called as the
    /// load lets go of the object, so that a copy is whole when the load is done.
    pub(crate) fn settle(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let Ok(mut state) = self.state.lock() else { return };
        loop {
            let Some(w) = state.as_ref() else {
                // Whole, and being synced and named: waited for as for the last writes.
                if self.finishing.load(Ordering::Acquire) {
                    if let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|l| !l.is_zero()) {
                        state = match self.landed.wait_timeout(state, left) {
                            Ok((s, _)) => s,
                            Err(_) => return,
                        };
                        continue;
                    }
                }
                return;
            };
            let why = if w.queued.first() != Some(&(0..self.note.size)) {
                "the load read part of it"
            } else {
                match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => {
                        state = match self.landed.wait_timeout(state, left) {
                            Ok((s, _)) => s,
                            Err(_) => return,
                        };
                        continue;
                    }
                    _ => "the disk is too slow",
                }
            };
            drop(state);
            return self.drop_copy(why, why != "the load read part of it");
        }
    }

    /// Writes `bytes` at `offset` of the copy now; the copy is made whole (synced, renamed,
    /// its note written) once its bytes cover the object.
    pub(crate) fn write_now(&self, offset: u64, bytes: &[u8]) {
        self.write_with(offset, bytes, &mut None);
    }

    /// [`write_now`](Self::write_now) through `held`: this copy's temporary file, opened by
    /// an earlier write and kept open by the writer while writes of this copy follow (one
    /// open, lock and close for a run of writes rather than for each), or `None`.
    fn write_with(&self, offset: u64, bytes: &[u8], held: &mut Option<File>) {
        let end = offset.saturating_add(bytes.len() as u64).min(self.note.size);
        let keep = end.saturating_sub(offset) as usize;
        if keep == 0 {
            return;
        }
        // The file, taken under the lock and written without it: the network's threads
        // queue bytes under this lock, and a disk may stall.
        let made = match self.state.lock() {
            Ok(state) => match state.as_ref() {
                Some(w) => w.file,
                None => return,
            },
            Err(_) => return,
        };
        // The first write makes the file (only one thread writes a copy: the writer, or
        // planning's whole write of an index).
        let id = match made {
            Some(id) => id,
            None => match self.make_partial() {
                Ok(id) => {
                    let Ok(mut state) = self.state.lock() else { return };
                    match state.as_mut() {
                        Some(w) => w.file = Some(id),
                        // Given up meanwhile: the file just made goes too.
                        None => {
                            let _ = std::fs::remove_file(&self.partial);
                            return;
                        }
                    }
                    id
                }
                Err(e) => return self.drop_copy(&e.to_string(), true),
            },
        };
        if held.is_none() {
            match self.open_partial(id) {
                Ok(f) => *held = Some(f),
                Err(e) => return self.drop_copy(&e.to_string(), true),
            }
        }
        if let Some(Err(e)) = held.as_ref().map(|f| f.write_all_at(&bytes[..keep], offset)) {
            return self.drop_copy(&e.to_string(), true);
        }
        let Ok(mut state) = self.state.lock() else { return };
        // (Given up meanwhile: nothing more to do.)
        let Some(w) = state.as_mut() else { return };
        add(&mut w.written, offset..end);
        if w.written.first() != Some(&(0..self.note.size)) {
            drop(state);
            self.landed.notify_all();
            return;
        }
        let Some(done) = state.take() else { return };
        self.finishing.store(true, Ordering::Release);
        drop(state);
        // Whole: synced and named without the lock held. (Only this thread writes, so the
        // file is this one's alone now.)
        let finished = match done.file {
            Some(id) => self.finish(id),
            None => Err(io::Error::other("its temporary file was never made")),
        };
        if let Err(e) = finished {
            tracing::warn!("{}: not cached: {e}", self.path.display());
            let _ = std::fs::remove_file(&self.partial);
        }
        drop(done);
        let state = self.state.lock();
        self.finishing.store(false, Ordering::Release);
        drop(state);
        self.landed.notify_all();
    }

    /// Gives the copy up: its temporary file is removed.
    fn drop_copy(&self, why: &str, warn: bool) {
        let taken = self.state.lock().map(|mut state| state.take()).ok().flatten();
        // (Removed with the lock let go: unlinking a file of gigabytes may take a while, and
        // the network's threads queue bytes under it.)
        if taken.is_some() {
            if warn {
                tracing::warn!("{}: not cached: {why}", self.path.display());
            } else {
                tracing::debug!("{}: not cached: {why}", self.path.display());
            }
            let _ = std::fs::remove_file(&self.partial);
        }
        self.landed.notify_all();
    }

    /// The whole copy, synced, takes its name (the old note removed first, so that no note
    /// ever describes other bytes), then its note is written, synced, and named.
    fn finish(&self, id: (u64, u64)) -> io::Result<()> {
        self.open_partial(id)?.sync_all()?;
        let now = std::fs::symlink_metadata(&self.partial)?;
        if (now.dev(), now.ino()) != id {
            return Err(io::Error::other("its temporary file was replaced"));
        }
        let note = note_path(&self.path);
        match std::fs::remove_file(&note) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::rename(&self.partial, &self.path)?;
        let mut tmp = note.as_os_str().to_owned();
        tmp.push(self.partial.extension().unwrap_or_default());
        let tmp = PathBuf::from(tmp);
        let mut f = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        let note_text = Note { file: id, ..self.note.clone() }.text();
        let written = f.write_all(note_text.as_bytes()).and_then(|()| f.sync_all());
        if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, &note)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        tracing::debug!("{}: cached", self.path.display());
        Ok(())
    }
}

impl Drop for CacheFile {
    fn drop(&mut self) {
        // Not whole: nothing to keep (unless this is a forked child, whose parent is still
        // writing it).
        if self.state.get_mut().is_ok_and(|s| s.is_some()) && !self.made.elsewhere() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// The thread that writes copies, so that the network threads never wait for a disk.
mod writer {
    use super::*;

    type Job = (Arc<CacheFile>, u64, bytes::Bytes);

    static QUEUED: AtomicU64 = AtomicU64::new(0);

    /// Queues a write; false when it cannot be (the writer is behind, or cannot start).
    pub(super) fn queue(copy: Arc<CacheFile>, offset: u64, bytes: bytes::Bytes) -> bool {
        let len = bytes.len() as u64;
        if QUEUED.fetch_add(len, Ordering::Relaxed) + len > MAX_QUEUED {
            QUEUED.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        let sent = sender().is_some_and(|tx| tx.try_send((copy, offset, bytes)).is_ok());
        if !sent {
            QUEUED.fetch_sub(len, Ordering::Relaxed);
        }
        sent
    }

    /// The writer's queue, made on first use in each process (a forked child has none of
    /// its parent's threads).
    fn sender() -> Option<SyncSender<Job>> {
        static TX: Mutex<Option<(u32, SyncSender<Job>)>> = Mutex::new(None);
        let mut tx = TX.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let pid = std::process::id();
        if let Some((owner, s)) = tx.as_ref() {
            if *owner == pid {
                return Some(s.clone());
            }
        }
        let (s, rx) = sync_channel::<Job>(4096);
        std::thread::Builder::new()
            .name("tensorlift-cache".into())
            .spawn(move || {
                // The copy written last and its file, kept open while writes of it follow,
                // closed when another copy's come or the queue is empty (so that no
                // descriptor outlives a burst of writes).
                let mut held: Option<(Arc<CacheFile>, Option<File>)> = None;
                loop {
                    let (copy, offset, bytes) = match rx.try_recv() {
                        Ok(job) => job,
                        Err(std::sync::mpsc::TryRecvError::Empty) => {
                            held = None;
                            match rx.recv() {
                                Ok(job) => job,
                                Err(_) => return,
                            }
                        }
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
                    };
                    if !held.as_ref().is_some_and(|(c, _)| Arc::ptr_eq(c, &copy)) {
                        held = Some((Arc::clone(&copy), None));
                    }
                    if let Some((_, file)) = held.as_mut() {
                        copy.write_with(offset, &bytes, file);
                    }
                    QUEUED.fetch_sub(bytes.len() as u64, Ordering::Relaxed);
                }
            })
            .ok()?;
        *tx = Some((pid, s.clone()));
        Some(s)
    }
}

/// Adds `r` to the sorted, merged ranges `v`.
fn add(v: &mut Vec<Range<u64>>, r: Range<u64>) {
    let mut merged = r;
    v.retain(|x| {
        if x.end < merged.start || x.start > merged.end {
            true
        } else {
            merged = merged.start.min(x.start)..merged.end.max(x.end);
            false
        }
    });
    let at = v.partition_point(|x| x.start < merged.start);
    v.insert(at, merged);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_into_the_whole() {
        let mut v = Vec::new();
        add(&mut v, 10..20);
        add(&mut v, 0..5);
        add(&mut v, 30..40);
        assert_eq!(v, [0..5, 10..20, 30..40]);
        add(&mut v, 5..10);
        assert_eq!(v, [0..20, 30..40]);
        add(&mut v, 15..35);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0], 0..40);
    }

    #[test]
    fn copies_are_under_their_stores_key_and_never_the_caches_own_names() {
        let root = Path::new("/c");
        let loc = ObjectPath::parse("m/x.safetensors").unwrap();
        assert_eq!(local_path(root, "k", &loc), Some(PathBuf::from("/c/k/m/x.safetensors")));
        // object_store spells a part that looks like a climb so that it is not one.
        let odd = ObjectPath::from_iter(["%2e%2e", "a?b#c", "x.safetensors"]);
        let p = local_path(root, "k", &odd).unwrap();
        assert!(p.starts_with("/c/k/") && p.components().count() == 6, "{}", p.display());
        for bad in ["x.safetensors.tlcache", "x.safetensors.partial-1-2-3"] {
            assert_eq!(local_path(root, "k", &ObjectPath::from_iter(["m", bad])), None, "{bad}");
        }
        assert_eq!(base_url_in(r#"{"gcs_base_url": "http://h:1", "private_key": "x"}"#).as_deref(), Some("http://h:1"));
        assert_eq!(base_url_in(r#"{"private_key": "x"}"#), None);
        // The key of a URL, with its object's path as object_store reads it.
        let key = |u: &str| {
            let url = url::Url::parse(u).unwrap();
            store_key(&url, &object_store::ObjectStoreScheme::parse(&url).unwrap().1)
        };
        // Another endpoint, port or scheme is another folder.
        let a = key("s3://b/x");
        assert_ne!(a, key("gs://b/x"));
        assert_eq!(a, key("s3://b/m/y.safetensors"), "one bucket, one folder");
        // Two containers of one Azure account.
        assert_ne!(key("abfss://c1@a.dfs.core.windows.net/x"), key("abfss://c2@a.dfs.core.windows.net/x"));
        assert_ne!(key("http://h:8080/x"), key("http://h_8080/x"));
        // Path-style URLs name the bucket or container first, which the store strips from
        // the object's path: two buckets are two folders, one bucket's objects one.
        let s3 = "https://s3.us-east-1.amazonaws.com";
        assert_ne!(key(&format!("{s3}/bucket-a/m/x")), key(&format!("{s3}/bucket-b/m/x")));
        assert_eq!(key(&format!("{s3}/bucket-a/m/x")), key(&format!("{s3}/bucket-a/n/y/z")));
        // An object name holding an encoded `/` is one URL segment but two of its parts:
        // the bucket still counts.
        assert_ne!(key(&format!("{s3}/bucket-a/m%2Fx")), key(&format!("{s3}/bucket-b/m%2Fx")));
        assert_eq!(key(&format!("{s3}/bucket-a/m%2Fx")), key(&format!("{s3}/bucket-a/m/x")));
        let blob = "https://acct.blob.core.windows.net";
        assert_ne!(key(&format!("{blob}/c1/m/x")), key(&format!("{blob}/c2/m/x")));
        // A plain HTTP server's path is all the object's.
        assert_eq!(key("http://h/a/x"), key("http://h/b/y"));
    }

    #[test]
    fn notes_round_trip_and_match_on_a_strong_etag_alone() {
        let n = Note { url: "s3://b/x".into(), size: 5, e_tag: Some("\"e\"".into()), modified_ns: 7, file: (1, 2) };
        assert_eq!(Note::parse(&n.text()), Some(n.clone()));
        assert!(n.matches(&Note { modified_ns: 8, ..n.clone() }));
        assert!(!n.matches(&Note { e_tag: Some("\"f\"".into()), ..n.clone() }));
        assert!(!n.matches(&Note { size: 6, ..n.clone() }));
        let weak = Note { e_tag: Some("W/\"e\"".into()), ..n.clone() };
        assert!(!weak.matches(&weak.clone()));
        // Without an ETag, the same length and time may be other bytes.
        let untagged = Note { e_tag: None, ..n.clone() };
        assert!(!untagged.matches(&untagged.clone()));
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn copies_are_made_of_objects_with_a_strong_etag_and_leave_no_temporary_file_behind() {
        let root = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-cache-");
        let path = root.join("k").join("m.safetensors");
        let note = Note { url: "s3://b/m.safetensors".into(), size: 4, e_tag: None, modified_ns: 7, file: (0, 0) };
        assert!(CacheFile::create(&root, path.clone(), note.clone()).is_none(), "no ETag");
        let weak = Note { e_tag: Some("W/\"e\"".into()), ..note.clone() };
        assert!(CacheFile::create(&root, path.clone(), weak).is_none(), "a weak ETag");
        // A length no file can have: nothing is left of the attempt, at its first write.
        let huge = Note { e_tag: Some("\"e\"".into()), size: u64::MAX, ..note.clone() };
        let copy = CacheFile::create(&root, path.clone(), huge).unwrap();
        copy.write_now(0, b"xx");
        assert!(copy.state.lock().unwrap().is_none(), "not given up");
        drop(copy);
        assert_eq!(names_in(&root.join("k")), Vec::<String>::new());
        // Temporary copies a killed process left: an idle one no one holds is removed as a
        // copy starts in its folder; one written lately, or held (a live writer's, paused on
        // a slow network), stays, as do other files.
        // (Another folder: each is swept once a process, and `k` was, by the attempts above.)
        let k = root.join("j");
        std::fs::create_dir(&k).unwrap();
        let path = k.join("m.safetensors");
        let old = std::time::SystemTime::now() - ABANDONED - Duration::from_secs(60);
        for n in ["m.safetensors.partial-1-0-a", "o.safetensors.partial-1-0-a", "held.partial-3-0-c", "x.tlcache"] {
            std::fs::write(k.join(n), b"xx").unwrap();
            File::options().write(true).open(k.join(n)).unwrap().set_modified(old).unwrap();
        }
        std::fs::write(k.join("m.safetensors.partial-2-0-b"), b"xx").unwrap();
        let held = File::open(k.join("held.partial-3-0-c")).unwrap();
        assert!(crate::try_lock(&held, false));
        let strong = Note { e_tag: Some("\"e\"".into()), ..note };
        let copy = CacheFile::create(&root, path.clone(), strong).expect("a strong ETag's object is copied");
        let names = names_in(&k);
        for gone in ["m.safetensors.partial-1-0-a", "o.safetensors.partial-1-0-a"] {
            assert!(!names.contains(&gone.to_owned()), "{gone}: {names:?}");
        }
        for kept in ["m.safetensors.partial-2-0-b", "held.partial-3-0-c", "x.tlcache"] {
            assert!(names.contains(&kept.to_owned()), "{kept}: {names:?}");
        }
        // The copy's own temporary file is made at its first write, and holds no descriptor
        // between writes; whole, it takes its name and its note names it.
        let ours = |names: &[String]| {
            names.iter().filter(|n| n.starts_with("m.safetensors.partial-") && !n.ends_with("-2-0-b")).count()
        };
        assert_eq!(ours(&names), 0, "{names:?}");
        copy.write_now(0, b"ab");
        assert_eq!(ours(&names_in(&k)), 1);
        let open = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|t| t.starts_with(&k) && t.to_string_lossy().contains("m.safetensors.partial-"))
            .count();
        assert_eq!(open, 0, "a descriptor is held between writes");
        copy.write_now(2, b"cd");
        assert_eq!(ours(&names_in(&k)), 0);
        assert_eq!(std::fs::read(&path).unwrap(), b"abcd");
        let id = std::fs::metadata(&path).map(|m| (m.dev(), m.ino())).unwrap();
        let noted = Note::parse(&std::fs::read_to_string(note_path(&path)).unwrap()).unwrap();
        assert_eq!(noted.file, id);
        drop(copy);
        // A folder replaced between planning and the first write (through a parent others
        // may write to): nothing is made in the new one, and the copy is given up.
        let i = root.join("i");
        std::fs::create_dir(&i).unwrap();
        let strong = Note { e_tag: Some("\"e\"".into()), ..noted };
        let copy = CacheFile::create(&root, i.join("m.safetensors"), strong).unwrap();
        std::fs::rename(&i, root.join("i-moved")).unwrap();
        std::fs::create_dir(&i).unwrap();
        copy.write_now(0, b"ab");
        assert!(copy.state.lock().unwrap().is_none(), "not given up");
        assert_eq!(names_in(&i), Vec::<String>::new());
        assert_eq!(names_in(&root.join("i-moved")), Vec::<String>::new());
    }
}
