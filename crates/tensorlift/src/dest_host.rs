//! The host destination: reads land in their final memory.
//!
//! Each span gets a page-aligned [`HostArena`] whose byte 0 holds the span's page-aligned
//! file offset, so aligned file offsets land at aligned addresses and O_DIRECT reads go
//! straight into the final memory: there is no staging copy on the CPU path.
//!
//! A gathered slice, a converted tensor or one the file misaligns for its elements lands in
//! an arena like the others, and is then written once, gathered and converted in one pass
//! ([`crate::tensor::produce`]), into the caller's memory or an arena of its own: one chunk
//! sized as loaded, taken from the loader's pool with the spans' arenas (so a loader's next
//! load reuses it, already faulted in) and prefaulted with them. (A load that reads while it
//! plans learns of misaligned tensors once the plan stands: their memory is checked then,
//! and allocated as each is written.) A tensor the caller placed in its own memory
//! ([`crate::place`]) and that needs neither is a span of its own, read straight into its
//! claim of that memory.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};

use tensorlift_format::{Dtype, LoadPlan, PlannedTensor};
use tensorlift_io::{ArenaChunk, Claim, HostArena, HostChunk, PAGE};

use crate::config::Config;
use crate::digest::{DigestSource, Sha256};
use crate::error::{plan_file, ConversionFailure};
use crate::hashing::{Check, Hashed, Hashers, Landed};
use crate::layout::{chunks_to_wait_for, completed_by, Read, Span};
use crate::place::Resolved;
use crate::sink::Sink;
use crate::{LoadError, Tensor};

/// New host memory from which a load first checks that the process can have it (the
/// system's available memory, and its cgroup's headroom).
const MEMORY_CHECK_FROM: u64 = 64 << 20;

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
    /// Which chunks have landed, by index: for a span read before its tensors were known
    /// ([`HostSink::planned`]).
    landed: Vec<bool>,
    /// For a verified load, the check of the whole shard this extent holds.
    check: Option<Check>,
}

/// A landed chunk of an arena, as a hashing thread reads it.
struct ArenaPart(Arc<HostArena>, std::ops::Range<usize>);

impl Landed for ArenaPart {
    fn bytes(&self) -> &[u8] {
        // The chunk has landed (complete), so its bytes are readable.
        self.0.get(self.1.clone()).unwrap_or_default()
    }
}

impl Drop for HostSink {
    fn drop(&mut self) {
        self.stop_hashing();
    }
}

impl HostSink {
    /// Stops the hashing threads and waits for them (see [`Hashers::stop`]).
    fn stop_hashing(&mut self) {
        if let Some(h) = self.hashing.as_mut() {
            h.stop();
        }
        self.hashing = None;
    }

    /// Bytes of shard files whose digest checked out so far.
    pub(crate) fn verified_bytes(&self) -> u64 {
        self.verified_bytes
    }
}

pub(crate) struct HostSink {
    extents: Vec<Extent>,
    /// Each tensor's claim on caller memory, for tensors the caller placed.
    claims: Vec<Option<Arc<Claim>>>,
    /// Which tensors share bytes with another ([`crate::layout::sharing_bytes`]).
    shared: Vec<bool>,
    /// Which tensors share bytes with one the load hands out as a view of the same memory
    /// ([`twins`]).
    lent: Vec<bool>,
    /// For each tensor written into memory of its own ([`copied`]; by plan index, empty when
    /// there are none), that memory, until it is written.
    outputs: Vec<Option<(Arc<HostArena>, ArenaChunk)>>,
    convert_to: Option<Dtype>,
    chunk: usize,
    /// Faults in fresh arenas ahead of the reads, when the load asked for it; its work and
    /// threads until it is started ([`start_prefault`](HostSink::start_prefault)).
    prefault: Option<tensorlift_io::Prefaulter>,
    prefault_work: Option<PrefaultWork>,
    /// For a verified load: each shard hashed as it lands.
    hashing: Option<Hashers<ArenaPart>>,
    verified_bytes: u64,
}

