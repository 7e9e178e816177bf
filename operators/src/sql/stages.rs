//! Stateless steps of a streaming query, compiled once and run on every batch.
//!
//! The parts of a query that look at one row at a time — `WHERE`, the
//! `SELECT` list, subqueries that only filter and compute, `HAVING` and the
//! outer projection of an aggregate — need no state, so a stream runs them
//! exactly as a batch engine would: DataFusion's physical expressions,
//! evaluated with Arrow kernels on whole batches. [`Stages`] is such a chain,
//! lowered from a DataFusion logical plan (projections, filters, aliases,
//! sorts) by the [planner](super::planner).

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, RecordBatch, RecordBatchOptions, TimestampMillisecondArray,
    UInt32Array,
};
use arrow::compute::{filter_record_batch, lexsort_to_indices, take_record_batch, SortColumn};
use arrow::datatypes::{DataType, SchemaRef, TimestampMillisecondType};
use datafusion::physical_expr::{PhysicalExpr, PhysicalSortExpr};
use vigil_engine::{Collector, EngineError, Operator, OperatorFactory, TaskContext};

use crate::window::WindowKind;

/// One stateless step.
#[derive(Debug, Clone)]
pub enum Stage {
    /// Keeps rows where the predicate is true (null counts as false).
    Filter(Arc<dyn PhysicalExpr>),
    /// Computes a new set of columns.
    Project {
        /// One expression per output column.
        exprs: Vec<Arc<dyn PhysicalExpr>>,
        /// The output schema.
        schema: SchemaRef,
    },
    /// Sorts the rows of each batch (windowed queries only: the rows a
    /// window emits at once).
    Sort(Vec<PhysicalSortExpr>),
    /// Adds `window_start`, `window_end` and `window_time` to every row, from
    /// the event time in column `time` (a hopping window repeats each row
    /// once per window it is in; a session leaves them null, as only the
    /// aggregate knows its sessions).
    Window {
        /// The event-time column.
        time: usize,
        /// The window.
        kind: WindowKind,
        /// Hopping windows aggregated by pane: each row once, with the
        /// start of its slide-wide pane (which is also its latest window's
        /// start), instead of once per window.
        panes: bool,
        /// The input's schema with the three window columns.
        schema: SchemaRef,
    },
}

/// A chain of stateless steps from an input schema to an output schema.
#[derive(Debug, Clone)]
pub struct Stages {
    stages: Vec<(Stage, SchemaRef)>,
    output: SchemaRef,
}

impl Stages {
    /// A chain that leaves batches of `schema` as they are.
    pub fn identity(schema: SchemaRef) -> Self {
        Self {
            stages: Vec::new(),
            output: schema,
        }
    }

    /// Appends a step whose output has `schema`.
    pub fn push(&mut self, stage: Stage, schema: SchemaRef) {
        self.output = schema.clone();
        self.stages.push((stage, schema));
    }

    /// The steps with their output schemas.
    pub fn into_parts(self) -> Vec<(Stage, SchemaRef)> {
        self.stages
    }

    /// The schema of what [`Stages::run`] returns.
    pub fn output_schema(&self) -> SchemaRef {
        self.output.clone()
    }

    /// Hopping windows are assigned by pane (see [`Stage::Window`]).
    pub fn use_panes(&mut self) {
        for (stage, _) in self.stages.iter_mut() {
            if let Stage::Window { panes, .. } = stage {
                *panes = true;
            }
        }
    }

    /// Whether the chain drops rows.
    pub fn filters(&self) -> bool {
        self.stages
            .iter()
            .any(|(s, _)| matches!(s, Stage::Filter(_)))
    }

    /// Runs every step on `batch`.
    pub fn run(&self, mut batch: RecordBatch) -> datafusion::error::Result<RecordBatch> {
        for (stage, _) in &self.stages {
            if batch.num_rows() == 0 {
                break;
            }
            batch = match stage {
                Stage::Filter(predicate) => {
                    let mask = predicate.evaluate(&batch)?.into_array(batch.num_rows())?;
                    let mask = mask.as_boolean();
                    if mask.null_count() == 0 && mask.true_count() == batch.num_rows() {
                        batch
                    } else {
                        filter_record_batch(&batch, mask)?
                    }
                }
                Stage::Project { exprs, schema } => {
                    let n = batch.num_rows();
                    let columns = exprs
                        .iter()
                        .map(|e| e.evaluate(&batch)?.into_array(n))
                        .collect::<datafusion::error::Result<Vec<ArrayRef>>>()?;
                    RecordBatch::try_new_with_options(
                        schema.clone(),
                        columns,
                        &RecordBatchOptions::new().with_row_count(Some(n)),
                    )?
                }
                Stage::Window {
                    time,
                    kind,
                    panes,
                    schema,
                } => assign_windows(&batch, *time, *kind, *panes, schema)?,
                Stage::Sort(exprs) => {
                    let n = batch.num_rows();
                    let columns = exprs
                        .iter()
                        .map(|e| {
                            Ok(SortColumn {
                                values: e.expr.evaluate(&batch)?.into_array(n)?,
                                options: Some(e.options),
                            })
                        })
                        .collect::<datafusion::error::Result<Vec<_>>>()?;
                    let indices = lexsort_to_indices(&columns, None)?;
                    take_record_batch(&batch, &indices)?
                }
            };
        }
        if batch.num_rows() == 0 && batch.schema() != self.output {
            return Ok(RecordBatch::new_empty(self.output.clone()));
        }
        Ok(batch)
    }
}

