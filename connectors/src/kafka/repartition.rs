//! Re-keying through Kafka: the pieces of a repartition topic, by which a
//! keyed step gets every record of one key in one process (see
//! `docs/scale-out.md` for the protocol these pieces serve).
//!
//! * [`topic_name`] and [`ensure_topic`]: the internal topic of a step,
//!   created with the pipeline's partition count, or refused when it exists
//!   with another one (re-creating it would drop records in flight and move
//!   keys away from their state).
//! * [`encode`] / [`decode`]: one Kafka record per (upstream batch,
//!   partition), holding that partition's rows as an Arrow IPC stream, so
//!   data stays in Arrow through the topic. A key goes to the partition that
//!   owns its key group (`group * N / 128`), so key groups map onto
//!   partitions in contiguous ranges, as they map onto subtasks.
//! * [`OriginMarks`]: exactly once over the topic without transactions.
//!   Every row keeps the input partition and offset it came from; the reader
//!   drops rows at or below the highest origin offset it has taken, which
//!   makes re-sends after a crash and a zombie writer's copies harmless.
//! * [`ProducerWatermarks`]: the watermark of one repartition partition is
//!   the minimum over the writers heard from recently; an idle or finished
//!   writer stops holding it back, and it never moves back. It is also
//!   held at the bound each writer announces per input partition
//!   ([`ORIGINS`]), so an input partition moving between writers, or not
//!   yet given to any while the group forms, does not make its rows late.
//! * [`RepartitionSinkFactory`]: the writer, a sink that sends each batch's
//!   rows to the partitions of their key groups, and to every partition its
//!   watermark (at most every [`WATERMARK_EVERY`]) and, when its input
//!   ends, that it has finished (a stopped process has not finished: its
//!   input partitions go on with their next owner, and readers let it go
//!   once it is idle). Records carry the header [`KIND`]
//!   (`data`, `watermark` or `finished`), and the control records also carry
//!   [`PRODUCER`], [`WATERMARK`] and, for watermarks, [`ORIGINS`].

use std::collections::{HashMap, HashSet};
use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    Array, AsArray, BooleanArray, Int32Array, Int64Array, StringArray, UInt32Array,
};
use arrow::compute::{filter_record_batch, take_record_batch};
use arrow::datatypes::{DataType, Field, Int32Type, Int64Type, Schema};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use vigil_engine::key_group;
use vigil_engine::{CheckpointId, EventTime, OperatorState, Sink, SinkFactory, TaskContext};

use super::config::Properties;
use super::sink::Producer as KafkaProducer;
use crate::error::{ConnectorError, Result};

/// Column of a repartitioned row: the input topic it was read from.
pub const ORIGIN_TOPIC: &str = "kafka_topic";
/// Column of a repartitioned row: the input partition it was read from.
pub const ORIGIN_PARTITION: &str = "kafka_partition";
/// Column of a repartitioned row: its offset in the input partition.
pub const ORIGIN_OFFSET: &str = "kafka_offset";

/// The most partitions a repartition topic may have: one key group each.
pub const MAX_PARTITIONS: usize = key_group::KEY_GROUPS;

/// Header naming what a repartition record is: `data`, `watermark` or
/// `finished`.
pub const KIND: &str = "vigil.kind";
/// Header of a control record: the writer that sent it.
pub const PRODUCER: &str = "vigil.producer";
/// Header of a watermark record: the writer's watermark, in ms.
pub const WATERMARK: &str = "vigil.watermark";
/// Header of a watermark record: the writer's bound for each input
/// partition it reads, `topic:partition=ms` or `topic:partition=idle`,
/// comma-separated (see [`OriginWatermarks`]).
pub const ORIGINS: &str = "vigil.origins";
/// Header of a data record of a join's second input (`1`); records of
/// the first input have none.
pub const SIDE: &str = "vigil.side";
/// The reader's side output carrying a join's second input.
pub const SECOND_INPUT: vigil_engine::operator::SidePort = "second_input";
/// How often a writer sends its watermark to every partition, at most.
pub const WATERMARK_EVERY: Duration = Duration::from_millis(200);

/// The internal topic that re-keys the input of step `step`, after Kafka
/// Streams' `<application>-<name>-repartition`.
pub fn topic_name(pipeline: &str, step: &str) -> String {
    format!("vigil-{pipeline}-{step}-repartition")
}

fn io(topic: &str, what: &str, e: impl std::fmt::Display) -> ConnectorError {
    ConnectorError::Io {
        path: format!("kafka topic {topic}"),
        source: std::io::Error::other(format!("{what}: {e}")),
    }
}

/// Makes sure repartition topic `topic` exists with `partitions`
/// partitions: creates it if missing, refuses if it has another count.
pub async fn ensure_topic(
    config: &ClientConfig,
    pipeline: &str,
    topic: &str,
    partitions: usize,
) -> Result<()> {
    ensure_topic_with(config, pipeline, topic, partitions, &[]).await
}

/// [`ensure_topic`] for any internal topic of a pipeline, created with
/// the topic settings `settings` (`cleanup.policy` and the like).
pub async fn ensure_topic_with(
    config: &ClientConfig,
    pipeline: &str,
    topic: &str,
    partitions: usize,
    settings: &[(&str, &str)],
) -> Result<()> {
    if partitions == 0 || partitions > MAX_PARTITIONS {
        return Err(ConnectorError::config(
            "partitions",
            format!("a repartition topic has 1 to {MAX_PARTITIONS} partitions, not {partitions}"),
        ));
    }
    // Asking for a missing topic's metadata must not create it with the
    // broker's default partition count.
    let mut config = config.clone();
    config.set("allow.auto.create.topics", "false");
    let admin: AdminClient<DefaultClientContext> = config
        .create()
        .map_err(|e| io(topic, "cannot create a Kafka admin client", e))?;
    let timeout = Duration::from_secs(10);
    let found = |admin: &AdminClient<DefaultClientContext>| -> Result<Option<usize>> {
        let metadata = admin
            .inner()
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| io(topic, "cannot read topic metadata", e))?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len()))
    };
    match found(&admin)? {
        Some(n) if n == partitions => return Ok(()),
        Some(n) => return Err(wrong_count(pipeline, topic, partitions, n)),
        None => {}
    }
    let mut new = NewTopic::new(topic, partitions as i32, TopicReplication::Fixed(-1));
    for (k, v) in settings {
        new = new.set(k, v);
    }
    let results = admin
        .create_topics(
            [&new],
            &AdminOptions::new().operation_timeout(Some(timeout)),
        )
        .await
        .map_err(|e| io(topic, "cannot create the internal topic", e))?;
    for r in results {
        match r {
            Ok(_) => {}
            // Another process of the pipeline created it first.
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(io(topic, "cannot create the internal topic", code)),
        }
    }
    match found(&admin)? {
        Some(n) if n != partitions => Err(wrong_count(pipeline, topic, partitions, n)),
        _ => {
            tracing::info!(topic, partitions, "internal topic ready");
            Ok(())
        }
    }
}

fn wrong_count(pipeline: &str, topic: &str, want: usize, found: usize) -> ConnectorError {
    ConnectorError::config(
        "partitions",
        format!(
            "internal topic {topic:?} has {found} partitions, but pipeline {pipeline:?} expects {want}. Vigil does not re-create it: that would lose the records in it and move keys away from their state. Stop every process of the pipeline and delete the topic, or set the pipeline's partitions to {found}"
        ),
    )
}

/// The partition of `partitions` that owns key group `group`.
pub fn partition_of(group: u16, partitions: usize) -> i32 {
    key_group::subtask_of(group, partitions) as i32
}

/// The key groups partition `partition` of `partitions` owns.
pub fn groups_of(partition: i32, partitions: usize) -> Vec<u16> {
    (0..key_group::KEY_GROUPS as u16)
        .filter(|&g| partition_of(g, partitions) == partition)
        .collect()
}

