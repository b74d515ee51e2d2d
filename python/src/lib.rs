//! The `tensorlift._tensorlift` extension module: loads through the `tensorlift` crate, with
//! the GIL released, and hands tensors over without a copy through DLPack
//! (`__dlpack__` / `__dlpack_device__`), on the host and on CUDA devices.
//!
//! The unsafe code here is the FFI edge with CPython's capsule API; each block says why it
//! holds.

use std::ffi::CStr;
use std::sync::Arc;

use pyo3::exceptions::{PyBufferError, PyFileNotFoundError, PyRuntimeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use tensorlift::dlpack::{DLManagedTensor, DLManagedTensorVersioned};
use tensorlift::{Device, LoadError, Loader};

const VERSIONED_NAME: &CStr = c"dltensor_versioned";
const LEGACY_NAME: &CStr = c"dltensor";

/// A loaded tensor: its bytes stay where the load put them (host memory or a CUDA device)
/// and are handed to numpy, torch or any DLPack consumer without a copy.
#[pyclass(module = "tensorlift", name = "Tensor", frozen)]
struct PyTensor {
    inner: tensorlift::Tensor,
}

#[pymethods]
impl PyTensor {
    /// The tensor's name in the checkpoint.
    #[getter]
    fn name(&self) -> &str {
        self.inner.name()
    }

    /// The safetensors dtype (`"BF16"`, `"F32"`, ...).
    #[getter]
    fn dtype(&self) -> String {
        self.inner.dtype().to_string()
    }

    /// The dimensions.
    #[getter]
    fn shape(&self) -> Vec<usize> {
        self.inner.shape().to_vec()
    }

    /// `"cpu"` or `"cuda:N"`.
    #[getter]
    fn device(&self) -> String {
        self.inner.location().to_string()
    }

    /// Bytes of data.
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.len()
    }

    /// A copy of the tensor's bytes in host memory (from the device, for a device tensor).
    /// Host memory is copied by the kernel, never read through a reference: a torch tensor
    /// or numpy array over it may be written meanwhile, by a thread that need not hold the
    /// GIL, and a mapped file cut short is an error, not a SIGBUS.
    fn tobytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let bytes = py.detach(|| self.inner.copy_bytes());
        let bytes = bytes.map_err(|e| PyRuntimeError::new_err(format!("{}: {e}", self.inner.name())))?;
        Ok(pyo3::types::PyBytes::new(py, &bytes))
    }

    /// A copy of the tensor's bytes in a new `bytearray`, made by the kernel as `tobytes`
    /// makes it, and without a second copy: for the arrays of a mapped file handed to numpy
    /// and the other frameworks, which the reference's are copies (a mapped file cut short
    /// is a `RuntimeError` here, and the array lives on whatever becomes of the file). The
    /// bytearray is made uninitialised with the GIL held, then zeroed and filled with it
    /// released: other Python threads do not wait on a large tensor's page faults.
    fn _copy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyByteArray>> {
        let inner = &self.inner;
        let len = inner.len();
        let size = isize::try_from(len).map_err(|_| PyValueError::new_err(format!("{len} bytes")))?;
        // SAFETY: a null source asks for a new bytearray of `size` uninitialised bytes; the
        // call returns a new reference, or null with an exception set.
        let made = unsafe { ffi::PyByteArray_FromStringAndSize(std::ptr::null(), size) };
        // SAFETY: as above: owned, or null with an exception set (which becomes the error).
        let array = unsafe { Bound::from_owned_ptr_or_err(py, made)? };
        // SAFETY: `array` is the bytearray just made.
        let array = unsafe { array.cast_into_unchecked::<pyo3::types::PyByteArray>() };
        // SAFETY: a bytearray's buffer: `len` bytes (and a NUL) that stay where they are until
        // the bytearray is resized or freed.
        let data = unsafe { ffi::PyByteArray_AsString(array.as_ptr()) } as usize;
        py.detach(|| {
            // SAFETY: `data` is the new bytearray's buffer of `len` bytes, which no other code
            // can reach while this call holds the one reference to it (nothing else can
            // resize or free it).
            unsafe { std::ptr::write_bytes(data as *mut u8, 0, len) };
            // SAFETY: the same buffer, now initialised (zeroed), and reached only through this
            // slice until the call returns.
            let buf = unsafe { std::slice::from_raw_parts_mut(data as *mut u8, len) };
            inner.copy_bytes_into(buf)
        })
        .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        Ok(array)
    }

    /// The tensor's bytes as a one-dimensional `uint8` DLPack producer, without a copy.
    fn raw_bytes(&self) -> PyRawBytes {
        PyRawBytes { inner: self.inner.clone(), view: View::Bytes, writable: false }
    }

    /// A DLPack producer of the tensor (or, with `raw`, of its bytes) that does not mark host
    /// memory read-only: for the numpy arrays `safe_open` and `load_file` hand out, which
    /// the reference's are writable. Such an array views memory no other tensor's views (a
    /// tensor's range of its load, or a private copy-on-write map); tensorlift reads it from
    /// then on only through the kernel (`tobytes`, a tied twin copied from it), never through
    /// a reference. A tensor that shares its bytes with another (a PyTorch file's tied
    /// weights) stays read-only. (torch ignores DLPack's read-only flag: its tensors over
    /// host memory are writable whatever the flag says, and read the same way.)
    fn _writable(&self, raw: bool) -> PyRawBytes {
        let view = if raw { View::Bytes } else { View::Typed };
        PyRawBytes { inner: self.inner.clone(), view, writable: !self.inner.shares_bytes() }
    }

    /// `(device_type, device_id)` as DLPack numbers them: `(1, 0)` for the host, `(2, N)`
    /// for CUDA device N.
    fn __dlpack_device__(&self) -> (i32, i32) {
        dlpack_device(&self.inner)
    }

    /// A DLPack capsule of the tensor, without a copy: `dltensor_versioned` (DLPack 1.x)
    /// when the consumer accepts `max_version >= (1, 0)`, else the legacy `dltensor`. The
    /// tensor's memory stays alive until the consumer is done with it. The bytes are
    /// complete on the device before any tensor is handed out, so `stream` needs no wait.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<Py<PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let _ = stream;
        export(py, &self.inner, View::Typed, false, max_version, dl_device, copy)
    }

    fn __repr__(&self) -> String {
        format!(
            "Tensor(name={:?}, dtype={}, shape={:?}, device={})",
            self.inner.name(),
            self.inner.dtype(),
            self.inner.shape(),
            self.inner.location()
        )
    }
}

