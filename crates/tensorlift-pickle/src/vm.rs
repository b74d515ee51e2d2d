//! A pickle interpreter that builds values and calls nothing.
//!
//! It accepts what `torch.load(weights_only=True)` accepts (PyTorch's
//! `torch/_weights_only_unpickler.py`), no more: the same opcodes (those of protocol 2,
//! which `torch.save` writes, and `SHORT_BINSTRING` for Python 2 files), the same allowlist
//! of globals, and the same checks on `APPEND`, `SETITEM`, `BUILD` and `REDUCE`. Globals on
//! PyTorch's allowlist that a state_dict of plain tensors does not need (quantized, sparse
//! and nested tensors, tensor classes) are taken as values but refused when called. Any
//! other global is refused where it appears, before anything could call it, and so is any
//! other opcode: protocol 4's framing, `DUP`, `POP`, `INST`, `OBJ` and the text opcodes,
//! which PyTorch refuses too.
//!
//! `MARK` works as in Python's unpickler: it starts a new stack, and what is below the mark
//! cannot be reached until the mark is popped.
//!
//! Containers live in one arena and refer to each other by index, so no nesting depth or
//! cycle can overflow the stack when they are walked or dropped. Every value the pickle
//! makes is counted, as it is made, against a memory budget that the caller sizes from the
//! pickle's length ([`VmLimits::max_memory`]), and every container grows fallibly: no
//! pickle can make memory grow past a small multiple of its own bytes, or abort the process.

use std::collections::HashMap;
use std::mem::size_of;
use std::rc::Rc;

use tensorlift_format::Dtype;

use crate::error::ErrorKind;

/// A function or class that the pickle may name: PyTorch's weights-only allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Global {
    OrderedDict,
    Counter,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildTensor,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    /// `torch.nn.parameter.Parameter`.
    Parameter,
    /// `torch.Tensor`.
    Tensor,
    Storage(Dtype),
    /// `torch.storage.UntypedStorage`: bytes, viewed by `_rebuild_tensor_v3` with a dtype.
    UntypedStorage,
    /// A dtype object (`torch.float8_e4m3fn`), an argument of `_rebuild_tensor_v3`.
    Dtype(Dtype),
    Device,
    Size,
    /// `_codecs.encode`: how protocol 2 writes `bytes`.
    Encode,
    /// `builtins.set`, `builtins.bytearray`, `builtins.complex`: values a state_dict may
    /// hold beside its tensors, never read.
    Builtin(Opaque),
    /// On PyTorch's allowlist, but not a plain tensor: taken as a value, refused if called
    /// or used as a storage or dtype.
    Unread(&'static Unread),
}

/// A global on PyTorch's allowlist that tensorlift does not read, and why.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Unread {
    pub what: &'static str,
}

/// A value of a type a state_dict may hold beside its tensors, which is never looked into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Opaque {
    Set,
    ByteArray,
    Complex,
}

const UNREAD_REBUILD: Unread = Unread { what: "a tensor that is quantized, sparse, nested, meta or a subclass" };
const UNREAD_TENSOR_CLASS: Unread = Unread { what: "a legacy tensor class (torch.FloatTensor and the like)" };
const UNREAD_STORAGE: Unread = Unread { what: "a storage of a type tensorlift cannot hold (quantized, complex128)" };
const UNREAD_DTYPE: Unread = Unread { what: "a dtype tensorlift cannot hold (sub-byte, quantized, complex128)" };
const UNREAD_OTHER: Unread = Unread { what: "a quantization scheme, layout or typed-storage class" };

/// Storage class names (`torch.FloatStorage`): typed storages of `torch` and `torch.cuda`.
const STORAGE_NAMES: [&str; 17] = [
    "DoubleStorage",
    "FloatStorage",
    "HalfStorage",
    "BFloat16Storage",
    "LongStorage",
    "IntStorage",
    "ShortStorage",
    "CharStorage",
    "ByteStorage",
    "BoolStorage",
    "ComplexFloatStorage",
    "ComplexDoubleStorage",
    "QUInt8Storage",
    "QInt8Storage",
    "QInt32Storage",
    "QUInt4x2Storage",
    "QUInt2x4Storage",
];

/// Tensor class names (`torch.FloatTensor`); `torch.sparse` has all but `BoolTensor`.
const TENSOR_CLASS_NAMES: [&str; 10] = [
    "DoubleTensor",
    "FloatTensor",
    "HalfTensor",
    "BFloat16Tensor",
    "LongTensor",
    "IntTensor",
    "ShortTensor",
    "CharTensor",
    "ByteTensor",
    "BoolTensor",
];

/// `torch.NAME` dtype objects on the allowlist that tensorlift cannot hold.
const UNREAD_DTYPES: [&str; 24] = [
    "complex128",
    "complex32",
    "float4_e2m1fn_x2",
    "int1",
    "int2",
    "int3",
    "int4",
    "int5",
    "int6",
    "int7",
    "uint1",
    "uint2",
    "uint3",
    "uint4",
    "uint5",
    "uint6",
    "uint7",
    "bits1x8",
    "bits2x4",
    "bits4x2",
    "bits8",
    "bits16",
    "qint8",
    "qint32",
];

/// What `module.name` is on PyTorch's weights-only allowlist (as of PyTorch 2.13), or `None`.
fn allowed(module: &str, name: &str) -> Option<Global> {
    // Python 2 pickles name builtins `__builtin__` (pickle's IMPORT_MAPPING).
    let module = if module == "__builtin__" { "builtins" } else { module };
    Some(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("collections", "Counter") => Global::Counter,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_tensor_v3") => Global::RebuildTensorV3,
        ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromTypeV2,
        (
            "torch._utils",
            "_rebuild_qtensor"
            | "_rebuild_sparse_tensor"
            | "_rebuild_meta_tensor_no_storage"
            | "_rebuild_nested_tensor"
            | "_rebuild_wrapper_subclass"
            | "_rebuild_device_tensor_from_numpy"
            | "_rebuild_device_tensor_from_cpu_tensor",
        ) => Global::Unread(&UNREAD_REBUILD),
        ("torch.nn.parameter", "Parameter") => Global::Parameter,
        ("torch", "Tensor") => Global::Tensor,
        ("torch", "Size") => Global::Size,
        ("torch", "device") => Global::Device,
        ("torch.storage", "UntypedStorage") => Global::UntypedStorage,
        ("torch.storage", "TypedStorage") | ("torch.serialization", "_get_layout") => Global::Unread(&UNREAD_OTHER),
        (
            "torch",
            "per_tensor_affine"
            | "per_tensor_symmetric"
            | "per_channel_affine"
            | "per_channel_symmetric"
            | "per_channel_affine_float_qparams",
        ) => Global::Unread(&UNREAD_OTHER),
        ("_codecs", "encode") => Global::Encode,
        ("builtins", "set") => Global::Builtin(Opaque::Set),
        ("builtins", "bytearray") => Global::Builtin(Opaque::ByteArray),
        ("builtins", "complex") => Global::Builtin(Opaque::Complex),
        ("torch" | "torch.cuda", class) if STORAGE_NAMES.contains(&class) => {
            // torch.cuda has no quantized storage classes.
            if module == "torch.cuda" && class.starts_with('Q') {
                return None;
            }
            match storage_dtype(class) {
                Some(d) => Global::Storage(d),
                None => Global::Unread(&UNREAD_STORAGE),
            }
        }
        ("torch" | "torch.cuda" | "torch.sparse" | "torch.cuda.sparse", class)
            if TENSOR_CLASS_NAMES.contains(&class) =>
        {
            if module.ends_with("sparse") && class == "BoolTensor" {
                return None;
            }
            Global::Unread(&UNREAD_TENSOR_CLASS)
        }
        ("torch", dtype) => match torch_dtype(dtype) {
            Some(d) => Global::Dtype(d),
            None if UNREAD_DTYPES.contains(&dtype) || dtype.starts_with("quint") => Global::Unread(&UNREAD_DTYPE),
            None => return None,
        },
        _ => return None,
    })
}

