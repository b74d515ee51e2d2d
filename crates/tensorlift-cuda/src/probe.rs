//! The driver probe: opens libcuda itself (cudarc's loader panics when the library is
//! missing), and turns every failure into a reason.

use std::ffi::{c_char, c_int, c_uint, CStr};
use std::fmt;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The library names tried, in order, unless `TENSORLIFT_LIBCUDA` names a path.
pub const LIBCUDA_NAMES: [&str; 2] = ["libcuda.so.1", "libcuda.so"];
/// Overrides the driver library path (for tests and unusual installs).
pub const LIBCUDA_ENV: &str = "TENSORLIFT_LIBCUDA";

/// One CUDA device as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceInfo {
    /// Ordinal, as `cuda:N` names it.
    pub ordinal: usize,
    /// Marketing name (`NVIDIA H100 80GB HBM3`).
    pub name: String,
    /// Device memory in bytes.
    pub total_memory: u64,
    /// PCI address (`0000:1b:00.0`), when the driver reports it.
    pub pci_bus_id: Option<String>,
    /// Current PCIe link from sysfs, when readable: (speed, width), e.g. ("32.0 GT/s PCIe", 16).
    /// An idle GPU's link runs slower (down to 2.5 GT/s) until it carries traffic.
    pub pcie_link: Option<(String, u32)>,
    /// The most the device's link can run at, from sysfs (`max_link_speed`,
    /// `max_link_width`): the device's own, not what its slot allows.
    pub pcie_link_max: Option<(String, u32)>,
    /// Whether the device can read host memory registered read-only
    /// (`CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED`): what copying a warm shard
    /// by DMA straight from the page cache needs. `None` when the driver did not say.
    pub read_only_host_register: Option<bool>,
    /// Whether the device reads pageable host memory through the host's page tables
    /// (`CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES`, Grace Hopper),
    /// where registering a range does not pin it, so that copies from the page cache by DMA
    /// are not made. `None` when the driver did not say.
    pub host_page_tables: Option<bool>,
}

/// What the driver reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverInfo {
    /// The library that was opened.
    pub library: PathBuf,
    /// `cuDriverGetVersion`: 12080 is CUDA 12.8.
    pub version: i32,
    /// Every visible device.
    pub devices: Vec<DeviceInfo>,
}

impl DriverInfo {
    /// The driver's CUDA version as `major.minor`.
    pub fn version_string(&self) -> String {
        format!("{}.{}", self.version / 1000, (self.version % 1000) / 10)
    }
}

/// Whether CUDA can be used, with the facts or the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaStatus {
    /// The driver initialised and at least one device is visible.
    Available(DriverInfo),
    /// It cannot be used, and why.
    Unavailable(String),
}

impl fmt::Display for CudaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaStatus::Available(d) => {
                write!(f, "CUDA driver {} with {} device(s)", d.version_string(), d.devices.len())
            }
            CudaStatus::Unavailable(why) => write!(f, "unavailable: {why}"),
        }
    }
}

static DRIVER_OVERRIDE: OnceLock<PathBuf> = OnceLock::new();
static PROCESS_DRIVER: OnceLock<libloading::Library> = OnceLock::new();

/// Makes the process's probe load the driver library at `path` (as `TENSORLIFT_LIBCUDA`
/// does, without touching the environment). Effective only before the first
/// [`cuda_status`]; returns whether it took effect. Tests use it for the emulated driver.
///
/// # Safety
///
/// `path` names a CUDA driver library, or tensorlift's emulated one: loading it runs its
/// initialisers, and tensorlift calls its functions as the driver API's C signatures have
/// them (`TENSORLIFT_LIBCUDA` is trusted the same way, as `LD_LIBRARY_PATH` is).
pub unsafe fn use_driver_library(path: PathBuf) -> bool {
    let wanted = path.clone();
    let _ = DRIVER_OVERRIDE.set(path);
    let status = cuda_status();
    match status {
        CudaStatus::Available(d) => d.library == wanted,
        CudaStatus::Unavailable(_) => DRIVER_OVERRIDE.get() == Some(&wanted),
    }
}

