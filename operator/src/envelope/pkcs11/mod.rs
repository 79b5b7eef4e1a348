//! The `pkcs11` KEK provider: an AES-256 key inside a PKCS#11 token (an HSM), found by
//! its label, used for AES-GCM (`CKM_AES_GCM`) inside the token. The key never enters
//! process memory: the operator only holds a handle to it and a logged-in session.
//!
//! [`Pkcs11Kek::open`] refuses a setup that would not hold up (module, token, PIN, key
//! missing; a key that may leave the token; no AES-GCM) with one error naming the cause
//! and the fix, and runs a wrap/unwrap round trip before it returns. Keys are never
//! created on start: [`create_key`] (`portcullis-operator pkcs11-create-key`) makes one
//! for a new install; a rotation ([`crate::kek_rotation`]) creates its new key the same
//! way under a label of its own ([`labels`]).
//!
//! PKCS#11 sessions may not be used from two threads at once, so the one session sits
//! behind a mutex; it is reopened once when the token reports it lost (a network HSM
//! reconnecting). The PIN is read from a file and kept in a [`secrecy`] box: no `Debug`,
//! log line or error shows it.

mod error;
pub mod labels;
mod token;

use std::fmt;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::types::{AuthPin, Ulong};
use sha2::{Digest, Sha256};

pub use error::Pkcs11Error;
pub use labels::{KeyLabels, KeyRole};

use super::{EnvelopeError, KEK_ID_LEN, KEY_LEN, KekId, NONCE_LEN, TAG_LEN};
use error::describe;
use token::{Token, read_pin};

/// Which token holds the KEK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSelector {
    /// The token with this label (`--pkcs11-token-label`).
    Label(String),
    /// The token in this slot (`--pkcs11-slot`).
    Slot(u64),
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Label(label) => write!(f, "token {label:?}"),
            Self::Slot(slot) => write!(f, "the token in slot {slot}"),
        }
    }
}

/// Where the HSM key is and how to log in. Holds the PIN's path, never the PIN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkcs11Config {
    /// The vendor's PKCS#11 library (`--pkcs11-module`).
    pub module: PathBuf,
    /// The token (`--pkcs11-token-label` or `--pkcs11-slot`).
    pub token: TokenSelector,
    /// `CKA_LABEL` of the AES-256 key (`--pkcs11-key-label`).
    pub key_label: String,
    /// A file holding the token's user PIN (`--pkcs11-pin-file`).
    pub pin_file: PathBuf,
}

/// The id recorded in v2 envelopes for the key `key_label` in the token labelled
/// `token_label`: the first 8 bytes of SHA-256 over a domain tag and both labels
/// (length-prefixed). The same labels on a replicated HSM give the same id.
pub fn key_id(token_label: &str, key_label: &str) -> KekId {
    let mut hash = Sha256::new().chain_update(b"portcullis-pkcs11-kek-id\0");
    for part in [token_label, key_label] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    let mut id = [0u8; KEK_ID_LEN];
    id.copy_from_slice(&digest[..KEK_ID_LEN]);
    KekId(id)
}

/// The logged-in session and the key's handle in it.
struct Live {
    session: Session,
    key: ObjectHandle,
}

/// Why a call on the session failed.
enum SessionFailure {
    Call(CkError),
    Reopen(Pkcs11Error),
}

impl SessionFailure {
    fn into_envelope_error(self, operation: &'static str) -> EnvelopeError {
        let reason = match self {
            Self::Call(e) => describe(&e),
            Self::Reopen(e) => format!("the session was lost and could not be reopened: {e}"),
        };
        EnvelopeError::Hsm { operation, reason }
    }
}

/// A KEK held in a PKCS#11 token. `Debug` shows where, never the PIN.
pub struct Pkcs11Kek {
    token: Token,
    pin: AuthPin,
    config: Pkcs11Config,
    id: KekId,
    live: Mutex<Live>,
}

impl Pkcs11Kek {
    /// Loads the module, logs in to the token, finds the key and checks it cannot leave
    /// the token, then runs one wrap/unwrap through the token. Blocks on the HSM.
    pub fn open(config: &Pkcs11Config) -> Result<Self, Pkcs11Error> {
        let pin = read_pin(&config.pin_file)?;
        let token = Token::connect(config)?;
        let session = token.login(&pin, &config.pin_file, false)?;
        let key = token.find_kek(&session, &config.key_label)?;
        let kek = Self {
            id: key_id(&token.label, &config.key_label),
            token,
            pin,
            config: config.clone(),
            live: Mutex::new(Live { session, key }),
        };
        kek.self_test()?;
        Ok(kek)
    }

    /// The key's id, from the token and key labels.
    pub fn id(&self) -> KekId {
        self.id
    }

    /// The label of the token holding the key.
    pub fn token_label(&self) -> &str {
        &self.token.label
    }

    /// The key's `CKA_LABEL`.
    pub fn key_label(&self) -> &str {
        &self.config.key_label
    }

    fn self_test(&self) -> Result<(), Pkcs11Error> {
        self.probe().map_err(|e| Pkcs11Error::KeyUnusable {
            token: self.token.selector.clone(),
            label: self.config.key_label.clone(),
            why: format!("AES-GCM in the token failed: {e}"),
        })
    }

