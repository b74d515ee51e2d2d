//! [`CheckpointSource`] over the real file system, for planning.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tensorlift_format::{CheckpointSource, EntryKind};

/// Answers `tensorlift-format`'s planning questions with `std::fs`.
#[derive(Debug, Default, Clone, Copy)]
pub struct FsSource;

impl CheckpointSource for FsSource {
    fn kind(&self, path: &Path) -> io::Result<EntryKind> {
        let m = std::fs::metadata(path)?;
        Ok(if m.is_file() {
            EntryKind::File { len: m.len() }
        } else if m.is_dir() {
            EntryKind::Dir
        } else {
            EntryKind::Other
        })
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            // Names that are not UTF-8 cannot be shard names of an index; skip them in a folder scan.
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        std::fs::canonicalize(path)
    }

    fn read_at(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let file = File::open(path)?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}
