use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;

use tensorlift_cuda::{dlpack, DeviceArena};
use tensorlift_format::Dtype;
use tensorlift_io::{HostArena, MapContract, MappedFile};

use crate::{Device, LoadStats};

/// An element type with a safetensors dtype, for typed views.
pub trait Element: bytemuck::Pod {
    /// The dtype whose bytes are this type's.
    const DTYPE: Dtype;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => { $(impl Element for $t { const DTYPE: Dtype = Dtype::$d; })* };
}
element!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, u64 => U64, i64 => I64,
    f32 => F32, f64 => F64, half::f16 => F16, half::bf16 => BF16);

/// Fills `dst` by `copy`, a copy by the kernel from host memory (the owner's `copy_out`,
/// through [`tensorlift_io::copy_by_kernel`]); as a last resort, where a sandbox refuses the
/// process both ways the kernel copies (`process_vm_readv` and `/proc/self/mem`), from the
/// same bytes as `view` gives them, read through a reference as any view reads them.
pub(crate) fn copy_host<'a>(
    copy: impl FnOnce(&mut [u8]) -> Result<(), (usize, std::io::Error)>,
    dst: &mut [u8],
    view: impl FnOnce() -> Option<&'a [u8]>,
) -> Result<(), std::io::Error> {
    match copy(dst) {
        Ok(()) => Ok(()),
        Err((0, e)) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOSYS)) => {
            match view().filter(|v| v.len() == dst.len()) {
                Some(v) => {
                    dst.copy_from_slice(v);
                    Ok(())
                }
                None => Err(e),
            }
        }
        Err((_, e)) => Err(e),
    }
}

/// Why a typed view was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ViewError {
    /// The tensor's dtype is not the requested type's.
    #[error("tensor '{tensor}' is {actual}, not {requested}")]
    Dtype { tensor: String, actual: Dtype, requested: Dtype },
    /// The bytes are not aligned for the type (the file placed them so); use `to_vec`.
    #[error("tensor '{tensor}' is not aligned for a {align}-byte type; use to_vec() to copy it")]
    Misaligned { tensor: String, align: usize },
    /// The tensor lives in device memory: no host view of it exists; copy it with `to_host`.
    #[error("tensor '{tensor}' is on {device}, not in host memory; use to_host() or to_vec() to copy it back")]
    OnDevice { tensor: String, device: Device },
    /// DLPack has no element type for this dtype.
    #[error("tensor '{tensor}': DLPack has no type for {dtype}")]
    NoDlpackType { tensor: String, dtype: Dtype },
    /// DLPack names this dtype from version 1.1 on: a consumer of DLPack before 1.0 (an
    /// unversioned capsule) is not given it.
    #[error(
        "tensor '{tensor}' is {dtype}, which DLPack names from version 1.1 on: export it versioned (Python: \
         max_version=(1, 1)), or as raw bytes"
    )]
    DlpackTooOld { tensor: String, dtype: Dtype },
    /// A dimension past DLPack's (a signed 64-bit number): a tensor with no elements whose
    /// file names such a size.
    #[error("tensor '{tensor}': DLPack cannot describe its shape {shape:?} (a dimension past 2^63 - 1)")]
    NoDlpackShape { tensor: String, shape: Vec<usize> },
    /// Copying a device tensor back to the host failed.
    #[error("tensor '{tensor}': copy from {device} failed: {source}")]
    CopyBack {
        tensor: String,
        device: Device,
        #[source]
        source: tensorlift_cuda::CudaError,
    },
    /// Host memory for a copy of the tensor could not be had.
    #[error("tensor '{tensor}': cannot allocate {bytes} bytes of host memory for a copy")]
    OutOfMemory { tensor: String, bytes: usize },
    /// The tensor's host memory could not be read (a mapped file that was cut short).
    #[error("tensor '{tensor}': its bytes could not be read: {message}")]
    Unreadable { tensor: String, message: String },
    /// A buffer to copy the tensor into is not the tensor's length.
    #[error("tensor '{tensor}' is {len} bytes, the buffer {buffer}")]
    Length { tensor: String, len: usize, buffer: usize },
}

