//! Chart files, lint, template and schema: helm only, no API server.

use super::*;

#[test]
fn chart_crds_are_the_generated_crds() -> Result<()> {
    let generated = repo_root().join("crds");
    let chart = chart_dir().join("crds");
    let yaml_files = |dir: &Path| -> Result<BTreeSet<String>> {
        let mut names = BTreeSet::new();
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.ends_with(".yaml") || name.ends_with(".yml") {
                names.insert(name);
            }
        }
        Ok(names)
    };
    let generated_files = yaml_files(&generated)?;
    let chart_files = yaml_files(&chart)?;
    ensure!(
        generated_files.len() >= 3,
        "expected the tenants, roles and apikeys CRDs in {}",
        generated.display()
    );
    ensure!(
        generated_files == chart_files,
        "charts/portcullis/crds/ must hold exactly the CRDs of crds/ (as symlinks: \
         cd charts/portcullis/crds && ln -s ../../../crds/<file> .)\n  crds/: {generated_files:?}\n  \
         chart: {chart_files:?}"
    );
    for file in &chart_files {
        let link = chart.join(file);
        let target = std::fs::read_link(&link).with_context(|| {
            format!(
                "{} is not a symlink; replace it with one to ../../../crds/{file} so the chart \
                 can never drift from the generated CRDs",
                link.display()
            )
        })?;
        ensure!(
            target == Path::new("../../../crds").join(file),
            "{} points at {}, expected ../../../crds/{file}",
            link.display(),
            target.display()
        );
        ensure!(
            std::fs::read(&link)? == std::fs::read(generated.join(file))?,
            "{} differs from crds/{file}",
            link.display()
        );
    }
    Ok(())
}

