//! `kubectl portcullis tenant status NAME`.

use std::collections::BTreeMap;
use std::io::Write;

use jiff::{SignedDuration, Timestamp};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use portcullis_crds::conditions::find_ready;
use portcullis_crds::{ApiKey, DataClassification, KeyState, Tenant};
use serde::Serialize;

use crate::Outcome;
use crate::cli::{OutputFormat, TenantStatusArgs};
use crate::cluster::Cluster;
use crate::error::CliError;
use crate::key::view::ReadyView;
use crate::output::{relative, render_fields, timestamp, write_structured};

/// Keys expiring this soon are flagged.
pub const KEY_EXPIRY_WARNING: SignedDuration = SignedDuration::from_hours(7 * 24);

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Needs attention soon (`!`).
    Warn,
    /// Broken now (`✗`).
    Fail,
}

/// One finding about a tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// How bad.
    pub severity: Severity,
    /// What and what to do.
    pub message: String,
}

/// What `tenant status` tells.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantReport {
    /// Tenant name.
    pub name: String,
    /// Data classification.
    pub classification: String,
    /// What the classification demands.
    pub classification_means: String,
    /// Namespaces bound.
    pub namespaces: Vec<String>,
    /// Active data-encryption key version.
    pub active_dek_version: Option<u32>,
    /// DEK rotation period.
    pub dek_rotation: String,
    /// Audit retention in force.
    pub retention_days: u32,
    /// Key count from the tenant's status.
    pub api_keys: u32,
    /// Role count from the tenant's status.
    pub roles: u32,
    /// The Ready condition.
    pub ready: Option<ReadyView>,
    /// Keys found in the tenant's namespaces, by state.
    pub keys_by_state: BTreeMap<String, u32>,
    /// Expiring and invalid keys, an unready tenant.
    pub findings: Vec<Finding>,
}

fn classification_means(c: DataClassification) -> &'static str {
    match c {
        DataClassification::Public => "TLS",
        DataClassification::Internal => "TLS and authentication",
        DataClassification::Confidential => "mTLS or API key; audit fails closed",
        DataClassification::Restricted => {
            "mTLS and API key; audit fails closed and immutable; key Secrets removed after delivery"
        }
    }
}

/// The report from the tenant and the keys found in its namespaces.
pub fn build_report(tenant: &Tenant, keys: &[ApiKey], now: Timestamp) -> TenantReport {
    let status = tenant.status.clone().unwrap_or_default();
    let namespaces = if status.namespaces.is_empty() {
        tenant.spec.namespaces.clone()
    } else {
        status.namespaces.clone()
    };
    let ready = find_ready(&status.conditions).map(|c| ReadyView {
        status: c.status.clone(),
        reason: c.reason.clone(),
        message: c.message.clone(),
    });
    let mut findings = Vec::new();
    match &ready {
        Some(r) if r.status == "True" => {}
        Some(r) => findings.push(Finding {
            severity: Severity::Fail,
            message: format!(
                "tenant is not Ready ({}: {}); see kubectl describe tenant {}",
                r.reason,
                r.message,
                tenant.name_any()
            ),
        }),
        None => findings.push(Finding {
            severity: Severity::Warn,
            message:
                "tenant has no Ready condition: is the operator running? (kubectl portcullis check)"
                    .to_owned(),
        }),
    }
    let mut keys_by_state = BTreeMap::new();
    for key in keys {
        let key_status = key.status.clone().unwrap_or_default();
        *keys_by_state
            .entry(key_status.state.as_str().to_owned())
            .or_insert(0) += 1;
        let (ns, name) = (key.namespace().unwrap_or_default(), key.name_any());
        match key_status.state {
            KeyState::Invalid => {
                let why = find_ready(&key_status.conditions).map_or_else(
                    || "no reason given".to_owned(),
                    |c| format!("{}: {}", c.reason, c.message),
                );
                findings.push(Finding {
                    severity: Severity::Fail,
                    message: format!(
                        "ApiKey {ns}/{name} is Invalid ({why}); fix it with kubectl edit ak {name} -n {ns}"
                    ),
                });
            }
            KeyState::Active => {
                if let Some(expires) = key_status.expires_at.as_ref().map(|t| t.0)
                    && expires.duration_since(now) <= KEY_EXPIRY_WARNING
                {
                    findings.push(Finding {
                        severity: Severity::Warn,
                        message: format!(
                            "ApiKey {ns}/{name} expires {} ({}); rotate it with kubectl portcullis key rotate {name} -n {ns}",
                            relative(expires, now),
                            timestamp(expires),
                        ),
                    });
                }
            }
            KeyState::Pending | KeyState::Expired | KeyState::Revoked => {}
        }
    }
    TenantReport {
        name: tenant.name_any(),
        classification: format!("{:?}", tenant.spec.data_classification),
        classification_means: classification_means(tenant.spec.data_classification).to_owned(),
        namespaces,
        active_dek_version: status.active_dek_version,
        dek_rotation: tenant.spec.encryption.dek_rotation.to_string(),
        retention_days: tenant.spec.retention_days(),
        api_keys: status.api_keys,
        roles: status.roles,
        ready,
        keys_by_state,
        findings,
    }
}

