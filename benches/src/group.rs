//! `--group N`: N processes, one a GPU, as one-process-per-GPU servers (vLLM, SGLang) run.
//! Each rank is this program started again (the environment names its rank), with a
//! communicator over NCCL; the parent sends every rank the same command on its stdin, and
//! times from sending it until the last rank has answered:
//!
//! - `tensorlift`: one load by all ranks together, each byte read once
//!   (`Loader::load_group_blocking`);
//! - `per-rank`: each rank loading its own part with a plain loader, all at once, as such
//!   servers load today.
//!
//! A rank keeps its tensors until the parent lets go of the run's result, after the clock
//! stopped (it sends `release`), so that they are freed off the clock, as the other
//! engines' are.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tensorlift::group::{Gpu, NcclComm, NcclId};
use tensorlift::Device;

use crate::engines::{Entry, Kind};

const RANK: &str = "TENSORLIFT_BENCH_RANK";
const WORLD: &str = "TENSORLIFT_BENCH_WORLD";
const RENDEZVOUS: &str = "TENSORLIFT_BENCH_RENDEZVOUS";
const CHECKPOINT: &str = "TENSORLIFT_BENCH_CHECKPOINT";

/// This process's rank and the group's size, when it was started as a rank.
pub fn rank() -> Option<(usize, usize)> {
    let r = std::env::var(RANK).ok()?.parse().ok()?;
    let w = std::env::var(WORLD).ok()?.parse().ok()?;
    Some((r, w))
}

struct Rank {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// The ranks, started once for the whole run.
pub struct Ranks {
    ranks: Mutex<Vec<Rank>>,
    rendezvous: PathBuf,
}

/// What every rank answered to one command, added up.
struct Totals {
    landed: u64,
    read: u64,
    sent: u64,
}

impl Ranks {
    /// Starts `n` ranks on the checkpoint at `dir`, with this process's arguments.
    pub fn start(n: usize, dir: &Path) -> anyhow::Result<Arc<Ranks>> {
        let rendezvous = std::env::temp_dir().join(format!("tensorlift-bench-group-{}", std::process::id()));
        std::fs::create_dir_all(&rendezvous).with_context(|| format!("creating {}", rendezvous.display()))?;
        let exe = std::env::current_exe().context("this program's path")?;
        let mut ranks = Vec::with_capacity(n);
        for r in 0..n {
            let mut child = Command::new(&exe)
                .args(std::env::args_os().skip(1))
                .env(RANK, r.to_string())
                .env(WORLD, n.to_string())
                .env(RENDEZVOUS, &rendezvous)
                .env(CHECKPOINT, dir)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .with_context(|| format!("starting rank {r}"))?;
            let (stdin, stdout) = (child.stdin.take(), child.stdout.take());
            let (Some(stdin), Some(stdout)) = (stdin, stdout) else { bail!("rank {r} has no pipes") };
            ranks.push(Rank { child, stdin, stdout: BufReader::new(stdout) });
        }
        let ranks = Arc::new(Ranks { ranks: Mutex::new(ranks), rendezvous });
        // Every rank says it is ready once its communicator stands.
        ranks.ask("ready").context("starting the ranks")?;
        Ok(ranks)
    }

