//! Kafka against a separate broker process: tansu (see `broker.rs`),
//! started on a free loopback port with in-memory storage and stopped when
//! the test ends.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::TopicPartitionList;
use vigil::pipeline::load_str;
use vigil_engine::{NodeRole, RuntimeOptions};

use crate::options_with;

pub(crate) use crate::broker::{create_topics, start_tansu};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_between_topics_of_a_separate_broker_process() {
    let Some(tansu) = start_tansu() else { return };
    let brokers = tansu.brokers.clone();
    create_topics(&brokers, &[("logins", 2), ("failures", 1)]).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("producer");
    for i in 0..200i64 {
        let outcome = if i % 4 == 0 { "failure" } else { "success" };
        let value = format!(
            r#"{{"ts":"2026-01-01T00:{:02}:{:02}Z","user":"u{}","outcome":"{outcome}"}}"#,
            i / 60,
            i % 60,
            i % 5
        );
        producer
            .send(
                FutureRecord::to("logins")
                    .partition((i % 2) as i32)
                    .payload(&value)
                    .key("k"),
                Duration::from_secs(10),
            )
            .await
            .expect("delivered");
    }
    let text = format!(
        "\
name: tansu-it
sources:
  logins:
    type: kafka
    brokers: {brokers}
    topics: [logins]
    start: earliest
    properties: {{ session.timeout.ms: \"6000\" }}
    schema:
      fields:
        - {{ name: ts, type: timestamp }}
        - {{ name: user, type: string }}
        - {{ name: outcome, type: string }}
      event_time: {{ field: ts }}
transforms:
  failed:
    type: filter
    input: logins
    where: \"outcome = 'failure'\"
sinks:
  out:
    type: kafka
    input: failed
    brokers: {brokers}
    topic: failures
    key: user
"
    );
    let plan = load_str("tansu.yaml", &text, &options_with(&[])).expect("valid");
    let launched = crate::launch(&plan.graph, RuntimeOptions::default());

    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "unused")
        .create()
        .expect("reader");
    let mut list = TopicPartitionList::new();
    list.add_partition_offset("failures", 0, rdkafka::Offset::Beginning)
        .expect("partition");
    reader.assign(&list).expect("assign");
    let mut users = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while users.len() < 50 {
        let m = tokio::time::timeout_at(deadline, reader.recv())
            .await
            .expect("50 failures within 60 s")
            .expect("message");
        let v: serde_json::Value =
            serde_json::from_slice(m.payload().expect("payload")).expect("json");
        assert_eq!(v["outcome"], "failure");
        assert_eq!(Some(v["user"].as_str().expect("user").as_bytes()), m.key());
        users.push(v["user"].as_str().expect("user").to_string());
    }
    assert_eq!(launched.metrics.totals(NodeRole::Source).records_in, 200);
    launched.finish().await;
    users.sort();
    users.dedup();
    assert_eq!(users, ["u0", "u1", "u2", "u3", "u4"]);
}
