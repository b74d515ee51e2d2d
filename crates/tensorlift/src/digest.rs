//! SHA-256 digests and where a checkpoint's expected ones are found: the `SHA256SUMS` file
//! of coreutils, the digest a Hugging Face hub cache names a blob by. Below the errors and
//! the loader (it names neither): [`crate::checksums`] is its public face.

use std::fmt;
use std::io::Read;
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
            return Err(format!("'{}' is not a SHA-256 digest (64 hex digits)", shown(s)));
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
#[error("{}{}: {message}", file.display(), at_line(*line))]
pub struct SumsError {
    pub file: PathBuf,
    /// 1-based; 0 for an error of the whole file (not readable, a link, two digests for one
    /// shard from it and the hub cache).
    pub line: usize,
    pub message: String,
}

/// `: line N`, or nothing for an error of the whole file (line 0).
fn at_line(line: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(": line {line}")
    }
}

/// The entries of a `SHA256SUMS` file (`file` names it in errors), in order: each a file
/// name, as written (relative to the file's folder), and its digest. Takes what
/// `sha256sum -c` takes: `<digest>  <name>` (text mode), `<digest> *<name>` (binary) or
/// `<digest> <name>` (BSD's reversed form; as in coreutils, the file's first such line
/// decides between the two for every line after it), leading blanks, a leading `\` for a name with `\\`, `\n` or `\r`
/// escapes, the tagged form `SHA256 (<name>) = <digest>` (spaces around `=` and before `(`
/// optional), CRLF line ends; `#` comment lines and empty lines are skipped. Anything else is
/// an error naming the line.
pub fn parse_sums(text: &str, file: &Path) -> Result<Vec<(String, Sha256)>, SumsError> {
    Ok(parse_with_form(text, file)?.0.into_iter().map(|(_, n, d)| (n, d)).collect())
}

/// An entry of a `SHA256SUMS` file: its 1-based line, the name, the digest.
pub(crate) type Line = (usize, String, Sha256);

/// [`parse_sums`], each entry with its line number, and the file's form: whether its untagged lines have one blank between
/// digest and name (BSD's reversed form), as its first such line says (coreutils'
/// `bsd_reversed`); `None` where it has no untagged line.
pub(crate) fn parse_with_form(text: &str, file: &Path) -> Result<(Vec<Line>, Option<bool>), SumsError> {
    parse_lines(text.split('\n').map(|l| (std::borrow::Cow::Borrowed(l), true)), file)
}

/// [`parse_with_form`] of lines given one at a time, each with whether its entry is kept
/// (a line that was not UTF-8 is read for its form, and left out: [`parse_sums_bytes`]), so
/// that a file of millions of lines is never held as a list of them.
fn parse_lines<'a>(
    lines: impl Iterator<Item = (std::borrow::Cow<'a, str>, bool)>,
    file: &Path,
) -> Result<(Vec<Line>, Option<bool>), SumsError> {
    let mut out = Vec::new();
    let mut reversed: Option<bool> = None;
    for (i, (raw, keep)) in lines.enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(&raw).trim_start_matches([' ', '\t']);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fail = |message: String| SumsError { file: file.to_path_buf(), line: i + 1, message };
        let (escaped, line) = match line.strip_prefix('\\') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let (digest, name) = if let Some(rest) = line.strip_prefix("SHA256") {
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            let tagged = rest.strip_prefix('(').and_then(|r| r.rsplit_once(')')).and_then(|(name, tail)| {
                // Blanks around `=` are spaces and tabs, as coreutils takes them.
                let hex = tail.trim_start_matches([' ', '\t']).strip_prefix('=')?.trim_start_matches([' ', '\t']);
                Some((hex, name))
            });
            let (hex, name) = tagged.ok_or_else(|| fail("a tagged line is `SHA256 (<name>) = <digest>`".into()))?;
            (hex.parse::<Sha256>().map_err(fail)?, name)
        } else {
            if line.len() < 64 {
                return Err(fail("shorter than a digest".into()));
            }
            // The digest is the first 64 bytes. A character there that is not ASCII (or a
            // byte that was not UTF-8) may run past them: the field then ends after it, and
            // is refused as no digest before anything after it is looked at.
            let cut = (64..=line.len()).find(|&i| line.is_char_boundary(i)).unwrap_or(line.len());
            let (hex, rest) = line.split_at(cut);
            let digest = hex.parse::<Sha256>().map_err(fail)?;
            // As coreutils: a blank after the digest, then a space or `*` (binary) and the
            // name, or (BSD's reversed form) the name. The first line decides which for the
            // whole file: after one-space lines, a name may start with a space or `*`, and a
            // one-space line after two-space ones is one coreutils does not read.
            let rest = rest
                .strip_prefix([' ', '\t'])
                .ok_or_else(|| fail("the digest is not followed by a blank and a name".into()))?;
            let marked = rest.len() > 1 && rest.starts_with([' ', '*']);
            let name =
                match (marked, reversed) {
                    (true, Some(true)) => rest,
                    (true, _) => {
                        reversed = Some(false);
                        &rest[1..]
                    }
                    (false, Some(false)) => return Err(fail(
                        "one space between digest and name, after lines with two (sha256sum -c does not read such a \
                         line)"
                            .into(),
                    )),
                    (false, _) => {
                        reversed = Some(true);
                        rest
                    }
                };
            (digest, name)
        };
        let name = if escaped { unescape(name).map_err(fail)? } else { name.to_owned() };
        if name.is_empty() {
            return Err(fail("no file name".into()));
        }
        if keep {
            out.push((i + 1, name, digest));
        }
    }
    Ok((out, reversed))
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
    format_sums_in(entries, false)
}

