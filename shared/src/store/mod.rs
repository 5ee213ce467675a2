//! Where recommendations, events and user state are kept. One trait, chosen by URL:
//! `sqlite://<path>` is the embedded default (several processes may use the same file:
//! the save-worker writes while the query-api reads); the ScyllaDB backend plugs in
//! behind the same trait.

mod checkpoints;
#[cfg(feature = "scylla")]
pub mod scylla;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

use crate::events::{Event, EventType, RecommendationRecord, UserVectorRecord};
use crate::list_record::ListEncoding;
use crate::state_record::StateEncoding;

pub use sqlite::SqliteStore;

/// A SQLite connection whose last user may have panicked while holding it. It is still
/// sound: SQLite keeps its own state, and a transaction held in a rusqlite
/// `Transaction` was rolled back as the panic dropped it. A poisoned lock would
/// otherwise fail every later call until a restart.
pub(crate) fn unpoisoned(
    connection: &std::sync::Mutex<rusqlite::Connection>,
) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
    connection
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported store URL {0:?}: use sqlite://<path> (embedded) or scylla://<host>:<port>/<keyspace>")]
    UnsupportedUrl(String),
    #[error(
        "this binary was built without the scylla feature; rebuild with it, or use sqlite://<path>"
    )]
    ScyllaUnavailable,
    #[error("cannot open the store at {location}: {message}")]
    Open { location: String, message: String },
    #[error("store query failed: {0}")]
    Query(String),
    #[error("a stored row is corrupt: {0}")]
    Corrupt(String),
}

/// What an experiment counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExperimentKind {
    /// A list served.
    Impression,
    /// An action on a product of a served list that names the list.
    Click,
    AddToCart,
    Purchase,
}

impl ExperimentKind {
    pub const ALL: [ExperimentKind; 4] = [
        ExperimentKind::Impression,
        ExperimentKind::Click,
        ExperimentKind::AddToCart,
        ExperimentKind::Purchase,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExperimentKind::Impression => "impression",
            ExperimentKind::Click => "click",
            ExperimentKind::AddToCart => "add_to_cart",
            ExperimentKind::Purchase => "purchase",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The kind an attributed event counts as (views and searches are not outcomes).
    pub fn of_event(t: EventType) -> Option<Self> {
        match t {
            EventType::Click => Some(ExperimentKind::Click),
            EventType::AddToCart => Some(ExperimentKind::AddToCart),
            EventType::Purchase => Some(ExperimentKind::Purchase),
            EventType::View | EventType::Search => None,
        }
    }
}

/// One counted impression or attributed action.
#[derive(Debug, Clone, PartialEq)]
pub struct ExperimentEvent {
    /// Model version, or `popularity`/`catalog` for fallback lists.
    pub arm: String,
    pub kind: ExperimentKind,
    /// Impression id or event id: the same id is counted once.
    pub id: String,
    /// Time in ms since the epoch (its UTC day buckets the counts).
    pub ts: i64,
}

impl ExperimentEvent {
    pub fn day(&self) -> i64 {
        day_of(self.ts)
    }
}

/// Days since the epoch (UTC) of a time in ms.
pub fn day_of(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(86_400_000)
}

/// Totals of one arm over a range of days.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArmCounts {
    pub arm: String,
    pub impressions: u64,
    pub clicks: u64,
    pub add_to_carts: u64,
    pub purchases: u64,
}

impl ArmCounts {
    pub fn add(&mut self, kind: ExperimentKind, n: u64) {
        match kind {
            ExperimentKind::Impression => self.impressions += n,
            ExperimentKind::Click => self.clicks += n,
            ExperimentKind::AddToCart => self.add_to_carts += n,
            ExperimentKind::Purchase => self.purchases += n,
        }
    }
}

/// Impressions of one arm on one day read from one partition of the `impressions` topic,
/// counted through one offset. save-worker writes the running total with the offset it
/// covers, so an impression replayed after a crash (at or below the offset) is not
/// counted again and rewriting a row is harmless: exactly-once counts without a row per
/// impression (which was most of save-worker's work at 20,000 GETs/s) and without a
/// transaction spanning the store and Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImpressionTally {
    pub arm: String,
    pub day: i64,
    pub source_partition: i32,
    pub impressions: u64,
    /// The last offset counted; a row never moves back to an earlier one.
    pub through_offset: i64,
}

