//! Kafka plumbing shared by every service: client settings, topic creation, and the
//! consume → process → produce → commit framework in [`framework`].

pub mod framework;
pub mod models;
pub mod partitioner;
pub mod relay;

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::types::RDKafkaErrorCode;

use crate::settings::KafkaSettings;

/// Settings every client gets: the brokers and the pass-through properties (SASL, TLS...).
pub fn client_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.brokers);
    with_overrides(config, settings)
}

/// How long librdkafka waits before fetching again for a partition whose local queue was
/// over its limits (`queued.min.messages`, `queued.max.messages.kbytes`); 1 s by default.
/// A consumer that empties its queue sooner than that sat idle for the rest of the second
/// with records waiting on the broker: save-worker draining a backlog spent a third of
/// its time so, and the bare relay of `recpipe-loadtest relay` ran 1.4 times as fast
/// without it (BENCHMARKS.md, twenty-fourth session).
pub const FETCH_QUEUE_BACKOFF_MS: u32 = 10;

/// Settings every consumer gets: [`client_config`]'s and a short fetch queue backoff
/// ([`FETCH_QUEUE_BACKOFF_MS`]), which the pass-through properties can override.
pub fn consumer_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = client_config(settings);
    config.set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS.to_string());
    with_overrides(config, settings)
}

/// `config` with the pass-through properties applied again, so that they override the
/// defaults a client sets (e.g. `linger.ms`, `fetch.wait.max.ms`).
pub fn with_overrides(mut config: ClientConfig, settings: &KafkaSettings) -> ClientConfig {
    for (key, value) in settings.client_properties() {
        config.set(key, value);
    }
    config
}

/// An idempotent producer that partitions by key like the Java client does, so other
/// producers that key by user id put a user's events on the same partition.
pub fn producer(settings: &KafkaSettings) -> Result<FutureProducer, KafkaError> {
    with_overrides(producer_config(settings), settings).create()
}

/// [`producer`]'s configuration, for a producer that sets more of its own (the
/// pass-through properties still go last: [`with_overrides`]).
pub fn producer_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = client_config(settings);
    config
        .set("enable.idempotence", "true")
        // With sparse connections an idempotent producer finds no broker up when it first
        // asks for its producer id, and asks again only after 500 ms: the first records
        // (a service's first batch, a first POST) waited that long. Connected at once, it
        // has its id within milliseconds.
        .set("enable.sparse.connections", "false")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", settings.linger_ms.to_string())
        .set(
            "message.timeout.ms",
            settings.delivery_timeout_ms.to_string(),
        );
    config
}

/// Whether `e` only says a consumer reached the end of a partition, which readers that
/// ask for it (`enable.partition.eof`) take as "caught up".
pub fn is_end_of_partition(e: &KafkaError) -> bool {
    matches!(
        e,
        KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
    )
}

/// The client context of a consumer that reads to the end of its partitions. librdkafka
/// reports each end also as a client error, which rdkafka's default context logs at
/// ERROR ("librdkafka: Global error: PartitionEOF"): a line in the log each time such a
/// reader caught up, for nothing wrong. Other errors are logged with the reader's name.
pub struct EndOfPartitionIsNoError {
    pub reader: &'static str,
}