/// Chunks to fault in, (arena, chunk index) each in read order, and the threads to do it.
type PrefaultWork = (Vec<(Arc<HostArena>, usize)>, usize);

impl HostSink {
    #[allow(clippy::too_many_arguments)] // The load's parts, each used once here.
    pub(crate) fn new(
        plan: &LoadPlan,
        copies: &[bool],
        spans: Vec<Span>,
        dests: Vec<Option<Resolved>>,
        cfg: &Config,
        reads: &[Read],
        checks: Option<Vec<Option<(Sha256, DigestSource)>>>,
        stats: &mut crate::LoadStats,
        ready: &mut VecDeque<Tensor>,
    ) -> Result<HostSink, LoadError> {
        let (convert_to, chunk, pages, pool) = (cfg.convert_to, cfg.chunk_size, cfg.huge_pages, &cfg.host_pool);
        let prefault_threads = cfg.prefault_threads();
        // `dests` is empty when the caller placed nothing.
        let mut claims: Vec<Option<Arc<Claim>>> = vec![None; plan.tensors().len()];
        for (claim, d) in claims.iter_mut().zip(dests) {
            if let Some(Resolved::Host(c)) = d {
                *claim = Some(c);
            }
        }
        // Gathered slices, converted tensors and misaligned ones (see `copied`) are written
        // once more, into memory of their own (unless the caller placed them): an arena of
        // one chunk each, sized as loaded, taken from the pool like the spans' and counted
        // with them.
        let (shared, lent) = twins(plan, &claims, convert_to);
        let outputs: Vec<(usize, usize)> =
            own_memory(plan, &spans, &claims, &shared, convert_to).map(|(t, len)| (t, len as usize)).collect();
        // Memory an earlier load left, where it fits a span; the rest of it is given back
        // before anything new is allocated. Solo spans need none: they read into the caller's.
        let lens: Vec<usize> = spans
            .iter()
            // (Saturating: a size sized past the address space by a file is refused below.)
            .map(|s| if s.solo { 0 } else { page_up(s.len() as usize) })
            .chain(outputs.iter().map(|&(_, len)| page_up(len)))
            .collect();
        let mut kept = pool.take_for(&lens);
        // A kept buffer may be larger than its span; only the span's bytes are spared.
        let reused: u64 = kept.iter().zip(&lens).filter(|(k, _)| k.is_some()).map(|(_, &l)| l as u64).sum();
        stats.reused_host_bytes = reused;
        // Refused before anything is allocated where the process cannot fill it.
        let total = lens.iter().fold(0u64, |a, &l| a.saturating_add(l as u64));
        let needed = total.saturating_sub(reused);
        check_memory(plan, needed)?;
        // Huge pages only when asked for (see HugePages::Auto).
        let huge = pages == crate::HugePages::Always;
        // Reused memory keeps whatever pages it had: the choice is reported for new memory.
        stats.huge_pages = (needed > 0).then_some(huge);
        let mut sink = HostSink {
            extents: Vec::with_capacity(spans.len()),
            claims,
            shared,
            lent,
            outputs: Vec::new(),
            convert_to,
            chunk,
            prefault: None,
            prefault_work: None,
            hashing: None,
            verified_bytes: 0,
        };
        let mut span_checks = Vec::new();
        if let Some(checks) = &checks {
            let (c, hashers) = crate::hashing::verify_spans(plan, &spans, reads, checks, false);
            (span_checks, sink.hashing) = (c, Some(hashers));
        }
        let (kept_spans, kept_outputs) = kept.split_at_mut(spans.len());
        // Fresh memory, in the order it is written: each read's chunk, then the outputs of
        // the tensors that chunk completes.
        let mut fresh_spans = Vec::with_capacity(spans.len());
        let mut fresh_outputs: Vec<bool> = Vec::new();
        if !outputs.is_empty() {
            sink.outputs = (0..plan.tensors().len()).map(|_| None).collect();
            fresh_outputs = vec![false; plan.tensors().len()];
        }
        for (&(t, len), kept) in outputs.iter().zip(kept_outputs.iter_mut()) {
            fresh_outputs[t] = kept.is_none();
            let arena =
                HostArena::pooled(pool, kept.take(), len.next_multiple_of(PAGE), len, huge).ok_or_else(|| {
                    LoadError::OutOfMemory {
                        file: plan.shards()[plan.tensors()[t].shard].path.clone(),
                        bytes: len as u64,
                    }
                })?;
            sink.outputs[t] = arena.take_chunks().pop().map(|c| (arena, c));
        }
        for (span, kept) in spans.into_iter().zip(kept_spans.iter_mut()) {
            fresh_spans.push(kept.is_none());
            let len = span.len() as usize;
            // A solo span has one tensor; a span read before planning ended has none yet.
            let claim = span.tensors.first().and_then(|&t| sink.claims.get(t)?.as_ref());
            let (memory, chunks) = match claim.filter(|_| span.solo) {
                Some(claim) => {
                    let chunks: Vec<_> =
                        claim.take_chunks(chunk).into_iter().map(|c| Some(HostChunk::Caller(c))).collect();
                    (Memory::Caller(Arc::clone(claim)), chunks)
                }
                None => {
                    let arena = HostArena::pooled(pool, kept.take(), len.next_multiple_of(PAGE), chunk, huge)
                        .ok_or_else(|| LoadError::OutOfMemory {
                            file: plan.shards()[span.shard].path.clone(),
                            bytes: len as u64,
                        })?;
                    // New memory of base pages for a cached shard (not reused, not a small
                    // heap block): filled by copying its pages in, where userfaultfd allows
                    // it (not prefaulted then).
                    if arena.can_fill_by_copy() && copies.get(span.shard).copied().unwrap_or(false) {
                        if let Err(why) = arena.fill_by_copy() {
                            stats.fill_by_copy_refused.get_or_insert(why);
                        }
                    }
                    let chunks = arena.take_chunks().into_iter().map(|c| Some(HostChunk::Arena(c))).collect();
                    (Memory::Arena(arena), chunks)
                }
            };
            let mut now = Vec::new();
            let remaining = chunks_to_wait_for(plan, &span, chunk, |t| now.push(t));
            let landed = vec![false; chunks.len()];
            let check = span_checks.get_mut(sink.extents.len()).and_then(Option::take);
            sink.extents.push(Extent { span, memory, chunks, remaining, landed, check });
            sink.deliver(plan, sink.extents.len() - 1, now, ready)?;
        }
        if prefault_threads > 0 {
            let mut work = Vec::new();
            // The tensors each chunk of a span completes, by the chunk's index.
            let mut completes: Vec<Vec<Vec<usize>>> = Vec::new();
            if !fresh_outputs.is_empty() {
                completes = sink
                    .extents
                    .iter()
                    .map(|e| {
                        let mut by_chunk = vec![Vec::new(); e.chunks.len()];
                        for &t in &e.span.tensors {
                            let r = e.span.range_of(&plan.tensors()[t]);
                            if fresh_outputs[t] && !r.is_empty() {
                                let last = ((r.end - 1) / chunk as u64) as usize;
                                if let Some(list) = by_chunk.get_mut(last) {
                                    list.push(t);
                                }
                            }
                        }
                        by_chunk
                    })
                    .collect();
            }
            for r in reads {
                if let (Some(true), Some(Memory::Arena(a))) =
                    (fresh_spans.get(r.span), sink.extents.get(r.span).map(|e| &e.memory))
                {
                    work.push((Arc::clone(a), r.index));
                }
                for &t in completes.get(r.span).and_then(|c| c.get(r.index)).into_iter().flatten() {
                    if let (true, Some((a, _))) = (fresh_outputs[t], &sink.outputs[t]) {
                        work.push((Arc::clone(a), 0));
                    }
                }
            }
            sink.prefault_work = Some((work, prefault_threads));
        }
        Ok(sink)
    }

