//! `GET /v1/audit-key/<tenant>`: the tenant's data-encryption keys for the sidecar's
//! encrypted audit segments (sidecar/src/control/audit_key.rs is the client; the answer
//! is [`AuditKeyAnswer`]).
//!
//! Read from the DEK Secret `portcullis-dek-<tenant>` (operator namespace), unwrapped
//! with the KEK on each request — sidecars ask at start and every few minutes. 404 when
//! the tenant has no DEK yet. Key material is never logged and never in an error.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use http::{Response, StatusCode};
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client};
use portcullis_api::audit_key::AuditKeyAnswer;
use portcullis_crds::Tenant;

use crate::dek::{self, DekRing};
use crate::envelope::Kek;
use portcullis_server::{self as serve, Body};

/// Where the keys come from.
#[derive(Clone)]
pub struct AuditKeys {
    client: Client,
    namespace: String,
    kek: Arc<Kek>,
    tenants: Option<Store<Tenant>>,
}

impl std::fmt::Debug for AuditKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKeys")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// A JSON denial `{"error": ..., "reason": ...}` (the proxy's denial shape).
pub(crate) fn denial(status: StatusCode, error: &str, reason: &str) -> Response<Body> {
    let body = serde_json::json!({"error": error, "reason": reason}).to_string();
    serve::full(status, "application/json", body)
}

impl AuditKeys {
    /// Reads DEK Secrets in `namespace` through `client`, unwrapping with `kek`;
    /// `tenants` (the Tenant cache) supplies `retentionDays`.
    pub fn new(
        client: Client,
        namespace: &str,
        kek: Arc<Kek>,
        tenants: Option<Store<Tenant>>,
    ) -> Self {
        Self {
            client,
            namespace: namespace.to_owned(),
            kek,
            tenants,
        }
    }

    /// The answer for `tenant` (already authorized).
    pub async fn answer(&self, tenant: &str) -> Response<Body> {
        let name = dek::secret_name(tenant);
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let secret = match api.get_opt(&name).await {
            Ok(Some(secret)) => secret,
            Ok(None) => {
                return denial(
                    StatusCode::NOT_FOUND,
                    &format!("tenant {tenant:?} has no audit key yet"),
                    "NoAuditKey",
                );
            }
            Err(e) => {
                tracing::warn!(%tenant, error = %e, "reading the DEK Secret failed");
                return denial(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the audit key cannot be read now; retry shortly",
                    "Unavailable",
                );
            }
        };
        let ring = match DekRing::from_secret_parts(
            tenant,
            &secret.data.unwrap_or_default(),
            &secret.metadata.annotations.unwrap_or_default(),
        ) {
            Ok(ring) => ring,
            Err(problem) => {
                // The problem names data keys and annotations, never their values.
                tracing::error!(%tenant, secret = %name, %problem, "DEK Secret is malformed");
                return denial(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the tenant's audit key is unusable",
                    "Internal",
                );
            }
        };
        let Some(active) = ring.active().map(|v| v.version) else {
            return denial(
                StatusCode::NOT_FOUND,
                &format!("tenant {tenant:?} has no audit key yet"),
                "NoAuditKey",
            );
        };
        let mut keys = BTreeMap::new();
        for version in ring.versions() {
            match ring.unwrap_version(&self.kek, version) {
                Ok(key) => {
                    keys.insert(
                        version.to_string(),
                        base64::engine::general_purpose::STANDARD.encode(&key),
                    );
                }
                Err(e) => {
                    tracing::error!(%tenant, version, error = %e, "a DEK does not unwrap with the KEK");
                    return denial(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the tenant's audit key is unusable",
                        "Internal",
                    );
                }
            }
        }
        let retention_days = self.tenants.as_ref().and_then(|store| {
            store
                .get(&ObjectRef::new(tenant))
                .map(|t| t.spec.retention_days())
        });
        let answer = AuditKeyAnswer {
            tenant: tenant.to_owned(),
            active_version: active,
            keys,
            retention_days,
        };
        match serde_json::to_vec(&answer) {
            Ok(body) => {
                tracing::debug!(%tenant, active_version = active, "audit key handed out");
                serve::full(StatusCode::OK, "application/json", body)
            }
            Err(_) => denial(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding the answer failed",
                "Internal",
            ),
        }
    }
}
