//! One nearest-neighbour query at 100k products × 64 dims: HNSW at several `ef_search`
//! values, each with the recall@10 it reaches against exact search (printed), and exact
//! search beside it. Run: `cargo bench -p recpipe-shared --bench ann`
//! (RECPIPE_BENCH_PRODUCTS changes the catalog size, RECPIPE_BENCH_DIM the dimension,
//! RECPIPE_BENCH_M the graph degree M,
//! default the configured 32; the index build takes about 25 s).
//!
//! Two query sets: "one-interest" queries (a product's embedding plus noise, the usual ANN
//! benchmark query; these are timed) and "two-interest" queries (the sum of two products
//! of different categories, as the vector of a user with two interests is), whose recall
//! is printed too: a graph search that starts in one cluster tends to stay there.

use std::collections::HashSet;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use recpipe_shared::catalog::{benchmark_queries, generate, SyntheticCatalog};
use recpipe_shared::model::{recall, Recommender};
use recpipe_shared::settings::HnswSettings;

const QUERIES: usize = 500;
const K: usize = 10;

fn recall_of(rec: &Recommender, queries: &[Vec<f32>], truth: &[HashSet<usize>]) -> f64 {
    let found: Vec<_> = queries
        .iter()
        .map(|q| rec.nearest(q, K, &|_| false))
        .collect();
    recall(&found, truth)
}

fn ann(c: &mut Criterion) {
    let products = std::env::var("RECPIPE_BENCH_PRODUCTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dim = std::env::var("RECPIPE_BENCH_DIM")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let catalog = Arc::new(generate(SyntheticCatalog {
        products,
        dim,
        seed: 1,
        unavailable_share: 0.0,
    }));
    let (one_interest, two_interest) = benchmark_queries(&catalog, QUERIES);
    let exact = Recommender::exact(catalog.clone());
    let (truth_one, truth_two) = (
        exact.neighbour_sets(&one_interest, K),
        exact.neighbour_sets(&two_interest, K),
    );

    let m = std::env::var("RECPIPE_BENCH_M")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(HnswSettings::default().max_connections);
    // A fixed ef_search: each is set below, and the default's calibration at load would
    // count in the build's time.
    let settings = HnswSettings {
        max_connections: m,
        ef_search: 128,
        ..HnswSettings::default()
    };
    let started = Instant::now();
    let mut hnsw = Recommender::new(catalog.clone(), &settings);
    eprintln!(
        "HNSW build: {products} × {dim}, M={m}, ef_construction={}: {:.1} s",
        settings.ef_construction,
        started.elapsed().as_secs_f64()
    );

    let mut group = c.benchmark_group(format!("ann_{products}x{dim}"));
    group.sample_size(20);
    for ef in [16, 32, 64, 128] {
        hnsw.set_ef_search(ef);
        eprintln!(
            "HNSW ef_search={ef}: recall@{K} {:.3} on one-interest queries, {:.3} on two-interest queries",
            recall_of(&hnsw, &one_interest, &truth_one),
            recall_of(&hnsw, &two_interest, &truth_two)
        );
        let mut i = 0;
        group.bench_function(format!("hnsw_ef{ef}"), |b| {
            b.iter(|| {
                i = (i + 1) % QUERIES;
                black_box(hnsw.nearest(&one_interest[i], K, &|_| false))
            })
        });
    }
    let mut i = 0;
    group.bench_function("exact", |b| {
        b.iter(|| {
            i = (i + 1) % QUERIES;
            black_box(exact.nearest(&one_interest[i], K, &|_| false))
        })
    });
    group.finish();
}

criterion_group!(benches, ann);
criterion_main!(benches);