#[derive(Debug, Clone)]
enum Storage {
    Host {
        arena: Arc<HostArena>,
        range: Range<usize>,
        /// Another tensor of the load views (some of) the same bytes.
        shared: bool,
    },
    Mapped {
        map: Arc<MappedFile>,
        range: Range<usize>,
        contract: MapContract,
        /// Another tensor of the load views (some of) the same bytes.
        shared: bool,
    },
    Device {
        arena: Arc<DeviceArena>,
        offset: u64,
        len: usize,
        /// For caller-owned device memory: the tensor's claim on its range.
        claim: Option<Arc<crate::place::DeviceClaim>>,
    },
    /// The caller's host memory ([`crate::place::HostBuffer`]).
    Caller { claim: Arc<tensorlift_io::Claim> },
    /// Host memory of its own (a tensor converted to another dtype as it landed).
    Owned { buf: Arc<tensorlift_io::AlignedBuf>, len: usize },
}

/// A loaded tensor: name, dtype, shape, and its bytes in host memory or on a CUDA device.
///
/// Cloning is cheap: clones share the memory (a host arena, a mapping, or the load's device
/// allocation), which is freed when the last tensor that refers to it drops.
#[derive(Debug, Clone)]
pub struct Tensor {
    name: Arc<str>,
    dtype: Dtype,
    shape: Arc<[usize]>,
    storage: Storage,
}

impl Tensor {
    pub(crate) fn host(
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        arena: Arc<HostArena>,
        range: Range<usize>,
    ) -> Tensor {
        Tensor { name: name.into(), dtype, shape: shape.into(), storage: Storage::Host { arena, range, shared: false } }
    }

    pub(crate) fn mapped(
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        map: Arc<MappedFile>,
        range: Range<usize>,
        contract: MapContract,
    ) -> Tensor {
        let storage = Storage::Mapped { map, range, contract, shared: false };
        Tensor { name: name.into(), dtype, shape: shape.into(), storage }
    }

    pub(crate) fn device(
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        arena: Arc<DeviceArena>,
        offset: u64,
        len: usize,
    ) -> Tensor {
        Tensor {
            name: name.into(),
            dtype,
            shape: shape.into(),
            storage: Storage::Device { arena, offset, len, claim: None },
        }
    }

    /// A tensor in caller-owned memory: host (its claim, written), or device (at `offset`
    /// of the caller's arena, holding its claim).
    pub(crate) fn in_caller_host(
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        claim: Arc<tensorlift_io::Claim>,
    ) -> Tensor {
        Tensor { name: name.into(), dtype, shape: shape.into(), storage: Storage::Caller { claim } }
    }

    pub(crate) fn with_device_claim(mut self, c: Option<Arc<crate::place::DeviceClaim>>) -> Tensor {
        if let Storage::Device { claim, .. } = &mut self.storage {
            *claim = c;
        }
        self
    }

    /// Tensor `pt` as loaded, `dtype` and all (see [`produce`]), from its `stored` bytes
    /// (its file range), into host memory of its own.
    pub(crate) fn produced(
        plan: &tensorlift_format::LoadPlan,
        pt: &tensorlift_format::PlannedTensor,
        dtype: Dtype,
        stored: &[u8],
    ) -> Result<Tensor, crate::LoadError> {
        let len = crate::place::loaded_as(pt, Some(dtype)).1 as usize;
        let mut buf = tensorlift_io::AlignedBuf::zeroed_pages(len, 64, false).ok_or_else(|| {
            crate::LoadError::OutOfMemory { file: plan.shards()[pt.shard].path.clone(), bytes: len as u64 }
        })?;
        produce(pt, dtype, stored, &mut buf.as_mut_slice()[..len]).map_err(|e| crate::LoadError::Convert {
            file: plan.shards()[pt.shard].path.clone(),
            tensor: pt.name.clone(),
            to: dtype,
            source: e.into(),
        })?;
        Ok(Tensor {
            name: pt.name.as_str().into(),
            dtype,
            shape: pt.shape.as_slice().into(),
            storage: Storage::Owned { buf: Arc::new(buf), len },
        })
    }