/// A capsule destructor: deletes the tensor unless a consumer took it (and renamed the
/// capsule `used_...`, as DLPack requires).
unsafe extern "C" fn drop_versioned(capsule: *mut ffi::PyObject) {
    drop_capsule::<DLManagedTensorVersioned>(capsule, VERSIONED_NAME, |p| {
        // SAFETY: a pointer our __dlpack__ made, not taken by a consumer, deleted once.
        unsafe { tensorlift::dlpack::delete_versioned(p) }
    });
}

unsafe extern "C" fn drop_legacy(capsule: *mut ffi::PyObject) {
    drop_capsule::<DLManagedTensor>(capsule, LEGACY_NAME, |p| {
        // SAFETY: a pointer our __dlpack__ made, not taken by a consumer, deleted once.
        unsafe { tensorlift::dlpack::delete_legacy(p) }
    });
}

fn drop_capsule<T>(capsule: *mut ffi::PyObject, name: &CStr, delete: impl FnOnce(*mut T)) {
    // SAFETY: CPython calls a capsule's destructor with the capsule, holding the GIL; a
    // consumed capsule has another name, and IsValid then answers 0 without raising.
    if unsafe { ffi::PyCapsule_IsValid(capsule, name.as_ptr()) } != 1 {
        return;
    }
    // SAFETY: the capsule is valid under this name (checked just now).
    let p = unsafe { ffi::PyCapsule_GetPointer(capsule, name.as_ptr()) };
    if !p.is_null() {
        delete(p.cast());
    }
}

fn device_of(device: &str) -> PyResult<Device> {
    device
        .parse()
        .map_err(|e: tensorlift::InvalidDevice| raised_as(&ARGUMENT_ERROR, e.to_string(), PyValueError::new_err))
}

/// The class a checkpoint that is not valid is raised as: the package's `SafetensorError`
/// that is also a `ValueError` (what the reference raises, and what tensorlift raised
/// before), given by the package when it is imported (`_set_error_classes`).
static FORMAT_ERROR: pyo3::sync::PyOnceLock<Py<pyo3::types::PyType>> = pyo3::sync::PyOnceLock::new();
/// The class device memory that does not suffice is raised as (a `RuntimeError`), so that a
/// caller can read to the host instead (the vLLM loader does).
static DEVICE_MEMORY_ERROR: pyo3::sync::PyOnceLock<Py<pyo3::types::PyType>> = pyo3::sync::PyOnceLock::new();
/// The class an argument the reference also refuses (a device) is raised as: a
/// `SafetensorError`, as the reference raises, and a `ValueError`, as tensorlift raised.
static ARGUMENT_ERROR: pyo3::sync::PyOnceLock<Py<pyo3::types::PyType>> = pyo3::sync::PyOnceLock::new();
/// The class a file that cannot be read, or changed, is raised as: an `OSError`, as
/// tensorlift raised, and a `SafetensorError`, as the reference raises for a read that fails.
static READ_ERROR: pyo3::sync::PyOnceLock<Py<pyo3::types::PyType>> = pyo3::sync::PyOnceLock::new();

/// Sets the classes invalid checkpoints, short device memory, invalid arguments and failed
/// reads are raised as (the package does, once).
#[pyfunction]
fn _set_error_classes(
    py: Python<'_>,
    invalid: Bound<'_, pyo3::types::PyType>,
    device_memory: Bound<'_, pyo3::types::PyType>,
    argument: Bound<'_, pyo3::types::PyType>,
    read: Bound<'_, pyo3::types::PyType>,
) {
    let _ = FORMAT_ERROR.set(py, invalid.unbind());
    let _ = DEVICE_MEMORY_ERROR.set(py, device_memory.unbind());
    let _ = ARGUMENT_ERROR.set(py, argument.unbind());
    let _ = READ_ERROR.set(py, read.unbind());
}

/// An error of the class in `slot`, else of `fallback`'s.
fn raised_as(
    slot: &pyo3::sync::PyOnceLock<Py<pyo3::types::PyType>>,
    msg: String,
    fallback: fn(String) -> PyErr,
) -> PyErr {
    Python::attach(|py| match slot.get(py) {
        Some(cls) => PyErr::from_type(cls.bind(py).clone(), msg),
        None => fallback(msg),
    })
}

/// The Python exception for a load error: `FileNotFoundError` for a missing path,
/// [`READ_ERROR`]'s class (an `OSError`) for a file that cannot be read or changed, `RuntimeError` for an unusable
/// device or memory that does not suffice, [`FORMAT_ERROR`]'s class for an invalid
/// checkpoint, `ValueError` for the rest (with the command line's message).
fn py_err(e: LoadError) -> PyErr {
    let msg = e.to_string();
    match &e {
        LoadError::Format(tensorlift::FormatError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            PyFileNotFoundError::new_err(msg)
        }
        LoadError::Format(tensorlift::FormatError::Io { source, .. })
        | LoadError::Format(tensorlift::FormatError::ShardUnreadable { source, .. })
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            pyo3::exceptions::PyPermissionError::new_err(msg)
        }
        // Reading failed, or the files changed: the file system's fault, not the checkpoint's.
        LoadError::Format(tensorlift::FormatError::Io { .. })
        | LoadError::Format(tensorlift::FormatError::ShardUnreadable { .. })
        | LoadError::Open(_)
        | LoadError::Read { .. }
        | LoadError::ShardChanged { .. } => raised_as(&READ_ERROR, msg, pyo3::exceptions::PyOSError::new_err),
        LoadError::DeviceMemory { .. } => raised_as(&DEVICE_MEMORY_ERROR, msg, PyRuntimeError::new_err),
        LoadError::CudaUnavailable { .. }
        | LoadError::Copy { .. }
        | LoadError::Cuda { .. }
        | LoadError::HostMemory { .. }
        | LoadError::OutOfMemory { .. } => PyRuntimeError::new_err(msg),
        // The checkpoint itself is not valid (its header, its index, its layout).
        LoadError::Format(_) => raised_as(&FORMAT_ERROR, msg, PyValueError::new_err),
        _ => PyValueError::new_err(msg),
    }
}

