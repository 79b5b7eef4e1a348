//! RBAC probes: every API call the operator makes, as its ServiceAccount; each chart
//! rule necessary.

use super::*;

/// (API group, resource, verb).
type Need = (String, String, String);

fn need(group: &str, resource: &str, verb: &str) -> Need {
    (group.to_owned(), resource.to_owned(), verb.to_owned())
}

/// The permissions of the RBAC Roles the operator generates for Portcullis Roles, at
/// most every permission (Owner): the operator must hold all of them itself.
fn generated_rules() -> Vec<PolicyRule> {
    let all: BTreeSet<Permission> = Permission::ALL.into_iter().collect();
    portcullis_operator::rbac::rules_for(&all)
}

fn rule_needs(rules: &[PolicyRule]) -> Vec<Need> {
    let mut needs = Vec::new();
    for rule in rules {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    needs.push(need(group, resource, verb));
                }
            }
        }
    }
    needs
}

#[derive(Debug)]
struct ProbeError {
    forbidden: bool,
    message: String,
}

impl From<kube::Error> for ProbeError {
    fn from(e: kube::Error) -> Self {
        let forbidden = matches!(&e, kube::Error::Api(status) if status.code == 403);
        Self {
            forbidden,
            message: e.to_string(),
        }
    }
}

impl From<anyhow::Error> for ProbeError {
    fn from(e: anyhow::Error) -> Self {
        Self {
            forbidden: false,
            message: format!("{e:#}"),
        }
    }
}

type ProbeResult = std::result::Result<(), ProbeError>;

/// Objects and clients the probes use.
struct Cx {
    admin: Client,
    sa: Client,
    sa_user: String,
    sa_groups: Vec<String>,
    release_ns: String,
    tenant_ns: String,
    /// A namespace no Tenant holds: the operator has no Secret access there.
    unbound_ns: String,
    tenant: String,
    apikey: String,
    /// A RBAC Role holding every generated permission (target of binding probes).
    all_permissions_role: String,
    empty_role: String,
    ca_pem: String,
}

async fn list_one<K>(api: Api<K>) -> ProbeResult
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.list(&ListParams::default().limit(1)).await?;
    Ok(())
}

async fn watch_once<K>(api: Api<K>, fields: Option<&str>) -> ProbeResult
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut params = WatchParams::default().timeout(1);
    if let Some(fields) = fields {
        params = params.fields(fields);
    }
    let stream = api.watch(&params, "0").await?;
    // The request was authorized once the stream opened; read at most one event.
    let mut stream = Box::pin(stream);
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
    Ok(())
}

/// A NetworkPolicy like the operator's `portcullis-inbound`.
fn probe_network_policy(name: &str, ns: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"podSelector": {"matchExpressions": [
                        {"key": "portcullis.dev/injected", "operator": "Exists"}]},
                    "policyTypes": ["Ingress"],
                    "ingress": [{"ports": [{"protocol": "TCP"}]}]}})
}

fn merge_annotation() -> Patch<Value> {
    Patch::Merge(json!({"metadata": {"annotations": {"portcullis.dev/probe": suffix()}}}))
}

/// One API call of the operator (or, for finalizers, an authorization the API server
/// checks on the operator's behalf).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    ListTenants,
    WatchTenants,
    GetTenant,
    PatchTenantFinalizers,
    ApplyTenantStatus,
    ListRoles,
    WatchRoles,
    GetRole,
    ApplyBuiltinRole,
    DeleteRole,
    ApplyRoleStatus,
    ListApiKeys,
    WatchApiKeys,
    GetApiKey,
    MarkApiKey,
    ApplyApiKeyStatus,
    OwnerRefTenant,
    OwnerRefRole,
    OwnerRefApiKey,
    GetNamespace,
    ListNamespaces,
    WatchNamespaces,
    LabelNamespace,
    GetApiKeySecret,
    ListSecrets,
    WatchSecrets,
    CreateApiKeySecret,
    ReplaceApiKeySecret,
    DeleteApiKeySecret,
    GetCaSecret,
    ListOwnSecrets,
    CreateOwnSecret,
    ReplaceOwnSecret,
    ApplyAuditSecret,
    BindTenantSecrets,
    ApplyTrustBundle,
    GetConfigMap,
    ListConfigMaps,
    WatchConfigMaps,
    ApplyNetworkPolicy,
    GetNetworkPolicy,
    ListNetworkPolicies,
    WatchNetworkPolicies,
    DeleteNetworkPolicy,
    GetPod,
    ListPods,
    WatchPods,
    ListServices,
    WatchServices,
    ApplyGeneratedRole,
    ApplyGeneratedRoleBinding,
    ListRbacRoles,
    WatchRbacRoles,
    DeleteRbacRole,
    ListRoleBindings,
    WatchRoleBindings,
    DeleteRoleBinding,
    CreateTokenReview,
    CreateSubjectAccessReview,
    CreateEvent,
    PatchEventSeries,
    CreateLease,
    GetLease,
    RenewLease,
    PatchWebhookCaBundles,
    GetCrd,
    ListCrds,
}

