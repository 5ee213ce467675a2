//! The `recommendations` record in its two encodings: JSON
//! (schemas/recommendation.v1.schema.json) and a binary form
//! (schemas/recommendation.binary.md). gen-recommendations writes the one
//! `model.list_encoding` names (binary by default); every reader takes either, told apart
//! by the first byte (no JSON text starts with a zero byte), as with user states
//! ([`crate::state_record`]).
//!
//! Why a binary form: a list of 20 products was about 1.6 KB of JSON, most of it keys
//! repeated per item and scores in decimal. Every list was encoded as JSON by
//! gen-recommendations, carried by the broker, checked whole by save-worker and packed
//! with LZ4 for its store, scanned by the API for whose list it is, and scanned again by
//! the load tester's watch. The binary form is about a quarter of the bytes, puts whose
//! list it is and how new first, so that those readers stop there, and is stored as it
//! came.

use std::borrow::Cow;

use serde::{Deserialize, Serialize, Serializer};

use crate::binary_record::{self, Framing};
use crate::events::{Fallback, RecommendationRecord, ScoredProduct, SourcePosition};

/// How gen-recommendations writes the lists it produces.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ListEncoding {
    /// The binary form, version 1.
    #[default]
    Binary,
    /// JSON, for consumers outside recpipe that read the topic as JSON.
    Json,
}

/// The binary form's first two bytes ([`crate::binary_record`]).
pub const BINARY_MAGIC: [u8; 2] = binary_record::MAGIC;

#[derive(Debug, thiserror::Error)]
pub enum ListRecordError {
    #[error("not a recommendation list in JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("not a recommendation list in the binary form (version 1): {0}")]
    Binary(postcard::Error),
    #[error(
        "a recommendation list in the binary form's version {0}, which this build cannot read (it reads version 1): upgrade the readers before the writer"
    )]
    UnknownVersion(u8),
    #[error("a recommendation list whose item {0} has a score that is not finite")]
    NotFinite(usize),
}

/// A list to encode, borrowed from its parts: gen-recommendations encodes the lists it
/// makes without building a [`RecommendationRecord`] of each. Its JSON is the record's.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ListRef<'a> {
    pub recommendation_id: &'a str,
    pub user_id: &'a str,
    pub model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
    pub items: &'a [ScoredProduct],
    pub user_version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_event_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_event_ts: Option<i64>,
    pub generated_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<SourcePosition>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub input_event_ids: &'a [String],
}

impl<'a> ListRef<'a> {
    pub fn of(list: &'a RecommendationRecord) -> ListRef<'a> {
        ListRef {
            recommendation_id: &list.recommendation_id,
            user_id: &list.user_id,
            model_version: &list.model_version,
            fallback: list.fallback,
            items: &list.items,
            user_version: list.user_version,
            source_event_id: list.source_event_id.as_deref(),
            source_event_ts: list.source_event_ts,
            generated_at: list.generated_at,
            source: list.source,
            input_event_ids: &list.input_event_ids,
        }
    }
}

/// The binary form's fields after the magic, in order (postcard: strings and lists
/// length first, integers as varints, scores as their 4 bytes). Whose list it is and how
/// new come first: [`summary`] reads only those.
#[derive(Serialize)]
struct BinaryOut<'a> {
    user_id: &'a str,
    user_version: u64,
    generated_at: i64,
    source_event_id: Option<&'a str>,
    source_event_ts: Option<i64>,
    source: Option<SourcePosition>,
    recommendation_id: &'a str,
    model_version: &'a str,
    fallback: Option<Fallback>,
    items: ItemsOut<'a>,
    input_event_ids: &'a [String],
}

/// What [`BinaryOut`] writes, read back borrowing its strings. A test keeps the two in
/// step.
#[derive(Deserialize)]
struct BinaryIn<'a> {
    user_id: &'a str,
    user_version: u64,
    generated_at: i64,
    #[serde(borrow)]
    source_event_id: Option<&'a str>,
    source_event_ts: Option<i64>,
    source: Option<SourcePosition>,
    recommendation_id: &'a str,
    model_version: &'a str,
    fallback: Option<Fallback>,
    #[serde(borrow)]
    items: Vec<(&'a str, f32, Because<'a>)>,
    #[serde(borrow)]
    input_event_ids: Vec<&'a str>,
}

