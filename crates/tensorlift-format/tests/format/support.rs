use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tensorlift_format::{CheckpointSource, EntryKind};

/// A file of `8 + N` header bytes for `json` followed by `data_len` zero bytes.
pub fn file_with(json: &str, data_len: usize) -> Vec<u8> {
    let mut f = (json.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(json.as_bytes());
    f.resize(f.len() + data_len, 0);
    f
}

/// The test's own std::fs source: the crate under test does no I/O itself.
pub struct StdSource;

impl CheckpointSource for StdSource {
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
        std::fs::read_dir(dir)?.map(|e| Ok(e?.file_name().to_string_lossy().into_owned())).collect()
    }
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        std::fs::canonicalize(path)
    }
    fn read_at(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; len];
        File::open(path)?.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

pub fn tempdir() -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tensorlift-format-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