/// The process's CUDA status, probed once. The driver library it loaded stays loaded for
/// the life of the process: tensorlift's calls resolve from it (`driver.rs`), and cudarc,
/// where a caller's `CudaSlice` uses it, finds that same library by its name.
pub fn cuda_status() -> &'static CudaStatus {
    static STATUS: OnceLock<CudaStatus> = OnceLock::new();
    STATUS.get_or_init(|| {
        let candidates = match (DRIVER_OVERRIDE.get(), std::env::var_os(LIBCUDA_ENV)) {
            (Some(p), _) => vec![p.clone()],
            (None, Some(p)) => vec![PathBuf::from(p)],
            (None, None) => LIBCUDA_NAMES.map(PathBuf::from).to_vec(),
        };
        let (s, lib) = probe_candidates(&candidates);
        if let (CudaStatus::Available(_), Some(lib)) = (&s, lib) {
            let _ = PROCESS_DRIVER.set(lib);
        }
        tracing::debug!(status = %s, "CUDA probed");
        s
    })
}

/// The driver library the process's probe loaded, if it found a usable one.
pub(crate) fn process_driver() -> Option<&'static libloading::Library> {
    cuda_status();
    PROCESS_DRIVER.get()
}

type CuResult = c_int;
type CuInit = unsafe extern "C" fn(c_uint) -> CuResult;
type CuDriverGetVersion = unsafe extern "C" fn(*mut c_int) -> CuResult;
type CuDeviceGetCount = unsafe extern "C" fn(*mut c_int) -> CuResult;
type CuDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> CuResult;
type CuDeviceGetName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> CuResult;
type CuDeviceTotalMem = unsafe extern "C" fn(*mut usize, c_int) -> CuResult;
type CuDeviceGetPciBusId = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> CuResult;
type CuDeviceGetAttribute = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> CuResult;
type CuGetErrorName = unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult;

/// Probes the first library of `candidates` that opens. Never panics: every failure
/// becomes [`CudaStatus::Unavailable`] with the reason.
///
/// # Safety
///
/// Each of `candidates` that exists is a CUDA driver library (or one whose functions of the
/// driver API's names have its C signatures): loading it runs its initialisers, and the
/// probe calls those functions.
pub unsafe fn probe_library(candidates: &[PathBuf]) -> CudaStatus {
    probe_candidates(candidates).0
}

/// [`probe_library`], also returning the library it loaded.
fn probe_candidates(candidates: &[PathBuf]) -> (CudaStatus, Option<libloading::Library>) {
    let mut errors = Vec::new();
    for path in candidates {
        // SAFETY: the candidates are the driver's names, or paths a caller of the unsafe
        // `probe_library` or `use_driver_library`, or the environment (`TENSORLIFT_LIBCUDA`,
        // trusted as `LD_LIBRARY_PATH` is), vouches are CUDA driver libraries: loading one runs
        // its initialisers, which is what every CUDA program does; we call nothing in it
        // before resolving symbols.
        match unsafe { libloading::Library::new(path) } {
            Ok(lib) => {
                let status = probe_loaded(&lib, path.clone());
                return (status, Some(lib));
            }
            Err(e) => {
                // libloading's message is generic; dlerror's text is in the source.
                let detail = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
                errors.push(detail);
            }
        }
    }
    // One reason, said once, when every candidate failed the same way.
    let names: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    let reasons: Vec<String> =
        errors.iter().zip(&names).map(|(e, n)| e.strip_prefix(&format!("{n}: ")).unwrap_or(e).to_owned()).collect();
    let detail = match reasons.first() {
        Some(first) if reasons.iter().all(|r| r == first) => format!("tried {}: {first}", names.join(", ")),
        _ => errors.join("; "),
    };
    (CudaStatus::Unavailable(format!("no NVIDIA driver library could be loaded ({detail})")), None)
}

fn probe_loaded(lib: &libloading::Library, path: PathBuf) -> CudaStatus {
    // (Said with any failure: cuInit fails with CUDA_ERROR_NO_DEVICE where the variable
    // names no device.)
    let visible = std::env::var("CUDA_VISIBLE_DEVICES")
        .map_or_else(|_| String::new(), |v| format!(" (CUDA_VISIBLE_DEVICES={v})"));
    match query(lib, path) {
        Ok(info) if info.devices.is_empty() => {
            CudaStatus::Unavailable(format!("the driver sees no CUDA device{visible}"))
        }
        Ok(info) => CudaStatus::Available(info),
        Err(why) => CudaStatus::Unavailable(format!("{why}{visible}")),
    }
}

fn symbol<T: Copy>(lib: &libloading::Library, name: &str) -> Result<T, String> {
    // SAFETY: each call site names the symbol with the exact C signature of the CUDA driver
    // API (cuda.h), so the function pointer has the right type.
    unsafe { lib.get::<T>(name.as_bytes()) }.map(|s| *s).map_err(|e| format!("the driver library lacks {name}: {e}"))
}

