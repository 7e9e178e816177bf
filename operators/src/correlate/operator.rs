//! The correlation operator: per-group state machines run in event-time
//! order once the watermark has passed the events.
//!
//! # Order
//! Rows wait until the watermark passes them, then run sorted by event time.
//! Rows with equal event times run `until` first, then later steps before
//! earlier ones, so a step always needs a strictly later event than the
//! step before it and an `until` at the same instant as a step wins. A row
//! that arrives behind the watermark goes to the `late` output (in the
//! step's narrow row: time, group, id, value) and is counted.
//!
//! # event_count and value_count
//! Per group, the events of the last `timespan` (`last - first <= timespan`,
//! as EQL's `maxspan`) slide along with event time. Events with the same
//! event time are added together, then the condition is checked once. When
//! it holds and the group is not suppressed, one row is emitted with the
//! count and the first and last event times; the window is emptied and the
//! group stays quiet for `suppress` (default: the timespan). Events keep
//! counting while it is quiet, so a burst that goes on alerts once per
//! span, and a burst that straddles a minute boundary is still one alert.
//!
//! # temporal_ordered (EQL sequences)
//! As Elastic documents for EQL: each step but the last is a state holding
//! at most one pending sequence per group; a newer sequence entering a state
//! replaces the one there. An event of step 0 starts a sequence; an event of
//! step k moves the sequence waiting in state k-1 to state k, if its first
//! event is at most `timespan` before; the last step completes it and one row
//! is emitted with every step's event id and time. An `until` event drops
//! the group's pending sequences.
//!
//! # temporal
//! Every rule matched, in any order, within `timespan`: per group the most
//! recent event of each rule is kept; when all are within the span, one row
//! is emitted and the group starts over.
//!
//! # State
//! A sweep every eighth of the timespan drops what can no longer take part
//! in a match (window events older than `watermark - timespan`, sequences
//! whose first event is that old) and forgets groups left with nothing, so
//! state is bounded by the span, not the stream.

use std::collections::VecDeque;
use std::sync::Arc;

use ahash::{HashMap, HashSet};
use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Int32Array, Int64Array, RecordBatch,
    StringArray, StringBuilder, TimestampMillisecondBuilder, UInt64Builder,
};
use arrow::compute::{cast, filter_record_batch, not};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMillisecondType};
use arrow::row::{RowConverter, SortField};
use vigil_engine::{
    Collector, EngineError, EventTime, Operator, OperatorFactory, OperatorState, TaskContext,
    TaskMetrics, LATE,
};

use super::config::CorrelationType;
use crate::late::split_late;

/// Column of the prepared rows holding event time.
pub const TIME: usize = 0;

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// A planned correlation.
#[derive(Debug, Clone)]
pub struct CorrelationSpec {
    /// Step name, for errors.
    pub name: String,
    /// Value of the output's `rule` column.
    pub rule: String,
    /// Which correlation.
    pub kind: CorrelationType,
    /// Names of the rules, one per input, in order.
    pub steps: Vec<String>,
    /// Whether the last input is the `until` rule.
    pub until: bool,
    /// Group-by fields: columns `1..=len` of every input.
    pub group_by: Vec<String>,
    /// Columns carried from a step's event into the output: the step and
    /// the column's name, which is also its name in the prepared rows (after
    /// the id and value) and in the output.
    pub carried: Vec<(usize, String)>,
    /// Largest distance between the first and last event, ms.
    pub timespan_ms: i64,
    /// Counts: fire at this many or more.
    pub min_count: u64,
    /// Counts: quiet time after an alert, ms.
    pub suppress_ms: i64,
    /// The prepared rows every input has.
    pub input: SchemaRef,
}

impl CorrelationSpec {
    fn id_col(&self) -> usize {
        1 + self.group_by.len()
    }

    fn value_col(&self) -> usize {
        2 + self.group_by.len()
    }

    fn rules(&self) -> usize {
        self.steps.len() - usize::from(self.until)
    }

    fn is_count(&self) -> bool {
        matches!(
            self.kind,
            CorrelationType::EventCount | CorrelationType::ValueCount
        )
    }

