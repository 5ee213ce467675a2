//! update-embeddings against a real tansu broker: dead letters, restart, replay.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use recpipe_shared::events::{EventType, LastEvent, SourcePosition, UserVectorRecord};
use recpipe_shared::kafka::framework::{
    dlq_headers, Decoded, Outcome, Processor, RecordMeta, RunStats,
};
use recpipe_shared::model::{IndexKind, ModelRegistry};
use recpipe_shared::settings::Settings;
use recpipe_shared::testkit::{event, header, produce, read_topic, read_topic_until, TestEnv};
use tokio_util::sync::CancellationToken;
use update_embeddings::UpdateEmbeddings;

const WAIT: Duration = Duration::from_secs(30);
/// Event times near now: far older ones are rejected (events.max_age_days).
const T0: i64 = 1_700_000_000_000;

/// Runs the service in the background; the returned token stops it.
fn start(settings: &Settings) -> (CancellationToken, tokio::task::JoinHandle<RunStats>) {
    let token = CancellationToken::new();
    let models = Arc::new(ModelRegistry::from_settings(settings, IndexKind::None).unwrap());
    let processor = UpdateEmbeddings::new(models, settings).unwrap();
    let (kafka, t) = (settings.kafka.clone(), token.clone());
    let handle = tokio::spawn(async move {
        recpipe_shared::kafka::framework::run(&kafka, processor, t)
            .await
            .unwrap()
    });
    (token, handle)
}

fn decode(m: &OwnedMessage) -> UserVectorRecord {
    recpipe_shared::state_record::decode(m.payload().unwrap()).unwrap()
}

/// The events a state stands for, oldest first: those folded into it, then its last.
fn applied(s: &UserVectorRecord) -> impl Iterator<Item = &LastEvent> {
    s.folded_events.iter().chain([&s.last_event])
}

/// Ids of the events the states stand for, in the states' order.
fn applied_ids(states: &[UserVectorRecord]) -> Vec<&str> {
    states
        .iter()
        .flat_map(applied)
        .map(|e| e.event_id.as_str())
        .collect()
}

/// The states produced so far, once they stand for at least `events` events (one state
/// per user and batch, the batch's earlier events of the user folded into it).
async fn states(env: &TestEnv, events: usize) -> Vec<UserVectorRecord> {
    read_topic_until(
        &env.broker.brokers(),
        &env.settings.kafka.topics.user_vectors,
        WAIT,
        move |out| {
            out.iter()
                .map(|m| applied(&decode(m)).count())
                .sum::<usize>()
                >= events
        },
    )
    .await
    .iter()
    .map(decode)
    .collect()
}

fn batch(from: usize, to: usize) -> Vec<recpipe_shared::events::Event> {
    (from..to)
        .map(|i| {
            event(
                &format!("e{i}"),
                &format!("u{}", i % 3),
                EventType::View,
                &format!("p-{:05}", i * 7),
                T0 + 1_000 * i as i64,
            )
        })
        .collect()
}

