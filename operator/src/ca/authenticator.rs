//! Who is asking: the projected ServiceAccount token checked by TokenReview, the Pod it
//! is bound to, and the tenant of the Pod's namespace.
//!
//! The Kubernetes lookups sit behind [`WorkloadAuthenticator`] so the decision logic in
//! [`authenticate`] can be driven by a script in tests.

use std::collections::BTreeMap;
use std::fmt;

use super::service_names::ServiceSelector;
use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use portcullis_api::identity::{IDENTITY_AUDIENCE, RefusalReason};
use portcullis_api::spiffe::{TenantId, TrustDomain, WorkloadId};

/// Namespace label naming the tenant (contract, DESIGN.md §2).
pub const TENANT_LABEL: &str = "portcullis.dev/tenant";
/// TokenReview `user.extra` key with the bound pod's name.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// TokenReview `user.extra` key with the bound pod's UID.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// The parts of a TokenReview status the decision needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenReviewOutcome {
    /// `status.authenticated`.
    pub authenticated: bool,
    /// `status.audiences`.
    pub audiences: Vec<String>,
    /// `status.user.username`.
    pub username: String,
    /// `status.user.extra`.
    pub extra: BTreeMap<String, Vec<String>>,
    /// `status.error`.
    pub error: Option<String>,
}

/// The parts of a Pod the decision needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    /// `metadata.uid`.
    pub uid: String,
    /// `spec.serviceAccountName`.
    pub service_account: String,
    /// `metadata.labels`: which Services select the pod.
    pub labels: BTreeMap<String, String>,
}

/// A lookup could not be made (API server unreachable, RBAC, ...): retry later.
#[derive(Debug, Clone, thiserror::Error)]
#[error("Kubernetes lookup failed: {0}")]
pub struct LookupError(pub String);

/// The Kubernetes lookups behind workload authentication.
pub trait WorkloadAuthenticator: Send + Sync {
    /// TokenReview of `token` for `audience`.
    fn review_token<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> BoxFuture<'a, Result<TokenReviewOutcome, LookupError>>;
    /// The Pod `namespace/name`, or `None` when it does not exist.
    fn pod<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<PodFacts>, LookupError>>;
    /// The `portcullis.dev/tenant` label of `namespace`, or `None`.
    fn namespace_tenant<'a>(
        &'a self,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, LookupError>>;
    /// The Services of `namespace` that select pods.
    fn services<'a>(
        &'a self,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ServiceSelector>, LookupError>>;
}

/// A refused request: the reason (contract) and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Refusal {
    /// Machine-readable reason.
    pub reason: RefusalReason,
    /// Human-readable explanation (never contains the token).
    pub message: String,
}

impl Refusal {
    /// A refusal for `reason`.
    pub fn new(reason: RefusalReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

impl From<LookupError> for Refusal {
    fn from(e: LookupError) -> Self {
        Self::new(RefusalReason::Unavailable, e.0)
    }
}

/// A workload proven by its token and Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticatedWorkload {
    /// Its SPIFFE workload ID.
    pub workload: WorkloadId,
    /// Its tenant's SPIFFE ID.
    pub tenant: TenantId,
    /// The Pod the token is bound to.
    pub pod_name: String,
    /// That Pod's UID.
    pub pod_uid: String,
    /// That Pod's labels.
    pub pod_labels: BTreeMap<String, String>,
}

fn single_extra<'a>(extra: &'a BTreeMap<String, Vec<String>>, key: &str) -> Option<&'a str> {
    match extra.get(key).map(Vec::as_slice) {
        Some([value]) if !value.is_empty() => Some(value.as_str()),
        _ => None,
    }
}

