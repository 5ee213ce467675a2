//! save-worker: persists events, user states and recommendation lists to the store.
//! A batch is written in one go before its offsets are committed; every write is
//! idempotent, so a replay after a crash leaves the same rows. When the store fails,
//! the batch is retried with backoff and nothing is committed meanwhile.
//!
//! It also keeps the online experiment counts: every impression (a list the API served)
//! and every click, cart or purchase that names a served list and one of its products,
//! under the arm (model version) that made the list. Actions are rows keyed by event id;
//! impressions, a GET's worth each, are tallied per arm, day and partition with the last
//! offset counted ([`ImpressionTally`]). Either way a replay counts once. An action whose
//! list is not stored yet waits for it (see [`AwaitingList`]), and its offset is not
//! committed meanwhile.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use recpipe_shared::events::{
    arm, now_ms, Event, EventType, Fallback, RecommendationRecord, SourcePosition, POPULAR_USER_ID,
};
use recpipe_shared::json::{self, AnyNumber};
use recpipe_shared::kafka::framework::{
    Decoded, HeldOffset, Outcome, Processor, RecordMeta, RetryableError, RunStats,
};
use recpipe_shared::list_record;
use recpipe_shared::settings::{Settings, Topics};
use recpipe_shared::state_record;
use recpipe_shared::store::{
    self, day_of, ExperimentEvent, ExperimentKind, ImpressionTally, RecordBody, Store, StoreError,
    StoredEvent, StoredList, StoredUserState, WriteBatch,
};
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "save-worker";

pub enum Record {
    Event(StoredEvent),
    UserState(StoredUserState),
    Recommendation(ConsumedList),
    /// The impressions of one record: one (schemas/impression.v1), or the API's batch of
    /// a partition's users (schemas/impression-batch.v1).
    Impressions(Vec<ImpressionCount>),
}

/// What the experiment counts need of an [`Impression`](recpipe_shared::events::Impression): the shown items and the ids of
/// list and user are not decoded (a GET's impression is the most frequent record here).
#[derive(Debug, serde::Deserialize)]
pub struct ImpressionCount {
    pub impression_id: String,
    pub model_version: String,
    #[serde(default)]
    pub fallback: Option<recpipe_shared::events::Fallback>,
    pub ts: i64,
}

/// The impressions of an `impressions` record: an array (the API's batch of one
/// partition's users, schemas/impression-batch.v1) or a single impression
/// (schemas/impression.v1, as the API produced them before batches).
pub fn decode_impressions(payload: &[u8]) -> Result<Vec<ImpressionCount>, serde_json::Error> {
    match payload.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => serde_json::from_slice(payload),
        _ => serde_json::from_slice(payload).map(|i| vec![i]),
    }
}

/// A string whose value is not needed: checked to be one, never copied.
struct AnyString;

impl<'de> serde::Deserialize<'de> for AnyString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = AnyString;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<AnyString, E> {
                Ok(AnyString)
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// The shape of a [`UserVectorRecord`](recpipe_shared::events::UserVectorRecord) (the
/// same fields, required and optional alike, the same types, no others), read for its
/// key and version only: the strings of its history are checked, not copied, and the
/// record's JSON is stored as it came. A test keeps the two in step.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // fields read only to check them
struct UserStateShape {
    user_id: String,
    vector: Vec<AnyNumber>,
    anchor_ts: i64,
    version: u64,
    recent_products: Vec<AnyString>,
    purchased: Vec<AnyString>,
    last_event: LastEventShape,
    source: SourcePosition,
    updated_at: i64,
    #[serde(default)]
    embeddings: Option<AnyString>,
    #[serde(default)]
    recent_event_ids: Vec<AnyString>,
    #[serde(default)]
    folded_events: Vec<LastEventShape>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct LastEventShape {
    event_id: AnyString,
    #[serde(rename = "type")]
    event_type: EventType,
    #[serde(default)]
    product_id: Option<AnyString>,
    ts: i64,
}

/// A `user-vectors` record as the store keeps it, checked: JSON for its shape, the
/// binary form by [`state_record::check`].
pub fn stored_user_state(payload: &[u8]) -> Result<StoredUserState, String> {
    if state_record::is_binary(payload) {
        let (user_id, version) = state_record::check(payload).map_err(|e| e.to_string())?;
        return Ok(StoredUserState {
            user_id,
            version,
            body: RecordBody::Binary(payload.to_vec()),
        });
    }
    let (shape, text): (UserStateShape, &str) = json::decode(payload).map_err(|e| e.to_string())?;
    Ok(StoredUserState {
        user_id: shape.user_id,
        version: shape.version,
        body: RecordBody::Json(text.to_owned()),
    })
}

/// The shape of a [`RecommendationRecord`] (the same fields, required and optional
/// alike, the same types, no others), read for what the store and the freshness metric
/// need: the items and event ids are checked, not copied, and the record's JSON is stored
/// as it came. Attribution, which needs the items, decodes the few lists actions name. A
/// test keeps the two in step.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // fields read only to check them
struct ListShape {
    recommendation_id: String,
    user_id: String,
    model_version: AnyString,
    #[serde(default)]
    fallback: Option<Fallback>,
    items: Vec<ItemShape>,
    user_version: u64,
    #[serde(default)]
    source_event_id: Option<AnyString>,
    #[serde(default)]
    source_event_ts: Option<i64>,
    generated_at: i64,
    #[serde(default)]
    source: Option<SourcePosition>,
    #[serde(default)]
    input_event_ids: Vec<AnyString>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct ItemShape {
    product_id: AnyString,
    score: AnyNumber,
    #[serde(default)]
    because: Option<AnyString>,
}

/// A `recommendations` record as consumed: what the store keeps, and when its event
/// happened.
pub struct ConsumedList {
    pub stored: StoredList,
    pub source_event_ts: Option<i64>,
}

/// A `recommendations` record, checked: JSON for its shape, the binary form by
/// [`list_record::check_binary`].
pub fn consumed_list(payload: &[u8]) -> Result<ConsumedList, String> {
    if list_record::is_binary(payload) {
        let list = list_record::check_binary(payload).map_err(|e| e.to_string())?;
        return Ok(ConsumedList {
            stored: StoredList {
                user_id: list.user_id,
                recommendation_id: list.recommendation_id,
                user_version: list.user_version,
                generated_at: list.generated_at,
                body: RecordBody::Binary(payload.to_vec()),
            },
            source_event_ts: list.source_event_ts,
        });
    }
    let (shape, text): (ListShape, &str) = json::decode(payload).map_err(|e| e.to_string())?;
    Ok(ConsumedList {
        stored: StoredList {
            user_id: shape.user_id,
            recommendation_id: shape.recommendation_id,
            user_version: shape.user_version,
            generated_at: shape.generated_at,
            body: RecordBody::Json(text.to_owned()),
        },
        source_event_ts: shape.source_event_ts,
    })
}

pub struct SaveWorker {
    store: Arc<dyn Store>,
    topics: Topics,
    /// The stored impression tallies this worker has read or written, by arm, day and
    /// partition: each is read from the store once, then kept up to date here.
    tallies: HashMap<TallyKey, ImpressionTally>,
    /// Actions whose list was found neither in their batch nor in the store, oldest
    /// first.
    awaiting: VecDeque<AwaitingList>,
    /// How long an action waits for its list before it counts as `unknown_list`.
    attribution_wait: Duration,
    /// The last batch's write, still running or failed: see [`WriteInFlight`].
    in_flight: Option<WriteInFlight>,
    /// The framework's word on the batch to come: records were waiting behind it.
    records_waiting: bool,
}

/// A batch's store write, left running when `process` returns so that the framework
/// reads and decodes the next batch meanwhile (on two cores the store's transaction and
/// the reading had taken turns). Its records' offsets stay held until it has succeeded;
/// the next batch, `idle` and a new assignment each wait for it first, so they read the
/// store with it written, and a failed write is written again, the same batch, before
/// anything else is done (every write is idempotent).
struct WriteInFlight {
    batch: Arc<WriteBatch>,
    /// None once it has failed: the next [`SaveWorker::settle`] writes it again.
    task: Option<tokio::task::JoinHandle<Result<(), StoreError>>>,
    /// The first offset of each partition the batch read.
    held: Vec<HeldOffset>,
    /// Recorded once it is stored: each list's event-time age, and the experiment
    /// counts it adds (per arm and kind).
    list_event_ts: Vec<i64>,
    counted: Vec<(String, &'static str, u64)>,
}

/// A click, cart or purchase naming a list this worker has not stored yet. The list
/// may still be on its way: `recommendations` is read beside `events`, and one fetch can
/// bring a click made soon after its list was served without the list (the broker reads
/// each partition at its own moment). It waits for the lists of later batches for at
/// most the worker's `attribution_wait`, and then the store is asked once more (another
/// worker may have stored the list). Held in memory, with its offset not committed
/// meanwhile (see [`Processor::held_offsets`]): after a crash the action is read again.
#[derive(Clone)]
struct AwaitingList {
    event: Event,
    /// Where the event was read (of the events topic).
    partition: i32,
    offset: i64,
    since: Instant,
}

/// How long an action waits for its list by default.
const ATTRIBUTION_WAIT: Duration = Duration::from_secs(30);

/// Actions awaiting their list beyond this many count as `unknown_list` at once.
const MAX_AWAITING: usize = 10_000;

/// What became of an action's attribution.
enum Attribution {
    /// Not an action naming a list and a product.
    NotAnAction,
    /// Its list is not known (yet).
    UnknownList,
    /// Its list did not show the product.
    NotInList,
    Attributed(ExperimentEvent),
}

type TallyKey = (String, i64, i32);

/// Tallies kept in memory beyond this are dropped (and read again when needed): one per
/// arm, day and partition, so only a long run with many arms gets there.
const MAX_TALLIES: usize = 10_000;

/// Each user's newest state of a batch: the store keeps only the newest anyway (an older
/// version never overwrites a newer one), so the older ones need not be encoded and
/// written. Order of first appearance is kept.
fn newest_states(states: Vec<StoredUserState>) -> Vec<StoredUserState> {
    let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut newest: Vec<StoredUserState> = Vec::with_capacity(states.len());
    for state in states {
        match at.get(&state.user_id) {
            Some(&i) if newest[i].version >= state.version => {}
            Some(&i) => newest[i] = state,
            None => {
                at.insert(state.user_id.clone(), newest.len());
                newest.push(state);
            }
        }
    }
    newest
}

impl SaveWorker {
    pub fn new(store: Arc<dyn Store>, topics: Topics) -> Self {
        SaveWorker {
            store,
            topics,
            tallies: HashMap::new(),
            awaiting: VecDeque::new(),
            attribution_wait: ATTRIBUTION_WAIT,
            in_flight: None,
            records_waiting: false,
        }
    }

