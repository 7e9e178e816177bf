//! Kafka in and out, against librdkafka's mock cluster: a real Kafka-protocol
//! broker inside the test process, reached over TCP on loopback.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::TopicPartitionList;
use vigil::pipeline::load_str;
use vigil_engine::{start, NodeRole, RuntimeOptions};

use crate::options_with;

const START: i64 = 1_767_225_600_000;

async fn produce(brokers: &str) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("producer");
    for i in 0..300i64 {
        let user = format!("user{}", i % 7);
        let outcome = if i % 3 == 0 { "failure" } else { "success" };
        let value = format!(
            r#"{{"ts":{},"user":"{user}","outcome":"{outcome}"}}"#,
            START + i * 1000
        );
        let record = FutureRecord::to("auth")
            .partition((i % 3) as i32)
            .key(&user)
            .payload(&value);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .expect("delivered");
    }
    for (partition, value) in [(0, "not json at all"), (1, r#"{"user":"nobody"}"#)] {
        let record = FutureRecord::<str, str>::to("auth")
            .partition(partition)
            .payload(value);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .expect("delivered");
    }
}

fn pipeline(name: &str, brokers: &str) -> String {
    format!(
        "\
name: {name}
parallelism: 2
sources:
  auth:
    type: kafka
    brokers: {brokers}
    topics: [auth]
    group_id: {name}
    properties: {{ session.timeout.ms: \"6000\" }}
    schema:
      fields:
        - {{ name: ts, type: timestamp }}
        - {{ name: user, type: string }}
        - {{ name: outcome, type: string }}
      event_time: {{ field: ts, format: epoch_ms }}
transforms:
  failed:
    type: filter
    input: auth
    where: \"outcome = 'failure'\"
sinks:
  alerts:
    type: kafka
    input: failed
    brokers: {brokers}
    topic: alerts
    key: user
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_in_kafka_out_with_dead_letters_and_offsets_committed_on_checkpoints() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("auth", 3, 1).expect("topic");
    cluster.create_topic("alerts", 2, 1).expect("topic");
    let brokers = cluster.bootstrap_servers();
    produce(&brokers).await;

    let name = format!("kafka-it-{}", std::process::id());
    let mut options = options_with(&[]);
    let dlq_dir = tempfile::tempdir().expect("tempdir");
    options.dead_letter_dir = dlq_dir.path().to_path_buf();
    let plan = load_str("kafka.yaml", &pipeline(&name, &brokers), &options).expect("valid");
    let running = start(
        &plan.graph,
        RuntimeOptions {
            checkpoint_interval: Some(Duration::from_millis(300)),
            ..RuntimeOptions::default()
        },
    )
    .expect("start");
    let stop = running.stop_handle();
    let metrics = running.metrics();
    let mut task = tokio::task::JoinSet::new();
    task.spawn(running.wait());

    // Every failure arrives on the output topic, keyed by user.
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "reader")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("reader");
    reader.subscribe(&["alerts"]).expect("subscribe");
    let mut seen: HashMap<i64, String> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while seen.len() < 100 {
        let m = tokio::time::timeout_at(deadline, reader.recv())
            .await
            .expect("all alerts within 90 s")
            .expect("message");
        let value: serde_json::Value =
            serde_json::from_slice(m.payload().expect("payload")).expect("json");
        let key = std::str::from_utf8(m.key().expect("key")).expect("utf-8");
        assert_eq!(value["user"], key, "keyed by the user column");
        assert_eq!(value["outcome"], "failure");
        assert_eq!(value["kafka_topic"], "auth");
        let ts = value["ts"].as_str().expect("ts").to_string();
        let offset = value["kafka_offset"].as_i64().expect("offset") * 10
            + value["kafka_partition"].as_i64().expect("partition");
        seen.insert(offset, ts);
    }
    assert_eq!(seen.len(), 100, "each failure once");

    // Offsets are committed once checkpoints complete: past the bad records too.
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", &name)
        .create()
        .expect("probe");
    let mut wanted = TopicPartitionList::new();
    for p in 0..3 {
        wanted.add_partition("auth", p);
    }
    let expected = [101, 101, 100];
    let mut committed = Vec::new();
    for _ in 0..100 {
        let list = probe
            .committed_offsets(wanted.clone(), Duration::from_secs(5))
            .expect("committed");
        committed = (0..3)
            .map(|p| {
                list.find_partition("auth", p)
                    .and_then(|e| e.offset().to_raw())
                    .unwrap_or(-1)
            })
            .collect();
        if committed == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        committed, expected,
        "offsets committed after every record was processed"
    );

    let sources = metrics.totals(NodeRole::Source);
    assert_eq!(sources.records_in, 300);
    assert_eq!(sources.dead_letters, 2);
    stop.stop();
    task.join_next()
        .await
        .expect("task")
        .expect("join")
        .expect("clean stop");
    let dlq = std::fs::read_to_string(dlq_dir.path().join(format!("{name}.dlq.ndjson")))
        .expect("dead letters");
    assert!(dlq.contains("\"location\":\"auth/0\""), "{dlq}");
    assert!(dlq.contains("missing event time field"), "{dlq}");
}
