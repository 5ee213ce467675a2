//! Backpressure: while the store fails, save-worker retries the batch with backoff,
//! commits nothing and reports not ready; when the store returns it catches up, and no
//! record is lost, and none is counted twice (impressions of a retried batch). A batch's
//! write runs on while the next batch is read: when it fails, it is written again before
//! anything else, and its offsets stay held until then, a stop included: what was not
//! stored is read again by the next run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use recpipe_shared::admin::Health;
use recpipe_shared::events::{Event, EventType, RecommendationRecord, UserVectorRecord};
use recpipe_shared::kafka::framework::{self, Decoded, HeldOffset, Processor, RecordMeta};
use recpipe_shared::settings::Topics;
use recpipe_shared::store::{self, Store, StoreError, WriteBatch};
use recpipe_shared::testkit::{event, eventually, produce, TestEnv};
use save_worker::SaveWorker;
use tokio_util::sync::CancellationToken;

/// A real store whose first `failures` writes fail, as during an outage, after its first
/// `panics` writes panic, as a bug in a driver would.
struct FlakyStore {
    inner: Arc<dyn Store>,
    panics: AtomicUsize,
    failures: AtomicUsize,
    attempts: AtomicUsize,
}

impl FlakyStore {
    fn over(inner: Arc<dyn Store>, panics: usize, failures: usize) -> Arc<FlakyStore> {
        Arc::new(FlakyStore {
            inner,
            panics: AtomicUsize::new(panics),
            failures: AtomicUsize::new(failures),
            attempts: AtomicUsize::new(0),
        })
    }
}

/// The ids of `events`, in order.
fn ids(events: Vec<Event>) -> Vec<String> {
    events.into_iter().map(|e| e.event_id).collect()
}

/// Waits until the worker reports not ready; returns the problem it reports.
async fn not_ready(health: &Health) -> String {
    eventually(
        Duration::from_secs(30),
        "not ready during the outage",
        || {
            let problem = (!health.is_ready()).then(|| health.problem()).flatten();
            async move { problem }
        },
    )
    .await
}

/// The embedded store in a new file of `dir`.
async fn store_in(dir: &tempfile::TempDir) -> Arc<dyn Store> {
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    store::open(&url).await.unwrap()
}

#[async_trait]
impl Store for FlakyStore {
    async fn write_shared(&self, batch: Arc<WriteBatch>) -> Result<(), StoreError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if self.panics.load(Ordering::SeqCst) > 0 {
            self.panics.fetch_sub(1, Ordering::SeqCst);
            panic!("injected panic in the store's write");
        }
        if self.failures.load(Ordering::SeqCst) > 0 {
            self.failures.fetch_sub(1, Ordering::SeqCst);
            return Err(StoreError::Query("injected outage".into()));
        }
        self.inner.write_shared(batch).await
    }
    async fn latest_recommendations(
        &self,
        user_id: &str,
    ) -> Result<Option<RecommendationRecord>, StoreError> {
        self.inner.latest_recommendations(user_id).await
    }
    async fn users_with_lists(&self, limit: usize) -> Result<Option<Vec<String>>, StoreError> {
        self.inner.users_with_lists(limit).await
    }
    async fn user_events(&self, user_id: &str, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.inner.user_events(user_id, limit).await
    }
    async fn user_state(&self, user_id: &str) -> Result<Option<UserVectorRecord>, StoreError> {
        self.inner.user_state(user_id).await
    }
    async fn recommendation(
        &self,
        user_id: &str,
        recommendation_id: &str,
    ) -> Result<Option<RecommendationRecord>, StoreError> {
        self.inner.recommendation(user_id, recommendation_id).await
    }
    async fn impression_tally(
        &self,
        arm: &str,
        day: i64,
        source_partition: i32,
    ) -> Result<Option<store::ImpressionTally>, StoreError> {
        self.inner
            .impression_tally(arm, day, source_partition)
            .await
    }
    async fn experiment_counts(
        &self,
        from_day: i64,
        to_day: i64,
    ) -> Result<Vec<store::ArmCounts>, StoreError> {
        self.inner.experiment_counts(from_day, to_day).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}

