//! Several `vigil run` processes of one pipeline against a separate broker
//! process (tansu): they share the input's partitions through the group,
//! see each other through their leases (`vigil status`), and a process with
//! another definition of the same pipeline refuses to join them.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::kafka::read;
use crate::tansu::{create_topics, start_tansu};

const RECORDS: i64 = 400;

fn pipeline(brokers: &str, outcome: &str) -> String {
    format!(
        "\
name: shared
sources:
  auth:
    type: kafka
    brokers: {brokers}
    topics: [auth]
    start: earliest
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
    where: \"outcome = '{outcome}'\"
sinks:
  alerts:
    type: kafka
    input: failed
    brokers: {brokers}
    topic: failures
    key: user
"
    )
}

fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("producer")
}

/// Produces `n` logins to `auth` (one a second of event time), record `i`
/// as user `user(i)` with `outcome(i)` to partition `i % partitions`.
async fn produce(
    brokers: &str,
    n: i64,
    partitions: i64,
    user: impl Fn(i64) -> String,
    outcome: impl Fn(i64) -> &'static str,
) {
    let producer = producer(brokers);
    for i in 0..n {
        let (user, outcome) = (user(i), outcome(i));
        let value = format!(
            r#"{{"ts":{},"user":"{user}","outcome":"{outcome}"}}"#,
            1_767_225_600_000 + i * 1000
        );
        producer
            .send(
                FutureRecord::to("auth")
                    .partition((i % partitions) as i32)
                    .payload(&value)
                    .key(&user),
                Duration::from_secs(10),
            )
            .await
            .expect("delivered");
    }
}

/// A `vigil run` process; SIGKILLed on drop if still running.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn vigil(dir: &Path, args: &[&str], log: &str) -> Process {
    let log = std::fs::File::create(dir.join(log)).expect("log file");
    Process(
        Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args(args)
            .current_dir(dir)
            .env(
                "RUST_LOG",
                std::env::var("VIGIL_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start vigil"),
    )
}

fn status(dir: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["status", "pipeline.yaml", "--json"])
        .current_dir(dir)
        .output()
        .expect("vigil status");
    assert!(
        out.status.success(),
        "vigil status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status is JSON")
}

