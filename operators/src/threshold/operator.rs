//! The `threshold` operator; see the module docs of [`crate::threshold`].

use std::collections::BTreeMap;
use std::sync::Arc;

use ahash::{HashMap, HashSet, HashSetExt};
use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, Int64Array, RecordBatch, StringArray,
    TimestampMillisecondArray, UInt64Array,
};
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, TimestampMillisecondType};
use arrow::row::{RowConverter, SortField};
use vigil_engine::{
    Collector, EventTime, Operator, OperatorFactory, OperatorState, TaskContext, TaskMetrics, LATE,
};

use super::config::ThresholdConfig;
use crate::error::{OperatorError, Result};

fn ts_type() -> DataType {
    DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, Some("UTC".into()))
}

fn value_type(t: &DataType) -> DataType {
    match t {
        DataType::Dictionary(_, v) => v.as_ref().clone(),
        other => other.clone(),
    }
}

#[derive(Debug)]
struct Spec {
    rule: String,
    output: SchemaRef,
    key_cols: Vec<usize>,
    key_names: Vec<String>,
    key_fields: Vec<SortField>,
    time_col: usize,
    distinct_col: Option<usize>,
    width_ms: i64,
    min_count: u64,
    min_distinct: u64,
}

/// Builds `threshold` subtasks.
#[derive(Debug)]
pub struct ThresholdFactory {
    spec: Arc<Spec>,
    input: SchemaRef,
}

fn column(input: &Schema, name: &str, field: &str) -> Result<usize> {
    input
        .index_of(name)
        .map_err(|_| OperatorError::unknown_column(field, name, input))
}

impl ThresholdFactory {
    /// Checks `config` against the input; `default_time` is the input's
    /// event-time column, used when `time` is not set.
    pub fn new(
        name: &str,
        config: &ThresholdConfig,
        input: SchemaRef,
        default_time: Option<&str>,
    ) -> Result<Self> {
        if config.key.is_empty() {
            return Err(OperatorError::config(
                "key",
                "a threshold needs at least one key column",
                Some("e.g. key: [tenant_id, user]".into()),
            ));
        }
        let width_ms = config.window.as_millis() as i64;
        if width_ms <= 0 {
            return Err(OperatorError::config(
                "window",
                "window must be at least 1ms",
                None,
            ));
        }
        let key_cols = config
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| column(&input, k, &format!("key[{i}]")))
            .collect::<Result<Vec<_>>>()?;
        let time_name = config.time.as_deref().or(default_time).ok_or_else(|| {
            OperatorError::config(
                "time",
                "the input has no event-time column",
                Some("name one with time: <column>".into()),
            )
        })?;
        let time_col = column(&input, time_name, "time")?;
        if !matches!(
            input.field(time_col).data_type(),
            DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, _)
        ) {
            return Err(OperatorError::config(
                "time",
                format!("column {time_name:?} is not a millisecond timestamp"),
                None,
            ));
        }
        let distinct_col = config
            .distinct
            .as_deref()
            .map(|d| column(&input, d, "distinct"))
            .transpose()?;
        let (min_count, min_distinct) = match (config.min_count, distinct_col, config.min_distinct)
        {
            (_, Some(_), None) => {
                return Err(OperatorError::config(
                    "min_distinct",
                    "distinct needs min_distinct",
                    Some("e.g. min_distinct: 10".into()),
                ))
            }
            (_, None, Some(_)) => {
                return Err(OperatorError::config(
                    "distinct",
                    "min_distinct needs a distinct column",
                    Some("e.g. distinct: user".into()),
                ))
            }
            (None, None, None) => {
                return Err(OperatorError::config(
                    "min_count",
                    "a threshold needs min_count or distinct with min_distinct",
                    None,
                ))
            }
            (c, _, d) => (c.unwrap_or(1), d.unwrap_or(0)),
        };
        let mut fields = vec![
            Field::new("rule", DataType::Utf8, false),
            Field::new("window_start", ts_type(), false),
            Field::new("window_end", ts_type(), false),
        ];
        for &k in &key_cols {
            let f = input.field(k);
            fields.push(Field::new(
                f.name(),
                value_type(f.data_type()),
                f.is_nullable(),
            ));
        }
        fields.push(Field::new("event_count", DataType::UInt64, false));
        if distinct_col.is_some() {
            fields.push(Field::new("distinct_count", DataType::UInt64, false));
        }
        fields.push(Field::new("first_seen", ts_type(), false));
        fields.push(Field::new("last_seen", ts_type(), false));
        let key_fields = key_cols
            .iter()
            .map(|&k| SortField::new(input.field(k).data_type().clone()))
            .collect();
        Ok(Self {
            spec: Arc::new(Spec {
                rule: config.rule.clone().unwrap_or_else(|| name.to_string()),
                output: Arc::new(Schema::new(fields)),
                key_names: config.key.clone(),
                key_cols,
                key_fields,
                time_col,
                distinct_col,
                width_ms,
                min_count,
                min_distinct,
            }),
            input,
        })
    }
}

