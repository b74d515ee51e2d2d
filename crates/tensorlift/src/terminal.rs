//! Text for a terminal that a checkpoint cannot take over, for the command-line tools
//! (`tensorlift`, `loader-bench`): tensor names, file names, metadata and the errors that
//! quote them come from untrusted files, and printed raw, a name can hold terminal escape
//! sequences, or a newline followed by a fake `error:` line.

use std::borrow::Cow;
use std::fmt::Write;

/// Characters a terminal or a viewer acts on rather than shows: control characters (C0,
/// DEL, C1), the invisible format characters that reorder or hide text (bidirectional
/// overrides and isolates, zero-width characters, line and paragraph separators), and the
/// other characters Unicode says to show as nothing (its default-ignorable code points:
/// the soft hyphen, fillers, variation selectors, the tag characters of "ASCII
/// smuggling"), by which two names that differ would print alike.
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00ad}'
                | '\u{034f}'
                | '\u{061c}'
                | '\u{115f}'..='\u{1160}'
                | '\u{17b4}'..='\u{17b5}'
                | '\u{180b}'..='\u{180f}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{206f}'
                | '\u{3164}'
                | '\u{fe00}'..='\u{fe0f}'
                | '\u{feff}'
                | '\u{ffa0}'
                | '\u{fff0}'..='\u{fffb}'
                | '\u{1bca0}'..='\u{1bca3}'
                | '\u{1d173}'..='\u{1d17a}'
                | '\u{e0000}'..='\u{e0fff}'
        )
}

/// `s` with every [unsafe](is_unsafe) character written as an escape: `\n`, `\t`, `\r`, or
/// `\u{1b}`; backslashes are left as they are.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if is_unsafe(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}