/// [`format_sums`], with one blank between digest and name where `one_space` (BSD's
/// reversed form: what lines appended to a file in that form must have, since its first
/// line decides for all).
pub(crate) fn format_sums_in(entries: &[(String, Sha256)], one_space: bool) -> String {
    let gap = if one_space { " " } else { "  " };
    let mut out = String::new();
    for (name, digest) in entries {
        if name.contains(['\\', '\n', '\r']) {
            let escaped = name.replace('\\', "\\\\").replace('\n', "\\n").replace('\r', "\\r");
            out.push_str(&format!("\\{digest}{gap}{escaped}\n"));
        } else {
            out.push_str(&format!("{digest}{gap}{name}\n"));
        }
    }
    out
}

/// The SHA-256 of the file at `path`, read from start to end.
pub fn sha256_file(path: &Path) -> std::io::Result<Sha256> {
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    sha256_of(&f, len)
}

/// The digest a Hugging Face hub cache gives the file at `path`: in a cache, a snapshot's
/// file is a link to `blobs/<name>`, and for a file stored with Git LFS (weights are) the
/// name is the file's SHA-256. `None` where `path` does not resolve to such a blob (a plain
/// file, or a small file whose blob is named by its git SHA-1).
pub fn hub_blob_digest(path: &Path) -> Option<Sha256> {
    hub_blob(path)?.1.parse().ok()
}

/// The blob of a Hugging Face hub cache the file at `path` resolves to, and its name.
fn hub_blob(path: &Path) -> Option<(PathBuf, String)> {
    let resolved = std::fs::canonicalize(path).ok()?;
    let blobs = resolved.parent()?;
    let repo = blobs.parent()?.file_name()?.to_str()?;
    // The hub's layout: <cache>/{models,datasets,spaces}--<org>--<name>/blobs/<name>.
    let in_cache = ["models--", "datasets--", "spaces--"].iter().any(|p| repo.starts_with(p));
    if blobs.file_name()? != "blobs" || !in_cache {
        return None;
    }
    let name = resolved.file_name()?.to_str()?.to_owned();
    Some((resolved, name))
}

/// The git SHA-1 a Hugging Face hub cache names the file at `path` by, and the blob: a file
/// stored in git itself, not with LFS (an index, a config), is a blob named by git's
/// object name for it, the SHA-1 of `blob <length>\0` and its bytes. `None` where `path`
/// does not resolve to a blob so named.
pub(crate) fn hub_git_blob(path: &Path) -> Option<(PathBuf, [u8; 20])> {
    let (blob, name) = hub_blob(path)?;
    let bytes = name.as_bytes();
    if bytes.len() != 40 || !bytes.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)) {
        return None;
    }
    let mut sha1 = [0u8; 20];
    for (i, pair) in bytes.chunks(2).enumerate() {
        sha1[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some((blob, sha1))
}

/// Git's object name for the first `len` bytes of `f` as a blob (positional reads).
pub(crate) fn git_blob_sha1_of(f: &std::fs::File, len: u64) -> std::io::Result<[u8; 20]> {
    use sha1::Digest;
    let mut hasher = sha1::Sha1::new();
    hasher.update(format!("blob {len}\0").as_bytes());
    Ok(hash_of(f, len, hasher)?.into())
}

/// Opens a file that a checkpoint names, for reading, as untrusted input: links not
/// followed where `follow` is false, a FIFO never waited on, only a regular file taken.
/// `Ok(None)` where it does not exist.
pub(crate) fn open_regular(path: &Path, follow: bool) -> std::io::Result<Option<(std::fs::File, u64)>> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = libc::O_NONBLOCK | libc::O_CLOEXEC | if follow { 0 } else { libc::O_NOFOLLOW };
    let f = match std::fs::OpenOptions::new().read(true).custom_flags(flags).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(std::io::Error::other("it is a symbolic link, which is not followed here"))
        }
        Err(e) => return Err(e),
    };
    let m = f.metadata()?;
    if !m.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(Some((f, m.len())))
}

