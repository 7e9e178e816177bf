//! The Kafka sink: one JSON value per row, keyed by a column.
//!
//! The producer is idempotent with `acks=all` and lz4 compression, and uses
//! librdkafka's `murmur2_random` partitioner, the same hash as the Java
//! client's default, so records Vigil writes land on the same partitions as
//! records with the same key from any other producer. librdkafka retries
//! failed sends itself; a record that still cannot be delivered fails the
//! pipeline at the next flush (every checkpoint barrier and the end), so no
//! record is ever dropped silently. Rows are encoded with arrow-json in one
//! pass per batch, never through per-row value trees.

use std::collections::VecDeque;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, SchemaRef};
use arrow_json::LineDelimitedWriter;
use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use vigil_engine::{EngineError, Sink, SinkFactory, TaskContext};

use super::config::KafkaSinkConfig;

/// Deliveries awaited at once before more are queued.
const MAX_IN_FLIGHT: usize = 100_000;

/// Builds Kafka sink subtasks.
#[derive(Debug)]
pub struct KafkaSinkFactory {
    config: KafkaSinkConfig,
}

impl KafkaSinkFactory {
    /// A sink for `config`.
    pub fn new(config: &KafkaSinkConfig) -> Self {
        Self {
            config: config.clone(),
        }
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
        if let Some(k) = &self.config.key {
            if schema.index_of(k).is_err() {
                return Err(EngineError::User(format!(
                    "key column {k:?} is not in the input"
                )));
            }
        }
        Ok(())
    }

    fn create(&self, _ctx: &TaskContext, schema: SchemaRef) -> vigil_engine::Result<Box<dyn Sink>> {
        self.check_input(&schema)?;
        Ok(Box::new(KafkaSink {
            topic: self.config.topic.clone(),
            key: self.config.key.clone(),
            producer: Producer::new(&self.config.brokers, &self.config.properties)?,
        }))
    }

    fn describe(&self) -> String {
        match &self.config.key {
            Some(k) => format!("kafka {} keyed by {k}", self.config.topic),
            None => format!("kafka {}", self.config.topic),
        }
    }
}

struct KafkaSink {
    topic: String,
    key: Option<String>,
    producer: Producer,
}

/// A producer that keeps its delivery reports, so a flush can wait for every
/// record sent so far and fail loudly if one was not delivered.
pub(super) struct Producer {
    inner: FutureProducer,
    in_flight: VecDeque<DeliveryFuture>,
}

impl Producer {
    /// An idempotent producer (`acks=all`, lz4, murmur2 partitioning) for
    /// `brokers`, with `properties` on top.
    pub(super) fn new(
        brokers: &str,
        properties: &std::collections::BTreeMap<String, String>,
    ) -> vigil_engine::Result<Self> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            .set("batch.size", "1000000")
            .set("partitioner", "murmur2_random");
        for (k, v) in properties {
            c.set(k, v);
        }
        let inner: FutureProducer = c.create().map_err(|e| {
            EngineError::io("cannot create Kafka producer", std::io::Error::other(e))
        })?;
        Ok(Self {
            inner,
            in_flight: VecDeque::new(),
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
                Err((e, _)) => return Err(delivery_error(e)),
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
                    Ok(Err((e, _))) => return Err(delivery_error(e)),
                    Err(_) => return Err(delivery_error("producer dropped a delivery report")),
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Sink for KafkaSink {
    async fn write(&mut self, batch: RecordBatch) -> vigil_engine::Result<()> {
        let mut json = Vec::with_capacity(batch.num_rows() * 128);
        {
            let mut w = LineDelimitedWriter::new(&mut json);
            w.write(&batch)?;
            w.finish()?;
        }
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
        for (row, value) in json
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .enumerate()
        {
            let mut record = FutureRecord::<str, [u8]>::to(&self.topic).payload(value);
            if let Some(k) = keys.filter(|k| k.is_valid(row)).map(|k| k.value(row)) {
                record = record.key(k);
            }
            self.producer.send(record).await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> vigil_engine::Result<()> {
        self.producer.settle(0).await
    }
}