    /// The device allocation holding the tensor, and the tensor's offset in it.
    pub(crate) fn device_memory(&self) -> Option<(&Arc<DeviceArena>, usize)> {
        match &self.storage {
            Storage::Device { arena, offset, .. } => Some((arena, *offset as usize)),
            _ => None,
        }
    }

    /// Where the tensor's bytes are: [`Device::Cpu`] or [`Device::Cuda`].
    pub fn location(&self) -> Device {
        match &self.storage {
            Storage::Device { arena, .. } => Device::Cuda(arena.gpu().ordinal()),
            _ => Device::Cpu,
        }
    }

    /// The device address of the tensor's first byte, for a tensor on a CUDA device (at a
    /// multiple of 256 in tensorlift's own memory; where the caller said in memory it lent).
    /// It stays valid while this tensor or a clone of it is alive.
    pub fn device_ptr(&self) -> Option<u64> {
        match &self.storage {
            Storage::Device { arena, offset, .. } => Some(arena.device_ptr() + offset),
            _ => None,
        }
    }

    /// The tensor as a DLPack 1.x managed tensor (`DLManagedTensorVersioned`), without a
    /// copy: host memory (read-only) or CUDA device memory. The tensor's memory stays alive
    /// until the consumer calls the deleter; hand the pointer to exactly one consumer (for
    /// Python, in a capsule named `dltensor_versioned`).
    pub fn to_dlpack(&self) -> Result<*mut dlpack::DLManagedTensorVersioned, ViewError> {
        Ok(dlpack::export_versioned(self.dlpack_export()?))
    }

    /// [`to_dlpack`](Self::to_dlpack) for consumers older than DLPack 1.0: a
    /// `DLManagedTensor` (capsule name `dltensor`), which has no read-only flag: consumers
    /// must not write through host tensors.
    pub fn to_dlpack_legacy(&self) -> Result<*mut dlpack::DLManagedTensor, ViewError> {
        let e = self.dlpack_export()?;
        // The float8, float6 and float4 codes are DLPack 1.1's, which a consumer of DLPack
        // before 1.0 does not know: refused here, saying how to have them.
        if e.dtype.code > dlpack::code::BOOL {
            return Err(ViewError::DlpackTooOld { tensor: self.name().to_owned(), dtype: self.dtype });
        }
        Ok(dlpack::export_legacy(e))
    }

    /// The tensor's bytes as a DLPack tensor of `uint8`, one dimension of [`len`](Self::len)
    /// bytes: for consumers that reinterpret them (numpy with `ml_dtypes` for bfloat16 and
    /// float8, which DLPack consumers may not know).
    pub fn to_dlpack_bytes(&self) -> Result<*mut dlpack::DLManagedTensorVersioned, ViewError> {
        Ok(dlpack::export_versioned(self.bytes_export()?))
    }

    /// [`to_dlpack_bytes`](Self::to_dlpack_bytes) for consumers older than DLPack 1.0.
    pub fn to_dlpack_bytes_legacy(&self) -> Result<*mut dlpack::DLManagedTensor, ViewError> {
        Ok(dlpack::export_legacy(self.bytes_export()?))
    }

    fn bytes_export(&self) -> Result<dlpack::Export, ViewError> {
        let dtype = dlpack::DLDataType { code: dlpack::code::UINT, bits: 8, lanes: 1 };
        // (A tensor's bytes are memory this process holds: fewer than 2^63.)
        self.dlpack_export_as(dtype, vec![self.len() as i64])
    }

