//! Where the key-encryption key (KEK) is kept, and what that means for a Restricted
//! tenant. Today the KEK is a Kubernetes Secret beside the Secrets it wraps: whoever
//! reads one reads the other, and a backup of the namespace holds both. Restricted data
//! calls for a KEK held in hardware (an HSM or a cloud KMS), so a Restricted Tenant is
//! told at admission (a Warning `kubectl` prints) and in its status (condition
//! `KeyCustody`) until the operator's KEK is one.

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
}

impl KekCustody {
    /// Whether the KEK never leaves hardware.
    pub fn hardware_backed(&self) -> bool {
        match self {
            Self::Secret { .. } => false,
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
        let (ok, reason, message) = match self.shortfall() {
            None => (
                true,
                "HardwareBackedKek",
                "the key-encryption key is held in hardware".to_owned(),
            ),
            Some(why) => (false, "SoftwareKek", why),
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
}
