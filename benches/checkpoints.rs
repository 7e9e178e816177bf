//! Checkpoint benchmark: 1 M keys of open window state.
//!
//! A tumbling-window SQL step (`count(*)`, `sum(bytes)` per key over one
//! hour), planned by the same loader as `vigil run`, is fed 1 M distinct
//! keys. Then, each run:
//!
//! * **snapshot**: the operator's state as Arrow tables (with key groups);
//! * **store**: those tables written to a local checkpoint directory as
//!   Arrow IPC plus the manifest, and the bytes it took;
//! * **recover**: the latest checkpoint read back and restored into a new
//!   operator at the same parallelism;
//! * **rescale**: the same checkpoint restored into two subtasks, each
//!   taking the key groups it owns.
//!
//! Figures are medians over `--runs` (default 5) on this machine; run with
//! `cargo bench --bench checkpoints` (add `-- --keys N --runs R`).

mod support;

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Int64Array, StringArray, TimestampMillisecondArray};
use arrow::record_batch::RecordBatch;
use support::{arg, spread};
use vigil::pipeline::{load_str, PlanOptions};
use vigil_engine::graph::NodeKind;
use vigil_engine::{CheckpointStore, Collector, CompletedCheckpoint, OperatorFactory, TaskContext};

const PIPELINE: &str = "\
name: checkpoint-bench
sources:
  t:
    type: file
    path: /dev/null
    schema:
      fields:
        - { name: ts, type: timestamp }
        - { name: key, type: string }
        - { name: bytes, type: int64 }
      event_time: { field: ts, format: epoch_ms }
transforms:
  w:
    type: sql
    query: \"SELECT window_start, window_end, key, count(*) AS n, sum(bytes) AS total FROM t GROUP BY TUMBLE(ts, INTERVAL '1' HOUR), key\"
sinks:
  out: { type: null, input: w }
";

fn factory(plan: &vigil::pipeline::Plan, name: &str) -> Arc<dyn OperatorFactory> {
    plan.graph
        .nodes()
        .iter()
        .find_map(|n| match &n.kind {
            NodeKind::Operator(f) if n.name == name => Some(f.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no operator {name}"))
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

#[allow(clippy::disallowed_methods)] // a benchmark times itself
fn main() {
    let keys = arg("--keys", 1_000_000) as usize;
    let runs = arg("--runs", 5) as usize;
    let plan = load_str("bench.yaml", PIPELINE, &PlanOptions::default()).expect("plan");
    let prepare = factory(&plan, "w/prepare");
    let window = factory(&plan, "w");
    let ctx = TaskContext::detached("w", 0, 1, 0);
    let mut prep = prepare.create(&ctx).expect("prepare");
    let mut op = window.create(&ctx).expect("window");

    // 1 M keys, two rows each, all in one open window.
    let schema = plan.graph.nodes()[0]
        .output_schema(vigil_engine::Port::Main)
        .expect("source schema");
    let chunk = 65_536;
    let mut out = Collector::new();
    let fed = Instant::now();
    for round in 0..2 {
        for start in (0..keys).step_by(chunk) {
            let end = (start + chunk).min(keys);
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(
                        TimestampMillisecondArray::from_iter_values(
                            (start..end)
                                .map(|i| 1_767_225_600_000 + (i as i64 % 3_000_000) + round),
                        )
                        .with_timezone("UTC"),
                    ),
                    Arc::new(StringArray::from_iter_values(
                        (start..end).map(|i| format!("user-{i:08}")),
                    )),
                    Arc::new(Int64Array::from_iter_values((start..end).map(|i| i as i64))),
                ],
            )
            .expect("batch");
            prep.process_batch(0, batch, &mut out).expect("prepare");
            for b in out.take_main() {
                let mut sink = Collector::new();
                op.process_batch(0, b, &mut sink).expect("window");
            }
        }
    }
    println!("window state: {keys} keys, fed in {:.0} ms", ms(fed));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (mut snap, mut store_ms, mut recover, mut rescale) = (vec![], vec![], vec![], vec![]);
    let mut bytes = 0u64;
    for run in 0..runs {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CheckpointStore::open(&dir.path().display().to_string(), 2).expect("store");

        let t = Instant::now();
        let state = op.snapshot().expect("snapshot");
        snap.push(ms(t));
        let rows: usize = state.batches.iter().map(|b| b.num_rows()).sum();

        let mut checkpoint = CompletedCheckpoint {
            id: run as u64 + 1,
            ..CompletedCheckpoint::default()
        };
        checkpoint.parallelism.insert("w".into(), 1);
        checkpoint.states.insert(("w".into(), 0), state);
        let t = Instant::now();
        let size = rt.block_on(store.write(&checkpoint)).expect("write");
        store_ms.push(ms(t));
        bytes = size.bytes;

        let t = Instant::now();
        let read = rt
            .block_on(store.latest())
            .expect("read")
            .expect("a checkpoint");
        let state = read.state("w", 0).expect("state").clone();
        let mut fresh = window.create(&ctx).expect("window");
        fresh
            .restore(state.owned_by(0, 1).expect("owned"))
            .expect("restore");
        recover.push(ms(t));
        assert_eq!(
            fresh
                .snapshot()
                .expect("again")
                .batches
                .iter()
                .map(|b| b.num_rows())
                .sum::<usize>(),
            rows,
            "recovered state holds every key"
        );

        let t = Instant::now();
        for s in 0..2 {
            let ctx = TaskContext::detached("w", s, 2, 0);
            let mut part = window.create(&ctx).expect("window");
            part.restore(state.owned_by(s, 2).expect("owned"))
                .expect("restore");
        }
        rescale.push(ms(t));
    }
    let show = |name: &str, v: Vec<f64>| {
        let (median, lo, hi) = spread(v);
        println!("{name:<28} median {median:>8.0} ms  (min {lo:.0}, max {hi:.0})");
    };
    println!(
        "checkpoint size: {:.1} MB ({:.0} bytes a key), Arrow IPC, uncompressed",
        bytes as f64 / 1e6,
        bytes as f64 / keys as f64
    );
    show("snapshot", snap);
    show("store (local disk)", store_ms);
    show("recover (read + restore)", recover);
    show("rescale 1 -> 2 (restore)", rescale);
}
