//! The operator against a real API server (envtest): Tenant, Role and ApiKey controllers,
//! the policy watch, and leader election between two replicas.
//!
//! Each test starts its own operator replica(s) in this process and stops them at the
//! end; a lock runs the tests one at a time, because every replica reconciles every
//! object of the shared control plane. Every test skips (prints why, passes) when
//! `KUBEBUILDER_ASSETS` is not set.

use portcullis_e2e::wait::{eventually, unique};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role as RbacRole, RoleBinding};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource};
use portcullis_crds::{
    ApiKey, ApiToken, KeyState, PolicyBundle, Role, Tenant, conditions, tenant::TENANT_LABEL,
};
use portcullis_e2e::envtest::{self, EnvTest};
use portcullis_operator::dek::{self, DekRing};
use portcullis_operator::run::{self, OperatorSettings, RunningOperator};
use serde_json::json;
use tokio::sync::{Mutex, MutexGuard};

const OPERATOR_NS: &str = "portcullis-system";
const WAIT: Duration = Duration::from_secs(30);

static SERIAL: Mutex<()> = Mutex::const_new(());

struct Harness {
    env: &'static EnvTest,
    client: Client,
    _serial: MutexGuard<'static, ()>,
}

/// The shared control plane with CRDs and the operator namespace, and the test lock.
async fn harness() -> Result<Option<Harness>> {
    let Some(env) = envtest::shared().await? else {
        return Ok(None);
    };
    let serial = SERIAL.lock().await;
    env.install_crds().await?;
    let client = env.client()?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(OPERATOR_NS).await?.is_none() {
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": OPERATOR_NS}}))?;
        match namespaces.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(Harness {
        env,
        client,
        _serial: serial,
    }))
}

/// Settings for an in-process replica: loopback ports, fast leases and retries,
/// cheap bcrypt.
fn settings(identity: &str) -> OperatorSettings {
    let mut s = OperatorSettings::new(OPERATOR_NS, identity);
    s.metrics_addr = ([127, 0, 0, 1], 0).into();
    s.policy_addr = ([127, 0, 0, 1], 0).into();
    s.identity_addr = ([127, 0, 0, 1], 0).into();
    // These tests read the policy over plain HTTP; mTLS is covered by the CA's tests.
    s.policy_insecure_debug = true;
    s.webhooks = None;
    s.reconcile.hash_cost = 4;
    s.reconcile.backoff_base = Duration::from_millis(200);
    s.reconcile.backoff_max = Duration::from_secs(3);
    s.lease.lease_duration = Duration::from_secs(4);
    s.lease.renew_deadline = Duration::from_secs(3);
    s.lease.retry_period = Duration::from_millis(300);
    s
}

async fn start_operator(h: &Harness, identity: &str) -> Result<RunningOperator> {
    let operator = run::start(h.env.client()?, settings(identity)).await?;
    eventually("the replica to lead", WAIT, || async {
        Ok(operator.is_leader().then_some(()))
    })
    .await?;
    Ok(operator)
}

async fn create_tenant(client: &Client, name: &str, namespaces: &[&str]) -> Result<Tenant> {
    let tenant: Tenant = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": name},
        "spec": {
            "namespaces": namespaces,
            "dataClassification": "Confidential",
            "scopes": {
                "identify": [{"methods": ["POST"], "path": "/v1/identify"}],
                "events": [{"methods": ["GET", "POST"], "path": "/v1/events/*"}]
            },
            "encryption": {"dekRotation": "7d"}
        }
    }))?;
    Ok(Api::<Tenant>::all(client.clone())
        .create(&PostParams::default(), &tenant)
        .await?)
}

async fn ready_tenant(client: &Client, name: &str) -> Result<Tenant> {
    let api: Api<Tenant> = Api::all(client.clone());
    eventually(&format!("tenant {name} Ready"), WAIT, || async {
        let t = api.get(name).await?;
        let ready = t
            .status
            .as_ref()
            .is_some_and(|s| conditions::is_ready(&s.conditions));
        Ok(ready.then_some(t))
    })
    .await
}

/// A namespace bound to a new Ready tenant.
async fn tenant_with_namespace(h: &Harness, prefix: &str) -> Result<(String, String)> {
    let ns = h.env.create_namespace(prefix).await?;
    let tenant = unique(prefix);
    create_tenant(&h.client, &tenant, &[&ns]).await?;
    ready_tenant(&h.client, &tenant).await?;
    Ok((tenant, ns))
}

async fn create_key(
    client: &Client,
    ns: &str,
    name: &str,
    spec: serde_json::Value,
) -> Result<ApiKey> {
    let key: ApiKey = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec
    }))?;
    Ok(Api::<ApiKey>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &key)
        .await?)
}

async fn key_where(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    pred: impl Fn(&ApiKey) -> bool,
) -> Result<ApiKey> {
    let api: Api<ApiKey> = Api::namespaced(client.clone(), ns);
    eventually(&format!("ApiKey {name}: {what}"), WAIT, || async {
        let k = api.get(name).await?;
        Ok(pred(&k).then_some(k))
    })
    .await
}

fn state(k: &ApiKey) -> KeyState {
    k.status.as_ref().map(|s| s.state).unwrap_or_default()
}