    /// The tensors of spans that were read before planning ended: `spans` are the plan's
    /// ([`crate::layout::spans`]), each within the span this sink was made with for its
    /// shard ([`crate::layout::shard_spans`], one a shard, in order). Tensors whose chunks
    /// have all landed go to `ready`; the others as their chunks land.
    pub(crate) fn planned(
        &mut self,
        plan: &LoadPlan,
        spans: Vec<Span>,
        ready: &mut VecDeque<Tensor>,
    ) -> Result<(), LoadError> {
        let chunk = self.chunk;
        (self.shared, self.lent) = twins(plan, &self.claims, self.convert_to);
        // Tensors the file misaligns are written into memory of their own (`copied`), which
        // the start could not plan: checked now, with the memory the reads still have to
        // touch, as HostSink::new checks a planned load's.
        let copies = own_memory(plan, &spans, &self.claims, &self.shared, self.convert_to)
            .fold(0u64, |a, (_, len)| a.saturating_add(len));
        if copies > 0 {
            let unlanded = self.extents.iter().fold(0u64, |a, e| {
                let left = e.landed.iter().filter(|&&l| !l).count() as u64;
                a.saturating_add(left.saturating_mul(chunk as u64).min(e.span.len()))
            });
            check_memory(plan, copies.saturating_add(unlanded))?;
        }
        for span in spans {
            let e = match self.extents.get_mut(span.shard) {
                Some(e) if e.span.shard == span.shard && e.span.base == span.base && span.end <= e.span.end => e,
                // Both come from the same header bytes: a mismatch is a bug.
                _ => return Err(LoadError::PlanningFailed),
            };
            e.remaining = span
                .tensors
                .iter()
                .map(|&t| {
                    let covering = crate::layout::chunks_covering(&span.range_of(&plan.tensors()[t]), chunk);
                    covering.filter(|&c| !e.landed.get(c).copied().unwrap_or(false)).count()
                })
                .collect();
            e.span.tensors = span.tensors;
            let now = e.span.tensors.iter().zip(&e.remaining).filter(|(_, &left)| left == 0).map(|(&t, _)| t).collect();
            self.deliver(plan, span.shard, now, ready)?;
        }
        Ok(())
    }

