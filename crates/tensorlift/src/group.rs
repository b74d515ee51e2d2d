//! Processes that share one load, one GPU each, over NCCL: every rank reads a disjoint part
//! of the checkpoint and sends each other rank only the slices that rank keeps
//! ([`Loader::load_group_blocking`]). This is how a node of one process per GPU reads each
//! byte of a checkpoint once, where each rank reading its own slices would read row-parallel
//! tensors whole on every rank.
//!
//! The load goes in rounds of about `world` × the loader's
//! [`staging_budget`](crate::LoaderBuilder::staging_budget) (256 MiB unless set) of the
//! checkpoint, in file order (a round ends with the tensor that brings it to that size), the
//! same rounds on every rank: the ranks check, before the first byte is read, that they
//! planned the same layout (every tensor's name, type, shape and size), rounds and parts (a
//! digest of them, exchanged), and refuse to load otherwise. The digest does not cover the
//! weights themselves: ranks on several nodes must load identical copies. Each round's bytes are cut into `world` runs of equal size, one a
//! rank, at the nearest boundary between rows of the first dimension (between groups of rows
//! that are whole bytes, for types narrower than a byte): a tensor that a cut falls in is
//! read by several ranks, each its own block of rows (one of no dimensions goes whole to
//! the rank its middle byte falls to). So every rank reads about `1/world` of every round,
//! and all read at once.
//!
//! In each round each rank loads its pieces onto its GPU with the loader, then sends each
//! other rank the part of each piece that rank keeps (its slice, or the whole tensor for a
//! replica), by NCCL sends and receives in one group. A receiver gets a block of rows of its
//! own part straight into place: rows of a part are contiguous. A sender gathers a block
//! that is not contiguous (the columns of a row-parallel slice) with a 2D copy first. The
//! rank reads its pieces of the next round while the current one is exchanged: at most two
//! rounds' pieces are held beside what it keeps, and the gathered copies of the blocks it
//! sends (up to one round's pieces again, for row-parallel tensors), allocated with the
//! round's memory before the ranks agree, so that a rank without room says so.
//!
//! Before each exchange the ranks agree that every one is ready (a few bytes to every other
//! rank, in memory the communicator holds): a rank that failed (a read, memory) returns its
//! error, and the others an error naming it, rather than wait for sends that will not come.
//! A rank that goes away in the middle of an exchange fails it on the others: at once where
//! NCCL reports it (across nodes), else when the exchange's timeout ends
//! ([`NcclComm::set_timeout`], 10 minutes unless set), since NCCL within a node does not.
//! An exchange that failed aborts the communicator, and no later load can use it.
//!
//! This is the Rust side of the Python package's `load_group`, which does the same over a
//! torch.distributed process group (NCCL on GPUs, gloo on CPUs); with the default staging
//! budget both cut the same rounds.
//!
//! ```no_run
//! use tensorlift::group::{NcclComm, NcclId};
//! use tensorlift::{Device, DevicePlan, Loader, Sharding};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let (rank, world) = (0, 2);
//! # let id_bytes = [0u8; 128];
//! // In each process: rank `rank` of `world`, on GPU `rank`; rank 0 made the id
//! // (`NcclId::new()`) and sent its bytes to the others.
//! let gpu = tensorlift::group::Gpu::open(rank)?;
//! let mut comm = NcclComm::new(&gpu, &NcclId::from_bytes(id_bytes), rank, world)?;
//! let parts = (0..world)
//!     .map(|r| Ok(DevicePlan::shard(Device::Cuda(r), Sharding::llama(r, world, 8)?)))
//!     .collect::<Result<Vec<_>, tensorlift::LoadError>>()?;
//! let loader = Loader::builder().device(Device::Cuda(rank)).build()?;
//! let model = loader.load_group_blocking("models/llama", &mut comm, &parts)?;
//! println!("read {} bytes, sent {:?}", model.stats().bytes_read, model.stats().sent_to);
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use sha2::Digest;
use tensorlift_cuda::nccl::Block;
pub use tensorlift_cuda::nccl::{Comm as NcclComm, UniqueId as NcclId};
use tensorlift_cuda::DeviceArena;
pub use tensorlift_cuda::Gpu;
use tensorlift_format::PlannedTensor;

