//! The host destination: reads land in their final memory.
//!
//! Each span gets a page-aligned [`HostArena`] whose byte 0 holds the span's page-aligned
//! file offset, so aligned file offsets land at aligned addresses and O_DIRECT reads go
//! straight into the final memory: there is no staging copy on the CPU path.
//!
//! A gathered slice or a converted tensor lands in an arena like the others, and is then
//! written once, gathered and converted in one pass ([`crate::tensor::produce`]), into
//! memory of its own or the caller's. A tensor the caller placed in its own memory
//! ([`crate::place`]) and that needs neither is a span of its own, read straight into its
//! claim of that memory.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};

use tensorlift_format::{Dtype, LoadPlan};
use tensorlift_io::{ArenaPool, Claim, HostArena, HostChunk, PAGE};

use crate::layout::{Read, Span};
use crate::pipeline::{chunks_to_wait_for, completed_by, plan_file, Sink};
use crate::place::Resolved;
use crate::{LoadError, Tensor};

/// Where a span's reads land.
enum Memory {
    Arena(Arc<HostArena>),
    /// A solo span's tensor, in caller memory.
    Caller(Arc<Claim>),
}

struct Extent {
    span: Span,
    memory: Memory,
    /// Chunks not yet lent to a read, by index.
    chunks: Vec<Option<HostChunk>>,
    /// Chunks still to land for each tensor of `span.tensors`.
    remaining: Vec<usize>,
}

pub(crate) struct HostSink {
    extents: Vec<Extent>,
    /// Each tensor's claim on caller memory, for tensors the caller placed.
    claims: Vec<Option<Arc<Claim>>>,
    convert_to: Option<Dtype>,
    chunk: usize,
    /// Faults in fresh arenas ahead of the reads, when the load asked for it.
    prefault: Option<tensorlift_io::Prefaulter>,
}

impl HostSink {
    #[allow(clippy::too_many_arguments)] // The load's parts, each used once here.
    pub(crate) fn new(
        plan: &LoadPlan,
        spans: Vec<Span>,
        dests: Vec<Option<Resolved>>,
        convert_to: Option<Dtype>,
        chunk: usize,
        pages: crate::HugePages,
        prefault_threads: usize,
        reads: &[Read],
        pool: &Arc<ArenaPool>,
        stats: &mut crate::LoadStats,
        ready: &mut VecDeque<Tensor>,
    ) -> Result<HostSink, LoadError> {
        // `dests` is empty when the caller placed nothing.
        let mut claims: Vec<Option<Arc<Claim>>> = vec![None; plan.tensors().len()];
        for (claim, d) in claims.iter_mut().zip(dests) {
            if let Some(Resolved::Host(c)) = d {
                *claim = Some(c);
            }
        }
        // Memory an earlier load left, where it fits a span; the rest of it is given back
        // before anything new is allocated. Solo spans need none: they read into the caller's.
        let lens: Vec<usize> =
            spans.iter().map(|s| if s.solo { 0 } else { (s.len() as usize).next_multiple_of(PAGE) }).collect();
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
        let mut sink = HostSink { extents: Vec::with_capacity(spans.len()), claims, convert_to, chunk, prefault: None };
        let mut fresh = Vec::with_capacity(spans.len());
        for (span, kept) in spans.into_iter().zip(kept.iter_mut()) {
            fresh.push(kept.is_none());
            let len = span.len() as usize;
            let (memory, chunks) = match sink.claims[span.tensors[0]].as_ref().filter(|_| span.solo) {
                Some(claim) => {
                    let chunks = claim.take_chunks(chunk).into_iter().map(|c| Some(HostChunk::Caller(c))).collect();
                    (Memory::Caller(Arc::clone(claim)), chunks)
                }
                None => {
                    let arena = HostArena::pooled(pool, kept.take(), len.next_multiple_of(PAGE), chunk, huge)
                        .ok_or_else(|| LoadError::OutOfMemory {
                            file: plan.shards()[span.shard].path.clone(),
                            bytes: len as u64,
                        })?;
                    let chunks = arena.take_chunks().into_iter().map(|c| Some(HostChunk::Arena(c))).collect();
                    (Memory::Arena(arena), chunks)
                }
            };
            let mut now = Vec::new();
            let remaining = chunks_to_wait_for(plan, &span, chunk, |t| now.push(t));
            let extent = Extent { span, memory, chunks, remaining };
            for t in now {
                ready.push_back(sink.make(plan, &extent, t)?);
            }
            sink.extents.push(extent);
        }
        if prefault_threads > 0 {
            // Fresh arenas only, chunk by chunk in the order the reads are issued; memory
            // reused from an earlier load is already faulted in.
            let work = reads
                .iter()
                .filter(|r| fresh.get(r.span).copied().unwrap_or(false))
                .filter_map(|r| match &sink.extents.get(r.span)?.memory {
                    Memory::Arena(a) => Some((Arc::clone(a), r.index)),
                    Memory::Caller(_) => None,
                })
                .collect();
            sink.prefault = tensorlift_io::Prefaulter::start(work, prefault_threads);
        }
        Ok(sink)
    }

