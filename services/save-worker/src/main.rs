use recpipe_shared::{settings::Settings, shutdown, telemetry};

// glibc's malloc was a quarter of the instructions of a GET (callgrind); mimalloc's
// thread-local heaps suit these many small, short-lived allocations.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load(save_worker::SERVICE)?;
    telemetry::init(save_worker::SERVICE, &settings.telemetry);
    let token = shutdown::token_on_signal();
    let deadline = std::time::Duration::from_millis(settings.process.shutdown_deadline_ms);
    shutdown::with_deadline(save_worker::run(settings, token.clone()), token, deadline).await?;
    Ok(())
}
