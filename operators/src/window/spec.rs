//! What a windowed aggregation computes, and the pieces every window kind
//! shares: the aggregates (DataFusion's accumulators), and how result rows
//! are assembled.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::logical_expr::{Accumulator, GroupsAccumulator};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_expr::PhysicalExpr;
use datafusion_functions_aggregate_common::aggregate::groups_accumulator::GroupsAccumulatorAdapter;

use crate::sql::stages::Stages;

/// Name of the column that says whether a row is a window's first result, an
/// update of it, or the withdrawal of one (present with allowed lateness).
pub const OP_COLUMN: &str = "op";

/// The kinds of event-time window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// Fixed, non-overlapping windows of `size_ms`, aligned to the epoch.
    Tumble {
        /// Width.
        size_ms: i64,
    },
    /// Windows of `size_ms` starting every `slide_ms`: each row is in
    /// `size / slide` of them.
    Hop {
        /// Width.
        size_ms: i64,
        /// Distance between window starts.
        slide_ms: i64,
    },
    /// Per key, rows closer than `gap_ms` to each other form one window.
    Session {
        /// Inactivity that ends a session.
        gap_ms: i64,
    },
}

impl WindowKind {
    /// Width of a fixed window (none for sessions).
    pub fn size_ms(&self) -> Option<i64> {
        match self {
            WindowKind::Tumble { size_ms } | WindowKind::Hop { size_ms, .. } => Some(*size_ms),
            WindowKind::Session { .. } => None,
        }
    }

    /// As written in SQL.
    pub fn describe(&self) -> String {
        let d = |ms: i64| humantime::format_duration(std::time::Duration::from_millis(ms as u64));
        match self {
            WindowKind::Tumble { size_ms } => format!("tumble({})", d(*size_ms)),
            WindowKind::Hop { size_ms, slide_ms } => {
                format!("hop(slide {}, size {})", d(*slide_ms), d(*size_ms))
            }
            WindowKind::Session { gap_ms } => format!("session(gap {})", d(*gap_ms)),
        }
    }
}

/// What a group column of the aggregate is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupColumn {
    /// The window's start.
    WindowStart,
    /// The window's end (exclusive).
    WindowEnd,
    /// The window's last instant, `window_end - 1ms`: the event time of
    /// its result rows, as in Flink.
    WindowTime,
    /// The `i`-th key column.
    Key(usize),
}

/// One aggregate call: `count(DISTINCT user) FILTER (WHERE …)`.
#[derive(Debug, Clone)]
pub struct AggregateCall {
    /// DataFusion's aggregate, with its argument expressions.
    pub expr: Arc<AggregateFunctionExpr>,
    /// The `FILTER (WHERE …)` clause, if any.
    pub filter: Option<Arc<dyn PhysicalExpr>>,
}

impl AggregateCall {
    /// An accumulator for many groups at once: DataFusion's own vectorised
    /// one where the aggregate has it, otherwise its per-group accumulator
    /// behind DataFusion's adapter (as DataFusion's hash aggregate does).
    pub fn groups_accumulator(&self) -> datafusion::error::Result<Box<dyn GroupsAccumulator>> {
        if self.expr.groups_accumulator_supported() {
            self.expr.create_groups_accumulator()
        } else {
            let expr = self.expr.clone();
            Ok(Box::new(GroupsAccumulatorAdapter::new(move || {
                expr.create_accumulator()
            })))
        }
    }

    /// An accumulator for one group.
    pub fn accumulator(&self) -> datafusion::error::Result<Box<dyn Accumulator>> {
        self.expr.create_accumulator()
    }

    /// The aggregate's argument values on `batch`, followed by its
    /// `ORDER BY` values (order-sensitive aggregates sort by them
    /// themselves, as in DataFusion's own aggregate).
    pub fn arguments(&self, batch: &RecordBatch) -> datafusion::error::Result<Vec<ArrayRef>> {
        let n = batch.num_rows();
        let mut exprs = self.expr.expressions();
        exprs.extend(self.expr.order_bys().iter().map(|o| o.expr.clone()));
        exprs
            .iter()
            .map(|e| e.evaluate(batch)?.into_array(n))
            .collect()
    }

    /// The `FILTER` mask on `batch`.
    pub fn mask(&self, batch: &RecordBatch) -> datafusion::error::Result<Option<BooleanArray>> {
        self.filter
            .as_ref()
            .map(|f| {
                let a = f.evaluate(batch)?.into_array(batch.num_rows())?;
                Ok(a.as_boolean().clone())
            })
            .transpose()
    }
}

