//! update-embeddings: consumes `events`, moves each user's vector toward the products
//! they touch, and emits the new state to `user-vectors`.
//!
//! State is kept per user in memory and made durable by the output itself: every state
//! is produced to `user-vectors` on the *same partition* as its event before the event's
//! offset is committed, so `user-vectors` is this service's changelog. When a partition
//! is assigned (start-up, restart, rebalance) its states are restored from the changelog,
//! and an event at or below a user's recorded source offset is a replay and is skipped:
//! each event moves the vector exactly once, even across crashes.
//!
//! Only the most recently active users stay in memory (`state.hot_users`); the others
//! are spilled to a local file that is itself a cache of the changelog
//! ([`recpipe_shared::model::UserStates`]).
//!
//! Vectors live in the embedding space of the primary model of the served assignment
//! (the `models` topic); when it changes, a user's vector is rebuilt from their recent
//! history on their next event.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};
use recpipe_shared::events::{
    now_ms, Event, EventType, LastEvent, SourcePosition, UserVectorRecord,
};
use recpipe_shared::kafka::framework::{
    Decoded, Outcome, Output, Processor, RecordMeta, RetryableError, RunStats,
};
use recpipe_shared::kafka::{client_config, consumer_config, EndOfPartitionIsNoError};
use recpipe_shared::model::{
    same_id, IndexKind, ModelRegistry, Restorer, Serving, StateError, UserModel, UserStates,
};
use recpipe_shared::settings::{EventRules, KafkaSettings, ModelSettings, Settings};
use recpipe_shared::state_record::{self, StateEncoding};
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "update-embeddings";

/// Longest a partition's state restore may take before it is retried.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(120);

/// Most events folded into one state. A user with more events in one batch gets a state
/// every this many, so a state stays far below `kafka.max_record_bytes` (64 KiB) whatever
/// `kafka.batch_max` is: at ids of 128 bytes a folded event is about 330 bytes of JSON.
/// Without the bound, a batch of 2,000 gave a hot user states of 70 KB, which every
/// consumer dead-lettered.
pub const MAX_FOLDED_EVENTS: usize = 64;

pub struct UpdateEmbeddings {
    models: Arc<ModelRegistry>,
    /// The assignment `model` was built for.
    serving: Arc<Serving>,
    model_settings: ModelSettings,
    model: UserModel,
    rules: EventRules,
    users: UserStates,
    kafka: KafkaSettings,
    /// How the states produced are written (`state.encoding`).
    encoding: StateEncoding,
    /// `recpipe_events_applied_total` of each event type, in [`EventType::ALL`]'s order.
    /// Made once: the macro's registry lookup for every event was 2.4 % of the service's
    /// CPU in a relay run.
    applied_total: [metrics::Counter; EventType::ALL.len()],
}

impl UpdateEmbeddings {
    /// Opens a new state file (`state.dir`); fails when it cannot be written.
    pub fn new(models: Arc<ModelRegistry>, settings: &Settings) -> Result<Self, StateError> {
        let serving = models.current();
        Ok(UpdateEmbeddings {
            models,
            model_settings: settings.model.clone(),
            model: user_model(&serving, &settings.model),
            serving,
            rules: settings.events,
            users: UserStates::open(&settings.state)?,
            kafka: settings.kafka.clone(),
            encoding: settings.state.encoding,
            applied_total: {
                recpipe_shared::admin::metrics(); // the recorder must exist before the handles
                EventType::ALL.map(
                    |t| metrics::counter!("recpipe_events_applied_total", "type" => t.as_str()),
                )
            },
        })
    }

    /// The state of `user_id`, if known (from memory or the state file).
    pub fn user(&mut self, user_id: &str) -> Result<Option<UserVectorRecord>, StateError> {
        self.users.load([user_id])?;
        self.users.get(user_id)
    }

