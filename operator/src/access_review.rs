//! Asking the API server's authorizer about someone else: a SubjectAccessReview for a
//! user the API server told us about (admission `userInfo`, a TokenReview's user).

use k8s_openapi::api::authentication::v1::UserInfo;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::Api;
use kube::api::PostParams;

/// The review asking whether `user` may do what `attributes` describe.
pub fn review(user: &UserInfo, attributes: ResourceAttributes) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username.clone(),
            groups: user.groups.clone(),
            uid: user.uid.clone(),
            extra: user.extra.clone(),
            resource_attributes: Some(attributes),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    }
}

/// Whether the authorizer allows `review` (and no authorizer explicitly denies it).
pub async fn allowed(client: &kube::Client, review: &SubjectAccessReview) -> kube::Result<bool> {
    let reviewed = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), review)
        .await?;
    Ok(reviewed
        .status
        .is_some_and(|s| s.allowed && s.denied != Some(true)))
}
