//! Runs of events, GETs and freshness probes together, their reports, and the `peak`
//! search for the highest event rate the pipeline sustains.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use recpipe_shared::catalog::Catalog;
use serde::Serialize;

use crate::report::{self, Line, BLUE, GREEN, GREY, ORANGE, RED};
use crate::scenarios::{self, judge, Phase, Rate, Step, Target};
use crate::series::{Gauge, NamedGauges, NamedPoints, SecondSummary, Series, StreamSummary};
use crate::traffic::Clickstream;

/// Longest a probe waits for its event to show.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Plan {
    pub seconds: u64,
    pub events: Rate,
    pub queries: f64,
    pub probes: f64,
    pub users: usize,
    pub batch: usize,
    pub seed: u64,
    pub metrics: Vec<String>,
}

/// What a run measured.
pub struct Run {
    pub seconds: u64,
    pub events: Series,
    pub gets: Series,
    pub probes: Series,
    /// Consumer lag summed over the services, and each service's.
    pub lag: Gauge,
    pub lag_by_service: NamedGauges,
}

struct Streams {
    clickstream: Arc<Mutex<Clickstream>>,
    products: Arc<Vec<String>>,
    started: Instant,
    run: Run,
}

fn streams(catalog: &Catalog, users: usize, seed: u64, seconds: u64) -> Streams {
    let started = Instant::now();
    Streams {
        clickstream: Arc::new(Mutex::new(Clickstream::new(
            catalog,
            users,
            0.85,
            seed,
            &format!("lt{seed}-{}", recpipe_shared::events::now_ms()),
        ))),
        products: Arc::new(
            catalog
                .products()
                .iter()
                .filter(|p| p.available)
                .map(|p| p.product_id.clone())
                .collect(),
        ),
        started,
        run: Run {
            seconds,
            events: Series::new(started),
            gets: Series::new(started),
            probes: Series::new(started),
            lag: Gauge::default(),
            lag_by_service: NamedGauges::default(),
        },
    }
}

/// Drives the three streams until `until`.
async fn drive(
    target: &Target,
    s: &Streams,
    events: Rate,
    queries: f64,
    probes: f64,
    batch: usize,
    until: Instant,
) {
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(scenarios::drive_events(
        target.clone(),
        s.clickstream.clone(),
        events,
        batch,
        s.started,
        until,
        s.run.events.clone(),
    )));
    if queries > 0.0 {
        tasks.push(tokio::spawn(scenarios::drive_queries(
            target.clone(),
            s.clickstream.clone(),
            scenarios::constant(queries),
            s.started,
            until,
            s.run.gets.clone(),
        )));
    }
    let probe_task = (probes > 0.0).then(|| {
        tokio::spawn(scenarios::drive_probes(
            target.clone(),
            s.products.clone(),
            20,
            probes,
            PROBE_TIMEOUT,
            s.started,
            until,
            s.run.probes.clone(),
        ))
    });
    for t in tasks {
        let _ = t.await;
    }
    if let Some(t) = probe_task {
        let _ = t.await;
    }
}

pub async fn run(target: &Target, catalog: &Catalog, plan: Plan) -> Run {
    let mut s = streams(catalog, plan.users, plan.seed, plan.seconds);
    if plan.probes > 0.0 {
        // Warm up under the same event load, so its start is not mistaken for the
        // steady state.
        let warm = streams(catalog, plan.users, plan.seed + 1, 3);
        let events = tokio::spawn(scenarios::drive_events(
            target.clone(),
            warm.clickstream.clone(),
            plan.events.clone(),
            plan.batch,
            warm.started,
            warm.started + Duration::from_secs(3),
            warm.run.events.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(2)).await;
        warm_up(target, &s, 1_000.0).await;
        let _ = events.await;
        // The run's clock starts after the warm-up.
        s = streams(catalog, plan.users, plan.seed, plan.seconds);
    }
    let until = s.started + Duration::from_secs(plan.seconds);
    let lag = tokio::spawn(scenarios::scrape_lag(
        target.client.clone(),
        plan.metrics.clone(),
        s.started,
        until,
        s.run.lag.clone(),
        s.run.lag_by_service.clone(),
    ));
    let bar = scenarios::progress(Duration::from_secs(plan.seconds), "running");
    let ticker = {
        let (bar, events, gets, probes) = (
            bar.clone(),
            s.run.events.clone(),
            s.run.gets.clone(),
            s.run.probes.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let t = s_elapsed(&bar);
                let (e, g, p) = (
                    events.summary(0, t),
                    gets.summary(0, t),
                    probes.summary(0, t),
                );
                bar.set_message(format!("{} events, {} GETs, {} probes", e.ok, g.ok, p.ok));
                bar.inc(1);
            }
        })
    };
    drive(
        target,
        &s,
        plan.events,
        plan.queries,
        plan.probes,
        plan.batch,
        until,
    )
    .await;
    // Let requests in flight finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ticker.abort();
    bar.finish_and_clear();
    let _ = lag.await;
    s.run
}

