//! Windowed aggregation, driven directly: rows in, watermarks, rows out.
//!
//! Each test reads "nothing yet, then exactly this": rows go in, nothing is
//! emitted until the watermark passes a window's end, then exactly that
//! window's rows come out.

use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::util::pretty::pretty_format_batches;
use vigil_engine::{Collector, Operator, TaskContext, LATE};

use crate::sql::{plan_query, Catalog, PlannedQuery, QueryOptions, Stages, TableInfo};
use crate::window::WindowAggregateFactory;

pub(crate) fn auth_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            true,
        ),
        Field::new("tenant", DataType::Utf8, false),
        Field::new("user", DataType::Utf8, false),
        Field::new("src_ip", DataType::Utf8, false),
        Field::new("bytes", DataType::Int64, true),
    ]))
}

pub(crate) struct Tables;

impl Catalog for Tables {
    fn table(&self, name: &str) -> Option<TableInfo> {
        (name == "auth").then(|| TableInfo {
            schema: auth_schema(),
        })
    }
    fn names(&self) -> Vec<String> {
        vec!["auth".into()]
    }
}

/// Rows of (seconds, tenant, user, ip, bytes).
pub(crate) fn rows(r: &[(i64, &str, &str, &str, i64)]) -> RecordBatch {
    RecordBatch::try_new(
        auth_schema(),
        vec![
            Arc::new(
                TimestampMillisecondArray::from_iter_values(r.iter().map(|x| x.0 * 1000))
                    .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from_iter_values(r.iter().map(|x| x.1))),
            Arc::new(StringArray::from_iter_values(r.iter().map(|x| x.2))),
            Arc::new(StringArray::from_iter_values(r.iter().map(|x| x.3))),
            Arc::new(Int64Array::from_iter_values(r.iter().map(|x| x.4))),
        ],
    )
    .expect("test rows")
}

pub(crate) struct Harness {
    prepare: Stages,
    op: Box<dyn Operator>,
    pub out: Vec<RecordBatch>,
    pub late: Vec<RecordBatch>,
    pub ctx: TaskContext,
}

impl Harness {
    pub fn new(sql: &str, lateness_s: i64) -> Self {
        let planned = plan_query(
            sql,
            &Tables,
            &QueryOptions {
                name: "q".into(),
                lateness_ms: lateness_s * 1000,
                cross_tenant: false,
            },
        )
        .unwrap_or_else(|e| panic!("{sql}: {e} ({:?})", e.hint));
        let PlannedQuery::Windowed {
            prepare, aggregate, ..
        } = planned
        else {
            panic!("not windowed: {sql}");
        };
        let ctx = TaskContext::detached("q", 0, 1, 0);
        let factory = WindowAggregateFactory::new(aggregate);
        let op = vigil_engine::OperatorFactory::create(&factory, &ctx).expect("create");
        Self {
            prepare,
            op,
            out: Vec::new(),
            late: Vec::new(),
            ctx,
        }
    }

    fn drain(&mut self, mut c: Collector) {
        self.out.extend(c.take_main());
        for (port, b) in c.take_side() {
            assert_eq!(port, LATE);
            self.late.push(b);
        }
    }

    pub fn feed(&mut self, batch: RecordBatch) {
        let batch = self.prepare.run(batch).expect("prepare");
        let mut c = Collector::new();
        self.op.process_batch(0, batch, &mut c).expect("process");
        self.drain(c);
    }

    pub fn watermark(&mut self, seconds: i64) {
        let mut c = Collector::new();
        self.op
            .on_watermark(seconds * 1000, &mut c)
            .expect("watermark");
        self.drain(c);
    }

    /// Output so far as a sorted table, then cleared.
    pub fn take(&mut self) -> String {
        let out = std::mem::take(&mut self.out);
        sorted(&out)
    }

    pub fn late_rows(&self) -> usize {
        self.late.iter().map(|b| b.num_rows()).sum()
    }

    pub fn snapshot_restore(&mut self, sql: &str, lateness_s: i64) {
        let state = self.op.snapshot().expect("snapshot");
        let mut fresh = Harness::new(sql, lateness_s);
        fresh
            .op
            .restore(state.owned_by(0, 1).expect("owned"))
            .expect("restore");
        self.op = fresh.op;
    }
}

/// Batches as a table whose rows are sorted, so order does not matter.
pub(crate) fn sorted(batches: &[RecordBatch]) -> String {
    if batches.iter().all(|b| b.num_rows() == 0) {
        return String::new();
    }
    let text = pretty_format_batches(batches).expect("format").to_string();
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() < 4 {
        return text;
    }
    let mut body: Vec<&str> = lines[3..lines.len() - 1].to_vec();
    body.sort_unstable();
    let mut out: Vec<&str> = lines[..3].to_vec();
    out.extend(body);
    out.push(lines[lines.len() - 1]);
    out.join("\n")
}