    /// The output: rule, group, then counts or each step's id and time, then
    /// the first and last event times and an id for the alert.
    pub fn output_schema(&self) -> SchemaRef {
        let mut fields = vec![Field::new("rule", DataType::Utf8, false)];
        fields.extend(
            self.group_by
                .iter()
                .map(|g| Field::new(g, DataType::Utf8, false)),
        );
        if self.is_count() {
            let name = match self.kind {
                CorrelationType::ValueCount => "value_count",
                _ => "event_count",
            };
            fields.push(Field::new(name, DataType::UInt64, false));
        } else {
            for (k, s) in self.steps[..self.rules()].iter().enumerate() {
                fields.push(Field::new(format!("{s}_id"), DataType::Utf8, true));
                fields.push(Field::new(format!("{s}_ts"), ts_type(), false));
                for (_, c) in self.carried.iter().filter(|(step, _)| *step == k) {
                    fields.push(Field::new(c, DataType::Utf8, true));
                }
            }
        }
        fields.push(Field::new("first_ts", ts_type(), false));
        fields.push(Field::new("last_ts", ts_type(), false));
        fields.push(Field::new("id", DataType::Utf8, false));
        Arc::new(Schema::new(fields))
    }
}

/// Builds correlation subtasks.
#[derive(Debug)]
pub struct CorrelateFactory {
    spec: Arc<CorrelationSpec>,
    output: SchemaRef,
}

impl CorrelateFactory {
    /// A factory for `spec`.
    pub fn new(spec: CorrelationSpec) -> Self {
        let output = spec.output_schema();
        Self {
            spec: Arc::new(spec),
            output,
        }
    }

    /// Builds one subtask directly (tests).
    pub fn build(&self, ctx: &TaskContext) -> crate::Result<Correlation> {
        let fields = (0..self.spec.group_by.len())
            .map(|_| SortField::new(DataType::Utf8))
            .collect();
        Ok(Correlation {
            spec: self.spec.clone(),
            output: self.output.clone(),
            keys: RowConverter::new(fields)?,
            groups: HashMap::default(),
            pending: Vec::new(),
            seq: 0,
            watermark: EventTime::MIN,
            next_sweep: EventTime::MIN,
            metrics: ctx.metrics.clone(),
        })
    }
}

impl OperatorFactory for CorrelateFactory {
    fn output_schema(&self) -> SchemaRef {
        self.output.clone()
    }

    /// An alert happens at its last event.
    fn event_time_column(&self) -> Option<String> {
        Some("last_ts".to_string())
    }
    fn create(&self, ctx: &TaskContext) -> vigil_engine::Result<Box<dyn Operator>> {
        Ok(Box::new(self.build(ctx)?))
    }
    fn key_columns(&self) -> Vec<String> {
        self.spec.group_by.clone()
    }
    fn side_outputs(&self) -> Vec<(vigil_engine::operator::SidePort, SchemaRef)> {
        vec![(LATE, self.spec.input.clone())]
    }
    fn describe(&self) -> String {
        let kind = match self.spec.kind {
            CorrelationType::EventCount => "event_count",
            CorrelationType::ValueCount => "value_count",
            CorrelationType::Temporal => "temporal",
            CorrelationType::TemporalOrdered => "temporal_ordered",
        };
        let mut s = format!(
            "correlate {kind} of [{}] by [{}] within {} ms",
            self.spec.steps[..self.spec.rules()].join(", "),
            self.spec.group_by.join(", "),
            self.spec.timespan_ms
        );
        if self.spec.is_count() {
            s.push_str(&format!(" when >= {}", self.spec.min_count));
        }
        if self.spec.until {
            s.push_str(&format!(" until {}", self.spec.steps[self.spec.rules()]));
        }
        s
    }
}

/// One event of a sequence or a temporal match.
#[derive(Debug, Clone)]
struct Hit {
    ts: i64,
    id: Option<String>,
    /// Its step's carried columns.
    carried: Vec<Option<String>>,
}

#[derive(Debug, Default)]
struct CountState {
    /// Events in the span: time and value (value_count).
    window: VecDeque<(i64, Option<Box<[u8]>>)>,
    /// How many window events have each value.
    values: HashMap<Box<[u8]>, u32>,
    /// No alert before this time.
    quiet_until: i64,
}

