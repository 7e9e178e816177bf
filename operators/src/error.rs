//! The operators' one error type.
//!
//! Building an operator checks its configuration against its input schema
//! (columns exist, expressions type-check); those errors name the field so the
//! pipeline loader can point at its line. Everything an operator meets at run
//! time becomes an [`EngineError`].

use vigil_engine::{ConfigError, EngineError};

/// Errors building an operator.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// A configuration value is invalid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// DataFusion rejected an expression.
    #[error("{0}")]
    DataFusion(#[from] Box<datafusion::error::DataFusionError>),
    /// An Arrow kernel failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// A query cannot run.
    #[error("{0}")]
    Sql(#[from] crate::sql::SqlError),
    /// The engine refused state or data (a key-group table it cannot build).
    #[error("{0}")]
    Engine(Box<EngineError>),
}

impl From<EngineError> for OperatorError {
    fn from(e: EngineError) -> Self {
        OperatorError::Engine(Box::new(e))
    }
}

impl OperatorError {
    /// A configuration error on `field`.
    pub fn config(
        field: impl Into<String>,
        message: impl Into<String>,
        hint: Option<String>,
    ) -> Self {
        OperatorError::Config(ConfigError {
            field: field.into(),
            message: message.into(),
            hint,
        })
    }

    /// A configuration error about a column that the input does not have.
    pub fn unknown_column(
        field: impl Into<String>,
        column: &str,
        schema: &arrow::datatypes::Schema,
    ) -> Self {
        Self::config(
            field,
            format!("column {column:?} is not in the input"),
            column_hint(column, schema),
        )
    }
}

/// "did you mean …?" for a column the schema lacks, or the columns it has.
pub fn column_hint(column: &str, schema: &arrow::datatypes::Schema) -> Option<String> {
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    names
        .iter()
        .map(|n| {
            (
                datafusion::common::utils::datafusion_strsim::levenshtein(column, n),
                *n,
            )
        })
        .filter(|(d, _)| *d <= 2.max(column.len() / 3))
        .min()
        .map(|(_, n)| format!("did you mean {n:?}?"))
        .or_else(|| Some(format!("columns are: {}", names.join(", "))))
}

impl From<OperatorError> for EngineError {
    fn from(e: OperatorError) -> Self {
        match e {
            OperatorError::DataFusion(d) => EngineError::DataFusion(d),
            OperatorError::Arrow(a) => EngineError::Arrow(a),
            OperatorError::Config(c) => EngineError::User(c.to_string()),
            OperatorError::Sql(s) => EngineError::User(s.to_string()),
            OperatorError::Engine(e) => *e,
        }
    }
}

/// Result alias for operators.
pub type Result<T, E = OperatorError> = std::result::Result<T, E>;