fn ready_reason(
    conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> (String, String, String) {
    conditions::find_ready(conds)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

async fn secret_token(client: &Client, ns: &str, name: &str) -> Result<(Secret, ApiToken)> {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(&portcullis_crds::apikey::secret_name(name))
        .await?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get("token"))
        .map(|b| b.0.clone())
        .context("Secret has no token")?;
    let token = ApiToken::parse(std::str::from_utf8(&bytes)?)?;
    Ok((secret, token))
}

async fn patch_key(client: &Client, ns: &str, name: &str, spec: serde_json::Value) -> Result<()> {
    Api::<ApiKey>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": spec})),
        )
        .await?;
    Ok(())
}

#[tokio::test]
async fn tenant_binds_namespaces_with_builtin_roles_rbac_and_a_wrapped_dek() -> Result<()> {
    let Some(h) = harness().await? else {
        return Ok(());
    };
    let operator = start_operator(&h, "tenant-test").await?;
    let ns_a = h.env.create_namespace("bind-a").await?;
    let ns_b = h.env.create_namespace("bind-b").await?;
    let name = unique("acme");
    create_tenant(&h.client, &name, &[&ns_a, &ns_b]).await?;
    let tenant = ready_tenant(&h.client, &name).await?;
    let status = tenant.status.clone().unwrap_or_default();
    let mut expected = vec![ns_a.clone(), ns_b.clone()];
    expected.sort();
    assert_eq!(status.namespaces, expected);
    assert_eq!(status.active_dek_version, Some(1));
    assert_eq!(status.observed_generation, tenant.metadata.generation);
    assert!(
        tenant
            .metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == "portcullis.dev/tenant-cleanup")
    );

    for ns in [&ns_a, &ns_b] {
        let namespace = Api::<Namespace>::all(h.client.clone()).get(ns).await?;
        assert_eq!(
            namespace
                .metadata
                .labels
                .unwrap_or_default()
                .get(TENANT_LABEL),
            Some(&name)
        );
        let roles = Api::<Role>::namespaced(h.client.clone(), ns);
        for builtin in ["owner", "admin", "developer", "analyst", "viewer"] {
            let role = eventually(
                &format!("built-in role {builtin} in {ns}"),
                WAIT,
                || async { Ok(roles.get_opt(builtin).await?) },
            )
            .await?;
            let owner = role.metadata.owner_references.unwrap_or_default();
            assert!(
                owner
                    .iter()
                    .any(|o| o.kind == "Tenant" && Some(&o.uid) == tenant.metadata.uid.as_ref())
            );
            // The Role controller resolves it and emits RBAC.
            let rbac = eventually(&format!("RBAC for {builtin}"), WAIT, || async {
                Ok(Api::<RbacRole>::namespaced(h.client.clone(), ns)
                    .get_opt(&format!("portcullis:{builtin}"))
                    .await?)
            })
            .await?;
            let verbs: BTreeSet<String> = rbac
                .rules
                .unwrap_or_default()
                .into_iter()
                .flat_map(|r| r.verbs)
                .collect();
            assert!(verbs.contains("get"), "{builtin}: {verbs:?}");
        }
        let owner = key_role_status(&h.client, ns, "owner").await?;
        assert_eq!(owner.len(), 7, "Owner holds every permission: {owner:?}");
    }

    // The DEK: a Secret in the operator namespace, v1 wrapped under the KEK.
    let secret = Api::<Secret>::namespaced(h.client.clone(), OPERATOR_NS)
        .get(&dek::secret_name(&name))
        .await?;
    let ring = DekRing::from_secret_parts(
        &name,
        &secret.data.clone().unwrap_or_default(),
        &secret.metadata.annotations.clone().unwrap_or_default(),
    )
    .map_err(anyhow::Error::msg)?;
    assert_eq!(ring.versions(), vec![1]);
    let kek =
        portcullis_operator::envelope::load_or_create_kek(h.client.clone(), OPERATOR_NS).await?;
    assert_eq!(ring.unwrap_version(&kek, 1)?.len(), dek::DEK_LEN);
    assert!(
        secret
            .data
            .unwrap_or_default()
            .get("v1")
            .is_some_and(|w| w.0.len() > dek::DEK_LEN)
    );

    // Events about the (cluster-scoped) Tenant land in kube-system.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(h.client.clone(), "kube-system");
    eventually("Tenant events", WAIT, || async {
        let reasons: BTreeSet<String> = events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str()))
            .filter_map(|e| e.reason)
            .collect();
        Ok((reasons.contains("DekCreated") && reasons.contains("NamespaceBound")).then_some(()))
    })
    .await?;
    operator.stop().await;
    Ok(())
}

async fn key_role_status(client: &Client, ns: &str, role: &str) -> Result<Vec<String>> {
    let roles = Api::<Role>::namespaced(client.clone(), ns);
    eventually(&format!("role {role} resolved"), WAIT, || async {
        let r = roles.get(role).await?;
        let status = r.status.unwrap_or_default();
        Ok(conditions::is_ready(&status.conditions).then(|| {
            status
                .effective_permissions
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect()
        }))
    })
    .await
}

