//! Product embeddings from implicit feedback by SVD of the PPMI co-occurrence matrix
//! (Levy & Goldberg 2014: the factorisation that skip-gram with negative sampling
//! approximates, computed directly and deterministically):
//! 1. count how often two products occur within `window` events of each other in a
//!    user's time-ordered history;
//! 2. turn counts into positive pointwise mutual information, with the context counts
//!    smoothed by `context_smoothing` (0.75, as word2vec does), which keeps popular
//!    products from dominating;
//! 3. take the top `dim` eigenpairs of that symmetric matrix by randomised subspace
//!    iteration; a product's embedding is its eigenvector row scaled by λ^`eigen_power`.
//!
//! Products that co-occur end up close, which is what the serving side (a user vector as
//! a decayed sum of product embeddings, then nearest products) relies on.

use std::collections::{BTreeMap, HashMap};

use ndarray::Array2;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::data::Interaction;
use crate::linalg::{top_eigen, Csr};
use crate::TrainerError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainParams {
    pub dim: usize,
    /// Products within this many events of each other in a user's history co-occur.
    pub window: usize,
    pub context_smoothing: f64,
    pub eigen_power: f64,
    pub iterations: usize,
    pub oversample: usize,
    pub seed: u64,
}

impl Default for TrainParams {
    fn default() -> Self {
        TrainParams {
            dim: 128,
            window: 5,
            context_smoothing: 0.75,
            eigen_power: 1.0,
            iterations: 6,
            oversample: 24,
            seed: 42,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainStats {
    pub users: usize,
    pub products: usize,
    pub interactions: usize,
    pub nonzero_pairs: usize,
    /// Products that co-occurred with nothing: they get a random direction.
    pub isolated_products: usize,
}

/// Learned embeddings, one row per product id.
#[derive(Debug, Clone)]
pub struct Trained {
    pub product_ids: Vec<String>,
    pub embeddings: Array2<f32>,
    pub stats: TrainStats,
}

/// Trains on `interactions` (any order); `progress` hears what stage is running.
pub fn train(
    interactions: &[Interaction],
    params: &TrainParams,
    mut progress: impl FnMut(&str),
) -> Result<Trained, TrainerError> {
    if interactions.is_empty() {
        return Err(TrainerError::Empty("no interactions".into()));
    }
    if params.dim < 2 || params.window < 1 {
        return Err(TrainerError::Empty("dim must be ≥ 2 and window ≥ 1".into()));
    }
    let mut product_ids: Vec<String> = interactions.iter().map(|i| i.product.clone()).collect();
    product_ids.sort();
    product_ids.dedup();
    let index: HashMap<&str, u32> = product_ids
        .iter()
        .enumerate()
        .map(|(i, p)| (p.as_str(), i as u32))
        .collect();
    let n = product_ids.len();

    // Time-ordered histories (a stable sort keeps file order for equal times).
    let mut histories: BTreeMap<&str, Vec<(i64, u32)>> = BTreeMap::new();
    for i in interactions {
        histories
            .entry(i.user.as_str())
            .or_default()
            .push((i.ts, index[i.product.as_str()]));
    }
    progress(&format!(
        "{} interactions, {} users, {} products: counting co-occurrences (window {})",
        interactions.len(),
        histories.len(),
        n,
        params.window
    ));
    let mut pairs: HashMap<u64, f32> = HashMap::new();
    for history in histories.values_mut() {
        history.sort_by_key(|&(ts, _)| ts);
        for (i, &(_, a)) in history.iter().enumerate() {
            for &(_, b) in history.iter().skip(i + 1).take(params.window) {
                if a != b {
                    *pairs.entry(((a as u64) << 32) | b as u64).or_default() += 1.0;
                    *pairs.entry(((b as u64) << 32) | a as u64).or_default() += 1.0;
                }
            }
        }
    }

    progress(&format!(
        "{} co-occurring pairs: computing PPMI",
        pairs.len() / 2
    ));
    let mut row_sum = vec![0f64; n];
    for (&key, &c) in &pairs {
        row_sum[(key >> 32) as usize] += c as f64;
    }
    let total: f64 = row_sum.iter().sum();
    let smoothed: Vec<f64> = row_sum
        .iter()
        .map(|c| c.powf(params.context_smoothing))
        .collect();
    let smoothed_total: f64 = smoothed.iter().sum();
    let mut triples = Vec::with_capacity(pairs.len());
    for (&key, &c) in &pairs {
        let (a, b) = ((key >> 32) as usize, (key & 0xffff_ffff) as usize);
        // PMI with smoothed context, averaged over both directions to stay symmetric.
        let pmi_ab =
            ((c as f64 / total) / ((row_sum[a] / total) * (smoothed[b] / smoothed_total))).ln();
        let pmi_ba =
            ((c as f64 / total) / ((row_sum[b] / total) * (smoothed[a] / smoothed_total))).ln();
        let ppmi = ((pmi_ab + pmi_ba) / 2.0).max(0.0);
        if ppmi > 0.0 {
            triples.push((a as u32, b as u32, ppmi as f32));
        }
    }
    let matrix = Csr::from_triples(n, triples);

    progress(&format!(
        "PPMI matrix {n} × {n}, {} non-zeros: randomised eigen-decomposition (dim {})",
        matrix.nnz(),
        params.dim
    ));
    let (values, vectors) = top_eigen(
        &matrix,
        params.dim.min(n),
        params.oversample,
        params.iterations,
        params.seed,
        |i, of| {
            if i == of {
                progress(&format!("subspace iterations done ({of})"));
            }
        },
    );
    let mut embeddings = Array2::<f32>::zeros((n, params.dim));
    for (j, &value) in values.iter().enumerate() {
        let scale = value.max(0.0).powf(params.eigen_power) as f32;
        embeddings
            .column_mut(j)
            .assign(&(&vectors.column(j) * scale));
    }
    // A product with no co-occurrence has a zero row; give it a random direction so the
    // catalog stays valid (it then matches nothing in particular).
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed ^ 0x5eed);
    let mut isolated = 0;
    for mut row in embeddings.rows_mut() {
        if row.dot(&row) < 1e-20 {
            isolated += 1;
            row.iter_mut().for_each(|v| {
                let x: f64 = StandardNormal.sample(&mut rng);
                *v = 1e-3 * x as f32;
            });
        }
    }
    Ok(Trained {
        product_ids,
        embeddings,
        stats: TrainStats {
            users: histories.len(),
            products: n,
            interactions: interactions.len(),
            nonzero_pairs: matrix.nnz(),
            isolated_products: isolated,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use recpipe_shared::events::EventType;

    /// Shoppers who buy within one of four "baskets" of products.
    fn baskets(seed: u64) -> Vec<Interaction> {
        use rand::Rng;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::new();
        for u in 0..400 {
            let basket = u % 4;
            for t in 0..12 {
                let product = if rng.random_bool(0.9) {
                    basket * 10 + rng.random_range(0..10)
                } else {
                    rng.random_range(0..40)
                };
                out.push(Interaction {
                    user: format!("u{u}"),
                    product: format!("p{product:02}"),
                    ts: t,
                    event_type: EventType::Purchase,
                });
            }
        }
        out
    }

    fn cosine(e: &Array2<f32>, a: usize, b: usize) -> f32 {
        let (x, y) = (e.row(a), e.row(b));
        x.dot(&y) / (x.dot(&x).sqrt() * y.dot(&y).sqrt())
    }

    #[test]
    fn products_bought_together_are_closer_than_random_pairs() {
        let params = TrainParams {
            dim: 8,
            window: 5,
            ..Default::default()
        };
        let t = train(&baskets(3), &params, |_| {}).unwrap();
        assert_eq!(t.product_ids.len(), 40);
        let (mut together, mut apart, mut nt, mut na) = (0.0, 0.0, 0, 0);
        for a in 0..40 {
            for b in (a + 1)..40 {
                if a / 10 == b / 10 {
                    together += cosine(&t.embeddings, a, b);
                    nt += 1;
                } else {
                    apart += cosine(&t.embeddings, a, b);
                    na += 1;
                }
            }
        }
        let (together, apart) = (together / nt as f32, apart / na as f32);
        assert!(together > apart + 0.5, "together {together}, apart {apart}");
    }

    #[test]
    fn training_is_deterministic_for_a_seed() {
        let params = TrainParams {
            dim: 8,
            window: 5,
            ..Default::default()
        };
        let a = train(&baskets(3), &params, |_| {}).unwrap();
        let b = train(&baskets(3), &params, |_| {}).unwrap();
        assert_eq!(a.embeddings, b.embeddings);
        let c = train(&baskets(3), &TrainParams { seed: 7, ..params }, |_| {}).unwrap();
        assert_ne!(a.embeddings, c.embeddings);
    }
}
