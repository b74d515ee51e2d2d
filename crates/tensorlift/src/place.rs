//! Caller-owned destinations: a load places each tensor where the caller says.
//!
//! A server with its own allocator (candle's storage, a framework's caching allocator, one
//! fused QKV buffer) lends memory as a [`HostBuffer`] or a [`DeviceBuffer`], and a rule
//! ([`LoaderBuilder::place_with`](crate::LoaderBuilder::place_with)) says, for each tensor
//! (name, dtype, shape and bytes as loaded: after slices and conversion), where in it the
//! tensor goes. Bytes land there with no extra copy: host reads go straight into the
//! caller's memory, device copies go from the pinned staging chunks straight to the
//! caller's pointer (2D copies for inner-dimension slices, the conversion kernel writing
//! there for converted tensors).
//!
//! Misuse is an error before a byte is read: a destination too small for its tensor, on
//! another device (or host memory for a device load), misaligned for its elements (device
//! memory, where kernels write it), or overlapping another tensor's: in the same buffer
//! while that tensor is alive, or, within one load, at the same device address through two
//! buffers lending the same memory.
//!
//! ```
//! use tensorlift::place::{Destination, HostBuffer};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("m.safetensors");
//! # tensorlift_testkit::write_shard(&path, &[("q", tensorlift::Dtype::F32, &[4]), ("k", tensorlift::Dtype::F32, &[4])]);
//! // One buffer for q and k, back to back.
//! let qk = HostBuffer::new(vec![0u8; 32]);
//! let at = qk.clone();
//! let loader = tensorlift::Loader::builder()
//!     .device(tensorlift::Device::Cpu)
//!     .place_with(move |t: &tensorlift::place::TensorRequest<'_>| {
//!         Ok(match t.name {
//!             "q" => Some(Destination::host(&at, 0)),
//!             "k" => Some(Destination::host(&at, 16)),
//!             _ => None,
//!         })
//!     })
//!     .build()?;
//! let model = loader.load_blocking(&path)?;
//! assert_eq!(model.get("k").unwrap().bytes()?.len(), 16);
//! drop((model, loader));
//! let bytes: Vec<u8> = *qk.into_inner().ok().unwrap().downcast::<Vec<u8>>().unwrap();
//! assert_eq!(bytes.len(), 32);
//! # Ok(()) }
//! ```

use std::any::Any;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

pub use tensorlift_cuda::LentMemory;
use tensorlift_format::Dtype;
pub use tensorlift_io::CallerMemory;
use tensorlift_io::CallerRegion;

use crate::Device;

/// Host memory the caller lends for tensors. Cheap to clone: clones are the same memory.
#[derive(Clone, Debug)]
pub struct HostBuffer(pub(crate) Arc<CallerRegion>);

impl HostBuffer {
    /// Lends `mem` (a `Vec<u8>`, a `Box<[u8]>`, any owned `AsMut<[u8]>`).
    pub fn new(mem: impl CallerMemory) -> HostBuffer {
        HostBuffer(CallerRegion::new(mem))
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The memory back, once no clone of this buffer and no tensor placed in it is alive
    /// (downcast it to the type lent); else the buffer again.
    pub fn into_inner(self) -> Result<Box<dyn Any + Send + Sync>, HostBuffer> {
        self.0.into_inner().map_err(HostBuffer)
    }
}

/// Device memory the caller lends for tensors. Cheap to clone: clones are the same memory.
#[derive(Clone)]
pub struct DeviceBuffer(Arc<DeviceInner>);

struct DeviceInner {
    device: Device,
    ptr: u64,
    len: usize,
    /// Taken by the first load, which makes the arena that keeps it.
    memory: Mutex<Option<LentMemory>>,
    arena: OnceLock<Arc<tensorlift_cuda::DeviceArena>>,
    claimed: Mutex<Vec<Range<u64>>>,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("device", &self.0.device)
            .field("ptr", &format_args!("{:#x}", self.0.ptr))
            .field("len", &self.0.len)
            .finish()
    }
}

impl DeviceBuffer {
    /// Lends `memory` (made with `unsafe` [`LentMemory::new`], whose contract is the
    /// caller's promise) on `device` (`Device::Cuda(n)`). The first load that uses it asks
    /// the driver what the address is, and refuses memory that is not one allocation of that
    /// device covering the range (the memory's owner is dropped then). The owner is kept
    /// until this buffer, its clones and every tensor placed in it are dropped.
    pub fn new(device: Device, memory: LentMemory) -> DeviceBuffer {
        DeviceBuffer(Arc::new(DeviceInner {
            device,
            ptr: memory.device_ptr(),
            len: memory.len(),
            memory: Mutex::new(Some(memory)),
            arena: OnceLock::new(),
            claimed: Mutex::new(Vec::new()),
        }))
    }

    /// The device.
    pub fn device(&self) -> Device {
        self.0.device
    }

    /// The device address of byte 0.
    pub fn device_ptr(&self) -> u64 {
        self.0.ptr
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.0.len
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }

    /// The memory's owner back (downcast it to the type lent: the `CudaSlice` of
    /// [`LentMemory::from_cuda_slice`], say), once no clone of this buffer and no tensor
    /// placed in it is alive, so that no copy into it runs; else the buffer again. Also the
    /// buffer again if the driver refused the memory when a load first used it (its owner
    /// was dropped then), or if the device's work could not be waited for (dropped, the
    /// buffer then leaks the memory rather than let it be freed under that work).
    pub fn into_inner(mut self) -> Result<Box<dyn Any + Send + Sync>, DeviceBuffer> {
        let Some(inner) = Arc::get_mut(&mut self.0) else { return Err(self) };
        let owner = match inner.arena.take() {
            // A load made the arena; the load's engine holds it until its copies complete.
            Some(arena) => match Arc::try_unwrap(arena).map(tensorlift_cuda::DeviceArena::into_owner) {
                Ok(Ok(owner)) => Some(owner),
                // Still in use: the buffer keeps it.
                Err(shared) => {
                    let _ = inner.arena.set(shared);
                    None
                }
                // Not lent (a buffer's arena always is), or the device's work could not be
                // waited for (the arena, dropped, leaks the memory).
                Ok(Err(arena)) => {
                    let _ = inner.arena.set(Arc::new(arena));
                    None
                }
            },
            None => inner.memory.get_mut().unwrap_or_else(|p| p.into_inner()).take().map(LentMemory::into_owner),
        };
        owner.ok_or(self)
    }

    /// The arena over this memory on `gpu`, made (and checked with the driver) once.
    pub(crate) fn arena(&self, gpu: &tensorlift_cuda::Gpu) -> Result<Arc<tensorlift_cuda::DeviceArena>, String> {
        if let Some(a) = self.0.arena.get() {
            return Ok(Arc::clone(a));
        }
        // Held while the driver is asked: a second load waits for the first one's answer.
        let mut memory = self.0.memory.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = self.0.arena.get() {
            return Ok(Arc::clone(a));
        }
        let Some(lent) = memory.take() else {
            return Err("the driver refused this memory when a load first used it".to_owned());
        };
        let arena = tensorlift_cuda::DeviceArena::lent(gpu, lent).map_err(|e| e.to_string())?;
        Ok(Arc::clone(self.0.arena.get_or_init(|| Arc::new(arena))))
    }

    /// Claims `range` for one tensor, if it fits and overlaps no other tensor's.
    pub(crate) fn claim(&self, range: Range<u64>) -> Result<DeviceClaim, String> {
        if range.end > self.0.len as u64 {
            return Err(format!(
                "bytes {}..{} do not fit in {} bytes of device memory",
                range.start, range.end, self.0.len
            ));
        }
        let mut claimed = self.0.claimed.lock().unwrap_or_else(|p| p.into_inner());
        let overlaps =
            |o: &&Range<u64>| !range.is_empty() && !o.is_empty() && o.start < range.end && range.start < o.end;
        if let Some(o) = claimed.iter().find(overlaps) {
            return Err(format!(
                "bytes {}..{} overlap bytes {}..{}, claimed by another tensor",
                range.start, range.end, o.start, o.end
            ));
        }
        claimed.push(range.clone());
        Ok(DeviceClaim { buffer: self.clone(), range })
    }
}

/// One tensor's range of a [`DeviceBuffer`], released when the tensor drops.
#[derive(Debug)]
pub(crate) struct DeviceClaim {
    buffer: DeviceBuffer,
    range: Range<u64>,
}

impl Drop for DeviceClaim {
    fn drop(&mut self) {
        let mut claimed = self.buffer.0.claimed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = claimed.iter().position(|r| *r == self.range) {
            claimed.swap_remove(i);
        }
    }
}

/// Where one tensor goes.
#[derive(Clone, Debug)]
pub struct Destination(pub(crate) Dest);

#[derive(Clone, Debug)]
pub(crate) enum Dest {
    Host(HostBuffer, usize),
    Device(DeviceBuffer, usize),
}

impl Destination {
    /// At `offset` in `buffer`, on a host load.
    pub fn host(buffer: &HostBuffer, offset: usize) -> Destination {
        Destination(Dest::Host(buffer.clone(), offset))
    }

    /// At `offset` in `buffer`, on a load to the buffer's device.
    pub fn device(buffer: &DeviceBuffer, offset: usize) -> Destination {
        Destination(Dest::Device(buffer.clone(), offset))
    }
}

/// A tensor to place, as it will be loaded: after its slice and its conversion.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct TensorRequest<'a> {
    /// The tensor's name.
    pub name: &'a str,
    /// Its dtype as loaded.
    pub dtype: Dtype,
    /// Its shape as loaded.
    pub shape: &'a [usize],
    /// Bytes it needs.
    pub bytes: u64,
}

