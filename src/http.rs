//! The HTTP API of a running pipeline: its read models, queried while it
//! runs (Kafka Streams' interactive queries).
//!
//! | request | answer |
//! |---|---|
//! | `GET /v1/read-models` | the models and how many rows the tenant has in each |
//! | `GET /v1/read-models/<name>/<key>` | one row, or 404 |
//! | `GET /v1/read-models/<name>?col=value&limit=50&after=<key>&count_by=col` | a page: `items`, `next`, `total`, `counts` |
//!
//! Every request names its tenant in the `X-Tenant-Id` header (a gateway in
//! front of Vigil sets it from the caller's credentials); without one it is
//! refused, and it never sees another tenant's rows: a row of tenant B is
//! "not found" to tenant A. Row bodies are the JSON the read-model sink
//! stored, written out as they are.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use vigil_connectors::read_model::{self, ReadModels};

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

/// The API's routes over `models`.
pub fn router(models: Arc<ReadModels>) -> Router {
    Router::new()
        .route("/v1/read-models", get(index))
        .route("/v1/read-models/{name}", get(list))
        .route("/v1/read-models/{name}/{key}", get(one))
        .with_state(models)
}

/// A bound listener for the API, so the address is known (and a port in
/// use is reported) before the pipeline starts.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves `models` on `listener` until the future is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    models: Arc<ReadModels>,
) -> std::io::Result<()> {
    axum::serve(listener, router(models)).await
}
