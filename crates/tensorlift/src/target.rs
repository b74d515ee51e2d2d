//! Where tensors go. A loader's device is decided once when it is built ([`Target`]: the
//! host, or a CUDA device with its pinned staging memory); where each tensor of a load lands
//! is decided once when the load starts ([`Landing`]), and the pipeline and the destinations
//! follow that value.

use std::sync::Arc;

use tensorlift_format::LoadPlan;
use tensorlift_io::{MapContract, Reader};

use crate::config::{Config, ReadWhilePlanning};
use crate::dest_cuda::CudaTarget;
use crate::place::Resolved;
use crate::{Device, LoadError};

/// Where a loader's tensors go.
#[derive(Debug)]
pub(crate) enum Target {
    Host,
    Cuda(Arc<CudaTarget>),
    /// Several CUDA devices, in the order of the loader's device plans, sharing one pinned
    /// staging pool ([`LoaderBuilder::devices`](crate::LoaderBuilder::devices)).
    Devices(Vec<Arc<CudaTarget>>),
}

/// Decides where tensors go, once, with the reason: `Cpu` is the host; `Cuda(n)` opens
/// device `n` and its pinned staging memory, or fails saying why; `Auto` does the same for
/// `cuda:0` and falls back to the host with that reason.
pub(crate) fn resolve_device(
    requested: Device,
    why: String,
    cfg: &Config,
    reader: &Reader,
) -> Result<(Target, String), LoadError> {
    match requested {
        Device::Cpu => Ok((Target::Host, why)),
        Device::Cuda(ordinal) => match open_cuda(ordinal, cfg, reader, None) {
            Ok(t) => Ok((Target::Cuda(Arc::new(t)), why)),
            Err(Unusable { reason, source }) => Err(LoadError::CudaUnavailable { ordinal, reason, source }),
        },
        Device::Auto => match open_cuda(0, cfg, reader, None) {
            Ok(t) => {
                let name = t.gpu.name().to_owned();
                Ok((Target::Cuda(Arc::new(t)), format!("auto: cuda:0 ({name}) is usable")))
            }
            Err(unusable) => Ok((Target::Host, format!("auto: {}", unusable.reason))),
        },
    }
}

/// Opens the CUDA devices of a load onto several (by ordinal, none twice: the builder
/// checked), with one pinned staging pool for all of them, made on the first (its memory is
/// registered PORTABLE: pinned for every device's copies).
pub(crate) fn open_devices(ordinals: &[usize], cfg: &Config, reader: &Reader) -> Result<Target, LoadError> {
    let mut opened: Vec<Arc<CudaTarget>> = Vec::with_capacity(ordinals.len());
    for &ordinal in ordinals {
        let pool = opened.first().map(|t| Arc::clone(&t.pool));
        match open_cuda(ordinal, cfg, reader, pool) {
            Ok(t) => opened.push(Arc::new(t)),
            Err(Unusable { reason, source }) => return Err(LoadError::CudaUnavailable { ordinal, reason, source }),
        }
    }
    Ok(Target::Devices(opened))
}

/// Why a CUDA device cannot be used: the reason in words (with the driver's error in it),
/// and the driver's error where one failed.
struct Unusable {
    reason: String,
    source: Option<tensorlift_cuda::CudaError>,
}

impl Unusable {
    fn driver(what: Option<String>, e: tensorlift_cuda::CudaError) -> Self {
        match (what, e) {
            // The probe's own words (no driver, no such device): nothing failed below them.
            (None, tensorlift_cuda::CudaError::Unavailable(why)) => Unusable { reason: why, source: None },
            (None, e) => Unusable { reason: e.to_string(), source: Some(e) },
            (Some(what), e) => Unusable { reason: format!("{what}: {e}"), source: Some(e) },
        }
    }
}

