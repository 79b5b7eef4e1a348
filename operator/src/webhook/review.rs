//! AdmissionReview in, AdmissionResponse out: reads what the pure rules need through
//! the [`ClusterLookup`](super::ClusterLookup), calls them, and turns their answer into the response (patch,
//! warnings, or a refusal whose message `kubectl` prints), emitting the admin audit
//! event for admitted changes.

use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation as KubeOperation};
use kube::core::response::Status;
use portcullis_crds::tenant::TENANT_LABEL;
use portcullis_crds::{ApiKey, Role, Tenant};
use serde::de::DeserializeOwned;

use super::WebhookState;
use super::audit::AdminAuditEvent;
use super::inject::{
    Decision, InjectionLevel, TenantClassification, TenantPodDefaults, decide_ephemeral,
    decide_update, decide_with_defaults,
};
use super::validate::lookup::{
    ClusterLookup, LookupError, catalogue, namespace_roles, tenant_claims,
};
use super::validate::{
    Change, Operation, Refusal, Requester, TenantClaims, ValidatorSettings, validate_api_key,
    validate_role, validate_tenant,
};

fn deny(
    request: &AdmissionRequest<DynamicObject>,
    message: impl Into<String>,
    code: u16,
    reason: &str,
) -> AdmissionResponse {
    let mut response = AdmissionResponse::from(request);
    response.allowed = false;
    response.result = Status::failure(&message.into(), reason).with_code(code);
    response
}

fn refuse(request: &AdmissionRequest<DynamicObject>, refusal: Refusal) -> AdmissionResponse {
    let reason = refusal.reason();
    deny(request, refusal.message, refusal.code, reason)
}

fn unavailable(
    request: &AdmissionRequest<DynamicObject>,
    error: impl std::fmt::Display,
) -> AdmissionResponse {
    tracing::warn!(uid = %request.uid, %error, "admission lookup failed");
    deny(
        request,
        format!("portcullis webhook could not read cluster state ({error}); retry shortly"),
        503,
        "ServiceUnavailable",
    )
}

fn typed<T: DeserializeOwned>(object: &DynamicObject) -> Result<T, serde_json::Error> {
    serde_json::to_value(object).and_then(serde_json::from_value)
}

/// The mutating webhook: sidecar injection for new pods, and the guard on what pod
/// updates and ephemeral containers may change afterwards.
pub async fn review_pod(
    state: &WebhookState,
    request: &AdmissionRequest<DynamicObject>,
) -> AdmissionResponse {
    let allow = AdmissionResponse::from(request);
    let (Some(object), kind) = (&request.object, request.kind.kind.as_str()) else {
        return allow;
    };
    let what = match (&request.operation, request.sub_resource.as_deref(), kind) {
        (KubeOperation::Create, None, "Pod") => PodChange::Create,
        (KubeOperation::Update, None, "Pod") => PodChange::Update,
        (KubeOperation::Update, Some("ephemeralcontainers"), _) => PodChange::Ephemeral,
        _ => return allow,
    };
    let namespace = request.namespace.clone().unwrap_or_default();
    let (level, defaults) = match injection_level(state, &namespace).await {
        Ok(found) => found,
        Err(e) => return unavailable(request, e),
    };
    if level == InjectionLevel::Off {
        return allow;
    }
    let decision = match what {
        PodChange::Create => {
            let pod: Pod = match typed(object) {
                Ok(pod) => pod,
                Err(e) => {
                    // Unreadable here means unreadable to the proxy too; leave it to the API server.
                    let mut response = allow;
                    response.warnings = Some(vec![format!(
                        "portcullis: pod not injected: cannot read it: {e}"
                    )]);
                    return response;
                }
            };
            decide_with_defaults(
                &pod,
                &namespace,
                &level,
                &defaults,
                &state.inject,
                state.server_version,
            )
        }
        PodChange::Update => {
            let pods = objects::<Pod>(request);
            match pods {
                Ok(Objects {
                    object: Some(new),
                    old: Some(old),
                }) => decide_update(&old, &new, &namespace),
                Ok(_) => return allow,
                Err(response) => return *response,
            }
        }
        PodChange::Ephemeral => {
            let value = |o: &Option<DynamicObject>| {
                o.as_ref()
                    .and_then(|o| serde_json::to_value(o).ok())
                    .unwrap_or_default()
            };
            let who = format!("pod {namespace}/{}", request.name);
            decide_ephemeral(
                &value(&request.object),
                &value(&request.old_object),
                &who,
                state.inject.proxy_uid,
            )
        }
    };
    match decision {
        Decision::Inject { patch, warnings } => {
            tracing::debug!(uid = %request.uid, %namespace, "injecting the proxy");
            let response = match allow.with_patch(patch) {
                Ok(response) => response,
                Err(e) => {
                    return deny(
                        request,
                        format!("portcullis: cannot encode the patch: {e}"),
                        500,
                        "InternalError",
                    );
                }
            };
            with_warnings(response, warnings)
        }
        Decision::Admit { reason, warnings } => {
            tracing::debug!(uid = %request.uid, %namespace, ?reason, "admitted without injection");
            with_warnings(allow, warnings)
        }
        Decision::Refuse { message } => deny(request, message, 403, "Forbidden"),
    }
}

