//! The Kafka sink: one JSON or Avro value per row, keyed by a column.
//!
//! The producer is idempotent with `acks=all` and lz4 compression, and uses
//! librdkafka's `murmur2_random` partitioner, the same hash as the Java
//! client's default, so records Vigil writes land on the same partitions as
//! records with the same key from any other producer. librdkafka retries
//! failed sends itself; a record that still cannot be delivered fails the
//! pipeline at the next flush (every checkpoint barrier and the end), so no
//! record is ever dropped silently. Rows are encoded with arrow-json or
//! arrow-avro in one pass per batch, never through per-row value trees.
//!
//! With `exactly_once`, the sink takes part in checkpoints as a two-phase
//! commit. Records go into a Kafka transaction; the checkpoint barrier
//! flushes it (pre-commit) and the checkpoint's completion commits it.
//! Records arriving while a transaction waits for its commit are held in
//! memory (as the Arrow batches they came in) and sent in the next one, so
//! a transaction only ever holds one checkpoint's records. The checkpoint
//! keeps the pre-committed batches: librdkafka cannot resume another
//! process's transaction, so a restore aborts the one left open (by
//! `init_transactions` under the same transactional id) and sends the
//! restored batches again in a new transaction, unless the store's commit
//! marker says every sink committed that checkpoint (a clean stop, or a
//! crash after the marker). Only a crash between a commit and its marker
//! writes those records twice; every other crash point gives exactly-once.
//!
//! Avro values are in the Confluent wire format. Their schema is derived
//! from the input columns and registered under `<topic>-value` when the
//! first batch is written, so consumers find it by the id in each record.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use arrow_avro::schema::{
    AvroSchema, FingerprintStrategy, AVRO_NAMESPACE_METADATA_KEY, AVRO_NAME_METADATA_KEY,
};
use arrow_avro::writer::format::AvroSoeFormat;
use arrow_avro::writer::{Encoder, WriterBuilder};
use arrow_json::LineDelimitedWriter;
use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer as _;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;
use vigil_engine::{
    CheckpointId, EngineError, OperatorState, Sink, SinkFactory, TaskContext, TaskMetrics,
};

use super::config::{KafkaSinkConfig, Properties, SinkFormat};
use crate::avro::Registry;

/// The changelog column: `delete` and `retract` rows become tombstones.
const OP: &str = "op";

/// Deliveries awaited at once before more are queued.
const MAX_IN_FLIGHT: usize = 100_000;

/// Builds Kafka sink subtasks.
#[derive(Debug)]
pub struct KafkaSinkFactory {
    config: KafkaSinkConfig,
    registry: Option<Arc<Registry>>,
}

impl KafkaSinkFactory {
    /// A sink for `config`.
    pub fn new(config: &KafkaSinkConfig) -> crate::Result<Self> {
        let registry = match (config.format, &config.registry) {
            (SinkFormat::Avro, Some(r)) => Some(Arc::new(Registry::new(r, "registry")?)),
            (SinkFormat::Avro, None) => {
                return Err(crate::ConnectorError::config(
                    "registry",
                    "Avro values need a schema registry",
                )
                .with_hint("registry: { url: http://schema-registry:8081 }"))
            }
            (SinkFormat::Json, Some(_)) => {
                return Err(crate::ConnectorError::config(
                    "registry",
                    "a schema registry applies to Avro values only",
                ))
            }
            (SinkFormat::Json, None) => None,
        };
        if config.subject.is_some() && registry.is_none() {
            return Err(crate::ConnectorError::config(
                "subject",
                "a subject applies to Avro values only",
            ));
        }
        Ok(Self {
            config: config.clone(),
            registry,
        })
    }
}

pub(super) fn delivery_error(e: impl std::fmt::Display) -> EngineError {
    EngineError::io(
        "kafka delivery failed",
        std::io::Error::other(e.to_string()),
    )
}

