use recpipe_shared::{settings::Settings, shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load(update_embeddings::SERVICE)?;
    telemetry::init(update_embeddings::SERVICE, &settings.telemetry);
    let token = shutdown::token_on_signal();
    let deadline = std::time::Duration::from_millis(settings.process.shutdown_deadline_ms);
    shutdown::with_deadline(
        update_embeddings::run(settings, token.clone()),
        token,
        deadline,
    )
    .await?;
    Ok(())
}
