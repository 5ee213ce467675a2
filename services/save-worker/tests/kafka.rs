//! save-worker against a real tansu broker.
//!
//! An action (click, cart, purchase) read before the list it names waits for that list in
//! memory. Its offset is not committed meanwhile, so a save-worker that stops (or
//! crashes) while it waits reads the action again on restart and still counts it.
//!
//! A record that cannot be stored (a damaged list or state, an event that is not JSON) goes
//! to the dead-letter topic as it came, and the records after it are stored.

use std::time::Duration;

use rdkafka::Message;
use recpipe_shared::events::EventType;
use recpipe_shared::kafka::framework::{self, dlq_headers};
use recpipe_shared::list_record::{self, ListEncoding};
use recpipe_shared::state_record::{self, StateEncoding};
use recpipe_shared::store::{self, Store};
use recpipe_shared::testkit::{
    event, eventually, header, list, produce, read_topic, state, TestEnv,
};
use save_worker::SaveWorker;
use tokio_util::sync::CancellationToken;

async fn clicks_counted(store: &dyn Store, day: i64) -> u64 {
    let counts = store.experiment_counts(day, day).await.unwrap();
    counts.iter().map(|c| c.clicks).sum()
}

#[tokio::test]
async fn an_action_awaiting_its_list_when_the_worker_stops_is_counted_after_a_restart() {
    let env = TestEnv::start().await;
    let store = store::open(&env.settings.store.url).await.unwrap();
    let ts = 1_700_000_000_000i64;
    let day = store::day_of(ts);
    let shown = list("u1", 1, &["p-00002", "p-00003"]);
    let mut click = event("c1", "u1", EventType::Click, "p-00002", ts);
    click.recommendation_id = Some(shown.recommendation_id.clone());
    // A later event of the same partition: without the hold it would carry the commit
    // past the click.
    let later = event("v2", "u1", EventType::View, "p-00009", ts + 1);
    env.send_events(&[click, later]).await;

    let shutdown = CancellationToken::new();
    let worker = SaveWorker::new(store.clone(), env.settings.kafka.topics.clone());
    let (kafka, stop) = (env.settings.kafka.clone(), shutdown.clone());
    let first = tokio::spawn(async move { framework::run(&kafka, worker, stop).await.unwrap() });
    eventually(Duration::from_secs(60), "both events stored", || {
        let store = store.clone();
        async move { (store.user_events("u1", 10).await.unwrap().len() == 2).then_some(()) }
    })
    .await;
    // Stopped while the click waits for its list (it would wait 30 s).
    shutdown.cancel();
    let stats = first.await.unwrap();
    assert_eq!(stats.records, 2);
    assert_eq!(
        clicks_counted(&*store, day).await,
        0,
        "its list has not come"
    );

    // The list comes while no worker runs.
    produce(
        &env.broker.brokers(),
        &env.settings.kafka.topics.recommendations,
        "u1",
        &serde_json::to_vec(&shown).unwrap(),
    )
    .await;
    let shutdown = CancellationToken::new();
    let worker = SaveWorker::new(store.clone(), env.settings.kafka.topics.clone());
    let (kafka, stop) = (env.settings.kafka.clone(), shutdown.clone());
    let second = tokio::spawn(async move { framework::run(&kafka, worker, stop).await.unwrap() });
    let clicks = eventually(Duration::from_secs(60), "the click counted", || {
        let store = store.clone();
        async move { Some(clicks_counted(&*store, day).await).filter(|&n| n > 0) }
    })
    .await;
    assert_eq!(clicks, 1);
    shutdown.cancel();
    let stats = second.await.unwrap();
    assert_eq!(
        stats.records, 3,
        "the click and the event after it were read again, with the list"
    );
    assert_eq!(
        store.user_events("u1", 10).await.unwrap().len(),
        2,
        "stored once"
    );
}

