//! Replay evaluation: train on the first part of the history (by time), replay the rest
//! through the serving code, and compare with popularity and random.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use recpipe_shared::model::Recommender;
use recpipe_shared::settings::{HnswSettings, ModelSettings};
use recpipe_trainer::cli::{progress, DataArgs, TrainArgs};
use recpipe_trainer::data::split_by_time;
use recpipe_trainer::eval::{evaluate, table, EvalConfig};
use recpipe_trainer::{model_dir, train::train};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "recpipe-eval",
    about = "Replay evaluation of recpipe against popularity and random"
)]
struct Cli {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    train: TrainArgs,
    /// Share of the time span used for training.
    #[arg(long, default_value_t = 0.8)]
    train_share: f64,
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// Search exactly instead of with HNSW.
    #[arg(long)]
    exact: bool,
    /// User-vector half-life in hours of event time.
    #[arg(long, default_value_t = ModelSettings::default().half_life_hours)]
    half_life_hours: f64,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let started = Instant::now();
    let mut say = progress(started);
    let (history, path) = cli.data.load()?;
    let (train_part, test_part, cut) = split_by_time(history.interactions.clone(), cli.train_share);
    say(&format!(
        "{}: {} events for training (before {cut}), {} to replay",
        path.display(),
        train_part.len(),
        test_part.len()
    ));
    let params = cli.train.params();
    let trained = train(&train_part, &params, &mut say)?;
    let catalog = Arc::new(model_dir::catalog_of(&trained, &history.titles)?);
    let hnsw = HnswSettings::default();
    let recommender = if cli.exact {
        Recommender::exact(catalog.clone())
    } else {
        Recommender::new(catalog.clone(), &hnsw)
    };
    say(&format!(
        "index ready ({}); replaying",
        if cli.exact { "exact" } else { "HNSW" }
    ));
    // Every interacted product is excluded, as the protocol asks: a history long enough
    // to hold a user's whole past.
    let settings = ModelSettings {
        half_life_hours: cli.half_life_hours,
        recent_limit: usize::MAX,
        ..ModelSettings::default()
    };
    let config = EvalConfig {
        k: cli.k,
        ..EvalConfig::default()
    };
    let metrics = evaluate(
        &train_part,
        &test_part,
        catalog,
        &recommender,
        &settings,
        config,
        |n, of| {
            say(&format!("replayed {n} / {of}"));
        },
    );
    println!("{}", table(&metrics, cli.k));
    let ratio = metrics[0].hr / metrics[1].hr.max(1e-12);
    println!("recpipe HR@{} is {ratio:.2} × popularity's", cli.k);
    if let Some(out) = cli.json {
        let doc = json!({
            "data": path.display().to_string(),
            "data_sha256": history.sha256,
            "train_share": cli.train_share,
            "train_events": train_part.len(),
            "replayed_events": test_part.len(),
            "k": cli.k,
            "params": params,
            "index": if cli.exact { "exact" } else { "hnsw" },
            "half_life_hours": cli.half_life_hours,
            "results": metrics,
            "hr_ratio_to_popularity": ratio,
        });
        std::fs::write(&out, serde_json::to_vec_pretty(&doc)?)?;
    }
    Ok(())
}
