//! Per-tenant data-encryption keys (DEKs): AES-256-GCM keys wrapped by the KEK and kept
//! in the Secret `portcullis-dek-<tenant>` in the operator's namespace.
//!
//! Data keys `v1`, `v2`, ... each hold one wrapped DEK; the annotation
//! `portcullis.dev/dek-created-v<n>` records when it was made. The highest version is
//! active (new data); older versions stay for decryption until everything they
//! encrypted has aged out of the audit retention: version `n` stops encrypting when
//! `n+1` is created, so it is dropped `retention` after that.
//!
//! Nothing here logs or prints key material; [`DekRing`]'s `Debug` shows versions only.

use std::collections::BTreeMap;
use std::time::Duration;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{KeyInit, OsRng};
use jiff::Timestamp;
use k8s_openapi::ByteString;

use crate::clock;
use crate::envelope::{EnvelopeError, Kek};

/// Prefix of the per-tenant DEK Secret name.
pub const SECRET_PREFIX: &str = "portcullis-dek-";
/// Prefix of the annotation recording when a version was created (`...-v3`).
pub const CREATED_ANNOTATION_PREFIX: &str = "portcullis.dev/dek-created-";
/// Length of a DEK in bytes (AES-256).
pub const DEK_LEN: usize = 32;

/// The DEK Secret of a tenant.
pub fn secret_name(tenant: &str) -> String {
    format!("{SECRET_PREFIX}{tenant}")
}

/// The data key of a version: `v3`.
pub fn version_key(version: u32) -> String {
    format!("v{version}")
}

/// Associated data binding a wrapped DEK to its tenant and version, so a wrapped key
/// copied into another tenant's slot does not unwrap.
pub fn aad(tenant: &str, version: u32) -> Vec<u8> {
    format!("portcullis.dev/dek/{tenant}/v{version}").into_bytes()
}

/// One wrapped DEK version.
#[derive(Clone, PartialEq, Eq)]
pub struct DekVersion {
    /// Its number, from 1.
    pub version: u32,
    /// When it was created (and so started encrypting new data).
    pub created: Timestamp,
    /// The DEK wrapped under the KEK.
    pub wrapped: Vec<u8>,
}

/// Every DEK version of one tenant.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct DekRing {
    tenant: String,
    versions: BTreeMap<u32, DekVersion>,
}

impl std::fmt::Debug for DekRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DekRing")
            .field("tenant", &self.tenant)
            .field("versions", &self.versions.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// What the ring needs now, given the clock and the tenant's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DekPlan {
    /// A new version is due (or there is none yet).
    pub rotate: bool,
    /// Versions whose data has aged out of retention.
    pub prune: Vec<u32>,
    /// When the ring next needs attention (rotation or pruning).
    pub next_event: Timestamp,
}

impl DekRing {
    /// An empty ring for `tenant`.
    pub fn new(tenant: impl Into<String>) -> Self {
        Self {
            tenant: tenant.into(),
            versions: BTreeMap::new(),
        }
    }

    /// Reads a ring from a DEK Secret's data and annotations. Keys that are not `v<n>`
    /// are refused, as is a version without its creation annotation.
    pub fn from_secret_parts(
        tenant: impl Into<String>,
        data: &BTreeMap<String, ByteString>,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Self, String> {
        let mut ring = Self::new(tenant);
        for (key, value) in data {
            let version = key
                .strip_prefix('v')
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("unexpected data key {key:?}; expected v1, v2, ..."))?;
            let created = annotations
                .get(&format!("{CREATED_ANNOTATION_PREFIX}{key}"))
                .ok_or_else(|| {
                    format!("version {key} has no {CREATED_ANNOTATION_PREFIX}{key} annotation")
                })?
                .parse::<Timestamp>()
                .map_err(|e| format!("version {key}: creation time: {e}"))?;
            ring.versions.insert(
                version,
                DekVersion {
                    version,
                    created,
                    wrapped: value.0.clone(),
                },
            );
        }
        Ok(ring)
    }

    /// The Secret data (`v<n>` → wrapped DEK) and annotations describing this ring.
    pub fn to_secret_parts(&self) -> (BTreeMap<String, ByteString>, BTreeMap<String, String>) {
        let data = self
            .versions
            .values()
            .map(|v| (version_key(v.version), ByteString(v.wrapped.clone())))
            .collect();
        let annotations = self
            .versions
            .values()
            .map(|v| {
                (
                    format!("{CREATED_ANNOTATION_PREFIX}{}", version_key(v.version)),
                    v.created.to_string(),
                )
            })
            .collect();
        (data, annotations)
    }

