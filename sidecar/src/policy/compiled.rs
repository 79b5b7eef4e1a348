//! The policy a sidecar holds in memory: a [`PolicyBundle`] compiled into a compact key
//! table. The wire form spends ~750 bytes per key (three `String`s, a `BTreeSet`, a
//! `Vec`, and a `BTreeMap` node); here a key is one fixed-size record (~72 bytes), its
//! name and bcrypt hash live back to back in one shared text buffer, and scope sets and
//! allowlists, which keys mostly share, are stored once. Key ids index a `HashMap` with the std (SipHash, randomly keyed) hasher,
//! since callers choose the ids they present.
//!
//! Bundles deserialize straight into this form (the map of keys is read one entry at a
//! time), so a 100k-key file never exists as a `BTreeMap` of `KeyPolicy` in memory.
//!
//! [`PolicyBundle`]: portcullis_crds::PolicyBundle

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    sync::Arc,
};

use ipnet::IpNet;
use jiff::Timestamp;
use portcullis_crds::{
    AllowedPeer, DataClassification, KeyPolicy, PolicyBundle, RateLimitPolicy, RevokedCertificate,
    ScopeMap, token::KEY_ID_LEN,
};
use serde::{
    Deserialize, Deserializer,
    de::{MapAccess, Visitor},
};

type KeyIdBytes = [u8; KEY_ID_LEN];

/// A tenant's policy as the proxy enforces it. Same content as a [`PolicyBundle`],
/// except keys whose id could never match a presented token (not 12 characters of
/// `a-z2-7`), which are dropped.
#[derive(Clone)]
pub struct CompiledPolicy {
    /// Rises with every change; sidecars ignore a bundle older than the one they hold.
    pub version: u64,
    /// The tenant's name.
    pub tenant: String,
    /// The tenant's data classification.
    pub classification: DataClassification,
    /// Scope name → routes.
    pub scopes: ScopeMap,
    /// Networks every request must come from (empty: any).
    pub tenant_ip_allowlist: Vec<IpNet>,
    /// mTLS peers admitted besides the tenant's own workloads.
    pub allowed_peers: Vec<AllowedPeer>,
    /// Revoked workload certificates by serial (their pods are gone).
    pub revoked_certificates: HashMap<String, RevokedCertificate>,
    /// Per namespace, the revision of its Service selectors (see `PolicyBundle`).
    pub service_revisions: BTreeMap<String, String>,
    keys: KeyTable,
}

impl fmt::Debug for CompiledPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the hashes.
        f.debug_struct("CompiledPolicy")
            .field("version", &self.version)
            .field("tenant", &self.tenant)
            .field("classification", &self.classification)
            .field("keys", &self.keys.records.len())
            .finish_non_exhaustive()
    }
}

impl CompiledPolicy {
    /// The scope a request needs, from this tenant's catalogue.
    pub fn scope_for(&self, method: &str, path: &str) -> Option<&str> {
        portcullis_crds::scope::scope_for(&self.scopes, method, path)
    }

    /// The key with this id.
    pub fn key(&self, key_id: &str) -> Option<KeyRef<'_>> {
        let id: &KeyIdBytes = key_id.as_bytes().try_into().ok()?;
        let slot = *self.keys.index.get(id)?;
        let record = self.keys.records.get(usize::try_from(slot).ok()?)?;
        Some(KeyRef {
            table: &self.keys,
            record,
        })
    }

    /// Whether a key with this id is in the policy.
    pub fn contains_key(&self, key_id: &str) -> bool {
        self.key(key_id).is_some()
    }

    /// Keys held.
    pub fn key_count(&self) -> usize {
        self.keys.records.len()
    }

    /// Every key, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = KeyRef<'_>> {
        self.keys.records.iter().map(|record| KeyRef {
            table: &self.keys,
            record,
        })
    }
}

