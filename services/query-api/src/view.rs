//! The latest list of every user, held in memory so that a GET needs no store read.
//!
//! A follower thread consumes every partition of `recommendations` starting at the
//! offsets save-worker has committed: every list before them is already in the store, so
//! the view and the store together always hold each user's newest list. A GET for a user
//! the view lacks reads the store and offers what it finds to the view. Newest means the
//! highest (user version, generated at), the order the store uses.
//!
//! At start the API also loads the ids of the users the store has lists for (when they
//! fit the view's bound): a user in neither that set nor the view has no list, and is
//! answered without a store read, so a restarted API is not slow for its first seconds
//! while every asker's first GET reads the store. The set stays valid only while the
//! view refuses no list for want of room.
//!
//! Each entry also keeps the last answer made from its list, encoded, so that repeated
//! GETs of one user (page views) encode nothing: it is made again when `k` or the model
//! serving the list changes.
//!
//! A list from the topic is kept as it came and decoded by the first GET that needs it:
//! most lists are replaced before anyone asks (a user's list changes with each batch of
//! their events), and decoding every one, its ids each an allocation, took as much CPU
//! as the API's GETs and POSTs together at 7,208 events/s.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use axum::body::Bytes;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use recpipe_shared::events::RecommendationRecord;
use recpipe_shared::kafka::EndOfPartitionIsNoError;
use recpipe_shared::list_record::{self, ListRecordError};
use recpipe_shared::model::ServedModel;
use recpipe_shared::settings::Settings;
use tokio_util::sync::CancellationToken;

/// A user's latest list, and the last answer made from it.
pub struct ViewEntry {
    /// What orders the lists of one user (see [`is_newer`]), read when the entry is made.
    user_id: String,
    user_version: u64,
    generated_at: i64,
    /// The list as it came from the topic, until decoded (then dropped: an entry holds
    /// one form or the other).
    encoded: Mutex<Option<Bytes>>,
    /// The decoded list, or `None` if it could not be decoded (logged when found).
    list: OnceLock<Option<Arc<RecommendationRecord>>>,
    rendered: ArcSwapOption<Rendered>,
}

/// An answer as sent, and what it was made for.
pub struct Rendered {
    pub k: usize,
    /// The model whose catalog gave titles and availability (weak: a swapped-out model
    /// must not be kept alive by cached answers; the weak reference still holds the
    /// allocation, so no later model can reuse its address and pass for it).
    model: Weak<ServedModel>,
    /// Whom the answer was made for: the body's first field.
    made_for: String,
    pub fallback: Option<recpipe_shared::events::Fallback>,
    /// Only the encoded answer is kept, not the response it was encoded from: that
    /// response, its items' strings each an allocation, was half of a kept answer's 5 KB.
    pub body: Bytes,
    /// `recpipe_recommendations_served_total` for this answer's kind and model version,
    /// registered once here rather than looked up by its labels on every GET.
    pub served: metrics::Counter,
    /// The impression each GET of this answer records, encoded but for its own fields.
    pub impression: crate::routes::ImpressionTemplate,
}

impl Rendered {
    /// The body as sent to `user_id`: this one, or (for a list shared by users, such as
    /// the popularity list) this one with `user_id` in place of the id it was made for.
    /// The id is the body's first field, so the rest is copied untouched.
    pub fn body_for(&self, user_id: &str) -> Bytes {
        if self.made_for == user_id {
            return self.body.clone();
        }
        let made_for = serde_json::to_string(&self.made_for).expect("a string");
        let rest = &self.body[USER_ID_FIELD.len() + made_for.len()..];
        let id = serde_json::to_string(user_id).expect("a string");
        let mut body = Vec::with_capacity(USER_ID_FIELD.len() + id.len() + rest.len());
        body.extend_from_slice(USER_ID_FIELD.as_bytes());
        body.extend_from_slice(id.as_bytes());
        body.extend_from_slice(rest);
        Bytes::from(body)
    }

    pub fn new(
        response: crate::routes::RecommendationsResponse,
        k: usize,
        model: &Arc<ServedModel>,
    ) -> Rendered {
        let body = serde_json::to_vec(&response).expect("response serialises");
        debug_assert!(body.starts_with(USER_ID_FIELD.as_bytes()));
        let kind = response
            .fallback
            .map_or("personalised", recpipe_shared::events::Fallback::as_str);
        let served = metrics::counter!("recpipe_recommendations_served_total", "kind" => kind, "version" => response.model_version.clone());
        let impression = crate::routes::ImpressionTemplate::new(&response);
        Rendered {
            k,
            model: Arc::downgrade(model),
            made_for: response.user_id,
            fallback: response.fallback,
            body: Bytes::from(body),
            served,
            impression,
        }
    }
}

