//! A scripted Kubernetes API for the persistence and publishing tests: an in-memory
//! Secret store with create/replace semantics (409 on conflicts), plus a log of every
//! call so a test fails when the code sends anything unexpected.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{Value, json};

/// One request the code under test sent.
#[derive(Debug, Clone)]
pub(super) struct Call {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
}

/// Objects by name; shared with the test so it can seed and inspect them.
pub(super) type Objects = Arc<Mutex<BTreeMap<String, Value>>>;

pub(super) fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": format!("scripted {reason}"), "reason": reason, "code": code})
}

/// A fake API server for namespaced Secrets (GET, POST, PUT) and server-side apply of
/// ConfigMaps (PATCH, answered by `patch`). Returns the client and a task yielding the
/// call log once the client is dropped.
pub(super) fn fake_api(
    secrets: Objects,
    patch: impl FnMut(&Call) -> (u16, Value) + Send + 'static,
) -> (kube::Client, tokio::task::JoinHandle<Vec<Call>>) {
    fake_api_with(secrets, |_, _| {}, patch)
}

/// [`fake_api`] with a hook run before each Secret call, to change the store under the
/// code's feet (another replica winning a race).
pub(super) fn fake_api_with(
    secrets: Objects,
    mut before: impl FnMut(&Call, &mut BTreeMap<String, Value>) + Send + 'static,
    mut patch: impl FnMut(&Call) -> (u16, Value) + Send + 'static,
) -> (kube::Client, tokio::task::JoinHandle<Vec<Call>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let task = tokio::spawn(async move {
        let mut calls = Vec::new();
        let mut version = 100;
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect().await.unwrap().to_bytes();
            let call = Call {
                method: parts.method.to_string(),
                path: parts.uri.path().to_string(),
                query: parts.uri.query().unwrap_or_default().to_string(),
                content_type: parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            let name = call.path.rsplit('/').next().unwrap_or_default().to_string();
            let (code, answer) = if call.path.contains("/secrets") {
                let mut store = secrets.lock().unwrap();
                before(&call, &mut store);
                match call.method.as_str() {
                    "GET" => match store.get(&name) {
                        Some(obj) => (200, obj.clone()),
                        None => (404, status(404, "NotFound")),
                    },
                    "POST" => {
                        let name = call.body["metadata"]["name"].as_str().unwrap().to_string();
                        match store.entry(name) {
                            std::collections::btree_map::Entry::Occupied(_) => {
                                (409, status(409, "AlreadyExists"))
                            }
                            std::collections::btree_map::Entry::Vacant(slot) => {
                                version += 1;
                                let mut obj = call.body.clone();
                                obj["metadata"]["resourceVersion"] = json!(version.to_string());
                                slot.insert(obj.clone());
                                (201, obj)
                            }
                        }
                    }
                    "PUT" => match store.get(&name) {
                        Some(existing)
                            if existing["metadata"]["resourceVersion"]
                                == call.body["metadata"]["resourceVersion"] =>
                        {
                            version += 1;
                            let mut obj = call.body.clone();
                            obj["metadata"]["resourceVersion"] = json!(version.to_string());
                            store.insert(name, obj.clone());
                            (200, obj)
                        }
                        Some(_) => (409, status(409, "Conflict")),
                        None => (404, status(404, "NotFound")),
                    },
                    other => panic!("unexpected {other} on a Secret"),
                }
            } else {
                patch(&call)
            };
            calls.push(call);
            let response = Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap();
            send.send_response(response);
        }
        calls
    });
    (kube::Client::new(service, "default"), task)
}
