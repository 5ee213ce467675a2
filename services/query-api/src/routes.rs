//! The HTTP handlers. Every error is JSON: `{"error": "...", "details": [...]}`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rdkafka::producer::{FutureRecord, Producer};
use recpipe_shared::events::{
    now_ms, Event, Fallback, RecommendationRecord, MAX_ID_LEN, POPULAR_USER_ID,
};
use recpipe_shared::model::{vector_from_history, ServedModel};
use recpipe_shared::schema::event_validator;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::startup::AppState;
use crate::view::{Lookup, Rendered, ViewEntry};

/// The route a storefront calls on every page view, served without the other routes'
/// layers (see `startup::router`).
pub const RECOMMENDATIONS_ROUTE: &str = "/v1/users/{user_id}/recommendations";

pub fn recommendations_route() -> Router<AppState> {
    Router::new().route(RECOMMENDATIONS_ROUTE, get(recommendations))
}

/// Every other route.
pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(recpipe_shared::admin::render_metrics))
        .route("/openapi.json", get(openapi))
        .route("/docs", get(docs_page))
        .route("/v1/users/{user_id}/events", get(user_events))
        .route("/v1/products/{product_id}/similar", get(similar_products))
        .route("/v1/experiments", get(crate::experiments::experiments))
        .route("/v1/status", get(crate::experiments::status))
        .route("/status", get(crate::experiments::status_page))
        .route(
            "/v1/events",
            post(post_events).route_layer(axum::middleware::from_fn_with_state(
                state,
                crate::auth::require_key,
            )),
        )
}

/// An error answer: status, message, and optional details (e.g. one per bad event).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    details: Vec<Value>,
}

impl ApiError {
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            details: Vec::new(),
        }
    }

    fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            details: Vec::new(),
        }
    }
}

impl From<recpipe_shared::store::StoreError> for ApiError {
    fn from(e: recpipe_shared::store::StoreError) -> Self {
        ApiError::unavailable(format!("store unavailable: {e}"))
    }
}

/// The query string, or a 400 that says what is wrong with it.
pub(crate) fn parse_query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(format!("bad query string: {}", e.body_text())))
}

/// `k` (default 10) within 1..=api.max_k.
fn checked_k(k: Option<usize>, state: &AppState) -> Result<usize, ApiError> {
    let max_k = state.settings.api.max_k;
    let k = k.unwrap_or(10);
    if k == 0 || k > max_k {
        return Err(ApiError::bad_request(format!(
            "k must be between 1 and {max_k}, got {k}"
        )));
    }
    Ok(k)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if !self.details.is_empty() {
            body["details"] = Value::Array(self.details);
        }
        (self.status, Json(body)).into_response()
    }
}

/// The API's OpenAPI 3.1 document (`schemas/openapi.json`).
async fn openapi() -> impl IntoResponse {
    (
        [("content-type", "application/json")],
        include_str!("../../../schemas/openapi.json"),
    )
}

/// The API reference for a person, rendered in the browser from `/openapi.json`.
async fn docs_page() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("docs.html"))
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> Response {
    let mut problems = Vec::new();
    match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => problems.push(format!("store: {e}")),
        Err(_) => problems.push("store: no answer within 2 s".to_string()),
    }
    let producer = state.producer.clone();
    let topic = state.settings.kafka.topics.events.clone();
    let kafka = tokio::task::spawn_blocking(move || {
        producer
            .client()
            .fetch_metadata(Some(&topic), Duration::from_secs(2))
            .map(|md| {
                md.topics()
                    .first()
                    .map(|t| t.partitions().len())
                    .unwrap_or(0)
            })
    })
    .await;
    match kafka {
        Ok(Ok(n)) if n > 0 => {}
        Ok(Ok(_)) => problems.push(format!(
            "kafka: topic {:?} does not exist",
            state.settings.kafka.topics.events
        )),
        Ok(Err(e)) => problems.push(format!("kafka: {e}")),
        Err(e) => problems.push(format!("kafka: {e}")),
    }
    if problems.is_empty() {
        (StatusCode::OK, Json(json!({ "status": "ready" }))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "problems": problems })),
        )
            .into_response()
    }
}