#[derive(Debug)]
enum Group {
    Count(CountState),
    /// State `k` holds the sequence whose last event is step `k`.
    Sequence(Vec<Option<Vec<Hit>>>),
    /// The latest event of each rule.
    Temporal(Vec<Option<Hit>>),
}

impl Group {
    fn is_empty(&self) -> bool {
        match self {
            Group::Count(c) => c.window.is_empty(),
            Group::Sequence(s) => s.iter().all(Option::is_none),
            Group::Temporal(t) => t.iter().all(Option::is_none),
        }
    }
}

/// One released event, to sort.
struct Event {
    ts: i64,
    rank: u32,
    seq: u64,
    batch: u32,
    row: u32,
}

/// One subtask of a correlation.
pub struct Correlation {
    spec: Arc<CorrelationSpec>,
    output: SchemaRef,
    keys: RowConverter,
    groups: HashMap<Box<[u8]>, Group>,
    /// Rows waiting for the watermark: input, arrival number, batch.
    pending: Vec<(usize, u64, RecordBatch)>,
    seq: u64,
    watermark: EventTime,
    next_sweep: EventTime,
    metrics: Arc<TaskMetrics>,
}

/// Output rows being built.
struct Alerts {
    rule: StringBuilder,
    keys: Vec<StringBuilder>,
    count: UInt64Builder,
    step_ids: Vec<StringBuilder>,
    step_ts: Vec<TimestampMillisecondBuilder>,
    /// Per step, its carried columns.
    carried: Vec<Vec<StringBuilder>>,
    first: TimestampMillisecondBuilder,
    last: TimestampMillisecondBuilder,
    id: StringBuilder,
    rows: usize,
}

impl Alerts {
    fn new(spec: &CorrelationSpec) -> Self {
        let steps = if spec.is_count() { 0 } else { spec.rules() };
        Self {
            rule: StringBuilder::new(),
            keys: (0..spec.group_by.len())
                .map(|_| StringBuilder::new())
                .collect(),
            count: UInt64Builder::new(),
            step_ids: (0..steps).map(|_| StringBuilder::new()).collect(),
            step_ts: (0..steps)
                .map(|_| TimestampMillisecondBuilder::new())
                .collect(),
            carried: (0..steps)
                .map(|k| {
                    spec.carried
                        .iter()
                        .filter(|(s, _)| *s == k)
                        .map(|_| StringBuilder::new())
                        .collect()
                })
                .collect(),
            first: TimestampMillisecondBuilder::new(),
            last: TimestampMillisecondBuilder::new(),
            id: StringBuilder::new(),
            rows: 0,
        }
    }

    fn push(&mut self, rule: &str, key: &[String], first: i64, last: i64) {
        self.rule.append_value(rule);
        for (b, k) in self.keys.iter_mut().zip(key) {
            b.append_value(k);
        }
        self.first.append_value(first);
        self.last.append_value(last);
        self.id
            .append_value(format!("{rule}:{first}:{}", key.join("|")));
        self.rows += 1;
    }

    fn finish(mut self, schema: &SchemaRef, count: bool) -> Result<RecordBatch, EngineError> {
        let tz = |b: &mut TimestampMillisecondBuilder| -> ArrayRef {
            Arc::new(b.finish().with_timezone("UTC"))
        };
        let mut columns: Vec<ArrayRef> = vec![Arc::new(self.rule.finish())];
        for k in &mut self.keys {
            columns.push(Arc::new(k.finish()));
        }
        if count {
            columns.push(Arc::new(self.count.finish()));
        } else {
            for ((i, t), c) in self
                .step_ids
                .iter_mut()
                .zip(self.step_ts.iter_mut())
                .zip(self.carried.iter_mut())
            {
                columns.push(Arc::new(i.finish()));
                columns.push(tz(t));
                for b in c {
                    columns.push(Arc::new(b.finish()));
                }
            }
        }
        columns.push(tz(&mut self.first));
        columns.push(tz(&mut self.last));
        columns.push(Arc::new(self.id.finish()));
        Ok(RecordBatch::try_new(schema.clone(), columns)?)
    }
}