impl OperatorFactory for ThresholdFactory {
    fn output_schema(&self) -> SchemaRef {
        self.spec.output.clone()
    }
    fn key_columns(&self) -> Vec<String> {
        self.spec.key_names.clone()
    }
    fn side_outputs(&self) -> Vec<(&'static str, SchemaRef)> {
        vec![(LATE, self.input.clone())]
    }
    fn create(&self, ctx: &TaskContext) -> vigil_engine::Result<Box<dyn Operator>> {
        let keys = RowConverter::new(self.spec.key_fields.clone())?;
        let distinct = self
            .spec
            .distinct_col
            .map(|c| {
                RowConverter::new(vec![SortField::new(
                    self.input.field(c).data_type().clone(),
                )])
            })
            .transpose()?;
        Ok(Box::new(Threshold {
            spec: self.spec.clone(),
            keys,
            distinct,
            windows: BTreeMap::new(),
            watermark: None,
            metrics: ctx.metrics.clone(),
        }))
    }
    fn describe(&self) -> String {
        let s = &self.spec;
        let cond = match s.distinct_col {
            Some(c) => format!(
                "distinct({}) >= {}",
                self.input.field(c).name(),
                s.min_distinct
            ),
            None => format!("count >= {}", s.min_count),
        };
        format!(
            "threshold {cond} per ({}) in {}ms tumbling windows",
            s.key_names.join(", "),
            s.width_ms
        )
    }
}

#[derive(Debug)]
struct Acc {
    count: u64,
    first: i64,
    last: i64,
    distinct: HashSet<Box<[u8]>>,
}

impl Acc {
    fn new(ts: i64) -> Self {
        Self {
            count: 0,
            first: ts,
            last: ts,
            distinct: HashSet::new(),
        }
    }
}

type Window = HashMap<Box<[u8]>, Acc>;

struct Threshold {
    spec: Arc<Spec>,
    keys: RowConverter,
    distinct: Option<RowConverter>,
    windows: BTreeMap<i64, Window>,
    watermark: Option<EventTime>,
    metrics: Arc<TaskMetrics>,
}

impl Threshold {
    fn window_start(&self, ts: i64) -> i64 {
        ts - ts.rem_euclid(self.spec.width_ms)
    }