/// Splits `batch` by the key columns at `keys` into one IPC-encoded record
/// value per partition that gets rows (partitions without rows are left
/// out).
pub fn encode(
    batch: &RecordBatch,
    keys: &[usize],
    partitions: usize,
) -> Result<Vec<(i32, Vec<u8>)>> {
    let mut out = Vec::new();
    let routed = key_group::route(batch, keys, partitions).map_err(|e| {
        ConnectorError::Arrow(arrow::error::ArrowError::ComputeError(format!(
            "cannot hash the repartition key: {e}"
        )))
    })?;
    for (p, rows) in routed.into_iter().enumerate() {
        if rows.is_empty() {
            continue;
        }
        let part = take_record_batch(batch, &UInt32Array::from(rows))?;
        let mut buf = Vec::new();
        {
            let mut w = StreamWriter::try_new(&mut buf, &part.schema())?;
            w.write(&part)?;
            w.finish()?;
        }
        out.push((p as i32, buf));
    }
    Ok(out)
}

/// Decodes a record value written by [`encode`]; `location` names the
/// record in the error if it is not one.
pub fn decode(value: &[u8], location: &str) -> Result<Vec<RecordBatch>> {
    let bad = |e: arrow::error::ArrowError| {
        ConnectorError::Arrow(arrow::error::ArrowError::IpcError(format!(
            "{location}: not a repartition record: {e}"
        )))
    };
    let reader = StreamReader::try_new(Cursor::new(value), None).map_err(bad)?;
    reader.map(|b| b.map_err(bad)).collect()
}

/// The highest input offset taken per input partition, for one partition
/// of a repartition topic.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OriginMarks {
    marks: HashMap<(String, i32), i64>,
}

impl OriginMarks {
    /// The rows of `batch` not taken before, in order; the marks move past
    /// them. Rows of one input partition arrive in offset order (their
    /// writer reads it in order, and the topic keeps the order of one
    /// writer's records), so a row at or below the mark is a copy.
    pub fn admit(&mut self, batch: &RecordBatch) -> Result<RecordBatch> {
        let column = |name: &str| {
            batch.column_by_name(name).ok_or_else(|| {
                ConnectorError::config(
                    name,
                    format!("a repartitioned batch has no {name:?} column"),
                )
            })
        };
        let topics = column(ORIGIN_TOPIC)?;
        let topics = topics
            .as_string_opt::<i32>()
            .ok_or_else(|| ConnectorError::config(ORIGIN_TOPIC, "origin topic is not a string"))?;
        let parts = column(ORIGIN_PARTITION)?;
        let parts = parts.as_primitive_opt::<Int32Type>().ok_or_else(|| {
            ConnectorError::config(ORIGIN_PARTITION, "origin partition is not int32")
        })?;
        let offsets = column(ORIGIN_OFFSET)?;
        let offsets = offsets
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| ConnectorError::config(ORIGIN_OFFSET, "origin offset is not int64"))?;
        let mut keep = Vec::with_capacity(batch.num_rows());
        let mut dropped = 0usize;
        // Rows of one origin come in runs: look the mark up once per run.
        let mut current: Option<((String, i32), i64)> = None;
        for r in 0..batch.num_rows() {
            let (t, p, o) = (topics.value(r), parts.value(r), offsets.value(r));
            let same = current
                .as_ref()
                .is_some_and(|((ct, cp), _)| *cp == p && ct == t);
            if !same {
                if let Some((k, m)) = current.take() {
                    self.marks.insert(k, m);
                }
                let k = (t.to_string(), p);
                let m = self.marks.get(&k).copied().unwrap_or(i64::MIN);
                current = Some((k, m));
            }
            if let Some((_, mark)) = current.as_mut() {
                let fresh = o > *mark;
                if fresh {
                    *mark = o;
                } else {
                    dropped += 1;
                }
                keep.push(fresh);
            }
        }
        if let Some((k, m)) = current {
            self.marks.insert(k, m);
        }
        if dropped == 0 {
            return Ok(batch.clone());
        }
        Ok(filter_record_batch(batch, &BooleanArray::from(keep))?)
    }

    /// The marks as a table (`topic`, `partition`, `offset`), for a
    /// checkpoint.
    pub fn snapshot(&self) -> Result<RecordBatch> {
        let mut rows: Vec<(&(String, i32), &i64)> = self.marks.iter().collect();
        rows.sort();
        let schema = Arc::new(Schema::new(vec![
            Field::new("topic", DataType::Utf8, false),
            Field::new("partition", DataType::Int32, false),
            Field::new("offset", DataType::Int64, false),
        ]));
        Ok(RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|((t, _), _)| t.as_str()),
                )),
                Arc::new(Int32Array::from_iter_values(
                    rows.iter().map(|((_, p), _)| *p),
                )),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|(_, o)| **o))),
            ],
        )?)
    }

    /// Marks from a table written by [`OriginMarks::snapshot`].
    pub fn restore(table: &RecordBatch) -> Result<Self> {
        let bad = || {
            ConnectorError::config(
                "origin marks",
                "the checkpoint's origin marks have the wrong columns",
            )
        };
        let topics = table
            .column_by_name("topic")
            .and_then(|c| c.as_string_opt::<i32>())
            .ok_or_else(bad)?;
        let parts = table
            .column_by_name("partition")
            .and_then(|c| c.as_primitive_opt::<Int32Type>())
            .ok_or_else(bad)?;
        let offsets = table
            .column_by_name("offset")
            .and_then(|c| c.as_primitive_opt::<Int64Type>())
            .ok_or_else(bad)?;
        let mut marks = HashMap::new();
        for r in 0..table.num_rows() {
            if topics.is_null(r) || parts.is_null(r) || offsets.is_null(r) {
                return Err(bad());
            }
            marks.insert(
                (topics.value(r).to_string(), parts.value(r)),
                offsets.value(r),
            );
        }
        Ok(Self { marks })
    }
}

/// Watermarks of the writers into one repartition partition.
#[derive(Debug, Clone)]
pub struct ProducerWatermarks {
    producers: HashMap<String, Producer>,
    origins: OriginWatermarks,
    idle_ms: i64,
    emitted: Option<i64>,
    /// Input partitions to be announced (or a time) before the watermark
    /// first moves: see [`Self::expect_origins`].
    gate: Option<(Arc<HashSet<String>>, i64)>,
}

/// The writers' bounds per input partition ([`ORIGINS`]), which hold a
/// repartition partition's watermark while an input partition changes
/// writers.
///
/// A writer's watermark covers only the input partitions it reads. One
/// that takes a partition over (its owner died, or a rebalance moved it)
/// has announced a watermark from its other partitions, often past the
/// rows the taken partition still has to deliver. The bound of an input
/// partition is the highest any writer announced for it (a successor
/// re-reading from the last commit delivers only copies below it, which
/// the origin marks drop); it holds while some writer heard within the
/// idle time announces the partition active, so a dead writer's
/// partitions are held until their successor takes over.
#[derive(Debug, Clone, Default)]
struct OriginWatermarks {
    /// Per input partition (`topic:partition`): the bound, and its holders.
    origins: HashMap<String, (i64, Holders)>,
}

/// Per writer: whether it announced an input partition active, and when.
type Holders = HashMap<String, (bool, i64)>;

