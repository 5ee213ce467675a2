//! What gen-recommendations does with one batch of `user-vectors` records, as the
//! freshness benchmark's rate gives it (about 54 states of different users, each with a
//! full history: 50 products, 50 event ids, 32 dims): decode each record, make its list
//! from the 2,000-product catalog (searched exactly, as below `model.hnsw.exact_below`)
//! and encode it for `recommendations`, with the states in JSON and in the binary form.
//! Also one list alone, without the Kafka framing.
//! Run: `cargo bench -p gen-recommendations --bench lists` (compare builds with
//! criterion's `--save-baseline NAME` and `--baseline NAME`).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use gen_recommendations::GenRecommendations;
use recpipe_shared::events::{EventType, LastEvent, SourcePosition, UserVectorRecord};
use recpipe_shared::kafka::framework::{Decoded, Processor, RecordMeta};
use recpipe_shared::model::{IndexKind, ModelRegistry};
use recpipe_shared::settings::Settings;
use recpipe_shared::state_record::{self, StateEncoding};

// The service's allocator, so the figures are the service's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PRODUCTS: usize = 2_000;
const DIM: usize = 32;
const BATCH: usize = 54;

fn state(user: usize, catalog_dim: usize, embeddings: &str) -> UserVectorRecord {
    let product = |k: usize| format!("p-{:05}", (user * 131 + k * 37) % PRODUCTS);
    UserVectorRecord {
        user_id: format!("user-{user:07}"),
        vector: (0..catalog_dim)
            .map(|i| ((i * 7 + user) as f32 * 0.37).sin() * 0.2)
            .collect(),
        anchor_ts: 1_764_000_000_000,
        version: 60,
        recent_products: (0..50).map(product).collect(),
        purchased: (0..10).map(|k| product(k * 5 + 1)).collect(),
        last_event: LastEvent {
            event_id: format!("user-{user:07}-e0059"),
            event_type: EventType::View,
            product_id: Some(product(0)),
            ts: 1_764_000_000_000,
        },
        source: SourcePosition {
            partition: 0,
            offset: user as i64,
        },
        updated_at: 1_764_000_000_100,
        embeddings: Some(embeddings.to_string()),
        recent_event_ids: (0..50)
            .map(|i| format!("user-{user:07}-e{:04}", 59 - i))
            .collect(),
        folded_events: Vec::new(),
    }
}

fn lists(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.catalog.dir = dir.path().join("catalog");
    recpipe_shared::testkit::write_catalog(&settings.catalog.dir, PRODUCTS, DIM);
    let models = Arc::new(ModelRegistry::from_settings(&settings, IndexKind::Hnsw).unwrap());
    let catalog = models.current().primary().catalog().clone();
    let payloads_in = |encoding| -> Vec<Vec<u8>> {
        (0..BATCH)
            .map(|u| {
                let state = state(u, catalog.dim(), catalog.embeddings_id());
                state_record::encode(&state, encoding)
            })
            .collect()
    };
    let (json, binary) = (
        payloads_in(StateEncoding::Json),
        payloads_in(StateEncoding::Binary),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    // As the service runs (a batch this size is split over one thread per core), and on
    // one thread: the per-list work without the threads' start and scheduling, which on
    // a 2-core machine shared with other work varies by a quarter between runs.
    let mut one_thread = settings.clone();
    one_thread.model.search_threads = 1;
    let mut group = c.benchmark_group("gen_recommendations");
    // The states in JSON (these two names are the figures of earlier sessions), then in
    // the binary form that update-embeddings writes by default.
    for (name, settings, payloads) in [
        (
            format!("batch_of_{BATCH}_states_decoded_listed_encoded"),
            &settings,
            &json,
        ),
        (
            format!("batch_of_{BATCH}_on_one_thread"),
            &one_thread,
            &json,
        ),
        (
            format!("batch_of_{BATCH}_on_one_thread_binary_states"),
            &one_thread,
            &binary,
        ),
    ] {
        let mut generator = GenRecommendations::new(models.clone(), settings);
        group.bench_function(name, |b| {
            b.iter(|| {
                let batch: Vec<_> = payloads
                    .iter()
                    .enumerate()
                    .map(|(n, payload)| {
                        let meta = RecordMeta {
                            topic: "user-vectors".into(),
                            partition: 0,
                            offset: n as i64,
                            key: None,
                        };
                        let input = generator.decode(&meta, black_box(payload)).unwrap();
                        Decoded { meta, input }
                    })
                    .collect();
                black_box(runtime.block_on(generator.process(batch)).unwrap())
            })
        });
    }
    let one = state(7, catalog.dim(), catalog.embeddings_id());
    let recommender = models.current().primary().recommender.clone();
    group.bench_function("one_list_recommend", |b| {
        b.iter(|| black_box(recommender.recommend(black_box(&one), settings.model.list_len)))
    });
    group.finish();
}

criterion_group!(benches, lists);
criterion_main!(benches);
