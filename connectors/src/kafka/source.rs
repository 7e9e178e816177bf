//! The Kafka source: every subtask is a member of the pipeline's consumer
//! group, so the group protocol spreads partitions over subtasks (and over
//! processes running the same pipeline).
//!
//! # Partitions and watermarks
//! A rebalance callback records assignments and revocations; the subtask
//! maps each `(topic, partition)` to a local index and tells the runtime
//! ([`SourceEvent::PartitionAssigned`] / [`SourceEvent::PartitionRevoked`]),
//! which keeps one watermark per partition and excludes idle and revoked ones.
//!
//! # Handing a partition over
//! A revoked partition is not let go at once. The callback only records the
//! revocation; the subtask stops handing out the partition's records, asks
//! the runtime for a checkpoint ([`SourceEvent::CheckpointRequested`]) and,
//! once that checkpoint has completed (everything read from the partition
//! has reached the sinks), commits the partition's offset and only then
//! unassigns it. The next owner starts exactly where this one stopped: no
//! loss and, unless the hand-over times out ([`HANDOVER_TIMEOUT`]), no
//! duplicates. The group waits for the unassign, as Kafka Streams' does for
//! its revocation flush. If the broker refuses that commit (some do while
//! the group rebalances), the flushed position is kept in the process: a
//! partition that comes back to it resumes there rather than at the older
//! commit.
//!
//! # Offsets
//! Offsets are never auto-committed. A checkpoint's snapshot records the next
//! offset of every partition for what this subtask has handed out; when the
//! checkpoint has completed everywhere (every record before its barrier has
//! been processed and every sink has flushed), those offsets are committed,
//! synchronously: once per checkpoint interval, and once more when the
//! pipeline is stopped (a stop takes a final checkpoint).
//! That makes delivery at-least-once for what leaves the pipeline; state held
//! in windows becomes durable with persisted checkpoints. Offsets of handed
//! over or lost partitions are dropped, never committed over their new
//! owner's.
//!
//! # Decoding
//! Values are decoded in per-partition chunks: JSON by [`JsonDecoder`],
//! Avro by [`AvroDecoder`] (writer schemas looked up in the registry before
//! the chunk is decoded), string and bytes as one column. Undecodable values
//! go to the dead letters with `topic/partition` as their location and the
//! offset as their line. Each row also carries `kafka_topic`,
//! `kafka_partition`, `kafka_offset`, `kafka_key`, `kafka_timestamp` and
//! `kafka_headers`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    Array, ArrayRef, BinaryArray, Int32Array, Int64Array, MapBuilder, RecordBatch, StringArray,
    StringBuilder, TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow_avro::schema::AvroSchema;
use async_trait::async_trait;
use futures::StreamExt;
use parking_lot::Mutex;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use vigil_engine::{
    CheckpointId, EngineError, OperatorState, Source, SourceEvent, SourceFactory, TaskContext,
    DEAD_LETTER,
};

use super::config::{KafkaSourceConfig, Start, StartOffset, ValueFormat};
use crate::avro::{AvroDecoder, Registry};
use crate::dead_letter::{self, DeadLetterError, DeadLetters};
use crate::error::{ConnectorError, Result};
use crate::json::{JsonDecoder, RecordSpan};
use crate::schema::timestamp_type;

/// Builds Kafka source subtasks.
#[derive(Debug)]
pub struct KafkaSourceFactory {
    name: String,
    config: KafkaSourceConfig,
    group_id: String,
    codec: Codec,
    schema: SchemaRef,
    event_time: usize,
    start: Start,
    /// Partitions already positioned by `start` in this process, shared by
    /// all subtasks: a partition moving between subtasks is not rewound.
    started: Arc<Mutex<HashSet<TopicPartition>>>,
    /// Positions of partitions this process flushed when handing them over
    /// but could not commit (the group was rebalancing): if the partition
    /// comes back to this process, reading resumes there, not at the older
    /// commit. Shared by all subtasks.
    resume: Arc<Mutex<HashMap<TopicPartition, i64>>>,
    /// Fingerprint of the pipeline's definition, carried in the client id
    /// so that members of the group can tell each other apart.
    definition: Option<String>,
    /// Whether the group was found free of other definitions (checked once,
    /// when the first subtask starts).
    checked: Arc<Mutex<bool>>,
    /// Set when several processes share the partitions: commits carry
    /// pointers to checkpoints, and an assigned partition goes on from the
    /// checkpoint its commit names.
    ownership: Arc<Mutex<Option<super::ownership::Ownership>>>,
}

/// How record values become columns.
#[derive(Debug, Clone)]
enum Codec {
    /// JSON objects of a declared schema.
    Json(Arc<JsonDecoder>),
    /// Confluent-framed Avro read with `reader`.
    Avro {
        reader: AvroSchema,
        registry: Arc<Registry>,
        flatten: bool,
        event_time: String,
    },
    /// String or bytes, one `value` column.
    Raw,
    /// A repartition topic: Arrow IPC rows and the writers' watermarks.
    Repartition {
        partitions: usize,
        idle: Duration,
        /// A join's second input, handed out on
        /// [`super::repartition::SECOND_INPUT`].
        second: Option<SchemaRef>,
        /// The Kafka topics the writers read: every one of their
        /// partitions is announced before a fresh partition's watermark
        /// moves (see [`KafkaSourceFactory::expect_origins`]).
        origins: Vec<String>,
    },
}

/// A subtask's decoder: the Avro one keeps the writer schemas it has met.
enum ValueDecoder {
    Json(Arc<JsonDecoder>),
    Avro {
        decoder: Box<AvroDecoder>,
        registry: Arc<Registry>,
        flatten: bool,
        /// The event-time column among the decoder's.
        event_time: usize,
    },
    Raw,
    Repartition(Box<super::repartition::ReaderPartitions>),
}

fn headers_type() -> DataType {
    DataType::Map(
        Arc::new(Field::new(
            "entries",
            DataType::Struct(
                vec![
                    Field::new("keys", DataType::Utf8, false),
                    Field::new("values", DataType::Utf8, true),
                ]
                .into(),
            ),
            false,
        )),
        false,
    )
}

fn metadata_fields() -> Vec<Field> {
    vec![
        Field::new("kafka_topic", DataType::Utf8, false),
        Field::new("kafka_partition", DataType::Int32, false),
        Field::new("kafka_offset", DataType::Int64, false),
        Field::new("kafka_key", DataType::Utf8, true),
        Field::new("kafka_timestamp", timestamp_type(), true),
        Field::new("kafka_headers", headers_type(), false),
    ]
}

impl KafkaSourceFactory {
    /// Validates `config` for source `name` of pipeline `pipeline`.
    pub fn new(pipeline: &str, name: &str, config: &KafkaSourceConfig) -> Result<Self> {
        if config.topics.is_empty() {
            return Err(ConnectorError::config("topics", "no topics to read"));
        }
        if config.brokers.trim().is_empty() {
            return Err(ConnectorError::config(
                "brokers",
                "brokers must not be empty",
            ));
        }
        let start = Start::parse(&config.start).ok_or_else(|| {
            ConnectorError::config(
                "start",
                format!(
                    "start {:?} is not committed, earliest, latest or an RFC 3339 time",
                    config.start
                ),
            )
        })?;
        if config.batch_size == 0 {
            return Err(ConnectorError::config(
                "batch_size",
                "batch_size must be at least 1",
            ));
        }
        if config.registry.is_some() && config.format != ValueFormat::Avro {
            return Err(ConnectorError::config(
                "registry",
                "a schema registry applies to Avro values only",
            ));
        }
        let (payload, codec, event_time) = match (config.format, &config.schema) {
            (ValueFormat::Json, Some(schema)) => {
                let resolved = schema.resolve()?;
                let mut decoder = JsonDecoder::new(
                    resolved.decode,
                    resolved.event_time,
                    schema.event_time.format,
                )?;
                if schema.flatten {
                    decoder = decoder.flattened()?;
                }
                let event_time = decoder.event_time_column();
                (decoder.schema(), Codec::Json(Arc::new(decoder)), event_time)
            }
            (ValueFormat::Avro, Some(schema)) => {
                let resolved = schema.resolve()?;
                let reader = resolved.avro.ok_or_else(|| {
                    ConnectorError::config("schema.avro", "Avro values need a reader schema")
                        .with_hint("name the .avsc file the pipeline reads with: schema.avro")
                })?;
                let registry = config.registry.as_ref().ok_or_else(|| {
                    ConnectorError::config("registry", "Avro values need a schema registry")
                        .with_hint("registry: { url: http://schema-registry:8081 }")
                })?;
                let payload = if schema.flatten {
                    crate::file::flattened(&resolved.decode)?
                } else {
                    resolved.decode.clone()
                };
                let event_time = payload
                    .index_of(&schema.event_time.field)
                    .unwrap_or(resolved.event_time);
                let codec = Codec::Avro {
                    reader,
                    registry: Arc::new(Registry::new(registry, "registry")?),
                    flatten: schema.flatten,
                    event_time: schema.event_time.field.clone(),
                };
                (payload, codec, event_time)
            }
            (ValueFormat::Json | ValueFormat::Avro, None) => {
                return Err(ConnectorError::config(
                    "schema",
                    "JSON and Avro values need a schema",
                )
                .with_hint(
                    "declare schema.fields (or schema.avro) and schema.event_time, or use format: string",
                ))
            }
            (_, Some(_)) => return Err(ConnectorError::config(
                "schema",
                "a schema applies to JSON and Avro values only",
            )
            .with_hint(
                "string and bytes values are one column, value; event time is the Kafka timestamp",
            )),
            (format, None) => {
                let t = if format == ValueFormat::String {
                    DataType::Utf8
                } else {
                    DataType::Binary
                };
                let payload = Arc::new(Schema::new(vec![Field::new("value", t, true)]));
                // kafka_timestamp follows the value and three other metadata columns.
                (payload, Codec::Raw, 5)
            }
        };
        let mut fields: Vec<Field> = payload
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        for m in metadata_fields() {
            if payload.index_of(m.name()).is_ok() {
                return Err(ConnectorError::config(
                    "schema.fields",
                    format!("field {:?} clashes with a Kafka metadata column", m.name()),
                ));
            }
            fields.push(m);
        }
        if matches!(codec, Codec::Raw) {
            // Event time is the Kafka timestamp: never null in a batch.
            fields[event_time] = Field::new("kafka_timestamp", timestamp_type(), false);
        }
        Ok(Self {
            name: name.to_string(),
            group_id: config
                .group_id
                .clone()
                .unwrap_or_else(|| format!("vigil-{pipeline}")),
            config: config.clone(),
            codec,
            schema: Arc::new(Schema::new(fields)),
            event_time,
            start,
            started: Arc::default(),
            resume: Arc::default(),
            definition: None,
            checked: Arc::default(),
            ownership: Arc::default(),
        })
    }