#[derive(Debug, Deserialize)]
pub struct RecommendationsQuery {
    k: Option<usize>,
    /// Only products of this category.
    category: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Because {
    pub product_id: String,
    pub title: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct RecommendedItem {
    pub product_id: String,
    pub score: f32,
    pub title: String,
    pub category: String,
    /// "Because you viewed …": the product of the user's history this one is closest to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub because: Option<Because>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct RecommendationsResponse {
    pub user_id: String,
    pub recommendation_id: String,
    pub model_version: String,
    /// Null for a personalised list; else why it is not.
    pub fallback: Option<Fallback>,
    /// Milliseconds since the epoch.
    pub generated_at: i64,
    /// The event whose processing produced this list (absent for fallbacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_event_id: Option<String>,
    pub items: Vec<RecommendedItem>,
}

fn check_id(what: &str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.chars().count() > MAX_ID_LEN {
        return Err(ApiError::bad_request(format!(
            "{what} must be 1 to {MAX_ID_LEN} characters"
        )));
    }
    Ok(())
}

async fn recommendations(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
    query: Result<Query<RecommendationsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    let result = recommendations_for(&state, user_id, query).await;
    // This route is outside the middleware that counts and times the others: it does
    // so itself, under the same names.
    let status = match &result {
        Ok(_) => StatusCode::OK,
        Err(e) => e.status,
    };
    // Almost every answer is a 200: its handles are kept here, not looked up by label.
    static OK_METRICS: std::sync::OnceLock<(metrics::Counter, metrics::Histogram)> =
        std::sync::OnceLock::new();
    let other;
    let (requests, seconds) = if status == StatusCode::OK {
        OK_METRICS.get_or_init(|| {
            crate::startup::request_metrics(RECOMMENDATIONS_ROUTE, StatusCode::OK.as_u16())
        })
    } else {
        other = crate::startup::request_metrics(RECOMMENDATIONS_ROUTE, status.as_u16());
        &other
    };
    // One clock read for both records: each is a system call's worth on some VMs.
    let elapsed = started.elapsed();
    requests.increment(1);
    seconds.record(elapsed.as_secs_f64());
    match &result {
        Ok((answer, _, freshness)) => state.live.record_get(
            started,
            elapsed,
            false,
            answer.fallback.is_none(),
            *freshness,
        ),
        Err(e) if e.status.is_server_error() => {
            state.live.record_get(started, elapsed, true, false, None)
        }
        Err(_) => {}
    }
    result.map(|(_, body, _)| {
        (
            [(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response()
    })
}

/// The answer, and its freshness (event time → list made) when it is a personalised list
/// made in the last minute.
async fn recommendations_for(
    state: &AppState,
    user_id: String,
    query: Result<Query<RecommendationsQuery>, QueryRejection>,
) -> Result<(Arc<Rendered>, Bytes, Option<i64>), ApiError> {
    check_id("user_id", &user_id)?;
    let query = parse_query(query)?;
    let k = checked_k(query.k, state)?;
    if let Some(category) = &query.category {
        let response = category_list(state, user_id, category, k).await?;
        let model = state.models.current().primary().clone();
        let rendered = Arc::new(Rendered::new(response, k, &model));
        let body = rendered.body.clone();
        return Ok((rendered, body, None));
    }
    let own = latest_list(state, &user_id).await?;
    let (entry, fallback) = match own {
        Some(entry) => (Some(entry), None),
        // Never seen this user: the popularity list, marked as such.
        None => (
            latest_list(state, POPULAR_USER_ID).await?,
            Some(Fallback::Popularity),
        ),
    };
    // One wall-clock read per GET, for both the freshness check and the impression.
    let now = now_ms();
    let mut freshness = None;
    let answer = match entry.as_ref().and_then(|e| Some((e, e.list()?))) {
        Some((entry, list)) if !list.items.is_empty() => {
            if fallback.is_none() && list.fallback.is_none() && now - list.generated_at < 60_000 {
                freshness = list.source_event_ts.map(|ts| list.generated_at - ts);
            }
            let model = model_of(state, &list.model_version);
            // An answer is made once per list, k and model and sent again while current;
            // the popularity list's answer is shared by every user without a list, each
            // getting their own id spliced in.
            entry.rendered(k, &model).unwrap_or_else(|| {
                let response = respond(state, user_id.clone(), list, fallback, k);
                let rendered = Arc::new(Rendered::new(response, k, &model));
                entry.keep_rendered(rendered.clone());
                rendered
            })
        }
        _ => {
            let list = catalog_fallback(state, &|_| true);
            let model = model_of(state, &list.model_version);
            Arc::new(Rendered::new(
                respond(state, user_id.clone(), &list, fallback, k),
                k,
                &model,
            ))
        }
    };
    answer.served.increment(1);
    record_impression(state, &user_id, &answer, now);
    let body = answer.body_for(&user_id);
    Ok((answer, body, freshness))
}

/// The user's newest list: from the in-memory view, else from the store (and then kept
/// in the view, which the topic keeps current from there on).
async fn latest_list(state: &AppState, user_id: &str) -> Result<Option<Arc<ViewEntry>>, ApiError> {
    match state.view.lookup(user_id) {
        // A list the view cannot decode is answered from the store (its last good list).
        Lookup::Present(entry) if entry.list().is_some() => return Ok(Some(entry)),
        Lookup::Present(_) | Lookup::Unknown => {}
        Lookup::NoList => return Ok(None),
    }
    match state.store.latest_recommendations(user_id).await? {
        Some(list) => {
            let entry = ViewEntry::new(Arc::new(list));
            state.view.offer(entry.clone());
            Ok(Some(entry))
        }
        None => {
            state.view.note_no_list(user_id);
            Ok(None)
        }
    }
}

/// Hands the served list's impression to the impression log, which produces it to
/// `impressions` with others: never waits, as a lost impression only lowers a count and
/// GET latency must not depend on Kafka.
fn record_impression(state: &AppState, user_id: &str, answer: &Rendered, ts: i64) {
    if answer.fallback == Some(Fallback::Catalog) {
        return; // nothing a click could be attributed to
    }
    let impression_id = uuid::Uuid::new_v4();
    state.impressions.record(user_id, |out| {
        answer
            .impression
            .encode_into(out, user_id, impression_id, ts)
    });
}

/// An answer's [`Impression`](recpipe_shared::events::Impression) with the parts that
/// are the same for every GET of it encoded once (the list's id, model, fallback and
/// items; escaping them was most of a GET's work), and the rest (impression id, user,
/// time) filled in per GET. The result is byte for byte what encoding the `Impression`
/// gives (unit test).
#[derive(Debug)]
pub struct ImpressionTemplate {
    /// `"recommendation_id"`'s value, as JSON.
    recommendation_id: Vec<u8>,
    /// The fields after `"user_id"` and before `"ts"`, without braces.
    middle: Vec<u8>,
}

impl ImpressionTemplate {
    pub fn new(response: &RecommendationsResponse) -> Self {
        /// The shown products' ids, as a JSON array.
        struct Items<'a>(&'a [RecommendedItem]);
        impl serde::Serialize for Items<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.iter().map(|i| i.product_id.as_str()))
            }
        }
        /// `Impression`'s fields from `model_version` to `items`, in its order.
        #[derive(serde::Serialize)]
        struct Middle<'a> {
            model_version: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            fallback: Option<Fallback>,
            items: Items<'a>,
        }
        let object = serde_json::to_vec(&Middle {
            model_version: &response.model_version,
            fallback: response.fallback,
            items: Items(&response.items),
        })
        .expect("impression fields serialise");
        ImpressionTemplate {
            recommendation_id: serde_json::to_vec(&response.recommendation_id)
                .expect("a string serialises"),
            middle: object[1..object.len() - 1].to_vec(),
        }
    }

