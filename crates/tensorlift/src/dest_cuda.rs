//! The CUDA destination: reads land in pinned chunks, which are copied to the device on
//! several streams while the next chunks are read.
//!
//! Every tensor of the load gets a 256-byte aligned place in one device allocation
//! ([`layout::device_layout`]), checked against the device's free memory before a byte is
//! read. A filled chunk's bytes go to their places as asynchronous copies followed by an
//! event; the chunk returns to the pinned pool only once that event has completed, and a
//! tensor is yielded only once every copy into it has completed. The device allocation is
//! freed when the last tensor that refers to it drops.
//!
//! A load that converts dtypes ([`crate::LoaderBuilder::convert_to`]) copies the bytes of
//! each tensor to convert into a scratch allocation instead, and once they are all there,
//! a kernel (`kernels/convert.cu`) writes the converted tensor into its place; the tensor is
//! yielded when that kernel has completed. The scratch allocation, the size of the
//! converted tensors as stored, lives until the load ends.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tensorlift_cuda::{CopyEngine, CudaError, DeviceArena, Gpu, KernelType, Kernels, PinnedChunk, PinnedPool};
use tensorlift_format::{Dtype, LoadPlan};

use crate::layout::{self, Place, Read, Span};
use crate::loader::Config;
use crate::pipeline::{chunks_to_wait_for, completed_by, plan_file, Sink};
use crate::{Device, LoadError, Tensor};

/// A CUDA device chosen by a loader, with its staging memory.
#[derive(Debug)]
pub(crate) struct CudaTarget {
    pub gpu: Gpu,
    pub pool: Arc<PinnedPool>,
    pub streams: usize,
    /// The device's kernels, loaded when the loader converts dtypes.
    pub kernels: Option<Arc<Kernels>>,
}

/// A completion's tag: a chunk's copies (`span << 32 | index`), or with this bit, the
/// conversion of tensor `tag & !CONVERTED`.
const CONVERTED: u64 = 1 << 63;

/// The kernel type of a dtype the kernels convert.
fn kernel_type(d: Dtype) -> Option<KernelType> {
    Some(match d {
        Dtype::BF16 => KernelType::BF16,
        Dtype::F16 => KernelType::F16,
        Dtype::F32 => KernelType::F32,
        Dtype::F8_E4M3 => KernelType::F8E4M3,
        Dtype::F8_E5M2 => KernelType::F8E5M2,
        _ => return None,
    })
}

/// A chunk's tag and how its copies went.
type Copied = (u64, Result<(), CudaError>);

/// Copies that finished, reported by the copy engine's completion thread, and the waker of
/// the load waiting for them.
#[derive(Default)]
struct Completions {
    state: Mutex<(VecDeque<Copied>, Option<Waker>)>,
}

