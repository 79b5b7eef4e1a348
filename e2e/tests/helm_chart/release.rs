//! `helm install` and `helm upgrade` into envtest: the release the other modules share.

use super::*;

/// The chart installed into the shared envtest, then upgraded; see [`install_and_upgrade`].
pub(super) struct Release {
    pub(super) namespace: String,
    pub(super) service_account: String,
}

impl Release {
    pub(super) fn user(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }

    pub(super) fn groups(&self) -> Vec<String> {
        vec![
            "system:serviceaccounts".to_owned(),
            format!("system:serviceaccounts:{}", self.namespace),
            "system:authenticated".to_owned(),
        ]
    }

    pub(super) fn client(&self, env: &EnvTest) -> Result<Client> {
        let groups = self.groups();
        let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
        Ok(env.client_impersonating(&self.user(), &groups)?)
    }
}

pub(super) static RELEASE_ONCE: OnceCell<Result<Release, String>> = OnceCell::const_new();
/// The envtest tests change cluster-wide objects (the ClusterRole, webhooks): one at a time.
pub(super) static SERIAL: Mutex<()> = Mutex::const_new(());

/// The shared envtest and the installed release; `None` when skipping.
pub(super) async fn release() -> Result<Option<(&'static EnvTest, &'static Release)>> {
    let Some(env) = envtest::shared().await? else {
        return Ok(None);
    };
    let result = RELEASE_ONCE
        .get_or_init(|| async {
            match Helm::find() {
                None => Err("helm is not installed".to_owned()),
                Some(helm) => install_and_upgrade(env, &helm)
                    .await
                    .map_err(|e| format!("{e:#}")),
            }
        })
        .await;
    match result {
        Ok(release) => Ok(Some((env, release))),
        Err(message) if message == "helm is not installed" => Ok(None),
        Err(message) => bail!("installing the chart failed: {message}"),
    }
}

pub(super) fn secret_rv_and_data(
    secret: &Secret,
) -> (Option<String>, Option<BTreeMap<String, ByteString>>) {
    (
        secret.metadata.resource_version.clone(),
        secret.data.clone(),
    )
}

pub(super) fn ca_bundles_mutating(
    config: &MutatingWebhookConfiguration,
) -> Vec<Option<ByteString>> {
    config
        .webhooks
        .iter()
        .flatten()
        .map(|w| w.client_config.ca_bundle.clone())
        .collect()
}

pub(super) fn ca_bundles_validating(
    config: &ValidatingWebhookConfiguration,
) -> Vec<Option<ByteString>> {
    config
        .webhooks
        .iter()
        .flatten()
        .map(|w| w.client_config.ca_bundle.clone())
        .collect()
}

/// What the operator does at runtime (its own function): server-side apply of each
/// webhook's caBundle, owned by field manager portcullis-operator.
pub(super) async fn patch_ca_bundles(
    client: &Client,
    namespace: &str,
    ca_pem: &str,
) -> Result<(), WebhookError> {
    let settings = WebhookTlsSettings::new(namespace, "portcullis-operator");
    rotation::patch_ca_bundles(client, &settings, ca_pem).await
}

