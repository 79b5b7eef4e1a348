//! The loaded PKCS#11 module and the chosen token: connecting, logging in, and finding
//! the key and checking it cannot leave the token.

use std::path::Path;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use secrecy::ExposeSecret;
use secrecy::zeroize::Zeroize;

use super::error::describe;
use super::{KEY_LEN, Pkcs11Config, Pkcs11Error, TokenSelector};

/// The loaded module and the chosen token.
pub(super) struct Token {
    context: Pkcs11,
    slot: Slot,
    pub(super) label: String,
    pub(super) selector: TokenSelector,
}

impl Token {
    pub(super) fn connect(config: &Pkcs11Config) -> Result<Self, Pkcs11Error> {
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

    pub(super) fn device(&self, operation: &'static str, e: &CkError) -> Pkcs11Error {
        Pkcs11Error::Device {
            token: self.selector.clone(),
            operation,
            reason: describe(e),
        }
    }

    /// A session logged in as the user.
    pub(super) fn login(
        &self,
        pin: &AuthPin,
        pin_file: &Path,
        rw: bool,
    ) -> Result<Session, Pkcs11Error> {
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
    pub(super) fn find_keys(
        &self,
        session: &Session,
        label: &str,
    ) -> Result<Vec<ObjectHandle>, Pkcs11Error> {
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
    pub(super) fn find_kek(
        &self,
        session: &Session,
        label: &str,
    ) -> Result<ObjectHandle, Pkcs11Error> {
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

pub(super) fn read_pin(path: &Path) -> Result<AuthPin, Pkcs11Error> {
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
