//! The consume → process → produce → commit loop that every pipeline service runs.
//!
//! A service implements [`Processor`]; [`run`] owns the consumer group and the producer:
//! - records are read in batches; each is decoded, and one that cannot be decoded or
//!   processed goes to the dead-letter topic (original bytes, reason in headers) while
//!   the rest of the batch goes on;
//! - outputs are produced keyed by user, and offsets are committed only after every
//!   output (and dead letter) of the batch is acknowledged by the broker, so a crash
//!   at any point replays records rather than losing them (at-least-once; processors
//!   make replays harmless);
//! - a batch-level failure (e.g. the store is down) is retried with backoff, without
//!   committing, until it succeeds or shutdown is requested;
//! - a processor still holding a record it read (see [`Processor::held_offsets`]) keeps
//!   its partition's commit before it, so a crash replays that record too;
//! - on shutdown the batch in hand is finished and committed, then the loop returns.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::FutureExt;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::events::now_ms;
use crate::settings::KafkaSettings;

/// Where a record came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMeta {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
}

/// A decoded record and where it came from.
#[derive(Debug)]
pub struct Decoded<T> {
    pub meta: RecordMeta,
    pub input: T,
}

/// A record to produce.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub topic: String,
    pub key: String,
    pub payload: Vec<u8>,
    /// Explicit partition; `None` lets the partitioner hash the key.
    pub partition: Option<i32>,
}

/// What became of one input record.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Processed; produce these (possibly none).
    Emit(Vec<Output>),
    /// Cannot be processed, ever: dead-letter it with this reason.
    Reject(String),
}

/// A failure of a whole batch that may pass (store down, broker slow): retried.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RetryableError(pub String);

#[async_trait]
pub trait Processor: Send {
    type Input: Send;

    /// Names the consumer group (`<prefix>-<name>`) and the dead-letter headers.
    fn name(&self) -> &str;

    /// Topics to consume.
    fn topics(&self) -> Vec<String>;

    /// Turns one record's bytes into an input, or says why it cannot.
    fn decode(&self, meta: &RecordMeta, payload: &[u8]) -> Result<Self::Input, String>;

    /// Processes a batch; returns one outcome per input, in order.
    async fn process(
        &mut self,
        batch: Vec<Decoded<Self::Input>>,
    ) -> Result<Vec<Outcome>, RetryableError>;

    /// Called with the partitions of each new assignment as soon as it is known (and
    /// with any partition of a batch not prepared since), before any of their records is
    /// processed, so a processor can restore the state that belongs to them.
    async fn prepare_partitions(
        &mut self,
        _partitions: &[(String, i32)],
    ) -> Result<(), RetryableError> {
        Ok(())
    }

    /// Whether anyone waits on this processor's work as it happens (event → fresh
    /// list). One that says no is fetched for with `background_fetch_wait_max_ms`
    /// instead of `fetch_wait_max_ms` (the broker is asked again less often when idle)
    /// and gathers its batches for `background_batch_ms` (less once records stop
    /// coming for `background_batch_idle_ms`).
    fn on_freshness_path(&self) -> bool {
        true
    }

    /// Most distinct record keys a batch may hold, besides `kafka.batch_max` records and
    /// `kafka.batch_max_bytes`: for a processor that holds something per key while it
    /// works on a batch (update-embeddings: each user's state in memory).
    fn batch_max_keys(&self) -> Option<usize> {
        None
    }

    /// Called before each batch is processed with whether records were waiting behind
    /// it: its gathering stopped at a limit (records, bytes or keys), not for want of
    /// records. save-worker then puts off store upkeep until it has caught up.
    fn records_waiting(&mut self, _waiting: bool) {}

    /// Called between batches and when idle: outputs not tied to input records.
    fn tick(&mut self) -> Vec<Output> {
        Vec::new()
    }

    /// Called when no record has come for a while (about 200 ms): work that waits on
    /// time rather than on records, such as giving up on something awaited. Offsets it
    /// lets go of (see [`Processor::held_offsets`]) are committed then. A failure is
    /// logged, makes the service not ready until the work succeeds, and the work is
    /// tried again when idle after a backoff (100 ms, doubling to 5 s), so a store that
    /// is down is not asked five times a second.
    async fn idle(&mut self) -> Result<(), RetryableError> {
        Ok(())
    }

    /// Resolves when work a batch left running (see [`Processor::held_offsets`]) has
    /// finished, so that its offsets are committed then rather than at the next batch or
    /// idle tick: a backlog's last write would otherwise wait out the idle period before
    /// its records count as done. An error is the processor's to keep and retry (at the
    /// next batch or `idle`). Must be cancel-safe: the loop drops it when a record comes
    /// first. Never resolves while nothing runs, nor by default.
    async fn in_flight_done(&mut self) -> Result<(), RetryableError> {
        std::future::pending().await
    }

    /// Called once on a clean stop, before the last commit: work a batch left running
    /// (save-worker's last store write) is finished, so that its offsets are committed
    /// rather than its records read again after a restart. On an error they stay
    /// uncommitted, and the records are read again.
    async fn finish_in_flight(&mut self) -> Result<(), RetryableError> {
        Ok(())
    }

    /// Records of past batches this processor has not finished with (it keeps them in
    /// memory, waiting on something): for each partition, the offset of the first one.
    /// Called after each batch; that partition's commit stays before it, so a crash or
    /// a rebalance reads it again rather than losing what was still to be done.
    fn held_offsets(&self) -> Vec<HeldOffset> {
        Vec::new()
    }
}