impl From<PolicyBundle> for CompiledPolicy {
    fn from(bundle: PolicyBundle) -> Self {
        let mut builder = KeyTableBuilder::default();
        for (id, key) in bundle.keys {
            if let Err(full) = builder.add(id.as_str(), key) {
                // Fail closed: a key that does not fit is unknown, so refused.
                tracing::error!(error = %full, "policy key table full; later keys are refused");
                break;
            }
        }
        Self {
            version: bundle.version,
            tenant: bundle.tenant,
            classification: bundle.classification,
            scopes: bundle.scopes,
            tenant_ip_allowlist: bundle.tenant_ip_allowlist,
            allowed_peers: bundle.allowed_peers,
            revoked_certificates: by_serial(bundle.revoked_certificates),
            service_revisions: bundle.service_revisions,
            keys: builder.finish(),
        }
    }
}

/// The wire form with the keys read straight into a table. Field names, defaults and
/// required fields are [`PolicyBundle`]'s.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    version: u64,
    tenant: String,
    classification: DataClassification,
    #[serde(default)]
    scopes: ScopeMap,
    #[serde(default)]
    tenant_ip_allowlist: Vec<IpNet>,
    #[serde(default)]
    keys: KeyTable,
    #[serde(default)]
    allowed_peers: Vec<AllowedPeer>,
    #[serde(default)]
    revoked_certificates: Vec<RevokedCertificate>,
    #[serde(default)]
    service_revisions: BTreeMap<String, String>,
}

fn by_serial(revoked: Vec<RevokedCertificate>) -> HashMap<String, RevokedCertificate> {
    revoked
        .into_iter()
        .map(|cert| (cert.serial.clone(), cert))
        .collect()
}

impl<'de> Deserialize<'de> for CompiledPolicy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = Wire::deserialize(deserializer)?;
        Ok(Self {
            version: wire.version,
            tenant: wire.tenant,
            classification: wire.classification,
            scopes: wire.scopes,
            tenant_ip_allowlist: wire.tenant_ip_allowlist,
            allowed_peers: wire.allowed_peers,
            revoked_certificates: by_serial(wire.revoked_certificates),
            service_revisions: wire.service_revisions,
            keys: wire.keys,
        })
    }
}

impl<'de> Deserialize<'de> for KeyTable {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> Visitor<'de> for Keys {
            type Value = KeyTable;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of key id to key policy")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KeyTable, A::Error> {
                let mut builder = KeyTableBuilder::default();
                while let Some(id) = map.next_key::<String>()? {
                    let key = map.next_value::<KeyPolicy>()?;
                    builder.add(&id, key).map_err(serde::de::Error::custom)?;
                }
                Ok(builder.finish())
            }
        }
        deserializer.deserialize_map(Keys)
    }
}

/// One key, borrowed from a [`CompiledPolicy`].
#[derive(Clone, Copy)]
pub struct KeyRef<'a> {
    table: &'a KeyTable,
    record: &'a Record,
}

impl fmt::Debug for KeyRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRef")
            .field("key_id", &self.key_id())
            .field("name", &self.name())
            .field("scopes", &self.scopes())
            .field("revoked", &self.revoked())
            .finish_non_exhaustive()
    }
}

impl<'a> KeyRef<'a> {
    /// Its public id.
    pub fn key_id(&self) -> &'a str {
        // Checked to be base32 (ASCII) when the table was built.
        std::str::from_utf8(&self.record.id).unwrap_or_default()
    }

    /// `<namespace>/<name>` of the ApiKey.
    pub fn name(&self) -> &'a str {
        self.table
            .text(self.record.text_start, self.record.name_len)
    }

    /// bcrypt hash of the token.
    pub fn hash(&self) -> &'a str {
        self.table.text(
            self.record.text_start.saturating_add(self.record.name_len),
            self.record.hash_len,
        )
    }

    /// Scopes granted.
    pub fn scopes(&self) -> &'a ScopeSet {
        &self.record.scopes
    }

    /// The rate limit in force.
    pub fn rate_limit(&self) -> &'a RateLimitPolicy {
        &self.record.rate_limit
    }

    /// Networks the key may be used from (empty: any).
    pub fn ip_allowlist(&self) -> &'a [IpNet] {
        usize::try_from(self.record.allowlist)
            .ok()
            .and_then(|i| self.table.allowlists.get(i))
            .map_or(&[], |list| &**list)
    }

    /// After this the key is refused.
    pub fn expires_at(&self) -> Option<Timestamp> {
        self.record.expires_at
    }

    /// A revoked key is refused.
    pub fn revoked(&self) -> bool {
        self.record.revoked
    }
}