    /// The version new data is encrypted with.
    pub fn active(&self) -> Option<&DekVersion> {
        self.versions.values().next_back()
    }

    /// Every version number, oldest first.
    pub fn versions(&self) -> Vec<u32> {
        self.versions.keys().copied().collect()
    }

    /// Decides on rotation and pruning at `now`.
    pub fn plan(&self, now: Timestamp, rotation: Duration, retention: Duration) -> DekPlan {
        let Some(active) = self.active() else {
            return DekPlan {
                rotate: true,
                prune: Vec::new(),
                next_event: clock::add(now, rotation),
            };
        };
        let due = clock::add(active.created, rotation);
        let rotate = now >= due;
        let mut next_event = if rotate {
            clock::add(now, rotation)
        } else {
            due
        };
        let mut prune = Vec::new();
        // Version n encrypted data until n+1 was created; it is needed for `retention` after.
        let created: Vec<(u32, Timestamp)> = self
            .versions
            .values()
            .map(|v| (v.version, v.created))
            .collect();
        for pair in created.windows(2) {
            let (old, successor_created) = (pair[0].0, pair[1].1);
            let drop_at = clock::add(successor_created, retention);
            if now >= drop_at {
                prune.push(old);
            } else {
                next_event = next_event.min(drop_at);
            }
        }
        DekPlan {
            rotate,
            prune,
            next_event,
        }
    }

    /// Generates a new random DEK, wraps it under `kek` and makes it the active version.
    pub fn rotate(&mut self, kek: &Kek, now: Timestamp) -> Result<u32, EnvelopeError> {
        let version = self.active().map_or(1, |v| v.version.saturating_add(1));
        let dek = Aes256Gcm::generate_key(OsRng);
        let wrapped = kek.wrap(&dek, &aad(&self.tenant, version))?;
        self.versions.insert(
            version,
            DekVersion {
                version,
                created: now,
                wrapped,
            },
        );
        Ok(version)
    }

    /// Drops versions; the active version is never dropped.
    pub fn prune(&mut self, versions: &[u32]) {
        let active = self.active().map(|v| v.version);
        for v in versions {
            if Some(*v) != active {
                self.versions.remove(v);
            }
        }
    }

    /// Re-wraps every version not under `kek`'s current key (after a KEK rotation);
    /// returns how many were re-wrapped. The DEKs themselves do not change.
    pub fn rewrap(&mut self, kek: &Kek) -> Result<usize, EnvelopeError> {
        let current = kek.key_ref();
        let mut rewrapped = 0;
        for v in self.versions.values_mut() {
            if Kek::wrapped_under(&v.wrapped)? == current {
                continue;
            }
            let slot = aad(&self.tenant, v.version);
            let dek = kek.unwrap(&v.wrapped, &slot)?;
            v.wrapped = kek.wrap(&dek, &slot)?;
            rewrapped += 1;
        }
        Ok(rewrapped)
    }