use crate::{Device, DevicePlan, LoadError, Loader, Model, Tensor, TensorSlice};

/// Device memory of one tensor's part within a round's allocation.
const ALIGN: usize = 256;

/// How a tensor is cut into rows: `rows` of `row_bits` bits, cut only at multiples of
/// `group` rows (the fewest that are whole bytes; all of them where the tensor's bits are not
/// whole bytes). A tensor of no dimensions is one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rows {
    rows: usize,
    row_bits: u64,
    group: usize,
}

/// One rank's part of a tensor: rows `rows` of the first dimension and, where it slices an
/// inner dimension `j`, indices `cols` of it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Part {
    rows: Range<usize>,
    cols: Option<Cols>,
    shape: Vec<usize>,
}

/// Indices `range` of an inner dimension `j`: `outer` is the product of the dimensions
/// between the first and `j`, `inner_bits` the bits of one index of `j`, `stride_bits` the
/// bits from one index of the dimension before `j` to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cols {
    range: Range<usize>,
    outer: usize,
    inner_bits: u64,
    stride_bits: u64,
}

impl Part {
    /// Bits of one of the part's rows.
    fn row_bits(&self, t: &Rows) -> u64 {
        match &self.cols {
            None => t.row_bits,
            Some(c) => c.outer as u64 * (c.range.end - c.range.start) as u64 * c.inner_bits,
        }
    }

    fn bytes(&self, t: &Rows) -> usize {
        ((self.rows.end - self.rows.start) as u64 * self.row_bits(t)).div_ceil(8) as usize
    }
}

fn rows_of(t: &PlannedTensor) -> Rows {
    let bits = t.dtype.bitsize() as u64;
    let (rows, row_bits) = match t.shape.split_first() {
        None => (1, bits),
        Some((&r, rest)) => (r, rest.iter().fold(bits, |a, &d| a.saturating_mul(d as u64))),
    };
    // The fewest rows that are whole bytes (8 always are); all of them where the whole
    // tensor is not.
    let group = (1..=8usize).find(|&g| (g as u64).wrapping_mul(row_bits) % 8 == 0).unwrap_or(8);
    let group = if (rows as u64).saturating_mul(row_bits) % 8 != 0 { rows.max(1) } else { group };
    Rows { rows, row_bits, group }
}

/// The part `slice` chooses of `t` (`None`: all of it), if a group load can send it: a range
/// of the first dimension and of at most one other, starting and ending on whole bytes.
fn part_of(t: &PlannedTensor, r: &Rows, slice: Option<&TensorSlice>) -> Result<Part, String> {
    let Some(slice) = slice else { return Ok(Part { rows: 0..r.rows, cols: None, shape: t.shape.clone() }) };
    let layout = slice.layout(&t.shape, t.dtype.bitsize()).map_err(|e| e.to_string())?;
    let ranges = slice.ranges();
    let rows = ranges.first().cloned().unwrap_or(0..r.rows);
    // A tensor of no elements: nothing to send, only its shape to make.
    if t.shape.contains(&0) {
        return Ok(Part { rows, cols: None, shape: layout.shape });
    }
    let partial: Vec<usize> = (1..ranges.len()).filter(|&d| ranges[d] != (0..t.shape[d])).collect();
    let whole_bytes = |bits: u64| bits % 8 == 0;
    let cols = match partial.as_slice() {
        [] => None,
        &[j] => {
            let inner_bits = t.shape[j + 1..].iter().fold(t.dtype.bitsize() as u64, |a, &d| a * d as u64);
            let c = Cols {
                range: ranges[j].clone(),
                outer: t.shape[1..j].iter().product(),
                inner_bits,
                stride_bits: t.shape[j] as u64 * inner_bits,
            };
            let (start, len) = (c.range.start as u64 * inner_bits, (c.range.end - c.range.start) as u64 * inner_bits);
            if len > 0 && !(whole_bytes(start) && whole_bytes(len) && whole_bytes(c.stride_bits)) {
                return Err(format!("indices {:?} of dimension {j} do not start and end on whole bytes", c.range));
            }
            Some(c)
        }
        _ => return Err("a group load sends slices of the first dimension and of one other at most".into()),
    };
    let part = Part { rows, cols, shape: layout.shape };
    if part.rows == (0..r.rows) || part.rows.is_empty() {
        return Ok(part);
    }
    if r.group == r.rows && r.rows > 1 {
        return Err("its bits are not whole bytes, so it cannot be split".into());
    }
    let aligned = |row: usize| whole_bytes(row as u64 * r.row_bits);
    match aligned(part.rows.start) && aligned(part.rows.end) {
        true => Ok(part),
        false => Err(format!("rows {:?} do not start and end on whole bytes", part.rows)),
    }
}

