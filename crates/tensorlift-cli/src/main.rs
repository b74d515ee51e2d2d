//! The `tensorlift` command.
//!
//! Exit codes: 0 success, 1 invalid or unreadable input, or a device that cannot be used
//! (one `error: ...` line on stderr), 2 usage.
#![forbid(unsafe_code)]

mod doctor;
mod inspect;
mod load;
mod text;
mod torch;

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "tensorlift", version, about = "Load safetensors checkpoints at the speed of the hardware")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the tensors of a checkpoint (a .safetensors file, an index JSON or a folder; a
    /// PyTorch .bin/.pt file or folder too, read without executing it).
    Inspect {
        /// The checkpoint.
        path: PathBuf,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Load every tensor through the engine and report the speed (and digests).
    Load(load::Args),
    /// Convert a PyTorch checkpoint (a .bin/.pt file, or a folder with pytorch_model.bin or
    /// its index) to safetensors, without executing anything in it. Tied weights are written
    /// once, under the first of their names in sorted order, the others named in the
    /// metadata (as the reference convert.py does); every tensor is aligned to its element.
    Convert {
        /// The PyTorch checkpoint.
        src: PathBuf,
        /// The folder to write (new, or empty).
        dst: PathBuf,
        /// Largest shard: 5GB, 500MB, 2GiB.
        #[arg(long, default_value = "5GB", value_parser = torch::parse_size)]
        max_shard_size: u64,
    },
    /// Write SHA256SUMS in a checkpoint's folder: the SHA-256 of every shard and of the
    /// index, in coreutils' format (`sha256sum -c SHA256SUMS` checks it; a shard the index
    /// names under two names gets a line for each). The lines of one already there for other
    /// files are kept as they are; its lines for these are replaced, and those that name
    /// them another way (an absolute path, a link) get their new digests.
    Manifest {
        /// The checkpoint (a .safetensors file, an index JSON or a folder).
        path: PathBuf,
    },
    /// Report the GPU, io_uring, O_DIRECT, memlock, and what a load would choose.
    Doctor {
        /// Where checkpoints live, to test O_DIRECT on: a file, or a folder (its first
        /// .safetensors file, in a hub cache snapshot the blob it links to, else a scratch
        /// file written there and removed).
        #[arg(long, default_value = ".")]
        path: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("TENSORLIFT_LOG"))
        .with_writer(io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version are successes that clap reports as "errors".
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let result = match cli.command {
        Command::Inspect { path, json } if torch::is_torch(&path) => torch::inspect(&path, json, &mut out),
        Command::Inspect { path, json } => inspect::run(&path, json, &mut out),
        Command::Convert { src, dst, max_shard_size } => torch::convert(&src, &dst, max_shard_size, &mut out),
        Command::Load(args) => load::run(&args, &mut out),
        Command::Doctor { path, json } => doctor::run(&path, json, &mut out),
        Command::Manifest { path } => manifest(&path, &mut out),
    };
    let result = result.and_then(|()| out.flush().map_err(anyhow::Error::from));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`| head`) is not a failure of ours.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // The chain can hold tensor and file names from the checkpoint.
            eprintln!("error: {}", text::printable(&chain(&e)));
            ExitCode::from(1)
        }
    }
}

/// Whether the error is (or was caused by) writing to a reader that went away.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe))
}

/// The error and its causes, each once: library errors already print their source in their
/// own message, so a cause whose text is already there is not repeated.
fn chain(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg
}

/// `tensorlift manifest PATH`: SHA256SUMS written in the checkpoint's folder.
fn manifest(path: &std::path::Path, out: &mut dyn Write) -> anyhow::Result<()> {
    let m = tensorlift::checksums::manifest(path)?;
    let written = m.write()?;
    // The manifest's lines in sha256sum's form (a name with `\\`, a newline or a carriage
    // return escaped, its line marked with a leading `\\`; the file keeps the one-space form
    // where the SHA256SUMS it replaced had it), other control characters made printable.
    for line in tensorlift::checksums::format_sums(&m.entries).lines() {
        writeln!(out, "{}", text::printable(line))?;
    }
    writeln!(out, "wrote {} digests to {}", m.entries.len(), text::path(&written))?;
    Ok(())
}