/// The element type of a typed storage class.
pub(crate) fn storage_dtype(class: &str) -> Option<Dtype> {
    Some(match class {
        "DoubleStorage" => Dtype::F64,
        "FloatStorage" => Dtype::F32,
        "HalfStorage" => Dtype::F16,
        "BFloat16Storage" => Dtype::BF16,
        "LongStorage" => Dtype::I64,
        "IntStorage" => Dtype::I32,
        "ShortStorage" => Dtype::I16,
        "CharStorage" => Dtype::I8,
        "ByteStorage" => Dtype::U8,
        "BoolStorage" => Dtype::BOOL,
        "ComplexFloatStorage" => Dtype::C64,
        _ => return None,
    })
}

/// The element type a `torch.dtype` object names: its global is `str(dtype)`
/// (`torch.float32`), never an alias such as `torch.float`.
fn torch_dtype(name: &str) -> Option<Dtype> {
    Some(match name {
        "float64" => Dtype::F64,
        "float32" => Dtype::F32,
        "float16" => Dtype::F16,
        "bfloat16" => Dtype::BF16,
        "int64" => Dtype::I64,
        "int32" => Dtype::I32,
        "int16" => Dtype::I16,
        "int8" => Dtype::I8,
        "uint8" => Dtype::U8,
        "uint16" => Dtype::U16,
        "uint32" => Dtype::U32,
        "uint64" => Dtype::U64,
        "bool" => Dtype::BOOL,
        "complex64" => Dtype::C64,
        "float8_e4m3fn" => Dtype::F8_E4M3,
        "float8_e5m2" => Dtype::F8_E5M2,
        "float8_e4m3fnuz" => Dtype::F8_E4M3FNUZ,
        "float8_e5m2fnuz" => Dtype::F8_E5M2FNUZ,
        "float8_e8m0fnu" => Dtype::F8_E8M0,
        _ => return None,
    })
}

/// A storage named by a persistent id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StorageRef {
    pub dtype: Dtype,
    /// The storage's key: its entry `data/KEY` in a zip, its place in a legacy file.
    pub key: String,
    /// Elements of the storage named by `key`.
    pub numel: u64,
    /// Legacy files only: this storage is a view of `key` starting at this element, and
    /// holding this many.
    pub view: Option<(u64, u64)>,
    /// An `UntypedStorage` (bytes, `dtype` U8), which only `_rebuild_tensor_v3` views.
    pub untyped: bool,
}

/// A tensor as `_rebuild_tensor_v2` would build it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorRef {
    pub storage: Rc<StorageRef>,
    /// The element type `_rebuild_tensor_v3` names (over an untyped storage); `None` for
    /// the storage's own.
    pub dtype: Option<Dtype>,
    pub offset: u64,
    /// The shape, then the strides: one allocation.
    dims: Box<[u64]>,
}

impl TensorRef {
    pub fn shape(&self) -> &[u64] {
        &self.dims[..self.dims.len() / 2]
    }
    pub fn stride(&self) -> &[u64] {
        &self.dims[self.dims.len() / 2..]
    }
    /// Its element type: `_rebuild_tensor_v3`'s, or its storage's.
    pub fn element(&self) -> Dtype {
        self.dtype.unwrap_or(self.storage.dtype)
    }
}

/// One value on the stack, in the memo or in a container: 16 bytes, so that a pickle's
/// values take a small, known multiple of its bytes.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer over 64 bits (the legacy layout's magic number is one): its bytes.
    BigInt(Rc<Vec<u8>>),
    Float,
    Str(Rc<String>),
    Bytes,
    /// Index into the arena.
    List(usize),
    Tuple(usize),
    Dict(usize),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    Device,
    Opaque(Opaque),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) | Value::BigInt(_) => "an int",
            Value::Float => "a float",
            Value::Str(_) => "a str",
            Value::Bytes => "bytes",
            Value::List(_) => "a list",
            Value::Tuple(_) => "a tuple",
            Value::Dict(_) => "a dict",
            Value::Global(_) => "a global",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
            Value::Device => "a device",
            Value::Opaque(Opaque::Set) => "a set",
            Value::Opaque(Opaque::ByteArray) => "a bytearray",
            Value::Opaque(Opaque::Complex) => "a complex",
        }
    }
}

/// Which mapping type a dict is: PyTorch's unpickler lets `BUILD` act on an `OrderedDict`
/// (a state_dict's `_metadata`) but not on a plain dict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum DictKind {
    #[default]
    Plain,
    Ordered,
    Counter,
}

#[derive(Debug, Default)]
pub(crate) struct Dict {
    pub kind: DictKind,
    pub items: Vec<(Value, Value)>,
    /// Where each string key is, once the dict is large enough to need a table (most dicts
    /// of a state_dict's pickle are empty, or small). Boxed: a word in every dict rather
    /// than an empty table's six.
    #[allow(clippy::box_collection)]
    by_str: Option<Box<HashMap<Rc<String>, usize>>>,
}

/// Whether `codec` names an encoding tensorlift knows, in any case (compared in place: no
/// lowercase copy of a long memoized string per call).
fn known_codec(codec: &str) -> bool {
    KNOWN_CODECS.iter().any(|k| codec.eq_ignore_ascii_case(k))
}

/// Items a dict finds its string keys among by a scan, before it builds a table.
const DICT_SCAN: usize = 8;

impl Dict {
    fn insert(&mut self, k: Value, v: Value) -> Result<(), ()> {
        // As in Python: a repeated key keeps its first place and takes the last value.
        if let Value::Str(s) = &k {
            let at = match &self.by_str {
                Some(table) => table.get(s).copied(),
                None => self.items.iter().position(|(k, _)| matches!(k, Value::Str(x) if x == s)),
            };
            if let Some(i) = at {
                self.items[i].1 = v;
                return Ok(());
            }
            if self.by_str.is_none() && self.items.len() >= DICT_SCAN {
                let mut table = HashMap::new();
                table.try_reserve(self.items.len() + 1).map_err(|_| ())?;
                for (i, (k, _)) in self.items.iter().enumerate() {
                    if let Value::Str(x) = k {
                        table.insert(Rc::clone(x), i);
                    }
                }
                self.by_str = Some(Box::new(table));
            }
            if let Some(table) = &mut self.by_str {
                table.try_reserve(1).map_err(|_| ())?;
                table.insert(Rc::clone(s), self.items.len());
            }
        }
        self.items.try_reserve(1).map_err(|_| ())?;
        self.items.push((k, v));
        Ok(())
    }
}

#[derive(Debug)]
pub(crate) enum Container {
    List(Vec<Value>),
    Tuple(Box<[Value]>),
    // Boxed: a dict is larger than a vector, and most containers are tuples.
    Dict(Box<Dict>),
}

/// Resolves persistent ids (storages) while the pickle runs.
pub(crate) trait Persistent {
    fn load(&mut self, vm: &mut Vm, pid: &Value, at: usize) -> Result<Value, ErrorKind>;
}

/// Bounds on one pickle.
#[derive(Debug, Clone, Copy)]
pub(crate) struct VmLimits {
    pub max_stack: usize,
}

