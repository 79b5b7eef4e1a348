//! The real operator binary, as the chart's ServiceAccount.

use super::*;

/// `portcullis-operator` built next to this test binary (target/<profile>/), as
/// `cargo test --workspace` and `cargo build -p portcullis-operator` leave it, or
/// `PORTCULLIS_OPERATOR_BIN`.
pub(super) fn operator_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("PORTCULLIS_OPERATOR_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/helm_chart-<hash> → target/<profile>/portcullis-operator
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("locating the target directory")?;
    let binary = profile_dir.join("portcullis-operator");
    ensure!(
        binary.is_file(),
        "{} does not exist: build it first (cargo build -p portcullis-operator; cargo test \
         --workspace builds it too) or set PORTCULLIS_OPERATOR_BIN",
        binary.display()
    );
    Ok(binary)
}

/// A kubeconfig whose user is the envtest admin certificate impersonating the chart's
/// ServiceAccount (`as`/`as-groups`), so the API server applies exactly its RBAC.
pub(super) fn impersonating_kubeconfig(
    env: &EnvTest,
    release: &Release,
    path: &Path,
) -> Result<()> {
    let certs = env.dir().join("certs");
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "envtest", "cluster": {
            "server": env.server_url(),
            "certificate-authority": certs.join("serving-ca.crt"),
        }}],
        "users": [{"name": "operator", "user": {
            "client-certificate": certs.join("admin.crt"),
            "client-key": certs.join("admin.key"),
            "as": release.user(),
            "as-groups": release.groups(),
        }}],
        "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": "operator"}}],
        "current-context": "envtest",
    });
    std::fs::write(path, serde_yaml::to_string(&config)?)?;
    Ok(())
}

/// The operator child process; killed (SIGTERM, then SIGKILL) when dropped.
pub(super) struct OperatorProcess {
    child: tokio::process::Child,
    log: PathBuf,
}

impl OperatorProcess {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn stop(mut self) -> String {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
        self.log()
    }
}

/// Starts the real operator as the chart's ServiceAccount, configured as the chart's
/// Deployment configures it, with a fresh Lease and its own CA.
pub(super) async fn start_operator(
    env: &EnvTest,
    release: &Release,
    work: &tempfile::TempDir,
) -> Result<OperatorProcess> {
    let binary = operator_binary()?;
    let admin = env.client()?;
    let kubeconfig = work.path().join("kubeconfig");
    impersonating_kubeconfig(env, release, &kubeconfig)?;
    let log = work.path().join("operator.log");
    let log_file = std::fs::File::create(&log)?;

    // A fresh Lease so this run's election starts clean.
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &release.namespace);
    let _ = leases
        .delete("portcullis-operator", &DeleteParams::default())
        .await;
    // install_and_upgrade left a placeholder root CA Secret (to show helm keeps it); a
    // real operator refuses to start on a CA it cannot read, so let it make its own.
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &release.namespace);
    for name in ["portcullis-ca-root", "portcullis-ca-intermediate"] {
        let _ = secrets.delete(name, &DeleteParams::default()).await;
    }

    let child = tokio::process::Command::new(&binary)
        .arg("run")
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAMESPACE", &release.namespace)
        .env("POD_NAME", "portcullis-operator-e2e")
        .env("PORTCULLIS_METRICS_ADDR", "127.0.0.1:0")
        .env("PORTCULLIS_POLICY_ADDR", "127.0.0.1:0")
        .env("PORTCULLIS_IDENTITY_ADDR", "127.0.0.1:0")
        .env("PORTCULLIS_WEBHOOK_ADDR", "127.0.0.1:0")
        .env("PORTCULLIS_LEADER_ELECTION", "true")
        .env("PORTCULLIS_LEASE_NAME", "portcullis-operator")
        .env("PORTCULLIS_KEY_HASH_COST", "4")
        .env("PORTCULLIS_SERVICE_ACCOUNT", &release.service_account)
        .env("PORTCULLIS_TENANT_SECRETS_ROLE", TENANT_SECRETS_ROLE)
        .env("RUST_LOG", "info,portcullis_operator=debug,kube=warn")
        .env_remove("PORTCULLIS_KEK_SECRET")
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    Ok(OperatorProcess { child, log })
}

