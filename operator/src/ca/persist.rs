//! The CA in Kubernetes Secrets: `portcullis-ca-root` (active root, next root, retired
//! roots, bookkeeping) and `portcullis-ca-intermediate` (the issuing intermediate).
//! Certificates are stored as PEM; private keys only wrapped by the KEK, each bound (as
//! AAD) to its Secret, data key and certificate fingerprint.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use portcullis_api::clock;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::PrivatePkcs8KeyDer;
use serde::{Deserialize, Serialize};

use super::CaError;
use super::authority::{
    ActiveRoot, CaState, CertificateAuthority, Intermediate, NextRoot, RetiredRoot, SigningCa,
    new_intermediate,
};
use super::certs::CaCertificate;
use super::settings::CaSettings;
use crate::envelope::{Kek, KeyRef};

/// Secret holding the roots.
pub const ROOT_SECRET: &str = "portcullis-ca-root";
/// Secret holding the issuing intermediate.
pub const INTERMEDIATE_SECRET: &str = "portcullis-ca-intermediate";

const ACTIVE_CRT: &str = "ca.crt";
const ACTIVE_KEY: &str = "ca.key.wrapped";
const ACTIVE_META: &str = "ca.json";
const NEXT_CRT: &str = "next.crt";
const NEXT_KEY: &str = "next.key.wrapped";
const NEXT_META: &str = "next.json";
const RETIRED: &str = "retired.json";
const BUNDLE: &str = "ca-bundle.crt";
const INT_CRT: &str = "tls.crt";
const INT_KEY: &str = "tls.key.wrapped";
const INT_META: &str = "meta.json";

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ActiveMeta {
    since: Timestamp,
    max_leaf_expiry: Option<Timestamp>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NextMeta {
    activates_at: Timestamp,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RetiredMeta {
    cert_pem: String,
    since: Timestamp,
    max_leaf_expiry: Option<Timestamp>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IntermediateMeta {
    created_at: Timestamp,
    root_fingerprint: String,
}

/// The `data` of the two CA Secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct CaSecretData {
    /// Data of [`ROOT_SECRET`].
    pub root: BTreeMap<String, ByteString>,
    /// Data of [`INTERMEDIATE_SECRET`].
    pub intermediate: BTreeMap<String, ByteString>,
}

impl std::fmt::Debug for CaSecretData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Wrapped keys are safe to show, but nobody needs them in a log.
        f.debug_struct("CaSecretData")
            .field("root", &self.root.keys().collect::<Vec<_>>())
            .field(
                "intermediate",
                &self.intermediate.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The AAD binding a wrapped CA key to its Secret, data key and certificate; the
/// webhook CA's key is bound the same way.
pub(crate) fn key_aad(secret: &str, key: &str, cert: &CaCertificate) -> Vec<u8> {
    format!("{secret}/{key}/{}", cert.fingerprint()).into_bytes()
}

fn json<T: Serialize>(value: &T) -> Result<ByteString, CaError> {
    serde_json::to_vec(value)
        .map(ByteString)
        .map_err(|e| CaError::Corrupt(e.to_string()))
}

fn text(s: &str) -> ByteString {
    ByteString(s.as_bytes().to_vec())
}

fn get<'a>(
    data: &'a BTreeMap<String, ByteString>,
    secret: &str,
    key: &str,
) -> Result<&'a [u8], CaError> {
    data.get(key)
        .map(|b| b.0.as_slice())
        .ok_or_else(|| CaError::Corrupt(format!("Secret {secret} lacks {key:?}")))
}

fn parse_json<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    secret: &str,
    key: &str,
) -> Result<T, CaError> {
    serde_json::from_slice(bytes)
        .map_err(|e| CaError::Corrupt(format!("Secret {secret} {key}: {e}")))
}

fn parse_cert(bytes: &[u8], secret: &str, key: &str) -> Result<CaCertificate, CaError> {
    let pem = std::str::from_utf8(bytes)
        .map_err(|_| CaError::Corrupt(format!("Secret {secret} {key}: not UTF-8")))?;
    CaCertificate::from_pem(pem)
}