#[tokio::test]
async fn api_key_is_issued_into_its_secret_and_rotated_with_overlap() -> Result<()> {
    let Some(h) = harness().await? else {
        return Ok(());
    };
    let operator = start_operator(&h, "issue-test").await?;
    let (_, ns) = tenant_with_namespace(&h, "keys").await?;
    create_key(
        &h.client,
        &ns,
        "ingest",
        json!({"role": "Developer", "scopes": ["identify", "events"]}),
    )
    .await?;
    let key = key_where(&h.client, &ns, "ingest", "Active", |k| {
        state(k) == KeyState::Active
    })
    .await?;
    let status = key.status.clone().unwrap_or_default();
    let (secret, token) = secret_token(&h.client, &ns, "ingest").await?;
    assert_eq!(secret.type_.as_deref(), Some("portcullis.dev/api-key"));
    assert_eq!(status.key_id.as_deref(), Some(token.key_id().as_str()));
    assert!(
        token.verify(status.hash.as_deref().unwrap_or_default()),
        "Secret token matches status hash"
    );
    assert!(
        secret
            .metadata
            .owner_references
            .unwrap_or_default()
            .iter()
            .any(|o| o.kind == "ApiKey")
    );
    assert_eq!(ready_reason(&status.conditions).0, "True");
    assert!(status.expires_at.is_some() && status.issued_at.is_some());

    patch_key(&h.client, &ns, "ingest", json!({"rotate": 1})).await?;
    let rotated = key_where(&h.client, &ns, "ingest", "rotated", |k| {
        k.status
            .as_ref()
            .is_some_and(|s| s.rotation == 1 && s.key_id != status.key_id)
    })
    .await?;
    let new_status = rotated.status.unwrap_or_default();
    let (_, new_token) = secret_token(&h.client, &ns, "ingest").await?;
    assert!(new_token.verify(new_status.hash.as_deref().unwrap_or_default()));
    let retired = new_status
        .previous_keys
        .first()
        .context("previous key kept for the overlap")?;
    assert_eq!(Some(&retired.key_id), status.key_id.as_ref());
    assert!(
        token.verify(&retired.hash),
        "the old token is still accepted during the overlap"
    );
    let overlap = retired.valid_until.0.duration_since(jiff::Timestamp::now());
    assert!(
        overlap > jiff::SignedDuration::from_mins(55),
        "default overlap 1h: {overlap:?}"
    );
    operator.stop().await;
    Ok(())
}

#[tokio::test]
async fn api_key_expires_and_is_revoked() -> Result<()> {
    let Some(h) = harness().await? else {
        return Ok(());
    };
    let operator = start_operator(&h, "expiry-test").await?;
    let (_, ns) = tenant_with_namespace(&h, "expiry").await?;
    create_key(
        &h.client,
        &ns,
        "short",
        json!({"role": "Developer", "scopes": ["identify"], "expiresAfter": "3s"}),
    )
    .await?;
    create_key(
        &h.client,
        &ns,
        "doomed",
        json!({"role": "Developer", "scopes": ["events"]}),
    )
    .await?;
    key_where(&h.client, &ns, "short", "Active", |k| {
        state(k) == KeyState::Active
    })
    .await?;
    let issued = Instant::now();
    let expired = key_where(&h.client, &ns, "short", "Expired", |k| {
        state(k) == KeyState::Expired
    })
    .await?;
    assert!(
        issued.elapsed() < Duration::from_secs(10),
        "expired at its time: {:?}",
        issued.elapsed()
    );
    let (s, reason, _) = ready_reason(&expired.status.unwrap_or_default().conditions);
    assert_eq!((s.as_str(), reason.as_str()), ("False", "Expired"));

    key_where(&h.client, &ns, "doomed", "Active", |k| {
        state(k) == KeyState::Active
    })
    .await?;
    patch_key(&h.client, &ns, "doomed", json!({"revoked": true})).await?;
    let revoked = key_where(&h.client, &ns, "doomed", "Revoked", |k| {
        state(k) == KeyState::Revoked
    })
    .await?;
    let (s, reason, _) = ready_reason(&revoked.status.unwrap_or_default().conditions);
    assert_eq!((s.as_str(), reason.as_str()), ("False", "Revoked"));

    // Scope not granted by the role: refused with the scope named.
    create_key(
        &h.client,
        &ns,
        "greedy",
        json!({"role": "Viewer", "scopes": ["identify"]}),
    )
    .await?;
    let invalid = key_where(&h.client, &ns, "greedy", "Invalid", |k| {
        state(k) == KeyState::Invalid
    })
    .await?;
    let (_, reason, message) = ready_reason(&invalid.status.unwrap_or_default().conditions);
    assert_eq!(reason, "ScopeNotInRole");
    assert!(message.contains("identify"), "{message}");
    operator.stop().await;
    Ok(())
}

#[tokio::test]
async fn deleted_secret_rotates_the_key_and_deleted_key_loses_its_secret() -> Result<()> {
    let Some(h) = harness().await? else {
        return Ok(());
    };
    let operator = start_operator(&h, "secret-test").await?;
    let (_, ns) = tenant_with_namespace(&h, "secret").await?;
    create_key(
        &h.client,
        &ns,
        "ingest",
        json!({"role": "Developer", "scopes": ["identify"]}),
    )
    .await?;
    let key = key_where(&h.client, &ns, "ingest", "Active", |k| {
        state(k) == KeyState::Active
    })
    .await?;
    let old_id = key.status.and_then(|s| s.key_id);
    let secrets: Api<Secret> = Api::namespaced(h.client.clone(), &ns);
    secrets
        .delete("ingest-key", &DeleteParams::default())
        .await?;
    let rotated = key_where(
        &h.client,
        &ns,
        "ingest",
        "rotated after Secret deletion",
        |k| {
            k.status
                .as_ref()
                .is_some_and(|s| s.key_id != old_id && s.state == KeyState::Active)
        },
    )
    .await?;
    let (_, _, message) = ready_reason(&rotated.status.clone().unwrap_or_default().conditions);
    assert!(message.contains("was deleted"), "{message}");
    let (_, token) = secret_token(&h.client, &ns, "ingest").await?;
    assert!(
        token.verify(
            rotated
                .status
                .and_then(|s| s.hash)
                .as_deref()
                .unwrap_or_default()
        )
    );

    let (secret, _) = secret_token(&h.client, &ns, "ingest").await?;
    let owners = secret.metadata.owner_references.unwrap_or_default();
    assert!(
        owners
            .iter()
            .any(|o| o.kind == "ApiKey" && o.name == "ingest" && o.controller == Some(true))
    );
    Api::<ApiKey>::namespaced(h.client.clone(), &ns)
        .delete("ingest", &DeleteParams::default())
        .await?;
    if h.env.has_controller_manager() {
        // The garbage collector picks up new CRD kinds on its next discovery (≤ 30 s).
        eventually(
            "the Secret to be garbage-collected",
            Duration::from_secs(90),
            || async { Ok(secrets.get_opt("ingest-key").await?.is_none().then_some(())) },
        )
        .await?;
    } else {
        eprintln!(
            "no kube-controller-manager: checked the ownerReference instead of garbage collection"
        );
    }
    operator.stop().await;
    Ok(())
}

