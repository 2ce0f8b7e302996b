//! A structural diff between two JSON values, for the flag audit trail:
//! which paths changed, with the value before and after.

use serde::Serialize;
use serde_json::Value;

use crate::definition::escape_pointer;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    /// RFC 6901 pointer to the changed member ("" for the whole value).
    pub path: String,
    /// Absent when the member was added.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<Value>,
    /// Absent when the member was removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<Value>,
}

/// The changes that turn `before` into `after`. Objects are compared member
/// by member; arrays and scalars are compared whole, since an index-wise diff
/// of a rule list reads worse than the two lists.
pub fn diff(before: Option<&Value>, after: Option<&Value>) -> Vec<Change> {
    let mut changes = Vec::new();
    walk(String::new(), before, after, &mut changes);
    changes
}

fn walk(path: String, before: Option<&Value>, after: Option<&Value>, out: &mut Vec<Change>) {
    match (before, after) {
        (Some(Value::Object(old)), Some(Value::Object(new))) => {
            for (key, old_value) in old {
                let child = format!("{path}/{}", escape_pointer(key));
                walk(child, Some(old_value), new.get(key), out);
            }
            for (key, new_value) in new {
                if !old.contains_key(key) {
                    let child = format!("{path}/{}", escape_pointer(key));
                    walk(child, None, Some(new_value), out);
                }
            }
        }
        (old, new) if old == new => {}
        (old, new) => out.push(Change {
            path,
            before: old.cloned(),
            after: new.cloned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_added_removed_and_changed_members_by_path() {
        let before = json!({"state": "ENABLED", "variants": {"on": true, "off": false}, "metadata": {"a/b": 1}});
        let after = json!({"state": "DISABLED", "variants": {"on": true}, "targeting": {"==": [1, 1]}, "metadata": {"a/b": 2}});
        let changes = diff(Some(&before), Some(&after));
        let paths: Vec<&str> = changes.iter().map(|change| change.path.as_str()).collect();
        assert_eq!(
            paths,
            ["/metadata/a~1b", "/state", "/variants/off", "/targeting"]
        );
        assert_eq!(changes[2].after, None);
        assert_eq!(changes[3].before, None);
    }

    #[test]
    fn creation_and_deletion_are_one_whole_change() {
        let flag = json!({"state": "ENABLED"});
        assert_eq!(
            diff(None, Some(&flag)),
            vec![Change {
                path: String::new(),
                before: None,
                after: Some(flag.clone())
            }]
        );
        assert_eq!(diff(Some(&flag), None).len(), 1);
        assert!(diff(Some(&flag), Some(&flag)).is_empty());
    }
}
