//! The records that travel between the services. Their JSON form is defined by the
//! schemas in `schemas/` (the API validates input against those files); a test checks
//! that the schema examples round-trip through these types.

use serde::{Deserialize, Serialize};

/// Longest id (event, user, product) accepted anywhere.
pub const MAX_ID_LEN: usize = 128;
/// Longest search query accepted.
pub const MAX_QUERY_LEN: usize = 512;
/// Latest event time accepted: the year 3000, as in the schema.
pub const MAX_TS_MS: i64 = 32_503_680_000_000;
/// The `user_id` under which the popularity list is stored.
pub const POPULAR_USER_ID: &str = "__popular__";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    View,
    Click,
    AddToCart,
    Purchase,
    Search,
}

impl EventType {
    pub const ALL: [EventType; 5] = [
        EventType::View,
        EventType::Click,
        EventType::AddToCart,
        EventType::Purchase,
        EventType::Search,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::View => "view",
            EventType::Click => "click",
            EventType::AddToCart => "add_to_cart",
            EventType::Purchase => "purchase",
            EventType::Search => "search",
        }
    }
}

/// One user action (schemas/event.v1.schema.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub event_id: String,
    pub user_id: String,
    #[serde(rename = "type")]
    pub event_type: EventType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Event time in ms since the Unix epoch.
    pub ts: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommendation_id: Option<String>,
}

/// Why an event is not acceptable, in words a producer can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    #[error("not a valid event: {0}")]
    Malformed(String),
    #[error("field `{field}` must be 1 to {max} characters")]
    BadLength { field: &'static str, max: usize },
    #[error("a `{0}` event needs `product_id` (and no `query`)")]
    NeedsProduct(&'static str),
    #[error("a `search` event needs `query` (and no `product_id`)")]
    NeedsQuery,
    #[error("`ts` must be milliseconds since the epoch between 0 and {MAX_TS_MS}, got {0}")]
    BadTimestamp(i64),
}

fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), InvalidEvent> {
    if value.is_empty() || value.chars().count() > max {
        return Err(InvalidEvent::BadLength { field, max });
    }
    Ok(())
}

impl Event {
    /// Decodes and validates one event from JSON bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Event, InvalidEvent> {
        Self::from_json_with_text(bytes).map(|(event, _)| event)
    }

    /// [`Self::from_json`], with the bytes as the text they were checked to be.
    pub fn from_json_with_text(bytes: &[u8]) -> Result<(Event, &str), InvalidEvent> {
        let (event, text): (Event, &str) =
            crate::json::decode(bytes).map_err(|e| InvalidEvent::Malformed(e.to_string()))?;
        event.validate()?;
        Ok((event, text))
    }

    /// The rules of the schema that serde's types do not already enforce.
    pub fn validate(&self) -> Result<(), InvalidEvent> {
        check_len("event_id", &self.event_id, MAX_ID_LEN)?;
        check_len("user_id", &self.user_id, MAX_ID_LEN)?;
        if let Some(r) = &self.recommendation_id {
            check_len("recommendation_id", r, MAX_ID_LEN)?;
        }
        match (self.event_type, &self.product_id, &self.query) {
            (EventType::Search, None, Some(q)) => check_len("query", q, MAX_QUERY_LEN)?,
            (EventType::Search, _, _) => return Err(InvalidEvent::NeedsQuery),
            (_, Some(p), None) => check_len("product_id", p, MAX_ID_LEN)?,
            (t, _, _) => return Err(InvalidEvent::NeedsProduct(t.as_str())),
        }
        if !(0..=MAX_TS_MS).contains(&self.ts) {
            return Err(InvalidEvent::BadTimestamp(self.ts));
        }
        Ok(())
    }
}

/// The event a user state was last updated by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LastEvent {
    pub event_id: String,
    #[serde(rename = "type")]
    pub event_type: EventType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_id: Option<String>,
    pub ts: i64,
}

/// Position of the applied event in the `events` topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcePosition {
    pub partition: i32,
    pub offset: i64,
}

/// A user's state (schemas/user-vector.v1.schema.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserVectorRecord {
    pub user_id: String,
    pub vector: Vec<f32>,
    pub anchor_ts: i64,
    pub version: u64,
    pub recent_products: Vec<String>,
    pub purchased: Vec<String>,
    pub last_event: LastEvent,
    pub source: SourcePosition,
    pub updated_at: i64,
    /// The embedding set the vector lives in ([`crate::catalog::Catalog::embeddings_id`]).
    /// A model with other embeddings cannot use the vector and works from the history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embeddings: Option<String>,
    /// Ids of the events applied most recently, newest first (bounded like
    /// `recent_products`): the inputs a list made from this state names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_event_ids: Vec<String>,
    /// Events applied since the state produced before this one, oldest first, not
    /// counting `last_event`: update-embeddings produces one state per user and batch,
    /// and whoever counts events (popularity) counts these too. A stored state keeps
    /// the list it came with, which means nothing there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub folded_events: Vec<LastEvent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// Most popular products over a recent event-time window.
    Popularity,
    /// No events seen yet: available products in catalog order.
    Catalog,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoredProduct {
    pub product_id: String,
    pub score: f32,
    /// The product of the user's history this one is closest to ("because you viewed").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub because: Option<String>,
}

