//! Text output that a checkpoint cannot take over.
//!
//! Tensor names, file names and metadata come from untrusted files. Printed raw, a name can
//! hold terminal escape sequences, or a newline followed by a fake `error:` line. Every such
//! string goes through [`printable`] in text output (JSON output is escaped by its encoder).

use std::borrow::Cow;
use std::fmt::Write;
use std::path::Path;

/// `s` with every control character (C0, DEL, C1) written as an escape: `\n`, `\t`, `\r`,
/// or `\u{1b}`; backslashes are left as they are.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
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
    }
}