impl Probe {
    const ALL: [Probe; 67] = [
        Self::ListTenants,
        Self::WatchTenants,
        Self::GetTenant,
        Self::PatchTenantFinalizers,
        Self::ApplyTenantStatus,
        Self::ListRoles,
        Self::WatchRoles,
        Self::GetRole,
        Self::ApplyBuiltinRole,
        Self::DeleteRole,
        Self::ApplyRoleStatus,
        Self::ListApiKeys,
        Self::WatchApiKeys,
        Self::GetApiKey,
        Self::MarkApiKey,
        Self::ApplyApiKeyStatus,
        Self::OwnerRefTenant,
        Self::OwnerRefRole,
        Self::OwnerRefApiKey,
        Self::GetNamespace,
        Self::ListNamespaces,
        Self::WatchNamespaces,
        Self::LabelNamespace,
        Self::GetApiKeySecret,
        Self::ListSecrets,
        Self::WatchSecrets,
        Self::CreateApiKeySecret,
        Self::ReplaceApiKeySecret,
        Self::DeleteApiKeySecret,
        Self::GetCaSecret,
        Self::ListOwnSecrets,
        Self::CreateOwnSecret,
        Self::ReplaceOwnSecret,
        Self::ApplyAuditSecret,
        Self::BindTenantSecrets,
        Self::ApplyTrustBundle,
        Self::GetConfigMap,
        Self::ListConfigMaps,
        Self::WatchConfigMaps,
        Self::ApplyNetworkPolicy,
        Self::GetNetworkPolicy,
        Self::ListNetworkPolicies,
        Self::WatchNetworkPolicies,
        Self::DeleteNetworkPolicy,
        Self::GetPod,
        Self::ListPods,
        Self::WatchPods,
        Self::ListServices,
        Self::WatchServices,
        Self::ApplyGeneratedRole,
        Self::ApplyGeneratedRoleBinding,
        Self::ListRbacRoles,
        Self::WatchRbacRoles,
        Self::DeleteRbacRole,
        Self::ListRoleBindings,
        Self::WatchRoleBindings,
        Self::DeleteRoleBinding,
        Self::CreateTokenReview,
        Self::CreateSubjectAccessReview,
        Self::CreateEvent,
        Self::PatchEventSeries,
        Self::CreateLease,
        Self::GetLease,
        Self::RenewLease,
        Self::PatchWebhookCaBundles,
        Self::GetCrd,
        Self::ListCrds,
    ];

    /// The permissions this call needs.
    fn needs(self) -> Vec<Need> {
        const PC: &str = "portcullis.dev";
        const RBAC: &str = "rbac.authorization.k8s.io";
        const WEBHOOKS: &str = "admissionregistration.k8s.io";
        const NET: &str = "networking.k8s.io";
        use Probe::*;
        match self {
            ListTenants => vec![need(PC, "tenants", "list")],
            WatchTenants => vec![need(PC, "tenants", "watch")],
            GetTenant => vec![need(PC, "tenants", "get")],
            PatchTenantFinalizers => vec![need(PC, "tenants", "patch")],
            ApplyTenantStatus => vec![need(PC, "tenants/status", "patch")],
            ListRoles => vec![need(PC, "roles", "list")],
            WatchRoles => vec![need(PC, "roles", "watch")],
            GetRole => vec![need(PC, "roles", "get")],
            // Server-side apply that creates the object needs create as well as patch.
            ApplyBuiltinRole => vec![need(PC, "roles", "patch"), need(PC, "roles", "create")],
            DeleteRole => vec![need(PC, "roles", "delete")],
            ApplyRoleStatus => vec![need(PC, "roles/status", "patch")],
            ListApiKeys => vec![need(PC, "apikeys", "list")],
            WatchApiKeys => vec![need(PC, "apikeys", "watch")],
            GetApiKey => vec![need(PC, "apikeys", "get")],
            MarkApiKey => vec![need(PC, "apikeys", "patch")],
            ApplyApiKeyStatus => vec![need(PC, "apikeys/status", "patch")],
            OwnerRefTenant => vec![need(PC, "tenants/finalizers", "update")],
            OwnerRefRole => vec![need(PC, "roles/finalizers", "update")],
            OwnerRefApiKey => vec![need(PC, "apikeys/finalizers", "update")],
            GetNamespace => vec![need("", "namespaces", "get")],
            ListNamespaces => vec![need("", "namespaces", "list")],
            WatchNamespaces => vec![need("", "namespaces", "watch")],
            LabelNamespace => vec![need("", "namespaces", "patch")],
            GetApiKeySecret | GetCaSecret => vec![need("", "secrets", "get")],
            // ListOwnSecrets: a KEK rotation's re-wrap pass finds every DEK Secret,
            // a deleted Tenant's included.
            ListSecrets | ListOwnSecrets => vec![need("", "secrets", "list")],
            WatchSecrets => vec![need("", "secrets", "watch")],
            CreateApiKeySecret | CreateOwnSecret => vec![need("", "secrets", "create")],
            ReplaceApiKeySecret | ReplaceOwnSecret => vec![need("", "secrets", "update")],
            // The audit service's TLS Secret, server-side applied (created the first time).
            ApplyAuditSecret => vec![need("", "secrets", "patch"), need("", "secrets", "create")],
            // The escalation check: the operator holds no Secret access in a namespace
            // it has not bound yet, so only `bind` lets it reference the ClusterRole.
            BindTenantSecrets => vec![
                need(RBAC, "rolebindings", "create"),
                need(RBAC, "clusterroles", "bind"),
            ],
            DeleteApiKeySecret => vec![need("", "secrets", "delete")],
            ApplyTrustBundle => vec![
                need("", "configmaps", "patch"),
                need("", "configmaps", "create"),
            ],
            GetConfigMap => vec![need("", "configmaps", "get")],
            ListConfigMaps => vec![need("", "configmaps", "list")],
            WatchConfigMaps => vec![need("", "configmaps", "watch")],
            ApplyNetworkPolicy => vec![
                need(NET, "networkpolicies", "patch"),
                need(NET, "networkpolicies", "create"),
            ],
            GetNetworkPolicy => vec![need(NET, "networkpolicies", "get")],
            ListNetworkPolicies => vec![need(NET, "networkpolicies", "list")],
            WatchNetworkPolicies => vec![need(NET, "networkpolicies", "watch")],
            DeleteNetworkPolicy => vec![need(NET, "networkpolicies", "delete")],
            GetPod => vec![need("", "pods", "get")],
            ListPods => vec![need("", "pods", "list")],
            WatchPods => vec![need("", "pods", "watch")],
            ListServices => vec![need("", "services", "list")],
            WatchServices => vec![need("", "services", "watch")],
            ApplyGeneratedRole => {
                let mut needs = rule_needs(&generated_rules());
                needs.extend([need(RBAC, "roles", "patch"), need(RBAC, "roles", "create")]);
                needs
            }
            ApplyGeneratedRoleBinding => {
                let mut needs = rule_needs(&generated_rules());
                needs.extend([
                    need(RBAC, "rolebindings", "patch"),
                    need(RBAC, "rolebindings", "create"),
                ]);
                needs
            }
            ListRbacRoles => vec![need(RBAC, "roles", "list")],
            WatchRbacRoles => vec![need(RBAC, "roles", "watch")],
            DeleteRbacRole => vec![need(RBAC, "roles", "delete")],
            ListRoleBindings => vec![need(RBAC, "rolebindings", "list")],
            WatchRoleBindings => vec![need(RBAC, "rolebindings", "watch")],
            DeleteRoleBinding => vec![need(RBAC, "rolebindings", "delete")],
            CreateTokenReview => vec![need("authentication.k8s.io", "tokenreviews", "create")],
            // The validating webhook asks whether a requester is a cluster admin.
            CreateSubjectAccessReview => vec![need(
                "authorization.k8s.io",
                "subjectaccessreviews",
                "create",
            )],
            CreateEvent => vec![need("events.k8s.io", "events", "create")],
            PatchEventSeries => vec![need("events.k8s.io", "events", "patch")],
            CreateLease => vec![need("coordination.k8s.io", "leases", "create")],
            GetLease => vec![need("coordination.k8s.io", "leases", "get")],
            RenewLease => vec![need("coordination.k8s.io", "leases", "update")],
            // Read each configuration, then apply its caBundle (the operator's
            // webhook::tls::rotation::patch_ca_bundles).
            PatchWebhookCaBundles => vec![
                need(WEBHOOKS, "mutatingwebhookconfigurations", "get"),
                need(WEBHOOKS, "mutatingwebhookconfigurations", "patch"),
                need(WEBHOOKS, "validatingwebhookconfigurations", "get"),
                need(WEBHOOKS, "validatingwebhookconfigurations", "patch"),
            ],
            GetCrd => vec![need(
                "apiextensions.k8s.io",
                "customresourcedefinitions",
                "get",
            )],
            ListCrds => vec![need(
                "apiextensions.k8s.io",
                "customresourcedefinitions",
                "list",
            )],
        }
    }

