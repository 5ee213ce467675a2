//! The JSON Schemas in `schemas/`, compiled into the binaries so that the API checks
//! input against exactly the files that document it.

use std::sync::OnceLock;

pub const EVENT_SCHEMA: &str = include_str!("../../schemas/event.v1.schema.json");
pub const USER_VECTOR_SCHEMA: &str = include_str!("../../schemas/user-vector.v1.schema.json");
pub const RECOMMENDATION_SCHEMA: &str = include_str!("../../schemas/recommendation.v1.schema.json");
pub const IMPRESSION_SCHEMA: &str = include_str!("../../schemas/impression.v1.schema.json");
pub const IMPRESSION_BATCH_SCHEMA: &str =
    include_str!("../../schemas/impression-batch.v1.schema.json");
pub const MODEL_ASSIGNMENT_SCHEMA: &str =
    include_str!("../../schemas/model-assignment.v1.schema.json");

/// One way a document breaks its schema.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SchemaViolation {
    /// JSON pointer to the offending value ("" for the document itself).
    pub path: String,
    pub message: String,
}

/// A compiled schema.
pub struct SchemaValidator {
    validator: jsonschema::Validator,
}

impl SchemaValidator {
    pub fn new(schema_json: &str) -> Result<Self, String> {
        let schema: serde_json::Value =
            serde_json::from_str(schema_json).map_err(|e| format!("schema is not JSON: {e}"))?;
        let validator = jsonschema::validator_for(&schema).map_err(|e| e.to_string())?;
        Ok(Self { validator })
    }

    /// A schema whose `$ref`s name the `$id`s of `referenced` schemas (resolved from
    /// these, never fetched).
    pub fn with_references(schema_json: &str, referenced: &[&str]) -> Result<Self, String> {
        let parse = |json: &str| -> Result<serde_json::Value, String> {
            serde_json::from_str(json).map_err(|e| format!("schema is not JSON: {e}"))
        };
        let mut registry = jsonschema::Registry::new();
        for json in referenced {
            let doc = parse(json)?;
            let id = doc["$id"]
                .as_str()
                .ok_or("a referenced schema has no $id")?
                .to_string();
            registry = registry.add(id, doc).map_err(|e| e.to_string())?;
        }
        let registry = registry.prepare().map_err(|e| e.to_string())?;
        let validator = jsonschema::options()
            .with_registry(&registry)
            .build(&parse(schema_json)?)
            .map_err(|e| e.to_string())?;
        Ok(Self { validator })
    }

    /// All violations of `doc` (empty when valid).
    pub fn violations(&self, doc: &serde_json::Value) -> Vec<SchemaViolation> {
        self.validator
            .iter_errors(doc)
            .map(|e| SchemaViolation {
                path: e.instance_path().to_string(),
                message: e.to_string(),
            })
            .collect()
    }
}

/// The schema of the API's impression records, compiled once.
pub fn impression_batch_validator() -> &'static SchemaValidator {
    static V: OnceLock<SchemaValidator> = OnceLock::new();
    V.get_or_init(|| {
        SchemaValidator::with_references(IMPRESSION_BATCH_SCHEMA, &[IMPRESSION_SCHEMA])
            .expect("schemas/impression-batch.v1.schema.json compiles")
    })
}

