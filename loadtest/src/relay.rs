//! `relay`: the pipeline's throughput against the broker's own limit, in one run.
//!
//! The limit: three bare relays (consume → produce, no work) built on the same framework
//! as the services, chained over three topics on the same broker: events go in at one
//! end as fast as a producer can write them, and the rate at which they come out of
//! the third hop is what the broker and the framework allow. The pipeline: the same
//! number of events, produced the same way to `events`, until every user's list on the
//! `recommendations` topic is made from their last event, and then until save-worker
//! has stored everything (its group's commits reach the end of each topic it reads).
//! The ratio is pipeline ÷ relay, the pipeline's time taken at the second point: through
//! all three services. After the clock, every user's list is read through `GET` too.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use recpipe_shared::catalog::Catalog;
use recpipe_shared::events::Event;
use recpipe_shared::kafka::framework;
use recpipe_shared::kafka::relay::Relay;
use recpipe_shared::list_record;
use recpipe_shared::settings::KafkaSettings;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::traffic::Clickstream;

#[derive(Debug, Serialize)]
pub struct RelaySummary {
    pub machine: String,
    pub events: usize,
    pub users: usize,
    pub relay_seconds: f64,
    pub relay_events_per_sec: f64,
    /// Until every user's list on the recommendations topic is made from their last
    /// event (events → update-embeddings → gen-recommendations). Before the
    /// twenty-fifth benchmark session (2026-12-05) this was read through `GET` inside the
    /// clock.
    pub lists_seconds: f64,
    pub lists_events_per_sec: f64,
    /// Until save-worker has also stored every event, state and list: the pipeline's
    /// time.
    pub pipeline_seconds: f64,
    pub pipeline_events_per_sec: f64,
    /// GETs made after the clock to read every user's list through the API.
    pub check_gets: u64,
    /// pipeline_events_per_sec ÷ relay_events_per_sec.
    pub ratio: f64,
    /// lists_events_per_sec ÷ relay_events_per_sec (the figure reported before
    /// 2026-12-03's ninth session, which did not wait for save-worker).
    pub lists_ratio: f64,
}

/// save-worker's consumer group (`<group_prefix>-save-worker`).
const SAVE_WORKER: &str = "save-worker";

/// Each partition of these topics. Blocking.
fn partitions_of(consumer: &BaseConsumer, topics: &[String]) -> anyhow::Result<Vec<(String, i32)>> {
    let mut partitions = Vec::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
        for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
            partitions.push((topic.clone(), partition.id()));
        }
    }
    Ok(partitions)
}

/// Where each of `partitions` ends now, as the broker reports it. Blocking.
fn ends_of(
    consumer: &BaseConsumer,
    partitions: &[(String, i32)],
) -> anyhow::Result<TopicPartitionList> {
    let mut ends = TopicPartitionList::new();
    for (topic, partition) in partitions {
        let (_, high) = consumer.fetch_watermarks(topic, *partition, Duration::from_secs(5))?;
        ends.add_partition_offset(topic, *partition, Offset::Offset(high))?;
    }
    Ok(ends)
}

/// The partitions that save-worker's group has not committed up to the end, as the
/// broker reports it now: "topic/partition at committed of end". Blocking.
fn not_stored(
    consumer: &BaseConsumer,
    partitions: &[(String, i32)],
) -> anyhow::Result<Vec<String>> {
    let timeout = Duration::from_secs(5);
    let ends = ends_of(consumer, partitions)?;
    let committed = consumer.committed_offsets(ends.clone(), timeout)?;
    Ok(ends
        .elements()
        .iter()
        .filter_map(|end| {
            let Offset::Offset(high) = end.offset() else {
                return None;
            };
            // Nothing committed counts as 0: done only if there is nothing to read.
            let at = match committed
                .find_partition(end.topic(), end.partition())
                .map(|c| c.offset())
            {
                Some(Offset::Offset(at)) => at,
                _ => 0,
            };
            (at < high).then(|| format!("{}/{} at {at} of {high}", end.topic(), end.partition()))
        })
        .collect())
}

