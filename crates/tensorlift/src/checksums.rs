//! SHA-256 digests of checkpoint files: the `SHA256SUMS` file of coreutils (what
//! `sha256sum` writes and `sha256sum -c` checks), the digest a Hugging Face hub cache names
//! a file's blob by, and the manifest of a checkpoint ([`manifest`]).
//!
//! ```no_run
//! let m = tensorlift::checksums::manifest("models/llama")?;
//! let written = m.write()?; // models/llama/SHA256SUMS: `sha256sum -c SHA256SUMS` passes there
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use sha2::Digest as _;

/// The name coreutils' convention gives a folder's list of SHA-256 digests.
pub const SUMS_FILE: &str = "SHA256SUMS";

/// A SHA-256 digest; it prints, and parses from, 64 lowercase (or uppercase) hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256(pub [u8; 32]);

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({self})")
    }
}

impl FromStr for Sha256 {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("'{}' is not a SHA-256 digest (64 hex digits)", s.escape_debug()));
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(Sha256(out))
    }
}

/// A `SHA256SUMS` file that cannot be read as coreutils writes them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: line {line}: {message}", file.display())]
pub struct SumsError {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    pub message: String,
}

/// The entries of a `SHA256SUMS` file (`file` names it in errors), in order: each a file
/// name, as written (relative to the file's folder), and its digest. Takes what
/// `sha256sum -c` takes: `<digest>  <name>` (text mode) or `<digest> *<name>` (binary), a
/// leading `\` for a name with `\\`, `\n` or `\r` escapes, and the tagged form
/// `SHA256 (<name>) = <digest>`. Empty lines are skipped; anything else is an error naming
/// the line (`sha256sum -c --strict` fails on it too).
pub fn parse_sums(text: &str, file: &Path) -> Result<Vec<(String, Sha256)>, SumsError> {
    let mut out = Vec::new();
    for (i, raw) in text.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.is_empty() {
            continue;
        }
        let fail = |message: String| SumsError { file: file.to_path_buf(), line: i + 1, message };
        let (escaped, line) = match line.strip_prefix('\\') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let (hex, name) = if let Some(rest) = line.strip_prefix("SHA256 (") {
            let Some((name, hex)) = rest.rsplit_once(") = ") else {
                return Err(fail("a tagged line is `SHA256 (<name>) = <digest>`".into()));
            };
            (hex, name)
        } else {
            let (hex, rest) = line.split_at_checked(64).ok_or_else(|| fail("shorter than a digest".into()))?;
            let name = rest
                .strip_prefix("  ")
                .or_else(|| rest.strip_prefix(" *"))
                .ok_or_else(|| fail("the digest is not followed by two spaces (or ` *`) and a name".into()))?;
            (hex, name)
        };
        let digest = hex.parse::<Sha256>().map_err(fail)?;
        let name = if escaped { unescape(name).map_err(fail)? } else { name.to_owned() };
        if name.is_empty() {
            return Err(fail("no file name".into()));
        }
        out.push((name, digest));
    }
    Ok(out)
}

fn unescape(name: &str) -> Result<String, String> {
    let mut out = String::with_capacity(name.len());
    let mut chars = name.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            other => {
                return Err(format!("unknown escape '\\{}' in a file name", other.map_or(String::new(), String::from)))
            }
        }
    }
    Ok(out)
}

/// `entries` as `sha256sum` writes them: `<digest>  <name>\n` each, a name with `\`, a
/// newline or a carriage return escaped and its line marked with a leading `\`.
pub fn format_sums(entries: &[(String, Sha256)]) -> String {
    let mut out = String::new();
    for (name, digest) in entries {
        if name.contains(['\\', '\n', '\r']) {
            let escaped = name.replace('\\', "\\\\").replace('\n', "\\n").replace('\r', "\\r");
            out.push_str(&format!("\\{digest}  {escaped}\n"));
        } else {
            out.push_str(&format!("{digest}  {name}\n"));
        }
    }
    out
}

/// The SHA-256 of the file at `path`, read from start to end.
pub fn sha256_file(path: &Path) -> std::io::Result<Sha256> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Sha256(hasher.finalize().into()))
}

/// The digest a Hugging Face hub cache gives the file at `path`: in a cache, a snapshot's
/// file is a link to `blobs/<name>`, and for a file stored with Git LFS (weights are) the
/// name is the file's SHA-256. `None` where `path` does not resolve to such a blob (a plain
/// file, or a small file whose blob is named by its git SHA-1).
pub fn hub_blob_digest(path: &Path) -> Option<Sha256> {
    let resolved = std::fs::canonicalize(path).ok()?;
    if resolved.parent()?.file_name()? != "blobs" {
        return None;
    }
    resolved.file_name()?.to_str()?.parse().ok()
}

/// Where a shard's expected digest was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DigestSource {
    /// The name of the Hugging Face hub cache blob the shard's file is (this path).
    HubBlob(PathBuf),
    /// An entry of this `SHA256SUMS` file.
    SumsFile(PathBuf),
}

impl fmt::Display for DigestSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DigestSource::HubBlob(p) => write!(f, "the hub cache blob {}", p.display()),
            DigestSource::SumsFile(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The digests a checkpoint's shards are expected to have, looked for in order: the hub
/// cache blob each shard's file resolves to ([`hub_blob_digest`]), then the `SHA256SUMS`
/// file in the checkpoint's folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// Per shard of the plan, in its order: the digest and where it was found, or `None`.
    pub shards: Vec<Option<(Sha256, DigestSource)>>,
    /// The `SHA256SUMS` file looked in (whether or not it exists), for errors that say
    /// where no digest was found.
    pub sums_file: PathBuf,
}