fn s_elapsed(bar: &indicatif::ProgressBar) -> u64 {
    bar.position() + 1
}

#[derive(Serialize)]
struct SimpleSummary {
    scenario: String,
    machine: String,
    seconds: u64,
    events: StreamSummary,
    gets: StreamSummary,
    freshness: StreamSummary,
    per_second: PerSecond,
}

#[derive(Serialize)]
struct PerSecond {
    events: Vec<SecondSummary>,
    gets: Vec<SecondSummary>,
    freshness: Vec<SecondSummary>,
    lag: Vec<(f64, f64)>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    lag_by_service: NamedPoints,
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "–".into())
}

fn line(name: &str, s: &StreamSummary) -> String {
    format!(
        "{name:<10} {:>9} ok {:>6} errors {:>9.1}/s   p50 {:>8} ms  p99 {:>8} ms  p99.9 {:>8} ms  max {:>8} ms",
        s.ok,
        s.errors,
        s.per_sec,
        fmt_ms(s.p50_ms),
        fmt_ms(s.p99_ms),
        fmt_ms(s.p999_ms),
        fmt_ms(s.max_ms)
    )
}

/// Prints a run's totals, and writes its report when asked.
pub fn finish_simple(run: &Run, dir: Option<&Path>, scenario: &str) -> anyhow::Result<()> {
    let (e, g, f) = (
        run.events.summary(0, run.seconds),
        run.gets.summary(0, run.seconds),
        run.probes.summary(0, run.seconds),
    );
    for (name, s) in [("events", &e), ("GET", &g), ("freshness", &f)] {
        if s.ok + s.errors > 0 {
            println!("{}", line(name, s));
        }
    }
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)?;
        let plots = plot_run(dir, run, None)?;
        let summary = SimpleSummary {
            scenario: scenario.into(),
            machine: report::machine_description(),
            seconds: run.seconds,
            events: e.clone(),
            gets: g.clone(),
            freshness: f.clone(),
            per_second: per_second(run),
        };
        let table = format!(
            "<pre>{}\n{}\n{}</pre>",
            line("events", &e),
            line("GET", &g),
            line("freshness", &f)
        );
        report::write(
            dir,
            &format!("recpipe-loadtest {scenario}"),
            &summary,
            &table,
            &plots,
        )?;
        println!("report: {}", dir.join("report.html").display());
    }
    Ok(())
}

fn per_second(run: &Run) -> PerSecond {
    PerSecond {
        events: run.events.seconds(),
        gets: run.gets.seconds(),
        freshness: run.probes.seconds(),
        lag: run.lag.points(),
        lag_by_service: run.lag_by_service.points(),
    }
}