#[tokio::test]
async fn a_store_outage_is_retried_reported_and_caught_up_without_loss() {
    let env = TestEnv::start().await;
    let inner = store::open(&env.settings.store.url).await.unwrap();
    let flaky = FlakyStore::over(inner.clone(), 0, 4);
    let events: Vec<Event> = (0..20)
        .map(|i| {
            let user = format!("u{}", i % 4);
            event(
                &format!("e{i}"),
                &user,
                EventType::View,
                "p-00001",
                1_700_000_000_000 + i,
            )
        })
        .collect();
    env.send_events(&events).await;
    // Impressions in the same outage: a retried batch must count each once.
    let ts = 1_700_000_000_000i64;
    for i in 0..30 {
        let impression = serde_json::json!({
            "impression_id": format!("i{i}"),
            "user_id": format!("u{}", i % 4),
            "recommendation_id": "r1",
            "model_version": "v1",
            "items": [],
            "ts": ts + i,
        });
        produce(
            &env.broker.brokers(),
            &env.settings.kafka.topics.impressions,
            &format!("u{}", i % 4),
            &serde_json::to_vec(&impression).unwrap(),
        )
        .await;
    }
    let health = Health::new();
    let shutdown = CancellationToken::new();
    let worker = SaveWorker::new(flaky.clone(), env.settings.kafka.topics.clone());
    let (kafka, h, t) = (env.settings.kafka.clone(), health.clone(), shutdown.clone());
    let run = tokio::spawn(async move {
        framework::run_with_health(&kafka, worker, t, h)
            .await
            .unwrap()
    });

    let problem = not_ready(&health).await;
    assert!(problem.contains("injected outage"), "{problem}");

    let stored = eventually(Duration::from_secs(60), "all 20 events stored", || {
        let inner = inner.clone();
        async move {
            let mut n = 0;
            for u in 0..4 {
                n += inner
                    .user_events(&format!("u{u}"), 100)
                    .await
                    .unwrap()
                    .len();
            }
            (n == 20).then_some(n)
        }
    })
    .await;
    assert_eq!(stored, 20);
    let day = store::day_of(ts);
    let impressions = eventually(Duration::from_secs(60), "30 impressions counted", || {
        let inner = inner.clone();
        async move {
            let counts = inner.experiment_counts(day, day).await.unwrap();
            let n: u64 = counts.iter().map(|c| c.impressions).sum();
            (n >= 30).then_some(n)
        }
    })
    .await;
    assert_eq!(impressions, 30, "each impression counted once");
    assert!(health.is_ready(), "ready again once the store answers");
    assert!(
        flaky.attempts.load(Ordering::SeqCst) >= 5,
        "the failing writes were retried"
    );
    shutdown.cancel();
    let stats = run.await.unwrap();
    let counts = inner.experiment_counts(day, day).await.unwrap();
    assert_eq!(counts.iter().map(|c| c.impressions).sum::<u64>(), 30);
    assert_eq!(
        stats.records, 50,
        "each record was consumed once: the failed batch was retried, not re-read"
    );
}

/// `e` as the worker gets it from the events topic at `offset` of partition 0.
fn decoded(worker: &SaveWorker, offset: i64, e: &Event) -> Decoded<save_worker::Record> {
    let meta = RecordMeta {
        topic: Topics::default().events,
        partition: 0,
        offset,
        key: None,
    };
    let input = worker
        .decode(&meta, &serde_json::to_vec(e).unwrap())
        .expect("a valid event");
    Decoded { meta, input }
}

