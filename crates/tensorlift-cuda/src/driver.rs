//! The driver API functions tensorlift calls, resolved from the library the probe loaded,
//! with every result typed as the integer the driver returns.
//!
//! cudarc types a call's result as a Rust `enum` of the codes its bindings know, so a code
//! a newer driver adds (a CUDA 13 driver has several that CUDA 12.8's bindings lack) would be
//! an invalid value of that enum: undefined behaviour. Here a result is a `c_int` until it
//! is compared with the few codes tensorlift acts on, and any other code is an error named
//! by the driver itself (`cuGetErrorName`). The handle and descriptor types are cudarc's
//! (`sys`), which are plain pointers, integers and `repr(C)` structs.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

use cudarc::driver::sys;

use crate::error::{CudaError, DriverCode};

/// A driver call's result, as the driver returns it.
pub(crate) type CuResult = c_int;

/// `CUDA_SUCCESS`.
pub(crate) const SUCCESS: CuResult = sys::CUresult::CUDA_SUCCESS as CuResult;
/// `CUDA_ERROR_OUT_OF_MEMORY`.
pub(crate) const ERROR_OUT_OF_MEMORY: CuResult = sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY as CuResult;
/// `CUDA_ERROR_NOT_READY`: an event or stream query whose work is still running.
pub(crate) const ERROR_NOT_READY: CuResult = sys::CUresult::CUDA_ERROR_NOT_READY as CuResult;

/// `CU_STREAM_NON_BLOCKING`: a stream that does not wait for the legacy default stream.
pub(crate) const STREAM_NON_BLOCKING: c_uint = sys::CUstream_flags::CU_STREAM_NON_BLOCKING as c_uint;
/// `CU_EVENT_BLOCKING_SYNC`: a host wait on the event sleeps instead of spinning.
pub(crate) const EVENT_BLOCKING_SYNC: c_uint = sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as c_uint;
/// `CU_EVENT_DISABLE_TIMING`: an event that records no time stamp (cheaper).
pub(crate) const EVENT_DISABLE_TIMING: c_uint = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as c_uint;
/// `CU_MEMHOSTREGISTER_PORTABLE`.
pub(crate) const MEMHOSTREGISTER_PORTABLE: c_uint = sys::CU_MEMHOSTREGISTER_PORTABLE;
/// `CU_MEMHOSTREGISTER_READ_ONLY`.
pub(crate) const MEMHOSTREGISTER_READ_ONLY: c_uint = sys::CU_MEMHOSTREGISTER_READ_ONLY;

/// `CUpointer_attribute` values (`cuPointerGetAttribute`).
pub(crate) mod pointer {
    use cudarc::driver::sys::CUpointer_attribute as A;
    use std::ffi::c_int;
    /// `CU_POINTER_ATTRIBUTE_CONTEXT`: a `CUcontext`.
    pub(crate) const CONTEXT: c_int = A::CU_POINTER_ATTRIBUTE_CONTEXT as c_int;
    /// `CU_POINTER_ATTRIBUTE_MEMORY_TYPE`: a `CUmemorytype` as an unsigned int.
    pub(crate) const MEMORY_TYPE: c_int = A::CU_POINTER_ATTRIBUTE_MEMORY_TYPE as c_int;
    /// `CU_POINTER_ATTRIBUTE_RANGE_START_ADDR`: a `CUdeviceptr`.
    pub(crate) const RANGE_START_ADDR: c_int = A::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR as c_int;
    /// `CU_POINTER_ATTRIBUTE_RANGE_SIZE`: a `size_t`.
    pub(crate) const RANGE_SIZE: c_int = A::CU_POINTER_ATTRIBUTE_RANGE_SIZE as c_int;
    /// `CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL`: an int.
    pub(crate) const DEVICE_ORDINAL: c_int = A::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL as c_int;
}

/// `CU_MEMORYTYPE_DEVICE`, as `CU_POINTER_ATTRIBUTE_MEMORY_TYPE` writes it.
pub(crate) const MEMORYTYPE_DEVICE: c_uint = sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as c_uint;

/// Declares the function table: each field is the driver's function of that name, with its
/// C signature from `cuda.h` and an integer result.
macro_rules! driver_api {
    ($($name:ident($($arg:ty),*);)*) => {
        /// The driver functions tensorlift calls, resolved once per process.
        #[allow(non_snake_case)] // The fields are the driver's own names.
        pub(crate) struct Driver {
            $(pub(crate) $name: unsafe extern "C" fn($($arg),*) -> CuResult,)*
            /// `cuGetErrorName`, which a driver may lack: errors are then named by number.
            error_name: Option<unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult>,
        }

        impl Driver {
            fn resolve(lib: &libloading::Library) -> Result<Driver, String> {
                Ok(Driver {
                    $($name: {
                        let name = concat!(stringify!($name), "\0");
                        // SAFETY: the symbol is the driver API function of that name, whose C
                        // signature (cuda.h) the field's type spells, with its result as an int;
                        // the pointer is copied out of the borrow because the library stays
                        // loaded for the life of the process (`process_driver` is 'static).
                        let f = unsafe { lib.get::<unsafe extern "C" fn($($arg),*) -> CuResult>(name.as_bytes()) };
                        *f.map_err(|e| format!("the driver library lacks {}: {e}", stringify!($name)))?
                    },)*
                    // SAFETY: as above, for cuGetErrorName.
                    error_name: unsafe { lib.get(b"cuGetErrorName\0") }.ok().map(|f| *f),
                })
            }
        }
    };
}

