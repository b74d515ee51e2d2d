//! Controls of the emulated driver (`crates/tensorlift-cuda/emulator`), for tests: what is
//! alive, and faults to inject. Every function is a no-op answering `None` or `false` when
//! the process's driver is not the emulator (a real GPU), so tests run unchanged on both.

use std::ffi::{c_int, c_uint};

use crate::probe::process_driver;

/// What the emulated driver holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Live {
    /// Device allocations.
    pub allocations: u64,
    /// Host ranges registered with `cuMemHostRegister`.
    pub registrations: u64,
    /// Streams.
    pub streams: u64,
    /// Events.
    pub events: u64,
    /// Primary-context references.
    pub contexts: u64,
    /// Bytes of device memory allocated.
    pub device_bytes: u64,
    /// Loaded modules.
    pub modules: u64,
}

/// A fault for the emulated driver to inject from now on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// The device has this many bytes (allocations past it fail).
    DeviceMemory(u64),
    /// Every device allocation fails.
    OutOfMemory(bool),
    /// The Nth asynchronous copy (counted from [`reset`]) fails; 0 for none.
    FailCopy(u64),
    /// Host registration (`cuMemHostRegister`) is refused.
    RefuseRegister(bool),
    /// Each copy waits this many microseconds before it runs.
    CopyDelayMicros(u64),
    /// The memory, out-of-memory and copy faults hit this device alone (`None`: every
    /// device), and `FailCopy(n)` counts that device's copies alone.
    OnDevice(Option<usize>),
    /// The devices cannot register host memory read-only (their attribute reads 0, and such
    /// a registration is `CUDA_ERROR_NOT_SUPPORTED`), as on drivers before CUDA 11.1.
    NoReadOnlyRegister(bool),
    /// Each `cuMemsetD8Async` waits this many microseconds before it runs: work on other
    /// streams that is not ordered after it runs first.
    MemsetDelayMicros(u64),
    /// Every device allocation returns this `CUresult` code (0: none), which may be one
    /// that no CUDA version defines: what a newer driver's codes are to older bindings.
    AllocResult(u32),
    /// The devices read pageable memory through the host's page tables (Grace Hopper):
    /// `CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES` reads 1.
    HostPageTables(bool),
}

fn symbol<T: Copy>(name: &[u8]) -> Option<T> {
    let lib = process_driver()?;
    // SAFETY: each name is looked up with the signature the emulator exports it with
    // (crates/tensorlift-cuda/emulator/src/lib.rs); a real driver has no such symbol.
    unsafe { lib.get::<T>(name) }.ok().map(|s| *s)
}

/// Whether the process's CUDA driver is the emulator.
pub fn is_emulated() -> bool {
    symbol::<unsafe extern "C" fn(*mut u64, usize) -> c_int>(b"tlemu_live").is_some()
}

/// What the emulated driver holds now; `None` on a real driver.
pub fn live() -> Option<Live> {
    let f = symbol::<unsafe extern "C" fn(*mut u64, usize) -> c_int>(b"tlemu_live")?;
    let mut v = [0u64; 7];
    // SAFETY: the array holds the 7 values the call writes.
    (unsafe { f(v.as_mut_ptr(), v.len()) } == 0).then_some(Live {
        allocations: v[0],
        registrations: v[1],
        streams: v[2],
        events: v[3],
        contexts: v[4],
        device_bytes: v[5],
        modules: v[6],
    })
}

/// Sets a fault; `false` on a real driver.
pub fn set_fault(fault: Fault) -> bool {
    let Some(f) = symbol::<extern "C" fn(c_uint, u64) -> c_int>(b"tlemu_set_fault") else { return false };
    let (which, value) = match fault {
        Fault::DeviceMemory(b) => (0, b),
        Fault::OutOfMemory(on) => (1, u64::from(on)),
        Fault::FailCopy(n) => (2, n),
        Fault::RefuseRegister(on) => (3, u64::from(on)),
        Fault::CopyDelayMicros(us) => (4, us),
        Fault::OnDevice(d) => (6, d.map_or(0, |d| d as u64 + 1)),
        Fault::NoReadOnlyRegister(on) => (7, u64::from(on)),
        Fault::MemsetDelayMicros(us) => (8, us),
        Fault::AllocResult(code) => (9, u64::from(code)),
        Fault::HostPageTables(on) => (10, u64::from(on)),
    };
    f(which, value) == 0
}

/// Clears every fault's effect so far (the sticky error, the copy count) and the faults
/// themselves, back to devices of 8 GiB each.
pub fn reset() {
    if let Some(f) = symbol::<extern "C" fn() -> c_int>(b"tlemu_reset") {
        f();
    }
    for fault in [
        Fault::DeviceMemory(8 << 30),
        Fault::OutOfMemory(false),
        Fault::FailCopy(0),
        Fault::RefuseRegister(false),
        Fault::CopyDelayMicros(0),
        Fault::OnDevice(None),
        Fault::NoReadOnlyRegister(false),
        Fault::MemsetDelayMicros(0),
        Fault::AllocResult(0),
        Fault::HostPageTables(false),
    ] {
        set_fault(fault);
    }
}

/// Asynchronous copies made since the last [`reset`]; `None` on a real driver.
pub fn copies() -> Option<u64> {
    symbol::<extern "C" fn() -> u64>(b"tlemu_copies").map(|f| f())
}

/// Copies (rows of a 2D copy each) that read host memory registered read-only, since the
/// process started; `None` on a real driver.
pub fn read_only_copies() -> Option<u64> {
    symbol::<extern "C" fn() -> u64>(b"tlemu_read_only_copies").map(|f| f())
}

/// The calling thread's current CUDA context handle (0: none); `None` on a real driver.
pub fn current_context() -> Option<u64> {
    symbol::<extern "C" fn() -> u64>(b"tlemu_current_context").map(|f| f())
}

/// Makes `handle` the calling thread's current context, as another library would; `false` on
/// a real driver.
pub fn set_current_context(handle: u64) -> bool {
    match symbol::<extern "C" fn(u64)>(b"tlemu_set_current_context") {
        Some(f) => {
            f(handle);
            true
        }
        None => false,
    }
}
