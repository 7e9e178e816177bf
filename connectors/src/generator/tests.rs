//! Tests of the generator: determinism across parallelism, ground truth, restore.

use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{Int32Type, TimestampMillisecondType};
use vigil_engine::{SourceEvent, SourceFactory, TaskContext};

use super::*;

const START: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

fn config(stream: Stream) -> GeneratorConfig {
    let mut c = GeneratorConfig::new(stream);
    c.count = Some(20_000);
    c.event_rate = Some(100);
    c.batch_size = 1000;
    c.start_time = Some("2026-01-01T00:00:00Z".into());
    c.attacks = vec![
        AttackConfig {
            kind: AttackKind::BruteForce,
            at: std::time::Duration::from_secs(10),
            every: Some(std::time::Duration::from_secs(60)),
            attempts: None,
            over: None,
        },
        AttackConfig {
            kind: AttackKind::LateralMovement,
            at: std::time::Duration::from_secs(30),
            every: None,
            attempts: None,
            over: None,
        },
    ];
    c
}

fn ctx(subtask: usize, parallelism: usize) -> TaskContext {
    TaskContext::detached("gen", subtask, parallelism, START)
}

async fn drain(f: &GeneratorSourceFactory, parallelism: usize) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    for s in 0..parallelism {
        let mut src = f.create(&ctx(s, parallelism)).expect("create");
        let mut ended = 0;
        while ended < src.partitions() {
            match src.next().await.expect("next") {
                SourceEvent::Data { batch, .. } => out.push(batch),
                SourceEvent::PartitionEnd(_) => ended += 1,
                _ => {}
            }
        }
    }
    out
}

fn ids(batches: &[RecordBatch]) -> Vec<u64> {
    let mut v: Vec<u64> = batches
        .iter()
        .flat_map(|b| {
            b.column(0)
                .as_primitive::<arrow::datatypes::UInt64Type>()
                .values()
                .to_vec()
        })
        .collect();
    v.sort_unstable();
    v
}

#[tokio::test]
async fn same_seed_same_events_whatever_the_parallelism() {
    let f = GeneratorSourceFactory::new(config(Stream::Auth), 0).expect("factory");
    let one = drain(&f, 1).await;
    let three = drain(&f, 3).await;
    let a = ids(&one);
    assert_eq!(a, ids(&three));
    let truth = f.ground_truth(i64::MAX);
    // 20000 events at 100/s = 200 s: brute force at 10s, 70s, 130s (190s ends at 220s > 200s), lateral at 30s
    assert_eq!(truth.len(), 4, "{truth:#?}");
    let attack_rows = 3 * 41 + 12;
    assert_eq!(a.len(), 20_000 + attack_rows);
    a.windows(2)
        .for_each(|w| assert!(w[0] < w[1], "ids are unique"));
}

#[tokio::test]
async fn event_times_stay_within_the_declared_disorder() {
    let f = GeneratorSourceFactory::new(config(Stream::Network), 0).expect("factory");
    let batches = drain(&f, 1).await;
    for b in &batches {
        let ts = b.column(1).as_primitive::<TimestampMillisecondType>();
        for t in ts.values() {
            assert!(*t >= START - 2000 && *t <= START + 200_000, "{t}");
        }
    }
}

#[tokio::test]
async fn injected_brute_force_is_in_the_stream_as_the_ground_truth_says() {
    let f = GeneratorSourceFactory::new(config(Stream::Auth), 0).expect("factory");
    let batches = drain(&f, 2).await;
    let truth = f.ground_truth(i64::MAX);
    let bf = truth
        .iter()
        .find(|a| a.kind == AttackKind::BruteForce)
        .expect("a brute force");
    let mut failures = 0;
    for b in &batches {
        let ip = b.column(4).as_dictionary::<Int32Type>();
        let ip_values = ip.values().as_string::<i32>();
        let outcome = b.column(7).as_dictionary::<Int32Type>();
        let outcome_values = outcome.values().as_string::<i32>();
        let ts = b.column(1).as_primitive::<TimestampMillisecondType>();
        for r in 0..b.num_rows() {
            if ip_values.value(ip.keys().value(r) as usize) == bf.src_ip
                && outcome_values.value(outcome.keys().value(r) as usize) == "failure"
                && (bf.start_ms..=bf.end_ms).contains(&ts.value(r))
            {
                failures += 1;
            }
        }
    }
    assert_eq!(failures, 40);
}

#[tokio::test]
async fn restore_resumes_exactly_where_the_snapshot_was_taken() {
    let f = GeneratorSourceFactory::new(config(Stream::Auth), 0).expect("factory");
    let all = ids(&drain(&f, 1).await);
    let mut src = f.create(&ctx(0, 1)).expect("create");
    let mut before = Vec::new();
    for _ in 0..7 {
        if let SourceEvent::Data { batch, .. } = src.next().await.expect("next") {
            before.push(batch);
        }
    }
    let state = src.snapshot(1).expect("snapshot");
    let mut resumed = f.create(&ctx(0, 1)).expect("create");
    resumed.restore(state).expect("restore");
    let mut ended = 0;
    while ended < resumed.partitions() {
        match resumed.next().await.expect("next") {
            SourceEvent::Data { batch, .. } => before.push(batch),
            SourceEvent::PartitionEnd(_) => ended += 1,
            _ => {}
        }
    }
    assert_eq!(ids(&before), all);
}

#[test]
fn bad_configs_are_rejected_with_the_field() {
    let mut c = config(Stream::Auth);
    c.partitions = 0;
    let e = GeneratorSourceFactory::new(c, 0).expect_err("zero partitions");
    assert!(
        matches!(e, crate::ConnectorError::Config(ref c) if c.field == "partitions"),
        "{e}"
    );
    let mut c = config(Stream::Auth);
    c.start_time = Some("yesterday".into());
    assert!(GeneratorSourceFactory::new(c, 0).is_err());
    let _unused: Arc<()> = Arc::new(());
}