/// An item's `because`: a list's items mostly share one (the product of the history
/// they are all closest to), which is written once.
#[derive(Serialize, Deserialize)]
enum Because<'a> {
    Absent,
    /// The item before this one's.
    AsBefore,
    Given(&'a str),
}

struct ItemsOut<'a>(&'a [ScoredProduct]);

impl Serialize for ItemsOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut before: Option<&str> = None;
        s.collect_seq(self.0.iter().map(|item| {
            let because = match item.because.as_deref() {
                None => Because::Absent,
                Some(b) if before == Some(b) => Because::AsBefore,
                Some(b) => Because::Given(b),
            };
            before = item.because.as_deref();
            (item.product_id.as_str(), item.score, because)
        }))
    }
}

/// Whether `bytes` are in the binary form (else they are meant as JSON).
pub fn is_binary(bytes: &[u8]) -> bool {
    binary_record::is_binary(bytes)
}

/// Encodes `list` into `out`, which is cleared first (a buffer kept for reuse).
pub fn encode_into(list: &ListRef, encoding: ListEncoding, out: &mut Vec<u8>) {
    out.clear();
    match encoding {
        ListEncoding::Json => serde_json::to_writer(&mut *out, list).expect("a list serialises"),
        ListEncoding::Binary => {
            out.extend_from_slice(&BINARY_MAGIC);
            let binary = BinaryOut {
                user_id: list.user_id,
                user_version: list.user_version,
                generated_at: list.generated_at,
                source_event_id: list.source_event_id,
                source_event_ts: list.source_event_ts,
                source: list.source,
                recommendation_id: list.recommendation_id,
                model_version: list.model_version,
                fallback: list.fallback,
                items: ItemsOut(list.items),
                input_event_ids: list.input_event_ids,
            };
            let taken = std::mem::take(out);
            *out = postcard::to_extend(&binary, taken).expect("a list serialises");
        }
    }
}

pub fn encode(list: &RecommendationRecord, encoding: ListEncoding) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(&ListRef::of(list), encoding, &mut out);
    out
}

/// The bytes after a binary record's magic, once its version is known.
fn binary_body(bytes: &[u8]) -> Result<&[u8], ListRecordError> {
    binary_record::body(bytes).map_err(|framing| match framing {
        Framing::UnknownVersion(version) => ListRecordError::UnknownVersion(version),
        Framing::Cut => ListRecordError::Binary(postcard::Error::DeserializeUnexpectedEnd),
    })
}