#[test]
fn helm_lint_passes_with_default_and_non_default_values() -> Result<()> {
    let Some(helm) = Helm::find() else {
        return Ok(());
    };
    let chart = chart_dir();
    let chart = chart.to_string_lossy();
    let out = helm.run(&["lint", "--strict", &chart], None)?;
    out.ok()?;
    assert!(
        out.stdout.contains("1 chart(s) linted, 0 chart(s) failed"),
        "{}",
        out.stdout
    );

    let mut values_files: Vec<PathBuf> = std::fs::read_dir(chart_dir().join("ci"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with("-values.yaml"))
        .collect();
    values_files.push(repo_root().join("e2e").join("kind").join("values.yaml"));
    ensure!(values_files.len() >= 2, "no ci/*-values.yaml in the chart");
    for values in &values_files {
        let values = values.to_string_lossy();
        let out = helm.run(&["lint", "--strict", &chart, "-f", &values], None)?;
        out.ok()?;
    }
    Ok(())
}

#[test]
fn helm_template_renders_the_contract() -> Result<()> {
    let Some(helm) = Helm::find() else {
        return Ok(());
    };
    let objects = helm.render(&[])?;

    // The operator's Secrets are the operator's: the chart renders no Secret at all.
    assert_eq!(
        kinds(&objects, "Secret"),
        0,
        "the chart must not render Secrets"
    );
    for object in &objects {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        assert!(
            !matches!(
                name,
                "portcullis-ca-root"
                    | "portcullis-ca-intermediate"
                    | "portcullis-kek"
                    | "portcullis-webhook-ca"
            ),
            "the chart renders {}/{name}",
            object["kind"]
        );
        // Standard labels everywhere.
        let labels = &object["metadata"]["labels"];
        assert_eq!(labels["app.kubernetes.io/name"], "portcullis", "{name}");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "Helm", "{name}");
        assert!(
            labels["helm.sh/chart"]
                .as_str()
                .is_some_and(|c| c.starts_with("portcullis-"))
        );
    }

    // Deployment: 2 replicas, hardened, probes, POD_NAMESPACE, ports.
    let deployment = find(&objects, "Deployment", "portcullis-operator")?;
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "portcullis-operator");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
            ["topologyKey"],
        "kubernetes.io/hostname"
    );
    let container = &pod["containers"][0];
    assert_eq!(container["args"], json!(["run"]));
    assert_eq!(
        container["image"],
        "ghcr.io/portcullis-dev/portcullis-operator:0.1.0"
    );
    let security = &container["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(
        env_value(container, "POD_NAMESPACE").map(|e| &e["valueFrom"]["fieldRef"]["fieldPath"]),
        Some(&json!("metadata.namespace"))
    );
    let ports: BTreeMap<String, i64> = container["ports"]
        .as_array()
        .context("container ports")?
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["containerPort"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        ports,
        BTreeMap::from([
            ("metrics".to_owned(), 8080),
            ("identity".to_owned(), 8443),
            ("policy".to_owned(), 8090),
            ("webhook".to_owned(), 9443),
        ])
    );
    let setting = |name: &str| {
        env_value(container, name)
            .and_then(|e| e["value"].as_str())
            .map(str::to_owned)
    };
    assert_eq!(
        setting("PORTCULLIS_TRUST_DOMAIN").as_deref(),
        Some("cluster.local")
    );
    assert_eq!(
        setting("PORTCULLIS_ROTATION_PERIOD").as_deref(),
        Some("72h")
    );
    assert_eq!(
        setting("PORTCULLIS_INTERMEDIATE_ROTATION_PERIOD").as_deref(),
        Some("720h")
    );
    assert_eq!(
        setting("PORTCULLIS_ROOT_ROTATION_PERIOD").as_deref(),
        Some("8760h")
    );
    assert_eq!(
        setting("PORTCULLIS_KEY_ROTATION_OVERLAP").as_deref(),
        Some("1h")
    );
    assert_eq!(
        setting("PORTCULLIS_LEADER_ELECTION").as_deref(),
        Some("true")
    );
    assert_eq!(
        setting("PORTCULLIS_LEASE_NAME").as_deref(),
        Some("portcullis-operator")
    );
    assert_eq!(
        setting("PORTCULLIS_PROXY_IMAGE").as_deref(),
        Some("ghcr.io/portcullis-dev/portcullis-proxy:0.1.0")
    );

    // Services: one name for what sidecars and the API server call (identity 8443,
    // policy 8090, webhook 443 → 9443), and metrics 8080.
    let service_ports = |name: &str| -> Result<Vec<(i64, String)>> {
        let service = find(&objects, "Service", name)?;
        Ok(service["spec"]["ports"]
            .as_array()
            .context("service ports")?
            .iter()
            .map(|p| {
                (
                    p["port"].as_i64().unwrap_or(0),
                    p["targetPort"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect())
    };
    assert_eq!(
        service_ports("portcullis-operator")?,
        [
            (8443, "identity".to_owned()),
            (8090, "policy".to_owned()),
            (443, "webhook".to_owned()),
            (9443, "webhook".to_owned()),
        ]
    );
    assert_eq!(
        service_ports("portcullis-operator-metrics")?,
        [(8080, "metrics".to_owned())]
    );

    // The webhook configurations have the shape the operator builds
    // (portcullis_operator::webhook::config), apart from the Service port (443 here) and
    // a longer list of excluded namespaces; no caBundle (the operator owns it).
    let settings = WebhookConfigSettings::in_cluster(TEMPLATE_NAMESPACE, "portcullis-operator");
    let expected_injector = serde_json::to_value(operator_mutating(&settings))?;
    let expected_validator = serde_json::to_value(operator_validating(&settings))?;
    let injector = find(
        &objects,
        "MutatingWebhookConfiguration",
        "portcullis-injector",
    )?;
    let validator = find(
        &objects,
        "ValidatingWebhookConfiguration",
        "portcullis-validator",
    )?;
    for (rendered, expected) in [
        (injector, &expected_injector),
        (validator, &expected_validator),
    ] {
        let rendered_hooks = rendered["webhooks"].as_array().context("webhooks")?;
        let expected_hooks = expected["webhooks"]
            .as_array()
            .context("operator webhooks")?;
        let names = |hooks: &[Value]| hooks.iter().map(|h| h["name"].clone()).collect::<Vec<_>>();
        assert_eq!(names(rendered_hooks), names(expected_hooks));
        for (hook, want) in rendered_hooks.iter().zip(expected_hooks) {
            let name = &hook["name"];
            for field in [
                "admissionReviewVersions",
                "failurePolicy",
                "matchPolicy",
                "reinvocationPolicy",
                "rules",
                "sideEffects",
                "timeoutSeconds",
            ] {
                assert_eq!(hook.get(field), want.get(field), "{name}: {field}");
            }
            let service = &hook["clientConfig"]["service"];
            assert_eq!(service["name"], "portcullis-operator", "{name}");
            assert_eq!(service["namespace"], TEMPLATE_NAMESPACE, "{name}");
            assert_eq!(
                service["path"], want["clientConfig"]["service"]["path"],
                "{name}"
            );
            assert_eq!(service["port"], 443, "{name}");
            assert!(
                hook["clientConfig"].get("caBundle").is_none(),
                "{name}: the chart must not set caBundle"
            );
            // Same selector, except that the chart excludes more namespaces.
            let split = |hook: &Value| -> (Vec<Value>, Vec<String>) {
                let expressions = hook["namespaceSelector"]["matchExpressions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let excluded = expressions
                    .iter()
                    .find(|e| e["key"] == "kubernetes.io/metadata.name" && e["operator"] == "NotIn")
                    .map(|e| str_list(&e["values"]))
                    .unwrap_or_default();
                let rest = expressions
                    .into_iter()
                    .filter(|e| e["key"] != "kubernetes.io/metadata.name")
                    .collect();
                (rest, excluded)
            };
            let (rendered_selector, rendered_excluded) = split(hook);
            let (expected_selector, expected_excluded) = split(want);
            assert_eq!(
                rendered_selector, expected_selector,
                "{name}: namespaceSelector"
            );
            // Where the operator excludes namespaces (the injector), the chart excludes
            // at least those, kube-system and the release namespace.
            let required: &[&str] = if expected_excluded.is_empty() {
                &[]
            } else {
                &["kube-system", TEMPLATE_NAMESPACE]
            };
            for namespace in expected_excluded
                .iter()
                .map(String::as_str)
                .chain(required.iter().copied())
            {
                assert!(
                    rendered_excluded.iter().any(|n| n == namespace),
                    "{name}: {namespace} not excluded"
                );
            }
        }
    }
    // And the contract itself, spelled out.
    let hooks = injector["webhooks"].as_array().context("webhooks")?;
    assert_eq!(
        hooks.len(),
        2,
        "label opt-in and tenant opt-in are two entries"
    );
    assert_eq!(hooks[0]["name"], "inject.portcullis.dev");
    assert_eq!(hooks[1]["name"], "tenant-inject.portcullis.dev");
    for hook in hooks {
        assert_eq!(hook["failurePolicy"], "Fail");
        assert_eq!(hook["clientConfig"]["service"]["path"], "/inject");
        assert_eq!(hook["rules"][0]["operations"], json!(["CREATE", "UPDATE"]));
        assert_eq!(
            hook["rules"][0]["resources"],
            json!(["pods", "pods/ephemeralcontainers"])
        );
    }
    let hook = &validator["webhooks"][0];
    assert_eq!(hook["name"], "validate.portcullis.dev");
    assert_eq!(hook["failurePolicy"], "Fail");
    assert_eq!(hook["clientConfig"]["service"]["path"], "/validate");
    let mut resources: Vec<String> = hook["rules"]
        .as_array()
        .context("rules")?
        .iter()
        .flat_map(|r| str_list(&r["resources"]))
        .collect();
    resources.sort();
    assert_eq!(resources, ["apikeys", "roles", "tenants"]);
    for rule in hook["rules"].as_array().context("rules")? {
        assert_eq!(rule["apiGroups"], json!(["portcullis.dev"]));
        assert_eq!(rule["operations"], json!(["CREATE", "UPDATE", "DELETE"]));
    }

    // RBAC: least privilege, no wildcards, no escalate/impersonate, and `bind` only on
    // the tenant-secrets ClusterRole (which the operator binds per tenant namespace).
    for (kind, name) in [
        ("ClusterRole", "portcullis-operator"),
        ("Role", "portcullis-operator"),
        ("ClusterRole", TENANT_SECRETS_ROLE),
    ] {
        for rule in find(&objects, kind, name)?["rules"]
            .as_array()
            .context("rules")?
        {
            for field in ["apiGroups", "resources", "verbs"] {
                assert!(
                    !str_list(&rule[field]).iter().any(|v| v == "*"),
                    "{kind} wildcard: {rule}"
                );
            }
            for verb in str_list(&rule["verbs"]) {
                assert!(
                    !matches!(verb.as_str(), "escalate" | "impersonate"),
                    "{kind} grants {verb}"
                );
                if verb == "bind" {
                    assert_eq!(
                        (
                            str_list(&rule["resources"]),
                            str_list(&rule["resourceNames"])
                        ),
                        (
                            vec!["clusterroles".to_owned()],
                            vec![TENANT_SECRETS_ROLE.to_owned()]
                        ),
                        "{kind} grants bind beyond the tenant-secrets ClusterRole: {rule}"
                    );
                }
            }
        }
    }
    // Secrets: never in the cluster-wide ClusterRole, and the ClusterRole that grants
    // them in tenant namespaces is bound by nothing in the chart.
    let cluster_rules = find(&objects, "ClusterRole", "portcullis-operator")?["rules"].clone();
    for rule in cluster_rules.as_array().context("rules")? {
        assert!(
            !str_list(&rule["resources"]).iter().any(|r| r == "secrets"),
            "Secrets granted cluster-wide: {rule}"
        );
    }
    for object in &objects {
        if matches!(
            object["kind"].as_str(),
            Some("ClusterRoleBinding" | "RoleBinding")
        ) {
            assert_ne!(
                object["roleRef"]["name"], TENANT_SECRETS_ROLE,
                "the chart binds the tenant-secrets ClusterRole: {object}"
            );
        }
    }
    let binding = find(&objects, "ClusterRoleBinding", "portcullis-operator")?;
    assert_eq!(binding["subjects"][0]["name"], "portcullis-operator");
    assert_eq!(binding["subjects"][0]["namespace"], TEMPLATE_NAMESPACE);

    // PDB with 2 replicas (policy/v1 for the default 1.21+ capabilities); none with 1.
    let pdb = find(&objects, "PodDisruptionBudget", "portcullis-operator")?;
    assert_eq!(pdb["apiVersion"], "policy/v1");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    let single = helm.render(&["--set", "replicas=1"])?;
    assert_eq!(
        kinds(&single, "PodDisruptionBudget"),
        0,
        "no PDB for one replica"
    );
    let old = helm.render(&["--kube-version", "1.20.2"])?;
    assert_eq!(
        find(&old, "PodDisruptionBudget", "portcullis-operator")?["apiVersion"],
        "policy/v1beta1"
    );

    // ServiceMonitor: never by default; when enabled only where the CRD is served.
    assert_eq!(kinds(&objects, "ServiceMonitor"), 0);
    let without_crd = helm.render(&["--set", "metrics.serviceMonitor.enabled=true"])?;
    assert_eq!(
        kinds(&without_crd, "ServiceMonitor"),
        0,
        "no ServiceMonitor without its CRD"
    );
    let with_crd = helm.render(&[
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--api-versions",
        "monitoring.coreos.com/v1/ServiceMonitor",
    ])?;
    assert_eq!(kinds(&with_crd, "ServiceMonitor"), 1);

    // CRDs come with the chart (crds/, installed by helm install, never templated).
    assert_eq!(kinds(&objects, "CustomResourceDefinition"), 0);
    let with_crds = helm.render(&["--include-crds"])?;
    let crds: BTreeSet<String> = with_crds
        .iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        crds,
        BTreeSet::from([
            "apikeys.portcullis.dev".to_owned(),
            "roles.portcullis.dev".to_owned(),
            "tenants.portcullis.dev".to_owned()
        ])
    );
    Ok(())
}

/// The rendered NetworkPolicy's ingress rules as (ports, peers).
fn network_policy_rules(objects: &[Value], name: &str) -> Result<Vec<(Vec<String>, Vec<Value>)>> {
    let policy = find(objects, "NetworkPolicy", name)?;
    Ok(policy["spec"]["ingress"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|rule| {
            let ports = rule["ports"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|p| p["port"].as_str().unwrap_or_default().to_owned())
                .collect();
            let peers = rule["from"].as_array().cloned().unwrap_or_default();
            (ports, peers)
        })
        .collect())
}

#[test]
fn only_the_api_server_and_meshed_pods_reach_the_operator_ports() -> Result<()> {
    let Some(helm) = Helm::find() else {
        return Ok(());
    };
    let objects = helm.render(&[])?;
    let policy = find(&objects, "NetworkPolicy", "portcullis-operator")?;
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "operator"
    );
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
    let rules = network_policy_rules(&objects, "portcullis-operator")?;
    assert_eq!(rules.len(), 4, "{rules:?}");
    // Every container port is covered by a rule; nothing else gets in.
    let deployment = find(&objects, "Deployment", "portcullis-operator")?;
    let mut named: Vec<String> = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|p| p["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    named.sort();
    let mut covered: Vec<String> = rules.iter().flat_map(|(p, _)| p.clone()).collect();
    covered.sort();
    covered.dedup();
    assert_eq!(covered, named);
    // The webhooks: by default every address (the API server's is not known in
    // general), as ipBlocks only — so `except` can carve out pod CIDRs.
    let (ports, peers) = &rules[0];
    assert_eq!(ports, &["webhook"]);
    assert_eq!(
        peers,
        &[
            json!({"ipBlock": {"cidr": "0.0.0.0/0"}}),
            json!({"ipBlock": {"cidr": "::/0"}})
        ]
    );
    // Identity and policy: only injected pods, in any namespace.
    let (ports, peers) = &rules[1];
    assert_eq!(ports, &["identity", "policy"]);
    assert_eq!(
        peers,
        &[
            json!({"namespaceSelector": {}, "podSelector": {"matchLabels": {"portcullis.dev/injected": "true"}}})
        ]
    );
    // Policy: also the audit collector's pods (tenant keys).
    let (ports, peers) = &rules[2];
    assert_eq!(ports, &["policy"]);
    assert_eq!(
        peers[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "audit"
    );
    // Metrics and health: anyone by default (kubelet probes, Prometheus anywhere).
    let (ports, peers) = &rules[3];
    assert_eq!(ports, &["metrics"]);
    assert!(peers.is_empty());

    // Pod CIDRs carved out per address family; the policy can be turned off.
    let carved = helm.render(&[
        "--set",
        "networkPolicy.webhook.except={10.244.0.0/16,fd00:10:244::/56}",
    ])?;
    let (_, peers) = &network_policy_rules(&carved, "portcullis-operator")?[0];
    assert_eq!(
        peers,
        &[
            json!({"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16"]}}),
            json!({"ipBlock": {"cidr": "::/0", "except": ["fd00:10:244::/56"]}})
        ]
    );
    let off = helm.render(&["--set", "networkPolicy.enabled=false"])?;
    assert_eq!(kinds(&off, "NetworkPolicy"), 0);
    Ok(())
}

#[test]
fn helm_template_follows_non_default_values() -> Result<()> {
    let Some(helm) = Helm::find() else {
        return Ok(());
    };
    let values = chart_dir().join("ci").join("non-default-values.yaml");
    let values = values.to_string_lossy();
    let objects = helm.render(&[
        "-f",
        &values,
        "--api-versions",
        "monitoring.coreos.com/v1/ServiceMonitor",
    ])?;
    let deployment = find(&objects, "Deployment", "pc-operator")?;
    assert_eq!(deployment["spec"]["replicas"], 3);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "portcullis");
    assert!(
        pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            .is_array()
    );
    let container = &pod["containers"][0];
    assert_eq!(
        container["image"],
        "registry.example.com/portcullis/portcullis-operator@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    );
    let setting = |name: &str| {
        env_value(container, name)
            .and_then(|e| e["value"].as_str())
            .map(str::to_owned)
    };
    assert_eq!(
        setting("PORTCULLIS_TRUST_DOMAIN").as_deref(),
        Some("prod.example.com")
    );
    assert_eq!(
        setting("PORTCULLIS_ROTATION_PERIOD").as_deref(),
        Some("24h")
    );
    assert_eq!(setting("PORTCULLIS_KEY_HASH_COST").as_deref(), Some("11"));
    assert_eq!(
        setting("PORTCULLIS_KEK_SECRET").as_deref(),
        Some("portcullis-kek-from-kms")
    );
    assert_eq!(
        setting("PORTCULLIS_RESTRICTED_REQUIRES_HARDWARE_KEK").as_deref(),
        Some("true")
    );
    assert_eq!(setting("PORTCULLIS_LOG_JSON").as_deref(), Some("false"));
    assert_eq!(
        setting("PORTCULLIS_PROXY_IMAGE").as_deref(),
        Some("registry.example.com/portcullis/portcullis-proxy:0.1.0-rc.1")
    );
    assert_eq!(
        setting("PORTCULLIS_EXCLUDED_NAMESPACES").as_deref(),
        Some("kube-system,monitoring,portcullis-system"),
        "kube-system and the release namespace are excluded whatever the list says"
    );
    assert_eq!(
        find(&objects, "PodDisruptionBudget", "pc-operator")?["spec"]["minAvailable"],
        2
    );
    let injector = find(
        &objects,
        "MutatingWebhookConfiguration",
        "portcullis-injector",
    )?;
    for hook in injector["webhooks"].as_array().context("webhooks")? {
        assert_eq!(hook["failurePolicy"], "Ignore");
        assert_eq!(hook["timeoutSeconds"], 5);
        assert_eq!(hook["clientConfig"]["service"]["name"], "pc-operator");
    }
    let rules = network_policy_rules(&objects, "pc-operator")?;
    assert_eq!(
        rules[0].1,
        [
            json!({"ipBlock": {"cidr": "10.0.0.0/24", "except": ["10.0.0.128/25"]}}),
            json!({"ipBlock": {"cidr": "fd00:10::/64"}})
        ]
    );
    let metrics = rules
        .iter()
        .find(|(ports, _)| ports == &["metrics"])
        .context("a metrics rule")?;
    assert_eq!(
        metrics.1,
        [json!({"namespaceSelector": {"matchLabels": {"team": "monitoring"}}})]
    );
    let monitor = find(&objects, "ServiceMonitor", "pc-operator")?;
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(monitor["spec"]["endpoints"][0]["interval"], "15s");
    let binding = find(&objects, "ClusterRoleBinding", "pc-operator")?;
    assert_eq!(binding["subjects"][0]["name"], "portcullis");
    Ok(())
}

#[test]
fn schema_refuses_bad_values_naming_the_field() -> Result<()> {
    let Some(helm) = Helm::find() else {
        return Ok(());
    };
    let chart = chart_dir();
    let chart = chart.to_string_lossy();
    let cases: [(&str, &[&str]); 7] = [
        ("replicas=-1", &["/replicas", "minimum"]),
        (
            "identity.rotationPeriod=3days",
            &[
                "/identity/rotationPeriod",
                "3days",
                "does not match pattern",
            ],
        ),
        ("replicaCount=3", &["replicaCount", "not allowed"]),
        (
            "webhook.failurePolicy=Sometimes",
            &["/webhook/failurePolicy", "one of 'Fail', 'Ignore'"],
        ),
        (
            "webhook.timeoutSeconds=31",
            &["/webhook/timeoutSeconds", "maximum"],
        ),
        (
            "apiKeys.rotationOverlap=soon",
            &["/apiKeys/rotationOverlap", "does not match pattern"],
        ),
        (
            "networkPolicy.webhook.apiServerCIDRs={apiserver.example.com}",
            &[
                "/networkPolicy/webhook/apiServerCIDRs/0",
                "does not match pattern",
            ],
        ),
    ];
    for (set, expected) in cases {
        let out = helm.run(&["template", RELEASE, &chart, "--set", set], None)?;
        assert!(!out.success, "helm accepted --set {set}");
        assert!(
            out.stderr
                .contains("values don't meet the specifications of the schema"),
            "--set {set}: {}",
            out.stderr
        );
        for needle in expected {
            assert!(
                out.stderr.contains(needle),
                "--set {set}: stderr lacks {needle:?}:\n{}",
                out.stderr
            );
        }
    }
    // The same refusal from a values file, as users meet it.
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "replicaCount: 3\nidentity:\n  rotationPeriod: 3days\n",
    )?;
    let out = helm.run(&["lint", &chart, "-f", &bad.to_string_lossy()], None)?;
    assert!(!out.success);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        all.contains("replicaCount") && all.contains("/identity/rotationPeriod"),
        "{all}"
    );
    Ok(())
}