#[tokio::test]
async fn restricted_tenant_loses_the_plaintext_once_delivery_is_acknowledged() -> Result<()> {
    let Some(h) = harness().await? else {
        return Ok(());
    };
    let operator = start_operator(&h, "restricted-test").await?;
    let ns = h.env.create_namespace("restricted").await?;
    let name = unique("vault");
    let tenant: Tenant = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": name},
        "spec": {
            "namespaces": [ns], "dataClassification": "Restricted",
            "scopes": {"identify": [{"methods": ["POST"], "path": "/v1/identify"}]}
        }
    }))?;
    Api::<Tenant>::all(h.client.clone())
        .create(&PostParams::default(), &tenant)
        .await?;
    ready_tenant(&h.client, &name).await?;
    create_key(
        &h.client,
        &ns,
        "ingest",
        json!({"role": "Developer", "scopes": ["identify"]}),
    )
    .await?;
    let key = key_where(&h.client, &ns, "ingest", "Active", |k| {
        state(k) == KeyState::Active
    })
    .await?;
    let key_id = key.status.and_then(|s| s.key_id);
    // Not delivered yet: the Secret stays.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, token) = secret_token(&h.client, &ns, "ingest").await?;
    let secrets: Api<Secret> = Api::namespaced(h.client.clone(), &ns);
    // What `kubectl portcullis keys get` does once it has shown the token.
    let ack = json!({"metadata": {"annotations": {"portcullis.dev/delivered": "true"}}});
    secrets
        .patch("ingest-key", &PatchParams::default(), &Patch::Merge(&ack))
        .await?;
    eventually("the plaintext Secret to be removed", WAIT, || async {
        Ok(secrets.get_opt("ingest-key").await?.is_none().then_some(()))
    })
    .await?;
    let delivered = key_where(&h.client, &ns, "ingest", "Delivered", |k| {
        k.status
            .as_ref()
            .is_some_and(|s| ready_reason(&s.conditions).1 == "Delivered")
    })
    .await?;
    let status = delivered.status.unwrap_or_default();
    assert_eq!(status.state, KeyState::Active);
    assert_eq!(
        status.key_id, key_id,
        "removal on purpose is not a reason to rotate"
    );
    assert!(token.verify(status.hash.as_deref().unwrap_or_default()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        secrets.get_opt("ingest-key").await?.is_none(),
        "not re-created"
    );
    operator.stop().await;
    Ok(())
}

