//! Building the application from settings, and serving it.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use rdkafka::producer::FutureProducer;
use recpipe_shared::model::{IndexKind, ModelRegistry};
use recpipe_shared::settings::{KafkaSettings, Settings};
use recpipe_shared::store::{self, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::trace::TraceLayer;

/// What every handler shares. Handlers take it by value (axum's `State` clones it per
/// request), so it is one `Arc`: a clone and a drop are one atomic count each, where the
/// nine shared parts on their own cost nine of each, on cache lines both cores write.
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

impl std::ops::Deref for AppState {
    type Target = AppParts;

    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// The parts of [`AppState`], reached through it.
pub struct AppParts {
    pub store: Arc<dyn Store>,
    /// Accepted events, lingering `api.events_linger_ms` to share broker requests.
    pub producer: FutureProducer,
    /// Which POSTs come after a quiet spell and so are flushed at once.
    pub events_quiet: Arc<crate::quiet::QuietSpell>,
    /// Impressions, gathered per partition and produced every
    /// `api.impressions_linger_ms` (nobody waits on them).
    pub impressions: Arc<crate::impressions::ImpressionLog>,
    /// The models served (following the `models` topic): titles, product checks, and the
    /// similar-product and category lists computed at request time.
    pub models: Arc<ModelRegistry>,
    pub keys: Arc<crate::auth::KeyRing>,
    pub settings: Arc<Settings>,
    pub live: Arc<crate::live::LiveStats>,
    /// Every user's latest list, followed from the `recommendations` topic.
    pub view: Arc<crate::view::ListView>,
}

impl AppState {
    /// Opens the store, loads the served models (following the `models` topic until
    /// `shutdown`) and creates the Kafka producer.
    pub async fn build(
        settings: Settings,
        shutdown: CancellationToken,
    ) -> anyhow::Result<AppState> {
        let store = store::open_with(&settings.store.url, &settings.store).await?;
        let models = recpipe_shared::kafka::models::start_registry(
            &settings,
            IndexKind::Hnsw,
            shutdown.clone(),
        )
        .await?;
        let view = Arc::new(crate::view::ListView::new(settings.api.view_max_users));
        {
            let (view, settings) = (view.clone(), settings.clone());
            tokio::task::spawn_blocking(move || crate::view::follow(view, &settings, shutdown))
                .await??;
        }
        // After the follower took its start offsets: every list is then in the store's
        // set or comes through the follower.
        load_stored_users(&view, &*store, settings.api.view_max_users).await;
        let producer = recpipe_shared::kafka::producer(&KafkaSettings {
            linger_ms: settings.api.events_linger_ms,
            ..settings.kafka.clone()
        })?;
        let impressions = {
            let producer = recpipe_shared::kafka::producer(
                &crate::impressions::producer_settings(&settings.kafka),
            )?;
            let topic = settings.kafka.topics.impressions.clone();
            let partitions = {
                let (producer, topic) = (producer.clone(), topic.clone());
                tokio::task::spawn_blocking(move || {
                    crate::impressions::partition_count(&producer, &topic)
                })
                .await??
            };
            crate::impressions::ImpressionLog::start(
                producer,
                topic,
                partitions,
                Duration::from_millis(settings.api.impressions_linger_ms),
                settings.kafka.max_record_bytes,
            )
        };
        let keys = Arc::new(crate::auth::KeyRing::from_settings(&settings.api)?);
        if keys.is_open() {
            tracing::warn!("POST /v1/events accepts requests without an API key: set api.api_keys (RECPIPE_API__API_KEYS) in production");
        }
        Ok(AppState(Arc::new(AppParts {
            keys,
            store,
            producer,
            events_quiet: Arc::new(crate::quiet::QuietSpell::new(Duration::from_millis(
                settings.api.events_linger_ms,
            ))),
            impressions,
            models,
            settings: Arc::new(settings),
            live: Arc::new(crate::live::LiveStats::new()),
            view,
        })))
    }
}

/// Tells `view` which users the store has lists for, so that others cost no store read.
/// Skipped, with the reason logged, when there are more than the view holds or the
/// store is slow to list them: those users are then read from the store on first ask.
async fn load_stored_users(view: &crate::view::ListView, store: &dyn Store, max_users: usize) {
    let started = std::time::Instant::now();
    match tokio::time::timeout(STORED_USERS_WAIT, store.users_with_lists(max_users)).await {
        Ok(Ok(Some(users))) => {
            let count = users.len();
            view.know_stored_users(users);
            tracing::info!(
                users = count,
                ms = started.elapsed().as_millis() as u64,
                "users with stored lists loaded: others get the popularity list without a store read"
            );
        }
        Ok(Ok(None)) => tracing::info!(
            max_users,
            "more users have stored lists than api.view_max_users: each one's first GET reads the store"
        ),
        Ok(Err(e)) => tracing::warn!(
            error = %e,
            "users with stored lists not loaded: each user's first GET reads the store"
        ),
        Err(_) => tracing::warn!(
            seconds = STORED_USERS_WAIT.as_secs(),
            "listing the users with stored lists took too long: each user's first GET reads the store"
        ),
    }
}

/// How long start-up may spend listing the users with stored lists.
const STORED_USERS_WAIT: Duration = Duration::from_secs(30);

pub fn router(state: AppState) -> Router {
    let max_body = state.settings.api.max_body_bytes;
    recpipe_shared::admin::metrics();
    // No origins configured: no CORS layer at all (it would only add `Vary` headers to
    // every answer, at a cost on every GET).
    let cors = (!state.settings.api.cors_origins.is_empty())
        .then(|| cors_layer(&state.settings.api.cors_origins));
    // GET recommendations is most of the traffic, and the layers cost about a tenth of
    // its CPU (perf, BENCHMARKS.md): it takes no body to limit, counts and times itself
    // under the same metric names, and is not traced per request. Only CORS applies.
    let others = crate::routes::routes(state.clone())
        .route_layer(axum::middleware::from_fn(record_request))
        .layer(RequestBodyLimitLayer::new(max_body))
        .layer(TraceLayer::new_for_http());
    crate::routes::recommendations_route()
        .merge(others)
        .with_state(state)
        .layer(tower::util::option_layer(cors))
}

/// CORS for the configured origins (none: no CORS headers, browsers refuse cross-origin).
fn cors_layer(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    let layer = CorsLayer::new().allow_methods(Any).allow_headers(Any);
    if origins.iter().any(|o| o == "*") {
        return layer.allow_origin(Any);
    }
    let list: Vec<axum::http::HeaderValue> =
        origins.iter().filter_map(|o| o.parse().ok()).collect();
    layer.allow_origin(AllowOrigin::list(list))
}

/// Counts requests by route and status, and times them.
async fn record_request(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .cloned();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let route = route.as_ref().map_or("unmatched", |p| p.as_str());
    let (requests, seconds) = request_metrics(route, response.status().as_u16());
    requests.increment(1);
    seconds.record(started.elapsed().as_secs_f64());
    response
}

/// The request counter and timer of a route and status, registered on first use and
/// then reused: looking a metric up by its labels on every request cost more than the
/// GET's own work once answers came from memory.
pub(crate) fn request_metrics(route: &str, status: u16) -> (metrics::Counter, metrics::Histogram) {
    type ByStatus = Vec<(u16, metrics::Counter, metrics::Histogram)>;
    static HANDLES: std::sync::OnceLock<dashmap::DashMap<String, ByStatus>> =
        std::sync::OnceLock::new();
    let handles = HANDLES.get_or_init(Default::default);
    let find = |by_status: &ByStatus| {
        by_status
            .iter()
            .find(|(s, _, _)| *s == status)
            .map(|(_, c, h)| (c.clone(), h.clone()))
    };
    if let Some(found) = handles.get(route).and_then(|r| find(&r)) {
        return found;
    }
    let mut by_status = handles.entry(route.to_string()).or_default();
    find(&by_status).unwrap_or_else(|| {
        let counter = metrics::counter!("recpipe_http_requests_total", "route" => route.to_string(), "status" => status.to_string());
        let seconds = metrics::histogram!("recpipe_http_request_seconds", "route" => route.to_string());
        by_status.push((status, counter.clone(), seconds.clone()));
        (counter, seconds)
    })
}

/// Serves the API on `listener` until `shutdown` is cancelled, then lets in-flight
/// requests finish.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let (producer, impressions) = (state.producer.clone(), state.impressions.clone());
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    // Accepted events (and the impressions served) must reach Kafka before the process
    // exits.
    impressions.close().await;
    use rdkafka::producer::Producer;
    let _ = producer.flush(Duration::from_secs(10));
    Ok(())
}

/// Binds the configured address and serves until `shutdown`.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let address = format!("{}:{}", settings.api.host, settings.api.port);
    let listener = TcpListener::bind(&address).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {address}: {e} (set RECPIPE_API__PORT to use another port)"
        )
    })?;
    let state = AppState::build(settings, shutdown.clone()).await?;
    tracing::info!(address = %listener.local_addr()?, "query-api listening");
    serve(listener, state, shutdown).await?;
    Ok(())
}