/// What the save-worker writes in one go. Every write is idempotent: replaying a batch
/// leaves the store as it was.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WriteBatch {
    pub events: Vec<StoredEvent>,
    pub user_states: Vec<StoredUserState>,
    pub recommendations: Vec<StoredList>,
    pub experiment: Vec<ExperimentEvent>,
    pub impression_tallies: Vec<ImpressionTally>,
    /// The writer has a backlog: records were waiting behind this batch, or the batch
    /// before it was still being written when it was ready. A store may put off work it
    /// can do later (SQLite: moving staged events into `events`, up to a bound) so that
    /// the backlog drains sooner; a write without a backlog, or [`Store::upkeep`],
    /// catches up on it.
    pub backlog: bool,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.events.len()
            + self.user_states.len()
            + self.recommendations.len()
            + self.experiment.len()
            + self.impression_tallies.len()
    }
}

/// A user state as the store keeps it: key, version and the record as it was consumed, in
/// either of its encodings ([`crate::state_record`]). save-worker passes the record through
/// (it checks it, but reads only these two fields: decoding the whole record and encoding
/// it again was a fifth of its work).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredUserState {
    pub user_id: String,
    pub version: u64,
    pub body: RecordBody,
}

/// A `user-vectors` or `recommendations` record's bytes, in the encoding they came in.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordBody {
    /// schemas/user-vector.v1.schema.json, schemas/recommendation.v1.schema.json
    Json(String),
    /// schemas/user-vector.binary.md, schemas/recommendation.binary.md
    Binary(Vec<u8>),
}

impl RecordBody {
    pub fn bytes(&self) -> &[u8] {
        match self {
            RecordBody::Json(text) => text.as_bytes(),
            RecordBody::Binary(bytes) => bytes,
        }
    }

    /// The record as JSON, for a store that keeps text: JSON as it came, the binary form
    /// decoded and written as JSON by `binary_to_json`.
    fn to_json<E: std::fmt::Display>(
        &self,
        binary_to_json: impl FnOnce(&[u8]) -> Result<String, E>,
    ) -> Result<std::borrow::Cow<'_, str>, StoreError> {
        match self {
            RecordBody::Json(text) => Ok(std::borrow::Cow::Borrowed(text)),
            RecordBody::Binary(bytes) => binary_to_json(bytes)
                .map(std::borrow::Cow::Owned)
                .map_err(|e| StoreError::Corrupt(e.to_string())),
        }
    }
}

impl StoredUserState {
    /// The state as JSON (see [`RecordBody::to_json`]).
    pub fn json(&self) -> Result<std::borrow::Cow<'_, str>, StoreError> {
        self.body.to_json(crate::state_record::to_json)
    }

    /// `state` as the store keeps it, encoded as `encoding`.
    pub fn of(state: &UserVectorRecord, encoding: StateEncoding) -> StoredUserState {
        let body = match encoding {
            StateEncoding::Json => {
                RecordBody::Json(serde_json::to_string(state).expect("a user state serialises"))
            }
            StateEncoding::Binary => {
                RecordBody::Binary(crate::state_record::encode(state, encoding))
            }
        };
        StoredUserState {
            user_id: state.user_id.clone(),
            version: state.version,
            body,
        }
    }
}

/// An event as the store keeps it: the event (its key, and what save-worker attributes)
/// and its JSON as it was consumed, stored as it came rather than encoded again in the
/// store's writer (a valid event has only the schema's fields).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub event: Event,
    /// The event as JSON (schemas/event.v1.schema.json).
    pub body: String,
}

impl StoredEvent {
    pub fn of(event: &Event) -> StoredEvent {
        StoredEvent {
            event: event.clone(),
            body: serde_json::to_string(event).expect("an event serialises"),
        }
    }

    /// Decodes and validates an event ([`Event::from_json`]), keeping its JSON.
    pub fn from_json(bytes: &[u8]) -> Result<StoredEvent, crate::events::InvalidEvent> {
        let (event, text) = Event::from_json_with_text(bytes)?;
        Ok(StoredEvent {
            event,
            body: text.to_owned(),
        })
    }
}

/// A recommendation list as the store keeps it: its key and the record as it was
/// consumed, in either encoding. save-worker passes the record through (it checks it), as
/// it does user states: decoding each list whole and encoding it again was most of its
/// JSON work.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredList {
    pub user_id: String,
    pub recommendation_id: String,
    pub user_version: u64,
    pub generated_at: i64,
    pub body: RecordBody,
}