    /// Where the call happens: which chart roles can grant it.
    fn scope(self) -> Scope {
        use Probe::*;
        match self {
            GetApiKeySecret | ListSecrets | WatchSecrets | CreateApiKeySecret
            | ReplaceApiKeySecret | DeleteApiKeySecret => Scope::TenantNamespace,
            GetCaSecret | ListOwnSecrets | CreateOwnSecret | ReplaceOwnSecret
            | ApplyAuditSecret | CreateLease | GetLease | RenewLease => Scope::ReleaseNamespace,
            _ => Scope::Anywhere,
        }
    }

    /// The permissions this call needs, where it needs them.
    fn scoped_needs(self) -> Vec<(Scope, Need)> {
        self.needs()
            .into_iter()
            .map(|n| (self.scope(), n))
            .collect()
    }

    async fn run(self, cx: &Cx) -> ProbeResult {
        use Probe::*;
        let sa = cx.sa.clone();
        let admin = cx.admin.clone();
        let ns = cx.tenant_ns.as_str();
        let apply = PatchParams::apply("portcullis-e2e-probe").force();
        match self {
            ListTenants => list_one(Api::<Tenant>::all(sa)).await,
            WatchTenants => watch_once(Api::<Tenant>::all(sa), None).await,
            GetTenant => Api::<Tenant>::all(sa)
                .get(&cx.tenant)
                .await
                .map(drop)
                .map_err(Into::into),
            PatchTenantFinalizers => {
                // kube's finalizer helper: a JSON patch on metadata.finalizers. An
                // annotation keeps the Tenant deletable.
                Api::<Tenant>::all(sa)
                    .patch(&cx.tenant, &PatchParams::default(), &merge_annotation())
                    .await?;
                Ok(())
            }
            ApplyTenantStatus => {
                let status = json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
                                    "metadata": {"name": cx.tenant},
                                    "status": {"observedGeneration": 1}});
                Api::<Tenant>::all(sa)
                    .patch_status(&cx.tenant, &apply, &Patch::Apply(status))
                    .await?;
                Ok(())
            }
            ListRoles => list_one(Api::<Role>::all(sa)).await,
            WatchRoles => watch_once(Api::<Role>::all(sa), None).await,
            GetRole => Api::<Role>::namespaced(sa, ns)
                .get("probe")
                .await
                .map(drop)
                .map_err(Into::into),
            ApplyBuiltinRole => {
                let name = format!("builtin-{}", suffix());
                let role = json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "Role",
                                  "metadata": {"name": name, "namespace": ns},
                                  "spec": {"permissions": ["keys:read"]}});
                Api::<Role>::namespaced(sa, ns)
                    .patch(&name, &apply, &Patch::Apply(role))
                    .await?;
                Ok(())
            }
            DeleteRole => {
                let role: Role = serde_json::from_value(json!({
                    "apiVersion": "portcullis.dev/v1alpha1", "kind": "Role",
                    "metadata": {"generateName": "doomed-", "namespace": ns}, "spec": {}}))
                .map_err(anyhow::Error::from)?;
                let created = Api::<Role>::namespaced(admin, ns)
                    .create(&PostParams::default(), &role)
                    .await?;
                Api::<Role>::namespaced(sa, ns)
                    .delete(&created.name_any(), &DeleteParams::default())
                    .await?;
                Ok(())
            }
            ApplyRoleStatus => {
                let status = json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "Role",
                                    "metadata": {"name": "probe", "namespace": ns},
                                    "status": {"observedGeneration": 1}});
                Api::<Role>::namespaced(sa, ns)
                    .patch_status("probe", &apply, &Patch::Apply(status))
                    .await?;
                Ok(())
            }
            ListApiKeys => list_one(Api::<ApiKey>::all(sa)).await,
            WatchApiKeys => watch_once(Api::<ApiKey>::all(sa), None).await,
            GetApiKey => Api::<ApiKey>::namespaced(sa, ns)
                .get(&cx.apikey)
                .await
                .map(drop)
                .map_err(Into::into),
            MarkApiKey => {
                Api::<ApiKey>::namespaced(sa, ns)
                    .patch(&cx.apikey, &PatchParams::default(), &merge_annotation())
                    .await?;
                Ok(())
            }
            ApplyApiKeyStatus => {
                let status = json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
                                    "metadata": {"name": cx.apikey, "namespace": ns},
                                    "status": {"observedGeneration": 1}});
                Api::<ApiKey>::namespaced(sa, ns)
                    .patch_status(&cx.apikey, &apply, &Patch::Apply(status))
                    .await?;
                Ok(())
            }
            // Owner references with blockOwnerDeletion need update on <owner>/finalizers
            // where OwnerReferencesPermissionEnforcement runs (not in envtest's default
            // plugin set), so ask the authorizer what that plugin would.
            OwnerRefTenant => self.access_review(cx, "tenants", None).await,
            OwnerRefRole => self.access_review(cx, "roles", Some(ns)).await,
            OwnerRefApiKey => self.access_review(cx, "apikeys", Some(ns)).await,
            GetNamespace => Api::<Namespace>::all(sa)
                .get(ns)
                .await
                .map(drop)
                .map_err(Into::into),
            ListNamespaces => list_one(Api::<Namespace>::all(sa)).await,
            WatchNamespaces => watch_once(Api::<Namespace>::all(sa), None).await,
            LabelNamespace => {
                let patch = json!({"metadata": {"labels": {"portcullis.dev/tenant": cx.tenant}}});
                Api::<Namespace>::all(sa)
                    .patch(ns, &PatchParams::default(), &Patch::Merge(patch))
                    .await?;
                Ok(())
            }
            GetApiKeySecret => {
                Api::<Secret>::namespaced(sa, ns)
                    .get_opt(&format!("{}-key", cx.apikey))
                    .await?;
                Ok(())
            }
            ListSecrets => list_one(Api::<Secret>::namespaced(sa, ns)).await,
            WatchSecrets => watch_once(Api::<Secret>::namespaced(sa, ns), None).await,
            CreateApiKeySecret => {
                let secret = self.apikey_secret(cx, "probe-key-").await?;
                Api::<Secret>::namespaced(sa, ns)
                    .create(&PostParams::default(), &secret)
                    .await?;
                Ok(())
            }
            ReplaceApiKeySecret => {
                let secrets = Api::<Secret>::namespaced(admin, ns);
                let created = secrets
                    .create(
                        &PostParams::default(),
                        &self.apikey_secret(cx, "probe-key-").await?,
                    )
                    .await?;
                let mut replaced = created.clone();
                replaced.data = Some(BTreeMap::from([(
                    "token".into(),
                    ByteString(b"ak_rotated".to_vec()),
                )]));
                Api::<Secret>::namespaced(sa, ns)
                    .replace(&created.name_any(), &PostParams::default(), &replaced)
                    .await?;
                Ok(())
            }
            DeleteApiKeySecret => {
                let secrets = Api::<Secret>::namespaced(admin, ns);
                let created = secrets
                    .create(
                        &PostParams::default(),
                        &self.apikey_secret(cx, "probe-key-").await?,
                    )
                    .await?;
                Api::<Secret>::namespaced(sa, ns)
                    .delete(&created.name_any(), &DeleteParams::default())
                    .await?;
                Ok(())
            }
            GetCaSecret => {
                Api::<Secret>::namespaced(sa, &cx.release_ns)
                    .get("portcullis-ca-root")
                    .await?;
                Ok(())
            }
            ListOwnSecrets => list_one(Api::<Secret>::namespaced(sa, &cx.release_ns)).await,
            CreateOwnSecret => {
                let created = Api::<Secret>::namespaced(sa, &cx.release_ns)
                    .create(&PostParams::default(), &own_secret())
                    .await?;
                Api::<Secret>::namespaced(admin, &cx.release_ns)
                    .delete(&created.name_any(), &DeleteParams::default())
                    .await?;
                Ok(())
            }
            ReplaceOwnSecret => {
                let secrets = Api::<Secret>::namespaced(admin, &cx.release_ns);
                let created = secrets
                    .create(&PostParams::default(), &own_secret())
                    .await?;
                let mut replaced = created.clone();
                replaced.data = Some(BTreeMap::from([(
                    "key".into(),
                    ByteString(b"rotated".to_vec()),
                )]));
                let result = Api::<Secret>::namespaced(sa, &cx.release_ns)
                    .replace(&created.name_any(), &PostParams::default(), &replaced)
                    .await;
                secrets
                    .delete(&created.name_any(), &DeleteParams::default())
                    .await?;
                result?;
                Ok(())
            }
            ApplyAuditSecret => {
                let name = format!("portcullis-audit-probe-{}", suffix());
                let secret = json!({"apiVersion": "v1", "kind": "Secret",
                                    "metadata": {"name": name, "namespace": cx.release_ns},
                                    "type": "kubernetes.io/tls",
                                    "data": {"tls.crt": "", "tls.key": "", "ca.crt": ""}});
                let result = Api::<Secret>::namespaced(sa, &cx.release_ns)
                    .patch(
                        &name,
                        &PatchParams::apply(OPERATOR_FIELD_MANAGER).force(),
                        &Patch::Apply(secret),
                    )
                    .await;
                if result.is_ok() {
                    Api::<Secret>::namespaced(admin, &cx.release_ns)
                        .delete(&name, &DeleteParams::default())
                        .await?;
                }
                result?;
                Ok(())
            }
            BindTenantSecrets => {
                let created = Api::<RoleBinding>::namespaced(sa, &cx.unbound_ns)
                    .create(&PostParams::default(), &secrets_binding(cx))
                    .await?;
                Api::<RoleBinding>::namespaced(admin, &cx.unbound_ns)
                    .delete(&created.name_any(), &DeleteParams::default())
                    .await?;
                Ok(())
            }
            ApplyTrustBundle => {
                // A fresh name each time: the apply creates the ConfigMap, as in a new
                // tenant namespace.
                let name = format!("portcullis-trust-bundle-{}", suffix());
                let configmap = json!({"apiVersion": "v1", "kind": "ConfigMap",
                                       "metadata": {"name": name, "namespace": ns},
                                       "data": {"ca-bundle.crt": cx.ca_pem}});
                Api::<ConfigMap>::namespaced(sa, ns)
                    .patch(
                        &name,
                        &PatchParams::apply(OPERATOR_FIELD_MANAGER),
                        &Patch::Apply(configmap),
                    )
                    .await?;
                Ok(())
            }
            GetConfigMap => {
                Api::<ConfigMap>::namespaced(sa, ns)
                    .get_opt("portcullis-trust-bundle")
                    .await?;
                Ok(())
            }
            ListConfigMaps => list_one(Api::<ConfigMap>::all(sa)).await,
            WatchConfigMaps => watch_once(Api::<ConfigMap>::all(sa), None).await,
            ApplyNetworkPolicy => {
                // A fresh name each time: the apply creates it, as in a new namespace.
                let name = format!("portcullis-inbound-{}", suffix());
                Api::<NetworkPolicy>::namespaced(sa, ns)
                    .patch(
                        &name,
                        &PatchParams::apply(OPERATOR_FIELD_MANAGER),
                        &Patch::Apply(probe_network_policy(&name, ns)),
                    )
                    .await?;
                Ok(())
            }
            GetNetworkPolicy => {
                Api::<NetworkPolicy>::namespaced(sa, ns)
                    .get_opt("portcullis-inbound")
                    .await?;
                Ok(())
            }
            ListNetworkPolicies => list_one(Api::<NetworkPolicy>::all(sa)).await,
            WatchNetworkPolicies => watch_once(Api::<NetworkPolicy>::all(sa), None).await,
            DeleteNetworkPolicy => {
                let name = format!("doomed-{}", suffix());
                Api::<NetworkPolicy>::namespaced(admin, ns)
                    .patch(
                        &name,
                        &PatchParams::apply("portcullis-e2e-admin"),
                        &Patch::Apply(probe_network_policy(&name, ns)),
                    )
                    .await?;
                Api::<NetworkPolicy>::namespaced(sa, ns)
                    .delete(&name, &DeleteParams::default())
                    .await?;
                Ok(())
            }
            GetPod => {
                Api::<Pod>::namespaced(sa, ns)
                    .get_opt("no-such-pod")
                    .await?;
                Ok(())
            }
            ListPods => list_one(Api::<Pod>::all(sa)).await,
            WatchPods => watch_once(Api::<Pod>::all(sa), None).await,
            ListServices => list_one(Api::<k8s_openapi::api::core::v1::Service>::all(sa)).await,
            WatchServices => {
                watch_once(Api::<k8s_openapi::api::core::v1::Service>::all(sa), None).await
            }
            ApplyGeneratedRole => {
                let name = format!("portcullis:probe-{}", suffix());
                let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                                  "metadata": {"name": name, "namespace": ns},
                                  "rules": generated_rules()});
                Api::<RbacRole>::namespaced(sa, ns)
                    .patch(
                        &name,
                        &PatchParams::apply(OPERATOR_FIELD_MANAGER).force(),
                        &Patch::Apply(role),
                    )
                    .await?;
                Ok(())
            }
            ApplyGeneratedRoleBinding => {
                let name = format!("portcullis:probe-{}", suffix());
                let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                                     "metadata": {"name": name, "namespace": ns},
                                     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                 "name": cx.all_permissions_role},
                                     "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                                                   "name": "david@acme.com"}]});
                Api::<RoleBinding>::namespaced(sa, ns)
                    .patch(
                        &name,
                        &PatchParams::apply(OPERATOR_FIELD_MANAGER).force(),
                        &Patch::Apply(binding),
                    )
                    .await?;
                Ok(())
            }
            ListRbacRoles => list_one(Api::<RbacRole>::all(sa)).await,
            WatchRbacRoles => watch_once(Api::<RbacRole>::all(sa), None).await,
            DeleteRbacRole => {
                let roles = Api::<RbacRole>::namespaced(admin, ns);
                let created = roles
                    .create(&PostParams::default(), &empty_rbac_role())
                    .await?;
                Api::<RbacRole>::namespaced(sa, ns)
                    .delete(&created.name_any(), &DeleteParams::default())
                    .await?;
                Ok(())
            }
            ListRoleBindings => list_one(Api::<RoleBinding>::all(sa)).await,
            WatchRoleBindings => watch_once(Api::<RoleBinding>::all(sa), None).await,
            DeleteRoleBinding => {
                let bindings = Api::<RoleBinding>::namespaced(admin, ns);
                let created = bindings
                    .create(&PostParams::default(), &empty_binding(&cx.empty_role))
                    .await?;
                Api::<RoleBinding>::namespaced(sa, ns)
                    .delete(&created.name_any(), &DeleteParams::default())
                    .await?;
                Ok(())
            }
            CreateTokenReview => {
                let review = TokenReview {
                    spec: TokenReviewSpec {
                        token: Some("not-a-token".into()),
                        audiences: Some(vec!["portcullis.dev/identity".into()]),
                    },
                    ..TokenReview::default()
                };
                Api::<TokenReview>::all(sa)
                    .create(&PostParams::default(), &review)
                    .await?;
                Ok(())
            }
            CreateSubjectAccessReview => {
                let user = k8s_openapi::api::authentication::v1::UserInfo {
                    username: Some("kubernetes-admin".into()),
                    groups: Some(vec!["kubeadm:cluster-admins".into()]),
                    ..Default::default()
                };
                let review =
                    portcullis_operator::webhook::validate::lookup::portcullis_admin_review(&user);
                Api::<SubjectAccessReview>::all(sa)
                    .create(&PostParams::default(), &review)
                    .await?;
                Ok(())
            }
            CreateEvent => {
                Api::<Event>::namespaced(sa, ns)
                    .create(&PostParams::default(), &new_event(cx))
                    .await?;
                Ok(())
            }
            PatchEventSeries => {
                let created = Api::<Event>::namespaced(admin, ns)
                    .create(&PostParams::default(), &new_event(cx))
                    .await?;
                let series = json!({"series": {"count": 2, "lastObservedTime": now_micro()}});
                Api::<Event>::namespaced(sa, ns)
                    .patch(
                        &created.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(series),
                    )
                    .await?;
                Ok(())
            }
            CreateLease => {
                let lease: Lease = serde_json::from_value(json!({
                    "metadata": {"generateName": "portcullis-operator-probe-"},
                    "spec": {"holderIdentity": "probe", "leaseDurationSeconds": 15}}))
                .map_err(anyhow::Error::from)?;
                Api::<Lease>::namespaced(sa, &cx.release_ns)
                    .create(&PostParams::default(), &lease)
                    .await?;
                Ok(())
            }
            GetLease => {
                Api::<Lease>::namespaced(sa, &cx.release_ns)
                    .get("portcullis-operator")
                    .await?;
                Ok(())
            }
            RenewLease => {
                let current = Api::<Lease>::namespaced(admin, &cx.release_ns)
                    .get("portcullis-operator")
                    .await?;
                let mut renewed = current.clone();
                if let Some(spec) = renewed.spec.as_mut() {
                    spec.renew_time = Some(MicroTime(now()));
                }
                Api::<Lease>::namespaced(sa, &cx.release_ns)
                    .replace("portcullis-operator", &PostParams::default(), &renewed)
                    .await?;
                Ok(())
            }
            PatchWebhookCaBundles => patch_ca_bundles(&sa, &cx.release_ns, &cx.ca_pem)
                .await
                .map_err(|e| match e {
                    WebhookError::Kube(e) => e.into(),
                    other => ProbeError {
                        forbidden: false,
                        message: other.to_string(),
                    },
                }),
            GetCrd => {
                Api::<CustomResourceDefinition>::all(sa)
                    .get("tenants.portcullis.dev")
                    .await?;
                Ok(())
            }
            ListCrds => list_one(Api::<CustomResourceDefinition>::all(sa)).await,
        }
    }

    async fn access_review(self, cx: &Cx, resource: &str, namespace: Option<&str>) -> ProbeResult {
        let attributes = ResourceAttributes {
            group: Some("portcullis.dev".into()),
            resource: Some(resource.into()),
            subresource: Some("finalizers".into()),
            verb: Some("update".into()),
            namespace: namespace.map(str::to_owned),
            ..ResourceAttributes::default()
        };
        let allowed = authorizer_allows(&cx.admin, &cx.sa_user, &cx.sa_groups, attributes)
            .await
            .map_err(ProbeError::from)?;
        if allowed {
            Ok(())
        } else {
            Err(ProbeError {
                forbidden: true,
                message: format!("update {resource}/finalizers is not allowed"),
            })
        }
    }

    /// An ApiKey Secret as the operator writes it: owned by the ApiKey.
    async fn apikey_secret(self, cx: &Cx, prefix: &str) -> Result<Secret> {
        let key = Api::<ApiKey>::namespaced(cx.admin.clone(), &cx.tenant_ns)
            .get(&cx.apikey)
            .await?;
        let owner = OwnerReference {
            api_version: "portcullis.dev/v1alpha1".into(),
            kind: "ApiKey".into(),
            name: key.name_any(),
            uid: key.uid().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        Ok(Secret {
            metadata: ObjectMeta {
                generate_name: Some(prefix.into()),
                owner_references: Some(vec![owner]),
                ..ObjectMeta::default()
            },
            type_: Some("portcullis.dev/api-key".into()),
            data: Some(BTreeMap::from([(
                "token".into(),
                ByteString(b"ak_probe".to_vec()),
            )])),
            ..Secret::default()
        })
    }
}