    /// Starts faulting in fresh memory ahead of the reads (once; nothing when the load
    /// asked for none). A load that reads before its headers are validated starts it once
    /// they are.
    pub(crate) fn start_prefault(&mut self) {
        if let Some((work, threads)) = self.prefault_work.take() {
            self.prefault = tensorlift_io::Prefaulter::start(work, threads);
        }
    }

    /// Why an arena registered to be filled by copies stopped being filled so, if one did.
    pub(crate) fn fill_stopped(&self) -> Option<String> {
        self.extents.iter().find_map(|e| match &e.memory {
            Memory::Arena(a) => a.fill_stopped().map(str::to_owned),
            Memory::Caller(_) => None,
        })
    }

    /// Bytes that landed by copying cached pages in, over every arena.
    pub(crate) fn copied_bytes(&self) -> u64 {
        self.extents
            .iter()
            .map(|e| match &e.memory {
                Memory::Arena(a) => a.copied_bytes(),
                Memory::Caller(_) => 0,
            })
            .sum()
    }

    /// Stops the prefaulting threads (every chunk has landed: they have nothing left) and
    /// returns the bytes they faulted in, and why they stopped early if they did.
    pub(crate) fn finish_prefault(&mut self) -> (u64, Option<String>) {
        self.prefault_work = None;
        match self.prefault.take() {
            Some(mut p) => {
                p.stop();
                (p.bytes(), p.failure())
            }
            None => (0, None),
        }
    }

