//! Whether a server-side apply would change anything: the object as cached already holds
//! every field of the manifest with the manifest's value. The Tenant controller then
//! skips the apply: with a thousand Tenants the unchanged applies of every reconcile
//! were most of the API server's work.

use serde::Serialize;
use serde_json::Value;

/// `manifest`'s fields all hold in `object` (see the module). Null, empty and `false`
/// manifest values match absent fields: the API server drops empty ones, and the typed
/// objects in the caches leave out fields at their default.
pub fn holds<M: Serialize, O: Serialize>(manifest: &M, object: &O) -> bool {
    match (serde_json::to_value(manifest), serde_json::to_value(object)) {
        (Ok(manifest), Ok(object)) => contains(&object, &manifest),
        _ => false,
    }
}

fn contains(object: &Value, manifest: &Value) -> bool {
    match (manifest, object) {
        (Value::Object(wanted), Value::Object(have)) => {
            wanted.iter().all(|(k, v)| match have.get(k) {
                Some(found) => contains(found, v),
                None => is_empty(v),
            })
        }
        (Value::Array(wanted), Value::Array(have)) => {
            wanted.len() == have.len() && wanted.iter().zip(have).all(|(w, h)| contains(h, w))
        }
        (wanted, Value::Null) => is_empty(wanted),
        (wanted, have) => wanted == have,
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_empty),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn an_object_holding_every_manifest_field_needs_no_apply() {
        let manifest = json!({"metadata": {"name": "viewer", "labels": {"a": "1"}},
                              "spec": {"inherits": [], "permissions": ["keys:create"],
                                       "allScopes": false}});
        let object = json!({"metadata": {"name": "viewer", "uid": "u", "resourceVersion": "9",
                                         "labels": {"a": "1", "b": "2"}},
                            "spec": {"permissions": ["keys:create"], "subjects": []},
                            "status": {"ready": true}});
        assert!(holds(&manifest, &object));
    }

    #[test]
    fn a_changed_missing_or_extra_list_entry_needs_an_apply() {
        let manifest = json!({"spec": {"permissions": ["keys:create"], "allScopes": true}});
        for object in [
            json!({"spec": {"permissions": ["keys:revoke"], "allScopes": true}}),
            json!({"spec": {"permissions": ["keys:create"]}}),
            json!({"spec": {"permissions": ["keys:create", "x"], "allScopes": true}}),
            json!({"spec": {"permissions": ["keys:create"], "allScopes": false}}),
            json!({"spec": {"permissions": ["keys:create"], "allScopes": "yes"}}),
            json!({}),
        ] {
            assert!(!holds(&manifest, &object), "{object}");
        }
    }
}
