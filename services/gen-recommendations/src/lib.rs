//! gen-recommendations: consumes `user-vectors`, finds the nearest available products
//! the user has not touched (HNSW over the catalog embeddings), and emits a list to
//! `recommendations`. Users with no signal yet get the popularity list, marked as such.
//! It also keeps stream-maintained popularity and publishes it as the list of
//! `__popular__`, which the API serves to users it has never seen.
//!
//! Models come from a [`ModelRegistry`] that follows the `models` topic: several versions
//! may serve side by side (users split by a stable hash), and a newly published one is
//! built in the background and swapped in between batches. Every list names its version
//! and the events it reflects: the `recommendations` topic is the decision log.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use recpipe_shared::events::{
    now_ms, Fallback, RecommendationRecord, UserVectorRecord, POPULAR_USER_ID,
};
use recpipe_shared::kafka::framework::{
    Decoded, Outcome, Output, Processor, RecordMeta, RetryableError, RunStats,
};
use recpipe_shared::list_record::{self, ListEncoding, ListRef};
use recpipe_shared::model::{
    recommendation_id, vector_from_history, IndexKind, ModelRegistry, Popularity, ServedModel,
};
use recpipe_shared::settings::{Settings, Topics};
use recpipe_shared::state_record;
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "gen-recommendations";

pub struct GenRecommendations {
    models: Arc<ModelRegistry>,
    popularity: Popularity,
    list_len: usize,
    topics: Topics,
    publish_every: Duration,
    last_publish: Option<Instant>,
    popularity_changed: bool,
    /// Threads a batch's lists are made on (`model.search_threads`, 0: one per core).
    search_threads: usize,
    list_encoding: ListEncoding,
}

impl GenRecommendations {
    pub fn new(models: Arc<ModelRegistry>, settings: &Settings) -> Self {
        GenRecommendations {
            popularity: Popularity::new(
                settings.model.popularity_half_life_hours,
                settings.model.weights.clone(),
            ),
            list_len: settings.model.list_len,
            topics: settings.kafka.topics.clone(),
            publish_every: Duration::from_millis(settings.model.popularity_publish_ms),
            last_publish: None,
            popularity_changed: false,
            search_threads: match settings.model.search_threads {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            },
            list_encoding: settings.model.list_encoding,
            models,
        }
    }

    /// The list for one user state from `model`, encoded for `recommendations`:
    /// personalised, or popularity when the state carries no signal the model can use.
    fn list_output(&self, model: &ServedModel, user: &UserVectorRecord) -> Output {
        // Debug: nothing inside logs at info, and a span per list costs its fields' formatting.
        let _span = tracing::debug_span!(
            "list",
            event_id = %user.last_event.event_id,
            user_id = %user.user_id,
            version = %model.version
        )
        .entered();
        let catalog = model.catalog();
        // A vector built with other embeddings means nothing to this model: it works from
        // the user's recent products instead. So does a vector of another length whatever
        // it names (a damaged record), which the search could not score.
        let same_space = user.vector.len() == catalog.dim()
            && user
                .embeddings
                .as_ref()
                .is_none_or(|e| e == catalog.embeddings_id());
        let rebuilt;
        let query = if same_space {
            user
        } else {
            metrics::counter!("recpipe_vectors_rebuilt_total", "version" => model.version.clone())
                .increment(1);
            rebuilt = UserVectorRecord {
                vector: vector_from_history(catalog, &user.recent_products)
                    .unwrap_or_else(|| vec![0.0; catalog.dim()]),
                ..user.clone()
            };
            &rebuilt
        };
        let started = Instant::now();
        let personal = model.recommender.recommend(query, self.list_len);
        metrics::histogram!("recpipe_ann_seconds", "version" => model.version.clone())
            .record(started.elapsed().as_secs_f64());
        let (items, fallback) = match personal {
            Some(items) => (items, None),
            None => {
                let seen: HashSet<usize> = user
                    .recent_products
                    .iter()
                    .chain(&user.purchased)
                    .filter_map(|p| catalog.index_of(p))
                    .collect();
                let items = self
                    .popularity
                    .top(catalog, self.list_len, &|i| seen.contains(&i));
                (items, Some(Fallback::Popularity))
            }
        };
        let kind = fallback.map_or("personalised", Fallback::as_str);
        metrics::counter!("recpipe_lists_total", "version" => model.version.clone(), "kind" => kind)
            .increment(1);
        let list = ListRef {
            recommendation_id: &recommendation_id(&user.user_id, user.version, &model.version),
            user_id: &user.user_id,
            model_version: &model.version,
            fallback,
            items: &items,
            user_version: user.version,
            source_event_id: Some(&user.last_event.event_id),
            source_event_ts: Some(user.last_event.ts),
            generated_at: now_ms(),
            source: Some(user.source),
            input_event_ids: &user.recent_event_ids,
        };
        Output {
            topic: self.topics.recommendations.clone(),
            key: user.user_id.clone(),
            payload: self.encode(&list),
            partition: None,
        }
    }