/// [`open_regular`] for a file that must be there.
pub(crate) fn open_existing(path: &Path, follow: bool) -> std::io::Result<(std::fs::File, u64)> {
    open_regular(path, follow)?.ok_or_else(|| std::io::ErrorKind::NotFound.into())
}

/// The SHA-256 of the first `len` bytes of `f` (positional reads: the file may be shared).
pub(crate) fn sha256_of(f: &std::fs::File, len: u64) -> std::io::Result<Sha256> {
    Ok(Sha256(hash_of(f, len, sha2::Sha256::new())?.into()))
}

/// The first `len` bytes of `f` fed to `hasher` after what it holds, and its digest.
fn hash_of<D: sha2::Digest>(f: &std::fs::File, len: u64, mut hasher: D) -> std::io::Result<sha2::digest::Output<D>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 4 << 20];
    let mut at = 0u64;
    while at < len {
        let want = buf.len().min((len - at) as usize);
        let n = f.read_at(&mut buf[..want], at)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("shorter than {len} bytes")));
        }
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hasher.finalize())
}

/// A shard's path as the checkpoint's folder names it (`root` joined with its name), for
/// errors about its digest: a hub cache snapshot's file resolves to a blob named by a digest,
/// and a link in the folder to another name, neither of which says which shard it is, nor
/// which line of `SHA256SUMS` names it.
pub(crate) fn named_path(root: &Path, shard: &tensorlift_format::Shard) -> PathBuf {
    match shard.path.ends_with(&shard.name) {
        true => shard.path.clone(),
        false => root.join(&shard.name),
    }
}

/// The largest `SHA256SUMS` read (a line a file: 64 MiB is about 700,000 files).
pub(crate) const MAX_SUMS_BYTES: u64 = 64 << 20;

/// The bytes of the `SHA256SUMS` at `path`; `None` where there is none. A link there is
/// followed only where a shard's would be ([`tensorlift_io::link_allowed`]): in a Hugging
/// Face hub cache snapshot, every file, `SHA256SUMS` too, is a link into the repository's
/// `blobs/`.
pub(crate) fn read_sums_bytes(path: &Path) -> Result<Option<Vec<u8>>, SumsError> {
    let fail = |message: String| SumsError { file: path.to_path_buf(), line: 0, message };
    let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    let target = match is_link {
        false => path.to_path_buf(),
        true => {
            let folder = path.parent().and_then(|p| std::fs::canonicalize(p).ok());
            let real = std::fs::canonicalize(path).ok();
            match (folder, real) {
                (Some(folder), Some(real)) if tensorlift_io::link_allowed(&folder, &real) => real,
                // (A link that leads nowhere is a file that is not there.)
                (_, None) => return Ok(None),
                _ => {
                    return Err(fail(
                        "it is a symbolic link that leads out of its folder, which is not followed".into(),
                    ))
                }
            }
        }
    };
    // The link's target, resolved: opened without following any link it has become since.
    let Some((f, len)) = open_regular(&target, false).map_err(|e| fail(e.to_string()))? else { return Ok(None) };
    if len > MAX_SUMS_BYTES {
        return Err(fail(format!("{len} bytes, more than the {MAX_SUMS_BYTES} read")));
    }
    let mut bytes = Vec::new();
    f.take(MAX_SUMS_BYTES).read_to_end(&mut bytes).map_err(|e| fail(e.to_string()))?;
    Ok(Some(bytes))
}

/// The entries of a `SHA256SUMS` file's bytes, and its form ([`parse_with_form`]). A line
/// whose name is not UTF-8 names no shard (shard names are UTF-8): it is read (its form
/// counts, as in coreutils) but its entry left out, rather than kept with replacement
/// characters, which would match a name that has them, or make two such lines one name
/// listed twice.
pub(crate) fn parse_sums_bytes(bytes: &[u8], file: &Path) -> Result<(Vec<Line>, Option<bool>), SumsError> {
    let lines = bytes.split(|&b| b == b'\n').map(|l| {
        let text = String::from_utf8_lossy(l);
        let valid = matches!(text, std::borrow::Cow::Borrowed(_));
        (text, valid)
    });
    parse_lines(lines, file)
}