/// Writes the plots of a run; returns their file names.
fn plot_run(
    dir: &Path,
    run: &Run,
    target_rate: Option<Vec<(f64, f64)>>,
) -> anyhow::Result<Vec<&'static str>> {
    // The last second of a stream is partial: leave it out of the plots.
    let whole = |mut v: Vec<SecondSummary>| {
        v.pop();
        v
    };
    let (events, gets, probes) = (
        whole(run.events.seconds()),
        whole(run.gets.seconds()),
        whole(run.probes.seconds()),
    );
    let mut throughput = vec![
        Line {
            label: "events accepted /s",
            colour: ORANGE,
            points: report::points(&events, |s| Some(s.ok as f64)),
        },
        Line {
            label: "GETs answered /s",
            colour: BLUE,
            points: report::points(&gets, |s| Some(s.ok as f64)),
        },
        Line {
            label: "errors /s",
            colour: RED,
            points: report::points(&events, |s| Some(s.errors as f64)),
        },
    ];
    if let Some(target) = target_rate {
        throughput.push(Line {
            label: "target events /s",
            colour: GREY,
            points: target,
        });
    }
    report::plot(
        &dir.join("throughput.svg"),
        "Throughput per second",
        "per second",
        &throughput,
        false,
    )?;
    report::plot(
        &dir.join("latency.svg"),
        "Latency per second (from the scheduled send time)",
        "ms",
        &[
            Line {
                label: "GET p50",
                colour: BLUE,
                points: report::points(&gets, |s| s.p50_ms),
            },
            Line {
                label: "GET p99",
                colour: GREEN,
                points: report::points(&gets, |s| s.p99_ms),
            },
            Line {
                label: "POST p99",
                colour: ORANGE,
                points: report::points(&events, |s| s.p99_ms),
            },
        ],
        true,
    )?;
    let mut plots = vec!["throughput.svg", "latency.svg"];
    if !probes.is_empty() {
        report::plot(
            &dir.join("freshness.svg"),
            "Freshness: POST of an event until GET reflects it",
            "ms",
            &[
                Line {
                    label: "p50",
                    colour: BLUE,
                    points: report::points(&probes, |s| s.p50_ms),
                },
                Line {
                    label: "max",
                    colour: RED,
                    points: report::points(&probes, |s| s.max_ms),
                },
            ],
            true,
        )?;
        plots.push("freshness.svg");
    }
    let lag = run.lag.points();
    if !lag.is_empty() {
        let by_service = run.lag_by_service.points();
        let mut lines = vec![Line {
            label: "all services",
            colour: RED,
            points: lag,
        }];
        // One service alone is the total: its line would hide under it.
        if by_service.len() > 1 {
            lines.extend(
                by_service
                    .iter()
                    .zip([BLUE, ORANGE, GREEN, GREY].into_iter().cycle())
                    .map(|((service, points), colour)| Line {
                        label: service,
                        colour,
                        points: points.clone(),
                    }),
            );
        }
        report::plot(
            &dir.join("lag.svg"),
            "Consumer lag (records)",
            "records",
            &lines,
            false,
        )?;
        plots.push("lag.svg");
    }
    Ok(plots)
}

pub struct Peak {
    pub start_rate: f64,
    pub growth: f64,
    pub step_secs: u64,
    pub max_steps: usize,
    /// Steps after the first one not sustained, each halving the gap to the highest
    /// sustained rate (see [`scenarios::refine_rate`]).
    pub refine_steps: usize,
    /// How long each refining step is judged (after its lead-in).
    pub refine_step_secs: u64,
    pub query_rate: f64,
    pub probe_rate: f64,
    pub max_freshness_ms: f64,
    pub metrics: Vec<String>,
    pub users: usize,
    pub batch: usize,
    pub seed: u64,
}

#[derive(Serialize)]
struct PeakSummary {
    machine: String,
    /// The highest sustained step's rate below the lowest not sustained: the limit when
    /// `limit_found`, else a floor.
    sustainable_events_per_sec: Option<f64>,
    /// Whether a step was not sustained, so that the limit lies between the sustainable
    /// rate and `not_sustained_events_per_sec`. False when every step held.
    limit_found: bool,
    /// The lowest rate of a step not sustained.
    not_sustained_events_per_sec: Option<f64>,
    /// Why the refining steps stopped before `--refine-steps` were run, if they did.
    refine_stopped: Option<String>,
    /// Accepted events/s in the best sustained step.
    sustained_accepted_per_sec: Option<f64>,
    max_freshness_ms: f64,
    query_rate: f64,
    probe_rate: f64,
    steps: Vec<Step>,
    per_second: PerSecond,
}