    /// Appends the impression to `json`.
    pub fn encode_into(
        &self,
        json: &mut Vec<u8>,
        user_id: &str,
        impression_id: uuid::Uuid,
        ts: i64,
    ) {
        use std::io::Write;
        json.extend_from_slice(b"{\"impression_id\":\"");
        json.extend_from_slice(
            impression_id
                .hyphenated()
                .encode_lower(&mut uuid::Uuid::encode_buffer())
                .as_bytes(),
        );
        json.extend_from_slice(b"\",\"recommendation_id\":");
        json.extend_from_slice(&self.recommendation_id);
        json.extend_from_slice(b",\"user_id\":");
        serde_json::to_writer(&mut *json, user_id).expect("a string serialises");
        json.push(b',');
        json.extend_from_slice(&self.middle);
        write!(json, ",\"ts\":{ts}}}").expect("writing to a Vec");
    }
}

/// The model that made a list (by version), else the primary one.
fn model_of(state: &AppState, version: &str) -> std::sync::Arc<ServedModel> {
    let serving = state.models.current();
    serving
        .by_version(version)
        .unwrap_or_else(|| serving.primary())
        .clone()
}

/// The stored list as an answer: current titles, unavailable products dropped, `k` kept.
fn respond(
    state: &AppState,
    user_id: String,
    list: &RecommendationRecord,
    fallback: Option<Fallback>,
    k: usize,
) -> RecommendationsResponse {
    let model = model_of(state, &list.model_version);
    let catalog = model.catalog();
    let items = list
        .items
        .iter()
        .filter_map(|s| {
            let p = catalog.get(&s.product_id)?;
            p.available.then(|| RecommendedItem {
                product_id: s.product_id.clone(),
                score: s.score,
                title: p.title.clone(),
                category: p.category.clone(),
                because: s.because.as_deref().and_then(|b| {
                    catalog.get(b).map(|bp| Because {
                        product_id: b.to_string(),
                        title: bp.title.clone(),
                    })
                }),
            })
        })
        .take(k)
        .collect();
    let fallback = list.fallback.or(fallback);
    RecommendationsResponse {
        user_id,
        recommendation_id: list.recommendation_id.clone(),
        model_version: list.model_version.clone(),
        fallback,
        generated_at: list.generated_at,
        source_event_id: if fallback.is_some() {
            None
        } else {
            list.source_event_id.clone()
        },
        items,
    }
}

