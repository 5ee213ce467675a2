//! Nearest products to a user's vector: HNSW (`hnsw_rs`) over the catalog embeddings, or
//! exact scoring for small catalogs and as the reference. Excluded products (the user's
//! history, purchases, unavailable ones) are filtered inside the search.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use hnsw_rs::prelude::{Distance, Hnsw};
use ndarray::ArrayView1;

use super::graph::{score_rows, Columns, FlatHnsw, GraphKey};

use crate::catalog::Catalog;
use crate::events::{ScoredProduct, UserVectorRecord};
use crate::settings::HnswSettings;

/// Recent products an explanation may name.
const EXPLAIN_FROM: usize = 20;

/// Catalogs up to this size get a deterministic, single-threaded index build.
const SERIAL_BUILD_UP_TO: usize = 20_000;

/// Layers of the HNSW graph (hnsw_rs caps it at 16).
const HNSW_LAYERS: usize = 16;

/// Deterministic id of a list: the same user state and model always give the same id, so
/// a replayed record overwrites rather than duplicates.
pub fn recommendation_id(user_id: &str, user_version: u64, model_version: &str) -> String {
    let name = format!("{user_id}\n{user_version}\n{model_version}");
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).to_string()
}

/// `1 - dot` for unit vectors. hnsw_rs's own `DistDot` asserts the result is not
/// negative, which rounding breaks for a vector and itself; this clamps instead.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnitDot;

impl Distance<f32> for UnitDot {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

fn availability(catalog: &Catalog) -> Vec<bool> {
    (0..catalog.len())
        .map(|i| catalog.product(i).available)
        .collect()
}

/// Recall of `found` (each query's answers) against `truth` (each query's true
/// neighbours, all sets of the same size `k`): the share of true neighbours found.
pub fn recall(found: &[Vec<(usize, f32)>], truth: &[HashSet<usize>]) -> f64 {
    let hits: usize = found
        .iter()
        .zip(truth)
        .map(|(f, t)| f.iter().filter(|x| t.contains(&x.0)).count())
        .sum();
    let wanted: usize = truth.iter().map(HashSet::len).sum();
    hits as f64 / wanted.max(1) as f64
}

/// The `ef_search` values [`Recommender::calibrate_ef`] tries, in order.
pub const EF_LADDER: [usize; 10] = [16, 24, 32, 48, 64, 96, 128, 192, 256, 512];

/// Queries an `ef_search` is calibrated on, of each kind: enough for recall@10 to within
/// about ±0.01, few enough that exact search over 100,000 products takes about a second.
const CALIBRATION_QUERIES: usize = 200;

/// Pairs of products drawn, at most, for each two-interest calibration query.
const PAIRS_DRAWN: usize = 64;

/// The `ef_search` a calibration settles on when no rung of [`EF_LADDER`] reaches the
/// target. There the graph, not the search, limits recall, and searching longer buys
/// little: on 100,000 generated clustered products × 64 the worst kind of query finds
/// 0.68–0.69 at 128 and 0.77–0.82 at 512 (two builds of the graph), which takes 2.9
/// times as long.
pub const EF_WHEN_UNREACHED: usize = 128;

/// What [`Recommender::calibrate_ef`] found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    pub ef_search: usize,
    /// recall@10 at that `ef_search` against exact search, on the kind of query where it
    /// is lowest.
    pub recall: f64,
    /// The highest such recall of the rungs tried: `recall` when the target was reached,
    /// else what the largest `ef_search` would have found.
    pub best_recall: f64,
}

/// Queries like users' vectors, from a fixed seed, in three kinds that are hard in
/// different ways: near one product (a new user), halfway between two unlike ones (two
/// interests), and a weighted mix of three to five (a long history).
fn calibration_queries(catalog: &Catalog, per_kind: usize) -> [Vec<Vec<f32>>; 3] {
    use rand::{Rng, SeedableRng};
    use rand_distr::StandardNormal;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mix = |rng: &mut rand_chacha::ChaCha8Rng, weights: &[f32], noise: f32| {
        let mut query = vec![0.0f32; catalog.dim()];
        for &weight in weights {
            let product = catalog.embedding(rng.random_range(0..catalog.len()));
            for (q, v) in query.iter_mut().zip(product.iter()) {
                *q += weight * v;
            }
        }
        for q in query.iter_mut() {
            *q += noise * rng.sample::<f32, _>(StandardNormal);
        }
        query
    };
    let near_one = (0..per_kind).map(|_| mix(&mut rng, &[1.0], 0.05)).collect();
    // Two interests far apart (cosine below 0.3: on clustered embeddings, two clusters)
    // are the hardest: the neighbours lie around neither product. Where few pairs are
    // that far apart (e.g. embeddings with no negative component), the least alike of
    // the pairs drawn: a bounded search, so a model always loads.
    let mut between_two = Vec::with_capacity(per_kind);
    while between_two.len() < per_kind {
        let mut least_alike = (f32::INFINITY, Vec::new());
        for _ in 0..PAIRS_DRAWN {
            let (a, b) = (
                catalog.embedding(rng.random_range(0..catalog.len())),
                catalog.embedding(rng.random_range(0..catalog.len())),
            );
            let cosine = a.dot(&b) / (a.dot(&a) * b.dot(&b)).sqrt();
            let cosine = if cosine.is_nan() {
                f32::INFINITY
            } else {
                cosine
            };
            if cosine < least_alike.0 || least_alike.1.is_empty() {
                least_alike = (cosine, (&a + &b).to_vec());
            }
            if cosine < 0.3 {
                break;
            }
        }
        between_two.push(least_alike.1);
    }
    let several = (0..per_kind)
        .map(|_| {
            let weights: Vec<f32> = (0..rng.random_range(3..=5))
                .map(|_| rng.random_range(1.0..8.0))
                .collect();
            mix(&mut rng, &weights, 0.0)
        })
        .collect();
    [near_one, between_two, several]
}

