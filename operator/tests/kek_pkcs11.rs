//! The PKCS#11 key-encryption key against SoftHSM: wrap and unwrap run in the token, the
//! key cannot be read out, and every way a setup can be wrong stops the operator with
//! the cause and its fix before it writes anything. A rotation generates a new
//! non-extractable key in the HSM, moves every blob to it, and keeps the old key there.
//!
//! SoftHSM reads `SOFTHSM2_CONF` once per process and the environment is process-wide,
//! so each test runs its body in a child process of this binary with its own token
//! directory. Without `libsofthsm2.so` (package softhsm2) the tests print why and pass;
//! CI installs it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{
    Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::{Session, UserType};
use cryptoki::types::{AuthPin, Ulong};
use portcullis_operator::envelope::pkcs11::{KeyLabels, labels};
use portcullis_operator::envelope::{
    EnvelopeError, Kek, KekProvider, KeyRef, Pkcs11Config, Pkcs11Error, Pkcs11Kek, TokenSelector,
    pkcs11,
};

const TOKEN: &str = "portcullis-test";
const PIN: &str = "user-pin-4711";
const SO_PIN: &str = "so-pin-0815";
const KEY: &str = "portcullis-kek";
/// Set in the child process: the test it runs and its token directory.
const CHILD_TEST: &str = "PORTCULLIS_HSM_TEST";
const CHILD_DIR: &str = "PORTCULLIS_HSM_DIR";

fn softhsm_module() -> Option<PathBuf> {
    let arch = std::env::consts::ARCH;
    [
        "/usr/lib/softhsm/libsofthsm2.so".to_owned(),
        format!("/usr/lib/{arch}-linux-gnu/softhsm/libsofthsm2.so"),
        "/usr/local/lib/softhsm/libsofthsm2.so".to_owned(),
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// A fresh SoftHSM token directory, seen from the child process.
struct Hsm {
    dir: PathBuf,
    module: PathBuf,
}

impl Hsm {
    /// Initialises a token labelled `label` with [`PIN`] as the user PIN.
    fn init_token(&self, label: &str) {
        let out = Command::new("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                PIN,
                "--so-pin",
                SO_PIN,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "softhsm2-util: {out:?}");
    }

    fn pin_file(&self, pin: &str) -> PathBuf {
        static FILES: AtomicUsize = AtomicUsize::new(0);
        let n = FILES.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("pin-{n}"));
        std::fs::write(&path, format!("{pin}\n")).unwrap();
        path
    }

    fn config(&self, token: &str, key: &str, pin: &str) -> Pkcs11Config {
        Pkcs11Config {
            module: self.module.clone(),
            token: TokenSelector::Label(token.to_owned()),
            key_label: key.to_owned(),
            pin_file: self.pin_file(pin),
        }
    }

    /// A logged-in session of the test's own, outside the operator's code.
    fn session(&self, token: &str) -> Session {
        let context = Pkcs11::new(&self.module).unwrap();
        let _ = context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
        let slot = context
            .get_slots_with_initialized_token()
            .unwrap()
            .into_iter()
            .find(|s| context.get_token_info(*s).unwrap().label().trim_end() == token)
            .unwrap();
        let session = context.open_rw_session(slot).unwrap();
        let _ = session.login(UserType::User, Some(&AuthPin::from(PIN.to_owned())));
        session
    }
}

/// Runs `body` in a child process of this binary with its own SoftHSM configuration;
/// skips (passing) with a printed reason when SoftHSM is not installed.
fn with_softhsm(test: &str, body: impl FnOnce(&Hsm)) {
    let Some(module) = softhsm_module() else {
        eprintln!("skipped {test}: libsofthsm2.so not found (apt-get install softhsm2)");
        return;
    };
    if std::env::var(CHILD_TEST).as_deref() == Ok(test) {
        let dir = PathBuf::from(std::env::var(CHILD_DIR).unwrap());
        return body(&Hsm { dir, module });
    }
    if Command::new("softhsm2-util")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped {test}: softhsm2-util not found (apt-get install softhsm2)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &conf)
        .env(CHILD_TEST, test)
        .env(CHILD_DIR, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{test} in its SoftHSM process:\n{stdout}\n{stderr}"
    );
}

