//! Kafka throughput: a pre-loaded topic of ~420-byte JSON authentication
//! events (the security event envelope) → decode → filter → Kafka sink, and
//! the same events as Avro in the Confluent wire format.
//!
//! The broker is librdkafka's mock cluster and the Schema Registry the test
//! double of `tests/integration/registry.rs`, both inside this process. The
//! pipeline runs on a current-thread runtime (one core); librdkafka's
//! threads and the broker's work on the other. Two figures per run: events/s
//! of wall time, and events per CPU-second of the whole process (pipeline,
//! librdkafka and broker together: the honest "per core" figure).
//!
//! `cargo bench --bench kafka` (add `-- --events N --runs R`).

#[path = "../tests/integration/registry.rs"]
#[allow(dead_code)]
mod registry;
mod support;

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use support::{arg, spread};
use vigil::pipeline::{load_str, PlanOptions};
use vigil_engine::{start, RuntimeOptions};

/// Partitions of each topic. The mock broker keeps a bounded log per
/// partition (it drops the oldest records past a few tens of MB), so a
/// pre-loaded topic of a million events needs many.
const PARTITIONS: i32 = 16;

const SCHEMAS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/security-events.avsc");

/// Event `i`: 100 k users, one in ten logins a failure.
fn event(i: u64) -> String {
    let outcome = if i.is_multiple_of(10) {
        "failure"
    } else {
        "success"
    };
    format!(
        concat!(
            r#"{{"id":"5f0c6a1e-{:04x}-4000-8000-{:012x}","type":"auth.user.login","version":"1.2.0","#,
            r#""time":"2026-01-01T{:02}:{:02}:{:02}.{:03}Z","#,
            r#""source":{{"service":"idp","version":"4.2.1","instance":"idp-{}"}},"#,
            r#""tenant":{{"tenantId":"t-{:02}"}},"correlation":{{"correlationId":"c-{:08}"}},"#,
            r#""security":{{"classification":"internal"}},"data":{{"userId":"user-{:05}","#,
            r#""authMethod":"password","outcome":"{}","clientIp":"10.{}.{}.{}","country":"NL","#,
            r#""riskScore":0.{:02},"anomalies":[]}}}}"#
        ),
        i % 0xffff,
        i,
        (i / 3_600_000) % 24,
        (i / 60_000) % 60,
        (i / 1000) % 60,
        i % 1000,
        i % 8,
        i % 16,
        i,
        i % 100_000,
        outcome,
        i % 256,
        (i / 256) % 256,
        (i / 65_536) % 256,
        i % 100,
    )
}

/// Writes `n` JSON events to `auth-json`.
async fn preload_json(brokers: &str, n: u64) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let mut pending = Vec::with_capacity(10_000);
    for i in 0..n {
        let value = event(i);
        let key = format!("user-{:05}", i % 100_000);
        let record = FutureRecord::to("auth-json")
            .partition((i % PARTITIONS as u64) as i32)
            .key(&key)
            .payload(&value);
        pending.push(producer.send_result(record).expect("queued"));
        if pending.len() == 10_000 {
            for d in futures::future::join_all(pending.drain(..)).await {
                d.expect("delivery").expect("delivered");
            }
        }
    }
    for d in futures::future::join_all(pending).await {
        d.expect("delivery").expect("delivered");
    }
}

/// The source part shared by the pipelines: `topic` from the start.
fn source(brokers: &str, topic: &str, group: &str, format: &str, registry: &str) -> String {
    format!(
        "\
sources:
  auth:
    type: kafka
    brokers: {brokers}
    topics: [{topic}]
    group_id: {group}
    start: earliest
    batch_size: 8192
    format: {format}
    {registry}
"
    )
}

