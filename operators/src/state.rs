//! Helpers every stateful operator uses to write keyed state that can be
//! restored at another parallelism.
//!
//! Operators keep keys in Arrow's row format; the engine assigns key groups
//! from the key *columns*, as the router sees them. These helpers convert
//! rows back to columns once per snapshot and tag the table
//! ([`vigil_engine::key_group::tag`]), and merge the watermarks of several
//! restored subtasks.

use arrow::record_batch::RecordBatch;
use arrow::row::RowConverter;
use vigil_engine::EventTime;

/// `table` tagged with the key group of each row's key, given as row-format
/// bytes of `converter` (one per table row).
pub(crate) fn tag_rows<'a>(
    table: RecordBatch,
    converter: &RowConverter,
    keys: impl IntoIterator<Item = &'a [u8]>,
) -> vigil_engine::Result<RecordBatch> {
    let parser = converter.parser();
    let columns = converter.convert_rows(keys.into_iter().map(|k| parser.parse(k)))?;
    vigil_engine::key_group::tag(table, &columns)
}

/// The watermark after restoring one more subtask's state: restores add up
/// after a rescale, and the earliest watermark is the one every restored
/// row is behind.
pub(crate) fn merge_watermark(
    current: Option<EventTime>,
    restored: Option<EventTime>,
) -> Option<EventTime> {
    match (current, restored) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