fn now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

fn now_micro() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

fn empty_rbac_role() -> RbacRole {
    RbacRole {
        metadata: ObjectMeta {
            generate_name: Some("portcullis:probe-".into()),
            ..ObjectMeta::default()
        },
        rules: Some(Vec::new()),
    }
}

fn empty_binding(role: &str) -> RoleBinding {
    probe_binding(
        "portcullis:probe-",
        "Role",
        role,
        k8s_openapi::api::rbac::v1::Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "User".into(),
            name: "david@acme.com".into(),
            namespace: None,
        },
    )
}

/// A RoleBinding (name generated from `prefix`) of `role_kind` `role` to `subject`.
fn probe_binding(
    prefix: &str,
    role_kind: &str,
    role: &str,
    subject: k8s_openapi::api::rbac::v1::Subject,
) -> RoleBinding {
    RoleBinding {
        metadata: ObjectMeta {
            generate_name: Some(prefix.into()),
            ..ObjectMeta::default()
        },
        role_ref: k8s_openapi::api::rbac::v1::RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: role_kind.into(),
            name: role.into(),
        },
        subjects: Some(vec![subject]),
    }
}

/// A Secret in the operator's namespace, like its CA, KEK and DEK Secrets.
fn own_secret() -> Secret {
    Secret {
        metadata: ObjectMeta {
            generate_name: Some("portcullis-probe-".into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "key".into(),
            ByteString(b"probe".to_vec()),
        )])),
        ..Secret::default()
    }
}

