//! Kafka: a consumer-group source and an idempotent producer sink, JSON or
//! Avro (Confluent wire format, Schema Registry) on the wire, records
//! straight into and out of Arrow batches.

mod config;
mod dead_letter;
pub mod model_log;
pub mod ownership;
pub mod repartition;
mod sink;
mod source;
pub mod status;

pub use config::{
    KafkaSinkConfig, KafkaSourceConfig, Properties, SinkFormat, Start, StartOffset, ValueFormat,
};
pub use dead_letter::KafkaDeadLetterSinkFactory;
pub use ownership::Ownership;
pub use sink::KafkaSinkFactory;
pub use source::{definition_of, KafkaSourceFactory};
pub use status::{GroupStatus, MemberStatus, PartitionStatus};
