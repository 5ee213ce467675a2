use recpipe_shared::{settings::Settings, shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load(gen_recommendations::SERVICE)?;
    telemetry::init(gen_recommendations::SERVICE, &settings.telemetry);
    gen_recommendations::run(settings, shutdown::token_on_signal()).await?;
    Ok(())
}