    /// Splits off rows whose window the watermark has already closed.
    fn split_late(
        &self,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> vigil_engine::Result<RecordBatch> {
        let ts = batch
            .column(self.spec.time_col)
            .as_primitive::<TimestampMillisecondType>();
        // A row is late when its window has closed: window_end(ts) <= wm,
        // which is ts < cutoff with cutoff the end of the window holding
        // wm - width. One comparison kernel per batch, not a loop.
        let cutoff = self.watermark.map(|w| {
            self.window_start(w.saturating_sub(self.spec.width_ms))
                .saturating_add(self.spec.width_ms)
        });
        let all_on_time = ts.null_count() == 0
            && cutoff.is_none_or(|c| arrow::compute::min(ts).is_none_or(|m| m >= c));
        if all_on_time {
            return Ok(batch);
        }
        let on_time = match cutoff {
            Some(c) => {
                let bound =
                    TimestampMillisecondArray::from(vec![c]).with_timezone_opt(ts.timezone());
                arrow::compute::kernels::cmp::gt_eq(ts, &arrow::array::Scalar::new(bound))?
            }
            None => arrow::compute::is_not_null(ts)?,
        };
        // Null event time counts as late: never silently dropped.
        let on_time = if on_time.null_count() > 0 {
            arrow::compute::prep_null_mask_filter(&on_time)
        } else {
            on_time
        };
        if on_time.true_count() == batch.num_rows() {
            return Ok(batch);
        }
        let late = filter_record_batch(&batch, &arrow::compute::not(&on_time)?)?;
        TaskMetrics::add(&self.metrics.late_records, late.num_rows());
        out.emit_side(LATE, late);
        Ok(filter_record_batch(&batch, &on_time)?)
    }

    fn close(&mut self, watermark: EventTime) -> vigil_engine::Result<Option<RecordBatch>> {
        let width = self.spec.width_ms;
        let mut fired: Vec<(i64, Box<[u8]>, Acc)> = Vec::new();
        while let Some(entry) = self.windows.first_entry() {
            if entry.key().saturating_add(width) > watermark {
                break;
            }
            let (start, window) = entry.remove_entry();
            let mut hits: Vec<(Box<[u8]>, Acc)> = window
                .into_iter()
                .filter(|(_, a)| {
                    a.count >= self.spec.min_count
                        && a.distinct.len() as u64 >= self.spec.min_distinct
                })
                .collect();
            hits.sort_by(|a, b| a.0.cmp(&b.0));
            fired.extend(hits.into_iter().map(|(k, a)| (start, k, a)));
        }
        if fired.is_empty() {
            return Ok(None);
        }
        let parser = self.keys.parser();
        let key_arrays = self
            .keys
            .convert_rows(fired.iter().map(|(_, k, _)| parser.parse(k)))?;
        let n = fired.len();
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![self.spec.rule.as_str(); n])),
            Arc::new(
                TimestampMillisecondArray::from_iter_values(fired.iter().map(|f| f.0))
                    .with_timezone("UTC"),
            ),
            Arc::new(
                TimestampMillisecondArray::from_iter_values(fired.iter().map(|f| f.0 + width))
                    .with_timezone("UTC"),
            ),
        ];
        for (i, a) in key_arrays.into_iter().enumerate() {
            let want = self.spec.output.field(3 + i).data_type();
            cols.push(if a.data_type() == want {
                a
            } else {
                cast(&a, want)?
            });
        }
        cols.push(Arc::new(UInt64Array::from_iter_values(
            fired.iter().map(|f| f.2.count),
        )));
        if self.distinct.is_some() {
            cols.push(Arc::new(UInt64Array::from_iter_values(
                fired.iter().map(|f| f.2.distinct.len() as u64),
            )));
        }
        cols.push(Arc::new(
            TimestampMillisecondArray::from_iter_values(fired.iter().map(|f| f.2.first))
                .with_timezone("UTC"),
        ));
        cols.push(Arc::new(
            TimestampMillisecondArray::from_iter_values(fired.iter().map(|f| f.2.last))
                .with_timezone("UTC"),
        ));
        Ok(Some(RecordBatch::try_new(self.spec.output.clone(), cols)?))
    }
}

impl Threshold {
    /// Groups (key × window) held, and the bytes of their keys and
    /// distinct values.
    fn size(&self) -> vigil_engine::StateSize {
        let mut s = vigil_engine::StateSize::default();
        for w in self.windows.values() {
            s.keys += w.len() as u64;
            for (k, acc) in w {
                let distinct: usize = acc.distinct.iter().map(|d| d.len() + 16).sum();
                s.bytes += (k.len() + 16 + std::mem::size_of::<Acc>() + distinct) as u64;
            }
        }
        s
    }
}

impl Operator for Threshold {
    fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> vigil_engine::Result<()> {
        let batch = self.split_late(batch, out)?;
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let key_arrays: Vec<ArrayRef> = self
            .spec
            .key_cols
            .iter()
            .map(|&c| batch.column(c).clone())
            .collect();
        let keys = self.keys.convert_columns(&key_arrays)?;
        let values = match (&self.distinct, self.spec.distinct_col) {
            (Some(conv), Some(c)) => Some(conv.convert_columns(&[batch.column(c).clone()])?),
            _ => None,
        };
        let ts = batch
            .column(self.spec.time_col)
            .as_primitive::<TimestampMillisecondType>();
        let width = self.spec.width_ms;
        for (i, &t) in ts.values().iter().enumerate() {
            let start = t - t.rem_euclid(width);
            let window = self.windows.entry(start).or_default();
            let key = keys.row(i);
            let acc = match window.get_mut(key.as_ref()) {
                Some(a) => a,
                None => window
                    .entry(key.as_ref().into())
                    .or_insert_with(|| Acc::new(t)),
            };
            acc.count += 1;
            acc.first = acc.first.min(t);
            acc.last = acc.last.max(t);
            if let Some(v) = &values {
                let v = v.row(i);
                if !acc.distinct.contains(v.as_ref()) {
                    acc.distinct.insert(v.as_ref().into());
                }
            }
        }
        Ok(())
    }

    fn on_watermark(
        &mut self,
        watermark: EventTime,
        out: &mut Collector,
    ) -> vigil_engine::Result<()> {
        self.watermark = Some(watermark);
        if let Some(b) = self.close(watermark)? {
            out.emit(b);
        }
        Ok(())
    }

    fn state_size(&self) -> vigil_engine::StateSize {
        self.size()
    }