/// helm install (defaults), checks, the operator's caBundle, helm upgrade server-side
/// and client-side with changed values, checks. Leaves the release with
/// failurePolicy=Ignore so later tests can write Portcullis objects without a running
/// webhook server.
pub(super) async fn install_and_upgrade(env: &'static EnvTest, helm: &Helm) -> Result<Release> {
    let admin = env.client()?;
    let namespace = env.create_namespace("portcullis").await?;
    let kubeconfig = env.kubeconfig_path().to_path_buf();
    let chart = chart_dir().to_string_lossy().into_owned();

    // The operator's CA exists before the chart is installed (a reinstall) and must
    // survive install and upgrades untouched.
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &namespace);
    let ca_root = secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta {
                    name: Some("portcullis-ca-root".into()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/managed-by".into(),
                        "portcullis-operator".into(),
                    )])),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([(
                    "ca.crt".into(),
                    ByteString(b"pre-existing root".to_vec()),
                )])),
                ..Secret::default()
            },
        )
        .await?;
    let ca_root_before = secret_rv_and_data(&ca_root);

    // 1. helm install with the default values; helm installs the CRDs from crds/.
    let install = helm
        .run_async(
            vec![
                "install".into(),
                RELEASE.into(),
                chart.clone(),
                "--namespace".into(),
                namespace.clone(),
            ],
            kubeconfig.clone(),
        )
        .await?;
    install.ok()?;
    ensure!(
        install.stdout.contains("kubectl portcullis check"),
        "NOTES: {}",
        install.stdout
    );
    ensure!(
        install.stdout.contains("kubectl apply --server-side"),
        "NOTES must say how to upgrade CRDs"
    );

    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for name in [
        "tenants.portcullis.dev",
        "roles.portcullis.dev",
        "apikeys.portcullis.dev",
    ] {
        let crd = crds
            .get(name)
            .await
            .with_context(|| format!("CRD {name} not installed"))?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        ensure!(established, "CRD {name} not Established");
    }
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &namespace);
    let deployment = deployments.get("portcullis-operator").await?;
    ensure!(
        deployment.spec.as_ref().and_then(|s| s.replicas) == Some(2),
        "replicas"
    );
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), &namespace);
    accounts.get("portcullis-operator").await?;
    let services: Api<Service> = Api::namespaced(admin.clone(), &namespace);
    for name in ["portcullis-operator", "portcullis-operator-metrics"] {
        services
            .get(name)
            .await
            .with_context(|| format!("Service {name}"))?;
    }
    // 1.20 serves PodDisruptionBudget only as policy/v1beta1: the chart picked it.
    let pdb_resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("policy", "v1beta1", "PodDisruptionBudget"),
        "poddisruptionbudgets",
    );
    let pdbs: Api<DynamicObject> = Api::namespaced_with(admin.clone(), &namespace, &pdb_resource);
    let pdb = pdbs
        .get("portcullis-operator")
        .await
        .context("PodDisruptionBudget")?;
    ensure!(pdb.data["spec"]["minAvailable"] == 1, "PDB {:?}", pdb.data);
    // The API server accepted the chart's NetworkPolicy as rendered.
    let policies: Api<NetworkPolicy> = Api::namespaced(admin.clone(), &namespace);
    let policy = policies
        .get("portcullis-operator")
        .await
        .context("the operator's NetworkPolicy")?;
    let ingress = policy
        .spec
        .as_ref()
        .and_then(|s| s.ingress.clone())
        .unwrap_or_default();
    // Webhooks, identity and policy, policy for the audit collector, metrics.
    ensure!(ingress.len() == 4, "NetworkPolicy ingress {ingress:?}");
    let cluster_roles: Api<ClusterRole> = Api::all(admin.clone());
    cluster_roles.get("portcullis-operator").await?;
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(admin.clone());
    let injector = mutating.get("portcullis-injector").await?;
    ensure!(
        ca_bundles_mutating(&injector).iter().all(Option::is_none),
        "caBundle set by the chart"
    );
    for hook in injector.webhooks.iter().flatten() {
        ensure!(
            hook.failure_policy.as_deref() == Some("Fail"),
            "{} failurePolicy",
            hook.name
        );
    }
    validating.get("portcullis-validator").await?;

    // Helm created no Secret: only its release records, ServiceAccount tokens (1.20)
    // and the operator's pre-existing CA.
    for secret in secrets.list(&ListParams::default()).await? {
        let name = secret.name_any();
        let is_release = name.starts_with("sh.helm.release.v1.");
        let is_token = secret.type_.as_deref() == Some("kubernetes.io/service-account-token");
        ensure!(
            is_release || is_token || name == "portcullis-ca-root",
            "unexpected Secret {name}"
        );
    }
    ensure!(
        secret_rv_and_data(&secrets.get("portcullis-ca-root").await?) == ca_root_before,
        "helm install changed portcullis-ca-root"
    );

    // 2. Fail closed: with no operator serving, the API server refuses Portcullis
    // objects and pods in opted-in namespaces, naming the webhook.
    let tenants: Api<Tenant> = Api::all(admin.clone());
    let tenant: Tenant = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": "fail-closed"}, "spec": {}
    }))?;
    match tenants.create(&PostParams::default(), &tenant).await {
        Ok(_) => bail!("a Tenant was admitted although the validating webhook is unreachable"),
        Err(e) => ensure!(
            e.to_string().contains("validate.portcullis.dev"),
            "unexpected refusal: {e}"
        ),
    }
    let opted_in = env.create_namespace("opted-in").await?;
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces
        .patch(
            &opted_in,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"portcullis.dev/inject": "enabled"}}})),
        )
        .await?;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "app"},
        "spec": {"automountServiceAccountToken": false,
                 "containers": [{"name": "app", "image": "example.com/app:1"}]}
    }))?;
    match Api::<Pod>::namespaced(admin.clone(), &opted_in)
        .create(&PostParams::default(), &pod)
        .await
    {
        Ok(_) => bail!("a pod in an opted-in namespace was admitted without the injector"),
        Err(e) => ensure!(
            e.to_string().contains("inject.portcullis.dev"),
            "unexpected refusal: {e}"
        ),
    }
    let tenant_ns = env.create_namespace("tenant-owned").await?;
    namespaces
        .patch(
            &tenant_ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"portcullis.dev/tenant": "acme"}}})),
        )
        .await?;
    match Api::<Pod>::namespaced(admin.clone(), &tenant_ns)
        .create(&PostParams::default(), &pod)
        .await
    {
        Ok(_) => bail!("a pod in a tenant namespace was admitted without the injector"),
        Err(e) => ensure!(
            e.to_string().contains("tenant-inject.portcullis.dev"),
            "unexpected refusal: {e}"
        ),
    }
    // Not opted in: the injector is never called.
    let plain = env.create_namespace("plain").await?;
    Api::<Pod>::namespaced(admin.clone(), &plain)
        .create(&PostParams::default(), &pod)
        .await
        .context("a pod in a namespace that did not opt in must not reach the injector")?;

    // 3. The operator patches its caBundle (field manager portcullis-operator).
    patch_ca_bundles(&admin, &namespace, env.serving_ca_pem()).await?;
    let bundles_before = (
        ca_bundles_mutating(&mutating.get("portcullis-injector").await?),
        ca_bundles_validating(&validating.get("portcullis-validator").await?),
    );
    ensure!(
        bundles_before
            .0
            .iter()
            .chain(&bundles_before.1)
            .all(Option::is_some)
    );

    // 4. helm upgrade with changed values: server-side (helm 4's default), then
    // client-side (helm 3's three-way merge).
    let upgrades: [(&str, &[&str]); 2] = [
        (
            "true",
            &[
                "--set",
                "replicas=3",
                "--set",
                "identity.rotationPeriod=48h",
                "--set",
                "webhook.failurePolicy=Ignore",
            ],
        ),
        (
            "false",
            &[
                "--set",
                "replicas=2",
                "--set",
                "identity.rotationPeriod=36h",
                "--set",
                "webhook.failurePolicy=Ignore",
            ],
        ),
    ];
    for (server_side, sets) in upgrades {
        let mut args: Vec<String> = vec![
            "upgrade".into(),
            RELEASE.into(),
            chart.clone(),
            "--namespace".into(),
            namespace.clone(),
            format!("--server-side={server_side}"),
            "--set".into(),
            "webhook.timeoutSeconds=1".into(),
        ];
        args.extend(sets.iter().map(|s| (*s).to_owned()));
        helm.run_async(args, kubeconfig.clone()).await?.ok()?;

        let deployment = deployments.get("portcullis-operator").await?;
        let replicas = deployment.spec.as_ref().and_then(|s| s.replicas);
        let expected_replicas = if server_side == "true" { 3 } else { 2 };
        ensure!(
            replicas == Some(expected_replicas),
            "server-side={server_side}: replicas {replicas:?}"
        );
        let period = deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers.first())
            .and_then(|c| c.env.as_ref())
            .and_then(|env| env.iter().find(|e| e.name == "PORTCULLIS_ROTATION_PERIOD"))
            .and_then(|e| e.value.clone());
        let expected_period = if server_side == "true" { "48h" } else { "36h" };
        ensure!(
            period.as_deref() == Some(expected_period),
            "rotation period {period:?}"
        );

        let injector = mutating.get("portcullis-injector").await?;
        let validator = validating.get("portcullis-validator").await?;
        for hook in injector.webhooks.iter().flatten() {
            ensure!(
                hook.failure_policy.as_deref() == Some("Ignore"),
                "upgrade did not set failurePolicy"
            );
        }
        ensure!(
            (
                ca_bundles_mutating(&injector),
                ca_bundles_validating(&validator)
            ) == bundles_before,
            "helm upgrade (server-side={server_side}) changed the caBundle the operator set"
        );
        ensure!(
            secret_rv_and_data(&secrets.get("portcullis-ca-root").await?) == ca_root_before,
            "helm upgrade (server-side={server_side}) changed portcullis-ca-root"
        );
    }

    Ok(Release {
        namespace,
        service_account: "portcullis-operator".to_owned(),
    })
}

#[tokio::test]
async fn helm_install_and_upgrade_keep_the_operator_state() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let Some((env, release)) = release().await? else {
        return Ok(());
    };
    // install_and_upgrade checked everything; confirm the release is what helm reports.
    let helm = Helm::find().context("helm")?;
    let status = helm
        .run_async(
            vec![
                "status".into(),
                RELEASE.into(),
                "--namespace".into(),
                release.namespace.clone(),
                "-o".into(),
                "json".into(),
            ],
            env.kubeconfig_path().to_path_buf(),
        )
        .await?;
    status.ok()?;
    let status: Value = serde_json::from_str(&status.stdout)?;
    assert_eq!(status["info"]["status"], "deployed");
    assert_eq!(status["version"], 3, "install + two upgrades");
    Ok(())
}
