//! `shop`: shoppers who look at their recommendations and sometimes click them.
//!
//! Each shopper has a favourite category. In a loop they GET their list; scanning the top
//! items in order, they click one with a probability that depends on whether it is in
//! their favourite category (so a model that knows them better earns more clicks). A
//! click names the list's `recommendation_id`, and sometimes leads to a cart and a
//! purchase; without a click they browse a product on their own. The API counts the
//! impressions and attributes the clicks per model version: with two versions served
//! side by side, `GET /v1/experiments` shows which one shoppers respond to.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use recpipe_shared::catalog::Catalog;
use recpipe_shared::events::{now_ms, Event, EventType};
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct ShopPlan {
    pub shoppers: usize,
    pub duration: Duration,
    /// Pause between one shopper's actions.
    pub think: Duration,
    /// Chance to click a shown product of the favourite category, and of another one.
    pub click_favourite: f64,
    pub click_other: f64,
    /// Items of the list a shopper looks at.
    pub scan: usize,
    pub seed: u64,
}

/// What the shoppers saw and did, per model version of the lists they were shown.
#[derive(Debug, Default, Clone, Serialize)]
pub struct VersionTally {
    pub lists: u64,
    pub clicks: u64,
    pub purchases: u64,
}

#[derive(Debug, Serialize)]
pub struct ShopSummary {
    pub seconds: f64,
    pub gets: u64,
    pub get_errors: u64,
    pub get_p50_ms: f64,
    pub get_p99_ms: f64,
    pub events: u64,
    pub post_errors: u64,
    pub post_p50_ms: f64,
    pub post_p99_ms: f64,
    pub by_version: HashMap<String, VersionTally>,
}