#[test]
fn the_audit_collector_is_installed_only_when_enabled_and_proxies_are_pointed_at_it() -> Result<()>
{
    let Some(helm) = Helm::find() else {
        return Ok(());
    };
    let defaults = helm.render(&[])?;
    assert_eq!(kinds(&defaults, "StatefulSet"), 1, "on by default");
    assert!(
        find(&defaults, "Role", "portcullis-audit-sink-secrets").is_err(),
        "no Secret is readable until sinkSecrets lists it"
    );
    let claim = &find(&defaults, "StatefulSet", "portcullis-audit")?["spec"]["volumeClaimTemplates"]
        [0]["spec"];
    assert_eq!(claim["resources"]["requests"]["storage"], "10Gi");
    assert!(
        claim.get("storageClassName").is_none(),
        "the cluster's default"
    );
    let off = helm.render(&["--set", "audit.collector.enabled=false"])?;
    assert_eq!(kinds(&off, "StatefulSet"), 0);
    let operator = &find(&off, "Deployment", "portcullis-operator")?["spec"]["template"]["spec"]["containers"]
        [0];
    assert!(env_value(operator, "PORTCULLIS_AUDIT_COLLECTOR_URL").is_none());

    let values = chart_dir().join("ci").join("non-default-values.yaml");
    let objects = helm.render(&["-f", &values.to_string_lossy()])?;
    let collector = find(&objects, "StatefulSet", "portcullis-audit")?;
    let pod = &collector["spec"]["template"]["spec"];
    assert_eq!(
        collector["spec"]["template"]["metadata"]["annotations"]["portcullis.dev/inject"],
        "disabled"
    );
    // Its own ServiceAccount, which may only ask who a token is and what it may do,
    // read and watch Tenants (their namespaces, retention and sinks) and write Events.
    assert_eq!(pod["serviceAccountName"], "portcullis-audit");
    let role = find(&objects, "ClusterRole", "portcullis-audit")?;
    let granted: Vec<String> = role["rules"]
        .as_array()
        .context("rules")?
        .iter()
        .map(|r| format!("{} {} {}", r["apiGroups"][0], r["resources"], r["verbs"]))
        .collect();
    assert_eq!(
        granted,
        [
            r#""authentication.k8s.io" ["tokenreviews"] ["create"]"#,
            r#""authorization.k8s.io" ["subjectaccessreviews"] ["create"]"#,
            r#""portcullis.dev" ["tenants"] ["get","list","watch"]"#,
            r#""events.k8s.io" ["events"] ["create"]"#,
        ]
    );
    // SIEM tokens: `get` on exactly the listed Secrets, in the release namespace only.
    let sink_secrets = find(&objects, "Role", "portcullis-audit-sink-secrets")?;
    assert_eq!(sink_secrets["metadata"]["namespace"], TEMPLATE_NAMESPACE);
    assert_eq!(
        sink_secrets["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["secrets"],
                            "resourceNames": ["splunk-hec", "datadog-key"], "verbs": ["get"]}])
    );
    let binding = find(&objects, "RoleBinding", "portcullis-audit-sink-secrets")?;
    assert_eq!(binding["subjects"][0]["name"], "portcullis-audit");
    let container = &pod["containers"][0];
    assert_eq!(container["args"][0], "audit-server");
    assert_eq!(
        env_value(container, "PORTCULLIS_AUDIT_RETENTION_DAYS").map(|e| &e["value"]),
        Some(&Value::from("2555"))
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    let volumes = pod["volumes"].as_array().context("volumes")?;
    assert!(
        volumes
            .iter()
            .any(|v| v["secret"]["secretName"] == "portcullis-audit-tls"),
        "the operator-written certificate is mounted"
    );
    let claim = &collector["spec"]["volumeClaimTemplates"][0]["spec"];
    assert_eq!(claim["resources"]["requests"]["storage"], "50Gi");
    assert_eq!(claim["storageClassName"], "fast-ssd");
    let service = find(&objects, "Service", "portcullis-audit")?;
    assert_eq!(service["spec"]["ports"][0]["port"], 8091);
    // Tenant keys come from the operator's policy server, which lets the collector's
    // pods (and only them, besides injected pods) in.
    assert_eq!(
        env_value(container, "PORTCULLIS_AUDIT_KEY_URL").map(|e| &e["value"]),
        Some(&Value::from(format!(
            "https://pc-operator.{TEMPLATE_NAMESPACE}.svc:8090"
        )))
    );
    let rules = network_policy_rules(&objects, "pc-operator")?;
    let collector_peer =
        json!({"podSelector": {"matchLabels": collector["spec"]["selector"]["matchLabels"]}});
    assert!(
        rules
            .iter()
            .any(|(ports, peers)| ports == &["policy"]
                && peers == std::slice::from_ref(&collector_peer)),
        "{rules:?}"
    );

    let operator =
        &find(&objects, "Deployment", "pc-operator")?["spec"]["template"]["spec"]["containers"][0];
    let setting = |name: &str| env_value(operator, name).map(|e| e["value"].clone());
    assert_eq!(
        setting("PORTCULLIS_AUDIT_SERVICE"),
        Some(Value::from("portcullis-audit"))
    );
    assert_eq!(
        setting("PORTCULLIS_AUDIT_COLLECTOR_URL"),
        Some(Value::from(format!(
            "https://portcullis-audit.{TEMPLATE_NAMESPACE}.svc:8091"
        )))
    );
    Ok(())
}

