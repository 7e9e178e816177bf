//! The incident event log on Kafka: events on one topic, snapshots on a
//! compacted one.
//!
//! * `incidents.events` holds every incident event, keyed by incident id,
//!   Avro-encoded ([`codec`]). It is the truth: kept as long as incidents
//!   matter, replayable from offset 0.
//! * `incidents.snapshots` (compacted) holds each incident's latest state
//!   row, keyed by incident id, as JSON, plus one marker per shard
//!   (`__marker/<parallelism>/<shard>`) with the events topic's offsets its
//!   snapshot covers.
//!
//! A snapshot first waits until every event the producer sent is delivered,
//! so the delivered offsets are exact; then it writes the state rows, waits
//! for them, and only then the marker. A crash in between leaves rows newer
//! than their marker, which recovery tolerates (the operator skips events a
//! row already holds, by version), never a marker ahead of its rows.
//!
//! Recovery reads the snapshot topic to its end, picks the start offsets
//! ([`vigil_engine::event_log::start_positions`]) and reads the events
//! topic from them to its end. A record that does not decode is skipped
//! with a warning naming topic, partition and offset.

pub mod codec;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, SchemaRef};
use arrow_json::LineDelimitedWriter;
use parking_lot::Mutex;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use vigil_engine::event_log::{latest_per_key, start_positions, Marker};
use vigil_engine::{EngineError, EventLog, Recovery};

use crate::kafka::Properties;
use codec::EventCodec;

/// Where an `incidents` step keeps its event log.
///
/// ```yaml
/// log:
///   brokers: ${KAFKA_BROKERS}
///   topic: incidents.events          # default
///   snapshots: incidents.snapshots   # default; make it compacted
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventLogConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// The events topic.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// The snapshot topic (compacted).
    #[serde(default = "default_snapshots")]
    pub snapshots: String,
    /// How long a restart may take to read the log before it fails.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub recovery_timeout: Duration,
    /// Extra librdkafka settings (security, SASL); secrets from `${VAR}`.
    #[serde(default)]
    pub properties: Properties,
}

fn default_topic() -> String {
    "incidents.events".into()
}
fn default_snapshots() -> String {
    "incidents.snapshots".into()
}
fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

const MARKER: &str = "__marker/";

#[derive(Debug, Serialize, Deserialize)]
struct MarkerRecord {
    epoch: u64,
    parallelism: usize,
    shard: usize,
    positions: Vec<i64>,
}

/// Delivery reports: the next offset after the last event delivered, per
/// partition of the events topic, and the first failure.
#[derive(Default)]
struct Tracker {
    topic: String,
    next: Mutex<HashMap<i32, i64>>,
    failure: Mutex<Option<String>>,
}

impl ClientContext for Tracker {}

impl ProducerContext for Tracker {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(m) if m.topic() == self.topic => {
                let mut next = self.next.lock();
                let e = next.entry(m.partition()).or_insert(0);
                *e = (*e).max(m.offset() + 1);
            }
            Ok(_) => {}
            Err((e, _)) => {
                self.failure.lock().get_or_insert_with(|| e.to_string());
            }
        }
    }
}

fn kafka_error(what: &str, e: KafkaError, props: &Properties) -> EngineError {
    EngineError::io(
        what.to_string(),
        std::io::Error::other(props.scrub(&e.to_string())),
    )
}

/// The Kafka event log of one `incidents` step, shared by its subtasks.
pub struct KafkaEventLog {
    config: EventLogConfig,
    producer: BaseProducer<Tracker>,
    codec: Mutex<EventCodec>,
    state: SchemaRef,
    key: String,
    epoch: AtomicU64,
    /// Offsets recovery read up to, per partition: where positions start.
    recovered: Mutex<HashMap<i32, i64>>,
    /// Partitions of the events topic (known after recovery).
    partitions: Mutex<usize>,
}

impl std::fmt::Debug for KafkaEventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaEventLog")
            .field("topic", &self.config.topic)
            .finish()
    }
}