/// A Tenant (named `prefix`-<random>) holding `namespaces`, with an ApiKey `ingest`
/// (`key_spec`) in the first of them; returns the Tenant's name.
pub(super) async fn tenant_with_ingest_key(
    admin: &Client,
    prefix: &str,
    namespaces: &[&String],
    key_spec: Value,
) -> Result<String> {
    let tenant = format!("{prefix}-{}", suffix());
    let object: Tenant = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": tenant},
        "spec": {"namespaces": namespaces,
                 "scopes": {"identify": [{"methods": ["POST"], "path": "/v1/identify"}]}}}))?;
    Api::<Tenant>::all(admin.clone())
        .create(&PostParams::default(), &object)
        .await?;
    let key_ns = namespaces.first().context("no namespace for the key")?;
    let key: ApiKey = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": "ingest", "namespace": key_ns}, "spec": key_spec}))?;
    Api::<ApiKey>::namespaced(admin.clone(), key_ns)
        .create(&PostParams::default(), &key)
        .await?;
    Ok(tenant)
}

/// Waits until `tenant` is Ready.
pub(super) async fn tenant_ready(admin: &Client, tenant: &str) -> Result<()> {
    let tenants: Api<Tenant> = Api::all(admin.clone());
    eventually("Tenant Ready", Duration::from_secs(60), || async {
        let tenant = tenants.get(tenant).await?;
        let ready = tenant
            .status
            .as_ref()
            .map(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
            .unwrap_or(false);
        Ok(ready.then_some(()))
    })
    .await
}

impl OperatorProcess {
    /// Stops the operator; fails with its log if `result` (what the test checked while
    /// it ran) failed, and on any RBAC denial (403, "forbidden") in its log. Returns
    /// the log.
    async fn finish(self, result: Result<()>) -> Result<String> {
        let log = self.stop().await;
        if let Err(e) = result {
            bail!("{e:#}\n--- operator log ---\n{log}");
        }
        let denials: Vec<&str> = log
            .lines()
            .filter(|line| {
                let lower = line.to_ascii_lowercase();
                lower.contains("forbidden") || lower.contains(" 403") || lower.contains("code: 403")
            })
            .collect();
        assert!(
            denials.is_empty(),
            "RBAC denials in the operator log:\n{}",
            denials.join("\n")
        );
        Ok(log)
    }
}

#[tokio::test]
async fn operator_reconciles_with_only_the_chart_service_account() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let Some((env, release)) = release().await? else {
        return Ok(());
    };
    let admin = env.client()?;
    let work = tempfile::Builder::new()
        .prefix("portcullis-operator-run-")
        .tempdir()?;
    let operator = start_operator(env, release, &work).await?;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &release.namespace);

    let result = async {
        let tenant_ns = env.create_namespace("operator-tenant").await?;
        let key = json!({"role": "Developer", "scopes": ["identify"],
                         "rateLimit": {"requests": 1000, "per": "1m"}});
        let tenant = tenant_with_ingest_key(&admin, "op", &[&tenant_ns], key).await?;

        // The leader took the Lease.
        eventually(
            "the operator holds the Lease",
            Duration::from_secs(60),
            || async {
                let lease = leases.get_opt("portcullis-operator").await?;
                Ok(lease
                    .and_then(|l| l.spec)
                    .and_then(|s| s.holder_identity)
                    .filter(|h| h.starts_with("portcullis-operator-e2e")))
            },
        )
        .await?;
        // The Tenant is Ready and labelled its namespace.
        tenant_ready(&admin, &tenant).await?;
        let namespace = Api::<Namespace>::all(admin.clone()).get(&tenant_ns).await?;
        ensure!(
            namespace.labels().get("portcullis.dev/tenant") == Some(&tenant),
            "namespace not labelled: {:?}",
            namespace.labels()
        );
        // The ApiKey's Secret holds the token, and its status the hash.
        let secret = eventually(
            "ApiKey Secret ingest-key",
            Duration::from_secs(60),
            || async {
                Ok(Api::<Secret>::namespaced(admin.clone(), &tenant_ns)
                    .get_opt("ingest-key")
                    .await?)
            },
        )
        .await?;
        let token = secret
            .data
            .as_ref()
            .and_then(|d| d.get("token"))
            .map(|t| String::from_utf8_lossy(&t.0).into_owned())
            .context("Secret ingest-key has no token")?;
        ensure!(
            token.starts_with("ak_"),
            "token format: {}",
            &token[..token.len().min(3)]
        );
        ensure!(
            secret.type_.as_deref() == Some("portcullis.dev/api-key"),
            "Secret type {:?}",
            secret.type_
        );
        eventually("ApiKey status hash", Duration::from_secs(30), || async {
            let key = Api::<ApiKey>::namespaced(admin.clone(), &tenant_ns)
                .get("ingest")
                .await?;
            Ok(key.status.and_then(|s| s.hash).map(drop))
        })
        .await?;
        // The built-in Roles and their RBAC exist (the operator wrote RBAC it holds).
        eventually(
            "generated RBAC Role portcullis:developer",
            Duration::from_secs(30),
            || async {
                Ok(Api::<RbacRole>::namespaced(admin.clone(), &tenant_ns)
                    .get_opt("portcullis:developer")
                    .await?)
            },
        )
        .await?;
        // The KEK it created on first start, in its namespace.
        Api::<Secret>::namespaced(admin.clone(), &release.namespace)
            .get("portcullis-kek")
            .await?;
        // Its CA, and the trust bundle it published into the tenant namespace.
        for name in [
            "portcullis-ca-root",
            "portcullis-ca-intermediate",
            "portcullis-webhook-ca",
        ] {
            Api::<Secret>::namespaced(admin.clone(), &release.namespace)
                .get(name)
                .await?;
        }
        eventually(
            "the trust-bundle ConfigMap",
            Duration::from_secs(30),
            || async {
                Ok(Api::<ConfigMap>::namespaced(admin.clone(), &tenant_ns)
                    .get_opt("portcullis-trust-bundle")
                    .await?)
            },
        )
        .await?;
        Ok::<(), anyhow::Error>(())
    }
    .await;

    let log = operator.finish(result).await?;
    let lines: Vec<&str> = log.lines().collect();
    eprintln!(
        "operator log: {} lines; last ones:\n{}",
        lines.len(),
        lines[lines.len().saturating_sub(12)..].join("\n")
    );
    Ok(())
}

