//! Keeping the serving certificate fresh: load or create the CA Secret, renew the CA
//! and the leaf before they expire, and server-side apply the CA bundle into the
//! webhook configurations (field manager `portcullis-operator`), every
//! `check_interval` — which also repairs a bundle a chart upgrade blanked.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use portcullis_api::clock::Clock;
use portcullis_crds::annotations::FIELD_MANAGER;
use rustls::ServerConfig;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::ca::KeyAtRest;
use super::{ServingCertificate, WebhookCa, WebhookTlsSettings, server_config};
use crate::envelope::Kek;
use crate::webhook::WebhookError;

/// The webhook's certificates: the CA (shared by replicas through the Secret) and this
/// replica's serving leaf.
pub struct WebhookCertificates {
    client: kube::Client,
    settings: WebhookTlsSettings,
    kek: Arc<Kek>,
    clock: Arc<dyn Clock>,
    serving: Arc<ServingCertificate>,
    ca: Mutex<WebhookCa>,
}

impl std::fmt::Debug for WebhookCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookCertificates")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl WebhookCertificates {
    /// Loads (or creates) the CA, its key wrapped by `kek`, issues a leaf and patches
    /// the CA bundle.
    pub async fn start(
        client: kube::Client,
        settings: WebhookTlsSettings,
        kek: Arc<Kek>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, WebhookError> {
        let now = clock.now();
        let ca = load_or_create_ca(&client, &settings, &kek, now).await?;
        let ca = renew_ca_if_due(&client, &settings, &kek, ca, now).await?;
        patch_ca_bundles(&client, &settings, &ca.bundle_pem(now)).await?;
        let leaf = ca.issue_leaf(&settings.sans(), now, settings.leaf_lifetime)?;
        Ok(Arc::new(Self {
            client,
            settings,
            kek,
            clock,
            serving: Arc::new(ServingCertificate::new(leaf)),
            ca: Mutex::new(ca),
        }))
    }

    /// The hot-swapped serving certificate.
    pub fn serving(&self) -> Arc<ServingCertificate> {
        self.serving.clone()
    }

    /// A rustls configuration that always serves the current leaf.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, WebhookError> {
        server_config(self.serving.clone())
    }

    /// The PEM bundle the API server must trust now.
    pub async fn ca_bundle_pem(&self) -> String {
        self.ca.lock().await.bundle_pem(self.clock.now())
    }

    /// Picks up a CA another replica renewed, renews what is due, re-applies the bundles.
    pub async fn refresh(&self) -> Result<(), WebhookError> {
        let now = self.clock.now();
        let mut ca = self.ca.lock().await;
        let loaded = load_or_create_ca(&self.client, &self.settings, &self.kek, now).await?;
        let loaded = renew_ca_if_due(&self.client, &self.settings, &self.kek, loaded, now).await?;
        // The bundle goes out before a leaf from a new CA is served.
        patch_ca_bundles(&self.client, &self.settings, &loaded.bundle_pem(now)).await?;
        let leaf = self.serving.current();
        if !leaf.issued_by(&loaded) || leaf.needs_renewal(now, self.settings.leaf_renew_before) {
            self.serving.swap(loaded.issue_leaf(
                &self.settings.sans(),
                now,
                self.settings.leaf_lifetime,
            )?);
            tracing::info!("webhook serving certificate renewed");
        }
        *ca = loaded;
        Ok(())
    }

    /// Issues and serves a new leaf now, whatever its age.
    pub async fn rotate_leaf(&self) -> Result<(), WebhookError> {
        let ca = self.ca.lock().await;
        let leaf = ca.issue_leaf(
            &self.settings.sans(),
            self.clock.now(),
            self.settings.leaf_lifetime,
        )?;
        self.serving.swap(leaf);
        Ok(())
    }

    /// When the next check is due: the check interval, or sooner when the leaf is due.
    fn next_check(&self) -> Duration {
        let leaf = self.serving.current();
        let renew_at = leaf.not_after().as_second()
            - i64::try_from(self.settings.leaf_renew_before.as_secs()).unwrap_or(i64::MAX);
        let until = u64::try_from(renew_at - self.clock.now().as_second()).unwrap_or(0);
        self.settings
            .check_interval
            .min(Duration::from_secs(until.max(1)))
    }

    /// Refreshes until `shutdown`; failures are logged and retried after a minute.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut wait = self.next_check();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            wait = match self.refresh().await {
                Ok(()) => self.next_check(),
                Err(e) => {
                    tracing::warn!(error = %e, "webhook certificate refresh failed; retrying in 60s");
                    Duration::from_secs(60)
                }
            };
        }
    }
}

