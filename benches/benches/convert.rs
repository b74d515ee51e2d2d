//! criterion bench of dtype conversion on the host (`tensorlift::convert`), each pair over
//! 16 Mi elements already in memory (throughput counts the bytes read, as stored).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tensorlift::{convert, Dtype};

const N: usize = 16 << 20;

fn pairs(c: &mut Criterion) {
    let mut g = c.benchmark_group("convert");
    g.sample_size(10);
    for (from, to) in [
        (Dtype::BF16, Dtype::F32),
        (Dtype::F16, Dtype::F32),
        (Dtype::F32, Dtype::BF16),
        (Dtype::F32, Dtype::F16),
        (Dtype::BF16, Dtype::F16),
        (Dtype::F8_E4M3, Dtype::BF16),
    ] {
        let wf = from.bitsize() / 8;
        let src = tensorlift_testkit::pattern(N * wf, 7);
        let mut dst = vec![0u8; N * (to.bitsize() / 8)];
        g.throughput(Throughput::Bytes(src.len() as u64));
        g.bench_function(format!("{from}_to_{to}"), |b| b.iter(|| convert::convert(from, to, &src, &mut dst).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, pairs);
criterion_main!(benches);