/// See [`Processor::held_offsets`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldOffset {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Counters of one run, returned when it ends.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RunStats {
    pub batches: u64,
    pub records: u64,
    pub dead_lettered: u64,
    pub produced: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameworkError {
    #[error("Kafka client error: {0}")]
    Kafka(#[from] KafkaError),
    #[error("could not deliver {failed} output record(s) to Kafka ({first}); offsets were not committed, so the batch is replayed on restart")]
    Delivery { failed: usize, first: String },
}

/// Header names of dead-letter records (see schemas/dead-letter.md).
pub mod dlq_headers {
    pub const REASON: &str = "recpipe.dlq.reason";
    pub const SERVICE: &str = "recpipe.dlq.service";
    pub const TOPIC: &str = "recpipe.dlq.topic";
    pub const PARTITION: &str = "recpipe.dlq.partition";
    pub const OFFSET: &str = "recpipe.dlq.offset";
    pub const FAILED_AT: &str = "recpipe.dlq.failed_at";
}

/// Notes rebalances so the loop knows partitions may have moved, and publishes the
/// consumer lag librdkafka reports in its statistics.
struct RebalanceContext {
    rebalanced: Arc<AtomicBool>,
    /// Wakes the loop waiting for records, so a new assignment is prepared at once.
    assigned: Arc<tokio::sync::Notify>,
    /// `auto.offset.reset` is `earliest` (the default here, unless overridden).
    reset_to_earliest: bool,
    /// `partition.assignment.strategy` is `cooperative-sticky` (only by an override).
    /// Read from the configuration: asking librdkafka (`rebalance_protocol`) inside the
    /// callback waits on the group's thread without a timeout, and when the consumer
    /// was dropped during a rebalance that wait never ended (a test hung in the drop).
    cooperative: bool,
    service: String,
    health: Arc<Health>,
}

/// Sets each partition of `tpl` to its committed offset, or to the beginning where none is
/// committed. A partition whose offset cannot be read is left as it came (librdkafka then
/// looks its offset up itself, as it would have).
fn start_uncommitted_at_beginning<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    tpl: &mut TopicPartitionList,
) {
    let committed = match consumer.committed_offsets(tpl.clone(), Duration::from_secs(5)) {
        Ok(committed) => committed,
        Err(e) => {
            tracing::debug!(error = %e, "committed offsets not read at assignment; librdkafka reads them");
            return;
        }
    };
    // In place: `tpl` belongs to the rebalance event, which frees it.
    for element in committed.elements() {
        if element.error().is_err() {
            continue;
        }
        let start = match element.offset() {
            Offset::Offset(_) => element.offset(),
            _ => Offset::Beginning,
        };
        if let Err(e) = tpl.set_partition_offset(element.topic(), element.partition(), start) {
            tracing::debug!(error = %e, "start offset not set at assignment; librdkafka looks it up");
        }
    }
}

/// The start of the not-ready reason for a broker that refuses the client's credentials
/// or certificate: such a service would otherwise sit idle, "ready", doing nothing.
const SECURITY_PROBLEM: &str = "kafka: the broker refused the connection's security";

impl ClientContext for RebalanceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let refused = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Authentication
                    | RDKafkaErrorCode::SaslAuthenticationFailed
                    | RDKafkaErrorCode::SSL
            )
        );
        if refused {
            tracing::error!(service = %self.service, %error, reason, "check kafka.client's sasl.* and ssl.* settings");
            self.health.set_not_ready(format!(
                "{SECURITY_PROBLEM} ({reason}); check kafka.client's sasl.* and ssl.* settings"
            ));
        } else {
            tracing::warn!(service = %self.service, %error, reason, "kafka client error");
        }
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // -1 is the internal "unassigned" partition, and lag -1 means unknown.
                if p.partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!(
                    "recpipe_consumer_lag",
                    "service" => self.service.clone(),
                    "topic" => topic.clone(),
                    "partition" => partition.to_string()
                )
                .set(p.consumer_lag as f64);
            }
        }
    }
}

impl ConsumerContext for RebalanceContext {
    /// As rdkafka's own, but a partition of the assignment with no committed offset is
    /// assigned at its beginning (`auto.offset.reset` is `earliest`): left to librdkafka,
    /// it finds no offset, treats that as an error and queries again after 100 ms, so
    /// every fresh group (a first start, each test) waited that long for its first record.
    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::types::RDKafkaRespErr;
        let cooperative = self.cooperative;
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if self.reset_to_earliest {
                    start_uncommitted_at_beginning(base_consumer, tpl);
                }
                self.pre_rebalance(base_consumer, &Rebalance::Assign(tpl));
                let assigned = if cooperative {
                    base_consumer.incremental_assign(tpl)
                } else {
                    base_consumer.assign(tpl)
                };
                self.post_rebalance(base_consumer, &Rebalance::Assign(tpl));
                assigned
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.pre_rebalance(base_consumer, &Rebalance::Revoke(tpl));
                let revoked = if cooperative {
                    base_consumer.incremental_unassign(tpl)
                } else {
                    base_consumer.unassign()
                };
                self.post_rebalance(base_consumer, &Rebalance::Revoke(tpl));
                revoked
            }
            _ => {
                let rebalance = Rebalance::Error(KafkaError::Rebalance(err.into()));
                self.pre_rebalance(base_consumer, &rebalance);
                let unassigned = base_consumer.unassign();
                self.post_rebalance(base_consumer, &rebalance);
                unassigned
            }
        };
        if let Err(e) = result {
            tracing::warn!(service = %self.service, error = %e, "rebalance: the assignment could not be applied");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions assigned");
                // Partitions came from the group coordinator, so the connection works now.
                if self
                    .health
                    .problem()
                    .is_some_and(|p| p.starts_with(SECURITY_PROBLEM))
                {
                    self.health.set_ready();
                }
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions revoked")
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
        self.rebalanced.store(true, Ordering::SeqCst);
        if matches!(rebalance, Rebalance::Assign(_)) {
            self.assigned.notify_one();
        }
    }
}

