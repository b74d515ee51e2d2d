//! tensorlift's C API, for servers that are neither Rust nor Python (TensorRT-LLM and Triton
//! backends, C++ inference servers): `libtensorlift_c.so` / `libtensorlift_c.a` and the
//! header `include/tensorlift.h`, which cbindgen writes from this file (`tests/capi.rs`
//! fails while the committed header is stale).
//!
//! The shape of it (docs/C_API.md has the whole story and a C++ example):
//!
//! - `tl_options_new` / `tl_options_set_device` / `tl_options_add_filter` /
//!   `tl_options_set_dtype` / `tl_options_add_slice` / `tl_options_set_verify`, then
//!   `tl_loader_new`: a loader, whose device is chosen (and probed) once.
//! - `tl_load` (every tensor, into a `TlModel`) or `tl_stream_open` + `tl_stream_next` (one
//!   `TlTensor` at a time, as they land).
//! - `tl_model_tensor` / `tl_tensor_info`: name, dtype, shape, and a host pointer or a CUDA
//!   device pointer; `tl_model_to_dlpack` / `tl_tensor_to_dlpack`: a DLPack
//!   `DLManagedTensorVersioned` whose deleter keeps the memory alive after the handle is
//!   freed.
//! - Every function returns a [`TlStatus`]; the message of the last status other than
//!   `TL_STATUS_OK` on the calling thread is `tl_last_error()`. No panic crosses the boundary: one is caught and returned
//!   as `TL_STATUS_PANIC`.
//!
//! This file is the C API's FFI edge: the only `unsafe` here turns the caller's pointers
//! into references, under the contract each function's `# Safety` section states.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tensorlift::dlpack::DLManagedTensorVersioned;
use tensorlift::{Device, Dtype, Loader, LoaderBuilder, Model, Tensor, TensorSlice, TensorStream, Verify};

/// What every function of the API returns.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlStatus {
    /// Success.
    Ok = 0,
    /// A null pointer, a string that is not UTF-8 (paths may be any bytes), an index out of
    /// range, or an option value that is not one of those documented.
    InvalidArgument = 1,
    /// No tensor of that name.
    NotFound = 2,
    /// The load failed: the checkpoint, its files, memory or the device (the message says
    /// which, naming the file and the tensor where there is one).
    LoadFailed = 3,
    /// A stream has no tensor left.
    End = 4,
    /// What was asked is not possible: an option combination the loader refuses (a
    /// verified load with slices, ...), or a DLPack export of a dtype DLPack
    /// cannot describe.
    Unsupported = 5,
    /// A bug in tensorlift: a panic was caught at the boundary (please report the message).
    Panic = 6,
    /// The stream was cancelled (`tl_stream_cancel`): it gives no more tensors.
    Cancelled = 7,
}

/// Where a tensor's bytes are, and what they are. The pointers are valid as long as the
/// model or tensor handle it was read from.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct TlTensorInfo {
    /// The tensor's name: NUL-terminated UTF-8.
    pub name: *const c_char,
    /// Its dtype as safetensors names it (`"BF16"`, `"F32"`, `"I64"`, ...): NUL-terminated.
    pub dtype: *const c_char,
    /// Number of dimensions (0 for a scalar).
    pub ndim: usize,
    /// Its dimensions (`ndim` of them).
    pub shape: *const u64,
    /// DLPack's device type: 1 for host memory, 2 for a CUDA device.
    pub device_type: i32,
    /// The CUDA device's ordinal (0 on the host).
    pub device_id: i32,
    /// The bytes in host memory (read-only), or null for a device tensor or an empty one.
    pub host_data: *const c_void,
    /// The device pointer (a `CUdeviceptr`) of a device tensor, or 0 for a host tensor.
    pub device_ptr: u64,
    /// Its size in bytes.
    pub nbytes: u64,
}

/// Options for a loader: made by `tl_options_new`, freed by `tl_options_free`. One thread
/// at a time.
#[derive(Debug)]
pub struct TlOptions {
    builder: LoaderBuilder,
}

/// A loader: made by `tl_loader_new`, freed by `tl_loader_free`. Loads from several threads
/// at once are allowed.
#[derive(Debug)]
pub struct TlLoader {
    loader: Loader,
    /// `"cuda:0 (requested)"` and the like (`tl_loader_device`).
    device: CString,
}

// What the thread-safety this API states rests on.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    fn movable<T: Send>() {}
    shared::<Loader>();
    shared::<Tensor>();
    shared::<TlModel>();
    // `tl_stream_cancel` shares a stream with the thread in `tl_stream_next`.
    shared::<TlStream>();
    movable::<TensorStream>();
    movable::<LoaderBuilder>();
};

/// A tensor with the C strings its info points to.
#[derive(Debug)]
struct Held {
    tensor: Tensor,
    name: CString,
    dtype: CString,
    shape: Vec<u64>,
}

