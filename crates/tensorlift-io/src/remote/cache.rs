//! A local copy of remote checkpoints ([`RemoteOptions::cache_dir`](super::RemoteOptions)),
//! written as a load reads them, so that the next load of the same objects is local.
//!
//! An object `s3://bucket/a/b.safetensors` is kept as `CACHE/s3/bucket/a/b.safetensors`,
//! with `b.safetensors.tlcache` beside it naming what it is a copy of (URL, length, ETag,
//! modification time). Bytes land in `b.safetensors.partial-PID` as the load's GETs bring
//! them (and as planning reads headers); once every byte of the object is there the file
//! takes its name and then the note is written, so a copy with a note is whole. A copy is
//! used only when its note matches what the store says of the object now (length, and ETag
//! or, without one, modification time), checked before the load plans from it. A load that
//! reads part of a shard (a filter, slices) leaves no copy of it: its partial file is
//! removed. Failing to write the cache never fails a load; it is logged and the copy
//! dropped.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use object_store::ObjectMeta;

/// Suffix of the note beside a cached copy.
const NOTE: &str = ".tlcache";

/// Where the copy of the object at `url` is kept under `root`: the URL's scheme, host (and
/// port) and path segments, each a plain name (`None` for a URL that has none, or a segment
/// that is not a plain name).
pub(crate) fn place_for(root: &Path, url: &str) -> Option<PathBuf> {
    let parsed = url::Url::parse(url).ok()?;
    let host = match parsed.port() {
        Some(p) => format!("{}_{p}", parsed.host_str()?),
        None => parsed.host_str()?.to_owned(),
    };
    let mut out = root.join(parsed.scheme()).join(plain(&host)?);
    for seg in parsed.path_segments()? {
        if !seg.is_empty() {
            out.push(plain(seg)?);
        }
    }
    Some(out)
}

/// `name` if it is a plain file name (no separator, not `.` or `..`).
fn plain(name: &str) -> Option<&str> {
    (!name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')).then_some(name)
}

/// What a copy is a copy of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Note {
    pub(crate) url: String,
    pub(crate) size: u64,
    pub(crate) e_tag: Option<String>,
    pub(crate) modified_ns: i128,
}

impl Note {
    pub(crate) fn of(url: &str, meta: &ObjectMeta) -> Note {
        Note {
            url: url.to_owned(),
            size: meta.size,
            e_tag: meta.e_tag.clone(),
            modified_ns: super::store::modified_ns(meta),
        }
    }

    fn text(&self) -> String {
        format!(
            "url {}\nsize {}\netag {}\nmodified_ns {}\n",
            self.url,
            self.size,
            self.e_tag.as_deref().unwrap_or("-"),
            self.modified_ns
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
        Some(Note { url, size, e_tag, modified_ns })
    }

    /// Whether a copy made of `self` is a copy of the object as `now` describes it.
    pub(crate) fn matches(&self, now: &Note) -> bool {
        self.url == now.url
            && self.size == now.size
            && match (&self.e_tag, &now.e_tag) {
                (Some(a), Some(b)) => a == b,
                (None, None) => self.modified_ns == now.modified_ns && self.modified_ns != 0,
                _ => false,
            }
    }
}

/// The copy at `path`, if it is whole (its note is there) and a copy of the object `now`
/// describes.
pub(crate) fn usable(path: &Path, now: &Note) -> bool {
    let note = std::fs::read_to_string(note_path(path)).ok().and_then(|t| Note::parse(&t));
    let len = std::fs::metadata(path).ok().filter(|m| m.is_file()).map(|m| m.len());
    note.is_some_and(|n| n.matches(now)) && len == Some(now.size)
}

fn note_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(NOTE);
    PathBuf::from(p)
}

/// Writes a whole object's bytes as its copy at once (an index, read whole by planning).
pub(crate) fn put(path: &Path, note: &Note, bytes: &[u8]) {
    let copy = CacheFile::create(path.to_path_buf(), note.clone());
    if let Some(c) = copy {
        c.write(0, bytes);
    }
}

/// A copy being written: bytes as they land, at their offsets; whole once they cover the
/// object. Dropped before that, it removes its partial file.
#[derive(Debug)]
pub(crate) struct CacheFile {
    path: PathBuf,
    partial: PathBuf,
    note: Note,
    state: Mutex<Option<Writing>>,
}

