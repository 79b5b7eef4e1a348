//! What the audit collector asks the API server.
//!
//! Who may export a tenant's records, the way kubelet authorises its API: TokenReview
//! says who the bearer is, SubjectAccessReview says whether that subject may `export`
//! `auditrecords.portcullis.dev` in one of the tenant's namespaces. The operator's RBAC
//! for the `audit:read` permission grants it (Analyst, Admin, Owner); a Developer's
//! does not; a cluster admin's wildcard does.
//!
//! How long each tenant's log is kept: its Tenant's retention in force
//! (`spec.audit.retentionDays`, else its classification's default); the collector's
//! default for a log whose Tenant is gone.
//!
//! And it tells: a refused batch (a gap, fork or altered record) becomes a Warning
//! Event on the Tenant, at most one per chain and reason every five minutes; so does a
//! SIEM sink that cannot be used or refuses what it is sent, one per sink.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview};
use kube::Api;
use kube::api::PostParams;
use portcullis_api::audit_export::{GROUP, RESOURCE, VERB};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::FutureExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use tokio_util::sync::CancellationToken;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use kube::runtime::events::EventType;
use portcullis_api::audit_ship::{ShipRefusal, ShipRefusalReason};
use portcullis_collector::{
    ExportAuthorizer, ExportDenial, Reader, RefusalObserver, RetentionPolicy, SinkObserver,
};
use portcullis_crds::Tenant;

use crate::access_review;
use crate::context::publish_cluster_scoped_event;

/// Asks the API server.
#[derive(Clone)]
pub struct KubeExportAuthorizer {
    client: kube::Client,
}

impl std::fmt::Debug for KubeExportAuthorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeExportAuthorizer")
            .finish_non_exhaustive()
    }
}

fn unavailable(what: &str) -> impl FnOnce(kube::Error) -> ExportDenial + '_ {
    move |e| {
        tracing::warn!(error = %e, "export authorisation: {what} failed");
        ExportDenial::Unavailable(format!(
            "the collector could not ask the API server ({what}); try again"
        ))
    }
}

/// The SubjectAccessReview asking whether `user` may export `tenant`'s records in
/// `namespace` (cluster-wide when `None`).
pub fn export_review(
    user: &UserInfo,
    tenant: &str,
    namespace: Option<&str>,
) -> SubjectAccessReview {
    access_review::review(
        user,
        ResourceAttributes {
            group: Some(GROUP.into()),
            resource: Some(RESOURCE.into()),
            verb: Some(VERB.into()),
            namespace: namespace.map(str::to_owned),
            name: Some(tenant.into()),
            ..ResourceAttributes::default()
        },
    )
}

impl KubeExportAuthorizer {
    /// Authorises with `client` (the collector's ServiceAccount: it may create
    /// TokenReviews and SubjectAccessReviews and get Tenants).
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }

    async fn who(&self, token: &str) -> Result<UserInfo, ExportDenial> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: None,
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(unavailable("a TokenReview"))?;
        let status = reviewed.status.unwrap_or_default();
        match (status.authenticated, status.user) {
            (Some(true), Some(user)) => Ok(user),
            _ => Err(ExportDenial::Unauthenticated(
                "the API server does not accept this token (expired, revoked, or for another audience); get a fresh one, e.g. kubectl create token <serviceaccount>".into(),
            )),
        }
    }

    async fn may_export(
        &self,
        user: &UserInfo,
        tenant: &str,
        namespace: Option<&str>,
    ) -> Result<bool, ExportDenial> {
        access_review::allowed(&self.client, &export_review(user, tenant, namespace))
            .await
            .map_err(unavailable("a SubjectAccessReview"))
    }
}

impl ExportAuthorizer for KubeExportAuthorizer {
    async fn authorize(&self, token: &str, tenant: &str) -> Result<Reader, ExportDenial> {
        let user = self.who(token).await?;
        let name = user.username.clone().unwrap_or_default();
        let forbidden = || {
            ExportDenial::Forbidden(format!(
                "{name} may not {VERB} {RESOURCE}.{GROUP} in any namespace of tenant {tenant}; a tenant role with the audit:read permission (analyst, admin, owner) grants it"
            ))
        };
        let found = Api::<Tenant>::all(self.client.clone())
            .get_opt(tenant)
            .await
            .map_err(unavailable("reading the Tenant"))?;
        // Cluster-wide (a ClusterRoleBinding): a security team reading every tenant.
        let everywhere = self.may_export(&user, tenant, None).await?;
        let Some(found) = found else {
            // Only someone who could read it learns that it does not exist.
            return Err(if everywhere {
                ExportDenial::NoTenant(format!(
                    "there is no Tenant named {tenant:?}; kubectl get tenants lists them"
                ))
            } else {
                forbidden()
            });
        };
        if everywhere {
            return Ok(Reader { user: name });
        }
        for namespace in found.status.map(|s| s.namespaces).unwrap_or_default() {
            if self.may_export(&user, tenant, Some(&namespace)).await? {
                return Ok(Reader { user: name });
            }
        }
        Err(forbidden())
    }
}

