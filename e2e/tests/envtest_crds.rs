//! The CRDs in crds/ against a real kube-apiserver: they install (through kube-rs and
//! through `kubectl apply -f crds/` as a user would), objects round-trip with their
//! defaults, and the schema refuses bad objects with messages naming the field.

use kube::{
    Api, Resource,
    api::{DynamicObject, ListParams, PostParams},
    core::{ApiResource, GroupVersionKind},
};
use portcullis_crds::{ApiKey, ApiKeySpec, Role, RoleSpec, ScopeName, Tenant, TenantSpec};
use portcullis_e2e::envtest::{self, EnvTest, crd_dir};
use serde_json::json;

async fn env() -> anyhow::Result<Option<&'static EnvTest>> {
    let Some(env) = envtest::shared().await? else {
        return Ok(None);
    };
    env.install_crds().await?;
    Ok(Some(env))
}

fn dynamic_api<K: Resource<DynamicType = ()>>(
    client: kube::Client,
    ns: Option<&str>,
) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(&K::group(&()), &K::version(&()), &K::kind(&()));
    let resource = ApiResource::from_gvk_with_plural(&gvk, &K::plural(&()));
    match ns {
        Some(ns) => Api::namespaced_with(client, ns, &resource),
        None => Api::all_with(client, &resource),
    }
}

/// Creates `body` and returns the API server's refusal message (the test fails when the
/// object is accepted).
async fn refusal(api: &Api<DynamicObject>, body: serde_json::Value) -> anyhow::Result<String> {
    let object: DynamicObject = serde_json::from_value(body)?;
    match api.create(&PostParams::default(), &object).await {
        Ok(created) => anyhow::bail!("the API server accepted an invalid object: {created:?}"),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "expected 422 Invalid, got {status:?}");
            Ok(status.message)
        }
        Err(other) => Err(other.into()),
    }
}