    /// The reader of repartition topic `topic` in front of step `name` of
    /// pipeline `pipeline`: its records are rows of `schema` (the step's
    /// input, event time at column `event_time`) and the watermarks of
    /// their writers; a writer not heard from for `idle` stops holding a
    /// partition's watermark back. For a join, `second` is the schema of
    /// its second input, whose rows leave on
    /// [`super::repartition::SECOND_INPUT`].
    #[allow(clippy::too_many_arguments)]
    pub fn repartition_reader(
        pipeline: &str,
        name: &str,
        brokers: &str,
        properties: &super::config::Properties,
        topic: &str,
        schema: SchemaRef,
        second: Option<SchemaRef>,
        event_time: usize,
        partitions: usize,
        idle: Duration,
    ) -> Result<Self> {
        let config = KafkaSourceConfig {
            brokers: brokers.to_string(),
            topics: vec![topic.to_string()],
            group_id: None,
            start: "committed".into(),
            offset_reset: StartOffset::Earliest,
            format: ValueFormat::Bytes,
            schema: None,
            registry: None,
            batch_size: 256,
            dead_letter_topic: None,
            properties: properties.clone(),
        };
        let mut f = Self::new(pipeline, name, &config)?;
        f.codec = Codec::Repartition {
            partitions,
            idle,
            second,
            origins: Vec::new(),
        };
        f.schema = schema;
        f.event_time = event_time;
        Ok(f)
    }

    /// A repartition reader whose writers read `topics`: until each
    /// partition of those topics has been announced by some writer, or
    /// for at most the idle timeout, a partition read from its start
    /// holds its watermark. Writers of a group still forming announce
    /// only the input partitions they were given so far; without this, the
    /// first writer heard would move the watermark past the rows of
    /// partitions not yet given to anyone.
    pub fn expect_origins(mut self, topics: Vec<String>) -> Self {
        if let Codec::Repartition { origins, .. } = &mut self.codec {
            *origins = topics;
        }
        self
    }

    /// Shares this source's partitions with the other processes of the
    /// pipeline: offsets are committed with pointers to this process's
    /// checkpoints, and a partition assigned here goes on from the
    /// checkpoint its commit names (with, for a repartition topic, the
    /// state of its key groups).
    /// Set before the pipeline starts: a process's member name is known
    /// only then, after the plan is built.
    pub fn set_ownership(&self, ownership: super::ownership::Ownership) {
        *self.ownership.lock() = Some(ownership);
    }

    /// The topics this source reads.
    pub fn topics(&self) -> &[String] {
        &self.config.topics
    }

    /// Marks this source's consumers with the fingerprint of the pipeline's
    /// definition; a process refuses to join a group in which a member
    /// carries another one.
    pub fn with_definition(mut self, fingerprint: &str) -> Self {
        self.definition = Some(fingerprint.to_string());
        self
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.config.brokers)
            .set("group.id", &self.group_id)
            // Cooperative rebalancing: a process joining or leaving moves
            // only the partitions that change owner; the others keep being
            // read throughout.
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("session.timeout.ms", "10000")
            // librdkafka stops fetching for fetch.queue.backoff.ms (1 s by
            // default) when its local queue is full; a pipeline drains that
            // queue in milliseconds, so a long pause leaves it starving.
            .set("fetch.queue.backoff.ms", "10")
            .set("isolation.level", "read_committed")
            .set(
                "auto.offset.reset",
                match self.config.offset_reset {
                    StartOffset::Earliest => "earliest",
                    StartOffset::Latest => "latest",
                },
            );
        if let Some(fp) = &self.definition {
            c.set("client.id", client_id(fp, &self.name));
        }
        for (k, v) in self.config.properties.iter() {
            c.set(k, v);
        }
        c
    }

    /// The source's consumer group as its coordinator sees it: members,
    /// the partitions each owns, and their lag.
    pub fn group_status(&self, timeout: Duration) -> Result<super::status::GroupStatus> {
        let consumer: BaseConsumer =
            self.client_config()
                .create()
                .map_err(|e| ConnectorError::Io {
                    path: format!("kafka group {}", self.group_id),
                    source: std::io::Error::other(self.config.properties.scrub(&e.to_string())),
                })?;
        super::status::read(&consumer, &self.group_id, &self.config.topics, timeout)
    }

    /// Refuses to start when a member of the group runs another definition
    /// of the pipeline. Checked once per process, before its first consumer
    /// joins; a broker that cannot describe groups is logged, not fatal.
    fn check_definition(&self) -> vigil_engine::Result<()> {
        let Some(ours) = &self.definition else {
            return Ok(());
        };
        let mut checked = self.checked.lock();
        if *checked {
            return Ok(());
        }
        let probe: BaseConsumer = self.client_config().create().map_err(|e| {
            EngineError::io(
                "cannot create Kafka consumer",
                std::io::Error::other(self.config.properties.scrub(&e.to_string())),
            )
        })?;
        let groups = match probe.fetch_group_list(Some(&self.group_id), Duration::from_secs(10)) {
            Ok(groups) => groups,
            Err(e) => {
                tracing::warn!(source = %self.name, group = %self.group_id, error = %e, "cannot describe the consumer group; the pipeline definition is not compared with its other members");
                *checked = true;
                return Ok(());
            }
        };
        let members = groups
            .groups()
            .iter()
            .flat_map(|g| g.members())
            .map(|m| (m.client_id(), m.client_host()));
        if let Some((theirs, host)) = foreign_member(members, ours) {
            return Err(EngineError::User(format!(
                "kafka source {:?}: consumer group {:?} has a member on {host} running another definition of this pipeline (fingerprint {theirs}; this file's is {ours}). Processes of one pipeline name share partitions and state, so they must run the same file: stop the other processes first, or give this pipeline another name",
                self.name, self.group_id,
            )));
        }
        *checked = true;
        Ok(())
    }
}

/// The client id of a source's consumers: `vigil.<fingerprint>.<source>`.
fn client_id(fingerprint: &str, source: &str) -> String {
    format!("vigil.{fingerprint}.{source}")
}

/// The first member, given as (client id, host), that is a Vigil consumer
/// of another definition than `ours`: its fingerprint and host.
fn foreign_member<'a>(
    members: impl Iterator<Item = (&'a str, &'a str)>,
    ours: &str,
) -> Option<(String, String)> {
    members
        .filter_map(|(id, host)| Some((definition_of(id)?, host)))
        .find(|(theirs, _)| *theirs != ours)
        .map(|(theirs, host)| (theirs.to_string(), host.trim_start_matches('/').to_string()))
}

