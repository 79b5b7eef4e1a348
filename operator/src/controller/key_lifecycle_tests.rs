use super::*;
use kube::api::ObjectMeta;
use portcullis_crds::{
    ApiKeySpec, HttpMethod, RouteRule, ScopeName, TenantSpec, role::BUILTIN_ROLES,
};

const HOUR: Duration = Duration::from_secs(3_600);

fn at(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn tenant(classification: DataClassification) -> Tenant {
    let mut spec: TenantSpec =
        serde_json::from_value(serde_json::json!({})).unwrap_or_else(|e| panic!("{e}"));
    spec.data_classification = classification;
    spec.scopes.insert(
        "identify".into(),
        vec![RouteRule::new(&[HttpMethod::POST], "/v1/identify")],
    );
    spec.scopes.insert(
        "events".into(),
        vec![RouteRule::new(&[HttpMethod::GET], "/v1/events/*")],
    );
    Tenant::new("acme", spec)
}

fn roles() -> BTreeMap<String, RoleSpec> {
    BUILTIN_ROLES
        .iter()
        .filter_map(|n| Some((role_object_name(n), role::builtin_role(n)?)))
        .collect()
}

fn key(scopes: &[&str]) -> ApiKey {
    ApiKey {
        metadata: ObjectMeta {
            name: Some("ingest".into()),
            namespace: Some("acme-prod".into()),
            uid: Some("uid-1".into()),
            generation: Some(1),
            ..ObjectMeta::default()
        },
        spec: ApiKeySpec {
            role: "Developer".into(),
            scopes: scopes
                .iter()
                .filter_map(|s| ScopeName::new(*s).ok())
                .collect(),
            ..ApiKeySpec::default()
        },
        status: None,
    }
}

fn issued(k: &mut ApiKey, id: &str, issued_at: Timestamp) {
    k.status = Some(ApiKeyStatus {
        state: KeyState::Active,
        key_id: Some(id.into()),
        prefix: Some(format!("ak_{id}")),
        hash: Some(format!("hash-{id}")),
        issued_at: Some(Time(issued_at)),
        expires_at: Some(Time(clock::add(
            issued_at,
            Duration::from_secs(90 * 86_400),
        ))),
        ..ApiKeyStatus::default()
    });
}

fn present(id: &str) -> SecretObservation {
    SecretObservation::Present {
        key_id: Some(id.into()),
        owned: true,
        delivered: false,
    }
}

fn judge_at(k: &ApiKey, t: &Tenant, secret: SecretObservation, now: Timestamp) -> Verdict {
    let roles = roles();
    judge(&Observed {
        key: k,
        tenant: Some(t),
        roles: &roles,
        secret,
        now,
    })
}

fn token(id: &str, expires_at: Timestamp) -> IssuedToken {
    IssuedToken {
        key_id: id.into(),
        hash: format!("hash-{id}"),
        expires_at,
    }
}

fn ready(status: &ApiKeyStatus) -> (&str, &str, &str) {
    let c = conditions::find_ready(&status.conditions)
        .unwrap_or_else(|| panic!("no Ready in {status:?}"));
    (c.status.as_str(), c.reason.as_str(), c.message.as_str())
}

#[test]
fn a_new_key_is_issued_and_becomes_active() {
    let t = tenant(DataClassification::Internal);
    let k = key(&["identify"]);
    let verdict = judge_at(&k, &t, SecretObservation::Missing, at(0));
    assert!(
        matches!(verdict, Verdict::Issue(IssueReason::First)),
        "{verdict:?}"
    );
    let exp = expiry(&k, &t, at(0));
    assert_eq!(exp, at(90 * 86_400), "tenant default 90d");
    let status = next_status(&k, &verdict, Some(&token("aaaaaaaaaaaa", exp)), HOUR, at(0));
    assert_eq!(status.state, KeyState::Active);
    assert_eq!(status.prefix.as_deref(), Some("ak_aaaaaaaaaaaa"));
    assert_eq!(status.secret_name.as_deref(), Some("ingest-key"));
    assert_eq!(status.observed_generation, Some(1));
    assert!(status.previous_keys.is_empty());
    assert_eq!(ready(&status).0, "True");
    assert_eq!(ready(&status).1, "Issued");
    assert_eq!(next_wakeup(&status), Some(exp));
}

#[test]
fn scope_outside_the_role_is_rejected_with_its_name() {
    let t = tenant(DataClassification::Internal);
    let mut k = key(&["identify"]);
    k.spec.role = "Viewer".into();
    let verdict = judge_at(&k, &t, SecretObservation::Missing, at(0));
    let Verdict::Rejected(e) = &verdict else {
        panic!("{verdict:?}")
    };
    assert_eq!(e.metric_label(), "ScopeNotInRole");
    let status = next_status(&k, &verdict, None, HOUR, at(0));
    assert_eq!(status.state, KeyState::Invalid);
    let (s, reason, message) = ready(&status);
    assert_eq!((s, reason), ("False", "ScopeNotInRole"));
    assert!(
        message.contains("identify") && message.contains("Viewer"),
        "{message}"
    );
}

#[test]
fn unknown_role_scope_and_tenant_are_rejected() {
    let t = tenant(DataClassification::Internal);
    let mut k = key(&["identify"]);
    k.spec.role = "ghost".into();
    assert!(matches!(
        judge_at(&k, &t, SecretObservation::Missing, at(0)),
        Verdict::Rejected(Error::UnknownRole { .. })
    ));
    let k = key(&["signals"]);
    assert!(matches!(
        judge_at(&k, &t, SecretObservation::Missing, at(0)),
        Verdict::Rejected(Error::UnknownScope { .. })
    ));
    let roles = roles();
    let none = judge(&Observed {
        key: &k,
        tenant: None,
        roles: &roles,
        secret: SecretObservation::Missing,
        now: at(0),
    });
    assert!(matches!(
        none,
        Verdict::Rejected(Error::TenantNotFound { .. })
    ));
    let mut bad = key(&["identify"]);
    bad.spec.ip_allowlist = vec![portcullis_crds::Cidr::new("10.0.0.300/8")];
    let Verdict::Rejected(e) = judge_at(&bad, &t, SecretObservation::Missing, at(0)) else {
        panic!("bad CIDR accepted")
    };
    assert!(e.to_string().contains("spec.ipAllowlist[0]"), "{e}");
}

#[test]
fn rotation_retires_the_previous_token_for_the_overlap() {
    let t = tenant(DataClassification::Internal);
    let mut k = key(&["identify"]);
    issued(&mut k, "aaaaaaaaaaaa", at(0));
    assert!(matches!(
        judge_at(&k, &t, present("aaaaaaaaaaaa"), at(10)),
        Verdict::Keep { .. }
    ));
    k.spec.rotate = 1;
    let verdict = judge_at(&k, &t, present("aaaaaaaaaaaa"), at(10));
    assert!(matches!(verdict, Verdict::Issue(IssueReason::Rotation)));
    let status = next_status(
        &k,
        &verdict,
        Some(&token("bbbbbbbbbbbb", at(1_000_000))),
        HOUR,
        at(10),
    );
    assert_eq!(status.rotation, 1);
    assert_eq!(status.key_id.as_deref(), Some("bbbbbbbbbbbb"));
    assert_eq!(status.previous_keys.len(), 1);
    assert_eq!(status.previous_keys[0].key_id, "aaaaaaaaaaaa");
    assert_eq!(status.previous_keys[0].valid_until, Time(at(3_610)));
    assert_eq!(ready(&status).1, "Rotated");
    assert_eq!(
        next_wakeup(&status),
        Some(at(3_610)),
        "wake up when the overlap ends"
    );

    // After the overlap the retired token is pruned.
    let mut later = k.clone();
    later.status = Some(status);
    let verdict = judge_at(&later, &t, present("bbbbbbbbbbbb"), at(4_000));
    let status = next_status(&later, &verdict, None, HOUR, at(4_000));
    assert!(status.previous_keys.is_empty());
    assert_eq!(
        ready(&status).1,
        "Rotated",
        "the rotation message stays until the next change"
    );
}

#[test]
fn expiry_revocation_and_unrevocation() {
    let t = tenant(DataClassification::Internal);
    let mut k = key(&["identify"]);
    k.spec.expires_after = Some(portcullis_crds::DurationSpec::new(Duration::from_secs(3)));
    issued(&mut k, "aaaaaaaaaaaa", at(0));
    // The expiry follows the spec, not what an older status said.
    assert!(
        matches!(judge_at(&k, &t, present("aaaaaaaaaaaa"), at(2)), Verdict::Keep { expires_at } if expires_at == at(3))
    );
    let verdict = judge_at(&k, &t, present("aaaaaaaaaaaa"), at(3));
    assert!(matches!(verdict, Verdict::Expired { .. }));
    let status = next_status(&k, &verdict, None, HOUR, at(3));
    assert_eq!(status.state, KeyState::Expired);
    assert_eq!(ready(&status), ("False", "Expired", ready(&status).2));
    assert_eq!(next_wakeup(&status), None);

    let mut r = key(&["identify"]);
    issued(&mut r, "aaaaaaaaaaaa", at(0));
    r.spec.revoked = true;
    let verdict = judge_at(&r, &t, present("aaaaaaaaaaaa"), at(1));
    assert!(matches!(verdict, Verdict::Revoked));
    let status = next_status(&r, &verdict, None, HOUR, at(1));
    assert_eq!(status.state, KeyState::Revoked);
    assert_eq!(ready(&status).1, "Revoked");
    assert!(ready(&status).0 == "False");

    // Lifting the revocation issues a new token; the revoked one is not retired into an overlap.
    r.status = Some(status);
    r.spec.revoked = false;
    let verdict = judge_at(&r, &t, present("aaaaaaaaaaaa"), at(2));
    assert!(matches!(verdict, Verdict::Issue(IssueReason::Unrevoked)));
    let status = next_status(
        &r,
        &verdict,
        Some(&token("bbbbbbbbbbbb", at(99))),
        HOUR,
        at(2),
    );
    assert!(status.previous_keys.is_empty());
    assert_eq!(status.state, KeyState::Active);
}

#[test]
fn deleted_secret_rotates_and_says_so() {
    let t = tenant(DataClassification::Internal);
    let mut k = key(&["identify"]);
    issued(&mut k, "aaaaaaaaaaaa", at(0));
    let verdict = judge_at(&k, &t, SecretObservation::Missing, at(5));
    assert!(matches!(
        verdict,
        Verdict::Issue(IssueReason::SecretDeleted)
    ));
    let status = next_status(
        &k,
        &verdict,
        Some(&token("bbbbbbbbbbbb", at(99))),
        HOUR,
        at(5),
    );
    let (_, reason, message) = ready(&status);
    assert_eq!(reason, "Rotated");
    assert!(message.contains("ingest-key was deleted"), "{message}");
    // A Secret holding another token than the status names is replaced too.
    assert!(matches!(
        judge_at(&k, &t, present("zzzzzzzzzzzz"), at(5)),
        Verdict::Issue(IssueReason::SecretMismatch)
    ));
}

#[test]
fn restricted_tenants_lose_the_plaintext_after_delivery_only() {
    let t = tenant(DataClassification::Restricted);
    let mut k = key(&["identify"]);
    issued(&mut k, "aaaaaaaaaaaa", at(0));
    let delivered = SecretObservation::Present {
        key_id: Some("aaaaaaaaaaaa".into()),
        owned: true,
        delivered: true,
    };
    assert!(matches!(
        judge_at(&k, &t, present("aaaaaaaaaaaa"), at(1)),
        Verdict::Keep { .. }
    ));
    let verdict = judge_at(&k, &t, delivered.clone(), at(1));
    assert!(matches!(verdict, Verdict::RemovePlaintext));
    assert_eq!(
        ready(&next_status(&k, &verdict, None, HOUR, at(1))).1,
        "Delivered"
    );
    // Once removed on purpose, the missing Secret is not a reason to rotate.
    k.metadata.annotations = Some(BTreeMap::from([(
        PLAINTEXT_REMOVED_ANNOTATION.to_owned(),
        "aaaaaaaaaaaa".to_owned(),
    )]));
    assert!(matches!(
        judge_at(&k, &t, SecretObservation::Missing, at(2)),
        Verdict::Keep { .. }
    ));
    // Other classifications keep the Secret even when delivered.
    let internal = tenant(DataClassification::Internal);
    assert!(matches!(
        judge_at(&k, &internal, delivered, at(1)),
        Verdict::Keep { .. }
    ));
}

#[test]
fn transition_time_moves_only_when_readiness_flips() {
    let t = tenant(DataClassification::Internal);
    let mut k = key(&["identify"]);
    let verdict = judge_at(&k, &t, SecretObservation::Missing, at(0));
    let first = next_status(
        &k,
        &verdict,
        Some(&token("aaaaaaaaaaaa", at(999_999))),
        HOUR,
        at(0),
    );
    k.status = Some(first.clone());
    k.spec.rotate = 1;
    let verdict = judge_at(&k, &t, present("aaaaaaaaaaaa"), at(50));
    let rotated = next_status(
        &k,
        &verdict,
        Some(&token("bbbbbbbbbbbb", at(999_999))),
        HOUR,
        at(50),
    );
    assert_eq!(
        conditions::find_ready(&rotated.conditions).map(|c| c.last_transition_time.clone()),
        Some(Time(at(0)))
    );
    k.status = Some(rotated);
    k.spec.revoked = true;
    let verdict = judge_at(&k, &t, present("bbbbbbbbbbbb"), at(60));
    let revoked = next_status(&k, &verdict, None, HOUR, at(60));
    assert_eq!(
        conditions::find_ready(&revoked.conditions).map(|c| c.last_transition_time.clone()),
        Some(Time(at(60)))
    );
}
