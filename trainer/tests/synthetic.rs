//! Train → write → load → evaluate on a generated history, no external data needed.

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use recpipe_shared::catalog::Catalog;
use recpipe_shared::events::EventType;
use recpipe_shared::model::Recommender;
use recpipe_shared::settings::{HnswSettings, ModelSettings};
use recpipe_trainer::data::{split_by_time, Interaction};
use recpipe_trainer::eval::{evaluate, EvalConfig};
use recpipe_trainer::model_dir::{self, ModelMetadata, TrainingWindow};
use recpipe_trainer::train::{train, TrainParams};

/// Users browse within one of 8 taste groups of 25 products, in sessions.
fn history() -> Vec<Interaction> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut out = Vec::new();
    for u in 0..300 {
        let group = u % 8;
        for t in 0..30 {
            let product = if rng.random_bool(0.85) {
                group * 25 + rng.random_range(0..25)
            } else {
                rng.random_range(0..200)
            };
            out.push(Interaction {
                user: format!("u{u}"),
                product: format!("p{product:03}"),
                ts: (t * 1000 + u) as i64,
                event_type: EventType::View,
            });
        }
    }
    out
}

#[test]
fn a_trained_model_round_trips_and_beats_popularity() {
    let (train_part, test_part, _) = split_by_time(history(), 0.8);
    let params = TrainParams {
        dim: 16,
        ..Default::default()
    };
    let trained = train(&train_part, &params, |_| {}).unwrap();
    let catalog = model_dir::catalog_of(&trained, &Default::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let metadata = ModelMetadata {
        version: model_dir::version_name(&"ab".repeat(32), &params),
        method: "ppmi-svd".into(),
        params: params.clone(),
        stats: trained.stats.clone(),
        training_window: TrainingWindow {
            from_ts: 0,
            to_ts: 1,
            events: train_part.len(),
        },
        data_file: "synthetic".into(),
        data_sha256: "ab".repeat(32),
        created_at: 0,
    };
    let written = model_dir::write(dir.path(), &catalog, &metadata).unwrap();
    let loaded = Arc::new(Catalog::load(&written).unwrap());
    assert_eq!(loaded.model_version(), Some(metadata.version.as_str()));
    assert_eq!(loaded.embeddings(), catalog.embeddings());

    let recommender = Recommender::new(loaded.clone(), &HnswSettings::default());
    let settings = ModelSettings {
        recent_limit: usize::MAX,
        ..Default::default()
    };
    let m = evaluate(
        &train_part,
        &test_part,
        loaded,
        &recommender,
        &settings,
        EvalConfig::default(),
        |_, _| {},
    );
    assert!(m[0].evaluated > 1000);
    assert!(
        m[0].hr > 1.5 * m[1].hr,
        "recpipe {} vs popularity {}",
        m[0].hr,
        m[1].hr
    );
    // Popularity carries no signal here (every group is as popular); random is the floor.
    assert!(
        m[0].hr > 3.0 * m[2].hr,
        "recpipe {} vs random {}",
        m[0].hr,
        m[2].hr
    );
}
