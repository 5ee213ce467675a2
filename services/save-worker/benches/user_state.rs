//! What save-worker does with one `user-vectors` record of a full history (50 products,
//! 50 event ids), and with one `recommendations` record (20 products, each with the
//! product that explains it, and 50 input event ids), against what it did before in the
//! same run: decode the whole record and encode it again for the store. The state and
//! the list are timed in both of their encodings (JSON and the binary form).
//! Run: `cargo bench -p save-worker --bench user_state`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use recpipe_shared::events::{
    EventType, LastEvent, RecommendationRecord, ScoredProduct, SourcePosition, UserVectorRecord,
};
use recpipe_shared::list_record::{self, ListEncoding};
use recpipe_shared::state_record::{self, StateEncoding};
use recpipe_shared::store::{StoredList, StoredUserState};

fn full_history() -> UserVectorRecord {
    UserVectorRecord {
        user_id: "user-0001234".into(),
        vector: (0..32).map(|i| (i as f32 * 0.37).sin() * 0.2).collect(),
        anchor_ts: 1_764_000_000_000,
        version: 60,
        recent_products: (0..50).map(|i| format!("p-{:05}", i * 37 % 2000)).collect(),
        purchased: (0..10).map(|i| format!("p-{:05}", i * 91 % 2000)).collect(),
        last_event: LastEvent {
            event_id: "user-0001234-e0059".into(),
            event_type: EventType::View,
            product_id: Some("p-00042".into()),
            ts: 1_764_000_000_000,
        },
        source: SourcePosition {
            partition: 3,
            offset: 123_456,
        },
        updated_at: 1_764_000_000_100,
        embeddings: Some("9f2c4e1a7b3d5f60".into()),
        recent_event_ids: (0..50)
            .map(|i| format!("user-0001234-e{:04}", 59 - i))
            .collect(),
        folded_events: Vec::new(),
    }
}

fn user_state(c: &mut Criterion) {
    let record = full_history();
    let payload = state_record::encode(&record, StateEncoding::Json);
    let binary = state_record::encode(&record, StateEncoding::Binary);
    let mut group = c.benchmark_group("user_state_record_to_store_row");
    group.bench_function("decode_whole_and_encode_again", |b| {
        b.iter(|| {
            let record: UserVectorRecord = serde_json::from_slice(black_box(&payload)).unwrap();
            black_box(StoredUserState::of(&record, StateEncoding::Json))
        })
    });
    group.bench_function("check_shape_and_pass_through", |b| {
        b.iter(|| black_box(save_worker::stored_user_state(black_box(&payload)).unwrap()))
    });
    group.bench_function("binary_check_and_pass_through", |b| {
        b.iter(|| black_box(save_worker::stored_user_state(black_box(&binary)).unwrap()))
    });
    group.finish();
    // What update-embeddings writes and gen-recommendations reads, in each encoding.
    let mut group = c.benchmark_group("user_state_record");
    let mut out = Vec::new();
    group.bench_function("encode_json", |b| {
        b.iter(|| state_record::encode_into(black_box(&record), StateEncoding::Json, &mut out))
    });
    group.bench_function("encode_binary", |b| {
        b.iter(|| state_record::encode_into(black_box(&record), StateEncoding::Binary, &mut out))
    });
    group.bench_function("decode_json", |b| {
        b.iter(|| black_box(state_record::decode(black_box(&payload)).unwrap()))
    });
    group.bench_function("decode_binary", |b| {
        b.iter(|| black_box(state_record::decode(black_box(&binary)).unwrap()))
    });
    group.finish();
}

fn full_list() -> RecommendationRecord {
    RecommendationRecord {
        recommendation_id: "6f1c2a9e-3b7d-5e10-9c4f-8a2b6d0e1f37".into(),
        user_id: "user-0001234".into(),
        model_version: "synthetic-v1".into(),
        fallback: None,
        items: (0..20)
            .map(|i| ScoredProduct {
                product_id: format!("p-{:05}", i * 53 % 2000),
                score: 0.9 - i as f32 * 0.01,
                because: Some(format!("p-{:05}", i * 37 % 2000)),
            })
            .collect(),
        user_version: 60,
        source_event_id: Some("user-0001234-e0059".into()),
        source_event_ts: Some(1_764_000_000_000),
        generated_at: 1_764_000_000_120,
        source: Some(SourcePosition {
            partition: 3,
            offset: 123_456,
        }),
        input_event_ids: (0..50)
            .map(|i| format!("user-0001234-e{:04}", 59 - i))
            .collect(),
    }
}

fn list(c: &mut Criterion) {
    let record = full_list();
    let json = list_record::encode(&record, ListEncoding::Json);
    let binary = list_record::encode(&record, ListEncoding::Binary);
    let mut group = c.benchmark_group("list_record_to_store_row");
    group.bench_function("decode_whole_and_encode_again", |b| {
        b.iter(|| {
            let record: RecommendationRecord = serde_json::from_slice(black_box(&json)).unwrap();
            black_box(StoredList::of(&record, ListEncoding::Json))
        })
    });
    group.bench_function("check_shape_and_pass_through", |b| {
        b.iter(|| black_box(save_worker::consumed_list(black_box(&json)).unwrap()))
    });
    group.bench_function("binary_check_and_pass_through", |b| {
        b.iter(|| black_box(save_worker::consumed_list(black_box(&binary)).unwrap()))
    });
    group.finish();
    // What the other readers do with each list: the API's view and the load tester's
    // watch read whose it is; gen-recommendations encodes it.
    let mut group = c.benchmark_group("list_record");
    for (name, bytes) in [("json", &json), ("binary", &binary)] {
        group.bench_function(format!("summary_{name}"), |b| {
            b.iter(|| black_box(list_record::summary(black_box(bytes)).unwrap().user_version))
        });
        group.bench_function(format!("decode_{name}"), |b| {
            b.iter(|| black_box(list_record::decode(black_box(bytes)).unwrap()))
        });
    }
    for (name, encoding) in [
        ("json", ListEncoding::Json),
        ("binary", ListEncoding::Binary),
    ] {
        let mut out = Vec::new();
        let list = list_record::ListRef::of(&record);
        group.bench_function(format!("encode_{name}"), |b| {
            b.iter(|| {
                list_record::encode_into(black_box(&list), encoding, &mut out);
                black_box(out.len())
            })
        });
    }
    group.finish();
    println!("list bytes: JSON {}, binary {}", json.len(), binary.len());
}

criterion_group!(benches, user_state, list);
criterion_main!(benches);