fn load_signing(
    data: &BTreeMap<String, ByteString>,
    secret: &str,
    crt: &str,
    key: &str,
    kek: &Kek,
) -> Result<SigningCa, CaError> {
    let cert = parse_cert(get(data, secret, crt)?, secret, crt)?;
    let pkcs8 = kek
        .unwrap(get(data, secret, key)?, &key_aad(secret, key, &cert))
        .map_err(|source| CaError::Unwrap {
            secret: secret.to_string(),
            source,
        })?;
    let key_pair = KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(pkcs8),
        &PKCS_ECDSA_P256_SHA256,
    )
    .map_err(|e| CaError::Corrupt(format!("Secret {secret}: private key: {e}")))?;
    SigningCa::from_parts(cert, key_pair)
}

fn wrap_key(ca: &SigningCa, secret: &str, key: &str, kek: &Kek) -> Result<ByteString, CaError> {
    kek.wrap(&ca.key_pkcs8(), &key_aad(secret, key, ca.cert()))
        .map(ByteString)
        .map_err(|source| CaError::Unwrap {
            secret: secret.to_string(),
            source,
        })
}

impl CaState {
    /// The Secret data for this state, keys wrapped under `kek`.
    pub fn to_secret_data(&self, kek: &Kek) -> Result<CaSecretData, CaError> {
        let mut root = BTreeMap::new();
        root.insert(ACTIVE_CRT.into(), text(self.active.ca.cert.pem()));
        root.insert(
            ACTIVE_KEY.into(),
            wrap_key(&self.active.ca, ROOT_SECRET, ACTIVE_KEY, kek)?,
        );
        root.insert(
            ACTIVE_META.into(),
            json(&ActiveMeta {
                since: self.active.since,
                max_leaf_expiry: self.active.max_leaf_expiry,
            })?,
        );
        if let Some(next) = &self.next {
            root.insert(NEXT_CRT.into(), text(next.ca.cert.pem()));
            root.insert(
                NEXT_KEY.into(),
                wrap_key(&next.ca, ROOT_SECRET, NEXT_KEY, kek)?,
            );
            root.insert(
                NEXT_META.into(),
                json(&NextMeta {
                    activates_at: next.activates_at,
                })?,
            );
        }
        let retired: Vec<RetiredMeta> = self
            .retired
            .iter()
            .map(|r| RetiredMeta {
                cert_pem: r.cert.pem().to_string(),
                since: r.since,
                max_leaf_expiry: r.max_leaf_expiry,
            })
            .collect();
        root.insert(RETIRED.into(), json(&retired)?);
        root.insert(BUNDLE.into(), text(&self.trust_bundle_pem()));

        let mut intermediate = BTreeMap::new();
        intermediate.insert(INT_CRT.into(), text(self.intermediate.ca.cert.pem()));
        intermediate.insert(
            INT_KEY.into(),
            wrap_key(&self.intermediate.ca, INTERMEDIATE_SECRET, INT_KEY, kek)?,
        );
        intermediate.insert(
            INT_META.into(),
            json(&IntermediateMeta {
                created_at: self.intermediate.created_at,
                root_fingerprint: self.active.ca.cert.fingerprint().to_string(),
            })?,
        );
        Ok(CaSecretData { root, intermediate })
    }