/// The file beside a catalog that holds its built HNSW graph.
pub const HNSW_GRAPH_FILE: &str = "hnsw-graph.bin";

/// The file beside [`HNSW_GRAPH_FILE`] that keeps the `ef_search` calibrated on it, so that
/// a start with `ef_search: 0` reads it rather than calibrating again (0.4 s at 20,000
/// products, about a second at 100,000).
pub const CALIBRATION_FILE: &str = "hnsw-calibration.json";

/// A calibration as kept in [`CALIBRATION_FILE`]: it holds only for the very graph file it
/// was made on (same key, size and modification time) and the same recall target.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct SavedCalibration {
    graph: GraphKey,
    graph_bytes: u64,
    graph_modified_ns: u64,
    recall_target: f64,
    ef_search: usize,
    recall: f64,
}

/// The graph file's size and modification time, which a calibration kept beside it names.
fn graph_file_stamp(path: &Path) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    let modified = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some((meta.len(), modified.as_nanos() as u64))
}

/// Writes `saved` to `path` whole or not at all.
fn save_calibration(saved: &SavedCalibration, path: &Path) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    serde_json::to_writer_pretty(file.as_file_mut(), saved)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Says that no `ef_search` tried reached `model.hnsw.recall_target`, at every start, and
/// what to do about it.
fn warn_unreached(ef_search: usize, recall: f64, best_recall: Option<f64>) {
    tracing::warn!(
        ef_search,
        recall_at_10 = recall,
        largest_ef_search = EF_LADDER[EF_LADDER.len() - 1],
        largest_recall_at_10 = best_recall,
        "no ef_search tried reaches model.hnsw.recall_target on this graph, so it searches at \
         {EF_WHEN_UNREACHED}: the largest would cost several times as much for little more. \
         Build the graph with more max_connections or ef_construction, lower recall_target, \
         or set ef_search to a number"
    );
}

/// What a graph built for `catalog` with `settings` is saved under.
pub fn graph_key(catalog: &Catalog, settings: &HnswSettings) -> GraphKey {
    GraphKey {
        embeddings_id: catalog.embeddings_id().to_string(),
        max_connections: settings.max_connections,
        ef_construction: settings.ef_construction,
    }
}

/// Builds the HNSW graph of `catalog` with `hnsw_rs` and freezes it for serving.
pub fn build_graph(catalog: &Catalog, settings: &HnswSettings) -> FlatHnsw {
    let hnsw = Hnsw::<f32, UnitDot>::new(
        settings.max_connections,
        catalog.len(),
        HNSW_LAYERS,
        settings.ef_construction,
        UnitDot,
    );
    let rows: Vec<Vec<f32>> = catalog
        .embeddings()
        .rows()
        .into_iter()
        .map(|r| r.to_vec())
        .collect();
    let data: Vec<(&[f32], usize)> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.as_slice(), i))
        .collect();
    // Below this size a serial build is quick and, with hnsw_rs's seeded level
    // generator, gives the same graph every time; above it, both cores build.
    if data.len() <= SERIAL_BUILD_UP_TO {
        for point in &data {
            hnsw.insert_slice(*point);
        }
    } else {
        hnsw.parallel_insert_slice(&data);
    }
    // The builder (and its copy of every vector) is dropped once frozen.
    FlatHnsw::freeze(&hnsw, catalog.len(), catalog.dim())
}

/// Writes the graph file for `key` at `path` whole or not at all (a temporary file
/// renamed over it), so a reader never sees half of one.
pub fn save_graph(graph: &FlatHnsw, key: &GraphKey, path: &Path) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    // One write of the whole file: `write` encodes it in memory first.
    graph.write(key, file.as_file_mut())?;
    // A temporary file is private to its owner; the graph is read by whoever serves it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Dot product in independent lanes (vectorisable without `unsafe`).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    super::graph::dot16(a, b)
}

/// A product and its score, ordered best first: higher score, then lower index.
#[derive(Debug, Clone, Copy)]
struct Ranked(usize, f32);

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.1.total_cmp(&self.1).then(self.0.cmp(&other.0))
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Ranked {}

/// Products and their embeddings, one row each (see [`Recommender::rows_of`]).
#[derive(Default)]
struct Rows {
    products: Vec<usize>,
    vectors: Vec<f32>,
}

/// Catalogs up to this many products are scored by column in exact search ([`Columns`]),
/// larger ones by row: the crossover lies between 4,000 products (by column faster) and
/// 100,000 (slower).
const BY_COLUMN_UP_TO: usize = 16_384;

enum Index {
    /// Every product scored; by column when the catalog is small enough.
    Exact(Option<Columns>),
    /// Built by `hnsw_rs`, searched flat (see [`FlatHnsw`]).
    Hnsw(FlatHnsw),
}

impl Index {
    fn exact(catalog: &Catalog) -> Index {
        Index::Exact(
            (catalog.len() <= BY_COLUMN_UP_TO)
                .then(|| Columns::from_rows(catalog.embeddings_slice(), catalog.dim())),
        )
    }
}

pub struct Recommender {
    catalog: Arc<Catalog>,
    index: Index,
    ef_search: usize,
    /// How `ef_search` was calibrated, when it was (`ef_search: 0`); `best_recall` is
    /// `recall` when read from a calibration file.
    calibration: Option<Calibration>,
    /// The catalog's availability flags, dense: the search consults them per candidate.
    available: Vec<bool>,
}

impl Recommender {
    /// Builds the index (HNSW unless the catalog is below `settings.exact_below`).
    pub fn new(catalog: Arc<Catalog>, settings: &HnswSettings) -> Self {
        let index = if catalog.len() < settings.exact_below {
            Index::exact(&catalog)
        } else {
            Index::Hnsw(build_graph(&catalog, settings))
        };
        Recommender {
            available: availability(&catalog),
            catalog,
            index,
            ef_search: settings.ef_search,
            calibration: None,
        }
        .with_ef_for(settings)
    }