    /// Waits for the last batch's write; writes it again if it failed. Ok once it is
    /// stored (or when there is none). On an error it stays, to be written again by the
    /// next call, and nothing has changed.
    pub async fn settle(&mut self) -> Result<(), RetryableError> {
        let Some(write) = self.in_flight.as_mut() else {
            return Ok(());
        };
        let result = match write.task.as_mut() {
            // Awaited in place, so that a caller dropping this (the framework's
            // `in_flight_done`) leaves the task to be awaited again, not lost.
            Some(task) => {
                let joined = task.await;
                write.task = None;
                joined.unwrap_or_else(|e| Err(StoreError::Query(format!("store write task: {e}"))))
            }
            None => timed_write(self.store.as_ref(), write.batch.clone()).await,
        };
        if let Err(e) = result {
            metrics::counter!("recpipe_store_errors_total").increment(1);
            return Err(RetryableError(e.to_string()));
        }
        let write = self.in_flight.take().expect("the write just settled");
        // Event time → list persisted (client clocks permitting).
        let now = now_ms();
        for ts in write.list_event_ts {
            metrics::histogram!("recpipe_freshness_seconds", "stage" => "list_persisted")
                .record((now - ts).max(0) as f64 / 1000.0);
        }
        // Approximate (a replay counts again); the store's counts are exact.
        for (arm, kind, n) in write.counted {
            metrics::counter!("recpipe_experiment_events_total", "arm" => arm, "kind" => kind)
                .increment(n);
        }
        Ok(())
    }
}

async fn timed_write(store: &dyn Store, batch: Arc<WriteBatch>) -> Result<(), StoreError> {
    let started = Instant::now();
    let (events, states, lists, backlog) = (
        batch.events.len(),
        batch.user_states.len(),
        batch.recommendations.len(),
        batch.backlog,
    );
    store.write_shared(batch).await?;
    let took = started.elapsed();
    metrics::histogram!("recpipe_store_write_seconds").record(took.as_secs_f64());
    // A target of its own, so that the store's timeline can be logged without the
    // attribution's span per event: RUST_LOG=warn,save_worker::writes=debug.
    let ms = took.as_millis() as u64;
    tracing::debug!(target: "save_worker::writes", events, states, lists, backlog, ms, "batch stored");
    Ok(())
}

/// The first offset of each partition of `batch`.
fn first_offsets(batch: &[Decoded<Record>]) -> Vec<HeldOffset> {
    let mut first: HashMap<(&str, i32), i64> = HashMap::new();
    for d in batch {
        let offset = first
            .entry((d.meta.topic.as_str(), d.meta.partition))
            .or_insert(d.meta.offset);
        *offset = (*offset).min(d.meta.offset);
    }
    first
        .into_iter()
        .map(|((topic, partition), offset)| HeldOffset {
            topic: topic.to_string(),
            partition,
            offset,
        })
        .collect()
}

#[async_trait]
impl Processor for SaveWorker {
    type Input = Record;

    fn name(&self) -> &str {
        SERVICE
    }

    /// GET answers come from the API's view of `recommendations`, not from the store, so
    /// storing a few tens of ms later delays no answer.
    fn on_freshness_path(&self) -> bool {
        false
    }

    fn topics(&self) -> Vec<String> {
        vec![
            self.topics.events.clone(),
            self.topics.user_vectors.clone(),
            self.topics.recommendations.clone(),
            self.topics.impressions.clone(),
        ]
    }