impl Correlation {
    /// Groups with state.
    pub fn state_groups(&self) -> usize {
        self.groups.len()
    }

    /// Rows waiting for the watermark.
    pub fn pending_rows(&self) -> usize {
        self.pending.iter().map(|(_, _, b)| b.num_rows()).sum()
    }

    /// Order of rows with equal event times: `until` first, then later
    /// steps before earlier ones.
    fn rank(&self, input: usize) -> u32 {
        if self.spec.until && input == self.spec.rules() {
            0
        } else {
            (self.spec.steps.len() - input) as u32
        }
    }

    /// Runs every pending row behind `watermark`, in event-time order.
    fn release(&mut self, watermark: EventTime, out: &mut Collector) -> vigil_engine::Result<()> {
        let mut ready: Vec<(usize, RecordBatch)> = Vec::new();
        let mut kept = Vec::with_capacity(self.pending.len());
        for (input, seq, batch) in std::mem::take(&mut self.pending) {
            let times = batch
                .column(TIME)
                .as_primitive::<TimestampMillisecondType>();
            match arrow::compute::max(times) {
                Some(m) if m < watermark => ready.push((input, batch)),
                _ => {
                    if arrow::compute::min(times).is_some_and(|m| m < watermark) {
                        let mask: BooleanArray =
                            times.iter().map(|t| t.map(|t| t < watermark)).collect();
                        ready.push((input, filter_record_batch(&batch, &mask)?));
                        kept.push((input, seq, filter_record_batch(&batch, &not(&mask)?)?));
                    } else {
                        kept.push((input, seq, batch));
                    }
                }
            }
        }
        self.pending = kept;
        if ready.is_empty() {
            return Ok(());
        }
        let mut events = Vec::new();
        let mut keys = Vec::with_capacity(ready.len());
        let nkeys = self.spec.group_by.len();
        for (b, (input, batch)) in ready.iter().enumerate() {
            let columns: Vec<ArrayRef> = batch.columns()[1..=nkeys].to_vec();
            let valid: Vec<bool> = (0..batch.num_rows())
                .map(|i| columns.iter().all(|c| c.is_valid(i)))
                .collect();
            keys.push(self.keys.convert_columns(&columns)?);
            let times = batch
                .column(TIME)
                .as_primitive::<TimestampMillisecondType>();
            for (i, ok) in valid.into_iter().enumerate() {
                // A row without its group-by fields correlates with nothing.
                if ok {
                    self.seq += 1;
                    events.push(Event {
                        ts: times.value(i),
                        rank: self.rank(*input),
                        seq: self.seq,
                        batch: b as u32,
                        row: i as u32,
                    });
                }
            }
        }
        events.sort_unstable_by_key(|e| (e.ts, e.rank, e.seq));
        let mut alerts = Alerts::new(&self.spec);
        let mut i = 0;
        while i < events.len() {
            // Events with one event time are added together, then checked.
            let mut j = i;
            while j < events.len() && events[j].ts == events[i].ts {
                j += 1;
            }
            let mut touched: Vec<usize> = Vec::new();
            for (at, e) in events.iter().enumerate().take(j).skip(i) {
                let (input, batch) = &ready[e.batch as usize];
                let key = keys[e.batch as usize].row(e.row as usize);
                let row = e.row as usize;
                if self.spec.is_count() {
                    if self.count(key.as_ref(), batch, row, e.ts) {
                        touched.push(at);
                    }
                } else {
                    self.step(*input, key.as_ref(), batch, row, e.ts, &mut alerts)?;
                }
            }
            let mut seen: HashSet<&[u8]> = HashSet::default();
            for t in touched {
                let e = &events[t];
                let key = keys[e.batch as usize].row(e.row as usize);
                if seen.insert(key.data()) {
                    let batch = &ready[e.batch as usize].1;
                    self.check(key.as_ref(), batch, e.row as usize, e.ts, &mut alerts);
                }
            }
            i = j;
        }
        if alerts.rows > 0 {
            let batch = alerts.finish(&self.output, self.spec.is_count())?;
            out.emit(batch);
        }
        Ok(())
    }

