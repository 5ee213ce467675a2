//! The store behavioural suite against every backend there is here: the embedded one
//! always, ScyllaDB/Cassandra when SCYLLA_URI points at a cluster
//! (e.g. `SCYLLA_URI=scylla://127.0.0.1:9042`; a fresh keyspace is made per run).

use recpipe_shared::settings::{ScyllaSettings, StoreSettings};
use recpipe_shared::store;

#[tokio::test]
async fn embedded_sqlite_store_passes_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("suite.db").display());
    let s = store::open(&url).await.unwrap();
    store::suite::run_all(s.as_ref()).await;
}

#[tokio::test]
async fn scylla_store_passes_the_suite() {
    let Ok(uri) = std::env::var("SCYLLA_URI") else {
        skipped("SKIPPED: SCYLLA_URI is not set, so the ScyllaDB store suite did not run (set SCYLLA_URI=scylla://host:9042 to run it)");
        return;
    };
    let keyspace = format!("recpipe_test_{}", std::process::id());
    let url = format!("{}/{keyspace}", uri.trim_end_matches('/'));
    let settings = StoreSettings {
        url: url.clone(),
        scylla: ScyllaSettings {
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
            consistency: "one".into(),
            ..Default::default()
        },
        ..Default::default()
    };
    let s = store::open_with(&url, &settings).await.unwrap();
    store::suite::run_all(s.as_ref()).await;
}

/// Says a test was skipped where cargo test shows it (it hides a passing test's output).
fn skipped(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "\n{message}");
}
