//! Tumbling and hopping windows: state partitioned by window, then by key.
//!
//! ```text
//!            ┌ window 12:00 ┐  ┌ window 12:01 ┐
//!  rows ──►  │ GroupValues  │  │ GroupValues  │   one hash table of keys and
//!  (by       │ accumulators │  │ accumulators │   one GroupsAccumulator per
//!  window)   └──────────────┘  └──────────────┘   aggregate, per open window
//!
//!  watermark ≥ window end          → evaluate, emit, free (no lateness)
//!  watermark ≥ end + lateness      → free (with lateness: kept until then)
//! ```
//!
//! Every row carries its window start (the planner computes it, once per
//! window for hopping windows), so a batch is split by window with one
//! comparison kernel per distinct window in it — with bounded disorder, one
//! or two. Within a window the keys are interned by DataFusion's
//! `GroupValues` and the aggregates updated by its `GroupsAccumulator`s:
//! the same vectorised code as DataFusion's own hash aggregate, fed
//! incrementally. A window whose end has passed is evaluated in one call and
//! its memory released, so state holds only windows that can still change.
//!
//! Hopping windows are kept by *pane* when the rows reach the aggregate as
//! they are (no subquery computing from window columns, no lateness): every
//! row carries the start of its slide-wide pane and is interned once, into
//! that pane; when a window ends, the states of its `size / slide` panes
//! (each read out once and kept until it changes) are merged into a fresh
//! table and evaluated, and a pane is freed once its last window has ended.
//! A row whose earlier windows have already ended counts in those still
//! open; it is late only when all of them have ended. Otherwise each row
//! arrives once per window it is in and windows are kept as above.
//!
//! With allowed lateness, a window is evaluated without being consumed: its
//! state is read out and merged back, so a late row can update it and the
//! changed groups are emitted again as `update`s.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, TimestampMillisecondArray,
    UInt32Array,
};
use arrow::compute::{filter_record_batch, take};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimestampMillisecondType};
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_plan::aggregates::group_values::{new_group_values, GroupValues};
use datafusion::physical_plan::aggregates::order::GroupOrdering;
use vigil_engine::{Collector, EventTime, OperatorState, TaskMetrics, LATE};

use super::spec::{finish, with_op, Op, ResultRows, WindowAggregateSpec};
use crate::error::{OperatorError, Result};

/// The groups of one window.
struct Window {
    /// Interned keys; `None` when the query has no keys (one group).
    keys: Option<Box<dyn GroupValues>>,
    groups: usize,
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
    /// Emitted once already (only kept with allowed lateness).
    fired: bool,
    /// Groups changed since the last emission (fired windows only).
    dirty: Vec<bool>,
    /// A pane's keys and accumulator states as last read out, until rows
    /// change it (panes of hopping windows: each window reads its panes).
    read: Option<(Vec<ArrayRef>, Vec<ArrayRef>)>,
}

/// Tumbling or hopping window state of one subtask.
pub struct FixedWindows {
    spec: Arc<WindowAggregateSpec>,
    size: i64,
    /// Distance between window starts (the pane width in pane mode).
    slide: i64,
    key_schema: SchemaRef,
    windows: BTreeMap<i64, Window>,
    watermark: Option<EventTime>,
    metrics: Arc<TaskMetrics>,
    group_ids: Vec<usize>,
}

impl FixedWindows {
    /// Empty state for `spec` (a tumbling or hopping window).
    pub fn new(spec: Arc<WindowAggregateSpec>, metrics: Arc<TaskMetrics>) -> Result<Self> {
        let size = spec.kind.size_ms().ok_or_else(|| {
            OperatorError::config("query", "internal: a session is not a fixed window", None)
        })?;
        let slide = match spec.kind {
            super::WindowKind::Hop { slide_ms, .. } => slide_ms,
            _ => size,
        };
        Ok(Self {
            key_schema: spec.key_schema(),
            spec,
            size,
            slide,
            windows: BTreeMap::new(),
            watermark: None,
            metrics,
            group_ids: Vec::new(),
        })
    }

