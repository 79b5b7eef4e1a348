use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use rcgen::{CertificateParams, KeyPair};
use serde_json::json;

use super::*;

const NOW: i64 = 1_800_000_000;

/// A self-signed certificate valid from `from` to `to` (Unix seconds) and its key.
fn certificate(from: i64, to: i64) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["web.shop.svc".to_owned()]).unwrap();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + std::time::Duration::from_secs(from.unsigned_abs());
    params.not_after = epoch + std::time::Duration::from_secs(to.unsigned_abs());
    (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
}

fn tls_secret(cert: &str, key: &str) -> Secret {
    Secret {
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_owned(), ByteString(cert.as_bytes().to_vec())),
            ("tls.key".to_owned(), ByteString(key.as_bytes().to_vec())),
        ])),
        ..Secret::default()
    }
}

#[test]
fn verdicts_name_what_is_wrong() {
    let (cert, key) = certificate(NOW - 3600, NOW + 86_400);
    assert_eq!(verdict(Some(&tls_secret(&cert, &key)), NOW), Ok(()));
    assert_eq!(verdict(None, NOW).unwrap_err().0, Problem::SecretMissing);
    let opaque = Secret {
        type_: Some("Opaque".into()),
        ..Secret::default()
    };
    let (problem, detail) = verdict(Some(&opaque), NOW).unwrap_err();
    assert_eq!(problem, Problem::NotTls);
    assert!(detail.contains("Opaque"), "{detail}");
    let (_, other_key) = certificate(NOW - 3600, NOW + 86_400);
    let (problem, detail) = verdict(Some(&tls_secret(&cert, &other_key)), NOW).unwrap_err();
    assert_eq!(problem, Problem::KeyMismatch);
    assert!(!detail.contains("PRIVATE KEY"), "{detail}");
    let (old, old_key) = certificate(NOW - 86_400, NOW - 3600);
    assert_eq!(
        verdict(Some(&tls_secret(&old, &old_key)), NOW)
            .unwrap_err()
            .0,
        Problem::SecretExpired
    );
    let (early, early_key) = certificate(NOW + 3600, NOW + 86_400);
    assert_eq!(
        verdict(Some(&tls_secret(&early, &early_key)), NOW)
            .unwrap_err()
            .0,
        Problem::SecretNotYetValid
    );
    assert_eq!(
        verdict(Some(&tls_secret("garbage", &key)), NOW)
            .unwrap_err()
            .0,
        Problem::NotTls
    );
}

#[test]
fn mounted_secrets_and_the_tenant_default_are_checked() {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web-0", "namespace": "shop"},
        "spec": {"containers": [], "volumes": [
            {"name": "portcullis-serving-certificate", "secret": {"secretName": "web-tls", "optional": true}},
            {"name": "other", "secret": {"secretName": "not-ours"}}
        ]}
    }))
    .unwrap();
    let found = referenced(
        [&pod],
        Some("shop-tls"),
        &["shop".into(), "shop-jobs".into()],
    );
    let names: Vec<String> = found.iter().map(ToString::to_string).collect();
    assert_eq!(
        names,
        ["shop/shop-tls", "shop/web-tls", "shop-jobs/shop-tls"]
    );
    assert!(referenced([&pod], None, &["shop".into()]).len() == 1);
}

#[test]
fn the_condition_is_false_with_the_first_problem_and_every_secret_named() {
    let now = Time(jiff::Timestamp::from_second(NOW).unwrap());
    assert_eq!(condition(0, &[], None, &[], now.clone()), None);
    let ok = condition(2, &[], Some(3), &[], now.clone()).unwrap();
    assert_eq!(
        (ok.status.as_str(), ok.reason.as_str()),
        ("True", "SecretsUsable")
    );
    let findings = [
        Finding {
            secret: SecretRef {
                namespace: "shop".into(),
                name: "web-tls".into(),
            },
            problem: Problem::SecretMissing,
            detail: "not found".into(),
        },
        Finding {
            secret: SecretRef {
                namespace: "shop".into(),
                name: "api-tls".into(),
            },
            problem: Problem::SecretExpired,
            detail: "the certificate expired".into(),
        },
    ];
    let later = Time(jiff::Timestamp::from_second(NOW + 60).unwrap());
    let bad = condition(
        2,
        &findings,
        Some(3),
        std::slice::from_ref(&ok),
        later.clone(),
    )
    .unwrap();
    assert_eq!(
        (bad.status.as_str(), bad.reason.as_str()),
        ("False", "SecretMissing")
    );
    assert!(
        bad.message.contains("shop/web-tls")
            && bad.message.contains("shop/api-tls")
            && bad.message.contains("create a kubernetes.io/tls Secret")
            && bad.message.contains("renew"),
        "{}",
        bad.message
    );
    assert_eq!(bad.last_transition_time, later);
    // Kept while the status holds.
    let again = condition(2, &findings[1..], Some(3), std::slice::from_ref(&bad), now).unwrap();
    assert_eq!(again.last_transition_time, later);
    assert_eq!(again.reason, "SecretExpired");
}
