use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use tensorlift_format::Dtype;
use tensorlift_io::{HostArena, MapContract, MappedFile};

use crate::LoadStats;

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
}

#[derive(Debug, Clone)]
enum Storage {
    Host { arena: Arc<HostArena>, range: Range<usize> },
    Mapped { map: Arc<MappedFile>, range: Range<usize>, contract: MapContract },
}

/// A loaded tensor: name, dtype, shape and its bytes in host memory.
///
/// Cloning is cheap: clones share the memory, which is freed when the last one drops.
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
        Tensor { name: name.into(), dtype, shape: shape.into(), storage: Storage::Host { arena, range } }
    }

    pub(crate) fn mapped(
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        map: Arc<MappedFile>,
        range: Range<usize>,
        contract: MapContract,
    ) -> Tensor {
        Tensor { name: name.into(), dtype, shape: shape.into(), storage: Storage::Mapped { map, range, contract } }
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

    /// The raw little-endian bytes, exactly as in the file.
    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            // A tensor is only made once every chunk covering it has landed, so `get` succeeds.
            Storage::Host { arena, range } => arena.get(range.clone()).unwrap_or_default(),
            // The plan checked the range against the file's length, which the load checked again.
            Storage::Mapped { map, range, contract } => map.view(*contract).get(range.clone()).unwrap_or_default(),
        }
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        match &self.storage {
            Storage::Host { range, .. } | Storage::Mapped { range, .. } => range.len(),
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
        bytemuck::try_cast_slice(self.bytes())
            .map_err(|_| ViewError::Misaligned { tensor: self.name.to_string(), align: std::mem::align_of::<T>() })
    }

    /// The elements, copied: works whatever the alignment.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>, ViewError> {
        self.check::<T>()?;
        Ok(self.bytes().chunks_exact(std::mem::size_of::<T>()).map(bytemuck::pod_read_unaligned).collect())
    }
}

/// Every tensor of a load, by name, with the load's statistics.
#[derive(Debug, Clone)]
pub struct Model {
    tensors: Vec<Tensor>,
    by_name: HashMap<Arc<str>, usize>,
    stats: LoadStats,
}

impl Model {
    pub(crate) fn new(mut tensors: Vec<Tensor>, stats: LoadStats) -> Model {
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let by_name = tensors.iter().enumerate().map(|(i, t)| (Arc::clone(&t.name), i)).collect();
        Model { tensors, by_name, stats }
    }
    /// A tensor by name.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }
    /// All tensors, sorted by name.
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
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