fn query(lib: &libloading::Library, library: PathBuf) -> Result<DriverInfo, String> {
    let init: CuInit = symbol(lib, "cuInit")?;
    let version_fn: CuDriverGetVersion = symbol(lib, "cuDriverGetVersion")?;
    let count_fn: CuDeviceGetCount = symbol(lib, "cuDeviceGetCount")?;
    let error_name: Option<CuGetErrorName> = symbol(lib, "cuGetErrorName").ok();
    let check = |what: &str, r: CuResult| -> Result<(), String> {
        if r == 0 {
            return Ok(());
        }
        let mut name: *const c_char = std::ptr::null();
        let named = error_name.is_some_and(|f| {
            // SAFETY: cuGetErrorName writes a pointer to a static string, or fails.
            unsafe { f(r, &mut name) == 0 && !name.is_null() }
        });
        let text = if named {
            // SAFETY: the driver returned a pointer to a NUL-terminated static string.
            unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned()
        } else {
            "unknown error".to_owned()
        };
        Err(format!("{what} failed: {text} ({r})"))
    };
    // SAFETY: cuInit takes a flags word that must be 0.
    check("cuInit", unsafe { init(0) })?;
    let mut version = 0;
    // SAFETY: writes one int into `version`.
    check("cuDriverGetVersion", unsafe { version_fn(&mut version) })?;
    let mut count = 0;
    // SAFETY: writes one int into `count`.
    check("cuDeviceGetCount", unsafe { count_fn(&mut count) })?;
    let device_get: CuDeviceGet = symbol(lib, "cuDeviceGet")?;
    let name_fn: CuDeviceGetName = symbol(lib, "cuDeviceGetName")?;
    let mem_fn: CuDeviceTotalMem = symbol(lib, "cuDeviceTotalMem_v2")?;
    let bus_fn: Option<CuDeviceGetPciBusId> = symbol(lib, "cuDeviceGetPCIBusId").ok();
    let attribute_fn: Option<CuDeviceGetAttribute> = symbol(lib, "cuDeviceGetAttribute").ok();
    let mut devices = Vec::new();
    for ordinal in 0..count.max(0) {
        let mut dev = 0;
        // SAFETY: writes one device handle; ordinal < count.
        check("cuDeviceGet", unsafe { device_get(&mut dev, ordinal) })?;
        let mut name = [0 as c_char; 256];
        // SAFETY: the driver writes at most `len` bytes, NUL-terminated, into `name`.
        check("cuDeviceGetName", unsafe { name_fn(name.as_mut_ptr(), name.len() as c_int, dev) })?;
        let mut mem = 0usize;
        // SAFETY: writes one size_t into `mem`.
        check("cuDeviceTotalMem", unsafe { mem_fn(&mut mem, dev) })?;
        let pci_bus_id = bus_fn.and_then(|f| {
            let mut id = [0 as c_char; 64];
            // SAFETY: the driver writes at most `len` bytes, NUL-terminated, into `id`.
            (unsafe { f(id.as_mut_ptr(), id.len() as c_int, dev) } == 0).then(|| c_string(&id).to_ascii_lowercase())
        });
        let pcie_link_max = pci_bus_id.as_deref().and_then(|b| pcie_link_of(b, "max"));
        let pcie_link = pci_bus_id.as_deref().and_then(|b| pcie_link_of(b, "current"));
        let attribute = |attribute: cudarc::driver::sys::CUdevice_attribute| {
            attribute_fn.and_then(|f| {
                let mut v = 0;
                // SAFETY: writes one int into `v`, for a valid device handle and attribute.
                (unsafe { f(&mut v, attribute as c_int, dev) } == 0).then_some(v != 0)
            })
        };
        use cudarc::driver::sys::CUdevice_attribute as A;
        let read_only_host_register = attribute(A::CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED);
        let host_page_tables = attribute(A::CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES);
        devices.push(DeviceInfo {
            ordinal: ordinal as usize,
            name: c_string(&name),
            total_memory: mem as u64,
            pci_bus_id,
            pcie_link,
            pcie_link_max,
            read_only_host_register,
            host_page_tables,
        });
    }
    Ok(DriverInfo { library, version, devices })
}

fn c_string(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The PCIe link speed and width from sysfs: `which` is `current` or `max`.
fn pcie_link_of(bus_id: &str, which: &str) -> Option<(String, u32)> {
    let dir = PathBuf::from("/sys/bus/pci/devices").join(bus_id);
    let speed = std::fs::read_to_string(dir.join(format!("{which}_link_speed"))).ok()?.trim().to_owned();
    let width = std::fs::read_to_string(dir.join(format!("{which}_link_width"))).ok()?.trim().parse().ok()?;
    Some((speed, width))
}