/// A set of scope names, shared by every key granted exactly these scopes.
#[derive(Debug, Default)]
pub struct ScopeSet {
    names: Box<[Box<str>]>,
    joined: Arc<str>,
}

impl ScopeSet {
    fn new(names: &BTreeSet<String>) -> Self {
        let joined = names
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(",");
        Self {
            names: names.iter().map(|s| Box::from(s.as_str())).collect(),
            joined: Arc::from(joined),
        }
    }

    /// Whether `scope` is in the set.
    pub fn contains(&self, scope: &str) -> bool {
        self.names.iter().any(|s| &**s == scope)
    }

    /// The names, in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(|s| &**s)
    }

    /// The names, comma-separated (the `X-Portcullis-Scopes` value); cheap to clone.
    pub fn joined(&self) -> &Arc<str> {
        &self.joined
    }
}

/// One key. Text is in [`KeyTable::text`]: the name, then the hash.
#[derive(Clone, Debug)]
struct Record {
    expires_at: Option<Timestamp>,
    id: KeyIdBytes,
    text_start: u32,
    name_len: u32,
    hash_len: u32,
    rate_limit: RateLimitPolicy,
    scopes: Arc<ScopeSet>,
    allowlist: u32,
    revoked: bool,
}

#[derive(Clone, Default)]
struct KeyTable {
    index: HashMap<KeyIdBytes, u32>,
    records: Vec<Record>,
    text: String,
    allowlists: Vec<Box<[IpNet]>>,
}

impl KeyTable {
    fn text(&self, start: u32, len: u32) -> &str {
        let (Ok(start), Ok(len)) = (usize::try_from(start), usize::try_from(len)) else {
            return "";
        };
        self.text
            .get(start..start.saturating_add(len))
            .unwrap_or_default()
    }
}

/// Why a key could not be added: the table's 32-bit offsets ran out (4 GiB of text).
#[derive(Debug, thiserror::Error)]
#[error("policy too large for the key table (4 GiB of names and hashes, or 4 billion keys)")]
struct TableFull;

#[derive(Default)]
struct KeyTableBuilder {
    table: KeyTable,
    scope_sets: HashMap<BTreeSet<String>, Arc<ScopeSet>>,
    allowlist_ids: HashMap<Vec<IpNet>, u32>,
}

fn intern<K: std::hash::Hash + Eq, T>(
    ids: &mut HashMap<K, u32>,
    items: &mut Vec<T>,
    key: K,
    make: impl FnOnce(&K) -> T,
) -> Result<u32, TableFull> {
    if let Some(id) = ids.get(&key) {
        return Ok(*id);
    }
    let id = u32::try_from(items.len()).map_err(|_| TableFull)?;
    items.push(make(&key));
    ids.insert(key, id);
    Ok(id)
}

