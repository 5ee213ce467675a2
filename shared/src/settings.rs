//! Configuration: `configuration/base.yaml`, then `configuration/<service>.yaml` if present,
//! then `RECPIPE_...` environment variables (`RECPIPE_KAFKA__BROKERS=host:9092` sets
//! `kafka.brokers`). Every field has a default, so a partial file is fine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::events::EventType;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub events: EventRules,
    pub store: StoreSettings,
    pub catalog: CatalogSettings,
    pub model: ModelSettings,
    pub state: StateSettings,
    pub api: ApiSettings,
    pub telemetry: TelemetrySettings,
    pub process: ProcessSettings,
}

/// Where update-embeddings keeps user states (see `model::user_states`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StateSettings {
    /// Users whose states stay in memory between batches (the most recently active);
    /// the others are spilled to a local file and read back on their next event. A state
    /// with a full history takes about 9 KB in memory.
    pub hot_users: usize,
    /// Directory of that file (the system's temporary directory when unset). It is a
    /// cache of the changelog, made anew at start: no volume needs to survive a restart.
    pub dir: Option<PathBuf>,
    /// Most events update-embeddings reads as one batch (in place of `kafka.batch_max`;
    /// `kafka.batch_max_bytes` still applies). A user's events in one batch make one
    /// state, so under a backlog a bigger batch sends far fewer states down the pipeline.
    /// A batch holds its users' encoded states until it is produced, and room for them is
    /// made in memory first, so `hot_users` still bounds the states kept.
    pub events_batch_max: usize,
    /// How update-embeddings writes the states it produces to `user-vectors`: `binary`
    /// (schemas/user-vector.binary.md) or `json` (schemas/user-vector.v1.schema.json).
    /// recpipe's readers take either.
    pub encoding: crate::state_record::StateEncoding,
}