/// A list restricted to one category, computed now from the user's stored state (the
/// stored list holds too few of any one category to filter it).
async fn category_list(
    state: &AppState,
    user_id: String,
    category: &str,
    k: usize,
) -> Result<RecommendationsResponse, ApiError> {
    let serving = state.models.current();
    let model = serving.for_user(&user_id).clone();
    let catalog = model.catalog().clone();
    if !catalog.products().iter().any(|p| p.category == category) {
        let mut known: Vec<&str> = catalog
            .products()
            .iter()
            .map(|p| p.category.as_str())
            .collect();
        known.sort();
        known.dedup();
        return Err(ApiError::bad_request(format!(
            "unknown category {category:?}; known: {}",
            known.join(", ")
        )));
    }
    let in_category = |i: usize| catalog.product(i).category == category;
    let user = state.store.user_state(&user_id).await?;
    if let Some(mut user) = user {
        if user.embeddings.as_deref() != Some(catalog.embeddings_id()) {
            // Built with other embeddings: work from the history in this model's space.
            user.vector = vector_from_history(&catalog, &user.recent_products)
                .unwrap_or_else(|| vec![0.0; catalog.dim()]);
        }
        let (u, c) = (user.clone(), category.to_string());
        let (m, catalog2) = (model.clone(), catalog.clone());
        let items = tokio::task::spawn_blocking(move || {
            m.recommender
                .recommend_where(&u, k, &|i| catalog2.product(i).category == c)
        })
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
        if let Some(items) = items {
            let list = RecommendationRecord {
                recommendation_id: recpipe_shared::model::recommendation_id(
                    &user.user_id,
                    user.version,
                    &format!("{}+category:{category}", model.version),
                ),
                user_id: user_id.clone(),
                model_version: model.version.clone(),
                fallback: None,
                items,
                user_version: user.version,
                source_event_id: Some(user.last_event.event_id.clone()),
                source_event_ts: Some(user.last_event.ts),
                generated_at: now_ms(),
                source: Some(user.source),
                input_event_ids: user.recent_event_ids.clone(),
            };
            return Ok(respond(state, user_id, &list, None, k));
        }
    }
    // No personal signal: popular products of the category, then the rest of it.
    let popular = state.store.latest_recommendations(POPULAR_USER_ID).await?;
    let mut list = catalog_fallback(state, &in_category);
    list.model_version = model.version.clone();
    if let Some(p) = popular {
        let mut items: Vec<_> = p
            .items
            .into_iter()
            .filter(|s| {
                catalog
                    .get(&s.product_id)
                    .is_some_and(|x| x.category == category)
            })
            .collect();
        let have: std::collections::HashSet<String> =
            items.iter().map(|s| s.product_id.clone()).collect();
        items.extend(
            list.items
                .into_iter()
                .filter(|s| !have.contains(&s.product_id)),
        );
        list.items = items;
        list.fallback = Some(Fallback::Popularity);
    }
    Ok(respond(state, user_id, &list, None, k))
}