/// Loads every tensor of `path` (a `.safetensors` file, an index, or a folder) onto `device`
/// (`"cpu"`, `"cuda"`, `"cuda:N"`, `"auto"`), with the GIL released (Ctrl-C interrupts it);
/// returns a dict of name to `Tensor`. `filter`: names or globs to load only those;
/// `progress(done, total)`: called as bytes land. `dtype`: convert floating-point tensors
/// to `"bfloat16"`, `"float16"` or `"float32"` as they land (on the GPU by its kernels).
/// `tp=(rank, world_size, num_key_value_heads)`: load only that tensor-parallel rank's part
/// of each tensor, split as vLLM splits a Llama-family model. `stats`: a dict, filled with
/// the load's statistics once it completes (the keys of `tensorlift load --json`).
#[pyfunction]
#[pyo3(signature = (path, device="cpu", filter=None, progress=None, *, dtype=None, tp=None, stats=None, verify=None, cache_dir=None))]
#[allow(clippy::too_many_arguments)] // Python keyword arguments.
fn load(
    py: Python<'_>,
    path: std::path::PathBuf,
    device: &str,
    filter: Option<Vec<String>>,
    progress: Option<Py<PyAny>>,
    dtype: Option<&str>,
    tp: Option<(usize, usize, usize)>,
    stats: Option<Bound<'_, PyDict>>,
    verify: Option<&str>,
    cache_dir: Option<std::path::PathBuf>,
) -> PyResult<Py<PyDict>> {
    let raised = Raised::default();
    let options = Options { dtype, verify, tp, mapped: false, cache_dir };
    // Built without the GIL: building probes the hardware (CUDA's first call can take
    // seconds), while other threads and Ctrl-C go on.
    let loader = py.detach(|| loader(device, filter, progress, &raised, options))?;
    let model = wait(py, loader.load(&path), &raised)?.map_err(py_err)?;
    if let Some(d) = stats {
        fill_stats(&d, model.stats())?;
    }
    tensors_dict(py, model.tensors_in_file_order().cloned())
}