impl Default for StateSettings {
    fn default() -> Self {
        Self {
            hot_users: 10_000,
            dir: None,
            events_batch_max: 100_000,
            encoding: crate::state_record::StateEncoding::Binary,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessSettings {
    /// After SIGTERM, how long the batch in hand may take to finish and commit; past it the
    /// process exits non-zero without committing (the batch is replayed on restart).
    pub shutdown_deadline_ms: u64,
}

impl Default for ProcessSettings {
    fn default() -> Self {
        Self {
            shutdown_deadline_ms: 20_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer groups are `<group_prefix>-<service>`.
    pub group_prefix: String,
    /// Partitions of each topic when `recpipe-admin topics create` makes them.
    pub partitions: i32,
    pub topics: Topics,
    /// Most records handled as one batch (one commit per batch).
    pub batch_max: usize,
    /// A batch also stops growing once its records' bytes reach this, so that a large
    /// `batch_max` (save-worker's `store.batch_max`) bounds memory by bytes too.
    pub batch_max_bytes: usize,
    /// How long a produced record may wait for delivery before the batch fails.
    pub delivery_timeout_ms: u64,
    /// Extra librdkafka properties for every client (e.g. `security.protocol`, `sasl.*`).
    /// Read them through [`KafkaSettings::client_properties`].
    pub client: BTreeMap<String, String>,
    /// Records larger than this are dead-lettered unread.
    pub max_record_bytes: usize,
    /// How long the broker may hold a fetch that has no data. Kafka, and the embedded
    /// tansu with recpipe's patch, answer as soon as data arrives, so this bounds only how
    /// often an idle consumer asks again.
    pub fetch_wait_max_ms: u64,
    /// The same, for consumers nobody waits on (save-worker: GET answers come from the
    /// API's own view of the lists, not from the store).
    pub background_fetch_wait_max_ms: u64,
    /// How long a batch of such a consumer gathers records after its first one, unless
    /// it fills first (0: what has come, as on the freshness path). save-worker then
    /// writes one store transaction per window rather than per fetch.
    pub background_batch_ms: u64,
    /// Such a batch also goes once no record has come for this long (0: what has come):
    /// at the end of a burst or a backlog, nothing more is on its way and the window
    /// would only wait.
    pub background_batch_idle_ms: u64,
    /// How long a producer waits to fill a batch (0: send at once, lowest latency).
    pub linger_ms: u64,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:19092".into(),
            group_prefix: "recpipe".into(),
            partitions: 1,
            topics: Topics::default(),
            batch_max: 2000,
            batch_max_bytes: 16 * 1024 * 1024,
            delivery_timeout_ms: 30_000,
            client: BTreeMap::new(),
            max_record_bytes: 64 * 1024,
            fetch_wait_max_ms: 100,
            background_fetch_wait_max_ms: 500,
            background_batch_ms: 100,
            background_batch_idle_ms: 20,
            linger_ms: 0,
        }
    }
}

impl KafkaSettings {
    /// The pass-through librdkafka properties. An underscore in a name stands for a dot
    /// (no librdkafka property has one), so that a secret such as `sasl.password` can come
    /// from `RECPIPE_KAFKA__CLIENT__SASL_PASSWORD`: environment variables cannot carry
    /// dots, and the settings loader would read them as nesting.
    pub fn client_properties(&self) -> impl Iterator<Item = (String, &str)> {
        self.client
            .iter()
            .map(|(key, value)| (key.replace('_', "."), value.as_str()))
    }
}

/// What makes an event acceptable beyond its schema.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EventRules {
    /// Events stamped further ahead of the wall clock are rejected (clock bugs).
    pub max_future_secs: i64,
    /// Events older than this are rejected (0: no limit). Set it to 0 to replay history.
    pub max_age_days: i64,
}

impl Default for EventRules {
    fn default() -> Self {
        Self {
            max_future_secs: 24 * 3600,
            max_age_days: 10 * 365,
        }
    }
}

impl EventRules {
    /// Why `ts` is out of bounds at wall-clock time `now_ms`, if it is.
    pub fn check_time(&self, ts: i64, now_ms: i64) -> Result<(), String> {
        if ts > now_ms + self.max_future_secs * 1000 {
            return Err(format!(
                "ts {ts} is more than {} s in the future (events.max_future_secs)",
                self.max_future_secs
            ));
        }
        if self.max_age_days > 0 && ts < now_ms - self.max_age_days * 86_400_000 {
            return Err(format!(
                "ts {ts} is more than {} days in the past (events.max_age_days; 0 accepts any age)",
                self.max_age_days
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Topics {
    pub events: String,
    pub user_vectors: String,
    pub recommendations: String,
    pub dead_letters: String,
    /// Lists served by the query API (for click-through attribution).
    pub impressions: String,
    /// Model assignments (one partition; the latest record is what is served).
    pub models: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            events: "events".into(),
            user_vectors: "user-vectors".into(),
            recommendations: "recommendations".into(),
            dead_letters: "dead-letters".into(),
            impressions: "impressions".into(),
            models: "models".into(),
        }
    }
}

impl Topics {
    /// The topics partitioned by user (`kafka.partitions` each).
    pub fn partitioned(&self) -> [&str; 5] {
        [
            &self.events,
            &self.user_vectors,
            &self.recommendations,
            &self.dead_letters,
            &self.impressions,
        ]
    }

    /// Every topic of the pipeline.
    pub fn all(&self) -> Vec<&str> {
        let mut all = self.partitioned().to_vec();
        all.push(&self.models);
        all
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// `sqlite://<path>` (embedded, the default) or
    /// `scylla://host1:9042,host2:9042/<keyspace>` (ScyllaDB or Cassandra).
    pub url: String,
    pub scylla: ScyllaSettings,
    /// Most records save-worker reads as one batch, written in one store transaction
    /// (in place of `kafka.batch_max`; `kafka.batch_max_bytes` still applies). It holds
    /// no state per user, and a bigger transaction writes each b-tree page once for more
    /// rows: this only matters when save-worker has a backlog. Unset: see
    /// [`StoreSettings::batch_max`].
    pub batch_max: Option<usize>,
}

impl StoreSettings {
    /// `batch_max`, or the backend's default: 40,000 for the embedded store, whose events'
    /// index has nearly all its pages written again by any batch of thousands (a relay of
    /// 200,000 events stored 8-20 % sooner than at 10,000; BENCHMARKS.md, thirty-third
    /// session), and 10,000 for ScyllaDB, whose store sends all of a batch's rows at once.
    pub fn batch_max(&self) -> usize {
        self.batch_max
            .unwrap_or(if self.url.starts_with("scylla://") {
                10_000
            } else {
                40_000
            })
    }
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            url: "sqlite://.run/recpipe.db".into(),
            scylla: ScyllaSettings::default(),
            batch_max: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ScyllaSettings {
    /// CQL replication map of the keyspace, used when it is created.
    pub replication: String,
    /// `one`, `quorum`, `local_quorum`, `all`, ...
    pub consistency: String,
    /// Apply `schemas/cql` at start-up; when false, check and name what is missing.
    pub migrate: bool,
    pub request_timeout_ms: u64,
    /// Send a second copy of a read that has not answered after this long (0: never).
    pub speculative_after_ms: u64,
    /// Time to live of rows, in seconds (0: forever).
    pub events_ttl_secs: u64,
    pub recommendations_ttl_secs: u64,
    pub user_state_ttl_secs: u64,
    pub username: Option<String>,
    /// Prefer RECPIPE_STORE__SCYLLA__PASSWORD (or a secret file mounted as env) to a file.
    pub password: Option<String>,
    /// Connect with TLS, trusting the CA certificates of `tls_ca_file` (PEM).
    pub tls: bool,
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for ScyllaSettings {
    fn default() -> Self {
        Self {
            replication: "{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}".into(),
            consistency: "local_quorum".into(),
            migrate: true,
            request_timeout_ms: 2_000,
            speculative_after_ms: 0,
            events_ttl_secs: 0,
            recommendations_ttl_secs: 30 * 24 * 3600,
            user_state_ttl_secs: 0,
            username: None,
            password: None,
            tls: false,
            tls_ca_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CatalogSettings {
    /// Directory with `products.jsonl` and `embeddings.npy`.
    pub dir: PathBuf,
}

impl Default for CatalogSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(".run/catalog"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EventWeights {
    pub view: f32,
    pub click: f32,
    pub add_to_cart: f32,
    pub purchase: f32,
    pub search: f32,
}

impl Default for EventWeights {
    fn default() -> Self {
        Self {
            view: 1.0,
            click: 2.0,
            add_to_cart: 4.0,
            purchase: 6.0,
            search: 1.5,
        }
    }
}

impl EventWeights {
    pub fn of(&self, t: EventType) -> f32 {
        match t {
            EventType::View => self.view,
            EventType::Click => self.click,
            EventType::AddToCart => self.add_to_cart,
            EventType::Purchase => self.purchase,
            EventType::Search => self.search,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HnswSettings {
    pub max_connections: usize,
    pub ef_construction: usize,
    /// Candidates a search examines: recall against time. 0 (the default): the smallest
    /// that reaches `recall_target` on this catalog, found when the model loads and kept
    /// beside the graph file for the next start. No fixed value suits every catalog: 48
    /// reaches 0.95 on 20,000 random 64-d embeddings, the generated clustered catalog needs
    /// 64 at 5,000 products and 192 at 20,000, where 128 finds 0.93. Where no value up to
    /// 512 reaches it (the graph limits recall: 100,000 generated clustered products),
    /// 128, with a warning at each start.
    pub ef_search: usize,
    /// recall@10 against exact search that an automatic `ef_search` reaches on each kind
    /// of calibration query.
    pub recall_target: f64,
    /// Catalogs of fewer products are searched exactly instead: faster, and exact. At
    /// 2,000 × 32 an exact search took 10 µs against HNSW's 28 µs at ef_search 128; at
    /// 5,000 × 32, 23 against 32 µs (`cargo bench -p recpipe-shared --bench ann`).
    pub exact_below: usize,
}

impl Default for HnswSettings {
    fn default() -> Self {
        Self {
            max_connections: 32,
            ef_construction: 200,
            ef_search: 0,
            recall_target: 0.95,
            exact_below: 4_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    /// Written into every recommendation list when the catalog names no version.
    pub version: String,
    /// Models served side by side until an assignment is published on the `models`
    /// topic (empty: `catalog.dir` alone).
    pub variants: Vec<crate::events::ModelVariant>,
    pub weights: EventWeights,
    /// A user's past interest halves every this many hours of event time.
    pub half_life_hours: f64,
    /// Products kept in a user's recent history (excluded from their lists).
    pub recent_limit: usize,
    /// Purchases kept per user (excluded from their lists).
    pub purchased_limit: usize,
    /// Products in a recommendation list.
    pub list_len: usize,
    pub hnsw: HnswSettings,
    /// Popularity counts halve every this many hours of event time.
    pub popularity_half_life_hours: f64,
    /// How often gen-recommendations publishes the popularity list.
    pub popularity_publish_ms: u64,
    /// Threads gen-recommendations makes a batch's lists on (0: one per core). Only a
    /// batch of many users is split; a batch of a few is made on the consumer's thread.
    pub search_threads: usize,
    /// Most user states gen-recommendations reads as one batch (in place of
    /// `kafka.batch_max`; `kafka.batch_max_bytes` still applies). Only a user's latest
    /// state in a batch gets a list, so under a backlog a bigger batch skips more states
    /// that a newer one of the same user replaces anyway. It keeps no state per user, so
    /// a big batch costs only its records' memory.
    pub lists_batch_max: usize,
    /// How gen-recommendations writes lists to `recommendations`.
    pub list_encoding: crate::list_record::ListEncoding,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            version: "synthetic-v1".into(),
            variants: Vec::new(),
            weights: EventWeights::default(),
            half_life_hours: 24.0 * 7.0,
            recent_limit: 50,
            purchased_limit: 100,
            list_len: 20,
            hnsw: HnswSettings::default(),
            popularity_half_life_hours: 24.0,
            popularity_publish_ms: 2_000,
            search_threads: 0,
            lists_batch_max: 100_000,
            list_encoding: crate::list_record::ListEncoding::Binary,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    pub host: String,
    pub port: u16,
    pub max_body_bytes: usize,
    /// Most events in one `POST /v1/events`.
    pub max_batch: usize,
    /// Largest `k` a GET may ask for.
    pub max_k: usize,
    /// Keys that may POST events (header `x-api-key` or `Authorization: Bearer`). Empty:
    /// POST is open (the local default; a warning is logged). From the environment:
    /// `RECPIPE_API__API_KEYS=key1,key2`.
    pub api_keys: Vec<String>,
    /// A file with more keys, one per line (e.g. a mounted Kubernetes Secret).
    pub api_keys_file: Option<PathBuf>,
    /// Requests per second each key may make to POST /v1/events (0: no limit).
    pub rate_limit_per_key: u32,
    /// Origins allowed by CORS (`*` for any); empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// Most users whose latest list the API holds in memory (each a list and its encoded
    /// answer, a few KB); users beyond it are read from the store on every GET.
    pub view_max_users: usize,
    /// How long impressions (one per GET) are gathered before they are produced, one
    /// record per partition holding them all (schemas/impression-batch.v1).
    pub impressions_linger_ms: u64,
    /// How long POSTed events may wait for others to share their broker request (the
    /// `linger.ms` of the API's event producer; 0: each POST sends at once). A POST
    /// that comes when none came for this long is sent at once.
    pub events_linger_ms: u64,
    /// How long a POST waits for the broker to acknowledge its events before answering
    /// 503 (the events may still be delivered later: a retry with the same event ids is
    /// safe). Without it a POST during a broker outage waited out the producer's delivery
    /// timeout, longer than most clients wait. 0: wait for the delivery timeout.
    pub events_ack_timeout_ms: u64,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            max_body_bytes: 1 << 20,
            max_batch: 1000,
            max_k: 100,
            api_keys: Vec::new(),
            api_keys_file: None,
            rate_limit_per_key: 0,
            cors_origins: Vec::new(),
            view_max_users: 1_000_000,
            impressions_linger_ms: 100,
            events_linger_ms: 15,
            events_ack_timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// `RUST_LOG`-style filter, used when `RUST_LOG` is unset.
    pub level: String,
    /// JSON lines instead of human-readable logs.
    pub json: bool,
    /// Where a pipeline service serves `/healthz`, `/readyz` and `/metrics`
    /// (e.g. `0.0.0.0:9100`); none when unset. query-api serves them on its own port.
    pub admin_address: Option<String>,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            level: "info".into(),
            json: false,
            admin_address: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration error: {0} (files are read from {1:?}; set RECPIPE_CONFIG_DIR to use another directory)")]
    Load(config::ConfigError, PathBuf),
}

/// The environment variables that are settings: `RECPIPE_<SECTION>__<FIELD>`. Every
/// setting lives in a section, so a variable without `__` is not one: it belongs to a
/// script or tool (`RECPIPE_CONFIG_DIR`, `RECPIPE_DEMO_KAFKA_PORT`, `RECPIPE_CACHE_DIR`,
/// ...) and is left to it rather than refused as an unknown setting.
fn setting_vars(
    vars: impl Iterator<Item = (String, String)>,
) -> std::collections::HashMap<String, String> {
    vars.filter(|(k, _)| k.starts_with("RECPIPE_") && k["RECPIPE_".len()..].contains("__"))
        .collect()
}

impl Settings {
    /// The directory holding `base.yaml`: `$RECPIPE_CONFIG_DIR`, else `./configuration`.
    pub fn config_dir() -> PathBuf {
        std::env::var_os("RECPIPE_CONFIG_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("configuration"))
    }

    /// Loads `base.yaml` and `<service>.yaml` from `dir` (each optional), then the environment.
    pub fn load_from(dir: &Path, service: &str) -> Result<Settings, SettingsError> {
        Self::load_with_vars(dir, service, std::env::vars())
    }

    /// [`Self::load_from`] with the environment given: tests pass theirs rather than set
    /// the process's, which the crate's other tests read at the same time.
    fn load_with_vars(
        dir: &Path,
        service: &str,
        vars: impl Iterator<Item = (String, String)>,
    ) -> Result<Settings, SettingsError> {
        let vars = setting_vars(vars);
        let env = config::Environment::with_prefix("RECPIPE")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("api.api_keys")
            .with_list_parse_key("api.cors_origins")
            .source(Some(vars));
        config::Config::builder()
            .add_source(config::File::from(dir.join("base.yaml")).required(false))
            .add_source(config::File::from(dir.join(format!("{service}.yaml"))).required(false))
            .add_source(env)
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| SettingsError::Load(e, dir.to_path_buf()))
    }

    pub fn load(service: &str) -> Result<Settings, SettingsError> {
        Self::load_from(&Self::config_dir(), service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_workers_batch_is_the_backends_default_unless_set() {
        let store = |url: &str, batch_max| StoreSettings {
            url: url.into(),
            batch_max,
            ..Default::default()
        };
        assert_eq!(store("sqlite://.run/recpipe.db", None).batch_max(), 40_000);
        assert_eq!(store("scylla://db:9042/shop", None).batch_max(), 10_000);
        assert_eq!(store("sqlite://x.db", Some(500)).batch_max(), 500);
        assert_eq!(store("scylla://db:9042/shop", Some(500)).batch_max(), 500);
    }

    #[test]
    fn only_sectioned_variables_are_settings() {
        let vars = [
            ("RECPIPE_KAFKA__BROKERS", "k:9092"),
            ("RECPIPE_CONFIG_DIR", "/etc/recpipe"),
            ("RECPIPE_DEMO_KAFKA_PORT", "29092"),
            ("RECPIPE_CACHE_DIR", "/tmp"),
            ("PATH", "/bin"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let kept = setting_vars(vars.into_iter());
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(kept["RECPIPE_KAFKA__BROKERS"], "k:9092");
    }

    #[test]
    fn files_then_env_override() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("base.yaml"),
            "kafka:\n  brokers: filehost:9092\n  partitions: 8\n  client:\n    security.protocol: SASL_SSL\napi:\n  port: 9000\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("query-api.yaml"), "api:\n  port: 9100\n").unwrap();
        // Given, not set in the process: the crate's other tests load settings from the
        // process's environment meanwhile (setting it here once made one of them fail).
        let vars = [
            ("RECPIPE_KAFKA__BROKERS", "envhost:9092"),
            // Names the directory, and must not be taken for a setting.
            ("RECPIPE_CONFIG_DIR", "/elsewhere"),
            ("RECPIPE_API__API_KEYS", "k1,k2"),
            ("RECPIPE_KAFKA__CLIENT__SASL_PASSWORD", "Secret.Pw"),
            ("RECPIPE_STATE__ENCODING", "json"),
            ("RECPIPE_MODEL__LIST_ENCODING", "json"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let s = Settings::load_with_vars(dir.path(), "query-api", vars.into_iter()).unwrap();
        assert_eq!(s.kafka.brokers, "envhost:9092");
        assert_eq!(s.kafka.partitions, 8);
        assert_eq!(s.api.port, 9100);
        assert_eq!(s.api.api_keys, vec!["k1", "k2"]);
        assert_eq!(s.state.encoding, crate::state_record::StateEncoding::Json);
        assert_eq!(
            s.model,
            ModelSettings {
                list_encoding: crate::list_record::ListEncoding::Json,
                ..ModelSettings::default()
            }
        );
        // A dotted name from a file and an underscored one from the environment both
        // reach librdkafka dotted, values untouched.
        let client: Vec<(String, &str)> = s.kafka.client_properties().collect();
        assert_eq!(
            client,
            vec![
                ("sasl.password".to_string(), "Secret.Pw"),
                ("security.protocol".to_string(), "SASL_SSL"),
            ]
        );
    }

    #[test]
    fn unknown_keys_are_an_error_that_names_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base.yaml"), "kafka:\n  brokrs: x\n").unwrap();
        let err = Settings::load_from(dir.path(), "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("brokrs"), "{err}");
    }

    #[test]
    fn shipped_configuration_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configuration");
        for service in [
            "update-embeddings",
            "gen-recommendations",
            "save-worker",
            "query-api",
        ] {
            let s = Settings::load_from(&dir, service).unwrap();
            assert_eq!(s.state, StateSettings::default(), "{service}");
        }
    }
}