/// Runs `processor` until `shutdown` is cancelled.
pub async fn run<P: Processor>(
    settings: &KafkaSettings,
    processor: P,
    shutdown: CancellationToken,
) -> Result<RunStats, FrameworkError> {
    run_with_health(settings, processor, shutdown, Health::new()).await
}

/// As [`run`], reporting readiness to `health`: ready while batches go through, not
/// ready while a failing step is being retried (e.g. the store is down).
pub async fn run_with_health<P: Processor>(
    settings: &KafkaSettings,
    mut processor: P,
    shutdown: CancellationToken,
    health: Arc<Health>,
) -> Result<RunStats, FrameworkError> {
    let service = processor.name().to_string();
    let rebalanced = Arc::new(AtomicBool::new(true));
    let assigned = Arc::new(tokio::sync::Notify::new());
    let fetch_wait_max_ms = if processor.on_freshness_path() {
        settings.fetch_wait_max_ms
    } else {
        settings.background_fetch_wait_max_ms
    };
    let mut config = super::consumer_config(settings);
    config
        .set("group.id", format!("{}-{}", settings.group_prefix, service))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("fetch.wait.max.ms", fetch_wait_max_ms.to_string())
        .set("statistics.interval.ms", "5000");
    // Ready from the start; the consumer's error callback may take it back at once.
    health.set_ready();
    let config = super::with_overrides(config, settings);
    let reset_to_earliest = config.get("auto.offset.reset") == Some("earliest");
    let cooperative = config
        .get("partition.assignment.strategy")
        .is_some_and(|s| s.contains("cooperative-sticky"));
    let consumer: StreamConsumer<RebalanceContext> =
        config.create_with_context(RebalanceContext {
            rebalanced: rebalanced.clone(),
            assigned: assigned.clone(),
            reset_to_earliest,
            cooperative,
            service: service.clone(),
            health: health.clone(),
        })?;
    let topics = processor.topics();
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topic_refs)?;
    let mut producer = batch_producer(settings)?;
    tracing::info!(service, ?topics, "consuming");
    crate::admin::metrics(); // the recorder must exist before the handles are made
    let processed = metrics::counter!("recpipe_records_total", "service" => service.clone(), "outcome" => "processed");
    let dead_lettered = metrics::counter!("recpipe_records_total", "service" => service.clone(), "outcome" => "dead_lettered");
    let produced = metrics::counter!("recpipe_produced_total", "service" => service.clone());
    let batch_seconds = metrics::histogram!("recpipe_batch_seconds", "service" => service.clone());
    // The parts of a batch's time spent waiting on the broker.
    let delivery_seconds =
        metrics::histogram!("recpipe_delivery_seconds", "service" => service.clone());
    let commit_seconds =
        metrics::histogram!("recpipe_commit_seconds", "service" => service.clone());
    // From a record's production (its CreateTime) to its arrival in a batch: the hop's
    // broker and queueing time, which the batch timings above leave out.
    let record_wait_seconds =
        metrics::histogram!("recpipe_record_wait_seconds", "service" => service.clone());

    let mut stats = RunStats::default();
    let mut prepared: HashSet<(String, i32)> = HashSet::new();
    let mut offsets = Offsets::default();
    let idle = Duration::from_millis(200);
    let mut idle_retry = IdleRetry::default();
    // Kept from batch to batch with its capacity: a new one grew to the batch's size a
    // doubling at a time, copying its records into fresh pages each time.
    let mut batch: Vec<OwnedMessage> = Vec::new();

    loop {
        // A new assignment is prepared as soon as it is known, before its records come:
        // a partition's state restore (about half a second even when there is nothing to
        // restore) then falls between batches rather than holding up the first batch
        // that has a record of it.
        if rebalanced.swap(false, Ordering::SeqCst) {
            prepared.clear();
            let assigned = assigned_partitions(&consumer);
            offsets.keep_only(&assigned);
            if !prepare(&mut processor, &mut prepared, assigned, &shutdown).await {
                return finish(&consumer, &producer, stats);
            }
        }
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            received = consumer.recv() => received,
            // Called back inside `recv`: prepare the assignment (above) while its first
            // records are still being fetched, not after them or after the idle wait.
            _ = assigned.notified() => continue,
            done = processor.in_flight_done() => {
                match done {
                    Ok(()) => {
                        let due = offsets.due(&processor.held_offsets());
                        if commit(&consumer, &due) {
                            offsets.committed(due);
                        }
                    }
                    // Retried by the next batch, or as failed idle work is, which also
                    // reports ready again once it succeeds in a quiet spell.
                    Err(e) => {
                        health.set_not_ready(format!("work in flight: {e}"));
                        let delay = idle_retry.failed(Instant::now());
                        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "work a batch left running failed; retrying");
                    }
                }
                continue;
            }
            _ = tokio::time::sleep(idle) => {
                if idle_retry.due(Instant::now()) {
                    match processor.idle().await {
                        Ok(()) => {
                            // Ready again if it was the idle work that had failed.
                            if idle_retry.succeeded() {
                                health.set_ready();
                            }
                        }
                        Err(e) => {
                            // E.g. save-worker's store is down: report it as a batch's
                            // failure would be.
                            health.set_not_ready(format!("idle work: {e}"));
                            let delay = idle_retry.failed(Instant::now());
                            tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "idle work failed; retrying when idle");
                        }
                    }
                }
                let due = offsets.due(&processor.held_offsets());
                if commit(&consumer, &due) {
                    offsets.committed(due);
                }
                let outputs: Vec<Outgoing> = processor.tick().into_iter().map(Outgoing::from).collect();
                match deliver(&producer, &outputs, settings).await {
                    Ok(n) => stats.produced += n,
                    // Periodic outputs (e.g. the popularity list) are made again next tick.
                    Err(e) => tracing::warn!(error = %e, "periodic outputs not delivered"),
                }
                continue;
            }
        };
        let batch_started = std::time::Instant::now();
        batch.clear();
        match first {
            Ok(m) => batch.push(owned(&m)),
            Err(e) => {
                tracing::warn!(error = %e, "consumer error");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        // Take what is already buffered, without waiting, up to the batch limits.
        let mut bytes = batch.iter().map(record_bytes).sum::<usize>();
        let max_keys = processor.batch_max_keys();
        let mut keys: HashSet<Vec<u8>> = HashSet::new();
        if let (Some(_), Some(key)) = (max_keys, batch[0].key()) {
            keys.insert(key.to_vec());
        }
        // A processor nobody waits on gathers for a while: save-worker's store then
        // writes one transaction per window, and a b-tree page that many of its rows
        // touch is written to the WAL once per window, not once per fetch. A backlog
        // fills the batch at once and is not held.
        // It stops early once records stop coming (`background_batch_idle_ms`): at the
        // end of a backlog the window would only wait.
        let gather_until = (!processor.on_freshness_path())
            .then(|| batch_started + Duration::from_millis(settings.background_batch_ms));
        let gather_idle = Duration::from_millis(settings.background_batch_idle_ms);
        let mut last_arrival = batch_started;
        let below_limits = |records: usize, bytes: usize, keys: usize| {
            records < settings.batch_max
                && bytes < settings.batch_max_bytes
                && max_keys.is_none_or(|max| keys < max)
        };
        while below_limits(batch.len(), bytes, keys.len()) {
            let next = match consumer.recv().now_or_never() {
                Some(received) => Some(received),
                None => match gather_until.map(|until| until.min(last_arrival + gather_idle)) {
                    Some(until) if std::time::Instant::now() < until => tokio::select! {
                        received = consumer.recv() => Some(received),
                        _ = tokio::time::sleep_until(until.into()) => None,
                        _ = shutdown.cancelled() => None,
                    },
                    _ => None,
                },
            };
            match next {
                Some(Ok(m)) => {
                    if gather_until.is_some() {
                        last_arrival = std::time::Instant::now();
                    }
                    let m = owned(&m);
                    bytes += record_bytes(&m);
                    if let (Some(_), Some(key)) = (max_keys, m.key()) {
                        if !keys.contains(key) {
                            keys.insert(key.to_vec());
                        }
                    }
                    batch.push(m);
                }
                Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                None => break,
            }
        }
        processor.records_waiting(!below_limits(batch.len(), bytes, keys.len()));
        let received = now_ms();
        for waited in batch
            .iter()
            .filter_map(|m| super::record_wait_seconds(m, received))
        {
            record_wait_seconds.record(waited);
        }

        // The batch's partitions, and the rest of an assignment that came while it was
        // being read.
        let mut partitions: Vec<(String, i32)> = Vec::new();
        for m in &batch {
            // A batch has a few partitions and thousands of records: one name each.
            if !partitions
                .iter()
                .any(|(t, p)| *p == m.partition() && t == m.topic())
            {
                partitions.push((m.topic().to_string(), m.partition()));
            }
        }
        if rebalanced.swap(false, Ordering::SeqCst) {
            prepared.clear();
            let assigned = assigned_partitions(&consumer);
            offsets.keep_only(&assigned);
            partitions.extend(assigned);
        }
        if !prepare(&mut processor, &mut prepared, partitions, &shutdown).await {
            // Not prepared: leave the batch uncommitted for the next owner.
            return finish(&consumer, &producer, stats);
        }

        let handle_started = std::time::Instant::now();
        let (outputs, dead, processed_all) = handle_batch(
            &health,
            &mut processor,
            &service,
            &settings.topics.dead_letters,
            settings.max_record_bytes,
            &batch,
            &shutdown,
        )
        .await;
        if !processed_all {
            // Shutdown during retries: nothing of this batch is committed.
            return finish(&consumer, &producer, stats);
        }
        let handle_ms = handle_started.elapsed().as_millis() as u64;
        let dead_count = dead.len() as u64;
        stats.dead_lettered += dead_count;
        let mut all = outputs;
        all.extend(dead);
        all.extend(processor.tick().into_iter().map(Outgoing::from));
        // A broker that is down or slow is waited out: the outputs are sent again with
        // backoff (a record the broker did take is then sent twice, which every consumer
        // makes harmless), nothing is committed meanwhile, and the service reports not
        // ready. Memory stays bounded by the batch in hand.
        let mut backoff = Backoff::new();
        let delivery_started = std::time::Instant::now();
        let delivered = loop {
            match deliver(&producer, &all, settings).await {
                Ok(n) => break n,
                Err(e) => {
                    health.set_not_ready(format!("kafka: {e}"));
                    // A fresh producer: an idempotent one whose records timed out in
                    // flight can be left in a fatal state (a broker without epoch bumps,
                    // like tansu), failing every later send.
                    producer = batch_producer(settings)?;
                    metrics::counter!("recpipe_delivery_retries_total", "service" => service.clone())
                        .increment(1);
                    let e = RetryableError(e.to_string());
                    if !backoff.wait(&shutdown, "delivering outputs", &e).await {
                        // Shutdown while the broker is away: the batch is replayed later.
                        return finish(&consumer, &producer, stats);
                    }
                }
            }
        };
        stats.produced += delivered;
        let delivery_elapsed = delivery_started.elapsed();
        delivery_seconds.record(delivery_elapsed.as_secs_f64());
        let commit_started = std::time::Instant::now();
        offsets.processed(batch.iter().map(|m| (m.topic(), m.partition(), m.offset())));
        let due = offsets.due(&processor.held_offsets());
        if commit(&consumer, &due) {
            offsets.committed(due);
        }
        commit_seconds.record(commit_started.elapsed().as_secs_f64());
        health.set_ready();
        stats.batches += 1;
        stats.records += batch.len() as u64;
        processed.increment(batch.len() as u64 - dead_count);
        dead_lettered.increment(dead_count);
        produced.increment(delivered);
        batch_seconds.record(batch_started.elapsed().as_secs_f64());
        // A timeline of a drain, read with `RUST_LOG=recpipe_shared::kafka::framework=debug`.
        tracing::debug!(
            records = batch.len(),
            produced = delivered,
            ms = batch_started.elapsed().as_millis() as u64,
            handle_ms,
            delivery_ms = delivery_elapsed.as_millis() as u64,
            "batch handled"
        );
        // The records go now, not when the next batch comes; the capacity stays.
        batch.clear();
    }
    // A clean stop between batches.
    match processor.finish_in_flight().await {
        Ok(()) => {
            let due = offsets.due(&processor.held_offsets());
            if commit(&consumer, &due) {
                offsets.committed(due);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "work in flight not finished at stop; its records will be read again")
        }
    }
    finish(&consumer, &producer, stats)
}

