//! GET answers from the API's in-memory view of `recommendations`, which starts where
//! save-worker's group has committed (earlier lists are in the store) and keeps the newest
//! list per user whatever order lists arrive in; the store answers for users the view
//! lacks.

mod common;

use std::time::Duration;

use common::{get, list, publish, start_api};
use recpipe_shared::events::POPULAR_USER_ID;
use recpipe_shared::store::{self, StoredList, WriteBatch};
use recpipe_shared::testkit::{eventually, TestEnv};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn get_serves_the_newest_list_from_the_topic_or_the_store() {
    let env = TestEnv::start().await;
    let store = store::open(&env.settings.store.url).await.unwrap();

    // Before the API starts: a list save-worker persisted and committed past...
    publish(&env, &list("persisted", 1, &["p-00001", "p-00002"])).await;
    let shutdown = CancellationToken::new();
    let worker = {
        let (s, t) = (env.settings.clone(), shutdown.clone());
        tokio::spawn(async move { save_worker::run(s, t).await.unwrap() })
    };
    eventually(Duration::from_secs(30), "the list is stored", || async {
        store.latest_recommendations("persisted").await.unwrap()
    })
    .await;
    shutdown.cancel();
    worker.await.unwrap();
    // ...and one only the store has (as after the topic's retention dropped it).
    store
        .write(WriteBatch {
            recommendations: vec![StoredList::of(
                &list("store-only", 5, &["p-00005"]),
                recpipe_shared::list_record::ListEncoding::Binary,
            )],
            ..Default::default()
        })
        .await
        .unwrap();

    let api = start_api(&env.settings).await;
    let (address, view) = (api.address, api.view.clone());
    let client = reqwest::Client::new();
    eventually(Duration::from_secs(30), "the view caught up", || {
        let view = view.clone();
        async move { view.is_caught_up().then_some(()) }
    })
    .await;
    assert_eq!(
        view.applied(),
        0,
        "the view started after save-worker's committed offset, not at the beginning"
    );

    // Loaded at start: who has stored lists. Others are known to have none unread.
    assert!(matches!(
        view.lookup("never-seen"),
        query_api::view::Lookup::NoList
    ));
    assert!(matches!(
        view.lookup("store-only"),
        query_api::view::Lookup::Unknown
    ));

    // Users the view has not seen come from the store.
    let persisted = get(&client, address, "persisted").await;
    assert_eq!(persisted["recommendation_id"], "persisted-v1");
    assert_eq!(persisted["items"].as_array().unwrap().len(), 2);
    assert_eq!(
        get(&client, address, "store-only").await["recommendation_id"],
        "store-only-v5"
    );

    // A list on the topic is served with no save-worker running: the view holds it.
    publish(&env, &list("persisted", 2, &["p-00003"])).await;
    let newer = eventually(Duration::from_secs(30), "the newer list is served", || {
        let client = client.clone();
        async move {
            let r = get(&client, address, "persisted").await;
            (r["recommendation_id"] == "persisted-v2").then_some(r)
        }
    })
    .await;
    assert_eq!(newer["items"][0]["product_id"], "p-00003");
    assert_eq!(newer["source_event_id"], "persisted-e2");
    assert!(
        store
            .latest_recommendations("persisted")
            .await
            .unwrap()
            .is_some_and(|l| l.user_version == 1),
        "nothing persisted the newer list: the view served it"
    );

    // A late, older list (a replay) does not replace the newer one; a newer one does.
    publish(&env, &list("persisted", 1, &["p-00009"])).await;
    publish(&env, &list("persisted", 3, &["p-00004"])).await;
    eventually(Duration::from_secs(30), "the newest list is served", || {
        let client = client.clone();
        async move {
            let r = get(&client, address, "persisted").await;
            (r["recommendation_id"] == "persisted-v3").then_some(())
        }
    })
    .await;
    assert_eq!(view.applied(), 3, "three lists taken from the topic");

    // A list that says whose it is and how new, but whose items are not a list, is taken
    // by the view (only those fields are read on arrival); its first GET finds it cannot
    // be decoded and answers from the store instead of failing.
    let mut bad = serde_json::to_value(list("store-only", 6, &["p-00006"])).unwrap();
    bad["items"] = "not a list".into();
    recpipe_shared::testkit::produce(
        &env.broker.brokers(),
        &env.settings.kafka.topics.recommendations,
        "store-only",
        &serde_json::to_vec(&bad).unwrap(),
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the bad list reached the view",
        || {
            let view = view.clone();
            async move { (view.applied() == 4).then_some(()) }
        },
    )
    .await;
    assert!(
        view.get("store-only").is_some_and(|e| e.list().is_none()),
        "the view holds the undecodable list"
    );
    assert_eq!(
        get(&client, address, "store-only").await["recommendation_id"],
        "store-only-v5",
        "the store's list answers for it"
    );

    // A user with no list gets the popularity list from the view.
    let mut popular = list(POPULAR_USER_ID, 0, &["p-00007", "p-00008"]);
    popular.source_event_id = None;
    publish(&env, &popular).await;
    let unknown = eventually(
        Duration::from_secs(30),
        "the popularity list is served",
        || {
            let (client, id) = (client.clone(), popular.recommendation_id.clone());
            async move {
                let r = get(&client, address, "never-seen").await;
                (r["recommendation_id"] == id.as_str()).then_some(r)
            }
        },
    )
    .await;
    assert_eq!(unknown["fallback"], "popularity");
    assert_eq!(unknown["items"][1]["product_id"], "p-00008");

    api.stop().await;
}