/// Loads every tensor of `path` onto each of `devices` (`"cuda:N"`, each once), reading
/// each byte of the checkpoint once, with the GIL released; returns a list of dicts of name
/// to `Tensor`, one a device, in order. `tp=num_key_value_heads`: device `i` gets
/// tensor-parallel rank `i` of `len(devices)`'s part of each tensor, split as vLLM splits a
/// Llama-family model; without it, every device gets every tensor whole. `filter`,
/// `progress` and `dtype` as for `load`; `stats`: a dict, filled with the load's statistics
/// (`bytes` and `tensors_loaded` over every device, `devices` their names, `bytes_read` the
/// bytes read once for all of them).
#[pyfunction]
#[pyo3(signature = (path, devices, filter=None, progress=None, *, dtype=None, tp=None, stats=None, cache_dir=None))]
#[allow(clippy::too_many_arguments)] // Python keyword arguments.
fn load_devices(
    py: Python<'_>,
    path: std::path::PathBuf,
    devices: Vec<String>,
    filter: Option<Vec<String>>,
    progress: Option<Py<PyAny>>,
    dtype: Option<&str>,
    tp: Option<usize>,
    stats: Option<Bound<'_, PyDict>>,
    cache_dir: Option<std::path::PathBuf>,
) -> PyResult<Py<PyList>> {
    let world = devices.len();
    let plans = devices
        .iter()
        .enumerate()
        .map(|(rank, d)| {
            let device = device_of(d)?;
            Ok(match tp {
                Some(kv_heads) => tensorlift::DevicePlan::shard(
                    device,
                    tensorlift::Sharding::llama(rank, world, kv_heads)
                        .map_err(|e| PyValueError::new_err(e.to_string()))?,
                ),
                None => tensorlift::DevicePlan::replica(device),
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    let raised = Raised::default();
    let options = Options { dtype, cache_dir, ..Options::default() };
    let loader = py.detach(|| configure(Loader::builder().devices(plans), filter, progress, &raised, options))?;
    let models = wait(py, loader.load_devices(&path), &raised)?.map_err(py_err)?;
    if let (Some(d), Some(m)) = (stats, models.first()) {
        fill_stats(&d, m.stats())?;
        // The load's: every device's bytes and tensors, and the devices (`device`: the first).
        let bytes: u64 = models.iter().map(|m| m.stats().bytes).sum();
        let secs = m.stats().wall.as_secs_f64();
        d.set_item("bytes", bytes)?;
        d.set_item("tensors_loaded", models.iter().map(|m| m.stats().tensors).sum::<usize>())?;
        d.set_item("gbps", if secs > 0.0 { bytes as f64 / secs / 1e9 } else { 0.0 })?;
        d.set_item("devices", models.iter().map(|m| m.stats().device.to_string()).collect::<Vec<_>>())?;
    }
    let list = PyList::empty(py);
    for m in models {
        list.append(tensors_dict(py, m.tensors_in_file_order().cloned())?)?;
    }
    Ok(list.unbind())
}

/// A slice as Python takes it: a `(start, end)` range for each leading dimension.
type Ranges = Vec<(usize, usize)>;

/// The part of each of `tensors` (name, shape) that tensor-parallel rank `rank` of `world`
/// loads, split as vLLM splits a Llama-family model with `kv_heads` key/value heads
/// (`tensorlift::Sharding::llama`): `None` for all of it, else a `(start, end)` range for
/// each leading dimension (the others whole). For processes that share a load
/// (`tensorlift.load_group`), so that every rank slices as a one-rank load does.
#[pyfunction]
fn _tp_slices(
    tensors: Vec<(String, Vec<usize>)>,
    rank: usize,
    world: usize,
    kv_heads: usize,
) -> PyResult<Vec<Option<Ranges>>> {
    use tensorlift::SliceRule;
    let rule = tensorlift::Sharding::llama(rank, world, kv_heads).map_err(|e| PyValueError::new_err(e.to_string()))?;
    tensors
        .iter()
        .map(|(name, shape)| {
            let slice = rule.slice(name, shape).map_err(|m| PyValueError::new_err(format!("tensor '{name}': {m}")))?;
            Ok(slice.map(|s| s.ranges().iter().map(|r| (r.start, r.end)).collect()))
        })
        .collect()
}

/// Puts a load's statistics into `dict` (as `json.loads` reads their JSON).
fn fill_stats(dict: &Bound<'_, PyDict>, stats: &tensorlift::LoadStats) -> PyResult<()> {
    let py = dict.py();
    let parsed = py.import("json")?.call_method1("loads", (stats.to_json().to_string(),))?;
    dict.call_method1("update", (parsed,))?;
    Ok(())
}

/// Where a load with `device` would go, and why: `(device, reason)`.
#[pyfunction]
#[pyo3(signature = (device="auto"))]
fn resolve_device(py: Python<'_>, device: &str) -> PyResult<(String, String)> {
    let device = device_of(device)?;
    let loader = py.detach(|| Loader::builder().device(device).build()).map_err(py_err)?;
    Ok((loader.device().to_string(), loader.device_reason().to_owned()))
}

/// A tensor's bytes as a one-dimensional DLPack tensor of `uint8` (for dtypes a consumer
/// does not know, such as bfloat16 in numpy: it reinterprets them), or, from
/// `Tensor._writable`, the tensor as itself, writable.
#[pyclass(module = "tensorlift", name = "RawBytes", frozen)]
struct PyRawBytes {
    inner: tensorlift::Tensor,
    view: View,
    writable: bool,
}

#[pymethods]
impl PyRawBytes {
    fn __dlpack_device__(&self) -> (i32, i32) {
        dlpack_device(&self.inner)
    }

    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<Py<PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let _ = stream;
        export(py, &self.inner, self.view, self.writable, max_version, dl_device, copy)
    }
}

/// How a tensor is exported: as itself, or as its bytes (one-dimensional `uint8`).
#[derive(Clone, Copy)]
enum View {
    Typed,
    Bytes,
}

/// The one `__dlpack__` of `Tensor` and of its `raw_bytes()`: the request checked, then a
/// DLPack 1.x capsule when the consumer takes `max_version >= (1, 0)`, else a legacy one.
/// Host memory is marked read-only (tensorlift's contract) unless `writable`.
fn export(
    py: Python<'_>,
    t: &tensorlift::Tensor,
    view: View,
    writable: bool,
    max_version: Option<(u32, u32)>,
    dl_device: Option<(i32, i32)>,
    copy: Option<bool>,
) -> PyResult<Py<PyAny>> {
    check_request(t, dl_device, copy)?;
    let err = |e: tensorlift::ViewError| PyBufferError::new_err(e.to_string());
    let versioned = max_version.is_some_and(|(major, _)| major >= 1);
    match (view, versioned) {
        (View::Typed, true) => versioned_capsule(py, writable_if(t.to_dlpack().map_err(err)?, writable)),
        (View::Typed, false) => legacy_capsule(py, t.to_dlpack_legacy().map_err(err)?),
        (View::Bytes, true) => versioned_capsule(py, writable_if(t.to_dlpack_bytes().map_err(err)?, writable)),
        (View::Bytes, false) => legacy_capsule(py, t.to_dlpack_bytes_legacy().map_err(err)?),
    }
}

/// Clears the read-only flag of `p` when asked (DLPack before 1.0 has no such flag).
///
/// Memory lent writable (here, or read-only to torch, which ignores the flag) may be written
/// by the consumer at any time, by a thread that need not hold the GIL: from then on this
/// binding reads a tensor's host memory only through the kernel (`Tensor::copy_bytes`, for
/// `tobytes`), never as `Tensor::bytes` gives it, and the engine copies a tied twin's bytes
/// the same way (`dest_host::stored_bytes`). The one exception is a sandbox refusing both of
/// the kernel's ways (`tensor::copy_host`'s last resort).
fn writable_if(p: *mut DLManagedTensorVersioned, writable: bool) -> *mut DLManagedTensorVersioned {
    if writable {
        // SAFETY: p was just made by `to_dlpack*` (a live, boxed managed tensor no consumer
        // holds yet), and only this thread has it.
        unsafe { (*p).flags &= !tensorlift::dlpack::FLAG_READ_ONLY };
    }
    p
}

/// `(device_type, device_id)` as DLPack numbers them: `(1, 0)` for the host, `(2, N)` for
/// CUDA device N.
fn dlpack_device(t: &tensorlift::Tensor) -> (i32, i32) {
    match t.location() {
        Device::Cuda(n) => (tensorlift::dlpack::DEVICE_CUDA, n as i32),
        _ => (tensorlift::dlpack::DEVICE_CPU, 0),
    }
}

/// Refuses a `__dlpack__` request tensorlift cannot honour without a copy: another device,
/// or `copy=True`.
fn check_request(t: &tensorlift::Tensor, dl_device: Option<(i32, i32)>, copy: Option<bool>) -> PyResult<()> {
    if let Some(d) = dl_device {
        if d != dlpack_device(t) {
            return Err(PyBufferError::new_err(format!(
                "tensor '{}' is on {}, and tensorlift does not copy it to DLPack device {d:?}",
                t.name(),
                t.location()
            )));
        }
    }
    if copy == Some(true) {
        return Err(PyBufferError::new_err("tensorlift hands tensors over without a copy (copy=True)"));
    }
    Ok(())
}

/// A `dltensor` capsule (DLPack before 1.0) that owns `p` and deletes it if no consumer
/// takes it.
fn legacy_capsule(py: Python<'_>, p: *mut DLManagedTensor) -> PyResult<Py<PyAny>> {
    // SAFETY: p is a live DLManagedTensor owned by the capsule from here on; the name is a
    // static C string; the destructor matches the name.
    let capsule = unsafe { ffi::PyCapsule_New(p.cast(), LEGACY_NAME.as_ptr(), Some(drop_legacy)) };
    if capsule.is_null() {
        // No capsule took it: delete it here.
        // SAFETY: the one deletion of a pointer no one else holds.
        unsafe { tensorlift::dlpack::delete_legacy(p) };
    }
    // SAFETY: PyCapsule_New returns a new reference, or null with an exception set.
    unsafe { Bound::from_owned_ptr_or_err(py, capsule) }.map(Bound::unbind)
}

/// A `dltensor_versioned` capsule that owns `p` (a managed tensor just made by tensorlift)
/// and deletes it if no consumer takes it.
fn versioned_capsule(py: Python<'_>, p: *mut DLManagedTensorVersioned) -> PyResult<Py<PyAny>> {
    // SAFETY: p is a live DLManagedTensorVersioned owned by the capsule from here on; the
    // name is a static C string; the destructor matches the name.
    let capsule = unsafe { ffi::PyCapsule_New(p.cast(), VERSIONED_NAME.as_ptr(), Some(drop_versioned)) };
    if capsule.is_null() {
        // No capsule took it: delete it here.
        // SAFETY: the one deletion of a pointer no one else holds.
        unsafe { tensorlift::dlpack::delete_versioned(p) };
    }
    // SAFETY: PyCapsule_New returns a new reference, or null with an exception set.
    unsafe { Bound::from_owned_ptr_or_err(py, capsule) }.map(Bound::unbind)
}

/// Waits for `fut` with the GIL released, waking every 50 ms to let Python handle signals:
/// Ctrl-C raises `KeyboardInterrupt` promptly, and dropping the future (the caller's
/// return) cancels the load and frees everything.
fn wait<F: std::future::Future + Send>(py: Python<'_>, fut: F, raised: &Raised) -> PyResult<F::Output>
where
    F::Output: Send,
{
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    // Boxed, so that a load given up is dropped (its reads drained, its memory freed, which
    // can take a while) with the GIL released, not holding up the process's other threads.
    let mut fut = Box::pin(fut);
    loop {
        let polled = py.detach(|| {
            let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
            let mut cx = Context::from_waker(&waker);
            let deadline = std::time::Instant::now() + std::time::Duration::from_millis(50);
            loop {
                if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                    return Some(v);
                }
                let now = std::time::Instant::now();
                if now >= deadline {
                    return None;
                }
                std::thread::park_timeout(deadline - now);
            }
        });
        if let Some(e) = raised.take() {
            // (With a load that finished meanwhile.)
            let_go(py, (fut, polled));
            return Err(e);
        }
        match polled {
            Some(v) => return Ok(v),
            None => {
                if let Err(e) = py.check_signals() {
                    let_go(py, fut);
                    return Err(e);
                }
            }
        }
    }
}

/// Drops `value` (a load given up, or its stream) with the GIL released: its teardown
/// waits for the reads in flight, which would hold up the process's other threads.
fn let_go<T: Send>(py: Python<'_>, value: T) {
    py.detach(move || drop(value));
}

/// A value dropped with the GIL released: a remote checkpoint's plan, when it goes, waits
/// for the copies it queued for the local cache to be written (`safe_open`'s `__exit__`),
/// and Python's other threads run meanwhile.
struct DropsWithoutGil<T: Send>(Option<T>);

impl<T: Send> std::ops::Deref for DropsWithoutGil<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.0.as_ref().expect("taken only when dropped")
    }
}

impl<T: Send> Drop for DropsWithoutGil<T> {
    fn drop(&mut self) {
        if let Some(value) = self.0.take() {
            Python::attach(|py| let_go(py, value));
        }
    }
}

/// An exception raised by a Python callback during a load (a progress callback, or Ctrl-C
/// delivered while it ran): the load stops and the exception is raised to the caller.
#[derive(Clone, Default)]
struct Raised(Arc<std::sync::Mutex<Option<PyErr>>>);

impl Raised {
    fn set(&self, e: PyErr) {
        if let Ok(mut slot) = self.0.lock() {
            slot.get_or_insert(e);
        }
    }
    fn take(&self) -> Option<PyErr> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

/// A loader for `device`, reporting progress to `progress(done, total)` if given; an
/// exception the callback raises goes to `raised`.
/// Host memory kept across loads, when `reuse_host_memory()` asked for it.
static HOST_POOL: std::sync::Mutex<Option<Arc<tensorlift::ArenaPool>>> = std::sync::Mutex::new(None);

fn host_pool() -> Option<Arc<tensorlift::ArenaPool>> {
    HOST_POOL.lock().ok().and_then(|g| g.clone())
}

/// Keeps the host memory of dropped tensors for the next load (`enable=False`: stops, and
/// gives it back). Off by default: memory goes back to the system when tensors are dropped.
#[pyfunction]
#[pyo3(signature = (enable=true))]
fn reuse_host_memory(py: Python<'_>, enable: bool) {
    let Ok(mut g) = HOST_POOL.lock() else { return };
    if enable {
        g.get_or_insert_with(|| tensorlift::ArenaPool::new(usize::MAX));
    } else if let Some(p) = g.take() {
        // Given back with the lock released (and the GIL: unmapping many GB takes a while):
        // a process forked meanwhile would find the lock held forever.
        drop(g);
        py.detach(|| p.release());
    }
}

/// Gives kept host memory back to the system now; memory of tensors dropped after this is
/// not kept until the next load.
#[pyfunction]
fn release_host_memory(py: Python<'_>) {
    if let Some(p) = host_pool() {
        // Unmapping many GB takes a while: other threads run meanwhile.
        py.detach(|| p.release());
    }
}

/// Bytes of host memory kept for the next load.
#[pyfunction]
fn retained_host_memory() -> usize {
    host_pool().map_or(0, |p| p.retained_bytes())
}

/// Options of a load beyond the device, filter and progress.
#[derive(Default)]
struct Options<'a> {
    dtype: Option<&'a str>,
    /// `"required"` or `"if-known"`: each shard's SHA-256 is checked as it is read.
    verify: Option<&'a str>,
    tp: Option<(usize, usize, usize)>,
    /// Tensors as views of the memory-mapped files (`safe_open(..., backend="mmap")`).
    mapped: bool,
    /// Where remote checkpoints are copied as they are read (`LoaderBuilder::remote_cache`).
    cache_dir: Option<std::path::PathBuf>,
}

fn loader(
    device: &str,
    filter: Option<Vec<String>>,
    progress: Option<Py<PyAny>>,
    raised: &Raised,
    options: Options<'_>,
) -> PyResult<Loader> {
    configure(Loader::builder().device(device_of(device)?), filter, progress, raised, options)
}

/// Builds a loader from `b` (its devices chosen) with the rest of a Python call's options.
fn configure(
    mut b: tensorlift::LoaderBuilder,
    filter: Option<Vec<String>>,
    progress: Option<Py<PyAny>>,
    raised: &Raised,
    options: Options<'_>,
) -> PyResult<Loader> {
    if options.mapped {
        // SAFETY: the Python caller chose backend="mmap" (directly, or through
        // `tensorlift.patch()`, whose safe_open takes the reference's default, "mmap", as the
        // libraries it serves expect), whose documented contract (docs/PYTHON.md, the
        // reference safetensors' own for its mmap backend) is MapContract's: the files are
        // not truncated or written while any tensor viewing them lives, and their file
        // system does not fail reads of them.
        b = b.map_views(unsafe { tensorlift::MapContract::new() });
    }
    if let Some(dir) = &options.cache_dir {
        b = b.remote_cache(dir);
    }
    if let Some(v) = options.verify {
        let policy: tensorlift::Verify = v.parse().map_err(PyValueError::new_err)?;
        b = b.verify(policy);
    }
    if let Some(d) = options.dtype {
        let to = match d.trim_start_matches("torch.") {
            "bfloat16" | "bf16" => tensorlift::Dtype::BF16,
            "float16" | "half" | "f16" => tensorlift::Dtype::F16,
            "float32" | "float" | "f32" => tensorlift::Dtype::F32,
            other => {
                return Err(PyValueError::new_err(format!(
                    "dtype '{other}': tensors convert to 'bfloat16', 'float16' or 'float32'"
                )))
            }
        };
        b = b.convert_to(to);
    }
    if let Some((rank, world, kv_heads)) = options.tp {
        b = b.shard(
            tensorlift::Sharding::llama(rank, world, kv_heads).map_err(|e| PyValueError::new_err(e.to_string()))?,
        );
    }
    b = match host_pool() {
        Some(p) => b.host_memory_pool(p),
        None => b.reuse_host_memory(false),
    };
    if let Some(f) = filter {
        b = b.filter(f);
    }
    if let Some(cb) = progress {
        let raised = raised.clone();
        b = b.progress(move |p| {
            Python::attach(|py| {
                if let Err(e) = cb.call1(py, (p.done, p.total)) {
                    raised.set(e);
                }
            })
        });
    }
    b.build().map_err(py_err)
}

fn tensors_dict(py: Python<'_>, tensors: impl IntoIterator<Item = tensorlift::Tensor>) -> PyResult<Py<PyDict>> {
    let dict = PyDict::new(py);
    for t in tensors {
        let name = t.name().to_owned();
        dict.set_item(name, Py::new(py, PyTensor { inner: t })?)?;
    }
    Ok(dict.unbind())
}

/// A checkpoint opened once and planned: its shards stay open, tensors are loaded one by
/// one or a few at a time, and byte ranges of a tensor can be read on their own (slices).
#[pyclass(module = "tensorlift", name = "Checkpoint", frozen)]
struct PyCheckpoint {
    plan: DropsWithoutGil<tensorlift::Checkpoint>,
    /// Each tensor's place in the plan, by name: tensors are asked for one at a time.
    by_name: std::collections::HashMap<String, usize>,
    /// The device its tensors load to, as the caller named it.
    device: String,
    mapped: bool,
    /// The host loader that planned it, kept so that handles open at once share it.
    _planner: Arc<Loader>,
    /// The loader of `device`: for the host, the one that planned it; for another device,
    /// made at the first load, so that a handle opened for a device that cannot be used
    /// opens (its names, shapes and metadata are there) and fails at its first tensor, as
    /// the reference's does.
    loader: std::sync::Mutex<Option<Arc<Loader>>>,
    /// Held while the device's loader is made: threads that load at once make one.
    making: std::sync::Mutex<()>,
}

/// Loaders that `Checkpoint`s share (while one of them lives): a library that keeps a
/// handle open per shard (transformers keeps every shard's open while it loads a model)
/// would otherwise start a reader's threads and rings for each.
static SHARED_LOADERS: std::sync::Mutex<Vec<(LoaderKey, std::sync::Weak<Loader>)>> = std::sync::Mutex::new(Vec::new());

/// What a shared loader is shared by.
#[derive(PartialEq, Eq)]
struct LoaderKey {
    device: String,
    mapped: bool,
    /// The host memory pool's address (0: none), which a live loader keeps alive.
    pool: usize,
    /// The process that built it: a forked child builds its own (the parent's has no
    /// threads there, and reads on the caller's thread).
    pid: u32,
}

/// The loader `Checkpoint`s on `device` (mapped or not) share: one that lives, else a new
/// one.
fn shared_loader(device: &str, mapped: bool) -> PyResult<Arc<Loader>> {
    let pool = host_pool().map_or(0, |p| Arc::as_ptr(&p) as usize);
    let key = LoaderKey { device: device.to_owned(), mapped, pool, pid: std::process::id() };
    let live = |shared: &mut Vec<(LoaderKey, std::sync::Weak<Loader>)>| {
        shared.retain(|(_, l)| l.strong_count() > 0);
        shared.iter().find(|(k, _)| *k == key).and_then(|(_, l)| l.upgrade())
    };
    let lock = || SHARED_LOADERS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(l) = live(&mut lock()) {
        return Ok(l);
    }
    // Built without the lock held: building probes the hardware (CUDA's first call can take
    // seconds), and a process forked meanwhile would find the lock held forever.
    let options = Options { mapped, ..Options::default() };
    let l = Arc::new(loader(device, None, None, &Raised::default(), options)?);
    let mut shared = lock();
    if let Some(other) = live(&mut shared) {
        return Ok(other); // another thread's, built meanwhile: one loader per key
    }
    shared.push((key, Arc::downgrade(&l)));
    Ok(l)
}

#[pymethods]
impl PyCheckpoint {
    #[new]
    #[pyo3(signature = (path, device="cpu", mapped=false))]
    fn new(py: Python<'_>, path: std::path::PathBuf, device: &str, mapped: bool) -> PyResult<Self> {
        // A device name that is no device is refused now, as the reference refuses it; one
        // that cannot be used, at the first load.
        let host = matches!(device_of(device)?, Device::Cpu);
        // Planned on the host whatever the device (a plan is the files', not a device's).
        // (Built without the GIL, as any loader: its first may probe CUDA.)
        let planner = py.detach(|| shared_loader("cpu", mapped && host))?;
        // Interruptible (Ctrl-C), as a load is: a remote checkpoint's planning may wait on
        // its store.
        let plan = wait(py, planner.plan_async(&path), &Raised::default())?.map_err(py_err)?;
        let by_name = plan.tensors().iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        let loader = std::sync::Mutex::new(host.then(|| Arc::clone(&planner)));
        let (device, making) = (device.to_owned(), std::sync::Mutex::new(()));
        let plan = DropsWithoutGil(Some(plan));
        Ok(PyCheckpoint { plan, by_name, device, mapped, _planner: planner, loader, making })
    }

    /// Tensor names, in file order.
    fn keys(&self) -> Vec<String> {
        self.plan.tensors().iter().map(|t| t.name.clone()).collect()
    }

    /// Every shard's `__metadata__`, merged (the first shard's value wins on a conflict).
    fn metadata(&self) -> std::collections::BTreeMap<String, String> {
        self.plan.metadata()
    }

    /// Whether any shard has a `__metadata__` entry.
    fn has_metadata(&self) -> bool {
        self.plan.shards().iter().any(|s| s.metadata.is_some())
    }

    /// `(dtype, shape, nbytes)` of a tensor.
    fn info(&self, name: &str) -> PyResult<(String, Vec<usize>, u64)> {
        let t = self.find(name)?;
        Ok((t.dtype.to_string(), t.shape.clone(), t.len()))
    }

    /// Loads the named tensors (GIL released, interruptible): a dict of name to `Tensor`;
    /// `stats`, a dict filled with the load's statistics; `rows`, a dict of name to
    /// `(start, end)`: of that tensor, only rows `start..end` of its first dimension are
    /// read and returned (a slice as `get_slice` takes one; the name must be in `names`).
    #[pyo3(signature = (names, stats=None, rows=None))]
    fn load(
        &self,
        py: Python<'_>,
        names: Vec<String>,
        stats: Option<Bound<'_, PyDict>>,
        rows: Option<std::collections::HashMap<String, (usize, usize)>>,
    ) -> PyResult<Py<PyDict>> {
        let indices = names.iter().map(|n| self.index(n)).collect::<PyResult<Vec<usize>>>()?;
        let rows = rows.unwrap_or_default();
        if let Some(n) = rows.keys().find(|n| !names.contains(n)) {
            return Err(PyValueError::new_err(format!("rows of tensor '{n}', which is not among the names loaded")));
        }
        let mut plan = self.plan.subset(indices);
        plan.slice_with(
            |t| Ok(rows.get(&t.name).map(|&(a, b)| tensorlift::TensorSlice::rows(a..b))),
            |t, e| PyValueError::new_err(format!("rows of tensor '{}': {e}", t.name)),
        )?;
        let loader = self.device_loader(py)?;
        let model = wait(py, loader.load_plan(plan), &Raised::default())?.map_err(py_err)?;
        if let Some(d) = stats {
            fill_stats(&d, model.stats())?;
        }
        tensors_dict(py, model.tensors_in_file_order().cloned())
    }

    /// `length` bytes at `start` of a tensor's data, read on their own (GIL released).
    fn read_bytes<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        start: u64,
        length: u64,
    ) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        use std::os::unix::fs::FileExt;
        let t = self.find(name)?;
        if start.checked_add(length).is_none_or(|end| end > t.len()) {
            return Err(PyValueError::new_err(format!("bytes {start}..+{length} are outside tensor '{name}'")));
        }
        let shard = t.shard;
        let at = t.file_range.start + start;
        let path = self.plan.shards()[shard].path.clone();
        // Its descriptors, none of its tensors.
        let mut plan = self.plan.subset([]);
        use pyo3::exceptions::{PyMemoryError, PyOSError};
        let os = |e: String| PyOSError::new_err(e);
        let buffer = || -> PyResult<Vec<u8>> {
            let mut buf = Vec::new();
            buf.try_reserve_exact(length as usize)
                .map_err(|_| PyMemoryError::new_err(format!("cannot allocate {length} bytes")))?;
            buf.resize(length as usize, 0);
            Ok(buf)
        };
        // A remote shard: one ranged read of its planned object (same ETag, same length),
        // waited for as a load is (Ctrl-C stops it, and its GETs).
        if let Some(object) = plan.remote_object(shard) {
            let read = tensorlift_io::read_object(object, at, py.detach(buffer)?, 0, length as usize);
            let bytes = wait(py, read, &Raised::default())?.map_err(|f| os(f.error.to_string()))?;
            return Ok(pyo3::types::PyBytes::new(py, &bytes));
        }
        let bytes = py.detach(|| -> PyResult<Vec<u8>> {
            let mut buf = buffer()?;
            // Checked as a load of a plan made before it checks it: the planned file, its
            // header read again where it was reopened or is not certainly unchanged since
            // planning, and the same after the read as when it was taken.
            let (file, taken) = plan.take_checked(shard, tensorlift_io::HeaderCheck::Planned).map_err(|e| match e {
                e @ tensorlift_io::IoError::OutOfMemory { .. } => PyMemoryError::new_err(e.to_string()),
                e => os(e.to_string()),
            })?;
            let read = file.read_exact_at(&mut buf, at);
            let now = file.metadata().map_err(|e| os(format!("{}: cannot stat it: {e}", path.display())))?;
            if let Some(what) = tensorlift_io::identity_change(&taken, &tensorlift_io::file_identity(&now)) {
                let what = format!("{what}, while it was being read");
                return Err(os(tensorlift_io::IoError::Changed { file: path.clone(), what }.to_string()));
            }
            read.map_err(|e| os(format!("{}: {e}", path.display())))?;
            Ok(buf)
        })?;
        Ok(pyo3::types::PyBytes::new(py, &bytes))
    }

    /// The device its tensors load to, and why (an error where that device cannot be used).
    fn device(&self, py: Python<'_>) -> PyResult<(String, String)> {
        let loader = self.device_loader(py)?;
        Ok((loader.device().to_string(), loader.device_reason().to_owned()))
    }
}

