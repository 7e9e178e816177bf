//! The dead-letter record: what could not be read or applied, where it came
//! from, and why.
//!
//! Every node that can meet bad input (a source that cannot decode a
//! record, an operator that cannot apply one) emits it on its `dead_letter`
//! side output in this one schema, so any sink can store them and a person
//! can find the original record and replay it after fixing the cause. `raw`
//! is the record as text; when the record is not UTF-8 (Avro, say)
//! `raw_bytes` also holds its exact bytes, so a replay loses nothing.

use std::sync::{Arc, OnceLock};

use arrow::array::{ArrayRef, BinaryBuilder, RecordBatch, StringBuilder, UInt64Builder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

/// Schema of dead-letter records.
pub fn schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("source", DataType::Utf8, false),
                Field::new("location", DataType::Utf8, false),
                Field::new("line", DataType::UInt64, true),
                Field::new("error", DataType::Utf8, false),
                Field::new("reason", DataType::Utf8, false),
                Field::new("raw", DataType::Utf8, false),
                Field::new("raw_bytes", DataType::Binary, true),
            ]))
        })
        .clone()
}

/// Accumulates dead-letter records for one batch.
#[derive(Debug)]
pub struct DeadLetters {
    source: Arc<str>,
    sources: StringBuilder,
    locations: StringBuilder,
    lines: UInt64Builder,
    errors: StringBuilder,
    reasons: StringBuilder,
    raws: StringBuilder,
    raw_bytes: BinaryBuilder,
}

impl DeadLetters {
    /// A builder for records of source node `source`.
    pub fn new(source: &str) -> Self {
        Self {
            source: source.into(),
            sources: StringBuilder::new(),
            locations: StringBuilder::new(),
            lines: UInt64Builder::new(),
            errors: StringBuilder::new(),
            reasons: StringBuilder::new(),
            raws: StringBuilder::new(),
            raw_bytes: BinaryBuilder::new(),
        }
    }

    /// Adds one rejected record: `error` is its class (a stable snake_case
    /// name, counted per class in metrics), `reason` the detail a person
    /// reads.
    pub fn push(
        &mut self,
        location: &str,
        line: Option<u64>,
        error: impl AsRef<str>,
        reason: &str,
        raw: &[u8],
    ) {
        self.sources.append_value(&*self.source);
        self.locations.append_value(location);
        self.lines.append_option(line);
        self.errors.append_value(error.as_ref());
        self.reasons.append_value(reason);
        match std::str::from_utf8(raw) {
            Ok(text) => {
                self.raws.append_value(text);
                self.raw_bytes.append_null();
            }
            Err(_) => {
                self.raws.append_value(String::from_utf8_lossy(raw));
                self.raw_bytes.append_value(raw);
            }
        }
    }

    /// Number of records held.
    pub fn len(&self) -> usize {
        arrow::array::ArrayBuilder::len(&self.lines)
    }

    /// True when nothing was rejected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the records as a batch (None when empty).
    pub fn finish(&mut self) -> Result<Option<RecordBatch>, arrow::error::ArrowError> {
        if self.is_empty() {
            return Ok(None);
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.sources.finish()),
            Arc::new(self.locations.finish()),
            Arc::new(self.lines.finish()),
            Arc::new(self.errors.finish()),
            Arc::new(self.reasons.finish()),
            Arc::new(self.raws.finish()),
            Arc::new(self.raw_bytes.finish()),
        ];
        RecordBatch::try_new(schema(), cols).map(Some)
    }
}