impl SinkFactory for KafkaSinkFactory {
    fn check_input(&self, schema: &SchemaRef) -> vigil_engine::Result<()> {
        if self.config.changelog {
            if self.config.key.is_none() {
                return Err(EngineError::User(
                    "a changelog needs a key: tombstones delete by key".into(),
                ));
            }
            if schema.index_of(OP).is_err() {
                return Err(EngineError::User(format!(
                    "a changelog needs an {OP:?} column (upsert or delete)"
                )));
            }
        }
        if let Some(k) = &self.config.key {
            if schema.index_of(k).is_err() {
                return Err(EngineError::User(format!(
                    "key column {k:?} is not in the input"
                )));
            }
        }
        if self.registry.is_some() {
            avro_schema_of(schema, &self.config.topic).map_err(|e| {
                EngineError::User(format!("the input cannot be written as Avro: {e}"))
            })?;
        }
        Ok(())
    }

    fn create(&self, ctx: &TaskContext, schema: SchemaRef) -> vigil_engine::Result<Box<dyn Sink>> {
        self.check_input(&schema)?;
        let encoding = match &self.registry {
            None => Encoding::Json,
            Some(registry) => Encoding::Avro {
                registry: registry.clone(),
                subject: self
                    .config
                    .subject
                    .clone()
                    .unwrap_or_else(|| format!("{}-value", self.config.topic)),
                schema: Arc::new(avro_schema_of(&schema, &self.config.topic)?),
                encoder: None,
            },
        };
        let mut properties = self.config.properties.clone();
        let transactions = if self.config.exactly_once {
            let prefix = self
                .config
                .transactional_id
                .clone()
                .unwrap_or_else(|| format!("vigil-{}", self.config.topic));
            let id = format!("{prefix}-{}-{}", ctx.node, ctx.subtask);
            properties.0.insert("transactional.id".into(), id.clone());
            Some(id)
        } else {
            None
        };
        let producer = Producer::new(&self.config.brokers, &properties, ctx.metrics.clone())?;
        if let Some(id) = &transactions {
            // Fences an earlier instance and aborts the transaction it left open.
            producer
                .inner
                .init_transactions(TXN_TIMEOUT)
                .map_err(|e| transaction_error(id, "cannot initialise transactions", e))?;
            producer
                .inner
                .begin_transaction()
                .map_err(|e| transaction_error(id, "cannot begin a transaction", e))?;
            tracing::debug!(transactional_id = %id, "kafka sink transactions initialised");
        }
        Ok(Box::new(KafkaSink {
            changelog: self.config.changelog,
            topic: self.config.topic.clone(),
            key: self.config.key.clone(),
            encoding,
            producer,
            txn: transactions.map(|id| Transactions {
                id,
                epochs: VecDeque::from([Epoch {
                    barrier: None,
                    batches: Vec::new(),
                    sent: true,
                }]),
                restored: Vec::new(),
            }),
        }))
    }

    fn describe(&self) -> String {
        let format = match self.config.format {
            SinkFormat::Json => "json",
            SinkFormat::Avro => "avro",
        };
        let format = if self.config.changelog {
            format!("{format} changelog")
        } else {
            format.to_string()
        };
        match &self.config.key {
            Some(k) => format!("kafka {} ({format}) keyed by {k}", self.config.topic),
            None => format!("kafka {} ({format})", self.config.topic),
        }
    }
}

/// `name` as an Avro name (`[A-Za-z_][A-Za-z0-9_]*`): flattened columns
/// such as `src.ip` are written as `src_ip`.
fn avro_name(name: &str) -> String {
    let n: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if n.is_empty() || n.starts_with(|c: char| c.is_ascii_digit()) {
        format!("_{n}")
    } else {
        n
    }
}

/// `field` with its name, and the names inside structs, as Avro names.
fn avro_field(field: &Field) -> vigil_engine::Result<Field> {
    let data_type = match field.data_type() {
        DataType::Struct(children) => DataType::Struct(avro_fields(children)?),
        other => other.clone(),
    };
    Ok(
        Field::new(avro_name(field.name()), data_type, field.is_nullable())
            .with_metadata(field.metadata().clone()),
    )
}

fn avro_fields(fields: &Fields) -> vigil_engine::Result<Fields> {
    let mut seen = HashMap::new();
    let mut out = Vec::with_capacity(fields.len());
    for f in fields {
        let a = avro_field(f)?;
        if let Some(other) = seen.insert(a.name().clone(), f.name().clone()) {
            return Err(EngineError::User(format!(
                "columns {other:?} and {:?} are both {:?} in Avro",
                f.name(),
                a.name()
            )));
        }
        out.push(a);
    }
    Ok(out.into())
}

