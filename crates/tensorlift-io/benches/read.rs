//! Reads one large file through each backend, cold (evicted from the page cache before each
//! pass) and warm. `TL_BENCH_FILE_MB` sets the size (default 1024); `TL_BENCH_CHUNK_KB`
//! (default 16384) and `TL_BENCH_WINDOW` (default 8) the read size and reads in flight.
//!
//! `residency` times the page-cache check of that file, cached.
//!
//! Compare with `dd if=FILE of=/dev/null bs=16M` (add `iflag=direct` for cold, or evict
//! first with `dd if=FILE iflag=nocache count=0`); docs/BENCHMARKS.md has the figures.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tensorlift_io::{cache, AlignedBuf, BackendKind, OpenFile, Reader};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn bench_file() -> PathBuf {
    let mb: u64 = std::env::var("TL_BENCH_FILE_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tl-read-bench-{mb}M.bin"));
    if std::fs::metadata(&path).map(|m| m.len()).ok() != Some(mb << 20) {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let block: Vec<u8> = (0..(1 << 20))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut data = Vec::with_capacity((mb << 20) as usize);
        for _ in 0..mb {
            data.extend_from_slice(&block);
        }
        std::fs::write(&path, data).unwrap();
    }
    path
}

/// Reads the whole file in CHUNK pieces, WINDOW of them in flight.
fn read_all(r: &Reader, file: &Arc<OpenFile>, mut pool: Vec<AlignedBuf>, chunk: usize) -> Vec<AlignedBuf> {
    let len = file.len();
    let mut in_flight = VecDeque::new();
    let mut offset = 0u64;
    while offset < len || !in_flight.is_empty() {
        while offset < len && !pool.is_empty() {
            let n = (len - offset).min(chunk as u64) as usize;
            in_flight.push_back(r.read(file, offset, pool.pop().unwrap(), 0, n));
            offset += n as u64;
        }
        if let Some(f) = in_flight.pop_front() {
            pool.push(f.wait().unwrap_or_else(|e| panic!("{}", e.error)));
        }
    }
    pool
}

fn backends(c: &mut Criterion) {
    let path = bench_file();
    let len = std::fs::metadata(&path).unwrap().len();
    let mut group = c.benchmark_group("read");
    group.throughput(Throughput::Bytes(len)).sample_size(10).measurement_time(Duration::from_secs(10));
    // TL_BENCH_CHUNK_KB and TL_BENCH_WINDOW set the read size and how many are in flight.
    let chunk = env_or("TL_BENCH_CHUNK_KB", 16 << 10) << 10;
    let window = env_or("TL_BENCH_WINDOW", 8);
    let mut pool: Vec<AlignedBuf> = (0..window).map(|_| AlignedBuf::zeroed(chunk, 4096).unwrap()).collect();
    for backend in [BackendKind::Uring, BackendKind::Pread] {
        for cold in [true, false] {
            // Cold reads go direct; warm ones buffered, since O_DIRECT would bypass the cache
            // (the engine makes the same choice per shard).
            let r = Reader::builder().backend(backend).queue_depth(window as u32).direct(cold).build();
            let mut file = r.open(&path).unwrap();
            let name = format!("{backend}/{}", if cold { "cold" } else { "warm" });
            group.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        if cold {
                            // A fresh open drops the mmap backend's mapping, whose pages
                            // eviction would otherwise have to leave in place.
                            file = r.open(&path).unwrap();
                            cache::evict(&path).unwrap();
                        } else if cache::resident_fraction(&path).unwrap() < 0.99 {
                            std::io::copy(&mut std::fs::File::open(&path).unwrap(), &mut std::io::sink()).unwrap();
                        }
                        let t = Instant::now();
                        pool = read_all(&r, &file, std::mem::take(&mut pool), chunk);
                        total += t.elapsed();
                    }
                    total
                })
            });
        }
    }
    group.finish();
}

/// How long deciding between O_DIRECT and buffered reads takes for the file, cached:
/// `cachestat(2)` (where the kernel has it), `mincore` on 1,024 sampled pages, and the
/// `mincore` scan of every page that the engine used before.
fn residency(c: &mut Criterion) {
    let path = bench_file();
    let f = std::fs::File::open(&path).unwrap();
    std::io::copy(&mut &f, &mut std::io::sink()).unwrap();
    let mut group = c.benchmark_group("residency");
    if cache::residency_probe() == cache::ResidencyProbe::Cachestat {
        group.bench_function("cachestat", |b| b.iter(|| cache::resident_estimate(&f).unwrap()));
    }
    group.bench_function("mincore_1024_pages", |b| {
        b.iter(|| cache::mincore_fraction(&f, Some(cache::SAMPLED_PAGES)).unwrap())
    });
    group.bench_function("mincore_every_page", |b| b.iter(|| cache::mincore_fraction(&f, None).unwrap()));
    group.finish();
}

criterion_group!(benches, backends, residency);
criterion_main!(benches);
