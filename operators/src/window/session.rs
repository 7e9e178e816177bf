//! Session windows: per key, rows closer than the gap to each other form one
//! window, `[first row, last row + gap)`.
//!
//! ```text
//!  key alice:   ●  ●   ●            ●  ●        rows
//!               [──────────+gap)    [─────+gap)  two sessions
//!  late row:                 ●                   bridges them: one session
//! ```
//!
//! Sessions are held per key, ordered by start, each with one DataFusion
//! `Accumulator` per aggregate (sessions merge, and two per-group
//! accumulators merge through their intermediate state, which a
//! `GroupsAccumulator` cannot do for two arbitrary groups). A batch is sorted
//! by (key, time); each key's new rows are clustered and swept together with
//! that key's sessions, so a row that bridges two sessions merges them, and
//! every session is updated with one `update_batch` per aggregate.
//!
//! Windows are half-open: two rows are in one session when the later one
//! comes strictly less than `gap` after the earlier, so a session closes,
//! and is emitted, when the watermark reaches `last row + gap`. A timer index
//! (`BTreeSet` of due times) makes each watermark cost only the sessions it
//! closes, not every key.
//!
//! # Lateness
//! A row whose session (after merging) ended more than the allowed lateness
//! before the watermark goes to the late output. Within the lateness, a row
//! that only adds to an emitted session emits an `update`; one that changes
//! its bounds (extends it, or merges two) first emits a `retract` of every
//! emitted session it absorbs, and the merged session is emitted as an
//! `insert` once the watermark passes its new end.

use std::collections::BTreeSet;
use std::sync::Arc;

use ahash::HashMap;
use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Int64Array, RecordBatch, UInt32Array,
};
use arrow::compute::{concat_batches, take};
use arrow::datatypes::{DataType, Field, Schema, TimestampMillisecondType};
use arrow::row::{RowConverter, SortField};
use datafusion::logical_expr::Accumulator;
use datafusion::scalar::ScalarValue;
use vigil_engine::{Collector, EventTime, OperatorState, TaskMetrics, LATE};

use super::spec::{finish, with_op, Op, ResultRows, WindowAggregateSpec};
use crate::error::{OperatorError, Result};

struct Session {
    key: u32,
    start: i64,
    /// Last row + gap.
    end: i64,
    accumulators: Vec<Box<dyn Accumulator>>,
    fired: bool,
    /// Due time of the timer entry this session relies on: never later than
    /// its real due time (see [`Sessions::on_watermark`]).
    timer: i64,
}

/// Session window state of one subtask.
pub struct Sessions {
    spec: Arc<WindowAggregateSpec>,
    gap: i64,
    converter: RowConverter,
    key_ids: HashMap<Box<[u8]>, u32>,
    key_rows: Vec<Box<[u8]>>,
    /// Session slots of each key, ordered by start.
    by_key: Vec<Vec<usize>>,
    slots: Vec<Option<Session>>,
    free: Vec<usize>,
    /// (due time, slot): a session fires at its end, and is freed at its
    /// end plus the allowed lateness. Entries are lazy: a session whose end
    /// moves later keeps its entry, which is re-armed when it comes due, so
    /// a row that extends a session costs no timer update.
    timers: BTreeSet<(i64, usize)>,
    watermark: Option<EventTime>,
    metrics: Arc<TaskMetrics>,
}

/// Intervals that overlap: one session after the sweep.
struct Swept {
    start: i64,
    end: i64,
    /// Open sessions it absorbs.
    olds: Vec<usize>,
    /// Clusters of new rows it takes.
    news: Vec<std::ops::Range<usize>>,
}

/// Something swept together: an open session or a cluster of new rows.
enum Item {
    Old(usize),
    New(std::ops::Range<usize>),
}

impl Sessions {
    /// Keys with sessions, and the bytes of keys, sessions and timers.
    pub fn state_size(&self) -> vigil_engine::StateSize {
        let keys: usize = self.key_rows.iter().map(|k| k.len() + 16).sum();
        let sessions: usize = self
            .slots
            .iter()
            .flatten()
            .map(|s| {
                std::mem::size_of::<Session>()
                    + s.accumulators.iter().map(|a| a.size()).sum::<usize>()
            })
            .sum();
        let slots = self.slots.len() * std::mem::size_of::<Option<Session>>();
        let timers = self.timers.len() * std::mem::size_of::<(i64, usize)>();
        vigil_engine::StateSize {
            keys: self.key_ids.len() as u64,
            bytes: (keys * 2 + sessions + slots + timers) as u64,
        }
    }

