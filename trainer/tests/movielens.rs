//! The replay evaluation on real data: MovieLens latest-small from ../shared/data when it
//! is there (it is not part of the repository: research licence), skipped otherwise.

use std::path::PathBuf;
use std::sync::Arc;

use recpipe_shared::model::Recommender;
use recpipe_shared::settings::{HnswSettings, ModelSettings};
use recpipe_trainer::data::{load, split_by_time, Format};
use recpipe_trainer::eval::{evaluate, EvalConfig};
use recpipe_trainer::model_dir::catalog_of;
use recpipe_trainer::train::{train, TrainParams};

#[test]
fn recpipe_beats_popularity_by_half_again_on_movielens() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/ml-latest-small/ratings.csv");
    if !path.exists() {
        skipped(&format!(
            "SKIPPED: {} is absent (it lives in ../shared/data beside the project)",
            path.display()
        ));
        return;
    }
    let history = load(&path, Format::MovieLens { min_rating: 3.5 }).unwrap();
    let (train_part, test_part, _) = split_by_time(history.interactions.clone(), 0.8);
    let trained = train(&train_part, &TrainParams::default(), |_| {}).unwrap();
    let catalog = Arc::new(catalog_of(&trained, &history.titles).unwrap());
    let recommender = Recommender::new(catalog.clone(), &HnswSettings::default());
    let settings = ModelSettings {
        half_life_hours: 0.005,
        recent_limit: usize::MAX,
        ..Default::default()
    };
    let m = evaluate(
        &train_part,
        &test_part,
        catalog,
        &recommender,
        &settings,
        EvalConfig::default(),
        |_, _| {},
    );
    assert_eq!(
        m[0].evaluated, 12_256,
        "the reference protocol evaluates 12,256 events"
    );
    assert!(
        m[0].hr >= 1.5 * m[1].hr,
        "recpipe HR@10 {} vs popularity {}",
        m[0].hr,
        m[1].hr
    );
    assert!(
        m[2].hr < m[1].hr,
        "random {} should trail popularity {}",
        m[2].hr,
        m[1].hr
    );
}

/// Says a test was skipped where cargo test shows it (it hides a passing test's output).
fn skipped(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "\n{message}");
}
