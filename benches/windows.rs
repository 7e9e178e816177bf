//! Windowed aggregation benchmark: generator → SQL window → null sink on one
//! core, beside DataFusion's batch `GROUP BY` of the same rows.
//!
//! The streaming side is a real pipeline file (planned by the same loader as
//! `vigil run`) on a current-thread runtime: the in-memory generator flat
//! out, `TUMBLE(1 min)` (or `HOP(10 s, 1 min)`) count by (tenant, source ip),
//! a null sink. The batch side collects the same generated rows into memory
//! first, then times DataFusion answering the equivalent query over them
//! with one partition on a current-thread runtime. The ratio is the figure
//! that survives machine noise. Run with `cargo bench --bench windows`
//! (add `-- --events N --runs R`).
//!
//! Last, the cost of observability: the tumbling query with the engine's
//! detailed metrics on (as `vigil run` runs) and off, interleaved run by
//! run, as the median of the per-pair throughput ratios.

mod support;

use std::sync::Arc;
use std::time::Instant;

use support::pipeline::{run_plan_metrics, runtime};
use support::{arg, spread};

use arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};
use vigil::pipeline::{load_str, PlanOptions};

const TUMBLE: &str = "SELECT window_start, window_end, tenant_id, src_ip, count(*) AS events \
     FROM auth GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE), tenant_id, src_ip";
const HOP: &str = "SELECT window_start, window_end, tenant_id, src_ip, count(*) AS events \
     FROM auth GROUP BY HOP(ts, INTERVAL '10' SECOND, INTERVAL '1' MINUTE), tenant_id, src_ip";

const BATCH_TUMBLE: &str = "SELECT date_bin(INTERVAL '1 minute', ts) AS window_start, \
     tenant_id, src_ip, count(*) AS events FROM auth GROUP BY 1, tenant_id, src_ip";
// Every row is in the six windows starting at its 10 s slot and the five before.
const BATCH_HOP: &str = "SELECT CAST(ts AS BIGINT) / 10000 * 10000 - o.i * 10000 AS window_start, \
     tenant_id, src_ip, count(*) AS events \
     FROM auth CROSS JOIN (VALUES (0), (1), (2), (3), (4), (5)) AS o(i) \
     GROUP BY 1, tenant_id, src_ip";
// DataFusion's best case: the same with the dictionary keys cast to strings
// first (what Vigil's planner does), so it groups with its column-wise
// string tables instead of its row format.
const BATCH_TUMBLE_STRINGS: &str = "SELECT date_bin(INTERVAL '1 minute', ts) AS window_start, \
     CAST(tenant_id AS VARCHAR) AS tenant_id, CAST(src_ip AS VARCHAR) AS src_ip, count(*) AS events \
     FROM auth GROUP BY 1, 2, 3";
const BATCH_HOP_STRINGS: &str = "SELECT CAST(ts AS BIGINT) / 10000 * 10000 - o.i * 10000 AS window_start, \
     CAST(tenant_id AS VARCHAR) AS tenant_id, CAST(src_ip AS VARCHAR) AS src_ip, count(*) AS events \
     FROM auth CROSS JOIN (VALUES (0), (1), (2), (3), (4), (5)) AS o(i) \
     GROUP BY 1, 2, 3";

fn pipeline(events: u64, query: Option<&str>) -> String {
    let (transforms, input) = match query {
        Some(q) => (
            format!("transforms:\n  w:\n    type: sql\n    query: \"{q}\"\n"),
            "w",
        ),
        None => (String::new(), "auth"),
    };
    format!(
        "\
name: bench
sources:
  auth:
    type: generator
    stream: auth
    seed: 7
    partitions: 1
    count: {events}
    event_rate: 20000
    start_time: 2026-01-01T00:00:00Z
    batch_size: 8192
{transforms}sinks:
  out: {{ type: null, input: {input} }}
"
    )
}

/// Runs a pipeline file to its end; returns what its sink `out` received.
fn run_captured(text: &str, metrics: bool) -> Vec<RecordBatch> {
    let mut plan = load_str("bench.yaml", text, &PlanOptions::default()).expect("valid pipeline");
    let out = plan.capture("out").expect("sink");
    run_plan_metrics(&plan, metrics);
    let batches = out.lock().clone();
    batches
}

/// One streaming run: events/s and result rows.
fn stream_once(query: &str, events: u64) -> (f64, usize) {
    stream_metrics(query, events, true)
}

#[allow(clippy::disallowed_methods)] // a benchmark measures wall time
/// One streaming run with detailed metrics on or off: events/s and rows.
fn stream_metrics(query: &str, events: u64, metrics: bool) -> (f64, usize) {
    let text = pipeline(events, Some(query));
    let started = Instant::now();
    let out = run_captured(&text, metrics);
    let rate = events as f64 / started.elapsed().as_secs_f64();
    (rate, out.iter().map(|b| b.num_rows()).sum())
}

