//! save-worker: persists events, user states and recommendation lists to the store.
//! A batch is written in one go before its offsets are committed; every write is
//! idempotent, so a replay after a crash leaves the same rows. When the store fails,
//! the batch is retried with backoff and nothing is committed meanwhile.

use std::sync::Arc;

use async_trait::async_trait;
use recpipe_shared::events::{Event, RecommendationRecord, UserVectorRecord};
use recpipe_shared::kafka::framework::{
    self, Decoded, Outcome, Processor, RecordMeta, RetryableError, RunStats,
};
use recpipe_shared::settings::{Settings, Topics};
use recpipe_shared::store::{self, Store, WriteBatch};
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "save-worker";

pub enum Record {
    Event(Event),
    UserState(UserVectorRecord),
    Recommendation(RecommendationRecord),
}

pub struct SaveWorker {
    store: Arc<dyn Store>,
    topics: Topics,
}

impl SaveWorker {
    pub fn new(store: Arc<dyn Store>, topics: Topics) -> Self {
        SaveWorker { store, topics }
    }
}

#[async_trait]
impl Processor for SaveWorker {
    type Input = Record;

    fn name(&self) -> &str {
        SERVICE
    }

    fn topics(&self) -> Vec<String> {
        vec![
            self.topics.events.clone(),
            self.topics.user_vectors.clone(),
            self.topics.recommendations.clone(),
        ]
    }

    fn decode(&self, meta: &RecordMeta, payload: &[u8]) -> Result<Record, String> {
        let t = &meta.topic;
        if *t == self.topics.events {
            Event::from_json(payload)
                .map(Record::Event)
                .map_err(|e| format!("invalid event: {e}"))
        } else if *t == self.topics.user_vectors {
            serde_json::from_slice(payload)
                .map(Record::UserState)
                .map_err(|e| format!("invalid user vector: {e}"))
        } else if *t == self.topics.recommendations {
            serde_json::from_slice(payload)
                .map(Record::Recommendation)
                .map_err(|e| format!("invalid recommendation: {e}"))
        } else {
            Err(format!("record from unexpected topic {t:?}"))
        }
    }

    async fn process(
        &mut self,
        batch: Vec<Decoded<Record>>,
    ) -> Result<Vec<Outcome>, RetryableError> {
        let n = batch.len();
        let mut writes = WriteBatch::default();
        for d in batch {
            match d.input {
                Record::Event(e) => writes.events.push(e),
                Record::UserState(s) => writes.user_states.push(s),
                Record::Recommendation(r) => writes.recommendations.push(r),
            }
        }
        self.store
            .write(writes)
            .await
            .map_err(|e| RetryableError(e.to_string()))?;
        Ok((0..n).map(|_| Outcome::Emit(Vec::new())).collect())
    }
}

/// Runs the service until `shutdown` is cancelled.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<RunStats> {
    let store = store::open_with(&settings.store.url, &settings.store).await?;
    tracing::info!(url = %settings.store.url, "store opened");
    let processor = SaveWorker::new(store, settings.kafka.topics.clone());
    let health = recpipe_shared::admin::Health::new();
    recpipe_shared::admin::spawn(
        settings.telemetry.admin_address.as_deref(),
        health.clone(),
        shutdown.clone(),
    )
    .await?;
    Ok(framework::run_with_health(&settings.kafka, processor, shutdown, health).await?)
}
