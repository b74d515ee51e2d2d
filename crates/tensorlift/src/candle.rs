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
//! ([`Handover::Moved`]). Types candle keeps as raw bytes (fp8, fp6, fp4) are copied once.
//!
//! **CUDA.** candle's `cuda` feature cannot be built with tensorlift: candle links cudarc to
//! the CUDA libraries at build time (`dynamic-linking`, and nvcc for its kernels), while
//! tensorlift loads the driver at run time (`dynamic-loading`, no toolkit), and cudarc
//! refuses both at once. So a load onto a GPU is copied back to host memory for candle, one
//! tensor at a time ([`Handover::CopiedFromDevice`]); share device memory with a CUDA build
//! of candle through DLPack or [`crate::place::DeviceBuffer`] instead.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Shape};
use candle_nn::var_builder::{SimpleBackend, VarBuilder};
use tensorlift_format::Dtype;

use crate::place::{Destination, HostBuffer, TensorRequest};
use crate::{LoadError, LoadStats, LoaderBuilder};

/// Why a checkpoint could not be handed to candle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CandleError {
    /// The load failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// candle has no element type for a tensor's dtype.
    #[error("tensor '{tensor}': candle has no {dtype} type (LoaderBuilder::convert_to converts floats)")]
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
    /// Read straight into memory candle now owns: no copy (raw-byte types aside).
    Moved,
    /// Loaded onto a CUDA device, and copied back to host memory for candle.
    CopiedFromDevice,
}

/// A `Vec` of one element type, lent to a load as bytes.
struct Typed<T>(Vec<T>);

impl<T: bytemuck::Pod> AsMut<[u8]> for Typed<T> {
    fn as_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.0)
    }
}

/// Calls `$body` with `$t` bound to the Rust element type candle stores `$dtype` in, for the
/// types whose tensors candle builds from a `Vec` of them.
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
            _ => $other,
        }
    };
}

/// A host buffer of `bytes` zeroed bytes as a `Vec` of `dtype`'s element type (lazily zeroed
/// pages, no pass over the memory), or `None` for a type candle keeps as raw bytes.
fn typed_buffer(dtype: Dtype, bytes: u64) -> Option<HostBuffer> {
    let bytes = usize::try_from(bytes).ok()?;
    with_vec_type!(dtype, T => {
        let n = bytes / std::mem::size_of::<T>();
        Some(HostBuffer::new(Typed(bytemuck::allocation::zeroed_vec::<T>(n))))
    }, _ => None)
}

/// The candle tensor over a buffer's memory, once the load is done with it.
fn from_buffer(name: &str, dtype: Dtype, shape: &[usize], buf: HostBuffer) -> Result<candle_core::Tensor, CandleError> {
    let fail = |source| CandleError::Candle { tensor: name.to_owned(), source };
    let inner =
        buf.into_inner().map_err(|_| fail(candle_core::Error::Msg("the tensor's memory is still in use".into())))?;
    with_vec_type!(dtype, T => {
        let v = inner
            .downcast::<Typed<T>>()
            .map_err(|_| fail(candle_core::Error::Msg("the tensor's memory changed type".into())))?;
        candle_core::Tensor::from_vec(v.0, shape, &candle_core::Device::Cpu).map_err(fail)
    }, _ => Err(CandleError::Unsupported { tensor: name.to_owned(), dtype }))
}

/// A checkpoint's tensors, as candle tensors on the host.
#[derive(Debug)]
pub struct CandleModel {
    tensors: HashMap<String, candle_core::Tensor>,
    handover: Handover,
    stats: LoadStats,
}

/// Loads `path` with a loader built from `builder` (its device, filters, slices, dtype
/// conversion and tuning), as candle tensors.
pub fn load(builder: LoaderBuilder, path: impl AsRef<Path>) -> Result<CandleModel, CandleError> {
    // The rule lends each tensor a `Vec` of its type, on a host load only: it learns which
    // load it serves once the loader has chosen its device.
    let on_host = Arc::new(AtomicBool::new(false));
    let lent: Arc<Mutex<HashMap<String, HostBuffer>>> = Arc::default();
    let (host, bufs) = (Arc::clone(&on_host), Arc::clone(&lent));
    let rule = move |t: &TensorRequest<'_>| -> Result<Option<Destination>, String> {
        if !host.load(Ordering::Acquire) {
            return Ok(None);
        }
        let Some(buf) = typed_buffer(t.dtype, t.bytes) else { return Ok(None) };
        let dest = Destination::host(&buf, 0);
        bufs.lock().unwrap_or_else(|p| p.into_inner()).insert(t.name.to_owned(), buf);
        Ok(Some(dest))
    };
    let loader = builder.place_with(rule).build()?;
    on_host.store(loader.device() == crate::Device::Cpu, Ordering::Release);
    let model = loader.load_blocking(path)?;
    let stats = model.stats().clone();
    let handover = if loader.device() == crate::Device::Cpu { Handover::Moved } else { Handover::CopiedFromDevice };
    let mut lent = std::mem::take(&mut *lent.lock().unwrap_or_else(|p| p.into_inner()));
    let mut tensors = HashMap::with_capacity(model.len());
    for t in model.into_tensors() {
        let (name, dtype, shape) = (t.name().to_owned(), t.dtype(), t.shape().to_vec());
        let ct = match lent.remove(&name) {
            Some(buf) => {
                // The tensor's claim on the buffer ends with it; then the `Vec` is candle's.
                drop(t);
                from_buffer(&name, dtype, &shape, buf)?
            }
            None => {
                let cdtype =
                    DType::try_from(dtype).map_err(|_| CandleError::Unsupported { tensor: name.clone(), dtype })?;
                let bytes = t.to_host().map_err(|e| CandleError::Candle {
                    tensor: name.clone(),
                    source: candle_core::Error::Msg(e.to_string()),
                })?;
                candle_core::Tensor::from_raw_buffer(&bytes, cdtype, &shape, &candle_core::Device::Cpu)
                    .map_err(|source| CandleError::Candle { tensor: name.clone(), source })?
            }
        };
        tensors.insert(name, ct);
    }
    Ok(CandleModel { tensors, handover, stats })
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
