//! Errors of the cluster commands. Messages say what went wrong and what to do; none
//! ever carries a token.

use portcullis_crds::FieldErrors;

/// Why a cluster command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The kubeconfig could not be read or has no usable context.
    #[error("cannot load the kubeconfig: {0}")]
    Kubeconfig(String),
    /// The API server (or one of its admission webhooks) refused a request. The message
    /// is the server's own, shown as-is: it names the missing scope or permission.
    #[error("{message}")]
    Refused {
        /// HTTP status code.
        code: u16,
        /// The server's message.
        message: String,
    },
    /// An object does not exist.
    #[error("{what} not found: {hint}")]
    NotFound {
        /// `ApiKey acme-prod/ingest`.
        what: String,
        /// How to find the right name.
        hint: String,
    },
    /// Local validation refused the object; nothing was sent.
    #[error("{what} is invalid, nothing was created:\n{}", indent_errors(.errors))]
    Invalid {
        /// `ApiKey ingest`.
        what: String,
        /// Each refused field with its path.
        errors: FieldErrors,
    },
    /// The operator did not do its part in time, or refused to.
    #[error("{0}")]
    Operator(String),
    /// A key's Secret is missing or holds something unusable.
    #[error("{0}")]
    Secret(String),
    /// The API server could not be reached or answered something unreadable.
    #[error("cannot talk to the Kubernetes API server: {0}")]
    Transport(String),
    /// A certificate could not be read.
    #[error("{0}")]
    Certificate(String),
    /// The proxy admin endpoint could not be read.
    #[error("{0}")]
    AdminEndpoint(String),
    /// Results could not be written.
    #[error("cannot write output: {0}")]
    Output(String),
}

fn indent_errors(errors: &FieldErrors) -> String {
    errors
        .0
        .iter()
        .map(|e| format!("  {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl CliError {
    /// Maps a client error: API statuses keep the server's message; a 404 names `what`.
    pub fn from_kube(error: kube::Error, what: impl FnOnce() -> (String, String)) -> Self {
        match error {
            kube::Error::Api(status) if status.code == 404 => {
                let (what, hint) = what();
                Self::NotFound { what, hint }
            }
            kube::Error::Api(status) => Self::Refused {
                code: status.code,
                message: status.message,
            },
            other => Self::Transport(other.to_string()),
        }
    }

    /// Whether this is an authorization refusal (403).
    pub fn is_forbidden(&self) -> bool {
        matches!(self, Self::Refused { code: 403, .. })
    }
}

impl From<kube::Error> for CliError {
    fn from(error: kube::Error) -> Self {
        Self::from_kube(error, || {
            (
                "the object".to_owned(),
                "check the name and namespace".to_owned(),
            )
        })
    }
}

impl From<std::io::Error> for CliError {
    fn from(error: std::io::Error) -> Self {
        Self::Output(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_lists_each_field_on_its_own_line() {
        let mut errors = FieldErrors::default();
        errors.push("spec.ipAllowlist[0]", "invalid CIDR \"x\"");
        errors.push("spec.scopes[1]", "scope a is listed twice");
        let text = CliError::Invalid {
            what: "ApiKey k".into(),
            errors,
        }
        .to_string();
        assert_eq!(
            text,
            "ApiKey k is invalid, nothing was created:\n  spec.ipAllowlist[0]: invalid CIDR \"x\"\n  spec.scopes[1]: scope a is listed twice"
        );
    }

    #[test]
    fn refusals_keep_the_server_message() {
        let status = kube::core::Status::failure(
            "admission webhook \"validate.portcullis.dev\" denied the request: scope signals is not granted by role Developer",
            "Forbidden",
        )
        .with_code(403);
        let err = CliError::from(kube::Error::Api(status.boxed()));
        assert!(err.is_forbidden());
        assert_eq!(
            err.to_string(),
            "admission webhook \"validate.portcullis.dev\" denied the request: scope signals is not granted by role Developer"
        );
    }
}
