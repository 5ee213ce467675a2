//! `ann`: recpipe's HNSW (`hnsw_rs` as the services use it) on a synthetic clustered
//! catalog, queries per second single-threaded at several `ef_search` values with the
//! recall@10 each reaches against exact search; and the same vectors and queries written
//! as `.npy` so that `bench/ann_vs_hnswlib.py` runs hnswlib on exactly them.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ndarray::Array2;
use recpipe_shared::catalog::{benchmark_queries, generate, SyntheticCatalog};
use recpipe_shared::model::{recall, Recommender};
use recpipe_shared::settings::HnswSettings;
use serde::Serialize;

const K: usize = 10;
/// Timed passes over each query set per `ef_search`; the fastest counts.
const PASSES: usize = 3;
/// The `ef_search` values measured (hnswlib's script uses the same).
pub const EF_SEARCH: [usize; 6] = [10, 16, 32, 64, 128, 256];

#[derive(Debug, Serialize)]
pub struct AnnPoint {
    pub queries: &'static str,
    pub ef_search: usize,
    pub recall_at_10: f64,
    pub queries_per_sec: f64,
}

fn to_array(rows: &[Vec<f32>]) -> Array2<f32> {
    let dim = rows[0].len();
    Array2::from_shape_fn((rows.len(), dim), |(i, j)| rows[i][j])
}

/// The built index, the query sets and their exact neighbours: what a timed pass needs.
pub struct AnnBench {
    hnsw: Recommender,
    sets: Vec<QuerySet>,
}

struct QuerySet {
    name: &'static str,
    queries: Vec<Vec<f32>>,
    truth: Vec<HashSet<usize>>,
}

/// One pass over a query set at one `ef_search`.
#[derive(Debug, Serialize)]
pub struct AnnPass {
    pub queries: &'static str,
    pub ef_search: usize,
    pub recall_at_10: f64,
    pub seconds: f64,
}

impl AnnBench {
    /// Generates the catalog and queries, writes them as `.npy` to `out` for hnswlib,
    /// builds recpipe's HNSW and the exact neighbours.
    pub fn prepare(
        out: &Path,
        products: usize,
        queries: usize,
        dim: usize,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(out)?;
        let catalog = Arc::new(generate(SyntheticCatalog {
            products,
            dim,
            seed: 1,
            unavailable_share: 0.0,
        }));
        let (one, two) = benchmark_queries(&catalog, queries);
        ndarray_npy::write_npy(out.join("vectors.npy"), catalog.embeddings())?;
        ndarray_npy::write_npy(out.join("queries-one.npy"), &to_array(&one))?;
        ndarray_npy::write_npy(out.join("queries-two.npy"), &to_array(&two))?;

        let exact = Recommender::exact(catalog.clone());
        let started = Instant::now();
        // A fixed ef_search: each is set per pass, and the default's calibration at load
        // would count in the build's time.
        let settings = HnswSettings {
            ef_search: 128,
            ..HnswSettings::default()
        };
        let hnsw = Recommender::new(catalog.clone(), &settings);
        eprintln!(
            "  recpipe HNSW (M={}, ef_construction={}) built in {:.1} s",
            settings.max_connections,
            settings.ef_construction,
            started.elapsed().as_secs_f64()
        );
        let sets = [("one-interest", one), ("two-interest", two)]
            .into_iter()
            .map(|(name, queries)| QuerySet {
                name,
                truth: exact.neighbour_sets(&queries, K),
                queries,
            })
            .collect();
        Ok(AnnBench { hnsw, sets })
    }

    /// One timed pass of every query of `set` at `ef_search`, single-threaded.
    pub fn pass(&mut self, set: &str, ef_search: usize) -> anyhow::Result<AnnPass> {
        let Some(s) = self.sets.iter().find(|s| s.name == set) else {
            anyhow::bail!("no query set {set:?}: one-interest or two-interest");
        };
        self.hnsw.set_ef_search(ef_search);
        let started = Instant::now();
        let results: Vec<Vec<(usize, f32)>> = s
            .queries
            .iter()
            .map(|q| self.hnsw.nearest(q, K, &|_| false))
            .collect();
        let seconds = started.elapsed().as_secs_f64();
        Ok(AnnPass {
            queries: s.name,
            ef_search,
            recall_at_10: recall(&results, &s.truth),
            seconds,
        })
    }
}

