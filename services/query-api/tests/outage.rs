//! POST /v1/events while the broker is down: a 503 that says what to do, answered after
//! `api.events_ack_timeout_ms` rather than the producer's 30 s delivery timeout, and the
//! same events accepted once the broker is back.

mod common;

use std::time::{Duration, Instant};

use common::start_api;
use rdkafka::Message;
use recpipe_shared::events::{now_ms, EventType};
use recpipe_shared::testkit::{event, eventually, read_topic_until, TestBroker, TestEnv};
use serde_json::Value;

#[tokio::test]
async fn a_post_in_a_broker_outage_gets_a_503_at_the_ack_timeout_and_its_retry_is_accepted_after() {
    // Durable: the topics are still there after the restart.
    let mut env = TestEnv::with_broker(TestBroker::start_durable().await).await;
    env.settings.api.events_ack_timeout_ms = 1_500;
    let api = start_api(&env.settings).await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/events", api.address);
    let ts = now_ms();
    let before = event("before", "u1", EventType::View, "p-00001", ts);
    let r = client.post(&url).json(&before).send().await.unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());

    env.broker.kill();
    let during = event("during", "u1", EventType::View, "p-00002", ts);
    let started = Instant::now();
    let r = client.post(&url).json(&during).send().await.unwrap();
    let waited = started.elapsed();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("not acknowledged") && error.contains("retry later with the same event ids"),
        "{error}"
    );
    // It waited for the acknowledgement, and not for the producer's delivery timeout
    // (kafka.delivery_timeout_ms, 30 s), which is what answered before.
    assert!(waited >= Duration::from_millis(1_500), "{waited:?}");
    assert!(waited < Duration::from_secs(20), "{waited:?}");

    env.broker.restart().await;
    eventually(
        Duration::from_secs(60),
        "the retried POST is accepted once the broker is back",
        || {
            let (client, url, during) = (client.clone(), url.clone(), during.clone());
            async move {
                let r = client.post(&url).json(&during).send().await.ok()?;
                (r.status() == 202).then_some(())
            }
        },
    )
    .await;
    let records = read_topic_until(
        &env.broker.brokers(),
        &env.settings.kafka.topics.events,
        Duration::from_secs(30),
        |records| {
            records.iter().any(|m| {
                m.payload()
                    .is_some_and(|p| p.windows(8).any(|w| w == b"\"during\""))
            })
        },
    )
    .await;
    let ids: Vec<String> = records
        .iter()
        .filter_map(|m| serde_json::from_slice::<Value>(m.payload()?).ok())
        .map(|v| v["event_id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(ids.contains(&"before".to_string()), "{ids:?}");
    assert!(ids.contains(&"during".to_string()), "{ids:?}");
    api.stop().await;
}
