//! Which models are served, and to whom: a [`ModelAssignment`] loaded into indexes.
//!
//! The services hold a [`ModelRegistry`]; a new assignment is loaded beside the one in
//! use (indexes built in the background) and swapped in atomically, so a reader sees
//! either the old set or the new one, never a mix. Models that an assignment keeps
//! (same version and path) are reused, not rebuilt.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::catalog::{read_model_version, Catalog, CatalogError};
use crate::events::{ModelAssignment, ModelVariant};
use crate::model::Recommender;
use crate::settings::{HnswSettings, Settings};

/// Salt of the user → variant hash. Changing it would move every user.
const SPLIT_SALT: &str = "recpipe-variant";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid model assignment: {0}")]
    Invalid(String),
    #[error("model {version:?} at {path}: {source}")]
    Load {
        version: String,
        path: PathBuf,
        source: CatalogError,
    },
}

/// Whether a service needs the nearest-neighbour index or only the embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexKind {
    Hnsw,
    /// No index (exact scoring if asked): for services that only read embeddings.
    None,
}

/// One model of an assignment, ready to serve.
pub struct ServedModel {
    pub version: String,
    pub path: PathBuf,
    pub share: f64,
    pub recommender: Arc<Recommender>,
}

impl ServedModel {
    pub fn catalog(&self) -> &Arc<Catalog> {
        self.recommender.catalog()
    }
}

/// An assignment with its models loaded.
pub struct Serving {
    pub assignment: ModelAssignment,
    pub models: Vec<Arc<ServedModel>>,
    /// Upper end of each model's slice of [0, 1).
    bounds: Vec<f64>,
}

impl Serving {
    /// Loads every model of `assignment`, reusing those of `previous` with the same
    /// version and path.
    pub fn load(
        assignment: ModelAssignment,
        hnsw: &HnswSettings,
        index: IndexKind,
        previous: Option<&Serving>,
    ) -> Result<Serving, RegistryError> {
        assignment.validate().map_err(RegistryError::Invalid)?;
        let mut models = Vec::with_capacity(assignment.variants.len());
        for v in &assignment.variants {
            let path = PathBuf::from(&v.path);
            let reused = previous.and_then(|p| {
                p.models
                    .iter()
                    .find(|m| m.version == v.version && m.path == path)
            });
            let recommender = match reused {
                Some(m) => m.recommender.clone(),
                None => {
                    let started = Instant::now();
                    let catalog =
                        Arc::new(Catalog::load(&path).map_err(|source| RegistryError::Load {
                            version: v.version.clone(),
                            path: path.clone(),
                            source,
                        })?);
                    let recommender = match index {
                        IndexKind::Hnsw => {
                            Recommender::with_graph_file(catalog.clone(), hnsw, &path)
                        }
                        IndexKind::None => Recommender::exact(catalog.clone()),
                    };
                    tracing::info!(
                        version = %v.version,
                        path = %path.display(),
                        products = catalog.len(),
                        dim = catalog.dim(),
                        embeddings = catalog.embeddings_id(),
                        ms = started.elapsed().as_millis() as u64,
                        "model loaded"
                    );
                    Arc::new(recommender)
                }
            };
            models.push(Arc::new(ServedModel {
                version: v.version.clone(),
                path,
                share: v.share,
                recommender,
            }));
        }
        let mut bounds = Vec::with_capacity(models.len());
        let mut upper = 0.0;
        for m in &models {
            upper += m.share;
            bounds.push(upper);
        }
        Ok(Serving {
            assignment,
            models,
            bounds,
        })
    }

    /// The model that serves `user_id`: a stable hash of the id picks a point in [0, 1),
    /// and each model owns a slice as wide as its share. Growing a share moves only the
    /// users at the slice's edge.
    pub fn for_user(&self, user_id: &str) -> &Arc<ServedModel> {
        let x = crate::stable_hash::unit_interval(SPLIT_SALT, user_id);
        let i = self
            .bounds
            .iter()
            .position(|&b| x < b)
            .unwrap_or(self.models.len() - 1);
        &self.models[i]
    }

    /// The model with the largest share (the first of equals): it serves what belongs to
    /// no user (similar products, titles, the popularity list).
    pub fn primary(&self) -> &Arc<ServedModel> {
        let mut best = &self.models[0];
        for m in &self.models[1..] {
            if m.share > best.share {
                best = m;
            }
        }
        best
    }

    pub fn by_version(&self, version: &str) -> Option<&Arc<ServedModel>> {
        self.models.iter().find(|m| m.version == version)
    }