/// How an answer begins (`RecommendationsResponse`'s first field).
const USER_ID_FIELD: &str = "{\"user_id\":";

impl ViewEntry {
    /// An entry for a list already decoded (one read from the store).
    pub fn new(list: Arc<RecommendationRecord>) -> Arc<ViewEntry> {
        Arc::new(ViewEntry {
            user_id: list.user_id.clone(),
            user_version: list.user_version,
            generated_at: list.generated_at,
            encoded: Mutex::new(None),
            list: OnceLock::from(Some(list)),
            rendered: ArcSwapOption::empty(),
        })
    }

    /// An entry for a list as the topic has it (either encoding: list_record), of which
    /// only the user and the list's order are read now ([`list_record::summary`]: the
    /// binary form has them first, JSON is scanned). Fails when even those are not there;
    /// a list whose other fields are wrong fails when first used ([`Self::list`]).
    pub fn from_record(encoded: &[u8]) -> Result<Arc<ViewEntry>, ListRecordError> {
        let header = list_record::summary(encoded)?;
        Ok(Arc::new(ViewEntry {
            user_id: header.user_id.into_owned(),
            user_version: header.user_version,
            generated_at: header.generated_at,
            encoded: Mutex::new(Some(Bytes::copy_from_slice(encoded))),
            list: OnceLock::new(),
            rendered: ArcSwapOption::empty(),
        }))
    }

    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// The list, decoded by the first call. `None` if it cannot be decoded (logged once):
    /// save-worker dead-letters such a record, so the store has the user's last good list.
    pub fn list(&self) -> Option<&Arc<RecommendationRecord>> {
        self.list
            .get_or_init(|| {
                let encoded = self
                    .encoded
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take()
                    .unwrap_or_default();
                list_record::decode(&encoded)
                    .map(Arc::new)
                    .inspect_err(|e| {
                        tracing::warn!(user_id = self.user_id, error = %e, "a list in the view cannot be decoded; the store answers for it");
                    })
                    .ok()
            })
            .as_ref()
    }

    /// The answer made earlier for `k` from `model`, if any.
    pub fn rendered(&self, k: usize, model: &Arc<ServedModel>) -> Option<Arc<Rendered>> {
        self.rendered
            .load_full()
            .filter(|r| r.k == k && std::ptr::eq(r.model.as_ptr(), Arc::as_ptr(model)))
    }

    pub fn keep_rendered(&self, rendered: Arc<Rendered>) {
        self.rendered.store(Some(rendered));
    }
}

/// What the view knows of a user.
pub enum Lookup {
    /// Not held: ask the store.
    Unknown,
    /// The store had no list for them when asked, and none has come on the topic since.
    NoList,
    Present(Arc<ViewEntry>),
}

enum Slot {
    NoList,
    Present(Arc<ViewEntry>),
}

pub struct ListView {
    lists: DashMap<String, Slot>,
    max_users: usize,
    /// The follower has read every partition to the end it saw at start.
    caught_up: AtomicBool,
    applied: AtomicU64,
    /// The users with a list in the store, read after the follower's start offsets were
    /// taken: every list is either among these users' or comes through the follower.
    stored_users: OnceLock<HashSet<Box<str>>>,
    /// A list was refused for want of room: a user outside `stored_users` may then have
    /// a list the view does not hold, so that set no longer says who has none.
    refused_for_room: AtomicBool,
}

impl ListView {
    pub fn new(max_users: usize) -> ListView {
        ListView {
            lists: DashMap::new(),
            max_users,
            caught_up: AtomicBool::new(false),
            applied: AtomicU64::new(0),
            stored_users: OnceLock::new(),
            refused_for_room: AtomicBool::new(false),
        }
    }

    /// Takes the users the store has lists for (read once the follower's start offsets
    /// were taken). From then on a user in neither the view nor this set has no list.
    pub fn know_stored_users(&self, users: Vec<String>) {
        let _ = self
            .stored_users
            .set(users.into_iter().map(String::into_boxed_str).collect());
    }

    pub fn get(&self, user_id: &str) -> Option<Arc<ViewEntry>> {
        match self.lookup(user_id) {
            Lookup::Present(entry) => Some(entry),
            _ => None,
        }
    }

