//! Keys: the key-encryption key, API-key hashing and rotation, and who may read the
//! ApiKey Secrets.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, ValueEnum};
use portcullis_crds::DurationSpec;
use portcullis_operator::context::SecretsBinding;
use portcullis_operator::envelope::{KmsConfig, Pkcs11Config, TokenSelector};
use portcullis_operator::kek_custody::KekCustody;
use portcullis_operator::run::OperatorSettings;

use super::values::dns_subdomain;

/// Key material and API-key settings.
#[derive(Args, Debug)]
#[command(next_help_heading = "Keys")]
pub(super) struct KeyFlags {
    /// Where the key-encryption key is kept: `secret` (a Secret in --namespace),
    /// `pkcs11` (a non-extractable AES-256 key in an HSM, --pkcs11-*) or `kms` (stored
    /// encrypted by a Kubernetes KMS v2 plugin, --kms-*).
    #[arg(long, env = "PORTCULLIS_KEK_PROVIDER", value_enum, default_value_t = KekProviderFlag::Secret)]
    pub(super) kek_provider: KekProviderFlag,
    /// An existing Secret (in --namespace) holding the key-encryption key under `kek`;
    /// by default `portcullis-kek`, created on first start. Only with `--kek-provider secret`.
    #[arg(long, env = "PORTCULLIS_KEK_SECRET")]
    pub(super) kek_secret: Option<String>,
    /// Rotate the `secret`-provider key-encryption key when it is this old (measured
    /// from when it became current); every wrapped key is re-wrapped, with no restart.
    /// `0s` rotates only on demand (`kubectl portcullis kek rotate`).
    #[arg(long, env = "PORTCULLIS_KEK_ROTATION_PERIOD", default_value = "365d")]
    pub(super) kek_rotation_period: DurationSpec,
    #[command(flatten)]
    pub(super) pkcs11: Pkcs11Flags,
    #[command(flatten)]
    pub(super) kms: KmsFlags,
    /// Refuse a Tenant becoming Restricted while the key-encryption key is a Secret
    /// (not held in an HSM or KMS); off: it is admitted with a warning.
    #[arg(long, env = "PORTCULLIS_RESTRICTED_REQUIRES_HARDWARE_KEK")]
    pub(super) restricted_requires_hardware_kek: bool,
    /// How long a rotated key's previous token stays valid.
    #[arg(long, env = "PORTCULLIS_KEY_ROTATION_OVERLAP", default_value = "1h")]
    pub(super) key_rotation_overlap: DurationSpec,
    /// bcrypt cost of new API-key hashes (4-31).
    #[arg(long, env = "PORTCULLIS_KEY_HASH_COST", default_value_t = portcullis_crds::token::HASH_COST, value_parser = clap::value_parser!(u32).range(4..=31))]
    pub(super) key_hash_cost: u32,
    /// The ClusterRole granting ApiKey Secret access, which the operator binds to its
    /// ServiceAccount in each tenant namespace (the chart's `<release>-tenant-secrets`);
    /// unset: no binding is written (the operator's credentials must reach the Secrets).
    #[arg(long, env = "PORTCULLIS_TENANT_SECRETS_ROLE", value_parser = dns_subdomain)]
    pub(super) tenant_secrets_role: Option<String>,
}

/// `--kek-provider`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum KekProviderFlag {
    /// A Kubernetes Secret.
    Secret,
    /// A PKCS#11 token (HSM).
    Pkcs11,
    /// A Kubernetes KMS v2 plugin.
    Kms,
}

/// The KMS v2 plugin holding the key-encryption key (`--kek-provider kms`).
#[derive(Args, Debug)]
pub(crate) struct KmsFlags {
    /// The KMS v2 plugin's Unix socket, as this container sees it.
    #[arg(long, env = "PORTCULLIS_KMS_SOCKET")]
    pub(crate) kms_socket: Option<PathBuf>,
    /// The limit of one call to the KMS plugin.
    #[arg(long, env = "PORTCULLIS_KMS_TIMEOUT")]
    pub(crate) kms_timeout: Option<DurationSpec>,
}

impl KmsFlags {
    fn any(&self) -> bool {
        self.kms_socket.is_some() || self.kms_timeout.is_some()
    }

    /// The plugin settings, or what is missing.
    pub(crate) fn config(&self) -> anyhow::Result<KmsConfig> {
        let socket = match &self.kms_socket {
            Some(path) if path.as_os_str().is_empty() => bail!("--kms-socket is empty"),
            Some(path) => path.clone(),
            None => bail!("the KMS key-encryption key needs --kms-socket"),
        };
        let mut config = KmsConfig::new(socket);
        if let Some(timeout) = &self.kms_timeout {
            if timeout.get().is_zero() {
                bail!("--kms-timeout must be more than 0");
            }
            config.timeout = timeout.get();
        }
        Ok(config)
    }
}

