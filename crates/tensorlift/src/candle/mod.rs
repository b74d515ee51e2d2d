//! candle integration (cargo feature `candle`): checkpoints loaded by tensorlift as
//! `candle_core::Tensor`s, and a [`SimpleBackend`] so that `VarBuilder::from_backend` builds
//! a candle model from them, with the loader's slices and dtype conversion.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! # fn main() -> Result<(), tensorlift::candle::CandleError> {
//! let model = tensorlift::candle::load(tensorlift::Loader::builder().device(tensorlift::Device::Cpu), "models/bert")?;
//! assert_eq!(model.handover(), tensorlift::candle::Handover::Moved);
//! let vb = model.into_var_builder(DType::F32, Device::Cpu);
//! // let bert = candle_transformers::models::bert::BertModel::load(vb, &config)?;
//! # let _ = vb; Ok(()) }
//! ```
//!
//! **How tensors reach candle.** candle's CPU tensors own their memory (a `Vec` of their
//! element type): a host load reads each tensor straight into such a `Vec`, lent to the
//! load as caller memory ([`crate::place`]), and hands the `Vec` to candle: no copy
//! ([`Handover::Moved`]), fp8 (E4M3) included. Types candle keeps as raw bytes (fp6, fp4,
//! E8M0) and U16 (which candle holds as U32) are copied once.
//!
//! **CUDA** (cargo feature `candle-cuda`). [`load_onto`] a candle CUDA device allocates each
//! tensor's `CudaSlice` with that device (its context and stream), lends it to the load as
//! caller device memory ([`LentMemory::from_cuda_slice`](crate::place::LentMemory::from_cuda_slice)),
//! and wraps it as the candle tensor's storage once its bytes have landed: no copy, and
//! the tensor belongs to candle's device like any other. candle's `cuda` feature links the
//! CUDA libraries and builds its kernels with nvcc, whose version picks the bindings of
//! cudarc, the crate both sides drive the GPU with: build tensorlift with
//! `default-features = false, features = ["candle-cuda"]` (docs/CANDLE.md). Without the
//! feature, a load onto a GPU is copied back to host memory for candle, one tensor at a
//! time ([`Handover::CopiedFromDevice`]), and [`load_onto`] a device other than the host
//! loads into host memory and lets candle copy each tensor there
//! ([`Handover::CopiedToDevice`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Shape};
use candle_nn::var_builder::{SimpleBackend, VarBuilder};
use tensorlift_format::Dtype;

use crate::place::{Destination, HostBuffer, TensorRequest};

/// A `Vec` of one element type, lent to a load as bytes.
struct Typed<T>(Vec<T>);

impl<T: bytemuck::Pod> AsMut<[u8]> for Typed<T> {
    fn as_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.0)
    }
}

/// Calls `$body` with `$t` bound to the Rust element type candle stores `$dtype` in, for the
/// types whose tensors candle builds from a `Vec` of them (fp8 E4M3 among them: candle's own
/// `float8::F8E4M3`, on the host and, through cudarc's `f8` feature, on its CUDA devices).
macro_rules! with_vec_type {
    ($dtype:expr, $t:ident => $body:expr, _ => $other:expr) => {
        match $dtype {
            Dtype::U8 => {
                type $t = u8;
                $body
            }
            Dtype::U32 => {
                type $t = u32;
                $body
            }
            Dtype::I16 => {
                type $t = i16;
                $body
            }
            Dtype::I32 => {
                type $t = i32;
                $body
            }
            Dtype::I64 => {
                type $t = i64;
                $body
            }
            Dtype::BF16 => {
                type $t = half::bf16;
                $body
            }
            Dtype::F16 => {
                type $t = half::f16;
                $body
            }
            Dtype::F32 => {
                type $t = f32;
                $body
            }
            Dtype::F64 => {
                type $t = f64;
                $body
            }
            Dtype::F8_E4M3 => {
                type $t = float8::F8E4M3;
                $body
            }
            _ => $other,
        }
    };
}

#[cfg(feature = "candle-cuda")]
mod cuda;
/// Without `candle-cuda`, no candle device is one tensorlift lends memory on.
#[cfg(not(feature = "candle-cuda"))]
mod cuda {
    use tensorlift_format::Dtype;

    use super::CandleError;
    use crate::place::Destination;

    #[derive(Clone)]
    pub(super) enum CudaDevice {}

    pub(super) enum Lent {}

    impl Lent {
        pub(super) fn destination(&self) -> Destination {
            match *self {}
        }

        pub(super) fn into_tensor(self, _: &str, _: Dtype, _: &[usize]) -> Result<candle_core::Tensor, CandleError> {
            match self {}
        }
    }

