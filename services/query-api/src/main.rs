use recpipe_shared::{settings::Settings, shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load(query_api::SERVICE)?;
    telemetry::init(query_api::SERVICE, &settings.telemetry);
    query_api::run(settings, shutdown::token_on_signal()).await
}
