//! The layout of a load, computed from the plan alone (no I/O): which file bytes are read,
//! in what order, in which chunks, and where each tensor lands on a device.

use std::ops::Range;

use tensorlift_format::{LoadPlan, PlannedTensor};
use tensorlift_io::PAGE;

/// Gaps of unselected tensors up to this size are read through rather than splitting a span.
pub(crate) const MAX_GAP: u64 = 1 << 20;
/// The longest pitch a 2D copy takes (`CU_DEVICE_ATTRIBUTE_MAX_PITCH` is 2^31 - 1 on every
/// CUDA device); rows farther apart are copied one by one.
pub(crate) const MAX_PITCH: u64 = (1 << 31) - 1;
/// Every tensor on a device starts at a multiple of this (what CUDA kernels and cuBLAS expect).
pub(crate) const DEVICE_ALIGN: u64 = 256;

/// A run of selected tensors in one shard, read as one piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Span {
    pub shard: usize,
    /// Page-aligned file offset where the span's reads start.
    pub base: u64,
    /// End of the last tensor (file offset).
    pub end: u64,
    /// Tensors (indices into the plan), in file order.
    pub tensors: Vec<usize>,
    /// A tensor read on its own, from its first byte (into caller memory): `base` is that
    /// byte, not a page boundary.
    pub solo: bool,
}

impl Span {
    /// Bytes from `base` to `end`.
    pub fn len(&self) -> u64 {
        self.end - self.base
    }

    /// A tensor's bytes relative to `base`.
    pub fn range_of(&self, t: &PlannedTensor) -> Range<u64> {
        t.file_range.start - self.base..t.file_range.end - self.base
    }
}

/// Groups the plan's tensors into spans: runs within a shard separated by small gaps;
/// tensors for which `solo` holds are spans of their own, from their first byte.
///
/// A tensor whose bytes overlap the span's (a PyTorch file's tied weights, or views of one
/// storage) joins it as long as the tensors' starts and ends both stay in order, so those
/// bytes are read once (a view that ends inside the span starts one of its own, and is
/// read again); the chunk bookkeeping ([`chunks_covering`], and the look-ups by
/// end then start over a span's tensors) relies on that order. A safetensors file's
/// tensors never overlap.
pub(crate) fn spans(plan: &LoadPlan, solo: impl Fn(usize) -> bool) -> Vec<Span> {
    let mut out: Vec<Span> = Vec::new();
    for (i, t) in plan.tensors().iter().enumerate() {
        let alone = solo(i);
        match out.last_mut() {
            Some(e)
                if !alone
                    && !e.solo
                    && e.shard == t.shard
                    && t.file_range.end >= e.end
                    && t.file_range.start.saturating_sub(e.end) <= MAX_GAP
                    && e.tensors.last().is_none_or(|&l| t.file_range.start >= plan.tensors()[l].file_range.start) =>
            {
                e.end = e.end.max(t.file_range.end);
                e.tensors.push(i);
            }
            _ => out.push(Span {
                shard: t.shard,
                base: if alone { t.file_range.start } else { t.file_range.start - t.file_range.start % PAGE as u64 },
                end: t.file_range.end,
                tensors: vec![i],
                solo: alone,
            }),
        }
    }
    out
}

/// Which of the plan's tensors share bytes with another of its tensors (a PyTorch file's
/// tied weights, views of one storage: file ranges that overlap in one shard), whose views
/// then share memory. Tensors chained by overlaps all count, even two that do not overlap
/// each other. A safetensors file's tensors never overlap; empty tensors share nothing.
pub(crate) fn sharing_bytes(plan: &LoadPlan) -> Vec<bool> {
    sharing_runs(plan).iter().map(Option::is_some).collect()
}