impl Held {
    /// The tensor, with its info's strings. A name with a NUL (a JSON string may hold one,
    /// as `"w\u0000x"`) cannot be a C string: such a tensor fails the load
    /// (`TL_STATUS_LOAD_FAILED`), rather than reaching C under a shorter name that another
    /// tensor may have.
    fn new(tensor: Tensor) -> Result<Held, Failure> {
        let name = CString::new(tensor.name()).map_err(|_| {
            (
                TlStatus::LoadFailed,
                format!(
                    "tensor '{}' has a NUL in its name, which a C string cannot hold",
                    tensor.name().escape_debug()
                ),
            )
        })?;
        let dtype = CString::new(tensor.dtype().to_string()).unwrap_or_default();
        let shape = tensor.shape().iter().map(|&d| d as u64).collect();
        Ok(Held { tensor, name, dtype, shape })
    }

    fn info(&self) -> TlTensorInfo {
        let (device_type, device_id) = match self.tensor.location() {
            Device::Cuda(i) => (2, i as i32),
            _ => (1, 0),
        };
        // The address alone, never a slice: a DLPack consumer may be writing the memory.
        let host_data = match self.tensor.host_addr() {
            Ok(p) if !self.tensor.is_empty() => p.cast(),
            _ => std::ptr::null(),
        };
        TlTensorInfo {
            name: self.name.as_ptr(),
            dtype: self.dtype.as_ptr(),
            ndim: self.shape.len(),
            shape: self.shape.as_ptr(),
            device_type,
            device_id,
            host_data,
            device_ptr: self.tensor.device_ptr().unwrap_or(0),
            nbytes: self.tensor.len() as u64,
        }
    }

    fn to_dlpack(&self) -> Result<*mut DLManagedTensorVersioned, Failure> {
        self.tensor.to_dlpack().map_err(|e| (TlStatus::Unsupported, e.to_string()))
    }
}

/// Every tensor of a load: made by `tl_load`, freed by `tl_model_free`. Read-only: any
/// number of threads may read it at once.
#[derive(Debug)]
pub struct TlModel {
    tensors: Vec<Held>,
    stats: CString,
}

/// A load whose tensors come one at a time, as they land: made by `tl_stream_open`, freed
/// by `tl_stream_free` (which stops the load). One thread at a time, but for
/// `tl_stream_cancel`, which any thread may call at any time before the free.
#[derive(Debug)]
pub struct TlStream {
    /// What `tl_stream_cancel` touches, alone: shared with a thread in `tl_stream_next`.
    cancel: Cancel,
    /// The rest, taken by one call at a time (a lock never contended but by a caller that
    /// breaks the one-thread rule, which it then makes safe).
    state: std::sync::Mutex<StreamState>,
}

#[derive(Debug)]
struct StreamState {
    /// `None` once a tensor failed here (its name), or the stream was cancelled: the stream
    /// is then over, as after the load's failure, and the rest of its load let go.
    stream: Option<TensorStream>,
    stats: CString,
}

/// A stream's cancellation: asked once, from any thread; the thread waiting in
/// `tl_stream_next` (if any) is woken to see it.
#[derive(Debug, Default)]
struct Cancel {
    asked: std::sync::atomic::AtomicBool,
    /// The waker of the `tl_stream_next` under way.
    waiting: std::sync::Mutex<Option<std::task::Waker>>,
}

impl Cancel {
    fn ask(&self) {
        self.asked.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(w) = self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref() {
            w.wake_by_ref();
        }
    }

    fn asked(&self) -> bool {
        self.asked.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `stream`'s next item, waited for on this thread; `None` once cancellation is asked
    /// (before or while it waits).
    fn next(&self, stream: &mut TensorStream) -> Option<Option<Result<Tensor, tensorlift::LoadError>>> {
        let slot = || self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = std::pin::pin!(stream.next());
        let item = tensorlift::block_on(std::future::poll_fn(|cx| {
            // Set before `asked` is looked at: a cancel either is seen here, or finds the waker.
            let mut waiting = slot();
            if !waiting.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *waiting = Some(cx.waker().clone());
            }
            drop(waiting);
            if self.asked() {
                return std::task::Poll::Ready(None);
            }
            std::future::Future::poll(next.as_mut(), cx).map(Some)
        }));
        *slot() = None;
        item
    }
}

impl StreamState {
    /// Ends the stream: what its load still reads is let go, its stats kept.
    fn end(&mut self) {
        if let Some(st) = self.stream.take() {
            self.stats = stats_json(&st);
        }
    }
}

