//! Where the key-encryption key (KEK) is kept, and what that means for a Restricted
//! tenant. By default the KEK is a Kubernetes Secret beside the Secrets it wraps: whoever
//! reads one reads the other, and a backup of the namespace holds both. Restricted data
//! calls for a KEK held in hardware (an HSM or a cloud KMS), so a Restricted Tenant is
//! told at admission (a Warning `kubectl` prints) and in its status (condition
//! `KeyCustody`) until the operator's KEK is one: with `--kek-provider pkcs11` (an HSM)
//! or `--kek-provider kms` (a KMS v2 plugin: the stored key is encrypted by a key in the
//! KMS) it is, and the condition is True.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use portcullis_crds::{DataClassification, conditions};

/// Condition type a Restricted Tenant reports its key custody under.
pub const KEY_CUSTODY: &str = "KeyCustody";

/// Where the KEK is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KekCustody {
    /// A Kubernetes Secret in the operator's namespace (the embedded default).
    Secret {
        /// The operator's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
    },
    /// A non-extractable key in a PKCS#11 token (an HSM).
    Pkcs11 {
        /// The PKCS#11 library.
        module: String,
        /// The token, as `--pkcs11-token-label` or `--pkcs11-slot` chose it.
        token: String,
        /// The configured key's label (rotated keys add `-<time>` to it).
        key_label: String,
    },
    /// A local key stored encrypted by a Kubernetes KMS v2 plugin's key.
    Kms {
        /// The plugin's Unix socket.
        socket: String,
    },
}

impl KekCustody {
    /// Whether the KEK never leaves hardware.
    pub fn hardware_backed(&self) -> bool {
        match self {
            Self::Secret { .. } => false,
            Self::Pkcs11 { .. } | Self::Kms { .. } => true,
        }
    }

    /// What a Restricted tenant is told while its keys are not hardware-backed.
    fn shortfall(&self) -> Option<String> {
        match self {
            Self::Secret { namespace, name } => Some(format!(
                "the key-encryption key wrapping this tenant's data-encryption keys and the CA keys is the Secret {namespace}/{name}, \
                 readable by whoever can read the Secrets it protects; Restricted data calls for a hardware-backed key \
                 (an HSM or a cloud KMS); until then, limit who may read Secrets in {namespace} and keep its backups apart"
            )),
            Self::Pkcs11 { .. } | Self::Kms { .. } => None,
        }
    }

    /// The admission Warning for Tenant `name` of `classification`, if it needs one.
    pub fn admission_warning(
        &self,
        name: &str,
        classification: DataClassification,
    ) -> Option<String> {
        if classification != DataClassification::Restricted {
            return None;
        }
        self.shortfall()
            .map(|why| format!("Tenant {name:?} is Restricted, but {why}"))
    }

    /// The `KeyCustody` condition of a Tenant of `classification`: only Restricted
    /// tenants report one.
    pub fn condition(
        &self,
        classification: DataClassification,
        generation: Option<i64>,
        previous: &[Condition],
        now: Time,
    ) -> Option<Condition> {
        if classification != DataClassification::Restricted {
            return None;
        }
        let (ok, reason, message) = match (self, self.shortfall()) {
            (_, Some(why)) => (false, "SoftwareKek", why),
            (
                Self::Pkcs11 {
                    token, key_label, ..
                },
                None,
            ) => (
                true,
                "HardwareKek",
                format!(
                    "the key-encryption key is a non-extractable key in the PKCS#11 {token}, labelled {key_label:?} or, after a rotation, \
                     {key_label}-<time> (portcullis-kek records which); it never leaves the HSM"
                ),
            ),
            (Self::Kms { socket }, None) => (
                true,
                "HardwareKek",
                format!(
                    "the key-encryption key is stored only encrypted by the KMS behind the KMS v2 plugin on {socket}; without the KMS key it reveals nothing"
                ),
            ),
            (_, None) => (
                true,
                "HardwareKek",
                "the key-encryption key is held in hardware".to_owned(),
            ),
        };
        Some(conditions::condition(
            KEY_CUSTODY,
            ok,
            reason,
            message,
            generation,
            previous,
            now,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> KekCustody {
        KekCustody::Secret {
            namespace: "portcullis-system".into(),
            name: "portcullis-kek".into(),
        }
    }

    #[test]
    fn only_a_restricted_tenant_hears_that_its_kek_is_a_secret() {
        let custody = secret();
        assert!(!custody.hardware_backed());
        for quiet in [
            DataClassification::Public,
            DataClassification::Internal,
            DataClassification::Confidential,
        ] {
            assert_eq!(custody.admission_warning("acme", quiet), None);
            assert_eq!(
                custody.condition(quiet, Some(1), &[], Time(jiff::Timestamp::UNIX_EPOCH)),
                None
            );
        }
        let warning = custody
            .admission_warning("acme", DataClassification::Restricted)
            .unwrap_or_default();
        assert!(
            warning.contains("\"acme\" is Restricted")
                && warning.contains("portcullis-system/portcullis-kek"),
            "{warning}"
        );
        let condition = custody
            .condition(
                DataClassification::Restricted,
                Some(2),
                &[],
                Time(jiff::Timestamp::UNIX_EPOCH),
            )
            .unwrap_or_else(|| panic!("no condition"));
        assert_eq!(
            (
                condition.type_.as_str(),
                condition.status.as_str(),
                condition.reason.as_str()
            ),
            ("KeyCustody", "False", "SoftwareKek")
        );
        assert_eq!(condition.observed_generation, Some(2));
    }

    #[test]
    fn a_kms_kek_satisfies_a_restricted_tenant() {
        let custody = KekCustody::Kms {
            socket: "/var/run/kmsplugin/socket.sock".into(),
        };
        assert!(custody.hardware_backed());
        assert_eq!(
            custody.admission_warning("acme", DataClassification::Restricted),
            None
        );
        let condition = custody
            .condition(
                DataClassification::Restricted,
                Some(1),
                &[],
                Time(jiff::Timestamp::UNIX_EPOCH),
            )
            .unwrap_or_else(|| panic!("no condition"));
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            ("True", "HardwareKek")
        );
        assert!(
            condition
                .message
                .contains("KMS v2 plugin on /var/run/kmsplugin/socket.sock"),
            "{}",
            condition.message
        );
    }

    #[test]
    fn an_hsm_kek_satisfies_a_restricted_tenant() {
        let custody = KekCustody::Pkcs11 {
            module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            token: "token \"portcullis\"".into(),
            key_label: "portcullis-kek".into(),
        };
        assert!(custody.hardware_backed());
        assert_eq!(
            custody.admission_warning("acme", DataClassification::Restricted),
            None
        );
        let condition = custody
            .condition(
                DataClassification::Restricted,
                Some(3),
                &[],
                Time(jiff::Timestamp::UNIX_EPOCH),
            )
            .unwrap_or_else(|| panic!("no condition"));
        assert_eq!(
            (
                condition.type_.as_str(),
                condition.status.as_str(),
                condition.reason.as_str()
            ),
            ("KeyCustody", "True", "HardwareKek")
        );
        assert!(
            condition.message.contains("portcullis-kek") && condition.message.contains("PKCS#11"),
            "{}",
            condition.message
        );
        assert_eq!(
            custody.condition(
                DataClassification::Confidential,
                Some(3),
                &[],
                Time(jiff::Timestamp::UNIX_EPOCH)
            ),
            None
        );
    }
}