/// Dimensions a tensor may have (PyTorch itself stops at 64 in practice); longer size or
/// stride tuples are refused.
pub(crate) const MAX_DIMS: usize = 64;

/// What the values of a pickle cost, in bytes, as they are counted against the budget; the
/// memory test (tests/memory) holds the count above what the allocator really gives out.
/// A value in a vector that grows (the stack, a list, the memo), which holds half again
/// its length on average:
const VALUE_COST: u64 = size_of::<Value>() as u64 * 3 / 2;
/// A frame a mark opens: its place in the stack of frames (which grows by doubling), and
/// the vector of four values its first item allocates.
const FRAME_COST: u64 = size_of::<Vec<Value>>() as u64 * 3 / 2 + heap(4 * size_of::<Value>());
/// A container's place in the arena, which grows the same way.
const SLOT_COST: u64 = size_of::<Container>() as u64 * 3 / 2;
/// A dict item: a key and a value, and its place in the dict's name table.
const DICT_ITEM_COST: u64 = 2 * VALUE_COST + 24;
/// A memo entry under a number out of order (in a map of 25-byte entries, at most 7/8
/// full, whose old and new tables are both held while it grows).
const MEMO_COST: u64 = 96;

/// What the allocator takes for `n` bytes: a header word, rounded to 16, 32 at least.
pub(crate) const fn heap(n: usize) -> u64 {
    let rounded = (n as u64 + 8).div_ceil(16) * 16;
    if rounded < 32 {
        32
    } else {
        rounded
    }
}

/// Bytes of values any pickle may make, however short: a few containers cost more than
/// the opcodes that make them.
const MEMORY_FLOOR: u64 = 1 << 20;

#[derive(Debug)]
pub(crate) struct Vm {
    pub arena: Vec<Container>,
    max_containers: usize,
    /// Bytes of values allowed per byte of pickle read.
    memory_per_byte: u64,
    /// Bytes of pickle read: by earlier runs, and by this one up to its current opcode.
    read_before: u64,
    read: u64,
    /// Bytes the values made so far take, as counted.
    memory: u64,
    /// Items of containers looked at by checks so far (see [`ErrorKind::Rescans`]).
    scanned: std::cell::Cell<u64>,
    /// Whether the last [`Vm::run`] failed because its bytes ended: more bytes (a longer
    /// window of a file) may hold the rest of the pickle.
    pub ran_out: bool,
}

/// Items the checks may look at whatever the pickle's length.
const SCAN_FLOOR: u64 = 16 << 20;

impl Vm {
    /// A machine that builds at most `max_containers` lists, tuples and dicts, and values of
    /// at most `memory_per_byte` bytes per byte of pickle it has read (and 64 KiB more),
    /// across every pickle it runs.
    pub fn new(max_containers: usize, memory_per_byte: u64) -> Vm {
        Vm {
            arena: Vec::new(),
            max_containers,
            memory_per_byte,
            read_before: 0,
            read: 0,
            memory: 0,
            scanned: std::cell::Cell::new(0),
            ran_out: false,
        }
    }

    fn max_memory(&self) -> u64 {
        self.read.saturating_mul(self.memory_per_byte).saturating_add(MEMORY_FLOOR)
    }

    /// The budget for what the pickle's values may take, from the bytes of it read: also
    /// the allowance of what is made from them once it is read (the list of its tensors),
    /// counted apart from them.
    pub fn budget(&self) -> u64 {
        self.max_memory()
    }

    /// Counts `n` items looked at by a check; the interpreter refuses the pickle once they
    /// pass their budget ([`ErrorKind::Rescans`]), between opcodes.
    fn scan(&self, n: usize) {
        self.scanned.set(self.scanned.get().saturating_add(n as u64));
    }

    /// [`ErrorKind::Rescans`] where the items looked at so far are past their budget.
    fn check_scans(&self, at: usize) -> Result<(), ErrorKind> {
        let scanned = self.scanned.get();
        if scanned > self.read.saturating_mul(crate::error::SCANS_PER_BYTE).saturating_add(SCAN_FLOOR) {
            return Err(ErrorKind::Rescans { at, scanned });
        }
        Ok(())
    }

    /// Counts `bytes` of new values against the budget, refusing past it.
    pub fn charge(&mut self, bytes: u64) -> Result<(), ErrorKind> {
        self.memory = self.memory.saturating_add(bytes);
        if self.memory > self.max_memory() {
            return Err(ErrorKind::Limit {
                what: format!(
                    "a pickle whose values take more than {} bytes after {} bytes of it ({} per byte)",
                    self.max_memory(),
                    self.read,
                    self.memory_per_byte
                ),
                limit: self.max_memory(),
                setting: "pickle_memory_per_byte",
            });
        }
        Ok(())
    }

    pub fn tuple(&self, v: &Value) -> Option<&[Value]> {
        match v {
            Value::Tuple(i) => match &self.arena[*i] {
                Container::Tuple(t) => Some(t),
                _ => None,
            },
            _ => None,
        }
    }
    pub fn list(&self, v: &Value) -> Option<&[Value]> {
        match v {
            Value::List(i) => match &self.arena[*i] {
                Container::List(l) => Some(l),
                _ => None,
            },
            _ => None,
        }
    }
    /// A tuple's or a list's items (Python's `f(*args)` takes either).
    fn sequence(&self, v: &Value) -> Option<&[Value]> {
        self.tuple(v).or_else(|| self.list(v))
    }
    pub fn dict(&self, v: &Value) -> Option<&Dict> {
        match v {
            Value::Dict(i) => match &self.arena[*i] {
                Container::Dict(d) => Some(d),
                _ => None,
            },
            _ => None,
        }
    }
    fn push_container(&mut self, c: Container) -> Result<usize, ErrorKind> {
        if self.arena.len() >= self.max_containers {
            return Err(ErrorKind::Limit {
                what: format!("a pickle of more than {} lists, tuples and dicts", self.max_containers),
                limit: self.max_containers as u64,
                setting: "max_pickle_containers",
            });
        }
        let cost = match &c {
            Container::List(l) if l.is_empty() => 0,
            Container::List(l) => l.len() as u64 * VALUE_COST,
            Container::Tuple(t) if t.is_empty() => 0,
            // A tuple's items are allocated exactly.
            Container::Tuple(t) => heap(t.len() * size_of::<Value>()),
            Container::Dict(d) => heap(size_of::<Dict>()) + d.items.len() as u64 * DICT_ITEM_COST,
        };
        self.charge(SLOT_COST + cost)?;
        self.arena.try_reserve(1).map_err(|_| self.refused_allocation())?;
        self.arena.push(c);
        Ok(self.arena.len() - 1)
    }
    fn new_tuple(&mut self, items: Vec<Value>) -> Result<Value, ErrorKind> {
        Ok(Value::Tuple(self.push_container(Container::Tuple(items.into_boxed_slice()))?))
    }
    fn new_dict(&mut self, kind: DictKind) -> Result<Value, ErrorKind> {
        Ok(Value::Dict(self.push_container(Container::Dict(Box::new(Dict { kind, ..Dict::default() })))?))
    }
    fn str(&mut self, s: String) -> Result<Value, ErrorKind> {
        // The reference-counted box, then the text.
        self.charge(heap(16 + size_of::<String>()) + heap(s.len()))?;
        Ok(Value::Str(Rc::new(s)))
    }
    fn refused_allocation(&self) -> ErrorKind {
        ErrorKind::OutOfMemory { bytes: self.memory }
    }
    /// Inserts into the dict at arena index `i`, counted and fallible.
    fn dict_insert(&mut self, i: usize, items: Vec<Value>, at: usize, op: &str) -> Result<(), ErrorKind> {
        self.charge((items.len() / 2) as u64 * DICT_ITEM_COST)?;
        for pair in items.chunks_exact(2) {
            // Python hashes a key before storing it: lists, dicts and sets cannot be keys,
            // nor tuples that hold one.
            if !self.hashable(&pair[0], at)? {
                return Err(ErrorKind::pickle(at, format!("{op} with {} as a key (unhashable)", pair[0].kind())));
            }
        }
        // Each string key is hashed (or compared) whole: a long memoized key inserted again
        // and again, a few bytes of pickle each time, costs its length each time. Counted as
        // a check's items are, a byte an item, so that such a pickle is refused, not read for
        // hours.
        let key_bytes = items.iter().step_by(2).map(|k| if let Value::Str(s) = k { s.len() } else { 1 }).sum();
        self.scan(key_bytes);
        // Checked before the keys are hashed (their hashability was checked, within the same
        // budget, as it went): one SETITEMS may carry many of them.
        self.check_scans(at)?;
        let Container::Dict(d) = &mut self.arena[i] else {
            return Err(ErrorKind::pickle(at, format!("{op} on a non-dict")));
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            if d.insert(k, v).is_err() {
                return Err(self.refused_allocation());
            }
        }
        Ok(())
    }