#[tokio::test]
async fn role_inheritance_emits_rbac_and_cycles_are_reported() -> Result<()> {
    let Some(h) = harness().await? else {
        return Ok(());
    };
    let operator = start_operator(&h, "role-test").await?;
    let (_, ns) = tenant_with_namespace(&h, "roles").await?;
    let roles = Api::<Role>::namespaced(h.client.clone(), &ns);
    let role = |name: &str, spec: serde_json::Value| -> Result<Role> {
        Ok(serde_json::from_value(json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "Role",
            "metadata": {"name": name, "namespace": ns}, "spec": spec
        }))?)
    };
    let pp = PostParams::default();
    roles
        .create(
            &pp,
            &role(
                "data-engineer",
                json!({
                    "inherits": ["Developer"],
                    "scopes": ["identify"],
                    "permissions": ["audit:read"],
                    "subjects": [{"kind": "User", "name": "david@acme.com"}, {"kind": "Group", "name": "acme-devs"}]
                }),
            )?,
        )
        .await?;
    let permissions = key_role_status(&h.client, &ns, "data-engineer").await?;
    for p in ["keys:create", "keys:read", "audit:read"] {
        assert!(permissions.iter().any(|x| x == p), "{p} in {permissions:?}");
    }
    assert!(!permissions.iter().any(|x| x == "roles:manage"));
    let resolved = roles.get("data-engineer").await?;
    let scopes = resolved.status.clone().unwrap_or_default().effective_scopes;
    assert_eq!(
        scopes,
        ["events", "identify"],
        "Developer grants the whole catalogue"
    );

    let rbac = eventually("RBAC role", WAIT, || async {
        Ok(Api::<RbacRole>::namespaced(h.client.clone(), &ns)
            .get_opt("portcullis:data-engineer")
            .await?)
    })
    .await?;
    assert_eq!(
        rbac.metadata.owner_references.unwrap_or_default()[0].uid,
        resolved.meta().uid.clone().unwrap_or_default()
    );
    let binding = Api::<RoleBinding>::namespaced(h.client.clone(), &ns)
        .get("portcullis:data-engineer")
        .await?;
    let subjects: Vec<String> = binding
        .subjects
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(subjects, ["david@acme.com", "acme-devs"]);

    // kubectl access follows the role: david may list and create keys, not manage roles.
    let david = h.env.client_impersonating("david@acme.com", &[])?;
    eventually("david lists apikeys", WAIT, || async {
        Ok(Api::<ApiKey>::namespaced(david.clone(), &ns)
            .list(&ListParams::default())
            .await
            .ok()
            .map(|_| ()))
    })
    .await?;
    match Api::<Role>::namespaced(david.clone(), &ns)
        .delete("viewer", &DeleteParams::default())
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => bail!("david deleted a role without roles:manage: {other:?}"),
    }

    // A Role without subjects has no RoleBinding (a binding of nobody grants nothing):
    // the built-in ones never get one, and one whose subjects are removed loses it. The
    // RBAC Role stays for bindings written by hand.
    let bindings = Api::<RoleBinding>::namespaced(h.client.clone(), &ns);
    assert!(bindings.get_opt("portcullis:viewer").await?.is_none());
    let mut unbound = roles.get("data-engineer").await?;
    unbound.spec.subjects.clear();
    roles.replace("data-engineer", &pp, &unbound).await?;
    eventually("the data-engineer binding removed", WAIT, || async {
        Ok(bindings
            .get_opt("portcullis:data-engineer")
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    assert!(
        Api::<RbacRole>::namespaced(h.client.clone(), &ns)
            .get_opt("portcullis:data-engineer")
            .await?
            .is_some()
    );

    roles
        .create(&pp, &role("loop-a", json!({"inherits": ["loop-b"]}))?)
        .await?;
    roles
        .create(&pp, &role("loop-b", json!({"inherits": ["loop-a"]}))?)
        .await?;
    roles
        .create(&pp, &role("orphan", json!({"inherits": ["ghost"]}))?)
        .await?;
    let reason_of = |name: &'static str, wanted: &'static str| {
        let roles = roles.clone();
        async move {
            eventually(
                &format!("{name} Ready=False with {wanted}"),
                WAIT,
                || async {
                    let r = roles.get(name).await?;
                    let (s, reason, message) =
                        ready_reason(&r.status.unwrap_or_default().conditions);
                    Ok((s == "False" && reason == wanted).then_some(message))
                },
            )
            .await
        }
    };
    // loop-a may first report loop-b missing (created after it), then the cycle.
    let message = reason_of("loop-a", "InheritanceCycle").await?;
    assert!(message.contains("loop-a -> loop-b -> loop-a"), "{message}");
    let message = reason_of("orphan", "MissingParent").await?;
    assert!(
        message.contains("ghost") && message.contains("orphan"),
        "{message}"
    );
    ensure!(
        Api::<RbacRole>::namespaced(h.client.clone(), &ns)
            .get_opt("portcullis:loop-a")
            .await?
            .is_none(),
        "an unresolvable role grants nothing"
    );
    operator.stop().await;
    Ok(())
}

#[tokio::test]
async fn overlapping_tenants_never_take_over_and_deletion_releases_labels() -> Result<()> {
    let Some(h) = harness().await? else {
        return Ok(());
    };
    let operator = start_operator(&h, "overlap-test").await?;
    let (first, ns) = tenant_with_namespace(&h, "shared").await?;
    let second = unique("globex");
    create_tenant(&h.client, &second, &[&ns]).await?;
    let tenants: Api<Tenant> = Api::all(h.client.clone());
    let (reason, message) = eventually("second tenant Ready=False", WAIT, || async {
        let t = tenants.get(&second).await?;
        let (s, reason, message) = ready_reason(&t.status.unwrap_or_default().conditions);
        Ok((s == "False").then_some((reason, message)))
    })
    .await?;
    assert_eq!(reason, "NamespaceClaimed");
    for name in [&ns, &first, &second] {
        assert!(message.contains(name.as_str()), "{name} not in {message:?}");
    }
    let namespaces: Api<Namespace> = Api::all(h.client.clone());
    let label = |n: Namespace| {
        n.metadata
            .labels
            .unwrap_or_default()
            .get(TENANT_LABEL)
            .cloned()
    };
    assert_eq!(
        label(namespaces.get(&ns).await?),
        Some(first.clone()),
        "no takeover"
    );

    tenants.delete(&first, &DeleteParams::default()).await?;
    eventually("the label to be removed", WAIT, || async {
        let l = label(namespaces.get(&ns).await?);
        Ok((l.as_deref() != Some(first.as_str())).then_some(()))
    })
    .await?;
    // Freed, the namespace goes to the tenant that asked for it; the built-in Roles are
    // the new Tenant's alone (the old ones went with the label, not with the GC).
    let won = ready_tenant(&h.client, &second).await?;
    let roles = Api::<portcullis_crds::Role>::namespaced(h.client.clone(), &ns)
        .list(&Default::default())
        .await?;
    for role in roles.items {
        let owners: Vec<String> = role
            .metadata
            .owner_references
            .unwrap_or_default()
            .into_iter()
            .map(|o| o.uid)
            .collect();
        ensure!(
            owners.is_empty() || owners == [won.metadata.uid.clone().unwrap_or_default()],
            "Role {:?} is still owned by {owners:?}",
            role.metadata.name
        );
    }
    operator.stop().await;
    Ok(())
}

/// Tenants are reconciled concurrently: a dozen created at once for one namespace, and
/// exactly one gets it; every other one says which Tenant holds it.
#[tokio::test]
async fn tenants_reconciled_together_never_share_a_namespace() -> Result<()> {
    let Some(h) = harness().await? else {
        return Ok(());
    };
    let operator = start_operator(&h, "race-test").await?;
    let ns = h.env.create_namespace("contested").await?;
    let names: Vec<String> = (0..12).map(|_| unique("racer")).collect();
    let wanted = [ns.as_str()];
    futures::future::try_join_all(names.iter().map(|n| create_tenant(&h.client, n, &wanted)))
        .await?;
    let tenants: Api<Tenant> = Api::all(h.client.clone());
    let outcomes = eventually("every racer settled", WAIT, || async {
        let mut outcomes = Vec::new();
        for name in &names {
            let t = tenants.get(name).await?;
            let (status, reason, message) = ready_reason(&t.status.unwrap_or_default().conditions);
            if status.is_empty() || (status == "False" && reason != "NamespaceClaimed") {
                return Ok(None);
            }
            outcomes.push((name.clone(), status, message));
        }
        Ok(Some(outcomes))
    })
    .await?;
    let winners: Vec<&String> = outcomes
        .iter()
        .filter(|(_, status, _)| status == "True")
        .map(|(name, _, _)| name)
        .collect();
    ensure!(
        winners.len() == 1,
        "exactly one Tenant binds {ns}: {outcomes:#?}"
    );
    let winner = winners[0];
    let label = Api::<Namespace>::all(h.client.clone())
        .get(&ns)
        .await?
        .metadata
        .labels
        .unwrap_or_default()
        .get(TENANT_LABEL)
        .cloned();
    ensure!(
        label.as_ref() == Some(winner),
        "{ns} is labelled {label:?}, not {winner}"
    );
    for (name, status, message) in &outcomes {
        ensure!(
            name == winner || (status == "False" && message.contains(winner.as_str())),
            "{name} should name {winner} as the holder: {message}"
        );
    }
    operator.stop().await;
    Ok(())
}

/// Reads newline-delimited bundles from the watch stream.
struct BundleStream {
    body: hyper::body::Incoming,
    buffer: Vec<u8>,
}

impl BundleStream {
    async fn open(addr: std::net::SocketAddr, tenant: &str) -> Result<Self> {
        let client = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let uri: http::Uri = format!("http://{addr}/v1/policy/{tenant}/watch").parse()?;
        let response = client.get(uri).await?;
        ensure!(
            response.status() == 200,
            "watch answered {}",
            response.status()
        );
        Ok(Self {
            body: response.into_body(),
            buffer: Vec::new(),
        })
    }

    async fn next(&mut self) -> Result<PolicyBundle> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                return Ok(serde_json::from_slice(&line)?);
            }
            let frame = self.body.frame().await.context("watch stream ended")??;
            if let Ok(data) = frame.into_data() {
                self.buffer.extend_from_slice(&data);
            }
        }
    }
}

