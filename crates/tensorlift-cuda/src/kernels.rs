//! The device kernels: `kernels/*.cu`, compiled to PTX by `scripts/make-ptx.py` (NVRTC,
//! no toolkit needed) and committed; the PTX is built into this crate and loaded into a
//! device's context at run time, where the driver compiles it for the GPU it has.
//!
//! [`CopyEngine::convert_tagged`](crate::CopyEngine::convert_tagged) launches them, with the
//! same completion tracking as copies.

use std::ffi::{c_void, CString};

use cudarc::driver::sys;

use crate::{CudaError, Gpu};

/// `kernels/convert.ptx`: element type conversions (`tl_convert_<from>_<to>`).
const CONVERT_PTX: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../kernels/convert.ptx"));

/// Element types the conversion kernels read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KernelType {
    /// bfloat16.
    BF16,
    /// IEEE half precision.
    F16,
    /// IEEE single precision.
    F32,
    /// OCP float8 e4m3fn (source only).
    F8E4M3,
    /// OCP float8 e5m2 (source only).
    F8E5M2,
}

impl KernelType {
    /// Bytes per element.
    pub fn width(self) -> usize {
        match self {
            KernelType::F8E4M3 | KernelType::F8E5M2 => 1,
            KernelType::BF16 | KernelType::F16 => 2,
            KernelType::F32 => 4,
        }
    }

    fn name(self) -> &'static str {
        match self {
            KernelType::BF16 => "bf16",
            KernelType::F16 => "f16",
            KernelType::F32 => "f32",
            KernelType::F8E4M3 => "f8e4m3",
            KernelType::F8E5M2 => "f8e5m2",
        }
    }
}

const SOURCES: [KernelType; 5] =
    [KernelType::BF16, KernelType::F16, KernelType::F32, KernelType::F8E4M3, KernelType::F8E5M2];
const TARGETS: [KernelType; 3] = [KernelType::BF16, KernelType::F16, KernelType::F32];

/// The kernels, loaded into one device's context. Unloaded when dropped; launches hold it
/// until they complete.
pub struct Kernels {
    gpu: Gpu,
    module: sys::CUmodule,
    convert: Vec<(KernelType, KernelType, sys::CUfunction)>,
}

// SAFETY: module and function handles are plain driver handles, valid on any thread that
// binds their context (every use here does), and the driver API is thread-safe.
unsafe impl Send for Kernels {}
// SAFETY: as above; nothing here is mutated after loading.
unsafe impl Sync for Kernels {}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels").field("device", &self.gpu.ordinal()).field("convert", &self.convert.len()).finish()
    }
}

impl Kernels {
    /// Loads the kernels into `gpu`'s context (the driver compiles the PTX for the device).
    pub fn load(gpu: &Gpu) -> Result<Kernels, CudaError> {
        let _restore = gpu.enter()?;
        let image = CString::new(CONVERT_PTX).map_err(|_| CudaError::Unavailable("the PTX holds a NUL".into()))?;
        let api = gpu.api();
        let mut module: sys::CUmodule = std::ptr::null_mut();
        // SAFETY: writes one module handle; the image is NUL-terminated PTX, which the call
        // reads and does not keep.
        api.check(unsafe { (api.cuModuleLoadData)(&mut module, image.as_ptr().cast()) }, "cuModuleLoadData")?;
        let mut kernels = Kernels { gpu: gpu.clone(), module, convert: Vec::new() };
        for from in SOURCES {
            for to in TARGETS.into_iter().filter(|&t| t != from) {
                let name = format!("tl_convert_{}_{}", from.name(), to.name());
                let cname =
                    CString::new(name).map_err(|_| CudaError::Unavailable("a kernel name holds a NUL".into()))?;
                let mut f: sys::CUfunction = std::ptr::null_mut();
                // SAFETY: writes one function handle; the module is loaded (above) and stays
                // loaded while `kernels` lives; the name is NUL-terminated and not kept.
                let r = unsafe { (api.cuModuleGetFunction)(&mut f, kernels.module, cname.as_ptr()) };
                api.check(r, "cuModuleGetFunction")?;
                kernels.convert.push((from, to, f));
            }
        }
        Ok(kernels)
    }

    /// The device the kernels are loaded on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Whether a kernel converts `from` to `to`.
    pub fn converts(&self, from: KernelType, to: KernelType) -> bool {
        self.convert.iter().any(|&(f, t, _)| (f, t) == (from, to))
    }

    /// Queues a conversion of `n` elements from device address `src` to `dst` on `stream`.
    ///
    /// # Safety
    ///
    /// `src` holds `n` elements of `from` and `dst` room for `n` of `to`, in device memory
    /// of this kernel's device that stays allocated, and that nothing else writes, until the
    /// work queued on `stream` now has completed; the two ranges do not overlap.
    pub(crate) unsafe fn launch_convert(
        &self,
        stream: sys::CUstream,
        from: KernelType,
        to: KernelType,
        src: u64,
        dst: u64,
        n: u64,
    ) -> Result<(), CudaError> {
        let Some(&(_, _, f)) = self.convert.iter().find(|&&(a, b, _)| (a, b) == (from, to)) else {
            return Err(CudaError::Unavailable(format!("no kernel converts {from:?} to {to:?}")));
        };
        if n == 0 {
            return Ok(());
        }
        // A grid-stride loop: any grid covers every element; more blocks than SMs keep the
        // device busy, and the cap keeps huge tensors from asking for more than it allows.
        const BLOCK: u64 = 256;
        let blocks = n.div_ceil(BLOCK).min(65_535) as u32;
        let (mut s, mut d, mut count) = (src, dst, n);
        let mut params: [*mut c_void; 3] = [(&raw mut s).cast(), (&raw mut d).cast(), (&raw mut count).cast()];
        let api = self.gpu.api();
        let (grid, block, shared) = (blocks, BLOCK as u32, 0);
        let extra = std::ptr::null_mut();
        // SAFETY: the kernel takes (const u8*, u8*, u64), which `params` points at (read by
        // the call, no `extra`); the caller promised the memory is valid until the stream's
        // work is done.
        let r = unsafe { (api.cuLaunchKernel)(f, grid, 1, 1, block, 1, 1, shared, stream, params.as_mut_ptr(), extra) };
        api.check(r, "cuLaunchKernel")
    }
}

impl Drop for Kernels {
    fn drop(&mut self) {
        if let Ok(_restore) = self.gpu.enter() {
            // SAFETY: the module was loaded by this value and nothing launches from it any
            // more (launches keep the kernels alive until they complete).
            let _ = unsafe { (self.gpu.api().cuModuleUnload)(self.module) };
        }
    }
}
