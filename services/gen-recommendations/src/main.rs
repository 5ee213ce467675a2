use recpipe_shared::{settings::Settings, shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load(gen_recommendations::SERVICE)?;
    telemetry::init(gen_recommendations::SERVICE, &settings.telemetry);
    let token = shutdown::token_on_signal();
    let deadline = std::time::Duration::from_millis(settings.process.shutdown_deadline_ms);
    shutdown::with_deadline(
        gen_recommendations::run(settings, token.clone()),
        token,
        deadline,
    )
    .await?;
    Ok(())
}