/// A RoleBinding like the one the operator writes in a namespace a Tenant binds, for
/// another subject: the probe's bindings must not give the operator's account access
/// to the namespace (it would then pass the escalation check without `bind`).
fn secrets_binding(cx: &Cx) -> RoleBinding {
    probe_binding(
        "portcullis-operator-secrets-",
        "ClusterRole",
        TENANT_SECRETS_ROLE,
        k8s_openapi::api::rbac::v1::Subject {
            api_group: None,
            kind: "ServiceAccount".into(),
            name: "portcullis-probe".into(),
            namespace: Some(cx.release_ns.clone()),
        },
    )
}

fn regarding(cx: &Cx) -> ObjectReference {
    ObjectReference {
        api_version: Some("portcullis.dev/v1alpha1".into()),
        kind: Some("ApiKey".into()),
        name: Some(cx.apikey.clone()),
        namespace: Some(cx.tenant_ns.clone()),
        ..ObjectReference::default()
    }
}

fn new_event(cx: &Cx) -> Event {
    Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", cx.apikey)),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now())),
        regarding: Some(regarding(cx)),
        reason: Some("Issued".into()),
        action: Some("Issued".into()),
        note: Some("probe".into()),
        type_: Some("Normal".into()),
        reporting_controller: Some("portcullis-operator".into()),
        reporting_instance: Some("probe".into()),
        ..Event::default()
    }
}

