//! Property-based fuzzing of the event decoder: whatever bytes arrive, decoding returns a
//! value or an error (never a panic), and what the Rust decoder accepts the JSON Schema
//! accepts too. Run longer with `PROPTEST_CASES=200000 cargo test -p recpipe-shared --test fuzz_event_decoder`.

use proptest::prelude::*;
use recpipe_shared::events::{Event, EventType};
use recpipe_shared::schema::event_validator;

fn field_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"view\"".to_string()),
        Just("\"search\"".to_string()),
        Just("\"purchase\"".to_string()),
        Just("null".to_string()),
        Just("1e400".to_string()),
        Just("-1".to_string()),
        Just("1700000000000".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        "[a-z0-9-]{0,200}".prop_map(|s| format!("\"{s}\"")),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
    ]
}

/// JSON objects made of the event's field names (and a stranger) with any values.
fn event_like() -> impl Strategy<Value = String> {
    let names = prop::sample::subsequence(
        vec![
            "event_id",
            "user_id",
            "type",
            "product_id",
            "query",
            "ts",
            "recommendation_id",
            "extra",
        ],
        0..8,
    );
    (names, prop::collection::vec(field_value(), 8)).prop_map(|(names, values)| {
        let fields: Vec<String> = names
            .iter()
            .zip(values)
            .map(|(n, v)| format!("\"{n}\":{v}"))
            .collect();
        format!("{{{}}}", fields.join(","))
    })
}

fn valid_event() -> impl Strategy<Value = Event> {
    (
        "[a-zA-Z0-9_-]{1,128}",
        "[a-zA-Z0-9_-]{1,128}",
        0usize..5,
        "[a-z0-9-]{1,64}",
        0i64..32_503_680_000_000,
    )
        .prop_map(|(id, user, t, p, ts)| {
            let event_type = EventType::ALL[t];
            let search = event_type == EventType::Search;
            Event {
                event_id: id,
                user_id: user,
                event_type,
                product_id: (!search).then(|| p.clone()),
                query: search.then_some(p),
                ts,
                recommendation_id: None,
            }
        })
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Event::from_json(&bytes);
    }

    #[test]
    fn what_rust_accepts_the_schema_accepts(doc in event_like()) {
        if let Ok(event) = Event::from_json(doc.as_bytes()) {
            let value: serde_json::Value = serde_json::from_str(&doc).unwrap();
            prop_assert!(event_validator().violations(&value).is_empty(), "schema rejects {} accepted as {:?}", doc, event);
        }
    }

    #[test]
    fn valid_events_round_trip(event in valid_event()) {
        let bytes = serde_json::to_vec(&event).unwrap();
        prop_assert_eq!(Event::from_json(&bytes).unwrap(), event);
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        prop_assert!(event_validator().violations(&value).is_empty());
    }
}
