//! Requests to a running pipeline's own HTTP API: savepoints and
//! checkpoint health, the same endpoints `vigil savepoint` and people use.
//!
//! The operator reaches each pod by its DNS name under the headless
//! Service (`<pod>.<service>.<namespace>.svc:8686`); the address is a
//! template so that it can run outside the cluster, and so tests can point
//! it at a `vigil` process on loopback.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::Error;

/// How long a savepoint may take: the pipeline answers once it is stored.
const SAVEPOINT_TIMEOUT: Duration = Duration::from_secs(150);
/// How long other requests may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How the operator reaches a pod's API: a template with `{pod}`,
/// `{service}`, `{namespace}` and `{port}`, or a function (an operator
/// embedded outside the cluster, and tests, whose pods are local processes).
#[derive(Clone)]
pub enum PodAddress {
    /// A template.
    Template(String),
    /// A function.
    Resolve(Resolver),
}

/// `(namespace, service, pod)` to `host:port`.
pub type Resolver = Arc<dyn Fn(&str, &str, &str) -> String + Send + Sync>;

impl std::fmt::Debug for PodAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Template(t) => write!(f, "PodAddress({t:?})"),
            Self::Resolve(_) => write!(f, "PodAddress(<function>)"),
        }
    }
}

impl Default for PodAddress {
    fn default() -> Self {
        Self::Template("{pod}.{service}.{namespace}.svc:{port}".to_string())
    }
}

impl PodAddress {
    /// The address of `pod` of the pipeline `service` in `namespace`.
    pub fn of(&self, namespace: &str, service: &str, pod: &str) -> String {
        match self {
            Self::Template(t) => t
                .replace("{pod}", pod)
                .replace("{service}", service)
                .replace("{namespace}", namespace)
                .replace("{port}", &crate::render::HTTP_PORT.to_string()),
            Self::Resolve(f) => f(namespace, service, pod),
        }
    }
}

/// A stored savepoint, as the pipeline reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct Stored {
    /// Its name.
    pub savepoint: String,
    /// The checkpoint id it stored.
    pub checkpoint: i64,
}

/// Checkpoint health of a pod.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Health {
    /// Restarts inside the process.
    #[serde(default)]
    pub restarts: i64,
    /// Its checkpoints, while it runs.
    #[serde(default)]
    pub checkpoints: Option<Stats>,
}

/// Checkpoint counters of a pod.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Stats {
    /// Completed since the process started.
    #[serde(default)]
    pub completed: i64,
    /// Failed since the process started.
    #[serde(default)]
    pub failed: i64,
    /// The latest completed.
    #[serde(default)]
    pub latest_id: Option<i64>,
}

/// A client of pipelines' admin APIs.
#[derive(Debug, Clone, Default)]
pub struct Admin {
    client: reqwest::Client,
}

impl Admin {
    /// Asks the pipeline at `address` for savepoint `name` and waits until
    /// it is stored.
    pub async fn savepoint(&self, address: &str, name: &str) -> Result<Stored, Error> {
        let url = format!("http://{address}/v1/savepoints");
        let response = self
            .client
            .post(&url)
            .query(&[("name", name)])
            .timeout(SAVEPOINT_TIMEOUT)
            .send()
            .await
            .map_err(|e| Error::Admin(format!("savepoint {name:?} from {address}: {e}")))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|e| Error::Admin(format!("savepoint {name:?} from {address}: {e}")))?;
        if !status.is_success() {
            let reason = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or(body);
            return Err(Error::Admin(format!(
                "savepoint {name:?} from {address}: {status}: {reason}"
            )));
        }
        serde_json::from_str(&body)
            .map_err(|e| Error::Admin(format!("savepoint {name:?} from {address}: {e}: {body}")))
    }

    /// The checkpoint health of the pipeline at `address`.
    pub async fn health(&self, address: &str) -> Result<Health, Error> {
        let url = format!("http://{address}/v1/checkpoints");
        let response = self
            .client
            .get(&url)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| Error::Admin(format!("{url}: {e}")))?;
        response
            .json()
            .await
            .map_err(|e| Error::Admin(format!("{url}: {e}")))
    }
}
