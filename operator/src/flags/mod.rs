//! The flags of `portcullis-operator run`, grouped by what they configure (each group a
//! `clap::Args` flattened into the command, under its own help heading), and how they
//! become the operator's settings. Every flag also reads a `PORTCULLIS_*` variable,
//! which is how the chart sets them.

mod audit_server;
mod identity;
mod keys;
mod leader;
mod serving;
mod values;
mod webhooks;

pub use audit_server::AuditServerArgs;
pub(crate) use keys::Pkcs11Flags;

use clap::Args;
use portcullis_operator::run::OperatorSettings;

use identity::IdentityFlags;
use keys::KeyFlags;
use leader::LeaderFlags;
use serving::ServingFlags;
use values::dns_label;
use webhooks::{InjectFlags, WebhookFlags};

/// Everything `run` takes.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The operator's own namespace (KEK, CA and DEK Secrets, Lease).
    #[arg(long, env = "POD_NAMESPACE", default_value = "portcullis-system")]
    pub namespace: String,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "PORTCULLIS_LOG_JSON")]
    pub log_json: bool,
    #[command(flatten)]
    serving: ServingFlags,
    #[command(flatten)]
    webhooks: WebhookFlags,
    #[command(flatten)]
    inject: InjectFlags,
    #[command(flatten)]
    identity: IdentityFlags,
    #[command(flatten)]
    leader: LeaderFlags,
    #[command(flatten)]
    keys: KeyFlags,
}

