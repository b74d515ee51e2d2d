//! `tensorlift load`: a whole checkpoint through the engine, with speed and digests.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use sha2::{Digest, Sha256};
use tensorlift::{BackendKind, Device, DirectIo, Loader, Model, Tensor};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The checkpoint: a .safetensors file, an index JSON or a folder (a PyTorch .bin/.pt
    /// file or folder too, read without executing it).
    path: PathBuf,
    /// Where to load: auto, cpu, cuda or cuda:N (default: TENSORLIFT_DEVICE, else auto).
    #[arg(long, value_parser = parse_device)]
    device: Option<Device>,
    /// Print each tensor's digest of its bytes as loaded.
    #[arg(long, value_enum)]
    digest: Option<DigestKind>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// I/O backend (default: io_uring when available, else pread).
    #[arg(long, value_parser = parse_backend)]
    io: Option<BackendKind>,
    /// Only tensors matching these names or globs (repeatable).
    #[arg(long = "filter", value_name = "GLOB")]
    filters: Vec<String>,
    /// Bytes per read, in MiB.
    #[arg(long, value_name = "MIB")]
    chunk_mib: Option<usize>,
    /// Bytes in flight at most, in MiB.
    #[arg(long, value_name = "MIB")]
    budget_mib: Option<usize>,
    /// Reads in flight at most.
    #[arg(long)]
    queue_depth: Option<u32>,
    /// O_DIRECT policy: auto (for shards not in the page cache), always, never.
    #[arg(long, value_parser = parse_direct)]
    direct: Option<DirectIo>,
    /// Huge pages for host memory: auto (measured), always, never.
    #[arg(long, value_parser = |s: &str| s.parse::<tensorlift::HugePages>())]
    huge_pages: Option<tensorlift::HugePages>,
    /// Do not fault in new host memory ahead of the reads (on by default).
    #[arg(long)]
    no_prefault: bool,
    /// Whether a load to the CPU reads each shard once its own header is validated, while
    /// the rest is planned: auto (where it pays: 4+ CPUs, or a largest shard not in the page
    /// cache), always, never.
    #[arg(long, value_parser = |s: &str| s.parse::<tensorlift::ReadWhilePlanning>())]
    read_while_planning: Option<tensorlift::ReadWhilePlanning>,
}

fn parse_direct(s: &str) -> Result<DirectIo, String> {
    s.parse()
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DigestKind {
    Sha256,
}

fn parse_backend(s: &str) -> Result<BackendKind, String> {
    s.parse()
}

fn parse_device(s: &str) -> Result<Device, String> {
    s.parse().map_err(|e: tensorlift::LoadError| e.to_string())
}

pub fn run(args: &Args, out: &mut dyn Write) -> anyhow::Result<()> {
    // The flag wins over TENSORLIFT_DEVICE, which the builder reads when no device is set.
    let mut builder = Loader::builder().filter(args.filters.iter().cloned());
    if let Some(d) = args.device {
        builder = builder.device(d);
    }
    if let Some(m) = args.chunk_mib {
        builder = builder.chunk_size(m << 20);
    }
    if let Some(m) = args.budget_mib {
        builder = builder.staging_budget(m << 20);
    }
    if let Some(d) = args.queue_depth {
        builder = builder.queue_depth(d);
    }
    if let Some(io) = args.io {
        builder = builder.io_backend(io);
    }
    if let Some(d) = args.direct {
        builder = builder.direct_io(d);
    }
    if let Some(p) = args.huge_pages {
        builder = builder.huge_pages(p);
    }
    if args.no_prefault {
        builder = builder.prefault(false);
    }
    if let Some(p) = args.read_while_planning {
        builder = builder.read_while_planning(p);
    }
    let bar = progress_bar();
    if let Some(bar) = bar.clone() {
        builder = builder.progress(move |p| {
            bar.set_length(p.total);
            bar.set_position(p.done);
        });
    }
    let loader = builder.build()?;
    let model = loader.load_blocking(&args.path).with_context(|| format!("loading {}", args.path.display()))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let digests = args.digest.map(|_| digest_all(model.tensors())).transpose()?;
    if args.json {
        crate::text::write_json(out, &to_json(&model, digests.as_deref()))?;
    } else {
        write_human(&model, digests.as_deref(), out)?;
    }
    Ok(())
}

fn progress_bar() -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}").ok()?;
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(100));
    Some(bar)
}

/// SHA-256 of each tensor's bytes, on every core; a device tensor is copied back first.
fn digest_all(tensors: &[Tensor]) -> anyhow::Result<Vec<String>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(tensors.len().max(1));
    let per = tensors.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = tensors
            .chunks(per)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|t| Ok(format!("{:x}", Sha256::digest(t.to_host()?))))
                        .collect::<Result<Vec<_>, tensorlift::ViewError>>()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(tensors.len());
        for h in handles {
            out.extend(h.join().map_err(|_| anyhow::anyhow!("a digest thread panicked"))??);
        }
        Ok(out)
    })
}

fn io_line(model: &Model) -> String {
    let s = model.stats();
    format!(
        "{} ({}); {} shards direct, {} buffered",
        s.io.backend,
        crate::text::printable(&s.io.reason),
        s.direct_shards,
        s.buffered_shards
    )
}

fn write_human(model: &Model, digests: Option<&[String]>, out: &mut dyn Write) -> std::io::Result<()> {
    if let Some(d) = digests {
        for (t, d) in model.tensors().iter().zip(d) {
            writeln!(out, "{d}  {}", crate::text::printable(t.name()))?;
        }
    }
    let s = model.stats();
    writeln!(
        out,
        "loaded {} tensors, {:.3} GB in {:.3} s ({:.2} GB/s)",
        s.tensors,
        s.bytes as f64 / 1e9,
        s.wall.as_secs_f64(),
        s.gbps()
    )?;
    writeln!(out, "device: {} ({})", s.device, crate::text::printable(&s.device_reason))?;
    writeln!(out, "io: {}", io_line(model))
}

fn to_json(model: &Model, digests: Option<&[String]>) -> serde_json::Value {
    let mut v = model.stats().to_json();
    if let Some(d) = digests {
        v["tensors"] = model
            .tensors()
            .iter()
            .zip(d)
            .map(|(t, d)| json!({"name": t.name(), "dtype": t.dtype().to_string(), "shape": t.shape(), "sha256": d}))
            .collect();
    }
    v
}