#[derive(Debug)]
struct Writing {
    file: std::sync::Arc<File>,
    /// Byte ranges written, sorted and merged.
    written: Vec<Range<u64>>,
}

impl CacheFile {
    /// Starts the copy of the object `note` describes at `path`; `None` (logged) where it
    /// cannot be made.
    pub(crate) fn create(path: PathBuf, note: Note) -> Option<CacheFile> {
        let mut partial = path.as_os_str().to_owned();
        partial.push(format!(".partial-{}", std::process::id()));
        let partial = PathBuf::from(partial);
        let made = (|| -> io::Result<File> {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&partial)?;
            file.set_len(note.size)?;
            Ok(file)
        })();
        match made {
            Ok(file) => {
                let state = Mutex::new(Some(Writing { file: file.into(), written: Vec::new() }));
                Some(CacheFile { path, partial, note, state })
            }
            Err(e) => {
                tracing::warn!("{}: not cached: {e}", path.display());
                let _ = std::fs::remove_file(&partial);
                None
            }
        }
    }

    /// Writes `bytes` at `offset` of the copy; the copy is made whole (renamed, its note
    /// written) once its bytes cover the object. An error drops the copy, never the load.
    pub(crate) fn write(&self, offset: u64, bytes: &[u8]) {
        let end = offset.saturating_add(bytes.len() as u64).min(self.note.size);
        let keep = (end.saturating_sub(offset)) as usize;
        if keep == 0 {
            return;
        }
        // The write itself runs unlocked: parts of one object land at once.
        let file = match self.state.lock() {
            Ok(state) => match state.as_ref() {
                Some(w) => std::sync::Arc::clone(&w.file),
                None => return,
            },
            Err(_) => return,
        };
        let written = file.write_all_at(&bytes[..keep], offset);
        let Ok(mut state) = self.state.lock() else { return };
        let Some(w) = state.as_mut() else { return };
        if let Err(e) = written {
            tracing::warn!("{}: not cached: {e}", self.path.display());
            *state = None;
            let _ = std::fs::remove_file(&self.partial);
            return;
        }
        add(&mut w.written, offset..end);
        if w.written.first() == Some(&(0..self.note.size)) {
            let done = state.take();
            drop(done);
            if let Err(e) = self.finish() {
                tracing::warn!("{}: not cached: {e}", self.path.display());
                let _ = std::fs::remove_file(&self.partial);
            }
        }
    }

    /// The whole copy takes its name, then its note is written.
    fn finish(&self) -> io::Result<()> {
        std::fs::rename(&self.partial, &self.path)?;
        let note = note_path(&self.path);
        let mut tmp = note.as_os_str().to_owned();
        tmp.push(format!(".{}", std::process::id()));
        std::fs::write(&tmp, self.note.text())?;
        std::fs::rename(&tmp, &note)?;
        tracing::debug!("{}: cached", self.path.display());
        Ok(())
    }
}

impl Drop for CacheFile {
    fn drop(&mut self) {
        // Not whole: nothing to keep.
        if self.state.get_mut().is_ok_and(|s| s.is_some()) {
            let _ = std::fs::remove_file(&self.partial);
        }
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
    fn places_are_plain_names_under_the_root() {
        let root = Path::new("/c");
        assert_eq!(place_for(root, "s3://b/m/x.safetensors"), Some(PathBuf::from("/c/s3/b/m/x.safetensors")));
        assert_eq!(place_for(root, "http://h:8080/a/x"), Some(PathBuf::from("/c/http/h_8080/a/x")));
        // The URL parser removes dot segments; what is left is plain.
        assert_eq!(place_for(root, "s3://b/a/../x"), Some(PathBuf::from("/c/s3/b/x")));
    }

    #[test]
    fn notes_round_trip_and_match_on_etag_or_time() {
        let n = Note { url: "s3://b/x".into(), size: 5, e_tag: Some("\"e\"".into()), modified_ns: 7 };
        assert_eq!(Note::parse(&n.text()), Some(n.clone()));
        assert!(n.matches(&Note { modified_ns: 8, ..n.clone() }));
        assert!(!n.matches(&Note { e_tag: Some("\"f\"".into()), ..n.clone() }));
        assert!(!n.matches(&Note { size: 6, ..n.clone() }));
        let untagged = Note { e_tag: None, ..n.clone() };
        assert!(untagged.matches(&untagged.clone()));
        assert!(!untagged.matches(&Note { modified_ns: 8, ..untagged.clone() }));
    }
}