driver_api! {
    cuInit(c_uint);
    cuDeviceGet(*mut c_int, c_int);
    cuDeviceGetAttribute(*mut c_int, c_int, c_int);
    cuDevicePrimaryCtxRetain(*mut sys::CUcontext, c_int);
    cuDevicePrimaryCtxRelease_v2(c_int);
    cuCtxGetCurrent(*mut sys::CUcontext);
    cuCtxSetCurrent(sys::CUcontext);
    cuCtxSynchronize();
    cuMemGetInfo_v2(*mut usize, *mut usize);
    cuStreamCreate(*mut sys::CUstream, c_uint);
    cuStreamDestroy_v2(sys::CUstream);
    cuStreamSynchronize(sys::CUstream);
    cuEventCreate(*mut sys::CUevent, c_uint);
    cuEventRecord(sys::CUevent, sys::CUstream);
    cuEventQuery(sys::CUevent);
    cuEventSynchronize(sys::CUevent);
    cuEventDestroy_v2(sys::CUevent);
    cuMemAlloc_v2(*mut sys::CUdeviceptr, usize);
    cuMemFree_v2(sys::CUdeviceptr);
    cuMemcpyHtoD_v2(sys::CUdeviceptr, *const c_void, usize);
    cuMemcpyDtoH_v2(*mut c_void, sys::CUdeviceptr, usize);
    cuMemcpyHtoDAsync_v2(sys::CUdeviceptr, *const c_void, usize, sys::CUstream);
    cuMemcpyDtoDAsync_v2(sys::CUdeviceptr, sys::CUdeviceptr, usize, sys::CUstream);
    cuMemcpy2DAsync_v2(*const sys::CUDA_MEMCPY2D, sys::CUstream);
    cuMemsetD8Async(sys::CUdeviceptr, u8, usize, sys::CUstream);
    cuMemHostRegister_v2(*mut c_void, usize, c_uint);
    cuMemHostUnregister(*mut c_void);
    cuPointerGetAttribute(*mut c_void, c_int, sys::CUdeviceptr);
    cuModuleLoadData(*mut sys::CUmodule, *const c_void);
    cuModuleGetFunction(*mut sys::CUfunction, sys::CUmodule, *const c_char);
    cuModuleUnload(sys::CUmodule);
    cuLaunchKernel(
        sys::CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, sys::CUstream,
        *mut *mut c_void, *mut *mut c_void
    );
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").finish_non_exhaustive()
    }
}

impl Driver {
    /// The driver's name for `code` (`CUDA_ERROR_OUT_OF_MEMORY`), or `None` where it has
    /// none (a code newer than the driver, or a driver without `cuGetErrorName`).
    pub(crate) fn error_name(&self, code: CuResult) -> Option<String> {
        let f = self.error_name?;
        let mut name: *const c_char = std::ptr::null();
        // SAFETY: cuGetErrorName writes a pointer to a static string, or fails and writes
        // nothing that is read here.
        if unsafe { f(code, &mut name) } != SUCCESS || name.is_null() {
            return None;
        }
        // SAFETY: the driver returned a NUL-terminated string that lives as long as the
        // library, which stays loaded for the life of the process.
        Some(unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned())
    }

    /// `Ok` for `CUDA_SUCCESS`, else the error naming `call`.
    pub(crate) fn check(&self, r: CuResult, call: &'static str) -> Result<(), CudaError> {
        if r == SUCCESS {
            Ok(())
        } else {
            Err(CudaError::Driver { call, source: DriverCode::new(r, self.error_name(r)) })
        }
    }
}

/// The process's driver functions, resolved from the library the probe loaded; the probe's
/// reason (or the missing function) when there is none.
pub(crate) fn api() -> Result<&'static Driver, CudaError> {
    static API: OnceLock<Result<Driver, String>> = OnceLock::new();
    API.get_or_init(|| match crate::probe::process_driver() {
        Some(lib) => Driver::resolve(lib),
        None => Err(match crate::cuda_status() {
            crate::CudaStatus::Unavailable(why) => why.clone(),
            crate::CudaStatus::Available(_) => "the driver library is not loaded".to_owned(),
        }),
    })
    .as_ref()
    .map_err(|why| CudaError::Unavailable(why.clone()))
}