    fn records_waiting(&mut self, waiting: bool) {
        self.records_waiting = waiting;
    }

    fn decode(&self, meta: &RecordMeta, payload: &[u8]) -> Result<Record, String> {
        let t = &meta.topic;
        if *t == self.topics.events {
            StoredEvent::from_json(payload)
                .map(Record::Event)
                .map_err(|e| format!("invalid event: {e}"))
        } else if *t == self.topics.user_vectors {
            stored_user_state(payload)
                .map(Record::UserState)
                .map_err(|e| format!("invalid user vector: {e}"))
        } else if *t == self.topics.recommendations {
            consumed_list(payload)
                .map(Record::Recommendation)
                .map_err(|e| format!("invalid recommendation: {e}"))
        } else if *t == self.topics.impressions {
            decode_impressions(payload)
                .map(Record::Impressions)
                .map_err(|e| format!("invalid impression: {e}"))
        } else {
            Err(format!("record from unexpected topic {t:?}"))
        }
    }

    async fn process(
        &mut self,
        batch: Vec<Decoded<Record>>,
    ) -> Result<Vec<Outcome>, RetryableError> {
        // A backlog: records were waiting behind this batch, or the last write was still
        // running when it came (the writer is what the records wait for).
        let backlog = self.records_waiting
            || self
                .in_flight
                .as_ref()
                .and_then(|w| w.task.as_ref())
                .is_some_and(|task| !task.is_finished());
        // The last batch's write first: this one's reads of the store (tallies, lists)
        // must see it, and if it failed, it is written again before anything changes.
        self.settle().await?;
        let n = batch.len();
        let held = first_offsets(&batch);
        let mut writes = WriteBatch {
            backlog,
            ..WriteBatch::default()
        };
        let mut impressions = Vec::new();
        let mut event_positions = Vec::new();
        let mut list_event_ts = Vec::new();
        // Sized before they are filled: a batch is up to 40,000 records, and vectors grown
        // a record at a time copied them into fresh pages at every doubling.
        let (mut events, mut states, mut lists) = (0, 0, 0);
        for d in &batch {
            match d.input {
                Record::Event(_) => events += 1,
                Record::UserState(_) => states += 1,
                Record::Recommendation(_) => lists += 1,
                Record::Impressions(_) => {}
            }
        }
        writes.events.reserve_exact(events);
        event_positions.reserve_exact(events);
        writes.user_states.reserve_exact(states);
        writes.recommendations.reserve_exact(lists);
        for d in batch {
            match d.input {
                Record::Event(e) => {
                    writes.events.push(e);
                    event_positions.push((d.meta.partition, d.meta.offset));
                }
                Record::UserState(s) => writes.user_states.push(s),
                Record::Recommendation(r) => {
                    list_event_ts.extend(r.source_event_ts);
                    writes.recommendations.push(r.stored);
                }
                Record::Impressions(i) => impressions.push((d.meta, i)),
            }
        }
        // Tallied on copies: the kept ones change only once the store has them, so a
        // batch retried after a failed write counts its impressions once.
        let (tallied, gained) = self
            .tally(&impressions)
            .await
            .map_err(|e| RetryableError(e.to_string()))?;
        writes.impression_tallies = tallied.values().cloned().collect();
        writes.user_states = newest_states(std::mem::take(&mut writes.user_states));
        // Worked out on a copy of the awaiting actions, kept once the batch is written.
        let (attributed, awaiting) = self
            .attribute(&writes.events, &event_positions, &writes.recommendations)
            .await
            .map_err(|e| RetryableError(e.to_string()))?;
        writes.experiment.extend(attributed);
        // Counted per arm and kind, so a metric is looked up once per pair, not per row.
        // (A batch names a few arms: a short list beats hashing every row's arm.)
        let mut counted: Vec<(String, &'static str, u64)> = Vec::new();
        let impression = ExperimentKind::Impression.as_str();
        counted.extend(gained.into_iter().map(|(arm, n)| (arm, impression, n)));
        for x in &writes.experiment {
            let kind = x.kind.as_str();
            match counted
                .iter_mut()
                .find(|(a, k, _)| *a == x.arm && *k == kind)
            {
                Some((_, _, n)) => *n += 1,
                None => counted.push((x.arm.clone(), kind, 1)),
            }
        }
        // The write is left running (see `WriteInFlight`). What this batch changes here
        // is kept now: the write that makes it true is written again until it succeeds,
        // and until then its offsets are held, so a crash reads the batch again.
        let batch = Arc::new(writes);
        let store = self.store.clone();
        let task = tokio::spawn({
            let batch = batch.clone();
            async move { timed_write(store.as_ref(), batch).await }
        });
        self.in_flight = Some(WriteInFlight {
            batch,
            task: Some(task),
            held,
            list_event_ts,
            counted,
        });
        if self.tallies.len() + tallied.len() > MAX_TALLIES {
            self.tallies.clear();
        }
        self.tallies.extend(tallied);
        self.awaiting = awaiting;
        Ok((0..n).map(|_| Outcome::Emit(Vec::new())).collect())
    }

    async fn prepare_partitions(
        &mut self,
        partitions: &[(String, i32)],
    ) -> Result<(), RetryableError> {
        // Another worker may have counted these partitions meanwhile: their tallies are
        // read from the store again, with this worker's own last write in it.
        self.settle().await?;
        let impressions = &self.topics.impressions;
        let assigned: Vec<i32> = partitions
            .iter()
            .filter(|(t, _)| t == impressions)
            .map(|(_, p)| *p)
            .collect();
        self.tallies.retain(|(_, _, p), _| !assigned.contains(p));
        Ok(())
    }

    /// Gives up on actions whose wait is over when no batch comes to do it, so that
    /// their offsets are let go of (and their counts made) in a quiet spell too; then
    /// does a step of the store's upkeep (moves a backlog's writes put off).
    async fn idle(&mut self) -> Result<(), RetryableError> {
        // The last batch's write: its offsets are let go of once it is stored.
        self.settle().await?;
        if self
            .awaiting
            .iter()
            .any(|w| w.since.elapsed() >= self.attribution_wait)
        {
            let (attributed, awaiting) = self
                .attribute(&[], &[], &[])
                .await
                .map_err(|e| RetryableError(e.to_string()))?;
            if !attributed.is_empty() {
                let writes = WriteBatch {
                    experiment: attributed,
                    ..WriteBatch::default()
                };
                self.store.write(writes).await.map_err(|e| {
                    metrics::counter!("recpipe_store_errors_total").increment(1);
                    RetryableError(e.to_string())
                })?;
            }
            self.awaiting = awaiting;
        }
        // Last, so that a failing move holds up nothing else: a table per idle tick.
        self.store.upkeep().await.map_err(|e| {
            metrics::counter!("recpipe_store_errors_total").increment(1);
            RetryableError(e.to_string())
        })?;
        Ok(())
    }

    /// The last batch's write, when it has been left running: its offsets are committed
    /// as soon as it is stored. A failed one is written again by the next batch or
    /// `idle`, not here, so that a store that is down is retried with their backoff.
    async fn in_flight_done(&mut self) -> Result<(), RetryableError> {
        if self.in_flight.as_ref().is_none_or(|w| w.task.is_none()) {
            return std::future::pending().await;
        }
        self.settle().await
    }

    /// The last batch's write, so that a clean stop commits it.
    async fn finish_in_flight(&mut self) -> Result<(), RetryableError> {
        self.settle().await
    }

    /// The first awaiting action of each events partition, and the first record of each
    /// partition of a batch whose write has not succeeded yet.
    fn held_offsets(&self) -> Vec<HeldOffset> {
        let mut first: HashMap<i32, i64> = HashMap::new();
        for w in &self.awaiting {
            let offset = first.entry(w.partition).or_insert(w.offset);
            *offset = (*offset).min(w.offset);
        }
        first
            .into_iter()
            .map(|(partition, offset)| HeldOffset {
                topic: self.topics.events.clone(),
                partition,
                offset,
            })
            .chain(self.in_flight.iter().flat_map(|w| w.held.iter().cloned()))
            .collect()
    }
}

impl SaveWorker {
    /// The tallies these records' impressions change, counted from the kept (or stored)
    /// ones, and how many impressions each arm gained. A record's impressions share its
    /// offset, so each tally takes all of a record's impressions of its arm and day, or
    /// none when the record is at or below the tally's offset (counted before).
    async fn tally(
        &self,
        records: &[(RecordMeta, Vec<ImpressionCount>)],
    ) -> Result<(HashMap<TallyKey, ImpressionTally>, Vec<(String, u64)>), StoreError> {
        let mut changed: HashMap<TallyKey, ImpressionTally> = HashMap::new();
        let mut gained: Vec<(String, u64)> = Vec::new();
        let mut skipped = 0u64;
        for (meta, record) in records {
            // A record names a few arms and days: a short list beats hashing each one.
            let mut per_key: Vec<(&str, i64, u64)> = Vec::new();
            for i in record {
                let (arm, day) = (arm(&i.model_version, i.fallback), day_of(i.ts));
                match per_key.iter_mut().find(|(a, d, _)| *a == arm && *d == day) {
                    Some((_, _, n)) => *n += 1,
                    None => per_key.push((arm, day, 1)),
                }
            }
            for (arm, day, n) in per_key {
                let key = (arm.to_string(), day, meta.partition);
                let tally = match changed.entry(key) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let (arm, day, partition) = e.key().clone();
                        let known = match self.tallies.get(e.key()) {
                            Some(t) => Some(t.clone()),
                            None => self.store.impression_tally(&arm, day, partition).await?,
                        };
                        e.insert(known.unwrap_or(ImpressionTally {
                            arm,
                            day,
                            source_partition: partition,
                            impressions: 0,
                            through_offset: -1,
                        }))
                    }
                };
                if meta.offset > tally.through_offset {
                    tally.impressions += n;
                    tally.through_offset = meta.offset;
                    match gained.iter_mut().find(|(a, _)| a == arm) {
                        Some((_, g)) => *g += n,
                        None => gained.push((arm.to_string(), n)),
                    }
                } else {
                    skipped += n;
                }
            }
        }
        if skipped > 0 {
            // After a crash this is the replay of what was counted but not committed.
            // Impressions skipped batch after batch mean offsets started again below the
            // tallies: the topic was recreated while the store was kept.
            metrics::counter!("recpipe_impressions_replayed_total").increment(skipped);
            tracing::warn!(
                skipped,
                "impressions at or below their tally's offset skipped as replays; if this \
                 goes on, the impressions topic was recreated: delete its rows of \
                 impression_tallies (or start from an empty store)"
            );
        }
        Ok((changed, gained))
    }

