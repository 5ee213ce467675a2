//! Measurements over time: per second of a run, a count, an error count and an HDR
//! histogram of latencies, for each stream (GET, POST, freshness probes...). Latency is
//! measured from the *scheduled* send time, so a client that falls behind reports the
//! delay instead of hiding it (no coordinated omission).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

fn histogram() -> Histogram<u64> {
    // 1 µs to 120 s at 3 significant digits.
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds")
}

#[derive(Clone)]
struct Second {
    ok: u64,
    errors: u64,
    latency_us: Histogram<u64>,
}

/// One stream of timed operations.
#[derive(Clone)]
pub struct Series {
    started: Instant,
    inner: Arc<Mutex<BTreeMap<u64, Second>>>,
}

/// One second of a stream, for plots and the JSON summary.
#[derive(Debug, Clone, Serialize)]
pub struct SecondSummary {
    pub second: u64,
    pub ok: u64,
    pub errors: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// A stream over a whole run (or a step of it).
#[derive(Debug, Clone, Serialize)]
pub struct StreamSummary {
    pub ok: u64,
    pub errors: u64,
    pub per_sec: f64,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

fn ms(h: &Histogram<u64>, q: f64) -> Option<f64> {
    (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
}

impl Series {
    pub fn new(started: Instant) -> Self {
        Series {
            started,
            inner: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    /// Records an operation that was due at `scheduled` and finished now.
    pub fn record(&self, scheduled: Instant, ok: bool) {
        self.record_latency(
            scheduled,
            Instant::now().saturating_duration_since(scheduled),
            ok,
        )
    }

    pub fn record_latency(&self, at: Instant, latency: Duration, ok: bool) {
        let second = at.saturating_duration_since(self.started).as_secs();
        let mut map = self.inner.lock().expect("not poisoned");
        let s = map.entry(second).or_insert_with(|| Second {
            ok: 0,
            errors: 0,
            latency_us: histogram(),
        });
        if ok {
            s.ok += 1;
            let _ = s
                .latency_us
                .record((latency.as_micros() as u64).clamp(1, 120_000_000));
        } else {
            s.errors += 1;
        }
    }

    pub fn seconds(&self) -> Vec<SecondSummary> {
        let map = self.inner.lock().expect("not poisoned");
        map.iter()
            .map(|(&second, s)| SecondSummary {
                second,
                ok: s.ok,
                errors: s.errors,
                p50_ms: ms(&s.latency_us, 0.5),
                p99_ms: ms(&s.latency_us, 0.99),
                max_ms: ms(&s.latency_us, 1.0),
            })
            .collect()
    }

    /// Totals over the seconds `from..to` (of the run's clock).
    pub fn summary(&self, from: u64, to: u64) -> StreamSummary {
        let map = self.inner.lock().expect("not poisoned");
        let mut all = histogram();
        let (mut ok, mut errors) = (0, 0);
        for (_, s) in map.range(from..to) {
            ok += s.ok;
            errors += s.errors;
            let _ = all.add(&s.latency_us);
        }
        StreamSummary {
            ok,
            errors,
            per_sec: ok as f64 / (to.saturating_sub(from)).max(1) as f64,
            p50_ms: ms(&all, 0.5),
            p90_ms: ms(&all, 0.9),
            p99_ms: ms(&all, 0.99),
            p999_ms: ms(&all, 0.999),
            max_ms: ms(&all, 1.0),
        }
    }
}

/// A value sampled over time (e.g. consumer lag), one point per sample.
#[derive(Clone, Default)]
pub struct Gauge {
    points: Arc<Mutex<Vec<(f64, f64)>>>,
}

impl Gauge {
    pub fn push(&self, seconds: f64, value: f64) {
        self.points
            .lock()
            .expect("not poisoned")
            .push((seconds, value));
    }

    pub fn points(&self) -> Vec<(f64, f64)> {
        self.points.lock().expect("not poisoned").clone()
    }
}

/// Points `(second, value)` under each name.
pub type NamedPoints = BTreeMap<String, Vec<(f64, f64)>>;

/// Values sampled over time under names (e.g. each service's consumer lag), one point
/// per name and sample.
#[derive(Clone, Default)]
pub struct NamedGauges {
    points: Arc<Mutex<NamedPoints>>,
}

impl NamedGauges {
    pub fn push(&self, seconds: f64, name: &str, value: f64) {
        self.points
            .lock()
            .expect("not poisoned")
            .entry(name.to_string())
            .or_default()
            .push((seconds, value));
    }

    pub fn points(&self) -> NamedPoints {
        self.points.lock().expect("not poisoned").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_counts_from_the_scheduled_time_and_sums_by_range() {
        let t0 = Instant::now();
        let s = Series::new(t0);
        s.record_latency(t0, Duration::from_millis(10), true);
        s.record_latency(t0, Duration::from_millis(30), true);
        s.record_latency(
            t0 + Duration::from_millis(1500),
            Duration::from_millis(5),
            true,
        );
        s.record_latency(t0 + Duration::from_millis(1500), Duration::ZERO, false);
        let seconds = s.seconds();
        assert_eq!(seconds.len(), 2);
        assert_eq!((seconds[0].ok, seconds[1].ok, seconds[1].errors), (2, 1, 1));
        let all = s.summary(0, 2);
        assert_eq!((all.ok, all.errors), (3, 1));
        assert_eq!(all.per_sec, 1.5);
        let p99 = all.p99_ms.unwrap();
        assert!((29.9..30.1).contains(&p99), "{p99}");
        assert_eq!(s.summary(1, 2).ok, 1);
        assert!(s.summary(5, 9).p50_ms.is_none());
    }
}
