//! A pickle interpreter that builds values and calls nothing.
//!
//! It knows the opcodes of protocols 2 to 5 that a `state_dict` uses and the few globals
//! `torch.save` names for one. Any other global is refused where it appears, before
//! anything could call it; `REDUCE` and `BUILD` act only on allowed globals and check their
//! arguments; `INST`, `OBJ`, `NEWOBJ`, extension codes and the text opcodes of protocol 0
//! are refused. Containers live in one arena and refer to each other by index, so no
//! nesting depth or cycle can overflow the stack when they are walked or dropped, and every
//! allocation is bounded by the pickle's own length.

use std::collections::HashMap;
use std::rc::Rc;

use tensorlift_format::Dtype;

use crate::error::ErrorKind;

/// A function or class that the pickle may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildTensor,
    RebuildParameter,
    RebuildParameterWithState,
    Storage(Dtype),
    /// `torch.storage.UntypedStorage`: bytes, viewed by `_rebuild_tensor_v3` with a dtype.
    UntypedStorage,
    /// A dtype object (`torch.float8_e4m3fn`), an argument of `_rebuild_tensor_v3`.
    Dtype(Dtype),
    Device,
    Size,
}

fn allowed(module: &str, name: &str) -> Option<Global> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_tensor_v3") => Global::RebuildTensorV3,
        ("torch.storage", "UntypedStorage") => Global::UntypedStorage,
        ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch", "device") => Global::Device,
        ("torch", "Size") => Global::Size,
        ("torch", class) if class.ends_with("Storage") => Global::Storage(storage_dtype(class)?),
        ("torch", dtype) => Global::Dtype(torch_dtype(dtype)?),
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