/// Opens a device and the pinned staging pool (registered with io_uring where it can be),
/// or with `pool`, one opened with another device.
fn open_cuda(
    ordinal: usize,
    cfg: &Config,
    reader: &Reader,
    pool: Option<Arc<tensorlift_cuda::PinnedPool>>,
) -> Result<CudaTarget, Unusable> {
    let gpu = tensorlift_cuda::Gpu::open(ordinal).map_err(|e| Unusable::driver(None, e))?;
    let pool = match pool {
        Some(p) => p,
        None => {
            let pool = tensorlift_cuda::PinnedPool::new(&gpu, cfg.staging_budget, cfg.chunk_size).map_err(|e| {
                Unusable::driver(Some(format!("cannot pin {} bytes of staging memory", cfg.staging_budget)), e)
            })?;
            if let Err(e) = pool.register_with(reader) {
                tracing::debug!(error = %e, "pinned chunks are not io_uring fixed buffers");
            }
            pool
        }
    };
    // The kernels only when they are needed: loading them costs the driver a compilation.
    let kernels = match cfg.convert_to {
        Some(_) => Some(Arc::new(
            tensorlift_cuda::Kernels::load(&gpu)
                .map_err(|e| Unusable::driver(Some("cannot load the conversion kernels".into()), e))?,
        )),
        None => None,
    };
    Ok(CudaTarget { gpu, pool, streams: cfg.streams, kernels })
}

/// Where the tensors of one load land, decided once, before anything is read or allocated:
/// views of the mapped files, or reads into host or device memory, each tensor into the
/// caller's memory (`caller[i]`) or tensorlift's (`None`).
pub(crate) enum Landing<'a> {
    /// Zero-copy views of the mapped files (host memory; the loader's build refused mapped
    /// views with a CUDA device or caller memory).
    Mapped(MapContract),
    Host {
        caller: Vec<Option<Resolved>>,
    },
    Cuda {
        target: &'a Arc<CudaTarget>,
        caller: Vec<Option<Resolved>>,
    },
    /// Several devices, each with its part (the loader's device plans, in order).
    Devices(&'a [Arc<CudaTarget>]),
}

impl<'a> Landing<'a> {
    /// Decides where the tensors of `plan` land, asking the caller's placement rule (and
    /// checking its answers) where there is one.
    pub(crate) fn decide(cfg: &Config, target: &'a Target, plan: &LoadPlan) -> Result<Self, LoadError> {
        let gpu = match target {
            Target::Cuda(c) => Some(&c.gpu),
            Target::Host | Target::Devices(_) => None,
        };
        let caller = match &cfg.place {
            Some(rule) => crate::place::resolve(rule.as_ref(), plan, cfg.convert_to, gpu)?,
            None => Vec::new(),
        };
        Ok(match (cfg.map_views, target) {
            (Some(contract), Target::Host) => Landing::Mapped(contract),
            (_, Target::Host) => Landing::Host { caller },
            (_, Target::Cuda(target)) => Landing::Cuda { target, caller },
            // The loader's build refused caller memory and mapped views with several devices.
            (_, Target::Devices(targets)) => Landing::Devices(targets),
        })
    }

    /// Whether tensor `i` is read straight into the caller's host memory, as a span of its
    /// own (one that is gathered or converted first lands in an arena like the others).
    pub(crate) fn read_into_caller(&self, plan: &LoadPlan, i: usize, cfg: &Config) -> bool {
        let Landing::Host { caller } = self else { return false };
        let t = &plan.tensors()[i];
        matches!(caller.get(i), Some(Some(Resolved::Host(_))))
            && t.gather.is_none()
            && crate::place::loaded_as(t, cfg.convert_to).0 == t.dtype
    }
}

/// Whether a load of a whole checkpoint with `cfg` onto `target` may read while planning
/// goes on: a host load into tensorlift's memory of every tensor as it is stored (no filter,
/// slice, conversion, caller memory or mapped views), unless the policy says never.
pub(crate) fn may_read_while_planning(cfg: &Config, target: &Target) -> bool {
    cfg.read_while_planning != ReadWhilePlanning::Never
        && matches!(target, Target::Host)
        && cfg.filter.is_empty()
        && cfg.slices.is_empty()
        && cfg.convert_to.is_none()
        && cfg.place.is_none()
        && cfg.map_views.is_none()
        && cfg.verify == crate::config::Verify::Off
}