    fn dlpack_export(&self) -> Result<dlpack::Export, ViewError> {
        let dtype = dlpack_dtype(self.dtype)
            .ok_or_else(|| ViewError::NoDlpackType { tensor: self.name.to_string(), dtype: self.dtype })?;
        // A file may name any size for a dimension of a tensor with no elements (another is
        // 0); DLPack's sizes are signed.
        let shape: Option<Vec<i64>> = self.shape.iter().map(|&d| i64::try_from(d).ok()).collect();
        let shape = shape
            .ok_or_else(|| ViewError::NoDlpackShape { tensor: self.name.to_string(), shape: self.shape.to_vec() })?;
        self.dlpack_export_as(dtype, shape)
    }

    fn dlpack_export_as(&self, dtype: dlpack::DLDataType, shape: Vec<i64>) -> Result<dlpack::Export, ViewError> {
        let (data, device) = match &self.storage {
            Storage::Device { arena, offset, .. } => (
                arena.device_ptr() + offset,
                dlpack::DLDevice { device_type: dlpack::DEVICE_CUDA, device_id: arena.gpu().ordinal() as i32 },
            ),
            // The address alone: the consumer may be lent the memory writable (the Python
            // binding's numpy and torch views), and nothing here reads it.
            _ => (self.host_addr()? as u64, dlpack::DLDevice { device_type: dlpack::DEVICE_CPU, device_id: 0 }),
        };
        Ok(dlpack::Export {
            data,
            device,
            dtype,
            shape,
            owner: Box::new(self.clone()),
            // Host tensors are shared `&[u8]` views; device memory is the consumer's to use.
            read_only: !matches!(self.storage, Storage::Device { .. }),
        })
    }

    /// Marks a view of a load's memory as sharing its bytes with another tensor's view (see
    /// [`shares_bytes`](Self::shares_bytes)).
    pub(crate) fn sharing(mut self, yes: bool) -> Tensor {
        if let Storage::Host { shared, .. } | Storage::Mapped { shared, .. } = &mut self.storage {
            *shared = yes;
        }
        self
    }

    /// Whether another tensor of the same load may view some of the same host memory (of a
    /// load's arena or a mapped file): a PyTorch file's tied weights and views of one
    /// storage, which share their bytes as `torch.load`'s do, so that a write through one
    /// (by a consumer that writes) shows in the other. Never for a safetensors file's
    /// tensors. It errs on the side of sharing (a twin that was converted, gathered or read
    /// again into memory of its own still counts), and says nothing of device memory, where
    /// twins share too.
    pub fn shares_bytes(&self) -> bool {
        matches!(self.storage, Storage::Host { shared: true, .. } | Storage::Mapped { shared: true, .. })
    }

