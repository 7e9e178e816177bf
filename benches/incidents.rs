//! Incident projection benchmark, on one core unless said otherwise.
//!
//! * **Projection**: the `incidents` operator holding 100 k open incidents
//!   (100 k entities in three tenants), fed alerts for those entities in
//!   batches of 1,024: alerts and events per second, read-model rows and
//!   in-memory log appends and snapshots (every 100 events) included.
//! * **Rebuild**: the same kind of history on a Kafka-protocol broker
//!   (librdkafka's mock cluster, over TCP) through the Kafka event log, then
//!   the time a restart takes to be ready: from the latest snapshots plus
//!   the tail, and from the first event. The mock broker does not compact,
//!   so its snapshot topic holds every snapshot row ever written; the same
//!   comparison on the in-memory log (which keeps the latest row per
//!   incident, as compaction does) with 20 events per incident shows the
//!   fold's own cost.
//! * **Freshness**: a pipeline (Kafka alerts → incidents → read model) on a
//!   two-thread runtime; an alert is produced and the HTTP API polled every
//!   millisecond until its incident is there.
//!
//! `cargo bench --bench incidents` (add `-- --incidents N --alerts M --runs R`,
//! and `--parts 1|2|4` for one part).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use support::{arg, spread};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vigil::pipeline::{load_str, PlanOptions};
use vigil_connectors::incident_log::{EventLogConfig, KafkaEventLog};
use vigil_engine::{
    Collector, EventLog, MemoryEventLog, Operator, OperatorFactory, RuntimeOptions, TaskContext,
};
use vigil_operators::incident::operator::{Condition, Rule};
use vigil_operators::incident::{
    event_schema, state_schema, IncidentFactory, IncidentSpec, Severity,
};

const TENANTS: [&str; 3] = ["acme", "globex", "initech"];
const T0: i64 = 1_767_225_600_000;

fn spec() -> IncidentSpec {
    IncidentSpec {
        name: "incidents".into(),
        window_ms: 24 * 3_600_000,
        rules: vec![
            Rule {
                condition: Condition::AlertSeverity(Severity::High),
                severity: Severity::High,
            },
            Rule {
                condition: Condition::Alerts(5),
                severity: Severity::High,
            },
            Rule {
                condition: Condition::Detections(3),
                severity: Severity::Critical,
            },
        ],
        snapshot_every: 100,
        alert_inputs: 1,
    }
}

fn alert_schema() -> SchemaRef {
    let s = |n: &str| Field::new(n, DataType::Utf8, false);
    Arc::new(Schema::new(vec![
        s("tenant_id"),
        s("entity_type"),
        s("entity_id"),
        s("alert_id"),
        s("detection"),
        s("severity"),
        s("title"),
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
    ]))
}

/// Alerts `from..to`: alert `i` is for entity `i % entities`.
fn alerts(from: u64, to: u64, entities: u64, batch: u64) -> Vec<RecordBatch> {
    const DETECTIONS: [&str; 4] = [
        "brute_force",
        "spray",
        "lateral_movement",
        "impossible_travel",
    ];
    const SEVERITIES: [&str; 3] = ["low", "medium", "high"];
    let mut out = Vec::new();
    let mut i = from;
    while i < to {
        let end = (i + batch).min(to);
        let ids: Vec<u64> = (i..end).collect();
        let col = |f: &dyn Fn(u64) -> String| -> ArrayRef {
            Arc::new(StringArray::from(
                ids.iter().map(|i| f(*i)).collect::<Vec<_>>(),
            ))
        };
        let entity = |i: u64| i % entities;
        out.push(
            RecordBatch::try_new(
                alert_schema(),
                vec![
                    col(&|i| TENANTS[(entity(i) % 3) as usize].to_string()),
                    col(&|_| "user".to_string()),
                    col(&|i| format!("user{:06}", entity(i))),
                    col(&|i| format!("alert-{i}")),
                    col(&|i| DETECTIONS[((i / entities) % 4) as usize].to_string()),
                    col(&|i| SEVERITIES[((i / entities) % 3) as usize].to_string()),
                    col(&|i| format!("alert on user{:06}", entity(i))),
                    Arc::new(
                        TimestampMillisecondArray::from(
                            ids.iter().map(|i| T0 + *i as i64 * 10).collect::<Vec<_>>(),
                        )
                        .with_timezone("UTC"),
                    ),
                ],
            )
            .expect("alerts"),
        );
        i = end;
    }
    out
}

fn subtask(log: Arc<dyn EventLog>) -> Box<dyn Operator> {
    IncidentFactory::new(spec(), Some(log))
        .create(&TaskContext::detached("incidents", 0, 1, 0))
        .expect("subtask")
}