/// What a pod admission is about.
enum PodChange {
    Create,
    Update,
    Ephemeral,
}

/// The namespace's injection level: its labels, and the classification of the Tenant
/// its tenant label names (a Confidential or Restricted Tenant requires injection); and
/// that Tenant's defaults for the pods it injects.
async fn injection_level(
    state: &WebhookState,
    namespace: &str,
) -> Result<(InjectionLevel, TenantPodDefaults), LookupError> {
    // From the API server, not the caches: a pod created just after its namespace was
    // bound to a Confidential Tenant must not slip through uninjected.
    let lookup = state.lookup.live().unwrap_or(state.lookup.as_ref());
    let labels = lookup
        .namespace_labels(namespace)
        .await?
        .unwrap_or_default();
    let tenant = match labels.get(TENANT_LABEL) {
        Some(name) => lookup.tenant(name).await?.map(|t| (name.clone(), t)),
        None => None,
    };
    let defaults = TenantPodDefaults {
        serving_certificate_secret: tenant
            .as_ref()
            .and_then(|(_, t)| t.spec.defaults.serving_certificate_secret.clone()),
    };
    let classification = tenant.map(|(name, t)| TenantClassification {
        tenant: name,
        classification: t.spec.data_classification,
    });
    let level = InjectionLevel::of(namespace, &labels, classification, &state.inject);
    Ok((level, defaults))
}

fn with_warnings(mut response: AdmissionResponse, warnings: Vec<String>) -> AdmissionResponse {
    if !warnings.is_empty() {
        response.warnings = Some(warnings);
    }
    response
}

/// The validating webhook: Tenant, Role and ApiKey rules, and the admin audit event.
pub async fn review_admin(
    state: &WebhookState,
    request: &AdmissionRequest<DynamicObject>,
) -> AdmissionResponse {
    let operation = match request.operation {
        KubeOperation::Create => Operation::Create,
        KubeOperation::Update => Operation::Update,
        KubeOperation::Delete => Operation::Delete,
        KubeOperation::Connect => return AdmissionResponse::from(request),
    };
    if request.kind.group != portcullis_crds::GROUP || request.sub_resource.is_some() {
        return AdmissionResponse::from(request);
    }
    let noun = match request.kind.kind.as_str() {
        "ApiKey" => "key",
        "Role" => "role",
        "Tenant" => "tenant",
        _ => return AdmissionResponse::from(request),
    };
    let lookup = state.lookup.as_ref();
    let mut result = check_admin(state, lookup, request, operation, noun).await;
    // A refusal drawn from caches is confirmed by the API server before it is sent.
    if let (Ok(Err(_)), Some(live)) = (&result, lookup.live()) {
        result = check_admin(state, live, request, operation, noun).await;
    }
    match result {
        Ok(Ok(())) => {
            let changed = is_admin_change(request, operation);
            if !request.dry_run && changed {
                let tenant = admin_tenant(state, request, noun).await;
                state
                    .audit
                    .record(audit_event(state, request, noun, operation, tenant));
            }
            let warnings = if noun == "tenant" && changed && operation != Operation::Delete {
                tenant_warnings(state, request)
            } else {
                Vec::new()
            };
            with_warnings(AdmissionResponse::from(request), warnings)
        }
        Ok(Err(refusal)) => refuse(request, refusal),
        Err(response) => *response,
    }
}

