//! The `user-vectors` record in its two encodings: JSON (schemas/user-vector.v1.schema.json)
//! and a binary form (schemas/user-vector.binary.md). update-embeddings writes the one
//! `state.encoding` names (binary by default); every reader takes either, told apart by
//! the first byte, so a topic or a store that holds both stays readable.
//!
//! Why a binary form: JSON was the largest part of decoding a state in gen-recommendations
//! and save-worker, and a state's JSON is mostly its history's ids, which the binary form
//! front-codes (a state of the relay benchmark: about 0.3 of its JSON).

use serde::Deserialize;

use crate::binary_record::{self, Framing};
use crate::events::UserVectorRecord;
use crate::model::user_states::compact;

/// How update-embeddings writes the states it produces.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StateEncoding {
    /// The binary form, version 1.
    #[default]
    Binary,
    /// JSON, for consumers outside recpipe that read the topic as JSON.
    Json,
}

/// The binary form's first two bytes ([`crate::binary_record`]).
pub const BINARY_MAGIC: [u8; 2] = binary_record::MAGIC;

#[derive(Debug, thiserror::Error)]
pub enum StateRecordError {
    #[error("not a user state in JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("not a user state in the binary form (version 1): {0}")]
    Binary(postcard::Error),
    #[error(
        "a user state in the binary form's version {0}, which this build cannot read (it reads version 1): upgrade the readers before the writer"
    )]
    UnknownVersion(u8),
    #[error("a user state whose vector holds a value that is not finite, at index {0}")]
    NotFinite(usize),
}

/// Whether `bytes` are in the binary form (else they are meant as JSON).
pub fn is_binary(bytes: &[u8]) -> bool {
    binary_record::is_binary(bytes)
}

/// Encodes `state` into `out`, which is cleared first (a buffer kept for reuse).
pub fn encode_into(state: &UserVectorRecord, encoding: StateEncoding, out: &mut Vec<u8>) {
    out.clear();
    match encoding {
        StateEncoding::Json => {
            serde_json::to_writer(&mut *out, state).expect("a user state serialises")
        }
        StateEncoding::Binary => {
            out.extend_from_slice(&BINARY_MAGIC);
            compact::append(state, out);
            compact::append_folded(state, out);
        }
    }
}

/// The binary record, and where in it the state's in-process form ends (it is the
/// record's bytes `BINARY_MAGIC.len()..end`, the folded events after it): update-embeddings
/// keeps that slice in memory rather than encoding the state twice.
pub fn encode_binary(state: &UserVectorRecord) -> (Vec<u8>, usize) {
    let mut out = BINARY_MAGIC.to_vec();
    compact::append(state, &mut out);
    let end = out.len();
    compact::append_folded(state, &mut out);
    (out, end)
}

pub fn encode(state: &UserVectorRecord, encoding: StateEncoding) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(state, encoding, &mut out);
    out
}

/// Decodes a state in either encoding. A binary state is refused where its JSON would
/// be: a vector value that is not finite, which JSON cannot write, or bytes after the
/// record.
pub fn decode(bytes: &[u8]) -> Result<UserVectorRecord, StateRecordError> {
    let state = if is_binary(bytes) {
        compact::decode_with_folded(binary_body(bytes)?).map_err(StateRecordError::Binary)?
    } else {
        crate::json::decode(bytes)?.0
    };
    if let Some(at) = state.vector.iter().position(|v| !v.is_finite()) {
        return Err(StateRecordError::NotFinite(at));
    }
    Ok(state)
}

/// A state's key and version, the record refused exactly where [`decode`] refuses it.
/// A binary record is checked without building the state (a third of the cost of
/// decoding it); JSON is decoded.
pub fn check(bytes: &[u8]) -> Result<(String, u64), StateRecordError> {
    if !is_binary(bytes) {
        let state = decode(bytes)?;
        return Ok((state.user_id, state.version));
    }
    let checked =
        compact::check_with_folded(binary_body(bytes)?).map_err(StateRecordError::Binary)?;
    if let Some(at) = checked.first_not_finite {
        return Err(StateRecordError::NotFinite(at));
    }
    Ok((checked.user_id, checked.version))
}

/// The bytes after a binary record's magic, once its version is known.
fn binary_body(bytes: &[u8]) -> Result<&[u8], StateRecordError> {
    binary_record::body(bytes).map_err(|framing| match framing {
        Framing::UnknownVersion(version) => StateRecordError::UnknownVersion(version),
        Framing::Cut => StateRecordError::Binary(postcard::Error::DeserializeUnexpectedEnd),
    })
}

