//! Group loads over NCCL (`Loader::load_group_blocking`): one process a rank, each on its
//! own device, against the emulated driver and the emulated NCCL it carries (CI has neither
//! a GPU nor NCCL). Each rank is this test executable run again as `rank_child`, which does
//! nothing in a plain test run. Every rank's tensors are checked against the file's bytes,
//! sliced by the test's own code, and against a load of that rank's part alone.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tensorlift::group::{Gpu, NcclComm, NcclId};
use tensorlift::{Device, DevicePlan, DirectIo, Dtype, Loader, Sharding, SliceRule, Split};
use tensorlift_testkit::{pattern_for, slice_bits, write_sharded, Spec};

const RANK: &str = "TLG_RANK";
const WORLD: &str = "TLG_WORLD";
const DIR: &str = "TLG_DIR";
const MODE: &str = "TLG_MODE";
const KV_HEADS: usize = 4;

/// A Llama-shaped checkpoint in two shards, with tensors of other kinds beside it (replicas
/// of every dtype, scalars, empty ones), all of them given to every rank whole.
fn checkpoint(dir: &Path) {
    let mut first: Vec<Spec<'static>> = vec![
        ("model.embed_tokens.weight", Dtype::F16, &[100, 64]),
        ("model.norm.weight", Dtype::F32, &[64]),
        ("lm_head.weight", Dtype::BF16, &[100, 64]),
    ];
    let layers: [[Spec<'static>; 8]; 2] = [0, 1].map(|l| {
        let name = |n: &str| -> &'static str { Box::leak(format!("model.layers.{l}.{n}").into_boxed_str()) };
        [
            (name("self_attn.q_proj.weight"), Dtype::F16, &[64, 64][..]),
            (name("self_attn.k_proj.weight"), Dtype::F16, &[32, 64][..]),
            (name("self_attn.v_proj.weight"), Dtype::BF16, &[32, 64][..]),
            (name("self_attn.o_proj.weight"), Dtype::F32, &[64, 64][..]),
            (name("mlp.gate_proj.weight"), Dtype::F16, &[128, 64][..]),
            (name("mlp.up_proj.weight"), Dtype::F16, &[128, 64][..]),
            (name("mlp.down_proj.weight"), Dtype::BF16, &[64, 128][..]),
            (name("input_layernorm.weight"), Dtype::F32, &[64][..]),
        ]
    });
    first.extend(layers[0].iter().copied());
    let mut second: Vec<Spec<'static>> = layers[1].to_vec();
    second.extend(tensorlift_testkit::quirky());
    // Splits beyond Llama's (the rules in `sharding`): inner dimensions of 3-D tensors, types
    // narrower than a byte split by rows and by columns, an empty tensor, and a vocabulary
    // whose padding leaves the last of 4 ranks nothing.
    second.extend([
        ("extra.dim2.weight", Dtype::F16, &[4, 6, 8][..]),
        ("extra.dim1.weight", Dtype::BF16, &[6, 8, 4][..]),
        ("extra.f4_rows.weight", Dtype::F4, &[16, 8][..]),
        ("extra.f4_cols.weight", Dtype::F4, &[16, 8][..]),
        ("extra.empty.weight", Dtype::F32, &[4, 0, 8][..]),
        ("mtp.embed_tokens.weight", Dtype::F16, &[40, 64][..]),
    ]);
    write_sharded(dir, &[&first, &second]);
}

/// Rank `rank`'s slices: Llama's rules, and the splits of the extra tensors.
fn sharding(rank: usize, world: usize) -> Sharding {
    [
        ("extra.dim2.*", Split::Dim(2)),
        ("extra.dim1.*", Split::Dim(1)),
        ("extra.f4_rows.*", Split::Column),
        ("extra.f4_cols.*", Split::Row),
        ("extra.empty.*", Split::Row),
    ]
    .into_iter()
    .try_fold(Sharding::llama(rank, world, KV_HEADS).unwrap(), |s, (p, split)| s.rule(p, split))
    .unwrap()
}