impl OriginWatermarks {
    /// Takes writer `producer`'s [`ORIGINS`] header; malformed entries are
    /// reported under `at` and skipped.
    fn observe(&mut self, producer: &str, header: &str, now_ms: i64, at: &str) {
        for entry in header.split(',').filter(|e| !e.is_empty()) {
            let Some((origin, value)) = entry.split_once('=') else {
                tracing::warn!(record = %at, entry, "repartition origin bound without value ignored");
                continue;
            };
            let bound = match value {
                "idle" => None,
                v => match v.parse::<i64>() {
                    Ok(v) => Some(v),
                    Err(_) => {
                        tracing::warn!(record = %at, entry, "repartition origin bound is not a number; ignored");
                        continue;
                    }
                },
            };
            if !self.origins.contains_key(origin) {
                self.origins
                    .insert(origin.to_string(), (i64::MIN, HashMap::new()));
            }
            let Some((value, holders)) = self.origins.get_mut(origin) else {
                continue;
            };
            if let Some(b) = bound {
                *value = (*value).max(b);
            }
            match holders.get_mut(producer) {
                Some(h) => *h = (bound.is_some(), now_ms),
                None => {
                    holders.insert(producer.to_string(), (bound.is_some(), now_ms));
                }
            }
        }
    }

    /// Some writer has announced input partition `origin` (and not long
    /// ago: see [`Self::hold`]).
    fn knows(&self, origin: &str) -> bool {
        self.origins.contains_key(origin)
    }

    /// Writer `producer` holds no input partition any more.
    fn release(&mut self, producer: &str) {
        for (_, holders) in self.origins.values_mut() {
            if let Some(h) = holders.get_mut(producer) {
                h.0 = false;
            }
        }
    }

    /// The lowest bound of an input partition that a writer heard within
    /// `idle_ms` announces active; expired announcements are dropped.
    fn hold(&mut self, now_ms: i64, idle_ms: i64) -> Option<i64> {
        let mut hold = None;
        self.origins.retain(|_, (value, holders)| {
            holders.retain(|_, (_, heard)| now_ms - *heard <= idle_ms);
            if holders.values().any(|(active, _)| *active) {
                hold = Some(hold.map_or(*value, |h: i64| h.min(*value)));
            }
            !holders.is_empty()
        });
        hold
    }
}

#[derive(Debug, Clone, Copy)]
struct Producer {
    watermark: i64,
    heard_ms: i64,
    finished: bool,
}

impl ProducerWatermarks {
    /// Writers not heard from for `idle` stop holding the watermark back.
    pub fn new(idle: Duration) -> Self {
        Self {
            producers: HashMap::new(),
            origins: OriginWatermarks::default(),
            idle_ms: idle.as_millis() as i64,
            emitted: None,
            gate: None,
        }
    }

    /// Holds the watermark until some writer has announced each input
    /// partition of `expected` (`topic:partition`), or until `until_ms`.
    /// A writer announces only the partitions it reads; while a group
    /// forms, the first writers heard read only some of them.
    pub fn expect_origins(mut self, expected: Arc<HashSet<String>>, until_ms: i64) -> Self {
        self.gate = Some((expected, until_ms));
        self
    }

    /// Writer `producer` announced `watermark` at `now_ms`.
    pub fn observe(&mut self, producer: &str, watermark: i64, now_ms: i64) {
        let p = self
            .producers
            .entry(producer.to_string())
            .or_insert(Producer {
                watermark,
                heard_ms: now_ms,
                finished: false,
            });
        p.watermark = p.watermark.max(watermark);
        p.heard_ms = now_ms;
        p.finished = false;
    }

    /// Writer `producer` has stopped writing (it lost its input
    /// partitions, or its input ended).
    pub fn finish(&mut self, producer: &str, now_ms: i64) {
        if let Some(p) = self.producers.get_mut(producer) {
            p.finished = true;
            p.heard_ms = now_ms;
        }
        self.origins.release(producer);
    }

    /// The writers and input-partition bounds at `now_ms`, for a log line.
    fn describe(&self, now_ms: i64) -> String {
        let mut parts: Vec<String> = self
            .producers
            .iter()
            .map(|(id, p)| {
                format!(
                    "{id}={}{} heard {} ms ago",
                    p.watermark,
                    if p.finished { " finished" } else { "" },
                    now_ms - p.heard_ms
                )
            })
            .collect();
        parts.extend(self.origins.origins.iter().map(|(o, (bound, holders))| {
            let active = holders.values().filter(|(a, _)| *a).count();
            format!("{o}<={bound} ({active} holding)")
        }));
        parts.sort_unstable();
        parts.join(", ")
    }

    /// Writer `producer`'s bounds per input partition ([`ORIGINS`]), from
    /// record `at`.
    pub fn observe_origins(&mut self, producer: &str, header: &str, now_ms: i64, at: &str) {
        self.origins.observe(producer, header, now_ms, at);
    }

    /// The writers as rows (producer, watermark, finished), and the
    /// watermark emitted so far as a row without producer.
    fn rows(&self) -> Vec<(Option<&str>, i64, bool)> {
        let mut rows: Vec<(Option<&str>, i64, bool)> = self
            .producers
            .iter()
            .map(|(id, p)| (Some(id.as_str()), p.watermark, p.finished))
            .collect();
        rows.sort_unstable();
        rows.extend(self.emitted.map(|e| (None, e, false)));
        rows
    }

    /// Takes writers from a checkpoint's rows (see [`Self::rows`]), as if
    /// each had just been heard from: a reader that takes a partition over
    /// knows where its writers were, and those gone stop holding it back
    /// after the idle time, as they would have at the previous owner.
    fn restore(&mut self, rows: impl Iterator<Item = (Option<String>, i64, bool)>, now_ms: i64) {
        for (producer, watermark, finished) in rows {
            match producer {
                Some(id) => {
                    let p = self.producers.entry(id).or_insert(Producer {
                        watermark,
                        heard_ms: now_ms,
                        finished,
                    });
                    p.watermark = p.watermark.max(watermark);
                }
                None => self.emitted = self.emitted.max(Some(watermark)),
            }
        }
        // The previous owner's watermark already waited for everyone.
        self.gate = None;
    }

    /// The partition's watermark at `now_ms`: the minimum over writers that
    /// are neither finished nor idle, and over the input partitions some
    /// writer still holds (see [`OriginWatermarks`]), never below what it
    /// was before. None until a writer has been heard from.
    pub fn watermark(&mut self, now_ms: i64) -> Option<i64> {
        if let Some((expected, until)) = &self.gate {
            if now_ms < *until && expected.iter().any(|o| !self.origins.knows(o)) {
                return self.emitted;
            }
            self.gate = None;
        }
        let active = self
            .producers
            .values()
            .filter(|p| !p.finished && now_ms - p.heard_ms <= self.idle_ms)
            .map(|p| p.watermark)
            .min();
        let hold = self.origins.hold(now_ms, self.idle_ms);
        let held = |w: i64| hold.map_or(w, |h| w.min(h));
        let next = match (active, self.emitted) {
            (Some(a), Some(e)) => Some(held(a).max(e)),
            (Some(a), None) => Some(held(a)),
            // Everyone idle or finished: the highest anyone announced.
            (None, e) => self
                .producers
                .values()
                .map(|p| p.watermark)
                .max()
                .map(held)
                .max(e),
        };
        self.emitted = next;
        next
    }
}

/// What a repartition topic's reader keeps per partition it owns: the
/// origin marks and the writers' watermarks.
#[derive(Debug)]
pub(crate) struct ReaderPartitions {
    /// Partitions of the topic.
    pub partitions: usize,
    idle: Duration,
    /// The schema of each input: one, or a join's two.
    inputs: Vec<arrow::datatypes::SchemaRef>,
    /// Per partition and input (0, or 1 for a join's second input).
    marks: HashMap<(i32, usize), OriginMarks>,
    writers: HashMap<i32, ProducerWatermarks>,
    announced: HashMap<i32, i64>,
    /// The lowest watermark other readers' partitions have published:
    /// this reader's partitions are announced no higher.
    floor: Option<i64>,
    /// Every partition of the writers' input topics, if known.
    expected: Option<Arc<HashSet<String>>>,
}

/// What a reader takes from a chunk of one partition: the fresh rows per
/// input, and the partition's watermark if it moved.
pub(crate) type ReadChunk = (Vec<(usize, RecordBatch)>, Option<i64>);