/// The expected digests of `plan`'s shards. A `SHA256SUMS` that exists but cannot be read
/// as coreutils writes it, or that lists a shard twice with two digests, is an error
/// (rather than a file whose digests are silently not used).
pub fn expected(plan: &tensorlift_format::LoadPlan) -> Result<Expected, SumsError> {
    let sums_file = plan.root().join(SUMS_FILE);
    let listed = match std::fs::read(&sums_file) {
        Ok(bytes) => {
            let text = String::from_utf8(bytes).map_err(|e| SumsError {
                file: sums_file.clone(),
                line: 0,
                message: format!("not UTF-8 ({e})"),
            })?;
            parse_sums(&text, &sums_file)?
        }
        Err(_) => Vec::new(),
    };
    // A name as sha256sum -c resolves it: relative to the folder, `./` or not.
    let plain = |n: &str| n.trim_start_matches("./").to_owned();
    let mut by_name: std::collections::HashMap<String, Sha256> = std::collections::HashMap::new();
    for (i, (name, digest)) in listed.iter().enumerate() {
        if let Some(other) = by_name.insert(plain(name), *digest) {
            if other != *digest {
                return Err(SumsError {
                    file: sums_file.clone(),
                    line: i + 1,
                    message: format!("'{}' is listed twice, with two digests", name.escape_debug()),
                });
            }
        }
    }
    let shards = plan
        .shards()
        .iter()
        .map(|s| {
            if let Some(d) = hub_blob_digest(&s.path) {
                return Some((d, DigestSource::HubBlob(s.path.clone())));
            }
            std::iter::once(&s.name)
                .chain(&s.aliases)
                .find_map(|n| by_name.get(&plain(n)))
                .map(|d| (*d, DigestSource::SumsFile(sums_file.clone())))
        })
        .collect();
    Ok(Expected { shards, sums_file })
}

/// The digests of a checkpoint's files, as a `SHA256SUMS` in its folder lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The checkpoint's folder, which the names are relative to.
    pub folder: PathBuf,
    /// Every shard, then the index (where there is one), with its digest.
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
    let plan = crate::plan(path)?;
    let folder = plan.root().to_path_buf();
    let mut files: Vec<(String, PathBuf)> = plan.shards().iter().map(|s| (s.name.clone(), s.path.clone())).collect();
    if let Some(index) = plan.index_file() {
        let name = index.strip_prefix(&folder).unwrap_or(index).to_string_lossy().into_owned();
        files.push((name, index.to_path_buf()));
    }
    drop(plan);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, files.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let digests: Vec<std::sync::Mutex<Option<std::io::Result<Sha256>>>> =
        files.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((_, path)) = files.get(i) else { break };
                let d = sha256_file(path);
                *digests[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(d);
            });
        }
    });
    let mut entries = Vec::with_capacity(files.len());
    for ((name, path), d) in files.into_iter().zip(digests) {
        let d = d.into_inner().unwrap_or_else(|p| p.into_inner());
        let d = d.unwrap_or_else(|| Err(std::io::Error::other("not hashed")));
        entries.push((name, d.map_err(|source| ManifestError::Io { file: path, source })?));
    }
    Ok(Manifest { folder, entries })
}

impl Manifest {
    /// Writes the manifest as `SHA256SUMS` in the checkpoint's folder, replacing one that is
    /// there (written beside it first, then renamed over it: a reader never sees half a
    /// file). Returns its path.
    pub fn write(&self) -> Result<PathBuf, ManifestError> {
        let path = self.folder.join(SUMS_FILE);
        let partial = self.folder.join(format!(".{SUMS_FILE}.partial-{}", std::process::id()));
        let io = |file: &Path| {
            let file = file.to_path_buf();
            move |source| ManifestError::Io { file, source }
        };
        let result = (|| {
            let mut f = std::fs::File::create(&partial)?;
            f.write_all(format_sums(&self.entries).as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&partial, &path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result.map_err(io(&path))?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_parse_and_format_as_coreutils() {
        let d = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let text = format!(
            "{d}  a.safetensors\n{}  b c\r\n\n\\{d}  x\\\\y\\nz\nSHA256 (t) = {d}\n{d} *bin\n",
            d.to_uppercase()
        );
        let got = parse_sums(&text, Path::new("S")).unwrap();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a.safetensors", "b c", "x\\y\nz", "t", "bin"]);
        assert!(got.iter().all(|(_, g)| g.to_string() == d));
        let entries = vec![("a".to_owned(), d.parse().unwrap()), ("x\\y\nz".to_owned(), d.parse().unwrap())];
        assert_eq!(format_sums(&entries), format!("{d}  a\n\\{d}  x\\\\y\\nz\n"));
        assert_eq!(parse_sums(&format_sums(&entries), Path::new("S")).unwrap(), entries);
    }

    #[test]
    fn malformed_sums_lines_are_refused_by_line() {
        let d = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let cases = [
            (format!("{d}  ok\nshort  x\n"), 2, "shorter than a digest"),
            (format!("{d} x\n"), 1, "the digest is not followed by two spaces"),
            (format!("{}g  x\n", &d[..63]), 1, "is not a SHA-256 digest"),
            (format!("{d}  \n"), 1, "no file name"),
            (format!("\\{d}  a\\qb\n"), 1, "unknown escape '\\q'"),
            ("SHA256 (x = 00\n".to_owned(), 1, "a tagged line is"),
        ];
        for (text, line, message) in cases {
            let e = parse_sums(&text, Path::new("SUMS")).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.message.contains(message), "{text:?}: {e}");
        }
    }
}
