//! The impressions the API serves, gathered into few Kafka records.
//!
//! Every GET of a list is an impression (schemas/impression.v1.schema.json). Produced one
//! record each, tens of thousands a second, they cost the broker and save-worker a
//! record's work per GET, on the machine the API shares with them. Instead, a GET writes
//! its impression straight into the record being filled for its user's partition (under
//! a lock held for the copy: no allocation, no channel, nothing woken), and a flusher
//! task produces those records every `api.impressions_linger_ms`: a JSON array of the
//! impressions of that partition's users, in the order they were served
//! (schemas/impression-batch.v1.schema.json), each record at most
//! `kafka.max_record_bytes` (what save-worker accepts). The partition is the one a
//! record keyed by the user's id goes to, so a user's impressions stay beside their
//! events.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use recpipe_shared::kafka::partitioner::{murmur2, partition_of_hash};
use recpipe_shared::settings::KafkaSettings;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct ImpressionLog {
    records: Arc<Mutex<Records>>,
    flusher: Mutex<Option<(CancellationToken, JoinHandle<()>)>>,
}

/// The impressions producer's settings: `kafka`'s, compressed with lz4 unless
/// `kafka.client` names a compression. Impressions are most of the API's bytes to Kafka
/// (one per GET, about 300 bytes, repeating field names, model and items); lz4 makes
/// them 2-8 times smaller for the broker, which on tansu holds every record in memory.
/// Its `linger.ms` is at least [`FLUSH_HOLD`].
pub fn producer_settings(kafka: &KafkaSettings) -> KafkaSettings {
    let mut settings = kafka.clone();
    if !settings
        .client_properties()
        .any(|(key, _)| key == "compression.type" || key == "compression.codec")
    {
        settings
            .client
            .insert("compression.type".into(), "lz4".into());
    }
    settings.linger_ms = settings.linger_ms.max(FLUSH_HOLD.as_millis() as u64);
    settings
}

/// How long the impressions producer holds records before sending. A flush queues its
/// records all at once, and nobody waits on them: held this long, a flush's records go
/// in few requests (each stored by the broker as one batch), not one request each as
/// `linger.ms` 0 sends them while the rest are still being queued.
const FLUSH_HOLD: Duration = Duration::from_millis(5);

/// How often the flusher looks for partitions added to the topic.
const PARTITION_CHECK: Duration = Duration::from_secs(30);

impl ImpressionLog {
    /// Starts the flusher. `partitions` is the topic's partition count now (checked again
    /// every 30 s).
    pub fn start(
        producer: FutureProducer,
        topic: String,
        partitions: i32,
        linger: Duration,
        max_record_bytes: usize,
    ) -> Arc<ImpressionLog> {
        let records = Arc::new(Mutex::new(Records::new(partitions, max_record_bytes)));
        let stop = CancellationToken::new();
        let flusher = Flusher {
            producer,
            topic,
            records: records.clone(),
        };
        let handle = tokio::spawn(flusher.run(linger, stop.clone()));
        Arc::new(ImpressionLog {
            records,
            flusher: Mutex::new(Some((stop, handle))),
        })
    }

    /// Queues one impression of `user_id`'s, which `encode` appends (one JSON object).
    /// Never waits on Kafka.
    pub fn record(&self, user_id: &str, encode: impl FnOnce(&mut Vec<u8>)) {
        let hash = murmur2(user_id.as_bytes());
        let queued = match self.records.lock() {
            Ok(mut records) => records.push(hash, encode),
            Err(_) => false,
        };
        if !queued {
            // After close (the API is stopping), or a GET that panicked holding the lock.
            metrics::counter!("recpipe_impressions_dropped_total").increment(1);
        }
    }

    /// Produces what is queued and stops the flusher; impressions recorded later are
    /// dropped (counted). Call once no request is in flight.
    pub async fn close(&self) {
        let flusher = self.flusher.lock().ok().and_then(|mut f| f.take());
        if let Some((stop, handle)) = flusher {
            stop.cancel();
            let _ = handle.await;
        }
    }
}

/// The records being filled, one per partition, and those already full.
struct Records {
    partitions: i32,
    max_bytes: usize,
    /// Per partition: a JSON array without its closing `]` (empty when it holds nothing),
    /// and how many impressions it holds.
    open: Vec<(Vec<u8>, usize)>,
    /// Closed records waiting for the flusher: partition, payload, impressions.
    full: Vec<(i32, Vec<u8>, usize)>,
    closed: bool,
}

impl Records {
    fn new(partitions: i32, max_bytes: usize) -> Records {
        let partitions = partitions.max(1);
        Records {
            partitions,
            max_bytes,
            open: vec![(Vec::new(), 0); partitions as usize],
            full: Vec::new(),
            closed: false,
        }
    }

