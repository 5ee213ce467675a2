//! Backpressure against the broker: when the broker dies while a batch's outputs are
//! being delivered, the service waits it out (retries with backoff, reports not ready,
//! commits nothing) and, once the broker is back, delivers everything — it does not exit.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::Message;
use recpipe_shared::admin::Health;
use recpipe_shared::kafka::framework::{
    self, Decoded, Outcome, Processor, RecordMeta, RetryableError,
};
use recpipe_shared::kafka::relay::Relay;
use recpipe_shared::settings::KafkaSettings;
use recpipe_shared::testkit::{eventually, produce, read_topic, TestBroker};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

/// A relay from `in` to `out` whose batches each wait for a permit first, so the test can
/// take the broker away between consuming and producing.
struct GatedCopy {
    relay: Relay,
    gate: Arc<Semaphore>,
    got: mpsc::UnboundedSender<usize>,
}

#[async_trait]
impl Processor for GatedCopy {
    type Input = Vec<u8>;

    fn name(&self) -> &str {
        "gated-copy"
    }

    fn topics(&self) -> Vec<String> {
        self.relay.topics()
    }

    fn decode(&self, meta: &RecordMeta, payload: &[u8]) -> Result<Vec<u8>, String> {
        self.relay.decode(meta, payload)
    }

    async fn process(
        &mut self,
        batch: Vec<Decoded<Vec<u8>>>,
    ) -> Result<Vec<Outcome>, RetryableError> {
        let _ = self.got.send(batch.len());
        self.gate.acquire().await.expect("gate open").forget();
        self.relay.process(batch).await
    }
}

#[tokio::test]
async fn a_broker_outage_during_delivery_is_waited_out_without_loss() {
    let mut broker = TestBroker::start_durable().await;
    let settings = KafkaSettings {
        delivery_timeout_ms: 2_000,
        ..broker.kafka_settings()
    };
    recpipe_shared::kafka::ensure_topics(&settings, &["in", "out"], 1)
        .await
        .unwrap();
    for i in 0..5 {
        produce(
            &broker.brokers(),
            "in",
            "k",
            format!("record-{i}").as_bytes(),
        )
        .await;
    }
    let gate = Arc::new(Semaphore::new(0));
    let (got, mut batches) = mpsc::unbounded_channel();
    let health = Health::new();
    let stop = CancellationToken::new();
    let service = {
        let (settings, stop, health) = (settings.clone(), stop.clone(), health.clone());
        let processor = GatedCopy {
            relay: Relay {
                from: "in".into(),
                to: "out".into(),
            },
            gate: gate.clone(),
            got,
        };
        tokio::spawn(
            async move { framework::run_with_health(&settings, processor, stop, health).await },
        )
    };

    // The service holds a batch; the broker goes away before its outputs are sent.
    let first = tokio::time::timeout(Duration::from_secs(30), batches.recv())
        .await
        .expect("a batch arrives")
        .unwrap();
    assert!(first >= 1);
    broker.kill();
    gate.add_permits(1_000);

    // Delivery fails, the service says why and keeps trying; it does not exit.
    eventually(
        Duration::from_secs(30),
        "not ready while the broker is away",
        || {
            let health = health.clone();
            async move { health.problem().filter(|p| p.contains("kafka")).map(|_| ()) }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !service.is_finished(),
        "the service gave up while the broker was down"
    );

    // The broker returns with its data: everything gets through, and the service is ready.
    broker.restart().await;
    let out = read_topic(&broker.brokers(), "out", 5, Duration::from_secs(60)).await;
    let mut payloads: Vec<String> = out
        .iter()
        .map(|m| String::from_utf8(m.payload().unwrap().to_vec()).unwrap())
        .collect();
    payloads.sort();
    payloads.dedup();
    let log = broker.log();
    let tail: String = log
        .chars()
        .skip(log.chars().count().saturating_sub(3_000))
        .collect();
    assert_eq!(
        payloads,
        (0..5).map(|i| format!("record-{i}")).collect::<Vec<_>>(),
        "service health: {:?}; broker log tail: {}",
        health.problem(),
        tail
    );
    eventually(Duration::from_secs(30), "ready again", || {
        let health = health.clone();
        async move { health.is_ready().then_some(()) }
    })
    .await;
    stop.cancel();
    let stats = tokio::time::timeout(Duration::from_secs(30), service)
        .await
        .expect("stops")
        .unwrap()
        .expect("ends without error");
    assert_eq!(stats.records, 5);
}