/// The partitions assigned to this consumer now.
fn assigned_partitions<C: Consumer<RebalanceContext>>(consumer: &C) -> Vec<(String, i32)> {
    match consumer.assignment() {
        Ok(tpl) => tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect(),
        Err(e) => {
            // The batches' own partitions are still prepared before they are processed.
            tracing::warn!(error = %e, "could not read the assignment");
            Vec::new()
        }
    }
}

/// Prepares those of `partitions` not yet prepared, retrying with backoff; false when
/// shutdown was requested before they were.
async fn prepare<P: Processor>(
    processor: &mut P,
    prepared: &mut HashSet<(String, i32)>,
    mut partitions: Vec<(String, i32)>,
    shutdown: &CancellationToken,
) -> bool {
    partitions.retain(|key| !prepared.contains(key));
    partitions.sort();
    partitions.dedup();
    if partitions.is_empty() {
        return true;
    }
    let mut backoff = Backoff::new();
    while let Err(e) = processor.prepare_partitions(&partitions).await {
        if !backoff
            .wait(shutdown, "restoring partition state", &e)
            .await
        {
            return false;
        }
    }
    prepared.extend(partitions);
    true
}

fn finish<C: Consumer<RebalanceContext>>(
    consumer: &C,
    producer: &FutureProducer,
    stats: RunStats,
) -> Result<RunStats, FrameworkError> {
    use rdkafka::producer::Producer;
    producer.flush(Duration::from_secs(10))?;
    consumer.unsubscribe();
    tracing::info!(?stats, "stopped");
    Ok(stats)
}