/// The event schema, compiled once.
pub fn event_validator() -> &'static SchemaValidator {
    static V: OnceLock<SchemaValidator> = OnceLock::new();
    V.get_or_init(|| {
        SchemaValidator::new(EVENT_SCHEMA).expect("schemas/event.v1.schema.json compiles")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{
        Event, Impression, ModelAssignment, RecommendationRecord, UserVectorRecord,
    };
    use serde::{de::DeserializeOwned, Serialize};
    use std::path::Path;

    fn examples(prefix: &str) -> Vec<(String, serde_json::Value)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/examples");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            // JSON examples; user-vector.folded.bin is the binary form's, checked in
            // state_record.
            if name.starts_with(prefix) && name.ends_with(".json") {
                let doc = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
                out.push((name, doc));
            }
        }
        assert!(!out.is_empty(), "no examples named {prefix}* in {dir:?}");
        out
    }

    fn check<T: DeserializeOwned + Serialize>(schema: &str, prefix: &str) {
        let validator = SchemaValidator::new(schema).unwrap();
        for (name, doc) in examples(prefix) {
            assert_eq!(
                validator.violations(&doc),
                vec![],
                "{name} breaks its schema"
            );
            let typed: T = serde_json::from_value(doc.clone())
                .unwrap_or_else(|e| panic!("{name} does not decode: {e}"));
            // Through text, as on the wire (f32 scores print as written).
            let back: serde_json::Value =
                serde_json::from_str(&serde_json::to_string(&typed).unwrap()).unwrap();
            assert_eq!(back, doc, "{name} does not round-trip");
            assert_eq!(validator.violations(&back), vec![]);
        }
    }

    #[test]
    fn examples_validate_and_round_trip() {
        check::<Event>(EVENT_SCHEMA, "event.");
        check::<UserVectorRecord>(USER_VECTOR_SCHEMA, "user-vector");
        check::<RecommendationRecord>(RECOMMENDATION_SCHEMA, "recommendation");
        check::<Impression>(IMPRESSION_SCHEMA, "impression.");
        for (name, doc) in examples("impression-batch") {
            assert_eq!(
                impression_batch_validator().violations(&doc),
                vec![],
                "{name}"
            );
            let typed: Vec<Impression> = serde_json::from_value(doc.clone()).unwrap();
            assert_eq!(typed.len(), 2);
        }
        check::<ModelAssignment>(MODEL_ASSIGNMENT_SCHEMA, "model-assignment");
    }

    #[test]
    fn a_batch_of_impressions_is_checked_item_by_item() {
        let bad = serde_json::json!([{"impression_id": "i", "user_id": "u", "ts": 1}]);
        let violations = impression_batch_validator().violations(&bad);
        assert!(
            !violations.is_empty(),
            "an impression without its list passed"
        );
        assert!(impression_batch_validator()
            .violations(&serde_json::json!({"impression_id": "i"}))
            .iter()
            .any(|v| v.message.contains("array")));
        assert_eq!(
            impression_batch_validator().violations(&serde_json::json!([])),
            vec![]
        );
    }

    #[test]
    fn schema_and_rust_validation_agree_on_bad_events() {
        let bad = [
            r#"{"event_id":"e","user_id":"u","type":"view","ts":1}"#,
            r#"{"event_id":"e","user_id":"u","type":"search","product_id":"p","ts":1}"#,
            r#"{"event_id":"","user_id":"u","type":"view","product_id":"p","ts":1}"#,
            r#"{"event_id":"e","user_id":"u","type":"view","product_id":"p","ts":-1}"#,
            r#"{"event_id":"e","user_id":"u","type":"fly","product_id":"p","ts":1}"#,
            r#"{"event_id":"e","user_id":"u","type":"view","product_id":"p","ts":1,"extra":1}"#,
            r#"{"event_id":"e","user_id":"u","type":"view","product_id":"p","ts":"1"}"#,
        ];
        for doc in bad {
            let value: serde_json::Value = serde_json::from_str(doc).unwrap();
            assert!(
                !event_validator().violations(&value).is_empty(),
                "schema accepts {doc}"
            );
            assert!(
                Event::from_json(doc.as_bytes()).is_err(),
                "Rust accepts {doc}"
            );
        }
        let good = r#"{"event_id":"e","user_id":"u","type":"search","query":"red shoes","ts":1}"#;
        assert!(event_validator()
            .violations(&serde_json::from_str(good).unwrap())
            .is_empty());
        assert!(Event::from_json(good.as_bytes()).is_ok());
    }
}