impl rdkafka::ClientContext for EndOfPartitionIsNoError {
    fn error(&self, error: KafkaError, reason: &str) {
        if !is_end_of_partition(&error) {
            tracing::warn!(reader = self.reader, %error, reason, "kafka consumer error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for EndOfPartitionIsNoError {}

/// A record's time from its production (its CreateTime) to `now_ms`, in seconds: the
/// broker and queueing time of a hop. None when the record carries no timestamp.
pub fn record_wait_seconds(m: &impl rdkafka::Message, now_ms: i64) -> Option<f64> {
    let created = m.timestamp().to_millis()?;
    Some((now_ms - created).max(0) as f64 / 1000.0)
}

/// Makes `producer` send what it holds now rather than linger, without holding up the
/// caller. librdkafka's flush sends without lingering while it runs and returns once that
/// is delivered, or after `wait`; it blocks, so it runs on a blocking thread. (rdkafka's
/// own `flush` calls it with no wait, in a loop, which the producer's thread often
/// missed: the records then waited for the linger.)
pub fn send_now(producer: &FutureProducer, wait: Duration) {
    let producer = producer.clone();
    let wait_ms = wait.as_millis().min(i32::MAX as u128) as i32;
    tokio::task::spawn_blocking(move || {
        let client = producer.client().native_ptr();
        // SAFETY: the client is valid while `producer`, moved here, lives.
        #[allow(unsafe_code)]
        unsafe {
            rdkafka::bindings::rd_kafka_flush(client, wait_ms);
        }
    });
}

/// Creates the pipeline's missing topics: the user-partitioned ones with `partitions`
/// partitions, `models` with one (its order is the order of assignments).
pub async fn ensure_pipeline_topics(
    settings: &KafkaSettings,
    partitions: i32,
) -> Result<(), KafkaError> {
    ensure_topics(settings, &settings.topics.partitioned(), partitions).await?;
    ensure_topics(settings, &[settings.topics.models.as_str()], 1).await
}

/// Creates the topics that are missing (existing ones are left alone).
pub async fn ensure_topics(
    settings: &KafkaSettings,
    topics: &[&str],
    partitions: i32,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(settings).create()?;
    let new_topics: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(topic) => tracing::info!(topic, partitions, "topic created"),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic, "topic exists")
            }
            Err((topic, code)) => {
                tracing::error!(topic, %code, "topic creation failed");
                return Err(KafkaError::AdminOp(code));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This thread's CPU time so far, in clock ticks.
    fn thread_cpu_ticks() -> u64 {
        crate::testkit::cpu_ticks("/proc/thread-self/stat")
    }

    #[test]
    fn a_poll_shorter_than_a_millisecond_waits_rather_than_spins() {
        // The vendored rdkafka's fix (vendor/README.md): rdkafka handed librdkafka a
        // wait's milliseconds rounded down, so the last fraction of a millisecond of
        // every poll became waits of 0 in a loop that spun on the clock until the
        // deadline: the thread was on the CPU all along. Rounded up, it sleeps.
        let producer: rdkafka::producer::BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .create()
            .unwrap();
        let (cpu_before, started) = (thread_cpu_ticks(), std::time::Instant::now());
        for _ in 0..500 {
            producer.poll(Duration::from_micros(900));
        }
        let wall = started.elapsed();
        let cpu_ms = (thread_cpu_ticks() - cpu_before) * 1000 / clock_ticks_per_second();
        assert!(wall >= Duration::from_millis(450), "{wall:?}");
        assert!(
            Duration::from_millis(cpu_ms) < wall / 4,
            "on the CPU {cpu_ms} ms of {wall:?}: the poll spun"
        );
    }

    fn clock_ticks_per_second() -> u64 {
        let out = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// What `f` logs, as text.
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn a_reader_at_the_end_of_a_partition_logs_nothing_and_another_error_names_the_reader() {
        use rdkafka::ClientContext;
        let context = EndOfPartitionIsNoError {
            reader: "list view",
        };
        let at_end = logged(|| {
            // Both ways librdkafka reports it (the first is what query-api logged).
            context.error(
                KafkaError::Global(RDKafkaErrorCode::PartitionEOF),
                "Fetch from broker 111 reached end of partition at offset 0 (HighwaterMark 0)",
            );
            context.error(KafkaError::PartitionEOF(3), "end");
        });
        assert_eq!(at_end, "");
        let down = logged(|| {
            context.error(
                KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
                "127.0.0.1:9092/bootstrap: Connection refused",
            )
        });
        assert!(
            down.contains("WARN")
                && down.contains("reader=\"list view\"")
                && down.contains("Connection refused"),
            "{down}"
        );
    }

    #[test]
    fn consumers_fetch_again_soon_after_a_full_queue_unless_told_otherwise() {
        let mut settings = KafkaSettings::default();
        let config = consumer_config(&settings);
        assert_eq!(config.get("fetch.queue.backoff.ms"), Some("10"));
        assert_eq!(
            config.get("bootstrap.servers"),
            Some(settings.brokers.as_str())
        );
        settings
            .client
            .insert("fetch.queue.backoff.ms".into(), "1000".into());
        assert_eq!(
            consumer_config(&settings).get("fetch.queue.backoff.ms"),
            Some("1000"),
            "kafka.client overrides it"
        );
        assert_eq!(
            client_config(&settings).get("fetch.queue.backoff.ms"),
            Some("1000")
        );
        assert_eq!(
            client_config(&KafkaSettings::default()).get("fetch.queue.backoff.ms"),
            None,
            "producers and admin clients do not get it"
        );
    }
}