/// Exponential backoff between retries of a failed step.
struct Backoff {
    delay: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            delay: Duration::from_millis(100),
        }
    }

    /// Logs the failure and waits; false when shutdown was requested meanwhile.
    async fn wait(
        &mut self,
        shutdown: &CancellationToken,
        what: &str,
        error: &RetryableError,
    ) -> bool {
        let delay = self.next_delay();
        tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "{what} failed; retrying");
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    /// The wait before the next retry; each is twice the one before, up to 5 s.
    fn next_delay(&mut self) -> Duration {
        let delay = self.delay;
        self.delay = (self.delay * 2).min(Duration::from_secs(5));
        delay
    }
}

/// When to try [`Processor::idle`] again after it failed. Records keep being read
/// meanwhile, so it is a time to wait for rather than a sleep: a store that is down
/// would otherwise fail it (and log it) at every idle tick.
#[derive(Default)]
struct IdleRetry {
    after_failure: Option<(Instant, Backoff)>,
}

impl IdleRetry {
    fn due(&self, now: Instant) -> bool {
        self.after_failure.as_ref().is_none_or(|(at, _)| now >= *at)
    }

    /// Records a failure at `now`; returns how long until the next try.
    fn failed(&mut self, now: Instant) -> Duration {
        let (at, backoff) = self
            .after_failure
            .get_or_insert_with(|| (now, Backoff::new()));
        let delay = backoff.next_delay();
        *at = now + delay;
        delay
    }

