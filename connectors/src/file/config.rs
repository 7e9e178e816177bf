//! What pipeline authors write for file sources and sinks.

use std::path::PathBuf;

use serde::Deserialize;

use crate::event_time::TimeFormat;
use crate::schema::FieldConfig;

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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaConfig {
    /// Fields to read, in output order.
    pub fields: Vec<FieldConfig>,
    /// Which field is event time.
    pub event_time: EventTimeConfig,
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
