//! The replay evaluator. Users' states are built from the training window with the
//! serving code (`UserModel`), then the test window is replayed in time order: before
//! each event of a user with history, the current top-k (the user's items excluded) is
//! taken from `Recommender` — the code gen-recommendations runs — and scored a hit if it
//! holds the event's product; then the event is applied. Popularity (counts of past
//! events) and random lists are scored on the same events.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use rand::seq::IndexedRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use recpipe_shared::catalog::Catalog;
use recpipe_shared::events::{Event, SourcePosition, UserVectorRecord};
use recpipe_shared::model::{Recommender, UserModel};
use recpipe_shared::settings::ModelSettings;
use serde::Serialize;

use crate::data::Interaction;

#[derive(Debug, Clone, Copy)]
pub struct EvalConfig {
    pub k: usize,
    pub seed: u64,
    /// Report progress every this many test events.
    pub progress_every: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            k: 10,
            seed: 7,
            progress_every: 2_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Metrics {
    pub model: String,
    pub evaluated: usize,
    pub hits: usize,
    pub hr: f64,
    pub ndcg: f64,
    /// Share of the catalogue that appeared in at least one list.
    pub coverage: f64,
}

#[derive(Default)]
struct Tally {
    evaluated: usize,
    hits: usize,
    dcg: f64,
    shown: HashSet<String>,
}

impl Tally {
    fn score(&mut self, list: &[String], target: &str) {
        self.evaluated += 1;
        if let Some(rank) = list.iter().position(|p| p == target) {
            self.hits += 1;
            self.dcg += 1.0 / ((rank + 2) as f64).log2();
        }
        self.shown.extend(list.iter().cloned());
    }

    fn metrics(&self, model: &str, catalog_size: usize) -> Metrics {
        let n = self.evaluated.max(1) as f64;
        Metrics {
            model: model.to_string(),
            evaluated: self.evaluated,
            hits: self.hits,
            hr: self.hits as f64 / n,
            ndcg: self.dcg / n,
            coverage: self.shown.len() as f64 / catalog_size.max(1) as f64,
        }
    }
}

/// Products by count of past events, kept sorted as counts grow (an item moves up past
/// the ones it overtakes), so top-k is a scan from the front.
struct PopularityCounts {
    order: Vec<String>,
    position: HashMap<String, usize>,
    counts: Vec<u64>,
}

impl PopularityCounts {
    fn new() -> Self {
        PopularityCounts {
            order: Vec::new(),
            position: HashMap::new(),
            counts: Vec::new(),
        }
    }

    fn add(&mut self, product: &str) {
        let mut at = match self.position.get(product) {
            Some(&i) => i,
            None => {
                self.order.push(product.to_string());
                self.counts.push(0);
                self.position
                    .insert(product.to_string(), self.order.len() - 1);
                self.order.len() - 1
            }
        };
        self.counts[at] += 1;
        while at > 0 && self.counts[at - 1] < self.counts[at] {
            self.order.swap(at - 1, at);
            self.counts.swap(at - 1, at);
            self.position.insert(self.order[at].clone(), at);
            self.position.insert(self.order[at - 1].clone(), at - 1);
            at -= 1;
        }
    }