    fn key_text(batch: &RecordBatch, row: usize, n: usize) -> Vec<String> {
        (1..=n)
            .map(|c| batch.column(c).as_string::<i32>().value(row).to_string())
            .collect()
    }

    fn id(&self, batch: &RecordBatch, row: usize) -> Option<String> {
        let ids = batch.column(self.spec.id_col()).as_string::<i32>();
        ids.is_valid(row).then(|| ids.value(row).to_string())
    }

    /// Adds an event to its group's window; true if the group is new to
    /// this instant's batch of checks.
    fn count(&mut self, key: &[u8], batch: &RecordBatch, row: usize, ts: i64) -> bool {
        let value = if self.spec.kind == CorrelationType::ValueCount {
            let values = batch.column(self.spec.value_col()).as_string::<i32>();
            if values.is_null(row) {
                // Nothing to count distinctly.
                return false;
            }
            Some(Box::<[u8]>::from(values.value(row).as_bytes()))
        } else {
            None
        };
        let group = match self.groups.get_mut(key) {
            Some(g) => g,
            None => self
                .groups
                .entry(key.into())
                .or_insert_with(|| Group::Count(CountState::default())),
        };
        let Group::Count(c) = group else {
            return false;
        };
        if let Some(v) = &value {
            *c.values.entry(v.clone()).or_insert(0) += 1;
        }
        c.window.push_back((ts, value));
        true
    }

    /// Evicts what is older than the span and fires if the condition holds.
    fn check(&mut self, key: &[u8], batch: &RecordBatch, row: usize, ts: i64, alerts: &mut Alerts) {
        let span = self.spec.timespan_ms;
        let value_count = self.spec.kind == CorrelationType::ValueCount;
        let Some(Group::Count(c)) = self.groups.get_mut(key) else {
            return;
        };
        evict(c, ts - span);
        let n = if value_count {
            c.values.len() as u64
        } else {
            c.window.len() as u64
        };
        if n < self.spec.min_count || ts < c.quiet_until {
            return;
        }
        let first = c.window.front().map_or(ts, |(t, _)| *t);
        c.window.clear();
        c.values.clear();
        c.quiet_until = ts + self.spec.suppress_ms;
        let key = Self::key_text(batch, row, self.spec.group_by.len());
        alerts.count.append_value(n);
        alerts.push(&self.spec.rule, &key, first, ts);
    }

    /// One event of a sequence or temporal correlation.
    fn step(
        &mut self,
        input: usize,
        key: &[u8],
        batch: &RecordBatch,
        row: usize,
        ts: i64,
        alerts: &mut Alerts,
    ) -> vigil_engine::Result<()> {
        let rules = self.spec.rules();
        let span = self.spec.timespan_ms;
        if self.spec.until && input == rules {
            // Cancels what is pending for the group; never starts anything.
            self.groups.remove(key);
            return Ok(());
        }
        let carried = self
            .spec
            .carried
            .iter()
            .enumerate()
            .filter(|(_, (s, _))| *s == input)
            .map(|(i, _)| {
                let c = batch
                    .column(3 + self.spec.group_by.len() + i)
                    .as_string::<i32>();
                c.is_valid(row).then(|| c.value(row).to_string())
            })
            .collect();
        let hit = Hit {
            ts,
            id: self.id(batch, row),
            carried,
        };
        let kind = self.spec.kind;
        let group = match self.groups.get_mut(key) {
            Some(g) => g,
            // A later step of a sequence with nothing pending changes nothing.
            None if kind == CorrelationType::TemporalOrdered && input > 0 => return Ok(()),
            None => self.groups.entry(key.into()).or_insert_with(|| {
                if kind == CorrelationType::Temporal {
                    Group::Temporal(vec![None; rules])
                } else {
                    Group::Sequence(vec![None; rules])
                }
            }),
        };
        let done: Option<Vec<Hit>> = match group {
            Group::Sequence(states) => {
                if input == 0 {
                    if rules == 1 {
                        Some(vec![hit])
                    } else {
                        states[0] = Some(vec![hit]);
                        None
                    }
                } else {
                    match states[input - 1].take() {
                        Some(mut seq) if ts - seq[0].ts <= span => {
                            seq.push(hit);
                            if input == rules - 1 {
                                Some(seq)
                            } else {
                                states[input] = Some(seq);
                                None
                            }
                        }
                        _ => None,
                    }
                }
            }
            Group::Temporal(latest) => {
                latest[input] = Some(hit);
                for l in latest.iter_mut() {
                    if l.as_ref().is_some_and(|h| ts - h.ts > span) {
                        *l = None;
                    }
                }
                if latest.iter().all(Option::is_some) {
                    Some(latest.iter_mut().filter_map(Option::take).collect())
                } else {
                    None
                }
            }
            Group::Count(_) => None,
        };
        if let Some(hits) = done {
            let first = hits.iter().map(|h| h.ts).min().unwrap_or(ts);
            let key = Self::key_text(batch, row, self.spec.group_by.len());
            // Temporal hits come in rule order; so do a sequence's.
            for (k, h) in hits.iter().enumerate() {
                alerts.step_ids[k].append_option(h.id.as_deref());
                alerts.step_ts[k].append_value(h.ts);
                for (b, v) in alerts.carried[k].iter_mut().zip(&h.carried) {
                    b.append_option(v.as_deref());
                }
            }
            alerts.push(&self.spec.rule, &key, first, ts);
        }
        Ok(())
    }

