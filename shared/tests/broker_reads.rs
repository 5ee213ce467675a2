//! The broker as the pipeline reads it (tansu 0.6.0 built with `scripts/tansu/*.patch`,
//! in memory): every record comes once and in order, whether a consumer starts where a
//! batch begins or inside one, resumes from an offset its group committed inside a
//! batch, or reads while records are produced; and a fetch is answered once it has data,
//! not when the consumer's `fetch.wait.max.ms` ends.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use recpipe_shared::settings::KafkaSettings;
use recpipe_shared::testkit::TestBroker;

/// A broker with the pipeline's topics on one partition each; the tests use `events`.
async fn broker() -> (TestBroker, KafkaSettings) {
    let broker = TestBroker::start().await;
    let settings = KafkaSettings {
        partitions: 1,
        ..broker.kafka_settings()
    };
    broker.create_topics(&settings).await;
    (broker, settings)
}

fn producer(settings: &KafkaSettings) -> FutureProducer {
    recpipe_shared::kafka::client_config(settings)
        // The records of one call below are queued within microseconds, so they go in
        // one produce request: one stored batch. (A long linger ended by a flush would be
        // surer, but rdkafka's flush can miss its moment and time out.)
        .set("linger.ms", "50")
        .create()
        .unwrap()
}

/// Produces one batch of `size` records named `b<batch>-r<n>`; returns their offsets and
/// names.
async fn produce_batch(
    producer: &FutureProducer,
    topic: &str,
    batch: usize,
    size: usize,
) -> Vec<(i64, String)> {
    let names: Vec<String> = (0..size).map(|n| format!("b{batch}-r{n}")).collect();
    let deliveries: Vec<_> = names
        .iter()
        .map(|name| {
            producer
                .send_result(FutureRecord::to(topic).key("user").payload(name.as_str()))
                .map_err(|(e, _)| e)
                .unwrap()
        })
        .collect();
    let mut out = Vec::new();
    for (delivery, name) in deliveries.into_iter().zip(names) {
        let delivered = delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
        out.push((delivered.offset, name));
    }
    out
}

/// Produces batches of the given sizes, numbered from `first`; returns every record's
/// offset and name in order.
async fn produce_batches(
    settings: &KafkaSettings,
    first: usize,
    sizes: &[usize],
) -> Vec<(i64, String)> {
    let producer = producer(settings);
    let mut records = Vec::new();
    for (n, &size) in sizes.iter().enumerate() {
        let topic = &settings.topics.events;
        records.extend(produce_batch(&producer, topic, first + n, size).await);
    }
    records
}

fn consumer(settings: &KafkaSettings, group: &str) -> BaseConsumer {
    recpipe_shared::kafka::client_config(settings)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap()
}

/// Reads from `consumer` until `wanted` records came or 20 s passed.
fn read(consumer: &BaseConsumer, wanted: usize) -> Vec<(i64, String)> {
    read_for(consumer, wanted, Duration::from_secs(20))
}

/// Reads from `consumer` until `wanted` records came or `patience` passed.
fn read_for(consumer: &BaseConsumer, wanted: usize, patience: Duration) -> Vec<(i64, String)> {
    let deadline = Instant::now() + patience;
    let mut out = Vec::new();
    while out.len() < wanted && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m.unwrap();
            let name = String::from_utf8(m.payload().unwrap().to_vec()).unwrap();
            out.push((m.offset(), name));
        }
    }
    out
}