/// Every kind of bad record the pipeline must survive, with a word its reason must hold.
fn bad_corpus() -> Vec<(Vec<u8>, &'static str)> {
    let now = recpipe_shared::events::now_ms();
    let ev = |body: String| body.into_bytes();
    vec![
        (b"{not json".to_vec(), "invalid event"),
        (b"\xff\xfe\x00".to_vec(), "invalid event"),
        (ev(format!(r#"{{"event_id":"x","user_id":"u9","type":"view","product_id":"no-such-product","ts":{now}}}"#)), "unknown product"),
        (ev(format!(r#"{{"event_id":"x","user_id":"u9","type":"teleport","product_id":"p-00001","ts":{now}}}"#)), "teleport"),
        (ev(format!(r#"{{"event_id":"x","type":"view","product_id":"p-00001","ts":{now}}}"#)), "user_id"),
        (ev(r#"{"event_id":"x","user_id":"u9","type":"view","product_id":"p-00001","ts":"yesterday"}"#.into()), "invalid type"),
        (ev(r#"{"event_id":"x","user_id":"u9","type":"view","product_id":"p-00001","ts":1e400}"#.into()), "invalid event"),
        (ev(r#"{"event_id":"x","user_id":"u9","type":"view","product_id":"p-00001","ts":NaN}"#.into()), "invalid event"),
        (ev(format!(r#"{{"event_id":"x","user_id":"{}","type":"view","product_id":"p-00001","ts":{now}}}"#, "u".repeat(500))), "user_id"),
        (ev(format!(r#"{{"event_id":"x","user_id":"u9","type":"view","product_id":"p-00001","ts":{}}}"#, now + 30 * 86_400_000)), "future"),
        (ev(r#"{"event_id":"x","user_id":"u9","type":"view","product_id":"p-00001","ts":5}"#.into()), "past"),
        (ev(format!(r#"{{"event_id":"x","user_id":"u9","type":"view","product_id":"p-00001","ts":{now},"pad":"{}"}}"#, "x".repeat(100_000))), "max_record_bytes"),
        (ev(format!(r#"{{"event_id":"x","user_id":"u9","type":"search","ts":{now}}}"#)), "query"),
    ]
}

#[tokio::test]
async fn every_bad_record_goes_to_the_dead_letter_topic_and_the_next_good_one_is_processed() {
    let env = TestEnv::start().await;
    let corpus = bad_corpus();
    for (bytes, _) in &corpus {
        produce(
            &env.broker.brokers(),
            &env.settings.kafka.topics.events,
            "u9",
            bytes,
        )
        .await;
    }
    let good_ts = recpipe_shared::events::now_ms();
    env.send_events(&[event("good", "u9", EventType::View, "p-00001", good_ts)])
        .await;
    let (stop, handle) = start(&env.settings);

    let dead = read_topic(
        &env.broker.brokers(),
        &env.settings.kafka.topics.dead_letters,
        corpus.len(),
        WAIT,
    )
    .await;
    assert_eq!(dead.len(), corpus.len());
    // In the order the records were read (rejections at decode and at processing differ).
    let mut dead = dead;
    dead.sort_by_key(|m| {
        header(m, dlq_headers::OFFSET)
            .unwrap()
            .parse::<i64>()
            .unwrap()
    });
    for (m, (original, expected)) in dead.iter().zip(&corpus) {
        assert_eq!(
            m.payload().unwrap(),
            original.as_slice(),
            "the original bytes are kept"
        );
        let reason = header(m, dlq_headers::REASON).unwrap();
        assert!(
            reason.contains(expected),
            "reason {reason:?} should mention {expected:?}"
        );
        assert_eq!(
            header(m, dlq_headers::SERVICE).as_deref(),
            Some("update-embeddings")
        );
        assert_eq!(header(m, dlq_headers::TOPIC).as_deref(), Some("events"));
        assert!(header(m, dlq_headers::OFFSET).is_some());
    }

    let out = states(&env, 1).await;
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].last_event.event_id, "good");
    stop.cancel();
    let stats = handle.await.unwrap();
    assert_eq!(stats.dead_lettered, corpus.len() as u64);
}

#[tokio::test]
async fn a_restarted_service_resumes_from_its_committed_offsets() {
    let env = TestEnv::start().await;
    env.send_events(&batch(0, 12)).await;
    let (stop, handle) = start(&env.settings);
    assert_eq!(applied_ids(&states(&env, 12).await).len(), 12);
    stop.cancel();
    assert_eq!(handle.await.unwrap().records, 12);

    // Events that arrive while the service is down.
    env.send_events(&batch(12, 30)).await;
    let (stop, handle) = start(&env.settings);
    let out = states(&env, 30).await;
    stop.cancel();
    let stats = handle.await.unwrap();
    assert_eq!(
        stats.records, 18,
        "the second run reads only what the first did not commit"
    );

    // Every event applied exactly once, and each user's final version counts them all.
    let ids = applied_ids(&out);
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), 30);
    assert_eq!(unique.len(), 30, "an event was applied twice");
    in_each_users_order(&batch(0, 30), &out);
    let mut last: HashMap<&str, u64> = HashMap::new();
    for s in &out {
        let v = last.entry(s.user_id.as_str()).or_default();
        *v = (*v).max(s.version);
    }
    assert_eq!(
        last,
        HashMap::from([("u0", 10), ("u1", 10), ("u2", 10)]),
        "state continued from before the restart"
    );
}

#[tokio::test]
async fn users_spilled_from_memory_come_back_exactly_as_they_were() {
    let mut env = TestEnv::start().await;
    // One user in memory between batches, three users taking turns: nearly every event
    // finds its user in the state file.
    env.settings.state.hot_users = 1;
    env.settings.kafka.batch_max = 2;
    let mut events = batch(0, 30);
    // A producer's retry of u0's first event, long after u0 was spilled: skipped.
    let retry = events[0].clone();
    events.push(retry);
    env.send_events(&events).await;
    let (stop, handle) = start(&env.settings);
    let out = states(&env, 30).await;
    stop.cancel();
    assert_eq!(handle.await.unwrap().records, 31);
    assert_eq!(applied_ids(&out).len(), 30, "the retried event was applied");
    in_each_users_order(&events[..30], &out);

    // The same events applied by the model alone, every state in memory; each produced
    // state compared with the one after its last event.
    let model =
        recpipe_shared::model::UserModel::new(Arc::new(env.catalog()), env.settings.model.clone());
    let produced: HashMap<&str, &UserVectorRecord> = out
        .iter()
        .map(|s| (s.last_event.event_id.as_str(), s))
        .collect();
    let mut expected: HashMap<String, UserVectorRecord> = HashMap::new();
    for e in &events[..30] {
        let at = produced.get(e.event_id.as_str());
        // A folded event's own state is never seen: any position and time serve.
        let nowhere = SourcePosition {
            partition: -1,
            offset: -1,
        };
        let (source, updated_at) = at.map_or((nowhere, 0), |p| (p.source, p.updated_at));
        let state = model
            .apply(expected.get(&e.user_id), e, source, updated_at)
            .unwrap();
        if let Some(p) = at {
            let mut p = (*p).clone();
            p.folded_events.clear();
            assert_eq!(state, p, "state after {}", e.event_id);
        }
        expected.insert(e.user_id.clone(), state);
    }
    let finals: HashMap<&str, u64> = expected
        .values()
        .map(|s| (s.user_id.as_str(), s.version))
        .collect();
    assert_eq!(finals, HashMap::from([("u0", 10), ("u1", 10), ("u2", 10)]));
}

/// Each user's states, in the order produced, stand for that user's events in the order
/// sent, each once.
fn in_each_users_order(sent: &[recpipe_shared::events::Event], out: &[UserVectorRecord]) {
    let mut by_user: HashMap<&str, Vec<&str>> = HashMap::new();
    for s in out {
        by_user
            .entry(s.user_id.as_str())
            .or_default()
            .extend(applied(s).map(|e| e.event_id.as_str()));
    }
    let mut want: HashMap<&str, Vec<&str>> = HashMap::new();
    for e in sent {
        want.entry(e.user_id.as_str())
            .or_default()
            .push(e.event_id.as_str());
    }
    assert_eq!(by_user, want);
}

#[tokio::test]
async fn replaying_already_applied_events_changes_nothing() {
    let env = TestEnv::start().await;
    env.send_events(&batch(0, 9)).await;
    let (stop, handle) = start(&env.settings);
    let first = states(&env, 9).await;
    stop.cancel();
    handle.await.unwrap();

    // A new consumer group re-reads every event, as after a crash before any commit.
    let mut replay = env.settings.clone();
    replay.kafka.group_prefix = "replay".into();
    env.send_events(&batch(9, 10)).await;
    let (stop, handle) = start(&replay);
    let all = states(&env, 10).await;
    stop.cancel();
    let stats = handle.await.unwrap();
    assert_eq!(stats.records, 10, "all ten events were read again");
    // The restored changelog makes the nine replays no-ops: one new state only, for the
    // new event alone. (Asking for one record more returns what is there once a short
    // wait for more has passed.)
    let mut all_after: Vec<UserVectorRecord> = read_topic(
        &env.broker.brokers(),
        &env.settings.kafka.topics.user_vectors,
        first.len() + 2,
        Duration::from_secs(3),
    )
    .await
    .iter()
    .map(decode)
    .collect();
    let mut all = all;
    let by_position = |s: &UserVectorRecord| (s.source.partition, s.source.offset);
    all.sort_by_key(by_position);
    all_after.sort_by_key(by_position);
    assert_eq!(
        all_after.len(),
        first.len() + 1,
        "a replayed event produced a state again"
    );
    assert_eq!(all_after, all);
    in_each_users_order(&batch(0, 10), &all_after);
    let newest = all.iter().find(|s| s.last_event.event_id == "e9").unwrap();
    assert!(newest.folded_events.is_empty(), "{newest:?}");
    let before = first
        .iter()
        .filter(|s| s.user_id == newest.user_id)
        .map(|s| s.version)
        .max()
        .unwrap();
    assert_eq!(newest.version, before + 1);
}

#[tokio::test]
async fn sigterm_finishes_commits_and_exits_zero() {
    let env = TestEnv::start().await;
    env.send_events(&batch(0, 5)).await;
    let config_dir = tempfile::tempdir().unwrap();
    let admin = format!("127.0.0.1:{}", recpipe_shared::testkit::free_port());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_update-embeddings"))
        .env("RECPIPE_CONFIG_DIR", config_dir.path())
        .env("RECPIPE_TELEMETRY__ADMIN_ADDRESS", &admin)
        .env("RECPIPE_KAFKA__BROKERS", env.broker.brokers())
        .env("RECPIPE_CATALOG__DIR", &env.settings.catalog.dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert_eq!(applied_ids(&states(&env, 5).await).len(), 5);
    // Health, readiness and metrics, as Kubernetes and Prometheus see them.
    let get = |path: &str| reqwest::get(format!("http://{admin}{path}"));
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(
            r#"recpipe_records_total{service="update-embeddings",outcome="processed"} 5"#
        ),
        "{metrics}"
    );
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status =
        recpipe_shared::testkit::eventually(Duration::from_secs(20), "the process to exit", || {
            let status = child.try_wait().unwrap();
            async move { status }
        })
        .await;
    assert!(status.success(), "exit status {status:?}");

    // Its offsets were committed: a new run reads only the new event.
    env.send_events(&batch(5, 6)).await;
    let (stop, handle) = start(&env.settings);
    assert_eq!(applied_ids(&states(&env, 6).await).len(), 6);
    stop.cancel();
    assert_eq!(handle.await.unwrap().records, 1);
}

fn spread(from: usize, to: usize) -> Vec<recpipe_shared::events::Event> {
    (from..to)
        .map(|i| {
            event(
                &format!("e{i}"),
                &format!("user{}", i % 12),
                EventType::Click,
                &format!("p-{:05}", (i * 13) % 1000),
                T0 + 1_000 * i as i64,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_joins_and_the_first_leaves_without_loss_or_double_counting() {
    let env = TestEnv::start().await;
    env.send_events(&spread(0, 40)).await;
    let (stop_a, a) = start(&env.settings);
    assert_eq!(applied_ids(&states(&env, 40).await).len(), 40);

    // B joins: the partitions are split, and B restores its users from the changelog.
    let (stop_b, b) = start(&env.settings);
    tokio::time::sleep(Duration::from_secs(5)).await;
    env.send_events(&spread(40, 80)).await;
    assert_eq!(applied_ids(&states(&env, 80).await).len(), 80);

    // A leaves: B takes every partition.
    stop_a.cancel();
    let a = a.await.unwrap();
    env.send_events(&spread(80, 120)).await;
    let out = states(&env, 120).await;
    stop_b.cancel();
    let b = b.await.unwrap();

    assert!(
        a.records >= 40 && b.records > 0,
        "A read {}, B read {}",
        a.records,
        b.records
    );
    let ids = applied_ids(&out);
    assert_eq!(ids.len(), 120, "an event was applied twice");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 120);
    let mut last: HashMap<&str, u64> = HashMap::new();
    for s in &out {
        let v = last.entry(s.user_id.as_str()).or_default();
        *v = (*v).max(s.version);
    }
    assert_eq!(last.len(), 12);
    assert!(
        last.values().all(|&v| v == 10),
        "every user saw 10 events once: {last:?}"
    );
}

/// `recpipe_events_applied_total{type="view"}` as `/metrics` shows it (0 before the first).
fn views_applied() -> u64 {
    recpipe_shared::admin::metrics()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(r#"recpipe_events_applied_total{type="view"} "#))
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[tokio::test]
async fn a_batch_makes_one_state_per_user_and_partition_with_the_earlier_events_folded_in() {
    let env = TestEnv::start().await;
    let models = Arc::new(ModelRegistry::from_settings(&env.settings, IndexKind::None).unwrap());
    let mut processor = UpdateEmbeddings::new(models, &env.settings).unwrap();
    let at = |i: usize, user: &str, partition: i32| Decoded {
        meta: RecordMeta {
            topic: "events".into(),
            partition,
            offset: 100 + i as i64,
            key: Some(user.as_bytes().to_vec()),
        },
        input: event(
            &format!("e{i}"),
            user,
            EventType::View,
            &format!("p-{:05}", i * 7),
            T0 + 1_000 * i as i64,
        ),
    };
    let mut retried = at(5, "u1", 1);
    retried.input.event_id = "e1".into();
    let batch = vec![
        at(0, "u0", 0),
        at(1, "u1", 1),
        at(2, "u0", 0),
        at(3, "u0", 0),
        at(4, "u2", 2),
        retried,        // a producer's retry of e1: skipped, not folded
        at(6, "u2", 3), // another partition's changelog: not folded into e4's state
        at(7, "u1", 1),
    ];
    let sent: Vec<_> = batch.iter().map(|d| d.input.clone()).collect();
    let views_before = views_applied();
    let outcomes = processor.process(batch).await.unwrap();
    // Seven views applied (the retry is not). Other tests in this binary may count
    // theirs meanwhile, hence at least.
    assert!(
        views_applied() >= views_before + 7,
        "recpipe_events_applied_total{{type=\"view\"}} went from {views_before} to {}",
        views_applied()
    );

    let produced: Vec<Option<UserVectorRecord>> = outcomes
        .iter()
        .map(|o| match o {
            Outcome::Emit(out) if out.is_empty() => None,
            Outcome::Emit(out) => {
                assert_eq!(out.len(), 1);
                Some(recpipe_shared::state_record::decode(&out[0].payload).unwrap())
            }
            Outcome::Reject(reason) => panic!("rejected: {reason}"),
        })
        .collect();
    let folded = |i: usize| -> Vec<&str> {
        let s = produced[i].as_ref().unwrap();
        s.folded_events
            .iter()
            .map(|e| e.event_id.as_str())
            .collect()
    };
    let made: Vec<usize> = (0..8).filter(|&i| produced[i].is_some()).collect();
    assert_eq!(made, vec![3, 4, 6, 7]);
    assert_eq!(folded(3), vec!["e0", "e2"]);
    assert_eq!(folded(4), Vec::<&str>::new());
    assert_eq!(folded(6), Vec::<&str>::new());
    assert_eq!(folded(7), vec!["e1"]);
    // Each state goes to its last event's partition and is what applying the user's
    // events one at a time gives.
    let model =
        recpipe_shared::model::UserModel::new(Arc::new(env.catalog()), env.settings.model.clone());
    let mut expected: HashMap<String, UserVectorRecord> = HashMap::new();
    for (i, e) in sent.iter().enumerate() {
        if i == 5 {
            continue;
        }
        let source = SourcePosition {
            partition: [0, 1, 0, 0, 2, 1, 3, 1][i],
            offset: 100 + i as i64,
        };
        let updated_at = produced[i].as_ref().map_or(0, |p| p.updated_at);
        let state = model
            .apply(expected.get(&e.user_id), e, source, updated_at)
            .unwrap();
        if let Some(p) = &produced[i] {
            match &outcomes[i] {
                Outcome::Emit(out) => assert_eq!(out[0].partition, Some(source.partition)),
                Outcome::Reject(_) => unreachable!(),
            }
            let mut p = p.clone();
            p.folded_events.clear();
            assert_eq!(state, p, "state after {}", e.event_id);
        }
        expected.insert(e.user_id.clone(), state);
    }
    assert_eq!(expected["u0"].version, 3);
    assert_eq!(expected["u1"].version, 2);
    // The state kept in memory is the newest, without the folded list.
    let kept = processor.user("u0").unwrap().unwrap();
    assert!(kept.folded_events.is_empty());
    assert_eq!(kept.last_event.event_id, "e3");
}

#[tokio::test]
async fn a_hot_users_batch_is_split_into_states_that_each_fold_a_bounded_number_of_events() {
    let env = TestEnv::start().await;
    let models = Arc::new(ModelRegistry::from_settings(&env.settings, IndexKind::None).unwrap());
    let mut processor = UpdateEmbeddings::new(models, &env.settings).unwrap();
    // 600 events of one user in one batch (a bot, or a batch_max of thousands), with a
    // long event id each, as a real producer's UUIDs with a prefix would be: folded into
    // one state, about 120 KB.
    let events = 600;
    let batch: Vec<_> = (0..events)
        .map(|i| Decoded {
            meta: RecordMeta {
                topic: "events".into(),
                partition: 2,
                offset: 1_000 + i as i64,
                key: Some(b"hot".to_vec()),
            },
            input: event(
                &format!("{:0>120}", i),
                "hot",
                EventType::Click,
                &format!("p-{:05}", i % 50),
                T0 + i as i64,
            ),
        })
        .collect();
    let outcomes = processor.process(batch).await.unwrap();

    let mut states = Vec::new();
    for (i, o) in outcomes.iter().enumerate() {
        match o {
            Outcome::Emit(out) if out.is_empty() => {}
            Outcome::Emit(out) => {
                assert!(
                    out[0].payload.len() < env.settings.kafka.max_record_bytes,
                    "state at {i} is {} bytes",
                    out[0].payload.len()
                );
                states.push((
                    i,
                    recpipe_shared::state_record::decode(&out[0].payload).unwrap(),
                ));
            }
            Outcome::Reject(reason) => panic!("rejected: {reason}"),
        }
    }
    let max = update_embeddings::MAX_FOLDED_EVENTS;
    // A state every max + 1 events, and one at the batch's last event.
    let at: Vec<usize> = states.iter().map(|(i, _)| *i).collect();
    let expected: Vec<usize> = (max..events).step_by(max + 1).chain([events - 1]).collect();
    assert_eq!(at, expected);
    assert!(at.len() >= 2, "{at:?}");
    assert!(states.iter().all(|(_, s)| s.folded_events.len() <= max));
    // Together they stand for every event once, in order, and versions count them.
    let only: Vec<UserVectorRecord> = states.iter().map(|(_, s)| s.clone()).collect();
    let want: Vec<String> = (0..events).map(|i| format!("{:0>120}", i)).collect();
    assert_eq!(
        applied_ids(&only),
        want.iter().map(String::as_str).collect::<Vec<_>>()
    );
    for (i, s) in &states {
        assert_eq!(s.version, *i as u64 + 1);
    }
    let kept = processor.user("hot").unwrap().unwrap();
    assert_eq!(kept.version, events as u64);
}