#[test]
fn helm_template_wires_the_pkcs11_kek() -> Result<()> {
    let Some(helm) = Helm::find() else {
        return Ok(());
    };
    let operator = |objects: &[Value]| -> Result<Value> {
        Ok(find(objects, "Deployment", "portcullis-operator")?["spec"]["template"]["spec"].clone())
    };
    // The default: a Secret, no HSM settings, no extra volumes.
    let pod = operator(&helm.render(&[])?)?;
    let container = &pod["containers"][0];
    assert!(env_value(container, "PORTCULLIS_KEK_PROVIDER").is_none());
    assert!(env_value(container, "PORTCULLIS_PKCS11_MODULE").is_none());
    assert!(!pod.to_string().contains("pkcs11"));

    let hsm = [
        "--set",
        "kek.provider=pkcs11",
        "--set",
        "kek.pkcs11.module=/opt/hsm/lib/libvendor-pkcs11.so",
        "--set",
        "kek.pkcs11.moduleHostPath=/opt/hsm/lib",
        "--set",
        "kek.pkcs11.tokenLabel=portcullis",
        "--set",
        "kek.pkcs11.pinSecret.name=hsm-pin",
    ];
    let pod = operator(&helm.render(&hsm)?)?;
    let container = &pod["containers"][0];
    let setting = |name: &str| {
        env_value(container, name)
            .and_then(|e| e["value"].as_str())
            .map(str::to_owned)
    };
    assert_eq!(
        setting("PORTCULLIS_KEK_PROVIDER").as_deref(),
        Some("pkcs11")
    );
    assert_eq!(
        setting("PORTCULLIS_PKCS11_MODULE").as_deref(),
        Some("/opt/hsm/lib/libvendor-pkcs11.so")
    );
    assert_eq!(
        setting("PORTCULLIS_PKCS11_TOKEN_LABEL").as_deref(),
        Some("portcullis")
    );
    assert_eq!(setting("PORTCULLIS_PKCS11_SLOT"), None);
    assert_eq!(
        setting("PORTCULLIS_PKCS11_KEY_LABEL").as_deref(),
        Some("portcullis-kek")
    );
    let pin_file = setting("PORTCULLIS_PKCS11_PIN_FILE").unwrap_or_default();
    let volume = |name: &str| {
        pod["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == name))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let mount = |name: &str| {
        container["volumeMounts"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == name))
            .cloned()
            .unwrap_or(Value::Null)
    };
    // The PIN: the Secret's key mounted read-only as the file the operator reads.
    let pin = volume("pkcs11-pin");
    assert_eq!(pin["secret"]["secretName"], "hsm-pin");
    assert_eq!(pin["secret"]["items"][0]["key"], "pin");
    let pin_mount = mount("pkcs11-pin");
    assert_eq!(pin_mount["readOnly"], true);
    assert_eq!(
        format!(
            "{}/{}",
            pin_mount["mountPath"].as_str().unwrap_or_default(),
            pin["secret"]["items"][0]["path"]
                .as_str()
                .unwrap_or_default()
        ),
        pin_file
    );
    // The module from the node, read-only, where --pkcs11-module looks for it.
    assert_eq!(volume("pkcs11-module")["hostPath"]["path"], "/opt/hsm/lib");
    assert_eq!(mount("pkcs11-module")["mountPath"], "/opt/hsm/lib");
    assert_eq!(mount("pkcs11-module")["readOnly"], true);

    // A slot instead of a label; no hostPath when the image carries the module.
    let by_slot = helm.render(&[
        "--set",
        "kek.provider=pkcs11",
        "--set",
        "kek.pkcs11.module=/usr/lib/softhsm/libsofthsm2.so",
        "--set",
        "kek.pkcs11.slot=0",
        "--set",
        "kek.pkcs11.pinSecret.name=hsm-pin",
    ])?;
    let pod = operator(&by_slot)?;
    let container = &pod["containers"][0];
    assert_eq!(
        env_value(container, "PORTCULLIS_PKCS11_SLOT").map(|e| e["value"].clone()),
        Some(Value::from("0"))
    );
    assert!(env_value(container, "PORTCULLIS_PKCS11_TOKEN_LABEL").is_none());
    assert!(!pod.to_string().contains("hostPath"));

    // What is missing or contradictory is named before anything is installed.
    let chart = chart_dir();
    let chart = chart.to_string_lossy();
    let without = |dropped: &str| -> Vec<&str> {
        let mut args = vec!["template", RELEASE, &*chart];
        for pair in hsm.chunks(2) {
            if !pair[1].starts_with(dropped) {
                args.extend_from_slice(pair);
            }
        }
        args
    };
    for (dropped, expected) in [
        ("kek.pkcs11.module", "needs kek.pkcs11.module"),
        (
            "kek.pkcs11.tokenLabel",
            "needs kek.pkcs11.tokenLabel or kek.pkcs11.slot",
        ),
        ("kek.pkcs11.pinSecret", "needs kek.pkcs11.pinSecret.name"),
    ] {
        let out = helm.run(&without(dropped), None)?;
        assert!(!out.success, "rendered without {dropped}");
        assert!(
            out.stderr.contains(expected),
            "without {dropped}: {}",
            out.stderr
        );
    }
    let mut both = without("nothing");
    both.extend_from_slice(&["--set", "operator.kekSecret=kek-from-vault"]);
    let out = helm.run(&both, None)?;
    assert!(
        !out.success && out.stderr.contains("exclude each other"),
        "{}",
        out.stderr
    );
    let out = helm.run(
        &["template", RELEASE, &chart, "--set", "kek.provider=hsm"],
        None,
    )?;
    assert!(
        !out.success && out.stderr.contains("/kek/provider"),
        "{}",
        out.stderr
    );
    Ok(())
}