#[tokio::test]
async fn policy_watch_sees_a_revocation_within_a_second() -> Result<()> {
    let Some(h) = harness().await? else {
        return Ok(());
    };
    let operator = start_operator(&h, "policy-test").await?;
    let (tenant, ns) = tenant_with_namespace(&h, "policy").await?;
    create_key(
        &h.client,
        &ns,
        "ingest",
        json!({"role": "Developer", "scopes": ["identify"], "ipAllowlist": ["10.0.0.0/8"]}),
    )
    .await?;
    let key = key_where(&h.client, &ns, "ingest", "Active", |k| {
        state(k) == KeyState::Active
    })
    .await?;
    let key_id = key.status.and_then(|s| s.key_id).context("key id")?;

    let mut stream = tokio::time::timeout(WAIT, BundleStream::open(operator.policy_addr, &tenant))
        .await
        .context("opening the policy watch")??;
    let mut bundle = tokio::time::timeout(WAIT, stream.next())
        .await
        .context("first bundle")??;
    while !bundle.keys.keys().any(|k| k.as_str() == key_id) {
        bundle = tokio::time::timeout(WAIT, stream.next())
            .await
            .with_context(|| {
                format!("the key never reached the policy; last bundle {bundle:?}")
            })??;
    }
    let policy = &bundle
        .keys
        .iter()
        .find(|(k, _)| k.as_str() == key_id)
        .context("key")?
        .1;
    assert_eq!(policy.name, format!("{ns}/ingest"));
    assert!(policy.scopes.contains("identify"));
    assert_eq!(policy.ip_allowlist.len(), 1);
    let version = bundle.version;

    // The plain GET serves the same bundle.
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let got = client
        .get(format!("http://{}/v1/policy/{tenant}", operator.policy_addr).parse()?)
        .await?;
    let current: PolicyBundle =
        serde_json::from_slice(&got.into_body().collect().await?.to_bytes())?;
    assert!(current.version >= version);

    let revoked_at = Instant::now();
    patch_key(&h.client, &ns, "ingest", json!({"revoked": true})).await?;
    let latency = loop {
        let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .context("no bundle after the revocation")??;
        assert!(next.version > version, "versions rise");
        // The key stays as a tombstone so the proxy can say it was revoked.
        if next
            .keys
            .iter()
            .any(|(k, p)| k.as_str() == key_id && p.revoked && p.scopes.is_empty())
        {
            break revoked_at.elapsed();
        }
    };
    eprintln!("revocation reached the policy watch in {latency:?}");
    assert!(
        latency < Duration::from_secs(1),
        "revocation took {latency:?}"
    );
    operator.stop().await;
    Ok(())
}

async fn lease_holder(client: &Client) -> Result<Option<String>> {
    let lease = Api::<Lease>::namespaced(client.clone(), OPERATOR_NS)
        .get(run::LEASE_NAME)
        .await?;
    Ok(lease.spec.and_then(|s| s.holder_identity))
}

