//! From a pickled `state_dict` to tensors with byte ranges in the file.

use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

use tensorlift_format::Dtype;

use crate::error::{ErrorKind, TorchError};
use crate::source::{read_vec, ReadAt};
use crate::vm::{self, Persistent, StorageRef, Value, Vm, VmLimits};
use crate::zip;

/// Bounds on what reading one file may allocate, as a safetensors header has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Bytes of pickle (and of zip directory) read into memory (default 256 MiB).
    pub max_pickle_bytes: u64,
    /// Tensors (and zip entries) in one file (default 1,000,000).
    pub max_tensors: usize,
    /// Entries on the pickle's stack and mark stack (default 1,000,000).
    pub max_pickle_stack: usize,
    /// Lists, tuples and dicts one file's pickles may build (default 4,000,000: about
    /// 130 MB; a state_dict builds about five per tensor).
    pub max_pickle_containers: usize,
    /// Bytes of tensors (made contiguous) per byte of file (default 16): overlapping views
    /// of one storage cannot make a small file expand without bound. Tied weights count
    /// once per name. It bounds, apart, the bytes that gathering the strided views reads
    /// (each view's span where read whole, else a window or run per run): many views of one
    /// storage, each read on its own, cannot make a small file read without bound.
    pub max_expansion: u64,
    /// Bytes the pickle's values (and the frames its marks open) may take in memory per byte
    /// of pickle read (default 16,
    /// as a safetensors header's parse is counted, and 1 MiB more): a pickle that builds
    /// more than that is refused as it runs. A `torch.save` state_dict takes 11 to 14
    /// (short names the most; `tests/memory` measures it).
    pub pickle_memory_per_byte: u64,
}

impl Limits {
    /// With this many bytes of pickle at most.
    pub fn max_pickle_bytes(mut self, bytes: u64) -> Self {
        self.max_pickle_bytes = bytes;
        self
    }
    /// With this many tensors at most.
    pub fn max_tensors(mut self, n: usize) -> Self {
        self.max_tensors = n;
        self
    }
    /// With at most this many lists, tuples and dicts built.
    pub fn max_pickle_containers(mut self, n: usize) -> Self {
        self.max_pickle_containers = n;
        self
    }
    /// With at most this many tensor bytes (and bytes read gathering strided views) per
    /// file byte.
    pub fn max_expansion(mut self, n: u64) -> Self {
        self.max_expansion = n;
        self
    }
    /// With a pickle stack this deep at most.
    pub fn max_pickle_stack(mut self, n: usize) -> Self {
        self.max_pickle_stack = n;
        self
    }
    /// With at most this many bytes of values per byte of pickle.
    pub fn pickle_memory_per_byte(mut self, n: u64) -> Self {
        self.pickle_memory_per_byte = n;
        self
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pickle_bytes: 256 << 20,
            max_tensors: 1_000_000,
            max_pickle_stack: 1_000_000,
            max_pickle_containers: 4_000_000,
            max_expansion: 16,
            pickle_memory_per_byte: 16,
        }
    }
}

/// Which of `torch.save`'s layouts a file has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A zip archive (PyTorch >= 1.6, the default since).
    Zip,
    /// The legacy layout: pickles followed by raw storages (`_use_new_zipfile_serialization=False`).
    Legacy,
}

/// One storage's bytes in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Storage {
    /// The element type its tensors have.
    pub dtype: Dtype,
    /// Offset of its first byte in the file.
    pub offset: u64,
    /// Its bytes.
    pub len: u64,
}

/// One tensor of the state_dict: a view of a storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorchTensor {
    /// Its key in the state_dict.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Strides, in elements.
    pub strides: Vec<usize>,
    /// The storage it views (a key of [`TorchCheckpoint::storages`]).
    pub storage: String,
    /// Where it starts in the storage, in elements.
    pub storage_offset: usize,
}

impl TorchTensor {
    /// Elements (saturating: the product of a shape read from a file fits, checked when
    /// read, but the fields are public).
    pub fn numel(&self) -> usize {
        if self.shape.contains(&0) {
            0
        } else {
            self.shape.iter().fold(1usize, |n, &d| n.saturating_mul(d))
        }
    }
    /// Bytes once made contiguous (saturating).
    pub fn nbytes(&self) -> usize {
        self.numel().saturating_mul(self.dtype.bitsize()) / 8
    }
    /// Whether its elements lie in row-major order with no gaps (dimensions of size 1 may
    /// have any stride).
    pub fn is_contiguous(&self) -> bool {
        if self.numel() == 0 {
            return true;
        }
        let mut expect = 1usize;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != expect {
                return false;
            }
            expect = expect.saturating_mul(d);
        }
        true
    }
    /// `[first, last]` elements of the storage it touches; `None` when it has no elements.
    pub fn element_span(&self) -> Option<(usize, usize)> {
        if self.numel() == 0 {
            return None;
        }
        let last = self
            .shape
            .iter()
            .zip(&self.strides)
            .fold(0usize, |a, (&d, &s)| a.saturating_add((d - 1).saturating_mul(s)));
        Some((self.storage_offset, self.storage_offset.saturating_add(last)))
    }
}

/// A PyTorch checkpoint's tensors, ready to read.
#[derive(Debug, Clone)]
pub struct TorchCheckpoint {
    /// The layout.
    pub layout: Layout,
    /// The tensors, in the state_dict's order.
    pub tensors: Vec<TorchTensor>,
    /// Every storage a tensor views, by key.
    pub storages: BTreeMap<String, Storage>,
    /// Keys of the state_dict whose values are not tensors (skipped).
    pub skipped: Vec<String>,
    /// Bytes of pickle read and run: what its names and shapes were made from, wherever in
    /// the file it lies (a zip may store its pickle after the tensors' data).
    pub pickle_bytes: u64,
}