    /// Forgets what can no longer take part in a match.
    fn sweep(&mut self, watermark: EventTime) {
        let horizon = watermark.saturating_sub(self.spec.timespan_ms);
        self.groups.retain(|_, g| {
            match g {
                Group::Count(c) => {
                    evict(c, horizon);
                    if c.window.is_empty() && c.quiet_until <= watermark {
                        return false;
                    }
                    return true;
                }
                Group::Sequence(states) => {
                    for s in states.iter_mut() {
                        if s.as_ref().is_some_and(|seq| seq[0].ts < horizon) {
                            *s = None;
                        }
                    }
                }
                Group::Temporal(latest) => {
                    for l in latest.iter_mut() {
                        if l.as_ref().is_some_and(|h| h.ts < horizon) {
                            *l = None;
                        }
                    }
                }
            }
            !g.is_empty()
        });
        if self.groups.capacity() > 64 && self.groups.len() < self.groups.capacity() / 4 {
            self.groups.shrink_to_fit();
        }
    }
}

/// Group state as rows of a snapshot table.
#[derive(Default)]
struct StateRows<'a> {
    keys: Vec<&'a [u8]>,
    slots: Vec<i32>,
    pos: Vec<i32>,
    ts: Vec<i64>,
    ids: Vec<Option<String>>,
    values: Vec<Option<&'a [u8]>>,
    carried: Vec<Option<String>>,
}

impl<'a> StateRows<'a> {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        k: &'a [u8],
        slot: i32,
        p: i32,
        t: i64,
        id: Option<String>,
        v: Option<&'a [u8]>,
        carried: Option<String>,
    ) {
        self.carried.push(carried);
        self.keys.push(k);
        self.slots.push(slot);
        self.pos.push(p);
        self.ts.push(t);
        self.ids.push(id);
        self.values.push(v);
    }
}

/// Carried values in one snapshot cell: each value's presence, then its text,
/// separated by the unit separator.
fn encode(values: &[Option<String>]) -> Option<String> {
    (!values.is_empty()).then(|| {
        values
            .iter()
            .map(|v| match v {
                Some(v) => format!("+{v}"),
                None => "-".to_string(),
            })
            .collect::<Vec<_>>()
            .join("\u{1f}")
    })
}

fn decode(cell: Option<&str>) -> Vec<Option<String>> {
    cell.map_or_else(Vec::new, |c| {
        c.split('\u{1f}')
            .map(|v| v.strip_prefix('+').map(str::to_string))
            .collect()
    })
}

/// Drops window events before `horizon`.
fn evict(c: &mut CountState, horizon: i64) {
    while let Some((t, _)) = c.window.front() {
        if *t >= horizon {
            break;
        }
        if let Some((_, Some(v))) = c.window.pop_front() {
            if let Some(n) = c.values.get_mut(&v) {
                *n -= 1;
                if *n == 0 {
                    c.values.remove(&v);
                }
            }
        }
    }
}

