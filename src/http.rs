//! The HTTP API of a running pipeline: its health and metrics, its read
//! models, queried while it runs (Kafka Streams' interactive queries), and
//! its checkpoints.
//!
//! | request | answer |
//! |---|---|
//! | `GET /health` | 200 while the process serves (liveness) |
//! | `GET /ready` | 200 when running, sources assigned and none stalled; 503 with the reasons otherwise |
//! | `GET /metrics` | Prometheus text: per-subtask counters, channel fill, watermarks, state, lag, latency histograms, checkpoints |
//! | `GET /v1/pipeline` | the running graph with each node's counters, rates and latencies |
//! | `GET /v1/checkpoints` | checkpoint health: storage, restarts, the latest checkpoint, failures |
//! | `POST /v1/savepoints?name=<name>` | takes a savepoint and answers once it is stored (`vigil savepoint`) |
//! | `GET /v1/read-models` | the models and how many rows the tenant has in each |
//! | `GET /v1/read-models/<name>/<key>` | one row, or 404 |
//! | `GET /v1/read-models/<name>?col=value&limit=50&after=<key>&count_by=col` | a page: `items`, `next`, `total`, `counts` |
//!
//! Read-model requests name their tenant in the `X-Tenant-Id` header (a gateway in
//! front of Vigil sets it from the caller's credentials); without one it is
//! refused, and it never sees another tenant's rows: a row of tenant B is
//! "not found" to tenant A. Row bodies are the JSON the read-model sink
//! stored, written out as they are.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use parking_lot::Mutex;
use vigil_connectors::read_model::{self, ReadModels};
use vigil_engine::{CheckpointHandle, EngineError};

use crate::observe::Observer;

/// Header naming the caller's tenant.
pub const TENANT_HEADER: &str = "x-tenant-id";

/// Rows per page unless `limit` says otherwise, and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

fn json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    json(status, serde_json::json!({ "error": message }).to_string())
}

fn tenant(headers: &HeaderMap) -> Option<String> {
    match headers.get(TENANT_HEADER).map(|v| v.to_str()) {
        Some(Ok(t)) if !t.trim().is_empty() => Some(t.trim().to_string()),
        _ => None,
    }
}

fn no_tenant() -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "name the tenant in the X-Tenant-Id header",
    )
}

async fn index(State(models): State<Arc<ReadModels>>, headers: HeaderMap) -> Response {
    let Some(tenant) = tenant(&headers) else {
        return no_tenant();
    };
    let list: Vec<serde_json::Value> = models
        .names()
        .into_iter()
        .filter_map(|n| models.get(&n))
        .map(|m| serde_json::json!({ "name": m.name(), "rows": m.count(&tenant) }))
        .collect();
    json(
        StatusCode::OK,
        serde_json::json!({ "models": list }).to_string(),
    )
}

async fn one(
    State(models): State<Arc<ReadModels>>,
    Path((name, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(tenant) = tenant(&headers) else {
        return no_tenant();
    };
    let Some(model) = models.get(&name) else {
        return error(StatusCode::NOT_FOUND, &format!("no read model {name:?}"));
    };
    match model.get(&tenant, &key) {
        Some(row) => json(StatusCode::OK, row),
        None => error(StatusCode::NOT_FOUND, &format!("no {key:?} in {name:?}")),
    }
}

async fn list(
    State(models): State<Arc<ReadModels>>,
    Path(name): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let Some(tenant) = tenant(&headers) else {
        return no_tenant();
    };
    let Some(model) = models.get(&name) else {
        return error(StatusCode::NOT_FOUND, &format!("no read model {name:?}"));
    };
    let mut q = read_model::Query {
        limit: DEFAULT_LIMIT,
        ..read_model::Query::default()
    };
    for (k, v) in params {
        match k.as_str() {
            "limit" => match v.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => q.limit = n,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("limit must be a number from 1 to {MAX_LIMIT}"),
                    )
                }
            },
            "after" => q.after = Some(v),
            "count_by" => q.count_by = Some(v),
            // The tenant comes from the header only.
            "tenant_id" => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "the tenant comes from the X-Tenant-Id header, not the query",
                )
            }
            _ => q.filters.push((k, v)),
        }
    }
    match model.list(&tenant, &q) {
        Ok(page) => {
            let mut body =
                String::with_capacity(page.items.iter().map(|i| i.len() + 1).sum::<usize>() + 128);
            body.push_str("{\"items\":[");
            body.push_str(&page.items.join(","));
            body.push_str("],\"next\":");
            body.push_str(&serde_json::to_string(&page.next).unwrap_or_else(|_| "null".into()));
            body.push_str(&format!(",\"total\":{}", page.total));
            if q.count_by.is_some() {
                body.push_str(",\"counts\":");
                body.push_str(&serde_json::to_string(&page.counts).unwrap_or_else(|_| "{}".into()));
            }
            body.push('}');
            json(StatusCode::OK, body)
        }
        Err(e) => error(StatusCode::BAD_REQUEST, &e),
    }
}

/// What the API knows of the running pipeline: its checkpoints and its
/// [`Observer`]; one for the whole run, attached to each start of the
/// pipeline in turn.
#[derive(Debug)]
pub struct Control {
    location: Option<String>,
    current: Mutex<Option<CheckpointHandle>>,
    restarts: Mutex<(u32, Option<String>)>,
    /// Readiness, rates and metrics of the run.
    pub observer: Arc<Observer>,
}