fn open_err(config: &Pkcs11Config) -> Pkcs11Error {
    match Pkcs11Kek::open(config) {
        Ok(kek) => panic!("opened {kek:?}"),
        Err(e) => e,
    }
}

/// A key the operator must refuse: AES-256 but readable out of the token.
/// The key's value cannot be read out: sensitive, never extractable, no `CKA_VALUE`.
fn assert_locked_in(session: &Session, key: ObjectHandle) {
    let read = session
        .get_attributes(
            key,
            &[
                AttributeType::Value,
                AttributeType::Extractable,
                AttributeType::Sensitive,
            ],
        )
        .unwrap();
    assert!(
        !read.iter().any(|a| matches!(a, Attribute::Value(_))),
        "{read:?}"
    );
    assert!(read.contains(&Attribute::Extractable(false)), "{read:?}");
    assert!(read.contains(&Attribute::Sensitive(true)), "{read:?}");
}

fn create_extractable_key(session: &Session, label: &str) {
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::ValueLen(Ulong::try_from(32usize).unwrap()),
                Attribute::Label(label.as_bytes().to_vec()),
            ],
        )
        .unwrap();
}

#[test]
fn wraps_and_unwraps_inside_the_hsm_and_the_key_cannot_be_read_out() {
    with_softhsm(
        "wraps_and_unwraps_inside_the_hsm_and_the_key_cannot_be_read_out",
        |hsm| {
            hsm.init_token(TOKEN);
            let config = hsm.config(TOKEN, KEY, PIN);
            let id = pkcs11::create_key(&config).unwrap();
            assert_eq!(id, pkcs11::key_id(TOKEN, KEY));
            // Creating again never replaces the key.
            assert!(matches!(
                pkcs11::create_key(&config),
                Err(Pkcs11Error::KeyExists { .. })
            ));

            let kek = Kek::from(Pkcs11Kek::open(&config).unwrap());
            assert_eq!(kek.provider(), KekProvider::Pkcs11);
            assert_eq!(kek.id(), id);
            let wrapped = kek.wrap(b"tenant dek", b"portcullis-dek/acme/1").unwrap();
            // v2: [2][provider 2][key id][nonce 12][ciphertext + 16-byte tag].
            assert_eq!(&wrapped[..2], &[2, 2]);
            assert_eq!(&wrapped[2..10], id.as_bytes());
            assert_eq!(wrapped.len(), 10 + 12 + b"tenant dek".len() + 16);
            assert_eq!(
                kek.unwrap(&wrapped, b"portcullis-dek/acme/1").unwrap(),
                b"tenant dek"
            );
            assert_ne!(
                kek.wrap(b"tenant dek", b"portcullis-dek/acme/1").unwrap(),
                wrapped
            );

            // AAD, header and ciphertext are all bound: the token refuses any change.
            assert_eq!(
                kek.unwrap(&wrapped, b"portcullis-dek/acme/2"),
                Err(EnvelopeError::Tampered)
            );
            for i in [10, 15, 22, wrapped.len() - 1] {
                let mut t = wrapped.clone();
                t[i] ^= 0x01;
                assert_eq!(
                    kek.unwrap(&t, b"portcullis-dek/acme/1"),
                    Err(EnvelopeError::Tampered),
                    "byte {i}"
                );
            }

            // A restarted operator (a second open in the same process) reads the blob.
            let again = Kek::from(Pkcs11Kek::open(&config).unwrap());
            assert_eq!(
                again.unwrap(&wrapped, b"portcullis-dek/acme/1").unwrap(),
                b"tenant dek"
            );

            // Nothing in Debug or errors says the PIN.
            let printed = format!("{kek:?}");
            assert!(
                printed.contains("pkcs11") && printed.contains(KEY),
                "{printed}"
            );
            assert!(!printed.contains(PIN), "{printed}");

            // The key's value cannot be read from the token, not even logged in.
            let session = hsm.session(TOKEN);
            let keys = session
                .find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Label(KEY.as_bytes().to_vec()),
                ])
                .unwrap();
            assert_eq!(keys.len(), 1);
            let info = session
                .get_attribute_info(keys[0], &[AttributeType::Value])
                .unwrap();
            assert!(
                matches!(info.as_slice(), [AttributeInfo::Sensitive]),
                "{info:?}"
            );
            assert_locked_in(&session, keys[0]);
        },
    );
}