    /// Restores a state written by [`CaState::to_secret_data`]. `intermediate` may be
    /// absent or belong to another root (a crash between the two Secret writes): then a
    /// new intermediate is made and the second value is `true` (the caller must save).
    ///
    /// Leaves issued after the last save were not recorded, so the active root is
    /// assumed to have leaves valid until `now` + one leaf lifetime.
    pub fn from_secret_data(
        root: &BTreeMap<String, ByteString>,
        intermediate: Option<&BTreeMap<String, ByteString>>,
        kek: &Kek,
        settings: &CaSettings,
        now: Timestamp,
    ) -> Result<(Self, bool), CaError> {
        let active_ca = load_signing(root, ROOT_SECRET, ACTIVE_CRT, ACTIVE_KEY, kek)?;
        let meta: ActiveMeta = parse_json(
            get(root, ROOT_SECRET, ACTIVE_META)?,
            ROOT_SECRET,
            ACTIVE_META,
        )?;
        let assumed = clock::add(now, settings.leaf_lifetime());
        let active = ActiveRoot {
            ca: active_ca,
            since: meta.since,
            max_leaf_expiry: Some(meta.max_leaf_expiry.map_or(assumed, |m| m.max(assumed))),
        };
        let next = if root.contains_key(NEXT_CRT) {
            let ca = load_signing(root, ROOT_SECRET, NEXT_CRT, NEXT_KEY, kek)?;
            let meta: NextMeta =
                parse_json(get(root, ROOT_SECRET, NEXT_META)?, ROOT_SECRET, NEXT_META)?;
            Some(NextRoot {
                ca,
                activates_at: meta.activates_at,
            })
        } else {
            None
        };
        let retired_meta: Vec<RetiredMeta> = match root.get(RETIRED) {
            Some(bytes) => parse_json(&bytes.0, ROOT_SECRET, RETIRED)?,
            None => Vec::new(),
        };
        let retired = retired_meta
            .into_iter()
            .map(|m| {
                Ok(RetiredRoot {
                    cert: CaCertificate::from_pem(&m.cert_pem)?,
                    since: m.since,
                    max_leaf_expiry: m.max_leaf_expiry,
                })
            })
            .collect::<Result<Vec<_>, CaError>>()?;

        let loaded = match intermediate {
            Some(data) => {
                let meta: IntermediateMeta = parse_json(
                    get(data, INTERMEDIATE_SECRET, INT_META)?,
                    INTERMEDIATE_SECRET,
                    INT_META,
                )?;
                if meta.root_fingerprint == active.ca.cert.fingerprint() {
                    let ca = load_signing(data, INTERMEDIATE_SECRET, INT_CRT, INT_KEY, kek)?;
                    Some(Intermediate {
                        ca,
                        created_at: meta.created_at,
                    })
                } else {
                    None
                }
            }
            None => None,
        };
        let regenerated = loaded.is_none();
        let intermediate = match loaded {
            Some(i) => i,
            None => new_intermediate(&active.ca, settings, now)?,
        };
        Ok((
            Self {
                active,
                next,
                retired,
                intermediate,
            },
            regenerated,
        ))
    }
}

/// Loads and saves the CA Secrets in one namespace, with optimistic concurrency: a save
/// replaces exactly the versions last read or written, never someone else's.
pub struct CaSecretStore {
    api: Api<Secret>,
    namespace: String,
    kek: Kek,
    root_version: Option<String>,
    intermediate_version: Option<String>,
    /// The KEK the Secrets were last read or written under; `None`: unknown or mixed.
    wrapped_under: Option<KeyRef>,
}

impl std::fmt::Debug for CaSecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaSecretStore")
            .field("namespace", &self.namespace)
            .field("kek", &self.kek.id())
            .finish_non_exhaustive()
    }
}

fn secret(
    name: &str,
    namespace: &str,
    data: BTreeMap<String, ByteString>,
    version: Option<String>,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            resource_version: version,
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".into(),
                "portcullis-operator".into(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Secret::default()
    }
}