/// The tensors of each round, as index ranges of the plan's tensors (file order).
fn rounds(sizes: &[u64], limit: u64) -> Vec<Range<usize>> {
    let (mut out, mut start, mut acc) = (Vec::new(), 0, 0u64);
    for (i, &n) in sizes.iter().enumerate() {
        acc += n;
        if acc >= limit {
            out.push(start..i + 1);
            (start, acc) = (i + 1, 0);
        }
    }
    if start < sizes.len() || out.is_empty() {
        out.push(start..sizes.len());
    }
    out
}

/// Who reads what of one round: for each tensor of it, `(rank, rows)` pieces in rank order.
/// The round's bytes are cut into `world` equal runs; each cut moves to the nearest boundary
/// between groups of rows of the tensor it falls in. A tensor of no bytes has no pieces.
fn pieces(rows: &[Rows], sizes: &[u64], round: Range<usize>, world: usize) -> Vec<Vec<(usize, Range<usize>)>> {
    let total: u64 = sizes[round.clone()].iter().sum();
    let cuts: Vec<u64> = (0..=world as u64).map(|r| total * r / world as u64).collect();
    let mut at = 0u64;
    round
        .map(|i| {
            let (n, r) = (sizes[i], rows[i]);
            let out = if n == 0 || r.rows == 0 {
                Vec::new()
            } else {
                // Units of `group` rows (the last one may be short), `unit` bits each.
                let unit = (r.group as u64 * r.row_bits).max(1);
                let units = r.rows.div_ceil(r.group) as u64;
                let mut bounds: Vec<usize> = cuts
                    .iter()
                    .map(|&c| {
                        let u = ((c.saturating_sub(at) * 8).saturating_add(unit / 2) / unit).min(units);
                        (u as usize * r.group).min(r.rows)
                    })
                    .collect();
                (bounds[0], bounds[world]) = (0, r.rows);
                (0..world).filter(|&k| bounds[k] < bounds[k + 1]).map(|k| (k, bounds[k]..bounds[k + 1])).collect()
            };
            at += n;
            out
        })
        .collect()
}

/// Where rows of a tensor read by one rank (a piece) meet a rank's part of it.
#[derive(Debug, PartialEq, Eq)]
struct Meet {
    /// The block of the piece, in the piece's memory (its rows whole, from its first).
    src_offset: usize,
    rows: usize,
    width: usize,
    pitch: usize,
    /// Where the block goes in the part's memory, contiguous: rows of a part are.
    dst_offset: usize,
    dst_len: usize,
}

/// Where rows `piece` of a tensor meet `part`; `None` where they do not. Every offset is
/// whole bytes: pieces start at multiples of the tensor's group of rows, and
/// [`part_of`] checked the part's bounds.
fn overlap(t: &Rows, piece: &Range<usize>, part: &Part) -> Option<Meet> {
    let (x0, x1) = (piece.start.max(part.rows.start), piece.end.min(part.rows.end));
    if x0 >= x1 {
        return None;
    }
    let bytes = |bits: u64| bits.div_ceil(8) as usize;
    let n = (x1 - x0) as u64;
    let first = (x0 - piece.start) as u64 * t.row_bits;
    let (src_offset, rows, width, pitch) = match &part.cols {
        None => (bytes(first), 1, bytes(n * t.row_bits), 0),
        Some(c) => (
            bytes(first + c.range.start as u64 * c.inner_bits),
            (x1 - x0) * c.outer,
            bytes((c.range.end - c.range.start) as u64 * c.inner_bits),
            bytes(c.stride_bits),
        ),
    };
    let row_bits = part.row_bits(t);
    let (dst_offset, dst_len) = (bytes((x0 - part.rows.start) as u64 * row_bits), bytes(n * row_bits));
    (dst_len > 0).then_some(Meet { src_offset, rows, width, pitch, dst_offset, dst_len })
}

