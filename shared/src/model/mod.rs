//! The model code the services run, kept free of Kafka so the evaluator and tests call
//! exactly what production runs.

pub mod graph;
pub mod popularity;
pub mod recommender;
pub mod registry;
pub mod user_states;
pub mod user_update;

pub use popularity::Popularity;
pub use recommender::{recall, recommendation_id, Recommender};
pub use registry::{IndexKind, ModelRegistry, ServedModel, Serving};
pub use user_states::{Restorer, StateError, UserStates};
pub use user_update::{same_id, vector_from_history, UpdateError, UserModel};

/// Milliseconds in which a decayed quantity falls by a factor e, for a half-life in hours.
pub(crate) fn decay_tau_ms(half_life_hours: f64) -> f64 {
    half_life_hours.max(1e-6) * 3_600_000.0 / std::f64::consts::LN_2
}