    /// Windows holding state.
    pub fn open_windows(&self) -> usize {
        self.windows.len()
    }

    /// Groups (key × window) held, and the bytes of their keys and
    /// accumulators.
    pub fn state_size(&self) -> vigil_engine::StateSize {
        let mut s = vigil_engine::StateSize::default();
        for w in self.windows.values() {
            s.keys += w.groups as u64;
            s.bytes += w.keys.as_ref().map_or(0, |k| k.size()) as u64;
            s.bytes += w.accumulators.iter().map(|a| a.size()).sum::<usize>() as u64;
        }
        s
    }

    fn new_window(&self) -> Result<Window> {
        let (keys, accumulators) = fresh_parts(&self.spec, &self.key_schema)?;
        Ok(Window {
            keys,
            groups: 0,
            accumulators,
            fired: false,
            dirty: Vec::new(),
            read: None,
        })
    }

    /// Earliest window start that can still take rows.
    fn open_from(&self) -> Option<i64> {
        self.watermark.map(|w| {
            w.saturating_sub(self.size)
                .saturating_sub(self.spec.lateness_ms)
                .saturating_add(1)
        })
    }

    /// Adds a batch of rows (each with its window start).
    pub fn process(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<()> {
        let Some(col) = self.spec.window_start_column else {
            return Err(OperatorError::config(
                "query",
                "internal: fixed windows need a window start column",
                None,
            ));
        };
        let batch = self.split_late(batch, col, out)?;
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let starts = batch.column(col).as_primitive::<TimestampMillisecondType>();
        let (lo, hi) = (
            arrow::compute::min(starts).unwrap_or_default(),
            arrow::compute::max(starts).unwrap_or_default(),
        );
        let mut touched_fired = false;
        if lo == hi {
            touched_fired |= self.add(lo, &batch)?;
        } else {
            let mut distinct: Vec<i64> = Vec::new();
            for &s in starts.values() {
                if !distinct.contains(&s) {
                    distinct.push(s);
                    if distinct.len() > 64 {
                        break;
                    }
                }
            }
            if distinct.len() > 64 {
                // Widely spread rows (a replay with large disorder): sort
                // once instead of one kernel per window.
                distinct = starts.values().to_vec();
                distinct.sort_unstable();
                distinct.dedup();
            }
            for s in distinct {
                let bound = TimestampMillisecondArray::from(vec![s])
                    .with_timezone_opt(starts.timezone().map(Arc::from));
                let mask =
                    arrow::compute::kernels::cmp::eq(starts, &arrow::array::Scalar::new(bound))?;
                let part = filter_record_batch(&batch, &mask)?;
                touched_fired |= self.add(s, &part)?;
            }
        }
        if touched_fired {
            self.emit_updates(out)?;
        }
        Ok(())
    }

    /// Sends rows whose every window is past its lateness to the late output.
    fn split_late(
        &self,
        batch: RecordBatch,
        col: usize,
        out: &mut Collector,
    ) -> Result<RecordBatch> {
        let starts = batch.column(col).as_primitive::<TimestampMillisecondType>();
        let from = self.open_from();
        let on_time_all = starts.null_count() == 0
            && from.is_none_or(|f| arrow::compute::min(starts).is_none_or(|m| m >= f));
        if on_time_all {
            return Ok(batch);
        }
        let keep: BooleanArray = match from {
            Some(f) => {
                let bound = TimestampMillisecondArray::from(vec![f])
                    .with_timezone_opt(starts.timezone().map(Arc::from));
                let m =
                    arrow::compute::kernels::cmp::gt_eq(starts, &arrow::array::Scalar::new(bound))?;
                // A row without event time has no window: late, never dropped.
                if m.null_count() > 0 {
                    arrow::compute::prep_null_mask_filter(&m)
                } else {
                    m
                }
            }
            None => arrow::compute::is_not_null(starts)?,
        };
        let late = filter_record_batch(&batch, &arrow::compute::not(&keep)?)?;
        TaskMetrics::add(&self.metrics.late_records, late.num_rows());
        out.emit_side(LATE, late);
        Ok(filter_record_batch(&batch, &keep)?)
    }

    /// Adds rows of one window; true when that window had already fired.
    fn add(&mut self, start: i64, batch: &RecordBatch) -> Result<bool> {
        if !self.windows.contains_key(&start) {
            let w = self.new_window()?;
            self.windows.insert(start, w);
        }
        let spec = self.spec.clone();
        let window = self
            .windows
            .get_mut(&start)
            .ok_or_else(|| OperatorError::config("query", "internal: window vanished", None))?;
        window.read = None;
        let ids = &mut self.group_ids;
        match &mut window.keys {
            Some(keys) => {
                let cols: Vec<ArrayRef> = spec
                    .key_columns
                    .iter()
                    .map(|&c| batch.column(c).clone())
                    .collect();
                keys.intern(&cols, ids).map_err(Box::new)?;
                window.groups = keys.len();
            }
            None => {
                ids.clear();
                ids.resize(batch.num_rows(), 0);
                window.groups = 1;
            }
        }
        for (call, acc) in spec.aggregates.iter().zip(window.accumulators.iter_mut()) {
            let args = call.arguments(batch).map_err(Box::new)?;
            let mask = call.mask(batch).map_err(Box::new)?;
            acc.update_batch(&args, ids, mask.as_ref(), window.groups)
                .map_err(Box::new)?;
        }
        if window.fired {
            window.dirty.resize(window.groups, false);
            for &g in ids.iter() {
                window.dirty[g] = true;
            }
        }
        Ok(window.fired)
    }

    /// The watermark advanced: emit windows that ended, free those past
    /// their lateness.
    pub fn on_watermark(&mut self, watermark: EventTime, out: &mut Collector) -> Result<()> {
        let previous = self.watermark.replace(watermark);
        if self.spec.panes {
            return self.close_from_panes(previous, watermark, out);
        }
        let lateness = self.spec.lateness_ms;
        let ready: Vec<i64> = self
            .windows
            .iter()
            .take_while(|(s, _)| s.saturating_add(self.size) <= watermark)
            .map(|(s, _)| *s)
            .collect();
        for start in ready {
            let end = start + self.size;
            let expired = end.saturating_add(lateness) <= watermark;
            let Some(window) = self.windows.get_mut(&start) else {
                continue;
            };
            if expired {
                let mut window = self.windows.remove(&start).ok_or_else(|| {
                    OperatorError::config("query", "internal: window vanished", None)
                })?;
                if !window.fired {
                    let rows = drain(&mut window, start, end)?;
                    let batch = finish(&self.spec, rows)?;
                    out.emit(with_op(&self.spec, batch, Op::Insert)?);
                }
            } else if !window.fired {
                let rows = peek(&self.spec, &self.key_schema, window, start, end, None)?;
                window.fired = true;
                let batch = finish(&self.spec, rows)?;
                out.emit(with_op(&self.spec, batch, Op::Insert)?);
            }
        }
        Ok(())
    }

    /// Pane mode: emits every window that ended since the last watermark,
    /// merged from its panes, then frees the panes no window needs.
    fn close_from_panes(
        &mut self,
        previous: Option<EventTime>,
        watermark: EventTime,
        out: &mut Collector,
    ) -> Result<()> {
        let (size, slide) = (self.size, self.slide);
        let mut starts = std::collections::BTreeSet::new();
        for &p in self.windows.keys() {
            // The windows holding pane p start in (p - size, p].
            let mut s = p;
            while s > p - size {
                let end = s + size;
                if end <= watermark && previous.is_none_or(|w| end > w) {
                    starts.insert(s);
                }
                s -= slide;
            }
        }
        let spec = self.spec.clone();
        for s in starts {
            let (mut keys, mut accumulators) = fresh_parts(&spec, &self.key_schema)?;
            let mut groups = 0;
            let mut ids = Vec::new();
            let panes: Vec<i64> = self.windows.range(s..s + size).map(|(p, _)| *p).collect();
            for p in panes {
                let Some(pane) = self.windows.get_mut(&p) else {
                    continue;
                };
                let n = pane.groups;
                let (pane_keys, states) = read(&spec, &self.key_schema, pane)?;
                match &mut keys {
                    Some(k) => {
                        k.intern(&pane_keys, &mut ids).map_err(Box::new)?;
                        groups = k.len();
                    }
                    None => {
                        ids.clear();
                        ids.resize(n, 0);
                        groups = 1;
                    }
                }
                merge_states(&spec, &mut accumulators, &states, &ids, groups)?;
            }
            if groups == 0 {
                continue;
            }
            let keys = match &mut keys {
                Some(k) => k.emit(EmitTo::All).map_err(Box::new)?,
                None => Vec::new(),
            };
            let values = accumulators
                .iter_mut()
                .map(|a| a.evaluate(EmitTo::All))
                .collect::<datafusion::error::Result<Vec<_>>>()
                .map_err(Box::new)?;
            let rows = ResultRows {
                starts: vec![s; groups],
                ends: vec![s + size; groups],
                keys,
                values,
            };
            let batch = finish(&spec, rows)?;
            out.emit(with_op(&spec, batch, Op::Insert)?);
        }
        // A pane's last window starts at the pane: once it ended, free it.
        while let Some(entry) = self.windows.first_entry() {
            if entry.key().saturating_add(size) > watermark {
                break;
            }
            entry.remove();
        }
        Ok(())
    }

    /// Emits the groups late rows changed in windows already emitted.
    fn emit_updates(&mut self, out: &mut Collector) -> Result<()> {
        for (&start, window) in self.windows.iter_mut() {
            if !window.fired || !window.dirty.iter().any(|d| *d) {
                continue;
            }
            let changed: Vec<u32> = window
                .dirty
                .iter()
                .enumerate()
                .filter(|(_, d)| **d)
                .map(|(g, _)| g as u32)
                .collect();
            window.dirty.iter_mut().for_each(|d| *d = false);
            let rows = peek(
                &self.spec,
                &self.key_schema,
                window,
                start,
                start + self.size,
                Some(&changed),
            )?;
            let batch = finish(&self.spec, rows)?;
            out.emit(with_op(&self.spec, batch, Op::Update)?);
        }
        Ok(())
    }

    /// Everything still open, as state tables.
    pub fn snapshot(&mut self) -> Result<OperatorState> {
        let spec = self.spec.clone();
        let mut tables = Vec::new();
        let mut rebuilt = BTreeMap::new();
        let windows = std::mem::take(&mut self.windows);
        for (start, mut window) in windows {
            let n = window.groups;
            let (keys, states) = take_state(&spec, &self.key_schema, &mut window)?;
            let table = state_table(start, window.fired, n, &keys, &states)?;
            let table = if keys.is_empty() {
                table
            } else {
                vigil_engine::key_group::tag(table, &keys)?
            };
            load(&spec, &mut window, &keys, &states, n)?;
            rebuilt.insert(start, window);
            tables.push(table);
        }
        self.windows = rebuilt;
        let watermark = Arc::new(Schema::new(vec![Field::new(
            "watermark",
            DataType::Int64,
            true,
        )]));
        let wm = RecordBatch::try_new(
            watermark,
            vec![Arc::new(Int64Array::from(vec![self.watermark]))],
        )?;
        let mut batches = vec![wm];
        batches.extend(tables);
        Ok(OperatorState { batches })
    }

    /// Replaces the state with a snapshot's.
    pub fn restore(&mut self, state: OperatorState) -> Result<()> {
        let spec = self.spec.clone();
        let mut tables = state.batches.into_iter();
        let wm = tables.next().ok_or_else(|| {
            OperatorError::config("query", "window state has no watermark table", None)
        })?;
        let w = wm.column(0).as_primitive::<arrow::datatypes::Int64Type>();
        let restored = (w.len() == 1 && w.is_valid(0)).then(|| w.value(0));
        // Restores add up (one per old subtask after a rescale); the
        // earliest watermark is the one every restored window is behind.
        self.watermark = match (self.watermark, restored) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        for table in tables {
            let meta = table
                .column(0)
                .as_primitive::<arrow::datatypes::Int64Type>();
            let fired = table.column(1).as_boolean();
            if table.num_rows() == 0 {
                continue;
            }
            let start = meta.value(0);
            let nk = spec.key_columns.len();
            let keys: Vec<ArrayRef> = (0..nk).map(|i| table.column(2 + i).clone()).collect();
            let states: Vec<ArrayRef> = table.columns()[2 + nk..].to_vec();
            let mut window = match self.windows.remove(&start) {
                Some(w) => w,
                None => self.new_window()?,
            };
            load(&spec, &mut window, &keys, &states, table.num_rows())?;
            window.fired |= fired.value(0);
            self.windows.insert(start, window);
        }
        Ok(())
    }
}

type Parts = (
    Option<Box<dyn GroupValues>>,
    Vec<Box<dyn GroupsAccumulator>>,
);

/// New, empty key table and accumulators for one window.
fn fresh_parts(spec: &WindowAggregateSpec, key_schema: &SchemaRef) -> Result<Parts> {
    let keys = if spec.key_columns.is_empty() {
        None
    } else {
        Some(new_group_values(key_schema.clone(), &GroupOrdering::None).map_err(Box::new)?)
    };
    let accumulators = spec
        .aggregates
        .iter()
        .map(|a| a.groups_accumulator())
        .collect::<datafusion::error::Result<Vec<_>>>()
        .map_err(Box::new)?;
    Ok((keys, accumulators))
}

/// A window's (or pane's) keys and states, read out without consuming it,
/// and kept until rows change it.
fn read(
    spec: &WindowAggregateSpec,
    key_schema: &SchemaRef,
    pane: &mut Window,
) -> Result<(Vec<ArrayRef>, Vec<ArrayRef>)> {
    if let Some(r) = &pane.read {
        return Ok(r.clone());
    }
    let n = pane.groups;
    let (keys, states) = take_state(spec, key_schema, pane)?;
    load(spec, pane, &keys, &states, n)?;
    pane.read = Some((keys.clone(), states.clone()));
    Ok((keys, states))
}

/// Evaluates a window and releases it.
fn drain(window: &mut Window, start: i64, end: i64) -> Result<ResultRows> {
    let n = window.groups;
    let keys = match &mut window.keys {
        Some(k) => k.emit(EmitTo::All).map_err(Box::new)?,
        None => Vec::new(),
    };
    let values = window
        .accumulators
        .iter_mut()
        .map(|a| a.evaluate(EmitTo::All))
        .collect::<datafusion::error::Result<Vec<_>>>()
        .map_err(Box::new)?;
    Ok(ResultRows {
        starts: vec![start; n],
        ends: vec![end; n],
        keys,
        values,
    })
}

/// Reads keys and accumulator states out of a window, leaving it with
/// fresh, empty parts.
fn take_state(
    spec: &WindowAggregateSpec,
    key_schema: &SchemaRef,
    window: &mut Window,
) -> Result<(Vec<ArrayRef>, Vec<ArrayRef>)> {
    let keys = match &mut window.keys {
        Some(k) => k.emit(EmitTo::All).map_err(Box::new)?,
        None => Vec::new(),
    };
    let mut states = Vec::new();
    for a in window.accumulators.iter_mut() {
        states.extend(a.state(EmitTo::All).map_err(Box::new)?);
    }
    let (k, a) = fresh_parts(spec, key_schema)?;
    window.keys = k;
    window.accumulators = a;
    Ok((keys, states))
}

/// Loads keys and accumulator states into an empty window.
fn load(
    spec: &WindowAggregateSpec,
    window: &mut Window,
    keys: &[ArrayRef],
    states: &[ArrayRef],
    n: usize,
) -> Result<()> {
    let mut ids = Vec::with_capacity(n);
    let groups = match &mut window.keys {
        Some(k) => {
            k.intern(keys, &mut ids).map_err(Box::new)?;
            k.len()
        }
        None => {
            ids.resize(n, 0);
            window.groups.max(n.min(1))
        }
    };
    window.groups = groups;
    merge_states(spec, &mut window.accumulators, states, &ids, groups)
}

/// Merges intermediate states (every aggregate's state columns, side by
/// side) into accumulators, row `i` into group `ids[i]`.
fn merge_states(
    spec: &WindowAggregateSpec,
    accumulators: &mut [Box<dyn GroupsAccumulator>],
    states: &[ArrayRef],
    ids: &[usize],
    groups: usize,
) -> Result<()> {
    let mut at = 0;
    for (acc, &width) in accumulators.iter_mut().zip(&spec.state_widths) {
        acc.merge_batch(&states[at..at + width], ids, groups)
            .map_err(Box::new)?;
        at += width;
    }
    Ok(())
}

/// Evaluates a window without consuming it; `only` picks groups.
fn peek(
    spec: &WindowAggregateSpec,
    key_schema: &SchemaRef,
    window: &mut Window,
    start: i64,
    end: i64,
    only: Option<&[u32]>,
) -> Result<ResultRows> {
    let n = window.groups;
    let (keys, states) = read(spec, key_schema, window)?;
    let (keys, states, m) = match only {
        Some(groups) => {
            let idx = UInt32Array::from(groups.to_vec());
            let pick = |a: &ArrayRef| take(a.as_ref(), &idx, None);
            (
                keys.iter().map(pick).collect::<Result<Vec<_>, _>>()?,
                states.iter().map(pick).collect::<Result<Vec<_>, _>>()?,
                groups.len(),
            )
        }
        None => (keys, states, n),
    };
    let ids: Vec<usize> = (0..m).collect();
    let (_, mut accumulators) = fresh_parts(spec, key_schema)?;
    merge_states(spec, &mut accumulators, &states, &ids, m)?;
    let values = accumulators
        .iter_mut()
        .map(|a| a.evaluate(EmitTo::All))
        .collect::<datafusion::error::Result<Vec<_>>>()
        .map_err(Box::new)?;
    Ok(ResultRows {
        starts: vec![start; m],
        ends: vec![end; m],
        keys,
        values,
    })
}

/// One window's state as a table: start, fired, keys, accumulator states.
fn state_table(
    start: i64,
    fired: bool,
    n: usize,
    keys: &[ArrayRef],
    states: &[ArrayRef],
) -> Result<RecordBatch> {
    let mut fields = vec![
        Field::new("window_start", DataType::Int64, false),
        Field::new("fired", DataType::Boolean, false),
    ];
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(vec![start; n])),
        Arc::new(BooleanArray::from(vec![fired; n])),
    ];
    for (i, k) in keys.iter().enumerate() {
        fields.push(Field::new(format!("key_{i}"), k.data_type().clone(), true));
        columns.push(k.clone());
    }
    for (i, s) in states.iter().enumerate() {
        fields.push(Field::new(
            format!("state_{i}"),
            s.data_type().clone(),
            true,
        ));
        columns.push(s.clone());
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}