fn parts(world: usize) -> Vec<DevicePlan> {
    (0..world).map(|r| DevicePlan::shard(Device::Cuda(r), sharding(r, world))).collect()
}

/// What one rank reports on its last line of output.
#[derive(Debug)]
struct Report {
    outcome: Result<(), String>,
    read: u64,
    /// What a load of the rank's part alone read.
    alone: u64,
    sent: Vec<u64>,
    received: Vec<u64>,
}

/// The rank's side: runs only when started by a test below.
#[test]
fn rank_child() {
    let Ok(rank) = std::env::var(RANK) else { return };
    let rank: usize = rank.parse().unwrap();
    let world: usize = std::env::var(WORLD).unwrap().parse().unwrap();
    let dir = PathBuf::from(std::env::var_os(DIR).unwrap());
    let mode = std::env::var(MODE).unwrap_or_default();
    if !tensorlift_testkit::real_driver() {
        // SAFETY: tensorlift's emulated driver, which defines the driver API as it is.
        unsafe { tensorlift_cuda::use_driver_library(tensorlift_testkit::emulated_driver()) };
    }
    // Rank 0 makes the id and hands it over through a file, as a launcher would.
    let id_file = dir.join("nccl-id");
    let id = if rank == 0 {
        let id = NcclId::new().unwrap();
        std::fs::write(dir.join("nccl-id.tmp"), id.to_bytes()).unwrap();
        std::fs::rename(dir.join("nccl-id.tmp"), &id_file).unwrap();
        id
    } else {
        let t = Instant::now();
        loop {
            if let Ok(b) = std::fs::read(&id_file) {
                break NcclId::from_bytes(b.try_into().unwrap());
            }
            assert!(t.elapsed() < Duration::from_secs(60), "no id from rank 0");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let gpu = Gpu::open(rank).unwrap();
    let mut comm = NcclComm::new(&gpu, &id, rank, world).unwrap();
    if let Ok(secs) = std::env::var("TLG_TIMEOUT") {
        comm.set_timeout(Duration::from_secs(secs.parse().unwrap()));
    }
    if mode == "vanish" && rank == 1 {
        // Gone without a word once the communicator stands.
        std::process::exit(0);
    }
    let budget: usize = std::env::var("TLG_BUDGET").map_or(64 << 10, |b| b.parse().unwrap());
    let loader =
        Loader::builder().device(Device::Cuda(rank)).staging_budget(budget).direct_io(DirectIo::Never).build().unwrap();
    let ckpt = dir.join("ckpt");
    let model = match loader.load_group_blocking(&ckpt, &mut comm, &parts(world)) {
        Ok(m) => m,
        Err(e) => {
            // A communicator that failed in an exchange is aborted: a second load on it
            // fails at once.
            let again = match e.to_string().contains("round") {
                true => loader.load_group_blocking(&ckpt, &mut comm, &parts(world)).err().map(|e| e.to_string()),
                false => None,
            };
            println!("RESULT err {e}{}", again.map_or_else(String::new, |a| format!(" | again: {a}")));
            return;
        }
    };
    // The file's bytes, sliced by this test: independent of tensorlift's slicing.
    let sharding = sharding(rank, world);
    let plan = loader.plan(&ckpt).unwrap();
    assert_eq!(model.len(), plan.tensors().len());
    for t in plan.tensors() {
        let got = model.get(&t.name).unwrap_or_else(|| panic!("rank {rank}: no {}", t.name));
        assert_eq!(got.location(), Device::Cuda(rank));
        let full = pattern_for(&t.name, t.len() as usize);
        let want = match sharding.slice(&t.name, &t.shape).unwrap() {
            None => full,
            Some(s) => slice_bits(&full, &t.shape, t.dtype.bitsize(), s.ranges()),
        };
        assert_eq!(got.dtype(), t.dtype, "{}", t.name);
        if let Some(s) = sharding.slice(&t.name, &t.shape).unwrap() {
            let shape: Vec<usize> =
                t.shape.iter().enumerate().map(|(d, &n)| s.ranges().get(d).map_or(n, |r| r.end - r.start)).collect();
            assert_eq!(got.shape(), shape.as_slice(), "{}", t.name);
        }
        assert!(got.to_host().unwrap() == want, "rank {rank}: tensor {} differs from the file's slice", t.name);
    }
    // And what a load of this rank's part alone gives.
    let alone =
        Loader::builder().device(Device::Cuda(rank)).shard(sharding).build().unwrap().load_blocking(&ckpt).unwrap();
    for t in alone.tensors() {
        let got = model.get(t.name()).unwrap();
        assert_eq!((got.shape(), got.dtype()), (t.shape(), t.dtype()), "{}", t.name());
        assert!(got.to_host().unwrap() == t.to_host().unwrap(), "{}", t.name());
    }
    let s = model.stats();
    let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    println!("RESULT ok {} {} {} {}", s.bytes_read, list(&s.sent_to), list(&s.received_from), alone.stats().bytes_read);
}

/// Starts `world` ranks on a checkpoint in `dir`, with `env` for some of them, and waits for
/// every one (60 s at most: a hang is a failure). A rank that exits with status 3 (the
/// emulated NCCL ending it mid-exchange) reports `Err("died")`.
fn run_group(dir: &Path, world: usize, mode: &str, env: &[(usize, &str, &str)]) -> Vec<Report> {
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<Child> = (0..world)
        .map(|rank| {
            let mut c = Command::new(&exe);
            c.args(["rank_child", "--exact", "--nocapture", "--test-threads=1"])
                .env(RANK, rank.to_string())
                .env(WORLD, world.to_string())
                .env(DIR, dir)
                .env(MODE, mode)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if !tensorlift_testkit::real_driver() {
                c.env(tensorlift_cuda::nccl::LIBNCCL_ENV, tensorlift_testkit::emulated_driver());
            }
            for (r, k, v) in env {
                if *r == rank {
                    c.env(k, v);
                }
            }
            c.spawn().unwrap()
        })
        .collect();
    let t = Instant::now();
    let mut reports = Vec::new();
    for (rank, child) in children.iter_mut().enumerate() {
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if t.elapsed() > Duration::from_secs(60) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let Some(status) = status else {
            for c in &mut *children {
                let _ = c.kill();
            }
            panic!("rank {rank} did not finish within 60 s");
        };
        let (mut out, mut err) = (String::new(), String::new());
        child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        if mode == "vanish" && rank == 1 {
            reports.push(Report { outcome: Ok(()), read: 0, alone: 0, sent: vec![], received: vec![] });
            continue;
        }
        if status.code() == Some(3) {
            reports.push(Report { outcome: Err("died".into()), read: 0, alone: 0, sent: vec![], received: vec![] });
            continue;
        }
        assert!(status.success(), "rank {rank}: {status}\n{out}\n{err}");
        if std::env::var_os("TLG_SHOW").is_some() {
            eprintln!("rank {rank}: {out}\n{err}");
        }
        let line = out
            .lines()
            .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
            .unwrap_or_else(|| panic!("rank {rank}: {out}\n{err}"));
        let report = match line.split_once(' ') {
            Some(("err", e)) => {
                Report { outcome: Err(e.to_owned()), read: 0, alone: 0, sent: vec![], received: vec![] }
            }
            Some(("ok", rest)) => {
                let f: Vec<&str> = rest.split(' ').collect();
                let list = |s: &str| s.split(',').map(|n| n.parse().unwrap()).collect::<Vec<u64>>();
                let (read, alone) = (f[0].parse().unwrap(), f[3].parse().unwrap());
                Report { outcome: Ok(()), read, alone, sent: list(f[1]), received: list(f[2]) }
            }
            _ => panic!("rank {rank}: {line}"),
        };
        reports.push(report);
    }
    reports
}

/// Whether this is a test itself (not a rank it started) on the emulated driver: most tests
/// need several devices and its NCCL.
fn emulated_test() -> bool {
    std::env::var_os(RANK).is_none() && !tensorlift_testkit::real_driver()
}

fn scratch_with_checkpoint() -> PathBuf {
    let dir = tensorlift_testkit::scratch_in(&std::env::temp_dir(), "tl-group-");
    std::fs::create_dir(dir.join("ckpt")).unwrap();
    checkpoint(&dir.join("ckpt"));
    dir
}

fn checkpoint_tensor_bytes(dir: &Path) -> u64 {
    let plan = tensorlift::plan(dir.join("ckpt")).unwrap();
    plan.tensors().iter().map(|t| t.len()).sum()
}

/// Reads are of whole pages where a range does not start or end on one: what a rank may
/// read past its tensors' bytes, for each run of them it reads (at most two in a round: its
/// run of the round's bytes, broken where the round crosses into the next shard).
const PAGE_SLACK: u64 = 2 * 4096;

/// How many rounds a group of `world` with `budget` bytes each cuts the checkpoint into:
/// each ends with the tensor that brings it to `world * budget` bytes (the module's rule).
fn rounds(dir: &Path, world: usize, budget: u64) -> u64 {
    let plan = tensorlift::plan(dir.join("ckpt")).unwrap();
    let (mut n, mut acc) = (0, 0);
    for t in plan.tensors() {
        acc += t.len();
        if acc >= world as u64 * budget {
            (n, acc) = (n + 1, 0);
        }
    }
    n + u64::from(acc > 0)
}

/// Every rank's tensors are checked in the rank itself; here, what was read and sent.
fn check_reads(dir: &Path, world: usize, budget: u64, reports: &[Report]) {
    let total = checkpoint_tensor_bytes(dir);
    let mut sent = BTreeMap::new();
    for (rank, r) in reports.iter().enumerate() {
        assert_eq!(r.outcome, Ok(()), "rank {rank} of {world}");
        // Every rank reads a share: the rounds are cut among all of them.
        assert!(r.read > total / world as u64 / 2, "rank {rank} of {world} read {} of {total}", r.read);
        for (peer, &n) in r.sent.iter().enumerate() {
            sent.insert((rank, peer), n);
        }
    }
    // Each byte of the checkpoint is read once, by one rank, give or take the pages around
    // each run a rank reads; each rank loading its own part reads far more.
    let read: u64 = reports.iter().map(|r| r.read).sum();
    let slack = rounds(dir, world, budget) * world as u64 * 2 * PAGE_SLACK;
    assert!(
        read >= total && read - total <= slack,
        "{world} ranks read {read} of {total} (slack {slack}): {reports:?}"
    );
    let alone: u64 = reports.iter().map(|r| r.alone).sum();
    assert!(world == 1 || alone > read + total / 2, "{world} ranks alone read {alone}, together {read}, of {total}");
    // What each rank says it received from a peer is what that peer says it sent it.
    for (rank, r) in reports.iter().enumerate() {
        for (peer, &n) in r.received.iter().enumerate() {
            assert_eq!(n, sent[&(peer, rank)], "{peer} -> {rank} of {world}");
        }
        assert_eq!(r.sent[rank] + r.received[rank], 0, "rank {rank} sends itself nothing");
    }
}

#[test]
fn every_rank_gets_its_slices_and_each_byte_is_read_once() {
    if !emulated_test() {
        return;
    }
    // Rounds of a few tensors, of one tensor or less, and one round for the whole checkpoint.
    for (world, budget) in [(2, 64 << 10), (4, 64 << 10), (2, 4096), (2, 256 << 20)] {
        let dir = scratch_with_checkpoint();
        let b = budget.to_string();
        let env: Vec<(usize, &str, &str)> = (0..world).map(|r| (r, "TLG_BUDGET", b.as_str())).collect();
        let reports = run_group(&dir, world, "", &env);
        check_reads(&dir, world, budget, &reports);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// One rank: what a GPU host with one GPU can run, against its real NCCL (scripts/gpu-host
/// names PyTorch's in `TENSORLIFT_LIBNCCL`).
#[test]
fn a_group_of_one_loads_the_whole_checkpoint() {
    if std::env::var_os(RANK).is_some() {
        return;
    }
    if tensorlift_testkit::real_driver() {
        if let Err(why) = tensorlift_cuda::nccl::status() {
            eprintln!("skipped: a group load on the real driver needs NCCL: {why}");
            return;
        }
    }
    let dir = scratch_with_checkpoint();
    let reports = run_group(&dir, 1, "", &[]);
    check_reads(&dir, 1, 64 << 10, &reports);
    assert_eq!((reports[0].sent.as_slice(), reports[0].received.as_slice()), ([0].as_slice(), [0].as_slice()));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_rank_that_fails_fails_the_load_on_every_rank() {
    if !emulated_test() {
        return;
    }
    let dir = scratch_with_checkpoint();
    // Rank 1's device has room for its staging memory and little more.
    let reports = run_group(&dir, 4, "", &[(1, "TLEMU_DEVICE_MEMORY", "4096")]);
    let errors: Vec<String> = reports.iter().map(|r| r.outcome.clone().unwrap_err()).collect();
    assert!(errors[1].contains("cuda:1"), "{errors:?}");
    for r in [0, 2, 3] {
        assert!(errors[r].contains("ranks [1] of the group failed"), "{errors:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_rank_that_goes_away_fails_the_others_rather_than_hang() {
    if !emulated_test() {
        return;
    }
    let dir = scratch_with_checkpoint();
    let reports = run_group(&dir, 2, "vanish", &[]);
    let error = reports[0].outcome.clone().unwrap_err();
    assert!(error.contains("remote process exited"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_rank_that_dies_in_an_exchange_fails_the_others_without_wrong_tensors() {
    if !emulated_test() {
        return;
    }
    // Rank 1 ends as it makes its 6th send: after the first agreement and a round or two,
    // in the middle of an exchange (one round for the whole checkpoint, then rounds of a few
    // tensors). Across nodes NCCL reports it at once; within a node it does not, and the
    // survivor gives up when its timeout ends.
    for budget in ["268435456", "65536"] {
        for silent in [false, true] {
            let dir = scratch_with_checkpoint();
            let mut env =
                vec![(0, "TLG_BUDGET", budget), (1, "TLG_BUDGET", budget), (1, "TLEMU_NCCL_EXIT_AFTER_SENDS", "6")];
            if silent {
                env.extend([(0, "TLEMU_NCCL_SILENT_PEERS", "1"), (0, "TLG_TIMEOUT", "3")]);
            }
            let reports = run_group(&dir, 2, "", &env);
            assert_eq!(reports[1].outcome, Err("died".into()));
            let error = reports[0].outcome.clone().unwrap_err();
            let expected = if silent { "no answer from the other ranks within 3 s" } else { "remote process exited" };
            assert!(error.contains(expected) && error.contains("rank 0, round"), "budget {budget}: {error}");
            assert!(
                error.contains(
                    "| again: group load: rank 0, before reading: agree failed: the communicator failed earlier"
                ),
                "{error}"
            );
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

#[test]
fn ranks_that_would_cut_other_rounds_refuse_to_load() {
    if !emulated_test() {
        return;
    }
    let dir = scratch_with_checkpoint();
    let reports = run_group(&dir, 2, "", &[(0, "TLG_BUDGET", "4096"), (1, "TLG_BUDGET", "100000")]);
    for (rank, r) in reports.iter().enumerate() {
        let error = r.outcome.clone().unwrap_err();
        assert!(error.contains("about to do something else"), "rank {rank}: {error}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
