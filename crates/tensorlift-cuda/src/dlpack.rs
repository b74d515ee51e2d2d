//! DLPack export: the C structs of DLPack 1.x (`dlpack.h`), and managed tensors whose
//! deleter keeps the tensor's memory alive until the consumer is done with it.
//!
//! [`export_versioned`] makes a `DLManagedTensorVersioned` (DLPack >= 1.0, with flags) and
//! [`export_legacy`] a `DLManagedTensor` (for consumers older than DLPack 1.0). Both take an
//! `owner` (whatever keeps the memory alive: a tensor, an arena) that is dropped only when
//! the consumer calls the deleter. They are safe to call: they only build the structure; it
//! is the consumer that reads the memory, under DLPack's contract.

use std::any::Any;
use std::ffi::c_void;

/// `DLDeviceType::kDLCPU`.
pub const DEVICE_CPU: i32 = 1;
/// `DLDeviceType::kDLCUDA`.
pub const DEVICE_CUDA: i32 = 2;

/// `DLPACK_FLAG_BITMASK_READ_ONLY`: the consumer must not write through the tensor.
pub const FLAG_READ_ONLY: u64 = 1;

/// The DLPack version these structs follow (1.1: the float8, float6 and float4 codes).
pub const VERSION: DLPackVersion = DLPackVersion { major: 1, minor: 1 };

/// The DLPack version a managed tensor of `dtype` says it follows: the lowest that describes
/// it, so that a consumer asking for at most 1.0 (torch, numpy) is told 1.0 for every type
/// 1.0 has, and 1.1 only for the float8, float6 and float4 codes 1.1 added (which only a
/// consumer that knows them can read, whatever the version says; the structs are the same).
pub fn version_for(dtype: DLDataType) -> DLPackVersion {
    if dtype.code > code::BOOL {
        VERSION
    } else {
        DLPackVersion { major: 1, minor: 0 }
    }
}

/// `DLDevice`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DLDevice {
    /// `DLDeviceType`.
    pub device_type: i32,
    /// Device ordinal (0 on the host).
    pub device_id: i32,
}

/// `DLDataType`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DLDataType {
    /// `DLDataTypeCode`.
    pub code: u8,
    /// Bits per element.
    pub bits: u8,
    /// Lanes (1: not a vector type).
    pub lanes: u16,
}

/// DLPack's type codes (`DLDataTypeCode`).
#[allow(missing_docs)]
pub mod code {
    pub const INT: u8 = 0;
    pub const UINT: u8 = 1;
    pub const FLOAT: u8 = 2;
    pub const BFLOAT: u8 = 4;
    pub const COMPLEX: u8 = 5;
    pub const BOOL: u8 = 6;
    pub const FLOAT8_E4M3FN: u8 = 10;
    pub const FLOAT8_E4M3FNUZ: u8 = 11;
    pub const FLOAT8_E5M2: u8 = 12;
    pub const FLOAT8_E5M2FNUZ: u8 = 13;
    pub const FLOAT8_E8M0FNU: u8 = 14;
    pub const FLOAT6_E2M3FN: u8 = 15;
    pub const FLOAT6_E3M2FN: u8 = 16;
    pub const FLOAT4_E2M1FN: u8 = 17;
}

/// `DLTensor`.
#[repr(C)]
#[derive(Debug)]
pub struct DLTensor {
    /// The data (a device address for a CUDA tensor); null for a tensor of no elements.
    pub data: *mut c_void,
    /// Where the data is.
    pub device: DLDevice,
    /// Number of dimensions.
    pub ndim: i32,
    /// Element type.
    pub dtype: DLDataType,
    /// `ndim` dimensions.
    pub shape: *mut i64,
    /// `ndim` strides, in elements.
    pub strides: *mut i64,
    /// Offset of the first element from `data`, in bytes.
    pub byte_offset: u64,
}

