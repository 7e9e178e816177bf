//! What pipeline authors write for file sources and sinks.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::datatypes::{DataType, Schema, SchemaRef};
use arrow_avro::schema::AvroSchema;
use serde::Deserialize;

use crate::error::{ConnectorError, Result};
use crate::event_time::TimeFormat;
use crate::schema::{arrow_schema, FieldConfig};

/// One path or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PathList {
    /// A single file or directory.
    One(PathBuf),
    /// Several files or directories, read as separate partitions.
    Many(Vec<PathBuf>),
}

/// How records are laid out in a file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// JSON array if the file starts with `[`, NDJSON otherwise.
    #[default]
    Auto,
    /// One JSON object per line.
    Ndjson,
    /// One JSON array of objects.
    Json,
}

/// Which field holds event time, and how it is written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventTimeConfig {
    /// Name of the field; it must be declared with `type: timestamp`.
    pub field: String,
    /// `auto` (default), `rfc3339`, `epoch_s`, `epoch_ms` or `epoch_us`.
    #[serde(default)]
    pub format: TimeFormat,
}

/// The records' fields and event time.
///
/// Fields are declared one by one (`fields`) or taken from an Avro schema
/// file (`avro`, an `.avsc`): records become structs, optional fields
/// nullable columns. With `flatten: true` struct columns are replaced by
/// their leaves, named with dots (`src.ip`), as Zeek names its fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaConfig {
    /// Fields to read, in output order.
    #[serde(default)]
    pub fields: Vec<FieldConfig>,
    /// An Avro schema file whose record fields are the fields to read (and,
    /// for Avro values, the reader schema).
    #[serde(default)]
    pub avro: Option<String>,
    /// Which record of the `avro` file, when it defines several.
    #[serde(default)]
    pub avro_record: Option<String>,
    /// Which field is event time.
    pub event_time: EventTimeConfig,
    /// Replace struct columns by their leaf fields.
    #[serde(default)]
    pub flatten: bool,
}

/// A [`SchemaConfig`] checked and turned into Arrow.
#[derive(Debug, Clone)]
pub struct ResolvedSchema {
    /// The schema records are decoded into (structs not yet flattened).
    pub decode: SchemaRef,
    /// Index of the event-time column in `decode`.
    pub event_time: usize,
    /// The Avro schema, when the fields come from one.
    pub avro: Option<AvroSchema>,
}

impl SchemaConfig {
    /// Builds the Arrow schema and finds the event-time column, which must
    /// be a top-level timestamp.
    pub fn resolve(&self) -> Result<ResolvedSchema> {
        let (decode, avro) = match (&self.avro, self.fields.is_empty()) {
            (Some(path), true) => {
                let avro = crate::avro::load_schema_file(
                    path,
                    self.avro_record.as_deref(),
                    "schema.avro",
                )?;
                let schema = crate::avro::arrow_schema(&avro)
                    .map_err(|e| ConnectorError::config("schema.avro", e))?;
                (schema, Some(avro))
            }
            (None, false) => (arrow_schema(&self.fields, "schema.fields")?, None),
            (Some(_), false) => {
                return Err(ConnectorError::config(
                    "schema.avro",
                    "declare fields or an Avro schema, not both",
                ))
            }
            (None, true) => {
                return Err(
                    ConnectorError::config("schema.fields", "no fields declared")
                        .with_hint("list fields, or name an Avro schema file with schema.avro"),
                )
            }
        };
        let et_name = &self.event_time.field;
        let event_time = decode.index_of(et_name).map_err(|_| {
            let names: Vec<&str> = decode.fields().iter().map(|f| f.name().as_str()).collect();
            let e = ConnectorError::config(
                "schema.event_time.field",
                format!("event-time field {et_name:?} is not among the declared fields"),
            );
            match crate::schema::suggest(et_name, &names) {
                Some(s) => e.with_hint(format!("did you mean {s:?}?")),
                None if avro.is_some() => e.with_hint(
                    "it must be a top-level field of the Avro record, with logicalType timestamp-millis",
                ),
                None => e.with_hint("declare it under schema.fields with type: timestamp"),
            }
        })?;
        if !matches!(
            decode.field(event_time).data_type(),
            DataType::Timestamp(_, _)
        ) {
            let how = if avro.is_some() {
                "must have logicalType timestamp-millis or timestamp-micros"
            } else {
                "must be declared with type: timestamp"
            };
            return Err(ConnectorError::config(
                "schema.event_time.field",
                format!("event-time field {et_name:?} {how}"),
            ));
        }
        Ok(ResolvedSchema {
            decode,
            event_time,
            avro,
        })
    }
}

/// `schema` with struct columns replaced by their leaves (`a.b`).
pub fn flattened(schema: &Schema) -> Result<SchemaRef> {
    Ok(Arc::new(schema.normalize(".", None)?))
}

/// A JSON or NDJSON file source.
///
/// ```yaml
/// type: file
/// path: ../shared/data/zeek_wrccdc2018/ssh.json.gz
/// schema:
///   fields:
///     - { name: ts, type: timestamp }
///     - { name: id.orig_h, type: string }
///   event_time: { field: ts, format: rfc3339 }
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// Files or directories (every file inside, sorted); each file is one
    /// partition with its own watermark. Files ending in `.gz` are gunzipped.
    pub path: PathList,
    /// Layout of the records.
    #[serde(default)]
    pub format: FileFormat,
    /// Fields and event time.
    pub schema: SchemaConfig,
    /// Replay at this multiple of event-time speed (1.0: as fast as the events
    /// happened). Absent: as fast as possible.
    #[serde(default)]
    pub replay_speed: Option<f64>,
    /// Records per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

fn default_batch_size() -> usize {
    8192
}

/// An NDJSON file sink.
///
/// ```yaml
/// type: file
/// input: alerts
/// path: out/alerts.ndjson
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// File to write; created (with parent directories) or truncated.
    pub path: PathBuf,
    /// Append instead of truncating.
    #[serde(default)]
    pub append: bool,
}