/// [`sharing_bytes`], naming each sharing tensor's run (tensors chained by overlaps): runs
/// are numbered from 0.
pub(crate) fn sharing_runs(plan: &LoadPlan) -> Vec<Option<usize>> {
    let ts = plan.tensors();
    let mut runs = vec![None; ts.len()];
    let mut order: Vec<usize> = (0..ts.len()).filter(|&i| !ts[i].file_range.is_empty()).collect();
    order.sort_unstable_by_key(|&i| (ts[i].shard, ts[i].file_range.start));
    // Runs of overlapping ranges, in order of their starts: a run of more than one shares.
    let (mut run, mut run_end, mut next): (Vec<usize>, u64, usize) = (Vec::new(), 0, 0);
    let mut close = |run: &mut Vec<usize>| {
        if run.len() > 1 {
            run.iter().for_each(|&r| runs[r] = Some(next));
            next += 1;
        }
        run.clear();
    };
    for i in order {
        let t = &ts[i];
        let joins = run.last().is_some_and(|&l| ts[l].shard == t.shard && t.file_range.start < run_end);
        if !joins {
            close(&mut run);
            run_end = 0;
        }
        run.push(i);
        run_end = run_end.max(t.file_range.end);
    }
    close(&mut run);
    runs
}

/// The spans of a plan whose headers are not parsed yet ([`LoadPlan::unparsed`]): each
/// shard's whole data section, from the page its header ends in to the end of the file.
/// A validated header's tensors cover exactly that (contiguous from its end, ending at the
/// file's), so these are the spans [`spans`] finds once the tensors are known, less their
/// tensors; a shard with no tensors has a span here and none there.
pub(crate) fn shard_spans(plan: &LoadPlan) -> Vec<Span> {
    plan.shards()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let start = s.data_start().min(s.file_len);
            Span { shard: i, base: start - start % PAGE as u64, end: s.file_len, tensors: Vec::new(), solo: false }
        })
        .collect()
}

/// Every shard the plan takes a tensor from (and every shard with no tensor at all) whole,
/// from its first byte to its last, with all its tensors: what a verified load reads, so
/// that the bytes it hashes are the file's own (a plan narrowed to a few tensors reads only
/// their shards). A span's tensors are
/// counted down chunk by chunk in file order ([`completed_by`]), which tensors that share
/// bytes (views of one PyTorch storage) break: `Err(shard)` names the first such shard.
pub(crate) fn whole_files(plan: &LoadPlan) -> Result<Vec<Span>, usize> {
    let mut spans: Vec<Span> = plan
        .shards()
        .iter()
        .enumerate()
        .map(|(i, s)| Span { shard: i, base: 0, end: s.file_len, tensors: Vec::new(), solo: false })
        .collect();
    // The plan's tensors are by shard, then offset.
    for (t, pt) in plan.tensors().iter().enumerate() {
        let span = &mut spans[pt.shard];
        if let Some(&prev) = span.tensors.last() {
            if pt.file_range.start < plan.tensors()[prev].file_range.end {
                return Err(pt.shard);
            }
        }
        span.tensors.push(t);
    }
    let read = verified_shards(plan);
    spans.retain(|s| read[s.shard]);
    Ok(spans)
}

/// The shards a verified load of `plan` reads whole, by shard: those it takes a tensor
/// from, and those whose header lists no tensor at all (their header alone: otherwise a
/// file emptied to `{}` would load, as verified, nothing).
pub(crate) fn verified_shards(plan: &LoadPlan) -> Vec<bool> {
    let mut read: Vec<bool> = plan.shards().iter().map(|s| s.tensor_count == 0).collect();
    for t in plan.tensors() {
        read[t.shard] = true;
    }
    read
}

/// One read: chunk `index` of span `span`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Read {
    pub span: usize,
    pub shard: usize,
    pub index: usize,
    pub file_offset: u64,
    pub len: usize,
}

