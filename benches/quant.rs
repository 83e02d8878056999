//! Criterion benches of the core quantization kernels on a 4096x4096 float32 tensor.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lowbit::quant::{self, Granularity, QuantSpec};
use ndarray::{ArrayD, IxDyn};

fn input() -> ArrayD<f32> {
    let n = 4096 * 4096;
    let v: Vec<f32> = (0..n)
        .map(|i| (((i as u64 * 2654435761) % 10007) as f32 - 5003.0) / 1000.0)
        .collect();
    ArrayD::from_shape_vec(IxDyn(&[4096, 4096]), v).unwrap()
}

fn bench(c: &mut Criterion) {
    let x = input();
    let n = x.len() as u64;
    let scales = vec![0.04f64; 4096];
    let zps = vec![0i64; 4096];
    let mut g = c.benchmark_group("quant_4096x4096");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(n * 8));
    g.bench_function("fake_quantize_per_tensor", |b| {
        b.iter(|| quant::fake_quantize_per_tensor(x.view(), 0.04, 0, -8, 7, false).unwrap())
    });
    g.bench_function("fake_quantize_per_channel_axis0", |b| {
        b.iter(|| {
            quant::fake_quantize_per_channel(x.view(), &scales, &zps, 0, -8, 7, false).unwrap()
        })
    });
    g.bench_function("fake_quantize_per_channel_axis1", |b| {
        b.iter(|| {
            quant::fake_quantize_per_channel(x.view(), &scales, &zps, 1, -8, 7, false).unwrap()
        })
    });
    g.throughput(Throughput::Bytes(n * 5));
    g.bench_function("quantize_per_tensor", |b| {
        b.iter(|| quant::quantize_per_tensor(x.view(), 0.04, 0, -128, 127).unwrap())
    });
    let spec = QuantSpec::new(4, true, Granularity::Group, 0, Some(128)).unwrap();
    g.bench_function("quantize_group128_int4", |b| {
        b.iter(|| quant::spec::quantize(x.view(), spec, None).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
