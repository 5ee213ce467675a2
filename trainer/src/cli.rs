//! Arguments shared by `recpipe-train` and `recpipe-eval`.

use std::path::PathBuf;

use clap::Args;

use crate::data::{self, Format, History};
use crate::train::TrainParams;

#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// A CSV with a header naming user_id,product_id,timestamp[,type] (seconds or ms).
    #[arg(long, conflicts_with = "movielens")]
    pub csv: Option<PathBuf>,
    /// MovieLens ratings.csv (titles come from movies.csv beside it).
    #[arg(long)]
    pub movielens: Option<PathBuf>,
    /// With --movielens: ratings at or above this become events.
    #[arg(long, default_value_t = 3.5)]
    pub min_rating: f32,
}

impl DataArgs {
    pub fn load(&self) -> anyhow::Result<(History, PathBuf)> {
        let (path, format) = match (&self.csv, &self.movielens) {
            (Some(p), None) => (p.clone(), Format::Generic),
            (None, Some(p)) => (
                p.clone(),
                Format::MovieLens {
                    min_rating: self.min_rating,
                },
            ),
            _ => anyhow::bail!("give the event history with --csv FILE or --movielens ratings.csv"),
        };
        Ok((data::load(&path, format)?, path))
    }
}

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Embedding dimensions.
    #[arg(long, default_value_t = TrainParams::default().dim)]
    pub dim: usize,
    /// Co-occurrence window, in events of one user's history.
    #[arg(long, default_value_t = TrainParams::default().window)]
    pub window: usize,
    /// Context-count smoothing exponent of PPMI.
    #[arg(long, default_value_t = TrainParams::default().context_smoothing)]
    pub context_smoothing: f64,
    /// Eigenvalue weight exponent of the embeddings.
    #[arg(long, default_value_t = TrainParams::default().eigen_power)]
    pub eigen_power: f64,
    /// Subspace iterations of the eigen-solver.
    #[arg(long, default_value_t = TrainParams::default().iterations)]
    pub iterations: usize,
    #[arg(long, default_value_t = TrainParams::default().seed)]
    pub seed: u64,
}

impl TrainArgs {
    pub fn params(&self) -> TrainParams {
        TrainParams {
            dim: self.dim,
            window: self.window,
            context_smoothing: self.context_smoothing,
            eigen_power: self.eigen_power,
            iterations: self.iterations,
            seed: self.seed,
            ..TrainParams::default()
        }
    }
}

/// Progress lines on stderr with the elapsed time.
pub fn progress(started: std::time::Instant) -> impl FnMut(&str) {
    move |msg: &str| eprintln!("[{:>6.1} s] {msg}", started.elapsed().as_secs_f64())
}
