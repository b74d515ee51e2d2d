//! The destination of a load onto several CUDA devices: each chunk is read once into a
//! pinned chunk, which every device's sink copies its own part of, on its own streams.
//!
//! Each device has a plan of its own: the load's plan with that device's slices applied
//! ([`crate::DevicePlan`]). The load reads, of each tensor, the rows that some device needs
//! ([`plans`]: all of them for a tensor-parallel group whole, fewer for part of one).
//! Slicing narrows a tensor to bytes inside those rows, so every device's tensors lie in the
//! spans laid out for the load's plan, in the same order: each device's sink ([`CudaSink`])
//! is given those spans with its plan's tensors, and the chunks the scheduler reads are the
//! same for all of them. A chunk goes back to the pool
//! once the last device's copies from it have completed (it is shared, and only read).

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tensorlift_cuda::PinnedChunk;
use tensorlift_format::LoadPlan;
use tensorlift_io::Checkpoint;

use crate::config::Config;
use crate::dest_cuda::{CudaSink, CudaTarget};
use crate::devices::DevicePlan;
use crate::layout::{Read, Span};
use crate::sink::Sink;
use crate::{LoadError, Tensor, TensorSlice};

/// One device of the load: its plan, its sink, and the bytes of chunks whose copies to it
/// have completed.
struct OnDevice {
    plan: LoadPlan,
    sink: CudaSink,
    done: u64,
}

pub(crate) struct DevicesSink {
    /// At least one (the builder refused none).
    devices: Vec<OnDevice>,
    /// Bytes reported as landed: those every device has.
    reported: u64,
}

/// Each device's plan: `checkpoint`'s with the slices of its share in `shares` (in order).
/// `checkpoint` is then narrowed to what the load reads: of each tensor, the smallest slice
/// that holds every device's part ([`bounding`]), whose covering bytes are then read once.
pub(crate) fn plans(checkpoint: &mut Checkpoint, shares: &[DevicePlan]) -> Result<Vec<LoadPlan>, LoadError> {
    let mut plans = Vec::with_capacity(shares.len());
    let mut chosen = Vec::with_capacity(shares.len());
    for share in shares {
        let slices = share.slices.choose(checkpoint)?;
        let mut sliced = checkpoint.clone();
        crate::slicing::apply_chosen(&mut sliced, &slices)?;
        plans.push(sliced.into_plan());
        chosen.push(slices);
    }
    let file = crate::error::plan_file(checkpoint);
    let mut i = 0;
    checkpoint.slice_with(
        |t| {
            let read = bounding(&t.shape, chosen.iter().map(|c| c[i].as_ref()));
            i += 1;
            Ok(read)
        },
        |t, e| LoadError::Slice { file: file.clone(), tensor: t.name.clone(), message: e.to_string() },
    )?;
    Ok(plans)
}

/// The smallest slice of a tensor of `shape` that holds each of `parts` (one a device;
/// `None` for a device that takes it whole), or `None` for the whole tensor. A device's
/// empty part lies at the tensor's first byte (see [`tensorlift_format::TensorSlice::layout`]),
/// so where one is empty and another is not, the slice starts at the first element.
fn bounding<'a>(shape: &[usize], parts: impl Iterator<Item = Option<&'a TensorSlice>>) -> Option<TensorSlice> {
    let full = |s: &TensorSlice| -> Vec<std::ops::Range<usize>> {
        (0..shape.len()).map(|d| s.ranges().get(d).cloned().unwrap_or(0..shape[d])).collect()
    };
    let mut bound: Option<Vec<std::ops::Range<usize>>> = None;
    let (mut empty, mut any) = (None, false);
    for part in parts {
        let ranges = full(part?);
        any = true;
        if ranges.iter().any(|r| r.is_empty()) {
            empty = Some(ranges);
            continue;
        }
        bound = Some(match bound {
            None => ranges,
            Some(b) => b.iter().zip(&ranges).map(|(b, r)| b.start.min(r.start)..b.end.max(r.end)).collect(),
        });
    }
    let ranges = match (bound, empty) {
        (Some(b), None) => b,
        (Some(b), Some(_)) => b.into_iter().map(|r| 0..r.end).collect(),
        // Every part is empty: one of them.
        (None, Some(e)) => e,
        (None, None) => return None,
    };
    let whole = ranges.iter().zip(shape).all(|(r, &n)| *r == (0..n));
    (any && !whole).then(|| TensorSlice::new(ranges))
}

impl DevicesSink {
    /// The sinks of `targets`, each with its plan in `plans` (in the same order, from
    /// [`plans`]); `spans` and `reads` are the load's. Each device's memory is checked and
    /// allocated before a byte is read.
    pub(crate) fn new(
        targets: &[Arc<CudaTarget>],
        plans: Vec<LoadPlan>,
        spans: &[Span],
        cfg: &Config,
        reads: &[Read],
        ready: &mut VecDeque<Tensor>,
    ) -> Result<DevicesSink, LoadError> {
        let mut devices = Vec::with_capacity(targets.len());
        for (target, plan) in targets.iter().zip(plans) {
            let own = spans_of(&plan, spans).map_err(|shard| {
                LoadError::Unsupported(format!(
                    "loads of {} onto several devices, whose tensors share bytes (views of one storage) in ways \
                     slices reorder: load it onto one device at a time, or convert it to safetensors",
                    plan.shards()[shard].path.display()
                ))
            })?;
            let sink = CudaSink::new(target, &plan, own, Vec::new(), cfg, reads, None, ready)?;
            devices.push(OnDevice { plan, sink, done: 0 });
        }
        Ok(DevicesSink { devices, reported: 0 })
    }