/// Whether the API server's authorizer lets the chart's ServiceAccount `verb` Secrets
/// in `namespace`.
pub(super) async fn sa_may_secrets(
    admin: &Client,
    release: &Release,
    verb: &str,
    namespace: &str,
) -> Result<bool> {
    let attributes = ResourceAttributes {
        resource: Some("secrets".into()),
        verb: Some(verb.into()),
        namespace: Some(namespace.into()),
        ..ResourceAttributes::default()
    };
    authorizer_allows(admin, &release.user(), &release.groups(), attributes).await
}

/// Whether the API server's authorizer allows `user` in `groups` the request described
/// by `attributes` (a SubjectAccessReview, asked as `admin`).
pub(super) async fn authorizer_allows(
    admin: &Client,
    user: &str,
    groups: &[String],
    attributes: ResourceAttributes,
) -> Result<bool> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_owned()),
            groups: Some(groups.to_vec()),
            resource_attributes: Some(attributes),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let reviewed = Api::<SubjectAccessReview>::all(admin.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(reviewed.status.is_some_and(|s| s.allowed))
}

/// Waits until the ServiceAccount's access to `verb` Secrets in `namespace` is `allowed`.
pub(super) async fn until_sa_may_secrets(
    admin: &Client,
    release: &Release,
    verb: &str,
    namespace: &str,
    allowed: bool,
) -> Result<()> {
    let what = format!(
        "{verb} secrets in {namespace} {}",
        if allowed { "allowed" } else { "refused" }
    );
    eventually(&what, Duration::from_secs(30), || async {
        let may = sa_may_secrets(admin, release, verb, namespace).await?;
        Ok((may == allowed).then_some(()))
    })
    .await
}