#[test]
fn a_blob_from_another_provider_or_key_is_refused_naming_both() {
    with_softhsm(
        "a_blob_from_another_provider_or_key_is_refused_naming_both",
        |hsm| {
            hsm.init_token(TOKEN);
            let config = hsm.config(TOKEN, KEY, PIN);
            pkcs11::create_key(&config).unwrap();
            let other = hsm.config(TOKEN, "other-kek", PIN);
            pkcs11::create_key(&other).unwrap();
            let hsm_kek = Kek::from(Pkcs11Kek::open(&config).unwrap());
            let other_kek = Kek::from(Pkcs11Kek::open(&other).unwrap());
            let secret_kek = Kek::generate();

            // A v1 blob from the Secret the cluster had before.
            let from_secret = secret_kek.wrap(b"ca key", b"slot").unwrap();
            let err = hsm_kek.unwrap(&from_secret, b"slot").unwrap_err();
            assert_eq!(
                err,
                EnvelopeError::WrongKey {
                    expected: KeyRef {
                        provider: KekProvider::Pkcs11,
                        id: hsm_kek.id()
                    },
                    found: KeyRef {
                        provider: KekProvider::Secret,
                        id: secret_kek.id()
                    },
                }
            );
            let message = err.to_string();
            assert!(
                message.contains(&format!("secret KEK {}", secret_kek.id()))
                    && message.contains(&format!("pkcs11 KEK {}", hsm_kek.id())),
                "{message}"
            );

            let from_hsm = hsm_kek.wrap(b"ca key", b"slot").unwrap();
            assert!(matches!(
                secret_kek.unwrap(&from_hsm, b"slot"),
                Err(EnvelopeError::WrongKey { expected, found })
                    if expected.provider == KekProvider::Secret && found.provider == KekProvider::Pkcs11
            ));
            assert!(matches!(
                other_kek.unwrap(&from_hsm, b"slot"),
                Err(EnvelopeError::WrongKey { expected, found })
                    if expected.id == other_kek.id() && found.id == hsm_kek.id()
            ));
        },
    );
}

#[test]
fn a_wrong_pin_is_refused_with_the_fix_and_without_the_pin() {
    with_softhsm(
        "a_wrong_pin_is_refused_with_the_fix_and_without_the_pin",
        |hsm| {
            hsm.init_token(TOKEN);
            pkcs11::create_key(&hsm.config(TOKEN, KEY, PIN)).unwrap();
            let config = hsm.config(TOKEN, KEY, "not-the-pin-1234");
            let err = open_err(&config);
            assert!(matches!(err, Pkcs11Error::WrongPin { .. }), "{err:?}");
            let message = err.to_string();
            assert!(
                message.contains("refused the user PIN")
                    && message.contains(&config.pin_file.display().to_string())
                    && message.contains("kek.pkcs11.pinSecret"),
                "{message}"
            );
            assert!(!message.contains("not-the-pin-1234") && !message.contains(PIN));
            assert!(!format!("{err:?}").contains("not-the-pin-1234"));

            let empty = Pkcs11Config {
                pin_file: hsm.pin_file(""),
                ..config.clone()
            };
            assert!(matches!(open_err(&empty), Pkcs11Error::PinFile { .. }));
            let absent = Pkcs11Config {
                pin_file: hsm.dir.join("no-such-pin"),
                ..config
            };
            assert!(matches!(open_err(&absent), Pkcs11Error::PinFile { .. }));
        },
    );
}