    /// Unwraps one version (to check the KEK still opens it, or for tools that decrypt).
    pub fn unwrap_version(&self, kek: &Kek, version: u32) -> Result<Vec<u8>, EnvelopeError> {
        let v = self
            .versions
            .get(&version)
            .ok_or(EnvelopeError::Truncated {
                len: 0,
                min: DEK_LEN,
            })?;
        kek.unwrap(&v.wrapped, &aad(&self.tenant, version))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn at(days: u64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + (days * DAY) as i64).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn days(n: u64) -> Duration {
        Duration::from_secs(n * DAY)
    }

    #[test]
    fn rewrapping_moves_every_version_to_the_current_kek_keeping_the_deks()
    -> Result<(), EnvelopeError> {
        let old = Kek::generate();
        let mut ring = DekRing::new("acme");
        ring.rotate(&old, at(0))?;
        ring.rotate(&old, at(7))?;
        let deks = [ring.unwrap_version(&old, 1)?, ring.unwrap_version(&old, 2)?];
        let new = Kek::generate();
        let keyring = Kek::keyring(&new, std::slice::from_ref(&old));
        assert_eq!(ring.rewrap(&keyring)?, 2);
        assert_eq!(ring.rewrap(&keyring)?, 0);
        assert_eq!(ring.unwrap_version(&new, 1)?, deks[0]);
        assert_eq!(ring.unwrap_version(&new, 2)?, deks[1]);
        assert!(ring.unwrap_version(&old, 1).is_err());
        Ok(())
    }

    #[test]
    fn dek_wraps_under_the_kek_and_unwraps_only_in_its_slot() -> Result<(), EnvelopeError> {
        let kek = Kek::generate();
        let mut ring = DekRing::new("acme");
        assert_eq!(ring.rotate(&kek, at(0))?, 1);
        let dek = ring.unwrap_version(&kek, 1)?;
        assert_eq!(dek.len(), DEK_LEN);
        let wrapped = ring.active().map(|v| v.wrapped.clone()).unwrap_or_default();
        assert!(
            !wrapped.windows(DEK_LEN).any(|w| w == dek.as_slice()),
            "stored wrapped, never plain"
        );
        // Copied into another tenant's slot, or unwrapped with another KEK: refused.
        assert_eq!(
            kek.unwrap(&wrapped, &aad("globex", 1)),
            Err(EnvelopeError::Tampered)
        );
        assert!(ring.unwrap_version(&Kek::generate(), 1).is_err());
        assert!(!format!("{ring:?}").contains(&format!("{:?}", dek)));
        Ok(())
    }

    #[test]
    fn secret_round_trip_keeps_versions_and_times() -> Result<(), Box<dyn std::error::Error>> {
        let kek = Kek::generate();
        let mut ring = DekRing::new("acme");
        ring.rotate(&kek, at(0))?;
        ring.rotate(&kek, at(7))?;
        let (data, annotations) = ring.to_secret_parts();
        assert_eq!(data.keys().collect::<Vec<_>>(), ["v1", "v2"]);
        assert!(annotations.contains_key("portcullis.dev/dek-created-v2"));
        let back = DekRing::from_secret_parts("acme", &data, &annotations)?;
        assert_eq!(back, ring);
        assert_eq!(back.active().map(|v| v.version), Some(2));
        assert_eq!(back.unwrap_version(&kek, 1)?, ring.unwrap_version(&kek, 1)?);

        let mut bad = data.clone();
        bad.insert("latest".into(), ByteString(vec![1]));
        assert!(DekRing::from_secret_parts("acme", &bad, &annotations).is_err());
        assert!(DekRing::from_secret_parts("acme", &data, &BTreeMap::new()).is_err());
        Ok(())
    }

    #[test]
    fn rotation_schedule_follows_the_active_version() -> Result<(), EnvelopeError> {
        let kek = Kek::generate();
        let mut ring = DekRing::new("acme");
        let empty = ring.plan(at(0), days(7), days(365));
        assert!(empty.rotate);
        ring.rotate(&kek, at(0))?;
        let plan = ring.plan(at(3), days(7), days(365));
        assert!(!plan.rotate);
        assert_eq!(plan.next_event, at(7), "requeue at the next rotation");
        let plan = ring.plan(at(7), days(7), days(365));
        assert!(plan.rotate);
        assert_eq!(plan.next_event, at(14));
        Ok(())
    }

    #[test]
    fn old_versions_are_kept_until_retention_then_pruned() -> Result<(), EnvelopeError> {
        let kek = Kek::generate();
        let mut ring = DekRing::new("acme");
        ring.rotate(&kek, at(0))?; // v1 active days 0..7
        ring.rotate(&kek, at(7))?; // v2 active days 7..14
        ring.rotate(&kek, at(14))?; // v3 active
        let retention = days(30);
        // v1 stopped encrypting on day 7: keep it until day 37.
        let plan = ring.plan(at(21), days(7), retention);
        assert!(plan.prune.is_empty());
        assert!(plan.rotate, "v3 is a week old");
        let plan = ring.plan(at(36), days(700), retention);
        assert!(plan.prune.is_empty());
        assert_eq!(plan.next_event, at(37), "next event is v1's drop date");
        let plan = ring.plan(at(37), days(700), retention);
        assert_eq!(plan.prune, vec![1]);
        assert_eq!(plan.next_event, at(44), "then v2's");
        ring.prune(&plan.prune);
        assert_eq!(ring.versions(), vec![2, 3]);
        // The active version is never dropped, however old.
        ring.prune(&[3]);
        assert_eq!(ring.versions(), vec![2, 3]);
        assert!(ring.unwrap_version(&kek, 1).is_err());
        Ok(())
    }
}
