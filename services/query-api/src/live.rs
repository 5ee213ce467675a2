//! Live figures of this API over the last minute, for the status page: requests and
//! events per second, GET latency percentiles, what kind of lists were served, and how
//! fresh they were. One slot per second in a ring; each request touches its slot under a
//! short lock.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Seconds kept.
pub const WINDOW_SECS: usize = 60;

struct Slot {
    /// Whole seconds since `LiveStats::started` this slot holds.
    second: u64,
    gets: u64,
    get_errors: u64,
    events: u64,
    personalised: u64,
    fallbacks: u64,
    get_latency_us: Histogram<u64>,
    freshness_ms: Histogram<u64>,
}

impl Slot {
    fn new(second: u64) -> Self {
        Slot {
            second,
            gets: 0,
            get_errors: 0,
            events: 0,
            personalised: 0,
            fallbacks: 0,
            // 1 µs to 60 s, and 1 ms to 1 day, at 2 significant digits.
            get_latency_us: Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid bounds"),
            freshness_ms: Histogram::new_with_bounds(1, 86_400_000, 2).expect("valid bounds"),
        }
    }
}

pub struct LiveStats {
    started: Instant,
    slots: Mutex<Vec<Slot>>,
}

impl Default for LiveStats {
    fn default() -> Self {
        Self::new()
    }
}

/// The last minute, oldest second first.
#[derive(Debug, Serialize, PartialEq)]
pub struct LiveSummary {
    pub window_secs: usize,
    pub gets_per_sec: Vec<u64>,
    pub events_per_sec: Vec<u64>,
    pub gets: u64,
    pub get_errors: u64,
    pub events: u64,
    pub get_p50_ms: Option<f64>,
    pub get_p99_ms: Option<f64>,
    pub personalised: u64,
    pub fallbacks: u64,
    /// Event time → list made, for personalised lists served in the window.
    pub freshness_p50_ms: Option<u64>,
    pub freshness_p99_ms: Option<u64>,
}

impl LiveStats {
    pub fn new() -> Self {
        LiveStats {
            started: Instant::now(),
            slots: Mutex::new((0..WINDOW_SECS).map(|_| Slot::new(u64::MAX)).collect()),
        }
    }

    fn now_second(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    fn with_slot(&self, f: impl FnOnce(&mut Slot)) {
        self.with_slot_of(self.now_second(), f)
    }

    fn with_slot_of(&self, second: u64, f: impl FnOnce(&mut Slot)) {
        let Ok(mut slots) = self.slots.lock() else {
            return;
        };
        let slot = &mut slots[(second % WINDOW_SECS as u64) as usize];
        if slot.second != second {
            *slot = Slot::new(second);
        }
        f(slot);
    }

    /// One GET of recommendations, started at `started`: its latency, whether it failed,
    /// whether the list was personalised, and its freshness (event time → list made) if
    /// known. (Its second is `started + latency`: no clock read here, a GET makes enough.)
    pub fn record_get(
        &self,
        started: Instant,
        latency: Duration,
        failed: bool,
        personalised: bool,
        freshness_ms: Option<i64>,
    ) {
        let second = (started + latency)
            .saturating_duration_since(self.started)
            .as_secs();
        self.with_slot_of(second, |s| {
            s.gets += 1;
            if failed {
                s.get_errors += 1;
                return;
            }
            let _ = s
                .get_latency_us
                .record((latency.as_micros() as u64).clamp(1, 60_000_000));
            if personalised {
                s.personalised += 1;
            } else {
                s.fallbacks += 1;
            }
            if let Some(ms) = freshness_ms {
                let _ = s.freshness_ms.record((ms.max(1) as u64).min(86_400_000));
            }
        });
    }

    pub fn record_events(&self, n: usize) {
        self.with_slot(|s| s.events += n as u64);
    }

    pub fn summary(&self) -> LiveSummary {
        let now = self.now_second();
        let mut gets_per_sec = vec![0; WINDOW_SECS];
        let mut events_per_sec = vec![0; WINDOW_SECS];
        let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 2).expect("bounds");
        let mut freshness = Histogram::<u64>::new_with_bounds(1, 86_400_000, 2).expect("bounds");
        let (mut gets, mut get_errors, mut events, mut personalised, mut fallbacks) =
            (0, 0, 0, 0, 0);
        if let Ok(slots) = self.slots.lock() {
            for s in slots.iter() {
                if s.second > now || now - s.second >= WINDOW_SECS as u64 {
                    continue;
                }
                let i = WINDOW_SECS - 1 - (now - s.second) as usize;
                gets_per_sec[i] = s.gets;
                events_per_sec[i] = s.events;
                gets += s.gets;
                get_errors += s.get_errors;
                events += s.events;
                personalised += s.personalised;
                fallbacks += s.fallbacks;
                let _ = latency.add(&s.get_latency_us);
                let _ = freshness.add(&s.freshness_ms);
            }
        }
        let ms = |h: &Histogram<u64>, q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q));
        LiveSummary {
            window_secs: WINDOW_SECS,
            gets_per_sec,
            events_per_sec,
            gets,
            get_errors,
            events,
            get_p50_ms: ms(&latency, 0.5).map(|us| us as f64 / 1000.0),
            get_p99_ms: ms(&latency, 0.99).map(|us| us as f64 / 1000.0),
            personalised,
            fallbacks,
            freshness_p50_ms: ms(&freshness, 0.5),
            freshness_p99_ms: ms(&freshness, 0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_window_and_reports_percentiles() {
        let live = LiveStats::new();
        for i in 1..=100u64 {
            live.record_get(
                Instant::now(),
                Duration::from_micros(i * 100),
                false,
                i % 4 != 0,
                Some(20),
            );
        }
        live.record_get(Instant::now(), Duration::from_millis(1), true, false, None);
        live.record_events(7);
        let s = live.summary();
        assert_eq!((s.gets, s.get_errors, s.events), (101, 1, 7));
        assert_eq!((s.personalised, s.fallbacks), (75, 25));
        assert_eq!(*s.gets_per_sec.last().unwrap(), 101);
        assert_eq!(s.gets_per_sec.iter().sum::<u64>(), 101);
        let p50 = s.get_p50_ms.unwrap();
        let p99 = s.get_p99_ms.unwrap();
        assert!((4.9..=5.1).contains(&p50), "{p50}");
        assert!((9.8..=10.0).contains(&p99), "{p99}");
        assert_eq!(s.freshness_p50_ms, Some(20));
    }

    #[test]
    fn an_idle_window_reports_nothing() {
        let s = LiveStats::new().summary();
        assert_eq!(s.gets, 0);
        assert_eq!(s.get_p99_ms, None);
        assert_eq!(s.gets_per_sec.len(), WINDOW_SECS);
    }
}