/// One record of a repartition partition, as the reader meets it.
pub(crate) struct Record<'a> {
    pub kind: Option<&'a str>,
    pub producer: Option<&'a str>,
    pub watermark: Option<&'a str>,
    /// The writer's bounds per input partition ([`ORIGINS`]).
    pub origins: Option<&'a str>,
    /// The record holds a join's second input.
    pub second: bool,
    pub value: &'a [u8],
    pub offset: i64,
}

impl ReaderPartitions {
    pub fn new(
        partitions: usize,
        idle: Duration,
        inputs: Vec<arrow::datatypes::SchemaRef>,
    ) -> Self {
        Self {
            partitions,
            idle,
            inputs,
            marks: HashMap::new(),
            writers: HashMap::new(),
            announced: HashMap::new(),
            floor: None,
            expected: None,
        }
    }

    /// The partitions of the writers' input topics (`topic:partition`):
    /// a partition read from its start holds its watermark until each is
    /// announced (see [`ProducerWatermarks::expect_origins`]).
    pub fn expect_origins(mut self, expected: HashSet<String>) -> Self {
        self.expected = Some(Arc::new(expected));
        self
    }

    /// The rows of a chunk of records of `partition` not taken before, per
    /// input (`schemas[i]` is input `i`'s; a join has two), and the
    /// partition's watermark if it moved. `location` names the partition
    /// in errors.
    pub fn read<'a>(
        &mut self,
        partition: i32,
        records: impl Iterator<Item = Record<'a>>,
        now_ms: i64,
        location: &str,
    ) -> Result<ReadChunk> {
        let idle = self.idle;
        let schemas = &self.inputs;
        let expected = &self.expected;
        let writers = self.writers.entry(partition).or_insert_with(|| {
            let w = ProducerWatermarks::new(idle);
            match expected {
                Some(e) => w.expect_origins(e.clone(), now_ms + idle.as_millis() as i64),
                None => w,
            }
        });
        let mut rows: Vec<Vec<RecordBatch>> = vec![Vec::new(); schemas.len()];
        for r in records {
            let at = format!("{location}@{}", r.offset);
            match r.kind {
                Some("watermark") => {
                    let w = r.watermark.and_then(|w| w.parse::<i64>().ok());
                    match (r.producer, w) {
                        (Some(p), Some(w)) => {
                            writers.observe(p, w, now_ms);
                            if let Some(o) = r.origins {
                                writers.observe_origins(p, o, now_ms, &at);
                            }
                        }
                        _ => {
                            tracing::warn!(record = %at, "repartition watermark without producer or value ignored")
                        }
                    }
                }
                Some("finished") => {
                    if let Some(p) = r.producer {
                        writers.finish(p, now_ms);
                    }
                }
                _ => {
                    let input = usize::from(r.second);
                    let Some(schema) = schemas.get(input) else {
                        return Err(ConnectorError::config(
                            "repartition",
                            format!(
                                "{at}: a record of a join's second input in a topic of one input"
                            ),
                        ));
                    };
                    let marks = self.marks.entry((partition, input)).or_default();
                    for b in decode(r.value, &at)? {
                        let b = RecordBatch::try_new(schema.clone(), b.columns().to_vec())
                            .map_err(|e| {
                                ConnectorError::Arrow(arrow::error::ArrowError::SchemaError(
                                    format!("{at}: the repartitioned rows do not have the step's input schema: {e}"),
                                ))
                            })?;
                        let fresh = marks.admit(&b)?;
                        if fresh.num_rows() > 0 {
                            rows[input].push(fresh);
                        }
                    }
                }
            }
        }
        let mut batches = Vec::new();
        for (input, mut parts) in rows.into_iter().enumerate() {
            let batch = match parts.len() {
                0 => continue,
                1 => parts.pop(),
                _ => Some(arrow::compute::concat_batches(&schemas[input], &parts)?),
            };
            batches.extend(batch.map(|b| (input, b)));
        }
        Ok((batches, self.watermark(partition, now_ms)))
    }

    /// `partition`'s watermark, if it moved since it was last asked for
    /// (writers turn idle without a record saying so).
    pub fn watermark(&mut self, partition: i32, now_ms: i64) -> Option<i64> {
        let w = self.writers.get_mut(&partition)?.watermark(now_ms)?;
        // Held by the floor, but never below what was announced already.
        let last = self.announced.get(&partition).copied();
        let w = self
            .floor
            .map_or(w, |f| w.min(f))
            .max(last.unwrap_or(i64::MIN));
        self.announced.insert(partition, w);
        if last != Some(w) {
            tracing::debug!(
                partition,
                watermark = w,
                writers = %self.writers.get(&partition).map(|x| x.describe(now_ms)).unwrap_or_default(),
                "repartition partition watermark moved"
            );
        }
        (last != Some(w)).then_some(w)
    }

    /// Holds every partition's announced watermark at or below `floor`
    /// (None: no hold).
    pub fn set_floor(&mut self, floor: Option<i64>) {
        self.floor = floor;
    }

    /// The watermark `partition`'s writers have reached, without the hold:
    /// what this reader publishes for it.
    pub fn reached(&self, partition: i32) -> Option<i64> {
        self.writers.get(&partition)?.emitted
    }

    /// Partitions whose writers have been heard from.
    pub fn heard(&self) -> Vec<i32> {
        self.writers.keys().copied().collect()
    }

    /// Takes `partition`'s origin marks and writers from a checkpoint's
    /// tables (see [`ReaderPartitions::snapshot`]).
    pub fn adopt(
        &mut self,
        partition: i32,
        marks: &RecordBatch,
        writers: Option<&RecordBatch>,
        now_ms: i64,
    ) -> Result<()> {
        let rows = rows_of(marks, partition, "origin marks")?;
        for input in 0..2 {
            // A table without the input column holds the first input's.
            let mine = match rows_where(&rows, "input", input as i32)? {
                Some(mine) => mine,
                None if input == 0 => rows.clone(),
                None => continue,
            };
            if input == 0 || mine.num_rows() > 0 {
                self.marks
                    .insert((partition, input), OriginMarks::restore(&mine)?);
            }
        }
        let Some(writers) = writers else {
            return Ok(());
        };
        let rows = rows_of(writers, partition, "repartition writers")?;
        let bad = || {
            ConnectorError::config(
                "repartition writers",
                "the checkpoint's writer table has the wrong columns",
            )
        };
        let producers = rows
            .column_by_name("producer")
            .and_then(|c| c.as_string_opt::<i32>())
            .ok_or_else(bad)?;
        let watermarks = rows
            .column_by_name("watermark")
            .and_then(|c| c.as_primitive_opt::<Int64Type>())
            .ok_or_else(bad)?;
        let finished = rows
            .column_by_name("finished")
            .and_then(|c| c.as_boolean_opt())
            .ok_or_else(bad)?;
        let idle = self.idle;
        self.writers
            .entry(partition)
            .or_insert_with(|| ProducerWatermarks::new(idle))
            .restore(
                (0..rows.num_rows()).map(|r| {
                    (
                        producers
                            .is_valid(r)
                            .then(|| producers.value(r).to_string()),
                        watermarks.value(r),
                        finished.value(r),
                    )
                }),
                now_ms,
            );
        Ok(())
    }

    /// Forgets a partition that went to another process.
    pub fn forget(&mut self, partition: i32) {
        self.marks.retain(|(p, _), _| *p != partition);
        self.writers.remove(&partition);
        self.announced.remove(&partition);
    }

    /// The marks of `partitions`, one table (`reader_partition`, `input`,
    /// `topic`, `partition`, `offset`).
    pub fn snapshot(&self, partitions: impl Iterator<Item = i32>) -> Result<RecordBatch> {
        let mut of = Vec::new();
        let mut inputs = Vec::new();
        let mut tables = Vec::new();
        for p in partitions {
            let mut mine: Vec<(&usize, &OriginMarks)> = self
                .marks
                .iter()
                .filter(|((q, _), _)| *q == p)
                .map(|((_, i), m)| (i, m))
                .collect();
            mine.sort_by_key(|(i, _)| **i);
            for (input, marks) in mine {
                let t = marks.snapshot()?;
                of.extend(std::iter::repeat_n(p, t.num_rows()));
                inputs.extend(std::iter::repeat_n(*input as i32, t.num_rows()));
                tables.push(t);
            }
        }
        let empty = OriginMarks::default().snapshot()?;
        let table = arrow::compute::concat_batches(&empty.schema(), &tables)?;
        let mut fields: Vec<Field> = vec![
            Field::new("reader_partition", DataType::Int32, false),
            Field::new("input", DataType::Int32, false),
        ];
        fields.extend(table.schema().fields().iter().map(|f| f.as_ref().clone()));
        let mut cols: Vec<arrow::array::ArrayRef> = vec![
            Arc::new(Int32Array::from(of)),
            Arc::new(Int32Array::from(inputs)),
        ];
        cols.extend(table.columns().iter().cloned());
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
    }

    /// The writers of `partitions`, one table (`reader_partition`,
    /// `producer`, `watermark`, `finished`); a row without producer holds
    /// the watermark the partition has reached.
    pub fn snapshot_writers(&self, partitions: impl Iterator<Item = i32>) -> Result<RecordBatch> {
        let (mut of, mut producers, mut watermarks, mut finished) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for p in partitions {
            let Some(w) = self.writers.get(&p) else {
                continue;
            };
            for (producer, watermark, done) in w.rows() {
                of.push(p);
                producers.push(producer.map(str::to_string));
                watermarks.push(watermark);
                finished.push(done);
            }
        }
        let schema = Arc::new(Schema::new(vec![
            Field::new("reader_partition", DataType::Int32, false),
            Field::new("producer", DataType::Utf8, true),
            Field::new("watermark", DataType::Int64, false),
            Field::new("finished", DataType::Boolean, false),
        ]));
        Ok(RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int32Array::from(of)),
                Arc::new(StringArray::from(producers)),
                Arc::new(Int64Array::from(watermarks)),
                Arc::new(BooleanArray::from(finished)),
            ],
        )?)
    }
}

