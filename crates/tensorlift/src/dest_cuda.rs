//! The CUDA destination: reads land in pinned chunks, which are copied to the device on
//! several streams while the next chunks are read.
//!
//! Every tensor of the load gets a 256-byte aligned place in one device allocation
//! ([`layout::device_layout`]), checked against the device's free memory before a byte is
//! read. A filled chunk's bytes go to their places as asynchronous copies followed by an
//! event; the chunk returns to the pinned pool only once that event has completed, and a
//! tensor is yielded only once every copy into it has completed. The device allocation is
//! freed when the last tensor that refers to it drops.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tensorlift_cuda::{CopyEngine, CudaError, DeviceArena, Gpu, PinnedChunk, PinnedPool};
use tensorlift_format::LoadPlan;

use crate::layout::{self, Read, Span};
use crate::loader::Config;
use crate::pipeline::{chunks_to_wait_for, completed_by, plan_file, Sink};
use crate::{Device, LoadError, Tensor};

/// A CUDA device chosen by a loader, with its staging memory.
#[derive(Debug)]
pub(crate) struct CudaTarget {
    pub gpu: Gpu,
    pub pool: Arc<PinnedPool>,
    pub streams: usize,
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
        let (placements, total) = layout::device_layout(plan, &spans);
        // Before a byte is read: does the device have room for the whole load?
        let (free, _) = cuda.gpu.memory_info().map_err(cuda_err)?;
        let no_room = || LoadError::DeviceMemory { file: plan_file(plan), device, needed: total, free };
        if total > free {
            return Err(no_room());
        }
        let arena = match DeviceArena::new(&cuda.gpu, total as usize) {
            Ok(a) => Arc::new(a),
            Err(CudaError::OutOfMemory { .. }) => return Err(no_room()),
            Err(e) => return Err(cuda_err(e)),
        };
        let done = Arc::new(Completions::default());
        let d = Arc::clone(&done);
        let engine = CopyEngine::with_completion(&cuda.gpu, cuda.streams, Box::new(move |tag, r| d.push(tag, r)))
            .map_err(cuda_err)?;
        let chunk = cfg.chunk_size;
        let remaining = spans
            .iter()
            .map(|span| chunks_to_wait_for(plan, span, chunk, |t| ready.push_back(make(plan, &arena, &placements, t))))
            .collect();
        Ok(CudaSink {
            device,
            spans,
            placements,
            arena,
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

    fn tag(read: &Read) -> u64 {
        ((read.span as u64) << 32) | read.index as u64
    }

    /// The error of a failed copy, naming the first tensor the chunk holds.
    fn copy_error(&self, plan: &LoadPlan, tag: u64, source: CudaError) -> LoadError {
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

fn make(plan: &LoadPlan, arena: &Arc<DeviceArena>, placements: &[Option<u64>], t: usize) -> Tensor {
    let pt = &plan.tensors()[t];
    let offset = placements[t].unwrap_or(0);
    Tensor::device(&pt.name, pt.dtype, &pt.shape, Arc::clone(arena), offset, pt.len() as usize)
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
        let pieces: Vec<tensorlift_cuda::Piece> = layout::pieces(plan, span, &self.placements, read)
            .into_iter()
            .map(|p| tensorlift_cuda::Piece {
                src_offset: p.src,
                dst_offset: p.dst as usize,
                len: p.len,
                rows: p.rows,
                src_pitch: p.src_pitch,
                dst_pitch: p.dst_pitch as usize,
            })
            .collect();
        let Some(engine) = self.engine.as_mut() else { return Ok(0) };
        self.first_copy.get_or_insert_with(Instant::now);
        let tag = Self::tag(read);
        match engine.copy_tagged(buf, &self.arena, &pieces, tag) {
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
            let (si, index) = ((tag >> 32) as usize, (tag & 0xffff_ffff) as usize);
            let Some(span) = self.spans.get(si) else { continue };
            bytes += (span.len() - (index * self.chunk) as u64).min(self.chunk as u64);
            for t in completed_by(plan, span, &mut self.remaining[si], index, self.chunk) {
                ready.push_back(make(plan, &self.arena, &self.placements, t));
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
