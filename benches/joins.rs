//! Interval join benchmark: network flows joined with authentication events
//! by source address within ±1 minute, on one core.
//!
//! Two figures:
//! * the join operator alone, fed the generator's batches (already in
//!   memory, prepared by the query's own prepare steps) in event-time order
//!   with the engine's watermark (the smaller side's, minus the disorder):
//!   input events per second, pairs out, and the peak of the state it holds
//!   (buffered batches and key index, as `IntervalJoin::state_bytes` counts);
//! * the whole pipeline file (two generators, prepare steps, the join, a
//!   null sink) on a current-thread runtime, generators included.
//!
//! Both over ten minutes and over an hour of event time: the same events,
//! denser or sparser in time, so more or fewer pairs. Run with
//! `cargo bench --bench joins` (add `-- --flows N --auth M --runs R`).

mod support;

use std::time::Instant;

use support::pipeline::run_plan;
use support::{arg, spread};

use arrow::array::AsArray;
use arrow::datatypes::{SchemaRef, TimestampMillisecondType};
use arrow::record_batch::RecordBatch;
use vigil::pipeline::{load_str, PlanOptions};
use vigil_engine::{Collector, Operator, TaskContext};
use vigil_operators::join::IntervalJoinFactory;
use vigil_operators::sql::{plan_query, Catalog, PlannedQuery, QueryOptions, TableInfo};

const QUERY: &str =
    "SELECT f.ts, f.src_ip, f.dst_ip, f.dst_port, f.bytes, a.ts AS auth_ts, a.user, a.outcome \
     FROM flows f JOIN auth a ON f.src_ip = a.src_ip \
     AND a.ts BETWEEN f.ts - INTERVAL '1' MINUTE AND f.ts + INTERVAL '1' MINUTE";

fn source(name: &str, stream: &str, events: u64, span_s: u64) -> String {
    format!(
        "  {name}:
    type: generator
    stream: {stream}
    seed: 7
    partitions: 1
    count: {events}
    event_rate: {}
    start_time: 2026-01-01T00:00:00Z
    batch_size: 8192
    watermark: {{ out_of_orderness: 2s }}
",
        (events / span_s).max(1)
    )
}

fn pipeline(flows: u64, auth: u64, span_s: u64, join: bool) -> String {
    let (transforms, sinks) = if join {
        (
            format!("transforms:\n  j:\n    type: sql\n    query: \"{QUERY}\"\n"),
            "sinks:\n  out: { type: null, input: j }\n".to_string(),
        )
    } else {
        (
            String::new(),
            "sinks:\n  f: { type: null, input: flows }\n  a: { type: null, input: auth }\n"
                .to_string(),
        )
    };
    format!(
        "name: joins\nsources:\n{}{}{transforms}{sinks}",
        source("flows", "network", flows, span_s),
        source("auth", "auth", auth, span_s)
    )
}

/// The generated flows and authentication events, in memory.
fn generated(flows: u64, auth: u64, span_s: u64) -> (Vec<RecordBatch>, Vec<RecordBatch>) {
    let mut plan = load_str(
        "joins.yaml",
        &pipeline(flows, auth, span_s, false),
        &PlanOptions::default(),
    )
    .expect("valid pipeline");
    let f = plan.capture("f").expect("sink");
    let a = plan.capture("a").expect("sink");
    run_plan(&plan);
    let (f, a) = (f.lock().clone(), a.lock().clone());
    (f, a)
}

struct Tables(SchemaRef, SchemaRef);

impl Catalog for Tables {
    fn table(&self, name: &str) -> Option<TableInfo> {
        match name {
            "flows" => Some(TableInfo {
                schema: self.0.clone(),
            }),
            "auth" => Some(TableInfo {
                schema: self.1.clone(),
            }),
            _ => None,
        }
    }
    fn names(&self) -> Vec<String> {
        vec!["flows".into(), "auth".into()]
    }
}

fn max_ts(b: &RecordBatch) -> i64 {
    let t = b
        .column_by_name("ts")
        .expect("ts")
        .as_primitive::<TimestampMillisecondType>();
    arrow::compute::max(t).unwrap_or(i64::MIN)
}