impl TorchCheckpoint {
    /// Reads `src`, named `file` in errors: the layout, the pickle and every tensor's place.
    /// Nothing in the file is executed; tensor data is not read.
    pub fn read<R: ReadAt + ?Sized>(src: &R, file: &Path, limits: &Limits) -> Result<Self, TorchError> {
        read(src, limits).map_err(|kind| TorchError { file: file.to_owned(), kind })
    }

    /// The storage `t` is a view of.
    fn storage_of(&self, file: &Path, t: &TorchTensor) -> Result<&Storage, TorchError> {
        self.storages.get(&t.storage).ok_or_else(|| TorchError {
            file: file.to_owned(),
            kind: ErrorKind::Tensor { tensor: t.name.clone(), message: format!("storage '{}' is missing", t.storage) },
        })
    }

    /// Where a contiguous tensor's bytes lie in the file: `(offset, length)` (within its
    /// storage, which was checked against the file when the checkpoint was read; a file cut
    /// short since fails the read of them); `None` for a strided view (its bytes must be
    /// gathered) or an empty tensor.
    pub fn contiguous_range(&self, file: &Path, t: &TorchTensor) -> Result<Option<(u64, u64)>, TorchError> {
        let view = self.view(file, t)?;
        Ok((view.nbytes > 0 && t.is_contiguous()).then_some((view.start, view.nbytes)))
    }

    /// The tensor's bytes, contiguous, in the file's (little-endian) byte order. A
    /// contiguous tensor is one read. A strided view is gathered in the storage's order:
    /// one whose elements lie close together (the bytes from its first to its last element
    /// are at most its own size plus 8 MiB, as for a transpose or an `expand`) is read whole,
    /// once; one spread wider (a slice of a larger storage) is read through a window of at
    /// most 8 MiB that only moves forward, so that no byte of the file is read twice (but
    /// for a run that straddles a window's end). A view spread wide whose dimensions overlap
    /// or interleave (an `as_strided` view whose walk through the storage would go back) is
    /// refused.
    ///
    /// The memory it takes is [`TorchCheckpoint::gather_memory`]; memory is committed as it
    /// is touched, so a caller compares that with what the host has first.
    pub fn tensor_bytes<R: ReadAt + ?Sized>(
        &self,
        src: &R,
        file: &Path,
        t: &TorchTensor,
    ) -> Result<Vec<u8>, TorchError> {
        let err = |kind| TorchError { file: file.to_owned(), kind };
        let view = self.view(file, t)?;
        if view.nbytes == 0 {
            return Ok(Vec::new());
        }
        if t.is_contiguous() {
            return read_vec(src, view.start, view.nbytes).map_err(|e| err(e.into()));
        }
        let mut out = Vec::new();
        out.try_reserve_exact(view.nbytes as usize).map_err(|_| {
            err(ErrorKind::Tensor {
                tensor: t.name.clone(),
                message: format!("{} bytes could not be allocated", view.nbytes),
            })
        })?;
        out.resize(view.nbytes as usize, 0);
        gather_view(src, &view, t, GATHER_WINDOW, &mut out).map_err(|e| match e {
            Gather::Io(e) => err(e.into()),
            Gather::Overlapping => err(ErrorKind::Tensor { tensor: t.name.clone(), message: overlapping(&view) }),
        })?;
        Ok(out)
    }

    /// The host memory [`TorchCheckpoint::tensor_bytes`] takes for `t`: its bytes, and for a
    /// strided view read whole the bytes it spans, else a window.
    pub fn gather_memory(&self, file: &Path, t: &TorchTensor) -> Result<u64, TorchError> {
        let view = self.view(file, t)?;
        Ok(match () {
            _ if view.nbytes == 0 || t.is_contiguous() => view.nbytes,
            _ if view.dense(GATHER_WINDOW) => view.nbytes + view.span,
            _ => view.nbytes + GATHER_WINDOW as u64,
        })
    }

    /// Where `t`'s bytes lie, checked again against its storage (the fields are public).
    fn view(&self, file: &Path, t: &TorchTensor) -> Result<View, TorchError> {
        let st = self.storage_of(file, t)?;
        let bad = |message: &str| TorchError {
            file: file.to_owned(),
            kind: ErrorKind::Tensor { tensor: t.name.clone(), message: message.to_owned() },
        };
        if t.shape.len() != t.strides.len() {
            return Err(bad("its shape and strides differ in length"));
        }
        let es = (t.dtype.bitsize() / 8) as u64;
        if es == 0 {
            return Err(bad("its type is packed below a byte"));
        }
        let numel = if t.shape.contains(&0) {
            0
        } else {
            t.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64)).ok_or_else(|| bad("its size overflows"))?
        };
        let nbytes =
            numel.checked_mul(es).filter(|&n| usize::try_from(n).is_ok()).ok_or_else(|| bad("its size overflows"))?;
        if numel == 0 {
            return Ok(View { start: st.offset, nbytes: 0, span: 0, es: es as usize });
        }
        let last = t
            .shape
            .iter()
            .zip(&t.strides)
            .try_fold(t.storage_offset as u64, |at, (&d, &s)| at.checked_add((d as u64 - 1).checked_mul(s as u64)?))
            .and_then(|last| last.checked_add(1)?.checked_mul(es))
            .filter(|&end| end <= st.len)
            .ok_or_else(|| bad("its elements run past the end of its storage"))?;
        let first = t.storage_offset as u64 * es;
        let start = st.offset.checked_add(first).ok_or_else(|| bad("its offset overflows"))?;
        Ok(View { start, nbytes, span: last - first, es: es as usize })
    }
}