    /// The experiment rows of events that act on a product of the list they name: the
    /// list is looked up in this batch, then among the user's stored lists, then among
    /// the popularity lists (served to users the pipeline had not seen). Also the rows of
    /// awaiting actions whose list this batch brings, and the awaiting actions after this
    /// batch (those whose list is still unknown and whose wait is not over).
    async fn attribute(
        &self,
        events: &[StoredEvent],
        positions: &[(i32, i64)],
        lists: &[StoredList],
    ) -> Result<(Vec<ExperimentEvent>, VecDeque<AwaitingList>), StoreError> {
        use tracing::Instrument;
        // Looked up by id: up to MAX_AWAITING actions against a batch's lists.
        let lists: HashMap<&str, &StoredList> =
            if self.awaiting.is_empty() && !events.iter().any(|e| is_action(&e.event)) {
                HashMap::new()
            } else {
                lists
                    .iter()
                    .map(|l| (l.recommendation_id.as_str(), l))
                    .collect()
            };
        let mut rows = Vec::new();
        let mut awaiting = VecDeque::with_capacity(self.awaiting.len());
        for waiting in &self.awaiting {
            let e = &waiting.event;
            let span =
                tracing::debug_span!("attribution", event_id = %e.event_id, user_id = %e.user_id);
            let over = waiting.since.elapsed() >= self.attribution_wait;
            // In this batch's lists; at the end of the wait, in the store too.
            let found = match find_list(e, &lists) {
                Some(list) => Some(list.record()?),
                None if over => self.stored_list(e).instrument(span.clone()).await?,
                None => None,
            };
            match found {
                Some(list) => {
                    let result = attribution(e, &list);
                    if let Attribution::Attributed(row) = &result {
                        rows.push(row.clone());
                    }
                    span.in_scope(|| count_attribution(e, &result));
                }
                None if over => span.in_scope(|| count_attribution(e, &Attribution::UnknownList)),
                None => awaiting.push_back(waiting.clone()),
            }
        }
        // A replayed batch brings the same actions again.
        let mut waiting_ids: HashSet<&str> =
            awaiting.iter().map(|w| w.event.event_id.as_str()).collect();
        let mut newly_awaiting = Vec::new();
        for (e, &(partition, offset)) in events.iter().map(|e| &e.event).zip(positions) {
            // Log lines of this step (debug ones) name the event and the user.
            let span =
                tracing::debug_span!("attribution", event_id = %e.event_id, user_id = %e.user_id);
            let result = self
                .attribute_one(e, &lists)
                .instrument(span.clone())
                .await?;
            match result {
                Attribution::NotAnAction => {}
                Attribution::UnknownList
                    if awaiting.len() + newly_awaiting.len() < MAX_AWAITING =>
                {
                    if waiting_ids.insert(&e.event_id) {
                        newly_awaiting.push(AwaitingList {
                            event: e.clone(),
                            partition,
                            offset,
                            since: Instant::now(),
                        });
                    }
                }
                result => {
                    if let Attribution::Attributed(row) = &result {
                        rows.push(row.clone());
                    }
                    span.in_scope(|| count_attribution(e, &result));
                }
            }
        }
        awaiting.extend(newly_awaiting);
        metrics::gauge!("recpipe_attribution_awaiting_list").set(awaiting.len() as f64);
        Ok((rows, awaiting))
    }