/// Converts the JSON topic to Avro with a Vigil pipeline (the sink
/// registers the schema); returns the schema as registered.
async fn preload_avro(brokers: &str, registry: &registry::Registry, n: u64) -> String {
    let url = &registry.url;
    let text = format!(
        "name: preload\n{}    \
schema: {{ avro: {SCHEMAS}, avro_record: AuthenticationEvent, event_time: {{ field: time }} }}
transforms:
  envelope:
    type: project
    input: auth
    columns: {{ id: id, type: type, version: version, time: time, source: source, tenant: tenant, correlation: correlation, security: security, data: data }}
sinks:
  out:
    type: kafka
    input: envelope
    brokers: {brokers}
    topic: auth-avro
    format: avro
    registry: {{ url: \"{url}\" }}
",
        source(brokers, "auth-json", "preload", "json", ""),
    );
    let plan = load_str("preload.yaml", &text, &PlanOptions::default()).expect("preload pipeline");
    run_until(&plan.graph, n).await;
    registry.subject("auth-avro-value")[0].1.clone()
}

/// Runs `graph` until its source `auth` has read `n` records, then stops it
/// (the stop flushes the sink). Returns the time and the CPU time from the
/// first record read to the end (joining the consumer group is not
/// counted), and the rows written.
#[allow(clippy::disallowed_methods)] // a benchmark measures wall time
async fn run_until(graph: &vigil_engine::Graph, n: u64) -> (Duration, Duration, u64) {
    let running = start(graph, RuntimeOptions::default()).expect("start");
    let (stop, metrics) = (running.stop_handle(), running.metrics());
    let waiting = running.wait();
    tokio::pin!(waiting);
    let mut first: Option<(Instant, Duration)> = None;
    let mut stopped = false;
    loop {
        tokio::select! {
            r = &mut waiting => {
                r.expect("pipeline");
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(if std::env::var_os("VIGIL_BENCH_TRACE").is_some() { 1000 } else { 1 })), if !stopped => {
                let read = metrics.node_totals("auth").records_in;
                if read > 0 && first.is_none() {
                    first = Some((Instant::now(), cpu_time()));
                }
                if read >= n {
                    stop.stop();
                    stopped = true;
                }
                if std::env::var_os("VIGIL_BENCH_TRACE").is_some() {
                    eprintln!("read {read}, written {}", metrics.node_totals("out").records_in);
                }
            }
        }
    }
    let (t0, cpu0) = first.expect("records were read");
    (
        t0.elapsed(),
        cpu_time() - cpu0,
        metrics.node_totals("out").records_in,
    )
}

/// CPU time used by this process so far (all threads), from /proc.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// The measured pipeline for `format` (`json` or `avro`), run `run`.
fn pipeline(brokers: &str, registry: &str, format: &str, reader: &str, run: usize) -> String {
    let registry_line = if format == "avro" {
        format!("registry: {{ url: \"{registry}\" }}")
    } else {
        String::new()
    };
    let schema = if format == "avro" {
        format!("schema: {{ avro: {reader}, event_time: {{ field: time }}, flatten: true }}")
    } else {
        format!("schema: {{ avro: {SCHEMAS}, avro_record: AuthenticationEvent, event_time: {{ field: time }}, flatten: true }}")
    };
    format!(
        "name: bench-{format}-{run}\n{}    {schema}\n\
transforms:
  failed:
    type: filter
    input: auth
    where: \"\\\"data.outcome\\\" = 'failure'\"
sinks:
  out:
    type: kafka
    input: failed
    brokers: {brokers}
    topic: out-{format}
    format: {format}
    {registry_line}
",
        source(
            brokers,
            &format!("auth-{format}"),
            &format!("bench-{format}-{run}"),
            format,
            &registry_line
        ),
    )
}

fn main() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let events = arg("--events", 1_000_000);
    let runs = arg("--runs", 3) as usize;
    let infra = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let cluster = MockCluster::new(1).expect("mock cluster");
    for t in ["auth-json", "auth-avro", "out-json", "out-avro"] {
        cluster.create_topic(t, PARTITIONS, 1).expect("topic");
    }
    let brokers = cluster.bootstrap_servers();
    let registry = infra.block_on(registry::Registry::start());
    println!(
        "preloading {events} JSON events (~{} bytes each) ...",
        event(123_456).len()
    );
    infra.block_on(preload_json(&brokers, events));
    println!("converting them to Avro with a Vigil pipeline ...");
    let written = infra.block_on(preload_avro(&brokers, &registry, events));
    let dir = tempfile::tempdir().expect("tempdir");
    let reader = dir.path().join("auth-avro.avsc");
    std::fs::write(&reader, written).expect("reader schema");
    let reader = reader.display().to_string();

    println!("vigil kafka throughput, pipeline on one core, {events} events per run, median of {runs} runs");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for format in ["json", "avro"] {
        let mut wall = Vec::new();
        let mut per_cpu = Vec::new();
        let mut written = 0;
        for run in 0..runs {
            let text = pipeline(&brokers, &registry.url, format, &reader, run);
            let plan = load_str("bench.yaml", &text, &PlanOptions::default()).expect("pipeline");
            let (took, cpu, out) = rt.block_on(run_until(&plan.graph, events));
            wall.push(events as f64 / took.as_secs_f64());
            per_cpu.push(events as f64 / cpu.as_secs_f64().max(1e-3));
            written = out;
        }
        let (w, wmin, wmax) = spread(wall);
        let (c, _, _) = spread(per_cpu);
        println!(
            "kafka {format:<4} -> decode -> filter -> kafka {format:<4}  median {:>6.0} k events/s wall (min {:.0}, max {:.0}); {:>6.0} k events per CPU-second; {:.1}% written",
            w / 1e3,
            wmin / 1e3,
            wmax / 1e3,
            c / 1e3,
            100.0 * written as f64 / events as f64
        );
    }
}