impl Completions {
    fn push(&self, tag: u64, result: Result<(), CudaError>) {
        let waker = match self.state.lock() {
            Ok(mut s) => {
                s.0.push_back((tag, result));
                s.1.take()
            }
            Err(_) => None,
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

pub(crate) struct CudaSink {
    device: Device,
    spans: Vec<Span>,
    placements: Vec<Option<u64>>,
    arena: Arc<DeviceArena>,
    /// For a converting load: each tensor's conversion, and where its stored bytes land.
    conversion: Option<Conversion>,
    pool: Arc<PinnedPool>,
    engine: Option<CopyEngine>,
    done: Arc<Completions>,
    /// Chunks whose copies are still to complete, for each tensor of each span.
    remaining: Vec<Vec<usize>>,
    pending: usize,
    chunk: usize,
    first_copy: Option<Instant>,
    last_done: Option<Instant>,
}

/// The conversions of one load.
struct Conversion {
    kernels: Arc<Kernels>,
    to: Dtype,
    /// Each tensor's (from, to) kernel types, for the tensors converted.
    kinds: Vec<Option<(KernelType, KernelType)>>,
    /// Where converted tensors' stored bytes land in `scratch`.
    raw: Vec<Option<u64>>,
    scratch: Arc<DeviceArena>,
}

impl CudaSink {
    pub(crate) fn new(
        cuda: &CudaTarget,
        plan: &LoadPlan,
        spans: Vec<Span>,
        cfg: &Config,
        ready: &mut VecDeque<Tensor>,
    ) -> Result<CudaSink, LoadError> {
        let device = Device::Cuda(cuda.gpu.ordinal());
        let cuda_err = |source: CudaError| LoadError::Cuda { file: plan_file(plan), source };
        // Which tensors a kernel converts, and to what.
        let to = cfg.convert_to.and_then(|to| Some((to, kernel_type(to)?)));
        let kinds: Vec<Option<(KernelType, KernelType)>> = plan
            .tensors()
            .iter()
            .map(|t| match (to, kernel_type(t.dtype)) {
                (Some((to, kt)), Some(kf)) if t.dtype != to => Some((kf, kt)),
                _ => None,
            })
            .collect();
        let (placements, total) = layout::device_layout(plan, &spans, |i| match kinds[i] {
            Some((f, t)) => Place::Packed(plan.tensors()[i].len() / f.width() as u64 * t.width() as u64),
            None => Place::AsLoaded,
        });
        let (raw, scratch_len) =
            layout::device_layout(plan, &spans, |i| if kinds[i].is_some() { Place::AsLoaded } else { Place::No });
        // Before a byte is read: does the device have room for the whole load?
        let (free, _) = cuda.gpu.memory_info().map_err(cuda_err)?;
        let needed = total + scratch_len;
        let no_room = || LoadError::DeviceMemory { file: plan_file(plan), device, needed, free };
        if needed > free {
            return Err(no_room());
        }
        let alloc = |len: u64| match DeviceArena::new(&cuda.gpu, len as usize) {
            Ok(a) => Ok(Arc::new(a)),
            Err(CudaError::OutOfMemory { .. }) => Err(no_room()),
            Err(e) => Err(cuda_err(e)),
        };
        let arena = alloc(total)?;
        let chunk = cfg.chunk_size;
        // Tensors with no bytes wait for nothing (and need no kernel: an empty tensor's
        // conversion is its new dtype).
        let remaining = spans
            .iter()
            .map(|span| {
                chunks_to_wait_for(plan, span, chunk, |t| {
                    let kind = to.zip(kinds[t]).map(|((to, _), k)| (to, k));
                    ready.push_back(make(plan, &arena, &placements, t, kind));
                })
            })
            .collect();
        let conversion = match (to, &cuda.kernels) {
            (Some((to, _)), Some(kernels)) if kinds.iter().any(Option::is_some) => {
                Some(Conversion { kernels: Arc::clone(kernels), to, kinds, raw, scratch: alloc(scratch_len)? })
            }
            _ => None,
        };
        let done = Arc::new(Completions::default());
        let d = Arc::clone(&done);
        let engine = CopyEngine::with_completion(&cuda.gpu, cuda.streams, Box::new(move |tag, r| d.push(tag, r)))
            .map_err(cuda_err)?;
        Ok(CudaSink {
            device,
            spans,
            placements,
            arena,
            conversion,
            pool: Arc::clone(&cuda.pool),
            engine: Some(engine),
            done,
            remaining,
            pending: 0,
            chunk,
            first_copy: None,
            last_done: None,
        })
    }

    /// From the first copy queued to the last one completed.
    pub(crate) fn copy_time(&self) -> Duration {
        match (self.first_copy, self.last_done) {
            (Some(a), Some(b)) => b.saturating_duration_since(a),
            _ => Duration::ZERO,
        }
    }

    /// Tensor `t`'s bytes have all landed: yields it, or launches its conversion.
    fn converted_or_ready(&mut self, plan: &LoadPlan, t: usize, ready: &mut VecDeque<Tensor>) -> Result<(), LoadError> {
        let (Some(c), Some(engine)) = (&self.conversion, self.engine.as_mut()) else {
            ready.push_back(make(plan, &self.arena, &self.placements, t, None));
            return Ok(());
        };
        let (Some(kind), Some(raw), Some(place)) = (c.kinds[t], c.raw[t], self.placements[t]) else {
            ready.push_back(make(plan, &self.arena, &self.placements, t, None));
            return Ok(());
        };
        let pt = &plan.tensors()[t];
        let n = (pt.len() / kind.0.width() as u64) as usize;
        let tag = CONVERTED | t as u64;
        let launched =
            engine.convert_tagged(&c.kernels, kind, (&c.scratch, raw as usize), (&self.arena, place as usize), n, tag);
        match launched {
            Ok(()) => {
                self.pending += 1;
                Ok(())
            }
            Err(source) => Err(LoadError::Convert { tensor: pt.name.clone(), to: c.to, message: source.to_string() }),
        }
    }

    fn tag(read: &Read) -> u64 {
        ((read.span as u64) << 32) | read.index as u64
    }

    /// The error of a failed copy, naming the first tensor the chunk holds.
    fn copy_error(&self, plan: &LoadPlan, tag: u64, source: CudaError) -> LoadError {
        if tag & CONVERTED != 0 {
            let tensor = plan.tensors().get((tag & !CONVERTED) as usize).map_or_else(String::new, |t| t.name.clone());
            let to = self.conversion.as_ref().map_or(Dtype::F32, |c| c.to);
            return LoadError::Convert { tensor, to, message: source.to_string() };
        }
        let (span, index) = ((tag >> 32) as usize, (tag & 0xffff_ffff) as usize);
        let Some(s) = self.spans.get(span) else { return LoadError::Cuda { file: plan_file(plan), source } };
        let start = s.base + (index * self.chunk) as u64;
        let tensor = s
            .tensors
            .iter()
            .map(|&t| &plan.tensors()[t])
            .find(|t| t.file_range.end > start && !t.is_empty())
            .map_or_else(|| "<padding>".to_owned(), |t| t.name.clone());
        LoadError::Copy { file: plan.shards()[s.shard].path.clone(), tensor, device: self.device, source }
    }
}

/// Tensor `t` in `arena`: as loaded, or converted to `converted` (its kernel types).
fn make(
    plan: &LoadPlan,
    arena: &Arc<DeviceArena>,
    placements: &[Option<u64>],
    t: usize,
    converted: Option<(Dtype, (KernelType, KernelType))>,
) -> Tensor {
    let pt = &plan.tensors()[t];
    let offset = placements[t].unwrap_or(0);
    let (dtype, len) = match converted {
        Some((to, (f, k))) => (to, pt.len() / f.width() as u64 * k.width() as u64),
        None => (pt.dtype, pt.len()),
    };
    Tensor::device(&pt.name, dtype, &pt.shape, Arc::clone(arena), offset, len as usize)
}

impl Sink for CudaSink {
    type Buf = PinnedChunk;

    fn buffer(&mut self, _read: &Read, cx: &mut Context<'_>) -> Option<PinnedChunk> {
        // The pool is the loader's: other loads may hold every chunk for now.
        match self.pool.poll_acquire(cx) {
            Poll::Ready(c) => Some(c),
            Poll::Pending => None,
        }
    }

    fn landed(
        &mut self,
        plan: &LoadPlan,
        read: &Read,
        buf: PinnedChunk,
        _ready: &mut VecDeque<Tensor>,
    ) -> Result<u64, LoadError> {
        let Some(span) = self.spans.get(read.span) else { return Ok(0) };
        let cuda_pieces = |placements: &[Option<u64>]| -> Vec<tensorlift_cuda::Piece> {
            layout::pieces(plan, span, placements, read)
                .into_iter()
                .map(|p| tensorlift_cuda::Piece {
                    src_offset: p.src,
                    dst_offset: p.dst as usize,
                    len: p.len,
                    rows: p.rows,
                    src_pitch: p.src_pitch,
                    dst_pitch: p.dst_pitch as usize,
                })
                .collect()
        };
        // Tensors to convert go to the scratch allocation, the others to their places.
        let (direct, raw) = match &self.conversion {
            Some(c) => {
                let direct: Vec<Option<u64>> =
                    self.placements.iter().zip(&c.kinds).map(|(p, k)| if k.is_some() { None } else { *p }).collect();
                (cuda_pieces(&direct), cuda_pieces(&c.raw))
            }
            None => (cuda_pieces(&self.placements), Vec::new()),
        };
        let Some(engine) = self.engine.as_mut() else { return Ok(0) };
        self.first_copy.get_or_insert_with(Instant::now);
        let tag = Self::tag(read);
        let copied = match &self.conversion {
            Some(c) => engine.copy_to(buf, &[(&self.arena, &direct), (&c.scratch, &raw)], tag),
            None => engine.copy_tagged(buf, &self.arena, &direct, tag),
        };
        match copied {
            Ok(()) => {
                self.pending += 1;
                Ok(0)
            }
            Err(e) => Err(self.copy_error(plan, tag, e)),
        }
    }

    fn poll_progress(
        &mut self,
        cx: &mut Context<'_>,
        plan: &LoadPlan,
        ready: &mut VecDeque<Tensor>,
    ) -> Poll<Result<u64, LoadError>> {
        let mut bytes = 0u64;
        loop {
            let next = match self.done.state.lock() {
                Ok(mut s) => match s.0.pop_front() {
                    Some(x) => Some(x),
                    None => {
                        if self.pending > 0 && bytes == 0 {
                            s.1 = Some(cx.waker().clone());
                        }
                        None
                    }
                },
                Err(_) => None,
            };
            let Some((tag, result)) = next else { break };
            self.pending = self.pending.saturating_sub(1);
            self.last_done = Some(Instant::now());
            if let Err(e) = result {
                return Poll::Ready(Err(self.copy_error(plan, tag, e)));
            }
            if tag & CONVERTED != 0 {
                // A conversion completed: its tensor is ready, in its new dtype.
                let t = (tag & !CONVERTED) as usize;
                let kind = self.conversion.as_ref().and_then(|c| Some((c.to, c.kinds[t]?)));
                ready.push_back(make(plan, &self.arena, &self.placements, t, kind));
                continue;
            }
            let (si, index) = ((tag >> 32) as usize, (tag & 0xffff_ffff) as usize);
            let Some(span) = self.spans.get(si) else { continue };
            bytes += (span.len() - (index * self.chunk) as u64).min(self.chunk as u64);
            for t in completed_by(plan, span, &mut self.remaining[si], index, self.chunk) {
                if let Err(e) = self.converted_or_ready(plan, t, ready) {
                    return Poll::Ready(Err(e));
                }
            }
        }
        if bytes > 0 || self.pending == 0 {
            Poll::Ready(Ok(bytes))
        } else {
            Poll::Pending
        }
    }

    fn busy(&self) -> bool {
        self.pending > 0
    }

    fn abort(&mut self) {
        // Dropping the engine waits for every copy in flight; then chunks are back in the
        // pool and nothing reads or writes the device allocation any more.
        self.engine.take();
        self.pending = 0;
    }
}

impl Drop for CudaSink {
    fn drop(&mut self) {
        self.engine.take();
    }
}
