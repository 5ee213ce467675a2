//! The impressions the API serves, gathered into few Kafka records.
//!
//! Every GET of a list is an impression (schemas/impression.v1.schema.json). Produced one
//! record each, tens of thousands a second, they cost the broker and save-worker a
//! record's work per GET, on the machine the API shares with them. Instead, a GET hands
//! its encoded impression to this log (a lock-free channel send, which wakes nothing),
//! and a flusher task produces them every `api.impressions_linger_ms` as one record per
//! partition (schemas/impression-batch.v1.schema.json): a JSON array of the impressions
//! of that partition's users, in the order they were served, each record at most
//! `kafka.max_record_bytes` (what save-worker accepts). The partition is the one a
//! record keyed by the user's id goes to, so a user's impressions stay beside their
//! events.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use recpipe_shared::kafka::partitioner::{murmur2, partition_of_hash};
use recpipe_shared::settings::KafkaSettings;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One served impression, encoded, with its user's key hash.
struct Served {
    hash: i32,
    json: Vec<u8>,
}

pub struct ImpressionLog {
    sender: mpsc::UnboundedSender<Served>,
    flusher: Mutex<Option<(CancellationToken, JoinHandle<()>)>>,
}

/// The impressions producer's settings: `kafka`'s, compressed with lz4 unless
/// `kafka.client` names a compression. Impressions are most of the API's bytes to Kafka
/// (one per GET, about 300 bytes, repeating field names, model and items); lz4 makes
/// them 2-8 times smaller for the broker, which on tansu holds every record in memory.
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
    settings
}

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
        let (sender, receiver) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let flusher = Flusher {
            producer,
            topic,
            partitions: partitions.max(1),
            max_record_bytes,
            receiver,
            queued: vec![Vec::new(); partitions.max(1) as usize],
        };
        let handle = tokio::spawn(flusher.run(linger, stop.clone()));
        Arc::new(ImpressionLog {
            sender,
            flusher: Mutex::new(Some((stop, handle))),
        })
    }

    /// Queues one impression of `user_id`'s. Never waits.
    pub fn record(&self, user_id: &str, json: Vec<u8>) {
        let hash = murmur2(user_id.as_bytes());
        if self.sender.send(Served { hash, json }).is_err() {
            // Only after close: the API is stopping.
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

struct Flusher {
    producer: FutureProducer,
    topic: String,
    partitions: i32,
    max_record_bytes: usize,
    receiver: mpsc::UnboundedReceiver<Served>,
    /// Impressions waiting, per partition.
    queued: Vec<Vec<Vec<u8>>>,
}

impl Flusher {
    async fn run(mut self, linger: Duration, stop: CancellationToken) {
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

    /// Takes what the GETs queued and produces it, one record per partition (more where
    /// a partition's impressions pass the size limit). Never waits for the broker: a
    /// record that cannot be queued is dropped and counted, as a lost impression only
    /// lowers a count.
    fn flush(&mut self) {
        while let Ok(served) = self.receiver.try_recv() {
            let p = partition_of_hash(served.hash, self.partitions);
            self.queued[p as usize].push(served.json);
        }
        for (partition, queued) in self.queued.iter_mut().enumerate() {
            if queued.is_empty() {
                continue;
            }
            let impressions = std::mem::take(queued);
            let count = impressions.len();
            for (payload, in_record) in batch_records(impressions, self.max_record_bytes) {
                let record: FutureRecord<'_, (), [u8]> = FutureRecord::to(&self.topic)
                    .partition(partition as i32)
                    .payload(&payload);
                match self.producer.send_result(record) {
                    Ok(delivery) => drop(delivery),
                    Err((e, _)) => {
                        metrics::counter!("recpipe_impressions_dropped_total")
                            .increment(in_record as u64);
                        tracing::warn!(error = %e, impressions = in_record, "impressions not queued");
                    }
                }
            }
            metrics::counter!("recpipe_impressions_queued_total").increment(count as u64);
        }
    }

    /// Follows partitions added to the topic (users then hash elsewhere, as their
    /// events do).
    async fn follow_partition_count(&mut self) {
        let (producer, topic) = (self.producer.clone(), self.topic.clone());
        let count = tokio::task::spawn_blocking(move || partition_count(&producer, &topic)).await;
        if let Ok(Ok(n)) = count {
            if n > self.partitions {
                self.flush();
                tracing::info!(
                    topic = self.topic,
                    partitions = n,
                    "impressions follow the new partitions"
                );
                self.partitions = n;
                self.queued.resize(n as usize, Vec::new());
            }
        }
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

/// `impressions` as JSON arrays of at most `max_bytes` each (an impression larger than
/// that alone goes alone), in order; each with the number of impressions it holds.
pub fn batch_records(impressions: Vec<Vec<u8>>, max_bytes: usize) -> Vec<(Vec<u8>, usize)> {
    let mut records = Vec::new();
    let mut record: Vec<u8> = Vec::new();
    let mut in_record = 0;
    for json in impressions {
        // `[` or `,` before it, `]` after.
        if in_record > 0 && record.len() + 1 + json.len() + 1 > max_bytes {
            record.push(b']');
            records.push((std::mem::take(&mut record), in_record));
            in_record = 0;
        }
        record.push(if in_record == 0 { b'[' } else { b',' });
        record.extend_from_slice(&json);
        in_record += 1;
    }
    if in_record > 0 {
        record.push(b']');
        records.push((record, in_record));
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    fn impression(n: usize, pad: usize) -> Vec<u8> {
        format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(pad)).into_bytes()
    }

    #[test]
    fn records_are_json_arrays_under_the_limit_holding_every_impression_in_order() {
        let impressions: Vec<Vec<u8>> = (0..100).map(|n| impression(n, n % 37)).collect();
        let records = batch_records(impressions.clone(), 300);
        assert!(records.len() > 1, "300 bytes cannot hold them all");
        let mut seen = Vec::new();
        for (payload, in_record) in &records {
            assert!(payload.len() <= 300, "{} bytes", payload.len());
            let array: Vec<serde_json::Value> = serde_json::from_slice(payload).unwrap();
            assert_eq!(array.len(), *in_record);
            seen.extend(array.into_iter().map(|v| v["n"].as_u64().unwrap()));
        }
        assert_eq!(seen, (0..100).collect::<Vec<u64>>());
    }

    #[test]
    fn one_record_when_they_fit_and_an_oversized_impression_alone() {
        let records = batch_records(vec![impression(0, 1), impression(1, 1)], 1000);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].1, 2);

        let records = batch_records(
            vec![impression(0, 1), impression(1, 500), impression(2, 1)],
            100,
        );
        let counts: Vec<usize> = records.iter().map(|(_, n)| *n).collect();
        assert_eq!(counts, vec![1, 1, 1]);
        assert!(serde_json::from_slice::<Vec<serde_json::Value>>(&records[1].0).is_ok());
        assert!(batch_records(Vec::new(), 100).is_empty());
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
}