/// Decides who presents `token`: TokenReview (authenticated, identity audience) →
/// ServiceAccount username → bound Pod (exists, same UID, same ServiceAccount) → the
/// namespace's tenant.
pub async fn authenticate(
    lookups: &dyn WorkloadAuthenticator,
    trust_domain: &TrustDomain,
    token: &str,
) -> Result<AuthenticatedWorkload, Refusal> {
    use RefusalReason::*;
    if token.is_empty() {
        return Err(Refusal::new(TokenInvalid, "no token"));
    }
    let review = lookups.review_token(token, IDENTITY_AUDIENCE).await?;
    if !review.authenticated {
        let detail = review.error.unwrap_or_default();
        // The API server refuses a token for another audience as unauthenticated; its
        // error names the audience, which is the more useful reason to report.
        let reason = if detail.contains("audience") {
            WrongAudience
        } else {
            TokenInvalid
        };
        return Err(Refusal::new(
            reason,
            format!("token not authenticated: {detail}"),
        ));
    }
    if !review.audiences.iter().any(|a| a == IDENTITY_AUDIENCE) {
        return Err(Refusal::new(
            WrongAudience,
            format!(
                "token audiences {:?} lack {IDENTITY_AUDIENCE}",
                review.audiences
            ),
        ));
    }
    let (namespace, service_account) = review
        .username
        .strip_prefix(SERVICE_ACCOUNT_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(|| {
            Refusal::new(
                TokenInvalid,
                format!("{:?} is not a ServiceAccount", review.username),
            )
        })?;
    let workload = WorkloadId::new(trust_domain.clone(), namespace, service_account)
        .map_err(|e| Refusal::new(TokenInvalid, e.to_string()))?;

    let (Some(pod_name), Some(pod_uid)) = (
        single_extra(&review.extra, EXTRA_POD_NAME),
        single_extra(&review.extra, EXTRA_POD_UID),
    ) else {
        return Err(Refusal::new(
            TokenNotBoundToPod,
            "the token is not bound to a pod; use a projected ServiceAccount token",
        ));
    };
    let pod = lookups.pod(namespace, pod_name).await?.ok_or_else(|| {
        Refusal::new(
            PodNotFound,
            format!("pod {namespace}/{pod_name} does not exist"),
        )
    })?;
    if pod.uid != pod_uid {
        return Err(Refusal::new(
            PodMismatch,
            format!("pod {namespace}/{pod_name} has been replaced (UID differs)"),
        ));
    }
    if pod.service_account != service_account {
        return Err(Refusal::new(
            ServiceAccountMismatch,
            format!(
                "pod {namespace}/{pod_name} runs as {:?}, the token is for {service_account:?}",
                pod.service_account
            ),
        ));
    }

    let tenant = lookups.namespace_tenant(namespace).await?.ok_or_else(|| {
        Refusal::new(
            NoTenant,
            format!("namespace {namespace} has no {TENANT_LABEL} label"),
        )
    })?;
    let tenant = TenantId::new(trust_domain.clone(), tenant)
        .map_err(|e| Refusal::new(NoTenant, format!("namespace {namespace}: {e}")))?;
    Ok(AuthenticatedWorkload {
        workload,
        tenant,
        pod_name: pod_name.to_string(),
        pod_uid: pod_uid.to_string(),
        pod_labels: pod.labels,
    })
}

/// The real lookups, through the Kubernetes API. Needs RBAC: create tokenreviews, get
/// pods and namespaces.
#[derive(Clone)]
pub struct KubeAuthenticator {
    client: Client,
}

impl KubeAuthenticator {
    /// Lookups through `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

impl fmt::Debug for KubeAuthenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KubeAuthenticator")
    }
}

fn lookup_error(what: &str) -> impl Fn(kube::Error) -> LookupError + '_ {
    move |e| LookupError(format!("{what}: {e}"))
}

impl WorkloadAuthenticator for KubeAuthenticator {
    fn review_token<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> BoxFuture<'a, Result<TokenReviewOutcome, LookupError>> {
        Box::pin(async move {
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_string()),
                    audiences: Some(vec![audience.to_string()]),
                },
                ..TokenReview::default()
            };
            let api: Api<TokenReview> = Api::all(self.client.clone());
            let reviewed = api
                .create(&PostParams::default(), &review)
                .await
                .map_err(lookup_error("TokenReview"))?;
            let status = reviewed.status.unwrap_or_default();
            let user = status.user.unwrap_or_default();
            Ok(TokenReviewOutcome {
                authenticated: status.authenticated.unwrap_or(false),
                audiences: status.audiences.unwrap_or_default(),
                username: user.username.unwrap_or_default(),
                extra: user.extra.unwrap_or_default(),
                error: status.error,
            })
        })
    }

    fn pod<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<PodFacts>, LookupError>> {
        Box::pin(async move {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            let Some(pod) = api.get_opt(name).await.map_err(lookup_error("get pod"))? else {
                return Ok(None);
            };
            let spec = pod.spec.unwrap_or_default();
            #[allow(deprecated)] // `serviceAccount` is the pre-1.0 alias some objects still carry.
            let service_account = spec
                .service_account_name
                .or(spec.service_account)
                .unwrap_or_else(|| "default".into());
            Ok(Some(PodFacts {
                uid: pod.metadata.uid.unwrap_or_default(),
                service_account,
                labels: pod.metadata.labels.unwrap_or_default(),
            }))
        })
    }

    fn namespace_tenant<'a>(
        &'a self,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, LookupError>> {
        Box::pin(async move {
            let api: Api<Namespace> = Api::all(self.client.clone());
            let ns = api
                .get_opt(namespace)
                .await
                .map_err(lookup_error("get namespace"))?;
            Ok(ns
                .and_then(|ns| ns.metadata.labels)
                .and_then(|mut labels| labels.remove(TENANT_LABEL)))
        })
    }

    fn services<'a>(
        &'a self,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ServiceSelector>, LookupError>> {
        Box::pin(async move {
            let api: Api<Service> = Api::namespaced(self.client.clone(), namespace);
            let services = api
                .list(&ListParams::default())
                .await
                .map_err(lookup_error("list services"))?;
            Ok(services
                .items
                .iter()
                .filter_map(ServiceSelector::of)
                .collect())
        })
    }
}