    pub fn lookup(&self, user_id: &str) -> Lookup {
        match self.lists.get(user_id).as_deref() {
            None => match self.stored_users.get() {
                Some(stored)
                    if !stored.contains(user_id)
                        && !self.refused_for_room.load(Ordering::Acquire) =>
                {
                    Lookup::NoList
                }
                _ => Lookup::Unknown,
            },
            Some(Slot::NoList) => Lookup::NoList,
            Some(Slot::Present(entry)) => Lookup::Present(entry.clone()),
        }
    }

    /// Notes that the store has no list for `user_id`, unless a list arrived meanwhile
    /// (checked under the map's lock, so a list from the topic is never hidden). A list
    /// stored before the follower's start is in the store, and every later one comes
    /// through the follower, which replaces this mark: unknown users stop costing a
    /// store read per GET.
    pub fn note_no_list(&self, user_id: &str) {
        if self.lists.len() >= self.max_users {
            return;
        }
        if let Entry::Vacant(slot) = self.lists.entry(user_id.to_string()) {
            slot.insert(Slot::NoList);
        }
    }

    /// Keeps `entry` if its list is newer than the one held for its user (and, for a user
    /// not held yet, if there is room). Returns whether it was kept.
    pub fn offer(&self, entry: Arc<ViewEntry>) -> bool {
        // The length is read before the shard lock is taken (DashMap's len locks every
        // shard), so the bound may be passed by a few concurrent inserts.
        let full = self.lists.len() >= self.max_users;
        match self.lists.entry(entry.user_id.clone()) {
            Entry::Occupied(mut held) => {
                let newer = match held.get() {
                    Slot::NoList => true,
                    Slot::Present(current) => is_newer(&entry, current),
                };
                if newer {
                    held.insert(Slot::Present(entry));
                }
                newer
            }
            Entry::Vacant(slot) if !full => {
                slot.insert(Slot::Present(entry));
                true
            }
            Entry::Vacant(_) => {
                self.refused_for_room.store(true, Ordering::Release);
                false
            }
        }
    }

    pub fn users(&self) -> usize {
        self.lists.len()
    }

    pub fn is_caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Relaxed)
    }

    /// Lists taken from the topic so far.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }
}

fn is_newer(list: &ViewEntry, than: &ViewEntry) -> bool {
    (list.user_version, list.generated_at) > (than.user_version, than.generated_at)
}

/// Starts following `recommendations` into `view` on a thread of its own, until
/// `shutdown`. Fails only if the topic cannot be read at all.
pub fn follow(
    view: Arc<ListView>,
    settings: &Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let kafka = &settings.kafka;
    let topic = kafka.topics.recommendations.clone();
    let consumer: BaseConsumer<EndOfPartitionIsNoError> =
        recpipe_shared::kafka::consumer_config(kafka)
            // Assigned, never subscribed: the group is only a label, and nothing is committed.
            .set("group.id", format!("{}-query-api-view", kafka.group_prefix))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", kafka.fetch_wait_max_ms.to_string())
            .create_with_context(EndOfPartitionIsNoError {
                reader: "list view",
            })?;
    let partitions: Vec<i32> = consumer
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("cannot reach Kafka at {}: {e}", kafka.brokers))?
        .topics()
        .first()
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    anyhow::ensure!(
        !partitions.is_empty(),
        "the topic {topic:?} does not exist: create the pipeline's topics (recpipe-admin topics create)"
    );
    let start = persisted_offsets(settings, &topic, &partitions)?;
    consumer.assign(&start)?;
    tracing::info!(
        topic,
        partitions = partitions.len(),
        "following the latest lists"
    );
    let users = metrics::gauge!("recpipe_view_users");
    // From a list's production to its arrival here: the last hop of freshness.
    let record_wait_seconds =
        metrics::histogram!("recpipe_record_wait_seconds", "service" => "query-api-view");
    std::thread::Builder::new()
        .name("list-view".into())
        .spawn(move || {
            let mut at_end = std::collections::HashSet::new();
            let mut followed = partitions.clone();
            let mut checked = std::time::Instant::now();
            while !shutdown.is_cancelled() {
                // Partitions added to the topic later carry lists of users that moved
                // there; following them from their start keeps those users current.
                if checked.elapsed() >= PARTITION_CHECK {
                    checked = std::time::Instant::now();
                    follow_new_partitions(&consumer, &topic, &mut followed);
                }
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => {
                        let now = recpipe_shared::events::now_ms();
                        if let Some(waited) = recpipe_shared::kafka::record_wait_seconds(&m, now) {
                            record_wait_seconds.record(waited);
                        }
                        let Some(payload) = m.payload() else { continue };
                        match ViewEntry::from_record(payload) {
                            Ok(entry) => {
                                view.offer(entry);
                                view.applied.fetch_add(1, Ordering::Relaxed);
                            }
                            // save-worker dead-letters it; here it is only skipped.
                            Err(e) => {
                                tracing::warn!(offset = m.offset(), error = %e, "list skipped")
                            }
                        }
                    }
                    Some(Err(rdkafka::error::KafkaError::PartitionEOF(p)))
                        if at_end.insert(p) && at_end.len() == partitions.len() =>
                    {
                        view.caught_up.store(true, Ordering::Relaxed);
                        tracing::info!(users = view.users(), "list view caught up");
                    }
                    Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {}
                    Some(Err(e)) => tracing::warn!(error = %e, "list view: kafka error"),
                    None => {}
                }
                users.set(view.users() as f64);
            }
        })?;
    Ok(())
}