impl PyCheckpoint {
    /// The loader of its device: made (without the GIL) at the first call, and an error
    /// each call while that device cannot be used.
    fn device_loader(&self, py: Python<'_>) -> PyResult<Arc<Loader>> {
        let lock = || self.loader.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(l) = lock().as_ref() {
            return Ok(Arc::clone(l));
        }
        py.detach(|| {
            // One thread makes it; the others wait for it, and take it.
            let _making = self.making.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(l) = lock().as_ref() {
                return Ok(Arc::clone(l));
            }
            let made = shared_loader(&self.device, self.mapped)?;
            Ok(Arc::clone(lock().get_or_insert(made)))
        })
    }

    /// The place of tensor `name` in the plan (`KeyError` if it has none).
    fn index(&self, name: &str) -> PyResult<usize> {
        self.by_name.get(name).copied().ok_or_else(|| pyo3::exceptions::PyKeyError::new_err(name.to_owned()))
    }

    fn find(&self, name: &str) -> PyResult<&tensorlift::PlannedTensor> {
        Ok(&self.plan.tensors()[self.index(name)?])
    }
}

/// Tensors of one load as they land: an iterator of `(name, Tensor)`.
#[pyclass(module = "tensorlift", name = "TensorIterator")]
struct PyTensorIterator {
    stream: Option<tensorlift::TensorStream>,
    raised: Raised,
    /// Filled with the load's statistics once the last tensor has come.
    stats: Option<Py<PyDict>>,
}