/// `DLManagedTensor` (DLPack before 1.0).
#[repr(C)]
#[derive(Debug)]
pub struct DLManagedTensor {
    /// The tensor.
    pub dl_tensor: DLTensor,
    /// The producer's context.
    pub manager_ctx: *mut c_void,
    /// Frees `manager_ctx` and the struct itself.
    pub deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// `DLPackVersion`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DLPackVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

/// `DLManagedTensorVersioned` (DLPack 1.x).
#[repr(C)]
#[derive(Debug)]
pub struct DLManagedTensorVersioned {
    /// The ABI version.
    pub version: DLPackVersion,
    /// The producer's context.
    pub manager_ctx: *mut c_void,
    /// Frees `manager_ctx` and the struct itself.
    pub deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    /// `FLAG_*` bits.
    pub flags: u64,
    /// The tensor.
    pub dl_tensor: DLTensor,
}

/// What a managed tensor describes.
pub struct Export {
    /// Address of the first byte (a host pointer, or a device address as an integer).
    pub data: u64,
    /// Where it is.
    pub device: DLDevice,
    /// Element type.
    pub dtype: DLDataType,
    /// Dimensions, in elements.
    pub shape: Vec<i64>,
    /// Kept alive until the consumer calls the deleter.
    pub owner: Box<dyn Any + Send>,
    /// Whether consumers must not write through it.
    pub read_only: bool,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("data", &format_args!("{:#x}", self.data))
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

/// The producer's context behind a managed tensor: the owner, and the shape and strides
/// arrays the `DLTensor` points into.
struct Context {
    _owner: Box<dyn Any + Send>,
    shape: Vec<i64>,
    strides: Vec<i64>,
}

fn tensor(e: Export) -> (DLTensor, Box<Context>) {
    // Row-major (C-contiguous) strides, in elements; a dimension of 0 counts as 1, as torch
    // and numpy count it, so that an empty tensor has the strides their own empty ones have
    // (torch views one as another dtype only where its last stride is 1 and the others
    // divide by the width: zeros would not).
    let mut strides = vec![1i64; e.shape.len()];
    for i in (0..e.shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1].saturating_mul(e.shape[i + 1].max(1));
    }
    let empty = e.shape.contains(&0);
    let mut ctx = Box::new(Context { _owner: e.owner, shape: e.shape, strides });
    let t = DLTensor {
        // DLPack asks for a null pointer when there are no elements.
        data: if empty { std::ptr::null_mut() } else { e.data as usize as *mut c_void },
        device: e.device,
        ndim: ctx.shape.len() as i32,
        dtype: e.dtype,
        // The vectors live in the boxed context, which is freed only by the deleter; moving
        // the box does not move their heap buffers.
        shape: ctx.shape.as_mut_ptr(),
        strides: ctx.strides.as_mut_ptr(),
        byte_offset: 0,
    };
    (t, ctx)
}

/// A `DLManagedTensorVersioned` for `e`, owned by the caller until it hands it to a
/// consumer, which calls its deleter exactly once.
pub fn export_versioned(e: Export) -> *mut DLManagedTensorVersioned {
    let flags = if e.read_only { FLAG_READ_ONLY } else { 0 };
    let version = version_for(e.dtype);
    let (dl_tensor, ctx) = tensor(e);
    Box::into_raw(Box::new(DLManagedTensorVersioned {
        version,
        manager_ctx: Box::into_raw(ctx).cast(),
        deleter: Some(delete_versioned),
        flags,
        dl_tensor,
    }))
}

/// A `DLManagedTensor` (DLPack before 1.0, which has no read-only flag) for `e`.
pub fn export_legacy(e: Export) -> *mut DLManagedTensor {
    let (dl_tensor, ctx) = tensor(e);
    Box::into_raw(Box::new(DLManagedTensor {
        dl_tensor,
        manager_ctx: Box::into_raw(ctx).cast(),
        deleter: Some(delete_legacy),
    }))
}

/// The deleter of [`export_versioned`]'s tensors.
///
/// # Safety
///
/// `p` is null or a pointer [`export_versioned`] returned, not yet deleted.
pub unsafe extern "C" fn delete_versioned(p: *mut DLManagedTensorVersioned) {
    if p.is_null() {
        return;
    }
    // SAFETY: the caller passes a pointer made by Box::into_raw in export_versioned, once.
    let t = unsafe { Box::from_raw(p) };
    // SAFETY: manager_ctx was made by Box::into_raw of a Context in the same call, and only
    // this deleter frees it.
    let ctx = unsafe { Box::from_raw(t.manager_ctx.cast::<Context>()) };
    // The owner's drop frees memory (an arena, device memory): a panic there (a bug) must
    // not unwind into the consumer's C code.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(ctx)));
}

/// The deleter of [`export_legacy`]'s tensors.
///
/// # Safety
///
/// `p` is null or a pointer [`export_legacy`] returned, not yet deleted.
pub unsafe extern "C" fn delete_legacy(p: *mut DLManagedTensor) {
    if p.is_null() {
        return;
    }
    // SAFETY: the caller passes a pointer made by Box::into_raw in export_legacy, once.
    let t = unsafe { Box::from_raw(p) };
    // SAFETY: as in delete_versioned.
    let ctx = unsafe { Box::from_raw(t.manager_ctx.cast::<Context>()) };
    // As in delete_versioned.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(ctx)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_deleter_drops_the_owner_once() {
        let data = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let drops = Arc::new(AtomicUsize::new(0));
        let e = Export {
            data: data.as_ptr() as u64,
            device: DLDevice { device_type: DEVICE_CPU, device_id: 0 },
            dtype: DLDataType { code: code::FLOAT, bits: 32, lanes: 1 },
            shape: vec![2, 3],
            owner: Box::new(Counted(Arc::clone(&drops))),
            read_only: true,
        };
        let p = export_versioned(e);
        // SAFETY: p was just made and not deleted; the consumer's side reads the struct.
        let t = unsafe { &*p };
        let v1_0 = DLPackVersion { major: 1, minor: 0 };
        assert_eq!((t.version, t.flags, t.dl_tensor.ndim), (v1_0, FLAG_READ_ONLY, 2));
        // SAFETY: shape points at ndim values that live until the deleter runs.
        let shape = unsafe { std::slice::from_raw_parts(t.dl_tensor.shape, 2) };
        // SAFETY: as for shape.
        let strides = unsafe { std::slice::from_raw_parts(t.dl_tensor.strides, 2) };
        assert_eq!((shape, strides), (&[2i64, 3][..], &[3i64, 1][..]));
        assert_eq!(drops.load(Ordering::SeqCst), 0);
        let deleter = t.deleter.unwrap();
        // SAFETY: the one deletion of a tensor export_versioned made.
        unsafe { deleter(p) };
        assert_eq!(drops.load(Ordering::SeqCst), 1);

        let e = Export {
            data: 0,
            device: DLDevice { device_type: DEVICE_CPU, device_id: 0 },
            dtype: DLDataType { code: code::UINT, bits: 8, lanes: 1 },
            shape: vec![2, 0, 4],
            owner: Box::new(Counted(Arc::clone(&drops))),
            read_only: false,
        };
        let p = export_legacy(e);
        // SAFETY: as above.
        let t = unsafe { &*p };
        assert!(t.dl_tensor.data.is_null(), "no elements: null data");
        // SAFETY: as above.
        let strides = unsafe { std::slice::from_raw_parts(t.dl_tensor.strides, 3) };
        assert_eq!(strides, [4, 4, 1], "torch's strides of an empty tensor of this shape");
        // SAFETY: as above.
        unsafe { delete_legacy(p) };
        assert_eq!(drops.load(Ordering::SeqCst), 2);
    }
}
