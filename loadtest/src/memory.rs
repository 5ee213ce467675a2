//! `memory`: bytes of user state per user against the raw vector (dim × 4 bytes), as
//! update-embeddings keeps it: the same `UserModel` applies events to users held in a
//! map of `UserVectorRecord`s. Measured as the growth of this process's resident memory
//! while the map fills (no allocator hooks needed).

use std::collections::HashMap;
use std::sync::Arc;

use recpipe_shared::catalog::Catalog;
use recpipe_shared::events::{Event, EventType, SourcePosition, UserVectorRecord};
use recpipe_shared::model::UserModel;
use recpipe_shared::settings::ModelSettings;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct MemorySummary {
    pub users: usize,
    pub events_per_user: usize,
    pub dim: usize,
    pub raw_vector_bytes: usize,
    pub bytes_per_user: f64,
    pub ratio: f64,
    /// The same state as JSON on the changelog topic, for comparison.
    pub json_bytes_per_user: f64,
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
) -> anyhow::Result<MemorySummary> {
    let model = UserModel::new(catalog.clone(), ModelSettings::default());
    let products: Vec<&str> = catalog
        .products()
        .iter()
        .map(|p| p.product_id.as_str())
        .collect();
    let before = resident_bytes()?;
    let mut states: HashMap<String, UserVectorRecord> = HashMap::with_capacity(users);
    let mut json = 0usize;
    for u in 0..users {
        let user = format!("user-{u:07}");
        let mut state: Option<UserVectorRecord> = None;
        for i in 0..events_per_user {
            let event = Event {
                event_id: format!("{user}-e{i:04}"),
                user_id: user.clone(),
                event_type: EventType::View,
                product_id: Some(products[(u * 31 + i * 7) % products.len()].to_string()),
                query: None,
                ts: 1_700_000_000_000 + i as i64,
                recommendation_id: None,
            };
            let position = SourcePosition {
                partition: 0,
                offset: i as i64,
            };
            state = Some(model.apply(state.as_ref(), &event, position, 0)?);
        }
        let state = state.expect("at least one event");
        if u % 100 == 0 {
            json += serde_json::to_vec(&state)?.len();
        }
        states.insert(user, state);
    }
    let after = resident_bytes()?;
    let bytes_per_user = (after - before) / users as f64;
    let raw = catalog.dim() * 4;
    let summary = MemorySummary {
        users,
        events_per_user,
        dim: catalog.dim(),
        raw_vector_bytes: raw,
        bytes_per_user,
        ratio: bytes_per_user / raw as f64,
        json_bytes_per_user: json as f64 / users.div_ceil(100) as f64,
    };
    drop(states);
    Ok(summary)
}