#[derive(Debug, Deserialize)]
pub struct SimilarQuery {
    k: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct SimilarResponse {
    pub product_id: String,
    pub title: String,
    pub items: Vec<RecommendedItem>,
}

async fn similar_products(
    State(state): State<AppState>,
    Path(product_id): Path<String>,
    query: Result<Query<SimilarQuery>, QueryRejection>,
) -> Result<Json<SimilarResponse>, ApiError> {
    check_id("product_id", &product_id)?;
    let query = parse_query(query)?;
    let k = checked_k(query.k, &state)?;
    let model = state.models.current().primary().clone();
    let catalog = model.catalog().clone();
    let Some(index) = catalog.index_of(&product_id) else {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("unknown product {product_id:?}"),
            details: Vec::new(),
        });
    };
    let m = model.clone();
    let similar = tokio::task::spawn_blocking(move || m.recommender.similar(index, k))
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    let items = similar
        .into_iter()
        .map(|(j, score)| {
            let p = catalog.product(j);
            RecommendedItem {
                product_id: p.product_id.clone(),
                score,
                title: p.title.clone(),
                category: p.category.clone(),
                because: None,
            }
        })
        .collect();
    Ok(Json(SimilarResponse {
        title: catalog.product(index).title.clone(),
        product_id,
        items,
    }))
}

/// Before any traffic: available products in catalog order.
fn catalog_fallback(state: &AppState, keep: &dyn Fn(usize) -> bool) -> RecommendationRecord {
    let max_k = state.settings.api.max_k;
    let model = state.models.current().primary().clone();
    RecommendationRecord {
        recommendation_id: "catalog".into(),
        user_id: POPULAR_USER_ID.into(),
        model_version: model.version.clone(),
        fallback: Some(Fallback::Catalog),
        items: model
            .catalog()
            .products()
            .iter()
            .enumerate()
            .filter(|&(i, p)| p.available && keep(i))
            .map(|(_, p)| p)
            .take(max_k)
            .map(|p| recpipe_shared::events::ScoredProduct {
                product_id: p.product_id.clone(),
                score: 0.0,
                because: None,
            })
            .collect(),
        user_version: 0,
        source_event_id: None,
        source_event_ts: None,
        generated_at: 0,
        source: None,
        input_event_ids: Vec::new(),
    }
}

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    limit: Option<usize>,
}

async fn user_events(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    check_id("user_id", &user_id)?;
    let query = parse_query(query)?;
    let limit = query.limit.unwrap_or(20);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and 1000, got {limit}"
        )));
    }
    let events = state
        .store
        .user_events(&user_id, limit)
        .await
        .map_err(|e| ApiError::unavailable(format!("store unavailable: {e}")))?;
    Ok(Json(json!({ "user_id": user_id, "events": events })))
}

/// Checks every event of the body; all or nothing.
fn parse_events(state: &AppState, body: &[u8]) -> Result<Vec<Event>, ApiError> {
    let doc: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}")))?;
    let (docs, batch) = match doc {
        Value::Array(items) => (items, true),
        one @ Value::Object(_) => (vec![one], false),
        _ => {
            return Err(ApiError::bad_request(
                "the body must be one event object or an array of events",
            ))
        }
    };
    let max = state.settings.api.max_batch;
    if docs.is_empty() || docs.len() > max {
        return Err(ApiError::bad_request(format!(
            "a batch must hold 1 to {max} events, got {}",
            docs.len()
        )));
    }
    let mut events = Vec::with_capacity(docs.len());
    let mut details = Vec::new();
    let serving = state.models.current();
    for (index, doc) in docs.into_iter().enumerate() {
        let at = |path: &str, message: String| {
            if batch {
                json!({ "index": index, "path": path, "message": message })
            } else {
                json!({ "path": path, "message": message })
            }
        };
        let violations = event_validator().violations(&doc);
        if !violations.is_empty() {
            details.extend(violations.into_iter().map(|v| at(&v.path, v.message)));
            continue;
        }
        match serde_json::from_value::<Event>(doc)
            .map_err(|e| e.to_string())
            .and_then(|e| e.validate().map(|_| e).map_err(|e| e.to_string()))
        {
            Ok(event) => {
                if let Err(message) = state
                    .settings
                    .events
                    .check_time(event.ts, recpipe_shared::events::now_ms())
                {
                    details.push(at("/ts", message));
                    continue;
                }
                if let Some(p) = &event.product_id {
                    if serving
                        .models
                        .iter()
                        .all(|m| m.catalog().index_of(p).is_none())
                    {
                        details.push(at("/product_id", format!("unknown product {p:?}")));
                        continue;
                    }
                }
                events.push(event);
            }
            Err(message) => details.push(at("", message)),
        }
    }
    if !details.is_empty() {
        let mut err = ApiError::bad_request(format!(
            "{} problem(s) in the request; nothing was accepted",
            details.len()
        ));
        err.details = details;
        return Err(err);
    }
    Ok(events)
}