/// The definition fingerprint in a group member's client id, if it is a
/// Vigil consumer.
pub fn definition_of(client_id: &str) -> Option<&str> {
    let rest = client_id.strip_prefix("vigil.")?;
    let fp = rest.split('.').next()?;
    (!fp.is_empty()).then_some(fp)
}

impl SourceFactory for KafkaSourceFactory {
    fn output_schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn assigned_by_group(&self) -> bool {
        true
    }
    fn event_time_column(&self) -> usize {
        self.event_time
    }
    fn side_outputs(&self) -> Vec<(&'static str, SchemaRef)> {
        let mut sides = vec![(DEAD_LETTER, dead_letter::schema())];
        if let Codec::Repartition {
            second: Some(schema),
            ..
        } = &self.codec
        {
            sides.push((super::repartition::SECOND_INPUT, schema.clone()));
        }
        sides
    }
    fn create(&self, ctx: &TaskContext) -> vigil_engine::Result<Box<dyn Source>> {
        self.check_definition()?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let closing = Arc::new(AtomicBool::new(false));
        let consumer: StreamConsumer<RebalanceRecorder> = self
            .client_config()
            .create_with_context(RebalanceRecorder {
                events: events.clone(),
                start: self.start,
                started: self.started.clone(),
                resume: self.resume.clone(),
                closing: closing.clone(),
                pause: self.ownership.lock().is_some(),
            })
            .map_err(|e| {
                EngineError::io(
                    "cannot create Kafka consumer",
                    std::io::Error::other(self.config.properties.scrub(&e.to_string())),
                )
            })?;
        let consumer = Arc::new(consumer);
        {
            let (weak, metrics, closing) = (
                Arc::downgrade(&consumer),
                ctx.metrics.clone(),
                closing.clone(),
            );
            std::thread::Builder::new()
                .name(format!("vigil-lag-{}", ctx.node))
                .spawn(move || measure_lag(weak, metrics, closing))
                .map_err(|e| EngineError::io("cannot start the consumer-lag thread", e))?;
        }
        let topics: Vec<&str> = self.config.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| kafka_error("cannot subscribe", e))?;
        let mut expected_origins = match &self.codec {
            Codec::Repartition { origins, .. } => origin_partitions(&consumer, origins, &self.name),
            _ => None,
        };
        Ok(Box::new(KafkaSource {
            name: self.name.clone(),
            consumer,
            rebalances: events,
            closing,
            resume: self.resume.clone(),
            handover: None,
            committed: HashMap::new(),
            decoder: match &self.codec {
                Codec::Json(d) => ValueDecoder::Json(d.clone()),
                Codec::Avro {
                    reader,
                    registry,
                    flatten,
                    event_time,
                } => {
                    let decoder = AvroDecoder::new(reader.clone(), self.config.batch_size)
                        .map_err(EngineError::User)?;
                    let event_time = decoder.schema().index_of(event_time)?;
                    ValueDecoder::Avro {
                        decoder: Box::new(decoder),
                        registry: registry.clone(),
                        flatten: *flatten,
                        event_time,
                    }
                }
                Codec::Raw => ValueDecoder::Raw,
                Codec::Repartition {
                    partitions,
                    idle,
                    second,
                    origins: _,
                } => {
                    let mut reader = super::repartition::ReaderPartitions::new(
                        *partitions,
                        *idle,
                        std::iter::once(self.schema.clone())
                            .chain(second.clone())
                            .collect(),
                    );
                    if let Some(expected) = expected_origins.take() {
                        reader = reader.expect_origins(expected);
                    }
                    ValueDecoder::Repartition(Box::new(reader))
                }
            },
            node: ctx.node.clone(),
            clock: ctx.clock.clone(),
            ownership: self.ownership.lock().clone(),
            adopting: Vec::new(),
            release: None,
            letting_go: None,
            handed: HashMap::new(),
            pointers_due: Vec::new(),
            adopted_from: HashMap::new(),
            schema: self.schema.clone(),
            batch_size: self.config.batch_size,
            index: HashMap::new(),
            assigned: HashSet::new(),
            next_offsets: HashMap::new(),
            pending_commits: BTreeMap::new(),
            pending_watermarks: BTreeMap::new(),
            floor_read: None,
            config_topic: self.config.topics.first().cloned(),
            queue: VecDeque::new(),
        }))
    }
    fn announces_watermarks(&self) -> bool {
        // A repartition partition's rows come from every writer, each at
        // its own pace: their event times bound nothing, only the writers'
        // watermark records do.
        matches!(self.codec, Codec::Repartition { .. })
    }
    fn describe(&self) -> String {
        format!(
            "kafka {} (group {})",
            self.config.topics.join(", "),
            self.group_id
        )
    }
}

fn kafka_error(context: &str, e: rdkafka::error::KafkaError) -> EngineError {
    EngineError::io(context, std::io::Error::other(e))
}

#[derive(Debug)]
enum RebalanceEvent {
    Assigned(Vec<(String, i32)>),
    /// Partitions to hand over; `cooperative` tells how to unassign them.
    Revoked {
        partitions: Vec<(String, i32)>,
        cooperative: bool,
    },
    /// Partitions lost without a hand-over (already unassigned).
    Lost(Vec<(String, i32)>),
}

/// How often a repartition reader reads the watermarks other partitions'
/// pointers publish.
const FLOOR_EVERY: Duration = Duration::from_millis(500);

/// How long a revoked partition waits for its flushing checkpoint before it
/// is unassigned anyway (its records are then re-read by the next owner).
/// Well under the group's rebalance timeout (`max.poll.interval.ms`).
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// Revoked partitions waiting for their flushing checkpoint.
struct Handover {
    partitions: Vec<TopicPartition>,
    cooperative: bool,
    /// The checkpoint whose completion lets them go, once it is taken.
    checkpoint: Option<CheckpointId>,
    deadline: tokio::time::Instant,
}

/// Positions newly assigned partitions and records rebalances for the
/// subtask to act on between polls.
struct RebalanceRecorder {
    events: Arc<Mutex<Vec<RebalanceEvent>>>,
    start: Start,
    started: Arc<Mutex<HashSet<TopicPartition>>>,
    resume: Arc<Mutex<HashMap<TopicPartition, i64>>>,
    /// Set when the consumer is closing: revocations then unassign at once
    /// (closing waits for it; the final checkpoint has committed already).
    closing: Arc<AtomicBool>,
    /// Assigned partitions start paused: the subtask resumes them once it
    /// has found their checkpoint and positioned them.
    pause: bool,
}

impl ClientContext for RebalanceRecorder {}

/// How often consumer lag is measured.
const LAG_INTERVAL: Duration = Duration::from_secs(1);

/// Measures, on a thread of its own, how far each assigned partition's end
/// is ahead of the consumer's position, and puts it and the assignment in
/// the metrics.
///
/// A thread rather than librdkafka's statistics callback: that callback is
/// served only while the source polls, so a source blocked by a stalled
/// sink, exactly when the lag matters, would stop reporting it. The thread
/// holds the consumer weakly and ends when the source drops it.
fn measure_lag(
    consumer: std::sync::Weak<StreamConsumer<RebalanceRecorder>>,
    metrics: Arc<vigil_engine::TaskMetrics>,
    closing: Arc<AtomicBool>,
) {
    const STEP: Duration = Duration::from_millis(100);
    loop {
        for _ in 0..(LAG_INTERVAL.as_millis() / STEP.as_millis()) {
            std::thread::sleep(STEP);
            if closing.load(Ordering::Acquire) {
                return;
            }
        }
        let Some(c) = consumer.upgrade() else { return };
        let Ok(position) = c.position() else {
            continue;
        };
        // Where each partition is: the consumer's position, or for one it
        // has not read from since it was assigned, the group's committed
        // offset (a partition without either has no known lag).
        let mut at: Vec<(String, i32, i64)> = Vec::new();
        let mut unread = TopicPartitionList::new();
        *metrics.owned_partitions.lock() = position
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        for e in position.elements() {
            match e.offset() {
                Offset::Offset(o) => at.push((e.topic().to_string(), e.partition(), o)),
                _ => {
                    let _ = unread.add_partition_offset(e.topic(), e.partition(), Offset::Invalid);
                }
            }
        }
        if unread.count() > 0 {
            if let Ok(committed) = c.committed_offsets(unread, LAG_INTERVAL) {
                for e in committed.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        at.push((e.topic().to_string(), e.partition(), o));
                    }
                }
            }
        }
        let mut lag = std::collections::BTreeMap::new();
        for (topic, partition, o) in at {
            if let Ok((_, high)) = c.fetch_watermarks(&topic, partition, LAG_INTERVAL) {
                lag.insert((topic, partition), (high - o).max(0));
            }
        }
        drop(c);
        *metrics.consumer_lag.lock() = lag;
    }
}