/// Where a tensor's elements lie in the file.
struct View {
    /// File offset of its first element.
    start: u64,
    /// Its bytes, contiguous.
    nbytes: u64,
    /// The bytes from its first element to the end of its last.
    span: u64,
    /// Bytes per element.
    es: usize,
}

impl View {
    /// Whether its elements lie close enough together to be read whole (gathering through a
    /// window of `window` bytes).
    fn dense(&self, window: usize) -> bool {
        self.span <= self.nbytes + window as u64
    }
}

fn overlapping(view: &View) -> String {
    format!(
        "a view whose dimensions overlap or interleave, spread over {} bytes of its storage for {} bytes of \
         its own, is not gathered (it would be read back and forth): save a contiguous copy of it (`.contiguous()`)",
        view.span, view.nbytes
    )
}

enum Gather {
    Io(std::io::Error),
    Overlapping,
}

/// The most bytes of a storage held at once while a strided view spread wide is gathered.
const GATHER_WINDOW: usize = 8 << 20;

/// Gathers a strided view (`view` of `t`) into `out`: read whole when dense, else through a
/// forward-moving window of `window` bytes (refused where its elements overlap).
fn gather_view<R: ReadAt + ?Sized>(
    src: &R,
    view: &View,
    t: &TorchTensor,
    window: usize,
    out: &mut [u8],
) -> Result<(), Gather> {
    let dims = walk_dims(t);
    if view.dense(window) {
        let whole = read_vec(src, view.start, view.span).map_err(Gather::Io)?;
        // Each run copied straight from memory.
        gather(&whole[..], 0, view.es, &dims, view.span as usize, 0, out).map_err(Gather::Io)
    } else if goes_back(&dims) {
        Err(Gather::Overlapping)
    } else {
        gather(src, view.start, view.es, &dims, view.span as usize, window, out).map_err(Gather::Io)
    }
}

/// The dimensions of `t` that move, as `(size, stride in the storage, stride in the output)`
/// in elements, outermost (largest storage stride) first.
fn walk_dims(t: &TorchTensor) -> Vec<(usize, usize, usize)> {
    let mut dst_stride = 1usize;
    let mut dims: Vec<(usize, usize, usize)> = Vec::with_capacity(t.shape.len());
    for (&n, &s) in t.shape.iter().zip(&t.strides).rev() {
        if n > 1 {
            dims.push((n, s, dst_stride));
        }
        dst_stride *= n;
    }
    dims.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)));
    dims
}

/// The most bytes [`gather_view`] reads for a view whose dimensions that move are `dims`:
/// its span, read whole where dense; else a window (or the run, where longer) at most for
/// each run, and no more than its span and a run for each window (a window's read begins at
/// a run inside the last).
fn gather_reads(view: &View, dims: &[(usize, usize, usize)], window: usize) -> u64 {
    if view.dense(window) {
        return view.span;
    }
    let run = match dims.last() {
        Some(&(n, 1, 1)) => n as u64,
        _ => 1,
    };
    let runs = (view.nbytes / view.es as u64 / run).max(1);
    // (A run longer than a window is read on its own.)
    let per_run = (window as u64).max(run.saturating_mul(view.es as u64));
    runs.saturating_mul(per_run).min(view.span.saturating_add(view.nbytes))
}

/// Whether a walk over `dims` (outermost first) goes back in the storage: a dimension's
/// stride is less than the extent of the dimensions inside it.
fn goes_back(dims: &[(usize, usize, usize)]) -> bool {
    let mut extent = 0usize; // elements spanned by the dimensions inside, minus one
    for &(n, s, _) in dims.iter().rev() {
        if s < extent {
            return true;
        }
        extent += (n - 1) * s;
    }
    false
}

/// Gathers the elements (`es` bytes each) of a view, whose dimensions that move are `dims`
/// (from [`walk_dims`]) and whose first element is at file offset `base`, into `out` in
/// row-major order. The bytes it touches end at `span_end` (relative to `base`). Elements
/// are visited in storage order (dimensions sorted by stride), and a row of the output that
/// is contiguous in the storage is one copy; runs shorter than `window` are copied from a
/// window of the file read at the first run outside it (with `window` 0, each run is read
/// on its own).
fn gather<R: ReadAt + ?Sized>(
    src: &R,
    base: u64,
    es: usize,
    dims: &[(usize, usize, usize)],
    span_end: usize,
    window_len: usize,
    out: &mut [u8],
) -> std::io::Result<()> {
    let mut dims = dims.to_vec();
    // The innermost dimension is one run when it is contiguous on both sides.
    let run = match dims.last() {
        Some(&(n, 1, 1)) => {
            dims.pop();
            n
        }
        _ => 1,
    };
    let run_bytes = run * es;
    let mut window: Vec<u8> = Vec::new();
    let (mut win_start, mut win_len) = (0usize, 0usize);
    let mut idx = vec![0usize; dims.len()];
    let (mut at, mut to) = (0usize, 0usize);
    loop {
        let dst = &mut out[to * es..to * es + run_bytes];
        if run_bytes >= window_len {
            // A long run goes straight from the file to its place.
            src.read_exact_at(dst, base + at as u64)?;
        } else {
            if at < win_start || at + run_bytes > win_start + win_len {
                win_start = at;
                win_len = window_len.min(span_end - at);
                window.resize(win_len, 0);
                src.read_exact_at(&mut window, base + at as u64)?;
            }
            dst.copy_from_slice(&window[at - win_start..at - win_start + run_bytes]);
        }
        // The next run: an odometer over the remaining dimensions, innermost last.
        let mut k = dims.len();
        loop {
            if k == 0 {
                return Ok(());
            }
            k -= 1;
            let (n, s, d) = dims[k];
            idx[k] += 1;
            at += s * es;
            to += d;
            if idx[k] < n {
                break;
            }
            idx[k] = 0;
            at -= n * s * es;
            to -= n * d;
        }
    }
}