    fn encode(&self, list: &ListRef) -> Vec<u8> {
        let mut payload = Vec::new();
        list_record::encode_into(list, self.list_encoding, &mut payload);
        payload
    }

    fn output(&self, list: &RecommendationRecord) -> Output {
        Output {
            topic: self.topics.recommendations.clone(),
            key: list.user_id.clone(),
            payload: self.encode(&ListRef::of(list)),
            partition: None,
        }
    }

    fn popular_list(&self) -> RecommendationRecord {
        let generated_at = now_ms();
        let serving = self.models.current();
        let model = serving.primary();
        RecommendationRecord {
            recommendation_id: recommendation_id(
                POPULAR_USER_ID,
                generated_at as u64,
                &model.version,
            ),
            user_id: POPULAR_USER_ID.to_string(),
            model_version: model.version.clone(),
            fallback: Some(Fallback::Popularity),
            items: self
                .popularity
                .top(model.catalog(), self.list_len, &|_| false),
            user_version: 0,
            source_event_id: None,
            source_event_ts: None,
            generated_at,
            source: None,
            input_event_ids: Vec::new(),
        }
    }
}

#[async_trait]
impl Processor for GenRecommendations {
    type Input = UserVectorRecord;

    fn name(&self) -> &str {
        SERVICE
    }

    fn topics(&self) -> Vec<String> {
        vec![self.topics.user_vectors.clone()]
    }

    fn decode(&self, _meta: &RecordMeta, payload: &[u8]) -> Result<UserVectorRecord, String> {
        state_record::decode(payload).map_err(|e| format!("invalid user vector: {e}"))
    }

    async fn process(
        &mut self,
        batch: Vec<Decoded<UserVectorRecord>>,
    ) -> Result<Vec<Outcome>, RetryableError> {
        // One assignment for the whole batch, so a swap falls between batches.
        let serving = self.models.current();
        // Every state counts toward popularity, but only a user's latest state in the
        // batch needs a list: earlier ones would be overwritten at once.
        let mut latest: HashMap<&str, usize> = HashMap::new();
        for (i, d) in batch.iter().enumerate() {
            latest.insert(&d.input.user_id, i);
            // A state stands for its last event and the ones folded into it.
            for e in d.input.folded_events.iter().chain([&d.input.last_event]) {
                if let Some(p) = e.product_id.as_deref() {
                    self.popularity.record(p, e.event_type, e.ts);
                    self.popularity_changed = true;
                }
            }
        }
        let now = now_ms();
        let wanted: Vec<&UserVectorRecord> = batch
            .iter()
            .enumerate()
            .filter(|(i, d)| latest.get(d.input.user_id.as_str()) == Some(i))
            .map(|(_, d)| &d.input)
            .collect();
        let mut lists = map_in_parallel(&wanted, self.search_threads, |user| {
            self.list_output(serving.for_user(&user.user_id), user)
        })
        .into_iter();
        Ok(batch
            .iter()
            .enumerate()
            .map(|(i, d)| {
                if latest.get(d.input.user_id.as_str()) == Some(&i) {
                    // Freshness: event time to list emitted (client clocks permitting).
                    metrics::histogram!("recpipe_freshness_seconds", "stage" => "list_emitted")
                        .record((now - d.input.last_event.ts).max(0) as f64 / 1000.0);
                    Outcome::Emit(vec![lists.next().expect("a list per latest state")])
                } else {
                    Outcome::Emit(Vec::new())
                }
            })
            .collect())
    }

    fn tick(&mut self) -> Vec<Output> {
        let due = self
            .last_publish
            .is_none_or(|t| t.elapsed() >= self.publish_every);
        if !(self.popularity_changed && due) {
            return Vec::new();
        }
        self.popularity_changed = false;
        self.last_publish = Some(Instant::now());
        vec![self.output(&self.popular_list())]
    }
}

/// Fewest lists a batch needs before they are made on several threads: below it, starting
/// the threads costs more than it saves, and a batch of a few lists (ordinary rates) is
/// made at once on the consumer's thread.
const PARALLEL_FROM: usize = 32;

/// `f` over `items` on up to `threads` threads, results in the order of `items`. A
/// backlog's batches carry thousands of users, and their nearest-neighbour searches are
/// independent reads of the same graph: on one thread they bound the whole pipeline.
fn map_in_parallel<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    if threads <= 1 || items.len() < PARALLEL_FROM {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let f = &f;
        let workers: Vec<_> = items
            .chunks(chunk)
            .skip(1)
            .map(|part| scope.spawn(move || part.iter().map(f).collect::<Vec<R>>()))
            .collect();
        // The first share on this thread, while the others run.
        let mut all: Vec<R> = items[..chunk].iter().map(f).collect();
        for worker in workers {
            all.extend(worker.join().expect("a list worker panicked"));
        }
        all
    })
}

