//! A test-only stand-in for `libcuda.so`: the driver calls tensorlift makes (its probe and
//! its table of the driver's functions), and those cudarc makes for the allocations tests
//! lend to loads, with the semantics that catch real bugs.
//!
//! - Each stream is a worker thread that applies its operations later, in order.
//! - An event completes when its stream reaches it; `cuEventSynchronize` waits for that.
//! - A host-to-device copy reads its source when it executes, not when it is queued: a
//!   staging buffer reused before the copy's event completed corrupts the result.
//! - An asynchronous copy's source must lie in memory registered with `cuMemHostRegister`,
//!   and must still be registered when the copy executes; a 2D copy's rows likewise, with
//!   pitches no shorter than a row.
//! - Registration pins what is mapped, as the driver does: a range not wholly mapped is
//!   refused, and so is a range with pages the process may not write unless it is
//!   registered read-only (`CU_MEMHOSTREGISTER_READ_ONLY`, for a read-only mapping of a file
//!   in the page cache). A read-only registration is read as a device would read it, never
//!   by dereferencing it (a page it cannot read is an illegal address, not a SIGBUS), and a
//!   device-to-host copy into it faults. Copies from read-only registrations are counted
//!   (`tlemu_read_only_copies`). A page that cannot be read when a copy runs (its file was
//!   truncated since it was registered) is an illegal address, where a real device would
//!   read the stale page it pinned: either way the load fails, on its check of the file.
//! - `cuMemsetD8Async` runs in stream order (`TLEMU_MEMSET_DELAY_US=N`: each waits first, so
//!   that work on other streams not ordered after it runs first); `cuMemcpyDtoHAsync` waits
//!   for its stream and copies before it returns (the driver's behaviour with pageable
//!   memory). These serve cudarc's own allocations, as a framework lending them to a load
//!   makes them.
//! - Device memory is real memory, at addresses (from `1 << 62` up) that no host pointer
//!   uses: dereferencing one on the host faults.
//! - Kernels are implemented by name on the CPU: `cuModuleLoadData` takes PTX text (refusing
//!   an ISA newer than the driver version it claims, as a real driver does), and a launch
//!   of `tl_convert_<from>_<to>` converts on the stream's worker, later and in order like a
//!   copy, reading and writing device memory (with `half`, independently of tensorlift's
//!   own conversion code).
//! - Live allocations, registrations, streams, events, contexts and modules are counted
//!   (`tlemu_live`), so a test can end by checking that nothing leaked.
//! - Several devices (`TLEMU_DEVICES`, default 4), each with its own primary context,
//!   memory and streams: memory is allocated on the current context's device, a stream
//!   belongs to the device current when it was made, and a copy or kernel on a stream of one
//!   device that touches another device's memory fails, as work queued on the wrong device
//!   would on a real one. An event, a module or a host registration made with no context
//!   current is `CUDA_ERROR_INVALID_CONTEXT`, and an event belongs to its context: recorded
//!   on another device's stream, it is `CUDA_ERROR_INVALID_HANDLE`.
//! - Faults: `TLEMU_DEVICE_MEMORY` (bytes a device, default 8 GiB), `TLEMU_OOM=1` (every
//!   allocation fails), `TLEMU_FAIL_COPY=N` (the Nth asynchronous copy fails),
//!   `TLEMU_REFUSE_REGISTER=1`, `TLEMU_COPY_DELAY_US=N` (each copy waits first),
//!   `TLEMU_NO_READ_ONLY_REGISTER=1` (the devices lack read-only registration: its
//!   attribute reads 0 and such a registration is `CUDA_ERROR_NOT_SUPPORTED`),
//!   `TLEMU_ALLOC_RESULT=N` (every allocation returns the code N, which may be one no CUDA
//!   version defines, as a newer driver's codes are to older bindings),
//!   `TLEMU_HOST_PAGE_TABLES=1` (the devices read pageable memory through the host's page
//!   tables, as on Grace Hopper: that attribute reads 1),
//!   `TLEMU_DEVICES=N`, `TLEMU_FAULT_DEVICE=D+1` (the memory, out-of-memory and copy faults
//!   hit device D alone, whose copies are then counted on their own; 0, the default: every
//!   device); read at `cuInit`, and settable later with `tlemu_set_fault`. (The sticky error
//!   of an asynchronous fault is the process's, where a real driver keeps one a context.)
//!
//! It is a test double, never shipped: `scripts/test` builds it
//! (`target/debug/libtensorlift_cuda_emulator.so`, SONAME `libcuda.so`), and the CUDA tests
//! load it with `tensorlift_cuda::use_driver_library`, or a process with
//! `TENSORLIFT_LIBCUDA=PATH`. The contract of every exported function is the CUDA driver
//! API's.
#![allow(non_snake_case, clippy::missing_safety_doc, clippy::too_many_arguments)]

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

type CUresult = c_int;
type CUdeviceptr = u64;

const SUCCESS: CUresult = 0;
const INVALID_VALUE: CUresult = 1;
const OUT_OF_MEMORY: CUresult = 2;
const INVALID_DEVICE: CUresult = 101;
const INVALID_CONTEXT: CUresult = 201;
const INVALID_HANDLE: CUresult = 400;
const INVALID_IMAGE: CUresult = 200;
const UNSUPPORTED_PTX_VERSION: CUresult = 222;
const NOT_FOUND: CUresult = 500;
const NOT_READY: CUresult = 600;
const ILLEGAL_ADDRESS: CUresult = 700;
const MISALIGNED_ADDRESS: CUresult = 716;
const HOST_MEMORY_ALREADY_REGISTERED: CUresult = 712;
const HOST_MEMORY_NOT_REGISTERED: CUresult = 713;
const NOT_PERMITTED: CUresult = 800;
const NOT_SUPPORTED: CUresult = 801;
const UNKNOWN: CUresult = 999;

/// Device addresses start here: far above any user-space host address.
const DEVICE_BASE: u64 = 1 << 62;
/// Freed device memory kept for reuse, at most.
const RECYCLE_BYTES: usize = 4 << 30;
/// Allocations are aligned like the real driver's (at least 256 bytes).
const DEVICE_ALIGN: u64 = 512;

/// What `tlemu_live` reports, in this order.
const LIVE_ALLOCS: usize = 0;
const LIVE_REGISTRATIONS: usize = 1;
const LIVE_STREAMS: usize = 2;
const LIVE_EVENTS: usize = 3;
const LIVE_CONTEXTS: usize = 4;
const LIVE_DEVICE_BYTES: usize = 5;
const LIVE_MODULES: usize = 6;
const LIVE_COUNT: usize = 7;

/// Faults settable with `tlemu_set_fault`, in this order.
const FAULT_DEVICE_MEMORY: c_uint = 0;
const FAULT_OOM: c_uint = 1;
const FAULT_FAIL_COPY: c_uint = 2;
const FAULT_REFUSE_REGISTER: c_uint = 3;
const FAULT_COPY_DELAY_US: c_uint = 4;
const FAULT_DEVICES: c_uint = 5;
const FAULT_DEVICE: c_uint = 6;
const FAULT_NO_READ_ONLY_REGISTER: c_uint = 7;
const FAULT_MEMSET_DELAY_US: c_uint = 8;
const FAULT_ALLOC_RESULT: c_uint = 9;
const FAULT_HOST_PAGE_TABLES: c_uint = 10;
const FAULT_COUNT: usize = 11;

/// `CU_MEMHOSTREGISTER_READ_ONLY`.
const REGISTER_READ_ONLY: c_uint = 0x08;
/// `CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED`.
const ATTRIBUTE_READ_ONLY_HOST_REGISTER: c_int = 113;
/// `CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES`.
const ATTRIBUTE_HOST_PAGE_TABLES: c_int = 100;

/// The most devices the emulator has (`TLEMU_DEVICES` beyond it is this many).
const MAX_DEVICES: usize = 64;
/// A device memory size no fault limits.
const UNLIMITED_DEVICE: u64 = 8 << 30;

struct Alloc {
    mem: Vec<u8>,
    device: c_int,
}

struct Emu {
    allocs: Mutex<BTreeMap<u64, Alloc>>,
    recycled: Mutex<Vec<Vec<u8>>>,
    next_addr: AtomicU64,
    /// Registered host ranges: start -> (length, read-only).
    registered: Mutex<BTreeMap<usize, (usize, bool)>>,
    copies: AtomicU64,
    read_only_copies: AtomicU64,
    /// Each device's copies (for `TLEMU_FAULT_DEVICE`) and allocated bytes.
    device_copies: [AtomicU64; MAX_DEVICES],
    device_bytes: [AtomicU64; MAX_DEVICES],
    live: [AtomicU64; LIVE_COUNT],
    faults: [AtomicU64; FAULT_COUNT],
    sticky: AtomicI32,
}

