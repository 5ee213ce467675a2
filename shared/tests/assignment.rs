//! A new assignment is prepared (state restored) as soon as it is known, before any of
//! its records comes, and each partition once; processed batches' offsets are committed,
//! for good by a clean stop.

use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use recpipe_shared::kafka::framework::{
    self, Decoded, FrameworkError, Outcome, Processor, RecordMeta, RetryableError, RunStats,
};
use recpipe_shared::settings::KafkaSettings;
use recpipe_shared::testkit::{produce, TestBroker};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

enum Call {
    Prepare(Vec<(String, i32)>),
    /// A batch's size, and whether records were waiting behind it.
    Process(usize, bool),
}

/// Says what the framework asked of it.
struct Recorder(mpsc::UnboundedSender<Call>, bool);

#[async_trait]
impl Processor for Recorder {
    type Input = ();

    fn name(&self) -> &str {
        "recorder"
    }

    fn topics(&self) -> Vec<String> {
        vec!["in".into()]
    }

    fn decode(&self, _meta: &RecordMeta, _payload: &[u8]) -> Result<(), String> {
        Ok(())
    }

    fn records_waiting(&mut self, waiting: bool) {
        self.1 = waiting;
    }

    async fn process(&mut self, batch: Vec<Decoded<()>>) -> Result<Vec<Outcome>, RetryableError> {
        let _ = self.0.send(Call::Process(batch.len(), self.1));
        Ok(batch.iter().map(|_| Outcome::Emit(Vec::new())).collect())
    }

    async fn prepare_partitions(
        &mut self,
        partitions: &[(String, i32)],
    ) -> Result<(), RetryableError> {
        let _ = self.0.send(Call::Prepare(partitions.to_vec()));
        Ok(())
    }
}

async fn next(calls: &mut mpsc::UnboundedReceiver<Call>) -> Call {
    tokio::time::timeout(Duration::from_secs(30), calls.recv())
        .await
        .expect("the framework called nothing in 30 s")
        .expect("the framework stopped")
}

/// A broker with the topic `in` of three partitions.
async fn broker_with_topic_in() -> (TestBroker, KafkaSettings) {
    let broker = TestBroker::start().await;
    let settings = broker.kafka_settings();
    recpipe_shared::kafka::ensure_topics(&settings, &["in"], 3)
        .await
        .unwrap();
    (broker, settings)
}

/// The framework running a [`Recorder`]: what it is asked, its stop, and its task.
fn run_recorder(
    settings: &KafkaSettings,
) -> (
    mpsc::UnboundedReceiver<Call>,
    CancellationToken,
    JoinHandle<Result<RunStats, FrameworkError>>,
) {
    let (tx, calls) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let service = {
        let (settings, stop) = (settings.clone(), stop.clone());
        tokio::spawn(async move { framework::run(&settings, Recorder(tx, false), stop).await })
    };
    (calls, stop, service)
}

