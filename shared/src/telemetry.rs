//! Logging set-up shared by every binary.

use tracing_subscriber::{fmt, prelude::*, EnvFilter};

use crate::settings::TelemetrySettings;

/// Installs the global subscriber: `RUST_LOG` if set, else `settings.level`; JSON lines
/// when `settings.json`. Safe to call more than once (later calls do nothing).
pub fn init(service: &str, settings: &TelemetrySettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = if settings.json {
        registry
            .with(fmt::layer().json().with_current_span(true))
            .try_init()
    } else {
        registry.with(fmt::layer().with_target(false)).try_init()
    };
    if result.is_ok() {
        tracing::debug!(service, "telemetry initialised");
    }
}
