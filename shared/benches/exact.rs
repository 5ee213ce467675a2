//! Exact search's scoring pass, the catalog read by row ([`score_rows`], one dot product
//! per product) against by column ([`Columns::score`], one multiply-add of each
//! dimension into every product's score), in one run so the ratio is of one machine and
//! hour. Catalogs below `model.hnsw.exact_below` (4,000) are searched this way, the demo's
//! and the relay benchmark's 2,000 × 32 among them.
//! Run: `cargo bench -p recpipe-shared --bench exact`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use recpipe_shared::catalog::{benchmark_queries, generate, SyntheticCatalog};
use recpipe_shared::model::graph::{score_rows, Columns};

const QUERIES: usize = 256;
const BATCH: usize = 32;

fn exact(c: &mut Criterion) {
    for (products, dim) in [(2_000, 32), (1_000, 64), (4_000, 64), (100_000, 64)] {
        let catalog = generate(SyntheticCatalog {
            products,
            dim,
            seed: 1,
            unavailable_share: 0.0,
        });
        let (queries, _) = benchmark_queries(&catalog, QUERIES);
        let rows = catalog.embeddings_slice();
        let columns = Columns::from_rows(rows, dim);
        // The two agree to float rounding (they sum in different orders).
        let (mut by_row, mut by_column) = (Vec::new(), Vec::new());
        for q in &queries {
            score_rows(rows, q, &mut by_row);
            columns.score(q, &mut by_column);
            let worst = by_row
                .iter()
                .zip(&by_column)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-4, "{products} × {dim}: scores differ by {worst}");
        }
        // Each iteration scores a batch of BATCH queries, as gen-recommendations does a
        // batch's users.
        let mut group = c.benchmark_group(format!("exact_{products}x{dim}_batch_of_{BATCH}"));
        group.sample_size(30);
        let batches: Vec<Vec<&[f32]>> = queries
            .chunks_exact(BATCH)
            .map(|b| b.iter().map(Vec::as_slice).collect())
            .collect();
        let mut scores = vec![Vec::new(); BATCH];
        let mut i = 0;
        group.bench_function("by_row", |b| {
            b.iter(|| {
                i = (i + 1) % batches.len();
                for (q, s) in batches[i].iter().zip(scores.iter_mut()) {
                    score_rows(rows, q, s);
                }
                black_box(&scores);
            })
        });
        group.bench_function("by_column", |b| {
            b.iter(|| {
                i = (i + 1) % batches.len();
                for (q, s) in batches[i].iter().zip(scores.iter_mut()) {
                    columns.score(q, s);
                }
                black_box(&scores);
            })
        });
        group.finish();
    }
}

criterion_group!(benches, exact);
criterion_main!(benches);