impl TlStream {
    fn state(&self) -> std::sync::MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One tensor from a stream: made by `tl_stream_next`, freed by `tl_tensor_free`. Read-only.
#[derive(Debug)]
pub struct TlTensor {
    held: Held,
}

type Failure = (TlStatus, String);

/// The longest last-error message kept, in bytes with its NUL (a longer one is cut at a
/// character's boundary and ends with `...`).
const ERROR_MAX: usize = 8192;

thread_local! {
    /// This thread's last error, NUL-terminated, in storage of its own (made at the
    /// thread's first failure or `tl_last_error`, so that other threads carry none of it) that is
    /// never freed or moved while the thread lives: `tl_last_error`'s pointer never dangles,
    /// whatever is called after it (a later failure changes the text it points to).
    static LAST_ERROR: RefCell<Option<Box<[u8]>>> = const { RefCell::new(None) };
}

/// This thread's error buffer, made (empty) at its first use.
fn error_buffer(slot: &mut Option<Box<[u8]>>) -> &mut [u8] {
    slot.get_or_insert_with(|| vec![0u8; ERROR_MAX].into_boxed_slice())
}

/// Keeps `message` as this thread's last error (nothing where the thread's storage is
/// being torn down).
fn set_error(message: &str) {
    let _ = LAST_ERROR.try_with(|e| {
        if let Ok(mut slot) = e.try_borrow_mut() {
            let e = error_buffer(&mut slot);
            let text = message.replace('\0', " ");
            let (text, cut) = match text.len() < ERROR_MAX {
                true => (text.as_str(), ""),
                false => {
                    let mut end = ERROR_MAX - 4;
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    (&text[..end], "...")
                }
            };
            let n = text.len() + cut.len();
            e[..text.len()].copy_from_slice(text.as_bytes());
            e[text.len()..n].copy_from_slice(cut.as_bytes());
            e[n] = 0;
        }
    });
}

/// Runs `f`, turning a failure into its status and message and a panic into
/// `TL_STATUS_PANIC`: nothing unwinds into the caller.
fn guard(f: impl FnOnce() -> Result<TlStatus, Failure>) -> TlStatus {
    let run = || match f() {
        Ok(status) => status,
        Err((status, message)) => {
            set_error(&message);
            status
        }
    };
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(status) => status,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned());
            let _ = catch_unwind(|| set_error(&format!("tensorlift panicked (a bug: please report it): {what}")));
            TlStatus::Panic
        }
    }
}

fn invalid(message: impl Into<String>) -> Failure {
    (TlStatus::InvalidArgument, message.into())
}

fn load_failed(e: tensorlift::LoadError) -> Failure {
    let status = match e {
        tensorlift::LoadError::Unsupported(_) => TlStatus::Unsupported,
        tensorlift::LoadError::InvalidDevice(_) | tensorlift::LoadError::InvalidFilter { .. } => {
            TlStatus::InvalidArgument
        }
        _ => TlStatus::LoadFailed,
    };
    (status, e.to_string())
}

/// A NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string that stays valid for `'a`.
unsafe fn text<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(invalid(format!("{what} is null")));
    }
    // SAFETY: not null, and the caller passes a NUL-terminated string (the function's contract).
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map_err(|_| invalid(format!("{what} is not UTF-8")))
}

/// A NUL-terminated path argument: any bytes but NUL, as the system takes paths (a path
/// need not be UTF-8).
///
/// # Safety
/// As [`text`].
unsafe fn path_arg<'a>(p: *const c_char) -> Result<&'a std::path::Path, Failure> {
    use std::os::unix::ffi::OsStrExt;
    if p.is_null() {
        return Err(invalid("path is null"));
    }
    // SAFETY: not null, and the caller passes a NUL-terminated string (the function's contract).
    let s = unsafe { CStr::from_ptr(p) };
    Ok(std::path::Path::new(std::ffi::OsStr::from_bytes(s.to_bytes())))
}

/// A handle argument.
///
/// # Safety
/// `p` is null or a live handle of this type from this library, not freed, for `'a`.
unsafe fn handle<'a, T>(p: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: null or a live handle (the function's contract): as_ref checks for null.
    unsafe { p.as_ref() }.ok_or_else(|| invalid(format!("{what} is null")))
}

/// A handle argument used mutably.
///
/// # Safety
/// As [`handle`], and no other reference to it is in use meanwhile (one thread at a time).
unsafe fn handle_mut<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, Failure> {
    // SAFETY: null or a live handle used by this thread only (the function's contract).
    unsafe { p.as_mut() }.ok_or_else(|| invalid(format!("{what} is null")))
}

/// Writes `value` to an out-parameter.
///
/// # Safety
/// `p` is null or valid for a write of a `T`.
unsafe fn put<T>(p: *mut T, value: T, what: &str) -> Result<(), Failure> {
    if p.is_null() {
        return Err(invalid(format!("{what} is null")));
    }
    // SAFETY: not null, and valid for a write of a T (the function's contract).
    unsafe { p.write(value) };
    Ok(())
}

/// Checks a handle out-parameter and sets it to null, before any work: a call that fails
/// (or has nowhere to put what it makes) then leaves null there, and makes nothing.
///
/// # Safety
/// `p` is null or valid for a write of a pointer.
unsafe fn clear_out<T>(p: *mut *mut T) -> Result<(), Failure> {
    // SAFETY: the caller's contract for `p`.
    unsafe { put(p, std::ptr::null_mut(), "out") }
}

/// Frees a handle made by `Box::into_raw` (a panic in its drop, a bug, does not unwind
/// into the caller).
///
/// # Safety
/// `p` is null or a live handle of this type from this library, freed once.
unsafe fn free<T>(p: *mut T) {
    if !p.is_null() {
        // SAFETY: a handle this library made with Box::into_raw, freed only here, once.
        let handle = unsafe { Box::from_raw(p) };
        let _ = catch_unwind(AssertUnwindSafe(move || drop(handle)));
    }
}

