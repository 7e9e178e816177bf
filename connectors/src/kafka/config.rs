//! What pipeline authors write for Kafka sources and sinks.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::avro::RegistryConfig;
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

/// How record values are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueFormat {
    /// JSON objects, decoded into the declared `schema`.
    #[default]
    Json,
    /// UTF-8 text, as one `value` column; event time is the Kafka timestamp.
    String,
    /// Bytes as they are, as one `value` column; event time is the Kafka timestamp.
    Bytes,
    /// Avro in the Confluent wire format, read with the reader schema
    /// `schema.avro`; writer schemas come from the `registry`.
    Avro,
}

/// Extra librdkafka settings (`security.protocol`, `sasl.*`, `ssl.*`, ...).
///
/// Secrets belong here (from the environment, `${KAFKA_PASSWORD}`), so the
/// values of secret settings never appear in `Debug` output, and
/// [`Properties::scrub`] removes them from client error messages.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Properties(pub BTreeMap<String, String>);

impl Properties {
    /// The settings, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter()
    }

    /// True for settings whose value is a secret.
    pub fn is_secret(key: &str) -> bool {
        const MARKS: &[&str] = &[
            "password",
            "secret",
            "jaas",
            "token",
            "key.pem",
            "private",
            "credential",
        ];
        let key = key.to_ascii_lowercase();
        MARKS.iter().any(|m| key.contains(m))
    }

    /// `message` with the value of every secret setting replaced.
    pub fn scrub(&self, message: &str) -> String {
        let mut out = message.to_string();
        for (k, v) in &self.0 {
            if Self::is_secret(k) && !v.is_empty() {
                out = out.replace(v.as_str(), "<redacted>");
            }
        }
        out
    }
}

impl std::fmt::Debug for Properties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown = if Self::is_secret(k) {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k, shown)
            }))
            .finish()
    }
}

/// How a Kafka sink writes record values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkFormat {
    /// One JSON object per record.
    #[default]
    Json,
    /// Avro in the Confluent wire format.
    Avro,
}

/// Where reading starts when the pipeline starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The group's committed offsets (`offset_reset` where there are none).
    Committed,
    /// The oldest record, whatever was committed.
    Earliest,
    /// New records only, whatever was committed.
    Latest,
    /// The first record at or after this time (ms since the epoch).
    Timestamp(i64),
}

impl Start {
    /// Parses `committed`, `earliest`, `latest` or an RFC 3339 time.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "committed" => Some(Start::Committed),
            "earliest" => Some(Start::Earliest),
            "latest" => Some(Start::Latest),
            t => crate::event_time::parse(t, crate::event_time::TimeFormat::Rfc3339)
                .map(Start::Timestamp),
        }
    }
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
    /// Where to start: `committed` (default), `earliest`, `latest`, or an
    /// RFC 3339 time. Applies to each partition the first time this process
    /// reads it.
    #[serde(default = "default_start")]
    pub start: String,
    /// Where `committed` starts on a partition without a committed offset:
    /// `earliest` (default) or `latest`.
    #[serde(default)]
    pub offset_reset: StartOffset,
    /// `json` (default), `avro`, `string` or `bytes`.
    #[serde(default)]
    pub format: ValueFormat,
    /// Fields of the values (declared, or an Avro schema file), and which
    /// is event time (JSON and Avro).
    #[serde(default)]
    pub schema: Option<SchemaConfig>,
    /// The Schema Registry holding the writer schemas (Avro only).
    #[serde(default)]
    pub registry: Option<RegistryConfig>,
    /// Records per batch, at most.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Where undecodable records go when no sink takes this source's
    /// `dead_letter` output: this topic, or `<topic>.dlq` by default.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Extra librdkafka settings (`security.protocol`, `sasl.mechanism`, ...);
    /// take secrets from the environment with `${VAR}`.
    #[serde(default)]
    pub properties: Properties,
}

fn default_batch_size() -> usize {
    4096
}

fn default_start() -> String {
    "committed".into()
}

/// A Kafka sink: JSON or Avro values, idempotent, `acks=all`, lz4.
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
    /// `json` (default) or `avro` (Confluent wire format; the schema is
    /// derived from the input columns and registered in `registry`).
    #[serde(default)]
    pub format: SinkFormat,
    /// The Schema Registry (Avro only).
    #[serde(default)]
    pub registry: Option<RegistryConfig>,
    /// Subject the Avro schema is registered under (default `<topic>-value`).
    #[serde(default)]
    pub subject: Option<String>,
    /// The input is a changelog (an `op` column: rows with `delete` or
    /// `retract` become tombstones, the rest upserts), for a compacted topic.
    #[serde(default)]
    pub changelog: bool,
    /// Write in Kafka transactions committed when a checkpoint completes, so
    /// `read_committed` consumers see every record exactly once. Records
    /// become visible one checkpoint later (default off: records are sent at
    /// once by an idempotent producer, and a restart may repeat the ones
    /// after the last checkpoint).
    #[serde(default)]
    pub exactly_once: bool,
    /// Prefix of the transactional ids (`<prefix>-<sink>-<subtask>`); two
    /// pipelines writing the same topic must use different ones. Default
    /// `vigil-<topic>`.
    #[serde(default)]
    pub transactional_id: Option<String>,
    /// Extra librdkafka settings.
    #[serde(default)]
    pub properties: Properties,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_settings_never_show() {
        let props = Properties(
            [
                ("security.protocol", "SASL_SSL"),
                ("sasl.mechanism", "SCRAM-SHA-512"),
                ("sasl.username", "vigil"),
                ("sasl.password", "hunter2-very-secret"),
                ("ssl.key.password", "another-secret"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        );
        let shown = format!("{props:?}");
        assert!(
            shown.contains("SASL_SSL") && shown.contains("vigil"),
            "{shown}"
        );
        assert!(
            !shown.contains("hunter2") && !shown.contains("another-secret"),
            "{shown}"
        );
        assert_eq!(
            props.scrub("Invalid value \"hunter2-very-secret\" for sasl.password"),
            "Invalid value \"<redacted>\" for sasl.password"
        );
    }
}
