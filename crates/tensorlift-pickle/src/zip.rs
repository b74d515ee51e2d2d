//! The zip container `torch.save` writes (PyTorch >= 1.6): stored entries only, found
//! through the central directory, zip64 included. Compressed or encrypted entries are
//! refused: `torch.save` never writes them, and refusing them rules out zip bombs.

use std::collections::BTreeMap;

use crate::error::ErrorKind;
use crate::source::{read_vec, ReadAt};

const EOCD: u32 = 0x0605_4b50;
const ZIP64_LOCATOR: u32 = 0x0706_4b50;
const ZIP64_EOCD: u32 = 0x0606_4b50;
const CENTRAL: u32 = 0x0201_4b50;
const LOCAL: u32 = 0x0403_4b50;

/// Where one entry's bytes lie in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Offset of the first data byte.
    pub offset: u64,
    /// Bytes of data.
    pub len: u64,
    /// Its name, as the archive spells it.
    pub name: String,
    /// Another entry whose name differs from this one's only in case: PyTorch's reader,
    /// which finds records ignoring case, could read either, so such a record is not read
    /// ([`find`]).
    pub twin: Option<String>,
}

/// The record `name` (found ignoring ASCII case, as PyTorch finds it); an error where two
/// entries differ only in case.
pub fn find<'a>(entries: &'a BTreeMap<String, Entry>, name: &str) -> Result<Option<&'a Entry>, ErrorKind> {
    match entries.get(&key(name)) {
        Some(Entry { name, twin: Some(twin), .. }) => Err(bad(format!(
            "entries '{name}' and '{twin}' differ only in case: PyTorch's reader, which finds records ignoring case, \
             could read either"
        ))),
        found => Ok(found),
    }
}

fn bad(message: impl Into<String>) -> ErrorKind {
    ErrorKind::Zip(message.into())
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2).map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).map_or(0, |s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])))
}

/// The name [`entries`] keys a record by.
pub fn key(name: &str) -> String {
    name.to_ascii_lowercase()
}

/// Whether the source starts like a zip archive.
pub fn is_zip<R: ReadAt + ?Sized>(src: &R) -> bool {
    let mut m = [0u8; 4];
    src.read_exact_at(&mut m, 0).is_ok() && u32::from_le_bytes(m) == LOCAL
}

/// An archive's entries ([`entries`]).
#[derive(Debug)]
pub struct Entries {
    /// By name, in ASCII lower case (PyTorch's reader finds records ignoring case: look
    /// names up with [`key`]).
    pub by_key: BTreeMap<String, Entry>,
    /// The folder of the first entry in the central directory, with its `/` (PyTorch's
    /// reader takes it for the archive's); `None` where that entry is in no folder, or there
    /// is none.
    pub folder: Option<String>,
    /// The first name, of all of them (spellings that differ only in case included), that
    /// is not under `folder` as written: PyTorch lists every record and refuses such a one.
    /// (Where `folder` is `None`, the first entry's name.)
    pub outside: Option<String>,
}

