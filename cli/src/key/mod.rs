//! `kubectl portcullis key create|rotate|revoke|show|list`.
//!
//! The plaintext token is printed only by `create`, `rotate` and `show --reveal`, to
//! stdout and nowhere else; everything around it goes to stderr, so
//! `TOKEN=$(kubectl portcullis key create ...)` captures just the token.

mod issue;
pub mod spec;
pub mod view;

use std::io::Write;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use portcullis_crds::{ApiKey, KeyState};

pub use issue::DELIVERED_ANNOTATION;
use issue::{Issued, KeyRef};
use view::{IssuedReport, KeyReport, PreviousKeyView};

use crate::Outcome;
use crate::cli::{
    KeyCreateArgs, KeyListArgs, KeyRevokeArgs, KeyRotateArgs, KeyShowArgs, OutputFormat,
};
use crate::cluster::Cluster;
use crate::error::CliError;
use crate::output::{timestamp_relative, without_managed_fields, write_structured};

/// Field manager of the CLI's writes.
pub const FIELD_MANAGER: &str = "kubectl-portcullis";

const NOT_SHOWN_AGAIN: &str = "Copy this token now: it will not be shown again.";

struct Apis {
    keys: Api<ApiKey>,
    secrets: Api<Secret>,
}

impl Apis {
    fn new(cluster: &Cluster) -> Self {
        Self {
            keys: Api::namespaced(cluster.client.clone(), &cluster.namespace),
            secrets: Api::namespaced(cluster.client.clone(), &cluster.namespace),
        }
    }

    fn key<'a>(&'a self, cluster: &'a Cluster, name: &'a str) -> KeyRef<'a> {
        KeyRef {
            keys: &self.keys,
            secrets: &self.secrets,
            namespace: &cluster.namespace,
            name,
            operator_namespace: &cluster.operator_namespace,
        }
    }
}

/// `key create`.
pub async fn create(
    cluster: &Cluster,
    args: &KeyCreateArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Outcome, CliError> {
    let spec = spec::from_args(args);
    spec::check(&spec, Timestamp::now()).map_err(|errors| CliError::Invalid {
        what: format!("ApiKey {}", args.name),
        errors,
    })?;
    let apis = Apis::new(cluster);
    let mut key = ApiKey::new(&args.name, spec);
    key.metadata.namespace = Some(cluster.namespace.clone());
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PostParams::default()
    };
    // A refusal (schema, or the validating webhook naming the missing scope or
    // permission) is shown exactly as the API server words it.
    apis.keys
        .create(&params, &key)
        .await
        .map_err(CliError::from)?;
    writeln!(
        err,
        "apikey {}/{} created; waiting up to {} for the operator to issue it...",
        cluster.namespace, args.name, args.wait
    )?;
    let key_ref = apis.key(cluster, &args.name);
    let issued = key_ref.wait_for_token(0, args.wait.get()).await?;
    print_issued(&key_ref, &issued, None, args.output.format, out, err).await?;
    Ok(Outcome::Clean)
}

/// `key rotate`.
pub async fn rotate(
    cluster: &Cluster,
    args: &KeyRotateArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Outcome, CliError> {
    let apis = Apis::new(cluster);
    let key_ref = apis.key(cluster, &args.name);
    let key = key_ref.get().await?;
    if key.spec.revoked {
        return Err(CliError::Operator(format!(
            "ApiKey {}/{} is revoked; a revoked key is not rotated: create a new key instead",
            cluster.namespace, args.name
        )));
    }
    let target = key.spec.rotate.checked_add(1).ok_or_else(|| {
        CliError::Operator(format!(
            "ApiKey {}/{} has been rotated {} times, the most spec.rotate holds; create a new key instead",
            cluster.namespace, args.name, key.spec.rotate
        ))
    })?;
    let old_key_id = key.status.as_ref().and_then(|s| s.key_id.clone());
    // resourceVersion makes this a compare-and-swap: two rotations at once do not
    // silently collapse into one.
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": key.resource_version()},
        "spec": {"rotate": target},
    });
    apis.keys
        .patch(&args.name, &patch_params(), &Patch::Merge(&patch))
        .await
        .map_err(|e| match CliError::from(e) {
            CliError::Refused { code: 409, .. } => CliError::Operator(format!(
                "ApiKey {}/{} changed while rotating it; run the command again",
                cluster.namespace, args.name
            )),
            other => other,
        })?;
    writeln!(
        err,
        "apikey {}/{} rotation {target} requested; waiting up to {} for the new token...",
        cluster.namespace, args.name, args.wait
    )?;
    let issued = key_ref.wait_for_token(target, args.wait.get()).await?;
    let previous = old_key_id.and_then(|old| {
        issued
            .key
            .status
            .as_ref()?
            .previous_keys
            .iter()
            .find(|p| p.key_id == old)
            .map(|p| PreviousKeyView {
                key_prefix: format!("ak_{old}"),
                valid_until: p.valid_until.0,
            })
    });
    print_issued(
        &key_ref,
        &issued,
        Some(previous),
        args.output.format,
        out,
        err,
    )
    .await?;
    Ok(Outcome::Clean)
}

