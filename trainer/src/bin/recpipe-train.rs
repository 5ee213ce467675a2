//! Trains product embeddings from an event history and writes a versioned model directory.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use recpipe_trainer::cli::{progress, DataArgs, TrainArgs};
use recpipe_trainer::model_dir::{self, ModelMetadata, TrainingWindow};
use recpipe_trainer::train::train;

#[derive(Parser)]
#[command(
    name = "recpipe-train",
    about = "Learn product embeddings (PPMI-SVD) from an event history"
)]
struct Cli {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    train: TrainArgs,
    /// Models are written to <out>/<version>/.
    #[arg(long, default_value = "models")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let started = Instant::now();
    let mut say = progress(started);
    let (history, path) = cli.data.load()?;
    say(&format!(
        "read {} events from {}",
        history.interactions.len(),
        path.display()
    ));
    let params = cli.train.params();
    let trained = train(&history.interactions, &params, &mut say)?;
    let catalog = model_dir::catalog_of(&trained, &history.titles)?;
    let metadata = ModelMetadata {
        version: model_dir::version_name(&history.sha256, &params),
        method: "ppmi-svd".into(),
        params,
        stats: trained.stats.clone(),
        training_window: TrainingWindow {
            from_ts: history.interactions.iter().map(|i| i.ts).min().unwrap_or(0),
            to_ts: history.interactions.iter().map(|i| i.ts).max().unwrap_or(0),
            events: history.interactions.len(),
        },
        data_file: path.display().to_string(),
        data_sha256: history.sha256.clone(),
        created_at: recpipe_shared::events::now_ms(),
    };
    let dir = model_dir::write(&cli.out, &catalog, &metadata)?;
    say(&format!(
        "model {} written to {} ({} products × {} dims)",
        metadata.version,
        dir.display(),
        catalog.len(),
        catalog.dim()
    ));
    println!("{}", dir.display());
    Ok(())
}
