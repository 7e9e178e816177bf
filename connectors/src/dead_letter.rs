//! Why a source rejects a record: the classes of decoding failures.
//!
//! The record itself, [`schema`] and its builder [`DeadLetters`], is the
//! engine's, shared with operators that reject what they cannot apply.

pub use vigil_engine::dead_letter::{schema, DeadLetters};

/// Why a record was rejected, as a stable class (the `error` column, a
/// metric label, a Kafka header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterError {
    /// Not parseable as JSON.
    InvalidJson,
    /// JSON, but not an object.
    NotAnObject,
    /// A field has a value of the wrong type.
    WrongType,
    /// No event time.
    MissingEventTime,
    /// A timestamp that cannot be parsed.
    InvalidTimestamp,
    /// Text that is not UTF-8.
    InvalidUtf8,
    /// Not Avro in the Confluent wire format (no magic byte and schema id).
    InvalidAvro,
    /// A schema id the registry does not know.
    UnknownSchemaId,
    /// A writer schema that cannot be read with the pipeline's schema.
    IncompatibleSchema,
    /// An Avro body that does not match its writer schema.
    AvroMismatch,
}

impl DeadLetterError {
    /// The class as written in records and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterError::InvalidJson => "invalid_json",
            DeadLetterError::NotAnObject => "not_an_object",
            DeadLetterError::WrongType => "wrong_type",
            DeadLetterError::MissingEventTime => "missing_event_time",
            DeadLetterError::InvalidTimestamp => "invalid_timestamp",
            DeadLetterError::InvalidUtf8 => "invalid_utf8",
            DeadLetterError::InvalidAvro => "invalid_avro",
            DeadLetterError::UnknownSchemaId => "unknown_schema_id",
            DeadLetterError::IncompatibleSchema => "incompatible_schema",
            DeadLetterError::AvroMismatch => "avro_mismatch",
        }
    }
}

impl AsRef<str> for DeadLetterError {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}
