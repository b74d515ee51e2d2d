//! Loads onto several devices at once, each byte read once: [`DevicePlan`] says which device
//! gets which part of the checkpoint ([`LoaderBuilder::devices`](crate::LoaderBuilder::devices)).
//!
//! Every chunk of the checkpoint is read once into a pinned staging chunk and copied from
//! there to each device that needs part of it, on that device's own streams (with 2D
//! copies for the slices of an inner dimension); the chunk goes back to the staging pool
//! once every device's copies from it have completed. One staging budget serves every
//! device. [`LoadStats::bytes_read`](crate::LoadStats::bytes_read) is then the checkpoint's
//! bytes once, however many devices there are.
//!
//! ```no_run
//! use tensorlift::{Device, DevicePlan, Loader, Sharding};
//! # fn main() -> Result<(), tensorlift::LoadError> {
//! // Tensor parallelism over two GPUs of one process, as a Rust server runs it.
//! let plans = (0..2)
//!     .map(|rank| Ok(DevicePlan::shard(Device::Cuda(rank), Sharding::llama(rank, 2, 8)?)))
//!     .collect::<Result<Vec<_>, tensorlift::LoadError>>()?;
//! let loader = Loader::builder().devices(plans).build()?;
//! let [rank0, rank1] = <[_; 2]>::try_from(loader.load_devices_blocking("models/llama")?).unwrap();
//! assert_eq!(rank1.stats().bytes_read, rank0.stats().bytes_read); // one read, shared
//! # Ok(()) }
//! ```

use std::sync::Arc;

use crate::slicing::Slices;
use crate::{Device, Sharding, SliceRule, TensorSlice};

/// One device of a load onto several devices, and the part of the checkpoint it gets: every
/// selected tensor whole ([`replica`](Self::replica)), or slices of them
/// ([`shard`](Self::shard), [`slice`](Self::slice), [`slice_with`](Self::slice_with)),
/// chosen as [`LoaderBuilder::slice`](crate::LoaderBuilder::slice) and its kin choose them
/// for a load onto one device.
#[derive(Clone)]
pub struct DevicePlan {
    pub(crate) device: Device,
    pub(crate) slices: Slices,
}

impl std::fmt::Debug for DevicePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevicePlan")
            .field("device", &self.device)
            .field("sliced", &!self.slices.is_empty())
            .finish_non_exhaustive()
    }
}

impl DevicePlan {
    /// Every selected tensor, whole, on `device` (a CUDA device).
    pub fn replica(device: Device) -> DevicePlan {
        DevicePlan { device, slices: Slices::default() }
    }

    /// One tensor-parallel rank's part of each tensor on `device` (see [`Sharding`]).
    pub fn shard(device: Device, sharding: Sharding) -> DevicePlan {
        DevicePlan::replica(device).slice_with(sharding)
    }

    /// Only `slice` of tensor `name` (its exact name) on this device; takes precedence over
    /// the rule for that tensor.
    pub fn slice(mut self, name: impl Into<String>, slice: TensorSlice) -> DevicePlan {
        self.slices.named.insert(name.into(), slice);
        self
    }

    /// Of each tensor, the part `rule` chooses, on this device (replaces an earlier rule).
    pub fn slice_with(mut self, rule: impl SliceRule + 'static) -> DevicePlan {
        self.slices.rule = Some(Arc::new(rule));
        self
    }

    /// The device.
    pub fn device(&self) -> Device {
        self.device
    }
}