/// Waits until freshness probes come back quickly (consumer groups joined, indexes
/// built), so that start-up is not mistaken for a limit. Up to a minute; false if they
/// never did.
async fn warm_up(target: &Target, s: &Streams, max_freshness_ms: f64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    eprintln!(
        "  waiting for probes to come back within {:.0} ms",
        max_freshness_ms / 4.0
    );
    while Instant::now() < deadline {
        let probes = Series::new(Instant::now());
        // 20 probes a second: every probe user (and so every partition they hash to)
        // is seen once before measuring; a partition's first record after an
        // assignment waits for its state restore.
        scenarios::drive_probes(
            target.clone(),
            s.products.clone(),
            20,
            20.0,
            PROBE_TIMEOUT,
            Instant::now(),
            Instant::now() + Duration::from_secs(1),
            probes.clone(),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(max_freshness_ms as u64 / 2)).await;
        let summary = probes.summary(0, 5);
        if summary.ok >= 4
            && summary.errors == 0
            && summary.max_ms.is_some_and(|m| m < max_freshness_ms / 4.0)
        {
            return true;
        }
    }
    false
}

/// Refining stops once the highest sustained rate and the lowest not sustained are this
/// close (a ratio): closer than one run's own spread on a shared machine.
const REFINED_WITHIN: f64 = 1.02;

/// Ramp answers a run runs again (`scenarios::confirm_rate`): a ramp that held every step
/// runs its top again, and if that fails, the step below; a ramp that found a limit runs
/// its answer again, and if that fails, the one below. Each is a 20 s step and a rest.
const MAX_CONFIRMATIONS: usize = 2;

/// A second past librdkafka's statistics interval (`statistics.interval.ms`, 5 s), where
/// the consumer lag comes from: a lag reading taken sooner than this after a change of
/// load can still describe the time before it.
const LAG_REFRESH: Duration = Duration::from_secs(6);

/// How long a refining step runs before the part that is judged, so that the first lag
/// reading judged was taken under the step's load.
const REFINE_LEAD_IN: Duration = LAG_REFRESH;

/// The shortest step `judge` can call sustained when the lag is scraped (once a second):
/// its first seconds, whose lag is not judged, and the readings it needs after them.
const MIN_JUDGED_SECS: u64 =
    scenarios::LAG_SETTLING_SECS + scenarios::LAG_READINGS_NEEDED as u64 + 1;

/// Longest a refining step waits for the pipeline to catch up with the step before it.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