    /// As [`Recommender::new`], but the graph comes from the model directory's
    /// [`HNSW_GRAPH_FILE`] when that was built for this catalog and these settings.
    /// Otherwise it is built and saved there (best effort: a read-only directory only
    /// costs the next start the build again), so a restart does not rebuild it. Building
    /// takes seconds to minutes at tens of thousands of products; reading, milliseconds.
    pub fn with_graph_file(catalog: Arc<Catalog>, settings: &HnswSettings, dir: &Path) -> Self {
        if catalog.len() < settings.exact_below {
            return Recommender::new(catalog, settings);
        }
        let key = graph_key(&catalog, settings);
        let path = dir.join(HNSW_GRAPH_FILE);
        let read = match std::fs::read(&path) {
            Ok(bytes) => FlatHnsw::read(&key, &bytes)
                .map_err(|e| e.to_string())
                .and_then(|g| {
                    (g.len() == catalog.len() && g.dim() == catalog.dim())
                        .then_some(g)
                        .ok_or_else(|| "another number of products or dimensions".to_string())
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(String::new()),
            Err(e) => Err(e.to_string()),
        };
        let graph = match read {
            Ok(graph) => {
                tracing::info!(path = %path.display(), "HNSW graph read from its file");
                graph
            }
            Err(why) => {
                if !why.is_empty() {
                    tracing::warn!(path = %path.display(), reason = %why, "HNSW graph file not used: building the graph");
                }
                let started = std::time::Instant::now();
                let graph = build_graph(&catalog, settings);
                let ms = started.elapsed().as_millis() as u64;
                match save_graph(&graph, &key, &path) {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), ms, "HNSW graph built and saved")
                    }
                    Err(e) => tracing::info!(
                        path = %path.display(), ms, error = %e,
                        "HNSW graph built, not saved: every start builds it again (build it \
                         beside the catalog with `recpipe-admin catalog index --dir {}`)",
                        dir.display()
                    ),
                }
                graph
            }
        };
        Recommender {
            available: availability(&catalog),
            catalog,
            index: Index::Hnsw(graph),
            ef_search: settings.ef_search,
            calibration: None,
        }
        .with_ef_kept_beside(settings, &path)
    }

    /// As [`Recommender::with_ef_for`], keeping an automatic `ef_search` in
    /// [`CALIBRATION_FILE`] beside the graph file at `graph_path`: read from there when it
    /// was made on that very file for the same target, else calibrated and saved (best
    /// effort, as the graph).
    fn with_ef_kept_beside(mut self, settings: &HnswSettings, graph_path: &Path) -> Self {
        if settings.ef_search != 0 || self.is_exact() {
            return self.with_ef_for(settings);
        }
        let Some((graph_bytes, graph_modified_ns)) = graph_file_stamp(graph_path) else {
            return self.with_ef_for(settings);
        };
        let path = graph_path.with_file_name(CALIBRATION_FILE);
        let graph = graph_key(&self.catalog, settings);
        let kept = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<SavedCalibration>(&bytes).ok())
            .filter(|saved| {
                saved.graph == graph
                    && saved.graph_bytes == graph_bytes
                    && saved.graph_modified_ns == graph_modified_ns
                    && saved.recall_target == settings.recall_target
                    && saved.ef_search > 0
                    // Made when an unreached target searched at the largest rung.
                    && (saved.recall >= saved.recall_target
                        || saved.ef_search == EF_WHEN_UNREACHED)
            });
        if let Some(saved) = kept {
            tracing::info!(
                ef_search = saved.ef_search,
                recall_at_10 = saved.recall,
                target = saved.recall_target,
                path = %path.display(),
                "ef_search read from its calibration file"
            );
            if saved.recall < saved.recall_target {
                warn_unreached(saved.ef_search, saved.recall, None);
            }
            self.ef_search = saved.ef_search;
            self.calibration = Some(Calibration {
                ef_search: saved.ef_search,
                recall: saved.recall,
                best_recall: saved.recall,
            });
            return self;
        }
        let found = self.calibrate_and_log(settings);
        let saved = SavedCalibration {
            graph,
            graph_bytes,
            graph_modified_ns,
            recall_target: settings.recall_target,
            ef_search: found.ef_search,
            recall: found.recall,
        };
        if let Err(e) = save_calibration(&saved, &path) {
            tracing::info!(path = %path.display(), error = %e, "calibrated ef_search not saved: every start calibrates again");
        }
        self
    }

    /// `settings.ef_search`, or when that is 0 (auto) the one [`Recommender::calibrate_ef`]
    /// finds for `settings.recall_target`.
    fn with_ef_for(mut self, settings: &HnswSettings) -> Self {
        if settings.ef_search == 0 && !self.is_exact() {
            self.calibrate_and_log(settings);
        }
        self
    }

    /// Calibrates `ef_search` to `settings.recall_target` and uses it; logs what it found.
    fn calibrate_and_log(&mut self, settings: &HnswSettings) -> Calibration {
        let started = std::time::Instant::now();
        let found = self.calibrate_ef(settings.recall_target);
        tracing::info!(
            ef_search = found.ef_search,
            recall_at_10 = found.recall,
            target = settings.recall_target,
            ms = started.elapsed().as_millis() as u64,
            "ef_search calibrated on this catalog"
        );
        if found.recall < settings.recall_target {
            warn_unreached(found.ef_search, found.recall, Some(found.best_recall));
        }
        self.ef_search = found.ef_search;
        self.calibration = Some(found);
        found
    }

    /// How `ef_search` was calibrated, when it was.
    pub fn calibration(&self) -> Option<Calibration> {
        self.calibration
    }

    /// Candidates examined per HNSW query.
    pub fn ef_search(&self) -> usize {
        self.ef_search
    }

    /// The smallest `ef_search` of [`EF_LADDER`] whose recall@10 against exact search
    /// reaches `target` on each kind of query made like users' vectors (see
    /// `calibration_queries`); [`EF_WHEN_UNREACHED`] when none does. How many candidates
    /// a search must examine depends on the catalog: 48 reaches 0.95 on the peer
    /// benchmark's 20,000 random 64-d embeddings, 192 on 20,000 generated clustered ones.
    /// Deterministic for a catalog.
    pub fn calibrate_ef(&mut self, target: f64) -> Calibration {
        let kinds = calibration_queries(&self.catalog, CALIBRATION_QUERIES);
        let exact = Recommender::exact(self.catalog.clone());
        let truths: Vec<_> = kinds.iter().map(|q| exact.neighbour_sets(q, 10)).collect();
        let mut tried = Vec::with_capacity(EF_LADDER.len());
        for ef in EF_LADDER {
            self.ef_search = ef;
            // The worst kind of query counts: each must reach the target.
            let worst = kinds
                .iter()
                .zip(&truths)
                .map(|(queries, truth)| {
                    let results: Vec<Vec<(usize, f32)>> = queries
                        .iter()
                        .map(|q| self.nearest(q, 10, &|_| false))
                        .collect();
                    recall(&results, truth)
                })
                .fold(f64::INFINITY, f64::min);
            if worst >= target {
                return Calibration {
                    ef_search: ef,
                    recall: worst,
                    best_recall: worst,
                };
            }
            tried.push((ef, worst));
        }
        let best_recall = tried.iter().map(|t| t.1).fold(0.0, f64::max);
        let (ef_search, recall) = tried
            .into_iter()
            .find(|t| t.0 == EF_WHEN_UNREACHED)
            .expect("EF_WHEN_UNREACHED is a rung of EF_LADDER");
        self.ef_search = ef_search;
        Calibration {
            ef_search,
            recall,
            best_recall,
        }
    }

    /// A recommender that always scores exactly (the reference for recall).
    pub fn exact(catalog: Arc<Catalog>) -> Self {
        Recommender {
            available: availability(&catalog),
            index: Index::exact(&catalog),
            catalog,
            ef_search: 0,
            calibration: None,
        }
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// Candidates examined per HNSW query (recall against speed).
    pub fn set_ef_search(&mut self, ef: usize) {
        self.ef_search = ef;
    }

    pub fn is_exact(&self) -> bool {
        matches!(self.index, Index::Exact(_))
    }

    /// The `k` nearest available products to `query` that `exclude` does not reject, best
    /// first, by cosine similarity. Empty when `query` is all zeros.
    pub fn nearest(
        &self,
        query: &[f32],
        k: usize,
        exclude: &(dyn Fn(usize) -> bool + Sync),
    ) -> Vec<(usize, f32)> {
        let q = ArrayView1::from(query);
        let norm = q.dot(&q).sqrt();
        if norm == 0.0 || !norm.is_finite() || k == 0 {
            return Vec::new();
        }
        let unit: Vec<f32> = query.iter().map(|v| v / norm).collect();
        let allowed = |i: usize| self.available[i] && !exclude(i);
        let found = match &self.index {
            Index::Exact(_) => Vec::new(),
            Index::Hnsw(graph) => graph
                .search(
                    self.catalog.embeddings_slice(),
                    &unit,
                    k,
                    self.ef_search,
                    &allowed,
                )
                .into_iter()
                .map(|(i, distance)| (i, 1.0 - distance))
                .collect(),
        };
        if found.len() >= k {
            return found;
        }
        // Exact scoring: the configured index, or too few results got past the filter.
        self.exact_nearest(&unit, k, &allowed)
    }

    fn exact_nearest(
        &self,
        unit: &[f32],
        k: usize,
        allowed: &dyn Fn(usize) -> bool,
    ) -> Vec<(usize, f32)> {
        let mut scores = Vec::with_capacity(self.catalog.len());
        match &self.index {
            Index::Exact(Some(columns)) => columns.score(unit, &mut scores),
            _ => score_rows(self.catalog.embeddings_slice(), unit, &mut scores),
        }
        // Candidates, cut back to the k best whenever the buffer fills; after the first cut
        // a product must beat the k-th best so far, so most of a catalog is passed over on
        // one comparison and never put to the filter. Cheaper than a heap of k, whose every
        // entry costs a push and a pop.
        let cap = (2 * k).max(k + 32);
        let mut kept: Vec<Ranked> = Vec::with_capacity(cap);
        let mut floor: Option<f32> = None;
        // Scores compared with the floor at once.
        const SCAN_CHUNK: usize = 16;
        for (chunk, in_chunk) in scores.chunks(SCAN_CHUNK).enumerate() {
            // A run of products none of which reaches the floor is passed over on one
            // comparison the compiler makes with vector instructions: one product at a
            // time, the floor's comparison was the largest part of gen-recommendations'
            // own time on a small catalog (17 % of its samples in the relay). `s < f` is
            // never true of a score the test below keeps (NaN and -0.0 against 0.0 are
            // left to it), so the ranking is the same.
            if floor.is_some_and(|f| in_chunk.iter().fold(true, |all, &s| all & (s < f))) {
                continue;
            }
            for (at, &score) in in_chunk.iter().enumerate() {
                let i = chunk * SCAN_CHUNK + at;
                // Products come in index order and equal scores rank by index, so a score
                // equal to the floor loses to the product that set it.
                if floor.is_some_and(|f| score.total_cmp(&f).is_le()) || !allowed(i) {
                    continue;
                }
                kept.push(Ranked(i, score));
                if kept.len() == cap {
                    kept.select_nth_unstable(k - 1);
                    kept.truncate(k);
                    floor = Some(kept[k - 1].1);
                }
            }
        }
        kept.sort_unstable();
        kept.truncate(k);
        kept.into_iter()
            .map(|Ranked(i, score)| (i, score))
            .collect()
    }

    /// The user's list: nearest products excluding what they touched or bought. None when
    /// the user's vector carries no signal yet (the caller falls back to popularity).
    pub fn recommend(&self, user: &UserVectorRecord, k: usize) -> Option<Vec<ScoredProduct>> {
        self.recommend_where(user, k, &|_| true)
    }

    /// As [`Recommender::recommend`], among the products `keep` accepts (e.g. one category).
    pub fn recommend_where(
        &self,
        user: &UserVectorRecord,
        k: usize,
        keep: &(dyn Fn(usize) -> bool + Sync),
    ) -> Option<Vec<ScoredProduct>> {
        // Sorted ids rather than a hash set: a few dozen, looked up only for candidates.
        let mut excluded: Vec<usize> = user
            .recent_products
            .iter()
            .chain(&user.purchased)
            .filter_map(|p| self.catalog.index_of(p))
            .collect();
        excluded.sort_unstable();
        let nearest = self.nearest(&user.vector, k, &|i| {
            excluded.binary_search(&i).is_ok() || !keep(i)
        });
        if nearest.is_empty() {
            return None;
        }
        let history = self.rows_of(
            user.recent_products
                .iter()
                .take(EXPLAIN_FROM)
                .filter_map(|p| self.catalog.index_of(p)),
        );
        let mut scores = Vec::with_capacity(EXPLAIN_FROM);
        Some(
            nearest
                .into_iter()
                .map(|(i, score)| ScoredProduct {
                    product_id: self.catalog.product(i).product_id.clone(),
                    score,
                    because: self
                        .closest(i, &history, &mut scores)
                        .map(|h| self.catalog.product(h).product_id.clone()),
                })
                .collect(),
        )
    }

    /// Each query's `k` nearest products, as sets: the truth recall is measured against
    /// (from an exact recommender).
    pub fn neighbour_sets(&self, queries: &[Vec<f32>], k: usize) -> Vec<HashSet<usize>> {
        queries
            .iter()
            .map(|q| {
                self.nearest(q, k, &|_| false)
                    .into_iter()
                    .map(|x| x.0)
                    .collect()
            })
            .collect()
    }

    /// Products and their embedding rows side by side, so scoring a product against all
    /// of them is one pass of [`score_rows`].
    fn rows_of(&self, products: impl Iterator<Item = usize>) -> Rows {
        let mut rows = Rows::default();
        for h in products {
            rows.products.push(h);
            rows.vectors.extend_from_slice(self.row(h));
        }
        rows
    }

    fn row(&self, i: usize) -> &[f32] {
        let dim = self.catalog.dim();
        &self.catalog.embeddings_slice()[i * dim..(i + 1) * dim]
    }

    /// The product of `among` most similar to product `i` (the last of equals).
    fn closest(&self, i: usize, among: &Rows, scores: &mut Vec<f32>) -> Option<usize> {
        if among.products.is_empty() {
            return None;
        }
        score_rows(&among.vectors, self.row(i), scores);
        scores
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(n, _)| among.products[n])
    }

    /// Products most similar to product `i` (itself and unavailable ones excluded).
    pub fn similar(&self, i: usize, k: usize) -> Vec<(usize, f32)> {
        let query = self.catalog.embedding(i).to_vec();
        self.nearest(&query, k, &|j| j == i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{generate, SyntheticCatalog};

    fn catalog(n: usize) -> Arc<Catalog> {
        Arc::new(generate(SyntheticCatalog {
            products: n,
            dim: 32,
            ..Default::default()
        }))
    }

    #[test]
    fn the_graph_is_built_once_then_read_from_its_file_beside_the_catalog() {
        let dir = tempfile::tempdir().unwrap();
        let cat = catalog(600);
        let settings = HnswSettings {
            max_connections: 12,
            ef_construction: 60,
            ..graph_always()
        };
        let path = dir.path().join(HNSW_GRAPH_FILE);
        let built = Recommender::with_graph_file(cat.clone(), &settings, dir.path());
        let Index::Hnsw(graph) = &built.index else {
            panic!("a graph is searched");
        };
        let key = graph_key(&cat, &settings);
        let saved = FlatHnsw::read(&key, &std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(&saved, graph, "the graph is saved beside the catalog");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o644, "readable by the services' user");
        }

        // The next start reads it: a graph only the file holds (built with other
        // settings, saved under this key) is the one searched.
        let other = HnswSettings {
            max_connections: 6,
            ..settings.clone()
        };
        let only_in_file = build_graph(&cat, &other);
        assert_ne!(&only_in_file, graph);
        save_graph(&only_in_file, &key, &path).unwrap();
        let read = Recommender::with_graph_file(cat.clone(), &settings, dir.path());
        let Index::Hnsw(read_graph) = &read.index else {
            panic!("a graph is searched");
        };
        assert_eq!(read_graph, &only_in_file);
        let user = cat.embedding(5).to_vec();
        assert_eq!(read.nearest(&user, 10, &|_| false).len(), 10);

        // A file for other settings (or another catalog, or damaged) is replaced.
        let rebuilt = Recommender::with_graph_file(cat.clone(), &other, dir.path());
        assert!(matches!(rebuilt.index, Index::Hnsw(_)));
        let other_key = graph_key(&cat, &other);
        assert!(FlatHnsw::read(&other_key, &std::fs::read(&path).unwrap()).is_ok());
        std::fs::write(&path, b"garbage").unwrap();
        let _ = Recommender::with_graph_file(cat.clone(), &settings, dir.path());
        assert_eq!(
            &FlatHnsw::read(&key, &std::fs::read(&path).unwrap()).unwrap(),
            graph
        );

        // A directory it cannot write to costs only the build.
        let missing = dir.path().join("no-such-dir");
        let unsaved = Recommender::with_graph_file(cat, &settings, &missing);
        assert!(matches!(unsaved.index, Index::Hnsw(_)));
        assert!(!missing.exists());
    }

    #[test]
    fn an_automatic_ef_search_is_kept_beside_its_graph_for_that_graph_and_target_only() {
        let cat = catalog(1_500);
        let dir = tempfile::tempdir().unwrap();
        let auto = HnswSettings {
            ef_search: 0,
            ..graph_always()
        };
        let kept = dir.path().join(CALIBRATION_FILE);
        let read_kept =
            || serde_json::from_slice::<SavedCalibration>(&std::fs::read(&kept).unwrap()).unwrap();
        // The first start builds the graph, calibrates on it and keeps both.
        let first = Recommender::with_graph_file(cat.clone(), &auto, dir.path());
        let calibrated = first.ef_search();
        assert!(EF_LADDER.contains(&calibrated));
        let saved = read_kept();
        assert_eq!((saved.ef_search, saved.recall_target), (calibrated, 0.95));

        // The next start takes the kept one: shown by a kept value no calibration gives.
        let mut planted = saved.clone();
        planted.ef_search = 777;
        std::fs::write(&kept, serde_json::to_vec(&planted).unwrap()).unwrap();
        let next = Recommender::with_graph_file(cat.clone(), &auto, dir.path());
        assert_eq!(next.ef_search(), 777);

        // A kept target not reached is kept at EF_WHEN_UNREACHED only: one left at the
        // largest rung (before EF_WHEN_UNREACHED was the rule) is calibrated again.
        let mut unreached = saved.clone();
        unreached.recall = 0.5;
        for (kept_ef, then) in [(EF_WHEN_UNREACHED, EF_WHEN_UNREACHED), (512, calibrated)] {
            unreached.ef_search = kept_ef;
            std::fs::write(&kept, serde_json::to_vec(&unreached).unwrap()).unwrap();
            let next = Recommender::with_graph_file(cat.clone(), &auto, dir.path());
            assert_eq!(next.ef_search(), then, "kept {kept_ef}");
        }
        std::fs::write(&kept, serde_json::to_vec(&planted).unwrap()).unwrap();

        // Another target is calibrated again, and kept in place of the old one.
        let stricter = HnswSettings {
            recall_target: 0.99,
            ..auto.clone()
        };
        let strict = Recommender::with_graph_file(cat.clone(), &stricter, dir.path());
        assert_ne!(strict.ef_search(), 777);
        assert!(strict.ef_search() >= calibrated);
        assert_eq!(read_kept().recall_target, 0.99);

        // A graph file written again is another graph: its calibration is made anew.
        std::fs::write(&kept, serde_json::to_vec(&planted).unwrap()).unwrap();
        let Index::Hnsw(graph) = &first.index else {
            panic!("a graph is searched");
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        save_graph(
            graph,
            &graph_key(&cat, &auto),
            &dir.path().join(HNSW_GRAPH_FILE),
        )
        .unwrap();
        let rewritten = Recommender::with_graph_file(cat.clone(), &auto, dir.path());
        assert_eq!(rewritten.ef_search(), calibrated);

        // A fixed ef_search is used as given, whatever is kept.
        let fixed = HnswSettings {
            ef_search: 128,
            ..graph_always()
        };
        let fixed = Recommender::with_graph_file(cat, &fixed, dir.path());
        assert_eq!(fixed.ef_search(), 128);
    }

    /// The default settings (`ef_search` automatic), with a graph however small the catalog.
    fn graph_always() -> HnswSettings {
        HnswSettings {
            exact_below: 0,
            ..HnswSettings::default()
        }
    }

    #[test]
    fn hnsw_recall_at_10_on_queries_it_was_not_calibrated_on() {
        let catalog = catalog(5_000);
        let exact = Recommender::exact(catalog.clone());
        // Between two products, as a user vector is: pairs the calibration never drew.
        let queries: Vec<Vec<f32>> = (0..catalog.len())
            .step_by(25)
            .map(|q| {
                (&catalog.embedding(q) + &catalog.embedding((q * 7 + 3) % catalog.len())).to_vec()
            })
            .collect();
        let truth = exact.neighbour_sets(&queries, 10);
        let recall_of = |hnsw: &Recommender| {
            assert!(!hnsw.is_exact());
            let found: Vec<_> = queries
                .iter()
                .map(|q| hnsw.nearest(q, 10, &|_| false))
                .collect();
            assert!(found.iter().all(|f| f.len() == 10));
            recall(&found, &truth)
        };
        // The default calibrates on 200 queries of each kind: on others it lands within
        // their sampling spread of the target (here ef 64: 0.948; ef 32 would find 0.87).
        let mut hnsw = Recommender::new(catalog, &graph_always());
        let (calibrated, recall_calibrated) = (hnsw.ef_search(), recall_of(&hnsw));
        // The graph itself, given candidates enough.
        hnsw.set_ef_search(128);
        let recall_wide = recall_of(&hnsw);
        eprintln!(
            "HNSW recall@10 on two-product queries, 5k catalog: {recall_calibrated:.3} at the \
             calibrated ef_search {calibrated}, {recall_wide:.3} at 128"
        );
        assert!(recall_calibrated >= 0.93, "recall@10 {recall_calibrated}");
        assert!(recall_wide >= 0.95, "recall@10 {recall_wide}");
    }

    #[test]
    fn an_automatic_ef_search_is_the_smallest_that_reaches_the_recall_target() {
        let catalog = catalog(5_000);
        let kinds = calibration_queries(&catalog, CALIBRATION_QUERIES);
        let exact = Recommender::exact(catalog.clone());
        let truths: Vec<_> = kinds.iter().map(|q| exact.neighbour_sets(q, 10)).collect();
        let auto = HnswSettings {
            ef_search: 0,
            ..graph_always()
        };
        let mut hnsw = Recommender::new(catalog.clone(), &auto);
        let recall_at = |hnsw: &mut Recommender, ef: usize| {
            hnsw.set_ef_search(ef);
            kinds
                .iter()
                .zip(&truths)
                .map(|(queries, truth)| {
                    let found: Vec<_> = queries
                        .iter()
                        .map(|q| hnsw.nearest(q, 10, &|_| false))
                        .collect();
                    recall(&found, truth)
                })
                .fold(f64::INFINITY, f64::min)
        };
        // 0 is calibrated at load, to what calibrate_ef finds.
        let loaded_with = hnsw.ef_search;
        let found = hnsw.calibrate_ef(0.95);
        assert_eq!(loaded_with, found.ef_search);
        assert!(found.recall >= 0.95, "{found:?}");
        assert_eq!(recall_at(&mut hnsw, found.ef_search), found.recall);
        // Smallest: the rung below misses the target (unless it is the first rung).
        let rung = EF_LADDER
            .iter()
            .position(|&ef| ef == found.ef_search)
            .unwrap();
        if rung > 0 {
            let below = recall_at(&mut hnsw, EF_LADDER[rung - 1]);
            assert!(
                below < 0.95,
                "ef {} already reaches {below}",
                EF_LADDER[rung - 1]
            );
        }
        // A stricter target, reached, never asks for fewer candidates.
        let stricter = hnsw.calibrate_ef(0.99);
        assert!(stricter.recall >= 0.99, "{stricter:?}");
        assert!(
            stricter.ef_search >= found.ef_search,
            "{stricter:?} {found:?}"
        );
        // A target no rung reaches: the graph limits recall, and the search settles at
        // EF_WHEN_UNREACHED rather than at the largest, reporting what that would find.
        let unreachable = hnsw.calibrate_ef(1.01);
        assert_eq!(unreachable.ef_search, EF_WHEN_UNREACHED);
        assert_eq!(hnsw.ef_search, EF_WHEN_UNREACHED);
        assert_eq!(unreachable.recall, recall_at(&mut hnsw, EF_WHEN_UNREACHED));
        assert_eq!(
            unreachable.best_recall,
            recall_at(&mut hnsw, *EF_LADDER.last().unwrap())
        );
        assert!(unreachable.best_recall >= unreachable.recall);
        // A number in the settings is used as it is.
        let fixed = Recommender::new(
            catalog,
            &HnswSettings {
                ef_search: 48,
                ..graph_always()
            },
        );
        assert_eq!(fixed.ef_search, 48);
    }

    #[test]
    fn a_catalog_whose_products_are_all_alike_is_still_calibrated() {
        // No negative component: every pair's cosine is far above 0.3, so the two-interest
        // queries take the least alike pair drawn instead of waiting for an unlike one.
        let generated = catalog(1_000);
        let catalog = Arc::new(
            Catalog::new(
                generated.products().to_vec(),
                generated.embeddings().mapv(|v| v.abs() + 1.0),
            )
            .unwrap(),
        );
        let kinds = calibration_queries(&catalog, 20);
        assert!(kinds.iter().all(|k| k.len() == 20));
        let mut hnsw = Recommender::new(catalog, &graph_always());
        let found = hnsw.calibrate_ef(0.95);
        assert!(EF_LADDER.contains(&found.ef_search), "{found:?}");
        assert!(found.recall > 0.0, "{found:?}");
    }

    #[test]
    fn excluded_and_unavailable_products_never_come_back() {
        let catalog = catalog(1_000);
        for rec in [
            Recommender::new(catalog.clone(), &graph_always()),
            Recommender::exact(catalog.clone()),
        ] {
            for q in 0..50 {
                let v = catalog.embedding(q).to_vec();
                // Exclude the 30 nearest: the filter must hold even when it removes the best.
                let banned: HashSet<usize> = Recommender::exact(catalog.clone())
                    .nearest(&v, 30, &|_| false)
                    .into_iter()
                    .map(|x| x.0)
                    .collect();
                let got = rec.nearest(&v, 10, &|i| banned.contains(&i));
                assert_eq!(got.len(), 10);
                for (i, _) in got {
                    assert!(!banned.contains(&i));
                    assert!(catalog.product(i).available, "{i} unavailable");
                }
            }
        }
    }

    #[test]
    fn exact_search_is_the_full_ranking_of_allowed_products() {
        let catalog = catalog(1_000);
        let exact = Recommender::exact(catalog.clone());
        let rows = catalog.embeddings();
        for q in 0..20 {
            let v = catalog.embedding(q * 37).to_vec();
            let skip = |i: usize| i % 3 == q % 3;
            // Every allowed product scored and sorted: best first, ties by index.
            let mut want: Vec<(usize, f32)> = (0..catalog.len())
                .filter(|&i| catalog.product(i).available && !skip(i))
                .map(|i| (i, dot(rows.row(i).as_slice().unwrap(), &v)))
                .collect();
            want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            want.truncate(25);
            let got = exact.nearest(&v, 25, &skip);
            let ids = |l: &[(usize, f32)]| l.iter().map(|x| x.0).collect::<Vec<_>>();
            assert_eq!(ids(&got), ids(&want), "query {q}");
            for (g, w) in got.iter().zip(&want) {
                // The search's kernel may fuse multiply-adds: the last bits may differ.
                assert!((g.1 - w.1).abs() < 1e-5, "query {q}: {g:?} vs {w:?}");
            }
        }
        // Equal scores: the lower index first, whatever order they come in.
        let tied = Ranked(3, 0.5);
        assert!(tied < Ranked(7, 0.5) && tied > Ranked(9, 0.6) && tied < Ranked(1, 0.4));
    }

    #[test]
    fn exact_search_ranks_equal_scores_by_index_whatever_k_and_filter() {
        // 600 products on 5 distinct directions: every score is shared by about 120
        // products, so the cut-off between the k best and the rest falls among equals.
        let directions = [
            [1.0, 0.0, 0.0],
            [0.0, 1.0, 0.0],
            [0.6, 0.8, 0.0],
            [0.0, 0.6, 0.8],
            [0.0, 0.0, 1.0],
        ];
        let n = 600;
        let products = (0..n)
            .map(|i| crate::catalog::Product {
                product_id: format!("p{i}"),
                title: String::new(),
                category: String::new(),
                available: i % 11 != 0,
            })
            .collect();
        let rows = ndarray::Array2::from_shape_fn((n, 3), |(i, d)| directions[(i * 7) % 5][d]);
        let catalog = Arc::new(Catalog::new(products, rows).unwrap());
        let exact = Recommender::exact(catalog.clone());
        for (q, query) in [[0.9f32, 0.3, 0.1], [0.1, 0.2, 0.9], [0.5, 0.5, 0.5]]
            .iter()
            .enumerate()
        {
            let norm = query.iter().map(|v| v * v).sum::<f32>().sqrt();
            let unit: Vec<f32> = query.iter().map(|v| v / norm).collect();
            // The same direction gives the same score, bit for bit, whichever kernel.
            let score = |i: usize| {
                let d = directions[(i * 7) % 5];
                ((d[0] * unit[0]) as f64 + (d[1] * unit[1]) as f64 + (d[2] * unit[2]) as f64) as f32
            };
            for k in [1, 5, 20, 33, 130, 599, 700] {
                for m in [2, 3, 7] {
                    let skip = |i: usize| i % m == 1;
                    // Every allowed product scored and sorted: best first, ties by index.
                    let mut want: Vec<usize> = (0..n)
                        .filter(|&i| catalog.product(i).available && !skip(i))
                        .collect();
                    want.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
                    want.truncate(k);
                    let got = exact.nearest(query, k, &skip);
                    let ids: Vec<usize> = got.iter().map(|x| x.0).collect();
                    assert_eq!(ids, want, "query {q}, k {k}, skip i % {m} == 1");
                    for (i, s) in got {
                        assert!((s - score(i)).abs() < 1e-5, "query {q}, product {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn user_history_is_excluded_and_zero_vector_means_no_list() {
        let catalog = catalog(500);
        let rec = Recommender::new(catalog.clone(), &graph_always());
        let mut user = UserVectorRecord {
            user_id: "u".into(),
            vector: catalog.embedding(7).to_vec(),
            anchor_ts: 0,
            version: 1,
            recent_products: vec!["p-00007".into()],
            purchased: vec!["p-00017".into()],
            last_event: crate::events::LastEvent {
                event_id: "e".into(),
                event_type: crate::events::EventType::View,
                product_id: None,
                ts: 0,
            },
            source: crate::events::SourcePosition {
                partition: 0,
                offset: 0,
            },
            updated_at: 0,
            embeddings: None,
            recent_event_ids: Vec::new(),
            folded_events: Vec::new(),
        };
        let list = rec.recommend(&user, 20).unwrap();
        assert_eq!(list.len(), 20);
        assert!(list
            .iter()
            .all(|s| s.product_id != "p-00007" && s.product_id != "p-00017"));
        assert!(list.windows(2).all(|w| w[0].score >= w[1].score));
        user.vector = vec![0.0; 32];
        assert_eq!(rec.recommend(&user, 20), None);
    }

    #[test]
    fn lists_explain_themselves_and_similar_excludes_the_product() {
        let catalog = catalog(500);
        let rec = Recommender::new(catalog.clone(), &graph_always());
        let coffee: Vec<usize> = (0..500)
            .filter(|&i| catalog.product(i).category == "coffee")
            .take(3)
            .collect();
        let garden: Vec<usize> = (0..500)
            .filter(|&i| catalog.product(i).category == "garden")
            .take(3)
            .collect();
        let user = UserVectorRecord {
            user_id: "u".into(),
            vector: (&catalog.embedding(coffee[0]) + &catalog.embedding(garden[0])).to_vec(),
            anchor_ts: 0,
            version: 2,
            recent_products: vec![
                catalog.product(coffee[0]).product_id.clone(),
                catalog.product(garden[0]).product_id.clone(),
            ],
            purchased: vec![],
            last_event: crate::events::LastEvent {
                event_id: "e".into(),
                event_type: crate::events::EventType::View,
                product_id: None,
                ts: 0,
            },
            source: crate::events::SourcePosition {
                partition: 0,
                offset: 0,
            },
            updated_at: 0,
            embeddings: None,
            recent_event_ids: Vec::new(),
            folded_events: Vec::new(),
        };
        let list = rec.recommend(&user, 10).unwrap();
        for item in &list {
            let p = catalog.get(&item.product_id).unwrap();
            let because = catalog.get(item.because.as_deref().unwrap()).unwrap();
            // A coffee product is explained by the coffee the user viewed, and so on.
            assert_eq!(p.category, because.category, "{item:?}");
        }
        let only_garden = rec
            .recommend_where(&user, 5, &|i| catalog.product(i).category == "garden")
            .unwrap();
        assert!(only_garden
            .iter()
            .all(|s| catalog.get(&s.product_id).unwrap().category == "garden"));
        let similar = rec.similar(coffee[1], 5);
        assert_eq!(similar.len(), 5);
        assert!(similar.iter().all(|&(j, _)| j != coffee[1]));
        assert!(similar
            .iter()
            .all(|&(j, _)| catalog.product(j).category == "coffee"));
    }

    #[test]
    fn recall_is_the_share_of_true_neighbours_found() {
        let truth: Vec<HashSet<usize>> = vec![[1, 2].into(), [3, 4].into()];
        let found = vec![vec![(1, 0.9), (5, 0.8)], vec![(4, 0.7), (3, 0.6)]];
        assert_eq!(recall(&found, &truth), 0.75);
        assert_eq!(recall(&[vec![], vec![]], &truth), 0.0);
    }

    #[test]
    fn recommendation_ids_are_deterministic() {
        assert_eq!(
            recommendation_id("u", 3, "v1"),
            recommendation_id("u", 3, "v1")
        );
        assert_ne!(
            recommendation_id("u", 3, "v1"),
            recommendation_id("u", 4, "v1")
        );
        assert_ne!(
            recommendation_id("u", 3, "v1"),
            recommendation_id("u", 3, "v2")
        );
    }
}
