//! gen-recommendations: consumes `user-vectors`, finds the nearest available products
//! the user has not touched (HNSW over the catalog embeddings), and emits a list to
//! `recommendations`. Users with no signal yet get the popularity list, marked as such.
//! It also keeps stream-maintained popularity and publishes it as the list of
//! `__popular__`, which the API serves to users it has never seen.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use recpipe_shared::catalog::Catalog;
use recpipe_shared::events::{
    now_ms, Fallback, RecommendationRecord, UserVectorRecord, POPULAR_USER_ID,
};
use recpipe_shared::kafka::framework::{
    self, Decoded, Outcome, Output, Processor, RecordMeta, RetryableError, RunStats,
};
use recpipe_shared::model::{recommendation_id, Popularity, Recommender};
use recpipe_shared::settings::{Settings, Topics};
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "gen-recommendations";

pub struct GenRecommendations {
    recommender: Arc<Recommender>,
    popularity: Popularity,
    model_version: String,
    list_len: usize,
    topics: Topics,
    publish_every: Duration,
    last_publish: Option<Instant>,
    popularity_changed: bool,
}

impl GenRecommendations {
    pub fn new(recommender: Arc<Recommender>, settings: &Settings) -> Self {
        GenRecommendations {
            popularity: Popularity::new(
                settings.model.popularity_half_life_hours,
                settings.model.weights.clone(),
            ),
            // A trained model names its own version; a bare catalog takes the configured one.
            model_version: recommender
                .catalog()
                .model_version()
                .unwrap_or(&settings.model.version)
                .to_string(),
            list_len: settings.model.list_len,
            topics: settings.kafka.topics.clone(),
            publish_every: Duration::from_millis(settings.model.popularity_publish_ms),
            last_publish: None,
            popularity_changed: false,
            recommender,
        }
    }

    /// The list for one user state: personalised, or popularity when the vector is empty.
    pub fn list_for(&self, user: &UserVectorRecord) -> RecommendationRecord {
        let (items, fallback) = match self.recommender.recommend(user, self.list_len) {
            Some(items) => (items, None),
            None => {
                let catalog = self.recommender.catalog();
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
        RecommendationRecord {
            recommendation_id: recommendation_id(&user.user_id, user.version, &self.model_version),
            user_id: user.user_id.clone(),
            model_version: self.model_version.clone(),
            fallback,
            items,
            user_version: user.version,
            source_event_id: Some(user.last_event.event_id.clone()),
            source_event_ts: Some(user.last_event.ts),
            generated_at: now_ms(),
        }
    }

    fn output(&self, list: &RecommendationRecord) -> Output {
        Output {
            topic: self.topics.recommendations.clone(),
            key: list.user_id.clone(),
            payload: serde_json::to_vec(list).expect("recommendation serialises"),
            partition: None,
        }
    }

    fn popular_list(&self) -> RecommendationRecord {
        let generated_at = now_ms();
        RecommendationRecord {
            recommendation_id: recommendation_id(
                POPULAR_USER_ID,
                generated_at as u64,
                &self.model_version,
            ),
            user_id: POPULAR_USER_ID.to_string(),
            model_version: self.model_version.clone(),
            fallback: Some(Fallback::Popularity),
            items: self
                .popularity
                .top(self.recommender.catalog(), self.list_len, &|_| false),
            user_version: 0,
            source_event_id: None,
            source_event_ts: None,
            generated_at,
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
        let state: UserVectorRecord =
            serde_json::from_slice(payload).map_err(|e| format!("invalid user vector: {e}"))?;
        let dim = self.recommender.catalog().dim();
        if state.vector.len() != dim {
            return Err(format!(
                "user vector has {} dimensions, the catalog {dim}",
                state.vector.len()
            ));
        }
        if state.vector.iter().any(|v| !v.is_finite()) {
            return Err("user vector has a non-finite value".into());
        }
        Ok(state)
    }

    async fn process(
        &mut self,
        batch: Vec<Decoded<UserVectorRecord>>,
    ) -> Result<Vec<Outcome>, RetryableError> {
        // Every state counts toward popularity, but only a user's latest state in the
        // batch needs a list: earlier ones would be overwritten at once.
        let mut latest: HashMap<&str, usize> = HashMap::new();
        for (i, d) in batch.iter().enumerate() {
            latest.insert(&d.input.user_id, i);
            if let Some(p) = d
                .input
                .last_event
                .product_id
                .as_deref()
                .and_then(|p| self.recommender.catalog().index_of(p))
            {
                self.popularity
                    .record(p, d.input.last_event.event_type, d.input.last_event.ts);
                self.popularity_changed = true;
            }
        }
        Ok(batch
            .iter()
            .enumerate()
            .map(|(i, d)| {
                if latest.get(d.input.user_id.as_str()) == Some(&i) {
                    Outcome::Emit(vec![self.output(&self.list_for(&d.input))])
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

/// Loads the catalog and builds the index (HNSW build time is logged: it grows with the
/// catalog, and runs before consuming starts).
pub fn build_recommender(settings: &Settings) -> anyhow::Result<Arc<Recommender>> {
    let catalog = Arc::new(Catalog::load(&settings.catalog.dir)?);
    let started = Instant::now();
    let recommender = Recommender::new(catalog.clone(), &settings.model.hnsw);
    tracing::info!(
        products = catalog.len(),
        dim = catalog.dim(),
        exact = recommender.is_exact(),
        build_ms = started.elapsed().as_millis() as u64,
        "index built"
    );
    Ok(Arc::new(recommender))
}

/// Runs the service until `shutdown` is cancelled.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<RunStats> {
    let s = settings.clone();
    let recommender = tokio::task::spawn_blocking(move || build_recommender(&s)).await??;
    let processor = GenRecommendations::new(recommender, &settings);
    let health = recpipe_shared::admin::Health::new();
    recpipe_shared::admin::spawn(
        settings.telemetry.admin_address.as_deref(),
        health.clone(),
        shutdown.clone(),
    )
    .await?;
    Ok(framework::run_with_health(&settings.kafka, processor, shutdown, health).await?)
}