    /// Appends one impression to its partition's record; false once closed.
    fn push(&mut self, hash: i32, encode: impl FnOnce(&mut Vec<u8>)) -> bool {
        if self.closed {
            return false;
        }
        let partition = partition_of_hash(hash, self.partitions);
        let (record, count) = &mut self.open[partition as usize];
        let start = record.len();
        record.push(if *count == 0 { b'[' } else { b',' });
        encode(record);
        // With its `]`, the record would pass the limit: close it without this
        // impression, which starts the next one (one larger than the limit goes alone).
        if *count > 0 && record.len() + 1 > self.max_bytes {
            let mut next = Vec::with_capacity(record.capacity());
            next.push(b'[');
            next.extend_from_slice(&record[start + 1..]);
            record.truncate(start);
            record.push(b']');
            let closed = std::mem::replace(record, next);
            self.full.push((partition, closed, *count));
            *count = 1;
        } else {
            *count += 1;
        }
        true
    }

    /// Every impression queued, as complete records, oldest first per partition.
    fn take(&mut self) -> Vec<(i32, Vec<u8>, usize)> {
        let mut taken = std::mem::take(&mut self.full);
        for (partition, (record, count)) in self.open.iter_mut().enumerate() {
            if *count > 0 {
                // The next record will likely be as large: keep its room.
                let mut closed = std::mem::replace(record, Vec::with_capacity(record.capacity()));
                closed.push(b']');
                taken.push((partition as i32, closed, std::mem::take(count)));
            }
        }
        taken
    }

    /// Users hash over `partitions` from now on (more only: a topic never loses any).
    fn follow(&mut self, partitions: i32) {
        if partitions > self.partitions {
            self.partitions = partitions;
            self.open.resize(partitions as usize, (Vec::new(), 0));
        }
    }
}

struct Flusher {
    producer: FutureProducer,
    topic: String,
    records: Arc<Mutex<Records>>,
}

impl Flusher {
    async fn run(self, linger: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(linger.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut checked = std::time::Instant::now();
        loop {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tick.tick() => false,
            };
            if checked.elapsed() >= PARTITION_CHECK {
                checked = std::time::Instant::now();
                self.follow_partition_count().await;
            }
            if stopping {
                if let Ok(mut records) = self.records.lock() {
                    records.closed = true;
                }
            }
            self.flush();
            if stopping {
                // What was queued must reach the broker before the process exits.
                let producer = self.producer.clone();
                let _ =
                    tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10)))
                        .await;
                return;
            }
        }
    }

    /// Produces what the GETs queued.
    fn flush(&self) {
        let taken = match self.records.lock() {
            Ok(mut records) => records.take(),
            Err(_) => return,
        };
        self.produce(taken);
    }

    /// Never waits for the broker: a record that cannot be queued is dropped and counted,
    /// as a lost impression only lowers a count.
    fn produce(&self, taken: Vec<(i32, Vec<u8>, usize)>) {
        for (partition, payload, in_record) in taken {
            let record: FutureRecord<'_, (), [u8]> = FutureRecord::to(&self.topic)
                .partition(partition)
                .payload(&payload);
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    drop(delivery);
                    metrics::counter!("recpipe_impressions_queued_total")
                        .increment(in_record as u64);
                }
                Err((e, _)) => {
                    metrics::counter!("recpipe_impressions_dropped_total")
                        .increment(in_record as u64);
                    tracing::warn!(error = %e, impressions = in_record, "impressions not queued");
                }
            }
        }
    }

    /// Follows partitions added to the topic (users then hash elsewhere, as their
    /// events do).
    async fn follow_partition_count(&self) {
        let (producer, topic) = (self.producer.clone(), self.topic.clone());
        let count = tokio::task::spawn_blocking(move || partition_count(&producer, &topic)).await;
        let Ok(Ok(n)) = count else { return };
        // What was queued goes where it was hashed to; the rest follows the new count.
        let taken = match self.records.lock() {
            Ok(mut records) if n > records.partitions => {
                let taken = records.take();
                records.follow(n);
                taken
            }
            _ => return,
        };
        self.produce(taken);
        tracing::info!(
            topic = self.topic,
            partitions = n,
            "impressions follow the new partitions"
        );
    }
}