impl RunArgs {
    /// The operator's settings, or what is wrong with the flags, naming them.
    pub fn settings(&self) -> anyhow::Result<OperatorSettings> {
        let namespace = dns_label(&self.namespace).map_err(|e| {
            anyhow::anyhow!("--namespace (POD_NAMESPACE) {:?}: {e}", self.namespace)
        })?;
        let mut settings = OperatorSettings::new(&namespace, &self.leader.identity());
        self.serving.apply(&mut settings);
        settings
            .cluster_domain
            .clone_from(&self.identity.cluster_domain);
        self.keys
            .apply(&mut settings, self.serving.service_account())?;
        self.leader.apply(&mut settings)?;
        settings.ca = self.identity.ca()?;
        settings.webhooks = self
            .webhooks
            .settings(&namespace, &self.serving, &self.inject);
        settings.audit_witness = self
            .serving
            .audit_witness(&namespace, self.webhooks.audit_collector_url.as_ref());
        Ok(settings)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use portcullis_operator::context::SecretsBinding;

    use super::*;

    /// `portcullis-operator run` as the binary parses it.
    #[derive(clap::Parser)]
    struct Run {
        #[command(flatten)]
        args: RunArgs,
    }

    /// Parses `portcullis-operator run <args>`; the process environment must not set
    /// these flags (clap reads `PORTCULLIS_*` too).
    fn parse(args: &[&str]) -> Result<RunArgs, String> {
        let argv = ["portcullis-operator run"].iter().chain(args);
        <Run as clap::Parser>::try_parse_from(argv)
            .map(|run| run.args)
            .map_err(|e| e.to_string())
    }

    fn settings(args: &[&str]) -> OperatorSettings {
        parse(args).unwrap().settings().unwrap()
    }

    #[test]
    fn the_audit_witness_runs_only_with_a_collector_to_witness() {
        assert!(
            settings(&["--audit-service", "portcullis-audit"])
                .audit_witness
                .is_none()
        );
        let s = settings(&[
            "--namespace",
            "ops",
            "--audit-service",
            "portcullis-audit",
            "--audit-collector-url",
            "https://portcullis-audit.ops.svc:8091",
            "--audit-witness-every",
            "30s",
        ]);
        let witness = s.audit_witness.unwrap();
        assert_eq!(witness.server_name, "portcullis-audit.ops.svc");
        assert_eq!(
            witness.collector_url,
            "https://portcullis-audit.ops.svc:8091"
        );
        assert_eq!(witness.every.as_secs(), 30);
        assert_eq!(
            witness.token_file.display().to_string(),
            "/var/run/secrets/kubernetes.io/serviceaccount/token"
        );
    }

    #[test]
    fn the_kek_secret_names_the_custody_restricted_tenants_are_told_of() {
        use portcullis_operator::kek_custody::KekCustody;
        let s = settings(&["--namespace", "ops"]);
        assert!(!s.restricted_requires_hardware_kek);
        assert_eq!(
            s.reconcile.kek_custody,
            KekCustody::Secret {
                namespace: "ops".into(),
                name: "portcullis-kek".into()
            }
        );
        let s = settings(&[
            "--namespace",
            "ops",
            "--kek-secret",
            "kek-from-vault",
            "--restricted-requires-hardware-kek",
        ]);
        assert!(s.restricted_requires_hardware_kek);
        assert_eq!(
            s.reconcile.kek_custody,
            KekCustody::Secret {
                namespace: "ops".into(),
                name: "kek-from-vault".into()
            }
        );
    }

    #[test]
    fn the_pkcs11_provider_takes_its_flags_and_is_hardware_custody() {
        use portcullis_operator::envelope::TokenSelector;
        use portcullis_operator::kek_custody::KekCustody;
        let pkcs11 = [
            "--kek-provider",
            "pkcs11",
            "--pkcs11-module",
            "/usr/lib/softhsm/libsofthsm2.so",
            "--pkcs11-token-label",
            "portcullis",
            "--pkcs11-key-label",
            "portcullis-kek",
            "--pkcs11-pin-file",
            "/var/run/portcullis/pkcs11/pin",
        ];
        let s = settings(&pkcs11);
        let config = s.kek_pkcs11.clone().unwrap();
        assert_eq!(config.token, TokenSelector::Label("portcullis".into()));
        assert_eq!(config.key_label, "portcullis-kek");
        assert_eq!(
            config.pin_file.display().to_string(),
            "/var/run/portcullis/pkcs11/pin"
        );
        assert_eq!(
            s.reconcile.kek_custody,
            KekCustody::Pkcs11 {
                module: "/usr/lib/softhsm/libsofthsm2.so".into(),
                token: "token \"portcullis\"".into(),
                key_label: "portcullis-kek".into(),
            }
        );
        assert!(s.reconcile.kek_custody.hardware_backed());
        // A slot instead of a label.
        let mut by_slot = pkcs11.to_vec();
        by_slot[4] = "--pkcs11-slot";
        by_slot[5] = "3";
        assert_eq!(
            settings(&by_slot).kek_pkcs11.unwrap().token,
            TokenSelector::Slot(3)
        );
        // The default stays the Secret, and no HSM is opened.
        assert!(settings(&[]).kek_pkcs11.is_none());

        // Each missing flag is named; mixing providers is refused.
        for (i, flag) in [
            (2, "--pkcs11-module"),
            (6, "--pkcs11-key-label"),
            (8, "--pkcs11-pin-file"),
        ] {
            let mut args = pkcs11.to_vec();
            args.drain(i..i + 2);
            let message = parse(&args).unwrap().settings().unwrap_err().to_string();
            assert!(message.contains(flag), "{flag}: {message}");
        }
        let mut args = pkcs11.to_vec();
        args.drain(4..6);
        let message = parse(&args).unwrap().settings().unwrap_err().to_string();
        assert!(
            message.contains("--pkcs11-token-label or --pkcs11-slot"),
            "{message}"
        );
        assert!(parse(&[&pkcs11[..], &["--pkcs11-slot", "1"]].concat()).is_err());
        let message = parse(&[&pkcs11[..], &["--kek-secret", "kek"]].concat())
            .unwrap()
            .settings()
            .unwrap_err()
            .to_string();
        assert!(message.contains("--kek-secret"), "{message}");
        let message = parse(&pkcs11[2..])
            .unwrap()
            .settings()
            .unwrap_err()
            .to_string();
        assert!(message.contains("--kek-provider pkcs11"), "{message}");
        assert!(parse(&["--kek-provider", "vault"]).is_err());
    }

    #[test]
    fn the_kms_provider_takes_its_flags_and_is_hardware_custody() {
        use portcullis_operator::kek_custody::KekCustody;
        let kms = [
            "--kek-provider",
            "kms",
            "--kms-socket",
            "/var/run/kmsplugin/socket.sock",
        ];
        let s = settings(&kms);
        let config = s.kek_kms.clone().unwrap();
        assert_eq!(
            config.socket.display().to_string(),
            "/var/run/kmsplugin/socket.sock"
        );
        assert_eq!(config.timeout, std::time::Duration::from_secs(3));
        assert!(s.kek_pkcs11.is_none());
        assert_eq!(
            s.reconcile.kek_custody,
            KekCustody::Kms {
                socket: "/var/run/kmsplugin/socket.sock".into()
            }
        );
        assert!(s.reconcile.kek_custody.hardware_backed());
        let s = settings(&[&kms[..], &["--kms-timeout", "500ms"]].concat());
        assert_eq!(
            s.kek_kms.unwrap().timeout,
            std::time::Duration::from_millis(500)
        );
        assert!(settings(&[]).kek_kms.is_none());

        let refused = |args: &[&str]| parse(args).unwrap().settings().unwrap_err().to_string();
        let message = refused(&kms[..2]);
        assert!(message.contains("--kms-socket"), "{message}");
        let message = refused(&kms[2..]);
        assert!(message.contains("--kek-provider kms"), "{message}");
        let message = refused(&[&kms[..], &["--kek-secret", "kek"]].concat());
        assert!(message.contains("--kek-secret"), "{message}");
        let message = refused(&[&kms[..], &["--pkcs11-key-label", "k"]].concat());
        assert!(message.contains("--pkcs11-*"), "{message}");
        let message = refused(&[&kms[..], &["--kms-timeout", "0s"]].concat());
        assert!(message.contains("--kms-timeout"), "{message}");
    }

    #[test]
    fn defaults_match_the_chart_and_the_design() {
        let s = settings(&["--namespace", "portcullis-system"]);
        assert_eq!(s.service_name, "portcullis-operator");
        assert_eq!(s.identity_addr.to_string(), "0.0.0.0:8443");
        assert_eq!(s.policy_addr.to_string(), "0.0.0.0:8090");
        assert!(!s.policy_insecure_debug);
        assert_eq!(s.ca.trust_domain.as_str(), "cluster.local");
        assert_eq!(s.ca.leaf_rotation_period.as_secs(), 72 * 3600);
        assert_eq!(s.ca.leaf_grace.as_secs(), 24 * 3600);
        assert_eq!(s.ca.intermediate_rotation_period.as_secs(), 720 * 3600);
        assert_eq!(s.ca.root_rotation_period.as_secs(), 8760 * 3600);
        assert_eq!(s.lease.lease_duration.as_secs(), 15);
        let w = s.webhooks.clone().unwrap();
        assert_eq!(w.addr.to_string(), "0.0.0.0:9443");
        assert_eq!(w.url, None);
        assert_eq!(w.mutating_configuration, "portcullis-injector");
        assert_eq!(w.validating_configuration, "portcullis-validator");
        assert_eq!(w.service_account, "portcullis-operator");
        assert_eq!(
            w.inject.identity_url,
            "https://portcullis-operator.portcullis-system.svc:8443"
        );
        assert_eq!(
            w.inject.policy_url,
            "https://portcullis-operator.portcullis-system.svc:8090"
        );
        assert_eq!(w.inject.token_expiration_seconds, 3600);
        assert_eq!(
            w.inject.excluded_namespaces,
            ["kube-system", "kube-public", "kube-node-lease"]
        );
        assert_eq!(
            s.serving_names(),
            [
                "portcullis-operator.portcullis-system.svc",
                "portcullis-operator.portcullis-system.svc.cluster.local"
            ]
        );
    }

    #[test]
    fn the_local_cluster_flags_are_taken() {
        let s = settings(&[
            "--namespace",
            "pc-system",
            "--service-name",
            "pc",
            "--identity-addr",
            "0.0.0.0:31443",
            "--policy-addr",
            "0.0.0.0:31090",
            "--webhook-addr",
            "127.0.0.1:31943",
            "--metrics-addr",
            "127.0.0.1:31080",
            "--extra-san",
            "127.0.0.1",
            "--extra-san",
            "10.200.0.1",
            "--identity-url",
            "https://10.200.0.1:31443",
            "--policy-url",
            "https://10.200.0.1:31090/",
            "--webhook-url",
            "https://127.0.0.1:31943",
            "--proxy-image",
            "portcullis-proxy:local",
            "--key-hash-cost",
            "4",
            "--trust-domain",
            "prod.acme",
            "--proxy-resources",
            r#"{"requests":{"cpu":"5m"},"limits":{"memory":"64Mi"}}"#,
            "--excluded-namespaces",
            "kube-system,monitoring",
            "--redirect-outbound",
            "true",
            "--token-expiration-seconds",
            "7200",
            "--proxy-image-pull-policy",
            "Never",
        ]);
        assert_eq!(s.extra_sans, ["127.0.0.1", "10.200.0.1"]);
        assert_eq!(
            s.serving_names(),
            [
                "pc.pc-system.svc",
                "pc.pc-system.svc.cluster.local",
                "127.0.0.1",
                "10.200.0.1"
            ]
        );
        assert_eq!(s.reconcile.hash_cost, 4);
        assert_eq!(s.ca.trust_domain.as_str(), "prod.acme");
        let w = s.webhooks.unwrap();
        assert_eq!(w.url.as_deref(), Some("https://127.0.0.1:31943"));
        assert_eq!(w.inject.identity_url, "https://10.200.0.1:31443");
        assert_eq!(w.inject.policy_url, "https://10.200.0.1:31090");
        assert_eq!(w.inject.proxy_image, "portcullis-proxy:local");
        assert_eq!(w.inject.image_pull_policy, "Never");
        assert_eq!(w.inject.resources.cpu_request, "5m");
        assert_eq!(w.inject.resources.memory_request, "20Mi");
        assert_eq!(w.inject.resources.memory_limit, "64Mi");
        assert_eq!(w.inject.excluded_namespaces, ["kube-system", "monitoring"]);
        assert!(w.inject.redirect_outbound);
        assert_eq!(w.inject.token_expiration_seconds, 7200);
        assert_eq!(w.service_account, "pc");
    }

    #[test]
    fn tenant_secrets_are_bound_only_when_the_cluster_role_is_named() {
        assert_eq!(settings(&[]).reconcile.secrets_binding, None);
        let s = settings(&["--tenant-secrets-role", "pc-tenant-secrets"]);
        assert_eq!(
            s.reconcile.secrets_binding,
            Some(SecretsBinding {
                cluster_role: "pc-tenant-secrets".into(),
                service_account: "portcullis-operator".into(),
            })
        );
        let s = settings(&[
            "--tenant-secrets-role",
            "pc-tenant-secrets",
            "--service-account",
            "pc",
        ]);
        assert_eq!(
            s.reconcile.secrets_binding.map(|b| b.service_account),
            Some("pc".into())
        );
    }

    #[test]
    fn no_webhooks_and_the_debug_policy_server_are_explicit() {
        let s = settings(&["--no-webhooks", "--policy-insecure-debug"]);
        assert!(s.webhooks.is_none());
        assert!(s.policy_insecure_debug);
        assert!(parse(&["--no-webhooks", "--webhook-url", "https://127.0.0.1:9443"]).is_err());
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (flag, value) in [
            ("--trust-domain", "Bad Domain"),
            ("--rotation-period", "soon"),
            ("--rotation-period", "0s"),
            ("--identity-url", "http://op:8443"),
            ("--policy-url", "op:8090"),
            ("--webhook-url", "https://"),
            ("--extra-san", "not a name"),
            ("--proxy-resources", "{\"requests\": 1}"),
            ("--proxy-image-pull-policy", "Sometimes"),
            ("--token-expiration-seconds", "60"),
            ("--key-hash-cost", "3"),
            ("--lease-duration", "fast"),
            ("--service-name", "Portcullis"),
            ("--identity-addr", "localhost"),
        ] {
            let message = parse(&[flag, value]).map(drop).unwrap_err();
            assert!(message.contains(flag), "{flag} {value}: {message}");
        }
        let message = parse(&["--renew-deadline", "20s"])
            .unwrap()
            .settings()
            .unwrap_err()
            .to_string();
        assert!(message.contains("--renew-deadline"), "{message}");
        let message = parse(&["--root-rotation-period", "48h"])
            .unwrap()
            .settings()
            .unwrap_err()
            .to_string();
        assert!(message.contains("--root-rotation-period"), "{message}");
    }
}
