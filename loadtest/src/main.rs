//! recpipe-loadtest: drives traffic at the pipeline and shows what comes out.
//!
//! - `events`: synthetic shoppers (each with a favourite category) POST events to the
//!   API at a target rate (open loop: sends are scheduled by the clock, not by replies),
//!   then prints throughput and latency.
//! - `show`: prints a few users' recent events and recommendations, with titles.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use recpipe_shared::catalog::Catalog;
use recpipe_shared::events::{now_ms, Event, EventType};
use serde_json::Value;

#[derive(Parser)]
#[command(
    name = "recpipe-loadtest",
    about = "Traffic for recpipe, and a look at what comes out"
)]
struct Cli {
    /// Base URL of the query API.
    #[arg(long, default_value = "http://127.0.0.1:8080", global = true)]
    api: String,
    /// Catalog directory (products.jsonl + embeddings.npy).
    #[arg(long, default_value = ".run/catalog", global = true)]
    catalog: PathBuf,
    /// API key for POST /v1/events (when the API requires one).
    #[arg(long, env = "RECPIPE_LOADTEST_API_KEY", global = true)]
    api_key: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// POST synthetic shopping sessions to /v1/events.
    Events {
        #[arg(long, default_value_t = 100)]
        users: usize,
        /// Events in total.
        #[arg(long, default_value_t = 2_000)]
        events: usize,
        /// Target events per second.
        #[arg(long, default_value_t = 500)]
        rate: u32,
        /// Events per POST.
        #[arg(long, default_value_t = 20)]
        batch: usize,
        /// Share of a user's events on their favourite category.
        #[arg(long, default_value_t = 0.85)]
        focus: f64,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Print users' recent events and recommendations.
    Show {
        /// Comma-separated user ids.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "user-0001,user-0002,user-0003"
        )]
        users: Vec<String>,
        #[arg(long, default_value_t = 5)]
        k: usize,
        /// Wait up to this long for each list to reflect the user's newest stored event.
        #[arg(long, default_value_t = 30)]
        wait_secs: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    match cli.command {
        Command::Events {
            users,
            events,
            rate,
            batch,
            focus,
            seed,
        } => {
            let catalog = Catalog::load(&cli.catalog)?;
            let plan = shoppers(&catalog, users, events, focus, seed);
            send(&client, &cli.api, plan, rate, batch.max(1)).await
        }
        Command::Show {
            users,
            k,
            wait_secs,
        } => {
            show(
                &client,
                &cli.api,
                &Catalog::load(&cli.catalog)?,
                &users,
                k,
                Duration::from_secs(wait_secs),
            )
            .await
        }
    }
}

/// The events of `users` shoppers, in sending order, deterministic for a seed.
fn shoppers(catalog: &Catalog, users: usize, events: usize, focus: f64, seed: u64) -> Vec<Event> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut by_category: HashMap<&str, Vec<&str>> = HashMap::new();
    for p in catalog.products() {
        by_category
            .entry(p.category.as_str())
            .or_default()
            .push(p.product_id.as_str());
    }
    let mut categories: Vec<&str> = by_category.keys().copied().collect();
    categories.sort();
    let favourites: Vec<&str> = (0..users)
        .map(|u| categories[u % categories.len()])
        .collect();
    let start = now_ms();
    (0..events)
        .map(|i| {
            let u = rng.random_range(0..users.max(1));
            let category = if rng.random_bool(focus) {
                favourites[u]
            } else {
                categories[rng.random_range(0..categories.len())]
            };
            let products = &by_category[category];
            let roll: f64 = rng.random();
            let event_type = match roll {
                r if r < 0.03 => EventType::Search,
                r if r < 0.72 => EventType::View,
                r if r < 0.88 => EventType::Click,
                r if r < 0.96 => EventType::AddToCart,
                _ => EventType::Purchase,
            };
            let (product_id, query) = match event_type {
                EventType::Search => (None, Some(category.to_string())),
                _ => (
                    Some(products[rng.random_range(0..products.len())].to_string()),
                    None,
                ),
            };
            Event {
                event_id: format!("lt-{seed}-{i}"),
                user_id: format!("user-{:04}", u + 1),
                event_type,
                product_id,
                query,
                ts: start + i as i64,
                recommendation_id: None,
            }
        })
        .collect()
}

