//! The admission webhooks and what the injector adds to pods.

use clap::Args;
use portcullis_operator::run::{self, WebhookRunSettings};
use portcullis_operator::webhook::inject::ProxyResources;

use super::serving::ServingFlags;
use super::values::{dns_label, dns_subdomain, https_url, proxy_resources};

/// The webhook configurations and the URLs injected pods are given.
#[derive(Args, Debug)]
#[command(next_help_heading = "Webhooks")]
pub(super) struct WebhookFlags {
    /// The identity service URL the injector writes into pods
    /// [default: https://<service>.<namespace>.svc:8443].
    #[arg(long, env = "PORTCULLIS_IDENTITY_URL", value_parser = https_url)]
    pub(super) identity_url: Option<String>,
    /// The policy server URL the injector writes into pods
    /// [default: https://<service>.<namespace>.svc:8090].
    #[arg(long, env = "PORTCULLIS_POLICY_URL", value_parser = https_url)]
    pub(super) policy_url: Option<String>,
    /// The audit collector URL the injector writes into pods, e.g.
    /// https://portcullis-audit.portcullis-system.svc:8091 (default: none, records stay
    /// in the pod).
    #[arg(long, env = "PORTCULLIS_AUDIT_COLLECTOR_URL", value_parser = https_url)]
    pub(super) audit_collector_url: Option<String>,
    /// Run outside the cluster: the operator applies the webhook configurations itself
    /// with clientConfig.url <url>/inject and <url>/validate (default: the chart's
    /// configurations, through the Service; only their caBundle is patched).
    #[arg(long, env = "PORTCULLIS_WEBHOOK_URL", value_parser = https_url)]
    pub(super) webhook_url: Option<String>,
    /// Do not serve the admission webhooks.
    #[arg(long, env = "PORTCULLIS_NO_WEBHOOKS", conflicts_with = "webhook_url")]
    pub(super) no_webhooks: bool,
    /// Name of the MutatingWebhookConfiguration whose caBundle the operator keeps.
    #[arg(long, env = "PORTCULLIS_MUTATING_WEBHOOK_NAME", default_value = "portcullis-injector", value_parser = dns_subdomain)]
    pub(super) mutating_webhook_name: String,
    /// Name of the ValidatingWebhookConfiguration whose caBundle the operator keeps.
    #[arg(long, env = "PORTCULLIS_VALIDATING_WEBHOOK_NAME", default_value = "portcullis-validator", value_parser = dns_subdomain)]
    pub(super) validating_webhook_name: String,
}

/// The injected proxy.
#[derive(Args, Debug)]
#[command(next_help_heading = "Injection")]
pub(super) struct InjectFlags {
    /// The proxy image the injector adds (it also runs the init step).
    #[arg(long, env = "PORTCULLIS_PROXY_IMAGE", default_value = run::PROXY_IMAGE)]
    pub(super) proxy_image: String,
    /// imagePullPolicy of the injected containers.
    #[arg(long, env = "PORTCULLIS_PROXY_IMAGE_PULL_POLICY", default_value = "IfNotPresent", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub(super) proxy_image_pull_policy: String,
    /// Requests and limits of the injected proxy, as JSON:
    /// {"requests":{"cpu":"10m","memory":"20Mi"},"limits":{"cpu":"500m","memory":"128Mi"}}.
    #[arg(long, env = "PORTCULLIS_PROXY_RESOURCES", value_parser = proxy_resources)]
    pub(super) proxy_resources: Option<ProxyResources>,
    /// Also redirect outbound TCP through the proxy's outbound port 4140.
    #[arg(long, env = "PORTCULLIS_REDIRECT_OUTBOUND", default_value_t = false, action = clap::ArgAction::Set)]
    pub(super) redirect_outbound: bool,
    /// Lifetime of the projected identity token in injected pods (600 or more).
    #[arg(long, env = "PORTCULLIS_TOKEN_EXPIRATION_SECONDS", default_value_t = 3600, value_parser = clap::value_parser!(i64).range(600..))]
    pub(super) token_expiration_seconds: i64,
    /// Namespaces never injected (comma-separated); kube-system and --namespace always are.
    #[arg(long, env = "PORTCULLIS_EXCLUDED_NAMESPACES", value_delimiter = ',', default_value = "kube-system,kube-public,kube-node-lease", value_parser = dns_label)]
    pub(super) excluded_namespaces: Vec<String>,
}

impl WebhookFlags {
    /// The webhooks' settings, or `None` with --no-webhooks.
    pub(super) fn settings(
        &self,
        namespace: &str,
        serving: &ServingFlags,
        inject: &InjectFlags,
    ) -> Option<WebhookRunSettings> {
        if self.no_webhooks {
            return None;
        }
        let mut webhooks = WebhookRunSettings::new(namespace, &serving.service_name);
        webhooks.addr = serving.webhook_addr;
        webhooks.url.clone_from(&self.webhook_url);
        webhooks
            .mutating_configuration
            .clone_from(&self.mutating_webhook_name);
        webhooks
            .validating_configuration
            .clone_from(&self.validating_webhook_name);
        if let Some(account) = &serving.service_account {
            webhooks.service_account.clone_from(account);
        }
        inject.apply(&mut webhooks);
        if let Some(url) = &self.identity_url {
            webhooks.inject.identity_url.clone_from(url);
        }
        if let Some(url) = &self.policy_url {
            webhooks.inject.policy_url.clone_from(url);
        }
        webhooks
            .inject
            .audit_collector_url
            .clone_from(&self.audit_collector_url);
        Some(webhooks)
    }
}

impl InjectFlags {
    fn apply(&self, webhooks: &mut WebhookRunSettings) {
        let inject = &mut webhooks.inject;
        inject.proxy_image.clone_from(&self.proxy_image);
        inject
            .image_pull_policy
            .clone_from(&self.proxy_image_pull_policy);
        if let Some(resources) = &self.proxy_resources {
            inject.resources = resources.clone();
        }
        inject.redirect_outbound = self.redirect_outbound;
        inject.token_expiration_seconds = self.token_expiration_seconds;
        inject
            .excluded_namespaces
            .clone_from(&self.excluded_namespaces);
    }
}