    /// Runs `op` on the session, reopening it once when the token says it was lost.
    fn with_session<T>(
        &self,
        op: impl Fn(&Session, ObjectHandle) -> Result<T, CkError>,
    ) -> Result<T, SessionFailure> {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        match op(&live.session, live.key) {
            Err(CkError::Pkcs11(
                RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::UserNotLoggedIn
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent,
                _,
            )) => {
                *live = self.reopen().map_err(SessionFailure::Reopen)?;
                op(&live.session, live.key).map_err(SessionFailure::Call)
            }
            other => other.map_err(SessionFailure::Call),
        }
    }

    fn reopen(&self) -> Result<Live, Pkcs11Error> {
        let session = self.token.login(&self.pin, &self.config.pin_file, false)?;
        let key = self.token.find_kek(&session, &self.config.key_label)?;
        tracing::warn!(token = %self.token.selector, "PKCS#11 session lost: reopened");
        Ok(Live { session, key })
    }

    fn tag_bits() -> Result<Ulong, CkError> {
        Ulong::try_from(TAG_LEN * 8)
    }

    /// AES-256-GCM in the token: ciphertext + tag.
    pub(super) fn seal(
        &self,
        nonce: &[u8],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, EnvelopeError> {
        let sealed = self
            .with_session(|session, key| {
                let mut iv = nonce.to_vec();
                let params = GcmParams::new(&mut iv, aad, Self::tag_bits()?)?;
                session.encrypt(&Mechanism::AesGcm(params), key, plaintext)
            })
            .map_err(|e| e.into_envelope_error("wrap"))?;
        if sealed.len() != plaintext.len() + TAG_LEN {
            return Err(EnvelopeError::Hsm {
                operation: "wrap",
                reason: format!(
                    "CKM_AES_GCM returned {} bytes for {} (is the tag {TAG_LEN} bytes?)",
                    sealed.len(),
                    plaintext.len()
                ),
            });
        }
        Ok(sealed)
    }

    /// Opens what [`Pkcs11Kek::seal`] sealed, in the token.
    pub(super) fn unseal(
        &self,
        nonce: &[u8],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Vec<u8>, EnvelopeError> {
        let failure = match self.with_session(|session, key| {
            let mut iv = nonce.to_vec();
            let params = GcmParams::new(&mut iv, aad, Self::tag_bits()?)?;
            session.decrypt(&Mechanism::AesGcm(params), key, sealed)
        }) {
            Ok(plaintext) => return Ok(plaintext),
            Err(failure) => failure,
        };
        // Tokens report a failed GCM tag differently (SoftHSM: CKR_GENERAL_ERROR, others
        // CKR_ENCRYPTED_DATA_INVALID). If a probe still round-trips, the token is fine
        // and the data failed authentication; otherwise the token is the problem.
        match failure {
            SessionFailure::Call(_) if self.probe().is_ok() => Err(EnvelopeError::Tampered),
            other => Err(other.into_envelope_error("unwrap")),
        }
    }

    /// One wrap/unwrap of a fixed probe through the token.
    fn probe(&self) -> Result<(), EnvelopeError> {
        const PROBE: &[u8] = b"portcullis-kek-probe";
        let nonce = [7u8; NONCE_LEN];
        let sealed = self.seal(&nonce, b"probe", PROBE)?;
        let opened = self
            .with_session(|session, key| {
                let mut iv = nonce.to_vec();
                let params = GcmParams::new(&mut iv, b"probe", Self::tag_bits()?)?;
                session.decrypt(&Mechanism::AesGcm(params), key, &sealed)
            })
            .map_err(|e| e.into_envelope_error("unwrap"))?;
        if opened == PROBE {
            Ok(())
        } else {
            Err(EnvelopeError::Hsm {
                operation: "unwrap",
                reason: "CKM_AES_GCM did not round-trip".to_owned(),
            })
        }
    }
}

impl fmt::Debug for Pkcs11Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kek")
            .field("provider", &"pkcs11")
            .field("id", &self.id)
            .field("module", &self.config.module)
            .field("token", &self.token.label)
            .field("key_label", &self.config.key_label)
            .finish_non_exhaustive()
    }
}

/// Creates the KEK for a new install: a token-resident AES-256 key labelled
/// `config.key_label`, sensitive and not extractable, allowed to encrypt and decrypt
/// only. Refuses when the label is taken. Returns the id v2 envelopes will record.
pub fn create_key(config: &Pkcs11Config) -> Result<KekId, Pkcs11Error> {
    let pin = read_pin(&config.pin_file)?;
    let token = Token::connect(config)?;
    let session = token.login(&pin, &config.pin_file, true)?;
    if !token.find_keys(&session, &config.key_label)?.is_empty() {
        return Err(Pkcs11Error::KeyExists {
            token: config.token.clone(),
            label: config.key_label.clone(),
        });
    }
    let length = Ulong::try_from(KEY_LEN).map_err(|e| token.device("creating the key", &e))?;
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
                Attribute::ValueLen(length),
                Attribute::Label(config.key_label.as_bytes().to_vec()),
            ],
        )
        .map_err(|e| token.device("creating the key", &e))?;
    Ok(key_id(&token.label, &config.key_label))
}

/// Destroys the key labelled `config.key_label` that a rotation created but could not
/// record (another replica's write won). Only for a key nothing was ever wrapped under:
/// recorded keys are never destroyed by the operator.
pub fn destroy_unrecorded_key(config: &Pkcs11Config) -> Result<(), Pkcs11Error> {
    let pin = read_pin(&config.pin_file)?;
    let token = Token::connect(config)?;
    let session = token.login(&pin, &config.pin_file, true)?;
    for key in token.find_keys(&session, &config.key_label)? {
        session
            .destroy_object(key)
            .map_err(|e| token.device("destroying an unrecorded key", &e))?;
    }
    Ok(())
}