/// A recommendation list (schemas/recommendation.v1.schema.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecommendationRecord {
    pub recommendation_id: String,
    pub user_id: String,
    pub model_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
    pub items: Vec<ScoredProduct>,
    pub user_version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_event_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_event_ts: Option<i64>,
    pub generated_at: i64,
    /// Where the triggering event sits in the `events` topic: replaying the user's
    /// partition up to it rebuilds the state this list was made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourcePosition>,
    /// The events whose effect the list reflects, newest first (the user's recent ones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub input_event_ids: Vec<String>,
}

impl Fallback {
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::Popularity => "popularity",
            Fallback::Catalog => "catalog",
        }
    }
}

/// A list shown to a user: the query API emits one to `impressions` for every list it
/// serves (schemas/impression.v1.schema.json). Clicks that carry the list's
/// `recommendation_id` are counted against these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Impression {
    pub impression_id: String,
    pub recommendation_id: String,
    pub user_id: String,
    pub model_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
    /// The products shown, in order.
    pub items: Vec<String>,
    /// Wall-clock time (ms) the list was served.
    pub ts: i64,
}

impl Impression {
    /// The experiment arm the impression counts for: the model version, or the fallback
    /// when the list was not made by a model.
    pub fn arm(&self) -> &str {
        arm(&self.model_version, self.fallback)
    }
}

/// The arm of a list: its model version, or `popularity`/`catalog` for fallbacks.
pub fn arm(model_version: &str, fallback: Option<Fallback>) -> &str {
    match fallback {
        Some(f) => f.as_str(),
        None => model_version,
    }
}

/// What the pipeline serves: one model, or several side by side with users split by a
/// stable hash of their id (schemas/model-assignment.v1.schema.json). Published on the
/// `models` topic; the latest record wins, so a rollback is publishing the old one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelAssignment {
    pub variants: Vec<ModelVariant>,
    /// Wall-clock time (ms) of publication.
    #[serde(default)]
    pub published_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelVariant {
    /// Named in every list the variant makes.
    pub version: String,
    /// The model directory (`embeddings.npy` + `products.jsonl` or `ids.txt`), as the
    /// services see it.
    pub path: String,
    /// Share of users, in (0, 1]; the shares add up to 1.
    pub share: f64,
}

impl ModelAssignment {
    /// Why the assignment cannot be served, if it cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.variants.is_empty() {
            return Err("an assignment needs at least one variant".into());
        }
        let mut seen = std::collections::HashSet::new();
        for v in &self.variants {
            if v.version.is_empty() || v.version.chars().count() > MAX_ID_LEN {
                return Err(format!("version must be 1 to {MAX_ID_LEN} characters"));
            }
            if !seen.insert(v.version.as_str()) {
                return Err(format!("version {:?} appears twice", v.version));
            }
            if !(v.share.is_finite() && v.share > 0.0 && v.share <= 1.0) {
                return Err(format!(
                    "share of {:?} must be in (0, 1], got {}",
                    v.version, v.share
                ));
            }
            if v.path.is_empty() {
                return Err(format!("variant {:?} has no path", v.version));
            }
        }
        let total: f64 = self.variants.iter().map(|v| v.share).sum();
        if (total - 1.0).abs() > 1e-6 {
            return Err(format!("shares must add up to 1, they add up to {total}"));
        }
        Ok(())
    }
}

/// Wall-clock time in ms since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> Event {
        Event {
            event_id: "e1".into(),
            user_id: "u1".into(),
            event_type: EventType::View,
            product_id: Some("p1".into()),
            query: None,
            ts: 1,
            recommendation_id: None,
        }
    }

    #[test]
    fn rejects_search_without_query_and_view_without_product() {
        let mut e = view();
        e.product_id = None;
        assert_eq!(e.validate(), Err(InvalidEvent::NeedsProduct("view")));
        e.event_type = EventType::Search;
        assert_eq!(e.validate(), Err(InvalidEvent::NeedsQuery));
        e.query = Some("shoes".into());
        assert_eq!(e.validate(), Ok(()));
    }

    #[test]
    fn rejects_overlong_ids_and_bad_times() {
        let mut e = view();
        e.user_id = "x".repeat(MAX_ID_LEN + 1);
        assert!(matches!(
            e.validate(),
            Err(InvalidEvent::BadLength {
                field: "user_id",
                ..
            })
        ));
        let mut e = view();
        e.ts = -5;
        assert_eq!(e.validate(), Err(InvalidEvent::BadTimestamp(-5)));
    }

    #[test]
    fn from_json_names_the_problem() {
        let err = Event::from_json(br#"{"event_id":"e","type":"view","product_id":"p","ts":1}"#)
            .unwrap_err();
        assert!(err.to_string().contains("user_id"), "{err}");
        let err = Event::from_json(b"\xff\xfe").unwrap_err();
        assert!(matches!(err, InvalidEvent::Malformed(_)));
        let err = Event::from_json(
            b"{\"event_id\":\"e\xff\",\"user_id\":\"u\",\"type\":\"view\",\"product_id\":\"p\",\"ts\":1}",
        )
        .unwrap_err();
        assert!(err.to_string().contains("not UTF-8"), "{err}");
        let err = Event::from_json(
            br#"{"event_id":"e","user_id":"u","type":"teleport","product_id":"p","ts":1}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("teleport"), "{err}");
    }
}
