//! The host destination: reads land in their final memory.
//!
//! Each span gets a page-aligned [`HostArena`] whose byte 0 holds the span's page-aligned
//! file offset, so aligned file offsets land at aligned addresses and O_DIRECT reads go
//! straight into the final memory: there is no staging copy on the CPU path.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};

use tensorlift_format::LoadPlan;
use tensorlift_io::{ArenaChunk, ArenaPool, HostArena, PAGE};

use crate::layout::{Read, Span};
use crate::pipeline::{chunks_to_wait_for, completed_by, plan_file, Sink};
use crate::{LoadError, Tensor};

struct Extent {
    span: Span,
    arena: Arc<HostArena>,
    /// Chunks not yet lent to a read, by index.
    chunks: Vec<Option<ArenaChunk>>,
    /// Chunks still to land for each tensor of `span.tensors`.
    remaining: Vec<usize>,
}

pub(crate) struct HostSink {
    extents: Vec<Extent>,
    chunk: usize,
}

impl HostSink {
    pub(crate) fn new(
        plan: &LoadPlan,
        spans: Vec<Span>,
        chunk: usize,
        pages: crate::HugePages,
        pool: &Arc<ArenaPool>,
        stats: &mut crate::LoadStats,
        ready: &mut VecDeque<Tensor>,
    ) -> Result<HostSink, LoadError> {
        // Memory an earlier load left, where it fits a span; the rest of it is given back
        // before anything new is allocated.
        let lens: Vec<usize> = spans.iter().map(|s| (s.len() as usize).next_multiple_of(PAGE)).collect();
        let mut kept = pool.take_for(&lens);
        // A kept buffer may be larger than its span; only the span's bytes are spared.
        let reused: u64 = kept.iter().zip(&lens).filter(|(k, _)| k.is_some()).map(|(_, &l)| l as u64).sum();
        stats.reused_host_bytes = reused;
        // Memory is committed when touched: a load larger than what the process can get
        // would be killed midway, so it is refused before anything is allocated.
        let total: u64 = lens.iter().map(|&l| l as u64).sum();
        let needed = total.saturating_sub(reused);
        if let Some(available) = tensorlift_io::host_memory_available().filter(|&a| needed > a) {
            return Err(LoadError::HostMemory { file: plan_file(plan), needed, available });
        }
        let huge = match pages {
            crate::HugePages::Always => true,
            crate::HugePages::Never => false,
            // Small loads gain little from huge pages: not worth a measurement.
            _ => total >= 256 << 20 && tensorlift_io::page_probe().huge,
        };
        // Reused memory keeps whatever pages it had: the choice is reported for new memory.
        stats.huge_pages = (needed > 0).then_some(huge);
        let mut extents = Vec::with_capacity(spans.len());
        for (span, kept) in spans.into_iter().zip(kept.iter_mut()) {
            let len = span.len() as usize;
            let arena =
                HostArena::pooled(pool, kept.take(), len.next_multiple_of(PAGE), chunk, huge).ok_or_else(|| {
                    LoadError::OutOfMemory { file: plan.shards()[span.shard].path.clone(), bytes: len as u64 }
                })?;
            let mut now = Vec::new();
            let remaining = chunks_to_wait_for(plan, &span, chunk, |t| now.push(t));
            for t in now {
                ready.push_back(make(plan, &span, &arena, t)?);
            }
            let chunks = arena.take_chunks().into_iter().map(Some).collect();
            extents.push(Extent { span, arena, chunks, remaining });
        }
        Ok(HostSink { extents, chunk })
    }
}

/// Tensor `t`, whose bytes have all landed in `arena`: a view of them, or for a gathered
/// slice, its runs copied out.
fn make(plan: &LoadPlan, span: &Span, arena: &Arc<HostArena>, t: usize) -> Result<Tensor, LoadError> {
    let pt = &plan.tensors()[t];
    let r = span.range_of(pt);
    let range = r.start as usize..r.end as usize;
    match &pt.gather {
        None => Ok(Tensor::host(&pt.name, pt.dtype, &pt.shape, Arc::clone(arena), range)),
        Some(g) => {
            let covering = arena.get(range).unwrap_or_default();
            Tensor::gathered(&pt.name, pt.dtype, &pt.shape, covering, g)
                .ok_or_else(|| LoadError::OutOfMemory { file: plan.shards()[pt.shard].path.clone(), bytes: g.len() })
        }
    }
}

impl Sink for HostSink {
    type Buf = ArenaChunk;

    fn buffer(&mut self, read: &Read, _cx: &mut Context<'_>) -> Option<ArenaChunk> {
        self.extents.get_mut(read.span)?.chunks.get_mut(read.index)?.take()
    }

    fn landed(
        &mut self,
        plan: &LoadPlan,
        read: &Read,
        buf: ArenaChunk,
        ready: &mut VecDeque<Tensor>,
    ) -> Result<u64, LoadError> {
        let Some(e) = self.extents.get_mut(read.span) else { return Ok(0) };
        // Every chunk of an extent was cut from its own arena.
        let Ok(index) = e.arena.complete(buf) else { return Ok(0) };
        for t in completed_by(plan, &e.span, &mut e.remaining, index, self.chunk) {
            ready.push_back(make(plan, &e.span, &e.arena, t)?);
        }
        Ok(read.len as u64)
    }

    fn poll_progress(
        &mut self,
        _cx: &mut Context<'_>,
        _plan: &LoadPlan,
        _ready: &mut VecDeque<Tensor>,
    ) -> Poll<Result<u64, LoadError>> {
        Poll::Ready(Ok(0))
    }

    fn busy(&self) -> bool {
        false
    }

    fn abort(&mut self) {
        self.extents.clear();
    }
}
