//! Text output that a checkpoint cannot take over.
//!
//! Tensor names, file names and metadata come from untrusted files. Printed raw, a name can
//! hold terminal escape sequences, or a newline followed by a fake `error:` line. Every such
//! string goes through [`printable`] in text output (JSON output is escaped by its encoder).

use std::path::Path;

pub use tensorlift::terminal::{is_unsafe, printable};

/// Writes `value` as pretty JSON with every [unsafe](is_unsafe) character escaped as
/// `\uXXXX`, and a final newline.
pub fn write_json<T: serde::Serialize + ?Sized>(out: &mut dyn std::io::Write, value: &T) -> std::io::Result<()> {
    let mut ser =
        serde_json::Serializer::with_formatter(&mut *out, SafePretty(serde_json::ser::PrettyFormatter::new()));
    // Keep an I/O error's kind (a closed pipe is a quiet exit, see main).
    value.serialize(&mut ser).map_err(|e| match e.io_error_kind() {
        Some(kind) => std::io::Error::from(kind),
        None => std::io::Error::other(e),
    })?;
    writeln!(out)
}

/// serde_json's pretty formatter, escaping what it leaves raw.
struct SafePretty(serde_json::ser::PrettyFormatter<'static>);

impl serde_json::ser::Formatter for SafePretty {
    fn write_string_fragment<W: ?Sized + std::io::Write>(&mut self, w: &mut W, fragment: &str) -> std::io::Result<()> {
        let mut rest = fragment;
        while let Some((i, c)) = rest.char_indices().find(|&(_, c)| is_unsafe(c)) {
            w.write_all(&rest.as_bytes()[..i])?;
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                write!(w, "\\u{:04x}", u)?;
            }
            rest = &rest[i + c.len_utf8()..];
        }
        w.write_all(rest.as_bytes())
    }
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_array(w)
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_array(w)
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        self.0.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_array_value(w)
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_object(w)
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_object(w)
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        self.0.begin_object_key(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_object_value(w)
    }
}

/// A memory size in text output, always in binary units (KiB, MiB, GiB, TiB): memory
/// (device memory, pinned staging, limits) is sized in powers of two. Data sizes and
/// speeds are in decimal GB and GB/s, as storage and links are.
pub fn memory(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A path for text output: lossy UTF-8, control characters escaped.
pub fn path(p: &Path) -> String {
    printable(&p.to_string_lossy()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("plain.weight"), "plain.weight");
        assert_eq!(
            printable("a\x1b[31mred\nerror: fake\r\t\u{7f}\u{9b}"),
            "a\\u{1b}[31mred\\nerror: fake\\r\\t\\u{7f}\\u{9b}"
        );
        assert_eq!(printable("ünïcödé ✓"), "ünïcödé ✓");
        assert_eq!(printable("a\u{202e}gnp.exe"), "a\\u{202e}gnp.exe");
        // Shown as nothing: a tag character, a variation selector, a soft hyphen, a filler.
        assert_eq!(printable("e\u{e0041}tag"), "e\\u{e0041}tag");
        assert_eq!(printable("a\u{fe0f}\u{ad}\u{3164}b"), "a\\u{fe0f}\\u{ad}\\u{3164}b");
    }

    #[test]
    fn json_escapes_what_serde_json_leaves_raw() {
        let mut out = Vec::new();
        super::write_json(&mut out, &serde_json::json!({"n": "a\u{9b}31m\u{7f}\u{202e}x\n", "k\u{200b}": 1})).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.is_ascii(), "{text}");
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["n"], "a\u{9b}31m\u{7f}\u{202e}x\n");
        assert_eq!(back["k\u{200b}"], 1);
    }
}