    /// Bytes the prefaulting thread faulted in, and why it stopped early if it did.
    pub(crate) fn prefaulted(&self) -> (u64, Option<String>) {
        self.prefault.as_ref().map_or((0, None), |p| (p.bytes(), p.failure()))
    }

    /// Tensor `t`, whose bytes have all landed in the extent's memory: a view of them, or,
    /// for a gathered slice or a converted tensor, its bytes as loaded in memory of its own;
    /// for a tensor in caller memory, that memory (written by the reads, or here).
    fn make(&self, plan: &LoadPlan, e: &Extent, t: usize) -> Result<Tensor, LoadError> {
        let pt = &plan.tensors()[t];
        let arena = match &e.memory {
            Memory::Caller(claim) => {
                return Ok(Tensor::in_caller_host(&pt.name, pt.dtype, &pt.shape, Arc::clone(claim)))
            }
            Memory::Arena(a) => a,
        };
        let r = e.span.range_of(pt);
        let range = r.start as usize..r.end as usize;
        let (dtype, _) = crate::place::loaded_as(pt, self.convert_to);
        let Some(claim) = &self.claims[t] else {
            if pt.gather.is_none() && dtype == pt.dtype {
                return Ok(Tensor::host(&pt.name, pt.dtype, &pt.shape, Arc::clone(arena), range));
            }
            return Tensor::produced(plan, pt, dtype, arena.get(range).unwrap_or_default());
        };
        let stored = arena.get(range).unwrap_or_default();
        let mut produced = Ok(());
        if !claim.write(|out| produced = crate::tensor::produce(pt, dtype, stored, out)) {
            return Err(LoadError::Destination {
                file: plan.shards()[pt.shard].path.clone(),
                tensor: pt.name.clone(),
                message: "its memory was already being written".into(),
            });
        }
        produced.map_err(|e| LoadError::Convert { tensor: pt.name.clone(), to: dtype, message: e.to_string() })?;
        Ok(Tensor::in_caller_host(&pt.name, dtype, &pt.shape, Arc::clone(claim)))
    }
}

impl Sink for HostSink {
    type Buf = HostChunk;

    fn buffer(&mut self, read: &Read, _cx: &mut Context<'_>) -> Option<HostChunk> {
        self.extents.get_mut(read.span)?.chunks.get_mut(read.index)?.take()
    }

    fn landed(
        &mut self,
        plan: &LoadPlan,
        read: &Read,
        buf: HostChunk,
        ready: &mut VecDeque<Tensor>,
    ) -> Result<u64, LoadError> {
        let Some(e) = self.extents.get_mut(read.span) else { return Ok(0) };
        let index = match (&e.memory, buf) {
            // Every chunk of an extent was cut from its own memory.
            (Memory::Arena(a), HostChunk::Arena(c)) => match a.complete(c) {
                Ok(i) => i,
                Err(_) => return Ok(0),
            },
            (Memory::Caller(claim), HostChunk::Caller(c)) => {
                claim.complete(c);
                read.index
            }
            _ => return Ok(0),
        };
        let done = completed_by(plan, &e.span, &mut e.remaining, index, self.chunk);
        let e = &self.extents[read.span];
        for t in done {
            ready.push_back(self.make(plan, e, t)?);
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
        // The prefaulting thread holds arenas: it is stopped before they are let go.
        self.prefault = None;
        self.extents.clear();
        self.claims.clear();
    }
}