/// Feeds `batches`; events out.
fn feed(op: &mut dyn Operator, batches: &[RecordBatch]) -> usize {
    let mut events = 0;
    for b in batches {
        let mut out = Collector::new();
        op.process_batch(0, b.clone(), &mut out).expect("process");
        events += out.take_main().iter().map(|b| b.num_rows()).sum::<usize>();
    }
    events
}

#[allow(clippy::disallowed_methods)]
fn projection(incidents: u64, updates: u64, runs: u64) {
    let opening = alerts(0, incidents, incidents, 1024);
    let attaching = alerts(incidents, incidents + updates, incidents, 1024);
    let (mut open_rates, mut alert_rates, mut event_rates) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let log = MemoryEventLog::new("incident_id");
        let mut op = subtask(log.clone());
        let t = Instant::now();
        let opened = feed(op.as_mut(), &opening);
        open_rates.push(incidents as f64 / t.elapsed().as_secs_f64());
        assert!(opened as u64 >= incidents);
        let t = Instant::now();
        let events = feed(op.as_mut(), &attaching);
        let dt = t.elapsed().as_secs_f64();
        alert_rates.push(updates as f64 / dt);
        event_rates.push(events as f64 / dt);
    }
    let (open, _, _) = spread(open_rates);
    let (a, amin, amax) = spread(alert_rates);
    let (e, _, _) = spread(event_rates);
    println!(
        "projection: {incidents} incidents opened at {:.2} M alerts/s; then {updates} alerts \
         for them at {:.2} M alerts/s (min {:.2}, max {:.2}), {:.2} M events/s; medians of {runs}",
        open / 1e6,
        a / 1e6,
        amin / 1e6,
        amax / 1e6,
        e / 1e6
    );
}

/// Rebuild on the in-memory log, which keeps the latest snapshot row per
/// incident (as compaction does): the fold's own cost, long histories.
#[allow(clippy::disallowed_methods)]
fn rebuild_in_memory(incidents: u64, updates: u64, runs: u64) {
    let log = MemoryEventLog::new("incident_id");
    let mut op = subtask(log.clone());
    let mut events = feed(op.as_mut(), &alerts(0, incidents, incidents, 1024));
    events += feed(
        op.as_mut(),
        &alerts(incidents, incidents + updates, incidents, 1024),
    );
    op.on_end(&mut Collector::new()).expect("end");
    drop(op);
    let mut snap = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let op = subtask(log.clone());
        snap.push(t.elapsed().as_secs_f64());
        drop(op);
    }
    let tail = log.recover().expect("recover").events_read;
    log.forget_snapshots();
    let mut zero = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let op = subtask(log.clone());
        zero.push(t.elapsed().as_secs_f64());
        drop(op);
    }
    let (s, _, _) = spread(snap);
    let (z, _, _) = spread(zero);
    println!(
        "rebuild in memory, {incidents} incidents, {events} events: from snapshots + tail \
         ({tail} events) {s:.2} s, from zero {z:.2} s ({:.1}x); medians of {runs}",
        z / s
    );
}

fn kafka_log(brokers: &str, snapshots: &str) -> Arc<KafkaEventLog> {
    let config: EventLogConfig = serde_json::from_value(serde_json::json!({
        "brokers": brokers,
        "topic": "incidents.events",
        "snapshots": snapshots,
    }))
    .expect("config");
    KafkaEventLog::new(&config, event_schema(), state_schema(), "incident_id").expect("log")
}

#[allow(clippy::disallowed_methods)]
fn rebuild(incidents: u64, updates: u64, runs: u64) {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let brokers = cluster.bootstrap_servers();
    // The mock broker keeps at most 100,000 records per partition.
    for t in ["incidents.events", "incidents.snapshots", "incidents.empty"] {
        cluster.create_topic(t, 16, 1).expect("topic");
    }
    let log = kafka_log(&brokers, "incidents.snapshots");
    let mut op = subtask(log.clone());
    let t = Instant::now();
    let mut events = feed(op.as_mut(), &alerts(0, incidents, incidents, 1024));
    events += feed(
        op.as_mut(),
        &alerts(incidents, incidents + updates, incidents, 1024),
    );
    op.on_end(&mut Collector::new()).expect("end");
    let dt = t.elapsed().as_secs_f64();
    println!(
        "kafka event log: {events} events for {incidents} incidents written at {:.0} k events/s \
         (Avro, snapshot every 100 events)",
        events as f64 / dt / 1e3
    );
    drop(op);
    for (snapshots, what) in [
        ("incidents.empty", "from zero"),
        ("incidents.snapshots", "from snapshots + tail"),
    ] {
        let mut times = Vec::new();
        let mut read = 0;
        for _ in 0..runs {
            let log = kafka_log(&brokers, snapshots);
            let t = Instant::now();
            let mut op = subtask(log.clone());
            times.push(t.elapsed().as_secs_f64());
            let state = op.snapshot().expect("state");
            assert_eq!(state.batches[0].num_rows() as u64, incidents);
            read = log.recover().expect("recover").events_read;
        }
        let (m, lo, hi) = spread(times);
        println!(
            "rebuild {what}: {m:.2} s (min {lo:.2}, max {hi:.2}), {read} events read; medians of {runs}"
        );
    }
}

