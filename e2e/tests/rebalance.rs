//! Rebalance of the services that keep no per-user state: a second gen-recommendations
//! and a second save-worker join their consumer groups during traffic, then the first
//! ones leave. Nothing is lost (every event stored, every user's newest state gets its
//! list, the store ends with each user's newest list) and nothing counts twice (each
//! event stored once; a list produced again after a rebalance is the same list).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use gen_recommendations::GenRecommendations;
use rdkafka::Message;
use recpipe_shared::events::{Event, EventType, RecommendationRecord};
use recpipe_shared::kafka::framework::{self, Processor, RunStats};
use recpipe_shared::model::{IndexKind, ModelRegistry};
use recpipe_shared::store::{self, Store};
use recpipe_shared::testkit::{event, eventually, read_topic, TestEnv};
use save_worker::SaveWorker;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use update_embeddings::UpdateEmbeddings;

const USERS: usize = 12;
const WAIT: Duration = Duration::from_secs(60);

/// One running instance of a service, as a separate process would be.
struct Instance {
    stop: CancellationToken,
    task: JoinHandle<RunStats>,
}

impl Instance {
    fn start<P: Processor + 'static>(env: &TestEnv, processor: P) -> Instance {
        let stop = CancellationToken::new();
        let (kafka, token) = (env.settings.kafka.clone(), stop.clone());
        let task =
            tokio::spawn(async move { framework::run(&kafka, processor, token).await.unwrap() });
        Instance { stop, task }
    }

    async fn stop(self) -> RunStats {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}

fn gen_recommendations(env: &TestEnv) -> GenRecommendations {
    let models = ModelRegistry::from_settings(&env.settings, IndexKind::Hnsw).unwrap();
    GenRecommendations::new(Arc::new(models), &env.settings)
}

fn save_worker(env: &TestEnv, store: &Arc<dyn Store>) -> SaveWorker {
    SaveWorker::new(store.clone(), env.settings.kafka.topics.clone())
}

/// Events `from..to`, spread over the users and the catalog.
fn events(env: &TestEnv, from: usize, to: usize) -> Vec<Event> {
    let catalog = env.catalog();
    (from..to)
        .map(|i| {
            event(
                &format!("e{i}"),
                &format!("user-{}", i % USERS),
                EventType::Click,
                &catalog.products()[(i * 37) % catalog.len()].product_id,
                1_700_000_000_000 + i as i64 * 1_000,
            )
        })
        .collect()
}

/// The users' lists on the topic (popularity lists left out).
async fn lists(env: &TestEnv) -> Vec<RecommendationRecord> {
    read_topic(
        &env.broker.brokers(),
        &env.settings.kafka.topics.recommendations,
        usize::MAX,
        Duration::from_secs(2),
    )
    .await
    .iter()
    .map(|m| recpipe_shared::list_record::decode(m.payload().unwrap()).unwrap())
    .filter(|l| l.source_event_id.is_some())
    .collect()
}

/// Waits until every event of `sent` is stored and each user's newest one has its list.
async fn wait_for_phase(env: &TestEnv, store: &Arc<dyn Store>, sent: &[Event]) {
    let newest: BTreeSet<String> = newest_per_user(sent).into_values().collect();
    eventually(WAIT, "every user's newest event has its list", || async {
        let listed: BTreeSet<String> = lists(env)
            .await
            .into_iter()
            .filter_map(|l| l.source_event_id)
            .collect();
        newest.is_subset(&listed).then_some(())
    })
    .await;
    eventually(WAIT, "every event sent so far is stored", || async {
        let mut stored = 0;
        for u in 0..USERS {
            stored += store
                .user_events(&format!("user-{u}"), 1_000)
                .await
                .unwrap()
                .len();
        }
        (stored >= sent.len()).then_some(())
    })
    .await;
}

fn newest_per_user(sent: &[Event]) -> HashMap<String, String> {
    sent.iter()
        .map(|e| (e.user_id.clone(), e.event_id.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_gen_recommendations_and_save_worker_join_then_first_leave_without_loss() {
    let env = TestEnv::start().await;
    let store = store::open(&env.settings.store.url).await.unwrap();
    let embeddings = {
        let models = ModelRegistry::from_settings(&env.settings, IndexKind::None).unwrap();
        Instance::start(
            &env,
            UpdateEmbeddings::new(Arc::new(models), &env.settings).unwrap(),
        )
    };
    let gen_a = Instance::start(&env, gen_recommendations(&env));
    let save_a = Instance::start(&env, save_worker(&env, &store));
    let mut sent = events(&env, 0, 40);
    env.send_events(&sent).await;
    wait_for_phase(&env, &store, &sent).await;

    // B instances join: each group's partitions are split between A and B.
    let gen_b = Instance::start(&env, gen_recommendations(&env));
    let save_b = Instance::start(&env, save_worker(&env, &store));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let more = events(&env, 40, 80);
    env.send_events(&more).await;
    sent.extend(more);
    wait_for_phase(&env, &store, &sent).await;

    // A instances leave: B takes every partition.
    let gen_a = gen_a.stop().await;
    let save_a = save_a.stop().await;
    let more = events(&env, 80, 120);
    env.send_events(&more).await;
    sent.extend(more);
    wait_for_phase(&env, &store, &sent).await;

    // The store ends with each user's newest list, the one for their newest event.
    for (user, newest_event) in newest_per_user(&sent) {
        let latest = eventually(WAIT, "the newest list is stored", || async {
            store
                .latest_recommendations(&user)
                .await
                .unwrap()
                .filter(|l| l.source_event_id.as_ref() == Some(&newest_event))
        })
        .await;
        assert_eq!(latest.user_version, 10, "{user} saw 10 events");
        assert!(!latest.items.is_empty());
    }
    let gen_b = gen_b.stop().await;
    let save_b = save_b.stop().await;
    embeddings.stop().await;

    // Both instances of each service did part of the work.
    assert!(
        gen_a.records >= 40 && gen_b.records > 0,
        "gen-recommendations: A read {}, B read {}",
        gen_a.records,
        gen_b.records
    );
    assert!(
        save_a.records > 0 && save_b.records > 0,
        "save-worker: A read {}, B read {}",
        save_a.records,
        save_b.records
    );

    // Every event is stored, once.
    for u in 0..USERS {
        let user = format!("user-{u}");
        let mut stored: Vec<String> = store
            .user_events(&user, 1_000)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.event_id)
            .collect();
        stored.sort();
        let mut expected: Vec<String> = sent
            .iter()
            .filter(|e| e.user_id == user)
            .map(|e| e.event_id.clone())
            .collect();
        expected.sort();
        assert_eq!(stored, expected, "{user}'s stored events");
    }

    // A list produced twice (a batch replayed after a rebalance) is the same list.
    let mut by_id: HashMap<String, RecommendationRecord> = HashMap::new();
    for list in lists(&env).await {
        if let Some(seen) = by_id.get(&list.recommendation_id) {
            assert_eq!(
                (&seen.items, &seen.source_event_id),
                (&list.items, &list.source_event_id),
                "two different lists under one id"
            );
        }
        by_id.insert(list.recommendation_id.clone(), list);
    }
}