/// Every partition of `topics` as `topic:partition`, from the broker's
/// metadata; None (with a warning naming `source`) if the broker does not
/// say, and the reader then waits for no one.
fn origin_partitions<C: rdkafka::consumer::ConsumerContext>(
    consumer: &StreamConsumer<C>,
    topics: &[String],
    source: &str,
) -> Option<HashSet<String>> {
    if topics.is_empty() {
        return None;
    }
    let mut all = HashSet::new();
    for topic in topics {
        let found = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .ok()
            .and_then(|m| {
                m.topics()
                    .iter()
                    .find(|t| t.name() == topic && t.error().is_none())
                    .map(|t| t.partitions().len())
            })
            .filter(|&n| n > 0);
        match found {
            Some(n) => all.extend((0..n).map(|p| format!("{topic}:{p}"))),
            None => {
                tracing::warn!(source, topic, "no partition count for an input of this repartition topic: its watermark waits for no input partition at start");
                return None;
            }
        }
    }
    Some(all)
}

fn partitions_of(list: &TopicPartitionList) -> Vec<(String, i32)> {
    list.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl RebalanceRecorder {
    /// Sets the start offset of partitions this process has not read yet,
    /// and of partitions coming back after an uncommitted hand-over.
    fn position(&self, consumer: &BaseConsumer<Self>, list: &mut TopicPartitionList) {
        let resumed: Vec<(TopicPartition, i64)> = {
            let mut resume = self.resume.lock();
            partitions_of(list)
                .into_iter()
                .filter_map(|tp| resume.remove(&tp).map(|o| (tp, o)))
                .collect()
        };
        for (tp, o) in &resumed {
            if let Err(e) = list.set_partition_offset(&tp.0, tp.1, Offset::Offset(*o)) {
                tracing::error!(topic = %tp.0, partition = tp.1, error = %e, "cannot set resume offset");
            }
        }
        let fresh: Vec<TopicPartition> = {
            let mut started = self.started.lock();
            partitions_of(list)
                .into_iter()
                .filter(|tp| started.insert(tp.clone()))
                .collect()
        };
        for tp in fresh {
            let offset = match self.start {
                Start::Committed => None,
                Start::Earliest => Some(Offset::Beginning),
                Start::Latest => Some(Offset::End),
                Start::Timestamp(ts) => Some(offset_at(consumer, &tp, ts)),
            };
            if let Some(o) = offset {
                if let Err(e) = list.set_partition_offset(&tp.0, tp.1, o) {
                    tracing::error!(topic = %tp.0, partition = tp.1, error = %e, "cannot set start offset");
                }
            }
        }
    }
}

/// The offset of the first record at or after `ts` (the end if none).
fn offset_at(consumer: &BaseConsumer<RebalanceRecorder>, tp: &TopicPartition, ts: i64) -> Offset {
    let mut query = TopicPartitionList::new();
    if query
        .add_partition_offset(&tp.0, tp.1, Offset::Offset(ts))
        .is_err()
    {
        return Offset::End;
    }
    match consumer.offsets_for_times(query, Duration::from_secs(10)) {
        Ok(found) => match found.find_partition(&tp.0, tp.1).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Offset::Offset(o),
            _ => Offset::End,
        },
        Err(e) => {
            tracing::error!(topic = %tp.0, partition = tp.1, error = %e, "cannot look up offsets by time; starting at the end");
            Offset::End
        }
    }
}

impl ConsumerContext for RebalanceRecorder {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        list: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.position(consumer, list);
                self.events
                    .lock()
                    .push(RebalanceEvent::Assigned(partitions_of(list)));
                let assigned = if cooperative {
                    consumer.incremental_assign(list)
                } else {
                    consumer.assign(list)
                };
                if assigned.is_ok() && self.pause {
                    consumer.pause(list)
                } else {
                    assigned
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS
                if !self.closing.load(Ordering::Acquire) && consumer.assignment_lost() =>
            {
                // Fenced out of the group (its session timed out): the
                // partitions may already be someone else's, so there is
                // no hand-over and nothing of theirs is committed.
                tracing::warn!("kafka assignment lost");
                self.events
                    .lock()
                    .push(RebalanceEvent::Lost(partitions_of(list)));
                if cooperative {
                    consumer.incremental_unassign(list)
                } else {
                    consumer.unassign()
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS
                if !self.closing.load(Ordering::Acquire) =>
            {
                // The subtask unassigns once the partitions are flushed.
                self.events.lock().push(RebalanceEvent::Revoked {
                    partitions: partitions_of(list),
                    cooperative,
                });
                Ok(())
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if cooperative {
                    consumer.incremental_unassign(list)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                // The assignment is lost (e.g. the session timed out): the
                // partitions may already be someone else's, so nothing of
                // theirs may be committed from here.
                tracing::error!(error = ?other, "kafka rebalance failed");
                self.events
                    .lock()
                    .push(RebalanceEvent::Lost(partitions_of(list)));
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot apply kafka partition assignment");
        }
    }
}

/// Messages of one partition gathered for one batch.
#[derive(Default)]
struct Gathered {
    buf: Vec<u8>,
    spans: Vec<RecordSpan>,
    offsets: Vec<i64>,
    /// Keys of all records, one after the other, and where each record's
    /// is (`None`: no key); one buffer instead of a string per record.
    key_bytes: Vec<u8>,
    key_spans: Vec<Option<Range<usize>>>,
    timestamps: Vec<Option<i64>>,
    /// Headers of all records, and where each record's end.
    header_keys: Vec<String>,
    header_values: Vec<Option<String>>,
    header_ends: Vec<usize>,
}

impl Gathered {
    /// Record `r`'s key as text (bytes that are not UTF-8 are replaced).
    fn key(&self, r: usize) -> Option<std::borrow::Cow<'_, str>> {
        let span = self.key_spans[r].clone()?;
        Some(String::from_utf8_lossy(&self.key_bytes[span]))
    }
}

type TopicPartition = (String, i32);

struct KafkaSource {
    name: String,
    /// The node's name, under which its positions are in checkpoints.
    node: String,
    clock: vigil_engine::SharedClock,
    ownership: Option<super::ownership::Ownership>,
    /// Partitions assigned (and paused) that wait for their checkpoint.
    adopting: Vec<TopicPartition>,
    /// Key groups to release behind the barrier just injected.
    release: Option<Vec<u16>>,
    /// A hand-over whose checkpoint is committed, unassigned once its
    /// pointers are written.
    letting_go: Option<(Handover, HashMap<TopicPartition, i64>)>,
    /// Partitions handed over with a commit naming one of this process's
    /// checkpoints, which is kept until the next owner commits.
    handed: HashMap<TopicPartition, CheckpointId>,
    /// Pointers of completed checkpoints, to write to the storage.
    pointers_due: Vec<(String, i32, super::ownership::Pointer)>,
    /// The pointer each partition had when this process took it (`None`:
    /// it had none). A pointer is written over only if it is still that
    /// one or one of this member's: anything else means another process
    /// has taken the partition since, and this one is a zombie.
    adopted_from: HashMap<TopicPartition, Option<super::ownership::Pointer>>,
    consumer: Arc<StreamConsumer<RebalanceRecorder>>,
    rebalances: Arc<Mutex<Vec<RebalanceEvent>>>,
    closing: Arc<AtomicBool>,
    resume: Arc<Mutex<HashMap<TopicPartition, i64>>>,
    /// Revoked partitions not yet let go.
    handover: Option<Handover>,
    /// The last offset committed for each partition.
    committed: HashMap<TopicPartition, i64>,
    decoder: ValueDecoder,
    schema: SchemaRef,
    batch_size: usize,
    /// Local partition index of each (topic, partition) ever assigned here.
    index: HashMap<TopicPartition, usize>,
    /// Partitions this subtask owns now.
    assigned: HashSet<TopicPartition>,
    /// Next offset to read, for what has been handed out.
    next_offsets: HashMap<TopicPartition, i64>,
    /// Offsets to commit when a checkpoint completes.
    pending_commits: BTreeMap<CheckpointId, HashMap<TopicPartition, i64>>,
    /// For a repartition topic, each partition's watermark at each pending
    /// checkpoint, which its pointer publishes.
    pending_watermarks: BTreeMap<CheckpointId, HashMap<i32, i64>>,
    /// When the other partitions' published watermarks were last read.
    floor_read: Option<tokio::time::Instant>,
    /// The first topic read (a repartition reader reads one).
    config_topic: Option<String>,
    /// Events not yet handed out.
    queue: VecDeque<Queued>,
}

/// An event not yet handed out.
struct Queued {
    event: SourceEvent,
    /// The partition whose records it carries: dropped if that partition
    /// is revoked before it is handed out.
    from: Option<TopicPartition>,
    /// The offset it moves `from` to once handed out.
    advance: Option<i64>,
}

impl Queued {
    fn control(event: SourceEvent) -> Self {
        Self {
            event,
            from: None,
            advance: None,
        }
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Release);
    }
}

impl KafkaSource {
    fn local(&mut self, tp: &TopicPartition) -> usize {
        let n = self.index.len();
        *self.index.entry(tp.clone()).or_insert(n)
    }