    /// Makes `tensors` of extent `k`, whose bytes have all landed, and sends them to `ready`
    /// (each with its memory of its own, if it has one: see [`make`](Self::make)).
    fn deliver(
        &mut self,
        plan: &LoadPlan,
        k: usize,
        tensors: Vec<usize>,
        ready: &mut VecDeque<Tensor>,
    ) -> Result<(), LoadError> {
        for t in tensors {
            let out = self.outputs.get_mut(t).and_then(Option::take);
            let tensor = self.make(plan, &self.extents[k], t, out)?;
            match &mut self.extents[k].check {
                // Held until the whole shard checked out.
                Some(check) => check.held.push(tensor),
                None => ready.push_back(tensor),
            }
        }
        Ok(())
    }

    /// Tensor `t`, whose bytes have all landed in the extent's memory: a view of them, or,
    /// for a gathered slice, a converted or a misaligned tensor ([`copied`]), its bytes as
    /// loaded in memory of its own;
    /// for a tensor in caller memory, that memory (written by the reads, or here).
    /// `out`: the memory of its own it is written into, when it needs it (taken from
    /// `outputs`).
    fn make(
        &self,
        plan: &LoadPlan,
        e: &Extent,
        t: usize,
        out: Option<(Arc<HostArena>, ArenaChunk)>,
    ) -> Result<Tensor, LoadError> {
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
        let shared = self.shared.get(t).copied().unwrap_or(false);
        let Some(claim) = self.claims.get(t).and_then(Option::as_ref) else {
            if !copied(pt, self.convert_to, shared) {
                return Ok(Tensor::host(&pt.name, pt.dtype, &pt.shape, Arc::clone(arena), range).sharing(shared));
            }
            let lent = self.lent.get(t).copied().unwrap_or(false);
            let stored = stored_bytes(plan, pt, arena, range, lent)?;
            let stored = &stored[..];
            let Some((memory, mut chunk)) = out else { return Tensor::produced(plan, pt, dtype, stored) };
            let len = crate::place::loaded_as(pt, Some(dtype)).1 as usize;
            let written = chunk.as_mut_slice().get_mut(..len).map(|o| crate::tensor::produce(pt, dtype, stored, o));
            let converted = |source: ConversionFailure| LoadError::Convert {
                file: plan.shards()[pt.shard].path.clone(),
                tensor: pt.name.clone(),
                to: dtype,
                source,
            };
            match written {
                Some(r) => r.map_err(|e| converted(e.into()))?,
                None => {
                    return Err(converted(ConversionFailure::Memory(format!(
                        "its memory holds fewer than {len} bytes"
                    ))))
                }
            }
            if memory.complete(chunk).is_err() {
                return Err(converted(ConversionFailure::Memory("its memory is another arena's".into())));
            }
            return Ok(Tensor::host(&pt.name, dtype, &pt.shape, memory, 0..len));
        };
        let lent = self.lent.get(t).copied().unwrap_or(false);
        let stored = stored_bytes(plan, pt, arena, range, lent)?;
        let mut produced = Ok(());
        if !claim.write(|out| produced = crate::tensor::produce(pt, dtype, &stored, out)) {
            return Err(LoadError::Destination {
                file: plan.shards()[pt.shard].path.clone(),
                tensor: pt.name.clone(),
                message: "its memory was already being written".into(),
            });
        }
        produced.map_err(|e| LoadError::Convert {
            file: plan.shards()[pt.shard].path.clone(),
            tensor: pt.name.clone(),
            to: dtype,
            source: e.into(),
        })?;
        Ok(Tensor::in_caller_host(&pt.name, dtype, &pt.shape, Arc::clone(claim)))
    }
}

