//! The engine's one error type.
//!
//! Errors are classified by who must act, as the user-facing CLI reports them:
//! a [`ErrorDomain::User`] error is fixed by changing the pipeline or its input,
//! an [`ErrorDomain::External`] one by fixing a system Vigil talks to (a disk, a
//! broker), and an [`ErrorDomain::Internal`] one is a bug in Vigil.

use arrow::error::ArrowError;
use datafusion::error::DataFusionError;

/// Who must act on an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorDomain {
    /// The pipeline author or the data: a bad expression, a malformed record.
    User,
    /// A system outside Vigil: file system, network, broker.
    External,
    /// Vigil itself: a broken invariant.
    Internal,
}

/// A configuration value that is invalid, named as the user wrote it.
///
/// Connectors and operators both report configuration problems this way, so
/// the pipeline loader can turn any of them into a located diagnostic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    /// The field at fault, relative to the node: `schema.fields[2].type`, `key[1]`.
    pub field: String,
    /// What is wrong, lowercase, PostgreSQL style.
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
}

impl ConfigError {
    /// An error on `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
            hint: None,
        }
    }

    /// Adds a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// Errors raised by the dataflow runtime and by operators running inside it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The pipeline or its data is wrong in a way the user must fix.
    #[error("{0}")]
    User(String),
    /// A system outside Vigil failed.
    #[error("{context}: {source}")]
    Io {
        /// What Vigil was doing.
        context: String,
        /// The underlying failure.
        #[source]
        source: std::io::Error,
    },
    /// An Arrow kernel failed.
    #[error("arrow: {0}")]
    Arrow(#[from] ArrowError),
    /// A DataFusion expression or kernel failed.
    #[error("datafusion: {0}")]
    DataFusion(#[from] Box<DataFusionError>),
    /// An operator task failed; names the operator subtask.
    #[error("operator {operator}[{subtask}]: {source}")]
    Operator {
        /// Node name in the pipeline.
        operator: String,
        /// Subtask index.
        subtask: usize,
        /// What went wrong.
        #[source]
        source: Box<EngineError>,
    },
    /// A downstream task went away while this one still had data for it.
    #[error("channel to {0} closed unexpectedly")]
    ChannelClosed(String),
    /// A checkpoint could not be taken or restored.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A broken invariant inside Vigil.
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// Who must act on this error.
    pub fn domain(&self) -> ErrorDomain {
        match self {
            EngineError::User(_) => ErrorDomain::User,
            EngineError::Io { .. } => ErrorDomain::External,
            EngineError::Arrow(_) | EngineError::DataFusion(_) => ErrorDomain::User,
            EngineError::Operator { source, .. } => source.domain(),
            EngineError::ChannelClosed(_) | EngineError::Internal(_) => ErrorDomain::Internal,
            EngineError::Checkpoint(_) => ErrorDomain::External,
        }
    }

    /// Wraps an I/O error with what Vigil was doing when it happened.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        EngineError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<DataFusionError> for EngineError {
    fn from(e: DataFusionError) -> Self {
        EngineError::DataFusion(Box::new(e))
    }
}

/// Result alias for the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
