//! The whole pipeline, end to end: a real tansu broker, the four services in this
//! process, the embedded store, and HTTP calls as a storefront makes them.

use std::collections::HashSet;

use query_api::routes::RecommendationsResponse;
use recpipe_shared::events::{Event, EventType, Fallback};
use recpipe_shared::testkit::{event, eventually};
use serde_json::{json, Value};

mod common;
use common::*;

#[tokio::test]
async fn events_in_recommendations_out() {
    let app = spawn_app().await;
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "{}", ready.text().await.unwrap());

    let (kitchen, kitchen_bought) = shopper(&app, "alice", "kitchen", 12);
    let (audio, audio_bought) = shopper(&app, "bob", "audio", 12);
    let all: Vec<Event> = kitchen.iter().chain(&audio).cloned().collect();
    let r = app.post_events(&serde_json::to_value(&all).unwrap()).await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.json::<Value>().await.unwrap()["accepted"], 26);

    for (user, events, bought, category) in [
        ("alice", &kitchen, &kitchen_bought, "kitchen"),
        ("bob", &audio, &audio_bought, "audio"),
    ] {
        // The list made from the user's last event is the one to judge.
        let list = eventually(WAIT, &format!("{user}'s recommendations"), || async {
            let list = app.recommendations(user, 10).await;
            (list.fallback.is_none()
                && list.items.len() == 10
                && list.recommendation_id
                    == recpipe_shared::model::recommendation_id(user, 13, "synthetic-v1"))
            .then_some(list)
        })
        .await;
        let touched: HashSet<&str> = events
            .iter()
            .filter_map(|e| e.product_id.as_deref())
            .collect();
        for item in &list.items {
            assert_ne!(
                &item.product_id, bought,
                "{user} was recommended what they bought"
            );
            assert!(
                !touched.contains(item.product_id.as_str()),
                "{user} was recommended {} they already saw",
                item.product_id
            );
        }
        let same = list.items.iter().filter(|i| i.category == category).count();
        assert!(
            same >= 7,
            "{user} viewed only {category} but got {same}/10 of it: {:?}",
            list.items
        );
        assert!(list.items.windows(2).all(|w| w[0].score >= w[1].score));
        assert!(list.items.iter().all(|i| !i.title.is_empty()));
        // Each item is explained by a product the user viewed.
        for item in &list.items {
            let because = item.because.as_ref().expect("an explanation");
            assert!(touched.contains(because.product_id.as_str()), "{because:?}");
        }
    }

    // Category filter, computed from the user's stored state. The list above came from
    // the recommendations topic; save-worker may store the state a fetch later, and
    // until then the API can only answer with the catalog's garden products.
    let garden = eventually(WAIT, "her stored state", || async {
        let l: RecommendationsResponse = app
            .get_json("/v1/users/alice/recommendations?k=5&category=garden")
            .await;
        assert!(l.items.iter().all(|i| i.category == "garden"), "{l:?}");
        (l.fallback.is_none() && l.source_event_id.as_deref() == Some("alice-buy")).then_some(l)
    })
    .await;
    assert_eq!(garden.items.len(), 5);
    let r = app
        .client
        .get(app.url("/v1/users/alice/recommendations?category=spaceships"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("known: audio"));

    // Similar products.
    let similar: Value = app
        .get_json(&format!("/v1/products/{kitchen_bought}/similar?k=5"))
        .await;
    let items = similar["items"].as_array().unwrap();
    assert_eq!(items.len(), 5);
    assert!(items
        .iter()
        .all(|i| i["product_id"] != kitchen_bought.as_str()));
    assert!(
        items.iter().filter(|i| i["category"] == "kitchen").count() >= 4,
        "{similar}"
    );
    let r = app
        .client
        .get(app.url("/v1/products/nope/similar"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // A new user is personalised from their first event.
    let first = event(
        "carol-1",
        "carol",
        EventType::View,
        &kitchen_bought,
        1_700_000_200_000,
    );
    assert_eq!(
        app.post_events(&serde_json::to_value(&first).unwrap())
            .await
            .status(),
        202
    );
    let carol = eventually(WAIT, "carol's first list", || async {
        let l = app.recommendations("carol", 10).await;
        (l.source_event_id.as_deref() == Some("carol-1")).then_some(l)
    })
    .await;
    assert_eq!(carol.fallback, None);
    assert!(
        carol
            .items
            .iter()
            .filter(|i| i.category == "kitchen")
            .count()
            >= 7
    );

    // Every event is stored, newest first.
    let stored = eventually(WAIT, "stored events", || async {
        let v: Value = app.get_json("/v1/users/alice/events?limit=100").await;
        (v["events"].as_array().unwrap().len() == 13).then_some(v)
    })
    .await;
    assert_eq!(stored["events"][0]["event_id"], "alice-buy");

    // A user never seen gets the popularity list, marked as such, not an error. The list
    // is republished every 2 s as events are counted: wait for one of five products.
    let stranger = eventually(WAIT, "the popularity list", || async {
        let l = app.recommendations("stranger", 5).await;
        (l.fallback == Some(Fallback::Popularity) && l.items.len() >= 5).then_some(l)
    })
    .await;
    let popular: HashSet<&str> = all.iter().filter_map(|e| e.product_id.as_deref()).collect();
    assert!(stranger
        .items
        .iter()
        .all(|i| popular.contains(i.product_id.as_str())));
    assert_eq!(stranger.items.len(), 5);

    // A bad request is counted under its status too.
    let bad = app
        .client
        .get(app.url("/v1/users/sam/recommendations?k=many"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    // The figures are there for Prometheus, GET recommendations' among them though it
    // counts itself outside the other routes' middleware.
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"recpipe_http_requests_total{route="/v1/events",status="202"}"#),
        "{metrics}"
    );
    for status in ["200", "400"] {
        assert!(
            metrics.contains(&format!(
                r#"recpipe_http_requests_total{{route="/v1/users/{{user_id}}/recommendations",status="{status}"}}"#
            )),
            "{metrics}"
        );
    }
    assert!(
        metrics.contains(
            r#"recpipe_http_request_seconds_count{route="/v1/users/{user_id}/recommendations"}"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"recpipe_recommendations_served_total{kind="popularity",version="#),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"recpipe_records_total{service="update-embeddings",outcome="processed"}"#),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_400_that_says_what_is_wrong() {
    let app = spawn_app().await;
    let cases = [
        (
            json!({"event_id": "e", "user_id": "u", "type": "view", "ts": 1}),
            "product_id",
        ),
        (
            json!({"event_id": "e", "user_id": "u", "type": "fly", "product_id": "p-00001", "ts": 1}),
            "fly",
        ),
        (
            json!({"event_id": "e", "user_id": "u", "type": "view", "product_id": "nope", "ts": 1_700_000_000_000_i64}),
            "unknown product",
        ),
        (
            json!([{"event_id": "e", "user_id": "u", "type": "view", "product_id": "p-00001", "ts": "yesterday"}]),
            "\"index\":0",
        ),
        (json!([]), "1 to 1000"),
        (json!(42), "event object"),
    ];
    for (body, expected) in cases {
        let r = app.post_events(&body).await;
        assert_eq!(r.status(), 400, "{body}");
        let text = r.text().await.unwrap();
        assert!(text.contains(expected), "{body} → {text}");
        assert!(serde_json::from_str::<Value>(&text).unwrap()["error"].is_string());
    }
    for raw in [
        &b"{oops"[..],
        b"\xff\xfe",
        br#"{"ts": NaN}"#,
        br#"{"ts": 1e400}"#,
    ] {
        let r = app
            .client
            .post(app.url("/v1/events"))
            .body(raw.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{raw:?}");
        assert!(r.text().await.unwrap().contains("not valid JSON"));
    }
    // Bodies over api.max_body_bytes are refused before they are read.
    let huge = format!(r#"{{"pad": "{}"}}"#, "x".repeat(2 << 20));
    let r = app
        .client
        .post(app.url("/v1/events"))
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    for query in ["k=0", "k=100000", "k=ten"] {
        let r = app
            .client
            .get(app.url(&format!("/v1/users/u/recommendations?{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{query}");
    }
    // Before any traffic an unknown user still gets a list: the catalog fallback.
    let list = app.recommendations("nobody", 3).await;
    assert_eq!(list.fallback, Some(Fallback::Catalog));
    assert_eq!(list.items.len(), 3);
    app.stop().await;
}

#[tokio::test]
async fn posting_events_takes_a_valid_key_within_its_rate_and_cors_follows_settings() {
    let app = spawn_app_with(|s| {
        s.api.api_keys = vec!["shop-key".into(), "other-key".into()];
        s.api.rate_limit_per_key = 3;
        s.api.cors_origins = vec!["https://shop.example".into()];
    })
    .await;
    let body = serde_json::to_value(event(
        "k1",
        "kim",
        EventType::View,
        "p-00001",
        1_700_000_000_000,
    ))
    .unwrap();
    let post = |key: Option<&str>, bearer: bool| {
        let mut r = app.client.post(app.url("/v1/events")).json(&body);
        if let Some(k) = key {
            r = if bearer {
                r.bearer_auth(k)
            } else {
                r.header("x-api-key", k)
            };
        }
        r.send()
    };
    assert_eq!(post(None, false).await.unwrap().status(), 401);
    let wrong = post(Some("shop-ke"), false).await.unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(wrong.text().await.unwrap().contains("x-api-key"));
    assert_eq!(post(Some("shop-key"), false).await.unwrap().status(), 202);
    assert_eq!(post(Some("other-key"), true).await.unwrap().status(), 202);
    // GETs need no key.
    assert_eq!(
        app.client
            .get(app.url("/v1/users/kim/recommendations"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // 3 per second per key: a burst of 6 from one key is cut, the other key is unaffected.
    // The burst is sent at once: one POST after another, each waiting for Kafka's
    // acknowledgement, could take long enough on a loaded machine for the key's quota
    // to refill between them.
    let burst = futures::future::join_all((0..6).map(|_| post(Some("shop-key"), false))).await;
    let mut statuses = Vec::new();
    for answer in burst {
        let answer = answer.unwrap();
        if answer.status() == 429 {
            assert_eq!(answer.headers()["retry-after"], "1");
        }
        statuses.push(answer.status().as_u16());
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| [202, 429].contains(s)),
        "{statuses:?}"
    );
    assert_eq!(post(Some("other-key"), false).await.unwrap().status(), 202);

    // CORS: the configured origin is allowed, others get no CORS headers.
    let preflight = |origin: &str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.url("/v1/events"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
    };
    let ok = preflight("https://shop.example").await.unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    let other = preflight("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    // GET recommendations, outside the other routes' layers, still answers with CORS.
    let get_from = |origin: &str| {
        app.client
            .get(app.url("/v1/users/kim/recommendations"))
            .header("origin", origin)
            .send()
    };
    let ok = get_from("https://shop.example").await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    let other = get_from("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    app.stop().await;
}

#[tokio::test]
async fn a_lone_event_is_not_held_for_the_linger() {
    // Events linger to share broker requests with others; one that comes after a quiet
    // spell is sent at once. With a two-minute linger, a lone POST must still be
    // acknowledged within WAIT (a minute).
    let app = spawn_app_with(|s| {
        s.api.events_linger_ms = 120_000;
        s.kafka.delivery_timeout_ms = 300_000; // librdkafka wants it above the linger
    })
    .await;
    let body = serde_json::to_value(event(
        "lone-1",
        "lena",
        EventType::View,
        "p-00001",
        1_700_000_000_000,
    ))
    .unwrap();
    let answer = tokio::time::timeout(WAIT, app.post_events(&body))
        .await
        .expect("the lone event waited for the linger");
    assert_eq!(answer.status(), 202);
    app.stop().await;
}