    /// A tuple or list of at most [`MAX_DIMS`] non-negative ints (a size or a stride):
    /// longer ones are refused before anything is copied, so no REDUCE costs more than a
    /// few words.
    fn ints(&self, v: &Value) -> Option<Vec<u64>> {
        let t = self.sequence(v)?;
        if t.len() > MAX_DIMS {
            return None;
        }
        t.iter()
            .map(|x| match x {
                Value::Int(i) => u64::try_from(*i).ok(),
                _ => None,
            })
            .collect()
    }

    /// Runs one pickle from the start of `code`; returns its value and the bytes it took.
    pub fn run(
        &mut self,
        code: &[u8],
        limits: VmLimits,
        persistent: &mut dyn Persistent,
    ) -> Result<(Value, usize), ErrorKind> {
        let mut r = Cursor { code, at: 0, ran_out: false };
        let result = self.interpret(&mut r, limits, persistent);
        self.read_before = self.read;
        // A cursor's error is always the run's (each is passed up as it comes).
        self.ran_out = result.is_err() && r.ran_out;
        result
    }

    fn interpret(
        &mut self,
        r: &mut Cursor<'_>,
        limits: VmLimits,
        persistent: &mut dyn Persistent,
    ) -> Result<(Value, usize), ErrorKind> {
        let mut stack = Stack::default();
        let mut memo = Memo::default();
        loop {
            let at = r.at;
            self.read = self.read_before + at as u64 + 1;
            self.check_scans(at)?;
            let op = r.u8()?;
            if stack.depth > limits.max_stack {
                return Err(ErrorKind::Limit {
                    what: format!("a pickle stack deeper than {} entries", limits.max_stack),
                    limit: limits.max_stack as u64,
                    setting: "max_pickle_stack",
                });
            }
            // The deepest the stack has been is what it holds in memory: its values, and each
            // frame that a mark opened (its place, and the vector its first item allocates).
            if stack.depth > stack.peak {
                self.charge((stack.depth - stack.peak) as u64 * VALUE_COST)?;
                stack.peak = stack.depth;
            }
            if stack.frames.len() > stack.frame_peak {
                self.charge((stack.frames.len() - stack.frame_peak) as u64 * FRAME_COST)?;
                stack.frame_peak = stack.frames.len();
            }
            let underflow = || ErrorKind::pickle(at, format!("stack underflow at opcode 0x{op:02x}"));
            let v = match op {
                // PROTO: PyTorch reads any protocol number and acts on none.
                0x80 => {
                    r.u8()?;
                    continue;
                }
                b'.' => {
                    let v = stack.pop().ok_or_else(underflow)?;
                    return Ok((v, r.at));
                }
                b'(' => {
                    stack.mark().map_err(|_| self.refused_allocation())?;
                    continue;
                }
                b'N' => Value::None,
                0x88 => Value::Bool(true),
                0x89 => Value::Bool(false),
                b'J' => Value::Int(i64::from(i32::from_le_bytes(r.array()?))),
                b'K' => Value::Int(i64::from(r.u8()?)),
                b'M' => Value::Int(i64::from(u16::from_le_bytes(r.array()?))),
                0x8a => {
                    let n = usize::from(r.u8()?);
                    let b = r.take(n)?;
                    if n > 8 {
                        self.charge(heap(16 + size_of::<Vec<u8>>()) + heap(n))?;
                    }
                    long(b)
                }
                b'G' => {
                    r.take(8)?;
                    Value::Float
                }
                b'X' => {
                    let n = u32::from_le_bytes(r.array()?) as usize;
                    let s = r.text(n, at)?;
                    self.str(s)?
                }
                // SHORT_BINSTRING, a Python 2 `str`: PyTorch decodes it as UTF-8, strictly.
                b'U' => {
                    let n = usize::from(r.u8()?);
                    let s = r.text(n, at)?;
                    self.str(s)?
                }
                b']' => Value::List(self.push_container(Container::List(Vec::new()))?),
                b')' => self.new_tuple(Vec::new())?,
                b'}' => self.new_dict(DictKind::Plain)?,
                0x8f => Value::Opaque(Opaque::Set),
                b't' => {
                    let items = stack.pop_mark().ok_or_else(|| ErrorKind::pickle(at, "TUPLE without MARK"))?;
                    self.new_tuple(items)?
                }
                0x85..=0x87 => {
                    let items = stack.take(usize::from(op - 0x84)).ok_or_else(underflow)?;
                    self.new_tuple(items)?
                }
                b'a' | b'e' => {
                    let items = if op == b'a' {
                        vec![stack.pop().ok_or_else(underflow)?]
                    } else {
                        stack.pop_mark().ok_or_else(|| ErrorKind::pickle(at, "APPENDS without MARK"))?
                    };
                    let Some(Value::List(i)) = stack.last() else {
                        let target = stack.last().map_or("nothing", Value::kind);
                        return Err(ErrorKind::pickle(at, format!("APPEND to {target}: only lists are appended to")));
                    };
                    let i = *i;
                    self.charge(items.len() as u64 * VALUE_COST)?;
                    let Container::List(l) = &mut self.arena[i] else { unreachable!("a List value indexes a list") };
                    if l.try_reserve(items.len()).is_err() {
                        return Err(self.refused_allocation());
                    }
                    l.extend(items);
                    continue;
                }
                b's' | b'u' => {
                    let items = if op == b's' {
                        let v = stack.pop().ok_or_else(underflow)?;
                        let k = stack.pop().ok_or_else(underflow)?;
                        vec![k, v]
                    } else {
                        stack.pop_mark().ok_or_else(|| ErrorKind::pickle(at, "SETITEMS without MARK"))?
                    };
                    if items.len() % 2 != 0 {
                        return Err(ErrorKind::pickle(at, "SETITEMS with an odd number of items"));
                    }
                    let Some(Value::Dict(i)) = stack.last() else {
                        let target = stack.last().map_or("nothing", Value::kind);
                        return Err(ErrorKind::pickle(at, format!("SETITEM on {target}: only dicts are set")));
                    };
                    let i = *i;
                    self.dict_insert(i, items, at, "SETITEM")?;
                    continue;
                }
                b'c' => {
                    let module = r.line(at)?;
                    let name = r.line(at)?;
                    global(&module, &name, at)?
                }
                b'R' => {
                    let args = stack.pop().ok_or_else(underflow)?;
                    let f = stack.pop().ok_or_else(underflow)?;
                    self.reduce(&f, &args, at)?
                }
                0x81 => {
                    let args = stack.pop().ok_or_else(underflow)?;
                    let cls = stack.pop().ok_or_else(underflow)?;
                    self.newobj(&cls, &args, at)?
                }
                b'b' => {
                    let state = stack.pop().ok_or_else(underflow)?;
                    let target = stack.last().ok_or_else(underflow)?;
                    self.build(target, &state, at)?;
                    continue;
                }
                b'Q' => {
                    let pid = stack.pop().ok_or_else(underflow)?;
                    if !matches!(pid, Value::Tuple(_) | Value::Int(_) | Value::BigInt(_)) {
                        return Err(ErrorKind::pickle(
                            at,
                            format!("a persistent id must be a tuple or an int, not {}", pid.kind()),
                        ));
                    }
                    persistent.load(self, &pid, at)?
                }
                b'h' | b'j' => {
                    let i = if op == b'h' { u32::from(r.u8()?) } else { u32::from_le_bytes(r.array()?) };
                    memo.get(i).ok_or_else(|| ErrorKind::pickle(at, format!("memo entry {i} was never stored")))?
                }
                b'q' | b'r' => {
                    let i = if op == b'q' { u32::from(r.u8()?) } else { u32::from_le_bytes(r.array()?) };
                    let v = stack.last().cloned().ok_or_else(underflow)?;
                    match memo.insert(i, v) {
                        Ok(false) => {}
                        Ok(true) => self.charge(if memo.in_order(i) { VALUE_COST } else { MEMO_COST })?,
                        Err(()) => return Err(self.refused_allocation()),
                    }
                    continue;
                }
                _ => {
                    return Err(ErrorKind::RefusedOpcode { code: op, name: opcode_name(op), at });
                }
            };
            stack.push(v).map_err(|_| self.refused_allocation())?;
        }
    }