/// Chooses where each tensor of a load goes.
pub trait PlaceRule: Send + Sync {
    /// The destination of `tensor`: `Ok(None)` for tensorlift's own memory, `Err` (a
    /// sentence) to refuse the load.
    fn place(&self, tensor: &TensorRequest<'_>) -> Result<Option<Destination>, String>;
}

impl<F> PlaceRule for F
where
    F: Fn(&TensorRequest<'_>) -> Result<Option<Destination>, String> + Send + Sync,
{
    fn place(&self, tensor: &TensorRequest<'_>) -> Result<Option<Destination>, String> {
        self(tensor)
    }
}

/// A destination checked against its tensor and the load's device.
#[derive(Debug)]
pub(crate) enum Resolved {
    /// Caller host memory: the tensor's claim.
    Host(Arc<tensorlift_io::Claim>),
    /// Caller device memory: the arena over it, the tensor's offset, its claim.
    Device { arena: Arc<tensorlift_cuda::DeviceArena>, offset: u64, claim: Arc<DeviceClaim> },
}

/// The dtype and bytes tensor `t` is loaded as, with `convert_to`.
pub(crate) fn loaded_as(t: &tensorlift_format::PlannedTensor, convert_to: Option<Dtype>) -> (Dtype, u64) {
    match convert_to {
        Some(to) if t.dtype != to && crate::convert::can_convert(t.dtype, to) => {
            // (Saturating: a size past a u64 is refused where it is placed.)
            (to, (t.len() / (t.dtype.bitsize() / 8) as u64).saturating_mul((to.bitsize() / 8) as u64))
        }
        _ => (t.dtype, t.len()),
    }
}

/// Asks `rule` where each tensor of `plan` goes, and checks each answer: the memory's kind
/// and device against the load's, the range against the buffer, claims against each other
/// (device ranges by address too, across buffers lent twice). `None` for tensorlift's own.
pub(crate) fn resolve(
    rule: &dyn PlaceRule,
    plan: &tensorlift_format::LoadPlan,
    convert_to: Option<Dtype>,
    gpu: Option<&tensorlift_cuda::Gpu>,
) -> Result<Vec<Option<Resolved>>, crate::LoadError> {
    let file = crate::error::plan_file(plan);
    let fail = |tensor: &str, message: String| crate::LoadError::Destination {
        file: file.clone(),
        tensor: tensor.to_owned(),
        message,
    };
    let load_device = gpu.map_or(Device::Cpu, |g| Device::Cuda(g.ordinal()));
    let mut out = Vec::with_capacity(plan.tensors().len());
    let mut device_ranges: Vec<(u64, u64, usize)> = Vec::new();
    for (i, t) in plan.tensors().iter().enumerate() {
        let (dtype, bytes) = loaded_as(t, convert_to);
        let request = TensorRequest { name: &t.name, dtype, shape: &t.shape, bytes };
        let Some(Destination(dest)) = rule.place(&request).map_err(|m| fail(&t.name, m))? else {
            out.push(None);
            continue;
        };
        let end = |offset: usize| (offset as u64).checked_add(bytes).ok_or_else(|| fail(&t.name, "overflows".into()));
        let resolved = match (dest, gpu) {
            (Dest::Host(buf, offset), None) => {
                let claim = buf.0.claim(offset..end(offset)? as usize).map_err(|e| fail(&t.name, e.to_string()))?;
                Resolved::Host(Arc::new(claim))
            }
            (Dest::Device(buf, offset), Some(gpu)) => {
                if buf.device() != load_device {
                    return Err(fail(&t.name, format!("its buffer is on {}, the load on {load_device}", buf.device())));
                }
                let claim = buf.claim(offset as u64..end(offset)?).map_err(|m| fail(&t.name, m))?;
                // In range of the buffer (claimed): the address does not overflow.
                let at = buf.device_ptr() + offset as u64;
                let width = (dtype.bitsize() / 8).max(1) as u64;
                if at % width != 0 {
                    return Err(fail(&t.name, format!("offset {offset} is not aligned for {dtype} elements")));
                }
                let arena = buf.arena(gpu).map_err(|m| fail(&t.name, m))?;
                if bytes > 0 {
                    device_ranges.push((at, bytes, i));
                }
                Resolved::Device { arena, offset: offset as u64, claim: Arc::new(claim) }
            }
            (Dest::Host(..), Some(_)) => {
                return Err(fail(&t.name, format!("host memory was given for a load to {load_device}")));
            }
            (Dest::Device(buf, _), None) => {
                return Err(fail(
                    &t.name,
                    format!("device memory on {} was given for a load to the host", buf.device()),
                ));
            }
        };
        out.push(Some(resolved));
    }
    // Two buffers may lend the same memory: this load's ranges are checked by address as
    // well, each against the farthest-reaching one before it.
    device_ranges.sort_unstable();
    let mut reach: Option<(u64, usize)> = None;
    for &(at, len, i) in &device_ranges {
        if let Some((_, j)) = reach.filter(|&(end, _)| end > at) {
            let other = &plan.tensors()[j].name;
            return Err(fail(&plan.tensors()[i].name, format!("its device memory overlaps tensor '{other}''s")));
        }
        if reach.is_none_or(|(end, _)| at + len > end) {
            reach = Some((at + len, i));
        }
    }
    Ok(out)
}