    /// Spare staging chunks taken (see `CudaSink::buffer`; only the first device's sink lends).
    pub(crate) fn spares(&self) -> usize {
        self.devices.iter().map(|d| d.sink.spares).sum()
    }

    /// From the first copy queued on any device to the last one completed on any.
    pub(crate) fn copy_time(&self) -> Duration {
        let windows = self.devices.iter().map(|d| d.sink.copy_window());
        let (first, last) = windows.fold((None::<Instant>, None::<Instant>), |(f, l), (a, b)| {
            (f.into_iter().chain(a).min(), l.into_iter().chain(b).max())
        });
        match (first, last) {
            (Some(a), Some(b)) => b.saturating_duration_since(a),
            _ => Duration::ZERO,
        }
    }
}

/// The spans of the whole plan, with `plan`'s tensors (the same indices: slicing keeps
/// them): `Err(shard)` where a tensor leaves its span, or the tensors' starts or ends are
/// out of order in it (what the chunk bookkeeping relies on, see [`crate::layout::spans`]).
fn spans_of(plan: &LoadPlan, spans: &[Span]) -> Result<Vec<Span>, usize> {
    for span in spans {
        let mut last: Option<(u64, u64)> = None;
        for &i in &span.tensors {
            let r = &plan.tensors()[i].file_range;
            let inside = r.start >= span.base && r.end <= span.end;
            let ordered = last.is_none_or(|(s, e)| r.start >= s && r.end >= e);
            if !inside || !ordered {
                return Err(span.shard);
            }
            last = Some((r.start, r.end));
        }
    }
    Ok(spans.to_vec())
}

impl Sink for DevicesSink {
    type Buf = PinnedChunk;

    fn buffer(
        &mut self,
        plan: &LoadPlan,
        read: &Read,
        idle: bool,
        cx: &mut Context<'_>,
    ) -> Result<Option<PinnedChunk>, LoadError> {
        // Every device's sink lends from the one pool of the loader.
        match self.devices.first_mut() {
            Some(d) => d.sink.buffer(plan, read, idle, cx),
            None => Ok(None),
        }
    }

    fn landed(
        &mut self,
        _plan: &LoadPlan,
        read: &Read,
        buf: PinnedChunk,
        _ready: &mut VecDeque<Tensor>,
    ) -> Result<u64, LoadError> {
        let chunk = Arc::new(buf);
        for d in &mut self.devices {
            d.sink.copy(&d.plan, read, Arc::clone(&chunk))?;
        }
        Ok(0)
    }

    fn poll_progress(
        &mut self,
        cx: &mut Context<'_>,
        _plan: &LoadPlan,
        ready: &mut VecDeque<Tensor>,
    ) -> Poll<Result<u64, LoadError>> {
        let mut progressed = false;
        for d in self.devices.iter_mut().filter(|d| d.sink.busy()) {
            match d.sink.poll_progress(cx, &d.plan, ready) {
                Poll::Ready(Ok(bytes)) => {
                    d.done += bytes;
                    progressed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // The device's sink keeps the waker.
                Poll::Pending => {}
            }
        }
        if !progressed && self.busy() {
            return Poll::Pending;
        }
        // Progress counts the bytes every device has completed (the least of them).
        let least = self.devices.iter().map(|d| d.done).min().unwrap_or(0);
        let bytes = least.saturating_sub(self.reported);
        self.reported = self.reported.max(least);
        Poll::Ready(Ok(bytes))
    }

    fn busy(&self) -> bool {
        self.devices.iter().any(|d| d.sink.busy())
    }

    fn abort(&mut self) {
        self.devices.iter_mut().for_each(|d| d.sink.abort());
    }
}

#[cfg(test)]
mod tests {
    use super::bounding;
    use tensorlift_format::TensorSlice;

    fn b(shape: &[usize], parts: &[Option<TensorSlice>]) -> Option<Vec<std::ops::Range<usize>>> {
        bounding(shape, parts.iter().map(Option::as_ref)).map(|s| s.ranges().to_vec())
    }

    #[test]
    fn the_read_holds_every_devices_part_and_no_more() {
        let rows = |r: std::ops::Range<usize>| Some(TensorSlice::rows(r));
        // A device that takes the tensor whole: all of it.
        assert_eq!(b(&[8, 4], &[rows(0..2), None]), None);
        // Column-parallel ranks 1 and 2 of 4: their rows.
        assert_eq!(b(&[8, 4], &[rows(2..4), rows(4..6)]), Some(vec![2..6, 0..4]));
        // Every rank: all of it.
        assert_eq!(b(&[8, 4], &[rows(0..4), rows(4..8)]), None);
        // Row-parallel (columns) ranks 0 and 1 of 4: every row, their columns.
        let cols = |r: std::ops::Range<usize>| Some(TensorSlice::new([0..8, r]));
        assert_eq!(b(&[8, 4], &[cols(0..1), cols(1..2)]), Some(vec![0..8, 0..2]));
        // An empty part lies at the first byte: the read starts there (here, all of it).
        assert_eq!(b(&[8, 4], &[rows(5..5), rows(6..8)]), None);
        assert_eq!(b(&[8, 4], &[rows(5..5), cols(2..3)]), Some(vec![0..8, 0..3]));
        // Only empty parts: one of them.
        assert_eq!(b(&[8, 4], &[rows(5..5), rows(3..3)]), Some(vec![3..3, 0..4]));
        // No devices: all of it.
        assert_eq!(b(&[8, 4], &[]), None);
    }
}