    /// `f(*args)` for an allowed `f`: what PyTorch's unpickler would build, or an error.
    fn reduce(&mut self, f: &Value, args: &Value, at: usize) -> Result<Value, ErrorKind> {
        let g = match f {
            Value::Global(g) => *g,
            other => {
                return Err(ErrorKind::pickle(at, format!("REDUCE calls {}, not an allowed global", other.kind())))
            }
        };
        let a = self.sequence(args).ok_or_else(|| ErrorKind::pickle(at, "REDUCE arguments are not a tuple"))?;
        // No allowed global takes more than 8 arguments: longer tuples are refused before
        // they are copied (a memoized tuple can be passed again and again).
        if a.len() > 8 {
            return Err(ErrorKind::pickle(at, format!("{} with {} arguments", global_name(g), a.len())));
        }
        let a = a.to_vec();
        let wrong = |what: &str| ErrorKind::pickle(at, format!("{} with wrong arguments: {what}", global_name(g)));
        match g {
            Global::OrderedDict | Global::Counter => {
                let kind = if g == Global::Counter { DictKind::Counter } else { DictKind::Ordered };
                let d = self.new_dict(kind)?;
                let Value::Dict(i) = d else { unreachable!("new_dict makes a dict") };
                match a.as_slice() {
                    [] => {}
                    // `OrderedDict(mapping)`, and `Counter(mapping)`, which copies it.
                    [m @ Value::Dict(_)] => {
                        let items: Vec<Value> = self
                            .dict(m)
                            .map(|d| d.items.iter().flat_map(|(k, v)| [k.clone(), v.clone()]).collect())
                            .unwrap_or_default();
                        self.dict_insert(i, items, at, "OrderedDict")?;
                    }
                    // `OrderedDict([[key, value], ...])`, as Python 2 pickled one.
                    [pairs] if g == Global::OrderedDict => {
                        let pairs = self.sequence(pairs).ok_or_else(|| wrong("expected () or (items,)"))?;
                        let mut items = Vec::new();
                        items.try_reserve(pairs.len() * 2).map_err(|_| self.refused_allocation())?;
                        for p in pairs {
                            match self.sequence(p) {
                                Some([k, v]) => items.extend([k.clone(), v.clone()]),
                                _ => return Err(wrong("an item is not a (key, value) pair")),
                            }
                        }
                        self.dict_insert(i, items, at, "OrderedDict")?;
                    }
                    _ => return Err(wrong("expected () or (items,)")),
                }
                Ok(d)
            }
            Global::RebuildTensorV2 | Global::RebuildTensorV3 | Global::RebuildTensor => {
                let (n, most) = match g {
                    Global::RebuildTensor => (4, 4),
                    Global::RebuildTensorV2 => (6, 7),
                    _ => (7, 8),
                };
                if a.len() < n || a.len() > most {
                    return Err(wrong(&format!("expected {n} arguments, got {}", a.len())));
                }
                let dtype = match (g, &a.get(6)) {
                    (Global::RebuildTensorV3, Some(Value::Global(Global::Dtype(d)))) => Some(*d),
                    (Global::RebuildTensorV3, Some(Value::Global(Global::Unread(u)))) => {
                        return Err(wrong(&format!("the dtype is {}", u.what)))
                    }
                    (Global::RebuildTensorV3, _) => return Err(wrong("the seventh is not a torch dtype")),
                    _ => None,
                };
                let Value::Storage(storage) = &a[0] else { return Err(wrong("the first is not a storage")) };
                let Value::Int(offset) = a[1] else { return Err(wrong("the offset is not an int")) };
                let offset = u64::try_from(offset).map_err(|_| wrong("negative offset"))?;
                let shape =
                    self.ints(&a[2]).ok_or_else(|| wrong("the size is not a tuple of at most 64 non-negative ints"))?;
                let stride = self
                    .ints(&a[3])
                    .ok_or_else(|| wrong("the stride is not a tuple of at most 64 non-negative ints"))?;
                if shape.len() != stride.len() {
                    return Err(wrong("size and stride differ in length"));
                }
                if dtype.is_some() && !storage.untyped {
                    return Err(wrong(
                        "it views a typed storage (tensorlift reads _rebuild_tensor_v3 over untyped ones)",
                    ));
                }
                if dtype.is_none() && storage.untyped {
                    return Err(wrong(
                        "it views an untyped storage (tensorlift reads those through _rebuild_tensor_v3)",
                    ));
                }
                // requires_grad (v2's fifth argument, v3's too) and metadata (v2's seventh,
                // v3's eighth): PyTorch applies them, and the conjugate and negative bits
                // would change the values read.
                let element = dtype.unwrap_or(storage.dtype);
                if g != Global::RebuildTensor {
                    requires_grad(&a[4], element).map_err(|m| wrong(&m))?;
                    let metadata = if g == Global::RebuildTensorV2 { a.get(6) } else { a.get(7) };
                    if let Some(m) = metadata {
                        self.tensor_metadata(m).map_err(|m| wrong(&m))?;
                    }
                }
                self.charge(heap(size_of::<TensorRef>() + 16) + heap(16 * shape.len()))?;
                let dims = shape.into_iter().chain(stride).collect();
                Ok(Value::Tensor(Rc::new(TensorRef { storage: Rc::clone(storage), dtype, offset, dims })))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => match a.as_slice() {
                [Value::Tensor(t), grad, _] | [Value::Tensor(t), grad, _, _]
                    if a.len() == 3 || g == Global::RebuildParameterWithState =>
                {
                    requires_grad(grad, t.element()).map_err(|m| wrong(&m))?;
                    if let Some(state) = a.get(3) {
                        self.attributes_state(state).map_err(|m| wrong(&m))?;
                    }
                    Ok(Value::Tensor(Rc::clone(t)))
                }
                _ => Err(wrong("expected (tensor, requires_grad, hooks)")),
            },
            // `_rebuild_from_type_v2(func, new_type, args, state)`: `func(*args)`, as a
            // plain tensor or a parameter; the state is a tensor's Python attributes.
            // The function is one that builds a tensor, never this one again: a list can hold
            // itself, and such a call would recurse without end (PyTorch's runs out of stack).
            Global::RebuildFromTypeV2 => match a.as_slice() {
                [func @ Value::Global(
                    Global::RebuildTensorV2
                    | Global::RebuildTensorV3
                    | Global::RebuildTensor
                    | Global::RebuildParameter
                    | Global::RebuildParameterWithState
                    | Global::Parameter,
                ), Value::Global(Global::Tensor | Global::Parameter), args, state] => {
                    self.attributes_state(state).map_err(|m| wrong(&m))?;
                    match self.reduce(func, args, at)? {
                        t @ Value::Tensor(_) => Ok(t),
                        other => Err(wrong(&format!("it builds {}, not a tensor", other.kind()))),
                    }
                }
                _ => Err(wrong("expected (a tensor-building function, torch.Tensor or Parameter, args, state)")),
            },
            // `Parameter(data[, requires_grad])`.
            Global::Parameter => match a.as_slice() {
                // requires_grad defaults to True.
                [Value::Tensor(t)] => {
                    requires_grad(&Value::Bool(true), t.element()).map(|_| a[0].clone()).map_err(|m| wrong(&m))
                }
                [Value::Tensor(t), grad] => {
                    requires_grad(grad, t.element()).map(|_| a[0].clone()).map_err(|m| wrong(&m))
                }
                _ => Err(wrong("expected (tensor[, requires_grad])")),
            },
            Global::Device => match a.as_slice() {
                [Value::Str(s)] if device_name(s, true) => Ok(Value::Device),
                [Value::Str(s), Value::Int(i)] if *i >= 0 && device_name(s, false) => Ok(Value::Device),
                _ => Err(wrong("expected (type[, index]) of a device type PyTorch knows")),
            },
            Global::Size => match a.as_slice() {
                [] => self.new_tuple(Vec::new()),
                [t] if self.ints(t).is_some() => {
                    let items = self.sequence(t).map(<[Value]>::to_vec).unwrap_or_default();
                    self.new_tuple(items)
                }
                _ => Err(wrong("expected a tuple of ints")),
            },
            // `_codecs.encode(text, encoding)`: how protocol 2 writes `bytes`.
            Global::Encode => match a.as_slice() {
                [Value::Str(_)] => Ok(Value::Bytes),
                [Value::Str(_), Value::Str(codec)] | [Value::Str(_), Value::Str(codec), Value::Str(_)]
                    if known_codec(codec) =>
                {
                    Ok(Value::Bytes)
                }
                _ => Err(wrong("expected (str[, encoding[, errors]]) with an encoding tensorlift knows")),
            },
            Global::Builtin(kind) => {
                let fits = match (kind, a.as_slice()) {
                    (_, []) => true,
                    // A set's items must be hashable.
                    (Opaque::Set, [x @ (Value::List(_) | Value::Tuple(_))]) => {
                        let mut all = true;
                        for v in self.sequence(x).unwrap_or_default() {
                            if !self.hashable(v, at)? {
                                all = false;
                                break;
                            }
                        }
                        all
                    }
                    (Opaque::Set, [x]) => matches!(x, Value::Dict(_) | Value::Str(_) | Value::Bytes | Value::Opaque(_)),
                    // bytearray(str) needs an encoding.
                    (Opaque::ByteArray, [x]) => {
                        matches!(x, Value::Bytes | Value::Opaque(Opaque::ByteArray))
                            || matches!(x, Value::Int(n) if (0..1 << 20).contains(n))
                            || self.ints(x).is_some_and(|v| v.iter().all(|&b| b < 256))
                    }
                    (Opaque::ByteArray, [Value::Str(_), Value::Str(codec)]) => known_codec(codec),
                    (Opaque::Complex, xs) if xs.len() <= 2 => {
                        xs.iter().all(|x| matches!(x, Value::Int(_) | Value::Float | Value::Bool(_)))
                    }
                    _ => false,
                };
                if !fits {
                    return Err(wrong("not arguments it takes"));
                }
                Ok(Value::Opaque(kind))
            }
            Global::Unread(u) => Err(ErrorKind::pickle(
                at,
                format!("{} is allowed by PyTorch but not read by tensorlift: {}", global_name(g), u.what),
            )),
            Global::Tensor => Err(ErrorKind::pickle(at, "torch.Tensor(...) is not read by tensorlift: no storage")),
            Global::Storage(_) | Global::UntypedStorage => Err(wrong("storages are not built by REDUCE")),
            Global::Dtype(_) => Err(wrong("dtypes are not called")),
        }
    }

    /// Whether Python could hash `v`: not a list, dict, set or bytearray, nor a tuple that
    /// holds one, however deep (walked without recursion, and bounded). Each item looked
    /// at counts against the pickle's budget of checks, which is enforced as the walk goes:
    /// tuples that share their items (a tree of 2^16 items from a hundred bytes) checked
    /// for each of many keys are refused, not walked for hours.
    fn hashable(&self, v: &Value, at: usize) -> Result<bool, ErrorKind> {
        let mut todo = vec![v];
        let mut seen = 0usize;
        while let Some(v) = todo.pop() {
            seen += 1;
            self.scan(1);
            // The process's count, not this walk's: many short walks add up too.
            self.check_scans(at)?;
            if seen > 1 << 16 {
                return Ok(false);
            }
            match v {
                Value::List(_) | Value::Dict(_) | Value::Opaque(Opaque::Set | Opaque::ByteArray) => return Ok(false),
                Value::Tuple(_) => todo.extend(self.tuple(v).unwrap_or_default()),
                _ => {}
            }
        }
        Ok(true)
    }

    /// A tensor's Python attributes (`_rebuild_from_type_v2`'s state, a parameter's):
    /// PyTorch sets each with `setattr`, which changes the tensor itself for its data
    /// descriptors (`data`, `real`, `requires_grad`, ...). Attributes of other names are
    /// the tensor's own and do not change what is read; a state that sets one of those
    /// is refused.
    fn attributes_state(&self, state: &Value) -> Result<(), String> {
        let (dict, slots) = match state {
            Value::Tuple(_) => match self.tuple(state) {
                Some([d, s]) => (d, Some(s)),
                _ => return Err("a state tuple of other than (dict, slots)".into()),
            },
            other => (other, None),
        };
        for part in std::iter::once(dict).chain(slots) {
            match part {
                Value::None => {}
                Value::Dict(_) => {
                    let items = self.dict(part).map(|d| d.items.as_slice()).unwrap_or_default();
                    self.scan(items.len());
                    for (k, _) in items {
                        match k {
                            Value::Str(name)
                                if !TENSOR_DESCRIPTORS.contains(&name.as_str()) && !name.starts_with("__") => {}
                            Value::Str(name) => {
                                return Err(format!("its state sets '{name}', which changes the tensor"))
                            }
                            other => return Err(format!("its state names {} as an attribute", other.kind())),
                        }
                    }
                }
                Value::Tuple(_) if self.tuple(part).is_some_and(<[Value]>::is_empty) => {}
                other => return Err(format!("its state is {}", other.kind())),
            }
        }
        Ok(())
    }

    /// `_rebuild_tensor_v2`'s metadata: PyTorch sets a tensor's `neg` and `conj` bits, which
    /// change its values, where the dict has the key, whatever its value (`{"neg": False}`
    /// negates too: `setTensorMetadata` looks the keys up); tensorlift refuses either key.
    /// A key that is not a string, or anything else truthy that is not a dict, PyTorch
    /// refuses.
    fn tensor_metadata(&self, m: &Value) -> Result<(), String> {
        match m {
            Value::None | Value::Bool(false) | Value::Int(0) => Ok(()),
            Value::Dict(_) => {
                let items = self.dict(m).map(|d| d.items.as_slice()).unwrap_or_default();
                self.scan(items.len());
                for (k, v) in items {
                    // (PyTorch takes the values as C++ bools: what Python can make one of.)
                    if !matches!(v, Value::Bool(_) | Value::None | Value::Int(_) | Value::BigInt(_) | Value::Float) {
                        return Err(format!("its metadata has a value that is {}, not a bool", v.kind()));
                    }
                    match k {
                        Value::Str(name) if matches!(name.as_str(), "neg" | "conj") => {
                            return Err(format!(
                                "its metadata has '{name}', which PyTorch applies whatever its value, and \
                                 tensorlift does not"
                            ));
                        }
                        Value::Str(_) => {}
                        other => return Err(format!("its metadata has a key that is {}, not a string", other.kind())),
                    }
                }
                Ok(())
            }
            other => Err(format!("its metadata is {}, not a dict", other.kind())),
        }
    }

    /// `cls.__new__(cls, *args)` for an allowed class (`Parameter(*args)` for a parameter),
    /// as PyTorch's unpickler does for `NEWOBJ`.
    fn newobj(&mut self, cls: &Value, args: &Value, at: usize) -> Result<Value, ErrorKind> {
        let g = match cls {
            Value::Global(g) => *g,
            other => return Err(ErrorKind::pickle(at, format!("NEWOBJ of {}, not an allowed class", other.kind()))),
        };
        if self.sequence(args).is_none() {
            return Err(ErrorKind::pickle(at, "NEWOBJ arguments are not a tuple"));
        }
        match g {
            // `dict.__new__` and `set.__new__` ignore their arguments.
            Global::OrderedDict => self.new_dict(DictKind::Ordered),
            Global::Counter => self.new_dict(DictKind::Counter),
            Global::Builtin(kind @ (Opaque::Set | Opaque::ByteArray)) => Ok(Value::Opaque(kind)),
            Global::Parameter | Global::Size | Global::Device | Global::Builtin(Opaque::Complex) => {
                self.reduce(cls, args, at)
            }
            _ => Err(ErrorKind::pickle(at, format!("NEWOBJ of {} is refused", global_name(g)))),
        }
    }

    /// `BUILD`: PyTorch's unpickler sets attributes of an `OrderedDict` (a state_dict's
    /// `_metadata`) or a `Counter`; attributes are not part of the mapping, so nothing is
    /// kept. Any other target is refused.
    fn build(&self, target: &Value, state: &Value, at: usize) -> Result<(), ErrorKind> {
        let refused = || ErrorKind::pickle(at, format!("BUILD on {} is refused", target.kind()));
        let Some(d) = self.dict(target) else { return Err(refused()) };
        match (d.kind, state) {
            (DictKind::Ordered, Value::Dict(_)) => Ok(()),
            (DictKind::Counter, Value::Dict(_) | Value::None) => Ok(()),
            (DictKind::Counter, t @ Value::Tuple(_))
                if matches!(self.tuple(t), Some([Value::Dict(_) | Value::None, Value::Dict(_) | Value::None])) =>
            {
                Ok(())
            }
            (DictKind::Plain, _) => Err(ErrorKind::pickle(at, "BUILD on a dict (not an OrderedDict) is refused")),
            _ => Err(ErrorKind::pickle(at, format!("BUILD with {} as the state is refused", state.kind()))),
        }
    }
}

/// The memo: entries numbered from 0 as `torch.save` numbers them in a vector, any other
/// number in a map, so that a pickle cannot make a table of 2^32 entries.
#[derive(Debug, Default)]
struct Memo {
    in_order: Vec<Value>,
    elsewhere: HashMap<u32, Value>,
}

impl Memo {
    fn in_order(&self, i: u32) -> bool {
        (i as usize) < self.in_order.len()
    }
    fn get(&self, i: u32) -> Option<Value> {
        self.in_order.get(i as usize).or_else(|| self.elsewhere.get(&i)).cloned()
    }
    /// Stores entry `i`; whether it is new.
    fn insert(&mut self, i: u32, v: Value) -> Result<bool, ()> {
        if let Some(slot) = self.in_order.get_mut(i as usize) {
            *slot = v;
            return Ok(false);
        }
        if i as usize == self.in_order.len() && !self.elsewhere.contains_key(&i) {
            self.in_order.try_reserve(1).map_err(|_| ())?;
            self.in_order.push(v);
            return Ok(true);
        }
        self.elsewhere.try_reserve(1).map_err(|_| ())?;
        Ok(self.elsewhere.insert(i, v).is_none())
    }
}

/// Python's unpickler stack: `MARK` puts the stack aside and starts a new one, and
/// popping the mark takes every item of the new one.
#[derive(Debug, Default)]
struct Stack {
    frames: Vec<Vec<Value>>,
    cur: Vec<Value>,
    /// Items and marks held, in every frame.
    depth: usize,
    /// The deepest it has been, counted against the memory budget.
    peak: usize,
    /// The most frames it has held, counted against the memory budget.
    frame_peak: usize,
}

impl Stack {
    fn push(&mut self, v: Value) -> Result<(), ()> {
        self.cur.try_reserve(1).map_err(|_| ())?;
        self.cur.push(v);
        self.depth += 1;
        Ok(())
    }
    fn pop(&mut self) -> Option<Value> {
        let v = self.cur.pop()?;
        self.depth -= 1;
        Some(v)
    }
    fn last(&self) -> Option<&Value> {
        self.cur.last()
    }
    /// The last `n` items of the current frame, in order.
    fn take(&mut self, n: usize) -> Option<Vec<Value>> {
        let m = self.cur.len().checked_sub(n)?;
        self.depth -= n;
        Some(self.cur.split_off(m))
    }
    fn mark(&mut self) -> Result<(), ()> {
        self.frames.try_reserve(1).map_err(|_| ())?;
        self.frames.push(std::mem::take(&mut self.cur));
        self.depth += 1;
        Ok(())
    }
    fn pop_mark(&mut self) -> Option<Vec<Value>> {
        let below = self.frames.pop()?;
        let items = std::mem::replace(&mut self.cur, below);
        self.depth -= items.len() + 1;
        Some(items)
    }
}

fn global(module: &str, name: &str, at: usize) -> Result<Value, ErrorKind> {
    allowed(module, name).map(Value::Global).ok_or_else(|| ErrorKind::RefusedGlobal {
        module: module.to_owned(),
        name: name.to_owned(),
        at,
    })
}

fn global_name(g: Global) -> &'static str {
    match g {
        Global::OrderedDict => "collections.OrderedDict",
        Global::Counter => "collections.Counter",
        Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2",
        Global::RebuildTensorV3 => "torch._utils._rebuild_tensor_v3",
        Global::RebuildTensor => "torch._utils._rebuild_tensor",
        Global::RebuildParameter => "torch._utils._rebuild_parameter",
        Global::RebuildParameterWithState => "torch._utils._rebuild_parameter_with_state",
        Global::RebuildFromTypeV2 => "torch._tensor._rebuild_from_type_v2",
        Global::Parameter => "torch.nn.parameter.Parameter",
        Global::Tensor => "torch.Tensor",
        Global::Storage(_) | Global::UntypedStorage => "a torch storage type",
        Global::Dtype(_) => "a torch dtype",
        Global::Device => "torch.device",
        Global::Size => "torch.Size",
        Global::Encode => "_codecs.encode",
        Global::Builtin(Opaque::Set) => "builtins.set",
        Global::Builtin(Opaque::ByteArray) => "builtins.bytearray",
        Global::Builtin(Opaque::Complex) => "builtins.complex",
        Global::Unread(_) => "this global",
    }
}