    fn apply_rebalances(&mut self) {
        let events: Vec<RebalanceEvent> = std::mem::take(&mut *self.rebalances.lock());
        for e in events {
            match e {
                RebalanceEvent::Assigned(list) => {
                    for tp in list {
                        tracing::info!(source = %self.name, topic = %tp.0, partition = tp.1, "partition assigned");
                        let i = self.local(&tp);
                        if self.ownership.is_some() {
                            self.adopting.push(tp.clone());
                        }
                        self.assigned.insert(tp);
                        self.queue
                            .push_back(Queued::control(SourceEvent::PartitionAssigned(i)));
                    }
                    // Even an empty assignment ends the wait for one.
                    self.queue
                        .push_back(Queued::control(SourceEvent::GroupAssigned));
                }
                RebalanceEvent::Revoked {
                    partitions,
                    cooperative,
                } => self.revoke(partitions, cooperative),
                RebalanceEvent::Lost(partitions) => {
                    for tp in &partitions {
                        tracing::warn!(source = %self.name, topic = %tp.0, partition = tp.1, "partition lost; its next owner re-reads from the last commit");
                        self.assigned.remove(tp);
                        self.forget(tp);
                        let i = self.local(tp);
                        self.queue
                            .push_back(Queued::control(SourceEvent::PartitionRevoked(i)));
                    }
                    self.drop_unassigned();
                    let groups = self.groups_of(&partitions);
                    self.release_now(groups);
                }
            }
        }
    }

    /// Stops handing out `partitions` and asks for the checkpoint that
    /// flushes what was handed out; they are unassigned when it completes.
    fn revoke(&mut self, partitions: Vec<TopicPartition>, cooperative: bool) {
        let mut unflushed = false;
        for tp in &partitions {
            tracing::info!(source = %self.name, topic = %tp.0, partition = tp.1, "partition revoked");
            self.assigned.remove(tp);
            let i = self.local(tp);
            self.queue
                .push_back(Queued::control(SourceEvent::PartitionRevoked(i)));
            unflushed |= self
                .next_offsets
                .get(tp)
                .is_some_and(|next| self.committed.get(tp) != Some(next));
        }
        // A repartition topic's keyed state changes without records (a
        // window fires): its hand-over always takes a checkpoint.
        unflushed |= self.groups_of(&partitions).is_some();
        self.drop_unassigned();
        let mut handover = Handover {
            partitions,
            cooperative,
            checkpoint: None,
            deadline: tokio::time::Instant::now() + HANDOVER_TIMEOUT,
        };
        if let Some(earlier) = self.handover.take() {
            // A second revocation before the first finished: both wait
            // for the same, newer checkpoint.
            handover.partitions.extend(earlier.partitions);
            handover.cooperative &= earlier.cooperative;
            unflushed = true;
        }
        if unflushed {
            self.queue
                .push_back(Queued::control(SourceEvent::CheckpointRequested));
            self.handover = Some(handover);
        } else {
            self.let_go(handover, None);
        }
    }

    /// Unassigns handed-over partitions and forgets their offsets.
    /// `flushed` holds the positions a completed checkpoint covers; those
    /// its commit did not reach are kept to resume from if they come back.
    fn let_go(&mut self, handover: Handover, flushed: Option<&HashMap<TopicPartition, i64>>) {
        for tp in &handover.partitions {
            if let Some(&o) = flushed.and_then(|f| f.get(tp)) {
                if self.committed.get(tp) != Some(&o) {
                    self.resume.lock().insert(tp.clone(), o);
                }
            }
            self.forget(tp);
        }
        let result = if handover.cooperative {
            let mut list = TopicPartitionList::new();
            for (t, p) in &handover.partitions {
                list.add_partition(t, *p);
            }
            self.consumer.incremental_unassign(&list)
        } else {
            self.consumer.unassign()
        };
        match result {
            Ok(()) => {
                tracing::info!(source = %self.name, partitions = handover.partitions.len(), "revoked partitions handed over")
            }
            Err(e) => {
                tracing::error!(source = %self.name, error = %e, "cannot unassign revoked partitions")
            }
        }
    }

    /// Drops queued records of partitions no longer assigned here: they are
    /// the next owner's to read.
    fn drop_unassigned(&mut self) {
        let assigned = &self.assigned;
        self.queue
            .retain(|q| q.from.as_ref().is_none_or(|tp| assigned.contains(tp)));
    }

    /// Forgets the offsets of a partition that is no longer ours: they must
    /// never be committed over its next owner's.
    fn forget(&mut self, tp: &TopicPartition) {
        if let ValueDecoder::Repartition(r) = &mut self.decoder {
            r.forget(tp.1);
        }
        self.next_offsets.remove(tp);
        self.committed.remove(tp);
        for pending in self.pending_commits.values_mut() {
            pending.remove(tp);
        }
    }

    /// Lets revoked partitions go without their flush once the hand-over
    /// has waited too long (no checkpoint can complete, say).
    fn check_handover_deadline(&mut self) {
        if self
            .handover
            .as_ref()
            .is_some_and(|h| tokio::time::Instant::now() >= h.deadline)
        {
            if let Some(h) = self.handover.take() {
                tracing::warn!(source = %self.name, partitions = h.partitions.len(), "revoked partitions handed over without their flush; the next owner re-reads from the last commit");
                if h.checkpoint.is_none() {
                    let groups = self.groups_of(&h.partitions);
                    self.release_now(groups);
                }
                self.let_go(h, None);
            }
        }
    }

    /// Reads up to `batch_size` messages, waiting at most ~50 ms in all.
    ///
    /// One message stream serves the whole call, and messages are grouped
    /// by partition without allocating per message.
    async fn gather(&mut self) -> vigil_engine::Result<Vec<(TopicPartition, Gathered)>> {
        let mut out: Vec<(TopicPartition, Gathered)> = Vec::new();
        let mut n = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
        let mut stream = self.consumer.stream();
        while n < self.batch_size {
            let msg = match tokio::time::timeout_at(deadline, stream.next()).await {
                Err(_) | Ok(None) => break,
                Ok(Some(Err(e))) => {
                    // Broker and transport errors are retried by librdkafka.
                    tracing::warn!(source = %self.name, error = %e, "kafka consumer error");
                    break;
                }
                Ok(Some(Ok(m))) => m,
            };
            let at = match out
                .iter()
                .position(|((t, p), _)| *p == msg.partition() && t == msg.topic())
            {
                Some(i) => i,
                None => {
                    out.push((
                        (msg.topic().to_string(), msg.partition()),
                        Gathered::default(),
                    ));
                    out.len() - 1
                }
            };
            let g = &mut out[at].1;
            let start = g.buf.len();
            g.buf.extend_from_slice(msg.payload().unwrap_or_default());
            g.spans.push(RecordSpan {
                bytes: start..g.buf.len(),
                line: msg.offset() as u64,
            });
            g.buf.push(b'\n');
            g.offsets.push(msg.offset());
            g.key_spans.push(msg.key().map(|k| {
                let start = g.key_bytes.len();
                g.key_bytes.extend_from_slice(k);
                start..g.key_bytes.len()
            }));
            g.timestamps.push(msg.timestamp().to_millis());
            if let Some(headers) = msg.headers() {
                for h in headers.iter() {
                    g.header_keys.push(h.key.to_string());
                    g.header_values
                        .push(h.value.map(|v| String::from_utf8_lossy(v).into_owned()));
                }
            }
            g.header_ends.push(g.header_keys.len());
            n += 1;
            // Yield to the runtime between messages already buffered.
            if n % 256 == 0 {
                tokio::task::yield_now().await;
            }
        }
        Ok(out)
    }

    /// Looks up the writer schemas of Avro records not met before.
    async fn learn(&mut self, gathered: &[(TopicPartition, Gathered)]) -> vigil_engine::Result<()> {
        if let ValueDecoder::Avro {
            decoder, registry, ..
        } = &mut self.decoder
        {
            let mut records: Vec<&[u8]> = Vec::new();
            for (_, g) in gathered {
                for span in &g.spans {
                    records.push(&g.buf[span.bytes.clone()]);
                }
            }
            decoder.learn(registry, records.into_iter()).await?;
        }
        Ok(())
    }