impl KeyTableBuilder {
    /// Adds `key` under `id`, replacing an earlier key with the same id (as a map
    /// would). Ids that are not 12 characters of `a-z2-7` are skipped: no presented
    /// token can carry them.
    fn add(&mut self, id: &str, key: KeyPolicy) -> Result<(), TableFull> {
        if portcullis_crds::KeyId::parse(id).is_err() {
            // Key ids are public (they prefix every token); the name says which key.
            tracing::warn!(
                key_id = id,
                key = %key.name,
                "policy key skipped: its id is not 12 characters of a-z and 2-7, so no token can name it"
            );
            return Ok(());
        }
        let Ok(id) = KeyIdBytes::try_from(id.as_bytes()) else {
            return Ok(());
        };
        let t = &mut self.table;
        let scopes = match self.scope_sets.get(&key.scopes) {
            Some(set) => set.clone(),
            None => {
                let set = Arc::new(ScopeSet::new(&key.scopes));
                self.scope_sets.insert(key.scopes, set.clone());
                set
            }
        };
        let allowlist = intern(
            &mut self.allowlist_ids,
            &mut t.allowlists,
            key.ip_allowlist,
            |l| l.clone().into_boxed_slice(),
        )?;
        let text_start = u32::try_from(t.text.len()).map_err(|_| TableFull)?;
        let name_len = u32::try_from(key.name.len()).map_err(|_| TableFull)?;
        let hash_len = u32::try_from(key.hash.len()).map_err(|_| TableFull)?;
        text_start
            .checked_add(name_len)
            .and_then(|n| n.checked_add(hash_len))
            .ok_or(TableFull)?;
        t.text.push_str(&key.name);
        t.text.push_str(&key.hash);
        let record = Record {
            expires_at: key.expires_at,
            id,
            text_start,
            name_len,
            hash_len,
            rate_limit: key.rate_limit,
            scopes,
            allowlist,
            revoked: key.revoked,
        };
        match t.index.get(&id).map(|&slot| usize::try_from(slot)) {
            Some(Ok(slot)) if slot < t.records.len() => t.records[slot] = record,
            _ => {
                let slot = u32::try_from(t.records.len()).map_err(|_| TableFull)?;
                t.records.push(record);
                t.index.insert(id, slot);
            }
        }
        Ok(())
    }

