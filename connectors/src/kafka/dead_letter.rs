//! Dead letters to Kafka: each rejected record goes, as it arrived, to
//! `<source topic>.dlq` (or one configured topic), with headers saying why
//! and where from, so it can be inspected and replayed after review. The
//! dead-letter record keeps the value as text, so bytes that are not UTF-8
//! arrive replaced (U+FFFD).
//!
//! | header            | value |
//! |-------------------|-------|
//! | `vigil.error`     | error class (`invalid_json`, `missing_event_time`, ...) |
//! | `vigil.reason`    | the detailed message |
//! | `vigil.pipeline`  | pipeline name |
//! | `vigil.source`    | source node name |
//! | `vigil.topic`, `vigil.partition`, `vigil.offset` | where the record was read |

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{SchemaRef, UInt64Type};
use async_trait::async_trait;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use vigil_engine::{EngineError, Sink, SinkFactory, TaskContext};

use super::config::Properties;
use super::sink::Producer;

/// Builds the dead-letter sink of a Kafka source.
#[derive(Debug)]
pub struct KafkaDeadLetterSinkFactory {
    brokers: String,
    properties: Properties,
    topic: Option<String>,
    pipeline: String,
}

impl KafkaDeadLetterSinkFactory {
    /// Dead letters of pipeline `pipeline`, written through `brokers` to
    /// `topic`, or to `<source topic>.dlq` when `topic` is `None`.
    pub fn new(
        pipeline: &str,
        brokers: &str,
        properties: &Properties,
        topic: Option<String>,
    ) -> Self {
        Self {
            brokers: brokers.to_string(),
            properties: properties.clone(),
            topic,
            pipeline: pipeline.to_string(),
        }
    }
}

impl SinkFactory for KafkaDeadLetterSinkFactory {
    fn create(&self, ctx: &TaskContext, _schema: SchemaRef) -> vigil_engine::Result<Box<dyn Sink>> {
        Ok(Box::new(KafkaDeadLetterSink {
            topic: self.topic.clone(),
            pipeline: self.pipeline.clone(),
            producer: Producer::new(&self.brokers, &self.properties, ctx.metrics.clone())?,
        }))
    }
    fn describe(&self) -> String {
        match &self.topic {
            Some(t) => format!("kafka dead letters to {t}"),
            None => "kafka dead letters to <topic>.dlq".into(),
        }
    }
}

struct KafkaDeadLetterSink {
    topic: Option<String>,
    pipeline: String,
    producer: Producer,
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> vigil_engine::Result<&'a dyn Array> {
    batch
        .column_by_name(name)
        .map(|c| c.as_ref())
        .ok_or_else(|| EngineError::Internal(format!("dead letter without {name}")))
}

#[async_trait]
impl Sink for KafkaDeadLetterSink {
    async fn write(&mut self, batch: RecordBatch) -> vigil_engine::Result<()> {
        let source = column(&batch, "source")?.as_string::<i32>();
        let location = column(&batch, "location")?.as_string::<i32>();
        let line = column(&batch, "line")?.as_primitive::<UInt64Type>();
        let error = column(&batch, "error")?.as_string::<i32>();
        let reason = column(&batch, "reason")?.as_string::<i32>();
        let raw = column(&batch, "raw")?.as_string::<i32>();
        let raw_bytes = column(&batch, "raw_bytes")?.as_binary::<i32>();
        for row in 0..batch.num_rows() {
            let (topic, partition) = location
                .value(row)
                .rsplit_once('/')
                .unwrap_or((location.value(row), ""));
            let offset = if line.is_valid(row) {
                line.value(row).to_string()
            } else {
                String::new()
            };
            let target = match &self.topic {
                Some(t) => t.clone(),
                None => format!("{topic}.dlq"),
            };
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "vigil.error",
                    value: Some(error.value(row)),
                })
                .insert(Header {
                    key: "vigil.reason",
                    value: Some(reason.value(row)),
                })
                .insert(Header {
                    key: "vigil.pipeline",
                    value: Some(self.pipeline.as_str()),
                })
                .insert(Header {
                    key: "vigil.source",
                    value: Some(source.value(row)),
                })
                .insert(Header {
                    key: "vigil.topic",
                    value: Some(topic),
                })
                .insert(Header {
                    key: "vigil.partition",
                    value: Some(partition),
                })
                .insert(Header {
                    key: "vigil.offset",
                    value: Some(offset.as_str()),
                });
            // The record's exact bytes: a replay reads it as it was.
            let payload = if raw_bytes.is_valid(row) {
                raw_bytes.value(row)
            } else {
                raw.value(row).as_bytes()
            };
            let record = FutureRecord::<str, [u8]>::to(&target)
                .payload(payload)
                .headers(headers);
            self.producer.send(record).await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> vigil_engine::Result<()> {
        self.producer.settle(0).await
    }
}