async fn load_or_create_ca(
    client: &kube::Client,
    settings: &WebhookTlsSettings,
    kek: &Kek,
    now: Timestamp,
) -> Result<WebhookCa, WebhookError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    if let Some(secret) = secrets.get_opt(&settings.ca_secret).await? {
        return read_ca(&secrets, secret, settings, kek).await;
    }
    let ca = WebhookCa::generate(now, settings.ca_lifetime)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(settings.ca_secret.clone()),
            namespace: Some(settings.namespace.clone()),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_owned(),
                    FIELD_MANAGER.to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(ca.to_secret_data(&settings.ca_secret, kek)?),
        ..Secret::default()
    };
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    match secrets.create(&params, &secret).await {
        Ok(_) => {
            tracing::info!(secret = %settings.ca_secret, "created the webhook CA");
            Ok(ca)
        }
        // Another replica won the race: use its CA.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let secret = secrets.get(&settings.ca_secret).await?;
            read_ca(&secrets, secret, settings, kek).await
        }
        Err(e) => Err(e.into()),
    }
}

/// The CA in `secret`; a legacy Secret with a PEM key is written back with the key
/// wrapped (once: a concurrent rewrite by another replica is a 409, and theirs stands).
async fn read_ca(
    secrets: &Api<Secret>,
    mut secret: Secret,
    settings: &WebhookTlsSettings,
    kek: &Kek,
) -> Result<WebhookCa, WebhookError> {
    let data = secret.data.take().unwrap_or_default();
    let (ca, at_rest) = WebhookCa::from_secret_data(&data, &settings.ca_secret, kek)?;
    if at_rest == KeyAtRest::LegacyPem {
        secret.data = Some(ca.to_secret_data(&settings.ca_secret, kek)?);
        match secrets
            .replace(&settings.ca_secret, &PostParams::default(), &secret)
            .await
        {
            Ok(_) => tracing::info!(
                secret = %settings.ca_secret,
                "the webhook CA key is now stored wrapped by the KEK"
            ),
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(ca)
}

async fn renew_ca_if_due(
    client: &kube::Client,
    settings: &WebhookTlsSettings,
    kek: &Kek,
    ca: WebhookCa,
    now: Timestamp,
) -> Result<WebhookCa, WebhookError> {
    if !ca.needs_renewal(now, settings.ca_renew_before) {
        return Ok(ca);
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let mut secret = secrets.get(&settings.ca_secret).await?;
    let (current, _) = WebhookCa::from_secret_data(
        &secret.data.clone().unwrap_or_default(),
        &settings.ca_secret,
        kek,
    )?;
    if !current.needs_renewal(now, settings.ca_renew_before) {
        return Ok(current); // renewed by another replica meanwhile
    }
    let next = current.renewed(now, settings.ca_lifetime)?;
    secret.data = Some(next.to_secret_data(&settings.ca_secret, kek)?);
    // resourceVersion is kept: a concurrent renewal makes this a 409, and we use theirs.
    match secrets
        .replace(&settings.ca_secret, &PostParams::default(), &secret)
        .await
    {
        Ok(_) => {
            tracing::info!(
                "renewed the webhook CA; the previous one stays trusted until it expires"
            );
            Ok(next)
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let secret = secrets.get(&settings.ca_secret).await?;
            read_ca(&secrets, secret, settings, kek).await
        }
        Err(e) => Err(e.into()),
    }
}

/// Applies `caBundle` to every webhook of both configurations; a configuration that
/// does not exist yet is skipped (the next refresh patches it).
pub async fn patch_ca_bundles(
    client: &kube::Client,
    settings: &WebhookTlsSettings,
    bundle_pem: &str,
) -> Result<(), WebhookError> {
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    if let Some(config) = mutating.get_opt(&settings.mutating_configuration).await? {
        let names: Vec<String> = config
            .webhooks
            .iter()
            .flatten()
            .map(|w| w.name.clone())
            .collect();
        let patch = bundle_patch(
            "MutatingWebhookConfiguration",
            &settings.mutating_configuration,
            &names,
            bundle_pem,
        );
        mutating
            .patch(
                &settings.mutating_configuration,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
    } else {
        tracing::debug!(name = %settings.mutating_configuration, "no MutatingWebhookConfiguration to patch yet");
    }
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    if let Some(config) = validating
        .get_opt(&settings.validating_configuration)
        .await?
    {
        let names: Vec<String> = config
            .webhooks
            .iter()
            .flatten()
            .map(|w| w.name.clone())
            .collect();
        let patch = bundle_patch(
            "ValidatingWebhookConfiguration",
            &settings.validating_configuration,
            &names,
            bundle_pem,
        );
        validating
            .patch(
                &settings.validating_configuration,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
    } else {
        tracing::debug!(name = %settings.validating_configuration, "no ValidatingWebhookConfiguration to patch yet");
    }
    Ok(())
}

/// The apply configuration that owns only `webhooks[*].clientConfig.caBundle`.
pub fn bundle_patch(
    kind: &str,
    name: &str,
    webhooks: &[String],
    bundle_pem: &str,
) -> serde_json::Value {
    use base64::Engine as _;
    let ca_bundle = base64::engine::general_purpose::STANDARD.encode(bundle_pem);
    serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": kind,
        "metadata": { "name": name },
        "webhooks": webhooks.iter().map(|w| serde_json::json!({
            "name": w,
            "clientConfig": { "caBundle": ca_bundle },
        })).collect::<Vec<_>>(),
    })
}
