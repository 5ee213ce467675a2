//! The `user-vectors` record in its two encodings: JSON (schemas/user-vector.v1.schema.json)
//! and a binary form (schemas/user-vector.binary.md). update-embeddings writes the one
//! `state.encoding` names (binary by default); every reader takes either, told apart by
//! the first byte, so a topic or a store that holds both stays readable.
//!
//! Why a binary form: JSON was the largest part of decoding a state in gen-recommendations
//! and save-worker, and a state's JSON is mostly its history's ids, which the binary form
//! front-codes (a state of the relay benchmark: about 0.3 of its JSON).

use serde::Deserialize;

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

/// The binary form's first two bytes: a zero byte, which no JSON text starts with, and
/// the form's version.
pub const BINARY_MAGIC: [u8; 2] = [0x00, 0x01];

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
    bytes.first() == Some(&BINARY_MAGIC[0])
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
            compact::append_with_folded(state, out);
        }
    }
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
        match bytes.get(1) {
            Some(&version) if version == BINARY_MAGIC[1] => {
                compact::decode_with_folded(&bytes[2..]).map_err(StateRecordError::Binary)?
            }
            Some(&version) => return Err(StateRecordError::UnknownVersion(version)),
            None => {
                return Err(StateRecordError::Binary(
                    postcard::Error::DeserializeUnexpectedEnd,
                ))
            }
        }
    } else {
        crate::json::decode(bytes)?.0
    };
    if let Some(at) = state.vector.iter().position(|v| !v.is_finite()) {
        return Err(StateRecordError::NotFinite(at));
    }
    Ok(state)
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
    fn a_binary_state_is_refused_where_its_json_would_be_and_says_why() {
        let good = encode(&state(), StateEncoding::Binary);
        let refused = |bytes: &[u8]| decode(bytes).unwrap_err().to_string();

        // Cut anywhere, or followed by anything, it is not a state.
        for end in [1, 2, 3, good.len() / 2, good.len() - 1] {
            let message = refused(&good[..end]);
            assert!(message.contains("binary form"), "{end}: {message}");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(refused(&longer).contains("binary form"));

        // A form this build does not know names its version and what to do.
        let mut newer = good.clone();
        newer[1] = 2;
        let message = refused(&newer);
        assert!(
            message.contains("version 2") && message.contains("upgrade"),
            "{message}"
        );

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