/// The rows of a reader's checkpoint table that belong to `partition`.
fn rows_of(table: &RecordBatch, partition: i32, what: &str) -> Result<RecordBatch> {
    rows_where(table, "reader_partition", partition)?.ok_or_else(|| {
        ConnectorError::config(
            what,
            format!("the checkpoint's {what} have no reader_partition column"),
        )
    })
}

/// The rows of `table` whose Int32 column `column` is `value`; None when
/// the table has no such column.
fn rows_where(table: &RecordBatch, column: &str, value: i32) -> Result<Option<RecordBatch>> {
    let Some(c) = table.column_by_name(column) else {
        return Ok(None);
    };
    let mine = arrow::compute::kernels::cmp::eq(c, &Int32Array::new_scalar(value))?;
    Ok(Some(filter_record_batch(table, &mine)?))
}

/// Builds the writers of one repartition topic.
#[derive(Debug, Clone)]
pub struct RepartitionSinkFactory {
    brokers: String,
    properties: Properties,
    topic: String,
    keys: Vec<String>,
    partitions: usize,
    /// Writes a join's second input (tagged [`SIDE`]).
    second: bool,
    /// How the writer bounds each input partition's event time.
    origins: Option<OriginSpec>,
}

/// Where a writer finds event time, and how its source makes watermarks:
/// the writer derives from them a watermark per input partition, as the
/// source does, for readers to hold when that partition changes hands.
#[derive(Debug, Clone)]
pub struct OriginSpec {
    /// The input's event-time column (a millisecond timestamp).
    pub event_time: String,
    /// The source's out-of-orderness, in ms.
    pub out_of_orderness_ms: i64,
    /// The source's idle timeout, in ms.
    pub idle_timeout_ms: i64,
}

impl RepartitionSinkFactory {
    /// Writers into `topic` (of `partitions` partitions, see
    /// [`ensure_topic`]) that re-key by the columns `keys`.
    pub fn new(
        brokers: &str,
        properties: Properties,
        topic: &str,
        keys: Vec<String>,
        partitions: usize,
    ) -> Result<Self> {
        if keys.is_empty() {
            return Err(ConnectorError::config("key", "a repartition needs a key"));
        }
        if partitions == 0 || partitions > MAX_PARTITIONS {
            return Err(ConnectorError::config(
                "partitions",
                format!(
                    "a repartition topic has 1 to {MAX_PARTITIONS} partitions, not {partitions}"
                ),
            ));
        }
        Ok(Self {
            brokers: brokers.to_string(),
            properties,
            topic: topic.to_string(),
            keys,
            partitions,
            second: false,
            origins: None,
        })
    }

    /// Announces with each watermark a bound per input partition, from
    /// the rows' event times (see [`OriginWatermarks`]).
    pub fn with_origins(mut self, spec: OriginSpec) -> Self {
        self.origins = Some(spec);
        self
    }

    /// This writer sends a join's second input: its rows are tagged, and
    /// the reader hands them out on [`SECOND_INPUT`].
    pub fn second_input(mut self) -> Self {
        self.second = true;
        self
    }
}

impl SinkFactory for RepartitionSinkFactory {
    fn check_input(&self, schema: &arrow::datatypes::SchemaRef) -> vigil_engine::Result<()> {
        let origin = [ORIGIN_TOPIC, ORIGIN_PARTITION, ORIGIN_OFFSET];
        for column in self.keys.iter().map(String::as_str).chain(origin) {
            if schema.index_of(column).is_err() {
                return Err(vigil_engine::EngineError::User(format!(
                    "repartition into {}: the input has no column {column:?} (a repartition re-keys rows read from Kafka, which carry their origin)",
                    self.topic
                )));
            }
        }
        Ok(())
    }

    fn create(
        &self,
        ctx: &TaskContext,
        schema: arrow::datatypes::SchemaRef,
    ) -> vigil_engine::Result<Box<dyn Sink>> {
        let keys = self
            .keys
            .iter()
            .map(|k| schema.index_of(k))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let host = std::env::var("HOSTNAME").unwrap_or_default();
        let origins = match &self.origins {
            Some(spec) => Some(OriginTracker::new(
                spec,
                &schema,
                schema.index_of(ORIGIN_TOPIC)?,
                schema.index_of(ORIGIN_PARTITION)?,
            )?),
            None => None,
        };
        Ok(Box::new(RepartitionSink {
            origins,
            producer: KafkaProducer::new(&self.brokers, &self.properties, ctx.metrics.clone())?,
            topic: self.topic.clone(),
            keys,
            partitions: self.partitions,
            second: self.second,
            id: format!("{host}/{}/{}/{}", std::process::id(), ctx.node, ctx.subtask),
            clock: ctx.clock.clone(),
            last_watermark: None,
            sent_at_ms: i64::MIN,
            pending: None,
        }))
    }

    fn describe(&self) -> String {
        format!(
            "repartition by {} into {} ({} partitions){}",
            self.keys.join(", "),
            self.topic,
            self.partitions,
            if self.second { ", second input" } else { "" }
        )
    }
}

/// One writer into a repartition topic.
struct RepartitionSink {
    /// The bounds per input partition announced with the watermark.
    origins: Option<OriginTracker>,
    producer: KafkaProducer,
    topic: String,
    keys: Vec<usize>,
    partitions: usize,
    second: bool,
    /// This writer's id in control records: host, process, node, subtask.
    id: String,
    clock: vigil_engine::SharedClock,
    last_watermark: Option<EventTime>,
    sent_at_ms: i64,
    /// A watermark held back by the rate limit, sent with the next batch,
    /// watermark or checkpoint, so the last one before a pause is not lost.
    pending: Option<EventTime>,
}

