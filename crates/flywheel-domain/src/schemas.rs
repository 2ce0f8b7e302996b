//! Event schemas: per project and event name, the properties an event must
//! carry and their JSON types. What a violation means depends on the
//! project's [`SchemaMode`](crate::privacy::SchemaMode).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::events::Event;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum PropertyType {
    String,
    Number,
    Boolean,
    Object,
    Array,
    /// Present, any type (null counts as absent).
    Any,
}

impl PropertyType {
    fn matches(self, value: &Value) -> bool {
        match self {
            PropertyType::String => value.is_string(),
            PropertyType::Number => value.is_number(),
            PropertyType::Boolean => value.is_boolean(),
            PropertyType::Object => value.is_object(),
            PropertyType::Array => value.is_array(),
            PropertyType::Any => !value.is_null(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            PropertyType::String => "a string",
            PropertyType::Number => "a number",
            PropertyType::Boolean => "a boolean",
            PropertyType::Object => "an object",
            PropertyType::Array => "an array",
            PropertyType::Any => "present",
        }
    }
}

/// The schema of one event name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EventSchema {
    pub event: String,
    /// Bumped by the caller when the schema changes; recorded with violations.
    pub version: u32,
    /// Property name → required type.
    pub required: BTreeMap<String, PropertyType>,
}

impl EventSchema {
    /// Human-readable problems of `event` against this schema (empty when it conforms).
    pub fn violations(&self, event: &Event) -> Vec<String> {
        self.required
            .iter()
            .filter_map(|(name, kind)| match event.properties.get(name) {
                None | Some(Value::Null) => Some(format!("missing property `{name}`")),
                Some(value) if !kind.matches(value) => {
                    Some(format!("property `{name}` must be {}", kind.name()))
                }
                Some(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{decode_native, Envelope};
    use serde_json::json;

    #[test]
    fn violations_name_each_problem() {
        let schema: EventSchema = serde_json::from_value(json!({
            "event": "project_created", "version": 2,
            "required": {"project_id": "string", "count": "number", "tags": "array", "meta": "any"}
        }))
        .unwrap();
        let env = Envelope {
            received_at: chrono::Utc::now(),
            sent_at: None,
            context: None,
            max_event_bytes: 1 << 20,
        };
        let good = decode_native(
            json!({"event": "project_created", "user_id": "u", "properties": {"project_id": "p1", "count": 3, "tags": [], "meta": false}}),
            10,
            0,
            &env,
        )
        .unwrap();
        assert!(schema.violations(&good).is_empty());
        let bad = decode_native(
            json!({"event": "project_created", "user_id": "u", "properties": {"project_id": 7, "tags": [], "meta": null}}),
            10,
            0,
            &env,
        )
        .unwrap();
        assert_eq!(
            schema.violations(&bad),
            vec![
                "missing property `count`",
                "missing property `meta`",
                "property `project_id` must be a string"
            ]
        );
        assert!(serde_json::from_value::<EventSchema>(
            json!({"event": "x", "version": 1, "required": {"a": "date"}})
        )
        .is_err());
    }
}