    fn snapshot(&mut self) -> vigil_engine::Result<OperatorState> {
        let mut starts = Vec::new();
        let mut keys: Vec<&[u8]> = Vec::new();
        let (mut counts, mut firsts, mut lasts) = (Vec::new(), Vec::new(), Vec::new());
        let (mut d_starts, mut d_keys, mut d_values): (Vec<i64>, Vec<&[u8]>, Vec<&[u8]>) =
            (Vec::new(), Vec::new(), Vec::new());
        for (start, window) in &self.windows {
            for (k, a) in window {
                starts.push(*start);
                keys.push(k);
                counts.push(a.count);
                firsts.push(a.first);
                lasts.push(a.last);
                for v in &a.distinct {
                    d_starts.push(*start);
                    d_keys.push(k);
                    d_values.push(v);
                }
            }
        }
        let acc_schema = Arc::new(Schema::new(vec![
            Field::new("window_start", DataType::Int64, false),
            Field::new("key", DataType::Binary, false),
            Field::new("count", DataType::UInt64, false),
            Field::new("first", DataType::Int64, false),
            Field::new("last", DataType::Int64, false),
        ]));
        let accs = RecordBatch::try_new(
            acc_schema,
            vec![
                Arc::new(Int64Array::from(starts)),
                Arc::new(BinaryArray::from(keys.clone())),
                Arc::new(UInt64Array::from(counts)),
                Arc::new(Int64Array::from(firsts)),
                Arc::new(Int64Array::from(lasts)),
            ],
        )?;
        let accs_keys = keys;
        let d_schema = Arc::new(Schema::new(vec![
            Field::new("window_start", DataType::Int64, false),
            Field::new("key", DataType::Binary, false),
            Field::new("value", DataType::Binary, false),
        ]));
        let distinct = RecordBatch::try_new(
            d_schema,
            vec![
                Arc::new(Int64Array::from(d_starts)),
                Arc::new(BinaryArray::from(d_keys.clone())),
                Arc::new(BinaryArray::from(d_values)),
            ],
        )?;
        let distinct_keys = d_keys;
        let wm_schema = Arc::new(Schema::new(vec![Field::new(
            "watermark",
            DataType::Int64,
            true,
        )]));
        let wm = RecordBatch::try_new(
            wm_schema,
            vec![Arc::new(Int64Array::from(vec![self.watermark]))],
        )?;
        let accs = crate::state::tag_rows(accs, &self.keys, keys_of(&accs_keys))?;
        let distinct = crate::state::tag_rows(distinct, &self.keys, keys_of(&distinct_keys))?;
        Ok(OperatorState {
            batches: vec![accs, distinct, wm],
        })
    }

    fn restore(&mut self, state: OperatorState) -> vigil_engine::Result<()> {
        let [accs, distinct, wm] = state.batches.as_slice() else {
            return Err(vigil_engine::EngineError::Checkpoint(format!(
                "threshold {}: expected 3 state tables, found {}",
                self.spec.rule,
                state.batches.len()
            )));
        };
        let starts = accs.column(0).as_primitive::<Int64Type>();
        let keys = accs.column(1).as_binary::<i32>();
        let counts = accs
            .column(2)
            .as_primitive::<arrow::datatypes::UInt64Type>();
        let firsts = accs.column(3).as_primitive::<Int64Type>();
        let lasts = accs.column(4).as_primitive::<Int64Type>();
        for i in 0..accs.num_rows() {
            let acc = Acc {
                count: counts.value(i),
                first: firsts.value(i),
                last: lasts.value(i),
                distinct: HashSet::new(),
            };
            self.windows
                .entry(starts.value(i))
                .or_default()
                .insert(keys.value(i).into(), acc);
        }
        let d_starts = distinct.column(0).as_primitive::<Int64Type>();
        let d_keys = distinct.column(1).as_binary::<i32>();
        let d_values = distinct.column(2).as_binary::<i32>();
        for i in 0..distinct.num_rows() {
            if let Some(a) = self
                .windows
                .get_mut(&d_starts.value(i))
                .and_then(|w| w.get_mut(d_keys.value(i)))
            {
                a.distinct.insert(d_values.value(i).into());
            }
        }
        let w = wm.column(0).as_primitive::<Int64Type>();
        let restored = (w.len() == 1 && w.is_valid(0)).then(|| w.value(0));
        self.watermark = crate::state::merge_watermark(self.watermark, restored);
        Ok(())
    }
}

fn keys_of<'a>(keys: &'a [&'a [u8]]) -> impl Iterator<Item = &'a [u8]> + 'a {
    keys.iter().copied()
}