/// Appends the window columns to a batch (see [`Stage::Window`]).
fn assign_windows(
    batch: &RecordBatch,
    time: usize,
    kind: WindowKind,
    panes: bool,
    schema: &SchemaRef,
) -> datafusion::error::Result<RecordBatch> {
    let ts = batch
        .column(time)
        .as_primitive::<TimestampMillisecondType>();
    let tz = match schema.field(schema.fields().len() - 3).data_type() {
        DataType::Timestamp(_, tz) => tz.clone(),
        _ => None,
    };
    let stamp = |v: Vec<Option<i64>>| -> ArrayRef {
        Arc::new(TimestampMillisecondArray::from(v).with_timezone_opt(tz.clone()))
    };
    if let (WindowKind::Tumble { size_ms }, 0) = (kind, ts.null_count()) {
        // The common case: one window per row, no nulls; plain loops over
        // the values, which the compiler vectorises.
        let starts: Vec<i64> = ts
            .values()
            .iter()
            .map(|t| t - t.rem_euclid(size_ms))
            .collect();
        let ends: Vec<i64> = starts.iter().map(|s| s + size_ms).collect();
        let times: Vec<i64> = ends.iter().map(|e| e - 1).collect();
        let values = |v: Vec<i64>| -> ArrayRef {
            Arc::new(TimestampMillisecondArray::from(v).with_timezone_opt(tz.clone()))
        };
        let mut columns = batch.columns().to_vec();
        columns.extend([values(starts), values(ends), values(times)]);
        return Ok(RecordBatch::try_new(schema.clone(), columns)?);
    }
    let (rows, starts, size): (RecordBatch, Vec<Option<i64>>, i64) = match kind {
        WindowKind::Tumble { size_ms } => {
            let starts = ts
                .iter()
                .map(|t| t.map(|t| t - t.rem_euclid(size_ms)))
                .collect();
            (batch.clone(), starts, size_ms)
        }
        WindowKind::Hop { size_ms, slide_ms } if panes => {
            let starts = ts
                .iter()
                .map(|t| t.map(|t| t - t.rem_euclid(slide_ms)))
                .collect();
            (batch.clone(), starts, size_ms)
        }
        WindowKind::Hop { size_ms, slide_ms } => {
            let per_row = (size_ms + slide_ms - 1) / slide_ms;
            let mut take_rows: Vec<u32> = Vec::with_capacity(ts.len() * per_row as usize);
            let mut starts = Vec::with_capacity(take_rows.capacity());
            for (i, t) in ts.iter().enumerate() {
                match t {
                    Some(t) => {
                        let mut s = t - t.rem_euclid(slide_ms);
                        while s + size_ms > t {
                            take_rows.push(i as u32);
                            starts.push(Some(s));
                            s -= slide_ms;
                        }
                    }
                    None => {
                        take_rows.push(i as u32);
                        starts.push(None);
                    }
                }
            }
            let idx = UInt32Array::from(take_rows);
            (take_record_batch(batch, &idx)?, starts, size_ms)
        }
        WindowKind::Session { .. } => {
            let mut columns = batch.columns().to_vec();
            for _ in 0..3 {
                columns.push(arrow::array::new_null_array(
                    schema.field(schema.fields().len() - 1).data_type(),
                    batch.num_rows(),
                ));
            }
            return Ok(RecordBatch::try_new(schema.clone(), columns)?);
        }
    };
    let ends: Vec<Option<i64>> = starts.iter().map(|s| s.map(|s| s + size)).collect();
    let times: Vec<Option<i64>> = ends.iter().map(|e| e.map(|e| e - 1)).collect();
    let mut columns = rows.columns().to_vec();
    columns.push(stamp(starts));
    columns.push(stamp(ends));
    columns.push(stamp(times));
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// Builds subtasks of a stateless SQL step (`SELECT … FROM t WHERE …`).
#[derive(Debug)]
pub struct StatelessFactory {
    sql: String,
    stages: Stages,
}

impl StatelessFactory {
    /// A step running `stages`; `sql` is shown by `vigil explain`.
    pub fn new(sql: &str, stages: Stages) -> Self {
        Self {
            sql: sql.to_string(),
            stages,
        }
    }
}

impl OperatorFactory for StatelessFactory {
    /// Records the step cannot evaluate go to dead letters (see the
    /// runtime's poison-record isolation).
    fn side_outputs(&self) -> Vec<(vigil_engine::operator::SidePort, SchemaRef)> {
        vec![(
            vigil_engine::DEAD_LETTER,
            vigil_engine::dead_letter::schema(),
        )]
    }
    fn output_schema(&self) -> SchemaRef {
        self.stages.output_schema()
    }
    fn create(&self, _ctx: &TaskContext) -> vigil_engine::Result<Box<dyn Operator>> {
        Ok(Box::new(Stateless {
            stages: self.stages.clone(),
        }))
    }
    fn describe(&self) -> String {
        format!("sql {}", one_line(&self.sql))
    }
}

/// A query as one line, shortened, for `vigil explain`.
pub(crate) fn one_line(sql: &str) -> String {
    let line = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > 100 {
        let cut: String = line.chars().take(97).collect();
        format!("{cut}...")
    } else {
        line
    }
}

struct Stateless {
    stages: Stages,
}

impl Operator for Stateless {
    fn is_stateless(&self) -> bool {
        true
    }

    fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> vigil_engine::Result<()> {
        let batch = self
            .stages
            .run(batch)
            .map_err(|e| EngineError::DataFusion(Box::new(e)))?;
        out.emit(batch);
        Ok(())
    }
}
