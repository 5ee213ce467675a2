//! How an event moves a user's vector.
//!
//! The vector is a time-decayed sum: `v(T) = Σ wᵢ · exp(-(T - tᵢ)/τ) · eᵢ`, valued at the
//! latest event time `T` seen (`anchor_ts`), where `eᵢ` is the touched product's unit
//! embedding (for a search, the mean of the matching products' embeddings) and `wᵢ` the
//! weight of the event type. Decay runs on *event* time, so the result does not depend on
//! when events are processed, and a late event adds in with its own, older, weight: the
//! same set of events gives the same vector whatever their arrival order (up to float
//! rounding).

use std::sync::Arc;

use ndarray::{Array1, ArrayViewMut1};

use crate::catalog::Catalog;
use crate::events::{Event, EventType, LastEvent, SourcePosition, UserVectorRecord};
use crate::settings::ModelSettings;

/// Products a search event moves the user toward, at most.
const SEARCH_MATCHES: usize = 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpdateError {
    #[error("unknown product {0:?}: it is not in the catalog")]
    UnknownProduct(String),
}

pub struct UserModel {
    catalog: Arc<Catalog>,
    /// Catalogs of the other models served: their products are valid events that this
    /// space cannot place (kept in the history, no move of the vector).
    others: Vec<Arc<Catalog>>,
    settings: ModelSettings,
    tau_ms: f64,
}

impl UserModel {
    pub fn new(catalog: Arc<Catalog>, settings: ModelSettings) -> Self {
        let tau_ms = super::decay_tau_ms(settings.half_life_hours);
        UserModel {
            catalog,
            others: Vec::new(),
            settings,
            tau_ms,
        }
    }

