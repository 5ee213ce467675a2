//! What update-embeddings does with one batch of a backlog, without Kafka: 40,000 events
//! of 14,000 users (the relay benchmark's shape: a few events each, a few users with
//! many), each user's vector moved and one state encoded per user, with 10,000 users in
//! memory and the rest in the state file. Every iteration applies new events (new ids,
//! later offsets), so none is skipped as a replay. The service's allocator (mimalloc)
//! and metrics recorder are installed, as in the service.
//! Run: `cargo bench -p update-embeddings --bench batch` (`--save-baseline NAME` and
//! `--baseline NAME` compare two builds; on a shared VM two runs of one build differed by
//! up to 10 %, so alternate several before reading a few per cent).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use recpipe_shared::catalog::{generate, SyntheticCatalog};
use recpipe_shared::events::{Event, EventType};
use recpipe_shared::kafka::framework::{Decoded, Processor, RecordMeta};
use recpipe_shared::model::{IndexKind, ModelRegistry};
use recpipe_shared::settings::Settings;
use update_embeddings::UpdateEmbeddings;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EVENTS: usize = 40_000;
const USERS: u64 = 14_000;
const PRODUCTS: usize = 2_000;

/// Batch `round`'s events: users skewed (the square of a uniform draw), offsets after the
/// last batch's, ids of their own.
fn batch(round: u64, rng: &mut ChaCha8Rng) -> Vec<Decoded<Event>> {
    let types = [
        EventType::View,
        EventType::View,
        EventType::View,
        EventType::Click,
        EventType::AddToCart,
        EventType::Purchase,
    ];
    (0..EVENTS)
        .map(|i| {
            let draw: f64 = rng.random();
            let user = format!("user-{:06}", (draw * draw * USERS as f64) as u64);
            let product = format!("p-{:05}", rng.random_range(0..PRODUCTS));
            let offset = round as i64 * EVENTS as i64 + i as i64;
            Decoded {
                meta: RecordMeta {
                    topic: "events".into(),
                    partition: 0,
                    offset,
                    key: Some(user.clone().into_bytes()),
                },
                input: Event {
                    event_id: format!("e-{round}-{i}"),
                    user_id: user,
                    event_type: types[rng.random_range(0..types.len())],
                    product_id: Some(product),
                    query: None,
                    ts: 1_764_000_000_000 + offset,
                    recommendation_id: None,
                },
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    recpipe_shared::admin::metrics();
    let dir = tempfile::tempdir().unwrap();
    let catalog_dir = dir.path().join("catalog");
    generate(SyntheticCatalog {
        products: PRODUCTS,
        dim: 32,
        seed: 7,
        ..Default::default()
    })
    .save(&catalog_dir)
    .unwrap();
    let mut settings = Settings::default();
    settings.catalog.dir = catalog_dir;
    settings.state.dir = Some(dir.path().join("state"));
    let models = Arc::new(ModelRegistry::from_settings(&settings, IndexKind::None).unwrap());
    let mut service = UpdateEmbeddings::new(models, &settings).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    // The same events every run.
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut round = 0;
    // Every user known and the state file in use before the clock.
    for _ in 0..3 {
        runtime
            .block_on(service.process(batch(round, &mut rng)))
            .unwrap();
        round += 1;
    }
    let mut group = c.benchmark_group("update-embeddings");
    group.sample_size(20);
    group.bench_function("a batch of 40,000 events of 14,000 users", |b| {
        b.iter_batched(
            || {
                round += 1;
                batch(round, &mut rng)
            },
            |events| black_box(runtime.block_on(service.process(events)).unwrap()),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