/// Runs the service until `shutdown` is cancelled.
pub async fn run(mut settings: Settings, shutdown: CancellationToken) -> anyhow::Result<RunStats> {
    // Under a backlog, bigger batches skip more superseded states (see `lists_batch_max`).
    settings.kafka.batch_max = settings.model.lists_batch_max;
    let models =
        recpipe_shared::kafka::models::start_registry(&settings, IndexKind::Hnsw, shutdown.clone())
            .await?;
    let processor = GenRecommendations::new(models, &settings);
    recpipe_shared::admin::run_service(&settings, processor, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use recpipe_shared::events::{EventType, LastEvent, SourcePosition};
    use recpipe_shared::kafka::framework::RecordMeta;

    fn seen(event_id: &str, event_type: EventType, product: &str) -> LastEvent {
        LastEvent {
            event_id: event_id.into(),
            event_type,
            product_id: Some(product.into()),
            ts: 1_700_000_000_000,
        }
    }

    #[test]
    fn work_mapped_on_several_threads_comes_back_whole_and_in_order() {
        for n in [0, 1, PARALLEL_FROM - 1, PARALLEL_FROM, 1_001] {
            let items: Vec<usize> = (0..n).collect();
            let on_one = map_in_parallel(&items, 1, |i| (i * 3, std::thread::current().id()));
            for threads in [2, 3, 8] {
                let on_many =
                    map_in_parallel(&items, threads, |i| (i * 3, std::thread::current().id()));
                let values = |v: &[(usize, std::thread::ThreadId)]| {
                    v.iter().map(|x| x.0).collect::<Vec<_>>()
                };
                assert_eq!(
                    values(&on_many),
                    values(&on_one),
                    "{n} items, {threads} threads"
                );
                let used: HashSet<_> = on_many.iter().map(|x| x.1).collect();
                // Split only from PARALLEL_FROM items on.
                let expected = if n >= PARALLEL_FROM {
                    threads
                } else {
                    1.min(n)
                };
                assert_eq!(used.len(), expected, "{n} items, {threads} threads");
            }
        }
    }

    #[tokio::test]
    async fn a_batch_of_many_users_gets_the_same_lists_on_several_threads_as_on_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::default();
        settings.catalog.dir = dir.path().join("catalog");
        settings.model.hnsw.exact_below = 0;
        recpipe_shared::testkit::write_catalog(&settings.catalog.dir, 2_000, 8);
        let models = Arc::new(ModelRegistry::from_settings(&settings, IndexKind::Hnsw).unwrap());
        let catalog = models.current().primary().catalog().clone();
        // 300 states of 200 users: each user's latest state gets a list, the rest none.
        let batch = || -> Vec<Decoded<UserVectorRecord>> {
            (0..300u64)
                .map(|n| {
                    let product = |k: u64| format!("p-{:05}", (n * 7 + k) % 2_000);
                    let input = UserVectorRecord {
                        user_id: format!("u{}", n % 200),
                        vector: catalog
                            .embedding(((n * 7) % 2_000) as usize)
                            .iter()
                            .map(|v| v + 0.1)
                            .collect(),
                        anchor_ts: 1_700_000_000_000,
                        version: n,
                        recent_products: vec![product(0), product(1)],
                        purchased: Vec::new(),
                        last_event: seen(&format!("e{n}"), EventType::Click, &product(0)),
                        source: SourcePosition {
                            partition: 0,
                            offset: n as i64,
                        },
                        updated_at: 1_700_000_000_000,
                        embeddings: None,
                        recent_event_ids: vec![format!("e{n}")],
                        folded_events: Vec::new(),
                    };
                    let meta = RecordMeta {
                        topic: "user-vectors".into(),
                        partition: 0,
                        offset: n as i64,
                        key: None,
                    };
                    Decoded { meta, input }
                })
                .collect()
        };
        let lists = |threads: usize| {
            let mut settings = settings.clone();
            settings.model.search_threads = threads;
            let mut generator = GenRecommendations::new(models.clone(), &settings);
            let batch = batch();
            async move {
                let outcomes = generator.process(batch).await.unwrap();
                outcomes
                    .into_iter()
                    .map(|o| match o {
                        Outcome::Emit(out) => out
                            .into_iter()
                            .map(|o| {
                                let mut list: RecommendationRecord =
                                    list_record::decode(&o.payload).unwrap();
                                list.generated_at = 0;
                                (o.key, list)
                            })
                            .collect::<Vec<_>>(),
                        other => panic!("unexpected outcome {other:?}"),
                    })
                    .collect::<Vec<_>>()
            }
        };
        let on_one = lists(1).await;
        let on_two = lists(2).await;
        assert_eq!(on_one, on_two);
        let emitted: Vec<_> = on_two.iter().flatten().collect();
        assert_eq!(emitted.len(), 200, "one list per user");
        for (i, out) in on_two.iter().enumerate() {
            // Users u0..u99 appear at 0..99, 200..299: only the later gets a list.
            let latest = i >= 100;
            assert_eq!(out.len(), usize::from(latest), "state {i}");
            if let [(key, list)] = &out[..] {
                assert_eq!(key, &format!("u{}", i % 200));
                assert_eq!(list.user_version, i as u64);
                assert_eq!(list.items.len(), settings.model.list_len);
                assert!(list.fallback.is_none());
            }
        }
    }

    #[tokio::test]
    async fn popularity_counts_the_events_folded_into_a_state_as_well_as_its_last() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::default();
        settings.catalog.dir = dir.path().join("catalog");
        recpipe_shared::testkit::write_catalog(&settings.catalog.dir, 200, 8);
        let models = ModelRegistry::from_settings(&settings, IndexKind::Hnsw).unwrap();
        let mut generator = GenRecommendations::new(Arc::new(models), &settings);
        let state = UserVectorRecord {
            user_id: "u".into(),
            vector: vec![0.0; 8],
            anchor_ts: 1_700_000_000_000,
            version: 4,
            recent_products: vec!["p-00002".into(), "p-00001".into()],
            purchased: Vec::new(),
            last_event: seen("e4", EventType::View, "p-00002"),
            source: SourcePosition {
                partition: 0,
                offset: 4,
            },
            updated_at: 1_700_000_000_000,
            embeddings: None,
            recent_event_ids: vec!["e4".into(), "e3".into(), "e2".into(), "e1".into()],
            // Three views of p-00001 weigh more than the one of p-00002.
            folded_events: vec![
                seen("e1", EventType::View, "p-00001"),
                seen("e2", EventType::View, "p-00001"),
                seen("e3", EventType::View, "p-00001"),
            ],
        };
        let meta = RecordMeta {
            topic: "user-vectors".into(),
            partition: 0,
            offset: 0,
            key: None,
        };
        let outcomes = generator
            .process(vec![Decoded { meta, input: state }])
            .await
            .unwrap();
        assert!(matches!(&outcomes[..], [Outcome::Emit(out)] if out.len() == 1));
        let published = generator.tick();
        let popular = list_record::decode(&published[0].payload).unwrap();
        assert_eq!(popular.user_id, POPULAR_USER_ID);
        let ids: Vec<&str> = popular
            .items
            .iter()
            .map(|i| i.product_id.as_str())
            .collect();
        assert_eq!(ids, vec!["p-00001", "p-00002"]);
        assert!(popular.items[0].score > 2.5 * popular.items[1].score);
    }

    #[tokio::test]
    async fn a_vector_of_another_length_naming_the_catalog_gets_a_list_from_its_history() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::default();
        settings.catalog.dir = dir.path().join("catalog");
        recpipe_shared::testkit::write_catalog(&settings.catalog.dir, 200, 8);
        let models = Arc::new(ModelRegistry::from_settings(&settings, IndexKind::Hnsw).unwrap());
        let embeddings = models
            .current()
            .primary()
            .catalog()
            .embeddings_id()
            .to_string();
        let mut generator = GenRecommendations::new(models, &settings);
        let state = UserVectorRecord {
            user_id: "u".into(),
            // Three values where the catalog has eight: the exact search would panic.
            vector: vec![0.5; 3],
            anchor_ts: 1_700_000_000_000,
            version: 1,
            recent_products: vec!["p-00002".into()],
            purchased: Vec::new(),
            last_event: seen("e1", EventType::View, "p-00002"),
            source: SourcePosition {
                partition: 0,
                offset: 1,
            },
            updated_at: 1_700_000_000_000,
            embeddings: Some(embeddings),
            recent_event_ids: vec!["e1".into()],
            folded_events: Vec::new(),
        };
        let meta = RecordMeta {
            topic: "user-vectors".into(),
            partition: 0,
            offset: 1,
            key: None,
        };
        let outcomes = generator
            .process(vec![Decoded { meta, input: state }])
            .await
            .unwrap();
        let [Outcome::Emit(out)] = &outcomes[..] else {
            panic!("unexpected outcomes {outcomes:?}");
        };
        let list = list_record::decode(&out[0].payload).unwrap();
        assert!(list.fallback.is_none(), "personalised from its history");
        assert_eq!(list.items.len(), settings.model.list_len);
        assert!(list.items.iter().all(|i| i.product_id != "p-00002"));
    }
}
