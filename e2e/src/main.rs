//! `recpipe-service NAME`: runs one service by name (update-embeddings,
//! gen-recommendations, save-worker, query-api), as its own binary would.

use recpipe_shared::{settings::Settings, shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let name = std::env::args().nth(1).unwrap_or_default();
    let settings = Settings::load(&name)?;
    telemetry::init(&name, &settings.telemetry);
    let token = shutdown::token_on_signal();
    let deadline = std::time::Duration::from_millis(settings.process.shutdown_deadline_ms);
    let t = token.clone();
    let work = async move {
        match name.as_str() {
            update_embeddings::SERVICE => update_embeddings::run(settings, t).await.map(drop),
            gen_recommendations::SERVICE => gen_recommendations::run(settings, t).await.map(drop),
            save_worker::SERVICE => save_worker::run(settings, t).await.map(drop),
            query_api::SERVICE => query_api::run(settings, t).await,
            other => anyhow::bail!("unknown service {other:?}: use update-embeddings, gen-recommendations, save-worker or query-api"),
        }
    };
    shutdown::with_deadline(work, token, deadline).await
}