const TUMBLE: &str = "SELECT window_start, window_end, user, count(*) AS n, sum(bytes) AS b \
     FROM auth GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE), user";

#[test]
fn nothing_until_the_watermark_passes_the_end_then_exactly_that_window() {
    let mut h = Harness::new(TUMBLE, 0);
    h.feed(rows(&[
        (5, "t", "alice", "10.0.0.1", 10),
        (30, "t", "alice", "10.0.0.1", 5),
        (59, "t", "bob", "10.0.0.2", 1),
        (61, "t", "alice", "10.0.0.1", 7),
    ]));
    h.watermark(59);
    assert_eq!(h.take(), "", "window [0, 60) is still open");
    h.watermark(60);
    assert_eq!(
        h.take(),
        "+----------------------+----------------------+-------+---+----+
| window_start         | window_end           | user  | n | b  |
+----------------------+----------------------+-------+---+----+
| 1970-01-01T00:00:00Z | 1970-01-01T00:01:00Z | alice | 2 | 15 |
| 1970-01-01T00:00:00Z | 1970-01-01T00:01:00Z | bob   | 1 | 1  |
+----------------------+----------------------+-------+---+----+"
    );
    h.watermark(119);
    assert_eq!(h.take(), "");
    h.watermark(120);
    assert!(h.take().contains("| alice | 1 | 7 |"));
}

#[test]
fn window_state_is_freed_once_the_window_can_no_longer_change() {
    let sql = TUMBLE;
    let planned = plan_query(sql, &Tables, &QueryOptions::default()).expect("plan");
    let PlannedQuery::Windowed {
        prepare, aggregate, ..
    } = planned
    else {
        panic!("not windowed")
    };
    let factory = WindowAggregateFactory::new(aggregate);
    let mut op = factory
        .build(&TaskContext::detached("q", 0, 1, 0))
        .expect("build");
    let mut c = Collector::new();
    for minute in 0..100 {
        let b = rows(&[(minute * 60 + 1, "t", &format!("u{minute}"), "ip", 1)]);
        op.process_batch(0, prepare.run(b).expect("prepare"), &mut c)
            .expect("process");
        op.on_watermark(minute * 60_000 + 30_000, &mut c)
            .expect("watermark");
        assert!(op.open_windows() <= 1, "only the current window is held");
    }
    op.on_watermark(i64::MAX, &mut c).expect("end");
    assert_eq!(op.open_windows(), 0);
    let emitted: usize = c.take_main().iter().map(|b| b.num_rows()).sum();
    assert_eq!(emitted, 100);
}