/// The message of the last call on this thread that returned a status other than
/// `TL_STATUS_OK` (`TL_STATUS_END` included; empty if none has), at most 8 KiB. The pointer
/// stays valid as long as the thread lives, from its first call on; the text it points to
/// is replaced by the next such call on this thread (copy it to keep it). Thread-safe (each
/// thread has its own).
#[no_mangle]
pub extern "C" fn tl_last_error() -> *const c_char {
    // The thread's buffer, which stays where it is while the thread lives (set_error only
    // writes into it); a thread whose storage is going away gets a static empty string.
    // (Made here too, empty, so that the pointer taken before a thread's first failure is
    // the one that failure writes.)
    LAST_ERROR
        .try_with(|e| e.try_borrow_mut().ok().map(|mut b| error_buffer(&mut b).as_ptr().cast::<c_char>()))
        .ok()
        .flatten()
        .unwrap_or(c"".as_ptr())
}

/// tensorlift's version, as a static NUL-terminated string. Thread-safe.
#[no_mangle]
pub extern "C" fn tl_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The ABI this header declares: raised with every change to a struct, an enum's values or
/// a function's signature. A program checks `tl_abi_version() == TL_ABI_VERSION` once at
/// start: a library of another ABI (the shared library has no SONAME yet) then refuses to
/// run instead of misreading its structs.
pub const TL_ABI_VERSION: u32 = 2;

/// The ABI of this library (`TL_ABI_VERSION` as it was built). Thread-safe.
#[no_mangle]
pub extern "C" fn tl_abi_version() -> u32 {
    TL_ABI_VERSION
}

/// New options, with every default (the device: `TENSORLIFT_DEVICE` where it is set, else
/// `"auto"`, a CUDA device when one is usable, else the host). `*out` is null on failure.
/// Thread-safe.
///
/// # Safety
/// `out` is null or valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn tl_options_new(out: *mut *mut TlOptions) -> TlStatus {
    guard(|| {
        // SAFETY: the caller's contract for `out`.
        unsafe { clear_out(out) }?;
        let options = Box::new(TlOptions { builder: Loader::builder() });
        // SAFETY: the caller's contract for `out`.
        unsafe { put(out, Box::into_raw(options), "out") }?;
        Ok(TlStatus::Ok)
    })
}

/// Frees options (null: nothing). Not with the same options in use on another thread.
///
/// # Safety
/// `options` is null or options from `tl_options_new`, not freed yet.
#[no_mangle]
pub unsafe extern "C" fn tl_options_free(options: *mut TlOptions) {
    // SAFETY: the caller's contract for `options`.
    unsafe { free(options) };
}

/// Changes the builder inside `options`.
///
/// # Safety
/// As [`handle_mut`].
unsafe fn change(options: *mut TlOptions, f: impl FnOnce(LoaderBuilder) -> LoaderBuilder) -> Result<TlStatus, Failure> {
    // SAFETY: the caller's contract for `options`.
    let o = unsafe { handle_mut(options, "options") }?;
    // Changed as a copy: a panic in `f` (a bug) leaves the options as they were.
    o.builder = f(o.builder.clone());
    Ok(TlStatus::Ok)
}

/// Where loads go: `"auto"`, `"cpu"`, `"cuda"` or `"cuda:N"`, in any case and with blanks
/// around it ignored (`TL_STATUS_INVALID_ARGUMENT` for anything else). One thread at a
/// time per options.
///
/// # Safety
/// `options` is live options; `device` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tl_options_set_device(options: *mut TlOptions, device: *const c_char) -> TlStatus {
    guard(|| {
        // SAFETY: the caller's contract for `device`.
        let d: Device = unsafe { text(device, "device") }?
            .parse()
            .map_err(|e: tensorlift::InvalidDevice| invalid(e.to_string()))?;
        // SAFETY: the caller's contract for `options`.
        unsafe { change(options, |b| b.device(d)) }
    })
}

/// Loads only the tensors whose names match `pattern` (a name or a glob; called again, any
/// of the patterns); a pattern that is not a valid glob is refused by `tl_loader_new`. One
/// thread at a time per options.
///
/// # Safety
/// `options` is live options; `pattern` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tl_options_add_filter(options: *mut TlOptions, pattern: *const c_char) -> TlStatus {
    guard(|| {
        // SAFETY: the caller's contract for `pattern`.
        let p = unsafe { text(pattern, "pattern") }?.to_owned();
        // SAFETY: the caller's contract for `options`.
        unsafe { change(options, |b| b.filter([p])) }
    })
}

/// Converts floating-point tensors to `dtype` as they land: `"BF16"`, `"F16"` or `"F32"`.
/// One thread at a time per options.
///
/// # Safety
/// `options` is live options; `dtype` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tl_options_set_dtype(options: *mut TlOptions, dtype: *const c_char) -> TlStatus {
    guard(|| {
        // SAFETY: the caller's contract for `dtype`.
        let name = unsafe { text(dtype, "dtype") }?;
        let to = match name {
            "BF16" => Dtype::BF16,
            "F16" => Dtype::F16,
            "F32" => Dtype::F32,
            other => return Err(invalid(format!("dtype '{other}': tensors convert to BF16, F16 or F32"))),
        };
        // SAFETY: the caller's contract for `options`.
        unsafe { change(options, |b| b.convert_to(to)) }
    })
}

