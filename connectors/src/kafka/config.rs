//! What pipeline authors write for Kafka sources and sinks.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::file::SchemaConfig;

/// Where a consumer group starts on a partition it has no committed offset for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartOffset {
    /// The oldest record still in the topic.
    #[default]
    Earliest,
    /// Only records produced from now on.
    Latest,
}

/// A Kafka source: one consumer group member per subtask.
///
/// ```yaml
/// type: kafka
/// brokers: ${KAFKA_BROKERS:-127.0.0.1:9092}
/// topics: [identity.authentication]
/// schema:
///   fields:
///     - { name: ts, type: timestamp }
///     - { name: user, type: string }
///   event_time: { field: ts }
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    /// Topics to read.
    pub topics: Vec<String>,
    /// Consumer group (default: `vigil-<pipeline>`); processes with the same
    /// group share the partitions.
    #[serde(default)]
    pub group_id: Option<String>,
    /// Where to start without a committed offset: `earliest` (default) or `latest`.
    #[serde(default)]
    pub start_offset: StartOffset,
    /// Fields of the JSON values, and which is event time.
    pub schema: SchemaConfig,
    /// Records per batch, at most.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Extra librdkafka settings (`security.protocol`, `sasl.mechanism`, ...);
    /// take secrets from the environment with `${VAR}`.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_batch_size() -> usize {
    4096
}

/// A Kafka sink: JSON values, idempotent, `acks=all`, lz4.
///
/// ```yaml
/// type: kafka
/// input: alerts
/// brokers: ${KAFKA_BROKERS:-127.0.0.1:9092}
/// topic: alerts.critical
/// key: user
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// Topic to write.
    pub topic: String,
    /// Column whose value is the record key; records with the same key go to
    /// the same partition, as Kafka's default (murmur2) partitioner puts them.
    #[serde(default)]
    pub key: Option<String>,
    /// Extra librdkafka settings.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}