impl KafkaEventLog {
    /// A log for `config`, with rows of `events` (keyed by `key`) and state
    /// rows of `state`.
    pub fn new(
        config: &EventLogConfig,
        events: SchemaRef,
        state: SchemaRef,
        key: &str,
    ) -> crate::Result<Arc<Self>> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            // Snapshots wait for deliveries; batching longer would only
            // make them wait.
            .set("linger.ms", "1")
            .set("partitioner", "murmur2_random");
        for (k, v) in config.properties.iter() {
            c.set(k, v);
        }
        let tracker = Tracker {
            topic: config.topic.clone(),
            ..Tracker::default()
        };
        let producer: BaseProducer<Tracker> = c.create_with_context(tracker).map_err(|e| {
            crate::ConnectorError::config("log", config.properties.scrub(&e.to_string()))
        })?;
        Ok(Arc::new(Self {
            codec: Mutex::new(EventCodec::new(events.clone())?),
            config: config.clone(),
            producer,
            state,
            key: key.to_string(),
            epoch: AtomicU64::new(1),
            recovered: Mutex::new(HashMap::new()),
            partitions: Mutex::new(0),
        }))
    }

    fn send(&self, topic: &str, key: &str, value: Option<&[u8]>) -> vigil_engine::Result<()> {
        let mut record = BaseRecord::<str, [u8]>::to(topic).key(key);
        if let Some(v) = value {
            record = record.payload(v);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // Back-pressure: serve deliveries, then try again.
                    record = back;
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => {
                    return Err(kafka_error(
                        "cannot send to the event log",
                        e,
                        &self.config.properties,
                    ))
                }
            }
        }
        self.producer.poll(Duration::ZERO);
        Ok(())
    }

    fn failed(&self) -> vigil_engine::Result<()> {
        match self.producer.context().failure.lock().take() {
            Some(e) => Err(EngineError::io(
                "event log delivery failed",
                std::io::Error::other(self.config.properties.scrub(&e)),
            )),
            None => Ok(()),
        }
    }

    fn consumer(&self) -> vigil_engine::Result<BaseConsumer> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.config.brokers)
            .set("group.id", "vigil-event-log-recovery")
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.max.bytes", "8388608")
            .set("max.partition.fetch.bytes", "2097152");
        for (k, v) in self.config.properties.iter() {
            c.set(k, v);
        }
        c.create()
            .map_err(|e| kafka_error("cannot create a Kafka consumer", e, &self.config.properties))
    }

    /// Partitions of `topic` and their end offsets; none when the topic
    /// does not exist yet.
    fn ends(&self, c: &BaseConsumer, topic: &str) -> vigil_engine::Result<Vec<(i32, i64, i64)>> {
        let timeout = self.config.recovery_timeout;
        let md = c.fetch_metadata(Some(topic), timeout).map_err(|e| {
            kafka_error(
                "cannot read the event log's metadata",
                e,
                &self.config.properties,
            )
        })?;
        let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
            return Ok(Vec::new());
        };
        if t.error().is_some() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for p in t.partitions() {
            let (low, high) = c.fetch_watermarks(topic, p.id(), timeout).map_err(|e| {
                kafka_error(
                    "cannot read the event log's offsets",
                    e,
                    &self.config.properties,
                )
            })?;
            out.push((p.id(), low, high));
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Every record of `topic` from `start` (per partition) to the ends,
    /// partition after partition: (partition, offset, key, value).
    #[allow(clippy::type_complexity)]
    fn read(
        &self,
        topic: &str,
        ends: &[(i32, i64, i64)],
        start: &dyn Fn(i32) -> i64,
    ) -> vigil_engine::Result<Vec<(i32, i64, Vec<u8>, Option<Vec<u8>>)>> {
        let c = self.consumer()?;
        let mut list = TopicPartitionList::new();
        let mut left: HashMap<i32, i64> = HashMap::new();
        for (p, low, high) in ends {
            let wanted = start(*p).max(0);
            if wanted < *low {
                // Retention deleted records a replay needs: say so, loudly.
                tracing::warn!(topic, partition = p, from = wanted, first_kept = low, "records before offset {low} are gone from the log; the state rebuilt lacks them");
            }
            let from = wanted.max(*low);
            if from < *high {
                list.add_partition_offset(topic, *p, Offset::Offset(from))
                    .map_err(|e| {
                        kafka_error("cannot assign the event log", e, &self.config.properties)
                    })?;
                left.insert(*p, *high);
            }
        }
        let mut by_partition: HashMap<i32, Vec<(i32, i64, Vec<u8>, Option<Vec<u8>>)>> =
            HashMap::new();
        if left.is_empty() {
            return Ok(Vec::new());
        }
        c.assign(&list)
            .map_err(|e| kafka_error("cannot assign the event log", e, &self.config.properties))?;
        let deadline =
            std::time::Duration::from_millis(self.config.recovery_timeout.as_millis() as u64);
        let mut waited = Duration::ZERO;
        while !left.is_empty() {
            let m = match c.poll(Duration::from_millis(100)) {
                None => {
                    waited += Duration::from_millis(100);
                    if waited > deadline {
                        return Err(EngineError::User(format!(
                            "reading {topic} stalled for {}; partitions left (partition, end): {:?}, read so far: {:?}",
                            humantime::format_duration(deadline),
                            left,
                            by_partition.iter().map(|(p, v)| (*p, v.len(), v.last().map(|r| r.1))).collect::<Vec<_>>()
                        )));
                    }
                    continue;
                }
                Some(m) => m.map_err(|e| {
                    kafka_error("cannot read the event log", e, &self.config.properties)
                })?,
            };
            waited = Duration::ZERO;
            let (p, o) = (m.partition(), m.offset());
            if let Some(high) = left.get(&p) {
                if o < *high {
                    by_partition.entry(p).or_default().push((
                        p,
                        o,
                        m.key().unwrap_or_default().to_vec(),
                        m.payload().map(<[u8]>::to_vec),
                    ));
                }
                if o + 1 >= *high {
                    left.remove(&p);
                }
            }
        }
        let mut parts: Vec<i32> = by_partition.keys().copied().collect();
        parts.sort_unstable();
        Ok(parts
            .into_iter()
            .flat_map(|p| by_partition.remove(&p).unwrap_or_default())
            .collect())
    }

    fn state_rows(&self, values: &[Vec<u8>]) -> vigil_engine::Result<Vec<RecordBatch>> {
        let mut decoder = arrow::json::ReaderBuilder::new(self.state.clone())
            .with_batch_size(values.len().max(1))
            .build_decoder()?;
        for v in values {
            decoder.decode(v)?;
            decoder.decode(b"\n")?;
        }
        Ok(decoder.flush()?.into_iter().collect())
    }

    /// Waits for every delivery report. (Polling in short steps: the
    /// client's own flush sleeps up to 100 ms between checks.)
    #[allow(clippy::disallowed_methods)] // a bound on waiting, not event time
    fn flush_producer(&self) -> vigil_engine::Result<()> {
        let started = std::time::Instant::now();
        while self.producer.in_flight_count() > 0 {
            if started.elapsed() > self.config.recovery_timeout {
                return Err(EngineError::io(
                    "the event log did not take its records",
                    std::io::Error::other(format!(
                        "{} records undelivered after {}",
                        self.producer.in_flight_count(),
                        humantime::format_duration(self.config.recovery_timeout)
                    )),
                ));
            }
            self.producer.poll(Duration::from_millis(1));
        }
        self.failed()
    }
}