    /// Empty state for a session window `spec`.
    pub fn new(spec: Arc<WindowAggregateSpec>, metrics: Arc<TaskMetrics>) -> Result<Self> {
        let super::WindowKind::Session { gap_ms } = spec.kind else {
            return Err(OperatorError::config(
                "query",
                "internal: not a session window",
                None,
            ));
        };
        let fields = spec
            .key_columns
            .iter()
            .map(|&c| SortField::new(spec.input.field(c).data_type().clone()))
            .collect();
        Ok(Self {
            converter: RowConverter::new(fields)?,
            spec,
            gap: gap_ms,
            key_ids: HashMap::default(),
            key_rows: Vec::new(),
            by_key: Vec::new(),
            slots: Vec::new(),
            free: Vec::new(),
            timers: BTreeSet::new(),
            watermark: None,
            metrics,
        })
    }

    /// Sessions holding state.
    pub fn open_sessions(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Keys with at least one open session.
    pub fn open_keys(&self) -> usize {
        self.by_key.iter().filter(|s| !s.is_empty()).count()
    }

    fn due(&self, s: &Session) -> i64 {
        if s.fired {
            s.end.saturating_add(self.spec.lateness_ms)
        } else {
            s.end
        }
    }

    fn key_id(&mut self, key: &[u8]) -> u32 {
        if let Some(&id) = self.key_ids.get(key) {
            return id;
        }
        let id = self.key_rows.len() as u32;
        self.key_rows.push(key.into());
        self.key_ids.insert(key.into(), id);
        self.by_key.push(Vec::new());
        id
    }

    fn accumulators(&self) -> Result<Vec<Box<dyn Accumulator>>> {
        Ok(self
            .spec
            .aggregates
            .iter()
            .map(|a| a.accumulator())
            .collect::<datafusion::error::Result<Vec<_>>>()
            .map_err(Box::new)?)
    }

    fn slot(&self, i: usize) -> Result<&Session> {
        self.slots
            .get(i)
            .and_then(|s| s.as_ref())
            .ok_or_else(|| OperatorError::config("query", "internal: session vanished", None))
    }

    fn slot_mut(&mut self, i: usize) -> Result<&mut Session> {
        self.slots
            .get_mut(i)
            .and_then(|s| s.as_mut())
            .ok_or_else(|| OperatorError::config("query", "internal: session vanished", None))
    }

    fn insert(&mut self, mut s: Session) -> usize {
        let due = self.due(&s);
        s.timer = due;
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(s);
                i
            }
            None => {
                self.slots.push(Some(s));
                self.slots.len() - 1
            }
        };
        self.timers.insert((due, i));
        i
    }

    fn remove(&mut self, i: usize) -> Result<Session> {
        let s = self.slots[i]
            .take()
            .ok_or_else(|| OperatorError::config("query", "internal: session vanished", None))?;
        self.by_key[s.key as usize].retain(|&j| j != i);
        self.free.push(i);
        Ok(s)
    }

    /// Arms an earlier timer when a session's due time moved earlier (a
    /// fired session un-fired by a late row).
    fn retime(&mut self, slot: usize) -> Result<()> {
        let s = self.slot(slot)?;
        let due = self.due(s);
        if due < s.timer {
            self.timers.insert((due, slot));
            self.slot_mut(slot)?.timer = due;
        }
        Ok(())
    }

    /// Adds a batch of rows.
    pub fn process(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<()> {
        let n = batch.num_rows();
        let ts = batch
            .column(self.spec.time_column)
            .as_primitive::<TimestampMillisecondType>()
            .clone();
        let key_arrays: Vec<ArrayRef> = self
            .spec
            .key_columns
            .iter()
            .map(|&c| batch.column(c).clone())
            .collect();
        // Without keys every row has the one (empty) key.
        let rows = if key_arrays.is_empty() {
            None
        } else {
            Some(self.converter.convert_columns(&key_arrays)?)
        };
        // (key, time, row), rows without event time are late.
        let mut order: Vec<(u32, i64, u32)> = Vec::with_capacity(n);
        let mut late: Vec<u32> = Vec::new();
        for i in 0..n {
            if ts.is_null(i) {
                late.push(i as u32);
                continue;
            }
            let key = match &rows {
                Some(r) => self.key_id(r.row(i).as_ref()),
                None => self.key_id(&[]),
            };
            order.push((key, ts.value(i), i as u32));
        }
        order.sort_unstable();
        let args: Vec<Vec<ArrayRef>> = self
            .spec
            .aggregates
            .iter()
            .map(|a| a.arguments(&batch))
            .collect::<datafusion::error::Result<_>>()
            .map_err(Box::new)?;
        let masks: Vec<Option<BooleanArray>> = self
            .spec
            .aggregates
            .iter()
            .map(|a| a.mask(&batch))
            .collect::<datafusion::error::Result<_>>()
            .map_err(Box::new)?;
        let mut retracts: Vec<RecordBatch> = Vec::new();
        let mut updates: Vec<RecordBatch> = Vec::new();
        let mut inserts: Vec<usize> = Vec::new();
        let mut at = 0;
        while at < order.len() {
            let key = order[at].0;
            let mut end = at;
            while end < order.len() && order[end].0 == key {
                end += 1;
            }
            self.add_key(
                key,
                &order[at..end],
                &args,
                &masks,
                &mut late,
                &mut retracts,
                &mut updates,
                &mut inserts,
            )?;
            at = end;
        }
        if !late.is_empty() {
            late.sort_unstable();
            let idx = UInt32Array::from(late);
            let rows = arrow::compute::take_record_batch(&batch, &idx)?;
            TaskMetrics::add(&self.metrics.late_records, rows.num_rows());
            out.emit_side(LATE, rows);
        }
        for r in retracts {
            out.emit(with_op(&self.spec, r, Op::Retract)?);
        }
        for u in updates {
            out.emit(with_op(&self.spec, u, Op::Update)?);
        }
        if !inserts.is_empty() {
            let batch = self.evaluate(&inserts)?;
            out.emit(with_op(&self.spec, batch, Op::Insert)?);
        }
        Ok(())
    }

    /// Folds one key's rows (sorted by time) into its sessions.
    #[allow(clippy::too_many_arguments)]
    fn add_key(
        &mut self,
        key: u32,
        rows: &[(u32, i64, u32)],
        args: &[Vec<ArrayRef>],
        masks: &[Option<BooleanArray>],
        late: &mut Vec<u32>,
        retracts: &mut Vec<RecordBatch>,
        updates: &mut Vec<RecordBatch>,
        inserts: &mut Vec<usize>,
    ) -> Result<()> {
        let gap = self.gap;
        let watermark = self.watermark.unwrap_or(i64::MIN);
        // Clusters of new rows: each next row strictly within the gap.
        let mut items: Vec<(i64, i64, Item)> = Vec::new();
        let mut i = 0;
        while i < rows.len() {
            let start = rows[i].1;
            let mut end = start.saturating_add(gap);
            let mut j = i + 1;
            while j < rows.len() && rows[j].1 < end {
                end = end.max(rows[j].1.saturating_add(gap));
                j += 1;
            }
            items.push((start, end, Item::New(i..j)));
            i = j;
        }
        for &slot in &self.by_key[key as usize] {
            let s = self.slot(slot)?;
            items.push((s.start, s.end, Item::Old(slot)));
        }
        items.sort_by_key(|(s, _, _)| *s);
        // Sweep: overlapping intervals become one session.
        let mut groups: Vec<Swept> = Vec::new();
        for (start, end, item) in items {
            let merge = groups.last().is_some_and(|g| start < g.end);
            if !merge {
                groups.push(Swept {
                    start,
                    end,
                    olds: Vec::new(),
                    news: Vec::new(),
                });
            }
            let Some(g) = groups.last_mut() else {
                continue;
            };
            g.end = g.end.max(end);
            match item {
                Item::Old(slot) => g.olds.push(slot),
                Item::New(r) => g.news.push(r),
            }
        }
        for Swept {
            start,
            end,
            olds,
            news,
        } in groups
        {
            if news.is_empty() {
                continue;
            }
            let picked: Vec<u32> = news
                .iter()
                .flat_map(|r| rows[r.clone()].iter().map(|x| x.2))
                .collect();
            if olds.is_empty() {
                if end.saturating_add(self.spec.lateness_ms) <= watermark {
                    late.extend(picked);
                    continue;
                }
                let mut accumulators = self.accumulators()?;
                update(&mut accumulators, args, masks, &picked)?;
                let slot = self.insert(Session {
                    key,
                    start,
                    end,
                    accumulators,
                    fired: false,
                    timer: 0,
                });
                self.by_key[key as usize].push(slot);
                if end <= watermark {
                    self.fire(slot, inserts)?;
                }
                continue;
            }
            // The session keeps the first slot; the others merge into it.
            let target = olds[0];
            let (old_start, old_end) = {
                let s = self.slot(target)?;
                (s.start, s.end)
            };
            let changes_bounds = olds.len() > 1 || old_start != start || old_end != end;
            if changes_bounds {
                for &slot in &olds {
                    if self.slot(slot)?.fired {
                        retracts.push(self.evaluate(&[slot])?);
                    }
                }
            }
            if olds.len() == 1 {
                // One session grows: update it where it is.
                let s = self.slot_mut(target)?;
                update(&mut s.accumulators, args, masks, &picked)?;
                let was_fired = s.fired;
                s.start = start;
                s.end = end;
                if changes_bounds {
                    s.fired = false;
                }
                self.retime(target)?;
                if old_start != start {
                    let slots = &self.slots;
                    self.by_key[key as usize]
                        .sort_by_key(|&j| slots[j].as_ref().map_or(i64::MAX, |s| s.start));
                }
                if was_fired && !changes_bounds {
                    updates.push(self.evaluate(&[target])?);
                } else if end <= watermark {
                    self.fire(target, inserts)?;
                }
                continue;
            }
            let mut merged = Vec::new();
            for &slot in &olds[1..] {
                merged.push(self.remove(slot)?);
            }
            let mut s = self.remove(target)?;
            for other in merged.iter_mut() {
                for (a, b) in s.accumulators.iter_mut().zip(other.accumulators.iter_mut()) {
                    let state = b.state().map_err(Box::new)?;
                    let arrays = state
                        .into_iter()
                        .map(|v| v.to_array())
                        .collect::<datafusion::error::Result<Vec<_>>>()
                        .map_err(Box::new)?;
                    a.merge_batch(&arrays).map_err(Box::new)?;
                }
            }
            update(&mut s.accumulators, args, masks, &picked)?;
            let was_fired = s.fired;
            s.start = start;
            s.end = end;
            if changes_bounds {
                s.fired = false;
            }
            let slot = self.insert(s);
            let list = &mut self.by_key[key as usize];
            list.push(slot);
            let slots = &self.slots;
            list.sort_by_key(|&j| slots[j].as_ref().map_or(i64::MAX, |s| s.start));
            if was_fired && !changes_bounds {
                updates.push(self.evaluate(&[slot])?);
            } else if end <= watermark {
                self.fire(slot, inserts)?;
            }
        }
        Ok(())
    }

    /// Marks a session emitted: freed now without lateness, else kept.
    fn fire(&mut self, slot: usize, inserts: &mut Vec<usize>) -> Result<()> {
        inserts.push(slot);
        // Its due time moves later: the existing timer entry still holds.
        self.slot_mut(slot)?.fired = true;
        Ok(())
    }

    /// Result rows of some sessions, in the query's output schema.
    fn evaluate(&mut self, slots: &[usize]) -> Result<RecordBatch> {
        let mut starts = Vec::with_capacity(slots.len());
        let mut ends = Vec::with_capacity(slots.len());
        let mut keys = Vec::with_capacity(slots.len());
        let mut values: Vec<Vec<ScalarValue>> = vec![Vec::new(); self.spec.aggregates.len()];
        for &slot in slots {
            let s = self.slots[slot].as_mut().ok_or_else(|| {
                OperatorError::config("query", "internal: session vanished", None)
            })?;
            starts.push(s.start);
            ends.push(s.end);
            keys.push(s.key);
            for (v, a) in values.iter_mut().zip(s.accumulators.iter_mut()) {
                v.push(a.evaluate().map_err(Box::new)?);
            }
        }
        let parser = self.converter.parser();
        let key_arrays = if self.spec.key_columns.is_empty() {
            Vec::new()
        } else {
            self.converter.convert_rows(
                keys.iter()
                    .map(|&k| parser.parse(&self.key_rows[k as usize])),
            )?
        };
        let values = values
            .into_iter()
            .zip(&self.spec.aggregates)
            .map(|(v, call)| {
                if v.is_empty() {
                    Ok(arrow::array::new_empty_array(call.expr.field().data_type()))
                } else {
                    ScalarValue::iter_to_array(v)
                }
            })
            .collect::<datafusion::error::Result<Vec<_>>>()
            .map_err(Box::new)?;
        finish(
            &self.spec,
            ResultRows {
                starts,
                ends,
                keys: key_arrays,
                values,
            },
        )
    }

    /// The watermark advanced: emit sessions that ended, free those past
    /// their lateness.
    pub fn on_watermark(&mut self, watermark: EventTime, out: &mut Collector) -> Result<()> {
        self.watermark = Some(watermark);
        let mut fire = Vec::new();
        let mut drop = Vec::new();
        let lateness = self.spec.lateness_ms;
        while let Some(&(due, slot)) = self.timers.first() {
            if due > watermark {
                break;
            }
            self.timers.pop_first();
            // An entry of a freed session, of a slot's earlier occupant, or
            // one superseded by an earlier timer: nothing to do.
            let Some(s) = self.slots[slot].as_mut() else {
                continue;
            };
            if s.timer != due {
                continue;
            }
            let actual = if s.fired {
                s.end.saturating_add(lateness)
            } else {
                s.end
            };
            if actual > watermark {
                // The session grew since this entry was armed.
                s.timer = actual;
                self.timers.insert((actual, slot));
                continue;
            }
            if !s.fired {
                fire.push(slot);
            }
            if s.end.saturating_add(lateness) <= watermark {
                drop.push(slot);
            } else {
                // Fired now, freed once the lateness has passed.
                s.fired = true;
                s.timer = s.end.saturating_add(lateness);
                self.timers.insert((s.timer, slot));
            }
        }
        if !fire.is_empty() {
            fire.sort_by_key(|&slot| self.slots[slot].as_ref().map(|s| (s.start, s.key)));
            let batch = self.evaluate(&fire)?;
            out.emit(with_op(&self.spec, batch, Op::Insert)?);
        }
        for slot in drop {
            self.remove(slot)?;
        }
        // Keys with no session left free their entry. Open sessions bound
        // the live keys from above, so the check costs nothing per watermark.
        let open = self.slots.len() - self.free.len();
        if self.key_rows.len() > 1024 && open * 2 < self.key_rows.len() {
            self.compact_keys();
        }
        Ok(())
    }

    /// Forgets keys that hold no session, so key memory follows live keys.
    fn compact_keys(&mut self) {
        let mut remap = vec![u32::MAX; self.key_rows.len()];
        let mut key_rows = Vec::new();
        let mut by_key = Vec::new();
        for (old, sessions) in std::mem::take(&mut self.by_key).into_iter().enumerate() {
            if sessions.is_empty() {
                continue;
            }
            remap[old] = key_rows.len() as u32;
            key_rows.push(std::mem::take(&mut self.key_rows[old]));
            by_key.push(sessions);
        }
        for s in self.slots.iter_mut().flatten() {
            s.key = remap[s.key as usize];
        }
        self.key_ids = key_rows
            .iter()
            .enumerate()
            .map(|(i, k)| (k.clone(), i as u32))
            .collect();
        self.key_rows = key_rows;
        self.by_key = by_key;
    }

    /// Every open session, as one state table.
    pub fn snapshot(&mut self) -> Result<OperatorState> {
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let (mut starts, mut ends, mut fired) = (Vec::new(), Vec::new(), Vec::new());
        let mut states: Vec<Vec<ScalarValue>> = Vec::new();
        let fresh: Vec<usize> = (0..self.slots.len()).collect();
        for slot in fresh {
            let Some(s) = self.slots[slot].as_mut() else {
                continue;
            };
            keys.push(self.key_rows[s.key as usize].to_vec());
            starts.push(s.start);
            ends.push(s.end);
            fired.push(s.fired);
            let mut col = 0;
            let mut rebuilt = Vec::with_capacity(s.accumulators.len());
            for (call, a) in self.spec.aggregates.iter().zip(s.accumulators.iter_mut()) {
                let state = a.state().map_err(Box::new)?;
                let arrays = state
                    .iter()
                    .map(|v| v.to_array())
                    .collect::<datafusion::error::Result<Vec<_>>>()
                    .map_err(Box::new)?;
                let mut again = call.accumulator().map_err(Box::new)?;
                again.merge_batch(&arrays).map_err(Box::new)?;
                rebuilt.push(again);
                for v in state {
                    if states.len() <= col {
                        states.push(Vec::new());
                    }
                    states[col].push(v);
                    col += 1;
                }
            }
            s.accumulators = rebuilt;
        }
        let mut fields = vec![
            Field::new("key", DataType::Binary, false),
            Field::new("start", DataType::Int64, false),
            Field::new("end", DataType::Int64, false),
            Field::new("fired", DataType::Boolean, false),
        ];
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(BinaryArray::from_iter_values(keys.iter())),
            Arc::new(Int64Array::from(starts)),
            Arc::new(Int64Array::from(ends)),
            Arc::new(BooleanArray::from(fired)),
        ];
        let state_fields: Vec<_> = self
            .spec
            .aggregates
            .iter()
            .map(|c| c.expr.state_fields())
            .collect::<datafusion::error::Result<Vec<_>>>()
            .map_err(Box::new)?
            .into_iter()
            .flatten()
            .collect();
        for (i, f) in state_fields.iter().enumerate() {
            let values = states.get(i).cloned().unwrap_or_default();
            let array = if values.is_empty() {
                arrow::array::new_empty_array(f.data_type())
            } else {
                ScalarValue::iter_to_array(values).map_err(Box::new)?
            };
            fields.push(Field::new(
                format!("state_{i}"),
                array.data_type().clone(),
                true,
            ));
            columns.push(array);
        }
        let table = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
        let table = if self.spec.key_columns.is_empty() {
            table
        } else {
            let parser = self.converter.parser();
            let key_arrays = self
                .converter
                .convert_rows(keys.iter().map(|k| parser.parse(k)))?;
            vigil_engine::key_group::tag(table, &key_arrays)?
        };
        let wm = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new(
                "watermark",
                DataType::Int64,
                true,
            )])),
            vec![Arc::new(Int64Array::from(vec![self.watermark]))],
        )?;
        Ok(OperatorState {
            batches: vec![wm, table],
        })
    }

    /// Replaces the state with a snapshot's.
    pub fn restore(&mut self, state: OperatorState) -> Result<()> {
        let [wm, tables @ ..] = state.batches.as_slice() else {
            return Err(OperatorError::config(
                "query",
                "session state has no watermark table",
                None,
            ));
        };
        let w = wm.column(0).as_primitive::<arrow::datatypes::Int64Type>();
        let watermark = (w.len() == 1 && w.is_valid(0)).then(|| w.value(0));
        // Restores add up (one per old subtask after a rescale).
        self.watermark = match (self.watermark, watermark) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if tables.is_empty() {
            return Ok(());
        }
        let table = concat_batches(&tables[0].schema(), tables)?;
        let keys = table.column(0).as_binary::<i32>();
        let starts = table
            .column(1)
            .as_primitive::<arrow::datatypes::Int64Type>();
        let ends = table
            .column(2)
            .as_primitive::<arrow::datatypes::Int64Type>();
        let fired = table.column(3).as_boolean();
        let widths = self.spec.state_widths.clone();
        for row in 0..table.num_rows() {
            let key = self.key_id(keys.value(row));
            let mut accumulators = self.accumulators()?;
            let mut col = 4;
            for (a, &w) in accumulators.iter_mut().zip(&widths) {
                let arrays: Vec<ArrayRef> = (col..col + w)
                    .map(|c| table.column(c).slice(row, 1))
                    .collect();
                a.merge_batch(&arrays).map_err(Box::new)?;
                col += w;
            }
            let slot = self.insert(Session {
                key,
                start: starts.value(row),
                end: ends.value(row),
                accumulators,
                fired: fired.value(row),
                timer: 0,
            });
            self.by_key[key as usize].push(slot);
        }
        let slots = &self.slots;
        for list in self.by_key.iter_mut() {
            list.sort_by_key(|&j| slots[j].as_ref().map_or(i64::MAX, |s| s.start));
        }
        Ok(())
    }
}

/// Feeds rows `picked` of a batch to one session's accumulators.
fn update(
    accumulators: &mut [Box<dyn Accumulator>],
    args: &[Vec<ArrayRef>],
    masks: &[Option<BooleanArray>],
    picked: &[u32],
) -> Result<()> {
    for ((acc, args), mask) in accumulators.iter_mut().zip(args).zip(masks) {
        let rows: Vec<u32> = match mask {
            Some(m) => picked
                .iter()
                .copied()
                .filter(|&r| m.is_valid(r as usize) && m.value(r as usize))
                .collect(),
            None => picked.to_vec(),
        };
        if rows.is_empty() {
            continue;
        }
        let idx = UInt32Array::from(rows);
        let taken = args
            .iter()
            .map(|a| take(a.as_ref(), &idx, None))
            .collect::<Result<Vec<_>, _>>()?;
        acc.update_batch(&taken).map_err(Box::new)?;
    }
    Ok(())
}