#[tokio::test]
async fn every_assigned_partition_is_prepared_before_any_record_comes() {
    let (broker, settings) = broker_with_topic_in().await;
    let (mut calls, stop, service) = run_recorder(&settings);

    // Nothing produced yet: the whole assignment is prepared in one call.
    match next(&mut calls).await {
        Call::Prepare(p) => assert_eq!(
            p,
            vec![
                ("in".to_string(), 0),
                ("in".to_string(), 1),
                ("in".to_string(), 2)
            ]
        ),
        Call::Process(n, _) => panic!("a batch of {n} came before the partitions were prepared"),
    }

    // A record then goes straight to processing: its partition is not prepared again.
    produce(&broker.brokers(), "in", "k", b"x").await;
    match next(&mut calls).await {
        Call::Process(n, _) => assert_eq!(n, 1),
        Call::Prepare(p) => panic!("{p:?} prepared again"),
    }
    stop.cancel();
    service.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_clean_stop_leaves_every_processed_record_committed() {
    let (broker, settings) = broker_with_topic_in().await;
    for key in ["a", "b", "c", "d", "e"] {
        produce(&broker.brokers(), "in", key, b"x").await;
    }
    let (mut calls, stop, service) = run_recorder(&settings);
    let mut processed = 0;
    while processed < 5 {
        if let Call::Process(n, _) = next(&mut calls).await {
            processed += n;
        }
    }
    stop.cancel();
    let stats = service.await.unwrap().unwrap();
    assert_eq!(stats.records, 5);

    // The group's committed offsets are each partition's end: a restart replays nothing.
    let consumer: BaseConsumer = recpipe_shared::kafka::client_config(&settings)
        .set("group.id", format!("{}-recorder", settings.group_prefix))
        .create()
        .unwrap();
    let mut partitions = TopicPartitionList::new();
    for p in 0..3 {
        partitions.add_partition("in", p);
    }
    let (committed, ends) = tokio::task::spawn_blocking(move || {
        let ends: Vec<i64> = (0..3)
            .map(|p| {
                consumer
                    .fetch_watermarks("in", p, Duration::from_secs(10))
                    .unwrap()
                    .1
            })
            .collect();
        (
            consumer.committed_offsets(partitions, Duration::from_secs(10)),
            ends,
        )
    })
    .await
    .unwrap();
    assert_eq!(ends.iter().sum::<i64>(), 5);
    for e in committed.unwrap().elements() {
        let end = ends[e.partition() as usize];
        if end > 0 {
            assert_eq!(
                e.offset(),
                Offset::Offset(end),
                "partition {}: committed offset against its end",
                e.partition()
            );
        }
    }
}

/// A batch's outputs are sent as soon as the batch has queued them, not held for the
/// producer's linger (which only bounds how long the first waits for the rest).
#[tokio::test]
async fn a_batchs_outputs_are_not_held_for_the_linger() {
    let (broker, mut settings) = broker_with_topic_in().await;
    recpipe_shared::kafka::ensure_topics(&settings, &["out"], 3)
        .await
        .unwrap();
    // Two minutes: a record held for it would miss the minute the test waits
    // (librdkafka wants the delivery timeout longer than the linger).
    settings.linger_ms = 120_000;
    settings.delivery_timeout_ms = 300_000;
    let stop = CancellationToken::new();
    let relay = recpipe_shared::kafka::relay::Relay {
        from: "in".into(),
        to: "out".into(),
    };
    let run = {
        let (settings, stop) = (settings.clone(), stop.clone());
        tokio::spawn(async move { framework::run(&settings, relay, stop).await })
    };
    produce(&broker.brokers(), "in", "u1", b"one").await;
    let out =
        recpipe_shared::testkit::read_topic(&broker.brokers(), "out", 1, Duration::from_secs(60))
            .await;
    assert_eq!(
        out.len(),
        1,
        "the relayed record did not arrive within a minute"
    );
    stop.cancel();
    run.await.unwrap().unwrap();
}

/// A batch stops growing at `batch_max_bytes` as well as at `batch_max`, and a record
/// bigger than that still goes, alone.
#[tokio::test]
async fn a_batch_stops_at_its_byte_limit() {
    let (broker, mut settings) = broker_with_topic_in().await;
    // One key, one partition: all ten are there for the first fetch.
    for _ in 0..10 {
        produce(&broker.brokers(), "in", "k", &[b'x'; 400]).await;
    }
    produce(&broker.brokers(), "in", "k", &[b'x'; 3000]).await;
    settings.batch_max = 1000;
    settings.batch_max_bytes = 1000;
    let (mut calls, stop, service) = run_recorder(&settings);
    let mut sizes = Vec::new();
    while sizes.iter().sum::<usize>() < 11 {
        if let Call::Process(n, _) = next(&mut calls).await {
            sizes.push(n);
        }
    }
    stop.cancel();
    service.await.unwrap().unwrap();
    // 401 bytes each with the key: the third reaches 1,000.
    assert!(sizes.iter().all(|&n| n <= 3), "batch sizes {sizes:?}");
}

/// A batch cut at its limit tells the processor that records are waiting behind it (how
/// save-worker knows it has a backlog); one that took all there was does not.
#[tokio::test]
async fn a_batch_cut_at_its_limit_says_records_are_waiting() {
    let (broker, mut settings) = broker_with_topic_in().await;
    // One key, one partition: all five are there for the first fetch.
    for _ in 0..5 {
        produce(&broker.brokers(), "in", "k", b"x").await;
    }
    settings.batch_max = 2;
    let (mut calls, stop, service) = run_recorder(&settings);
    let mut batches = Vec::new();
    while batches.iter().map(|&(n, _)| n).sum::<usize>() < 5 {
        if let Call::Process(n, waiting) = next(&mut calls).await {
            batches.push((n, waiting));
        }
    }
    stop.cancel();
    service.await.unwrap().unwrap();
    for &(n, waiting) in &batches {
        assert_eq!(
            waiting,
            n == 2,
            "batches (size, records waiting): {batches:?}"
        );
    }
    // Five in batches of at most two: one of one at least, and here full ones too.
    assert!(
        batches.contains(&(2, true)) && batches.contains(&(1, false)),
        "batches (size, records waiting): {batches:?}"
    );
}

/// Sends the distinct keys of each batch it is given; holds at most `max_keys`.
struct KeyCounter {
    batches: mpsc::UnboundedSender<Vec<Vec<u8>>>,
    max_keys: usize,
}

#[async_trait]
impl Processor for KeyCounter {
    type Input = ();

    fn name(&self) -> &str {
        "key-counter"
    }

    fn topics(&self) -> Vec<String> {
        vec!["one".into()]
    }

    fn decode(&self, _meta: &RecordMeta, _payload: &[u8]) -> Result<(), String> {
        Ok(())
    }

    fn batch_max_keys(&self) -> Option<usize> {
        Some(self.max_keys)
    }

    async fn process(&mut self, batch: Vec<Decoded<()>>) -> Result<Vec<Outcome>, RetryableError> {
        let keys = batch.iter().filter_map(|d| d.meta.key.clone()).collect();
        let _ = self.batches.send(keys);
        Ok(batch.iter().map(|_| Outcome::Emit(Vec::new())).collect())
    }
}

/// A processor's `batch_max_keys` ends a batch at that many distinct keys, however many
/// more records are there, and every record still comes, in order.
#[tokio::test]
async fn a_batch_stops_at_the_processors_key_limit() {
    let broker = TestBroker::start().await;
    let settings = broker.kafka_settings();
    recpipe_shared::kafka::ensure_topics(&settings, &["one"], 1)
        .await
        .unwrap();
    // Five keys taking turns, twice over: all ten are there for the first fetch.
    let sent: Vec<String> = (0..10).map(|i| format!("k{}", i % 5)).collect();
    for key in &sent {
        produce(&broker.brokers(), "one", key, b"x").await;
    }
    let (batches, mut received) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let service = {
        let (settings, stop) = (settings.clone(), stop.clone());
        let counter = KeyCounter {
            batches,
            max_keys: 2,
        };
        tokio::spawn(async move { framework::run(&settings, counter, stop).await })
    };
    let mut keys_in_order = Vec::new();
    while keys_in_order.len() < sent.len() {
        let batch = tokio::time::timeout(Duration::from_secs(30), received.recv())
            .await
            .expect("no batch in 30 s")
            .expect("the framework stopped");
        let distinct: std::collections::HashSet<&Vec<u8>> = batch.iter().collect();
        assert!(distinct.len() <= 2, "a batch of {} keys", distinct.len());
        keys_in_order.extend(batch);
    }
    stop.cancel();
    service.await.unwrap().unwrap();
    let sent: Vec<Vec<u8>> = sent.into_iter().map(String::into_bytes).collect();
    assert_eq!(keys_in_order, sent);
}

/// Sends each batch's payloads, in order.
struct PayloadRecorder {
    batches: mpsc::UnboundedSender<Vec<Vec<u8>>>,
    topic: &'static str,
    /// False: nobody waits on its work, as on save-worker.
    on_freshness_path: bool,
}

impl PayloadRecorder {
    fn of_topic_in(batches: mpsc::UnboundedSender<Vec<Vec<u8>>>) -> Self {
        PayloadRecorder {
            batches,
            topic: "in",
            on_freshness_path: true,
        }
    }
}

#[async_trait]
impl Processor for PayloadRecorder {
    type Input = Vec<u8>;

    fn name(&self) -> &str {
        "payload-recorder"
    }

    fn topics(&self) -> Vec<String> {
        vec![self.topic.into()]
    }

    fn decode(&self, _meta: &RecordMeta, payload: &[u8]) -> Result<Vec<u8>, String> {
        Ok(payload.to_vec())
    }

    fn on_freshness_path(&self) -> bool {
        self.on_freshness_path
    }

    async fn process(
        &mut self,
        batch: Vec<Decoded<Vec<u8>>>,
    ) -> Result<Vec<Outcome>, RetryableError> {
        let _ = self
            .batches
            .send(batch.iter().map(|d| d.input.clone()).collect());
        Ok(batch.iter().map(|_| Outcome::Emit(Vec::new())).collect())
    }
}

/// Runs a [`PayloadRecorder`] until it has seen `n` payloads; returns them, sorted.
async fn payloads_of_one_run(settings: &KafkaSettings, n: usize) -> Vec<Vec<u8>> {
    let (tx, mut batches) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let service = {
        let (settings, stop) = (settings.clone(), stop.clone());
        tokio::spawn(async move {
            framework::run(&settings, PayloadRecorder::of_topic_in(tx), stop).await
        })
    };
    let mut seen = Vec::new();
    while seen.len() < n {
        let batch = tokio::time::timeout(Duration::from_secs(30), batches.recv())
            .await
            .expect("no batch in 30 s")
            .expect("the framework stopped");
        seen.extend(batch);
    }
    stop.cancel();
    service.await.unwrap().unwrap();
    seen.sort();
    seen
}

/// The framework sets each assigned partition's start itself (a fresh group's partitions
/// would otherwise wait 100 ms in librdkafka): a restart resumes at the committed offsets,
/// replaying nothing, and a partition the group never committed is read from its first
/// record.
#[tokio::test]
async fn a_restart_resumes_where_it_committed_and_an_uncommitted_partition_from_its_start() {
    let (broker, settings) = broker_with_topic_in().await;
    // The first run sees one partition only: the others have no committed offset after it.
    let old: Vec<Vec<u8>> = (0..3).map(|i| format!("old-{i}").into_bytes()).collect();
    for payload in &old {
        produce(&broker.brokers(), "in", "a", payload).await;
    }
    assert_eq!(payloads_of_one_run(&settings, old.len()).await, old);

    let keys = ["a", "b", "c", "d", "e", "f"];
    let mut new: Vec<Vec<u8>> = keys
        .iter()
        .map(|k| format!("new-{k}").into_bytes())
        .collect();
    for (key, payload) in keys.iter().zip(&new) {
        produce(&broker.brokers(), "in", key, payload).await;
    }
    // These keys reach partitions the first run never read (so never committed).
    let consumer: BaseConsumer = recpipe_shared::kafka::client_config(&settings)
        .create()
        .unwrap();
    let ends: Vec<i64> = tokio::task::spawn_blocking(move || {
        (0..3)
            .map(|p| {
                let (_, end) = consumer
                    .fetch_watermarks("in", p, Duration::from_secs(10))
                    .unwrap();
                end
            })
            .collect()
    })
    .await
    .unwrap();
    assert!(
        ends.iter().filter(|&&end| end > 0).count() >= 2,
        "the new records all went to the first run's partition: {ends:?}"
    );

    new.sort();
    assert_eq!(payloads_of_one_run(&settings, new.len()).await, new);
}

/// The next batch, well inside `background_batch_ms`: a batch held for the window would
/// not come in time.
async fn next_batch(batches: &mut mpsc::UnboundedReceiver<Vec<Vec<u8>>>) -> Vec<Vec<u8>> {
    tokio::time::timeout(Duration::from_secs(30), batches.recv())
        .await
        .expect("no batch in 30 s: a full batch was held for the window")
        .expect("the framework stopped")
}

/// A consumer off the freshness path (as save-worker is) on topic `one`, with its settings
/// changed by `adjust`, warmed up (assigned and fetching); then `a`, and `b` 400 ms later
/// (forty fetches apart), must come as its next batch, within next_batch's 30 s.
async fn two_records_400_ms_apart_come_as_one_batch(adjust: impl FnOnce(&mut KafkaSettings)) {
    let broker = TestBroker::start().await;
    let mut settings = broker.kafka_settings();
    adjust(&mut settings);
    recpipe_shared::kafka::ensure_topics(&settings, &["one"], 1)
        .await
        .unwrap();
    let (tx, mut batches) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let service = {
        let stop = stop.clone();
        let recorder = PayloadRecorder {
            batches: tx,
            topic: "one",
            on_freshness_path: false,
        };
        tokio::spawn(async move { framework::run(&settings, recorder, stop).await })
    };
    produce(&broker.brokers(), "one", "k", b"warm-1").await;
    produce(&broker.brokers(), "one", "k", b"warm-2").await;
    let mut warm = Vec::new();
    while warm.len() < 2 {
        warm.extend(next_batch(&mut batches).await);
    }
    assert_eq!(warm, vec![b"warm-1".to_vec(), b"warm-2".to_vec()]);

    produce(&broker.brokers(), "one", "k", b"a").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    produce(&broker.brokers(), "one", "k", b"b").await;
    assert_eq!(
        next_batch(&mut batches).await,
        vec![b"a".to_vec(), b"b".to_vec()]
    );
    stop.cancel();
    service.await.unwrap().unwrap();
}

/// A consumer off the freshness path gathers records that come apart into one batch
/// (`background_batch_ms`), and a batch that fills goes at once, not at the window's end.
#[tokio::test]
async fn a_background_batch_gathers_records_that_come_apart_and_goes_when_full() {
    two_records_400_ms_apart_come_as_one_batch(|settings| {
        // Only filling up can end a batch within the test's 30 s.
        settings.batch_max = 2;
        settings.background_batch_ms = 60_000;
        settings.background_batch_idle_ms = 60_000;
    })
    .await;
}

/// Once records stop coming for `background_batch_idle_ms`, a background batch goes
/// without waiting for the rest of its window: the end of a backlog is written at once.
/// Records that come closer together than that still share a batch.
#[tokio::test]
async fn a_background_batch_goes_once_records_stop_coming() {
    two_records_400_ms_apart_come_as_one_batch(|settings| {
        // The batch cannot fill, and the window outlasts the test's 30 s: only the idle
        // rule can end it in time.
        settings.batch_max = 1000;
        settings.background_batch_ms = 60_000;
        settings.background_batch_idle_ms = 3_000;
    })
    .await;
}