    fn decode(&mut self, tp: TopicPartition, g: Gathered) -> vigil_engine::Result<()> {
        let location = format!("{}/{}", tp.0, tp.1);
        let mut dead = DeadLetters::new(&self.name);
        let decoded: Vec<(RecordBatch, Vec<usize>)> = match &mut self.decoder {
            ValueDecoder::Json(d) => d
                .decode_indexed(&g.buf, &g.spans, &location, &mut dead)?
                .into_iter()
                .collect(),
            ValueDecoder::Avro {
                decoder,
                flatten,
                event_time,
                ..
            } => decode_avro(decoder, *flatten, *event_time, &g, &location, &mut dead)?,
            ValueDecoder::Raw => self
                .decode_raw(&g, &location, &mut dead)?
                .into_iter()
                .collect(),
            ValueDecoder::Repartition(_) => return self.decode_rekeyed(tp, g, &location),
        };
        // The chunk's last event moves the partition's offset past the chunk.
        let advance = g.offsets.last().map(|last| last + 1);
        if let Some(d) = dead.finish()? {
            self.queue.push_back(Queued {
                event: SourceEvent::DeadLetters(d),
                from: Some(tp.clone()),
                advance: if decoded.is_empty() { advance } else { None },
            });
        }
        let last = decoded.len().saturating_sub(1);
        for (k, (batch, rows)) in decoded.into_iter().enumerate() {
            let batch = self.with_metadata(&tp, &g, batch, &rows)?;
            let partition = self.local(&tp);
            self.queue.push_back(Queued {
                event: SourceEvent::Data { partition, batch },
                from: Some(tp.clone()),
                advance: if k == last { advance } else { None },
            });
        }
        Ok(())
    }

    /// Appends the Kafka metadata columns of records `rows` to `batch`.
    fn with_metadata(
        &self,
        tp: &TopicPartition,
        g: &Gathered,
        batch: RecordBatch,
        rows: &[usize],
    ) -> vigil_engine::Result<RecordBatch> {
        let n = rows.len();
        let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
        cols.push(Arc::new(StringArray::from(vec![tp.0.as_str(); n])));
        cols.push(Arc::new(Int32Array::from(vec![tp.1; n])));
        cols.push(Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|&r| g.offsets[r]),
        )));
        cols.push(Arc::new(StringArray::from_iter(
            rows.iter().map(|&r| g.key(r)),
        )));
        cols.push(Arc::new(
            TimestampMillisecondArray::from_iter(rows.iter().map(|&r| g.timestamps[r]))
                .with_timezone("UTC"),
        ));
        let mut headers = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
        for &r in rows {
            let start = if r == 0 { 0 } else { g.header_ends[r - 1] };
            for h in start..g.header_ends[r] {
                headers.keys().append_value(&g.header_keys[h]);
                headers
                    .values()
                    .append_option(g.header_values[h].as_deref());
            }
            headers.append(true)?;
        }
        cols.push(Arc::new(headers.finish()));
        Ok(RecordBatch::try_new(self.schema.clone(), cols)?)
    }

    /// String and bytes values: one `value` column, event time from the
    /// Kafka timestamp. Returns the batch and the record index of each row.
    fn decode_raw(
        &self,
        g: &Gathered,
        location: &str,
        dead: &mut DeadLetters,
    ) -> vigil_engine::Result<Option<(RecordBatch, Vec<usize>)>> {
        let text = self.schema.field(0).data_type() == &DataType::Utf8;
        let mut rows = Vec::with_capacity(g.spans.len());
        for (i, span) in g.spans.iter().enumerate() {
            let bytes = &g.buf[span.bytes.clone()];
            if g.timestamps[i].is_none() {
                dead.push(
                    location,
                    Some(span.line),
                    DeadLetterError::MissingEventTime,
                    "record has no Kafka timestamp",
                    bytes,
                );
            } else if text && std::str::from_utf8(bytes).is_err() {
                dead.push(
                    location,
                    Some(span.line),
                    DeadLetterError::InvalidUtf8,
                    "value is not UTF-8",
                    bytes,
                );
            } else {
                rows.push(i);
            }
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let values = rows.iter().map(|&i| &g.buf[g.spans[i].bytes.clone()]);
        let column: ArrayRef = if text {
            Arc::new(StringArray::from_iter_values(
                values.map(|b| String::from_utf8_lossy(b)),
            ))
        } else {
            Arc::new(BinaryArray::from_iter_values(values))
        };
        let schema = Arc::new(Schema::new(vec![self.schema.field(0).clone()]));
        Ok(Some((RecordBatch::try_new(schema, vec![column])?, rows)))
    }

    /// Rows and writers' watermarks of a repartition topic's partition.
    fn decode_rekeyed(
        &mut self,
        tp: TopicPartition,
        g: Gathered,
        location: &str,
    ) -> vigil_engine::Result<()> {
        let ValueDecoder::Repartition(reader) = &mut self.decoder else {
            return Ok(());
        };
        let header = |r: usize, key: &str| {
            let start = if r == 0 { 0 } else { g.header_ends[r - 1] };
            (start..g.header_ends[r])
                .find(|&h| g.header_keys[h] == key)
                .and_then(|h| g.header_values[h].as_deref())
        };
        let records = (0..g.spans.len()).map(|r| super::repartition::Record {
            kind: header(r, super::repartition::KIND),
            producer: header(r, super::repartition::PRODUCER),
            watermark: header(r, super::repartition::WATERMARK),
            origins: header(r, super::repartition::ORIGINS),
            second: header(r, super::repartition::SIDE) == Some("1"),
            value: &g.buf[g.spans[r].bytes.clone()],
            offset: g.offsets[r],
        });
        let (batches, watermark) = reader.read(tp.1, records, self.clock.now_ms(), location)?;
        let advance = g.offsets.last().map(|last| last + 1);
        let partition = self.local(&tp);
        for (input, batch) in batches {
            let event = match input {
                0 => SourceEvent::Data { partition, batch },
                _ => SourceEvent::Side {
                    port: super::repartition::SECOND_INPUT,
                    batch,
                },
            };
            self.queue.push_back(Queued {
                event,
                from: Some(tp.clone()),
                advance: None,
            });
        }
        let event = match watermark {
            Some(watermark) => SourceEvent::Watermark {
                partition,
                watermark,
            },
            None => SourceEvent::Pending,
        };
        self.queue.push_back(Queued {
            event,
            from: Some(tp),
            advance,
        });
        Ok(())
    }

    /// Watermarks of repartition partitions that moved with no record
    /// (their writers turned idle).
    fn poll_rekeyed_watermarks(&mut self) {
        let ValueDecoder::Repartition(reader) = &mut self.decoder else {
            return;
        };
        let now = self.clock.now_ms();
        let mut moved = Vec::new();
        for p in reader.heard() {
            let Some(tp) = self.assigned.iter().find(|(_, q)| *q == p).cloned() else {
                continue;
            };
            if let Some(w) = reader.watermark(p, now) {
                moved.push((tp, w));
            }
        }
        for (tp, watermark) in moved {
            let partition = self.local(&tp);
            self.queue.push_back(Queued {
                event: SourceEvent::Watermark {
                    partition,
                    watermark,
                },
                from: Some(tp),
                advance: None,
            });
        }
    }

    /// The key groups `partitions` carry, for a repartition topic's reader.
    fn groups_of(&self, partitions: &[TopicPartition]) -> Option<Vec<u16>> {
        let ValueDecoder::Repartition(reader) = &self.decoder else {
            return None;
        };
        let mut groups: Vec<u16> = partitions
            .iter()
            .flat_map(|tp| super::repartition::groups_of(tp.1, reader.partitions))
            .collect();
        groups.sort_unstable();
        groups.dedup();
        (!groups.is_empty()).then_some(groups)
    }

    /// Releases key groups at once (a partition lost without a hand-over).
    fn release_now(&mut self, groups: Option<Vec<u16>>) {
        if let Some(groups) = groups {
            let id = vigil_engine::KeyGroupChange::next_id();
            self.queue.push_back(Queued::control(SourceEvent::KeyGroups(
                vigil_engine::KeyGroupChange::Release { id, groups },
            )));
        }
    }

    /// Positions partitions just assigned, from the checkpoint their
    /// commit names, and has their key groups adopted; then resumes them.
    async fn adopt(&mut self) -> vigil_engine::Result<()> {
        let tps: Vec<TopicPartition> = std::mem::take(&mut self.adopting)
            .into_iter()
            .filter(|tp| self.assigned.contains(tp))
            .collect();
        let Some(ownership) = self.ownership.clone() else {
            return Ok(());
        };
        if tps.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        for (t, p) in &tps {
            list.add_partition(t, *p);
        }
        let mut resolver = super::ownership::Resolver::new(&ownership);
        let mut seek = TopicPartitionList::new();
        for tp in &tps {
            let pointer = super::ownership::read_pointer(&ownership.store, &tp.0, tp.1).await?;
            self.adopted_from.insert(tp.clone(), pointer.clone());
            let Some(pointer) = pointer else {
                tracing::info!(source = %self.name, topic = %tp.0, partition = tp.1, "partition has no checkpoint yet; starting at its committed offset");
                continue;
            };
            let Some(checkpoint) = resolver.resolve(&pointer, &self.node, &tp.0, tp.1).await?
            else {
                tracing::warn!(source = %self.name, topic = %tp.0, partition = tp.1, member = %pointer.member, checkpoint = pointer.checkpoint, "the checkpoint the partition was committed with is gone; starting at its committed offset without its state");
                continue;
            };
            let next = super::ownership::position_in(&checkpoint, &self.node, &tp.0, tp.1);
            if let Some(next) = next {
                seek.add_partition_offset(&tp.0, tp.1, Offset::Offset(next))
                    .map_err(|e| kafka_error("invalid offset", e))?;
            }
            let groups = self.groups_of(std::slice::from_ref(tp));
            if let (ValueDecoder::Repartition(reader), Some(groups)) = (&mut self.decoder, groups) {
                let old = checkpoint.parallelism.get(&self.node).copied().unwrap_or(0);
                let now = self.clock.now_ms();
                for s in 0..old {
                    let Some(state) = checkpoint.state(&self.node, s) else {
                        continue;
                    };
                    if let Some(marks) = state.batches.get(1) {
                        reader.adopt(tp.1, marks, state.batches.get(2), now)?;
                    }
                }
                // The partition's position moves when the adoption is
                // handed out, not before: a barrier taken in between must
                // not say this process holds a partition whose state its
                // keyed operators have not taken yet.
                let id = vigil_engine::KeyGroupChange::next_id();
                self.queue.push_back(Queued {
                    event: SourceEvent::KeyGroups(vigil_engine::KeyGroupChange::Adopt {
                        id,
                        groups,
                        checkpoint: checkpoint.clone(),
                    }),
                    from: Some(tp.clone()),
                    advance: next,
                });
            } else if let Some(next) = next {
                self.next_offsets.insert(tp.clone(), next);
            }
            tracing::info!(source = %self.name, topic = %tp.0, partition = tp.1, member = %pointer.member, checkpoint = checkpoint.id, "partition taken over from its checkpoint");
        }
        if seek.count() > 0 {
            self.consumer
                .seek_partitions(seek, Duration::from_secs(10))
                .map_err(|e| kafka_error("cannot position assigned partitions", e))?;
        }
        self.consumer
            .resume(&list)
            .map_err(|e| kafka_error("cannot resume assigned partitions", e))?;
        Ok(())
    }

    /// Writes the pointers of the last commits, then lets pruning take the
    /// checkpoints handed-over partitions were committed with once their
    /// next owners have written pointers of their own.
    async fn write_pointers(&mut self) -> vigil_engine::Result<()> {
        let Some(ownership) = self.ownership.clone() else {
            return Ok(());
        };
        let mut due = Vec::new();
        for (t, p, pointer) in std::mem::take(&mut self.pointers_due) {
            let current = super::ownership::read_pointer(&ownership.store, &t, p).await?;
            let from = self
                .adopted_from
                .get(&(t.clone(), p))
                .and_then(Option::as_ref);
            if super::ownership::may_write_over(current.as_ref(), from, &ownership.member) {
                due.push((t, p, pointer));
            } else {
                tracing::error!(source = %self.name, topic = %t, partition = p, pointer = ?current, "another process has taken this partition; its pointer is left alone");
            }
        }
        super::ownership::write_pointers(&ownership.store, due).await?;
        let mut taken = Vec::new();
        for (tp, id) in &self.handed {
            let p = super::ownership::read_pointer(&ownership.store, &tp.0, tp.1).await?;
            if p.is_some_and(|p| p.member != ownership.member || p.checkpoint > *id) {
                taken.push(tp.clone());
            }
        }
        let before: std::collections::BTreeSet<CheckpointId> =
            self.handed.values().copied().collect();
        for tp in taken {
            self.handed.remove(&tp);
        }
        let after: std::collections::BTreeSet<CheckpointId> =
            self.handed.values().copied().collect();
        for id in before.difference(&after) {
            ownership.store.unpin(*id);
        }
        Ok(())
    }

    /// For a repartition topic shared with other processes: reads, at most
    /// every [`FLOOR_EVERY`], the watermarks the other partitions' pointers
    /// publish, and holds this reader's partitions at or below the lowest.
    ///
    /// A partition in transit (handed over, or its owner dead) keeps the
    /// watermark of its last pointer until its next owner has caught up
    /// and published a later one. Without the hold, readers of the other
    /// partitions would move on, and the rows the next owner reads from
    /// the backlog would be late where they arrive.
    async fn read_floor(&mut self) -> vigil_engine::Result<()> {
        let (Some(ownership), ValueDecoder::Repartition(_)) = (&self.ownership, &self.decoder)
        else {
            return Ok(());
        };
        let now = tokio::time::Instant::now();
        if self
            .floor_read
            .is_some_and(|at| now.duration_since(at) < FLOOR_EVERY)
        {
            return Ok(());
        }
        self.floor_read = Some(now);
        let Some(topic) = self.config_topic.clone() else {
            return Ok(());
        };
        let pointers = super::ownership::read_pointers(&ownership.store, &topic).await?;
        let floor = pointers
            .iter()
            .filter(|(p, _)| !self.assigned.contains(&(topic.clone(), *p)))
            .filter_map(|(_, pointer)| pointer.watermark)
            .min();
        if let ValueDecoder::Repartition(reader) = &mut self.decoder {
            reader.set_floor(floor);
        }
        Ok(())
    }

    fn pop(&mut self) -> Option<SourceEvent> {
        let q = self.queue.pop_front()?;
        if let (Some(tp), Some(next)) = (q.from, q.advance) {
            self.next_offsets.insert(tp, next);
        }
        Some(q.event)
    }
}