    /// Moves `state` on by `event`, in place. Ok(None) when the event is skipped (a replay
    /// or a producer's retry of one already applied), else the state's previous last
    /// event. On an error `state` is unchanged.
    fn apply(
        &self,
        state: &mut UserVectorRecord,
        meta: &RecordMeta,
        event: &Event,
    ) -> Result<Option<LastEvent>, String> {
        // Every log line of this record names its event and user. A debug span: the lines
        // inside are debug ones, and an info span per event (its fields formatted for the
        // log) cost about 6% of the service's CPU.
        let _span =
            tracing::debug_span!("event", event_id = %event.event_id, user_id = %event.user_id)
                .entered();
        if state.source.partition == meta.partition && meta.offset <= state.source.offset {
            tracing::debug!(user = %event.user_id, offset = meta.offset, "replayed event skipped");
            return Ok(None);
        }
        // A producer's retry of an event already applied (same id, new offset): the ids
        // of the user's recent events are kept for exactly this.
        if state
            .recent_event_ids
            .iter()
            .any(|id| same_id(id, &event.event_id))
        {
            metrics::counter!("recpipe_duplicate_events_total").increment(1);
            tracing::debug!(user = %event.user_id, event = %event.event_id, "duplicate event skipped");
            return Ok(None);
        }
        let source = SourcePosition {
            partition: meta.partition,
            offset: meta.offset,
        };
        let previous = self
            .model
            .update(state, event, source, now_ms())
            .map_err(|e| e.to_string())?;
        if let Some(at) = EventType::ALL.iter().position(|t| *t == event.event_type) {
            self.applied_total[at].increment(1);
        }
        Ok(Some(previous))
    }

    /// Applies a batch: one outcome per event, and one state per user and partition,
    /// produced at the user's last applied event of the batch with the earlier ones
    /// listed as folded. The framework commits the batch's offsets only once all of its
    /// outputs are acknowledged, so a folded event is never committed without the state
    /// that holds it. A state holds at most [`MAX_FOLDED_EVENTS`]; the user's next event
    /// starts another.
    ///
    /// Users are taken one at a time, all of their events in order: each user's states are
    /// encoded and kept as soon as the user is done, so a batch of thousands of users holds
    /// one decoded state at a time rather than one per user (about 9 KB each at a full
    /// history).
    fn apply_batch(&mut self, batch: &[Decoded<Event>]) -> Vec<Outcome> {
        // Each user's batch positions, users in order of first appearance.
        let mut positions: Vec<Vec<usize>> = Vec::new();
        let mut of_user: HashMap<&str, usize> = HashMap::new();
        for (i, d) in batch.iter().enumerate() {
            let group = *of_user.entry(d.input.user_id.as_str()).or_insert_with(|| {
                positions.push(Vec::new());
                positions.len() - 1
            });
            positions[group].push(i);
        }
        let topic = &self.kafka.topics.user_vectors;
        let mut outcomes: Vec<Outcome> = (0..batch.len())
            .map(|_| Outcome::Emit(Vec::new()))
            .collect();
        // By the user's event (its place in their positions): their states still to be
        // emitted. One user's at a time: a slot per batch position had a batch of 40,000
        // events write 12 MB of fresh memory.
        let mut newest: Vec<Option<UserVectorRecord>> = Vec::new();
        for user_positions in &positions {
            newest.clear();
            newest.resize(user_positions.len(), None);
            // Which of the user's events has their newest state so far.
            let mut at: Option<usize> = None;
            for (k, &i) in user_positions.iter().enumerate() {
                let d = &batch[i];
                // The state to move on: the user's newest of this batch, taken over when it
                // is the same partition's changelog and has room, and copied (it keeps its
                // own output) when it has not; else the stored state, or a new one.
                let folds = at.is_some_and(|j| {
                    batch[user_positions[j]].meta.partition == d.meta.partition
                        && newest[j]
                            .as_ref()
                            .is_some_and(|s| s.folded_events.len() < MAX_FOLDED_EVENTS)
                });
                let mut state = match at {
                    Some(j) if folds => newest[j].take().expect("the user's newest state"),
                    Some(j) => {
                        let mut copy = newest[j].clone().expect("the user's newest state");
                        copy.folded_events.clear();
                        copy
                    }
                    None => match self.users.get(&d.input.user_id) {
                        Ok(stored) => stored.unwrap_or_else(|| self.model.new_state(&d.input)),
                        Err(e) => {
                            outcomes[i] = Outcome::Reject(e.to_string());
                            continue;
                        }
                    },
                };
                match self.apply(&mut state, &d.meta, &d.input) {
                    Ok(Some(previous)) => {
                        if folds {
                            state.folded_events.push(previous);
                        }
                        newest[k] = Some(state);
                        at = Some(k);
                        continue;
                    }
                    Ok(None) => {}
                    Err(reason) => outcomes[i] = Outcome::Reject(reason),
                }
                // Not applied: the state taken over stays where it was.
                if let (Some(j), true) = (at, folds) {
                    newest[j] = Some(state);
                }
            }
            // The user is done: their states go out in order, the last one kept.
            for (k, &i) in user_positions.iter().enumerate() {
                let Some(mut state) = newest[k].take() else {
                    continue;
                };
                let payload = match self.encoding {
                    // The record starts with the form the state is kept in: encoded once.
                    StateEncoding::Binary => {
                        let (payload, end) = state_record::encode_binary(&state);
                        state.folded_events.clear();
                        self.users.insert_encoded(
                            &state,
                            &payload[state_record::BINARY_MAGIC.len()..end],
                        );
                        payload
                    }
                    StateEncoding::Json => {
                        let payload = state_record::encode(&state, StateEncoding::Json);
                        state.folded_events.clear();
                        self.users.insert(&state);
                        payload
                    }
                };
                outcomes[i] = Outcome::Emit(vec![Output {
                    topic: topic.clone(),
                    key: state.user_id,
                    payload,
                    partition: Some(batch[i].meta.partition),
                }]);
            }
        }
        outcomes
    }
}

