//! Tables that a stream is joined against while both change: threat-intel
//! lists, asset inventories, user directories.
//!
//! A [`TableFeed`] is where a lookup table's rows come from (a file read
//! again when it changes, a compacted Kafka topic consumed as it grows). The
//! lookup join owns the table and asks its feed for changes between batches,
//! so a new indicator applies to the rows processed after it arrived. The
//! trait lives here, with the other contracts, so connectors can provide
//! feeds and operators can use them without knowing each other.

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use crate::error::Result;

/// A change to a lookup table.
#[derive(Debug, Clone)]
pub enum TableUpdate {
    /// The whole table, replacing what was there (a file read again).
    Replace(Vec<RecordBatch>),
    /// Rows inserted, or replacing the rows with the same key.
    Upsert(RecordBatch),
    /// Rows removed, by tenant (when the table has `tenant_id`) and key:
    /// the tombstones of a compacted topic.
    Delete(Vec<(Option<String>, String)>),
}

/// Where a lookup table's rows come from.
pub trait TableFeed: Send {
    /// Schema of the table's rows.
    fn schema(&self) -> SchemaRef;
    /// The table's content now; may wait (bounded) until it is loaded.
    fn load(&mut self) -> Result<Vec<TableUpdate>>;
    /// What changed since the last call, without waiting; `now_ms` is the
    /// wall clock, for feeds that check their source on an interval.
    fn poll(&mut self, now_ms: i64) -> Result<Vec<TableUpdate>>;
    /// One line for `vigil explain`.
    fn describe(&self) -> String;
}