/// What a consumer assigned at `from` reads, as many records as there are from there.
async fn read_from(settings: &KafkaSettings, from: i64, wanted: usize) -> Vec<(i64, String)> {
    let settings = settings.clone();
    tokio::task::spawn_blocking(move || {
        let consumer = consumer(&settings, &format!("reader-from-{from}"));
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&settings.topics.events, 0, Offset::Offset(from))
            .unwrap();
        consumer.assign(&tpl).unwrap();
        read(&consumer, wanted)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_record_is_read_once_and_in_order_from_a_batch_start_or_inside_a_batch() {
    let (_broker, settings) = broker().await;
    // Batches of 1 to 5 records.
    let sizes: Vec<usize> = (0..30).map(|b| b % 5 + 1).collect();
    let records = produce_batches(&settings, 0, &sizes).await;
    assert_eq!(records.len(), sizes.iter().sum::<usize>());
    let offsets: Vec<i64> = records.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (0..records.len() as i64).collect::<Vec<_>>());
    // Batch b begins at the records of the batches before it.
    let start = |b: usize| sizes[..b].iter().sum::<usize>() as i64;
    let froms = [
        0,             // the first batch
        start(1) + 1,  // inside the 2-record batch, at its last record
        start(2) + 1,  // inside a 3-record batch
        start(4),      // where the first 5-record batch begins
        start(4) + 3,  // inside it
        start(29) + 4, // the last record, inside the last batch
        records.len() as i64 - 10,
    ];
    for from in froms {
        let wanted = records.len() - from as usize;
        let read = read_from(&settings, from, wanted).await;
        assert_eq!(
            read,
            records[from as usize..],
            "a consumer assigned at offset {from}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_that_committed_inside_a_batch_resumes_there() {
    let (_broker, settings) = broker().await;
    let records = produce_batches(&settings, 0, &[4, 6, 3]).await;
    let topic = settings.topics.events.clone();
    let settings_ = settings.clone();
    let (first, rest) = tokio::task::spawn_blocking(move || {
        let settings = settings_;
        // A member reads the first batch and two records of the second, commits there
        // (as a service commits what its batch handled) and goes.
        let member = consumer(&settings, "resuming");
        member.subscribe(&[&topic]).unwrap();
        let first = read(&member, 6);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Offset(6))
            .unwrap();
        member.commit(&tpl, CommitMode::Sync).unwrap();
        drop(member);
        // The next member of the group starts from the committed offset.
        let next = consumer(&settings, "resuming");
        next.subscribe(&[&topic]).unwrap();
        (first, read(&next, 7))
    })
    .await
    .unwrap();
    assert_eq!(first, records[..6]);
    assert_eq!(
        rest,
        records[6..],
        "the rest of the second batch, then the third"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_reading_while_batches_are_produced_gets_each_record_once_in_order() {
    let (_broker, settings) = broker().await;
    let sizes: Vec<usize> = (0..150).map(|b| b % 4 + 1).collect();
    let total: usize = sizes.iter().sum();
    let reader = {
        let settings = settings.clone();
        tokio::task::spawn_blocking(move || {
            let consumer = consumer(&settings, "tail");
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&settings.topics.events, 0, Offset::Beginning)
                .unwrap();
            consumer.assign(&tpl).unwrap();
            read(&consumer, total)
        })
    };
    // Two producers at once, so that produce requests overlap at the broker.
    let (a, b) = tokio::join!(
        produce_batches(&settings, 0, &sizes[..75]),
        produce_batches(&settings, 75, &sizes[75..]),
    );
    let produced: BTreeMap<i64, String> = a.into_iter().chain(b).collect();
    let read = reader.await.unwrap();
    let expected: Vec<(i64, String)> = produced.into_iter().collect();
    assert_eq!(read.len(), total);
    assert_eq!(read, expected);
}

/// The broker may hold this consumer's fetches for a minute (its `fetch.wait.max.ms`); it
/// is read from the beginning of `events`.
fn patient_reader(settings: &KafkaSettings, extra: &[(&str, &str)]) -> BaseConsumer {
    let mut config = recpipe_shared::kafka::client_config(settings);
    config
        .set("group.id", "patient")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "60000")
        // librdkafka wants the socket timeout above the fetch wait.
        .set("socket.timeout.ms", "120000");
    for (key, value) in extra {
        config.set(*key, *value);
    }
    let consumer: BaseConsumer = config.create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&settings.topics.events, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    consumer
}

// tansu 0.6.0 held a fetch that found nothing for half of what was left of its wait
// before looking again (30 s here), so the record came after half a minute at the
// soonest; the patched broker answers when the record is stored. Ten seconds is only a
// bound far on either side of both.
#[tokio::test(flavor = "multi_thread")]
async fn a_fetch_waiting_for_data_is_answered_when_a_record_is_produced() {
    let (_broker, settings) = broker().await;
    let settings_ = settings.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let consumer = patient_reader(&settings_, &[]);
        // Nothing yet: its fetch is held at the broker.
        assert!(read_for(&consumer, 1, Duration::from_secs(1)).is_empty());
        read_for(&consumer, 1, Duration::from_secs(10))
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let records = produce_batches(&settings, 0, &[1]).await;
    assert_eq!(reader.await.unwrap(), records);
}

// A backlog that takes several fetches (asking for 1 KiB each): tansu 0.6.0
// held every fetch for half its wait even when it had data (30 s here, so three fetches
// took 90 s); the patched broker answers each at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_fetch_with_data_is_answered_at_once() {
    let (_broker, settings) = broker().await;
    let sizes = vec![20; 10];
    let records = produce_batches(&settings, 0, &sizes).await;
    let settings_ = settings.clone();
    let read = tokio::task::spawn_blocking(move || {
        let small_fetches = [
            ("fetch.max.bytes", "1024"),
            ("max.partition.fetch.bytes", "1024"),
            // librdkafka wants this no larger than a fetch.
            ("message.max.bytes", "1000"),
        ];
        let consumer = patient_reader(&settings_, &small_fetches);
        read_for(&consumer, 200, Duration::from_secs(10))
    })
    .await
    .unwrap();
    assert_eq!(read, records);
}