async fn post_events(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let events = parse_events(&state, &body)?;
    let topic = &state.settings.kafka.topics.events;
    let mut deliveries = Vec::with_capacity(events.len());
    for event in &events {
        let payload = serde_json::to_vec(event).expect("event serialises");
        let record = FutureRecord::to(topic)
            .key(event.user_id.as_bytes())
            .payload(&payload);
        let delivery = state.producer.send_result(record).map_err(|(e, _)| {
            ApiError::unavailable(format!(
                "cannot queue events for Kafka: {e}; retry later (event ids make retries safe)"
            ))
        })?;
        deliveries.push(delivery);
    }
    if state
        .events_quiet
        .post_after_quiet(std::time::Instant::now())
    {
        // Nothing else is coming to share the broker request: send now, not linger.
        recpipe_shared::kafka::send_now(
            &state.producer,
            std::time::Duration::from_millis(state.settings.api.events_linger_ms),
        );
    }
    // 0: no limit of its own (the producer's delivery timeout still ends the wait).
    let ack_timeout = match state.settings.api.events_ack_timeout_ms {
        0 => std::time::Duration::MAX,
        ms => std::time::Duration::from_millis(ms),
    };
    let Ok(results) =
        tokio::time::timeout(ack_timeout, futures::future::join_all(deliveries)).await
    else {
        metrics::counter!("recpipe_events_unacknowledged_total").increment(events.len() as u64);
        return Err(ApiError::unavailable(format!(
            "Kafka has not acknowledged the events within {} ms (is the broker up?); they \
             may still be delivered: retry later with the same event ids, which makes \
             retries safe",
            ack_timeout.as_millis()
        )));
    };
    for result in results {
        match result {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => {
                return Err(ApiError::unavailable(format!(
                "Kafka did not accept the events: {e}; retry later (event ids make retries safe)"
            )))
            }
            Err(_) => {
                return Err(ApiError::unavailable(
                    "Kafka producer shut down; retry later",
                ))
            }
        }
    }
    state.live.record_events(events.len());
    let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "accepted": events.len(), "event_ids": ids })),
    ))
}

#[cfg(test)]
mod tests {
    use recpipe_shared::events::Impression;

    use super::*;

    fn answer(fallback: Option<Fallback>) -> RecommendationsResponse {
        RecommendationsResponse {
            user_id: "made-for".into(),
            recommendation_id: "r-\"1\"".into(),
            model_version: "v2".into(),
            fallback,
            generated_at: 5,
            source_event_id: Some("e9".into()),
            items: ["p-1", "p-é/2"]
                .iter()
                .map(|id| RecommendedItem {
                    product_id: (*id).into(),
                    score: 0.5,
                    title: "t".into(),
                    category: "c".into(),
                    because: None,
                })
                .collect(),
        }
    }

    #[test]
    fn the_impression_encoded_from_an_answer_is_the_impression_of_the_schema() {
        for fallback in [None, Some(Fallback::Popularity)] {
            let id = uuid::Uuid::from_u128(0x1234);
            let mut json = b"[".to_vec();
            ImpressionTemplate::new(&answer(fallback)).encode_into(
                &mut json,
                "asker \u{1F600}",
                id,
                77,
            );
            // Appended after what was there.
            assert_eq!(json.remove(0), b'[');
            let decoded: Impression = serde_json::from_slice(&json).expect("an Impression");
            assert_eq!(
                decoded,
                Impression {
                    impression_id: id.to_string(),
                    recommendation_id: "r-\"1\"".into(),
                    user_id: "asker \u{1F600}".into(),
                    model_version: "v2".into(),
                    fallback,
                    items: vec!["p-1".into(), "p-é/2".into()],
                    ts: 77,
                }
            );
            // Byte for byte what encoding the Impression itself gives.
            assert_eq!(json, serde_json::to_vec(&decoded).unwrap());
        }
    }
}