/// Live processes and the partitions each owns, from `vigil status`.
fn owners(status: &serde_json::Value) -> Vec<BTreeSet<i64>> {
    status["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .filter(|p| p["live"] == true)
        .map(|p| {
            p["lease"]["partitions"]
                .as_array()
                .expect("partitions")
                .iter()
                .filter_map(|x| x["partition"].as_i64())
                .collect()
        })
        .collect()
}

fn wait_exit(p: &mut Process, within: Duration) -> std::process::ExitStatus {
    let until = tokio::time::Instant::now() + within;
    loop {
        if let Some(s) = p.0.try_wait().expect("wait") {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "vigil did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_of_one_pipeline_share_partitions_and_refuse_another_definition() {
    let Some(tansu) = start_tansu() else { return };
    let brokers = tansu.brokers.clone();
    create_topics(&brokers, &[("auth", 4), ("failures", 1)]).await;
    let failure = |i: i64| if i % 3 == 0 { "failure" } else { "success" };
    produce(&brokers, RECORDS, 4, |i| format!("u{i}"), failure).await;
    let expected: BTreeSet<String> = (0..RECORDS)
        .filter(|i| i % 3 == 0)
        .map(|i| format!("u{i}"))
        .collect();

    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("pipeline.yaml"),
        pipeline(&brokers, "failure"),
    )
    .expect("write");
    std::fs::write(dir.path().join("other.yaml"), pipeline(&brokers, "success")).expect("write");
    let run = [
        "run",
        "pipeline.yaml",
        "--http",
        "127.0.0.1:0",
        "--progress",
        "off",
        "--checkpoint-interval",
        "1s",
    ];
    let with = |member: &'static str| {
        let mut args = run.to_vec();
        args.extend(["--member", member]);
        args
    };
    let mut a = vigil(dir.path(), &with("a"), "a.log");
    let mut b = vigil(dir.path(), &with("b"), "b.log");

    // Both processes show up in `vigil status`, and between them own every
    // partition, each partition once.
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    let owned = loop {
        let owned = owners(&status(dir.path()));
        let all: Vec<i64> = owned.iter().flatten().copied().collect();
        if owned.len() == 2 && owned.iter().all(|o| !o.is_empty()) && all.len() == 4 {
            break owned;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "two processes never shared the 4 partitions: {owned:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let all: BTreeSet<i64> = owned.iter().flatten().copied().collect();
    assert_eq!(all, (0..4).collect::<BTreeSet<_>>(), "{owned:?}");
    let text = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["status", "pipeline.yaml"])
        .current_dir(dir.path())
        .output()
        .expect("vigil status");
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert_eq!(text.matches("live (renewed").count(), 2, "{text}");
    assert_eq!(text.matches("auth [").count(), 4, "{text}");

    // A process with another definition of the same pipeline refuses to
    // start, naming both fingerprints, and leaves the others alone.
    let mut other = vigil(
        dir.path(),
        &[
            "run",
            "other.yaml",
            "--http",
            "127.0.0.1:0",
            "--progress",
            "off",
            "--member",
            "c",
        ],
        "other.log",
    );
    let exit = wait_exit(&mut other, Duration::from_secs(60));
    let log = std::fs::read_to_string(dir.path().join("other.log")).expect("log");
    assert!(!exit.success(), "the other definition ran: {log}");
    assert!(log.contains("another definition"), "{log}");
    let ours = status(dir.path())["definition"]
        .as_str()
        .expect("definition")
        .to_string();
    assert!(log.contains(&ours), "{log}");
    assert_eq!(owners(&status(dir.path())).len(), 2);
    // So does a process under a member name a live process holds: it would
    // share that process's checkpoints.
    let mut twin = vigil(dir.path(), &with("a"), "twin.log");
    let exit = wait_exit(&mut twin, Duration::from_secs(60));
    let log = std::fs::read_to_string(dir.path().join("twin.log")).expect("log");
    assert!(
        !exit.success() && log.contains("member name \"a\" is held"),
        "{log}"
    );
    // Each process checkpoints in a directory of its own.
    for member in ["a", "b"] {
        let own = dir.path().join(format!(
            ".vigil/checkpoints/shared/members/{member}/checkpoints"
        ));
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        while !std::fs::read_dir(&own).is_ok_and(|mut d| d.next().is_some()) {
            assert!(
                tokio::time::Instant::now() < until,
                "no checkpoint in {}",
                own.display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(!dir
        .path()
        .join(".vigil/checkpoints/shared/checkpoints")
        .exists());

    // Together the two processes deliver every failure once.
    let got = read(
        &brokers,
        "failures",
        expected.len(),
        Duration::from_secs(90),
    )
    .await;
    let users: Vec<String> = got
        .iter()
        .map(|(_, v)| v["user"].as_str().expect("user").to_string())
        .collect();
    assert_eq!(
        users.iter().cloned().collect::<BTreeSet<_>>(),
        expected,
        "records lost"
    );
    let again = read(
        &brokers,
        "failures",
        expected.len() + 1,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(again.len(), expected.len(), "records doubled");

    // A clean stop removes each process's lease.
    for p in [&a, &b] {
        let ok = Command::new("kill")
            .args(["-TERM", &p.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    }
    for p in [&mut a, &mut b] {
        wait_exit(p, Duration::from_secs(60));
    }
    assert!(
        status(dir.path())["processes"]
            .as_array()
            .expect("processes")
            .is_empty(),
        "leases left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repartition_topic_is_created_once_and_a_wrong_partition_count_is_reported() {
    use vigil_connectors::kafka::repartition::{ensure_topic, topic_name};
    let Some(tansu) = start_tansu() else { return };
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &tansu.brokers);
    let topic = topic_name("shared", "per_user");
    assert_eq!(topic, "vigil-shared-per_user-repartition");
    ensure_topic(&config, "shared", &topic, 6)
        .await
        .expect("created");
    // A second process finds it as it should be.
    ensure_topic(&config, "shared", &topic, 6)
        .await
        .expect("found");
    // A definition that repartitions into another count is told, and the
    // topic is left as it is.
    let err = ensure_topic(&config, "shared", &topic, 8)
        .await
        .expect_err("wrong count");
    let msg = err.to_string();
    assert!(
        msg.contains("has 6 partitions") && msg.contains("expects 8") && msg.contains(&topic),
        "{msg}"
    );
    ensure_topic(&config, "shared", &topic, 6)
        .await
        .expect("still 6");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repartition_writer_sends_each_row_to_its_key_groups_partition_with_watermarks() {
    use std::collections::BTreeMap;

    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use vigil_connectors::kafka::repartition::{
        decode, ensure_topic, partition_of, RepartitionSinkFactory, KIND, PRODUCER, WATERMARK,
    };
    use vigil_connectors::kafka::Properties;
    use vigil_engine::key_group;

    let Some(tansu) = start_tansu() else { return };
    let brokers = tansu.brokers.clone();
    create_topics(&brokers, &[("auth", 2)]).await;
    produce(&brokers, 300, 2, |i| format!("u{}", i % 17), |_| "failure").await;
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &brokers);
    let topic = "vigil-rekey-per_user-repartition";
    ensure_topic(&config, "rekey", topic, 3)
        .await
        .expect("topic");
    let mut plan = vigil::pipeline::load_str(
        "rekey.yaml",
        &pipeline(&brokers, "failure").replace("name: shared", "name: rekey"),
        &crate::options_with(&[]),
    )
    .expect("valid");
    let writer = RepartitionSinkFactory::new(
        &brokers,
        Properties::default(),
        topic,
        vec!["user".into()],
        3,
    )
    .expect("writer");
    plan.graph
        .replace_sink("alerts", std::sync::Arc::new(writer))
        .expect("replace");
    let launched = crate::launch(&plan.graph, vigil_engine::RuntimeOptions::default());
    let metrics = launched.metrics.clone();
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    while metrics.node_totals("alerts").records_in < 300 {
        assert!(
            tokio::time::Instant::now() < until,
            "the writer did not take 300 rows"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Long enough for a watermark after the last rows.
    tokio::time::sleep(Duration::from_millis(600)).await;
    launched.finish().await;

    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "unused")
        .create()
        .expect("reader");
    let mut list = rdkafka::TopicPartitionList::new();
    for p in 0..3 {
        list.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .expect("partition");
    }
    reader.assign(&list).expect("assign");
    let mut rows_per_partition: BTreeMap<i32, usize> = BTreeMap::new();
    let mut watermarks: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    let mut finished: BTreeMap<i32, usize> = BTreeMap::new();
    let mut quiet = 0;
    while quiet < 30 {
        let Some(msg) = reader.poll(Duration::from_millis(100)) else {
            quiet += 1;
            continue;
        };
        quiet = 0;
        let msg = msg.expect("message");
        let header = |name: &str| {
            msg.headers().and_then(|h| {
                h.iter()
                    .find(|x| x.key == name)
                    .and_then(|x| x.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
        };
        match header(KIND).as_deref() {
            Some("data") => {
                for b in decode(msg.payload().expect("payload"), "test").expect("decode") {
                    let keys = [b.column(b.schema().index_of("user").expect("user")).clone()];
                    for g in key_group::groups(&keys, b.num_rows()).expect("groups") {
                        assert_eq!(
                            partition_of(g, 3),
                            msg.partition(),
                            "a row in the wrong partition"
                        );
                    }
                    assert!(b.schema().index_of("kafka_offset").is_ok(), "origin kept");
                    *rows_per_partition.entry(msg.partition()).or_default() += b.num_rows();
                }
            }
            Some("watermark") => {
                assert!(header(PRODUCER).is_some_and(|p| p.ends_with("/alerts/0")));
                let w: i64 = header(WATERMARK).expect("watermark").parse().expect("ms");
                watermarks.entry(msg.partition()).or_default().push(w);
            }
            Some("finished") => *finished.entry(msg.partition()).or_default() += 1,
            other => panic!("a record of kind {other:?}"),
        }
    }
    assert_eq!(
        rows_per_partition.values().sum::<usize>(),
        300,
        "{rows_per_partition:?}"
    );
    assert_eq!(
        rows_per_partition.len(),
        3,
        "17 users over 3 partitions: {rows_per_partition:?}"
    );
    for p in 0..3 {
        let w = watermarks.get(&p).expect("watermarks on every partition");
        assert!(
            w.windows(2).all(|x| x[0] < x[1]),
            "watermarks only go up: {w:?}"
        );
        // The last one is the source's final watermark (its slower
        // partition's last event, 298 s, minus the 5 s disorder), even if
        // the rate limit held it back when it came.
        assert_eq!(w.last(), Some(&(1_767_225_600_000 + 293_000)), "{w:?}");
    }
    // A stop is not an end of input: the writer's input partitions go on
    // with their next owner, and readers let it go when it turns idle.
    assert!(finished.is_empty(), "a stopped writer said it had finished");
}

/// The `auth` source of the three-process tests' pipelines: logins over
/// a topic not divided by user.
fn auth_source(brokers: &str) -> String {
    // No line continuation: it would eat the first line's indent.
    format!(
        "  auth:
    type: kafka
    brokers: {brokers}
    topics: [auth]
    properties: {{ session.timeout.ms: \"6000\" }}
    watermark: {{ out_of_orderness: 30s }}
    schema:
      fields:
        - {{ name: ts, type: timestamp }}
        - {{ name: user, type: string }}
      event_time: {{ field: ts, format: epoch_ms }}
"
    )
}

/// A pipeline counting logins per user and minute over `auth`, whose
/// partitions are not divided by user; with `scale_out`, the count reads
/// its rows through a repartition topic keyed by user.
///
/// The tests send 15 minutes of event time in a few seconds, so a
/// partition that moves between processes comes with minutes of event
/// time unread. The sources allow only 30 s out of order: the bounds the
/// writers announce per input partition, and readers waiting for every
/// input partition at start, keep those rows from being late at their new
/// owner (docs/scale-out.md, "Watermarks across the topic").
fn counting(brokers: &str, name: &str, scale_out: bool) -> String {
    let scale = if scale_out {
        "scale_out: { partitions: 6 }\n"
    } else {
        ""
    };
    format!(
        "\
name: {name}
{scale}sources:
{auth}transforms:
  per_user:
    type: sql
    query: \"SELECT window_start, user, count(*) AS logins FROM auth GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE), user\"
sinks:
  counts:
    type: file
    input: per_user
    path: counts.ndjson
  per_minute:
    type: read_model
    input: per_user
    tenant: user
    key: window_start
",
        auth = auth_source(brokers)
    )
}

/// A pipeline joining logins with alerts on the same user that come at
/// most 30 s after the login; neither topic is divided by user, so with
/// `scale_out` both inputs of the join go through one repartition topic.
fn joining(brokers: &str, name: &str, scale_out: bool) -> String {
    let scale = if scale_out {
        "scale_out: { partitions: 6 }\n"
    } else {
        ""
    };
    format!(
        "\
name: {name}
{scale}sources:
{auth}  alerts:
    type: kafka
    brokers: {brokers}
    topics: [alerts]
    properties: {{ session.timeout.ms: \"6000\" }}
    watermark: {{ out_of_orderness: 30s }}
    schema:
      fields:
        - {{ name: ts, type: timestamp }}
        - {{ name: user, type: string }}
        - {{ name: rule, type: string }}
      event_time: {{ field: ts, format: epoch_ms }}
transforms:
  pairs:
    type: sql
    query: \"SELECT a.user, a.ts AS login_ts, b.ts AS alert_ts, b.rule FROM auth a JOIN alerts b ON a.user = b.user AND b.ts BETWEEN a.ts AND a.ts + INTERVAL '30' SECOND\"
sinks:
  pairs_out:
    type: file
    input: pairs
    path: pairs.ndjson
",
        auth = auth_source(brokers)
    )
}

/// The user of login `i`, and of alert `j`.
fn login_user(i: i64) -> i64 {
    (i * 7) % 12
}
fn alert_user(j: i64) -> i64 {
    (j * 5) % 12
}

/// Alerts `from..to`, one every 10 s of event time (3 s into it), over
/// the 2 partitions of `alerts`.
async fn alerts(brokers: &str, from: i64, to: i64) {
    let producer = producer(brokers);
    for j in from..to {
        let value = format!(
            r#"{{"ts":{},"user":"u{}","rule":"r{}"}}"#,
            1_767_225_600_000 + j * 10_000 + 3_000,
            alert_user(j),
            j % 3
        );
        producer
            .send(
                FutureRecord::<(), _>::to("alerts")
                    .partition((j % 2) as i32)
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .expect("delivered");
    }
}

/// Pairs of the first `n` logins and their alerts: an alert at `t` pairs
/// with the same user's logins in `[t - 30 s, t]`.
fn expected_pairs(n: i64) -> i64 {
    (0..n / 10)
        .map(|j| {
            let t = j * 10 + 3;
            (0..n)
                .filter(|&i| login_user(i) == alert_user(j) && i <= t && t - i <= 30)
                .count() as i64
        })
        .sum()
}

/// Logins `from..to` (one a second of event time) spread over the 4
/// partitions of `auth` regardless of user, 12 users.
async fn logins(brokers: &str, from: i64, to: i64) {
    let producer = producer(brokers);
    for i in from..to {
        let value = format!(
            r#"{{"ts":{},"user":"u{}"}}"#,
            1_767_225_600_000 + i * 1000,
            login_user(i)
        );
        producer
            .send(
                FutureRecord::<(), _>::to("auth")
                    .partition((i % 4) as i32)
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .expect("delivered");
    }
}

/// One record per partition of `topics` far ahead of the rest, so every
/// window of the input closes (its user pairs with no one).
async fn close_windows(brokers: &str, topics: &[(&str, i32)]) {
    let producer = producer(brokers);
    for (topic, partitions) in topics {
        for p in 0..*partitions {
            let value = format!(
                r#"{{"ts":{},"user":"end-{topic}","rule":"end"}}"#,
                1_767_225_600_000_i64 + 3_600_000
            );
            producer
                .send(
                    FutureRecord::<(), _>::to(topic)
                        .partition(p)
                        .payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .expect("delivered");
        }
    }
}

/// What a three-process test runs: a pipeline, its input and its output.
#[derive(Clone, Copy)]
enum Scenario {
    /// Logins counted per user and minute ([`counting`]).
    Window,
    /// Logins joined with alerts on the same user within 30 s ([`joining`]).
    Join,
}

impl Scenario {
    fn topics(self) -> &'static [(&'static str, i32)] {
        match self {
            Scenario::Window => &[("auth", 4)],
            Scenario::Join => &[("auth", 4), ("alerts", 2)],
        }
    }

    fn pipeline(self, brokers: &str, name: &str, scale_out: bool) -> String {
        match self {
            Scenario::Window => counting(brokers, name, scale_out),
            Scenario::Join => joining(brokers, name, scale_out),
        }
    }

    /// The output file each process writes.
    fn output(self) -> &'static str {
        match self {
            Scenario::Window => "counts.ndjson",
            Scenario::Join => "pairs.ndjson",
        }
    }

    /// Sends logins `from..to` and, for a join, the alerts of their time.
    async fn input(self, brokers: &str, from: i64, to: i64) {
        logins(brokers, from, to).await;
        if let Scenario::Join = self {
            alerts(brokers, from / 10, to / 10).await;
        }
    }

    /// What `rows` amount to: logins counted, or pairs found.
    fn total(self, rows: &[String]) -> i64 {
        match self {
            Scenario::Window => logins_in(rows),
            Scenario::Join => rows.len() as i64,
        }
    }
}

/// The committed rows of the output files in `dirs`, sorted.
fn counted(scenario: Scenario, dirs: &[&Path]) -> Vec<String> {
    let mut rows: Vec<String> = dirs
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join(scenario.output())).ok())
        .flat_map(|t| t.lines().map(str::to_string).collect::<Vec<_>>())
        .collect();
    rows.sort();
    rows
}

fn logins_in(rows: &[String]) -> i64 {
    rows.iter()
        .map(|r| {
            serde_json::from_str::<serde_json::Value>(r).expect("a JSON row")["logins"]
                .as_i64()
                .expect("logins")
        })
        .sum()
}

/// Waits until the rows in `dirs` amount to `total`, then a little
/// longer, so rows written twice would show.
async fn wait_for_total(
    scenario: Scenario,
    dirs: &[&Path],
    total: i64,
    within: Duration,
) -> Vec<String> {
    let until = tokio::time::Instant::now() + within;
    loop {
        let rows = counted(scenario, dirs);
        if scenario.total(&rows) >= total {
            tokio::time::sleep(Duration::from_secs(4)).await;
            return counted(scenario, dirs);
        }
        if tokio::time::Instant::now() >= until {
            for d in dirs {
                keep_metrics(d).await;
            }
            panic!(
                "only {} of {total} counted within {within:?} (each process's metrics are beside its log)",
                scenario.total(&rows)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The highest checkpoint id under `dir` (0 if none).
fn latest_checkpoint(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("chk-")?.parse().ok())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// The HTTP address a process logged in `log`, the last if it logged
/// several.
fn http_address(log: &Path) -> Option<std::net::SocketAddr> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .filter_map(|l| l.split("HTTP API on http://").nth(1))
        .filter_map(|rest| rest.split('/').next()?.parse().ok())
        .next()
}

/// The `per_minute` read model as the process logging to `log` serves
/// it: per user (its tenant), the rows in key order.
async fn read_model(log: &Path) -> Vec<(String, Vec<serde_json::Value>)> {
    let addr = http_address(log).expect("a process with an HTTP address");
    let mut model = Vec::new();
    for user in (0..12).map(|u| format!("u{u}")) {
        let (status, body) =
            crate::incidents::get(addr, "/v1/read-models/per_minute?limit=1000", Some(&user)).await;
        assert_eq!(status, 200, "{}: {body}", log.display());
        let page: serde_json::Value = serde_json::from_str(&body).expect("a JSON page");
        let items = page["items"].as_array().cloned().unwrap_or_default();
        model.push((user, items));
    }
    model
}

/// Waits until every process logging to `logs` serves the read model the
/// one logging to `reference` does, which must hold `windows` rows.
async fn same_read_model(logs: &[std::path::PathBuf], reference: &Path, windows: usize) {
    let expected = read_model(reference).await;
    let rows: usize = expected.iter().map(|(_, items)| items.len()).sum();
    assert_eq!(rows, windows, "the single process's read model");
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    for log in logs {
        loop {
            let got = read_model(log).await;
            if got == expected {
                break;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "{} serves another read model than the single process:\n{got:?}\nnot\n{expected:?}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// Writes the metrics of the processes still running in `dir` beside
/// their logs (`<log>.metrics`), for a look after a failure.
async fn keep_metrics(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for log in entries.flatten().map(|e| e.path()) {
        if log.extension().is_none_or(|e| e != "log") {
            continue;
        }
        let Some(addr) = http_address(&log) else {
            continue;
        };
        let got =
            tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
                .await;
        if matches!(got, Ok(Ok(_))) {
            let (_, body) = crate::incidents::get(addr, "/metrics", None).await;
            let _ = std::fs::write(log.with_extension("metrics"), body);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_count_a_rekeyed_window_as_one_does_even_when_one_is_killed() {
    three_processes_as_one(Scenario::Window, 900).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_join_rekeyed_streams_as_one_does_even_when_one_is_killed() {
    three_processes_as_one(Scenario::Join, expected_pairs(900)).await;
}

/// Runs `scenario` in three processes sharing tansu and a checkpoint
/// storage, kills one with SIGKILL in the middle of the input and starts
/// its successor later; then runs the same input in one process. The
/// committed output must amount to `total` in both and be identical.
async fn three_processes_as_one(scenario: Scenario, total: i64) {
    const PHASE: i64 = 300;
    let Some(tansu) = start_tansu() else { return };
    let brokers = tansu.brokers.clone();
    create_topics(&brokers, scenario.topics()).await;
    let tmp = tempfile::tempdir().expect("dir");
    let root = tmp.path().to_path_buf();
    if let Ok(keep) = std::env::var("VIGIL_KEEP_TEST_DIR") {
        // Kept for a look at the processes' logs after a failure.
        let _ = std::fs::write(keep, root.display().to_string());
        std::mem::forget(tmp);
    }
    let shared = root.join("checkpoints");
    let dirs: Vec<std::path::PathBuf> = ["a", "b", "c", "solo"]
        .iter()
        .map(|m| root.join(m))
        .collect();
    for (d, scale) in dirs.iter().zip([true, true, true, false]) {
        std::fs::create_dir_all(d).expect("dir");
        let name = if scale { "rekeyed" } else { "solo" };
        std::fs::write(
            d.join("pipeline.yaml"),
            scenario.pipeline(&brokers, name, scale),
        )
        .expect("write");
    }
    let start = |i: usize, log: &str| {
        let member = ["a", "b", "c", "solo"][i];
        vigil(
            &dirs[i],
            &[
                "run",
                "pipeline.yaml",
                "--checkpoints",
                shared.to_str().expect("path"),
                "--member",
                member,
                "--http",
                "127.0.0.1:0",
                "--progress",
                "off",
                "--checkpoint-interval",
                "1s",
            ],
            log,
        )
    };
    let explain = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["explain", "pipeline.yaml"])
        .current_dir(&dirs[0])
        .output()
        .expect("vigil explain");
    let explain = String::from_utf8_lossy(&explain.stdout).into_owned();
    let shown = match scenario {
        Scenario::Window => {
            explain.contains(
                "repartition by user into vigil-rekeyed-per_user-repartition (6 partitions)",
            ) && explain.contains("<- per_user/rekey-in")
        }
        Scenario::Join => {
            explain.contains("into vigil-rekeyed-pairs-repartition (6 partitions), second input")
                && explain.contains("<- pairs/rekey-in [")
                && explain.contains("<- pairs/rekey-in.second_input")
        }
    };
    assert!(shown, "{explain}");

    let a = start(0, "a.log");
    let mut b = start(1, "b1.log");
    let c = start(2, "c.log");
    // The single process, the reference, reads the same input as it comes
    // (a group of its own). Started after the input, its two join sources
    // would race: the one assigned first reads everything, the other is
    // idle until assigned, and its rows would come behind the watermark.
    let solo = start(3, "solo.log");
    scenario.input(&brokers, 0, PHASE).await;
    let three: Vec<&Path> = dirs[..3].iter().map(|d| d.as_path()).collect();
    // The first phase is read, and b has checkpointed state of its own.
    let until = tokio::time::Instant::now() + Duration::from_secs(120);
    let b_checkpoints = shared.join("rekeyed/members/b/checkpoints");
    while latest_checkpoint(&b_checkpoints) < 8 {
        assert!(
            tokio::time::Instant::now() < until,
            "b stored no checkpoints in {}",
            b_checkpoints.display()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // One process dies without a word, in the middle of the input.
    b.0.kill().expect("SIGKILL");
    b.0.wait().expect("reaped");
    scenario.input(&brokers, PHASE, 2 * PHASE).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    // Its successor (same member name, same disk) starts later.
    let b2 = start(1, "b2.log");
    scenario.input(&brokers, 2 * PHASE, 3 * PHASE).await;
    close_windows(&brokers, scenario.topics()).await;
    let rekeyed = wait_for_total(scenario, &three, total, Duration::from_secs(150)).await;
    let single = wait_for_total(scenario, &[&dirs[3]], total, Duration::from_secs(120)).await;
    assert_eq!(scenario.total(&single), total);
    assert_eq!(
        rekeyed, single,
        "three processes (one killed and replaced) counted otherwise than one"
    );
    if let Scenario::Window = scenario {
        // Every process answers for every key, as the single one does,
        // though each wrote only the windows of its own key groups and b's
        // moved twice.
        let logs = [
            dirs[0].join("a.log"),
            dirs[1].join("b2.log"),
            dirs[2].join("c.log"),
        ];
        same_read_model(&logs, &dirs[3].join("solo.log"), single.len()).await;
    }
    drop((a, b2, c, solo));
}
