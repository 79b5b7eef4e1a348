//! The `pkcs11` KEK provider: an AES-256 key inside a PKCS#11 token (an HSM), found by
//! its label, used for AES-GCM (`CKM_AES_GCM`) inside the token. The key never enters
//! process memory: the operator only holds a handle to it and a logged-in session.
//!
//! [`Pkcs11Kek::open`] refuses a setup that would not hold up (module, token, PIN, key
//! missing; a key that may leave the token; no AES-GCM) with one error naming the cause
//! and the fix, and runs a wrap/unwrap round trip before it returns. Keys are never
//! created on start: [`create_key`] (`portcullis-operator pkcs11-create-key`) makes one
//! for a new install.
//!
//! PKCS#11 sessions may not be used from two threads at once, so the one session sits
//! behind a mutex; it is reopened once when the token reports it lost (a network HSM
//! reconnecting). The PIN is read from a file and kept in a [`secrecy`] box: no `Debug`,
//! log line or error shows it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::{AuthPin, Ulong};
use secrecy::ExposeSecret;
use secrecy::zeroize::Zeroize;
use sha2::{Digest, Sha256};

use super::{EnvelopeError, KEK_ID_LEN, KEY_LEN, KekId, NONCE_LEN, TAG_LEN};

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
         (see the README, \"Key-encryption key in an HSM\"), or set --pkcs11-key-label to the existing key's label"
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
fn describe(error: &CkError) -> String {
    match error {
        CkError::Pkcs11(rv, function) => format!("{function}: {rv:?}"),
        other => other.to_string(),
    }
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

/// The loaded module and the chosen token.
struct Token {
    context: Pkcs11,
    slot: Slot,
    label: String,
    selector: TokenSelector,
}

impl Token {
    fn connect(config: &Pkcs11Config) -> Result<Self, Pkcs11Error> {
        let path = config.module.clone();
        if !path.is_file() {
            return Err(Pkcs11Error::ModuleMissing { path });
        }
        let context = Pkcs11::new(&path).map_err(|e| Pkcs11Error::ModuleLoad {
            path: path.clone(),
            reason: describe(&e),
        })?;
        match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            // Another user of the module in this process (a test, a second KEK) got there first.
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => {
                return Err(Pkcs11Error::Initialize {
                    path,
                    reason: describe(&e),
                });
            }
        }
        let device = |operation, e: CkError| Pkcs11Error::Device {
            token: config.token.clone(),
            operation,
            reason: describe(&e),
        };
        let slots = context
            .get_slots_with_initialized_token()
            .map_err(|e| device("listing slots", e))?;
        let mut seen = Vec::new();
        for slot in slots {
            let info = context
                .get_token_info(slot)
                .map_err(|e| device("reading token information", e))?;
            let label = info.label().trim_end().to_owned();
            let chosen = match &config.token {
                TokenSelector::Label(wanted) => *wanted == label,
                TokenSelector::Slot(id) => slot.id() == *id,
            };
            if chosen {
                return Ok(Self {
                    context,
                    slot,
                    label,
                    selector: config.token.clone(),
                });
            }
            seen.push(format!("slot {}: {label:?}", slot.id()));
        }
        Err(Pkcs11Error::TokenMissing {
            token: config.token.clone(),
            available: if seen.is_empty() {
                "there are none".to_owned()
            } else {
                seen.join(", ")
            },
        })
    }

    fn device(&self, operation: &'static str, e: &CkError) -> Pkcs11Error {
        Pkcs11Error::Device {
            token: self.selector.clone(),
            operation,
            reason: describe(e),
        }
    }

    /// A session logged in as the user.
    fn login(&self, pin: &AuthPin, pin_file: &Path, rw: bool) -> Result<Session, Pkcs11Error> {
        let session = if rw {
            self.context.open_rw_session(self.slot)
        } else {
            self.context.open_ro_session(self.slot)
        }
        .map_err(|e| self.device("opening a session", &e))?;
        match session.login(UserType::User, Some(pin)) {
            // Login is per application: a session opened after another logged in shares it.
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(CkError::Pkcs11(
                RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange,
                _,
            )) => Err(Pkcs11Error::WrongPin {
                token: self.selector.clone(),
                path: pin_file.to_path_buf(),
            }),
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(Pkcs11Error::PinLocked {
                token: self.selector.clone(),
                path: pin_file.to_path_buf(),
            }),
            Err(e) => Err(self.device("logging in", &e)),
        }
    }

    /// The AES keys labelled `label`.
    fn find_keys(&self, session: &Session, label: &str) -> Result<Vec<ObjectHandle>, Pkcs11Error> {
        session
            .find_objects(&[
                Attribute::Token(true),
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(|e| self.device("searching for the key", &e))
    }

    /// The one AES key labelled `label`, if it is fit to be the KEK.
    fn find_kek(&self, session: &Session, label: &str) -> Result<ObjectHandle, Pkcs11Error> {
        let keys = self.find_keys(session, label)?;
        let key = match keys.as_slice() {
            [] => {
                return Err(Pkcs11Error::KeyMissing {
                    token: self.selector.clone(),
                    label: label.to_owned(),
                });
            }
            [key] => *key,
            _ => {
                return Err(Pkcs11Error::KeyAmbiguous {
                    token: self.selector.clone(),
                    label: label.to_owned(),
                    count: keys.len(),
                });
            }
        };
        let attributes = session
            .get_attributes(
                key,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::ValueLen,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                ],
            )
            .map_err(|e| self.device("reading the key's attributes", &e))?;
        let (mut sensitive, mut extractable, mut length) = (None, None, None);
        let (mut encrypt, mut decrypt) = (None, None);
        for attribute in attributes {
            match attribute {
                Attribute::Sensitive(v) => sensitive = Some(v),
                Attribute::Extractable(v) => extractable = Some(v),
                Attribute::ValueLen(v) => length = usize::try_from(*v).ok(),
                Attribute::Encrypt(v) => encrypt = Some(v),
                Attribute::Decrypt(v) => decrypt = Some(v),
                _ => {}
            }
        }
        let leaks = [
            (extractable != Some(false), "CKA_EXTRACTABLE is not false"),
            (sensitive != Some(true), "CKA_SENSITIVE is not true"),
        ];
        let why: Vec<&str> = leaks
            .iter()
            .filter(|(bad, _)| *bad)
            .map(|(_, w)| *w)
            .collect();
        if !why.is_empty() {
            return Err(Pkcs11Error::KeyExtractable {
                token: self.selector.clone(),
                label: label.to_owned(),
                why: why.join(", "),
            });
        }
        let unusable = if length != Some(KEY_LEN) {
            Some(format!("CKA_VALUE_LEN is {length:?}, not {KEY_LEN}"))
        } else if encrypt == Some(false) || decrypt == Some(false) {
            Some("CKA_ENCRYPT or CKA_DECRYPT is false".to_owned())
        } else {
            None
        };
        if let Some(why) = unusable {
            return Err(Pkcs11Error::KeyUnusable {
                token: self.selector.clone(),
                label: label.to_owned(),
                why,
            });
        }
        Ok(key)
    }
}

fn read_pin(path: &Path) -> Result<AuthPin, Pkcs11Error> {
    let mut text = std::fs::read_to_string(path).map_err(|e| Pkcs11Error::PinFile {
        path: path.to_path_buf(),
        reason: e.kind().to_string(),
    })?;
    // Secrets written with `echo` end in a newline that is not part of the PIN.
    let pin = AuthPin::from(text.trim_end_matches(['\r', '\n']).to_owned());
    text.zeroize();
    if pin.expose_secret().is_empty() {
        return Err(Pkcs11Error::PinFile {
            path: path.to_path_buf(),
            reason: "it is empty".to_owned(),
        });
    }
    Ok(pin)
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