impl Drop for PyTensorIterator {
    fn drop(&mut self) {
        // Abandoned mid-load (a `break`, an exception, `del`): let go as `close` does.
        if let Some(stream) = self.stream.take() {
            Python::attach(|py| let_go(py, stream));
        }
    }
}

#[pymethods]
impl PyTensorIterator {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<(String, Py<PyTensor>)>> {
        let Some(stream) = self.stream.as_mut() else { return Ok(None) };
        let next = wait(py, stream.next(), &self.raised);
        match next {
            Err(interrupted) => {
                // Dropping the stream cancels the load and frees its memory.
                self.close(py);
                Err(interrupted)
            }
            Ok(None) => {
                // The finished stream is let go first, whatever filling the dict does.
                let finished = self.stream.take();
                if let (Some(d), Some(s)) = (&self.stats, &finished) {
                    fill_stats(d.bind(py), s.stats())?;
                }
                Ok(None)
            }
            Ok(Some(Err(e))) => {
                self.close(py);
                Err(py_err(e))
            }
            Ok(Some(Ok(t))) => Ok(Some((t.name().to_owned(), Py::new(py, PyTensor { inner: t })?))),
        }
    }

    /// Stops the load: what is in flight finishes, and everything is freed. The `stats`
    /// dict, if any, is left as it is: only a load that completes fills it.
    fn close(&mut self, py: Python<'_>) {
        let_go(py, self.stream.take());
    }