/// What an admitted Tenant is told: a Restricted one, when the KEK is not in hardware.
fn tenant_warnings(state: &WebhookState, request: &AdmissionRequest<DynamicObject>) -> Vec<String> {
    let Some(Ok(tenant)) = request.object.as_ref().map(typed::<Tenant>) else {
        return Vec::new();
    };
    state
        .validator
        .kek_custody
        .admission_warning(&request.name, tenant.spec.data_classification)
        .into_iter()
        .collect()
}

type Checked = Result<Result<(), Refusal>, Box<AdmissionResponse>>;

/// The Tenant, Role or ApiKey (`noun`) rules, deciding on what `lookup` reads.
async fn check_admin(
    state: &WebhookState,
    lookup: &dyn ClusterLookup,
    request: &AdmissionRequest<DynamicObject>,
    operation: Operation,
    noun: &str,
) -> Checked {
    match noun {
        "key" => check_api_key(state, lookup, request, operation).await,
        "role" => check_role(state, lookup, request, operation).await,
        _ => check_tenant(state, lookup, request, operation).await,
    }
}

struct Objects<T> {
    object: Option<T>,
    old: Option<T>,
}

fn objects<T: DeserializeOwned>(
    request: &AdmissionRequest<DynamicObject>,
) -> Result<Objects<T>, Box<AdmissionResponse>> {
    let read = |o: &Option<DynamicObject>| -> Result<Option<T>, Box<AdmissionResponse>> {
        o.as_ref().map(typed::<T>).transpose().map_err(|e| {
            Box::new(deny(
                request,
                format!(
                    "{} {:?} cannot be read: {e}",
                    request.kind.kind, request.name
                ),
                422,
                "Invalid",
            ))
        })
    };
    Ok(Objects {
        object: read(&request.object)?,
        old: read(&request.old_object)?,
    })
}

fn change<'a, T>(
    request: &'a AdmissionRequest<DynamicObject>,
    operation: Operation,
    objects: &'a Objects<T>,
) -> Change<'a, T> {
    Change {
        operation,
        name: &request.name,
        namespace: request.namespace.as_deref().unwrap_or_default(),
        object: objects.object.as_ref(),
        old_object: objects.old.as_ref(),
    }
}

async fn check_api_key(
    state: &WebhookState,
    lookup: &dyn ClusterLookup,
    request: &AdmissionRequest<DynamicObject>,
    operation: Operation,
) -> Checked {
    let objects = objects::<ApiKey>(request)?;
    let namespace = request.namespace.clone().unwrap_or_default();
    let roles = namespace_roles(lookup, &namespace)
        .await
        .map_err(|e| Box::new(unavailable(request, e)))?;
    let catalogue = catalogue(lookup, &namespace)
        .await
        .map_err(|e| Box::new(unavailable(request, e)))?;
    let requester = Requester::from_user_info(&request.user_info);
    let change = change(request, operation, &objects);
    let decide = |settings: &ValidatorSettings| {
        validate_api_key(&change, &requester, &roles, &catalogue, settings)
    };
    decide_with_admin_fallback(state, request, &requester, decide).await
}

async fn check_role(
    state: &WebhookState,
    lookup: &dyn ClusterLookup,
    request: &AdmissionRequest<DynamicObject>,
    operation: Operation,
) -> Checked {
    let objects = objects::<Role>(request)?;
    let namespace = request.namespace.clone().unwrap_or_default();
    let roles = namespace_roles(lookup, &namespace)
        .await
        .map_err(|e| Box::new(unavailable(request, e)))?;
    let catalogue = catalogue(lookup, &namespace)
        .await
        .map_err(|e| Box::new(unavailable(request, e)))?;
    let requester = Requester::from_user_info(&request.user_info);
    let change = change(request, operation, &objects);
    let decide = |settings: &ValidatorSettings| {
        validate_role(&change, &requester, &roles, &catalogue, settings)
    };
    decide_with_admin_fallback(state, request, &requester, decide).await
}

