//! Who may ask: each way a token, pod or namespace can fail to qualify.

use std::collections::BTreeMap;

use portcullis_api::identity::{IDENTITY_AUDIENCE, RefusalReason};

use super::*;
use crate::ca::authenticator::{
    EXTRA_POD_NAME, EXTRA_POD_UID, PodFacts, StaticAuthenticator, TokenReviewOutcome, authenticate,
};

fn base() -> StaticAuthenticator {
    StaticAuthenticator::new().with_workload("good", "acme-prod", "api", "api-0", "acme")
}

async fn reason_for(lookups: &StaticAuthenticator, token: &str) -> RefusalReason {
    authenticate(lookups, &td(), token)
        .await
        .unwrap_err()
        .reason
}

fn review(username: &str, audiences: &[&str], extra: &[(&str, &str)]) -> TokenReviewOutcome {
    TokenReviewOutcome {
        authenticated: true,
        audiences: audiences.iter().map(|a| a.to_string()).collect(),
        username: username.into(),
        extra: extra
            .iter()
            .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
            .collect::<BTreeMap<_, _>>(),
        error: None,
    }
}

#[tokio::test]
async fn a_bound_token_of_a_live_pod_in_a_tenant_namespace_passes() {
    let who = authenticate(&base(), &td(), "good").await.unwrap();
    assert_eq!(who.workload, workload("acme-prod", "api"));
    assert_eq!(who.tenant, tenant("acme"));
    assert_eq!(who.pod_name, "api-0");
}

#[tokio::test]
async fn tokens_that_do_not_authenticate() {
    assert_eq!(
        reason_for(&base(), "unknown").await,
        RefusalReason::TokenInvalid
    );
    assert_eq!(reason_for(&base(), "").await, RefusalReason::TokenInvalid);
    let user = base().with_token(
        "user",
        review("jane@example.com", &[IDENTITY_AUDIENCE], &[]),
    );
    assert_eq!(reason_for(&user, "user").await, RefusalReason::TokenInvalid);
}

#[tokio::test]
async fn tokens_for_another_audience() {
    let extra = [
        (EXTRA_POD_NAME, "api-0"),
        (EXTRA_POD_UID, "uid-acme-prod-api-0"),
    ];
    let other = base().with_token(
        "other",
        review(
            "system:serviceaccount:acme-prod:api",
            &["https://kubernetes.default.svc"],
            &extra,
        ),
    );
    assert_eq!(
        reason_for(&other, "other").await,
        RefusalReason::WrongAudience
    );
    // What a real API server answers for a token minted for another audience.
    let refused = base().with_token(
        "apiserver",
        TokenReviewOutcome {
            error: Some("token audiences [\"x\"] is invalid for the target audiences".into()),
            ..TokenReviewOutcome::default()
        },
    );
    assert_eq!(
        reason_for(&refused, "apiserver").await,
        RefusalReason::WrongAudience
    );
}

#[tokio::test]
async fn tokens_not_bound_to_a_pod() {
    let legacy = base().with_token(
        "legacy",
        review(
            "system:serviceaccount:acme-prod:api",
            &[IDENTITY_AUDIENCE],
            &[],
        ),
    );
    assert_eq!(
        reason_for(&legacy, "legacy").await,
        RefusalReason::TokenNotBoundToPod
    );
    let half = base().with_token(
        "half",
        review(
            "system:serviceaccount:acme-prod:api",
            &[IDENTITY_AUDIENCE],
            &[(EXTRA_POD_NAME, "api-0")],
        ),
    );
    assert_eq!(
        reason_for(&half, "half").await,
        RefusalReason::TokenNotBoundToPod
    );
}

#[tokio::test]
async fn the_pod_must_exist_be_the_same_and_run_as_the_service_account() {
    let gone = base().without_pod("acme-prod", "api-0");
    assert_eq!(reason_for(&gone, "good").await, RefusalReason::PodNotFound);
    let replaced = base().with_pod(
        "acme-prod",
        "api-0",
        PodFacts {
            uid: "new-uid".into(),
            service_account: "api".into(),
            labels: Default::default(),
        },
    );
    assert_eq!(
        reason_for(&replaced, "good").await,
        RefusalReason::PodMismatch
    );
    let other_sa = base().with_pod(
        "acme-prod",
        "api-0",
        PodFacts {
            uid: "uid-acme-prod-api-0".into(),
            service_account: "admin".into(),
            labels: Default::default(),
        },
    );
    assert_eq!(
        reason_for(&other_sa, "good").await,
        RefusalReason::ServiceAccountMismatch
    );
}

#[tokio::test]
async fn the_namespace_must_belong_to_a_tenant() {
    let untenanted = base().without_tenant("acme-prod");
    let refusal = authenticate(&untenanted, &td(), "good").await.unwrap_err();
    assert_eq!(refusal.reason, RefusalReason::NoTenant);
    assert!(
        refusal.message.contains("portcullis.dev/tenant"),
        "{}",
        refusal.message
    );
}

#[tokio::test]
async fn an_unreachable_api_server_is_retryable() {
    let down = base().unavailable();
    let reason = reason_for(&down, "good").await;
    assert_eq!(reason, RefusalReason::Unavailable);
    assert!(reason.is_retryable());
}