/// Each tenant's retention from its Tenant.
#[derive(Clone)]
pub struct KubeRetention {
    tenants: TenantSource,
    default_days: u32,
}

/// Where the collector reads Tenants: a watch cache once it has synced, so forwarding
/// and retention cost no API call per tenant; a GET until then (or without a cache).
#[derive(Clone)]
pub struct TenantSource {
    client: kube::Client,
    cache: Option<Store<Tenant>>,
}

impl std::fmt::Debug for TenantSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantSource")
            .field("cached", &self.cache.is_some())
            .finish_non_exhaustive()
    }
}

impl TenantSource {
    /// Every read a GET.
    pub fn uncached(client: kube::Client) -> Self {
        Self {
            client,
            cache: None,
        }
    }

    /// Reads from a watch of every Tenant, kept until `shutdown` (the collector's
    /// ClusterRole may list and watch Tenants).
    pub fn watched(client: kube::Client, shutdown: CancellationToken) -> Self {
        let (cache, writer) = reflector::store();
        crate::stores::reflect(
            Api::<Tenant>::all(client.clone()),
            writer,
            Arc::new(tokio::sync::Notify::new()),
            shutdown,
        );
        Self {
            client,
            cache: Some(cache),
        }
    }

    /// The Tenant `name`, `None` when there is none.
    pub async fn get(&self, name: &str) -> Result<Option<Tenant>, kube::Error> {
        if let Some(cache) = &self.cache
            && cache
                .wait_until_ready()
                .now_or_never()
                .is_some_and(|ready| ready.is_ok())
        {
            return Ok(cache
                .get(&ObjectRef::new(name))
                .map(|tenant| Tenant::clone(&tenant)));
        }
        Api::<Tenant>::all(self.client.clone()).get_opt(name).await
    }
}

impl std::fmt::Debug for KubeRetention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeRetention")
            .field("default_days", &self.default_days)
            .finish_non_exhaustive()
    }
}

impl KubeRetention {
    /// Reads Tenants from `tenants`; a log whose Tenant is gone keeps `default_days`.
    pub fn new(tenants: TenantSource, default_days: u32) -> Self {
        Self {
            tenants,
            default_days,
        }
    }
}

/// The retention of a log whose Tenant is `tenant` (`None`: deleted).
pub fn retention_of(tenant: Option<&Tenant>, default_days: u32) -> u32 {
    tenant.map_or(default_days, |t| t.spec.retention_days())
}

impl RetentionPolicy for KubeRetention {
    async fn days(&self, tenant: &str) -> Option<u32> {
        match self.tenants.get(tenant).await {
            Ok(found) => Some(retention_of(found.as_ref(), self.default_days)),
            Err(e) => {
                tracing::warn!(tenant, error = %e, "retention: cannot read the Tenant; nothing of its log is pruned this round");
                None
            }
        }
    }
}

/// The Event reason of a refused batch.
pub const BATCH_REFUSED: &str = "AuditBatchRefused";

/// How often the same refusal (tenant, chain, reason) becomes an Event: a proxy resends
/// a refused batch until someone acts, and one Event per resend would bury the rest.
pub const REFUSAL_EVENT_EVERY: Duration = Duration::from_secs(300);

/// The Event reason of a SIEM sink that cannot be used or refuses batches.
pub const SINK_FAILING: &str = "AuditSinkFailing";

/// What makes a problem news: a refused batch's tenant, chain and reason, or a failing
/// sink's tenant and id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum News {
    Refusal(String, Option<String>, ShipRefusalReason),
    Sink(String, String),
}

impl News {
    fn refusal(tenant: &str, refusal: &ShipRefusal) -> Self {
        Self::Refusal(tenant.to_owned(), refusal.chain_id.clone(), refusal.reason)
    }
}

/// Refused batches and failing SIEM sinks as Warning Events on their Tenant.
pub struct TenantEvents {
    client: kube::Client,
    instance: String,
    last: Mutex<HashMap<News, Instant>>,
}

impl std::fmt::Debug for TenantEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantEvents").finish_non_exhaustive()
    }
}