/// Waits, with no traffic, until the pipeline has worked off what a step it did not
/// sustain left behind (its consumer lag back to `caught_up` records, when the lag is
/// scraped) and probes come back quickly: a refining step that began on a backlog would
/// judge the backlog. Err says why it gave up.
async fn settle(
    target: &Target,
    s: &Streams,
    step_ended: Instant,
    lag_scraped: bool,
    caught_up: f64,
    max_freshness_ms: f64,
) -> Result<(), String> {
    let deadline = Instant::now() + SETTLE_LIMIT;
    if lag_scraped {
        let fresh_from = (step_ended + LAG_REFRESH - s.started).as_secs_f64();
        eprintln!("  waiting for the consumer lag to fall to {caught_up:.0} records");
        while !scenarios::lag_settled(&s.run.lag.points(), fresh_from, caught_up) {
            if Instant::now() >= deadline {
                let limit = SETTLE_LIMIT.as_secs();
                return Err(match s.run.lag.points().last() {
                    Some((t, lag)) if *t >= fresh_from => format!(
                        "the consumer lag was still {lag:.0} records {limit} s after the step"
                    ),
                    _ => format!(
                        "no consumer lag was read in the {limit} s after the step (see the --metrics addresses above)"
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    if warm_up(target, s, max_freshness_ms).await {
        Ok(())
    } else {
        Err(format!(
            "probes did not come back within {:.0} ms for a minute",
            max_freshness_ms / 4.0
        ))
    }
}

/// Raises the event rate step by step (GETs and probes steady), judging each step once
/// its probes had time to finish, until one is not sustained; then narrows the gap
/// between that rate and the highest sustained one with up to `refine_steps` more, each
/// from rest.
pub async fn peak(
    target: &Target,
    catalog: &Catalog,
    plan: Peak,
    dir: Option<&Path>,
) -> anyhow::Result<()> {
    anyhow::ensure!(plan.max_steps >= 1, "--max-steps must be at least 1");
    // `judge` needs 4 lag readings after a step's first 2 s (they are taken once a
    // second); a shorter step would be judged not sustained whatever the pipeline did.
    if !plan.metrics.is_empty() {
        anyhow::ensure!(
            plan.step_secs >= MIN_JUDGED_SECS,
            "--step-secs must be at least {MIN_JUDGED_SECS} with --metrics: a step's consumer lag is judged after its first 2 s, on 4 or more readings, one a second"
        );
        anyhow::ensure!(
            plan.refine_steps == 0 || plan.refine_step_secs >= MIN_JUDGED_SECS,
            "--refine-step-secs must be at least {MIN_JUDGED_SECS} with --metrics: a step's consumer lag is judged after its first 2 s, on 4 or more readings, one a second"
        );
    }
    // The refining steps, and the one that runs the answer again (`confirm_rate`).
    let long_steps = plan.refine_steps + usize::from(plan.refine_steps > 0);
    let total = plan.step_secs * plan.max_steps as u64
        + (plan.refine_step_secs + REFINE_LEAD_IN.as_secs()) * long_steps as u64;
    let s = streams(catalog, plan.users, plan.seed, total);
    // Scraped until the last step is judged (the task is stopped then): the warm-up and
    // the pauses between steps make the run longer than its steps.
    let lag_until =
        s.started + Duration::from_secs(3 * total + 600) + SETTLE_LIMIT * long_steps as u32;
    let lag_scraped = !plan.metrics.is_empty();
    let lag = tokio::spawn(scenarios::scrape_lag(
        target.client.clone(),
        plan.metrics.clone(),
        s.started,
        lag_until,
        s.run.lag.clone(),
        s.run.lag_by_service.clone(),
    ));
    eprintln!("  warming up");
    warm_up(target, &s, plan.max_freshness_ms).await;
    let mut steps: Vec<Step> = Vec::new();
    let mut rate = plan.start_rate;
    let mut phase = Phase::Ramp;
    let mut target_line = Vec::new();
    let mut refine_stopped = None;
    // Steps that ran a ramp step's answer again.
    let mut confirmations = 0;
    loop {
        // Steps start on a whole second of the run's clock, so per-second figures
        // belong to one step each.
        let start = s.started.elapsed().as_secs() + 1;
        tokio::time::sleep_until((s.started + Duration::from_secs(start)).into()).await;
        // A ramp step begins where the one before left the pipeline, under load. A
        // refining step begins from rest, so it runs a while before it is judged: its
        // first lag reading would otherwise be the idle pipeline's 0, against which the
        // records in flight at any rate (a second's worth or more) look like a lag that
        // grew.
        // It is judged over longer, too: it decides between rates a few per cent apart,
        // and a lag can hold for a step's first seconds and grow in its last.
        let (label, lead_in, judged_secs) = match phase {
            Phase::Ramp => (format!("step {}", steps.len() + 1), 0, plan.step_secs),
            Phase::Refine | Phase::Confirm => (
                format!(
                    "{} step {}",
                    if phase == Phase::Confirm {
                        "confirming"
                    } else {
                        "refining"
                    },
                    steps.len() + 1
                ),
                REFINE_LEAD_IN.as_secs(),
                plan.refine_step_secs,
            ),
        };
        let from = start + lead_in;
        let until = s.started + Duration::from_secs(from + judged_secs);
        eprintln!(
            "  {label}: {rate:.0} events/s, {:.0} GETs/s, {:.0} probes/s for {} s{}",
            plan.query_rate,
            plan.probe_rate,
            judged_secs,
            if lead_in > 0 {
                format!(", after {lead_in} s at that rate not judged")
            } else {
                String::new()
            }
        );
        target_line.push((start as f64, rate));
        drive(
            target,
            &s,
            scenarios::constant(rate),
            plan.query_rate,
            plan.probe_rate,
            plan.batch,
            until,
        )
        .await;
        let to = from + judged_secs;
        target_line.push((to as f64, rate));
        // Probes of the step's last moments need time to finish before it is judged.
        tokio::time::sleep(Duration::from_millis(plan.max_freshness_ms as u64 + 200)).await;
        let mut step = Step {
            phase,
            target_events_per_sec: rate,
            from_second: from,
            to_second: to,
            events: s.run.events.summary(from, to),
            gets: s.run.gets.summary(from, to),
            freshness: s.run.probes.summary(from, to),
            lag_end: None,
            lag_by_service: Vec::new(),
            sustained: false,
            why_not: None,
        };
        let lag = s.run.lag.points();
        judge(
            &mut step,
            plan.max_freshness_ms,
            lag_scraped.then_some(lag.as_slice()),
            &s.run.lag_by_service.points(),
        );
        eprintln!(
            "    accepted {:.0}/s, GET p99 {} ms, freshness p50 {} / p99 {} ms: {}",
            step.events.per_sec,
            fmt_ms(step.gets.p99_ms),
            fmt_ms(step.freshness.p50_ms),
            fmt_ms(step.freshness.p99_ms),
            if step.sustained {
                "sustained".to_string()
            } else {
                format!(
                    "NOT sustained ({})",
                    step.why_not.clone().unwrap_or_default()
                )
            }
        );
        let ramping_on = phase == Phase::Ramp && step.sustained;
        steps.push(step);
        if ramping_on && steps.len() < plan.max_steps {
            rate *= plan.growth;
            continue;
        }
        // Refining: the ramp found a step it did not sustain, or held all it had. First
        // the answer, if only a ramp step held it, is run again as a refining step is
        // (from rest, over longer); then the refining steps close the gap between the
        // highest rate sustained and the lowest not. A ramp that held every step has its
        // top run again, and if that fails, its new answer too.
        let confirm = (plan.refine_steps > 0 && confirmations < MAX_CONFIRMATIONS)
            .then(|| scenarios::confirm_rate(&steps))
            .flatten();
        confirmations += usize::from(confirm.is_some());
        let refined = steps.iter().filter(|s| s.phase == Phase::Refine).count();
        let (next, next_phase) = match confirm {
            Some(rate) => (rate, Phase::Confirm),
            None if refined < plan.refine_steps => {
                match scenarios::refine_rate(&steps, REFINED_WITHIN) {
                    Some(rate) => (rate, Phase::Refine),
                    None => break,
                }
            }
            None => break,
        };
        // Back to rest, as the ramp's steps began: at most a second's events behind (the
        // lag a pipeline that keeps up shows, see `judge`).
        let best = scenarios::best_step(&steps).map_or(0.0, |b| b.target_events_per_sec);
        let step_ended = s.started + Duration::from_secs(to);
        if let Err(why) = settle(
            target,
            &s,
            step_ended,
            lag_scraped,
            best.max(100.0),
            plan.max_freshness_ms,
        )
        .await
        {
            eprintln!("  refining stopped: {why}");
            refine_stopped = Some(why);
            break;
        }
        phase = next_phase;
        rate = next;
    }
    lag.abort();
    let best = scenarios::best_step(&steps);
    let verdict = scenarios::peak_verdict(&steps);
    // Said in every output: a run whose steps all held has not found the limit, and its
    // last rate read as "the sustainable maximum" would understate it.
    let more_steps = format!(
        "every step was sustained, so the limit is higher: run again with more steps (--max-steps, {} here) or a higher --start-rate",
        plan.max_steps
    );
    let summary = PeakSummary {
        machine: report::machine_description(),
        sustainable_events_per_sec: best.map(|s| s.target_events_per_sec),
        limit_found: matches!(verdict, scenarios::PeakVerdict::Limit { .. }),
        not_sustained_events_per_sec: match verdict {
            scenarios::PeakVerdict::Limit { not_sustained, .. } => Some(not_sustained),
            _ => None,
        },
        refine_stopped: refine_stopped.clone(),
        sustained_accepted_per_sec: best.map(|s| s.events.per_sec),
        max_freshness_ms: plan.max_freshness_ms,
        query_rate: plan.query_rate,
        probe_rate: plan.probe_rate,
        steps: steps.clone(),
        per_second: per_second(&s.run),
    };
    let not_above = summary
        .not_sustained_events_per_sec
        .map(|r| format!("{r:.0} not; "))
        .unwrap_or_default();
    match best {
        Some(b) => println!(
            "sustainable: {}{:.0} events/s ({not_above}accepted {:.0}/s; freshness p99 {} ms; GET p99 {} ms) with {:.0} GETs/s",
            if summary.limit_found { "" } else { "at least " },
            b.target_events_per_sec,
            b.events.per_sec,
            fmt_ms(b.freshness.p99_ms),
            fmt_ms(b.gets.p99_ms),
            plan.query_rate
        ),
        None => println!("not even the first step ({:.0} events/s) was sustained", plan.start_rate),
    }
    if let scenarios::PeakVerdict::AtLeast(_) = verdict {
        println!("{more_steps}");
    }
    if let Some(why) = &refine_stopped {
        println!("the limit was not narrowed further: {why}");
    }
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)?;
        let run = Run {
            seconds: s.started.elapsed().as_secs(),
            ..s.run
        };
        let plots = plot_run(dir, &run, Some(target_line))?;
        let mut table = String::from(
            "<table><tr><th>step</th><th>target events/s</th><th>accepted/s</th><th>GET p99 ms</th><th>freshness p50 ms</th><th>freshness p99 ms</th><th>lag at end</th><th>of which, by service</th><th>sustained</th></tr>",
        );
        for (i, st) in summary.steps.iter().enumerate() {
            table.push_str(&format!(
                "<tr><td>{}{}</td><td>{:.0}</td><td>{:.0}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
                i + 1,
                match st.phase {
                    Phase::Ramp => "",
                    Phase::Refine => " (refining)",
                    Phase::Confirm => " (confirming)",
                },
                st.target_events_per_sec,
                st.events.per_sec,
                fmt_ms(st.gets.p99_ms),
                fmt_ms(st.freshness.p50_ms),
                fmt_ms(st.freshness.p99_ms),
                st.lag_end.map(|l| format!("{l:.0}")).unwrap_or_else(|| "–".into()),
                lag_by_service_cell(&st.lag_by_service),
                if st.sustained { "yes" } else { "no" },
                if st.sustained { "yes".to_string() } else { format!("no: {}", st.why_not.clone().unwrap_or_default()) },
            ));
        }
        table.push_str("</table>");
        let beside = format!("with {:.0} GETs/s and {:.0} freshness probes/s (a step is sustained when every event is accepted at the target rate, freshness p99 ≤ {:.0} ms, and consumer lag does not keep growing)", plan.query_rate, plan.probe_rate, plan.max_freshness_ms);
        let headline = match verdict {
            scenarios::PeakVerdict::AtLeast(r) => format!(
                "<p><b>Sustainable: at least {r:.0} events/s</b> {beside}: {more_steps}.</p>"
            ),
            scenarios::PeakVerdict::Limit {
                sustained,
                not_sustained,
            } => {
                let stopped = refine_stopped
                    .as_ref()
                    .map(|why| format!(" The limit was not narrowed further: {why}."))
                    .unwrap_or_default();
                format!("<p><b>Sustainable: {sustained:.0} events/s</b> ({not_sustained:.0} not) {beside}.{stopped}</p>")
            }
            scenarios::PeakVerdict::NoneSustained => "<p><b>No step was sustained.</b></p>".into(),
        };
        report::write(
            dir,
            "recpipe-loadtest peak",
            &summary,
            &(headline + &table),
            &plots,
        )?;
        println!("report: {}", dir.join("report.html").display());
    }
    Ok(())
}

/// A step's lag by service for the report's table: each service's last reading, and its
/// trend where it grew.
fn lag_by_service_cell(lags: &[scenarios::ServiceLag]) -> String {
    if lags.is_empty() {
        return "–".into();
    }
    lags.iter()
        .map(|l| {
            let trend = if l.per_sec >= 1.0 {
                format!(" (+{:.0}/s)", l.per_sec)
            } else {
                String::new()
            };
            format!("{} {:.0}{trend}", l.service, l.end)
        })
        .collect::<Vec<_>>()
        .join("<br>")
}