/// Codecs `_codecs.encode` and `bytearray` are read with (Python's names for them).
const KNOWN_CODECS: [&str; 8] = ["latin1", "latin-1", "iso-8859-1", "iso8859-1", "utf-8", "utf8", "ascii", "us-ascii"];

/// The data descriptors of `torch.Tensor` and `torch.nn.Parameter` (PyTorch 2.13): setting
/// one changes the tensor, or fails.
const TENSOR_DESCRIPTORS: [&str; 49] = [
    "H",
    "T",
    "__cuda_array_interface__",
    "__weakref__",
    "_backward_hooks",
    "_base",
    "_cdata",
    "_grad",
    "_grad_fn",
    "_has_symbolic_sizes_strides",
    "_post_accumulate_grad_hooks",
    "_python_dispatch",
    "_version",
    "data",
    "device",
    "dtype",
    "grad",
    "grad_dtype",
    "grad_fn",
    "imag",
    "is_cpu",
    "is_cuda",
    "is_ipu",
    "is_leaf",
    "is_maia",
    "is_meta",
    "is_mkldnn",
    "is_mps",
    "is_mtia",
    "is_nested",
    "is_quantized",
    "is_sparse",
    "is_sparse_csr",
    "is_vulkan",
    "is_xla",
    "is_xpu",
    "itemsize",
    "layout",
    "mH",
    "mT",
    "name",
    "nbytes",
    "ndim",
    "output_nr",
    "real",
    "requires_grad",
    "retains_grad",
    "shape",
    "volatile",
];