fn vm_limits(l: &Limits) -> VmLimits {
    VmLimits { max_stack: l.max_pickle_stack }
}

fn read<R: ReadAt + ?Sized>(src: &R, limits: &Limits) -> Result<TorchCheckpoint, ErrorKind> {
    if zip::is_zip(src) {
        read_zip(src, limits)
    } else {
        let mut m = [0u8; 2];
        src.read_exact_at(&mut m, 0).map_err(|_| ErrorKind::NotTorch("the file is empty or too short".into()))?;
        if m[0] != 0x80 || !(2..=5).contains(&m[1]) {
            return Err(ErrorKind::NotTorch(
                "neither a zip archive nor a pickle (a tar archive from PyTorch < 0.4 is not read)".into(),
            ));
        }
        read_legacy(src, limits)
    }
}

/// Persistent ids of the zip layout: `('storage', class, key, location, numel)`.
struct ZipStorages {
    seen: BTreeMap<String, Rc<StorageRef>>,
}

/// A legacy persistent id's view: `(view_key, offset, size)` in elements.
type ViewId = Option<(String, u64, u64)>;

/// A storage's persistent id: the storage as named (never a view), and in a legacy file
/// the view it asks for. A new storage's bytes are counted against the pickle's budget.
fn storage_pid(vm: &mut Vm, pid: &Value, at: usize, legacy: bool) -> Result<(StorageRef, ViewId), ErrorKind> {
    let t = vm.tuple(pid).ok_or_else(|| ErrorKind::pickle(at, "persistent id is not a tuple"))?;
    let bad = |m: &str| ErrorKind::pickle(at, format!("persistent id: {m}"));
    match t.first() {
        Some(Value::Str(s)) if &**s == "storage" => {}
        _ => return Err(bad("not ('storage', ...)")),
    }
    let want = if legacy { 6 } else { 5 };
    if t.len() != want {
        return Err(bad(&format!("{} fields, expected {want}", t.len())));
    }
    let (dtype, untyped) = match t[1] {
        Value::Global(vm::Global::Storage(dtype)) => (dtype, false),
        Value::Global(vm::Global::UntypedStorage) if !legacy => (Dtype::U8, true),
        Value::Global(vm::Global::Unread(u)) => return Err(bad(&format!("{}, which PyTorch allows", u.what))),
        _ => return Err(bad("the storage type is not a torch storage class")),
    };
    let key = match &t[2] {
        // PyTorch looks a record up by a C string, which ends at a NUL: `"0\0x"` reads
        // `data/0`. Such a key is refused rather than read as either.
        Value::Str(s) if s.contains('\0') => return Err(bad("the key holds a NUL")),
        Value::Str(s) => Rc::clone(s),
        _ => return Err(bad("the key is not a string")),
    };
    let numel = match t[4] {
        Value::Int(n) if n >= 0 => n as u64,
        _ => return Err(bad("the size is not a non-negative int")),
    };
    let view = if legacy {
        match &t[5] {
            Value::None => None,
            v => match vm.tuple(v) {
                Some([Value::Str(k), Value::Int(off), Value::Int(n)]) if *off >= 0 && *n >= 0 => {
                    Some((Rc::clone(k), *off as u64, *n as u64))
                }
                _ => return Err(bad("the view is not (key, offset, size)")),
            },
        }
    } else {
        None
    };
    // Every id is charged for the keys it copies and looks up (a long key, kept in the memo
    // and named by many ids of a few bytes each, is work and memory each time), before they
    // are copied.
    let view_len = view.as_ref().map_or(0, |(k, _, _)| vm::heap(k.len()));
    vm.charge(STORAGE_COST + vm::heap(key.len()) + view_len)?;
    let view = view.map(|(k, off, n)| (k.to_string(), off, n));
    Ok((StorageRef { dtype, key: key.to_string(), numel, view: None, untyped }, view))
}

/// What a storage's description takes in memory (in its reference-counted box), besides
/// its key.
const STORAGE_COST: u64 = 16 + std::mem::size_of::<StorageRef>() as u64 + 16;

impl Persistent for ZipStorages {
    fn load(&mut self, vm: &mut Vm, pid: &Value, at: usize) -> Result<Value, ErrorKind> {
        let (s, _) = storage_pid(vm, pid, at, false)?;
        let s = match self.seen.get(&s.key) {
            // PyTorch keeps the first type it was named with; tensorlift refuses.
            Some(prev) if prev.dtype != s.dtype || prev.untyped != s.untyped => {
                return Err(ErrorKind::pickle(at, format!("storage '{}' is named with two types", s.key)));
            }
            // PyTorch keeps the first size it was named with, and so does tensorlift.
            Some(prev) => Rc::clone(prev),
            None => {
                let rc = Rc::new(s);
                self.seen.insert(rc.key.clone(), Rc::clone(&rc));
                rc
            }
        };
        Ok(Value::Storage(s))
    }
}