impl EventLog for KafkaEventLog {
    fn recover(&self) -> vigil_engine::Result<Recovery> {
        let c = self.consumer()?;
        let snapshot_ends = self.ends(&c, &self.config.snapshots)?;
        let event_ends = self.ends(&c, &self.config.topic)?;
        drop(c);
        let mut markers = Vec::new();
        let mut values = Vec::new();
        for (p, o, key, value) in self.read(&self.config.snapshots, &snapshot_ends, &|_| 0)? {
            let Some(value) = value else { continue };
            if key.starts_with(MARKER.as_bytes()) {
                match serde_json::from_slice::<MarkerRecord>(&value) {
                    Ok(m) => {
                        markers.retain(|x: &Marker| {
                            (x.parallelism, x.shard) != (m.parallelism, m.shard)
                        });
                        markers.push(Marker {
                            epoch: m.epoch,
                            parallelism: m.parallelism,
                            shard: m.shard,
                            positions: m.positions,
                        });
                    }
                    Err(e) => {
                        tracing::trace!(topic = %self.config.snapshots, partition = p, offset = o, error = %e, "snapshot marker skipped")
                    }
                }
            } else {
                values.push(value);
            }
        }
        let snapshot = latest_per_key(&self.state_rows(&values)?, &self.key)?;
        let n = event_ends
            .iter()
            .map(|(p, _, _)| *p as usize + 1)
            .max()
            .unwrap_or(0);
        let start = start_positions(&markers, n);
        let records = self.read(&self.config.topic, &event_ends, &|p| {
            start.get(p as usize).copied().unwrap_or(0)
        })?;
        let payloads: Vec<&[u8]> = records
            .iter()
            .map(|(_, _, _, v)| v.as_deref().unwrap_or_default())
            .collect();
        let (tail, bad) = self.codec.lock().decode(&payloads)?;
        for (i, reason) in &bad {
            let (p, o, _, _) = &records[*i];
            tracing::trace!(topic = %self.config.topic, partition = p, offset = o, %reason, "event log record skipped: it is not an incident event");
        }
        self.epoch.store(
            markers.iter().map(|m| m.epoch).max().unwrap_or(0) + 1,
            Ordering::SeqCst,
        );
        *self.recovered.lock() = event_ends.iter().map(|(p, _, h)| (*p, *h)).collect();
        *self.partitions.lock() = n;
        tracing::info!(
            topic = %self.config.topic,
            snapshot_rows = snapshot.iter().map(|b| b.num_rows()).sum::<usize>(),
            events = tail.num_rows(),
            "event log read"
        );
        Ok(Recovery {
            snapshot,
            events_read: records.len(),
            tail: vec![tail],
        })
    }