fn emu() -> &'static Emu {
    static EMU: OnceLock<Emu> = OnceLock::new();
    EMU.get_or_init(|| {
        let env = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
        Emu {
            allocs: Mutex::new(BTreeMap::new()),
            recycled: Mutex::new(Vec::new()),
            next_addr: AtomicU64::new(DEVICE_BASE),
            registered: Mutex::new(BTreeMap::new()),
            copies: AtomicU64::new(0),
            read_only_copies: AtomicU64::new(0),
            device_copies: std::array::from_fn(|_| AtomicU64::new(0)),
            device_bytes: std::array::from_fn(|_| AtomicU64::new(0)),
            live: Default::default(),
            faults: [
                AtomicU64::new(env("TLEMU_DEVICE_MEMORY", 8 << 30)),
                AtomicU64::new(env("TLEMU_OOM", 0)),
                AtomicU64::new(env("TLEMU_FAIL_COPY", 0)),
                AtomicU64::new(env("TLEMU_REFUSE_REGISTER", 0)),
                AtomicU64::new(env("TLEMU_COPY_DELAY_US", 0)),
                AtomicU64::new(env("TLEMU_DEVICES", 4)),
                AtomicU64::new(env("TLEMU_FAULT_DEVICE", 0)),
                AtomicU64::new(env("TLEMU_NO_READ_ONLY_REGISTER", 0)),
                AtomicU64::new(env("TLEMU_MEMSET_DELAY_US", 0)),
                AtomicU64::new(env("TLEMU_ALLOC_RESULT", 0)),
                AtomicU64::new(env("TLEMU_HOST_PAGE_TABLES", 0)),
            ],
            sticky: AtomicI32::new(SUCCESS),
        }
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn fault(which: c_uint) -> u64 {
    emu().faults[which as usize].load(Ordering::Relaxed)
}

/// Whether the memory, out-of-memory and copy faults hit device `dev`.
fn faulty(dev: c_int) -> bool {
    match fault(FAULT_DEVICE) {
        0 => true,
        d => d - 1 == dev as u64,
    }
}

/// The memory device `dev` has.
fn device_memory(dev: c_int) -> u64 {
    if faulty(dev) {
        fault(FAULT_DEVICE_MEMORY)
    } else {
        UNLIMITED_DEVICE
    }
}

/// Counts an asynchronous copy on device `dev`; whether it is the one `TLEMU_FAIL_COPY`
/// makes fail (counted over every device, or over the faulty one's alone).
fn copy_fails(dev: c_int) -> bool {
    let e = emu();
    let n = e.copies.fetch_add(1, Ordering::AcqRel) + 1;
    let on_device = e.device_copies[dev as usize % MAX_DEVICES].fetch_add(1, Ordering::AcqRel) + 1;
    let which = fault(FAULT_FAIL_COPY);
    match fault(FAULT_DEVICE) {
        0 => which == n,
        d => d - 1 == dev as u64 && which == on_device,
    }
}

fn count(which: usize, delta: i64) {
    let c = &emu().live[which];
    if delta >= 0 {
        c.fetch_add(delta as u64, Ordering::Relaxed);
    } else {
        c.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
    }
}

/// Writes `value` through `out`, refusing a null pointer.
///
/// # Safety
///
/// `out` is null or valid for a write of `T`.
unsafe fn put<T>(out: *mut T, value: T) -> CUresult {
    if out.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: not null, and the caller promised it is valid for a write.
    unsafe { out.write(value) };
    SUCCESS
}

// ---- Initialisation and devices -------------------------------------------------------

#[no_mangle]
pub extern "C" fn cuInit(_flags: c_uint) -> CUresult {
    emu();
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    // SAFETY: the driver API's contract for this out-parameter.
    unsafe { put(version, 12080) }
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(n: *mut c_int) -> CUresult {
    // SAFETY: as above.
    unsafe { put(n, fault(FAULT_DEVICES).min(MAX_DEVICES as u64) as c_int) }
}

fn valid_device(dev: c_int) -> bool {
    dev >= 0 && (dev as u64) < fault(FAULT_DEVICES).min(MAX_DEVICES as u64)
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(dev: *mut c_int, ordinal: c_int) -> CUresult {
    if !valid_device(ordinal) {
        return INVALID_DEVICE;
    }
    // SAFETY: as above.
    unsafe { put(dev, ordinal) }
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: c_int) -> CUresult {
    if !valid_device(dev) {
        return INVALID_DEVICE;
    }
    let text = b"tensorlift emulated device\0";
    if name.is_null() || len < text.len() as c_int {
        return INVALID_VALUE;
    }
    // SAFETY: `name` holds `len` >= text.len() writable bytes, per the driver API.
    unsafe { std::ptr::copy_nonoverlapping(text.as_ptr().cast(), name, text.len()) };
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: c_int) -> CUresult {
    if !valid_device(dev) {
        return INVALID_DEVICE;
    }
    // SAFETY: as above.
    unsafe { put(bytes, device_memory(dev) as usize) }
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(value: *mut c_int, attribute: c_int, dev: c_int) -> CUresult {
    if !valid_device(dev) {
        return INVALID_DEVICE;
    }
    // Every other attribute reads 0: no memory pools, no unified addressing; enough for
    // cudarc.
    let v = match attribute {
        ATTRIBUTE_READ_ONLY_HOST_REGISTER => c_int::from(fault(FAULT_NO_READ_ONLY_REGISTER) == 0),
        ATTRIBUTE_HOST_PAGE_TABLES => c_int::from(fault(FAULT_HOST_PAGE_TABLES) != 0),
        _ => 0,
    };
    // SAFETY: as above.
    unsafe { put(value, v) }
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(error: CUresult, text: *mut *const c_char) -> CUresult {
    let s: &'static [u8] = match error {
        SUCCESS => b"CUDA_SUCCESS\0",
        INVALID_VALUE => b"CUDA_ERROR_INVALID_VALUE\0",
        OUT_OF_MEMORY => b"CUDA_ERROR_OUT_OF_MEMORY\0",
        INVALID_DEVICE => b"CUDA_ERROR_INVALID_DEVICE\0",
        INVALID_HANDLE => b"CUDA_ERROR_INVALID_HANDLE\0",
        NOT_READY => b"CUDA_ERROR_NOT_READY\0",
        INVALID_IMAGE => b"CUDA_ERROR_INVALID_IMAGE\0",
        UNSUPPORTED_PTX_VERSION => b"CUDA_ERROR_UNSUPPORTED_PTX_VERSION\0",
        NOT_FOUND => b"CUDA_ERROR_NOT_FOUND\0",
        ILLEGAL_ADDRESS => b"CUDA_ERROR_ILLEGAL_ADDRESS\0",
        MISALIGNED_ADDRESS => b"CUDA_ERROR_MISALIGNED_ADDRESS\0",
        HOST_MEMORY_ALREADY_REGISTERED => b"CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED\0",
        HOST_MEMORY_NOT_REGISTERED => b"CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED\0",
        NOT_PERMITTED => b"CUDA_ERROR_NOT_PERMITTED\0",
        NOT_SUPPORTED => b"CUDA_ERROR_NOT_SUPPORTED\0",
        INVALID_CONTEXT => b"CUDA_ERROR_INVALID_CONTEXT\0",
        UNKNOWN => b"CUDA_ERROR_UNKNOWN\0",
        // A code this driver does not know: the driver's answer (cuda.h), which leaves the
        // caller to name it by number.
        _ => {
            // SAFETY: as above.
            unsafe { put(text, std::ptr::null()) };
            return INVALID_VALUE;
        }
    };
    // SAFETY: as above; the string is static.
    unsafe { put(text, s.as_ptr().cast()) }
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(error: CUresult, text: *mut *const c_char) -> CUresult {
    // SAFETY: the same contract.
    unsafe { cuGetErrorName(error, text) }
}

// ---- Contexts -------------------------------------------------------------------------

/// Device 0's primary context handle; device `d`'s is `d * CONTEXT_STRIDE` above it (any
/// non-null values work for cudarc).
const CONTEXT: usize = 0x7e1;
const CONTEXT_STRIDE: usize = 0x1000;

/// The device whose primary context `ctx` is.
fn context_device(ctx: usize) -> Option<c_int> {
    let d = ctx.checked_sub(CONTEXT)?;
    let dev = c_int::try_from(d / CONTEXT_STRIDE).ok()?;
    (d % CONTEXT_STRIDE == 0 && valid_device(dev)).then_some(dev)
}

/// The calling thread's current device: its current context's.
fn current_device() -> Option<c_int> {
    context_device(CURRENT.with(std::cell::Cell::get))
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut *mut c_void, dev: c_int) -> CUresult {
    if !valid_device(dev) {
        return INVALID_DEVICE;
    }
    count(LIVE_CONTEXTS, 1);
    // SAFETY: as above.
    unsafe { put(ctx, (CONTEXT + dev as usize * CONTEXT_STRIDE) as *mut c_void) }
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: c_int) -> CUresult {
    if !valid_device(dev) {
        return INVALID_DEVICE;
    }
    count(LIVE_CONTEXTS, -1);
    SUCCESS
}

thread_local! {
    /// Each thread's current context, as the driver keeps it (none at first).
    static CURRENT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(ctx: *mut c_void) -> CUresult {
    CURRENT.with(|c| c.set(ctx as usize));
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(ctx: *mut *mut c_void) -> CUresult {
    let current = CURRENT.with(std::cell::Cell::get);
    // SAFETY: as above.
    unsafe { put(ctx, current as *mut c_void) }
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(dev: *mut c_int) -> CUresult {
    let Some(current) = current_device() else { return INVALID_CONTEXT };
    // SAFETY: as above.
    unsafe { put(dev, current) }
}

#[no_mangle]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    // The current context's work, as the driver waits for it; none current is an error.
    let Some(device) = current_device() else { return INVALID_CONTEXT };
    let streams: Vec<Arc<Stream>> = lock(streams()).values().filter(|s| s.device == device).cloned().collect();
    for s in streams {
        s.drain();
    }
    emu().sticky.load(Ordering::Acquire)
}

// ---- Device memory --------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(out: *mut CUdeviceptr, size: usize) -> CUresult {
    if out.is_null() || size == 0 {
        return INVALID_VALUE;
    }
    let Some(device) = current_device() else { return INVALID_CONTEXT };
    let forced = fault(FAULT_ALLOC_RESULT);
    if forced != 0 && faulty(device) {
        return forced as CUresult;
    }
    let e = emu();
    let in_use = e.device_bytes[device as usize].load(Ordering::Relaxed);
    let oom = fault(FAULT_OOM) != 0 && faulty(device);
    if oom || in_use.saturating_add(size as u64) > device_memory(device) {
        return OUT_OF_MEMORY;
    }
    // Freed allocations are reused, as the driver reuses device memory: without it, the host
    // would fault in and zero fresh pages for every load, a cost no GPU has, and emulator
    // timings would measure the kernel's page zeroing rather than the pipeline.
    let recycled = {
        let mut r = lock(&e.recycled);
        r.iter().position(|m| m.capacity() >= size && m.capacity() <= size.saturating_mul(2)).map(|i| r.swap_remove(i))
    };
    let mem = match recycled {
        Some(mut m) => {
            m.resize(size, 0);
            m
        }
        None => match zeroed(size) {
            Some(mem) => mem,
            None => return OUT_OF_MEMORY,
        },
    };
    let span = (size as u64).next_multiple_of(DEVICE_ALIGN) + DEVICE_ALIGN;
    let addr = e.next_addr.fetch_add(span, Ordering::Relaxed);
    lock(&e.allocs).insert(addr, Alloc { mem, device });
    count(LIVE_ALLOCS, 1);
    count(LIVE_DEVICE_BYTES, size as i64);
    e.device_bytes[device as usize].fetch_add(size as u64, Ordering::Relaxed);
    // SAFETY: checked not null; the driver API's out-parameter.
    unsafe { out.write(addr) };
    SUCCESS
}

/// `size` zero bytes from the allocator's zeroed memory: large ones are fresh pages that
/// the kernel zeroes when first touched, so untouched device memory costs nothing (writing
/// the zeros, as `Vec::resize` does, cost about 0.5 s a GB on the development VM). `None`
/// when the memory cannot be had.
fn zeroed(size: usize) -> Option<Vec<u8>> {
    let layout = std::alloc::Layout::array::<u8>(size).ok()?;
    // SAFETY: `layout` has a non-zero size (cuMemAlloc_v2 refuses 0).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: `ptr` was allocated by the global allocator with the layout of `size` bytes
    // (align 1), which is what a `Vec<u8>` of capacity `size` frees; all `size` are
    // initialized (zero).
    Some(unsafe { Vec::from_raw_parts(ptr, size, size) })
}

#[no_mangle]
pub extern "C" fn cuMemFree_v2(ptr: CUdeviceptr) -> CUresult {
    let Some(a) = lock(&emu().allocs).remove(&ptr) else { return INVALID_VALUE };
    count(LIVE_ALLOCS, -1);
    count(LIVE_DEVICE_BYTES, -(a.mem.len() as i64));
    emu().device_bytes[a.device as usize].fetch_sub(a.mem.len() as u64, Ordering::Relaxed);
    let mut r = lock(&emu().recycled);
    r.push(a.mem);
    // Keep at most RECYCLE_BYTES of freed memory, dropping the oldest first.
    while r.iter().map(Vec::capacity).sum::<usize>() > RECYCLE_BYTES {
        r.remove(0);
    }
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    let Some(device) = current_device() else { return INVALID_CONTEXT };
    let total_bytes = device_memory(device);
    let used = emu().device_bytes[device as usize].load(Ordering::Relaxed);
    // SAFETY: the driver API's out-parameters.
    let r = unsafe { put(free, total_bytes.saturating_sub(used) as usize) };
    if r != SUCCESS {
        return r;
    }
    // SAFETY: as above.
    unsafe { put(total, total_bytes as usize) }
}

/// Runs `f` on the device bytes `[ptr, ptr + len)`, if they lie in one live allocation.
fn with_device<R>(ptr: CUdeviceptr, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
    with_device_of(None, ptr, len, f)
}

/// [`with_device`], also requiring the allocation to be on device `dev` when one is given:
/// work on one device's stream never reaches another's memory.
fn with_device_of<R>(dev: Option<c_int>, ptr: CUdeviceptr, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
    let mut allocs = lock(&emu().allocs);
    let (&base, alloc) = allocs.range_mut(..=ptr).next_back()?;
    if dev.is_some_and(|d| d != alloc.device) {
        return None;
    }
    let start = usize::try_from(ptr - base).ok()?;
    let end = start.checked_add(len)?;
    let bytes = alloc.mem.get_mut(start..end)?;
    Some(f(bytes))
}

/// Whether `ptr` lies in a live allocation of another device than `dev`.
fn on_other_device(dev: c_int, ptr: CUdeviceptr) -> bool {
    let allocs = lock(&emu().allocs);
    allocs.range(..=ptr).next_back().is_some_and(|(&base, a)| ptr < base + a.mem.len() as u64 && a.device != dev)
}

/// Whether `[p, p + len)` lies in one registered host range: `Some(read_only)` if it does.
fn registered(p: usize, len: usize) -> Option<bool> {
    let reg = lock(&emu().registered);
    reg.range(..=p)
        .next_back()
        .filter(|(&start, &(rlen, _))| p.checked_add(len).is_some_and(|e| e <= start + rlen))
        .map(|(_, &(_, read_only))| read_only)
}

/// Whether `[p, p + len)` overlaps a read-only registration.
fn overlaps_read_only(p: usize, len: usize) -> bool {
    let reg = lock(&emu().registered);
    reg.range(..p.saturating_add(len)).any(|(&start, &(rlen, read_only))| read_only && start + rlen > p)
}

/// Whether every page of `[p, p + len)` is mapped in this process, readable, and, unless
/// `read_only`, writable (`/proc/self/maps`): what pinning the range needs. A range
/// registered read-only (a file's pages) must also be brought in: it is read through
/// `/proc/self/mem`, which fails at a page past the file's end.
fn pinnable(p: usize, len: usize, read_only: bool) -> bool {
    mapped(p, len, read_only) && (!read_only || read_as_device(p, len).is_some())
}

fn mapped(p: usize, len: usize, read_only: bool) -> bool {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else { return false };
    let mut vmas: Vec<(usize, usize, bool, bool)> = maps
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (range, perms) = (fields.next()?, fields.next()?);
            let (a, b) = range.split_once('-')?;
            let (a, b) = (usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?);
            let perms = perms.as_bytes();
            Some((a, b, perms.first() == Some(&b'r'), perms.get(1) == Some(&b'w')))
        })
        .collect();
    vmas.sort_unstable();
    let (mut at, end) = (p & !4095, p.saturating_add(len));
    for (a, b, readable, writable) in vmas {
        if b <= at {
            continue;
        }
        if a > at || !readable || !(writable || read_only) {
            return false;
        }
        at = b;
        if at >= end {
            return true;
        }
    }
    false
}

/// Reads `len` bytes of this process's memory at `p` as a device would through a pinned
/// mapping: through `/proc/self/mem`, so that a page that cannot be read (a file truncated
/// under its mapping) is an error, never a SIGBUS.
fn read_as_device(p: usize, len: usize) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    // Opened once a process: a forked child opens its own (the file reads the memory of the
    // process that opened it).
    static MEM: Mutex<Option<(u32, std::fs::File)>> = Mutex::new(None);
    let mut mem = lock(&MEM);
    if mem.as_ref().is_none_or(|(pid, _)| *pid != std::process::id()) {
        *mem = Some((std::process::id(), std::fs::File::open("/proc/self/mem").ok()?));
    }
    let (_, file) = mem.as_ref()?;
    let mut out = vec![0u8; len];
    file.read_exact_at(&mut out, p as u64).ok()?;
    Some(out)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(dst: CUdeviceptr, src: *const c_void, len: usize) -> CUresult {
    if len == 0 {
        return SUCCESS;
    }
    if src.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: the caller's host buffer holds `len` readable bytes (driver API contract).
    let src = unsafe { std::slice::from_raw_parts(src.cast::<u8>(), len) };
    with_device(dst, len, |d| d.copy_from_slice(src)).map_or(INVALID_VALUE, |()| SUCCESS)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: CUdeviceptr, len: usize) -> CUresult {
    if len == 0 {
        return SUCCESS;
    }
    if dst.is_null() {
        return INVALID_VALUE;
    }
    // The device writing memory pinned read-only: the fault a real device would take.
    if overlaps_read_only(dst as usize, len) {
        emu().sticky.store(ILLEGAL_ADDRESS, Ordering::Release);
        return ILLEGAL_ADDRESS;
    }
    // SAFETY: the caller's host buffer holds `len` writable bytes (driver API contract).
    let dst = unsafe { std::slice::from_raw_parts_mut(dst.cast::<u8>(), len) };
    with_device(src, len, |d| dst.copy_from_slice(d)).map_or(INVALID_VALUE, |()| SUCCESS)
}

const POINTER_ATTRIBUTE_CONTEXT: c_int = 1;
const POINTER_ATTRIBUTE_MEMORY_TYPE: c_int = 2;
const POINTER_ATTRIBUTE_DEVICE_ORDINAL: c_int = 9;
const POINTER_ATTRIBUTE_RANGE_START_ADDR: c_int = 11;
const POINTER_ATTRIBUTE_RANGE_SIZE: c_int = 12;

/// What the driver knows of a device address: its allocation's start and size, its device,
/// its memory type. Other addresses (host memory, freed memory) are
/// `CUDA_ERROR_INVALID_VALUE`, as the driver answers.
#[no_mangle]
pub unsafe extern "C" fn cuPointerGetAttribute(data: *mut c_void, attribute: c_int, ptr: CUdeviceptr) -> CUresult {
    let found = {
        let allocs = lock(&emu().allocs);
        allocs
            .range(..=ptr)
            .next_back()
            .filter(|(&base, a)| ptr < base + a.mem.len() as u64)
            .map(|(&base, a)| (base, a.mem.len(), a.device))
    };
    let Some((base, size, device)) = found else { return INVALID_VALUE };
    match attribute {
        // `data` points at a value of the type each attribute writes (driver API contract).
        // SAFETY: as just said.
        POINTER_ATTRIBUTE_MEMORY_TYPE => unsafe { put(data.cast::<c_uint>(), MEMORYTYPE_DEVICE) },
        // SAFETY: as above.
        POINTER_ATTRIBUTE_DEVICE_ORDINAL => unsafe { put(data.cast::<c_int>(), device) },
        // SAFETY: as above.
        POINTER_ATTRIBUTE_RANGE_START_ADDR => unsafe { put(data.cast::<CUdeviceptr>(), base) },
        // SAFETY: as above.
        POINTER_ATTRIBUTE_RANGE_SIZE => unsafe { put(data.cast::<usize>(), size) },
        // Memory is allocated in its device's primary context, the one context a device has.
        // SAFETY: as above.
        POINTER_ATTRIBUTE_CONTEXT => unsafe {
            put(data.cast::<*mut c_void>(), (CONTEXT + device as usize * CONTEXT_STRIDE) as *mut c_void)
        },
        _ => INVALID_VALUE,
    }
}

// ---- Page-locked host memory ----------------------------------------------------------

#[no_mangle]
pub extern "C" fn cuMemHostRegister_v2(p: *mut c_void, len: usize, flags: c_uint) -> CUresult {
    if p.is_null() || len == 0 {
        return INVALID_VALUE;
    }
    // Registered with the current context (and, PORTABLE, with every other).
    if current_device().is_none() {
        return INVALID_CONTEXT;
    }
    if fault(FAULT_REFUSE_REGISTER) != 0 {
        return NOT_PERMITTED;
    }
    let read_only = flags & REGISTER_READ_ONLY != 0;
    if read_only && fault(FAULT_NO_READ_ONLY_REGISTER) != 0 {
        return NOT_SUPPORTED;
    }
    let start = p as usize;
    // The driver pins the pages: unmapped ones cannot be, nor, without READ_ONLY, pages the
    // process may not write.
    if !pinnable(start, len, read_only) {
        return INVALID_VALUE;
    }
    let mut reg = lock(&emu().registered);
    let overlaps = reg.range(..start.saturating_add(len)).next_back().is_some_and(|(&s, &(l, _))| s + l > start);
    if overlaps {
        return HOST_MEMORY_ALREADY_REGISTERED;
    }
    reg.insert(start, (len, read_only));
    count(LIVE_REGISTRATIONS, 1);
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuMemHostUnregister(p: *mut c_void) -> CUresult {
    match lock(&emu().registered).remove(&(p as usize)) {
        Some(_) => {
            count(LIVE_REGISTRATIONS, -1);
            SUCCESS
        }
        None => HOST_MEMORY_NOT_REGISTERED,
    }
}

// ---- Streams and events ---------------------------------------------------------------

/// A kernel the emulator implements: a conversion, by element type names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Convert {
    from: Elem,
    to: Elem,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    Bf16,
    F16,
    F32,
    F8E4M3,
    F8E5M2,
}

impl Elem {
    fn parse(s: &str) -> Option<Elem> {
        Some(match s {
            "bf16" => Elem::Bf16,
            "f16" => Elem::F16,
            "f32" => Elem::F32,
            "f8e4m3" => Elem::F8E4M3,
            "f8e5m2" => Elem::F8E5M2,
            _ => return None,
        })
    }
    fn width(self) -> usize {
        match self {
            Elem::F8E4M3 | Elem::F8E5M2 => 1,
            Elem::Bf16 | Elem::F16 => 2,
            Elem::F32 => 4,
        }
    }
    fn decode(self, b: &[u8]) -> f32 {
        match self {
            Elem::Bf16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            Elem::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            Elem::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Elem::F8E5M2 => half::f16::from_bits(u16::from(b[0]) << 8).to_f32(),
            Elem::F8E4M3 => {
                let (sign, exp, man) = (b[0] >> 7, (b[0] >> 3) & 0xf, b[0] & 7);
                let magnitude = match (exp, man) {
                    (0xf, 7) => f32::NAN,
                    (0, m) => f32::from(m) * 2f32.powi(-9),
                    (e, m) => (8.0 + f32::from(m)) * 2f32.powi(i32::from(e) - 10),
                };
                if sign == 1 {
                    -magnitude
                } else {
                    magnitude
                }
            }
        }
    }
    fn encode(self, x: f32, out: &mut [u8]) {
        match self {
            Elem::Bf16 => out.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
            Elem::F16 => out.copy_from_slice(&half::f16::from_f32(x).to_le_bytes()),
            Elem::F32 => out.copy_from_slice(&x.to_le_bytes()),
            // Not a target of any kernel.
            Elem::F8E4M3 | Elem::F8E5M2 => {}
        }
    }
}

impl Convert {
    /// `tl_convert_<from>_<to>`, for a target of bf16, f16 or f32.
    fn by_name(name: &str) -> Option<Convert> {
        let (from, to) = name.strip_prefix("tl_convert_")?.split_once('_')?;
        let (from, to) = (Elem::parse(from)?, Elem::parse(to)?);
        (from != to && matches!(to, Elem::Bf16 | Elem::F16 | Elem::F32)).then_some(Convert { from, to })
    }
}

enum Op {
    /// A conversion kernel over `n` elements.
    Launch {
        kernel: Convert,
        src: CUdeviceptr,
        dst: CUdeviceptr,
        n: usize,
    },
    Copy {
        dst: CUdeviceptr,
        src: usize,
        len: usize,
    },
    /// `cuMemsetD8Async`: `len` bytes of device memory set to `value`.
    Memset {
        dst: CUdeviceptr,
        value: u8,
        len: usize,
    },
    /// `rows` rows of `len` bytes, `src_pitch` apart on the host and `dst_pitch` on the device.
    Copy2D {
        dst: CUdeviceptr,
        dst_pitch: usize,
        src: usize,
        src_pitch: usize,
        len: usize,
        rows: usize,
    },
    /// `cuMemcpy2DAsync` or `cuMemcpyDtoDAsync` between device addresses (`rows` rows of
    /// `len` bytes).
    DeviceCopy2D {
        dst: CUdeviceptr,
        dst_pitch: usize,
        src: CUdeviceptr,
        src_pitch: usize,
        len: usize,
        rows: usize,
    },
    /// `ncclSend`: `len` bytes of device memory at `src` to rank `peer`.
    Send {
        comm: Arc<nccl::Comm>,
        peer: usize,
        src: CUdeviceptr,
        len: usize,
    },
    /// `ncclRecv`: the next message from rank `peer` into `len` bytes at `dst`.
    Recv {
        comm: Arc<nccl::Comm>,
        peer: usize,
        dst: CUdeviceptr,
        len: usize,
    },
    Record {
        event: Arc<Event>,
        generation: u64,
    },
    Marker(Arc<Event>, u64),
    /// `cuStreamWaitEvent`: the stream's later work waits until the event reaches the
    /// generation it had when the wait was queued.
    Wait(Arc<Event>, u64),
}

/// A stream: a worker thread that applies its operations in order, later.
struct Stream {
    /// The device whose context was current when the stream was made.
    device: c_int,
    tx: Mutex<Option<Sender<Op>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    /// Completed when the worker has applied everything queued before a `drain`.
    drained: Arc<Event>,
}

impl Stream {
    fn push(&self, op: Op) -> CUresult {
        match lock(&self.tx).as_ref().map(|tx| tx.send(op)) {
            Some(Ok(())) => SUCCESS,
            _ => INVALID_HANDLE,
        }
    }

    /// Waits until every operation queued so far has been applied.
    fn drain(&self) {
        let generation = self.drained.bump();
        if self.push(Op::Marker(Arc::clone(&self.drained), generation)) == SUCCESS {
            self.drained.wait(generation);
        }
    }
}

fn streams() -> &'static Mutex<BTreeMap<usize, Arc<Stream>>> {
    static STREAMS: OnceLock<Mutex<BTreeMap<usize, Arc<Stream>>>> = OnceLock::new();
    STREAMS.get_or_init(|| Mutex::new(BTreeMap::new()))
}

fn apply(op: Op) {
    match op {
        Op::Copy { dst, src, len } => {
            let delay = fault(FAULT_COPY_DELAY_US);
            if delay > 0 {
                std::thread::sleep(Duration::from_micros(delay));
            }
            // The source must still be registered when the copy runs: memory unregistered
            // (or freed) with a copy still queued is the bug this catches.
            let done = match registered(src, len) {
                None => None,
                // A file's pages in the page cache: read as the device reads them.
                Some(true) => read_as_device(src, len).and_then(|bytes| {
                    emu().read_only_copies.fetch_add(1, Ordering::AcqRel);
                    with_device(dst, len, |d| d.copy_from_slice(&bytes))
                }),
                Some(false) => {
                    // SAFETY: the range was registered (checked just now), so it is live host
                    // memory that the registrant promised to keep until unregistering it.
                    let bytes = unsafe { std::slice::from_raw_parts(src as *const u8, len) };
                    with_device(dst, len, |d| d.copy_from_slice(bytes))
                }
            };
            if done.is_none() {
                emu().sticky.store(ILLEGAL_ADDRESS, Ordering::Release);
            }
        }
        Op::Copy2D { dst, dst_pitch, src, src_pitch, len, rows } => {
            for k in 0..rows {
                apply(Op::Copy { dst: dst + (k * dst_pitch) as u64, src: src + k * src_pitch, len });
            }
        }
        Op::DeviceCopy2D { dst, dst_pitch, src, src_pitch, len, rows } => {
            for k in 0..rows {
                let (s, d) = (src + (k * src_pitch) as u64, dst + (k * dst_pitch) as u64);
                let done =
                    with_device(s, len, |b| b.to_vec()).and_then(|b| with_device(d, len, |o| o.copy_from_slice(&b)));
                if done.is_none() {
                    emu().sticky.store(ILLEGAL_ADDRESS, Ordering::Release);
                    return;
                }
            }
        }
        Op::Send { comm, peer, src, len } => match with_device(src, len, |b| b.to_vec()) {
            Some(bytes) => comm.send(peer, &bytes),
            None => emu().sticky.store(ILLEGAL_ADDRESS, Ordering::Release),
        },
        Op::Recv { comm, peer, dst, len } => {
            if let Some(bytes) = comm.recv(peer, len) {
                if with_device(dst, len, |o| o.copy_from_slice(&bytes)).is_none() {
                    emu().sticky.store(ILLEGAL_ADDRESS, Ordering::Release);
                }
            }
        }
        Op::Memset { dst, value, len } => {
            let delay = fault(FAULT_MEMSET_DELAY_US);
            if delay > 0 {
                std::thread::sleep(Duration::from_micros(delay));
            }
            if with_device(dst, len, |d| d.fill(value)).is_none() {
                emu().sticky.store(ILLEGAL_ADDRESS, Ordering::Release);
            }
        }
        Op::Launch { kernel, src, dst, n } => {
            // A kernel reads and writes only device memory: an address outside a live
            // allocation is the illegal access a real kernel would fault on.
            let (wf, wt) = (kernel.from.width(), kernel.to.width());
            // Element loads and stores must be aligned, as on a GPU.
            if src % wf as u64 != 0 || dst % wt as u64 != 0 {
                emu().sticky.store(MISALIGNED_ADDRESS, Ordering::Release);
                return;
            }
            let input = n.checked_mul(wf).and_then(|len| with_device(src, len, |b| b.to_vec()));
            let done = input.zip(n.checked_mul(wt)).and_then(|(input, out_len)| {
                with_device(dst, out_len, |out| {
                    for (s, d) in input.chunks_exact(wf).zip(out.chunks_exact_mut(wt)) {
                        kernel.to.encode(kernel.from.decode(s), d);
                    }
                })
            });
            if done.is_none() {
                emu().sticky.store(ILLEGAL_ADDRESS, Ordering::Release);
            }
        }
        Op::Record { event, generation } | Op::Marker(event, generation) => event.complete(generation),
        Op::Wait(event, generation) => event.wait(generation),
    }
}

// ---- Modules and kernels --------------------------------------------------------------

/// Loaded modules: handle -> the entry points their PTX declares.
fn modules() -> &'static Mutex<BTreeMap<usize, Vec<String>>> {
    static MODULES: OnceLock<Mutex<BTreeMap<usize, Vec<String>>>> = OnceLock::new();
    MODULES.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// Functions: handle -> (module, kernel).
fn functions() -> &'static Mutex<BTreeMap<usize, (usize, Convert)>> {
    static FUNCTIONS: OnceLock<Mutex<BTreeMap<usize, (usize, Convert)>>> = OnceLock::new();
    FUNCTIONS.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// Handles for modules and functions: distinct, never reused, never null.
fn next_handle() -> usize {
    static NEXT: AtomicU64 = AtomicU64::new(0x10_0000);
    NEXT.fetch_add(16, Ordering::Relaxed) as usize
}

/// The newest PTX ISA this emulated driver (CUDA 12.8) compiles.
const PTX_ISA_MAX: (u32, u32) = (8, 7);

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut *mut c_void, image: *const c_void) -> CUresult {
    if module.is_null() || image.is_null() {
        return INVALID_VALUE;
    }
    // A module is loaded into the current context.
    if current_device().is_none() {
        return INVALID_CONTEXT;
    }
    // SAFETY: a PTX image is NUL-terminated text (driver API contract).
    let text = unsafe { std::ffi::CStr::from_ptr(image.cast()) };
    let Ok(text) = text.to_str() else { return INVALID_IMAGE };
    let version = text.lines().find_map(|l| l.trim().strip_prefix(".version ")).and_then(|v| {
        let (major, minor) = v.trim().split_once('.')?;
        Some((major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?))
    });
    match version {
        None => return INVALID_IMAGE,
        Some(v) if v > PTX_ISA_MAX => return UNSUPPORTED_PTX_VERSION,
        Some(_) => {}
    }
    let entries: Vec<String> = text
        .split(".entry ")
        .skip(1)
        .filter_map(|rest| rest.split(|c: char| c == '(' || c.is_whitespace()).next().map(str::to_owned))
        .collect();
    let handle = next_handle();
    lock(modules()).insert(handle, entries);
    count(LIVE_MODULES, 1);
    // SAFETY: checked not null; the driver API's out-parameter.
    unsafe { module.write(handle as *mut c_void) };
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(
    function: *mut *mut c_void,
    module: *mut c_void,
    name: *const c_char,
) -> CUresult {
    if function.is_null() || name.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: a NUL-terminated name (driver API contract).
    let Ok(name) = unsafe { std::ffi::CStr::from_ptr(name) }.to_str() else { return NOT_FOUND };
    let modules = lock(modules());
    let Some(entries) = modules.get(&(module as usize)) else { return INVALID_HANDLE };
    // The PTX must declare it, and the emulator must know how to run it.
    let Some(kernel) = Convert::by_name(name).filter(|_| entries.iter().any(|e| e == name)) else { return NOT_FOUND };
    let handle = next_handle();
    lock(functions()).insert(handle, (module as usize, kernel));
    // SAFETY: checked not null; the driver API's out-parameter.
    unsafe { function.write(handle as *mut c_void) };
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuModuleUnload(module: *mut c_void) -> CUresult {
    if lock(modules()).remove(&(module as usize)).is_none() {
        return INVALID_HANDLE;
    }
    lock(functions()).retain(|_, (m, _)| *m != module as usize);
    count(LIVE_MODULES, -1);
    SUCCESS
}

/// Runs a conversion kernel: its three arguments (source, destination, count) are read now,
/// as the driver reads them at the call; the work runs on the stream, later.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel(
    function: *mut c_void,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    _shared_bytes: c_uint,
    handle: *mut c_void,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    let Some(&(_, kernel)) = lock(functions()).get(&(function as usize)) else { return INVALID_HANDLE };
    let dims = [grid_x, grid_y, grid_z, block_x, block_y, block_z];
    let threads = block_x.checked_mul(block_y).and_then(|t| t.checked_mul(block_z));
    if params.is_null() || !extra.is_null() || dims.contains(&0) || threads.is_none_or(|t| t > 1024) {
        return INVALID_VALUE;
    }
    let mut args = [0u64; 3];
    for (i, a) in args.iter_mut().enumerate() {
        // SAFETY: the kernel takes three 8-byte arguments; `params` holds a pointer to each
        // (driver API contract), so entry `i` is in the array.
        let entry = unsafe { params.add(i) };
        // SAFETY: as above: the entry is readable.
        let p = unsafe { *entry };
        if p.is_null() {
            return INVALID_VALUE;
        }
        // SAFETY: as above: each points at its argument's value.
        *a = unsafe { p.cast::<u64>().read_unaligned() };
    }
    let Ok(n) = usize::try_from(args[2]) else { return INVALID_VALUE };
    // A kernel runs on its stream's device, and reaches that device's memory alone.
    let device = match stream_device(handle) {
        Ok(d) => d,
        Err(e) => return e,
    };
    // (Addresses in no allocation fault later, on the stream, as on a GPU.)
    if on_other_device(device, args[0]) || on_other_device(device, args[1]) {
        return ILLEGAL_ADDRESS;
    }
    let op = Op::Launch { kernel, src: args[0], dst: args[1], n };
    enqueue(handle, op)
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(out: *mut *mut c_void, _flags: c_uint) -> CUresult {
    if out.is_null() {
        return INVALID_VALUE;
    }
    let Some(device) = current_device() else { return INVALID_CONTEXT };
    let (tx, rx) = mpsc::channel::<Op>();
    let worker = match std::thread::Builder::new().name("tlemu-stream".into()).spawn(move || {
        for op in rx {
            apply(op);
        }
    }) {
        Ok(w) => w,
        Err(_) => return OUT_OF_MEMORY,
    };
    let stream = Arc::new(Stream {
        device,
        tx: Mutex::new(Some(tx)),
        worker: Mutex::new(Some(worker)),
        drained: Arc::new(Event::default()),
    });
    let handle = Arc::as_ptr(&stream) as usize;
    lock(streams()).insert(handle, stream);
    count(LIVE_STREAMS, 1);
    // SAFETY: checked not null; the driver API's out-parameter.
    unsafe { out.write(handle as *mut c_void) };
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(out: *mut *mut c_void, flags: c_uint, _p: c_int) -> CUresult {
    // SAFETY: the same contract.
    unsafe { cuStreamCreate(out, flags) }
}

/// Queues `op` on the stream `handle`, or applies it now on the null stream.
fn enqueue(handle: *mut c_void, op: Op) -> CUresult {
    if handle.is_null() {
        apply(op);
        return SUCCESS;
    }
    match stream(handle) {
        Some(s) => s.push(op),
        None => INVALID_HANDLE,
    }
}

fn stream(handle: *mut c_void) -> Option<Arc<Stream>> {
    lock(streams()).get(&(handle as usize)).cloned()
}

/// The device work queued on stream `handle` runs on: the stream's (the null stream's is
/// the current context's). Queuing work on another device's stream than the current
/// context's is refused, as the driver refuses it.
fn stream_device(handle: *mut c_void) -> Result<c_int, CUresult> {
    let current = current_device().ok_or(INVALID_CONTEXT)?;
    if handle.is_null() {
        return Ok(current);
    }
    let s = stream(handle).ok_or(INVALID_HANDLE)?;
    if s.device != current {
        return Err(INVALID_CONTEXT);
    }
    Ok(s.device)
}

#[no_mangle]
pub extern "C" fn cuStreamDestroy_v2(handle: *mut c_void) -> CUresult {
    let Some(s) = lock(streams()).remove(&(handle as usize)) else { return INVALID_HANDLE };
    // As the driver does, work already queued still runs; the worker ends after it.
    lock(&s.tx).take();
    if let Some(w) = lock(&s.worker).take() {
        let _ = w.join();
    }
    count(LIVE_STREAMS, -1);
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuStreamSynchronize(handle: *mut c_void) -> CUresult {
    if handle.is_null() {
        return cuCtxSynchronize();
    }
    let Some(s) = stream(handle) else { return INVALID_HANDLE };
    s.drain();
    emu().sticky.load(Ordering::Acquire)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    len: usize,
    handle: *mut c_void,
) -> CUresult {
    let device = match stream_device(handle) {
        Ok(d) => d,
        Err(e) => return e,
    };
    if copy_fails(device) {
        return UNKNOWN;
    }
    if len == 0 {
        return SUCCESS;
    }
    if src.is_null() || registered(src as usize, len).is_none() {
        // The real driver would stage pageable memory synchronously; tensorlift promises it
        // never copies from pageable memory on the load path.
        return INVALID_VALUE;
    }
    if with_device_of(Some(device), dst, len, |_| ()).is_none() {
        return INVALID_VALUE;
    }
    let op = Op::Copy { dst, src: src as usize, len };
    enqueue(handle, op)
}

/// Zeroes (or fills) device memory in stream order, as cudarc's `alloc_zeros` asks (what a
/// framework that lends its allocations to a load, candle, calls).
#[no_mangle]
pub extern "C" fn cuMemsetD8Async(dst: CUdeviceptr, value: u8, len: usize, handle: *mut c_void) -> CUresult {
    let device = match stream_device(handle) {
        Ok(d) => d,
        Err(e) => return e,
    };
    if len == 0 {
        return SUCCESS;
    }
    if with_device_of(Some(device), dst, len, |_| ()).is_none() {
        return INVALID_VALUE;
    }
    enqueue(handle, Op::Memset { dst, value, len })
}

/// A device-to-host copy on a stream (cudarc's `memcpy_dtoh`, which tests read back a
/// framework's memory with): done once the stream's earlier work is, before returning, as
/// the driver does for pageable memory.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    len: usize,
    handle: *mut c_void,
) -> CUresult {
    let r = cuStreamSynchronize(handle);
    if r != SUCCESS {
        return r;
    }
    // SAFETY: the caller's contract is cuMemcpyDtoH's: `len` writable bytes at `dst`.
    unsafe { cuMemcpyDtoH_v2(dst, src, len) }
}

/// `CUDA_MEMCPY2D`, field for field.
#[repr(C)]
#[derive(Debug)]
pub struct Memcpy2D {
    src_x_in_bytes: usize,
    src_y: usize,
    src_memory_type: c_uint,
    src_host: *const c_void,
    src_device: CUdeviceptr,
    src_array: *mut c_void,
    src_pitch: usize,
    dst_x_in_bytes: usize,
    dst_y: usize,
    dst_memory_type: c_uint,
    dst_host: *mut c_void,
    dst_device: CUdeviceptr,
    dst_array: *mut c_void,
    dst_pitch: usize,
    width_in_bytes: usize,
    height: usize,
}

const MEMORYTYPE_HOST: c_uint = 1;
const MEMORYTYPE_DEVICE: c_uint = 2;

/// A 2D copy, host to device or device to device (the kinds tensorlift makes): every row's
/// host source must be registered host memory, a device source inside one allocation of the
/// stream's device, and every row's destination inside one allocation, with
/// pitches at least the row's width, as the driver requires.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpy2DAsync_v2(copy: *const Memcpy2D, handle: *mut c_void) -> CUresult {
    let device = match stream_device(handle) {
        Ok(d) => d,
        Err(e) => return e,
    };
    if copy_fails(device) {
        return UNKNOWN;
    }
    if copy.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: not null; the caller's descriptor is valid for reads during the call.
    let c = unsafe { &*copy };
    let from_device = c.src_memory_type == MEMORYTYPE_DEVICE;
    if !(c.src_memory_type == MEMORYTYPE_HOST || from_device) || c.dst_memory_type != MEMORYTYPE_DEVICE {
        return INVALID_VALUE;
    }
    let (len, rows) = (c.width_in_bytes, c.height);
    if len == 0 || rows == 0 {
        return SUCCESS;
    }
    // The driver's pitch limit (CU_DEVICE_ATTRIBUTE_MAX_PITCH) is 2^31 - 1 bytes.
    const MAX_PITCH: usize = (1 << 31) - 1;
    let pitches_ok = c.src_pitch >= len && c.dst_pitch >= len && c.src_pitch <= MAX_PITCH && c.dst_pitch <= MAX_PITCH;
    if !pitches_ok || c.src_x_in_bytes != 0 || c.dst_x_in_bytes != 0 {
        return INVALID_VALUE;
    }
    let (src, dst) = (c.src_host as usize + c.src_y * c.src_pitch, c.dst_device + (c.dst_y * c.dst_pitch) as u64);
    let extent = |pitch: usize| (rows - 1).checked_mul(pitch).and_then(|e| e.checked_add(len));
    let (Some(src_len), Some(dst_len)) = (extent(c.src_pitch), extent(c.dst_pitch)) else { return INVALID_VALUE };
    if from_device {
        let src = c.src_device + (c.src_y * c.src_pitch) as u64;
        if with_device_of(Some(device), src, src_len, |_| ()).is_none()
            || with_device_of(Some(device), dst, dst_len, |_| ()).is_none()
        {
            return INVALID_VALUE;
        }
        let op = Op::DeviceCopy2D { dst, dst_pitch: c.dst_pitch, src, src_pitch: c.src_pitch, len, rows };
        return enqueue(handle, op);
    }
    if c.src_host.is_null()
        || registered(src, src_len).is_none()
        || with_device_of(Some(device), dst, dst_len, |_| ()).is_none()
    {
        return INVALID_VALUE;
    }
    let op = Op::Copy2D { dst, dst_pitch: c.dst_pitch, src, src_pitch: c.src_pitch, len, rows };
    enqueue(handle, op)
}

/// An event: `recorded` generations are queued, `completed` ones reached.
#[derive(Default)]
struct Event {
    state: Mutex<(u64, u64)>,
    reached: Condvar,
    /// The device whose context was current when it was made (a stream's own event: none),
    /// whose streams alone may record it, as a real event belongs to its context.
    device: Option<c_int>,
}

impl Event {
    fn bump(&self) -> u64 {
        let mut s = lock(&self.state);
        s.0 += 1;
        s.0
    }
    /// Generations complete in order: a record reached completes the earlier ones too. (An
    /// event recorded again on a faster stream before an earlier record has run so
    /// completes that one early, looser than the driver; tensorlift records each event on
    /// one stream.)
    fn complete(&self, generation: u64) {
        let mut s = lock(&self.state);
        s.1 = s.1.max(generation);
        self.reached.notify_all();
    }
    fn wait(&self, generation: u64) {
        let mut s = lock(&self.state);
        while s.1 < generation {
            s = self.reached.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

fn events() -> &'static Mutex<BTreeMap<usize, Arc<Event>>> {
    static EVENTS: OnceLock<Mutex<BTreeMap<usize, Arc<Event>>>> = OnceLock::new();
    EVENTS.get_or_init(|| Mutex::new(BTreeMap::new()))
}

fn event(handle: *mut c_void) -> Option<Arc<Event>> {
    lock(events()).get(&(handle as usize)).cloned()
}

#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(out: *mut *mut c_void, _flags: c_uint) -> CUresult {
    if out.is_null() {
        return INVALID_VALUE;
    }
    // Made in the current context, as a real driver makes it: none is an error.
    let Some(device) = current_device() else { return INVALID_CONTEXT };
    let e = Arc::new(Event { device: Some(device), ..Event::default() });
    let handle = Arc::as_ptr(&e) as usize;
    lock(events()).insert(handle, e);
    count(LIVE_EVENTS, 1);
    // SAFETY: checked not null; the driver API's out-parameter.
    unsafe { out.write(handle as *mut c_void) };
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuEventDestroy_v2(handle: *mut c_void) -> CUresult {
    match lock(events()).remove(&(handle as usize)) {
        Some(_) => {
            count(LIVE_EVENTS, -1);
            SUCCESS
        }
        None => INVALID_HANDLE,
    }
}

#[no_mangle]
pub extern "C" fn cuEventRecord(handle: *mut c_void, stream_handle: *mut c_void) -> CUresult {
    let Some(e) = event(handle) else { return INVALID_HANDLE };
    if stream_handle.is_null() {
        let generation = e.bump();
        e.complete(generation);
        return SUCCESS;
    }
    // The stream first: a record refused leaves the event as it was, so that no wait queued
    // after it waits for a record that never runs.
    let Some(s) = stream(stream_handle) else { return INVALID_HANDLE };
    // An event and a stream of two contexts do not go together.
    if e.device.is_some_and(|d| d != s.device) {
        return INVALID_HANDLE;
    }
    let generation = e.bump();
    let r = s.push(Op::Record { event: Arc::clone(&e), generation });
    if r != SUCCESS {
        e.complete(generation);
    }
    r
}

#[no_mangle]
pub extern "C" fn cuEventSynchronize(handle: *mut c_void) -> CUresult {
    let Some(e) = event(handle) else { return INVALID_HANDLE };
    let generation = lock(&e.state).0;
    e.wait(generation);
    emu().sticky.load(Ordering::Acquire)
}

#[no_mangle]
pub extern "C" fn cuEventQuery(handle: *mut c_void) -> CUresult {
    let Some(e) = event(handle) else { return INVALID_HANDLE };
    let (recorded, completed) = *lock(&e.state);
    if completed < recorded {
        NOT_READY
    } else {
        emu().sticky.load(Ordering::Acquire)
    }
}

#[no_mangle]
pub extern "C" fn cuStreamWaitEvent(handle: *mut c_void, event_handle: *mut c_void, _flags: c_uint) -> CUresult {
    // The wait is queued on the stream, as the driver queues it: the caller's thread goes
    // on, so a caller that needs the event's work done before its own host code (or before
    // work on a stream that does not wait) must synchronise, and a test sees it if it does
    // not. On the null stream, the caller waits.
    let Some(e) = event(event_handle) else { return INVALID_HANDLE };
    let generation = lock(&e.state).0;
    enqueue(handle, Op::Wait(e, generation))
}

// ---- Control, for tests ---------------------------------------------------------------

/// Writes the live counts (allocations, registrations, streams, events, contexts, device
/// bytes) into `out[..n]`.
#[no_mangle]
pub unsafe extern "C" fn tlemu_live(out: *mut u64, n: usize) -> CUresult {
    if out.is_null() {
        return INVALID_VALUE;
    }
    let n = n.min(LIVE_COUNT);
    // SAFETY: the caller's array holds n values.
    let out = unsafe { std::slice::from_raw_parts_mut(out, n) };
    for (o, v) in out.iter_mut().zip(&emu().live) {
        *o = v.load(Ordering::Relaxed);
    }
    SUCCESS
}

/// Sets a fault (see the crate docs for their meaning and order).
#[no_mangle]
pub extern "C" fn tlemu_set_fault(which: c_uint, value: u64) -> CUresult {
    match emu().faults.get(which as usize) {
        Some(f) => {
            f.store(value, Ordering::Relaxed);
            SUCCESS
        }
        None => INVALID_VALUE,
    }
}

/// Clears the sticky error and restarts the copy count (for `TLEMU_FAIL_COPY`).
#[no_mangle]
pub extern "C" fn tlemu_reset() -> CUresult {
    emu().sticky.store(SUCCESS, Ordering::Release);
    emu().copies.store(0, Ordering::Release);
    emu().device_copies.iter().for_each(|c| c.store(0, Ordering::Release));
    SUCCESS
}

/// Asynchronous copies made since the last reset.
#[no_mangle]
pub extern "C" fn tlemu_copies() -> u64 {
    emu().copies.load(Ordering::Acquire)
}

/// Copies (rows, for a 2D copy) that read a read-only registration, since the process
/// started.
#[no_mangle]
pub extern "C" fn tlemu_read_only_copies() -> u64 {
    emu().read_only_copies.load(Ordering::Acquire)
}

/// The calling thread's current context handle (0 for none), for tests that check a
/// library leaves it as it found it.
#[no_mangle]
pub extern "C" fn tlemu_current_context() -> u64 {
    CURRENT.with(std::cell::Cell::get) as u64
}

/// Sets the calling thread's current context handle, as another library of the process
/// would (any value: the emulator checks no handle but its own context's).
#[no_mangle]
pub extern "C" fn tlemu_set_current_context(handle: u64) {
    CURRENT.with(|c| c.set(handle as usize));
}

/// A device-to-device copy in stream order, within the stream's device.
#[no_mangle]
pub extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    len: usize,
    handle: *mut c_void,
) -> CUresult {
    let device = match stream_device(handle) {
        Ok(d) => d,
        Err(e) => return e,
    };
    if len == 0 {
        return SUCCESS;
    }
    if with_device_of(Some(device), src, len, |_| ()).is_none()
        || with_device_of(Some(device), dst, len, |_| ()).is_none()
    {
        return INVALID_VALUE;
    }
    enqueue(handle, Op::DeviceCopy2D { dst, dst_pitch: len, src, src_pitch: len, len, rows: 1 })
}

// ---- NCCL -----------------------------------------------------------------------------

/// The NCCL calls tensorlift makes, between processes on one machine: each rank of a
/// communicator is a process with this library as its `libnccl` (tests point
/// `TENSORLIFT_LIBNCCL` at this file), its device memory the emulator's. Ranks connect over
/// Unix sockets in a directory that the unique id names; each pair's messages arrive in the
/// order they were sent, as NCCL matches a pair's sends and receives. Sends and receives run
/// in stream order, like the driver's other work: a receive waits on its stream's worker
/// until its message comes. A reader thread a peer drains that peer's socket, so sends never
/// wait for the receiver (no deadlock in any order of a group's calls). A peer that goes
/// away fails the receives still waiting for it with `ncclRemoteError`, which
/// `ncclCommGetAsyncError` then reports, as NCCL does over a network; with
/// `TLEMU_NCCL_SILENT_PEERS=1` they wait on, as NCCL's do within a node. `ncclCommAbort`
/// fails this process's own at once. `TLEMU_NCCL_EXIT_AFTER_SENDS=N` ends the process
/// (exit status 3) as it makes its Nth send: a rank that dies in the middle of an exchange.
mod nccl {
    use std::collections::VecDeque;
    use std::ffi::{c_char, c_int, c_void};
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
    use std::sync::{Arc, Condvar, Mutex, OnceLock};
    use std::time::{Duration, Instant};

    use super::{current_device, enqueue, lock, stream_device, with_device_of, CUdeviceptr, Op};

    pub type NcclResult = c_int;
    const SUCCESS: NcclResult = 0;
    const UNHANDLED_CUDA_ERROR: NcclResult = 1;
    const SYSTEM_ERROR: NcclResult = 2;
    const INVALID_ARGUMENT: NcclResult = 4;
    const INVALID_USAGE: NcclResult = 5;
    const REMOTE_ERROR: NcclResult = 6;

    /// `NCCL_UNIQUE_ID_BYTES`.
    const ID_BYTES: usize = 128;
    const ID_PREFIX: &[u8] = b"tlemu-nccl:";
    /// How long a rank waits for the others to come up.
    const CONNECT_WAIT: Duration = Duration::from_secs(60);

    #[derive(Default)]
    struct Inbox {
        /// Messages arrived, in order, and whether the peer has gone.
        state: Mutex<(VecDeque<Vec<u8>>, bool)>,
        arrived: Condvar,
    }

    struct Peer {
        out: Mutex<UnixStream>,
        inbox: Arc<Inbox>,
    }

    /// A communicator: this process's rank and a connection to every other rank.
    pub(crate) struct Comm {
        rank: usize,
        world: usize,
        device: c_int,
        peers: Vec<Option<Peer>>,
        error: AtomicI32,
    }

    impl Comm {
        fn fail(&self, code: NcclResult) {
            let _ = self.error.compare_exchange(SUCCESS, code, Ordering::AcqRel, Ordering::Acquire);
        }

        pub(crate) fn send(&self, peer: usize, bytes: &[u8]) {
            static SENDS: AtomicU64 = AtomicU64::new(0);
            let exit_at = std::env::var("TLEMU_NCCL_EXIT_AFTER_SENDS").ok().and_then(|v| v.parse::<u64>().ok());
            if exit_at.is_some_and(|n| SENDS.fetch_add(1, Ordering::Relaxed) + 1 >= n) {
                std::process::exit(3);
            }
            let Some(Some(p)) = self.peers.get(peer) else { return self.fail(INVALID_ARGUMENT) };
            let mut out = lock(&p.out);
            let sent = out.write_all(&(bytes.len() as u64).to_le_bytes()).and_then(|()| out.write_all(bytes));
            if sent.is_err() {
                self.fail(REMOTE_ERROR);
            }
        }

        /// The next message from `peer`, which must be `len` bytes; `None` (the
        /// communicator failed) when the peer went away, was aborted, or sent another length.
        pub(crate) fn recv(&self, peer: usize, len: usize) -> Option<Vec<u8>> {
            let Some(Some(p)) = self.peers.get(peer) else {
                self.fail(INVALID_ARGUMENT);
                return None;
            };
            let mut state = lock(&p.inbox.state);
            loop {
                if let Some(m) = state.0.pop_front() {
                    if m.len() != len {
                        self.fail(INVALID_USAGE);
                        return None;
                    }
                    return Some(m);
                }
                if state.1 {
                    self.fail(REMOTE_ERROR);
                    return None;
                }
                state = p.inbox.arrived.wait(state).unwrap_or_else(|e| e.into_inner());
            }
        }

        fn close(&self) {
            for p in self.peers.iter().flatten() {
                let _ = lock(&p.out).shutdown(std::net::Shutdown::Both);
                lock(&p.inbox.state).1 = true;
                p.inbox.arrived.notify_all();
            }
        }
    }

    fn comms() -> &'static Mutex<std::collections::BTreeMap<usize, Arc<Comm>>> {
        static COMMS: OnceLock<Mutex<std::collections::BTreeMap<usize, Arc<Comm>>>> = OnceLock::new();
        COMMS.get_or_init(Default::default)
    }

    fn comm(handle: *mut c_void) -> Option<Arc<Comm>> {
        lock(comms()).get(&(handle as usize)).cloned()
    }

    fn reader(mut stream: UnixStream, inbox: Arc<Inbox>) {
        let silent = std::env::var("TLEMU_NCCL_SILENT_PEERS").is_ok_and(|v| v == "1");
        loop {
            let mut len = [0u8; 8];
            if stream.read_exact(&mut len).is_err() {
                break;
            }
            let mut m = vec![0u8; u64::from_le_bytes(len) as usize];
            if stream.read_exact(&mut m).is_err() {
                break;
            }
            lock(&inbox.state).0.push_back(m);
            inbox.arrived.notify_all();
        }
        // Within a node NCCL does not notice a peer that is gone: its receives wait on.
        if !silent {
            lock(&inbox.state).1 = true;
            inbox.arrived.notify_all();
        }
    }

    #[no_mangle]
    pub unsafe extern "C" fn ncclGetVersion(version: *mut c_int) -> NcclResult {
        if version.is_null() {
            return INVALID_ARGUMENT;
        }
        // SAFETY: checked not null; the API's out-parameter.
        unsafe { version.write(22_800) };
        SUCCESS
    }

    /// A fresh directory for the ranks' sockets, named in the id.
    #[no_mangle]
    pub unsafe extern "C" fn ncclGetUniqueId(id: *mut u8) -> NcclResult {
        if id.is_null() {
            return INVALID_ARGUMENT;
        }
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "tlemu-nccl-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let name = dir.as_os_str().as_encoded_bytes();
        if ID_PREFIX.len() + name.len() >= ID_BYTES || std::fs::create_dir(&dir).is_err() {
            return SYSTEM_ERROR;
        }
        let mut bytes = [0u8; ID_BYTES];
        bytes[..ID_PREFIX.len()].copy_from_slice(ID_PREFIX);
        bytes[ID_PREFIX.len()..ID_PREFIX.len() + name.len()].copy_from_slice(name);
        // SAFETY: checked not null; `ncclUniqueId` is 128 bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), id, ID_BYTES) };
        SUCCESS
    }

    fn id_dir(id: &[u8; ID_BYTES]) -> Option<PathBuf> {
        let rest = id.strip_prefix(ID_PREFIX)?;
        let end = rest.iter().position(|&b| b == 0)?;
        let s = std::str::from_utf8(&rest[..end]).ok()?;
        Some(PathBuf::from(s))
    }

    fn connect(dir: &Path, rank: usize, world: usize) -> std::io::Result<Vec<Option<UnixStream>>> {
        let listener = UnixListener::bind(dir.join(rank.to_string()))?;
        let mut peers: Vec<Option<UnixStream>> = (0..world).map(|_| None).collect();
        let deadline = Instant::now() + CONNECT_WAIT;
        for (other, slot) in peers.iter_mut().enumerate().take(rank) {
            let path = dir.join(other.to_string());
            let mut s = loop {
                match UnixStream::connect(&path) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            };
            s.write_all(&(rank as u32).to_le_bytes())?;
            *slot = Some(s);
        }
        listener.set_nonblocking(true)?;
        let mut waiting = world - 1 - rank;
        // Once every rank is in, nothing more connects: the last rank out removes the folder.
        let tidy = || {
            let _ = std::fs::remove_file(dir.join(rank.to_string()));
            let _ = std::fs::remove_dir(dir);
        };
        while waiting > 0 {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false)?;
                    let mut who = [0u8; 4];
                    s.read_exact(&mut who)?;
                    let who = u32::from_le_bytes(who) as usize;
                    match peers.get_mut(who) {
                        Some(slot @ None) if who > rank => *slot = Some(s),
                        _ => return Err(std::io::Error::other("a rank connected twice")),
                    }
                    waiting -= 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    tidy();
                    return Err(e);
                }
            }
        }
        tidy();
        Ok(peers)
    }

    /// `ncclUniqueId`, which `ncclCommInitRank` takes by value.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct UniqueId {
        internal: [u8; ID_BYTES],
    }

    #[no_mangle]
    pub unsafe extern "C" fn ncclCommInitRank(
        out: *mut *mut c_void,
        world: c_int,
        id: UniqueId,
        rank: c_int,
    ) -> NcclResult {
        if out.is_null() || world < 1 || rank < 0 || rank >= world {
            return INVALID_ARGUMENT;
        }
        let Some(device) = current_device() else { return UNHANDLED_CUDA_ERROR };
        let Some(dir) = id_dir(&id.internal) else { return INVALID_ARGUMENT };
        let (rank, world) = (rank as usize, world as usize);
        let Ok(streams) = connect(&dir, rank, world) else { return SYSTEM_ERROR };
        let mut peers = Vec::with_capacity(world);
        for s in streams {
            let Some(s) = s else {
                peers.push(None);
                continue;
            };
            let (Ok(read_half), inbox) = (s.try_clone(), Arc::new(Inbox::default())) else { return SYSTEM_ERROR };
            let feed = Arc::clone(&inbox);
            if std::thread::Builder::new().name("tlemu-nccl".into()).spawn(move || reader(read_half, feed)).is_err() {
                return SYSTEM_ERROR;
            }
            peers.push(Some(Peer { out: Mutex::new(s), inbox }));
        }
        let comm = Arc::new(Comm { rank, world, device, peers, error: AtomicI32::new(SUCCESS) });
        let handle = Arc::as_ptr(&comm) as usize;
        lock(comms()).insert(handle, comm);
        // SAFETY: checked not null; the API's out-parameter.
        unsafe { out.write(handle as *mut c_void) };
        SUCCESS
    }

    fn end(handle: *mut c_void) -> NcclResult {
        let Some(c) = lock(comms()).remove(&(handle as usize)) else { return INVALID_ARGUMENT };
        c.close();
        SUCCESS
    }

    #[no_mangle]
    pub extern "C" fn ncclCommDestroy(handle: *mut c_void) -> NcclResult {
        end(handle)
    }

    #[no_mangle]
    pub extern "C" fn ncclCommAbort(handle: *mut c_void) -> NcclResult {
        end(handle)
    }

    #[no_mangle]
    pub unsafe extern "C" fn ncclCommGetAsyncError(handle: *mut c_void, result: *mut NcclResult) -> NcclResult {
        let Some(c) = comm(handle) else { return INVALID_ARGUMENT };
        if result.is_null() {
            return INVALID_ARGUMENT;
        }
        // SAFETY: checked not null; the API's out-parameter.
        unsafe { result.write(c.error.load(Ordering::Acquire)) };
        SUCCESS
    }

    #[no_mangle]
    pub extern "C" fn ncclGroupStart() -> NcclResult {
        SUCCESS
    }

    #[no_mangle]
    pub extern "C" fn ncclGroupEnd() -> NcclResult {
        SUCCESS
    }

    /// Bytes of one element of NCCL data type `dtype`.
    fn width(dtype: c_int) -> Option<usize> {
        Some(match dtype {
            0 | 1 | 10 | 11 => 1,
            6 | 9 => 2,
            2 | 3 | 7 => 4,
            4 | 5 | 8 => 8,
            _ => return None,
        })
    }

    /// The checks `ncclSend` and `ncclRecv` share: a known peer and type, and `count`
    /// elements inside one allocation of the communicator's device, on a stream of it.
    fn checked(
        handle: *mut c_void,
        peer: c_int,
        ptr: CUdeviceptr,
        count: usize,
        dtype: c_int,
        stream: *mut c_void,
    ) -> Result<(Arc<Comm>, usize, usize), NcclResult> {
        let c = comm(handle).ok_or(INVALID_ARGUMENT)?;
        let peer = usize::try_from(peer).ok().filter(|&p| p < c.world && p != c.rank).ok_or(INVALID_ARGUMENT)?;
        let len = width(dtype).and_then(|w| w.checked_mul(count)).ok_or(INVALID_ARGUMENT)?;
        match stream_device(stream) {
            Ok(d) if d == c.device => {}
            _ => return Err(INVALID_USAGE),
        }
        if len > 0 && with_device_of(Some(c.device), ptr, len, |_| ()).is_none() {
            return Err(INVALID_ARGUMENT);
        }
        Ok((c, peer, len))
    }

    /// Checks a send or receive ([`checked`]) and queues the operation `op` makes of it.
    fn queue(
        (handle, peer, ptr, count, dtype, stream): (*mut c_void, c_int, CUdeviceptr, usize, c_int, *mut c_void),
        op: impl FnOnce(Arc<Comm>, usize, usize) -> Op,
    ) -> NcclResult {
        let (comm, peer, len) = match checked(handle, peer, ptr, count, dtype, stream) {
            Ok(c) => c,
            Err(e) => return e,
        };
        match enqueue(stream, op(comm, peer, len)) {
            0 => SUCCESS,
            _ => UNHANDLED_CUDA_ERROR,
        }
    }

    #[no_mangle]
    pub extern "C" fn ncclSend(
        src: *const c_void,
        count: usize,
        dtype: c_int,
        peer: c_int,
        handle: *mut c_void,
        stream: *mut c_void,
    ) -> NcclResult {
        let src = src as CUdeviceptr;
        queue((handle, peer, src, count, dtype, stream), |comm, peer, len| Op::Send { comm, peer, src, len })
    }

    #[no_mangle]
    pub extern "C" fn ncclRecv(
        dst: *mut c_void,
        count: usize,
        dtype: c_int,
        peer: c_int,
        handle: *mut c_void,
        stream: *mut c_void,
    ) -> NcclResult {
        let dst = dst as CUdeviceptr;
        queue((handle, peer, dst, count, dtype, stream), |comm, peer, len| Op::Recv { comm, peer, dst, len })
    }

    #[no_mangle]
    pub extern "C" fn ncclGetErrorString(result: NcclResult) -> *const c_char {
        let text: &'static [u8] = match result {
            SUCCESS => b"no error\0",
            UNHANDLED_CUDA_ERROR => b"unhandled cuda error\0",
            SYSTEM_ERROR => b"unhandled system error\0",
            INVALID_ARGUMENT => b"invalid argument\0",
            INVALID_USAGE => b"invalid usage\0",
            REMOTE_ERROR => b"remote process exited or there was a network error\0",
            _ => b"unknown result code\0",
        };
        text.as_ptr().cast()
    }

    /// Communicators alive in this process (for leak checks).
    #[no_mangle]
    pub extern "C" fn tlemu_nccl_live() -> u64 {
        lock(comms()).len() as u64
    }
}