/// Admin-side setup of the probes' objects: a tenant namespace, a Tenant, a Role and
/// an ApiKey in it, the Lease, an all-permissions and an empty RBAC Role.
async fn probe_context(env: &EnvTest, release: &Release) -> Result<Cx> {
    let admin = env.client()?;
    let tenant_ns = env.create_namespace("rbac-tenant").await?;
    let unbound_ns = env.create_namespace("rbac-unbound").await?;
    let tenant = format!("rbac-{}", suffix());
    let tenant_object: Tenant = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": tenant}, "spec": {"namespaces": [tenant_ns],
        "scopes": {"identify": [{"methods": ["POST"], "path": "/v1/identify"}]}}}))?;
    Api::<Tenant>::all(admin.clone())
        .create(&PostParams::default(), &tenant_object)
        .await?;
    let role: Role = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Role",
        "metadata": {"name": "probe", "namespace": tenant_ns}, "spec": {"permissions": ["keys:read"]}}))?;
    Api::<Role>::namespaced(admin.clone(), &tenant_ns)
        .create(&PostParams::default(), &role)
        .await?;
    let key: ApiKey = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": "probe", "namespace": tenant_ns},
        "spec": {"role": "Developer", "scopes": ["identify"]}}))?;
    Api::<ApiKey>::namespaced(admin.clone(), &tenant_ns)
        .create(&PostParams::default(), &key)
        .await?;

    let leases: Api<Lease> = Api::namespaced(admin.clone(), &release.namespace);
    if leases.get_opt("portcullis-operator").await?.is_none() {
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": "portcullis-operator"},
            "spec": {"holderIdentity": "", "leaseDurationSeconds": 15}}))?;
        leases.create(&PostParams::default(), &lease).await?;
    }
    // What the operator binds once the Tenant holds the namespace (no operator runs here).
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "portcullis-operator-secrets", "namespace": tenant_ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": TENANT_SECRETS_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": release.service_account,
                      "namespace": release.namespace}]});
    Api::<RoleBinding>::namespaced(admin.clone(), &tenant_ns)
        .create(&PostParams::default(), &serde_json::from_value(binding)?)
        .await?;
    let roles: Api<RbacRole> = Api::namespaced(admin.clone(), &tenant_ns);
    let all = roles
        .create(
            &PostParams::default(),
            &RbacRole {
                metadata: ObjectMeta {
                    generate_name: Some("portcullis:all-".into()),
                    ..ObjectMeta::default()
                },
                rules: Some(generated_rules()),
            },
        )
        .await?;
    let empty = roles
        .create(&PostParams::default(), &empty_rbac_role())
        .await?;
    Ok(Cx {
        admin,
        sa: release.client(env)?,
        sa_user: release.user(),
        sa_groups: release.groups(),
        release_ns: release.namespace.clone(),
        tenant_ns,
        unbound_ns,
        tenant,
        apikey: "probe".into(),
        all_permissions_role: all.name_any(),
        empty_role: empty.name_any(),
        ca_pem: env.serving_ca_pem().to_owned(),
    })
}