    /// Records a success; true if the work had been failing.
    fn succeeded(&mut self) -> bool {
        self.after_failure.take().is_some()
    }
}

/// Decodes and processes a batch. Returns the outputs, the dead letters, and whether
/// the batch was processed (false only when shutdown interrupted a retry).
async fn handle_batch<P: Processor>(
    health: &Health,
    processor: &mut P,
    service: &str,
    dead_letter_topic: &str,
    max_record_bytes: usize,
    batch: &[OwnedMessage],
    shutdown: &CancellationToken,
) -> (Vec<Outgoing>, Vec<Outgoing>, bool) {
    let mut dead = Vec::new();
    // Sized once: grown a record at a time, save-worker's batches of 40,000 were copied
    // into new pages at each doubling (a quarter of its page faults in the relay bench).
    let mut decoded_positions = Vec::with_capacity(batch.len());
    let mut inputs = Vec::with_capacity(batch.len());
    let meta_of = |m: &OwnedMessage| RecordMeta {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
    };
    for (i, m) in batch.iter().enumerate() {
        let meta = meta_of(m);
        let Some(payload) = m.payload() else {
            dead.push(dead_letter(
                service,
                dead_letter_topic,
                m,
                "record has no value",
            ));
            continue;
        };
        if payload.len() > max_record_bytes {
            let reason = format!(
                "record of {} bytes exceeds kafka.max_record_bytes ({max_record_bytes})",
                payload.len()
            );
            dead.push(dead_letter(service, dead_letter_topic, m, &reason));
            continue;
        }
        match processor.decode(&meta, payload) {
            Ok(input) => {
                decoded_positions.push(i);
                inputs.push(Decoded { meta, input });
            }
            Err(reason) => dead.push(dead_letter(service, dead_letter_topic, m, &reason)),
        }
    }
    if inputs.is_empty() {
        return (Vec::new(), dead, true);
    }

    let mut backoff = Backoff::new();
    let outcomes = loop {
        match processor.process(inputs).await {
            Ok(outcomes) => break outcomes,
            Err(e) => {
                health.set_not_ready(format!("processing a batch: {e}"));
                if !backoff.wait(shutdown, "processing batch", &e).await {
                    return (Vec::new(), dead, false);
                }
            }
        }
        // `process` consumed the batch: decode it again for the retry.
        inputs = decoded_positions
            .iter()
            .filter_map(|&i| {
                let meta = meta_of(&batch[i]);
                let input = processor.decode(&meta, batch[i].payload()?).ok()?;
                Some(Decoded { meta, input })
            })
            .collect();
    };

    assert_eq!(
        outcomes.len(),
        decoded_positions.len(),
        "{service}: Processor::process must return one outcome per input"
    );
    let mut outputs = Vec::new();
    for (outcome, &i) in outcomes.into_iter().zip(&decoded_positions) {
        match outcome {
            Outcome::Emit(o) => outputs.extend(o.into_iter().map(Outgoing::from)),
            Outcome::Reject(reason) => {
                dead.push(dead_letter(service, dead_letter_topic, &batch[i], &reason))
            }
        }
    }
    (outputs, dead, true)
}

/// A record ready for the producer: either a processor's output or a dead letter.
struct Outgoing {
    topic: String,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    partition: Option<i32>,
    headers: Option<OwnedHeaders>,
}

impl From<Output> for Outgoing {
    fn from(o: Output) -> Self {
        Outgoing {
            topic: o.topic,
            key: Some(o.key.into_bytes()),
            payload: o.payload,
            partition: o.partition,
            headers: None,
        }
    }
}

