//! The traffic drivers: events, queries and freshness probes, each open loop (requests
//! leave at their scheduled time whatever earlier ones do), and the `peak` search that
//! runs all three while raising the event rate step by step.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use recpipe_shared::events::{now_ms, Event, EventType};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::series::{Gauge, NamedGauges, NamedPoints, Series, StreamSummary};
use crate::traffic::Clickstream;

/// Requests in flight beyond this are counted as errors rather than queued without bound.
const MAX_IN_FLIGHT: usize = 4_096;

#[derive(Clone)]
pub struct Target {
    pub client: reqwest::Client,
    /// The query driver's GETs over plain http (leaner than `client`: see `http1`).
    pub gets: Option<Arc<crate::http1::GetClient>>,
    pub api: String,
    pub api_key: Option<String>,
}

impl Target {
    async fn post_events(&self, events: &[Event]) -> bool {
        let mut request = self
            .client
            .post(format!("{}/v1/events", self.api))
            .json(events);
        if let Some(key) = &self.api_key {
            request = request.header("x-api-key", key);
        }
        matches!(request.send().await, Ok(r) if r.status() == 202)
    }

    /// GETs a user's list and reads the whole answer without decoding it: the query
    /// driver only counts answers, and decoding 2 KB of JSON per request took CPU from the
    /// server it measures on a shared machine.
    async fn get_answered(&self, user: &str) -> bool {
        let path = format!("/v1/users/{user}/recommendations?k=10");
        if let Some(gets) = &self.gets {
            return gets.get_ok(&path).await;
        }
        match self.client.get(format!("{}{path}", self.api)).send().await {
            Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
            _ => false,
        }
    }

    async fn get_list(&self, user: &str) -> Option<Value> {
        let url = format!("{}/v1/users/{user}/recommendations?k=10", self.api);
        match self.client.get(url).send().await {
            Ok(r) if r.status().is_success() => r.json().await.ok(),
            _ => None,
        }
    }
}

/// Events per second as a function of the time since the start.
pub type Rate = Arc<dyn Fn(Duration) -> f64 + Send + Sync>;

pub fn constant(rate: f64) -> Rate {
    Arc::new(move |_| rate)
}

/// Schedules `send` at `rate(t)` operations per second until `until`; each gets its
/// scheduled time. Returns how many were scheduled.
async fn open_loop<F, Fut>(
    started: Instant,
    until: Instant,
    rate: Rate,
    per_op: f64,
    send: F,
) -> u64
where
    F: FnMut(Instant) -> Option<Fut> + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || schedule(started, until, rate, per_op, send, runtime))
        .await
        .expect("the scheduler thread does not panic")
}

/// The scheduler's shortest sleep: requests due within it of each other leave together,
/// up to this late (counted in their latency, against the server).
const MIN_WAKE_GAP: Duration = Duration::from_micros(200);

/// [`open_loop`]'s clock, on a thread of its own. tokio's timers have a 1 ms resolution:
/// requests timed by them left in bursts up to 1 ms late, and since open-loop latency
/// counts from the scheduled time, that lateness (the client's, not the server's) was
/// most of a fast server's measured p50. A thread sleeping until the next request is due
/// is late by tens of microseconds; when it falls behind it sends without sleeping.
/// It wakes at most every [`MIN_WAKE_GAP`] and then sends every request due by then:
/// a wake-up per request (a sleep, a spawn that wakes a worker) cost the load tester
/// more CPU than its requests at 20,000/s, taken from the server it measures.
fn schedule<F, Fut>(
    started: Instant,
    until: Instant,
    rate: Rate,
    per_op: f64,
    mut send: F,
    runtime: tokio::runtime::Handle,
) -> u64
where
    F: FnMut(Instant) -> Option<Fut>,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let sleep_until = |at: Instant| {
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
    };
    let mut next = Instant::now();
    let mut woke = next;
    let mut n = 0;
    while next < until {
        let r = rate(next.saturating_duration_since(started));
        if r <= 0.0 {
            // Nothing to send now: look again in a moment (the rate may change).
            next += Duration::from_millis(100);
            sleep_until(next.min(until));
            continue;
        }
        next += Duration::from_secs_f64(per_op / r);
        if next >= until {
            break;
        }
        if next > Instant::now() {
            sleep_until(next.max(woke + MIN_WAKE_GAP));
            woke = Instant::now();
        }
        if let Some(fut) = send(next) {
            runtime.spawn(fut);
        }
        n += 1;
    }
    n
}

/// POSTs the clickstream in batches of `batch` at `rate` events per second.
pub async fn drive_events(
    target: Target,
    stream: Arc<Mutex<Clickstream>>,
    rate: Rate,
    batch: usize,
    started: Instant,
    until: Instant,
    series: Series,
) {
    let gate = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    open_loop(started, until, rate, batch as f64, move |scheduled| {
        let events: Vec<Event> = {
            let mut s = stream.lock().expect("not poisoned");
            (0..batch).map(|_| s.next_event()).collect()
        };
        let (target, series) = (target.clone(), series.clone());
        let Ok(permit) = gate.clone().try_acquire_owned() else {
            series.record(scheduled, false);
            return None;
        };
        Some(async move {
            let ok = target.post_events(&events).await;
            // One record per event: the series counts events, timed per request.
            for _ in 0..events.len() {
                series.record(scheduled, ok);
            }
            drop(permit);
        })
    })
    .await;
}