/// The entries of the `SHA256SUMS` at `path`, with line numbers; `None` where there is none.
pub(crate) fn read_sums(path: &Path) -> Result<Option<Vec<Line>>, SumsError> {
    match read_sums_bytes(path)? {
        Some(bytes) => parse_sums_bytes(&bytes, path).map(|(lines, _)| Some(lines)),
        None => Ok(None),
    }
}

/// A name as `sha256sum -c` resolves it against the folder: `./`, `a//b` and `a/./b` are
/// the same file as `a/b`.
pub(crate) fn plain(name: &str) -> String {
    name.split('/').filter(|c| !c.is_empty() && *c != ".").collect::<Vec<_>>().join("/")
}

/// [`plain`], for a name that can be a file in the folder: `None` for an absolute name
/// (`sha256sum -c` checks `/model.safetensors`, not the folder's) or one that ends with `/`
/// or `/.` (a folder's, which `sha256sum -c` cannot read).
pub(crate) fn relative(name: &str) -> Option<String> {
    let folder = name.ends_with('/') || name == "." || name.ends_with("/.");
    (!name.starts_with('/') && !folder).then(|| plain(name))
}

/// Text from a `SHA256SUMS` file for an error message: escaped, and cut to 100 characters
/// (a line may be megabytes long).
pub(crate) fn shown(text: &str) -> String {
    let cut: String = text.chars().take(100).collect();
    let more = if cut.len() < text.len() { "..." } else { "" };
    format!("{}{more}", cut.escape_debug())
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
    /// The index's, where the checkpoint has one and `SHA256SUMS` lists it.
    pub index: Option<(Sha256, DigestSource)>,
    /// The `SHA256SUMS` file looked in (whether or not it exists), for errors that say
    /// where no digest was found.
    pub sums_file: PathBuf,
}

/// The expected digests of `plan`'s shards. A `SHA256SUMS` that exists but cannot be read
/// as coreutils writes it, or that lists a shard twice with two digests, is an error
/// (rather than a file whose digests are silently not used).
pub fn expected(plan: &tensorlift_format::LoadPlan) -> Result<Expected, SumsError> {
    let sums_file = plan.root().join(SUMS_FILE);
    let listed = read_sums(&sums_file)?.unwrap_or_default();
    expected_from(plan, &listed, sums_file, false)
}

