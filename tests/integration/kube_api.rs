//! A double of the Kubernetes API server, in the test process.
//!
//! No API server can be installed where these tests run, so this one
//! stands in for it: an HTTP server that kube-rs's real client talks to
//! over TCP, with the verbs and kinds the operator uses and the semantics
//! it relies on. It keeps any kind as JSON under its URL path:
//! - get, list (label selectors) and watch (a newline-delimited event
//!   stream from a resourceVersion, as the kube-rs watcher reads it);
//! - create (uid, generation, resourceVersion; 409 if it exists);
//! - replace and JSON merge patch, refused with 409 when the
//!   resourceVersion sent is not the current one; `metadata.generation`
//!   goes up when `spec` changes;
//! - the `status` subresource, which alone writes `status`;
//! - delete: with finalizers it only sets `deletionTimestamp`, and the
//!   object goes when the last finalizer is removed; then the objects it
//!   owns go too (the garbage collector's cascade).
//!
//! No admission, no defaulting, no schema validation (CI checks manifests
//! against Kubernetes' schemas with kubernetes-validate instead), and no
//! controllers: a test plays the StatefulSet controller and the kubelet.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::task::JoinSet;

/// One stored change, as a watch reports it.
#[derive(Clone)]
struct Change {
    rv: u64,
    collection: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    uid: u64,
    /// By collection (`group/version/plural`), then (namespace, name).
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    log: Vec<Change>,
    /// Mutating requests, `VERB path`, in order.
    writes: Vec<String>,
    /// Every request, `VERB path`, in order.
    requests: Vec<String>,
}

struct Shared {
    store: Mutex<Store>,
    changed: tokio::sync::watch::Sender<u64>,
}

/// The API server double.
pub struct FakeApi {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    _server: JoinSet<()>,
}

/// A parsed request path.
struct Target {
    collection: String,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        rest => (None, rest),
    };
    let (plural, name, status) = match rest {
        [plural] => (*plural, None, false),
        [plural, name] => (*plural, Some(name.to_string()), false),
        [plural, name, "status"] => (*plural, Some(name.to_string()), true),
        _ => return None,
    };
    Some(Target {
        collection: format!("{group}/{version}/{plural}"),
        namespace,
        name,
        status,
    })
}

fn status(code: u16, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    respond(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &body,
    )
}

fn respond(code: StatusCode, body: &Value) -> Response {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap_or_default()
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            (
                k.to_string(),
                url::form_urlencoded::parse(format!("v={v}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

/// Whether `object`'s labels satisfy a selector of `key`, `key=value`,
/// `key!=value` and `!key` terms.
fn selects(selector: Option<&String>, object: &Value) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let labels = &object["metadata"]["labels"];
    selector.split(',').all(|term| {
        if let Some(key) = term.strip_prefix('!') {
            labels.get(key).is_none()
        } else if let Some((k, v)) = term.split_once("!=") {
            labels.get(k).and_then(Value::as_str) != Some(v)
        } else if let Some((k, v)) = term.split_once('=') {
            labels.get(k).and_then(Value::as_str) == Some(v.trim_start_matches('='))
        } else {
            labels.get(term).is_some()
        }
    })
}

/// RFC 7386.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            if let Some(t) = target.as_object_mut() {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

impl Store {
    fn record(&mut self, collection: &str, namespace: &str, kind: &'static str, object: &Value) {
        self.log.push(Change {
            rv: self.rv,
            collection: collection.to_string(),
            namespace: namespace.to_string(),
            kind,
            object: object.clone(),
        });
    }

    fn bump(&mut self, object: &mut Value) {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
    }

    /// Stores `object`, or removes it if it is being deleted and has no
    /// finalizers left.
    fn put(&mut self, collection: &str, ns: &str, name: &str, mut object: Value) -> Value {
        self.bump(&mut object);
        let gone = object["metadata"].get("deletionTimestamp").is_some()
            && object["metadata"]["finalizers"]
                .as_array()
                .is_none_or(|f| f.is_empty());
        if gone {
            self.remove(collection, ns, name);
        } else {
            self.objects
                .entry(collection.to_string())
                .or_default()
                .insert((ns.to_string(), name.to_string()), object.clone());
            self.record(collection, ns, "MODIFIED", &object);
        }
        object
    }

    /// Removes an object and, as the garbage collector would, what it owns.
    fn remove(&mut self, collection: &str, ns: &str, name: &str) {
        let Some(mut object) = self
            .objects
            .get_mut(collection)
            .and_then(|c| c.remove(&(ns.to_string(), name.to_string())))
        else {
            return;
        };
        self.bump(&mut object);
        self.record(collection, ns, "DELETED", &object);
        let uid = object["metadata"]["uid"].clone();
        let owned: Vec<(String, String, String)> = self
            .objects
            .iter()
            .flat_map(|(c, objects)| {
                let uid = &uid;
                objects.iter().filter_map(move |((ons, oname), o)| {
                    let owners = o["metadata"]["ownerReferences"].as_array()?;
                    owners
                        .iter()
                        .any(|r| r["uid"] == *uid)
                        .then(|| (c.clone(), ons.clone(), oname.clone()))
                })
            })
            .collect();
        for (c, ons, oname) in owned {
            self.remove(&c, &ons, &oname);
        }
    }
}

impl FakeApi {
    /// Starts the double on a free loopback port.
    pub async fn start() -> Self {
        let (changed, _) = tokio::sync::watch::channel(0);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changed,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the API server double");
        let addr = listener.local_addr().expect("its address");
        let app = axum::Router::new().fallback({
            let shared = shared.clone();
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let shared = shared.clone();
                async move { handle(&shared, method, uri, headers, body).await }
            }
        });
        let mut server = JoinSet::new();
        server.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            shared,
            _server: server,
        }
    }

    /// A kube-rs client of the double.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(
            format!("http://{}", self.addr)
                .parse()
                .expect("the double's URL"),
        );
        kube::Client::try_from(config).expect("a client")
    }

    /// The object `name` of `collection` (`group/version/plural`).
    pub fn get(&self, collection: &str, ns: &str, name: &str) -> Option<Value> {
        self.shared
            .store
            .lock()
            .objects
            .get(collection)
            .and_then(|c| c.get(&(ns.to_string(), name.to_string())))
            .cloned()
    }

    /// Every object of `collection`.
    pub fn list(&self, collection: &str) -> Vec<Value> {
        self.shared
            .store
            .lock()
            .objects
            .get(collection)
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Mutating requests so far (`VERB path`).
    pub fn writes(&self) -> Vec<String> {
        self.shared.store.lock().writes.clone()
    }

    /// Every request so far (`VERB path`), watches included.
    pub fn requests(&self) -> Vec<String> {
        self.shared.store.lock().requests.clone()
    }

    /// Sets the `status` of an object as its controller would.
    pub fn set_status(&self, collection: &str, ns: &str, name: &str, status: Value) {
        let mut store = self.shared.store.lock();
        let Some(mut object) = store
            .objects
            .get(collection)
            .and_then(|c| c.get(&(ns.to_string(), name.to_string())))
            .cloned()
        else {
            return;
        };
        if object["status"] == status {
            return;
        }
        object["status"] = status;
        store.put(collection, ns, name, object);
        let rv = store.rv;
        drop(store);
        self.shared.changed.send_replace(rv);
    }
}