/// Vectors in the primary model's space; products of the other served models accepted.
fn user_model(serving: &Serving, settings: &ModelSettings) -> UserModel {
    let primary = serving.primary();
    let others = serving
        .models
        .iter()
        .filter(|m| !Arc::ptr_eq(m.catalog(), primary.catalog()))
        .map(|m| m.catalog().clone())
        .collect();
    UserModel::new(primary.catalog().clone(), settings.clone()).with_others(others)
}

#[async_trait]
impl Processor for UpdateEmbeddings {
    type Input = Event;

    fn name(&self) -> &str {
        SERVICE
    }

    fn topics(&self) -> Vec<String> {
        vec![self.kafka.topics.events.clone()]
    }

    fn decode(&self, _meta: &RecordMeta, payload: &[u8]) -> Result<Event, String> {
        let event = Event::from_json(payload).map_err(|e| format!("invalid event: {e}"))?;
        self.rules
            .check_time(event.ts, now_ms())
            .map_err(|e| format!("invalid event: {e}"))?;
        Ok(event)
    }

    /// A batch's users are all in memory while it is applied: at most `state.hot_users`
    /// of them, so that memory never holds more states than that (room is made for them).
    fn batch_max_keys(&self) -> Option<usize> {
        Some(self.users.hot_users())
    }

    async fn process(
        &mut self,
        batch: Vec<Decoded<Event>>,
    ) -> Result<Vec<Outcome>, RetryableError> {
        let serving = self.models.current();
        if !Arc::ptr_eq(&serving, &self.serving) {
            self.model = user_model(&serving, &self.model_settings);
            tracing::info!(
                embeddings = self.model.catalog().embeddings_id(),
                "user vectors follow the new model assignment"
            );
            self.serving = serving;
        }
        // The one step that can fail comes before any state changes, so a retry of the
        // batch finds it as it was.
        self.users
            .load(batch.iter().map(|d| d.input.user_id.as_str()))
            .map_err(|e| RetryableError(e.to_string()))?;
        let outcomes = self.apply_batch(&batch);
        // A failed spill keeps the states in memory; the next batch tries again.
        if let Err(e) = self.users.spill() {
            metrics::counter!("recpipe_user_state_spill_errors_total").increment(1);
            tracing::error!(error = %e, "user states could not be spilled to the state file; kept in memory");
        }
        metrics::gauge!("recpipe_user_states_in_memory").set(self.users.hot_len() as f64);
        Ok(outcomes)
    }

    async fn prepare_partitions(
        &mut self,
        partitions: &[(String, i32)],
    ) -> Result<(), RetryableError> {
        let kafka = self.kafka.clone();
        let numbers: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
        let started = std::time::Instant::now();
        let err = |e: StateError| RetryableError(format!("restoring partitions {numbers:?}: {e}"));
        // A restore retried after a failure starts again from nothing.
        self.users.forget_partitions(&numbers).map_err(err)?;
        let restorer = self.users.restorer().map_err(err)?;
        let restored = {
            let numbers = numbers.clone();
            tokio::task::spawn_blocking(move || restore_partitions(&kafka, &numbers, restorer))
                .await
                .map_err(|e| RetryableError(e.to_string()))??
        };
        tracing::info!(
            partitions = ?numbers,
            states = restored,
            ms = started.elapsed().as_millis() as u64,
            "user states restored from the changelog into the state file"
        );
        Ok(())
    }
}

