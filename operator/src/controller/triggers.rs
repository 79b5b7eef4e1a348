//! Which watch events wake a reconcile: an object whose fingerprint (what the
//! reconciler reads of it) changed since it was last seen, a new one, and every deleted
//! one. Status writes, the operator's own included, change no fingerprint, so they
//! wake nothing. kube-runtime's predicate filter would drop most deletions (their hashed
//! fields do not change), which would leave a deleted object the operator keeps
//! unrestored until the next resync.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::pin::Pin;

use futures::{Stream, StreamExt, future};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Identifies one incarnation of an object: a re-created one is new.
type ObjectKey = (Option<String>, Option<String>, Option<String>);

fn key_of<K: Resource>(object: &K) -> ObjectKey {
    let meta = object.meta();
    (meta.namespace.clone(), meta.name.clone(), meta.uid.clone())
}

/// A stream of objects that wake reconciles.
pub type Trigger<K> = Pin<Box<dyn Stream<Item = Result<K, watcher::Error>> + Send>>;

/// Which objects wake a reconcile besides changed and deleted ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum New {
    /// New objects wake it too.
    Wake,
    /// Objects the reconciler itself creates: their creation is no news to it.
    Ignore,
}

/// The objects of `events` that a reconciler must look at again (see the module).
pub fn changes<K, S, F>(
    events: S,
    fingerprint: F,
    new: New,
) -> impl Stream<Item = Result<K, watcher::Error>>
where
    K: Resource,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    F: Fn(&K) -> u64,
{
    let mut seen: HashMap<ObjectKey, u64> = HashMap::new();
    events.filter_map(move |event| {
        let wake = match event {
            Err(e) => Some(Err(e)),
            Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object)) => {
                let now = fingerprint(&object);
                match seen.insert(key_of(&object), now) {
                    Some(before) if before == now => None,
                    None if new == New::Ignore => None,
                    _ => Some(Ok(object)),
                }
            }
            Ok(watcher::Event::Delete(object)) => {
                seen.remove(&key_of(&object));
                Some(Ok(object))
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
        };
        future::ready(wake)
    })
}

/// A reflector over `api` (its cache is returned) whose changes by `fingerprint` are
/// the trigger: the cache holds an event before the reconcile it wakes runs.
pub fn cached<K>(
    api: Api<K>,
    config: watcher::Config,
    fingerprint: fn(&K) -> u64,
    new: New,
) -> (Trigger<K>, Store<K>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    // Nothing here reads managed fields, and they are much of a small object's size
    // (these caches hold thousands of Roles and RBAC objects with 1000 Tenants).
    let events = watcher(api, config)
        .default_backoff()
        .modify(|object| object.meta_mut().managed_fields = None);
    let events = reflector::reflector(writer, events);
    (Box::pin(changes(events, fingerprint, new)), store)
}

/// Objects of `api` as they appear and disappear (their changes wake nothing).
pub fn created_or_deleted<K>(api: Api<K>) -> Trigger<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let events = watcher(api, watcher::Config::default()).default_backoff();
    Box::pin(changes(events, |_: &K| 0, New::Wake))
}

/// What a reconciler reads of an object without a generation (RBAC objects): all of
/// it but the metadata, plus its labels and owners.
pub fn content_and_ownership<K: Resource + Serialize>(object: &K) -> u64 {
    let mut value = serde_json::to_value(object).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.remove("metadata");
    }
    hash_of(&(value.to_string(), spec_and_ownership(object)))
}

/// A fingerprint of `value`.
pub fn hash_of<T: Hash + ?Sized>(value: &T) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// Spec (through the generation), labels, owners and deletion: what the operator reads
/// of the objects it keeps; status changes are left out.
pub fn spec_and_ownership<K: Resource>(object: &K) -> u64 {
    let meta = object.meta();
    let owners: Vec<&str> = meta
        .owner_references
        .iter()
        .flatten()
        .map(|o| o.uid.as_str())
        .collect();
    hash_of(&(
        meta.generation,
        &meta.labels,
        owners,
        meta.deletion_timestamp.is_some(),
    ))
}

#[cfg(test)]
mod tests {
    use futures::executor::block_on;
    use k8s_openapi::api::core::v1::Namespace;
    use watcher::Event;

    use super::*;

    fn namespace(uid: &str, label: Option<&str>, phase: &str) -> Namespace {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "acme-prod", "uid": uid,
                         "labels": label.map(|l| serde_json::json!({"portcullis.dev/tenant": l}))},
            "status": {"phase": phase}
        }))
        .unwrap_or_default()
    }

    fn woken(events: Vec<Event<Namespace>>) -> Vec<String> {
        let stream = changes(
            futures::stream::iter(events.into_iter().map(Ok)),
            spec_and_ownership,
            New::Wake,
        );
        block_on(stream.collect::<Vec<_>>())
            .into_iter()
            .map(|r| match r {
                Ok(ns) => format!(
                    "{}:{}",
                    ns.metadata.uid.unwrap_or_default(),
                    ns.metadata
                        .labels
                        .and_then(|l| l.into_values().next())
                        .unwrap_or_default()
                ),
                Err(e) => e.to_string(),
            })
            .collect()
    }

    #[test]
    fn status_changes_wake_nothing_but_labels_deletions_and_new_objects_do() {
        let woke = woken(vec![
            Event::Init,
            Event::InitApply(namespace("u1", None, "Active")),
            Event::InitDone,
            Event::Apply(namespace("u1", None, "Active")),
            Event::Apply(namespace("u1", Some("acme"), "Active")),
            Event::Apply(namespace("u1", Some("acme"), "Terminating")),
            Event::Delete(namespace("u1", Some("acme"), "Terminating")),
            Event::Apply(namespace("u2", Some("acme"), "Active")),
        ]);
        assert_eq!(woke, ["u1:", "u1:acme", "u1:acme", "u2:acme"]);
    }

    #[test]
    fn objects_the_reconciler_creates_wake_it_only_when_changed_or_deleted() {
        let events = vec![
            Event::Apply(namespace("u1", Some("acme"), "Active")),
            Event::Apply(namespace("u1", Some("acme"), "Active")),
            Event::Apply(namespace("u1", Some("globex"), "Active")),
            Event::Delete(namespace("u1", Some("globex"), "Active")),
        ];
        let stream = changes(
            futures::stream::iter(events.into_iter().map(Ok)),
            spec_and_ownership,
            New::Ignore,
        );
        let woke: Vec<_> = block_on(stream.collect::<Vec<_>>())
            .into_iter()
            .filter_map(|r| r.ok()?.metadata.labels?.into_values().next())
            .collect();
        assert_eq!(woke, ["globex", "globex"]);
    }
}