/// Which tensors share bytes with another ([`crate::layout::sharing_bytes`]), and which
/// share them with one the load hands out as a view of that memory (not placed by the
/// caller, not [`copied`]), to a consumer that may write it.
fn twins(plan: &LoadPlan, claims: &[Option<Arc<Claim>>], convert_to: Option<Dtype>) -> (Vec<bool>, Vec<bool>) {
    let runs = crate::layout::sharing_runs(plan);
    let mut viewed = vec![false; runs.iter().flatten().max().map_or(0, |&m| m + 1)];
    for (t, run) in runs.iter().enumerate() {
        let placed = claims.get(t).is_some_and(Option::is_some);
        if let Some(r) = run.filter(|_| !placed && !copied(&plan.tensors()[t], convert_to, true)) {
            viewed[r] = true;
        }
    }
    let lent = runs.iter().map(|r| r.is_some_and(|r| viewed[r])).collect();
    (runs.iter().map(Option::is_some).collect(), lent)
}

/// Tensor `pt`'s stored bytes, `range` of `arena`, to be written once more (gathered,
/// converted, aligned): a view of them, or, for a tied twin of one handed out as a view
/// (`lent`), whose bytes a consumer may write meanwhile (the Python binding's torch
/// tensors), a copy made by the kernel ([`crate::tensor::copy_host`]).
fn stored_bytes<'a>(
    plan: &LoadPlan,
    pt: &PlannedTensor,
    arena: &'a HostArena,
    range: std::ops::Range<usize>,
    lent: bool,
) -> Result<std::borrow::Cow<'a, [u8]>, LoadError> {
    if !lent {
        return Ok(arena.get(range).unwrap_or_default().into());
    }
    let file = || plan.shards()[pt.shard].path.clone();
    let mut out = Vec::new();
    if out.try_reserve_exact(range.len()).is_err() {
        return Err(LoadError::OutOfMemory { file: file(), bytes: range.len() as u64 });
    }
    out.resize(range.len(), 0);
    crate::tensor::copy_host(|d| arena.copy_out(range.clone(), d), &mut out, || arena.get(range.clone())).map_err(
        |source| {
            // The bytes are the file's range, as loaded.
            let source =
                tensorlift_io::IoError::Read { file: file(), offset: pt.file_range.start, len: pt.len(), source };
            LoadError::Read { file: file(), tensor: pt.name.clone(), source }
        },
    )?;
    Ok(out.into())
}

/// Whether tensor `pt` is written once more into memory of its own rather than handed out
/// where its read landed: a gathered slice, a converted tensor, or one the file places at an
/// offset its element's size does not divide (reads mirror the file from page-aligned
/// offsets; a writer other than the reference's, which aligns every tensor, or a legacy
/// PyTorch file may put a float32 at an odd one), which is copied aligned, as the
/// reference's reads are. Tied twins of a PyTorch file (`shared`) keep sharing their
/// memory, as torch.load's do.
fn copied(pt: &PlannedTensor, convert_to: Option<Dtype>, shared: bool) -> bool {
    let (dtype, _) = crate::place::loaded_as(pt, convert_to);
    let align = (pt.dtype.bitsize() / 8).clamp(1, 8) as u64;
    pt.gather.is_some() || dtype != pt.dtype || (pt.file_range.start % align != 0 && !shared)
}

/// The tensors of `spans` written into memory of their own ([`copied`]; not those the
/// caller placed), with their bytes as loaded.
fn own_memory<'a>(
    plan: &'a LoadPlan,
    spans: &'a [Span],
    claims: &'a [Option<Arc<Claim>>],
    shared: &'a [bool],
    convert_to: Option<Dtype>,
) -> impl Iterator<Item = (usize, u64)> + 'a {
    spans.iter().flat_map(|s| &s.tensors).filter_map(move |&t| {
        let pt = &plan.tensors()[t];
        let len = crate::place::loaded_as(pt, convert_to).1;
        let placed = claims.get(t).is_some_and(Option::is_some);
        let shared = shared.get(t).copied().unwrap_or(false);
        (!placed && len > 0 && copied(pt, convert_to, shared)).then_some((t, len))
    })
}