#[tokio::test]
async fn a_damaged_record_on_each_topic_is_dead_lettered_and_the_next_good_one_stored() {
    let env = TestEnv::start().await;
    let store = store::open(&env.settings.store.url).await.unwrap();
    let topics = env.settings.kafka.topics.clone();
    let brokers = env.broker.brokers();

    // Each damaged record is a good one of the binary forms cut short (its magic bytes
    // intact, so it is read as that form), or an event that is not JSON; a good record of
    // the same user follows each.
    let good_list = list("u1", 2, &["p-00002", "p-00003"]);
    let mut cut_list = list_record::encode(&list("u1", 1, &["p-00004"]), ListEncoding::Binary);
    cut_list.truncate(cut_list.len() / 2);
    let mut cut_state = state_record::encode(&state("u1", 1), StateEncoding::Binary);
    cut_state.truncate(cut_state.len() / 2);
    let not_json = b"{\"event_id\":\"e0\",\"user_id\":\"u1\"".to_vec();
    let damaged = [
        (&topics.recommendations, cut_list, "invalid recommendation"),
        (&topics.user_vectors, cut_state, "invalid user vector"),
        (&topics.events, not_json, "invalid event"),
    ];
    for (topic, bytes, _) in &damaged {
        produce(&brokers, topic, "u1", bytes).await;
    }
    produce(
        &brokers,
        &topics.recommendations,
        "u1",
        &list_record::encode(&good_list, ListEncoding::Binary),
    )
    .await;
    produce(
        &brokers,
        &topics.user_vectors,
        "u1",
        &state_record::encode(&state("u1", 2), StateEncoding::Binary),
    )
    .await;
    env.send_events(&[event(
        "e1",
        "u1",
        EventType::View,
        "p-00001",
        1_700_000_000_000,
    )])
    .await;

    let shutdown = CancellationToken::new();
    let worker = SaveWorker::new(store.clone(), topics.clone());
    let (kafka, stop) = (env.settings.kafka.clone(), shutdown.clone());
    let running = tokio::spawn(async move { framework::run(&kafka, worker, stop).await.unwrap() });

    let dead = read_topic(
        &brokers,
        &topics.dead_letters,
        damaged.len(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(dead.len(), damaged.len());
    for (topic, bytes, reason) in &damaged {
        let m = dead
            .iter()
            .find(|m| header(m, dlq_headers::TOPIC).as_deref() == Some(topic.as_str()))
            .unwrap_or_else(|| panic!("nothing dead-lettered from {topic}"));
        assert_eq!(m.payload().unwrap(), bytes.as_slice(), "kept as it came");
        let why = header(m, dlq_headers::REASON).unwrap();
        assert!(
            why.contains(reason),
            "{topic}: {why:?} should say {reason:?}"
        );
        assert_eq!(
            header(m, dlq_headers::SERVICE).as_deref(),
            Some("save-worker")
        );
    }

    eventually(Duration::from_secs(60), "the good records stored", || {
        let store = store.clone();
        async move {
            let list = store.latest_recommendations("u1").await.unwrap()?;
            let state = store.user_state("u1").await.unwrap()?;
            let events = store.user_events("u1", 10).await.unwrap();
            (!events.is_empty()).then_some((list, state, events))
        }
    })
    .await;
    let (list, state, events) = (
        store.latest_recommendations("u1").await.unwrap().unwrap(),
        store.user_state("u1").await.unwrap().unwrap(),
        store.user_events("u1", 10).await.unwrap(),
    );
    assert_eq!(list.recommendation_id, good_list.recommendation_id);
    assert_eq!(state.version, 2);
    assert_eq!(
        events
            .iter()
            .map(|e| e.event_id.as_str())
            .collect::<Vec<_>>(),
        ["e1"]
    );
    shutdown.cancel();
    let stats = running.await.unwrap();
    assert_eq!(stats.dead_lettered, damaged.len() as u64);
}