    async fn attribute_one(
        &self,
        e: &Event,
        lists: &HashMap<&str, &StoredList>,
    ) -> Result<Attribution, StoreError> {
        if !is_action(e) {
            return Ok(Attribution::NotAnAction);
        }
        let list = match find_list(e, lists) {
            Some(l) => Some(l.record()?),
            None => self.stored_list(e).await?,
        };
        Ok(match list {
            Some(list) => attribution(e, &list),
            None => Attribution::UnknownList,
        })
    }

    /// The stored list an action names: the user's, else a popularity list.
    async fn stored_list(&self, e: &Event) -> Result<Option<RecommendationRecord>, StoreError> {
        let Some(rec_id) = e.recommendation_id.as_deref() else {
            return Ok(None);
        };
        match self.store.recommendation(&e.user_id, rec_id).await? {
            Some(l) => Ok(Some(l)),
            None => self.store.recommendation(POPULAR_USER_ID, rec_id).await,
        }
    }
}

/// An event that names a list and a product and is an outcome the experiments count.
fn is_action(e: &Event) -> bool {
    e.recommendation_id.is_some()
        && e.product_id.is_some()
        && ExperimentKind::of_event(e.event_type).is_some()
}

/// The list `e` names, among `lists` (by id); only a list of the event's user.
fn find_list<'a>(e: &Event, lists: &HashMap<&str, &'a StoredList>) -> Option<&'a StoredList> {
    let list = *lists.get(e.recommendation_id.as_deref()?)?;
    (list.user_id == e.user_id).then_some(list)
}

/// The action `e` (see [`is_action`]) against the list it names.
fn attribution(e: &Event, list: &RecommendationRecord) -> Attribution {
    let (Some(product), Some(kind)) = (
        e.product_id.as_deref(),
        ExperimentKind::of_event(e.event_type),
    ) else {
        return Attribution::NotAnAction;
    };
    if !list.items.iter().any(|i| i.product_id == product) {
        return Attribution::NotInList;
    }
    Attribution::Attributed(ExperimentEvent {
        arm: arm(&list.model_version, list.fallback).to_string(),
        kind,
        id: e.event_id.clone(),
        ts: e.ts,
    })
}

/// Logs (at debug) and counts an attribution's final result.
fn count_attribution(e: &Event, result: &Attribution) {
    let result = match result {
        Attribution::NotAnAction => return,
        Attribution::UnknownList => "unknown_list",
        Attribution::NotInList => "not_in_list",
        Attribution::Attributed(_) => "attributed",
    };
    tracing::debug!(
        result,
        recommendation_id = e.recommendation_id.as_deref().unwrap_or_default(),
        "attribution"
    );
    metrics::counter!("recpipe_attribution_total", "result" => result).increment(1);
}

/// Runs the service until `shutdown` is cancelled.
pub async fn run(mut settings: Settings, shutdown: CancellationToken) -> anyhow::Result<RunStats> {
    let store = store::open_with(&settings.store.url, &settings.store).await?;
    tracing::info!(url = %settings.store.url, "store opened");
    // One batch is one store transaction (see `store.batch_max`).
    settings.kafka.batch_max = settings.store.batch_max();
    let processor = SaveWorker::new(store, settings.kafka.topics.clone());
    recpipe_shared::admin::run_service(&settings, processor, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use recpipe_shared::events::{LastEvent, UserVectorRecord};
    use recpipe_shared::list_record::ListEncoding;
    use recpipe_shared::state_record::StateEncoding;
    use recpipe_shared::testkit::state;

    #[test]
    fn only_each_users_newest_state_of_a_batch_is_written() {
        let batch = [
            state("a", 1),
            state("b", 4),
            state("a", 3),
            state("a", 2), // a replay arriving late
            state("b", 5),
        ];
        let batch = batch
            .iter()
            .map(|s| StoredUserState::of(s, StateEncoding::Binary))
            .collect();
        let newest: Vec<(String, u64)> = newest_states(batch)
            .into_iter()
            .map(|s| (s.user_id, s.version))
            .collect();
        assert_eq!(newest, vec![("a".to_string(), 3), ("b".to_string(), 5)]);
    }

    #[test]
    fn a_user_state_is_stored_as_it_came_and_only_a_valid_one_is_accepted() {
        let mut full = state("a", 7);
        full.recent_products = vec!["p-1".into(), "quote\"d \\ é".into()];
        full.purchased = vec!["p-1".into()];
        full.last_event.product_id = Some("p-1".into());
        full.embeddings = Some("e1".into());
        full.recent_event_ids = vec!["a-7".into(), "a-6".into()];
        full.folded_events = vec![LastEvent {
            event_id: "a-6".into(),
            event_type: EventType::Click,
            product_id: Some("p-2".into()),
            ts: 5,
        }];
        for record in [state("a", 7), full] {
            for encoding in [StateEncoding::Json, StateEncoding::Binary] {
                let payload = state_record::encode(&record, encoding);
                let stored = stored_user_state(&payload).unwrap();
                assert_eq!(stored, StoredUserState::of(&record, encoding));
                // The body is the record itself, byte for byte.
                assert_eq!(stored.body.bytes(), payload.as_slice());
                assert_eq!(state_record::decode(stored.body.bytes()).unwrap(), record);
            }
        }
        // A binary record is refused as its decoder refuses it: cut short, a vector
        // value JSON cannot hold, a version this build does not read.
        let binary = state_record::encode(&state("a", 1), StateEncoding::Binary);
        let mut not_finite = state("a", 1);
        not_finite.vector[0] = f32::NAN;
        let mut newer = binary.clone();
        newer[1] = 9;
        for (payload, why) in [
            (binary[..binary.len() - 1].to_vec(), "binary form"),
            (
                state_record::encode(&not_finite, StateEncoding::Binary),
                "not finite",
            ),
            (newer, "version 9"),
        ] {
            let message = stored_user_state(&payload).map(|_| ()).unwrap_err();
            assert!(message.contains(why), "{message}");
        }
        // What the full decode refuses, the check refuses too.
        let good = serde_json::to_value(state("a", 1)).unwrap();
        let mut bad = Vec::new();
        for field in [
            "user_id",
            "vector",
            "version",
            "last_event",
            "source",
            "updated_at",
        ] {
            let mut v = good.clone();
            v.as_object_mut().unwrap().remove(field);
            bad.push(v);
        }
        let mut v = good.clone();
        v["unknown"] = 1.into();
        bad.push(v);
        let mut v = good.clone();
        v["recent_products"] = serde_json::json!([1]);
        bad.push(v);
        let mut v = good.clone();
        v["last_event"]["type"] = "teleport".into();
        bad.push(v);
        let mut v = good.clone();
        v["last_event"]["extra"] = 1.into();
        bad.push(v);
        let mut v = good.clone();
        v["folded_events"] = serde_json::json!([{"event_id": "e", "type": "view"}]);
        bad.push(v);
        let mut v = good.clone();
        v["version"] = (-1).into();
        bad.push(v);
        // The vector's numbers are checked, not converted (`AnyNumber`).
        for element in [
            serde_json::json!("0.5"),
            serde_json::Value::Null,
            serde_json::json!([1]),
        ] {
            let mut v = good.clone();
            v["vector"][0] = element;
            bad.push(v);
        }
        for v in bad {
            let json = serde_json::to_vec(&v).unwrap();
            assert!(
                serde_json::from_slice::<UserVectorRecord>(&json).is_err(),
                "the record decodes: {v}"
            );
            assert!(stored_user_state(&json).is_err(), "accepted: {v}");
        }
        // A number beyond f64, which serde_json cannot write: refused by both.
        let json = serde_json::to_string(&state("a", 1)).unwrap();
        let (head, tail) = json.split_once("\"vector\":[").unwrap();
        let overflowing = format!("{head}\"vector\":[1e999,{tail}");
        assert!(serde_json::from_str::<UserVectorRecord>(&overflowing).is_err());
        assert!(stored_user_state(overflowing.as_bytes()).is_err());
        // A byte that is not UTF-8, in a string (outside one it is no JSON either).
        let mut bytes = json.replacen("\"a\"", "\"a?\"", 1).into_bytes();
        let at = bytes.iter().position(|&b| b == b'?').unwrap();
        bytes[at] = 0xff;
        assert!(serde_json::from_slice::<UserVectorRecord>(&bytes).is_err());
        assert!(stored_user_state(&bytes).is_err());
    }

    #[test]
    fn a_list_is_stored_as_it_came_and_only_a_valid_one_is_accepted() {
        let mut full = recpipe_shared::testkit::list("a", 3, &["p-1", "quote\"d \\ é"]);
        full.fallback = Some(Fallback::Popularity);
        full.items[0].because = Some("p-9".into());
        full.source = Some(SourcePosition {
            partition: 1,
            offset: 2,
        });
        full.input_event_ids = vec!["a-e3".into(), "a-e2".into()];
        let mut bare = recpipe_shared::testkit::list("b", 0, &[]);
        (bare.source_event_id, bare.source_event_ts) = (None, None);
        for record in [bare, full] {
            for encoding in [ListEncoding::Json, ListEncoding::Binary] {
                let payload = list_record::encode(&record, encoding);
                let consumed = consumed_list(&payload).unwrap();
                assert_eq!(consumed.stored, StoredList::of(&record, encoding));
                assert_eq!(consumed.stored.body.bytes(), payload, "stored as it came");
                assert_eq!(consumed.source_event_ts, record.source_event_ts);
                // The body is the record itself.
                assert_eq!(consumed.stored.record().unwrap(), record);
            }
        }
        // A binary list is refused as its decoder refuses it (list_record's tests try
        // every cut and many flips), saying why.
        let binary = list_record::encode(
            &recpipe_shared::testkit::list("a", 1, &["p-1"]),
            ListEncoding::Binary,
        );
        let cut = consumed_list(&binary[..binary.len() - 1]).err().unwrap();
        assert!(cut.contains("binary form"), "{cut}");
        let mut newer = binary.clone();
        newer[1] = 2;
        let newer = consumed_list(&newer).err().unwrap();
        assert!(
            newer.contains("version 2") && newer.contains("upgrade"),
            "{newer}"
        );
        // What the full decode refuses, the check refuses too.
        let good = serde_json::to_value(recpipe_shared::testkit::list("a", 1, &["p-1"])).unwrap();
        let mut bad = Vec::new();
        for field in [
            "recommendation_id",
            "user_id",
            "model_version",
            "items",
            "user_version",
            "generated_at",
        ] {
            let mut v = good.clone();
            v.as_object_mut().unwrap().remove(field);
            bad.push(v);
        }
        let changes: [(&str, serde_json::Value); 9] = [
            ("/unknown", 1.into()),
            ("/fallback", "teleport".into()),
            ("/user_version", (-1).into()),
            ("/source_event_ts", "soon".into()),
            ("/input_event_ids", serde_json::json!([1])),
            ("/source", serde_json::json!({"partition": 1})),
            ("/items/0/score", "high".into()),
            ("/items/0/extra", 1.into()),
            ("/items/0/product_id", serde_json::Value::Null),
        ];
        for (path, value) in changes {
            let mut v = good.clone();
            let (parent, key) = path.rsplit_once('/').unwrap();
            v.pointer_mut(parent).unwrap()[key] = value;
            bad.push(v);
        }
        for v in bad {
            let json = serde_json::to_vec(&v).unwrap();
            assert!(
                serde_json::from_slice::<RecommendationRecord>(&json).is_err(),
                "the record decodes: {v}"
            );
            assert!(consumed_list(&json).is_err(), "accepted: {v}");
        }
    }

    fn impressions(
        worker: &SaveWorker,
        partition: i32,
        offsets: std::ops::Range<i64>,
        ts: i64,
    ) -> Vec<Decoded<Record>> {
        offsets
            .map(|offset| {
                let meta = RecordMeta {
                    topic: worker.topics.impressions.clone(),
                    partition,
                    offset,
                    key: None,
                };
                let json = format!(
                    r#"{{"impression_id":"i-{partition}-{offset}","user_id":"u","recommendation_id":"r","model_version":"v1","items":[],"ts":{ts}}}"#
                );
                let input = worker.decode(&meta, json.as_bytes()).expect("a valid impression");
                Decoded { meta, input }
            })
            .collect()
    }

    /// An empty store in a directory of its own (gone with the returned guard).
    async fn fresh_store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        let store = store::open(&url).await.unwrap();
        (dir, store)
    }

    async fn impressions_counted(store: &dyn Store, day: i64) -> u64 {
        let counts = store.experiment_counts(day, day).await.unwrap();
        counts.iter().map(|c| c.impressions).sum()
    }

    #[tokio::test]
    async fn impressions_are_tallied_once_each_across_replays_and_restarts() {
        let (_dir, store) = fresh_store().await;
        let topics = Topics::default();
        let (ts, day) = (1_700_000_000_000, day_of(1_700_000_000_000));

        let mut worker = SaveWorker::new(store.clone(), topics.clone());
        let batch = impressions(&worker, 0, 0..5, ts)
            .into_iter()
            .chain(impressions(&worker, 1, 0..3, ts))
            .collect();
        worker.process(batch).await.unwrap();
        worker.settle().await.unwrap();
        assert_eq!(impressions_counted(&*store, day).await, 8);
        // The same records again (offsets not committed before a crash): no change.
        worker
            .process(impressions(&worker, 0, 2..5, ts))
            .await
            .unwrap();
        worker.settle().await.unwrap();
        assert_eq!(impressions_counted(&*store, day).await, 8);

        // A restarted worker knows nothing in memory: the store's tallies decide.
        let mut restarted = SaveWorker::new(store.clone(), topics.clone());
        restarted
            .process(impressions(&restarted, 0, 3..7, ts))
            .await
            .unwrap();
        restarted.settle().await.unwrap();
        assert_eq!(impressions_counted(&*store, day).await, 10);
        let tally = store.impression_tally("v1", day, 0).await.unwrap().unwrap();
        assert_eq!((tally.impressions, tally.through_offset), (7, 6));

        // The first worker gets partition 0 back after the other counted on: it reads the
        // tally again instead of writing its stale one over it.
        worker
            .prepare_partitions(&[(topics.impressions.clone(), 0)])
            .await
            .unwrap();
        worker
            .process(impressions(&worker, 0, 7..9, ts))
            .await
            .unwrap();
        worker.settle().await.unwrap();
        assert_eq!(impressions_counted(&*store, day).await, 12);
        // Another day is another tally.
        worker
            .process(impressions(&worker, 0, 9..10, ts + 86_400_000))
            .await
            .unwrap();
        worker.settle().await.unwrap();
        assert_eq!(impressions_counted(&*store, day).await, 12);
        assert_eq!(impressions_counted(&*store, day + 1).await, 1);
    }

    /// One record of the API's batches at `offset` of partition 0: an impression per
    /// (model version, ts) given.
    fn batch_record(worker: &SaveWorker, offset: i64, served: &[(&str, i64)]) -> Decoded<Record> {
        let meta = RecordMeta {
            topic: worker.topics.impressions.clone(),
            partition: 0,
            offset,
            key: None,
        };
        let items: Vec<String> = served
            .iter()
            .enumerate()
            .map(|(n, (version, ts))| {
                format!(
                    r#"{{"impression_id":"i-{offset}-{n}","user_id":"u{n}","recommendation_id":"r","model_version":"{version}","items":["p-00001"],"ts":{ts}}}"#
                )
            })
            .collect();
        let json = format!("[{}]", items.join(","));
        let input = worker
            .decode(&meta, json.as_bytes())
            .expect("a valid batch");
        Decoded { meta, input }
    }

    #[tokio::test]
    async fn a_batch_record_counts_all_its_impressions_once_per_arm_and_day() {
        let (_dir, store) = fresh_store().await;
        let (ts, day) = (1_700_000_000_000, day_of(1_700_000_000_000));
        let next_day = ts + 86_400_000;
        let mut worker = SaveWorker::new(store.clone(), Topics::default());
        let arm_counts = |store: Arc<dyn Store>, day: i64| async move {
            let counts = store.experiment_counts(day, day).await.unwrap();
            counts
                .iter()
                .map(|c| (c.arm.clone(), c.impressions))
                .collect::<Vec<_>>()
        };

        // Two arms and two days in one record, and a second record after it.
        let first = [("a", ts), ("b", ts), ("a", ts), ("a", next_day), ("a", ts)];
        worker
            .process(vec![
                batch_record(&worker, 0, &first),
                batch_record(&worker, 1, &[("b", ts)]),
            ])
            .await
            .unwrap();
        worker.settle().await.unwrap();
        let expected = vec![("a".to_string(), 3), ("b".to_string(), 2)];
        assert_eq!(arm_counts(store.clone(), day).await, expected);
        assert_eq!(
            arm_counts(store.clone(), day + 1).await,
            vec![("a".to_string(), 1)]
        );

        // Replayed by a restarted worker (no commit before a crash): nothing more.
        let mut restarted = SaveWorker::new(store.clone(), Topics::default());
        restarted
            .process(vec![batch_record(&restarted, 0, &first)])
            .await
            .unwrap();
        restarted.settle().await.unwrap();
        assert_eq!(arm_counts(store.clone(), day).await, expected);

        // Older single-impression records still count; an empty array counts nothing.
        let meta = RecordMeta {
            topic: restarted.topics.impressions.clone(),
            partition: 0,
            offset: 2,
            key: None,
        };
        let single = format!(
            r#"{{"impression_id":"i","user_id":"u","recommendation_id":"r","model_version":"b","items":[],"ts":{ts}}}"#
        );
        let input = restarted.decode(&meta, single.as_bytes()).unwrap();
        restarted
            .process(vec![Decoded { meta, input }])
            .await
            .unwrap();
        restarted.settle().await.unwrap();
        assert!(restarted
            .decode(
                &RecordMeta {
                    offset: 3,
                    ..batch_record(&restarted, 0, &[]).meta
                },
                b" []"
            )
            .is_ok());
        assert_eq!(
            arm_counts(store.clone(), day).await,
            vec![("a".to_string(), 3), ("b".to_string(), 3)]
        );
        let tally = store.impression_tally("b", day, 0).await.unwrap().unwrap();
        assert_eq!((tally.impressions, tally.through_offset), (3, 2));
    }

    /// `record` as the worker gets it from `topic` at `offset`.
    fn decoded(
        worker: &SaveWorker,
        topic: &str,
        offset: i64,
        record: &impl serde::Serialize,
    ) -> Decoded<Record> {
        let meta = RecordMeta {
            topic: topic.to_string(),
            partition: 0,
            offset,
            key: None,
        };
        let json = serde_json::to_vec(record).unwrap();
        let input = worker.decode(&meta, &json).expect("a valid record");
        Decoded { meta, input }
    }

    fn shown_list(user: &str, id: &str, products: &[&str]) -> RecommendationRecord {
        RecommendationRecord {
            recommendation_id: id.into(),
            model_version: "v7".into(),
            ..recpipe_shared::testkit::list(user, 1, products)
        }
    }

    fn action(id: &str, t: EventType, product: &str, list: &str, ts: i64) -> Event {
        let mut e = recpipe_shared::testkit::event(id, "u", t, product, ts);
        e.recommendation_id = Some(list.into());
        e
    }

    /// A worker on a fresh store, with the store and the topics it reads.
    async fn fresh_worker() -> (tempfile::TempDir, Arc<dyn Store>, Topics, SaveWorker) {
        let (dir, store) = fresh_store().await;
        let topics = Topics::default();
        let worker = SaveWorker::new(store.clone(), topics.clone());
        (dir, store, topics, worker)
    }

    async fn stored_by_another_worker(store: &dyn Store, list: RecommendationRecord) {
        store
            .write(WriteBatch {
                recommendations: vec![StoredList::of(&list, ListEncoding::Binary)],
                ..WriteBatch::default()
            })
            .await
            .unwrap();
    }

    async fn actions_counted(store: &dyn Store, day: i64) -> Vec<(String, u64, u64)> {
        let counts = store.experiment_counts(day, day).await.unwrap();
        counts
            .into_iter()
            .map(|c| (c.arm, c.clicks, c.purchases))
            .collect()
    }

    /// What the framework asks of a batch's write it left running: a wait that ends once
    /// it is stored, so its offsets are committed then. The framework drops that wait
    /// when a record comes first: the write is then waited for again, not lost.
    #[tokio::test]
    async fn a_running_write_is_done_once_stored_and_a_dropped_wait_loses_nothing() {
        let (_dir, store, topics, mut worker) = fresh_worker().await;
        assert!(
            done_at_once(&mut worker).await.is_none(),
            "nothing runs: no end to wait for"
        );

        let e =
            recpipe_shared::testkit::event("e1", "u", EventType::View, "p-1", 1_700_000_000_000);
        worker
            .process(vec![decoded(&worker, &topics.events, 7, &e)])
            .await
            .unwrap();
        let held = vec![HeldOffset {
            topic: topics.events.clone(),
            partition: 0,
            offset: 7,
        }];
        match done_at_once(&mut worker).await {
            // Dropped before the write ended: still held, and waited for again.
            None => {
                assert_eq!(worker.held_offsets(), held);
                worker.in_flight_done().await.unwrap();
            }
            Some(done) => done.unwrap(),
        }
        assert_eq!(worker.held_offsets(), vec![], "let go of once stored");
        assert!(
            done_at_once(&mut worker).await.is_none(),
            "done is reported once"
        );
        assert_eq!(store.user_events("u", 10).await.unwrap(), vec![e]);
    }

    /// A batch's write has a backlog when records were waiting behind the batch, or when
    /// the last write was still running as it came; otherwise not (and then the store
    /// catches up on moves it put off).
    #[tokio::test]
    async fn a_write_has_a_backlog_when_records_wait_or_the_last_write_still_runs() {
        let (_dir, _store, topics, mut worker) = fresh_worker().await;
        let view = |id: &str| {
            recpipe_shared::testkit::event(id, "u", EventType::View, "p-1", 1_700_000_000_000)
        };
        let backlog_of = |worker: &SaveWorker| worker.in_flight.as_ref().unwrap().batch.backlog;

        let batch = vec![decoded(&worker, &topics.events, 0, &view("e0"))];
        worker.process(batch).await.unwrap();
        assert!(!backlog_of(&worker), "nothing waits and nothing runs");
        worker.settle().await.unwrap();

        worker.records_waiting(true);
        let batch = vec![decoded(&worker, &topics.events, 1, &view("e1"))];
        worker.process(batch).await.unwrap();
        assert!(backlog_of(&worker), "records wait behind the batch");
        worker.settle().await.unwrap();

        // A write still running: on this test's one thread the task has not been polled
        // when `process` looks, and it ends once `process` waits for it.
        worker.records_waiting(false);
        worker.in_flight = Some(WriteInFlight {
            batch: Arc::new(WriteBatch::default()),
            task: Some(tokio::spawn(async {
                tokio::task::yield_now().await;
                Ok(())
            })),
            held: Vec::new(),
            list_event_ts: Vec::new(),
            counted: Vec::new(),
        });
        let batch = vec![decoded(&worker, &topics.events, 2, &view("e2"))];
        worker.process(batch).await.unwrap();
        assert!(backlog_of(&worker), "the last write still ran");
        worker.settle().await.unwrap();

        let batch = vec![decoded(&worker, &topics.events, 3, &view("e3"))];
        worker.process(batch).await.unwrap();
        assert!(!backlog_of(&worker), "caught up again");
    }

    /// The worker's `in_flight_done` polled once and dropped, as the framework's select
    /// drops it when a record comes first: its result if it had one.
    async fn done_at_once(worker: &mut SaveWorker) -> Option<Result<(), RetryableError>> {
        tokio::time::timeout(Duration::ZERO, worker.in_flight_done())
            .await
            .ok()
    }

    #[tokio::test]
    async fn an_action_read_before_its_list_is_counted_when_the_list_comes() {
        let (_dir, store, topics, mut worker) = fresh_worker().await;
        let (ts, day) = (1_700_000_000_000, day_of(1_700_000_000_000));

        // The click and purchase come before the list they name (and twice: a retry).
        let click = action("c1", EventType::Click, "p-1", "L", ts);
        let buy = action("b1", EventType::Purchase, "p-2", "L", ts);
        let elsewhere = action("c2", EventType::Click, "p-9", "L", ts);
        let batch = [&click, &buy, &elsewhere, &click]
            .iter()
            .enumerate()
            .map(|(i, e)| decoded(&worker, &topics.events, i as i64, e))
            .collect();
        worker.process(batch).await.unwrap();
        worker.settle().await.unwrap();
        assert_eq!(actions_counted(&*store, day).await, vec![]);
        assert_eq!(worker.awaiting.len(), 3, "each action waits once");
        assert_eq!(
            worker.held_offsets(),
            vec![HeldOffset {
                topic: topics.events.clone(),
                partition: 0,
                offset: 0
            }],
            "not committed from the first awaiting action on"
        );

        let list = shown_list("u", "L", &["p-1", "p-2", "p-3"]);
        let batch = vec![decoded(&worker, &topics.recommendations, 0, &list)];
        worker.process(batch).await.unwrap();
        worker.settle().await.unwrap();
        assert_eq!(
            actions_counted(&*store, day).await,
            vec![("v7".to_string(), 1, 1)],
            "the click and the purchase, not the product the list did not show"
        );
        assert!(worker.awaiting.is_empty());
        assert_eq!(worker.held_offsets(), vec![]);
    }

    #[tokio::test]
    async fn an_action_waits_for_its_list_only_so_long_and_then_asks_the_store_again() {
        let (_dir, store, topics, mut worker) = fresh_worker().await;
        let (ts, day) = (1_700_000_000_000, day_of(1_700_000_000_000));
        worker.attribution_wait = Duration::ZERO;

        let stored_later = action("c1", EventType::Click, "p-1", "L", ts);
        let never = action("c2", EventType::Click, "p-1", "no-such-list", ts);
        let batch = vec![
            decoded(&worker, &topics.events, 0, &stored_later),
            decoded(&worker, &topics.events, 1, &never),
        ];
        worker.process(batch).await.unwrap();
        worker.settle().await.unwrap();
        assert_eq!(worker.awaiting.len(), 2);

        // Another worker stores the list; this one's next batch brings other things.
        stored_by_another_worker(&*store, shown_list("u", "L", &["p-1"])).await;
        let unrelated = recpipe_shared::testkit::event("v1", "u", EventType::View, "p-5", ts);
        let batch = vec![decoded(&worker, &topics.events, 2, &unrelated)];
        worker.process(batch).await.unwrap();
        worker.settle().await.unwrap();
        assert_eq!(
            actions_counted(&*store, day).await,
            vec![("v7".to_string(), 1, 0)]
        );
        assert!(worker.awaiting.is_empty(), "the unknown list is given up");
    }

    #[tokio::test]
    async fn an_action_whose_wait_is_over_is_given_up_when_idle_too() {
        let (_dir, store, topics, mut worker) = fresh_worker().await;
        let (ts, day) = (1_700_000_000_000, day_of(1_700_000_000_000));
        let click = action("c1", EventType::Click, "p-1", "L", ts);
        let batch = vec![decoded(&worker, &topics.events, 7, &click)];
        worker.process(batch).await.unwrap();
        worker.settle().await.unwrap();
        worker.idle().await.unwrap();
        assert_eq!(
            worker.awaiting.len(),
            1,
            "still waiting: its wait is not over"
        );
        assert_eq!(worker.held_offsets().len(), 1);

        // Another worker stores the list; no batch comes, the wait ends.
        stored_by_another_worker(&*store, shown_list("u", "L", &["p-1"])).await;
        worker.attribution_wait = Duration::ZERO;
        worker.idle().await.unwrap();
        assert_eq!(
            actions_counted(&*store, day).await,
            vec![("v7".to_string(), 1, 0)]
        );
        assert!(worker.awaiting.is_empty());
        assert_eq!(worker.held_offsets(), vec![], "its offset is let go of");
    }
}
