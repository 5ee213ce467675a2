//! Decoding the records' JSON with one UTF-8 check per record.

use serde::{Deserialize, Deserializer};

/// Decodes a record's JSON bytes, checking them as UTF-8 once and whole, and returns the
/// text with the value for callers that keep the record as it came. serde_json's slice
/// reader checks each string on its own (a list holds some fifty), and save-worker then
/// checked the record whole to keep it: 5 % of its CPU storing a backlog, together. Its
/// str reader checks no string again.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> serde_json::Result<(T, &'a str)> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        <serde_json::Error as serde::de::Error>::custom(format_args!("not UTF-8: {e}"))
    })?;
    Ok((serde_json::from_str(text)?, text))
}

/// A JSON number whose value is not needed, for checking a record's shape: serde_json
/// skips its digits instead of computing a float, which was a fifth of save-worker's
/// JSON work (a user state holds a vector of them). What `f32` refuses, it refuses: a
/// number beyond f32's range.
/// Needs a deserializer that lends its input (serde_json's `from_str`, `from_slice`,
/// [`decode`]; not `from_reader`).
pub struct AnyNumber;

impl<'de> Deserialize<'de> for AnyNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{Error, Unexpected};
        let raw = <&serde_json::value::RawValue>::deserialize(d)?.get();
        let is_number = matches!(raw.as_bytes().first(), Some(b'-' | b'0'..=b'9'));
        if !is_number {
            return Err(D::Error::invalid_type(Unexpected::Other(raw), &"a number"));
        }
        // Without an exponent, 38 characters stay below f32's largest (3.4e38), as
        // almost every number here does; any other is parsed, as the record's own type
        // (`f32`) would parse it.
        let may_overflow = raw.len() > 38 || raw.contains(['e', 'E']);
        if may_overflow && !raw.parse::<f32>().is_ok_and(f32::is_finite) {
            return Err(D::Error::invalid_value(
                Unexpected::Other(raw),
                &"a number within f32",
            ));
        }
        Ok(AnyNumber)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_decodes_with_its_text_and_bytes_that_are_not_utf8_are_refused() {
        let json = r#"["a", "é", "\u00e9"]"#;
        let (value, text): (Vec<String>, &str) = decode(json.as_bytes()).unwrap();
        assert_eq!(value, ["a", "é", "é"]);
        assert_eq!(text, json);
        let error = decode::<Vec<String>>(b"[\"\xff\"]").unwrap_err();
        assert!(error.to_string().contains("not UTF-8"), "{error}");
        assert!(decode::<Vec<String>>(b"[\"a\"").is_err());
    }

    #[test]
    fn any_number_takes_what_a_float_takes_and_refuses_the_rest() {
        let numbers = |json: &str| serde_json::from_str::<Vec<AnyNumber>>(json).map(|v| v.len());
        let float = |json: &str| serde_json::from_str::<Vec<f32>>(json).map(|v| v.len());
        for json in [
            "[0, -1, 0.5, 1e-7, -2.5E+3, 1e-60, 3.4e38, 123456789012345678901234567890]",
            "[99999999999999999999999999999999999999, 123456789012345678901234567890123456789]",
            "[]",
        ] {
            assert_eq!(numbers(json).unwrap(), float(json).unwrap(), "{json}");
        }
        for json in [
            r#"["1"]"#,
            "[null]",
            "[true]",
            "[[1]]",
            r#"[{"a": 1}]"#,
            "[1e300]",
            "[-3.5e38]",
            "[999999999999999999999999999999999999999]",
            "[01]",
            "[1.]",
            "[-]",
            "[+1]",
        ] {
            assert!(float(json).is_err(), "a float takes {json}");
            assert!(numbers(json).is_err(), "taken: {json}");
        }
    }
}
