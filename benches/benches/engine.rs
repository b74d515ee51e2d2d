//! criterion benches of the engine's fixed costs and of a small CPU load:
//! - parsing a 2,000-tensor header;
//! - planning a 100,000-tensor sharded index (50 shards), headers read from disk;
//! - a CPU load of 256 MiB (warm page cache).

use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tensorlift::{Device, Dtype, Loader};
use tensorlift_format::{encode_header, parse_header};

fn names(n: usize, prefix: &str) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}model.layers.{}.block.{}.weight", i / 16, i % 16)).collect()
}

fn write_shard(path: &Path, names: &[String], shape: &[usize]) {
    let specs: Vec<_> = names.iter().map(|n| (n.as_str(), Dtype::BF16, shape)).collect();
    tensorlift_testkit::write_shard(path, &specs);
}

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn header(c: &mut Criterion) {
    let n = names(2000, "");
    let specs: Vec<_> = n.iter().map(|n| (n.as_str(), Dtype::BF16, &[64usize, 64][..])).collect();
    let enc = encode_header(&specs, None).unwrap();
    let file_len = enc.bytes.len() as u64 + enc.data_len();
    let mut g = c.benchmark_group("header");
    g.throughput(Throughput::Bytes(enc.bytes.len() as u64));
    g.bench_function("parse_2000_tensors", |b| b.iter(|| parse_header(Path::new("h"), &enc.bytes, file_len).unwrap()));
    g.finish();
}

fn plan(c: &mut Criterion) {
    let dir = scratch("bench-plan-100k");
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        let mut map = serde_json::Map::new();
        for s in 0..50 {
            let shard = format!("model-{:05}-of-00050.safetensors", s + 1);
            let n = names(2000, &format!("s{s}."));
            write_shard(&dir.join(&shard), &n, &[4]);
            for t in n {
                map.insert(t, shard.clone().into());
            }
        }
        std::fs::write(&index, serde_json::to_vec(&serde_json::json!({"weight_map": map})).unwrap()).unwrap();
    }
    let mut g = c.benchmark_group("plan");
    g.sample_size(20);
    g.bench_function("index_100000_tensors_50_shards", |b| b.iter(|| tensorlift::plan(&dir).unwrap()));
    g.finish();
}

fn load(c: &mut Criterion) {
    let dir = scratch("bench-load-256m");
    let path = dir.join("m.safetensors");
    if !path.exists() {
        write_shard(&path, &names(64, ""), &[1024, 2048]);
    }
    let loader = Loader::builder().device(Device::Cpu).build().unwrap();
    let bytes = loader.load_blocking(&path).unwrap().stats().bytes;
    let mut g = c.benchmark_group("load");
    g.throughput(Throughput::Bytes(bytes)).sample_size(10).measurement_time(Duration::from_secs(5));
    g.bench_function("cpu_256MiB_warm", |b| b.iter(|| loader.load_blocking(&path).unwrap()));
    g.finish();
}

criterion_group!(benches, header, plan, load);
criterion_main!(benches);