impl Operator for Correlation {
    fn process_batch(
        &mut self,
        input: usize,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> vigil_engine::Result<()> {
        if input >= self.spec.steps.len() {
            return Err(EngineError::Internal(format!(
                "correlation {}: input {input} of {}",
                self.spec.name,
                self.spec.steps.len()
            )));
        }
        let columns = batch
            .columns()
            .iter()
            .zip(self.spec.input.fields())
            .map(|(c, f)| {
                if c.data_type() == f.data_type() {
                    Ok(c.clone())
                } else {
                    cast(c, f.data_type())
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let batch = RecordBatch::try_new(self.spec.input.clone(), columns)?;
        let batch = split_late(batch, TIME, self.watermark, &self.metrics, out)?;
        if batch.num_rows() > 0 {
            self.seq += 1;
            self.pending.push((input, self.seq, batch));
        }
        Ok(())
    }

    fn on_watermark(
        &mut self,
        watermark: EventTime,
        out: &mut Collector,
    ) -> vigil_engine::Result<()> {
        if watermark <= self.watermark {
            return Ok(());
        }
        self.watermark = watermark;
        self.release(watermark, out)?;
        if watermark >= self.next_sweep {
            self.sweep(watermark);
            self.next_sweep = watermark.saturating_add((self.spec.timespan_ms / 8).max(1));
        }
        Ok(())
    }

    fn state_size(&self) -> vigil_engine::StateSize {
        let hit = |h: &Hit| {
            std::mem::size_of::<Hit>()
                + h.id.as_ref().map_or(0, |i| i.len())
                + h.carried
                    .iter()
                    .flatten()
                    .map(|c| c.len() + 24)
                    .sum::<usize>()
        };
        let groups: usize = self
            .groups
            .iter()
            .map(|(k, g)| {
                k.len()
                    + 16
                    + std::mem::size_of::<Group>()
                    + match g {
                        Group::Count(c) => {
                            c.window.len() * 32
                                + c.values.keys().map(|v| v.len() + 20).sum::<usize>()
                        }
                        Group::Sequence(s) => s.iter().flatten().flatten().map(hit).sum(),
                        Group::Temporal(t) => t.iter().flatten().map(hit).sum(),
                    }
            })
            .sum();
        let pending: usize = self
            .pending
            .iter()
            .map(|(_, _, b)| b.get_array_memory_size())
            .sum();
        vigil_engine::StateSize {
            keys: self.groups.len() as u64,
            bytes: (groups + pending) as u64,
        }
    }

    fn snapshot(&mut self) -> vigil_engine::Result<OperatorState> {
        // Table 1: rows waiting for the watermark, with their input.
        // Table 2: every group's state as events: (group, slot, time, id,
        // value), slot -1 for a count window, -2 for a quiet-until marker,
        // k >= 0 for a sequence state or a temporal rule.
        let mut batches = Vec::new();
        let input_field = Field::new("__vigil_input", DataType::Int32, false);
        let mut fields: Vec<_> = self.spec.input.fields().iter().cloned().collect();
        fields.push(Arc::new(input_field));
        let pending_schema = Arc::new(Schema::new(fields));
        for (input, _, b) in &self.pending {
            let mut cols = b.columns().to_vec();
            cols.push(Arc::new(Int32Array::from(vec![
                *input as i32;
                b.num_rows()
            ])));
            let nkeys = self.spec.group_by.len();
            let keys = b.columns()[1..=nkeys].to_vec();
            let table = RecordBatch::try_new(pending_schema.clone(), cols)?;
            batches.push(vigil_engine::key_group::tag(table, &keys)?);
        }
        let mut rows = StateRows::default();
        let mut push = |k, slot, p, t, id, v, c| rows.push(k, slot, p, t, id, v, c);
        for (k, g) in &self.groups {
            match g {
                Group::Count(c) => {
                    push(k, -2, 0, c.quiet_until, None, None, None);
                    for (i, (t, v)) in c.window.iter().enumerate() {
                        push(k, -1, i as i32, *t, None, v.as_deref(), None);
                    }
                }
                Group::Sequence(states) => {
                    for (s, seq) in states.iter().enumerate() {
                        for (i, h) in seq.iter().flatten().enumerate() {
                            push(
                                k,
                                s as i32,
                                i as i32,
                                h.ts,
                                h.id.clone(),
                                None,
                                encode(&h.carried),
                            );
                        }
                    }
                }
                Group::Temporal(latest) => {
                    for (s, h) in latest.iter().enumerate() {
                        if let Some(h) = h {
                            push(k, s as i32, 0, h.ts, h.id.clone(), None, encode(&h.carried));
                        }
                    }
                }
            }
        }
        let schema = Arc::new(Schema::new(vec![
            Field::new("group", DataType::Binary, false),
            Field::new("slot", DataType::Int32, false),
            Field::new("pos", DataType::Int32, false),
            Field::new("ts", DataType::Int64, false),
            Field::new("id", DataType::Utf8, true),
            Field::new("value", DataType::Binary, true),
            Field::new("carried", DataType::Utf8, true),
        ]));
        let groups = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(BinaryArray::from_vec(rows.keys.clone())),
                Arc::new(Int32Array::from(rows.slots)),
                Arc::new(Int32Array::from(rows.pos)),
                Arc::new(Int64Array::from(rows.ts)),
                Arc::new(StringArray::from(rows.ids)),
                Arc::new(BinaryArray::from_opt_vec(rows.values)),
                Arc::new(StringArray::from(rows.carried)),
            ],
        )?;
        batches.push(crate::state::tag_rows(
            groups,
            &self.keys,
            rows.keys.iter().copied(),
        )?);
        Ok(OperatorState { batches })
    }

    fn restore(&mut self, state: OperatorState) -> vigil_engine::Result<()> {
        let Some((groups, pending)) = state.batches.split_last() else {
            return Ok(());
        };
        // Restores add up (one per old subtask after a rescale).
        let width = self.spec.input.fields().len();
        for b in pending.iter().filter(|b| b.num_rows() > 0) {
            let input = b
                .column(width)
                .as_primitive::<arrow::datatypes::Int32Type>();
            let rows =
                RecordBatch::try_new(self.spec.input.clone(), b.columns()[..width].to_vec())?;
            self.seq += 1;
            self.pending
                .push((input.value(0).max(0) as usize, self.seq, rows));
        }
        let col = |i: usize| groups.column(i);
        let keys = col(0).as_binary::<i32>();
        let slots = col(1).as_primitive::<arrow::datatypes::Int32Type>();
        let ts = col(3).as_primitive::<arrow::datatypes::Int64Type>();
        let ids = col(4).as_string::<i32>();
        let values = col(5).as_binary::<i32>();
        let carried = col(6).as_string::<i32>();
        let rules = self.spec.rules();
        for i in 0..groups.num_rows() {
            let key = keys.value(i);
            let kind = self.spec.kind;
            let g = self.groups.entry(key.into()).or_insert_with(|| match kind {
                CorrelationType::EventCount | CorrelationType::ValueCount => {
                    Group::Count(CountState::default())
                }
                CorrelationType::Temporal => Group::Temporal(vec![None; rules]),
                CorrelationType::TemporalOrdered => Group::Sequence(vec![None; rules]),
            });
            let hit = || Hit {
                ts: ts.value(i),
                id: ids.is_valid(i).then(|| ids.value(i).to_string()),
                carried: decode(carried.is_valid(i).then(|| carried.value(i))),
            };
            let slot = slots.value(i);
            match g {
                Group::Count(c) if slot == -2 => c.quiet_until = ts.value(i),
                Group::Count(c) => {
                    let v = values
                        .is_valid(i)
                        .then(|| Box::<[u8]>::from(values.value(i)));
                    if let Some(v) = &v {
                        *c.values.entry(v.clone()).or_insert(0) += 1;
                    }
                    c.window.push_back((ts.value(i), v));
                }
                Group::Sequence(states) => {
                    if let Some(s) = states.get_mut(slot.max(0) as usize) {
                        s.get_or_insert_with(Vec::new).push(hit());
                    }
                }
                Group::Temporal(latest) => {
                    if let Some(l) = latest.get_mut(slot.max(0) as usize) {
                        *l = Some(hit());
                    }
                }
            }
        }
        Ok(())
    }
}