/// The number of partitions of `topic`, from the broker (blocking).
pub fn partition_count(producer: &FutureProducer, topic: &str) -> anyhow::Result<i32> {
    let metadata = producer
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let n = metadata
        .topics()
        .first()
        .map_or(0, |t| t.partitions().len() as i32);
    anyhow::ensure!(
        n > 0,
        "the topic {topic:?} does not exist: create the pipeline's topics (recpipe-admin topics create)"
    );
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn impression(n: usize, pad: usize) -> Vec<u8> {
        format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(pad)).into_bytes()
    }

    /// The records `impressions` (hash, JSON) make in `records`, with how many each holds.
    fn fill(records: &mut Records, impressions: &[(i32, Vec<u8>)]) -> Vec<(i32, Vec<u8>, usize)> {
        for (hash, json) in impressions {
            assert!(records.push(*hash, |out| out.extend_from_slice(json)));
        }
        records.take()
    }

    #[test]
    fn records_are_json_arrays_under_the_limit_holding_every_impression_in_order() {
        let mut records = Records::new(1, 300);
        let impressions: Vec<_> = (0..100)
            .map(|n| (n as i32, impression(n, n % 37)))
            .collect();
        let taken = fill(&mut records, &impressions);
        assert!(taken.len() > 1, "300 bytes cannot hold them all");
        let mut seen = Vec::new();
        for (partition, payload, in_record) in &taken {
            assert_eq!(*partition, 0);
            assert!(payload.len() <= 300, "{} bytes", payload.len());
            let array: Vec<serde_json::Value> = serde_json::from_slice(payload).unwrap();
            assert_eq!(array.len(), *in_record);
            seen.extend(array.into_iter().map(|v| v["n"].as_u64().unwrap()));
        }
        assert_eq!(seen, (0..100).collect::<Vec<u64>>());
        assert!(records.take().is_empty(), "taken once");
    }

    #[test]
    fn one_record_when_they_fit_and_an_oversized_impression_alone() {
        let mut records = Records::new(1, 1000);
        let taken = fill(
            &mut records,
            &[(0, impression(0, 1)), (0, impression(1, 1))],
        );
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].2, 2);

        let mut records = Records::new(1, 100);
        let taken = fill(
            &mut records,
            &[
                (0, impression(0, 1)),
                (0, impression(1, 500)),
                (0, impression(2, 1)),
            ],
        );
        let counts: Vec<usize> = taken.iter().map(|(_, _, n)| *n).collect();
        assert_eq!(counts, vec![1, 1, 1]);
        for (_, payload, _) in &taken {
            assert!(serde_json::from_slice::<Vec<serde_json::Value>>(payload).is_ok());
        }
        assert!(Records::new(1, 100).take().is_empty());
    }

    #[test]
    fn each_user_goes_to_the_partition_of_their_key_and_follows_added_partitions() {
        let users: Vec<String> = (0..50).map(|i| format!("user-{i}")).collect();
        let partitions_of = |records: &mut Records| {
            let taken = fill(
                records,
                &users
                    .iter()
                    .map(|u| (murmur2(u.as_bytes()), format!("{u:?}").into_bytes()))
                    .collect::<Vec<_>>(),
            );
            let mut found = std::collections::HashMap::new();
            for (partition, payload, _) in taken {
                for user in serde_json::from_slice::<Vec<String>>(&payload).unwrap() {
                    found.insert(user, partition);
                }
            }
            found
        };
        let mut records = Records::new(3, 64 * 1024);
        let found = partitions_of(&mut records);
        for user in &users {
            let keyed = recpipe_shared::kafka::partitioner::partition_of(user.as_bytes(), 3);
            assert_eq!(found[user], keyed, "{user}");
        }
        records.follow(5);
        let found = partitions_of(&mut records);
        assert!(
            found.values().any(|p| *p >= 3),
            "none hashed to the new partitions"
        );
        for user in &users {
            let keyed = recpipe_shared::kafka::partitioner::partition_of(user.as_bytes(), 5);
            assert_eq!(found[user], keyed, "{user}");
        }
        records.closed = true;
        assert!(
            !records.push(0, |out| out.push(b'1')),
            "accepted after close"
        );
        assert!(records.take().is_empty());
    }

    #[test]
    fn impressions_are_compressed_with_lz4_unless_the_client_settings_name_a_compression() {
        let compression = |settings: &KafkaSettings| {
            producer_settings(settings)
                .client_properties()
                .filter(|(key, _)| key == "compression.type" || key == "compression.codec")
                .map(|(key, value)| format!("{key}={value}"))
                .collect::<Vec<_>>()
        };
        let mut kafka = KafkaSettings::default();
        assert_eq!(compression(&kafka), ["compression.type=lz4"]);
        // From the environment: RECPIPE_KAFKA__CLIENT__COMPRESSION_TYPE=zstd.
        kafka
            .client
            .insert("compression_type".into(), "zstd".into());
        assert_eq!(compression(&kafka), ["compression.type=zstd"]);
        let mut kafka = KafkaSettings::default();
        kafka
            .client
            .insert("compression.codec".into(), "none".into());
        assert_eq!(compression(&kafka), ["compression.codec=none"]);
    }

    #[test]
    fn impressions_are_held_for_the_flush_unless_the_producers_linger_is_longer() {
        let mut kafka = KafkaSettings {
            linger_ms: 0,
            ..KafkaSettings::default()
        };
        assert_eq!(producer_settings(&kafka).linger_ms, 5);
        kafka.linger_ms = 20;
        assert_eq!(producer_settings(&kafka).linger_ms, 20);
    }
}