impl StoredList {
    /// `list` as the store keeps it, encoded as `encoding`.
    pub fn of(list: &RecommendationRecord, encoding: ListEncoding) -> StoredList {
        let bytes = crate::list_record::encode(list, encoding);
        StoredList {
            user_id: list.user_id.clone(),
            recommendation_id: list.recommendation_id.clone(),
            user_version: list.user_version,
            generated_at: list.generated_at,
            body: match encoding {
                ListEncoding::Json => {
                    RecordBody::Json(String::from_utf8(bytes).expect("JSON is UTF-8"))
                }
                ListEncoding::Binary => RecordBody::Binary(bytes),
            },
        }
    }

    /// The list itself.
    pub fn record(&self) -> Result<RecommendationRecord, StoreError> {
        crate::list_record::decode(self.body.bytes())
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// The list as JSON (see [`RecordBody::to_json`]).
    pub fn json(&self) -> Result<std::borrow::Cow<'_, str>, StoreError> {
        self.body.to_json(crate::list_record::to_json)
    }
}

#[async_trait]
pub trait Store: Send + Sync {
    /// Writes a batch atomically where the backend can.
    async fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.write_shared(Arc::new(batch)).await
    }
    /// As [`Store::write`], for a caller that keeps the batch to write it again if this
    /// fails (save-worker writes one batch while it reads the next).
    async fn write_shared(&self, batch: Arc<WriteBatch>) -> Result<(), StoreError>;
    /// A step of the work writes put off while they had a backlog
    /// ([`WriteBatch::backlog`]), for a writer with nothing else to do; whether there
    /// was any. None by default.
    async fn upkeep(&self) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// The newest list for a user (highest user-state version, then newest).
    async fn latest_recommendations(
        &self,
        user_id: &str,
    ) -> Result<Option<RecommendationRecord>, StoreError>;
    /// Every user with at least one stored list, when there are at most `limit` of them
    /// (`None` when there are more). The API loads them at start so that a user outside
    /// this set (and outside its view) is known to have no list without a read.
    async fn users_with_lists(&self, limit: usize) -> Result<Option<Vec<String>>, StoreError>;
    /// A user's events, newest event time first.
    async fn user_events(&self, user_id: &str, limit: usize) -> Result<Vec<Event>, StoreError>;
    async fn user_state(&self, user_id: &str) -> Result<Option<UserVectorRecord>, StoreError>;
    /// One list of a user's history, by id.
    async fn recommendation(
        &self,
        user_id: &str,
        recommendation_id: &str,
    ) -> Result<Option<RecommendationRecord>, StoreError>;
    /// The stored tally of one arm, day and partition of `impressions`.
    async fn impression_tally(
        &self,
        arm: &str,
        day: i64,
        source_partition: i32,
    ) -> Result<Option<ImpressionTally>, StoreError>;
    /// Impressions (tallies and rows) and attributed actions per arm over days
    /// `from_day..=to_day`, sorted by arm.
    async fn experiment_counts(
        &self,
        from_day: i64,
        to_day: i64,
    ) -> Result<Vec<ArmCounts>, StoreError>;
    /// Succeeds when the store answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Opens the store a URL names, with the embedded defaults for backend settings.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    open_with(url, &crate::settings::StoreSettings::default()).await
}

/// Opens the store a URL names.
pub async fn open_with(
    url: &str,
    settings: &crate::settings::StoreSettings,
) -> Result<Arc<dyn Store>, StoreError> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let path = std::path::PathBuf::from(path);
        let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path))
            .await
            .map_err(|e| StoreError::Open {
                location: url.to_string(),
                message: e.to_string(),
            })??;
        return Ok(Arc::new(store));
    }
    if url.starts_with("scylla://") {
        #[cfg(feature = "scylla")]
        return Ok(Arc::new(
            scylla::ScyllaStore::connect(url, &settings.scylla).await?,
        ));
        #[cfg(not(feature = "scylla"))]
        return Err(StoreError::ScyllaUnavailable);
    }
    Err(StoreError::UnsupportedUrl(url.to_string()))
}

/// One behavioural suite for every backend, so each is held to the same promises.
#[cfg(any(test, feature = "testkit"))]
pub mod suite {
    use super::*;
    use crate::events::{EventType, Fallback, LastEvent, ScoredProduct, SourcePosition};

    fn event(user: &str, id: &str, ts: i64) -> Event {
        Event {
            event_id: id.into(),
            user_id: user.into(),
            event_type: EventType::View,
            product_id: Some("p-1".into()),
            query: None,
            ts,
            recommendation_id: None,
        }
    }

