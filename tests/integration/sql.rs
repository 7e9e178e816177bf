//! Streaming SQL against DataFusion's batch engine as the oracle.
//!
//! A finite input, shuffled within the watermark bound, is written to two
//! NDJSON files (two partitions, each with its own watermark) and run
//! through a pipeline file whose SQL step is the windowed query. Its final
//! output must equal DataFusion's batch `GROUP BY` of the same rows, written
//! without windows (`ts / 60000 * 60000` for a tumbling window, a cross join
//! with the window offsets for a hopping one, `lag` and a running sum for
//! sessions) — at batch sizes 1 and 1024 and parallelism 1 and 2.

use std::io::Write as _;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::util::pretty::pretty_format_batches;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use vigil::pipeline::load_str;

use crate::{options_with, run_to_end};

/// 2026-01-01T00:00:00Z in milliseconds.
const T0: i64 = 1_767_225_600_000;
/// The disorder the input is shuffled within, and the sources allow.
const BOUND_MS: i64 = 5_000;

struct Row {
    ts: i64,
    tenant: &'static str,
    user: String,
    ip: String,
    bytes: Option<i64>,
}

/// A small deterministic generator (xorshift), so failures replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `n` rows over `span_ms`, in an order shuffled within [`BOUND_MS`]:
/// sorted by time plus a jitter below the bound, so no row is ever behind
/// the watermark.
fn input(seed: u64, n: usize, span_ms: i64, users: u64) -> Vec<Row> {
    let mut rng = Rng(seed);
    let mut rows: Vec<(i64, Row)> = (0..n)
        .map(|_| {
            let ts = T0 + rng.below(span_ms as u64) as i64;
            let u = rng.below(users);
            let user = if u.is_multiple_of(7) {
                format!("U{u}")
            } else {
                format!("u{u}")
            };
            let row = Row {
                ts,
                tenant: if rng.below(3) == 0 { "globex" } else { "acme" },
                user,
                ip: format!("10.0.{}.{}", rng.below(2), rng.below(15)),
                bytes: (rng.below(10) != 0).then(|| rng.below(5000) as i64),
            };
            (ts + rng.below(BOUND_MS as u64) as i64, row)
        })
        .collect();
    rows.sort_by_key(|(k, _)| *k);
    rows.into_iter().map(|(_, r)| r).collect()
}

fn batch(rows: &[Row]) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            "ts",
            DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, Some("UTC".into())),
            true,
        ),
        Field::new("tenant", DataType::Utf8, true),
        Field::new("user", DataType::Utf8, true),
        Field::new("src_ip", DataType::Utf8, true),
        Field::new("bytes", DataType::Int64, true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(
            TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.ts))
                .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.tenant))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.user.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.ip.as_str()),
        )),
        Arc::new(Int64Array::from(
            rows.iter().map(|r| r.bytes).collect::<Vec<_>>(),
        )),
    ];
    RecordBatch::try_new(schema, columns).expect("oracle batch")
}

/// Writes the rows to two NDJSON files, alternating, and returns their directory.
fn write_partitions(rows: &[Row]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut files: Vec<std::fs::File> = (0..2)
        .map(|p| {
            std::fs::File::create(dir.path().join(format!("part-{p}.ndjson"))).expect("create")
        })
        .collect();
    for (i, r) in rows.iter().enumerate() {
        let line = serde_json::json!({
            "ts": r.ts, "tenant": r.tenant, "user": r.user, "src_ip": r.ip, "bytes": r.bytes,
        });
        writeln!(files[i % 2], "{line}").expect("write");
    }
    dir
}