impl RepartitionSink {
    /// Sends the held-back watermark if the rate limit allows it (or
    /// `now`, before a checkpoint). Moved input-partition bounds are sent
    /// the same way, with the last watermark: a writer catching up on a
    /// partition it took over keeps its watermark while the partition's
    /// bound rises.
    async fn send_pending(&mut self, force: bool) -> vigil_engine::Result<()> {
        let now = self.clock.now_ms();
        let due =
            force || now.saturating_sub(self.sent_at_ms) >= WATERMARK_EVERY.as_millis() as i64;
        let moved = self.origins.as_ref().is_some_and(|o| o.dirty);
        let w = match self.pending {
            Some(w) => Some(w),
            None if moved => self.last_watermark,
            None => None,
        };
        if let (Some(w), true) = (w, due) {
            self.pending = None;
            self.last_watermark = Some(w);
            self.sent_at_ms = now;
            let origins = self.origins.as_mut().map(|o| o.header(now));
            self.control("watermark", Some(w), origins.as_deref())
                .await?;
        }
        Ok(())
    }

    /// Sends a control record of `kind` to every partition.
    async fn control(
        &mut self,
        kind: &str,
        watermark: Option<EventTime>,
        origins: Option<&str>,
    ) -> vigil_engine::Result<()> {
        let w = watermark.map(|w| w.to_string());
        for p in 0..self.partitions as i32 {
            let mut headers = OwnedHeaders::new()
                .insert(Header {
                    key: KIND,
                    value: Some(kind),
                })
                .insert(Header {
                    key: PRODUCER,
                    value: Some(self.id.as_str()),
                });
            if let Some(w) = &w {
                headers = headers.insert(Header {
                    key: WATERMARK,
                    value: Some(w.as_str()),
                });
            }
            if let Some(o) = origins {
                headers = headers.insert(Header {
                    key: ORIGINS,
                    value: Some(o),
                });
            }
            let record = FutureRecord::<str, [u8]>::to(&self.topic)
                .partition(p)
                .payload(&[])
                .headers(headers);
            self.producer.send(record).await?;
        }
        Ok(())
    }
}

/// A writer's bound per input partition: the largest event time it has
/// written from the partition, minus the source's out-of-orderness (what
/// the source's own watermark for that partition is). A partition whose
/// rows stopped for half the source's idle timeout is announced idle:
/// before the source lets it go, so the bound never holds readers longer
/// than the writer's watermark does.
struct OriginTracker {
    event_time: usize,
    topic: usize,
    partition: usize,
    delay_ms: i64,
    idle_ms: i64,
    /// Per topic and partition: the largest event time, and when the last
    /// row came.
    seen: HashMap<String, HashMap<i32, (EventTime, i64)>>,
    /// A bound moved, or a partition appeared, since the last header.
    dirty: bool,
}

impl OriginTracker {
    fn new(
        spec: &OriginSpec,
        schema: &Schema,
        topic: usize,
        partition: usize,
    ) -> vigil_engine::Result<Self> {
        let event_time = schema.index_of(&spec.event_time)?;
        let types = [
            (topic, DataType::Utf8),
            (partition, DataType::Int32),
            (
                event_time,
                DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, None),
            ),
        ];
        for (i, t) in types {
            let f = schema.field(i);
            let ok = match (f.data_type(), &t) {
                (DataType::Timestamp(u, _), DataType::Timestamp(v, _)) => u == v,
                (a, b) => a == b,
            };
            if !ok {
                return Err(vigil_engine::EngineError::User(format!(
                    "repartition: column {:?} is {}, not {t}",
                    f.name(),
                    f.data_type()
                )));
            }
        }
        Ok(Self {
            event_time,
            topic,
            partition,
            delay_ms: spec.out_of_orderness_ms,
            idle_ms: spec.idle_timeout_ms / 2,
            seen: HashMap::new(),
            dirty: false,
        })
    }

    /// Takes the event times of `batch`'s rows, per run of rows of one
    /// input partition (a batch is usually one run).
    fn observe(&mut self, batch: &RecordBatch, now_ms: i64) -> vigil_engine::Result<()> {
        let (topic, partition) = (batch.column(self.topic), batch.column(self.partition));
        let runs = arrow::compute::partition(&[topic.clone(), partition.clone()])?;
        let topics = topic.as_string::<i32>();
        let partitions = partition.as_primitive::<Int32Type>();
        let times = batch
            .column(self.event_time)
            .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
        for run in runs.ranges() {
            if topics.is_null(run.start) || partitions.is_null(run.start) {
                continue;
            }
            let max = arrow::compute::max(&times.slice(run.start, run.len()));
            self.note(
                topics.value(run.start),
                partitions.value(run.start),
                max.unwrap_or(EventTime::MIN),
                now_ms,
            );
        }
        Ok(())
    }

    fn note(&mut self, topic: &str, partition: i32, max: EventTime, now_ms: i64) {
        if !self.seen.contains_key(topic) {
            self.seen.insert(topic.to_string(), HashMap::new());
        }
        let Some(of_topic) = self.seen.get_mut(topic) else {
            return;
        };
        let e = of_topic.entry(partition).or_insert_with(|| {
            self.dirty = true;
            (max, now_ms)
        });
        if max > e.0 {
            e.0 = max;
            self.dirty = true;
        }
        e.1 = now_ms;
    }

    /// The [`ORIGINS`] header at `now_ms`; partitions quiet for twice the
    /// idle time, announced idle since, are forgotten.
    fn header(&mut self, now_ms: i64) -> String {
        self.dirty = false;
        let idle = self.idle_ms;
        let mut entries = Vec::new();
        for (topic, partitions) in self.seen.iter_mut() {
            partitions.retain(|_, (_, heard)| now_ms - *heard < 4 * idle);
            for (p, (max, heard)) in partitions.iter() {
                let value = match now_ms - heard >= idle || *max == EventTime::MIN {
                    true => "idle".to_string(),
                    false => max.saturating_sub(self.delay_ms).to_string(),
                };
                entries.push(format!("{topic}:{p}={value}"));
            }
        }
        self.seen.retain(|_, p| !p.is_empty());
        entries.sort_unstable();
        entries.join(",")
    }
}

#[async_trait]
impl Sink for RepartitionSink {
    async fn write(&mut self, batch: RecordBatch) -> vigil_engine::Result<()> {
        if let Some(o) = &mut self.origins {
            o.observe(&batch, self.clock.now_ms())?;
        }
        for (p, value) in encode(&batch, &self.keys, self.partitions)? {
            let mut headers = OwnedHeaders::new().insert(Header {
                key: KIND,
                value: Some("data"),
            });
            if self.second {
                headers = headers.insert(Header {
                    key: SIDE,
                    value: Some("1"),
                });
            }
            let record = FutureRecord::<str, [u8]>::to(&self.topic)
                .partition(p)
                .payload(value.as_slice())
                .headers(headers);
            self.producer.send(record).await?;
        }
        self.send_pending(false).await
    }

    async fn on_watermark(&mut self, watermark: EventTime) -> vigil_engine::Result<()> {
        if self.last_watermark.is_some_and(|l| l >= watermark) {
            return Ok(());
        }
        self.pending = Some(watermark);
        self.send_pending(false).await
    }

    async fn flush(&mut self) -> vigil_engine::Result<()> {
        self.producer.settle(0).await
    }

    async fn snapshot(&mut self, _checkpoint: CheckpointId) -> vigil_engine::Result<OperatorState> {
        // Delivered before the barrier passes; the reader's origin marks
        // make a re-send after a restore harmless.
        self.send_pending(true).await?;
        self.flush().await?;
        Ok(OperatorState::default())
    }

