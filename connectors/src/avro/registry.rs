//! The Confluent Schema Registry, over its REST API (schema_registry_converter
//! does the HTTP): writer schemas by id for decoding, and registration of the
//! schemas Vigil writes.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use schema_registry_converter::async_impl::schema_registry::{
    get_schema_by_id, post_schema, SrSettings,
};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};
use serde::Deserialize;

use crate::error::{ConnectorError, Result};

/// Where the registry is, as pipeline authors write it.
///
/// ```yaml
/// registry:
///   url: ${SCHEMA_REGISTRY_URL:-http://127.0.0.1:8081}
///   username: ${SR_USER}
///   password: ${SR_PASSWORD}
/// ```
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base URL, `http://` or `https://`; several separated by commas are
    /// tried in turn.
    pub url: String,
    /// Basic-auth user (Confluent Cloud: the API key).
    #[serde(default)]
    pub username: Option<String>,
    /// Basic-auth password (Confluent Cloud: the API secret).
    #[serde(default)]
    pub password: Option<String>,
    /// Time limit of one request, in milliseconds (default 10 s).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

impl std::fmt::Debug for RegistryConfig {
    // The password never reaches logs, errors or `vigil explain`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// What the registry says of a schema id.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// The schema's JSON.
    Found(String),
    /// The registry does not have it (the reason, for the dead letter).
    Unknown(String),
}

/// A registry client with a cache of the schemas it has looked up.
pub struct Registry {
    settings: SrSettings,
    url: String,
    cache: Mutex<HashMap<u32, Lookup>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("url", &self.url).finish()
    }
}

/// Attempts at a request that failed for a reason other than the answer
/// (network, 5xx) before the pipeline fails.
const ATTEMPTS: u32 = 5;

impl Registry {
    /// A client for `config`; `field` names the setting in errors.
    pub fn new(config: &RegistryConfig, field: &str) -> Result<Self> {
        let urls: Vec<&str> = config
            .url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        let Some((first, rest)) = urls.split_first() else {
            return Err(ConnectorError::config(
                format!("{field}.url"),
                "the registry URL is empty",
            ));
        };
        for u in &urls {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(ConnectorError::config(
                    format!("{field}.url"),
                    format!("registry URL {u:?} is not http:// or https://"),
                ));
            }
        }
        let mut builder = SrSettings::new_builder(first.trim_end_matches('/').to_string());
        for u in rest {
            builder.add_url(u.trim_end_matches('/').to_string());
        }
        if let Some(user) = &config.username {
            builder.set_basic_authorization(user, config.password.as_deref());
        }
        builder.set_timeout(Duration::from_millis(config.timeout_ms));
        let settings = builder.build().map_err(|e| {
            ConnectorError::config(
                field,
                format!("cannot set up the registry client: {}", e.error),
            )
        })?;
        Ok(Self {
            settings,
            url: config.url.clone(),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The schema registered under `id`; looked up once, then cached.
    pub async fn schema(&self, id: u32) -> Result<Lookup> {
        if let Some(l) = self.cache.lock().get(&id) {
            return Ok(l.clone());
        }
        let lookup = retry(&self.url, || get_schema_by_id(id, &self.settings))
            .await
            .map(|s| match s {
                Ok(registered) if registered.schema_type == SchemaType::Avro => {
                    Lookup::Found(registered.schema)
                }
                Ok(registered) => Lookup::Unknown(format!(
                    "schema id {id} is a {:?} schema, not Avro",
                    registered.schema_type
                )),
                Err(reason) => Lookup::Unknown(format!("schema id {id}: {reason}")),
            })?;
        self.cache.lock().insert(id, lookup.clone());
        Ok(lookup)
    }

    /// Registers `schema` under `subject` (or finds it registered) and
    /// returns its id.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32> {
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, schema.to_string());
        match retry(&self.url, || {
            post_schema(&self.settings, subject.to_string(), supplied.clone())
        })
        .await?
        {
            Ok(registered) => Ok(registered.id),
            Err(reason) => Err(ConnectorError::Io {
                path: format!("registry {} refused the schema of {subject}", self.url),
                source: std::io::Error::other(reason),
            }),
        }
    }
}

/// Runs `call` until it gets an answer: `Ok(Ok(_))` on success,
/// `Ok(Err(reason))` when the registry answered with a refusal (4xx), and
/// `Err` when it could not be reached after [`ATTEMPTS`] tries with backoff.
async fn retry<T, F, Fut>(url: &str, call: F) -> Result<std::result::Result<T, String>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, SRCError>>,
{
    let mut backoff = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match call().await {
            Ok(v) => return Ok(Ok(v)),
            Err(e) if is_refusal(&e) => return Ok(Err(describe(&e))),
            Err(e) if attempt >= ATTEMPTS => {
                return Err(ConnectorError::Io {
                    path: format!("schema registry {url} unreachable"),
                    source: std::io::Error::other(describe(&e)),
                })
            }
            Err(e) => {
                tracing::warn!(registry = %url, attempt, error = %describe(&e), "schema registry request failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                attempt += 1;
            }
        }
    }
}

/// A 4xx answer: the registry was reached and said no.
fn is_refusal(e: &SRCError) -> bool {
    (400..500).any(|code| e.error.contains(&format!("status {code}")))
}

fn describe(e: &SRCError) -> String {
    match &e.cause {
        Some(c) => format!("{}: {c}", e.error),
        None => e.error.clone(),
    }
}