    fn ask(&self, command: &str) -> anyhow::Result<Totals> {
        let mut ranks = self.ranks.lock().map_err(|_| anyhow::anyhow!("a rank's pipe was poisoned"))?;
        for (r, rank) in ranks.iter_mut().enumerate() {
            writeln!(rank.stdin, "{command}").and_then(|()| rank.stdin.flush()).with_context(|| format!("rank {r}"))?;
        }
        let mut totals = Totals { landed: 0, read: 0, sent: 0 };
        let mut failed = Vec::new();
        for (r, rank) in ranks.iter_mut().enumerate() {
            let mut line = String::new();
            rank.stdout.read_line(&mut line).with_context(|| format!("rank {r}"))?;
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                ["ok", landed, read, sent] => {
                    totals.landed += landed.parse::<u64>()?;
                    totals.read += read.parse::<u64>()?;
                    totals.sent += sent.parse::<u64>()?;
                }
                _ => failed.push(format!("rank {r}: {}", if line.is_empty() { "exited" } else { line.trim() })),
            }
        }
        if !failed.is_empty() {
            bail!("{}", failed.join("; "));
        }
        Ok(totals)
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        if let Ok(ranks) = self.ranks.get_mut() {
            for rank in ranks.iter_mut() {
                let _ = writeln!(rank.stdin, "quit");
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            for rank in ranks.iter_mut() {
                while rank.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = rank.child.kill();
                let _ = rank.child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.rendezvous);
    }
}

fn entry(ranks: Arc<Ranks>, name: &'static str, command: &'static str) -> Entry {
    Entry {
        name,
        kind: Kind::Engine,
        run: Box::new(move |_| {
            let t = ranks.ask(command)?;
            let n = ranks.ranks.lock().map_or(0, |r| r.len());
            eprintln!(
                "{name}: {} bytes onto {n} devices, the ranks read {} together, sent {}",
                t.landed, t.read, t.sent
            );
            // The ranks free their tensors when this is dropped, after the clock, as the
            // other engines' tensors are freed (not when the next command comes, inside it).
            Ok((t.landed, Box::new(Release(Arc::clone(&ranks)))))
        }),
    }
}

/// Asks the ranks to free the tensors they hold, when dropped.
struct Release(Arc<Ranks>);

impl Drop for Release {
    fn drop(&mut self) {
        if let Err(e) = self.0.ask("release") {
            eprintln!("releasing the ranks' tensors: {}", tensorlift::terminal::printable(&format!("{e:#}")));
        }
    }
}

/// One load by every rank together.
pub fn together(ranks: Arc<Ranks>) -> Entry {
    entry(ranks, "tensorlift", "group")
}

/// Every rank loading its own part alone, all at once.
pub fn per_rank(ranks: Arc<Ranks>) -> Entry {
    entry(ranks, "per-rank", "alone")
}

/// A rank's side: its communicator, then a load for each command on stdin, answered on
/// stdout (`ok LANDED READ SENT`, or the error).
pub fn serve(builder: impl Fn() -> anyhow::Result<tensorlift::LoaderBuilder>) -> anyhow::Result<()> {
    let (rank, world) = rank().context("not started as a rank")?;
    let rendezvous = PathBuf::from(std::env::var_os(RENDEZVOUS).context("no rendezvous folder")?);
    let dir = PathBuf::from(std::env::var_os(CHECKPOINT).context("no checkpoint")?);
    // Rank 0 makes the communicator's id and hands it over through the folder.
    let id_file = rendezvous.join("nccl-id");
    let id = if rank == 0 {
        let id = NcclId::new()?;
        let tmp = rendezvous.join("nccl-id.tmp");
        std::fs::write(&tmp, id.to_bytes())?;
        std::fs::rename(&tmp, &id_file)?;
        id
    } else {
        let t = Instant::now();
        loop {
            match std::fs::read(&id_file) {
                Ok(b) => break NcclId::from_bytes(b.try_into().map_err(|_| anyhow::anyhow!("a bad id file"))?),
                Err(_) if t.elapsed() < Duration::from_secs(120) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(e).context("waiting for rank 0's id"),
            }
        }
    };
    let mut comm = NcclComm::new(&Gpu::open(rank)?, &id, rank, world)?;
    let parts = crate::rank_plans(world)?;
    let group = builder()?.device(Device::Cuda(rank)).build()?;
    let alone =
        builder()?.device(Device::Cuda(rank)).shard(tensorlift::Sharding::llama(rank, world, world)?).build()?;
    let mut held: Option<tensorlift::Model> = None;
    let out = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        held = None;
        let loaded = match line.trim() {
            // (`release`: the tensors were let go above.)
            "ready" | "release" => {
                writeln!(out.lock(), "ok 0 0 0")?;
                out.lock().flush()?;
                continue;
            }
            "group" => group.load_group_blocking(&dir, &mut comm, &parts),
            "alone" => alone.load_blocking(&dir),
            "quit" => break,
            other => bail!("unknown command '{other}'"),
        };
        match loaded {
            Ok(m) => {
                let s = m.stats();
                writeln!(out.lock(), "ok {} {} {}", s.bytes, s.bytes_read, s.sent_to.iter().sum::<u64>())?;
                held = Some(m);
            }
            Err(e) => writeln!(out.lock(), "err {}", e.to_string().replace('\n', " "))?,
        }
        out.lock().flush()?;
    }
    drop(held);
    Ok(())
}