impl Control {
    /// For checkpoints stored at `location` (none: in memory).
    pub fn new(location: Option<String>, observer: Arc<Observer>) -> Self {
        Self {
            location,
            current: Mutex::new(None),
            restarts: Mutex::new((0, None)),
            observer,
        }
    }

    /// For serving the API of `plan` run outside [`crate::run::run`]
    /// (embedding, benchmarks): checkpoints in memory, the system clock,
    /// a 30 s stall timeout.
    pub fn for_plan(plan: &crate::pipeline::Plan) -> Self {
        let observer = Observer::new(
            &plan.name,
            &plan.graph,
            Arc::new(vigil_engine::SystemClock),
            std::time::Duration::from_secs(30),
        );
        Self::new(None, Arc::new(observer))
    }

    /// The pipeline (re)started with these checkpoints and counters.
    pub fn attach(&self, handle: CheckpointHandle, metrics: Arc<vigil_engine::MetricsRegistry>) {
        *self.current.lock() = Some(handle);
        self.observer.attach(metrics);
    }

    /// The id of the latest checkpoint completed since the pipeline last
    /// (re)started, if any.
    pub fn latest_checkpoint(&self) -> Option<u64> {
        self.current
            .lock()
            .as_ref()
            .and_then(|h| h.latest())
            .map(|c| c.id)
    }

    /// The pipeline stopped.
    pub fn detach(&self) {
        *self.current.lock() = None;
        self.observer.detach();
    }

    /// Times the pipeline was restarted.
    pub fn restarts(&self) -> u32 {
        self.restarts.lock().0
    }

    /// The pipeline failed with `error` and is being restarted.
    pub fn restarted(&self, error: &EngineError) {
        let mut r = self.restarts.lock();
        r.0 += 1;
        r.1 = Some(error.to_string());
    }
}

#[derive(Clone)]
struct Api {
    models: Arc<ReadModels>,
    control: Arc<Control>,
}

async fn checkpoints(State(api): State<Api>) -> Response {
    let handle = api.control.current.lock().clone();
    let (restarts, last_error) = api.control.restarts.lock().clone();
    let body = serde_json::json!({
        "storage": api.control.location,
        "running": handle.is_some(),
        "restarts": restarts,
        "last_failure": last_error,
        "checkpoints": handle.map(|h| h.stats()),
    });
    json(StatusCode::OK, body.to_string())
}

async fn health() -> Response {
    json(StatusCode::OK, r#"{"status":"ok"}"#.to_string())
}

async fn ready(State(api): State<Api>) -> Response {
    let r = api.control.observer.readiness();
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, serde_json::to_string(&r).unwrap_or_default())
}

async fn metrics(State(api): State<Api>) -> Response {
    let stats = api.control.current.lock().as_ref().map(|h| h.stats());
    let body = api
        .control
        .observer
        .prometheus(stats.as_ref(), api.control.restarts());
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        body,
    )
        .into_response()
}

async fn pipeline(State(api): State<Api>) -> Response {
    let mut v = api.control.observer.pipeline_json();
    if let serde_json::Value::Object(o) = &mut v {
        let stats = api.control.current.lock().as_ref().map(|h| h.stats());
        o.insert("checkpoints".into(), serde_json::json!(stats));
        o.insert("restarts".into(), serde_json::json!(api.control.restarts()));
    }
    json(StatusCode::OK, v.to_string())
}

/// How long a savepoint request waits for the savepoint to be stored.
const SAVEPOINT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

async fn savepoint(
    State(api): State<Api>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let Some(name) = params
        .iter()
        .find(|(k, _)| k == "name")
        .map(|(_, v)| v.clone())
    else {
        return error(StatusCode::BAD_REQUEST, "name the savepoint: ?name=<name>");
    };
    let Some(location) = api.control.location.clone() else {
        return error(
            StatusCode::CONFLICT,
            "this run keeps checkpoints in memory; start it with --checkpoints to take savepoints",
        );
    };
    let Some(handle) = api.control.current.lock().clone() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the pipeline is not running",
        );
    };
    let id = match handle.savepoint(&name) {
        Ok(id) => id,
        Err(e @ EngineError::User(_)) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    match tokio::time::timeout(SAVEPOINT_TIMEOUT, handle.wait_for(id)).await {
        Ok(done) if done.id == id => json(
            StatusCode::OK,
            serde_json::json!({ "savepoint": name, "checkpoint": id, "storage": location })
                .to_string(),
        ),
        Ok(_) | Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            &format!("savepoint {name:?} (checkpoint {id}) was not stored in time"),
        ),
    }
}

async fn index_api(State(api): State<Api>, headers: HeaderMap) -> Response {
    index(State(api.models), headers).await
}

async fn one_api(
    State(api): State<Api>,
    path: Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    one(State(api.models), path, headers).await
}

async fn list_api(
    State(api): State<Api>,
    path: Path<String>,
    query: Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    list(State(api.models), path, query, headers).await
}

/// The API's routes over `models` and the run's `control`.
pub fn router(models: Arc<ReadModels>, control: Arc<Control>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/pipeline", get(pipeline))
        .route("/v1/read-models", get(index_api))
        .route("/v1/read-models/{name}", get(list_api))
        .route("/v1/read-models/{name}/{key}", get(one_api))
        .route("/v1/checkpoints", get(checkpoints))
        .route("/v1/savepoints", post(savepoint))
        .with_state(Api { models, control })
}

/// A bound listener for the API, so the address is known (and a port in
/// use is reported) before the pipeline starts.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves the API on `listener` until the future is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    models: Arc<ReadModels>,
    control: Arc<Control>,
) -> std::io::Result<()> {
    axum::serve(listener, router(models, control)).await
}
