//! `loader-bench`: tensorlift's load time against baselines and hardware limits, measured
//! side by side in one run on the same files.
//!
//! With no arguments it generates (once) a Llama-like synthetic checkpoint sized to the
//! machine and measures it warm and cold. See docs/BENCHMARKS.md for the method.
#![forbid(unsafe_code)]

mod engines;
mod group;
mod report;
mod synthetic;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use tensorlift::{Device, Loader};

use crate::engines::{Checkpoint, Entry};
use crate::report::{Mode, Report};
use crate::synthetic::SynthDtype;

#[derive(Debug, Parser)]
#[command(name = "loader-bench", version, about = "Measure tensorlift's load time against baselines and limits")]
struct Args {
    /// Generate (once, then reuse) a synthetic checkpoint of this size: 512M, 2G, 16GiB.
    /// The default, without --dir, is sized to the machine.
    #[arg(long, value_parser = synthetic::parse_size, conflicts_with = "dir")]
    synthetic: Option<u64>,
    /// Shards of the synthetic checkpoint.
    #[arg(long, default_value_t = 4)]
    shards: usize,
    /// Element type of the synthetic checkpoint.
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: SynthDtype,
    /// Measure this checkpoint (a folder, an index JSON or a .safetensors file) instead; an
    /// `s3://`, `gs://`, `az://` or `http(s)://` URL is measured against the GET limit
    /// (ranged GETs at the load's part size and concurrency, bytes dropped).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Where synthetic checkpoints are kept.
    #[arg(long, env = "TENSORLIFT_BENCH_CACHE")]
    cache_dir: Option<PathBuf>,
    /// Where tensorlift loads: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    device: Device,
    /// Runs of each engine per cache mode (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Page-cache state before each run.
    #[arg(long, value_enum, default_value = "both")]
    cache: CacheArg,
    /// Baselines to run, comma-separated: std-read, mmap-copy, safetensors-crate,
    /// per-tensor-htod (GPU), or `none`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "std-read,mmap-copy,safetensors-crate,per-tensor-htod",
        value_parser = clap::builder::PossibleValuesParser::new(["std-read", "mmap-copy", "safetensors-crate", "per-tensor-htod", "none"])
    )]
    baselines: Vec<String>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// tensorlift's tuning (each left out keeps its default).
    #[command(flatten)]
    tuning: tensorlift::flags::Tuning,
    /// tensorlift: check each shard's SHA-256 as it is read (`LoaderBuilder::verify`,
    /// required), against SHA256SUMS beside the checkpoint; for a synthetic checkpoint
    /// without one, `tensorlift manifest` writes it first. GB/s counts the bytes loaded.
    #[arg(long)]
    verify: bool,
    /// tensorlift: keep the host memory of one run's tensors for the next run (as a server
    /// that loads again does); by default every run loads into fresh memory.
    #[arg(long)]
    reuse_host_memory: bool,
    /// Skip the byte check of each of tensorlift's runs (the files read again and
    /// device tensors copied back, after the clock): for repeated runs of a checkpoint
    /// already checked.
    #[arg(long)]
    no_byte_check: bool,
    /// Also measure warm runs after this many seconds of idle memory (`warm-idle`): on a
    /// VM that hands idle memory back to its host, the next load's first touch of memory
    /// is much slower; 0 (the default) skips the mode.
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    idle_secs: u64,
    /// tensorlift: convert floating-point tensors to bf16, f16 or f32 as they land (on the
    /// GPU by its kernels); GB/s counts the bytes as stored.
    #[arg(long, value_parser = parse_dtype)]
    convert_to: Option<tensorlift::Dtype>,
    /// tensorlift: load one tensor-parallel rank's share, RANK/WORLD (Llama rules, as vLLM
    /// splits, with as many key/value heads as ranks); GB/s counts the bytes loaded, and
    /// each run prints the bytes it read.
    #[arg(long, value_name = "RANK/WORLD", value_parser = parse_tp)]
    tp: Option<(usize, usize)>,
    /// tensorlift: load onto the first N CUDA devices at once, as tensor-parallel ranks
    /// (Llama rules, N key/value heads), each byte read once (`LoaderBuilder::devices`);
    /// `per-rank` beside it loads each rank's part with a loader of its own, every rank at
    /// once, as one process a GPU does (each with a staging budget of its own, held beside
    /// the one load's for the whole run). GB/s counts the bytes landed on every device.
    #[arg(long, value_name = "N", conflicts_with_all = ["tp", "verify", "device"], value_parser = at_least_one())]
    devices: Option<usize>,
    /// tensorlift: N processes, one on each of the first N CUDA devices, as tensor-parallel
    /// ranks (Llama rules, N key/value heads) of one load over NCCL, each byte read once
    /// (`Loader::load_group_blocking`); `per-rank` beside it has each process load its own
    /// part alone, all at once, as one process a GPU loads today. NCCL is
    /// `TENSORLIFT_LIBNCCL` or `libnccl.so.2`. GB/s counts the bytes landed on every device.
    #[arg(
        long,
        value_name = "N",
        conflicts_with_all = ["tp", "verify", "device", "devices", "convert_to"],
        value_parser = at_least_one()
    )]
    group: Option<usize>,
}

