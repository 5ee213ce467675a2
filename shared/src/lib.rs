//! recpipe's common crate: the records, the Kafka framework, the catalog, the model code
//! that the services and tools share, the store, configuration and telemetry.

pub mod admin;
pub mod binary_record;
pub mod catalog;
pub mod events;
pub mod json;
pub mod kafka;
pub mod list_record;
pub mod model;
pub mod schema;
pub mod settings;
pub mod shutdown;
pub mod stable_hash;
pub mod state_record;
pub mod store;
pub mod telemetry;
#[cfg(feature = "testkit")]
pub mod testkit;

/// The services' allocator, so that unit tests see the blocks they would get.
#[cfg(test)]
#[global_allocator]
static TEST_ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The crate-level error for callers that do not care which part failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Settings(#[from] settings::SettingsError),
    #[error(transparent)]
    Catalog(#[from] catalog::CatalogError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Framework(#[from] kafka::framework::FrameworkError),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}