/// The most dimensions a slice may name (far more than any tensor has).
const MAX_SLICE_DIMS: usize = 1024;

/// Loads only part of tensor `name`: `[starts[d], stops[d])` of each of its first `dims`
/// dimensions, the others whole (only the bytes it needs are read). One thread at a time
/// per options.
///
/// `dims` over 1,024 is refused (`TL_STATUS_INVALID_ARGUMENT`) before the arrays are read.
///
/// # Safety
/// `options` is live options; `name` a NUL-terminated string; `starts` and `stops` each
/// point to `dims` values (or are null when `dims` is 0).
#[no_mangle]
pub unsafe extern "C" fn tl_options_add_slice(
    options: *mut TlOptions,
    name: *const c_char,
    starts: *const u64,
    stops: *const u64,
    dims: usize,
) -> TlStatus {
    guard(|| {
        // SAFETY: the caller's contract for `name`.
        let name = unsafe { text(name, "name") }?.to_owned();
        if dims > 0 && (starts.is_null() || stops.is_null()) {
            return Err(invalid("starts or stops is null"));
        }
        // Refused before the arrays are read: a count no tensor has (a caller's bug, such as
        // `(size_t)-1`) would read past them, or ask for memory that cannot be had.
        if dims > MAX_SLICE_DIMS {
            return Err(invalid(format!("slice of '{name}': {dims} dimensions, more than {MAX_SLICE_DIMS}")));
        }
        let (starts, stops): (&[u64], &[u64]) = if dims == 0 {
            (&[], &[])
        } else {
            // SAFETY: `starts` points to `dims` values (the function's contract), not null.
            let a = unsafe { std::slice::from_raw_parts(starts, dims) };
            // SAFETY: so does `stops`.
            let b = unsafe { std::slice::from_raw_parts(stops, dims) };
            (a, b)
        };
        let mut ranges = Vec::with_capacity(dims);
        for (d, (&a, &b)) in starts.iter().zip(stops).enumerate() {
            let (a, b) = (usize::try_from(a), usize::try_from(b));
            match (a, b) {
                (Ok(a), Ok(b)) if a <= b => ranges.push(a..b),
                _ => return Err(invalid(format!("slice of '{name}': dimension {d}: start after stop"))),
            }
        }
        // SAFETY: the caller's contract for `options`.
        unsafe { change(options, |b| b.slice(name, TensorSlice::new(ranges))) }
    })
}

/// Checks each shard's SHA-256 as it is read: `"required"` (every shard the load reads must
/// have an expected digest: with a filter, the shards that hold its tensors, and any that
/// lists no tensor) or
/// `"if-known"`; `"off"` does not. One thread at a time per options.
///
/// # Safety
/// `options` is live options; `policy` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tl_options_set_verify(options: *mut TlOptions, policy: *const c_char) -> TlStatus {
    guard(|| {
        // SAFETY: the caller's contract for `policy`.
        let name = unsafe { text(policy, "policy") }?;
        let v: Verify = name.parse().map_err(invalid)?;
        // SAFETY: the caller's contract for `options`.
        unsafe { change(options, |b| b.verify(v)) }
    })
}

/// A loader with `options` (which stay the caller's, unchanged): its device is chosen and
/// probed here (with no device set, `TENSORLIFT_DEVICE` is read: an invalid value there is
/// `TL_STATUS_INVALID_ARGUMENT`). `*out` is null on failure. Thread-safe for distinct
/// options.
///
/// # Safety
/// `options` is live options; `out` valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn tl_loader_new(options: *const TlOptions, out: *mut *mut TlLoader) -> TlStatus {
    guard(|| {
        // SAFETY: the caller's contract for `out`.
        unsafe { clear_out(out) }?;
        // SAFETY: the caller's contract for `options`.
        let o = unsafe { handle(options, "options") }?;
        // Each loader keeps the host memory of its own dropped loads (not shared with other
        // loaders made from the same options).
        let builder = o.builder.clone().reuse_host_memory(true);
        let loader = builder.build().map_err(load_failed)?;
        let device = CString::new(format!("{} ({})", loader.device(), loader.device_reason()).replace('\0', " "))
            .unwrap_or_default();
        // SAFETY: the caller's contract for `out`.
        unsafe { put(out, Box::into_raw(Box::new(TlLoader { loader, device })), "out") }?;
        Ok(TlStatus::Ok)
    })
}

/// Frees a loader (null: nothing). Models and tensors it loaded stay valid. Not while
/// another thread uses it.
///
/// # Safety
/// `loader` is null or a loader from `tl_loader_new`, not freed yet.
#[no_mangle]
pub unsafe extern "C" fn tl_loader_free(loader: *mut TlLoader) {
    // SAFETY: the caller's contract for `loader`.
    unsafe { free(loader) };
}

/// The device a loader loads to and why, as `"cuda:0 (requested)"` or `"cpu (no CUDA
/// driver: ...)"`; valid until the loader is freed. Thread-safe.
///
/// # Safety
/// `loader` is a live loader; `out` valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn tl_loader_device(loader: *const TlLoader, out: *mut *const c_char) -> TlStatus {
    guard(|| {
        // SAFETY: the caller's contract for `loader`.
        let l = unsafe { handle(loader, "loader") }?;
        // SAFETY: the caller's contract for `out`.
        unsafe { put(out, l.device.as_ptr(), "out") }?;
        Ok(TlStatus::Ok)
    })
}