struct Shared {
    gets: Histogram<u64>,
    posts: Histogram<u64>,
    get_errors: u64,
    post_errors: u64,
    events: u64,
    by_version: HashMap<String, VersionTally>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

pub async fn run(
    client: &reqwest::Client,
    api: &str,
    api_key: Option<&str>,
    catalog: &Catalog,
    plan: ShopPlan,
) -> anyhow::Result<ShopSummary> {
    let mut by_category: HashMap<String, Vec<String>> = HashMap::new();
    for p in catalog.products().iter().filter(|p| p.available) {
        by_category
            .entry(p.category.clone())
            .or_default()
            .push(p.product_id.clone());
    }
    let mut categories: Vec<String> = by_category.keys().cloned().collect();
    categories.sort();
    let category_of: Arc<HashMap<String, String>> = Arc::new(
        catalog
            .products()
            .iter()
            .map(|p| (p.product_id.clone(), p.category.clone()))
            .collect(),
    );
    let by_category = Arc::new(by_category);
    let shared = Arc::new(Mutex::new(Shared {
        gets: histogram(),
        posts: histogram(),
        get_errors: 0,
        post_errors: 0,
        events: 0,
        by_version: HashMap::new(),
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..plan.shoppers {
        let favourite = categories[s % categories.len()].clone();
        let ctx = Shopper {
            client: client.clone(),
            api: api.to_string(),
            api_key: api_key.map(str::to_string),
            user: format!("shopper-{:04}", s + 1),
            favourite,
            by_category: by_category.clone(),
            category_of: category_of.clone(),
            shared: shared.clone(),
            plan: plan.clone(),
            rng: ChaCha8Rng::seed_from_u64(plan.seed.wrapping_mul(1_000_003) + s as u64),
        };
        let stop = stop.clone();
        tasks.push(tokio::spawn(ctx.shop(stop)));
    }
    // Progress once a second until the duration is up.
    while started.elapsed() < plan.duration {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s = shared.lock().expect("not poisoned");
        let clicks: u64 = s.by_version.values().map(|t| t.clicks).sum();
        eprint!(
            "\r  {:>4.0} s  {} GETs  {} events  {} clicks on recommendations   ",
            started.elapsed().as_secs_f64(),
            s.gets.len(),
            s.events,
            clicks
        );
    }
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await?;
    }
    eprintln!();
    let s = shared.lock().expect("not poisoned");
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok(ShopSummary {
        seconds: started.elapsed().as_secs_f64(),
        gets: s.gets.len() + s.get_errors,
        get_errors: s.get_errors,
        get_p50_ms: ms(&s.gets, 0.5),
        get_p99_ms: ms(&s.gets, 0.99),
        events: s.events,
        post_errors: s.post_errors,
        post_p50_ms: ms(&s.posts, 0.5),
        post_p99_ms: ms(&s.posts, 0.99),
        by_version: s.by_version.clone(),
    })
}

struct Shopper {
    client: reqwest::Client,
    api: String,
    api_key: Option<String>,
    user: String,
    favourite: String,
    by_category: Arc<HashMap<String, Vec<String>>>,
    category_of: Arc<HashMap<String, String>>,
    shared: Arc<Mutex<Shared>>,
    plan: ShopPlan,
    rng: ChaCha8Rng,
}

impl Shopper {
    async fn shop(mut self, stop: Arc<AtomicBool>) {
        let mut n = 0u64;
        // Spread the shoppers' first actions over one think time.
        let offset = self
            .rng
            .random_range(0..=self.plan.think.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(offset)).await;
        while !stop.load(Ordering::SeqCst) {
            let list = self.get_list().await;
            let mut events = Vec::new();
            if let Some((rec_id, version, items)) = &list {
                if let Some(product) = self.pick(items) {
                    events.push(self.event(&mut n, EventType::Click, &product, Some(rec_id)));
                    let bought = self.rng.random_bool(0.2);
                    if bought {
                        events.push(self.event(
                            &mut n,
                            EventType::AddToCart,
                            &product,
                            Some(rec_id),
                        ));
                        events.push(self.event(
                            &mut n,
                            EventType::Purchase,
                            &product,
                            Some(rec_id),
                        ));
                    }
                    let mut s = self.shared.lock().expect("not poisoned");
                    let t = s.by_version.entry(version.clone()).or_default();
                    t.clicks += 1;
                    t.purchases += bought as u64;
                }
            }
            if events.is_empty() {
                // Browsing on their own, mostly in the favourite category.
                let category = if self.rng.random_bool(0.85) {
                    self.favourite.clone()
                } else {
                    let all: Vec<&String> = self.by_category.keys().collect();
                    all[self.rng.random_range(0..all.len())].clone()
                };
                let products = &self.by_category[&category];
                let product = products[self.rng.random_range(0..products.len())].clone();
                events.push(self.event(&mut n, EventType::View, &product, None));
            }
            self.post(&events).await;
            tokio::time::sleep(self.plan.think).await;
        }
    }

    /// The first scanned item the shopper clicks, if any.
    fn pick(&mut self, items: &[String]) -> Option<String> {
        for p in items.iter().take(self.plan.scan) {
            let likes = self.category_of.get(p) == Some(&self.favourite);
            let chance = if likes {
                self.plan.click_favourite
            } else {
                self.plan.click_other
            };
            if self.rng.random_bool(chance) {
                return Some(p.clone());
            }
        }
        None
    }

    fn event(&self, n: &mut u64, t: EventType, product: &str, rec: Option<&String>) -> Event {
        *n += 1;
        Event {
            event_id: format!("{}-{}-{n}", self.user, self.plan.seed),
            user_id: self.user.clone(),
            event_type: t,
            product_id: Some(product.to_string()),
            query: None,
            ts: now_ms(),
            recommendation_id: rec.cloned(),
        }
    }

    /// The shopper's list: (recommendation id, model version, product ids), when it is a
    /// personalised one (fallback lists are not what the experiment compares).
    async fn get_list(&self) -> Option<(String, String, Vec<String>)> {
        let url = format!("{}/v1/users/{}/recommendations?k=10", self.api, self.user);
        let sent = Instant::now();
        let body: Option<Value> = match self.client.get(&url).send().await {
            Ok(r) if r.status().is_success() => r.json().await.ok(),
            _ => None,
        };
        let latency = sent.elapsed().as_micros() as u64;
        let mut s = self.shared.lock().expect("not poisoned");
        let Some(body) = body else {
            s.get_errors += 1;
            return None;
        };
        let _ = s.gets.record(latency.max(1));
        if !body["fallback"].is_null() {
            return None;
        }
        let version = body["model_version"].as_str()?.to_string();
        s.by_version.entry(version.clone()).or_default().lists += 1;
        let items = body["items"]
            .as_array()?
            .iter()
            .filter_map(|i| i["product_id"].as_str().map(str::to_string))
            .collect();
        Some((
            body["recommendation_id"].as_str()?.to_string(),
            version,
            items,
        ))
    }

    async fn post(&self, events: &[Event]) {
        let mut request = self
            .client
            .post(format!("{}/v1/events", self.api))
            .json(events);
        if let Some(key) = &self.api_key {
            request = request.header("x-api-key", key);
        }
        let sent = Instant::now();
        let ok = matches!(request.send().await, Ok(r) if r.status() == 202);
        let latency = sent.elapsed().as_micros() as u64;
        let mut s = self.shared.lock().expect("not poisoned");
        if ok {
            let _ = s.posts.record(latency.max(1));
            s.events += events.len() as u64;
        } else {
            s.post_errors += 1;
        }
    }
}

/// `GET /v1/experiments` as a table.
pub async fn print_experiments(client: &reqwest::Client, api: &str) -> anyhow::Result<()> {
    let report: Value = client
        .get(format!("{api}/v1/experiments?days=1"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    println!(
        "  {:<16} {:>6} {:>11} {:>7} {:>22} {:>9}",
        "arm", "share", "impressions", "clicks", "CTR (95% interval)", "purchases"
    );
    for a in report["arms"].as_array().into_iter().flatten() {
        let pct = |v: &Value| {
            v.as_f64()
                .map(|x| format!("{:.1}%", x * 100.0))
                .unwrap_or_else(|| "–".into())
        };
        let interval = match a["ctr_interval"].as_array() {
            Some(b) => format!("({}–{})", pct(&b[0]), pct(&b[1])),
            None => String::new(),
        };
        let n = |k: &str| a[k].as_u64().unwrap_or(0);
        println!(
            "  {:<16} {:>6} {:>11} {:>7} {:>22} {:>9}",
            a["arm"].as_str().unwrap_or("?"),
            pct(&a["serving_share"]),
            n("impressions"),
            n("clicks"),
            format!("{} {interval}", pct(&a["ctr"])),
            n("purchases")
        );
    }
    Ok(())
}