/// Kinds whose `status` only the subresource writes.
fn has_status_subresource(collection: &str) -> bool {
    collection.ends_with("/vigilpipelines") || collection.ends_with("/statefulsets")
}

async fn handle(
    shared: &Arc<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(target) = parse(uri.path()) else {
        return status(404, "NotFound", format!("no such path {}", uri.path()));
    };
    let q = query(&uri);
    shared
        .store
        .lock()
        .requests
        .push(format!("{method} {}", uri.path()));
    if method == Method::GET && target.name.is_none() {
        if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
            return watch(shared, target, q);
        }
        return list(shared, &target, &q);
    }
    let ns = target.namespace.clone().unwrap_or_default();
    let mut store = shared.store.lock();
    if method != Method::GET {
        store.writes.push(format!("{method} {}", uri.path()));
    }
    let current = target.name.as_ref().and_then(|n| {
        store
            .objects
            .get(&target.collection)
            .and_then(|c| c.get(&(ns.clone(), n.clone())))
            .cloned()
    });
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let rv_sent = |v: &Value| {
        v["metadata"]["resourceVersion"]
            .as_str()
            .map(str::to_string)
    };
    let conflict = |current: &Value, sent: Option<String>| {
        sent.is_some_and(|s| Some(s.as_str()) != current["metadata"]["resourceVersion"].as_str())
    };
    let response = match (method.clone(), &target.name, current) {
        (Method::GET, Some(name), None) | (_, Some(name), None) if method != Method::POST => {
            status(
                404,
                "NotFound",
                format!("{} {name:?} not found", target.collection),
            )
        }
        (Method::GET, Some(_), Some(object)) => respond(StatusCode::OK, &object),
        (Method::POST, _, _) => {
            let Some(mut object) = parsed else {
                return status(400, "BadRequest", "the body is not JSON".into());
            };
            let name = object["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if name.is_empty() {
                return status(422, "Invalid", "metadata.name is required".into());
            }
            let exists = store
                .objects
                .get(&target.collection)
                .is_some_and(|c| c.contains_key(&(ns.clone(), name.clone())));
            if exists {
                return status(409, "AlreadyExists", format!("{name:?} already exists"));
            }
            store.uid += 1;
            let uid = format!("00000000-0000-4000-8000-{:012}", store.uid);
            let meta = &mut object["metadata"];
            meta["uid"] = json!(uid);
            meta["namespace"] = json!(ns);
            meta["generation"] = json!(1);
            meta["creationTimestamp"] = json!(now());
            if has_status_subresource(&target.collection) {
                if let Some(o) = object.as_object_mut() {
                    o.remove("status");
                }
            }
            store.bump(&mut object);
            store
                .objects
                .entry(target.collection.clone())
                .or_default()
                .insert((ns.clone(), name.clone()), object.clone());
            store.record(&target.collection, &ns, "ADDED", &object);
            respond(StatusCode::CREATED, &object)
        }
        (Method::PUT | Method::PATCH, Some(name), Some(current)) => {
            let Some(sent) = parsed else {
                return status(400, "BadRequest", "the body is not JSON".into());
            };
            let mut next = if method == Method::PUT {
                sent.clone()
            } else {
                let kind = headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if kind != "application/merge-patch+json" {
                    return status(415, "UnsupportedMediaType", format!("patch type {kind}"));
                }
                let mut next = current.clone();
                merge(&mut next, &sent);
                next
            };
            if conflict(&current, rv_sent(&sent)) {
                return status(
                    409,
                    "Conflict",
                    format!("the object has been modified; {name:?} is at a newer resourceVersion"),
                );
            }
            // What a write may not change.
            for k in [
                "uid",
                "creationTimestamp",
                "namespace",
                "name",
                "generation",
            ] {
                next["metadata"][k] = current["metadata"][k].clone();
            }
            if current["metadata"].get("deletionTimestamp").is_some() {
                next["metadata"]["deletionTimestamp"] =
                    current["metadata"]["deletionTimestamp"].clone();
            }
            if target.status {
                let status = next["status"].clone();
                next = current.clone();
                next["status"] = status;
            } else {
                if has_status_subresource(&target.collection) {
                    next["status"] = current["status"].clone();
                }
                if next["spec"] != current["spec"] {
                    let g = current["metadata"]["generation"].as_i64().unwrap_or(1);
                    next["metadata"]["generation"] = json!(g + 1);
                }
            }
            let stored = store.put(&target.collection, &ns, name, next);
            respond(StatusCode::OK, &stored)
        }
        (Method::DELETE, Some(name), Some(mut current)) => {
            let finalizers = current["metadata"]["finalizers"]
                .as_array()
                .is_some_and(|f| !f.is_empty());
            if finalizers {
                if current["metadata"].get("deletionTimestamp").is_none() {
                    current["metadata"]["deletionTimestamp"] = json!(now());
                    current = store.put(&target.collection, &ns, name, current);
                }
            } else {
                store.remove(&target.collection, &ns, name);
            }
            respond(StatusCode::OK, &current)
        }
        _ => status(405, "MethodNotAllowed", format!("{method} {}", uri.path())),
    };
    let rv = store.rv;
    drop(store);
    shared.changed.send_replace(rv);
    response
}