/// How ranks cut a load into rounds and parts and exchange them: in every rank's
/// [`fingerprint`], so that ranks of another version that would cut otherwise stop before
/// anything is exchanged. Raised with every change to the cutting or the exchange.
const GROUP_PROTOCOL: u32 = 1;

/// A digest of what a rank is about to do: the protocol, the group's size, the rounds' size,
/// every tensor (name, type, shape, bytes) and every rank's part of it. Ranks that differ in
/// any of these would cut other rounds or expect other bytes.
fn fingerprint(world: usize, limit: u64, plan: &tensorlift_io::Checkpoint, owned: &[Vec<Part>]) -> u64 {
    let mut h = sha2::Sha256::new();
    h.update(format!("tensorlift group {GROUP_PROTOCOL} {world} {limit}\n"));
    for t in plan.tensors() {
        h.update(format!("{} {} {:?} {}\n", t.name.len(), t.dtype, t.shape, t.len()));
        h.update(t.name.as_bytes());
    }
    for part in owned.iter().flatten() {
        h.update(format!("{part:?}\n"));
    }
    let d = h.finalize();
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// The error of a rank whose group failed: `failed` ranks, this one among them or not.
fn group_failed(me: usize, failed: &[usize]) -> Option<LoadError> {
    let others: Vec<usize> = failed.iter().copied().filter(|&r| r != me).collect();
    (!others.is_empty()).then(|| {
        LoadError::Group(format!("rank {me}: ranks {others:?} of the group failed (their own errors say why)"))
    })
}

impl Loader {
    /// This rank's part of the checkpoint at `path`, loaded with the other ranks of `comm`,
    /// each reading a disjoint part of it once (see [the module](crate::group)). `parts[r]`
    /// is rank `r`'s device and part of each tensor ([`DevicePlan::shard`] for tensor
    /// parallelism, [`DevicePlan::replica`] for every tensor whole): slices of the first
    /// dimension and of at most one other. This loader loads onto this rank's device
    /// (`parts[comm.rank()]`'s, and the communicator's), with no loader-wide slices,
    /// conversion, placement or verification of its own.
    ///
    /// Every rank calls this at the same point, with the same checkpoint, the same parts and
    /// the same staging budget (which sizes the rounds): the ranks compare a digest of these
    /// (the checkpoint's layout, not its weights) first and refuse to load if they differ. The stats count this rank's reads in
    /// [`bytes_read`](crate::LoadStats::bytes_read), and what it sent to and received from
    /// each rank in [`sent_to`](crate::LoadStats::sent_to) and
    /// [`received_from`](crate::LoadStats::received_from). A failure on one rank fails the
    /// load on every rank (one that goes away in an exchange, on a node, only once the
    /// communicator's timeout ends); a communicator that failed during an exchange is
    /// aborted, and no later load can use it.
    pub fn load_group_blocking(
        &self,
        path: impl AsRef<Path>,
        comm: &mut NcclComm,
        parts: &[DevicePlan],
    ) -> Result<Model, LoadError> {
        let started = Instant::now();
        let (me, world) = (comm.rank(), comm.world());
        let limit = (world as u64).saturating_mul(self.cfg.staging_budget as u64);
        let exchange = |k: usize, e: tensorlift_cuda::CudaError| LoadError::Group(format!("rank {me}, round {k}: {e}"));
        let before = |e: tensorlift_cuda::CudaError| LoadError::Group(format!("rank {me}, before reading: {e}"));
        // Any failure before the first round must reach every rank, and every rank must be
        // about to cut the same rounds.
        let prepared = self.prepare_group(path.as_ref(), comm, parts);
        let token = prepared.as_ref().map_or(0, |(plan, _, owned)| fingerprint(world, limit, plan, owned));
        // This rank's own error first, if it has one: it says more than the agreement's.
        let agreed = comm.agree(prepared.is_ok(), token);
        let (plan, rows, owned) = prepared?;
        let failed = agreed.map_err(before)?;
        if let Some(e) = group_failed(me, &failed) {
            return Err(e);
        }
        let sizes: Vec<u64> = plan.tensors().iter().map(PlannedTensor::len).collect();
        let rounds = rounds(&sizes, limit);
        let cuts: Vec<_> = rounds.iter().map(|r| pieces(&rows, &sizes, r.clone(), world)).collect();
        let mut stats = self.new_stats();
        let (mut sent, mut received) = (vec![0u64; world], vec![0u64; world]);
        let mut out: Vec<Tensor> = Vec::with_capacity(plan.tensors().len());
        let file = crate::error::plan_file(&plan);

        // This rank's pieces of round `k`: its tensors, by name, in device memory.
        let load = |k: usize| -> Result<(HashMap<String, Tensor>, u64), LoadError> {
            let mine: HashMap<&str, Range<usize>> = rounds[k]
                .clone()
                .zip(&cuts[k])
                .flat_map(|(i, ps)| ps.iter().filter(|(r, _)| *r == me).map(move |(_, rs)| (i, rs)))
                .map(|(i, rs)| (plan.tensors()[i].name.as_str(), rs.clone()))
                .collect();
            if mine.is_empty() {
                return Ok((HashMap::new(), 0));
            }
            let mut p = plan.clone();
            p.retain(|t| mine.contains_key(t.name.as_str()));
            p.slice_with(
                |t| {
                    let (rs, r) = (&mine[t.name.as_str()], rows_of(t));
                    Ok((!t.shape.is_empty() && *rs != (0..r.rows)).then(|| TensorSlice::rows(rs.clone())))
                },
                |t, e| LoadError::Slice { file: file.clone(), tensor: t.name.clone(), message: e.to_string() },
            )?;
            let model = self.load_plan_blocking(p)?;
            let read = model.stats().bytes_read;
            Ok((model.into_tensors().into_iter().map(|t| (t.name().to_owned(), t)).collect(), read))
        };
        let load = &load;
        std::thread::scope(|s| -> Result<(), LoadError> {
            let spawn = |k: usize| {
                std::thread::Builder::new()
                    .name("tensorlift-group".into())
                    .spawn_scoped(s, move || load(k))
                    .map_err(|e| LoadError::Group(format!("rank {me}: no thread to read with: {e}")))
            };
            let mut ahead = Some(spawn(0));
            for (k, round) in rounds.iter().enumerate() {
                let mut steps = || -> Result<(Vec<Tensor>, Vec<Step>), LoadError> {
                    let (mine, read) = match ahead.take().map(|h| h.map(|h| h.join())) {
                        Some(Ok(Ok(r))) => r?,
                        Some(Err(e)) => return Err(e),
                        _ => return Err(LoadError::Group(format!("rank {me}: its reading thread stopped (a bug)"))),
                    };
                    stats.bytes_read += read;
                    if k + 1 < rounds.len() {
                        ahead = Some(spawn(k + 1));
                    }
                    self.round_steps(&plan, &rows, &owned, round.clone(), &cuts[k], mine, comm.gpu(), me)
                };
                let prepared = steps();
                let agreed = comm.agree(prepared.is_ok(), token);
                let (kept, steps) = prepared?;
                let failed = agreed.map_err(|e| exchange(k, e))?;
                if let Some(e) = group_failed(me, &failed) {
                    return Err(e);
                }
                let mut x = comm.exchange();
                let mut added = Ok(());
                let (mut to, mut from) = (vec![0u64; world], vec![0u64; world]);
                for step in steps {
                    let r = match step {
                        Step::Copy(dst, src) => x.copy(dst, src),
                        Step::Send(peer, src) => {
                            to[peer] += (src.rows * src.width) as u64;
                            x.send(peer, src)
                        }
                        Step::SendVia(peer, src, via) => {
                            to[peer] += (src.rows * src.width) as u64;
                            x.send_via(peer, src, via)
                        }
                        Step::Recv(peer, dst) => {
                            from[peer] += (dst.rows * dst.width) as u64;
                            x.recv(peer, dst)
                        }
                    };
                    if let Err(e) = r {
                        added = Err(e);
                        break;
                    }
                }
                // A step refused (a bug): abort, so that the other ranks' exchanges fail (at once
                // across nodes, at their timeout within one) rather than wait for it for good.
                if let Err(e) = added {
                    drop(x);
                    comm.abort();
                    return Err(exchange(k, e));
                }
                x.run().map_err(|e| exchange(k, e))?;
                // Counted once they have moved.
                sent.iter_mut().zip(to).for_each(|(a, b)| *a += b);
                received.iter_mut().zip(from).for_each(|(a, b)| *a += b);
                out.extend(kept);
            }
            Ok(())
        })?;
        stats.bytes = out.iter().map(|t| t.len() as u64).sum();
        stats.tensors = out.len();
        stats.shards = plan.shards().len();
        stats.checkpoint_bytes = plan.checkpoint_bytes();
        stats.wall = started.elapsed();
        stats.sent_to = sent;
        stats.received_from = received;
        Ok(Model::new(out, stats, &plan))
    }

    /// The plan, each tensor's rows, and every rank's part of each tensor; or why not.
    #[allow(clippy::type_complexity)]
    fn prepare_group(
        &self,
        path: &Path,
        comm: &NcclComm,
        parts: &[DevicePlan],
    ) -> Result<(tensorlift_io::Checkpoint, Vec<Rows>, Vec<Vec<Part>>), LoadError> {
        let (me, world) = (comm.rank(), comm.world());
        let refuse = |why: String| Err(LoadError::Unsupported(format!("group load: {why}")));
        if parts.len() != world {
            return refuse(format!("{} parts for a group of {world} ranks", parts.len()));
        }
        let ordinal = comm.gpu().ordinal();
        if self.device != Device::Cuda(ordinal) || parts[me].device != Device::Cuda(ordinal) {
            return refuse(format!(
                "rank {me}'s communicator is on cuda:{ordinal}, its part on {}, and this loader loads onto {}",
                parts[me].device, self.device
            ));
        }
        let cfg = &self.cfg;
        if !cfg.slices.is_empty() || cfg.convert_to.is_some() || cfg.place.is_some() || cfg.devices.is_some() {
            return refuse("the loader has slices, a conversion, a placement or devices of its own (give each rank's part in `parts`)".into());
        }
        if cfg.verify != crate::Verify::Off {
            return refuse("a verified load reads whole shards, which ranks that split the reading do not: verify the checkpoint once (`tensorlift load --verify`), then load it as a group".into());
        }
        let plan = self.plan(path)?;
        let file = crate::error::plan_file(&plan);
        let rows: Vec<Rows> = plan.tensors().iter().map(rows_of).collect();
        let owned = parts
            .iter()
            .map(|p| {
                let chosen = p.slices.choose(&plan)?;
                plan.tensors()
                    .iter()
                    .zip(&rows)
                    .zip(&chosen)
                    .map(|((t, r), s)| {
                        part_of(t, r, s.as_ref()).map_err(|message| LoadError::Slice {
                            file: file.clone(),
                            tensor: t.name.clone(),
                            message,
                        })
                    })
                    .collect::<Result<Vec<Part>, LoadError>>()
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        Ok((plan, rows, owned))
    }

    /// This rank's parts of one round's tensors (device memory of their own, one allocation),
    /// and the copies, sends and receives that fill them and the other ranks' parts.
    #[allow(clippy::too_many_arguments)]
    fn round_steps(
        &self,
        plan: &tensorlift_io::Checkpoint,
        rows: &[Rows],
        owned: &[Vec<Part>],
        round: Range<usize>,
        cuts: &[Vec<(usize, Range<usize>)>],
        mut mine: HashMap<String, Tensor>,
        gpu: &tensorlift_cuda::Gpu,
        me: usize,
    ) -> Result<(Vec<Tensor>, Vec<Step>), LoadError> {
        let file = crate::error::plan_file(plan);
        let cuda = |e: tensorlift_cuda::CudaError| LoadError::Cuda { file: file.clone(), source: e };
        let mut offsets = Vec::with_capacity(round.len());
        let mut len = 0usize;
        for i in round.clone() {
            offsets.push(len);
            len = align_up(len.saturating_add(owned[me][i].bytes(&rows[i])));
        }
        let memory = |e| match e {
            tensorlift_cuda::CudaError::OutOfMemory { bytes, .. } => LoadError::DeviceMemory {
                file: file.clone(),
                device: Device::Cuda(gpu.ordinal()),
                needed: bytes,
                free: gpu.memory_info().map_or(0, |(free, _)| free),
            },
            e => cuda(e),
        };
        let arena = Arc::new(DeviceArena::new(gpu, len).map_err(memory)?);
        let mut gathered: Vec<(usize, usize)> = Vec::new();
        let mut kept = Vec::with_capacity(round.len());
        let mut steps = Vec::new();
        for (k, i) in round.enumerate() {
            let t = &plan.tensors()[i];
            let part = &owned[me][i];
            let at = offsets[k];
            kept.push(Tensor::device(
                &t.name,
                t.dtype,
                &part.shape,
                Arc::clone(&arena),
                at as u64,
                part.bytes(&rows[i]),
            ));
            for (owner, piece) in &cuts[k] {
                if *owner == me {
                    let loaded = mine.remove(&t.name).ok_or_else(|| {
                        LoadError::Group(format!("tensor '{}': this rank's piece did not load", t.name))
                    })?;
                    let (src_arena, base) = loaded.device_memory().ok_or_else(|| {
                        LoadError::Group(format!("tensor '{}': its piece loaded outside device memory", t.name))
                    })?;
                    for (r, part) in owned.iter().enumerate().map(|(r, p)| (r, &p[i])) {
                        let Some(m) = overlap(&rows[i], piece, part) else { continue };
                        let (rows, width) = (m.rows, m.width);
                        let src = Block {
                            arena: Arc::clone(src_arena),
                            offset: base + m.src_offset,
                            rows,
                            width,
                            pitch: m.pitch,
                        };
                        if r == me {
                            let dst = Block {
                                arena: Arc::clone(&arena),
                                offset: at + m.dst_offset,
                                rows,
                                width,
                                pitch: width,
                            };
                            steps.push(Step::Copy(dst, src));
                        } else if rows > 1 && m.pitch != width {
                            gathered.push((steps.len(), rows * width));
                            steps.push(Step::Send(r, src));
                        } else {
                            steps.push(Step::Send(r, src));
                        }
                    }
                } else if let Some(m) = overlap(&rows[i], piece, part) {
                    steps.push(Step::Recv(*owner, Block::flat(&arena, at + m.dst_offset, m.dst_len)));
                }
            }
        }
        // The gathered copies of strided sends, in memory of their own allocated now: before
        // the ranks agree, where a rank that cannot have it can still say so.
        if !gathered.is_empty() {
            let mut end = 0usize;
            let offsets: Vec<usize> = gathered
                .iter()
                .map(|&(_, len)| {
                    let at = end;
                    end = align_up(end.saturating_add(len));
                    at
                })
                .collect();
            let staging = Arc::new(DeviceArena::new(gpu, end).map_err(memory)?);
            let mut next = gathered.iter().zip(offsets).peekable();
            steps = steps
                .into_iter()
                .enumerate()
                .map(|(k, step)| match (step, next.next_if(|((j, _), _)| *j == k)) {
                    (Step::Send(peer, src), Some((&(_, len), at))) => {
                        Step::SendVia(peer, src, Block::flat(&staging, at, len))
                    }
                    (step, _) => step,
                })
                .collect();
        }
        Ok((kept, steps))
    }
}

/// One step of a round's exchange.
enum Step {
    Copy(Block, Block),
    Send(usize, Block),
    /// A strided send, gathered into memory allocated with the round's.
    SendVia(usize, Block, Block),
    Recv(usize, Block),
}

/// `len` rounded up to [`ALIGN`], or `usize::MAX` past the address space (sized by the
/// files: an allocation of it fails, as the device has no room).
fn align_up(len: usize) -> usize {
    len.checked_next_multiple_of(ALIGN).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_end_with_the_tensor_that_fills_them() {
        assert_eq!(rounds(&[5, 5, 5, 1], 10), vec![0..2, 2..4]);
        assert_eq!(rounds(&[20, 1], 10), vec![0..1, 1..2]);
        assert_eq!(rounds(&[], 10), vec![0..0]);
    }

    fn tensor(dtype: tensorlift_format::Dtype, shape: &[usize]) -> PlannedTensor {
        let bits = shape.iter().fold(dtype.bitsize() as u64, |a, &d| a * d as u64);
        PlannedTensor {
            name: "t".into(),
            dtype,
            shape: shape.to_vec(),
            shard: 0,
            file_range: 0..bits.div_ceil(8),
            gather: None,
        }
    }

    #[test]
    fn every_rank_reads_its_share_of_a_round_at_row_boundaries() {
        // One tensor of 8 rows of 4 bytes, 2 ranks: 4 rows each.
        let rows = [Rows { rows: 8, row_bits: 32, group: 1 }, Rows { rows: 1, row_bits: 24, group: 1 }];
        let p = pieces(&rows, &[32, 3], 0..2, 2);
        assert_eq!(p[0], vec![(0, 0..4), (1, 4..8)]);
        // The 3-byte tensor's middle byte (33) is past the cut at 17: rank 1's.
        assert_eq!(p[1], vec![(1, 0..1)]);
    }

    #[test]
    fn rows_narrower_than_a_byte_are_cut_in_whole_bytes() {
        use tensorlift_format::Dtype;
        // F4 [6, 3]: 12 bits a row, whole bytes every 2 rows.
        let r = rows_of(&tensor(Dtype::F4, &[6, 3]));
        assert_eq!(r, Rows { rows: 6, row_bits: 12, group: 2 });
        // 9 bytes over 3 ranks: cuts at 3 and 6 bytes, rows 2 and 4.
        assert_eq!(pieces(&[r], &[9], 0..1, 3)[0], vec![(0, 0..2), (1, 2..4), (2, 4..6)]);
        // F4 [3]: 12 bits in all, not whole bytes: one piece, never split.
        let odd = rows_of(&tensor(Dtype::F4, &[3]));
        assert_eq!(odd.group, 3);
        assert_eq!(pieces(&[odd], &[2], 0..1, 2)[0].len(), 1);
        let half = TensorSlice::rows(0..2);
        assert!(part_of(&tensor(Dtype::F4, &[3]), &odd, Some(&half)).unwrap_err().contains("not whole bytes"));
        // F4 [8]: rows 0..4 are 2 whole bytes; rows 0..3 are not.
        let r8 = rows_of(&tensor(Dtype::F4, &[8]));
        assert!(part_of(&tensor(Dtype::F4, &[8]), &r8, Some(&TensorSlice::rows(0..4))).is_ok());
        assert!(part_of(&tensor(Dtype::F4, &[8]), &r8, Some(&TensorSlice::rows(0..3))).is_err());
        // An empty part (a vocabulary's padding leaves the last rank none) is whole bytes.
        assert!(part_of(&tensor(Dtype::F4, &[8]), &r8, Some(&TensorSlice::rows(1..1))).is_ok());
        assert!(part_of(&tensor(Dtype::F4, &[3]), &odd, Some(&TensorSlice::rows(3..3))).is_ok());
    }

    #[test]
    fn an_empty_tensor_has_a_part_of_its_own_shape() {
        use tensorlift_format::Dtype;
        let t = tensor(Dtype::F32, &[4, 0, 8]);
        let slice = TensorSlice::along(&t.shape, 2, 0..4).unwrap();
        let part = part_of(&t, &rows_of(&t), Some(&slice)).unwrap();
        assert_eq!((part.shape.as_slice(), part.bytes(&rows_of(&t))), ([4, 0, 4].as_slice(), 0));
        let t = tensor(Dtype::F32, &[0, 8]);
        let part = part_of(&t, &rows_of(&t), Some(&TensorSlice::along(&t.shape, 1, 0..4).unwrap())).unwrap();
        assert_eq!(part.shape, [0, 4]);
    }

    #[test]
    fn a_piece_meets_a_column_slice_as_a_strided_block() {
        // [4, 6] of 2-byte elements; the part is columns 2..4 of every row; the piece rows 1..3.
        let t = Rows { rows: 4, row_bits: 96, group: 1 };
        let cols = Cols { range: 2..4, outer: 1, inner_bits: 16, stride_bits: 96 };
        let part = Part { rows: 0..4, cols: Some(cols), shape: vec![4, 2] };
        let m = overlap(&t, &(1..3), &part).unwrap();
        assert_eq!(m, Meet { src_offset: 4, rows: 2, width: 4, pitch: 12, dst_offset: 4, dst_len: 8 });
        assert!(overlap(&t, &(1..3), &Part { rows: 3..4, cols: None, shape: vec![1, 6] }).is_none());
    }
}
