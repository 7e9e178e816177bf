//! Correlation across streams and stages: the shipped account-takeover
//! pipeline on the generator's injected kill chain, interval joins in SQL,
//! and lookup joins against a CSV file and a compacted Kafka topic.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, AsArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, TimestampMillisecondType};
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use vigil::pipeline::{load, load_str};
use vigil_connectors::generator::AttackKind;
use vigil_connectors::lookup::TableConfig;
use vigil_engine::{Collector, ManualClock, Operator, TaskContext};
use vigil_operators::join::{LookupJoinFactory, LookupSpec, MatchMode};

use crate::{options_with, run_to_end};

fn text(b: &RecordBatch, col: &str, row: usize) -> String {
    let a = b
        .column_by_name(col)
        .unwrap_or_else(|| panic!("no column {col}"));
    let a = arrow::compute::cast(a, &DataType::Utf8).expect("as text");
    a.as_string::<i32>().value(row).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_account_takeover_pipeline_finds_exactly_the_injected_chain() {
    let options = options_with(&[("VIGIL_ATO_START", "2026-01-01T00:00:00Z")]);
    let mut plan = load(
        std::path::Path::new("pipelines/account-takeover.yaml"),
        &options,
    )
    .expect("the shipped pipeline is valid");
    let alerts = plan.capture("alerts").expect("alerts sink");
    let truth = plan.generators["auth"].ground_truth(i64::MAX);
    let kinds: BTreeSet<AttackKind> = truth.iter().map(|a| a.kind).collect();
    assert_eq!(
        kinds.len(),
        4,
        "a spray, a brute force, lateral movement and the chain: {truth:#?}"
    );
    let summary = tokio::time::timeout(Duration::from_secs(300), run_to_end(&plan))
        .await
        .expect("finishes in time");
    assert_eq!(summary.dead_letters, 0);
    assert_eq!(summary.late, 0, "no stage sees the one before it as late");

    let chain = truth
        .iter()
        .find(|a| a.kind == AttackKind::AccountTakeover)
        .expect("the chain was injected");
    let mut found = Vec::new();
    for b in alerts.lock().iter() {
        let first = b
            .column_by_name("first_ts")
            .expect("first_ts")
            .as_primitive::<TimestampMillisecondType>();
        let last = b
            .column_by_name("last_ts")
            .expect("last_ts")
            .as_primitive::<TimestampMillisecondType>();
        for r in 0..b.num_rows() {
            found.push((
                text(b, "tenant_id", r),
                text(b, "user", r),
                first.value(r),
                last.value(r),
            ));
        }
    }
    assert_eq!(found.len(), 1, "exactly one account takeover: {found:?}");
    let (tenant, user, first, last) = &found[0];
    assert_eq!(tenant, &chain.tenant);
    assert_eq!(Some(user), chain.user.as_ref());
    assert!(
        *first >= chain.start_ms && *last <= chain.end_ms,
        "the alert spans the chain: [{first}, {last}] in [{}, {}]",
        chain.start_ms,
        chain.end_ms
    );
}

/// A generator of authentication events with a brute force and a spray.
fn auth_source(count: usize) -> String {
    format!(
        r#"
  auth:
    type: generator
    stream: auth
    seed: 5
    partitions: 2
    event_rate: 2000
    count: {count}
    start_time: 2026-01-01T00:00:00Z
    out_of_orderness: 1s
    attacks:
      - {{ kind: brute_force, at: 20s }}
      - {{ kind: password_spray, at: 60s }}
    watermark: {{ out_of_orderness: 1s, idle_timeout: 30s }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csv_intel_list_of_cidr_blocks_finds_the_attackers_logins() {
    // The attackers' addresses, from the generator's ground truth, as /24
    // blocks in a CSV file; the lookup keeps exactly their events.
    let probe = format!(
        "name: probe\nsources:{}sinks:\n  out: {{ type: null, input: auth }}\n",
        auth_source(300_000)
    );
    let plan = load_str("probe.yaml", &probe, &options_with(&[])).expect("probe");
    let truth = plan.generators["auth"].ground_truth(i64::MAX);
    assert_eq!(truth.len(), 2, "{truth:#?}");
    let dir = tempfile::tempdir().expect("dir");
    let csv = dir.path().join("intel.csv");
    let mut lines = vec!["network,severity".to_string()];
    for a in &truth {
        let (net, _) = a.src_ip.rsplit_once('.').expect("v4");
        lines.push(format!("{net}.0/24,high"));
    }
    std::fs::write(&csv, lines.join("\n") + "\n").expect("write intel");
    let yaml = format!(
        r#"
name: intel
sources:{}
transforms:
  hits:
    type: lookup
    input: auth
    on: src_ip
    match: cidr
    how: inner
    prefix: intel_
    table: {{ type: file, path: {}, key: network }}
sinks:
  out: {{ type: null, input: hits }}
"#,
        auth_source(300_000),
        csv.display()
    );
    let mut plan = load_str("intel.yaml", &yaml, &options_with(&[])).expect("valid");
    let out = plan.capture("out").expect("sink");
    tokio::time::timeout(Duration::from_secs(120), run_to_end(&plan))
        .await
        .expect("finishes in time");
    let mut rows = 0;
    let attackers: BTreeSet<&str> = truth.iter().map(|a| a.src_ip.as_str()).collect();
    for b in out.lock().iter() {
        for r in 0..b.num_rows() {
            assert!(attackers.contains(text(b, "src_ip", r).as_str()));
            assert_eq!(text(b, "intel_severity", r), "high");
            rows += 1;
        }
    }
    // The brute force's 40 failures and its success; the spray's 25 users.
    assert_eq!(rows, 41 + 25);

    // A table that does not parse stops the pipeline before it starts, and
    // says where.
    std::fs::write(&csv, "network,severity\n10.0.0.0/8,high,extra\n").expect("write");
    let Err(e) = load_str("intel.yaml", &yaml, &options_with(&[])) else {
        panic!("a malformed table is rejected");
    };
    let message = e.to_string();
    assert!(
        message.contains("intel.yaml:") && message.contains("intel.csv"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_topic_table_follows_upserts_and_tombstones() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let brokers = cluster.bootstrap_servers();
    cluster.create_topic("intel", 2, 1).expect("topic");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("producer");
    let send = |key: &'static str, value: Option<&'static str>| {
        let producer = producer.clone();
        async move {
            let mut record = FutureRecord::<str, str>::to("intel").key(key);
            if let Some(v) = value {
                record = record.payload(v);
            }
            producer
                .send(record, Duration::from_secs(10))
                .await
                .expect("delivered");
        }
    };
    send("a", Some(r#"{"ip":"198.51.100.7","label":"c2"}"#)).await;
    send("b", Some(r#"{"ip":"198.51.100.8","label":"scanner"}"#)).await;
    send("a", Some(r#"{"ip":"198.51.100.7","label":"c2-confirmed"}"#)).await;
    send("b", None).await;
    // Deleted, then set again: set (messages apply in order).
    send("d", Some(r#"{"ip":"198.51.100.10","label":"old"}"#)).await;
    send("d", None).await;
    send("d", Some(r#"{"ip":"198.51.100.10","label":"again"}"#)).await;

    let table: TableConfig = serde_json::from_value(serde_json::json!({
        "type": "kafka",
        "brokers": brokers,
        "topic": "intel",
        "key": "ip",
        "fields": [{"name": "ip", "type": "string"}, {"name": "label", "type": "string"}],
        "bootstrap_timeout": "20s",
    }))
    .expect("config");
    let stream = Arc::new(Schema::new(vec![Field::new(
        "dst_ip",
        DataType::Utf8,
        false,
    )]));
    let feed = table.open("intel").expect("feed");
    let spec = LookupSpec::new(
        "intel",
        stream.clone(),
        "dst_ip",
        MatchMode::Exact,
        false,
        feed.schema(),
        "ip",
        "intel_",
        false,
    )
    .expect("spec");
    let factory = LookupJoinFactory::new(spec, feed);
    let clock = ManualClock::new(0);
    let mut ctx = TaskContext::detached("intel", 0, 1, 0);
    ctx.clock = clock.clone();
    // The first subtask reads the topic to its end before any row.
    let mut join = tokio::task::block_in_place(|| factory.build(&ctx)).expect("join");
    let batch = RecordBatch::try_new(
        stream,
        vec![Arc::new(StringArray::from(vec![
            "198.51.100.7",
            "198.51.100.8",
            "198.51.100.9",
            "198.51.100.10",
        ]))],
    )
    .expect("batch");
    let labels = |join: &mut vigil_operators::join::LookupJoin| {
        let mut out = Collector::new();
        join.process_batch(0, batch.clone(), &mut out)
            .expect("batch");
        let b = &out.take_main()[0];
        let l = b
            .column_by_name("intel_label")
            .expect("label")
            .as_string::<i32>();
        (0..l.len())
            .map(|i| l.is_valid(i).then(|| l.value(i).to_string()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        labels(&mut join),
        vec![
            Some("c2-confirmed".into()),
            None,
            None,
            Some("again".into())
        ],
        "latest value per key; the tombstone removed b"
    );
    // A new indicator applies to rows processed after it arrives.
    send("c", Some(r#"{"ip":"198.51.100.9","label":"new"}"#)).await;
    send("x", Some("not json")).await; // skipped with a warning, not fatal
    send("a", None).await;
    let mut got = Vec::new();
    for _ in 0..300 {
        clock.advance(1_000);
        got = labels(&mut join);
        if got == vec![None, None, Some("new".into()), Some("again".into())] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        got,
        vec![None, None, Some("new".into()), Some("again".into())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_joins_keep_tenants_apart_unless_the_step_is_cross_tenant() {
    let dir = tempfile::tempdir().expect("dir");
    let write = |name: &str, rows: &[(i64, &str, &str)]| {
        let text: String = rows
            .iter()
            .map(|(ts, t, u)| format!("{{\"ts\":{ts},\"tenant_id\":\"{t}\",\"user\":\"{u}\"}}\n"))
            .collect();
        std::fs::write(dir.path().join(name), text).expect("write");
    };
    write(
        "logins.ndjson",
        &[(1_000, "acme", "alice"), (2_000, "globex", "alice")],
    );
    write(
        "procs.ndjson",
        &[(3_000, "acme", "alice"), (4_000, "initech", "alice")],
    );
    let source = |name: &str| {
        format!(
            "  {name}:\n    type: file\n    path: {}\n    schema:\n      fields:\n        - {{ name: ts, type: timestamp }}\n        - {{ name: tenant_id, type: string }}\n        - {{ name: user, type: string }}\n      event_time: {{ field: ts, format: epoch_ms }}\n",
            dir.path().join(format!("{name}.ndjson")).display()
        )
    };
    let pipeline = |cross: bool| {
        format!(
            "name: tenants\nsources:\n{}{}transforms:\n  j:\n    type: sql\n    cross_tenant: {cross}\n    query: >-\n      SELECT l.tenant_id, p.tenant_id AS p_tenant, l.user FROM logins l JOIN procs p\n      ON l.user = p.user AND p.ts BETWEEN l.ts AND l.ts + INTERVAL '10' SECOND\nsinks:\n  out: {{ type: null, input: j }}\n",
            source("logins"),
            source("procs")
        )
    };
    let pairs = |cross: bool| async move {
        let mut plan =
            load_str("tenants.yaml", &pipeline(cross), &options_with(&[])).expect("valid");
        let out = plan.capture("out").expect("sink");
        tokio::time::timeout(Duration::from_secs(60), run_to_end(&plan))
            .await
            .expect("in time");
        let mut got: Vec<String> = Vec::new();
        for b in out.lock().iter() {
            for r in 0..b.num_rows() {
                got.push(format!(
                    "{}>{}",
                    text(b, "tenant_id", r),
                    text(b, "p_tenant", r)
                ));
            }
        }
        got.sort();
        got
    };
    assert_eq!(pairs(false).await, vec!["acme>acme"]);
    assert_eq!(
        pairs(true).await,
        vec!["acme>acme", "acme>initech", "globex>acme", "globex>initech"]
    );
}
