//! `memory`: bytes of user state per user against the raw vector (dim × 4 bytes), as
//! update-embeddings keeps it: the same `UserModel` applies events to users held in the
//! service's `UserStates` (the most recent `hot_users` in memory, the rest in the state
//! file; each held in its compact binary form), batch by batch as the service does: load the
//! batch's users (making room for them), apply, encode for the changelog, keep, spill.
//! The batch's changelog records, which the service holds until they are produced, are
//! reported apart (`batch_buffer_bytes`): their size follows the batch, not the users.
//! Events come in rounds (every user's first event, then every user's second...), the
//! order in which a bounded memory is used least well. Memory is the growth of this
//! process's resident set while the states fill (no allocator hooks needed); the state
//! file's size is reported beside it.

use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use recpipe_shared::catalog::Catalog;
use recpipe_shared::events::{Event, EventType, SourcePosition};
use recpipe_shared::model::{UserModel, UserStates};
use recpipe_shared::settings::{ModelSettings, StateSettings};
use serde::Serialize;

/// How the benchmark's events name themselves. A state keeps its last 50 event ids, and
/// what they cost in memory depends on their form.
#[derive(Debug, Clone, Copy, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum EventIds {
    /// `user-0000042-e0007`: one user's ids share all but their last characters.
    Sequential,
    /// Random UUIDs (v4), from a seeded generator so that runs are alike.
    Uuid,
}

#[derive(Debug, Serialize)]
pub struct MemorySummary {
    pub users: usize,
    pub events_per_user: usize,
    pub event_ids: EventIds,
    pub hot_users: usize,
    pub batch_events: usize,
    /// The largest batch's changelog records (JSON), which the service holds until they
    /// are produced: a buffer bounded by the batch size rather than by the users, and not
    /// in `bytes_per_user`.
    pub batch_buffer_bytes: usize,
    pub dim: usize,
    pub raw_vector_bytes: usize,
    pub bytes_per_user: f64,
    pub ratio: f64,
    /// The state file on disk, per user.
    pub file_bytes_per_user: f64,
    /// Users in memory at the end.
    pub users_in_memory: usize,
    /// The encoded states in memory at the end, per user: what `bytes_per_user` holds
    /// besides them is the map, the allocator's rounding and the process's fixed costs.
    pub encoded_bytes_per_user: f64,
    /// The same state as JSON on the changelog topic, for comparison.
    pub json_bytes_per_user: f64,
    /// Wall time per event applied (load, apply, encode for the changelog, spill).
    pub micros_per_event: f64,
}

fn resident_bytes() -> anyhow::Result<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("unexpected /proc/self/statm"))?
        .parse()?;
    Ok(pages * 4096.0)
}

pub fn run(
    catalog: Arc<Catalog>,
    users: usize,
    events_per_user: usize,
    hot_users: usize,
    event_ids: EventIds,
    batch_max: usize,
) -> anyhow::Result<MemorySummary> {
    anyhow::ensure!(
        users > 0 && events_per_user > 0 && batch_max > 0,
        "--users, --events-per-user and --batch-events must be at least 1"
    );
    let model = UserModel::new(catalog.clone(), ModelSettings::default());
    let products: Vec<&str> = catalog
        .products()
        .iter()
        .map(|p| p.product_id.as_str())
        .collect();
    let names: Vec<String> = (0..users).map(|u| format!("user-{u:07}")).collect();
    let dir = tempfile::tempdir()?;
    let before = resident_bytes()?;
    let mut states = UserStates::open(&StateSettings {
        hot_users,
        dir: Some(dir.path().to_path_buf()),
        ..StateSettings::default()
    })?;
    let started = Instant::now();
    let mut json = 0usize;
    let mut batch_buffer = 0usize;
    let total = users * events_per_user;
    let mut batch: Vec<Event> = Vec::with_capacity(batch_max);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut in_batch = std::collections::HashSet::new();
    for n in 0..total {
        let (round, u) = (n / users, n % users);
        batch.push(Event {
            event_id: match event_ids {
                EventIds::Sequential => format!("{}-e{round:04}", names[u]),
                EventIds::Uuid => uuid::Builder::from_random_bytes(rng.random())
                    .into_uuid()
                    .to_string(),
            },
            user_id: names[u].clone(),
            event_type: EventType::View,
            product_id: Some(products[(u * 31 + round * 7) % products.len()].to_string()),
            query: None,
            ts: 1_700_000_000_000 + round as i64,
            recommendation_id: None,
        });
        in_batch.insert(u);
        // A batch ends at `batch_max` events or at `hot_users` users, as the service's do.
        if batch.len() < batch_max && in_batch.len() < hot_users && n + 1 < total {
            continue;
        }
        in_batch.clear();
        states.load(batch.iter().map(|e| e.user_id.as_str()))?;
        // The batch's changelog records, which the service holds until they are produced:
        // counted, not held, since they are a buffer of the batch, not state of its users.
        let mut batch_records = 0usize;
        for event in batch.drain(..) {
            let round = event.ts - 1_700_000_000_000;
            let position = SourcePosition {
                partition: 0,
                offset: round,
            };
            let before = states.get(&event.user_id)?;
            let after = model.apply(before.as_ref(), &event, position, 0)?;
            // The service encodes every state for the changelog.
            let encoded = serde_json::to_vec(&after)?;
            if round as usize + 1 == events_per_user {
                json += encoded.len();
            }
            batch_records += encoded.len();
            states.insert(&after);
        }
        states.spill()?;
        batch_buffer = batch_buffer.max(batch_records);
    }
    let elapsed = started.elapsed();
    let after = resident_bytes()?;
    let file_bytes = states.file_bytes()?;
    let bytes_per_user = (after - before) / users as f64;
    let raw = catalog.dim() * 4;
    let summary = MemorySummary {
        users,
        events_per_user,
        event_ids,
        hot_users,
        batch_events: batch_max,
        batch_buffer_bytes: batch_buffer,
        dim: catalog.dim(),
        raw_vector_bytes: raw,
        bytes_per_user,
        ratio: bytes_per_user / raw as f64,
        file_bytes_per_user: file_bytes as f64 / users as f64,
        users_in_memory: states.hot_len(),
        encoded_bytes_per_user: states.hot_bytes() as f64 / users as f64,
        json_bytes_per_user: json as f64 / users as f64,
        micros_per_event: elapsed.as_secs_f64() * 1e6 / total as f64,
    };
    drop(states);
    Ok(summary)
}
