//! What a running pipeline says about itself, scraped over HTTP while it
//! runs on librdkafka's mock cluster (a real Kafka-protocol broker over TCP):
//! `/metrics` against what really went through, `/ready` and the channel
//! gauges when a sink stalls, and the Grafana dashboard against the metric
//! names the engine really exports.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::watch;
use vigil::pipeline::load_str;
use vigil::run::{Progress, RunOptions};
use vigil_engine::{Sink, SinkFactory, TaskContext};

use crate::incidents::get;
use crate::kafka::{pipeline, produce, read, read_dead_letters};
use crate::options_with;

/// One sample of the Prometheus text: name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            Some(Sample {
                name: name.to_string(),
                labels,
                value: value.parse().ok()?,
            })
        })
        .collect()
}

/// Sum of `name` over the samples whose labels include every `want`.
fn sum(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            want.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

async fn scrape(addr: SocketAddr) -> (String, Vec<Sample>) {
    let (status, body) = get(addr, "/metrics", None).await;
    assert_eq!(status, 200, "{body}");
    let samples = parse(&body);
    (body, samples)
}

/// A loopback address with a free port.
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// Waits until the run's API accepts connections.
async fn serving(addr: SocketAddr) {
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the API never came up on {addr}");
}

/// Polls `check` every 100 ms for up to `limit`.
async fn until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn run_options(http: SocketAddr) -> RunOptions {
    RunOptions {
        progress: Progress::Off,
        http: Some(http),
        checkpoint_interval: Some(Duration::from_millis(300)),
        ..RunOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_scraped_during_a_run_match_what_went_through_and_what_was_dropped() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("auth", 3, 1).expect("topic");
    cluster.create_topic("alerts", 2, 1).expect("topic");
    cluster.create_topic("auth.dlq", 1, 1).expect("topic");
    let brokers = cluster.bootstrap_servers();
    // 300 logins (100 failures) and 2 records that cannot be decoded.
    produce(&brokers).await;

    let name = format!("metrics-it-{}", std::process::id());
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = options_with(&[]);
    options.dead_letter_dir = dir.path().to_path_buf();
    // One subtask: two would rebalance once the second joins, and records
    // re-read after a rebalance (at-least-once) would count twice.
    let text = pipeline(&name, &brokers).replace("parallelism: 2", "parallelism: 1");
    let plan = load_str("kafka.yaml", &text, &options).expect("valid");
    let store = vigil_engine::CheckpointStore::open(
        dir.path().join("checkpoints").to_str().expect("utf-8"),
        2,
    )
    .expect("store");
    let addr = free_addr();
    let mut opts = run_options(addr);
    opts.checkpoints = Some(store);
    let run = vigil::run::run(&plan, opts);
    let checks = async {
        serving(addr).await;
        // What really went out: the 100 failures on the output topic.
        let out = read(&brokers, "alerts", 100, Duration::from_secs(60)).await;
        assert_eq!(out.len(), 100);

        let node = |n: &'static str| [("node", n)];
        until(
            "the sink's counters and the lag",
            Duration::from_secs(60),
            || async {
                let (_, s) = scrape(addr).await;
                sum(&s, "vigil_records_out_total", &node("alerts")) == 100.0
                    && s.iter()
                        .filter(|x| x.name == "vigil_kafka_consumer_lag_records")
                        .count()
                        == 3
                    && sum(&s, "vigil_kafka_consumer_lag_records", &[]) == 0.0
                    && sum(&s, "vigil_checkpoints_completed_total", &[]) >= 1.0
            },
        )
        .await;
        let (text, s) = scrape(addr).await;
        let pipeline_label = [("pipeline", name.as_str())];
        assert_eq!(
            sum(&s, "vigil_records_in_total", &[("role", "source")]),
            300.0
        );
        assert_eq!(sum(&s, "vigil_records_in_total", &node("failed")), 300.0);
        assert_eq!(sum(&s, "vigil_records_out_total", &node("failed")), 100.0);
        assert_eq!(sum(&s, "vigil_records_in_total", &node("alerts")), 100.0);
        assert_eq!(
            sum(&s, "vigil_records_in_total", &pipeline_label),
            300.0 + 300.0 + 100.0 + 2.0,
            "source, filter, sink and the dead-letter topic's sink"
        );
        // The two undecodable records, by reason, at the source.
        assert_eq!(sum(&s, "vigil_dead_letters_total", &node("auth")), 2.0);
        let reasons: Vec<&str> = s
            .iter()
            .filter(|x| x.name == "vigil_dead_letters_total")
            .filter_map(|x| x.labels.get("reason").map(String::as_str))
            .collect();
        assert!(reasons.contains(&"invalid_json"), "{reasons:?}");
        // Every row the sink took has an event-time latency; markers arrived.
        assert_eq!(
            sum(
                &s,
                "vigil_sink_event_time_latency_seconds_count",
                &node("alerts")
            ),
            100.0
        );
        assert!(
            sum(
                &s,
                "vigil_sink_ingest_latency_seconds_count",
                &node("alerts")
            ) > 0.0
        );
        assert!(sum(&s, "vigil_bytes_in_total", &node("alerts")) > 0.0);
        assert!(sum(&s, "vigil_busy_seconds_total", &node("failed")) > 0.0);
        assert_eq!(sum(&s, "vigil_pipeline_ready", &[]), 1.0);
        assert!(sum(&s, "vigil_checkpoint_size_bytes", &[]) > 0.0);
        for kind in [
            "# TYPE vigil_records_in_total counter",
            "# TYPE vigil_sink_ingest_latency_seconds histogram",
        ] {
            assert!(text.contains(kind), "{kind}");
        }

        // The undecodable records really are on the dead-letter topic, with
        // the reason the counter has.
        let dlq = read_dead_letters(&brokers, "auth.dlq", 3).await;
        assert_eq!(dlq.len(), 2, "{dlq:?}");
        assert!(dlq
            .iter()
            .any(|(_, h)| h.get("vigil.error").map(String::as_str) == Some("invalid_json")));

        // Probes and the graph.
        assert_eq!(get(addr, "/health", None).await.0, 200);
        assert_eq!(get(addr, "/ready", None).await.0, 200);
        let (status, body) = get(addr, "/v1/pipeline", None).await;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["pipeline"], name.as_str());
        assert_eq!(v["ready"]["ready"], true);
        let nodes: Vec<&str> = v["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .filter_map(|n| n["name"].as_str())
            .collect();
        assert!(nodes.contains(&"auth") && nodes.contains(&"failed") && nodes.contains(&"alerts"));
        // The source's subtasks own the topic's three partitions between
        // them, each with its lag.
        let source = v["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["name"] == "auth")
            .expect("the source");
        let mut owned: Vec<i64> = source["subtasks"]
            .as_array()
            .expect("subtasks")
            .iter()
            .flat_map(|t| t["partitions"].as_array().cloned().unwrap_or_default())
            .filter(|p| p["topic"] == "auth" && p["lag"] == 0)
            .filter_map(|p| p["partition"].as_i64())
            .collect();
        owned.sort_unstable();
        assert_eq!(owned, [0, 1, 2], "{source}");
        let filter = v["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["name"] == "failed")
            .expect("the filter");
        assert_eq!(filter["parallelism"], 1);
        assert_eq!(filter["inputs"][0]["from"], "auth");
        let filtered: u64 = filter["subtasks"]
            .as_array()
            .expect("subtasks")
            .iter()
            .filter_map(|t| t["records_out"].as_u64())
            .sum();
        assert_eq!(filtered, 100);
        assert!(v["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .any(|n| n["name"] == "alerts" && n["latency"]["event_time"]["count"] == 100));

        // Every metric the shipped dashboard charts is one the engine exports.
        let dashboard: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string("deploy/grafana/vigil.json").expect("the dashboard"),
        )
        .expect("the dashboard is JSON");
        let families: std::collections::BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let mut charted = 0;
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("expr");
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if word.starts_with("vigil_") {
                        let name = word;
                        let family = name.strip_suffix("_bucket").unwrap_or(name);
                        assert!(
                            families.contains(family),
                            "panel {:?} charts {name}, which /metrics does not export",
                            panel["title"]
                        );
                        charted += 1;
                    }
                }
            }
        }
        assert!(charted > 20, "{charted} metric references");
    };
    // The run goes on until the checks are done, and is dropped (its tasks
    // cancelled) with them.
    tokio::select! {
        r = run => panic!("the run ended first: {r:?}"),
        () = checks => {}
    }
}

/// A sink that waits while its gate is closed, as a stuck downstream would,
/// and counts what it wrote.
struct GateFactory {
    open: watch::Receiver<bool>,
    written: Arc<AtomicU64>,
}

struct Gate {
    open: watch::Receiver<bool>,
    written: Arc<AtomicU64>,
}

impl SinkFactory for GateFactory {
    fn create(
        &self,
        _ctx: &TaskContext,
        _schema: SchemaRef,
    ) -> vigil_engine::Result<Box<dyn Sink>> {
        Ok(Box::new(Gate {
            open: self.open.clone(),
            written: self.written.clone(),
        }))
    }
    fn describe(&self) -> String {
        "gated".into()
    }
}

#[async_trait]
impl Sink for Gate {
    async fn write(&mut self, batch: RecordBatch) -> vigil_engine::Result<()> {
        while !*self.open.borrow() {
            if self.open.changed().await.is_err() {
                break;
            }
        }
        self.written
            .fetch_add(batch.num_rows() as u64, Ordering::SeqCst);
        Ok(())
    }
}

/// Produces `n` failed logins with event times around now.
async fn produce_now(brokers: &str, from: i64, n: i64) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let now = vigil_engine::Clock::now_ms(&vigil_engine::SystemClock);
    let mut pending = Vec::new();
    for i in from..from + n {
        let user = format!("user{}", i % 7);
        let value = format!(
            r#"{{"ts":{},"user":"{user}","outcome":"failure"}}"#,
            now + i
        );
        let record = FutureRecord::to("auth")
            .partition((i % 3) as i32)
            .key(&user)
            .payload(&value);
        pending.push(
            producer
                .send_result(record)
                .map_err(|(e, _)| e)
                .expect("queued"),
        );
    }
    for p in pending {
        p.await.expect("delivery report").expect("delivered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sink_fills_its_channels_raises_the_lag_and_makes_the_run_unready() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("auth", 3, 1).expect("topic");
    cluster.create_topic("alerts", 2, 1).expect("topic");
    let brokers = cluster.bootstrap_servers();
    produce_now(&brokers, 0, 20_000).await;

    let name = format!("stall-it-{}", std::process::id());
    // One subtask, so no rebalance hands partitions around while the sink
    // is stuck (a hand-over waits for a checkpoint that cannot complete).
    let text = pipeline(&name, &brokers).replace("parallelism: 2", "parallelism: 1");
    let mut plan = load_str("kafka.yaml", &text, &options_with(&[])).expect("valid");
    let (gate, open) = watch::channel(false);
    let written = Arc::new(AtomicU64::new(0));
    plan.graph
        .replace_sink(
            "alerts",
            Arc::new(GateFactory {
                open,
                written: written.clone(),
            }),
        )
        .expect("the sink");
    let addr = free_addr();
    let mut opts = run_options(addr);
    opts.channel_capacity = 2;
    opts.stall_timeout = Duration::from_secs(1);
    let run = vigil::run::run(&plan, opts);
    let checks = async {
        serving(addr).await;
        // The channels into the stuck sink fill up, and the run turns unready
        // because its sources cannot hand anything on.
        until(
            "full channels and /ready false",
            Duration::from_secs(60),
            || async {
                let (_, s) = scrape(addr).await;
                let into: Vec<&Sample> = s
                    .iter()
                    .filter(|x| x.name == "vigil_channel_queued_batches")
                    .filter(|x| x.labels.get("to").map(String::as_str) == Some("alerts"))
                    .collect();
                let full = !into.is_empty() && into.iter().all(|x| x.value == 2.0);
                full && get(addr, "/ready", None).await.0 == 503
            },
        )
        .await;
        let (status, body) = get(addr, "/ready", None).await;
        assert_eq!(status, 503);
        assert!(body.contains("stalled"), "{body}");
        let (_, first) = scrape(addr).await;
        assert_eq!(sum(&first, "vigil_pipeline_ready", &[]), 0.0);
        let wm_lag = |s: &[Sample]| {
            s.iter()
                .filter(|x| x.name == "vigil_watermark_lag_seconds")
                .filter(|x| x.labels.get("role").map(String::as_str) == Some("source"))
                .map(|x| x.value)
                .fold(f64::MIN, f64::max)
        };
        let kafka_lag = |s: &[Sample]| sum(s, "vigil_kafka_consumer_lag_records", &[]);
        assert!(
            sum(
                &first,
                "vigil_backpressure_seconds_total",
                &[("role", "source")]
            ) > 0.0
        );

        // More arrives while nothing moves: both lags grow.
        produce_now(&brokers, 20_000, 5_000).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let (_, second) = scrape(addr).await;
        assert!(
            wm_lag(&second) > wm_lag(&first) + 1.0,
            "watermark lag {} then {}",
            wm_lag(&first),
            wm_lag(&second)
        );
        assert!(
            kafka_lag(&second) > kafka_lag(&first),
            "consumer lag {} then {}",
            kafka_lag(&first),
            kafka_lag(&second)
        );
        assert_eq!(written.load(Ordering::SeqCst), 0);

        // Released, it catches up: everything arrives, the run is ready again
        // and the lag drains.
        gate.send(true).expect("open the gate");
        until("every record written", Duration::from_secs(60), || async {
            written.load(Ordering::SeqCst) == 25_000
        })
        .await;
        until(
            "/ready true and no lag",
            Duration::from_secs(60),
            || async {
                let (_, s) = scrape(addr).await;
                get(addr, "/ready", None).await.0 == 200 && kafka_lag(&s) == 0.0
            },
        )
        .await;
    };
    // The run goes on until the checks are done, and is dropped (its tasks
    // cancelled) with them.
    tokio::select! {
        r = run => panic!("the run ended first: {r:?}"),
        () = checks => {}
    }
}
