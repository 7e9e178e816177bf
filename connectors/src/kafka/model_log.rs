//! A read model's changelog: how the processes of one pipeline serve one
//! read model.
//!
//! A `read_model` sink keeps its rows in the memory of its process. When a
//! pipeline runs as several processes (`scale_out`), each writes the rows
//! of the keys it owns, and those keys move with their partitions: kept per
//! process, a moved key would be served by no one until it changed again,
//! and a restarted process would serve rows it no longer owns. So each
//! sink subtask sends its changes to an internal compacted topic,
//! `vigil-<pipeline>-<model>-changelog`, and every process follows the
//! whole topic into its copy of the model, as Kafka Streams' global tables
//! do: any process answers for every key, a partition changing owner moves
//! nothing of the model, and a process that starts rebuilds the model from
//! the topic (compaction keeps it about the size of the model).
//!
//! A record is one change: the key is the tenant and key
//! (`<tenant length>:<tenant><key>`, unambiguous, so compaction keeps one
//! record per row), the value the row's JSON, the header [`FIELDS`] the
//! text of its scalar columns; a deletion is a tombstone. Upserts and
//! deletes are idempotent, so a replay after a crash sends the same changes
//! again and leaves the model as it was. A key's changes come from the one
//! process that owns its key group, in order; a moved key's new owner
//! writes only after the hand-over checkpoint, for which the old owner
//! flushed its changes. The rows a process serves trail the changes it
//! makes by the round trip through the topic (milliseconds).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use vigil_engine::TaskMetrics;

use super::config::Properties;
use super::sink::Producer;
use crate::error::{ConnectorError, Result};
use crate::read_model::{Change, ReadModel, Row};

/// Header of a changelog record: the row's scalar column texts, a JSON
/// array of strings and nulls in the model's column order.
pub const FIELDS: &str = "vigil.fields";

/// Where a model's changes go.
#[derive(Debug, Clone)]
pub struct ModelLog {
    /// Brokers of the changelog topic.
    pub brokers: String,
    /// Client properties (security settings and the like).
    pub properties: Properties,
    /// The topic ([`topic_name`]).
    pub topic: String,
    /// Its partition count.
    pub partitions: usize,
}

/// The changelog topic of model `model` of pipeline `pipeline` (both
/// already safe for a topic name).
pub fn topic_name(pipeline: &str, model: &str) -> String {
    format!("vigil-{pipeline}-{model}-changelog")
}

impl ModelLog {
    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in self.properties.iter() {
            c.set(k, v);
        }
        c
    }

    /// Makes sure the topic exists, compacted, with its partition count;
    /// refuses one with another count (its keys' records would be spread
    /// differently).
    pub async fn ensure(&self, pipeline: &str) -> Result<()> {
        super::repartition::ensure_topic_with(
            &self.client_config(),
            pipeline,
            &self.topic,
            self.partitions,
            &[("cleanup.policy", "compact")],
        )
        .await
    }
}

/// The record key of a row.
fn encode_key(tenant: &str, key: &str) -> String {
    format!("{}:{tenant}{key}", tenant.len())
}

/// The tenant and key of a record key, if it is one.
fn decode_key(raw: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(raw).ok()?;
    let (len, rest) = text.split_once(':')?;
    let len: usize = len.parse().ok()?;
    let tenant = rest.get(..len)?;
    let key = rest.get(len..)?;
    Some((tenant.to_string(), key.to_string()))
}

/// One sink subtask's producer into the changelog.
pub(crate) struct LogWriter {
    producer: Producer,
    topic: String,
}

impl LogWriter {
    pub(crate) fn new(log: &ModelLog, metrics: Arc<TaskMetrics>) -> vigil_engine::Result<Self> {
        Ok(Self {
            producer: Producer::new(&log.brokers, &log.properties, metrics)?,
            topic: log.topic.clone(),
        })
    }

    /// Queues `change`.
    pub(crate) async fn send(&mut self, change: &Change) -> vigil_engine::Result<()> {
        let key = encode_key(&change.id.0, &change.id.1);
        let mut record = FutureRecord::<str, [u8]>::to(&self.topic).key(&key);
        let fields;
        if let Some(row) = &change.row {
            fields = serde_json::to_string(&row.fields).map_err(|e| {
                vigil_engine::EngineError::Internal(format!("read model fields: {e}"))
            })?;
            record = record
                .payload(row.json.as_bytes())
                .headers(OwnedHeaders::new().insert(Header {
                    key: FIELDS,
                    value: Some(fields.as_str()),
                }));
        }
        self.producer.send(record).await
    }