/// The element type a `torch.dtype` object names.
fn torch_dtype(name: &str) -> Option<Dtype> {
    Some(match name {
        "float64" | "double" => Dtype::F64,
        "float32" | "float" => Dtype::F32,
        "float16" | "half" => Dtype::F16,
        "bfloat16" => Dtype::BF16,
        "int64" | "long" => Dtype::I64,
        "int32" | "int" => Dtype::I32,
        "int16" | "short" => Dtype::I16,
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
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

#[derive(Debug, Clone)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer over 64 bits (the legacy layout's magic number is one): its bytes.
    BigInt(Rc<[u8]>),
    Float,
    Str(Rc<str>),
    Bytes,
    /// Index into the arena.
    List(usize),
    Tuple(usize),
    Dict(usize),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    Device,
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
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Dict {
    pub items: Vec<(Value, Value)>,
    by_str: HashMap<Rc<str>, usize>,
}

impl Dict {
    fn insert(&mut self, k: Value, v: Value) {
        // As in Python: a repeated key keeps its first place and takes the last value.
        if let Value::Str(s) = &k {
            if let Some(&i) = self.by_str.get(s) {
                self.items[i].1 = v;
                return;
            }
            self.by_str.insert(Rc::clone(s), self.items.len());
        }
        self.items.push((k, v));
    }
}

#[derive(Debug)]
pub(crate) enum Container {
    List(Vec<Value>),
    Tuple(Vec<Value>),
    // Boxed: a dict is larger than a vector, and most containers are tuples.
    Dict(Box<Dict>),
}

/// Resolves persistent ids (storages) while the pickle runs.
pub(crate) trait Persistent {
    fn load(&mut self, vm: &Vm, pid: &Value, at: usize) -> Result<Value, ErrorKind>;
}

/// Bounds on one pickle.
#[derive(Debug, Clone, Copy)]
pub(crate) struct VmLimits {
    pub max_stack: usize,
}

/// Dimensions a tensor may have (PyTorch itself stops at 64 in practice); longer size or
/// stride tuples are refused.
pub(crate) const MAX_DIMS: usize = 64;

#[derive(Debug)]
pub(crate) struct Vm {
    pub arena: Vec<Container>,
    max_containers: usize,
}

impl Vm {
    /// A machine that builds at most `max_containers` lists, tuples and dicts (about 32
    /// bytes each, empty), across every pickle it runs.
    pub fn new(max_containers: usize) -> Vm {
        Vm { arena: Vec::new(), max_containers }
    }
}

impl Vm {
    pub fn tuple(&self, v: &Value) -> Option<&[Value]> {
        match v {
            Value::Tuple(i) => match &self.arena[*i] {
                Container::Tuple(t) => Some(t),
                _ => None,
            },
            _ => None,
        }
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
        self.arena.push(c);
        Ok(self.arena.len() - 1)
    }
    /// A tuple of at most [`MAX_DIMS`] non-negative ints (a size or a stride): longer ones
    /// are refused before anything is copied, so no REDUCE costs more than a few words.
    fn ints(&self, v: &Value) -> Option<Vec<u64>> {
        let t = self.tuple(v)?;
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
        let mut r = Cursor { code, at: 0 };
        let mut stack: Vec<Value> = Vec::new();
        let mut marks: Vec<usize> = Vec::new();
        let mut memo: HashMap<u32, Value> = HashMap::new();
        loop {
            let at = r.at;
            let op = r.u8()?;
            if stack.len() > limits.max_stack || marks.len() > limits.max_stack {
                return Err(ErrorKind::Limit {
                    what: format!("a pickle stack deeper than {} entries", limits.max_stack),
                    limit: limits.max_stack as u64,
                    setting: "max_pickle_stack",
                });
            }
            let underflow = || ErrorKind::pickle(at, format!("stack underflow at opcode 0x{op:02x}"));
            match op {
                0x80 => {
                    let p = r.u8()?;
                    if !(2..=5).contains(&p) {
                        return Err(ErrorKind::pickle(at, format!("protocol {p} (only 2 to 5 are read)")));
                    }
                }
                0x95 => {
                    r.take(8)?; // FRAME: a length hint only.
                }
                b'.' => {
                    let v = stack.pop().ok_or_else(underflow)?;
                    return Ok((v, r.at));
                }
                b'(' => marks.push(stack.len()),
                b'0' => {
                    stack.pop().ok_or_else(underflow)?;
                }
                b'1' => {
                    let m = marks.pop().ok_or_else(|| ErrorKind::pickle(at, "POP_MARK without MARK"))?;
                    stack.truncate(m);
                }
                b'2' => {
                    let v = stack.last().cloned().ok_or_else(underflow)?;
                    stack.push(v);
                }
                b'N' => stack.push(Value::None),
                0x88 => stack.push(Value::Bool(true)),
                0x89 => stack.push(Value::Bool(false)),
                b'J' => stack.push(Value::Int(i64::from(i32::from_le_bytes(r.array()?)))),
                b'K' => stack.push(Value::Int(i64::from(r.u8()?))),
                b'M' => stack.push(Value::Int(i64::from(u16::from_le_bytes(r.array()?)))),
                0x8a => {
                    let n = usize::from(r.u8()?);
                    let b = r.take(n)?;
                    stack.push(long(b));
                }
                b'G' => {
                    r.take(8)?;
                    stack.push(Value::Float);
                }
                b'X' => {
                    let n = u32::from_le_bytes(r.array()?) as usize;
                    stack.push(Value::Str(r.text(n, at)?));
                }
                0x8c => {
                    let n = usize::from(r.u8()?);
                    stack.push(Value::Str(r.text(n, at)?));
                }
                0x8d => {
                    let n = r.len8()?;
                    stack.push(Value::Str(r.text(n, at)?));
                }
                // Python 2 strings (legacy files): bytes read as Latin-1 text.
                b'T' | b'U' => {
                    let n = if op == b'T' { u32::from_le_bytes(r.array()?) as usize } else { usize::from(r.u8()?) };
                    let b = r.take(n)?;
                    stack.push(Value::Str(b.iter().map(|&c| char::from(c)).collect::<String>().into()));
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'B' => u32::from_le_bytes(r.array()?) as usize,
                        b'C' => usize::from(r.u8()?),
                        _ => r.len8()?,
                    };
                    r.take(n)?;
                    stack.push(Value::Bytes);
                }
                b']' => {
                    let i = self.push_container(Container::List(Vec::new()))?;
                    stack.push(Value::List(i));
                }
                b')' => {
                    let i = self.push_container(Container::Tuple(Vec::new()))?;
                    stack.push(Value::Tuple(i));
                }
                b'}' => {
                    let i = self.push_container(Container::Dict(Box::default()))?;
                    stack.push(Value::Dict(i));
                }
                b'l' | b't' | b'd' => {
                    let m = marks.pop().ok_or_else(|| ErrorKind::pickle(at, "missing MARK"))?;
                    let items = take_from(&mut stack, m, at)?;
                    let v = match op {
                        b'l' => Value::List(self.push_container(Container::List(items))?),
                        b't' => Value::Tuple(self.push_container(Container::Tuple(items))?),
                        _ => {
                            let mut d = Dict::default();
                            let mut it = items.into_iter();
                            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                                d.insert(k, v);
                            }
                            Value::Dict(self.push_container(Container::Dict(Box::new(d)))?)
                        }
                    };
                    stack.push(v);
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let m = stack.len().checked_sub(n).ok_or_else(underflow)?;
                    let items = take_from(&mut stack, m, at)?;
                    let i = self.push_container(Container::Tuple(items))?;
                    stack.push(Value::Tuple(i));
                }
                b'a' | b'e' => {
                    let items = if op == b'a' {
                        vec![stack.pop().ok_or_else(underflow)?]
                    } else {
                        let m = marks.pop().ok_or_else(|| ErrorKind::pickle(at, "APPENDS without MARK"))?;
                        take_from(&mut stack, m, at)?
                    };
                    match stack.last() {
                        Some(Value::List(i)) => match &mut self.arena[*i] {
                            Container::List(l) => l.extend(items),
                            _ => return Err(ErrorKind::pickle(at, "APPEND to a non-list")),
                        },
                        _ => return Err(ErrorKind::pickle(at, "APPEND to a non-list")),
                    }
                }
                b's' | b'u' => {
                    let items = if op == b's' {
                        let v = stack.pop().ok_or_else(underflow)?;
                        let k = stack.pop().ok_or_else(underflow)?;
                        vec![k, v]
                    } else {
                        let m = marks.pop().ok_or_else(|| ErrorKind::pickle(at, "SETITEMS without MARK"))?;
                        take_from(&mut stack, m, at)?
                    };
                    if items.len() % 2 != 0 {
                        return Err(ErrorKind::pickle(at, "SETITEMS with an odd number of items"));
                    }
                    match stack.last() {
                        Some(Value::Dict(i)) => match &mut self.arena[*i] {
                            Container::Dict(d) => {
                                let mut it = items.into_iter();
                                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                                    d.insert(k, v);
                                }
                            }
                            _ => return Err(ErrorKind::pickle(at, "SETITEM on a non-dict")),
                        },
                        _ => return Err(ErrorKind::pickle(at, "SETITEM on a non-dict")),
                    }
                }
                b'c' => {
                    let module = r.line(at)?;
                    let name = r.line(at)?;
                    stack.push(global(&module, &name, at)?);
                }
                0x93 => {
                    let name = stack.pop().ok_or_else(underflow)?;
                    let module = stack.pop().ok_or_else(underflow)?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => stack.push(global(&m, &n, at)?),
                        _ => return Err(ErrorKind::pickle(at, "STACK_GLOBAL needs two strings")),
                    }
                }
                b'R' => {
                    let args = stack.pop().ok_or_else(underflow)?;
                    let f = stack.pop().ok_or_else(underflow)?;
                    let v = self.reduce(&f, &args, at)?;
                    stack.push(v);
                }
                b'b' => {
                    let state = stack.pop().ok_or_else(underflow)?;
                    match (stack.last(), &state) {
                        // An OrderedDict's attributes (a state_dict's `_metadata`): kept out
                        // of the mapping, as Python keeps them.
                        (Some(Value::Dict(_)), Value::Dict(_) | Value::None | Value::Tuple(_)) => {}
                        (Some(target), _) => {
                            return Err(ErrorKind::pickle(at, format!("BUILD on {} is refused", target.kind())));
                        }
                        (None, _) => return Err(underflow()),
                    }
                }
                b'Q' => {
                    let pid = stack.pop().ok_or_else(underflow)?;
                    let v = persistent.load(self, &pid, at)?;
                    stack.push(v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' { u32::from(r.u8()?) } else { u32::from_le_bytes(r.array()?) };
                    let v = memo
                        .get(&i)
                        .cloned()
                        .ok_or_else(|| ErrorKind::pickle(at, format!("memo entry {i} was never stored")))?;
                    stack.push(v);
                }
                b'q' | b'r' | 0x94 => {
                    let i = match op {
                        b'q' => u32::from(r.u8()?),
                        b'r' => u32::from_le_bytes(r.array()?),
                        _ => u32::try_from(memo.len()).map_err(|_| ErrorKind::pickle(at, "memo full"))?,
                    };
                    let v = stack.last().cloned().ok_or_else(underflow)?;
                    memo.insert(i, v);
                }
                _ => {
                    return Err(ErrorKind::RefusedOpcode { code: op, name: opcode_name(op), at });
                }
            }
        }
    }

    fn reduce(&mut self, f: &Value, args: &Value, at: usize) -> Result<Value, ErrorKind> {
        let g = match f {
            Value::Global(g) => *g,
            other => {
                return Err(ErrorKind::pickle(at, format!("REDUCE calls {}, not an allowed global", other.kind())))
            }
        };
        let a = self.tuple(args).ok_or_else(|| ErrorKind::pickle(at, "REDUCE arguments are not a tuple"))?;
        // No allowed global takes more than 8 arguments: longer tuples are refused before
        // they are copied (a memoized tuple can be passed again and again).
        if a.len() > 8 {
            return Err(ErrorKind::pickle(at, format!("{} with {} arguments", global_name(g), a.len())));
        }
        let a = a.to_vec();
        let wrong = |what: &str| ErrorKind::pickle(at, format!("{} with wrong arguments: {what}", global_name(g)));
        match g {
            Global::OrderedDict => {
                if !a.is_empty() {
                    return Err(wrong("expected ()"));
                }
                Ok(Value::Dict(self.push_container(Container::Dict(Box::default()))?))
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
                if (dtype.is_some()) != (storage.dtype == Dtype::U8 && storage.untyped) {
                    return Err(wrong("_rebuild_tensor_v3 goes with an untyped storage, and only it"));
                }
                Ok(Value::Tensor(Rc::new(TensorRef { storage: Rc::clone(storage), dtype, offset, shape, stride })))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => match a.first() {
                Some(Value::Tensor(t)) if a.len() == 3 || (a.len() == 4 && g == Global::RebuildParameterWithState) => {
                    Ok(Value::Tensor(Rc::clone(t)))
                }
                _ => Err(wrong("expected (tensor, requires_grad, hooks)")),
            },
            Global::Device => match a.as_slice() {
                [Value::Str(_)] | [Value::Str(_), Value::Int(_)] => Ok(Value::Device),
                _ => Err(wrong("expected (type[, index])")),
            },
            Global::Size => match a.as_slice() {
                [t @ Value::Tuple(_)] if self.ints(t).is_some() => Ok(t.clone()),
                _ => Err(wrong("expected a tuple of ints")),
            },
            Global::Storage(_) | Global::UntypedStorage => Err(wrong("storages are not built by REDUCE")),
            Global::Dtype(_) => Err(wrong("dtypes are not called")),
        }
    }
}

/// The values above a mark. POP can take the stack below its last mark; that is an error,
/// as in Python.
fn take_from(stack: &mut Vec<Value>, mark: usize, at: usize) -> Result<Vec<Value>, ErrorKind> {
    if mark > stack.len() {
        return Err(ErrorKind::pickle(at, "the stack is below its last MARK"));
    }
    Ok(stack.split_off(mark))
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
        Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2",
        Global::RebuildTensorV3 => "torch._utils._rebuild_tensor_v3",
        Global::RebuildTensor => "torch._utils._rebuild_tensor",
        Global::RebuildParameter => "torch._utils._rebuild_parameter",
        Global::RebuildParameterWithState => "torch._utils._rebuild_parameter_with_state",
        Global::Storage(_) | Global::UntypedStorage => "a torch storage type",
        Global::Dtype(_) => "a torch dtype",
        Global::Device => "torch.device",
        Global::Size => "torch.Size",
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
    Value::BigInt(b.into())
}

fn opcode_name(op: u8) -> &'static str {
    match op {
        b'i' => "INST",
        b'o' => "OBJ",
        0x81 => "NEWOBJ",
        0x92 => "NEWOBJ_EX",
        0x82..=0x84 => "EXT",
        b'P' => "PERSID (text)",
        b'I' | b'L' | b'F' | b'S' | b'V' => "a protocol-0 text opcode",
        b'g' | b'p' => "GET/PUT (text)",
        0x8f..=0x91 => "a set opcode",
        0x96..=0x98 => "a buffer opcode",
        0x8b => "LONG4",
        _ => "an unknown opcode",
    }
}

struct Cursor<'a> {
    code: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ErrorKind> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.code.len()).ok_or_else(|| {
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
    fn len8(&mut self) -> Result<usize, ErrorKind> {
        let n = u64::from_le_bytes(self.array()?);
        usize::try_from(n).map_err(|_| ErrorKind::pickle(self.at, "length over the address space"))
    }
    fn text(&mut self, n: usize, at: usize) -> Result<Rc<str>, ErrorKind> {
        let b = self.take(n)?;
        std::str::from_utf8(b).map(Rc::from).map_err(|_| ErrorKind::pickle(at, "string is not UTF-8"))
    }
    fn line(&mut self, at: usize) -> Result<String, ErrorKind> {
        let rest = &self.code[self.at..];
        let n = rest
            .iter()
            .take(256)
            .position(|&c| c == b'\n')
            .ok_or_else(|| ErrorKind::pickle(at, "GLOBAL name without a newline"))?;
        let s =
            std::str::from_utf8(&rest[..n]).map_err(|_| ErrorKind::pickle(at, "GLOBAL name is not UTF-8"))?.to_owned();
        self.at += n + 1;
        Ok(s)
    }
}