fn list(shared: &Arc<Shared>, target: &Target, q: &BTreeMap<String, String>) -> Response {
    let store = shared.store.lock();
    let items: Vec<Value> = store
        .objects
        .get(&target.collection)
        .map(|c| {
            c.iter()
                .filter(|((ns, _), _)| target.namespace.as_ref().is_none_or(|t| t == ns))
                .map(|(_, o)| o.clone())
                .filter(|o| selects(q.get("labelSelector"), o))
                .collect()
        })
        .unwrap_or_default();
    respond(
        StatusCode::OK,
        &json!({
            "apiVersion": "v1",
            "kind": "List",
            "metadata": { "resourceVersion": store.rv.to_string() },
            "items": items,
        }),
    )
}

fn watch(shared: &Arc<Shared>, target: Target, q: BTreeMap<String, String>) -> Response {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(290u64);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let selector = q.get("labelSelector").cloned();
    let receiver = shared.changed.subscribe();
    let shared = shared.clone();
    let stream = futures::stream::unfold(
        (from, receiver, false),
        move |(mut last, mut receiver, done)| {
            let shared = shared.clone();
            let selector = selector.clone();
            let collection = target.collection.clone();
            let namespace = target.namespace.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    let lines: String = {
                        let store = shared.store.lock();
                        let fresh: Vec<&Change> =
                            store.log.iter().filter(|c| c.rv > last).collect();
                        let mut out = String::new();
                        for c in &fresh {
                            if c.collection == collection
                                && namespace.as_ref().is_none_or(|n| *n == c.namespace)
                                && selects(selector.as_ref(), &c.object)
                            {
                                out.push_str(
                                    &json!({ "type": c.kind, "object": c.object }).to_string(),
                                );
                                out.push('\n');
                            }
                        }
                        if let Some(c) = fresh.last() {
                            last = c.rv;
                        }
                        out
                    };
                    if !lines.is_empty() {
                        return Some((
                            Ok::<_, std::io::Error>(Bytes::from(lines)),
                            (last, receiver, false),
                        ));
                    }
                    match tokio::time::timeout_at(deadline, receiver.changed()).await {
                        Ok(Ok(())) => continue,
                        _ => return None,
                    }
                }
            }
        },
    );
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}
