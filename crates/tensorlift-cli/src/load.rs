//! `tensorlift load`: a whole checkpoint through the engine, with speed and digests.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use sha2::{Digest, Sha256};
use tensorlift::{Device, Loader, Model, Tensor};

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
    /// Only tensors matching these names or globs (repeatable).
    #[arg(long = "filter", value_name = "GLOB")]
    filters: Vec<String>,
    #[command(flatten)]
    tuning: tensorlift::flags::Tuning,
    /// Check each shard's SHA-256 as it is read, against the hub cache blob it is or its
    /// line in SHA256SUMS beside it (`tensorlift manifest` writes one), and the index where
    /// SHA256SUMS lists it or a hub cache names its blob: `--verify` needs a digest for every
    /// shard it reads, `--verify=if-known` checks those that have one. With
    /// `--filter`, the shards that hold a matching tensor (and any that lists no tensor) are
    /// read whole and checked (on the host, into memory that holds each one whole).
    #[arg(long, value_name = "POLICY", num_args = 0..=1, require_equals = true, default_missing_value = "required",
          value_parser = |s: &str| s.parse::<tensorlift::Verify>())]
    verify: Option<tensorlift::Verify>,
    /// For a remote checkpoint (s3://, gs://, az://, http(s)://): copy it into this folder
    /// as it is read, and read that copy next time once the store says the objects are
    /// unchanged (default: TENSORLIFT_REMOTE_CACHE, else no copy).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DigestKind {
    Sha256,
}

fn parse_device(s: &str) -> Result<Device, String> {
    s.parse().map_err(|e: tensorlift::InvalidDevice| e.to_string())
}

pub fn run(args: &Args, out: &mut dyn Write) -> anyhow::Result<()> {
    // The flag wins over TENSORLIFT_DEVICE, which the builder reads when no device is set.
    let mut builder = Loader::builder().filter(args.filters.iter().cloned());
    if let Some(d) = args.device {
        builder = builder.device(d);
    }
    builder = args.tuning.apply(builder);
    if let Some(v) = args.verify {
        builder = builder.verify(v);
    }
    if let Some(dir) = &args.cache_dir {
        builder = builder.remote_cache(dir);
    }
    let bar = progress_bar();
    if let Some(bar) = bar.clone() {
        builder = builder.progress(move |p| {
            bar.set_length(p.total);
            bar.set_position(p.done);
        });
    }
    let loader = match builder.build() {
        // A pattern given on the command line that is no glob: a usage error (exit 2).
        Err(e @ tensorlift::LoadError::InvalidFilter { .. }) => clap::Error::raw(
            clap::error::ErrorKind::ValueValidation,
            format!("{}\n", crate::text::printable(&e.to_string())),
        )
        .exit(),
        built => built?,
    };
    let model = loader
        .load_blocking(&args.path)
        .with_context(|| format!("loading {}", tensorlift::redact_url(&args.path).display()))?;
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
    if s.remote_shards > 0 {
        return format!("{} shards by ranged GETs (object storage or HTTP)", s.remote_shards);
    }
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
    if s.verified_bytes + s.unverified_bytes > 0 {
        writeln!(
            out,
            "sha256: {} bytes verified, {} unverified (no expected digest)",
            s.verified_bytes, s.unverified_bytes
        )?;
    }
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