/// Fixed answers instead of Kubernetes lookups, for tests and local demos: tokens map
/// to TokenReview outcomes, and pods and namespaces are a table. Unknown tokens are
/// unauthenticated; unknown pods and namespaces do not exist.
#[derive(Debug, Clone, Default)]
pub struct StaticAuthenticator {
    tokens: BTreeMap<String, TokenReviewOutcome>,
    pods: BTreeMap<(String, String), PodFacts>,
    tenants: BTreeMap<String, String>,
    services: BTreeMap<String, Vec<ServiceSelector>>,
    unavailable: bool,
}

impl StaticAuthenticator {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// A valid projected token for pod `namespace/pod` running as `service_account`,
    /// with the namespace belonging to `tenant`: the TokenReview outcome, the Pod and
    /// the namespace label, all consistent.
    pub fn with_workload(
        self,
        token: &str,
        namespace: &str,
        service_account: &str,
        pod: &str,
        tenant: &str,
    ) -> Self {
        let uid = format!("uid-{namespace}-{pod}");
        self.with_token(
            token,
            TokenReviewOutcome {
                authenticated: true,
                audiences: vec![IDENTITY_AUDIENCE.into()],
                username: format!("{SERVICE_ACCOUNT_PREFIX}{namespace}:{service_account}"),
                extra: BTreeMap::from([
                    (EXTRA_POD_NAME.into(), vec![pod.into()]),
                    (EXTRA_POD_UID.into(), vec![uid.clone()]),
                ]),
                error: None,
            },
        )
        .with_pod(
            namespace,
            pod,
            PodFacts {
                uid,
                service_account: service_account.into(),
                labels: BTreeMap::new(),
            },
        )
        .with_tenant(namespace, tenant)
    }

    /// Answers TokenReviews of `token` with `outcome`.
    pub fn with_token(mut self, token: &str, outcome: TokenReviewOutcome) -> Self {
        self.tokens.insert(token.into(), outcome);
        self
    }

    /// Adds (or replaces) a Pod.
    pub fn with_pod(mut self, namespace: &str, name: &str, facts: PodFacts) -> Self {
        self.pods.insert((namespace.into(), name.into()), facts);
        self
    }

    /// Removes a Pod.
    pub fn without_pod(mut self, namespace: &str, name: &str) -> Self {
        self.pods.remove(&(namespace.to_string(), name.to_string()));
        self
    }

    /// Labels `namespace` with `tenant`.
    pub fn with_tenant(mut self, namespace: &str, tenant: &str) -> Self {
        self.tenants.insert(namespace.into(), tenant.into());
        self
    }

    /// Removes the tenant label of `namespace`.
    pub fn without_tenant(mut self, namespace: &str) -> Self {
        self.tenants.remove(namespace);
        self
    }

    /// Adds a Service selecting pods with `selector` to `namespace`.
    pub fn with_service(mut self, namespace: &str, name: &str, selector: &[(&str, &str)]) -> Self {
        self.services
            .entry(namespace.into())
            .or_default()
            .push(ServiceSelector {
                name: name.into(),
                selector: selector
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            });
        self
    }

    /// Sets the labels of an existing Pod.
    pub fn with_pod_labels(mut self, namespace: &str, name: &str, labels: &[(&str, &str)]) -> Self {
        if let Some(pod) = self
            .pods
            .get_mut(&(namespace.to_string(), name.to_string()))
        {
            pod.labels = labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
        }
        self
    }

    /// Makes every lookup fail as if the API server were down.
    pub fn unavailable(mut self) -> Self {
        self.unavailable = true;
        self
    }

    fn check(&self) -> Result<(), LookupError> {
        if self.unavailable {
            Err(LookupError("API server unavailable (scripted)".into()))
        } else {
            Ok(())
        }
    }
}

impl WorkloadAuthenticator for StaticAuthenticator {
    fn review_token<'a>(
        &'a self,
        token: &'a str,
        _audience: &'a str,
    ) -> BoxFuture<'a, Result<TokenReviewOutcome, LookupError>> {
        Box::pin(async move {
            self.check()?;
            Ok(self
                .tokens
                .get(token)
                .cloned()
                .unwrap_or_else(|| TokenReviewOutcome {
                    error: Some("invalid bearer token".into()),
                    ..TokenReviewOutcome::default()
                }))
        })
    }

    fn pod<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<PodFacts>, LookupError>> {
        Box::pin(async move {
            self.check()?;
            Ok(self
                .pods
                .get(&(namespace.to_string(), name.to_string()))
                .cloned())
        })
    }

    fn namespace_tenant<'a>(
        &'a self,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, LookupError>> {
        Box::pin(async move {
            self.check()?;
            Ok(self.tenants.get(namespace).cloned())
        })
    }

    fn services<'a>(
        &'a self,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ServiceSelector>, LookupError>> {
        Box::pin(async move {
            self.check()?;
            Ok(self.services.get(namespace).cloned().unwrap_or_default())
        })
    }
}