/// The Avro schema written for `input`: a record named after the topic.
fn avro_schema_of(input: &SchemaRef, topic: &str) -> vigil_engine::Result<Schema> {
    let mut md = HashMap::new();
    md.insert(AVRO_NAME_METADATA_KEY.to_string(), avro_name(topic));
    md.insert(AVRO_NAMESPACE_METADATA_KEY.to_string(), "vigil".to_string());
    let schema = Schema::new(avro_fields(input.fields())?).with_metadata(md);
    // Checked now: a column Avro cannot carry fails before anything runs.
    AvroSchema::try_from(&schema)?;
    Ok(schema)
}

enum Encoding {
    Json,
    Avro {
        registry: Arc<Registry>,
        subject: String,
        schema: SchemaRef,
        /// Built once the schema is registered (first write).
        encoder: Option<Box<Encoder>>,
    },
}

struct KafkaSink {
    changelog: bool,
    topic: String,
    key: Option<String>,
    encoding: Encoding,
    producer: Producer,
    /// Set in exactly-once mode.
    txn: Option<Transactions>,
}

/// How long a transaction call may take before the pipeline fails.
const TXN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn transaction_error(id: &str, what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::io(
        format!("kafka transactional id {id}: {what}"),
        std::io::Error::other(e.to_string()),
    )
}

/// The records between two checkpoint barriers.
struct Epoch {
    /// The barrier that closed it (None: the current epoch).
    barrier: Option<CheckpointId>,
    batches: Vec<RecordBatch>,
    /// Sent in the open transaction (only the oldest epoch can be).
    sent: bool,
}

/// Exactly-once state: uncommitted epochs, oldest first.
struct Transactions {
    id: String,
    epochs: VecDeque<Epoch>,
    /// Pre-committed batches of the checkpoint restored from, to send and
    /// commit before anything else.
    restored: Vec<RecordBatch>,
}

impl KafkaSink {
    /// The batch's rows encoded: one buffer and the offsets of each row.
    async fn encode(&mut self, batch: &RecordBatch) -> vigil_engine::Result<(Bytes, Vec<usize>)> {
        match &mut self.encoding {
            Encoding::Json => {
                let mut json = Vec::with_capacity(batch.num_rows() * 128);
                {
                    let mut w = LineDelimitedWriter::new(&mut json);
                    w.write(batch)?;
                    w.finish()?;
                }
                // Row i is json[offsets[i]..offsets[i + 1] - 1] (newline cut).
                let mut offsets = Vec::with_capacity(batch.num_rows() + 1);
                offsets.push(0);
                offsets.extend(
                    json.iter()
                        .enumerate()
                        .filter(|(_, b)| **b == b'\n')
                        .map(|(i, _)| i + 1),
                );
                Ok((Bytes::from(json), offsets))
            }
            Encoding::Avro {
                registry,
                subject,
                schema,
                encoder,
            } => {
                if encoder.is_none() {
                    let json = AvroSchema::try_from(schema.as_ref())?.json_string;
                    let id = registry.register(subject, &json).await?;
                    tracing::info!(subject = %subject, id, "avro schema registered");
                    let built = WriterBuilder::new(schema.as_ref().clone())
                        .with_fingerprint_strategy(FingerprintStrategy::Id(id))
                        .build_encoder::<AvroSoeFormat>()
                        .map_err(|e| EngineError::User(format!("cannot encode Avro: {e}")))?;
                    *encoder = Some(Box::new(built));
                }
                let Some(encoder) = encoder.as_mut() else {
                    return Err(EngineError::User("no Avro encoder".into()));
                };
                // The same columns under their Avro names.
                let batch = RecordBatch::try_new(schema.clone(), batch.columns().to_vec())?;
                encoder
                    .encode(&batch)
                    .map_err(|e| EngineError::User(format!("cannot encode Avro: {e}")))?;
                let rows = encoder.flush();
                Ok((rows.bytes().clone(), rows.offsets().to_vec()))
            }
        }
    }
}

/// Copies what librdkafka's statistics say of a producer's retries into
/// the sink's counters.
pub(super) struct ProducerStats {
    metrics: Arc<TaskMetrics>,
}