/// Whether `rule` grants `need` (resourceNames aside: the probes use the names allowed).
fn grants(rule: &PolicyRule, (group, resource, verb): &Need) -> bool {
    rule.api_groups.iter().flatten().any(|g| g == group)
        && rule.resources.iter().flatten().any(|r| r == resource)
        && rule.verbs.iter().any(|v| v == verb)
}

/// Where a call happens, as far as the chart's roles are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    /// Cluster-scoped, or in any namespace: only the cluster-wide binding grants it.
    Anywhere,
    /// The release namespace (the operator's own Secrets, its Lease).
    ReleaseNamespace,
    /// A namespace a Tenant holds (ApiKey Secrets).
    TenantNamespace,
}

/// Where a chart role is bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reach {
    /// The ClusterRole, bound cluster-wide by the chart.
    Everywhere,
    /// The Role in the release namespace.
    ReleaseNamespace,
    /// The tenant-secrets ClusterRole, bound by the operator per tenant namespace.
    TenantNamespaces,
}

impl Reach {
    fn reaches(self, scope: Scope) -> bool {
        match self {
            Self::Everywhere => true,
            Self::ReleaseNamespace => scope == Scope::ReleaseNamespace,
            Self::TenantNamespaces => scope == Scope::TenantNamespace,
        }
    }
}

/// One of the chart's roles as installed.
#[derive(Clone, Debug)]
struct ChartRole {
    name: String,
    /// `None` for a ClusterRole.
    namespace: Option<String>,
    reach: Reach,
    rules: Vec<PolicyRule>,
}

impl ChartRole {
    fn label(&self) -> String {
        match &self.namespace {
            None => format!("ClusterRole {}", self.name),
            Some(ns) => format!("Role {ns}/{}", self.name),
        }
    }

    /// Replaces the role's rules, as `kubectl apply` of an edited rendering would.
    async fn set_rules(&self, admin: &Client, rules: Vec<PolicyRule>) -> Result<()> {
        let params = PostParams::default();
        match &self.namespace {
            None => {
                let api: Api<ClusterRole> = Api::all(admin.clone());
                let mut edited = api.get(&self.name).await?;
                edited.rules = Some(rules);
                api.replace(&self.name, &params, &edited).await?;
            }
            Some(ns) => {
                let api: Api<RbacRole> = Api::namespaced(admin.clone(), ns);
                let mut edited = api.get(&self.name).await?;
                edited.rules = Some(rules);
                api.replace(&self.name, &params, &edited).await?;
            }
        }
        Ok(())
    }
}

/// Whether `rule` of a role bound as `reach` grants `need` where the call happens.
fn covers(reach: Reach, rule: &PolicyRule, (scope, need): &(Scope, Need)) -> bool {
    reach.reaches(*scope) && grants(rule, need)
}