/// The generated rows, in memory.
fn generated(events: u64) -> Vec<RecordBatch> {
    run_captured(&pipeline(events, None), true)
}

#[allow(clippy::disallowed_methods)] // a benchmark measures wall time
/// One batch run over rows in memory: rows/s and result rows.
fn batch_once(query: &str, batches: &[RecordBatch]) -> (f64, usize) {
    let rt = runtime();
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
    let table = MemTable::try_new(batches[0].schema(), vec![batches.to_vec()]).expect("table");
    ctx.register_table("auth", Arc::new(table))
        .expect("register");
    let started = Instant::now();
    let out = rt.block_on(async {
        ctx.sql(query)
            .await
            .expect("plans")
            .collect()
            .await
            .expect("runs")
    });
    let rate = rows as f64 / started.elapsed().as_secs_f64();
    (rate, out.iter().map(|b| b.num_rows()).sum())
}

/// Throughput with detailed metrics on vs off, interleaved.
fn overhead(events: u64, runs: usize) {
    stream_metrics(TUMBLE, events / 10, true); // warm-up
    let (mut on, mut off, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        // Alternate which goes first, so drift falls on both alike.
        let (a, b) = if i % 2 == 0 {
            let a = stream_metrics(TUMBLE, events, true);
            (a, stream_metrics(TUMBLE, events, false))
        } else {
            let b = stream_metrics(TUMBLE, events, false);
            (stream_metrics(TUMBLE, events, true), b)
        };
        assert_eq!(a.1, b.1, "the same windows either way");
        on.push(a.0);
        off.push(b.0);
        ratios.push(a.0 / b.0);
    }
    let (onm, onmin, onmax) = spread(on);
    let (offm, offmin, offmax) = spread(off);
    let (rm, rmin, rmax) = spread(ratios);
    println!("TUMBLE(1 min), detailed metrics on vs off");
    println!(
        "  metrics on   median {:>6.2} M events/s (min {:.2}, max {:.2})",
        onm / 1e6,
        onmin / 1e6,
        onmax / 1e6
    );
    println!(
        "  metrics off  median {:>6.2} M events/s (min {:.2}, max {:.2})",
        offm / 1e6,
        offmin / 1e6,
        offmax / 1e6
    );
    println!(
        "  on / off     median {:.3} (min {:.3}, max {:.3}): overhead {:.1} %",
        rm,
        rmin,
        rmax,
        (1.0 - rm) * 100.0
    );
}

fn main() {
    let events = arg("--events", 10_000_000);
    let runs = arg("--runs", 5) as usize;
    if arg("--overhead-only", 0) == 1 {
        overhead(events, runs);
        return;
    }
    println!(
        "vigil windows, one core (current-thread runtime), {events} generated auth events per run, median of {runs} runs"
    );
    let batches = generated(events);
    for (name, streaming, batch, strings) in [
        (
            "TUMBLE(1 min) count by (tenant, src_ip)",
            TUMBLE,
            BATCH_TUMBLE,
            BATCH_TUMBLE_STRINGS,
        ),
        (
            "HOP(10 s, 1 min) count by (tenant, src_ip)",
            HOP,
            BATCH_HOP,
            BATCH_HOP_STRINGS,
        ),
    ] {
        stream_once(streaming, events / 10); // warm-up
                                             // Interleaved, so machine noise falls on all three alike.
        let (mut s, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            s.push(stream_once(streaming, events));
            b.push(batch_once(batch, &batches));
            c.push(batch_once(strings, &batches));
        }
        let rows = (s[0].1, b[0].1, c[0].1);
        let (sm, smin, smax) = spread(s.into_iter().map(|r| r.0).collect());
        let (bm, bmin, bmax) = spread(b.into_iter().map(|r| r.0).collect());
        let (cm, cmin, cmax) = spread(c.into_iter().map(|r| r.0).collect());
        println!("{name}");
        println!(
            "  vigil stream, generator included     median {:>6.2} M events/s (min {:.2}, max {:.2}; {} window rows)",
            sm / 1e6, smin / 1e6, smax / 1e6, rows.0
        );
        println!(
            "  datafusion batch, rows as generated  median {:>6.2} M rows/s   (min {:.2}, max {:.2}; {} rows)",
            bm / 1e6, bmin / 1e6, bmax / 1e6, rows.1
        );
        println!(
            "  datafusion batch, keys as strings    median {:>6.2} M rows/s   (min {:.2}, max {:.2}; {} rows)",
            cm / 1e6, cmin / 1e6, cmax / 1e6, rows.2
        );
        println!(
            "  ratio stream / batch                 {:.2} (rows as generated), {:.2} (keys as strings)",
            sm / bm,
            sm / cm
        );
    }
    overhead(events, runs);
}