impl TenantEvents {
    /// Publishes with `client`, as `instance` (the collector's pod).
    pub fn new(client: kube::Client, instance: String) -> Self {
        Self {
            client,
            instance,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `news` is due an Event at `now` (and notes that it had one).
    fn due(&self, news: News, now: Instant) -> bool {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        last.retain(|_, at| now.duration_since(*at) < REFUSAL_EVENT_EVERY);
        if last.contains_key(&news) {
            return false;
        }
        last.insert(news, now);
        true
    }

    /// Publishes a Warning Event `reason` on Tenant `tenant`, in the background.
    fn warn(&self, tenant: &str, reason: &'static str, note: String) {
        let regarding = ObjectReference {
            api_version: Some(Tenant::api_version(&()).into_owned()),
            kind: Some(Tenant::kind(&()).into_owned()),
            name: Some(tenant.to_owned()),
            ..ObjectReference::default()
        };
        let client = self.client.clone();
        let instance = self.instance.clone();
        tokio::spawn(async move {
            let published = publish_cluster_scoped_event(
                &client,
                &instance,
                &regarding,
                EventType::Warning,
                reason,
                note,
                jiff::Timestamp::now(),
            )
            .await;
            if let Err(e) = published {
                tracing::warn!(error = %e, reason, "could not publish the Tenant's Event");
            }
        });
    }
}

/// The Event's note for a refused batch.
pub fn refusal_note(workload: &str, refusal: &ShipRefusal) -> String {
    format!(
        "the audit collector refused a batch from {workload} ({:?}{}): {}; nothing of it was stored, and the proxy keeps it in its spool",
        refusal.reason,
        refusal
            .chain_id
            .as_deref()
            .map(|c| format!(", chain {c}"))
            .unwrap_or_default(),
        refusal.error
    )
}

impl RefusalObserver for TenantEvents {
    fn refused(&self, tenant: &str, workload: &str, refusal: &ShipRefusal) {
        if self.due(News::refusal(tenant, refusal), Instant::now()) {
            self.warn(tenant, BATCH_REFUSED, refusal_note(workload, refusal));
        }
    }
}

impl SinkObserver for TenantEvents {
    fn sink_failing(&self, tenant: &str, sink: &str, problem: &str) {
        let news = News::Sink(tenant.to_owned(), sink.to_owned());
        if self.due(news, Instant::now()) {
            let note = format!(
                "the audit collector cannot forward this tenant's log to sink {sink} (spec.audit.sinks): {problem}; the records wait in the log and are sent once this is fixed"
            );
            self.warn(tenant, SINK_FAILING, note);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(spec: serde_json::Value) -> Tenant {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": "acme"}, "spec": spec
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_tenant_keeps_its_log_for_its_own_retention() {
        let set = tenant(serde_json::json!({"audit": {"retentionDays": 30}}));
        assert_eq!(retention_of(Some(&set), 365), 30);
        // Confidential defaults to seven years, whatever the collector's default.
        let confidential = tenant(serde_json::json!({"dataClassification": "Confidential"}));
        assert_eq!(retention_of(Some(&confidential), 365), 2555);
        // A deleted Tenant's log is kept for the collector's default.
        assert_eq!(retention_of(None, 90), 90);
    }

    fn refusal(chain: &str, reason: ShipRefusalReason) -> ShipRefusal {
        ShipRefusal {
            error: "the batch skips records".into(),
            reason,
            chain_id: Some(chain.into()),
            expected_seq: Some(4),
        }
    }

    #[tokio::test]
    async fn a_resent_refusal_or_a_failing_sink_is_one_event_per_five_minutes() {
        let config = kube::Config::new(
            "http://127.0.0.1:9"
                .parse()
                .unwrap_or_else(|e| panic!("{e}")),
        );
        let client = kube::Client::try_from(config).unwrap_or_else(|e| panic!("{e}"));
        let events = TenantEvents::new(client, "portcullis-audit-0".into());
        let gap = refusal("web-1", ShipRefusalReason::MissingRecords);
        let start = Instant::now();
        let news = |tenant: &str, refusal: &ShipRefusal| News::refusal(tenant, refusal);
        assert!(events.due(news("shop", &gap), start));
        assert!(!events.due(news("shop", &gap), start + Duration::from_secs(10)));
        // Another chain, another reason or another tenant is news.
        let other_chain = refusal("web-2", ShipRefusalReason::MissingRecords);
        assert!(events.due(news("shop", &other_chain), start));
        let fork = refusal("web-1", ShipRefusalReason::Fork);
        assert!(events.due(news("shop", &fork), start));
        assert!(events.due(news("bank", &gap), start));
        assert!(events.due(news("shop", &gap), start + REFUSAL_EVENT_EVERY));
        // A failing sink is news once per sink, apart from refusals.
        let sink = || News::Sink("shop".into(), "splunk-hec-1".into());
        assert!(events.due(sink(), start));
        assert!(!events.due(sink(), start + Duration::from_secs(30)));
        assert!(events.due(News::Sink("shop".into(), "datadog-1".into()), start));
        let note = refusal_note("spiffe://td/ns/shop/sa/web", &gap);
        assert!(
            note.contains("MissingRecords, chain web-1")
                && note.contains("spiffe://td/ns/shop/sa/web"),
            "{note}"
        );
    }
}