    /// Also accepts the products of these catalogs (other models served side by side).
    pub fn with_others(mut self, others: Vec<Arc<Catalog>>) -> Self {
        self.others = others;
        self
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// The direction an event pulls toward (unit length), or None for a search that
    /// matched nothing.
    fn direction(&self, event: &Event) -> Result<Option<Array1<f32>>, UpdateError> {
        if event.event_type == EventType::Search {
            let query = event.query.as_deref().unwrap_or_default();
            let hits = self.catalog.search(query, SEARCH_MATCHES);
            if hits.is_empty() {
                return Ok(None);
            }
            let mut v = Array1::<f32>::zeros(self.catalog.dim());
            for i in hits {
                v += &self.catalog.embedding(i);
            }
            let n = v.dot(&v).sqrt();
            return Ok((n > 0.0).then(|| v / n));
        }
        let id = event.product_id.as_deref().unwrap_or_default();
        match self.catalog.index_of(id) {
            Some(i) => Ok(Some(self.catalog.embedding(i).to_owned())),
            None if self.others.iter().any(|c| c.index_of(id).is_some()) => Ok(None),
            None => Err(UpdateError::UnknownProduct(id.to_string())),
        }
    }

    /// The user's state after `event`, given the state before it (None for a new user).
    pub fn apply(
        &self,
        before: Option<&UserVectorRecord>,
        event: &Event,
        source: SourcePosition,
        now_ms: i64,
    ) -> Result<UserVectorRecord, UpdateError> {
        let mut state = match before {
            Some(b) => {
                let mut state = b.clone();
                // A state made here stands for this event alone.
                state.folded_events.clear();
                state
            }
            None => self.new_state(event),
        };
        self.update(&mut state, event, source, now_ms)?;
        Ok(state)
    }

    /// The state of a user before their first event: no vector, no history.
    pub fn new_state(&self, event: &Event) -> UserVectorRecord {
        UserVectorRecord {
            user_id: event.user_id.clone(),
            vector: vec![0.0; self.catalog.dim()],
            anchor_ts: event.ts,
            version: 0,
            recent_products: Vec::new(),
            purchased: Vec::new(),
            last_event: LastEvent {
                event_id: event.event_id.clone(),
                event_type: event.event_type,
                product_id: event.product_id.clone(),
                ts: event.ts,
            },
            source: SourcePosition {
                partition: 0,
                offset: -1,
            },
            updated_at: 0,
            embeddings: Some(self.catalog.embeddings_id().to_string()),
            recent_event_ids: Vec::new(),
            folded_events: Vec::new(),
        }
    }

    /// Moves `state` to after `event`, in place: the service applies a user's events one
    /// after another, and copying the histories (some 200 strings) for every event cost
    /// more than the vector arithmetic. On an error `state` is left as it was.
    /// `folded_events` is left for the caller; the state's last event before this one is
    /// returned for it.
    pub fn update(
        &self,
        state: &mut UserVectorRecord,
        event: &Event,
        source: SourcePosition,
        now_ms: i64,
    ) -> Result<LastEvent, UpdateError> {
        let direction = self.direction(event)?;
        let dim = self.catalog.dim();
        let space = self.catalog.embeddings_id();
        // A state built with other embeddings (the model changed) starts again from its
        // recent history, valued in this model's space.
        let same_space = match &state.embeddings {
            Some(e) => e == space,
            None => state.vector.len() == dim,
        };
        if !same_space {
            state.vector = vector_from_history(&self.catalog, &state.recent_products)
                .unwrap_or_else(|| vec![0.0; dim]);
        }
        if state.embeddings.as_deref() != Some(space) {
            state.embeddings = Some(space.to_string());
        }
        push_front_bounded(
            &mut state.recent_event_ids,
            &event.event_id,
            self.settings.recent_limit,
        );
        let mut vector = ArrayViewMut1::from(state.vector.as_mut_slice());
        if let Some(d) = direction {
            let w = self.settings.weights.of(event.event_type);
            if event.ts >= state.anchor_ts {
                let decay = (-((event.ts - state.anchor_ts) as f64) / self.tau_ms).exp() as f32;
                vector *= decay;
                vector.scaled_add(w, &d);
                state.anchor_ts = event.ts;
            } else {
                let decay = (-((state.anchor_ts - event.ts) as f64) / self.tau_ms).exp() as f32;
                vector.scaled_add(w * decay, &d);
            }
        } else {
            state.anchor_ts = state.anchor_ts.max(event.ts);
        }
        if let Some(p) = &event.product_id {
            push_front_bounded(&mut state.recent_products, p, self.settings.recent_limit);
            if event.event_type == EventType::Purchase {
                push_front_bounded(&mut state.purchased, p, self.settings.purchased_limit);
            }
        }
        state.version += 1;
        state.source = source;
        state.updated_at = now_ms;
        Ok(std::mem::replace(
            &mut state.last_event,
            LastEvent {
                event_id: event.event_id.clone(),
                event_type: event.event_type,
                product_id: event.product_id.clone(),
                ts: event.ts,
            },
        ))
    }
}

/// Weight of the n-th most recent product when a vector is rebuilt from history.
const HISTORY_DECAY: f32 = 0.85;

/// A user vector in `catalog`'s space from the products they touched, newest first:
/// `Σ 0.85ʳ · eᵣ` over the products this catalog knows. Used when a state was built with
/// other embeddings; event weights and times are not kept in the history, so it is an
/// approximation of what the events would have given. None when no product is known.
pub fn vector_from_history(catalog: &Catalog, recent_products: &[String]) -> Option<Vec<f32>> {
    let mut v = Array1::<f32>::zeros(catalog.dim());
    let mut any = false;
    let mut weight = 1.0f32;
    for p in recent_products {
        if let Some(i) = catalog.index_of(p) {
            v.scaled_add(weight, &catalog.embedding(i));
            any = true;
        }
        weight *= HISTORY_DECAY;
    }
    any.then(|| v.to_vec())
}

/// Whether two ids are the same, their last bytes compared before the rest: ids that
/// differ mostly differ at their end (a sequence number, a UUID's random tail), and most
/// of the comparisons made against a user's history are of different ids, which this
/// settles without a call to `memcmp`. Those calls, 50 a list and two lists an event,
/// were 8 % of update-embeddings' CPU in the relay benchmark.
#[inline]
pub fn same_id(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.last() == b.last() && a == b
}

/// Moves `item` to the front of `list` (no duplicates), keeping at most `limit`.
fn push_front_bounded(list: &mut Vec<String>, item: &str, limit: usize) {
    // The item's own string is reused when it is already listed.
    let own = match list.iter().position(|x| same_id(x, item)) {
        Some(at) => list.remove(at),
        None => item.to_string(),
    };
    list.insert(0, own);
    list.truncate(limit);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{generate, SyntheticCatalog};

    #[test]
    fn ids_are_the_same_exactly_when_equal() {
        for (a, b) in [
            ("e-1", "e-1"),
            ("e-1", "e-2"),
            ("e-1", "f-1"),
            ("e-1", "e-10"),
            ("", ""),
            ("", "a"),
            ("é", "é"),
            ("pipe-1796488415239-148020", "pipe-1796488415239-148020"),
            ("pipe-1796488415239-148020", "pipe-1796488415238-148020"),
        ] {
            assert_eq!(same_id(a, b), a == b, "{a:?} {b:?}");
            assert_eq!(same_id(b, a), a == b, "{b:?} {a:?}");
        }
    }

    fn model() -> UserModel {
        let catalog = Arc::new(generate(SyntheticCatalog {
            products: 200,
            dim: 8,
            ..Default::default()
        }));
        UserModel::new(catalog, ModelSettings::default())
    }

    fn event(id: &str, t: EventType, product: &str, ts: i64) -> Event {
        Event {
            event_id: id.into(),
            user_id: "u".into(),
            event_type: t,
            product_id: Some(product.into()),
            query: None,
            ts,
            recommendation_id: None,
        }
    }

    fn pos(offset: i64) -> SourcePosition {
        SourcePosition {
            partition: 0,
            offset,
        }
    }

    fn run(m: &UserModel, events: &[Event]) -> UserVectorRecord {
        let mut state: Option<UserVectorRecord> = None;
        for (i, e) in events.iter().enumerate() {
            state = Some(m.apply(state.as_ref(), e, pos(i as i64), 0).unwrap());
        }
        state.unwrap()
    }

    #[test]
    fn same_events_give_the_same_vector_in_any_order() {
        let m = model();
        let hour = 3_600_000;
        let events = vec![
            event("a", EventType::View, "p-00001", 0),
            event("b", EventType::Purchase, "p-00002", 5 * hour),
            event("c", EventType::Click, "p-00003", 30 * hour),
        ];
        let forward = run(&m, &events);
        let reversed: Vec<Event> = events.iter().rev().cloned().collect();
        let backward = run(&m, &reversed);
        assert_eq!(forward.anchor_ts, 30 * hour);
        assert_eq!(backward.anchor_ts, 30 * hour);
        for (x, y) in forward.vector.iter().zip(&backward.vector) {
            assert!(
                (x - y).abs() < 1e-5,
                "{:?} vs {:?}",
                forward.vector,
                backward.vector
            );
        }
        assert_eq!(forward, run(&m, &events), "not deterministic");
    }

    #[test]
    fn weights_and_decay_follow_event_time() {
        let m = model();
        let week = 7 * 24 * 3_600_000;
        let e1 = m.catalog().embedding(1).to_owned();
        let s = run(&m, &[event("a", EventType::Purchase, "p-00001", 0)]);
        assert!((Array1::from_vec(s.vector.clone()) - &e1 * 6.0)
            .iter()
            .all(|d| d.abs() < 1e-5));
        // One half-life later a view of the same product: 6/2 + 1.
        let s2 = m
            .apply(
                Some(&s),
                &event("b", EventType::View, "p-00001", week),
                pos(1),
                0,
            )
            .unwrap();
        let expected = &e1 * 4.0;
        assert!((Array1::from_vec(s2.vector) - expected)
            .iter()
            .all(|d| d.abs() < 1e-4));
        assert_eq!(s2.version, 2);
    }

    #[test]
    fn history_is_bounded_and_purchases_kept() {
        let m = UserModel::new(
            model().catalog().clone(),
            ModelSettings {
                recent_limit: 3,
                ..Default::default()
            },
        );
        let events: Vec<Event> = (0..6)
            .map(|i| {
                event(
                    &format!("e{i}"),
                    if i == 1 {
                        EventType::Purchase
                    } else {
                        EventType::View
                    },
                    &format!("p-{:05}", i),
                    i,
                )
            })
            .collect();
        let s = run(&m, &events);
        assert_eq!(s.recent_products, vec!["p-00005", "p-00004", "p-00003"]);
        assert_eq!(s.purchased, vec!["p-00001"]);
        assert_eq!(s.recent_event_ids, vec!["e5", "e4", "e3"]);
        assert_eq!(s.embeddings.as_deref(), Some(m.catalog().embeddings_id()));
    }

    #[test]
    fn a_product_of_another_served_model_is_kept_in_history_without_moving_the_vector() {
        let wider = Arc::new(generate(SyntheticCatalog {
            products: 400,
            dim: 8,
            ..Default::default()
        }));
        let m = UserModel::new(model().catalog().clone(), ModelSettings::default())
            .with_others(vec![wider]);
        let s = run(&m, &[event("a", EventType::View, "p-00001", 0)]);
        let after = m
            .apply(
                Some(&s),
                &event("b", EventType::View, "p-00350", 1),
                pos(1),
                0,
            )
            .unwrap();
        assert_eq!(after.vector, s.vector);
        assert_eq!(after.recent_products[0], "p-00350");
        assert_eq!(after.version, 2);
        assert!(m
            .apply(
                Some(&s),
                &event("c", EventType::View, "p-09999", 2),
                pos(2),
                0
            )
            .is_err());
    }

    #[test]
    fn a_state_from_other_embeddings_restarts_from_its_history() {
        let old = model();
        let new_catalog = Arc::new(generate(SyntheticCatalog {
            products: 200,
            dim: 8,
            seed: 7,
            ..Default::default()
        }));
        assert_ne!(old.catalog().embeddings_id(), new_catalog.embeddings_id());
        let new = UserModel::new(new_catalog.clone(), ModelSettings::default());
        let s = run(
            &old,
            &[
                event("a", EventType::View, "p-00001", 0),
                event("b", EventType::View, "p-00002", 1),
            ],
        );
        let after = new
            .apply(
                Some(&s),
                &event("c", EventType::View, "p-00003", 2),
                pos(2),
                0,
            )
            .unwrap();
        // 0.85 · e1 + e2 (history, newest first) + 1 · e3 (the view), in the new space.
        let e = |i: usize| new_catalog.embedding(i).to_owned();
        let expected = e(1) * 0.85 + e(2) + e(3);
        assert!((Array1::from_vec(after.vector) - expected)
            .iter()
            .all(|d| d.abs() < 1e-5));
        assert_eq!(
            after.embeddings.as_deref(),
            Some(new_catalog.embeddings_id())
        );
        assert_eq!(after.version, 3);
    }

    #[test]
    fn unknown_product_is_an_error_and_search_moves_toward_matches() {
        let m = model();
        let err = m
            .apply(None, &event("a", EventType::View, "nope", 0), pos(0), 0)
            .unwrap_err();
        assert_eq!(err, UpdateError::UnknownProduct("nope".into()));
        let mut search = event("s", EventType::Search, "x", 0);
        search.product_id = None;
        search.query = Some("coffee".into());
        let s = m.apply(None, &search, pos(0), 0).unwrap();
        let v = Array1::from_vec(s.vector);
        let coffee = m
            .catalog()
            .products()
            .iter()
            .position(|p| p.category == "coffee")
            .unwrap();
        let garden = m
            .catalog()
            .products()
            .iter()
            .position(|p| p.category == "garden")
            .unwrap();
        assert!(v.dot(&m.catalog().embedding(coffee)) > v.dot(&m.catalog().embedding(garden)));
        search.query = Some("zzz".into());
        let s = m.apply(None, &search, pos(0), 0).unwrap();
        assert!(s.vector.iter().all(|&x| x == 0.0));
    }
}