/// Every query set at every `ef_search` of [`EF_SEARCH`], the fastest of [`PASSES`]
/// passes each.
pub fn run(
    out: &Path,
    products: usize,
    queries: usize,
    dim: usize,
) -> anyhow::Result<Vec<AnnPoint>> {
    let mut bench = AnnBench::prepare(out, products, queries, dim)?;
    let mut points = Vec::new();
    let sets: Vec<(&'static str, usize)> = bench
        .sets
        .iter()
        .map(|s| (s.name, s.queries.len()))
        .collect();
    for (set, count) in sets {
        for ef in EF_SEARCH {
            // Best of a few passes: the machine is shared, and a pass another process
            // interrupted says nothing about the index.
            let mut best: Option<AnnPass> = None;
            for _ in 0..PASSES {
                let pass = bench.pass(set, ef)?;
                if best.as_ref().is_none_or(|b| pass.seconds < b.seconds) {
                    best = Some(pass);
                }
            }
            let best = best.expect("at least one pass");
            points.push(AnnPoint {
                queries: best.queries,
                ef_search: ef,
                recall_at_10: best.recall_at_10,
                queries_per_sec: count as f64 / best.seconds,
            });
        }
    }
    Ok(points)
}

/// Serves timed passes to `bench/ann_vs_hnswlib.py`, which alternates them with its own
/// hnswlib passes so that both libraries meet the same moments of a shared machine.
/// Prints `ready` once built, then answers each line `SET EF` with one [`AnnPass`] as
/// JSON, until its input ends.
pub fn serve_passes(
    mut bench: AnnBench,
    input: impl std::io::BufRead,
    mut output: impl std::io::Write,
) -> anyhow::Result<()> {
    writeln!(output, "ready")?;
    output.flush()?;
    for line in input.lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        let (Some(set), Some(ef), None) = (words.next(), words.next(), words.next()) else {
            anyhow::bail!("expected a line `SET EF` (e.g. `one-interest 64`), got {line:?}");
        };
        let ef: usize = ef
            .parse()
            .map_err(|e| anyhow::anyhow!("ef_search {ef:?} in {line:?}: {e}"))?;
        let pass = bench.pass(set, ef)?;
        writeln!(output, "{}", serde_json::to_string(&pass)?)?;
        output.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_passes_answer_each_line_and_refuse_a_bad_one_with_what_to_send() {
        let dir = tempfile::tempdir().unwrap();
        let bench = AnnBench::prepare(dir.path(), 2_000, 20, 16).unwrap();
        assert!(dir.path().join("queries-two.npy").exists());
        let mut out = Vec::new();
        serve_passes(
            bench,
            "one-interest 256\ntwo-interest 10\n".as_bytes(),
            &mut out,
        )
        .unwrap();
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "ready");
        let passes: Vec<serde_json::Value> = lines[1..]
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(passes.len(), 2);
        assert_eq!(passes[0]["queries"], "one-interest");
        assert_eq!(passes[0]["ef_search"], 256);
        // A wide search of 2,000 products finds nearly all of the true ten.
        assert!(passes[0]["recall_at_10"].as_f64().unwrap() >= 0.95, "{out}");
        assert_eq!(passes[1]["queries"], "two-interest");
        assert!(passes[1]["seconds"].as_f64().unwrap() > 0.0);

        for (line, says) in [
            ("one-interest", "expected a line `SET EF`"),
            ("three-interest 10", "one-interest or two-interest"),
            ("one-interest many", "ef_search \"many\""),
        ] {
            let bench = AnnBench::prepare(dir.path(), 200, 5, 8).unwrap();
            let err = serve_passes(bench, format!("{line}\n").as_bytes(), Vec::new())
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{line:?} → {err}");
        }
    }
}