/// The chart's roles as installed: the cluster-wide ClusterRole, the release
/// namespace's Role, and the tenant-secrets ClusterRole.
async fn installed_roles(admin: &Client, release: &Release) -> Result<Vec<ChartRole>> {
    let cluster_roles: Api<ClusterRole> = Api::all(admin.clone());
    let cluster_role = cluster_roles.get("portcullis-operator").await?;
    let tenant_secrets = cluster_roles.get(TENANT_SECRETS_ROLE).await?;
    let role = Api::<RbacRole>::namespaced(admin.clone(), &release.namespace)
        .get("portcullis-operator")
        .await?;
    Ok(vec![
        ChartRole {
            name: cluster_role.name_any(),
            namespace: None,
            reach: Reach::Everywhere,
            rules: cluster_role.rules.unwrap_or_default(),
        },
        ChartRole {
            name: role.name_any(),
            namespace: Some(release.namespace.clone()),
            reach: Reach::ReleaseNamespace,
            rules: role.rules.unwrap_or_default(),
        },
        ChartRole {
            name: tenant_secrets.name_any(),
            namespace: None,
            reach: Reach::TenantNamespaces,
            rules: tenant_secrets.rules.unwrap_or_default(),
        },
    ])
}

#[tokio::test]
async fn chart_rbac_allows_every_operator_call() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let Some((env, release)) = release().await? else {
        return Ok(());
    };
    let cx = probe_context(env, release).await?;

    let mut failures = Vec::new();
    for probe in Probe::ALL {
        if let Err(e) = probe.run(&cx).await {
            failures.push(format!("{probe:?}: {}", e.message));
        }
    }
    assert!(
        failures.is_empty(),
        "the chart's RBAC refuses operator calls:\n  {}",
        failures.join("\n  ")
    );

    // Least privilege at the verb level: every verb the chart grants is used by a call
    // where the role is bound.
    let roles = installed_roles(&cx.admin, release).await?;
    let used: BTreeSet<(Scope, Need)> = Probe::ALL.iter().flat_map(|p| p.scoped_needs()).collect();
    let mut unused = Vec::new();
    for role in &roles {
        for n in rule_needs(&role.rules) {
            if !used
                .iter()
                .any(|(scope, u)| *u == n && role.reach.reaches(*scope))
            {
                unused.push(format!("{}: {n:?}", role.label()));
            }
        }
    }
    assert!(
        unused.is_empty(),
        "the chart grants verbs no operator call uses: {unused:?}"
    );
    let ungranted: Vec<&(Scope, Need)> = used
        .iter()
        .filter(|n| {
            !roles
                .iter()
                .any(|role| role.rules.iter().any(|r| covers(role.reach, r, n)))
        })
        .collect();
    assert!(
        ungranted.is_empty(),
        "calls need permissions the chart does not grant: {ungranted:?}"
    );

    // Names restrict the webhook rules: another configuration is out of reach.
    let other: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": format!("someone-else-{}", suffix())}, "webhooks": []}))?;
    let other = Api::<MutatingWebhookConfiguration>::all(cx.admin.clone())
        .create(&PostParams::default(), &other)
        .await?;
    let denied = Api::<MutatingWebhookConfiguration>::all(cx.sa.clone())
        .patch(
            &other.name_any(),
            &PatchParams::default(),
            &merge_annotation(),
        )
        .await;
    assert!(
        matches!(&denied, Err(kube::Error::Api(s)) if s.code == 403),
        "the operator may patch a webhook configuration that is not its own: {denied:?}"
    );
    Api::<MutatingWebhookConfiguration>::all(cx.admin.clone())
        .delete(&other.name_any(), &DeleteParams::default())
        .await?;
    Ok(())
}

/// Runs `probe` until it is refused with 403 (RBAC caches update within moments).
async fn until_forbidden(probe: Probe, cx: &Cx) -> std::result::Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match probe.run(cx).await {
            Err(e) if e.forbidden => return Ok(()),
            other => {
                if Instant::now() >= deadline {
                    return Err(format!("{probe:?} still not refused: {other:?}"));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn until_allowed(probe: Probe, cx: &Cx) -> Result<()> {
    eventually(
        &format!("{probe:?} allowed again"),
        Duration::from_secs(10),
        || async {
            match probe.run(cx).await {
                Ok(()) => Ok(Some(())),
                Err(e) => bail!("{}", e.message),
            }
        },
    )
    .await
}

#[tokio::test]
async fn removing_any_chart_rbac_rule_denies_an_operator_call() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let Some((env, release)) = release().await? else {
        return Ok(());
    };
    let cx = probe_context(env, release).await?;
    let roles = installed_roles(&cx.admin, release).await?;

    let result = async {
        let mut report = Vec::new();
        for (role_index, role) in roles.iter().enumerate() {
            for index in 0..role.rules.len() {
                let mut rest = role.rules.clone();
                let removed = rest.remove(index);
                // Every rule still in place, with where its role is bound.
                let remaining: Vec<(Reach, &PolicyRule)> = roles
                    .iter()
                    .enumerate()
                    .flat_map(|(i, r)| {
                        r.rules
                            .iter()
                            .enumerate()
                            .filter(move |(j, _)| (i, *j) != (role_index, index))
                            .map(move |(_, rule)| (r.reach, rule))
                    })
                    .collect();
                // The calls that have lost a permission no other rule grants there.
                let affected: Vec<Probe> = Probe::ALL
                    .into_iter()
                    .filter(|p| {
                        p.scoped_needs().iter().any(|n| {
                            covers(role.reach, &removed, n)
                                && !remaining.iter().any(|(reach, r)| covers(*reach, r, n))
                        })
                    })
                    .collect();
                let label = format!(
                    "{} rule {:?} {:?} {:?}",
                    role.label(),
                    removed.api_groups.clone().unwrap_or_default(),
                    removed.resources.clone().unwrap_or_default(),
                    removed.verbs
                );
                ensure!(
                    !affected.is_empty(),
                    "{label} is not needed by any operator call"
                );

                role.set_rules(&cx.admin, rest).await?;
                for probe in &affected {
                    if let Err(e) = until_forbidden(*probe, &cx).await {
                        bail!("without {label}: {e}");
                    }
                }
                // Restore and wait until the calls are allowed again.
                role.set_rules(&cx.admin, role.rules.clone()).await?;
                for probe in &affected {
                    until_allowed(*probe, &cx).await?;
                }
                report.push(format!("{label}: 403 for {affected:?}"));
            }
        }
        Ok(report)
    }
    .await;

    // Whatever happened, leave the chart's RBAC as installed.
    for role in &roles {
        role.set_rules(&cx.admin, role.rules.clone()).await?;
    }

    for line in result? {
        eprintln!("{line}");
    }
    Ok(())
}