    fn top(&self, k: usize, exclude: &HashSet<String>) -> Vec<String> {
        self.order
            .iter()
            .filter(|p| !exclude.contains(*p))
            .take(k)
            .cloned()
            .collect()
    }
}

fn as_event(i: &Interaction, n: usize) -> Event {
    Event {
        event_id: format!("r{n}"),
        user_id: i.user.clone(),
        event_type: i.event_type,
        product_id: Some(i.product.clone()),
        query: None,
        ts: i.ts,
        recommendation_id: None,
    }
}

/// Scores recpipe, popularity and random on `test` after `train`.
pub fn evaluate(
    train: &[Interaction],
    test: &[Interaction],
    catalog: Arc<Catalog>,
    recommender: &Recommender,
    settings: &ModelSettings,
    config: EvalConfig,
    mut progress: impl FnMut(usize, usize),
) -> Vec<Metrics> {
    let model = UserModel::new(catalog.clone(), settings.clone());
    let mut states: HashMap<String, UserVectorRecord> = HashMap::new();
    let mut seen: HashMap<String, HashSet<String>> = HashMap::new();
    let mut popularity = PopularityCounts::new();
    let apply = |i: &Interaction, n: usize, states: &mut HashMap<String, UserVectorRecord>| {
        let source = SourcePosition {
            partition: 0,
            offset: n as i64,
        };
        // Products the model does not know (first seen after training) move nothing.
        if let Ok(after) = model.apply(states.get(&i.user), &as_event(i, n), source, 0) {
            states.insert(i.user.clone(), after);
        }
    };
    for (n, i) in train.iter().enumerate() {
        apply(i, n, &mut states);
        seen.entry(i.user.clone())
            .or_default()
            .insert(i.product.clone());
        popularity.add(&i.product);
    }

    let all_products: Vec<String> = catalog
        .products()
        .iter()
        .map(|p| p.product_id.clone())
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let (mut ours, mut popular, mut random) =
        (Tally::default(), Tally::default(), Tally::default());
    for (n, i) in test.iter().enumerate() {
        if let Some(history) = seen.get(&i.user).filter(|h| !h.is_empty()) {
            let baseline = popularity.top(config.k, history);
            let list = match states.get(&i.user).and_then(|s| {
                let excluded: HashSet<usize> =
                    history.iter().filter_map(|p| catalog.index_of(p)).collect();
                let found = recommender.nearest(&s.vector, config.k, &|j| excluded.contains(&j));
                (!found.is_empty()).then_some(found)
            }) {
                Some(found) => found
                    .into_iter()
                    .map(|(j, _)| catalog.product(j).product_id.clone())
                    .collect(),
                // No signal yet: what the service serves, the popularity list.
                None => baseline.clone(),
            };
            ours.score(&list, &i.product);
            popular.score(&baseline, &i.product);
            let mut picks = Vec::with_capacity(config.k);
            while picks.len()
                < config
                    .k
                    .min(all_products.len().saturating_sub(history.len()))
            {
                let p = all_products.choose(&mut rng).expect("catalog is not empty");
                if !history.contains(p) && !picks.contains(p) {
                    picks.push(p.clone());
                }
            }
            random.score(&picks, &i.product);
        }
        apply(i, train.len() + n, &mut states);
        seen.entry(i.user.clone())
            .or_default()
            .insert(i.product.clone());
        popularity.add(&i.product);
        if config.progress_every > 0 && (n + 1) % config.progress_every == 0 {
            progress(n + 1, test.len());
        }
    }
    let size = catalog.len();
    vec![
        ours.metrics("recpipe", size),
        popular.metrics("popularity", size),
        random.metrics("random", size),
    ]
}

/// The results as a fixed-width table.
pub fn table(metrics: &[Metrics], k: usize) -> String {
    let mut out = format!(
        "{:<12} {:>8} {:>9} {:>9} {:>10} {:>8}\n",
        "model",
        format!("HR@{k}"),
        format!("NDCG@{k}"),
        "coverage",
        "evaluated",
        "hits"
    );
    for m in metrics {
        out.push_str(&format!(
            "{:<12} {:>8.4} {:>9.4} {:>9.3} {:>10} {:>8}\n",
            m.model, m.hr, m.ndcg, m.coverage, m.evaluated, m.hits
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn popularity_counts_stay_sorted() {
        let mut p = PopularityCounts::new();
        for x in ["a", "b", "b", "c", "c", "c", "a", "a", "a"] {
            p.add(x);
        }
        assert_eq!(p.top(3, &HashSet::new()), vec!["a", "c", "b"]);
        assert_eq!(p.top(3, &HashSet::from(["c".to_string()])), vec!["a", "b"]);
    }

    #[test]
    fn tally_counts_hits_and_ndcg() {
        let mut t = Tally::default();
        t.score(&["x".into(), "y".into()], "x");
        t.score(&["x".into(), "y".into()], "y");
        t.score(&["x".into(), "y".into()], "z");
        let m = t.metrics("m", 4);
        assert_eq!(m.hits, 2);
        assert!((m.ndcg - (1.0 + 1.0 / 3f64.log2()) / 3.0).abs() < 1e-12);
        assert_eq!(m.coverage, 0.5);
    }
}