/// Refuses a load whose `needed` bytes of new host memory are more than the process can
/// fill now (memory is committed when touched: it would be killed midway). Not asked for a
/// small load, which reading the system's and the cgroup's figures would cost more than (a
/// file's tensors read one at a time).
fn check_memory(plan: &LoadPlan, needed: u64) -> Result<(), LoadError> {
    if needed < MEMORY_CHECK_FROM {
        return Ok(());
    }
    match tensorlift_io::host_memory_available() {
        Some(available) if needed > available => {
            Err(LoadError::HostMemory { file: plan_file(plan), needed, available })
        }
        _ => Ok(()),
    }
}

impl Sink for HostSink {
    type Buf = HostChunk;

    fn buffer(
        &mut self,
        _plan: &LoadPlan,
        read: &Read,
        _idle: bool,
        _cx: &mut Context<'_>,
    ) -> Result<Option<HostChunk>, LoadError> {
        Ok(self.extents.get_mut(read.span).and_then(|e| e.chunks.get_mut(read.index)?.take()))
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
                // Its pages could not be made readable (see HostArena::complete).
                Err(c) => {
                    return Err(LoadError::OutOfMemory {
                        file: plan.shards()[e.span.shard].path.clone(),
                        bytes: c.range().len() as u64,
                    })
                }
            },
            (Memory::Caller(claim), HostChunk::Caller(c)) => {
                claim.complete(c);
                read.index
            }
            _ => return Ok(0),
        };
        if let Some(landed) = e.landed.get_mut(index) {
            *landed = true;
        }
        let done = completed_by(plan, &e.span, &mut e.remaining, index, self.chunk);
        let part = match (&e.check, &e.memory) {
            (Some(_), Memory::Arena(a)) => {
                let start = index * self.chunk;
                Some(ArenaPart(Arc::clone(a), start..start + read.len))
            }
            _ => None,
        };
        self.deliver(plan, read.span, done, ready)?;
        if let (Some(part), Some(h)) = (part, self.hashing.as_mut()) {
            h.send(read.span, index, part);
        }
        Ok(read.len as u64)
    }

    fn poll_progress(
        &mut self,
        cx: &mut Context<'_>,
        plan: &LoadPlan,
        ready: &mut VecDeque<Tensor>,
    ) -> Poll<Result<u64, LoadError>> {
        let Some(h) = self.hashing.as_mut() else { return Poll::Ready(Ok(0)) };
        if !h.busy() {
            return Poll::Ready(Ok(0));
        }
        let mut any = false;
        for done in h.poll(cx) {
            let (k, actual, header) = match done {
                Hashed::Shard { span, digest, header } => (span, digest, header),
                Hashed::Failed { span } => {
                    let file =
                        self.extents.get(span).map(|e| plan.shards()[e.span.shard].path.clone()).unwrap_or_default();
                    return Poll::Ready(Err(LoadError::HashingFailed { file }));
                }
                Hashed::Chunk { .. } => continue,
            };
            any = true;
            let Some(e) = self.extents.get_mut(k) else { continue };
            let Some(check) = e.check.take() else { continue };
            let shard = &plan.shards()[e.span.shard];
            match check.settle(plan.root(), shard, actual, header) {
                Ok(held) => ready.extend(held),
                Err(e) => return Poll::Ready(Err(e)),
            }
            self.verified_bytes += shard.file_len;
        }
        if any {
            Poll::Ready(Ok(0))
        } else {
            Poll::Pending
        }
    }

    fn busy(&self) -> bool {
        self.hashing.as_ref().is_some_and(Hashers::busy)
    }

    fn abort(&mut self) {
        self.stop_hashing();
        // The prefaulting thread holds arenas: it is stopped before they are let go.
        self.prefault = None;
        self.prefault_work = None;
        self.extents.clear();
        self.claims.clear();
        self.outputs.clear();
    }
}

/// `len` rounded up to whole pages, or `usize::MAX` past the address space (which no
/// memory check lets through).
fn page_up(len: usize) -> usize {
    len.checked_next_multiple_of(PAGE).unwrap_or(usize::MAX)
}