impl TenantReport {
    /// The `kubectl describe`-style block, then the findings.
    pub fn render(&self) -> String {
        let by_state = if self.keys_by_state.is_empty() {
            "none".to_owned()
        } else {
            self.keys_by_state
                .iter()
                .map(|(state, n)| format!("{state} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut text = render_fields(&[
            ("Tenant", self.name.clone()),
            (
                "Classification",
                format!("{} ({})", self.classification, self.classification_means),
            ),
            (
                "Namespaces",
                if self.namespaces.is_empty() {
                    "none bound".to_owned()
                } else {
                    self.namespaces.join(", ")
                },
            ),
            (
                "Active DEK",
                self.active_dek_version.map_or_else(
                    || format!("none yet (rotates every {})", self.dek_rotation),
                    |v| format!("v{v} (rotates every {})", self.dek_rotation),
                ),
            ),
            ("Audit retention", format!("{} days", self.retention_days)),
            ("API keys", self.api_keys.to_string()),
            ("Roles", self.roles.to_string()),
            (
                "Ready",
                self.ready.as_ref().map_or_else(
                    || "no condition yet".to_owned(),
                    |r| format!("{} {}: {}", r.status, r.reason, r.message),
                ),
            ),
            ("Keys by state", by_state),
        ]);
        if !self.findings.is_empty() {
            text.push_str("\nWarnings:\n");
            for finding in &self.findings {
                let mark = match finding.severity {
                    Severity::Warn => "!",
                    Severity::Fail => "✗",
                };
                text.push_str(&format!("  {mark} {}\n", finding.message));
            }
        }
        text
    }
}

/// `tenant status`.
pub async fn status(
    cluster: &Cluster,
    args: &TenantStatusArgs,
    out: &mut dyn Write,
    _err: &mut dyn Write,
) -> Result<Outcome, CliError> {
    let tenants: Api<Tenant> = Api::all(cluster.client.clone());
    let tenant = tenants.get(&args.name).await.map_err(|e| {
        CliError::from_kube(e, || {
            (
                format!("Tenant {}", args.name),
                "list tenants with kubectl get tenants".to_owned(),
            )
        })
    })?;
    let namespaces = tenant
        .status
        .as_ref()
        .map(|s| s.namespaces.clone())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| tenant.spec.namespaces.clone());
    let mut keys = Vec::new();
    let mut unreadable = Vec::new();
    for ns in &namespaces {
        let api: Api<ApiKey> = Api::namespaced(cluster.client.clone(), ns);
        match api.list(&ListParams::default()).await {
            Ok(list) => keys.extend(list.items),
            Err(e) => unreadable.push(format!("{ns} ({})", CliError::from(e))),
        }
    }
    keys.sort_by_key(|k| (k.namespace(), k.name_any()));
    let mut report = build_report(&tenant, &keys, Timestamp::now());
    for ns in unreadable {
        report.findings.push(Finding {
            severity: Severity::Warn,
            message: format!("cannot list the keys of namespace {ns}"),
        });
    }
    match args.output.format {
        OutputFormat::Table => out.write_all(report.render().as_bytes())?,
        format => write_structured(format, &report, out)?,
    }
    Ok(Outcome::Clean)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use portcullis_crds::{ApiKeySpec, ApiKeyStatus, TenantSpec, TenantStatus};

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn condition(status: &str, reason: &str, message: &str) -> Condition {
        Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: None,
            last_transition_time: Time(at(0)),
        }
    }

    fn key(name: &str, state: KeyState, expires: Option<i64>, ready: Option<Condition>) -> ApiKey {
        let mut key = ApiKey::new(name, ApiKeySpec::default());
        key.metadata.namespace = Some("acme-prod".into());
        key.status = Some(ApiKeyStatus {
            state,
            expires_at: expires.map(|s| Time(at(s))),
            conditions: ready.into_iter().collect(),
            ..ApiKeyStatus::default()
        });
        key
    }

    #[test]
    fn report_counts_states_and_warns_about_expiring_and_invalid_keys() {
        let spec: TenantSpec = serde_json::from_value(
            serde_json::json!({"namespaces": ["acme-prod"], "dataClassification": "Confidential"}),
        )
        .unwrap();
        let mut tenant = Tenant::new("acme", spec);
        tenant.status = Some(TenantStatus {
            conditions: vec![condition("True", "Reconciled", "2 namespaces bound")],
            namespaces: vec!["acme-prod".into(), "acme-staging".into()],
            active_dek_version: Some(3),
            api_keys: 4,
            roles: 5,
            unprotected_pods: vec![],
            observed_generation: None,
            audit_anchors: vec![],
        });
        let now = 1_000 * 86_400;
        let keys = [
            key("soon", KeyState::Active, Some(now + 3 * 86_400), None),
            key("later", KeyState::Active, Some(now + 30 * 86_400), None),
            key(
                "bad",
                KeyState::Invalid,
                None,
                Some(condition(
                    "False",
                    "ScopeNotInRole",
                    "scope signals is not granted by role Viewer",
                )),
            ),
            key("old", KeyState::Revoked, None, None),
        ];
        let report = build_report(&tenant, &keys, at(now));
        assert_eq!(report.namespaces, ["acme-prod", "acme-staging"]);
        assert_eq!(report.retention_days, 2555);
        assert_eq!(
            report.keys_by_state,
            BTreeMap::from([
                ("Active".into(), 2),
                ("Invalid".into(), 1),
                ("Revoked".into(), 1)
            ])
        );
        assert_eq!(report.findings.len(), 2, "{:?}", report.findings);
        let text = report.render();
        assert!(
            text.contains("Classification:   Confidential (mTLS or API key; audit fails closed)\n"),
            "{text}"
        );
        assert!(
            text.contains("Active DEK:       v3 (rotates every 7d)\n"),
            "{text}"
        );
        assert!(
            text.contains("Keys by state:    Active 2, Invalid 1, Revoked 1\n"),
            "{text}"
        );
        assert!(
            text.contains("  ! ApiKey acme-prod/soon expires in 3d"),
            "{text}"
        );
        assert!(
            text.contains("  ✗ ApiKey acme-prod/bad is Invalid (ScopeNotInRole: scope signals is not granted by role Viewer)"),
            "{text}"
        );
        assert!(!text.contains("later"), "{text}");
    }

    #[test]
    fn unready_tenant_is_a_finding() {
        let spec: TenantSpec = serde_json::from_value(serde_json::json!({})).unwrap();
        let tenant = Tenant::new("t", spec);
        let report = build_report(&tenant, &[], at(0));
        assert_eq!(report.findings.len(), 1);
        assert_eq!(report.findings[0].severity, Severity::Warn);
    }
}