/// Whether `s` names a device PyTorch knows: a type, with `:N` where `whole` allows it.
/// Longer names than any device's are refused before they are looked at: a long string
/// kept in the memo, named by many calls of a few bytes each, would be scanned each time.
fn device_name(s: &str, whole: bool) -> bool {
    if s.len() > 64 {
        return false;
    }
    // PyTorch 2.13's list ("Expected one of ... device type").
    const TYPES: [&str; 20] = [
        "cpu",
        "cuda",
        "ipu",
        "xpu",
        "mkldnn",
        "opengl",
        "opencl",
        "ideep",
        "hip",
        "ve",
        "fpga",
        "maia",
        "xla",
        "lazy",
        "vulkan",
        "mps",
        "meta",
        "hpu",
        "mtia",
        "privateuseone",
    ];
    let (ty, index) = match s.split_once(':') {
        Some((t, i)) if whole => (t, Some(i)),
        Some(_) => return false,
        None => (s, None),
    };
    TYPES.contains(&ty) && index.is_none_or(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
}

/// Checks a `requires_grad` argument: a bool, and true only for a floating or complex
/// element type (PyTorch refuses gradients of integers).
fn requires_grad(v: &Value, dtype: Dtype) -> Result<(), String> {
    match v {
        Value::Bool(false) => Ok(()),
        Value::Bool(true)
            if matches!(
                dtype,
                Dtype::F64
                    | Dtype::F32
                    | Dtype::F16
                    | Dtype::BF16
                    | Dtype::C64
                    | Dtype::F8_E4M3
                    | Dtype::F8_E5M2
                    | Dtype::F8_E4M3FNUZ
                    | Dtype::F8_E5M2FNUZ
                    | Dtype::F8_E8M0
            ) =>
        {
            Ok(())
        }
        Value::Bool(true) => {
            Err(format!("requires_grad on a {dtype} tensor (only floating point ones have gradients)"))
        }
        other => Err(format!("requires_grad is {}, not a bool", other.kind())),
    }
}

fn long(b: &[u8]) -> Value {
    if b.is_empty() {
        return Value::Int(0);
    }
    if b.len() <= 8 {
        let neg = b[b.len() - 1] & 0x80 != 0;
        let mut buf = [if neg { 0xff } else { 0 }; 8];
        buf[..b.len()].copy_from_slice(b);
        return Value::Int(i64::from_le_bytes(buf));
    }
    // A long encoding of a small int (Python writes the shortest, others may not): the
    // bytes past the eighth only repeat the sign.
    let sign = if b[7] & 0x80 != 0 { 0xff } else { 0 };
    if b[8..].iter().all(|&x| x == sign) {
        return long(&b[..8]);
    }
    Value::BigInt(Rc::new(b.to_vec()))
}

/// Names of the opcodes PyTorch's weights-only unpickler refuses.
fn opcode_name(op: u8) -> &'static str {
    match op {
        b'i' => "INST",
        b'o' => "OBJ",
        0x92 => "NEWOBJ_EX",
        0x82..=0x84 => "EXT",
        b'P' => "PERSID (text)",
        b'I' | b'L' | b'F' | b'S' | b'V' => "a protocol-0 text opcode",
        b'g' | b'p' => "GET/PUT (text)",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'l' => "LIST",
        b'd' => "DICT",
        b'T' => "BINSTRING",
        b'B' | b'C' | 0x8e => "a bytes opcode",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8b => "LONG4",
        0x90 | 0x91 => "a set opcode",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96..=0x98 => "a buffer opcode",
        _ => "an unknown opcode",
    }
}

