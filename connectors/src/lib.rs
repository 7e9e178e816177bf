//! Vigil's connectors: where records enter and leave a pipeline.
//!
//! Sources produce Arrow batches directly (no per-record value trees) and
//! report undecodable input on a dead-letter side output instead of failing
//! or dropping it; sinks take batches and may wait, which is how back-pressure
//! reaches the sources. Each connector has a plain, documented `*Config` (what
//! pipeline authors write) and a factory that validates it once and builds
//! the running subtasks.
//!
//! | connector   | source | sink |
//! |-------------|--------|------|
//! | `generator` | yes    |      |
//! | `file`      | JSON, NDJSON, gzip | NDJSON |
//! | `kafka`     | JSON, Avro (registry), string, bytes; consumer groups | JSON, Avro (registry); idempotent; changelogs for compacted topics |
//! | `stdout`    |        | table, JSON lines |
//! | `null`      |        | yes  |
//! | `memory`    |        | yes (tests, embedding) |
//! | `read_model`|        | upserts and deletes kept for the HTTP API |
//!
//! Beside them: lookup tables (`lookup`, files or compacted topics) and the
//! incident event log (`incident_log`, a Kafka topic and its snapshots).

pub mod avro;
pub mod dead_letter;
pub mod error;
pub mod event_time;
pub mod file;
pub mod generator;
pub mod incident_log;
pub mod json;
pub mod kafka;
pub mod lookup;
pub mod memory;
pub mod null;
pub mod read_model;
pub mod schema;
pub mod stdout;

pub use error::{ConnectorError, Result};
