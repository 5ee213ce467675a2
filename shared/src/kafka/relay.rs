//! A processor that does no work: every record is passed on unchanged. The load tester
//! uses it as the limit the pipeline is measured against; tests use it to exercise the
//! framework alone.

use async_trait::async_trait;

use super::framework::{Decoded, Outcome, Output, Processor, RecordMeta, RetryableError};

/// Passes every record on to the next topic, same key, same partition.
pub struct Relay {
    pub from: String,
    pub to: String,
}

#[async_trait]
impl Processor for Relay {
    type Input = Vec<u8>;

    fn name(&self) -> &str {
        &self.from
    }

    fn topics(&self) -> Vec<String> {
        vec![self.from.clone()]
    }

    fn decode(&self, _meta: &RecordMeta, payload: &[u8]) -> Result<Vec<u8>, String> {
        Ok(payload.to_vec())
    }

    async fn process(
        &mut self,
        batch: Vec<Decoded<Vec<u8>>>,
    ) -> Result<Vec<Outcome>, RetryableError> {
        Ok(batch
            .into_iter()
            .map(|d| {
                let key = d
                    .meta
                    .key
                    .as_deref()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default();
                Outcome::Emit(vec![Output {
                    topic: self.to.clone(),
                    key,
                    payload: d.input,
                    partition: Some(d.meta.partition),
                }])
            })
            .collect())
    }
}