#[tokio::test]
async fn leader_election_hands_over_when_the_leader_stops() -> Result<()> {
    let Some(h) = harness().await? else {
        return Ok(());
    };
    let first = start_operator(&h, "replica-a").await?;
    let second = run::start(h.env.client()?, settings("replica-b")).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(first.is_leader());
    assert!(!second.is_leader(), "two leaders at once");
    assert_eq!(lease_holder(&h.client).await?, Some("replica-a".into()));
    let (_, _) = tenant_with_namespace(&h, "lead-a").await?;

    let stopped = Instant::now();
    first.stop().await;
    eventually("replica-b to take over", WAIT, || async {
        Ok(second.is_leader().then_some(()))
    })
    .await?;
    let handover = stopped.elapsed();
    eprintln!("leadership handed over in {handover:?} (released lease)");
    assert!(
        handover < Duration::from_secs(4),
        "a released lease is taken without waiting out its duration"
    );
    assert_eq!(lease_holder(&h.client).await?, Some("replica-b".into()));
    // The new leader reconciles.
    let (_, ns) = tenant_with_namespace(&h, "lead-b").await?;
    create_key(
        &h.client,
        &ns,
        "after",
        json!({"role": "Developer", "scopes": ["identify"]}),
    )
    .await?;
    key_where(&h.client, &ns, "after", "Active", |k| {
        state(k) == KeyState::Active
    })
    .await?;
    second.stop().await;
    assert_eq!(
        lease_holder(&h.client).await?,
        None,
        "released on graceful shutdown"
    );
    Ok(())
}

#[tokio::test]
async fn pods_running_without_the_proxy_are_reported_on_the_tenant() -> Result<()> {
    let Some(h) = harness().await? else {
        return Ok(());
    };
    let _operator = start_operator(&h, "unprotected-test").await?;
    let ns = h.env.create_namespace("bare").await?;
    // The 1.20 ServiceAccount admission plugin wants the token Secret first.
    let accounts: Api<ServiceAccount> = Api::namespaced(h.client.clone(), &ns);
    eventually("the default ServiceAccount's token", WAIT, || async {
        let secrets = accounts.get_opt("default").await?.and_then(|a| a.secrets);
        Ok(secrets.filter(|s| !s.is_empty()))
    })
    .await?;
    let pods: Api<Pod> = Api::namespaced(h.client.clone(), &ns);
    for (name, annotations) in [
        ("bare", json!({})),
        ("opted-out", json!({"portcullis.dev/inject": "disabled"})),
    ] {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"containers": [{"name": "app", "image": "example/app:1"}]}}))?;
        pods.create(&PostParams::default(), &pod).await?;
    }
    let name = unique("exposed");
    create_tenant(&h.client, &name, &[&ns]).await?;
    let tenants: Api<Tenant> = Api::all(h.client.clone());
    let protected = |t: &Tenant| {
        t.status
            .iter()
            .flat_map(|s| s.conditions.iter())
            .find(|c| c.type_ == "Protected")
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    // Opted-out pods are allowed but still exposed: they are listed too.
    let exposed = eventually("the unprotected pods on the Tenant", WAIT, || async {
        let t = tenants.get(&name).await?;
        let listed = t.status.clone().unwrap_or_default().unprotected_pods;
        Ok((listed == [format!("{ns}/bare"), format!("{ns}/opted-out")]).then_some(t))
    })
    .await?;
    assert_eq!(
        protected(&exposed),
        Some(("False".into(), "PodsWithoutProxy".into()))
    );
    // Deleting the bare pod leaves only the opt-out (the pod watch wakes the Tenant).
    pods.delete("bare", &Default::default()).await?;
    let opted_out = eventually("only the opt-out to stay", WAIT, || async {
        let t = tenants.get(&name).await?;
        let listed = t.status.clone().unwrap_or_default().unprotected_pods;
        Ok((listed == [format!("{ns}/opted-out")]).then_some(t))
    })
    .await?;
    assert_eq!(
        protected(&opted_out),
        Some(("False".into(), "PodsOptedOut".into()))
    );
    pods.delete("opted-out", &Default::default()).await?;
    let cleared = eventually("the report to clear", WAIT, || async {
        let t = tenants.get(&name).await?;
        Ok(t.status
            .clone()
            .unwrap_or_default()
            .unprotected_pods
            .is_empty()
            .then_some(t))
    })
    .await?;
    assert_eq!(
        protected(&cleared),
        Some(("True".into(), "AllPodsProxied".into()))
    );
    Ok(())
}

/// The ingress ports of the tenant's NetworkPolicy in `ns`, `None` while there is none.
async fn inbound_policy_ports(client: &Client, ns: &str) -> Result<Option<serde_json::Value>> {
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    Ok(policies
        .get_opt("portcullis-inbound")
        .await?
        .map(|p| serde_json::to_value(p.spec.unwrap_or_default().ingress).unwrap_or_default()))
}

async fn set_network_policy(client: &Client, tenant: &str, mode: &str) -> Result<()> {
    Api::<Tenant>::all(client.clone())
        .patch(
            tenant,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"networkPolicy": mode}})),
        )
        .await?;
    Ok(())
}