    /// The tensor's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    /// Dimensions (empty for a scalar).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Number of elements.
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }
    /// Whether this tensor is a zero-copy view of a memory-mapped file (only with
    /// [`LoaderBuilder::map_views`](crate::LoaderBuilder::map_views)).
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }

    /// The raw little-endian bytes, exactly as in the file, without a copy. A tensor on a
    /// device has no host bytes: [`ViewError::OnDevice`] (see [`to_host`](Self::to_host)).
    pub fn bytes(&self) -> Result<&[u8], ViewError> {
        match &self.storage {
            // A tensor is only made once every chunk covering it has landed, so `get` succeeds.
            Storage::Host { arena, range, .. } => Ok(arena.get(range.clone()).unwrap_or_default()),
            // The plan checked the range against the file's length, which the load checked again.
            Storage::Mapped { map, range, contract, .. } => {
                Ok(map.view_range(*contract, range.clone()).unwrap_or_default())
            }
            Storage::Device { .. } => {
                Err(ViewError::OnDevice { tensor: self.name.to_string(), device: self.location() })
            }
            Storage::Owned { buf, len } => Ok(&buf.as_slice()[..*len]),
            // A caller tensor is only made once its whole claim is written.
            Storage::Caller { claim } => Ok(claim.get().unwrap_or_default()),
        }
    }

    /// The address of a host tensor's bytes, without making a slice over them: what a
    /// foreign caller is handed (the C API's `host_data`, DLPack's `data`), whose memory a
    /// consumer may be writing (torch ignores DLPack's read-only flag), where a `&[u8]`
    /// ([`bytes`](Self::bytes)) would assert that nothing is. Dangling (never read) for an
    /// empty tensor; [`ViewError::OnDevice`] for a device tensor.
    pub fn host_addr(&self) -> Result<*const u8, ViewError> {
        let addr = match &self.storage {
            Storage::Host { arena, range, .. } => arena.addr(range.clone()),
            Storage::Mapped { map, range, .. } => map.addr(range.start),
            Storage::Owned { buf, .. } => Some(buf.addr()),
            Storage::Caller { claim } => claim.addr(),
            Storage::Device { .. } => {
                return Err(ViewError::OnDevice { tensor: self.name.to_string(), device: self.location() })
            }
        };
        match addr {
            Some(addr) => Ok(addr),
            // An empty tensor needs none: never read (DLPack's export and the C API's
            // `host_data` give null for it).
            None if self.is_empty() => Ok(std::ptr::NonNull::dangling().as_ptr()),
            // A tensor is only made once its bytes have all landed: never here.
            None => Err(ViewError::Unreadable {
                tensor: self.name.to_string(),
                message: "its bytes have not all landed".into(),
            }),
        }
    }

    /// A copy of the bytes: copied back for a device tensor; for a host tensor, copied by
    /// the kernel ([`tensorlift_io::copy_by_kernel`]), not read through a reference, so that
    /// a mapped file cut short is an error ([`ViewError::Unreadable`]), not a SIGBUS, and
    /// memory lent to a consumer that writes it (a DLPack export whose consumer ignores the
    /// read-only flag) is copied as it is, with no data race. (Only where a sandbox refuses
    /// the process both ways the kernel copies is it read as [`bytes`](Self::bytes) reads
    /// it.)
    pub fn copy_bytes(&self) -> Result<Vec<u8>, ViewError> {
        let len = self.len();
        let mut out = Vec::new();
        out.try_reserve_exact(len).map_err(|_| ViewError::OutOfMemory { tensor: self.name.to_string(), bytes: len })?;
        out.resize(len, 0);
        self.copy_bytes_into(&mut out)?;
        Ok(out)
    }

    /// [`copy_bytes`](Self::copy_bytes) into `dst`, which must be exactly the tensor's
    /// length ([`ViewError::Length`] otherwise): a host tensor's bytes copied by the kernel,
    /// a device tensor's copied back.
    pub fn copy_bytes_into(&self, dst: &mut [u8]) -> Result<(), ViewError> {
        if dst.len() != self.len() {
            return Err(ViewError::Length { tensor: self.name.to_string(), len: self.len(), buffer: dst.len() });
        }
        if let Storage::Device { arena, offset, .. } = &self.storage {
            return arena.copy_to_host(*offset as usize, dst).map_err(|source| ViewError::CopyBack {
                tensor: self.name.to_string(),
                device: self.location(),
                source,
            });
        }
        if dst.is_empty() {
            return Ok(());
        }
        let copied = match &self.storage {
            Storage::Host { arena, range, .. } => {
                copy_host(|d| arena.copy_out(range.clone(), d), dst, || self.bytes().ok())
            }
            Storage::Mapped { map, range, .. } => {
                copy_host(|d| map.copy_out(range.start, d), dst, || self.bytes().ok())
            }
            Storage::Owned { buf, .. } => copy_host(|d| buf.copy_out(d), dst, || self.bytes().ok()),
            Storage::Caller { claim } => copy_host(|d| claim.copy_out(d), dst, || self.bytes().ok()),
            // (Copied back above.)
            Storage::Device { .. } => {
                return Err(ViewError::OnDevice { tensor: self.name.to_string(), device: self.location() })
            }
        };
        copied.map_err(|e| ViewError::Unreadable { tensor: self.name.to_string(), message: e.to_string() })
    }

    /// The bytes in host memory: borrowed for a host tensor, copied back for a device
    /// tensor (synchronously; for checks and digests, not for serving).
    pub fn to_host(&self) -> Result<Cow<'_, [u8]>, ViewError> {
        match &self.storage {
            Storage::Device { .. } => self.copy_bytes().map(Cow::Owned),
            _ => self.bytes().map(Cow::Borrowed),
        }
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        match &self.storage {
            Storage::Host { range, .. } | Storage::Mapped { range, .. } => range.len(),
            Storage::Device { len, .. } | Storage::Owned { len, .. } => *len,
            Storage::Caller { claim } => claim.len(),
        }
    }

    /// Whether the tensor holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check<T: Element>(&self) -> Result<(), ViewError> {
        if self.dtype != T::DTYPE {
            return Err(ViewError::Dtype { tensor: self.name.to_string(), actual: self.dtype, requested: T::DTYPE });
        }
        Ok(())
    }

    /// A typed view of the bytes, without a copy. Refuses a dtype that is not `T`'s, and
    /// bytes that are not aligned for `T`.
    pub fn as_slice<T: Element>(&self) -> Result<&[T], ViewError> {
        self.check::<T>()?;
        bytemuck::try_cast_slice(self.bytes()?)
            .map_err(|_| ViewError::Misaligned { tensor: self.name.to_string(), align: std::mem::align_of::<T>() })
    }

    /// The elements, copied (back from the device for a device tensor): works whatever the
    /// alignment.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>, ViewError> {
        self.check::<T>()?;
        let bytes = self.to_host()?;
        let n = bytes.len() / std::mem::size_of::<T>();
        // Sized by the file (a mapped view's memory was never checked): fallibly.
        let mut out = Vec::new();
        out.try_reserve_exact(n)
            .map_err(|_| ViewError::OutOfMemory { tensor: self.name.to_string(), bytes: bytes.len() })?;
        out.extend(bytes.chunks_exact(std::mem::size_of::<T>()).map(bytemuck::pod_read_unaligned::<T>));
        Ok(out)
    }
}