    async fn finish(&mut self) -> vigil_engine::Result<()> {
        self.send_pending(true).await?;
        self.control("finished", self.last_watermark, None).await?;
        self.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::ArrayRef;

    fn rows(origin: &[(&str, i32, i64)], users: &[&str]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("user", DataType::Utf8, false),
            Field::new(ORIGIN_TOPIC, DataType::Utf8, false),
            Field::new(ORIGIN_PARTITION, DataType::Int32, false),
            Field::new(ORIGIN_OFFSET, DataType::Int64, false),
        ]));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(users.iter())),
            Arc::new(StringArray::from_iter_values(origin.iter().map(|o| o.0))),
            Arc::new(Int32Array::from_iter_values(origin.iter().map(|o| o.1))),
            Arc::new(Int64Array::from_iter_values(origin.iter().map(|o| o.2))),
        ];
        RecordBatch::try_new(schema, columns).expect("batch")
    }

    #[test]
    fn every_row_reaches_the_partition_of_its_key_group_once() {
        let users: Vec<String> = (0..1000).map(|i| format!("user{i}")).collect();
        let refs: Vec<&str> = users.iter().map(String::as_str).collect();
        let origin: Vec<(&str, i32, i64)> = (0..1000).map(|i| ("auth", 0, i)).collect();
        let batch = rows(&origin, &refs);
        for n in [1, 3, 12, 128] {
            let encoded = encode(&batch, &[0], n).expect("encode");
            let mut total = 0;
            for (p, value) in &encoded {
                for b in decode(value, "t/0@1").expect("decode") {
                    assert_eq!(b.schema(), batch.schema());
                    let keys = [b.column(0).clone()];
                    for g in key_group::groups(&keys, b.num_rows()).expect("groups") {
                        assert_eq!(partition_of(g, n), *p);
                        assert!(groups_of(*p, n).contains(&g));
                    }
                    total += b.num_rows();
                }
            }
            assert_eq!(total, 1000, "{n} partitions");
        }
        let err = decode(b"not arrow", "vigil-p-w-repartition/2@17").expect_err("garbage");
        assert!(
            err.to_string().contains("vigil-p-w-repartition/2@17"),
            "{err}"
        );
    }

    #[test]
    fn copies_of_rows_already_taken_are_dropped() {
        let mut marks = OriginMarks::default();
        let first = rows(&[("a", 0, 1), ("a", 0, 2), ("a", 1, 7)], &["x", "y", "z"]);
        assert_eq!(marks.admit(&first).expect("admit").num_rows(), 3);
        // A re-send after a crash overlaps what was taken, cut differently,
        // interleaved with a zombie's copy of the same rows.
        let again = rows(
            &[
                ("a", 0, 2),
                ("a", 0, 3),
                ("a", 1, 7),
                ("a", 1, 8),
                ("a", 0, 3),
            ],
            &["y", "w", "z", "v", "w"],
        );
        let admitted = marks.admit(&again).expect("admit");
        let users: Vec<&str> = admitted
            .column(0)
            .as_string::<i32>()
            .iter()
            .flatten()
            .collect();
        assert_eq!(users, ["w", "v"]);
        // The marks survive a checkpoint.
        let restored = OriginMarks::restore(&marks.snapshot().expect("snapshot")).expect("restore");
        assert_eq!(restored, marks);
        let mut restored = restored;
        assert_eq!(restored.admit(&again).expect("admit").num_rows(), 0);
        // A batch without origin columns is refused, not passed through.
        let schema = Arc::new(Schema::new(vec![Field::new("user", DataType::Utf8, false)]));
        let bare = RecordBatch::try_new(
            schema,
            vec![Arc::new(StringArray::from(vec!["x"])) as ArrayRef],
        )
        .expect("batch");
        assert!(marks.admit(&bare).is_err());
    }

    #[test]
    fn the_slowest_live_writer_holds_the_watermark_and_idle_ones_do_not() {
        let mut w = ProducerWatermarks::new(Duration::from_secs(10));
        assert_eq!(w.watermark(0), None);
        w.observe("a/0", 100, 0);
        w.observe("b/0", 50, 0);
        assert_eq!(w.watermark(0), Some(50));
        w.observe("b/0", 120, 1_000);
        w.observe("a/0", 130, 1_000);
        assert_eq!(w.watermark(1_000), Some(120));
        // b goes quiet; after the idle timeout only a counts.
        w.observe("a/0", 200, 12_000);
        assert_eq!(w.watermark(12_000), Some(200));
        // A newcomer behind what was emitted does not move it back.
        w.observe("c/0", 150, 12_500);
        assert_eq!(w.watermark(12_500), Some(200));
        w.observe("c/0", 300, 13_000);
        w.observe("a/0", 310, 13_000);
        assert_eq!(w.watermark(13_000), Some(300));
        // A finished writer stops holding it back at once.
        w.finish("c/0", 13_100);
        assert_eq!(w.watermark(13_100), Some(310));
    }

    /// Writer `producer` announced `watermark` and the bounds `origins`.
    fn heard(w: &mut ProducerWatermarks, producer: &str, watermark: i64, origins: &str, now: i64) {
        w.observe(producer, watermark, now);
        w.observe_origins(producer, origins, now, "test");
    }

    #[test]
    fn a_fresh_partition_waits_until_every_input_partition_is_announced() {
        let expected: HashSet<String> = ["auth:0", "auth:1", "alerts:0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut w = ProducerWatermarks::new(Duration::from_secs(10))
            .expect_origins(Arc::new(expected.clone()), 10_000);
        // The first writer of a forming group reads auth:0 only.
        heard(&mut w, "a/0", 500, "auth:0=500", 0);
        assert_eq!(w.watermark(0), None, "auth:1 and alerts:0 unannounced");
        heard(&mut w, "b/0", 300, "auth:1=300,alerts:0=idle", 1_000);
        assert_eq!(w.watermark(1_000), Some(300), "everyone announced");

        // An input partition nobody announces holds only for the idle time.
        let mut w = ProducerWatermarks::new(Duration::from_secs(10))
            .expect_origins(Arc::new(expected), 10_000);
        heard(&mut w, "a/0", 500, "auth:0=500", 0);
        assert_eq!(w.watermark(9_999), None);
        heard(&mut w, "a/0", 600, "auth:0=600", 10_000);
        assert_eq!(w.watermark(10_000), Some(600));

        // A partition taken over with its writers from a checkpoint has
        // waited already, at its previous owner.
        let mut w = ProducerWatermarks::new(Duration::from_secs(10))
            .expect_origins(Arc::new(["auth:0".to_string()].into()), 10_000);
        w.restore([(Some("a/0".to_string()), 700, false)].into_iter(), 0);
        assert_eq!(w.watermark(0), Some(700));
    }

    #[test]
    fn an_input_partition_changing_writers_holds_the_watermark_at_its_bound() {
        let mut w = ProducerWatermarks::new(Duration::from_secs(10));
        // a reads auth:0, b reads auth:1.
        heard(&mut w, "a/0", 100, "auth:0=100", 0);
        heard(&mut w, "b/0", 100, "auth:1=400", 0);
        assert_eq!(w.watermark(0), Some(100));
        // a dies. b takes auth:0 over; its own watermark is already past
        // auth:0's backlog, but auth:0's bound, a's last, holds.
        heard(&mut w, "b/0", 500, "auth:1=500", 3_000);
        assert_eq!(w.watermark(3_000), Some(100));
        // Past a's idle time, b's bound for auth:0 still holds; re-read
        // copies below a's bound do not lower it.
        heard(&mut w, "b/0", 500, "auth:0=90,auth:1=500", 11_000);
        assert_eq!(w.watermark(11_000), Some(100));
        heard(&mut w, "b/0", 500, "auth:0=300,auth:1=500", 11_500);
        assert_eq!(w.watermark(11_500), Some(300));
        // An idle input partition no longer holds it; nor does a
        // malformed entry.
        heard(
            &mut w,
            "b/0",
            500,
            "auth:0=idle,auth:1=500,junk,x:1=y",
            12_000,
        );
        assert_eq!(w.watermark(12_000), Some(500));
    }

    #[test]
    fn a_dead_writers_partitions_hold_only_until_its_idle_time() {
        let mut w = ProducerWatermarks::new(Duration::from_secs(10));
        heard(&mut w, "a/0", 100, "auth:0=100", 0);
        heard(&mut w, "b/0", 100, "auth:1=400", 0);
        heard(&mut w, "b/0", 500, "auth:1=500", 9_000);
        assert_eq!(w.watermark(9_000), Some(100));
        // Nobody took auth:0 over within the idle time (it has no rows).
        heard(&mut w, "b/0", 600, "auth:1=600", 10_500);
        assert_eq!(w.watermark(10_500), Some(600));
        // A finished writer's partitions stop holding at once.
        heard(&mut w, "c/0", 700, "auth:2=650", 11_000);
        heard(&mut w, "b/0", 700, "auth:1=700", 11_000);
        assert_eq!(w.watermark(11_000), Some(650));
        w.finish("c/0", 11_100);
        assert_eq!(w.watermark(11_100), Some(700));
    }

    #[test]
    fn a_writer_bounds_each_input_partition_by_its_own_rows() {
        let schema = Arc::new(Schema::new(vec![
            Field::new(ORIGIN_TOPIC, DataType::Utf8, false),
            Field::new(ORIGIN_PARTITION, DataType::Int32, false),
            Field::new(
                "ts",
                DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, None),
                true,
            ),
        ]));
        let batch = |rows: &[(&str, i32, Option<i64>)]| {
            let columns: Vec<ArrayRef> = vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(arrow::array::TimestampMillisecondArray::from(
                    rows.iter().map(|r| r.2).collect::<Vec<_>>(),
                )),
            ];
            RecordBatch::try_new(schema.clone(), columns).expect("batch")
        };
        let spec = OriginSpec {
            event_time: "ts".into(),
            out_of_orderness_ms: 10,
            idle_timeout_ms: 1_000,
        };
        let mut t = OriginTracker::new(&spec, &schema, 0, 1).expect("tracker");
        assert!(!t.dirty);
        t.observe(
            &batch(&[
                ("auth", 0, Some(100)),
                ("auth", 0, Some(300)),
                ("auth", 1, Some(50)),
                ("auth", 0, Some(200)),
                ("alerts", 0, None),
                ("alerts", 0, Some(70)),
            ]),
            0,
        )
        .expect("observe");
        assert!(t.dirty);
        assert_eq!(t.header(0), "alerts:0=60,auth:0=290,auth:1=40");
        assert!(!t.dirty);
        // An older row moves nothing.
        t.observe(&batch(&[("auth", 0, Some(250))]), 100)
            .expect("observe");
        assert!(!t.dirty);
        // Quiet for half the idle timeout: idle; for twice it: forgotten.
        t.observe(&batch(&[("auth", 1, Some(60))]), 600)
            .expect("observe");
        assert!(t.dirty);
        assert_eq!(t.header(600), "alerts:0=idle,auth:0=idle,auth:1=50");
        assert_eq!(t.header(2_500), "auth:1=idle");
        assert_eq!(t.header(3_000), "");
        // A column of the wrong type is refused when the writer starts.
        let bad = OriginSpec {
            event_time: "_partition".into(),
            ..spec
        };
        assert!(OriginTracker::new(&bad, &schema, 0, 1).is_err());
        assert!(OriginTracker::new(&spec, &schema, 1, 0).is_err());
    }

    #[test]
    fn a_partitions_next_owner_knows_where_its_writers_were() {
        let schema = rows(&[], &[]).schema();
        let control = |producer: &'static str, w: &'static str, offset| Record {
            kind: Some("watermark"),
            producer: Some(producer),
            watermark: Some(w),
            origins: None,
            second: false,
            value: &[],
            offset,
        };
        let new = || ReaderPartitions::new(6, Duration::from_secs(10), vec![schema.clone()]);
        let mut before = new();
        let read = |r: &mut ReaderPartitions, p, records: Vec<Record<'static>>, now| {
            r.read(p, records.into_iter(), now, "t").expect("read").1
        };
        assert_eq!(
            read(
                &mut before,
                1,
                vec![control("a/0", "100", 0), control("b/0", "50", 1)],
                0
            ),
            Some(50)
        );
        assert_eq!(
            read(&mut before, 2, vec![control("a/0", "70", 0)], 0),
            Some(70)
        );
        let marks = before.snapshot([1].into_iter()).expect("marks");
        let writers = before.snapshot_writers([1].into_iter()).expect("writers");
        assert_eq!(
            writers.num_rows(),
            3,
            "two writers and the emitted watermark"
        );

        // The writers sent nothing since: the new owner has the watermark
        // at once, and a writer that went quiet stops holding it back.
        let mut after = new();
        after
            .adopt(1, &marks, Some(&writers), 5_000)
            .expect("adopt");
        assert_eq!(after.watermark(1, 5_000), Some(50));
        assert_eq!(after.heard(), vec![1], "partition 2 is not taken over");
        assert_eq!(
            read(&mut after, 1, vec![control("a/0", "200", 2)], 16_000),
            Some(200)
        );
        // Another reader's partition, in transit, published 150: this one
        // is held there (it does not go back from 200), and publishes what
        // its own writers reached.
        after.set_floor(Some(150));
        assert_eq!(
            read(&mut after, 1, vec![control("a/0", "300", 3)], 16_100),
            None
        );
        assert_eq!(after.reached(1), Some(300));
        after.set_floor(Some(250));
        assert_eq!(after.watermark(1, 16_200), Some(250));
        after.set_floor(None);
        assert_eq!(after.watermark(1, 16_300), Some(300));
    }

    #[test]
    fn a_joins_two_inputs_share_a_partition_and_keep_marks_of_their_own() {
        // A self-join: both inputs' rows come from the same origin.
        let batch = rows(&[("auth", 0, 1), ("auth", 0, 2)], &["x", "y"]);
        let (_, value) = encode(&batch, &[0], 1).expect("encode").remove(0);
        let data = |second, offset| Record {
            kind: Some("data"),
            producer: None,
            watermark: None,
            origins: None,
            second,
            value: value.as_slice(),
            offset,
        };
        let schema = batch.schema();
        let mut before = ReaderPartitions::new(
            1,
            Duration::from_secs(10),
            vec![schema.clone(), schema.clone()],
        );
        let (got, _) = before
            .read(0, [data(false, 0), data(true, 1)].into_iter(), 0, "t")
            .expect("read");
        let sides: Vec<(usize, usize)> = got.iter().map(|(i, b)| (*i, b.num_rows())).collect();
        assert_eq!(sides, [(0, 2), (1, 2)]);

        // The next owner drops re-sends of either input, and only those.
        let marks = before.snapshot([0].into_iter()).expect("marks");
        let mut after =
            ReaderPartitions::new(1, Duration::from_secs(10), vec![schema.clone(), schema]);
        after.adopt(0, &marks, None, 0).expect("adopt");
        let (got, _) = after
            .read(0, [data(true, 2), data(false, 3)].into_iter(), 0, "t")
            .expect("read");
        assert!(got.is_empty(), "{got:?}");
        let fresh = rows(&[("auth", 0, 3)], &["z"]);
        let (_, value) = encode(&fresh, &[0], 1).expect("encode").remove(0);
        let record = Record {
            kind: Some("data"),
            producer: None,
            watermark: None,
            origins: None,
            second: true,
            value: value.as_slice(),
            offset: 4,
        };
        let (got, _) = after.read(0, [record].into_iter(), 0, "t").expect("read");
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0, got[0].1.num_rows()), (1, 1));
        // One input only: a second input's record is an error naming it.
        let mut single = ReaderPartitions::new(1, Duration::from_secs(10), vec![batch.schema()]);
        let e = single
            .read(0, [data(true, 9)].into_iter(), 0, "t/0")
            .expect_err("refused");
        assert!(e.to_string().contains("t/0@9"), "{e}");
    }
}