#[tokio::test]
async fn kubectl_apply_installs_the_crds_as_a_user_would() -> anyhow::Result<()> {
    let Some(env) = env().await? else {
        return Ok(());
    };
    let kubectl = |args: &[&str]| {
        std::process::Command::new("kubectl")
            .args(args)
            .arg("--kubeconfig")
            .arg(env.kubeconfig_path())
            .output()
    };
    let dir = crd_dir();
    let dir = dir.to_string_lossy();
    let dry = match kubectl(&["apply", "--dry-run=server", "-f", &dir]) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipping: kubectl is not available ({e})");
            return Ok(());
        }
    };
    assert!(
        dry.status.success(),
        "dry run failed: {}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let applied = kubectl(&["apply", "-f", &dir])?;
    let stdout = String::from_utf8_lossy(&applied.stdout);
    assert!(
        applied.status.success(),
        "apply failed: {}",
        String::from_utf8_lossy(&applied.stderr)
    );
    for name in [
        "tenants.portcullis.dev",
        "roles.portcullis.dev",
        "apikeys.portcullis.dev",
    ] {
        assert!(
            stdout.contains(name),
            "kubectl apply did not mention {name}: {stdout}"
        );
    }
    // Short names and categories work from kubectl.
    let ns = env.create_namespace("kubectl").await?;
    let get = kubectl(&["get", "ak,pcrole", "-n", &ns])?;
    assert!(
        get.status.success(),
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );
    let get = kubectl(&["get", "portcullis", "-A"])?;
    assert!(
        get.status.success(),
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn each_kind_round_trips_with_server_side_defaults() -> anyhow::Result<()> {
    let Some(env) = env().await? else {
        return Ok(());
    };
    let client = env.client()?;
    let ns = env.create_namespace("kinds").await?;

    let tenants: Api<Tenant> = Api::all(client.clone());
    let tenant_name = format!("t-{ns}");
    let tenant = Tenant::new(
        &tenant_name,
        TenantSpec {
            namespaces: vec![ns.clone()],
            ..serde_json::from_value(json!({}))?
        },
    );
    tenants.create(&PostParams::default(), &tenant).await?;
    // Defaults come from the schema, applied by the API server itself.
    let raw = dynamic_api::<Tenant>(client.clone(), None)
        .get(&tenant_name)
        .await?;
    let spec = &raw.data["spec"];
    assert_eq!(spec["defaults"]["rateLimit"]["requests"], 1000, "{spec}");
    assert_eq!(spec["defaults"]["rateLimit"]["per"], "1m", "{spec}");
    assert_eq!(spec["defaults"]["keyExpiry"], "90d", "{spec}");
    assert_eq!(spec["encryption"]["dekRotation"], "7d", "{spec}");
    assert_eq!(spec["dataClassification"], "Internal", "{spec}");
    assert_eq!(spec["networkPolicy"], "ProxiedTcp", "{spec}");
    let listed = tenants.list(&ListParams::default()).await?;
    assert!(
        listed
            .items
            .iter()
            .any(|t| t.metadata.name.as_deref() == Some(tenant_name.as_str()))
    );

    let roles: Api<Role> = Api::namespaced(client.clone(), &ns);
    let role = Role::new(
        "data-engineer",
        RoleSpec {
            inherits: vec!["Developer".into()],
            scopes: vec![ScopeName::new("identify")?],
            ..RoleSpec::default()
        },
    );
    roles.create(&PostParams::default(), &role).await?;
    let got = roles.get("data-engineer").await?;
    assert_eq!(got.spec.inherits, ["Developer"]);
    assert_eq!(roles.list(&ListParams::default()).await?.items.len(), 1);

    let keys: Api<ApiKey> = Api::namespaced(client.clone(), &ns);
    let key = ApiKey::new(
        "ingest",
        ApiKeySpec {
            role: "Developer".into(),
            scopes: vec![ScopeName::new("identify")?],
            ..ApiKeySpec::default()
        },
    );
    keys.create(&PostParams::default(), &key).await?;
    let got = keys.get("ingest").await?;
    assert_eq!(got.spec.scopes, [ScopeName::new("identify")?]);
    assert!(!got.spec.revoked);
    assert_eq!(got.spec.rotate, 0);
    assert!(
        got.status.is_none(),
        "status is the operator's, never set on create"
    );
    assert_eq!(keys.list(&ListParams::default()).await?.items.len(), 1);
    Ok(())
}

#[tokio::test]
async fn schema_refuses_bad_objects_naming_the_field() -> anyhow::Result<()> {
    let Some(env) = env().await? else {
        return Ok(());
    };
    let client = env.client()?;
    let ns = env.create_namespace("invalid").await?;
    let keys = dynamic_api::<ApiKey>(client.clone(), Some(&ns));
    let tenants = dynamic_api::<Tenant>(client, None);
    let key = |name: &str, spec: serde_json::Value| {
        json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
               "metadata": {"name": name, "namespace": ns}, "spec": spec})
    };

    let message = refusal(
        &keys,
        key("bad-cidr", json!({"role": "Developer", "scopes": ["identify"], "ipAllowlist": ["10.0.0.0/8", "10.0.0.300/8"]})),
    )
    .await?;
    assert!(message.contains("spec.ipAllowlist"), "{message}");
    assert!(message.contains("cidr"), "{message}");

    let message = refusal(
        &keys,
        key(
            "bad-type",
            json!({"role": "Developer", "scopes": ["identify"], "rateLimit": {"requests": "lots"}}),
        ),
    )
    .await?;
    assert!(message.contains("spec.rateLimit.requests"), "{message}");
    assert!(message.contains("integer"), "{message}");

    let message = refusal(
        &keys,
        key(
            "bad-scope",
            json!({"role": "Developer", "scopes": ["Bad_Scope"]}),
        ),
    )
    .await?;
    assert!(message.contains("spec.scopes"), "{message}");

    let message = refusal(
        &keys,
        key("no-scopes", json!({"role": "Developer", "scopes": []})),
    )
    .await?;
    assert!(message.contains("spec.scopes"), "{message}");

    let message = refusal(
        &keys,
        key(
            "bad-expiry",
            json!({"role": "Developer", "scopes": ["identify"], "expiresAfter": "90 days"}),
        ),
    )
    .await?;
    assert!(message.contains("spec.expiresAfter"), "{message}");

    let message = refusal(
        &tenants,
        json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
               "metadata": {"name": format!("retention-{ns}")},
               "spec": {"audit": {"retentionDays": 9999}}}),
    )
    .await?;
    assert!(message.contains("spec.audit.retentionDays"), "{message}");
    assert!(message.contains("2555"), "{message}");

    let message = refusal(
        &tenants,
        json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
               "metadata": {"name": format!("class-{ns}")},
               "spec": {"dataClassification": "TopSecret"}}),
    )
    .await?;
    assert!(message.contains("spec.dataClassification"), "{message}");
    assert!(message.contains("Restricted"), "{message}");

    let message = refusal(
        &tenants,
        json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
               "metadata": {"name": format!("netpol-{ns}")},
               "spec": {"networkPolicy": "DenyAll"}}),
    )
    .await?;
    assert!(message.contains("spec.networkPolicy"), "{message}");
    assert!(message.contains("ProxyPortOnly"), "{message}");
    Ok(())
}