/// The dead-letter record of `m`: its key and value unchanged, what went wrong in headers.
fn dead_letter(service: &str, dead_letter_topic: &str, m: &OwnedMessage, reason: &str) -> Outgoing {
    tracing::warn!(
        topic = m.topic(),
        partition = m.partition(),
        offset = m.offset(),
        reason,
        "dead-lettering record"
    );
    let partition = m.partition().to_string();
    let offset = m.offset().to_string();
    let failed_at = now_ms().to_string();
    let headers = [
        (dlq_headers::REASON, reason),
        (dlq_headers::SERVICE, service),
        (dlq_headers::TOPIC, m.topic()),
        (dlq_headers::PARTITION, partition.as_str()),
        (dlq_headers::OFFSET, offset.as_str()),
        (dlq_headers::FAILED_AT, failed_at.as_str()),
    ]
    .into_iter()
    .fold(OwnedHeaders::new(), |h, (key, value)| {
        h.insert(Header {
            key,
            value: Some(value),
        })
    });
    Outgoing {
        topic: dead_letter_topic.to_string(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().unwrap_or_default().to_vec(),
        partition: None,
        headers: Some(headers),
    }
}

/// Longest a batch's first output waits for the rest of the batch's outputs before it is
/// sent (`linger.ms` of the framework's producer, unless `kafka.linger_ms` is longer).
/// [`deliver`] sends as soon as the batch's last output is queued, so this is only a
/// bound. Without it (`linger.ms` 0) the first outputs went out alone while the rest were
/// being queued: two or three requests per batch where one does, each stored by the
/// broker as one more batch per partition, which tansu's memory engine lists on every
/// fetch (freshness p99 at 2,135 events/s: 69-78 ms with `linger.ms` 0, 48-52 with 1).
const BATCH_HOLD: Duration = Duration::from_millis(5);

/// The producer of a batch's outputs: it holds them for at most [`BATCH_HOLD`].
fn batch_producer(settings: &KafkaSettings) -> Result<FutureProducer, KafkaError> {
    super::producer(&KafkaSettings {
        linger_ms: settings.linger_ms.max(BATCH_HOLD.as_millis() as u64),
        ..settings.clone()
    })
}

/// How long [`deliver`]'s send-now lasts: librdkafka lingers again once it returns, and a
/// new producer first fetches its id, so it waits for delivery, but for at most a second:
/// it runs on a blocking thread, which the runtime waits for on exit, and a broker that is
/// down must not hold a stopping service up for the whole delivery timeout.
fn send_wait(settings: &KafkaSettings) -> Duration {
    Duration::from_millis(settings.delivery_timeout_ms).min(Duration::from_secs(1))
}

/// Produces `records` and waits until the broker has acknowledged every one. They are
/// queued first and then sent together: one request per broker for the whole batch.
async fn deliver(
    producer: &FutureProducer,
    records: &[Outgoing],
    settings: &KafkaSettings,
) -> Result<u64, FrameworkError> {
    if records.is_empty() {
        return Ok(0);
    }
    let count = records.len() as u64;
    let mut pending: Vec<DeliveryFuture> = Vec::with_capacity(records.len());
    // When the last send-now started: a full queue starts one per send_wait at most, not
    // one per 5 ms retry (with the broker down, each would hold a blocking thread for
    // the whole wait).
    let mut sent_at: Option<std::time::Instant> = None;
    for r in records {
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&r.topic).payload(r.payload.as_slice());
        if let Some(k) = &r.key {
            record = record.key(k.as_slice());
        }
        if let Some(p) = r.partition {
            record = record.partition(p);
        }
        if let Some(h) = &r.headers {
            record = record.headers(h.clone());
        }
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The local queue is full: send what it holds rather than let it
                    // linger, let deliveries drain, then try again.
                    if sent_at.is_none_or(|t| t.elapsed() >= send_wait(settings)) {
                        super::send_now(producer, send_wait(settings));
                        sent_at = Some(std::time::Instant::now());
                    }
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    return Err(FrameworkError::Delivery {
                        failed: records.len(),
                        first: e.to_string(),
                    })
                }
            }
        }
    }
    // All queued: send them now rather than at the end of the hold.
    super::send_now(producer, send_wait(settings));
    let mut failed = 0;
    let mut first = String::new();
    for result in futures::future::join_all(pending).await {
        let error = match result {
            Ok(Ok(_)) => continue,
            Ok(Err((e, _))) => e.to_string(),
            Err(_) => "producer dropped the delivery".to_string(),
        };
        if failed == 0 {
            first = error;
        }
        failed += 1;
    }
    if failed > 0 {
        return Err(FrameworkError::Delivery { failed, first });
    }
    Ok(count)
}

/// `m` kept past the next read, without its headers: the pipeline's records carry none
/// that a processor reads, and librdkafka parses them for `detach` (with the copy, a
/// twentieth of update-embeddings' CPU in the relay benchmark).
fn owned(m: &rdkafka::message::BorrowedMessage<'_>) -> OwnedMessage {
    OwnedMessage::new(
        m.payload().map(<[u8]>::to_vec),
        m.key().map(<[u8]>::to_vec),
        m.topic().to_string(),
        m.timestamp(),
        m.partition(),
        m.offset(),
        None,
    )
}

/// A record's size as a batch counts it: its key and value.
fn record_bytes(m: &OwnedMessage) -> usize {
    m.payload().map_or(0, <[u8]>::len) + m.key().map_or(0, <[u8]>::len)
}

/// What has been processed and committed of each assigned partition, so commits can
/// stop before a held record and still move on once it is let go (even when the batch
/// that lets it go has no record of that partition).
#[derive(Debug, Default)]
struct Offsets {
    /// The offset after the last record processed.
    processed: BTreeMap<(String, i32), i64>,
    /// The offset last committed: at first, that of the first record read since the
    /// partition was assigned (the group's committed offset, where reading began).
    committed: BTreeMap<(String, i32), i64>,
}

impl Offsets {
    fn processed<'a>(&mut self, records: impl IntoIterator<Item = (&'a str, i32, i64)>) {
        // Per partition of the batch: its first record's offset and its highest. A batch
        // has thousands of records of a few partitions, which come in runs.
        let mut partitions: Vec<(&str, i32, i64, i64)> = Vec::new();
        let mut last = 0;
        for (topic, partition, offset) in records {
            let same = |p: &(&str, i32, i64, i64)| p.1 == partition && p.0 == topic;
            if !partitions.get(last).is_some_and(same) {
                match partitions.iter().position(same) {
                    Some(at) => last = at,
                    None => {
                        last = partitions.len();
                        partitions.push((topic, partition, offset, offset));
                    }
                }
            }
            let highest = &mut partitions[last].3;
            *highest = (*highest).max(offset);
        }
        for (topic, partition, first, highest) in partitions {
            let key = (topic.to_string(), partition);
            self.committed.entry(key.clone()).or_insert(first);
            let next = self.processed.entry(key).or_insert(0);
            *next = (*next).max(highest + 1);
        }
    }

    /// The commits to make: each partition as far as it is processed, but not past its
    /// held record, and only where that is further than the last commit (a record held
    /// since before the partition was assigned cannot move the group's offset back).
    fn due(&self, held: &[HeldOffset]) -> Vec<((String, i32), i64)> {
        self.processed
            .iter()
            .filter_map(|(key, &next)| {
                let hold = held
                    .iter()
                    .filter(|h| h.topic == key.0 && h.partition == key.1)
                    .map(|h| h.offset)
                    .min();
                let target = hold.map_or(next, |h| h.min(next));
                (target > self.committed.get(key).copied().unwrap_or(i64::MIN))
                    .then(|| (key.clone(), target))
            })
            .collect()
    }

    fn committed(&mut self, commits: Vec<((String, i32), i64)>) {
        self.committed.extend(commits);
    }

    /// After a rebalance: another consumer may have moved a partition that was taken
    /// away and given back.
    fn keep_only(&mut self, assigned: &[(String, i32)]) {
        self.processed.retain(|key, _| assigned.contains(key));
        self.committed.retain(|key, _| assigned.contains(key));
    }
}

