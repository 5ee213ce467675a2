//! The ScyllaDB / Cassandra store: the same promises as the embedded one, with prepared
//! statements, configurable consistency, retries and speculative execution, and the
//! schema of `schemas/cql/` applied (or checked) at start-up.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::retry::DefaultRetryPolicy;
use scylla::policies::speculative_execution::SimpleSpeculativeExecutionPolicy;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;

use super::{ArmCounts, ExperimentKind, ImpressionTally, Store, StoreError, WriteBatch};
use crate::events::{Event, RecommendationRecord, UserVectorRecord};
use crate::settings::ScyllaSettings;

/// Applied in order; every statement is `IF NOT EXISTS`, so re-applying is harmless.
const SCHEMA: [&str; 3] = [
    include_str!("../../../schemas/cql/V1__init.cql"),
    include_str!("../../../schemas/cql/V2__experiments.cql"),
    include_str!("../../../schemas/cql/V3__impression_tallies.cql"),
];
const TABLES: [&str; 6] = [
    "events",
    "recommendations",
    "user_state",
    "experiment_events",
    "experiment_arms",
    "impression_tallies",
];

fn query_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Query(e.to_string())
}

pub struct ScyllaStore {
    session: Session,
    insert_event: PreparedStatement,
    insert_list: PreparedStatement,
    upsert_state: PreparedStatement,
    latest_list: PreparedStatement,
    users_with_lists: PreparedStatement,
    events_of: PreparedStatement,
    state_of: PreparedStatement,
    list_by_id: PreparedStatement,
    insert_experiment: PreparedStatement,
    insert_arm: PreparedStatement,
    arms_of_day: PreparedStatement,
    count_arm_day: PreparedStatement,
    upsert_tally: PreparedStatement,
    tally_of: PreparedStatement,
    sum_tallies: PreparedStatement,
}

/// `scylla://host1:9042,host2:9042/keyspace` → (nodes, keyspace).
pub fn parse_url(url: &str) -> Result<(Vec<String>, String), StoreError> {
    let bad = || StoreError::UnsupportedUrl(url.to_string());
    let rest = url.strip_prefix("scylla://").ok_or_else(bad)?;
    let (hosts, keyspace) = rest.split_once('/').ok_or_else(bad)?;
    let nodes: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .collect();
    let valid = !keyspace.is_empty()
        && keyspace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if nodes.is_empty() || !valid {
        return Err(bad());
    }
    Ok((nodes, keyspace.to_string()))
}

fn consistency(name: &str) -> Result<Consistency, StoreError> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "any" => Consistency::Any,
        "one" => Consistency::One,
        "two" => Consistency::Two,
        "three" => Consistency::Three,
        "quorum" => Consistency::Quorum,
        "all" => Consistency::All,
        "local_quorum" => Consistency::LocalQuorum,
        "each_quorum" => Consistency::EachQuorum,
        "local_one" => Consistency::LocalOne,
        other => {
            return Err(StoreError::Open {
                location: "store.scylla.consistency".into(),
                message: format!("unknown consistency level {other:?}"),
            })
        }
    })
}