/// Runs `decide` with the configured exemptions; when that refuses with 403 (the
/// escalation check) a requester who is a cluster admin however bound — the API
/// server's authorizer says they may `*` `*` in `portcullis.dev` — is exempt too, and
/// `decide` runs again with them exempt. `system:masters` never needs the round trip.
async fn decide_with_admin_fallback(
    state: &WebhookState,
    request: &AdmissionRequest<DynamicObject>,
    requester: &Requester,
    decide: impl Fn(&ValidatorSettings) -> Result<(), Refusal>,
) -> Checked {
    let refusal = match decide(&state.validator) {
        Err(refusal) if refusal.code == 403 && !state.validator.is_privileged(requester) => refusal,
        decided => return Ok(decided),
    };
    match state.lookup.is_portcullis_admin(&request.user_info).await {
        Ok(true) => {
            tracing::debug!(user = %requester.username, "exempt from the escalation check: cluster admin by SubjectAccessReview");
            let mut exempt = state.validator.clone();
            exempt.privileged_users.push(requester.username.clone());
            Ok(decide(&exempt))
        }
        Ok(false) => Ok(Err(refusal)),
        Err(e) => Err(Box::new(unavailable(request, e))),
    }
}

async fn check_tenant(
    state: &WebhookState,
    lookup: &dyn ClusterLookup,
    request: &AdmissionRequest<DynamicObject>,
    operation: Operation,
) -> Checked {
    let objects = objects::<Tenant>(request)?;
    // Only a new or changed spec is checked against the other Tenants; the operator's
    // finalizer and label bookkeeping must not cost a LIST of every Tenant.
    let spec_unchanged =
        objects.old.as_ref().map(|o| &o.spec) == objects.object.as_ref().map(|t| &t.spec);
    let claims = if spec_unchanged || operation == Operation::Delete {
        TenantClaims::new(&[])
    } else {
        let namespaces = objects
            .object
            .as_ref()
            .map_or(&[][..], |t| t.spec.namespaces.as_slice());
        tenant_claims(lookup, namespaces)
            .await
            .map_err(|e| Box::new(unavailable(request, e)))?
    };
    Ok(validate_tenant(
        &change(request, operation, &objects),
        &claims,
        &state.validator,
    ))
}

/// Creations and deletions always; updates when the spec, labels or annotations
/// change (not the operator's finalizer bookkeeping).
fn is_admin_change(request: &AdmissionRequest<DynamicObject>, operation: Operation) -> bool {
    if operation != Operation::Update {
        return true;
    }
    let (Some(new), Some(old)) = (&request.object, &request.old_object) else {
        return true;
    };
    new.data.get("spec") != old.data.get("spec")
        || new.metadata.labels != old.metadata.labels
        || new.metadata.annotations != old.metadata.annotations
}

/// The tenant whose audit log an admitted change belongs in: a Tenant's own, else the
/// one the object's namespace is bound to (its tenant label); `None` when no tenant owns
/// it or the namespace cannot be read (the record then stays in the operator's chain
/// of changes no tenant owns).
async fn admin_tenant(
    state: &WebhookState,
    request: &AdmissionRequest<DynamicObject>,
    noun: &str,
) -> Option<String> {
    if noun == "tenant" {
        return Some(request.name.clone());
    }
    let namespace = request.namespace.as_deref().filter(|ns| !ns.is_empty())?;
    match state.lookup.namespace_labels(namespace).await {
        Ok(labels) => labels?.get(TENANT_LABEL).cloned(),
        Err(e) => {
            tracing::warn!(namespace, error = %e, "admin audit: cannot read the namespace's tenant");
            None
        }
    }
}

fn audit_event(
    state: &WebhookState,
    request: &AdmissionRequest<DynamicObject>,
    noun: &str,
    operation: Operation,
    tenant: Option<String>,
) -> AdminAuditEvent {
    let (verb, status) = match operation {
        Operation::Create => ("create", 201),
        Operation::Update => ("update", 200),
        Operation::Delete => ("delete", 200),
    };
    let object = match request.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => format!("{ns}/{}", request.name),
        _ => request.name.clone(),
    };
    AdminAuditEvent {
        action: format!("admin.{noun}.{verb}"),
        principal: Requester::from_user_info(&request.user_info).principal(),
        status,
        object,
        tenant,
        time: state.clock.now(),
    }
}
