//! `PolicyCompiler`: a pure function from a tenant, its ApiKeys and its Roles to the
//! [`PolicyBundle`] its sidecars enforce.
//!
//! A revoked key stays in the bundle as a tombstone (its hash, no scopes, `revoked`) so
//! the proxy can tell its holder the key was revoked rather than unknown, for
//! [`TOMBSTONE_GRACE`] after the controller recorded the revocation, then it is left
//! out; the spec is trusted as soon as it changes, before the ApiKey controller catches
//! up. Any other
//! key is in the bundle when it is `Active`, not expired, every allowlist
//! entry parses, and its role still resolves. Its scopes are those it asks for that the
//! role grants and the catalogue defines. Previous tokens of a rotated key are added
//! until their `validUntil`. Everything left out is listed with the reason. The Tenant's
//! `spec.allowedPeers` are carried as they are (entries that match nothing are dropped:
//! the webhook refuses them and `TenantSpec::validate` names them).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ipnet::IpNet;
use jiff::Timestamp;
use portcullis_crds::{
    ApiKey, KeyPolicy, KeyState, PolicyBundle, RateLimitPolicy, Role, Tenant,
    cidr::parse_all,
    role::{self, RoleSpec},
    token::KeyId,
};

/// How long a revoked key stays in the bundle as a tombstone after the ApiKey
/// controller recorded the revocation. After that the key is simply unknown: sidecars
/// stop bcrypt-checking it, so revoked keys cannot be used to burn their CPU forever.
pub const TOMBSTONE_GRACE: jiff::SignedDuration = jiff::SignedDuration::from_hours(7 * 24);

/// A revoked key as the proxy sees it: the hash (so only its holder learns the state),
/// no scopes, `revoked`, and as `expiresAt` the end of its grace (sidecars treat a
/// tombstone past it as unknown, even on a stale policy).
fn tombstone(name: String, hash: String, grace_ends: Option<Timestamp>) -> KeyPolicy {
    KeyPolicy {
        name,
        hash,
        scopes: BTreeSet::new(),
        rate_limit: RateLimitPolicy::default(),
        ip_allowlist: Vec::new(),
        expires_at: grace_ends,
        revoked: true,
    }
}

/// When the controller recorded the revocation: the `Ready` condition's transition
/// time once the status says `Revoked`. `None` while only the spec says so.
fn revoked_at(status: &portcullis_crds::ApiKeyStatus) -> Option<Timestamp> {
    if status.state != KeyState::Revoked {
        return None;
    }
    portcullis_crds::conditions::find_ready(&status.conditions).map(|c| c.last_transition_time.0)
}

/// A key the compiler left out, and why (shown by `policy dump` and the debug endpoint).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Exclusion {
    /// `<namespace>/<name>` of the ApiKey.
    pub key: String,
    /// Why it is not in the bundle.
    pub reason: String,
}

/// One tenant's compiled policy.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CompiledPolicy {
    /// The bundle, with version 0: the hub numbers what it publishes.
    pub bundle: PolicyBundle,
    /// Keys left out.
    pub excluded: Vec<Exclusion>,
    /// When the bundle changes by itself (a key expires, an overlap ends).
    pub next_change: Option<Timestamp>,
}

/// Compiles bundles. Stateless: the same inputs always give the same bundle.
#[derive(Clone, Copy, Debug, Default)]
pub struct PolicyCompiler;

fn key_name(key: &ApiKey) -> String {
    format!(
        "{}/{}",
        key.metadata.namespace.as_deref().unwrap_or_default(),
        key.metadata.name.as_deref().unwrap_or_default()
    )
}