/// Gives back to the system the host memory a loader keeps from its dropped loads (a load
/// reuses it, already faulted in, when it fits; the loader keeps at most its largest load's
/// memory); memory of tensors freed after this is not kept until the next load.
/// Thread-safe.
///
/// # Safety
/// `loader` is a live loader.
#[no_mangle]
pub unsafe extern "C" fn tl_loader_release_host_memory(loader: *const TlLoader) -> TlStatus {
    guard(|| {
        // SAFETY: the caller's contract for `loader`.
        let l = unsafe { handle(loader, "loader") }?;
        l.loader.release_host_memory();
        Ok(TlStatus::Ok)
    })
}

/// Loads every tensor of `path` (a `.safetensors` file, an index JSON or a folder; PyTorch
/// `.bin` files too) into a model; `*out` is null on failure. Thread-safe: several threads
/// may load with one loader.
///
/// # Safety
/// `loader` is a live loader; `path` a NUL-terminated string; `out` valid for a write of a
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn tl_load(loader: *const TlLoader, path: *const c_char, out: *mut *mut TlModel) -> TlStatus {
    guard(|| {
        // SAFETY: the caller's contract for `out`.
        unsafe { clear_out(out) }?;
        // SAFETY: the caller's contract for `loader`.
        let l = unsafe { handle(loader, "loader") }?;
        // SAFETY: the caller's contract for `path`.
        let p = unsafe { path_arg(path) }?;
        let model: Model = l.loader.load_blocking(p).map_err(load_failed)?;
        let stats = CString::new(model.stats().to_json().to_string()).unwrap_or_default();
        let tensors = model.into_tensors().into_iter().map(Held::new).collect::<Result<_, _>>()?;
        // SAFETY: the caller's contract for `out`.
        unsafe { put(out, Box::into_raw(Box::new(TlModel { tensors, stats })), "out") }?;
        Ok(TlStatus::Ok)
    })
}

/// Frees a model (null: nothing). Memory a DLPack export of one of its tensors still holds
/// lives on until that export's deleter runs. Not while another thread reads it.
///
/// # Safety
/// `model` is null or a model from `tl_load`, not freed yet.
#[no_mangle]
pub unsafe extern "C" fn tl_model_free(model: *mut TlModel) {
    // SAFETY: the caller's contract for `model`.
    unsafe { free(model) };
}

/// Number of tensors in a model (0 for null). Thread-safe.
///
/// # Safety
/// `model` is null or a live model.
#[no_mangle]
pub unsafe extern "C" fn tl_model_len(model: *const TlModel) -> usize {
    // SAFETY: the caller's contract for `model`.
    unsafe { model.as_ref() }.map_or(0, |m| m.tensors.len())
}

/// Tensor `index` of a model (the tensors are in name order). Thread-safe.
///
/// # Safety
/// `model` is a live model; `out` valid for a write of a `TlTensorInfo`.
#[no_mangle]
pub unsafe extern "C" fn tl_model_tensor(model: *const TlModel, index: usize, out: *mut TlTensorInfo) -> TlStatus {
    guard(|| {
        // SAFETY: the caller's contract for `model`.
        let m = unsafe { handle(model, "model") }?;
        let held = m
            .tensors
            .get(index)
            .ok_or_else(|| invalid(format!("index {index}: the model has {} tensors", m.tensors.len())))?;
        // SAFETY: the caller's contract for `out`.
        unsafe { put(out, held.info(), "out") }?;
        Ok(TlStatus::Ok)
    })
}

/// The index of the tensor named `name` (`TL_STATUS_NOT_FOUND` when there is none).
/// Thread-safe.
///
/// # Safety
/// `model` is a live model; `name` a NUL-terminated string; `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn tl_model_find(model: *const TlModel, name: *const c_char, out: *mut usize) -> TlStatus {
    guard(|| {
        // SAFETY: the caller's contract for `model`.
        let m = unsafe { handle(model, "model") }?;
        // SAFETY: the caller's contract for `name`.
        let n = unsafe { text(name, "name") }?;
        // (A null `out` is refused whether or not the name is found.)
        if out.is_null() {
            return Err(invalid("out is null"));
        }
        // The tensors are in name order (a binary search).
        let i = m
            .tensors
            .binary_search_by(|h| h.tensor.name().cmp(n))
            .map_err(|_| (TlStatus::NotFound, format!("no tensor named '{n}'")))?;
        // SAFETY: the caller's contract for `out`.
        unsafe { put(out, i, "out") }?;
        Ok(TlStatus::Ok)
    })
}

/// What the load did, as the JSON object `tensorlift load --json` prints (`seconds`,
/// `gbps`, `bytes`, `device`, ...); valid as long as the model. Thread-safe.
///
/// # Safety
/// `model` is a live model; `out` valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn tl_model_stats_json(model: *const TlModel, out: *mut *const c_char) -> TlStatus {
    guard(|| {
        // SAFETY: the caller's contract for `model`.
        let m = unsafe { handle(model, "model") }?;
        // SAFETY: the caller's contract for `out`.
        unsafe { put(out, m.stats.as_ptr(), "out") }?;
        Ok(TlStatus::Ok)
    })
}