/// How often the follower looks for partitions added to the topic.
const PARTITION_CHECK: Duration = Duration::from_secs(30);

/// Assigns, from their beginning, the partitions of `topic` not yet in `followed`.
fn follow_new_partitions<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    followed: &mut Vec<i32>,
) {
    let Ok(metadata) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) else {
        return; // the next check tries again
    };
    let mut added = TopicPartitionList::new();
    for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
        if !followed.contains(&p.id())
            && added
                .add_partition_offset(topic, p.id(), Offset::Beginning)
                .is_ok()
        {
            followed.push(p.id());
        }
    }
    if added.count() > 0 {
        match consumer.incremental_assign(&added) {
            Ok(()) => tracing::info!(topic, added = added.count(), "following new partitions"),
            Err(e) => {
                tracing::warn!(error = %e, "new partitions not followed; retrying");
                followed.retain(|p| added.find_partition(topic, *p).is_none());
            }
        }
    }
}

/// Where save-worker's group stands on `topic`: lists before these offsets are stored.
/// A partition it never committed starts from the beginning.
fn persisted_offsets(
    settings: &Settings,
    topic: &str,
    partitions: &[i32],
) -> anyhow::Result<TopicPartitionList> {
    let kafka = &settings.kafka;
    let group = format!("{}-{}", kafka.group_prefix, SAVE_WORKER);
    // Only asks the group's committed offsets; it does not join the group.
    let reader: BaseConsumer = recpipe_shared::kafka::consumer_config(kafka)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut wanted = TopicPartitionList::new();
    for &p in partitions {
        wanted.add_partition(topic, p);
    }
    let committed = reader
        .committed_offsets(wanted, Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("cannot read {group}'s committed offsets: {e}"))?;
    let mut start = TopicPartitionList::new();
    for e in committed.elements() {
        let offset = match e.offset() {
            Offset::Offset(n) => Offset::Offset(n),
            _ => Offset::Beginning,
        };
        start.add_partition_offset(topic, e.partition(), offset)?;
    }
    Ok(start)
}

/// save-worker's service name, which names its consumer group (`save_worker::SERVICE`:
/// the API does not link save-worker; a test checks they agree).
const SAVE_WORKER: &str = "save-worker";

#[cfg(test)]
mod tests {
    use super::*;
    use recpipe_shared::events::ScoredProduct;
    use recpipe_shared::list_record::ListEncoding;

    fn list(user: &str, version: u64, generated_at: i64) -> Arc<ViewEntry> {
        ViewEntry::new(Arc::new(RecommendationRecord {
            recommendation_id: format!("{user}-{version}-{generated_at}"),
            user_id: user.into(),
            model_version: "v1".into(),
            fallback: None,
            items: vec![ScoredProduct {
                product_id: "p-00001".into(),
                score: 1.0,
                because: None,
            }],
            user_version: version,
            source_event_id: None,
            source_event_ts: None,
            generated_at,
            source: None,
            input_event_ids: Vec::new(),
        }))
    }

    #[test]
    fn keeps_the_newest_list_whatever_order_they_come_in() {
        let view = ListView::new(10);
        assert!(view.offer(list("u", 2, 100)));
        assert!(
            !view.offer(list("u", 1, 500)),
            "an older version is refused"
        );
        assert!(
            !view.offer(list("u", 2, 100)),
            "the same list again changes nothing"
        );
        assert!(view.offer(list("u", 2, 200)), "same version, made later");
        assert!(view.offer(list("u", 3, 50)));
        assert_eq!(
            view.get("u").unwrap().list().unwrap().recommendation_id,
            "u-3-50"
        );
        assert!(view.get("other").is_none());
    }