/// Waits until save-worker has stored everything (see [`not_stored`]), polling every
/// 20 ms; fails after `stall_limit`.
pub async fn wait_stored(kafka: &KafkaSettings, stall_limit: Duration) -> anyhow::Result<()> {
    let group = format!("{}-{SAVE_WORKER}", kafka.group_prefix);
    let consumer: BaseConsumer = recpipe_shared::kafka::client_config(kafka)
        .set("group.id", &group)
        .create()?;
    let t = &kafka.topics;
    let topics = [
        &t.events,
        &t.user_vectors,
        &t.recommendations,
        &t.impressions,
    ]
    .map(String::clone);
    // Blocking client calls and short sleeps: one blocking task for the whole wait.
    tokio::task::spawn_blocking(move || {
        let partitions = partitions_of(&consumer, &topics)?;
        let started = Instant::now();
        loop {
            let behind = not_stored(&consumer, &partitions)?;
            if behind.is_empty() {
                return Ok(());
            }
            anyhow::ensure!(
                started.elapsed() < stall_limit,
                "save-worker did not store everything within {} s (its group {group} has \
                 not committed to the end of {}): see its log",
                stall_limit.as_secs(),
                behind.join(", ")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await?
}

fn events(catalog: &Catalog, n: usize, users: usize, tag: &str) -> Vec<Event> {
    let mut stream = Clickstream::new(catalog, users, 0.85, 9, tag);
    (0..n).map(|_| stream.next_event()).collect()
}

/// Produces `events` to `topic` as fast as `producer` goes; returns when all are
/// acknowledged.
async fn produce_all(
    producer: &FutureProducer,
    topic: &str,
    events: &[Event],
) -> anyhow::Result<()> {
    let mut pending = Vec::with_capacity(events.len());
    for e in events {
        let payload = serde_json::to_vec(e)?;
        loop {
            match producer.send_result(FutureRecord::to(topic).key(&e.user_id).payload(&payload)) {
                Ok(d) => {
                    pending.push(d);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }
    for d in pending {
        d.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// Watches a recommendations topic, from where it ends when the watch starts, until
/// every user has a list made from their last event.
pub struct ListsWatch {
    sink: StreamConsumer,
    /// user → the id of their last event, for the users still without its list.
    waiting: HashMap<String, String>,
}

impl ListsWatch {
    /// Starts reading every partition of `topic` at its end now: lists already there
    /// (an earlier run's) do not count.
    pub async fn from_end(
        kafka: &KafkaSettings,
        topic: &str,
        last_event_of: HashMap<String, String>,
    ) -> anyhow::Result<ListsWatch> {
        let probe: BaseConsumer = recpipe_shared::kafka::client_config(kafka).create()?;
        let topic_name = topic.to_string();
        let ends = tokio::task::spawn_blocking(move || {
            ends_of(&probe, &partitions_of(&probe, &[topic_name])?)
        })
        .await??;
        anyhow::ensure!(
            ends.count() > 0,
            "topic {topic} has no partitions: is it created?"
        );
        // Assigned, not subscribed: no group to join, and no commits.
        let sink: StreamConsumer = recpipe_shared::kafka::consumer_config(kafka)
            .set("group.id", format!("{}-lists-watch", kafka.group_prefix))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", kafka.fetch_wait_max_ms.to_string())
            .create()?;
        sink.assign(&ends)?;
        Ok(ListsWatch {
            sink,
            waiting: last_event_of,
        })
    }

    /// Users still without a list made from their last event.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    fn stalled(&self, stall_limit: Duration) -> anyhow::Error {
        anyhow::anyhow!(
            "{} users never got a list for their last event (none came in {} s; one waiting \
             is {}): see the services' logs and the dead-letters topic",
            self.waiting(),
            stall_limit.as_secs(),
            self.waiting
                .keys()
                .next()
                .map(String::as_str)
                .unwrap_or_default()
        )
    }

    /// Reads lists until none is waiting; fails when none has arrived for `stall_limit`
    /// (a state or list may have been dead-lettered), naming one user still waiting.
    pub async fn wait(&mut self, stall_limit: Duration) -> anyhow::Result<()> {
        let mut progressed = Instant::now();
        while !self.waiting.is_empty() {
            let left = stall_limit.saturating_sub(progressed.elapsed());
            let Ok(received) = tokio::time::timeout(left, self.sink.recv()).await else {
                return Err(self.stalled(stall_limit));
            };
            // Transient client errors (a broker away for a moment) come as errors; the
            // stall limit catches one that lasts.
            let Ok(record) = received else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            // Another writer's record on the topic is not a list this run waits for. Only
            // whose list it is and its event are read (in either encoding: list_record).
            let Some(list) = record.payload().and_then(|p| list_record::summary(p).ok()) else {
                continue;
            };
            if list.source_event_id.is_some()
                && self.waiting.get(list.user_id.as_ref()).map(String::as_str)
                    == list.source_event_id.as_deref()
            {
                self.waiting.remove(list.user_id.as_ref());
                progressed = Instant::now();
            }
        }
        Ok(())
    }
}

/// Reads every user's list through `GET` until it reflects their last event; returns the
/// GETs made. Users come in the order of their last event, as the pipeline finished them.
async fn check_through_get(
    api: &str,
    by_last_event: &[(usize, String, String)],
    stall_limit: Duration,
) -> anyhow::Result<u64> {
    let client = reqwest::Client::new();
    let mut progressed = Instant::now();
    // A pass stops at the first user whose list the API's view does not have yet and
    // tries again shortly.
    let mut waiting: Vec<(&String, &String)> =
        by_last_event.iter().map(|(_, u, id)| (u, id)).collect();
    let mut done = 0;
    let mut gets = 0u64;
    while done < waiting.len() {
        anyhow::ensure!(
            progressed.elapsed() < stall_limit,
            "{} users' lists on the topic never showed through GET (none in {} s; the first \
             waiting is {}): see query-api's log",
            waiting.len() - done,
            stall_limit.as_secs(),
            waiting[done].0
        );
        let done_before = done;
        let mut missed = false;
        for (user, id) in &waiting[done..] {
            let list: serde_json::Value = client
                .get(format!("{api}/v1/users/{user}/recommendations?k=1"))
                .send()
                .await?
                .json()
                .await?;
            gets += 1;
            if list["source_event_id"].as_str() != Some(id.as_str()) {
                missed = true;
                break;
            }
            done += 1;
        }
        if done > done_before {
            progressed = Instant::now();
        }
        if missed {
            // A user further on may be done already; moving them ahead of this one keeps
            // the next pass from stopping at the same straggler forever.
            waiting[done..].rotate_left(1);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok(gets)
}

pub async fn run(
    kafka: &KafkaSettings,
    api: &str,
    catalog: &Catalog,
    n: usize,
    users: usize,
) -> anyhow::Result<RelaySummary> {
    // One producer for both phases, made before either clock starts: a new idempotent
    // producer holds its first records until it has a producer id, which librdkafka
    // often asks for only on a 500 ms timer. Made inside a clock, that wait went into
    // the measure at random (the bare relay took 1.55 or 2.05 s).
    let producer: FutureProducer = recpipe_shared::kafka::producer(kafka)?;
    // The bare relay over three hops.
    let run_id = recpipe_shared::events::now_ms();
    let topics: Vec<String> = (0..4).map(|i| format!("relay-{run_id}-{i}")).collect();
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    recpipe_shared::kafka::ensure_topics(kafka, &refs, kafka.partitions).await?;
    let stop = CancellationToken::new();
    let mut relays = Vec::new();
    for hop in 0..3 {
        let relay = Relay {
            from: topics[hop].clone(),
            to: topics[hop + 1].clone(),
        };
        let settings = KafkaSettings {
            group_prefix: format!("relay-{run_id}"),
            ..kafka.clone()
        };
        let stop = stop.clone();
        relays.push(tokio::spawn(async move {
            framework::run(&settings, relay, stop).await
        }));
    }
    let sink: StreamConsumer = recpipe_shared::kafka::consumer_config(kafka)
        .set("group.id", format!("relay-{run_id}-sink"))
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", kafka.fetch_wait_max_ms.to_string())
        .create()?;
    sink.subscribe(&[topics[3].as_str()])?;
    // Let the consumer groups settle before the clock starts.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let input = events(catalog, n, users, &format!("relay-{run_id}"));
    eprintln!("  relay: {n} events through 3 bare hops");
    let started = Instant::now();
    produce_all(&producer, &topics[0], &input).await?;
    let mut seen = 0;
    while seen < n {
        match tokio::time::timeout(Duration::from_secs(60), sink.recv()).await {
            Ok(Ok(m)) if m.payload().is_some() => seen += 1,
            Ok(_) => {}
            Err(_) => anyhow::bail!("the relay delivered only {seen} of {n} events in time"),
        }
    }
    let relay_seconds = started.elapsed().as_secs_f64();
    stop.cancel();
    for r in relays {
        let _ = r.await;
    }

    // The pipeline: the same number of events, new users, until every list reflects
    // its user's last event.
    let input = events(catalog, n, users, &format!("pipe-{run_id}"));
    // Each user's last event and where it is in the input.
    let mut last: HashMap<String, (usize, String)> = HashMap::new();
    for (at, e) in input.iter().enumerate() {
        last.insert(format!("{}-{run_id}", e.user_id), (at, e.event_id.clone()));
    }
    // Users of another run have other ids.
    let input: Vec<Event> = input
        .into_iter()
        .map(|mut e| {
            e.user_id = format!("{}-{run_id}", e.user_id);
            e
        })
        .collect();
    let mut by_last_event: Vec<(usize, String, String)> = last
        .into_iter()
        .map(|(user, (at, id))| (at, user, id))
        .collect();
    by_last_event.sort_unstable();
    eprintln!(
        "  pipeline: {n} events of {} users through the three services",
        by_last_event.len()
    );
    // A list that has not moved on for this long is not coming (its state or list may
    // have been dead-lettered): say so rather than wait out a long run.
    let stall_limit = Duration::from_secs(60);
    // Each user's list is watched for on the topic itself, as the bare relay's sink
    // reads its last topic. Read through GET inside the clock, the check's own requests
    // (and the impressions they make for save-worker) took a large share of the two
    // cores, which the relay never paid. Every list is still read through GET, after
    // the clock.
    let mut lists = ListsWatch::from_end(
        kafka,
        &kafka.topics.recommendations,
        by_last_event
            .iter()
            .map(|(_, user, id)| (user.clone(), id.clone()))
            .collect(),
    )
    .await?;
    let started = Instant::now();
    produce_all(&producer, &kafka.topics.events, &input).await?;
    lists.wait(stall_limit).await?;
    let lists_seconds = started.elapsed().as_secs_f64();
    wait_stored(kafka, stall_limit).await?;
    let pipeline_seconds = started.elapsed().as_secs_f64();
    let gets = check_through_get(api, &by_last_event, stall_limit).await?;
    let relay_events_per_sec = n as f64 / relay_seconds;
    let lists_events_per_sec = n as f64 / lists_seconds;
    let pipeline_events_per_sec = n as f64 / pipeline_seconds;
    Ok(RelaySummary {
        machine: crate::report::machine_description(),
        events: n,
        users: by_last_event.len(),
        relay_seconds,
        relay_events_per_sec,
        lists_seconds,
        lists_events_per_sec,
        pipeline_seconds,
        pipeline_events_per_sec,
        check_gets: gets,
        ratio: pipeline_events_per_sec / relay_events_per_sec,
        lists_ratio: lists_events_per_sec / relay_events_per_sec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use recpipe_shared::testkit::{self, TestBroker};

    fn list_of(user: &str, version: u64) -> Vec<u8> {
        serde_json::to_vec(&testkit::list(user, version, &["p1"])).unwrap()
    }

    #[tokio::test]
    async fn the_lists_watch_waits_for_each_users_list_of_their_last_event_written_after_it_started(
    ) {
        let broker = TestBroker::start().await;
        let kafka = broker.kafka_settings();
        broker.create_topics(&kafka).await;
        let topic = kafka.topics.recommendations.clone();
        let brokers = broker.brokers();
        // testkit::list(user, v) is made from the event `{user}-e{v}`.
        let last: HashMap<String, String> = [("ann", "ann-e2"), ("bob", "bob-e1")]
            .map(|(u, id)| (u.to_string(), id.to_string()))
            .into();
        // A list from before the watch starts (an earlier run's) does not count.
        testkit::produce(&brokers, &topic, "ann", &list_of("ann", 2)).await;
        let mut watch = ListsWatch::from_end(&kafka, &topic, last).await.unwrap();
        testkit::produce(&brokers, &topic, "bob", &list_of("bob", 1)).await;
        // Not from ann's last event, and then a record that is no list at all.
        testkit::produce(&brokers, &topic, "ann", &list_of("ann", 1)).await;
        testkit::produce(&brokers, &topic, "ann", b"not a list").await;

        let stalled = watch.wait(Duration::from_secs(3)).await.unwrap_err();
        assert_eq!(watch.waiting(), 1, "bob's list arrived, ann's did not");
        let message = stalled.to_string();
        assert!(
            message.contains("1 users never got a list") && message.contains("ann"),
            "{message}"
        );

        testkit::produce(&brokers, &topic, "ann", &list_of("ann", 2)).await;
        watch.wait(Duration::from_secs(30)).await.unwrap();
        assert_eq!(watch.waiting(), 0);
    }
}