/// The HSM holding the key-encryption key (`--kek-provider pkcs11`).
#[derive(Args, Debug)]
pub(crate) struct Pkcs11Flags {
    /// The HSM vendor's PKCS#11 library, as this container sees it.
    #[arg(long, env = "PORTCULLIS_PKCS11_MODULE")]
    pub(crate) pkcs11_module: Option<PathBuf>,
    /// The label of the token holding the key (or --pkcs11-slot).
    #[arg(
        long,
        env = "PORTCULLIS_PKCS11_TOKEN_LABEL",
        conflicts_with = "pkcs11_slot"
    )]
    pub(crate) pkcs11_token_label: Option<String>,
    /// The slot of the token holding the key (or --pkcs11-token-label).
    #[arg(long, env = "PORTCULLIS_PKCS11_SLOT")]
    pub(crate) pkcs11_slot: Option<u64>,
    /// The label (CKA_LABEL) of the AES-256 key.
    #[arg(long, env = "PORTCULLIS_PKCS11_KEY_LABEL")]
    pub(crate) pkcs11_key_label: Option<String>,
    /// A file holding the token's user PIN (the chart mounts a Secret there).
    #[arg(long, env = "PORTCULLIS_PKCS11_PIN_FILE")]
    pub(crate) pkcs11_pin_file: Option<PathBuf>,
}

impl Pkcs11Flags {
    fn any(&self) -> bool {
        self.pkcs11_module.is_some()
            || self.pkcs11_token_label.is_some()
            || self.pkcs11_slot.is_some()
            || self.pkcs11_key_label.is_some()
            || self.pkcs11_pin_file.is_some()
    }

    /// The HSM settings, or which flag is missing.
    pub(crate) fn config(&self) -> anyhow::Result<Pkcs11Config> {
        let missing = |flag: &str| anyhow::anyhow!("the PKCS#11 key-encryption key needs {flag}");
        let token = match (&self.pkcs11_token_label, self.pkcs11_slot) {
            (Some(label), _) if label.is_empty() => bail!("--pkcs11-token-label is empty"),
            (Some(label), _) => TokenSelector::Label(label.clone()),
            (None, Some(slot)) => TokenSelector::Slot(slot),
            (None, None) => return Err(missing("--pkcs11-token-label or --pkcs11-slot")),
        };
        let key_label = match &self.pkcs11_key_label {
            Some(label) if label.is_empty() => bail!("--pkcs11-key-label is empty"),
            Some(label) => label.clone(),
            None => return Err(missing("--pkcs11-key-label")),
        };
        Ok(Pkcs11Config {
            module: self
                .pkcs11_module
                .clone()
                .ok_or_else(|| missing("--pkcs11-module"))?,
            token,
            key_label,
            pin_file: self
                .pkcs11_pin_file
                .clone()
                .ok_or_else(|| missing("--pkcs11-pin-file"))?,
        })
    }
}

impl KeyFlags {
    /// `service_account`: the account the tenant-secrets binding names.
    pub(super) fn apply(
        &self,
        settings: &mut OperatorSettings,
        service_account: String,
    ) -> anyhow::Result<()> {
        settings.restricted_requires_hardware_kek = self.restricted_requires_hardware_kek;
        let period = self.kek_rotation_period.get();
        settings.kek_rotation.period = (!period.is_zero()).then_some(period);
        match self.kek_provider {
            KekProviderFlag::Secret => {
                if self.pkcs11.any() {
                    bail!(
                        "--pkcs11-* flags are set but --kek-provider is secret: add --kek-provider pkcs11, or drop them"
                    );
                }
                if self.kms.any() {
                    bail!(
                        "--kms-* flags are set but --kek-provider is secret: add --kek-provider kms, or drop them"
                    );
                }
                settings.kek_secret.clone_from(&self.kek_secret);
                if let Some(name) = &self.kek_secret {
                    settings.reconcile.kek_custody = KekCustody::Secret {
                        namespace: settings.reconcile.namespace.clone(),
                        name: name.clone(),
                    };
                }
            }
            KekProviderFlag::Pkcs11 => {
                if self.kek_secret.is_some() {
                    bail!("--kek-secret names a Secret but --kek-provider is pkcs11: drop one");
                }
                if self.kms.any() {
                    bail!("--kms-* flags are set but --kek-provider is pkcs11: drop one");
                }
                let config = self.pkcs11.config()?;
                settings.reconcile.kek_custody = KekCustody::Pkcs11 {
                    module: config.module.display().to_string(),
                    token: config.token.to_string(),
                    key_label: config.key_label.clone(),
                };
                settings.kek_pkcs11 = Some(config);
            }
            KekProviderFlag::Kms => {
                if self.kek_secret.is_some() {
                    bail!(
                        "--kek-secret names a Secret but --kek-provider is kms: the kms provider keeps its encrypted key in portcullis-kek; drop --kek-secret"
                    );
                }
                if self.pkcs11.any() {
                    bail!("--pkcs11-* flags are set but --kek-provider is kms: drop one");
                }
                let config = self.kms.config()?;
                settings.reconcile.kek_custody = KekCustody::Kms {
                    socket: config.socket.display().to_string(),
                };
                settings.kek_kms = Some(config);
            }
        }
        settings.reconcile.key_rotation_overlap = self.key_rotation_overlap.get();
        settings.reconcile.hash_cost = self.key_hash_cost;
        settings.reconcile.secrets_binding =
            self.tenant_secrets_role
                .as_ref()
                .map(|cluster_role| SecretsBinding {
                    cluster_role: cluster_role.clone(),
                    service_account,
                });
        Ok(())
    }
}