/// Every timestamp as epoch milliseconds and every string as plain UTF-8,
/// then the rows as sorted text: comparison ignores order and encoding.
fn normalized(batches: &[RecordBatch]) -> Vec<String> {
    let mut out = Vec::new();
    for b in batches {
        if b.num_rows() == 0 {
            continue;
        }
        let fields: Vec<Field> = b
            .schema()
            .fields()
            .iter()
            .map(|f| {
                let t = match f.data_type() {
                    DataType::Timestamp(_, _) => DataType::Int64,
                    DataType::Dictionary(_, _) | DataType::Utf8View | DataType::LargeUtf8 => {
                        DataType::Utf8
                    }
                    other => other.clone(),
                };
                Field::new(f.name(), t, true)
            })
            .collect();
        let columns: Vec<ArrayRef> = b
            .columns()
            .iter()
            .zip(&fields)
            .map(|(c, f)| cast(c, f.data_type()).expect("cast"))
            .collect();
        let b = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).expect("normalized");
        let text = pretty_format_batches(&[b]).expect("format").to_string();
        // Cells trimmed: column widths differ from batch to batch.
        let cells = |l: &str| l.split('|').map(str::trim).collect::<Vec<_>>().join("|");
        let lines: Vec<&str> = text.lines().collect();
        out.push(cells(lines[1]));
        out.extend(lines[3..lines.len() - 1].iter().map(|l| cells(l)));
    }
    let header = out.first().cloned();
    out.retain(|l| Some(l) != header.as_ref());
    out.sort();
    if let Some(h) = header {
        out.insert(0, h);
    }
    out
}

async fn oracle(rows: &[Row], sql: &str) -> Vec<String> {
    let ctx = SessionContext::new();
    let b = batch(rows);
    let table = MemTable::try_new(b.schema(), vec![vec![b]]).expect("table");
    ctx.register_table("auth", Arc::new(table))
        .expect("register");
    let out = ctx
        .sql(sql)
        .await
        .expect("oracle plans")
        .collect()
        .await
        .expect("oracle runs");
    normalized(&out)
}

