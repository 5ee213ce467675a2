use recpipe_shared::{settings::Settings, shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load(update_embeddings::SERVICE)?;
    telemetry::init(update_embeddings::SERVICE, &settings.telemetry);
    update_embeddings::run(settings, shutdown::token_on_signal()).await?;
    Ok(())
}