impl PolicyCompiler {
    /// The bundle for `tenant`, given the ApiKeys and Roles of its bound namespaces.
    pub fn compile(
        &self,
        tenant: &Tenant,
        keys: &[Arc<ApiKey>],
        roles: &[Arc<Role>],
        now: Timestamp,
    ) -> CompiledPolicy {
        let spec = &tenant.spec;
        let mut excluded = Vec::new();
        let mut bundle = PolicyBundle {
            version: 0,
            tenant: tenant.metadata.name.clone().unwrap_or_default(),
            classification: spec.data_classification,
            scopes: spec.scopes.clone(),
            tenant_ip_allowlist: Vec::new(),
            keys: BTreeMap::new(),
            allowed_peers: spec
                .allowed_peers
                .iter()
                .filter(|peer| peer.to_match().is_ok())
                .cloned()
                .collect(),
            revoked_certificates: Vec::new(),
            service_revisions: BTreeMap::new(),
        };
        let mut next_change: Option<Timestamp> = None;
        let mut note_change = |at: Timestamp| {
            next_change = Some(next_change.map_or(at, |n| n.min(at)));
        };

        let tenant_allowlist = match parse_all(&spec.defaults.ip_allowlist) {
            Ok(nets) => nets,
            Err((i, e)) => {
                // Fail closed: a tenant allowlist we cannot read admits no key at all.
                for key in keys {
                    excluded.push(Exclusion {
                        key: key_name(key),
                        reason: format!("tenant allowlist entry spec.defaults.ipAllowlist[{i}] is malformed: {e}"),
                    });
                }
                return CompiledPolicy {
                    bundle,
                    excluded,
                    next_change: None,
                };
            }
        };
        bundle.tenant_ip_allowlist = tenant_allowlist;

        let mut roles_by_namespace: BTreeMap<&str, BTreeMap<String, RoleSpec>> = BTreeMap::new();
        for r in roles {
            if let (Some(ns), Some(name)) =
                (r.metadata.namespace.as_deref(), r.metadata.name.as_deref())
            {
                roles_by_namespace
                    .entry(ns)
                    .or_default()
                    .insert(name.to_owned(), r.spec.clone());
            }
        }
        let no_roles = BTreeMap::new();

        for key in keys {
            let name = key_name(key);
            let mut exclude = |reason: String| {
                excluded.push(Exclusion {
                    key: name.clone(),
                    reason,
                })
            };
            let status = key.status.clone().unwrap_or_default();
            if key.spec.revoked {
                let grace_ends = revoked_at(&status).map(|at| at + TOMBSTONE_GRACE);
                if let Some(ends) = grace_ends {
                    if ends <= now {
                        exclude("revoked (tombstone dropped after its grace)".into());
                        continue;
                    }
                    note_change(ends);
                }
                exclude("revoked".into());
                let issued = status.key_id.as_deref().map(KeyId::parse);
                if let (Some(Ok(key_id)), Some(hash)) = (issued, status.hash.clone()) {
                    bundle
                        .keys
                        .insert(key_id, tombstone(name.clone(), hash, grace_ends));
                }
                for retired in &status.previous_keys {
                    if let Ok(retired_id) = KeyId::parse(&retired.key_id) {
                        bundle.keys.insert(
                            retired_id,
                            tombstone(name.clone(), retired.hash.clone(), grace_ends),
                        );
                    }
                }
                continue;
            }
            if status.state != KeyState::Active {
                exclude(format!("state is {}", status.state.as_str()));
                continue;
            }
            let (Some(key_id), Some(hash)) = (status.key_id.as_deref(), status.hash.clone()) else {
                exclude("not issued yet".into());
                continue;
            };
            let Ok(key_id) = KeyId::parse(key_id) else {
                exclude(format!("status.keyId {key_id:?} is malformed"));
                continue;
            };
            let expires_at = status.expires_at.as_ref().map(|t| t.0);
            if expires_at.is_some_and(|at| at <= now) {
                exclude("expired".into());
                continue;
            }
            let ip_allowlist: Vec<IpNet> = match parse_all(&key.spec.ip_allowlist) {
                Ok(nets) => nets,
                Err((i, e)) => {
                    exclude(format!("spec.ipAllowlist[{i}]: {e}"));
                    continue;
                }
            };
            let namespace = key.metadata.namespace.as_deref().unwrap_or_default();
            let namespace_roles = roles_by_namespace.get(namespace).unwrap_or(&no_roles);
            let effective = match role::resolve(&key.spec.role, namespace_roles) {
                Ok(effective) => effective,
                Err(e) => {
                    exclude(format!("role {}: {e}", key.spec.role));
                    continue;
                }
            };
            let scopes: BTreeSet<String> = key
                .spec
                .scopes
                .iter()
                .map(|s| s.as_str().to_owned())
                .filter(|s| effective.grants_scope(s) && spec.scopes.contains_key(s))
                .collect();
            if scopes.is_empty() {
                exclude("no scope is granted by both its role and the tenant catalogue".into());
                continue;
            }
            let rate_limit = key.spec.rate_limit.as_ref().map_or_else(
                || RateLimitPolicy::from(&spec.defaults.rate_limit),
                RateLimitPolicy::from,
            );
            if let Some(at) = expires_at {
                note_change(at);
            }
            for retired in &status.previous_keys {
                let valid_until = retired.valid_until.0;
                if valid_until <= now {
                    continue;
                }
                let Ok(retired_id) = KeyId::parse(&retired.key_id) else {
                    continue;
                };
                note_change(valid_until);
                bundle.keys.insert(
                    retired_id,
                    KeyPolicy {
                        name: name.clone(),
                        hash: retired.hash.clone(),
                        scopes: scopes.clone(),
                        rate_limit,
                        ip_allowlist: ip_allowlist.clone(),
                        expires_at: Some(expires_at.map_or(valid_until, |e| e.min(valid_until))),
                        revoked: false,
                    },
                );
            }
            bundle.keys.insert(
                key_id,
                KeyPolicy {
                    name: name.clone(),
                    hash,
                    scopes,
                    rate_limit,
                    ip_allowlist,
                    expires_at,
                    revoked: false,
                },
            );
        }
        CompiledPolicy {
            bundle,
            excluded,
            next_change,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::api::ObjectMeta;
    use portcullis_crds::{
        ApiKeySpec, ApiKeyStatus, Cidr, DurationSpec, HttpMethod, RouteRule, ScopeName, TenantSpec,
        apikey::RetiredKey, tenant::RateLimit,
    };

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn secs(n: i64) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + n).unwrap_or(Timestamp::UNIX_EPOCH))
    }

    fn tenant() -> Tenant {
        let mut spec: TenantSpec =
            serde_json::from_value(serde_json::json!({})).unwrap_or_else(|_| unreachable!());
        spec.scopes.insert(
            "identify".into(),
            vec![RouteRule::new(&[HttpMethod::POST], "/v1/identify")],
        );
        spec.scopes.insert(
            "events".into(),
            vec![RouteRule::new(&[HttpMethod::GET], "/v1/events/*")],
        );
        let mut t = Tenant::new("acme", spec);
        t.metadata.name = Some("acme".into());
        t
    }

    fn builtin_roles(ns: &str) -> Vec<Arc<Role>> {
        role::BUILTIN_ROLES
            .iter()
            .filter_map(|n| {
                let mut r = Role::new(&role::role_object_name(n), role::builtin_role(n)?);
                r.metadata.namespace = Some(ns.into());
                Some(Arc::new(r))
            })
            .collect()
    }

    fn key(name: &str, id: &str, scopes: &[&str]) -> ApiKey {
        ApiKey {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("acme-prod".into()),
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
            status: Some(ApiKeyStatus {
                state: KeyState::Active,
                key_id: Some(id.into()),
                hash: Some(format!("$2b$04$hash-of-{id}")),
                expires_at: Some(secs(3_600)),
                ..ApiKeyStatus::default()
            }),
        }
    }

    fn compile(keys: Vec<ApiKey>) -> CompiledPolicy {
        let keys: Vec<_> = keys.into_iter().map(Arc::new).collect();
        PolicyCompiler.compile(&tenant(), &keys, &builtin_roles("acme-prod"), now())
    }

    fn id(text: &str) -> KeyId {
        KeyId::parse(text).unwrap_or_else(|_| unreachable!("test key id {text}"))
    }

    #[test]
    fn allowed_peers_reach_the_bundle() {
        use portcullis_crds::AllowedPeer;
        let mut t = tenant();
        t.spec.allowed_peers = vec![
            AllowedPeer::spiffe_id("spiffe://cluster.local/ns/web/sa/front"),
            AllowedPeer::namespace("batch"),
            AllowedPeer::tenant("globex"),
            // A tenant URI names no workload: never carried.
            AllowedPeer::spiffe_id("spiffe://cluster.local/tenant/globex"),
        ];
        let compiled = PolicyCompiler.compile(&t, &[], &[], now());
        assert_eq!(
            compiled.bundle.allowed_peers,
            vec![
                AllowedPeer::spiffe_id("spiffe://cluster.local/ns/web/sa/front"),
                AllowedPeer::namespace("batch"),
                AllowedPeer::tenant("globex"),
            ]
        );
        assert!(compile(vec![]).bundle.allowed_peers.is_empty());
    }

    #[test]
    fn active_keys_carry_hash_scopes_and_tenant_default_limit() {
        let compiled = compile(vec![key("ingest", "aaaaaaaaaaaa", &["identify", "events"])]);
        let bundle = &compiled.bundle;
        assert_eq!(bundle.tenant, "acme");
        let k = &bundle.keys[&id("aaaaaaaaaaaa")];
        assert_eq!(k.name, "acme-prod/ingest");
        assert_eq!(k.hash, "$2b$04$hash-of-aaaaaaaaaaaa");
        assert_eq!(
            k.scopes,
            BTreeSet::from(["events".to_owned(), "identify".to_owned()])
        );
        assert_eq!(k.rate_limit, RateLimitPolicy::from(&RateLimit::default()));
        assert_eq!(compiled.next_change, Some(secs(3_600).0));
        assert!(compiled.excluded.is_empty());
    }

    #[test]
    fn key_rate_limit_and_allowlist_override_defaults() {
        let mut k = key("ingest", "aaaaaaaaaaaa", &["identify"]);
        k.spec.rate_limit = Some(RateLimit {
            requests: 5,
            per: DurationSpec::minutes(1),
            burst: Some(2),
        });
        k.spec.ip_allowlist = vec![Cidr::new("10.0.0.0/8"), Cidr::new("2001:db8::/32")];
        let bundle = compile(vec![k]).bundle;
        let k = &bundle.keys[&id("aaaaaaaaaaaa")];
        assert_eq!(
            k.rate_limit,
            RateLimitPolicy {
                requests: 5,
                per_ms: 60_000,
                burst: 2
            }
        );
        assert_eq!(k.ip_allowlist.len(), 2);
    }

    #[test]
    fn revoked_keys_are_tombstones_and_expired_or_inactive_keys_are_left_out() {
        let mut revoked = key("revoked", "bbbbbbbbbbbb", &["identify"]);
        revoked.spec.revoked = true; // status still Active: the spec wins at once
        let mut expired = key("expired", "cccccccccccc", &["identify"]);
        if let Some(s) = expired.status.as_mut() {
            s.expires_at = Some(secs(-1));
        }
        let mut pending = key("pending", "dddddddddddd", &["identify"]);
        if let Some(s) = pending.status.as_mut() {
            s.state = KeyState::Pending;
        }
        let compiled = compile(vec![
            revoked,
            expired,
            pending,
            key("ok", "eeeeeeeeeeee", &["identify"]),
        ]);
        assert_eq!(
            compiled.bundle.keys.keys().collect::<Vec<_>>(),
            [&id("bbbbbbbbbbbb"), &id("eeeeeeeeeeee")]
        );
        let tombstone = &compiled.bundle.keys[&id("bbbbbbbbbbbb")];
        assert!(tombstone.revoked);
        assert!(tombstone.scopes.is_empty(), "a revoked key grants nothing");
        assert!(!compiled.bundle.keys[&id("eeeeeeeeeeee")].revoked);
        let reasons: BTreeMap<_, _> = compiled
            .excluded
            .iter()
            .map(|e| (e.key.as_str(), e.reason.as_str()))
            .collect();
        assert_eq!(reasons["acme-prod/revoked"], "revoked");
        assert_eq!(reasons["acme-prod/expired"], "expired");
        assert_eq!(reasons["acme-prod/pending"], "state is Pending");
    }

    #[test]
    fn revoked_keys_leave_the_bundle_after_their_grace() {
        let revoked_key = |revoked_secs_ago: i64| {
            let mut k = key("revoked", "bbbbbbbbbbbb", &["identify"]);
            k.spec.revoked = true;
            if let Some(s) = k.status.as_mut() {
                s.state = KeyState::Revoked;
                s.conditions = vec![portcullis_crds::conditions::ready(
                    false,
                    "Revoked",
                    "revoked",
                    None,
                    &[],
                    secs(-revoked_secs_ago),
                )];
            }
            k
        };
        let grace = TOMBSTONE_GRACE.as_secs();
        let fresh = compile(vec![revoked_key(60)]);
        let tombstone = &fresh.bundle.keys[&id("bbbbbbbbbbbb")];
        assert!(tombstone.revoked);
        let ends = now() + TOMBSTONE_GRACE - jiff::SignedDuration::from_secs(60);
        assert_eq!(
            tombstone.expires_at,
            Some(ends),
            "sidecars learn when it lapses"
        );
        assert_eq!(fresh.next_change, Some(ends), "recompiled when it lapses");

        let lapsed = compile(vec![revoked_key(grace)]);
        assert!(
            lapsed.bundle.keys.is_empty(),
            "no hash left to bcrypt-check"
        );
        assert_eq!(
            lapsed.excluded[0].reason,
            "revoked (tombstone dropped after its grace)"
        );
    }

    #[test]
    fn malformed_cidr_excludes_only_that_key_and_says_why() {
        let mut bad = key("bad", "bbbbbbbbbbbb", &["identify"]);
        bad.spec.ip_allowlist = vec![Cidr::new("10.0.0.0/8"), Cidr::new("10.0.0.300/8")];
        let compiled = compile(vec![bad, key("good", "aaaaaaaaaaaa", &["identify"])]);
        assert!(compiled.bundle.keys.contains_key(&id("aaaaaaaaaaaa")));
        assert!(!compiled.bundle.keys.contains_key(&id("bbbbbbbbbbbb")));
        let e = &compiled.excluded[0];
        assert_eq!(e.key, "acme-prod/bad");
        assert!(
            e.reason.contains("spec.ipAllowlist[1]") && e.reason.contains("10.0.0.300/8"),
            "{e:?}"
        );
    }

    #[test]
    fn malformed_tenant_allowlist_fails_closed() {
        let mut t = tenant();
        t.spec.defaults.ip_allowlist = vec![Cidr::new("nope")];
        let keys = vec![Arc::new(key("ok", "aaaaaaaaaaaa", &["identify"]))];
        let compiled = PolicyCompiler.compile(&t, &keys, &builtin_roles("acme-prod"), now());
        assert!(compiled.bundle.keys.is_empty());
        assert!(compiled.excluded[0].reason.contains("ipAllowlist[0]"));
    }

    #[test]
    fn retired_keys_stay_until_their_overlap_ends() {
        let mut k = key("ingest", "aaaaaaaaaaaa", &["identify"]);
        if let Some(s) = k.status.as_mut() {
            s.previous_keys = vec![
                RetiredKey {
                    key_id: "bbbbbbbbbbbb".into(),
                    hash: "$2b$04$old".into(),
                    valid_until: secs(600),
                },
                RetiredKey {
                    key_id: "cccccccccccc".into(),
                    hash: "$2b$04$older".into(),
                    valid_until: secs(-5),
                },
            ];
        }
        let compiled = compile(vec![k]);
        let keys = &compiled.bundle.keys;
        assert_eq!(keys.len(), 2, "current + retired within overlap");
        let retired = &keys[&id("bbbbbbbbbbbb")];
        assert_eq!(retired.hash, "$2b$04$old");
        assert_eq!(retired.expires_at, Some(secs(600).0));
        assert_eq!(retired.name, "acme-prod/ingest");
        assert_eq!(
            compiled.next_change,
            Some(secs(600).0),
            "recompile when the overlap ends"
        );
    }

    #[test]
    fn scopes_outside_role_or_catalogue_are_dropped() {
        let mut viewer = key("viewer", "aaaaaaaaaaaa", &["identify"]);
        viewer.spec.role = "Viewer".into(); // Viewer grants no scopes
        let unknown = key("unknown", "bbbbbbbbbbbb", &["identify", "signals"]); // signals not in catalogue
        let mut ghost = key("ghost", "cccccccccccc", &["identify"]);
        ghost.spec.role = "ghost".into();
        let compiled = compile(vec![viewer, unknown, ghost]);
        assert_eq!(
            compiled.bundle.keys[&id("bbbbbbbbbbbb")].scopes,
            BTreeSet::from(["identify".to_owned()])
        );
        assert_eq!(compiled.bundle.keys.len(), 1);
        assert!(
            compiled
                .excluded
                .iter()
                .any(|e| e.key == "acme-prod/ghost" && e.reason.contains("ghost"))
        );
    }
}