    /// Versions and shares, for logs and status.
    pub fn describe(&self) -> String {
        self.models
            .iter()
            .map(|m| format!("{} {:.0}%", m.version, m.share * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Publishes the share of each model as `recpipe_model_share{version}`, and 0 for
    /// the versions of `previous` that left.
    pub fn record_metrics(&self, previous: Option<&Serving>) {
        if let Some(p) = previous {
            for m in &p.models {
                if self.by_version(&m.version).is_none() {
                    metrics::gauge!("recpipe_model_share", "version" => m.version.clone()).set(0.0);
                }
            }
        }
        for m in &self.models {
            metrics::gauge!("recpipe_model_share", "version" => m.version.clone()).set(m.share);
        }
    }
}

/// What is served before any assignment is published: `model.variants` if set, else
/// `catalog.dir` alone, named by its metadata.json version or `model.version`.
pub fn configured_assignment(settings: &Settings) -> Result<ModelAssignment, RegistryError> {
    if !settings.model.variants.is_empty() {
        return Ok(ModelAssignment {
            variants: settings.model.variants.clone(),
            published_at: 0,
        });
    }
    let dir = &settings.catalog.dir;
    let version = read_model_version(dir)
        .map_err(|source| RegistryError::Load {
            version: settings.model.version.clone(),
            path: dir.clone(),
            source,
        })?
        .unwrap_or_else(|| settings.model.version.clone());
    Ok(ModelAssignment {
        variants: vec![ModelVariant {
            version,
            path: path_string(dir),
            share: 1.0,
        }],
        published_at: 0,
    })
}

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The assignment in use, swapped atomically (readers never wait).
pub struct ModelRegistry {
    current: ArcSwap<Serving>,
}

impl ModelRegistry {
    pub fn new(serving: Serving) -> Self {
        serving.record_metrics(None);
        ModelRegistry {
            current: ArcSwap::from_pointee(serving),
        }
    }

    /// The configured assignment, loaded, without following the `models` topic.
    pub fn from_settings(settings: &Settings, index: IndexKind) -> Result<Self, RegistryError> {
        let assignment = configured_assignment(settings)?;
        Ok(Self::new(Serving::load(
            assignment,
            &settings.model.hnsw,
            index,
            None,
        )?))
    }

    pub fn current(&self) -> Arc<Serving> {
        self.current.load_full()
    }

    /// Serves `next` from now on.
    pub fn replace(&self, next: Serving) {
        let previous = self.current.load_full();
        next.record_metrics(Some(&previous));
        tracing::info!(from = %previous.describe(), to = %next.describe(), "model assignment switched");
        metrics::counter!("recpipe_model_switches_total").increment(1);
        self.current.store(Arc::new(next));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{generate, SyntheticCatalog};

    fn model_dir(seed: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        generate(SyntheticCatalog {
            products: 300,
            dim: 8,
            seed,
            ..Default::default()
        })
        .save(dir.path())
        .unwrap();
        dir
    }

    fn variant(version: &str, dir: &tempfile::TempDir, share: f64) -> ModelVariant {
        ModelVariant {
            version: version.into(),
            path: path_string(dir.path()),
            share,
        }
    }

    fn assignment(variants: Vec<ModelVariant>) -> ModelAssignment {
        ModelAssignment {
            variants,
            published_at: 0,
        }
    }

    #[test]
    fn users_split_by_share_and_stay_put() {
        let (a, b) = (model_dir(1), model_dir(2));
        let serving = Serving::load(
            assignment(vec![variant("a", &a, 0.3), variant("b", &b, 0.7)]),
            &HnswSettings::default(),
            IndexKind::None,
            None,
        )
        .unwrap();
        let n = 10_000;
        let in_a = (0..n)
            .filter(|i| serving.for_user(&format!("u{i}")).version == "a")
            .count();
        assert!((in_a as f64 / n as f64 - 0.3).abs() < 0.02, "{in_a}");
        assert_eq!(serving.primary().version, "b");
        assert_eq!(serving.by_version("a").unwrap().share, 0.3);

        // Growing a's share to 50% keeps every user who was in a there.
        let wider = Serving::load(
            assignment(vec![variant("a", &a, 0.5), variant("b", &b, 0.5)]),
            &HnswSettings::default(),
            IndexKind::None,
            Some(&serving),
        )
        .unwrap();
        for i in 0..n {
            let u = format!("u{i}");
            if serving.for_user(&u).version == "a" {
                assert_eq!(wider.for_user(&u).version, "a");
            }
        }
        // Same version and path: the loaded model is reused, not rebuilt.
        assert!(Arc::ptr_eq(
            &serving.by_version("a").unwrap().recommender,
            &wider.by_version("a").unwrap().recommender
        ));
        assert_eq!(wider.primary().version, "a", "first of equal shares");
    }

    #[test]
    fn bad_assignments_say_what_is_wrong() {
        let a = model_dir(1);
        let load = |variants| {
            Serving::load(
                assignment(variants),
                &HnswSettings::default(),
                IndexKind::None,
                None,
            )
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
        };
        assert!(load(vec![]).contains("at least one"));
        assert!(load(vec![variant("a", &a, 0.5)]).contains("add up to 1"));
        assert!(load(vec![variant("a", &a, 0.5), variant("a", &a, 0.5)]).contains("twice"));
        assert!(load(vec![variant("a", &a, f64::NAN)]).contains("share"));
        let missing = ModelVariant {
            version: "gone".into(),
            path: "/nonexistent/model".into(),
            share: 1.0,
        };
        let message = load(vec![missing]);
        assert!(
            message.contains("\"gone\"") && message.contains("/nonexistent/model"),
            "{message}"
        );
    }

    #[test]
    fn the_registry_swaps_whole_assignments() {
        let (a, b) = (model_dir(1), model_dir(2));
        let load = |v: Vec<ModelVariant>, prev: Option<&Serving>| {
            Serving::load(
                assignment(v),
                &HnswSettings::default(),
                IndexKind::None,
                prev,
            )
            .unwrap()
        };
        let registry = ModelRegistry::new(load(vec![variant("a", &a, 1.0)], None));
        let before = registry.current();
        registry.replace(load(vec![variant("b", &b, 1.0)], Some(&before)));
        // A reader holding the old assignment keeps it whole.
        assert_eq!(before.for_user("u1").version, "a");
        assert_eq!(registry.current().for_user("u1").version, "b");
        assert_ne!(
            before.primary().catalog().embeddings_id(),
            registry.current().primary().catalog().embeddings_id()
        );
    }
}
