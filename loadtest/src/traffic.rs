//! Realistic clickstream: Zipf-distributed users (a few are very active) and products (a
//! few are very popular within each category), and sessions that move from views to a
//! click, a cart and sometimes a purchase, with a share of searches.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Zipf};
use recpipe_shared::catalog::Catalog;
use recpipe_shared::events::{now_ms, Event, EventType};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    Browsing,
    Clicked,
    InCart,
}

pub struct Clickstream {
    rng: ChaCha8Rng,
    users: Zipf<f64>,
    user_count: usize,
    /// Products of each category, in catalog order (rank 1 is the most popular).
    categories: Vec<(String, Vec<String>)>,
    product_rank: Vec<Zipf<f64>>,
    steps: HashMap<usize, (Step, String)>,
    focus: f64,
    search_share: f64,
    prefix: String,
    next_id: u64,
}

impl Clickstream {
    pub fn new(catalog: &Catalog, users: usize, focus: f64, seed: u64, prefix: &str) -> Self {
        let mut by_category: HashMap<&str, Vec<String>> = HashMap::new();
        for p in catalog.products().iter().filter(|p| p.available) {
            by_category
                .entry(p.category.as_str())
                .or_default()
                .push(p.product_id.clone());
        }
        let mut categories: Vec<(String, Vec<String>)> = by_category
            .into_iter()
            .map(|(c, p)| (c.to_string(), p))
            .collect();
        categories.sort();
        let product_rank = categories
            .iter()
            .map(|(_, p)| Zipf::new(p.len() as f64, 1.0).expect("valid Zipf"))
            .collect();
        Clickstream {
            rng: ChaCha8Rng::seed_from_u64(seed),
            users: Zipf::new(users.max(1) as f64, 1.1).expect("valid Zipf"),
            user_count: users.max(1),
            categories,
            product_rank,
            steps: HashMap::new(),
            focus,
            search_share: 0.03,
            prefix: prefix.to_string(),
            next_id: 0,
        }
    }

    pub fn user_id(u: usize) -> String {
        format!("user-{:05}", u + 1)
    }

    fn product_in(&mut self, category: usize) -> String {
        let rank = self.product_rank[category].sample(&mut self.rng) as usize;
        let products = &self.categories[category].1;
        products[(rank - 1).min(products.len() - 1)].clone()
    }

    /// The next event of the stream.
    pub fn next_event(&mut self) -> Event {
        let u = (self.users.sample(&mut self.rng) as usize - 1).min(self.user_count - 1);
        let favourite = u % self.categories.len();
        let (step, last) = self
            .steps
            .get(&u)
            .cloned()
            .unwrap_or((Step::Browsing, String::new()));
        let roll: f64 = self.rng.random();
        let (event_type, product, query) = match step {
            Step::Clicked if roll < 0.3 => (EventType::AddToCart, Some(last), None),
            Step::InCart if roll < 0.5 => (EventType::Purchase, Some(last), None),
            _ if roll < self.search_share => (
                EventType::Search,
                None,
                Some(self.categories[favourite].0.clone()),
            ),
            _ => {
                let category = if self.rng.random_bool(self.focus) {
                    favourite
                } else {
                    self.rng.random_range(0..self.categories.len())
                };
                let product = self.product_in(category);
                let t = if self.rng.random_bool(0.25) {
                    EventType::Click
                } else {
                    EventType::View
                };
                (t, Some(product), None)
            }
        };
        let next = match event_type {
            EventType::Click => Step::Clicked,
            EventType::AddToCart => Step::InCart,
            _ => Step::Browsing,
        };
        if let Some(p) = &product {
            self.steps.insert(u, (next, p.clone()));
        }
        self.next_id += 1;
        Event {
            event_id: format!("{}-{}", self.prefix, self.next_id),
            user_id: Self::user_id(u),
            event_type,
            product_id: product,
            query,
            ts: now_ms(),
            recommendation_id: None,
        }
    }

    /// A user drawn by activity (for queries).
    pub fn active_user(&mut self) -> String {
        let u = (self.users.sample(&mut self.rng) as usize - 1).min(self.user_count - 1);
        Self::user_id(u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use recpipe_shared::catalog::{generate, SyntheticCatalog};

    #[test]
    fn skewed_users_sessions_and_valid_events() {
        let catalog = generate(SyntheticCatalog {
            products: 500,
            dim: 4,
            ..Default::default()
        });
        let mut s = Clickstream::new(&catalog, 1_000, 0.85, 3, "t");
        let events: Vec<Event> = (0..20_000).map(|_| s.next_event()).collect();
        let mut per_user: HashMap<&str, usize> = HashMap::new();
        let mut types: HashMap<EventType, usize> = HashMap::new();
        for e in &events {
            e.validate().unwrap();
            if let Some(p) = &e.product_id {
                assert!(catalog.index_of(p).is_some());
            }
            *per_user.entry(&e.user_id).or_default() += 1;
            *types.entry(e.event_type).or_default() += 1;
        }
        // Zipf: the most active user has far more than the median one.
        let mut counts: Vec<usize> = per_user.values().copied().collect();
        counts.sort();
        assert!(counts[counts.len() - 1] > 20 * counts[counts.len() / 2]);
        // Sessions reach carts and purchases; searches are a small share.
        assert!(types[&EventType::Purchase] > 100);
        assert!(types[&EventType::AddToCart] > types[&EventType::Purchase]);
        let searches = types[&EventType::Search] as f64 / events.len() as f64;
        assert!((0.01..0.06).contains(&searches), "{searches}");
        // Deterministic for a seed.
        let mut again = Clickstream::new(&catalog, 1_000, 0.85, 3, "t");
        let first: Vec<Event> = (0..100).map(|_| again.next_event()).collect();
        for (a, b) in first.iter().zip(&events) {
            assert_eq!((&a.user_id, &a.product_id), (&b.user_id, &b.product_id));
        }
    }
}