fn read_zip<R: ReadAt + ?Sized>(src: &R, limits: &Limits) -> Result<TorchCheckpoint, ErrorKind> {
    let zip::Entries { by_key: entries, folder, outside } =
        zip::entries(src, limits.max_tensors.saturating_add(16), limits.max_pickle_bytes)?;
    // The archive's folder, as PyTorch's reader finds it: the first entry's name up to its
    // first '/' (every record is looked up under it).
    let Some(prefix) = folder else {
        return Err(ErrorKind::NotTorch(format!(
            "a zip archive whose first entry '{}' is in no folder",
            outside.unwrap_or_default().escape_debug()
        )));
    };
    // PyTorch lists every record (`get_all_records`, on each load) and refuses one outside
    // the folder, whose name it compares as written (any spelling of it).
    if let Some(out) = outside {
        return Err(ErrorKind::Zip(format!("entry '{}' is outside the archive's folder {prefix}", out.escape_debug())));
    }
    let pkl = zip::find(&entries, &format!("{prefix}data.pkl"))?
        .ok_or_else(|| ErrorKind::NotTorch(format!("a zip archive without {prefix}data.pkl")))?;
    // PyTorch's reader requires the archive's version record (`.data/version` first), and
    // reads it as `std::stoull` does: blanks, then digits (what follows is ignored), from 1
    // to the newest format it knows, 10.
    let version = match zip::find(&entries, &format!("{prefix}.data/version"))? {
        Some(e) => Some(e),
        None => zip::find(&entries, &format!("{prefix}version"))?,
    };
    let version = version
        .ok_or_else(|| ErrorKind::Zip(format!("no {prefix}version record (PyTorch refuses such an archive)")))?;
    let text = read_vec(src, version.offset, version.len.min(64))?;
    // (C's blanks: space, \t, \n, \v, \f, \r; then one sign.)
    let start = text.iter().position(|b| !matches!(b, b' ' | b'\t'..=b'\r')).unwrap_or(text.len());
    let unsigned = text[start..].strip_prefix(b"+").unwrap_or(&text[start..]);
    let digits: String = unsigned.iter().take_while(|b| b.is_ascii_digit()).map(|&b| char::from(b)).collect();
    match digits.parse::<u64>() {
        Ok(1..=10) => {}
        _ => {
            return Err(ErrorKind::Zip(format!(
                "{} says '{}', not a format version from 1 to 10 (PyTorch refuses it)",
                version.name,
                String::from_utf8_lossy(&text).escape_debug()
            )))
        }
    }
    // A TorchScript archive, which `torch.load(weights_only=True)` refuses.
    if zip::find(&entries, &format!("{prefix}constants.pkl"))?.is_some() {
        return Err(ErrorKind::NotTorch("a TorchScript archive (it has constants.pkl), not a saved state dict".into()));
    }
    if let Some(e) = zip::find(&entries, &format!("{prefix}byteorder"))? {
        let b = read_vec(src, e.offset, e.len.min(16))?;
        if b.as_slice() == b"big" {
            return Err(ErrorKind::BigEndian);
        }
        if b.as_slice() != b"little" {
            return Err(ErrorKind::Zip(format!("{prefix}byteorder says '{}'", String::from_utf8_lossy(&b))));
        }
    }
    if pkl.len > limits.max_pickle_bytes {
        return Err(ErrorKind::Limit {
            what: format!("a {}-byte pickle", pkl.len),
            limit: limits.max_pickle_bytes,
            setting: "max_pickle_bytes",
        });
    }
    let code = read_vec(src, pkl.offset, pkl.len)?;
    let mut vm = Vm::new(limits.max_pickle_containers, limits.pickle_memory_per_byte);
    let mut st = ZipStorages { seen: BTreeMap::new() };
    let (root, _) = vm.run(&code, vm_limits(limits), &mut st)?;
    let mut storages = BTreeMap::new();
    for (key, s) in &st.seen {
        let e = zip::find(&entries, &format!("{prefix}data/{key}"))?
            .ok_or_else(|| ErrorKind::Zip(format!("storage '{key}' has no entry {prefix}data/{key}")))?;
        let es = s.dtype.bitsize() as u64 / 8;
        let need =
            s.numel.checked_mul(es).ok_or_else(|| ErrorKind::pickle(0, format!("storage '{key}' size overflows")))?;
        // PyTorch requires the record to be exactly the storage's size.
        if need != e.len {
            return Err(ErrorKind::Zip(format!(
                "storage '{key}' holds {} elements ({need} bytes) but its entry has {} bytes",
                s.numel, e.len
            )));
        }
        storages.insert(key.clone(), Storage { dtype: s.dtype, offset: e.offset, len: need });
    }
    let (tensors, skipped) = state_dict(&vm, &root, limits, src.size()?)?;
    Ok(TorchCheckpoint { layout: Layout::Zip, tensors, storages, skipped, pickle_bytes: pkl.len })
}

/// The legacy layout: a magic number, a protocol version and system information, each
/// pickled, then the state_dict's pickle, then a pickled list of storage keys, then each
/// storage in that order as an 8-byte element count and its bytes.
fn read_legacy<R: ReadAt + ?Sized>(src: &R, limits: &Limits) -> Result<TorchCheckpoint, ErrorKind> {
    // The pickles come first and are small: read 1 MiB of the file, and more only if they
    // run past it (up to max_pickle_bytes), rather than the whole bound at once.
    let cap = src.size()?.min(limits.max_pickle_bytes);
    let mut window = cap.min(1 << 20);
    loop {
        match read_legacy_window(src, limits, window) {
            Err(ErrorKind::Limit { setting: "max_pickle_bytes", .. }) if window < cap => {
                window = window.saturating_mul(8).min(cap);
            }
            r => return r,
        }
    }
}

