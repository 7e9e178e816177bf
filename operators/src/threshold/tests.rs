//! Tests of the threshold operator: window closing, distinct counts, late rows, snapshots.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::util::pretty::pretty_format_batches;
use vigil_engine::{Collector, Operator, OperatorFactory, TaskContext, LATE};

use super::*;

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new("tenant_id", DataType::Utf8, false),
        Field::new("src_ip", DataType::Utf8, false),
        Field::new("user", DataType::Utf8, false),
    ]))
}

fn rows(data: &[(i64, &str, &str, &str)]) -> RecordBatch {
    let cols: Vec<ArrayRef> = vec![
        Arc::new(
            TimestampMillisecondArray::from(data.iter().map(|r| r.0).collect::<Vec<_>>())
                .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from(
            data.iter().map(|r| r.1).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            data.iter().map(|r| r.2).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            data.iter().map(|r| r.3).collect::<Vec<_>>(),
        )),
    ];
    RecordBatch::try_new(schema(), cols).expect("batch")
}

fn ctx() -> TaskContext {
    TaskContext::detached("t", 0, 1, 0)
}

fn brute_force() -> ThresholdConfig {
    ThresholdConfig {
        key: vec!["tenant_id".into(), "src_ip".into()],
        window: Duration::from_secs(60),
        min_count: Some(3),
        distinct: None,
        min_distinct: None,
        time: None,
        rule: None,
    }
}

fn spray() -> ThresholdConfig {
    ThresholdConfig {
        min_count: None,
        distinct: Some("user".into()),
        min_distinct: Some(3),
        ..brute_force()
    }
}

fn op(cfg: &ThresholdConfig) -> Box<dyn Operator> {
    ThresholdFactory::new("bf", cfg, schema(), Some("ts"))
        .expect("factory")
        .create(&ctx())
        .expect("operator")
}

fn feed(op: &mut dyn Operator, batch: RecordBatch, size: usize, out: &mut Collector) {
    let mut at = 0;
    while at < batch.num_rows() {
        let n = size.min(batch.num_rows() - at);
        op.process_batch(0, batch.slice(at, n), out)
            .expect("process");
        at += n;
    }
}

fn table(batches: Vec<RecordBatch>) -> String {
    pretty_format_batches(&batches).expect("format").to_string()
}

const EVENTS: &[(i64, &str, &str, &str)] = &[
    (1_000, "acme", "203.0.113.9", "alice"),
    (59_999, "acme", "203.0.113.9", "bob"),
    (2_000, "globex", "203.0.113.9", "alice"), // other tenant: never mixed in
    (30_000, "acme", "203.0.113.9", "alice"),
    (61_000, "acme", "203.0.113.9", "carol"), // next window
    (5_000, "acme", "10.0.0.1", "dave"),
    (20_000, "acme", "203.0.113.9", "erin"),
];

#[test]
fn nothing_before_the_watermark_passes_the_window_then_exactly_the_alert() {
    for size in [1, 2, 16] {
        let mut op = op(&brute_force());
        let mut out = Collector::new();
        feed(op.as_mut(), rows(EVENTS), size, &mut out);
        op.on_watermark(59_999, &mut out).expect("watermark");
        assert!(
            out.is_empty(),
            "window [0, 60s) still open at 59.999s (batch size {size})"
        );
        op.on_watermark(60_000, &mut out).expect("watermark");
        let expected = [
            "+------+----------------------+----------------------+-----------+-------------+-------------+----------------------+--------------------------+",
            "| rule | window_start         | window_end           | tenant_id | src_ip      | event_count | first_seen           | last_seen                |",
            "+------+----------------------+----------------------+-----------+-------------+-------------+----------------------+--------------------------+",
            "| bf   | 1970-01-01T00:00:00Z | 1970-01-01T00:01:00Z | acme      | 203.0.113.9 | 4           | 1970-01-01T00:00:01Z | 1970-01-01T00:00:59.999Z |",
            "+------+----------------------+----------------------+-----------+-------------+-------------+----------------------+--------------------------+",
        ]
        .join("\n");
        assert_eq!(table(out.take_main()), expected, "batch size {size}");
        op.on_watermark(i64::MAX, &mut out).expect("end");
        assert!(
            out.is_empty(),
            "one event in the next window: below threshold"
        );
    }
}

#[test]
fn distinct_counts_values_not_rows() {
    let mut op = op(&spray());
    let mut out = Collector::new();
    let mut events = EVENTS.to_vec();
    events.push((10_000, "acme", "203.0.113.9", "alice")); // alice again: not distinct
    feed(op.as_mut(), rows(&events), 4, &mut out);
    op.on_watermark(60_000, &mut out).expect("watermark");
    let fired = out.take_main();
    assert_eq!(fired.len(), 1);
    let b = &fired[0];
    assert_eq!(b.num_rows(), 1);
    let distinct = b.column_by_name("distinct_count").expect("column");
    // alice, bob, erin: alice's second failure is not a new value
    assert_eq!(
        distinct
            .as_any()
            .downcast_ref::<arrow::array::UInt64Array>()
            .expect("u64")
            .value(0),
        3
    );
}

#[test]
fn late_rows_go_to_the_late_output_and_are_counted() {
    let c = ctx();
    let m = c.metrics.clone();
    let mut op = ThresholdFactory::new("bf", &brute_force(), schema(), Some("ts"))
        .expect("factory")
        .create(&c)
        .expect("op");
    let mut out = Collector::new();
    op.on_watermark(60_000, &mut out).expect("watermark");
    feed(op.as_mut(), rows(EVENTS), 16, &mut out);
    let side = out.take_side();
    let late: usize = side
        .iter()
        .filter(|(p, _)| *p == LATE)
        .map(|(_, b)| b.num_rows())
        .sum();
    assert_eq!(late, 6, "every event of window [0, 60s) is late");
    assert_eq!(m.late_records.load(std::sync::atomic::Ordering::Relaxed), 6);
    op.on_watermark(i64::MAX, &mut out).expect("end");
    assert!(
        out.take_main().is_empty(),
        "the one on-time event is below threshold"
    );
}

#[test]
fn snapshot_and_restore_give_the_same_alerts() {
    let mut a = op(&spray());
    let mut out = Collector::new();
    feed(a.as_mut(), rows(&EVENTS[..3]), 2, &mut out);
    let state = a.snapshot().expect("snapshot");
    let mut b = op(&spray());
    b.restore(state.owned_by(0, 1).expect("owned"))
        .expect("restore");
    for o in [&mut a, &mut b] {
        feed(o.as_mut(), rows(&EVENTS[3..]), 2, &mut out);
        o.on_watermark(i64::MAX, &mut out).expect("end");
    }
    let fired = out.take_main();
    assert_eq!(fired.len(), 2);
    assert_eq!(table(vec![fired[0].clone()]), table(vec![fired[1].clone()]));
}

#[test]
fn configuration_errors_name_the_field_and_suggest() {
    let mut cfg = brute_force();
    cfg.key = vec!["tenant_id".into(), "src_iq".into()];
    let e = ThresholdFactory::new("bf", &cfg, schema(), Some("ts")).expect_err("bad key");
    match e {
        crate::OperatorError::Config(vigil_engine::ConfigError { field, hint, .. }) => {
            assert_eq!(field, "key[1]");
            assert_eq!(hint.as_deref(), Some("did you mean \"src_ip\"?"));
        }
        other => panic!("{other}"),
    }
    let mut cfg = spray();
    cfg.min_distinct = None;
    assert!(ThresholdFactory::new("bf", &cfg, schema(), Some("ts")).is_err());
}
