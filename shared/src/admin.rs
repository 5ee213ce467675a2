//! Health, readiness and Prometheus metrics for every service: the pipeline services
//! serve them on `telemetry.admin_address`, query-api on its own port.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Whether a service can do its work now, and if not, why.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    problem: Mutex<Option<String>>,
}

impl Health {
    pub fn new() -> Arc<Health> {
        Arc::new(Health::default())
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
        if let Ok(mut p) = self.problem.lock() {
            *p = None;
        }
    }

    pub fn set_not_ready(&self, problem: impl Into<String>) {
        self.ready.store(false, Ordering::SeqCst);
        if let Ok(mut p) = self.problem.lock() {
            *p = Some(problem.into());
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn problem(&self) -> Option<String> {
        self.problem.lock().ok().and_then(|p| p.clone())
    }
}

/// How often recorded histogram values are drained into their buckets.
const METRICS_UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// The upper bounds, in seconds, of every histogram's buckets: each histogram here is a
/// duration (`*_seconds`), from a GET's tenth of a millisecond to a slow batch's seconds,
/// with bounds at the targets (2 ms for a GET, 50 ms for freshness).
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
];

/// A recorder as every process here has it, not installed. Histograms are Prometheus
/// histograms (buckets), not the exporter's default summaries: a p99 over several
/// replicas is then `histogram_quantile` over their summed buckets, which summaries'
/// quantiles cannot be combined into. A value also costs a little less, recorded and
/// drained: 66.3 ns against 79.3 (`cargo bench -p recpipe-shared --bench metrics_upkeep`).
pub fn recorder() -> PrometheusRecorder {
    PrometheusBuilder::new()
        .set_buckets(SECONDS_BUCKETS)
        .expect("the bucket bounds are not empty")
        .build_recorder()
}

/// The process-wide Prometheus recorder (installed on first use, with a thread that
/// drains its histograms every [`METRICS_UPKEEP`]).
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests in one process); the
            // handle then renders this one's (empty) registry rather than failing.
            let _ = metrics::set_global_recorder(recorder);
            // A histogram keeps every value recorded until it is drained, which a scrape
            // of /metrics does, or this: without it a process nobody scraped grew by about
            // 20 bytes per GET (the API, 7-8 MB per 5 s of wrk), without bound.
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(METRICS_UPKEEP);
                    upkeep.run_upkeep();
                });
            handle
        })
        .clone()
}

/// `/metrics` in Prometheus text format.
pub async fn render_metrics() -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        metrics().render(),
    )
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(health): State<Arc<Health>>) -> Response {
    if health.is_ready() {
        (
            StatusCode::OK,
            Json(serde_json::json!({ "status": "ready" })),
        )
            .into_response()
    } else {
        let problem = health.problem().unwrap_or_else(|| "starting".into());
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "not ready", "problems": [problem] })),
        )
            .into_response()
    }
}

pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(health)
}

/// Serves the admin endpoints on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(health))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Binds `address` (if configured) and serves the admin endpoints in the background.
pub async fn spawn(
    address: Option<&str>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let Some(address) = address else {
        return Ok(());
    };
    let listener = TcpListener::bind(address).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot serve health and metrics on {address}: {e} (telemetry.admin_address)"),
        )
    })?;
    tracing::info!(address = %listener.local_addr()?, "health and metrics endpoints up");
    tokio::spawn(async move {
        if let Err(e) = serve(listener, health, shutdown).await {
            tracing::error!(error = %e, "admin endpoints stopped");
        }
    });
    Ok(())
}

/// Runs a pipeline service: its health and metrics endpoints on
/// `telemetry.admin_address` (when set), then `processor` under the Kafka framework until
/// `shutdown`, with readiness following the framework's view.
pub async fn run_service<P: crate::kafka::framework::Processor>(
    settings: &crate::settings::Settings,
    processor: P,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<crate::kafka::framework::RunStats> {
    let health = Health::new();
    spawn(
        settings.telemetry.admin_address.as_deref(),
        health.clone(),
        shutdown.clone(),
    )
    .await?;
    Ok(
        crate::kafka::framework::run_with_health(&settings.kafka, processor, shutdown, health)
            .await?,
    )
}

#[cfg(test)]
mod tests {
    use metrics::Recorder;

    #[test]
    fn a_histogram_renders_as_buckets_whose_counts_add_up_across_replicas() {
        let recorder = super::recorder();
        let metadata = metrics::Metadata::new(module_path!(), metrics::Level::INFO, None);
        let histogram = recorder
            .register_histogram(&metrics::Key::from_name("recpipe_test_seconds"), &metadata);
        for seconds in [0.0015, 0.003, 0.04, 45.0] {
            histogram.record(seconds);
        }
        let text = recorder.handle().render();
        // Cumulative: each bucket counts the values at or below its bound.
        for (bound, count) in [
            ("0.001", 0),
            ("0.002", 1),
            ("0.005", 2),
            ("0.05", 3),
            ("30", 3),
        ] {
            let line = format!(r#"recpipe_test_seconds_bucket{{le="{bound}"}} {count}"#);
            assert!(text.contains(&line), "no {line:?} in:\n{text}");
        }
        assert!(
            text.contains(r#"recpipe_test_seconds_bucket{le="+Inf"} 4"#),
            "{text}"
        );
        assert!(text.contains("recpipe_test_seconds_count 4"), "{text}");
        assert!(
            !text.contains("quantile"),
            "a summary, not buckets:\n{text}"
        );
    }
}