async fn send(
    client: &reqwest::Client,
    api: &str,
    plan: Vec<Event>,
    rate: u32,
    batch: usize,
) -> anyhow::Result<()> {
    let url = format!("{api}/v1/events");
    let batches: Vec<Vec<Event>> = plan.chunks(batch).map(<[Event]>::to_vec).collect();
    let interval = Duration::from_secs_f64(batch as f64 / rate.max(1) as f64);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(batches.len());
    let total = plan.len();
    for (i, chunk) in batches.into_iter().enumerate() {
        // Open loop: each POST leaves at its scheduled time, whatever earlier ones do.
        tokio::time::sleep_until((started + interval * i as u32).into()).await;
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let result = client.post(&url).json(&chunk).send().await;
            let latency = sent.elapsed();
            match result {
                Ok(r) if r.status() == 202 => Ok((chunk.len(), latency)),
                Ok(r) => Err(format!(
                    "{}: {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                )),
                Err(e) => Err(e.to_string()),
            }
        }));
        if (i + 1) % 50 == 0 {
            eprint!("\r  sent {:>7} / {total} events", (i + 1) * batch);
        }
    }
    let (mut accepted, mut latencies, mut errors) = (0, Vec::new(), Vec::new());
    for t in tasks {
        match t.await? {
            Ok((n, latency)) => {
                accepted += n;
                latencies.push(latency);
            }
            Err(e) => errors.push(e),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(0.0)
    };
    eprintln!();
    println!(
        "accepted {accepted} of {total} events in {elapsed:.1} s ({:.0} events/s); POST latency p50 {:.1} ms, p99 {:.1} ms; {} failed POSTs",
        accepted as f64 / elapsed,
        pct(0.5),
        pct(0.99),
        errors.len()
    );
    if let Some(first) = errors.first() {
        anyhow::bail!("{} POSTs failed, first: {first}", errors.len());
    }
    Ok(())
}

async fn show(
    client: &reqwest::Client,
    api: &str,
    catalog: &Catalog,
    users: &[String],
    k: usize,
    wait: Duration,
) -> anyhow::Result<()> {
    for user in users {
        // The pipeline is asynchronous: wait until the list was made from the newest
        // event the store holds for the user.
        let deadline = Instant::now() + wait;
        let (events, recs) = loop {
            let events: Value = client
                .get(format!("{api}/v1/users/{user}/events?limit=200"))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let recs: Value = client
                .get(format!("{api}/v1/users/{user}/recommendations?k={k}"))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let newest = &events["events"][0]["event_id"];
            if (!newest.is_null() && recs["source_event_id"] == *newest)
                || Instant::now() >= deadline
            {
                break (events, recs);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let events = events["events"].as_array().cloned().unwrap_or_default();
        // What the user touched, by category, most first.
        let mut touched: HashMap<String, usize> = HashMap::new();
        for e in &events {
            let category = match e["product_id"].as_str().and_then(|p| catalog.get(p)) {
                Some(p) => p.category.clone(),
                None => format!("search \"{}\"", e["query"].as_str().unwrap_or("?")),
            };
            *touched.entry(category).or_default() += 1;
        }
        let mut touched: Vec<(String, usize)> = touched.into_iter().collect();
        touched.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let summary: Vec<String> = touched
            .iter()
            .take(4)
            .map(|(c, n)| format!("{n} {c}"))
            .collect();
        let label = match recs["fallback"].as_str() {
            Some(f) => format!("fallback: {f}"),
            None => "personalised".to_string(),
        };
        println!(
            "\n{user}: {} events stored; touched {}",
            events.len(),
            summary.join(", ")
        );
        println!(
            "  recommendations [{label}, model {}]:",
            recs["model_version"].as_str().unwrap_or("?")
        );
        for item in recs["items"].as_array().into_iter().flatten() {
            let because = match item["because"]["title"].as_str() {
                Some(t) => format!("  (because you viewed {t})"),
                None => String::new(),
            };
            println!(
                "    {:>6.3}  {:<34} {:<8} {}{because}",
                item["score"].as_f64().unwrap_or(0.0),
                item["title"].as_str().unwrap_or("?"),
                item["category"].as_str().unwrap_or("?"),
                item["product_id"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(())
}