    // The `stats` dict is a Python object this one holds: the garbage collector sees it.
    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        if let Some(d) = &self.stats {
            visit.call(d)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.stats = None;
    }
}

/// Yields `(name, Tensor)` as each tensor lands, reading in the background. `stats`: a
/// dict, filled with the load's statistics once the last tensor has come.
#[pyfunction]
#[pyo3(signature = (path, device="cpu", filter=None, progress=None, *, dtype=None, tp=None, stats=None, verify=None, cache_dir=None))]
#[allow(clippy::too_many_arguments)] // Python keyword arguments.
fn iter_tensors(
    py: Python<'_>,
    path: std::path::PathBuf,
    device: &str,
    filter: Option<Vec<String>>,
    progress: Option<Py<PyAny>>,
    dtype: Option<&str>,
    tp: Option<(usize, usize, usize)>,
    stats: Option<Py<PyDict>>,
    verify: Option<&str>,
    cache_dir: Option<std::path::PathBuf>,
) -> PyResult<PyTensorIterator> {
    let raised = Raised::default();
    let options = Options { dtype, verify, tp, mapped: false, cache_dir };
    // Built without the GIL: building probes the hardware (CUDA's first call can take
    // seconds), while other threads and Ctrl-C go on.
    let loader = py.detach(|| loader(device, filter, progress, &raised, options))?;
    // Planned as a load waits (Ctrl-C stops it: a remote checkpoint's planning may wait on
    // its store).
    let stream = wait(py, loader.stream(&path), &raised)?.map_err(py_err)?;
    Ok(PyTensorIterator { stream: Some(stream), raised, stats })
}

