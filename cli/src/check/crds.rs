//! Are the served CRDs the ones this plugin was built with? The crds/ YAML is compiled
//! in; each served CRD's versions and schemas are compared with it.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

use super::report::CheckResult;

/// The generated CRDs (crds/*.yaml), as this binary knows them.
pub const EMBEDDED: [(&str, &str); 3] = [
    (
        "apikeys.portcullis.dev",
        include_str!("../../../crds/apikeys.portcullis.dev.yaml"),
    ),
    (
        "roles.portcullis.dev",
        include_str!("../../../crds/roles.portcullis.dev.yaml"),
    ),
    (
        "tenants.portcullis.dev",
        include_str!("../../../crds/tenants.portcullis.dev.yaml"),
    ),
];

const APPLY_HINT: &str = "run kubectl apply --server-side -f crds/ (or upgrade the Helm release)";

/// `(version name, schema)` pairs of a CRD, normalised so that the same schema compares
/// equal however it was written or stored (field order, `1` vs `1.0`).
fn versions(crd: &CustomResourceDefinition) -> Vec<(String, Value)> {
    let mut versions: Vec<(String, Value)> = crd
        .spec
        .versions
        .iter()
        .map(|v| {
            let schema = v
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .and_then(|s| serde_json::to_value(s).ok())
                .map(normalize)
                .unwrap_or(Value::Null);
            (v.name.clone(), schema)
        })
        .collect();
    versions.sort_by(|a, b| a.0.cmp(&b.0));
    versions
}

/// Numbers as f64 (YAML `1.0` and the server's `1` are the same bound); nulls dropped.
fn normalize(value: Value) -> Value {
    match value {
        Value::Number(n) => n
            .as_f64()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::Number(n), Value::Number),
        Value::Array(items) => Value::Array(items.into_iter().map(normalize).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, normalize(v)))
                .collect(),
        ),
        other => other,
    }
}

/// Parses an embedded CRD.
pub fn parse_embedded(yaml: &str) -> Result<CustomResourceDefinition, String> {
    serde_yaml::from_str(yaml).map_err(|e| e.to_string())
}

/// The verdict on one CRD: `served` is what the API server has (None: not installed).
pub fn judge(name: &str, embedded: &str, served: Option<&CustomResourceDefinition>) -> CheckResult {
    let check = format!("CRD {name}");
    let Some(served) = served else {
        return CheckResult::fail(check, "not installed").hint(APPLY_HINT);
    };
    let wanted = match parse_embedded(embedded) {
        Ok(crd) => crd,
        Err(e) => {
            return CheckResult::fail(
                check,
                format!("the copy built into this plugin does not parse: {e}"),
            );
        }
    };
    let established = served
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
    if !established {
        return CheckResult::fail(check, "installed but not Established").hint(format!(
            "kubectl describe crd {name} shows why (names conflict, invalid schema)"
        ));
    }
    let (have, want) = (versions(served), versions(&wanted));
    if have == want {
        let names: Vec<&str> = have.iter().map(|(n, _)| n.as_str()).collect();
        return CheckResult::pass(
            check,
            format!("installed and current ({})", names.join(", ")),
        );
    }
    let have_names: Vec<&str> = have.iter().map(|(n, _)| n.as_str()).collect();
    let want_names: Vec<&str> = want.iter().map(|(n, _)| n.as_str()).collect();
    let what = if have_names == want_names {
        let differing: Vec<&str> = have
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, _)| a.0.as_str())
            .collect();
        format!(
            "stale: the schema of {} differs from this plugin's",
            differing.join(", ")
        )
    } else {
        format!(
            "stale: serves versions {} but this plugin expects {}",
            have_names.join(", "),
            want_names.join(", ")
        )
    };
    CheckResult::fail(check, what).hint(APPLY_HINT)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::check::report::Status;

    fn established(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
        crd.status = serde_json::from_value(serde_json::json!({
            "conditions": [{"type": "Established", "status": "True"}]
        }))
        .unwrap();
        crd
    }

    #[test]
    fn embedded_crds_parse_and_name_themselves() {
        for (name, yaml) in EMBEDDED {
            let crd = parse_embedded(yaml).unwrap();
            assert_eq!(crd.metadata.name.as_deref(), Some(name));
        }
    }

    #[test]
    fn served_copy_round_tripped_through_json_is_current() {
        let (name, yaml) = EMBEDDED[0];
        // What the API server hands back: JSON, numbers without ".0", other key order.
        let json = serde_json::to_string(&parse_embedded(yaml).unwrap()).unwrap();
        let json = json.replace("\"minimum\":1.0", "\"minimum\":1");
        let served = established(serde_json::from_str(&json).unwrap());
        let result = judge(name, yaml, Some(&served));
        assert_eq!(result.status, Status::Pass, "{result:?}");
    }

    #[test]
    fn missing_unestablished_and_stale_crds_fail() {
        let (name, yaml) = EMBEDDED[0];
        let missing = judge(name, yaml, None);
        assert_eq!(
            (missing.status, missing.message.as_str()),
            (Status::Fail, "not installed")
        );
        assert!(
            missing
                .hint
                .unwrap()
                .contains("kubectl apply --server-side -f crds/")
        );

        let pending = judge(name, yaml, Some(&parse_embedded(yaml).unwrap()));
        assert_eq!(pending.status, Status::Fail);
        assert!(pending.message.contains("not Established"));

        let mut stale = established(parse_embedded(yaml).unwrap());
        if let Some(schema) = stale.spec.versions[0]
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            schema.description = Some("an older description".into());
        }
        let result = judge(name, yaml, Some(&stale));
        assert_eq!(result.status, Status::Fail);
        assert_eq!(
            result.message,
            "stale: the schema of v1alpha1 differs from this plugin's"
        );

        let mut renamed = established(parse_embedded(yaml).unwrap());
        renamed.spec.versions[0].name = "v1alpha0".into();
        assert!(
            judge(name, yaml, Some(&renamed))
                .message
                .contains("serves versions v1alpha0")
        );
    }
}