#[async_trait]
impl Source for KafkaSource {
    fn partitions(&self) -> usize {
        0
    }

    async fn next(&mut self) -> vigil_engine::Result<SourceEvent> {
        self.apply_rebalances();
        self.check_handover_deadline();
        if !self.pointers_due.is_empty() {
            self.write_pointers().await?;
        }
        if let Some((h, offsets)) = self.letting_go.take() {
            self.let_go(h, Some(&offsets));
        }
        if !self.adopting.is_empty() {
            self.adopt().await?;
        }
        if let Some(e) = self.pop() {
            return Ok(e);
        }
        self.read_floor().await?;
        self.poll_rekeyed_watermarks();
        if let Some(e) = self.pop() {
            return Ok(e);
        }
        let gathered = self.gather().await?;
        self.learn(&gathered).await?;
        self.apply_rebalances();
        for (tp, g) in gathered {
            // Messages fetched for a partition being handed over are the
            // next owner's.
            if self.assigned.contains(&tp) {
                self.decode(tp, g)?;
            }
        }
        Ok(self.pop().unwrap_or(SourceEvent::Pending))
    }

    fn snapshot(&mut self, checkpoint: CheckpointId) -> vigil_engine::Result<OperatorState> {
        // Events still queued here have not reached the pipeline; their
        // offsets move only when they are handed out.
        let mut offsets = self.next_offsets.clone();
        if let Some(h) = &mut self.handover {
            match h.checkpoint {
                // Partitions being handed over belong to the checkpoint
                // that hands them over, and to none after it: the next
                // owner goes on from that one.
                Some(_) => {
                    for tp in &h.partitions {
                        offsets.remove(tp);
                    }
                }
                None => {
                    h.checkpoint = Some(checkpoint);
                    let partitions = h.partitions.clone();
                    self.release = self.groups_of(&partitions);
                }
            }
        }
        self.pending_commits.insert(checkpoint, offsets.clone());
        if let ValueDecoder::Repartition(reader) = &self.decoder {
            let marks = offsets
                .keys()
                .filter_map(|tp| Some((tp.1, reader.reached(tp.1)?)))
                .collect();
            self.pending_watermarks.insert(checkpoint, marks);
        }
        let mut topics = Vec::new();
        let mut parts = Vec::new();
        let mut next = Vec::new();
        for ((t, p), o) in &offsets {
            topics.push(t.as_str());
            parts.push(*p);
            next.push(*o);
        }
        let schema = Arc::new(Schema::new(vec![
            Field::new("topic", DataType::Utf8, false),
            Field::new("partition", DataType::Int32, false),
            Field::new("next_offset", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(topics)),
                Arc::new(Int32Array::from(parts)),
                Arc::new(Int64Array::from(next)),
            ],
        )?;
        let mut batches = vec![batch];
        if let ValueDecoder::Repartition(reader) = &self.decoder {
            batches.push(reader.snapshot(offsets.keys().map(|tp| tp.1))?);
            batches.push(reader.snapshot_writers(offsets.keys().map(|tp| tp.1))?);
        }
        Ok(OperatorState { batches })
    }

    fn released_at_barrier(&mut self) -> Option<Vec<u16>> {
        self.release.take()
    }

    /// Reading resumes at the checkpoint's offsets, not at the group's
    /// committed ones: the process may have died after the checkpoint was
    /// stored and before its offsets were committed. The offsets apply to
    /// whichever subtask the group assigns each partition to.
    fn restore(&mut self, state: OperatorState) -> vigil_engine::Result<()> {
        let Some(b) = state.batches.first() else {
            return Ok(());
        };
        let (Some(topics), Some(parts), Some(next)) = (
            b.column_by_name("topic")
                .and_then(|c| arrow::array::AsArray::as_string_opt::<i32>(c)),
            b.column_by_name("partition").and_then(|c| {
                arrow::array::AsArray::as_primitive_opt::<arrow::datatypes::Int32Type>(c)
            }),
            b.column_by_name("next_offset").and_then(|c| {
                arrow::array::AsArray::as_primitive_opt::<arrow::datatypes::Int64Type>(c)
            }),
        ) else {
            return Err(EngineError::Checkpoint(format!(
                "kafka source {}: the checkpoint's offsets have the wrong columns",
                self.name
            )));
        };
        let started = self.consumer.context().started.clone();
        let mut resume = self.resume.lock();
        for i in 0..b.num_rows() {
            let tp = (topics.value(i).to_string(), parts.value(i));
            started.lock().insert(tp.clone());
            resume.insert(tp, next.value(i));
        }
        tracing::info!(source = %self.name, partitions = b.num_rows(), "kafka offsets restored from the checkpoint");
        Ok(())
    }

    fn on_checkpoint_complete(&mut self, checkpoint: CheckpointId) -> vigil_engine::Result<()> {
        let Some(offsets) = self.pending_commits.remove(&checkpoint) else {
            return Ok(());
        };
        // Older checkpoints are superseded by this one.
        self.pending_commits = self.pending_commits.split_off(&checkpoint);
        let watermarks = self
            .pending_watermarks
            .remove(&checkpoint)
            .unwrap_or_default();
        self.pending_watermarks = self.pending_watermarks.split_off(&checkpoint);
        self.commit(checkpoint, &offsets, &watermarks)?;
        if self
            .handover
            .as_ref()
            .and_then(|h| h.checkpoint)
            .is_some_and(|c| c <= checkpoint)
        {
            if let Some(h) = self.handover.take() {
                if let Some(o) = &self.ownership {
                    // Kept until the next owner has written a pointer of
                    // its own: if this commit was refused, the pointer
                    // names an older checkpoint, and the next owner goes
                    // on from this one, the newest holding the partition.
                    for tp in &h.partitions {
                        if offsets.contains_key(tp) {
                            o.store.pin(checkpoint);
                            self.handed.insert(tp.clone(), checkpoint);
                        }
                    }
                    // Unassigned once the pointers of this commit are
                    // written: the next owner reads them as soon as it is
                    // assigned, and an older pointer would have it re-read
                    // what this process's sinks have committed.
                    self.letting_go = Some((h, offsets));
                    return Ok(());
                }
                self.let_go(h, Some(&offsets));
            }
        }
        Ok(())
    }
}

impl KafkaSource {
    /// Commits `offsets` synchronously.
    fn commit(
        &mut self,
        checkpoint: CheckpointId,
        offsets: &HashMap<TopicPartition, i64>,
        watermarks: &HashMap<i32, i64>,
    ) -> vigil_engine::Result<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        let pointer = |p: i32| {
            self.ownership.as_ref().map(|o| super::ownership::Pointer {
                member: o.member.clone(),
                checkpoint,
                definition: o.definition.clone(),
                watermark: watermarks.get(&p).copied(),
            })
        };
        let mut pointers = Vec::new();
        for ((t, p), o) in offsets {
            let mut e = list.add_partition(t, *p);
            e.set_offset(Offset::Offset(*o))
                .map_err(|e| kafka_error("invalid offset", e))?;
            if let Some(pointer) = pointer(*p) {
                e.set_metadata(pointer.to_string());
                pointers.push((t.clone(), *p, pointer));
            }
        }
        // A commit can fail while the group rebalances; the records are safe
        // (the next owner re-reads from the last commit) and the next
        // checkpoint commits again, so this is a warning, not a failure.
        // A synchronous commit waits for the coordinator, seconds while the
        // group rebalances: on a multi-threaded runtime the worker hands
        // its other tasks to the rest of the pool meanwhile.
        let commit = || self.consumer.commit(&list, CommitMode::Sync);
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let committed = if multi_thread {
            tokio::task::block_in_place(commit)
        } else {
            commit()
        };
        match committed {
            Ok(()) => {
                tracing::debug!(source = %self.name, checkpoint, partitions = offsets.len(), "offsets committed");
                self.pointers_due.extend(pointers);
                self.committed
                    .extend(offsets.iter().map(|(tp, o)| (tp.clone(), *o)));
            }
            Err(e) if self.consumer.assignment_lost() => {
                tracing::warn!(source = %self.name, checkpoint, error = %e, "offset commit failed and the assignment is lost; the partitions' next owners go on from their last pointers")
            }
            Err(e) => {
                // Refused while the group rebalances (the generation moved
                // on), though the partitions are still this process's: a
                // cooperative rebalance revokes before it reassigns. The
                // checkpoint is complete and the sinks have committed its
                // output, so its pointer is written all the same; only one
                // that another process has written over since it took the
                // partition is left alone (see `write_pointers`).
                tracing::warn!(source = %self.name, checkpoint, error = %e, "offset commit failed; the next checkpoint retries, and the checkpoint's pointers are written");
                self.pointers_due.extend(pointers);
            }
        }
        Ok(())
    }
}