/// Every span cut into chunks of `chunk` bytes (the last one shorter), ordered so that the
/// shards of a window of `window` shards are read round-robin (several files at once) and
/// windows one after another (open files stay bounded). The list is sized by the file (a
/// header may claim exabytes of a sparse file, or a store an object's size): allocated
/// fallibly, `Err` with the bytes it needed where it cannot be had.
pub(crate) fn reads(spans: &[Span], chunk: usize, window: usize) -> Result<Vec<Read>, u64> {
    let needed = reads_bytes(spans, chunk);
    let chunk = chunk.max(1) as u64;
    let counts: Vec<u64> = spans.iter().map(|s| s.len().div_ceil(chunk)).collect();
    let total = usize::try_from(counts.iter().fold(0u64, |a, &n| a.saturating_add(n))).map_err(|_| needed)?;
    let mut by_shard: Vec<(usize, Vec<Read>)> = Vec::new();
    for (si, (s, &n)) in spans.iter().zip(&counts).enumerate() {
        let reads = (0..n).map(|k| Read {
            span: si,
            shard: s.shard,
            index: k as usize,
            file_offset: s.base + k * chunk,
            len: (s.len() - k * chunk).min(chunk) as usize,
        });
        if !matches!(by_shard.last(), Some((shard, _)) if *shard == s.shard) {
            by_shard.push((s.shard, Vec::new()));
        }
        if let Some((_, list)) = by_shard.last_mut() {
            list.try_reserve_exact(n as usize).map_err(|_| needed)?;
            list.extend(reads);
        }
    }
    let mut out = Vec::new();
    out.try_reserve_exact(total).map_err(|_| needed)?;
    for group in by_shard.chunks(window.max(1)) {
        let mut cursors = vec![0usize; group.len()];
        loop {
            let mut any = false;
            for (g, (_, list)) in group.iter().enumerate() {
                if let Some(r) = list.get(cursors[g]) {
                    out.push(*r);
                    cursors[g] += 1;
                    any = true;
                }
            }
            if !any {
                break;
            }
        }
    }
    Ok(out)
}

/// The bytes of [`reads`]' list (saturating): known before it is made.
pub(crate) fn reads_bytes(spans: &[Span], chunk: usize) -> u64 {
    let chunk = chunk.max(1) as u64;
    let entries = spans.iter().fold(0u64, |a, s| a.saturating_add(s.len().div_ceil(chunk)));
    entries.saturating_mul(std::mem::size_of::<Read>() as u64)
}

/// Indices of the chunks of `chunk` bytes that overlap `range` (relative to the span).
pub(crate) fn chunks_covering(range: &Range<u64>, chunk: usize) -> Range<usize> {
    if range.is_empty() {
        return 0..0;
    }
    let chunk = chunk.max(1) as u64;
    (range.start / chunk) as usize..range.end.div_ceil(chunk) as usize
}

/// How [`device_layout`] places a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// Not in this allocation.
    No,
    /// Its bytes as loaded, mirroring the file where it can.
    AsLoaded,
    /// This many bytes (a converted tensor's), at the next aligned offset.
    Packed(u64),
}

/// Where each selected tensor lands in one device allocation: at a multiple of
/// [`DEVICE_ALIGN`], mirroring the file (the gap between two tensors kept) wherever that
/// keeps the alignment, so that runs of such tensors are one copy. Returns the offset of
/// each plan tensor (`None` for tensors not selected, or placed [`Place::No`]) and the
/// allocation's length; `None` where that length does not fit in a `u64` (sizes come from
/// the files: views of one storage placed apart, or tensors widened by a conversion, can
/// add up past it).
pub(crate) fn device_layout(
    plan: &LoadPlan,
    spans: &[Span],
    place: impl Fn(usize) -> Place,
) -> Option<(Vec<Option<u64>>, u64)> {
    let mut at = vec![None; plan.tensors().len()];
    let mut end = 0u64;
    // The tensor placed last as loaded, and its offset.
    let mut prev: Option<(&PlannedTensor, u64)> = None;
    for s in spans {
        for &i in &s.tensors {
            let t = &plan.tensors()[i];
            let aligned = end.checked_next_multiple_of(DEVICE_ALIGN)?;
            let len = match place(i) {
                Place::No => continue,
                Place::Packed(len) => {
                    at[i] = Some(aligned);
                    end = aligned.checked_add(len)?;
                    prev = None;
                    continue;
                }
                Place::AsLoaded => t.len(),
            };
            let offset = match prev {
                // A gathered slice is packed: its place has nothing to do with its file range.
                Some((p, _)) if p.gather.is_some() || t.gather.is_some() => aligned,
                // The same bytes as the tensor before (a tied weight): the same place.
                Some((p, p_at)) if p.shard == t.shard && p.file_range == t.file_range => {
                    at[i] = Some(p_at);
                    continue;
                }
                Some((p, _)) if p.shard == t.shard && t.file_range.start >= p.file_range.end => {
                    let gap = t.file_range.start - p.file_range.end;
                    match end.checked_add(gap) {
                        Some(m) if m % DEVICE_ALIGN == 0 && gap < DEVICE_ALIGN.max(MAX_GAP.min(64 << 10)) => m,
                        _ => aligned,
                    }
                }
                _ => aligned,
            };
            at[i] = Some(offset);
            end = offset.checked_add(len)?;
            prev = Some((t, offset));
        }
    }
    Some((at, end))
}

