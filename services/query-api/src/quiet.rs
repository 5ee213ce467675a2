//! Spares a lone event the API producer's linger.
//!
//! POSTed events linger (`api.events_linger_ms`) so that, under load, many share one
//! broker request: each request is a stored batch per partition, which tansu's memory
//! engine lists on every fetch. An event that comes after a quiet spell has nothing to
//! wait for, so its POST flushes the producer ([`recpipe_shared::kafka::send_now`]) and
//! the event goes at once.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct QuietSpell {
    spell: Duration,
    last_post: Mutex<Option<Instant>>,
}

impl QuietSpell {
    /// Spells of `spell` or longer count as quiet; a zero spell never does (the producer
    /// does not linger then).
    pub fn new(spell: Duration) -> Self {
        QuietSpell {
            spell,
            last_post: Mutex::new(None),
        }
    }

    /// Notes a POST at `now`; true when none came in the spell before it.
    pub fn post_after_quiet(&self, now: Instant) -> bool {
        if self.spell.is_zero() {
            return false;
        }
        let mut last = self.last_post.lock().expect("quiet-spell lock");
        let quiet = last.is_none_or(|t| now.saturating_duration_since(t) >= self.spell);
        *last = Some(now);
        quiet
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn only_a_post_after_a_full_spell_is_quiet() {
        let spell = QuietSpell::new(15 * MS);
        let t0 = Instant::now();
        assert!(spell.post_after_quiet(t0), "the first POST");
        assert!(!spell.post_after_quiet(t0 + 5 * MS));
        // The spell counts from the latest POST, not the first.
        assert!(!spell.post_after_quiet(t0 + 19 * MS));
        assert!(spell.post_after_quiet(t0 + 34 * MS));
        assert!(spell.post_after_quiet(t0 + 100 * MS));
    }

    #[test]
    fn with_no_linger_nothing_is_quiet() {
        let spell = QuietSpell::new(Duration::ZERO);
        assert!(!spell.post_after_quiet(Instant::now()));
    }
}
