//! What update-embeddings does for each event against a user's history: look for an id
//! among the 50 most recent (the event's own id, to skip a producer's retry; the product,
//! to move it to the front). Ids compared as `==` does (length, then `memcmp`) against
//! [`same_id`] (length, last byte, then the rest), in the same run, on the load tester's
//! event ids (one long shared prefix, a sequence number) and the catalog's product ids.
//! Run: `cargo bench -p recpipe-shared --bench history`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use recpipe_shared::model::same_id;

fn history(c: &mut Criterion) {
    let event_ids: Vec<String> = (0..50)
        .map(|i| format!("pipe-1796488415239-{}", 148_020 - 7 * i))
        .collect();
    let products: Vec<String> = (0..50).map(|i| format!("p-{:05}", 17 * i + 3)).collect();
    let mut group = c.benchmark_group("history_lookup");
    for (name, list, absent, present) in [
        (
            "event_ids",
            &event_ids,
            "pipe-1796488415239-148021",
            event_ids[31].as_str(),
        ),
        ("products", &products, "p-01999", products[31].as_str()),
    ] {
        for (what, id) in [("absent", absent), ("present", present)] {
            group.bench_function(format!("{name}_{what}_eq"), |b| {
                b.iter(|| black_box(list).iter().position(|x| x == black_box(id)))
            });
            group.bench_function(format!("{name}_{what}_same_id"), |b| {
                b.iter(|| {
                    black_box(list)
                        .iter()
                        .position(|x| same_id(x, black_box(id)))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, history);
criterion_main!(benches);
