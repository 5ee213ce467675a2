//! query-api: the storefront's HTTP API.
//! - `GET /v1/users/{user_id}/recommendations?k=10` → the user's latest list, or the
//!   popularity list (marked `fallback`) for a user with none yet;
//! - `GET /v1/users/{user_id}/events?limit=20` → the user's stored events, newest first;
//! - `POST /v1/events` (one event or an array) → validated against
//!   `schemas/event.v1.schema.json`, produced to Kafka keyed by user, 202;
//! - `GET /v1/experiments?days=7` → impressions, clicks and purchases per model version,
//!   with click-through rates and their 95% intervals;
//! - `GET /status` → a page of live figures for a person; `GET /v1/status` its data;
//! - `/healthz` (the process is up), `/readyz` (store and Kafka answer).

pub mod auth;
pub mod experiments;
pub mod impressions;
pub mod live;
pub mod quiet;
pub mod routes;
pub mod startup;
pub mod view;

pub use startup::{run, serve, AppState};

pub const SERVICE: &str = "query-api";