#[allow(clippy::disallowed_methods)] // a benchmark measures wall time
/// The operator alone: input events/s, pairs out, peak state bytes.
fn operator_once(flows: &[RecordBatch], auth: &[RecordBatch]) -> (f64, usize, usize) {
    let catalog = Tables(flows[0].schema(), auth[0].schema());
    let options = QueryOptions {
        name: "j".into(),
        ..QueryOptions::default()
    };
    let PlannedQuery::Join {
        left, right, join, ..
    } = plan_query(QUERY, &catalog, &options).expect("plans")
    else {
        panic!("an interval join");
    };
    // Prepared outside the timing: the prepare steps are stateless stages
    // of their own nodes in a pipeline.
    let prepared = |batches: &[RecordBatch], stages: &vigil_operators::sql::Stages| {
        batches
            .iter()
            .map(|b| (max_ts(b), stages.run(b.clone()).expect("prepare")))
            .collect::<Vec<_>>()
    };
    let sides = [prepared(flows, &left), prepared(auth, &right)];
    let mut op = IntervalJoinFactory::new(*join)
        .build(&TaskContext::detached("j", 0, 1, 0))
        .expect("join");
    let events: usize = sides.iter().flatten().map(|(_, b)| b.num_rows()).sum();
    let mut out = Collector::new();
    let (mut at, mut seen) = ([0usize; 2], [i64::MIN; 2]);
    let (mut pairs, mut peak) = (0usize, 0usize);
    let started = Instant::now();
    while at[0] < sides[0].len() || at[1] < sides[1].len() {
        // The side that is behind in event time goes next.
        let s = if at[1] >= sides[1].len()
            || (at[0] < sides[0].len() && sides[0][at[0]].0 <= sides[1][at[1]].0)
        {
            0
        } else {
            1
        };
        let (t, b) = &sides[s][at[s]];
        at[s] += 1;
        seen[s] = seen[s].max(*t);
        op.process_batch(s, b.clone(), &mut out).expect("batch");
        let done = |i: usize| at[i] >= sides[i].len();
        let w = |i: usize| if done(i) { i64::MAX } else { seen[i] - 2_000 };
        op.on_watermark(w(0).min(w(1)), &mut out)
            .expect("watermark");
        pairs += out.take_main().iter().map(|b| b.num_rows()).sum::<usize>();
        // Sampled: measuring walks the key index.
        if (at[0] + at[1]) % 16 == 0 {
            peak = peak.max(op.state_bytes());
        }
    }
    op.on_watermark(i64::MAX, &mut out).expect("end");
    pairs += out.take_main().iter().map(|b| b.num_rows()).sum::<usize>();
    let rate = events as f64 / started.elapsed().as_secs_f64();
    assert_eq!(op.state_rows(), 0, "state is empty at the end");
    (rate, pairs, peak)
}

#[allow(clippy::disallowed_methods)] // a benchmark measures wall time
/// The whole pipeline on one core: input events/s.
fn pipeline_once(flows: u64, auth: u64, span_s: u64) -> f64 {
    let plan = load_str(
        "joins.yaml",
        &pipeline(flows, auth, span_s, true),
        &PlanOptions::default(),
    )
    .expect("valid pipeline");
    let started = Instant::now();
    run_plan(&plan);
    (flows + auth) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let flows = arg("--flows", 5_000_000);
    let auth = arg("--auth", 1_000_000);
    let runs = arg("--runs", 5) as usize;
    println!(
        "vigil interval join, one core: {flows} flows JOIN {auth} auth events ON src_ip, ±1 min; \
         median of {runs} runs"
    );
    // The same events over ten minutes of event time (each flow pairs with
    // about four logins) and over an hour (fewer, sparser pairs).
    for span_s in [600, 3600] {
        let (f, a) = generated(flows, auth, span_s);
        operator_once(&f[..f.len() / 10], &a[..a.len() / 10]); // warm-up
        let (mut op, mut whole) = (Vec::new(), Vec::new());
        let (mut pairs, mut peak) = (0, 0);
        for _ in 0..runs {
            let (rate, p, bytes) = operator_once(&f, &a);
            op.push(rate);
            (pairs, peak) = (p, peak.max(bytes));
            whole.push(pipeline_once(flows, auth, span_s));
        }
        let (om, omin, omax) = spread(op);
        let (wm, wmin, wmax) = spread(whole);
        let events = (flows + auth) as f64;
        println!("over {span_s} s of event time: {pairs} pairs");
        println!(
            "  join operator alone        median {:>6.2} M events/s (min {:.2}, max {:.2}); {:.2} M pairs/s; peak state {:.0} MiB",
            om / 1e6,
            omin / 1e6,
            omax / 1e6,
            pairs as f64 * om / events / 1e6,
            peak as f64 / (1024.0 * 1024.0)
        );
        println!(
            "  pipeline, generators incl. median {:>6.2} M events/s (min {:.2}, max {:.2})",
            wm / 1e6,
            wmin / 1e6,
            wmax / 1e6
        );
    }
}