/// The plan of `path` as plain data: files (path, header bytes, metadata) and tensors
/// (name, dtype, shape, file, data offsets).
#[pyfunction]
fn inspect(py: Python<'_>, path: std::path::PathBuf) -> PyResult<Py<PyDict>> {
    let plan = py.detach(|| tensorlift::plan(&path)).map_err(|e| py_err(LoadError::Format(e)))?;
    let out = PyDict::new(py);
    let files = pyo3::types::PyList::empty(py);
    for s in plan.shards() {
        let f = PyDict::new(py);
        f.set_item("path", s.path.display().to_string())?;
        f.set_item("name", &s.name)?;
        f.set_item("header_bytes", s.data_start())?;
        f.set_item("data_bytes", s.data_len)?;
        f.set_item("metadata", s.metadata.clone())?;
        files.append(f)?;
    }
    let tensors = pyo3::types::PyList::empty(py);
    for t in plan.tensors() {
        let s = &plan.shards()[t.shard];
        let begin = t.file_range.start - s.data_start();
        let d = PyDict::new(py);
        d.set_item("name", &t.name)?;
        d.set_item("dtype", t.dtype.to_string())?;
        d.set_item("shape", t.shape.clone())?;
        d.set_item("file", &s.name)?;
        d.set_item("data_offsets", (begin, begin + t.len()))?;
        tensors.append(d)?;
    }
    out.set_item("files", files)?;
    out.set_item("tensors", tensors)?;
    out.set_item("total_bytes", plan.total_bytes())?;
    Ok(out.unbind())
}

/// Whether `path` names a remote checkpoint (`s3://`, `gs://`, `az://`, `http(s)://`, ...),
/// read by ranged GETs rather than from a local file.
#[pyfunction]
fn is_remote(path: std::path::PathBuf) -> bool {
    tensorlift::is_remote(&path)
}

/// Host arenas alive in this process (for tests that check memory is freed).
#[pyfunction]
fn _live_host_arenas() -> usize {
    tensorlift_io::HostArena::live_count()
}

/// Declared to need the GIL: a free-threaded CPython (3.14t) keeps the GIL on for this module
/// (and says so when importing it), since nothing here is tested without one.
#[pymodule(gil_used = true)]
fn _tensorlift(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTensor>()?;
    m.add_class::<PyRawBytes>()?;
    m.add_class::<PyCheckpoint>()?;
    m.add_class::<PyTensorIterator>()?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(load_devices, m)?)?;
    m.add_function(wrap_pyfunction!(_tp_slices, m)?)?;
    m.add_function(wrap_pyfunction!(_set_error_classes, m)?)?;
    m.add_function(wrap_pyfunction!(iter_tensors, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(is_remote, m)?)?;
    m.add_function(wrap_pyfunction!(_live_host_arenas, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_device, m)?)?;
    m.add_function(wrap_pyfunction!(reuse_host_memory, m)?)?;
    m.add_function(wrap_pyfunction!(release_host_memory, m)?)?;
    m.add_function(wrap_pyfunction!(retained_host_memory, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
