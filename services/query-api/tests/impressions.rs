//! The impressions of GETs on a real broker: gathered into records that follow
//! schemas/impression-batch.v1, each on the partition that records keyed by its users'
//! ids go to (as librdkafka's partitioner chooses it), and none lost when the API stops.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{get, list, publish, start_api};
use rdkafka::Message;
use recpipe_shared::events::{EventType, Impression, POPULAR_USER_ID};
use recpipe_shared::kafka::partitioner::partition_of;
use recpipe_shared::schema::impression_batch_validator;
use recpipe_shared::testkit::{event, eventually, read_topic, TestEnv};

#[tokio::test]
async fn impressions_go_in_batches_to_their_users_partitions_and_are_flushed_at_shutdown() {
    let mut env = TestEnv::start().await;
    // Nothing is produced before the API stops: every impression waits for the last flush.
    env.settings.api.impressions_linger_ms = 600_000;
    let mut popular = list(POPULAR_USER_ID, 0, &["p-00007", "p-00008"]);
    popular.source_event_id = None;
    publish(&env, &popular).await;

    let api = start_api(&env.settings).await;
    let address = api.address;
    let client = reqwest::Client::new();
    eventually(
        Duration::from_secs(30),
        "the popularity list is served",
        || {
            let client = client.clone();
            let id = popular.recommendation_id.clone();
            async move {
                let r = get(&client, address, "probe").await;
                (r["recommendation_id"] == id.as_str()).then_some(())
            }
        },
    )
    .await;
    let shoppers: Vec<String> = (0..40).map(|i| format!("shopper-{i}")).collect();
    for user in &shoppers {
        get(&client, address, user).await;
    }
    api.stop().await;

    // Where the usual keyed producer puts each shopper's records.
    let ts = recpipe_shared::events::now_ms();
    let events: Vec<_> = shoppers
        .iter()
        .map(|u| event(&format!("{u}-e"), u, EventType::View, "p-00001", ts))
        .collect();
    env.send_events(&events).await;
    let brokers = env.broker.brokers();
    let partition_of_user: HashMap<String, i32> = read_topic(
        &brokers,
        &env.settings.kafka.topics.events,
        40,
        Duration::from_secs(30),
    )
    .await
    .iter()
    .map(|m| {
        (
            String::from_utf8(m.key().unwrap().to_vec()).unwrap(),
            m.partition(),
        )
    })
    .collect();
    assert_eq!(partition_of_user.len(), 40);
    assert!(
        partition_of_user.values().collect::<HashSet<_>>().len() > 1,
        "40 users on one partition: the check below would prove little"
    );

    let records = read_topic(
        &brokers,
        &env.settings.kafka.topics.impressions,
        usize::MAX,
        Duration::from_secs(5),
    )
    .await;
    let mut shopper_impressions = 0;
    let mut ids = HashSet::new();
    for record in &records {
        let doc: serde_json::Value = serde_json::from_slice(record.payload().unwrap()).unwrap();
        assert_eq!(impression_batch_validator().violations(&doc), vec![]);
        let impressions: Vec<Impression> = serde_json::from_value(doc).unwrap();
        for i in impressions {
            assert!(ids.insert(i.impression_id.clone()), "an impression twice");
            assert_eq!(i.recommendation_id, popular.recommendation_id);
            assert_eq!(
                partition_of(i.user_id.as_bytes(), env.settings.kafka.partitions),
                record.partition(),
                "{} is on the wrong partition",
                i.user_id
            );
            if let Some(&p) = partition_of_user.get(&i.user_id) {
                assert_eq!(
                    p,
                    record.partition(),
                    "{}'s events are elsewhere",
                    i.user_id
                );
                shopper_impressions += 1;
            }
        }
    }
    assert_eq!(shopper_impressions, 40, "one impression per shopper's GET");
    // And the probe's last GET: the catalog answers before it make no impression.
    assert_eq!(ids.len(), 41);
    assert!(
        records.len() <= env.settings.kafka.partitions as usize,
        "one record per partition at the last flush, got {}",
        records.len()
    );
}