    /// Waits until every change sent so far is in the topic.
    pub(crate) async fn flush(&mut self) -> vigil_engine::Result<()> {
        self.producer.settle(0).await
    }
}

/// The change a changelog record holds; a record that is not one is
/// reported with its location and skipped (the topic is Vigil's own).
fn change_of(m: &BorrowedMessage<'_>) -> Option<Change> {
    let at = || format!("{}/{}@{}", m.topic(), m.partition(), m.offset());
    let Some(id) = m.key().and_then(decode_key) else {
        tracing::warn!(record = %at(), "read model changelog record without a valid key skipped");
        return None;
    };
    let Some(payload) = m.payload() else {
        return Some(Change { id, row: None });
    };
    let fields = m
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == FIELDS))
        .and_then(|h| h.value)
        .and_then(|v| serde_json::from_slice::<Vec<Option<String>>>(v).ok());
    let (Ok(json), Some(fields)) = (std::str::from_utf8(payload), fields) else {
        tracing::warn!(record = %at(), "read model changelog record without valid JSON and fields skipped");
        return None;
    };
    Some(Change {
        id,
        row: Some(Row {
            json: json.into(),
            fields: fields.into_iter().map(|f| f.map(Box::from)).collect(),
        }),
    })
}

/// A thread following a changelog into a model, from its first record,
/// until dropped.
pub(crate) struct Follower {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower").finish_non_exhaustive()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Most changes applied under one lock of the model.
const APPLY_BATCH: usize = 4096;

impl Follower {
    /// Follows `log` into `model`; `group` names the consumer (it joins
    /// no group and commits nothing: every start reads the whole topic).
    pub(crate) fn start(log: &ModelLog, model: Arc<ReadModel>, group: &str) -> Result<Self> {
        let mut config = log.client_config();
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        let consumer: BaseConsumer = config.create().map_err(|e| ConnectorError::Io {
            path: format!("kafka topic {}", log.topic),
            source: std::io::Error::other(log.properties.scrub(&e.to_string())),
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let (topic, partitions, flag) = (log.topic.clone(), log.partitions, stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("vigil-model-{}", model.name()))
            .spawn(move || follow(consumer, &topic, partitions, &model, &flag))
            .map_err(|e| ConnectorError::Io {
                path: format!("kafka topic {}", log.topic),
                source: e,
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

fn follow(
    consumer: BaseConsumer,
    topic: &str,
    partitions: usize,
    model: &ReadModel,
    stop: &AtomicBool,
) {
    let mut list = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        if let Err(e) = list.add_partition_offset(topic, p, Offset::Beginning) {
            tracing::error!(topic, partition = p, error = %e, "read model changelog partition not followed");
        }
    }
    if let Err(e) = consumer.assign(&list) {
        tracing::error!(topic, error = %e, "read model changelog not followed: this process serves no rows of it");
        return;
    }
    let mut failing = false;
    while !stop.load(Ordering::Relaxed) {
        let mut changes = Vec::new();
        let mut wait = Duration::from_millis(200);
        while changes.len() < APPLY_BATCH {
            match consumer.poll(wait) {
                Some(Ok(m)) => {
                    failing = false;
                    changes.extend(change_of(&m));
                }
                Some(Err(e)) => {
                    if !failing {
                        tracing::warn!(topic, error = %e, "reading the read model changelog failed; retrying");
                    }
                    failing = true;
                    break;
                }
                None => break,
            }
            wait = Duration::ZERO;
        }
        if !changes.is_empty() {
            model.apply_changes(changes, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_key_gives_back_its_tenant_and_key() {
        for (t, k) in [("acme", "INC-1"), ("", "x"), ("a:b", ":c"), ("ü", "9")] {
            let raw = encode_key(t, k);
            assert_eq!(
                decode_key(raw.as_bytes()),
                Some((t.to_string(), k.to_string()))
            );
        }
        assert_eq!(decode_key(b"nope"), None);
        assert_eq!(decode_key(b"9:short"), None);
    }
}