#[tokio::test]
async fn operator_cannot_read_secrets_outside_tenant_namespaces() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let Some((env, release)) = release().await? else {
        return Ok(());
    };
    let admin = env.client()?;
    let outside = env.create_namespace("no-tenant").await?;
    // No standing access to Secrets anywhere else: a stolen operator token reads
    // nothing in a namespace no Tenant holds.
    for verb in ["get", "list", "watch"] {
        ensure!(
            !sa_may_secrets(&admin, release, verb, &outside).await?,
            "the chart lets the operator {verb} Secrets in {outside}, a namespace no Tenant holds"
        );
    }
    // Its own namespace: read, write and list its own Secrets (a KEK rotation must find
    // every DEK Secret, a deleted Tenant's included), never watch them.
    ensure!(sa_may_secrets(&admin, release, "get", &release.namespace).await?);
    ensure!(sa_may_secrets(&admin, release, "list", &release.namespace).await?);
    ensure!(!sa_may_secrets(&admin, release, "watch", &release.namespace).await?);

    let work = tempfile::Builder::new()
        .prefix("portcullis-operator-secrets-")
        .tempdir()?;
    let operator = start_operator(env, release, &work).await?;
    let result = async {
        let kept = env.create_namespace("secrets-kept").await?;
        let released = env.create_namespace("secrets-released").await?;
        let key = json!({"role": "Developer", "scopes": ["identify"]});
        let tenant = tenant_with_ingest_key(&admin, "sec", &[&kept, &released], key).await?;
        let tenants: Api<Tenant> = Api::all(admin.clone());
        tenant_ready(&admin, &tenant).await?;

        // Bound namespaces: the operator bound itself the tenant-secrets ClusterRole.
        for ns in [&kept, &released] {
            for verb in ["get", "list", "watch", "create", "update", "delete"] {
                until_sa_may_secrets(&admin, release, verb, ns, true).await?;
            }
        }
        for verb in ["get", "list"] {
            ensure!(
                !sa_may_secrets(&admin, release, verb, &outside).await?,
                "binding a tenant's namespaces gave the operator {verb} on Secrets in {outside}"
            );
        }

        // Its per-namespace watch still sees a deleted key Secret: the key is re-issued.
        let secrets: Api<Secret> = Api::namespaced(admin.clone(), &kept);
        let first = eventually(
            "ApiKey Secret ingest-key",
            Duration::from_secs(60),
            || async { Ok(secrets.get_opt("ingest-key").await?) },
        )
        .await?;
        secrets
            .delete("ingest-key", &DeleteParams::default())
            .await?;
        eventually(
            "ingest-key re-issued after deletion",
            Duration::from_secs(60),
            || async {
                let secret = secrets.get_opt("ingest-key").await?;
                Ok(secret.filter(|s| s.uid() != first.uid()).map(drop))
            },
        )
        .await?;

        // A released namespace loses the access again.
        let patch = json!({"spec": {"namespaces": [kept]}});
        tenants
            .patch(&tenant, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        for verb in ["get", "list"] {
            until_sa_may_secrets(&admin, release, verb, &released, false).await?;
        }
        until_sa_may_secrets(&admin, release, "get", &kept, true).await?;
        Ok::<(), anyhow::Error>(())
    }
    .await;

    operator.finish(result).await?;
    Ok(())
}
