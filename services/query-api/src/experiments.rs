//! Model versions side by side: online counts per arm (`GET /v1/experiments`), and the
//! live status of the API and the models (`GET /v1/status`, the page at `GET /status`).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{Html, IntoResponse};
use axum::Json;
use recpipe_shared::events::now_ms;
use recpipe_shared::store::{day_of, ArmCounts};
use serde::{Deserialize, Serialize};

use crate::routes::ApiError;
use crate::startup::AppState;

/// Longest range of days one request may count.
pub const MAX_DAYS: i64 = 31;

#[derive(Debug, Deserialize)]
pub struct ExperimentsQuery {
    /// Days counted, today included (default 7).
    days: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ArmReport {
    /// A model version, or `popularity`/`catalog` for fallback lists.
    pub arm: String,
    /// Its share of users now (null when it is not served any more, and for fallbacks).
    pub serving_share: Option<f64>,
    pub impressions: u64,
    pub clicks: u64,
    pub add_to_carts: u64,
    pub purchases: u64,
    /// Clicks per impression, with a 95% Wilson interval (null without impressions).
    pub ctr: Option<f64>,
    pub ctr_interval: Option<[f64; 2]>,
    /// Purchases per impression.
    pub purchase_rate: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ExperimentsResponse {
    /// Days since the Unix epoch (UTC), inclusive.
    pub from_day: i64,
    pub to_day: i64,
    pub arms: Vec<ArmReport>,
}

/// The 95% Wilson score interval of `successes` out of `n`.
pub fn wilson_interval(successes: u64, n: u64) -> Option<[f64; 2]> {
    if n == 0 {
        return None;
    }
    let z = 1.959_964_f64;
    let (n, p) = (n as f64, successes.min(n) as f64 / n as f64);
    let denominator = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denominator;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denominator;
    Some([(centre - half).max(0.0), (centre + half).min(1.0)])
}

fn report(counts: ArmCounts, serving_share: Option<f64>) -> ArmReport {
    let rate = |x: u64| (counts.impressions > 0).then(|| x as f64 / counts.impressions as f64);
    ArmReport {
        serving_share,
        ctr: rate(counts.clicks),
        ctr_interval: wilson_interval(counts.clicks, counts.impressions),
        purchase_rate: rate(counts.purchases),
        impressions: counts.impressions,
        clicks: counts.clicks,
        add_to_carts: counts.add_to_carts,
        purchases: counts.purchases,
        arm: counts.arm,
    }
}

/// Counts of the last `days` days, every served version listed (with zeros if unseen).
pub async fn experiments_report(
    state: &AppState,
    days: i64,
) -> Result<ExperimentsResponse, ApiError> {
    let to_day = day_of(now_ms());
    let from_day = to_day - (days - 1);
    let mut counts = state.store.experiment_counts(from_day, to_day).await?;
    let serving = state.models.current();
    for m in &serving.models {
        if !counts.iter().any(|c| c.arm == m.version) {
            counts.push(ArmCounts {
                arm: m.version.clone(),
                ..Default::default()
            });
        }
    }
    counts.sort_by(|a, b| a.arm.cmp(&b.arm));
    let arms = counts
        .into_iter()
        .map(|c| {
            let share = serving.by_version(&c.arm).map(|m| m.share);
            report(c, share)
        })
        .collect();
    Ok(ExperimentsResponse {
        from_day,
        to_day,
        arms,
    })
}

pub async fn experiments(
    State(state): State<AppState>,
    query: Result<Query<ExperimentsQuery>, QueryRejection>,
) -> Result<Json<ExperimentsResponse>, ApiError> {
    let query = crate::routes::parse_query(query)?;
    let days = query.days.unwrap_or(7);
    if !(1..=MAX_DAYS).contains(&days) {
        return Err(ApiError::bad_request(format!(
            "days must be between 1 and {MAX_DAYS}, got {days}"
        )));
    }
    Ok(Json(experiments_report(&state, days).await?))
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ServedModelStatus {
    pub version: String,
    pub share: f64,
    pub path: String,
    pub products: usize,
    pub dim: usize,
    pub embeddings: String,
}

#[derive(Debug, Serialize)]
pub struct StatusResponse {
    pub now: i64,
    pub models: Vec<ServedModelStatus>,
    /// When the served assignment was published (0: the configured one).
    pub models_published_at: i64,
    pub live: crate::live::LiveSummary,
    pub experiments: ExperimentsResponse,
}

pub async fn status(State(state): State<AppState>) -> Result<Json<StatusResponse>, ApiError> {
    let serving = state.models.current();
    let models = serving
        .models
        .iter()
        .map(|m| ServedModelStatus {
            version: m.version.clone(),
            share: m.share,
            path: m.path.display().to_string(),
            products: m.catalog().len(),
            dim: m.catalog().dim(),
            embeddings: m.catalog().embeddings_id().to_string(),
        })
        .collect();
    Ok(Json(StatusResponse {
        now: now_ms(),
        models,
        models_published_at: serving.assignment.published_at,
        live: state.live.summary(),
        experiments: experiments_report(&state, 7).await?,
    }))
}

/// A page a person can leave open: it polls `/v1/status` every two seconds.
pub async fn status_page() -> impl IntoResponse {
    Html(include_str!("status.html"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_interval_matches_known_values() {
        // 10 of 100: the textbook interval is [0.0552, 0.1744].
        let [lo, hi] = wilson_interval(10, 100).unwrap();
        assert!(
            (lo - 0.0552).abs() < 1e-3 && (hi - 0.1744).abs() < 1e-3,
            "{lo} {hi}"
        );
        let [lo, hi] = wilson_interval(0, 20).unwrap();
        assert_eq!(lo, 0.0);
        assert!((hi - 0.1611).abs() < 1e-3, "{hi}");
        assert_eq!(wilson_interval(0, 0), None);
    }
}