#[test]
fn a_missing_module_token_or_key_is_named_with_the_fix() {
    with_softhsm(
        "a_missing_module_token_or_key_is_named_with_the_fix",
        |hsm| {
            hsm.init_token(TOKEN);
            let config = hsm.config(TOKEN, KEY, PIN);

            let err = open_err(&config);
            assert!(matches!(err, Pkcs11Error::KeyMissing { .. }), "{err:?}");
            let message = err.to_string();
            assert!(
                message.contains(&format!("no AES key labelled {KEY:?}"))
                    && message.contains("pkcs11-create-key"),
                "{message}"
            );

            let err = open_err(&Pkcs11Config {
                token: TokenSelector::Label("no-such-token".into()),
                ..config.clone()
            });
            assert!(matches!(err, Pkcs11Error::TokenMissing { .. }), "{err:?}");
            assert!(
                err.to_string().contains(TOKEN),
                "lists the tokens there are: {err}"
            );

            let err = open_err(&Pkcs11Config {
                module: Path::new("/nonexistent/libvendor-pkcs11.so").to_owned(),
                ..config.clone()
            });
            assert!(matches!(err, Pkcs11Error::ModuleMissing { .. }), "{err:?}");
            assert!(err.to_string().contains("--pkcs11-module"), "{err}");

            let not_a_module = hsm.dir.join("not-a-module.so");
            std::fs::write(&not_a_module, b"nope").unwrap();
            let err = open_err(&Pkcs11Config {
                module: not_a_module,
                ..config
            });
            assert!(matches!(err, Pkcs11Error::ModuleLoad { .. }), "{err:?}");
        },
    );
}

#[test]
fn an_extractable_key_is_refused() {
    with_softhsm("an_extractable_key_is_refused", |hsm| {
        hsm.init_token(TOKEN);
        create_extractable_key(&hsm.session(TOKEN), "leaky");
        let err = open_err(&hsm.config(TOKEN, "leaky", PIN));
        assert!(matches!(err, Pkcs11Error::KeyExtractable { .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains("CKA_EXTRACTABLE") && message.contains("CKA_SENSITIVE"),
            "{message}"
        );
    });
}

#[test]
fn the_operator_refuses_to_start_and_writes_nothing() {
    with_softhsm("the_operator_refuses_to_start_and_writes_nothing", |hsm| {
        hsm.init_token(TOKEN);
        pkcs11::create_key(&hsm.config(TOKEN, KEY, PIN)).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            for (config, cause) in [
                (
                    hsm.config(TOKEN, KEY, "wrong-pin-000"),
                    "refused the user PIN",
                ),
                (hsm.config(TOKEN, "absent", PIN), "no AES key labelled"),
            ] {
                let (service, mut handle) = tower_test::mock::pair::<
                    http::Request<kube::client::Body>,
                    http::Response<kube::client::Body>,
                >();
                let client = kube::Client::new(service, "default");
                let mut settings =
                    portcullis_operator::run::OperatorSettings::new("portcullis-system", "test");
                settings.kek_pkcs11 = Some(config);
                let err = tokio::time::timeout(
                    Duration::from_secs(30),
                    portcullis_operator::run::start(client, settings),
                )
                .await
                .expect("start returned")
                .map(|_| ())
                .unwrap_err()
                .to_string();
                assert!(
                    err.contains("key-encryption key") && err.contains(cause),
                    "{err}"
                );
                // Not one request reached the API server: nothing was read or written.
                let request = tokio::time::timeout(Duration::from_secs(1), handle.next_request())
                    .await
                    .ok()
                    .flatten();
                assert!(
                    request.is_none(),
                    "the operator sent {:?}",
                    request.map(|(r, _)| r.uri().clone())
                );
            }
        });
    });
}