/// [`expected`], from the entries of the `SHA256SUMS` at `sums_file` (read already: a
/// remote checkpoint's is fetched from its store).
pub(crate) fn expected_from(
    plan: &tensorlift_format::LoadPlan,
    listed: &[Line],
    sums_file: PathBuf,
    remote: bool,
) -> Result<Expected, SumsError> {
    let mut by_name: std::collections::HashMap<String, Sha256> = std::collections::HashMap::new();
    for (line, name, digest) in listed {
        // An absolute name is not the folder's file: it is not matched.
        let Some(key) = relative(name) else { continue };
        if let Some(other) = by_name.insert(key, *digest) {
            if other != *digest {
                return Err(SumsError {
                    file: sums_file.clone(),
                    line: *line,
                    message: format!("'{}' is listed twice, with two digests", shown(name)),
                });
            }
        }
    }
    let mut shards = Vec::with_capacity(plan.shards().len());
    for s in plan.shards() {
        let listed = std::iter::once(&s.name).chain(&s.aliases).find_map(|n| by_name.get(&plain(n)));
        // A remote shard's path is its URL: no hub cache blob (nor anything local) it is.
        let hub = if remote { None } else { hub_blob_digest(&s.path) };
        let found = match (hub, listed) {
            // Both say: they must agree.
            (Some(hub), Some(sums)) if hub != *sums => {
                return Err(SumsError {
                    file: sums_file.clone(),
                    line: 0,
                    message: format!(
                        "'{}' is listed with {sums}, but the hub cache blob it is, {}, is named {hub}",
                        s.name.escape_debug(),
                        s.path.display()
                    ),
                })
            }
            (Some(hub), _) => Some((hub, DigestSource::HubBlob(s.path.clone()))),
            (None, Some(d)) => Some((*d, DigestSource::SumsFile(sums_file.clone()))),
            (None, None) => None,
        };
        shards.push(found);
    }
    let index = plan.index_file().and_then(|p| {
        let name = p.strip_prefix(plan.root()).unwrap_or(p).to_string_lossy().into_owned();
        relative(&name).and_then(|n| by_name.get(&n)).map(|d| (*d, DigestSource::SumsFile(sums_file.clone())))
    });
    Ok(Expected { shards, index, sums_file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_parse_and_format_as_coreutils() {
        let d = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let text = format!(
            "{d}  a.safetensors\n{}  b c\r\n\n# a comment\n\\{d}  x\\\\y\\nz\nSHA256 (t) = {d}\n{d} *bin\n  {d}  one\nSHA256(u)={d}\n",
            d.to_uppercase()
        );
        let got = parse_sums(&text, Path::new("S")).unwrap();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a.safetensors", "b c", "x\\y\nz", "t", "bin", "one", "u"]);
        assert!(got.iter().all(|(_, g)| g.to_string() == d));
        // BSD's reversed form (one blank), as the first line sets it for the file: then a
        // name may start with a space or `*` (as `sha256sum -c` reads such a file).
        let text = format!("{d} a\n{d}  b\n{d} *c\n{d}\ttab\n");
        let got = parse_sums(&text, Path::new("S")).unwrap();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", " b", "*c", "tab"]);
        let entries = vec![("a".to_owned(), d.parse().unwrap()), ("x\\y\nz".to_owned(), d.parse().unwrap())];
        assert_eq!(format_sums(&entries), format!("{d}  a\n\\{d}  x\\\\y\\nz\n"));
        assert_eq!(parse_sums(&format_sums(&entries), Path::new("S")).unwrap(), entries);
    }

    #[test]
    fn a_line_whose_name_is_not_utf8_sets_the_form_and_names_nothing() {
        let d = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let bytes = [format!("{d} caf").as_bytes(), b"\xe9\n", format!("{d}  m.safetensors\n").as_bytes()].concat();
        let (lines, form) = parse_sums_bytes(&bytes, Path::new("S")).unwrap();
        // As coreutils reads it: one-space form, so the second name starts with a space.
        assert_eq!(form, Some(true));
        assert_eq!(lines.iter().map(|(l, n, _)| (*l, n.as_str())).collect::<Vec<_>>(), [(2, " m.safetensors")]);
    }

    #[test]
    fn a_folders_name_is_no_files() {
        for name in ["m/", "m/.", ".", "/m", "a/b/."] {
            assert_eq!(relative(name), None, "{name}");
        }
        assert_eq!(relative("./a//b/./m.safetensors").as_deref(), Some("a/b/m.safetensors"));
    }

    #[test]
    fn a_byte_not_utf8_in_a_digest_is_no_digest() {
        let d = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        for at in [0, 40, 63] {
            let mut line = format!("{d}  m.safetensors\n").into_bytes();
            line[at] = 0xff;
            let e = parse_sums_bytes(&line, Path::new("S")).unwrap_err();
            assert_eq!(e.line, 1, "{e}");
            assert!(e.message.ends_with("is not a SHA-256 digest (64 hex digits)"), "{at}: {e}");
        }
    }

    #[test]
    fn malformed_sums_lines_are_refused_by_line() {
        let d = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let cases = [
            (format!("{d}  ok\nshort  x\n"), 2, "shorter than a digest"),
            (format!("{d}x\n"), 1, "the digest is not followed by a blank"),
            (format!("{}g  x\n", &d[..63]), 1, "is not a SHA-256 digest"),
            // Not hex, and not ASCII: at the digest's end, and early (where byte 64 falls in
            // the name).
            (format!("{}\u{e9}  x\n", &d[..63]), 1, "is not a SHA-256 digest"),
            (format!("{}\u{e9}{}  x\n", &d[..9], &d[11..]), 1, "is not a SHA-256 digest"),
            (format!("{d} \n"), 1, "no file name"),
            (format!("{d}  a\n{d} b\n"), 2, "one space between digest and name, after lines with two"),
            (format!("\\{d}  a\\qb\n"), 1, "unknown escape '\\q'"),
            ("SHA256 (x = 00\n".to_owned(), 1, "a tagged line is"),
            // Blanks around `=` are spaces and tabs only, as coreutils takes them.
            (format!("SHA256 (x)\u{b}= {d}\n"), 1, "a tagged line is"),
            (format!("SHA256 (x) =\u{a0}{d}\n"), 1, "is not a SHA-256 digest"),
        ];
        for (text, line, message) in cases {
            let e = parse_sums(&text, Path::new("SUMS")).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.message.contains(message), "{text:?}: {e}");
        }
    }
}