/// Everything a windowed aggregation needs, checked by the planner.
#[derive(Debug)]
pub struct WindowAggregateSpec {
    /// Name of the step, for errors and `vigil explain`.
    pub name: String,
    /// The query as written.
    pub sql: String,
    /// The window.
    pub kind: WindowKind,
    /// Schema of the rows the aggregation reads.
    pub input: SchemaRef,
    /// Tumbling and hopping windows: the column holding each row's window
    /// start (rows of a hopping window arrive once per window).
    pub window_start_column: Option<usize>,
    /// The event-time column (sessions are built from it).
    pub time_column: usize,
    /// Hopping windows only: rows arrive once, with their pane's start in
    /// the window start column, and windows are merged from panes.
    pub panes: bool,
    /// Columns of `input` holding the grouping keys, in key order.
    pub key_columns: Vec<usize>,
    /// The grouping keys as the query writes them, for `vigil explain`.
    pub key_labels: Vec<String>,
    /// The aggregate's group columns, in output order.
    pub group: Vec<GroupColumn>,
    /// The aggregate calls, in output order.
    pub aggregates: Vec<AggregateCall>,
    /// How many intermediate-state columns each aggregate has (states of
    /// all aggregates travel side by side, in this order).
    pub state_widths: Vec<usize>,
    /// Schema of the aggregate's rows: group columns, then aggregates.
    pub aggregate_schema: SchemaRef,
    /// `HAVING`, the `SELECT` list and anything above the aggregate.
    pub post: Stages,
    /// How long after a window's end late rows still update it.
    pub lateness_ms: i64,
}

impl WindowAggregateSpec {
    /// Schema of the rows emitted: the query's columns, and [`OP_COLUMN`]
    /// when late rows may update windows already emitted.
    pub fn output_schema(&self) -> SchemaRef {
        let post = self.post.output_schema();
        if self.lateness_ms == 0 {
            return post;
        }
        let mut fields: Vec<Field> = post.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new(OP_COLUMN, DataType::Utf8, false));
        Arc::new(Schema::new_with_metadata(fields, post.metadata().clone()))
    }

    /// Names of the key columns, which the input is hash-partitioned by.
    pub fn key_names(&self) -> Vec<String> {
        self.key_columns
            .iter()
            .map(|&c| self.input.field(c).name().clone())
            .collect()
    }

    /// Schema of the key columns alone.
    pub fn key_schema(&self) -> SchemaRef {
        Arc::new(Schema::new(
            self.key_columns
                .iter()
                .map(|&c| self.input.field(c).as_ref().clone())
                .collect::<Vec<_>>(),
        ))
    }
}

/// How a result row relates to what was emitted before for its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The window's first result.
    Insert,
    /// New values for a window already emitted (a late row within the
    /// allowed lateness).
    Update,
    /// A window emitted before no longer exists: a late row merged it into
    /// a larger session. The row repeats what was emitted.
    Retract,
}

impl Op {
    /// As written in the `op` column.
    pub fn name(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Retract => "retract",
        }
    }
}

/// Result rows of some windows, before `HAVING` and the `SELECT` list.
pub struct ResultRows {
    /// Window start of each row.
    pub starts: Vec<i64>,
    /// Window end of each row.
    pub ends: Vec<i64>,
    /// Key columns (one array per key), one value per row.
    pub keys: Vec<ArrayRef>,
    /// Aggregate values, one array per aggregate call.
    pub values: Vec<ArrayRef>,
}

/// Assembles the aggregate's rows and runs what follows the aggregate.
pub fn finish(spec: &WindowAggregateSpec, rows: ResultRows) -> crate::Result<RecordBatch> {
    let schema = &spec.aggregate_schema;
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (i, g) in spec.group.iter().enumerate() {
        let want = schema.field(i).data_type();
        let column: ArrayRef = match g {
            GroupColumn::WindowStart => timestamps(rows.starts.iter().copied(), want),
            GroupColumn::WindowEnd => timestamps(rows.ends.iter().copied(), want),
            GroupColumn::WindowTime => timestamps(rows.ends.iter().map(|e| e - 1), want),
            GroupColumn::Key(k) => rows.keys[*k].clone(),
        };
        columns.push(conform(column, want)?);
    }
    for (j, v) in rows.values.into_iter().enumerate() {
        let want = schema.field(spec.group.len() + j).data_type();
        columns.push(conform(v, want)?);
    }
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    Ok(spec.post.run(batch).map_err(Box::new)?)
}

/// Adds the `op` column to rows that all have the same `op`.
pub fn with_op(
    spec: &WindowAggregateSpec,
    batch: RecordBatch,
    op: Op,
) -> crate::Result<RecordBatch> {
    if spec.lateness_ms == 0 {
        return Ok(batch);
    }
    let mut columns = batch.columns().to_vec();
    columns.push(Arc::new(StringArray::from(vec![
        op.name();
        batch.num_rows()
    ])));
    Ok(RecordBatch::try_new(spec.output_schema(), columns)?)
}

fn timestamps(values: impl Iterator<Item = i64>, want: &DataType) -> ArrayRef {
    let tz = match want {
        DataType::Timestamp(_, tz) => tz.clone(),
        _ => None,
    };
    Arc::new(TimestampMillisecondArray::from_iter_values(values).with_timezone_opt(tz))
}

fn conform(a: ArrayRef, want: &DataType) -> crate::Result<ArrayRef> {
    if a.data_type() == want {
        Ok(a)
    } else {
        Ok(cast(&a, want)?)
    }
}