/// Tensor `index` of a model as a DLPack `DLManagedTensorVersioned` (read-only on the host),
/// without a copy: its deleter, which the consumer calls once, keeps the memory alive until
/// then, also after the model is freed. Thread-safe.
///
/// # Safety
/// `model` is a live model; `out` valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn tl_model_to_dlpack(
    model: *const TlModel,
    index: usize,
    out: *mut *mut DLManagedTensorVersioned,
) -> TlStatus {
    guard(|| {
        // SAFETY: the caller's contract for `out`.
        unsafe { clear_out(out) }?;
        // SAFETY: the caller's contract for `model`.
        let m = unsafe { handle(model, "model") }?;
        let held = m
            .tensors
            .get(index)
            .ok_or_else(|| invalid(format!("index {index}: the model has {} tensors", m.tensors.len())))?;
        let managed = held.to_dlpack()?;
        // SAFETY: the caller's contract for `out`, checked not null above (so the export is
        // not lost).
        unsafe { put(out, managed, "out") }?;
        Ok(TlStatus::Ok)
    })
}

/// Starts loading `path`: its tensors come one at a time from `tl_stream_next`, as they
/// land. Thread-safe (the stream is then the calling thread's, or one thread's at a time).
///
/// # Safety
/// `loader` is a live loader; `path` a NUL-terminated string; `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn tl_stream_open(
    loader: *const TlLoader,
    path: *const c_char,
    out: *mut *mut TlStream,
) -> TlStatus {
    guard(|| {
        // SAFETY: the caller's contract for `out`.
        unsafe { clear_out(out) }?;
        // SAFETY: the caller's contract for `loader`.
        let l = unsafe { handle(loader, "loader") }?;
        // SAFETY: the caller's contract for `path`.
        let p = unsafe { path_arg(path) }?;
        let stream = l.loader.stream_blocking(p).map_err(load_failed)?;
        let s = TlStream {
            cancel: Cancel::default(),
            state: std::sync::Mutex::new(StreamState { stream: Some(stream), stats: CString::default() }),
        };
        // SAFETY: the caller's contract for `out`.
        unsafe { put(out, Box::into_raw(Box::new(s)), "out") }?;
        Ok(TlStatus::Ok)
    })
}

/// The next tensor of a stream, once it has landed (blocking until then): `TL_STATUS_OK`
/// with a tensor, `TL_STATUS_END` when there is none left (`*out` is then null), the load's
/// failure (the stream is then over; after `TL_STATUS_PANIC` too), or
/// `TL_STATUS_CANCELLED` once `tl_stream_cancel` was called (before, or while this waits:
/// the load is then stopped as by `tl_stream_free`, and every later call says the same).
/// One thread at a time per stream.
///
/// # Safety
/// `stream` is a live stream; `out` valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn tl_stream_next(stream: *mut TlStream, out: *mut *mut TlTensor) -> TlStatus {
    guard(|| {
        // SAFETY: the caller's contract for `out`.
        unsafe { clear_out(out) }?;
        // SAFETY: the caller's contract for `stream` (shared: `tl_stream_cancel` may hold it
        // too; what this call changes is behind the state's lock).
        let s = unsafe { handle(stream.cast_const(), "stream") }?;
        let mut state = s.state();
        let state = &mut *state;
        // A panic midway (a tensorlift bug) leaves the stream half through a step: it is
        // let go, so that later calls end (`TL_STATUS_END`) rather than drive it on.
        let next = match catch_unwind(AssertUnwindSafe(|| match state.stream.as_mut() {
            Some(st) => s.cancel.next(st),
            None => Some(None),
        })) {
            Ok(next) => next,
            Err(payload) => {
                if let Some(st) = state.stream.take() {
                    state.stats = catch_unwind(AssertUnwindSafe(|| stats_json(&st))).unwrap_or_else(|_| c"{}".into());
                    let _ = catch_unwind(AssertUnwindSafe(move || drop(st)));
                }
                std::panic::resume_unwind(payload)
            }
        };
        // Cancelled (now or before): the load stops here, as in `tl_stream_free`, its stats
        // kept.
        let next = match next {
            Some(next) if !s.cancel.asked() => next,
            _ => {
                state.end();
                // SAFETY: as below.
                unsafe { put(out, std::ptr::null_mut(), "out") }?;
                return Err((TlStatus::Cancelled, "the stream was cancelled (tl_stream_cancel)".to_owned()));
            }
        };
        match next.map(|r| r.map_err(load_failed).and_then(Held::new)) {
            Some(Ok(held)) => {
                // SAFETY: the caller's contract for `out` (checked not null).
                unsafe { put(out, Box::into_raw(Box::new(TlTensor { held })), "out") }?;
                Ok(TlStatus::Ok)
            }
            Some(Err(e)) => {
                // The engine's stream ends after its failure; one of a tensor's name here
                // ends it the same way, with what it still reads let go (its stats kept).
                state.end();
                // SAFETY: as above.
                unsafe { put(out, std::ptr::null_mut(), "out") }?;
                Err(e)
            }
            None => {
                // SAFETY: as above.
                unsafe { put(out, std::ptr::null_mut(), "out") }?;
                // (Said, so that a caller that reports any status but OK with the last
                // error does not report an older failure's.)
                set_error("the stream has no tensor left");
                Ok(TlStatus::End)
            }
        }
    })
}

