//! Model building, decoupled from serving: product embeddings learned from an event
//! history ([`train`]), written as a versioned model directory the services load
//! ([`model_dir`]), and the replay evaluator that scores them through the serving code
//! ([`eval`]).

pub mod cli;
pub mod data;
pub mod eval;
pub mod linalg;
pub mod model_dir;
pub mod train;

/// Errors of the trainer crate.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error("{path}: {message}")]
    Input { path: String, message: String },
    #[error("nothing to train on: {0}")]
    Empty(String),
    #[error("cannot write the model: {0}")]
    Write(String),
}