    #[test]
    fn a_list_from_the_topic_is_ordered_on_arrival_and_decoded_when_asked_for() {
        let made = list("u \"q\" ü", 4, 9);
        let mut full = (**made.list().unwrap()).clone();
        full.input_event_ids = vec!["e-1".into(), "e-2".into()];
        let json = serde_json::to_vec(&full).unwrap();
        for encoding in [ListEncoding::Json, ListEncoding::Binary] {
            let entry = ViewEntry::from_record(&list_record::encode(&full, encoding)).unwrap();
            assert_eq!(entry.user_id(), "u \"q\" ü", "an escaped id is read whole");
            assert_eq!((entry.user_version, entry.generated_at), (4, 9));
            assert!(entry.list.get().is_none(), "nothing decoded on arrival");
            assert_eq!(**entry.list().unwrap(), full);
        }

        let view = ListView::new(10);
        assert!(view.offer(ViewEntry::from_record(&json).unwrap()));
        let older = list("u \"q\" ü", 4, 8);
        assert!(
            !view.offer(older),
            "ordered by the header's version and time"
        );
        let mut newer = full.clone();
        newer.generated_at = 10;
        assert!(view.offer(ViewEntry::from_record(&serde_json::to_vec(&newer).unwrap()).unwrap()));

        let mut bad = serde_json::to_value(&full).unwrap();
        bad["items"] = 7.into();
        let bad = ViewEntry::from_record(&serde_json::to_vec(&bad).unwrap()).unwrap();
        assert!(bad.list().is_none(), "decoding fails when first asked");
        assert!(bad.list().is_none(), "and stays failed");
        // A binary list damaged after its header: taken, and refused when first asked.
        let binary = list_record::encode(&full, ListEncoding::Binary);
        let bad = ViewEntry::from_record(&binary[..binary.len() - 1]).unwrap();
        assert!(bad.list().is_none());
        assert!(ViewEntry::from_record(&binary[..4]).is_err(), "no header");
        for missing in ["user_id", "user_version", "generated_at"] {
            let mut partial = serde_json::to_value(&full).unwrap();
            partial.as_object_mut().unwrap().remove(missing);
            assert!(
                ViewEntry::from_record(&serde_json::to_vec(&partial).unwrap()).is_err(),
                "{missing}"
            );
        }
    }

    fn is_no_list(view: &ListView, user: &str) -> bool {
        matches!(view.lookup(user), Lookup::NoList)
    }

    #[test]
    fn users_outside_the_stored_set_have_no_list_until_one_comes() {
        let view = ListView::new(10);
        assert!(
            !is_no_list(&view, "x"),
            "before the set is known, the store is asked"
        );
        view.know_stored_users(vec!["stored".into()]);
        assert!(is_no_list(&view, "x"));
        assert!(
            matches!(view.lookup("stored"), Lookup::Unknown),
            "a user with a stored list is read from the store"
        );
        assert!(view.offer(list("x", 1, 1)));
        assert!(view.get("x").is_some(), "a list from the topic is served");
    }

    #[test]
    fn a_list_refused_for_room_makes_the_stored_set_no_proof_of_no_list() {
        let view = ListView::new(1);
        view.know_stored_users(Vec::new());
        assert!(view.offer(list("a", 1, 1)));
        assert!(is_no_list(&view, "b"));
        assert!(!view.offer(list("b", 1, 1)), "no room");
        assert!(
            matches!(view.lookup("b"), Lookup::Unknown),
            "b has a list the view could not keep: ask the store"
        );
    }

    fn served_model(version: &str) -> Arc<ServedModel> {
        use recpipe_shared::catalog::{generate, SyntheticCatalog};
        use recpipe_shared::model::Recommender;
        let catalog = Arc::new(generate(SyntheticCatalog {
            products: 50,
            dim: 4,
            ..Default::default()
        }));
        Arc::new(ServedModel {
            version: version.into(),
            path: "unused".into(),
            share: 1.0,
            recommender: Arc::new(Recommender::new(catalog, &Default::default())),
        })
    }

    fn response(entry: &ViewEntry) -> crate::routes::RecommendationsResponse {
        let list = entry.list().unwrap();
        crate::routes::RecommendationsResponse {
            user_id: list.user_id.clone(),
            recommendation_id: list.recommendation_id.clone(),
            model_version: list.model_version.clone(),
            fallback: None,
            generated_at: list.generated_at,
            source_event_id: None,
            items: Vec::new(),
        }
    }