fn parse_device(s: &str) -> Result<Device, String> {
    s.parse::<Device>().map_err(|e| e.to_string())
}

/// A count of devices or ranks: at least one.
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

fn parse_dtype(s: &str) -> Result<tensorlift::Dtype, String> {
    match s.to_ascii_lowercase().as_str() {
        "bf16" => Ok(tensorlift::Dtype::BF16),
        "f16" => Ok(tensorlift::Dtype::F16),
        "f32" => Ok(tensorlift::Dtype::F32),
        _ => Err(format!("'{s}' is not bf16, f16 or f32")),
    }
}

fn parse_tp(s: &str) -> Result<(usize, usize), String> {
    let (r, w) = s.split_once('/').ok_or_else(|| format!("'{s}' is not RANK/WORLD"))?;
    let (r, w) =
        (r.parse().map_err(|_| format!("bad rank '{r}'"))?, w.parse().map_err(|_| format!("bad world '{w}'"))?);
    if w == 0 || r >= w {
        return Err(format!("rank {r} of {w}"));
    }
    Ok((r, w))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CacheArg {
    Warm,
    Cold,
    Both,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    // A rank of `--group`, started by the process that measures.
    let outcome = match group::rank() {
        Some(_) => group::serve(|| builder(&args)),
        None => run(&args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // (An error may quote a tensor's name, which the checkpoint chose.)
            eprintln!("error: {}", tensorlift::terminal::printable(&format!("{e:#}")));
            ExitCode::from(1)
        }
    }
}

const CPU_BASELINES: [&str; 3] = ["std-read", "mmap-copy", "safetensors-crate"];

fn run(args: &Args) -> anyhow::Result<()> {
    let mut b = match (args.devices, args.group) {
        (Some(n), _) => builder(args)?.devices(rank_plans(n)?),
        // The ranks load in processes of their own; this one measures the limits on cuda:0.
        (_, Some(_)) => builder(args)?.device(Device::Cuda(0)),
        _ => builder(args)?.device(args.device),
    };
    if args.dir.as_deref().is_some_and(tensorlift::is_remote) {
        // Every run reads the store: a local copy would make the next runs local.
        let mut o = tensorlift::RemoteOptions::from_env();
        o.cache_dir = None;
        b = b.remote(o);
    }
    let loader = Arc::new(b.build()?);
    // What runs where, before anything long starts.
    if !args.json {
        eprintln!("machine: {}", report::machine()["summary"].as_str().unwrap_or(""));
        eprintln!("tensorlift: {} ({})", loader.device(), loader.device_reason());
    }
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            let cache = args.cache_dir.clone().unwrap_or_else(default_cache);
            let size = args.synthetic.unwrap_or_else(|| synthetic::default_size(&cache));
            synthetic::ensure(&cache, size, args.shards, args.dtype)?
        }
    };
    if args.verify && args.dir.is_none() && !dir.join(tensorlift::checksums::SUMS_FILE).exists() {
        let m = tensorlift::checksums::manifest(&dir).context("writing the synthetic checkpoint's SHA256SUMS")?;
        m.write().context("writing the synthetic checkpoint's SHA256SUMS")?;
    }
    let ckpt = Checkpoint::open(&dir).with_context(|| format!("planning {}", dir.display()))?;
    if !args.json {
        eprintln!(
            "checkpoint: {} ({} shards, {} tensors, {:.3} GB)",
            dir.display(),
            ckpt.shards.len(),
            ckpt.tensors,
            ckpt.bytes as f64 / 1e9
        );
    }
    // A remote checkpoint is read from its server, whose page cache is its own: one mode, and
    // no local baselines.
    let remote = tensorlift::is_remote(&dir);
    let mut modes: Vec<Mode> = match args.cache {
        _ if remote => vec![Mode::Warm],
        CacheArg::Warm => vec![Mode::Warm],
        CacheArg::Cold => vec![Mode::Cold],
        CacheArg::Both => vec![Mode::Warm, Mode::Cold],
    };
    if args.idle_secs > 0 && args.cache != CacheArg::Cold {
        modes.insert(1, Mode::WarmIdle);
    }
    // GPU entries run on the device the Loader chose (it decided once, with its reason);
    // when it chose the host, they are skipped with that reason.
    let gpu = match loader.device() {
        Device::Cuda(n) => tensorlift_cuda::Gpu::open(n).map_err(|e| e.to_string()),
        _ => Err(loader.device_reason().to_owned()),
    };
    let settings = serde_json::json!({
        "chunk_bytes": loader.settings().chunk_size,
        "budget_bytes": loader.settings().staging_budget,
        "queue_depth": loader.settings().queue_depth,
        "io_workers": loader.settings().io_workers,
        "direct": format!("{:?}", loader.settings().direct_io).to_lowercase(),
        "streams": loader.settings().streams,
        "prefault_threads": loader.settings().prefault_threads,
        "fill_by_copy": loader.settings().fill_by_copy,
    });
    let mut report = Report::new(&ckpt, &loader, args.runs.max(1), settings);
    report.note(&format!("tensorlift loads to {} ({})", loader.device(), loader.device_reason()));
    let baselines: Vec<String> = if remote {
        let o = tensorlift::RemoteOptions::from_env();
        report.note(&format!(
            "remote checkpoint: ranged GETs of {} bytes, {} at once; `warm` is the server's cache as it is; \
             get-limit fetches every byte at that size and concurrency and drops it",
            o.part_size(),
            o.concurrency
        ));
        for b in args.baselines.iter().filter(|b| b.as_str() != "none") {
            report.skip(b, "reads local files; the checkpoint is remote");
        }
        Vec::new()
    } else if ckpt.pytorch {
        // These two read safetensors with the reference crate; the others read by the plan.
        let (safetensors_only, rest): (Vec<String>, Vec<String>) =
            args.baselines.iter().cloned().partition(|b| b == "std-read" || b == "safetensors-crate");
        for b in &safetensors_only {
            report.skip(b, "reads safetensors with the reference crate; the checkpoint is a PyTorch one");
        }
        rest
    } else {
        args.baselines.clone()
    };
    if let Err(why) = &gpu {
        if baselines.iter().any(|b| b == "per-tensor-htod") {
            report.skip("per-tensor-htod", &format!("no usable GPU: {why}"));
        }
        report.skip("h2d-limit", &format!("no usable GPU: {why}"));
        report.skip("h2d-limit-streams", &format!("no usable GPU: {why}"));
    }
    // tensorlift, read-limit, and the CPU baselines asked for are what each round runs.
    let cpu_baselines = baselines.iter().filter(|b| CPU_BASELINES.contains(&b.as_str())).count() as u64;
    let gpu_entries = match &gpu {
        Ok(_) => 2 + baselines.iter().any(|b| b == "per-tensor-htod") as u64,
        Err(_) => 0,
    };
    let bar = progress(modes.len() as u64 * args.runs.max(1) as u64 * (2 + cpu_baselines + gpu_entries));
    // Each rank loading alone onto its device, all at once, as one process a GPU loads today
    // (a plain loader for that device and rank: with one device, the no-regression check).
    let per_rank = match args.devices {
        Some(n) => Some(
            (0..n)
                .map(|r| {
                    let b = builder(args)?.device(Device::Cuda(r)).shard(tensorlift::Sharding::llama(r, n, n)?);
                    Ok(Arc::new(b.build()?))
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
        ),
        None => None,
    };
    let group = match args.group {
        Some(n) => {
            report.note(&format!(
                "--group {n}: `tensorlift` is one load by {n} processes over NCCL, one on each of cuda:0-{}, each \
                 byte read once; `per-rank` each process loading its own part alone, all at once",
                n - 1
            ));
            Some(group::Ranks::start(n, &dir)?)
        }
        None => None,
    };
    // The tensors are the files' own only without conversion or slicing, of safetensors
    // files (not PyTorch ones); a remote checkpoint's files are not here to read.
    if args.devices.is_some_and(|n| n > 1) || args.group.is_some_and(|n| n > 1) {
        report.several_devices = true;
        report.note(
            "tensorlift's figure is the bytes landed on every device together: no limit here (one device's copies, \
             one reading of the files) bounds it, so no fraction of one is given",
        );
    }
    if let (false, tensorlift_io::UringStatus::Unavailable { reason, .. }) = (remote, tensorlift_io::uring_status()) {
        report.note(&format!("read-limit read through a pool of pread threads: io_uring is unavailable ({reason})"));
    }
    let not_checked = if args.no_byte_check {
        Some("--no-byte-check")
    } else if args.convert_to.is_some() {
        Some("--convert-to: the tensors are converted")
    } else if args.tp.is_some() {
        Some("--tp: the tensors are slices")
    } else if tensorlift::is_remote(&ckpt.dir) {
        Some("a remote checkpoint's files are not here to read")
    } else if !ckpt.shards.iter().all(|p| p.extension().is_some_and(|e| e == "safetensors")) {
        Some("PyTorch files")
    } else {
        None
    };
    let (mut most_cached, mut unchecked, mut least_warm) = (0.0f64, 0usize, 1.0f64);
    // A file system that caches file data beyond the page cache (looked up once: it does not
    // change between runs).
    let beyond: Option<&'static str> = match tensorlift::is_remote(&ckpt.dir) {
        true => None,
        false => ckpt.shards.iter().find_map(|p| tensorlift_io::cache::cache_beyond_page_cache(p).ok().flatten()),
    };
    let mut not_plain = false;
    // A mode whose cache cannot be made cold, or whose tensors are not the files' bytes,
    // stops there; the others are still measured and reported, and the run fails at the end.
    let mut failures: Vec<String> = Vec::new();
    'mode: for &mode in &modes {
        let mut entries: Vec<Entry> = match (&per_rank, &group) {
            (Some(ranks), _) => {
                vec![engines::tensorlift_devices(Arc::clone(&loader)), engines::per_rank(ranks.clone())]
            }
            (_, Some(g)) => vec![group::together(Arc::clone(g)), group::per_rank(Arc::clone(g))],
            _ => vec![engines::tensorlift(Arc::clone(&loader), args.reuse_host_memory, args.tp.is_some())],
        };
        for b in &baselines {
            match b.as_str() {
                "std-read" => entries.push(engines::std_read()),
                "mmap-copy" => entries.push(engines::mmap_copy()),
                "safetensors-crate" => entries.push(engines::safetensors_crate()),
                "per-tensor-htod" => {
                    if let Ok(g) = &gpu {
                        entries.push(engines::per_tensor_htod(g.clone()));
                    }
                }
                _ => {}
            }
        }
        entries.push(if remote { engines::get_limit() } else { engines::read_limit(mode == Mode::Cold) });
        if let Ok(g) = &gpu {
            match engines::h2d_limit(g.clone()) {
                Ok(e) => entries.push(e),
                Err(e) => report.skip("h2d-limit", &format!("{e:#}")),
            }
            // Beside it, the copy engines' limit as nvbandwidth measures it (pinning 1 GiB
            // may be refused: the bar then counts a run that does not come).
            match engines::h2d_limit_streams(g.clone()) {
                Ok(e) => entries.push(e),
                Err(e) => report.skip("h2d-limit-streams", &format!("{e:#}")),
            }
        }
        for _ in 0..args.runs.max(1) {
            // Engines alternate within each round, so all of them meet the same conditions.
            for e in &entries {
                match prepare(&ckpt, mode, beyond.is_some()) {
                    Ok(cached) => {
                        most_cached = most_cached.max(cached.most);
                        unchecked = unchecked.max(cached.unchecked);
                        least_warm = least_warm.min(cached.least);
                    }
                    Err(e) => {
                        failures.push(format!("{} cache: {e:#}", mode.name()));
                        continue 'mode;
                    }
                }
                if mode == Mode::WarmIdle {
                    // The previous run's memory was freed when it was dropped; left idle, a
                    // VM's host may take it (and memory like it) back.
                    std::thread::sleep(std::time::Duration::from_secs(args.idle_secs));
                }
                let t = Instant::now();
                let (bytes, held) = (e.run)(&ckpt).with_context(|| format!("{} ({})", e.name, mode.name()))?;
                let secs = t.elapsed().as_secs_f64();
                // A fast load of the wrong bytes must not count: each of tensorlift's runs is
                // checked against the files, read here without tensorlift (off the clock).
                if e.name == "tensorlift" {
                    report.byte_checked.1 += 1;
                }
                if e.name == "tensorlift" && not_checked.is_none() {
                    match engines::check_tensorlift(&ckpt, &*held) {
                        Ok(true) => report.byte_checked.0 += 1,
                        Ok(false) => not_plain = true,
                        Err(e) => {
                            failures.push(format!("{} cache: tensorlift's tensors: {e:#}", mode.name()));
                            continue 'mode;
                        }
                    }
                }
                drop(held);
                report.record(mode, e.name, e.kind, bytes, secs);
                match &bar {
                    Some(b) => b.inc(1),
                    // Results as they come, when nobody watches a progress bar.
                    None if !args.json => eprintln!(
                        "{} {:<20} {:>8.3} s {:>8.2} GB/s",
                        mode.name(),
                        e.name,
                        secs,
                        bytes as f64 / secs.max(1e-9) / 1e9
                    ),
                    None => {}
                }
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let (checked, made) = report.byte_checked;
    match not_checked.or(not_plain.then_some("several devices or processes hold the tensors")) {
        _ if checked == made && made > 0 => report.note(&format!(
            "tensorlift's tensors were checked byte for byte against the files read without tensorlift \
             (each of its {made} runs)"
        )),
        Some(why) => report.note(&format!("tensorlift's tensors were NOT checked against the files: {why}")),
        None if made > 0 => report.note(&format!(
            "tensorlift's tensors were checked byte for byte against the files in {checked} of its {made} runs"
        )),
        None => {}
    }
    if modes.contains(&Mode::Cold) {
        let not_seen = match unchecked {
            0 => String::new(),
            n => format!("; {n} shard(s) this process may not inspect were not checked"),
        };
        report.note(&format!(
            "cold runs began with at most {:.2}% of any shard in the page cache (checked after each eviction{not_seen}; \
             in a VM, the host's own cache is not seen)",
            100.0 * most_cached
        ));
    }
    if let (Some(fs), true) = (beyond, modes.contains(&Mode::Cold)) {
        report.note(&format!(
            "the checkpoint is on {fs}: eviction drops only the page cache, so cold runs may have read from memory"
        ));
    }
    if least_warm < 0.99 {
        report.note(&format!(
            "warm runs began with as little as {:.1}% of a shard in the page cache (read just before; memory \
             pressure evicted the rest): partly cold",
            100.0 * least_warm
        ));
    }
    for f in &failures {
        report.note(&format!("FAILED: {f}"));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.to_text());
    }
    match failures.first() {
        None => Ok(()),
        Some(f) => anyhow::bail!("{f}"),
    }
}

/// A loader builder with tensorlift's knobs as the flags set them.
fn builder(args: &Args) -> anyhow::Result<tensorlift::LoaderBuilder> {
    let mut b = args.tuning.apply(Loader::builder());
    if args.verify {
        b = b.verify(tensorlift::Verify::Required);
    }
    if let Some(to) = args.convert_to {
        b = b.convert_to(to);
    }
    if let Some((rank, world)) = args.tp {
        // As many key/value heads as ranks: one whole head each.
        b = b.shard(tensorlift::Sharding::llama(rank, world, world)?);
    }
    Ok(b)
}

/// Rank `r` of `n` on `cuda:r`, for each rank (Llama rules, one key/value head a rank).
pub(crate) fn rank_plans(n: usize) -> anyhow::Result<Vec<tensorlift::DevicePlan>> {
    (0..n).map(|r| Ok(tensorlift::DevicePlan::shard(Device::Cuda(r), tensorlift::Sharding::llama(r, n, n)?))).collect()
}

/// What a cold run's eviction left: the largest fraction of a shard still cached, and the
/// shards whose residency this process may not see (another user's file, without
/// `cachestat`'s permission).
struct Cached {
    most: f64,
    unchecked: usize,
    /// For a warm run: the smallest fraction of a shard found in the page cache after it
    /// was read (memory pressure, or a checkpoint larger than the memory, evicts it again).
    least: f64,
}

/// Puts every shard in the page-cache state the mode needs (a remote one's is its server's).
/// A shard that stays cached after eviction (another process maps it, or it lives on tmpfs,
/// whose pages cannot be dropped) fails the cold run: its figure would not be a cold one.
fn prepare(ckpt: &Checkpoint, mode: Mode, beyond_page_cache: bool) -> anyhow::Result<Cached> {
    let mut cached = Cached { most: 0.0, unchecked: 0, least: 1.0 };
    if tensorlift::is_remote(&ckpt.dir) {
        return Ok(cached);
    }
    for p in &ckpt.shards {
        match mode {
            Mode::Cold => {
                tensorlift_io::cache::evict(p).with_context(|| format!("evicting {}", p.display()))?;
                match tensorlift_io::cache::resident_fraction(p) {
                    Ok(f) => {
                        anyhow::ensure!(
                            f <= 0.01,
                            "{}: {:.1}% of it is still in the page cache after eviction (another process maps it, \
                             or it is on tmpfs): a cold run would not be cold",
                            p.display(),
                            100.0 * f
                        );
                        cached.most = cached.most.max(f);
                    }
                    Err(_) => cached.unchecked += 1,
                }
            }
            Mode::Warm | Mode::WarmIdle => {
                std::io::copy(&mut std::fs::File::open(p)?, &mut std::io::sink())?;
            }
        }
    }
    // Once every shard was read (reading a later one may evict an earlier), what is still
    // in the page cache; not on a file system that caches reads elsewhere (ZFS's ARC).
    if mode != Mode::Cold && !beyond_page_cache && !tensorlift::is_remote(&ckpt.dir) {
        for p in &ckpt.shards {
            if let Ok(f) = tensorlift_io::cache::resident_fraction(p) {
                cached.least = cached.least.min(f);
            }
        }
    }
    Ok(cached)
}

fn default_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("tensorlift/bench")
}

fn progress(steps: u64) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(steps);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} runs, eta {eta}").ok()?);
    Some(bar)
}
