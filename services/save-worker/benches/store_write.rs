//! The embedded store's writer alone, as save-worker drives it under a backlog: a fresh
//! SQLite file, then batches of lists, user states and events of 20,000 users, each
//! batch one transaction (`Store::write_shared`), timed in the process's CPU seconds. No
//! Kafka and no decoding: what a change to the store's schema, statements or pragmas does
//! to a write, without the relay's noise.
//! Run: `cargo bench -p save-worker --bench store_write`
//! One run's mean still moved by ±10 % on a shared 2-core VM (BENCHMARKS.md, thirty-ninth
//! session), so compare two builds by alternating their bench binaries, several rounds:
//!   cargo bench -p save-worker --bench store_write --no-run   # prints the binary's path
//!   cp <that path> /tmp/store_write_old   # and likewise for the other build
//!   /tmp/store_write_old --bench --noplot; /tmp/store_write_new --bench --noplot; ...

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use recpipe_shared::events::{
    Event, EventType, LastEvent, RecommendationRecord, ScoredProduct, SourcePosition,
    UserVectorRecord,
};
use recpipe_shared::list_record::ListEncoding;
use recpipe_shared::state_record::StateEncoding;
use recpipe_shared::store::{
    SqliteStore, Store, StoredEvent, StoredList, StoredUserState, WriteBatch,
};

const USERS: usize = 20_000;
const PRODUCTS: usize = 2_000;
const TS: i64 = 1_764_000_000_000;

fn user(u: usize) -> String {
    format!("user-{u:05}")
}

fn product(i: usize) -> String {
    format!("p-{:05}", i % PRODUCTS)
}

/// A list as gen-recommendations makes one: 20 products, each with the product that
/// explains it, in the binary form (about 500 bytes, as in a relay run's store).
fn list(u: usize, version: u64) -> StoredList {
    let record = RecommendationRecord {
        recommendation_id: format!("{:08x}-3b7d-5e10-9c4f-{:012x}", u, version),
        user_id: user(u),
        model_version: "synthetic-v1".into(),
        fallback: None,
        items: (0..20)
            .map(|i| ScoredProduct {
                product_id: product(u * 7 + i * 53),
                score: 0.9 - i as f32 * 0.01,
                because: Some(product(u * 3 + i * 37)),
            })
            .collect(),
        user_version: version,
        source_event_id: Some(format!("{}-e{version:04}", user(u))),
        source_event_ts: Some(TS + version as i64),
        generated_at: TS + version as i64 + 20,
        source: Some(SourcePosition {
            partition: (u % 4) as i32,
            offset: version as i64,
        }),
        input_event_ids: (0..10)
            .map(|i| format!("{}-e{:04}", user(u), version.saturating_sub(i)))
            .collect(),
    };
    StoredList::of(&record, ListEncoding::Binary)
}

/// A user state of ten events, in the binary form.
fn state(u: usize, version: u64) -> StoredUserState {
    let record = UserVectorRecord {
        user_id: user(u),
        vector: (0..32)
            .map(|i| ((u + i) as f32 * 0.37).sin() * 0.2)
            .collect(),
        anchor_ts: TS,
        version,
        recent_products: (0..10).map(|i| product(u * 11 + i * 37)).collect(),
        purchased: vec![product(u * 13)],
        last_event: LastEvent {
            event_id: format!("{}-e{version:04}", user(u)),
            event_type: EventType::View,
            product_id: Some(product(u)),
            ts: TS + version as i64,
        },
        source: SourcePosition {
            partition: (u % 4) as i32,
            offset: version as i64,
        },
        updated_at: TS + version as i64 + 10,
        embeddings: Some("9f2c4e1a7b3d5f60".into()),
        recent_event_ids: (0..10)
            .map(|i| format!("{}-e{:04}", user(u), version.saturating_sub(i)))
            .collect(),
        folded_events: Vec::new(),
    };
    StoredUserState::of(&record, StateEncoding::Binary)
}

fn event(u: usize, n: u64) -> StoredEvent {
    StoredEvent::of(&Event {
        event_id: format!("{}-e{n:04}", user(u)),
        user_id: user(u),
        event_type: EventType::View,
        product_id: Some(product(u * 17 + n as usize)),
        query: None,
        ts: TS + n as i64,
        recommendation_id: None,
    })
}

/// Three rounds of: every user's list, every user's state, 40,000 events (two per user),
/// each a batch of its own as a backlog's batches are (one topic's records at a time).
fn backlog() -> Vec<WriteBatch> {
    let mut batches = Vec::new();
    for round in 0..3u64 {
        let version = round + 1;
        batches.push(WriteBatch {
            recommendations: (0..USERS).map(|u| list(u, version)).collect(),
            ..WriteBatch::default()
        });
        batches.push(WriteBatch {
            user_states: (0..USERS).map(|u| state(u, version)).collect(),
            ..WriteBatch::default()
        });
        batches.push(WriteBatch {
            events: (0..2 * USERS)
                .map(|i| event(i % USERS, round * 2 + (i / USERS) as u64))
                .collect(),
            ..WriteBatch::default()
        });
    }
    batches
}

/// The process's CPU time (user and system, every thread's, those ended included).
/// Timed by CPU rather than by the clock: on a shared VM the host takes CPU back at times
/// (BENCHMARKS.md's "stolen"), which a wall clock counts and the kernel's CPU accounting
/// leaves out.
fn cpu_time() -> Duration {
    Duration::from_millis(recpipe_shared::testkit::cpu_ticks("/proc/self/stat") * 10)
}

fn store_write(c: &mut Criterion) {
    let batches: Vec<std::sync::Arc<WriteBatch>> =
        backlog().into_iter().map(std::sync::Arc::new).collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut group = c.benchmark_group("store_write");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(30));
    group.bench_function("cpu_of_a_backlog_of_20000_users", |b| {
        b.iter_custom(|iterations| {
            let mut spent = Duration::ZERO;
            for _ in 0..iterations {
                let dir = tempfile::tempdir().unwrap();
                let started = cpu_time();
                runtime.block_on(async {
                    let store = SqliteStore::open(&dir.path().join("recpipe.db")).unwrap();
                    for batch in &batches {
                        store.write_shared(batch.clone()).await.unwrap();
                    }
                });
                spent += cpu_time() - started;
            }
            spent
        })
    });
    group.finish();
}

criterion_group!(benches, store_write);
criterion_main!(benches);