/// A Secret `portcullis-kek` as a pkcs11 install records it: labels only.
fn label_record(current: &str) -> k8s_openapi::api::core::v1::Secret {
    k8s_openapi::api::core::v1::Secret {
        data: Some(KeyLabels::new(current).to_secret_data(TOKEN)),
        ..Default::default()
    }
}

fn labels_of(secret: &k8s_openapi::api::core::v1::Secret) -> KeyLabels {
    KeyLabels::from_secret_data(secret.data.as_ref().unwrap(), "ns/portcullis-kek").unwrap()
}

/// What every replica does on a reload: open the keys the Secret names, by label.
fn reload(config: &Pkcs11Config, secret: &k8s_openapi::api::core::v1::Secret, loaded: &Kek) -> Kek {
    labels::open_keyring(config, &labels_of(secret), loaded, "ns/portcullis-kek").unwrap()
}

#[test]
fn a_rotation_moves_every_blob_to_a_new_hsm_key_and_keeps_the_old_key_in_the_hsm() {
    with_softhsm(
        "a_rotation_moves_every_blob_to_a_new_hsm_key_and_keeps_the_old_key_in_the_hsm",
        |hsm| {
            use jiff::Timestamp;
            use portcullis_operator::dek::DekRing;
            use portcullis_operator::kek_rotation::{
                self, KekRotationSettings, ROTATE_ANNOTATION, Step, Trigger, blobs_under_old_keys,
                plan,
            };

            hsm.init_token(TOKEN);
            let config = hsm.config(TOKEN, KEY, PIN);
            pkcs11::create_key(&config).unwrap();
            let first = Kek::from(Pkcs11Kek::open(&config).unwrap());
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let at = |s: i64| Timestamp::from_second(1_798_761_600 + s).unwrap();
            let settings = KekRotationSettings {
                propagation: Duration::from_secs(30),
                ..KekRotationSettings::new("portcullis-kek")
            };

            // A tenant DEK under the first key, and a recorded Secret with one label.
            let mut dek = DekRing::new("acme");
            dek.rotate(&first, at(0)).unwrap();
            let dek_plaintext = dek.unwrap_version(&first, 1).unwrap();
            let mut secret = label_record(KEY);
            secret
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(ROTATE_ANNOTATION.into(), "1".into());

            // Stage: a new key generated in the HSM, only its label recorded.
            let trigger = Trigger::Annotation("1".into());
            assert_eq!(
                plan(&secret, at(0), &settings),
                Step::Stage(trigger.clone())
            );
            let (label, next_id) = runtime
                .block_on(kek_rotation::pkcs11::stage(
                    &config,
                    &mut secret,
                    &trigger,
                    at(0),
                ))
                .unwrap();
            assert_eq!(label, "portcullis-kek-20270101T000000Z");
            assert_eq!(next_id, pkcs11::key_id(TOKEN, &label));
            assert!(
                secret
                    .data
                    .as_ref()
                    .unwrap()
                    .values()
                    .all(|v| v.0.len() < 64),
                "the Secret holds labels, not keys"
            );
            let staged = reload(&config, &secret, &first);
            assert_eq!(staged.id(), first.id(), "the old key still wraps");
            assert_eq!(staged.unwrap_only().len(), 1);
            assert_eq!(staged.unwrap_only()[0].id, next_id);
            // The new key is as locked in as the first: sensitive, never extractable.
            let session = hsm.session(TOKEN);
            let keys = session
                .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
                .unwrap();
            assert_eq!(keys.len(), 1);
            assert_locked_in(&session, keys[0]);

            // Promote once every replica had time to load it.
            assert_eq!(plan(&secret, at(10), &settings), Step::WaitForReplicas);
            assert_eq!(plan(&secret, at(30), &settings), Step::Promote);
            let (old_id, new_id) =
                kek_rotation::pkcs11::promote(&mut secret, "ns/portcullis-kek", TOKEN, at(30))
                    .unwrap();
            assert_eq!((old_id, new_id), (first.id(), next_id));
            let promoted = reload(&config, &secret, &staged);
            assert_eq!(promoted.id(), next_id);
            assert_eq!(labels_of(&secret).previous, vec![KEY.to_owned()]);
            // The overlap: what the old key wrapped still opens; new blobs are under the new key.
            assert_eq!(dek.unwrap_version(&promoted, 1).unwrap(), dek_plaintext);
            let fresh = promoted.wrap(b"ca key", b"slot").unwrap();
            assert_eq!(Kek::wrapped_under(&fresh).unwrap().id, next_id);

            // A restarted replica (nothing open yet) resumes with both keys.
            let restarted = Kek::from(Pkcs11Kek::open(&config).unwrap());
            let restarted = reload(&config, &secret, &restarted);
            assert_eq!(restarted.id(), next_id);
            assert_eq!(dek.unwrap_version(&restarted, 1).unwrap(), dek_plaintext);
            assert_eq!(restarted.unwrap(&fresh, b"slot").unwrap(), b"ca key");

            // Re-wrap: every blob moves under the new key; the DEK itself is unchanged.
            assert_eq!(plan(&secret, at(60), &settings), Step::Rewrap);
            let (data, _) = dek.to_secret_parts();
            assert_eq!(blobs_under_old_keys(&data, &promoted), 1);
            assert_eq!(dek.rewrap(&promoted).unwrap(), 1);
            let (data, _) = dek.to_secret_parts();
            assert_eq!(blobs_under_old_keys(&data, &promoted), 0);

            // Retire: the old label leaves the Secret; the new key alone opens everything.
            assert_eq!(
                kek_rotation::pkcs11::previous_labels(&secret),
                vec![KEY.to_owned()]
            );
            kek_rotation::retire(&mut secret);
            assert!(kek_rotation::previous_ids(&secret).is_empty());
            assert_eq!(plan(&secret, at(90), &settings), Step::Idle);
            let alone = reload(
                &config,
                &secret,
                &Kek::from(Pkcs11Kek::open(&config).unwrap()),
            );
            assert!(alone.unwrap_only().is_empty());
            assert_eq!(alone.id(), next_id);
            assert_eq!(dek.unwrap_version(&alone, 1).unwrap(), dek_plaintext);
            // The old key is no longer used but stays in the HSM, for backups' sake.
            let old_keys = session
                .find_objects(&[Attribute::Label(KEY.as_bytes().to_vec())])
                .unwrap();
            assert_eq!(
                old_keys.len(),
                1,
                "the operator destroyed the previous HSM key"
            );
        },
    );
}