fn read_legacy_window<R: ReadAt + ?Sized>(
    src: &R,
    limits: &Limits,
    head_len: u64,
) -> Result<TorchCheckpoint, ErrorKind> {
    const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
    let len = src.size()?;
    let head = read_vec(src, 0, head_len)?;
    let mut at = 0usize;
    let mut vm = Vm::new(limits.max_pickle_containers, limits.pickle_memory_per_byte);
    struct NoPersistent;
    impl Persistent for NoPersistent {
        fn load(&mut self, _: &mut Vm, _: &Value, at: usize) -> Result<Value, ErrorKind> {
            Err(ErrorKind::pickle(at, "a persistent id outside the state_dict's pickle"))
        }
    }
    let next = |vm: &mut Vm, at: &mut usize, p: &mut dyn Persistent| -> Result<Value, ErrorKind> {
        let run = vm.run(&head[*at..], vm_limits(limits), p);
        let ran_out = vm.ran_out;
        let (v, n) = run.map_err(|e| match e {
            ErrorKind::Pickle { message: _, at: a } if head_len < len && ran_out => ErrorKind::Limit {
                what: format!("pickles longer than {head_len} bytes (at byte {})", *at + a),
                limit: limits.max_pickle_bytes,
                setting: "max_pickle_bytes",
            },
            ErrorKind::Pickle { message, at: a } => ErrorKind::Pickle { message, at: *at + a },
            other => other,
        })?;
        *at += n;
        Ok(v)
    };
    match next(&mut vm, &mut at, &mut NoPersistent)? {
        Value::BigInt(b) if *b == MAGIC => {}
        _ => return Err(ErrorKind::NotTorch("a pickle, but not one torch.save wrote (no magic number)".into())),
    }
    match next(&mut vm, &mut at, &mut NoPersistent)? {
        Value::Int(1001) => {}
        _ => return Err(ErrorKind::NotTorch("unknown legacy protocol version".into())),
    }
    let info = next(&mut vm, &mut at, &mut NoPersistent)?;
    if let Some(d) = vm.dict(&info) {
        for (k, v) in &d.items {
            if matches!((k, v), (Value::Str(k), Value::Bool(false)) if &**k == "little_endian") {
                return Err(ErrorKind::BigEndian);
            }
        }
    }
    /// PyTorch's legacy `persistent_load`: a root key names one storage, with the type and
    /// size it was first named with; a view key names the view first made under it, whatever
    /// later ids say; a view key equal to its root's key names the whole root.
    struct Legacy {
        roots: BTreeMap<String, Rc<StorageRef>>,
        views: BTreeMap<String, Rc<StorageRef>>,
    }
    impl Persistent for Legacy {
        fn load(&mut self, vm: &mut Vm, pid: &Value, at: usize) -> Result<Value, ErrorKind> {
            let (s, view) = storage_pid(vm, pid, at, true)?;
            let root = match self.roots.get(&s.key) {
                // PyTorch would give the storage its first type; tensorlift refuses.
                Some(prev) if prev.dtype != s.dtype => {
                    return Err(ErrorKind::pickle(at, format!("storage '{}' is named with two types", s.key)));
                }
                Some(prev) => Rc::clone(prev),
                None if self.views.contains_key(&s.key) => {
                    return Err(ErrorKind::pickle(at, format!("'{}' names both a view and a storage", s.key)));
                }
                None => {
                    let rc = Rc::new(s);
                    self.roots.insert(rc.key.clone(), Rc::clone(&rc));
                    rc
                }
            };
            let Some((view_key, offset, size)) = view else { return Ok(Value::Storage(root)) };
            if view_key == root.key {
                return Ok(Value::Storage(root));
            }
            if let Some(first) = self.views.get(&view_key) {
                return Ok(Value::Storage(Rc::clone(first)));
            }
            if self.roots.contains_key(&view_key) {
                return Err(ErrorKind::pickle(at, format!("'{view_key}' names both a view and a storage")));
            }
            if offset.checked_add(size).is_none_or(|end| end > root.numel) {
                return Err(ErrorKind::NotTorch(format!(
                    "view '{view_key}' of storage '{}' at {offset}+{size} runs past its {} elements",
                    root.key, root.numel
                )));
            }
            let v = Rc::new(StorageRef { view: Some((offset, size)), ..(*root).clone() });
            self.views.insert(view_key, Rc::clone(&v));
            Ok(Value::Storage(v))
        }
    }
    let mut lg = Legacy { roots: BTreeMap::new(), views: BTreeMap::new() };
    let root = next(&mut vm, &mut at, &mut lg)?;
    let keys = next(&mut vm, &mut at, &mut NoPersistent)?;
    // The keys are read where the pickle keeps them, not copied: one long key listed again
    // and again (a few bytes of pickle each time) would otherwise be copied each time.
    let keys = match &keys {
        Value::List(i) => match &vm.arena[*i] {
            vm::Container::List(l) => l,
            _ => return Err(ErrorKind::pickle(at, "storage keys are not a list")),
        },
        _ => return Err(ErrorKind::pickle(at, "storage keys are not a list")),
    };
    let mut pos = at as u64;
    let mut storages = BTreeMap::new();
    for key in keys {
        let Value::Str(key) = key else { return Err(ErrorKind::pickle(at, "a storage key is not a string")) };
        let key = key.as_str();
        let s = lg.roots.get(key).ok_or_else(|| {
            ErrorKind::NotTorch(format!("storage '{key}' is listed but no tensor names it as a storage"))
        })?;
        // torch.save lists each storage once; a key listed again would have its storage read
        // twice. Refused, which also bounds the loop by the storages the pickle named.
        if storages.contains_key(key) {
            return Err(ErrorKind::NotTorch(format!("storage '{key}' is listed twice")));
        }
        let mut n = [0u8; 8];
        src.read_exact_at(&mut n, pos)
            .map_err(|_| ErrorKind::NotTorch(format!("storage '{key}' starts past the end of the file")))?;
        let numel = u64::from_le_bytes(n);
        let bytes = numel
            .checked_mul(s.dtype.bitsize() as u64 / 8)
            .filter(|b| pos.checked_add(8).and_then(|p| p.checked_add(*b)).is_some_and(|end| end <= len))
            .ok_or_else(|| {
                ErrorKind::NotTorch(format!(
                    "storage '{key}' of {numel} elements runs past the end of the {len}-byte file"
                ))
            })?;
        // PyTorch requires the sizes to agree exactly ("storage has wrong byte size").
        if numel != s.numel {
            return Err(ErrorKind::NotTorch(format!(
                "storage '{key}' holds {numel} elements, the pickle says {}",
                s.numel
            )));
        }
        storages.insert(key.to_owned(), Storage { dtype: s.dtype, offset: pos + 8, len: bytes });
        pos += 8 + bytes;
    }
    if let Some(k) = lg.roots.keys().find(|k| !storages.contains_key(*k)) {
        return Err(ErrorKind::NotTorch(format!("storage '{k}' is named by a tensor but the file does not store it")));
    }
    let (tensors, skipped) = state_dict(&vm, &root, limits, src.size()?)?;
    Ok(TorchCheckpoint { layout: Layout::Legacy, tensors, storages, skipped, pickle_bytes: at as u64 })
}