/// A binary record read whole, refused where its JSON would be: bytes after it, a score
/// JSON cannot write (NaN or an infinity), or a `because` "as before" with none before.
fn read_binary(bytes: &[u8]) -> Result<BinaryIn<'_>, ListRecordError> {
    let (list, rest): (BinaryIn, _) =
        postcard::take_from_bytes(binary_body(bytes)?).map_err(ListRecordError::Binary)?;
    if !rest.is_empty() {
        return Err(ListRecordError::Binary(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    let mut before = None;
    for (at, (_, score, because)) in list.items.iter().enumerate() {
        if !score.is_finite() {
            return Err(ListRecordError::NotFinite(at));
        }
        before = match because {
            Because::Absent => None,
            Because::AsBefore if before.is_none() => {
                return Err(ListRecordError::Binary(
                    postcard::Error::DeserializeBadEncoding,
                ))
            }
            Because::AsBefore => before,
            Because::Given(b) => Some(*b),
        };
    }
    Ok(list)
}

/// Decodes a list in either encoding.
pub fn decode(bytes: &[u8]) -> Result<RecommendationRecord, ListRecordError> {
    if !is_binary(bytes) {
        return Ok(crate::json::decode(bytes)?.0);
    }
    let list = read_binary(bytes)?;
    let mut before: Option<&str> = None;
    let items = list
        .items
        .iter()
        .map(|(product_id, score, because)| {
            before = match because {
                Because::Absent => None,
                Because::AsBefore => before,
                Because::Given(b) => Some(b),
            };
            ScoredProduct {
                product_id: product_id.to_string(),
                score: *score,
                because: before.map(str::to_string),
            }
        })
        .collect();
    Ok(RecommendationRecord {
        recommendation_id: list.recommendation_id.to_string(),
        user_id: list.user_id.to_string(),
        model_version: list.model_version.to_string(),
        fallback: list.fallback,
        items,
        user_version: list.user_version,
        source_event_id: list.source_event_id.map(str::to_string),
        source_event_ts: list.source_event_ts,
        generated_at: list.generated_at,
        source: list.source,
        input_event_ids: list.input_event_ids.iter().map(|s| s.to_string()).collect(),
    })
}

/// What a store keeps a list under, and when its event happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedList {
    pub user_id: String,
    pub recommendation_id: String,
    pub user_version: u64,
    pub generated_at: i64,
    pub source_event_ts: Option<i64>,
}

/// A binary list's keys, the record refused exactly where [`decode`] refuses it, without
/// building its items (save-worker stores the record as it came). JSON is refused here:
/// its readers check its shape their own way.
pub fn check_binary(bytes: &[u8]) -> Result<CheckedList, ListRecordError> {
    if !is_binary(bytes) {
        return Err(ListRecordError::Binary(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    let list = read_binary(bytes)?;
    Ok(CheckedList {
        user_id: list.user_id.to_string(),
        recommendation_id: list.recommendation_id.to_string(),
        user_version: list.user_version,
        generated_at: list.generated_at,
        source_event_ts: list.source_event_ts,
    })
}

/// Whose list a record is, how new, and the event it was made for: what the API's view
/// and the load tester's watch need of each list. Only those fields are read (the rest of
/// the record is not checked), borrowed where the encoding allows.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct ListSummary<'a> {
    #[serde(borrow)]
    pub user_id: Cow<'a, str>,
    pub user_version: u64,
    pub generated_at: i64,
    #[serde(borrow, default)]
    pub source_event_id: Option<Cow<'a, str>>,
}

/// The binary form's first fields, as [`ListSummary`] (whose `Cow`s postcard would not
/// lend).
#[derive(Deserialize)]
struct SummaryIn<'a> {
    user_id: &'a str,
    user_version: u64,
    generated_at: i64,
    #[serde(borrow)]
    source_event_id: Option<&'a str>,
}

pub fn summary(bytes: &[u8]) -> Result<ListSummary<'_>, ListRecordError> {
    if !is_binary(bytes) {
        return Ok(crate::json::decode(bytes)?.0);
    }
    let (s, _rest): (SummaryIn, _) =
        postcard::take_from_bytes(binary_body(bytes)?).map_err(ListRecordError::Binary)?;
    Ok(ListSummary {
        user_id: Cow::Borrowed(s.user_id),
        user_version: s.user_version,
        generated_at: s.generated_at,
        source_event_id: s.source_event_id.map(Cow::Borrowed),
    })
}

/// The list as JSON, for a reader that keeps text (the Scylla store's column): JSON as
/// it came, the binary form decoded and written as JSON.
pub fn to_json(bytes: &[u8]) -> Result<String, ListRecordError> {
    let list = decode(bytes)?;
    if is_binary(bytes) {
        Ok(serde_json::to_string(&list).expect("a list serialises"))
    } else {
        Ok(std::str::from_utf8(bytes)
            .expect("decoded as UTF-8 above")
            .to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(product: &str, score: f32, because: Option<&str>) -> ScoredProduct {
        ScoredProduct {
            product_id: product.into(),
            score,
            because: because.map(str::to_string),
        }
    }

    fn list() -> RecommendationRecord {
        RecommendationRecord {
            recommendation_id: "d6deeb60-aded-529e-ab57-97c60bee7275".into(),
            user_id: "user-0723".into(),
            model_version: "synthetic-v1".into(),
            fallback: None,
            items: vec![
                item("p-00999", 0.959_345_6, Some("p-00719")),
                item("p-01119", 0.946_124_4, Some("p-00719")),
                item("p-00469", -2.5e-7, None),
                item("p-00559", 3.4e38, Some("p-00719")),
                item("é-ü", 1.0 / 3.0, Some("é-ü")),
                item("p-01899", 0.0, Some("é-ü")),
            ],
            user_version: 17,
            source_event_id: Some("lt-7-1".into()),
            source_event_ts: Some(1_796_486_978_912),
            generated_at: 1_796_486_979_161,
            source: Some(SourcePosition {
                partition: 3,
                offset: 1_841,
            }),
            input_event_ids: vec!["lt-7-1".into(), "lt-7-0".into()],
        }
    }

    #[test]
    fn either_encoding_decodes_to_the_same_list_bit_for_bit() {
        let l = list();
        let binary = encode(&l, ListEncoding::Binary);
        let json = encode(&l, ListEncoding::Json);
        assert!(is_binary(&binary) && !is_binary(&json));
        assert_eq!(binary[..2], BINARY_MAGIC);
        assert_eq!(
            json,
            serde_json::to_vec(&l).unwrap(),
            "ListRef writes the record's JSON"
        );
        assert!(
            binary.len() * 2 < json.len(),
            "{} against {}",
            binary.len(),
            json.len()
        );
        let bits = |l: &RecommendationRecord| {
            l.items
                .iter()
                .map(|i| i.score.to_bits())
                .collect::<Vec<_>>()
        };
        for bytes in [&binary, &json] {
            let back = decode(bytes).unwrap();
            assert_eq!(back, l);
            assert_eq!(bits(&back), bits(&l));
            let s = summary(bytes).unwrap();
            assert_eq!(
                (
                    s.user_id.as_ref(),
                    s.user_version,
                    s.generated_at,
                    s.source_event_id.as_deref()
                ),
                ("user-0723", 17, 1_796_486_979_161, Some("lt-7-1"))
            );
        }
        assert_eq!(
            check_binary(&binary).unwrap(),
            CheckedList {
                user_id: l.user_id.clone(),
                recommendation_id: l.recommendation_id.clone(),
                user_version: 17,
                generated_at: l.generated_at,
                source_event_ts: l.source_event_ts,
            }
        );
        // Written as JSON for a text column, the binary form reads back the same.
        assert_eq!(
            serde_json::from_str::<RecommendationRecord>(&to_json(&binary).unwrap()).unwrap(),
            l
        );
        assert_eq!(to_json(&json).unwrap().as_bytes(), json.as_slice());
        // Without the optional fields, and a fallback of each kind.
        for fallback in [None, Some(Fallback::Popularity), Some(Fallback::Catalog)] {
            let bare = RecommendationRecord {
                fallback,
                items: vec![],
                source_event_id: None,
                source_event_ts: None,
                source: None,
                input_event_ids: vec![],
                ..l.clone()
            };
            let bytes = encode(&bare, ListEncoding::Binary);
            assert_eq!(decode(&bytes).unwrap(), bare);
            assert_eq!(summary(&bytes).unwrap().source_event_id, None);
        }
    }

    #[test]
    fn a_borrowed_list_encodes_as_the_record_does() {
        let items = vec![
            ScoredProduct {
                product_id: "p-1".into(),
                score: 0.5,
                because: Some("p-2".into()),
            },
            ScoredProduct {
                product_id: "p-3".into(),
                score: -0.25,
                because: None,
            },
        ];
        let ids = ["e-2".to_string(), "e-\"1\"".to_string()];
        let at = Some(SourcePosition {
            partition: 1,
            offset: 9,
        });
        for (fallback, source_event_id, source_event_ts, source, input_event_ids) in [
            (None, Some("e-2"), Some(5), at, &ids[..]),
            (Some(Fallback::Popularity), None, None, None, &[][..]),
            (
                Some(Fallback::Catalog),
                Some("ü"),
                Some(-1),
                None,
                &ids[..1],
            ),
        ] {
            let borrowed = ListRef {
                recommendation_id: "r",
                user_id: "u \"x\"",
                model_version: "v1",
                fallback,
                items: &items,
                user_version: 7,
                source_event_id,
                source_event_ts,
                generated_at: 123,
                source,
                input_event_ids,
            };
            // Every field named: a field added to the record fails to compile here.
            let owned = RecommendationRecord {
                recommendation_id: "r".into(),
                user_id: "u \"x\"".into(),
                model_version: "v1".into(),
                fallback,
                items: items.clone(),
                user_version: 7,
                source_event_id: source_event_id.map(Into::into),
                source_event_ts,
                generated_at: 123,
                source,
                input_event_ids: input_event_ids.to_vec(),
            };
            let bytes = serde_json::to_vec(&borrowed).unwrap();
            let mut binary = Vec::new();
            encode_into(&borrowed, ListEncoding::Binary, &mut binary);
            assert_eq!(binary, encode(&owned, ListEncoding::Binary));
            assert_eq!(decode(&binary).unwrap(), owned);
            assert_eq!(
                String::from_utf8(bytes.clone()).unwrap(),
                serde_json::to_string(&owned).unwrap()
            );
            assert_eq!(
                serde_json::from_slice::<RecommendationRecord>(&bytes).unwrap(),
                owned
            );
        }
    }

    /// The example in schemas/ pins the layout its page describes: its bytes were written
    /// by a script that follows that page, not by this code.
    #[test]
    fn the_schemas_binary_example_is_its_json_example() {
        let json = include_bytes!("../../schemas/examples/recommendation.json");
        let binary = include_bytes!("../../schemas/examples/recommendation.bin");
        let l = decode(json).unwrap();
        assert_eq!(encode(&l, ListEncoding::Binary), binary);
        assert_eq!(decode(binary).unwrap(), l);
        assert_eq!(
            (binary.len(), encode(&l, ListEncoding::Json).len()),
            (134, 396)
        );
    }

    #[test]
    fn the_check_refuses_exactly_what_the_decoder_refuses() {
        let good = encode(&list(), ListEncoding::Binary);
        let agree = |bytes: &[u8], what: &str| {
            let (checked, decoded) = (check_binary(bytes), decode(bytes));
            assert_eq!(
                checked.is_ok(),
                decoded.is_ok(),
                "{what}: {checked:?} / {decoded:?}"
            );
            if let (Ok(c), Ok(d)) = (checked, decoded) {
                assert_eq!(
                    (c.user_id, c.recommendation_id, c.user_version),
                    (d.user_id, d.recommendation_id, d.user_version),
                    "{what}"
                );
            }
        };
        let refused =
            binary_record::each_cut_and_flip(&good, agree, |bytes| decode(bytes).is_err());
        // The corruptions tried both ways: some still decode (a changed digit of an id),
        // many do not.
        assert!(
            refused > good.len() && refused < 5 * good.len(),
            "{refused}"
        );
    }

    #[test]
    fn a_binary_list_is_refused_where_its_json_would_be_and_says_why() {
        let good = encode(&list(), ListEncoding::Binary);
        let refused = |bytes: &[u8]| decode(bytes).unwrap_err().to_string();

        binary_record::assert_framing_refused(&good, refused);
        let mut newer = good.clone();
        newer[1] = 2;
        assert!(summary(&newer)
            .unwrap_err()
            .to_string()
            .contains("version 2"));

        // A score JSON could not write: it writes null, which no reader takes.
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut l = list();
            l.items[3].score = bad;
            let message = refused(&encode(&l, ListEncoding::Binary));
            assert!(
                message.contains("item 3") && message.contains("not finite"),
                "{message}"
            );
            assert!(decode(&encode(&l, ListEncoding::Json)).is_err());
        }

        // "Because as before" with nothing before: the first item's, or after an item
        // without one. No encoder writes it.
        let mut l = list();
        l.items.truncate(1);
        let mut bytes = encode(&l, ListEncoding::Binary);
        // The record ends with the item's because (Given = 2, then "p-00719") and the
        // input ids (a count of 2, then two ids of 6 bytes): make it AsBefore (1).
        let given = bytes.len() - (1 + 2 * 7) - (1 + 7) - 1;
        assert_eq!(bytes[given], 2);
        bytes[given] = 1;
        bytes.drain(given + 1..given + 9);
        assert!(
            refused(&bytes).contains("binary form"),
            "{}",
            refused(&bytes)
        );

        // JSON is refused as before, the message naming JSON; the binary check takes
        // only the binary form.
        assert!(refused(br#"{"user_id":"u"}"#).contains("JSON"));
        assert!(refused(b"").contains("JSON"));
        assert!(check_binary(&encode(&list(), ListEncoding::Json)).is_err());
    }
}