impl ClientContext for ProducerStats {
    fn stats(&self, statistics: Statistics) {
        let retries: u64 = statistics.brokers.values().map(|b| b.txretries).sum();
        self.metrics
            .producer_retries
            .store(retries, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A producer that keeps its delivery reports, so a flush can wait for every
/// record sent so far and fail loudly if one was not delivered.
pub(super) struct Producer {
    inner: FutureProducer<ProducerStats>,
    in_flight: VecDeque<DeliveryFuture>,
    metrics: Arc<TaskMetrics>,
}

impl Producer {
    /// An idempotent producer (`acks=all`, lz4, murmur2 partitioning) for
    /// `brokers`, with `properties` on top.
    pub(super) fn new(
        brokers: &str,
        properties: &Properties,
        metrics: Arc<TaskMetrics>,
    ) -> vigil_engine::Result<Self> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            .set("batch.size", "1000000")
            .set("partitioner", "murmur2_random")
            // Retries reach the metrics through the statistics callback.
            .set("statistics.interval.ms", "1000");
        for (k, v) in properties.iter() {
            c.set(k, v);
        }
        let context = ProducerStats {
            metrics: metrics.clone(),
        };
        let inner: FutureProducer<ProducerStats> = c.create_with_context(context).map_err(|e| {
            EngineError::io(
                "cannot create Kafka producer",
                std::io::Error::other(properties.scrub(&e.to_string())),
            )
        })?;
        Ok(Self {
            inner,
            in_flight: VecDeque::new(),
            metrics,
        })
    }

    /// Queues a record; waits for deliveries when librdkafka's queue is full.
    pub(super) async fn send(
        &mut self,
        record: FutureRecord<'_, str, [u8]>,
    ) -> vigil_engine::Result<()> {
        let mut record = record;
        loop {
            match self.inner.send_result(record) {
                Ok(f) => {
                    self.in_flight.push_back(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // Back-pressure: wait for half the deliveries, then retry.
                    record = back;
                    let keep = self.in_flight.len() / 2;
                    self.settle(keep).await?;
                    if self.in_flight.is_empty() {
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    }
                }
                Err((e, _)) => {
                    TaskMetrics::add(&self.metrics.producer_errors, 1);
                    return Err(delivery_error(e));
                }
            }
        }
        if self.in_flight.len() > MAX_IN_FLIGHT {
            self.settle(MAX_IN_FLIGHT / 2).await?;
        }
        Ok(())
    }

    /// Waits until at most `keep` deliveries are outstanding.
    pub(super) async fn settle(&mut self, keep: usize) -> vigil_engine::Result<()> {
        while self.in_flight.len() > keep {
            if let Some(f) = self.in_flight.pop_front() {
                match f.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => {
                        TaskMetrics::add(&self.metrics.producer_errors, 1);
                        return Err(delivery_error(e));
                    }
                    Err(_) => return Err(delivery_error("producer dropped a delivery report")),
                }
            }
        }
        Ok(())
    }
}

impl KafkaSink {
    fn commit(&mut self) -> vigil_engine::Result<()> {
        let Some(t) = &self.txn else { return Ok(()) };
        self.producer
            .inner
            .commit_transaction(TXN_TIMEOUT)
            .map_err(|e| transaction_error(&t.id, "cannot commit", e))?;
        self.producer
            .inner
            .begin_transaction()
            .map_err(|e| transaction_error(&t.id, "cannot begin a transaction", e))
    }

    /// Sends and commits the restored batches first.
    async fn settle_restored(&mut self) -> vigil_engine::Result<()> {
        let restored = match &mut self.txn {
            Some(t) if !t.restored.is_empty() => std::mem::take(&mut t.restored),
            _ => return Ok(()),
        };
        let rows: usize = restored.iter().map(|b| b.num_rows()).sum();
        for b in &restored {
            self.send(b).await?;
        }
        self.producer.settle(0).await?;
        self.commit()?;
        tracing::info!(
            rows,
            "kafka sink: records pre-committed by the restored checkpoint committed"
        );
        Ok(())
    }

    /// Commits every epoch closed by a checkpoint up to `through`; then the
    /// oldest open epoch goes into the new transaction.
    async fn commit_through(&mut self, through: CheckpointId) -> vigil_engine::Result<()> {
        self.settle_restored().await?;
        loop {
            let Some(t) = &mut self.txn else {
                return Ok(());
            };
            let Some(front) = t.epochs.front_mut() else {
                return Ok(());
            };
            let closed = front.barrier.is_some_and(|b| b <= through);
            if !front.sent {
                let batches = front.batches.clone();
                front.sent = true;
                for b in &batches {
                    self.send(b).await?;
                }
            }
            if !closed {
                return Ok(());
            }
            self.producer.settle(0).await?;
            self.commit()?;
            if let Some(t) = &mut self.txn {
                t.epochs.pop_front();
                if t.epochs.is_empty() {
                    t.epochs.push_back(Epoch {
                        barrier: None,
                        batches: Vec::new(),
                        sent: true,
                    });
                }
            }
        }
    }

    async fn send(&mut self, batch: &RecordBatch) -> vigil_engine::Result<()> {
        let (values, offsets) = self.encode(batch).await?;
        let newline = usize::from(matches!(self.encoding, Encoding::Json));
        let keys = match &self.key {
            Some(k) => {
                let col = batch.column_by_name(k).ok_or_else(|| {
                    EngineError::User(format!("key column {k:?} is not in the input"))
                })?;
                Some(cast(col, &DataType::Utf8)?)
            }
            None => None,
        };
        let keys = keys.as_ref().map(|k| k.as_string::<i32>());
        let ops = match (self.changelog, batch.column_by_name(OP)) {
            (true, Some(c)) => Some(cast(c, &DataType::Utf8)?),
            _ => None,
        };
        let ops = ops.as_ref().map(|o| o.as_string::<i32>());
        for row in 0..batch.num_rows() {
            let value = &values[offsets[row]..offsets[row + 1] - newline];
            let tombstone = ops
                .filter(|o| o.is_valid(row))
                .is_some_and(|o| matches!(o.value(row), "delete" | "retract"));
            let mut record = FutureRecord::<str, [u8]>::to(&self.topic);
            if !tombstone {
                record = record.payload(value);
            }
            if let Some(k) = keys.filter(|k| k.is_valid(row)).map(|k| k.value(row)) {
                record = record.key(k);
            }
            self.producer.send(record).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Sink for KafkaSink {
    async fn write(&mut self, batch: RecordBatch) -> vigil_engine::Result<()> {
        self.settle_restored().await?;
        let Some(t) = &mut self.txn else {
            return self.send(&batch).await;
        };
        let Some(current) = t.epochs.back_mut() else {
            return Err(EngineError::Internal("kafka sink has no epoch".into()));
        };
        current.batches.push(batch.clone());
        if current.sent {
            self.send(&batch).await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> vigil_engine::Result<()> {
        self.producer.settle(0).await
    }

    async fn snapshot(&mut self, checkpoint: CheckpointId) -> vigil_engine::Result<OperatorState> {
        self.settle_restored().await?;
        self.producer.settle(0).await?;
        let Some(t) = &mut self.txn else {
            return Ok(OperatorState::default());
        };
        if let Some(current) = t.epochs.back_mut() {
            current.barrier = Some(checkpoint);
        }
        t.epochs.push_back(Epoch {
            barrier: None,
            batches: Vec::new(),
            sent: false,
        });
        // Everything not committed up to this barrier.
        let batches = t
            .epochs
            .iter()
            .filter(|e| e.barrier.is_some())
            .flat_map(|e| e.batches.iter().cloned())
            .collect::<Vec<_>>();
        Ok(OperatorState { batches })
    }

    async fn on_checkpoint_complete(
        &mut self,
        checkpoint: CheckpointId,
    ) -> vigil_engine::Result<()> {
        self.commit_through(checkpoint).await
    }

    fn restore(&mut self, state: OperatorState) -> vigil_engine::Result<()> {
        if let Some(t) = &mut self.txn {
            t.restored
                .extend(state.batches.into_iter().filter(|b| b.num_rows() > 0));
        }
        Ok(())
    }

    fn restore_committed(&mut self, _state: OperatorState) -> vigil_engine::Result<()> {
        // Committed before the process stopped: nothing to send again.
        Ok(())
    }

    async fn finish(&mut self) -> vigil_engine::Result<()> {
        self.commit_through(CheckpointId::MAX).await?;
        if self.txn.is_some() {
            self.producer.settle(0).await?;
            self.commit()?;
        }
        self.producer.settle(0).await
    }
}