struct Cursor<'a> {
    code: &'a [u8],
    at: usize,
    /// Whether a read went past the end of `code`.
    ran_out: bool,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ErrorKind> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.code.len()).ok_or_else(|| {
            self.ran_out = true;
            ErrorKind::pickle(
                self.at,
                format!("{n} bytes wanted, the pickle ends {} bytes on", self.code.len() - self.at),
            )
        })?;
        let s = &self.code[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, ErrorKind> {
        Ok(self.take(1)?[0])
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ErrorKind> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn text(&mut self, n: usize, at: usize) -> Result<String, ErrorKind> {
        let b = self.take(n)?;
        // PyTorch reads BINUNICODE with "surrogatepass", which lets encoded lone
        // surrogates through; a Rust string cannot hold them, so they are refused.
        std::str::from_utf8(b).map(str::to_owned).map_err(|_| ErrorKind::pickle(at, "string is not UTF-8"))
    }
    fn line(&mut self, at: usize) -> Result<String, ErrorKind> {
        let rest = &self.code[self.at..];
        let n = rest.iter().take(256).position(|&c| c == b'\n').ok_or_else(|| {
            // A name cut by the end of the bytes at hand (a legacy file's pickle is read in
            // windows, which a longer read continues) is the pickle's end, not a bad name.
            self.ran_out = rest.len() < 256;
            let message = match self.ran_out {
                true => format!("a GLOBAL name, the pickle ends {} bytes on", rest.len()),
                false => "GLOBAL name without a newline".to_owned(),
            };
            ErrorKind::pickle(at, message)
        })?;
        let s =
            std::str::from_utf8(&rest[..n]).map_err(|_| ErrorKind::pickle(at, "GLOBAL name is not UTF-8"))?.to_owned();
        self.at += n + 1;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_two_words() {
        assert_eq!(size_of::<Value>(), 16);
    }
}
