//! Model versions in the running pipeline: a hot swap (and rollback) under traffic, and
//! click-through attribution to the version that made the list.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use query_api::experiments::ExperimentsResponse;
use recpipe_shared::catalog::{generate, SyntheticCatalog};
use recpipe_shared::events::{Event, EventType, Fallback, ModelAssignment, ModelVariant};
use recpipe_shared::model::registry::configured_assignment;
use recpipe_shared::model::{IndexKind, ModelRegistry};
use recpipe_shared::store;
use recpipe_shared::testkit::{event, eventually};
use serde_json::Value;

mod common;
use common::*;

const T0: i64 = 1_700_000_000_000;

/// A second model over the same product ids: other embeddings (another seed).
fn write_model(dir: &Path, products: usize, dim: usize) {
    generate(SyntheticCatalog {
        products,
        dim,
        seed: 777,
        ..Default::default()
    })
    .save(dir)
    .unwrap();
}

fn only(version: &str, path: &Path) -> ModelAssignment {
    ModelAssignment {
        variants: vec![ModelVariant {
            version: version.into(),
            path: path.to_string_lossy().into_owned(),
            share: 1.0,
        }],
        published_at: recpipe_shared::events::now_ms(),
    }
}

fn view(user: &str, n: usize, product: &str) -> Event {
    event(
        &format!("{user}-e{n}"),
        user,
        EventType::View,
        product,
        T0 + n as i64,
    )
}