/// The archive's entries. `max_entries` and `max_directory` bound the memory the central
/// directory may take.
pub fn entries<R: ReadAt + ?Sized>(src: &R, max_entries: usize, max_directory: u64) -> Result<Entries, ErrorKind> {
    let len = src.size()?;
    // The end record is in the last 22 + 65535 bytes (its comment is at most 65535).
    let tail_len = len.min(22 + 65535);
    let tail = read_vec(src, len - tail_len, tail_len)?;
    let at = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&i| u32_at(&tail, i) == EOCD)
        .ok_or_else(|| bad("no end of central directory record (truncated?)"))?;
    let eocd_pos = len - tail_len + at as u64;
    let mut count = u64::from(u16_at(&tail, at + 10));
    let mut dir_len = u64::from(u32_at(&tail, at + 12));
    let mut dir_at = u64::from(u32_at(&tail, at + 16));
    // Zip64: a locator just before the end record points to the zip64 end record, which
    // PyTorch's reader (miniz) then takes the directory from, whatever the end record says
    // (`torch.save` always writes one). Where the end record's own fields are not the zip64
    // marks, they must agree with it: an archive that shows two directories to two readers
    // is refused.
    // As miniz reads them: a locator that says other than one disk is refused; a zip64 end
    // record without its signature is ignored, and so is a missing one: the end record's
    // fields are then used as they are (Python's zipfile writes 65,535 entries so).
    let locator = eocd_pos.checked_sub(20).and_then(|loc| read_vec(src, loc, 20).ok());
    let zip64 = match locator.filter(|l| u32_at(l, 0) == ZIP64_LOCATOR) {
        Some(l) if u32_at(&l, 16) != 1 => return Err(bad("multi-disk archives are not supported (zip64 locator)")),
        Some(l) => read_vec(src, u64_at(&l, 8), 56).ok().filter(|z| u32_at(z, 0) == ZIP64_EOCD),
        None => None,
    };
    // (Without zip64 records, a field that holds a zip64 mark is taken as it is: a directory
    // it misplaces is refused below, out of the file or malformed.)
    // miniz reads the disk numbers and the entries on this disk from the zip64 end record
    // where there is one (the plain record's are then not looked at), else from the plain
    // one: this disk and the directory's both 0 (PyTorch's miniz refuses 1 and 1 too), and
    // the entries on this disk all of them.
    let (disks, on_disk) = match &zip64 {
        Some(z) => ((u64::from(u32_at(z, 16)), u64::from(u32_at(z, 20))), u64_at(z, 24) == u64_at(z, 32)),
        None => (
            (u64::from(u16_at(&tail, at + 4)), u64::from(u16_at(&tail, at + 6))),
            u16_at(&tail, at + 8) == u16_at(&tail, at + 10),
        ),
    };
    if disks != (0, 0) {
        return Err(bad("multi-disk archives are not supported"));
    }
    if !on_disk {
        return Err(bad("the end record's entry counts disagree"));
    }
    if let Some(z) = zip64 {
        let (count64, len64, at64) = (u64_at(&z, 32), u64_at(&z, 40), u64_at(&z, 48));
        let disagree = (count != 0xFFFF && count != count64)
            || (dir_len != 0xFFFF_FFFF && dir_len != len64)
            || (dir_at != 0xFFFF_FFFF && dir_at != at64);
        if disagree {
            return Err(bad(format!(
                "the end record ({count} entries, {dir_len} bytes at {dir_at}) and the zip64 end record ({count64} \
                 entries, {len64} bytes at {at64}) name two central directories"
            )));
        }
        (count, dir_len, dir_at) = (count64, len64, at64);
    }
    if count > max_entries as u64 {
        return Err(ErrorKind::Limit {
            what: format!("{count} zip entries"),
            limit: max_entries as u64,
            setting: "max_tensors",
        });
    }
    if dir_len > max_directory {
        return Err(ErrorKind::Limit {
            what: format!("a {dir_len}-byte zip directory"),
            limit: max_directory,
            setting: "max_pickle_bytes",
        });
    }
    let dir = read_vec(src, dir_at, dir_len).map_err(|_| bad("central directory out of the file"))?;
    let mut out = BTreeMap::new();
    let (mut folder, mut outside): (Option<String>, Option<String>) = (None, None);
    let mut spans: Vec<(u64, u64, String)> = Vec::new();
    let mut p = 0usize;
    for index in 0..count as usize {
        if u32_at(&dir, p) != CENTRAL || p + 46 > dir.len() {
            return Err(bad(format!("central directory entry at {} is malformed", dir_at + p as u64)));
        }
        let flags = u16_at(&dir, p + 8);
        let method = u16_at(&dir, p + 10);
        let mut csize = u64::from(u32_at(&dir, p + 20));
        let mut usize_ = u64::from(u32_at(&dir, p + 24));
        let name_len = usize::from(u16_at(&dir, p + 28));
        let extra_len = usize::from(u16_at(&dir, p + 30));
        let comment_len = usize::from(u16_at(&dir, p + 32));
        let mut local = u64::from(u32_at(&dir, p + 42));
        let name_bytes = dir.get(p + 46..p + 46 + name_len).ok_or_else(|| bad("entry name runs past the directory"))?;
        let name = std::str::from_utf8(name_bytes).map_err(|_| bad("entry name is not UTF-8"))?.to_owned();
        // No lookup of PyTorch's (by C string) can name such an entry: it could only be
        // taken for another.
        if name.contains('\0') {
            return Err(bad(format!("entry name '{}' holds a NUL", name.escape_debug())));
        }
        if index == 0 {
            folder = name.find('/').map(|slash| name[..=slash].to_owned());
        }
        if outside.is_none() && !folder.as_deref().is_some_and(|f| name.starts_with(f)) {
            outside = Some(name.clone());
        }
        let extra = dir
            .get(p + 46 + name_len..p + 46 + name_len + extra_len)
            .ok_or_else(|| bad("extra field runs past the directory"))?;
        // Zip64 sizes and offset, for the fields that hold 0xFFFFFFFF, in this order, from
        // the first zip64 field only, as miniz (torch's reader) takes them: a second one
        // must not make us read other bytes than torch. Where one is needed, the extra
        // fields must fit their area, as miniz requires.
        let needs_zip64 = [usize_, csize, local].contains(&0xFFFF_FFFF);
        let mut e = 0;
        while e < extra.len() {
            if needs_zip64 && (e + 4 > extra.len() || e + 4 + usize::from(u16_at(extra, e + 2)) > extra.len()) {
                return Err(bad(format!("entry '{name}': an extra field runs past its area")));
            }
            if e + 4 > extra.len() {
                break;
            }
            let (id, n) = (u16_at(extra, e), usize::from(u16_at(extra, e + 2)));
            if id == 1 {
                let mut q = e + 4;
                for field in [&mut usize_, &mut csize, &mut local] {
                    if *field == 0xFFFF_FFFF {
                        if q + 8 > (e + 4 + n).min(extra.len()) {
                            return Err(bad(format!("entry '{name}': zip64 extra field too short")));
                        }
                        *field = u64_at(extra, q);
                        q += 8;
                    }
                }
                break;
            }
            e += 4 + n;
        }
        if flags & 1 != 0 {
            return Err(bad(format!("entry '{name}' is encrypted")));
        }
        if method != 0 || csize != usize_ {
            return Err(bad(format!(
                "entry '{name}' is compressed (method {method}): torch.save stores entries uncompressed, and compressed ones are refused"
            )));
        }
        let lh = read_vec(src, local, 30).map_err(|_| bad(format!("entry '{name}': local header out of the file")))?;
        if u32_at(&lh, 0) != LOCAL {
            return Err(bad(format!("entry '{name}': no local header at {local}")));
        }
        // The local header names the same entry: no entry may borrow another's bytes.
        let local_name_len = u64::from(u16_at(&lh, 26));
        let local_name = read_vec(src, local + 30, local_name_len)
            .map_err(|_| bad(format!("entry '{name}': local name out of the file")))?;
        if local_name != name_bytes {
            return Err(bad(format!("entry '{name}': its local header names another entry")));
        }
        let data = local + 30 + local_name_len + u64::from(u16_at(&lh, 28)); // local + 30 <= len: read above
                                                                             // Entries lie before the central directory, which they may not overlap.
        if data.checked_add(csize).is_none_or(|end| end > dir_at) {
            return Err(bad(format!(
                "entry '{name}': {csize} bytes at {data} run into the central directory at {dir_at}"
            )));
        }
        spans.push((local, data + csize, name.clone()));
        // PyTorch's reader finds a record by its name ignoring ASCII case: two names that
        // differ only so are kept as one, marked (which of them it reads is not ours to
        // guess: such a record is refused where it is looked up).
        match out.entry(key(&name)) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(Entry { offset: data, len: csize, name: name.clone(), twin: None });
            }
            std::collections::btree_map::Entry::Occupied(o) if o.get().name == name => {
                return Err(bad(format!("entry '{name}' appears twice")));
            }
            std::collections::btree_map::Entry::Occupied(mut o) => {
                o.get_mut().twin.get_or_insert_with(|| name.clone());
            }
        }
        p += 46 + name_len + extra_len + comment_len;
    }
    // No two entries (local header through data) overlap.
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(bad(format!("entries '{}' and '{}' overlap", w[0].2, w[1].2)));
        }
    }
    Ok(Entries { by_key: out, folder, outside })
}