#[test]
fn a_missing_staged_or_previous_key_names_its_label_and_the_fix() {
    with_softhsm(
        "a_missing_staged_or_previous_key_names_its_label_and_the_fix",
        |hsm| {
            hsm.init_token(TOKEN);
            let config = hsm.config(TOKEN, KEY, PIN);
            pkcs11::create_key(&config).unwrap();
            let loaded = Kek::from(Pkcs11Kek::open(&config).unwrap());
            for (labels, data_key, fix) in [
                (
                    KeyLabels {
                        next: Some("portcullis-kek-gone".into()),
                        ..KeyLabels::new(KEY)
                    },
                    "pkcs11-next-label",
                    "abandon the staged rotation",
                ),
                (
                    KeyLabels {
                        previous: vec!["portcullis-kek-gone".into()],
                        ..KeyLabels::new(KEY)
                    },
                    "pkcs11-previous-",
                    "restore it into the token under the same label",
                ),
            ] {
                let err = labels::open_keyring(&config, &labels, &loaded, "ns/portcullis-kek")
                    .unwrap_err();
                assert!(
                    matches!(err, Pkcs11Error::RotationKeyMissing { .. }),
                    "{err:?}"
                );
                let message = err.to_string();
                assert!(
                    message.contains("\"portcullis-kek-gone\"")
                        && message.contains("ns/portcullis-kek")
                        && message.contains(data_key)
                        && message.contains(fix),
                    "{message}"
                );
                assert!(!message.contains(PIN));
            }
        },
    );
}