/// One copy from a chunk to the device: `rows` rows of `len` bytes, row `k` from
/// `src + k * src_pitch` in the chunk to `dst + k * dst_pitch` in the device allocation
/// (one row: a plain copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub src: usize,
    pub dst: u64,
    pub len: usize,
    pub rows: usize,
    pub src_pitch: usize,
    pub dst_pitch: u64,
}

impl Piece {
    fn flat(src: usize, dst: u64, len: usize) -> Piece {
        Piece { src, dst, len, rows: 1, src_pitch: len, dst_pitch: len as u64 }
    }

    /// Whether `self` already copies every byte of the single row `p`, to the same place.
    fn covers(&self, p: &Piece) -> bool {
        self.rows == 1
            && p.rows == 1
            && p.src >= self.src
            && p.src + p.len <= self.src + self.len
            && p.dst.checked_sub(self.dst) == Some((p.src - self.src) as u64)
    }

    /// Appends `p` to `self` if it continues it: right after a single row on both sides (a
    /// longer row), or as one more row of the same length at the same pitches.
    fn absorb(&mut self, p: Piece) -> bool {
        if self.rows == 1 && self.src + self.len == p.src && self.dst + self.len as u64 == p.dst {
            self.len += p.len;
            self.src_pitch = self.len;
            self.dst_pitch = self.len as u64;
            return true;
        }
        if p.len != self.len {
            return false;
        }
        let last_src = self.src + (self.rows - 1) * self.src_pitch;
        let last_dst = self.dst + (self.rows as u64 - 1) * self.dst_pitch;
        let (Some(sp), Some(dp)) = (p.src.checked_sub(last_src), p.dst.checked_sub(last_dst)) else { return false };
        // Rows must not overlap (what a 2D copy requires of its pitches), and the driver
        // takes pitches up to its maximum (2^31 - 1 bytes on every CUDA device).
        if sp < self.len || dp < self.len as u64 || sp > MAX_PITCH as usize || dp > MAX_PITCH {
            return false;
        }
        if self.rows == 1 {
            (self.src_pitch, self.dst_pitch) = (sp, dp);
        } else if (sp, dp) != (self.src_pitch, self.dst_pitch) {
            return false;
        }
        self.rows += 1;
        true
    }
}

/// The copies that move the bytes of `read` to their tensors' places, each with the target
/// (allocation) `place` gives its tensor, with the offset there (`None`: not copied): one
/// per tensor part (or, for a gathered slice, per run) in the chunk, merged where they are
/// contiguous on both sides in the same target, and rows of equal length at equal pitches
/// merged into one 2D copy.
pub(crate) fn pieces(
    plan: &LoadPlan,
    span: &Span,
    place: impl Fn(usize) -> Option<(usize, u64)>,
    read: &Read,
) -> Vec<(usize, Piece)> {
    let chunk = read.file_offset..read.file_offset + read.len as u64;
    let mut out: Vec<(usize, Piece)> = Vec::new();
    let mut push = |target: usize, p: Piece| {
        // A copy the last one already makes (a tied weight, placed with its twin) is not
        // made again.
        if out.last().is_some_and(|(t, q)| *t == target && q.covers(&p)) {
            return;
        }
        if !out.last_mut().is_some_and(|(t, q)| *t == target && q.absorb(p)) {
            out.push((target, p));
        }
    };
    // The first tensor ending after the chunk starts.
    let first = span.tensors.partition_point(|&i| plan.tensors()[i].file_range.end <= chunk.start);
    for &i in &span.tensors[first..] {
        let t = &plan.tensors()[i];
        if t.file_range.start >= chunk.end {
            break;
        }
        let (Some((target, place)), false) = (place(i), t.is_empty()) else { continue };
        let from = t.file_range.start.max(chunk.start);
        let to = t.file_range.end.min(chunk.end);
        let Some(g) = &t.gather else {
            let p =
                Piece::flat((from - chunk.start) as usize, place + (from - t.file_range.start), (to - from) as usize);
            push(target, p);
            continue;
        };
        // Covering offsets of this chunk's part of the tensor, and the runs in it.
        let (lo, hi) = (from - t.file_range.start, to - t.file_range.start);
        for r in g.first_run_ending_after(lo)..g.runs() {
            let at = g.offset(r);
            if at >= hi {
                break;
            }
            let (s, e) = (at.max(lo), (at + g.run).min(hi));
            let src = (t.file_range.start + s - chunk.start) as usize;
            push(target, Piece::flat(src, place + r as u64 * g.run + (s - at), (e - s) as usize));
        }
    }
    out
}