/// Commits these offsets; true if the broker took them (or there were none).
fn commit<C: Consumer<RebalanceContext>>(consumer: &C, due: &[((String, i32), i64)]) -> bool {
    if due.is_empty() {
        return true;
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in due {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            tracing::warn!(error = %e, topic, partition, "bad offset for commit");
        }
    }
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => true,
        Err(e) => {
            // Typically a rebalance took the partitions: the next owner replays from the
            // last commit, which processors make harmless.
            tracing::warn!(error = %e, "offset commit failed; records will be replayed");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_idle_work_is_tried_again_ever_later_and_at_every_tick_once_it_succeeds() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let mut retry = IdleRetry::default();
        assert!(retry.due(start));
        // Failing at each try: 100 ms, then 200, 400, ... up to 5 s.
        let mut now = start;
        let mut delays = Vec::new();
        for _ in 0..8 {
            assert!(retry.due(now));
            let delay = retry.failed(now);
            assert!(!retry.due(now + delay - ms(1)), "not before {delay:?}");
            delays.push(delay.as_millis());
            now += delay;
        }
        assert_eq!(delays, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert!(retry.succeeded(), "it had been failing");
        assert!(!retry.succeeded(), "and is no longer");
        assert!(retry.due(now), "at every tick again");
        assert_eq!(
            retry.failed(now),
            ms(100),
            "a new failure starts the backoff anew"
        );
    }

    fn held(topic: &str, partition: i32, offset: i64) -> HeldOffset {
        HeldOffset {
            topic: topic.into(),
            partition,
            offset,
        }
    }

    fn key(topic: &str, partition: i32) -> (String, i32) {
        (topic.into(), partition)
    }

    #[test]
    fn commits_stop_before_a_held_record_and_move_on_once_it_is_let_go() {
        let mut offsets = Offsets::default();
        offsets.processed([("events", 0, 10), ("events", 0, 11), ("events", 1, 5)]);
        assert_eq!(
            offsets.due(&[]),
            vec![(key("events", 0), 12), (key("events", 1), 6)]
        );

        // Offset 11 of partition 0 is held; a later batch reads on.
        let mut offsets = Offsets::default();
        offsets.processed([("events", 0, 10), ("events", 0, 11), ("events", 1, 5)]);
        let due = offsets.due(&[held("events", 0, 11), held("events", 0, 12)]);
        assert_eq!(due, vec![(key("events", 0), 11), (key("events", 1), 6)]);
        offsets.committed(due);
        offsets.processed([("events", 0, 12), ("lists", 0, 3)]);
        assert_eq!(
            offsets.due(&[held("events", 0, 11)]),
            vec![(key("lists", 0), 4)],
            "nothing of partition 0 while 11 is held; partition 1 is committed already"
        );

        // Let go by a batch with no record of that partition.
        offsets.processed([("lists", 0, 4)]);
        assert_eq!(
            offsets.due(&[]),
            vec![(key("events", 0), 13), (key("lists", 0), 5)]
        );
    }

    #[test]
    fn a_batch_of_interleaved_partitions_counts_each_partitions_first_and_highest_offset() {
        let mut offsets = Offsets::default();
        offsets.processed([
            ("events", 0, 10),
            ("events", 1, 5),
            ("lists", 0, 7),
            ("events", 0, 11),
            ("events", 1, 4),
            ("events", 0, 9),
        ]);
        assert_eq!(
            offsets.due(&[]),
            vec![
                (key("events", 0), 12),
                (key("events", 1), 6),
                (key("lists", 0), 8)
            ]
        );
        // The first record read of a partition is where its commits start: held there,
        // nothing of it is due.
        assert_eq!(
            offsets.due(&[held("events", 0, 10), held("events", 1, 5)]),
            vec![(key("lists", 0), 8)]
        );
    }

    #[test]
    fn a_record_held_from_before_an_assignment_does_not_move_the_commit_back() {
        let mut offsets = Offsets::default();
        offsets.processed([("events", 0, 3)]);
        offsets.committed(offsets.due(&[]));
        // Taken away and given back: another consumer committed up to 40 meanwhile.
        offsets.keep_only(&[]);
        offsets.processed([("events", 0, 40), ("events", 0, 41)]);
        assert_eq!(offsets.due(&[held("events", 0, 3)]), vec![]);
        assert_eq!(
            offsets.due(&[held("events", 0, 41)]),
            vec![(key("events", 0), 41)]
        );
        assert_eq!(offsets.due(&[]), vec![(key("events", 0), 42)]);
    }
}