/// Prints a new token once, with its receipt on stderr, then marks it delivered.
/// `previous` is `Some` after a rotation (`Some(None)`: the old token stopped at once).
async fn print_issued(
    key_ref: &KeyRef<'_>,
    issued: &Issued,
    previous: Option<Option<PreviousKeyView>>,
    format: OutputFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), CliError> {
    let now = Timestamp::now();
    let summary = KeyReport::of(&issued.key);
    match format {
        OutputFormat::Table => {
            let expires = summary
                .expires_at
                .map_or_else(|| "no expiry".to_owned(), |t| timestamp_relative(t, now));
            writeln!(
                err,
                "apikey {}/{} issued: {} (role {}, scopes {}, expires {expires})",
                summary.namespace,
                summary.name,
                summary.key_prefix.as_deref().unwrap_or("-"),
                summary.role,
                summary.scopes.join(","),
            )?;
            match &previous {
                Some(Some(p)) => writeln!(
                    err,
                    "the previous token {} keeps working until {}",
                    p.key_prefix,
                    timestamp_relative(p.valid_until, now)
                )?,
                Some(None) => writeln!(err, "the previous token no longer works")?,
                None => {}
            }
            err.flush()?;
            writeln!(out, "{}", issued.token.expose_secret())?;
            out.flush()?;
        }
        OutputFormat::Json | OutputFormat::Yaml => {
            let report = IssuedReport {
                name: summary.name,
                namespace: summary.namespace,
                key_prefix: summary.key_prefix,
                role: summary.role,
                scopes: summary.scopes,
                issued_at: summary.issued_at,
                expires_at: summary.expires_at,
                previous_key: previous.flatten(),
                token: issued.token.expose_secret().to_owned(),
            };
            write_structured(format, &report, out)?;
            out.flush()?;
        }
    }
    writeln!(err, "{NOT_SHOWN_AGAIN}")?;
    if let Err(e) = key_ref.mark_delivered().await {
        writeln!(
            err,
            "warning: could not mark the token delivered ({e}); Restricted tenants keep its Secret until it is"
        )?;
    }
    Ok(())
}

/// `key revoke`.
pub async fn revoke(
    cluster: &Cluster,
    args: &KeyRevokeArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Outcome, CliError> {
    let apis = Apis::new(cluster);
    let key_ref = apis.key(cluster, &args.name);
    let key = key_ref.get().await?;
    let already = key.spec.revoked
        && key
            .status
            .as_ref()
            .is_some_and(|s| s.state == KeyState::Revoked);
    let key = if already {
        writeln!(
            err,
            "apikey {}/{} was already revoked",
            cluster.namespace, args.name
        )?;
        key
    } else {
        let patch = serde_json::json!({"spec": {"revoked": true}});
        apis.keys
            .patch(&args.name, &patch_params(), &Patch::Merge(&patch))
            .await
            .map_err(CliError::from)?;
        writeln!(
            err,
            "apikey {}/{} marked revoked; waiting up to {} for the operator to confirm...",
            cluster.namespace, args.name, args.wait
        )?;
        key_ref
            .wait_for_state(KeyState::Revoked, args.wait.get())
            .await?
    };
    match args.output.format {
        OutputFormat::Table => writeln!(
            out,
            "apikey {}/{} revoked: {} is refused by every sidecar",
            cluster.namespace,
            args.name,
            view::key_prefix(&key).unwrap_or_else(|| "its token".to_owned())
        )?,
        format => write_structured(format, &KeyReport::of(&key), out)?,
    }
    Ok(Outcome::Clean)
}

/// `key show`.
pub async fn show(
    cluster: &Cluster,
    args: &KeyShowArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Outcome, CliError> {
    let apis = Apis::new(cluster);
    let key_ref = apis.key(cluster, &args.name);
    let key = key_ref.get().await?;
    let mut report = KeyReport::of(&key);
    if args.reveal {
        let token = key_ref.read_token().await?.ok_or_else(|| {
            CliError::Secret(format!(
                "no token to reveal: Secret {}/{} does not exist. Either the key is not issued yet (state {}), or its tenant is Restricted and the plaintext was removed after delivery; rotate the key (kubectl portcullis key rotate {}) for a new token",
                cluster.namespace,
                portcullis_crds::apikey::secret_name(&args.name),
                report.state,
                args.name,
            ))
        })?;
        let current = key.status.as_ref().and_then(|s| s.key_id.as_deref());
        if current != Some(token.key_id().as_str()) {
            writeln!(
                err,
                "warning: the Secret holds a token the key's status does not name yet (an issue or rotation is in progress)"
            )?;
        }
        report.token = Some(token.expose_secret().to_owned());
    }
    match args.output.format {
        OutputFormat::Table => out.write_all(report.render(Timestamp::now()).as_bytes())?,
        format => write_structured(format, &report, out)?,
    }
    Ok(Outcome::Clean)
}

/// `key list`.
pub async fn list(
    cluster: &Cluster,
    args: &KeyListArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Outcome, CliError> {
    let api: Api<ApiKey> = if args.all_namespaces {
        Api::all(cluster.client.clone())
    } else {
        Api::namespaced(cluster.client.clone(), &cluster.namespace)
    };
    let mut keys = api
        .list(&ListParams::default())
        .await
        .map_err(|e| {
            CliError::from_kube(e, || {
                (
                    "the ApiKey resource".to_owned(),
                    "install the CRDs: kubectl apply --server-side -f crds/".to_owned(),
                )
            })
        })?
        .items;
    keys.sort_by_key(|k| (k.namespace(), k.name_any()));
    match args.output.format {
        OutputFormat::Table if keys.is_empty() => {
            let scope = if args.all_namespaces {
                "any namespace".to_owned()
            } else {
                format!("namespace {}", cluster.namespace)
            };
            writeln!(err, "No API keys found in {scope}.")?;
        }
        OutputFormat::Table => out.write_all(
            view::list_table(&keys, args.all_namespaces, Timestamp::now())
                .render()
                .as_bytes(),
        )?,
        format => {
            let items: Vec<ApiKey> = keys.into_iter().map(without_managed_fields).collect();
            let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
            write_structured(format, &list, out)?;
        }
    }
    Ok(Outcome::Clean)
}

fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    }
}