    pub(super) fn of(_: &candle_core::Device) -> Option<CudaDevice> {
        None
    }

    pub(super) fn ordinal(dev: &CudaDevice) -> usize {
        match *dev {}
    }

    pub(super) fn device(dev: CudaDevice) -> candle_core::Device {
        match dev {}
    }

    pub(super) fn lend(dev: &CudaDevice, _: Dtype, _: u64) -> Result<Option<Lent>, String> {
        match *dev {}
    }
}

use crate::{LoadError, LoadStats, LoaderBuilder};

/// Why a checkpoint could not be handed to candle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CandleError {
    /// The load failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// candle has no element type for a tensor's dtype.
    #[error(
        "tensor '{tensor}': candle has no {dtype} type (leave it out with a filter; LoaderBuilder::convert_to converts floats)"
    )]
    Unsupported { tensor: String, dtype: Dtype },
    /// candle refused a tensor.
    #[error("tensor '{tensor}': {source}")]
    Candle {
        tensor: String,
        #[source]
        source: candle_core::Error,
    },
}

/// How the tensors reached candle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Handover {
    /// Read straight into memory candle now owns (a `Vec` on the host, a `CudaSlice` of
    /// candle's CUDA device): no copy, but for the tensors that are not lent (types candle
    /// keeps as raw bytes, U16, which candle holds as U32, and, on a CUDA device, empty
    /// ones), which are copied.
    Moved,
    /// Loaded onto a CUDA device, and copied back to host memory for candle.
    CopiedFromDevice,
    /// Loaded into host memory, and copied to candle's device by candle.
    CopiedToDevice,
}

/// A host buffer of `bytes` zeroed bytes as a `Vec` of `dtype`'s element type (lazily zeroed
/// pages, no pass over the memory), or `None` for a type candle keeps as raw bytes (or
/// widens). Sized by the file: an allocation that fails is an error, never a panic.
fn typed_buffer(dtype: Dtype, bytes: u64) -> Result<Option<HostBuffer>, String> {
    let failed = || format!("cannot allocate {bytes} bytes of host memory");
    let bytes = usize::try_from(bytes).map_err(|_| failed())?;
    fn zeroed<T: bytemuck::Pod + Send + Sync>(bytes: usize) -> Option<HostBuffer> {
        let v = bytemuck::allocation::try_zeroed_vec::<T>(bytes / std::mem::size_of::<T>()).ok()?;
        Some(HostBuffer::new(Typed(v)))
    }
    with_vec_type!(dtype, T => zeroed::<T>(bytes).map(Some).ok_or_else(failed), _ => Ok(None))
}