    fn state(user: &str, version: u64) -> UserVectorRecord {
        UserVectorRecord {
            user_id: user.into(),
            vector: vec![version as f32, 0.5],
            anchor_ts: version as i64,
            version,
            recent_products: vec!["p-1".into()],
            purchased: vec![],
            last_event: LastEvent {
                event_id: format!("e{version}"),
                event_type: EventType::View,
                product_id: Some("p-1".into()),
                ts: 1,
            },
            source: SourcePosition {
                partition: 0,
                offset: version as i64,
            },
            updated_at: 1,
            embeddings: Some("emb-test".into()),
            recent_event_ids: vec![format!("e{version}")],
            folded_events: Vec::new(),
        }
    }

    fn list(user: &str, version: u64, generated_at: i64) -> RecommendationRecord {
        RecommendationRecord {
            recommendation_id: crate::model::recommendation_id(user, version, "v1"),
            user_id: user.into(),
            model_version: "v1".into(),
            fallback: None,
            items: vec![ScoredProduct {
                product_id: format!("p-{version}"),
                score: 0.5,
                because: None,
            }],
            user_version: version,
            source_event_id: Some(format!("e{version}")),
            source_event_ts: Some(1),
            generated_at,
            source: Some(SourcePosition {
                partition: 1,
                offset: version as i64,
            }),
            input_event_ids: vec![format!("e{version}")],
        }
    }

    /// Runs every check against `store`, which must be empty.
    pub async fn run_all(store: &dyn Store) {
        store.ping().await.unwrap();
        assert_eq!(store.latest_recommendations("nobody").await.unwrap(), None);
        assert_eq!(store.user_state("nobody").await.unwrap(), None);
        assert!(store.user_events("nobody", 10).await.unwrap().is_empty());

        // Events: newest first, a replayed event stored once, users kept apart. One is
        // stored as a producer wrote it (spaces, a null), and reads back as the event.
        let as_produced = StoredEvent::from_json(
            br#"{ "event_id": "e1", "user_id": "b", "type": "view", "product_id": "p-1",
                  "query": null, "ts": 5 }"#,
        )
        .unwrap();
        let batch = WriteBatch {
            events: vec![
                StoredEvent::of(&event("a", "e1", 10)),
                StoredEvent::of(&event("a", "e2", 30)),
                StoredEvent::of(&event("a", "e3", 20)),
                as_produced,
            ],
            ..Default::default()
        };
        store.write(batch.clone()).await.unwrap();
        store.write(batch).await.unwrap();
        let ids: Vec<String> = store
            .user_events("a", 10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.event_id)
            .collect();
        assert_eq!(ids, vec!["e2", "e3", "e1"]);
        assert_eq!(store.user_events("a", 2).await.unwrap().len(), 2);
        assert_eq!(
            store.user_events("b", 10).await.unwrap(),
            vec![event("b", "e1", 5)]
        );

        // User state: a replayed older version never overwrites a newer one, and a
        // state reads back whichever encoding it came in and the one before it had.
        use crate::state_record::StateEncoding::{Binary, Json};
        for (version, encoding, newest) in
            [(2, Json, 2), (1, Binary, 2), (3, Binary, 3), (4, Json, 4)]
        {
            store
                .write(WriteBatch {
                    user_states: vec![StoredUserState::of(&state("a", version), encoding)],
                    ..Default::default()
                })
                .await
                .unwrap();
            assert_eq!(
                store.user_state("a").await.unwrap(),
                Some(state("a", newest))
            );
        }