/// How many chunks of `chunk` bytes each tensor of `span` waits for; the tensors that wait
/// for none (no bytes) are passed to `ready_now`, in order.
pub(crate) fn chunks_to_wait_for(
    plan: &LoadPlan,
    span: &Span,
    chunk: usize,
    mut ready_now: impl FnMut(usize),
) -> Vec<usize> {
    let remaining: Vec<usize> =
        span.tensors.iter().map(|&t| chunks_covering(&span.range_of(&plan.tensors()[t]), chunk).len()).collect();
    for (k, &t) in span.tensors.iter().enumerate() {
        if remaining[k] == 0 {
            ready_now(t);
        }
    }
    remaining
}

/// The tensors of `span` that chunk `index` (of `chunk` bytes) completes, given how many
/// chunks each still waits for (decremented here).
pub(crate) fn completed_by(
    plan: &LoadPlan,
    span: &Span,
    remaining: &mut [usize],
    index: usize,
    chunk: usize,
) -> Vec<usize> {
    let start = (index * chunk) as u64;
    let end = start + chunk as u64;
    let first = span.tensors.partition_point(|&t| span.range_of(&plan.tensors()[t]).end <= start);
    let mut done = Vec::new();
    for (&t, left) in span.tensors[first..].iter().zip(&mut remaining[first..]) {
        let r = span.range_of(&plan.tensors()[t]);
        if r.start >= end {
            break;
        }
        if !r.is_empty() && chunks_covering(&r, chunk).contains(&index) {
            *left -= 1;
            if *left == 0 {
                done.push(t);
            }
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use tensorlift_format::{Dtype, FileIdentity, Header, Shard, TensorInfo};

    /// A plan of one shard whose tensors have these lengths, back to back from `data_start`.
    fn plan(data_start: u64, lens: &[u64]) -> LoadPlan {
        let mut tensors = Vec::new();
        let mut off = 0;
        for (i, &len) in lens.iter().enumerate() {
            tensors.push(TensorInfo {
                name: format!("t{i}"),
                dtype: Dtype::U8,
                shape: vec![len as usize],
                data_offsets: (off, off + len),
            });
            off += len;
        }
        let header = Header { header_len: data_start - 8, metadata: None, tensors };
        let file_len = data_start + off;
        let identity = FileIdentity { dev: 1, ino: 1, len: file_len, modified_ns: 0, changed_ns: 0 };
        let shard = Shard::from_header(PathBuf::from("/m/a.safetensors"), "a.safetensors".into(), identity, 0, header);
        LoadPlan::assemble(Path::new("/m"), PathBuf::from("/m"), None, vec![shard]).unwrap()
    }

    /// A plan of one shard whose tensors have these byte ranges of the data section (which
    /// a PyTorch file's views of one storage may make overlap), in order.
    fn plan_of_ranges(data_start: u64, ranges: &[(u64, u64)]) -> LoadPlan {
        let tensors = ranges
            .iter()
            .enumerate()
            .map(|(i, &(a, b))| TensorInfo {
                name: format!("t{i}"),
                dtype: Dtype::U8,
                shape: vec![(b - a) as usize],
                data_offsets: (a, b),
            })
            .collect();
        let header = Header { header_len: data_start - 8, metadata: None, tensors };
        let file_len = data_start + ranges.iter().map(|r| r.1).max().unwrap_or(0);
        let identity = FileIdentity { dev: 1, ino: 1, len: file_len, modified_ns: 0, changed_ns: 0 };
        let shard = Shard::from_header(PathBuf::from("/m/a.bin"), "a.bin".into(), identity, 0, header);
        LoadPlan::assemble(Path::new("/m"), PathBuf::from("/m"), None, vec![shard]).unwrap()
    }

    /// Views of one storage each get a place of their own: sized by a file, their places can
    /// add up past a u64, which is refused rather than wrapped onto earlier places.
    #[test]
    fn a_layout_past_a_u64_is_refused() {
        let views = |n: u64| (0..n).map(|i| (i * 8, (1 << 62) + i * 8)).collect::<Vec<_>>();
        let p = plan_of_ranges(4096, &views(3));
        let (at, total) = device_layout(&p, &spans(&p, |_| false), |_| Place::AsLoaded).unwrap();
        assert_eq!((at[2], total), (Some(1 << 63), 3 << 62));
        let p = plan_of_ranges(4096, &views(4));
        assert_eq!(device_layout(&p, &spans(&p, |_| false), |_| Place::AsLoaded), None);
        let p = plan(4096, &[64, 64]);
        let packed = |i| if i == 0 { Place::AsLoaded } else { Place::Packed(u64::MAX - 16) };
        assert_eq!(device_layout(&p, &spans(&p, |_| false), packed), None);
    }

    /// Tied weights and overlapping views of one storage: a tensor that overlaps the span's
    /// bytes joins it while starts and ends stay in order (its bytes are read once), else
    /// it starts a span; a tied twin shares its place on the device and is not copied
    /// twice; every tensor's bytes land all the same.
    #[test]
    fn overlapping_tensors_are_read_once_and_tied_ones_share_a_place() {
        let p = plan_of_ranges(4096, &[(0, 96), (0, 96), (24, 72), (76, 96)]);
        let s = spans(&p, |_| false);
        let grouped: Vec<Vec<usize>> = s.iter().map(|s| s.tensors.clone()).collect();
        assert_eq!(grouped, vec![vec![0, 1], vec![2, 3]]);
        let (at, total) = device_layout(&p, &s, |_| Place::AsLoaded).unwrap();
        assert_eq!(at[0], at[1], "tied twins share a place");
        assert!(at[2] != at[0] && at[3] != at[2]);
        let file: Vec<u8> = (0..4096 + 96).map(|i| (i * 7 % 251) as u8).collect();
        // One chunk, then chunks of 32 bytes, which tensors cross.
        for chunk_len in [4096, 32] {
            let mut device = vec![0u8; total as usize];
            let mut copies = 0;
            for r in reads(&s, chunk_len, 1).unwrap() {
                let chunk = &file[r.file_offset as usize..r.file_offset as usize + r.len];
                for (_, q) in pieces(&p, &s[r.span], |i| at[i].map(|o| (0, o)), &r) {
                    apply(&q, chunk, &mut device);
                    copies += 1;
                }
            }
            if chunk_len == 4096 {
                assert_eq!(copies, 3, "one copy for the twins, one each for the views");
            }
            for (i, t) in p.tensors().iter().enumerate() {
                let o = at[i].unwrap() as usize;
                let want = &file[t.file_range.start as usize..t.file_range.end as usize];
                assert_eq!(&device[o..o + want.len()], want, "{} (chunks of {chunk_len})", t.name);
            }
            // Every tensor is complete once the last chunk covering it has landed, and
            // not before.
            for (si, span) in s.iter().enumerate() {
                let mut remaining = chunks_to_wait_for(&p, span, chunk_len, |_| {});
                let mut done = Vec::new();
                for r in reads(&s, chunk_len, 1).unwrap().iter().filter(|r| r.span == si) {
                    done.extend(completed_by(&p, span, &mut remaining, r.index, chunk_len));
                }
                done.sort_unstable();
                assert_eq!(done, span.tensors, "span {si}, chunks of {chunk_len}");
            }
        }
    }

    #[test]
    fn spans_start_on_a_page_and_reads_cover_them() {
        let p = plan(5000, &[100, 10_000, 0, 7]);
        let s = spans(&p, |_| false);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].base, s[0].end), (4096, 5000 + 10_107));
        let r = reads(&s, 4096, 4).unwrap();
        assert_eq!(r.len(), (s[0].len() as usize).div_ceil(4096));
        assert_eq!(r.iter().map(|r| r.len as u64).sum::<u64>(), s[0].len());
        assert!(r.iter().all(|r| r.file_offset % 4096 == 0));
    }

    #[test]
    fn device_placements_are_aligned_and_disjoint() {
        let p = plan(5003, &[100, 10_000, 0, 7, 256, 512]);
        let s = spans(&p, |_| false);
        let (at, total) = device_layout(&p, &s, |_| Place::AsLoaded).unwrap();
        let mut prev_end = 0;
        for (i, t) in p.tensors().iter().enumerate() {
            let o = at[i].unwrap();
            assert_eq!(o % DEVICE_ALIGN, 0, "{}", t.name);
            assert!(o >= prev_end, "{} overlaps", t.name);
            prev_end = o + t.len();
        }
        assert_eq!(total, prev_end);
    }

    #[test]
    fn aligned_files_mirror_into_one_copy_per_chunk() {
        // Tensors of 256-multiple lengths after a 256-aligned data start: placement mirrors
        // the file, so each chunk is one piece.
        let p = plan(4096, &[256, 1024, 4096, 512]);
        let s = spans(&p, |_| false);
        let (at, total) = device_layout(&p, &s, |_| Place::AsLoaded).unwrap();
        assert_eq!(at, vec![Some(0), Some(256), Some(1280), Some(5376)]);
        assert_eq!(total, 5888);
        for r in reads(&s, 4096, 1).unwrap() {
            assert_eq!(pieces(&p, &s[0], |i| at[i].map(|o| (0, o)), &r).len(), 1, "{r:?}");
        }
    }

    /// What the device does with a piece: each row copied.
    fn apply(q: &Piece, chunk: &[u8], device: &mut [u8]) {
        for k in 0..q.rows {
            let (s, d) = (q.src + k * q.src_pitch, (q.dst + k as u64 * q.dst_pitch) as usize);
            device[d..d + q.len].copy_from_slice(&chunk[s..s + q.len]);
        }
    }

    #[test]
    fn rows_merge_into_2d_copies_only_at_pitches_the_driver_takes() {
        let mut p = Piece::flat(0, 0, 64);
        assert!(p.absorb(Piece::flat(100, 64, 64)), "packed rows, 100 bytes apart in the chunk");
        assert!(p.absorb(Piece::flat(200, 128, 64)));
        assert!(!p.absorb(Piece::flat(310, 192, 64)), "another pitch");
        assert_eq!((p.rows, p.src_pitch, p.dst_pitch), (3, 100, 64));
        // Rows farther apart than the largest pitch stay separate copies.
        let mut far = Piece::flat(0, 0, 64);
        assert!(!far.absorb(Piece::flat(64, MAX_PITCH + 1, 64)));
        assert!(!far.absorb(Piece::flat(32, 64, 64)), "overlapping rows");
    }

    #[test]
    fn pieces_move_every_byte_once() {
        let p = plan(5003, &[100, 10_000, 0, 7, 256, 513, 3]);
        let s = spans(&p, |_| false);
        let (at, total) = device_layout(&p, &s, |_| Place::AsLoaded).unwrap();
        for chunk in [4096usize, 8192, 1 << 20] {
            let mut device = vec![0u8; total as usize];
            let file: Vec<u8> = (0..p.shards()[0].file_len).map(|i| (i % 251) as u8).collect();
            for r in reads(&s, chunk, 1).unwrap() {
                let buf = &file[r.file_offset as usize..r.file_offset as usize + r.len];
                for (_, q) in pieces(&p, &s[0], |i| at[i].map(|o| (0, o)), &r) {
                    apply(&q, buf, &mut device);
                }
            }
            for (i, t) in p.tensors().iter().enumerate() {
                let o = at[i].unwrap() as usize;
                let want = &file[t.file_range.start as usize..t.file_range.end as usize];
                assert_eq!(&device[o..o + want.len()], want, "{} chunk {chunk}", t.name);
            }
        }
    }

    #[test]
    fn windows_bound_the_shards_read_at_once() {
        let spans: Vec<Span> =
            (0..10).map(|i| Span { shard: i, base: 0, end: 3 * 4096, tensors: vec![], solo: false }).collect();
        let r = reads(&spans, 4096, 3).unwrap();
        assert_eq!(r.len(), 30);
        // The first 9 reads are shards 0..3 round-robin; shard 3 starts only after.
        assert_eq!(r[..9].iter().map(|r| r.shard).collect::<Vec<_>>(), [0, 1, 2, 0, 1, 2, 0, 1, 2]);
        assert_eq!(r[9].shard, 3);
    }
}
