use recpipe_shared::{settings::Settings, shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load(save_worker::SERVICE)?;
    telemetry::init(save_worker::SERVICE, &settings.telemetry);
    save_worker::run(settings, shutdown::token_on_signal()).await?;
    Ok(())
}