/// The state as JSON, for a reader that keeps text (the Scylla store's column): JSON as
/// it came, the binary form decoded and written as JSON.
pub fn to_json(bytes: &[u8]) -> Result<String, StateRecordError> {
    if is_binary(bytes) {
        Ok(serde_json::to_string(&decode(bytes)?).expect("a user state serialises"))
    } else {
        decode(bytes)?;
        Ok(std::str::from_utf8(bytes)
            .expect("decoded as UTF-8 above")
            .to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventType, LastEvent, SourcePosition};

    fn event(id: &str, product: Option<&str>, ts: i64) -> LastEvent {
        LastEvent {
            event_id: id.into(),
            event_type: EventType::Click,
            product_id: product.map(str::to_string),
            ts,
        }
    }

    fn state() -> UserVectorRecord {
        UserVectorRecord {
            user_id: "user-7".into(),
            vector: vec![0.1, -2.5e-7, 3.4e38, 0.0, -0.0, 1.0 / 3.0],
            anchor_ts: 1_700_000_000_123,
            version: 42,
            recent_products: vec!["p-3".into(), "p-12".into(), "p-1".into()],
            purchased: vec!["p-12".into()],
            last_event: event("e-0042", Some("p-3"), 1_700_000_000_123),
            source: SourcePosition {
                partition: 3,
                offset: 99_123,
            },
            updated_at: 1_700_000_000_999,
            embeddings: Some("emb-4663a5f94f04b3ad".into()),
            recent_event_ids: vec![
                "e-0042".into(),
                "6f1e0c1a-2b3c-4d5e-8f70-8192a3b4c5d6".into(),
                "é-0040".into(),
            ],
            folded_events: vec![
                event("e-0040", Some("p-1"), 1_700_000_000_100),
                event("e-0041", None, 1_700_000_000_110),
            ],
        }
    }

    #[test]
    fn either_encoding_decodes_to_the_same_state_bit_for_bit() {
        let s = state();
        let binary = encode(&s, StateEncoding::Binary);
        let json = encode(&s, StateEncoding::Json);
        assert!(is_binary(&binary) && !is_binary(&json));
        assert_eq!(binary[..2], BINARY_MAGIC);
        // The record starts with the in-process form, which update-embeddings keeps.
        let (record, end) = encode_binary(&s);
        assert_eq!(record, binary);
        assert_eq!(record[2..end], compact::encode(&s));
        assert!(
            binary.len() < json.len() / 2,
            "{} against {}",
            binary.len(),
            json.len()
        );
        for bytes in [&binary, &json] {
            let back = decode(bytes).unwrap();
            assert_eq!(back, s);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&back.vector), bits(&s.vector));
        }
        // Written as JSON for a text column, the binary form reads back the same.
        let text = to_json(&binary).unwrap();
        assert_eq!(serde_json::from_str::<UserVectorRecord>(&text).unwrap(), s);
        assert_eq!(to_json(&json).unwrap().as_bytes(), json.as_slice());
        // Without the optional fields too.
        let bare = UserVectorRecord {
            embeddings: None,
            recent_event_ids: vec![],
            folded_events: vec![],
            ..s
        };
        assert_eq!(decode(&encode(&bare, StateEncoding::Binary)).unwrap(), bare);
    }

    /// The example in schemas/ pins the layout its page describes: its bytes were written
    /// by a script that follows that page, not by this code.
    #[test]
    fn the_schemas_binary_example_is_its_json_example() {
        let json = include_bytes!("../../schemas/examples/user-vector.folded.json");
        let binary = include_bytes!("../../schemas/examples/user-vector.folded.bin");
        let state = decode(json).unwrap();
        assert!(!state.folded_events.is_empty());
        assert_eq!(encode(&state, StateEncoding::Binary), binary);
        assert_eq!(decode(binary).unwrap(), state);
        assert_eq!(encode(&state, StateEncoding::Json).len(), 557);
    }

    #[test]
    fn the_check_refuses_exactly_what_the_decoder_refuses() {
        let mut s = state();
        s.recent_products.push("é-ü".into()); // a shared prefix that ends mid-character
        s.recent_products.push("é-ö".into());
        let good = encode(&s, StateEncoding::Binary);
        assert_eq!(check(&good).unwrap(), (s.user_id.clone(), s.version));
        let agree = |bytes: &[u8], what: &str| {
            let (checked, decoded) = (check(bytes), decode(bytes));
            assert_eq!(
                checked.is_ok(),
                decoded.is_ok(),
                "{what}: {checked:?} / {decoded:?}"
            );
            if let (Ok(c), Ok(d)) = (checked, decoded) {
                assert_eq!(c, (d.user_id, d.version), "{what}");
            }
        };
        let refused =
            binary_record::each_cut_and_flip(&good, agree, |bytes| decode(bytes).is_err());
        // The corruptions tried both ways: some still decode (a changed digit of an id),
        // most do not.
        assert!(
            refused > good.len() && refused < 5 * good.len(),
            "{refused}"
        );
        for bad in [f32::NAN, f32::INFINITY] {
            let mut s = state();
            s.vector[2] = bad;
            let message = check(&encode(&s, StateEncoding::Binary))
                .unwrap_err()
                .to_string();
            assert!(message.contains("not finite, at index 2"), "{message}");
        }
    }

    #[test]
    fn a_binary_state_is_refused_where_its_json_would_be_and_says_why() {
        let good = encode(&state(), StateEncoding::Binary);
        let refused = |bytes: &[u8]| decode(bytes).unwrap_err().to_string();

        // Cut anywhere, or followed by anything, it is not a state; a form this build
        // does not know names its version and what to do.
        binary_record::assert_framing_refused(&good, refused);

        // A vector value JSON could not write: NaN or an infinity.
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut s = state();
            s.vector[4] = bad;
            let message = refused(&encode(&s, StateEncoding::Binary));
            assert!(message.contains("not finite, at index 4"), "{message}");
            assert!(serde_json::to_string(&s).unwrap().contains("null"));
        }

        // JSON is refused as before, the message naming JSON.
        assert!(refused(br#"{"user_id":"u"}"#).contains("JSON"));
        assert!(refused(b"").contains("JSON"));
    }
}