/// Writes tensor `pt` as loaded into `out`, from its `stored` bytes (its file range): the
/// runs of a slice gathered, and the elements converted to `dtype` (run by run: no copy in
/// between). `out` holds the loaded bytes ([`crate::place::loaded_as`]).
pub(crate) fn produce(
    pt: &tensorlift_format::PlannedTensor,
    dtype: Dtype,
    stored: &[u8],
    out: &mut [u8],
) -> Result<(), crate::convert::ConvertError> {
    let convert = |src: &[u8], dst: &mut [u8]| match dtype == pt.dtype {
        true => {
            dst.copy_from_slice(src);
            Ok(())
        }
        false => crate::convert::convert(pt.dtype, dtype, src, dst),
    };
    let Some(g) = &pt.gather else { return convert(stored, out) };
    let run = g.run as usize;
    let run_out = crate::place::loaded_as(pt, Some(dtype)).1 as usize / g.runs().max(1);
    for (i, dst) in out.chunks_exact_mut(run_out.max(1)).enumerate().take(g.runs()) {
        let at = g.offset(i) as usize;
        convert(&stored[at..at + run], dst)?;
    }
    Ok(())
}

/// DLPack's element type for a safetensors dtype.
fn dlpack_dtype(d: Dtype) -> Option<dlpack::DLDataType> {
    use dlpack::code;
    let (c, bits) = match d {
        Dtype::BOOL => (code::BOOL, 8),
        Dtype::U8 => (code::UINT, 8),
        Dtype::I8 => (code::INT, 8),
        Dtype::U16 => (code::UINT, 16),
        Dtype::I16 => (code::INT, 16),
        Dtype::U32 => (code::UINT, 32),
        Dtype::I32 => (code::INT, 32),
        Dtype::U64 => (code::UINT, 64),
        Dtype::I64 => (code::INT, 64),
        Dtype::F16 => (code::FLOAT, 16),
        Dtype::BF16 => (code::BFLOAT, 16),
        Dtype::F32 => (code::FLOAT, 32),
        Dtype::F64 => (code::FLOAT, 64),
        Dtype::C64 => (code::COMPLEX, 64),
        Dtype::F8_E4M3 => (code::FLOAT8_E4M3FN, 8),
        Dtype::F8_E5M2 => (code::FLOAT8_E5M2, 8),
        Dtype::F8_E4M3FNUZ => (code::FLOAT8_E4M3FNUZ, 8),
        Dtype::F8_E5M2FNUZ => (code::FLOAT8_E5M2FNUZ, 8),
        Dtype::F8_E8M0 => (code::FLOAT8_E8M0FNU, 8),
        Dtype::F6_E2M3 => (code::FLOAT6_E2M3FN, 6),
        Dtype::F6_E3M2 => (code::FLOAT6_E3M2FN, 6),
        Dtype::F4 => (code::FLOAT4_E2M1FN, 4),
        _ => return None,
    };
    Some(dlpack::DLDataType { code: c, bits, lanes: 1 })
}