#[tokio::test]
async fn models_swap_and_roll_back_under_traffic_without_failed_gets_or_lost_events() {
    let app = spawn_app().await;
    let catalog = app.env.catalog();
    let v1 = configured_assignment(&app.env.settings).unwrap();
    let v2_dir = app.env.dir.path().join("model-v2");
    write_model(&v2_dir, catalog.len(), catalog.dim());
    let products: Vec<String> = catalog
        .products()
        .iter()
        .filter(|p| p.available)
        .map(|p| p.product_id.clone())
        .take(200)
        .collect();
    let users: Vec<String> = (0..12).map(|i| format!("swap-{i:02}")).collect();

    // Readers: GET every user's list in a loop until told to stop; every answer must be 200.
    let stop = tokio_util::sync::CancellationToken::new();
    let (gets, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut readers = Vec::new();
    for r in 0..3 {
        let (client, users, stop) = (app.client.clone(), users.clone(), stop.clone());
        let base = app.url("");
        let (gets, failures) = (gets.clone(), failures.clone());
        readers.push(tokio::spawn(async move {
            let mut i = r;
            while !stop.is_cancelled() {
                let u = &users[i % users.len()];
                let url = format!("{base}/v1/users/{u}/recommendations?k=5");
                match client.get(&url).send().await {
                    Ok(resp) if resp.status() == 200 => {}
                    _ => {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
                gets.fetch_add(1, Ordering::SeqCst);
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }

    // Writers: 30 rounds of one event per user; v2 is published after round 10, v1 again
    // after round 20.
    let mut sent: HashMap<String, usize> = HashMap::new();
    let mut probes = 0;
    for round in 0..30 {
        let batch: Vec<Event> = users
            .iter()
            .enumerate()
            .map(|(u, user)| {
                view(
                    user,
                    round,
                    &products[(round * 7 + u * 13) % products.len()],
                )
            })
            .collect();
        let r = app
            .post_events(&serde_json::to_value(&batch).unwrap())
            .await;
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
        for u in &users {
            *sent.entry(u.clone()).or_default() += 1;
        }
        let switch = match round {
            10 => Some(only("v2", &v2_dir)),
            20 => Some(v1.clone()),
            _ => None,
        };
        if let Some(next) = switch {
            let version = next.variants[0].version.clone();
            recpipe_shared::kafka::models::publish(&app.env.settings.kafka, &next)
                .await
                .unwrap();
            // A probe user (not counted above) shows when lists come from the new model.
            eventually(WAIT, "lists from the published model", || {
                probes += 1;
                let e = view("probe", probes, &products[probes % products.len()]);
                let version = version.clone();
                let app = &app;
                async move {
                    app.post_events(&serde_json::to_value(&e).unwrap()).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    (app.recommendations("probe", 5).await.model_version == version).then_some(())
                }
            })
            .await;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }

    // Nothing lost, nothing applied twice: every event stored, every state at its count.
    let store = store::open(&app.env.settings.store.url).await.unwrap();
    for u in &users {
        eventually(WAIT, "every event applied once", || async {
            let applied = store
                .user_state(u)
                .await
                .unwrap()
                .is_some_and(|s| s.version == sent[u] as u64);
            (applied && store.user_events(u, 100).await.unwrap().len() == sent[u]).then_some(())
        })
        .await;
        eventually(WAIT, "the final list from v1", || async {
            let list = app.recommendations(u, 5).await;
            (list.model_version == v1.variants[0].version && list.fallback.is_none()).then_some(())
        })
        .await;
    }
    stop.cancel();
    for r in readers {
        r.await.unwrap();
    }
    let (gets, failures) = (gets.load(Ordering::SeqCst), failures.load(Ordering::SeqCst));
    assert!(gets > 100, "only {gets} GETs were made");
    assert_eq!(failures, 0, "{failures} of {gets} GETs failed");
    // The decision log names each list's inputs.
    let list = eventually(WAIT, "the last list stored", || async {
        store
            .latest_recommendations(&users[0])
            .await
            .unwrap()
            .filter(|l| l.user_version == sent[&users[0]] as u64)
    })
    .await;
    assert_eq!(list.input_event_ids[0], format!("{}-e29", users[0]));
    assert!(list.source.is_some());
    app.stop().await;
}

async fn experiments(app: &TestApp) -> ExperimentsResponse {
    let r = app
        .client
        .get(app.url("/v1/experiments?days=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test]
async fn a_click_on_a_recommended_product_counts_for_the_version_that_made_the_list() {
    let app = spawn_app_with(|s| {
        let b = s.catalog.dir.parent().unwrap().join("model-b");
        write_model(&b, 2_000, 32);
        s.model.variants = vec![
            ModelVariant {
                version: "a".into(),
                path: s.catalog.dir.to_string_lossy().into_owned(),
                share: 0.5,
            },
            ModelVariant {
                version: "b".into(),
                path: b.to_string_lossy().into_owned(),
                share: 0.5,
            },
        ];
    })
    .await;
    // The same split the services make.
    let split = ModelRegistry::from_settings(&app.env.settings, IndexKind::None).unwrap();
    let serving = split.current();
    let user_in = |version: &str| {
        (0..)
            .map(|i| format!("shopper-{i}"))
            .find(|u| serving.for_user(u).version == version)
            .unwrap()
    };
    let catalog = app.env.catalog();
    let kitchen: Vec<&str> = catalog
        .products()
        .iter()
        .filter(|p| p.category == "kitchen" && p.available)
        .map(|p| p.product_id.as_str())
        .take(5)
        .collect();

    let mut personal_gets: HashMap<String, u64> = HashMap::new();
    for version in ["a", "b"] {
        let user = user_in(version);
        let views: Vec<Event> = kitchen
            .iter()
            .enumerate()
            .map(|(i, p)| view(&user, i, p))
            .collect();
        assert_eq!(
            app.post_events(&serde_json::to_value(&views).unwrap())
                .await
                .status(),
            202
        );
        // Poll until the list reflects all five views; count the personalised lists served.
        let deadline = std::time::Instant::now() + WAIT;
        let list = loop {
            let l = app.recommendations(&user, 5).await;
            if l.fallback.is_none() {
                *personal_gets.entry(l.model_version.clone()).or_default() += 1;
            }
            if l.source_event_id.as_deref() == Some(&format!("{user}-e4")) {
                break l;
            }
            assert!(std::time::Instant::now() < deadline, "no list for {user}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(list.model_version, version, "the list names its version");
        assert_eq!(list.fallback, None::<Fallback>);
        let shown = &list.items;
        let not_shown = catalog
            .products()
            .iter()
            .map(|p| p.product_id.as_str())
            .find(|p| !shown.iter().any(|i| i.product_id == *p))
            .unwrap();
        let with_list = |id: &str, t: EventType, product: &str, rec: Option<&str>| {
            // Now-ish: experiment counts are bucketed by the day of the event.
            let mut e = event(id, &user, t, product, recpipe_shared::events::now_ms());
            e.recommendation_id = rec.map(str::to_string);
            e
        };
        let rec = Some(list.recommendation_id.as_str());
        let outcome = vec![
            // Counted: a click and a purchase of shown products, naming the list.
            with_list(
                &format!("{user}-click"),
                EventType::Click,
                &shown[0].product_id,
                rec,
            ),
            with_list(
                &format!("{user}-buy"),
                EventType::Purchase,
                &shown[1].product_id,
                rec,
            ),
            // Not counted: a product the list did not show, a list that does not exist,
            // and a click that names no list.
            with_list(&format!("{user}-other"), EventType::Click, not_shown, rec),
            with_list(
                &format!("{user}-bogus"),
                EventType::Click,
                &shown[0].product_id,
                Some("no-such-list"),
            ),
            with_list(
                &format!("{user}-plain"),
                EventType::Click,
                &shown[2].product_id,
                None,
            ),
        ];
        let r = app
            .post_events(&serde_json::to_value(&outcome).unwrap())
            .await;
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
        // The same events again (a producer retry): counted once.
        let r = app
            .post_events(&serde_json::to_value(&outcome).unwrap())
            .await;
        assert_eq!(r.status(), 202);
    }

    // The counts last printed while waiting.
    let last_seen = std::sync::Mutex::new(String::new());
    eventually(
        WAIT,
        "impressions and clicks counted per version",
        || async {
            let report = experiments(&app).await;
            let done = ["a", "b"].iter().all(|v| {
                report.arms.iter().any(|arm| {
                    arm.arm == *v
                        && arm.clicks == 1
                        && arm.purchases == 1
                        && arm.impressions == personal_gets[*v]
                })
            });
            if !done {
                // What a timeout leaves to go on: the counts against the personalised GETs.
                let counts: Vec<_> = report
                    .arms
                    .iter()
                    .map(|a| (&a.arm, a.impressions, a.clicks, a.purchases))
                    .collect();
                let seen = format!("arms {counts:?}, personalised GETs {personal_gets:?}");
                let mut last = last_seen.lock().unwrap();
                if *last != seen {
                    eprintln!("waiting: {seen}");
                    *last = seen;
                }
            }
            done.then_some(())
        },
    )
    .await;
    let report = experiments(&app).await;
    for arm in report.arms.iter().filter(|a| a.arm == "a" || a.arm == "b") {
        assert_eq!(arm.serving_share, Some(0.5));
        assert_eq!(arm.ctr, Some(1.0 / personal_gets[&arm.arm] as f64));
        let [lo, hi] = arm.ctr_interval.unwrap();
        assert!(lo <= arm.ctr.unwrap() && arm.ctr.unwrap() <= hi);
    }
    // The retried events were applied to the vectors once: five views and five outcomes.
    let store = store::open(&app.env.settings.store.url).await.unwrap();
    for version in ["a", "b"] {
        let user = user_in(version);
        eventually(WAIT, "retries applied once", || async {
            let s = store.user_state(&user).await.unwrap();
            s.filter(|s| s.version >= 10)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(store.user_state(&user).await.unwrap().unwrap().version, 10);
    }

    // The status page and its data, and the API reference page.
    let page = app.client.get(app.url("/status")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("/v1/status"));
    let docs = app.client.get(app.url("/docs")).send().await.unwrap();
    assert_eq!(docs.status(), 200);
    assert!(docs.text().await.unwrap().contains("/openapi.json"));
    let status: Value = app.get_json("/v1/status").await;
    assert_eq!(status["models"].as_array().unwrap().len(), 2);
    assert!(status["live"]["gets"].as_u64().unwrap() >= 2);
    assert!(status["live"]["events"].as_u64().unwrap() >= 20);
    let bad = app
        .client
        .get(app.url("/v1/experiments?days=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    app.stop().await;
}
