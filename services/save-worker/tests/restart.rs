//! An action (click, cart, purchase) read before the list it names waits for that list in
//! memory. Its offset is not committed meanwhile, so a save-worker that stops (or
//! crashes) while it waits reads the action again on restart and still counts it.

use std::time::Duration;

use recpipe_shared::events::EventType;
use recpipe_shared::kafka::framework;
use recpipe_shared::store::{self, Store};
use recpipe_shared::testkit::{event, eventually, list, produce, TestEnv};
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