impl CaSecretStore {
    /// Loads the CA from its Secrets in `namespace`, creating it on first start. An
    /// existing CA is never replaced: unreadable Secrets (wrong KEK, corruption) are an
    /// error, and a lost creation race re-reads the winner's CA.
    pub async fn load_or_create(
        client: Client,
        namespace: &str,
        kek: Kek,
        settings: &CaSettings,
        now: Timestamp,
    ) -> Result<(Self, CaState), CaError> {
        settings.validate()?;
        let mut store = Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            kek,
            root_version: None,
            intermediate_version: None,
            wrapped_under: None,
        };
        // Two attempts: the second only after losing a creation race.
        for _ in 0..2 {
            let root = store.get(ROOT_SECRET).await?;
            let intermediate = store.get(INTERMEDIATE_SECRET).await?;
            match (root, intermediate) {
                (Some(root), intermediate) => {
                    store.root_version = root.metadata.resource_version.clone();
                    store.intermediate_version = intermediate
                        .as_ref()
                        .and_then(|s| s.metadata.resource_version.clone());
                    let intermediate_data = intermediate.map(|s| s.data.unwrap_or_default());
                    store.wrapped_under = wrapped_under(
                        root.data
                            .as_ref()
                            .into_iter()
                            .chain(intermediate_data.as_ref()),
                    );
                    let (state, regenerated) = CaState::from_secret_data(
                        &root.data.unwrap_or_default(),
                        intermediate_data.as_ref(),
                        &store.kek,
                        settings,
                        now,
                    )?;
                    if regenerated {
                        tracing::warn!(
                            namespace,
                            "CA intermediate missing or under another root; issued a new one"
                        );
                        store.save(&state).await?;
                    }
                    return Ok((store, state));
                }
                (None, Some(_)) => {
                    return Err(CaError::Corrupt(format!(
                        "Secret {INTERMEDIATE_SECRET} exists without {ROOT_SECRET}; refusing to replace an existing CA"
                    )));
                }
                (None, None) => {
                    let state = CaState::generate(settings, now)?;
                    let data = state.to_secret_data(&store.kek)?;
                    match store.create(ROOT_SECRET, data.root).await {
                        Ok(version) => store.root_version = version,
                        Err(CaError::Kube {
                            source: kube::Error::Api(status),
                            ..
                        }) if status.code == 409 => continue,
                        Err(e) => return Err(e),
                    }
                    store.intermediate_version =
                        store.create(INTERMEDIATE_SECRET, data.intermediate).await?;
                    tracing::info!(
                        namespace,
                        root = state.active_root().fingerprint(),
                        "created a new CA"
                    );
                    return Ok((store, state));
                }
            }
        }
        Err(CaError::Conflict(format!(
            "{ROOT_SECRET} kept changing while loading"
        )))
    }

    async fn get(&self, name: &str) -> Result<Option<Secret>, CaError> {
        self.api
            .get_opt(name)
            .await
            .map_err(|source| CaError::Kube {
                secret: name.into(),
                source,
            })
    }

    async fn create(
        &self,
        name: &str,
        data: BTreeMap<String, ByteString>,
    ) -> Result<Option<String>, CaError> {
        let created = self
            .api
            .create(
                &PostParams::default(),
                &secret(name, &self.namespace, data, None),
            )
            .await
            .map_err(|source| CaError::Kube {
                secret: name.into(),
                source,
            })?;
        Ok(created.metadata.resource_version)
    }

    async fn put(
        &self,
        name: &str,
        data: BTreeMap<String, ByteString>,
        version: Option<String>,
    ) -> Result<Option<String>, CaError> {
        let result = match version {
            Some(v) => {
                self.api
                    .replace(
                        name,
                        &PostParams::default(),
                        &secret(name, &self.namespace, data, Some(v)),
                    )
                    .await
            }
            None => {
                self.api
                    .create(
                        &PostParams::default(),
                        &secret(name, &self.namespace, data, None),
                    )
                    .await
            }
        };
        match result {
            Ok(s) => Ok(s.metadata.resource_version),
            Err(kube::Error::Api(status)) if status.code == 409 => Err(CaError::Conflict(format!(
                "Secret {name} was changed by someone else"
            ))),
            Err(source) => Err(CaError::Kube {
                secret: name.into(),
                source,
            }),
        }
    }

    /// Writes `state` over the versions last seen.
    pub async fn save(&mut self, state: &CaState) -> Result<(), CaError> {
        let data = state.to_secret_data(&self.kek)?;
        self.write(data).await
    }

    /// Saves the authority's current state.
    pub async fn save_authority(&mut self, ca: &CertificateAuthority) -> Result<(), CaError> {
        let data = ca.with_state(|s| s.to_secret_data(&self.kek))?;
        self.write(data).await
    }

    // The intermediate goes last: after a crash in between, loading notices it belongs
    // to another root and replaces it.
    async fn write(&mut self, data: CaSecretData) -> Result<(), CaError> {
        let under = wrapped_under([&data.root, &data.intermediate]);
        self.root_version = self
            .put(ROOT_SECRET, data.root, self.root_version.clone())
            .await?;
        self.intermediate_version = self
            .put(
                INTERMEDIATE_SECRET,
                data.intermediate,
                self.intermediate_version.clone(),
            )
            .await?;
        self.wrapped_under = under;
        Ok(())
    }

    /// Whether the Secrets hold a key wrapped under another KEK than the current one
    /// (after a KEK rotation): the next save re-wraps them.
    pub fn needs_rewrap(&self) -> bool {
        self.wrapped_under != Some(self.kek.key_ref())
    }
}

/// The one KEK every wrapped key in `secrets` is under; `None` when they differ or
/// cannot be read.
fn wrapped_under<'a>(
    secrets: impl IntoIterator<Item = &'a BTreeMap<String, ByteString>>,
) -> Option<KeyRef> {
    let mut under = None;
    for data in secrets {
        for (name, value) in data {
            if !name.ends_with(".wrapped") {
                continue;
            }
            let key = Kek::wrapped_under(&value.0).ok()?;
            if under.is_some_and(|u| u != key) {
                return None;
            }
            under = Some(key);
        }
    }
    under
}