#[tokio::test]
async fn tenant_namespaces_get_a_network_policy_admitting_only_proxied_traffic() -> Result<()> {
    let Some(h) = harness().await? else {
        return Ok(());
    };
    let _operator = start_operator(&h, "netpol-test").await?;
    let (tenant, ns) = tenant_with_namespace(&h, "netpol").await?;
    let policies: Api<NetworkPolicy> = Api::namespaced(h.client.clone(), &ns);
    let tcp_only = json!([{"ports": [{"protocol": "TCP"}]}]);
    let proxy_ports = json!([{"ports": [
        {"protocol": "TCP", "port": 4143}, {"protocol": "TCP", "port": 4191}]}]);

    // Default: every TCP port (all redirected to the proxy in the pod), nothing else,
    // for the pods that carry the injector's label.
    let policy = eventually("the NetworkPolicy", WAIT, || async {
        policies
            .get_opt("portcullis-inbound")
            .await
            .map_err(Into::into)
    })
    .await?;
    let spec = policy.spec.clone().unwrap_or_default();
    assert_eq!(serde_json::to_value(&spec.ingress)?, tcp_only);
    assert_eq!(
        serde_json::to_value(&spec.pod_selector)?,
        json!({"matchExpressions": [{"key": "portcullis.dev/injected", "operator": "Exists"}]})
    );
    assert_eq!(spec.policy_types, Some(vec!["Ingress".to_owned()]));
    let tenant_uid = Api::<Tenant>::all(h.client.clone())
        .get(&tenant)
        .await?
        .metadata
        .uid;
    assert_eq!(
        policy.metadata.owner_references.unwrap_or_default()[0].uid,
        tenant_uid.unwrap_or_default(),
        "owned by the Tenant, so deleting the Tenant deletes it"
    );

    // The stricter mode narrows it to the proxy's own ports.
    set_network_policy(&h.client, &tenant, "ProxyPortOnly").await?;
    eventually("the proxy-port-only policy", WAIT, || async {
        let ports = inbound_policy_ports(&h.client, &ns).await?;
        Ok((ports.as_ref() == Some(&proxy_ports)).then_some(()))
    })
    .await?;

    // Deleted by hand, it comes back.
    policies
        .delete("portcullis-inbound", &DeleteParams::default())
        .await?;
    eventually("the deleted policy to come back", WAIT, || async {
        let ports = inbound_policy_ports(&h.client, &ns).await?;
        Ok((ports.as_ref() == Some(&proxy_ports)).then_some(()))
    })
    .await?;

    // Unmanaged: the operator removes its policy and keeps none.
    set_network_policy(&h.client, &tenant, "Unmanaged").await?;
    eventually("the policy to be removed", WAIT, || async {
        Ok(inbound_policy_ports(&h.client, &ns)
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;

    // A policy of that name the tenant does not own is never deleted (its label wakes
    // the Tenant, which stays Unmanaged).
    let theirs: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "portcullis-inbound", "namespace": ns,
                     "labels": {TENANT_LABEL: tenant}},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}))?;
    policies.create(&PostParams::default(), &theirs).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        policies.get_opt("portcullis-inbound").await?.is_some(),
        "someone else's policy was deleted"
    );
    policies
        .delete("portcullis-inbound", &DeleteParams::default())
        .await?;

    // Back to the default, then the namespace leaves the tenant: its policy goes too.
    set_network_policy(&h.client, &tenant, "ProxiedTcp").await?;
    eventually("the default policy again", WAIT, || async {
        let ports = inbound_policy_ports(&h.client, &ns).await?;
        Ok((ports.as_ref() == Some(&tcp_only)).then_some(()))
    })
    .await?;
    Api::<Tenant>::all(h.client.clone())
        .patch(
            &tenant,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"namespaces": []}})),
        )
        .await?;
    eventually(
        "the released namespace's policy to be removed",
        WAIT,
        || async {
            Ok(inbound_policy_ports(&h.client, &ns)
                .await?
                .is_none()
                .then_some(()))
        },
    )
    .await?;

    Ok(())
}

#[tokio::test]
async fn the_audit_service_certificate_is_kept_in_its_secret() -> Result<()> {
    let Some(h) = harness().await? else {
        return Ok(());
    };
    let mut s = settings("audit-tls");
    s.audit_service = Some("portcullis-audit".into());
    let operator = run::start(h.env.client()?, s).await?;
    let secrets: Api<Secret> = Api::namespaced(h.client.clone(), OPERATOR_NS);
    let secret = eventually("the audit service's TLS Secret", WAIT, || async {
        Ok(secrets.get_opt("portcullis-audit-tls").await?)
    })
    .await?;
    ensure!(secret.type_.as_deref() == Some("kubernetes.io/tls"));
    let data = secret.data.context("the Secret has data")?;
    let bundle = String::from_utf8(data["ca.crt"].0.clone())?;
    ensure!(
        bundle == operator.ca.trust_bundle_pem(),
        "ca.crt is the trust bundle proxies hold"
    );

    // The certificate verifies for the audit Service's name against that bundle, the
    // way a shipping proxy checks it.
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    let chain =
        CertificateDer::pem_slice_iter(&data["tls.crt"].0).collect::<Result<Vec<_>, _>>()?;
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(root?)?;
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()?;
    use rustls::client::danger::ServerCertVerifier as _;
    let (leaf, intermediates) = chain.split_first().context("a certificate")?;
    verifier.verify_server_cert(
        leaf,
        intermediates,
        &ServerName::try_from(format!("portcullis-audit.{OPERATOR_NS}.svc"))?,
        &[],
        UnixTime::now(),
    )?;
    ensure!(
        String::from_utf8_lossy(&data["tls.key"].0).contains("BEGIN PRIVATE KEY"),
        "the key is PKCS#8 PEM"
    );
    operator.stop().await;
    Ok(())
}