    #[test]
    fn an_answer_is_reused_only_for_the_same_k_and_model() {
        let (v1, v2) = (served_model("v1"), served_model("v1"));
        let entry = list("u", 1, 1);
        assert!(entry.rendered(10, &v1).is_none());
        entry.keep_rendered(Arc::new(Rendered::new(response(&entry), 10, &v1)));
        let again = entry.rendered(10, &v1).expect("same k, same model");
        assert!(std::str::from_utf8(&again.body)
            .unwrap()
            .contains("\"u-1-1\""));
        assert!(entry.rendered(5, &v1).is_none(), "another k");
        assert!(
            entry.rendered(10, &v2).is_none(),
            "another model (same version name, e.g. a republished catalog)"
        );
        drop(v1);
        assert!(
            entry.rendered(10, &v2).is_none(),
            "a dropped model is not kept alive, and matches nothing"
        );
    }

    #[test]
    fn a_shared_answer_names_whoever_asks() {
        let model = served_model("v1");
        let entry = list("__popular__", 0, 7);
        let mut made = response(&entry);
        made.user_id = "first-asker".into();
        let made_json = serde_json::to_value(&made).unwrap();
        let rendered = Rendered::new(made, 10, &model);
        for asker in ["first-asker", "someone \"else\" ü", ""] {
            let body: serde_json::Value =
                serde_json::from_slice(&rendered.body_for(asker)).unwrap();
            let mut expected = made_json.clone();
            expected["user_id"] = asker.into();
            assert_eq!(body, expected, "{asker}");
        }
    }

    #[tokio::test]
    async fn partitions_added_later_are_followed_from_their_start() {
        use recpipe_shared::testkit::{produce, TestEnv};
        let env = TestEnv::start().await;
        let topic = env.settings.kafka.topics.recommendations.clone();
        for u in 0..12 {
            let l = list(&format!("user-{u}"), 1, 1);
            produce(
                &env.broker.brokers(),
                &topic,
                l.user_id(),
                &serde_json::to_vec(&**l.list().unwrap()).unwrap(),
            )
            .await;
        }
        let (kafka, topic2) = (env.settings.kafka.clone(), topic.clone());
        let got = tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = recpipe_shared::kafka::client_config(&kafka)
                .set("group.id", "view-test")
                .set("enable.auto.commit", "false")
                .create()
                .unwrap();
            // As if the topic had one partition when the API started.
            let mut start = TopicPartitionList::new();
            start
                .add_partition_offset(&topic2, 0, Offset::Beginning)
                .unwrap();
            consumer.assign(&start).unwrap();
            let mut followed = vec![0];
            follow_new_partitions(&consumer, &topic2, &mut followed);
            followed.sort();
            assert_eq!(followed, vec![0, 1, 2, 3]);
            let mut users = std::collections::BTreeSet::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while users.len() < 12 && std::time::Instant::now() < deadline {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    users.insert(String::from_utf8(m.key().unwrap().to_vec()).unwrap());
                }
            }
            users
        })
        .await
        .unwrap();
        assert_eq!(got.len(), 12, "lists on every partition were read: {got:?}");
    }

    #[test]
    fn follows_save_workers_group() {
        assert_eq!(SAVE_WORKER, save_worker::SERVICE);
    }

    #[test]
    fn a_user_without_a_list_is_noted_until_a_list_comes() {
        let view = ListView::new(10);
        assert!(matches!(view.lookup("u"), Lookup::Unknown));
        view.note_no_list("u");
        assert!(matches!(view.lookup("u"), Lookup::NoList));
        assert!(view.offer(list("u", 1, 1)), "a list replaces the mark");
        view.note_no_list("u");
        assert!(
            matches!(view.lookup("u"), Lookup::Present(e) if e.list().unwrap().user_version == 1),
            "a late 'no list' never hides a list"
        );
    }

    #[test]
    fn holds_at_most_max_users_but_keeps_updating_those_it_holds() {
        let view = ListView::new(2);
        assert!(view.offer(list("a", 1, 1)));
        assert!(view.offer(list("b", 1, 1)));
        assert!(!view.offer(list("c", 1, 1)), "full");
        assert!(view.offer(list("a", 2, 1)), "a held user is still updated");
        assert_eq!(view.users(), 2);
        assert!(view.get("c").is_none());
    }
}