/// Decodes Avro records of one partition chunk: rejected records and rows
/// without event time go to `dead`; struct columns are flattened if asked.
fn decode_avro(
    decoder: &mut AvroDecoder,
    flatten: bool,
    event_time: usize,
    g: &Gathered,
    location: &str,
    dead: &mut DeadLetters,
) -> vigil_engine::Result<Vec<(RecordBatch, Vec<usize>)>> {
    let records: Vec<&[u8]> = g.spans.iter().map(|s| &g.buf[s.bytes.clone()]).collect();
    let decoded = decoder.decode(&records)?;
    for (i, class, reason) in &decoded.rejected {
        dead.push(
            location,
            Some(g.spans[*i].line),
            *class,
            reason,
            records[*i],
        );
    }
    let mut out = Vec::with_capacity(decoded.batches.len());
    for (batch, rows) in decoded.batches {
        let times = batch.column(event_time).clone();
        let (batch, rows) = if times.null_count() == 0 {
            (batch, rows)
        } else {
            let name = batch.schema().field(event_time).name().clone();
            let mut kept_rows = Vec::with_capacity(rows.len());
            for (k, &r) in rows.iter().enumerate() {
                if times.is_valid(k) {
                    kept_rows.push(r);
                } else {
                    dead.push(
                        location,
                        Some(g.spans[r].line),
                        DeadLetterError::MissingEventTime,
                        &format!("missing event time field {name:?}"),
                        records[r],
                    );
                }
            }
            let keep = arrow::compute::is_not_null(&times)?;
            (
                arrow::compute::filter_record_batch(&batch, &keep)?,
                kept_rows,
            )
        };
        if batch.num_rows() == 0 {
            continue;
        }
        let batch = if flatten {
            batch.normalize(".", None)?
        } else {
            batch
        };
        out.push((batch, rows));
    }
    Ok(out)
}

#[cfg(test)]
mod definition_tests {
    use super::*;

    #[test]
    fn members_of_another_definition_are_found_and_others_ignored() {
        let ours = "433d3d2e4eaf";
        let id = client_id(ours, "logins");
        assert_eq!(definition_of(&id), Some(ours));
        assert_eq!(definition_of("rdkafka"), None);
        assert_eq!(definition_of("vigil."), None);
        let same = [(id.as_str(), "/10.0.0.1"), ("rdkafka", "/10.0.0.9")];
        assert_eq!(foreign_member(same.into_iter(), ours), None);
        let mixed = [
            (id.as_str(), "/10.0.0.1"),
            ("vigil.17c2efde01a3.logins", "/10.0.0.2"),
        ];
        assert_eq!(
            foreign_member(mixed.into_iter(), ours),
            Some(("17c2efde01a3".to_string(), "10.0.0.2".to_string()))
        );
    }
}
