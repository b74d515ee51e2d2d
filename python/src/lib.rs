//! The `tensorlift._tensorlift` extension module: loads through the `tensorlift` crate, with
//! the GIL released, and hands tensors over without a copy through DLPack
//! (`__dlpack__` / `__dlpack_device__`), on the host and on CUDA devices.
//!
//! The unsafe code here is the FFI edge with CPython's capsule API; each block says why it
//! holds.

use std::ffi::CStr;

use pyo3::exceptions::{PyBufferError, PyFileNotFoundError, PyRuntimeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyDict;
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

    /// `(device_type, device_id)` as DLPack numbers them: `(1, 0)` for the host, `(2, N)`
    /// for CUDA device N.
    fn __dlpack_device__(&self) -> (i32, i32) {
        match self.inner.location() {
            Device::Cuda(n) => (tensorlift::dlpack::DEVICE_CUDA, n as i32),
            _ => (tensorlift::dlpack::DEVICE_CPU, 0),
        }
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
        if let Some(d) = dl_device {
            if d != self.__dlpack_device__() {
                return Err(PyBufferError::new_err(format!(
                    "tensor '{}' is on {}, and tensorlift does not copy it to DLPack device {d:?}",
                    self.inner.name(),
                    self.inner.location()
                )));
            }
        }
        if copy == Some(true) {
            return Err(PyBufferError::new_err("tensorlift hands tensors over without a copy (copy=True)"));
        }
        let err = |e: tensorlift::ViewError| PyBufferError::new_err(e.to_string());
        let capsule = if max_version.is_some_and(|(major, _)| major >= 1) {
            let p = self.inner.to_dlpack().map_err(err)?;
            // SAFETY: p is a live DLManagedTensorVersioned owned by the capsule from here on;
            // the name is a static C string; the destructor matches the name.
            unsafe { ffi::PyCapsule_New(p.cast(), VERSIONED_NAME.as_ptr(), Some(drop_versioned)) }
        } else {
            let p = self.inner.to_dlpack_legacy().map_err(err)?;
            // SAFETY: as above, for the legacy struct and name.
            unsafe { ffi::PyCapsule_New(p.cast(), LEGACY_NAME.as_ptr(), Some(drop_legacy)) }
        };
        // SAFETY: PyCapsule_New returns a new reference, or null with an exception set.
        unsafe { Bound::from_owned_ptr_or_err(py, capsule) }.map(Bound::unbind)
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
    device.parse().map_err(|e: LoadError| PyValueError::new_err(e.to_string()))
}

/// The Python exception for a load error: `FileNotFoundError` for a missing path,
/// `RuntimeError` for an unusable device, `ValueError` for an invalid checkpoint (with the
/// command line's message).
fn py_err(e: LoadError) -> PyErr {
    let msg = e.to_string();
    match &e {
        LoadError::Format(tensorlift::FormatError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            PyFileNotFoundError::new_err(msg)
        }
        LoadError::CudaUnavailable { .. }
        | LoadError::DeviceMemory { .. }
        | LoadError::Copy { .. }
        | LoadError::Cuda { .. }
        | LoadError::HostMemory { .. }
        | LoadError::OutOfMemory { .. } => PyRuntimeError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

/// Loads every tensor of `path` (a `.safetensors` file, an index, or a folder) onto `device`
/// (`"cpu"`, `"cuda"`, `"cuda:N"`, `"auto"`), with the GIL released; returns a dict of name
/// to `Tensor`.
#[pyfunction]
#[pyo3(signature = (path, device="cpu"))]
fn load(py: Python<'_>, path: std::path::PathBuf, device: &str) -> PyResult<Py<PyDict>> {
    let device = device_of(device)?;
    let model = py
        .detach(|| {
            let loader = Loader::builder().device(device).build()?;
            loader.load_blocking(&path)
        })
        .map_err(py_err)?;
    let dict = PyDict::new(py);
    for t in model.into_tensors() {
        let name = t.name().to_owned();
        dict.set_item(name, Py::new(py, PyTensor { inner: t })?)?;
    }
    Ok(dict.unbind())
}

/// Where a load with `device` would go, and why: `(device, reason)`.
#[pyfunction]
#[pyo3(signature = (device="auto"))]
fn resolve_device(py: Python<'_>, device: &str) -> PyResult<(String, String)> {
    let device = device_of(device)?;
    let loader = py.detach(|| Loader::builder().device(device).build()).map_err(py_err)?;
    Ok((loader.device().to_string(), loader.device_reason().to_owned()))
}

#[pymodule]
fn _tensorlift(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTensor>()?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_device, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