/// Reads the given partitions of `user-vectors` from the start to their end into the
/// state file: the latest state of every user whose events live on them. Returns the
/// records read.
///
/// The end is found by librdkafka's partition-EOF signal rather than by the high
/// watermark, which tansu 0.6 under-reports after a multi-record batch.
fn restore_partitions(
    kafka: &KafkaSettings,
    partitions: &[i32],
    mut restorer: Restorer,
) -> Result<usize, RetryableError> {
    let err = |e: &dyn std::fmt::Display| {
        RetryableError(format!("restoring partitions {partitions:?}: {e}"))
    };
    let topic = &kafka.topics.user_vectors;
    let consumer: BaseConsumer<EndOfPartitionIsNoError> = consumer_config(kafka)
        .set(
            "group.id",
            format!("{}-{SERVICE}-restore", kafka.group_prefix),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "10")
        .create_with_context(EndOfPartitionIsNoError {
            reader: "state restore",
        })
        .map_err(|e| err(&e))?;
    // Assigned before its leader is known, a partition waits out librdkafka's offset
    // query timer (half a second, for an empty changelog too); known first, it does not
    // (an empty partition restored in about 70 ms rather than 520).
    consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| err(&e))?;
    let mut tpl = TopicPartitionList::new();
    for &p in partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .map_err(|e| err(&e))?;
    }
    consumer.assign(&tpl).map_err(|e| err(&e))?;
    let deadline = std::time::Instant::now() + RESTORE_TIMEOUT;
    let mut open: std::collections::HashSet<i32> = partitions.iter().copied().collect();
    while !open.is_empty() {
        if std::time::Instant::now() > deadline {
            return Err(err(&format!(
                "partitions {open:?} not read to the end in {RESTORE_TIMEOUT:?}"
            )));
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let Some(payload) = m.payload() else { continue };
                match restorer.put(payload) {
                    Ok(()) => {}
                    Err(StateError::Unreadable(e)) => {
                        tracing::warn!(offset = m.offset(), error = %e, "unreadable changelog record skipped")
                    }
                    Err(e) => return Err(err(&e)),
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => return Err(err(&e)),
            None => {}
        }
    }
    // Closing a consumer waits on its broker threads (about 100 ms here): the restore is
    // done, so that is left to a thread of its own rather than holding up the batch.
    let closing = std::thread::Builder::new().name("restore-close".into());
    if let Err(e) = closing.spawn(move || drop(consumer)) {
        tracing::debug!(error = %e, "no thread to close the restore consumer in; closing it here");
    }
    restorer.finish().map_err(|e| err(&e))
}

/// Checks that `user-vectors` can hold every `events` partition (states go to the same
/// partition number as their events).
pub async fn check_topics(kafka: &KafkaSettings) -> anyhow::Result<()> {
    let kafka = kafka.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client_config(&kafka).create()?;
        let count = |topic: &str| -> anyhow::Result<usize> {
            let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
            let n = md.topics().first().map(|t| t.partitions().len()).unwrap_or(0);
            anyhow::ensure!(n > 0, "topic {topic:?} does not exist on {}: create it with `recpipe-admin topics create`", kafka.brokers);
            Ok(n)
        };
        let (events, states) = (count(&kafka.topics.events)?, count(&kafka.topics.user_vectors)?);
        anyhow::ensure!(
            states >= events,
            "topic {:?} has {states} partitions but {:?} has {events}: it needs at least as many, since each user's state goes to the partition of their events",
            kafka.topics.user_vectors,
            kafka.topics.events
        );
        Ok(())
    })
    .await?
}

/// Runs the service until `shutdown` is cancelled.
pub async fn run(mut settings: Settings, shutdown: CancellationToken) -> anyhow::Result<RunStats> {
    // Under a backlog, bigger batches fold more of a user's events into one state (see
    // `state.events_batch_max`).
    settings.kafka.batch_max = settings.state.events_batch_max;
    // Each waits on the broker: side by side, the start is the longer of the two.
    let (_, models) = tokio::try_join!(
        check_topics(&settings.kafka),
        recpipe_shared::kafka::models::start_registry(&settings, IndexKind::None, shutdown.clone()),
    )?;
    let processor = UpdateEmbeddings::new(models, &settings)?;
    recpipe_shared::admin::run_service(&settings, processor, shutdown).await
}