        // Recommendations: the newest user version wins, whatever the write order, and a
        // replay changes nothing. Either encoding reads back, beside the other.
        let (l1, l2) = (list("a", 1, 100), list("a", 2, 50));
        let (binary, json) = (ListEncoding::Binary, ListEncoding::Json);
        store
            .write(WriteBatch {
                recommendations: vec![StoredList::of(&l2, binary), StoredList::of(&l1, json)],
                ..Default::default()
            })
            .await
            .unwrap();
        store
            .write(WriteBatch {
                recommendations: vec![StoredList::of(&l1, binary)],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            store.latest_recommendations("a").await.unwrap(),
            Some(l2.clone())
        );
        // Lists of no user version (popularity) go by generation time.
        let mut p1 = list(crate::events::POPULAR_USER_ID, 0, 10);
        p1.fallback = Some(Fallback::Popularity);
        let mut p2 = p1.clone();
        p2.recommendation_id = "pop-2".into();
        p2.generated_at = 20;
        store
            .write(WriteBatch {
                recommendations: vec![StoredList::of(&p2, json), StoredList::of(&p1, binary)],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            store
                .latest_recommendations(crate::events::POPULAR_USER_ID)
                .await
                .unwrap(),
            Some(p2)
        );
        assert_eq!(store.latest_recommendations("b").await.unwrap(), None);

        // The users with lists: each once, however many lists; none past the limit.
        let mut with_lists = store.users_with_lists(10).await.unwrap().unwrap();
        with_lists.sort();
        assert_eq!(with_lists, vec![crate::events::POPULAR_USER_ID, "a"]);
        assert_eq!(
            store.users_with_lists(2).await.unwrap().map(|u| u.len()),
            Some(2)
        );
        assert_eq!(
            store.users_with_lists(1).await.unwrap(),
            None,
            "more users than the limit"
        );

        // A list of the history by id; another user's id finds nothing.
        assert_eq!(
            store
                .recommendation("a", &l1.recommendation_id)
                .await
                .unwrap(),
            Some(l1.clone())
        );
        assert_eq!(
            store
                .recommendation("b", &l1.recommendation_id)
                .await
                .unwrap(),
            None
        );

        // Experiment counts: per arm and kind, each id once, within the days asked for.
        let day = 20_000;
        let at = |d: i64| d * 86_400_000 + 5;
        let x = |arm: &str, kind, id: &str, d| ExperimentEvent {
            arm: arm.into(),
            kind,
            id: id.into(),
            ts: at(d),
        };
        use ExperimentKind::*;
        let rows = vec![
            x("v1", Impression, "i1", day),
            x("v1", Impression, "i2", day),
            x("v1", Impression, "i3", day + 1),
            x("v1", Click, "e1", day),
            x("v1", Purchase, "e2", day + 1),
            x("v2", Impression, "i4", day),
            x("v2", AddToCart, "e3", day),
            x("v2", Impression, "old", day - 30),
        ];
        store
            .write(WriteBatch {
                experiment: rows.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        store
            .write(WriteBatch {
                experiment: rows,
                ..Default::default()
            })
            .await
            .unwrap();
        let counts = store.experiment_counts(day - 1, day + 1).await.unwrap();
        assert_eq!(
            counts,
            vec![
                ArmCounts {
                    arm: "v1".into(),
                    impressions: 3,
                    clicks: 1,
                    add_to_carts: 0,
                    purchases: 1,
                },
                ArmCounts {
                    arm: "v2".into(),
                    impressions: 1,
                    clicks: 0,
                    add_to_carts: 1,
                    purchases: 0,
                },
            ]
        );
        assert!(store
            .experiment_counts(day + 2, day + 9)
            .await
            .unwrap()
            .is_empty());

        // Impression tallies: a row per arm, day and partition; read back as written,
        // never moved back to an earlier offset, and summed into the counts with the
        // impression rows above.
        let tally = |arm: &str, d, partition, impressions, through_offset| ImpressionTally {
            arm: arm.into(),
            day: d,
            source_partition: partition,
            impressions,
            through_offset,
        };
        assert_eq!(store.impression_tally("v1", day, 0).await.unwrap(), None);
        store
            .write(WriteBatch {
                impression_tallies: vec![
                    tally("v1", day, 0, 5, 40),
                    tally("v1", day, 1, 2, 7),
                    tally("v3", day + 1, 0, 4, 41),
                    tally("v3", day + 5, 0, 9, 60),
                ],
                ..Default::default()
            })
            .await
            .unwrap();
        // A stale writer (an older offset) loses; a newer one wins.
        store
            .write(WriteBatch {
                impression_tallies: vec![tally("v1", day, 0, 3, 20), tally("v1", day, 1, 6, 9)],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            store.impression_tally("v1", day, 0).await.unwrap(),
            Some(tally("v1", day, 0, 5, 40))
        );
        assert_eq!(
            store.impression_tally("v1", day, 1).await.unwrap(),
            Some(tally("v1", day, 1, 6, 9))
        );
        assert_eq!(store.impression_tally("v1", day, 2).await.unwrap(), None);
        let counts = store.experiment_counts(day - 1, day + 1).await.unwrap();
        let impressions: Vec<(&str, u64)> = counts
            .iter()
            .map(|c| (c.arm.as_str(), c.impressions))
            .collect();
        assert_eq!(impressions, vec![("v1", 3 + 5 + 6), ("v2", 1), ("v3", 4)]);
        assert_eq!(counts[0].clicks, 1);
        assert_eq!(counts[2].clicks, 0);
    }
}
