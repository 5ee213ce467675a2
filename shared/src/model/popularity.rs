//! Popularity over a recent window of event time, maintained from the stream: each
//! event adds its type's weight to the product's score, and scores decay with event
//! time, so old interest fades without keeping the events.

use std::collections::HashMap;

use crate::catalog::Catalog;
use crate::events::{EventType, ScoredProduct};
use crate::settings::EventWeights;

/// Rebase the stored scores once the exponent grows past this, to stay within f64.
const REBASE_AT: f64 = 50.0;

#[derive(Debug, Clone)]
pub struct Popularity {
    tau_ms: f64,
    weights: EventWeights,
    /// Scores valued at `base_ts`: the real score at time T is `score · exp(-(T-base)/τ)`.
    /// By product id, not catalog index, so the scores outlive a model swap.
    scores: HashMap<String, f64>,
    base_ts: Option<i64>,
    latest_ts: i64,
}

impl Popularity {
    pub fn new(half_life_hours: f64, weights: EventWeights) -> Self {
        Popularity {
            tau_ms: super::decay_tau_ms(half_life_hours),
            weights,
            scores: HashMap::new(),
            base_ts: None,
            latest_ts: i64::MIN,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }

    /// Counts one event on `product` at event time `ts`.
    pub fn record(&mut self, product: &str, event_type: EventType, ts: i64) {
        let base = *self.base_ts.get_or_insert(ts);
        let mut exponent = (ts - base) as f64 / self.tau_ms;
        if exponent > REBASE_AT {
            let shrink = (-exponent).exp();
            self.scores.values_mut().for_each(|s| *s *= shrink);
            self.scores.retain(|_, s| *s > 1e-12);
            self.base_ts = Some(ts);
            exponent = 0.0;
        }
        let weight = self.weights.of(event_type) as f64 * exponent.exp();
        match self.scores.get_mut(product) {
            Some(score) => *score += weight,
            None => {
                self.scores.insert(product.to_string(), weight);
            }
        }
        self.latest_ts = self.latest_ts.max(ts);
    }

    /// The `k` most popular available products not in `exclude`, scores valued at the
    /// latest event time seen.
    pub fn top(
        &self,
        catalog: &Catalog,
        k: usize,
        exclude: &dyn Fn(usize) -> bool,
    ) -> Vec<ScoredProduct> {
        let scale = match self.base_ts {
            Some(base) => (-((self.latest_ts - base) as f64) / self.tau_ms).exp(),
            None => return Vec::new(),
        };
        let mut ranked: Vec<(usize, f64)> = self
            .scores
            .iter()
            .filter_map(|(id, &s)| Some((catalog.index_of(id)?, s)))
            .filter(|&(i, _)| catalog.product(i).available && !exclude(i))
            .collect();
        // Ties broken by catalog order, so the list is deterministic.
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        ranked
            .into_iter()
            .take(k)
            .map(|(i, s)| ScoredProduct {
                product_id: catalog.product(i).product_id.clone(),
                score: (s * scale) as f32,
                because: None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{generate, SyntheticCatalog};

    #[test]
    fn recent_interest_outranks_old_interest() {
        let catalog = generate(SyntheticCatalog {
            products: 50,
            dim: 4,
            unavailable_share: 0.0,
            ..Default::default()
        });
        let mut p = Popularity::new(1.0, EventWeights::default());
        let hour = 3_600_000;
        for _ in 0..4 {
            p.record("p-00001", EventType::View, 0);
        }
        p.record("p-00002", EventType::View, 10 * hour);
        p.record("p-00002", EventType::View, 10 * hour);
        let top = p.top(&catalog, 2, &|_| false);
        assert_eq!(top[0].product_id, "p-00002");
        assert_eq!(top[1].product_id, "p-00001");
        assert!((top[0].score - 2.0).abs() < 1e-4);
        assert!(p
            .top(&catalog, 5, &|i| i == 2)
            .iter()
            .all(|s| s.product_id != "p-00002"));
    }

    #[test]
    fn survives_long_spans_of_event_time() {
        let catalog = generate(SyntheticCatalog {
            products: 10,
            dim: 4,
            unavailable_share: 0.0,
            ..Default::default()
        });
        let mut p = Popularity::new(1.0, EventWeights::default());
        let year = 365 * 24 * 3_600_000_i64;
        for i in 0..20 {
            p.record(&format!("p-{:05}", i % 3), EventType::Purchase, i * year);
        }
        let top = p.top(&catalog, 3, &|_| false);
        assert!(top.iter().all(|s| s.score.is_finite()));
        assert_eq!(top[0].product_id, "p-00001"); // the last event, 19 % 3 == 1
    }
}