/// GETs the lists of users drawn by activity at `rate` requests per second.
pub async fn drive_queries(
    target: Target,
    stream: Arc<Mutex<Clickstream>>,
    rate: Rate,
    started: Instant,
    until: Instant,
    series: Series,
) {
    let gate = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    open_loop(started, until, rate, 1.0, move |scheduled| {
        let user = stream.lock().expect("not poisoned").active_user();
        let (target, series) = (target.clone(), series.clone());
        let Ok(permit) = gate.clone().try_acquire_owned() else {
            series.record(scheduled, false);
            return None;
        };
        Some(async move {
            let ok = target.get_answered(&user).await;
            series.record(scheduled, ok);
            drop(permit);
        })
    })
    .await;
}

/// Every `1/rate` s, one probe user views a product and polls GET until their list was
/// made from that event: the delay from POST to a visible change. A probe that sees no
/// change within `timeout` is an error.
#[allow(clippy::too_many_arguments)]
pub async fn drive_probes(
    target: Target,
    products: Arc<Vec<String>>,
    probe_users: usize,
    rate: f64,
    timeout: Duration,
    started: Instant,
    until: Instant,
    series: Series,
) {
    let mut k = 0usize;
    let run = now_ms();
    open_loop(started, until, constant(rate), 1.0, move |scheduled| {
        k += 1;
        let user = format!("probe-{:03}", k % probe_users.max(1));
        let event = Event {
            event_id: format!("probe-{run}-{k}"),
            user_id: user.clone(),
            event_type: EventType::View,
            product_id: Some(products[k * 7919 % products.len()].clone()),
            query: None,
            ts: now_ms(),
            recommendation_id: None,
        };
        let (target, series) = (target.clone(), series.clone());
        Some(async move {
            let sent = Instant::now();
            if !target.post_events(std::slice::from_ref(&event)).await {
                series.record_latency(scheduled, Duration::ZERO, false);
                return;
            }
            loop {
                if let Some(list) = target.get_list(&user).await {
                    if list["source_event_id"].as_str() == Some(event.event_id.as_str()) {
                        series.record_latency(scheduled, sent.elapsed(), true);
                        return;
                    }
                }
                if sent.elapsed() > timeout {
                    series.record_latency(scheduled, sent.elapsed(), false);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    })
    .await;
}

/// Sums `recpipe_consumer_lag` over the given `/metrics` URLs once a second into
/// `total`, and into `by_service` per service (its `service` label), which shows which
/// stage of the pipeline falls behind.
///
/// A second in which a URL does not answer with its page (a service down or
/// restarting) gives no reading: summed without that service's lag it would read as a
/// lag that fell. The first failure of each URL is said on stderr.
pub async fn scrape_lag(
    client: reqwest::Client,
    urls: Vec<String>,
    started: Instant,
    until: Instant,
    total: Gauge,
    by_service: NamedGauges,
) {
    if urls.is_empty() {
        return;
    }
    let mut failed_before = std::collections::HashSet::new();
    while Instant::now() < until {
        let mut services = BTreeMap::new();
        let mut every_url_read = true;
        for url in &urls {
            match metrics_page(&client, url).await {
                Ok(text) => {
                    for (service, lag) in lag_by_service(&text) {
                        *services.entry(service).or_insert(0.0) += lag;
                    }
                }
                Err(e) => {
                    every_url_read = false;
                    if failed_before.insert(url.clone()) {
                        eprintln!(
                            "  cannot read the consumer lag from {url} ({e}): no lag reading while it does not answer; check that the service is running and --metrics is its metrics address"
                        );
                    }
                }
            }
        }
        if every_url_read {
            let seconds = started.elapsed().as_secs_f64();
            total.push(seconds, services.values().sum());
            for (service, lag) in &services {
                by_service.push(seconds, service, *lag);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn metrics_page(client: &reqwest::Client, url: &str) -> reqwest::Result<String> {
    client
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await
}

/// The `recpipe_consumer_lag` gauges of a Prometheus text page, summed per `service`
/// label (over topics and partitions); "unnamed" for a line without one.
pub fn lag_by_service(metrics: &str) -> BTreeMap<String, f64> {
    let mut lags = BTreeMap::new();
    for line in metrics.lines() {
        let Some(labels_and_value) = line.strip_prefix("recpipe_consumer_lag{") else {
            continue;
        };
        let Some(lag) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        let service = labels_and_value
            .split_once("service=\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map_or("unnamed", |(name, _)| name);
        *lags.entry(service.to_string()).or_insert(0.0) += lag;
    }
    lags
}

/// A progress bar over a run of known length.
pub fn progress(total: Duration, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(total.as_secs());
    bar.set_style(
        ProgressStyle::with_template("  {prefix} [{bar:30}] {pos}/{len} s  {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar
}

/// Which part of a `peak` run a step belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// The rate raised by `--growth` each step until one is not sustained.
    Ramp,
    /// After that step: the gap between the highest sustained rate and the lowest one
    /// not sustained, halved (geometrically) each step.
    Refine,
    /// Before the refining steps: the ramp's answer run again as they are (from rest,
    /// judged over longer), see [`confirm_rate`].
    Confirm,
}

/// One rate step of a `peak` run.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub phase: Phase,
    pub target_events_per_sec: f64,
    pub from_second: u64,
    pub to_second: u64,
    pub events: StreamSummary,
    pub gets: StreamSummary,
    pub freshness: StreamSummary,
    /// Consumer lag at the end of the step (sum over services), when scraped.
    pub lag_end: Option<f64>,
    /// Each service's share of that lag, and its trend over the step.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lag_by_service: Vec<ServiceLag>,
    pub sustained: bool,
    pub why_not: Option<String>,
}

/// One service's consumer lag over a step (all its topics and partitions).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceLag {
    pub service: String,
    /// The last reading in the step.
    pub end: f64,
    /// Its trend over the part of the step that is judged, in records a second (see
    /// [`lag_slope`]).
    pub per_sec: f64,
}

/// The first seconds of a step whose consumer lag `judge` leaves out of the lag's trend.
pub const LAG_SETTLING_SECS: u64 = 2;

/// The fewest lag readings after those seconds that a step can be judged sustained on.
pub const LAG_READINGS_NEEDED: usize = 4;

/// Whether a step was sustained: the events were accepted at (nearly) the target rate,
/// every probe saw its event within `max_freshness_ms` at p99, and the lag (if scraped)
/// did not keep growing through the step.
///
/// The lag is a snapshot summed over the services' consumers (refreshed as often as
/// librdkafka's `statistics.interval.ms`), and a pipeline that keeps up shows a lag
/// that rises and falls: save-worker holds each window of records until its store write
/// is committed, and reads three topics, so at any instant it alone shows up to a few
/// seconds' events. So the lag counts as growing when its trend over the step's
/// readings (see [`lag_slope`]) rises by more than one second's events (at the step's
/// rate) over the step and the last reading is above the first: a rise that a few
/// readings of a sawtooth cannot fake, where the first and last readings alone could.
/// The step's first `LAG_SETTLING_SECS` are left out of that: at a higher rate the lag
/// a pipeline holds is higher too, and it climbs to its new level in the step's first
/// seconds (the longer save-worker's windows, the longer it climbs).
///
/// `lag` is None when no lag is scraped (no `--metrics`); scraped but not read in the
/// step (a metrics address that does not answer), the step is not sustained.
/// `by_service` is the lag per service (empty when not known), read at the same moments:
/// the step records each one's end and trend, and a lag that grew is said to have grown
/// most in the service whose trend rose most.
pub fn judge(
    step: &mut Step,
    max_freshness_ms: f64,
    lag: Option<&[(f64, f64)]>,
    by_service: &NamedPoints,
) {
    let mut why = Vec::new();
    if step.events.errors > 0 {
        why.push(format!("{} events not accepted", step.events.errors));
    }
    if step.events.per_sec < 0.95 * step.target_events_per_sec {
        why.push(format!(
            "accepted {:.0}/s of {:.0}/s",
            step.events.per_sec, step.target_events_per_sec
        ));
    }
    if step.freshness.errors > 0 {
        why.push(format!("{} probes timed out", step.freshness.errors));
    }
    match step.freshness.p99_ms {
        Some(p99) if p99 > max_freshness_ms => why.push(format!(
            "freshness p99 {p99:.0} ms > {max_freshness_ms:.0} ms"
        )),
        None => why.push("no probe finished".into()),
        _ => {}
    }
    let judged_from = step.from_second + LAG_SETTLING_SECS;
    let judged = |readings: &[(f64, f64)]| -> Vec<(f64, f64)> {
        readings
            .iter()
            .filter(|(t, _)| *t >= judged_from as f64 && *t < step.to_second as f64)
            .copied()
            .collect()
    };
    let in_step = judged(lag.unwrap_or_default());
    step.lag_by_service = by_service
        .iter()
        .filter_map(|(service, readings)| {
            let readings = judged(readings);
            Some(ServiceLag {
                service: service.clone(),
                end: readings.last()?.1,
                per_sec: lag_slope(&readings),
            })
        })
        .collect();
    // Scraped (metrics given) but too few readings in the step to see a trend: the step
    // cannot be called sustained.
    if lag.is_some() && in_step.len() < LAG_READINGS_NEEDED {
        why.push(format!(
            "consumer lag read {} times in the step after its first {LAG_SETTLING_SECS} s, {LAG_READINGS_NEEDED} needed",
            in_step.len()
        ));
    }
    if let (Some((_, first)), Some((_, last))) = (in_step.first(), in_step.last()) {
        step.lag_end = Some(*last);
        let per_sec = lag_slope(&in_step);
        let rise = per_sec * step.to_second.saturating_sub(judged_from) as f64;
        let rising = in_step.len() >= LAG_READINGS_NEEDED
            && last > first
            && rise > step.target_events_per_sec.max(100.0);
        if rising {
            let most = step
                .lag_by_service
                .iter()
                .filter(|s| s.per_sec > 0.0)
                .max_by(|a, b| a.per_sec.total_cmp(&b.per_sec))
                .map(|s| format!(", most in {}'s (by {:.0}/s)", s.service, s.per_sec))
                .unwrap_or_default();
            why.push(format!(
                "consumer lag grew from {first:.0} to {last:.0} (by {per_sec:.0}/s){most}"
            ));
        }
    }
    step.sustained = why.is_empty();
    step.why_not = (!why.is_empty()).then(|| why.join("; "));
}

/// The slope of `(second, lag)` readings, in lag per second: the median of the slopes
/// between every two readings (Theil and Sen's estimator), which a few readings far off
/// the trend do not move: a step's first reading of 0, taken before librdkafka's numbers
/// caught up with its load, or one taken at a sawtooth's crest. 0 when every reading was
/// taken at one moment.
fn lag_slope(readings: &[(f64, f64)]) -> f64 {
    let mut slopes: Vec<f64> = readings
        .iter()
        .enumerate()
        .flat_map(|(i, (t0, v0))| {
            readings[i + 1..]
                .iter()
                .filter(move |(t1, _)| t1 > t0)
                .map(move |(t1, v1)| (v1 - v0) / (t1 - t0))
        })
        .collect();
    if slopes.is_empty() {
        return 0.0;
    }
    slopes.sort_by(f64::total_cmp);
    let mid = slopes.len() / 2;
    if slopes.len() % 2 == 1 {
        slopes[mid]
    } else {
        (slopes[mid - 1] + slopes[mid]) / 2.0
    }
}

/// What a peak run found, from its steps (in any order).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PeakVerdict {
    /// The highest rate sustained below the lowest rate that was not: the limit lies
    /// between the two.
    Limit { sustained: f64, not_sustained: f64 },
    /// Every step was sustained: the limit is above the highest one's rate, and only more
    /// steps (or a higher start rate) find it.
    AtLeast(f64),
    /// Not even the lowest step was sustained (or no step ran).
    NoneSustained,
}

/// The step a peak run reports as its sustainable rate: the highest sustained below the
/// lowest rate not sustained. A step that held above a lower one that did not (a noisy
/// moment either way) is not taken: the run's answer is the rate it has not seen fail.
pub fn best_step(steps: &[Step]) -> Option<&Step> {
    let lowest_failed = lowest_not_sustained(steps).unwrap_or(f64::INFINITY);
    steps
        .iter()
        .filter(|s| s.sustained && s.target_events_per_sec < lowest_failed)
        .max_by(|a, b| a.target_events_per_sec.total_cmp(&b.target_events_per_sec))
}

fn lowest_not_sustained(steps: &[Step]) -> Option<f64> {
    steps
        .iter()
        .filter(|s| !s.sustained)
        .map(|s| s.target_events_per_sec)
        .min_by(f64::total_cmp)
}

pub fn peak_verdict(steps: &[Step]) -> PeakVerdict {
    match (best_step(steps), lowest_not_sustained(steps)) {
        (Some(best), Some(failed)) => PeakVerdict::Limit {
            sustained: best.target_events_per_sec,
            not_sustained: failed,
        },
        (Some(best), None) => PeakVerdict::AtLeast(best.target_events_per_sec),
        (None, _) => PeakVerdict::NoneSustained,
    }
}

/// The rate of a peak run's next refining step, or None when there is nothing left to
/// refine: no limit found yet, or the gap already within `within` (1.02 is 2 %). The
/// geometric mean of the two rates, so each step halves the gap's ratio: with the default
/// growth of 1.5, three steps leave it at 1.052.
pub fn refine_rate(steps: &[Step], within: f64) -> Option<f64> {
    match peak_verdict(steps) {
        PeakVerdict::Limit {
            sustained,
            not_sustained,
        } if not_sustained / sustained > within => Some((sustained * not_sustained).sqrt()),
        _ => None,
    }
}

/// The rate a peak run should run once more before its refining steps, or before it
/// ends with every step held: its answer so far, when only a ramp step held it. A ramp
/// step is judged over a short step that began where the step before left the pipeline,
/// and a lag that takes longer than that to grow passes it; a refining step begins from
/// rest and is judged over longer. None when the answer was already a refining step's,
/// or a ramp step's that a refining step ran again.
pub fn confirm_rate(steps: &[Step]) -> Option<f64> {
    let sustained = match peak_verdict(steps) {
        PeakVerdict::Limit { sustained, .. } | PeakVerdict::AtLeast(sustained) => sustained,
        PeakVerdict::NoneSustained => return None,
    };
    let answer = best_step(steps)?;
    let run_again = steps
        .iter()
        .any(|s| s.phase != Phase::Ramp && s.target_events_per_sec == sustained);
    (answer.phase == Phase::Ramp && !run_again).then_some(sustained)
}

/// Whether the pipeline has worked off what a step it did not sustain left behind, from
/// the consumer lag's readings `(second, lag)`: the newest reading taken at or after
/// `fresh_from` (librdkafka refreshes the lag every 5 s, so one taken sooner after the
/// step can still describe it) is at most `caught_up`.
pub fn lag_settled(lag: &[(f64, f64)], fresh_from: f64, caught_up: f64) -> bool {
    lag.iter()
        .rev()
        .find(|(t, _)| *t >= fresh_from)
        .is_some_and(|(_, v)| *v <= caught_up)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn step_at(rate: f64, p99_ms: f64) -> Step {
        let stream = |per_sec: f64, p99: f64| StreamSummary {
            ok: 1,
            errors: 0,
            per_sec,
            p50_ms: Some(p99 / 2.0),
            p90_ms: Some(p99),
            p99_ms: Some(p99),
            p999_ms: Some(p99),
            max_ms: Some(p99),
        };
        Step {
            phase: Phase::Ramp,
            target_events_per_sec: rate,
            from_second: 39,
            to_second: 51,
            events: stream(rate, 5.0),
            gets: stream(200.0, 5.0),
            freshness: stream(5.0, p99_ms),
            lag_end: None,
            lag_by_service: Vec::new(),
            sustained: false,
            why_not: None,
        }
    }

    /// `judge` with a freshness limit of 1 s and no per-service readings; no readings
    /// at all stand for a run without `--metrics`.
    fn judge_total(step: &mut Step, lag: &[(f64, f64)]) {
        judge(
            step,
            1000.0,
            (!lag.is_empty()).then_some(lag),
            &BTreeMap::new(),
        );
    }

    fn lag_from(second: u64, values: &[f64]) -> Vec<(f64, f64)> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| ((second + i as u64) as f64 + 0.2, *v))
            .collect()
    }

    #[test]
    fn a_lag_within_a_second_of_events_is_kept_up_with_and_a_rising_one_is_not() {
        // A real run at 844 events/s that kept up (save-worker's 100 ms fetches): the
        // lag's snapshots, refreshed every 5 s.
        let mut steady = step_at(844.0, 124.9);
        let sawtooth = [
            27.0, 228.0, 228.0, 228.0, 228.0, 228.0, 272.0, 272.0, 272.0, 272.0,
        ];
        judge_total(&mut steady, &lag_from(41, &sawtooth));
        assert!(steady.sustained, "{:?}", steady.why_not);
        assert_eq!(steady.lag_end, Some(272.0));
        // Falling behind by 300 events a second.
        let mut behind = step_at(844.0, 124.9);
        let rising: Vec<f64> = (0..10).map(|i| 50.0 + 300.0 * i as f64).collect();
        judge_total(&mut behind, &lag_from(41, &rising));
        assert!(!behind.sustained);
        assert!(behind
            .why_not
            .unwrap()
            .contains("consumer lag grew from 50 to 2750 (by 300/s)"));
        // A real step at 844 events/s with save-worker gathering 500 ms windows: the lag
        // it holds climbed from 0 to its level in the step's first seconds, then held.
        let mut climbing = step_at(844.0, 30.5);
        let climb = [
            0.0, 571.0, 439.0, 915.0, 1587.0, 472.0, 1428.0, 1441.0, 1367.0, 1109.0,
        ];
        climbing.to_second = climbing.from_second + 10;
        judge_total(&mut climbing, &lag_from(39, &climb));
        assert!(climbing.sustained, "{:?}", climbing.why_not);
        // Lag read only outside the step (the scraper stopped early, as it did at the last
        // step of a peak run before this was caught): not judged sustained.
        let mut other = step_at(844.0, 124.9);
        judge_total(&mut other, &lag_from(0, &rising));
        assert!(!other.sustained && other.lag_end.is_none());
        assert!(other
            .why_not
            .unwrap()
            .contains("consumer lag read 0 times in the step after its first 2 s, 4 needed"));
        // Without metrics to scrape, the lag is not judged at all.
        let mut unscraped = step_at(844.0, 124.9);
        judge_total(&mut unscraped, &[]);
        assert!(unscraped.sustained, "{:?}", unscraped.why_not);
        // Scraped, but no reading came (the metrics addresses did not answer): the lag
        // is unknown, so the step is not sustained.
        let mut unanswered = step_at(844.0, 124.9);
        judge(&mut unanswered, 1000.0, Some(&[]), &BTreeMap::new());
        assert!(!unanswered.sustained);
        assert!(unanswered
            .why_not
            .unwrap()
            .contains("consumer lag read 0 times in the step after its first 2 s, 4 needed"));
    }

    #[test]
    fn a_sawtooth_lag_is_kept_up_with_however_its_first_and_last_readings_fall() {
        // Read every second at 1,100 events/s: save-worker holds each window's records of
        // three topics until its write commits, so the lag swings between about 1 and 3
        // seconds' events. This step begins at a trough and ends at a crest, so its last
        // reading is nearly 3,000 above the first and its second half all above it.
        let crests = [1800.0, 3100.0, 900.0, 2400.0, 3200.0];
        let sawtooth: Vec<f64> = std::iter::once(200.0)
            .chain(crests.iter().cycle().copied().take(18))
            .chain([3150.0])
            .collect();
        let mut steady = step_at(1100.0, 40.0);
        steady.to_second = steady.from_second + 22;
        judge_total(&mut steady, &lag_from(41, &sawtooth));
        assert!(steady.sustained, "{:?}", steady.why_not);
        // The same swings on a lag that grows by 150 a second (falling behind by about
        // 14 % of the rate): 3,000 over the step.
        let growing: Vec<f64> = sawtooth
            .iter()
            .enumerate()
            .map(|(i, v)| v + 150.0 * i as f64)
            .collect();
        let mut behind = step_at(1100.0, 40.0);
        behind.to_second = behind.from_second + 22;
        judge_total(&mut behind, &lag_from(41, &growing));
        assert!(!behind.sustained);
        assert!(behind.why_not.unwrap().contains("consumer lag grew"));
        // A first reading of 0 (librdkafka's numbers not yet refreshed under the step's
        // load), then a level lag of nearly 3 seconds' events: a line fitted by least
        // squares would rise by 1,600 over the step.
        let mut level = step_at(1100.0, 40.0);
        let after_zero: Vec<f64> = std::iter::once(0.0).chain([3000.0; 9]).collect();
        judge_total(&mut level, &lag_from(41, &after_zero));
        assert!(level.sustained, "{:?}", level.why_not);
        // A real refining step that was not sustained (15,166 events/s, lag refreshed every
        // 5 s, so each value read several times).
        let mut failing = step_at(15166.0, 300.0);
        failing.to_second = failing.from_second + 22;
        let refreshed = [41828.0, 113421.0, 139099.0, 137938.0, 191614.0];
        let readings: Vec<f64> = refreshed
            .iter()
            .flat_map(|v| [*v; 4])
            .chain([235857.0])
            .collect();
        judge_total(&mut failing, &lag_from(41, &readings));
        assert!(!failing.sustained);
    }

    #[test]
    fn the_lag_is_summed_per_service_over_its_topics_and_partitions() {
        // As the services' exporter writes it (labels in any order).
        let page = "# TYPE recpipe_consumer_lag gauge
recpipe_consumer_lag{service=\"save-worker\",topic=\"events\",partition=\"0\"} 1200
recpipe_consumer_lag{partition=\"1\",service=\"save-worker\",topic=\"recommendations\"} 300.5
recpipe_consumer_lag{service=\"gen-recommendations\",topic=\"user-vectors\",partition=\"0\"} 40
recpipe_consumer_lag{topic=\"events\",partition=\"0\"} 7
recpipe_consumer_lag_other{service=\"save-worker\"} 99
recpipe_batch_seconds_count{service=\"save-worker\"} 5
";
        let lags = lag_by_service(page);
        assert_eq!(
            lags.into_iter().collect::<Vec<_>>(),
            [
                ("gen-recommendations".to_string(), 40.0),
                ("save-worker".to_string(), 1500.5),
                ("unnamed".to_string(), 7.0),
            ]
        );
        assert!(lag_by_service("").is_empty());
    }

    #[tokio::test]
    async fn a_second_in_which_a_metrics_url_does_not_answer_gives_no_lag_reading() {
        let page =
            "recpipe_consumer_lag{service=\"save-worker\",topic=\"events\",partition=\"0\"} 120\n";
        let app = axum::Router::new()
            .route("/metrics", axum::routing::get(move || async move { page }))
            .route(
                "/broken",
                axum::routing::get(|| async {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "down")
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        // A port nobody listens on: bound, then let go.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let scrape = |urls: Vec<String>| async move {
            let (total, by_service) = (Gauge::default(), NamedGauges::default());
            let started = Instant::now();
            scrape_lag(
                reqwest::Client::new(),
                urls,
                started,
                started + Duration::from_millis(1500),
                total.clone(),
                by_service.clone(),
            )
            .await;
            (total.points(), by_service.points())
        };
        let good = format!("http://{addr}/metrics");
        let (total, by_service) = scrape(vec![good.clone()]).await;
        assert_eq!(total.len(), 2);
        assert!(total.iter().all(|(_, lag)| *lag == 120.0));
        assert_eq!(by_service["save-worker"].len(), 2);
        // With a service down, or answering with an error, its lag is unknown: no reading
        // rather than a total without it.
        for other in [
            format!("http://{closed}/metrics"),
            format!("http://{addr}/broken"),
        ] {
            let (total, by_service) = scrape(vec![good.clone(), other]).await;
            assert!(total.is_empty(), "{total:?}");
            assert!(by_service.is_empty());
        }
    }

    #[test]
    fn a_lag_that_grew_names_the_service_whose_lag_grew_most() {
        // save-worker falls behind by 400 records a second; gen-recommendations swings
        // about a level; update-embeddings grows a little.
        let save_worker: Vec<f64> = (0..10).map(|i| 2000.0 + 400.0 * i as f64).collect();
        let gen = [
            900.0, 100.0, 800.0, 50.0, 950.0, 120.0, 700.0, 80.0, 900.0, 60.0,
        ];
        let update: Vec<f64> = (0..10).map(|i| 10.0 + 5.0 * i as f64).collect();
        let by_service = BTreeMap::from([
            ("gen-recommendations".to_string(), lag_from(41, &gen)),
            ("save-worker".to_string(), lag_from(41, &save_worker)),
            ("update-embeddings".to_string(), lag_from(41, &update)),
        ]);
        let total: Vec<f64> = (0..10)
            .map(|i| save_worker[i] + gen[i] + update[i])
            .collect();
        let mut behind = step_at(844.0, 40.0);
        judge(
            &mut behind,
            1000.0,
            Some(&lag_from(41, &total)),
            &by_service,
        );
        assert!(!behind.sustained);
        let why = behind.why_not.unwrap();
        assert!(why.ends_with(", most in save-worker's (by 400/s)"), "{why}");
        // Each service's last reading in the step (second 50.2) and its trend.
        let service = |name: &str| {
            behind
                .lag_by_service
                .iter()
                .find(|l| l.service == name)
                .cloned()
                .unwrap()
        };
        assert_eq!(service("save-worker").end, 5600.0);
        assert_eq!(service("save-worker").per_sec, 400.0);
        assert_eq!(service("update-embeddings").per_sec, 5.0);
        assert_eq!(service("gen-recommendations").end, 60.0);
        // A step that kept up records the services' lag too, and names none.
        let level = BTreeMap::from([("save-worker".to_string(), lag_from(41, &gen))]);
        let mut steady = step_at(844.0, 40.0);
        judge(&mut steady, 1000.0, Some(&lag_from(41, &gen)), &level);
        assert!(steady.sustained, "{:?}", steady.why_not);
        assert_eq!(steady.lag_by_service.len(), 1);
        // Without per-service readings, the message is the total's alone.
        let mut unnamed = step_at(844.0, 40.0);
        judge_total(&mut unnamed, &lag_from(41, &total));
        assert!(unnamed.why_not.unwrap().ends_with("/s)"));
        assert!(unnamed.lag_by_service.is_empty());
    }

    fn sustained(rate: f64) -> Step {
        Step {
            sustained: true,
            ..step_at(rate, 20.0)
        }
    }

    #[test]
    fn a_peak_run_whose_every_step_was_sustained_found_a_floor_not_the_limit() {
        let limit = [sustained(250.0), sustained(375.0), step_at(562.5, 1500.0)];
        assert_eq!(
            peak_verdict(&limit),
            PeakVerdict::Limit {
                sustained: 375.0,
                not_sustained: 562.5
            }
        );
        assert_eq!(
            peak_verdict(&[sustained(250.0), sustained(375.0)]),
            PeakVerdict::AtLeast(375.0)
        );
        assert_eq!(
            peak_verdict(&[step_at(250.0, 1500.0)]),
            PeakVerdict::NoneSustained
        );
        assert_eq!(peak_verdict(&[]), PeakVerdict::NoneSustained);
    }

    /// A step of `phase` that held (a freshness p99 of 20 ms) or did not (1.5 s).
    fn judged(phase: Phase, rate: f64, held: bool) -> Step {
        Step {
            phase,
            sustained: held,
            ..step_at(rate, if held { 20.0 } else { 1500.0 })
        }
    }

    #[test]
    fn a_ramp_steps_answer_is_run_again_as_a_refining_step_and_falls_if_that_fails() {
        let refining = |rate: f64, held: bool| judged(Phase::Refine, rate, held);
        let confirming = |rate: f64, held: bool| judged(Phase::Confirm, rate, held);
        // Session 50's run: 21,624 held over its 10 s ramp step, every refining step above
        // it failed.
        let mut steps = vec![
            sustained(14416.0),
            sustained(21624.0),
            step_at(32437.0, 1500.0),
            refining(26484.0, false),
            refining(23931.0, false),
            refining(22749.0, false),
        ];
        assert_eq!(confirm_rate(&steps), Some(21624.0));
        // Run again from rest over longer, it did not hold: the answer falls to the
        // highest step below it that held, and the bracket widens to say so.
        // (That answer is a ramp step's too; `peak` runs it again as well, its second
        // and last confirming step.)
        steps.push(confirming(21624.0, false));
        assert_eq!(confirm_rate(&steps), Some(14416.0));
        assert_eq!(
            peak_verdict(&steps),
            PeakVerdict::Limit {
                sustained: 14416.0,
                not_sustained: 21624.0
            }
        );
        // Had it held, the answer would stand, and is not run a third time.
        steps.pop();
        steps.push(confirming(21624.0, true));
        assert_eq!(confirm_rate(&steps), None);
        assert_eq!(best_step(&steps).unwrap().target_events_per_sec, 21624.0);
        // An answer that a refining step found needs no second run.
        let refined = vec![
            sustained(9611.0),
            step_at(14416.0, 1500.0),
            refining(11771.0, true),
        ];
        assert_eq!(confirm_rate(&refined), None);
    }

    #[test]
    fn a_ramp_that_held_every_step_has_its_top_run_again_before_it_says_at_least() {
        let confirming = |rate: f64, held: bool| judged(Phase::Confirm, rate, held);
        // Session 53's second run: the ramp's last step, 32,437 events/s, passed its 10 s
        // with save-worker's lag growing 3,759 a second, under the second's events that
        // a 10 s step allows.
        let mut steps = vec![sustained(14416.0), sustained(21624.0), sustained(32437.0)];
        assert_eq!(peak_verdict(&steps), PeakVerdict::AtLeast(32437.0));
        assert_eq!(confirm_rate(&steps), Some(32437.0));
        // Run again from rest over longer, it failed: a limit, to refine and confirm.
        steps.push(confirming(32437.0, false));
        assert_eq!(
            peak_verdict(&steps),
            PeakVerdict::Limit {
                sustained: 21624.0,
                not_sustained: 32437.0
            }
        );
        assert_eq!(confirm_rate(&steps), Some(21624.0));
        assert!(refine_rate(&steps, 1.05).is_some());
        // Had it held, "at least" stands, run once.
        steps.pop();
        steps.push(confirming(32437.0, true));
        assert_eq!(peak_verdict(&steps), PeakVerdict::AtLeast(32437.0));
        assert_eq!(confirm_rate(&steps), None);
    }

    #[test]
    fn refining_halves_the_gap_until_it_is_within_the_bound_and_reports_the_bracket() {
        // The ramp: 9,611 held, 14,416 did not.
        let mut steps = vec![
            sustained(6407.0),
            sustained(9611.0),
            step_at(14416.0, 1500.0),
        ];
        let first = refine_rate(&steps, 1.02).expect("a limit to refine");
        assert!((first - (9611.0f64 * 14416.0).sqrt()).abs() < 1e-6);
        // It held: the gap is now first..14,416.
        steps.push(Step {
            phase: Phase::Refine,
            ..sustained(first)
        });
        let second = refine_rate(&steps, 1.02).unwrap();
        assert!(second > first && second < 14416.0);
        assert!((second / first - 14416.0 / second).abs() < 1e-9);
        // It did not: the gap is first..second, and the verdict says so.
        steps.push(Step {
            phase: Phase::Refine,
            ..step_at(second, 1500.0)
        });
        assert_eq!(
            peak_verdict(&steps),
            PeakVerdict::Limit {
                sustained: first,
                not_sustained: second
            }
        );
        assert_eq!(best_step(&steps).unwrap().target_events_per_sec, first);
        // Three halvings of a 1.5 gap leave 1.5^(1/8) = 1.052; a 5 % bound stops there,
        // a 2 % one goes on.
        let mut steps = vec![sustained(100.0), step_at(150.0, 1500.0)];
        for _ in 0..3 {
            let rate = refine_rate(&steps, 1.05).expect("still wider than 5 %");
            steps.push(sustained(rate));
        }
        let gap = 150.0 / best_step(&steps).unwrap().target_events_per_sec;
        assert!((gap - 1.5f64.powf(0.125)).abs() < 1e-9, "{gap}");
        assert_eq!(refine_rate(&steps, 1.0525), None);
        assert!(refine_rate(&steps, 1.02).is_some());
        // Nothing to refine without a step that failed, or without one that held.
        assert_eq!(refine_rate(&[sustained(100.0)], 1.02), None);
        assert_eq!(refine_rate(&[step_at(100.0, 1500.0)], 1.02), None);
    }

    #[test]
    fn a_step_that_held_above_a_lower_one_that_did_not_is_not_the_answer() {
        // Noise: 120 failed, then 130 held. The run has seen the pipeline fail at 120.
        let steps = [
            sustained(100.0),
            step_at(150.0, 1500.0),
            step_at(120.0, 1500.0),
            sustained(130.0),
        ];
        assert_eq!(
            peak_verdict(&steps),
            PeakVerdict::Limit {
                sustained: 100.0,
                not_sustained: 120.0
            }
        );
    }

    #[test]
    fn the_lag_has_settled_only_by_a_reading_taken_after_the_refresh() {
        // The step ended at 60 s; readings from 66 s on can describe the time after it.
        let lag = [
            (59.0, 40_000.0),
            (61.0, 20.0),
            (66.5, 9_000.0),
            (68.0, 150.0),
        ];
        assert!(lag_settled(&lag, 66.0, 200.0));
        assert!(!lag_settled(&lag[..3], 66.0, 200.0));
        // A low reading before the refresh does not count.
        assert!(!lag_settled(&lag[..2], 66.0, 200.0));
        assert!(!lag_settled(&[], 66.0, 200.0));
    }

    #[test]
    fn a_step_with_slow_probes_or_refused_events_is_not_sustained() {
        let mut slow = step_at(500.0, 1500.0);
        judge_total(&mut slow, &[]);
        assert!(!slow.sustained);
        assert!(slow
            .why_not
            .unwrap()
            .contains("freshness p99 1500 ms > 1000 ms"));
        let mut refused = step_at(500.0, 20.0);
        refused.events.per_sec = 400.0;
        refused.events.errors = 3;
        judge_total(&mut refused, &[]);
        let why = refused.why_not.unwrap();
        assert!(
            why.contains("3 events not accepted") && why.contains("accepted 400/s of 500/s"),
            "{why}"
        );
    }

    #[tokio::test]
    async fn open_loop_schedules_at_the_rate_and_runs_every_request_on_the_runtime() {
        let started = Instant::now();
        let until = started + Duration::from_millis(200);
        let scheduled = Arc::new(Mutex::new(Vec::new()));
        let ran = Arc::new(AtomicUsize::new(0));
        let (times, done) = (scheduled.clone(), ran.clone());
        let n = open_loop(started, until, constant(1000.0), 1.0, move |at| {
            times.lock().unwrap().push(at);
            let done = done.clone();
            Some(async move {
                done.fetch_add(1, Ordering::SeqCst);
            })
        })
        .await;
        let times = scheduled.lock().unwrap().clone();
        assert_eq!(n as usize, times.len());
        // Up to the end and no further: the last one within 1/rate of `until`.
        let last = *times.last().expect("requests were scheduled");
        assert!(last < until && last + Duration::from_millis(1) >= until);
        assert!(times.len() > 150, "{} requests in 200 ms", times.len());
        // Evenly spaced at 1/rate, whatever the thread's wake-ups were.
        assert!(times
            .windows(2)
            .all(|w| w[1] - w[0] == Duration::from_millis(1)));
        // Every request was handed to the runtime and ran.
        for _ in 0..100 {
            if ran.load(Ordering::SeqCst) == times.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(ran.load(Ordering::SeqCst), times.len());
    }
}
