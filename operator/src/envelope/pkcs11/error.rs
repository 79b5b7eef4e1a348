//! Why the HSM KEK cannot be used, each with its fix.

use std::path::PathBuf;

use cryptoki::error::Error as CkError;

use super::TokenSelector;
use super::labels::KeyRole;

/// Why the HSM KEK cannot be used: each names the cause and the fix. Never carries the
/// PIN or key material.
#[derive(Debug, thiserror::Error)]
pub enum Pkcs11Error {
    /// `--pkcs11-module` names no file.
    #[error(
        "PKCS#11 module {} does not exist: set --pkcs11-module to the HSM vendor's library as the operator's container sees it \
         (chart: kek.pkcs11.module, with kek.pkcs11.moduleHostPath to mount it from the node)",
        path.display()
    )]
    ModuleMissing {
        /// The path given.
        path: PathBuf,
    },
    /// The file is not a loadable PKCS#11 library.
    #[error(
        "PKCS#11 module {} could not be loaded ({reason}): --pkcs11-module must be the vendor's PKCS#11 library built for this platform",
        path.display()
    )]
    ModuleLoad {
        /// The path given.
        path: PathBuf,
        /// What the loader said.
        reason: String,
    },
    /// `C_Initialize` failed.
    #[error("PKCS#11 module {} failed to initialise ({reason}): check the vendor's client configuration", path.display())]
    Initialize {
        /// The module.
        path: PathBuf,
        /// The PKCS#11 return value.
        reason: String,
    },
    /// No initialised token matches `--pkcs11-token-label` / `--pkcs11-slot`.
    #[error(
        "{token} not found among the module's initialised tokens ({available}): set --pkcs11-token-label or --pkcs11-slot \
         to an initialised token (SoftHSM: softhsm2-util --init-token --free --label <label>)"
    )]
    TokenMissing {
        /// The token asked for.
        token: TokenSelector,
        /// The tokens there are, by slot and label.
        available: String,
    },
    /// The PIN file cannot be read or is empty.
    #[error(
        "PIN file {} is unusable ({reason}): --pkcs11-pin-file must hold the token's user PIN (chart: kek.pkcs11.pinSecret)",
        path.display()
    )]
    PinFile {
        /// The file.
        path: PathBuf,
        /// Why (an I/O error, or "empty").
        reason: String,
    },
    /// The token refused the PIN.
    #[error(
        "{token} refused the user PIN from {} (CKR_PIN_INCORRECT): put the token's user PIN in that file \
         (chart: the Secret kek.pkcs11.pinSecret names)",
        path.display()
    )]
    WrongPin {
        /// The token.
        token: TokenSelector,
        /// The PIN file.
        path: PathBuf,
    },
    /// Too many wrong PINs.
    #[error(
        "{token} has locked its user PIN (CKR_PIN_LOCKED): have its security officer reset the PIN, then put it in {}",
        path.display()
    )]
    PinLocked {
        /// The token.
        token: TokenSelector,
        /// The PIN file.
        path: PathBuf,
    },
    /// No AES key has the label.
    #[error(
        "no AES key labelled {label:?} in {token}: create one with `portcullis-operator pkcs11-create-key` \
         (see the README, \"Key-encryption key in an HSM\"), or set --pkcs11-key-label to the existing key's label \
         (after a KEK rotation: the label the Secret portcullis-kek records under pkcs11-key-label)"
    )]
    KeyMissing {
        /// The token.
        token: TokenSelector,
        /// The label asked for.
        label: String,
    },
    /// More than one AES key has the label.
    #[error(
        "{count} AES keys are labelled {label:?} in {token}: give the KEK a label no other key has"
    )]
    KeyAmbiguous {
        /// The token.
        token: TokenSelector,
        /// The label.
        label: String,
        /// How many keys carry it.
        count: usize,
    },
    /// The key may leave the token.
    #[error(
        "the key {label:?} in {token} can leave the HSM ({why}): a KEK must stay in the token; create a new key with \
         CKA_SENSITIVE=true and CKA_EXTRACTABLE=false (`portcullis-operator pkcs11-create-key`) and point --pkcs11-key-label at it"
    )]
    KeyExtractable {
        /// The token.
        token: TokenSelector,
        /// The key's label.
        label: String,
        /// Which attribute allows it.
        why: String,
    },
    /// The key is not an AES-256 key allowed to encrypt and decrypt, or GCM fails.
    #[error(
        "the key {label:?} in {token} cannot serve as the KEK ({why}): it must be an AES-256 key with CKA_ENCRYPT and CKA_DECRYPT, \
         in a token that offers CKM_AES_GCM"
    )]
    KeyUnusable {
        /// The token.
        token: TokenSelector,
        /// The key's label.
        label: String,
        /// What is wrong.
        why: String,
    },
    /// [`create_key`] found the label taken.
    #[error(
        "{token} already holds a key labelled {label:?}: nothing created; use it, or choose another label"
    )]
    KeyExists {
        /// The token.
        token: TokenSelector,
        /// The label.
        label: String,
    },
    /// A key the KEK Secret names (a rotation's current, staged or previous key) is not
    /// in the token.
    #[error(
        "the {role} KEK labelled {label:?}, recorded in Secret {secret} ({data_key}), is not in {token}: {}",
        match role {
            KeyRole::Next => "every replica must see the key the leader created; replicate it to the token this replica \
                uses (or point --pkcs11-token-label at the same token), or abandon the staged rotation by removing \
                pkcs11-next-label from the Secret",
            KeyRole::Previous => "Secrets not yet re-wrapped are still under it; restore it into the token under \
                the same label from the HSM's backup, and the re-wrap pass resumes",
            KeyRole::Current => "it wraps everything new; restore it into the token under the same label from the \
                HSM's backup",
        }
    )]
    RotationKeyMissing {
        /// The token.
        token: TokenSelector,
        /// The key's label.
        label: String,
        /// What the key is to the keyring.
        role: KeyRole,
        /// The Secret data key recording it.
        data_key: &'static str,
        /// The KEK Secret.
        secret: String,
    },
    /// The KEK Secret does not hold pkcs11 key labels.
    #[error("KEK Secret {secret} is not a pkcs11 key record: {why}")]
    LabelsInvalid {
        /// The Secret.
        secret: String,
        /// What is wrong.
        why: String,
    },
    /// The KEK Secret could not be read or created.
    #[error("KEK Secret {secret}: {reason}")]
    LabelsUnreadable {
        /// The Secret.
        secret: String,
        /// The API error.
        reason: String,
    },
    /// Any other PKCS#11 failure.
    #[error("PKCS#11 {operation} failed on {token}: {reason}")]
    Device {
        /// The token.
        token: TokenSelector,
        /// What was being done.
        operation: &'static str,
        /// The PKCS#11 function and return value.
        reason: String,
    },
}

/// `C_Function: CKR_...`-style text, without the spec's paragraphs.
pub(super) fn describe(error: &CkError) -> String {
    match error {
        CkError::Pkcs11(rv, function) => format!("{function}: {rv:?}"),
        other => other.to_string(),
    }
}