/// Every tensor of a load, by name, with the load's statistics and the checkpoint's metadata.
#[derive(Debug, Clone)]
pub struct Model {
    tensors: Vec<Tensor>,
    by_name: HashMap<Arc<str>, usize>,
    /// Indices into `tensors` in the order of their data in the checkpoint (shard, then
    /// offset).
    file_order: Vec<usize>,
    stats: LoadStats,
    metadata: BTreeMap<String, String>,
    shard_metadata: Vec<(String, BTreeMap<String, String>)>,
    index_metadata: Option<serde_json::Value>,
}

impl Model {
    pub(crate) fn new(mut tensors: Vec<Tensor>, stats: LoadStats, plan: &tensorlift_format::LoadPlan) -> Model {
        // Names are unique in a load: an unstable sort gives the same order, without a buffer.
        tensors.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        let by_name = tensors.iter().enumerate().map(|(i, t)| (Arc::clone(&t.name), i)).collect();
        // Each tensor's place in the files, by name (a tensor not planned would come last).
        let place: HashMap<&str, (usize, u64)> =
            plan.tensors().iter().map(|t| (t.name.as_str(), (t.shard, t.file_range.start))).collect();
        let mut file_order: Vec<usize> = (0..tensors.len()).collect();
        file_order.sort_by_key(|&i| place.get(&*tensors[i].name).copied().unwrap_or((usize::MAX, u64::MAX)));
        let shard_metadata: Vec<(String, BTreeMap<String, String>)> =
            plan.shards().iter().map(|s| (s.name.clone(), s.metadata.clone().unwrap_or_default())).collect();
        Model {
            tensors,
            by_name,
            file_order,
            stats,
            metadata: plan.metadata(),
            shard_metadata,
            index_metadata: plan.index_metadata().cloned(),
        }
    }

    /// Every shard's `__metadata__`, merged: where shards disagree on a key, the first shard
    /// (in load order) that has it wins; [`shard_metadata`](Self::shard_metadata) has each.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Each shard's name and `__metadata__` (empty where it has none), in load order.
    pub fn shard_metadata(&self) -> &[(String, BTreeMap<String, String>)] {
        &self.shard_metadata
    }

    /// The index's `metadata` object (often `{"total_size": ...}`), for a sharded checkpoint.
    pub fn index_metadata(&self) -> Option<&serde_json::Value> {
        self.index_metadata.as_ref()
    }
    /// A tensor by name.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }
    /// All tensors, sorted by name.
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }
    /// All tensors in the order of their data in the checkpoint (by shard, then by offset
    /// in it): the order of the reference's `load_file` and `get_tensors()`.
    pub fn tensors_in_file_order(&self) -> impl Iterator<Item = &Tensor> + '_ {
        self.file_order.iter().map(|&i| &self.tensors[i])
    }
    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    /// Whether no tensor was loaded.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
    /// How the load went.
    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }
    /// The tensors, by value.
    pub fn into_tensors(self) -> Vec<Tensor> {
        self.tensors
    }
}