async fn http_get(addr: std::net::SocketAddr, path: &str, tenant: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: vigil\r\nX-Tenant-Id: {tenant}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("send");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    String::from_utf8_lossy(&buf)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

const FRESHNESS: &str = "
name: freshness
sources:
  alerts:
    type: kafka
    brokers: BROKERS
    topics: [alerts]
    start: earliest
    schema:
      fields:
        - { name: alert_id, type: string }
        - { name: tenant_id, type: string }
        - { name: entity_type, type: string }
        - { name: entity_id, type: string }
        - { name: detection, type: string }
        - { name: severity, type: string }
        - { name: time, type: timestamp }
      event_time: { field: time, format: epoch_ms }
    # The mock broker holds a fetch for fetch.wait.max.ms (500 ms by
    # default) even when records arrive; a real broker answers at once.
    properties: { fetch.wait.max.ms: \"5\" }
transforms:
  incidents:
    type: incidents
    alerts: [{ input: alerts }]
sinks:
  risk: { type: read_model, input: incidents.entity_risk, key: entity }
";

#[allow(clippy::disallowed_methods)]
fn freshness(samples: u64) {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let brokers = cluster.bootstrap_servers();
    cluster.create_topic("alerts", 4, 1).expect("topic");
    cluster.create_topic("alerts.dlq", 1, 1).expect("topic");
    let plan = load_str(
        "freshness.yaml",
        &FRESHNESS.replace("BROKERS", &brokers),
        &PlanOptions::default(),
    )
    .expect("plan");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let listener = vigil::http::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let models = plan.read_models.clone();
        let control = Arc::new(vigil::http::Control::for_plan(&plan));
        let server = tokio::spawn(vigil::http::serve(listener, models, control));
        let running = vigil_engine::start(&plan.graph, RuntimeOptions::default()).expect("start");
        let stop = running.stop_handle();
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("linger.ms", "0")
            .create()
            .expect("producer");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut lat = Vec::new();
        for i in 0..samples + 5 {
            let value = format!(
                r#"{{"alert_id":"a{i}","tenant_id":"acme","entity_type":"user","entity_id":"u{i}","detection":"spray","severity":"high","time":{}}}"#,
                T0 + i as i64
            );
            let t = Instant::now();
            producer
                .send(FutureRecord::to("alerts").key(&format!("u{i}")).payload(&value), Duration::from_secs(5))
                .await
                .expect("sent");
            let path = format!("/v1/read-models/risk/user:u{i}");
            while http_get(addr, &path, "acme").await != 200 {
                assert!(t.elapsed() < Duration::from_secs(30), "alert {i} never showed");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // The first few warm the consumer up.
            if i >= 5 {
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        stop.stop();
        running.wait().await.expect("stops");
        server.abort();
        lat.sort_by(f64::total_cmp);
        let p99 = lat[((lat.len() as f64 * 0.99) as usize).min(lat.len() - 1)];
        println!(
            "freshness: alert produced to Kafka until its read model answers over HTTP: \
             median {:.1} ms, p99 {p99:.1} ms, max {:.1} ms over {samples} alerts",
            lat[lat.len() / 2],
            lat[lat.len() - 1]
        );
    });
}

fn main() {
    let incidents = arg("--incidents", 100_000);
    let updates = arg("--alerts", 1_000_000);
    let runs = arg("--runs", 5);
    // Which parts: 1 projection, 2 rebuild, 4 freshness.
    let parts = arg("--parts", 7);
    if parts & 1 != 0 {
        projection(incidents, updates, runs);
    }
    if parts & 2 != 0 {
        rebuild(incidents, incidents * 2, runs.min(3));
        rebuild_in_memory(incidents, incidents * 19, runs.min(3));
    }
    if parts & 4 != 0 {
        freshness(arg("--samples", 100));
    }
}
