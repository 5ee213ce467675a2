//! recpipe-loadtest: drives traffic at the pipeline and shows what comes out.
//!
//! - `events`: synthetic shoppers (each with a favourite category) POST events to the
//!   API at a target rate (open loop: sends are scheduled by the clock, not by replies),
//!   then prints throughput and latency.
//! - `shop`: shoppers GET their lists and click what appeals to them, naming the list,
//!   so the API can count click-through per model version (see `shop.rs`).
//! - `query`, `freshness`, `peak`: GETs at a target rate; probes that time how long an
//!   event takes to show in GET; and all of it at once with the event rate raised step by
//!   step to find the sustainable maximum. Each writes a report with plots (`--report`).
//! - `show`: prints a few users' recent events and recommendations, with titles.

mod ann;
mod http1;
mod memory;
mod mixed;
mod relay;
mod report;
mod scenarios;
mod series;
mod shop;
mod traffic;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

// The services' allocator, so that `memory` measures what update-embeddings would hold.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
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
    /// GET recommendations at a target rate (open loop) over users drawn by activity.
    Query {
        #[arg(long, default_value_t = 1_000.0)]
        rate: f64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long, default_value_t = 10_000)]
        users: usize,
        /// Directory for summary.json, plots and report.html.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Probe users: POST one event, poll GET until the list reflects it; with optional
    /// background traffic.
    Freshness {
        /// Probes per second.
        #[arg(long, default_value_t = 5.0)]
        rate: f64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Background events per second (Zipf users, sessions).
        #[arg(long, default_value_t = 0.0)]
        events_rate: f64,
        #[arg(long, default_value_t = 10_000)]
        users: usize,
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Events, GETs and probes at once, raising the event rate each step until the
    /// pipeline stops keeping up; reports the sustainable maximum.
    Peak {
        #[arg(long, default_value_t = 250.0)]
        start_rate: f64,
        /// Each step's event rate is the previous one's times this.
        #[arg(long, default_value_t = 1.5)]
        growth: f64,
        #[arg(long, default_value_t = 10)]
        step_secs: u64,
        /// At most this many steps: 13 reach 32,437 events/s from the default start, past
        /// what a 2-core machine sustains (9,611-21,624 in the runs of 2026-12-07), so
        /// that the run finds its limit.
        #[arg(long, default_value_t = 13)]
        max_steps: usize,
        /// After the first step not sustained, up to this many more, each halving the gap
        /// (as a ratio) between the highest sustained rate and the lowest not sustained:
        /// at the default growth of 1.5, 3 steps leave the limit within 5.2 %. Each waits
        /// for the pipeline to catch up and runs 6 s before it is judged. Before them,
        /// one more runs the ramp's answer again that way (a 10 s ramp step that began
        /// under load can hold a rate that 20 s from rest do not), and if that fails, the
        /// answer below it; a ramp that held all its steps has its top run again so. 0
        /// reports the ramp's steps alone.
        #[arg(long, default_value_t = 3)]
        refine_steps: usize,
        /// How long each refining step is judged: longer than a ramp step, as it decides
        /// between rates a few per cent apart and a lag can hold for a step's first
        /// seconds and grow in its last.
        #[arg(long, default_value_t = 20)]
        refine_step_secs: u64,
        /// GETs per second throughout.
        #[arg(long, default_value_t = 200.0)]
        query_rate: f64,
        /// Freshness probes per second throughout.
        #[arg(long, default_value_t = 5.0)]
        probe_rate: f64,
        /// A step is sustained while freshness p99 stays under this.
        #[arg(long, default_value_t = 1_000.0)]
        max_freshness_ms: f64,
        /// Services' /metrics URLs to read consumer lag from (repeatable).
        #[arg(long)]
        metrics: Vec<String>,
        #[arg(long, default_value_t = 10_000)]
        users: usize,
        /// Events per POST.
        #[arg(long, default_value_t = 20)]
        batch: usize,
        #[arg(long, default_value_t = 5)]
        seed: u64,
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Pipeline throughput ÷ that of three bare consume→produce relays on the same
    /// broker (kafka.* settings from configuration/ and RECPIPE_ variables).
    Relay {
        #[arg(long, default_value_t = 20_000)]
        events: usize,
        #[arg(long, default_value_t = 2_000)]
        users: usize,
        /// Write the summary as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Waits until save-worker has stored everything on its topics (its consumer group
    /// has committed to the end of each), and prints how long that took: the end of a
    /// drain, as `relay` reads it (kafka.* settings as for `relay`).
    Stored {
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// The baseline for GET benchmarks: an axum server that answers
    /// `GET /v1/users/{id}/recommendations` with a fixed body and does nothing else.
    TrivialServer {
        #[arg(long, default_value_t = 8090)]
        port: u16,
        /// File whose content is the answer (e.g. a real recommendations response).
        #[arg(long)]
        body: PathBuf,
    },
    /// recpipe's HNSW: queries/s (one thread) and recall@10 at several ef_search values;
    /// writes the vectors and queries as .npy for bench/ann_vs_hnswlib.py.
    Ann {
        #[arg(long, default_value = "target/ann-bench")]
        out: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        products: usize,
        #[arg(long, default_value_t = 1_000)]
        queries: usize,
        #[arg(long, default_value_t = 64)]
        dim: usize,
        /// Build, print `ready`, then answer each stdin line `SET EF` with one timed
        /// pass as JSON (bench/ann_vs_hnswlib.py alternates them with hnswlib's).
        #[arg(long)]
        serve_passes: bool,
    },
    /// Bytes of user state per user ÷ the raw vector, as update-embeddings holds it.
    Memory {
        #[arg(long, default_value_t = 100_000)]
        users: usize,
        /// Events applied to each user (the history is bounded at 50 products and ids).
        #[arg(long, default_value_t = 10)]
        events_per_user: usize,
        /// Users kept in memory (`state.hot_users`; default: the service's default).
        #[arg(long)]
        hot_users: Option<usize>,
        /// How the events' ids look: `sequential` (`user-0000042-e0007`, as the load
        /// tester and most counters make them) or `uuid` (random v4, as many producers do).
        #[arg(long, value_enum, default_value_t = memory::EventIds::Sequential)]
        event_ids: memory::EventIds,
        /// Events per batch (`state.events_batch_max`; default: the service's default).
        #[arg(long)]
        batch_events: Option<usize>,
    },
    /// Shoppers who GET their recommendations and click the ones they like (closed loop),
    /// then the click-through per model version.
    Shop {
        #[arg(long, default_value_t = 50)]
        shoppers: usize,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Pause between one shopper's actions, in ms.
        #[arg(long, default_value_t = 200)]
        think_ms: u64,
        /// Chance to click a shown product of the shopper's favourite category.
        #[arg(long, default_value_t = 0.1)]
        click_favourite: f64,
        /// Chance to click any other shown product.
        #[arg(long, default_value_t = 0.01)]
        click_other: f64,
        /// Items of a list a shopper looks at.
        #[arg(long, default_value_t = 5)]
        scan: usize,
        #[arg(long, default_value_t = 11)]
        seed: u64,
        /// Write the summary as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
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
    let target = scenarios::Target {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(4_096)
            .build()?,
        gets: http1::GetClient::new(&cli.api, Duration::from_secs(30)).map(std::sync::Arc::new),
        api: cli.api.clone(),
        api_key: cli.api_key.clone(),
    };
    match cli.command {
        Command::Query {
            rate,
            seconds,
            users,
            report,
        } => {
            let catalog = Catalog::load(&cli.catalog)?;
            let plan = mixed::Plan {
                seconds,
                events: scenarios::constant(0.0),
                queries: rate,
                probes: 0.0,
                users,
                batch: 20,
                seed: 1,
                metrics: Vec::new(),
            };
            let run = mixed::run(&target, &catalog, plan).await;
            mixed::finish_simple(&run, report.as_deref(), "query")
        }
        Command::Freshness {
            rate,
            seconds,
            events_rate,
            users,
            report,
        } => {
            let catalog = Catalog::load(&cli.catalog)?;
            let plan = mixed::Plan {
                seconds,
                events: scenarios::constant(events_rate),
                queries: 0.0,
                probes: rate,
                users,
                batch: 20,
                seed: 2,
                metrics: Vec::new(),
            };
            let run = mixed::run(&target, &catalog, plan).await;
            mixed::finish_simple(&run, report.as_deref(), "freshness")
        }
        Command::Peak {
            start_rate,
            growth,
            step_secs,
            max_steps,
            refine_steps,
            refine_step_secs,
            query_rate,
            probe_rate,
            max_freshness_ms,
            metrics,
            users,
            batch,
            seed,
            report,
        } => {
            let catalog = Catalog::load(&cli.catalog)?;
            let peak = mixed::Peak {
                start_rate,
                growth,
                step_secs,
                max_steps,
                refine_steps,
                refine_step_secs,
                query_rate,
                probe_rate,
                max_freshness_ms,
                metrics,
                users,
                batch,
                seed,
            };
            mixed::peak(&target, &catalog, peak, report.as_deref()).await
        }
        Command::Ann {
            out,
            products,
            queries,
            dim,
            serve_passes,
        } => {
            if serve_passes {
                let bench = ann::AnnBench::prepare(&out, products, queries, dim)?;
                return ann::serve_passes(bench, std::io::stdin().lock(), std::io::stdout().lock());
            }
            let points = ann::run(&out, products, queries, dim)?;
            for p in &points {
                println!("{}", serde_json::to_string(p)?);
            }
            Ok(())
        }
        Command::Memory {
            users,
            events_per_user,
            hot_users,
            event_ids,
            batch_events,
        } => {
            let catalog = std::sync::Arc::new(Catalog::load(&cli.catalog)?);
            let defaults = recpipe_shared::settings::StateSettings::default();
            let hot_users = hot_users.unwrap_or(defaults.hot_users);
            let batch_events = batch_events.unwrap_or(defaults.events_batch_max);
            let m = memory::run(
                catalog,
                users,
                events_per_user,
                hot_users,
                event_ids,
                batch_events,
            )?;
            println!(
                "{} users × {} events ({:?} ids), dim {}, at most {} in memory, batches of {}: {:.0} bytes of state per user in memory ({:.0} of them encoded states), {} bytes of raw vector: ratio {:.2}; state file {:.0} bytes per user; {:.1} µs per event (as JSON on the changelog: {:.0} bytes; the largest batch's records: {:.1} MB)",
                m.users, m.events_per_user, m.event_ids, m.dim, m.hot_users, m.batch_events, m.bytes_per_user, m.encoded_bytes_per_user, m.raw_vector_bytes, m.ratio, m.file_bytes_per_user, m.micros_per_event, m.json_bytes_per_user, m.batch_buffer_bytes as f64 / 1e6
            );
            println!("{}", serde_json::to_string(&m)?);
            Ok(())
        }
        Command::TrivialServer { port, body } => {
            let body: &'static str = Box::leak(std::fs::read_to_string(&body)?.into_boxed_str());
            let app = axum::Router::new().route(
                "/v1/users/{user_id}/recommendations",
                axum::routing::get(move || async move {
                    ([("content-type", "application/json")], body)
                }),
            );
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
            eprintln!("trivial server on 127.0.0.1:{port}");
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await?;
            Ok(())
        }
        Command::Relay {
            events,
            users,
            json,
        } => {
            let settings = recpipe_shared::settings::Settings::load("loadtest")?;
            let catalog = Catalog::load(&cli.catalog)?;
            let summary = relay::run(&settings.kafka, &cli.api, &catalog, events, users).await?;
            println!(
                "bare relay (3 hops): {:.0} events/s ({} events in {:.2} s)\nlists (events -> update-embeddings -> gen-recommendations -> recommendations topic): {:.0} events/s ({:.2} s); ratio {:.3}\npipeline (3 services, save-worker has stored everything): {:.0} events/s ({:.2} s)\nratio pipeline / relay: {:.3}\nafter the clock, {} users' lists read through GET reflect their last event ({} GETs)",
                summary.relay_events_per_sec,
                summary.events,
                summary.relay_seconds,
                summary.lists_events_per_sec,
                summary.lists_seconds,
                summary.lists_ratio,
                summary.pipeline_events_per_sec,
                summary.pipeline_seconds,
                summary.ratio,
                summary.users,
                summary.check_gets,
            );
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)?;
            }
            Ok(())
        }
        Command::Stored { timeout } => {
            let settings = recpipe_shared::settings::Settings::load("loadtest")?;
            let started = std::time::Instant::now();
            relay::wait_stored(&settings.kafka, Duration::from_secs(timeout)).await?;
            println!(
                "save-worker has stored everything ({:.2} s)",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
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
        Command::Shop {
            shoppers,
            seconds,
            think_ms,
            click_favourite,
            click_other,
            scan,
            seed,
            json,
        } => {
            let catalog = Catalog::load(&cli.catalog)?;
            let plan = shop::ShopPlan {
                shoppers,
                duration: Duration::from_secs(seconds),
                think: Duration::from_millis(think_ms),
                click_favourite,
                click_other,
                scan,
                seed,
            };
            let summary =
                shop::run(&client, &cli.api, cli.api_key.as_deref(), &catalog, plan).await?;
            println!(
                "{} GETs (p50 {:.1} ms, p99 {:.1} ms, {} failed), {} events (POST p50 {:.1} ms, p99 {:.1} ms, {} failed) in {:.0} s",
                summary.gets,
                summary.get_p50_ms,
                summary.get_p99_ms,
                summary.get_errors,
                summary.events,
                summary.post_p50_ms,
                summary.post_p99_ms,
                summary.post_errors,
                summary.seconds
            );
            let mut versions: Vec<_> = summary.by_version.iter().collect();
            versions.sort_by(|a, b| a.0.cmp(b.0));
            for (v, t) in versions {
                println!(
                    "  shoppers saw {} personalised lists from {v} and clicked {} ({:.1}%)",
                    t.lists,
                    t.clicks,
                    100.0 * t.clicks as f64 / t.lists.max(1) as f64
                );
            }
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)?;
            }
            // Impressions reach the store through Kafka: give the counts a moment.
            tokio::time::sleep(Duration::from_secs(2)).await;
            println!("the API's count (GET /v1/experiments):");
            shop::print_experiments(&client, &cli.api).await
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