fn stream_pipeline(
    dir: &std::path::Path,
    query: &str,
    batch_size: usize,
    parallelism: usize,
) -> String {
    format!(
        "\
name: oracle
parallelism: {parallelism}
sources:
  auth:
    type: file
    path: {}
    batch_size: {batch_size}
    schema:
      fields:
        - {{ name: ts, type: timestamp }}
        - {{ name: tenant, type: string }}
        - {{ name: user, type: string }}
        - {{ name: src_ip, type: string }}
        - {{ name: bytes, type: int64 }}
      event_time: {{ field: ts, format: epoch_ms }}
    watermark: {{ out_of_orderness: {BOUND_MS}ms }}
transforms:
  q:
    type: sql
    query: |
{}
sinks:
  out: {{ type: null, input: q }}
",
        dir.display(),
        query
            .lines()
            .map(|l| format!("      {l}"))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

async fn stream(
    dir: &std::path::Path,
    query: &str,
    batch_size: usize,
    parallelism: usize,
) -> (Vec<String>, u64) {
    let text = stream_pipeline(dir, query, batch_size, parallelism);
    let mut plan = load_str("oracle.yaml", &text, &options_with(&[])).expect("valid pipeline");
    let out = plan.capture("out").expect("sink");
    let summary = run_to_end(&plan).await;
    let batches = out.lock().clone();
    (normalized(&batches), summary.late)
}

async fn check(rows: Vec<Row>, streaming: &str, batch_sql: &str) {
    let expected = oracle(&rows, batch_sql).await;
    assert!(expected.len() > 10, "the oracle finds groups: {expected:?}");
    let dir = write_partitions(&rows);
    for batch_size in [1, 1024] {
        for parallelism in [1, 2] {
            let (got, late) = stream(dir.path(), streaming, batch_size, parallelism).await;
            assert_eq!(late, 0, "nothing is late within the bound");
            assert_eq!(
                got, expected,
                "batch size {batch_size}, parallelism {parallelism}:\n{streaming}"
            );
        }
    }
    // Straight, checkpointed at parallelism 2, crashed and restored at 3.
    let out =
        crate::recovery::three_modes(|p| stream_pipeline(dir.path(), streaming, 64, p), &["out"])
            .await;
    assert_eq!(out[0].len(), expected.len() - 1, "one line per result row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tumbling_window_aggregates_equal_the_batch_group_by() {
    check(
        input(1, 3000, 10 * 60_000, 25),
        "SELECT window_start, window_end, tenant, user, count(*) AS n, count(DISTINCT src_ip) AS ips,
       sum(bytes) AS total, min(bytes) AS lo, max(bytes) AS hi, avg(bytes) AS mean
FROM auth WHERE user <> 'u3'
GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE), tenant, user",
        "SELECT CAST(ts AS BIGINT) / 60000 * 60000 AS window_start,
       CAST(ts AS BIGINT) / 60000 * 60000 + 60000 AS window_end, tenant, user,
       count(*) AS n, count(DISTINCT src_ip) AS ips,
       sum(bytes) AS total, min(bytes) AS lo, max(bytes) AS hi, avg(bytes) AS mean
FROM auth WHERE user <> 'u3'
GROUP BY 1, 2, tenant, user",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hopping_windows_with_a_computed_key_and_having_equal_the_batch_group_by() {
    check(
        input(2, 2000, 5 * 60_000, 12),
        "SELECT window_start, window_end, lower(user) AS u, count(*) AS n, max(bytes) AS hi
FROM TABLE(HOP(TABLE auth, DESCRIPTOR(ts), INTERVAL '10' SECONDS, INTERVAL '1' MINUTE))
GROUP BY window_start, window_end, lower(user)
HAVING count(*) >= 3",
        "WITH e AS (
  SELECT *, CAST(ts AS BIGINT) / 10000 * 10000 - o.i * 10000 AS ws
  FROM auth CROSS JOIN (VALUES (0), (1), (2), (3), (4), (5)) AS o(i))
SELECT ws AS window_start, ws + 60000 AS window_end, lower(user) AS u, count(*) AS n, max(bytes) AS hi
FROM e WHERE CAST(ts AS BIGINT) < ws + 60000
GROUP BY ws, lower(user)
HAVING count(*) >= 3",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hopping_windows_read_through_a_subquery_are_expanded_per_window_and_equal_the_batch_group_by(
) {
    // A subquery that passes the window columns through makes every row
    // arrive once per window (the other hopping test aggregates by pane).
    check(
        input(7, 2000, 5 * 60_000, 12),
        "SELECT window_start, window_end, u, count(*) AS n, max(bytes) AS hi
FROM (SELECT window_start, window_end, lower(user) AS u, bytes
      FROM TABLE(HOP(TABLE auth, DESCRIPTOR(ts), INTERVAL '10' SECONDS, INTERVAL '1' MINUTE)))
GROUP BY window_start, window_end, u",
        "WITH e AS (
  SELECT *, CAST(ts AS BIGINT) / 10000 * 10000 - o.i * 10000 AS ws
  FROM auth CROSS JOIN (VALUES (0), (1), (2), (3), (4), (5)) AS o(i))
SELECT ws AS window_start, ws + 60000 AS window_end, lower(user) AS u, count(*) AS n, max(bytes) AS hi
FROM e WHERE CAST(ts AS BIGINT) < ws + 60000
GROUP BY ws, lower(user)",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_windows_equal_sessions_computed_in_batch() {
    check(
        input(3, 800, 20 * 60_000, 20),
        "SELECT window_start, window_end, user, count(*) AS n, sum(bytes) AS total
FROM auth
GROUP BY SESSION(ts, INTERVAL '30' SECOND), user",
        "WITH r AS (SELECT user, CAST(ts AS BIGINT) AS t, bytes FROM auth),
f AS (SELECT *, CASE WHEN t - lag(t) OVER (PARTITION BY user ORDER BY t) < 30000 THEN 0 ELSE 1 END AS new FROM r),
g AS (SELECT *, sum(new) OVER (PARTITION BY user ORDER BY t ROWS UNBOUNDED PRECEDING) AS sid FROM f)
SELECT min(t) AS window_start, max(t) + 30000 AS window_end, user, count(*) AS n, sum(bytes) AS total
FROM g GROUP BY user, sid",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_without_keys_runs_on_one_subtask_and_equals_the_batch_group_by() {
    check(
        input(4, 1500, 10 * 60_000, 30),
        "SELECT window_start, window_time, count(*) AS n, sum(bytes) AS b
FROM TABLE(TUMBLE(TABLE auth, DESCRIPTOR(ts), INTERVAL '30' SECOND))
WHERE tenant = 'acme'
GROUP BY window_start, window_end, window_time",
        "SELECT CAST(ts AS BIGINT) / 30000 * 30000 AS window_start,
       CAST(ts AS BIGINT) / 30000 * 30000 + 29999 AS window_time, count(*) AS n, sum(bytes) AS b
FROM auth WHERE tenant = 'acme' GROUP BY 1, 2",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vigil_sql_declares_tables_with_ddl_and_prints_each_window_as_it_closes() {
    use vigil::pipeline::query::{plan_query_script, QueryRequest};
    let rows = input(5, 600, 5 * 60_000, 6);
    let dir = write_partitions(&rows);
    let script = format!(
        "CREATE TABLE logins (ts TIMESTAMP, tenant STRING, user STRING, src_ip STRING, bytes BIGINT)
WITH ('connector' = 'file', 'path' = '{}', 'event_time' = 'ts',
      'schema.event_time.format' = 'epoch_ms', 'watermark.out_of_orderness' = '5s');
SELECT window_start, user, count(*) AS n FROM logins
GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE), user;",
        dir.path().display()
    );
    let request = QueryRequest {
        script: &script,
        pipeline: None,
        allowed_lateness: None,
        json: false,
        cross_tenant: false,
    };
    let mut plan = plan_query_script(&request, &options_with(&[])).expect("plans");
    let out = plan.capture("rows").expect("the printing sink");
    run_to_end(&plan).await;
    let got = normalized(&out.lock());
    let expected = oracle(
        &rows,
        "SELECT CAST(ts AS BIGINT) / 60000 * 60000 AS window_start, user, count(*) AS n
FROM auth GROUP BY 1, user",
    )
    .await;
    assert_eq!(got, expected);

    let bad = QueryRequest {
        script: "CREATE TABLE t (ts TIMESTAMP) WITH ('connector' = 'file', 'pth' = 'x'); SELECT * FROM t",
        pipeline: None,
        allowed_lateness: None,
        json: false,
        cross_tenant: false,
    };
    let e = plan_query_script(&bad, &options_with(&[]))
        .err()
        .expect("rejected")
        .to_string();
    assert!(e.contains("unknown field \"pth\" in table \"t\""), "{e}");
    assert!(e.contains("did you mean \"path\""), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_rows_update_within_the_lateness_reach_the_named_late_sink_beyond_it_and_none_is_lost()
{
    // One partition, read a row at a time, in file order: 400 s of rows,
    // then a row for the window [180 s, 240 s) and one for [0 s, 60 s).
    // The watermark is at 399 s by then: the first is within the 3 minute
    // lateness (240 + 180 > 399) and updates its window; the second is not.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut lines: Vec<String> = (0..=400)
        .map(|s| format!(r#"{{"ts": {}, "user": "u{}"}}"#, T0 + s * 1000, s % 2))
        .collect();
    lines.push(format!(r#"{{"ts": {}, "user": "u0"}}"#, T0 + 185_000));
    lines.push(format!(r#"{{"ts": {}, "user": "u0"}}"#, T0 + 10_000));
    let total = lines.len() as i64;
    std::fs::write(dir.path().join("auth.ndjson"), lines.join("\n")).expect("write");
    let text = format!(
        "\
name: lateness
sources:
  auth:
    type: file
    path: {}
    batch_size: 1
    schema:
      fields: [{{ name: ts, type: timestamp }}, {{ name: user, type: string }}]
      event_time: {{ field: ts, format: epoch_ms }}
    watermark: {{ out_of_orderness: 1s }}
transforms:
  per_minute:
    type: sql
    allowed_lateness: 3m
    query: |
      SELECT window_start, user, count(*) AS n FROM auth
      GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE), user
sinks:
  rows: {{ type: null, input: per_minute }}
  too_late: {{ type: null, input: per_minute.late }}
",
        dir.path().join("auth.ndjson").display(),
    );
    let mut plan = load_str("lateness.yaml", &text, &options_with(&[])).expect("valid");
    let rows = plan.capture("rows").expect("rows");
    let too_late = plan.capture("too_late").expect("late sink");
    let summary = run_to_end(&plan).await;
    let late: Vec<String> = normalized(&too_late.lock());
    assert_eq!(summary.late, 1, "one row is beyond the lateness: {late:?}");
    assert_eq!(late.len(), 2, "header and the row at 10 s: {late:?}");
    assert!(late[1].contains(&(T0 + 10_000).to_string()), "{late:?}");
    let out = normalized(&rows.lock());
    let header = &out[0];
    assert_eq!(header, "|window_start|user|n|op|");
    let update = format!("|{}|u0|31|update|", T0 + 180_000);
    assert!(
        out.contains(&update),
        "the window [180 s, 240 s) of u0 now has 31 rows: {out:?}"
    );
    // Nothing lost: the last value of every window plus the late row is every row.
    let mut last: std::collections::BTreeMap<(String, String), i64> = Default::default();
    for l in &out[1..] {
        let cells: Vec<&str> = l.split('|').collect();
        let n: i64 = cells[3].parse().expect("count");
        let e = last
            .entry((cells[1].to_string(), cells[2].to_string()))
            .or_default();
        *e = (*e).max(n);
    }
    assert_eq!(last.values().sum::<i64>() + summary.late as i64, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_file_can_declare_its_sources_as_sql_tables() {
    let rows = input(6, 500, 4 * 60_000, 5);
    let dir = write_partitions(&rows);
    let text = format!(
        "\
name: ddl
tables: |
  CREATE TABLE logins (ts TIMESTAMP, tenant STRING, user STRING, src_ip STRING, bytes BIGINT)
  WITH ('connector' = 'file', 'path' = '{}', 'event_time' = 'ts',
        'schema.event_time.format' = 'epoch_ms', 'watermark.out_of_orderness' = '5s');
transforms:
  per_minute:
    type: sql
    query: |
      SELECT window_start, tenant, count(*) AS n, sum(bytes) AS b FROM logins
      GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE), tenant
sinks:
  out: {{ type: null, input: per_minute }}
",
        dir.path().display()
    );
    let mut plan = load_str("ddl.yaml", &text, &options_with(&[])).expect("valid pipeline");
    let out = plan.capture("out").expect("sink");
    run_to_end(&plan).await;
    let expected = oracle(
        &rows,
        "SELECT CAST(ts AS BIGINT) / 60000 * 60000 AS window_start, tenant, count(*) AS n, sum(bytes) AS b
FROM auth GROUP BY 1, tenant",
    )
    .await;
    assert_eq!(normalized(&out.lock()), expected);

    let bad = text.replace("'path'", "'pth'");
    let e = load_str("ddl.yaml", &bad, &options_with(&[]))
        .err()
        .expect("rejected")
        .to_string();
    assert!(
        e.starts_with("ddl.yaml:3:3: in tables: unknown field \"pth\" in table \"logins\""),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_joins_equal_the_batch_join_of_the_same_query() {
    // The same SQL runs in both engines: DataFusion's batch hash join over
    // every row is the reference for the streaming interval join, inner and
    // left outer, with a residual condition on the pair.
    let rows = input(31, 1_500, 120_000, 40);
    let inner = "SELECT a.user, a.ts, a.src_ip, b.ts AS b_ts, b.src_ip AS b_ip
FROM auth a JOIN auth b
  ON a.user = b.user
 AND b.ts BETWEEN a.ts - INTERVAL '3' SECOND AND a.ts + INTERVAL '10' SECOND
WHERE a.src_ip <> b.src_ip";
    check(input(31, 1_500, 120_000, 40), inner, inner).await;
    let left = "SELECT a.user, a.ts, a.bytes, b.ts AS b_ts, b.bytes AS b_bytes
FROM auth a LEFT JOIN auth b
  ON lower(a.user) = lower(b.user)
 AND b.ts > a.ts AND b.ts <= a.ts + INTERVAL '4' SECOND
 AND b.bytes > a.bytes";
    check(rows, left, left).await;
}
