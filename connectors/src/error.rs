//! The connectors' one error type.
//!
//! Configuration problems are found when a connector is built, before anything
//! runs, and carry the name of the offending field so the pipeline loader can
//! point at its line. Runtime failures become [`EngineError`]s.

use vigil_engine::{ConfigError, EngineError};

/// Errors building or running a connector.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// A configuration value is invalid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// An Arrow kernel failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

impl ConnectorError {
    /// A configuration error on `field`.
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConnectorError::Config(ConfigError::new(field, message))
    }

    /// Adds a hint to a configuration error.
    pub fn with_hint(self, hint: impl Into<String>) -> Self {
        match self {
            ConnectorError::Config(c) => ConnectorError::Config(c.with_hint(hint)),
            other => other,
        }
    }
}

impl From<ConnectorError> for EngineError {
    fn from(e: ConnectorError) -> Self {
        match e {
            ConnectorError::Io { path, source } => EngineError::io(path, source),
            ConnectorError::Arrow(a) => EngineError::Arrow(a),
            ConnectorError::Config(c) => EngineError::User(c.to_string()),
        }
    }
}

/// Result alias for connectors.
pub type Result<T, E = ConnectorError> = std::result::Result<T, E>;