/// The candle tensor over a buffer's memory, once the load is done with it.
fn from_buffer(name: &str, dtype: Dtype, shape: &[usize], buf: HostBuffer) -> Result<candle_core::Tensor, CandleError> {
    let inner = buf.into_inner().map_err(|_| still_in_use(name))?;
    fn tensor<T: candle_core::WithDType>(
        name: &str,
        shape: &[usize],
        inner: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<candle_core::Tensor, CandleError> {
        let v = inner.downcast::<Typed<T>>().map_err(|_| changed_type(name))?;
        candle_core::Tensor::from_vec(v.0, shape, &candle_core::Device::Cpu)
            .map_err(|source| CandleError::Candle { tensor: name.to_owned(), source })
    }
    with_vec_type!(dtype, T => tensor::<T>(name, shape, inner), _ => Err(CandleError::Unsupported { tensor: name.to_owned(), dtype }))
}

fn still_in_use(name: &str) -> CandleError {
    CandleError::Candle {
        tensor: name.to_owned(),
        source: candle_core::Error::Msg("the tensor's memory is still in use".into()),
    }
}

fn changed_type(name: &str) -> CandleError {
    CandleError::Candle {
        tensor: name.to_owned(),
        source: candle_core::Error::Msg("the tensor's memory changed type".into()),
    }
}

/// Memory lent to a load for one tensor, which becomes the candle tensor's.
enum Lent {
    Host(HostBuffer),
    Cuda(cuda::Lent),
}

impl Lent {
    fn destination(&self) -> Destination {
        match self {
            Lent::Host(buf) => Destination::host(buf, 0),
            Lent::Cuda(lent) => lent.destination(),
        }
    }

    fn into_tensor(self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<candle_core::Tensor, CandleError> {
        match self {
            Lent::Host(buf) => from_buffer(name, dtype, shape, buf),
            Lent::Cuda(lent) => lent.into_tensor(name, dtype, shape),
        }
    }
}

/// A checkpoint's tensors, as candle tensors.
#[derive(Debug)]
pub struct CandleModel {
    tensors: HashMap<String, candle_core::Tensor>,
    handover: Handover,
    stats: LoadStats,
}

/// Loads `path` with a loader built from `builder` (its filters, slices, dtype conversion
/// and tuning), as candle tensors on the host. The load goes straight into host memory
/// unless the builder (or `TENSORLIFT_DEVICE`) names a GPU: then it is loaded there and
/// each tensor copied back ([`Handover::CopiedFromDevice`]); `Device::Auto` names none (a
/// `TENSORLIFT_DEVICE` that is no device, or not text, fails the load:
/// [`LoadError::InvalidDevice`]).
/// Where each tensor lands is this function's to say (it lends the load memory candle then
/// owns): a placement rule the builder has ([`LoaderBuilder::place_with`]) is replaced,
/// and loads that take none (verified loads, mapped views, several devices) are refused.
/// A tensor of a type candle has no `DType` for (BOOL, I8, U64, F8_E5M2, say) fails the
/// load as it is planned, naming the tensor, where candle's own lazy `MmapedSafetensors`
/// fails only when the model asks for it: leave such tensors out with a filter, or
/// convert floats ([`LoaderBuilder::convert_to`]). U16 tensors become U32 ones, as
/// candle's reader widens them.
pub fn load(builder: LoaderBuilder, path: impl AsRef<Path>) -> Result<CandleModel, CandleError> {
    load_lending(builder.host_unless_named(), path, None)
}

/// Loads `path` as candle tensors on candle's `device`, with a loader built from `builder`
/// (its filters, slices, dtype conversion and tuning; its device is `device`'s). On the
/// host and, with the `candle-cuda` feature, on a CUDA device, each tensor is read into
/// memory candle then owns ([`Handover::Moved`]); on other devices, into host memory that
/// candle copies to `device` ([`Handover::CopiedToDevice`]).
pub fn load_onto(
    builder: LoaderBuilder,
    path: impl AsRef<Path>,
    device: &candle_core::Device,
) -> Result<CandleModel, CandleError> {
    if let Some(dev) = cuda::of(device) {
        let ordinal = cuda::ordinal(&dev);
        return load_lending(builder.device(crate::Device::Cuda(ordinal)), path, Some(dev));
    }
    let mut model = load_lending(builder.device(crate::Device::Cpu), path, None)?;
    if !device.is_cpu() {
        for (name, t) in &mut model.tensors {
            *t = t.to_device(device).map_err(|source| CandleError::Candle { tensor: name.clone(), source })?;
        }
        model.handover = Handover::CopiedToDevice;
    }
    Ok(model)
}

/// The load: lends each tensor memory of its type on candle's CUDA device `cuda` when
/// given, else on the host when the loader chose the host.
fn load_lending(
    builder: LoaderBuilder,
    path: impl AsRef<Path>,
    cuda: Option<cuda::CudaDevice>,
) -> Result<CandleModel, CandleError> {
    // The rule learns whether it serves a host load once the loader has chosen its device.
    let on_host = Arc::new(AtomicBool::new(false));
    let lent: Arc<Mutex<HashMap<String, Lent>>> = Arc::default();
    let (host, bufs, on_cuda) = (Arc::clone(&on_host), Arc::clone(&lent), cuda.clone());
    // Host memory lent so far, and what the process can fill: memory is committed when the
    // reads touch it, so a load larger than that is refused before it is killed midway, as
    // the loader refuses its own (which does not count what a rule lends).
    let lent_bytes = std::sync::atomic::AtomicU64::new(0);
    let available = std::sync::OnceLock::new();
    // The first tensor of a type candle cannot hold, which fails the load as it is planned
    // (not once every byte is read).
    let refused: Arc<Mutex<Option<(String, Dtype)>>> = Arc::default();
    let refusal = Arc::clone(&refused);
    let rule = move |t: &TensorRequest<'_>| -> Result<Option<Destination>, String> {
        if !candle_holds(t.dtype) {
            refusal.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(|| (t.name.to_owned(), t.dtype));
            return Err(format!("candle has no {} type", t.dtype));
        }
        let buf = match &on_cuda {
            Some(dev) => cuda::lend(dev, t.dtype, t.bytes)?.map(Lent::Cuda),
            // (Every tensor counts: those of types candle keeps as raw bytes are read into
            // the loader's memory, whose own check does not count what is lent here, and
            // copied for candle; U16 ones are copied at twice their size.)
            None if host.load(Ordering::Acquire) => {
                let bytes = if t.dtype == Dtype::U16 { t.bytes.saturating_mul(2) } else { t.bytes };
                let needed = lent_bytes.fetch_add(bytes, Ordering::Relaxed).saturating_add(bytes);
                if let Some(available) = *available.get_or_init(tensorlift_io::host_memory_available) {
                    if needed > available {
                        return Err(format!(
                            "the tensors need {needed} bytes of host memory so far, and {available} are available"
                        ));
                    }
                }
                typed_buffer(t.dtype, t.bytes)?.map(Lent::Host)
            }
            None => None,
        };
        let Some(buf) = buf else { return Ok(None) };
        let dest = buf.destination();
        bufs.lock().unwrap_or_else(|p| p.into_inner()).insert(t.name.to_owned(), buf);
        Ok(Some(dest))
    };
    let loader = builder.place_with(rule).build()?;
    let host = loader.device() == crate::Device::Cpu;
    on_host.store(host, Ordering::Release);
    let model = match loader.load_blocking(path) {
        Ok(model) => model,
        Err(e) => {
            return Err(match refused.lock().unwrap_or_else(|p| p.into_inner()).take() {
                Some((tensor, dtype)) => CandleError::Unsupported { tensor, dtype },
                None => e.into(),
            })
        }
    };
    let stats = model.stats().clone();
    let handover = if host || cuda.is_some() { Handover::Moved } else { Handover::CopiedFromDevice };
    // Tensors not lent memory (raw-byte types, U16, and on a CUDA device empty ones) go
    // where the others are: from host memory (one copy), or for a CUDA load back from the
    // device and then to candle's device (two; they are rare).
    let device = cuda.map_or(candle_core::Device::Cpu, cuda::device);
    let mut lent = std::mem::take(&mut *lent.lock().unwrap_or_else(|p| p.into_inner()));
    let mut tensors = HashMap::with_capacity(model.len());
    for t in model.into_tensors() {
        let (name, dtype, shape) = (t.name().to_owned(), t.dtype(), t.shape().to_vec());
        let ct = match lent.remove(&name) {
            Some(buf) => {
                // The tensor's claim on the buffer ends with it; then the memory is candle's.
                drop(t);
                buf.into_tensor(&name, dtype, &shape)?
            }
            None => {
                let bytes = t.to_host().map_err(|e| CandleError::Candle {
                    tensor: name.clone(),
                    source: candle_core::Error::Msg(e.to_string()),
                })?;
                let made = if dtype == Dtype::U16 {
                    // candle has no u16: its reader widens them to u32, and so does this.
                    let wide: Vec<u32> =
                        bytes.chunks_exact(2).map(|b| u32::from(u16::from_le_bytes([b[0], b[1]]))).collect();
                    candle_core::Tensor::from_vec(wide, shape.as_slice(), &device)
                } else {
                    let cdtype =
                        DType::try_from(dtype).map_err(|_| CandleError::Unsupported { tensor: name.clone(), dtype })?;
                    candle_core::Tensor::from_raw_buffer(&bytes, cdtype, &shape, &device)
                };
                made.map_err(|source| CandleError::Candle { tensor: name.clone(), source })?
            }
        };
        tensors.insert(name, ct);
    }
    Ok(CandleModel { tensors, handover, stats })
}

/// Whether candle has a type for `dtype` (its own, or, for U16, the u32 its reader widens
/// them to).
fn candle_holds(dtype: Dtype) -> bool {
    dtype == Dtype::U16 || DType::try_from(dtype).is_ok()
}

impl CandleModel {
    /// A tensor by name.
    pub fn get(&self, name: &str) -> Option<&candle_core::Tensor> {
        self.tensors.get(name)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// How the tensors reached candle.
    pub fn handover(&self) -> Handover {
        self.handover
    }

    /// The load's statistics.
    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }

    /// Every tensor, by name.
    pub fn into_tensors(self) -> HashMap<String, candle_core::Tensor> {
        self.tensors
    }

    /// A `VarBuilder` over these tensors, for `Model::load(vb, &config)`: tensors are
    /// converted to `dtype` and moved to `device` by candle as the model asks for them.
    pub fn into_var_builder(self, dtype: DType, device: candle_core::Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device)
    }
}

impl SimpleBackend for CandleModel {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        device: &candle_core::Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        let t = self.get_unchecked(name, dtype, device)?;
        if t.shape() != &shape {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: shape,
                got: t.shape().clone(),
            }
            .bt());
        }
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &candle_core::Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_owned() }.bt())?;
        t.to_dtype(dtype)?.to_device(device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