#[test]
fn helm_template_wires_the_kms_kek() -> Result<()> {
    let Some(helm) = Helm::find() else {
        return Ok(());
    };
    let operator = |objects: &[Value]| -> Result<Value> {
        Ok(find(objects, "Deployment", "portcullis-operator")?["spec"]["template"]["spec"].clone())
    };
    // The default mounts no plugin socket.
    let pod = operator(&helm.render(&[])?)?;
    assert!(env_value(&pod["containers"][0], "PORTCULLIS_KMS_SOCKET").is_none());
    assert!(!pod.to_string().contains("kmsplugin"));

    let pod = operator(&helm.render(&["--set", "kek.provider=kms"])?)?;
    let container = &pod["containers"][0];
    let setting = |name: &str| {
        env_value(container, name)
            .and_then(|e| e["value"].as_str())
            .map(str::to_owned)
    };
    assert_eq!(setting("PORTCULLIS_KEK_PROVIDER").as_deref(), Some("kms"));
    assert_eq!(
        setting("PORTCULLIS_KMS_SOCKET").as_deref(),
        Some("/var/run/kmsplugin/socket.sock")
    );
    assert_eq!(setting("PORTCULLIS_KMS_TIMEOUT").as_deref(), Some("3s"));
    assert_eq!(setting("PORTCULLIS_PKCS11_MODULE"), None);
    // The socket's directory from the node, at the same path, as kube-apiserver has it.
    let volume = pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "kms-plugin"))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(volume["hostPath"]["path"], "/var/run/kmsplugin");
    assert_eq!(volume["hostPath"]["type"], "DirectoryOrCreate");
    let mount = container["volumeMounts"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "kms-plugin"))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(mount["mountPath"], "/var/run/kmsplugin");

    // Another socket and timeout.
    let pod = operator(&helm.render(&[
        "--set",
        "kek.provider=kms",
        "--set",
        "kek.kms.socket=/run/kms/aws/plugin.sock",
        "--set",
        "kek.kms.timeout=10s",
    ])?)?;
    let container = &pod["containers"][0];
    assert_eq!(
        env_value(container, "PORTCULLIS_KMS_SOCKET").map(|e| e["value"].clone()),
        Some(Value::from("/run/kms/aws/plugin.sock"))
    );
    assert_eq!(
        env_value(container, "PORTCULLIS_KMS_TIMEOUT").map(|e| e["value"].clone()),
        Some(Value::from("10s"))
    );
    assert!(pod.to_string().contains("\"path\":\"/run/kms/aws\""));

    // Contradictions and bad values are named before anything is installed.
    let chart = chart_dir();
    let chart = chart.to_string_lossy();
    for (extra, expected) in [
        ("operator.kekSecret=kek-from-vault", "exclude each other"),
        ("kek.kms.socket=relative.sock", "/kek/kms/socket"),
        ("kek.kms.timeout=soon", "/kek/kms/timeout"),
    ] {
        let out = helm.run(
            &[
                "template",
                RELEASE,
                &chart,
                "--set",
                "kek.provider=kms",
                "--set",
                extra,
            ],
            None,
        )?;
        assert!(
            !out.success && out.stderr.contains(expected),
            "{extra}: {}",
            out.stderr
        );
    }
    Ok(())
}
