//! Rows behind the watermark, split off an arriving batch.
//!
//! Operators that buffer rows until the watermark passes them (joins,
//! correlations) cannot take a row that arrives behind it: what it should
//! meet may be gone. Such rows leave whole on the `late` side output and are
//! counted, the same way in every operator.

use arrow::array::{AsArray, BooleanArray, RecordBatch};
use arrow::compute::{filter_record_batch, not};
use arrow::datatypes::TimestampMillisecondType;
use vigil_engine::{Collector, EventTime, TaskMetrics, LATE};

/// Sends the rows of `batch` whose event time (column `time`) is before
/// `watermark` to the `late` output and returns the others.
pub(crate) fn split_late(
    batch: RecordBatch,
    time: usize,
    watermark: EventTime,
    metrics: &TaskMetrics,
    out: &mut Collector,
) -> vigil_engine::Result<RecordBatch> {
    let times = batch
        .column(time)
        .as_primitive::<TimestampMillisecondType>();
    if watermark == EventTime::MIN || arrow::compute::min(times).is_none_or(|m| m >= watermark) {
        return Ok(batch);
    }
    let late: BooleanArray = times
        .iter()
        .map(|t| Some(t.is_some_and(|t| t < watermark)))
        .collect();
    let late_rows = filter_record_batch(&batch, &late)?;
    tracing::debug!(
        rows = late_rows.num_rows(),
        earliest = ?arrow::compute::min(times),
        watermark,
        "rows behind the watermark go to the late output"
    );
    TaskMetrics::add(&metrics.late_records, late_rows.num_rows());
    out.emit_side(LATE, late_rows);
    Ok(filter_record_batch(&batch, &not(&late)?)?)
}