#[test]
fn late_rows_within_the_lateness_update_their_window_and_later_ones_go_to_late_output() {
    let mut h = Harness::new(TUMBLE, 30);
    h.feed(rows(&[
        (5, "t", "alice", "ip", 1),
        (10, "t", "bob", "ip", 1),
    ]));
    h.watermark(60);
    let first = h.take();
    assert!(first.contains("| alice | 1 | 1 | insert |"), "{first}");
    assert!(first.contains("| bob   | 1 | 1 | insert |"), "{first}");
    // Within the lateness: alice's window is updated, bob's is not repeated.
    h.feed(rows(&[(20, "t", "alice", "ip", 4)]));
    let update = h.take();
    assert!(update.contains("| alice | 2 | 5 | update |"), "{update}");
    assert!(!update.contains("bob"), "{update}");
    assert_eq!(h.late_rows(), 0);
    // Past the lateness (window end 60 + 30 <= 90): late output, counted.
    h.watermark(90);
    h.feed(rows(&[(30, "t", "alice", "ip", 100)]));
    assert_eq!(h.take(), "");
    assert_eq!(h.late_rows(), 1);
    assert_eq!(
        h.ctx
            .metrics
            .late_records
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn hop_puts_each_row_in_size_over_slide_windows() {
    let sql = "SELECT window_start, count(*) AS n FROM auth \
               GROUP BY HOP(ts, INTERVAL '10' SECOND, INTERVAL '30' SECOND)";
    let mut h = Harness::new(sql, 0);
    h.feed(rows(&[(25, "t", "a", "ip", 1)]));
    h.watermark(1000);
    assert_eq!(
        h.take(),
        "+----------------------+---+
| window_start         | n |
+----------------------+---+
| 1970-01-01T00:00:00Z | 1 |
| 1970-01-01T00:00:10Z | 1 |
| 1970-01-01T00:00:20Z | 1 |
+----------------------+---+"
    );
}

const SESSION: &str = "SELECT window_start, window_end, user, count(*) AS n \
     FROM auth GROUP BY SESSION(ts, INTERVAL '10' SECOND), user";

#[test]
fn sessions_close_after_the_gap_and_a_bridging_row_merges_two() {
    let mut h = Harness::new(SESSION, 0);
    // alice: [0, 13) and [30, 40) so far; bob: [5, 15).
    h.feed(rows(&[
        (0, "t", "alice", "ip", 1),
        (3, "t", "alice", "ip", 1),
        (30, "t", "alice", "ip", 1),
        (5, "t", "bob", "ip", 1),
    ]));
    h.watermark(12);
    assert_eq!(h.take(), "");
    // A row at 21 bridges alice's two sessions: 21 - 3 < 10? no (18), so it
    // joins only [30, 40): 30 - 21 = 9 < 10.
    h.feed(rows(&[(21, "t", "alice", "ip", 1)]));
    // A row at 12 joins [0, 13) and reaches 21: now one session [0, 40).
    h.feed(rows(&[(12, "t", "alice", "ip", 1)]));
    h.watermark(15);
    assert_eq!(
        h.take(),
        "+----------------------+----------------------+------+---+
| window_start         | window_end           | user | n |
+----------------------+----------------------+------+---+
| 1970-01-01T00:00:05Z | 1970-01-01T00:00:15Z | bob  | 1 |
+----------------------+----------------------+------+---+"
    );
    h.watermark(40);
    assert_eq!(
        h.take(),
        "+----------------------+----------------------+-------+---+
| window_start         | window_end           | user  | n |
+----------------------+----------------------+-------+---+
| 1970-01-01T00:00:00Z | 1970-01-01T00:00:40Z | alice | 5 |
+----------------------+----------------------+-------+---+"
    );
}

#[test]
fn a_late_row_bridging_two_emitted_sessions_retracts_both_and_emits_the_merge() {
    let mut h = Harness::new(SESSION, 60);
    h.feed(rows(&[
        (0, "t", "alice", "ip", 1),
        (15, "t", "alice", "ip", 1),
    ]));
    h.watermark(30);
    let first = h.take();
    assert!(first.contains("00:00:10Z | alice | 1 | insert"), "{first}");
    assert!(first.contains("00:00:25Z | alice | 1 | insert"), "{first}");
    // Late, within the lateness: 8 is within 10s of 0 and of 15.
    h.feed(rows(&[(8, "t", "alice", "ip", 1)]));
    let merged = h.take();
    assert_eq!(
        merged,
        "+----------------------+----------------------+-------+---+---------+
| window_start         | window_end           | user  | n | op      |
+----------------------+----------------------+-------+---+---------+
| 1970-01-01T00:00:00Z | 1970-01-01T00:00:10Z | alice | 1 | retract |
| 1970-01-01T00:00:00Z | 1970-01-01T00:00:25Z | alice | 3 | insert  |
| 1970-01-01T00:00:15Z | 1970-01-01T00:00:25Z | alice | 1 | retract |
+----------------------+----------------------+-------+---+---------+"
    );
    // A row that only adds to the merged session is an update.
    h.feed(rows(&[(9, "t", "alice", "ip", 1)]));
    assert!(h.take().contains("| alice | 4 | update |"));
    // Beyond the lateness: late output.
    h.watermark(100);
    h.feed(rows(&[(1, "t", "alice", "ip", 1)]));
    assert_eq!(h.take(), "");
    assert_eq!(h.late_rows(), 1);
}

#[test]
fn window_state_survives_snapshot_and_restore() {
    for sql in [TUMBLE, SESSION] {
        let mut h = Harness::new(sql, 0);
        h.feed(rows(&[
            (1, "t", "alice", "ip", 3),
            (2, "t", "bob", "ip", 4),
        ]));
        h.snapshot_restore(sql, 0);
        h.feed(rows(&[(3, "t", "alice", "ip", 5)]));
        h.watermark(1000);
        let out = h.take();
        assert!(out.contains("alice | 2"), "{sql}: {out}");
        assert!(out.contains("bob   | 1"), "{sql}: {out}");
    }
}

#[test]
fn a_session_without_keys_is_one_session_for_the_whole_stream() {
    let sql = "SELECT window_start, window_end, count(*) AS n FROM auth \
               GROUP BY SESSION(ts, INTERVAL '10' SECOND)";
    let mut h = Harness::new(sql, 0);
    h.feed(rows(&[
        (0, "t", "a", "ip", 1),
        (5, "t", "b", "ip", 1),
        (30, "t", "c", "ip", 1),
    ]));
    h.watermark(100);
    assert_eq!(
        h.take(),
        "+----------------------+----------------------+---+
| window_start         | window_end           | n |
+----------------------+----------------------+---+
| 1970-01-01T00:00:00Z | 1970-01-01T00:00:15Z | 2 |
| 1970-01-01T00:00:30Z | 1970-01-01T00:00:40Z | 1 |
+----------------------+----------------------+---+"
    );
}