/// A stream's stats as the JSON `tl_stream_stats_json` gives.
fn stats_json(stream: &TensorStream) -> CString {
    CString::new(stream.stats().to_json().to_string()).unwrap_or_default()
}

/// What the stream's load did so far (complete once `tl_stream_next` returned
/// `TL_STATUS_END`), as `tl_model_stats_json`; valid until the next `tl_stream_next` or
/// `tl_stream_free` on the stream, or the next `tl_stream_stats_json` that finds the stats
/// changed.
///
/// # Safety
/// `stream` is a live stream; `out` valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn tl_stream_stats_json(stream: *mut TlStream, out: *mut *const c_char) -> TlStatus {
    guard(|| {
        // SAFETY: the caller's contract for `stream` (shared, as in `tl_stream_next`).
        let s = unsafe { handle(stream.cast_const(), "stream") }?;
        let mut state = s.state();
        // Made again only where the stats changed: a pointer given before stays valid
        // while they have not (and always until `tl_stream_next` or `tl_stream_free`).
        if let Some(st) = &state.stream {
            let now = stats_json(st);
            if now != state.stats {
                state.stats = now;
            }
        }
        // (The text lives in the stream, not in the lock's guard: valid as said above.)
        let text = state.stats.as_ptr();
        drop(state);
        // SAFETY: the caller's contract for `out`.
        unsafe { put(out, text, "out") }?;
        Ok(TlStatus::Ok)
    })
}

/// Cancels a stream: a `tl_stream_next` waiting on it returns `TL_STATUS_CANCELLED` without
/// waiting for its tensor (once the load has stopped, as by `tl_stream_free`, on that call's
/// thread), and so does every later one. The one call on a stream that any thread may make
/// at any time, while another is in `tl_stream_next` included, until `tl_stream_free`
/// begins; calling it again changes nothing. Tensors the stream gave stay valid. (`tl_load` cannot be cancelled: a load that
/// may need to stop is read through a stream.) Not for a signal handler: it takes a lock;
/// a handler that wants a load stopped tells a thread of the program's, which calls it.
///
/// # Safety
/// `stream` is a live stream (not freed, nor being freed).
#[no_mangle]
pub unsafe extern "C" fn tl_stream_cancel(stream: *const TlStream) -> TlStatus {
    guard(|| {
        // SAFETY: the caller's contract for `stream`; `cancel` is shared with `tl_stream_next`.
        let s = unsafe { handle(stream, "stream") }?;
        s.cancel.ask();
        Ok(TlStatus::Ok)
    })
}

/// Frees a stream (null: nothing): a load still going on stops, its copies are waited for,
/// its reads not yet started are given up and those under way end on the I/O threads (which
/// free their buffers), and what it held is freed. Tensors it gave stay valid.
///
/// # Safety
/// `stream` is null or a stream from `tl_stream_open`, not freed yet.
#[no_mangle]
pub unsafe extern "C" fn tl_stream_free(stream: *mut TlStream) {
    // SAFETY: the caller's contract for `stream`.
    unsafe { free(stream) };
}

/// A streamed tensor's info. Thread-safe.
///
/// # Safety
/// `tensor` is a live tensor; `out` valid for a write of a `TlTensorInfo`.
#[no_mangle]
pub unsafe extern "C" fn tl_tensor_info(tensor: *const TlTensor, out: *mut TlTensorInfo) -> TlStatus {
    guard(|| {
        // SAFETY: the caller's contract for `tensor`.
        let t = unsafe { handle(tensor, "tensor") }?;
        // SAFETY: the caller's contract for `out`.
        unsafe { put(out, t.held.info(), "out") }?;
        Ok(TlStatus::Ok)
    })
}

/// A streamed tensor as DLPack, as `tl_model_to_dlpack`. Thread-safe.
///
/// # Safety
/// `tensor` is a live tensor; `out` valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn tl_tensor_to_dlpack(
    tensor: *const TlTensor,
    out: *mut *mut DLManagedTensorVersioned,
) -> TlStatus {
    guard(|| {
        // SAFETY: the caller's contract for `out`.
        unsafe { clear_out(out) }?;
        // SAFETY: the caller's contract for `tensor`.
        let t = unsafe { handle(tensor, "tensor") }?;
        let managed = t.held.to_dlpack()?;
        // SAFETY: the caller's contract for `out` (checked not null).
        unsafe { put(out, managed, "out") }?;
        Ok(TlStatus::Ok)
    })
}

/// Frees a streamed tensor (null: nothing); a DLPack export of it keeps its memory alive.
///
/// # Safety
/// `tensor` is null or a tensor from `tl_stream_next`, not freed yet.
#[no_mangle]
pub unsafe extern "C" fn tl_tensor_free(tensor: *mut TlTensor) {
    // SAFETY: the caller's contract for `tensor`.
    unsafe { free(tensor) };
}