    fn append(&self, events: &RecordBatch) -> vigil_engine::Result<()> {
        let values = self.codec.lock().encode(events)?;
        let keys = events
            .column_by_name(&self.key)
            .ok_or_else(|| EngineError::User(format!("events have no {:?} column", self.key)))?;
        let keys = arrow::compute::cast(keys, &DataType::Utf8)?;
        let keys = keys.as_string::<i32>();
        for (i, v) in values.iter().enumerate() {
            let key = if keys.is_valid(i) { keys.value(i) } else { "" };
            self.send(&self.config.topic, key, Some(v))?;
        }
        self.failed()
    }

    fn snapshot(
        &self,
        shard: usize,
        parallelism: usize,
        state: &RecordBatch,
    ) -> vigil_engine::Result<()> {
        // Every event sent so far is delivered: the offsets are exact.
        self.flush_producer()?;
        let positions = {
            let delivered = self.producer.context().next.lock();
            let recovered = self.recovered.lock();
            let n = (*self.partitions.lock())
                .max(delivered.keys().map(|p| *p as usize + 1).max().unwrap_or(0));
            (0..n as i32)
                .map(|p| {
                    let a = delivered.get(&p).copied().unwrap_or(0);
                    let b = recovered.get(&p).copied().unwrap_or(0);
                    a.max(b)
                })
                .collect::<Vec<i64>>()
        };
        if state.num_rows() > 0 {
            let mut json = Vec::with_capacity(state.num_rows() * 256);
            {
                let mut w = LineDelimitedWriter::new(&mut json);
                w.write(state)?;
                w.finish()?;
            }
            let keys = state.column_by_name(&self.key).ok_or_else(|| {
                EngineError::User(format!("state rows have no {:?} column", self.key))
            })?;
            let keys = arrow::compute::cast(keys, &DataType::Utf8)?;
            let keys = keys.as_string::<i32>();
            for (i, line) in json
                .split(|b| *b == b'\n')
                .take(state.num_rows())
                .enumerate()
            {
                self.send(&self.config.snapshots, keys.value(i), Some(line))?;
            }
            // The rows are in before the marker that points past them.
            self.flush_producer()?;
        }
        let marker = MarkerRecord {
            epoch: self.epoch.load(Ordering::SeqCst),
            parallelism,
            shard,
            positions,
        };
        let value = serde_json::to_vec(&marker)
            .map_err(|e| EngineError::User(format!("snapshot marker: {e}")))?;
        self.send(
            &self.config.snapshots,
            &format!("{MARKER}{parallelism}/{shard}"),
            Some(&value),
        )
    }

    fn flush(&self) -> vigil_engine::Result<()> {
        self.flush_producer()
    }

    fn describe(&self) -> String {
        format!(
            "event log {} with snapshots on {}",
            self.config.topic, self.config.snapshots
        )
    }
}
