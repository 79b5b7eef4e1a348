//! The crate's error type. Variant names are stable: they become metric labels.

use std::path::PathBuf;

/// Everything that can go wrong in the audit library outside verification findings
/// (those are [`crate::Problem`]s, not errors).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file or directory failed.
    #[error("audit I/O on {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A value could not be turned into (canonical) JSON.
    #[error("cannot serialise audit data: {0}")]
    Serialize(String),
    /// A line or file is not valid audit JSON.
    #[error("malformed audit data: {0}")]
    Malformed(String),
    /// The checkpoint signing key was rejected.
    #[error("checkpoint signing key rejected: {0}")]
    SigningKey(String),
    /// Producing a signature failed.
    #[error("checkpoint signing failed")]
    Signing,
    /// A data-encryption key is unusable (wrong length, bad encoding, unknown version).
    #[error("data-encryption key problem: {0}")]
    DataKey(String),
    /// An encrypted segment could not be read.
    #[error(transparent)]
    Segment(#[from] crate::segment::SegmentError),
    /// An encrypted segment was found but no key ring was given.
    #[error(
        "{path} is an encrypted audit segment: pass the tenant's data-encryption keys (--dek-file or --key-ring)"
    )]
    KeysRequired {
        /// The encrypted file.
        path: PathBuf,
    },
    /// The spool has no room for the batch.
    #[error("audit spool full ({used} of {max} bytes used, batch needs {needed})")]
    SpoolFull {
        /// Bytes in use.
        used: u64,
        /// The configured bound.
        max: u64,
        /// Size of the refused batch.
        needed: u64,
    },
    /// A configuration value is invalid.
    #[error("invalid audit configuration: {0}")]
    Config(String),
    /// A sink refused or failed to take a batch.
    #[error("audit sink {sink} failed: {message}")]
    Sink {
        /// Name of the sink.
        sink: String,
        /// What went wrong (never contains secrets).
        message: String,
    },
}

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