#[tokio::test]
async fn a_failed_write_keeps_its_offsets_held_and_is_written_again_before_the_next_batch() {
    let dir = tempfile::tempdir().unwrap();
    let inner = store_in(&dir).await;
    let flaky = FlakyStore::over(inner.clone(), 0, 2);
    let mut worker = SaveWorker::new(flaky.clone(), Topics::default());
    let ts = 1_700_000_000_000;
    let first = event("e1", "u1", EventType::View, "p-00001", ts);
    let second = event("e2", "u2", EventType::View, "p-00002", ts);

    // The batch is handed over and its write left running (it fails).
    worker
        .process(vec![decoded(&worker, 10, &first)])
        .await
        .unwrap();
    let held = vec![HeldOffset {
        topic: Topics::default().events,
        partition: 0,
        offset: 10,
    }];
    assert_eq!(worker.held_offsets(), held, "held while its write runs");
    let failed = worker.settle().await.unwrap_err();
    assert!(failed.0.contains("injected outage"), "{failed}");
    assert_eq!(worker.held_offsets(), held, "and after it failed");

    // The next batch is not taken while the last one's write fails (its second try).
    assert!(worker
        .process(vec![decoded(&worker, 11, &second)])
        .await
        .is_err());
    assert_eq!(flaky.attempts.load(Ordering::SeqCst), 2);
    assert_eq!(
        worker.held_offsets(),
        held,
        "the refused batch holds nothing"
    );
    assert!(inner.user_events("u1", 10).await.unwrap().is_empty());

    // The store is back: the next try writes the first batch, then takes the second.
    worker
        .process(vec![decoded(&worker, 11, &second)])
        .await
        .unwrap();
    assert_eq!(ids(inner.user_events("u1", 10).await.unwrap()), ["e1"]);
    assert_eq!(
        worker.held_offsets(),
        vec![HeldOffset {
            offset: 11,
            ..held[0].clone()
        }],
        "only the second batch's write is left"
    );
    worker.settle().await.unwrap();
    assert_eq!(ids(inner.user_events("u2", 10).await.unwrap()), ["e2"]);
    assert_eq!(worker.held_offsets(), vec![]);
    assert_eq!(
        flaky.attempts.load(Ordering::SeqCst),
        4,
        "two failed tries, then one write of each batch"
    );
}

#[tokio::test]
async fn a_write_that_panics_is_a_failed_write_its_batch_written_again_and_held_until_then() {
    let dir = tempfile::tempdir().unwrap();
    let inner = store_in(&dir).await;
    let flaky = FlakyStore::over(inner.clone(), 1, 0);
    let mut worker = SaveWorker::new(flaky.clone(), Topics::default());
    let e = event("e1", "u1", EventType::View, "p-00001", 1_700_000_000_000);
    worker.process(vec![decoded(&worker, 7, &e)]).await.unwrap();

    let failed = worker.settle().await.unwrap_err();
    assert!(failed.0.contains("store write task"), "{failed}");
    assert_eq!(
        worker.held_offsets(),
        vec![HeldOffset {
            topic: Topics::default().events,
            partition: 0,
            offset: 7,
        }],
        "not committed past a batch that is not stored"
    );

    worker.settle().await.unwrap();
    assert_eq!(ids(inner.user_events("u1", 10).await.unwrap()), ["e1"]);
    assert_eq!(worker.held_offsets(), vec![]);
    assert_eq!(flaky.attempts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_stop_while_the_store_is_down_commits_nothing_unstored_and_the_next_run_stores_it() {
    let env = TestEnv::start().await;
    let inner = store::open(&env.settings.store.url).await.unwrap();
    let down = FlakyStore::over(inner.clone(), 0, usize::MAX);
    let events: Vec<Event> = (0..5)
        .map(|i| {
            event(
                &format!("e{i}"),
                "u1",
                EventType::View,
                "p-00001",
                1_700_000_000_000 + i,
            )
        })
        .collect();
    env.send_events(&events).await;
    let run = |store: Arc<dyn Store>, health: Arc<Health>, shutdown: CancellationToken| {
        let worker = SaveWorker::new(store, env.settings.kafka.topics.clone());
        let kafka = env.settings.kafka.clone();
        tokio::spawn(async move {
            framework::run_with_health(&kafka, worker, shutdown, health)
                .await
                .unwrap()
        })
    };

    // The store is down: the batch's write fails, and the worker is stopped meanwhile.
    let health = Health::new();
    let shutdown = CancellationToken::new();
    let first = run(down.clone(), health.clone(), shutdown.clone());
    let problem = not_ready(&health).await;
    assert!(problem.contains("injected outage"), "{problem}");
    shutdown.cancel();
    let stopped = first.await.unwrap();
    assert_eq!(stopped.records, 5);
    assert!(inner.user_events("u1", 10).await.unwrap().is_empty());

    // The next run (the store back) reads the records again and stores every one.
    let shutdown = CancellationToken::new();
    let second = run(inner.clone(), Health::new(), shutdown.clone());
    let stored = eventually(Duration::from_secs(60), "the 5 events stored", || {
        let inner = inner.clone();
        async move {
            let n = inner.user_events("u1", 10).await.unwrap().len();
            (n == 5).then_some(n)
        }
    })
    .await;
    assert_eq!(stored, 5);
    shutdown.cancel();
    assert_eq!(
        second.await.unwrap().records,
        5,
        "read again: nothing of them was committed at the stop"
    );
}