/// The CQL statements of the schema with the settings filled in.
pub fn schema_statements(keyspace: &str, settings: &ScyllaSettings) -> Vec<String> {
    let text = SCHEMA
        .join("\n")
        .replace("{keyspace}", keyspace)
        .replace("{replication}", &settings.replication)
        .replace("{events_ttl}", &settings.events_ttl_secs.to_string())
        .replace(
            "{recommendations_ttl}",
            &settings.recommendations_ttl_secs.to_string(),
        )
        .replace(
            "{user_state_ttl}",
            &settings.user_state_ttl_secs.to_string(),
        );
    let without_comments: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// A rustls client configuration trusting the CA certificates of `tls_ca_file`.
pub fn tls_config(settings: &ScyllaSettings) -> Result<Arc<rustls::ClientConfig>, StoreError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let err = |message: String| StoreError::Open {
        location: "store.scylla.tls".into(),
        message,
    };
    let path = settings
        .tls_ca_file
        .as_ref()
        .ok_or_else(|| err("store.scylla.tls is on but store.scylla.tls_ca_file (the CA certificate, PEM) is not set".into()))?;
    let mut roots = rustls::RootCertStore::empty();
    let certs =
        CertificateDer::pem_file_iter(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
    for cert in certs {
        let cert = cert.map_err(|e| err(format!("{}: {e}", path.display())))?;
        roots
            .add(cert)
            .map_err(|e| err(format!("{}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(err(format!("{} holds no certificate", path.display())));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| err(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

impl ScyllaStore {
    pub async fn connect(url: &str, settings: &ScyllaSettings) -> Result<ScyllaStore, StoreError> {
        let (nodes, keyspace) = parse_url(url)?;
        let open_err = |message: String| StoreError::Open {
            location: url.to_string(),
            message,
        };
        let mut profile = ExecutionProfile::builder()
            .consistency(consistency(&settings.consistency)?)
            .request_timeout(Some(Duration::from_millis(settings.request_timeout_ms)))
            .retry_policy(Arc::new(DefaultRetryPolicy::new()));
        if settings.speculative_after_ms > 0 {
            profile = profile.speculative_execution_policy(Some(Arc::new(
                SimpleSpeculativeExecutionPolicy {
                    max_retry_count: 1,
                    retry_interval: Duration::from_millis(settings.speculative_after_ms),
                },
            )));
        }
        let mut builder = SessionBuilder::new()
            .known_nodes(&nodes)
            .default_execution_profile_handle(profile.build().into_handle());
        if let Some(user) = &settings.username {
            builder = builder.user(user, settings.password.as_deref().unwrap_or_default());
        }
        if settings.tls {
            builder = builder.tls_context(Some(tls_config(settings)?));
        }
        let session = builder.build().await.map_err(|e| open_err(e.to_string()))?;

        if settings.migrate {
            for statement in schema_statements(&keyspace, settings) {
                session
                    .query_unpaged(statement, &[])
                    .await
                    .map_err(|e| open_err(format!("applying schemas/cql: {e}")))?;
            }
        } else {
            let rows = session
                .query_unpaged(
                    "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ?",
                    (keyspace.as_str(),),
                )
                .await
                .map_err(|e| open_err(e.to_string()))?
                .into_rows_result()
                .map_err(|e| open_err(e.to_string()))?;
            let present: Vec<String> = rows
                .rows::<(String,)>()
                .map_err(|e| open_err(e.to_string()))?
                .filter_map(Result::ok)
                .map(|(t,)| t)
                .collect();
            let missing: Vec<&str> = TABLES
                .iter()
                .copied()
                .filter(|t| !present.iter().any(|p| p == t))
                .collect();
            if !missing.is_empty() {
                return Err(open_err(format!(
                    "keyspace {keyspace} lacks the tables {missing:?} of schemas/cql: apply it, or set store.scylla.migrate: true"
                )));
            }
        }

        let prepare = |cql: String| {
            let session = &session;
            async move {
                session.prepare(cql).await.map_err(|e| StoreError::Open {
                    location: url.to_string(),
                    message: e.to_string(),
                })
            }
        };
        let ks = &keyspace;
        Ok(ScyllaStore {
            insert_event: prepare(format!("INSERT INTO {ks}.events (user_id, ts, event_id, body) VALUES (?, ?, ?, ?)")).await?,
            insert_list: prepare(format!(
                "INSERT INTO {ks}.recommendations (user_id, user_version, generated_at, recommendation_id, body) VALUES (?, ?, ?, ?, ?)"
            ))
            .await?,
            upsert_state: prepare(format!("INSERT INTO {ks}.user_state (user_id, version, body) VALUES (?, ?, ?) USING TIMESTAMP ?")).await?,
            latest_list: prepare(format!("SELECT body FROM {ks}.recommendations WHERE user_id = ? LIMIT 1")).await?,
            users_with_lists: prepare(format!("SELECT DISTINCT user_id FROM {ks}.recommendations")).await?,
            events_of: prepare(format!("SELECT body FROM {ks}.events WHERE user_id = ? LIMIT ?")).await?,
            state_of: prepare(format!("SELECT body FROM {ks}.user_state WHERE user_id = ?")).await?,
            // Filtering inside one user's partition only.
            list_by_id: prepare(format!("SELECT body FROM {ks}.recommendations WHERE user_id = ? AND recommendation_id = ? ALLOW FILTERING")).await?,
            insert_experiment: prepare(format!("INSERT INTO {ks}.experiment_events (arm, day, kind, id, ts) VALUES (?, ?, ?, ?, ?)")).await?,
            insert_arm: prepare(format!("INSERT INTO {ks}.experiment_arms (day, arm) VALUES (?, ?)")).await?,
            arms_of_day: prepare(format!("SELECT arm FROM {ks}.experiment_arms WHERE day = ?")).await?,
            count_arm_day: prepare(format!("SELECT kind, COUNT(*) FROM {ks}.experiment_events WHERE arm = ? AND day = ? GROUP BY kind")).await?,
            // The offset is the write timestamp: a stale writer's older offset never wins.
            upsert_tally: prepare(format!("INSERT INTO {ks}.impression_tallies (arm, day, source_partition, impressions, through_offset) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?")).await?,
            tally_of: prepare(format!("SELECT impressions, through_offset FROM {ks}.impression_tallies WHERE arm = ? AND day = ? AND source_partition = ?")).await?,
            sum_tallies: prepare(format!("SELECT SUM(impressions) FROM {ks}.impression_tallies WHERE arm = ? AND day = ?")).await?,
            session,
        })
    }

    async fn first_body(
        &self,
        statement: &PreparedStatement,
        user_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let rows = self
            .session
            .execute_unpaged(statement, (user_id,))
            .await
            .map_err(query_err)?
            .into_rows_result()
            .map_err(query_err)?;
        Ok(rows
            .maybe_first_row::<(String,)>()
            .map_err(query_err)?
            .map(|(b,)| b))
    }
}

fn decode<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, StoreError> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt(e.to_string()))
}

#[async_trait]
impl Store for ScyllaStore {
    async fn write_shared(&self, batch: Arc<WriteBatch>) -> Result<(), StoreError> {
        // Rows of different users live on different nodes: concurrent single-partition
        // writes beat a multi-partition batch.
        let events: Vec<_> = batch
            .events
            .iter()
            .map(|e| {
                let (stored, e) = (&e.body, &e.event);
                (
                    e.user_id.as_str(),
                    e.ts,
                    e.event_id.as_str(),
                    stored.as_str(),
                )
            })
            .collect();
        // The body columns are text, so a list or a state in the binary form is kept as
        // its JSON.
        let list_bodies = batch
            .recommendations
            .iter()
            .map(|r| r.json())
            .collect::<Result<Vec<_>, _>>()?;
        let lists: Vec<_> = batch
            .recommendations
            .iter()
            .zip(&list_bodies)
            .map(|(r, body)| {
                (
                    r.user_id.as_str(),
                    r.user_version as i64,
                    r.generated_at,
                    r.recommendation_id.as_str(),
                    body.as_ref(),
                )
            })
            .collect();
        // The version is also the write timestamp: an older state never wins.
        let state_bodies = batch
            .user_states
            .iter()
            .map(|s| s.json())
            .collect::<Result<Vec<_>, _>>()?;
        let states: Vec<_> = batch
            .user_states
            .iter()
            .zip(&state_bodies)
            .map(|(s, body)| {
                (
                    s.user_id.as_str(),
                    s.version as i64,
                    body.as_ref(),
                    s.version as i64,
                )
            })
            .collect();
        let experiment: Vec<_> = batch
            .experiment
            .iter()
            .map(|x| {
                (
                    x.arm.as_str(),
                    x.day(),
                    x.kind.as_str(),
                    x.id.as_str(),
                    x.ts,
                )
            })
            .collect();
        let tallies: Vec<_> = batch
            .impression_tallies
            .iter()
            .map(|t| {
                (
                    t.arm.as_str(),
                    t.day,
                    t.source_partition,
                    t.impressions as i64,
                    t.through_offset,
                    t.through_offset,
                )
            })
            .collect();
        let mut arms: Vec<(i64, &str)> = batch
            .experiment
            .iter()
            .map(|x| (x.day(), x.arm.as_str()))
            .chain(
                batch
                    .impression_tallies
                    .iter()
                    .map(|t| (t.day, t.arm.as_str())),
            )
            .collect();
        arms.sort();
        arms.dedup();
        let (a, b, c, d, e, f) = futures::join!(
            futures::future::join_all(
                events
                    .into_iter()
                    .map(|v| self.session.execute_unpaged(&self.insert_event, v))
            ),
            futures::future::join_all(
                lists
                    .into_iter()
                    .map(|v| self.session.execute_unpaged(&self.insert_list, v))
            ),
            futures::future::join_all(
                states
                    .into_iter()
                    .map(|v| self.session.execute_unpaged(&self.upsert_state, v))
            ),
            futures::future::join_all(
                experiment
                    .into_iter()
                    .map(|v| self.session.execute_unpaged(&self.insert_experiment, v))
            ),
            futures::future::join_all(
                arms.into_iter()
                    .map(|v| self.session.execute_unpaged(&self.insert_arm, v))
            ),
            futures::future::join_all(
                tallies
                    .into_iter()
                    .map(|v| self.session.execute_unpaged(&self.upsert_tally, v))
            ),
        );
        for result in a.into_iter().chain(b).chain(c).chain(d).chain(e).chain(f) {
            result.map_err(query_err)?;
        }
        Ok(())
    }

    async fn latest_recommendations(
        &self,
        user_id: &str,
    ) -> Result<Option<RecommendationRecord>, StoreError> {
        self.first_body(&self.latest_list, user_id)
            .await?
            .as_deref()
            .map(decode)
            .transpose()
    }

    async fn users_with_lists(&self, limit: usize) -> Result<Option<Vec<String>>, StoreError> {
        use futures::TryStreamExt;
        // A paged scan of the partition keys, stopped as soon as it passes the limit.
        let mut rows = self
            .session
            .execute_iter(self.users_with_lists.clone(), ())
            .await
            .map_err(query_err)?
            .rows_stream::<(String,)>()
            .map_err(query_err)?;
        let mut users = Vec::new();
        while let Some((user_id,)) = rows.try_next().await.map_err(query_err)? {
            if users.len() == limit {
                return Ok(None);
            }
            users.push(user_id);
        }
        Ok(Some(users))
    }

    async fn user_events(&self, user_id: &str, limit: usize) -> Result<Vec<Event>, StoreError> {
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let rows = self
            .session
            .execute_unpaged(&self.events_of, (user_id, limit))
            .await
            .map_err(query_err)?
            .into_rows_result()
            .map_err(query_err)?;
        rows.rows::<(String,)>()
            .map_err(query_err)?
            .map(|r| decode(&r.map_err(query_err)?.0))
            .collect()
    }

    async fn user_state(&self, user_id: &str) -> Result<Option<UserVectorRecord>, StoreError> {
        self.first_body(&self.state_of, user_id)
            .await?
            .as_deref()
            .map(decode)
            .transpose()
    }

    async fn recommendation(
        &self,
        user_id: &str,
        recommendation_id: &str,
    ) -> Result<Option<RecommendationRecord>, StoreError> {
        let rows = self
            .session
            .execute_unpaged(&self.list_by_id, (user_id, recommendation_id))
            .await
            .map_err(query_err)?
            .into_rows_result()
            .map_err(query_err)?;
        rows.maybe_first_row::<(String,)>()
            .map_err(query_err)?
            .map(|(b,)| decode(&b))
            .transpose()
    }

    async fn impression_tally(
        &self,
        arm: &str,
        day: i64,
        source_partition: i32,
    ) -> Result<Option<ImpressionTally>, StoreError> {
        let rows = self
            .session
            .execute_unpaged(&self.tally_of, (arm, day, source_partition))
            .await
            .map_err(query_err)?
            .into_rows_result()
            .map_err(query_err)?;
        Ok(rows
            .maybe_first_row::<(i64, i64)>()
            .map_err(query_err)?
            .map(|(impressions, through_offset)| ImpressionTally {
                arm: arm.to_string(),
                day,
                source_partition,
                impressions: impressions as u64,
                through_offset,
            }))
    }

    async fn experiment_counts(
        &self,
        from_day: i64,
        to_day: i64,
    ) -> Result<Vec<ArmCounts>, StoreError> {
        let mut totals: std::collections::BTreeMap<String, ArmCounts> = Default::default();
        for day in from_day..=to_day {
            let arms = self
                .session
                .execute_unpaged(&self.arms_of_day, (day,))
                .await
                .map_err(query_err)?
                .into_rows_result()
                .map_err(query_err)?;
            let arms: Vec<String> = arms
                .rows::<(String,)>()
                .map_err(query_err)?
                .map(|r| r.map(|(a,)| a).map_err(query_err))
                .collect::<Result<_, _>>()?;
            for arm in arms {
                let arm_name = arm.clone();
                let rows = self
                    .session
                    .execute_unpaged(&self.count_arm_day, (arm.as_str(), day))
                    .await
                    .map_err(query_err)?
                    .into_rows_result()
                    .map_err(query_err)?;
                let entry = totals.entry(arm.clone()).or_insert_with(|| ArmCounts {
                    arm,
                    ..Default::default()
                });
                for row in rows.rows::<(String, i64)>().map_err(query_err)? {
                    let (kind, n) = row.map_err(query_err)?;
                    let kind = ExperimentKind::parse(&kind)
                        .ok_or_else(|| StoreError::Corrupt(format!("experiment kind {kind:?}")))?;
                    entry.add(kind, n as u64);
                }
                let tallied = self
                    .session
                    .execute_unpaged(&self.sum_tallies, (arm_name.as_str(), day))
                    .await
                    .map_err(query_err)?
                    .into_rows_result()
                    .map_err(query_err)?;
                if let Some((Some(n),)) = tallied
                    .maybe_first_row::<(Option<i64>,)>()
                    .map_err(query_err)?
                {
                    entry.add(ExperimentKind::Impression, n as u64);
                }
            }
        }
        Ok(totals.into_values().collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.session
            .query_unpaged("SELECT now() FROM system.local", &[])
            .await
            .map_err(query_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_nodes_and_keyspace() {
        assert_eq!(
            parse_url("scylla://a:9042,b:9042/recpipe").unwrap(),
            (
                vec!["a:9042".to_string(), "b:9042".to_string()],
                "recpipe".to_string()
            )
        );
        assert!(parse_url("scylla://a:9042").is_err());
        assert!(parse_url("scylla://a:9042/bad-name").is_err());
        assert!(parse_url("scylla:///ks").is_err());
    }

    #[test]
    fn schema_statements_fill_in_the_settings() {
        let statements = schema_statements(
            "shop",
            &ScyllaSettings {
                recommendations_ttl_secs: 60,
                ..Default::default()
            },
        );
        assert_eq!(statements.len(), 7);
        assert!(statements[0].starts_with("CREATE KEYSPACE IF NOT EXISTS shop WITH replication = {'class': 'NetworkTopologyStrategy'"));
        assert!(
            statements
                .iter()
                .any(|s| s.contains("shop.recommendations")
                    && s.contains("default_time_to_live = 60"))
        );
        assert!(statements
            .iter()
            .any(|s| s.contains("shop.impression_tallies")));
        assert!(statements
            .iter()
            .all(|s| !s.contains('{') || s.starts_with("CREATE KEYSPACE")));
    }

    #[test]
    fn tls_needs_a_readable_ca_file() {
        let on = |file: Option<&str>| ScyllaSettings {
            tls: true,
            tls_ca_file: file.map(Into::into),
            ..Default::default()
        };
        assert!(tls_config(&on(None))
            .unwrap_err()
            .to_string()
            .contains("tls_ca_file"));
        assert!(tls_config(&on(Some("/nonexistent.pem")))
            .unwrap_err()
            .to_string()
            .contains("/nonexistent.pem"));
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(tls_config(&on(empty.to_str()))
            .unwrap_err()
            .to_string()
            .contains("no certificate"));
    }

    #[test]
    fn consistency_names_are_checked() {
        assert!(matches!(
            consistency("LOCAL_QUORUM"),
            Ok(Consistency::LocalQuorum)
        ));
        assert!(consistency("most")
            .unwrap_err()
            .to_string()
            .contains("most"));
    }
}
