//! The `models` topic: publishing a model assignment, and following the topic so that a
//! published assignment is loaded in the background and swapped in (hot swap; a
//! rollback is publishing the earlier assignment again).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureRecord;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::{is_end_of_partition, EndOfPartitionIsNoError};
use crate::events::ModelAssignment;
use crate::model::registry::{configured_assignment, IndexKind, ModelRegistry, Serving};
use crate::settings::{KafkaSettings, Settings};

/// The key every assignment is produced with (the topic can be compacted to the latest).
const ASSIGNMENT_KEY: &str = "assignment";

/// Longest the start-up read of the topic may take.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Publishes `assignment` (checked first) and waits until the broker has it.
pub async fn publish(kafka: &KafkaSettings, assignment: &ModelAssignment) -> anyhow::Result<()> {
    assignment
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid model assignment: {e}"))?;
    let producer = super::producer(kafka)?;
    let payload = serde_json::to_vec(assignment)?;
    producer
        .send(
            FutureRecord::to(&kafka.topics.models)
                .key(ASSIGNMENT_KEY)
                .payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| {
            anyhow::anyhow!(
                "cannot publish to {:?} on {}: {e}",
                kafka.topics.models,
                kafka.brokers
            )
        })?;
    Ok(())
}

fn decode(payload: Option<&[u8]>) -> Result<ModelAssignment, String> {
    let bytes = payload.ok_or("empty record")?;
    let assignment: ModelAssignment =
        serde_json::from_slice(bytes).map_err(|e| format!("not a model assignment: {e}"))?;
    assignment.validate()?;
    Ok(assignment)
}

/// Loads what should be served now, and keeps following the `models` topic until
/// `shutdown`: the newest published assignment that loads, else the configured one.
/// Without a `models` topic, the configured assignment is served and nothing is followed.
pub async fn start_registry(
    settings: &Settings,
    index: IndexKind,
    shutdown: CancellationToken,
) -> anyhow::Result<Arc<ModelRegistry>> {
    let settings = settings.clone();
    tokio::task::spawn_blocking(move || start_blocking(settings, index, shutdown)).await?
}

fn start_blocking(
    settings: Settings,
    index: IndexKind,
    shutdown: CancellationToken,
) -> anyhow::Result<Arc<ModelRegistry>> {
    let kafka = &settings.kafka;
    let hnsw = &settings.model.hnsw;
    let topic = kafka.topics.models.clone();
    // A fetch at the end of a partition is answered only after its whole wait: the start-up
    // read waits 10 ms a fetch (the topic's end is then known 90 ms sooner), the follower,
    // polling for as long as the service runs, 100 ms.
    let consumer = models_consumer(kafka, 10)?;
    let exists = consumer
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .map(|md| {
            md.topics()
                .first()
                .is_some_and(|t| !t.partitions().is_empty())
        })
        .map_err(|e| anyhow::anyhow!("cannot reach Kafka at {}: {e}", kafka.brokers))?;
    if !exists {
        let serving = Serving::load(configured_assignment(&settings)?, hnsw, index, None)?;
        tracing::warn!(
            topic,
            serving = %serving.describe(),
            "no models topic: serving the configured model; create the topic (recpipe-admin topics create) to publish new ones without a restart"
        );
        return Ok(Arc::new(ModelRegistry::new(serving)));
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;

    // Start-up: read the partition to its end, then serve the newest assignment that loads.
    let deadline = std::time::Instant::now() + READ_TIMEOUT;
    let mut published = Vec::new();
    let mut next_offset = Offset::Beginning;
    loop {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the models topic {topic:?} was not read to its end within {READ_TIMEOUT:?}"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                next_offset = Offset::Offset(m.offset() + 1);
                match decode(m.payload()) {
                    Ok(a) => published.push(a),
                    Err(e) => {
                        tracing::warn!(offset = m.offset(), error = %e, "model assignment skipped")
                    }
                }
            }
            Some(Err(e)) if is_end_of_partition(&e) => break,
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
    let mut serving = None;
    while let Some(a) = published.pop() {
        match Serving::load(a, hnsw, index, None) {
            Ok(s) => {
                serving = Some(s);
                break;
            }
            Err(e) => {
                tracing::error!(error = %e, "published model assignment cannot be served here; trying the one before")
            }
        }
    }
    let serving = match serving {
        Some(s) => s,
        None => Serving::load(configured_assignment(&settings)?, hnsw, index, None)?,
    };
    tracing::info!(serving = %serving.describe(), "models ready");
    let registry = Arc::new(ModelRegistry::new(serving));

    let follower = registry.clone();
    let hnsw = hnsw.clone();
    let kafka = kafka.clone();
    std::thread::Builder::new()
        .name("models-follower".into())
        .spawn(move || {
            // Closing the start-up reader takes a while; it is done here, off the start.
            drop(consumer);
            // From where the start-up read ended, so no assignment published since is missed.
            let follower_consumer = || {
                let c = models_consumer(&kafka, 100)?;
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&topic, 0, next_offset)?;
                c.assign(&tpl)?;
                Ok::<_, KafkaError>(c)
            };
            loop {
                match follower_consumer() {
                    Ok(c) => return follow(c, follower, &hnsw, index, shutdown),
                    Err(e) if !shutdown.is_cancelled() => {
                        tracing::error!(error = %e, "cannot follow the models topic yet; serving the model read at start and retrying in 1 s");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    Err(_) => return,
                }
            }
        })?;
    Ok(registry)
}

/// A reader of the models topic, which is assigned, never subscribed.
fn models_consumer(
    kafka: &KafkaSettings,
    fetch_wait_max_ms: u32,
) -> Result<BaseConsumer<EndOfPartitionIsNoError>, KafkaError> {
    super::consumer_config(kafka)
        // Partitions are assigned, never subscribed, so the group is only a label.
        .set("group.id", format!("{}-models-reader", kafka.group_prefix))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", fetch_wait_max_ms.to_string())
        .create_with_context(EndOfPartitionIsNoError { reader: "models" })
}

/// Loads each newly published assignment (in this thread, so serving goes on meanwhile)
/// and swaps it in. One that cannot be loaded is logged and counted; the current one stays.
fn follow(
    consumer: BaseConsumer<EndOfPartitionIsNoError>,
    registry: Arc<ModelRegistry>,
    hnsw: &crate::settings::HnswSettings,
    index: IndexKind,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let message = match consumer.poll(Duration::from_millis(250)) {
            Some(Ok(m)) => m,
            Some(Err(e)) if is_end_of_partition(&e) => continue,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "models topic read failed; retrying");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            None => continue,
        };
        let current = registry.current();
        let loaded = decode(message.payload())
            .map_err(|e| e.to_string())
            .and_then(|a| Serving::load(a, hnsw, index, Some(&current)).map_err(|e| e.to_string()));
        match loaded {
            Ok(next) => registry.replace(next),
            Err(e) => {
                metrics::counter!("recpipe_model_assignments_rejected_total").increment(1);
                tracing::error!(offset = message.offset(), error = %e, serving = %current.describe(), "model assignment rejected; still serving the current one");
            }
        }
    }
}
