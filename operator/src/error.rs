//! The operator's one error type. Variant names double as metric labels
//! (`portcullis_operator_reconcile_failures_total{error="ScopeNotInRole"}`) and, for
//! problems with an object's content, as the reason of its `Ready=False` condition.
//!
//! Messages never carry secrets: no tokens, DEKs or KEK bytes.

use kube::runtime::finalizer;

/// Everything a reconcile, the policy server or the leader elector can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed a request.
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),

    /// Adding or removing a finalizer, or the cleanup behind it, failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),

    /// An object from the API server lacks a field every object has (name, namespace).
    #[error("object has no {0}")]
    MissingObjectKey(&'static str),

    /// The spec breaks a rule the schema cannot express.
    #[error("invalid spec: {0}")]
    InvalidSpec(portcullis_crds::FieldErrors),

    /// An ApiKey or Role lives in a namespace no Tenant has bound.
    #[error("namespace {namespace} is not bound to any Tenant")]
    TenantNotFound {
        /// The namespace.
        namespace: String,
    },

    /// A namespace the Tenant asks for already belongs to another Tenant.
    #[error("{0}")]
    NamespaceClaimed(String),

    /// Namespaces the Tenant lists do not exist (yet).
    #[error("{0}")]
    NamespaceNotFound(String),

    /// A Role's `inherits` comes back to itself.
    #[error("{0}")]
    InheritanceCycle(String),

    /// A Role inherits from a Role that does not exist.
    #[error("{0}")]
    MissingParent(String),

    /// An ApiKey names a Role that does not exist in its namespace.
    #[error("role {role:?} does not exist in namespace {namespace}")]
    UnknownRole {
        /// The role reference in the key's spec.
        role: String,
        /// The key's namespace.
        namespace: String,
    },

    /// An ApiKey's role cannot be resolved (a cycle or missing parent further up).
    #[error("role {role:?} cannot be resolved: {reason}")]
    RoleNotResolved {
        /// The role reference.
        role: String,
        /// Why it cannot be resolved.
        reason: String,
    },

    /// An ApiKey asks for a scope its role does not grant.
    #[error("scope {scope:?} is not granted by role {role:?}")]
    ScopeNotInRole {
        /// The scope asked for.
        scope: String,
        /// The key's role.
        role: String,
    },

    /// An ApiKey asks for a scope the tenant's catalogue does not define.
    #[error("scope {scope:?} is not in tenant {tenant}'s scope catalogue")]
    UnknownScope {
        /// The scope asked for.
        scope: String,
        /// The tenant.
        tenant: String,
    },

    /// A Secret named like the key's (`<name>-key`) exists and belongs to something else.
    #[error("Secret {secret} exists and is not owned by this ApiKey; delete or rename it")]
    SecretNotOwned {
        /// The Secret.
        secret: String,
    },

    /// bcrypt could not hash a new token.
    #[error("hashing a new token: {0}")]
    Hash(#[source] bcrypt::BcryptError),

    /// Wrapping or unwrapping a DEK under the KEK failed.
    #[error("DEK {secret}/{version}: {source}")]
    Envelope {
        /// The DEK Secret.
        secret: String,
        /// The DEK version (`v3`).
        version: String,
        /// What went wrong.
        #[source]
        source: crate::envelope::EnvelopeError,
    },

    /// The DEK Secret holds something the operator did not write.
    #[error("DEK Secret {secret} is malformed: {reason}")]
    DekSecretMalformed {
        /// The Secret.
        secret: String,
        /// What is wrong.
        reason: String,
    },

    /// Loading the key-encryption key failed.
    #[error("key-encryption key: {0}")]
    Kek(String),

    /// A background task (hashing) panicked or was cancelled.
    #[error("background task: {0}")]
    Task(String),

    /// Serialising an object or bundle failed.
    #[error("serialising: {0}")]
    Serialize(#[source] serde_json::Error),

    /// A listener or connection failed.
    #[error("{context}: {source}")]
    Io {
        /// What the operator was doing.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Self::Kube(e)
    }
}

impl Error {
    /// The variant name: the `error` label of the failure metric and, for content
    /// problems, the reason of the `Ready=False` condition.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "Kube",
            Self::Finalizer(inner) => match inner.as_ref() {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => {
                    e.metric_label()
                }
                _ => "Finalizer",
            },
            Self::MissingObjectKey(_) => "MissingObjectKey",
            Self::InvalidSpec(_) => "InvalidSpec",
            Self::TenantNotFound { .. } => "TenantNotFound",
            Self::NamespaceClaimed(_) => "NamespaceClaimed",
            Self::NamespaceNotFound(_) => "NamespaceNotFound",
            Self::InheritanceCycle(_) => "InheritanceCycle",
            Self::MissingParent(_) => "MissingParent",
            Self::UnknownRole { .. } => "UnknownRole",
            Self::RoleNotResolved { .. } => "RoleNotResolved",
            Self::ScopeNotInRole { .. } => "ScopeNotInRole",
            Self::UnknownScope { .. } => "UnknownScope",
            Self::SecretNotOwned { .. } => "SecretNotOwned",
            Self::Hash(_) => "Hash",
            Self::Envelope { .. } => "Envelope",
            Self::DekSecretMalformed { .. } => "DekSecretMalformed",
            Self::Kek(_) => "Kek",
            Self::Task(_) => "Task",
            Self::Serialize(_) => "Serialize",
            Self::Io { .. } => "Io",
        }
    }

    /// Whether the error is about the object's content (the user must change something)
    /// rather than about the operator's environment (retrying may help).
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            Self::InvalidSpec(_)
                | Self::TenantNotFound { .. }
                | Self::NamespaceClaimed(_)
                | Self::NamespaceNotFound(_)
                | Self::InheritanceCycle(_)
                | Self::MissingParent(_)
                | Self::UnknownRole { .. }
                | Self::RoleNotResolved { .. }
                | Self::ScopeNotInRole { .. }
                | Self::UnknownScope { .. }
                | Self::SecretNotOwned { .. }
        )
    }

    /// The HTTP status code of an API error, if this is one.
    pub fn api_code(&self) -> Option<u16> {
        match self {
            Self::Kube(kube::Error::Api(status)) => Some(status.code),
            Self::Finalizer(inner) => match inner.as_ref() {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => {
                    e.api_code()
                }
                _ => None,
            },
            _ => None,
        }
    }
}

/// Whether an API call failed with `code`.
pub(crate) fn is_api_code(err: &kube::Error, code: u16) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_variant_names_and_see_through_finalizers() {
        let scope = Error::ScopeNotInRole {
            scope: "events".into(),
            role: "viewer".into(),
        };
        assert_eq!(scope.metric_label(), "ScopeNotInRole");
        assert!(scope.is_rejection());
        let wrapped = Error::Finalizer(Box::new(finalizer::Error::ApplyFailed(
            Error::NamespaceClaimed("x".into()),
        )));
        assert_eq!(wrapped.metric_label(), "NamespaceClaimed");
        let plain = Error::Finalizer(Box::new(finalizer::Error::UnnamedObject));
        assert_eq!(plain.metric_label(), "Finalizer");
        assert!(!Error::Task("x".into()).is_rejection());
    }
}