/// The state_dict's tensors, in order, checked against their storages' sizes.
fn state_dict(
    vm: &Vm,
    root: &Value,
    limits: &Limits,
    file_len: u64,
) -> Result<(Vec<TorchTensor>, Vec<String>), ErrorKind> {
    let d = vm.dict(root).ok_or_else(|| ErrorKind::NotStateDict("the pickle holds no dict at its top".into()))?;
    if d.items.len() > limits.max_tensors {
        return Err(ErrorKind::Limit {
            what: format!("{} entries", d.items.len()),
            limit: limits.max_tensors as u64,
            setting: "max_tensors",
        });
    }
    let mut tensors = Vec::new();
    let mut skipped = Vec::new();
    let most = file_len.saturating_mul(limits.max_expansion);
    let mut total = 0u64;
    // What gathering the strided views will read (each read whole, or its windows), bounded
    // as their sizes are: views of one storage, each read on its own, could read it again
    // and again.
    let mut gathered = 0u64;
    // Each entry's name, storage key, shape and strides are copied out of the pickle's
    // values, which may share them (one long key, or one long shape, under a million
    // names): the copies may take as much as the values may (a budget of their own, as
    // large: a state_dict torch.save writes lists its tensors in about 4 bytes per byte
    // of its pickle, where its values may already take most of theirs).
    let room = vm.budget();
    let mut listed = 0u64;
    let mut list = |bytes: u64| {
        listed = listed.saturating_add(bytes);
        match listed > room {
            true => Err(ErrorKind::Limit {
                what: format!(
                    "a state_dict whose list of tensors (their names, storage keys and shapes) takes more than {room} \
                     bytes"
                ),
                limit: room,
                setting: "pickle_memory_per_byte",
            }),
            false => Ok(()),
        }
    };
    for (k, v) in &d.items {
        let Value::Str(name) = k else { return Err(ErrorKind::NotStateDict("a key is not a string".into())) };
        let Value::Tensor(t) = v else {
            list(crate::vm::heap(name.len()) + size_of::<String>() as u64)?;
            skipped.push(name.to_string());
            continue;
        };
        let dims = (t.shape().len() + t.stride().len()) * size_of::<usize>();
        list(
            crate::vm::heap(name.len())
                + crate::vm::heap(t.storage.key.len())
                + crate::vm::heap(dims)
                + size_of::<TorchTensor>() as u64 * 3 / 2,
        )?;
        let tensor_err = |m: String| ErrorKind::Tensor { tensor: name.to_string(), message: m };
        let s = &t.storage;
        let (base, mut avail) = match s.view {
            Some((off, n)) => (off, n),
            None => (0, s.numel),
        };
        let dtype = t.element();
        if t.dtype.is_some() {
            // An untyped storage counts bytes; the tensor's offset and strides count its
            // own elements.
            avail /= (dtype.bitsize() / 8).max(1) as u64;
        }
        let to_usize = |x: u64| usize::try_from(x).map_err(|_| tensor_err("a size over the address space".into()));
        let shape = t.shape().iter().map(|&x| to_usize(x)).collect::<Result<Vec<_>, _>>()?;
        let strides = t.stride().iter().map(|&x| to_usize(x)).collect::<Result<Vec<_>, _>>()?;
        // The product of the non-zero dimensions must fit, whatever their order, so that
        // no later product of this shape overflows; an empty tensor still starts inside
        // its storage.
        shape
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .ok_or_else(|| tensor_err("element count overflows".into()))?;
        let numel = shape.iter().map(|&d| d as u64).product::<u64>();
        // An empty tensor reads nothing: PyTorch accepts it at any offset ("set_" asks no
        // storage of it), and it is placed at its storage's start.
        let offset = if numel == 0 { 0 } else { t.offset };
        if numel > 0 {
            let last = shape
                .iter()
                .zip(&strides)
                .try_fold(t.offset, |a, (&d, &s)| a.checked_add((d as u64 - 1).checked_mul(s as u64)?))
                .ok_or_else(|| tensor_err("offset overflows".into()))?;
            if last >= avail {
                return Err(tensor_err(format!("its elements reach {last} but storage '{}' holds {avail}", s.key)));
            }
        }
        // Overlapping views (a stride of 0, as `expand` makes) are read as PyTorch reads
        // them, and made contiguous they may be larger than their storage: the total is
        // bounded by max_expansion, so that no small file expands without bound.
        total = total.saturating_add(numel.saturating_mul(dtype.bitsize() as u64 / 8));
        if total > most {
            return Err(ErrorKind::Limit {
                what: format!("tensors of more than {total} bytes from a {file_len}-byte file (overlapping views)"),
                limit: most,
                setting: "max_expansion",
            });
        }
        let tensor = TorchTensor {
            name: name.to_string(),
            dtype,
            shape,
            strides,
            storage: s.key.clone(),
            storage_offset: to_usize(base.checked_add(offset).ok_or_else(|| tensor_err("offset overflows".into()))?)?,
        };
        if numel > 0 {
            // Refused now rather than when its bytes are asked for: a view that would be read
            // back and forth (within the storage, checked above, so nothing overflows).
            let es = (dtype.bitsize() / 8).max(1) as u64;
            let last = tensor.element_span().map_or(0, |(first, last)| last - first) as u64;
            let view = View {
                start: 0,
                nbytes: numel.saturating_mul(es),
                span: (last + 1).saturating_mul(es),
                es: es as usize,
            };
            let dims = walk_dims(&tensor);
            if !view.dense(GATHER_WINDOW) && goes_back(&dims) {
                return Err(tensor_err(overlapping(&view)));
            }
            if !tensor.is_contiguous() {
                gathered = gathered.saturating_add(gather_reads(&view, &dims, GATHER_WINDOW));
                if gathered > most {
                    return Err(ErrorKind::Limit {
                        what: format!(
                            "strided views whose gathering reads {gathered} bytes (so far) of a {file_len}-byte file"
                        ),
                        limit: most,
                        setting: "max_expansion",
                    });
                }
            }
        }
        tensors.push(tensor);
    }
    Ok((tensors, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The row-major indexes of `t`'s elements in the order of a walk through the storage:
    /// sorted by their indexes in the dimensions that move, taken from the largest storage
    /// stride to the smallest (ties: the outer dimension first).
    fn walk_order(t: &TorchTensor) -> Vec<usize> {
        let mut moving: Vec<usize> = (0..t.shape.len()).filter(|&d| t.shape[d] > 1).collect();
        moving.sort_by(|&a, &b| t.strides[b].cmp(&t.strides[a]).then(a.cmp(&b)));
        let index = |mut flat: usize| {
            let mut idx = vec![0usize; t.shape.len()];
            for d in (0..t.shape.len()).rev() {
                idx[d] = flat % t.shape[d];
                flat /= t.shape[d];
            }
            moving.iter().map(|&d| idx[d]).collect::<Vec<_>>()
        };
        let mut order: Vec<usize> = (0..t.numel()).collect();
        order.sort_by_key(|&i| index(i));
        order
    }

    /// A slice that counts the bytes read from it.
    struct Counting<'a> {
        data: &'a [u8],
        read: std::cell::Cell<u64>,
    }

    impl ReadAt for Counting<'_> {
        fn size(&self) -> std::io::Result<u64> {
            self.data.size()
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.read.set(self.read.get() + buf.len() as u64);
            self.data.read_exact_at(buf, offset)
        }
    }

    proptest! {
        /// Any view of a small storage gathers to the bytes an element-by-element walk
        /// reads, through windows from a few bytes to larger than the storage.
        #[test]
        fn gathered_views_equal_an_element_walk(
            dims in proptest::collection::vec((1usize..5, 0usize..7), 0..4),
            offset in 0usize..5,
            es in prop_oneof![Just(1usize), Just(2), Just(4)],
            window in 1usize..64,
        ) {
            let shape: Vec<usize> = dims.iter().map(|d| d.0).collect();
            let strides: Vec<usize> = dims.iter().map(|d| d.1).collect();
            let dtype = match es { 1 => Dtype::U8, 2 => Dtype::I16, _ => Dtype::I32 };
            let t = TorchTensor {
                name: "t".into(), dtype, shape: shape.clone(), strides: strides.clone(),
                storage: "0".into(), storage_offset: offset,
            };
            let last = t.element_span().unwrap().1;
            let storage: Vec<u8> = (0..(last + 1) * es + 3).map(|i| (i * 7 + 3) as u8).collect();
            let mut want = Vec::new();
            let mut idx = vec![0usize; shape.len()];
            for _ in 0..t.numel() {
                let e = offset + idx.iter().zip(&strides).map(|(i, s)| i * s).sum::<usize>();
                want.extend_from_slice(&storage[e * es..(e + 1) * es]);
                for d in (0..idx.len()).rev() {
                    idx[d] += 1;
                    if idx[d] < shape[d] { break; }
                    idx[d] = 0;
                }
            }
            let view = View { start: (offset * es) as u64, nbytes: t.nbytes() as u64, span: ((last + 1 - offset) * es) as u64, es };
            let src = Counting { data: &storage, read: std::cell::Cell::new(0) };
            let mut out = vec![0u8; t.nbytes()];
            match gather_view(&src, &view, &t, window.max(es), &mut out) {
                Ok(()) => {
                    prop_assert_eq!(out, want);
                    // No byte read twice but where a window's read ends within a run.
                    prop_assert!(src.read.get() <= view.span + view.nbytes, "{} read", src.read.get());
                    // What the reader charges a view against its file's bound.
                    let bound = gather_reads(&view, &walk_dims(&t), window.max(es));
                    prop_assert!(src.read.get() <= bound, "{} read, {bound} charged", src.read.get());
                }
                Err(Gather::Overlapping) => {
                    // Only views spread wide are refused, and only where the walk in storage
                    // order would go back.
                    prop_assert!(view.span > view.nbytes + window.max(es) as u64);
                    let mut places = Vec::new();
                    let mut idx = vec![0usize; shape.len()];
                    for _ in 0..t.numel() {
                        places.push(offset + idx.iter().zip(&strides).map(|(i, s)| i * s).sum::<usize>());
                        for d in (0..idx.len()).rev() {
                            idx[d] += 1;
                            if idx[d] < shape[d] { break; }
                            idx[d] = 0;
                        }
                    }
                    let walk: Vec<usize> = walk_order(&t).iter().map(|&i| places[i]).collect();
                    prop_assert!(walk.windows(2).any(|w| w[1] < w[0]));
                }
                Err(Gather::Io(e)) => prop_assert!(false, "{e}"),
            }
        }
    }
}