    fn finish(self) -> KeyTable {
        let mut table = self.table;
        table.index.shrink_to_fit();
        table.records.shrink_to_fit();
        table.text.shrink_to_fit();
        table.allowlists.shrink_to_fit();
        table
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::BTreeMap;

    use portcullis_crds::{
        KeyId,
        scope::{HttpMethod, RouteRule},
    };

    use super::*;

    fn key(name: &str, scopes: &[&str], revoked: bool) -> KeyPolicy {
        KeyPolicy {
            name: name.into(),
            hash: format!("$2b$04${name}-hash"),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            rate_limit: RateLimitPolicy::default(),
            ip_allowlist: vec![],
            expires_at: None,
            revoked,
        }
    }

    fn bundle() -> PolicyBundle {
        let mut limited = key("acme/b", &["events", "identify"], true);
        limited.rate_limit.requests = 5;
        limited.ip_allowlist = vec!["10.0.0.0/8".parse().unwrap()];
        limited.expires_at = Some(Timestamp::from_second(2_000_000_000).unwrap());
        PolicyBundle {
            version: 3,
            tenant: "acme".into(),
            classification: DataClassification::Confidential,
            scopes: ScopeMap::from([(
                "events".into(),
                vec![RouteRule::new(&[HttpMethod::GET], "/v1/events/*")],
            )]),
            tenant_ip_allowlist: vec!["192.168.0.0/16".parse().unwrap()],
            keys: BTreeMap::from([
                (
                    KeyId::parse("aaaaaaaaaaaa").unwrap(),
                    key("acme/a", &["events"], false),
                ),
                (KeyId::parse("bbbbbbbbbbbb").unwrap(), limited),
                (
                    KeyId::parse("cccccccccccc").unwrap(),
                    key("acme/c", &["events"], false),
                ),
            ]),
            ..PolicyBundle::default()
        }
    }

    fn assert_same(compiled: &CompiledPolicy, bundle: &PolicyBundle) {
        assert_eq!(compiled.version, bundle.version);
        assert_eq!(compiled.tenant, bundle.tenant);
        assert_eq!(compiled.classification, bundle.classification);
        assert_eq!(compiled.scopes, bundle.scopes);
        assert_eq!(compiled.tenant_ip_allowlist, bundle.tenant_ip_allowlist);
        assert_eq!(compiled.key_count(), bundle.keys.len());
        for (id, want) in &bundle.keys {
            let got = compiled.key(id.as_str()).unwrap();
            assert_eq!(got.key_id(), id.as_str());
            assert_eq!(got.name(), want.name);
            assert_eq!(got.hash(), want.hash);
            assert_eq!(
                got.scopes().iter().collect::<Vec<_>>(),
                want.scopes.iter().map(String::as_str).collect::<Vec<_>>()
            );
            assert_eq!(*got.rate_limit(), want.rate_limit);
            assert_eq!(got.ip_allowlist(), want.ip_allowlist.as_slice());
            assert_eq!(got.expires_at(), want.expires_at);
            assert_eq!(got.revoked(), want.revoked);
        }
    }

    #[test]
    fn compiling_and_deserializing_keep_every_field() {
        let bundle = bundle();
        assert_same(&CompiledPolicy::from(bundle.clone()), &bundle);
        let json = serde_json::to_string(&bundle).unwrap();
        assert_same(&serde_json::from_str(&json).unwrap(), &bundle);
        let yaml = serde_yaml::to_string(&bundle).unwrap();
        assert_same(&serde_yaml::from_str(&yaml).unwrap(), &bundle);
        let compiled = CompiledPolicy::from(bundle);
        assert_eq!(compiled.scope_for("GET", "/v1/events/1"), Some("events"));
        assert!(!format!("{compiled:?}").contains("$2b$"));
    }

    #[test]
    fn shared_parts_are_stored_once_and_scopes_are_joined() {
        let compiled = CompiledPolicy::from(bundle());
        let a = compiled.key("aaaaaaaaaaaa").unwrap();
        let b = compiled.key("bbbbbbbbbbbb").unwrap();
        let c = compiled.key("cccccccccccc").unwrap();
        assert!(std::ptr::eq(a.scopes(), c.scopes()));
        assert!(!std::ptr::eq(a.scopes(), b.scopes()));
        assert_eq!(&**b.scopes().joined(), "events,identify");
        assert!(b.scopes().contains("identify") && !a.scopes().contains("identify"));
        assert_eq!(compiled.keys.allowlists.len(), 2);
        assert_eq!(compiled.keys().count(), 3);
    }

    #[test]
    fn lookups_refuse_unknown_and_malformed_ids() {
        let compiled = CompiledPolicy::from(bundle());
        assert!(compiled.contains_key("aaaaaaaaaaaa"));
        assert!(!compiled.contains_key("dddddddddddd"));
        assert!(compiled.key("aaaa").is_none());
        assert!(compiled.key("").is_none());
        assert!(compiled.key("aaaaaaaaaaaaa").is_none());
    }

    #[test]
    fn wire_rules_match_the_bundle() {
        // Required fields are required, optional ones default, a later duplicate wins,
        // ids no token can carry are dropped.
        assert!(serde_json::from_str::<CompiledPolicy>(r#"{"version":1,"tenant":"a"}"#).is_err());
        let minimal: CompiledPolicy =
            serde_json::from_str(r#"{"version":1,"tenant":"a","classification":"Internal"}"#)
                .unwrap();
        assert_eq!(minimal.key_count(), 0);
        let key = r#"{"name":"NAME","hash":"h","scopes":["s"],"rateLimit":{"requests":1,"perMs":1,"burst":1}}"#;
        let json = format!(
            r#"{{"version":1,"tenant":"a","classification":"Internal","keys":{{"aaaaaaaaaaaa":{},"aaaaaaaaaaaa":{},"NOT-AN-ID":{}}}}}"#,
            key.replace("NAME", "first"),
            key.replace("NAME", "second"),
            key.replace("NAME", "bad"),
        );
        let compiled: CompiledPolicy = serde_json::from_str(&json).unwrap();
        assert_eq!(compiled.key_count(), 1);
        assert_eq!(compiled.key("aaaaaaaaaaaa").unwrap().name(), "second");
        let via_bundle = CompiledPolicy::from(serde_json::from_str::<PolicyBundle>(&json).unwrap());
        assert_eq!(via_bundle.key("aaaaaaaaaaaa").unwrap().name(), "second");
        assert_eq!(via_bundle.key_count(), 1);
    }
}
