//! A histogram value's cost in the Prometheus recorder, recorded and then drained by the
//! upkeep thread: the services' recorder (`admin::recorder`, buckets) against the
//! exporter's default (summaries), in the same run. `cargo bench -p recpipe-shared --bench metrics_upkeep`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use metrics::Recorder;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

/// Values per drain: about what one service records between two upkeeps (5 s) at the
/// relay's rates, divided by ten.
const VALUES: usize = 10_000;

fn record_and_drain(c: &mut Criterion) {
    let metadata = metrics::Metadata::new(module_path!(), metrics::Level::INFO, None);
    // Durations spread evenly in log scale over the buckets' range, 0.1 ms to 30 s.
    let values: Vec<f64> = (0..VALUES)
        .map(|i| 0.0001 * 300_000f64.powf(i as f64 / VALUES as f64))
        .collect();
    let mut group = c.benchmark_group("histogram value recorded and drained");
    group.throughput(Throughput::Elements(VALUES as u64));
    type MakeRecorder = fn() -> PrometheusRecorder;
    let recorders: [(&str, MakeRecorder); 2] = [
        ("summary (the exporter's default)", || {
            PrometheusBuilder::new().build_recorder()
        }),
        ("buckets (admin::recorder)", recpipe_shared::admin::recorder),
    ];
    for (name, make) in recorders {
        let recorder = make();
        let handle = recorder.handle();
        let histogram = recorder
            .register_histogram(&metrics::Key::from_name("recpipe_bench_seconds"), &metadata);
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                for &v in &values {
                    histogram.record(v);
                }
                handle.run_upkeep();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, record_and_drain);
criterion_main!(benches);
